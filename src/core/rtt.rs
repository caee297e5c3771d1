//! Round-trip time estimation (RFC 6298, as refined by RFC 9002 section 5).
//!
//! The sender measures one RTT sample per acknowledgement that newly
//! acknowledges its most recently sent datagram, feeds it to
//! [`RttEstimator::update`], and reads back the smoothed values to arm the
//! probe timeout ([`RttEstimator::pto`]) and to declare datagrams lost by
//! time ([`RttEstimator::loss_delay`]).
//!
//! All arithmetic is done on `u128` nanoseconds and saturates, so no input
//! (even `Duration::MAX`) can panic.

use std::time::Duration;

/// The coarsest timer resolution the estimator assumes (RFC 9002's
/// `kGranularity`): timeouts and loss delays are never shorter than this.
///
/// Callers need not use it directly; it bounds [`RttEstimator::pto`] and
/// [`RttEstimator::loss_delay`] from below.
pub const TIMER_GRANULARITY: Duration = Duration::from_millis(1);

/// Smoothed round-trip time state for one peer.
///
/// Create one per connection with [`RttEstimator::new`] (typically with an
/// initial RTT of a few hundred milliseconds, or a cached value for a known
/// peer), call [`update`](Self::update) for every RTT sample, and read
/// [`pto`](Self::pto) / [`loss_delay`](Self::loss_delay) when arming timers.
#[derive(Clone, Debug)]
pub struct RttEstimator {
    /// Latest raw sample (the initial RTT before any sample).
    latest: Duration,
    /// Exponentially weighted moving average of the adjusted samples.
    smoothed: Duration,
    /// Mean deviation of the adjusted samples.
    rttvar: Duration,
    /// Minimum raw sample seen (the initial RTT before any sample).
    min: Duration,
    /// Whether `update` has been called at least once.
    has_sample: bool,
}

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Duration as a nanosecond count, which always fits a `u128`.
fn nanos(d: Duration) -> u128 {
    d.as_nanos()
}

/// Nanoseconds back to a `Duration`, saturating at `Duration::MAX`.
fn from_nanos(n: u128) -> Duration {
    match u64::try_from(n / NANOS_PER_SEC) {
        // The remainder is below 10^9 and always fits a u32.
        Ok(secs) => Duration::new(secs, (n % NANOS_PER_SEC) as u32),
        Err(_) => Duration::MAX,
    }
}

impl RttEstimator {
    /// Creates an estimator that assumes `initial_rtt` until the first
    /// sample: `smoothed() == initial_rtt`, `rttvar() == initial_rtt / 2`,
    /// `min() == latest() == initial_rtt`.
    ///
    /// Call it when a connection starts; the first [`update`](Self::update)
    /// then replaces the assumption entirely.
    pub fn new(initial_rtt: Duration) -> Self {
        Self {
            latest: initial_rtt,
            smoothed: initial_rtt,
            rttvar: initial_rtt / 2,
            min: initial_rtt,
            has_sample: false,
        }
    }

    /// Feeds one RTT sample: `sample` is the time from sending a datagram to
    /// receiving its acknowledgement, `ack_delay` is the delay the peer
    /// reports having held that acknowledgement (already capped by the
    /// caller at the peer's max ack delay, if it wishes to).
    ///
    /// Follows RFC 9002 section 5.3: `min()` is updated from the raw
    /// sample; `ack_delay` is subtracted only if `sample >= min() +
    /// ack_delay`; the first sample sets `smoothed = sample`, `rttvar =
    /// sample / 2`, later ones blend with weights 7/8, 1/8 and 3/4, 1/4.
    /// After calling it, re-arm any pending timer from [`pto`](Self::pto).
    pub fn update(&mut self, sample: Duration, ack_delay: Duration) {
        self.latest = sample;
        if !self.has_sample {
            self.has_sample = true;
            self.min = sample;
            self.smoothed = sample;
            self.rttvar = sample / 2;
            return;
        }
        self.min = self.min.min(sample);
        let adjusted = if sample >= self.min.saturating_add(ack_delay) {
            sample.saturating_sub(ack_delay)
        } else {
            sample
        };
        let (s, a, v) = (nanos(self.smoothed), nanos(adjusted), nanos(self.rttvar));
        let deviation = s.abs_diff(a);
        // Each operand is below 2^94, so these never overflow a u128.
        self.rttvar = from_nanos((3 * v + deviation) / 4);
        self.smoothed = from_nanos((7 * s + a) / 8);
    }

    #[cfg_attr(not(feature = "internals"), allow(dead_code))] // used by tests and benches
    /// Returns `true` once [`update`](Self::update) has been called.
    ///
    /// Use it to decide whether the values are measured or still the
    /// initial guess (e.g. to be more conservative before the first sample).
    pub fn has_sample(&self) -> bool {
        self.has_sample
    }

    /// Returns the smoothed RTT (`initial_rtt` before any sample).
    ///
    /// Use it to size windows (bandwidth-delay product) and to schedule
    /// acknowledgement-related work.
    pub fn smoothed(&self) -> Duration {
        self.smoothed
    }

    #[cfg_attr(not(feature = "internals"), allow(dead_code))] // used by tests and benches
    /// Returns the RTT variation (`initial_rtt / 2` before any sample).
    ///
    /// Mostly useful for diagnostics; [`pto`](Self::pto) already folds it in.
    pub fn rttvar(&self) -> Duration {
        self.rttvar
    }

    #[cfg_attr(not(feature = "internals"), allow(dead_code))] // used by tests and benches
    /// Returns the minimum raw RTT sample seen (`initial_rtt` before any
    /// sample).
    ///
    /// Use it as the path's propagation delay, e.g. for congestion control
    /// or to judge whether queueing delay is building up.
    pub fn min(&self) -> Duration {
        self.min
    }

    #[cfg_attr(not(feature = "internals"), allow(dead_code))] // used by tests and benches
    /// Returns the most recent raw sample (`initial_rtt` before any sample).
    ///
    /// Use it for diagnostics; [`loss_delay`](Self::loss_delay) already
    /// takes it into account.
    pub fn latest(&self) -> Duration {
        self.latest
    }

    /// Returns the probe timeout: `smoothed + max(4 * rttvar,
    /// TIMER_GRANULARITY) + max_ack_delay` (saturating).
    ///
    /// Arm the retransmission/probe timer this long after the last
    /// ack-eliciting send; when it fires, send a probe and double the
    /// timeout for each consecutive expiry (the caller keeps that count).
    pub fn pto(&self, max_ack_delay: Duration) -> Duration {
        let var_term = from_nanos(4 * nanos(self.rttvar)).max(TIMER_GRANULARITY);
        self.smoothed
            .saturating_add(var_term)
            .saturating_add(max_ack_delay)
    }

    /// Returns RFC 9002's time threshold for loss detection:
    /// `max(9/8 * max(smoothed, latest), TIMER_GRANULARITY)`.
    ///
    /// A datagram sent this long before the send time of a datagram that was
    /// acknowledged is declared lost; the caller queues its chunks for
    /// retransmission and arms its loss timer for the earliest unacked send
    /// time plus this delay.
    pub fn loss_delay(&self) -> Duration {
        let base = nanos(self.smoothed.max(self.latest));
        from_nanos(9 * base / 8).max(TIMER_GRANULARITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn before_any_sample_uses_initial() {
        let r = RttEstimator::new(ms(300));
        assert!(!r.has_sample());
        assert_eq!(r.smoothed(), ms(300));
        assert_eq!(r.rttvar(), ms(150));
        assert_eq!(r.min(), ms(300));
        assert_eq!(r.latest(), ms(300));
        // 300 + 4*150 + 25
        assert_eq!(r.pto(ms(25)), ms(925));
        // 9/8 * 300
        assert_eq!(r.loss_delay(), Duration::from_micros(337_500));
    }

    #[test]
    fn first_sample_replaces_initial_and_ignores_ack_delay() {
        let mut r = RttEstimator::new(ms(333));
        r.update(ms(100), ms(40));
        assert!(r.has_sample());
        assert_eq!(r.smoothed(), ms(100));
        assert_eq!(r.rttvar(), ms(50));
        assert_eq!(r.min(), ms(100));
        assert_eq!(r.latest(), ms(100));
    }

    #[test]
    fn second_sample_blends_by_hand() {
        let mut r = RttEstimator::new(ms(333));
        r.update(ms(100), Duration::ZERO);
        r.update(ms(180), Duration::ZERO);
        // rttvar = 3/4*50 + 1/4*|100-180| = 37.5 + 20 = 57.5
        assert_eq!(r.rttvar(), Duration::from_micros(57_500));
        // smoothed = 7/8*100 + 1/8*180 = 87.5 + 22.5 = 110
        assert_eq!(r.smoothed(), ms(110));
        assert_eq!(r.min(), ms(100));
        assert_eq!(r.latest(), ms(180));
    }

    #[test]
    fn converges_toward_constant_sample() {
        let mut r = RttEstimator::new(ms(500));
        r.update(ms(20), Duration::ZERO);
        for _ in 0..200 {
            r.update(ms(80), Duration::ZERO);
        }
        let err = nanos(r.smoothed()).abs_diff(nanos(ms(80)));
        assert!(err < 1_000, "smoothed {:?}", r.smoothed());
        assert!(
            r.rttvar() < Duration::from_micros(1),
            "rttvar {:?}",
            r.rttvar()
        );
        assert_eq!(r.min(), ms(20));
        // With rttvar ~0 the granularity floor applies: 80 + 1 + 10.
        let pto = r.pto(ms(10));
        assert!(nanos(pto).abs_diff(nanos(ms(91))) < 1_000, "pto {pto:?}");
    }

    #[test]
    fn ack_delay_subtracted_only_when_plausible() {
        let mut r = RttEstimator::new(ms(333));
        r.update(ms(100), Duration::ZERO); // min = 100, smoothed = 100, var = 50
                                           // 130 >= 100 + 20: the adjusted sample is 110.
        r.update(ms(130), ms(20));
        assert_eq!(r.smoothed(), Duration::from_micros(101_250)); // (700 + 110) / 8
        assert_eq!(r.rttvar(), Duration::from_micros(40_000)); // 37.5 + 10/4
        assert_eq!(r.latest(), ms(130)); // latest stays raw

        let mut r = RttEstimator::new(ms(333));
        r.update(ms(100), Duration::ZERO);
        // 115 < 100 + 20: ack delay would push below min_rtt, so it is ignored.
        r.update(ms(115), ms(20));
        assert_eq!(r.smoothed(), Duration::from_micros(101_875)); // (700 + 115) / 8
        assert_eq!(r.rttvar(), Duration::from_micros(41_250)); // 37.5 + 15/4
        assert_eq!(r.min(), ms(100));
    }

    #[test]
    fn min_rtt_uses_raw_sample() {
        let mut r = RttEstimator::new(ms(333));
        r.update(ms(100), Duration::ZERO);
        // The raw sample sets min even though ack delay would make it smaller.
        r.update(ms(60), ms(50));
        assert_eq!(r.min(), ms(60));
        // 60 >= 60 + 50 is false, so the sample is used unadjusted.
        assert_eq!(r.smoothed(), Duration::from_micros(95_000)); // (700 + 60) / 8
    }

    #[test]
    fn pto_and_loss_delay_by_hand() {
        let mut r = RttEstimator::new(ms(333));
        r.update(ms(40), Duration::ZERO); // smoothed 40, var 20
        assert_eq!(r.pto(ms(25)), ms(40 + 80 + 25));
        assert_eq!(r.pto(Duration::ZERO), ms(120));
        assert_eq!(r.loss_delay(), ms(45));
        r.update(ms(72), Duration::ZERO); // smoothed 44, latest 72
        assert_eq!(r.smoothed(), ms(44));
        assert_eq!(r.loss_delay(), ms(81)); // 9/8 * 72

        let mut tiny = RttEstimator::new(ms(333));
        tiny.update(Duration::from_micros(100), Duration::ZERO);
        assert_eq!(tiny.loss_delay(), TIMER_GRANULARITY);
        // 100us + max(200us, 1ms) + 0
        assert_eq!(tiny.pto(Duration::ZERO), Duration::from_micros(1_100));
    }

    #[test]
    fn extreme_inputs_saturate_without_panicking() {
        let mut r = RttEstimator::new(Duration::MAX);
        assert_eq!(r.pto(Duration::MAX), Duration::MAX);
        assert_eq!(r.loss_delay(), Duration::MAX);
        r.update(Duration::MAX, Duration::MAX);
        r.update(Duration::ZERO, Duration::MAX);
        r.update(Duration::MAX, Duration::MAX);
        assert_eq!(r.min(), Duration::ZERO);
        assert_eq!(r.pto(Duration::MAX), Duration::MAX);
        assert_eq!(r.loss_delay(), Duration::MAX);
        let mut z = RttEstimator::new(Duration::ZERO);
        z.update(Duration::ZERO, Duration::ZERO);
        assert_eq!(z.pto(Duration::ZERO), TIMER_GRANULARITY);
        assert_eq!(z.loss_delay(), TIMER_GRANULARITY);
    }
}
