//! Settings of one transfer, shared by both roles.

use std::time::Duration;

use super::congestion::CongestionControl;

use crate::wire::{DATA_OVERHEAD, DEFAULT_MAX_DATAGRAM_SIZE, MAX_DATAGRAM_SIZE, MIN_CHUNK_SIZE};

/// Settings for a [`Sender`](super::Sender) or [`Receiver`](super::Receiver).
///
/// `TransferConfig::default()` suits a game on the public internet: 1200-byte datagrams (safe for
/// any IPv6 path), a 15 s idle timeout, and no rate cap. Build one, adjust fields, and pass it to
/// the constructor; a transfer copies it and never changes it.
///
/// Set fields with struct update syntax: `TransferConfig { idle_timeout, ..Default::default() }`.
///
/// Every value of every field is accepted without a panic. Durations too long to add to an
/// `Instant` (up to `Duration::MAX`) mean "never"; values that make no sense are clamped where
/// they are used, as each field says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferConfig {
    /// Largest datagram this side sends or accepts, headers and checksum included. The chunk size
    /// follows from it: `max_datagram_size - 34`. Clamped to `290..=65_507`.
    pub max_datagram_size: usize,
    /// A transfer that hears nothing from its peer for this long fails with
    /// [`TransferError::TimedOut`](super::TransferError::TimedOut). One too long to add to an
    /// instant (`Duration::MAX`, say) never expires.
    pub idle_timeout: Duration,
    /// Round-trip time assumed before the first measurement.
    pub initial_rtt: Duration,
    /// Longest a receiver waits before acknowledging data (it acknowledges sooner after every
    /// `ack_every` datagrams or on a gap, and with its keep-alives). The sender adds it to its
    /// probe timeout (which never exceeds 2 s).
    pub max_ack_delay: Duration,
    /// A receiver acknowledges after this many data datagrams (0 acts as 1).
    pub ack_every: u32,
    /// Most received ranges one acknowledgement carries (clamped to 1..=255).
    pub max_ack_ranges: usize,
    /// Flow control: how far (in bytes) past its in-order point a receiver lets the sender run
    /// (at least one chunk).
    pub receive_window_bytes: u64,
    /// A receiver refuses offers of objects larger than this.
    pub max_object_size: u64,
    /// Sender's rate cap in bytes per second (0: none). A request may ask for a lower one.
    pub max_rate_bytes_per_sec: u64,
    /// Congestion controller: delay-based background mode (the default) or loss-based standard.
    pub congestion: CongestionControl,
    /// Datagrams the pacer may send back to back after an idle period (0 acts as 1).
    pub burst_datagrams: u32,
    /// Least time between two `Event::Progress` reports (one too long to add to an instant:
    /// only the first).
    pub progress_interval: Duration,
    /// How long a receiver that finished keeps answering a sender that missed its `Done` (at
    /// least; it waits longer on slow paths, and at most a minute: the sender probes at least
    /// every 2 s).
    pub linger: Duration,
    /// A receiver that has started receiving and then hears nothing for this long, while its
    /// keep-alive acks (its probes of the path) go out, fails with
    /// [`TransferError::PathLost`](super::TransferError::PathLost): its address changed in a way
    /// the server could not follow (docs/PROTOCOL.md 5.9). The owner then starts over with what
    /// arrived as the have-set (resume). `Duration::MAX` (the default): never, only the idle
    /// timeout applies. `net::Client` uses 4 s and resumes by itself.
    pub path_lost_after: Duration,
}

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            max_datagram_size: DEFAULT_MAX_DATAGRAM_SIZE,
            idle_timeout: Duration::from_secs(15),
            initial_rtt: Duration::from_millis(200),
            max_ack_delay: Duration::from_millis(10),
            ack_every: 2,
            max_ack_ranges: 64,
            receive_window_bytes: 16 << 20,
            max_object_size: 4 << 30,
            max_rate_bytes_per_sec: 0,
            congestion: CongestionControl::default(),
            burst_datagrams: 10,
            progress_interval: Duration::from_millis(100),
            linger: Duration::from_secs(2),
            path_lost_after: Duration::MAX,
        }
    }
}

impl TransferConfig {
    /// The datagram size actually used, after clamping to what the protocol allows.
    pub fn datagram_size(&self) -> usize {
        self.max_datagram_size
            .clamp(DATA_OVERHEAD + MIN_CHUNK_SIZE, MAX_DATAGRAM_SIZE)
    }

    /// Payload bytes per data datagram for this datagram size.
    pub fn chunk_size(&self) -> usize {
        self.datagram_size() - DATA_OVERHEAD
    }
}
