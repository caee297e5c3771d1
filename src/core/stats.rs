//! Counters a transfer keeps for its user.

use std::time::Duration;

use crate::wire::DecodeError;

/// Counters of one transfer. Read them any time with `stats()`; a copy comes with
/// [`Completion`](super::Completion).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Datagrams put on the wire (all kinds).
    pub datagrams_sent: u64,
    /// UDP payload bytes put on the wire, headers included.
    pub bytes_sent: u64,
    /// Datagrams accepted (decoded and for this transfer).
    pub datagrams_received: u64,
    /// UDP payload bytes of accepted datagrams.
    pub bytes_received: u64,
    /// Data datagrams sent (sender).
    pub chunks_sent: u64,
    /// Data datagrams that repeated a chunk sent before (sender).
    pub chunks_retransmitted: u64,
    /// Bytes of those repeats, headers included (sender).
    pub bytes_retransmitted: u64,
    /// Data datagrams that carried a chunk already held (receiver).
    pub duplicate_chunks: u64,
    /// Times the probe timer fired (sender).
    pub probe_timeouts: u64,
    /// Chunks an earlier acknowledgement claimed and a later one showed missing (a damaged or
    /// false ack), queued again (sender).
    pub chunks_reneged: u64,
    /// Datagrams dropped, by reason.
    pub dropped: DropStats,
    /// Smoothed round-trip time.
    pub smoothed_rtt: Duration,
    /// Congestion window in bytes (sender).
    pub congestion_window: u64,
    /// Bytes sent and neither acknowledged nor declared lost (sender).
    pub bytes_in_flight: u64,
    /// Estimated queueing delay this transfer's path adds, from one-way delay samples (sender).
    pub queueing_delay: Option<Duration>,
    /// The rate the sender paces at now, bytes per second: the lowest of its window's rate
    /// (1.25 windows per round trip) and its cap (sender).
    pub pacing_rate: u64,
}

/// Datagrams dropped without effect, by reason. Dropping is the only answer to bad input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DropStats {
    /// Failed to decode: too short, bad magic or version, malformed field.
    pub malformed: u64,
    /// Failed the CRC32 check.
    pub bad_checksum: u64,
    /// For another connection id.
    pub wrong_connection: u64,
    /// Well-formed but not expected in the transfer's state (a stray offer, a start with the wrong
    /// nonce, data before the start).
    pub unexpected: u64,
    /// Data whose chunk index or length does not fit the object, or acks of a sequence number
    /// never sent. (Ack ranges past the object's end are clipped, not counted.)
    pub invalid: u64,
}

impl DropStats {
    /// Counts one decode failure under its reason.
    pub fn count_decode_error(&mut self, e: &DecodeError) {
        match e {
            DecodeError::BadChecksum { .. } => self.bad_checksum += 1,
            _ => self.malformed += 1,
        }
    }

    /// All drops together.
    pub fn total(&self) -> u64 {
        self.malformed + self.bad_checksum + self.wrong_connection + self.unexpected + self.invalid
    }
}
