//! Endpoints as simulator peers, with optional game-like traffic beside the transfers.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::pair::Peer;
use udpferry::core::{ChunkSink, Endpoint, EndpointEvent, Event, ObjectProvider};

/// Game packets: a fixed-size datagram every `interval`, carrying its sequence number and send
/// time, so the other side can measure what the network did to them.
#[derive(Debug, Clone)]
pub struct GameTraffic {
    /// Time between two packets (16.7 ms for 60 Hz).
    pub interval: Duration,
    /// Bytes per packet (at least 17).
    pub size: usize,
    next: Option<Instant>,
    seq: u64,
    epoch: Instant,
    /// Every game packet received: (arrival time, one-way delay).
    pub received: Vec<(Instant, Duration)>,
    /// Packets sent.
    pub sent: u64,
}

/// First byte of a game packet; never udpferry's magic.
const GAME: u8 = b'G';

impl GameTraffic {
    /// `size`-byte packets every `interval`, time-stamped against `epoch` (the simulation's
    /// start, shared by both sides).
    pub fn new(interval: Duration, size: usize, epoch: Instant) -> Self {
        GameTraffic {
            interval,
            size: size.max(17),
            next: Some(epoch),
            seq: 0,
            epoch,
            received: Vec::new(),
            sent: 0,
        }
    }

    fn poll(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        let due = self.next?;
        if due > now || buf.len() < self.size {
            return None;
        }
        // An interval too long to add to an instant: this was the last packet.
        self.next = due.checked_add(self.interval);
        buf[..self.size].fill(0);
        buf[0] = GAME;
        buf[1..9].copy_from_slice(&self.seq.to_be_bytes());
        let sent = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        buf[9..17].copy_from_slice(&sent.to_be_bytes());
        self.seq += 1;
        self.sent += 1;
        Some(self.size)
    }

    fn record(&mut self, now: Instant, packet: &[u8]) {
        if packet.len() < 17 || packet[0] != GAME {
            return;
        }
        let mut t = [0u8; 8];
        t.copy_from_slice(&packet[9..17]);
        let sent = self.epoch + Duration::from_nanos(u64::from_be_bytes(t));
        self.received
            .push((now, now.saturating_duration_since(sent)));
    }

    /// The `q`-quantile (0..=1) of the one-way delays of packets received in `window`.
    pub fn delay_quantile(&self, q: f64, window: std::ops::Range<Instant>) -> Option<Duration> {
        let mut delays: Vec<Duration> = self
            .received
            .iter()
            .filter(|(at, _)| window.contains(at))
            .map(|(_, d)| *d)
            .collect();
        if delays.is_empty() {
            return None;
        }
        delays.sort_unstable();
        let i = ((delays.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        Some(delays[i])
    }
}

/// An [`Endpoint`] talking to one remote address through the simulator, optionally sending
/// [`GameTraffic`] on the same "socket". It takes the sink of every finished download into
/// [`finished`](Self::finished), so finished transfers are reaped.
pub struct EndpointPeer<P: ObjectProvider, K> {
    /// The endpoint.
    pub endpoint: Endpoint<P, K>,
    /// The address the other side appears to have.
    pub remote: SocketAddr,
    /// Game packets beside the transfers, if any.
    pub game: Option<GameTraffic>,
    /// Every event, in order, with the virtual time it was seen.
    pub events: Vec<(Instant, EndpointEvent)>,
    /// Sinks of finished downloads.
    pub finished: Vec<K>,
    /// Stop sending game packets once every transfer is over (so a run can end).
    pub stop_game_when_idle: bool,
    /// Bytes of the datagrams the endpoint addressed to somewhere other than `remote`, by
    /// destination: they never reach the other side (a NAT mapping that went away, a spoofed
    /// address). Tests change `remote` to re-map the other side's address.
    pub sent_elsewhere: std::collections::HashMap<SocketAddr, u64>,
    seen_transfer: bool,
}

impl<P: ObjectProvider, K: ChunkSink> EndpointPeer<P, K> {
    /// Wraps `endpoint`; every datagram it sends goes to the other side of the pair, and every
    /// datagram it receives appears to come from `remote`.
    pub fn new(endpoint: Endpoint<P, K>, remote: SocketAddr) -> Self {
        EndpointPeer {
            endpoint,
            remote,
            game: None,
            events: Vec::new(),
            finished: Vec::new(),
            stop_game_when_idle: true,
            sent_elsewhere: std::collections::HashMap::new(),
            seen_transfer: false,
        }
    }

    fn drain_events(&mut self, now: Instant) {
        while let Some(e) = self.endpoint.poll_event() {
            self.seen_transfer = true;
            if matches!(e.event, Event::Completed(_) | Event::Failed(_)) {
                if let Some(sink) = self.endpoint.take_sink(e.transfer) {
                    self.finished.push(sink);
                }
            }
            self.events.push((now, e));
        }
    }

    fn idle(&self) -> bool {
        self.endpoint.transfer_count() == 0
            && (self.seen_transfer || self.endpoint.stats().datagrams_sent > 0)
    }
}

impl<P: ObjectProvider, K: ChunkSink> Peer for EndpointPeer<P, K> {
    fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) {
        if udpferry::is_udpferry_datagram(datagram) {
            self.endpoint.handle_datagram(now, self.remote, datagram);
            self.drain_events(now);
        } else if let Some(game) = &mut self.game {
            game.record(now, datagram);
        }
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        let idle = self.stop_game_when_idle && self.idle();
        if let Some(game) = self.game.as_mut().filter(|_| !idle) {
            if let Some(n) = game.poll(now, buf) {
                return Some(n);
            }
        }
        loop {
            let t = self.endpoint.poll_transmit(now, buf);
            self.drain_events(now);
            match t {
                Some(t) if t.destination != self.remote => {
                    *self.sent_elsewhere.entry(t.destination).or_default() += t.len as u64;
                }
                t => return t.map(|t| t.len),
            }
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let game = self
            .game
            .as_ref()
            .filter(|_| !(self.stop_game_when_idle && self.idle()))
            .and_then(|g| g.next);
        [self.endpoint.poll_timeout(), game]
            .into_iter()
            .flatten()
            .min()
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.endpoint.handle_timeout(now);
        self.drain_events(now);
    }

    fn is_finished(&self) -> bool {
        self.idle()
    }
}
