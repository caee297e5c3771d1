//! Object identifiers: the digest of an object's bytes.

use std::fmt;
use std::str::FromStr;

use md5::{Digest, Md5};

/// The name of an object: the digest of its bytes.
///
/// Games name maps by the MD5 of their bytes, so MD5 is the default (and, in this version, the
/// only) algorithm. The algorithm travels on the wire as its own byte so that stronger digests
/// can be added without a new protocol version; see docs/PROTOCOL.md.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ObjectId {
    /// MD5 of the object's bytes (wire algorithm byte 1).
    Md5([u8; 16]),
}

/// Error from parsing an [`ObjectId`] out of text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseIdError {
    /// The text was not 32 hexadecimal digits (optionally prefixed with `md5:`).
    #[error("object id must be 32 hex digits (an MD5), optionally prefixed with `md5:`")]
    BadFormat,
}

impl ObjectId {
    /// The wire byte for MD5 ids.
    pub const ALG_MD5: u8 = 1;

    /// Computes the MD5 id of `bytes` in one go. For streamed data use [`md5::Md5`] and
    /// [`ObjectId::Md5`] directly.
    pub fn md5_of(bytes: &[u8]) -> Self {
        ObjectId::Md5(Md5::digest(bytes).into())
    }

    /// The digest bytes.
    pub fn digest(&self) -> &[u8] {
        match self {
            ObjectId::Md5(d) => d,
        }
    }

    /// The algorithm byte that precedes the digest on the wire.
    pub fn algorithm(&self) -> u8 {
        match self {
            ObjectId::Md5(_) => Self::ALG_MD5,
        }
    }

    /// Lower-case hex of the digest, without an algorithm prefix.
    pub fn to_hex(&self) -> String {
        hex(self.digest())
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "md5:{}", self.to_hex())
    }
}

impl FromStr for ObjectId {
    type Err = ParseIdError;

    /// Accepts `0123...ef` (32 hex digits) or `md5:0123...ef`, in either case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.strip_prefix("md5:").unwrap_or(s);
        if s.len() != 32 {
            return Err(ParseIdError::BadFormat);
        }
        let mut out = [0u8; 16];
        for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
            let hi = hex_value(pair[0]).ok_or(ParseIdError::BadFormat)?;
            let lo = hex_value(pair[1]).ok_or(ParseIdError::BadFormat)?;
            out[i] = (hi << 4) | lo;
        }
        Ok(ObjectId::Md5(out))
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_of_empty_matches_the_known_digest() {
        assert_eq!(
            ObjectId::md5_of(b"").to_hex(),
            "d41d8cd98f00b204e9800998ecf8427e"
        );
    }

    #[test]
    fn parses_with_and_without_prefix_and_round_trips() {
        let id: ObjectId = "D41D8CD98F00B204E9800998ECF8427E".parse().unwrap();
        assert_eq!(id, ObjectId::md5_of(b""));
        let id2: ObjectId = "md5:d41d8cd98f00b204e9800998ecf8427e".parse().unwrap();
        assert_eq!(id, id2);
        assert_eq!(id.to_string().parse::<ObjectId>().unwrap(), id);
    }

    #[test]
    fn rejects_bad_text() {
        for bad in [
            "",
            "abc",
            "zz1d8cd98f00b204e9800998ecf8427e",
            "d41d8cd98f00b204e9800998ecf8427e0",
        ] {
            assert_eq!(
                bad.parse::<ObjectId>(),
                Err(ParseIdError::BadFormat),
                "{bad}"
            );
        }
    }
}
