//! Shared harness: one download through the simulator.
#![allow(dead_code)]

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use udpferry::core::{Event, RangeSet, Receiver, TransferConfig, TransferError};
use udpferry::wire::ConnectionId;
use udpferry::ObjectId;
use udpferry_sim::{Direction, LinkConfig, OneShotServer, Pair, Rng, RunOutcome};

pub mod cli;
pub mod relay;

/// What one simulated download produced.
pub struct Outcome {
    pub seed: u64,
    pub run: RunOutcome,
    pub data: Vec<u8>,
    pub receiver_events: Vec<Event>,
    pub sender_events: Vec<Event>,
    /// UDP payload bytes the server put on the wire, headers included.
    pub server_bytes_sent: u64,
    pub client_bytes_sent: u64,
    pub elapsed: Duration,
    pub steps: u64,
    pub retransmitted_bytes: u64,
}

impl Outcome {
    pub fn completed(&self) -> bool {
        self.receiver_events
            .iter()
            .any(|e| matches!(e, Event::Completed(_)))
    }

    pub fn failure(&self) -> Option<&TransferError> {
        self.receiver_events.iter().find_map(|e| match e {
            Event::Failed(err) => Some(err),
            _ => None,
        })
    }

    /// How long the client took from its first datagram to holding the verified object: what a
    /// user waits for. `elapsed` runs on until the server has the client's Done too, up to a
    /// second later when that Done is lost (the server waits that long before it asks again).
    pub fn download_time(&self) -> Option<Duration> {
        self.receiver_events.iter().find_map(|e| match e {
            Event::Completed(c) => Some(c.duration),
            _ => None,
        })
    }

    /// Bytes the server sent per byte of object.
    pub fn overhead(&self, size: usize) -> f64 {
        self.server_bytes_sent as f64 / size.max(1) as f64
    }
}

/// Deterministic pseudo-random object bytes.
pub fn object(size: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; size];
    Rng::new(seed ^ 0x000b_1ec7).fill_bytes(&mut data);
    data
}

/// Downloads `data` from a simulated server over the given links.
pub fn download(
    seed: u64,
    data: &[u8],
    to_client: LinkConfig,
    to_server: LinkConfig,
    config: TransferConfig,
) -> Outcome {
    download_with(
        seed,
        data,
        ObjectId::md5_of(data),
        to_client,
        to_server,
        config,
        5_000_000,
        None,
    )
}

/// Like [`download`] over a clean 10 ms path that loses everything from `after` on.
pub fn download_cut(seed: u64, data: &[u8], after: Duration, config: TransferConfig) -> Outcome {
    let link = LinkConfig::clean(Duration::from_millis(10));
    let id = ObjectId::md5_of(data);
    download_with(
        seed,
        data,
        id,
        link.clone(),
        link,
        config,
        5_000_000,
        Some(after),
    )
}

/// A `OneShotServer` serving `data` (under its MD5) and a fresh `Receiver` asking for `id`, joined
/// by the two links, their connection id and nonce drawn from `seed`.
pub fn one_shot_pair(
    seed: u64,
    start: Instant,
    data: &[u8],
    id: ObjectId,
    to_client: LinkConfig,
    to_server: LinkConfig,
    config: TransferConfig,
) -> Pair<OneShotServer<Vec<u8>>, Receiver<Vec<u8>>> {
    let mut rng = Rng::new(seed);
    let server = OneShotServer::new(
        ObjectId::md5_of(data),
        data.len() as u64,
        data.to_vec(),
        config.clone(),
        rng.next_u64(),
    );
    let receiver = Receiver::new(
        start,
        ConnectionId(rng.next_u64()),
        id,
        &RangeSet::new(),
        Vec::new(),
        config,
    );
    Pair::new(seed, start, server, receiver, to_client, to_server)
}

/// How the client side of an `EndpointPeer` pair ended: its last `Completed` or `Failed`.
pub fn client_end<P: udpferry::core::ObjectProvider, K: udpferry::core::ChunkSink>(
    peer: &udpferry_sim::EndpointPeer<P, K>,
) -> Option<Result<(), TransferError>> {
    peer.events.iter().rev().find_map(|(_, e)| match &e.event {
        Event::Completed(_) => Some(Ok(())),
        Event::Failed(err) => Some(Err(err.clone())),
        _ => None,
    })
}

#[allow(clippy::too_many_arguments)]
pub fn download_with(
    seed: u64,
    data: &[u8],
    id: ObjectId,
    to_client: LinkConfig,
    to_server: LinkConfig,
    config: TransferConfig,
    max_steps: u64,
    cut: Option<Duration>,
) -> Outcome {
    let start = Instant::now();
    let mut pair = one_shot_pair(seed, start, data, id, to_client, to_server, config);
    let server_bytes = Rc::new(Cell::new(0u64));
    let client_bytes = Rc::new(Cell::new(0u64));
    let (sb, cb) = (server_bytes.clone(), client_bytes.clone());
    pair.set_observer(Box::new(move |_, dir, d| match dir {
        Direction::AtoB => sb.set(sb.get() + d.len() as u64),
        Direction::BtoA => cb.set(cb.get() + d.len() as u64),
    }));
    let run = match cut {
        None => pair.run(max_steps, start + Duration::from_secs(24 * 3600)),
        Some(after) => {
            let first = pair.run(max_steps, start + after);
            if first == RunOutcome::BothFinished {
                first
            } else {
                pair.a_to_b.set_config(LinkConfig::default().with_loss(1.0));
                pair.b_to_a.set_config(LinkConfig::default().with_loss(1.0));
                pair.run(max_steps, start + Duration::from_secs(24 * 3600))
            }
        }
    };
    let mut receiver_events = Vec::new();
    while let Some(e) = pair.b.poll_event() {
        receiver_events.push(e);
    }
    let retransmitted_bytes = pair.a.sender().map_or(0, |s| s.stats().bytes_retransmitted);
    Outcome {
        seed,
        run,
        data: pair.b.sink().clone(),
        receiver_events,
        sender_events: std::mem::take(&mut pair.a.events),
        server_bytes_sent: server_bytes.get(),
        client_bytes_sent: client_bytes.get(),
        elapsed: pair.now - start,
        steps: pair.steps(),
        retransmitted_bytes,
    }
}

/// A well-formed request datagram for `id` on connection `conn`, with no have-set.
/// The request `request_datagram` and `start_datagram` carry: `id`, 1200-byte datagrams, no cap,
/// nothing held.
fn plain_request(id: ObjectId) -> udpferry::wire::Request<'static> {
    udpferry::wire::Request {
        object: id,
        max_datagram_size: 1200,
        max_rate_bytes_per_sec: 0,
        have: udpferry::wire::HaveRanges::List(&[]),
    }
}

fn encoded(conn: u64, frame: udpferry::wire::Frame<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; 1500];
    let n = udpferry::wire::Datagram {
        conn_id: ConnectionId(conn),
        frame,
    }
    .encode(&mut buf)
    .unwrap();
    buf.truncate(n);
    buf
}

/// The Start a client sends to echo `nonce` for the request `request_datagram(conn, id)` makes.
pub fn start_datagram(conn: u64, id: ObjectId, nonce: u64) -> Vec<u8> {
    let request = plain_request(id);
    encoded(conn, udpferry::wire::Frame::Start { nonce, request })
}

/// Whether `datagram` is a Done.
pub fn is_done(datagram: &[u8]) -> bool {
    matches!(
        udpferry::wire::decode(datagram),
        Ok(udpferry::wire::Datagram {
            frame: udpferry::wire::Frame::Done,
            ..
        })
    )
}

pub fn request_datagram(conn: u64, id: ObjectId) -> Vec<u8> {
    encoded(conn, udpferry::wire::Frame::Request(plain_request(id)))
}

static TEMP_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A fresh directory under the system's temporary folder, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let n = TEMP_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("udpferry-test-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn join(&self, rel: &str) -> std::path::PathBuf {
        self.0.join(rel)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `data` at `path` (creating its directory) and dates it a minute back: a served map is
/// not being written right now, and a file hashed moments after a write is hashed once more by
/// a later rescan (ARCHITECTURE section 6.2).
pub fn put_dated(path: &std::path::Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(std::time::SystemTime::now() - Duration::from_secs(60)))
        .unwrap();
}

/// A `net::Server` running on its own thread over 127.0.0.1 (`Server::spawn`), stopped on drop.
pub struct Serving {
    pub addr: std::net::SocketAddr,
    pub handle: udpferry::ServerHandle,
}

impl Serving {
    /// Serves `store` with `config` on 127.0.0.1.
    pub fn start(store: udpferry::ContentStore, config: udpferry::ServerConfig) -> Self {
        Self::start_on("127.0.0.1:0", store, config)
    }

    /// Serves `store` with `config` on `addr` (port 0 picks one).
    pub fn start_on(
        addr: &str,
        store: udpferry::ContentStore,
        config: udpferry::ServerConfig,
    ) -> Self {
        let handle = udpferry::Server::bind(addr.parse().unwrap(), store, config)
            .and_then(udpferry::Server::spawn)
            .unwrap();
        Serving {
            addr: handle.local_addr(),
            handle,
        }
    }

    /// Serves the directory `dir` with default settings.
    pub fn dir(dir: &std::path::Path) -> Self {
        Self::start(
            udpferry::ContentStore::open(dir).unwrap(),
            udpferry::ServerConfig::default(),
        )
    }

    /// UDP payload bytes sent so far, after a pause that lets the counter catch up.
    pub fn sent(&self) -> u64 {
        std::thread::sleep(Duration::from_millis(150));
        self.handle.bytes_sent()
    }
}

/// A server that serves whatever bytes it is given under whatever ids it is given: a hostile (or
/// broken) server, through the library's own endpoint and driver on its own thread, stopped on
/// drop.
pub struct Hostile {
    pub addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hostile {
    pub fn start(objects: std::collections::HashMap<ObjectId, std::sync::Arc<[u8]>>) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let socket = udpferry::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        let mut driver = udpferry::Driver::new(socket).unwrap();
        let config = udpferry::EndpointConfig {
            seed: udpferry::random_seed(),
            ..udpferry::EndpointConfig::default()
        };
        let mut endpoint: udpferry::Endpoint<
            std::collections::HashMap<ObjectId, std::sync::Arc<[u8]>>,
            Vec<u8>,
        > = udpferry::Endpoint::new(config, objects);
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                if driver
                    .turn(&mut endpoint, Duration::from_millis(20), &mut |_, _| {})
                    .is_err()
                {
                    break;
                }
            }
        });
        Hostile {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Objects a test server serves from memory.
pub type Maps = std::collections::HashMap<ObjectId, std::sync::Arc<[u8]>>;
/// The simulated server's address.
pub const SERVER: ([u8; 4], u16) = ([10, 0, 0, 1], 7878);
/// The simulated client's address.
pub const CLIENT: ([u8; 4], u16) = ([10, 0, 0, 2], 5000);

/// A server `Endpoint` over `Maps` and a client `Endpoint`, in the simulator.
pub type EndpointPair = Pair<
    udpferry_sim::EndpointPeer<Maps, Vec<u8>>,
    udpferry_sim::EndpointPeer<udpferry::core::NoObjects, Vec<u8>>,
>;

/// Two `Endpoint`s joined by the links: a server holding `data` (under its MD5, the returned
/// id) and a client that has just asked for it.
#[allow(clippy::too_many_arguments)]
pub fn endpoint_pair(
    seed: u64,
    start: Instant,
    server: udpferry::core::EndpointConfig,
    client: udpferry::core::EndpointConfig,
    data: &[u8],
    down: LinkConfig,
    up: LinkConfig,
) -> (ObjectId, EndpointPair) {
    use std::net::SocketAddr;
    use udpferry::core::{Endpoint, NoObjects};
    use udpferry_sim::EndpointPeer;
    let id = ObjectId::md5_of(data);
    let maps: Maps = [(id, std::sync::Arc::from(data))].into_iter().collect();
    let server = EndpointPeer::new(Endpoint::new(server, maps), SocketAddr::from(CLIENT));
    let mut client: EndpointPeer<NoObjects, Vec<u8>> =
        EndpointPeer::new(Endpoint::new(client, NoObjects), SocketAddr::from(SERVER));
    client.endpoint.fetch(
        start,
        SocketAddr::from(SERVER),
        id,
        &RangeSet::new(),
        Vec::new(),
    );
    (id, Pair::new(seed, start, server, client, down, up))
}
