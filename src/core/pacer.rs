//! Token-bucket pacing: a byte-rate cap with a bounded burst.
//!
//! The sender asks the [`Pacer`] before every datagram: if
//! [`try_take`](Pacer::try_take) refuses, it sleeps (or returns a timer
//! deadline to the game loop) until [`ready_at`](Pacer::ready_at) and tries
//! again. Datagrams that must go out regardless (probes, acknowledgements)
//! are charged with [`take`](Pacer::take), which may put the bucket into debt
//! so that later data waits for them.
//!
//! Tokens are kept as an `i128` count of byte-nanoseconds (bytes scaled by
//! 10^9), and refilling adds `elapsed_ns * rate` exactly, so no fraction of a
//! byte is ever lost however the caller slices time: over any run the bytes
//! allowed are `rate * elapsed + burst` up to a single datagram. All
//! arithmetic saturates, so no input can panic.

use std::time::{Duration, Instant};

use super::later;

/// Token scale: one byte is this many byte-nanoseconds.
const SCALE: i128 = 1_000_000_000;

/// A token bucket that limits sending to `rate` bytes per second on average
/// while allowing bursts of up to `burst` bytes.
///
/// Create it with [`Pacer::new`], then for each datagram call
/// [`try_take`](Self::try_take); when it returns `false`, wait until
/// [`ready_at`](Self::ready_at) before trying again. Time is always passed
/// in; the first `now` seen by any method is taken as the start, with the
/// bucket full.
#[derive(Clone, Debug)]
pub struct Pacer {
    /// Bytes per second; 0 or `u64::MAX` means unlimited.
    rate: u64,
    /// Bucket capacity in bytes.
    burst: u64,
    /// Current tokens in byte-nanoseconds; negative means debt.
    tokens: i128,
    /// Instant up to which `tokens` has been refilled; `None` before the
    /// first call that passes a time.
    last: Option<Instant>,
}

/// `bytes` as byte-nanoseconds (at most about 1.8e28, far below `i128::MAX`).
fn scaled(bytes: u64) -> i128 {
    i128::from(bytes).saturating_mul(SCALE)
}

/// A nanosecond count as a `Duration`, saturating at `Duration::MAX`.
fn duration_from_nanos(ns: i128) -> Duration {
    let ns = ns.max(0);
    match u64::try_from(ns / SCALE) {
        // The remainder is in 0..10^9 and always fits a u32.
        Ok(secs) => Duration::new(secs, u32::try_from(ns % SCALE).unwrap_or(0)),
        Err(_) => Duration::MAX,
    }
}

impl Pacer {
    /// Creates a pacer allowing `rate_bytes_per_sec` on average with bursts
    /// of up to `burst_bytes`; a rate of `0` or `u64::MAX` means unlimited.
    /// The bucket starts full.
    ///
    /// Call it when a transfer starts (with the configured rate cap and a
    /// burst of a few datagrams); then gate each send with
    /// [`try_take`](Self::try_take).
    pub fn new(rate_bytes_per_sec: u64, burst_bytes: u64) -> Self {
        Self {
            rate: rate_bytes_per_sec,
            burst: burst_bytes,
            tokens: scaled(burst_bytes),
            last: None,
        }
    }

    fn is_unlimited(&self) -> bool {
        self.rate == 0 || self.rate == u64::MAX
    }

    /// Adds the tokens earned since the last refill at the current rate,
    /// capped at the burst. A `now` earlier than the last refill adds nothing.
    fn refill(&mut self, now: Instant) {
        match self.last {
            None => self.last = Some(now),
            Some(last) if now > last => {
                self.last = Some(now);
                if !self.is_unlimited() {
                    let ns = now.saturating_duration_since(last).as_nanos();
                    let earned = i128::try_from(ns)
                        .unwrap_or(i128::MAX)
                        .saturating_mul(i128::from(self.rate));
                    let cap = scaled(self.burst);
                    if self.tokens < cap {
                        self.tokens = self.tokens.saturating_add(earned).min(cap);
                    }
                }
            }
            Some(_) => {}
        }
        if self.is_unlimited() {
            self.tokens = scaled(self.burst);
        }
    }

    /// Tokens (byte-nanoseconds) that `try_take(bytes)` requires: a request
    /// larger than the bucket only needs a full bucket.
    fn needed(&self, bytes: u64) -> i128 {
        scaled(bytes.min(self.burst))
    }

    /// Changes the rate cap (0 or `u64::MAX` = unlimited), first crediting
    /// the tokens earned at the old rate up to `now`.
    ///
    /// Call it when congestion control or the user changes the allowed
    /// rate; any deadline previously obtained from
    /// [`ready_at`](Self::ready_at) is stale and should be recomputed.
    pub fn set_rate(&mut self, rate_bytes_per_sec: u64, now: Instant) {
        self.refill(now);
        self.rate = rate_bytes_per_sec;
    }

    #[cfg_attr(not(feature = "internals"), allow(dead_code))] // used by tests and benches
    /// Changes the bucket capacity, first refilling up to `now`. Tokens above
    /// the new capacity are dropped; a larger capacity fills over time.
    ///
    /// Call it when the datagram size or burst policy changes; recompute any
    /// pending [`ready_at`](Self::ready_at) deadline afterwards.
    pub fn set_burst(&mut self, burst_bytes: u64, now: Instant) {
        self.refill(now);
        self.burst = burst_bytes;
        self.tokens = self.tokens.min(scaled(burst_bytes));
    }

    /// Returns the rate cap in bytes per second (0 or `u64::MAX` mean
    /// unlimited).
    ///
    /// Use it for reporting, or to derive a new rate for
    /// [`set_rate`](Self::set_rate).
    pub fn rate(&self) -> u64 {
        self.rate
    }

    #[cfg_attr(not(feature = "internals"), allow(dead_code))] // used by tests and benches
    /// Returns the bucket capacity in bytes.
    ///
    /// Use it for reporting, or to size a batch of datagrams sent at once.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    #[cfg_attr(not(feature = "internals"), allow(dead_code))] // used by tests and benches
    /// Refills up to `now` and returns the whole bytes that may be sent
    /// right now (0 while in debt, `u64::MAX` when unlimited).
    ///
    /// Use it to decide how many datagrams to build in one batch; then
    /// charge each with [`try_take`](Self::try_take) or [`take`](Self::take).
    pub fn available(&mut self, now: Instant) -> u64 {
        self.refill(now);
        if self.is_unlimited() {
            return u64::MAX;
        }
        u64::try_from(self.tokens.max(0) / SCALE).unwrap_or(u64::MAX)
    }

    /// Refills up to `now`; if the bucket holds at least `bytes` tokens,
    /// removes them and returns `true`. A request larger than the burst
    /// succeeds only when the bucket is full, and leaves it in debt by the
    /// excess (so an oversize datagram is never blocked forever).
    ///
    /// Call it just before sending a datagram of `bytes`; on `true` send it,
    /// on `false` keep it and wait until [`ready_at`](Self::ready_at).
    pub fn try_take(&mut self, bytes: u64, now: Instant) -> bool {
        self.refill(now);
        if self.is_unlimited() {
            return true;
        }
        if self.tokens >= self.needed(bytes) {
            self.tokens = self.tokens.saturating_sub(scaled(bytes));
            true
        } else {
            false
        }
    }

    /// Refills up to `now` and removes `bytes` tokens unconditionally; the
    /// bucket may go negative (a debt that later sends must wait out).
    ///
    /// Call it for datagrams that must be sent regardless of the cap
    /// (probes, acknowledgements), then send them immediately.
    pub fn take(&mut self, bytes: u64, now: Instant) {
        self.refill(now);
        if !self.is_unlimited() {
            self.tokens = self.tokens.saturating_sub(scaled(bytes));
        }
    }

    /// Returns the earliest instant at which `try_take(bytes)` will succeed:
    /// `now` if it would already, and exactly to the nanosecond otherwise. A
    /// request larger than the burst is treated as a request for the burst.
    ///
    /// Call it after [`try_take`](Self::try_take) refused; arm a timer (or
    /// tell the game loop to come back) at the returned instant and call
    /// `try_take` again then. The answer stays valid as long as no other
    /// tokens are taken and neither rate nor burst changes.
    pub fn ready_at(&mut self, bytes: u64, now: Instant) -> Instant {
        self.refill(now);
        if self.is_unlimited() {
            return now;
        }
        let deficit = self.needed(bytes).saturating_sub(self.tokens);
        if deficit <= 0 {
            return now;
        }
        let rate = i128::from(self.rate);
        let mut ns = deficit / rate;
        if deficit % rate != 0 {
            ns = ns.saturating_add(1);
        }
        let base = self.last.unwrap_or(now);
        later(base, duration_from_nanos(ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NS: Duration = Duration::from_nanos(1);
    const MIB: u64 = 1 << 20;

    /// Sends `size`-byte datagrams as fast as the pacer allows from `start`
    /// while the send time is at most `until`; returns (bytes, last time).
    fn run_at_cap(p: &mut Pacer, start: Instant, until: Instant, size: u64) -> (u64, Instant) {
        let mut t = start;
        let mut total = 0u64;
        loop {
            t = p.ready_at(size, t);
            if t > until {
                return (total, t);
            }
            assert!(p.try_take(size, t), "try_take failed at ready_at");
            total += size;
        }
    }

    #[test]
    fn starts_with_full_burst() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1_000_000, 10_000);
        assert_eq!(p.rate(), 1_000_000);
        assert_eq!(p.burst(), 10_000);
        assert_eq!(p.available(t0), 10_000);
        assert_eq!(p.ready_at(10_000, t0), t0);
        assert!(p.try_take(6_000, t0));
        assert!(p.try_take(4_000, t0));
        assert!(!p.try_take(1, t0));
        assert_eq!(p.available(t0), 0);
    }

    #[test]
    fn long_idle_never_exceeds_burst() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1_000_000, 5_000);
        assert!(p.try_take(5_000, t0));
        assert_eq!(p.available(t0 + Duration::from_secs(3600)), 5_000);
        assert!(p.try_take(5_000, t0 + Duration::from_secs(3600)));
        assert!(!p.try_take(1, t0 + Duration::from_secs(3600)));
    }

    #[test]
    fn ten_seconds_at_cap_matches_rate() {
        let t0 = Instant::now();
        let (rate, burst) = (1_250_000u64, 12_000u64);
        let mut p = Pacer::new(rate, burst);
        let (total, _) = run_at_cap(&mut p, t0, t0 + Duration::from_secs(10), 1200);
        let expect = (rate * 10 + burst) as f64;
        let err = (total as f64 - expect).abs() / expect;
        assert!(err < 0.005, "total {total}, expected {expect}, err {err}");
    }

    #[test]
    fn hundred_seconds_are_exact_with_odd_rate_and_coarse_ticks() {
        let t0 = Instant::now();
        let (rate, burst) = (1_000_003u64, 3_600u64);
        // Exact pacing: datagram by datagram.
        let mut p = Pacer::new(rate, burst);
        let (total, _) = run_at_cap(&mut p, t0, t0 + Duration::from_secs(100), 1200);
        let expect = rate * 100 + burst;
        assert!(
            expect - total < 1200 && total <= expect,
            "total {total} vs {expect}"
        );
        // A game loop ticking every 1 ms and sending what it may.
        let mut p = Pacer::new(rate, burst);
        let mut total = 0u64;
        for tick in 0..=100_000u64 {
            let t = t0 + Duration::from_millis(tick);
            while p.try_take(1200, t) {
                total += 1200;
            }
        }
        assert!(
            expect - total < 1200 && total <= expect,
            "ticked total {total} vs {expect}"
        );
    }

    fn assert_ready_at_exact(rate: u64, burst: u64, size: u64) {
        let t0 = Instant::now();
        let mut p = Pacer::new(rate, burst);
        p.take(burst, t0); // empty the bucket
        let mut t = t0;
        for _ in 0..50 {
            let r = p.ready_at(size, t);
            assert!(r > t, "rate {rate}: ready_at should be in the future");
            let mut early = p.clone();
            assert!(
                !early.try_take(size, r - NS),
                "rate {rate}: 1 ns early succeeded"
            );
            // Probing early on the real pacer must not change the answer.
            assert!(!p.try_take(size, r - NS));
            assert_eq!(p.ready_at(size, r - NS), r);
            assert!(p.try_take(size, r), "rate {rate}: failed at ready_at");
            t = r;
        }
    }

    #[test]
    fn ready_at_is_exact() {
        assert_ready_at_exact(MIB, 16 * 1200, 1200);
        assert_ready_at_exact(1_000_000_000, 16 * 1200, 1200);
        assert_ready_at_exact(999_999_937, 1500, 1400);
        assert_ready_at_exact(7, 100, 3);
        assert_ready_at_exact(3_000_000_001, 1200, 1200);
    }

    #[test]
    fn set_rate_refills_at_old_rate_then_switches() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1_000_000, 10_000_000);
        p.take(10_000_000, t0);
        assert_eq!(p.available(t0), 0);
        p.set_rate(4_000_000, t0 + Duration::from_millis(500));
        assert_eq!(p.rate(), 4_000_000);
        assert_eq!(p.available(t0 + Duration::from_millis(500)), 500_000);
        assert_eq!(p.available(t0 + Duration::from_secs(1)), 2_500_000);
    }

    #[test]
    fn set_rate_mid_run_changes_throughput() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1_000_000, 1_200);
        let t1 = t0 + Duration::from_secs(2);
        let (first, next) = run_at_cap(&mut p, t0, t1, 1200);
        p.set_rate(3_000_000, t1);
        let (second, _) = run_at_cap(&mut p, next.min(t1), t1 + Duration::from_secs(2), 1200);
        assert!(first.abs_diff(2_001_200) <= 1200, "first {first}");
        assert!(second.abs_diff(6_000_000) <= 2400, "second {second}");
    }

    #[test]
    fn unlimited_always_succeeds() {
        let t0 = Instant::now();
        for rate in [0, u64::MAX] {
            let mut p = Pacer::new(rate, 1200);
            for i in 0..1000 {
                assert!(p.try_take(1 << 30, t0));
                p.take(u64::MAX, t0);
                assert_eq!(p.ready_at(u64::MAX, t0 + NS * i), t0 + NS * i);
            }
            assert_eq!(p.available(t0), u64::MAX);
            // Switching to a finite rate starts with a full bucket.
            p.set_rate(1000, t0);
            assert_eq!(p.available(t0), 1200);
            assert!(p.try_take(1200, t0));
            assert!(!p.try_take(1, t0));
        }
    }

    #[test]
    fn debt_from_take_delays_next_send() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1_000_000, 1_200);
        p.take(1_200, t0);
        p.take(3_000, t0); // 3000 bytes of debt
        assert_eq!(p.available(t0), 0);
        let r = p.ready_at(1_200, t0);
        assert_eq!(r, t0 + Duration::from_micros(4_200));
        assert!(!p.try_take(1_200, r - NS));
        assert!(p.try_take(1_200, r));
    }

    #[test]
    fn oversize_and_zero_burst_do_not_block_forever() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1_000, 500);
        assert!(p.try_take(800, t0)); // full bucket lets it through, 300 in debt
        let r = p.ready_at(800, t0);
        assert_eq!(r, t0 + Duration::from_millis(800));
        assert!(!p.try_take(800, r - NS));
        assert!(p.try_take(800, r));

        let mut z = Pacer::new(1_000, 0);
        assert!(z.try_take(100, t0));
        let r = z.ready_at(100, t0);
        assert_eq!(r, t0 + Duration::from_millis(100));
        assert!(!z.try_take(100, r - NS));
        assert!(z.try_take(100, r));
    }

    #[test]
    fn set_burst_caps_tokens() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1_000, 10_000);
        p.set_burst(2_000, t0);
        assert_eq!(p.burst(), 2_000);
        assert_eq!(p.available(t0), 2_000);
        p.set_burst(5_000, t0);
        assert_eq!(p.available(t0), 2_000); // raising does not mint tokens
        assert_eq!(p.available(t0 + Duration::from_secs(10)), 5_000);
    }

    #[test]
    fn time_going_backwards_and_extremes_do_not_panic() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1_000, 1_000);
        assert!(p.try_take(1_000, t0 + Duration::from_secs(1)));
        assert!(!p.try_take(1, t0)); // earlier instant earns nothing
        assert!(!p.try_take(1, t0 + Duration::from_secs(1)));
        assert!(p.try_take(1, t0 + Duration::from_millis(1001)));

        let mut q = Pacer::new(1, u64::MAX);
        for _ in 0..4 {
            q.take(u64::MAX, t0);
        }
        let far = q.ready_at(u64::MAX, t0);
        assert!(far > t0 + Duration::from_secs(1 << 40));
        assert!(!q.try_take(1, far - NS));
        let _ = q.available(far);
        let mut r = Pacer::new(u64::MAX - 1, u64::MAX);
        assert!(r.try_take(u64::MAX, t0));
        assert!(r.try_take(1, t0 + Duration::from_secs(3)));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Advance(u64),
        TryTake(u64),
        Take(u64),
        SetRate(u64),
        SetBurst(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..5_000_000).prop_map(Op::Advance),
            (0u64..20_000).prop_map(Op::TryTake),
            (0u64..20_000).prop_map(Op::Take),
            prop_oneof![Just(0u64), Just(u64::MAX), 1u64..10_000_000_000].prop_map(Op::SetRate),
            (0u64..50_000).prop_map(Op::SetBurst),
        ]
    }

    proptest! {
        #[test]
        fn ready_at_stays_exact_under_random_ops(
            rate in 1u64..10_000_000_000,
            burst in 0u64..50_000,
            ops in proptest::collection::vec(op(), 1..40),
            size in 1u64..20_000,
        ) {
            let t0 = Instant::now();
            let mut t = t0;
            let mut p = Pacer::new(rate, burst);
            for op in ops {
                match op {
                    Op::Advance(ns) => t += Duration::from_nanos(ns),
                    Op::TryTake(b) => { p.try_take(b, t); }
                    Op::Take(b) => p.take(b, t),
                    Op::SetRate(r) => p.set_rate(r, t),
                    Op::SetBurst(b) => p.set_burst(b, t),
                }
                let avail = p.available(t);
                prop_assert!(avail == u64::MAX || avail <= p.burst());
                let r = p.ready_at(size, t);
                prop_assert!(r >= t);
                if r > t {
                    prop_assert!(!p.clone().try_take(size, r - NS));
                }
                prop_assert!(p.clone().try_take(size, r));
            }
        }
    }
}
