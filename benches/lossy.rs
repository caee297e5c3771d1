//! udpferry through an emulated link with loss, delay and a bottleneck, over real sockets: the
//! figure issue 15 starts from ("a 2% lossy link cut us to 5% of its rate").
//!
//! `cargo bench --bench lossy` runs a `net::Server` and `net::Client::fetch` (the library the
//! CLI is made of) through a `udpferry_sim::Relay`: a 4 MiB/s bottleneck with a 100 ms
//! drop-tail queue on the way down, 20 ms each way (40 ms RTT), random loss each way, a 16 MiB
//! object, at 0%, 1% and 2% loss. Each run is cut off at 60 s; the goodput is what was
//! delivered (verified, or held when cut off) per second, as a fraction of the link rate.
//! `UDPFERRY_LOSSY_CASES=0,0.05` picks other loss rates; `-- --smoke` or
//! `UDPFERRY_BENCH_SMOKE=1` runs 1 MiB at 0% only. Prints a table and writes
//! `$CARGO_TARGET_DIR/lossy-bench.json`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use udpferry::net::{Client, FetchOptions, Server, ServerConfig};
use udpferry::store::ContentStore;
use udpferry::ObjectId;
use udpferry_sim::{LinkConfig, Relay, Rng};

mod common;

const MIB: usize = 1 << 20;
const RATE: u64 = 4 << 20;
const ONE_WAY: Duration = Duration::from_millis(20);

struct Row {
    loss: f64,
    secs: f64,
    delivered: u64,
    completed: bool,
    queue_dropped: u64,
    lost: u64,
}

impl Row {
    fn fraction_of_link(&self) -> f64 {
        self.delivered as f64 / self.secs / RATE as f64
    }
}

fn run(loss: f64, size: usize, cap: Duration, seed: u64) -> Result<Row, String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let dir = common::TempDir::new("lossy").map_err(|e| err(&e))?;
    let served = dir.join("served");
    std::fs::create_dir_all(&served).map_err(|e| err(&e))?;
    let mut bytes = vec![0u8; size];
    Rng::new(seed).fill_bytes(&mut bytes);
    let id = ObjectId::md5_of(&bytes);
    common::put_served(&served.join("map.bin"), &bytes).map_err(|e| err(&e))?;
    let store = ContentStore::open(&served).map_err(|e| err(&e))?;
    let server = Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        store,
        ServerConfig::default(),
    )
    .and_then(Server::spawn)
    .map_err(|e| err(&e))?;
    let down = LinkConfig::clean(ONE_WAY)
        .with_bottleneck(RATE, (RATE / 10) as usize)
        .with_loss(loss);
    let up = LinkConfig::clean(ONE_WAY).with_loss(loss);
    let relay = Relay::start(server.local_addr(), up, down, seed).map_err(|e| err(&e))?;
    let client = Client::new(dir.join("cache")).map_err(|e| err(&e))?;
    let stop = Arc::new(AtomicBool::new(false));
    let options = FetchOptions {
        stop: Some(stop.clone()),
        ..FetchOptions::default()
    };
    let start = Instant::now();
    let mut delivered = 0u64;
    let outcome = client.fetch(relay.addr(), id, &options, |p| {
        delivered = p.bytes_done;
        if start.elapsed() >= cap {
            stop.store(true, Ordering::Relaxed);
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let (_, down_stats) = relay.stats();
    let completed = outcome.is_ok();
    Ok(Row {
        loss,
        secs,
        delivered: if completed { size as u64 } else { delivered },
        completed,
        queue_dropped: down_stats.queue_dropped,
        lost: down_stats.lost,
    })
}

fn main() {
    let smoke = common::smoke();
    let custom: Option<Vec<f64>> = std::env::var("UDPFERRY_LOSSY_CASES").ok().map(|v| {
        v.split(',')
            .filter_map(|c| c.trim().parse().ok())
            .filter(|l: &f64| (0.0..1.0).contains(l))
            .collect()
    });
    let losses = match custom {
        Some(c) if !c.is_empty() => c,
        _ if smoke => vec![0.0],
        _ => vec![0.0, 0.01, 0.02],
    };
    let (size, cap) = if smoke {
        (MIB, Duration::from_secs(20))
    } else {
        (16 * MIB, Duration::from_secs(60))
    };
    let mut rows = Vec::new();
    for (i, &loss) in losses.iter().enumerate() {
        eprintln!("{:.1}% loss each way, {} MiB...", loss * 100.0, size / MIB);
        match run(loss, size, cap, 0x1055 + i as u64) {
            Ok(row) => rows.push(row),
            Err(e) => eprintln!("  failed: {e}"),
        }
    }
    println!();
    println!(
        "udpferry (net::Server + Client::fetch, defaults) through udpferry_sim::Relay: {} MiB/s \
         bottleneck, 100 ms queue, {} ms RTT, {} MiB, cut off at {} s",
        RATE >> 20,
        2 * ONE_WAY.as_millis(),
        size / MIB,
        cap.as_secs()
    );
    println!(
        "{:>10} {:>10} {:>14} {:>18} {:>14} {:>14}",
        "loss", "seconds", "delivered MiB", "fraction of link", "queue drops", "random drops"
    );
    for r in &rows {
        println!(
            "{:>9.1}% {:>10.2} {:>14.2} {:>18.2} {:>14} {:>14}{}",
            r.loss * 100.0,
            r.secs,
            r.delivered as f64 / MIB as f64,
            r.fraction_of_link(),
            r.queue_dropped,
            r.lost,
            if r.completed { "" } else { "  (cut off)" }
        );
    }
    let body: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "    {{\"loss\": {}, \"secs\": {:.3}, \"delivered_bytes\": {}, \"completed\": {}, \"fraction_of_link\": {:.4}, \"queue_dropped\": {}, \"lost\": {}}}",
                r.loss, r.secs, r.delivered, r.completed, r.fraction_of_link(), r.queue_dropped, r.lost
            )
        })
        .collect();
    let json = format!(
        "{{\n  \"smoke\": {smoke},\n  \"rate_bytes_per_sec\": {RATE},\n  \"rtt_ms\": {},\n  \"size_bytes\": {size},\n  \"rows\": [\n{}\n  ]\n}}\n",
        2 * ONE_WAY.as_millis(),
        body.join(",\n")
    );
    common::write_report("lossy-bench.json", &json);
    if rows.len() < losses.len() {
        std::process::exit(1);
    }
}
