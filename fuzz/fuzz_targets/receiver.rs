//! A receiver fed an arbitrary sequence of datagrams (each resealed with a valid CRC so the
//! fuzzer reaches the state machine) and time steps: never a panic, never a wrong success.
#![no_main]
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use udpferry::core::{Event, RangeSet, Receiver, TransferConfig};
use udpferry::wire::ConnectionId;
use udpferry::ObjectId;

fuzz_target!(|data: &[u8]| {
    let id = ObjectId::md5_of(b"the map");
    let start = Instant::now();
    let mut now = start;
    let mut rx = Receiver::new(
        now,
        ConnectionId(7),
        id,
        &RangeSet::new(),
        Vec::new(),
        TransferConfig::default(),
    );
    let mut buf = vec![0u8; 2048];
    // Input: records of [len: u8][step_ms: u8][body: len bytes], each wrapped as a datagram of
    // connection 7 with a valid checksum.
    let mut rest = data;
    while rest.len() >= 3 {
        let len = usize::from(rest[0]).min(rest.len() - 3);
        let kind = rest[1] % 8;
        now += Duration::from_millis(u64::from(rest[2]));
        let body = &rest[3..3 + len];
        rest = &rest[3 + len..];
        let mut d = Vec::with_capacity(len + 18);
        d.extend_from_slice(b"UFRY\x01");
        d.push(kind);
        d.extend_from_slice(&7u64.to_be_bytes());
        d.extend_from_slice(body);
        let crc = crc32fast::hash(&d);
        d.extend_from_slice(&crc.to_be_bytes());
        rx.handle_datagram(now, &d);
        if rx.poll_timeout().is_some_and(|t| t <= now) {
            rx.handle_timeout(now);
        }
        while rx.poll_transmit(now, &mut buf).is_some() {}
        while let Some(e) = rx.poll_event() {
            if let Event::Completed(c) = e {
                // Success only for bytes that hash to the id.
                assert_eq!(ObjectId::md5_of(rx.sink()), c.object);
            }
        }
    }
});
