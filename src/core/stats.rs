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
    /// Data datagrams sent a second time, unasked, when the sender first ran out of new chunks
    /// (at most three per transfer, so that losing one of the last datagrams costs no probe
    /// timeout); not counted in `chunks_retransmitted` (sender).
    pub tail_copies: u64,
    /// Data datagrams that carried a chunk already held (receiver).
    pub duplicate_chunks: u64,
    /// Times the probe timer fired (sender).
    pub probe_timeouts: u64,
    /// Chunks an earlier acknowledgement claimed and a later one showed missing (a damaged or
    /// false ack), queued again (sender).
    pub chunks_reneged: u64,
    /// Path changes: times the sender moved the transfer to a client address it had validated
    /// (a NAT rebinding or a network switch), or times the receiver answered a path challenge.
    pub path_changes: u64,
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
    /// The rate the sender paces at now, bytes per second: the congestion model's (its
    /// bandwidth estimate times the pacing gain of its state) under the cap (sender).
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

/// One human-readable line for logs and `-v` output: `rtt 1.2 ms, 3600 datagrams received
/// (4.3 MB), 12 sent, 3 duplicate chunks, 0 retransmitted (0 B), 0 dropped`, with the sender's
/// window, pacing and queueing delay when it has them.
impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rtt {:.1} ms, {} datagrams received ({:.1} MB), {} sent ({:.1} MB), {} duplicate chunks, {} chunks retransmitted ({} KB), {} dropped",
            self.smoothed_rtt.as_secs_f64() * 1e3,
            self.datagrams_received,
            self.bytes_received as f64 / 1e6,
            self.datagrams_sent,
            self.bytes_sent as f64 / 1e6,
            self.duplicate_chunks,
            self.chunks_retransmitted,
            self.bytes_retransmitted / 1000,
            self.dropped.total()
        )?;
        if self.congestion_window > 0 {
            write!(
                f,
                ", pace {:.2} MB/s, cwnd {} KB",
                self.pacing_rate as f64 / 1e6,
                self.congestion_window / 1000
            )?;
        }
        if let Some(d) = self.queueing_delay {
            write!(f, ", queue {:.1} ms", d.as_secs_f64() * 1e3)?;
        }
        Ok(())
    }
}

/// The status of one transfer in `serve -v`'s once-a-second line:
/// `<peer> pace <rate> MB/s cwnd <KB> KB rtt <ms> ms queue <ms|-> retx <KB> KB`.
impl std::fmt::Display for super::TransferInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.stats;
        write!(
            f,
            "{} pace {:.2} MB/s cwnd {} KB rtt {:.1} ms queue ",
            self.peer,
            s.pacing_rate as f64 / 1e6,
            s.congestion_window / 1000,
            s.smoothed_rtt.as_secs_f64() * 1e3
        )?;
        match s.queueing_delay {
            Some(d) => write!(f, "{:.1} ms", d.as_secs_f64() * 1e3)?,
            None => f.write_str("-")?,
        }
        write!(f, " retx {} KB", s.bytes_retransmitted / 1000)
    }
}

/// A finished transfer in one line, as `serve -v` prints it: `sent <id> (<size> bytes) to
/// <peer>: <bytes> bytes on the wire in <secs> s, <bytes> bytes retransmitted`, or `transfer of
/// <id> to <peer> failed: <error>`; other events in their debug form.
impl std::fmt::Display for super::EndpointEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (verb, preposition) = match self.role {
            super::Role::Serving => ("sent", "to"),
            super::Role::Fetching => ("received", "from"),
        };
        match &self.event {
            super::Event::Completed(c) => write!(
                f,
                "{verb} {} ({} bytes) {preposition} {}: {} bytes on the wire in {:.2} s, {} bytes retransmitted",
                self.object,
                c.size,
                self.peer,
                c.stats.bytes_sent,
                c.duration.as_secs_f64(),
                c.stats.bytes_retransmitted
            ),
            super::Event::Failed(err) => write!(
                f,
                "transfer of {} {preposition} {} failed: {err}",
                self.object, self.peer
            ),
            other => write!(f, "{} {preposition} {}: {other:?}", self.object, self.peer),
        }
    }
}
