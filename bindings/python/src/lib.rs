//! Python bindings for udpferry (the `udpferry._udpferry` extension module).
//!
//! - [`Endpoint`]: the sans-IO endpoint in the naming of Python's sans-IO network libraries
//!   (aioquic, qh3): `receive_datagram`, `datagrams_to_send`, `get_timer`, `handle_timer`,
//!   `next_event`. The game keeps its socket; addresses are `(host, port)` tuples and times are
//!   the caller's clock in seconds (`time.monotonic()`), both converted here so Python's cost per
//!   datagram stays a few microseconds.
//! - [`fetch`] and [`Server`]: the blocking client and the threaded server of the Rust crate,
//!   with the GIL released while they work.
//! - The exceptions, all under `udpferry.Error`.
//!
//! `udpferry.panda3d` (pure Python, on top of `Endpoint`) adapts it to a Panda3D
//! `QueuedConnectionReader` loop.

#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use udpferry::{
    canonical_addr as canonical, Cache, ChunkSink, ChunkSource, Client, ContentStore,
    Endpoint as CoreEndpoint, EndpointConfig, Event as CoreEvent, FetchError, FetchOptions,
    ObjectId, ObjectProvider, PartialFile, RangeSet, Role, Served, Server as CoreServer,
    ServerConfig, ServerHandle, StoreError, TransferError,
};

create_exception!(
    _udpferry,
    Error,
    PyException,
    "Base class of every udpferry error."
);
create_exception!(
    _udpferry,
    NotFound,
    Error,
    "The server does not have the object (or the file is not there)."
);
create_exception!(
    _udpferry,
    TimedOut,
    Error,
    "No answer in time: the server is gone, or the timeout passed."
);
create_exception!(
    _udpferry,
    DigestMismatch,
    Error,
    "The bytes that arrived do not have the MD5 they were asked for; nothing was kept."
);
create_exception!(
    _udpferry,
    Busy,
    Error,
    "The server is at its limit and refused the transfer."
);
create_exception!(
    _udpferry,
    ProtocolError,
    Error,
    "The peer broke the protocol (a hostile or broken peer)."
);
create_exception!(
    _udpferry,
    StorageError,
    Error,
    "Reading or writing the disk failed (full disk, permissions, a damaged cache)."
);
create_exception!(
    _udpferry,
    Stopped,
    Error,
    "The fetch was stopped (its progress callback raised, or it was cancelled)."
);

/// The Python exception for a transfer's failure.
fn transfer_error(e: &TransferError) -> PyErr {
    let text = e.to_string();
    match e {
        TransferError::NotFound => NotFound::new_err(text),
        e if e.is_silence() => TimedOut::new_err(text),
        TransferError::DigestMismatch { .. } => DigestMismatch::new_err(text),
        TransferError::Busy => Busy::new_err(text),
        TransferError::Storage { .. } => StorageError::new_err(text),
        _ => ProtocolError::new_err(text),
    }
}

fn fetch_error(e: &FetchError) -> PyErr {
    let text = e.to_string();
    match e {
        FetchError::Transfer(t) => transfer_error(t),
        FetchError::Deadline(_) | FetchError::Unreachable { .. } => TimedOut::new_err(text),
        FetchError::Stopped => Stopped::new_err(text),
        FetchError::Store(_) | FetchError::Io(_) => StorageError::new_err(text),
        FetchError::Usage(_) => PyValueError::new_err(text),
        _ => Error::new_err(text),
    }
}

fn store_error(e: &StoreError) -> PyErr {
    StorageError::new_err(e.to_string())
}

fn parse_id(id: &str) -> PyResult<ObjectId> {
    id.trim()
        .parse()
        .map_err(|e| PyValueError::new_err(format!("{id:?} is not an object id: {e}")))
}

/// `(host, port)` to an address: an IP literal directly, a name through the resolver.
fn to_addr(addr: &Bound<'_, PyAny>) -> PyResult<SocketAddr> {
    let tuple = addr
        .cast::<PyTuple>()
        .map_err(|_| PyTypeError::new_err("an address is a (host, port) tuple"))?;
    if tuple.len() < 2 {
        return Err(PyTypeError::new_err("an address is a (host, port) tuple"));
    }
    let host: String = tuple.get_item(0)?.extract()?;
    let port: u16 = tuple.get_item(1)?.extract()?;
    if let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Ok(canonical(SocketAddr::new(ip, port)));
    }
    (host.as_str(), port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .map(canonical)
        .ok_or_else(|| PyValueError::new_err(format!("cannot resolve {host:?}")))
}

fn from_addr<'py>(py: Python<'py>, addr: SocketAddr) -> PyResult<Bound<'py, PyTuple>> {
    PyTuple::new(
        py,
        [
            addr.ip().to_string().into_pyobject(py)?.into_any(),
            addr.port().into_pyobject(py)?.into_any(),
        ],
    )
}

/// What an `Endpoint` serves: directories (by the MD5 of each file) and byte strings.
#[derive(Default)]
struct Objects {
    dirs: Vec<ContentStore>,
    bytes: HashMap<ObjectId, Arc<[u8]>>,
}

enum Source {
    Bytes(Arc<[u8]>),
    File(Served),
}

impl ChunkSource for Source {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self {
            Source::Bytes(b) => b.read_at(offset, buf),
            Source::File(f) => f.read_at(offset, buf),
        }
    }
}

impl ObjectProvider for Objects {
    type Source = Source;

    fn open(&mut self, id: &ObjectId) -> io::Result<Option<(u64, Source)>> {
        if let Some(b) = self.bytes.get(id) {
            return Ok(Some((b.len() as u64, Source::Bytes(b.clone()))));
        }
        for dir in &mut self.dirs {
            if let Some((size, s)) = dir.open(id)? {
                return Ok(Some((size, Source::File(s))));
            }
        }
        Ok(None)
    }

    fn size_of(&mut self, id: &ObjectId) -> io::Result<Option<u64>> {
        if let Some(b) = self.bytes.get(id) {
            return Ok(Some(b.len() as u64));
        }
        for dir in &mut self.dirs {
            if let Some(size) = dir.size_of(id)? {
                return Ok(Some(size));
            }
        }
        Ok(None)
    }
}

/// Where a download goes: memory, or a partial file of a cache (resumable).
enum Sink {
    Memory(Vec<u8>),
    Cache(Box<PartialFile>),
}

impl ChunkSink for Sink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        match self {
            Sink::Memory(v) => v.write_at(offset, data),
            Sink::Cache(p) => p.write_at(offset, data),
        }
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self {
            Sink::Memory(v) => ChunkSink::read_at(v, offset, buf),
            Sink::Cache(p) => p.read_at(offset, buf),
        }
    }
}

/// The download started: the server offered the object.
#[pyclass(frozen, get_all, module = "udpferry")]
struct Started {
    /// The transfer's number (what `Endpoint.fetch` returned, or the server's own).
    transfer: u64,
    /// The object id (MD5, hex).
    object: String,
    /// The peer's `(host, port)`.
    peer: Py<PyTuple>,
    /// True on the fetching side.
    fetching: bool,
    /// The object's size in bytes.
    size: u64,
}

/// More of the object is done (at most a few times a second).
#[pyclass(frozen, get_all, module = "udpferry")]
struct Progress {
    transfer: u64,
    object: String,
    peer: Py<PyTuple>,
    fetching: bool,
    /// Bytes held (fetching) or acknowledged (serving).
    bytes_done: u64,
    /// The object's size.
    total: u64,
}

/// The server is at its limit and queued the request; the download starts by itself later.
#[pyclass(frozen, get_all, module = "udpferry")]
struct Queued {
    transfer: u64,
    object: String,
    peer: Py<PyTuple>,
    fetching: bool,
    /// Requests the server admits before this one.
    ahead: u32,
}

/// The object arrived whole and its MD5 matched (fetching), or the client confirmed it
/// (serving). Final.
#[pyclass(frozen, get_all, module = "udpferry")]
struct Completed {
    transfer: u64,
    object: String,
    peer: Py<PyTuple>,
    fetching: bool,
    size: u64,
    /// Where the object is, for a fetch into a cache directory.
    path: Option<String>,
    /// The bytes, for a fetch without a cache directory.
    data: Option<Py<PyBytes>>,
}

/// The transfer ended without success. Final. `error` is the exception (`NotFound`,
/// `TimedOut`, `DigestMismatch`, ...); a cache download keeps what arrived for a resume.
#[pyclass(frozen, get_all, module = "udpferry")]
struct Failed {
    transfer: u64,
    object: String,
    peer: Py<PyTuple>,
    fetching: bool,
    error: Py<PyAny>,
}

/// A `Failed` event carrying `error`.
fn failed(
    py: Python<'_>,
    transfer: u64,
    object: String,
    peer: Py<PyTuple>,
    fetching: bool,
    error: PyErr,
) -> PyResult<Py<PyAny>> {
    let error = error.into_value(py).into_any();
    Ok(Py::new(
        py,
        Failed {
            transfer,
            object,
            peer,
            fetching,
            error,
        },
    )?
    .into_any())
}

/// The caller's clock (seconds, any origin, e.g. `time.monotonic()`) against `Instant`.
struct Clock {
    origin: Instant,
    origin_secs: Option<f64>,
}

impl Clock {
    fn instant(&mut self, now: Option<f64>) -> PyResult<Instant> {
        let Some(now) = now else {
            return Ok(Instant::now());
        };
        if !now.is_finite() {
            return Err(PyValueError::new_err(
                "now must be a finite number of seconds",
            ));
        }
        let base = *self.origin_secs.get_or_insert_with(|| {
            self.origin = Instant::now();
            now
        });
        let ahead = now - base;
        Ok(if ahead >= 0.0 {
            self.origin + Duration::from_secs_f64(ahead.min(1e9))
        } else {
            self.origin
                .checked_sub(Duration::from_secs_f64((-ahead).min(1e6)))
                .unwrap_or(self.origin)
        })
    }

    fn seconds(&self, t: Instant) -> f64 {
        let base = self.origin_secs.unwrap_or(0.0);
        match t.checked_duration_since(self.origin) {
            Some(d) => base + d.as_secs_f64(),
            None => base - self.origin.duration_since(t).as_secs_f64(),
        }
    }
}

/// A udpferry endpoint without I/O: many transfers, both roles, behind the caller's socket.
///
/// Each tick: hand it every udpferry datagram that arrived (`receive_datagram`; check with
/// `is_udpferry_datagram` when the socket is shared), call `handle_timer` once `get_timer` is
/// due, send every `(data, addr)` of `datagrams_to_send`, then drain `next_event`. Times are
/// the caller's clock in seconds (`time.monotonic()`), or omitted for the endpoint's own.
#[pyclass(unsendable, module = "udpferry")]
struct Endpoint {
    inner: CoreEndpoint<Objects, Sink>,
    clock: Clock,
    caches: HashMap<PathBuf, Cache>,
    events: VecDeque<Py<PyAny>>,
    buf: Vec<u8>,
}

#[pymethods]
impl Endpoint {
    /// A new endpoint. `rate`: a cap on all its sending together, bytes per second;
    /// `client_rate`: a cap per transfer; `standard`: fill the path instead of yielding to
    /// other traffic (the default keeps its queueing delay near 25 ms); `seed`: for
    /// connection ids and nonces (random if omitted); `burst`: datagrams the pacer may send
    /// back to back, at least what one tick of your loop carries (the default, 256, covers
    /// about 18 MB/s at 60 Hz; the Rust driver, which wakes for every pacing instant, uses 10).
    #[new]
    #[pyo3(signature = (*, rate=None, client_rate=None, standard=false, seed=None, burst=256))]
    fn new(
        rate: Option<u64>,
        client_rate: Option<u64>,
        standard: bool,
        seed: Option<u64>,
        burst: u32,
    ) -> Self {
        let mut config = EndpointConfig {
            seed: seed.map_or_else(udpferry::random_seed, u128::from),
            ..EndpointConfig::default()
        };
        config.transfer.burst_datagrams = burst.max(1);
        if let Some(r) = rate {
            config.rate_limit_bytes_per_sec = r;
        }
        if let Some(r) = client_rate {
            config.transfer.max_rate_bytes_per_sec = r;
        }
        if standard {
            config.transfer.congestion = udpferry::CongestionControl::Standard;
        }
        Endpoint {
            inner: CoreEndpoint::new(config, Objects::default()),
            clock: Clock {
                origin: Instant::now(),
                origin_secs: None,
            },
            caches: HashMap::new(),
            events: VecDeque::new(),
            buf: vec![0; 2048],
        }
    }

    /// Serves every file under `path` by the MD5 of its bytes (hashed now, once). Returns the
    /// number of objects it found.
    fn serve_dir(&mut self, py: Python<'_>, path: PathBuf) -> PyResult<usize> {
        let store = py
            .detach(|| ContentStore::open(&path))
            .map_err(|e| store_error(&e))?;
        let count = store.objects().count();
        self.inner.provider_mut().dirs.push(store);
        Ok(count)
    }

    /// Serves `data` (kept in memory) and returns its id, the MD5 in hex.
    fn serve_bytes(&mut self, data: &[u8]) -> String {
        let id = ObjectId::md5_of(data);
        self.inner.provider_mut().bytes.insert(id, Arc::from(data));
        id.to_hex()
    }

    /// Starts fetching object `id` (MD5 hex) from `addr` (`(host, port)`). With `cache_dir`,
    /// into that cache (resuming what an earlier attempt left; `Completed.path` names the
    /// file); without, into memory (`Completed.data`). Returns the transfer number events
    /// carry. Send `datagrams_to_send` next.
    #[pyo3(signature = (addr, id, cache_dir=None, now=None))]
    fn fetch(
        &mut self,
        addr: &Bound<'_, PyAny>,
        id: &str,
        cache_dir: Option<PathBuf>,
        now: Option<f64>,
    ) -> PyResult<u64> {
        let addr = to_addr(addr)?;
        let object = parse_id(id)?;
        let now = self.clock.instant(now)?;
        let (sink, have) = match &cache_dir {
            None => (Sink::Memory(Vec::new()), RangeSet::new()),
            Some(dir) => {
                if !self.caches.contains_key(dir) {
                    let cache = Cache::open(dir).map_err(|e| store_error(&e))?;
                    self.caches.insert(dir.clone(), cache);
                }
                let cache = &self.caches[dir];
                if cache.contains(&object) {
                    // Already here: a completed event without a transfer.
                    let path = cache.path_of(&object);
                    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    let t = Python::attach(|py| -> PyResult<Py<PyAny>> {
                        Ok(Py::new(
                            py,
                            Completed {
                                transfer: 0,
                                object: object.to_hex(),
                                peer: from_addr(py, addr)?.unbind(),
                                fetching: true,
                                size,
                                path: Some(path.display().to_string()),
                                data: None,
                            },
                        )?
                        .into_any())
                    })?;
                    self.events.push_back(t);
                    return Ok(0);
                }
                let (mut partial, have) = cache.begin(&object).map_err(|e| store_error(&e))?;
                // Journal syncs (fdatasync, rename) on a thread of their own, not in the
                // game's frame.
                partial
                    .set_background_journal(true)
                    .map_err(|e| store_error(&e))?;
                (Sink::Cache(Box::new(partial)), have)
            }
        };
        Ok(self.inner.fetch(now, addr, object, &have, sink).0)
    }

    /// Stops transfer `transfer`; it ends with a `Failed` event.
    fn cancel(&mut self, transfer: u64) {
        self.inner.cancel(udpferry::TransferId(transfer));
    }

    /// Hands the endpoint one datagram that arrived from `addr` (`(host, port)`). Datagrams that
    /// are not udpferry's are counted and dropped.
    #[pyo3(signature = (data, addr, now=None))]
    fn receive_datagram(
        &mut self,
        data: &[u8],
        addr: &Bound<'_, PyAny>,
        now: Option<f64>,
    ) -> PyResult<()> {
        let addr = to_addr(addr)?;
        let now = self.clock.instant(now)?;
        self.inner.handle_datagram(now, addr, data);
        Ok(())
    }

    /// Everything the endpoint wants to send now, as a list of `(data, (host, port))`; send
    /// them all. Call it every tick, and after `fetch` and `receive_datagram`.
    #[pyo3(signature = (now=None))]
    fn datagrams_to_send<'py>(
        &mut self,
        py: Python<'py>,
        now: Option<f64>,
    ) -> PyResult<Bound<'py, PyList>> {
        let now = self.clock.instant(now)?;
        let out = PyList::empty(py);
        let mut last: Option<(SocketAddr, Bound<'py, PyTuple>)> = None;
        while let Some(t) = self.inner.poll_transmit(now, &mut self.buf) {
            let addr = match &last {
                Some((a, tuple)) if *a == t.destination => tuple.clone(),
                _ => {
                    let tuple = from_addr(py, t.destination)?;
                    last = Some((t.destination, tuple.clone()));
                    tuple
                }
            };
            let data = PyBytes::new(py, &self.buf[..t.len]);
            out.append((data, addr))?;
        }
        Ok(out)
    }

    /// When `handle_timer` is due next, on the caller's clock, or None when nothing is pending.
    fn get_timer(&self) -> Option<f64> {
        self.inner.poll_timeout().map(|t| self.clock.seconds(t))
    }

    /// Fires what is due at `now` (retransmissions, acknowledgements, timeouts). Call it when
    /// `get_timer` has passed, then send `datagrams_to_send`.
    #[pyo3(signature = (now=None))]
    fn handle_timer(&mut self, now: Option<f64>) -> PyResult<()> {
        let now = self.clock.instant(now)?;
        self.inner.handle_timeout(now);
        Ok(())
    }

    /// The next event (`Started`, `Queued`, `Progress`, `Completed`, `Failed`), or None.
    fn next_event(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        if let Some(e) = self.events.pop_front() {
            return Ok(Some(e));
        }
        let Some(e) = self.inner.poll_event() else {
            return Ok(None);
        };
        let transfer = e.transfer.0;
        let object = e.object.to_hex();
        let peer = from_addr(py, e.peer)?.unbind();
        let fetching = e.role == Role::Fetching;
        let event = match e.event {
            CoreEvent::Started { size } => Py::new(
                py,
                Started {
                    transfer,
                    object,
                    peer,
                    fetching,
                    size,
                },
            )?
            .into_any(),
            CoreEvent::Queued { ahead } => Py::new(
                py,
                Queued {
                    transfer,
                    object,
                    peer,
                    fetching,
                    ahead,
                },
            )?
            .into_any(),
            CoreEvent::Progress { bytes_done, total } => Py::new(
                py,
                Progress {
                    transfer,
                    object,
                    peer,
                    fetching,
                    bytes_done,
                    total,
                },
            )?
            .into_any(),
            CoreEvent::Completed(c) => {
                let (mut path, mut data) = (None, None);
                match self.inner.take_sink(e.transfer).filter(|_| fetching) {
                    Some(Sink::Memory(v)) => data = Some(PyBytes::new(py, &v).unbind()),
                    Some(Sink::Cache(p)) => match py.detach(move || p.finalize()) {
                        Ok(p) => path = Some(p.display().to_string()),
                        Err(err) => {
                            let failed =
                                failed(py, transfer, object, peer, fetching, store_error(&err));
                            return failed.map(Some);
                        }
                    },
                    None => {}
                }
                Py::new(
                    py,
                    Completed {
                        transfer,
                        object,
                        peer,
                        fetching,
                        size: c.size,
                        path,
                        data,
                    },
                )?
                .into_any()
            }
            CoreEvent::Failed(err) => {
                // A cache download keeps its partial file and journal for a resume.
                drop(self.inner.take_sink(e.transfer));
                failed(py, transfer, object, peer, fetching, transfer_error(&err))?
            }
            // A kind of event this binding does not know yet: skip it.
            _ => return self.next_event(py),
        };
        Ok(Some(event))
    }

    /// Transfers in progress.
    fn transfer_count(&self) -> usize {
        self.inner.transfer_count()
    }
}

/// True when `data` is a udpferry datagram (a cheap check of its first bytes): route it to
/// `Endpoint.receive_datagram`, the rest to the game.
#[pyfunction]
fn is_udpferry_datagram(data: &[u8]) -> bool {
    udpferry::is_udpferry_datagram(data)
}

/// The MD5 of `data` as an object id (hex), the name a server gives a map.
#[pyfunction]
fn object_id(data: &[u8]) -> String {
    ObjectId::md5_of(data).to_hex()
}

/// Fetches object `id` (MD5 hex) from `server` (`"host:port"` or `(host, port)`) and returns
/// the path of the verified file: in `cache` (default: the user's cache directory), and also at
/// `output` when given. Blocks until done, with the GIL released (run it in a thread to keep a
/// loop going). `timeout`: seconds for the whole fetch. `progress(bytes_done, total)` is called
/// now and then; if it raises, the fetch stops and the exception propagates. Raises `NotFound`,
/// `TimedOut`, `DigestMismatch`, `StorageError`, ... (all `udpferry.Error`), `ValueError` for a
/// malformed id.
#[pyfunction]
#[pyo3(signature = (server, id, output=None, cache=None, timeout=None, progress=None))]
fn fetch(
    py: Python<'_>,
    server: &Bound<'_, PyAny>,
    id: &str,
    output: Option<PathBuf>,
    cache: Option<PathBuf>,
    timeout: Option<f64>,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    let server = match server.extract::<String>() {
        Ok(s) => s
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .map(canonical)
            .ok_or_else(|| PyValueError::new_err(format!("cannot resolve {s:?}")))?,
        Err(_) => to_addr(server)?,
    };
    let object = parse_id(id)?;
    let cache = match cache.or_else(Cache::default_dir) {
        Some(c) => c,
        None => return Err(PyValueError::new_err("no cache directory: pass cache=")),
    };
    let timeout = match timeout {
        Some(t) if !(t.is_finite() && t > 0.0) => {
            return Err(PyValueError::new_err(
                "timeout must be a positive number of seconds",
            ))
        }
        t => t.map(Duration::from_secs_f64),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let options = FetchOptions {
        output,
        timeout,
        stop: Some(stop.clone()),
        ..FetchOptions::default()
    };
    let raised: Mutex<Option<PyErr>> = Mutex::new(None);
    let outcome = py.detach(|| {
        let client = Client::new(&cache).map_err(FetchError::from)?;
        client.fetch(server, object, &options, |p| {
            let Some(cb) = &progress else { return };
            let result = Python::attach(|py| cb.call1(py, (p.bytes_done, p.total)).map(drop));
            if let Err(e) = result {
                if let Ok(mut slot) = raised.lock() {
                    slot.get_or_insert(e);
                }
                stop.store(true, Ordering::Relaxed);
            }
        })
    });
    if let Some(e) = raised.lock().ok().and_then(|mut s| s.take()) {
        return Err(e);
    }
    match outcome {
        Ok(report) => Ok(report.path.display().to_string()),
        Err(e) => Err(fetch_error(&e)),
    }
}

/// Serves every file under `dir` by the MD5 of its bytes, on its own threads, following the
/// directory (files added, changed or removed are picked up). `listen`: `"host:port"` (port 0
/// picks one; see `address`); `rate`: a cap on all sending, bytes per second; `client_rate`:
/// a cap per transfer. `start()` begins serving, `stop()` ends it; usable as a context manager.
#[pyclass(module = "udpferry")]
struct Server {
    dir: PathBuf,
    listen: String,
    rate: Option<u64>,
    client_rate: Option<u64>,
    handle: Option<ServerHandle>,
}

#[pymethods]
impl Server {
    #[new]
    #[pyo3(signature = (dir, listen="0.0.0.0:7878".to_string(), rate=None, client_rate=None))]
    fn new(dir: PathBuf, listen: String, rate: Option<u64>, client_rate: Option<u64>) -> Self {
        Server {
            dir,
            listen,
            rate,
            client_rate,
            handle: None,
        }
    }

    /// Indexes the directory (hashing each file once) and starts serving. Raises
    /// `StorageError` when the directory cannot be read, `OSError` when the address is taken.
    fn start(&mut self, py: Python<'_>) -> PyResult<()> {
        if self.handle.is_some() {
            return Ok(());
        }
        let listen: SocketAddr = self
            .listen
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| PyValueError::new_err(format!("cannot resolve {:?}", self.listen)))?;
        let mut config = ServerConfig::default();
        if let Some(r) = self.rate {
            config.endpoint.rate_limit_bytes_per_sec = r;
        }
        if let Some(r) = self.client_rate {
            config.endpoint.transfer.max_rate_bytes_per_sec = r;
        }
        let dir = self.dir.clone();
        let handle = py.detach(move || -> PyResult<ServerHandle> {
            let store = ContentStore::open(&dir).map_err(|e| store_error(&e))?;
            let server = CoreServer::bind(listen, store, config)?;
            Ok(server.spawn()?)
        })?;
        self.handle = Some(handle);
        Ok(())
    }

    /// Stops serving (transfers in progress end; their clients resume elsewhere or later).
    fn stop(&mut self, py: Python<'_>) -> PyResult<()> {
        if let Some(handle) = self.handle.take() {
            py.detach(move || handle.stop())?;
        }
        Ok(())
    }

    /// The `(host, port)` it listens on, once started.
    #[getter]
    fn address<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyTuple>>> {
        self.handle
            .as_ref()
            .map(|h| from_addr(py, h.local_addr()))
            .transpose()
    }

    fn __enter__<'py>(mut slf: PyRefMut<'py, Self>) -> PyResult<PyRefMut<'py, Self>> {
        let py = slf.py();
        slf.start(py)?;
        Ok(slf)
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&mut self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> PyResult<bool> {
        self.stop(py)?;
        Ok(false)
    }
}

#[pymodule]
fn _udpferry(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("Error", py.get_type::<Error>())?;
    m.add("NotFound", py.get_type::<NotFound>())?;
    m.add("TimedOut", py.get_type::<TimedOut>())?;
    m.add("DigestMismatch", py.get_type::<DigestMismatch>())?;
    m.add("Busy", py.get_type::<Busy>())?;
    m.add("ProtocolError", py.get_type::<ProtocolError>())?;
    m.add("StorageError", py.get_type::<StorageError>())?;
    m.add("Stopped", py.get_type::<Stopped>())?;
    m.add_class::<Endpoint>()?;
    m.add_class::<Server>()?;
    m.add_class::<Started>()?;
    m.add_class::<Queued>()?;
    m.add_class::<Progress>()?;
    m.add_class::<Completed>()?;
    m.add_class::<Failed>()?;
    m.add_function(wrap_pyfunction!(is_udpferry_datagram, m)?)?;
    m.add_function(wrap_pyfunction!(object_id, m)?)?;
    m.add_function(wrap_pyfunction!(fetch, m)?)?;
    Ok(())
}
