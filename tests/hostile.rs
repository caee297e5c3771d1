//! Hostile peers: a server that offers more than the disk holds or sends chunks outside the
//! object, a client that sends absurd, lying, duplicated and reordered acknowledgements.
//! (Wrong content, vanishing peers and oversized offers are in tests/lifecycle.rs; floods in
//! tests/cli.rs and tests/loopback.rs.)

mod common;

use common::TempDir;
use std::net::UdpSocket;
use std::ops::Range;
use std::thread;
use std::time::{Duration, Instant};

use udpferry::core::{Event, RangeSet, Receiver, Sender, TransferConfig};
use udpferry::net::{Client, FetchError, FetchOptions};
use udpferry::store::StoreError;
use udpferry::wire::{
    self, Ack, AckRanges, ConnectionId, Data, Datagram, ErrorCode, Frame, HaveRanges, Offer,
    Request,
};
use udpferry::ObjectId;

fn encode(conn: ConnectionId, frame: Frame<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    let n = Datagram {
        conn_id: conn,
        frame,
    }
    .encode(&mut buf)
    .unwrap();
    buf.truncate(n);
    buf
}

/// A server that answers the first request with an offer of 4 TiB (more than any disk here has
/// free, and within what 32-bit chunk indices can name) and then only listens.
#[test]
fn an_offer_larger_than_the_free_disk_space_fails_before_writing_and_tells_the_server() {
    const HUGE: u64 = 4 << 40;
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let liar = thread::spawn(move || -> Option<ErrorCode> {
        let mut buf = vec![0u8; 2048];
        let (n, from) = server.recv_from(&mut buf).ok()?;
        let d = wire::decode(&buf[..n]).ok()?;
        let Frame::Request(r) = d.frame else {
            return None;
        };
        let offer = encode(
            d.conn_id,
            Frame::Offer(Offer {
                object: r.object,
                size: HUGE,
                chunk_size: 1166,
                nonce: 5,
            }),
        );
        server.send_to(&offer, from).ok()?;
        // What the client says next: it must refuse, not start.
        loop {
            let (n, _) = server.recv_from(&mut buf).ok()?;
            match wire::decode(&buf[..n]).ok()?.frame {
                Frame::Error(e) => return Some(e.code),
                Frame::Start { .. } => return None,
                _ => {}
            }
        }
    });
    let cache = TempDir::new("nospace");
    let mut config = udpferry::EndpointConfig::default();
    config.transfer.max_object_size = 1 << 50; // the disk, not this limit, must refuse
    let client = Client::new(&cache.0).unwrap().with_config(config);
    let options = FetchOptions {
        timeout: Some(Duration::from_secs(20)),
        ..FetchOptions::default()
    };
    let id = ObjectId::md5_of(b"a map nobody has");
    let started = Instant::now();
    let result = client.fetch(addr, id, &options, |_| {});
    match result {
        Err(FetchError::Store(StoreError::NoSpace { needed, free, .. })) => {
            assert_eq!(needed, HUGE);
            assert!(free < HUGE);
        }
        other => panic!("expected a no-space error, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5), "failed fast");
    assert_eq!(
        liar.join().unwrap(),
        Some(ErrorCode::Cancelled),
        "the server is told to stop"
    );
    let part = cache.0.join(format!("{}.part", id.to_hex()));
    let written = std::fs::metadata(&part).map_or(0, |m| m.len());
    assert_eq!(
        written, 0,
        "nothing was written for an object that cannot fit"
    );
}

/// Chunks past the end, chunks of the wrong length and chunk indices beyond 32 bits' worth of
/// the object are dropped and never reach the sink; the right bytes still complete.
#[test]
fn data_outside_the_object_is_dropped_and_never_written() {
    let data: Vec<u8> = (0..5000u32).map(|i| (i * 31 % 251) as u8).collect();
    let id = ObjectId::md5_of(&data);
    let now = Instant::now();
    let conn = ConnectionId(3);
    let mut rx = Receiver::new(
        now,
        conn,
        id,
        &RangeSet::new(),
        Vec::new(),
        TransferConfig::default(),
    );
    let mut buf = vec![0u8; 2048];
    rx.poll_transmit(now, &mut buf).expect("request");
    rx.handle_datagram(
        now,
        &encode(
            conn,
            Frame::Offer(Offer {
                object: id,
                size: data.len() as u64,
                chunk_size: 1166,
                nonce: 1,
            }),
        ),
    );
    let data_frame = |seq: u64, chunk: u32, payload: &[u8]| {
        encode(
            conn,
            Frame::Data(Data {
                seq,
                send_time_us: 0,
                chunk,
                payload,
            }),
        )
    };
    let hostile = [
        data_frame(1, 5, &data[..100]),    // chunk 5 of a 5-chunk object
        data_frame(2, u32::MAX, &[0; 10]), // far past the end
        data_frame(3, 4, &[0xee; 1166]),   // the last chunk (336 bytes) sent full length
        data_frame(4, 0, &[0xee; 1000]),   // a short first chunk
        data_frame(5, 1, &[]),             // empty
    ];
    for d in &hostile {
        rx.handle_datagram(now, d);
    }
    assert_eq!(rx.stats().dropped.invalid, hostile.len() as u64);
    assert_eq!(rx.bytes_received(), 0);
    assert!(rx.sink().is_empty(), "nothing was written");
    for (i, chunk) in data.chunks(1166).enumerate() {
        rx.handle_datagram(now, &data_frame(10 + i as u64, i as u32, chunk));
    }
    // The ack of the last chunk goes out first; the digest is checked in the next timeout.
    while rx.poll_transmit(now, &mut buf).is_some() {}
    assert!(rx.poll_timeout().is_some_and(|t| t <= now));
    rx.handle_timeout(now);
    let events: Vec<Event> = std::iter::from_fn(|| rx.poll_event()).collect();
    assert!(
        events.iter().any(|e| matches!(e, Event::Completed(_))),
        "{events:?}"
    );
    assert_eq!(rx.sink(), &data);
}

/// What a hostile client might acknowledge.
fn ack(largest_seq: u64, cumulative: u32, window_end: u32, ranges: &[Range<u64>]) -> Vec<u8> {
    encode(
        ConnectionId(1),
        Frame::Ack(Ack {
            largest_seq,
            ack_delay_us: u32::MAX,
            owd_us: u32::MAX,
            window_end,
            cumulative,
            ranges: AckRanges::List(ranges),
        }),
    )
}

/// A sender under a 1 MiB/s cap fed, every 5 ms of virtual time, acks for datagrams it never
/// sent, acks that claim everything or absurd ranges and windows, and duplicated and reordered
/// copies of plausible ones: no panic, never more than the cap allows, and acks for datagrams
/// never sent settle nothing.
#[test]
fn absurd_duplicate_and_reordered_acks_neither_panic_nor_break_the_rate_cap() {
    const CAP: u64 = 1 << 20;
    let object: Vec<u8> = (0..8_000_000u32).map(|i| (i % 253) as u8).collect();
    let id = ObjectId::md5_of(&object);
    let start = Instant::now();
    let config = TransferConfig {
        max_rate_bytes_per_sec: CAP,
        ..TransferConfig::default()
    };
    let request = Request {
        object: id,
        max_datagram_size: 1200,
        max_rate_bytes_per_sec: 0,
        have: HaveRanges::List(&[]),
    };
    let mut tx = Sender::accept(
        start,
        ConnectionId(1),
        &request,
        object.len() as u64,
        object.as_slice(),
        42,
        config,
    )
    .unwrap();
    tx.handle_datagram(
        start,
        &encode(
            ConnectionId(1),
            Frame::Start {
                nonce: 42,
                request: request.clone(),
            },
        ),
    );
    let mut buf = vec![0u8; 2048];
    let mut sent: Vec<(Duration, usize)> = Vec::new();
    let mut highest_seq = 0u64;
    let mut acks: Vec<Vec<u8>> = Vec::new();
    let mut now = start;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    while now - start < Duration::from_secs(6) {
        while let Some(n) = tx.poll_transmit(now, &mut buf) {
            if let Ok(Datagram {
                frame: Frame::Data(d),
                ..
            }) = wire::decode(&buf[..n])
            {
                highest_seq = highest_seq.max(d.seq);
            }
            sent.push((now - start, n));
        }
        // Lies first: acknowledging a datagram never sent must settle nothing.
        let before = tx.bytes_acked();
        tx.handle_datagram(
            now,
            &ack(highest_seq + 1 + next() % 1000, u32::MAX, u32::MAX, &[]),
        );
        assert_eq!(
            tx.bytes_acked(),
            before,
            "an ack for an unsent datagram settled bytes"
        );
        // Then absurd and plausible acks, some duplicated, some replayed out of order.
        let c = (next() % 2000) as u32;
        let absurd = match next() % 4 {
            0 => ack(
                highest_seq,
                c,
                u32::MAX,
                std::slice::from_ref(&(u64::from(c) + 2..u64::from(u32::MAX))),
            ),
            1 => ack(highest_seq, 0, 0, &[]),
            2 => ack(
                highest_seq / 2,
                c,
                c.saturating_add(100),
                &[
                    u64::from(c) + 5..u64::from(c) + 6,
                    u64::from(c) + 9..u64::from(c) + 400,
                ],
            ),
            _ => ack(highest_seq, c / 2, c.saturating_add(2000), &[]),
        };
        acks.push(absurd);
        let i = (next() as usize) % acks.len();
        for d in [&acks[acks.len() - 1], &acks[acks.len() - 1], &acks[i]] {
            tx.handle_datagram(now, d);
        }
        while tx.poll_event().is_some() {}
        now += Duration::from_millis(5);
        if let Some(t) = tx.poll_timeout() {
            if t <= now {
                tx.handle_timeout(now);
            }
        }
    }
    // The cap holds in every one-second window (plus one burst of 10 datagrams).
    let burst = 10 * 1200;
    let mut busiest = 0;
    for (i, &(t0, _)) in sent.iter().enumerate() {
        let in_window: usize = sent[i..]
            .iter()
            .take_while(|(t, _)| *t < t0 + Duration::from_secs(1))
            .map(|(_, n)| n)
            .sum();
        busiest = busiest.max(in_window);
    }
    assert!(
        busiest as u64 <= CAP + CAP / 20 + burst,
        "busiest second carried {busiest} bytes under a {CAP} B/s cap"
    );
    assert!(!sent.is_empty());
}
