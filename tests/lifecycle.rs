//! Handshake, errors, timeouts and the end of a transfer.

mod common;

use std::time::{Duration, Instant};

use common::*;
use udpferry::core::{Event, RangeSet, Receiver, TransferConfig, TransferError};
use udpferry::wire::{self, ConnectionId, Data, Datagram, Frame, Offer};
use udpferry::ObjectId;
use udpferry_sim::{LinkConfig, OneShotServer, Pair, Peer, RunOutcome};

fn link() -> LinkConfig {
    LinkConfig::clean(Duration::from_millis(10))
}

/// The server side of a test: `data` served under the name `id` (nonce 1).
fn server(id: ObjectId, data: Vec<u8>, config: TransferConfig) -> OneShotServer<Vec<u8>> {
    OneShotServer::new(id, data.len() as u64, data, config, 1)
}

/// The client side of a test, on connection 9.
fn receiver<K: udpferry::core::ChunkSink>(
    start: Instant,
    id: ObjectId,
    have: &RangeSet,
    sink: K,
    config: TransferConfig,
) -> Receiver<K> {
    Receiver::new(start, ConnectionId(9), id, have, sink, config)
}

/// A client with nothing cached, default settings, collecting into memory.
fn fresh_receiver(start: Instant, id: ObjectId) -> Receiver<Vec<u8>> {
    receiver(
        start,
        id,
        &RangeSet::new(),
        Vec::new(),
        TransferConfig::default(),
    )
}

fn receiver_events<K: udpferry::core::ChunkSink>(r: &mut Receiver<K>) -> Vec<Event> {
    std::iter::from_fn(|| r.poll_event()).collect()
}

#[test]
fn unknown_object_is_not_found() {
    let data = object(5000, 1);
    let other = ObjectId::md5_of(b"some other map");
    let start = Instant::now();
    let server = OneShotServer::new(
        ObjectId::md5_of(&data),
        5000,
        data,
        TransferConfig::default(),
        1,
    );
    let rx = fresh_receiver(start, other);
    let mut pair = Pair::new(1, start, server, rx, link(), link());
    pair.run(1000, start + Duration::from_secs(60));
    let events = receiver_events(&mut pair.b);
    assert_eq!(events.last(), Some(&Event::Failed(TransferError::NotFound)));
    assert!(pair.b.is_finished());
}

#[test]
fn wrong_bytes_under_the_requested_name_never_complete() {
    let data = object(100_000, 2);
    let claimed = ObjectId::md5_of(b"what the client asked for");
    let start = Instant::now();
    let server = server(claimed, data, TransferConfig::default());
    let rx = fresh_receiver(start, claimed);
    let mut pair = Pair::new(2, start, server, rx, link(), link());
    pair.run(100_000, start + Duration::from_secs(60));
    let events = receiver_events(&mut pair.b);
    assert!(!events.iter().any(|e| matches!(e, Event::Completed(_))));
    match events.last() {
        Some(Event::Failed(TransferError::DigestMismatch { expected, .. })) => {
            assert_eq!(*expected, claimed)
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    // The server is told, and does not report success either.
    assert!(
        matches!(
            pair.a.events.last(),
            Some(Event::Failed(TransferError::Peer { .. }))
        ),
        "{:?}",
        pair.a.events.last()
    );
}

/// With the verification left to the caller (a multi-source piece, a manifest), the receiver
/// computes no digest: the same wrong bytes complete, and the caller must check them; and it
/// can only be asked for before the transfer begins.
#[test]
fn verification_left_to_the_caller_completes_on_arrival_alone() {
    let data = object(100_000, 2);
    let claimed = ObjectId::md5_of(b"what the client asked for");
    let start = Instant::now();
    let server = server(claimed, data.clone(), TransferConfig::default());
    let mut rx = fresh_receiver(start, claimed);
    assert!(rx.verify_by_caller());
    let mut pair = Pair::new(2, start, server, rx, link(), link());
    assert_eq!(
        pair.run(100_000, start + Duration::from_secs(60)),
        RunOutcome::BothFinished
    );
    let events = receiver_events(&mut pair.b);
    assert!(
        matches!(events.last(), Some(Event::Completed(_))),
        "{events:?}"
    );
    assert!(pair.b.sink() == &data, "every byte arrived, unverified");
    assert!(!pair.b.verify_by_caller(), "too late once the transfer ran");
}

/// A server that built another object with the same MD5 passes an MD5 check; under a SHA-256
/// id the receiver checks SHA-256, so the right object completes and any other fails.
#[test]
fn sha256_ids_are_verified_with_sha256() {
    let data = object(100_000, 3);
    let start = Instant::now();
    let id = ObjectId::sha256_of(&data);
    let rx = fresh_receiver(start, id);
    let mut pair = Pair::new(
        3,
        start,
        server(id, data.clone(), TransferConfig::default()),
        rx,
        link(),
        link(),
    );
    pair.run(100_000, start + Duration::from_secs(60));
    let events = receiver_events(&mut pair.b);
    assert!(
        events.iter().any(|e| matches!(e, Event::Completed(_))),
        "{events:?}"
    );
    assert_eq!(pair.b.sink(), &data);

    let mut other = data.clone();
    other[50_000] ^= 1;
    let rx = fresh_receiver(start, id);
    let mut pair = Pair::new(
        4,
        start,
        server(id, other.clone(), TransferConfig::default()),
        rx,
        link(),
        link(),
    );
    pair.run(100_000, start + Duration::from_secs(60));
    match receiver_events(&mut pair.b).last() {
        Some(Event::Failed(TransferError::DigestMismatch { expected, actual })) => {
            assert_eq!((*expected, *actual), (id, ObjectId::sha256_of(&other)));
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
}

#[test]
fn silent_server_times_out_without_spinning() {
    let config = TransferConfig {
        idle_timeout: Duration::from_secs(5),
        ..TransferConfig::default()
    };
    let start = Instant::now();
    let server = OneShotServer::new(ObjectId::md5_of(b"x"), 1, b"x".to_vec(), config.clone(), 1);
    let rx = receiver(
        start,
        ObjectId::md5_of(b"x"),
        &RangeSet::new(),
        Vec::new(),
        config,
    );
    let mut pair = Pair::new(
        3,
        start,
        server,
        rx,
        link().with_loss(1.0),
        link().with_loss(1.0),
    );
    let outcome = pair.run(10_000, start + Duration::from_secs(3600));
    assert_eq!(
        outcome,
        RunOutcome::Stalled,
        "the receiver gave up, so nothing is left to happen"
    );
    let events = receiver_events(&mut pair.b);
    assert_eq!(
        events.last(),
        Some(&Event::Failed(TransferError::TimedOut(
            Duration::from_secs(5)
        )))
    );
    let elapsed = pair.now - start;
    assert!(
        elapsed >= Duration::from_secs(5) && elapsed < Duration::from_secs(6),
        "{elapsed:?}"
    );
    // Requests are retried with backoff, not in a tight loop.
    let sent = pair.b.stats().datagrams_sent;
    assert!((2..=12).contains(&sent), "{sent} requests in 5 s");
}

#[test]
fn server_vanishing_mid_transfer_times_out_both_sides_and_keeps_the_partial() {
    let config = TransferConfig {
        idle_timeout: Duration::from_secs(4),
        ..TransferConfig::default()
    };
    let data = object(4 << 20, 4);
    let id = ObjectId::md5_of(&data);
    let start = Instant::now();
    let server = server(id, data.clone(), config.clone());
    let rx = receiver(start, id, &RangeSet::new(), Vec::new(), config);
    let mut pair = Pair::new(4, start, server, rx, link(), link());
    while pair.b.bytes_received() < 1 << 20 {
        assert!(pair.step());
    }
    pair.a_to_b.set_config(link().with_loss(1.0));
    pair.b_to_a.set_config(link().with_loss(1.0));
    let cut = pair.now;
    pair.run(1_000_000, start + Duration::from_secs(3600));
    assert!(matches!(
        receiver_events(&mut pair.b).last(),
        Some(Event::Failed(TransferError::TimedOut(_)))
    ));
    assert!(matches!(
        pair.a.events.last(),
        Some(Event::Failed(TransferError::TimedOut(_)))
    ));
    assert!(pair.now - cut < Duration::from_secs(6));
    // What arrived is kept and correct, ready for a resume.
    let have = pair.b.received_bytes();
    assert!(have.covered() >= 1 << 20);
    for r in have.iter() {
        let (s, e) = (r.start as usize, r.end as usize);
        assert!(pair.b.sink()[s..e] == data[s..e]);
    }
}

#[test]
fn a_lost_done_is_repeated_and_the_sender_stops() {
    let data = object(200_000, 5);
    let id = ObjectId::md5_of(&data);
    let start = Instant::now();
    let server = server(id, data.clone(), TransferConfig::default());
    let rx = fresh_receiver(start, id);
    let mut pair = Pair::new(
        5,
        start,
        server,
        DropDones {
            inner: rx,
            dropped: 0,
            allow_after: 1,
        },
        link(),
        link(),
    );
    assert_eq!(
        pair.run(100_000, start + Duration::from_secs(60)),
        RunOutcome::BothFinished
    );
    assert_eq!(pair.b.dropped, 1);
    assert!(
        matches!(pair.a.events.last(), Some(Event::Completed(_))),
        "{:?}",
        pair.a.events.last()
    );
    let stats = pair.a.sender().unwrap().stats();
    // One probe (or two) recovered the Done; the sender did not keep transmitting.
    assert!(stats.chunks_retransmitted <= 2, "{stats:?}");
    // And once both sides are finished, nothing keeps running: the sender has no timer and the
    // receiver's linger ends.
    assert_eq!(pair.a.poll_timeout(), None);
    let linger_end = pair.b.poll_timeout().expect("receiver lingers");
    assert!(linger_end - pair.now <= Duration::from_secs(3));
}

#[test]
fn resume_fetches_only_what_is_missing() {
    let data = object(1 << 20, 6);
    let id = ObjectId::md5_of(&data);
    let half = data.len() / 2 + 123;
    let mut partial = vec![0u8; data.len()];
    partial[..half].copy_from_slice(&data[..half]);
    let mut have = RangeSet::new();
    have.insert(0..half as u64);
    let start = Instant::now();
    let server = server(id, data.clone(), TransferConfig::default());
    let rx = receiver(start, id, &have, partial, TransferConfig::default());
    let mut pair = Pair::new(6, start, server, rx, link(), link());
    assert_eq!(
        pair.run(100_000, start + Duration::from_secs(60)),
        RunOutcome::BothFinished
    );
    let events = receiver_events(&mut pair.b);
    assert!(
        matches!(events.last(), Some(Event::Completed(_))),
        "{events:?}"
    );
    assert!(pair.b.sink() == &data);
    let sent = pair.a.sender().unwrap().stats().bytes_sent as f64;
    let ratio = sent / data.len() as f64;
    assert!(
        (0.45..0.55).contains(&ratio),
        "resumed download sent {ratio:.3} of the object"
    );
}

/// A sink that records every write, over a byte vector.
struct Recording {
    bytes: Vec<u8>,
    writes: Vec<std::ops::Range<u64>>,
}

impl udpferry::core::ChunkSink for Recording {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.writes.push(offset..offset + data.len() as u64);
        self.bytes.write_at(offset, data)
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.bytes.read_at(offset, buf)
    }
}

/// A have-set more fragmented than one Start can list (a repair after scattered damage): the
/// Start lists the largest ranges, the sender re-sends what it was not told about, and the
/// receiver never writes over a chunk it holds (a re-sent copy could be altered on its way).
#[test]
fn a_fragmented_have_set_is_never_written_over() {
    let data = object(2 << 20, 7);
    let id = ObjectId::md5_of(&data);
    // Held: everything but 300 holes of 3000 bytes, one every ~7 KB; the last hole at the end.
    let mut have = RangeSet::new();
    have.insert(0..data.len() as u64);
    for i in 0..300u64 {
        let at = 1000 + i * 6990;
        have.remove(at..at + 3000);
    }
    assert!(have.len() > 200, "{} ranges", have.len());
    let mut bytes = vec![0u8; data.len()];
    for r in have.iter() {
        bytes[r.start as usize..r.end as usize]
            .copy_from_slice(&data[r.start as usize..r.end as usize]);
    }
    let sink = Recording {
        bytes,
        writes: Vec::new(),
    };
    let start = Instant::now();
    let server = server(id, data.clone(), TransferConfig::default());
    let rx = receiver(start, id, &have, sink, TransferConfig::default());
    let mut pair = Pair::new(8, start, server, rx, link(), link());
    assert_eq!(
        pair.run(1_000_000, start + Duration::from_secs(60)),
        RunOutcome::BothFinished
    );
    let events = receiver_events(&mut pair.b);
    assert!(
        matches!(events.last(), Some(Event::Completed(_))),
        "{events:?}"
    );
    let sink = pair.b.sink();
    assert!(sink.bytes == data);
    let chunk = 1200 - 34;
    for w in &sink.writes {
        let first = w.start / chunk;
        let held = have.contains_range(first * chunk..((first + 1) * chunk).min(data.len() as u64));
        assert!(!held, "wrote {w:?}, a chunk the receiver held");
    }
    let stats = pair.b.stats();
    println!(
        "{} ranges held, {} writes, {} duplicate chunks ignored",
        have.len(),
        sink.writes.len(),
        stats.duplicate_chunks
    );
}

#[test]
fn resuming_a_partial_larger_than_the_flow_control_window_does_not_stall() {
    // 20 MiB already held, more than the 16 MiB receive window: the window must count from the
    // first missing chunk, not from zero.
    let data = object(24 << 20, 9);
    let id = ObjectId::md5_of(&data);
    let held = 20 << 20;
    let mut partial = data.clone();
    partial[held..].fill(0);
    // Two touching ranges: they count together.
    let have_list = [0..1000u64, 1000..held as u64];
    let mut have = RangeSet::new();
    for r in have_list {
        have.insert(r);
    }
    let start = Instant::now();
    let server = server(id, data.clone(), TransferConfig::default());
    let rx = receiver(start, id, &have, partial, TransferConfig::default());
    let mut pair = Pair::new(9, start, server, rx, link(), link());
    assert_eq!(
        pair.run(1_000_000, start + Duration::from_secs(600)),
        RunOutcome::BothFinished
    );
    assert!(matches!(
        receiver_events(&mut pair.b).last(),
        Some(Event::Completed(_))
    ));
    assert!(pair.b.sink() == &data);
    let sent = pair.a.sender().unwrap().stats().bytes_sent;
    assert!(sent < (data.len() - held) as u64 * 11 / 10, "sent {sent}");
}

#[test]
fn a_lying_resume_claim_fails_the_digest_instead_of_succeeding() {
    // The have-set claims bytes that are in fact zeros: the digest check must catch it.
    let data = object(100_000, 7);
    let id = ObjectId::md5_of(&data);
    let mut have = RangeSet::new();
    have.insert(0..50_000);
    let start = Instant::now();
    let server = server(id, data.clone(), TransferConfig::default());
    let rx = Receiver::new(
        start,
        ConnectionId(9),
        id,
        &have,
        vec![0u8; data.len()],
        TransferConfig::default(),
    );
    let mut pair = Pair::new(7, start, server, rx, link(), link());
    pair.run(100_000, start + Duration::from_secs(60));
    // Whole chunks inside the have-set were trusted (42 chunks of 1166 bytes), the rest fetched.
    let mut what_it_holds = data.clone();
    what_it_holds[..42 * 1166].fill(0);
    match receiver_events(&mut pair.b).last() {
        Some(Event::Failed(TransferError::DigestMismatch { expected, actual })) => {
            assert_eq!(*expected, id);
            assert_eq!(*actual, ObjectId::md5_of(&what_it_holds));
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
}

fn offer_to(rx: &mut Receiver<Vec<u8>>, now: Instant, size: u64) -> Vec<Event> {
    let mut buf = [0u8; 1500];
    let n = rx.poll_transmit(now, &mut buf).expect("request");
    let Ok(Datagram {
        conn_id,
        frame: Frame::Request(req),
    }) = wire::decode(&buf[..n])
    else {
        panic!("first datagram must be a request")
    };
    rx.handle_datagram(now, &offer_datagram(conn_id, req.object, size));
    receiver_events(rx)
}

#[test]
fn offers_up_to_two_to_the_forty_bytes_are_representable_and_limits_apply() {
    let now = Instant::now();
    let id = ObjectId::md5_of(b"huge");
    let config = TransferConfig {
        max_object_size: u64::MAX,
        ..TransferConfig::default()
    };
    let mut rx = Receiver::new(
        now,
        ConnectionId(1),
        id,
        &RangeSet::new(),
        Vec::new(),
        config,
    );
    assert_eq!(
        offer_to(&mut rx, now, 1 << 40),
        vec![Event::Started { size: 1 << 40 }]
    );
    // The default limit (4 GiB) refuses a larger offer with a typed error and tells the server.
    let mut rx = Receiver::new(
        now,
        ConnectionId(1),
        id,
        &RangeSet::new(),
        Vec::new(),
        TransferConfig::default(),
    );
    let events = offer_to(&mut rx, now, 5 << 30);
    assert_eq!(
        events,
        vec![Event::Failed(TransferError::TooLarge {
            size: 5 << 30,
            max: 4 << 30
        })]
    );
    let mut buf = [0u8; 1500];
    let n = rx.poll_transmit(now, &mut buf).expect("error frame");
    assert!(matches!(
        wire::decode(&buf[..n]),
        Ok(Datagram {
            frame: Frame::Error(_),
            ..
        })
    ));
}

#[test]
fn cancel_tells_the_peer() {
    let data = object(1 << 20, 8);
    let id = ObjectId::md5_of(&data);
    let start = Instant::now();
    let server = server(id, data, TransferConfig::default());
    let rx = fresh_receiver(start, id);
    let mut pair = Pair::new(8, start, server, rx, link(), link());
    while pair.b.bytes_received() < 100_000 {
        assert!(pair.step());
    }
    pair.b.cancel();
    pair.run(100_000, start + Duration::from_secs(60));
    assert_eq!(
        receiver_events(&mut pair.b).last(),
        Some(&Event::Failed(TransferError::Cancelled))
    );
    assert!(matches!(
        pair.a.events.last(),
        Some(Event::Failed(TransferError::Peer { .. }))
    ));
}

/// Drops the receiver's first `allow_after` `Done` datagrams, as a lossy path would.
struct DropDones<K> {
    inner: Receiver<K>,
    dropped: u32,
    allow_after: u32,
}

impl<K: udpferry::core::ChunkSink> Peer for DropDones<K> {
    fn handle_datagram(&mut self, now: Instant, d: &[u8]) {
        self.inner.handle_datagram(now, d)
    }
    fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        loop {
            let n = self.inner.poll_transmit(now, buf)?;
            let done = common::is_done(&buf[..n]);
            if done && self.dropped < self.allow_after {
                self.dropped += 1;
                continue;
            }
            return Some(n);
        }
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.inner.poll_timeout()
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.inner.handle_timeout(now)
    }
    fn is_finished(&self) -> bool {
        self.inner.is_finished()
    }
}

#[test]
fn an_empty_object_whose_done_is_lost_still_completes_on_the_server() {
    // No data phase: the server's own offer repeat makes the lingering client repeat Done.
    let id = ObjectId::md5_of(b"");
    let start = Instant::now();
    let server = OneShotServer::new(id, 0, Vec::new(), TransferConfig::default(), 1);
    let rx = fresh_receiver(start, id);
    let peer = DropDones {
        inner: rx,
        dropped: 0,
        allow_after: 1,
    };
    let mut pair = Pair::new(10, start, server, peer, link(), link());
    assert_eq!(
        pair.run(10_000, start + Duration::from_secs(60)),
        RunOutcome::BothFinished
    );
    assert_eq!(pair.b.dropped, 1);
    assert!(
        matches!(pair.a.events.last(), Some(Event::Completed(_))),
        "{:?}",
        pair.a.events
    );
    assert!(pair.now - start < Duration::from_secs(3));
}

/// A sink whose disk fills up after `capacity` bytes.
struct FullDisk {
    data: Vec<u8>,
    capacity: usize,
    written: usize,
}

impl udpferry::core::ChunkSink for FullDisk {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if self.written + data.len() > self.capacity {
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "no space left on device",
            ));
        }
        self.written += data.len();
        self.data.write_at(offset, data)
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.data.read_at(offset, buf)
    }
}

#[test]
fn a_full_disk_fails_with_a_typed_error_keeps_what_was_written_and_tells_the_server() {
    use udpferry::core::ChunkSink;
    let data = object(1 << 20, 11);
    let id = ObjectId::md5_of(&data);
    let start = Instant::now();
    let server = server(id, data.clone(), TransferConfig::default());
    let sink = FullDisk {
        data: Vec::new(),
        capacity: 300_000,
        written: 0,
    };
    let rx = receiver(start, id, &RangeSet::new(), sink, TransferConfig::default());
    let mut pair = Pair::new(11, start, server, rx, link(), link());
    pair.run(100_000, start + Duration::from_secs(60));
    match receiver_events(&mut pair.b).last() {
        Some(Event::Failed(TransferError::Storage { kind, .. })) => {
            assert_eq!(*kind, std::io::ErrorKind::StorageFull)
        }
        other => panic!("expected a storage error, got {other:?}"),
    }
    // Everything the receiver reports as stored is really there and correct (resumable).
    let have = pair.b.received_bytes();
    assert!(have.covered() > 0 && have.covered() <= 300_000);
    for r in have.iter() {
        let mut buf = vec![0u8; (r.end - r.start) as usize];
        pair.b.sink_mut().read_at(r.start, &mut buf).unwrap();
        assert!(buf == data[r.start as usize..r.end as usize]);
    }
    assert!(matches!(
        pair.a.events.last(),
        Some(Event::Failed(TransferError::Peer { .. }))
    ));
}

/// Everything `rx` sends at `now`.
fn drain(rx: &mut Receiver<Vec<u8>>, now: Instant) -> Vec<Vec<u8>> {
    let mut buf = [0u8; 1500];
    std::iter::from_fn(|| rx.poll_transmit(now, &mut buf).map(|n| buf[..n].to_vec())).collect()
}

/// An Offer of `id`, `size` bytes in chunks of 1166, nonce 77, on connection `conn_id`.
fn offer_datagram(conn_id: ConnectionId, id: ObjectId, size: u64) -> Vec<u8> {
    let mut buf = [0u8; 1500];
    let offer = Datagram {
        conn_id,
        frame: Frame::Offer(Offer {
            object: id,
            size,
            chunk_size: 1166,
            nonce: 77,
        }),
    };
    let n = offer.encode(&mut buf).unwrap();
    buf[..n].to_vec()
}

fn kind(datagram: &[u8]) -> &'static str {
    match wire::decode(datagram).map(|d| d.frame) {
        Ok(Frame::Request(_)) => "request",
        Ok(Frame::Start { .. }) => "start",
        other => panic!("unexpected {other:?}"),
    }
}

/// One lost Request or Start used to cost a whole handshake timeout (600 ms before any RTT
/// sample, three round trips after one); on a 200 ms path with 1% loss that was one download in
/// a dozen taking 10% longer. The first Request and the first Start are each sent again 10 ms
/// later unless answered, and the handshake timer and the RTT sample stay with the first send.
#[test]
fn the_first_request_and_start_are_sent_twice_on_a_slow_path() {
    let t0 = Instant::now();
    let id = ObjectId::md5_of(b"map");
    let mut rx = fresh_receiver(t0, id);
    let ms = Duration::from_millis;

    let first = drain(&mut rx, t0);
    assert_eq!(first.len(), 1);
    assert_eq!(kind(&first[0]), "request");
    assert_eq!(rx.poll_timeout(), Some(t0 + ms(10)), "the copy's time");
    rx.handle_timeout(t0 + ms(10));
    assert_eq!(drain(&mut rx, t0 + ms(10)), first, "an identical copy");
    // The timer runs from the first send: 600 ms before any RTT sample.
    assert_eq!(rx.poll_timeout(), Some(t0 + ms(600)));
    assert!(drain(&mut rx, t0 + ms(599)).is_empty());

    // The Offer (answering the first copy) 200 ms later: one Start, and its copy 10 ms on.
    rx.handle_datagram(t0 + ms(200), &offer_datagram(ConnectionId(9), id, 1 << 20));
    let start = drain(&mut rx, t0 + ms(200));
    assert_eq!(start.len(), 1);
    assert_eq!(kind(&start[0]), "start");
    assert_eq!(rx.poll_timeout(), Some(t0 + ms(210)));
    rx.handle_timeout(t0 + ms(210));
    assert_eq!(drain(&mut rx, t0 + ms(210)), start);
    // The RTT sample is the first Request's 200 ms (not the copy's 190): the Start's timer is
    // 200 + 4 * 100 ms after the first Start.
    assert_eq!(rx.poll_timeout(), Some(t0 + ms(800)));

    // The Offer answering the Request's copy asks for one more Start, without another copy.
    rx.handle_datagram(t0 + ms(215), &offer_datagram(ConnectionId(9), id, 1 << 20));
    assert_eq!(drain(&mut rx, t0 + ms(215)), start);
    assert_eq!(rx.poll_timeout(), Some(t0 + ms(815)));

    // When that second Offer comes before the Start's copy is due, its Start is the copy.
    let mut rx = fresh_receiver(t0, id);
    drain(&mut rx, t0);
    rx.handle_timeout(t0 + ms(10));
    assert_eq!(drain(&mut rx, t0 + ms(10)).len(), 1);
    rx.handle_datagram(t0 + ms(200), &offer_datagram(ConnectionId(9), id, 1 << 20));
    assert_eq!(drain(&mut rx, t0 + ms(200)), start);
    rx.handle_datagram(t0 + ms(205), &offer_datagram(ConnectionId(9), id, 1 << 20));
    assert_eq!(drain(&mut rx, t0 + ms(205)), start);
    assert_eq!(rx.poll_timeout(), Some(t0 + ms(805)));
    rx.handle_timeout(t0 + ms(210));
    assert!(drain(&mut rx, t0 + ms(210)).is_empty());
    assert_eq!(rx.stats().datagrams_sent, 4, "two Requests and two Starts");
}

/// On a path whose round trip is shorter than 10 ms the answer comes first, and nothing is
/// sent twice.
#[test]
fn a_fast_answer_cancels_the_copy() {
    let t0 = Instant::now();
    let id = ObjectId::md5_of(b"map");
    let mut rx = fresh_receiver(t0, id);
    let ms = Duration::from_millis;
    assert_eq!(drain(&mut rx, t0).len(), 1);
    rx.handle_datagram(t0 + ms(4), &offer_datagram(ConnectionId(9), id, 1 << 20));
    let start = drain(&mut rx, t0 + ms(4));
    assert_eq!(start.len(), 1);
    assert_eq!(kind(&start[0]), "start");
    // The Request's copy is gone; the Start's is due 10 ms after the Start.
    assert_eq!(rx.poll_timeout(), Some(t0 + ms(14)));
    // The first Data comes 4 ms later: receiving, no Start copy.
    let mut buf = [0u8; 1500];
    let data = Datagram {
        conn_id: ConnectionId(9),
        frame: Frame::Data(Data {
            seq: 0,
            send_time_us: 0,
            chunk: 0,
            payload: &[7u8; 1166],
        }),
    };
    let n = data.encode(&mut buf).unwrap();
    rx.handle_datagram(t0 + ms(8), &buf[..n]);
    rx.handle_timeout(t0 + ms(14));
    for d in drain(&mut rx, t0 + ms(14)) {
        assert!(
            !matches!(
                wire::decode(&d).map(|d| d.frame),
                Ok(Frame::Start { .. } | Frame::Request(_))
            ),
            "no handshake datagram once data flows"
        );
    }
    assert_eq!(rx.stats().datagrams_sent, 2, "one Request and one Start");

    // On a 1 ms path the Start's handshake timer (3 ms) runs out before its copy is due: that
    // resend is the copy, and the next wake-up is the backed-off timer, not a copy.
    let mut rx = fresh_receiver(t0, id);
    drain(&mut rx, t0);
    rx.handle_datagram(t0 + ms(1), &offer_datagram(ConnectionId(9), id, 1 << 20));
    assert_eq!(drain(&mut rx, t0 + ms(1)).len(), 1);
    let timer = rx.poll_timeout().expect("the handshake timer");
    let pto = timer - (t0 + ms(1));
    assert!(timer < t0 + ms(11), "{pto:?}");
    rx.handle_timeout(timer);
    assert_eq!(drain(&mut rx, timer).len(), 1, "the Start again");
    assert_eq!(rx.poll_timeout(), Some(timer + 2 * pto));
}
