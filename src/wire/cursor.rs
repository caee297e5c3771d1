//! Bounds-checked big-endian reading and writing: the crate's one codec.
//!
//! The datagram format (`frames.rs`) and the three file formats of `store` (the resume journal,
//! the block manifest and the bundle listing) all read with [`Reader`] and write with
//! [`Writer`]. Every read returns `Err(DecodeError::Truncated)` instead of panicking when the
//! input is short. A writer over a slice (a datagram buffer) returns
//! `Err(EncodeError::BufferTooSmall)` when the output is; a writer over a `Vec` grows it, and
//! its error type, [`Infallible`], says it cannot fail.

use std::convert::Infallible;

use super::{DecodeError, EncodeError};
use crate::id::ObjectId;

/// A read position inside a datagram body or a stored file.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// `what` names the datagram kind (or the file format) in errors.
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, pos: 0, what }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The bytes read so far.
    pub(crate) fn consumed(&self) -> &'a [u8] {
        &self.buf[..self.pos]
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated { kind: self.what });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let out = &self.buf[self.pos..];
        self.pos = self.buf.len();
        out
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// `n` bytes of UTF-8 text; `field` names it in the error when they are not UTF-8.
    pub(crate) fn utf8(&mut self, n: usize, field: &'static str) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes(n)?).map_err(|_| DecodeError::InvalidField {
            field,
            reason: "not UTF-8",
        })
    }

    /// An object id: its algorithm byte, then a digest of that algorithm's length
    /// (docs/PROTOCOL.md section 4).
    pub(crate) fn object_id(&mut self) -> Result<ObjectId, DecodeError> {
        match self.u8()? {
            ObjectId::ALG_MD5 => Ok(ObjectId::Md5(self.array()?)),
            ObjectId::ALG_SHA256 => Ok(ObjectId::Sha256(self.array()?)),
            _ => Err(DecodeError::InvalidField {
                field: "object_id",
                reason: "unknown digest algorithm",
            }),
        }
    }

    /// A QUIC variable-length integer (RFC 9000 section 16).
    pub(crate) fn varint(&mut self) -> Result<u64, DecodeError> {
        let first = self.u8()?;
        let extra = (1usize << (first >> 6)) - 1;
        let mut value = u64::from(first & 0x3f);
        for &b in self.bytes(extra)? {
            value = (value << 8) | u64::from(b);
        }
        Ok(value)
    }

    /// Fails unless every byte was consumed.
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes { kind: self.what })
        }
    }
}

/// Where a [`Writer`] puts its bytes: a fixed slice (a datagram buffer, which can be too
/// small) or a `Vec` (a stored file's bytes, which grows).
pub(crate) trait Output {
    /// What a write that does not fit returns.
    type Error;

    /// The first `end` bytes, after growing to that length if this output can grow.
    fn upto(&mut self, end: usize) -> Result<&mut [u8], Self::Error>;

    /// Every byte of the output.
    fn all(&mut self) -> &mut [u8];
}

impl Output for [u8] {
    type Error = EncodeError;

    fn upto(&mut self, end: usize) -> Result<&mut [u8], EncodeError> {
        let available = self.len();
        self.get_mut(..end).ok_or(EncodeError::BufferTooSmall {
            needed: end,
            available,
        })
    }

    fn all(&mut self) -> &mut [u8] {
        self
    }
}

impl Output for Vec<u8> {
    type Error = Infallible;

    fn upto(&mut self, end: usize) -> Result<&mut [u8], Infallible> {
        if self.len() < end {
            self.resize(end, 0);
        }
        Ok(&mut self[..end])
    }

    fn all(&mut self) -> &mut [u8] {
        self
    }
}

/// A write position inside an output buffer (by default a fixed slice).
pub(crate) struct Writer<'a, B: Output + ?Sized = [u8]> {
    buf: &'a mut B,
    pos: usize,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(buf: &'a mut [u8]) -> Self {
        Writer { buf, pos: 0 }
    }
}

impl<'a> Writer<'a, Vec<u8>> {
    /// A writer that appends to `out`, growing it as needed; its writes cannot fail.
    pub(crate) fn growing(out: &'a mut Vec<u8>) -> Self {
        let pos = out.len();
        Writer { buf: out, pos }
    }
}

impl<B: Output + ?Sized> Writer<'_, B> {
    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn bytes(&mut self, data: &[u8]) -> Result<(), B::Error> {
        let end = self.pos + data.len();
        self.buf.upto(end)?[self.pos..].copy_from_slice(data);
        self.pos = end;
        Ok(())
    }

    /// Moves the position forward over bytes the caller already wrote in place.
    pub(crate) fn skip(&mut self, n: usize) -> Result<(), B::Error> {
        let end = self.pos + n;
        self.buf.upto(end)?;
        self.pos = end;
        Ok(())
    }

    pub(crate) fn u8(&mut self, v: u8) -> Result<(), B::Error> {
        self.bytes(&[v])
    }

    pub(crate) fn u16(&mut self, v: u16) -> Result<(), B::Error> {
        self.bytes(&v.to_be_bytes())
    }

    pub(crate) fn u32(&mut self, v: u32) -> Result<(), B::Error> {
        self.bytes(&v.to_be_bytes())
    }

    pub(crate) fn u64(&mut self, v: u64) -> Result<(), B::Error> {
        self.bytes(&v.to_be_bytes())
    }

    /// An object id: its algorithm byte, then its digest.
    pub(crate) fn object_id(&mut self, id: &ObjectId) -> Result<(), B::Error> {
        self.u8(id.algorithm())?;
        self.bytes(id.digest())
    }

    /// The bytes written so far (for a growing writer, everything in its `Vec`).
    pub(crate) fn written(&mut self) -> &mut [u8] {
        &mut self.buf.all()[..self.pos]
    }
}

impl<B: Output<Error = EncodeError> + ?Sized> Writer<'_, B> {
    /// A QUIC variable-length integer; values must be below 2^62.
    pub(crate) fn varint(&mut self, v: u64) -> Result<(), EncodeError> {
        if v < 1 << 6 {
            self.u8(v as u8)
        } else if v < 1 << 14 {
            self.u16(v as u16 | 0x4000)
        } else if v < 1 << 30 {
            self.u32(v as u32 | 0x8000_0000)
        } else if v < 1 << 62 {
            self.u64(v | 0xc000_0000_0000_0000)
        } else {
            Err(EncodeError::ValueTooLarge { field: "varint" })
        }
    }
}

/// How many bytes `Writer::varint` uses for `v`.
pub(crate) fn varint_len(v: u64) -> usize {
    if v < 1 << 6 {
        1
    } else if v < 1 << 14 {
        2
    } else if v < 1 << 30 {
        4
    } else {
        8
    }
}

/// Lower-case hex of `bytes`, for tests that pin exact encodings.
#[cfg(test)]
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_writer_refuses_what_does_not_fit_and_a_growing_one_grows() {
        let mut buf = [0u8; 5];
        let mut w = Writer::new(&mut buf);
        w.u32(0x0102_0304).unwrap();
        assert_eq!(
            w.u16(7),
            Err(EncodeError::BufferTooSmall {
                needed: 6,
                available: 5
            })
        );
        assert_eq!(w.position(), 4, "a refused write leaves the position");
        w.u8(5).unwrap();
        assert_eq!(w.written(), [1, 2, 3, 4, 5]);

        let mut out = b"ab".to_vec();
        let mut w = Writer::growing(&mut out);
        let Ok(()) = w.u16(0x0102);
        let Ok(()) = w.skip(2);
        let Ok(()) = w.u64(3);
        assert_eq!(w.position(), 14);
        assert_eq!(w.written().len(), 14);
        assert_eq!(
            hex(&out),
            concat!("6162", "0102", "0000", "0000000000000003")
        );
    }

    #[test]
    fn ids_and_text_round_trip_and_refuse_what_they_must() {
        let ids = [ObjectId::md5_of(b"x"), ObjectId::sha256_of(b"y")];
        let mut out = Vec::new();
        let mut w = Writer::growing(&mut out);
        for id in &ids {
            let Ok(()) = w.object_id(id);
        }
        let Ok(()) = w.bytes("caf\u{e9}".as_bytes());
        assert_eq!(out.len(), 1 + 16 + 1 + 32 + 5);
        let mut r = Reader::new(&out, "test");
        assert_eq!(r.object_id(), Ok(ids[0]));
        assert_eq!(r.consumed(), &out[..17]);
        assert_eq!(r.object_id(), Ok(ids[1]));
        assert_eq!(r.utf8(5, "name"), Ok("caf\u{e9}"));
        r.finish().unwrap();

        for cut in 0..17 {
            assert_eq!(
                Reader::new(&out[..cut], "test").object_id(),
                Err(DecodeError::Truncated { kind: "test" })
            );
        }
        assert!(matches!(
            Reader::new(&[3; 40], "test").object_id(),
            Err(DecodeError::InvalidField {
                field: "object_id",
                ..
            })
        ));
        assert_eq!(
            Reader::new(&[b'a', 0xff], "test").utf8(2, "name"),
            Err(DecodeError::InvalidField {
                field: "name",
                reason: "not UTF-8"
            })
        );
        assert_eq!(
            Reader::new(b"ab", "test").utf8(3, "name"),
            Err(DecodeError::Truncated { kind: "test" })
        );
    }
}
