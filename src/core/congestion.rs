//! Congestion control: how many bytes may be in flight.
//!
//! NewReno as in RFC 9002 section 7: slow start, congestion avoidance, one window reduction per
//! recovery period (a loss of a packet sent before the current recovery began does not reduce the
//! window again), and a collapse to the minimum window on persistent congestion.

use std::time::Instant;

/// Initial window, in datagrams (RFC 9002 suggests 10).
const INITIAL_WINDOW_DATAGRAMS: u64 = 10;
/// The window never shrinks below this many datagrams.
const MIN_WINDOW_DATAGRAMS: u64 = 2;

/// A loss-based congestion controller.
///
/// Call [`on_ack`](Self::on_ack) for every newly acknowledged datagram,
/// [`on_loss`](Self::on_loss) for every datagram declared lost, and compare
/// [`window`](Self::window) with the bytes in flight before sending.
#[derive(Debug, Clone)]
pub struct NewReno {
    max_datagram: u64,
    window: u64,
    ssthresh: u64,
    recovery_start: Option<Instant>,
    bytes_acked_in_avoidance: u64,
}

impl NewReno {
    /// A controller for datagrams of at most `max_datagram` bytes.
    pub fn new(max_datagram: u64) -> Self {
        let max_datagram = max_datagram.max(1);
        NewReno {
            max_datagram,
            window: INITIAL_WINDOW_DATAGRAMS * max_datagram,
            ssthresh: u64::MAX,
            recovery_start: None,
            bytes_acked_in_avoidance: 0,
        }
    }

    /// Bytes that may be in flight now.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// True while the controller is in slow start.
    pub fn in_slow_start(&self) -> bool {
        self.window < self.ssthresh
    }

    fn in_recovery(&self, sent: Instant) -> bool {
        self.recovery_start.is_some_and(|start| sent <= start)
    }

    /// A datagram of `bytes` sent at `sent` was acknowledged.
    pub fn on_ack(&mut self, sent: Instant, bytes: u64) {
        if self.in_recovery(sent) {
            return;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn slow_start_doubles_then_loss_halves_once_per_recovery() {
        let t0 = Instant::now();
        let mut cc = NewReno::new(1000);
        assert_eq!(cc.window(), 10_000);
        for _ in 0..10 {
            cc.on_ack(t0, 1000);
        }
        assert_eq!(cc.window(), 20_000);
        let t1 = t0 + Duration::from_millis(100);
        cc.on_loss(t0, t1);
        assert_eq!(cc.window(), 10_000);
        // A second loss from before the recovery started changes nothing.
        cc.on_loss(t0, t1 + Duration::from_millis(1));
        assert_eq!(cc.window(), 10_000);
        // Acks of old packets do not grow the window during recovery.
        cc.on_ack(t0, 1000);
        assert_eq!(cc.window(), 10_000);
        // In avoidance, one datagram per window's worth of acks.
        let t2 = t1 + Duration::from_millis(1);
        for _ in 0..10 {
            cc.on_ack(t2, 1000);
        }
        assert_eq!(cc.window(), 11_000);
        // A loss after recovery ended halves again.
        cc.on_loss(t2, t2 + Duration::from_millis(50));
        assert_eq!(cc.window(), 5_500);
    }

    #[test]
    fn never_below_minimum() {
        let t0 = Instant::now();
        let mut cc = NewReno::new(1000);
        for i in 0..20u64 {
            let t = t0 + Duration::from_millis(i * 10);
            cc.on_loss(t, t);
        }
        assert_eq!(cc.window(), 2000);
        cc.on_persistent_congestion();
        assert_eq!(cc.window(), 2000);
    }
}
