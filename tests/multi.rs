//! Multi-source downloads over loopback: two rate-capped servers share the work; a server that
//! serves wrong bytes under the right name is found out, dropped and named.

mod common;

use common::{object, put_dated, Hostile, Serving, TempDir};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use udpferry::net::{Client, FetchOptions, ServerConfig};
use udpferry::store::manifest::{manifest_id, Manifest};
use udpferry::store::ContentStore;
use udpferry::ObjectId;

const MIB: usize = 1 << 20;

/// A `net::Server` over `dir` with its uplink capped at `rate` bytes per second.
fn honest(dir: &Path, rate: u64) -> Serving {
    let mut config = ServerConfig::default();
    config.endpoint.rate_limit_bytes_per_sec = rate;
    Serving::start(ContentStore::open(dir).unwrap(), config)
}

/// A server that answers for `id` with `served` bytes (which may be wrong) and for the
/// manifest of `id` with `manifest` bytes.
fn liar(id: ObjectId, served: Vec<u8>, manifest: Vec<u8>) -> Hostile {
    let mut objects: HashMap<ObjectId, Arc<[u8]>> = HashMap::new();
    objects.insert(id, served.into());
    objects.insert(manifest_id(&id), manifest.into());
    Hostile::start(objects)
}

/// The figure: two servers each capped at 1 MiB/s deliver a 6 MiB object in at most
/// 3.6 s. Asserted here only loosely (under 5 s: one server alone needs 6 s), the figure is
/// printed.
#[test]
fn two_capped_servers_share_the_work() {
    let tmp = TempDir::new("share");
    let data = object(6 * MIB, 21);
    let id = ObjectId::md5_of(&data);
    put_dated(&tmp.join("a/map.bsp"), &data);
    put_dated(&tmp.join("b/copy-of-map.bsp"), &data);
    let a = honest(&tmp.join("a"), 1 << 20);
    let b = honest(&tmp.join("b"), 1 << 20);
    let client = Client::new(tmp.join("cache")).unwrap();
    let options = FetchOptions {
        output: Some(tmp.join("map.out")),
        timeout: Some(Duration::from_secs(60)),
        ..FetchOptions::default()
    };
    let started = Instant::now();
    let report = client
        .fetch_from(&[a.addr, b.addr], id, &options, |_| {})
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(std::fs::read(tmp.join("map.out")).unwrap(), data);
    assert!(report.bad_sources.is_empty());
    thread::sleep(Duration::from_millis(100));
    let (sa, sb) = (a.handle.bytes_sent(), b.handle.bytes_sent());
    println!(
        "multi-source: 6 MiB from two servers capped at 1 MiB/s each in {secs:.2} s (target <= 3.6 s); server A sent {sa} bytes, B {sb}"
    );
    for sent in [sa, sb] {
        assert!(
            sent > (data.len() / 4) as u64,
            "both servers did a fair part of the work: {sa} / {sb}"
        );
    }
    assert!(secs < 5.0, "{secs:.2} s: one server alone needs 6 s");
}

/// One source serves corrupt bytes under the right name (with an honest manifest): its pieces
/// fail the manifest's block hashes, it is dropped and named, and the other source completes
/// the object correctly.
#[test]
fn a_lying_source_is_dropped_and_named_and_the_download_completes() {
    let tmp = TempDir::new("liar");
    let data = object(2 * MIB + 333, 22);
    let id = ObjectId::md5_of(&data);
    put_dated(&tmp.join("good/map.bsp"), &data);
    let good = honest(&tmp.join("good"), 0);
    let mut corrupt = data.clone();
    for b in corrupt.iter_mut().step_by(4097) {
        *b ^= 0x5a;
    }
    let manifest = Manifest::build(id, data.len() as u64, &data[..])
        .unwrap()
        .encode();
    let bad = liar(id, corrupt, manifest);
    let client = Client::new(tmp.join("cache")).unwrap();
    let options = FetchOptions {
        output: Some(tmp.join("map.out")),
        timeout: Some(Duration::from_secs(60)),
        ..FetchOptions::default()
    };
    // The liar first, so it gets pieces before it is found out.
    let report = client
        .fetch_from(&[bad.addr, good.addr], id, &options, |_| {})
        .unwrap();
    assert_eq!(std::fs::read(tmp.join("map.out")).unwrap(), data);
    assert_eq!(report.bad_sources, vec![bad.addr], "the liar is named");
}

/// A socket that is bound (so nothing answers "port unreachable") but never reads: a server
/// that is down or behind a firewall that drops everything.
fn dead() -> (std::net::UdpSocket, std::net::SocketAddr) {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

/// The finding: a dead server listed first kept being handed pieces, so a 5 MB object
/// took 18 s (or failed under --timeout). Now the dead one is set aside after its silence and
/// the good one delivers everything: the target is under 2 s, asserted loosely here
/// (the machine is shared) and printed.
#[test]
fn a_dead_source_is_set_aside_and_the_good_one_delivers() {
    let tmp = TempDir::new("dead-good");
    let data = object(5_000_000, 33);
    let id = ObjectId::md5_of(&data);
    put_dated(&tmp.join("good/map.bsp"), &data);
    let good = Serving::dir(&tmp.join("good"));
    let (_dead_socket, dead_addr) = dead();
    let client = Client::new(tmp.join("cache")).unwrap();
    let options = FetchOptions {
        timeout: Some(Duration::from_secs(30)),
        ..FetchOptions::default()
    };
    let started = Instant::now();
    let report = client
        .fetch_from(&[dead_addr, good.addr], id, &options, |_| {})
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    println!("dead + good, 5 MB: {secs:.2} s");
    assert_eq!(std::fs::read(&report.path).unwrap(), data);
    assert!(
        secs < 8.0,
        "the dead source held the download up: {secs:.2} s"
    );
}

/// Only dead servers: the error says none answered (not "not found"), and `timeout` bounds it.
#[test]
fn only_dead_sources_fail_as_unreachable_within_the_timeout() {
    let tmp = TempDir::new("dead-dead");
    let (_a, dead_a) = dead();
    let (_b, dead_b) = dead();
    let client = Client::new(tmp.join("cache")).unwrap();
    let options = FetchOptions {
        timeout: Some(Duration::from_secs(1)),
        ..FetchOptions::default()
    };
    let started = Instant::now();
    let id = ObjectId::md5_of(b"a map on servers that are down");
    let err = client
        .fetch_from(&[dead_a, dead_b], id, &options, |_| {})
        .unwrap_err();
    let secs = started.elapsed().as_secs_f64();
    println!("two dead, --timeout 1: {secs:.2} s: {err}");
    assert!(
        matches!(&err, udpferry::FetchError::Unreachable { servers, .. } if servers.len() == 2),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("no answer from any of the 2 servers"),
        "{err}"
    );
    assert!(secs < 4.0, "the timeout of 1 s was not kept: {secs:.2} s");
    // Nothing was found, so nothing is left in the cache.
    let left: Vec<_> = std::fs::read_dir(tmp.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "the cache kept {left:?}");
}

/// An IPv4 and an IPv6 server in one download: both are reached (the client binds a
/// dual-stack socket), and both deliver pieces.
#[test]
fn ipv4_and_ipv6_sources_mix() {
    let tmp = TempDir::new("v4v6");
    let data = object(4 * MIB, 34);
    let id = ObjectId::md5_of(&data);
    put_dated(&tmp.join("a/map.bsp"), &data);
    put_dated(&tmp.join("b/map.bsp"), &data);
    let mut config = ServerConfig::default();
    config.endpoint.rate_limit_bytes_per_sec = 2 << 20;
    let v4 = Serving::start_on(
        "127.0.0.1:0",
        ContentStore::open(tmp.join("a")).unwrap(),
        config.clone(),
    );
    let v6 = Serving::start_on(
        "[::1]:0",
        ContentStore::open(tmp.join("b")).unwrap(),
        config,
    );
    let client = Client::new(tmp.join("cache")).unwrap();
    let options = FetchOptions {
        timeout: Some(Duration::from_secs(60)),
        ..FetchOptions::default()
    };
    let report = client
        .fetch_from(&[v4.addr, v6.addr], id, &options, |_| {})
        .unwrap();
    assert_eq!(std::fs::read(&report.path).unwrap(), data);
    let (a, b) = (v4.sent(), v6.sent());
    println!("IPv4 server sent {a} bytes, IPv6 server {b}");
    assert!(
        a > MIB as u64 && b > MIB as u64,
        "both served a share: {a} and {b}"
    );
}

/// The same server listed twice is used once (the issue: twice as slow, every piece asked of
/// the same server over two transfers).
#[test]
fn a_server_listed_twice_is_one_server() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let tmp = TempDir::new("twice");
    let data = object(2 * MIB, 35);
    let id = ObjectId::md5_of(&data);
    put_dated(&tmp.join("a/map.bsp"), &data);
    let store = ContentStore::open(tmp.join("a")).unwrap();
    let mut server = udpferry::Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        store,
        ServerConfig::default(),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let serving = thread::spawn(move || {
        server.run_until(&flag, |_| {}).unwrap();
        server.endpoint().stats().accepted
    });
    let client = Client::new(tmp.join("cache")).unwrap();
    let report = client
        .fetch_from(&[addr, addr], id, &FetchOptions::default(), |_| {})
        .unwrap();
    assert_eq!(std::fs::read(&report.path).unwrap(), data);
    thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let accepted = serving.join().unwrap();
    // One plain fetch: one transfer (a multi-source download would be a manifest and pieces).
    assert_eq!(accepted, 1, "the server served {accepted} transfers");
}

/// Issue 14's figure: four servers capped at 1 MiB/s each deliver 12 MiB in at most 3.6 s
/// (pieces grow with each source's rate, so the per-address request limit does not throttle
/// them). Asserted loosely here (under 6 s: one server alone needs 12 s), the figure printed.
#[test]
fn four_capped_servers_add_up() {
    let tmp = TempDir::new("four");
    let data = object(12 * MIB, 36);
    let id = ObjectId::md5_of(&data);
    let servers: Vec<Serving> = (0..4)
        .map(|i| {
            let dir = tmp.join(&format!("s{i}"));
            put_dated(&dir.join("map.bsp"), &data);
            honest(&dir, 1 << 20)
        })
        .collect();
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    let client = Client::new(tmp.join("cache")).unwrap();
    let options = FetchOptions {
        timeout: Some(Duration::from_secs(60)),
        ..FetchOptions::default()
    };
    let started = Instant::now();
    let report = client.fetch_from(&addrs, id, &options, |_| {}).unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(std::fs::read(&report.path).unwrap(), data);
    let sent: Vec<u64> = servers.iter().map(|s| s.sent()).collect();
    println!("multi-source: 12 MiB from four servers capped at 1 MiB/s each in {secs:.2} s (target <= 3.6 s); sent {sent:?}");
    assert!(secs < 6.0, "four capped servers took {secs:.2} s");
}
