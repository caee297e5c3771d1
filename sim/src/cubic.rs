//! A loss-based flow to compete with: a window-based sender that grows its window with CUBIC
//! (RFC 9438) and cuts it on loss, and a receiver that acknowledges every datagram. It stands for
//! the TCP (Linux's default) or QUIC download that shares a player's link with udpferry, so tests
//! can check how udpferry's congestion control shares a bottleneck with a flow that reads every
//! loss as congestion and fills the buffer until it drops.
//!
//! Like QUIC, the sender numbers every datagram anew and never retransmits: what it delivers is
//! what the receiver counts. Losses are detected as RFC 9002 does: a datagram is lost once one
//! sent three or more after it is acknowledged, or when nothing is acknowledged for a probe
//! timeout; one window reduction per round trip of losses (a recovery period). No pacing:
//! datagrams leave as acknowledgements open the window, as Linux CUBIC without `fq` does.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::pair::Peer;

/// First byte of a [`CubicSender`] datagram; never udpferry's magic.
const DATA: u8 = b'C';
/// First byte of a [`CubicReceiver`] acknowledgement.
const ACK: u8 = b'c';
/// CUBIC's multiplicative decrease (RFC 9438 section 4.6).
const BETA: f64 = 0.7;
/// CUBIC's scaling constant, in datagrams per second cubed (RFC 9438 section 4.2).
const C: f64 = 0.4;
/// Datagrams acknowledged after a lost one before it is declared lost (RFC 9002).
const PACKET_THRESHOLD: u64 = 3;
/// Initial window, in datagrams (RFC 9002).
const INITIAL_WINDOW: f64 = 10.0;
/// Smallest window, in datagrams.
const MIN_WINDOW: f64 = 2.0;

/// The packet number a datagram of `kind` (`DATA` or `ACK`) carries.
fn packet_number(datagram: &[u8], kind: u8) -> Option<u64> {
    let pn = datagram.get(1..9).filter(|_| datagram[0] == kind)?;
    Some(u64::from_be_bytes(pn.try_into().ok()?))
}

/// Writes a datagram of `kind` carrying `pn` into the start of `buf` (at least 9 bytes).
fn put_packet_number(buf: &mut [u8], kind: u8, pn: u64) {
    buf[0] = kind;
    buf[1..9].copy_from_slice(&pn.to_be_bytes());
}

/// A sender with an endless supply of data, CUBIC congestion control and no pacing.
#[derive(Debug, Clone)]
pub struct CubicSender {
    size: usize,
    next_pn: u64,
    /// Datagrams in flight: packet number to send time.
    in_flight: BTreeMap<u64, Instant>,
    /// Window, in datagrams.
    cwnd: f64,
    ssthresh: f64,
    /// Window before the last reduction, in datagrams.
    w_max: f64,
    /// Time since the start of the current congestion-avoidance epoch is measured from this.
    epoch: Option<Instant>,
    /// CUBIC's time to regain `w_max`, in seconds.
    k: f64,
    /// The Reno-friendly window estimate (RFC 9438 section 4.3), in datagrams.
    w_est: f64,
    /// Losses of datagrams sent before this start no new reduction.
    recovery_start: Option<Instant>,
    srtt: Option<Duration>,
    last_ack: Option<Instant>,
    /// Datagrams acknowledged.
    pub acked: u64,
    /// Datagrams declared lost.
    pub lost: u64,
    /// Window reductions.
    pub reductions: u64,
}

impl CubicSender {
    /// A sender of `size`-byte datagrams (at least 9).
    pub fn new(size: usize) -> Self {
        CubicSender {
            size: size.max(9),
            next_pn: 0,
            in_flight: BTreeMap::new(),
            cwnd: INITIAL_WINDOW,
            ssthresh: f64::INFINITY,
            w_max: 0.0,
            epoch: None,
            k: 0.0,
            w_est: 0.0,
            recovery_start: None,
            srtt: None,
            last_ack: None,
            acked: 0,
            lost: 0,
            reductions: 0,
        }
    }

    fn on_ack(&mut self, now: Instant, pn: u64) {
        let Some(sent) = self.in_flight.remove(&pn) else {
            return;
        };
        self.acked += 1;
        self.last_ack = Some(now);
        let rtt = now.saturating_duration_since(sent);
        self.srtt = Some(match self.srtt {
            None => rtt,
            Some(s) => (s * 7 + rtt) / 8,
        });
        // Packet threshold: everything sent PACKET_THRESHOLD or more before `pn` is lost.
        let lost: Vec<(u64, Instant)> = self
            .in_flight
            .range(..pn.saturating_sub(PACKET_THRESHOLD - 1))
            .map(|(&p, &t)| (p, t))
            .collect();
        for (p, t) in lost {
            self.in_flight.remove(&p);
            self.on_loss(now, t);
        }
        if self.recovery_start.is_some_and(|r| sent <= r) {
            return;
        }
        if self.cwnd < self.ssthresh {
            self.cwnd += 1.0;
            return;
        }
        let epoch = *self.epoch.get_or_insert_with(|| {
            // An epoch that starts without a reduction (slow start ended by ssthresh).
            self.w_max = self.cwnd;
            self.k = 0.0;
            self.w_est = self.cwnd;
            now
        });
        let rtt = self.srtt.unwrap_or(rtt).as_secs_f64();
        let t = now.saturating_duration_since(epoch).as_secs_f64();
        let target = C * (t + rtt - self.k).powi(3) + self.w_max;
        self.w_est += 3.0 * (1.0 - BETA) / (1.0 + BETA) / self.cwnd;
        let target = target.clamp(self.cwnd, 1.5 * self.cwnd);
        self.cwnd = if target < self.w_est {
            self.w_est
        } else {
            self.cwnd + (target - self.cwnd) / self.cwnd
        };
    }

    fn on_loss(&mut self, now: Instant, sent: Instant) {
        self.lost += 1;
        if self.recovery_start.is_some_and(|r| sent <= r) {
            return;
        }
        self.recovery_start = Some(now);
        self.reductions += 1;
        // Fast convergence (RFC 9438 section 4.7).
        self.w_max = if self.cwnd < self.w_max {
            self.cwnd * (1.0 + BETA) / 2.0
        } else {
            self.cwnd
        };
        self.cwnd = (self.cwnd * BETA).max(MIN_WINDOW);
        self.ssthresh = self.cwnd;
        self.k = (self.w_max * (1.0 - BETA) / C).cbrt();
        self.w_est = self.cwnd;
        self.epoch = Some(now);
    }

    fn probe_timeout(&self) -> Option<Instant> {
        let first = *self.in_flight.values().next()?;
        let srtt = self.srtt.unwrap_or(Duration::from_millis(333));
        let pto = (srtt * 3).max(Duration::from_millis(50));
        Some(self.last_ack.map_or(first, |a| a.max(first)) + pto)
    }
}

impl Peer for CubicSender {
    fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) {
        if let Some(pn) = packet_number(datagram, ACK) {
            self.on_ack(now, pn);
        }
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        if (self.in_flight.len() as f64) + 1.0 > self.cwnd || buf.len() < self.size {
            return None;
        }
        let pn = self.next_pn;
        self.next_pn += 1;
        self.in_flight.insert(pn, now);
        buf[..self.size].fill(0);
        put_packet_number(buf, DATA, pn);
        Some(self.size)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.probe_timeout()
    }

    /// A probe timeout: everything in flight is lost, one reduction, and the window restarts
    /// from its minimum.
    fn handle_timeout(&mut self, now: Instant) {
        if self.probe_timeout().is_none_or(|t| t > now) {
            return;
        }
        let lost = std::mem::take(&mut self.in_flight);
        for (_, sent) in lost {
            self.on_loss(now, sent);
        }
        self.cwnd = MIN_WINDOW;
        self.last_ack = Some(now);
    }

    fn is_finished(&self) -> bool {
        false
    }
}

/// Acknowledges every [`CubicSender`] datagram and counts what arrived.
#[derive(Debug, Clone, Default)]
pub struct CubicReceiver {
    pending: VecDeque<u64>,
    /// Bytes of data received.
    pub bytes_received: u64,
}

impl Peer for CubicReceiver {
    fn handle_datagram(&mut self, _now: Instant, datagram: &[u8]) {
        if let Some(pn) = packet_number(datagram, DATA) {
            self.pending.push_back(pn);
            self.bytes_received += datagram.len() as u64;
        }
    }

    fn poll_transmit(&mut self, _now: Instant, buf: &mut [u8]) -> Option<usize> {
        if buf.len() < 9 {
            return None;
        }
        let pn = self.pending.pop_front()?;
        put_packet_number(buf, ACK, pn);
        Some(9)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    fn handle_timeout(&mut self, _now: Instant) {}

    fn is_finished(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LinkConfig, Pair};

    /// Alone on a 2 MiB/s bottleneck with a 100 ms queue, CUBIC fills the link and saws:
    /// it loses datagrams at the full queue and reduces its window, again and again.
    #[test]
    fn cubic_fills_a_bottleneck_and_reduces_on_loss() {
        const RATE: u64 = 2 << 20;
        let start = Instant::now();
        let down = LinkConfig::clean(Duration::from_millis(20))
            .with_bottleneck(RATE, (RATE / 10) as usize);
        let up = LinkConfig::clean(Duration::from_millis(20));
        let mut pair = Pair::new(
            1,
            start,
            CubicSender::new(1200),
            CubicReceiver::default(),
            down,
            up,
        );
        pair.run(u64::MAX, start + Duration::from_secs(5));
        let before = pair.b.bytes_received;
        pair.run(u64::MAX, start + Duration::from_secs(25));
        let rate = (pair.b.bytes_received - before) as f64 / 20.0 / RATE as f64;
        println!(
            "cubic alone: {rate:.3} of the link, {} reductions, {} lost",
            pair.a.reductions, pair.a.lost
        );
        assert!(rate > 0.95, "{rate}");
        assert!(pair.a.reductions >= 3, "{}", pair.a.reductions);
        assert!(pair.a_to_b.stats().queue_dropped > 0);
    }
}
