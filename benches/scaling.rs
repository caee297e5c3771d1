//! One server, many concurrent clients, memory to memory over loopback: aggregate goodput, the
//! server's CPU seconds per GB sent, and the server's heap per active transfer.
//!
//! `cargo bench --bench scaling` (1, 10 and 100 clients of a 4 MiB object, then one client of a
//! 64 and of a 256 MiB object to show that memory per transfer does not grow with object size);
//! `UDPFERRY_SCALING_CASES=1x4,50x8 cargo bench --bench scaling` (other cases: clients x MiB);
//! `cargo bench --bench scaling -- --smoke` or `UDPFERRY_BENCH_SMOKE=1` (1 and 10 clients,
//! 1 MiB).
//!
//! The server is one `net::Driver` + `Endpoint` on its own thread, with a global rate cap
//! (10 GB/s) far above what loopback carries. Each client is an `Endpoint` on its own socket,
//! bound to its own loopback address (127.0.0.2, 127.0.0.3, ...: the server's per-address limit
//! stays at its default), and two threads drive all clients. Server CPU time comes from
//! `/proc/thread-self/schedstat` (Linux; "-" elsewhere); server heap from a counting allocator
//! that keeps a per-thread tally of live bytes and its peak.
//!
//! With `UDPFERRY_BIN` set to the release binary (scripts/benchmarks.sh and .ci/run set it), it
//! then runs what users run: one `udpferry serve` process and 1 or 50 concurrent `udpferry get`
//! processes (each `--bind` to its own loopback address), with the serve process's CPU time
//! (all threads) per GB and the growth of its peak resident memory per get.
//!
//! Prints the tables and writes `$CARGO_TARGET_DIR/scaling-bench.json`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use udpferry::core::{Endpoint, EndpointConfig, Event, NoObjects, RangeSet};
use udpferry::net::Driver;
use udpferry::ObjectId;
use udpferry_sim::Rng;

mod common;

// ---------------------------------------------------------------------------------------------
// A global allocator that counts live heap bytes per thread (and their peak), so the server
// thread's memory can be told apart from the clients'.

struct Counting;

thread_local! {
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn account(delta: i64) {
    // `try_with`: allocations during thread teardown are not counted rather than panicking.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| {
            if now > peak.get() {
                peak.set(now)
            }
        });
    });
}

// SAFETY: every call forwards to the system allocator unchanged; the counting only reads the
// sizes it is given and touches const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            account(layout.size() as i64);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        account(-(layout.size() as i64));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            account(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Live heap bytes of the calling thread, and resets its peak to that.
fn heap_mark() -> i64 {
    let live = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(live));
    live
}

fn heap_peak() -> i64 {
    PEAK.with(Cell::get)
}

/// CPU time the calling thread has used, in seconds (Linux only).
fn thread_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

// ---------------------------------------------------------------------------------------------

const MIB: usize = 1 << 20;
const CLIENT_THREADS: usize = 2;

type Objects = HashMap<ObjectId, Arc<[u8]>>;

struct Row {
    clients: usize,
    size_mib: usize,
    secs: f64,
    bytes_sent: u64,
    server_cpu: Option<f64>,
    heap_per_transfer: f64,
}

impl Row {
    fn aggregate_mb_per_s(&self) -> f64 {
        (self.clients * self.size_mib * MIB) as f64 / self.secs / 1e6
    }
    fn cpu_per_gb(&self) -> Option<f64> {
        self.server_cpu.map(|c| c / (self.bytes_sent as f64 / 1e9))
    }
}

fn config() -> EndpointConfig {
    EndpointConfig {
        seed: udpferry::net::random_seed(),
        ..EndpointConfig::default()
    }
}

/// What the server thread measured.
struct ServerReport {
    cpu: Option<f64>,
    /// Peak live heap of the server thread above its level before the first request.
    heap_peak: i64,
    bytes_sent: u64,
}

fn run(clients: usize, size: usize) -> Result<Row, String> {
    let mut bytes = vec![0u8; size];
    Rng::new(0x5ca1e).fill_bytes(&mut bytes);
    let data: Arc<[u8]> = bytes.into();
    let id = ObjectId::md5_of(&data);
    let mut objects = Objects::new();
    objects.insert(id, data.clone());

    let server_socket =
        udpferry::net::bind("127.0.0.1:0".parse().unwrap()).map_err(|e| e.to_string())?;
    let server_addr = server_socket.local_addr().map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(60 + (clients * size / MIB) as u64);

    let server = {
        let stop = stop.clone();
        thread::spawn(move || -> Result<ServerReport, String> {
            let mut driver = Driver::new(server_socket).map_err(|e| e.to_string())?;
            let mut endpoint_config = config();
            endpoint_config.max_transfers = clients.max(256);
            endpoint_config.rate_limit_bytes_per_sec = 10_000_000_000;
            let mut endpoint: Endpoint<Objects, Vec<u8>> = Endpoint::new(endpoint_config, objects);
            let base = heap_mark();
            let cpu0 = thread_cpu_secs();
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                driver
                    .turn(&mut endpoint, Duration::from_millis(20), &mut |_, _| {})
                    .map_err(|e| e.to_string())?;
            }
            Ok(ServerReport {
                cpu: thread_cpu_secs().zip(cpu0).map(|(b, a)| b - a),
                heap_peak: heap_peak() - base,
                bytes_sent: endpoint.stats().bytes_sent,
            })
        })
    };

    // Each client: its own socket on its own loopback address, an endpoint, one fetch.
    let mut fleets: Vec<Vec<usize>> = vec![Vec::new(); CLIENT_THREADS];
    for i in 0..clients {
        fleets[i % CLIENT_THREADS].push(i);
    }
    let start = Instant::now();
    let handles: Vec<_> = fleets
        .into_iter()
        .map(|fleet| {
            thread::spawn(move || -> Result<(), String> {
                let mut sides = Vec::new();
                for i in fleet {
                    let ip = IpAddr::V4(Ipv4Addr::new(
                        127,
                        0,
                        (2 + i / 250) as u8,
                        (2 + i % 250) as u8,
                    ));
                    let socket = udpferry::net::bind(SocketAddr::new(ip, 0))
                        .map_err(|e| format!("bind {ip}: {e}"))?;
                    let driver = Driver::new(socket).map_err(|e| e.to_string())?;
                    let mut endpoint: Endpoint<NoObjects, Vec<u8>> =
                        Endpoint::new(config(), NoObjects);
                    endpoint.fetch(
                        Instant::now(),
                        server_addr,
                        id,
                        &RangeSet::new(),
                        Vec::with_capacity(size),
                    );
                    sides.push((driver, endpoint, None::<Result<(), String>>));
                }
                while sides.iter().any(|s| s.2.is_none()) {
                    if Instant::now() > deadline {
                        return Err("deadline passed".into());
                    }
                    let mut busy = false;
                    for (driver, endpoint, outcome) in sides.iter_mut() {
                        let activity = driver
                            .pump(endpoint, &mut |_, e| match e.event {
                                Event::Completed(_) => *outcome = Some(Ok(())),
                                Event::Failed(f) => *outcome = Some(Err(f.to_string())),
                                _ => {}
                            })
                            .map_err(|e| e.to_string())?;
                        busy |= activity.is_busy();
                    }
                    if !busy {
                        thread::sleep(Duration::from_micros(50));
                    }
                }
                for (driver, endpoint, outcome) in sides.iter_mut() {
                    let _ = driver.flush(endpoint); // the final acknowledgements
                    if let Some(Err(e)) = outcome.take() {
                        return Err(e);
                    }
                }
                Ok(())
            })
        })
        .collect();
    let mut result = Ok(());
    for h in handles {
        let r = h.join().map_err(|_| "client thread panicked".to_string());
        if result.is_ok() {
            result = r.and_then(|r| r);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    // Let the server see the final acknowledgements and reap its transfers.
    thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    let server = server
        .join()
        .map_err(|_| "server thread panicked".to_string())??;
    result?;
    Ok(Row {
        clients,
        size_mib: size / MIB,
        secs,
        bytes_sent: server.bytes_sent,
        server_cpu: server.cpu,
        heap_per_transfer: server.heap_peak as f64 / clients as f64,
    })
}

// ---------------------------------------------------------------------------------------------
// The same with the real binary (issue 14): one `udpferry serve` process and concurrent
// `udpferry get` processes, each from its own loopback address (`--bind`).

/// What one run of the real binaries measured.
struct ProcessRow {
    clients: usize,
    size_mib: usize,
    secs: f64,
    /// CPU seconds of the serve process during the run (all its threads).
    server_cpu: Option<f64>,
    /// Growth of the serve process's peak resident memory over its level before the run.
    server_rss_growth: Option<u64>,
}

impl ProcessRow {
    fn aggregate_mb_per_s(&self) -> f64 {
        (self.clients * self.size_mib * MIB) as f64 / self.secs / 1e6
    }
    fn cpu_per_gb(&self) -> Option<f64> {
        let gb = (self.clients * self.size_mib * MIB) as f64 / 1e9;
        self.server_cpu.map(|c| c / gb)
    }
}

/// CPU seconds of every thread of process `pid` (Linux: `/proc/PID/task/*/schedstat`).
fn process_cpu_secs(pid: u32) -> Option<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        ns += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e9)
}

/// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn run_processes(bin: &std::path::Path, clients: usize, size: usize) -> Result<ProcessRow, String> {
    use common::processes::{udpferry_serve, Proc};
    let err = |e: std::io::Error| e.to_string();
    let dir = common::TempDir::new("scaling").map_err(err)?;
    let served = dir.join("served");
    std::fs::create_dir_all(&served).map_err(err)?;
    let mut bytes = vec![0u8; size];
    Rng::new(0x5ca1e).fill_bytes(&mut bytes);
    let id = ObjectId::md5_of(&bytes).to_hex();
    common::put_served(&served.join("map.bin"), &bytes).map_err(err)?;
    drop(bytes);
    let (server, addr) = udpferry_serve(bin, &served)?;
    let pid = server.id();
    let rss_before = status_kib(pid, "VmRSS:");
    let cpu_before = process_cpu_secs(pid);
    let start = Instant::now();
    let gets: Vec<Proc> = (0..clients)
        .map(|i| {
            let ip = Ipv4Addr::new(127, 0, (2 + i / 250) as u8, (2 + i % 250) as u8);
            let mut get = std::process::Command::new(bin);
            get.args(["get", &addr, &id, "--timeout", "120", "--bind"])
                .arg(format!("{ip}:0"))
                .arg("--cache")
                .arg(dir.join(&format!("cache-{i}")));
            Proc::quiet(get).map_err(err)
        })
        .collect::<Result<_, _>>()?;
    let mut failed = 0;
    for mut g in gets {
        if !g.wait().map_err(err)?.success() {
            failed += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let server_cpu = process_cpu_secs(pid).zip(cpu_before).map(|(b, a)| b - a);
    let peak = status_kib(pid, "VmHWM:");
    if failed > 0 {
        return Err(format!("{failed} of {clients} get processes failed"));
    }
    Ok(ProcessRow {
        clients,
        size_mib: size / MIB,
        secs,
        server_cpu,
        server_rss_growth: peak
            .zip(rss_before)
            .map(|(p, b)| p.saturating_sub(b) * 1024),
    })
}

fn main() {
    let smoke = common::smoke();
    // `UDPFERRY_SCALING_CASES=1x4,50x8` runs other cases: clients x MiB each.
    let custom: Option<Vec<(usize, usize)>> =
        std::env::var("UDPFERRY_SCALING_CASES").ok().map(|v| {
            v.split(',')
                .filter_map(|c| {
                    let (n, m) = c.split_once('x')?;
                    Some((n.trim().parse().ok()?, m.trim().parse().ok()?))
                })
                .filter(|&(n, m)| n > 0 && m > 0)
                .collect()
        });
    let cases: Vec<(usize, usize)> = match custom {
        Some(c) if !c.is_empty() => c,
        _ if smoke => vec![(1, 1), (10, 1)],
        _ => vec![(1, 4), (10, 4), (100, 4), (1, 64), (1, 256)],
    };
    let mut rows = Vec::new();
    for &(clients, size_mib) in &cases {
        eprintln!("{clients} client(s), {size_mib} MiB each...");
        match run(clients, size_mib * MIB) {
            Ok(row) => rows.push(row),
            Err(e) => eprintln!("  failed: {e}"),
        }
    }
    // The real binaries, when UDPFERRY_BIN names the release binary (scripts/benchmarks.sh
    // and .ci/run set it): 50 get processes of 8 MiB, and one of 8, 64 and 256 MiB to show
    // that the server's memory per transfer does not follow the object (smoke: 10 of 1 MiB).
    let bin = common::processes::udpferry_bin();
    let process_cases: Vec<(usize, usize)> = match &bin {
        Err(e) => {
            eprintln!("real binaries {e}");
            Vec::new()
        }
        Ok(_) if smoke => vec![(10, 1)],
        Ok(_) => vec![(1, 8), (1, 64), (1, 256), (50, 8)],
    };
    let mut process_rows = Vec::new();
    for &(clients, size_mib) in &process_cases {
        eprintln!("udpferry serve + {clients} udpferry get process(es), {size_mib} MiB each...");
        if let Ok(bin) = &bin {
            match run_processes(bin, clients, size_mib * MIB) {
                Ok(row) => process_rows.push(row),
                Err(e) => eprintln!("  failed: {e}"),
            }
        }
    }
    println!();
    println!("one server, concurrent clients, memory to memory over loopback (MB = 10^6 bytes)");
    println!(
        "{:>8} {:>10} {:>10} {:>14} {:>20} {:>24}",
        "clients",
        "MiB each",
        "seconds",
        "aggregate MB/s",
        "server CPU s per GB",
        "server heap per transfer"
    );
    for r in &rows {
        println!(
            "{:>8} {:>10} {:>10.3} {:>14.1} {:>20} {:>21.1} KiB",
            r.clients,
            r.size_mib,
            r.secs,
            r.aggregate_mb_per_s(),
            r.cpu_per_gb().map_or("-".into(), |c| format!("{c:.2}")),
            r.heap_per_transfer / 1024.0
        );
    }
    if !process_rows.is_empty() {
        println!();
        println!(
            "the real binaries: one `udpferry serve` process, concurrent `udpferry get` processes \
             (each --bind to its own 127.0.x.y, into its own cache), start of the first to exit of \
             the last; the clients share the machine's cores with the server"
        );
        println!(
            "{:>8} {:>10} {:>10} {:>14} {:>20} {:>26}",
            "gets",
            "MiB each",
            "seconds",
            "aggregate MB/s",
            "server CPU s per GB",
            "server peak RSS growth/get"
        );
        for r in &process_rows {
            println!(
                "{:>8} {:>10} {:>10.3} {:>14.1} {:>20} {:>26}",
                r.clients,
                r.size_mib,
                r.secs,
                r.aggregate_mb_per_s(),
                r.cpu_per_gb().map_or("-".into(), |c| format!("{c:.2}")),
                r.server_rss_growth.map_or("-".into(), |g| format!(
                    "{:.1} KiB",
                    g as f64 / 1024.0 / r.clients as f64
                ))
            );
        }
    }
    let process_body: Vec<String> = process_rows
        .iter()
        .map(|r| {
            format!(
                "    {{\"clients\": {}, \"size_mib\": {}, \"secs\": {:.6}, \"aggregate_mb_per_s\": {:.3}, \"server_cpu_secs_per_gb\": {}, \"server_rss_growth_bytes_per_get\": {}}}",
                r.clients,
                r.size_mib,
                r.secs,
                r.aggregate_mb_per_s(),
                r.cpu_per_gb().map_or("null".into(), |c| format!("{c:.4}")),
                r.server_rss_growth
                    .map_or("null".into(), |g| format!("{:.0}", g as f64 / r.clients as f64))
            )
        })
        .collect();
    let body: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "    {{\"clients\": {}, \"size_mib\": {}, \"secs\": {:.6}, \"aggregate_mb_per_s\": {:.3}, \"server_cpu_secs_per_gb\": {}, \"server_heap_bytes_per_transfer\": {:.0}}}",
                r.clients,
                r.size_mib,
                r.secs,
                r.aggregate_mb_per_s(),
                r.cpu_per_gb().map_or("null".into(), |c| format!("{c:.4}")),
                r.heap_per_transfer
            )
        })
        .collect();
    let json = format!(
        "{{\n  \"smoke\": {smoke},\n  \"rows\": [\n{}\n  ],\n  \"process_rows\": [\n{}\n  ]\n}}\n",
        body.join(",\n"),
        process_body.join(",\n")
    );
    common::write_report("scaling-bench.json", &json);
    if rows.len() < cases.len() || process_rows.len() < process_cases.len() {
        std::process::exit(1);
    }
}
