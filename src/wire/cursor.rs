//! Bounds-checked big-endian reading and writing over byte slices.
//!
//! Every read returns `Err(DecodeError::Truncated)` instead of panicking when the input is
//! short, and every write returns `Err(EncodeError::BufferTooSmall)` when the output is.

use super::{DecodeError, EncodeError};

/// A read position inside a datagram body.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// `what` names the datagram kind in errors.
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, pos: 0, what }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
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

/// A write position inside an output buffer.
pub(crate) struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(buf: &'a mut [u8]) -> Self {
        Writer { buf, pos: 0 }
    }

    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn bytes(&mut self, data: &[u8]) -> Result<(), EncodeError> {
        let end = self.pos + data.len();
        if end > self.buf.len() {
            return Err(EncodeError::BufferTooSmall {
                needed: end,
                available: self.buf.len(),
            });
        }
        self.buf[self.pos..end].copy_from_slice(data);
        self.pos = end;
        Ok(())
    }

    /// Moves the position forward over bytes the caller already wrote in place.
    pub(crate) fn skip(&mut self, n: usize) -> Result<(), EncodeError> {
        let end = self.pos + n;
        if end > self.buf.len() {
            return Err(EncodeError::BufferTooSmall {
                needed: end,
                available: self.buf.len(),
            });
        }
        self.pos = end;
        Ok(())
    }

    pub(crate) fn u8(&mut self, v: u8) -> Result<(), EncodeError> {
        self.bytes(&[v])
    }

    pub(crate) fn u16(&mut self, v: u16) -> Result<(), EncodeError> {
        self.bytes(&v.to_be_bytes())
    }

    pub(crate) fn u32(&mut self, v: u32) -> Result<(), EncodeError> {
        self.bytes(&v.to_be_bytes())
    }

    pub(crate) fn u64(&mut self, v: u64) -> Result<(), EncodeError> {
        self.bytes(&v.to_be_bytes())
    }

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

    /// The bytes written so far.
    pub(crate) fn written(&mut self) -> &mut [u8] {
        &mut self.buf[..self.pos]
    }
}

#[cfg_attr(not(feature = "internals"), allow(dead_code))] // used by tests and benches
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
