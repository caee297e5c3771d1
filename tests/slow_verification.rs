//! A receiver whose digest check takes a while (a resume re-hashing the bytes it already held):
//! the ack of its last chunk leaves before the check begins, and the sender then waits for the
//! Done without probing (PROTOCOL.md 5.2.3 step 7, 5.3.3 step 3, 5.3.6).
//!
//! The first test runs two `Endpoint`s over real loopback sockets, each on its own thread, the
//! receiver's hasher sleeping in `finish`; the others replay the same in the simulator, where the
//! blocked thread is modelled, and drive a `Sender` by hand to pin the past-the-end rule.

mod common;

use std::cell::RefCell;
use std::io;
use std::net::UdpSocket;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{object, one_shot_pair, Maps};
use udpferry::core::{
    ChunkSink, Endpoint, EndpointConfig, Event, InlineHasher, NoObjects, ObjectProvider,
    PrefixHasher, RangeSet, Receiver, Role, Sender, Stats, TransferConfig, TransferError,
};
use udpferry::wire::{
    self, Ack, AckRanges, ConnectionId, Datagram, ErrorCode, Frame, HaveRanges, Request,
};
use udpferry::ObjectId;
use udpferry_sim::{Direction, LinkConfig, Peer, RunOutcome};

/// How long the slow hasher's `finish` takes.
const VERIFICATION: Duration = Duration::from_millis(300);

/// The object's digest on the calling thread, with a `finish` that notes when it was called and
/// then takes `delay` (as `net::HashThread` does while its thread catches up).
#[derive(Debug)]
struct SlowHasher {
    inner: InlineHasher,
    delay: Duration,
    called: Arc<Mutex<Option<Instant>>>,
}

impl PrefixHasher for SlowHasher {
    fn update(&mut self, bytes: &[u8]) {
        self.inner.update(bytes);
    }
    fn finish(&mut self) -> io::Result<ObjectId> {
        *self.called.lock().unwrap() = Some(Instant::now());
        thread::sleep(self.delay);
        self.inner.finish()
    }
}

/// Whether `d` is an Ack that claims every one of `chunks` chunks.
fn claims_every_chunk(d: &[u8], chunks: u64) -> bool {
    matches!(
        wire::decode(d),
        Ok(Datagram { frame: Frame::Ack(ack), .. }) if u64::from(ack.cumulative) >= chunks
    )
}

/// Drives `endpoint` on `socket` in real time, sending each datagram as soon as `poll_transmit`
/// gives it, until `until` has seen the event it waits for (then what is due is still sent) or
/// `limit` passes. `on_sent` sees every datagram sent, right after it left.
fn drive<P: ObjectProvider, K: ChunkSink>(
    socket: &UdpSocket,
    endpoint: &mut Endpoint<P, K>,
    limit: Instant,
    mut on_sent: impl FnMut(&[u8]),
    mut until: impl FnMut(&udpferry::core::EndpointEvent) -> bool,
) {
    let mut buf = vec![0u8; 2048];
    let mut over = false;
    while Instant::now() < limit {
        let now = Instant::now();
        if endpoint.poll_timeout().is_some_and(|t| t <= now) {
            endpoint.handle_timeout(now);
        }
        while let Some(t) = endpoint.poll_transmit(Instant::now(), &mut buf) {
            socket.send_to(&buf[..t.len], t.destination).unwrap();
            on_sent(&buf[..t.len]);
        }
        while let Some(e) = endpoint.poll_event() {
            over |= until(&e);
        }
        if over {
            return;
        }
        let wait = endpoint
            .poll_timeout()
            .map_or(Duration::from_millis(20), |t| {
                t.saturating_duration_since(Instant::now())
            })
            .clamp(Duration::from_micros(1), Duration::from_millis(20));
        socket.set_read_timeout(Some(wait)).unwrap();
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            endpoint.handle_datagram(Instant::now(), from, &buf[..n]);
        }
    }
}

/// A download over loopback from a server `Endpoint` on its own thread to a client `Endpoint`
/// whose hasher takes `VERIFICATION` to finish. Before issue 12 the receiver checked the digest
/// as the last chunk arrived, before acknowledging it, and the sender's probe timer fired
/// during the check (the probe repeating the last chunk).
#[test]
fn a_slow_verification_over_loopback_costs_the_sender_no_probe() {
    let data = object(128 << 10, 0x5107);
    let id = ObjectId::md5_of(&data);
    let chunks = data.len().div_ceil(1166) as u64;
    // A probe timeout of at least 100 ms: a thread that is descheduled for a few milliseconds
    // on a busy machine does not make it fire, while the 300 ms check still would.
    let transfer = TransferConfig {
        max_ack_delay: Duration::from_millis(100),
        ..TransferConfig::default()
    };
    let limit = Instant::now() + Duration::from_secs(20);

    let server_socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let server_addr = server_socket.local_addr().unwrap();
    let maps: Maps = [(id, Arc::from(&data[..]))].into_iter().collect();
    let server_config = EndpointConfig {
        transfer: transfer.clone(),
        seed: 1,
        ..EndpointConfig::default()
    };
    let server = thread::spawn(move || {
        let mut endpoint = Endpoint::<Maps, Vec<u8>>::new(server_config, maps);
        let mut end = None;
        drive(
            &server_socket,
            &mut endpoint,
            limit,
            |_| {},
            |e| {
                let over = e.role == Role::Serving
                    && matches!(e.event, Event::Completed(_) | Event::Failed(_));
                if over {
                    end = Some(e.event.clone());
                }
                over
            },
        );
        end
    });

    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut client = Endpoint::<NoObjects, Vec<u8>>::new(
        EndpointConfig {
            transfer,
            seed: 2,
            ..EndpointConfig::default()
        },
        NoObjects,
    );
    let called = Arc::new(Mutex::new(None));
    let download = client.fetch(
        Instant::now(),
        server_addr,
        id,
        &RangeSet::new(),
        Vec::new(),
    );
    assert!(client.set_hasher(
        download,
        Box::new(SlowHasher {
            inner: InlineHasher::for_id(&id),
            delay: VERIFICATION,
            called: called.clone(),
        })
    ));
    let mut full_acks: Vec<Instant> = Vec::new();
    let mut end = None;
    drive(
        &socket,
        &mut client,
        limit,
        |d| {
            if claims_every_chunk(d, chunks) {
                full_acks.push(Instant::now());
            }
        },
        |e| {
            let over = matches!(e.event, Event::Completed(_) | Event::Failed(_));
            if over {
                end = Some(e.event.clone());
            }
            over
        },
    );
    assert!(matches!(end, Some(Event::Completed(_))), "client: {end:?}");
    assert_eq!(client.take_sink(download).as_deref(), Some(&data[..]));

    let server_end = server.join().unwrap();
    let Some(Event::Completed(done)) = server_end else {
        panic!("server: {server_end:?}");
    };
    let s = &done.stats;
    assert_eq!(
        (s.probe_timeouts, s.chunks_retransmitted),
        (0, 0),
        "the sender probed while the receiver verified: {s:?}"
    );
    let finish_called = called.lock().unwrap().expect("the digest was checked");
    assert_eq!(
        full_acks.len(),
        1,
        "one ack claims every chunk, sent before the check"
    );
    assert!(
        full_acks[0] < finish_called,
        "the ack of the last chunk left {:?} after the check began",
        full_acks[0] - finish_called
    );
}

// ---------------------------------------------------------------------------------------------
// The same in the simulator

/// A hasher that only notes that `finish` was called: the simulator models the time it takes.
#[derive(Debug)]
struct FlaggingHasher {
    inner: InlineHasher,
    called: Arc<AtomicBool>,
}

impl PrefixHasher for FlaggingHasher {
    fn update(&mut self, bytes: &[u8]) {
        self.inner.update(bytes);
    }
    fn finish(&mut self) -> io::Result<ObjectId> {
        self.called.store(true, Ordering::Relaxed);
        self.inner.finish()
    }
}

/// A receiver whose thread is blocked for `delay` from the moment its hasher's `finish` is
/// called: meanwhile it sends nothing, and datagrams wait (as in a socket's buffer) until it
/// is back. Its first `drop_dones` Dones are lost on the way.
struct SlowVerifier {
    inner: Receiver<Vec<u8>>,
    called: Arc<AtomicBool>,
    delay: Duration,
    busy_until: Option<Instant>,
    waiting: Vec<Vec<u8>>,
    drop_dones: u32,
    log: Rc<RefCell<Vec<String>>>,
}

impl SlowVerifier {
    fn check_blocked(&mut self, now: Instant) {
        if self.called.swap(false, Ordering::Relaxed) {
            self.log.borrow_mut().push("finish".into());
            self.busy_until = Some(now + self.delay);
        }
    }
}

impl Peer for SlowVerifier {
    fn handle_datagram(&mut self, now: Instant, d: &[u8]) {
        if self.busy_until.is_some() {
            self.waiting.push(d.to_vec());
            return;
        }
        self.inner.handle_datagram(now, d);
        self.check_blocked(now);
    }
    fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        if self.busy_until.is_some() {
            return None;
        }
        loop {
            let n = self.inner.poll_transmit(now, buf)?;
            let done = common::is_done(&buf[..n]);
            if done && self.drop_dones > 0 {
                self.drop_dones -= 1;
                continue;
            }
            return Some(n);
        }
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.busy_until.or(self.inner.poll_timeout())
    }
    fn handle_timeout(&mut self, now: Instant) {
        if let Some(t) = self.busy_until {
            if now < t {
                return;
            }
            self.busy_until = None;
            for d in std::mem::take(&mut self.waiting) {
                self.inner.handle_datagram(now, &d);
            }
        }
        if self.inner.poll_timeout().is_some_and(|t| t <= now) {
            self.inner.handle_timeout(now);
            self.check_blocked(now);
        }
    }
    fn is_finished(&self) -> bool {
        self.busy_until.is_none() && self.inner.is_finished()
    }
}

/// What a simulated download with a slow verification showed.
struct SimRun {
    /// The sender's final event.
    sender_end: Option<Event>,
    receiver_end: Option<Event>,
    stats: Stats,
    /// "ack" for each ack that claims every chunk, "finish" when the check began, in order.
    log: Vec<String>,
}

/// A 200 kB download over a clean 10 ms path, the receiver blocked for `delay` in its check
/// and its first `drop_dones` Dones lost.
fn simulated(delay: Duration, drop_dones: u32) -> SimRun {
    let data = object(200_000, 0x5108);
    let id = ObjectId::md5_of(&data);
    let chunks = data.len().div_ceil(1166) as u64;
    let start = Instant::now();
    let link = LinkConfig::clean(Duration::from_millis(10));
    let pair = one_shot_pair(
        7,
        start,
        &data,
        id,
        link.clone(),
        link,
        TransferConfig::default(),
    );
    let (server, mut receiver) = (pair.a, pair.b);
    let called = Arc::new(AtomicBool::new(false));
    assert!(receiver.set_hasher(Box::new(FlaggingHasher {
        inner: InlineHasher::for_id(&id),
        called: called.clone(),
    })));
    let log = Rc::new(RefCell::new(Vec::new()));
    let client = SlowVerifier {
        inner: receiver,
        called,
        delay,
        busy_until: None,
        waiting: Vec::new(),
        drop_dones,
        log: log.clone(),
    };
    let mut pair = udpferry_sim::Pair::new(
        7,
        start,
        server,
        client,
        LinkConfig::clean(Duration::from_millis(10)),
        LinkConfig::clean(Duration::from_millis(10)),
    );
    let observed = log.clone();
    pair.set_observer(Box::new(move |_, dir, d| {
        if dir == Direction::BtoA && claims_every_chunk(d, chunks) {
            observed.borrow_mut().push("ack".into());
        }
    }));
    assert_eq!(
        pair.run(1_000_000, start + Duration::from_secs(60)),
        RunOutcome::BothFinished
    );
    assert_eq!(pair.b.inner.sink(), &data);
    let receiver_end = std::iter::from_fn(|| pair.b.inner.poll_event()).last();
    let log = log.borrow().clone();
    SimRun {
        sender_end: pair.a.events.last().cloned(),
        receiver_end,
        stats: pair.a.sender().unwrap().stats(),
        log,
    }
}

/// The simulated counterpart of the loopback test: the ack of the last chunk goes out before
/// the check begins, and the sender waits out a 300 ms check without a probe.
#[test]
fn a_slow_verification_in_the_simulator_costs_the_sender_no_probe() {
    let run = simulated(VERIFICATION, 0);
    assert!(matches!(run.receiver_end, Some(Event::Completed(_))));
    assert!(matches!(run.sender_end, Some(Event::Completed(_))));
    assert_eq!(run.log, ["ack", "finish"]);
    assert_eq!(
        (run.stats.probe_timeouts, run.stats.chunks_retransmitted),
        (0, 0),
        "{:?}",
        run.stats
    );
}

/// A check longer than the sender's wait for the Done: the sender probes (for the Done, with
/// the last chunk), the probes wait in the receiver's buffer, and the Done that follows the check
/// ends both sides. Still a single ack claims every chunk.
#[test]
fn a_check_longer_than_the_done_wait_ends_with_the_done() {
    let run = simulated(Duration::from_millis(1500), 0);
    assert!(matches!(run.receiver_end, Some(Event::Completed(_))));
    assert!(matches!(run.sender_end, Some(Event::Completed(_))));
    assert_eq!(run.log, ["ack", "finish"]);
    assert!(run.stats.probe_timeouts >= 1, "{:?}", run.stats);
}

/// The Done after a slow check is lost: the sender's probe, a second after the ack of the last
/// chunk, gets it repeated by the lingering receiver.
#[test]
fn a_done_lost_after_a_slow_check_is_recovered_by_a_probe() {
    let run = simulated(VERIFICATION, 1);
    assert!(matches!(run.receiver_end, Some(Event::Completed(_))));
    assert!(matches!(run.sender_end, Some(Event::Completed(_))));
    assert_eq!(run.stats.probe_timeouts, 1, "{:?}", run.stats);
}

// ---------------------------------------------------------------------------------------------
// The sender's rules, by hand

const CONN: ConnectionId = ConnectionId(0x1207);
const NONCE: u64 = 0x5eed;

fn encode(frame: Frame<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; 1500];
    let n = Datagram {
        conn_id: CONN,
        frame,
    }
    .encode(&mut buf)
    .unwrap();
    buf.truncate(n);
    buf
}

/// An ack of `cumulative` chunks naming `largest_seq`, with no ranges.
fn ack(largest_seq: u64, cumulative: u32) -> Vec<u8> {
    encode(Frame::Ack(Ack {
        largest_seq,
        ack_delay_us: 0,
        owd_us: 0,
        window_end: cumulative,
        cumulative,
        ranges: AckRanges::List(&[]),
    }))
}

/// A sender of a 3-chunk object that has sent all three (seqs 0 to 2) once.
fn sender_with_all_sent(now: Instant) -> Sender<Vec<u8>> {
    let data = object(3000, 3);
    let request = Request {
        object: ObjectId::md5_of(&data),
        max_datagram_size: 1200,
        max_rate_bytes_per_sec: 0,
        have: HaveRanges::List(&[]),
    };
    let mut s = Sender::accept(
        now,
        CONN,
        &request,
        3000,
        data,
        NONCE,
        TransferConfig::default(),
    )
    .unwrap();
    s.handle_datagram(
        now,
        &encode(Frame::Start {
            nonce: NONCE,
            request,
        }),
    );
    let mut buf = vec![0u8; 1500];
    // The three chunks; the sender would then send the same three again as tail copies, which
    // these tests leave out (they acknowledge every chunk before asking again).
    let sent = (0..3)
        .filter_map(|_| s.poll_transmit(now, &mut buf))
        .count();
    assert_eq!(sent, 3);
    s
}

fn final_event(s: &mut Sender<Vec<u8>>) -> Option<Event> {
    std::iter::from_fn(|| s.poll_event())
        .filter(|e| matches!(e, Event::Completed(_) | Event::Failed(_)))
        .last()
}

/// The honest ack claiming every chunk, even duplicated on the way, is not a violation; the
/// sender sends nothing until `DONE_WAIT` (1 s) has passed, then probes for the Done, and
/// completes on it.
#[test]
fn the_ack_of_the_last_chunk_makes_the_sender_wait_for_the_done() {
    let t0 = Instant::now();
    let mut s = sender_with_all_sent(t0);
    let t1 = t0 + Duration::from_millis(20);
    for _ in 0..3 {
        s.handle_datagram(t1, &ack(2, 3));
    }
    assert_eq!(final_event(&mut s), None, "three copies of one ack");
    assert_eq!(s.bytes_acked(), 3000);
    let mut buf = vec![0u8; 1500];
    assert_eq!(s.poll_transmit(t1, &mut buf), None);
    let probe_at = s.poll_timeout().unwrap();
    assert_eq!(
        probe_at,
        t1 + Duration::from_secs(1),
        "the first Done probe"
    );
    s.handle_timeout(probe_at - Duration::from_millis(1));
    assert_eq!(s.poll_transmit(probe_at, &mut buf), None);
    s.handle_timeout(probe_at);
    assert_eq!(s.stats().probe_timeouts, 1);
    let n = s.poll_transmit(probe_at, &mut buf).expect("a probe");
    assert!(matches!(
        wire::decode(&buf[..n]),
        Ok(Datagram { frame: Frame::Data(d), .. }) if d.chunk == 2
    ));
    s.handle_datagram(probe_at, &encode(Frame::Done));
    assert!(matches!(final_event(&mut s), Some(Event::Completed(_))));
    assert_eq!(s.poll_timeout(), None);
}

/// A receiver that took the object for a larger one (a damaged Offer) holds every chunk the
/// sender has and keeps acknowledging the probes: the third ack claiming every chunk of a newer
/// datagram ends the transfer (PROTOCOL.md 5.3.3 step 3).
#[test]
fn acks_of_every_chunk_for_newer_datagrams_fail_the_transfer() {
    let t0 = Instant::now();
    let mut s = sender_with_all_sent(t0);
    let mut now = t0 + Duration::from_millis(20);
    s.handle_datagram(now, &ack(2, 3));
    // Keep-alive acks (the same datagram named again) are no news.
    s.handle_datagram(now + Duration::from_millis(50), &ack(2, 3));
    s.handle_datagram(now + Duration::from_millis(150), &ack(2, 3));
    assert_eq!(final_event(&mut s), None);
    // The sender probes for its Done; the confused receiver acknowledges each probe.
    let mut buf = vec![0u8; 1500];
    let (mut seqs, mut error_sent, mut verdict) = (Vec::new(), None, None);
    while verdict.is_none() {
        assert!(seqs.len() < 4, "no verdict after probes {seqs:?}");
        now = s.poll_timeout().unwrap();
        s.handle_timeout(now);
        while let Some(n) = s.poll_transmit(now, &mut buf) {
            match wire::decode(&buf[..n]) {
                Ok(Datagram {
                    frame: Frame::Data(d),
                    ..
                }) => {
                    seqs.push(d.seq);
                    s.handle_datagram(now, &ack(d.seq, 3));
                }
                Ok(Datagram {
                    frame: Frame::Error(e),
                    ..
                }) => error_sent = Some(e.code),
                other => panic!("{other:?}"),
            }
        }
        verdict = final_event(&mut s);
    }
    assert!(
        matches!(
            verdict,
            Some(Event::Failed(TransferError::ProtocolViolation(_)))
        ),
        "{verdict:?}"
    );
    assert_eq!(seqs, [3, 4], "the two probes of the first Done wait");
    assert_eq!(error_sent, Some(ErrorCode::ProtocolViolation));
}
