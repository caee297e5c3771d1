//! Block signatures of an object, for delta downloads (zsync-style: the client does the
//! matching).
//!
//! A server computes one [`Manifest`] per object (once; [`ContentStore`](super::ContentStore)
//! caches it) and serves its bytes as an object of their own, named by
//! [`manifest_id`]. A client that holds older versions of the object fetches the manifest,
//! checks it ([`Manifest::decode`]), finds which blocks of the new version it already has
//! anywhere in its local files ([`Manifest::find_blocks`], a rolling checksum over every byte
//! offset), copies them into its partial download, and fetches only the rest. The object's own
//! digest still checks the result, so a wrong manifest can cost bandwidth but never correctness.
//!
//! Layout, integers big-endian:
//!
//! ```text
//! magic       "UFM1"                                4 bytes
//! object id   algorithm byte + digest               1 + 16 (MD5) or 1 + 32 (SHA-256)
//! size        object size                           u64
//! block_size  bytes per block (the last is shorter) u32, 512 ..= 1 MiB
//! count       number of blocks = ceil(size / block_size)   u32
//! blocks      count x (weak u32, strong 8 bytes)
//! digest      MD5 of everything above               16 bytes
//! ```
//!
//! `weak` is the rolling checksum below over the block's bytes; `strong` the first 8 bytes of
//! the block's MD5. The trailing digest is the manifest's own: a manifest whose digest does not
//! match is not used.

use std::convert::Infallible;
use std::io::{self, Read};
use std::ops::Range;

use crate::md5::Md5;

use crate::id::ObjectId;
use crate::wire::cursor::{Reader, Writer};
use crate::wire::DecodeError;

/// The first four bytes of every manifest.
pub const MAGIC: [u8; 4] = *b"UFM1";
/// Smallest and largest block size a manifest may use.
pub const MIN_BLOCK: u32 = 512;
/// See [`MIN_BLOCK`].
pub const MAX_BLOCK: u32 = 1 << 20;
/// Bytes per block entry.
const ENTRY_LEN: usize = 12;

/// Why manifest bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// Not a manifest (bad magic), or cut short, or with bytes after its digest.
    #[error("not a udpferry manifest, or truncated: fetch the whole object instead")]
    Malformed,
    /// Its own digest does not match its bytes: damaged or forged.
    #[error("manifest digest mismatch: fetch the whole object instead")]
    BadDigest,
    /// It describes another object than the one asked for.
    #[error("manifest describes {actual}, not {expected}")]
    WrongObject {
        /// The object asked for.
        expected: ObjectId,
        /// The object the manifest names.
        actual: ObjectId,
    },
    /// The block size or count is impossible for the size.
    #[error("manifest block layout is invalid: fetch the whole object instead")]
    BadLayout,
}

/// The block signatures of one object. Build it with [`Manifest::build`] (server), read it
/// with [`Manifest::decode`] (client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The object described.
    pub object: ObjectId,
    /// Its size in bytes.
    pub size: u64,
    /// Bytes per block; the last block holds what remains.
    pub block_size: u32,
    /// Per block: (weak rolling checksum, first 8 bytes of the block's MD5).
    pub blocks: Vec<(u32, [u8; 8])>,
}

/// The id under which a server serves the manifest of `object`: a digest of a fixed label and
/// `object`'s id, of the same algorithm. Both sides derive it; it is not the digest of the
/// manifest's bytes (those are checked by the manifest's own trailing digest).
pub fn manifest_id(object: &ObjectId) -> ObjectId {
    let mut h = object.hasher();
    h.update(b"udpferry manifest v1\0");
    h.update(&[object.algorithm()]);
    h.update(object.digest());
    h.finish()
}

/// The block size for an object of `size` bytes: about its square root, rounded to a power of
/// two within 512 B ..= 1 MiB (docs/PROTOCOL.md section 8 explains the trade-off).
pub fn block_size_for(size: u64) -> u32 {
    let root = (size as f64).sqrt() as u64;
    let pow2 = root.max(1).next_power_of_two();
    pow2.clamp(u64::from(MIN_BLOCK), u64::from(MAX_BLOCK)) as u32
}

/// The weak rolling checksum of rsync (two 16-bit sums) over a window, updated in O(1) per
/// byte as the window slides.
#[derive(Debug, Clone, Copy)]
struct Rolling {
    a: u32,
    b: u32,
    len: u32,
}

impl Rolling {
    fn new(window: &[u8]) -> Self {
        let (mut a, mut b) = (0u32, 0u32);
        let len = window.len() as u32;
        for (i, &x) in window.iter().enumerate() {
            a = a.wrapping_add(u32::from(x));
            b = b.wrapping_add((len - i as u32).wrapping_mul(u32::from(x)));
        }
        Rolling { a, b, len }
    }

    fn value(&self) -> u32 {
        (self.a & 0xffff) | (self.b << 16)
    }

    /// Slides the window one byte: `out` leaves at the front, `inn` enters at the back.
    fn roll(&mut self, out: u8, inn: u8) {
        self.a = self
            .a
            .wrapping_sub(u32::from(out))
            .wrapping_add(u32::from(inn));
        self.b = self
            .b
            .wrapping_sub(self.len.wrapping_mul(u32::from(out)))
            .wrapping_add(self.a);
    }
}

fn strong(block: &[u8]) -> [u8; 8] {
    let d: [u8; 16] = Md5::digest(block);
    let mut s = [0u8; 8];
    s.copy_from_slice(&d[..8]);
    s
}

impl Manifest {
    /// Computes the manifest of `object`, reading its `size` bytes from `reader` in order.
    /// Call it once per object and cache the result (see [`encode`](Self::encode)).
    pub fn build(object: ObjectId, size: u64, mut reader: impl Read) -> io::Result<Self> {
        let block_size = block_size_for(size);
        let mut blocks = Vec::with_capacity(size.div_ceil(u64::from(block_size)) as usize);
        let mut buf = vec![0u8; block_size as usize];
        let mut left = size;
        while left > 0 {
            let n = left.min(u64::from(block_size)) as usize;
            reader.read_exact(&mut buf[..n])?;
            blocks.push((Rolling::new(&buf[..n]).value(), strong(&buf[..n])));
            left -= n as u64;
        }
        Ok(Manifest {
            object,
            size,
            block_size,
            blocks,
        })
    }

    /// The manifest's bytes, its own digest last.
    pub fn encode(&self) -> Vec<u8> {
        fn fields(w: &mut Writer<'_, Vec<u8>>, m: &Manifest) -> Result<(), Infallible> {
            w.bytes(&MAGIC)?;
            w.object_id(&m.object)?;
            w.u64(m.size)?;
            w.u32(m.block_size)?;
            w.u32(m.blocks.len() as u32)?;
            for (weak, strong) in &m.blocks {
                w.u32(*weak)?;
                w.bytes(strong)?;
            }
            let own: [u8; 16] = Md5::digest(w.written());
            w.bytes(&own)
        }
        let digest = self.object.digest();
        let mut out =
            Vec::with_capacity(4 + 1 + digest.len() + 16 + self.blocks.len() * ENTRY_LEN + 16);
        let Ok(()) = fields(&mut Writer::growing(&mut out), self);
        out
    }

    /// Parses and checks manifest bytes received for `expected`: the magic, the trailing
    /// digest, that it names `expected`, and that its block layout fits its size. Never
    /// panics. On any error, fall back to fetching the whole object.
    pub fn decode(bytes: &[u8], expected: &ObjectId) -> Result<Self, ManifestError> {
        let malformed = |_: DecodeError| ManifestError::Malformed;
        if bytes.len() < 4 + 1 + 16 || !bytes.starts_with(&MAGIC) {
            return Err(ManifestError::Malformed);
        }
        let (body, own) = bytes.split_at(bytes.len() - 16);
        let digest: [u8; 16] = Md5::digest(body);
        if digest[..] != *own {
            return Err(ManifestError::BadDigest);
        }
        let mut r = Reader::new(body, "manifest");
        r.bytes(MAGIC.len()).map_err(malformed)?;
        let object = r.object_id().map_err(malformed)?;
        let size = r.u64().map_err(malformed)?;
        let block_size = r.u32().map_err(malformed)?;
        let count = r.u32().map_err(malformed)? as usize;
        if object != *expected {
            return Err(ManifestError::WrongObject {
                expected: *expected,
                actual: object,
            });
        }
        if !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size)
            || size.div_ceil(u64::from(block_size)) != count as u64
        {
            return Err(ManifestError::BadLayout);
        }
        if r.remaining()
            != count
                .checked_mul(ENTRY_LEN)
                .ok_or(ManifestError::BadLayout)?
        {
            return Err(ManifestError::Malformed);
        }
        let mut blocks = Vec::with_capacity(count);
        for _ in 0..count {
            blocks.push((
                r.u32().map_err(malformed)?,
                r.array::<8>().map_err(malformed)?,
            ));
        }
        r.finish().map_err(malformed)?;
        Ok(Manifest {
            object,
            size,
            block_size,
            blocks,
        })
    }

    /// Whether `bytes` are block `i` of the object (its strong hash matches); `false` for an
    /// index past the end.
    pub fn block_matches(&self, i: usize, bytes: &[u8]) -> bool {
        self.blocks.get(i).is_some_and(|(_, s)| strong(bytes) == *s)
    }

    /// The byte range block `i` covers in the object.
    pub fn block_range(&self, i: usize) -> Range<u64> {
        let start = i as u64 * u64::from(self.block_size);
        start..(start + u64::from(self.block_size)).min(self.size)
    }

    /// Finds, in `local` (the bytes of a file the client already has, such as an older version
    /// of the object), every full-size block of this object: for each block index found, the
    /// offset in `local` where its bytes are. Slides a rolling checksum over every offset and
    /// confirms weak matches with the strong hash; after a match it jumps a block ahead (as
    /// zsync does). The last block, if shorter, is not searched (it is fetched). Blocks already
    /// in `found` are skipped, so several local files can be searched in turn.
    pub fn find_blocks(
        &self,
        local: &[u8],
        found: &mut std::collections::BTreeMap<usize, Src>,
        file: usize,
    ) {
        // Reading a slice cannot fail.
        let _ = self.find_blocks_in(local, found, file);
    }

    /// [`find_blocks`](Self::find_blocks) over a reader (an open base file): it holds about
    /// 1 MiB plus two blocks in memory, whatever the file's size. Errors are the reader's.
    pub fn find_blocks_in(
        &self,
        mut reader: impl Read,
        found: &mut std::collections::BTreeMap<usize, Src>,
        file: usize,
    ) -> io::Result<()> {
        /// Bytes scanned before the buffer drops what lies behind the window.
        const WINDOW: usize = 1 << 20;
        let bs = self.block_size as usize;
        let mut by_weak: std::collections::HashMap<u32, Vec<usize>> =
            std::collections::HashMap::new();
        for (i, (weak, _)) in self.blocks.iter().enumerate() {
            if self.block_range(i).end - self.block_range(i).start == bs as u64
                && !found.contains_key(&i)
            {
                by_weak.entry(*weak).or_default().push(i);
            }
        }
        if by_weak.is_empty() {
            return Ok(());
        }
        // `buf` holds the file's bytes from offset `base` on; `at` is relative to `base`.
        let mut buf: Vec<u8> = Vec::with_capacity(WINDOW + 2 * bs);
        let mut base = 0u64;
        let mut eof = false;
        let mut fill = |buf: &mut Vec<u8>, need: usize| -> io::Result<()> {
            while buf.len() < need && !eof {
                let old = buf.len();
                buf.resize(need.max(old + (64 << 10)), 0);
                let n = loop {
                    match reader.read(&mut buf[old..]) {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        other => break other,
                    }
                };
                let n = n.inspect_err(|_| buf.truncate(old))?;
                buf.truncate(old + n);
                eof = n == 0;
            }
            Ok(())
        };
        fill(&mut buf, bs)?;
        if buf.len() < bs {
            return Ok(());
        }
        let mut at = 0usize;
        let mut roll = Rolling::new(&buf[..bs]);
        loop {
            let mut matched = false;
            if let Some(candidates) = by_weak.get(&roll.value()) {
                let s = strong(&buf[at..at + bs]);
                for &i in candidates {
                    if self.blocks[i].1 == s && !found.contains_key(&i) {
                        found.insert(
                            i,
                            Src {
                                file,
                                offset: base + at as u64,
                            },
                        );
                        matched = true;
                    }
                }
            }
            let next = if matched { at + bs } else { at + 1 };
            fill(&mut buf, next + bs)?;
            if next + bs > buf.len() {
                return Ok(());
            }
            if matched {
                roll = Rolling::new(&buf[next..next + bs]);
            } else {
                roll.roll(buf[at], buf[at + bs]);
            }
            at = next;
            if at >= WINDOW {
                buf.drain(..at);
                base += at as u64;
                at = 0;
            }
        }
    }
}

/// Where a block was found locally: which of the searched files, at which offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Src {
    /// Index of the local file (in the order they were searched).
    pub file: usize,
    /// Offset of the block's bytes in that file.
    pub offset: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::cursor::hex;
    use std::collections::BTreeMap;

    fn data(n: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    #[test]
    fn rolling_matches_a_fresh_sum_at_every_offset() {
        let d = data(5000, 1);
        let w = 700;
        let mut r = Rolling::new(&d[..w]);
        for at in 0..d.len() - w {
            assert_eq!(
                r.value(),
                Rolling::new(&d[at..at + w]).value(),
                "offset {at}"
            );
            r.roll(d[at], d[at + w]);
        }
    }

    #[test]
    fn round_trips_and_refuses_damage_and_other_objects() {
        let d = data(100_000, 2);
        let id = ObjectId::md5_of(&d);
        let m = Manifest::build(id, d.len() as u64, &d[..]).unwrap();
        let bytes = m.encode();
        assert_eq!(Manifest::decode(&bytes, &id), Ok(m));
        let mut bad = bytes.clone();
        bad[40] ^= 1;
        assert_eq!(Manifest::decode(&bad, &id), Err(ManifestError::BadDigest));
        assert!(matches!(
            Manifest::decode(&bytes, &ObjectId::md5_of(b"other")),
            Err(ManifestError::WrongObject { .. })
        ));
        for cut in 0..bytes.len() {
            assert!(Manifest::decode(&bytes[..cut], &id).is_err(), "cut {cut}");
        }
    }

    /// A reader that hands out at most 777 bytes per read, so every refill path is taken.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(777).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_stream_larger_than_the_window_finds_every_block_at_its_offset() {
        // 3 MiB behind a 1-byte prefix: every block sits one byte off, across several 1 MiB
        // windows, and must be found where it is.
        let d = data(3 << 20, 5);
        let id = ObjectId::md5_of(&d);
        let m = Manifest::build(id, d.len() as u64, &d[..]).unwrap();
        let mut local = vec![0x5a];
        local.extend_from_slice(&d);
        let mut found = BTreeMap::new();
        m.find_blocks_in(Trickle(&local), &mut found, 7).unwrap();
        assert_eq!(found.len(), m.blocks.len(), "every block is full-size here");
        for (&i, src) in &found {
            assert_eq!(src.file, 7);
            assert_eq!(src.offset, m.block_range(i).start + 1, "block {i}");
        }
    }

    #[test]
    fn finds_shifted_blocks_after_an_insertion() {
        let v1 = data(200_000, 3);
        let mut v2 = v1.clone();
        v2.splice(1000..1000, data(100, 4));
        let id = ObjectId::md5_of(&v2);
        let m = Manifest::build(id, v2.len() as u64, &v2[..]).unwrap();
        let mut found = BTreeMap::new();
        m.find_blocks(&v1, &mut found, 0);
        let full_blocks = (v2.len() / m.block_size as usize) as u64;
        // Only the blocks the insertion touches (at most two) are missing, and the short last
        // block, which is not searched.
        assert!(
            found.len() as u64 >= full_blocks - 2,
            "{} of {full_blocks}",
            found.len()
        );
        for (&i, src) in &found {
            let r = m.block_range(i);
            let local = &v1[src.offset as usize..src.offset as usize + (r.end - r.start) as usize];
            assert_eq!(local, &v2[r.start as usize..r.end as usize], "block {i}");
        }
    }

    /// Fixed manifests and the exact bytes the codec wrote before it moved onto the wire cursor
    /// (docs/PROTOCOL.md section 8): the format must never change.
    #[test]
    fn fixed_examples_encode_to_the_known_bytes() {
        let id = ObjectId::md5_of(b"manifest");
        let m = Manifest {
            object: id,
            size: 1300,
            block_size: 512,
            blocks: vec![
                (0x0102_0304, *b"strong01"),
                (0xfffe_fdfc, [0; 8]),
                (7, *b"\x80abcdefg"),
            ],
        };
        let bytes = m.encode();
        assert_eq!(
            hex(&bytes),
            concat!(
                "55464d31",
                "017f5cb74af5d7f4b82200738fdbdc5a45",
                "0000000000000514",
                "00000200",
                "00000003",
                "01020304",
                "7374726f6e673031",
                "fffefdfc",
                "0000000000000000",
                "00000007",
                "8061626364656667",
                "2079243283fb83ff806bc80ca5a6b08c",
            )
        );
        assert_eq!(Manifest::decode(&bytes, &id), Ok(m));
        // A built one, SHA-256 named: this also pins the weak and strong block sums.
        let d = data(3000, 9);
        let id = ObjectId::sha256_of(&d);
        let m = Manifest::build(id, 3000, &d[..]).unwrap();
        let bytes = m.encode();
        assert_eq!(
            hex(&bytes),
            concat!(
                "55464d31",
                "02b324b324a44dbd1b8c6b244e393a53e58f202d9759ed41c45ef48db76d87d7de",
                "0000000000000bb8",
                "00000200",
                "00000006",
                "2aa405be3d57e5f593d93c69",
                "952b08c5d2825c8256b9fec0",
                "622904d75b8d990f1f3fca02",
                "f5c0fa5fc0ace9ce786f8d99",
                "c204f1921dbdded7f48de642",
                "61eccdf7e0e7ab54fec08566",
                "1e3676efbe50b61e419d1b261a4cf6bb",
            )
        );
        assert_eq!(Manifest::decode(&bytes, &id), Ok(m));
    }

    #[test]
    fn block_size_grows_with_the_square_root() {
        assert_eq!(block_size_for(0), MIN_BLOCK);
        assert_eq!(block_size_for(1 << 20), 1024);
        assert_eq!(block_size_for(16 << 20), 4096);
        assert_eq!(block_size_for(1 << 40), MAX_BLOCK);
    }
}
