//! Rate limits, fairness and coexistence with game traffic, measured in the simulator (virtual
//! time, so the figures are deterministic). Print them with
//! `cargo test --release --test rates -- --nocapture`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use udpferry::core::{
    CongestionControl, Endpoint, EndpointConfig, Event, NoObjects, RangeSet, TransferId,
};
use udpferry::ObjectId;
use udpferry_sim::{Direction, EndpointPeer, GameTraffic, LinkConfig, Pair, Rng, RunOutcome};

type Maps = HashMap<ObjectId, Arc<[u8]>>;
type Server = EndpointPeer<Maps, Vec<u8>>;
type Client = EndpointPeer<NoObjects, Vec<u8>>;

const SERVER: ([u8; 4], u16) = ([10, 0, 0, 1], 7878);
const CLIENT: ([u8; 4], u16) = ([10, 0, 0, 2], 5000);

fn objects(count: usize, size: usize) -> Vec<(ObjectId, Vec<u8>)> {
    (0..count)
        .map(|i| {
            let mut d = vec![0u8; size];
            Rng::new(i as u64 + 1).fill_bytes(&mut d);
            (ObjectId::md5_of(&d), d)
        })
        .collect()
}

struct Run {
    pair: Pair<Server, Client>,
    start: Instant,
    /// (time, bytes) of every datagram the server sent.
    sent: Rc<RefCell<Vec<(Instant, usize)>>>,
    ids: Vec<(ObjectId, TransferId)>,
}

fn setup(
    objs: &[(ObjectId, Vec<u8>)],
    server_config: EndpointConfig,
    down: LinkConfig,
    up: LinkConfig,
) -> Run {
    let maps: Maps = objs
        .iter()
        .map(|(id, d)| (*id, Arc::from(d.as_slice())))
        .collect();
    let server = EndpointPeer::new(Endpoint::new(server_config, maps), SocketAddr::from(CLIENT));
    let client = EndpointPeer::new(
        Endpoint::new(
            EndpointConfig {
                seed: 9,
                ..EndpointConfig::default()
            },
            NoObjects,
        ),
        SocketAddr::from(SERVER),
    );
    let start = Instant::now();
    let mut pair = Pair::new(1, start, server, client, down, up);
    let sent = Rc::new(RefCell::new(Vec::new()));
    let log = sent.clone();
    pair.set_observer(Box::new(move |t, dir, d| {
        if dir == Direction::AtoB {
            log.borrow_mut().push((t, d.len()));
        }
    }));
    Run {
        pair,
        start,
        sent,
        ids: Vec::new(),
    }
}

impl Run {
    fn fetch(&mut self, id: ObjectId) -> TransferId {
        let now = self.pair.now;
        let t = self.pair.b.endpoint.fetch(
            now,
            SocketAddr::from(SERVER),
            id,
            &RangeSet::new(),
            Vec::new(),
        );
        self.ids.push((id, t));
        t
    }

    fn run_until(&mut self, t: Instant) {
        let outcome = self.pair.run(u64::MAX, t);
        assert!(
            matches!(outcome, RunOutcome::Deadline | RunOutcome::BothFinished),
            "{outcome:?}"
        );
    }

    fn run_to_end(&mut self) {
        let outcome = self
            .pair
            .run(u64::MAX, self.start + Duration::from_secs(3600));
        assert_eq!(outcome, RunOutcome::BothFinished);
    }

    /// When each transfer (by object) completed on the client.
    fn completions(&self) -> HashMap<TransferId, Instant> {
        self.pair
            .b
            .events
            .iter()
            .filter(|(_, e)| matches!(e.event, Event::Completed(_)))
            .map(|(t, e)| (e.transfer, *t))
            .collect()
    }

    fn received(&self, t: TransferId) -> u64 {
        self.pair
            .b
            .endpoint
            .received_bytes(t)
            .map_or(0, |r| r.covered())
    }

    /// Server bytes sent in each whole second after the first, until `end`.
    fn per_second(&self, end: Instant) -> Vec<u64> {
        let mut out = Vec::new();
        let mut from = self.start + Duration::from_secs(1);
        while from + Duration::from_secs(1) <= end {
            let to = from + Duration::from_secs(1);
            out.push(
                self.sent
                    .borrow()
                    .iter()
                    .filter(|(t, _)| *t >= from && *t < to)
                    .map(|(_, n)| *n as u64)
                    .sum(),
            );
            from = to;
        }
        out
    }
}

fn clean() -> LinkConfig {
    LinkConfig::clean(Duration::from_millis(10))
}

#[test]
fn a_rate_cap_holds_in_every_second_and_is_used() {
    const R: u64 = 1 << 20;
    for (name, config) in [
        (
            "endpoint cap",
            EndpointConfig {
                rate_limit_bytes_per_sec: R,
                ..EndpointConfig::default()
            },
        ),
        ("per-transfer cap", {
            let mut c = EndpointConfig::default();
            c.transfer.max_rate_bytes_per_sec = R;
            c
        }),
    ] {
        let objs = objects(1, 12 << 20);
        let mut run = setup(&objs, config, clean(), clean());
        run.fetch(objs[0].0);
        run.run_to_end();
        let done = run.completions().values().copied().max().unwrap();
        let seconds = run.per_second(done);
        let worst = *seconds.iter().max().unwrap();
        let first_ten: u64 = run
            .sent
            .borrow()
            .iter()
            .filter(|(t, _)| *t < run.start + Duration::from_secs(10))
            .map(|(_, n)| *n as u64)
            .sum();
        println!(
            "{name}: R = {R} B/s; busiest second {worst} B ({:.3} R); first 10 s {first_ten} B ({:.3} R/s)",
            worst as f64 / R as f64,
            first_ten as f64 / (10 * R) as f64
        );
        assert!(worst as f64 <= 1.05 * R as f64, "{name}: {seconds:?}");
        assert!(
            first_ten as f64 >= 0.95 * (10 * R) as f64,
            "{name}: only {first_ten} B in 10 s"
        );
    }
}

fn jain(xs: &[f64]) -> f64 {
    let sum: f64 = xs.iter().sum();
    let squares: f64 = xs.iter().map(|x| x * x).sum();
    sum * sum / (xs.len() as f64 * squares)
}

#[test]
fn eight_transfers_share_an_uplink_cap_fairly() {
    const R: u64 = 2 << 20;
    let objs = objects(8, 4 << 20);
    let config = EndpointConfig {
        rate_limit_bytes_per_sec: R,
        ..EndpointConfig::default()
    };
    let mut run = setup(&objs, config, clean(), clean());
    let ids: Vec<TransferId> = objs.iter().map(|(id, _)| run.fetch(*id)).collect();
    // Common lifetime: from when all run (t = 1 s, after the handshakes) until the first ends.
    run.run_until(run.start + Duration::from_secs(1));
    let before: Vec<u64> = ids.iter().map(|t| run.received(*t)).collect();
    let mut end = run.start + Duration::from_secs(1);
    loop {
        end += Duration::from_millis(100);
        run.run_until(end);
        if !run.completions().is_empty() {
            break;
        }
        assert!(end < run.start + Duration::from_secs(60));
    }
    // Step back to the last instant before the first completion.
    let shares: Vec<f64> = ids
        .iter()
        .zip(&before)
        .map(|(t, b)| run.received(*t).saturating_sub(*b) as f64)
        .collect();
    run.run_to_end();
    let index = jain(&shares);
    let seconds = run.per_second(run.completions().values().copied().max().unwrap());
    let worst = *seconds.iter().max().unwrap();
    println!("8 transfers under {R} B/s: Jain index {index:.4}, busiest second {worst} B ({:.3} R), shares {shares:?}", worst as f64 / R as f64);
    assert!(index >= 0.98, "{shares:?}");
    assert!(worst as f64 <= 1.05 * R as f64, "{seconds:?}");
}

struct Coexistence {
    game_p95_added: Duration,
    goodput: f64,
    capacity_left: f64,
}

fn with_game_flow(kind: CongestionControl, loss: f64) -> Coexistence {
    const CAPACITY: u64 = 1_000_000;
    let latency = Duration::from_millis(20);
    let bottleneck = LinkConfig::clean(latency)
        .with_bottleneck(CAPACITY, (CAPACITY / 5) as usize)
        .with_loss(loss);
    let objs = objects(1, 8 << 20);
    let mut config = EndpointConfig::default();
    config.transfer.congestion = kind;
    let mut run = setup(&objs, config.clone(), bottleneck.clone(), bottleneck);
    run.pair.b.endpoint = Endpoint::new(EndpointConfig { seed: 9, ..config }, NoObjects);
    let tick = Duration::from_micros(16_667);
    run.pair.a.game = Some(GameTraffic::new(tick, 100, run.start));
    run.pair.b.game = Some(GameTraffic::new(tick, 100, run.start));
    let t = run.fetch(objs[0].0);
    run.run_to_end();
    let done = run.completions()[&t];
    let game = run.pair.b.game.as_ref().unwrap();
    // The game flow's one-way delay above the path's 20 ms over the whole download, start-up
    // included.
    let p95 = game.delay_quantile(0.95, run.start..done).unwrap();
    let added = p95.saturating_sub(latency);
    let goodput = (8 << 20) as f64 / (done - run.start).as_secs_f64();
    // Both game flows cross the bottleneck in this direction only for the server's packets.
    let game_rate = 100.0 / tick.as_secs_f64();
    Coexistence {
        game_p95_added: added,
        goodput,
        capacity_left: CAPACITY as f64 - game_rate,
    }
}

/// Issue 15: Background keeps the game flow's p95 added delay within 35 ms over the whole
/// download (start-up included), and still takes at least 0.85 of what the game leaves, on a
/// clean path and with 2% random loss.
#[test]
fn background_mode_keeps_game_latency_and_still_fills_the_link() {
    let target = Duration::from_millis(25);
    for loss in [0.0, 0.02] {
        let bg = with_game_flow(CongestionControl::Background { target }, loss);
        let std = with_game_flow(CongestionControl::Standard, loss);
        for (name, c) in [("background", &bg), ("standard", &std)] {
            println!(
                "{name}, {:.0}% loss: game flow p95 added delay {:.1} ms, download goodput {:.0} B/s = {:.3} of the {:.0} B/s the game leaves",
                loss * 100.0,
                c.game_p95_added.as_secs_f64() * 1e3,
                c.goodput,
                c.goodput / c.capacity_left,
                c.capacity_left
            );
        }
        assert!(
            bg.game_p95_added <= Duration::from_millis(35),
            "background, {loss} loss: {:?}",
            bg.game_p95_added
        );
        assert!(
            bg.goodput >= 0.85 * bg.capacity_left,
            "background, {loss} loss: goodput {}",
            bg.goodput
        );
        assert!(
            std.goodput >= 0.85 * std.capacity_left,
            "standard, {loss} loss: goodput {}",
            std.goodput
        );
    }
}

#[test]
fn two_downloads_through_one_bottleneck_converge() {
    let bottleneck =
        LinkConfig::clean(Duration::from_millis(20)).with_bottleneck(1_000_000, 200_000);
    let objs = objects(2, 24 << 20);
    let mut run = setup(&objs, EndpointConfig::default(), bottleneck, clean());
    let a = run.fetch(objs[0].0);
    run.run_until(run.start + Duration::from_secs(3));
    let b = run.fetch(objs[1].0);
    // Measured over 10 s, starting 2 s after the second download began.
    let from = run.start + Duration::from_secs(5);
    run.run_until(from);
    let (a0, b0) = (run.received(a), run.received(b));
    run.run_until(from + Duration::from_secs(10));
    let (ra, rb) = (
        (run.received(a) - a0) as f64 / 10.0,
        (run.received(b) - b0) as f64 / 10.0,
    );
    let gap = (ra - rb).abs() / ra.max(rb);
    println!(
        "two downloads, one bottleneck: {ra:.0} B/s and {rb:.0} B/s (gap {:.1}%)",
        gap * 100.0
    );
    assert!(gap <= 0.2, "{ra} vs {rb}");
}

/// Wakes only on a coarse timer, like a driver sleeping through `SO_RCVTIMEO` (jiffies).
struct Coarse<P: udpferry_sim::Peer>(P, Instant, Duration);

impl<P: udpferry_sim::Peer> udpferry_sim::Peer for Coarse<P> {
    fn handle_datagram(&mut self, now: Instant, d: &[u8]) {
        self.0.handle_datagram(now, d)
    }
    fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        self.0.poll_transmit(now, buf)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        let t = self.0.poll_timeout()?;
        let since = t.saturating_duration_since(self.1).as_nanos();
        let g = self.2.as_nanos();
        Some(self.1 + Duration::from_nanos((since.div_ceil(g) * g) as u64))
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.0.handle_timeout(now)
    }
    fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

/// Four transfers at a 512 KiB/s cap each under a 2 MiB/s uplink, with a server that wakes only
/// on a 1 ms timer (the driver's sleep slice): the pacers release what they gathered while
/// asleep as small batches, so the rates hold.
#[test]
fn caps_hold_when_the_driver_wakes_on_a_coarse_timer() {
    let objs = objects(4, 2 << 20);
    let mut config = EndpointConfig {
        rate_limit_bytes_per_sec: 2 << 20,
        ..EndpointConfig::default()
    };
    config.transfer.max_rate_bytes_per_sec = 512 << 10;
    let maps: Maps = objs
        .iter()
        .map(|(id, d)| (*id, Arc::from(d.as_slice())))
        .collect();
    let server: Server = EndpointPeer::new(Endpoint::new(config, maps), SocketAddr::from(CLIENT));
    let mut client: Client = EndpointPeer::new(
        Endpoint::new(EndpointConfig::default(), NoObjects),
        SocketAddr::from(SERVER),
    );
    let start = Instant::now();
    for (id, _) in &objs {
        client.endpoint.fetch(
            start,
            SocketAddr::from(SERVER),
            *id,
            &RangeSet::new(),
            Vec::new(),
        );
    }
    let l = LinkConfig::clean(Duration::from_micros(50));
    let mut pair = Pair::new(
        1,
        start,
        Coarse(server, start, Duration::from_millis(1)),
        client,
        l.clone(),
        l,
    );
    pair.run(u64::MAX, start + Duration::from_secs(100));
    let c: Vec<f64> = pair
        .b
        .events
        .iter()
        .filter(|(_, e)| matches!(e.event, Event::Completed(_)))
        .map(|(t, _)| (*t - start).as_secs_f64())
        .collect();
    // 2 MiB plus 3% headers at 512 KiB/s: 4.12 s.
    println!("4 x 2 MiB at 512 KiB/s each with a 1 ms timer: done at {c:?} s");
    assert_eq!(c.len(), 4);
    assert!(c.iter().all(|t| *t <= 4.12 * 1.05), "{c:?}");
}

#[test]
fn a_late_joiner_gets_its_fair_share_within_two_seconds() {
    const R: u64 = 2 << 20;
    let objs = objects(2, 12 << 20);
    let config = EndpointConfig {
        rate_limit_bytes_per_sec: R,
        ..EndpointConfig::default()
    };
    let mut run = setup(&objs, config, clean(), clean());
    let first = run.fetch(objs[0].0);
    run.run_until(run.start + Duration::from_secs(3));
    let late = run.fetch(objs[1].0);
    let joined = run.pair.now;
    run.run_until(joined + Duration::from_secs(2));
    let (a0, b0) = (run.received(first), run.received(late));
    run.run_until(joined + Duration::from_secs(3));
    let (a, b) = (
        (run.received(first) - a0) as f64,
        (run.received(late) - b0) as f64,
    );
    println!(
        "late joiner, second 2 to 3 after joining: {b:.0} B/s vs the first transfer's {a:.0} B/s"
    );
    assert!(b >= 0.9 * a, "{b} vs {a}");
}
