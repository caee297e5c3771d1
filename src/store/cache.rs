//! The client's side: finished objects, partial downloads and their resume journals.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::journal::{self, UNKNOWN_SIZE};
use super::lock::EntryLock;
use super::manifest::Manifest;
use super::stamp::Stamp;
use super::{read_exact_at, resolve_target, sync_dir, write_all_at, SafePath, StoreError, BUF_LEN};
use crate::core::{ChunkSink, RangeSet};
use crate::id::ObjectId;

/// New bytes a [`PartialFile`] writes between two automatic journal updates: a kill loses at
/// most this much progress.
pub const JOURNAL_INTERVAL_BYTES: u64 = 4 << 20;
/// Longest a [`PartialFile`] goes between two automatic journal updates while bytes arrive: at a
/// game server's per-client cap (256 KiB/s to 1 MiB/s) [`JOURNAL_INTERVAL_BYTES`] takes seconds
/// to fill, and a kill would lose all of it.
pub const JOURNAL_INTERVAL_TIME: Duration = Duration::from_millis(500);
/// Writes between two looks at the clock for [`JOURNAL_INTERVAL_TIME`] (a look costs about as
/// much as a small write's bookkeeping; one per chunk would show at loopback speed).
const CLOCK_EVERY_WRITES: u32 = 32;
/// Contiguous received bytes a [`PartialFile`] gathers in memory before one write: chunks
/// arrive about 1.2 KB at a time, and one system call each would cost more than the copy.
const WRITE_RUN_BYTES: usize = 256 << 10;

// The suffixes of a cache entry's files, after `<hex>`: the finished object, the partial
// download, its journal, a journal being written, the finished object's verified stamp, and
// the lock of whoever writes the partial download.
pub(super) const OBJECT: &str = "";
pub(super) const PART: &str = ".part";
pub(super) const JOURNAL: &str = ".journal";
pub(super) const JOURNAL_TMP: &str = ".journal.tmp";
pub(super) const VERIFIED: &str = ".verified";
pub(super) const LOCK: &str = ".lock";

/// What the cache holds for one object, from [`Cache::lookup`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lookup {
    /// The finished object, verified when it was stored and unchanged since: load `path`.
    Verified {
        /// The object's file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// A file is there under the object's name but it is not the object (truncated, changed,
    /// not a regular file). Never load it: call [`Cache::set_aside_damaged`] and download again
    /// (blocks that still match the object's manifest can be kept).
    Damaged {
        /// The damaged entry.
        path: PathBuf,
        /// What is wrong, in words.
        problem: String,
    },
    /// Not in the cache: download it.
    Missing,
}

/// A directory of objects named by their MD5 (client side).
///
/// Open it once with [`open`](Self::open). For each object the game needs: if
/// [`contains`](Self::contains) says it is there, load [`path_of`](Self::path_of); otherwise
/// call [`begin`](Self::begin) and hand the [`PartialFile`] and have-set to the core's receiver.
/// File names come only from [`ObjectId::to_hex`], never from the network, and are built as a
/// `SafePath` like every other name the store joins to a root.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// Opens the cache at `root`, creating the directory (and its parents). Use
    /// [`default_dir`](Self::default_dir) unless the game keeps its own folder.
    pub fn open(root: impl AsRef<Path>) -> Result<Self, StoreError> {
        let root = root.as_ref();
        fs::create_dir_all(root).map_err(|e| StoreError::io("create cache directory", root, e))?;
        Ok(Cache { root: root.into() })
    }

    /// The per-user cache folder: `$XDG_CACHE_HOME/udpferry`, else `$HOME/.cache/udpferry`
    /// (`%LOCALAPPDATA%\udpferry` on Windows). `None` when the environment names no home; the
    /// caller then picks a folder itself. Pass the result to [`open`](Self::open).
    pub fn default_dir() -> Option<PathBuf> {
        let var = |name| {
            std::env::var_os(name)
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
        };
        if cfg!(windows) {
            return var("LOCALAPPDATA").map(|p| p.join("udpferry"));
        }
        var("XDG_CACHE_HOME")
            .or_else(|| var("HOME").map(|h| h.join(".cache")))
            .map(|p| p.join("udpferry"))
    }

    /// The cache's directory, for showing the user where downloads go.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the finished object `id` lives (`<root>/<md5hex>`), whether or not it is there yet.
    pub fn path_of(&self, id: &ObjectId) -> PathBuf {
        self.entry(id, OBJECT)
    }

    /// `<root>/<hex><suffix>`: every file name the cache uses is built here, through
    /// [`SafePath`].
    pub(super) fn entry(&self, id: &ObjectId, suffix: &str) -> PathBuf {
        let name = format!("{}{suffix}", id.to_hex());
        match SafePath::parse(&name) {
            Ok(name) => name.join_to(&self.root),
            // Hex digits and the fixed suffixes above break no rule (the test below checks each
            // one), so this is a bug in this file, never a consequence of input.
            Err(e) => unreachable!("cache entry name {name:?} rejected: {e}"),
        }
    }

    /// True when the finished object is in the cache and verified ([`Lookup::Verified`]): load
    /// [`path_of`](Self::path_of) instead of downloading. See [`lookup`](Self::lookup) to learn
    /// about a damaged entry.
    pub fn contains(&self, id: &ObjectId) -> bool {
        matches!(self.lookup(id), Ok(Lookup::Verified { .. }))
    }

    /// Whether the finished object `id` is here and still the object that was verified.
    ///
    /// [`PartialFile::finalize`] records the entry's size, modification and status-change times
    /// and inode in `<hex>.verified` after checking its digest; a hit whose file still matches that
    /// record costs two `stat`s and a small read, not a re-hash. An entry without a matching
    /// record (stored by an older version, touched, truncated, replaced) is hashed again once:
    /// if it still hashes to `id` it is recorded anew and served, otherwise it is
    /// [`Lookup::Damaged`]. A change that keeps size, times and inode (bit rot under the file
    /// system) is not seen here; `udpferry cache verify` re-hashes everything.
    pub fn lookup(&self, id: &ObjectId) -> Result<Lookup, StoreError> {
        let path = self.path_of(id);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Lookup::Missing),
            Err(e) => return Err(StoreError::io("inspect", &path, e)),
        };
        if !meta.is_file() {
            let problem = format!("it is {}", super::node_kind(&meta.file_type()));
            return Ok(Lookup::Damaged { path, problem });
        }
        let stamp = Stamp::of(&meta);
        let recorded = fs::read_to_string(self.entry(id, VERIFIED))
            .ok()
            .and_then(|t| Stamp::decode(&t));
        if recorded == Some(stamp) && !stamp.is_racy() {
            return Ok(Lookup::Verified {
                path,
                size: stamp.size(),
            });
        }
        let file = File::open(&path).map_err(|e| StoreError::io("open", &path, e))?;
        let actual = super::id_of_file(&file, stamp.size(), id)
            .map_err(|e| StoreError::io("read", &path, e))?;
        if actual != *id {
            let problem = match recorded {
                Some(r) if r.size() != stamp.size() => format!(
                    "it holds {} bytes, {} when it was stored",
                    stamp.size(),
                    r.size()
                ),
                _ => format!("its bytes hash to {actual}"),
            };
            return Ok(Lookup::Damaged { path, problem });
        }
        self.record_verified(id, &file, &path);
        Ok(Lookup::Verified {
            path,
            size: stamp.size(),
        })
    }

    /// Writes `<hex>.verified` for the entry `file` at `path`, which was just checked. Best
    /// effort: without the record the next lookup only hashes again.
    pub(super) fn record_verified(&self, id: &ObjectId, file: &File, path: &Path) {
        let Ok(meta) = file.metadata() else { return };
        let record = self.entry(id, VERIFIED);
        let _ = fs::remove_file(&record);
        // Only if the name still leads to the file that was checked.
        if fs::symlink_metadata(path).is_ok_and(|m| Stamp::of(&m) == Stamp::of(&meta)) {
            let _ = fs::write(&record, Stamp::of(&meta).encode());
        }
    }

    /// Turns a [`Lookup::Damaged`] entry into a partial download without a journal, so that the
    /// next [`begin`](Self::begin) treats its bytes as unverified: the download can check them
    /// against the object's manifest and keep the blocks that match
    /// ([`PartialFile::verify_blocks`]). An entry that is not a regular file is left alone and
    /// the error says what it is. The partial download's modification time is set to now, so
    /// that [`clean`](Self::clean) counts its age from here. Hold the object's lock
    /// ([`try_lock`](Self::try_lock)) while calling it, so that no download of it is running.
    pub fn set_aside_damaged(&self, id: &ObjectId) -> Result<(), StoreError> {
        let path = self.path_of(id);
        let meta = fs::symlink_metadata(&path).map_err(|e| StoreError::io("inspect", &path, e))?;
        if !meta.is_file() {
            return Err(StoreError::NotAFile {
                path,
                kind: super::node_kind(&meta.file_type()),
            });
        }
        for stale in [VERIFIED, JOURNAL, JOURNAL_TMP] {
            let stale = self.entry(id, stale);
            match fs::remove_file(&stale) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(StoreError::io("remove", &stale, e))
                }
                _ => {}
            }
        }
        let part = self.entry(id, PART);
        fs::rename(&path, &part).map_err(|e| StoreError::io("move aside", &path, e))?;
        // Its age (for `clean`) counts from now: it is a partial download from this moment.
        let _ = File::options()
            .write(true)
            .open(&part)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()));
        sync_dir(&self.root)
    }

    /// Starts or resumes downloading `id`: returns the sink for the core's receiver and the byte
    /// ranges already held, to pass as `have` to `Receiver::new`.
    ///
    /// Opens (or creates) `<hex>.part` and reads `<hex>.journal`. A journal that is missing,
    /// damaged, or for another object is not trusted: the have-set is empty, but the partial
    /// file's bytes are kept as unverified ([`PartialFile::has_unverified`]): check them against
    /// the object's manifest with [`PartialFile::verify_blocks`] to keep what matches, or let the
    /// download overwrite them. Once the offer's size is known, call [`PartialFile::set_size`].
    ///
    /// One download per object at a time: the partial file holds the object's lock
    /// ([`try_lock`](Self::try_lock)), and while another holds it this fails with
    /// [`StoreError::Locked`]. A caller that decides whether to download from a lookup takes
    /// the lock first and calls [`begin_locked`](Self::begin_locked).
    pub fn begin(&self, id: &ObjectId) -> Result<(PartialFile, RangeSet), StoreError> {
        self.begin_sized(id, None)
    }

    /// Like [`begin`](Self::begin) when the object's size is already known (for example from a
    /// manifest): a journal recorded for another size is not trusted either.
    pub fn begin_sized(
        &self,
        id: &ObjectId,
        size: Option<u64>,
    ) -> Result<(PartialFile, RangeSet), StoreError> {
        match self.try_lock(id)? {
            Some(lock) => self.begin_locked(lock, size),
            None => Err(StoreError::Locked {
                id: *id,
                path: self.entry(id, LOCK),
            }),
        }
    }

    /// Like [`begin_sized`](Self::begin_sized) for the object of `lock`, already taken with
    /// [`try_lock`](Self::try_lock) (and typically followed by a [`lookup`](Self::lookup) that
    /// found the object missing or damaged). The partial file keeps the lock until it is
    /// finalized, discarded or dropped.
    pub fn begin_locked(
        &self,
        lock: EntryLock,
        size: Option<u64>,
    ) -> Result<(PartialFile, RangeSet), StoreError> {
        if lock.root() != self.root {
            let other = io::Error::new(io::ErrorKind::InvalidInput, "lock of another cache");
            return Err(StoreError::io("begin", self.path_of(lock.id()), other));
        }
        let id = *lock.id();
        let id = &id;
        let part = self.entry(id, PART);
        let journal = self.entry(id, JOURNAL);
        let tmp = self.entry(id, JOURNAL_TMP);
        let _ = fs::remove_file(&tmp);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part)
            .map_err(|e| StoreError::io("open partial download", &part, e))?;
        let part_len = file
            .metadata()
            .map_err(|e| StoreError::io("inspect", &part, e))?
            .len();
        let (journal_exists, recorded) = match fs::read(&journal) {
            Ok(bytes) => (true, journal::decode(&bytes).ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (false, None),
            Err(e) => return Err(StoreError::io("read journal", &journal, e)),
        };
        let trusted = recorded.and_then(|(jid, jsize, ranges)| {
            let end = ranges.iter().next_back().map_or(0, |r| r.end);
            let size_ok = match (size, jsize) {
                (Some(s), UNKNOWN_SIZE) => end <= s,
                (Some(s), j) => j == s,
                (None, _) => true,
            };
            let known = size.or((jsize != UNKNOWN_SIZE).then_some(jsize));
            (jid == *id && size_ok && end <= part_len).then_some((known, ranges))
        });
        let (size, received) = match trusted {
            Some(t) => t,
            None => {
                // Forget the journal before anything else is written, so no crash can pair it
                // with bytes it never vouched for. The bytes stay, unverified.
                if journal_exists {
                    fs::remove_file(&journal)
                        .map_err(|e| StoreError::io("remove stale journal", &journal, e))?;
                    sync_dir(&self.root)?;
                }
                (size, RangeSet::new())
            }
        };
        let unverified = part_len > received.covered();
        let partial = PartialFile {
            file,
            id: *id,
            size,
            received: received.clone(),
            dir: self.root.clone(),
            final_path: self.path_of(id),
            part,
            journal,
            tmp,
            unjournaled: 0,
            interval: JOURNAL_INTERVAL_BYTES,
            durable: true,
            runs: WriteRuns::default(),
            syncer: None,
            last_journal: Instant::now(),
            writes_since_clock: 0,
            unverified,
            _lock: lock,
        };
        Ok((partial, received))
    }

    /// Copies the finished object `id` to `dest` atomically: the bytes go to a temporary file
    /// next to `dest`, are checked against the MD5, synced, and renamed over `dest`. Call it to
    /// install a cached map where the game loads maps from.
    ///
    /// Only a regular file is ever replaced: a symbolic link at `dest` is followed (the file it
    /// points to is replaced, the link stays), and a directory, device, FIFO or socket is refused
    /// with [`StoreError::NotAFile`] before anything is written.
    pub fn copy_out(&self, id: &ObjectId, dest: &Path) -> Result<(), StoreError> {
        self.copy_out_within(id, dest, None)
    }

    /// [`copy_out`](Self::copy_out) for a file installed inside `within` (a bundle's
    /// directory): a symbolic link at `dest` is followed only to a target inside `within`.
    pub fn copy_out_within(
        &self,
        id: &ObjectId,
        dest: &Path,
        within: Option<&Path>,
    ) -> Result<(), StoreError> {
        let dest = &resolve_target(dest, within)?;
        let src_path = self.path_of(id);
        let mut src = match File::open(&src_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotInCache {
                    id: *id,
                    path: src_path,
                })
            }
            Err(e) => return Err(StoreError::io("open", &src_path, e)),
        };
        let (parent, tmp) = temp_beside(dest)?;
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| StoreError::io("create", &tmp, e))?;
        let result = (|| {
            let mut hasher = id.hasher();
            let mut buf = vec![0u8; BUF_LEN];
            loop {
                let n = match src.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(StoreError::io("read", &src_path, e)),
                };
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n])
                    .map_err(|e| StoreError::io("write", &tmp, e))?;
            }
            let actual = hasher.finish();
            if actual != *id {
                return Err(StoreError::Corrupt {
                    path: src_path.clone(),
                    expected: *id,
                    actual,
                });
            }
            out.sync_all()
                .map_err(|e| StoreError::io("sync", &tmp, e))?;
            fs::rename(&tmp, dest).map_err(|e| StoreError::io("rename into place", dest, e))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result?;
        sync_dir(&parent)
    }
}

impl Cache {
    /// Puts the entry `id`, which this process has just verified (a download that finished),
    /// at `dest` without copying a byte: a hard link at a temporary name beside `dest`, renamed
    /// over it, so `dest` is replaced atomically as with [`copy_out`](Self::copy_out) (and
    /// resolved the same way: a symbolic link is followed, anything but a regular file is
    /// refused). The entry's record is written again, since linking changes its ctime.
    ///
    /// Returns false, having changed nothing, when no link can be made (`dest` is on another
    /// file system, or one without hard links): call `copy_out` then. The entry and `dest`
    /// share their bytes afterwards; writing into one in place changes the other, which the
    /// entry's record notices ([`lookup`](Self::lookup) hashes it again and sets it aside if
    /// it no longer matches).
    pub fn link_out(&self, id: &ObjectId, dest: &Path) -> Result<bool, StoreError> {
        let dest = &resolve_target(dest, None)?;
        let src = self.path_of(id);
        let (parent, tmp) = temp_beside(dest)?;
        if fs::hard_link(&src, &tmp).is_err() {
            return Ok(false);
        }
        let renamed = fs::rename(&tmp, dest);
        // Renaming a link over another link to the same file succeeds and does nothing: the
        // temporary name is still there then.
        let _ = fs::remove_file(&tmp);
        renamed.map_err(|e| StoreError::io("rename into place", dest, e))?;
        sync_dir(&parent)?;
        if let Ok(file) = File::open(&src) {
            self.record_verified(id, &file, &src);
        }
        Ok(true)
    }
}

/// The directory of `dest` and a fresh temporary name in it, for writing a file that is then
/// renamed over `dest`.
fn temp_beside(dest: &Path) -> Result<(PathBuf, PathBuf), StoreError> {
    let name = dest.file_name().ok_or_else(|| {
        StoreError::io(
            "copy to",
            dest,
            io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
        )
    })?;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".tmp-{:016x}", crate::random::random_u64()));
    let tmp = parent.join(tmp_name);
    Ok((parent, tmp))
}

/// A partial download: a [`ChunkSink`] over `<hex>.part` that keeps the resume journal.
///
/// Get it from [`Cache::begin`] and give it to the core's receiver. It remembers which byte
/// ranges were written and rewrites `<hex>.journal` (temporary file, then rename) after every
/// [`JOURNAL_INTERVAL_BYTES`] of new data and on [`checkpoint`](Self::checkpoint). The journal is
/// written only after the bytes it lists were written, so after a kill it is still true. When the
/// receiver reports `Completed`, take the sink back (`into_sink`) and call
/// [`finalize`](Self::finalize); when it fails or the game quits, call `checkpoint`.
/// Dropping it without a checkpoint loses at most the progress since the last journal update.
/// Contiguous bytes are gathered into runs of up to 256 KiB before one write, so a disk error may
/// surface on a later `write_at`, `checkpoint` or `finalize` than the one that handed the bytes.
#[derive(Debug)]
pub struct PartialFile {
    file: File,
    id: ObjectId,
    size: Option<u64>,
    received: RangeSet,
    dir: PathBuf,
    part: PathBuf,
    journal: PathBuf,
    tmp: PathBuf,
    final_path: PathBuf,
    unjournaled: u64,
    interval: u64,
    durable: bool,
    /// Received bytes not yet written.
    runs: WriteRuns,
    /// The thread that makes automatic journal updates, if any.
    syncer: Option<Syncer>,
    /// When the journal was last brought up to date (or the download began).
    last_journal: Instant,
    /// Writes since the clock was last read for [`JOURNAL_INTERVAL_TIME`].
    writes_since_clock: u32,
    /// True while the file may hold bytes the have-set does not vouch for (no or a damaged
    /// journal, a damaged cache entry set aside, or a kill after the last journal update).
    unverified: bool,
    /// This download's lock on the object; last, so that it is released after everything
    /// else is closed (and a partial that holds nothing is removed then).
    _lock: EntryLock,
}

/// Where a partial download's journal goes.
#[derive(Debug, Clone)]
struct JournalPaths {
    part: PathBuf,
    tmp: PathBuf,
    journal: PathBuf,
}

/// Syncs `file`'s data (if `durable`), then replaces the journal with `bytes` (temporary file,
/// synced if `durable`, renamed over the old one): the journal never lists bytes the disk may
/// not hold.
fn write_journal(
    file: &File,
    durable: bool,
    paths: &JournalPaths,
    bytes: &[u8],
) -> Result<(), StoreError> {
    if durable {
        file.sync_data()
            .map_err(|e| StoreError::io("sync", &paths.part, e))?;
    }
    let written = File::create(&paths.tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        Ok(())
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&paths.tmp);
        return Err(StoreError::io("write journal", &paths.tmp, e));
    }
    fs::rename(&paths.tmp, &paths.journal)
        .map_err(|e| StoreError::io("replace journal", &paths.journal, e))
}

/// A thread that runs [`write_journal`] for automatic journal updates, one at a time.
#[derive(Debug)]
struct Syncer {
    jobs: std::sync::mpsc::SyncSender<Vec<u8>>,
    done: std::sync::mpsc::Receiver<Result<(), StoreError>>,
    busy: bool,
}

impl Syncer {
    fn start(file: File, durable: bool, paths: JournalPaths) -> Self {
        let (jobs, todo) = std::sync::mpsc::sync_channel::<Vec<u8>>(1);
        let (finished, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for bytes in todo {
                if finished
                    .send(write_journal(&file, durable, &paths, &bytes))
                    .is_err()
                {
                    break;
                }
            }
        });
        Syncer {
            jobs,
            done,
            busy: false,
        }
    }

    /// True when no update is running; the error of one that finished since, if it failed.
    fn is_idle(&mut self) -> Result<bool, StoreError> {
        if self.busy {
            match self.done.try_recv() {
                Ok(result) => {
                    self.busy = false;
                    result?;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(false),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    self.busy = false;
                    return Err(stopped());
                }
            }
        }
        Ok(true)
    }

    fn submit(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        self.jobs
            .send(bytes)
            .map_err(|_| io::Error::other("journal thread stopped"))?;
        self.busy = true;
        Ok(())
    }

    /// Waits for the running update, if any; its error if it failed.
    fn wait(&mut self) -> Result<(), StoreError> {
        if !self.busy {
            return Ok(());
        }
        self.busy = false;
        self.done.recv().map_err(|_| stopped())?
    }
}

impl Drop for Syncer {
    /// Waits for a running update, so that no journal is renamed into place after the partial
    /// file (and its lock) is gone.
    fn drop(&mut self) {
        let _ = self.wait();
    }
}

fn stopped() -> StoreError {
    StoreError::io(
        "update journal",
        Path::new("(journal thread)"),
        io::Error::other("journal thread stopped"),
    )
}

impl PartialFile {
    /// Records the object's size once the offer arrived (the `Started` event), so the journal
    /// records it and [`finalize`](Self::finalize) can check completeness. A size different from
    /// the one the journal recorded discards what was received (it cannot be the same object).
    pub fn set_size(&mut self, size: u64) {
        if self.size.is_some_and(|s| s != size) || self.received.max().is_some_and(|m| m >= size) {
            self.received.clear();
        }
        self.size = Some(size);
    }

    /// The id of the first `size` bytes written, computed with `like`'s algorithm (reading
    /// them back). For a download whose transfers did not hash as they went (multi-source):
    /// compare it with the object's id before [`finalize`](Self::finalize).
    pub fn digest(&mut self, like: &ObjectId, size: u64) -> Result<ObjectId, StoreError> {
        self.write_run()
            .map_err(|e| StoreError::io("write", &self.part, e))?;
        super::id_of_file(&self.file, size, like).map_err(|e| StoreError::io("read", &self.part, e))
    }

    /// Checks that the file system can hold the rest of the object (its size, known from the
    /// journal or [`set_size`](Self::set_size), less what is already here). Call it after
    /// `set_size`: a server may offer any size up to the receiver's `max_object_size`, and a
    /// download the disk cannot hold should stop before it fills the disk. On
    /// [`StoreError::NoSpace`], cancel the transfer and [`checkpoint`](Self::checkpoint).
    /// Where free space cannot be asked (not Unix) it passes.
    pub fn ensure_space(&self) -> Result<(), StoreError> {
        let Some(size) = self.size else {
            return Ok(());
        };
        let needed = size.saturating_sub(self.received.covered());
        match super::free_space(&self.file) {
            Some(free) if needed > free => Err(StoreError::NoSpace {
                path: self.part.clone(),
                needed,
                free,
            }),
            _ => Ok(()),
        }
    }

    /// The object's size, if known (from the journal or [`set_size`](Self::set_size)); if it
    /// is `None` when the transfer completes, call `set_size` before [`finalize`](Self::finalize).
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// A second handle on the partial file, for another thread to read what was written (the
    /// multi-source digest does, on its own core): call [`write_out`](Self::write_out) for a
    /// range before that thread reads it.
    pub(crate) fn reader(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// Writes out the received bytes of `range` still gathered in memory.
    pub(crate) fn write_out(&mut self, range: Range<u64>) -> io::Result<()> {
        self.runs.flush(&self.file, range)
    }

    /// Byte ranges written so far (what the next journal will list), for progress displays.
    pub fn received(&self) -> &RangeSet {
        &self.received
    }

    /// Whether to fsync the data before each journal update (default true). Turning it off is
    /// faster and still survives a killed process, but not a power cut.
    pub fn set_durable(&mut self, durable: bool) -> Result<(), StoreError> {
        self.durable = durable;
        if self.syncer.is_some() {
            self.set_background_journal(true)?; // restart it with the new setting
        }
        Ok(())
    }

    /// How many new bytes to write between automatic journal updates (default
    /// [`JOURNAL_INTERVAL_BYTES`]; at least 1).
    pub fn set_journal_interval(&mut self, bytes: u64) {
        self.interval = bytes.max(1);
    }

    /// Writes the journal now. Call it when the transfer failed or the game shuts down, so that
    /// the next [`Cache::begin`] resumes from here.
    pub fn checkpoint(&mut self) -> Result<(), StoreError> {
        if let Some(syncer) = &mut self.syncer {
            syncer.wait()?;
        }
        self.write_run()
            .map_err(|e| StoreError::io("write", &self.part, e))?;
        let bytes = journal::encode(&self.id, self.size.unwrap_or(UNKNOWN_SIZE), &self.received);
        write_journal(&self.file, self.durable, &self.paths(), &bytes)?;
        self.unjournaled = 0;
        self.last_journal = Instant::now();
        Ok(())
    }

    /// True when the partial file may hold bytes beyond what [`received`](Self::received)
    /// vouches for: it was left without a (valid) journal, by a kill between two journal
    /// updates, or it is a damaged cache entry set aside ([`Cache::set_aside_damaged`]). Such
    /// bytes are never trusted as they are; [`verify_blocks`](Self::verify_blocks) keeps those
    /// that match the object's manifest.
    pub fn has_unverified(&self) -> bool {
        self.unverified
    }

    /// Checks every block of the object in the file against `manifest` (the block's strong
    /// hash) and makes the have-set exactly the blocks that match: unverified bytes that match
    /// are kept, held bytes that do not (a chunk altered on its way, bits flipped on the disk)
    /// are dropped for downloading again. Writes the journal. Call it with the object's
    /// manifest (already checked by `Manifest::decode`) after a digest mismatch, then resume
    /// the download with the new [`received`](Self::received) as the have-set.
    pub fn verify_blocks(&mut self, manifest: &Manifest) -> Result<BlockCheck, StoreError> {
        self.check_blocks(manifest, true)
    }

    /// Like [`verify_blocks`](Self::verify_blocks), but trusts what the have-set already holds
    /// and checks only the other blocks: call it when [`has_unverified`](Self::has_unverified)
    /// is true (a kill after the last journal update, a lost journal, a damaged cache entry set
    /// aside) to keep the unverified bytes that match.
    pub fn salvage(&mut self, manifest: &Manifest) -> Result<BlockCheck, StoreError> {
        self.check_blocks(manifest, false)
    }

    fn check_blocks(
        &mut self,
        manifest: &Manifest,
        recheck: bool,
    ) -> Result<BlockCheck, StoreError> {
        self.write_run()
            .map_err(|e| StoreError::io("write", &self.part, e))?;
        self.set_size(manifest.size);
        let on_disk = self
            .file
            .metadata()
            .map_err(|e| StoreError::io("inspect", &self.part, e))?
            .len();
        let before = self.received.covered();
        let mut good = RangeSet::new();
        let mut buf = vec![0u8; manifest.block_size as usize];
        for i in 0..manifest.blocks.len() {
            let range = manifest.block_range(i);
            if range.end > on_disk {
                break;
            }
            if !recheck && self.received.contains_range(range.clone()) {
                good.insert(range);
                continue;
            }
            let bytes = &mut buf[..(range.end - range.start) as usize];
            read_exact_at(&self.file, bytes, range.start)
                .map_err(|e| StoreError::io("read", &self.part, e))?;
            if manifest.block_matches(i, bytes) {
                good.insert(range);
            }
        }
        if !recheck {
            // Held bytes of partly held blocks stay held.
            for r in self.received.iter() {
                good.insert(r);
            }
        }
        let mut both = good.clone();
        let missing: Vec<_> = self.received.gaps(0..manifest.size).collect();
        for gap in missing {
            both.remove(gap);
        }
        let check = BlockCheck {
            held: good.covered(),
            dropped: before.saturating_sub(both.covered()),
            gained: good.covered().saturating_sub(both.covered()),
        };
        self.received = good;
        self.unverified = false;
        self.checkpoint()?;
        Ok(check)
    }

    /// Updates the journal from the background thread if there is one and it is idle (else
    /// later), or now.
    fn auto_checkpoint(&mut self) -> io::Result<()> {
        let Some(syncer) = &mut self.syncer else {
            return self.checkpoint().map_err(io::Error::other);
        };
        if !syncer.is_idle().map_err(io::Error::other)? {
            return Ok(()); // the previous update is still syncing: try again on a later write
        }
        self.write_run()?;
        let bytes = journal::encode(&self.id, self.size.unwrap_or(UNKNOWN_SIZE), &self.received);
        if let Some(syncer) = &mut self.syncer {
            syncer.submit(bytes)?;
        }
        self.unjournaled = 0;
        self.last_journal = Instant::now();
        Ok(())
    }

    fn paths(&self) -> JournalPaths {
        JournalPaths {
            part: self.part.clone(),
            tmp: self.tmp.clone(),
            journal: self.journal.clone(),
        }
    }

    /// Makes the automatic journal updates (every [`JOURNAL_INTERVAL_BYTES`]) from a thread of
    /// its own (true) instead of inside `write_at` (false, the default). With durability on,
    /// each update waits for the disk (an fsync of the data, then of the journal); the thread
    /// lets that wait overlap the transfer instead of stalling the thread that receives. A game
    /// that would rather not have the thread leaves it off. Explicit
    /// [`checkpoint`](Self::checkpoint)s and [`finalize`](Self::finalize) wait for it first.
    pub fn set_background_journal(&mut self, on: bool) -> Result<(), StoreError> {
        if let Some(syncer) = &mut self.syncer {
            syncer.wait()?;
        }
        self.syncer = None;
        if on {
            let file = self
                .file
                .try_clone()
                .map_err(|e| StoreError::io("open partial download", &self.part, e))?;
            self.syncer = Some(Syncer::start(file, self.durable, self.paths()));
        }
        Ok(())
    }

    /// Publishes the finished download: fsyncs `<hex>.part` (its data), renames it to `<hex>` atomically,
    /// fsyncs the directory and removes the journal. Returns the final path, which the game
    /// loads. Call it only after the receiver reported `Completed` (that is where the MD5 was
    /// checked; this verifies nothing itself). If the size is known and a byte is missing it
    /// refuses with [`StoreError::Incomplete`]; on any error the partial stays resumable.
    pub fn finalize(mut self) -> Result<PathBuf, StoreError> {
        if let Some(syncer) = &mut self.syncer {
            syncer.wait()?;
        }
        self.write_run()
            .map_err(|e| StoreError::io("write", &self.part, e))?;
        if let Some(size) = self.size {
            let have = self.received.covered();
            if size > 0 && !self.received.contains_range(0..size) {
                return Err(StoreError::Incomplete {
                    path: self.part,
                    have,
                    size,
                });
            }
            self.file
                .set_len(size)
                .map_err(|e| StoreError::io("truncate", &self.part, e))?;
        }
        // The data and the size (what reading it back needs) must be durable before the rename
        // is; timestamps need not be. Usually a background journal update already synced
        // everything when the last byte arrived, and this returns at once.
        self.file
            .sync_data()
            .map_err(|e| StoreError::io("sync", &self.part, e))?;
        fs::rename(&self.part, &self.final_path)
            .map_err(|e| StoreError::io("rename into place", &self.final_path, e))?;
        // What the entry looks like now that it is verified, so that a hit can tell it is
        // unchanged without hashing it again (`Cache::lookup`).
        if let Ok(meta) = self.file.metadata() {
            let record = self.dir.join(format!("{}{VERIFIED}", self.id.to_hex()));
            let _ = fs::write(record, Stamp::of(&meta).encode());
        }
        sync_dir(&self.dir)?;
        for stale in [&self.journal, &self.tmp] {
            match fs::remove_file(stale) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(StoreError::io("remove journal", stale, e))
                }
                _ => {}
            }
        }
        Ok(self.final_path)
    }

    /// Throws the partial download away (`<hex>.part` and its journal): call it when the bytes
    /// cannot be trusted, for example after the receiver reported a digest mismatch. Resuming
    /// from them would fail the same way every time.
    pub fn discard(mut self) -> Result<(), StoreError> {
        if let Some(syncer) = &mut self.syncer {
            let _ = syncer.wait(); // no journal update may land after the removal
        }
        drop(self.file);
        for path in [&self.part, &self.journal, &self.tmp] {
            match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(StoreError::io("remove", path, e))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// What [`PartialFile::verify_blocks`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockCheck {
    /// Bytes of the object the partial file now holds, every block matching the manifest.
    pub held: u64,
    /// Bytes the have-set listed that did not match (they will be downloaded again).
    pub dropped: u64,
    /// Bytes that were on disk unverified and matched (they will not be downloaded).
    pub gained: u64,
}

impl PartialFile {
    /// True when bytes arrived since the journal was last written and
    /// [`JOURNAL_INTERVAL_TIME`] has passed (the clock is read every few writes only).
    fn journal_due(&mut self) -> bool {
        if self.unjournaled == 0 {
            return false;
        }
        self.writes_since_clock += 1;
        if self.writes_since_clock < CLOCK_EVERY_WRITES {
            return false;
        }
        self.writes_since_clock = 0;
        self.last_journal.elapsed() >= JOURNAL_INTERVAL_TIME
    }

    /// Writes the gathered runs of received bytes to the file.
    fn write_run(&mut self) -> io::Result<()> {
        self.runs.flush(&self.file, 0..u64::MAX)
    }
}

impl ChunkSink for PartialFile {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&end| self.size.is_none_or(|s| end <= s))
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "write past the object's end")
            })?;
        if data.is_empty() {
            return Ok(());
        }
        self.runs.write(&self.file, offset, data)?;
        self.unjournaled = self
            .unjournaled
            .saturating_add(self.received.insert(offset..end));
        // Complete: start syncing now (in the background where there is a journal thread), so
        // that `finalize`, which comes after the receiver's hash check, finds little to sync.
        let complete = self
            .size
            .is_some_and(|s| self.received.contains_range(0..s));
        if self.unjournaled >= self.interval
            || (complete && self.unjournaled > 0)
            || self.journal_due()
        {
            self.auto_checkpoint()?;
        }
        Ok(())
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.runs
            .flush(&self.file, offset..offset.saturating_add(buf.len() as u64))?;
        read_exact_at(&self.file, buf, offset)
    }
}

/// Runs of received bytes gathered in memory before one write each. Chunks arrive about
/// 1.2 KB at a time, and one system call each would cost more than the copy; a multi-source
/// download writes into several places of one file at once (a piece per source and more), so
/// up to [`MAX_RUNS`] runs are gathered side by side.
#[derive(Debug, Default)]
struct WriteRuns {
    runs: Vec<Run>,
    /// Buffers of runs written out, for the next runs.
    spare: Vec<Vec<u8>>,
    /// Counts writes, to find the run written longest ago.
    clock: u64,
}

#[derive(Debug)]
struct Run {
    at: u64,
    bytes: Vec<u8>,
    last_write: u64,
}

impl Run {
    fn end(&self) -> u64 {
        self.at + self.bytes.len() as u64
    }
}

/// Runs a [`PartialFile`] gathers at once.
const MAX_RUNS: usize = 4;

impl WriteRuns {
    /// Stores `data` at `offset`: appended to a run it continues, else in a run of its own
    /// (the run written longest ago is written out to make room). Runs it overlaps are written
    /// out first, so that the newer bytes land last.
    fn write(&mut self, file: &File, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset + data.len() as u64;
        self.flush(file, offset..end)?;
        if data.len() >= WRITE_RUN_BYTES {
            return write_all_at(file, data, offset);
        }
        self.clock += 1;
        let clock = self.clock;
        if let Some(run) = self
            .runs
            .iter_mut()
            .find(|r| r.end() == offset && r.bytes.len() + data.len() <= WRITE_RUN_BYTES)
        {
            run.bytes.extend_from_slice(data);
            run.last_write = clock;
            return Ok(());
        }
        if self.runs.len() >= MAX_RUNS {
            if let Some(oldest) = (0..self.runs.len()).min_by_key(|&i| self.runs[i].last_write) {
                self.write_out(file, oldest)?;
            }
        }
        let bytes = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(WRITE_RUN_BYTES));
        let mut run = Run {
            at: offset,
            bytes,
            last_write: clock,
        };
        run.bytes.extend_from_slice(data);
        self.runs.push(run);
        Ok(())
    }

    /// Writes out every run that overlaps `range`. On an error the runs not yet written stay.
    fn flush(&mut self, file: &File, range: Range<u64>) -> io::Result<()> {
        let mut i = 0;
        while i < self.runs.len() {
            let run = &self.runs[i];
            if run.at < range.end && range.start < run.end() {
                self.write_out(file, i)?;
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// Writes run `i` to the file and drops it (kept if the write fails).
    fn write_out(&mut self, file: &File, i: usize) -> io::Result<()> {
        write_all_at(file, &self.runs[i].bytes, self.runs[i].at)?;
        let mut bytes = self.runs.swap_remove(i).bytes;
        bytes.clear();
        self.spare.push(bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_name_is_a_safe_path_directly_under_the_root() {
        let cache = Cache {
            root: PathBuf::from("root"),
        };
        for id in [
            ObjectId::Md5([0; 16]),
            ObjectId::Md5([0xff; 16]),
            ObjectId::md5_of(b"map"),
        ] {
            for suffix in [OBJECT, PART, JOURNAL, JOURNAL_TMP, VERIFIED, LOCK] {
                let name = format!("{}{suffix}", id.to_hex());
                assert!(SafePath::parse(&name).is_ok(), "{name:?} rejected");
                assert_eq!(cache.entry(&id, suffix), Path::new("root").join(&name));
            }
        }
        assert_eq!(
            cache.path_of(&ObjectId::Md5([0xab; 16])),
            Path::new("root").join("ab".repeat(16))
        );
    }

    /// Writes from several interleaved streams, overlapping rewrites with other bytes (a liar's
    /// piece fetched again), large writes and reads in between: the file always ends up with the
    /// newest bytes at every offset.
    #[test]
    fn write_runs_keep_the_newest_bytes_whatever_the_order() {
        for seed in 1..=20u64 {
            let path = std::env::temp_dir().join(format!(
                "udpferry-runs-{}-{seed}-{}",
                std::process::id(),
                crate::random::random_u64()
            ));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            const SIZE: usize = 3 << 20;
            file.set_len(SIZE as u64).unwrap();
            let mut model = vec![0u8; SIZE];
            let mut runs = WriteRuns::default();
            let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut next = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            // Six streams, each moving forward chunk by chunk from its own place.
            let mut at: Vec<usize> = (0..6).map(|i| i * SIZE / 6).collect();
            for step in 0..20_000u32 {
                let r = next();
                let len = match r % 100 {
                    0 => WRITE_RUN_BYTES + (r as usize >> 8) % 1000,
                    1..=3 => 1 + (r as usize >> 8) % 5000,
                    _ => 1166,
                };
                let stream = (r >> 40) as usize % at.len();
                if r % 97 == 5 {
                    at[stream] = (r as usize >> 16) % SIZE; // a jump: rewrites what is there
                }
                let start = at[stream].min(SIZE - 1);
                let end = (start + len).min(SIZE);
                let data: Vec<u8> = (start..end).map(|i| (i as u64 ^ step as u64) as u8).collect();
                runs.write(&file, start as u64, &data).unwrap();
                model[start..end].copy_from_slice(&data);
                at[stream] = if end == SIZE { 0 } else { end };
                if r % 211 == 7 {
                    runs.flush(&file, start as u64..end as u64 + 10_000).unwrap();
                }
            }
            runs.flush(&file, 0..u64::MAX).unwrap();
            assert!(runs.runs.is_empty());
            let mut on_disk = vec![0u8; SIZE];
            let n = read_exact_at(&file, &mut on_disk, 0).map(|_| SIZE);
            drop(file);
            let _ = fs::remove_file(&path);
            n.unwrap();
            let first_diff = (0..SIZE).find(|&i| on_disk[i] != model[i]);
            assert_eq!(first_diff, None, "seed {seed}: the file differs from the model");
        }
    }
}
