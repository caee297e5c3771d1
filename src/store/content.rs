//! The server's side: a directory of files served by the MD5 of their bytes.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::bundle::{Bundle, BundleEntry};
use super::manifest::{block_size_for, manifest_id, Manifest};
use super::scan::{self, open_regular, IndexChange, Job, Known, SkippedFile, Update};
use super::stamp::Stamp;
use super::{read_exact_at, SafePath, StoreError};
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

#[derive(Debug)]
struct Entry {
    /// The path relative to the root, as checked by the walk; `info.path` is its `PathBuf`.
    name: SafePath,
    info: ObjectInfo,
    /// The file's stamp when it was hashed: it is served only while the stamp still matches.
    stamp: Stamp,
    /// Hashed too soon after a change to trust the stamp for good: a rescan hashes it again
    /// once its mtime is old enough (section 6.2 of ARCHITECTURE).
    racy: bool,
}

/// A skipped entry, and the stamp to retry it on (see `scan::Known::skipped`).
#[derive(Debug)]
struct Skip {
    file: SkippedFile,
    stamp: Option<Stamp>,
}

/// Every regular file under a directory, addressed by the MD5 of its bytes (server side).
///
/// Create it with [`open`](Self::open) when the server starts, list what it serves with
/// [`objects`](Self::objects), and call [`open_object`](Self::open_object) for each request to
/// get a `FileSource` for the core's sender. Symbolic links are followed only to regular files
/// inside the root; links to directories, links leading outside the root and non-regular files
/// are not served. Neither is a file whose path relative to the root is not a `SafePath` (not
/// UTF-8, a Windows device name such as `con.txt`, a name ending in a dot, deeper than 32
/// levels, ...), nor one that cannot be opened or read: each is listed by
/// [`skipped`](Self::skipped) with the reason, and a directory whose path is not one is not
/// entered.
///
/// **Following the directory.** Requests never hash: [`open_object`](Self::open_object) serves
/// a file only while its stamp (size, mtime, ctime, inode) is the one it was hashed with. New,
/// changed and removed files are picked up by a rescan, which `stat`s every entry and hashes
/// only files that are new or whose stamp moved: [`rescan`](Self::rescan) does it on the
/// calling thread; [`start_rescan`](Self::start_rescan) on a thread of its own, and
/// [`poll_rescan`](Self::poll_rescan), called from the serving loop, applies what it found so
/// far (the `Server` does both, every 2 s by default). Each change is reported as an
/// [`IndexChange`].
#[derive(Debug)]
pub struct ContentStore {
    root: PathBuf,
    /// Every served file, by its path relative to the root (so listed sorted by path).
    entries: BTreeMap<PathBuf, Entry>,
    /// Object id (MD5 and SHA-256) -> the paths of the files holding those bytes, sorted.
    by_id: HashMap<ObjectId, Vec<PathBuf>>,
    /// Manifest id -> the object it describes (for every indexed id).
    manifest_of: HashMap<ObjectId, ObjectId>,
    /// Encoded manifests built so far, by object id: computed once, served to every client.
    manifests: HashMap<ObjectId, std::sync::Arc<[u8]>>,
    /// One bundle per top-level subdirectory holding files, sorted by directory; rebuilt with
    /// the index.
    bundles: Vec<ServedBundle>,
    /// Entries not served, by path relative to the root.
    skipped: BTreeMap<PathBuf, Skip>,
    /// The rescan running in the background, if any.
    job: Option<Job>,
    /// Files hashed since the store was opened.
    hashed: Arc<AtomicU64>,
    /// A request found an indexed file changed or gone since it was hashed.
    stale: bool,
    /// The last rescan's failure, reported once.
    failure: Option<String>,
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
    ///
    /// Fails only when `root` is not a directory or cannot be read. An entry under it that
    /// cannot be served (unreadable, not a regular file, a bad name, a dangling link) is
    /// skipped and listed by [`skipped`](Self::skipped).
    pub fn open(root: impl AsRef<Path>) -> Result<Self, StoreError> {
        let given = root.as_ref();
        let root = fs::canonicalize(given).map_err(|e| StoreError::io("open", given, e))?;
        if !root.is_dir() {
            return Err(StoreError::NotADirectory { path: given.into() });
        }
        let mut store = ContentStore {
            root,
            entries: BTreeMap::new(),
            by_id: HashMap::new(),
            manifest_of: HashMap::new(),
            manifests: HashMap::new(),
            bundles: Vec::new(),
            skipped: BTreeMap::new(),
            job: None,
            hashed: Arc::new(AtomicU64::new(0)),
            stale: false,
            failure: None,
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
        self.entries.values().map(|e| &e.info)
    }

    /// Every entry under the root that is not served, sorted by path, with the reason: a file
    /// that could not be opened or read, a FIFO, device or socket, a symbolic link that leads
    /// nowhere, outside the root or to a directory, a name that is not a `SafePath`, a
    /// directory that could not be read. As of the last rescan.
    pub fn skipped(&self) -> impl Iterator<Item = &SkippedFile> {
        self.skipped.values().map(|s| &s.file)
    }

    /// How many files this store has hashed since it was opened, the first index included. A
    /// rescan hashes only files that are new or whose stamp moved (and racy ones once, to
    /// settle them), so this stays put while the directory does.
    pub fn files_hashed(&self) -> u64 {
        self.hashed.load(Ordering::Relaxed)
    }

    /// Every bundle served, sorted by directory: one per top-level subdirectory of the root
    /// that holds at least one served file, listing those files (recursively) by their paths
    /// relative to it, with their sizes and MD5s as last indexed. Rebuilt whenever a rescan
    /// changes the index, so a bundle's id changes when one of its files does. A subdirectory
    /// whose files cannot form a bundle (two names equal but for case) is not served as one.
    pub fn bundles(&self) -> impl Iterator<Item = &BundleInfo> {
        self.bundles.iter().map(|b| &b.info)
    }

    /// The object named `id` as last indexed, or `None` if no file has those bytes. To serve it,
    /// call [`open_object`](Self::open_object), which re-checks the file.
    pub fn get(&self, id: &ObjectId) -> Option<&ObjectInfo> {
        let path = self.by_id.get(id)?.first()?;
        self.entries.get(path).map(|e| &e.info)
    }

    /// Opens object `id` for one transfer: its size and a `FileSource` to hand to the sender.
    ///
    /// Never hashes. It re-checks the file's stamp (size, timestamps, inode) against the one
    /// it was hashed with, and serves it only if they are equal. A file that changed or
    /// disappeared since is not served under its old id: this returns `Ok(None)` (answer "not
    /// found") and sets [`needs_rescan`](Self::needs_rescan); the next rescan hashes it again
    /// in the background. An error is one from opening the file.
    pub fn open_object(&mut self, id: &ObjectId) -> Result<Option<(u64, FileSource)>, StoreError> {
        let mut error = None;
        for path in self.by_id.get(id).into_iter().flatten() {
            let Some(entry) = self.entries.get(path) else {
                continue;
            };
            let abs = entry.name.join_to(&self.root);
            match open_regular(&self.root, &abs) {
                Ok(Some((file, meta))) if Stamp::of(&meta) == entry.stamp => {
                    let size = entry.stamp.size();
                    return Ok(Some((size, FileSource::new(file, entry.stamp, abs))));
                }
                Ok(_) => self.stale = true,
                Err(e) => {
                    self.stale = true;
                    error.get_or_insert(StoreError::io("open", abs, e));
                }
            }
        }
        error.map_or(Ok(None), Err)
    }

    /// True when a request found an indexed file changed or gone since it was hashed: a rescan
    /// would update the index. The `Server` then starts one without waiting for its interval.
    /// Starting a rescan clears it.
    pub fn needs_rescan(&self) -> bool {
        self.stale
    }

    /// Walks the root again on the calling thread and applies what it finds: new files are
    /// hashed and added, removed ones dropped, changed ones re-hashed; unchanged files keep
    /// their ids without being read. Returns the changes, in the order made. A rescan running
    /// in the background ([`start_rescan`](Self::start_rescan)) is finished first, and its
    /// changes are returned too. Fails only when the root cannot be read; the index is then
    /// left as it was.
    pub fn rescan(&mut self) -> Result<Vec<IndexChange>, StoreError> {
        let mut changes = Vec::new();
        if let Some(mut job) = self.job.take() {
            let mut updates = Vec::new();
            job.wait(&mut updates);
            // A failure of that one is superseded by the scan below.
            let _ = self.apply(updates, &mut |c| changes.push(c));
        }
        self.stale = false;
        let known = self.known();
        let mut updates = Vec::new();
        let never = AtomicBool::new(false);
        scan::scan(&self.root, &known, &never, &self.hashed, &mut |u| {
            updates.push(u);
            true
        });
        match self.apply(updates, &mut |c| changes.push(c)) {
            Some(e) => Err(e),
            None => {
                self.failure = None;
                Ok(changes)
            }
        }
    }

    /// Starts a rescan on a thread of its own and returns at once; true if it started, false
    /// if one is already running. Call [`poll_rescan`](Self::poll_rescan) from the serving
    /// loop to apply what it finds. Nothing is hashed on the caller's thread. Only files that
    /// are new or whose stamp moved are hashed; until a changed file is, requests for its old
    /// id get "not found" ([`open_object`](Self::open_object)). Dropping the store stops the
    /// scan.
    pub fn start_rescan(&mut self) -> Result<bool, StoreError> {
        if self.job.is_some() {
            return Ok(false);
        }
        self.stale = false;
        let job = Job::start(self.root.clone(), self.known(), self.hashed.clone())
            .map_err(|e| StoreError::io("start a thread to rescan", &self.root, e))?;
        self.job = Some(job);
        Ok(true)
    }

    /// True while a rescan started by [`start_rescan`](Self::start_rescan) has not finished
    /// (or its last changes have not been applied by [`poll_rescan`](Self::poll_rescan)).
    pub fn rescanning(&self) -> bool {
        self.job.is_some()
    }

    /// Applies what the background rescan found so far, without waiting, calling `on_change`
    /// for each change: a file as soon as it is hashed, removals and skipped entries first.
    /// Returns true when the rescan finished in this call. A rescan that could not read the
    /// root reports [`IndexChange::Failed`] (once, until one succeeds) and leaves the index as
    /// it was. Cheap when there is nothing new: call it every turn of a serving loop.
    pub fn poll_rescan(&mut self, mut on_change: impl FnMut(IndexChange)) -> bool {
        let Some(job) = self.job.as_mut() else {
            return false;
        };
        let mut updates = Vec::new();
        let done = job.take(&mut updates);
        if done {
            self.job = None;
        }
        match self.apply(updates, &mut on_change) {
            Some(e) => {
                let message = e.to_string();
                if self.failure.as_ref() != Some(&message) {
                    on_change(IndexChange::Failed(message.clone()));
                }
                self.failure = Some(message);
            }
            None if done => self.failure = None,
            None => {}
        }
        done
    }

    /// What a rescan compares the directory with.
    fn known(&self) -> Known {
        Known {
            files: self
                .entries
                .values()
                .map(|e| (e.name.clone(), (e.stamp, e.racy)))
                .collect(),
            skipped: self
                .skipped
                .iter()
                .map(|(path, s)| (path.clone(), s.stamp))
                .collect(),
        }
    }

    /// Applies a rescan's updates, reporting each change; returns the rescan's failure, if any.
    fn apply(
        &mut self,
        updates: Vec<Update>,
        on_change: &mut dyn FnMut(IndexChange),
    ) -> Option<StoreError> {
        let mut changed = false;
        let mut failure = None;
        for update in updates {
            match update {
                Update::Indexed {
                    name,
                    ids,
                    stamp,
                    racy,
                } => {
                    let path = name.to_path_buf();
                    self.skipped.remove(&path);
                    let info = ObjectInfo {
                        id: ids.md5,
                        sha256: ids.sha256,
                        size: stamp.size(),
                        path: path.clone(),
                    };
                    let same = self.entries.get(&path).is_some_and(|e| e.info == info);
                    let entry = Entry {
                        name,
                        info: info.clone(),
                        stamp,
                        racy,
                    };
                    self.entries.insert(path, entry);
                    if !same {
                        changed = true;
                        on_change(IndexChange::Indexed(info));
                    }
                }
                Update::Removed(name) => {
                    let path = name.to_path_buf();
                    self.skipped.remove(&path);
                    if self.entries.remove(&path).is_some() {
                        changed = true;
                        on_change(IndexChange::Removed(path));
                    }
                }
                Update::Skipped {
                    path,
                    stamp,
                    reason,
                } => {
                    if self.entries.remove(&path).is_some() {
                        changed = true;
                        on_change(IndexChange::Removed(path.clone()));
                    }
                    let file = SkippedFile {
                        path: path.clone(),
                        reason,
                    };
                    if self.skipped.get(&path).is_none_or(|s| s.file != file) {
                        on_change(IndexChange::Skipped(file.clone()));
                    }
                    self.skipped.insert(path, Skip { file, stamp });
                }
                Update::NotSkipped(path) => {
                    self.skipped.remove(&path);
                }
                Update::Failed(e) => failure = Some(e),
            }
        }
        if changed {
            let before: HashMap<SafePath, ObjectId> = self
                .bundles
                .iter()
                .map(|b| (b.info.dir.clone(), b.info.id))
                .collect();
            self.reindex();
            for b in &self.bundles {
                if before.get(&b.info.dir) != Some(&b.info.id) {
                    on_change(IndexChange::Bundle(b.info.clone()));
                }
            }
            for dir in before.into_keys() {
                if !self.bundles.iter().any(|b| b.info.dir == dir) {
                    on_change(IndexChange::BundleRemoved(dir));
                }
            }
        }
        failure
    }

    fn reindex(&mut self) {
        self.by_id.clear();
        self.manifest_of.clear();
        for (path, e) in &self.entries {
            for id in [e.info.id, e.info.sha256] {
                self.by_id.entry(id).or_default().push(path.clone());
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
        for e in self.entries.values() {
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
    /// Bytes read ahead of the sender (allocated on the first read): chunks go out about
    /// 1.2 KB at a time, mostly in order, and one system call each cost the server a third of
    /// its time on loopback.
    ahead: Vec<u8>,
    /// File offset of `ahead[0]`.
    ahead_at: u64,
}

/// Bytes a [`FileSource`] reads at once: 28 chunks of the default size, per open transfer.
const READ_AHEAD: usize = 32 << 10;

impl FileSource {
    fn new(file: File, stamp: Stamp, path: PathBuf) -> Self {
        FileSource {
            file,
            stamp,
            path,
            reads: 0,
            changed: false,
            ahead: Vec::new(),
            ahead_at: 0,
        }
    }

    /// Fills `buf` from the read-ahead buffer, refilling it from `offset` on a miss. Reads as
    /// large as the buffer go straight to the file.
    fn read_through(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if buf.len() >= READ_AHEAD {
            return read_exact_at(&self.file, buf, offset);
        }
        let end = offset.saturating_add(buf.len() as u64);
        let hit = offset >= self.ahead_at && end <= self.ahead_at + self.ahead.len() as u64;
        if !hit {
            let want = (self.stamp.size().saturating_sub(offset))
                .min(READ_AHEAD as u64)
                .max(buf.len() as u64) as usize;
            self.ahead.resize(want, 0);
            if let Err(e) = read_exact_at(&self.file, &mut self.ahead, offset) {
                self.ahead.clear();
                return Err(e);
            }
            self.ahead_at = offset;
        }
        let from = (offset - self.ahead_at) as usize;
        buf.copy_from_slice(&self.ahead[from..from + buf.len()]);
        Ok(())
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
        self.read_through(offset, buf)
    }
}
