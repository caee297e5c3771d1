//! Goodput on lossy links, in the simulator (issue 15): a 4 MiB/s bottleneck with a 100 ms
//! drop-tail queue toward the client, random or bursty loss both ways, a 16 MiB object. Radio
//! noise is not congestion: the model-based controller keeps near the link rate where a
//! controller that halves on every loss collapsed (0.05 of the link at 2%).
//!
//! `cargo test --release --test lossy_links -- --nocapture` prints every figure. A failing case
//! names its seed; `UDPFERRY_SEED=... cargo test --test lossy_links NAME` replays it.

mod common;

use std::time::Duration;

use common::{download, object};
use udpferry::core::{CongestionControl, TransferConfig};
use udpferry_sim::{seed_from_env, GilbertElliott, LinkConfig, RunOutcome};

const RATE: u64 = 4 << 20;
const SIZE: usize = 16 << 20;

#[derive(Clone, Copy, Debug)]
enum Loss {
    Random(f64),
    /// Gilbert-Elliott: bursts of `mean_burst` datagrams on average, `average` of all lost.
    Bursts {
        average: f64,
        mean_burst: f64,
    },
}

impl Loss {
    fn apply(self, link: LinkConfig) -> LinkConfig {
        match self {
            Loss::Random(p) => link.with_loss(p),
            Loss::Bursts {
                average,
                mean_burst,
            } => {
                let p_bad_to_good = 1.0 / mean_burst;
                link.with_burst_loss(GilbertElliott {
                    p_good_to_bad: average * p_bad_to_good / (1.0 - average),
                    p_bad_to_good,
                    loss_in_good: 0.0,
                    loss_in_bad: 1.0,
                })
            }
        }
    }
}

struct Goodput {
    fraction: f64,
    overhead: f64,
}

/// Downloads `SIZE` bytes through the lossy bottleneck; the goodput as a fraction of `RATE`.
fn goodput(name: &str, loss: Loss, rtt: Duration, kind: CongestionControl) -> Goodput {
    let seed = seed_from_env(0x1055_0000 ^ name.len() as u64);
    let data = object(SIZE, seed);
    let down = loss.apply(LinkConfig::clean(rtt / 2).with_bottleneck(RATE, (RATE / 10) as usize));
    let up = loss.apply(LinkConfig::clean(rtt / 2));
    let config = TransferConfig {
        congestion: kind,
        ..TransferConfig::default()
    };
    let o = download(seed, &data, down, up, config);
    let ctx = format!(
        "{name}: replay with UDPFERRY_SEED={seed:#x} (run {:?})",
        o.run
    );
    assert_eq!(o.run, RunOutcome::BothFinished, "{ctx}");
    assert!(
        o.completed() && o.data == data,
        "{ctx}: not completed intact"
    );
    // Until the client holds the verified object; the server may finish up to a second later
    // when the client's Done is lost.
    let time = o.download_time().unwrap_or(o.elapsed);
    let fraction = SIZE as f64 / time.as_secs_f64() / RATE as f64;
    let overhead = o.overhead(SIZE);
    println!(
        "{name} ({kind:?}): {:.2} s ({:.2} s until the server's end), {fraction:.3} of the link, {overhead:.3}x bytes sent (seed {seed:#x})",
        time.as_secs_f64(),
        o.elapsed.as_secs_f64()
    );
    Goodput { fraction, overhead }
}

const RTT_40: Duration = Duration::from_millis(40);

fn background() -> CongestionControl {
    CongestionControl::default()
}

#[test]
fn random_loss_at_40_ms_keeps_near_the_link_rate() {
    let mut missed = Vec::new();
    for (p, floor) in [
        (0.0, 0.85),
        (0.01, 0.85),
        (0.02, 0.80),
        (0.05, 0.70),
        (0.10, 0.50),
    ] {
        let name = format!("{}% random loss, 40 ms", p * 100.0);
        let g = goodput(&name, Loss::Random(p), RTT_40, background());
        if g.fraction < floor {
            missed.push(format!("{name}: {:.3} < {floor}", g.fraction));
        }
    }
    assert!(missed.is_empty(), "{missed:?}");
}

#[test]
fn standard_mode_keeps_near_the_link_rate_too() {
    for (p, floor) in [(0.0, 0.85), (0.02, 0.80), (0.10, 0.50)] {
        let name = format!("{}% random loss, 40 ms, Standard", p * 100.0);
        let g = goodput(&name, Loss::Random(p), RTT_40, CongestionControl::Standard);
        assert!(g.fraction >= floor, "{name}: {:.3}", g.fraction);
    }
}

/// The target here is 0.70, and this asserts it. What it took (docs/ARCHITECTURE.md
/// section 5.8): Startup from 32 datagrams with a window that keeps up with its pacing until a
/// queue shows, a copy of the first Request and Start (one lost handshake datagram cost a
/// 600 ms timeout), and Background probing by at most its target's worth of queue (a 1.25
/// probe on a 200 ms path queued 50 ms and was taken for congestion). Before those, the test's
/// seed and seeds 3, 6, 7 and 8 gave 0.628 to 0.695; after, eleven seeds give 0.712 to 0.727
/// (`UDPFERRY_SEED=...` replays one).
#[test]
fn long_round_trip_with_loss() {
    let g = goodput(
        "1% random loss, 200 ms",
        Loss::Random(0.01),
        Duration::from_millis(200),
        background(),
    );
    assert!(g.fraction >= 0.70, "{:.3}", g.fraction);
}

#[test]
fn burst_loss_is_no_worse_than_random_loss() {
    let random = goodput("2% random loss", Loss::Random(0.02), RTT_40, background());
    let bursts = goodput(
        "2% loss in bursts of 5",
        Loss::Bursts {
            average: 0.02,
            mean_burst: 5.0,
        },
        RTT_40,
        background(),
    );
    assert!(
        bursts.fraction >= random.fraction - 0.1,
        "bursts {:.3} vs random {:.3}",
        bursts.fraction,
        random.fraction
    );
}

#[test]
fn bytes_sent_stay_close_to_the_object_at_full_speed() {
    let clean = goodput("clean, efficiency", Loss::Random(0.0), RTT_40, background());
    assert!(clean.overhead <= 1.035, "clean: {:.4}x", clean.overhead);
    let lossy = goodput(
        "5% loss, efficiency",
        Loss::Random(0.05),
        RTT_40,
        background(),
    );
    assert!(lossy.overhead <= 1.10, "5% loss: {:.4}x", lossy.overhead);
}
