//! A loopback UDP relay that impairs what it forwards, for tests over real sockets.
//!
//! [`Relay::start`] binds 127.0.0.1:0 and forwards every datagram a client sends it to the
//! upstream server, and the server's answers back, through one upstream socket per client
//! address (as a NAT does). Each direction is a [`Lane`] with its own seeded random stream that
//! decides per datagram what happens to it ([`Impairment`]): dropped (`loss`), or damaged so that
//! it still passes the CRC32 (`mutate`, exactly as the simulator's `LinkConfig::mutate`).
//! [`Relay::stats`] counts what each direction forwarded, mutated and dropped. Dropping the relay
//! stops it (its thread is joined within a few milliseconds).
//!
//! One thread polls every socket without blocking and naps for 200 µs when nothing came. A later
//! link emulator (rate, queue, delay, burst loss) fits in [`Lane::pass`] and a release queue in
//! that loop. `RelayConfig::rebind_at` re-maps clients mid-run by replacing their entries in the
//! NAT table (issue 17).

use std::collections::hash_map::{Entry, HashMap};
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use udpferry_sim::Rng;

/// Most datagrams taken from one socket before the others get a turn.
const BATCH: usize = 256;
/// Nap when a whole round found nothing to forward.
const IDLE_NAP: Duration = Duration::from_micros(200);

/// What happens to the datagrams of one direction.
#[derive(Clone, Debug, Default)]
pub struct Impairment {
    /// Probability that a datagram is dropped.
    pub loss: f64,
    /// Probability that a datagram gets 1 to 3 bits flipped before its CRC32 trailer and the
    /// trailer recomputed (it still passes the checksum).
    pub mutate: f64,
}

impl Impairment {
    /// Drops datagrams with probability `p`.
    pub fn loss(p: f64) -> Self {
        Impairment {
            loss: p,
            ..Impairment::default()
        }
    }

    /// Mutates datagrams (valid CRC) with probability `p`.
    pub fn mutate(p: f64) -> Self {
        Impairment {
            mutate: p,
            ..Impairment::default()
        }
    }
}

/// Settings of a [`Relay`].
#[derive(Clone, Debug, Default)]
pub struct RelayConfig {
    /// Seeds both directions' random streams.
    pub seed: u64,
    /// Client to server.
    pub to_server: Impairment,
    /// Server to client.
    pub to_client: Impairment,
    /// Re-map every client (as a NAT does that drops a mapping and makes a new one) each time
    /// the bytes passed on to clients reach one of these totals, ascending: from then on the
    /// client's datagrams reach the server from a fresh port, and what the server sends to the
    /// old one is read and thrown away (counted in `RelayStats::to_dead_mappings`).
    pub rebind_at: Vec<u64>,
    /// Drop every path challenge (kind 0x09) on its way to the client, as a middlebox that
    /// does not know the kind might: migration cannot succeed, the client must fall back.
    pub eat_path_challenges: bool,
}

impl RelayConfig {
    /// The same impairment both ways.
    pub fn both(seed: u64, impairment: Impairment) -> Self {
        RelayConfig {
            seed,
            to_server: impairment.clone(),
            to_client: impairment,
            rebind_at: Vec::new(),
            eat_path_challenges: false,
        }
    }
}

/// What one direction did so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LaneStats {
    /// Datagrams passed on (mutated ones included).
    pub forwarded: u64,
    /// Datagrams passed on damaged (with a valid CRC).
    pub mutated: u64,
    /// Datagrams dropped by `loss`.
    pub dropped: u64,
    /// Datagrams the relay could not send on (its socket buffer was full).
    pub unsent: u64,
}

/// What the relay did so far, per direction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Client to server.
    pub to_server: LaneStats,
    /// Server to client.
    pub to_client: LaneStats,
    /// Client addresses seen (one upstream socket each).
    pub clients: u64,
    /// Bytes of every datagram read from the server (before impairment), live mappings and
    /// dead ones: what the server sent.
    pub from_server_bytes: u64,
    /// Bytes the server sent to mappings the relay had dropped.
    pub to_dead_mappings: u64,
    /// Re-mappings done (see `RelayConfig::rebind_at`).
    pub rebinds: u64,
}

#[derive(Default)]
struct LaneCounters {
    forwarded: AtomicU64,
    mutated: AtomicU64,
    dropped: AtomicU64,
    unsent: AtomicU64,
}

impl LaneCounters {
    fn snapshot(&self) -> LaneStats {
        LaneStats {
            forwarded: self.forwarded.load(Ordering::Relaxed),
            mutated: self.mutated.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            unsent: self.unsent.load(Ordering::Relaxed),
        }
    }
}

#[derive(Default)]
struct Counters {
    to_server: LaneCounters,
    to_client: LaneCounters,
    clients: AtomicU64,
    from_server_bytes: AtomicU64,
    to_dead_mappings: AtomicU64,
    rebinds: AtomicU64,
}

/// One direction: its impairment, random stream and counters.
struct Lane {
    impairment: Impairment,
    rng: Rng,
    counters: Arc<Counters>,
    to_server: bool,
}

impl Lane {
    fn counters(&self) -> &LaneCounters {
        if self.to_server {
            &self.counters.to_server
        } else {
            &self.counters.to_client
        }
    }

    /// Decides the fate of `datagram` (possibly damaging it in place): true to send it on.
    fn pass(&mut self, datagram: &mut [u8]) -> bool {
        // Both draws for every datagram, so one direction's decisions depend only on its seed
        // and how many datagrams it carried.
        let lost = self.rng.chance(self.impairment.loss);
        let mutate = self.rng.chance(self.impairment.mutate);
        if lost {
            self.counters().dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if mutate && udpferry_sim::mutate(&mut self.rng, datagram) {
            self.counters().mutated.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    /// Counts the outcome of sending a passed datagram.
    fn sent(&self, result: std::io::Result<usize>) {
        let counter = match result {
            Ok(_) => &self.counters().forwarded,
            Err(_) => &self.counters().unsent,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A running relay; stopped (and its thread joined) on drop.
pub struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Relays between clients of 127.0.0.1:<some port> and `upstream`, impairing as `config`
    /// says. Panics if loopback sockets cannot be bound (a broken test machine).
    pub fn start(upstream: SocketAddr, config: RelayConfig) -> Relay {
        let front = udpferry::net::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind the relay's front socket");
        front
            .set_nonblocking(true)
            .expect("make the relay's front socket non-blocking");
        let addr = front.local_addr().expect("the relay's front address");
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let mut root = Rng::new(config.seed);
        let to_server = Lane {
            impairment: config.to_server,
            rng: root.fork(),
            counters: counters.clone(),
            to_server: true,
        };
        let to_client = Lane {
            impairment: config.to_client,
            rng: root.fork(),
            counters: counters.clone(),
            to_server: false,
        };
        let flag = stop.clone();
        let (rebind_at, eat) = (config.rebind_at, config.eat_path_challenges);
        let thread = std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || run(front, upstream, to_server, to_client, rebind_at, eat, &flag))
            .expect("spawn the relay thread");
        Relay {
            addr,
            stop,
            counters,
            thread: Some(thread),
        }
    }

    /// Where clients send to reach `upstream` through the relay.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Counters so far.
    pub fn stats(&self) -> RelayStats {
        RelayStats {
            to_server: self.counters.to_server.snapshot(),
            to_client: self.counters.to_client.snapshot(),
            clients: self.counters.clients.load(Ordering::Relaxed),
            from_server_bytes: self.counters.from_server_bytes.load(Ordering::Relaxed),
            to_dead_mappings: self.counters.to_dead_mappings.load(Ordering::Relaxed),
            rebinds: self.counters.rebinds.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The relay's loop: drain the front socket into the clients' upstream sockets and every
/// upstream socket back to its client, until `stop`.
fn run(
    front: UdpSocket,
    upstream: SocketAddr,
    mut to_server: Lane,
    mut to_client: Lane,
    rebind_at: Vec<u64>,
    eat_path_challenges: bool,
    stop: &AtomicBool,
) {
    let mut nat: HashMap<SocketAddr, UdpSocket> = HashMap::new();
    // Upstream sockets of dropped mappings: still read, so the server's datagrams to them are
    // counted, but never passed on.
    let mut dead: Vec<UdpSocket> = Vec::new();
    let mut rebinds = rebind_at.into_iter().peekable();
    let mut passed_to_clients = 0u64;
    let counters = to_server.counters.clone();
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let mut busy = false;
        for _ in 0..BATCH {
            let (n, client) = match front.recv_from(&mut buf) {
                Ok(got) => got,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // WouldBlock: nothing more now. Anything else (an ICMP error reported on the
                // socket, say) is not the relay's business either.
                Err(_) => break,
            };
            busy = true;
            let socket = match nat.entry(client) {
                Entry::Occupied(entry) => entry.into_mut(),
                Entry::Vacant(entry) => {
                    let Some(socket) = connect_upstream(upstream) else {
                        continue;
                    };
                    counters.clients.fetch_add(1, Ordering::Relaxed);
                    entry.insert(socket)
                }
            };
            let datagram = &mut buf[..n];
            if to_server.pass(datagram) {
                to_server.sent(socket.send(datagram));
            }
        }
        for (client, socket) in &nat {
            for _ in 0..BATCH {
                let n = match socket.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                busy = true;
                counters
                    .from_server_bytes
                    .fetch_add(n as u64, Ordering::Relaxed);
                let datagram = &mut buf[..n];
                if eat_path_challenges && n == udpferry::wire::PATH_FRAME_LEN && datagram[5] == 0x09
                {
                    to_client.counters().dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if to_client.pass(datagram) {
                    passed_to_clients += n as u64;
                    to_client.sent(front.send_to(datagram, client));
                }
            }
        }
        for socket in &dead {
            while let Ok(n) = socket.recv(&mut buf) {
                busy = true;
                counters
                    .from_server_bytes
                    .fetch_add(n as u64, Ordering::Relaxed);
                counters
                    .to_dead_mappings
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        if rebinds.next_if(|&at| passed_to_clients >= at).is_some() {
            for socket in nat.values_mut() {
                if let Some(fresh) = connect_upstream(upstream) {
                    dead.push(std::mem::replace(socket, fresh));
                }
            }
            counters.rebinds.fetch_add(1, Ordering::Relaxed);
        }
        if !busy {
            std::thread::sleep(IDLE_NAP);
        }
    }
}

/// A fresh non-blocking socket on 127.0.0.1 connected to `upstream`, or `None` if the system
/// refuses one (the client's datagrams are then dropped, as by a full NAT table).
fn connect_upstream(upstream: SocketAddr) -> Option<UdpSocket> {
    let socket = udpferry::net::bind(SocketAddr::from(([127, 0, 0, 1], 0))).ok()?;
    socket.connect(upstream).ok()?;
    socket.set_nonblocking(true).ok()?;
    Some(socket)
}
