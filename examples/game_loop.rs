//! A 60 Hz game loop that shares one UDP socket between game packets and a map download.
//!
//! Two "games" run in this process, each with its own socket and its own tick loop: a server that
//! sends a state packet to its client every tick and serves maps, and a client that sends an
//! input packet every tick and downloads a map from the server on the same socket. Each tick a
//! side reads everything its socket received, routes udpferry's datagrams to its
//! [`Endpoint`] with the cheap [`is_udpferry_datagram`] check, handles its own game packets, and
//! drains what udpferry wants to send. No extra thread, no second socket.
//!
//! At the end it reports how the game packets fared while the map downloaded:
//!
//! ```text
//! cargo run --release --example game_loop
//! ```

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use udpferry::{is_udpferry_datagram, ObjectId};
use udpferry::{Endpoint, EndpointConfig, Event, NoObjects, ObjectProvider, RangeSet};

/// One tick at 60 Hz.
pub const TICK: Duration = Duration::from_micros(16_667);
/// Game packets start with this byte (anything not starting with udpferry's magic would do).
const GAME: u8 = b'G';

/// What happened to the game packets of one direction.
#[derive(Debug, Default, Clone)]
pub struct GameFlow {
    /// Packets sent.
    pub sent: u64,
    /// Packets received.
    pub received: u64,
    /// Largest delay between sending and the receiving tick handling it.
    pub max_delay: Duration,
    /// Packets that took more than one tick to be handled.
    pub later_than_one_tick: u64,
    /// Lowest and highest sequence number received.
    pub seq_range: Option<(u64, u64)>,
}

impl GameFlow {
    /// Packets missing between the first and the last one received (the sender keeps sending a
    /// little after the receiver stopped, so `sent - received` would overstate loss).
    pub fn lost(&self) -> u64 {
        self.seq_range
            .map_or(0, |(lo, hi)| (hi - lo + 1).saturating_sub(self.received))
    }
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Server-to-client game packets.
    pub to_client: GameFlow,
    /// Client-to-server game packets.
    pub to_server: GameFlow,
    /// Whether the map arrived and its MD5 matched.
    pub map_verified: bool,
    /// How long the download took.
    pub download_time: Duration,
    /// Ticks the client ran.
    pub ticks: u64,
}

fn game_packet(seq: u64, sent_at: Duration) -> [u8; 17] {
    let mut p = [0u8; 17];
    p[0] = GAME;
    p[1..9].copy_from_slice(&seq.to_be_bytes());
    p[9..17].copy_from_slice(&(sent_at.as_nanos() as u64).to_be_bytes());
    p
}

fn note_game_packet(flow: &mut GameFlow, packet: &[u8], now: Duration) {
    if packet.len() != 17 {
        return;
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&packet[1..9]);
    let seq = u64::from_be_bytes(seq);
    flow.seq_range = Some(match flow.seq_range {
        None => (seq, seq),
        Some((lo, hi)) => (lo.min(seq), hi.max(seq)),
    });
    let mut t = [0u8; 8];
    t.copy_from_slice(&packet[9..17]);
    let delay = now.saturating_sub(Duration::from_nanos(u64::from_be_bytes(t)));
    flow.received += 1;
    flow.max_delay = flow.max_delay.max(delay);
    if delay > TICK {
        flow.later_than_one_tick += 1;
    }
}

/// One tick of one side: read the socket dry, route, then send.
fn tick<P: ObjectProvider>(
    socket: &UdpSocket,
    endpoint: &mut Endpoint<P, Vec<u8>>,
    peer: SocketAddr,
    seq: u64,
    epoch: Instant,
    (flow_in, flow_out): (&mut GameFlow, &mut GameFlow),
    buf: &mut [u8],
) {
    loop {
        match socket.recv_from(buf) {
            Ok((n, from)) if is_udpferry_datagram(&buf[..n]) => {
                endpoint.handle_datagram(Instant::now(), from, &buf[..n])
            }
            Ok((n, _)) if n > 0 && buf[0] == GAME => {
                note_game_packet(flow_in, &buf[..n], epoch.elapsed())
            }
            Ok(_) => {}
            Err(_) => break, // WouldBlock: the socket is empty.
        }
    }
    let now = Instant::now();
    if endpoint.poll_timeout().is_some_and(|t| t <= now) {
        endpoint.handle_timeout(now);
    }
    // The game's own packet goes out first each tick.
    let _ = socket.send_to(&game_packet(seq, epoch.elapsed()), peer);
    flow_out.sent += 1;
    while let Some(t) = endpoint.poll_transmit(now, buf) {
        let _ = socket.send_to(&buf[..t.len], t.destination);
    }
}

/// Runs both games until the map has downloaded (or `limit` passed) plus a few ticks.
pub fn run(map_size: usize, limit: Duration) -> std::io::Result<Outcome> {
    let mut map = vec![0u8; map_size];
    for (i, b) in map.iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0];
    }
    let id = ObjectId::md5_of(&map);
    let mut maps: HashMap<ObjectId, Arc<[u8]>> = HashMap::new();
    maps.insert(id, map.into());

    let server_socket = udpferry::bind("127.0.0.1:0".parse().expect("address"))?;
    let client_socket = udpferry::bind("127.0.0.1:0".parse().expect("address"))?;
    server_socket.set_nonblocking(true)?;
    client_socket.set_nonblocking(true)?;
    let server_addr = server_socket.local_addr()?;
    let client_addr = client_socket.local_addr()?;

    // Each tick may release more than the pacer's usual burst, since the loop runs only 60
    // times a second.
    let mut config = EndpointConfig::default();
    config.transfer.burst_datagrams = 32;
    config.seed = udpferry::random_seed();

    let epoch = Instant::now();
    let server = std::thread::spawn({
        let config = config.clone();
        move || {
            let mut endpoint: Endpoint<_, Vec<u8>> = Endpoint::new(config, maps);
            let (mut from_client, mut to_client) = (GameFlow::default(), GameFlow::default());
            let mut buf = vec![0u8; 65_536];
            let start = Instant::now();
            let mut seq = 0;
            // Runs until the client stops sending (it exits a little after its download).
            let mut quiet_ticks = 0;
            while start.elapsed() < limit + Duration::from_secs(2) && quiet_ticks < 30 {
                let before = from_client.received;
                let next = start + TICK * (seq as u32 + 1);
                tick(
                    &server_socket,
                    &mut endpoint,
                    client_addr,
                    seq,
                    epoch,
                    (&mut from_client, &mut to_client),
                    &mut buf,
                );
                quiet_ticks = if from_client.received == before && seq > 30 {
                    quiet_ticks + 1
                } else {
                    0
                };
                seq += 1;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            (from_client, to_client)
        }
    });

    let mut endpoint: Endpoint<NoObjects, Vec<u8>> = Endpoint::new(config, NoObjects);
    let (mut from_server, mut to_server) = (GameFlow::default(), GameFlow::default());
    let mut buf = vec![0u8; 65_536];
    let start = Instant::now();
    let transfer = endpoint.fetch(start, server_addr, id, &RangeSet::new(), Vec::new());
    let mut verified = None;
    let mut seq = 0u64;
    let mut after = 0;
    while start.elapsed() < limit && after < 10 {
        let next = start + TICK * (seq as u32 + 1);
        tick(
            &client_socket,
            &mut endpoint,
            server_addr,
            seq,
            epoch,
            (&mut from_server, &mut to_server),
            &mut buf,
        );
        while let Some(e) = endpoint.poll_event() {
            match e.event {
                Event::Completed(_) => {
                    let map = endpoint.take_sink(transfer).unwrap_or_default();
                    verified = Some((ObjectId::md5_of(&map) == id, start.elapsed()));
                }
                Event::Failed(err) => {
                    eprintln!("download failed: {err}");
                    verified = Some((false, start.elapsed()));
                }
                _ => {}
            }
        }
        if verified.is_some() {
            after += 1;
        }
        seq += 1;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let (to_server_seen, to_client_sent) = server
        .join()
        .map_err(|_| std::io::Error::other("server thread panicked"))?;
    to_server.received = to_server_seen.received;
    to_server.max_delay = to_server_seen.max_delay;
    to_server.later_than_one_tick = to_server_seen.later_than_one_tick;
    to_server.seq_range = to_server_seen.seq_range;
    from_server.sent = to_client_sent.sent;
    let (map_verified, download_time) = verified.unwrap_or((false, start.elapsed()));
    Ok(Outcome {
        to_client: from_server,
        to_server,
        map_verified,
        download_time,
        ticks: seq,
    })
}

#[allow(dead_code)]
fn main() -> std::io::Result<()> {
    let size = 8 << 20;
    println!(
        "60 Hz game loop on one socket per side; downloading an {} MiB map meanwhile",
        size >> 20
    );
    let o = run(size, Duration::from_secs(60))?;
    println!(
        "map: {} in {:.2} s ({:.2} MB/s) over {} ticks",
        if o.map_verified {
            "verified"
        } else {
            "NOT verified"
        },
        o.download_time.as_secs_f64(),
        size as f64 / o.download_time.as_secs_f64() / 1e6,
        o.ticks
    );
    for (name, f) in [
        ("server -> client", &o.to_client),
        ("client -> server", &o.to_server),
    ] {
        println!(
            "game packets {name}: {} sent, {} received, {} lost, max delay {:.1} ms, {} later than one tick",
            f.sent,
            f.received,
            f.lost(),
            f.max_delay.as_secs_f64() * 1e3,
            f.later_than_one_tick
        );
    }
    Ok(())
}
