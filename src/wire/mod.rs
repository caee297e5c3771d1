//! The datagram format: encode, decode, and the cheap demultiplexing check.
//!
//! Every udpferry datagram is
//!
//! ```text
//! magic "UFRY" (4) | version (1) | kind (1) | connection id (8) | body (kind-specific) | CRC32 (4)
//! ```
//!
//! with all integers big-endian and the CRC32 (IEEE, as computed by `crc32fast`) taken over every
//! byte before it. docs/PROTOCOL.md is the byte-by-byte specification; this module is its only
//! implementation.
//!
//! Decoding borrows from the input and never allocates: variable-length parts (acknowledged
//! ranges, have-sets, payloads, error reasons) are validated up front and then exposed as slices
//! or iterators over the original bytes. Any malformed input yields a [`DecodeError`] and never a
//! panic.

pub(crate) mod cursor;
mod frames;

pub use frames::{
    encode_data_in_place, Ack, AckRanges, Data, Datagram, ErrorCode, ErrorFrame, Frame, Wait,
    HaveRanges, Offer, Request, ACK_BASE_LEN, DATA_PAYLOAD_OFFSET, MAX_CHUNKS,
};
#[cfg(feature = "internals")]
pub use frames::{ack_range_len, AckRangeIter};

/// The first four bytes of every udpferry datagram.
pub const MAGIC: [u8; 4] = *b"UFRY";
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Bytes before the body: magic, version, kind, connection id.
pub const HEADER_LEN: usize = 14;
/// Bytes after the body: the CRC32.
pub const TRAILER_LEN: usize = 4;
/// The smallest possible datagram (a header, an empty body and the trailer).
pub const MIN_DATAGRAM_LEN: usize = HEADER_LEN + TRAILER_LEN;
/// Bytes of a data datagram that are not payload.
pub const DATA_OVERHEAD: usize = HEADER_LEN + frames::DATA_FIELDS_LEN + TRAILER_LEN;
/// Length of a PathChallenge or PathResponse datagram: the header, an 8-byte token, the trailer.
pub const PATH_FRAME_LEN: usize = HEADER_LEN + 8 + TRAILER_LEN;
/// Default datagram size: fits the IPv6 minimum MTU (1280) minus IPv6 and UDP headers.
pub const DEFAULT_MAX_DATAGRAM_SIZE: usize = 1200;
/// The smallest chunk (payload) size a peer may offer. With 32-bit chunk indices (at most
/// 2^32 - 1 chunks) even the smallest chunk size represents objects of 2^40 - 256 bytes; the
/// default 1166-byte chunks reach about 5 TB.
pub const MIN_CHUNK_SIZE: usize = 256;
/// The largest datagram this implementation builds or accepts (the largest UDP payload over IPv4).
pub const MAX_DATAGRAM_SIZE: usize = 65_507;

/// A connection identifier, chosen at random by the client for each transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

/// Returns true when `datagram` starts like a udpferry datagram of a version this crate speaks.
///
/// Call it on every datagram your game's socket receives: when it returns true, hand the
/// datagram to udpferry; otherwise it is yours. It checks length, magic and version only (a few
/// byte comparisons); the checksum and fields are verified later by `decode`, which counts and
/// drops anything malformed.
pub fn is_udpferry_datagram(datagram: &[u8]) -> bool {
    datagram.len() >= MIN_DATAGRAM_LEN && datagram[..4] == MAGIC && datagram[4] == VERSION
}

/// Why a datagram was rejected. Every variant means "drop it and count it"; none is fatal to a
/// transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Shorter than the fixed header and trailer.
    #[error("datagram of {len} bytes is shorter than the {MIN_DATAGRAM_LEN}-byte minimum")]
    TooShort {
        /// Its length.
        len: usize,
    },
    /// Does not start with the udpferry magic: not ours (or badly damaged).
    #[error("not a udpferry datagram (bad magic)")]
    BadMagic,
    /// A udpferry datagram of a protocol version this crate does not speak.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// The CRC32 trailer does not match the contents: damaged in transit.
    #[error("checksum mismatch: trailer says {expected:#010x}, contents hash to {actual:#010x}")]
    BadChecksum {
        /// The CRC32 carried in the trailer.
        expected: u32,
        /// The CRC32 of the bytes before the trailer.
        actual: u32,
    },
    /// A datagram kind this version does not define.
    #[error("unknown datagram kind {0:#04x}")]
    UnknownKind(u8),
    /// The body ended before all of its fields.
    #[error("{kind} datagram is truncated")]
    Truncated {
        /// The datagram kind.
        kind: &'static str,
    },
    /// The body has bytes after its last field.
    #[error("{kind} datagram has trailing bytes")]
    TrailingBytes {
        /// The datagram kind.
        kind: &'static str,
    },
    /// A field holds a value the protocol forbids.
    #[error("invalid {field}: {reason}")]
    InvalidField {
        /// The field's name as in docs/PROTOCOL.md.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Why a datagram could not be encoded. These are caller mistakes (a buffer too small for the
/// configured datagram size, a field out of its range), never caused by the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The output buffer cannot hold the datagram.
    #[error("buffer of {available} bytes is too small, {needed} needed")]
    BufferTooSmall {
        /// Bytes the datagram needs (at least).
        needed: usize,
        /// Bytes the buffer has.
        available: usize,
    },
    /// A value does not fit its field.
    #[error("{field} does not fit its field")]
    ValueTooLarge {
        /// The field's name.
        field: &'static str,
    },
}

/// Decodes one datagram, verifying magic, version, checksum and every field.
///
/// The result borrows from `datagram`. On error, drop the datagram and count the error (see the
/// `dropped` statistics of the core); never reply to it.
pub fn decode(datagram: &[u8]) -> Result<Datagram<'_>, DecodeError> {
    frames::decode(datagram)
}

#[cfg(test)]
mod tests;
