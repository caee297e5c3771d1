//! One download per object per cache: an advisory lock on `<hex>.lock`, held by whoever writes
//! the object's partial download, in this process or another.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};

use super::cache::{JOURNAL, JOURNAL_TMP, LOCK, PART};
use super::{Cache, StoreError};
use crate::id::ObjectId;

/// Attempts at a lock file that its holder removed between our open and our lock.
const REOPENS: usize = 8;

/// The right to write one object's partial download (`<hex>.part` and its journal) in a cache:
/// an advisory lock on `<hex>.lock` (`flock` on Unix, `LockFileEx` on Windows), from
/// [`Cache::try_lock`]. Every [`PartialFile`](super::PartialFile) holds one, so two downloads
/// of the same object into one cache (threads or processes) never share files: the second
/// waits for the first, then finds the finished object.
///
/// Dropping it releases the lock. Before that, if the object's partial download holds no bytes
/// at all (nothing arrived: the server did not have it, or nothing answered), the empty
/// `<hex>.part` and its journal are removed, since there is nothing to resume; and on Unix the
/// lock file itself is removed. A process that dies releases its locks with it; the lock file
/// it leaves is removed by the next holder or by [`Cache::clean`].
#[derive(Debug)]
pub struct EntryLock {
    id: ObjectId,
    root: PathBuf,
    path: PathBuf,
    /// The locked file; `None` where the file system cannot lock (then nothing is excluded,
    /// as before locks existed, and nothing is tidied).
    file: Option<File>,
}

impl EntryLock {
    /// The object whose entry this locks.
    pub fn id(&self) -> &ObjectId {
        &self.id
    }

    /// The cache directory it belongs to.
    pub(super) fn root(&self) -> &Path {
        &self.root
    }
}

impl Cache {
    /// Takes the lock on `id`'s entry if no other download of it (in this process or another)
    /// holds it: `Ok(None)` means one does; wait a little and try again, or give up. Take it
    /// before looking the object up when the lookup decides whether to download, and pass it to
    /// [`begin_locked`](Self::begin_locked); [`begin`](Self::begin) takes it itself.
    ///
    /// On a file system that cannot lock (the call reports `Unsupported`) this returns a lock
    /// that excludes nothing.
    pub fn try_lock(&self, id: &ObjectId) -> Result<Option<EntryLock>, StoreError> {
        let path = self.entry(id, LOCK);
        for _ in 0..REOPENS {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| StoreError::io("open lock file", &path, e))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => return Ok(None),
                Err(TryLockError::Error(e)) if e.kind() == io::ErrorKind::Unsupported => {
                    return Ok(Some(EntryLock {
                        id: *id,
                        root: self.root().into(),
                        path,
                        file: None,
                    }));
                }
                Err(TryLockError::Error(e)) => {
                    return Err(StoreError::io("lock", &path, e));
                }
            }
            // The holder before us removes the file before it unlocks: if we locked a file
            // that is no longer under this name, someone may already lock the new one.
            if still_named(&file, &path) {
                return Ok(Some(EntryLock {
                    id: *id,
                    root: self.root().into(),
                    path,
                    file: Some(file),
                }));
            }
        }
        Ok(None)
    }
}

/// Whether `path` still names the open `file` (same device and inode).
#[cfg(unix)]
fn still_named(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Elsewhere lock files are never removed (see [`EntryLock`]'s drop), so the name always
/// leads to the file that was locked.
#[cfg(not(unix))]
fn still_named(_: &File, _: &Path) -> bool {
    true
}

impl Drop for EntryLock {
    fn drop(&mut self) {
        let Some(file) = self.file.take() else {
            return;
        };
        let hex = self.id.to_hex();
        let part = self.root.join(format!("{hex}{PART}"));
        // Nothing arrived: nothing to resume, and nothing to leave in the cache.
        if fs::metadata(&part).is_ok_and(|m| m.is_file() && m.len() == 0) {
            for suffix in [PART, JOURNAL, JOURNAL_TMP] {
                let _ = fs::remove_file(self.root.join(format!("{hex}{suffix}")));
            }
        }
        // Removed while still locked, so that a waiter that opened it before notices (it
        // checks the name still leads to what it locked). Where that check is impossible the
        // empty file stays.
        if cfg!(unix) {
            let _ = fs::remove_file(&self.path);
        }
        drop(file);
    }
}

/// Whether a running download holds the lock file at `path` (false when there is none). Takes
/// and releases the lock at once if it is free, without removing or tidying anything.
pub(super) fn is_held(path: &Path) -> bool {
    match File::open(path) {
        Ok(file) => matches!(file.try_lock(), Err(TryLockError::WouldBlock)),
        Err(_) => false,
    }
}
