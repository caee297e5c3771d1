//! The sans-IO transfer engine: state machines that move one object as sequenced, acknowledged,
//! paced and verified datagrams.
//!
//! Nothing in here opens a socket, reads a clock, starts a thread or touches a file. Time comes in
//! as `now: Instant` on every call, datagrams go in and out as byte slices, and object bytes are
//! read and written through the [`ChunkSource`] and [`ChunkSink`] traits.
//!
//! # Call order (both [`Sender`] and [`Receiver`])
//!
//! 1. Feed every datagram that arrives for the transfer to `handle_datagram(now, bytes)`.
//! 2. Then drain `poll_transmit(now, buf)` until it returns `None`, sending each datagram.
//! 3. Drain `poll_event()` and act on what it reports.
//! 4. Sleep until `poll_timeout()` (or until the next datagram arrives, whichever is first);
//!    when the timeout passes, call `handle_timeout(now)` and go back to 2.
//!
//! A receiver that has just acknowledged its last chunk returns a `poll_timeout` that has
//! already passed: it checks the digest in that `handle_timeout`, after its ack went out.
//!
//! A transfer is over when `poll_event` has returned [`Event::Completed`] or [`Event::Failed`];
//! `is_finished` then returns true. A finished receiver may still have datagrams to send (it
//! answers a sender that missed its `Done`), so keep driving it until `poll_timeout` returns
//! `None` if you can.

mod config;
mod congestion;
mod endpoint;
mod pacer;
mod ranges;
mod receiver;
mod report;
mod rtt;
mod sender;
mod stats;

use std::io;
use std::time::Duration;

pub use config::TransferConfig;
pub use congestion::CongestionControl;
#[cfg(feature = "internals")]
pub use congestion::{Controller, Delivery};
pub use endpoint::{
    Endpoint, EndpointConfig, EndpointEvent, EndpointStats, NoObjects, ObjectProvider, Role,
    TransferId, TransferInfo, Transmit,
};
#[cfg(feature = "internals")]
pub use pacer::Pacer;
pub use ranges::RangeSet;
pub use receiver::Receiver;
// PrefixHasher and InlineHasher are defined below.
#[cfg(feature = "internals")]
pub use rtt::RttEstimator;
pub use sender::Sender;
pub use stats::{DropStats, Stats};

use crate::id::ObjectId;
use crate::wire::ErrorCode;

/// Computes an object's id from its bytes, fed in order. A [`Receiver`] feeds it the in-order
/// prefix as it grows, so hashing overlaps the transfer.
///
/// The default, `InlineHasher`, hashes on the thread that drives the receiver. A driver that has
/// a core to spare can hand the bytes to another thread instead (see
/// `net::HashThread`) and set it with [`Receiver::set_hasher`] or [`Endpoint::set_hasher`].
pub trait PrefixHasher: Send + std::fmt::Debug {
    /// Adds the object's next bytes.
    fn update(&mut self, bytes: &[u8]);
    /// The id of everything added. Called once, when every byte was added (from
    /// `handle_timeout`, once the ack of the last chunk has gone out); it may wait for work it
    /// handed elsewhere. An error fails the transfer as a storage error.
    fn finish(&mut self) -> io::Result<ObjectId>;
}

/// The id's own algorithm (MD5 or SHA-256) on the calling thread: the default
/// [`PrefixHasher`].
///
/// Made only for an id ([`for_id`](Self::for_id)), so it always hashes with that id's
/// algorithm; there is deliberately no `Default`, which would have to guess one.
#[derive(Debug, Clone)]
pub struct InlineHasher(crate::id::IdHasher);

impl InlineHasher {
    /// A hasher that computes an id of `id`'s algorithm.
    pub fn for_id(id: &ObjectId) -> Self {
        InlineHasher(id.hasher())
    }
}

impl PrefixHasher for InlineHasher {
    fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    /// The id of everything added; the hasher starts over empty, with the same algorithm.
    fn finish(&mut self) -> io::Result<ObjectId> {
        let fresh = match self.0 {
            crate::id::IdHasher::Md5(_) => crate::id::IdHasher::Md5(Default::default()),
            crate::id::IdHasher::Sha256(_) => crate::id::IdHasher::Sha256(Default::default()),
        };
        Ok(std::mem::replace(&mut self.0, fresh).finish())
    }
}

/// Where a [`Sender`] reads the object's bytes from.
///
/// Implemented by the file store and by in-memory buffers (`Vec<u8>`, `&[u8]`).
pub trait ChunkSource {
    /// Fills `buf` with the object's bytes starting at `offset`. `offset + buf.len()` never
    /// exceeds the object's size. An error ends the transfer with [`TransferError::Storage`].
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// Where a [`Receiver`] writes the object's bytes to.
///
/// Chunks arrive in any order and may be written more than once with the same bytes.
pub trait ChunkSink {
    /// Stores `data` at `offset` of the object.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Reads back bytes previously written (the receiver hashes out-of-order chunks once the
    /// in-order prefix reaches them).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl ChunkSource for &[u8] {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        read_slice(self, offset, buf)
    }
}

impl ChunkSource for Vec<u8> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        read_slice(self, offset, buf)
    }
}

impl ChunkSource for std::sync::Arc<[u8]> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        read_slice(self, offset, buf)
    }
}

impl ChunkSink for Vec<u8> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start
            .checked_add(data.len())
            .ok_or(io::ErrorKind::InvalidInput)?;
        if start >= self.len() {
            // Appending (the common, in-order case): no zero-fill before the copy.
            self.resize(start, 0);
            self.extend_from_slice(data);
            return Ok(());
        }
        if self.len() < end {
            self.resize(end, 0);
        }
        self.get_mut(start..end)
            .ok_or(io::ErrorKind::InvalidInput)?
            .copy_from_slice(data);
        Ok(())
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        read_slice(self, offset, buf)
    }
}

impl<T: ChunkSource + ?Sized> ChunkSource for Box<T> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(offset, buf)
    }
}

impl<T: ChunkSink + ?Sized> ChunkSink for Box<T> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        (**self).write_at(offset, data)
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(offset, buf)
    }
}

fn read_slice(data: &[u8], offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let src = usize::try_from(offset)
        .ok()
        .and_then(|start| data.get(start..start.checked_add(buf.len())?))
        .ok_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, "read past the object's end")
        })?;
    buf.copy_from_slice(src);
    Ok(())
}

/// Something a transfer reports to its user, from `poll_event`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// The receiver learnt the object's size (the offer arrived). Sent once.
    Started {
        /// Object size in bytes.
        size: u64,
    },
    /// The server is at its limit and queued the request (receiver only): `ahead` requests go
    /// first. The transfer keeps its place by itself; reported when the place changes. The
    /// transfer goes on with `Started` data when a slot is free.
    Queued {
        /// Queued requests the server admits before this one (0: first in line, waiting for
        /// a running transfer to end).
        ahead: u32,
    },
    /// More of the object is done. Reported at most once per `progress_interval`.
    Progress {
        /// Bytes the receiver holds (receiver) or the receiver acknowledged (sender).
        bytes_done: u64,
        /// Object size.
        total: u64,
    },
    /// The object arrived whole and its digest matched. Final.
    Completed(Completion),
    /// The transfer ended without success. Final.
    Failed(TransferError),
}

/// The summary of a finished transfer.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The object, whose digest was verified.
    pub object: ObjectId,
    /// Its size in bytes.
    pub size: u64,
    /// From the transfer's creation to completion.
    pub duration: Duration,
    /// Counters at completion.
    pub stats: Stats,
}

/// Why a transfer failed. Every variant is final for that transfer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// Nothing arrived from the peer for the whole idle timeout; the peer is gone or the path is
    /// broken. A receiver keeps what it stored, so the download can resume.
    #[error("timed out: nothing heard from the peer for {0:?}")]
    TimedOut(Duration),
    /// Mid-transfer, nothing arrived for `TransferConfig::path_lost_after` while the receiver
    /// probed: the path broke (the client's address changed and the server did not follow).
    /// What was stored is kept: start the download again to resume it on a new connection.
    #[error("path lost: nothing heard from the server for {0:?} mid-transfer")]
    PathLost(Duration),
    /// The server does not have the object.
    #[error("object not found on the server")]
    NotFound,
    /// The server has no room for another transfer now; retry later.
    #[error("server busy, try again later")]
    Busy,
    /// The object is larger than this receiver accepts (`max_object_size`).
    #[error("object of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Size the server offered.
        size: u64,
        /// The configured limit.
        max: u64,
    },
    /// All bytes arrived but they do not hash to the requested id. Nothing was reported as done.
    #[error("digest mismatch: expected {expected}, received bytes hash to {actual}")]
    DigestMismatch {
        /// The id that was requested.
        expected: ObjectId,
        /// The id of what arrived.
        actual: ObjectId,
    },
    /// The peer ended the transfer with an error frame.
    #[error("peer ended the transfer: {code:?}: {reason}")]
    Peer {
        /// Its code.
        code: ErrorCode,
        /// Its reason text.
        reason: String,
    },
    /// The peer sent something the protocol forbids in this state (and it cannot be ignored).
    #[error("protocol violation: {0}")]
    ProtocolViolation(&'static str),
    /// Reading or writing the object's bytes failed; for a receiver, what was stored is kept.
    #[error("storage error during {op}: {message}")]
    Storage {
        /// "read" or "write".
        op: &'static str,
        /// The kind of I/O error.
        kind: io::ErrorKind,
        /// The I/O error's text.
        message: String,
    },
    /// The local user cancelled the transfer.
    #[error("cancelled")]
    Cancelled,
}

impl TransferError {
    pub(crate) fn storage(op: &'static str, e: &io::Error) -> Self {
        TransferError::Storage {
            op,
            kind: e.kind(),
            message: e.to_string(),
        }
    }

    /// The error code to tell the peer, or None when the peer should not be told (it is the one
    /// that failed, or it is unreachable).
    pub(crate) fn code_for_peer(&self) -> Option<ErrorCode> {
        match self {
            TransferError::TimedOut(_) | TransferError::PathLost(_) | TransferError::Peer { .. } => {
                None
            }
            TransferError::NotFound => Some(ErrorCode::NotFound),
            TransferError::Busy => Some(ErrorCode::Busy),
            TransferError::TooLarge { .. } => Some(ErrorCode::TooLarge),
            TransferError::DigestMismatch { .. } => Some(ErrorCode::DigestMismatch),
            TransferError::ProtocolViolation(_) => Some(ErrorCode::ProtocolViolation),
            TransferError::Storage { .. } => Some(ErrorCode::Internal),
            TransferError::Cancelled => Some(ErrorCode::Cancelled),
        }
    }

    /// True when the peer went quiet ([`TimedOut`](Self::TimedOut), or
    /// [`PathLost`](Self::PathLost) mid-transfer) rather than refusing or failing: what arrived
    /// is kept, and asking again (later, or from a new socket) may succeed.
    pub fn is_silence(&self) -> bool {
        matches!(self, TransferError::TimedOut(_) | TransferError::PathLost(_))
    }

    /// The error a peer's error frame stands for.
    pub(crate) fn from_peer(code: ErrorCode, reason: &str) -> Self {
        match code {
            ErrorCode::NotFound => TransferError::NotFound,
            ErrorCode::Busy => TransferError::Busy,
            _ => TransferError::Peer {
                code,
                reason: reason.to_owned(),
            },
        }
    }
}

/// Number of chunks of `chunk_size` bytes an object of `size` bytes has.
pub(crate) fn chunk_count(size: u64, chunk_size: u64) -> u64 {
    size.div_ceil(chunk_size)
}

/// Byte range of chunk `index`.
pub(crate) fn chunk_bytes(index: u64, chunk_size: u64, size: u64) -> std::ops::Range<u64> {
    let start = index.saturating_mul(chunk_size).min(size);
    start..start.saturating_add(chunk_size).min(size)
}

/// The chunks wholly covered by the byte ranges `have` (merged first, so touching ranges count
/// together). Both sides apply this rule to a request's have-set, so they agree on what is held.
pub(crate) fn held_chunks(
    have: impl Iterator<Item = std::ops::Range<u64>>,
    size: u64,
    chunk_size: u64,
) -> RangeSet {
    let mut bytes = RangeSet::new();
    for r in have {
        bytes.insert(r.start.min(size)..r.end.min(size));
    }
    let chunks = chunk_count(size, chunk_size);
    let mut held = RangeSet::new();
    for r in bytes.iter() {
        let first = r.start.div_ceil(chunk_size);
        let last = if r.end >= size {
            chunks
        } else {
            r.end / chunk_size
        };
        if first < last {
            held.insert(first..last);
        }
    }
    held
}

/// Flow control's window in chunks of `chunk_size` bytes: `receive_window_bytes`, at least one
/// chunk (a window of none would let nothing through). Both sides use it.
pub(crate) fn window_chunks(config: &TransferConfig, chunk_size: u64) -> u64 {
    (config.receive_window_bytes / chunk_size.max(1)).max(1)
}

/// `base + d`, or the latest instant (to the second) that can be represented when that overflows
/// the platform's clock type: a deadline from a configured or received duration so long that it
/// never comes, without a panic.
pub(crate) fn later(base: std::time::Instant, d: std::time::Duration) -> std::time::Instant {
    if let Some(t) = base.checked_add(d) {
        return t;
    }
    // Binary search the largest whole number of seconds that still fits.
    let (mut lo, mut hi) = (0u64, d.as_secs());
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if base.checked_add(Duration::from_secs(mid)).is_some() {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    base.checked_add(Duration::from_secs(lo)).unwrap_or(base)
}

/// Microseconds since `epoch`, wrapping at 2^32 (about 71 minutes), as carried on the wire.
pub(crate) fn wire_micros(now: std::time::Instant, epoch: std::time::Instant) -> u32 {
    now.saturating_duration_since(epoch).as_micros() as u32
}
