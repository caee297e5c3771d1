//! A sender fed arbitrary acknowledgements (and other datagrams) after a valid start: acks for
//! chunks never sent, absurd ranges, duplicates, reordering. Never a panic, never more in flight
//! than the window allows, never a datagram larger than the configured size.
#![no_main]
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use udpferry::core::{Sender, TransferConfig};
use udpferry::wire::{self, Ack, AckRanges, ConnectionId, Datagram, Frame, HaveRanges, Request};
use udpferry::ObjectId;

fuzz_target!(|data: &[u8]| {
    let object = vec![7u8; 60_000];
    let id = ObjectId::md5_of(&object);
    let start = Instant::now();
    let mut now = start;
    let request = Request {
        object: id,
        max_datagram_size: 1200,
        max_rate_bytes_per_sec: 0,
        have: HaveRanges::List(&[]),
    };
    let Ok(mut tx) = Sender::accept(
        now,
        ConnectionId(1),
        &request,
        object.len() as u64,
        object.as_slice(),
        99,
        TransferConfig::default(),
    ) else {
        return;
    };
    let mut buf = vec![0u8; 2048];
    let mut send = |tx: &mut Sender<&[u8]>, frame: Frame<'_>, now: Instant| {
        let mut out = [0u8; 2048];
        if let Ok(n) = (Datagram {
            conn_id: ConnectionId(1),
            frame,
        })
        .encode(&mut out)
        {
            tx.handle_datagram(now, &out[..n]);
        }
    };
    send(
        &mut tx,
        Frame::Start {
            nonce: 99,
            request: request.clone(),
        },
        now,
    );
    // Input records: [step_ms, largest_seq lo, cum lo/hi, window lo/hi, range_count, (gap, len)*]
    let mut rest = data;
    while rest.len() >= 8 {
        now += Duration::from_millis(u64::from(rest[0] % 64));
        // Sending never takes the bytes in flight past the window, but for up to two probes
        // (a smaller window after a loss leaves what is already in flight alone).
        let before = tx.stats().bytes_in_flight;
        while let Some(n) = tx.poll_transmit(now, &mut buf) {
            assert!(n <= 1200);
        }
        let after = tx.stats();
        assert!(
            after.bytes_in_flight <= before.max(after.congestion_window) + 2 * 1200,
            "{before} -> {after:?}"
        );
        if tx.poll_timeout().is_some_and(|t| t <= now) {
            tx.handle_timeout(now);
        }
        let largest = u64::from(rest[1]);
        let cumulative = u32::from(u16::from_be_bytes([rest[2], rest[3]]));
        let window_end = u32::from(u16::from_be_bytes([rest[4], rest[5]]));
        let count = usize::from(rest[6] % 16);
        let kind = rest[7];
        rest = &rest[8..];
        let mut ranges = Vec::new();
        let mut at = u64::from(cumulative);
        for pair in rest.chunks_exact(2).take(count) {
            let start = at + 1 + u64::from(pair[0]);
            let end = start + 1 + u64::from(pair[1]);
            ranges.push(start..end);
            at = end;
        }
        rest = &rest[(2 * count).min(rest.len())..];
        let frame = match kind % 8 {
            0 => Frame::Done,
            1 => Frame::Start {
                nonce: u64::from(kind),
                request: request.clone(),
            },
            _ => Frame::Ack(Ack {
                largest_seq: largest,
                ack_delay_us: u32::from(kind) * 100,
                owd_us: u32::from(kind) << 8,
                window_end,
                cumulative,
                ranges: AckRanges::List(&ranges),
            }),
        };
        send(&mut tx, frame, now);
        while tx.poll_event().is_some() {}
    }
    let _ = wire::decode(&buf[..0]);
});
