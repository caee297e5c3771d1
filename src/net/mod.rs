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
use crate::store::{Cache, ContentStore, PartialFile, StoreError};

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
}

/// Options of [`Client::fetch`].
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// The cache: verified objects by id, and partial downloads with their resume journals.
    pub cache_dir: PathBuf,
    /// Also write the object here (atomically), if set.
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

    /// Options with the given cache directory and defaults otherwise.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        FetchOptions {
            cache_dir: cache_dir.into(),
            output: None,
            timeout: None,
            endpoint: EndpointConfig::default(),
            bind: None,
            bases: Vec::new(),
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
    /// True when the cache already had it and the network was not used.
    pub from_cache: bool,
    /// Bytes the cache held from an earlier, interrupted run.
    pub resumed_bytes: u64,
    /// Bytes copied from local files (`FetchOptions::bases`) instead of downloaded.
    pub reused_bytes: u64,
    /// Sources of a multi-source download ([`Client::fetch_from`]) that delivered bytes that
    /// did not match the object's manifest, and were dropped.
    pub bad_sources: Vec<SocketAddr>,
    /// Wall-clock time of the download.
    pub duration: Duration,
    /// The transfer's counters (zero when served from the cache).
    pub stats: Stats,
}

/// Why [`Client::fetch`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The transfer failed (timed out, not found, busy, digest mismatch, disk error...). What
    /// arrived is kept in the cache for a resume.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// The cache could not be used.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The socket failed, or the server address did not resolve.
    #[error("network error: {0}")]
    Io(#[from] io::Error),
    /// The overall timeout passed.
    #[error("gave up after {0:?}")]
    Deadline(Duration),
}

/// Downloads objects over UDP into a cache.
#[derive(Debug)]
pub struct Client;

impl Client {
    /// Fetches `id` from `server` into the cache (and `options.output`), resuming a partial
    /// download found in the cache, or copying from the cache without touching the network when
    /// it already holds the object. `progress` is called as bytes arrive (at most every 100 ms)
    /// with what arrived and the transfer's counters.
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
        if let Some(report) = from_cache(&cache, id, options, &mut progress, started)? {
            return Ok(report);
        }
        let server = server
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "server address not found"))?;
        let mut driver = options.driver_for(server)?;
        let (mut partial, have) = cache.begin(&id)?;
        partial.set_background_journal(true)?;
        let resumed_bytes = have.covered();
        // Delta: blocks of the object that local files already hold are copied, not fetched.
        let bases = options.all_bases();
        let mut reused_bytes = 0;
        let have = match bases.is_empty() {
            true => have,
            false => match delta::fetch_manifest(
                &mut driver,
                server,
                id,
                options.endpoint.clone(),
                MANIFEST_WAIT,
            )? {
                Some(manifest) => {
                    reused_bytes = delta::reuse_blocks(&manifest, &bases, &mut partial)?;
                    partial.received().clone()
                }
                None => have,
            },
        };
        let mut config = options.endpoint.clone();
        config.seed = random_seed();
        let mut endpoint: Endpoint<NoObjects, PartialFile> = Endpoint::new(config, NoObjects);
        let transfer = fetch_hashed(&mut endpoint, server, id, &have, partial);
        let mut outcome: Option<Result<(u64, Stats), TransferError>> = None;
        let mut no_space: Option<StoreError> = None;
        while outcome.is_none() && no_space.is_none() {
            if let Some(limit) = options.timeout {
                if started.elapsed() >= limit {
                    endpoint.cancel(transfer);
                    driver.flush(&mut endpoint);
                    if let Some(mut partial) = endpoint.take_sink(transfer) {
                        let _ = partial.checkpoint();
                    }
                    return Err(FetchError::Deadline(limit));
                }
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
        }
        if let Some(e) = no_space {
            // The offered object does not fit (the transfer was cancelled): keep what is here.
            driver.flush(&mut endpoint);
            if let Some(mut partial) = endpoint.take_sink(transfer) {
                let _ = partial.checkpoint();
            }
            return Err(e.into());
        }
        let Some(partial) = endpoint.take_sink(transfer) else {
            return Err(FetchError::Io(io::Error::other(
                "download lost its partial file",
            )));
        };
        match outcome {
            Some(Ok((size, stats))) => {
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
                Ok(Report {
                    object: id,
                    size,
                    path,
                    from_cache: false,
                    resumed_bytes,
                    reused_bytes,
                    bad_sources: Vec::new(),
                    duration: started.elapsed(),
                    stats,
                })
            }
            Some(Err(err)) => {
                keep_or_discard(partial, &err);
                driver.flush(&mut endpoint);
                Err(err.into())
            }
            None => Err(FetchError::Io(io::Error::other(
                "download ended without a result",
            ))),
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
        if let Some(report) = from_cache(&cache, id, options, &mut progress, started)? {
            return Ok(report);
        }
        multi::fetch_from(servers, id, options, &mut progress, started, &cache)
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
/// digest mismatch, where some stored bytes are wrong and nothing says which, so the partial is
/// thrown away and the next attempt starts afresh.
fn keep_or_discard(mut partial: PartialFile, err: &TransferError) {
    if matches!(err, TransferError::DigestMismatch { .. }) {
        let _ = partial.discard();
    } else {
        let _ = partial.checkpoint();
    }
}

/// The report for an object the cache already holds (copied to `options.output` if set), or
/// `None` when it does not hold it.
fn from_cache(
    cache: &Cache,
    id: ObjectId,
    options: &FetchOptions,
    progress: &mut dyn FnMut(&Progress),
    started: Instant,
) -> Result<Option<Report>, FetchError> {
    if !cache.contains(&id) {
        return Ok(None);
    }
    let path = cache.path_of(&id);
    let size = std::fs::metadata(&path)
        .map_err(|e| StoreError::io("read metadata of", &path, e))?
        .len();
    if let Some(out) = &options.output {
        cache.copy_out(&id, out)?;
    }
    progress(&Progress {
        bytes_done: size,
        total: size,
        stats: Stats::default(),
    });
    Ok(Some(Report {
        object: id,
        size,
        path,
        from_cache: true,
        resumed_bytes: size,
        reused_bytes: 0,
        bad_sources: Vec::new(),
        duration: started.elapsed(),
        stats: Stats::default(),
    }))
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
