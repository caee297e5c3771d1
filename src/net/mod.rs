//! A thin `std::net::UdpSocket` driver around the sans-IO [`Endpoint`].
//!
//! Two ways in:
//! - blocking: [`Client::fetch`] downloads one object into a cache, [`Server::bind`] +
//!   [`Server::run_until`] serve a [`ContentStore`];
//! - poll-style, for a game that keeps its own socket: use [`Endpoint`] directly (see
//!   examples/game_loop.rs): route datagrams for which
//!   [`is_udpferry_datagram`](crate::is_udpferry_datagram) is true to
//!   [`Endpoint::handle_datagram`], and once per tick drain [`Endpoint::poll_transmit`] into your
//!   socket.
//!
//! [`Driver`] is the whole socket loop: wait for a datagram or the endpoint's next timer, feed
//! the endpoint every queued datagram, fire its timer, send what is due in batches, hand out
//! events.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::core::{
    ChunkSink, Endpoint, EndpointConfig, EndpointEvent, Event, NoObjects, ObjectProvider, RangeSet,
    Stats, TransferError, TransferId,
};
use crate::id::ObjectId;
use crate::store::{self, Cache, ContentStore, Lookup, PartialFile, StoreError};

mod bundle;
mod delta;
mod driver;
mod hasher;
mod multi;
pub use bundle::{
    BundleFetchError, BundleProgress, BundleReport, FileError, FileFailure, CONCURRENT_FILES,
};
pub use driver::{Activity, Driver};
pub use hasher::HashThread;

/// Socket buffer size requested for both directions (the kernel may grant less).
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;
/// Longest a delta download waits for the object's manifest before fetching it whole.
const MANIFEST_WAIT: Duration = Duration::from_secs(10);
/// Longest the blocking loops sleep without checking their stop flag or deadline.
const MAX_WAIT: Duration = Duration::from_millis(50);

/// Opens a UDP socket bound to `addr` with large send and receive buffers (socket2). An IPv6
/// wildcard address also accepts IPv4 where the system allows it.
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer only costs throughput.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        let _ = socket.set_only_v6(false);
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Serves every object of the store, and the manifest of each (for delta downloads).
impl ObjectProvider for ContentStore {
    type Source = crate::store::Served;
    fn open(&mut self, id: &ObjectId) -> io::Result<Option<(u64, Self::Source)>> {
        self.open_any(id).map_err(Into::into)
    }
    /// From the index, without touching the disk: a request may come from a forged address,
    /// and only the Start's `open` re-checks (and if need be re-hashes) the file.
    fn size_of(&mut self, id: &ObjectId) -> io::Result<Option<u64>> {
        Ok(self.size_of_any(id))
    }
}

/// Settings of a [`Server`].
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// Limits and transfer settings; `seed` is replaced by operating-system randomness.
    pub endpoint: EndpointConfig,
}

/// Serves a [`ContentStore`] on a UDP socket until told to stop.
pub struct Server {
    driver: Driver,
    endpoint: Endpoint<ContentStore, Vec<u8>>,
    bytes_sent: Arc<AtomicU64>,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port; see [`local_addr`](Self::local_addr)) and prepares
    /// to serve `store`. Call [`run_until`](Self::run_until) next.
    pub fn bind(addr: SocketAddr, store: ContentStore, config: ServerConfig) -> io::Result<Self> {
        let driver = Driver::new(bind(addr)?)?;
        let mut endpoint_config = config.endpoint;
        endpoint_config.seed = random_seed();
        Ok(Server {
            driver,
            endpoint: Endpoint::new(endpoint_config, store),
            bytes_sent: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.driver.local_addr()
    }

    /// A counter of UDP payload bytes sent, readable from another thread while the server runs.
    pub fn bytes_sent_counter(&self) -> Arc<AtomicU64> {
        self.bytes_sent.clone()
    }

    /// Serves until `stop` becomes true (checked at least every 50 ms), calling `on_event` for
    /// every transfer event. Returns an error only if the socket fails.
    pub fn run_until(
        &mut self,
        stop: &AtomicBool,
        on_event: impl FnMut(&EndpointEvent),
    ) -> io::Result<()> {
        self.run_with_reports(stop, on_event, Duration::MAX, |_| {})
    }

    /// Like [`run_until`](Self::run_until), and also calls `on_report` with the endpoint every
    /// `interval` while at least one transfer is active (for status lines: see
    /// [`Endpoint::transfers`] and [`Endpoint::stats`]).
    pub fn run_with_reports(
        &mut self,
        stop: &AtomicBool,
        mut on_event: impl FnMut(&EndpointEvent),
        interval: Duration,
        mut on_report: impl FnMut(&Endpoint<ContentStore, Vec<u8>>),
    ) -> io::Result<()> {
        let mut next_report = Instant::now().checked_add(interval);
        while !stop.load(Ordering::Relaxed) {
            self.driver
                .turn(&mut self.endpoint, MAX_WAIT, &mut |_, e| on_event(&e))?;
            self.bytes_sent
                .store(self.endpoint.stats().bytes_sent, Ordering::Relaxed);
            if let Some(at) = next_report.filter(|at| Instant::now() >= *at) {
                if self.endpoint.transfer_count() > 0 {
                    on_report(&self.endpoint);
                }
                next_report = at.checked_add(interval);
            }
        }
        Ok(())
    }

    /// The endpoint, for its statistics.
    pub fn endpoint(&self) -> &Endpoint<ContentStore, Vec<u8>> {
        &self.endpoint
    }

    /// Serves on a thread of its own until the returned handle is stopped or dropped: for a
    /// game server or a tool that has other work on its main thread. Call it instead of
    /// [`run_until`](Self::run_until).
    pub fn spawn(mut self) -> io::Result<ServerHandle> {
        let addr = self.local_addr()?;
        let bytes_sent = self.bytes_sent_counter();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("udpferry-server".into())
            .spawn(move || self.run_until(&flag, |_| {}))?;
        Ok(ServerHandle {
            addr,
            bytes_sent,
            stop,
            thread: Some(thread),
        })
    }
}

/// A [`Server`] running on its own thread ([`Server::spawn`]). Dropping it stops the server
/// and waits for the thread (at most about 50 ms); [`stop`](Self::stop) does the same and
/// returns the socket error that ended it early, if any.
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    bytes_sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl ServerHandle {
    /// The address the server listens on: give it to clients.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// UDP payload bytes the server has sent so far.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    /// Stops the server and waits for its thread. An error is the socket's, if it failed
    /// while serving.
    pub fn stop(mut self) -> io::Result<()> {
        self.halt()
    }

    fn halt(&mut self) -> io::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(io::Error::other("the server thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

/// Options of [`Client::fetch`].
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// The cache: verified objects by id, and partial downloads with their resume journals.
    pub cache_dir: PathBuf,
    /// Also write the object here (atomically), if set. Only a regular file is replaced: a
    /// symbolic link is followed, and a directory, device, FIFO or socket is refused
    /// ([`StoreError::NotAFile`]).
    pub output: Option<PathBuf>,
    /// Give up after this long in total (the idle timeout applies regardless).
    pub timeout: Option<Duration>,
    /// Transfer settings.
    pub endpoint: EndpointConfig,
    /// Local address to bind (default: the wildcard of the server's family, any port).
    pub bind: Option<SocketAddr>,
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
    /// A driver on a socket bound to `bind`, or to the wildcard address of `server`'s family.
    fn driver_for(&self, server: SocketAddr) -> io::Result<Driver> {
        let local = self.bind.unwrap_or(if server.is_ipv6() {
            SocketAddr::from(([0u16; 8], 0))
        } else {
            SocketAddr::from(([0u8; 4], 0))
        });
        Driver::new(bind(local)?)
    }

    /// The files a delta download searches: `bases`, and `output` if it already exists (an
    /// older version under the same name).
    fn all_bases(&self) -> Vec<PathBuf> {
        let mut bases = self.bases.clone();
        if let Some(out) = self.output.as_ref().filter(|o| o.is_file()) {
            bases.push(out.clone());
        }
        bases
    }

    /// Why a download that began at `started` must stop now, if it must: the caller's stop
    /// flag, or the overall timeout.
    fn must_stop(&self, started: Instant) -> Option<FetchError> {
        if self
            .stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed))
        {
            return Some(FetchError::Stopped);
        }
        let limit = self.timeout?;
        (started.elapsed() >= limit).then_some(FetchError::Deadline(limit))
    }

    /// How long a step may still take before the overall timeout, capped at `step`.
    fn time_left(&self, started: Instant, step: Duration) -> Duration {
        self.timeout
            .map_or(step, |t| t.saturating_sub(started.elapsed()).min(step))
    }

    /// Options with the given cache directory and defaults otherwise.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        FetchOptions {
            cache_dir: cache_dir.into(),
            output: None,
            timeout: None,
            endpoint: EndpointConfig::default(),
            bind: None,
            bases: Vec::new(),
            stop: None,
        }
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
    /// Sources of a multi-source download ([`Client::fetch_from`]) that delivered bytes that
    /// did not match the object's manifest, and were dropped.
    pub bad_sources: Vec<SocketAddr>,
    /// Wall-clock time of the download.
    pub duration: Duration,
    /// The transfer's counters (zero when served from the cache).
    pub stats: Stats,
}

/// Why [`Client::fetch`] failed. Displays as one sentence a player can act on.
#[derive(Debug, thiserror::Error)]
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
    #[error("gave up after {0:?}")]
    Deadline(Duration),
    /// [`FetchOptions::stop`] was set. What arrived is kept in the cache for a resume.
    #[error(
        "interrupted: what arrived is kept in the cache; run the same command again to resume"
    )]
    Stopped,
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
        TransferError::NotFound => "not found: the server does not have this object".into(),
        TransferError::Busy => "server busy: try again later".into(),
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
            let named: Vec<String> = self.bad_sources.iter().map(|a| a.to_string()).collect();
            write!(f, "; dropped {} for sending wrong bytes", named.join(", "))?;
        }
        Ok(())
    }
}

/// Repair rounds after a digest mismatch before the server is blamed (each re-fetches only
/// the blocks that disagree with the manifest).
const MAX_REPAIR_ROUNDS: u32 = 4;

/// Downloads objects over UDP into a cache.
#[derive(Debug)]
pub struct Client;

impl Client {
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
    /// Blocks until the object is verified or the transfer failed.
    pub fn fetch(
        server: impl ToSocketAddrs,
        id: ObjectId,
        options: &FetchOptions,
        mut progress: impl FnMut(&Progress),
    ) -> Result<Report, FetchError> {
        let started = Instant::now();
        let cache = Cache::open(&options.cache_dir)?;
        let damaged_entry = match from_cache(&cache, id, options, &mut progress, started)? {
            CacheHit::Served(report) => return Ok(*report),
            CacheHit::Damaged(problem) => Some(problem),
            CacheHit::Missing => None,
        };
        let server = server
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "server address not found"))?;
        let mut driver = options.driver_for(server)?;
        let (mut partial, have) = cache.begin(&id)?;
        partial.set_background_journal(true)?;
        let resumed_bytes = have.covered();
        // Unvouched bytes and local files both need the manifest: blocks that match it are
        // kept or copied instead of fetched.
        let bases = options.all_bases();
        let mut manifest = None;
        let (mut salvaged_bytes, mut reused_bytes) = (0, 0);
        if !bases.is_empty() || partial.has_unverified() {
            manifest = fetch_manifest(&mut driver, server, id, options, started)?;
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
        let mut rounds = 0;
        let mut asked_again = false;
        loop {
            let have = partial.received().clone();
            let Attempt {
                mut endpoint,
                partial: partial_back,
                outcome,
            } = download_once(
                &mut driver,
                server,
                id,
                &have,
                partial,
                options,
                started,
                &mut progress,
            )?;
            partial = partial_back;
            let (size, stats) = match outcome {
                Ok(done) => done,
                Err(TransferError::DigestMismatch { expected, actual }) => {
                    // Some stored bytes are wrong. Which ones the manifest says.
                    driver.flush(&mut endpoint);
                    if manifest.is_none() {
                        manifest = fetch_manifest(&mut driver, server, id, options, started)?;
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
                Err(TransferError::NotFound) if !asked_again => {
                    // An altered Request names another object; a server that really lacks
                    // this one says so twice.
                    driver.flush(&mut endpoint);
                    asked_again = true;
                    continue;
                }
                Err(err) if garbled(&err) && rounds < MAX_REPAIR_ROUNDS => {
                    // A control datagram altered on its way (an Offer with another size, say)
                    // broke the exchange, not the server: ask again, resuming what is held.
                    // Bytes written under a garbled offer are caught by the digest and repaired.
                    driver.flush(&mut endpoint);
                    partial.checkpoint()?;
                    rounds += 1;
                    continue;
                }
                Err(err) => {
                    let _ = partial.checkpoint();
                    driver.flush(&mut endpoint);
                    return Err(err.into());
                }
            };
            progress(&Progress {
                bytes_done: size,
                total: size,
                stats: stats.clone(),
            });
            let path = partial.finalize()?;
            if let Some(out) = &options.output {
                cache.copy_out(&id, out)?;
            }
            // Answer a sender that missed our Done for about one of its probe timeouts
            // (bounded), in the background so the caller has its object at once. If the
            // process exits first, the sender times out on its own.
            let linger_for = (stats.smoothed_rtt * 3 + Duration::from_millis(30))
                .min(Duration::from_millis(500));
            driver.flush(&mut endpoint);
            std::thread::spawn(move || linger(&mut driver, &mut endpoint, linger_for));
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
                bad_sources: Vec::new(),
                duration: started.elapsed(),
                stats,
            });
        }
    }

    /// Fetches `id` from several servers at once: each delivers pieces of it (cut along the
    /// object's manifest, which every server is asked for), faster servers deliver more, every
    /// piece is checked against the manifest's block hashes, and a server that fails or sends
    /// bytes that do not match is dropped (and named in [`Report::bad_sources`]) while the
    /// others take over its pieces. The object's own digest checks the result. Needs servers
    /// that serve manifests (any `net::Server` over a `ContentStore`); with one server, use
    /// [`fetch`](Self::fetch). Caching, `output`, `bases` and `timeout` work as in `fetch`.
    ///
    /// Blocks until the object is verified or no server is left.
    pub fn fetch_from(
        servers: &[SocketAddr],
        id: ObjectId,
        options: &FetchOptions,
        mut progress: impl FnMut(&Progress),
    ) -> Result<Report, FetchError> {
        let started = Instant::now();
        let cache = Cache::open(&options.cache_dir)?;
        let damaged_entry = match from_cache(&cache, id, options, &mut progress, started)? {
            CacheHit::Served(report) => return Ok(*report),
            CacheHit::Damaged(problem) => Some(problem),
            CacheHit::Missing => None,
        };
        let mut report = multi::fetch_from(servers, id, options, &mut progress, started, &cache)?;
        report.damaged_entry = damaged_entry;
        Ok(report)
    }
}

/// Starts downloading `id` from `server` into `partial` (holding `have` already), with the
/// digest computed on a second core ([`HashThread`]), or on this one if no thread can start.
fn fetch_hashed(
    endpoint: &mut Endpoint<NoObjects, PartialFile>,
    server: SocketAddr,
    id: ObjectId,
    have: &RangeSet,
    partial: PartialFile,
) -> TransferId {
    let transfer = endpoint.fetch(Instant::now(), server, id, have, partial);
    if let Ok(hasher) = HashThread::for_id(&id) {
        endpoint.set_hasher(transfer, Box::new(hasher));
    }
    transfer
}

/// On a download's `Started` event: records the offered size and checks that the disk can hold
/// it. If not, cancels the transfer before its Start goes out (the server is told, nothing is
/// sent) and returns why.
fn accept_size(
    endpoint: &mut Endpoint<NoObjects, PartialFile>,
    transfer: TransferId,
    size: u64,
) -> Option<StoreError> {
    let refused = endpoint.sink_mut(transfer).and_then(|p| {
        p.set_size(size);
        p.ensure_space().err()
    });
    if refused.is_some() {
        endpoint.cancel(transfer);
    }
    refused
}

/// After a failed download: keeps what arrived for a resume (checkpoint), except after a
/// digest mismatch, where some stored bytes are wrong and nothing here says which, so the
/// partial is thrown away and the next attempt starts afresh. ([`Client::fetch`] repairs a
/// mismatch from the manifest instead.)
fn keep_or_discard(mut partial: PartialFile, err: &TransferError) {
    if matches!(err, TransferError::DigestMismatch { .. }) {
        let _ = partial.discard();
    } else {
        let _ = partial.checkpoint();
    }
}

/// What the cache holds for a download, from [`from_cache`].
enum CacheHit {
    /// Verified and unchanged: served without the network (copied to `output` if set).
    Served(Box<Report>),
    /// A damaged entry, set aside as an unverified partial download for this download to
    /// check and repair; what was wrong with it.
    Damaged(String),
    /// Nothing finished in the cache.
    Missing,
}

/// Looks `id` up in the cache ([`Cache::lookup`]): a verified entry is copied to
/// `options.output` (if set) and reported; a damaged one is set aside for repair.
fn from_cache(
    cache: &Cache,
    id: ObjectId,
    options: &FetchOptions,
    progress: &mut dyn FnMut(&Progress),
    started: Instant,
) -> Result<CacheHit, FetchError> {
    let (path, size) = match cache.lookup(&id)? {
        Lookup::Verified { path, size } => (path, size),
        Lookup::Damaged { problem, .. } => {
            cache.set_aside_damaged(&id)?;
            return Ok(CacheHit::Damaged(problem));
        }
        _ => return Ok(CacheHit::Missing),
    };
    if let Some(out) = &options.output {
        cache.copy_out(&id, out)?;
    }
    progress(&Progress {
        bytes_done: size,
        total: size,
        stats: Stats::default(),
    });
    Ok(CacheHit::Served(Box::new(Report {
        object: id,
        size,
        path,
        from_cache: true,
        resumed_bytes: size,
        salvaged_bytes: 0,
        reused_bytes: 0,
        damaged_entry: None,
        repaired_bytes: 0,
        bad_sources: Vec::new(),
        duration: started.elapsed(),
        stats: Stats::default(),
    })))
}

/// One transfer of `id` from `server` into `partial`, which holds `have` already: drives it
/// until it completes or fails, handing out progress. Returns the endpoint (to send the Done
/// and linger), the partial file and the outcome. A stop, the overall timeout or a disk that
/// cannot hold the object cancel the transfer, checkpoint the partial and return the error.
#[allow(clippy::too_many_arguments)]
fn download_once(
    driver: &mut Driver,
    server: SocketAddr,
    id: ObjectId,
    have: &RangeSet,
    partial: PartialFile,
    options: &FetchOptions,
    started: Instant,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Attempt, FetchError> {
    let mut config = options.endpoint.clone();
    config.seed = random_seed();
    let mut endpoint: Endpoint<NoObjects, PartialFile> = Endpoint::new(config, NoObjects);
    let transfer = fetch_hashed(&mut endpoint, server, id, have, partial);
    let mut outcome: Option<Result<(u64, Stats), TransferError>> = None;
    let mut no_space: Option<StoreError> = None;
    let stopped = loop {
        if let Some(why) = options.must_stop(started) {
            break Some(why);
        }
        driver.turn(&mut endpoint, MAX_WAIT, &mut |ep, e| match e.event {
            Event::Started { size } => no_space = accept_size(ep, e.transfer, size),
            Event::Progress { bytes_done, total } => {
                let stats = ep.transfer_stats(e.transfer).unwrap_or_default();
                progress(&Progress {
                    bytes_done,
                    total,
                    stats,
                })
            }
            Event::Completed(c) => outcome = Some(Ok((c.size, c.stats))),
            Event::Failed(err) => outcome = Some(Err(err)),
        })?;
        if let Some(e) = no_space.take() {
            // The offered object does not fit (the transfer was cancelled): keep what is here.
            break Some(e.into());
        }
        if outcome.is_some() {
            break None;
        }
    };
    if let Some(why) = stopped {
        endpoint.cancel(transfer);
        driver.flush(&mut endpoint);
        if let Some(mut partial) = endpoint.take_sink(transfer) {
            let _ = partial.checkpoint();
        }
        return Err(why);
    }
    let Some(partial) = endpoint.take_sink(transfer) else {
        return Err(FetchError::Io(io::Error::other(
            "download lost its partial file",
        )));
    };
    let outcome = outcome.unwrap_or(Err(TransferError::Cancelled));
    Ok(Attempt {
        endpoint,
        partial,
        outcome,
    })
}

/// What one transfer of [`download_once`] left: the endpoint (to send the Done and linger),
/// the partial file, and the outcome (size and counters, or why it failed).
struct Attempt {
    endpoint: Endpoint<NoObjects, PartialFile>,
    partial: PartialFile,
    outcome: Result<(u64, Stats), TransferError>,
}

/// Attempts at a manifest that keeps arriving altered before the download goes without one.
const MANIFEST_ATTEMPTS: usize = 8;

/// The manifest of `id` from `server` (checked), within what is left of the overall timeout:
/// `None` when the server has none or does not answer in time. A manifest altered on its way
/// fails its own digest and is fetched again; once three copies are in, they vote byte by byte
/// ([`delta::vote`]), so a manifest too large to arrive unaltered through a path that alters a
/// few datagrams still arrives. A "not found" is asked once more (an altered request names
/// another object).
fn fetch_manifest(
    driver: &mut Driver,
    server: SocketAddr,
    id: ObjectId,
    options: &FetchOptions,
    started: Instant,
) -> Result<Option<store::manifest::Manifest>, FetchError> {
    let mut copies: Vec<Vec<u8>> = Vec::new();
    let mut refusals = 0;
    for _ in 0..MANIFEST_ATTEMPTS {
        if let Some(why) = options.must_stop(started) {
            return Err(why);
        }
        let limit = options.time_left(started, MANIFEST_WAIT);
        match delta::fetch_manifest(driver, server, id, options.endpoint.clone(), limit)? {
            Ok(manifest) => return Ok(Some(manifest)),
            Err(delta::NoManifest::Damaged(bytes)) => {
                let len = bytes.len();
                copies.push(bytes);
                // An altered Offer gives a copy of another length: it votes with its own kind.
                let alike: Vec<Vec<u8>> =
                    copies.iter().filter(|c| c.len() == len).cloned().collect();
                if alike.len() >= 3 {
                    let voted = delta::vote(&alike)
                        .and_then(|v| store::manifest::Manifest::decode(&v, &id).ok());
                    if voted.is_some() {
                        return Ok(voted);
                    }
                }
            }
            Err(delta::NoManifest::Refused) if refusals == 0 => refusals += 1,
            Err(_) => return Ok(None),
        }
    }
    Ok(None)
}

fn linger<P: ObjectProvider, K: ChunkSink>(
    driver: &mut Driver,
    endpoint: &mut Endpoint<P, K>,
    for_at_most: Duration,
) {
    let until = Instant::now() + for_at_most;
    while Instant::now() < until && endpoint.poll_timeout().is_some() {
        if driver.turn(endpoint, MAX_WAIT, &mut |_, _| {}).is_err() {
            break;
        }
    }
}

/// 128 bits for an endpoint's key (`EndpointConfig::seed`), without a dependency: two draws
/// from std's `RandomState`, whose keys the standard library takes from the operating
/// system's generator (getrandom on Linux) and which hashes the clock and process id under
/// them (see the store's temporary names, which use the same source).
pub fn random_seed() -> u128 {
    (u128::from(crate::store::random_u64()) << 64) | u128::from(crate::store::random_u64())
}
