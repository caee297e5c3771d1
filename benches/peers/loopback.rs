//! Side-by-side loopback benchmark: one object delivered over 127.0.0.1 by raw UDP (the ceiling),
//! TCP + MD5, QUIC (quinn) + MD5, udpferry memory to memory, and udpferry file to file; plus
//! time to first byte and to verified completion for a 1 MiB object.
//!
//! `cargo bench -p udpferry-peers --bench loopback` (256 MiB, median of 3, of 5 for the CLI);
//! `UDPFERRY_BENCH_SIZE_MIB=64 cargo bench -p udpferry-peers --bench loopback` (other size);
//! `cargo bench -p udpferry-peers --bench loopback -- --smoke` or `UDPFERRY_BENCH_SMOKE=1` (8 MiB, one run).
//!
//! Prints a table and writes the same numbers to `$CARGO_TARGET_DIR/loopback-bench.json`
//! (the workspace's `target/loopback-bench.json` without that variable). MB is 10^6 bytes.
//!
//! Every contender runs with its library's default settings; every loop has a deadline, and a
//! contender that fails or times out is reported as such instead of stopping the run.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use udpferry::core::{Endpoint, EndpointConfig, Event, NoObjects, RangeSet};
use udpferry::md5::Md5;
use udpferry::net::{Client, Driver, FetchOptions, HashThread, Server, ServerConfig};
use udpferry::store::ContentStore;
use udpferry::ObjectId;
use udpferry_sim::Rng;

#[path = "../common/mod.rs"]
mod common;
use common::{processes, put_served, TempDir};

const MIB: usize = 1 << 20;
const DATAGRAM: usize = 1200;
const TCP_WRITE: usize = MIB;
const LATENCY_SIZE: usize = MIB;

type Data = Arc<[u8]>;

// ---------------------------------------------------------------------------------------------
// Helpers

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Deadline for moving `size` bytes: generous (30 s plus 1 s per MB), only there so that a
/// stuck contender cannot hang the run.
fn deadline_for(size: usize) -> Duration {
    Duration::from_secs(30) + Duration::from_secs((size / 1_000_000) as u64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// One run of one throughput contender.
struct Run {
    secs: f64,
    /// Bytes the receiver got (less than the object size only for raw UDP).
    received: usize,
}

/// One contender's result over its runs.
struct Throughput {
    name: &'static str,
    outcome: Result<Vec<Run>, String>,
    note: String,
}

impl Throughput {
    /// Median of the per-run rates, MB/s (10^6 bytes per second).
    fn mb_per_s(&self) -> Option<f64> {
        let runs = self.outcome.as_ref().ok()?;
        Some(median(
            runs.iter()
                .map(|r| r.received as f64 / r.secs / 1e6)
                .collect(),
        ))
    }
    fn median_secs(&self) -> Option<f64> {
        let runs = self.outcome.as_ref().ok()?;
        Some(median(runs.iter().map(|r| r.secs).collect()))
    }
}

/// Time to first byte and to verified completion, seconds.
struct Latency {
    first_byte: f64,
    complete: f64,
    /// udpferry's `Client::fetch` only: when its final progress callback (the object verified)
    /// ran; the call returns later, after finalising the cache file and lingering for the
    /// sender's last datagrams.
    verified_callback: Option<f64>,
}

struct LatencyResult {
    name: &'static str,
    outcome: Result<Vec<Latency>, String>,
    note: String,
}

impl LatencyResult {
    fn medians(&self) -> Option<(f64, f64)> {
        let runs = self.outcome.as_ref().ok()?;
        Some((
            median(runs.iter().map(|l| l.first_byte).collect()),
            median(runs.iter().map(|l| l.complete).collect()),
        ))
    }
    fn verified_callback(&self) -> Option<f64> {
        let v: Vec<f64> = self
            .outcome
            .as_ref()
            .ok()?
            .iter()
            .filter_map(|l| l.verified_callback)
            .collect();
        (!v.is_empty()).then(|| median(v))
    }
}

fn repeat<T>(reps: usize, mut f: impl FnMut() -> Result<T, String>) -> Result<Vec<T>, String> {
    (0..reps).map(|_| f()).collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Raw UDP blast: no protocol, no verification, losses allowed.

fn raw_udp(data: &Data) -> Result<Run, String> {
    let rx = udpferry::net::bind("127.0.0.1:0".parse().unwrap()).map_err(err)?;
    let tx = udpferry::net::bind("127.0.0.1:0".parse().unwrap()).map_err(err)?;
    let to = rx.local_addr().map_err(err)?;
    rx.set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(err)?;
    let size = data.len();
    let sender_done = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let receiver = {
        let sender_done = sender_done.clone();
        thread::spawn(move || {
            let mut held = vec![0u8; size];
            let mut got = 0usize;
            let mut last = start;
            let mut buf = [0u8; 2048];
            let deadline = start + deadline_for(size);
            loop {
                match rx.recv(&mut buf) {
                    Ok(n) => {
                        let end = (got + n).min(size);
                        held[got..end].copy_from_slice(&buf[..end - got]);
                        got = end;
                        last = Instant::now();
                        if got >= size {
                            break;
                        }
                    }
                    Err(_) => {
                        // Nothing for 20 ms: done once the sender is, and the queue stayed dry
                        // for 100 ms after that.
                        if sender_done.load(Ordering::Relaxed)
                            && last.elapsed() > Duration::from_millis(100)
                        {
                            break;
                        }
                    }
                }
                if Instant::now() > deadline {
                    break;
                }
            }
            std::hint::black_box(&held);
            (got, last)
        })
    };
    let sender = {
        let data = data.clone();
        thread::spawn(move || {
            for chunk in data.chunks(DATAGRAM) {
                // A failed send (buffer full) is a lost datagram; that is the point.
                let _ = tx.send_to(chunk, to);
            }
        })
    };
    sender.join().map_err(|_| "sender panicked".to_string())?;
    sender_done.store(true, Ordering::Relaxed);
    let (got, last) = receiver
        .join()
        .map_err(|_| "receiver panicked".to_string())?;
    if got == 0 {
        return Err("nothing arrived".into());
    }
    Ok(Run {
        secs: last.duration_since(start).as_secs_f64(),
        received: got,
    })
}

// ---------------------------------------------------------------------------------------------
// 2. TCP + incremental MD5.

/// Serves `data` once to the next connection on `listener`, in 1 MiB writes.
fn tcp_serve_once(listener: TcpListener, data: Data) -> thread::JoinHandle<Result<(), String>> {
    thread::spawn(move || {
        let (mut s, _) = listener.accept().map_err(err)?;
        s.set_write_timeout(Some(deadline_for(data.len())))
            .map_err(err)?;
        for chunk in data.chunks(TCP_WRITE) {
            s.write_all(chunk).map_err(err)?;
        }
        s.shutdown(std::net::Shutdown::Write).map_err(err)?;
        Ok(())
    })
}

/// Connects, receives everything while hashing, checks the digest. Returns (first byte, done),
/// measured from before the connect.
fn tcp_fetch(addr: SocketAddr, size: usize, expected: [u8; 16]) -> Result<Latency, String> {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(err)?;
    let mut held: Vec<u8> = Vec::with_capacity(size);
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; TCP_WRITE];
    let mut first_byte = None;
    let deadline = start + deadline_for(size);
    loop {
        let n = s.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        first_byte.get_or_insert_with(|| start.elapsed());
        hasher.update(&buf[..n]);
        held.extend_from_slice(&buf[..n]);
        if Instant::now() > deadline {
            return Err("deadline passed".into());
        }
    }
    let digest: [u8; 16] = hasher.finalize();
    if held.len() != size || digest != expected {
        return Err(format!("got {} bytes, digest mismatch", held.len()));
    }
    Ok(Latency {
        first_byte: first_byte.unwrap_or_default().as_secs_f64(),
        complete: start.elapsed().as_secs_f64(),
        verified_callback: None,
    })
}

fn tcp_once(data: &Data, expected: [u8; 16]) -> Result<Latency, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(err)?;
    let addr = listener.local_addr().map_err(err)?;
    let server = tcp_serve_once(listener, data.clone());
    let result = tcp_fetch(addr, data.len(), expected);
    let served = server.join().map_err(|_| "server panicked".to_string())?;
    let latency = result?;
    served?;
    Ok(latency)
}

// ---------------------------------------------------------------------------------------------
// 3. QUIC (quinn, default transport settings) + incremental MD5, one unidirectional stream.

#[path = "quic.rs"]
mod quic;

/// One quinn transfer of `data` on loopback, handshake included.
fn quic_once(q: &quic::Quic, data: &Data, expected: [u8; 16]) -> Result<Latency, String> {
    let limit = deadline_for(data.len());
    let run = q.once(data.clone(), expected, limit, Ok)?;
    if !run.verified {
        return Err(format!("timed out after {limit:?}"));
    }
    Ok(Latency {
        first_byte: run.first_byte,
        complete: run.complete,
        verified_callback: None,
    })
}

// ---------------------------------------------------------------------------------------------
// 4. udpferry memory to memory: an endpoint over an in-memory map on one thread, a fetching
// endpoint with a Vec<u8> sink on another, each driven by a non-blocking loop.

/// Longest a driver loop waits before checking its stop flag and deadline.
const TURN_WAIT: Duration = Duration::from_millis(20);

fn random_config() -> EndpointConfig {
    EndpointConfig {
        seed: udpferry::net::random_seed(),
        ..EndpointConfig::default()
    }
}

/// One memory-to-memory transfer. Returns (first byte, verified) from the fetch call; the first
/// byte is when the receiver first held any of the object.
fn ferry_mem(data: &Data, id: ObjectId) -> Result<Latency, String> {
    let size = data.len();
    let driver = |socket| Driver::new(socket).map_err(err);
    let mut server_driver =
        driver(udpferry::net::bind("127.0.0.1:0".parse().unwrap()).map_err(err)?)?;
    let mut client_driver =
        driver(udpferry::net::bind("127.0.0.1:0".parse().unwrap()).map_err(err)?)?;
    let server_addr = server_driver.local_addr().map_err(err)?;
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + deadline_for(size);

    let server = {
        let stop = stop.clone();
        let mut objects: HashMap<ObjectId, Data> = HashMap::new();
        objects.insert(id, data.clone());
        thread::spawn(move || {
            let mut endpoint: Endpoint<HashMap<ObjectId, Data>, Vec<u8>> =
                Endpoint::new(random_config(), objects);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if server_driver
                    .turn(&mut endpoint, TURN_WAIT, &mut |_, _| {})
                    .is_err()
                {
                    break;
                }
            }
        })
    };

    let client = thread::spawn(move || -> Result<(Latency, Vec<u8>), String> {
        let mut endpoint: Endpoint<NoObjects, Vec<u8>> = Endpoint::new(random_config(), NoObjects);
        let start = Instant::now();
        let transfer = endpoint.fetch(
            start,
            server_addr,
            id,
            &RangeSet::new(),
            Vec::with_capacity(size),
        );
        // MD5 on a second core, as net::Client::fetch does.
        endpoint.set_hasher(transfer, Box::new(HashThread::new().map_err(err)?));
        let mut outcome: Option<Result<(), String>> = None;
        let mut first_byte = None;
        while outcome.is_none() {
            if Instant::now() > deadline {
                return Err("deadline passed".into());
            }
            client_driver
                .turn(&mut endpoint, TURN_WAIT, &mut |_, e| match e.event {
                    Event::Completed(_) => outcome = Some(Ok(())),
                    Event::Failed(f) => outcome = Some(Err(f.to_string())),
                    _ => {}
                })
                .map_err(err)?;
            if first_byte.is_none()
                && endpoint
                    .received_bytes(transfer)
                    .is_some_and(|r| r.covered() > 0)
            {
                first_byte = Some(start.elapsed());
            }
        }
        let secs = start.elapsed().as_secs_f64();
        outcome.unwrap()?;
        let held = endpoint
            .take_sink(transfer)
            .ok_or("completed transfer without its sink")?;
        // Send the final acknowledgements out before the socket closes.
        let _ = client_driver.flush(&mut endpoint);
        Ok((
            Latency {
                first_byte: first_byte.map_or(secs, |d| d.as_secs_f64()),
                complete: secs,
                verified_callback: None,
            },
            held,
        ))
    });
    let result = client.join().map_err(|_| "client panicked".to_string());
    stop.store(true, Ordering::Relaxed);
    server.join().map_err(|_| "server panicked".to_string())?;
    let (latency, held) = result??;
    // udpferry verified the MD5 before reporting completion; this only guards the benchmark.
    if held.len() != size || held[..] != data[..] {
        return Err("completed but the bytes differ".into());
    }
    Ok(latency)
}

// ---------------------------------------------------------------------------------------------
// 5. udpferry file to file: net::Server over a ContentStore, net::Client::fetch into a cache.

struct FileServer {
    addr: SocketAddr,
    /// Declared before the directory, so the server stops before its files go.
    _server: udpferry::ServerHandle,
    _dir: TempDir,
}

impl FileServer {
    fn start(data: &Data) -> Result<Self, String> {
        let dir = TempDir::new("store").map_err(err)?;
        put_served(&dir.0.join("object.bin"), data).map_err(err)?;
        let store = ContentStore::open(&dir.0).map_err(err)?;
        let server = Server::bind(
            "127.0.0.1:0".parse().unwrap(),
            store,
            ServerConfig::default(),
        )
        .and_then(Server::spawn)
        .map_err(err)?;
        Ok(FileServer {
            addr: server.local_addr(),
            _server: server,
            _dir: dir,
        })
    }
}

/// One `Client::fetch` into a fresh cache. Returns (first progress callback, return) from the
/// call, and the bytes received.
fn ferry_fetch(server: &FileServer, id: ObjectId, size: usize) -> Result<Latency, String> {
    let cache = TempDir::new("cache").map_err(err)?;
    let client = Client::new(&cache.0).map_err(err)?;
    let options = FetchOptions {
        timeout: Some(deadline_for(size)),
        ..FetchOptions::default()
    };
    let start = Instant::now();
    let mut first_byte = None;
    let mut verified = None;
    let report = client
        .fetch(server.addr, id, &options, |p| {
            if p.bytes_done > 0 {
                first_byte.get_or_insert_with(|| start.elapsed());
            }
            if p.bytes_done == p.total {
                verified.get_or_insert_with(|| start.elapsed());
            }
        })
        .map_err(err)?;
    let complete = start.elapsed();
    if report.from_cache || report.size != size as u64 {
        return Err("unexpected report: from cache or wrong size".into());
    }
    let len = std::fs::metadata(&report.path).map_err(err)?.len();
    if len != size as u64 {
        return Err(format!("cache file has {len} bytes"));
    }
    Ok(Latency {
        first_byte: first_byte.unwrap_or(complete).as_secs_f64(),
        complete: complete.as_secs_f64(),
        verified_callback: verified.map(|d| d.as_secs_f64()),
    })
}

// ---------------------------------------------------------------------------------------------
// Report

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_num(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.6}"),
        _ => "null".into(),
    }
}

fn main() {
    let smoke = common::smoke();
    let size_mib: usize = if smoke {
        8
    } else {
        std::env::var("UDPFERRY_BENCH_SIZE_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(256)
    };
    let reps = if smoke { 1 } else { 3 };
    // The contenders that spawn processes take under a second a run at 256 MiB and vary more
    // from run to run (process start, page cache, disk sync): seven runs each for their medians.
    let process_reps = if smoke { 1 } else { 7 };
    let size = size_mib * MIB;
    // `UDPFERRY_BENCH_ONLY=mem,tcp` runs only the contenders whose names contain one of the
    // comma-separated words (for profiling one of them).
    let only = std::env::var("UDPFERRY_BENCH_ONLY").ok();
    let wanted = |name: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|w| !w.is_empty() && name.contains(w)))
    };

    eprintln!("loopback bench: {size_mib} MiB object, {reps} run(s) per contender");
    let mut bytes = vec![0u8; size];
    Rng::new(0x5eed).fill_bytes(&mut bytes);
    let data: Data = bytes.into();
    let id = ObjectId::md5_of(&data);
    let expected = Md5::digest(&data);

    let mut small = vec![0u8; LATENCY_SIZE];
    Rng::new(0x5ea1).fill_bytes(&mut small);
    let small: Data = small.into();
    let small_id = ObjectId::md5_of(&small);
    let small_expected = Md5::digest(&small);

    let quic = quic::Quic::new(None);

    let mut results: Vec<Throughput> = Vec::new();

    if wanted("MD5 alone") {
        eprintln!("MD5 alone...");
        results.push(Throughput {
            name: "MD5 alone",
            outcome: repeat(reps, || {
                let start = Instant::now();
                let digest = Md5::digest(&data);
                let secs = start.elapsed().as_secs_f64();
                if digest != expected {
                    return Err("digest changed".into());
                }
                Ok(Run {
                    secs,
                    received: size,
                })
            }),
            note: "udpferry's MD5 over the object in memory, one core: the limit of any verified download"
                .into(),
        });
    }

    if wanted("raw UDP blast") {
        eprintln!("raw UDP blast...");
        let raw = repeat(reps, || raw_udp(&data));
        let raw_note = match &raw {
            Ok(runs) => {
                let loss = median(
                    runs.iter()
                        .map(|r| 100.0 * (1.0 - r.received as f64 / size as f64))
                        .collect(),
                );
                format!("ceiling: {DATAGRAM}-byte datagrams, no protocol, no verification; {loss:.1}% lost (median)")
            }
            Err(_) => String::new(),
        };
        results.push(Throughput {
            name: "raw UDP blast",
            outcome: raw,
            note: raw_note,
        });
    }

    if wanted("TCP + MD5") {
        eprintln!("TCP + MD5...");
        results.push(Throughput {
            name: "TCP + MD5",
            outcome: repeat(reps, || {
                tcp_once(&data, expected).map(|l| Run {
                    secs: l.complete,
                    received: size,
                })
            }),
            note: "std TcpStream, 1 MiB writes, MD5 while receiving, connect included".into(),
        });
    }

    if wanted("quinn + MD5") {
        eprintln!("quinn + MD5...");
        results.push(Throughput {
            name: "quinn + MD5",
            outcome: match &quic {
                Ok(q) => repeat(reps, || {
                    quic_once(q, &data, expected).map(|l| Run {
                        secs: l.complete,
                        received: size,
                    })
                }),
                Err(e) => Err(format!("not run: {e}")),
            },
            note: "quinn 0.11 defaults, one uni stream, MD5 while receiving, handshake included"
                .into(),
        });
    }

    if wanted("udpferry mem-to-mem") {
        eprintln!("udpferry memory to memory...");
        results.push(Throughput {
            name: "udpferry mem-to-mem",
            outcome: repeat(reps, || {
                ferry_mem(&data, id).map(|l| Run {
                    secs: l.complete,
                    received: size,
                })
            }),
            note: "Endpoint + net::Driver per side, in-memory map / Vec<u8> sink, HashThread, defaults"
                .into(),
        });
    }

    if wanted("udpferry file-to-file") {
        eprintln!("udpferry file to file...");
        let file_runs = FileServer::start(&data).and_then(|server| {
            repeat(reps, || {
                ferry_fetch(&server, id, size).map(|l| Run {
                    secs: l.complete,
                    received: size,
                })
            })
        });
        results.push(Throughput {
            name: "udpferry file-to-file",
            outcome: file_runs,
            note: "net::Server over a ContentStore, net::Client::fetch into a fresh cache".into(),
        });
    }

    // What users run: processes, timed from start to exit (issue 14). Each contender's runs of
    // the large object and of the 1 MiB one.
    let served = TempDir::new("served").map_err(err).and_then(|dir| {
        put_served(&dir.0.join("object.bin"), &data).map_err(err)?;
        put_served(&dir.0.join("small.bin"), &small).map_err(err)?;
        Ok(dir)
    });
    let scratch = TempDir::new("scratch").map_err(err);
    let mut small_secs: HashMap<&str, f64> = HashMap::new();
    let mut process_runs =
        |name: &'static str, note: &str, runs: Result<(Vec<f64>, Vec<f64>), String>| {
            if let Ok((_, small)) = &runs {
                small_secs.insert(name, median(small.clone()));
            }
            results.push(Throughput {
                name,
                outcome: runs.map(|(big, _)| {
                    big.into_iter()
                        .map(|secs| Run {
                            secs,
                            received: size,
                        })
                        .collect()
                }),
                note: note.into(),
            });
        };
    // One server, two, and HTTP + curl: their runs take turns (one, two, curl, one, two, curl,
    // ...) so every contender sees the same machine; the ratios "two servers / one" and
    // "get -o / curl + md5sum" compare them (issue 14). On this shared VM, a block of runs of
    // one contender could otherwise land in a quiet minute and the next in a busy one.
    let (want_one, want_two, want_curl) = (
        wanted("udpferry get -o (CLI)"),
        wanted("udpferry get -o, two servers"),
        wanted("HTTP + curl + md5sum"),
    );
    if want_one || want_two || want_curl {
        eprintln!(
            "udpferry serve + get -o from one server and from two, and HTTP + curl -o + md5sum, taking turns (processes)..."
        );
        type Runs = (Vec<f64>, Vec<f64>);
        let runs: Result<(Runs, Runs, Runs), String> = (|| {
            let (dir, scratch) = (served.as_ref()?, scratch.as_ref()?);
            // The udpferry rows need the release binary; the curl row runs without it.
            let bin = if want_one || want_two {
                Some(processes::udpferry_bin()?)
            } else {
                None
            };
            let mut servers = Vec::new();
            if let Some(bin) = &bin {
                servers.push(processes::udpferry_serve(bin, &dir.0)?);
                if want_two {
                    servers.push(processes::udpferry_serve(bin, &dir.0)?);
                }
            }
            let one_addr = servers.first().filter(|_| want_one).map(|(_, a)| a.clone());
            let both = match servers.as_slice() {
                [(_, a), (_, b)] => Some(format!("{a},{b}")),
                _ => None,
            };
            let http = if want_curl {
                Some(processes::http_serve(&dir.0)?)
            } else {
                None
            };
            let get = |servers: &str, id: &ObjectId, len| match &bin {
                Some(bin) => processes::udpferry_get(bin, servers, &id.to_hex(), &scratch.0, len),
                None => Err("no udpferry binary".to_string()),
            };
            let curl = |base: &str, name: &str, id: &ObjectId| {
                processes::curl_md5sum(&format!("{base}/{name}"), &scratch.0, &id.to_hex())
            };
            // One warm-up run from both: a server builds an object's manifest on the first
            // request for it (a pass over the file), then keeps it.
            if let Some(both) = &both {
                get(both, &id, size)?;
                get(both, &small_id, LATENCY_SIZE)?;
            }
            let mut one = (Vec::new(), Vec::new());
            let mut two = (Vec::new(), Vec::new());
            let mut web = (Vec::new(), Vec::new());
            for big in [true, false] {
                let (object, name, len) = if big {
                    (&id, "object.bin", size)
                } else {
                    (&small_id, "small.bin", LATENCY_SIZE)
                };
                fn pick(runs: &mut Runs, big: bool) -> &mut Vec<f64> {
                    if big {
                        &mut runs.0
                    } else {
                        &mut runs.1
                    }
                }
                for _ in 0..process_reps {
                    if let Some(a) = &one_addr {
                        let secs = get(a, object, len)?;
                        pick(&mut one, big).push(secs);
                    }
                    if let Some(both) = &both {
                        let secs = get(both, object, len)?;
                        pick(&mut two, big).push(secs);
                    }
                    if let Some((_, base)) = &http {
                        let secs = curl(base, name, object)?;
                        pick(&mut web, big).push(secs);
                    }
                }
            }
            Ok((one, two, web))
        })();
        let (one, two, web) = match runs {
            Ok((one, two, web)) => (Ok(one), Ok(two), Ok(web)),
            Err(e) => (Err(e.clone()), Err(e.clone()), Err(e)),
        };
        if want_one {
            process_runs(
                "udpferry get -o (CLI)",
                "the release binary: serve, then one get -o process per run into a fresh cache, start to exit (durable: fdatasync of file and directory)",
                one,
            );
        }
        if want_two {
            process_runs(
                "udpferry get -o, two servers (CLI)",
                "two serve processes of the same directory, one get -o from both per run (after one warm-up run that builds the servers' manifests)",
                two,
            );
        }
        if want_curl {
            process_runs(
                "HTTP + curl + md5sum",
                "python3 -m http.server, then curl -o and md5sum per run, start to exit (no sync); its runs take turns with the two rows above",
                web,
            );
        }
    }

    eprintln!("1 MiB latency...");
    let mut latency: Vec<LatencyResult> = Vec::new();
    if wanted("TCP + MD5") {
        latency.push(LatencyResult {
            name: "TCP + MD5",
            outcome: repeat(reps, || tcp_once(&small, small_expected)),
            note: "from connect; first byte = first read".into(),
        });
    }
    if wanted("quinn + MD5") {
        latency.push(LatencyResult {
            name: "quinn + MD5",
            outcome: match &quic {
                Ok(q) => repeat(reps, || quic_once(q, &small, small_expected)),
                Err(e) => Err(format!("not run: {e}")),
            },
            note: "from connect (handshake included); first byte = first chunk".into(),
        });
    }
    if wanted("udpferry mem-to-mem") {
        latency.push(LatencyResult {
            name: "udpferry mem-to-mem",
            outcome: repeat(reps, || ferry_mem(&small, small_id)),
            note: "from Endpoint::fetch to the Completed event; first byte = receiver first holds data"
                .into(),
        });
    }
    if wanted("udpferry Client::fetch") {
        latency.push(LatencyResult {
            name: "udpferry Client::fetch",
            outcome: FileServer::start(&small)
                .and_then(|server| repeat(reps, || ferry_fetch(&server, small_id, LATENCY_SIZE))),
            note: "from the call to its return; first byte = first progress callback; \
                   verified callback = final progress callback"
                .into(),
        });
    }

    // Table.
    let base = results
        .iter()
        .find(|r| r.name == "udpferry file-to-file")
        .and_then(|r| r.mb_per_s());
    println!();
    println!(
        "loopback, {size_mib} MiB object, median of {reps} ({process_reps} for the CLI contenders; MB = 10^6 bytes)"
    );
    println!(
        "{:<24} {:>10} {:>10} {:>12}  notes",
        "contender", "MB/s", "seconds", "vs file2file"
    );
    for r in &results {
        match (&r.outcome, r.mb_per_s()) {
            (Ok(_), Some(mbps)) => println!(
                "{:<24} {:>10.1} {:>10.3} {:>12}  {}",
                r.name,
                mbps,
                r.median_secs().unwrap_or(f64::NAN),
                base.map_or("-".into(), |b| format!("{:.2}x", mbps / b)),
                r.note
            ),
            _ => println!(
                "{:<24} {:>10} {:>10} {:>12}  {}",
                r.name,
                "-",
                "-",
                "-",
                r.outcome.as_ref().err().cloned().unwrap_or_default()
            ),
        }
    }
    println!();
    println!("1 MiB object, median of {reps} ({process_reps} for the CLI contenders)");
    println!(
        "{:<24} {:>14} {:>14} {:>18}  notes",
        "contender", "first byte ms", "verified ms", "verified cb ms"
    );
    for l in &latency {
        match (&l.outcome, l.medians()) {
            (Ok(_), Some((fb, done))) => println!(
                "{:<24} {:>14.2} {:>14.2} {:>18}  {}",
                l.name,
                fb * 1e3,
                done * 1e3,
                l.verified_callback()
                    .map_or("-".into(), |v| format!("{:.2}", v * 1e3)),
                l.note
            ),
            _ => println!(
                "{:<24} {:>14} {:>14} {:>18}  {}",
                l.name,
                "-",
                "-",
                "-",
                l.outcome.as_ref().err().cloned().unwrap_or_default()
            ),
        }
    }

    // The targets, as ratios within this run.
    let mbps = |name: &str| {
        results
            .iter()
            .find(|r| r.name == name)
            .and_then(|r| r.mb_per_s())
    };
    let verified_ms = |name: &str| {
        latency
            .iter()
            .find(|l| l.name == name)
            .and_then(|l| l.medians())
            .map(|m| m.1 * 1e3)
    };
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let targets: Vec<(&str, Option<f64>, &str, bool)> = vec![
        (
            "file-to-file / TCP+MD5",
            ratio(mbps("udpferry file-to-file"), mbps("TCP + MD5")),
            ">= 0.85",
            true,
        ),
        (
            "file-to-file / quinn+MD5",
            ratio(mbps("udpferry file-to-file"), mbps("quinn + MD5")),
            ">= 1.2",
            true,
        ),
        (
            "mem-to-mem / MD5 alone",
            ratio(mbps("udpferry mem-to-mem"), mbps("MD5 alone")),
            ">= 0.8",
            true,
        ),
        (
            "get -o (CLI) / HTTP+curl+md5sum, wall time",
            ratio(mbps("HTTP + curl + md5sum"), mbps("udpferry get -o (CLI)")),
            "<= 1.0",
            false,
        ),
        (
            "get -o (CLI) / TCP+MD5",
            ratio(mbps("udpferry get -o (CLI)"), mbps("TCP + MD5")),
            ">= 0.85",
            true,
        ),
        (
            "get -o (CLI) / quinn+MD5",
            ratio(mbps("udpferry get -o (CLI)"), mbps("quinn + MD5")),
            ">= 1.3",
            true,
        ),
        (
            "get -o from two servers / from one",
            ratio(
                mbps("udpferry get -o, two servers (CLI)"),
                mbps("udpferry get -o (CLI)"),
            ),
            ">= 0.9",
            true,
        ),
        (
            "1 MiB get -o / curl+md5sum, start to exit",
            ratio(
                small_secs.get("udpferry get -o (CLI)").copied(),
                small_secs.get("HTTP + curl + md5sum").copied(),
            ),
            "<= 1.5",
            false,
        ),
        (
            "1 MiB Client::fetch / TCP+MD5, verified time",
            ratio(
                verified_ms("udpferry Client::fetch"),
                verified_ms("TCP + MD5"),
            ),
            "<= 2.0",
            false,
        ),
    ];
    let target_met = |value: f64, goal: &str, higher: bool| {
        let bound: f64 = goal
            .trim_start_matches(['>', '<', '=', ' '])
            .parse()
            .unwrap_or(f64::NAN);
        if higher {
            value >= bound
        } else {
            value <= bound
        }
    };
    println!();
    println!("targets (ratios within this run)");
    for (name, value, goal, higher) in &targets {
        match value {
            Some(v) => println!(
                "{name:<46} {v:>6.2}  target {goal:<7} {}",
                if target_met(*v, goal, *higher) {
                    "met"
                } else {
                    "missed"
                }
            ),
            None => println!("{name:<46} {:>6}  target {goal}", "-"),
        }
    }

    // JSON.
    let mut j = String::new();
    j.push_str("{\n");
    j.push_str(&format!(
        "  \"size_mib\": {size_mib},\n  \"runs\": {reps},\n  \"process_runs\": {process_reps},\n  \"smoke\": {smoke},\n"
    ));
    j.push_str("  \"unit\": \"MB/s, MB = 10^6 bytes\",\n  \"throughput\": [\n");
    let rows: Vec<String> = results
        .iter()
        .map(|r| {
            let mbps = r.mb_per_s();
            let ratio = mbps.zip(base).map(|(m, b)| m / b);
            let runs = r
                .outcome
                .as_ref()
                .map(|v| {
                    v.iter()
                        .map(|x| format!("{:.6}", x.secs))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            format!(
                "    {{\"name\": {}, \"mb_per_s\": {}, \"median_secs\": {}, \"ratio_to_udpferry_file\": {}, \"runs_secs\": [{}], \"error\": {}, \"note\": {}}}",
                json_str(r.name),
                json_num(mbps),
                json_num(r.median_secs()),
                json_num(ratio),
                runs,
                r.outcome.as_ref().err().map_or("null".into(), |e| json_str(e)),
                json_str(&r.note)
            )
        })
        .collect();
    j.push_str(&rows.join(",\n"));
    j.push_str("\n  ],\n  \"latency_1mib\": [\n");
    let rows: Vec<String> = latency
        .iter()
        .map(|l| {
            let m = l.medians();
            format!(
                "    {{\"name\": {}, \"first_byte_ms\": {}, \"verified_ms\": {}, \"verified_callback_ms\": {}, \"error\": {}, \"note\": {}}}",
                json_str(l.name),
                json_num(m.map(|x| x.0 * 1e3)),
                json_num(m.map(|x| x.1 * 1e3)),
                json_num(l.verified_callback().map(|x| x * 1e3)),
                l.outcome.as_ref().err().map_or("null".into(), |e| json_str(e)),
                json_str(&l.note)
            )
        })
        .collect();
    j.push_str(&rows.join(",\n"));
    j.push_str("\n  ],\n  \"targets\": [\n");
    let rows: Vec<String> = targets
        .iter()
        .map(|(name, value, goal, higher)| {
            format!(
                "    {{\"name\": {}, \"value\": {}, \"target\": {}, \"met\": {}}}",
                json_str(name),
                json_num(*value),
                json_str(goal),
                value.map_or("null".into(), |v| target_met(v, goal, *higher).to_string())
            )
        })
        .collect();
    j.push_str(&rows.join(",\n"));
    j.push_str("\n  ]\n}\n");
    common::write_report("loopback-bench.json", &j);
}
