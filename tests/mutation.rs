//! Datagrams mutated in flight with a valid CRC32 (a buggy middlebox, a broken NIC offload, an
//! on-path attacker): a download ends, for every seed, in a verified completion or a clean typed
//! failure, within bounded virtual time and without a panic. Never a wedge, never wrong bytes
//! reported as complete.
//!
//! Mutated data chunks store wrong bytes, so with mutation towards the client most downloads end
//! in a digest mismatch (the net layer repairs those with the manifest). With mutation towards
//! the server only (acks, requests, starts), every download must complete.
//!
//! The last tests run real sockets through a loopback relay (tests/common/relay.rs).
//!
//! A failing seed is printed; replay it alone with
//! `UDPFERRY_SEED=<seed> cargo test --release --test mutation`. Print the tallies with
//! `-- --nocapture`; run more seeds per test with `UDPFERRY_SEEDS=<n>`.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::relay::{Impairment, Relay, RelayConfig};
use common::{object, Maps, CLIENT};
use udpferry::core::{
    Endpoint, EndpointConfig, Event, NoObjects, RangeSet, Receiver, TransferConfig, TransferError,
};
use udpferry::net::{Client, FetchOptions};
use udpferry::wire::{self, Ack, AckRanges, ConnectionId, Datagram, Frame, Offer};
use udpferry::ObjectId;
use udpferry_sim::{EndpointPeer, LinkConfig, OneShotServer, Pair, Peer, Rng};

/// Seeds per test when `UDPFERRY_SEED` is not set (`UDPFERRY_SEEDS=<n>` runs more).
const SEEDS: u64 = 48;
/// Object size of every download.
const SIZE: usize = 4 << 20;
/// Mutation probability per datagram and direction.
const MUTATE: f64 = 0.03;
/// Both sides must have finished within this much virtual time. A 4 MiB download over this path
/// takes about a second; the sender may then wait out one idle timeout (15 s) when the
/// receiver's error frame is itself mutated. Twice the idle timeout would mean the ends only
/// came from timers (the "idle timeout chain"), which is what a wedge looks like.
const BOUND: Duration = Duration::from_secs(25);
/// The receiver must reach its verdict within this much virtual time.
const VERDICT_BOUND: Duration = Duration::from_secs(10);

fn link() -> LinkConfig {
    LinkConfig::clean(Duration::from_millis(15))
}

/// The seeds to run: `UDPFERRY_SEED` alone when set, else `SEEDS` seeds from `base`.
fn seeds(base: u64) -> Vec<u64> {
    match std::env::var("UDPFERRY_SEED") {
        Ok(_) => vec![udpferry_sim::seed_from_env(base)],
        Err(_) => {
            let n = std::env::var("UDPFERRY_SEEDS")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(SEEDS);
            (base..base + n).collect()
        }
    }
}

/// How one download ended.
#[derive(Debug)]
struct Verdict {
    /// The receiver's final event: `None` if it never finished.
    end: Option<Result<(), TransferError>>,
    /// When the receiver finished (virtual time since the start).
    verdict_at: Option<Duration>,
    /// When both sides had finished.
    both_at: Option<Duration>,
    /// Whether the bytes the receiver holds are the object.
    bytes_right: bool,
    /// Chunks the sender found falsely acknowledged and queued again (for endpoints, only known
    /// when the sender completed).
    reneged: u64,
}

/// Runs `pair` until both sides finish or `BOUND` passes, in 50 ms slices, noting when the
/// client (`is_client_done`) finished.
fn drive<A: Peer, B: Peer>(
    pair: &mut Pair<A, B>,
    start: Instant,
    is_client_done: impl Fn(&Pair<A, B>) -> bool,
) -> (Option<Duration>, Option<Duration>) {
    let mut verdict_at = None;
    let mut t = start;
    while t < start + BOUND {
        t += Duration::from_millis(50);
        let outcome = pair.run(u64::MAX, t);
        if verdict_at.is_none() && is_client_done(pair) {
            verdict_at = Some(pair.now - start);
        }
        if outcome == udpferry_sim::RunOutcome::BothFinished {
            return (verdict_at, Some(pair.now - start));
        }
        if outcome == udpferry_sim::RunOutcome::Stalled {
            break;
        }
    }
    (verdict_at, None)
}

/// One download with a bare `Receiver` against a `OneShotServer` (a `Sender`).
fn one_shot(seed: u64, data: &[u8], down: LinkConfig, up: LinkConfig) -> Verdict {
    let start = Instant::now();
    let id = ObjectId::md5_of(data);
    let mut pair =
        common::one_shot_pair(seed, start, data, id, down, up, TransferConfig::default());
    let (verdict_at, both_at) = drive(&mut pair, start, |p| p.b.is_finished());
    let end = std::iter::from_fn(|| pair.b.poll_event())
        .filter_map(|e| match e {
            Event::Completed(_) => Some(Ok(())),
            Event::Failed(err) => Some(Err(err)),
            _ => None,
        })
        .last();
    Verdict {
        end,
        verdict_at,
        both_at,
        bytes_right: pair.b.sink() == data,
        reneged: pair.a.sender().map_or(0, |s| s.stats().chunks_reneged),
    }
}

type Endpoints = Pair<EndpointPeer<Maps, Vec<u8>>, EndpointPeer<NoObjects, Vec<u8>>>;

/// One download between two `Endpoint`s (as the net layer runs them).
fn endpoints(seed: u64, data: &[u8], down: LinkConfig, up: LinkConfig) -> Verdict {
    let start = Instant::now();
    let server_config = EndpointConfig {
        seed: u128::from(seed) << 1,
        ..EndpointConfig::default()
    };
    let client_config = EndpointConfig {
        seed: (u128::from(seed) << 1) | 1,
        ..EndpointConfig::default()
    };
    let (_, mut pair) =
        common::endpoint_pair(seed, start, server_config, client_config, data, down, up);
    let client_done = |p: &Endpoints| {
        p.b.events
            .iter()
            .any(|(_, e)| matches!(e.event, Event::Completed(_) | Event::Failed(_)))
    };
    let (verdict_at, both_at) = drive(&mut pair, start, client_done);
    let end = common::client_end(&pair.b);
    let bytes_right = pair.b.finished.first().is_some_and(|d| d == data);
    let reneged = pair
        .a
        .events
        .iter()
        .filter_map(|(_, e)| match &e.event {
            Event::Completed(c) => Some(c.stats.chunks_reneged),
            _ => None,
        })
        .sum();
    Verdict {
        end,
        verdict_at,
        both_at,
        bytes_right,
        reneged,
    }
}

/// Tally of how downloads ended, by kind.
#[derive(Default)]
struct Tally {
    completed: u32,
    failed: BTreeMap<String, u32>,
    slowest_verdict: Duration,
    slowest_end: Duration,
    reneged: u64,
}

impl Tally {
    fn print(&self, name: &str) {
        let failed: u32 = self.failed.values().sum();
        eprintln!(
            "{name}: {} completed, {failed} failed cleanly {:?}; slowest verdict {:?}, \
             slowest end of both sides {:?}; {} falsely acked chunks queued again",
            self.completed, self.failed, self.slowest_verdict, self.slowest_end, self.reneged
        );
    }
}

/// Checks one verdict and adds it to `tally`; returns why it is unacceptable, if it is.
fn judge(v: &Verdict, tally: &mut Tally) -> Result<(), String> {
    let Some(end) = &v.end else {
        return Err(format!("the receiver never finished (wedge): {v:?}"));
    };
    let Some(both) = v.both_at else {
        return Err(format!("the sender did not finish within {BOUND:?}: {v:?}"));
    };
    let verdict_at = v.verdict_at.unwrap_or(both);
    if verdict_at > VERDICT_BOUND {
        return Err(format!("verdict only after {verdict_at:?}: {v:?}"));
    }
    match end {
        Ok(()) if v.bytes_right => tally.completed += 1,
        Ok(()) => return Err("completed with wrong bytes".to_string()),
        Err(TransferError::TimedOut(_)) => {
            return Err(format!(
                "the receiver timed out (a wedge ended by its timer): {v:?}"
            ))
        }
        Err(e) => {
            let kind = match e {
                TransferError::ProtocolViolation(why) => format!("ProtocolViolation: {why}"),
                TransferError::Peer { code, .. } => format!("Peer: {code:?}"),
                other => {
                    let kind = format!("{other:?}");
                    kind.split([' ', '(', '{'])
                        .next()
                        .unwrap_or("?")
                        .to_string()
                }
            };
            *tally.failed.entry(kind).or_default() += 1;
        }
    }
    tally.slowest_verdict = tally.slowest_verdict.max(verdict_at);
    tally.slowest_end = tally.slowest_end.max(both);
    tally.reneged += v.reneged;
    Ok(())
}

fn run_all(
    name: &str,
    base: u64,
    down: LinkConfig,
    up: LinkConfig,
    run: fn(u64, &[u8], LinkConfig, LinkConfig) -> Verdict,
) -> Tally {
    let mut tally = Tally::default();
    let mut bad = Vec::new();
    for seed in seeds(base) {
        let data = object(SIZE, seed);
        let v = run(seed, &data, down.clone(), up.clone());
        if let Err(why) = judge(&v, &mut tally) {
            eprintln!("{name}: UDPFERRY_SEED={seed:#x}: {why}");
            bad.push(seed);
        }
    }
    tally.print(name);
    assert!(
        bad.is_empty(),
        "{name}: {} seeds wedged or ended wrongly: {:x?} (replay one with UDPFERRY_SEED=<seed>)",
        bad.len(),
        bad
    );
    tally
}

#[test]
fn mutation_both_ways_ends_cleanly_one_shot() {
    let l = link().with_mutate(MUTATE);
    run_all(
        "one-shot, 3% both ways",
        0x3a7e_0000,
        l.clone(),
        l,
        one_shot,
    );
}

#[test]
fn mutation_both_ways_ends_cleanly_endpoints() {
    let l = link().with_mutate(MUTATE);
    run_all(
        "endpoints, 3% both ways",
        0x3a7e_1000,
        l.clone(),
        l,
        endpoints,
    );
}

/// Only the client's datagrams are mutated: acks that claim chunks the receiver lacks, wrong
/// windows and delay samples, damaged requests and starts. The data is intact, so the download
/// must complete (a request whose object id was mutated is answered "not found", cleanly).
#[test]
fn mutated_acks_never_stop_a_download_one_shot() {
    let tally = run_all(
        "one-shot, 3% towards the server",
        0x3a7e_2000,
        link(),
        link().with_mutate(MUTATE),
        one_shot,
    );
    let failed: u32 = tally.failed.values().sum();
    assert!(failed <= tally.completed / 10, "too many failures");
}

#[test]
fn mutated_acks_never_stop_a_download_endpoints() {
    let tally = run_all(
        "endpoints, 3% towards the server",
        0x3a7e_3000,
        link(),
        link().with_mutate(MUTATE),
        endpoints,
    );
    let failed: u32 = tally.failed.values().sum();
    assert!(failed <= tally.completed / 10, "too many failures");
}

/// The harness itself: without mutation every download completes, in both set-ups.
#[test]
fn without_mutation_every_download_completes() {
    for (name, run) in [
        (
            "one-shot",
            one_shot as fn(u64, &[u8], LinkConfig, LinkConfig) -> Verdict,
        ),
        ("endpoints", endpoints),
    ] {
        let mut tally = Tally::default();
        for seed in seeds(0x3a7e_4000).into_iter().take(4) {
            let data = object(SIZE, seed);
            let v = run(seed, &data, link(), link());
            let judged = judge(&v, &mut tally);
            assert!(
                judged.is_ok(),
                "{name}: UDPFERRY_SEED={seed:#x}: {judged:?}"
            );
            assert!(
                matches!(v.end, Some(Ok(()))),
                "{name}: UDPFERRY_SEED={seed:#x}: {v:?}"
            );
        }
    }
}

/// A client whose `nth` acknowledgement is replaced by one that claims every chunk (what a
/// damaged cumulative point does), as the sender sees it.
struct FalseAck {
    inner: Receiver<Vec<u8>>,
    acks: u32,
    nth: u32,
}

impl Peer for FalseAck {
    fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) {
        self.inner.handle_datagram(now, datagram);
    }
    fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        let n = self.inner.poll_transmit(now, buf)?;
        let Ok(Datagram {
            conn_id,
            frame: Frame::Ack(ack),
        }) = wire::decode(&buf[..n])
        else {
            return Some(n);
        };
        self.acks += 1;
        if self.acks != self.nth {
            return Some(n);
        }
        let lie = Ack {
            cumulative: u32::MAX,
            ranges: AckRanges::List(&[]),
            ..ack
        };
        let mut out = [0u8; 256];
        let len = Datagram {
            conn_id,
            frame: Frame::Ack(lie),
        }
        .encode(&mut out)
        .ok()?;
        buf[..len].copy_from_slice(&out[..len]);
        Some(len)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.inner.poll_timeout()
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.inner.handle_timeout(now);
    }
    fn is_finished(&self) -> bool {
        self.inner.is_finished()
    }
}

/// Runs one download whose client lies in its `nth` ack (never, for 0) over a path that loses
/// 2% of the data: (virtual time taken, whether it completed with the right bytes, sender stats).
fn with_false_ack(seed: u64, nth: u32) -> (Duration, bool, udpferry::core::Stats) {
    let data = object(SIZE, seed);
    let id = ObjectId::md5_of(&data);
    let start = Instant::now();
    let config = TransferConfig::default();
    let server = OneShotServer::new(id, data.len() as u64, data.clone(), config.clone(), 1);
    let inner = Receiver::new(
        start,
        ConnectionId(9),
        id,
        &RangeSet::new(),
        Vec::new(),
        config,
    );
    let client = FalseAck {
        inner,
        acks: 0,
        nth,
    };
    let mut pair = Pair::new(seed, start, server, client, link().with_loss(0.02), link());
    let outcome = pair.run(u64::MAX, start + BOUND);
    let completed = outcome == udpferry_sim::RunOutcome::BothFinished
        && std::iter::from_fn(|| pair.b.inner.poll_event())
            .any(|e| matches!(e, Event::Completed(_)))
        && pair.b.inner.sink() == &data;
    let stats = pair.a.sender().map(|s| s.stats()).unwrap_or_default();
    (pair.now - start, completed, stats)
}

/// The known wedge: an ack that falsely claims chunks the receiver lacks. The sender must learn
/// from the receiver's later acks that they are missing and send them again, and the download
/// completes about as fast as without the lie, not after an idle timeout. The data path loses
/// 2%, so some of the chunks in flight when the lie arrives never reach the receiver and must
/// be withdrawn.
#[test]
fn a_false_ack_claiming_every_chunk_is_withdrawn() {
    let mut withdrawn = 0;
    for nth in [1, 5, 40, 300, 1000] {
        let seed = udpferry_sim::seed_from_env(0x3a7e_5000 + u64::from(nth));
        let ctx = format!("false ack #{nth}, UDPFERRY_SEED={seed:#x}");
        let (honest, honest_ok, _) = with_false_ack(seed, 0);
        assert!(honest_ok, "{ctx}: the download without the lie failed");
        let (took, ok, stats) = with_false_ack(seed, nth);
        assert!(ok, "{ctx}: did not complete within {BOUND:?} ({stats:?})");
        assert!(
            took <= honest + Duration::from_secs(2),
            "{ctx}: took {took:?}, {honest:?} without the lie"
        );
        withdrawn += stats.chunks_reneged;
        // Losses and the withdrawn claims cost repeats, not a second copy of the object.
        assert!(stats.chunks_sent < 3598 * 5 / 4, "{ctx}: {stats:?}");
    }
    assert!(withdrawn > 0, "no claim was ever withdrawn");
}

/// An offer whose nonce was damaged in flight: the client's Start echoes a nonce the server
/// never issued. The server answers it with a fresh offer, the client echoes the new nonce, and
/// the transfer starts.
#[test]
fn a_damaged_offer_nonce_is_answered_with_a_fresh_offer() {
    let data = object(100_000, 7);
    let id = ObjectId::md5_of(&data);
    let now = Instant::now();
    let client = SocketAddr::from(CLIENT);
    let maps: Maps = [(id, Arc::from(data.as_slice()))].into_iter().collect();
    let mut server: Endpoint<Maps, Vec<u8>> = Endpoint::new(EndpointConfig::default(), maps);
    let mut rx = Receiver::new(
        now,
        ConnectionId(5),
        id,
        &RangeSet::new(),
        Vec::new(),
        TransferConfig::default(),
    );
    let mut buf = vec![0u8; 2048];
    let mut to_server = |rx: &mut Receiver<Vec<u8>>, server: &mut Endpoint<Maps, Vec<u8>>| {
        while let Some(n) = rx.poll_transmit(now, &mut buf) {
            server.handle_datagram(now, client, &buf[..n]);
        }
    };
    let offers = |server: &mut Endpoint<Maps, Vec<u8>>| {
        let mut out = Vec::new();
        let mut b = vec![0u8; 2048];
        while let Some(t) = server.poll_transmit(now, &mut b) {
            if let Ok(Datagram {
                frame: Frame::Offer(o),
                conn_id,
            }) = wire::decode(&b[..t.len])
            {
                out.push((conn_id, o));
            }
        }
        out
    };
    to_server(&mut rx, &mut server);
    let first = offers(&mut server);
    assert_eq!(first.len(), 1, "the request is answered with an offer");
    let (conn_id, offer) = first[0];
    let damaged = Offer {
        nonce: offer.nonce ^ (1 << 17),
        ..offer
    };
    let mut d = vec![0u8; 256];
    let n = Datagram {
        conn_id,
        frame: Frame::Offer(damaged),
    }
    .encode(&mut d)
    .unwrap_or(0);
    rx.handle_datagram(now, &d[..n]);
    to_server(&mut rx, &mut server);
    assert_eq!(server.stats().bad_starts, 1);
    assert_eq!(server.transfer_count(), 0);
    let second = offers(&mut server);
    assert_eq!(
        second.len(),
        1,
        "the bad start is answered with a fresh offer"
    );
    let n = Datagram {
        conn_id,
        frame: Frame::Offer(second[0].1),
    }
    .encode(&mut d)
    .unwrap_or(0);
    rx.handle_datagram(now, &d[..n]);
    to_server(&mut rx, &mut server);
    assert_eq!(server.stats().accepted, 1, "{:?}", server.stats());
    assert_eq!(server.transfer_count(), 1);
}

/// The relay itself, in front of a plain echo server: every datagram it mutates still passes
/// its CRC32 and differs in 1 to 3 bits before the trailer; loss drops about the share asked
/// for; the counters add up; it stops on drop.
#[test]
fn the_relay_mutates_with_a_valid_crc_and_counts_what_it_did() {
    let echo = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind an echo socket");
    let upstream = echo.local_addr().expect("echo address");
    echo.set_read_timeout(Some(Duration::from_millis(20)))
        .expect("set a read timeout");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let echoer = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((n, from)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], from);
            }
        }
    });
    let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a client socket");
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("set a read timeout");
    let mut rng = Rng::new(6);
    let mut datagram = move || {
        let mut d = vec![0u8; 64];
        rng.fill_bytes(&mut d[..60]);
        let crc = crc32fast::hash(&d[..60]);
        d[60..].copy_from_slice(&crc.to_be_bytes());
        d
    };

    // Everything mutated on the way in, nothing lost: each echo is checked against its original.
    let relay = Relay::start(
        upstream,
        RelayConfig {
            seed: 5,
            to_server: Impairment::mutate(1.0),
            to_client: Impairment::default(),
            rebind_at: Vec::new(),
            eat_path_challenges: false,
        },
    );
    let mut buf = [0u8; 2048];
    for _ in 0..300 {
        let d = datagram();
        client.send_to(&d, relay.addr()).expect("send to the relay");
        let n = client.recv(&mut buf).expect("the echo");
        let got = &buf[..n];
        assert_eq!(n, 64);
        let flipped: u32 = got[..60]
            .iter()
            .zip(&d[..60])
            .map(|(a, b)| (a ^ b).count_ones())
            .sum();
        assert!((1..=3).contains(&flipped), "{flipped} bits flipped");
        assert_eq!(got[60..], crc32fast::hash(&got[..60]).to_be_bytes());
    }
    // The relay counts a datagram just after sending it: let the last count land.
    let waited = Instant::now();
    while relay.stats().to_client.forwarded < 300 && waited.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let stats = relay.stats();
    assert_eq!(stats.clients, 1);
    assert_eq!(stats.to_server.forwarded, 300, "{stats:?}");
    assert_eq!(stats.to_server.mutated, 300, "{stats:?}");
    assert_eq!(stats.to_client.forwarded, 300, "{stats:?}");
    assert_eq!(stats.to_client.mutated + stats.to_client.dropped, 0);
    let dropped_at = Instant::now();
    drop(relay);
    assert!(
        dropped_at.elapsed() < Duration::from_secs(1),
        "the relay took long to stop"
    );

    // Half lost on the way in: the counters account for every datagram.
    let relay = Relay::start(
        upstream,
        RelayConfig {
            seed: 7,
            to_server: Impairment::loss(0.5),
            to_client: Impairment::default(),
            rebind_at: Vec::new(),
            eat_path_challenges: false,
        },
    );
    for _ in 0..400 {
        client
            .send_to(&datagram(), relay.addr())
            .expect("send to the relay");
        std::thread::sleep(Duration::from_micros(50));
    }
    let waited = Instant::now();
    while relay.stats().to_client.forwarded < relay.stats().to_server.forwarded
        || relay.stats().to_server.forwarded + relay.stats().to_server.dropped < 400
    {
        assert!(
            waited.elapsed() < Duration::from_secs(5),
            "{:?}",
            relay.stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let stats = relay.stats();
    assert_eq!(stats.to_server.forwarded + stats.to_server.dropped, 400);
    assert!((140..=260).contains(&stats.to_server.dropped), "{stats:?}");
    assert_eq!(stats.to_server.mutated, 0);
    drop(relay);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = echoer.join();
}

/// A real `net::Server` over a `ContentStore`, and a plain `Client::fetch` through the relay
/// losing 5% of the datagrams each way (no mutation): the download completes with the right
/// bytes.
#[test]
fn a_real_download_through_a_lossy_relay_completes() {
    let dir = common::TempDir::new("relay-loss");
    let data = object(1 << 20, 0x5e1a);
    let id = ObjectId::md5_of(&data);
    common::put_dated(&dir.join("maps/map.bsp"), &data);
    let serving = common::Serving::dir(&dir.join("maps"));
    let relay = Relay::start(
        serving.addr,
        RelayConfig::both(0x5e1a, Impairment::loss(0.05)),
    );
    let client = Client::new(dir.join("cache")).unwrap();
    let options = FetchOptions {
        timeout: Some(Duration::from_secs(60)),
        ..FetchOptions::default()
    };
    let report = client.fetch(relay.addr(), id, &options, |_| {});
    let stats = relay.stats();
    let report = match report {
        Ok(report) => report,
        Err(e) => panic!("the download failed: {e} (relay {stats:?})"),
    };
    assert!(!report.from_cache);
    let got = std::fs::read(&report.path).unwrap_or_default();
    assert!(got == data, "the cached object differs");
    assert!(
        stats.to_server.dropped > 0 && stats.to_client.dropped > 0,
        "{stats:?}"
    );
    assert_eq!(stats.to_server.mutated + stats.to_client.mutated, 0);
    // At least every chunk of 1166 bytes came through.
    assert!(stats.to_client.forwarded > (1 << 20) / 1166, "{stats:?}");
    eprintln!("through the relay: {stats:?}");
}
