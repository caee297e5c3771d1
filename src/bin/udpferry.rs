//! The `udpferry` command-line tool.
//!
//! `udpferry demo` runs the README's main job: a generated 32 MiB map sent from an in-process
//! sender to an in-process receiver through the deterministic network simulator (2% loss), and a
//! summary of what it cost. Real sockets (`serve`, `get`) arrive with the endpoint and driver.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use udpferry::core::{Event, RangeSet, Receiver, TransferConfig};
use udpferry::sim::{LinkConfig, OneShotServer, Pair, Rng, RunOutcome};
use udpferry::wire::ConnectionId;
use udpferry::ObjectId;

#[derive(Parser)]
#[command(
    name = "udpferry",
    version,
    about = "Reliable, paced, verified file transfer over UDP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send a generated map through a simulated lossy network and print what it cost.
    Demo {
        /// Map size in MiB.
        #[arg(long, default_value_t = 32)]
        size_mib: u64,
        /// Random loss on each direction, in percent.
        #[arg(long, default_value_t = 2.0)]
        loss_percent: f64,
        /// One-way latency in milliseconds.
        #[arg(long, default_value_t = 15)]
        latency_ms: u64,
        /// Seed for the map's bytes and the simulated network.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Demo {
            size_mib,
            loss_percent,
            latency_ms,
            seed,
        } => demo(size_mib, loss_percent / 100.0, latency_ms, seed),
    }
}

fn demo(size_mib: u64, loss: f64, latency_ms: u64, seed: u64) -> ExitCode {
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
