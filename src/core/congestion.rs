//! Congestion control: how fast to send and how many bytes may be in flight.
//!
//! One model of the path, in the spirit of BBR (draft-ietf-ccwg-bbr), drives both modes:
//!
//! - **Delivery-rate samples.** Every data datagram carries, from its send time, how many bytes
//!   had been delivered (acknowledged) and when; its acknowledgement turns that into a sample of
//!   the rate the path delivered while it was in flight.
//! - **Bandwidth** is the highest sample over the last `BW_WINDOW_ROUNDS` round trips (samples
//!   taken while the sender had nothing to send count only if they raise it), held under a cap
//!   that Background's delay control moves and that persistent congestion sets. **Minimum RTT**
//!   is the lowest round-trip sample of the last `MIN_RTT_WINDOW`.
//! - **Pacing** at a gain times the bandwidth; the **window** is a multiple of the
//!   bandwidth-delay product.
//! - **States:** Startup (from 32 datagrams, gain 2.77 until the bandwidth stops growing by a
//!   quarter for three rounds; the window allows 2.77 bandwidth-delay products until a queue
//!   shows, then two), Drain (until the queue Startup built is gone), ProbeBw (a cycle of eight rounds:
//!   one at 1.25 to look for more, one at 0.75 to drain what that queued, six at 1) and ProbeRtt
//!   (every `MIN_RTT_WINDOW`, 5 s, without a new minimum: half the bandwidth-delay product in
//!   flight, at least four datagrams, for 200 ms, so every flow on the path sees its true base
//!   delay).
//! - **Loss is a congestion signal only with a queue behind it.** At the end of each round, the
//!   fraction of bytes lost in it counts when it is above `LOSS_THRESH` while the queueing delay
//!   is high, or above `HEAVY_LOSS` whatever the delay; it halves the window, which grows back a
//!   sixteenth per round trip. Radio noise on an idle path (random loss, bursts) is recovered by
//!   retransmission and slows nothing.
//!
//! The modes, chosen per endpoint with [`CongestionControl`]:
//!
//! - **Background** (the default) yields to game traffic: it keeps the queueing delay it causes
//!   near a target (25 ms). Its window is the bandwidth-delay product plus `target` worth of
//!   bandwidth, Startup ends once the queue reaches half the target, and it probes for more
//!   only while the queue is below half the target, by at most the target's worth of queue
//!   (gains 1 +- min(0.25, target / minimum RTT)). Once the queue passes the target in
//!   ProbeBw, a bandwidth cap follows the delay per acknowledgement (with no drain round),
//!   AIMD as in LEDBAT++: above the target it falls in proportion to the excess, below it rises
//!   by a few datagrams per round trip, so independent Background flows through one bottleneck
//!   converge to equal shares. The queueing delay comes from one-way delay samples against the
//!   lowest seen (LEDBAT, RFC 6817), so congestion on the return path does not count.
//! - **Standard** fills the path: a window of 1.5 bandwidth-delay products (and at least 30 ms
//!   of queue beyond the pipe, more than Background's target), probing every cycle; it shares
//!   a bottleneck with loss-based flows (CUBIC) about evenly.

use std::time::{Duration, Instant};

/// Initial window, in datagrams: 32, as Google's QUIC sent for years (RFC 9002 suggests 10,
/// sent back to back). At most `TransferConfig::burst_datagrams` (10) go back to back and the
/// pacer spreads the rest at 1.25 windows per initial RTT (240 kB/s with the defaults), so on a
/// link of 2 Mbit/s or more the first flight queues no more than those ten do. On a 200 ms
/// path it saves Startup more than one of its round trips (20 datagrams gave 0.699 to 0.706 of
/// the link in `tests/lossy_links.rs`'s 200 ms case over eleven seeds, 32 give 0.712 to 0.727).
const INITIAL_WINDOW_DATAGRAMS: u64 = 32;
/// The window never shrinks below this many datagrams.
const MIN_WINDOW_DATAGRAMS: u64 = 2;
/// The least window in ProbeRtt, in datagrams.
const PROBE_RTT_WINDOW_DATAGRAMS: u64 = 4;
/// The window in ProbeRtt, in bandwidth-delay products (BBRv3's ProbeRTTCwndGain): enough to
/// empty the queue, half the rate for 200 ms instead of a near stop.
const PROBE_RTT_WINDOW_GAIN: f64 = 0.5;
/// One-way delay samples the current-delay filter keeps (RFC 6817 CURRENT_FILTER).
const CURRENT_FILTER: usize = 4;
/// Minutes of base-delay history (RFC 6817 BASE_HISTORY), one minimum per minute.
const BASE_HISTORY: usize = 10;
/// The largest queueing-delay target honoured (RFC 6817: TARGET MUST NOT exceed 100 ms).
const MAX_TARGET: Duration = Duration::from_millis(100);
/// Round trips the bandwidth filter remembers (BBR: 10).
const BW_WINDOW_ROUNDS: usize = 10;
/// The shortest interval a delivery-rate sample may cover. On loopback and fast LANs the
/// minimum RTT is tens of microseconds, and a sample over such a span measures how acks and
/// sends bunch up (the receiver reads in batches, the sender writes in bursts), up to twice
/// the real rate.
const MIN_SAMPLE_INTERVAL: Duration = Duration::from_millis(1);
/// How long a minimum RTT stays valid without being seen again, and so how often ProbeRtt
/// comes at most (BBRv3's ProbeRTTInterval: 5 s). Flows that share a bottleneck drain it
/// together after a few of these (each one's drain shows the others a new minimum, which
/// restarts their clocks), see their true base delay, and converge.
const MIN_RTT_WINDOW: Duration = Duration::from_secs(5);
/// How long ProbeRtt holds the window at `PROBE_RTT_WINDOW_DATAGRAMS` (BBR: 200 ms).
const PROBE_RTT_DURATION: Duration = Duration::from_millis(200);
/// Startup's pacing gain, 2/ln 2: the rate doubles each round (BBR).
const STARTUP_GAIN: f64 = 2.77;
/// Rounds without 25% more bandwidth that end Startup (BBR: 3).
const FULL_BW_ROUNDS: u32 = 3;
/// The pacing gains of ProbeBw's cycle, one per round trip.
const PROBE_BW_GAINS: [f64; 8] = [1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
/// Startup's window once a queue shows, in bandwidth-delay products.
const STARTUP_WINDOW_GAIN: f64 = 2.0;
/// Standard's window after Startup, in bandwidth-delay products. The window is what divides a
/// shared bottleneck once flows fill it, so it sets Standard's fairness both ways
/// (`tests/congestion.rs`; docs/ARCHITECTURE.md sections 5.4 and 5.8): two independent
/// Standard flows settle within 20% of each other on 15 of 30 paths at 2 BDP and 21 of 30 at
/// 1.5, and against a CUBIC flow in a 100 ms buffer Standard gets 0.55 to 0.62 of the link at
/// 2 BDP, 0.40 to 0.50 at 1.5, 0.29 to 0.39 at 1.25 and 0.13 to 0.20 at 1.1 (a window near one
/// BDP starves it).
const STANDARD_WINDOW_GAIN: f64 = 1.5;
/// Standard's window allows at least this much queue beyond the pipe, more than Background's
/// default target (25 ms): on a short path half a BDP of queue is less than the target, and a
/// Background flow beside it would never see the delay that tells it to give way (Standard got
/// 0.77 of the bottleneck against one at 40 ms RTT without this floor, 0.90 with it).
const STANDARD_QUEUE_FLOOR: Duration = Duration::from_millis(30);
/// A round that loses more than this fraction of its bytes while the queue is high is a
/// congestion signal (BBRv2's loss_thresh).
const LOSS_THRESH: f64 = 0.02;
/// A round that loses more than this fraction of its bytes is a congestion signal whatever the
/// delay: a bottleneck with a queue too short to show in the delay drops this much when it is
/// overrun, and radio noise rarely does.
const HEAVY_LOSS: f64 = 0.2;
/// A round's losses count as a signal only from this many datagrams' worth on (BBRv2's
/// full_loss_cnt).
const LOSS_EVENTS_MIN: u64 = 8;
/// The least share of its queue allowance a window keeps after loss rounds without a queue.
const QUEUE_SCALE_MIN: f64 = 0.25;
/// How much a round without a congestion signal raises the bandwidth cap.
const CAP_GROWTH: f64 = 1.125;
/// The cap rises only while the path delivers at least this fraction of it.
const CAP_KEEPING_UP: f64 = 0.85;
/// Strength of Background's decrease above its target: per round trip's worth of
/// acknowledgements the cap falls by this times the relative excess (at most by half).
const DELAY_DECREASE_GAIN: f64 = 0.75;
/// Background's additive increase below its target, in datagrams per round trip (see
/// `Controller::delay_control`).
const ADDITIVE_DATAGRAMS: f64 = 4.0;
/// Round trips longer than this get a proportionally larger additive step, so the rate grows as
/// many bytes per second per second as on a path of this round trip: two flows on a long path
/// converge as fast, in seconds, as on a short one.
const ADDITIVE_RTT_REF: Duration = Duration::from_millis(40);
/// Background's cap rises only while the last round delivered at least this fraction of it.
const ADDITIVE_KEEPING_UP: f64 = 0.95;
/// The least queueing delay that makes a round's loss above `LOSS_THRESH` a congestion signal
/// (see `Controller::queue_high`).
const QUEUE_SIGNAL_MIN: Duration = Duration::from_millis(2);

/// Which congestion controller a transfer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CongestionControl {
    /// Background transfer: keeps the queueing delay it causes near `target`, so game packets
    /// behind the same bottleneck keep their latency, and gives way to other traffic.
    Background {
        /// Queueing delay to aim for (RFC 6817 TARGET; 25 ms by default). Clamped to 1 to
        /// 100 ms.
        target: Duration,
    },
    /// Fills the path: for dedicated links, or when the download is the only thing that matters.
    Standard,
}

impl Default for CongestionControl {
    fn default() -> Self {
        CongestionControl::Background {
            target: Duration::from_millis(25),
        }
    }
}

/// What a data datagram remembers from its send time, for the delivery-rate sample its
/// acknowledgement gives: returned by [`Controller::on_send`], handed back to
/// [`Controller::on_ack`].
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    /// Bytes delivered when the datagram was sent.
    delivered: u64,
    /// When the latest of those bytes was delivered (or the send time, if none were in flight).
    delivered_time: Instant,
    /// The send time of the datagram whose acknowledgement was the latest delivery then.
    first_sent: Instant,
    /// Sent while the sender had less to send than the model allowed.
    app_limited: bool,
}

/// What a round's congestion signal was.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Signal {
    /// Its losses (see the module docs).
    Loss,
    /// Background's queueing delay above the target. It ends Startup and Drain; in ProbeBw the
    /// delay control moves the cap per acknowledgement instead (`delay_control`).
    Delay,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Startup,
    Drain,
    ProbeBw {
        /// Index into `PROBE_BW_GAINS`.
        cycle: usize,
        /// When the current gain began.
        since: Instant,
    },
    ProbeRtt {
        /// When the window has drained to the ProbeRtt window and the hold began.
        hold_since: Option<Instant>,
        /// The round the hold began in.
        hold_round: u64,
    },
}

/// Highest value per round, over the last `BW_WINDOW_ROUNDS` rounds.
#[derive(Debug, Clone, Default)]
struct MaxFilter {
    /// (round, highest sample in it), one slot per round modulo the window.
    slots: [(u64, u64); BW_WINDOW_ROUNDS],
}

impl MaxFilter {
    fn update(&mut self, round: u64, value: u64) {
        let slot = &mut self.slots[(round % BW_WINDOW_ROUNDS as u64) as usize];
        if slot.0 != round {
            *slot = (round, value);
        } else {
            slot.1 = slot.1.max(value);
        }
    }

    fn get(&self, round: u64) -> u64 {
        self.slots
            .iter()
            .filter(|(r, _)| round.saturating_sub(*r) < BW_WINDOW_ROUNDS as u64 && *r <= round)
            .map(|(_, v)| *v)
            .max()
            .unwrap_or(0)
    }

    fn scale(&mut self, factor: f64) {
        for slot in &mut self.slots {
            slot.1 = (slot.1 as f64 * factor) as u64;
        }
    }
}

/// The controller of one transfer.
///
/// For every data datagram call [`on_send`](Self::on_send) as it goes out (keep what it returns
/// with the datagram); for each newly acknowledged one [`on_ack`](Self::on_ack), then
/// [`on_ack_done`](Self::on_ack_done) once per acknowledgement; [`on_rtt_sample`](Self::on_rtt_sample)
/// and [`on_delay_sample`](Self::on_delay_sample) for every acknowledgement that reports a newer
/// datagram; [`on_loss`](Self::on_loss) for every datagram declared lost;
/// [`on_app_limited`](Self::on_app_limited) when the sender has nothing to send that the
/// window and pacing would allow. Before sending, compare [`window`](Self::window) with the
/// bytes in flight and pace at [`pacing_rate`](Self::pacing_rate).
#[derive(Debug, Clone)]
pub struct Controller {
    kind: CongestionControl,
    max_datagram: u64,
    window: u64,
    phase: Phase,
    delay: DelayEstimator,

    /// Bytes acknowledged so far, and when the latest were.
    delivered: u64,
    delivered_time: Option<Instant>,
    /// Send time of the latest acknowledged datagram.
    first_sent: Option<Instant>,
    /// Samples from datagrams sent before `delivered` reaches this are app-limited.
    app_limited_until: u64,
    round: u64,
    next_round_delivered: u64,
    bw_filter: MaxFilter,
    /// Background: moved by `delay_control`; otherwise set by persistent congestion and raised
    /// by quiet rounds (`raise_cap`). `None`: no cap.
    bw_cap: Option<u64>,
    min_rtt: Option<Duration>,
    min_rtt_stamp: Option<Instant>,
    full_bw: u64,
    full_bw_rounds: u32,
    filled_pipe: bool,
    round_lost: u64,
    round_acked: u64,
    /// The bandwidth filter's value when a congestion signal first set the cap.
    bw_before_cut: u64,
    /// The round of the last cut.
    cut_round: u64,
    /// When the last cut was made, or Drain ended.
    cut_at: Option<Instant>,
    /// The send time of the datagram the latest one-way delay sample was taken from.
    delay_sample_sent: Option<Instant>,
    /// The minimum RTT expired: enter ProbeRtt.
    probe_rtt_due: bool,
    /// The latest RTT sample.
    latest_rtt: Duration,
    /// The share of the window's allowance for queue (Background: target's worth; Standard:
    /// half a BDP, or 30 ms) in use: halved by loss rounds without a queue, restored by quiet
    /// ones.
    queue_scale: f64,
    /// The delivery rate over the last whole round.
    last_round_rate: u64,
    /// After a loss signal: the window grows back by one datagram per round trip.
    additive: bool,
    /// When the current round began, and the bytes delivered then.
    round_started: Option<Instant>,
    round_start_delivered: u64,
}

impl Controller {
    /// A controller of `kind` for datagrams of at most `max_datagram` bytes.
    pub fn new(kind: CongestionControl, max_datagram: u64) -> Self {
        let max_datagram = max_datagram.max(1);
        Controller {
            kind,
            max_datagram,
            window: INITIAL_WINDOW_DATAGRAMS * max_datagram,
            phase: Phase::Startup,
            delay: DelayEstimator::default(),
            delivered: 0,
            delivered_time: None,
            first_sent: None,
            app_limited_until: 0,
            round: 0,
            next_round_delivered: 0,
            bw_filter: MaxFilter::default(),
            bw_cap: None,
            min_rtt: None,
            min_rtt_stamp: None,
            full_bw: 0,
            full_bw_rounds: 0,
            filled_pipe: false,
            round_lost: 0,
            round_acked: 0,
            bw_before_cut: 0,
            cut_round: 0,
            cut_at: None,
            delay_sample_sent: None,
            probe_rtt_due: false,
            latest_rtt: Duration::ZERO,
            round_started: None,
            queue_scale: 1.0,
            last_round_rate: 0,
            additive: false,
            round_start_delivered: 0,
        }
    }

    /// Bytes that may be in flight now.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// The rate to pace at, bytes per second, once the model has a bandwidth sample; before
    /// that, the caller paces the window over the smoothed RTT.
    pub fn pacing_rate(&self) -> Option<u64> {
        let bw = self.bandwidth();
        // Never slower than the minimum window per round trip: an estimate that losses and
        // cuts drove near zero must not hold the last chunk back for minutes.
        let rtt = self.min_rtt.unwrap_or(Duration::from_millis(100)).max(MIN_SAMPLE_INTERVAL);
        let floor = (self.min_window() as f64 / rtt.as_secs_f64()) as u64;
        (bw > 0).then(|| ((bw as f64 * self.pacing_gain()) as u64).max(floor).max(1))
    }

    /// The bandwidth estimate, bytes per second (0 before the first sample).
    pub fn bandwidth(&self) -> u64 {
        self.bw_cap
            .unwrap_or_else(|| self.bw_filter.get(self.round))
    }

    /// Sets the window, as an endpoint does to share one path's window evenly among the
    /// transfers on it: the bandwidth estimate scales with it. Never below the minimum window.
    pub fn set_window(&mut self, window: u64) {
        let window = window.max(self.min_window());
        if self.window > 0 && self.bandwidth() > 0 {
            let factor = window as f64 / self.window as f64;
            self.bw_filter.scale(factor);
            if let Some(cap) = &mut self.bw_cap {
                *cap = (*cap as f64 * factor) as u64;
            }
            self.bw_before_cut = (self.bw_before_cut as f64 * factor) as u64;
        }
        self.window = window;
    }

    /// Acknowledgements for `bytes` turned out false (the receiver's later acks show the data
    /// missing): take back what they gave, the window growth they allowed (at most their size)
    /// and the room they freed in flight (their size). Unlike a loss, this is not a congestion
    /// signal.
    pub fn on_acks_withdrawn(&mut self, bytes: u64) {
        self.delivered = self.delivered.saturating_sub(bytes);
        let window = self.window.saturating_sub(bytes.saturating_mul(2));
        self.window = window.max(self.min_window());
    }

    #[cfg_attr(not(feature = "internals"), allow(dead_code))] // used by tests and benches
    /// The controller in use.
    pub fn kind(&self) -> CongestionControl {
        self.kind
    }

    /// The current estimate of the queueing delay this path adds (one-way delay above the
    /// lowest seen), once there are samples.
    pub fn queueing_delay(&self) -> Option<Duration> {
        self.delay.queueing_delay()
    }

    #[cfg_attr(not(feature = "internals"), allow(dead_code))] // used by tests and benches
    /// True while the controller is in Startup (the rate doubling every round trip).
    pub fn in_slow_start(&self) -> bool {
        self.phase == Phase::Startup
    }

    /// A one-way delay sample from an acknowledgement: the receiver's clock minus the send
    /// time stamp of the newest datagram it had, in wrapping microseconds (only changes matter).
    /// `sent` is the send time of that datagram, when the sender still knows it.
    pub fn on_delay_sample(&mut self, owd_us: u32, sent: Option<Instant>, now: Instant) {
        self.delay.sample(owd_us, now);
        if let Some(sent) = sent {
            self.delay_sample_sent = Some(sent);
        }
    }

    /// The lowest one-way delay (wrapping microseconds) other transfers saw on the same path,
    /// measured against the same clocks. The base delay becomes the lower of it and this
    /// transfer's own minimum.
    pub fn set_base_hint(&mut self, owd_us: u32) {
        self.delay.hint = Some(owd_us);
    }

    /// A round-trip sample (ack delay not subtracted) taken at `now`.
    pub fn on_rtt_sample(&mut self, rtt: Duration, now: Instant) {
        self.latest_rtt = rtt;
        let expired = self
            .min_rtt_stamp
            .is_none_or(|t| now.saturating_duration_since(t) > MIN_RTT_WINDOW);
        if expired && self.min_rtt.is_some() {
            // Not seen again for `MIN_RTT_WINDOW`: the newest sample takes its place, and
            // ProbeRtt drains the queue to look for a lower one.
            self.probe_rtt_due = true;
        }
        if self.min_rtt.is_none_or(|m| rtt <= m) || expired {
            self.min_rtt = Some(rtt);
            self.min_rtt_stamp = Some(now);
        }
    }

    /// A data datagram goes out at `now` with `bytes_in_flight` bytes already in flight: what
    /// to keep with it for [`on_ack`](Self::on_ack).
    pub fn on_send(&mut self, now: Instant, bytes_in_flight: u64) -> Delivery {
        if bytes_in_flight == 0 {
            // Nothing in flight: the sample interval starts now, not at the last delivery.
            self.first_sent = Some(now);
            self.delivered_time = Some(now);
        }
        Delivery {
            delivered: self.delivered,
            delivered_time: self.delivered_time.unwrap_or(now),
            first_sent: self.first_sent.unwrap_or(now),
            app_limited: self.app_limited_until > self.delivered,
        }
    }

    /// The sender has less to send than the window and pacing allow (the object's end, the
    /// receiver's window, a rate cap), with `bytes_in_flight` in flight: rate samples until
    /// those are delivered say more about the sender than about the path.
    pub fn on_app_limited(&mut self, bytes_in_flight: u64) {
        self.app_limited_until = (self.delivered + bytes_in_flight).max(1);
    }

    /// A datagram of `bytes`, sent at `sent` with `delivery` from [`on_send`](Self::on_send),
    /// was acknowledged at `now`.
    pub fn on_ack(&mut self, delivery: &Delivery, sent: Instant, bytes: u64, now: Instant) {
        self.delivered += bytes;
        self.delivered_time = Some(now);
        self.round_acked += bytes;
        // A round trip ends when a datagram sent after the last one began is acknowledged, and
        // lasts at least `MIN_SAMPLE_INTERVAL` (on loopback a round trip is microseconds long,
        // too short for a rate sample or a loss fraction).
        let long_enough = self
            .round_started
            .is_none_or(|t| now.saturating_duration_since(t) >= MIN_SAMPLE_INTERVAL);
        if delivery.delivered >= self.next_round_delivered && long_enough {
            // The round's own delivery rate is a sample too: on a path whose round trips are
            // shorter than `MIN_SAMPLE_INTERVAL` it is the only one.
            if let Some(started) = self.round_started {
                let span = now.saturating_duration_since(started).as_secs_f64();
                let bytes = self.delivered.saturating_sub(self.round_start_delivered);
                let rate = (bytes as f64 / span) as u64;
                self.last_round_rate = rate;
                let app_limited = self.app_limited_until > self.round_start_delivered;
                if !app_limited || rate > self.bw_filter.get(self.round) {
                    self.bw_filter.update(self.round, rate);
                }
            }
            self.round_start_delivered = self.delivered;
            self.next_round_delivered = self.delivered;
            self.round_started = Some(now);
            self.start_round(now);
        }
        if self.first_sent.is_none_or(|f| sent >= f) {
            self.first_sent = Some(sent);
        }
        let send_elapsed = sent.saturating_duration_since(delivery.first_sent);
        let ack_elapsed = now.saturating_duration_since(delivery.delivered_time);
        let interval = send_elapsed.max(ack_elapsed);
        // A sample over less than the minimum RTT (or `MIN_SAMPLE_INTERVAL`) measures ack
        // compression and bursts, not the path.
        let floor = self.min_rtt.unwrap_or(Duration::ZERO).max(MIN_SAMPLE_INTERVAL);
        if interval < floor {
            return;
        }
        let rate = self.delivered.saturating_sub(delivery.delivered) as f64 / interval.as_secs_f64();
        let rate = rate as u64;
        if !delivery.app_limited || rate > self.bw_filter.get(self.round) {
            self.bw_filter.update(self.round, rate);
        }
    }

    /// A datagram of `bytes` sent at `sent` was declared lost at `now`. It slows the sender only
    /// as part of a round whose losses are a congestion signal (see the module docs).
    pub fn on_loss(&mut self, sent: Instant, bytes: u64, _now: Instant) {
        // Datagrams sent before the last cut (or before Drain emptied Startup's queue) were
        // lost to the queue that cut dealt with.
        if self.cut_at.is_none_or(|cut| sent > cut) {
            self.round_lost += bytes;
        }
    }

    /// Every datagram over a long period was lost (repeated probe timeouts): start again from
    /// the minimum window, with a quarter of the bandwidth estimate.
    pub fn on_persistent_congestion(&mut self, now: Instant) {
        self.set_cap(self.bandwidth() / 4, now);
        self.window = self.min_window();
    }

    /// An acknowledgement was processed (after its [`on_ack`](Self::on_ack) and
    /// [`on_loss`](Self::on_loss) calls), leaving `bytes_in_flight` in flight: advance the
    /// state machine and recompute the window.
    pub fn on_ack_done(&mut self, now: Instant, bytes_in_flight: u64, newly_acked: u64) {
        self.update_phase(now, bytes_in_flight);
        self.delay_control(newly_acked);
        self.update_window(newly_acked);
    }

    /// Background's bandwidth cap in ProbeBw, moved by every acknowledgement (LEDBAT++,
    /// draft-irtf-iccrg-ledbat-plus-plus, on a rate): above the target it falls in proportion
    /// to the excess and to itself (multiplicative decrease), below the target it rises by
    /// `ADDITIVE_DATAGRAMS` per round trip (additive increase), each spread over a round trip's
    /// worth of acknowledgements.
    ///
    /// Two independent Background flows through one bottleneck see the same queue, so both
    /// decrease by the same fraction and increase by the same number of bytes per second: the
    /// larger one loses more than it gains back and they converge (AIMD). A multiplicative
    /// increase keeps whatever ratio the flows start with. Acting per acknowledgement, not once
    /// per round, makes the decrease the same for flows whose rounds end at different points
    /// of the queue's rise. Before the first excess there is no cap and the model's bandwidth
    /// (with ProbeBw's probing) rules, as for Standard.
    fn delay_control(&mut self, newly_acked: u64) {
        // Only in ProbeBw: Startup and Drain find the path and handle their own queue.
        if !self.is_background() || !matches!(self.phase, Phase::ProbeBw { .. }) || newly_acked == 0
        {
            return;
        }
        let (Some(q), Some(min_rtt)) = (self.delay.queueing_delay(), self.min_rtt) else {
            return;
        };
        let rtt = min_rtt.max(MIN_SAMPLE_INTERVAL).as_secs_f64();
        let target = self.target().as_secs_f64();
        let q = q.as_secs_f64();
        if q > target && self.delay_sample_stale() {
            return;
        }
        let cap = match self.bw_cap {
            Some(cap) => cap as f64,
            None if q > target => match self.bw_filter.get(self.round) {
                0 => return,
                bw => bw as f64,
            },
            None => return,
        };
        // The share of a round trip these acknowledgements are.
        let share = (newly_acked as f64 / (cap * rtt)).min(1.0);
        let cap = if q > target {
            let excess = (DELAY_DECREASE_GAIN * (q - target) / target).min(0.5);
            cap * (1.0 - excess * share)
        } else {
            if (self.last_round_rate as f64) < cap * ADDITIVE_KEEPING_UP {
                return;
            }
            let scale = (min_rtt.as_secs_f64() / ADDITIVE_RTT_REF.as_secs_f64()).max(1.0);
            cap + ADDITIVE_DATAGRAMS * scale * self.max_datagram as f64 / rtt * share
        };
        self.bw_cap = Some((cap as u64).max(1));
    }

    fn start_round(&mut self, now: Instant) {
        self.round += 1;
        // The round that just ended: did it carry a congestion signal? At most one cut per
        // round, and none in the round after a cut: that round's delay and losses still show
        // the queue from before the cut took effect.
        let total = self.round_lost + self.round_acked;
        let lost = if total > 0 {
            self.round_lost as f64 / total as f64
        } else {
            0.0
        };
        let queue_high = self.queue_high();
        // A few losses in a short round say little (one in four is 25%).
        let enough = self.round_lost >= LOSS_EVENTS_MIN * self.max_datagram;
        let loss_signal = enough && (lost > HEAVY_LOSS || (lost > LOSS_THRESH && queue_high));
        let cut = if loss_signal {
            Some(Signal::Loss)
        } else {
            self.delay_above_target().then_some(Signal::Delay)
        };
        // Losses above the threshold without a queue to show for them: radio noise, or a
        // buffer too shallow to show a queue. Either way the queue the window allows beyond the
        // pipe is useless there: it halves (the rate, set by the bandwidth, is untouched), and
        // quiet rounds give it back a sixteenth at a time.
        if enough && lost > LOSS_THRESH && cut.is_none() {
            // Never below a quarter: a window of exactly one BDP would shrink with every
            // round's losses (what arrives sets the next estimate).
            self.queue_scale = (self.queue_scale * 0.5).max(QUEUE_SCALE_MIN);
        } else if self.round_lost == 0 {
            self.queue_scale = (self.queue_scale + 1.0 / 16.0).min(1.0);
        }
        self.round_lost = 0;
        self.round_acked = 0;
        match cut {
            // Startup and Drain handle their own queue: a signal there ends Startup.
            Some(_) if matches!(self.phase, Phase::Startup | Phase::Drain) => {
                self.filled_pipe = true;
                self.mark_cut(now);
            }
            // One cut per episode (see above).
            Some(_) if self.round <= self.cut_round + 1 => {}
            // A loss signal halves the window and makes it grow back slowly (a sixteenth per
            // round trip), leaving the pacing rate to the model: where the bandwidth estimate
            // runs high (acks that arrive in bursts), the window still holds the flight to what
            // the path carries.
            Some(Signal::Loss) => {
                self.window = (self.window / 2).max(self.min_window());
                self.additive = true;
                self.mark_cut(now);
            }
            // Background's cap moves per acknowledgement (`delay_control`); only Background
            // has a delay signal.
            Some(Signal::Delay) => {}
            None if self.is_background() => {}
            None if !queue_high => self.raise_cap(),
            None => {}
        }
        self.check_full_bw();
    }

    /// Whether the queueing delay is high enough that a loss burst means congestion: a quarter
    /// of the minimum RTT (at least `QUEUE_SIGNAL_MIN`), for Background at most half its target.
    /// Radio noise shows no queue; a bottleneck overrun does, even one with a shallow buffer.
    fn queue_high(&self) -> bool {
        let Some(q) = self.delay.queueing_delay() else {
            return false;
        };
        let signal = self
            .min_rtt
            .map_or(Duration::ZERO, |m| m / 4)
            .max(QUEUE_SIGNAL_MIN);
        match self.kind {
            CongestionControl::Background { .. } => q > signal.min(self.target() / 2),
            CongestionControl::Standard => q > signal,
        }
    }

    /// Whether this is the Background mode.
    fn is_background(&self) -> bool {
        matches!(self.kind, CongestionControl::Background { .. })
    }

    /// Whether the latest delay sample came from a datagram sent before the last cut (or
    /// Drain's end): it shows the queue that cut dealt with.
    fn delay_sample_stale(&self) -> bool {
        matches!((self.cut_at, self.delay_sample_sent), (Some(cut), Some(sent)) if sent <= cut)
    }

    /// Background's delay signal: the queueing delay, measured on a datagram sent since the last
    /// cut, is above the target.
    fn delay_above_target(&self) -> bool {
        self.is_background()
            && !self.delay_sample_stale()
            && self
                .delay
                .queueing_delay()
                .is_some_and(|q| q > self.target())
    }

    /// Caps the bandwidth estimate at `cap`; quiet rounds raise it again (`raise_cap`; for
    /// Background, `delay_control`).
    fn set_cap(&mut self, cap: u64, now: Instant) {
        if self.bandwidth() == 0 {
            return;
        }
        if self.bw_cap.is_none() {
            self.bw_before_cut = self.bw_filter.get(self.round);
        }
        self.bw_cap = Some(cap.max(1));
        self.mark_cut(now);
    }

    /// A cut was made (or Startup's queue drained) at `now`: the next round's signals, and
    /// losses of datagrams sent before it, belong to the queue it dealt with.
    fn mark_cut(&mut self, now: Instant) {
        self.cut_round = self.round;
        self.cut_at = Some(now);
    }

    /// A round without a congestion signal (not Background, whose cap `delay_control` moves):
    /// while the path delivers what the cap allows, the cap rises; once it is back at the
    /// bandwidth measured before the cut it goes, and the filter (and ProbeBw's probing) takes
    /// over again.
    fn raise_cap(&mut self) {
        let Some(cap) = self.bw_cap else {
            return;
        };
        // The last round's own rate, not the filter's maximum: a burst of acks can lift the
        // maximum far above what the path carries, and the cap would rise on it.
        let delivering = self.last_round_rate as f64 >= cap as f64 * CAP_KEEPING_UP;
        if !delivering {
            return;
        }
        let raised = (cap as f64 * CAP_GROWTH) as u64 + 1;
        self.bw_cap = (raised < self.bw_before_cut).then_some(raised);
    }

    fn check_full_bw(&mut self) {
        if self.filled_pipe || self.app_limited_until > self.delivered {
            return;
        }
        let bw = self.bandwidth();
        if bw as f64 >= self.full_bw as f64 * 1.25 {
            self.full_bw = bw;
            self.full_bw_rounds = 0;
            return;
        }
        self.full_bw_rounds += 1;
        if self.full_bw_rounds >= FULL_BW_ROUNDS {
            self.filled_pipe = true;
        }
    }

    fn target(&self) -> Duration {
        match self.kind {
            CongestionControl::Background { target } => {
                target.clamp(Duration::from_millis(1), MAX_TARGET)
            }
            CongestionControl::Standard => Duration::ZERO,
        }
    }

    /// The bandwidth-delay product, once both are known.
    fn bdp(&self) -> Option<u64> {
        let bw = self.bandwidth();
        // On loopback and fast LANs the minimum RTT is microseconds, far below the time an ack
        // takes to come back under load (the receiver reads and acknowledges in batches).
        let rtt = self.min_rtt?.max(MIN_SAMPLE_INTERVAL);
        (bw > 0).then_some((bw as f64 * rtt.as_secs_f64()) as u64)
    }

    fn update_phase(&mut self, now: Instant, bytes_in_flight: u64) {
        if self.phase == Phase::Startup && self.queue_high_for_startup() {
            self.filled_pipe = true;
        }
        if self.phase == Phase::Startup && self.filled_pipe {
            self.phase = Phase::Drain;
        }
        if self.phase == Phase::Drain && self.bdp().is_none_or(|bdp| bytes_in_flight <= bdp) {
            // The next round's signals still show the queue Startup built: Drain took care of it.
            self.mark_cut(now);
            self.enter_probe_bw(now);
        }
        if let Phase::ProbeBw { cycle, since } = self.phase {
            let rtt = self
                .min_rtt
                .unwrap_or(Duration::from_millis(100))
                .max(self.latest_rtt);
            let gain = PROBE_BW_GAINS[cycle];
            let elapsed = now.saturating_duration_since(since);
            let drained = gain < 1.0 && self.bdp().is_some_and(|bdp| bytes_in_flight <= bdp);
            if elapsed > rtt || drained {
                self.phase = Phase::ProbeBw {
                    cycle: (cycle + 1) % PROBE_BW_GAINS.len(),
                    since: now,
                };
            }
        }
        if std::mem::take(&mut self.probe_rtt_due) && !matches!(self.phase, Phase::ProbeRtt { .. })
        {
            self.phase = Phase::ProbeRtt {
                hold_since: None,
                hold_round: self.round,
            };
        }
        if let Phase::ProbeRtt {
            hold_since,
            hold_round,
        } = self.phase
        {
            match hold_since {
                None if bytes_in_flight <= self.probe_rtt_window() => {
                    self.phase = Phase::ProbeRtt {
                        hold_since: Some(now),
                        hold_round: self.round,
                    };
                }
                Some(t) if now.saturating_duration_since(t) >= PROBE_RTT_DURATION
                    && self.round > hold_round =>
                {
                    self.min_rtt_stamp = Some(now);
                    if self.filled_pipe {
                        self.enter_probe_bw(now);
                    } else {
                        self.phase = Phase::Startup;
                    }
                }
                _ => {}
            }
        }
    }

    fn queue_high_for_startup(&self) -> bool {
        match self.kind {
            CongestionControl::Background { .. } => self
                .delay
                .queueing_delay()
                .is_some_and(|q| q >= self.target() / 2),
            CongestionControl::Standard => false,
        }
    }

    fn enter_probe_bw(&mut self, now: Instant) {
        // Start in a cruising round, at a place that differs between flows, so that flows
        // sharing a bottleneck do not probe in step.
        let cycle = 2 + (self.round % 6) as usize;
        self.phase = Phase::ProbeBw { cycle, since: now };
    }

    fn pacing_gain(&self) -> f64 {
        match self.phase {
            Phase::Startup => STARTUP_GAIN,
            Phase::Drain => 1.0 / STARTUP_GAIN,
            Phase::ProbeBw { cycle, .. } => {
                let gain = PROBE_BW_GAINS[cycle];
                // Background looks for more only while its queue is short, and while its delay
                // control holds a cap it needs no drain round: the cap falls whenever the queue
                // passes the target.
                if !self.is_background() {
                    return gain;
                }
                if (gain < 1.0 && self.bw_cap.is_some()) || (gain > 1.0 && self.queue_high()) {
                    return 1.0;
                }
                // A round at gain g adds (g - 1) round trips of queue: on a 200 ms path, 1.25
                // adds 50 ms, twice the target, which the delay control takes for congestion
                // (it set a cap and cut it to 0.75 of the link). Background probes, and drains,
                // by at most its target's worth of queue.
                let rtt = self.min_rtt.unwrap_or(Duration::from_millis(100));
                let room = self.target().as_secs_f64() / rtt.max(MIN_SAMPLE_INTERVAL).as_secs_f64();
                1.0 + (gain - 1.0).clamp(-room, room)
            }
            Phase::ProbeRtt { .. } => 1.0,
        }
    }

    fn update_window(&mut self, newly_acked: u64) {
        if let Phase::ProbeRtt { .. } = self.phase {
            self.window = self.probe_rtt_window();
            return;
        }
        let Some(bdp) = self.bdp() else {
            // No model yet: grow by what was acknowledged, as slow start does.
            self.window = self.window.saturating_add(newly_acked);
            return;
        };
        let quanta = 3 * self.max_datagram;
        // In Startup both modes let the window double every round; Background leaves Startup
        // once its queue reaches half the target.
        let target = match self.kind {
            CongestionControl::Background { .. } if self.filled_pipe => {
                let queue = self.bandwidth() as f64 * self.target().as_secs_f64();
                bdp + (queue * self.queue_scale) as u64 + quanta
            }
            CongestionControl::Standard if self.filled_pipe => {
                let floor = self.bandwidth() as f64 * STANDARD_QUEUE_FLOOR.as_secs_f64();
                let extra =
                    (bdp as f64 * (STANDARD_WINDOW_GAIN - 1.0)).max(floor) * self.queue_scale;
                bdp + extra as u64 + quanta
            }
            // Startup: the bandwidth estimate trails a doubling flight by a round, so two of
            // its BDPs held the window below doubling (a round trip lost on a 200 ms path).
            // Until a queue shows, the window allows what the pacing does; from then on two
            // BDPs, which bounds the queue Startup's last round builds to one BDP.
            _ => {
                let queue = self
                    .delay
                    .queueing_delay()
                    .is_some_and(|q| q >= QUEUE_SIGNAL_MIN);
                let gain = if queue {
                    STARTUP_WINDOW_GAIN
                } else {
                    STARTUP_GAIN
                };
                (bdp as f64 * gain) as u64 + quanta
            }
        };
        self.window = if self.filled_pipe && self.additive {
            // A sixteenth of the window per round trip (at least one datagram): back from a
            // halving in about a dozen round trips, slow enough not to overrun a receiver that
            // the bandwidth estimate overrates.
            let growth = (newly_acked.saturating_mul(self.max_datagram) / self.window.max(1))
                .max(newly_acked / 16);
            let window = self.window.saturating_add(growth.max(1));
            if window >= target {
                self.additive = false;
            }
            window.min(target)
        } else if self.filled_pipe {
            self.window.saturating_add(newly_acked).min(target)
        } else if self.window < target {
            self.window.saturating_add(newly_acked)
        } else {
            self.window
        };
        self.window = self.window.max(self.min_window());
    }

    fn probe_rtt_window(&self) -> u64 {
        let half_bdp = (self.bdp().unwrap_or(0) as f64 * PROBE_RTT_WINDOW_GAIN) as u64;
        (PROBE_RTT_WINDOW_DATAGRAMS * self.max_datagram).max(half_bdp)
    }

    fn min_window(&self) -> u64 {
        MIN_WINDOW_DATAGRAMS * self.max_datagram
    }
}

/// One-way delay bookkeeping (RFC 6817 section 3.4): a base delay (the minimum over the last
/// `BASE_HISTORY` minutes) and a current delay (the minimum of the last `CURRENT_FILTER`
/// samples). Samples are relative to the first one, in wrapping arithmetic, so the unknown
/// clock offset between the two hosts cancels out.
///
/// The base delay takes the higher of each two consecutive samples (so there is none before the
/// second): a single sample that is far too low (its time stamp was damaged in flight) would
/// otherwise stay the base for ten minutes and make every honest sample look like a long queue.
/// A real drop in delay shows in every later sample, so it is taken one sample late.
#[derive(Debug, Clone, Default)]
struct DelayEstimator {
    reference: Option<u32>,
    /// The previous relative sample.
    last: Option<i64>,
    current: [i64; CURRENT_FILTER],
    current_len: usize,
    current_next: usize,
    /// Minimum per minute, newest last, with the minute's start.
    base: Vec<(Instant, i64)>,
    /// The path's lowest raw sample as seen by other transfers (`Controller::set_base_hint`).
    hint: Option<u32>,
}

impl DelayEstimator {
    fn sample(&mut self, owd_us: u32, now: Instant) {
        let reference = *self.reference.get_or_insert(owd_us);
        let relative = i64::from(owd_us.wrapping_sub(reference) as i32);
        self.current[self.current_next] = relative;
        self.current_next = (self.current_next + 1) % CURRENT_FILTER;
        self.current_len = (self.current_len + 1).min(CURRENT_FILTER);
        if let Some(last) = self.last.replace(relative) {
            record_minute_min(&mut self.base, last.max(relative), now);
        }
    }

    fn queueing_delay(&self) -> Option<Duration> {
        let current = self.current[..self.current_len].iter().min()?;
        let own = *self.base.iter().map(|(_, m)| m).min()?;
        let base = match (self.hint, self.reference) {
            (Some(h), Some(r)) => own.min(i64::from(h.wrapping_sub(r) as i32)),
            _ => own,
        };
        Some(Duration::from_micros((current - base).max(0) as u64))
    }
}

/// The lowest one-way delay seen on one path by all transfers of an endpoint, over the last
/// `BASE_HISTORY` minutes, as a raw wire value for [`Controller::set_base_hint`].
/// Like the base delay of [`DelayEstimator`], it takes the higher of each two consecutive
/// samples, so one damaged time stamp does not become the path's base.
#[derive(Debug, Clone, Default)]
pub(crate) struct PathBase {
    reference: Option<u32>,
    last: Option<i64>,
    minutes: Vec<(Instant, i64)>,
}

/// Folds `value` into the per-minute minima `minutes` (newest last, at most `BASE_HISTORY`).
fn record_minute_min(minutes: &mut Vec<(Instant, i64)>, value: i64, now: Instant) {
    match minutes.last_mut() {
        Some((start, min)) if now.saturating_duration_since(*start) < Duration::from_secs(60) => {
            *min = (*min).min(value)
        }
        _ => {
            if minutes.len() == BASE_HISTORY {
                minutes.remove(0);
            }
            minutes.push((now, value));
        }
    }
}

impl PathBase {
    /// Adds a raw sample (wrapping microseconds) taken at `now`.
    pub(crate) fn sample(&mut self, owd_us: u32, now: Instant) {
        let reference = *self.reference.get_or_insert(owd_us);
        let relative = i64::from(owd_us.wrapping_sub(reference) as i32);
        if let Some(last) = self.last.replace(relative) {
            record_minute_min(&mut self.minutes, last.max(relative), now);
        }
    }

    /// The lowest sample, as a raw wire value.
    pub(crate) fn base(&self) -> Option<u32> {
        let min = self.minutes.iter().map(|(_, m)| *m).min()?;
        Some(self.reference?.wrapping_add(min as i32 as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSS: u64 = 1200;

    fn background() -> Controller {
        Controller::new(
            CongestionControl::Background {
                target: Duration::from_millis(25),
            },
            MSS,
        )
    }

    impl Controller {
        /// A delay sample without a send time (the tests below only need the delay).
        fn on_delay_sample_at(&mut self, owd_us: u32, now: Instant) {
            self.on_delay_sample(owd_us, None, now);
        }
    }

    /// A fluid path for the controller alone: every round trip the sender puts out what the
    /// window and pacing allow, up to `capacity` bytes per second, and `lose(i)` says whether
    /// the i-th datagram of the round is lost; `queue_us` is the one-way queueing delay the
    /// round reports. Returns the time after the round.
    struct Path {
        now: Instant,
        rtt: Duration,
        capacity: u64,
        base_owd: u32,
    }

    impl Path {
        fn round(&mut self, cc: &mut Controller, queue_us: u32, lose: impl Fn(u64) -> bool) {
            let by_rate = cc
                .pacing_rate()
                .map_or(u64::MAX, |r| (r as f64 * self.rtt.as_secs_f64()) as u64);
            let by_path = (self.capacity as f64 * self.rtt.as_secs_f64()) as u64;
            let datagrams = (cc.window().min(by_rate).min(by_path) / MSS).max(1);
            let sent_at = self.now;
            let sent: Vec<Delivery> = (0..datagrams)
                .map(|i| cc.on_send(sent_at, i * MSS))
                .collect();
            self.now += self.rtt;
            let now = self.now;
            cc.on_rtt_sample(self.rtt + Duration::from_micros(u64::from(queue_us)), now);
            for _ in 0..CURRENT_FILTER {
                cc.on_delay_sample(self.base_owd + queue_us, Some(sent_at), now);
            }
            for (i, d) in sent.iter().enumerate() {
                if lose(i as u64) {
                    cc.on_loss(sent_at, MSS, now);
                } else {
                    cc.on_ack(d, sent_at, MSS, now);
                }
            }
            cc.on_ack_done(now, 0, datagrams * MSS);
        }
    }

    fn path() -> Path {
        Path {
            now: Instant::now(),
            rtt: Duration::from_millis(40),
            capacity: 4 << 20,
            base_owd: 20_000,
        }
    }

    /// Runs `rounds` rounds; the lowest and highest bandwidth estimate over the last 16.
    fn run(
        cc: &mut Controller,
        p: &mut Path,
        rounds: usize,
        queue_us: u32,
        lose: impl Fn(u64) -> bool,
    ) -> (u64, u64) {
        let mut seen = Vec::new();
        for _ in 0..rounds {
            p.round(cc, queue_us, &lose);
            seen.push(cc.bandwidth());
        }
        let tail = &seen[seen.len().saturating_sub(16)..];
        (
            tail.iter().copied().min().unwrap_or(0),
            tail.iter().copied().max().unwrap_or(0),
        )
    }

    #[test]
    fn startup_finds_the_path_rate_and_leaves_slow_start() {
        for mut cc in [Controller::new(CongestionControl::Standard, MSS), background()] {
            let mut p = path();
            let (low, high) = run(&mut cc, &mut p, 40, 0, |_| false);
            assert!(!cc.in_slow_start(), "{:?}", cc.kind());
            let capacity = p.capacity as f64;
            assert!(
                low as f64 >= 0.85 * capacity && high as f64 <= 1.05 * capacity,
                "{:?}: {low}..{high} against {capacity}",
                cc.kind()
            );
        }
    }

    #[test]
    fn random_loss_without_a_queue_does_not_slow_it() {
        for mut cc in [Controller::new(CongestionControl::Standard, MSS), background()] {
            let mut p = path();
            run(&mut cc, &mut p, 40, 0, |_| false);
            // One datagram in ten lost (10%), no queue: the estimate is what arrives, 0.9 of
            // the path; a controller that cut on loss would sit far below.
            let (low, _) = run(&mut cc, &mut p, 60, 0, |i| i % 10 == 3);
            assert!(
                low as f64 >= 0.75 * p.capacity as f64,
                "{:?}: {low}",
                cc.kind()
            );
        }
    }

    #[test]
    fn loss_with_a_queue_halves_the_window_once_and_it_grows_back() {
        let mut cc = Controller::new(CongestionControl::Standard, MSS);
        let mut p = path();
        run(&mut cc, &mut p, 40, 0, |_| false);
        let (window, bw) = (cc.window(), cc.bandwidth());
        // 10% lost while the queue holds 20 ms (half the RTT): a congestion signal.
        p.round(&mut cc, 20_000, |i| i % 10 == 0);
        p.round(&mut cc, 20_000, |i| i % 10 == 0);
        let cut = cc.window();
        assert!(cut <= window * 11 / 20, "{cut} after {window}");
        // One cut per episode: the next round, still showing the old queue, cuts no further.
        p.round(&mut cc, 20_000, |i| i % 10 == 0);
        assert!(cc.window() >= cut, "{} after {cut}", cc.window());
        // The pacing rate stays the model's; the window grows back one datagram per round.
        assert!(cc.bandwidth() >= bw / 2, "{} after {bw}", cc.bandwidth());
        let before = cc.window();
        run(&mut cc, &mut p, 12, 0, |_| false);
        assert!(cc.window() > before, "{} after {before}", cc.window());
    }

    #[test]
    fn a_few_losses_in_a_short_round_are_no_signal() {
        let mut cc = Controller::new(CongestionControl::Standard, MSS);
        let mut p = path();
        p.capacity = 200_000; // 6 datagrams per round trip
        run(&mut cc, &mut p, 30, 0, |_| false);
        let before = cc.bandwidth();
        // Two of six lost (33%), with a queue: fewer than LOSS_EVENTS_MIN datagrams.
        run(&mut cc, &mut p, 6, 20_000, |i| i < 2);
        assert!(cc.bandwidth() >= before * 9 / 10, "{} after {before}", cc.bandwidth());
    }

    /// ProbeBw's gains over 24 round trips of a quiet path, as a range of pacing rate over
    /// bandwidth.
    fn probe_gains(cc: &mut Controller, rtt: Duration) -> (f64, f64) {
        let mut p = Path { rtt, ..path() };
        run(cc, &mut p, 40, 0, |_| false);
        let mut gains = Vec::new();
        for _ in 0..24 {
            p.round(cc, 0, |_| false);
            let rate = cc.pacing_rate().unwrap_or(0) as f64;
            gains.push(rate / cc.bandwidth() as f64);
        }
        let low = gains.iter().copied().fold(f64::MAX, f64::min);
        let high = gains.iter().copied().fold(0.0, f64::max);
        (low, high)
    }

    /// A probe round at 1.25 queues a quarter of a round trip: on a 200 ms path that is 50 ms,
    /// twice Background's target, and its delay control took the probe for congestion (it set a
    /// cap and cut it to 0.75 of the link on two of five seeds of the 200 ms lossy test).
    /// Background probes and drains by at most its target's worth; Standard keeps 1.25 / 0.75.
    #[test]
    fn background_probes_by_at_most_its_target_of_queue() {
        let (low, high) = probe_gains(&mut background(), Duration::from_millis(200));
        let room = 25.0 / 200.0;
        assert!(
            (high - (1.0 + room)).abs() < 0.01 && (low - (1.0 - room)).abs() < 0.01,
            "200 ms: {low:.3}..{high:.3}"
        );
        // On a 40 ms path a quarter round trip (10 ms) is within the target: unchanged.
        let (low, high) = probe_gains(&mut background(), Duration::from_millis(40));
        assert!(
            (high - 1.25).abs() < 0.01 && (low - 0.75).abs() < 0.01,
            "40 ms: {low:.3}..{high:.3}"
        );
        let standard = &mut Controller::new(CongestionControl::Standard, MSS);
        let (low, high) = probe_gains(standard, Duration::from_millis(200));
        assert!(
            (high - 1.25).abs() < 0.01 && (low - 0.75).abs() < 0.01,
            "Standard, 200 ms: {low:.3}..{high:.3}"
        );
    }

    #[test]
    fn background_backs_off_above_its_target_and_standard_does_not() {
        for (mut cc, yields) in [
            (background(), true),
            (Controller::new(CongestionControl::Standard, MSS), false),
        ] {
            let mut p = path();
            run(&mut cc, &mut p, 40, 0, |_| false);
            let before = cc.bandwidth();
            // 60 ms of queue someone else built: 2.4 times the target, no loss.
            run(&mut cc, &mut p, 6, 60_000, |_| false);
            let after = cc.bandwidth();
            if yields {
                assert!(
                    (after as f64) < 0.5 * before as f64,
                    "background: {after} after {before}"
                );
                // The window holds at most the target's worth of queue.
                let bdp = after as f64 * p.rtt.as_secs_f64();
                let queue = after as f64 * 0.025;
                assert!(cc.window() as f64 <= bdp + queue + 3.0 * MSS as f64 + 1.0);
            } else {
                assert!(after >= before * 9 / 10, "standard: {after} after {before}");
            }
        }
    }

    #[test]
    fn background_flows_sharing_a_queue_converge() {
        // Two Background flows on paths that never limit them, held at 3 and 1 MB/s, see the
        // same queue: above the target for a few rounds, then below it for longer. The
        // multiplicative decrease takes more from the faster one than the additive increase
        // gives back, so the ratio shrinks (a rise in proportion to the cap would keep it at 3).
        let mut flows = [background(), background()];
        let mut paths = [path(), path()];
        for (cc, p) in flows.iter_mut().zip(&mut paths) {
            p.capacity = 8 << 20;
            run(cc, p, 40, 0, |_| false);
            // One round above the target makes the cap.
            p.round(cc, 40_000, |_| false);
        }
        flows[0].bw_cap = Some(3_000_000);
        flows[1].bw_cap = Some(1_000_000);
        let ratio = |f: &[Controller; 2]| f[0].bandwidth() as f64 / f[1].bandwidth() as f64;
        let before = ratio(&flows);
        for _ in 0..8 {
            for (cc, p) in flows.iter_mut().zip(&mut paths) {
                run(cc, p, 2, 40_000, |_| false);
                run(cc, p, 12, 5_000, |_| false);
            }
        }
        let after = ratio(&flows);
        assert!(before > 2.9 && after < 1.5, "{before} -> {after}");
    }

    #[test]
    fn probe_rtt_drains_to_half_the_pipe_every_five_seconds() {
        let mut cc = Controller::new(CongestionControl::Standard, MSS);
        let mut p = path();
        let bdp = (p.capacity as f64 * p.rtt.as_secs_f64()) as u64;
        let (mut smallest_before, mut smallest_after) = (u64::MAX, u64::MAX);
        let start = p.now;
        while p.now < start + MIN_RTT_WINDOW + Duration::from_secs(2) {
            // After the first rounds the queue never drains, so the minimum RTT is never seen
            // again.
            let queue = if p.now < start + Duration::from_secs(1) { 0 } else { 1_000 };
            p.round(&mut cc, queue, |_| false);
            let since = p.now - start;
            if since > Duration::from_secs(2) && since < MIN_RTT_WINDOW {
                smallest_before = smallest_before.min(cc.window());
            }
            if since > MIN_RTT_WINDOW {
                smallest_after = smallest_after.min(cc.window());
            }
        }
        // Never before the minimum RTT expires; then half the bandwidth-delay product (the
        // bandwidth estimate runs a little above the path's, hence the tolerance).
        assert!(smallest_before > bdp, "{smallest_before} vs {bdp}");
        let half = bdp / 2;
        assert!(
            smallest_after >= half && smallest_after <= half + half / 10,
            "{smallest_after} vs {half}"
        );
        // And it comes back.
        assert!(cc.window() > bdp, "{} vs {bdp}", cc.window());
    }

    #[test]
    fn never_below_minimum() {
        for kind in [CongestionControl::Standard, CongestionControl::default()] {
            let mut cc = Controller::new(kind, 1000);
            cc.on_persistent_congestion(Instant::now());
            assert_eq!(cc.window(), 2000);
            cc.on_acks_withdrawn(u64::MAX);
            assert_eq!(cc.window(), 2000);
            cc.set_window(0);
            assert_eq!(cc.window(), 2000);
        }
    }

    #[test]
    fn withdrawn_acks_take_back_twice_their_size_and_their_delivery() {
        let t0 = Instant::now();
        let mut cc = Controller::new(CongestionControl::Standard, 1000);
        let d = cc.on_send(t0, 0);
        cc.on_ack(&d, t0, 1000, t0 + Duration::from_millis(10));
        cc.on_ack_done(t0 + Duration::from_millis(10), 0, 1000);
        let initial = INITIAL_WINDOW_DATAGRAMS * 1000;
        assert_eq!(cc.window(), initial + 1000);
        cc.on_acks_withdrawn(3000);
        assert_eq!(cc.window(), initial - 5000);
        assert_eq!(cc.delivered, 0);
        assert!(cc.in_slow_start());
    }

    #[test]
    fn sharing_a_window_scales_the_bandwidth_with_it() {
        let mut cc = Controller::new(CongestionControl::Standard, MSS);
        let mut p = path();
        run(&mut cc, &mut p, 40, 0, |_| false);
        let (bw, window) = (cc.bandwidth(), cc.window());
        cc.set_window(window / 2);
        let halved = cc.bandwidth() as f64 / bw as f64;
        assert!((0.45..=0.55).contains(&halved), "{halved}");
    }

    #[test]
    fn delay_samples_survive_clock_wrap() {
        let t0 = Instant::now();
        let mut cc = background();
        cc.on_delay_sample_at(u32::MAX - 1000, t0);
        cc.on_delay_sample_at(u32::MAX - 1000, t0);
        // 3000 us later in wrapping arithmetic.
        for _ in 0..4 {
            cc.on_delay_sample_at(1999, t0);
        }
        assert_eq!(cc.queueing_delay(), Some(Duration::from_micros(3000)));
    }

    #[test]
    fn one_damaged_low_sample_does_not_become_the_base() {
        let t0 = Instant::now();
        let mut cc = background();
        for _ in 0..4 {
            cc.on_delay_sample_at(50_000, t0);
        }
        // A time stamp damaged in flight makes one sample 40 ms too low.
        cc.on_delay_sample_at(10_000, t0);
        for _ in 0..4 {
            cc.on_delay_sample_at(52_000, t0);
        }
        assert_eq!(cc.queueing_delay(), Some(Duration::from_micros(2000)));
        // A real drop shows in every later sample and is taken.
        for _ in 0..4 {
            cc.on_delay_sample_at(30_000, t0);
        }
        assert_eq!(cc.queueing_delay(), Some(Duration::ZERO));
        for _ in 0..4 {
            cc.on_delay_sample_at(31_000, t0);
        }
        assert_eq!(cc.queueing_delay(), Some(Duration::from_micros(1000)));

        let mut path = PathBase::default();
        for owd in [50_000, 50_000, 10_000, 52_000, 52_000] {
            path.sample(owd, t0);
        }
        assert_eq!(path.base(), Some(50_000));

        // Nor does a damaged first sample.
        let mut cc = background();
        cc.on_delay_sample_at(10_000, t0);
        assert_eq!(cc.queueing_delay(), None);
        for _ in 0..4 {
            cc.on_delay_sample_at(50_000, t0);
        }
        assert_eq!(cc.queueing_delay(), Some(Duration::ZERO));
    }

}
