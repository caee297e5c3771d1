//! Congestion control: how many bytes may be in flight.
//!
//! Two controllers, chosen per endpoint with [`CongestionControl`]:
//!
//! - **Background** (the default): delay-based, after LEDBAT (RFC 6817). It estimates the
//!   queueing delay its own traffic adds at the bottleneck from one-way delay samples and steers
//!   the window so that delay stays near a target (25 ms by default). It yields to game packets
//!   sharing the bottleneck long before the queue fills, which a loss-based controller never does.
//! - **Standard**: NewReno (RFC 9002 section 7), for dedicated links: it fills the bottleneck
//!   queue until a loss.
//!
//! Both halve the window on loss (once per recovery period: a loss of a datagram sent before
//! the current recovery began does not reduce it again) and collapse to the minimum window on
//! persistent congestion.

use std::time::{Duration, Instant};

/// Initial window, in datagrams (RFC 9002 suggests 10).
const INITIAL_WINDOW_DATAGRAMS: u64 = 10;
/// The window never shrinks below this many datagrams.
const MIN_WINDOW_DATAGRAMS: u64 = 2;
/// One-way delay samples the current-delay filter keeps (RFC 6817 CURRENT_FILTER).
const CURRENT_FILTER: usize = 4;
/// Minutes of base-delay history (RFC 6817 BASE_HISTORY), one minimum per minute.
const BASE_HISTORY: usize = 10;
/// A queueing delay this many times the target is treated like a loss: the window halves (once
/// per round trip). LEDBAT's linear decrease alone drains an overfull queue too slowly.
const OVERLOAD_FACTOR: u32 = 4;
/// The largest queueing-delay target honoured (RFC 6817: TARGET MUST NOT exceed 100 ms).
const MAX_TARGET: Duration = Duration::from_millis(100);
/// Strength of the multiplicative decrease above the target (LEDBAT++ uses 1). Larger values
/// make competing background transfers converge to equal shares faster.
const DECREASE_GAIN: i128 = 4;

/// Which congestion controller a transfer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CongestionControl {
    /// Delay-based background transfer (LEDBAT-like): keeps the queueing delay it causes near
    /// `target`, so game packets behind the same bottleneck keep their latency.
    Background {
        /// Queueing delay to aim for (RFC 6817 TARGET; 25 ms by default). Clamped to 1 to
        /// 100 ms.
        target: Duration,
    },
    /// Loss-based (NewReno), for dedicated links.
    Standard,
}

impl Default for CongestionControl {
    fn default() -> Self {
        CongestionControl::Background {
            target: Duration::from_millis(25),
        }
    }
}

/// The controller of one transfer.
///
/// Call [`on_ack`](Self::on_ack) for every newly acknowledged datagram,
/// [`on_delay_sample`](Self::on_delay_sample) for every acknowledgement that reports a newer
/// datagram, [`on_loss`](Self::on_loss) for every datagram declared lost, and compare
/// [`window`](Self::window) with the bytes in flight before sending.
#[derive(Debug, Clone)]
pub struct Controller {
    kind: CongestionControl,
    max_datagram: u64,
    window: u64,
    ssthresh: u64,
    recovery_start: Option<Instant>,
    bytes_acked_in_avoidance: u64,
    delay: DelayEstimator,
}

impl Controller {
    /// A controller of `kind` for datagrams of at most `max_datagram` bytes.
    pub fn new(kind: CongestionControl, max_datagram: u64) -> Self {
        let max_datagram = max_datagram.max(1);
        Controller {
            kind,
            max_datagram,
            window: INITIAL_WINDOW_DATAGRAMS * max_datagram,
            ssthresh: u64::MAX,
            recovery_start: None,
            bytes_acked_in_avoidance: 0,
            delay: DelayEstimator::default(),
        }
    }

    #[cfg_attr(not(feature = "internals"), allow(dead_code))] // used by tests and benches
    /// NewReno, as [`Controller::new`] with [`CongestionControl::Standard`].
    pub fn new_reno(max_datagram: u64) -> Self {
        Self::new(CongestionControl::Standard, max_datagram)
    }

    /// Bytes that may be in flight now.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// Sets the window, as an endpoint does to share one path's window evenly among the
    /// transfers on it. Never below the minimum window.
    pub fn set_window(&mut self, window: u64) {
        self.window = window.max(self.min_window());
        self.bytes_acked_in_avoidance = 0;
    }

    /// Acknowledgements for `bytes` turned out false (the receiver's later acks show the data
    /// missing): take back what they gave, the window growth they allowed (at most their size)
    /// and the room they freed in flight (their size). Unlike a loss, this is not a congestion
    /// signal, so slow start and the recovery period are left as they are.
    pub fn on_acks_withdrawn(&mut self, bytes: u64) {
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

    /// True while the controller is in slow start.
    pub fn in_slow_start(&self) -> bool {
        self.window < self.ssthresh
    }

    fn in_recovery(&self, sent: Instant) -> bool {
        self.recovery_start.is_some_and(|start| sent <= start)
    }

    /// A one-way delay sample from an acknowledgement: the receiver's clock minus the send
    /// time stamp of the newest datagram it had, in wrapping microseconds (only changes matter).
    pub fn on_delay_sample(&mut self, owd_us: u32, now: Instant) {
        self.delay.sample(owd_us, now);
    }

    /// The lowest one-way delay (wrapping microseconds) other transfers saw on the same path,
    /// measured against the same clocks. The base delay becomes the lower of it and this
    /// transfer's own minimum.
    pub fn set_base_hint(&mut self, owd_us: u32) {
        self.delay.hint = Some(owd_us);
    }

    /// A datagram of `bytes` sent at `sent` was acknowledged at `now`. `app_limited` says the
    /// sender was not using its window (less than half of it in flight): then the window does
    /// not grow (RFC 7661), or a transfer held back by a rate cap would build a window it never
    /// tested, and spend it all at once on a client that vanished.
    pub fn on_ack(&mut self, sent: Instant, bytes: u64, now: Instant, app_limited: bool) {
        if self.in_recovery(sent) {
            return;
        }
        let target = match self.kind {
            CongestionControl::Standard if app_limited => return,
            CongestionControl::Standard => return self.reno_increase(bytes),
            CongestionControl::Background { target } => {
                target.clamp(Duration::from_millis(1), MAX_TARGET)
            }
        };
        let Some(queueing) = self.delay.queueing_delay() else {
            if !app_limited {
                self.reno_increase(bytes);
            }
            return;
        };
        if queueing > target.saturating_mul(OVERLOAD_FACTOR) {
            self.reduce(now);
            return;
        }
        if self.in_slow_start() {
            if queueing < target / 2 {
                if !app_limited {
                    self.window = self.window.saturating_add(bytes);
                }
                return;
            }
            // Leave slow start as soon as our queue reaches half the target.
            self.ssthresh = self.window;
        }
        // Below the target: RFC 6817 section 2.4.2, cwnd += GAIN * off_target * bytes_acked *
        // MSS / cwnd with GAIN = 1 (at most one datagram per round trip). Above it: a
        // multiplicative decrease, W * (queueing / target - 1) per round trip and at most half
        // (as LEDBAT++ does), so that competing background transfers converge to equal shares.
        let target_us = target.as_micros() as i128;
        let queueing_us = queueing.as_micros() as i128;
        let window = i128::from(self.window.max(1));
        let bytes = i128::from(bytes);
        let change = if queueing_us <= target_us && app_limited {
            0
        } else if queueing_us <= target_us {
            (target_us - queueing_us) * bytes * i128::from(self.max_datagram) / (target_us * window)
        } else {
            -((bytes * (queueing_us - target_us) * DECREASE_GAIN / target_us).min(bytes / 2))
        };
        let window = (window + change).max(i128::from(self.min_window()));
        self.window = window.min(i128::from(u64::MAX)) as u64;
    }

    fn reno_increase(&mut self, bytes: u64) {
        if self.in_slow_start() {
            self.window = self.window.saturating_add(bytes);
            return;
        }
        self.bytes_acked_in_avoidance += bytes;
        if self.bytes_acked_in_avoidance >= self.window {
            self.bytes_acked_in_avoidance -= self.window;
            self.window = self.window.saturating_add(self.max_datagram);
        }
    }

    /// A datagram sent at `sent` was declared lost at `now`: halve the window, once per recovery
    /// period.
    pub fn on_loss(&mut self, sent: Instant, now: Instant) {
        if self.in_recovery(sent) {
            return;
        }
        self.reduce(now);
    }

    fn reduce(&mut self, now: Instant) {
        if self.recovery_start.is_some_and(|start| now <= start) {
            return;
        }
        self.recovery_start = Some(now);
        self.window = (self.window / 2).max(self.min_window());
        self.ssthresh = self.window;
        self.bytes_acked_in_avoidance = 0;
    }

    /// Every datagram over a long period was lost (repeated probe timeouts): start again from
    /// the minimum window.
    pub fn on_persistent_congestion(&mut self) {
        self.window = self.min_window();
        self.recovery_start = None;
        self.bytes_acked_in_avoidance = 0;
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

    #[test]
    fn slow_start_doubles_then_loss_halves_once_per_recovery() {
        let t0 = Instant::now();
        let mut cc = Controller::new_reno(1000);
        assert_eq!(cc.window(), 10_000);
        for _ in 0..10 {
            cc.on_ack(t0, 1000, t0, false);
        }
        assert_eq!(cc.window(), 20_000);
        let t1 = t0 + Duration::from_millis(100);
        cc.on_loss(t0, t1);
        assert_eq!(cc.window(), 10_000);
        // A second loss from before the recovery started changes nothing.
        cc.on_loss(t0, t1 + Duration::from_millis(1));
        assert_eq!(cc.window(), 10_000);
        // Acks of old packets do not grow the window during recovery.
        cc.on_ack(t0, 1000, t1, false);
        assert_eq!(cc.window(), 10_000);
        // In avoidance, one datagram per window's worth of acks.
        let t2 = t1 + Duration::from_millis(1);
        for _ in 0..10 {
            cc.on_ack(t2, 1000, t2, false);
        }
        assert_eq!(cc.window(), 11_000);
        // A loss after recovery ended halves again.
        cc.on_loss(t2, t2 + Duration::from_millis(50));
        assert_eq!(cc.window(), 5_500);
    }

    #[test]
    fn never_below_minimum() {
        let t0 = Instant::now();
        for kind in [CongestionControl::Standard, CongestionControl::default()] {
            let mut cc = Controller::new(kind, 1000);
            for i in 0..20u64 {
                let t = t0 + Duration::from_millis(i * 10);
                cc.on_loss(t, t);
            }
            assert_eq!(cc.window(), 2000);
            cc.on_persistent_congestion();
            assert_eq!(cc.window(), 2000);
        }
    }

    fn background() -> Controller {
        Controller::new(
            CongestionControl::Background {
                target: Duration::from_millis(25),
            },
            1000,
        )
    }

    #[test]
    fn background_grows_below_target_and_shrinks_above_it() {
        let t0 = Instant::now();
        let mut cc = background();
        // Base delay 10 ms (offset is arbitrary: only differences matter).
        let base = 4_000_000_000u32;
        for _ in 0..4 {
            cc.on_delay_sample(base, t0);
        }
        assert_eq!(cc.queueing_delay(), Some(Duration::ZERO));
        // Slow start while the queue is short.
        for _ in 0..10 {
            cc.on_ack(t0, 1000, t0, false);
        }
        assert_eq!(cc.window(), 20_000);
        // Queue at 20 ms: above half the target, so slow start ends and growth is gentle.
        for _ in 0..4 {
            cc.on_delay_sample(base.wrapping_add(20_000), t0);
        }
        let w = cc.window();
        for _ in 0..20 {
            cc.on_ack(t0, 1000, t0, false);
        }
        assert!(
            cc.window() > w && cc.window() <= w + 1000,
            "{} vs {w}",
            cc.window()
        );
        assert!(!cc.in_slow_start());
        // Queue at 40 ms: above the target, the window shrinks.
        for _ in 0..4 {
            cc.on_delay_sample(base.wrapping_add(40_000), t0);
        }
        let w = cc.window();
        for _ in 0..20 {
            cc.on_ack(t0, 1000, t0, false);
        }
        assert!(cc.window() < w, "{} vs {w}", cc.window());
        // Queue at 200 ms (8x the target): halves like a loss, once per round.
        for _ in 0..4 {
            cc.on_delay_sample(base.wrapping_add(200_000), t0);
        }
        let w = cc.window();
        let t1 = t0 + Duration::from_millis(1);
        cc.on_ack(t1, 1000, t1, false);
        assert_eq!(cc.window(), (w / 2).max(2000));
    }

    #[test]
    fn delay_samples_survive_clock_wrap() {
        let t0 = Instant::now();
        let mut cc = background();
        cc.on_delay_sample(u32::MAX - 1000, t0);
        cc.on_delay_sample(u32::MAX - 1000, t0);
        // 3000 us later in wrapping arithmetic.
        for _ in 0..4 {
            cc.on_delay_sample(1999, t0);
        }
        assert_eq!(cc.queueing_delay(), Some(Duration::from_micros(3000)));
    }

    #[test]
    fn withdrawn_acks_take_back_twice_their_size_without_leaving_slow_start() {
        let t0 = Instant::now();
        let mut cc = Controller::new_reno(1000);
        for _ in 0..10 {
            cc.on_ack(t0, 1000, t0, false);
        }
        assert_eq!(cc.window(), 20_000);
        cc.on_acks_withdrawn(3000);
        assert_eq!(cc.window(), 14_000);
        assert!(cc.in_slow_start());
        cc.on_acks_withdrawn(u64::MAX);
        assert_eq!(cc.window(), 2000);
    }

    #[test]
    fn one_damaged_low_sample_does_not_become_the_base() {
        let t0 = Instant::now();
        let mut cc = background();
        for _ in 0..4 {
            cc.on_delay_sample(50_000, t0);
        }
        // A time stamp damaged in flight makes one sample 40 ms too low.
        cc.on_delay_sample(10_000, t0);
        for _ in 0..4 {
            cc.on_delay_sample(52_000, t0);
        }
        assert_eq!(cc.queueing_delay(), Some(Duration::from_micros(2000)));
        // A real drop shows in every later sample and is taken.
        for _ in 0..4 {
            cc.on_delay_sample(30_000, t0);
        }
        assert_eq!(cc.queueing_delay(), Some(Duration::ZERO));
        for _ in 0..4 {
            cc.on_delay_sample(31_000, t0);
        }
        assert_eq!(cc.queueing_delay(), Some(Duration::from_micros(1000)));

        let mut path = PathBase::default();
        for owd in [50_000, 50_000, 10_000, 52_000, 52_000] {
            path.sample(owd, t0);
        }
        assert_eq!(path.base(), Some(50_000));

        // Nor does a damaged first sample.
        let mut cc = background();
        cc.on_delay_sample(10_000, t0);
        assert_eq!(cc.queueing_delay(), None);
        for _ in 0..4 {
            cc.on_delay_sample(50_000, t0);
        }
        assert_eq!(cc.queueing_delay(), Some(Duration::ZERO));
    }

    #[test]
    fn standard_ignores_delay() {
        let t0 = Instant::now();
        let mut cc = Controller::new_reno(1000);
        cc.on_delay_sample(0, t0);
        for _ in 0..4 {
            cc.on_delay_sample(1_000_000, t0);
        }
        cc.on_ack(t0, 1000, t0, false);
        assert_eq!(cc.window(), 11_000);
    }
}
