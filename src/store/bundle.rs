//! Bundles: a listing of named files, each with its size and id, served as an object of its
//! own and named by the MD5 of the listing's bytes.
//!
//! A server ([`ContentStore`](super::ContentStore)) builds one bundle per top-level
//! subdirectory of the directory it serves ([`Bundle::build`], then [`Bundle::encode`]) and
//! serves the encoded bytes under [`Bundle::id`] of them. A client that was given a bundle id
//! fetches those bytes like any object (the transfer's digest check proves they are the
//! listing that id names), parses them with [`Bundle::decode`], which refuses every name that
//! is not a [`SafePath`] and every listing that could not be installed file by file without
//! one file landing on another, and then fetches each file by its own id
//! (`net::Client::fetch_bundle`).
//!
//! # Layout
//!
//! Integers big-endian. The listing is canonical: there is exactly one encoding of a given
//! set of files, so [`Bundle::decode`] followed by [`Bundle::encode`] gives back the same bytes
//! (and the same id).
//!
//! ```text
//! magic       "UFB1"                                    4 bytes
//! count       number of files, at most MAX_FILES        u32
//! files       count x:
//!   path_len  length of the path in bytes, 1 ..= 1024   u16
//!   path      UTF-8, a SafePath, relative to the bundle path_len bytes
//!   size      the file's size in bytes                  u64
//!   id        algorithm byte + digest                   1 + 16 (MD5) or 1 + 32 (SHA-256)
//! ```
//!
//! Rules, each checked by [`Bundle::decode`] (and [`Bundle::build`]):
//!
//! - every path is a [`SafePath`] (relative, no `..`, no drive letter, no Windows device name,
//!   ...: the rules are on that type);
//! - paths are in strictly ascending byte order, so no path is listed twice;
//! - no two paths are equal once lower-cased, and no path, lower-cased, is a directory of
//!   another (`a` and `a/b`; `Maps/x` and `maps`): on a case-insensitive file system either
//!   would make one installed file replace or block another;
//! - at most [`MAX_FILES`] files, sizes adding up to at most [`MAX_TOTAL_BYTES`];
//! - nothing after the last file.
//!
//! There is no trailing checksum of its own: a bundle is only ever fetched by its id, which is
//! the MD5 of every byte above, and the ordinary transfer checks it.

use std::convert::Infallible;

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::Path;

use super::{Cache, NameError, SafePath, StoreError};
use crate::id::ObjectId;
use crate::wire::cursor::{Reader, Writer};
use crate::wire::DecodeError;

/// The first four bytes of every bundle listing.
pub const MAGIC: [u8; 4] = *b"UFB1";
/// Most files one bundle may list.
pub const MAX_FILES: usize = 100_000;
/// Most bytes the files of one bundle may add up to (1 TiB).
pub const MAX_TOTAL_BYTES: u64 = 1 << 40;
/// Longest encoded listing: [`MAX_FILES`] entries of the longest path and a SHA-256 id. A
/// client fetching a listing refuses an offer larger than this.
pub const MAX_LISTING_BYTES: u64 = (8 + MAX_FILES * (2 + SafePath::MAX_LEN + 8 + 1 + 32)) as u64;

/// One file of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BundleEntry {
    /// Where it goes, relative to the directory the bundle is installed in.
    pub path: SafePath,
    /// Its size in bytes.
    pub size: u64,
    /// The digest of its bytes: fetch the file by this id.
    pub id: ObjectId,
}

/// Why a bundle listing was refused (by [`Bundle::decode`]) or could not be built (by
/// [`Bundle::build`]). Refuse the whole bundle: install none of its files.
///
/// The messages name a path only once it passed [`SafePath::parse`] (so it holds no control
/// character); a refused name is identified by its position in the listing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// Not a bundle listing (bad magic), cut short, a path not UTF-8, an unknown id algorithm,
    /// or bytes after the last file.
    #[error("not a udpferry bundle listing, or truncated")]
    Malformed,
    /// Lists more than [`MAX_FILES`] files.
    #[error("the bundle lists {count} files, more than the limit of {MAX_FILES}")]
    TooManyFiles {
        /// The count it gives.
        count: u64,
    },
    /// Its files add up to more than [`MAX_TOTAL_BYTES`].
    #[error("the bundle's files add up to more than {MAX_TOTAL_BYTES} bytes")]
    TooLarge,
    /// A file's path is not a [`SafePath`].
    #[error("file {index} of the bundle has an unsafe name: {source}")]
    BadName {
        /// Its position in the listing, from 0.
        index: usize,
        /// The rule it broke.
        #[source]
        source: NameError,
    },
    /// A path is listed twice, or the listing is not sorted.
    #[error("the bundle lists `{path}` twice or out of order")]
    Duplicate {
        /// The path.
        path: SafePath,
    },
    /// Two paths would be one file, or a file and a directory, on a case-insensitive file
    /// system (or on any: `a` and `a/b`).
    #[error("the bundle lists both `{path}` and `{other}`, which cannot both be installed")]
    Conflict {
        /// The later of the two paths.
        path: SafePath,
        /// The earlier one it collides with.
        other: SafePath,
    },
}

/// A checked list of files: build it with [`Bundle::build`] (server) or read it with
/// [`Bundle::decode`] (client); either way the rules in the [module docs](self) hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// Sorted by path.
    entries: Vec<BundleEntry>,
    /// Sum of the sizes.
    total: u64,
}

impl Bundle {
    /// Makes a bundle of `entries` (in any order; they are sorted by path). Fails on a
    /// duplicate path, a case or directory conflict, too many files or too many bytes. Then
    /// call [`encode`](Self::encode) and serve the bytes under [`Bundle::id`] of them.
    pub fn build(mut entries: Vec<BundleEntry>) -> Result<Self, BundleError> {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Self::checked(entries)
    }

    /// Checks the rules on entries already in listing order.
    fn checked(entries: Vec<BundleEntry>) -> Result<Self, BundleError> {
        if entries.len() > MAX_FILES {
            return Err(BundleError::TooManyFiles {
                count: entries.len() as u64,
            });
        }
        let mut total = 0u64;
        for (i, e) in entries.iter().enumerate() {
            total = total
                .checked_add(e.size)
                .filter(|&t| t <= MAX_TOTAL_BYTES)
                .ok_or(BundleError::TooLarge)?;
            if i > 0 && entries[i - 1].path >= e.path {
                return Err(BundleError::Duplicate {
                    path: e.path.clone(),
                });
            }
        }
        // Case and directory conflicts: lower-case every path and write `/` as NUL (which no
        // SafePath holds), then sort. Everything inside a directory `d` then sorts right after
        // a file `d`, so comparing neighbours finds every conflict in O(n log n).
        let mut keys: Vec<(String, usize)> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.path.as_str().to_lowercase().replace('/', "\0"), i))
            .collect();
        keys.sort_unstable();
        for pair in keys.windows(2) {
            let [(a, i), (b, j)] = pair else { continue };
            let inside =
                b.len() > a.len() && b.starts_with(a.as_str()) && b[a.len()..].starts_with('\0');
            if a == b || inside {
                return Err(conflict(&entries, *i, *j));
            }
        }
        Ok(Bundle { entries, total })
    }

    /// The files, sorted by path.
    pub fn entries(&self) -> &[BundleEntry] {
        &self.entries
    }

    /// How many files it lists.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg_attr(not(feature = "internals"), allow(dead_code))] // used by tests and benches
    /// True when it lists no file.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The sizes of all its files added up.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// The listing's bytes (layout in the [module docs](self)). Serve them under
    /// [`Bundle::id`] of these bytes.
    pub fn encode(&self) -> Vec<u8> {
        fn fields(w: &mut Writer<'_, Vec<u8>>, entries: &[BundleEntry]) -> Result<(), Infallible> {
            w.bytes(&MAGIC)?;
            w.u32(entries.len() as u32)?;
            for e in entries {
                let path = e.path.as_str().as_bytes();
                // A SafePath is at most 1024 bytes long, so its length fits.
                w.u16(path.len() as u16)?;
                w.bytes(path)?;
                w.u64(e.size)?;
                w.object_id(&e.id)?;
            }
            Ok(())
        }
        let mut out = Vec::with_capacity(
            8 + self
                .entries
                .iter()
                .map(|e| 2 + e.path.as_str().len() + 8 + 1 + e.id.digest().len())
                .sum::<usize>(),
        );
        let Ok(()) = fields(&mut Writer::growing(&mut out), &self.entries);
        out
    }

    /// The id a bundle listing is served under: the MD5 of its encoded bytes.
    pub fn id(encoded: &[u8]) -> ObjectId {
        ObjectId::md5_of(encoded)
    }

    /// Parses and checks listing bytes received from a server: the layout and every rule in
    /// the [module docs](self). Never panics, and allocates in proportion to `bytes.len()`
    /// only. On any error install nothing: the whole listing is refused.
    pub fn decode(bytes: &[u8]) -> Result<Self, BundleError> {
        let malformed = |_: DecodeError| BundleError::Malformed;
        let mut r = Reader::new(bytes, "bundle listing");
        if r.array::<4>().map_err(malformed)? != MAGIC {
            return Err(BundleError::Malformed);
        }
        let count = u64::from(r.u32().map_err(malformed)?);
        if count > MAX_FILES as u64 {
            return Err(BundleError::TooManyFiles { count });
        }
        // Every entry takes at least 2 + 8 + 1 + 16 bytes: a count the bytes cannot hold is
        // refused before anything is allocated for it.
        if count.saturating_mul(27) > r.remaining() as u64 {
            return Err(BundleError::Malformed);
        }
        let mut entries = Vec::with_capacity(count as usize);
        for index in 0..count as usize {
            let len = usize::from(r.u16().map_err(malformed)?);
            let text = r.utf8(len, "path").map_err(malformed)?;
            let path =
                SafePath::parse(text).map_err(|source| BundleError::BadName { index, source })?;
            let size = r.u64().map_err(malformed)?;
            let id = r.object_id().map_err(malformed)?;
            entries.push(BundleEntry { path, size, id });
        }
        r.finish().map_err(malformed)?;
        Self::checked(entries)
    }
}

fn conflict(entries: &[BundleEntry], i: usize, j: usize) -> BundleError {
    let (later, earlier) = if i >= j { (i, j) } else { (j, i) };
    BundleError::Conflict {
        path: entries[later].path.clone(),
        other: entries[earlier].path.clone(),
    }
}

/// Whether the file at `path` is a bundle listing: it starts with `MAGIC`, is no longer than
/// `MAX_LISTING_BYTES` and decodes. `udpferry get SERVER ID -o DIR` asks it of a fetched
/// object to decide whether `-o` names a file to write or a directory to install into.
///
/// Only a file of a listing's size that starts with `MAGIC` is read whole: a map of hundreds of
/// MB costs one `stat` and a 4-byte read.
pub fn is_bundle_listing(path: &Path) -> bool {
    let Ok(mut file) = File::open(path) else {
        return false;
    };
    let mut magic = [0u8; 4];
    if !file
        .metadata()
        .is_ok_and(|m| m.len() <= MAX_LISTING_BYTES)
        || file.read_exact(&mut magic).is_err()
        || magic != MAGIC
    {
        return false;
    }
    let mut bytes = MAGIC.to_vec();
    if file
        .take(MAX_LISTING_BYTES + 1 - MAGIC.len() as u64)
        .read_to_end(&mut bytes)
        .is_err()
        || bytes.len() as u64 > MAX_LISTING_BYTES
    {
        return false;
    }
    Bundle::decode(&bytes).is_ok()
}

// Installing a bundle's files: storage work for `Client::fetch_bundle`.

/// Reads the listing `id` from the cache and checks it still hashes to `id` (it sat on disk).
pub(crate) fn read_listing(cache: &Cache, id: &ObjectId) -> Result<Vec<u8>, StoreError> {
    let path = cache.path_of(id);
    let file = File::open(&path).map_err(|e| StoreError::io("open", &path, e))?;
    let mut bytes = Vec::new();
    // One byte more than the limit, so that an oversized entry shows.
    file.take(MAX_LISTING_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| StoreError::io("read", &path, e))?;
    let mut hasher = id.hasher();
    hasher.update(&bytes);
    let actual = hasher.finish();
    if actual != *id {
        return Err(StoreError::Corrupt {
            path,
            expected: *id,
            actual,
        });
    }
    Ok(bytes)
}

/// Checks the directories between `dir` and the file `path` names: each must be a real
/// directory (not a symbolic link, not a file). With `create`, missing ones are created;
/// without, `Ok(false)` says one is missing. Nothing outside `dir` is touched.
fn parents(dir: &Path, path: &SafePath, create: bool) -> Result<bool, StoreError> {
    let components: Vec<&str> = path.components().collect();
    let mut at = dir.to_path_buf();
    for c in &components[..components.len().saturating_sub(1)] {
        at.push(c);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(StoreError::io(
                    "install into",
                    &at,
                    io::Error::other("a bundle file needs this to be a directory, and it is not"),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !create {
                    return Ok(false);
                }
                match fs::create_dir(&at) {
                    Ok(()) => {}
                    // Created meanwhile: check it on the next pass through the loop's rules.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        if !fs::symlink_metadata(&at).is_ok_and(|m| m.is_dir()) {
                            return Err(StoreError::io("create directory", &at, e));
                        }
                    }
                    Err(e) => return Err(StoreError::io("create directory", &at, e)),
                }
            }
            Err(e) => return Err(StoreError::io("inspect", &at, e)),
        }
    }
    Ok(true)
}

/// True when `dir/<path>` is a regular file (not a link) of `size` bytes hashing to `id`.
pub(crate) fn installed(dir: &Path, path: &SafePath, size: u64, id: &ObjectId) -> Result<bool, StoreError> {
    if !parents(dir, path, false)? {
        return Ok(false);
    }
    let target = path.join_to(dir);
    match fs::symlink_metadata(&target) {
        Ok(m) if m.is_file() && m.len() == size => {}
        _ => return Ok(false),
    }
    let Ok(file) = File::open(&target) else {
        return Ok(false);
    };
    Ok(crate::store::id_of_file(&file, size, id).is_ok_and(|actual| actual == *id))
}

/// Installs the cached object `id` at `dir/<path>`: parents created inside `dir`, then
/// [`Cache::copy_out_within`] (temporary file next to it, digest check, rename; a regular file
/// is the only node replaced, and a link is followed only inside `dir`).
pub(crate) fn install_from_cache(
    cache: &Cache,
    dir: &Path,
    path: &SafePath,
    id: &ObjectId,
) -> Result<(), StoreError> {
    parents(dir, path, true)?;
    cache.copy_out_within(id, &path.join_to(dir), Some(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::cursor::hex;

    fn entry(path: &str, data: &[u8]) -> BundleEntry {
        BundleEntry {
            path: SafePath::parse(path).unwrap(),
            size: data.len() as u64,
            id: ObjectId::md5_of(data),
        }
    }

    /// Encodes entries in the given order without any check, as a hostile server could.
    fn raw(entries: &[(&str, u64, ObjectId)]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
        for (path, size, id) in entries {
            out.extend_from_slice(&(path.len() as u16).to_be_bytes());
            out.extend_from_slice(path.as_bytes());
            out.extend_from_slice(&size.to_be_bytes());
            out.push(id.algorithm());
            out.extend_from_slice(id.digest());
        }
        out
    }

    #[test]
    fn round_trips_sorted_and_canonical() {
        let b = Bundle::build(vec![
            entry("textures/wall.png", b"wall"),
            entry("level.bsp", b"level"),
            entry("empty", b""),
            BundleEntry {
                path: SafePath::parse("big.pak").unwrap(),
                size: 3,
                id: ObjectId::sha256_of(b"abc"),
            },
        ])
        .unwrap();
        let paths: Vec<&str> = b.entries().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["big.pak", "empty", "level.bsp", "textures/wall.png"]
        );
        assert_eq!(b.total_bytes(), 3 + 5 + 4);
        let bytes = b.encode();
        let back = Bundle::decode(&bytes).unwrap();
        assert_eq!(back, b);
        assert_eq!(back.encode(), bytes);
        assert_eq!(Bundle::id(&bytes), ObjectId::md5_of(&bytes));
        for cut in 0..bytes.len() {
            assert!(Bundle::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Bundle::decode(&longer), Err(BundleError::Malformed));
        let empty = Bundle::build(Vec::new()).unwrap();
        assert_eq!(Bundle::decode(&empty.encode()), Ok(empty));
    }

    /// A fixed listing and the exact bytes the codec wrote before it moved onto the wire cursor
    /// (docs/PROTOCOL.md section 9): the format, and so every bundle's id, must never change.
    #[test]
    fn a_fixed_example_encodes_to_the_known_bytes() {
        let b = Bundle::build(vec![
            entry("maps/de_dust.bsp", b"dust"),
            entry("empty", b""),
            BundleEntry {
                path: SafePath::parse("sounds/caf\u{e9}.wav").unwrap(),
                size: 70_000,
                id: ObjectId::sha256_of(b"cafe"),
            },
        ])
        .unwrap();
        let bytes = b.encode();
        assert_eq!(
            hex(&bytes),
            concat!(
                "55464231",
                "00000003",
                "0005",
                "656d707479",
                "0000000000000000",
                "01d41d8cd98f00b204e9800998ecf8427e",
                "0010",
                "6d6170732f64655f647573742e627370",
                "0000000000000004",
                "0163712a25d63eb8793112cc6dc2641526",
                "0010",
                "736f756e64732f636166c3a92e776176",
                "0000000000011170",
                "02a860b858265b22dad3aaf1165cfc2936daf1d3d86e0b7b77e3cc07f59f96858f",
            )
        );
        assert_eq!(Bundle::decode(&bytes), Ok(b));
        let empty = Bundle::build(Vec::new()).unwrap();
        assert_eq!(hex(&empty.encode()), "5546423100000000");
    }

    #[test]
    fn hostile_names_are_refused_with_their_rule() {
        let id = ObjectId::md5_of(b"x");
        for (name, rule) in [
            ("../escape", NameError::Parent),
            ("a/../../b", NameError::Parent),
            ("/abs", NameError::Absolute),
            ("C:\\x", NameError::Prefix),
            ("c:x", NameError::Prefix),
            ("\\\\server\\share", NameError::Prefix),
            ("con.txt", NameError::ReservedName),
            ("maps/NUL", NameError::ReservedName),
            ("a\\b", NameError::Backslash),
            ("", NameError::Empty),
            ("./a", NameError::DotComponent),
            ("a//b", NameError::EmptyComponent),
            ("a\0b", NameError::ControlCharacter { ch: '\0' }),
            ("x:stream", NameError::Prefix),
            ("a/b:stream", NameError::ForbiddenCharacter { ch: ':' }),
        ] {
            let bytes = raw(&[("a", 1, id), (name, 1, id)]);
            assert_eq!(
                Bundle::decode(&bytes),
                Err(BundleError::BadName {
                    index: 1,
                    source: rule
                }),
                "{name:?}"
            );
        }
        // Not UTF-8.
        let mut bytes = raw(&[("ab", 1, id)]);
        bytes[10] = 0xff;
        assert_eq!(Bundle::decode(&bytes), Err(BundleError::Malformed));
    }

    #[test]
    fn duplicates_disorder_and_conflicts_are_refused() {
        let id = ObjectId::md5_of(b"x");
        let dup = raw(&[("a", 1, id), ("a", 1, id)]);
        assert!(matches!(
            Bundle::decode(&dup),
            Err(BundleError::Duplicate { .. })
        ));
        let unsorted = raw(&[("b", 1, id), ("a", 1, id)]);
        assert!(matches!(
            Bundle::decode(&unsorted),
            Err(BundleError::Duplicate { .. })
        ));
        for pair in [
            ["Map.bsp", "map.bsp"],
            ["a", "a/b"],
            ["A", "a/b"],
            ["a", "a/x/y"],
            ["a/B", "a/b/c"],
        ] {
            let mut sorted = pair;
            sorted.sort();
            let bytes = raw(&[(sorted[0], 1, id), (sorted[1], 1, id)]);
            assert!(
                matches!(Bundle::decode(&bytes), Err(BundleError::Conflict { .. })),
                "{pair:?}"
            );
        }
        // `a-x` sorts between `a` and `a/b`: the prefix check is not only between neighbours.
        let between = raw(&[("a", 1, id), ("a-x", 1, id), ("a/b", 1, id)]);
        assert!(matches!(
            Bundle::decode(&between),
            Err(BundleError::Conflict { .. })
        ));
        // Prefixes of a name that are not whole components are fine.
        let fine = raw(&[("a", 1, id), ("ab/c", 1, id)]);
        assert!(Bundle::decode(&fine).is_ok());
        assert!(matches!(
            Bundle::build(vec![entry("a", b"1"), entry("a", b"2")]),
            Err(BundleError::Duplicate { .. })
        ));
    }

    #[test]
    fn absurd_counts_and_sizes_are_refused_before_allocating() {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            Bundle::decode(&bytes),
            Err(BundleError::TooManyFiles {
                count: u64::from(u32::MAX)
            })
        );
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&1000u32.to_be_bytes());
        assert_eq!(Bundle::decode(&bytes), Err(BundleError::Malformed));
        let id = ObjectId::md5_of(b"x");
        let huge = raw(&[("a", MAX_TOTAL_BYTES, id), ("b", 1, id)]);
        assert_eq!(Bundle::decode(&huge), Err(BundleError::TooLarge));
        let overflow = raw(&[("a", u64::MAX, id), ("b", u64::MAX, id)]);
        assert_eq!(Bundle::decode(&overflow), Err(BundleError::TooLarge));
        let bad_alg = {
            let mut b = raw(&[("a", 1, id)]);
            b[8 + 2 + 1 + 8] = 9;
            b
        };
        assert_eq!(Bundle::decode(&bad_alg), Err(BundleError::Malformed));
    }

    #[test]
    fn only_a_decodable_listing_of_a_listings_size_is_a_listing() {
        let dir = std::env::temp_dir().join(format!(
            "udpferry-is-listing-{}-{}",
            std::process::id(),
            crate::random::random_u64()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let put = |name: &str, bytes: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let listing = Bundle::build(vec![entry("maps/a.map", b"1"), entry("b", b"2")])
            .unwrap()
            .encode();
        assert!(is_bundle_listing(&put("listing", &listing)));
        assert!(!is_bundle_listing(&put("map", b"not a listing at all")));
        assert!(!is_bundle_listing(&put("short", b"UF")));
        let mut damaged = listing.clone();
        damaged.truncate(listing.len() - 1);
        assert!(!is_bundle_listing(&put("damaged", &damaged)));
        // A file that starts like a listing but is longer than any listing can be.
        let mut long = listing.clone();
        long.resize(MAX_LISTING_BYTES as usize + 1, 0);
        assert!(!is_bundle_listing(&put("long", &long)));
        assert!(!is_bundle_listing(&dir.join("missing")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
