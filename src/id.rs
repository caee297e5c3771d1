//! Object identifiers: the digest of an object's bytes.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::md5::Md5;

/// The name of an object: the digest of its bytes.
///
/// Games name maps by the MD5 of their bytes, so MD5 is the default. MD5 catches corruption but
/// not a server that chose its object to collide with another; where that matters, name objects
/// by SHA-256 (docs/SECURITY.md). The algorithm travels on the wire as its own byte; see
/// docs/PROTOCOL.md section 4.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ObjectId {
    /// MD5 of the object's bytes (wire algorithm byte 1).
    Md5([u8; 16]),
    /// SHA-256 of the object's bytes (wire algorithm byte 2).
    Sha256([u8; 32]),
}

/// Error from parsing an [`ObjectId`] out of text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseIdError {
    /// The text was neither 32 hexadecimal digits (an MD5, optionally prefixed with `md5:`)
    /// nor `sha256:` and 64 hexadecimal digits.
    #[error("object id must be 32 hex digits (an MD5, optionally prefixed with `md5:`) or `sha256:` and 64 hex digits")]
    BadFormat,
}

impl ObjectId {
    /// The wire byte for MD5 ids.
    pub const ALG_MD5: u8 = 1;
    /// The wire byte for SHA-256 ids.
    pub const ALG_SHA256: u8 = 2;

    /// Computes the MD5 id of `bytes` in one go. For streamed data use `IdHasher`.
    pub fn md5_of(bytes: &[u8]) -> Self {
        ObjectId::Md5(Md5::digest(bytes))
    }

    /// Computes the SHA-256 id of `bytes` in one go. For streamed data use `IdHasher`.
    pub fn sha256_of(bytes: &[u8]) -> Self {
        ObjectId::Sha256(Sha256::digest(bytes).into())
    }

    /// The digest bytes.
    pub fn digest(&self) -> &[u8] {
        match self {
            ObjectId::Md5(d) => d,
            ObjectId::Sha256(d) => d,
        }
    }

    /// The algorithm byte that precedes the digest on the wire.
    pub fn algorithm(&self) -> u8 {
        match self {
            ObjectId::Md5(_) => Self::ALG_MD5,
            ObjectId::Sha256(_) => Self::ALG_SHA256,
        }
    }

    /// Digest length in bytes for a wire algorithm byte, or `None` for an unknown algorithm.
    pub fn digest_len(algorithm: u8) -> Option<usize> {
        match algorithm {
            Self::ALG_MD5 => Some(16),
            Self::ALG_SHA256 => Some(32),
            _ => None,
        }
    }

    /// Builds an id from its wire algorithm byte and digest; `None` if the algorithm is
    /// unknown or the digest has the wrong length.
    pub fn from_parts(algorithm: u8, digest: &[u8]) -> Option<Self> {
        match algorithm {
            Self::ALG_MD5 => Some(ObjectId::Md5(digest.try_into().ok()?)),
            Self::ALG_SHA256 => Some(ObjectId::Sha256(digest.try_into().ok()?)),
            _ => None,
        }
    }

    /// Lower-case hex of the digest, without an algorithm prefix. Cache file names use it: an
    /// MD5 has 32 digits and a SHA-256 64, so the two never share a name.
    pub fn to_hex(&self) -> String {
        hex(self.digest())
    }

    /// A hasher that computes an id of this id's algorithm.
    pub fn hasher(&self) -> IdHasher {
        IdHasher::new(self.algorithm()).unwrap_or_default()
    }
}

/// Computes an [`ObjectId`] from bytes fed in order, for either algorithm.
#[derive(Debug, Clone)]
pub enum IdHasher {
    /// MD5.
    Md5(Md5),
    /// SHA-256.
    Sha256(Sha256),
}

impl Default for IdHasher {
    fn default() -> Self {
        IdHasher::Md5(Md5::new())
    }
}

impl IdHasher {
    /// A hasher for the wire algorithm byte `algorithm`, or `None` if it is unknown.
    pub fn new(algorithm: u8) -> Option<Self> {
        match algorithm {
            ObjectId::ALG_MD5 => Some(IdHasher::Md5(Md5::new())),
            ObjectId::ALG_SHA256 => Some(IdHasher::Sha256(Sha256::new())),
            _ => None,
        }
    }

    /// Adds the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            IdHasher::Md5(h) => h.update(bytes),
            IdHasher::Sha256(h) => h.update(bytes),
        }
    }

    /// The id of everything added.
    pub fn finish(self) -> ObjectId {
        match self {
            IdHasher::Md5(h) => ObjectId::Md5(h.finalize()),
            IdHasher::Sha256(h) => ObjectId::Sha256(h.finalize().into()),
        }
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

/// MD5 ids print as bare hex (how games write them); SHA-256 ids as `sha256:<hex>`. Both parse
/// back with [`FromStr`].
impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectId::Md5(_) => f.write_str(&self.to_hex()),
            ObjectId::Sha256(_) => write!(f, "sha256:{}", self.to_hex()),
        }
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectId::Md5(_) => write!(f, "md5:{}", self.to_hex()),
            ObjectId::Sha256(_) => write!(f, "sha256:{}", self.to_hex()),
        }
    }
}

impl FromStr for ObjectId {
    type Err = ParseIdError;

    /// Accepts `0123...ef` (32 hex digits) or `md5:0123...ef` for MD5, and `sha256:` followed
    /// by 64 hex digits for SHA-256, in either case. A bare 64-digit id is refused: the
    /// algorithm must be explicit.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("sha256:") {
            return Ok(ObjectId::Sha256(parse_hex(rest)?));
        }
        let rest = s.strip_prefix("md5:").unwrap_or(s);
        Ok(ObjectId::Md5(parse_hex(rest)?))
    }
}

fn parse_hex<const N: usize>(s: &str) -> Result<[u8; N], ParseIdError> {
    if s.len() != 2 * N {
        return Err(ParseIdError::BadFormat);
    }
    let mut out = [0u8; N];
    for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
        let hi = hex_value(pair[0]).ok_or(ParseIdError::BadFormat)?;
        let lo = hex_value(pair[1]).ok_or(ParseIdError::BadFormat)?;
        out[i] = (hi << 4) | lo;
    }
    Ok(out)
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
    fn sha256_ids_parse_only_with_their_prefix_and_round_trip() {
        let id = ObjectId::sha256_of(b"");
        assert_eq!(
            id.to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(id.to_string().parse::<ObjectId>().unwrap(), id);
        assert_eq!(
            id.to_hex().parse::<ObjectId>(),
            Err(ParseIdError::BadFormat),
            "a bare 64-digit id is ambiguous"
        );
        assert_eq!(
            "sha256:d41d8cd98f00b204e9800998ecf8427e".parse::<ObjectId>(),
            Err(ParseIdError::BadFormat)
        );
        let mut h = id.hasher();
        h.update(b"");
        assert_eq!(h.finish(), id);
        assert_eq!(ObjectId::from_parts(2, id.digest()), Some(id));
        assert_eq!(ObjectId::from_parts(1, id.digest()), None);
        assert_eq!(ObjectId::from_parts(3, &[0; 16]), None);
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
