//! The file-system side: what the sans-IO [`core`](crate::core) reads from and writes to.
//!
//! - [`ContentStore`] (server): serves every regular file under a directory, named by the MD5 of
//!   its bytes, through [`FileSource`], a [`ChunkSource`](crate::core::ChunkSource) that refuses
//!   to serve a file that changed after it was indexed. Rescans (`stat` only; new and changed
//!   files hashed, on a thread of their own if wanted) follow the directory and report each
//!   [`IndexChange`].
//! - [`Cache`] (client): finished objects as `<root>/<md5hex>`, downloads in progress as
//!   `<md5hex>.part` plus a resume [`journal`] (`<md5hex>.journal`) through [`PartialFile`], a
//!   [`ChunkSink`](crate::core::ChunkSink), one per object at a time (an [`EntryLock`] on
//!   `<md5hex>.lock`); [`Cache::entries`], [`Cache::clean`] and [`Cache::verify_all`] look
//!   after it.
//! - [`bundle`]: listings of named files (each with its size and id) that a server serves for
//!   each top-level subdirectory and a client installs file by file.
//! - [`SafePath`]: the one type for names that reach the file system. Relative, length-limited,
//!   no `..`, no drive letters or Windows device names; both of the above build their file names
//!   through it.
//!
//! # Crash safety
//!
//! A journal only ever lists byte ranges whose `write_at` already succeeded, and it is replaced
//! atomically (write a temporary file, rename it over the old one), so a kill at any moment leaves
//! a journal that tells the truth. A finished object appears under its final name only through an
//! atomic rename after an fsync. Names on disk come from [`ObjectId::to_hex`], never from the
//! network, and pass through [`SafePath`] like every other name the store joins to a root.
//!
//! # Typical use (client)
//!
//! ```no_run
//! # fn main() -> Result<(), udpferry::store::StoreError> {
//! use udpferry::store::Cache;
//! # let id = udpferry::ObjectId::md5_of(b"map");
//! let cache = Cache::open(Cache::default_dir().unwrap_or_else(|| "cache".into()))?;
//! if !cache.contains(&id) {
//!     let (partial, have) = cache.begin(&id)?;
//!     // Receiver::new(now, conn_id, id, &have, partial, config) ... drive it to Completed,
//!     // then `receiver.into_sink().finalize()?`. On failure: `into_sink().checkpoint()?`.
//!     # drop((partial, have));
//! }
//! # Ok(()) }
//! ```

pub mod bundle;
mod cache;
mod content;
mod hygiene;
pub mod journal;
mod lock;
pub mod manifest;
mod output;
mod safe_path;
mod scan;
mod stamp;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

pub use cache::{
    BlockCheck, Cache, Lookup, PartialFile, JOURNAL_INTERVAL_BYTES, JOURNAL_INTERVAL_TIME,
};
pub use content::{BundleInfo, ContentStore, ObjectInfo, Served};
pub use hygiene::{
    CacheEntry, CacheListing, CleanReport, DamagedEntry, Removed, VerifyReport, CLEAN_AGE,
};
pub use lock::EntryLock;
pub use scan::{IndexChange, SkippedFile};
#[cfg(feature = "internals")]
pub use content::FileSource;
pub use output::{node_kind, resolve_target};
pub use safe_path::{NameError, SafePath};

use crate::id::ObjectId;

/// Why a store operation failed. Each message says what went wrong and where, so a user can act.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file-system call failed; the message names the action and the path. Check that the path
    /// exists, is readable and writable by this process, and that the disk is not full.
    #[error("could not {action} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. "read directory".
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The content store's root is not a directory.
    #[error("{} is not a directory: point the content store at the folder holding the files to serve", path.display())]
    NotADirectory {
        /// The path given.
        path: PathBuf,
    },
    /// The object is not (completely) in the cache.
    #[error("object {id} is not in the cache (no file at {}): download it first", path.display())]
    NotInCache {
        /// The object asked for.
        id: ObjectId,
        /// Where it would be.
        path: PathBuf,
    },
    /// `finalize` was called before every byte of the object was written.
    #[error("download of {} is incomplete ({have} of {size} bytes): keep receiving until the transfer completes before finalizing", path.display())]
    Incomplete {
        /// The partial file.
        path: PathBuf,
        /// Bytes written.
        have: u64,
        /// Object size.
        size: u64,
    },
    /// The disk holding the cache has less free space than the rest of the download needs.
    #[error("not enough disk space for {}: {needed} more bytes needed, {free} free; free some space or use another cache directory", path.display())]
    NoSpace {
        /// The partial file.
        path: PathBuf,
        /// Bytes still to be written.
        needed: u64,
        /// Bytes available to this process on that file system.
        free: u64,
    },
    /// A finished cache entry no longer hashes to its name (disk corruption or tampering).
    #[error("cache entry {} does not hash to {expected} (it hashes to {actual}): delete it and download the object again", path.display())]
    Corrupt {
        /// The cache entry.
        path: PathBuf,
        /// Its name.
        expected: ObjectId,
        /// What its bytes hash to.
        actual: ObjectId,
    },
    /// A verified object was to be written over something that is not a regular file (a
    /// directory, a device, a FIFO, a socket): refused, the node is untouched.
    #[error("refusing to write {}: it is {kind}, not a regular file; give a file path instead", path.display())]
    NotAFile {
        /// The path given.
        path: PathBuf,
        /// What is there, in words ("a directory", "a character device", ...).
        kind: &'static str,
    },
    /// Another download of the object (in this process or another) holds its entry's lock
    /// ([`Cache::try_lock`]): wait for it to finish, then look the object up again.
    #[error("another download of {id} is using this cache ({} is locked): wait for it to finish", path.display())]
    Locked {
        /// The object.
        id: ObjectId,
        /// Its lock file.
        path: PathBuf,
    },
    /// A bundle file's path is a symbolic link that leads outside the bundle's directory:
    /// refused, nothing outside is written.
    #[error("refusing to write {}: it is a symbolic link to {}, outside the directory being installed", path.display(), target.display())]
    LinkOutside {
        /// The path inside the bundle's directory.
        path: PathBuf,
        /// Where the link leads.
        target: PathBuf,
    },
}

impl StoreError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        StoreError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

impl From<StoreError> for io::Error {
    /// For callers that speak `io::Error` (for example an object provider of an endpoint): the
    /// I/O kind is kept, the message keeps the path.
    fn from(e: StoreError) -> Self {
        let kind = match &e {
            StoreError::Io { source, .. } => source.kind(),
            StoreError::NotInCache { .. } => io::ErrorKind::NotFound,
            StoreError::NotADirectory { .. } => io::ErrorKind::InvalidInput,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e.to_string())
    }
}

/// Size of the buffer files are hashed and copied through.
pub(crate) const BUF_LEN: usize = 1 << 20;

/// Reads exactly `buf.len()` bytes at `offset` without moving any shared cursor.
#[cfg(unix)]
pub(crate) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

/// Writes all of `data` at `offset` without moving any shared cursor.
#[cfg(unix)]
pub(crate) fn write_all_at(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, data, offset)
}

/// Seek-based fallback: the store owns its handles, so nothing else moves the cursor.
#[cfg(not(unix))]
pub(crate) fn read_exact_at(mut file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

/// Seek-based fallback: the store owns its handles, so nothing else moves the cursor.
#[cfg(not(unix))]
pub(crate) fn write_all_at(mut file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(data)
}

/// A file's ids under both algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileIds {
    pub(crate) md5: ObjectId,
    pub(crate) sha256: ObjectId,
}

/// Feeds the first `len` bytes of `file` to `f`, in order, through one 1 MiB buffer, and stops
/// at the first error `f` returns. An `UnexpectedEof` error means the file is shorter than `len`.
fn for_each_block(
    file: &File,
    len: u64,
    mut f: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut buf = vec![0u8; BUF_LEN];
    let mut offset = 0u64;
    while offset < len {
        let n = usize::try_from(len - offset).map_or(BUF_LEN, |left| left.min(BUF_LEN));
        let chunk = &mut buf[..n];
        read_exact_at(file, chunk, offset)?;
        f(chunk)?;
        offset += n as u64;
    }
    Ok(())
}

/// Hashes the first `len` bytes of `file`, MD5 and SHA-256 in one pass (a client may ask by
/// either). Once `stop` is set it gives up with `ErrorKind::Interrupted` at the next 1 MiB
/// block (a rescan being dropped).
pub(crate) fn hash_file(file: &File, len: u64, stop: &AtomicBool) -> io::Result<FileIds> {
    let mut md5 = crate::id::IdHasher::new(ObjectId::ALG_MD5).unwrap_or_default();
    let mut sha256 = crate::id::IdHasher::new(ObjectId::ALG_SHA256).unwrap_or_default();
    for_each_block(file, len, |chunk| {
        if stop.load(Ordering::Relaxed) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        md5.update(chunk);
        sha256.update(chunk);
        Ok(())
    })?;
    Ok(FileIds {
        md5: md5.finish(),
        sha256: sha256.finish(),
    })
}

/// The id of the first `len` bytes of `file` under `like`'s algorithm: compare it with `like`
/// to check a file against the id it should have.
pub fn id_of_file(file: &File, len: u64, like: &ObjectId) -> io::Result<ObjectId> {
    let mut hasher = like.hasher();
    for_each_block(file, len, |chunk| {
        hasher.update(chunk);
        Ok(())
    })?;
    Ok(hasher.finish())
}

/// Makes a rename or unlink in `dir` durable (a no-op where directories cannot be synced).
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::io("sync directory", dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Bytes available to unprivileged writers on the file system holding `file` (Unix), or `None`
/// where that cannot be asked.
pub(crate) fn free_space(file: &std::fs::File) -> Option<u64> {
    #[cfg(unix)]
    {
        let stat = rustix::fs::fstatvfs(file).ok()?;
        Some(stat.f_bavail.saturating_mul(stat.f_frsize))
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        None
    }
}
