//! The blocking server: [`Server`] serves a [`ContentStore`] on a UDP socket, on the calling
//! thread ([`Server::run_until`]) or on one of its own ([`Server::spawn`]).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{bind, random_seed, Driver, Framing, MAX_WAIT};
use crate::core::{Endpoint, EndpointConfig, EndpointEvent, TransferInfo};
use crate::store::{ContentStore, IndexChange};

/// Transfers a [`ServerStatus`] lists at most.
const STATUS_TRANSFERS: usize = 4;

/// What a running [`Server`] is doing, for [`Server::run_with_reports`]
/// ([`ServerReport::Status`]). Displays as one
/// status line: transfers, sending rate, and the first few active transfers.
#[derive(Debug, Clone)]
pub struct ServerStatus {
    /// Transfers the endpoint holds (active, or finished and lingering).
    pub transfers: usize,
    /// Bytes per second sent since the last report (0 in the first).
    pub sending_bytes_per_sec: f64,
    /// The first few active transfers.
    pub active: Vec<TransferInfo>,
}

impl std::fmt::Display for ServerStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} transfers, sending {:.2} MB/s",
            self.transfers,
            self.sending_bytes_per_sec / 1e6
        )?;
        for t in &self.active {
            write!(f, " | {t}")?;
        }
        Ok(())
    }
}

/// What [`Server::run_with_reports`] hands its `on_report` callback. Displays as the line
/// `udpferry serve -v` prints for it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ServerReport {
    /// Every `interval` while at least one transfer is active.
    Status(ServerStatus),
    /// A rescan changed what is served, or skipped an entry ([`IndexChange::is_warning`]), as
    /// soon as it is applied.
    Index(IndexChange),
}

impl std::fmt::Display for ServerReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerReport::Status(status) => status.fmt(f),
            ServerReport::Index(change) => change.fmt(f),
        }
    }
}

/// How often a [`Server`] rescans its directory by default ([`ServerConfig::rescan_interval`]).
const DEFAULT_RESCAN_INTERVAL: Duration = Duration::from_secs(2);

/// Settings of a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Limits and transfer settings; `seed` is replaced by operating-system randomness.
    pub endpoint: EndpointConfig,
    /// How long after one rescan of the served directory the next starts
    /// ([`ContentStore::start_rescan`]: `stat` only, hashing on a thread of its own just the
    /// files that are new or changed). `None`: only when asked ([`Server::rescan_flag`],
    /// [`ServerHandle::rescan`]) or when a request found a file changed. Default: 2 s.
    pub rescan_interval: Option<Duration>,
    /// How datagrams are framed on the socket: [`Framing::Panda3d`] serves Panda3D clients in
    /// their default (non-raw) mode. Default: plain.
    pub framing: Framing,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            endpoint: EndpointConfig::default(),
            rescan_interval: Some(DEFAULT_RESCAN_INTERVAL),
            framing: Framing::Plain,
        }
    }
}

/// Serves a [`ContentStore`] on a UDP socket until told to stop, following its directory: new,
/// changed and removed files are served without a restart (see
/// [`ServerConfig::rescan_interval`]).
pub struct Server {
    driver: Driver,
    endpoint: Endpoint<ContentStore, Vec<u8>>,
    bytes_sent: Arc<AtomicU64>,
    rescan_interval: Option<Duration>,
    rescan_now: Arc<AtomicBool>,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port; see [`local_addr`](Self::local_addr)) and prepares
    /// to serve `store`. Call [`run_until`](Self::run_until) next.
    pub fn bind(addr: SocketAddr, store: ContentStore, config: ServerConfig) -> io::Result<Self> {
        let driver = Driver::new(bind(addr)?)?.with_framing(config.framing);
        let mut endpoint_config = config.endpoint;
        endpoint_config.seed = random_seed();
        Ok(Server {
            driver,
            endpoint: Endpoint::new(endpoint_config, store),
            bytes_sent: Arc::new(AtomicU64::new(0)),
            rescan_interval: config.rescan_interval,
            rescan_now: Arc::new(AtomicBool::new(false)),
        })
    }

    /// A flag that starts a rescan of the served directory at the server's next turn (within
    /// 50 ms, or as soon as the running one ends) when set; the server clears it. Settable from
    /// another thread or a signal handler (`udpferry serve` sets it on SIGHUP).
    pub fn rescan_flag(&self) -> Arc<AtomicBool> {
        self.rescan_now.clone()
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
    /// every transfer event. Returns an error only if the socket fails. The directory is
    /// followed as with [`run_with_reports`](Self::run_with_reports); its changes are not
    /// reported.
    pub fn run_until(
        &mut self,
        stop: &AtomicBool,
        on_event: impl FnMut(&EndpointEvent),
    ) -> io::Result<()> {
        self.run_with_reports(stop, on_event, Duration::MAX, |_| {})
    }

    /// Like [`run_until`](Self::run_until), and also calls `on_report` with a
    /// [`ServerReport`]: a [`ServerStatus`] every `interval` while at least one transfer is
    /// active, and an [`IndexChange`] for every change a rescan applies (new, changed and
    /// removed files and bundles, skipped entries).
    ///
    /// Rescans run every [`ServerConfig::rescan_interval`] (counted from the end of the last
    /// one), at once when [`rescan_flag`](Self::rescan_flag) is set or a request found a file
    /// changed, and on a thread of their own: between two turns the server only applies what
    /// the running rescan has found so far.
    pub fn run_with_reports(
        &mut self,
        stop: &AtomicBool,
        mut on_event: impl FnMut(&EndpointEvent),
        interval: Duration,
        mut on_report: impl FnMut(&ServerReport),
    ) -> io::Result<()> {
        let mut next_report = Instant::now().checked_add(interval);
        let mut last: Option<(Instant, u64)> = None;
        let mut next_rescan = self.next_rescan();
        while !stop.load(Ordering::Relaxed) {
            self.driver
                .turn(&mut self.endpoint, MAX_WAIT, &mut |_, e| on_event(&e))?;
            let sent = self.endpoint.stats().bytes_sent;
            self.bytes_sent.store(sent, Ordering::Relaxed);
            let now = Instant::now();
            let store = self.endpoint.provider_mut();
            if store.rescanning() {
                if store.poll_rescan(|c| on_report(&ServerReport::Index(c))) {
                    next_rescan = self.next_rescan();
                }
            } else if self.rescan_now.swap(false, Ordering::Relaxed)
                || store.needs_rescan()
                || next_rescan.is_some_and(|at| now >= at)
            {
                if let Err(e) = store.start_rescan() {
                    on_report(&ServerReport::Index(IndexChange::Failed(e.to_string())));
                    next_rescan = self.next_rescan();
                }
            }
            if let Some(at) = next_report.filter(|at| now >= *at) {
                if self.endpoint.transfer_count() > 0 {
                    let rate = last.map_or(0.0, |(then, before)| {
                        sent.saturating_sub(before) as f64 / (now - then).as_secs_f64().max(1e-9)
                    });
                    on_report(&ServerReport::Status(ServerStatus {
                        transfers: self.endpoint.transfer_count(),
                        sending_bytes_per_sec: rate,
                        active: self
                            .endpoint
                            .transfers()
                            .filter(|t| !t.finished)
                            .take(STATUS_TRANSFERS)
                            .collect(),
                    }));
                }
                last = Some((now, sent));
                next_report = at.checked_add(interval);
            }
        }
        Ok(())
    }

    /// When the next periodic rescan is due, counted from now.
    fn next_rescan(&self) -> Option<Instant> {
        self.rescan_interval
            .and_then(|i| Instant::now().checked_add(i))
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
        let rescan = self.rescan_flag();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("udpferry-server".into())
            .spawn(move || self.run_until(&flag, |_| {}))?;
        Ok(ServerHandle {
            addr,
            bytes_sent,
            rescan,
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
    rescan: Arc<AtomicBool>,
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

    /// Rescans the served directory now, in the background (see [`Server::rescan_flag`]): for
    /// a program that just deployed new files and does not want to wait for the next periodic
    /// rescan.
    pub fn rescan(&self) {
        self.rescan.store(true, Ordering::Relaxed);
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

