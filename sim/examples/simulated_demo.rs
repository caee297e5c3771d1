//! The map download of `udpferry demo`, through the deterministic network simulator instead of
//! loopback sockets: a seeded link with latency and random loss, in virtual time.
//!
//! ```text
//! cargo run --release -p udpferry-sim --example simulated_demo [-- SIZE_MIB LOSS_PERCENT LATENCY_MS SEED]
//! ```
//!
//! Defaults: 32 MiB, 2% loss each way, 15 ms each way, seed 1.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use udpferry::core::{Event, RangeSet, Receiver, TransferConfig};
use udpferry::wire::ConnectionId;
use udpferry::ObjectId;
use udpferry_sim::{LinkConfig, OneShotServer, Pair, Rng, RunOutcome};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: f64| -> Option<f64> {
        args.get(i).map_or(Some(default), |a| a.parse().ok())
    };
    let (Some(size), Some(loss), Some(latency), Some(seed)) =
        (arg(0, 32.0), arg(1, 2.0), arg(2, 15.0), arg(3, 1.0))
    else {
        eprintln!("usage: simulated_demo [SIZE_MIB LOSS_PERCENT LATENCY_MS SEED]");
        return ExitCode::from(2);
    };
    if !(1.0..=2048.0).contains(&size)
        || !(0.0..=100.0).contains(&loss)
        || !(0.0..=60_000.0).contains(&latency)
        || seed < 0.0
    {
        eprintln!("out of range: SIZE_MIB 1 to 2048, LOSS_PERCENT 0 to 100, LATENCY_MS 0 to 60000, SEED >= 0");
        return ExitCode::from(2);
    }
    simulated_demo(size as u64, loss / 100.0, latency as u64, seed as u64)
}

fn simulated_demo(size_mib: u64, loss: f64, latency_ms: u64, seed: u64) -> ExitCode {
    let size = (size_mib << 20) as usize;
    let mut rng = Rng::new(seed);
    let mut map = vec![0u8; size];
    rng.fill_bytes(&mut map);
    let id = ObjectId::md5_of(&map);
    println!("map: {size} bytes, md5 {id}");
    println!(
        "network: {latency_ms} ms each way, {:.1}% loss each way (simulated, virtual time)",
        loss * 100.0
    );

    let config = TransferConfig::default();
    let start = Instant::now();
    let server = OneShotServer::new(id, size as u64, map, config.clone(), rng.next_u64());
    let client = Receiver::new(
        start,
        ConnectionId(rng.next_u64()),
        id,
        &RangeSet::new(),
        Vec::with_capacity(size),
        config,
    );
    let link = LinkConfig::clean(Duration::from_millis(latency_ms)).with_loss(loss);
    let mut pair = Pair::new(seed, start, server, client, link.clone(), link);
    let wall = Instant::now();
    let outcome = pair.run(u64::MAX, start + Duration::from_secs(24 * 3600));
    let wall = wall.elapsed();

    let mut result = None;
    while let Some(event) = pair.b.poll_event() {
        match event {
            Event::Completed(c) => result = Some(Ok(c)),
            Event::Failed(e) => result = Some(Err(e)),
            _ => {}
        }
    }
    match (outcome, result) {
        (RunOutcome::BothFinished, Some(Ok(done))) => {
            let sender = pair.a.sender().map(|s| s.stats()).unwrap_or_default();
            let secs = done.duration.as_secs_f64();
            println!("verified: md5 {} matches", done.object);
            println!("size:            {} bytes", done.size);
            println!("duration:        {secs:.2} s (virtual)");
            println!(
                "goodput:         {:.2} MB/s",
                done.size as f64 / secs.max(1e-9) / 1e6
            );
            println!(
                "sent on wire:    {} bytes ({:.4}x the map)",
                sender.bytes_sent,
                sender.bytes_sent as f64 / done.size.max(1) as f64
            );
            println!(
                "retransmissions: {} datagrams, {} bytes",
                sender.chunks_retransmitted, sender.bytes_retransmitted
            );
            println!("smoothed rtt:    {:?}", sender.smoothed_rtt);
            println!("simulated in:    {:.2} s of wall time", wall.as_secs_f64());
            ExitCode::SUCCESS
        }
        (_, Some(Err(e))) => {
            eprintln!("udpferry demo: transfer failed: {e}");
            ExitCode::FAILURE
        }
        (outcome, _) => {
            eprintln!("udpferry demo: simulation ended without a result ({outcome:?})");
            ExitCode::FAILURE
        }
    }
}
