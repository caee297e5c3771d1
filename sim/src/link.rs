//! One direction of an emulated network path.
//!
//! A [`Link`] takes datagrams at a virtual time with [`Link::send`], applies
//! the impairments described by its [`LinkConfig`] (loss, burst loss, MTU,
//! bottleneck queue, corruption, mutation, duplication, latency and jitter) and hands
//! them back, in delivery-time order, through [`Link::deliver`]. All random
//! choices come from the link's own [`Rng`], so a link is exactly
//! reproducible from its seed and its inputs.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use super::rng::Rng;
use udpferry::wire::TRAILER_LEN;

/// Nanoseconds per second, for exact serialisation-time arithmetic.
const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Parameters of the Gilbert-Elliott two-state burst-loss model.
///
/// The channel is either *good* or *bad*. Before each datagram the state may
/// change (good to bad with `p_good_to_bad`, bad to good with
/// `p_bad_to_good`); the datagram is then lost with the current state's loss
/// probability. Bursts of bad state last `1 / p_bad_to_good` datagrams on
/// average. Put it in [`LinkConfig::burst_loss`] to emulate Wi-Fi or mobile
/// style clustered loss.
#[derive(Clone, Debug)]
pub struct GilbertElliott {
    /// Per-datagram probability of moving from the good to the bad state.
    pub p_good_to_bad: f64,
    /// Per-datagram probability of moving from the bad to the good state.
    pub p_bad_to_good: f64,
    /// Loss probability while in the good state (often 0).
    pub loss_in_good: f64,
    /// Loss probability while in the bad state (often 1).
    pub loss_in_bad: f64,
}

/// Impairments applied by one [`Link`] (one direction of a path).
///
/// Start from [`LinkConfig::default`] (a clean 10 ms link) or
/// [`LinkConfig::clean`] and chain the `with_*` builders. Probabilities
/// outside `[0, 1]` are clamped in effect (`<= 0` never, `>= 1` always; NaN
/// never).
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// One-way propagation delay added to every datagram (default 10 ms).
    pub latency: Duration,
    /// Extra uniformly random delay in `[0, jitter]` per datagram; a non-zero
    /// value reorders datagrams (default 0).
    pub jitter: Duration,
    /// Independent random loss probability per datagram (default 0).
    pub loss: f64,
    /// Two-state burst loss applied in addition to `loss` (default none).
    pub burst_loss: Option<GilbertElliott>,
    /// Probability that a datagram is delivered twice; the second copy gets
    /// its own jitter (default 0).
    pub duplicate: f64,
    /// Probability that 1 to 3 distinct random bits of a datagram are flipped
    /// (default 0). Empty datagrams are never corrupted.
    pub corrupt: f64,
    /// Probability that 1 to 3 distinct random bits of a datagram are flipped
    /// *before* its 4-byte CRC32 trailer and the trailer is then recomputed
    /// (CRC32 of everything before it, big-endian, as in docs/PROTOCOL.md
    /// section 1.3), so the damage passes the checksum (default 0). Models a
    /// buggy middlebox, a broken NIC offload or an on-path attacker.
    /// Datagrams of 4 bytes or fewer are never mutated.
    pub mutate: f64,
    /// Bottleneck serialisation rate in bytes per second; `None` means
    /// infinite (default). `Some(0)` carries nothing: every datagram is
    /// counted as queue-dropped.
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// Bottleneck queue capacity in bytes, counting every datagram whose
    /// serialisation has not finished; a datagram that would exceed it is
    /// tail-dropped. Only used with `bandwidth_bytes_per_sec` (default 256 KiB).
    pub queue_bytes: usize,
    /// Datagrams larger than this many bytes are dropped (default 65 535).
    pub mtu: usize,
}

impl Default for LinkConfig {
    /// A clean link: 10 ms latency and no impairments.
    fn default() -> Self {
        LinkConfig {
            latency: Duration::from_millis(10),
            jitter: Duration::ZERO,
            loss: 0.0,
            burst_loss: None,
            duplicate: 0.0,
            corrupt: 0.0,
            mutate: 0.0,
            bandwidth_bytes_per_sec: None,
            queue_bytes: 256 * 1024,
            mtu: 65_535,
        }
    }
}

impl LinkConfig {
    /// A link with the given one-way `latency` and no impairments.
    pub fn clean(latency: Duration) -> Self {
        LinkConfig {
            latency,
            ..LinkConfig::default()
        }
    }

    /// Sets the independent random loss probability.
    pub fn with_loss(mut self, p: f64) -> Self {
        self.loss = p;
        self
    }

    /// Sets the maximum extra random delay (which reorders datagrams).
    pub fn with_jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// Sets the probability that a datagram is delivered twice.
    pub fn with_duplicate(mut self, p: f64) -> Self {
        self.duplicate = p;
        self
    }

    /// Sets the probability that a datagram has 1 to 3 bits flipped.
    pub fn with_corrupt(mut self, p: f64) -> Self {
        self.corrupt = p;
        self
    }

    /// Sets the probability that a datagram has 1 to 3 bits flipped before
    /// its CRC32 trailer and the trailer fixed up, so it still passes the
    /// checksum (see [`LinkConfig::mutate`]).
    pub fn with_mutate(mut self, p: f64) -> Self {
        self.mutate = p;
        self
    }

    /// Enables Gilbert-Elliott burst loss (in addition to `loss`).
    pub fn with_burst_loss(mut self, model: GilbertElliott) -> Self {
        self.burst_loss = Some(model);
        self
    }

    /// Adds a bottleneck of `bytes_per_sec` with a tail-drop queue of
    /// `queue_bytes`.
    pub fn with_bottleneck(mut self, bytes_per_sec: u64, queue_bytes: usize) -> Self {
        self.bandwidth_bytes_per_sec = Some(bytes_per_sec);
        self.queue_bytes = queue_bytes;
        self
    }

    /// Sets the maximum datagram size the link carries.
    pub fn with_mtu(mut self, mtu: usize) -> Self {
        self.mtu = mtu;
        self
    }
}

/// Counters kept by a [`Link`]; read them with [`Link::stats`] to check what
/// the network did to a transfer.
///
/// Every offered datagram ends up in exactly one of `oversize`, `lost`,
/// `queue_dropped`, or is accepted (and then eventually delivered, once or,
/// if `duplicated`, twice).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Datagrams passed to [`Link::send`].
    pub offered: u64,
    /// Bytes passed to [`Link::send`].
    pub offered_bytes: u64,
    /// Datagrams handed out by [`Link::deliver`] (duplicates included).
    pub delivered: u64,
    /// Bytes handed out by [`Link::deliver`] (duplicates included).
    pub delivered_bytes: u64,
    /// Datagrams dropped by random or burst loss.
    pub lost: u64,
    /// Datagrams tail-dropped because the bottleneck queue was full.
    pub queue_dropped: u64,
    /// Extra copies scheduled by duplication.
    pub duplicated: u64,
    /// Accepted datagrams whose bits were flipped.
    pub corrupted: u64,
    /// Accepted datagrams whose bits before the CRC32 trailer were flipped
    /// and whose trailer was recomputed (they pass the checksum).
    pub mutated: u64,
    /// Datagrams dropped for exceeding the MTU.
    pub oversize: u64,
}

/// A datagram travelling on the link, ordered by (delivery time, send order).
#[derive(Debug)]
struct InFlight {
    at: Instant,
    seq: u64,
    data: Vec<u8>,
}

impl PartialEq for InFlight {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for InFlight {}

impl PartialOrd for InFlight {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for InFlight {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// One direction of a simulated network path with virtual time.
///
/// Call [`Link::send`] when a peer transmits, ask [`Link::next_delivery`] when
/// the next datagram arrives, and pop arrivals with [`Link::deliver`]. The
/// link never reads a real clock: every method takes the current virtual
/// time.
#[derive(Debug)]
pub struct Link {
    config: LinkConfig,
    rng: Rng,
    stats: LinkStats,
    in_flight: BinaryHeap<Reverse<InFlight>>,
    next_seq: u64,
    /// Gilbert-Elliott state: `true` while in the bad state.
    burst_bad: bool,
    /// Accepted datagrams (departure time, length) that may still be queued,
    /// in departure order.
    queue: VecDeque<(Instant, usize)>,
    /// Sum of the lengths in `queue`.
    queued_bytes: usize,
    /// Start of the current busy period of the bottleneck.
    busy_anchor: Option<Instant>,
    /// Bytes serialised since `busy_anchor`; departures are computed from
    /// this total so rounding never accumulates.
    busy_bytes: u128,
    /// When the last accepted datagram finishes serialisation.
    last_departure: Option<Instant>,
}

impl Link {
    /// Creates a link with the given impairments, drawing all randomness from
    /// `rng` (give each link its own stream, e.g. via [`Rng::fork`]).
    pub fn new(config: LinkConfig, rng: Rng) -> Self {
        Link {
            config,
            rng,
            stats: LinkStats::default(),
            in_flight: BinaryHeap::new(),
            next_seq: 0,
            burst_bad: false,
            queue: VecDeque::new(),
            queued_bytes: 0,
            busy_anchor: None,
            busy_bytes: 0,
            last_departure: None,
        }
    }

    /// Offers `datagram` to the link at virtual time `now`.
    ///
    /// The datagram is subjected, in order, to random and burst loss (the
    /// Gilbert-Elliott state steps once per datagram), the MTU check, the
    /// bottleneck queue (departure = max(now, previous departure) + len /
    /// bandwidth, tail drop if the bytes still awaiting departure would
    /// exceed `queue_bytes`), corruption, mutation and duplication, and is then
    /// scheduled for delivery at departure + latency + jitter (a duplicate
    /// gets its own jitter). Call with non-decreasing `now`.
    pub fn send(&mut self, now: Instant, datagram: &[u8]) {
        let len = datagram.len();
        self.stats.offered += 1;
        self.stats.offered_bytes = self.stats.offered_bytes.saturating_add(len as u64);

        // Always draw the loss decisions so the burst state evolves with
        // every datagram, whatever happens to this one afterwards.
        let lost = self.draw_loss();
        if len > self.config.mtu {
            self.stats.oversize += 1;
            return;
        }
        if lost {
            self.stats.lost += 1;
            return;
        }
        let Some(departure) = self.admit(now, len) else {
            self.stats.queue_dropped += 1;
            return;
        };

        let mut data = datagram.to_vec();
        if self.rng.chance(self.config.corrupt) && !data.is_empty() {
            flip_bits(&mut self.rng, &mut data);
            self.stats.corrupted += 1;
        }
        if self.rng.chance(self.config.mutate) && mutate(&mut self.rng, &mut data) {
            self.stats.mutated += 1;
        }
        let duplicate = self.rng.chance(self.config.duplicate).then(|| data.clone());
        if !self.schedule(departure, data) {
            // Delivery time not representable: the datagram never arrives.
            self.stats.lost += 1;
            return;
        }
        if let Some(copy) = duplicate {
            if self.schedule(departure, copy) {
                self.stats.duplicated += 1;
            }
        }
    }

    /// Returns when the earliest datagram in flight arrives, or `None` if the
    /// link is empty. Use it to decide how far virtual time may jump.
    pub fn next_delivery(&self) -> Option<Instant> {
        self.in_flight.peek().map(|Reverse(f)| f.at)
    }

    /// Removes and returns one datagram whose delivery time is `<= now`, the
    /// earliest first (ties in send order), or `None` if none is due yet.
    ///
    /// Call repeatedly until it returns `None` to receive everything due.
    pub fn deliver(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.next_delivery()? > now {
            return None;
        }
        let Reverse(item) = self.in_flight.pop()?;
        self.stats.delivered += 1;
        self.stats.delivered_bytes = self
            .stats
            .delivered_bytes
            .saturating_add(item.data.len() as u64);
        Some(item.data)
    }

    /// Returns the bottleneck queueing delay a datagram sent at `now` would
    /// wait before its own serialisation starts (zero without a bottleneck).
    pub fn queue_delay(&self, now: Instant) -> Duration {
        match (self.config.bandwidth_bytes_per_sec, self.last_departure) {
            (Some(bw), Some(last)) if bw > 0 => last.saturating_duration_since(now),
            _ => Duration::ZERO,
        }
    }

    /// Returns the link's counters so far.
    pub fn stats(&self) -> &LinkStats {
        &self.stats
    }

    /// Returns the impairments currently applied.
    pub fn config(&self) -> &LinkConfig {
        &self.config
    }

    /// Replaces the impairments (e.g. to make a path worse mid-test).
    ///
    /// Datagrams already in flight keep their delivery times; the burst-loss
    /// state is kept; datagrams still in the bottleneck queue keep their
    /// departures and new ones are serialised after them at the new rate.
    pub fn set_config(&mut self, config: LinkConfig) {
        if config.bandwidth_bytes_per_sec != self.config.bandwidth_bytes_per_sec {
            self.busy_anchor = self.last_departure;
            self.busy_bytes = 0;
        }
        self.config = config;
    }

    /// Steps the Gilbert-Elliott state and draws the loss decision.
    fn draw_loss(&mut self) -> bool {
        let random = self.rng.chance(self.config.loss);
        let burst = match &self.config.burst_loss {
            Some(ge) => {
                let flip = if self.burst_bad {
                    ge.p_bad_to_good
                } else {
                    ge.p_good_to_bad
                };
                if self.rng.chance(flip) {
                    self.burst_bad = !self.burst_bad;
                }
                let p = if self.burst_bad {
                    ge.loss_in_bad
                } else {
                    ge.loss_in_good
                };
                self.rng.chance(p)
            }
            None => false,
        };
        random || burst
    }

    /// Passes a datagram of `len` bytes through the bottleneck at `now`,
    /// returning its departure time or `None` if it is tail-dropped.
    fn admit(&mut self, now: Instant, len: usize) -> Option<Instant> {
        let bw = match self.config.bandwidth_bytes_per_sec {
            None => return Some(now),
            Some(0) => return None,
            Some(bw) => bw,
        };
        while let Some(&(departure, l)) = self.queue.front() {
            if departure > now {
                break;
            }
            self.queue.pop_front();
            self.queued_bytes = self.queued_bytes.saturating_sub(l);
        }
        if self.queued_bytes.saturating_add(len) > self.config.queue_bytes {
            return None;
        }
        let busy = matches!(self.last_departure, Some(d) if d > now);
        let (anchor, base) = match (busy, self.busy_anchor) {
            (true, Some(anchor)) => (anchor, self.busy_bytes),
            _ => (now, 0),
        };
        let bytes = base.saturating_add(len as u128);
        let nanos = bytes.saturating_mul(NANOS_PER_SEC).div_ceil(u128::from(bw));
        let departure = add_nanos(anchor, nanos)?;
        self.busy_anchor = Some(anchor);
        self.busy_bytes = bytes;
        self.last_departure = Some(departure);
        self.queue.push_back((departure, len));
        self.queued_bytes = self.queued_bytes.saturating_add(len);
        Some(departure)
    }

    /// Schedules `data` for delivery at departure + latency + jitter; returns
    /// `false` if that time overflows `Instant`.
    fn schedule(&mut self, departure: Instant, data: Vec<u8>) -> bool {
        let jitter_max = u64::try_from(self.config.jitter.as_nanos()).unwrap_or(u64::MAX);
        let jitter = if jitter_max == 0 {
            0
        } else {
            self.rng.gen_range(0, jitter_max.saturating_add(1))
        };
        let at = departure
            .checked_add(self.config.latency)
            .and_then(|t| t.checked_add(Duration::from_nanos(jitter)));
        let Some(at) = at else {
            return false;
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight.push(Reverse(InFlight { at, seq, data }));
        true
    }
}

/// Flips 1 to 3 distinct random bits of `data`, drawn from `rng` (nothing when it is empty).
fn flip_bits(rng: &mut Rng, data: &mut [u8]) {
    let bits = (data.len() as u64).saturating_mul(8);
    let n = rng.gen_range(1, 4).min(bits) as usize;
    // Choose `n` distinct bit positions: draw an index among the bits not
    // yet chosen and map it past the chosen ones (kept sorted).
    let mut chosen = [0u64; 3];
    for i in 0..n {
        let mut r = rng.gen_range(0, bits - i as u64);
        for &c in &chosen[..i] {
            if r >= c {
                r += 1;
            }
        }
        chosen[i] = r;
        let mut j = i;
        while j > 0 && chosen[j - 1] > chosen[j] {
            chosen.swap(j - 1, j);
            j -= 1;
        }
    }
    for &bit in &chosen[..n] {
        if let Some(byte) = data.get_mut((bit / 8) as usize) {
            *byte ^= 1 << (bit % 8);
        }
    }
}

/// Damages `datagram` so that it still passes its checksum, as [`LinkConfig::mutate`] does:
/// flips 1 to 3 distinct random bits (from `rng`) before the 4-byte CRC32 trailer and rewrites
/// the trailer (CRC32 of everything before it, big-endian). Returns `false`, changing nothing,
/// for a datagram with nothing before a trailer (4 bytes or fewer).
///
/// For anything that carries udpferry datagrams and wants to play a buggy middlebox or an
/// on-path attacker (the simulator's links, a test relay between real sockets).
pub fn mutate(rng: &mut Rng, datagram: &mut [u8]) -> bool {
    let Some(body) = datagram.len().checked_sub(TRAILER_LEN).filter(|&b| b > 0) else {
        return false;
    };
    flip_bits(rng, &mut datagram[..body]);
    let crc = crc32fast::hash(&datagram[..body]);
    datagram[body..].copy_from_slice(&crc.to_be_bytes());
    true
}

/// `t + nanos`, or `None` if that is not representable.
fn add_nanos(t: Instant, nanos: u128) -> Option<Instant> {
    let secs = u64::try_from(nanos / NANOS_PER_SEC).ok()?;
    let sub = (nanos % NANOS_PER_SEC) as u32;
    t.checked_add(Duration::new(secs, sub))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn numbered(i: u32) -> [u8; 4] {
        i.to_le_bytes()
    }

    fn number(d: &[u8]) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&d[..4]);
        u32::from_le_bytes(b)
    }

    /// Pops everything, returning (arrival time, bytes) in delivery order.
    fn drain_all(link: &mut Link) -> Vec<(Instant, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(at) = link.next_delivery() {
            let d = link.deliver(at).expect("due datagram must be delivered");
            out.push((at, d));
        }
        out
    }

    fn assert_accounting(s: &LinkStats) {
        let accepted = s.offered - s.lost - s.oversize - s.queue_dropped;
        assert_eq!(s.delivered, accepted + s.duplicated, "{s:?}");
    }

    #[test]
    fn clean_link_delivers_after_latency() {
        let t0 = Instant::now();
        let mut link = Link::new(LinkConfig::default(), Rng::new(1));
        assert_eq!(link.next_delivery(), None);
        link.send(t0, b"hello");
        assert_eq!(link.next_delivery(), Some(t0 + 10 * MS));
        assert_eq!(link.deliver(t0), None);
        assert_eq!(link.deliver(t0 + 10 * MS - Duration::from_nanos(1)), None);
        assert_eq!(link.deliver(t0 + 10 * MS).as_deref(), Some(&b"hello"[..]));
        assert_eq!(link.deliver(t0 + 20 * MS), None);
        let s = link.stats();
        assert_eq!((s.offered, s.offered_bytes), (1, 5));
        assert_eq!((s.delivered, s.delivered_bytes), (1, 5));
        assert_eq!(link.queue_delay(t0), Duration::ZERO);
    }

    #[test]
    fn loss_rate_matches_config() {
        let t0 = Instant::now();
        let mut link = Link::new(LinkConfig::default().with_loss(0.1), Rng::new(2));
        for i in 0..100_000 {
            link.send(t0, &numbered(i));
        }
        let delivered = drain_all(&mut link).len();
        // Expected 90 000 delivered, standard deviation about 95.
        assert!((89_500..=90_500).contains(&delivered), "{delivered}");
        assert_eq!(link.stats().lost, 100_000 - delivered as u64);
        assert_accounting(link.stats());
    }

    /// Lengths of runs of consecutive lost datagrams out of `n` sent.
    fn loss_runs(config: LinkConfig, seed: u64, n: u32) -> Vec<u32> {
        let t0 = Instant::now();
        let mut link = Link::new(config, Rng::new(seed));
        for i in 0..n {
            link.send(t0, &numbered(i));
        }
        let mut received = vec![false; n as usize];
        for (_, d) in drain_all(&mut link) {
            received[number(&d) as usize] = true;
        }
        let mut runs = Vec::new();
        let mut current = 0;
        for r in received {
            if r {
                if current > 0 {
                    runs.push(current);
                }
                current = 0;
            } else {
                current += 1;
            }
        }
        if current > 0 {
            runs.push(current);
        }
        runs
    }

    #[test]
    fn gilbert_elliott_produces_bursts() {
        let ge = GilbertElliott {
            p_good_to_bad: 0.02,
            p_bad_to_good: 0.25,
            loss_in_good: 0.0,
            loss_in_bad: 1.0,
        };
        let runs = loss_runs(LinkConfig::default().with_burst_loss(ge), 3, 100_000);
        let lost: u32 = runs.iter().sum();
        let mean = f64::from(lost) / runs.len() as f64;
        // Bursts last 1 / p_bad_to_good = 4 datagrams on average.
        assert!((3.6..=4.4).contains(&mean), "mean burst {mean}");
        // Stationary bad fraction is 0.02 / 0.27, about 7.4 %.
        let rate = f64::from(lost) / 100_000.0;
        assert!((0.064..=0.084).contains(&rate), "loss rate {rate}");

        // Independent loss at the same rate gives runs of about 1.08.
        let runs = loss_runs(LinkConfig::default().with_loss(0.074), 3, 100_000);
        let lost: u32 = runs.iter().sum();
        let mean = f64::from(lost) / runs.len() as f64;
        assert!(mean < 1.2, "independent loss mean run {mean}");
    }

    #[test]
    fn duplication_count() {
        let t0 = Instant::now();
        let mut link = Link::new(LinkConfig::default().with_duplicate(0.1), Rng::new(4));
        for i in 0..100_000 {
            link.send(t0, &numbered(i));
        }
        let out = drain_all(&mut link);
        let dups = link.stats().duplicated;
        // Expected 10 000 duplicates, standard deviation about 95.
        assert!((9_500..=10_500).contains(&dups), "{dups}");
        assert_eq!(out.len() as u64, 100_000 + dups);
        let mut seen = vec![0u8; 100_000];
        for (_, d) in &out {
            seen[number(d) as usize] += 1;
        }
        assert_eq!(seen.iter().filter(|&&c| c == 2).count() as u64, dups);
        assert!(seen.iter().all(|&c| c == 1 || c == 2));
        assert_accounting(link.stats());
    }

    #[test]
    fn duplicate_gets_independent_jitter() {
        let t0 = Instant::now();
        let config = LinkConfig::default()
            .with_duplicate(1.0)
            .with_jitter(10 * MS);
        let mut link = Link::new(config, Rng::new(5));
        link.send(t0, b"x");
        let out = drain_all(&mut link);
        assert_eq!(out.len(), 2);
        assert_ne!(out[0].0, out[1].0, "copies arrived at the same instant");
    }

    #[test]
    fn corruption_flips_bits() {
        let t0 = Instant::now();
        let mut link = Link::new(LinkConfig::default().with_corrupt(1.0), Rng::new(6));
        let mut payload_rng = Rng::new(60);
        let mut sent = Vec::new();
        for _ in 0..1000 {
            let mut d = vec![0u8; 32];
            payload_rng.fill_bytes(&mut d);
            link.send(t0, &d);
            sent.push(d);
        }
        let mut flips_seen = [0u32; 4];
        for ((_, got), want) in drain_all(&mut link).iter().zip(&sent) {
            assert_eq!(got.len(), want.len());
            let flipped: u32 = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a ^ b).count_ones())
                .sum();
            assert!((1..=3).contains(&flipped), "{flipped} bits flipped");
            flips_seen[flipped as usize] += 1;
        }
        assert!(flips_seen[1..].iter().all(|&c| c > 200), "{flips_seen:?}");
        assert_eq!(link.stats().corrupted, 1000);

        // One-byte and empty datagrams are handled without panicking.
        link.send(t0, &[0]);
        link.send(t0, &[]);
        let out = drain_all(&mut link);
        assert_ne!(out[0].1, vec![0u8]);
        assert!(out[1].1.is_empty());
        assert_eq!(link.stats().corrupted, 1001);

        // Without corruption the bytes are untouched.
        let mut clean = Link::new(LinkConfig::default(), Rng::new(6));
        for d in &sent {
            clean.send(t0, d);
        }
        let out: Vec<Vec<u8>> = drain_all(&mut clean).into_iter().map(|(_, d)| d).collect();
        assert_eq!(out, sent);
    }

    #[test]
    fn mutation_flips_bits_before_the_trailer_and_fixes_the_crc() {
        let t0 = Instant::now();
        let mut link = Link::new(LinkConfig::default().with_mutate(1.0), Rng::new(61));
        let mut payload_rng = Rng::new(62);
        let mut sent = Vec::new();
        for _ in 0..1000 {
            let mut d = vec![0u8; 40];
            payload_rng.fill_bytes(&mut d[..36]);
            let crc = crc32fast::hash(&d[..36]);
            d[36..].copy_from_slice(&crc.to_be_bytes());
            link.send(t0, &d);
            sent.push(d);
        }
        let mut flips_seen = [0u32; 4];
        for ((_, got), want) in drain_all(&mut link).iter().zip(&sent) {
            assert_eq!(got.len(), want.len());
            let body = got.len() - TRAILER_LEN;
            let flipped: u32 = got[..body]
                .iter()
                .zip(&want[..body])
                .map(|(a, b)| (a ^ b).count_ones())
                .sum();
            assert!((1..=3).contains(&flipped), "{flipped} bits flipped");
            flips_seen[flipped as usize] += 1;
            let crc = crc32fast::hash(&got[..body]).to_be_bytes();
            assert_eq!(got[body..], crc, "trailer not recomputed");
        }
        assert!(flips_seen[1..].iter().all(|&c| c > 200), "{flips_seen:?}");
        assert_eq!(link.stats().mutated, 1000);
        assert_eq!(link.stats().corrupted, 0);

        // A real datagram still passes the checksum: whatever decode says, it is not that.
        let mut buf = [0u8; 64];
        let n = udpferry::wire::Datagram {
            conn_id: udpferry::wire::ConnectionId(7),
            frame: udpferry::wire::Frame::Done,
        }
        .encode(&mut buf)
        .expect("a Done fits 64 bytes");
        for _ in 0..200 {
            link.send(t0, &buf[..n]);
        }
        for (_, got) in drain_all(&mut link) {
            assert_ne!(got, buf[..n]);
            assert!(!matches!(
                udpferry::wire::decode(&got),
                Err(udpferry::wire::DecodeError::BadChecksum { .. })
            ));
        }

        // Datagrams with nothing before a trailer are left alone and not counted.
        link.send(t0, &[1, 2, 3, 4]);
        link.send(t0, &[]);
        let out = drain_all(&mut link);
        assert_eq!(out[0].1, vec![1, 2, 3, 4]);
        assert!(out[1].1.is_empty());
        assert_eq!(link.stats().mutated, 1200);

        // Off by default: the same seed without mutation leaves the bytes alone.
        let mut clean = Link::new(LinkConfig::default(), Rng::new(61));
        for d in &sent {
            clean.send(t0, d);
        }
        let out: Vec<Vec<u8>> = drain_all(&mut clean).into_iter().map(|(_, d)| d).collect();
        assert_eq!(out, sent);
        assert_eq!(clean.stats().mutated, 0);
    }

    fn arrival_order(jitter: Duration) -> Vec<u32> {
        let t0 = Instant::now();
        let mut link = Link::new(LinkConfig::default().with_jitter(jitter), Rng::new(7));
        for i in 0..1000u32 {
            link.send(t0 + Duration::from_micros(100) * i, &numbered(i));
        }
        drain_all(&mut link)
            .iter()
            .map(|(_, d)| number(d))
            .collect()
    }

    #[test]
    fn jitter_reorders_and_zero_jitter_keeps_order() {
        let jittered = arrival_order(5 * MS);
        let inversions = jittered.windows(2).filter(|w| w[0] > w[1]).count();
        assert!(inversions > 100, "only {inversions} inversions");
        let mut sorted = jittered.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());

        assert_eq!(arrival_order(Duration::ZERO), (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let t0 = Instant::now();
        let config = LinkConfig::clean(20 * MS).with_jitter(3 * MS);
        let mut link = Link::new(config, Rng::new(8));
        for i in 0..10_000 {
            link.send(t0, &numbered(i));
        }
        let out = drain_all(&mut link);
        assert!(out
            .iter()
            .all(|(at, _)| *at >= t0 + 20 * MS && *at <= t0 + 23 * MS));
        assert!(out.first().unwrap().0 < t0 + 20 * MS + Duration::from_micros(10));
        assert!(out.last().unwrap().0 > t0 + 23 * MS - Duration::from_micros(10));
    }

    #[test]
    fn simultaneous_sends_keep_send_order() {
        let t0 = Instant::now();
        let mut link = Link::new(LinkConfig::default(), Rng::new(9));
        for i in 0..100 {
            link.send(t0, &numbered(i));
        }
        let order: Vec<u32> = drain_all(&mut link)
            .iter()
            .map(|(_, d)| number(d))
            .collect();
        assert_eq!(order, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn bottleneck_spaces_deliveries() {
        let t0 = Instant::now();
        let config = LinkConfig::default().with_bottleneck(1_000_000, 1_000_000);
        let mut link = Link::new(config, Rng::new(10));
        for i in 0..100u32 {
            let mut d = vec![0u8; 1000];
            d[..4].copy_from_slice(&numbered(i));
            link.send(t0, &d);
        }
        let out = drain_all(&mut link);
        assert_eq!(out.len(), 100);
        for (k, (at, d)) in out.iter().enumerate() {
            // Serialisation of datagram k ends (k + 1) ms after t0.
            assert_eq!(*at, t0 + 10 * MS + MS * (k as u32 + 1));
            assert_eq!(number(d), k as u32);
        }
    }

    #[test]
    fn bottleneck_tail_drop_and_queue_delay() {
        let t0 = Instant::now();
        let config = LinkConfig::default().with_bottleneck(1_000_000, 5_000);
        let mut link = Link::new(config, Rng::new(11));
        assert_eq!(link.queue_delay(t0), Duration::ZERO);
        for i in 0..10 {
            let mut d = vec![0u8; 1000];
            d[..4].copy_from_slice(&numbered(i));
            link.send(t0, &d);
        }
        assert_eq!(link.stats().queue_dropped, 5);
        assert_eq!(link.queue_delay(t0), 5 * MS);
        assert_eq!(link.queue_delay(t0 + 2 * MS), 3 * MS);
        assert_eq!(link.queue_delay(t0 + 5 * MS), Duration::ZERO);
        assert_eq!(link.queue_delay(t0 + 60 * MS), Duration::ZERO);

        // Two datagrams have left the queue after 2 ms: room for two more.
        for i in 10..13 {
            let mut d = vec![0u8; 1000];
            d[..4].copy_from_slice(&numbered(i));
            link.send(t0 + 2 * MS, &d);
        }
        assert_eq!(link.stats().queue_dropped, 6);
        assert_eq!(link.queue_delay(t0 + 2 * MS), 5 * MS);

        let out = drain_all(&mut link);
        let order: Vec<u32> = out.iter().map(|(_, d)| number(d)).collect();
        assert_eq!(order, vec![0, 1, 2, 3, 4, 10, 11]);
        assert_eq!(out[6].0, t0 + 10 * MS + 7 * MS);
        assert_accounting(link.stats());
    }

    #[test]
    fn bottleneck_idle_restarts_at_now() {
        let t0 = Instant::now();
        let config = LinkConfig::clean(Duration::ZERO).with_bottleneck(1_000_000, 10_000);
        let mut link = Link::new(config, Rng::new(12));
        link.send(t0, &[0; 500]);
        link.send(t0 + 100 * MS, &[0; 500]);
        let out = drain_all(&mut link);
        assert_eq!(out[0].0, t0 + Duration::from_micros(500));
        assert_eq!(out[1].0, t0 + 100 * MS + Duration::from_micros(500));
    }

    #[test]
    fn bottleneck_does_not_drift() {
        // 1 byte at 3 B/s takes 333 333 333.3 ns; 3000 of them exactly 1000 s.
        let t0 = Instant::now();
        let config = LinkConfig::clean(Duration::ZERO).with_bottleneck(3, usize::MAX);
        let mut link = Link::new(config, Rng::new(13));
        for _ in 0..3000 {
            link.send(t0, &[7]);
        }
        assert_eq!(link.queue_delay(t0), Duration::from_secs(1000));
        let out = drain_all(&mut link);
        assert_eq!(out.len(), 3000);
        assert_eq!(out[0].0, t0 + Duration::from_nanos(333_333_334));
        assert_eq!(out[2].0, t0 + Duration::from_secs(1));
        assert_eq!(out[2999].0, t0 + Duration::from_secs(1000));
    }

    #[test]
    fn bandwidth_change_continues_after_queued_data() {
        let t0 = Instant::now();
        let config = LinkConfig::clean(Duration::ZERO).with_bottleneck(1_000_000, 100_000);
        let mut link = Link::new(config.clone(), Rng::new(14));
        link.send(t0, &[0; 1000]);
        link.set_config(config.with_bottleneck(2_000_000, 100_000));
        link.send(t0, &[0; 1000]);
        let out = drain_all(&mut link);
        assert_eq!(out[0].0, t0 + MS);
        assert_eq!(out[1].0, t0 + MS + Duration::from_micros(500));
        assert_eq!(link.config().bandwidth_bytes_per_sec, Some(2_000_000));
    }

    #[test]
    fn mtu_drops_oversize() {
        let t0 = Instant::now();
        let mut link = Link::new(
            LinkConfig::default().with_mtu(1200).with_loss(0.5),
            Rng::new(15),
        );
        for _ in 0..100 {
            link.send(t0, &[0; 1201]);
            link.send(t0, &[0; 1200]);
        }
        assert_eq!(link.stats().oversize, 100);
        let out = drain_all(&mut link);
        assert!(out.iter().all(|(_, d)| d.len() == 1200));
        assert_eq!(out.len() as u64 + link.stats().lost, 100);
        assert_accounting(link.stats());
    }

    #[test]
    fn degenerate_configs_do_not_panic() {
        let t0 = Instant::now();
        let config = LinkConfig {
            latency: Duration::MAX,
            jitter: Duration::MAX,
            loss: f64::NAN,
            burst_loss: Some(GilbertElliott {
                p_good_to_bad: f64::INFINITY,
                p_bad_to_good: -3.0,
                loss_in_good: f64::NAN,
                loss_in_bad: 2.0,
            }),
            duplicate: 1.0,
            corrupt: 1.0,
            mutate: 1.0,
            bandwidth_bytes_per_sec: Some(1),
            queue_bytes: usize::MAX,
            mtu: usize::MAX,
        };
        let mut link = Link::new(config.clone(), Rng::new(16));
        link.send(t0, &[1, 2, 3]);
        link.send(t0, &[]);
        let _ = link.deliver(t0);
        let _ = link.queue_delay(t0);

        let mut link = Link::new(
            config.with_burst_loss(GilbertElliott {
                p_good_to_bad: 0.0,
                p_bad_to_good: 0.0,
                loss_in_good: 0.0,
                loss_in_bad: 0.0,
            }),
            Rng::new(16),
        );
        for _ in 0..10 {
            link.send(t0, &[0; 100]);
        }
        // Each datagram takes 100 s at 1 B/s; the huge latency overflows.
        assert_eq!(link.stats().lost, 10);
        assert_eq!(link.next_delivery(), None);

        let mut zero = Link::new(LinkConfig::default().with_bottleneck(0, 1000), Rng::new(17));
        zero.send(t0, &[1]);
        assert_eq!(zero.stats().queue_dropped, 1);
        assert_eq!(zero.queue_delay(t0), Duration::ZERO);

        let mut full = Link::new(LinkConfig::default().with_bottleneck(1000, 0), Rng::new(18));
        full.send(t0, &[1]);
        full.send(t0, &[]);
        assert_eq!(full.stats().queue_dropped, 1);
        assert_eq!(drain_all(&mut full).len(), 1);
    }

    fn impaired_run(seed: u64) -> (Vec<(Duration, Vec<u8>)>, LinkStats) {
        let t0 = Instant::now();
        let config = LinkConfig::clean(15 * MS)
            .with_jitter(4 * MS)
            .with_loss(0.05)
            .with_burst_loss(GilbertElliott {
                p_good_to_bad: 0.01,
                p_bad_to_good: 0.3,
                loss_in_good: 0.0,
                loss_in_bad: 0.8,
            })
            .with_duplicate(0.03)
            .with_corrupt(0.02)
            .with_mutate(0.02)
            .with_bottleneck(500_000, 20_000);
        let mut link = Link::new(config, Rng::new(seed));
        let mut payloads = Rng::new(99);
        let mut out = Vec::new();
        let mut now = t0;
        for i in 0..5000u32 {
            let mut d = vec![0u8; 200 + (i as usize % 900)];
            payloads.fill_bytes(&mut d);
            link.send(now, &d);
            now += Duration::from_micros(700);
            while let Some(d) = link.deliver(now) {
                out.push((now - t0, d));
            }
        }
        for (at, d) in drain_all(&mut link) {
            out.push((at - t0, d));
        }
        (out, link.stats().clone())
    }

    #[test]
    fn same_seed_same_deliveries() {
        let (a, sa) = impaired_run(1234);
        let (b, sb) = impaired_run(1234);
        assert_eq!(a, b);
        assert_eq!(sa, sb);
        assert!(sa.lost > 0 && sa.queue_dropped > 0 && sa.duplicated > 0 && sa.corrupted > 0);
        assert!(sa.mutated > 0);
        assert_accounting(&sa);
        let (c, sc) = impaired_run(1235);
        assert_ne!(a, c);
        assert_ne!(sa, sc);
    }
}
