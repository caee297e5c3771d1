//! The blocking client: [`Client`] holds a cache and socket settings, and downloads objects
//! into the cache from one server ([`Client::fetch`]), from several at once
//! ([`Client::fetch_from`]) or a whole bundle ([`Client::fetch_bundle`]), all through one
//! download engine (see `engine.rs`).

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::delta::{self, NoManifest};
use super::engine::{lost, Engine, Expect, Job, Outcome, Sink, Verify};
use super::multi;
use super::Framing;
use crate::core::{EndpointConfig, Stats, TransferError};
use crate::id::ObjectId;
use crate::store::manifest::Manifest;
use crate::store::bundle::is_bundle_listing;
use crate::store::{resolve_target, Cache, EntryLock, Lookup, StoreError};
use super::{BundleFetchError, BundleReport};

/// Downloads objects over UDP into a cache.
///
/// A value that owns the cache and the socket settings; make one per cache (it is cheap to
/// clone) and call [`fetch`](Self::fetch), [`fetch_from`](Self::fetch_from) or
/// [`fetch_bundle`](Self::fetch_bundle) from any thread. Each call binds a socket of its own
/// and blocks until it is done.
#[derive(Debug, Clone)]
pub struct Client {
    pub(super) cache: Cache,
    pub(super) config: EndpointConfig,
    pub(super) bind: Option<SocketAddr>,
    pub(super) framing: Framing,
}

impl Client {
    /// A client over the cache at `cache_dir` (created if missing; see
    /// [`Cache::default_dir`] for the platform's), with default transfer settings, binding the
    /// wildcard address of each server's family.
    pub fn new(cache_dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        Ok(Client {
            cache: Cache::open(cache_dir)?,
            config: client_config(),
            bind: None,
            framing: Framing::Plain,
        })
    }

    /// The same client with other transfer settings (limits, rates, timeouts).
    pub fn with_config(mut self, config: EndpointConfig) -> Self {
        self.config = config;
        self
    }

    /// The same client binding `local` for its sockets (for a given interface or port).
    pub fn with_bind(mut self, local: SocketAddr) -> Self {
        self.bind = Some(local);
        self
    }

    /// The same client framing its datagrams with `framing` (for a Panda3D server in its default
    /// mode: [`Framing::Panda3d`]).
    pub fn with_framing(mut self, framing: Framing) -> Self {
        self.framing = framing;
        self
    }

    /// The cache: look objects up ([`Cache::lookup`]) or copy them out.
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The transfer settings.
    pub fn config(&self) -> &EndpointConfig {
        &self.config
    }

    /// Fetches `id` from `server` into the cache (and `options.output`), resuming a partial
    /// download found in the cache, or copying from the cache without touching the network when
    /// it already holds the object (verified and unchanged: see [`Cache::lookup`]). `progress`
    /// is called as bytes arrive (at most every 100 ms) with what arrived and the transfer's
    /// counters.
    ///
    /// Self-repairing: bytes on disk that no journal vouches for (a damaged cache entry, a kill
    /// between journal updates) are checked against the object's manifest and kept where they
    /// match; a digest mismatch at the end (a datagram altered on its way despite its checksum)
    /// re-fetches only the blocks that disagree with the manifest, a few rounds at most, and
    /// fails with [`FetchError::BadServer`] only when the server's own bytes disagree with `id`.
    /// A protocol violation (what an altered Offer or ack leaves behind) is retried the same
    /// way, resuming what is held.
    ///
    /// Blocks until the object is verified or the transfer failed. Then use
    /// [`Report::path`] (or `options.output`); after an error, calling it again resumes.
    pub fn fetch(
        &self,
        server: impl ToSocketAddrs + std::fmt::Debug,
        id: ObjectId,
        options: &FetchOptions,
        mut progress: impl FnMut(&Progress),
    ) -> Result<Report, FetchError> {
        let mut engine = Engine::new(self, options);
        let started = engine.started();
        let (lock, damaged_entry) = match self.claim(id, options, &mut progress, started)? {
            Claim::Served(report) => return Ok(*report),
            Claim::Download { lock, damaged } => (lock, damaged),
        };
        let server = resolve(server)?;
        let (mut partial, have) = self.cache.begin_locked(lock, None)?;
        partial.set_background_journal(true)?;
        let resumed_bytes = have.covered();
        // Unvouched bytes and local files both need the manifest: blocks that match it are
        // kept or copied instead of fetched.
        let bases = options.all_bases();
        let mut manifest = None;
        let (mut salvaged_bytes, mut reused_bytes) = (0, 0);
        if !bases.is_empty() || partial.has_unverified() {
            manifest = fetch_manifest(&mut engine, server, id, MANIFEST_WAIT)?;
            if let Some(manifest) = &manifest {
                if partial.has_unverified() {
                    salvaged_bytes = partial.salvage(manifest)?.gained;
                }
                if !bases.is_empty() {
                    reused_bytes = delta::reuse_blocks(manifest, &bases, &mut partial)?;
                }
            }
        }
        let mut repaired_bytes = 0;
        let mut path_restarts = 0;
        let mut rounds = 0;
        let mut asked_again = false;
        loop {
            let job = Job {
                server,
                id,
                have: partial.received().clone(),
                sink: Sink::File(partial),
                expect: Expect::Any,
                verify: Verify::Digest,
            };
            let ended = engine.run(job, None, &mut progress)?;
            let Sink::File(partial_back) = ended.sink else {
                return Err(lost());
            };
            partial = partial_back;
            let size = match ended.outcome {
                Outcome::Completed { size } => size,
                Outcome::Failed(TransferError::DigestMismatch { expected, actual }) => {
                    // Some stored bytes are wrong. Which ones the manifest says.
                    engine.flush();
                    if manifest.is_none() {
                        manifest = fetch_manifest(&mut engine, server, id, MANIFEST_WAIT)?;
                    }
                    let Some(manifest) = &manifest else {
                        // An older server without manifests: nothing says which bytes are
                        // wrong, so none can be kept.
                        let _ = partial.discard();
                        return Err(TransferError::DigestMismatch { expected, actual }.into());
                    };
                    let check = partial.verify_blocks(manifest)?;
                    let blame = if check.held == manifest.size {
                        Some("every block matches its manifest, but the whole does not".to_string())
                    } else if rounds >= MAX_REPAIR_ROUNDS {
                        Some(format!("still wrong after {rounds} repairs"))
                    } else {
                        None
                    };
                    if let Some(detail) = blame {
                        let _ = partial.discard();
                        return Err(FetchError::BadServer { server, id, detail });
                    }
                    rounds += 1;
                    repaired_bytes += manifest.size - check.held;
                    continue;
                }
                Outcome::Failed(TransferError::NotFound) if !asked_again => {
                    // An altered Request names another object; a server that really lacks
                    // this one says so twice.
                    asked_again = true;
                    continue;
                }
                Outcome::Failed(TransferError::PathLost(_)) if path_restarts < MAX_PATH_RESTARTS => {
                    // Our address changed and the server did not follow (it forgot the
                    // transfer, or something ate its path challenge): start over on a new
                    // connection, from a new socket, resuming what arrived.
                    partial.checkpoint()?;
                    engine.new_socket();
                    path_restarts += 1;
                    continue;
                }
                Outcome::Failed(err) if garbled(&err) && rounds < MAX_REPAIR_ROUNDS => {
                    // A control datagram altered on its way (an Offer with another size, say)
                    // broke the exchange, not the server: ask again, resuming what is held.
                    // Bytes written under a garbled offer are caught by the digest and repaired.
                    partial.checkpoint()?;
                    rounds += 1;
                    continue;
                }
                Outcome::Failed(err) => {
                    let _ = partial.checkpoint();
                    return Err(err.into());
                }
                Outcome::NoSpace(err) => {
                    let _ = partial.checkpoint();
                    return Err(err.into());
                }
                Outcome::WrongSize { .. } => return Err(lost()),
            };
            progress(&Progress {
                bytes_done: size,
                total: size,
                stats: ended.stats.clone(),
                waiting: None,
            });
            let path = partial.finalize()?;
            if let Some(out) = &options.output {
                self.publish(&id, out, true)?;
            }
            engine.finish(linger_for(&ended.stats));
            return Ok(Report {
                object: id,
                size,
                path,
                from_cache: false,
                resumed_bytes,
                salvaged_bytes,
                reused_bytes,
                damaged_entry,
                repaired_bytes,
                path_restarts,
                bad_sources: Vec::new(),
                duration: started.elapsed(),
                stats: ended.stats,
            });
        }
    }

    /// Fetches `id` from several servers at once: each delivers pieces of it (cut along the
    /// object's manifest, which every server is asked for), faster servers deliver more, every
    /// piece is checked against the manifest's block hashes, and a server that fails or sends
    /// bytes that do not match is dropped (and named in [`Report::bad_sources`]) while the
    /// others take over its pieces. The object's own digest checks the result. Needs servers
    /// that serve manifests (any [`Server`](super::Server) over a `ContentStore`); with one
    /// server (or one listed several times) it is [`fetch`](Self::fetch). Caching, `output`,
    /// `bases`, `timeout` and `stop` work as in `fetch`.
    ///
    /// Blocks until the object is verified or no server is left.
    pub fn fetch_from(
        &self,
        servers: &[SocketAddr],
        id: ObjectId,
        options: &FetchOptions,
        mut progress: impl FnMut(&Progress),
    ) -> Result<Report, FetchError> {
        // A server listed twice is one server.
        let mut unique: Vec<SocketAddr> = Vec::with_capacity(servers.len());
        for s in servers {
            if !unique.contains(s) {
                unique.push(*s);
            }
        }
        let servers = &unique[..];
        if let [server] = servers {
            return self.fetch(*server, id, options, progress);
        }
        let started = Instant::now();
        let (lock, damaged_entry) = match self.claim(id, options, &mut progress, started)? {
            Claim::Served(report) => return Ok(*report),
            Claim::Download { lock, damaged } => (lock, damaged),
        };
        let mut report = multi::fetch_from(self, servers, id, lock, options, &mut progress)?;
        report.damaged_entry = damaged_entry;
        Ok(report)
    }

    /// What `udpferry get` does, for any front end: fetches `id` from one server
    /// ([`fetch`](Self::fetch)) or several ([`fetch_from`](Self::fetch_from)) and writes it to
    /// `options.output` if set. When the object turns out to be a bundle listing (or `bundle`
    /// is true, which then requires an output), the output names a directory (created if
    /// missing) and every file the bundle lists is installed under it instead ([`fetch_bundle`](Self::fetch_bundle), from
    /// the first server). An output that is a device, FIFO or socket is refused before the
    /// network is used; a directory that receives a plain object is refused after the
    /// download (the object stays in the cache).
    ///
    /// Blocks like `fetch`; `progress` sees the bytes of the object or of the bundle's files.
    pub fn get(
        &self,
        servers: &[SocketAddr],
        id: ObjectId,
        options: &FetchOptions,
        bundle: bool,
        mut progress: impl FnMut(&Progress),
    ) -> Result<Got, FetchError> {
        let first = *servers
            .first()
            .ok_or(FetchError::Usage("no server given"))?;
        // Refuse a device, FIFO or socket before the network is used; a directory may be
        // right (a bundle installs into it), and a plain object refuses it at the end.
        if let Some(out) = &options.output {
            match resolve_target(out, None) {
                Ok(_) | Err(StoreError::NotAFile {
                    kind: "a directory",
                    ..
                }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let install = |dir: &Path, progress: &mut dyn FnMut(&Progress)| {
            let report = self.fetch_bundle(first, id, dir, options, |p| {
                progress(&Progress {
                    bytes_done: p.bytes_done,
                    total: p.bytes_total,
                    stats: Stats::default(),
                    waiting: None,
                })
            })?;
            Ok(Got::Bundle(report))
        };
        match (&options.output, bundle) {
            (Some(dir), true) => return install(dir, &mut progress),
            (None, true) => {
                let why = "a bundle needs an output directory to install its files in";
                return Err(FetchError::Usage(why));
            }
            _ => {}
        }
        // Into the cache first: only then is it known whether the object is a bundle listing.
        // An existing file at the output is still searched for reusable blocks.
        let mut fetch_options = options.clone();
        fetch_options.bases = options.all_bases();
        fetch_options.output = None;
        let report = self.fetch_from(servers, id, &fetch_options, &mut progress)?;
        match &options.output {
            Some(dir) if is_bundle_listing(&report.path) => install(dir, &mut progress),
            Some(out) => {
                self.publish(&id, out, !report.from_cache)?;
                Ok(Got::Object(report))
            }
            None => Ok(Got::Object(report)),
        }
    }

    /// What the cache does for a download of `id`. A verified entry is served: copied to
    /// `options.output` (if set) and reported. Otherwise the object's entry is locked for this
    /// download ([`Cache::try_lock`]), waiting while another download of it (another thread
    /// or process) holds the lock, within `options.stop` and `options.timeout`; once the lock
    /// is ours the cache is looked at again, since that download has usually finished the
    /// object. A damaged entry is set aside for this download to repair.
    fn claim(
        &self,
        id: ObjectId,
        options: &FetchOptions,
        progress: &mut dyn FnMut(&Progress),
        started: Instant,
    ) -> Result<Claim, FetchError> {
        let mut lock = None;
        loop {
            match (self.cache.lookup(&id)?, lock) {
                (Lookup::Verified { path, size }, _) => {
                    let report = self.serve_cached(id, path, size, options, progress, started)?;
                    return Ok(Claim::Served(report));
                }
                (Lookup::Damaged { problem, .. }, Some(lock)) => {
                    self.cache.set_aside_damaged(&id)?;
                    let damaged = Some(problem);
                    return Ok(Claim::Download { lock, damaged });
                }
                (_, Some(lock)) => return Ok(Claim::Download { lock, damaged: None }),
                (_, None) => lock = Some(self.wait_for_lock(&id, options, started)?),
            }
        }
    }

    /// Puts the cache's entry `id` at `out`. A download that just finished and verified it
    /// (`fresh`) is hard-linked when the cache and `out` share a file system (no second pass
    /// over the bytes); otherwise it is copied with its digest checked on the way
    /// ([`Cache::copy_out`]), which is what a cache hit costs.
    pub(super) fn publish(&self, id: &ObjectId, out: &Path, fresh: bool) -> Result<(), StoreError> {
        if fresh && self.cache.link_out(id, out)? {
            return Ok(());
        }
        self.cache.copy_out(id, out)
    }

    /// The lock on `id`'s entry, polled every [`LOCK_POLL`] while another download holds it;
    /// `FetchError::Stopped` or `Deadline` when `options` say to give up first.
    fn wait_for_lock(
        &self,
        id: &ObjectId,
        options: &FetchOptions,
        started: Instant,
    ) -> Result<EntryLock, FetchError> {
        loop {
            if let Some(lock) = self.cache.try_lock(id)? {
                return Ok(lock);
            }
            if let Some(why) = options.stop_reason(started) {
                return Err(why);
            }
            std::thread::sleep(LOCK_POLL);
        }
    }

    /// Reports the verified entry at `path` as the download of `id`, copying it to
    /// `options.output` if set.
    fn serve_cached(
        &self,
        id: ObjectId,
        path: PathBuf,
        size: u64,
        options: &FetchOptions,
        progress: &mut dyn FnMut(&Progress),
        started: Instant,
    ) -> Result<Box<Report>, FetchError> {
        if let Some(out) = &options.output {
            self.cache.copy_out(&id, out)?;
        }
        progress(&Progress {
            bytes_done: size,
            total: size,
            stats: Stats::default(),
            waiting: None,
        });
        Ok(Box::new(Report {
            object: id,
            size,
            path,
            from_cache: true,
            resumed_bytes: size,
            salvaged_bytes: 0,
            reused_bytes: 0,
            damaged_entry: None,
            repaired_bytes: 0,
            path_restarts: 0,
            bad_sources: Vec::new(),
            duration: started.elapsed(),
            stats: Stats::default(),
        }))
    }
}

/// Repair rounds after a digest mismatch before the server is blamed (each re-fetches only
/// the blocks that disagree with the manifest).
const MAX_REPAIR_ROUNDS: u32 = 4;
/// Longest a download waits for the object's manifest before going without it.
const MANIFEST_WAIT: Duration = Duration::from_secs(10);
/// Attempts at a manifest that keeps arriving altered before the download goes without one.
const MANIFEST_ATTEMPTS: usize = 8;

/// The first address `server` resolves to.
pub(super) fn resolve(server: impl ToSocketAddrs + std::fmt::Debug) -> io::Result<SocketAddr> {
    let named = |e: io::Error| io::Error::new(e.kind(), format!("cannot resolve {server:?}: {e}"));
    server.to_socket_addrs().map_err(named)?.next().ok_or_else(|| {
        named(io::Error::new(
            io::ErrorKind::NotFound,
            "it resolves to no address",
        ))
    })
}

/// How long a finished download answers a server that missed its Done: about one of the
/// server's probe timeouts, bounded.
pub(super) fn linger_for(stats: &Stats) -> Duration {
    (stats.smoothed_rtt * 3 + Duration::from_millis(30)).min(Duration::from_millis(500))
}

/// How often a download waiting for another download of the same object into the same cache
/// looks whether the lock is free (and its stop flag and timeout).
const LOCK_POLL: Duration = Duration::from_millis(50);

/// What the cache does for a download, from [`Client::claim`].
enum Claim {
    /// Verified and unchanged: served without the network (copied to `output` if set).
    Served(Box<Report>),
    /// Not there, or damaged and set aside (what was wrong with it): download it under this
    /// lock.
    Download {
        lock: EntryLock,
        damaged: Option<String>,
    },
}

/// The manifest of `id` from `server` (checked), within `wait` and what is left of the
/// overall timeout: `None` when the server has none or does not answer in time. A manifest
/// altered on its way fails its own digest and is fetched again; once three copies are in,
/// they vote byte by byte ([`delta::vote`]), so a manifest too large to arrive unaltered
/// through a path that alters a few datagrams still arrives. A "not found" is asked once more
/// (an altered request names another object).
pub(super) fn fetch_manifest(
    engine: &mut Engine<'_>,
    server: SocketAddr,
    id: ObjectId,
    wait: Duration,
) -> Result<Option<Manifest>, FetchError> {
    let mut copies: Vec<Vec<u8>> = Vec::new();
    let mut refusals = 0;
    for _ in 0..MANIFEST_ATTEMPTS {
        match delta::fetch_manifest(engine, server, id, engine.time_left(wait))? {
            Ok(manifest) => return Ok(Some(manifest)),
            Err(NoManifest::Damaged(bytes)) => {
                let len = bytes.len();
                copies.push(bytes);
                // An altered Offer gives a copy of another length: it votes with its own kind.
                let alike: Vec<Vec<u8>> =
                    copies.iter().filter(|c| c.len() == len).cloned().collect();
                if alike.len() >= 3 {
                    let voted = delta::vote(&alike).and_then(|v| Manifest::decode(&v, &id).ok());
                    if voted.is_some() {
                        return Ok(voted);
                    }
                }
            }
            Err(NoManifest::Refused) if refusals == 0 => refusals += 1,
            Err(_) => return Ok(None),
        }
    }
    Ok(None)
}

/// What [`Client::get`] brought: one object, or the files of a bundle.
// One per download, moved once: boxing the larger report would only cost the caller a deref.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Got {
    /// An object, verified in the cache (and at the output, if one was given).
    Object(Report),
    /// A bundle, each of its files installed under the output directory.
    Bundle(BundleReport),
}

/// The report's one line.
impl std::fmt::Display for Got {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Got::Object(r) => r.fmt(f),
            Got::Bundle(r) => r.fmt(f),
        }
    }
}

/// Options of one download ([`Client::fetch`], [`Client::fetch_from`],
/// [`Client::fetch_bundle`]); the defaults write only to the cache and never give up while the
/// server answers.
#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    /// Also write the object here (atomically), if set. Only a regular file is replaced: a
    /// symbolic link is followed, and a directory, device, FIFO or socket is refused
    /// ([`StoreError::NotAFile`]).
    pub output: Option<PathBuf>,
    /// Give up after this long in total (the idle timeout applies regardless).
    pub timeout: Option<Duration>,
    /// Local files that may hold parts of the object (older versions of a map, say): its
    /// manifest is fetched first, and every block found in them (at any offset) is copied
    /// instead of downloaded. An existing file at `output` is searched too. Unreadable files
    /// are skipped. See docs/ARCHITECTURE.md section 13.
    pub bases: Vec<PathBuf>,
    /// Set it to true (from another thread or a signal handler) to stop the download within
    /// about 50 ms: what arrived is written to the journal and the fetch returns
    /// [`FetchError::Stopped`]; the next fetch resumes from there.
    pub stop: Option<Arc<AtomicBool>>,
}

impl FetchOptions {
    /// Why a call that began at `started` must stop now, if it must: the stop flag, or the
    /// overall timeout.
    pub(super) fn stop_reason(&self, started: Instant) -> Option<FetchError> {
        if self
            .stop
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
        {
            return Some(FetchError::Stopped);
        }
        let limit = self.timeout?;
        (started.elapsed() >= limit).then_some(FetchError::Deadline(limit))
    }

    /// The files a delta download searches: `bases`, and `output` if it already exists (an
    /// older version under the same name).
    pub(super) fn all_bases(&self) -> Vec<PathBuf> {
        let mut bases = self.bases.clone();
        if let Some(out) = self.output.as_ref().filter(|o| o.is_file()) {
            bases.push(out.clone());
        }
        bases
    }
}

/// How far a download got, for [`Client::fetch`]'s progress callback.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Bytes of the object held so far.
    pub bytes_done: u64,
    /// The object's size.
    pub total: u64,
    /// The transfer's counters (round-trip time, datagrams, duplicates, drops).
    pub stats: Stats,
    /// What the download waits for before its first byte, if it waits: show it, so that a
    /// silent server is not a frozen screen.
    pub waiting: Option<Waiting>,
}

/// What a download waits for, in [`Progress::waiting`]. Displays as a short phrase ("waiting
/// for 10.0.0.5:7878 (3 s)").
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Waiting {
    /// The first answer of these servers, for `waited` so far.
    Answer {
        /// The servers asked.
        servers: Vec<SocketAddr>,
        /// How long they have been silent.
        waited: Duration,
    },
    /// A slot: the server is at its limit and queued the request, with `ahead` requests to be
    /// admitted first. The download keeps its place until its own timeout.
    Slot {
        /// Requests admitted before this one.
        ahead: u32,
    },
}

impl std::fmt::Display for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Waiting::Answer { servers, waited } => {
                write!(f, "waiting for {}", list(servers))?;
                if waited.as_secs() > 0 {
                    write!(f, " ({} s)", waited.as_secs())?;
                }
                Ok(())
            }
            Waiting::Slot { ahead } => write!(f, "waiting for a slot ({ahead} ahead)"),
        }
    }
}

/// Bytes held of the total, and the counters a status line shows: round-trip time,
/// duplicate chunks, datagrams dropped.
impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(waiting) = &self.waiting {
            return waiting.fmt(f);
        }
        write!(
            f,
            "{}/{} bytes  rtt {:.1} ms  {} duplicate chunks  {} dropped",
            self.bytes_done,
            self.total,
            self.stats.smoothed_rtt.as_secs_f64() * 1e3,
            self.stats.duplicate_chunks,
            self.stats.dropped.total()
        )
    }
}

/// What a finished download did.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The object, verified.
    pub object: ObjectId,
    /// Its size.
    pub size: u64,
    /// Where the verified object is in the cache.
    pub path: PathBuf,
    /// True when the cache already had it (verified, unchanged) and the network was not used.
    pub from_cache: bool,
    /// Bytes the cache held from an earlier, interrupted run (its journal vouched for them).
    pub resumed_bytes: u64,
    /// Bytes found on disk without a journal to vouch for them (a kill between two journal
    /// updates, a damaged cache entry) that matched the object's manifest and were kept.
    pub salvaged_bytes: u64,
    /// Bytes copied from local files (`FetchOptions::bases`) instead of downloaded.
    pub reused_bytes: u64,
    /// Set when the cache held a damaged copy of the object (what was wrong with it): the copy
    /// was set aside, checked against the manifest, and repaired by this download.
    pub damaged_entry: Option<String>,
    /// Bytes downloaded again because the first delivery did not match the object's manifest
    /// (altered on the way despite the checksum): the download repaired them instead of failing.
    pub repaired_bytes: u64,
    /// Times the download started over on a new connection, resuming what had arrived, after
    /// the path went silent mid-transfer and the server did not follow the client to its new
    /// address ([`TransferError::PathLost`]).
    pub path_restarts: u32,
    /// Sources of a multi-source download ([`Client::fetch_from`]) that delivered bytes that
    /// did not match the object's manifest, and were dropped.
    pub bad_sources: Vec<SocketAddr>,
    /// Wall-clock time of the download.
    pub duration: Duration,
    /// The transfer's counters (zero when served from the cache).
    pub stats: Stats,
}

/// Why [`Client::fetch`] failed. Displays as one sentence a player can act on.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The transfer failed (timed out, not found, busy, digest mismatch, disk error...). What
    /// arrived is kept in the cache for a resume.
    #[error("{}", transfer_sentence(.0))]
    Transfer(#[from] TransferError),
    /// The cache could not be used, or the output path cannot be written.
    #[error("{}", store_sentence(.0))]
    Store(#[from] StoreError),
    /// The socket failed, or the server address did not resolve.
    #[error("network error: {0}")]
    Io(#[from] io::Error),
    /// The overall timeout passed.
    #[error("gave up after {:.1} s, the time allowed", .0.as_secs_f64())]
    Deadline(Duration),
    /// [`FetchOptions::stop`] was set. What arrived is kept in the cache for a resume.
    #[error(
        "interrupted: what arrived is kept in the cache; run the same command again to resume"
    )]
    Stopped,
    /// None of the servers of a multi-source download ([`Client::fetch_from`]) answered at
    /// all: wrong addresses or ports, servers down, or a firewall between.
    #[error("no answer from any of the {} servers ({}) in {:.1} s", .servers.len(), list(.servers), .waited.as_secs_f64())]
    Unreachable {
        /// The servers asked.
        servers: Vec<SocketAddr>,
        /// How long they were waited for.
        waited: Duration,
    },
    /// No server was given, or a bundle was asked for without a directory to install it in:
    /// the call itself is wrong.
    #[error("{0}")]
    Usage(&'static str),
    /// A broken internal state: a bug in udpferry (please report it). What arrived is kept.
    #[error("internal error (a bug in udpferry; please report it): {0}")]
    Internal(&'static str),
    /// A bundle ([`Client::get`]) could not be installed; what was installed stays.
    #[error(transparent)]
    Bundle(#[from] BundleFetchError),
    /// The server's bytes do not hash to the id asked for, and repairing them from the
    /// object's manifest did not help: the server serves a wrong object under this id. Nothing
    /// was kept as done; try another server.
    #[error("{server} serves bytes that do not match {id}: {detail}")]
    BadServer {
        /// The server.
        server: SocketAddr,
        /// The object asked for.
        id: ObjectId,
        /// What showed it.
        detail: String,
    },
}

/// How long a download may hear nothing mid-transfer before it starts over on a new connection
/// (`TransferConfig::path_lost_after`): a few of the receiver's probes (at most 1 s apart) went
/// unanswered, so the server did not follow a change of our address.
const CLIENT_PATH_LOST_AFTER: std::time::Duration = std::time::Duration::from_secs(4);
/// Most restarts of one download after a lost path.
const MAX_PATH_RESTARTS: u32 = 3;

/// The client's default settings: the endpoint's, with [`CLIENT_PATH_LOST_AFTER`].
fn client_config() -> EndpointConfig {
    let mut config = EndpointConfig::default();
    config.transfer.path_lost_after = CLIENT_PATH_LOST_AFTER;
    config
}

/// Addresses as a comma-separated list.
fn list(servers: &[SocketAddr]) -> String {
    let named: Vec<String> = servers.iter().map(|a| a.to_string()).collect();
    named.join(", ")
}

/// Whether `err` is what an altered control datagram leaves behind (a protocol violation seen
/// by either side), worth one more attempt rather than a failure.
fn garbled(err: &TransferError) -> bool {
    matches!(
        err,
        TransferError::ProtocolViolation(_)
            | TransferError::Peer {
                code: crate::wire::ErrorCode::ProtocolViolation,
                ..
            }
    )
}

/// A transfer error in the words a player reads.
fn transfer_sentence(e: &TransferError) -> String {
    match e {
        TransferError::TimedOut(d) => format!(
            "timed out: no answer from the server for {:.0} s",
            d.as_secs_f64()
        ),
        TransferError::PathLost(d) => format!(
            "path lost: nothing from the server for {:.0} s mid-transfer, after starting over {MAX_PATH_RESTARTS} times (what arrived is kept; run the same command again to resume)",
            d.as_secs_f64()
        ),
        TransferError::NotFound => "not found: the server does not have this object".into(),
        TransferError::Busy => "server busy: its queue is full; try again later".into(),
        TransferError::DigestMismatch { actual, .. } => format!(
            "digest mismatch: the received bytes hash to {actual}; nothing was saved as done"
        ),
        TransferError::Storage { message, .. } => {
            format!("disk error: {message} (the partial download is kept)")
        }
        other => other.to_string(),
    }
}

/// A store error in the words a player reads: disk trouble says so; a refused output path
/// speaks for itself.
fn store_sentence(e: &StoreError) -> String {
    match e {
        StoreError::NotAFile { .. } | StoreError::LinkOutside { .. } => e.to_string(),
        _ => format!("disk error: {e}"),
    }
}

/// One line for a finished download: what arrived, how fast, and what was resumed, salvaged,
/// reused, repaired or refused. `udpferry get` prints it; docs/ARCHITECTURE.md section 8 lists
/// its forms.
impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.from_cache {
            return write!(
                f,
                "{}: {} bytes, already in the cache ({})",
                self.object,
                self.size,
                self.path.display()
            );
        }
        let secs = self.duration.as_secs_f64().max(1e-9);
        let local = (self.resumed_bytes + self.salvaged_bytes + self.reused_bytes).min(self.size);
        write!(
            f,
            "{}: {} bytes in {secs:.2} s ({:.2} MB/s), {} bytes retransmitted",
            self.object,
            self.size,
            (self.size - local) as f64 / secs / 1e6,
            self.stats.bytes_retransmitted
        )?;
        for (bytes, what) in [
            (self.resumed_bytes, "resumed from {} bytes"),
            (self.reused_bytes, "reused {} bytes from local files"),
            (
                self.salvaged_bytes,
                "kept {} unjournaled bytes that matched the manifest",
            ),
            (
                self.repaired_bytes,
                "re-fetched {} bytes that arrived altered",
            ),
            (
                u64::from(self.path_restarts),
                "started over {} time(s) after the path went silent, resuming what had arrived",
            ),
        ] {
            if bytes > 0 {
                write!(f, ", {}", what.replace("{}", &bytes.to_string()))?;
            }
        }
        if let Some(problem) = &self.damaged_entry {
            write!(
                f,
                "; the cached copy was damaged ({problem}) and has been repaired"
            )?;
        }
        if !self.bad_sources.is_empty() {
            write!(f, "; dropped {} for sending wrong bytes", list(&self.bad_sources))?;
        }
        Ok(())
    }
}

/// The same sentence as `Display`, so that a program whose `main` returns this error (through
/// `?` and `Box<dyn Error>`) prints words a player can act on, not a variant dump. Match on the
/// variants to act on an error in code.
impl std::fmt::Debug for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}
