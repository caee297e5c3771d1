//! Bundle downloads: [`Client::fetch_bundle`] fetches a bundle listing (see
//! [`store::bundle`](crate::store::bundle)), checks it, and installs each file it lists under a
//! directory, several files at a time over one socket.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

use super::client::resolve;
use super::engine::{Engine, Expect, Job, Outcome, Sink, Verify};
use super::{Client, FetchError, FetchOptions};
use crate::core::{TransferError, TransferId};
use crate::id::ObjectId;
use crate::store::bundle::{
    install_from_cache, installed, read_listing, Bundle, BundleError, MAX_LISTING_BYTES,
};
use crate::store::{Cache, Lookup, SafePath, StoreError};

/// Files downloaded at once. They share one socket and one endpoint, so on the server they are
/// one path (pooled base delay, windows evened out: docs/ARCHITECTURE.md section 5.5) and
/// together take about the share of one download, not four. The server's default limit is 8
/// transfers per client address.
pub const CONCURRENT_FILES: usize = 4;
/// How often a file the server answered "busy" for is asked again (after 0.25 s, 0.5 s, ...).
const BUSY_RETRIES: u32 = 5;
/// How often the progress callback is called at most.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// How far a bundle download got, for [`Client::fetch_bundle`]'s progress callback.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BundleProgress {
    /// Files finished (installed, skipped or failed).
    pub files_done: usize,
    /// Files the bundle lists.
    pub files_total: usize,
    /// Bytes of the listed files held so far (skipped and cached files count whole).
    pub bytes_done: u64,
    /// The listed files' sizes added up.
    pub bytes_total: u64,
}

/// What a bundle download did: how each listed file got into the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BundleReport {
    /// The bundle, whose listing was verified and checked.
    pub bundle: ObjectId,
    /// Files it lists.
    pub files: usize,
    /// Their sizes added up.
    pub bytes: u64,
    /// Files downloaded (wholly or in part) and installed.
    pub fetched: usize,
    /// Bytes those downloads received over the network (not counting resumed bytes).
    pub fetched_bytes: u64,
    /// Bytes the cache held from an earlier, interrupted run of those downloads.
    pub resumed_bytes: u64,
    /// Files the cache already held, installed without the network.
    pub from_cache: usize,
    /// Files already in the directory with the right size and digest: left as they were.
    pub skipped: usize,
    /// True when the listing itself came from the cache.
    pub listing_from_cache: bool,
    /// Damaged cache entries (truncated, changed since they were verified) that were set aside
    /// and downloaded again instead of installed.
    pub damaged_in_cache: usize,
    /// Wall-clock time of the whole call.
    pub duration: Duration,
}

/// One line: files, bytes, what was downloaded, copied from the cache or already present.
impl std::fmt::Display for BundleReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "bundle {}: {} files, {} bytes: {} downloaded ({} bytes), {} from the cache, {} already present, in {:.2} s",
            self.bundle,
            self.files,
            self.bytes,
            self.fetched,
            self.fetched_bytes,
            self.from_cache,
            self.skipped,
            self.duration.as_secs_f64()
        )?;
        if self.damaged_in_cache > 0 {
            write!(
                f,
                "; {} damaged cache entries fetched again",
                self.damaged_in_cache
            )?;
        }
        Ok(())
    }
}

/// Why one file of a bundle was not installed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    /// Its transfer failed (not found, busy, timed out, digest mismatch...). Bytes that did not
    /// match were thrown away; others stay in the cache for a resume.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// The server offered another size than the listing gives: the transfer was cancelled
    /// before any data.
    #[error("the server offered {offered} bytes, the bundle lists {listed}")]
    SizeMismatch {
        /// Size in the listing.
        listed: u64,
        /// Size the server offered.
        offered: u64,
    },
    /// The cache or the directory could not be used: full disk, a parent in the directory that
    /// is a file or a symbolic link, ...
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The overall timeout passed before it finished (what arrived is kept for a resume).
    #[error("gave up after {:.1} s, the time allowed", .0.as_secs_f64())]
    Deadline(Duration),
    /// It has the same bytes (the same id) as another file of the bundle, which was fetched
    /// once for both and failed.
    #[error("same bytes as `{0}`, which failed")]
    SameAs(SafePath),
    /// A broken internal state: a bug in udpferry (please report it).
    #[error("internal error (a bug in udpferry; please report it): {0}")]
    Internal(&'static str),
}

/// One file of a bundle that was not installed, and why.
#[derive(Debug)]
#[non_exhaustive]
pub struct FileFailure {
    /// Its path in the bundle.
    pub path: SafePath,
    /// What went wrong.
    pub error: FileError,
}

/// Why [`Client::fetch_bundle`] failed.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum BundleFetchError {
    /// The listing could not be fetched; nothing was written to the directory.
    #[error("could not fetch bundle listing {id}: {source}")]
    Listing {
        /// The bundle asked for.
        id: ObjectId,
        /// Why.
        #[source]
        source: Box<FileError>,
    },
    /// The listing arrived and matches its id, but is not a valid bundle (an unsafe name, a
    /// duplicate, a conflict, too many files...). Nothing was written to the directory; the id
    /// came from somewhere untrustworthy or names something that is not a bundle.
    #[error("{id} is not a valid bundle listing ({source}); nothing was installed")]
    Invalid {
        /// The bundle asked for.
        id: ObjectId,
        /// What is wrong with it.
        #[source]
        source: BundleError,
    },
    /// Some files could not be installed; the others were (see the report). Running the call
    /// again resumes: installed files are skipped, partial downloads continue.
    #[error("{} of {} files of bundle {} were not installed; the first, `{}`: {}",
        .failed.len(), .report.files, .report.bundle,
        .failed.first().map_or("", |f| f.path.as_str()),
        .failed.first().map_or(String::new(), |f| f.error.to_string()))]
    Files {
        /// Each file not installed.
        failed: Vec<FileFailure>,
        /// What happened to the others.
        report: Box<BundleReport>,
    },
    /// The cache or the target directory could not be opened or created.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The socket failed, or the server address did not resolve. What arrived is kept.
    #[error("network error: {0}")]
    Io(#[from] io::Error),
}

/// One object to download: a file of the bundle (its listed size) or the listing itself.
#[derive(Debug, Clone)]
struct Wanted {
    id: ObjectId,
    /// The size the listing gives; `None` for the listing (at most [`MAX_LISTING_BYTES`]).
    size: Option<u64>,
    /// Indexes of the bundle's entries with these bytes.
    entries: Vec<usize>,
}

/// How a download ended.
#[derive(Debug)]
struct Fetched {
    size: u64,
    resumed: u64,
    /// Another download (another process) finished it while this one waited for its lock.
    from_cache: bool,
}

/// How starting a download went.
enum Begun {
    /// Its transfer is under way; bytes resumed from the cache.
    Transfer(TransferId, u64),
    /// The cache holds it now (another download just finished it); its size.
    Cached(u64),
    /// Another download of it holds its lock in the cache: try again shortly.
    Locked,
}

/// How long a file whose lock another download holds waits before it is tried again.
const LOCK_RETRY: Duration = Duration::from_millis(50);

/// A download in flight.
#[derive(Debug)]
struct Active {
    wanted: usize,
    retries: u32,
    resumed: u64,
}

/// Several downloads at once from one server through the client's engine (one endpoint, one
/// socket, bound on first use: nothing is bound when everything is local).
struct Downloads<'a> {
    engine: Engine<'a>,
    server: SocketAddr,
    cache: &'a Cache,
}

impl Downloads<'_> {
    /// Downloads every wanted object into the cache, at most [`CONCURRENT_FILES`] at a time,
    /// and calls `on_done` as each ends (finalized in the cache, or failed); `on_bytes` gets
    /// the bytes held by downloads in flight. Past the overall timeout (or when stopped) the
    /// rest fail with the reason. Returns an error only if the socket fails.
    fn run(
        &mut self,
        wanted: &[Wanted],
        on_done: &mut dyn FnMut(usize, Result<Fetched, FileError>),
        on_bytes: &mut dyn FnMut(u64),
    ) -> io::Result<()> {
        let mut queue: VecDeque<(usize, u32, Instant)> = (0..wanted.len())
            .map(|i| (i, 0, self.engine.started()))
            .collect();
        let mut active: HashMap<TransferId, Active> = HashMap::new();
        while !queue.is_empty() || !active.is_empty() {
            let now = Instant::now();
            while active.len() < CONCURRENT_FILES {
                let Some(at) = queue
                    .iter()
                    .position(|(_, _, not_before)| *not_before <= now)
                else {
                    break;
                };
                let Some((w, retries, _)) = queue.remove(at) else {
                    break;
                };
                match self.start(&wanted[w]) {
                    Ok(Begun::Transfer(transfer, resumed)) => {
                        active.insert(
                            transfer,
                            Active {
                                wanted: w,
                                retries,
                                resumed,
                            },
                        );
                    }
                    Ok(Begun::Cached(size)) => on_done(
                        w,
                        Ok(Fetched {
                            size,
                            resumed: 0,
                            from_cache: true,
                        }),
                    ),
                    Ok(Begun::Locked) => queue.push_back((w, retries, now + LOCK_RETRY)),
                    Err(e) => on_done(w, Err(e.into())),
                }
            }
            let ended = match self.engine.turn() {
                Ok(ended) => ended,
                Err(why) => {
                    // Every download in flight was cancelled and kept for a resume; the rest
                    // fail with the reason.
                    let deadline = match why {
                        FetchError::Deadline(d) => Some(d),
                        _ => None,
                    };
                    let left = active.drain().map(|(_, a)| a.wanted);
                    for w in left.chain(queue.drain(..).map(|(w, _, _)| w)) {
                        let error = deadline.map_or(
                            FileError::Transfer(TransferError::Cancelled),
                            FileError::Deadline,
                        );
                        on_done(w, Err(error));
                    }
                    return match why {
                        FetchError::Io(e) => Err(e),
                        _ => Ok(()),
                    };
                }
            };
            for ended in ended {
                let Some(a) = active.remove(&ended.transfer) else {
                    continue;
                };
                let Sink::File(mut partial) = ended.sink else {
                    on_done(a.wanted, Err(FileError::Internal(LOST)));
                    continue;
                };
                match ended.outcome {
                    Outcome::Completed { size } => match partial.finalize() {
                        Ok(_) => on_done(
                            a.wanted,
                            Ok(Fetched {
                                size,
                                resumed: a.resumed,
                                from_cache: false,
                            }),
                        ),
                        Err(e) => on_done(a.wanted, Err(e.into())),
                    },
                    Outcome::Failed(TransferError::Busy) if a.retries < BUSY_RETRIES => {
                        let _ = partial.checkpoint();
                        drop(partial);
                        let wait = Duration::from_millis(250) * (1 << a.retries);
                        queue.push_back((a.wanted, a.retries + 1, Instant::now() + wait));
                    }
                    Outcome::Failed(err) => {
                        if matches!(err, TransferError::DigestMismatch { .. }) {
                            // Some stored bytes are wrong and nothing here says which.
                            let _ = partial.discard();
                        } else {
                            let _ = partial.checkpoint();
                        }
                        on_done(a.wanted, Err(err.into()));
                    }
                    Outcome::WrongSize { expected, offered } => {
                        let _ = partial.checkpoint();
                        on_done(
                            a.wanted,
                            Err(FileError::SizeMismatch {
                                listed: expected,
                                offered,
                            }),
                        );
                    }
                    Outcome::NoSpace(e) => {
                        let _ = partial.checkpoint();
                        on_done(a.wanted, Err(e.into()));
                    }
                }
            }
            on_bytes(self.engine.held());
        }
        Ok(())
    }

    /// Opens (or resumes) the cache's partial file for `wanted` and starts its transfer, unless
    /// another download holds its lock or has just finished it.
    fn start(&mut self, wanted: &Wanted) -> Result<Begun, StoreError> {
        let Some(lock) = self.cache.try_lock(&wanted.id)? else {
            return Ok(Begun::Locked);
        };
        if let Lookup::Verified { size, .. } = self.cache.lookup(&wanted.id)? {
            return Ok(Begun::Cached(size));
        }
        let (mut partial, have) = self.cache.begin_locked(lock, wanted.size)?;
        partial.set_background_journal(true)?;
        let resumed = have.covered();
        let job = Job {
            server: self.server,
            id: wanted.id,
            have,
            sink: Sink::File(partial),
            expect: wanted.size.map_or(Expect::AtMost(MAX_LISTING_BYTES), Expect::Size),
            verify: Verify::Digest,
        };
        let transfer = self.engine.start(job).map_err(|e| StoreError::Io {
            action: "open a socket for",
            path: self.cache.path_of(&wanted.id),
            source: e,
        })?;
        Ok(Begun::Transfer(transfer, resumed))
    }
}

/// What a download whose partial file went missing reports (a bug, not an input).
const LOST: &str = "a download lost its partial file";

impl Client {
    /// Fetches bundle `bundle` from `server` and installs every file it lists under `dir`.
    ///
    /// 1. The listing is fetched by its id (or read from the cache) and checked by its digest,
    ///    then parsed with `Bundle::decode`: an unsafe name, a duplicate or any other flaw
    ///    fails with [`BundleFetchError::Invalid`] before anything is written to `dir`.
    /// 2. `dir` is created if needed. A file already at `dir/<path>` with the listed size and
    ///    digest is left alone (`skipped`); one the cache holds is copied from it.
    /// 3. The rest download into the cache, [`CONCURRENT_FILES`] at a time over one socket,
    ///    resuming partial downloads the cache holds, and each is installed at `dir/<path>`
    ///    atomically ([`Cache::copy_out`]: temporary file, digest check, rename). Parent
    ///    directories are created inside `dir` only, never through a symbolic link.
    ///
    /// `options.timeout` (for the whole call) and `stop` apply; `output` and `bases` are
    /// ignored. `progress` is called at most every 100 ms.
    ///
    /// Files that fail do not stop the others: the call then returns
    /// [`BundleFetchError::Files`] with the report; calling it again fetches only what is
    /// missing. Blocks until every file is installed or has failed.
    pub fn fetch_bundle(
        &self,
        server: impl ToSocketAddrs + std::fmt::Debug,
        bundle: ObjectId,
        dir: &Path,
        options: &FetchOptions,
        mut progress: impl FnMut(&BundleProgress),
    ) -> Result<BundleReport, BundleFetchError> {
        let engine = Engine::new(self, options);
        let started = engine.started();
        let cache = &self.cache;
        let server = resolve(server)?;
        let mut downloads = Downloads {
            engine,
            server,
            cache,
        };
        let mut report = BundleReport {
            bundle,
            files: 0,
            bytes: 0,
            fetched: 0,
            fetched_bytes: 0,
            resumed_bytes: 0,
            from_cache: 0,
            skipped: 0,
            listing_from_cache: false,
            damaged_in_cache: 0,
            duration: Duration::ZERO,
        };
        report.listing_from_cache = in_cache(cache, &bundle, &mut report)?;

        // 1. The listing.
        if !report.listing_from_cache {
            let mut outcome = None;
            let listing = Wanted {
                id: bundle,
                size: None,
                entries: Vec::new(),
            };
            downloads.run(&[listing], &mut |_, r| outcome = Some(r), &mut |_| {})?;
            match outcome {
                Some(Ok(_)) => {}
                Some(Err(source)) => {
                    return Err(BundleFetchError::Listing {
                        id: bundle,
                        source: Box::new(source),
                    });
                }
                None => {
                    return Err(BundleFetchError::Listing {
                        id: bundle,
                        source: Box::new(FileError::Internal(LOST)),
                    })
                }
            }
        }
        let listing = read_listing(cache, &bundle)?;
        let bundle_list = match Bundle::decode(&listing) {
            Ok(b) => b,
            Err(source) => {
                return Err(BundleFetchError::Invalid { id: bundle, source });
            }
        };
        drop(listing);
        let entries = bundle_list.entries();
        report.files = entries.len();
        report.bytes = bundle_list.total_bytes();

        // 2. What is already there.
        fs::create_dir_all(dir).map_err(|e| StoreError::io("create directory", dir, e))?;
        let mut failed: Vec<FileFailure> = Vec::new();
        let mut jobs: Vec<Wanted> = Vec::new();
        let mut job_of: HashMap<ObjectId, usize> = HashMap::new();
        let mut bytes_settled = 0u64;
        for (i, entry) in entries.iter().enumerate() {
            match installed(dir, &entry.path, entry.size, &entry.id) {
                Ok(true) => {
                    report.skipped += 1;
                    bytes_settled += entry.size;
                    continue;
                }
                Ok(false) => {}
                Err(e) => {
                    failed.push(FileFailure {
                        path: entry.path.clone(),
                        error: e.into(),
                    });
                    continue;
                }
            }
            match job_of.get(&entry.id) {
                Some(&j) if jobs[j].size == Some(entry.size) => jobs[j].entries.push(i),
                Some(&j) => failed.push(FileFailure {
                    path: entry.path.clone(),
                    error: FileError::SizeMismatch {
                        listed: entry.size,
                        offered: jobs[j].size.unwrap_or(0),
                    },
                }),
                None => {
                    job_of.insert(entry.id, jobs.len());
                    jobs.push(Wanted {
                        id: entry.id,
                        size: Some(entry.size),
                        entries: vec![i],
                    });
                }
            }
        }
        let files_done = Cell::new(report.skipped + failed.len());
        let bytes_settled = Cell::new(bytes_settled);
        let install = |job: &Wanted, failed: &mut Vec<FileFailure>| -> usize {
            let mut ok = 0;
            for &i in &job.entries {
                let entry = &entries[i];
                match install_from_cache(cache, dir, &entry.path, &job.id) {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(FileFailure {
                        path: entry.path.clone(),
                        error: e.into(),
                    }),
                }
            }
            ok
        };
        let mut remote = Vec::new();
        for job in jobs {
            if in_cache(cache, &job.id, &mut report)? {
                report.from_cache += install(&job, &mut failed);
                files_done.set(files_done.get() + job.entries.len());
                bytes_settled
                    .set(bytes_settled.get() + job.size.unwrap_or(0) * job.entries.len() as u64);
            } else {
                remote.push(job);
            }
        }
        let total = report.files;
        let bytes_total = report.bytes;
        progress(&BundleProgress {
            files_done: files_done.get(),
            files_total: total,
            bytes_done: bytes_settled.get(),
            bytes_total,
        });

        // 3. The rest, over the network.
        let mut last_progress = Instant::now();
        let run = downloads.run(
            &remote,
            &mut |j, result| {
                let job = &remote[j];
                files_done.set(files_done.get() + job.entries.len());
                bytes_settled
                    .set(bytes_settled.get() + job.size.unwrap_or(0) * job.entries.len() as u64);
                match result {
                    Ok(f) if f.from_cache => report.from_cache += install(job, &mut failed),
                    Ok(f) => {
                        report.fetched += install(job, &mut failed);
                        report.fetched_bytes += f.size - f.resumed.min(f.size);
                        report.resumed_bytes += f.resumed;
                    }
                    Err(error) => {
                        let first = entries[job.entries[0]].path.clone();
                        for &i in &job.entries[1..] {
                            failed.push(FileFailure {
                                path: entries[i].path.clone(),
                                error: FileError::SameAs(first.clone()),
                            });
                        }
                        failed.push(FileFailure { path: first, error });
                    }
                }
            },
            &mut |in_flight| {
                if last_progress.elapsed() >= PROGRESS_INTERVAL {
                    last_progress = Instant::now();
                    progress(&BundleProgress {
                        files_done: files_done.get(),
                        files_total: total,
                        bytes_done: bytes_settled.get() + in_flight,
                        bytes_total,
                    });
                }
            },
        );
        downloads.engine.finish(Duration::from_millis(500));
        run?;
        progress(&BundleProgress {
            files_done: files_done.get(),
            files_total: total,
            bytes_done: bytes_settled.get(),
            bytes_total,
        });
        report.duration = started.elapsed();
        if failed.is_empty() {
            Ok(report)
        } else {
            failed.sort_by(|a, b| a.path.cmp(&b.path));
            Err(BundleFetchError::Files {
                failed,
                report: Box::new(report),
            })
        }
    }
}

/// Whether the cache holds `id` verified ([`Cache::lookup`]). A damaged entry is set aside (its
/// download starts over) and counted in `report`, unless another download holds its lock (that
/// one repairs it; this one waits for it when it starts the file).
fn in_cache(cache: &Cache, id: &ObjectId, report: &mut BundleReport) -> Result<bool, StoreError> {
    match cache.lookup(id)? {
        Lookup::Verified { .. } => Ok(true),
        Lookup::Damaged { .. } => {
            let Some(_lock) = cache.try_lock(id)? else {
                return Ok(false);
            };
            // Looked at again under the lock: another download may have repaired it.
            match cache.lookup(id)? {
                Lookup::Verified { .. } => Ok(true),
                Lookup::Damaged { .. } => {
                    cache.set_aside_damaged(id)?;
                    report.damaged_in_cache += 1;
                    Ok(false)
                }
                _ => Ok(false),
            }
        }
        _ => Ok(false),
    }
}

/// The same sentence as `Display`, so that a program whose `main` returns this error (through
/// `?` and `Box<dyn Error>`) prints words a player can act on, not a variant dump. Match on the
/// variants to act on an error in code.
impl std::fmt::Debug for BundleFetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}
