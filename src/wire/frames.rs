//! The datagram kinds and their bodies.

use std::ops::Range;

use super::cursor::{varint_len, Reader, Writer};
use super::{
    ConnectionId, DecodeError, EncodeError, HEADER_LEN, MAGIC, MIN_CHUNK_SIZE, MIN_DATAGRAM_LEN,
    TRAILER_LEN, VERSION,
};
use crate::id::ObjectId;

/// Bytes of the data fields before the payload: sequence, send time, chunk index.
pub(crate) const DATA_FIELDS_LEN: usize = 16;
/// Offset of the payload inside a data datagram.
pub const DATA_PAYLOAD_OFFSET: usize = HEADER_LEN + DATA_FIELDS_LEN;
/// Largest number of chunks an object may have; chunk indices are 32 bits and the cumulative
/// acknowledgement must be able to name "one past the last chunk minus one".
pub const MAX_CHUNKS: u64 = u32::MAX as u64;

const KIND_REQUEST: u8 = 0x01;
const KIND_OFFER: u8 = 0x02;
const KIND_START: u8 = 0x03;
const KIND_DATA: u8 = 0x04;
const KIND_ACK: u8 = 0x05;
const KIND_DONE: u8 = 0x06;
const KIND_ERROR: u8 = 0x07;
const KIND_WAIT: u8 = 0x08;
const KIND_PATH_CHALLENGE: u8 = 0x09;
const KIND_PATH_RESPONSE: u8 = 0x0A;

/// One decoded (or to-be-encoded) datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram<'a> {
    /// The transfer this datagram belongs to.
    pub conn_id: ConnectionId,
    /// What it says.
    pub frame: Frame<'a>,
}

/// The body of a datagram, by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Client to server: please send this object.
    Request(Request<'a>),
    /// Server to client: here is what I will send, echo my nonce to start.
    Offer(Offer),
    /// Client to server: the nonce from the offer, which proves the client's address, and the
    /// request again, so that a server can keep no state until the address is proved.
    Start {
        /// The nonce the server put in its offer.
        nonce: u64,
        /// The request the offer answered, unchanged.
        request: Request<'a>,
    },
    /// Server to client: one chunk of the object.
    Data(Data<'a>),
    /// Client to server: which chunks have arrived.
    Ack(Ack<'a>),
    /// Client to server: every chunk arrived and the object's digest matched.
    Done,
    /// Either way: the transfer is over, for this reason.
    Error(ErrorFrame<'a>),
    /// Server to client, in answer to a Start at the server's limit: the request holds a place
    /// in the server's queue; repeat the Start to keep it.
    Wait(Wait),
    /// Server to client, to an address a known connection's datagram came from that is not the
    /// transfer's: echo this token from there to move the transfer to it (path validation,
    /// docs/PROTOCOL.md section 5.9).
    PathChallenge(u64),
    /// Client to server: the token of a `PathChallenge`, sent from the address it reached.
    PathResponse(u64),
}

/// A place in a server's admission queue (docs/PROTOCOL.md section 3.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// The request's place in the queue: 1 for the first in line (it waits for a running
    /// transfer to end), 2 with one request ahead of it, and so on; 0 when a slot is held
    /// for it now (start at once).
    pub place: u32,
    /// When to repeat the Start, in milliseconds: the server forgets a place not refreshed
    /// within three such intervals.
    pub retry_after_ms: u16,
}

/// A request for one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    /// The object wanted.
    pub object: ObjectId,
    /// Largest datagram the client accepts (at least [`MIN_DATAGRAM_LEN`] + 256 payload).
    pub max_datagram_size: u16,
    /// Rate cap the client asks for, in bytes per second; 0 means none.
    pub max_rate_bytes_per_sec: u64,
    /// Byte ranges of the object the client already holds (resume).
    pub have: HaveRanges<'a>,
}

/// Byte ranges a client already holds: ascending, non-overlapping, non-empty.
#[derive(Debug, Clone, Copy)]
pub enum HaveRanges<'a> {
    /// As found in a decoded datagram (16 bytes per range, already validated).
    Wire(&'a [u8]),
    /// As given by a sender of the datagram.
    List(&'a [Range<u64>]),
}

/// What a server will send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    /// The object, echoed from the request.
    pub object: ObjectId,
    /// Its size in bytes.
    pub size: u64,
    /// Payload bytes per data datagram (the last chunk may be shorter).
    pub chunk_size: u16,
    /// An unpredictable value the client must echo in [`Frame::Start`].
    pub nonce: u64,
}

/// One chunk of the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Data<'a> {
    /// Send sequence number: unique per datagram sent, retransmissions included.
    pub seq: u64,
    /// Sender's clock when sent, in microseconds since its own arbitrary epoch (wraps).
    pub send_time_us: u32,
    /// Chunk index; the chunk covers bytes `chunk * chunk_size ..` of the object.
    pub chunk: u32,
    /// The chunk's bytes.
    pub payload: &'a [u8],
}

/// An acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack<'a> {
    /// Largest data sequence number received so far.
    pub largest_seq: u64,
    /// Microseconds between receiving `largest_seq` and sending this ack.
    pub ack_delay_us: u32,
    /// Receiver's clock minus `send_time_us` of `largest_seq`, wrapping: a one-way delay sample
    /// with an unknown constant offset (only its changes mean anything).
    pub owd_us: u32,
    /// Flow control: the sender may send chunks below this index only.
    pub window_end: u32,
    /// Every chunk below this index has arrived.
    pub cumulative: u32,
    /// Further received chunk ranges above `cumulative` (a chosen subset, ascending).
    pub ranges: AckRanges<'a>,
}

/// Received chunk ranges above the cumulative point: ascending, disjoint, non-adjacent.
#[derive(Debug, Clone, Copy)]
pub enum AckRanges<'a> {
    /// As found in a decoded datagram (already validated).
    Wire {
        /// Number of ranges.
        count: u8,
        /// The cumulative point the first gap is measured from.
        base: u32,
        /// The encoded (gap, length) varint pairs.
        bytes: &'a [u8],
    },
    /// As given by a sender of the datagram. At most 255 ranges, all above the cumulative point.
    List(&'a [Range<u64>]),
}

/// Why a transfer ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorFrame<'a> {
    /// What went wrong, as a number a program can act on.
    pub code: ErrorCode,
    /// A short human-readable reason (at most 255 bytes of UTF-8).
    pub reason: &'a str,
}

/// Error codes carried by [`Frame::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The server does not have the requested object.
    NotFound,
    /// The server is at its limit of concurrent transfers; try again later.
    Busy,
    /// The request was malformed or asked for something not allowed.
    BadRequest,
    /// The received object did not match its digest.
    DigestMismatch,
    /// The peer gave up (user cancelled, shutting down).
    Cancelled,
    /// The object is larger than the peer accepts.
    TooLarge,
    /// The peer broke the protocol.
    ProtocolViolation,
    /// A local failure on the peer (disk error, out of resources).
    Internal,
    /// A code this version does not know.
    Other(u16),
}

impl ErrorCode {
    /// The code's number on the wire.
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::NotFound => 1,
            ErrorCode::Busy => 2,
            ErrorCode::BadRequest => 3,
            ErrorCode::DigestMismatch => 4,
            ErrorCode::Cancelled => 5,
            ErrorCode::TooLarge => 6,
            ErrorCode::ProtocolViolation => 7,
            ErrorCode::Internal => 8,
            ErrorCode::Other(n) => n,
        }
    }

    /// The code for a number read from the wire.
    pub fn from_u16(n: u16) -> Self {
        match n {
            1 => ErrorCode::NotFound,
            2 => ErrorCode::Busy,
            3 => ErrorCode::BadRequest,
            4 => ErrorCode::DigestMismatch,
            5 => ErrorCode::Cancelled,
            6 => ErrorCode::TooLarge,
            7 => ErrorCode::ProtocolViolation,
            8 => ErrorCode::Internal,
            n => ErrorCode::Other(n),
        }
    }
}

impl HaveRanges<'_> {
    /// The ranges, ascending.
    pub fn iter(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        let (wire, list): (&[u8], &[Range<u64>]) = match self {
            HaveRanges::Wire(b) => (b, &[]),
            HaveRanges::List(l) => (&[], l),
        };
        wire.chunks_exact(16)
            .map(|c| be_u64(&c[..8])..be_u64(&c[8..]))
            .chain(list.iter().cloned())
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        match self {
            HaveRanges::Wire(b) => b.len() / 16,
            HaveRanges::List(l) => l.len(),
        }
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PartialEq for HaveRanges<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}
impl Eq for HaveRanges<'_> {}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_be_bytes(a)
}

impl AckRanges<'_> {
    /// The ranges, ascending.
    pub fn iter(&self) -> AckRangeIter<'_> {
        match *self {
            AckRanges::Wire { count, base, bytes } => AckRangeIter(RangeIterInner::Wire {
                reader: Reader::new(bytes, "ack"),
                left: count,
                prev_end: u64::from(base),
            }),
            AckRanges::List(l) => AckRangeIter(RangeIterInner::List(l.iter())),
        }
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        match self {
            AckRanges::Wire { count, .. } => usize::from(*count),
            AckRanges::List(l) => l.len(),
        }
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PartialEq for AckRanges<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}
impl Eq for AckRanges<'_> {}

/// Iterator over [`AckRanges`].
pub struct AckRangeIter<'a>(RangeIterInner<'a>);

enum RangeIterInner<'a> {
    Wire {
        reader: Reader<'a>,
        left: u8,
        prev_end: u64,
    },
    List(std::slice::Iter<'a, Range<u64>>),
}

impl Iterator for AckRangeIter<'_> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        match &mut self.0 {
            RangeIterInner::List(it) => it.next().cloned(),
            RangeIterInner::Wire {
                reader,
                left,
                prev_end,
            } => {
                if *left == 0 {
                    return None;
                }
                *left -= 1;
                // Validated by `decode_ack`, so these reads cannot fail; stop quietly if they do.
                let gap = reader.varint().ok()?;
                let len = reader.varint().ok()?;
                let start = *prev_end + gap;
                let end = start + len;
                *prev_end = end;
                Some(start..end)
            }
        }
    }
}

impl Datagram<'_> {
    /// Encodes the datagram (header, body, CRC32) into `buf` and returns its length.
    ///
    /// Fails only on caller mistakes: a buffer too small, or a field out of range (for example
    /// more than 255 ack ranges, or a reason longer than 255 bytes).
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, EncodeError> {
        let mut w = Writer::new(buf);
        w.bytes(&MAGIC)?;
        w.u8(VERSION)?;
        w.u8(self.frame.kind())?;
        w.u64(self.conn_id.0)?;
        match &self.frame {
            Frame::Request(r) => write_request(&mut w, r)?,
            Frame::Offer(o) => {
                write_id(&mut w, &o.object)?;
                w.u64(o.size)?;
                w.u16(o.chunk_size)?;
                w.u64(o.nonce)?;
            }
            Frame::Start { nonce, request } => {
                w.u64(*nonce)?;
                write_request(&mut w, request)?;
            }
            Frame::Data(d) => {
                w.u64(d.seq)?;
                w.u32(d.send_time_us)?;
                w.u32(d.chunk)?;
                w.bytes(d.payload)?;
            }
            Frame::Ack(a) => {
                w.u64(a.largest_seq)?;
                w.u32(a.ack_delay_us)?;
                w.u32(a.owd_us)?;
                w.u32(a.window_end)?;
                w.u32(a.cumulative)?;
                let count =
                    u8::try_from(a.ranges.len()).map_err(|_| EncodeError::ValueTooLarge {
                        field: "range_count",
                    })?;
                w.u8(count)?;
                let mut prev_end = u64::from(a.cumulative);
                for r in a.ranges.iter() {
                    if r.start <= prev_end || r.end <= r.start {
                        return Err(EncodeError::ValueTooLarge { field: "ack range" });
                    }
                    w.varint(r.start - prev_end)?;
                    w.varint(r.end - r.start)?;
                    prev_end = r.end;
                }
            }
            Frame::Done => {}
            Frame::Error(e) => {
                w.u16(e.code.to_u16())?;
                let len = u8::try_from(e.reason.len())
                    .map_err(|_| EncodeError::ValueTooLarge { field: "reason" })?;
                w.u8(len)?;
                w.bytes(e.reason.as_bytes())?;
            }
            Frame::Wait(wait) => {
                w.u32(wait.place)?;
                w.u16(wait.retry_after_ms)?;
            }
            Frame::PathChallenge(token) | Frame::PathResponse(token) => w.u64(*token)?,
        }
        finish(w)
    }
}

impl Frame<'_> {
    fn kind(&self) -> u8 {
        match self {
            Frame::Request(_) => KIND_REQUEST,
            Frame::Offer(_) => KIND_OFFER,
            Frame::Start { .. } => KIND_START,
            Frame::Data(_) => KIND_DATA,
            Frame::Ack(_) => KIND_ACK,
            Frame::Done => KIND_DONE,
            Frame::Error(_) => KIND_ERROR,
            Frame::Wait(_) => KIND_WAIT,
            Frame::PathChallenge(_) => KIND_PATH_CHALLENGE,
            Frame::PathResponse(_) => KIND_PATH_RESPONSE,
        }
    }
}

/// Finishes a data datagram whose payload the caller already wrote at
/// `buf[DATA_PAYLOAD_OFFSET..DATA_PAYLOAD_OFFSET + payload_len]`: writes the header, the data
/// fields and the CRC32, and returns the datagram's length.
///
/// This saves a copy on the hot path: a sender reads the chunk straight into the output buffer.
pub fn encode_data_in_place(
    buf: &mut [u8],
    conn_id: ConnectionId,
    seq: u64,
    send_time_us: u32,
    chunk: u32,
    payload_len: usize,
) -> Result<usize, EncodeError> {
    let mut w = Writer::new(buf);
    w.bytes(&MAGIC)?;
    w.u8(VERSION)?;
    w.u8(KIND_DATA)?;
    w.u64(conn_id.0)?;
    w.u64(seq)?;
    w.u32(send_time_us)?;
    w.u32(chunk)?;
    w.skip(payload_len)?;
    finish(w)
}

#[cfg_attr(not(feature = "internals"), allow(dead_code))] // used by tests and benches
/// How many bytes an ack with these ranges takes on the wire, so a receiver can stop adding
/// ranges before the datagram outgrows its limit.
pub fn ack_range_len(prev_end: u64, range: &Range<u64>) -> usize {
    varint_len(range.start.saturating_sub(prev_end)) + varint_len(range.end - range.start)
}

/// Bytes of an ack datagram with no ranges.
pub const ACK_BASE_LEN: usize = HEADER_LEN + 8 + 4 * 4 + 1 + TRAILER_LEN;

fn write_id(w: &mut Writer<'_>, id: &ObjectId) -> Result<(), EncodeError> {
    w.u8(id.algorithm())?;
    w.bytes(id.digest())
}

fn write_request(w: &mut Writer<'_>, r: &Request<'_>) -> Result<(), EncodeError> {
    write_id(w, &r.object)?;
    w.u16(r.max_datagram_size)?;
    w.u64(r.max_rate_bytes_per_sec)?;
    let count = u16::try_from(r.have.len()).map_err(|_| EncodeError::ValueTooLarge {
        field: "have_count",
    })?;
    w.u16(count)?;
    for range in r.have.iter() {
        w.u64(range.start)?;
        w.u64(range.end)?;
    }
    Ok(())
}

fn finish(mut w: Writer<'_>) -> Result<usize, EncodeError> {
    let crc = crc32fast::hash(w.written());
    w.u32(crc)?;
    Ok(w.position())
}

pub(super) fn decode(buf: &[u8]) -> Result<Datagram<'_>, DecodeError> {
    if buf.len() < MIN_DATAGRAM_LEN {
        return Err(DecodeError::TooShort { len: buf.len() });
    }
    if buf[..4] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if buf[4] != VERSION {
        return Err(DecodeError::UnsupportedVersion(buf[4]));
    }
    let (content, trailer) = buf.split_at(buf.len() - TRAILER_LEN);
    let expected = u32::from_be_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    let actual = crc32fast::hash(content);
    if expected != actual {
        return Err(DecodeError::BadChecksum { expected, actual });
    }
    let kind = content[5];
    let conn_id = ConnectionId(be_u64(&content[6..14]));
    let body = &content[HEADER_LEN..];
    let frame = match kind {
        KIND_REQUEST => Frame::Request(decode_request(body)?),
        KIND_OFFER => Frame::Offer(decode_offer(body)?),
        KIND_START => {
            let mut r = Reader::new(body, "start");
            let nonce = r.u64()?;
            let request = decode_request(r.rest())?;
            Frame::Start { nonce, request }
        }
        KIND_DATA => {
            let mut r = Reader::new(body, "data");
            let seq = r.u64()?;
            let send_time_us = r.u32()?;
            let chunk = r.u32()?;
            let payload = r.rest();
            Frame::Data(Data {
                seq,
                send_time_us,
                chunk,
                payload,
            })
        }
        KIND_ACK => Frame::Ack(decode_ack(body)?),
        KIND_DONE => {
            Reader::new(body, "done").finish()?;
            Frame::Done
        }
        KIND_ERROR => {
            let mut r = Reader::new(body, "error");
            let code = ErrorCode::from_u16(r.u16()?);
            let len = r.u8()?;
            let reason = std::str::from_utf8(r.bytes(usize::from(len))?).map_err(|_| {
                DecodeError::InvalidField {
                    field: "reason",
                    reason: "not UTF-8",
                }
            })?;
            r.finish()?;
            Frame::Error(ErrorFrame { code, reason })
        }
        KIND_WAIT => {
            let mut r = Reader::new(body, "wait");
            let place = r.u32()?;
            let retry_after_ms = r.u16()?;
            r.finish()?;
            Frame::Wait(Wait {
                place,
                retry_after_ms,
            })
        }
        KIND_PATH_CHALLENGE | KIND_PATH_RESPONSE => {
            let mut r = Reader::new(body, "path token");
            let token = r.u64()?;
            r.finish()?;
            if kind == KIND_PATH_CHALLENGE {
                Frame::PathChallenge(token)
            } else {
                Frame::PathResponse(token)
            }
        }
        other => return Err(DecodeError::UnknownKind(other)),
    };
    Ok(Datagram { conn_id, frame })
}

fn read_id(r: &mut Reader<'_>) -> Result<ObjectId, DecodeError> {
    match r.u8()? {
        ObjectId::ALG_MD5 => Ok(ObjectId::Md5(r.array()?)),
        ObjectId::ALG_SHA256 => Ok(ObjectId::Sha256(r.array()?)),
        _ => Err(DecodeError::InvalidField {
            field: "object_id",
            reason: "unknown digest algorithm",
        }),
    }
}

fn decode_request(body: &[u8]) -> Result<Request<'_>, DecodeError> {
    let mut r = Reader::new(body, "request");
    let object = read_id(&mut r)?;
    let max_datagram_size = r.u16()?;
    if usize::from(max_datagram_size) < super::DATA_OVERHEAD + MIN_CHUNK_SIZE {
        return Err(DecodeError::InvalidField {
            field: "max_datagram_size",
            reason: "too small to carry a minimum-size chunk",
        });
    }
    let max_rate_bytes_per_sec = r.u64()?;
    let count = usize::from(r.u16()?);
    let ranges = r.bytes(
        count
            .checked_mul(16)
            .ok_or(DecodeError::Truncated { kind: "request" })?,
    )?;
    let mut prev_end = 0u64;
    for c in ranges.chunks_exact(16) {
        let (start, end) = (be_u64(&c[..8]), be_u64(&c[8..]));
        if start >= end || start < prev_end {
            return Err(DecodeError::InvalidField {
                field: "have range",
                reason: "ranges must be non-empty, ascending and disjoint",
            });
        }
        prev_end = end;
    }
    r.finish()?;
    Ok(Request {
        object,
        max_datagram_size,
        max_rate_bytes_per_sec,
        have: HaveRanges::Wire(ranges),
    })
}

fn decode_offer(body: &[u8]) -> Result<Offer, DecodeError> {
    let mut r = Reader::new(body, "offer");
    let object = read_id(&mut r)?;
    let size = r.u64()?;
    let chunk_size = r.u16()?;
    let nonce = r.u64()?;
    r.finish()?;
    if usize::from(chunk_size) < MIN_CHUNK_SIZE {
        return Err(DecodeError::InvalidField {
            field: "chunk_size",
            reason: "below the 256-byte minimum",
        });
    }
    if size.div_ceil(u64::from(chunk_size)) > MAX_CHUNKS {
        return Err(DecodeError::InvalidField {
            field: "size",
            reason: "more chunks than 32-bit chunk indices can name",
        });
    }
    Ok(Offer {
        object,
        size,
        chunk_size,
        nonce,
    })
}

fn decode_ack(body: &[u8]) -> Result<Ack<'_>, DecodeError> {
    let mut r = Reader::new(body, "ack");
    let largest_seq = r.u64()?;
    let ack_delay_us = r.u32()?;
    let owd_us = r.u32()?;
    let window_end = r.u32()?;
    let cumulative = r.u32()?;
    let count = r.u8()?;
    let bytes = r.rest();
    // Validate every range now so that iterating later cannot fail.
    let mut check = Reader::new(bytes, "ack");
    let mut prev_end = u64::from(cumulative);
    for _ in 0..count {
        let gap = check.varint()?;
        let len = check.varint()?;
        if gap == 0 || len == 0 {
            return Err(DecodeError::InvalidField {
                field: "ack range",
                reason: "gaps and lengths must be at least 1",
            });
        }
        let end = prev_end
            .checked_add(gap)
            .and_then(|s| s.checked_add(len))
            .filter(|&e| e <= MAX_CHUNKS)
            .ok_or(DecodeError::InvalidField {
                field: "ack range",
                reason: "range ends beyond the largest chunk index",
            })?;
        prev_end = end;
    }
    check.finish()?;
    Ok(Ack {
        largest_seq,
        ack_delay_us,
        owd_us,
        window_end,
        cumulative,
        ranges: AckRanges::Wire {
            count,
            base: cumulative,
            bytes,
        },
    })
}
