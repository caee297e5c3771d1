//! A client whose address changes mid-download (a NAT re-mapping its port, a laptop moving from
//! Wi-Fi to a cable): the server validates the new address with a path challenge and moves the
//! transfer there (docs/PROTOCOL.md section 5.9), in virtual time through the simulator.
//!
//! A re-mapping is modelled as a NAT does it: from the moment of the change, the client's
//! datagrams reach the server from a new address, and whatever the server still sends to the old
//! one is lost (the mapping is gone). Every failing case prints its seed.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use udpferry::core::{
    Endpoint, EndpointConfig, Event, NoObjects, RangeSet, TransferId, TransferInfo,
};
use udpferry::wire::{self, Datagram, Frame};
use udpferry::ObjectId;
use udpferry_sim::{Direction, EndpointPeer, LinkConfig, Pair, Rng, RunOutcome};

type Maps = HashMap<ObjectId, Arc<[u8]>>;
type Server = EndpointPeer<Maps, Vec<u8>>;
type Client = EndpointPeer<NoObjects, Vec<u8>>;

const SERVER: ([u8; 4], u16) = ([10, 0, 0, 1], 7878);
/// The client's address as the server sees it, before and after each re-mapping.
const CLIENT: [([u8; 4], u16); 3] = [
    ([198, 51, 100, 7], 40_000),
    ([198, 51, 100, 7], 53_117),
    ([203, 0, 113, 9], 61_002),
];
const SIZE: usize = 4 << 20;
/// 4 MiB/s down with a 100 ms queue, 20 ms each way.
const RATE: u64 = 4 << 20;

struct Trip {
    pair: Pair<Server, Client>,
    start: Instant,
    data: Vec<u8>,
    transfer: TransferId,
    /// Bytes the server put on the link (to the client's current address).
    on_link: Rc<Cell<u64>>,
}

fn links(loss: f64) -> (LinkConfig, LinkConfig) {
    let one_way = Duration::from_millis(20);
    let down = LinkConfig::clean(one_way)
        .with_bottleneck(RATE, RATE as usize / 10)
        .with_loss(loss);
    let up = LinkConfig::clean(one_way).with_loss(loss);
    (down, up)
}

fn trip(seed: u64, loss: f64) -> Trip {
    let mut data = vec![0u8; SIZE];
    Rng::new(seed).fill_bytes(&mut data);
    let id = ObjectId::md5_of(&data);
    let maps: Maps = [(id, Arc::from(data.as_slice()))].into_iter().collect();
    let server = EndpointPeer::new(
        Endpoint::new(
            EndpointConfig {
                seed: u128::from(seed) + 1,
                ..EndpointConfig::default()
            },
            maps,
        ),
        SocketAddr::from(CLIENT[0]),
    );
    let mut client: Client = EndpointPeer::new(
        Endpoint::new(
            EndpointConfig {
                seed: u128::from(seed) + 2,
                ..EndpointConfig::default()
            },
            NoObjects,
        ),
        SocketAddr::from(SERVER),
    );
    let start = Instant::now();
    let transfer = client.endpoint.fetch(
        start,
        SocketAddr::from(SERVER),
        id,
        &RangeSet::new(),
        Vec::new(),
    );
    let (down, up) = links(loss);
    let mut pair = Pair::new(seed, start, server, client, down, up);
    let on_link = Rc::new(Cell::new(0u64));
    let count = on_link.clone();
    pair.set_observer(Box::new(move |_, dir, d| {
        if dir == Direction::AtoB {
            count.set(count.get() + d.len() as u64);
        }
    }));
    Trip {
        pair,
        start,
        data,
        transfer,
        on_link,
    }
}

impl Trip {
    fn received(&self) -> u64 {
        self.pair
            .b
            .endpoint
            .received_bytes(self.transfer)
            .map_or(0, |r| r.covered())
    }

    /// Steps until `until` holds (or the run ends); false if it never held.
    fn run_until(&mut self, mut until: impl FnMut(&Self) -> bool) -> bool {
        let deadline = self.start + Duration::from_secs(120);
        while !until(self) {
            if self.pair.now > deadline || !self.pair.step() {
                return false;
            }
        }
        true
    }

    /// The client's NAT gives it address `CLIENT[i]` from now on.
    fn rebind(&mut self, i: usize) {
        self.pair.a.remote = SocketAddr::from(CLIENT[i]);
    }

    fn finish(&mut self) -> Ended {
        let outcome = self
            .pair
            .run(u64::MAX, self.start + Duration::from_secs(600));
        let completed = self
            .pair
            .b
            .events
            .iter()
            .find(|(_, e)| matches!(e.event, Event::Completed(_) | Event::Failed(_)));
        let (at, ok) = match completed {
            Some((at, e)) => (*at, matches!(e.event, Event::Completed(_))),
            None => (self.pair.now, false),
        };
        let elsewhere: u64 = self.pair.a.sent_elsewhere.values().sum();
        Ended {
            outcome,
            ok,
            verified: self.pair.b.finished.first() == Some(&self.data),
            secs: (at - self.start).as_secs_f64(),
            server_bytes: self.on_link.get() + elsewhere,
            elsewhere,
            migrations: self.pair.a.endpoint.stats().migrations,
            accepted: self.pair.a.endpoint.stats().accepted,
        }
    }
}

#[derive(Debug)]
struct Ended {
    outcome: RunOutcome,
    ok: bool,
    verified: bool,
    secs: f64,
    /// Everything the server sent, to any address.
    server_bytes: u64,
    /// What it sent to addresses the client no longer had.
    elsewhere: u64,
    migrations: u64,
    /// Transfers the server accepted (one per download unless a Start made another).
    accepted: u64,
}

impl Ended {
    fn overhead(&self) -> f64 {
        self.server_bytes as f64 / SIZE as f64
    }
}

/// The same trip without any re-mapping, for comparison.
fn unbroken(seed: u64, loss: f64) -> Ended {
    trip(seed, loss).finish()
}

/// Checks a trip with re-mappings against the unbroken one: it completes with the right bytes,
/// within `extra_secs` more and `extra_bytes` (fraction of the object) more sent.
fn assert_survives(
    seed: u64,
    what: &str,
    got: &Ended,
    base: &Ended,
    extra_secs: f64,
    extra_bytes: f64,
) {
    let ctx = format!("{what}, seed {seed}: {got:?}, unbroken {base:?}");
    eprintln!(
        "{what}, seed {seed}: {:.2} s ({:.2} s unbroken), server sent {:.3}x ({:.3}x), {} B to the old address",
        got.secs,
        base.secs,
        got.overhead(),
        base.overhead(),
        got.elsewhere
    );
    assert!(base.ok && base.verified, "unbroken run failed: {ctx}");
    assert_eq!(got.outcome, RunOutcome::BothFinished, "{ctx}");
    assert!(got.ok && got.verified, "did not complete verified: {ctx}");
    assert!(got.migrations >= 1, "no migration: {ctx}");
    assert!(
        got.secs <= base.secs + extra_secs,
        "took {:.2} s, unbroken {:.2} s: {ctx}",
        got.secs,
        base.secs
    );
    assert!(
        got.overhead() <= base.overhead() + extra_bytes,
        "server sent {:.3}x the object, unbroken {:.3}x: {ctx}",
        got.overhead(),
        base.overhead()
    );
}

/// Re-mapped after the server accepted the Start, before any data reached the client: its
/// repeated Start comes from the new address, and the server validates that address instead of
/// making a second transfer.
#[test]
fn rebinding_before_the_first_data() {
    let seed = 41;
    let accepted = |t: &Trip| t.pair.a.endpoint.transfer_count() == 1;
    let got = rebound_once(seed, 0.0, "before the first data", accepted, (2.0, 0.1));
    assert_eq!(got.accepted, 1, "seed {seed}: a second transfer was made");
}

/// One trip re-mapped once, when `until` first holds, checked against the unbroken trip with
/// the same seed and loss (see `assert_survives`).
fn rebound_once(
    seed: u64,
    loss: f64,
    what: &str,
    until: impl FnMut(&Trip) -> bool,
    (extra_secs, extra_bytes): (f64, f64),
) -> Ended {
    let base = unbroken(seed, loss);
    let mut t = trip(seed, loss);
    assert!(
        t.run_until(until),
        "{what}, seed {seed}: the moment never came"
    );
    t.rebind(1);
    let got = t.finish();
    assert_survives(seed, what, &got, &base, extra_secs, extra_bytes);
    got
}

/// Re-mapped while the sender is still in slow start (32 KiB in).
#[test]
fn rebinding_during_slow_start() {
    for seed in [1, 2, 3] {
        let in_slow_start = |t: &Trip| t.received() >= 32 << 10;
        rebound_once(seed, 0.0, "slow start", in_slow_start, (2.0, 0.1));
    }
}

/// Re-mapped in the middle, at 3 MB of 4 MiB: what the issue measured from outside.
#[test]
fn rebinding_mid_transfer_costs_little() {
    for seed in [4, 5, 6] {
        let mid = |t: &Trip| t.received() >= 3_000_000;
        let got = rebound_once(seed, 0.0, "mid-transfer", mid, (2.0, 0.1));
        assert!(got.overhead() <= 1.1, "seed {seed}: {got:?}");
    }
}

/// Re-mapped while the sender recovers lost chunks (2% random loss each way): the moment the
/// first retransmission goes out.
#[test]
fn rebinding_during_loss_recovery() {
    for seed in [7, 8, 9] {
        let retransmitting = |t: &Trip| {
            t.pair.a.endpoint.transfers().any(|info: TransferInfo| {
                t.pair
                    .a
                    .endpoint
                    .transfer_stats(info.id)
                    .is_some_and(|s| s.chunks_retransmitted > 0)
            })
        };
        rebound_once(seed, 0.02, "loss recovery", retransmitting, (2.5, 0.15));
    }
}

/// Re-mapped just before the last chunk: the client holds all but the last two.
#[test]
fn rebinding_just_before_the_last_chunk() {
    for seed in [10, 11, 12] {
        let last_two = |t: &Trip| t.received() + 2 * 1166 >= SIZE as u64;
        rebound_once(seed, 0.0, "last chunk", last_two, (2.0, 0.1));
    }
}

/// Two re-mappings in one download, the second to another IP address altogether.
#[test]
fn two_rebindings_in_one_download() {
    for seed in [13, 14] {
        let base = unbroken(seed, 0.0);
        let mut t = trip(seed, 0.0);
        assert!(t.run_until(|t| t.received() >= 1_000_000), "seed {seed}");
        t.rebind(1);
        assert!(t.run_until(|t| t.received() >= 3_000_000), "seed {seed}");
        t.rebind(2);
        let got = t.finish();
        assert_survives(seed, "two rebindings", &got, &base, 4.0, 0.15);
        assert_eq!(got.migrations, 2, "seed {seed}: {got:?}");
    }
}

/// Someone who learnt the connection id (an on-path observer) sends copies of the client's
/// acks with a victim's address as their source. The download must never be redirected at
/// the victim: the victim gets path challenges only, at most 3x what "it" sent, and the real
/// client's download completes where it is.
#[test]
fn a_stolen_connection_id_cannot_redirect_the_download() {
    let seed = 21;
    let victim = SocketAddr::from(([192, 0, 2, 66], 80));
    let mut t = trip(seed, 0.0);
    let forged = Rc::new(Cell::new(0u64));
    let acks: Rc<std::cell::RefCell<Vec<Vec<u8>>>> = Rc::default();
    let seen = acks.clone();
    let on_link = t.on_link.clone();
    t.pair.set_observer(Box::new(move |_, dir, d| match dir {
        Direction::AtoB => on_link.set(on_link.get() + d.len() as u64),
        Direction::BtoA => {
            if matches!(
                wire::decode(d),
                Ok(Datagram {
                    frame: Frame::Ack(_) | Frame::Done,
                    ..
                })
            ) {
                seen.borrow_mut().push(d.to_vec());
            }
        }
    }));
    let mut replayed = 0;
    let mut bogus_sent = false;
    loop {
        let now = t.pair.now;
        let batch: Vec<Vec<u8>> = acks.borrow_mut().drain(..).collect();
        for d in batch {
            // Every other ack, and every one of them twice: a flood from the victim's address.
            replayed += 1;
            if replayed % 2 == 0 {
                for _ in 0..2 {
                    forged.set(forged.get() + d.len() as u64);
                    t.pair.a.endpoint.handle_datagram(now, victim, &d);
                }
            }
            // Once, mid-transfer: a path response from the victim's address with a made-up
            // token (the real one went to the victim, who does not answer).
            if replayed == 100 && !bogus_sent {
                bogus_sent = true;
                let conn_id = wire::decode(&d).expect("captured ack decodes").conn_id;
                let mut buf = [0u8; 64];
                let n = Datagram {
                    conn_id,
                    frame: Frame::PathResponse(0x0123_4567_89ab_cdef),
                }
                .encode(&mut buf)
                .expect("encodes");
                let before = t.pair.a.endpoint.stats().bad_path_responses;
                t.pair.a.endpoint.handle_datagram(now, victim, &buf[..n]);
                assert_eq!(
                    t.pair.a.endpoint.stats().bad_path_responses,
                    before + 1,
                    "seed {seed}: a made-up token was not refused"
                );
            }
        }
        if !t.pair.b.finished.is_empty() || !t.pair.step() {
            break;
        }
    }
    let got = t.finish();
    let to_victim = t.pair.a.sent_elsewhere.get(&victim).copied().unwrap_or(0);
    let ctx = format!(
        "seed {seed}: {got:?}, forged {} B, sent to the victim {to_victim} B",
        forged.get()
    );
    assert!(bogus_sent, "the flood was too short to test: {ctx}");
    assert!(
        forged.get() > 10_000,
        "the flood was too small to test: {ctx}"
    );
    assert!(
        got.ok && got.verified,
        "the real client's download broke: {ctx}"
    );
    assert_eq!(got.migrations, 0, "{ctx}");
    assert!(
        to_victim > 0,
        "the victim's address was never challenged: {ctx}"
    );
    assert!(to_victim <= 3 * forged.get(), "{ctx}");
    assert_eq!(
        to_victim,
        wire::PATH_FRAME_LEN as u64 * t.pair.a.endpoint.stats().path_challenges,
        "anything but challenges went to the victim: {ctx}"
    );
}

/// Nothing comes back after the re-mapping (the server forgot the transfer, or a middlebox eats
/// its challenges): a receiver configured with `path_lost_after` (what `net::Client` uses) fails
/// with `PathLost` that long after it last heard the server, well before the idle timeout, and
/// keeps what arrived for the resume; one without it waits for the idle timeout.
#[test]
fn a_silent_path_ends_in_path_lost_with_the_bytes_kept() {
    use udpferry::core::TransferError;
    for (after, expect_lost) in [(Duration::from_secs(4), true), (Duration::MAX, false)] {
        let seed = 31;
        let mut t = trip(seed, 0.0);
        let mut config = EndpointConfig {
            seed: 77,
            ..EndpointConfig::default()
        };
        config.transfer.path_lost_after = after;
        t.pair.b.endpoint = Endpoint::new(config, NoObjects);
        t.transfer = t.pair.b.endpoint.fetch(
            t.start,
            SocketAddr::from(SERVER),
            ObjectId::md5_of(&t.data),
            &RangeSet::new(),
            Vec::new(),
        );
        assert!(t.run_until(|t| t.received() >= 1_000_000), "seed {seed}");
        let held = t.received();
        let silent_from = t.pair.now;
        t.rebind(1);
        t.pair
            .a_to_b
            .set_config(LinkConfig::default().with_loss(1.0));
        t.pair.run(u64::MAX, t.start + Duration::from_secs(60));
        let (at, err) = t
            .pair
            .b
            .events
            .iter()
            .find_map(|(at, e)| match &e.event {
                Event::Failed(err) => Some((*at, err.clone())),
                _ => None,
            })
            .unwrap_or_else(|| panic!("seed {seed}: no failure"));
        let waited = at - silent_from;
        let sink = t.pair.b.finished.first().expect("the sink comes back");
        // No loss: what arrived is a prefix of the object, and it is all still there.
        let held = held as usize;
        assert!(
            sink.len() >= held,
            "seed {seed}: {} of {held} bytes kept",
            sink.len()
        );
        assert!(
            sink[..held] == t.data[..held],
            "seed {seed}: kept bytes differ"
        );
        if expect_lost {
            assert!(
                matches!(err, TransferError::PathLost(_)),
                "seed {seed}: {err:?}"
            );
            assert!(
                waited >= Duration::from_secs(4) && waited < Duration::from_secs(5),
                "seed {seed}: gave up {waited:?} after the path went silent"
            );
        } else {
            assert!(
                matches!(err, TransferError::TimedOut(_)),
                "seed {seed}: {err:?}"
            );
            assert!(waited >= Duration::from_secs(14), "seed {seed}: {waited:?}");
        }
    }
}
