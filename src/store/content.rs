//! The server's side: a directory of files served by the MD5 of their bytes.

use std::collections::HashMap;
use std::fs::{self, File, Metadata};
use std::io;
use std::path::{Path, PathBuf};

use super::bundle::{Bundle, BundleEntry};
use super::manifest::{block_size_for, manifest_id, Manifest};
use super::stamp::Stamp;
use super::{hash_file, read_exact_at, FileIds, SafePath, StoreError};
use crate::core::{ChunkSource, ObjectProvider};
use crate::id::ObjectId;

/// How many reads a [`FileSource`] serves between two checks of the file's metadata.
const CHECK_EVERY: u64 = 64;

/// The error text a [`FileSource`] returns once its file changed.
const CHANGED: &str = "object changed on disk since it was indexed";

/// One served file, as listed by [`ContentStore::objects`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ObjectInfo {
    /// MD5 of the file's bytes when it was last hashed.
    pub id: ObjectId,
    /// SHA-256 of the same bytes: the store serves the file under either id.
    pub sha256: ObjectId,
    /// Its size in bytes.
    pub size: u64,
    /// Its path relative to the store's root (always a valid `SafePath`).
    pub path: PathBuf,
}

/// One bundle served, as listed by [`ContentStore::bundles`]: a top-level subdirectory of the
/// store's root and every file under it (see `super::bundle`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BundleInfo {
    /// MD5 of the encoded listing: the id a client fetches the bundle by.
    pub id: ObjectId,
    /// The subdirectory, relative to the store's root (one component).
    pub dir: SafePath,
    /// How many files it lists.
    pub files: usize,
    /// Their sizes added up.
    pub bytes: u64,
}

/// The line `udpferry serve --list` prints: `object <md5hex> <bytes> <path>`.
impl std::fmt::Display for ObjectInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "object {} {} {}", self.id, self.size, self.path.display())
    }
}

/// The line `udpferry serve --list` prints: `bundle <md5hex> <files> <dir>/`.
impl std::fmt::Display for BundleInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bundle {} {} {}/", self.id, self.files, self.dir)
    }
}

/// A bundle served from memory.
#[derive(Debug)]
struct ServedBundle {
    info: BundleInfo,
    listing: std::sync::Arc<[u8]>,
}

/// What [`ContentStore::recheck`] found.
enum Recheck {
    /// Still (or again) the requested bytes: serve this.
    Serve(u64, FileSource),
    /// Now holds other bytes; the index must be rebuilt.
    Changed,
    /// Deleted or no longer a servable file.
    Gone,
    /// Not servable at the moment (being rewritten).
    NotNow,
}

#[derive(Debug)]
struct Entry {
    /// The path relative to the root, as checked by the walk; `info.path` is its `PathBuf`.
    name: SafePath,
    info: ObjectInfo,
    stamp: Stamp,
    /// Hashed too soon after a change to trust the stamp: re-hash on open.
    racy: bool,
}

/// Every regular file under a directory, addressed by the MD5 of its bytes (server side).
///
/// Create it with [`open`](Self::open) when the server starts, list what it serves with
/// [`objects`](Self::objects), and call [`open_object`](Self::open_object) for each request to
/// get a `FileSource` for the core's sender. After adding or removing files call
/// [`rescan`](Self::rescan). Symbolic links are followed only to regular files inside the root;
/// links to directories, links leading outside the root and non-regular files are not served.
/// Neither is a file whose path relative to the root is not a `SafePath` (not UTF-8, a Windows
/// device name such as `con.txt`, a name ending in a dot, deeper than 32 levels, ...): it is
/// skipped without an error, and a directory whose path is not one is not entered.
#[derive(Debug)]
pub struct ContentStore {
    root: PathBuf,
    entries: Vec<Entry>,
    by_id: HashMap<ObjectId, Vec<usize>>,
    /// Manifest id -> the object it describes (for every indexed id).
    manifest_of: HashMap<ObjectId, ObjectId>,
    /// Encoded manifests built so far, by object id: computed once, served to every client.
    manifests: HashMap<ObjectId, std::sync::Arc<[u8]>>,
    /// One bundle per top-level subdirectory holding files, sorted by directory; rebuilt with
    /// the index.
    bundles: Vec<ServedBundle>,
}

/// Serves every object of the store, and the manifest of each (for delta downloads).
impl ObjectProvider for ContentStore {
    type Source = Served;
    fn open(&mut self, id: &ObjectId) -> io::Result<Option<(u64, Self::Source)>> {
        self.open_any(id).map_err(Into::into)
    }
    /// From the index, without touching the disk: a request may come from a forged address,
    /// and only the Start's `open` re-checks (and if need be re-hashes) the file.
    fn size_of(&mut self, id: &ObjectId) -> io::Result<Option<u64>> {
        Ok(self.size_of_any(id))
    }
}

impl ContentStore {
    /// Indexes every regular file under `root` (recursively), hashing each one through a 1 MiB
    /// buffer. Call it once at startup; it reads every byte, so it takes as long as reading the
    /// directory does. Then serve requests with [`open_object`](Self::open_object).
    pub fn open(root: impl AsRef<Path>) -> Result<Self, StoreError> {
        let given = root.as_ref();
        let root = fs::canonicalize(given).map_err(|e| StoreError::io("open", given, e))?;
        if !root.is_dir() {
            return Err(StoreError::NotADirectory { path: given.into() });
        }
        let mut store = ContentStore {
            root,
            entries: Vec::new(),
            by_id: HashMap::new(),
            manifest_of: HashMap::new(),
            manifests: HashMap::new(),
            bundles: Vec::new(),
        };
        store.rescan()?;
        Ok(store)
    }

    /// The directory served (canonicalised); [`ObjectInfo::path`] is relative to it.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every object served, sorted by relative path. Files with equal bytes share an id and are
    /// all listed.
    pub fn objects(&self) -> impl Iterator<Item = &ObjectInfo> {
        self.entries.iter().map(|e| &e.info)
    }

    /// Every bundle served, sorted by directory: one per top-level subdirectory of the root
    /// that holds at least one served file, listing those files (recursively) by their paths
    /// relative to it, with their sizes and MD5s as last indexed. Rebuilt whenever the index
    /// is ([`rescan`](Self::rescan), or a request that found a file changed), so a bundle's id
    /// changes when one of its files does. A subdirectory whose files cannot form a bundle (two
    /// names equal but for case) is not served as one.
    pub fn bundles(&self) -> impl Iterator<Item = &BundleInfo> {
        self.bundles.iter().map(|b| &b.info)
    }

    /// The object named `id` as last indexed, or `None` if no file has those bytes. To serve it,
    /// call [`open_object`](Self::open_object), which re-checks the file.
    pub fn get(&self, id: &ObjectId) -> Option<&ObjectInfo> {
        let i = *self.by_id.get(id)?.first()?;
        self.entries.get(i).map(|e| &e.info)
    }

    /// Opens object `id` for one transfer: its size and a `FileSource` to hand to the sender.
    ///
    /// Re-checks the file's size and timestamps against the index; if they moved, the file is
    /// re-hashed and the index updated. If its bytes no longer hash to `id` (and no other file
    /// has them) this returns `Ok(None)`: answer "not found", as changed bytes are never served
    /// under the old MD5. A file that disappeared is dropped from the index the same way.
    pub fn open_object(&mut self, id: &ObjectId) -> Result<Option<(u64, FileSource)>, StoreError> {
        let candidates = self.by_id.get(id).cloned().unwrap_or_default();
        let mut outcome = Ok(None);
        let (mut changed, mut gone) = (false, Vec::new());
        for i in candidates {
            match self.recheck(i, id) {
                Ok(Recheck::Serve(size, source)) => {
                    outcome = Ok(Some((size, source)));
                    break;
                }
                Ok(Recheck::Changed) => changed = true,
                Ok(Recheck::Gone) => gone.push(i),
                Ok(Recheck::NotNow) => {}
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        if changed || !gone.is_empty() {
            let mut i = 0;
            self.entries.retain(|_| {
                i += 1;
                !gone.contains(&(i - 1))
            });
            self.reindex();
        }
        outcome
    }

    /// Re-checks entry `i` (indexed as `id`) against the disk, re-hashing it if it moved.
    fn recheck(&mut self, i: usize, id: &ObjectId) -> Result<Recheck, StoreError> {
        let Some(entry) = self.entries.get_mut(i) else {
            return Ok(Recheck::NotNow);
        };
        let path = entry.name.join_to(&self.root);
        let Some((file, meta)) = open_regular(&self.root, &path)? else {
            return Ok(Recheck::Gone);
        };
        let stamp = Stamp::of(&meta);
        if stamp != entry.stamp || entry.racy {
            let Some(ids) = hash_settled(&file, stamp.size(), &path)? else {
                entry.racy = true; // shrinking under us: not servable now, re-check next time
                return Ok(Recheck::NotNow);
            };
            entry.info.id = ids.md5;
            entry.info.sha256 = ids.sha256;
            entry.info.size = stamp.size();
            entry.stamp = stamp;
            entry.racy = stamp.is_racy();
        }
        Ok(if entry.info.id == *id || entry.info.sha256 == *id {
            Recheck::Serve(stamp.size(), FileSource::new(file, stamp, path))
        } else {
            Recheck::Changed
        })
    }

    /// Walks the root again: new files are hashed and added, removed ones dropped, changed ones
    /// re-hashed; unchanged files keep their id without being read. Call it when the served
    /// directory changed (for example after deploying new maps).
    pub fn rescan(&mut self) -> Result<(), StoreError> {
        let mut known: HashMap<SafePath, Entry> = self
            .entries
            .drain(..)
            .map(|e| (e.name.clone(), e))
            .collect();
        let mut entries = Vec::new();
        for (name, abs) in walk(&self.root)? {
            if let Some(old) = known.remove(&name) {
                let meta = fs::metadata(&abs).map_err(|e| StoreError::io("inspect", &abs, e))?;
                if !old.racy && old.stamp == Stamp::of(&meta) {
                    entries.push(old);
                    continue;
                }
            }
            // Vanished between the walk and now: not served.
            let Some((file, meta)) = open_regular(&self.root, &abs)? else {
                continue;
            };
            let stamp = Stamp::of(&meta);
            // Shrinking while being read: being rewritten; the next rescan picks it up.
            let Some(ids) = hash_settled(&file, stamp.size(), &abs)? else {
                continue;
            };
            let unchanged = file.metadata().is_ok_and(|m| Stamp::of(&m) == stamp);
            entries.push(Entry {
                info: ObjectInfo {
                    id: ids.md5,
                    sha256: ids.sha256,
                    size: stamp.size(),
                    path: name.to_path_buf(),
                },
                name,
                stamp,
                racy: !unchanged || stamp.is_racy(),
            });
        }
        entries.sort_by(|a, b| a.info.path.cmp(&b.info.path));
        self.entries = entries;
        self.reindex();
        Ok(())
    }

    fn reindex(&mut self) {
        self.by_id.clear();
        self.manifest_of.clear();
        for (i, e) in self.entries.iter().enumerate() {
            for id in [e.info.id, e.info.sha256] {
                self.by_id.entry(id).or_default().push(i);
                self.manifest_of.insert(manifest_id(&id), id);
            }
        }
        // Manifests of objects no file holds any more go.
        let by_id = &self.by_id;
        self.manifests.retain(|id, _| by_id.contains_key(id));
        self.rebuild_bundles();
    }

    /// Builds one bundle per top-level subdirectory from the index (entries are sorted by path,
    /// so each directory's files are adjacent). Reads nothing from disk.
    fn rebuild_bundles(&mut self) {
        let mut groups: Vec<(String, Vec<BundleEntry>)> = Vec::new();
        for e in &self.entries {
            let Some((top, rest)) = e.name.as_str().split_once('/') else {
                continue; // a file directly in the root belongs to no bundle
            };
            // `rest` is a suffix of a SafePath made of whole components: a SafePath too.
            let Ok(path) = SafePath::parse(rest) else {
                continue;
            };
            let entry = BundleEntry {
                path,
                size: e.info.size,
                id: e.info.id,
            };
            match groups.last_mut() {
                Some((dir, files)) if dir == top => files.push(entry),
                _ => groups.push((top.to_owned(), vec![entry])),
            }
        }
        self.bundles = groups
            .into_iter()
            .filter_map(|(dir, files)| {
                let dir = SafePath::parse(&dir).ok()?;
                let bundle = Bundle::build(files).ok()?;
                let listing: std::sync::Arc<[u8]> = bundle.encode().into();
                Some(ServedBundle {
                    info: BundleInfo {
                        id: Bundle::id(&listing),
                        dir,
                        files: bundle.len(),
                        bytes: bundle.total_bytes(),
                    },
                    listing,
                })
            })
            .collect();
        self.bundles.sort_by(|a, b| a.info.dir.cmp(&b.info.dir));
    }

    /// The listing of the bundle named `id`, if one is served.
    fn bundle_listing(&self, id: &ObjectId) -> Option<&std::sync::Arc<[u8]>> {
        self.bundles
            .iter()
            .find(|b| b.info.id == *id)
            .map(|b| &b.listing)
    }

    /// What a client may ask for by `id`: an object (its size from the index), a bundle listing
    /// (see [`bundles`](Self::bundles)), or the manifest of an object (its size computed from
    /// the object's); `None` if none of these. Reads nothing.
    pub fn size_of_any(&self, id: &ObjectId) -> Option<u64> {
        if let Some(info) = self.get(id) {
            return Some(info.size);
        }
        if let Some(listing) = self.bundle_listing(id) {
            return Some(listing.len() as u64);
        }
        let object = self.manifest_of.get(id)?;
        let info = self.get(object)?;
        Some(manifest_len(object, info.size))
    }

    /// Opens an object ([`open_object`](Self::open_object)), a bundle listing or the manifest
    /// of an object, for one transfer. Bundle listings are built with the index and served
    /// from memory. A manifest is built the first time it is asked for (reading the object
    /// once) and kept in memory, so later clients cost nothing; it is dropped if the object
    /// changes.
    pub fn open_any(&mut self, id: &ObjectId) -> Result<Option<(u64, Served)>, StoreError> {
        if let Some((size, source)) = self.open_object(id)? {
            return Ok(Some((size, Served::File(source))));
        }
        if let Some(listing) = self.bundle_listing(id) {
            return Ok(Some((
                listing.len() as u64,
                Served::Memory(listing.clone()),
            )));
        }
        let Some(object) = self.manifest_of.get(id).copied() else {
            return Ok(None);
        };
        // Re-check the object (it may have changed), then build or reuse its manifest.
        let Some((size, mut source)) = self.open_object(&object)? else {
            self.manifests.remove(&object);
            return Ok(None);
        };
        let fresh = self
            .manifests
            .get(&object)
            .filter(|m| m.len() as u64 == manifest_len(&object, size))
            .cloned();
        let bytes = match fresh {
            Some(bytes) => bytes,
            None => {
                let reader = SourceReader {
                    source: &mut source,
                    at: 0,
                    size,
                };
                let manifest = Manifest::build(object, size, reader)
                    .map_err(|e| StoreError::io("read", &self.root, e))?;
                let bytes: std::sync::Arc<[u8]> = manifest.encode().into();
                self.manifests.insert(object, bytes.clone());
                bytes
            }
        };
        Ok(Some((bytes.len() as u64, Served::Memory(bytes))))
    }
}

/// Hashes `len` bytes of `file`; `None` if the file got shorter meanwhile (it is being rewritten).
fn hash_settled(file: &File, len: u64, path: &Path) -> Result<Option<FileIds>, StoreError> {
    match hash_file(file, len) {
        Ok(id) => Ok(Some(id)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(StoreError::io("hash", path, e)),
    }
}

/// Every servable file under `root`: (path relative to root, path to open). Entries whose
/// relative path is not a [`SafePath`] are skipped, and so is everything under such a directory
/// (its contents' paths would break the same rule).
fn walk(root: &Path) -> Result<Vec<(SafePath, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    let mut dirs: Vec<Option<SafePath>> = vec![None];
    while let Some(rel_dir) = dirs.pop() {
        let dir = rel_dir
            .as_ref()
            .map_or_else(|| root.to_path_buf(), |d| d.join_to(root));
        let read = match fs::read_dir(&dir) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound && rel_dir.is_some() => continue,
            Err(e) => return Err(StoreError::io("read directory", &dir, e)),
        };
        for item in read {
            let item = item.map_err(|e| StoreError::io("read directory", &dir, e))?;
            let file_name = item.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue; // not UTF-8: not a SafePath
            };
            let rel = match &rel_dir {
                Some(d) => SafePath::parse(&format!("{d}/{file_name}")),
                None => SafePath::parse(file_name),
            };
            let Ok(rel) = rel else { continue };
            let Ok(kind) = item.file_type() else { continue };
            let abs = rel.join_to(root);
            if kind.is_dir() {
                dirs.push(Some(rel));
            } else if kind.is_file()
                || (kind.is_symlink() && inside_root_file(root, &abs).is_some())
            {
                out.push((rel, abs));
            }
        }
    }
    Ok(out)
}

/// The target of `link` if it is a regular file inside `root`.
fn inside_root_file(root: &Path, link: &Path) -> Option<PathBuf> {
    let target = fs::canonicalize(link).ok()?;
    (target.starts_with(root) && target.is_file()).then_some(target)
}

/// Opens `path` if it is (or links, inside `root`, to) a regular file; `None` if it is gone or
/// no longer servable.
fn open_regular(root: &Path, path: &Path) -> Result<Option<(File, Metadata)>, StoreError> {
    let target = match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => match inside_root_file(root, path) {
            Some(t) => t,
            None => return Ok(None),
        },
        Ok(m) if m.is_file() => path.to_path_buf(),
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io("inspect", path, e)),
    };
    let file = match File::open(&target) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io("open", path, e)),
    };
    let meta = file
        .metadata()
        .map_err(|e| StoreError::io("inspect", path, e))?;
    Ok(meta.is_file().then_some((file, meta)))
}

/// Length of the encoded manifest of `object` of `size` bytes (see [`super::manifest`]).
fn manifest_len(object: &ObjectId, size: u64) -> u64 {
    let blocks = size.div_ceil(u64::from(block_size_for(size)));
    (4 + 1 + object.digest().len() + 8 + 4 + 4 + 16) as u64 + blocks * 12
}

/// Reads a [`ChunkSource`] in order, for building a manifest.
struct SourceReader<'a> {
    source: &'a mut FileSource,
    at: u64,
    size: u64,
}

impl io::Read for SourceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.size - self.at).min(buf.len() as u64) as usize;
        self.source.read_at(self.at, &mut buf[..n])?;
        self.at += n as u64;
        Ok(n)
    }
}

/// What [`ContentStore::open_any`] serves: a file, or a manifest or bundle listing from memory.
#[derive(Debug)]
pub enum Served {
    /// An object's file.
    File(FileSource),
    /// A manifest's or bundle listing's bytes.
    Memory(std::sync::Arc<[u8]>),
}

impl ChunkSource for Served {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self {
            Served::File(f) => f.read_at(offset, buf),
            Served::Memory(m) => m.read_at(offset, buf),
        }
    }
}

/// A [`ChunkSource`] over one served file, from [`ContentStore::open_object`].
///
/// Hand it to the core's sender. On its first read and every 64 reads after, it compares the
/// file's size and timestamps with what `open_object` saw; once they differ every read fails
/// with "object changed on disk since it was indexed", which ends the transfer (the client's
/// MD5 check stays the last line of defence for changes between two checks).
#[derive(Debug)]
pub struct FileSource {
    file: File,
    stamp: Stamp,
    path: PathBuf,
    reads: u64,
    changed: bool,
}

impl FileSource {
    fn new(file: File, stamp: Stamp, path: PathBuf) -> Self {
        FileSource {
            file,
            stamp,
            path,
            reads: 0,
            changed: false,
        }
    }

    /// The object's size as opened (also returned by `open_object`): pass it to the sender.
    pub fn size(&self) -> u64 {
        self.stamp.size()
    }

    /// The file served, for logging which file a transfer reads.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl ChunkSource for FileSource {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if !self.changed && self.reads.is_multiple_of(CHECK_EVERY) {
            self.changed = Stamp::of(&self.file.metadata()?) != self.stamp;
        }
        if self.changed {
            return Err(io::Error::other(CHANGED));
        }
        self.reads = self.reads.wrapping_add(1);
        read_exact_at(&self.file, buf, offset)
    }
}
