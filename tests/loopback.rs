//! The socket driver on real loopback sockets: many clients, hostile traffic, a shared socket.

mod common;

#[path = "../examples/game_loop.rs"]
#[allow(dead_code)]
mod game_loop;

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use udpferry::core::EndpointStats;
use udpferry::net::{Client, FetchOptions, Server, ServerConfig};
use udpferry::store::ContentStore;
use udpferry::wire::{ConnectionId, Datagram, Frame};
use udpferry::ObjectId;
use udpferry_sim::Rng;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("udpferry-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bytes(size: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; size];
    Rng::new(seed).fill_bytes(&mut v);
    v
}

/// A server on 127.0.0.1 in a thread; stops and reports its endpoint's counters when dropped
/// through `stop`.
struct RunningServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<EndpointStats>>,
}

impl RunningServer {
    fn start(dir: &std::path::Path, config: ServerConfig) -> Self {
        let store = ContentStore::open(dir).unwrap();
        let mut server = Server::bind("127.0.0.1:0".parse().unwrap(), store, config).unwrap();
        let addr = server.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            server.run_until(&flag, |_| {}).unwrap();
            server.endpoint().stats().clone()
        });
        RunningServer {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> EndpointStats {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn sixteen_clients_download_different_objects_at_once() {
    let dir = TempDir::new("sixteen");
    let maps = dir.0.join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    let mut ids = Vec::new();
    for i in 0..16u64 {
        let data = bytes(1_500_000 + i as usize * 77_777, i);
        ids.push((ObjectId::md5_of(&data), data.clone()));
        std::fs::write(maps.join(format!("map{i}.bin")), data).unwrap();
    }
    let mut config = ServerConfig::default();
    config.endpoint.max_transfers_per_address = 32;
    let server = RunningServer::start(&maps, config);
    let addr = server.addr;
    let clients: Vec<_> = ids
        .into_iter()
        .enumerate()
        .map(|(i, (id, data))| {
            let cache = dir.0.join(format!("cache{i}"));
            thread::spawn(move || {
                let client = Client::new(&cache).unwrap();
                let options = FetchOptions {
                    timeout: Some(Duration::from_secs(120)),
                    ..FetchOptions::default()
                };
                let report = client.fetch(addr, id, &options, |_| {}).unwrap();
                assert_eq!(std::fs::read(&report.path).unwrap(), data);
                assert!(!report.from_cache);
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client failed");
    }
    let stats = server.stop();
    assert_eq!(stats.accepted, 16);
}

#[test]
fn limits_answer_busy_and_unknown_objects_not_found() {
    let dir = TempDir::new("busy");
    let data = bytes(4 << 20, 1);
    std::fs::write(dir.0.join("m.bin"), &data).unwrap();
    let id = ObjectId::md5_of(&data);
    let mut config = ServerConfig::default();
    config.endpoint.max_transfers_per_address = 1;
    // Without an admission queue a Start beyond the limit is answered "busy" (with the queue,
    // see `a_lan_party_behind_one_address_waits_its_turn`).
    config.endpoint.max_waiting = 0;
    config.endpoint.transfer.max_rate_bytes_per_sec = 1 << 20;
    let server = RunningServer::start(&dir.0, config);
    let addr = server.addr;
    let first = {
        let cache = dir.0.join("c1");
        thread::spawn(move || {
            Client::new(cache)
                .unwrap()
                .fetch(addr, id, &FetchOptions::default(), |_| {})
        })
    };
    thread::sleep(Duration::from_millis(300));
    let second =
        Client::new(dir.0.join("c2"))
            .unwrap()
            .fetch(addr, id, &FetchOptions::default(), |_| {});
    assert!(
        matches!(
            second,
            Err(udpferry::net::FetchError::Transfer(
                udpferry::core::TransferError::Busy
            ))
        ),
        "{second:?}"
    );
    assert!(first.join().unwrap().is_ok());
    // Limits are checked before the lookup, so ask for a missing object once the slot is free
    // (the server frees it when the first client's Done arrives).
    thread::sleep(Duration::from_millis(200));
    let missing = Client::new(dir.0.join("c3")).unwrap().fetch(
        addr,
        ObjectId::md5_of(b"nope"),
        &FetchOptions::default(),
        |_| {},
    );
    assert!(
        matches!(
            missing,
            Err(udpferry::net::FetchError::Transfer(
                udpferry::core::TransferError::NotFound
            ))
        ),
        "{missing:?}"
    );
}

#[test]
fn garbage_sprayed_at_the_server_does_not_stop_a_download_or_grow_its_state() {
    let dir = TempDir::new("garbage");
    let data = bytes(8 << 20, 2);
    std::fs::write(dir.0.join("m.bin"), &data).unwrap();
    let id = ObjectId::md5_of(&data);
    let server = RunningServer::start(&dir.0, ServerConfig::default());
    let addr = server.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let sprayer = {
        let stop = stop.clone();
        thread::spawn(move || {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut rng = Rng::new(99);
            let valid = common::request_datagram(5, id);
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) && sent < 200_000 {
                let mut d = match sent % 4 {
                    // Random bytes.
                    0 => {
                        let mut d = vec![0u8; rng.gen_range(1, 1500) as usize];
                        rng.fill_bytes(&mut d);
                        d
                    }
                    // A valid request, truncated.
                    1 => valid[..rng.gen_range(1, valid.len() as u64) as usize].to_vec(),
                    // Our magic, then garbage (fails the checksum).
                    2 => {
                        let mut d = valid.clone();
                        let i = rng.gen_range(6, d.len() as u64) as usize;
                        d[i] ^= 0x5a;
                        d
                    }
                    // Well-formed acks for connections that do not exist.
                    _ => {
                        let mut buf = vec![0u8; 100];
                        let n = Datagram {
                            conn_id: ConnectionId(rng.next_u64()),
                            frame: Frame::Done,
                        }
                        .encode(&mut buf)
                        .unwrap();
                        buf.truncate(n);
                        buf
                    }
                };
                if d.is_empty() {
                    d.push(0);
                }
                let _ = socket.send_to(&d, addr);
                sent += 1;
                if sent.is_multiple_of(64) {
                    thread::sleep(Duration::from_micros(200));
                }
            }
            sent
        })
    };
    let client = Client::new(dir.0.join("cache")).unwrap();
    let options = FetchOptions {
        timeout: Some(Duration::from_secs(120)),
        ..FetchOptions::default()
    };
    let report = client.fetch(addr, id, &options, |_| {}).unwrap();
    stop.store(true, Ordering::Relaxed);
    let sprayed = sprayer.join().unwrap();
    assert_eq!(std::fs::read(&report.path).unwrap(), data);
    let stats = server.stop();
    println!("sprayed {sprayed} datagrams; server counted {stats:?}");
    assert!(stats.malformed + stats.unknown_connection > 0);
    // Only the real client created a transfer: garbage never creates state.
    assert_eq!(stats.accepted, 1);
}

#[test]
fn a_game_loop_keeps_its_packets_while_a_map_downloads_on_the_same_socket() {
    let o = game_loop::run(4 << 20, Duration::from_secs(60)).unwrap();
    println!("{o:?}");
    assert!(o.map_verified, "{o:?}");
    assert_eq!(o.to_client.lost(), 0, "{o:?}");
    assert_eq!(o.to_server.lost(), 0, "{o:?}");
    assert!(
        o.to_client.received > 30 && o.to_server.received > 30,
        "{o:?}"
    );
}

#[test]
fn ipv6_loopback_works() {
    let dir = TempDir::new("v6");
    let data = bytes(300_000, 3);
    std::fs::write(dir.0.join("m.bin"), &data).unwrap();
    let id = ObjectId::md5_of(&data);
    let store = ContentStore::open(&dir.0).unwrap();
    let Ok(mut server) = Server::bind("[::1]:0".parse().unwrap(), store, ServerConfig::default())
    else {
        println!("no IPv6 loopback on this machine; skipping");
        return;
    };
    let addr = server.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let t = thread::spawn(move || server.run_until(&flag, |_| {}));
    let start = Instant::now();
    let report =
        Client::new(dir.0.join("cache"))
            .unwrap()
            .fetch(addr, id, &FetchOptions::default(), |_| {});
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap().unwrap();
    let report = report.unwrap();
    assert_eq!(std::fs::read(&report.path).unwrap(), data);
    assert!(start.elapsed() < Duration::from_secs(60));
}

/// Rates on real sockets. The lower bounds are what a cap guarantees; the upper bounds are
/// generous guards (these machines are shared and noisy), so the test cannot flake. The measured
/// times are printed.
#[test]
fn rate_caps_hold_on_real_sockets() {
    let dir = TempDir::new("rates");
    let maps = dir.0.join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    let big = bytes(6 << 20, 10);
    std::fs::write(maps.join("big.bin"), &big).unwrap();
    let small: Vec<Vec<u8>> = (0..4).map(|i| bytes(2 << 20, 20 + i)).collect();
    for (i, s) in small.iter().enumerate() {
        std::fs::write(maps.join(format!("s{i}.bin")), s).unwrap();
    }

    // --rate 1MiB, one client, 6 MiB.
    let mut config = ServerConfig::default();
    config.endpoint.rate_limit_bytes_per_sec = 1 << 20;
    let server = RunningServer::start(&maps, config);
    let start = Instant::now();
    let report = Client::new(dir.0.join("c0"))
        .unwrap()
        .fetch(
            server.addr,
            ObjectId::md5_of(&big),
            &FetchOptions::default(),
            |_| {},
        )
        .unwrap();
    let one = start.elapsed();
    drop(server);
    assert_eq!(std::fs::read(&report.path).unwrap(), big);
    println!(
        "6 MiB at --rate 1MiB: {:.2} s (expected 5.7 to 6.5)",
        one.as_secs_f64()
    );
    assert!(
        one >= Duration::from_millis(5_700),
        "{one:?}: faster than the cap allows"
    );
    assert!(one <= Duration::from_secs(12), "{one:?}");

    // --rate 2MiB --client-rate 512K, four clients of 2 MiB each.
    let mut config = ServerConfig::default();
    config.endpoint.rate_limit_bytes_per_sec = 2 << 20;
    config.endpoint.transfer.max_rate_bytes_per_sec = 512 << 10;
    let server = RunningServer::start(&maps, config);
    let addr = server.addr;
    let clients: Vec<_> = small
        .iter()
        .enumerate()
        .map(|(i, data)| {
            let id = ObjectId::md5_of(data);
            let cache = dir.0.join(format!("c{}", i + 1));
            thread::spawn(move || {
                let start = Instant::now();
                Client::new(cache)
                    .unwrap()
                    .fetch(addr, id, &FetchOptions::default(), |_| {})
                    .unwrap();
                start.elapsed()
            })
        })
        .collect();
    let times: Vec<Duration> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    println!(
        "4 x 2 MiB at --rate 2MiB --client-rate 512K: {:?} s (expected 3.8 to 4.6 each)",
        times
            .iter()
            .map(|t| (t.as_secs_f64() * 100.0).round() / 100.0)
            .collect::<Vec<_>>()
    );
    for t in &times {
        assert!(
            *t >= Duration::from_millis(3_800),
            "{t:?}: faster than the per-client cap allows"
        );
        assert!(*t <= Duration::from_secs(9), "{t:?}");
    }
}

/// A hostile server: serves `bytes` under the name `claimed` until `stop`.
fn lying_server(
    claimed: ObjectId,
    bytes: Vec<u8>,
    stop: Arc<AtomicBool>,
) -> (SocketAddr, thread::JoinHandle<()>) {
    use std::collections::HashMap;
    use udpferry::core::{Endpoint, EndpointConfig};
    let socket = udpferry::net::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    socket.set_nonblocking(true).unwrap();
    let addr = socket.local_addr().unwrap();
    let handle = thread::spawn(move || {
        let mut maps: HashMap<ObjectId, Arc<[u8]>> = HashMap::new();
        maps.insert(claimed, bytes.into());
        let mut ep: Endpoint<_, Vec<u8>> = Endpoint::new(EndpointConfig::default(), maps);
        let mut buf = vec![0u8; 65_536];
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                ep.handle_datagram(Instant::now(), from, &buf[..n]);
            }
            let now = Instant::now();
            if ep.poll_timeout().is_some_and(|t| t <= now) {
                ep.handle_timeout(now);
            }
            while let Some(t) = ep.poll_transmit(now, &mut buf) {
                let _ = socket.send_to(&buf[..t.len], t.destination);
            }
            while ep.poll_event().is_some() {}
            thread::sleep(Duration::from_micros(200));
        }
    });
    (addr, handle)
}

#[test]
fn a_digest_mismatch_discards_the_partial_instead_of_resuming_it() {
    let dir = TempDir::new("lying");
    let claimed = ObjectId::md5_of(b"the map the client wants");
    let stop = Arc::new(AtomicBool::new(false));
    let (addr, server) = lying_server(claimed, bytes(500_000, 4), stop.clone());
    let cache = dir.0.join("cache");
    let result =
        Client::new(&cache)
            .unwrap()
            .fetch(addr, claimed, &FetchOptions::default(), |_| {});
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
    assert!(
        matches!(
            result,
            Err(udpferry::net::FetchError::Transfer(
                udpferry::core::TransferError::DigestMismatch { .. }
            ))
        ),
        "{result:?}"
    );
    // Nothing under the final name, and no partial left to resume the same wrong bytes from.
    let left: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "cache holds {left:?}");
}

/// An address that does not parse or resolve is named in the error (the issue: "invalid
/// socket address" alone).
#[test]
fn an_unresolvable_server_address_is_named_in_the_error() {
    let dir = TempDir::new("badaddr");
    let client = Client::new(dir.0.join("cache")).unwrap();
    let id = ObjectId::md5_of(b"anything");
    let err = client
        .fetch("not-an-address", id, &FetchOptions::default(), |_| {})
        .unwrap_err();
    assert!(err.to_string().contains("not-an-address"), "{err}");
    println!("{err}");
}

/// A server that never answers: the progress callback says whom the download waits for, from
/// the start and then every second (the issue: 15 s of nothing on screen).
#[test]
fn a_silent_server_is_named_while_the_download_waits() {
    let dir = TempDir::new("silent");
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let client = Client::new(dir.0.join("cache")).unwrap();
    let options = FetchOptions {
        timeout: Some(Duration::from_millis(2500)),
        ..FetchOptions::default()
    };
    let started = Instant::now();
    let mut told: Vec<(Duration, String)> = Vec::new();
    let result = client.fetch(addr, ObjectId::md5_of(b"x"), &options, |p| {
        if let Some(w) = &p.waiting {
            told.push((started.elapsed(), w.to_string()));
        }
    });
    assert!(
        matches!(result, Err(udpferry::FetchError::Deadline(_))),
        "{result:?}"
    );
    println!("{told:?}");
    assert!(told.len() >= 2, "told once a second: {told:?}");
    assert!(
        told[0].0 < Duration::from_millis(900),
        "told at once: {told:?}"
    );
    assert!(
        told.iter().all(|(_, w)| w.contains(&addr.to_string())),
        "{told:?}"
    );
    assert!(
        told.last().is_some_and(|(_, w)| w.ends_with(" s)")),
        "{told:?}"
    );
}

/// The finding: 16 clients behind one address (a LAN party behind one NAT) asked one
/// default server for 4 MiB each, and the 8 beyond the per-address limit failed at once with
/// "server busy". Now they wait in the server's admission queue, see their place, and all 32
/// (the target) complete with the right bytes.
#[test]
fn a_lan_party_behind_one_address_waits_its_turn() {
    const CLIENTS: usize = 32;
    let dir = TempDir::new("lanparty");
    let data = bytes(4 << 20, 9);
    std::fs::write(dir.0.join("m.bin"), &data).unwrap();
    let id = ObjectId::md5_of(&data);
    let server = RunningServer::start(&dir.0, ServerConfig::default());
    let addr = server.addr;
    let data = Arc::new(data);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let cache = dir.0.join(format!("cache{i}"));
            let data = data.clone();
            thread::spawn(move || {
                let options = FetchOptions {
                    timeout: Some(Duration::from_secs(120)),
                    ..FetchOptions::default()
                };
                let mut places: Vec<u32> = Vec::new();
                let report = Client::new(&cache)
                    .unwrap()
                    .fetch(addr, id, &options, |p| {
                        if let Some(udpferry::Waiting::Slot { ahead }) = p.waiting {
                            places.push(ahead);
                        }
                    })
                    .unwrap_or_else(|e| panic!("client {i} failed: {e}"));
                assert_eq!(std::fs::read(&report.path).unwrap(), *data);
                places
            })
        })
        .collect();
    let places: Vec<Vec<u32>> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let stats = server.stop();
    let waited = places.iter().filter(|p| !p.is_empty()).count();
    println!(
        "{CLIENTS} clients: {waited} waited for a slot; server accepted {}, queued {}, busy {}, expired {}",
        stats.accepted, stats.queued, stats.busy, stats.queue_expired
    );
    assert_eq!(stats.busy, 0, "nobody is refused while the queue has room");
    assert!(
        stats.queued > 0,
        "the per-address limit (8) was reached: not exercised"
    );
    assert!(waited > 0, "a waiting client is told its place");
}

/// Every error reads as one sentence, in `Display` and in `Debug` alike (the issue: a program
/// whose `main` returned the error printed `Error: Transfer(NotFound)`).
#[test]
fn fetch_errors_read_as_sentences_in_display_and_debug() {
    use udpferry::core::TransferError;
    use udpferry::FetchError;
    let server: SocketAddr = "10.0.0.5:7878".parse().unwrap();
    let errors = [
        FetchError::Transfer(TransferError::NotFound),
        FetchError::Transfer(TransferError::Busy),
        FetchError::Transfer(TransferError::TimedOut(Duration::from_secs(15))),
        FetchError::Deadline(Duration::from_secs(5)),
        FetchError::Stopped,
        FetchError::Unreachable {
            servers: vec![server, "10.0.0.6:7878".parse().unwrap()],
            waited: Duration::from_secs(5),
        },
        FetchError::Usage("no server given"),
        FetchError::Internal("a download lost its partial file"),
        FetchError::BadServer {
            server,
            id: ObjectId::md5_of(b"x"),
            detail: "every block matches its manifest, but the whole does not".into(),
        },
    ];
    for e in &errors {
        let (display, debug) = (e.to_string(), format!("{e:?}"));
        println!("{display}");
        assert_eq!(display, debug);
        assert!(!display.contains('\n'), "one line: {display}");
        for dump in ["Transfer(", "TimedOut(", "Some(", "{ ", "Duration"] {
            assert!(!display.contains(dump), "no debug formatting: {display}");
        }
    }
    assert!(errors[5]
        .to_string()
        .starts_with("no answer from any of the 2 servers (10.0.0.5:7878, 10.0.0.6:7878)"));
}

/// Names in `dir`, sorted (empty when it does not exist).
fn names_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn an_object_never_found_leaves_nothing_in_the_cache_but_held_bytes_stay() {
    use udpferry::core::TransferError;
    use udpferry::net::FetchError;
    let dir = TempDir::new("never-found");
    let served = dir.0.join("served");
    std::fs::create_dir_all(&served).unwrap();
    let data = bytes(3 << 20, 11);
    let id = ObjectId::md5_of(&data);
    std::fs::write(served.join("m.bin"), &data).unwrap();
    let mut config = ServerConfig::default();
    config.endpoint.transfer.max_rate_bytes_per_sec = 1 << 20;
    let server = RunningServer::start(&served, config);
    let cache = dir.0.join("cache");
    let client = Client::new(&cache).unwrap();

    // The server answers "not found".
    let missing = client.fetch(
        server.addr,
        ObjectId::md5_of(b"nope"),
        &FetchOptions::default(),
        |_| {},
    );
    assert!(
        matches!(missing, Err(FetchError::Transfer(TransferError::NotFound))),
        "{missing:?}"
    );
    assert_eq!(names_in(&cache), Vec::<String>::new(), "after not found");

    // Nothing answers at all: the overall timeout ends it with nothing held.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let options = FetchOptions {
        timeout: Some(Duration::from_millis(400)),
        ..FetchOptions::default()
    };
    let r = client.fetch(silent.local_addr().unwrap(), id, &options, |_| {});
    assert!(matches!(r, Err(FetchError::Deadline(_))), "{r:?}");
    assert_eq!(names_in(&cache), Vec::<String>::new(), "after a timeout");

    // Stopped before anything arrived.
    let options = FetchOptions {
        stop: Some(Arc::new(AtomicBool::new(true))),
        ..FetchOptions::default()
    };
    let r = client.fetch(silent.local_addr().unwrap(), id, &options, |_| {});
    assert!(matches!(r, Err(FetchError::Stopped)), "{r:?}");
    assert_eq!(names_in(&cache), Vec::<String>::new(), "after a stop");

    // A download that got some bytes keeps them for a resume (1 MiB/s cap, 1.2 s).
    let options = FetchOptions {
        timeout: Some(Duration::from_millis(1200)),
        ..FetchOptions::default()
    };
    let r = client.fetch(server.addr, id, &options, |_| {});
    assert!(matches!(r, Err(FetchError::Deadline(_))), "{r:?}");
    let hex = id.to_hex();
    assert_eq!(
        names_in(&cache),
        vec![format!("{hex}.journal"), format!("{hex}.part")],
        "a partial that holds bytes stays"
    );
    let report = client
        .fetch(server.addr, id, &FetchOptions::default(), |_| {})
        .unwrap();
    assert!(report.resumed_bytes > 0, "{report:?}");
    assert_eq!(std::fs::read(&report.path).unwrap(), data);
    assert_eq!(
        names_in(&cache),
        vec![hex.clone(), format!("{hex}.verified")]
    );
}

#[test]
fn two_fetches_of_one_object_into_one_cache_take_turns() {
    let dir = TempDir::new("same-id");
    let served = dir.0.join("served");
    std::fs::create_dir_all(&served).unwrap();
    let data = bytes(3 << 20, 12);
    let id = ObjectId::md5_of(&data);
    std::fs::write(served.join("m.bin"), &data).unwrap();
    let mut config = ServerConfig::default();
    // Slow enough (about 1.5 s) that the two downloads overlap.
    config.endpoint.transfer.max_rate_bytes_per_sec = 2 << 20;
    let server = RunningServer::start(&served, config);
    let addr = server.addr;
    let cache = dir.0.join("cache");
    let fetches: Vec<_> = (0..2)
        .map(|i| {
            let cache = cache.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(150 * i));
                let options = FetchOptions {
                    timeout: Some(Duration::from_secs(60)),
                    ..FetchOptions::default()
                };
                Client::new(&cache)
                    .unwrap()
                    .fetch(addr, id, &options, |_| {})
            })
        })
        .collect();
    let reports: Vec<_> = fetches
        .into_iter()
        .map(|f| f.join().unwrap().expect("both fetches succeed"))
        .collect();
    for r in &reports {
        assert_eq!(std::fs::read(&r.path).unwrap(), data);
    }
    let from_cache = reports.iter().filter(|r| r.from_cache).count();
    assert_eq!(from_cache, 1, "one downloads, the other waits: {reports:?}");
    let hex = id.to_hex();
    assert_eq!(
        names_in(&cache),
        vec![hex.clone(), format!("{hex}.verified")]
    );
}

#[test]
fn waiting_for_another_download_of_the_object_honours_timeout_and_stop() {
    use udpferry::net::FetchError;
    use udpferry::store::StoreError;
    let dir = TempDir::new("lock-wait");
    let cache = dir.0.join("cache");
    let client = Client::new(&cache).unwrap();
    let id = ObjectId::md5_of(b"being downloaded elsewhere");
    let held = client
        .cache()
        .try_lock(&id)
        .unwrap()
        .expect("nobody holds it yet");
    assert!(
        client.cache().try_lock(&id).unwrap().is_none(),
        "one holder"
    );
    assert!(
        matches!(client.cache().begin(&id), Err(StoreError::Locked { .. })),
        "no second partial file while the lock is held"
    );
    // Nothing would answer; the wait must end before the network is even used.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();

    let started = Instant::now();
    let options = FetchOptions {
        timeout: Some(Duration::from_millis(300)),
        ..FetchOptions::default()
    };
    let r = client.fetch(addr, id, &options, |_| {});
    let waited = started.elapsed();
    assert!(matches!(r, Err(FetchError::Deadline(_))), "{r:?}");
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
        "{waited:?}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let setter = {
        let stop = stop.clone();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(200));
            stop.store(true, Ordering::Relaxed);
        })
    };
    let options = FetchOptions {
        stop: Some(stop),
        ..FetchOptions::default()
    };
    let r = client.fetch(addr, id, &options, |_| {});
    setter.join().unwrap();
    assert!(matches!(r, Err(FetchError::Stopped)), "{r:?}");

    let hex = id.to_hex();
    assert_eq!(names_in(&cache), vec![format!("{hex}.lock")]);
    drop(held);
    assert_eq!(
        names_in(&cache),
        Vec::<String>::new(),
        "a released lock leaves nothing behind"
    );
}

/// Issue 14: a fresh download is put at `-o` without a second pass over its bytes (a hard link
/// to the verified cache entry when both share a file system). Writing into the output in place
/// changes the entry too; the entry's record notices, and the next fetch repairs it instead of
/// reporting a hit.
#[test]
fn a_fresh_download_is_linked_to_its_output_and_an_edit_in_place_is_noticed() {
    use std::os::unix::fs::MetadataExt;
    let dir = TempDir::new("linkout");
    let data = bytes(3 << 20, 14);
    let id = ObjectId::md5_of(&data);
    std::fs::write(dir.0.join("m.bin"), &data).unwrap();
    let server = RunningServer::start(&dir.0, ServerConfig::default());
    let out = dir.0.join("out.map");
    let client = Client::new(dir.0.join("cache")).unwrap();
    let options = FetchOptions {
        output: Some(out.clone()),
        timeout: Some(Duration::from_secs(60)),
        ..FetchOptions::default()
    };
    let report = client.fetch(server.addr, id, &options, |_| {}).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), data);
    let (entry, output) = (
        std::fs::metadata(&report.path).unwrap(),
        std::fs::metadata(&out).unwrap(),
    );
    assert_eq!(
        entry.ino(),
        output.ino(),
        "the output is the cache entry, linked"
    );
    assert!(
        matches!(
            client.cache().lookup(&id).unwrap(),
            udpferry::Lookup::Verified { .. }
        ),
        "linking keeps the entry verified"
    );
    // Fetched again into the same output: a hit, and the output stays right.
    let again = client.fetch(server.addr, id, &options, |_| {}).unwrap();
    assert!(again.from_cache);
    assert_eq!(std::fs::read(&out).unwrap(), data);
    // The same object fetched into another output: linked again, no stray temporary files.
    let fresh = Client::new(dir.0.join("cache2")).unwrap();
    fresh.fetch(server.addr, id, &options, |_| {}).unwrap();
    let strays: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(strays.is_empty(), "{strays:?}");
    // An edit in place through the output (the game patches the map file): the entry that
    // shares its bytes is no longer trusted, and the next fetch repairs it.
    let linked = std::fs::read(fresh.cache().path_of(&id)).unwrap();
    assert_eq!(linked, data);
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&out).unwrap();
        f.seek(SeekFrom::Start(1000)).unwrap();
        f.write_all(b"patched").unwrap();
    }
    let repaired = fresh
        .fetch(server.addr, id, &FetchOptions::default(), |_| {})
        .unwrap();
    assert!(
        !repaired.from_cache,
        "a changed entry is not a hit: {repaired:?}"
    );
    assert_eq!(std::fs::read(&repaired.path).unwrap(), data);
    drop(server);
}
