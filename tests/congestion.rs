//! The congestion model against other traffic and a changing path, in the simulator (issue 15):
//! a Background download gives way to a Standard one through the same bottleneck, two
//! independent downloads converge, Standard shares a deep buffer with a loss-based (CUBIC) flow
//! and Background gives way to it, and a sender follows a bottleneck whose rate halves
//! mid-transfer.
//!
//! `cargo test --release --test congestion -- --nocapture` prints every figure. A failing case
//! names its seed; `UDPFERRY_SEED=... cargo test --test congestion NAME` replays it.

mod common;

use std::time::{Duration, Instant};

use common::object;
use udpferry::core::{CongestionControl, RangeSet, Receiver, TransferConfig};
use udpferry::wire::{self, ConnectionId};
use udpferry::ObjectId;
use udpferry_sim::{
    seed_from_env, CubicReceiver, CubicSender, LinkConfig, OneShotServer, Pair, Peer, RunOutcome,
};

/// Two peers behind one address, datagrams routed by connection id: the first peer's
/// transfers use `first`; the second peer gets everything else (another transfer, or a
/// `udpferry_sim::CubicSender` flow). Sends alternate between them.
struct Two<P, Q> {
    a: P,
    b: Q,
    first: ConnectionId,
    /// The second peer starts here (before, it neither sends nor times out).
    b_from: Instant,
    b_started: bool,
    turn: bool,
}

impl<P, Q> Two<P, Q> {
    /// `a` runs the transfers on connection 1; `b` everything else, from `b_from` on.
    fn new(a: P, b: Q, b_from: Instant) -> Self {
        Two {
            a,
            b,
            first: ConnectionId(1),
            b_from,
            b_started: false,
            turn: false,
        }
    }
}

impl<P: Peer, Q: Peer> Peer for Two<P, Q> {
    fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) {
        if wire::decode(datagram).is_ok_and(|d| d.conn_id == self.first) {
            self.a.handle_datagram(now, datagram);
        } else if now >= self.b_from {
            self.b.handle_datagram(now, datagram);
        }
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        self.turn = !self.turn;
        let b_on = now >= self.b_from;
        if self.turn {
            if let Some(n) = self.a.poll_transmit(now, buf) {
                return Some(n);
            }
            b_on.then(|| self.b.poll_transmit(now, buf)).flatten()
        } else {
            if let Some(n) = b_on.then(|| self.b.poll_transmit(now, buf)).flatten() {
                return Some(n);
            }
            self.a.poll_transmit(now, buf)
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let b = if self.b_started {
            self.b.poll_timeout()
        } else {
            Some(self.b_from)
        };
        [self.a.poll_timeout(), b].into_iter().flatten().min()
    }

    fn handle_timeout(&mut self, now: Instant) {
        if self.a.poll_timeout().is_some_and(|t| t <= now) {
            self.a.handle_timeout(now);
        }
        if now >= self.b_from {
            self.b_started = true;
            if self.b.poll_timeout().is_some_and(|t| t <= now) {
                self.b.handle_timeout(now);
            }
        }
    }

    fn is_finished(&self) -> bool {
        self.a.is_finished() && self.b.is_finished()
    }
}

type Servers = Two<OneShotServer<Vec<u8>>, OneShotServer<Vec<u8>>>;
type Clients = Two<Receiver<Vec<u8>>, Receiver<Vec<u8>>>;

fn config(kind: CongestionControl) -> TransferConfig {
    TransferConfig {
        congestion: kind,
        ..TransferConfig::default()
    }
}

/// One download of `data` with `kind` on connection `conn`: its server (address-validation
/// token `nonce`) and its client.
fn download(
    start: Instant,
    conn: u64,
    data: Vec<u8>,
    kind: CongestionControl,
    nonce: u64,
) -> (OneShotServer<Vec<u8>>, Receiver<Vec<u8>>) {
    let id = ObjectId::md5_of(&data);
    let client = Receiver::new(
        start,
        ConnectionId(conn),
        id,
        &RangeSet::new(),
        Vec::new(),
        config(kind),
    );
    let server = OneShotServer::new(id, data.len() as u64, data, config(kind), nonce);
    (server, client)
}

/// Two downloads through one bottleneck toward the clients: `first` from the start, `second`
/// from `second_from` on.
fn two_downloads(
    seed: u64,
    bottleneck: LinkConfig,
    (first, second): (CongestionControl, CongestionControl),
    second_from: Duration,
    size: usize,
) -> Pair<Servers, Clients> {
    let start = Instant::now();
    let (server_a, client_a) = download(start, 1, object(size, seed), first, seed + 7);
    let (server_b, client_b) = download(start, 2, object(size, seed + 1), second, seed + 8);
    let servers = Two::new(server_a, server_b, start);
    let clients = Two::new(client_a, client_b, start + second_from);
    let up = LinkConfig::clean(bottleneck.latency);
    Pair::new(seed, start, servers, clients, bottleneck, up)
}

/// Bytes each client holds at the end of each of `windows` (offsets from the start).
fn received_at(pair: &mut Pair<Servers, Clients>, at: &[Duration]) -> Vec<(u64, u64)> {
    let start = pair.now;
    at.iter()
        .map(|&t| {
            let outcome = pair.run(u64::MAX, start + t);
            assert!(
                matches!(outcome, RunOutcome::Deadline | RunOutcome::BothFinished),
                "{outcome:?}"
            );
            (pair.b.a.bytes_received(), pair.b.b.bytes_received())
        })
        .collect()
}

/// A Background download that has the bottleneck to itself gives way when a Standard one
/// starts: the Standard download gets at least 0.8 of the bottleneck.
#[test]
fn background_gives_way_to_standard() {
    const RATE: u64 = 2 << 20;
    let seed = seed_from_env(0xba5e_0001);
    let bottleneck =
        LinkConfig::clean(Duration::from_millis(20)).with_bottleneck(RATE, (RATE / 10) as usize);
    let mut pair = two_downloads(
        seed,
        bottleneck,
        (CongestionControl::default(), CongestionControl::Standard),
        Duration::from_secs(3),
        48 << 20,
    );
    let secs = |s| Duration::from_secs(s);
    let got = received_at(&mut pair, &[secs(3), secs(5), secs(15)]);
    let background_alone = got[0].0 as f64 / 3.0 / RATE as f64;
    let (bg, std) = (
        (got[2].0 - got[1].0) as f64 / 10.0 / RATE as f64,
        (got[2].1 - got[1].1) as f64 / 10.0 / RATE as f64,
    );
    println!(
        "background alone: {background_alone:.3} of the bottleneck; seconds 5 to 15 with a \
         Standard download from second 3: background {bg:.3}, standard {std:.3} \
         (queue drops {}) seed {seed:#x}",
        pair.a_to_b.stats().queue_dropped
    );
    assert!(
        background_alone >= 0.8,
        "seed {seed:#x}: {background_alone}"
    );
    assert!(
        std >= 0.8,
        "seed {seed:#x}: standard got {std:.3}, background {bg:.3}"
    );
}

/// Two downloads from separate senders (no shared path state: different servers, or clients
/// at different addresses), the second about 3 s later, through bottlenecks of one-way delay
/// 10 to 51 ms (six delays at five offsets, 30 paths): together they fill each bottleneck (at
/// least 0.88 of it; Background leaves 0.90 to 0.97 on these paths, Standard 0.95 to 0.96) and
/// the newcomer is never starved (at least a quarter of it). The gap between them over seconds
/// 8 to 18 is printed for each path. Background (the default) is within the 20% on at
/// least 90% of the paths and within 30% on every one. Standard falls short of that: within 20%
/// on 21 of the 30 (15 with its window at 2 BDP), so the test holds it to two thirds as a guard
/// against losing ground (docs/ARCHITECTURE.md section 5.8). Only one endpoint's transfers to
/// one host share a window (`tests/rates.rs::two_downloads_through_one_bottleneck_converge`).
#[test]
fn two_independent_downloads_fill_the_path_and_converge() {
    const RATE: u64 = 2 << 20;
    let mut missed = Vec::new();
    for kind in [CongestionControl::default(), CongestionControl::Standard] {
        let seed = seed_from_env(0xba5e_0002);
        let background = kind != CongestionControl::Standard;
        let mut gaps = Vec::new();
        let (mut within_20, mut count) = (0, 0);
        for offset in [0, 2, 3, 5, 6] {
            for path in 0..6u64 {
                let one_way = Duration::from_millis(10 + 7 * path + offset);
                let bottleneck =
                    LinkConfig::clean(one_way).with_bottleneck(RATE, (RATE / 10) as usize);
                let second_from = Duration::from_millis(3000 + 37 * path);
                let mut pair = two_downloads(seed, bottleneck, (kind, kind), second_from, 48 << 20);
                let secs = |s| Duration::from_secs(s);
                let got = received_at(&mut pair, &[secs(8), secs(18)]);
                let (a, b) = (
                    (got[1].0 - got[0].0) as f64 / 10.0,
                    (got[1].1 - got[0].1) as f64 / 10.0,
                );
                let gap = (a - b).abs() / a.max(b);
                let (total, newcomer) = ((a + b) / RATE as f64, b / RATE as f64);
                gaps.push(format!(
                    "{} ms: {:.0}% ({total:.2} full)",
                    one_way.as_millis(),
                    gap * 100.0
                ));
                count += 1;
                within_20 += usize::from(gap <= 0.2);
                if total < 0.88 || newcomer < 0.25 || (background && gap > 0.3) {
                    missed.push(format!(
                        "{kind:?}, {one_way:?} one way, seed {seed:#x}: {a} and {b} B/s"
                    ));
                }
            }
        }
        println!(
            "{kind:?}: two independent downloads, the second from second 3; gap over seconds 8 to 18 by one-way delay: {}; within 20% on {within_20} of {count} (seed {seed:#x})",
            gaps.join(", ")
        );
        // Background: 90% of the paths; Standard: two thirds (see above).
        let (num, den) = if background { (9, 10) } else { (2, 3) };
        if within_20 * den < count * num {
            missed.push(format!(
                "{kind:?}: within 20% on only {within_20} of {count} paths"
            ));
        }
    }
    assert!(missed.is_empty(), "{missed:?}");
}

/// The bottleneck rate halves mid-transfer: within 2 s the sender sends no faster than the new
/// rate (plus 10%), and the drops at the bottleneck stay bounded.
#[test]
fn a_halved_bottleneck_is_followed_within_two_seconds() {
    const RATE: u64 = 4 << 20;
    for kind in [CongestionControl::default(), CongestionControl::Standard] {
        let seed = seed_from_env(0xba5e_0003);
        let size = 48 << 20;
        let data = object(size, seed);
        let link = LinkConfig::clean(Duration::from_millis(20));
        let down = link.clone().with_bottleneck(RATE, (RATE / 10) as usize);
        let start = Instant::now();
        let mut pair = common::one_shot_pair(
            seed,
            start,
            &data,
            ObjectId::md5_of(&data),
            down.clone(),
            link,
            config(kind),
        );
        let change = start + Duration::from_secs(4);
        assert_eq!(pair.run(u64::MAX, change), RunOutcome::Deadline);
        let dropped_before = pair.a_to_b.stats().queue_dropped;
        pair.a_to_b
            .set_config(down.with_bottleneck(RATE / 2, (RATE / 20) as usize));
        let sent = |pair: &Pair<_, _>| pair.a_to_b.stats().offered_bytes;
        assert_eq!(
            pair.run(u64::MAX, change + Duration::from_secs(2)),
            RunOutcome::Deadline
        );
        let (s0, dropped_2s) = (
            sent(&pair),
            pair.a_to_b.stats().queue_dropped - dropped_before,
        );
        assert_eq!(
            pair.run(u64::MAX, change + Duration::from_secs(4)),
            RunOutcome::Deadline
        );
        let rate = (sent(&pair) - s0) as f64 / 2.0;
        let dropped_4s = pair.a_to_b.stats().queue_dropped - dropped_before;
        println!(
            "{kind:?}: bottleneck 4 -> 2 MiB/s; seconds 2 to 4 after: sent {:.3} of the new rate; \
             bottleneck drops {dropped_2s} in the first 2 s, {dropped_4s} in 4 s (seed {seed:#x})",
            rate / (RATE / 2) as f64
        );
        assert!(
            rate <= 1.1 * (RATE / 2) as f64,
            "{kind:?} seed {seed:#x}: {rate}"
        );
        // Less than a quarter of a second's worth at the new rate.
        assert!(dropped_4s < RATE / 2 / 4 / 1200, "{kind:?}: {dropped_4s}");
    }
}

/// A udpferry download and a loss-based flow (CUBIC, as Linux's TCP and quinn use by default)
/// through one bottleneck with a 100 ms drop-tail queue; the CUBIC flow starts `cubic_from`
/// after the download. Returns the shares of the bottleneck over seconds 10 to 30:
/// (udpferry, CUBIC), and the queue drops.
fn against_cubic(
    seed: u64,
    kind: CongestionControl,
    one_way: Duration,
    cubic_from: Duration,
) -> (f64, f64, u64) {
    const RATE: u64 = 2 << 20;
    let start = Instant::now();
    let (server, client) = download(start, 1, object(96 << 20, seed), kind, seed + 7);
    let servers = Two::new(server, CubicSender::new(1200), start + cubic_from);
    let clients = Two::new(client, CubicReceiver::default(), start);
    let down = LinkConfig::clean(one_way).with_bottleneck(RATE, (RATE / 10) as usize);
    let mut pair = Pair::new(
        seed,
        start,
        servers,
        clients,
        down,
        LinkConfig::clean(one_way),
    );
    let mut at = |t: u64| {
        let outcome = pair.run(u64::MAX, start + Duration::from_secs(t));
        assert_eq!(outcome, RunOutcome::Deadline, "seed {seed:#x}");
        (pair.b.a.bytes_received(), pair.b.b.bytes_received)
    };
    let (u0, c0) = at(10);
    let (u1, c1) = at(30);
    let share = |b: u64| b as f64 / 20.0 / RATE as f64;
    (
        share(u1 - u0),
        share(c1 - c0),
        pair.a_to_b.stats().queue_dropped,
    )
}

/// A loss-based flow (CUBIC) in a 100 ms buffer fills it until it drops, so a model-based
/// flow's share is what its window holds there. Standard shares about evenly: each gets at
/// least 0.35 of the bottleneck over seconds 10 to 30, whichever starts first, at one-way delays
/// of 10, 20 and 40 ms (a window near one BDP would starve it: 0.13 to 0.20 at 1.1 BDP).
/// Background gives way to the CUBIC flow as it does to a game's traffic: CUBIC gets at least
/// 0.9. The shares are printed.
#[test]
fn standard_shares_a_deep_buffer_with_cubic_and_background_gives_way() {
    let seed = seed_from_env(0xba5e_0004);
    let mut lines = Vec::new();
    let mut missed = Vec::new();
    for kind in [CongestionControl::Standard, CongestionControl::default()] {
        for one_way in [10u64, 20, 40] {
            for cubic_from in [0u64, 3] {
                let (u, c, drops) = against_cubic(
                    seed,
                    kind,
                    Duration::from_millis(one_way),
                    Duration::from_secs(cubic_from),
                );
                let line = format!(
                    "{kind:?}, {one_way} ms one way, CUBIC from second {cubic_from}: udpferry {u:.3}, CUBIC {c:.3} of the bottleneck, {drops} queue drops"
                );
                let shared = if kind == CongestionControl::Standard {
                    u >= 0.35 && c >= 0.35
                } else {
                    c >= 0.9
                };
                if !shared {
                    missed.push(format!("{line} (seed {seed:#x})"));
                }
                lines.push(line);
            }
        }
    }
    println!("{}", lines.join("\n"));
    assert!(missed.is_empty(), "{missed:#?}");
}
