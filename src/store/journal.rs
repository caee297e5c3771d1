//! The resume journal: which byte ranges of a partial download are on disk.
//!
//! Layout, all integers big-endian:
//!
//! ```text
//! magic  "UFJ1"                      4 bytes
//! id     algorithm byte + digest     1 + 16 bytes (algorithm 1 = MD5) or 1 + 32 (2 = SHA-256)
//! size   object size                 u64 (UNKNOWN_SIZE when the offer had not arrived yet)
//! count  number of ranges            u32
//! ranges (start u64, end u64) * count   ascending, non-empty, disjoint, non-adjacent, end <= size
//! crc    CRC32 of everything above   u32
//! ```
//!
//! [`PartialFile`](super::PartialFile) writes it with [`encode`]; [`Cache::begin`](super::Cache::begin)
//! reads it with [`decode`] and restarts the download from scratch on any error.

use std::convert::Infallible;

use crate::core::RangeSet;
use crate::id::ObjectId;
use crate::wire::cursor::{Reader, Writer};
use crate::wire::DecodeError;

/// The first four bytes of every journal.
pub const MAGIC: [u8; 4] = *b"UFJ1";

/// The size field's value while the object's size is not known yet.
pub const UNKNOWN_SIZE: u64 = u64::MAX;

/// Bytes before the ranges with a digest of `digest_len` bytes: magic, id, size, count.
const fn header_len(digest_len: usize) -> usize {
    4 + 1 + digest_len + 8 + 4
}
/// Bytes of one range.
const RANGE_LEN: usize = 16;
/// Bytes of the CRC trailer.
const CRC_LEN: usize = 4;

/// Why a journal was rejected. Any of these means: do not trust the partial file, restart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// The file does not start with `UFJ1`: it is not a journal (or from an unknown version).
    #[error("not a udpferry journal (bad magic): the partial download will restart")]
    BadMagic,
    /// The bytes end before the fields (or the ranges the count announces) do.
    #[error("journal is truncated ({len} bytes, at least {needed} needed): the partial download will restart")]
    Truncated {
        /// Bytes present.
        len: usize,
        /// Bytes the header and count require.
        needed: usize,
    },
    /// There are bytes after the CRC.
    #[error("journal has {0} trailing bytes: the partial download will restart")]
    TrailingBytes(usize),
    /// The CRC does not match: the journal was damaged.
    #[error("journal checksum mismatch: the partial download will restart")]
    BadChecksum,
    /// The id's algorithm byte is not one this version knows.
    #[error("journal names an unknown digest algorithm {0}: the partial download will restart")]
    UnknownAlgorithm(u8),
    /// A range is empty, out of order, overlapping or touching its neighbour, or past the size.
    #[error("journal range {index} is invalid: the partial download will restart")]
    BadRange {
        /// Position of the bad range.
        index: usize,
    },
}

/// Serialises a journal for object `id` of `size` bytes (or [`UNKNOWN_SIZE`]) holding `ranges`.
///
/// Call it when checkpointing a partial download; write the result to a temporary file and
/// rename it over the journal. Ranges past `size` are the caller's bug: [`decode`] rejects them.
pub fn encode(id: &ObjectId, size: u64, ranges: &RangeSet) -> Vec<u8> {
    fn fields(
        w: &mut Writer<'_, Vec<u8>>,
        id: &ObjectId,
        size: u64,
        ranges: &RangeSet,
    ) -> Result<(), Infallible> {
        w.bytes(&MAGIC)?;
        w.object_id(id)?;
        w.u64(size)?;
        w.u32(ranges.len() as u32)?;
        for r in ranges.iter() {
            w.u64(r.start)?;
            w.u64(r.end)?;
        }
        let crc = crc32fast::hash(w.written());
        w.u32(crc)
    }
    let mut out =
        Vec::with_capacity(header_len(id.digest().len()) + ranges.len() * RANGE_LEN + CRC_LEN);
    let Ok(()) = fields(&mut Writer::growing(&mut out), id, size, ranges);
    out
}

/// Parses a journal: the object id, its size (or [`UNKNOWN_SIZE`]) and the byte ranges on disk.
///
/// Never panics. On `Err`, the caller must treat the partial file as holding nothing (truncate
/// it and start over); on `Ok`, it still checks that the id and size are the ones it expects.
pub fn decode(bytes: &[u8]) -> Result<(ObjectId, u64, RangeSet), JournalError> {
    let truncated = |needed| JournalError::Truncated {
        len: bytes.len(),
        needed,
    };
    let shortest = header_len(16) + CRC_LEN;
    let mut r = Reader::new(bytes, "journal");
    match r.array::<4>() {
        Ok(MAGIC) => {}
        Err(_) if MAGIC.starts_with(bytes) => return Err(truncated(shortest)),
        _ => return Err(JournalError::BadMagic),
    }
    let algorithm = r.u8().map_err(|_| truncated(shortest))?;
    let digest_len =
        ObjectId::digest_len(algorithm).ok_or(JournalError::UnknownAlgorithm(algorithm))?;
    let min = header_len(digest_len) + CRC_LEN;
    if bytes.len() < min {
        return Err(truncated(min));
    }
    // From here on every read is within lengths checked beforehand; a failed one would still
    // be reported as truncation, never a panic.
    let short = |_: DecodeError| truncated(min);
    let digest = r.bytes(digest_len).map_err(short)?;
    let size = r.u64().map_err(short)?;
    let count = r.u32().map_err(short)?;
    // u32 * 16 fits in u64 (and in usize on 64-bit); saturate on smaller targets.
    let needed = (count as usize)
        .checked_mul(RANGE_LEN)
        .and_then(|n| n.checked_add(min))
        .unwrap_or(usize::MAX);
    if bytes.len() < needed {
        return Err(truncated(needed));
    }
    if bytes.len() > needed {
        return Err(JournalError::TrailingBytes(bytes.len() - needed));
    }
    let mut listed = Reader::new(r.bytes(needed - min).map_err(short)?, "journal");
    let body = r.consumed();
    if crc32fast::hash(body) != r.u32().map_err(short)? {
        return Err(JournalError::BadChecksum);
    }
    let id =
        ObjectId::from_parts(algorithm, digest).ok_or(JournalError::UnknownAlgorithm(algorithm))?;
    let mut ranges = RangeSet::new();
    let mut prev_end: Option<u64> = None;
    for index in 0..count as usize {
        let start = listed.u64().map_err(short)?;
        let end = listed.u64().map_err(short)?;
        let after_prev = prev_end.is_none_or(|p| start > p);
        if start >= end || end > size || !after_prev {
            return Err(JournalError::BadRange { index });
        }
        ranges.insert(start..end);
        prev_end = Some(end);
    }
    Ok((id, size, ranges))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::cursor::hex;
    use proptest::prelude::*;

    fn sample() -> (ObjectId, u64, RangeSet) {
        let mut r = RangeSet::new();
        r.insert(0..100);
        r.insert(200..300);
        (ObjectId::md5_of(b"journal"), 1000, r)
    }

    #[test]
    fn sha256_journals_round_trip_and_are_not_read_as_md5() {
        let (_, size, ranges) = sample();
        let id = ObjectId::sha256_of(b"journal");
        let good = encode(&id, size, &ranges);
        assert_eq!(good.len(), header_len(32) + 2 * RANGE_LEN + CRC_LEN);
        assert_eq!(decode(&good), Ok((id, size, ranges)));
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut as_md5 = good.clone();
        as_md5[4] = ObjectId::ALG_MD5;
        assert!(decode(&as_md5).is_err());
    }

    #[test]
    fn round_trips_and_rejects_each_kind_of_damage() {
        let (id, size, ranges) = sample();
        let good = encode(&id, size, &ranges);
        assert_eq!(good.len(), header_len(16) + 2 * RANGE_LEN + CRC_LEN);
        assert_eq!(decode(&good), Ok((id, size, ranges.clone())));

        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad), Err(JournalError::BadMagic));
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        assert!(matches!(
            decode(&good[..good.len() - 1]),
            Err(JournalError::Truncated { .. })
        ));
        let mut long = good.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(JournalError::TrailingBytes(1)));
        for i in 4..good.len() {
            let mut flipped = good.clone();
            flipped[i] ^= 0x10;
            assert!(decode(&flipped).is_err(), "flip at {i}");
        }
    }

    /// Builds a journal with a valid CRC around arbitrary (possibly invalid) ranges.
    fn raw(size: u64, count: u32, ranges: &[(u64, u64)]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.push(1);
        out.extend_from_slice(&[7; 16]);
        out.extend_from_slice(&size.to_be_bytes());
        out.extend_from_slice(&count.to_be_bytes());
        for (s, e) in ranges {
            out.extend_from_slice(&s.to_be_bytes());
            out.extend_from_slice(&e.to_be_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    #[test]
    fn rejects_invalid_ranges_even_with_a_good_crc() {
        assert!(decode(&raw(100, 2, &[(0, 10), (20, 30)])).is_ok());
        let bad_range = |r: &[(u64, u64)]| decode(&raw(100, r.len() as u32, r));
        assert!(matches!(
            bad_range(&[(5, 5)]),
            Err(JournalError::BadRange { index: 0 })
        ));
        assert!(matches!(
            bad_range(&[(9, 5)]),
            Err(JournalError::BadRange { .. })
        ));
        assert!(matches!(
            bad_range(&[(0, 101)]),
            Err(JournalError::BadRange { .. })
        ));
        assert!(matches!(
            bad_range(&[(20, 30), (0, 10)]),
            Err(JournalError::BadRange { index: 1 })
        ));
        assert!(matches!(
            bad_range(&[(0, 20), (10, 30)]),
            Err(JournalError::BadRange { .. })
        ));
        assert!(matches!(
            bad_range(&[(0, 10), (10, 30)]),
            Err(JournalError::BadRange { .. })
        ));
        // A count far larger than the bytes present is rejected before anything is allocated.
        assert!(matches!(
            decode(&raw(100, u32::MAX, &[(0, 10)])),
            Err(JournalError::Truncated { .. })
        ));
        let mut alg = raw(100, 0, &[]);
        alg[4] = 9;
        let n = alg.len();
        let crc = crc32fast::hash(&alg[..n - 4]);
        alg[n - 4..].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(decode(&alg), Err(JournalError::UnknownAlgorithm(9)));
    }

    /// Fixed journals and the exact bytes the codec wrote before it moved onto the wire cursor
    /// (docs/ARCHITECTURE.md 6.4): the format must never change.
    #[test]
    fn fixed_examples_encode_to_the_known_bytes() {
        let (id, size, ranges) = sample();
        let md5 = encode(&id, size, &ranges);
        assert_eq!(
            hex(&md5),
            concat!(
                "55464a31",
                "01fb9141b4efb6ddeaad336320b9adb552",
                "00000000000003e8",
                "00000002",
                "0000000000000000",
                "0000000000000064",
                "00000000000000c8",
                "000000000000012c",
                "759c28b1",
            )
        );
        assert_eq!(decode(&md5), Ok((id, size, ranges)));
        let sha = ObjectId::sha256_of(b"journal");
        let mut one = RangeSet::new();
        one.insert(5..6);
        let bytes = encode(&sha, UNKNOWN_SIZE, &one);
        assert_eq!(
            hex(&bytes),
            concat!(
                "55464a31",
                "0281dd6b775afcccb6dbb8a25a58ea844271bbefaeea7cb1d91c1687d7450f850c",
                "ffffffffffffffff",
                "00000001",
                "0000000000000005",
                "0000000000000006",
                "29983568",
            )
        );
        assert_eq!(decode(&bytes), Ok((sha, UNKNOWN_SIZE, one)));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
            let mut with_magic = MAGIC.to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = decode(&with_magic);
        }

        #[test]
        fn decode_checks_ranges_behind_a_valid_crc(
            size in prop_oneof![0u64..2000, any::<u64>()],
            pairs in proptest::collection::vec((0u64..2500, 0u64..2500), 0..8),
            extra in 0u32..3,
        ) {
            let bytes = raw(size, pairs.len() as u32 + extra % 2, &pairs);
            if let Ok((_, got_size, ranges)) = decode(&bytes) {
                prop_assert_eq!(got_size, size);
                prop_assert_eq!(ranges.len(), pairs.len());
                prop_assert!(ranges.iter().all(|r| r.start < r.end && r.end <= size));
            }
        }

        #[test]
        fn encode_decode_round_trip(
            digest in any::<[u8; 16]>(),
            size in any::<u64>(),
            raw in proptest::collection::vec((any::<u64>(), 0u64..1 << 20), 0..40),
        ) {
            let id = ObjectId::Md5(digest);
            let mut ranges = RangeSet::new();
            for (start, len) in raw {
                let start = start % size.max(1);
                ranges.insert(start..start.saturating_add(len).min(size));
            }
            let bytes = encode(&id, size, &ranges);
            prop_assert_eq!(decode(&bytes), Ok((id, size, ranges)));
        }
    }
}
