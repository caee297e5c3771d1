//! Following the served directory: a rescan walks it with `stat` calls only and hashes just the
//! files that are new or whose stamp moved, on a thread of its own when a server runs it
//! ([`Job`]), so no request ever waits for a hash. The [`ContentStore`](super::ContentStore)
//! applies what it finds as [`Update`]s and reports each as an [`IndexChange`].

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, Metadata};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

use super::content::{BundleInfo, ObjectInfo};
use super::output::node_kind;
use super::stamp::Stamp;
use super::{hash_file, FileIds, SafePath, StoreError};

/// Updates a running rescan may queue before it waits for the store to take them: memory stays
/// bounded however many files change.
const UPDATES_QUEUED: usize = 64;

/// Updates one [`Job::take`] hands over at most, so one server turn stays short.
const UPDATES_PER_TAKE: usize = 1024;

/// A directory entry the store does not serve, and why. Displays as `<path>: <reason>`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SkippedFile {
    /// Its path relative to the store's root (it need not be a valid `SafePath`: a bad name is
    /// one reason to skip an entry).
    pub path: PathBuf,
    /// Why it is not served, in words: "could not open it: Permission denied (os error 13)",
    /// "it is a FIFO (named pipe), not a regular file", ...
    pub reason: String,
}

impl std::fmt::Display for SkippedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

/// One change a rescan made to what a [`ContentStore`](super::ContentStore) serves. Displays as
/// the line `udpferry serve -v` prints for it (ARCHITECTURE section 8).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IndexChange {
    /// A new file, or one whose bytes changed, is now served under these ids:
    /// `indexed <md5> <bytes> <path>`.
    Indexed(ObjectInfo),
    /// A file is no longer served (deleted, replaced by something that is not a regular file,
    /// or now skipped): `removed <path>`.
    Removed(PathBuf),
    /// An entry is not served, for the reason given: `skipped <path>: <reason>`. Reported when
    /// it is first skipped or its reason changes, not on every rescan. A warning.
    Skipped(SkippedFile),
    /// A bundle is new or its listing changed: `indexed bundle <md5> <files> <dir>/`.
    Bundle(BundleInfo),
    /// A bundle is no longer served (its directory holds no served file):
    /// `removed bundle <dir>/`.
    BundleRemoved(SafePath),
    /// The rescan could not read the root directory; the index is kept as it was:
    /// `rescan failed: <error>`. Reported once until a rescan succeeds again. A warning.
    Failed(String),
}

impl IndexChange {
    /// True for what an operator should see even when not asking for details:
    /// [`Skipped`](Self::Skipped) and [`Failed`](Self::Failed).
    pub fn is_warning(&self) -> bool {
        matches!(self, IndexChange::Skipped(_) | IndexChange::Failed(_))
    }
}

impl std::fmt::Display for IndexChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IndexChange::Indexed(o) => {
                write!(f, "indexed {} {} {}", o.id, o.size, o.path.display())
            }
            IndexChange::Removed(path) => write!(f, "removed {}", path.display()),
            IndexChange::Skipped(s) => write!(f, "skipped {s}"),
            IndexChange::Bundle(b) => {
                write!(f, "indexed bundle {} {} {}/", b.id, b.files, b.dir)
            }
            IndexChange::BundleRemoved(dir) => write!(f, "removed bundle {dir}/"),
            IndexChange::Failed(message) => write!(f, "rescan failed: {message}"),
        }
    }
}

/// What the index held when a rescan started: all a rescan needs to decide, by `stat` alone,
/// which files to hash.
#[derive(Debug, Default)]
pub(crate) struct Known {
    /// Indexed files: their stamp when hashed, and whether that hash was "racy" (section 6.2).
    pub(crate) files: HashMap<SafePath, (Stamp, bool)>,
    /// Skipped entries, with the stamp of a regular file that could not be opened or read (it
    /// is tried again only once that moves); `None` for entries tried on every rescan.
    pub(crate) skipped: HashMap<PathBuf, Option<Stamp>>,
}

/// What a rescan found, one path at a time.
#[derive(Debug)]
pub(crate) enum Update {
    /// Hashed: serve `name` under `ids` while its stamp stays `stamp`.
    Indexed {
        name: SafePath,
        ids: FileIds,
        stamp: Stamp,
        /// Hashed too soon after a change to trust the stamp for good: a later rescan hashes it
        /// again once that can settle it.
        racy: bool,
    },
    /// No servable file at `name` any more.
    Removed(SafePath),
    /// Not served, with the reason and the stamp to retry on (see [`Known::skipped`]).
    Skipped {
        path: PathBuf,
        stamp: Option<Stamp>,
        reason: String,
    },
    /// A skipped entry is gone.
    NotSkipped(PathBuf),
    /// The root could not be read: nothing else comes.
    Failed(StoreError),
}

/// What the walk saw.
#[derive(Default)]
struct Found {
    /// Every regular file present, hashed or not.
    files: HashSet<SafePath>,
    /// Skipped entries present (found again, or unchanged since they were skipped).
    skipped: HashSet<PathBuf>,
    /// Files to hash, with the path to open.
    to_hash: Vec<(SafePath, PathBuf)>,
    /// New skips, sent before any hashing.
    skips: Vec<Update>,
}

impl Found {
    fn skip(&mut self, path: PathBuf, stamp: Option<Stamp>, reason: String) {
        self.skipped.insert(path.clone());
        self.skips.push(Update::Skipped {
            path,
            stamp,
            reason,
        });
    }
}

/// One rescan of `root` against `known`: removals and skips first (found by `stat` alone), then
/// one [`Update::Indexed`] per file hashed, in path order. Unchanged files are not read. `emit`
/// returns false when nobody listens any more; `stop` ends the scan at the next file or 1 MiB
/// block. Every file hashed adds one to `hashed`.
pub(crate) fn scan(
    root: &Path,
    known: &Known,
    stop: &AtomicBool,
    hashed: &AtomicU64,
    emit: &mut dyn FnMut(Update) -> bool,
) {
    let mut found = Found::default();
    if let Err(e) = walk(root, known, &mut found) {
        emit(Update::Failed(e));
        return;
    }
    let pending: HashSet<PathBuf> = found.to_hash.iter().map(|(n, _)| n.to_path_buf()).collect();
    // In path order, so that what is reported does not depend on hash maps or the order in
    // which the file system lists a directory.
    let mut removed: Vec<&SafePath> = (known.files.keys())
        .filter(|name| !found.files.contains(*name))
        .collect();
    removed.sort_by(|a, b| Path::new(a.as_str()).cmp(Path::new(b.as_str())));
    found.skips.sort_by(|a, b| match (a, b) {
        (Update::Skipped { path: a, .. }, Update::Skipped { path: b, .. }) => a.cmp(b),
        _ => std::cmp::Ordering::Equal,
    });
    let mut first: Vec<Update> = Vec::new();
    first.extend(removed.into_iter().map(|name| Update::Removed(name.clone())));
    first.extend(
        known
            .skipped
            .keys()
            .filter(|path| !found.skipped.contains(*path) && !pending.contains(*path))
            .map(|path| Update::NotSkipped(path.clone())),
    );
    first.append(&mut found.skips);
    for update in first {
        if !emit(update) {
            return;
        }
    }
    found
        .to_hash
        .sort_by(|a, b| Path::new(a.0.as_str()).cmp(Path::new(b.0.as_str())));
    for (name, abs) in found.to_hash {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        if let Some(update) = hash_one(root, name, &abs, stop, hashed) {
            if !emit(update) {
                return;
            }
        }
    }
}

/// Walks `root` with `stat` calls only. Fails only when `root` itself cannot be read.
fn walk(root: &Path, known: &Known, found: &mut Found) -> Result<(), StoreError> {
    let mut dirs: Vec<Option<SafePath>> = vec![None];
    while let Some(rel_dir) = dirs.pop() {
        let dir = rel_dir
            .as_ref()
            .map_or_else(|| root.to_path_buf(), |d| d.join_to(root));
        let unreadable = |found: &mut Found, e: io::Error| match &rel_dir {
            None => Err(StoreError::io("read directory", &dir, e)),
            Some(_) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Some(d) => {
                let reason = format!("could not read the directory: {e}");
                found.skip(d.to_path_buf(), None, reason);
                Ok(())
            }
        };
        let read = match fs::read_dir(&dir) {
            Ok(read) => read,
            Err(e) => {
                unreadable(found, e)?;
                continue;
            }
        };
        for item in read {
            let item = match item {
                Ok(item) => item,
                Err(e) => {
                    unreadable(found, e)?;
                    break;
                }
            };
            let file_name = item.file_name();
            let shown = rel_dir
                .as_ref()
                .map_or_else(|| PathBuf::from(&file_name), |d| d.to_path_buf().join(&file_name));
            let Some(text) = file_name.to_str() else {
                found.skip(shown, None, "its name is not UTF-8".into());
                continue;
            };
            let rel = match &rel_dir {
                Some(d) => SafePath::parse(&format!("{d}/{text}")),
                None => SafePath::parse(text),
            };
            let rel = match rel {
                Ok(rel) => rel,
                Err(e) => {
                    found.skip(shown, None, format!("its name cannot be served: {e}"));
                    continue;
                }
            };
            let kind = match item.file_type() {
                Ok(kind) => kind,
                Err(e) => {
                    found.skip(shown, None, format!("could not inspect it: {e}"));
                    continue;
                }
            };
            let abs = rel.join_to(root);
            if kind.is_dir() {
                dirs.push(Some(rel));
            } else if kind.is_file() {
                candidate(rel, abs, known, found);
            } else if kind.is_symlink() {
                match follow(root, &abs) {
                    Ok(()) => candidate(rel, abs, known, found),
                    Err(reason) => found.skip(shown, None, reason),
                }
            } else {
                let reason = format!("it is {}, not a regular file", node_kind(&kind));
                found.skip(shown, None, reason);
            }
        }
    }
    Ok(())
}

/// A regular file (or a link to one): hashed unless the index already vouches for it.
fn candidate(name: SafePath, abs: PathBuf, known: &Known, found: &mut Found) {
    let meta = match fs::metadata(&abs) {
        Ok(meta) if meta.is_file() => meta,
        // Replaced or deleted since the directory was read: the next rescan sees what is there.
        Ok(_) => return,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            found.skip(name.to_path_buf(), None, format!("could not inspect it: {e}"));
            return;
        }
    };
    let stamp = Stamp::of(&meta);
    found.files.insert(name.clone());
    if let Some((was, racy)) = known.files.get(&name) {
        // A racy hash is redone once it can settle (its mtime is old enough), not before.
        if *was == stamp && (!racy || stamp.is_racy()) {
            return;
        }
    }
    let path = name.to_path_buf();
    if let Some(Some(was)) = known.skipped.get(&path) {
        if *was == stamp {
            found.skipped.insert(path);
            return;
        }
    }
    found.to_hash.push((name, abs));
}

/// Why the symbolic link at `link` is not served, if it is not (it is served when it leads to a
/// regular file inside `root`).
fn follow(root: &Path, link: &Path) -> Result<(), String> {
    let target = fs::canonicalize(link)
        .map_err(|e| format!("it is a symbolic link that cannot be followed: {e}"))?;
    if !target.starts_with(root) {
        return Err(format!(
            "it is a symbolic link to {}, outside the served directory",
            target.display()
        ));
    }
    match fs::metadata(&target) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(meta) if meta.is_dir() => {
            Err("it is a symbolic link to a directory (links to directories are not followed)".into())
        }
        Ok(meta) => Err(format!(
            "it is a symbolic link to {}, not to a regular file",
            node_kind(&meta.file_type())
        )),
        Err(e) => Err(format!("it is a symbolic link that cannot be followed: {e}")),
    }
}

/// Hashes one file; `None` if it is being rewritten (it shrank while being read) or the scan
/// was stopped.
fn hash_one(
    root: &Path,
    name: SafePath,
    abs: &Path,
    stop: &AtomicBool,
    hashed: &AtomicU64,
) -> Option<Update> {
    let skipped = |reason: String| Update::Skipped {
        path: name.to_path_buf(),
        stamp: fs::metadata(abs).ok().map(|m| Stamp::of(&m)),
        reason,
    };
    let (file, meta) = match open_regular(root, abs) {
        Ok(Some(opened)) => opened,
        Ok(None) => return Some(Update::Removed(name)),
        Err(e) => return Some(skipped(format!("could not open it: {e}"))),
    };
    let stamp = Stamp::of(&meta);
    match hash_file(&file, stamp.size(), stop) {
        Ok(ids) => {
            hashed.fetch_add(1, Ordering::Relaxed);
            let unchanged = file.metadata().is_ok_and(|m| Stamp::of(&m) == stamp);
            Some(Update::Indexed {
                name,
                ids,
                stamp,
                racy: !unchanged || stamp.is_racy(),
            })
        }
        // Shrinking while being read: being rewritten; the next rescan picks it up.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => None,
        Err(e) if e.kind() == io::ErrorKind::Interrupted && stop.load(Ordering::Relaxed) => None,
        Err(e) => Some(skipped(format!("could not read it: {e}"))),
    }
}

/// The target of `link` if it is a regular file inside `root`.
fn inside_root_file(root: &Path, link: &Path) -> Option<PathBuf> {
    let target = fs::canonicalize(link).ok()?;
    (target.starts_with(root) && target.is_file()).then_some(target)
}

/// Opens `path` if it is (or links, inside `root`, to) a regular file; `None` if it is gone or
/// no longer servable.
pub(crate) fn open_regular(root: &Path, path: &Path) -> io::Result<Option<(File, Metadata)>> {
    let target = match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => match inside_root_file(root, path) {
            Some(t) => t,
            None => return Ok(None),
        },
        Ok(m) if m.is_file() => path.to_path_buf(),
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let file = match File::open(&target) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    Ok(meta.is_file().then_some((file, meta)))
}

/// A rescan running on a thread of its own. Dropping it stops the scan (at the next file or
/// 1 MiB block) and waits for the thread.
#[derive(Debug)]
pub(crate) struct Job {
    /// In a `Mutex` only so that the store stays `Sync`; it is reached through `&mut`.
    updates: Option<Mutex<mpsc::Receiver<Update>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Job {
    /// Starts scanning `root` against `known` on a new thread.
    pub(crate) fn start(root: PathBuf, known: Known, hashed: Arc<AtomicU64>) -> io::Result<Job> {
        let (tx, rx) = mpsc::sync_channel(UPDATES_QUEUED);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::Builder::new()
            .name("udpferry-rescan".into())
            .spawn(move || scan(&root, &known, &flag, &hashed, &mut |u| tx.send(u).is_ok()))?;
        Ok(Job {
            updates: Some(Mutex::new(rx)),
            stop,
            thread: Some(thread),
        })
    }

    /// Moves the updates found so far into `out`, without waiting; true once the scan is over
    /// and every update has been taken.
    pub(crate) fn take(&mut self, out: &mut Vec<Update>) -> bool {
        let Some(rx) = self.updates.as_mut() else {
            return true;
        };
        let rx = rx.get_mut().unwrap_or_else(|e| e.into_inner());
        for _ in 0..UPDATES_PER_TAKE {
            match rx.try_recv() {
                Ok(update) => out.push(update),
                Err(mpsc::TryRecvError::Empty) => return false,
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.finish();
                    return true;
                }
            }
        }
        false
    }

    /// Waits for the scan to end, moving every update into `out`.
    pub(crate) fn wait(&mut self, out: &mut Vec<Update>) {
        if let Some(rx) = self.updates.as_mut() {
            let rx = rx.get_mut().unwrap_or_else(|e| e.into_inner());
            out.extend(rx.iter());
        }
        self.finish();
    }

    fn finish(&mut self) {
        self.updates = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver first frees a scan blocked on a full queue.
        self.finish();
    }
}
