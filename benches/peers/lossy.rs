//! udpferry and quinn through an emulated link with loss, delay and a bottleneck, over real
//! sockets (issue 15): what a player on Wi-Fi or a mobile link gets.
//!
//! `cargo bench -p udpferry-peers --bench lossy` sends a 16 MiB object through a
//! `udpferry_sim::Relay`: a 4 MiB/s bottleneck with a 100 ms drop-tail queue on the way down,
//! random (or Gilbert-Elliott burst) loss each way, at 40 ms RTT with 0, 1, 2, 5 and 10% loss,
//! at 200 ms RTT with 1%, and at 40 ms with 2% in bursts of 5 on average. Contenders, each
//! through a fresh relay with the same seed:
//!
//! - udpferry: a `net::Server` and `net::Client::fetch` (the library the CLI is made of), with
//!   their defaults (Background congestion control), and once with Standard;
//! - the binaries, when `UDPFERRY_BIN` names one (scripts/benchmarks.sh and .ci/run set it):
//!   `udpferry serve` and a `udpferry get -o` process, timed from its start to its exit;
//! - quinn 0.11 with Cubic (its default) and with BBR on the server, one stream, MD5 while
//!   reading.
//!
//! Each run is cut off at 40 s; the goodput is what was delivered (verified, or held when cut
//! off) per second, as a fraction of the link rate. `UDPFERRY_LOSSY_CASES=40:0.05,200:0.01`
//! picks other cases (RTT in ms : random loss), `UDPFERRY_LOSSY_ONLY=udpferry` only the
//! contenders whose name starts with that; `-- --smoke` or `UDPFERRY_BENCH_SMOKE=1` runs
//! 1 MiB at 40 ms and 0% only. Prints a table and writes `$CARGO_TARGET_DIR/lossy-bench.json`;
//! with `UDPFERRY_LOSSY_PLOT=docs/lossy.png` also a figure of goodput against random loss at
//! 40 ms (text in DejaVu Sans from `/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use udpferry::core::CongestionControl;
use udpferry::md5::Md5;
use udpferry::net::{Client, FetchOptions, Server, ServerConfig};
use udpferry::store::ContentStore;
use udpferry::ObjectId;
use udpferry_sim::{GilbertElliott, LinkConfig, Relay, Rng};

#[path = "../common/mod.rs"]
mod common;
#[path = "quic.rs"]
mod quic;

const MIB: usize = 1 << 20;
const RATE: u64 = 4 << 20;

#[derive(Clone, Copy, Debug)]
struct Case {
    rtt_ms: u64,
    loss: f64,
    /// Gilbert-Elliott bursts of this mean length instead of independent losses.
    burst: Option<f64>,
}

impl Case {
    fn label(&self) -> String {
        match self.burst {
            None => format!("{} ms, {}%", self.rtt_ms, self.loss * 100.0),
            Some(b) => format!(
                "{} ms, {}% in bursts of {b}",
                self.rtt_ms,
                self.loss * 100.0
            ),
        }
    }

    fn links(&self) -> (LinkConfig, LinkConfig) {
        let one_way = Duration::from_millis(self.rtt_ms) / 2;
        let lossy = |link: LinkConfig| match self.burst {
            None => link.with_loss(self.loss),
            Some(mean) => {
                let p_bad_to_good = 1.0 / mean;
                link.with_burst_loss(GilbertElliott {
                    p_good_to_bad: self.loss * p_bad_to_good / (1.0 - self.loss),
                    p_bad_to_good,
                    loss_in_good: 0.0,
                    loss_in_bad: 1.0,
                })
            }
        };
        let down = lossy(LinkConfig::clean(one_way).with_bottleneck(RATE, (RATE / 10) as usize));
        let up = lossy(LinkConfig::clean(one_way));
        (up, down)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Contender {
    Udpferry(CongestionControl),
    /// The binaries: `udpferry serve` and one `udpferry get -o` process (defaults: Background).
    Cli,
    Quinn(quic::Controller),
}

impl Contender {
    fn name(&self) -> &'static str {
        match self {
            Contender::Udpferry(CongestionControl::Standard) => "udpferry Standard",
            Contender::Udpferry(_) => "udpferry",
            Contender::Cli => "udpferry serve + get",
            Contender::Quinn(quic::Controller::Cubic) => "quinn Cubic",
            Contender::Quinn(quic::Controller::Bbr) => "quinn BBR",
        }
    }
}

struct Row {
    case: Case,
    contender: Contender,
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

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A scratch directory with `bytes` served from its `served/` directory, and their id.
fn serving(name: &str, bytes: &[u8]) -> Result<(common::TempDir, PathBuf, ObjectId), String> {
    let dir = common::TempDir::new(name).map_err(err)?;
    let served = dir.join("served");
    std::fs::create_dir_all(&served).map_err(err)?;
    common::put_served(&served.join("map.bin"), bytes).map_err(err)?;
    Ok((dir, served, ObjectId::md5_of(bytes)))
}

fn udpferry(
    kind: CongestionControl,
    case: Case,
    bytes: &[u8],
    cap: Duration,
    seed: u64,
) -> Result<(f64, u64, bool, Relay), String> {
    let (dir, served, id) = serving("lossy", bytes)?;
    let store = ContentStore::open(&served).map_err(err)?;
    let mut config = ServerConfig::default();
    config.endpoint.transfer.congestion = kind;
    let server = Server::bind("127.0.0.1:0".parse().unwrap(), store, config)
        .and_then(Server::spawn)
        .map_err(err)?;
    let (up, down) = case.links();
    let relay = Relay::start(server.local_addr(), up, down, seed).map_err(err)?;
    let client = Client::new(dir.join("cache")).map_err(err)?;
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
    let completed = outcome.is_ok();
    let delivered = if completed {
        bytes.len() as u64
    } else {
        delivered
    };
    Ok((secs, delivered, completed, relay))
}

/// `udpferry serve` and `udpferry get -o` (the binary `UDPFERRY_BIN` names) through the relay,
/// timed from the `get` process's start to its exit: what a user runs, file writes and MD5
/// included. Killed at `cap` (then nothing counts as delivered).
fn cli(
    case: Case,
    bytes: &[u8],
    cap: Duration,
    seed: u64,
) -> Result<(f64, u64, bool, Relay), String> {
    let bin = common::processes::udpferry_bin()?;
    let (dir, served, id) = serving("lossy-cli", bytes)?;
    let (_server, addr) = common::processes::udpferry_serve(&bin, &served)?;
    let (up, down) = case.links();
    let relay = Relay::start(addr.parse().map_err(err)?, up, down, seed).map_err(err)?;
    let secs = common::processes::udpferry_get_within(
        &bin,
        &relay.addr().to_string(),
        &id.to_hex(),
        &dir.0,
        bytes.len(),
        Some(cap),
    )?;
    Ok(match secs {
        Some(secs) => (secs, bytes.len() as u64, true, relay),
        None => (cap.as_secs_f64(), 0, false, relay),
    })
}

fn run(
    quic: &mut Vec<(quic::Controller, quic::Quic)>,
    contender: Contender,
    case: Case,
    bytes: &Arc<[u8]>,
    cap: Duration,
    seed: u64,
) -> Result<Row, String> {
    let (secs, delivered, completed, relay) = match contender {
        Contender::Udpferry(kind) => udpferry(kind, case, bytes, cap, seed)?,
        Contender::Cli => cli(case, bytes, cap, seed)?,
        Contender::Quinn(controller) => {
            let q = match quic.iter().position(|(c, _)| *c == controller) {
                Some(i) => &quic[i].1,
                None => {
                    quic.push((controller, quic::Quic::new(Some(controller))?));
                    &quic[quic.len() - 1].1
                }
            };
            let expected: [u8; 16] = Md5::digest(&bytes[..]);
            let mut relay = None;
            let r = q.once(bytes.clone(), expected, cap, |server| {
                let (up, down) = case.links();
                let started = Relay::start(server, up, down, seed).map_err(err)?;
                let addr = started.addr();
                relay = Some(started);
                Ok(addr)
            })?;
            let relay = relay.ok_or("no relay")?;
            (r.complete, r.received, r.verified, relay)
        }
    };
    let (_, down) = relay.stats();
    Ok(Row {
        case,
        contender,
        secs,
        delivered,
        completed,
        queue_dropped: down.queue_dropped,
        lost: down.lost,
    })
}

fn cases(smoke: bool) -> Vec<Case> {
    let random = |rtt_ms, loss| Case {
        rtt_ms,
        loss,
        burst: None,
    };
    if let Ok(v) = std::env::var("UDPFERRY_LOSSY_CASES") {
        let custom: Vec<Case> = v
            .split(',')
            .filter_map(|c| {
                let (rtt, loss) = c.trim().split_once(':')?;
                let loss: f64 = loss.parse().ok()?;
                Some(random(rtt.parse().ok()?, loss)).filter(|_| (0.0..1.0).contains(&loss))
            })
            .collect();
        if !custom.is_empty() {
            return custom;
        }
    }
    if smoke {
        return vec![random(40, 0.0)];
    }
    let mut all: Vec<Case> = [0.0, 0.01, 0.02, 0.05, 0.10]
        .into_iter()
        .map(|l| random(40, l))
        .collect();
    all.push(random(200, 0.01));
    all.push(Case {
        rtt_ms: 40,
        loss: 0.02,
        burst: Some(5.0),
    });
    all
}

fn main() {
    let smoke = common::smoke();
    let cases = cases(smoke);
    let mut contenders: Vec<Contender> = if smoke {
        vec![
            Contender::Udpferry(CongestionControl::default()),
            Contender::Quinn(quic::Controller::Bbr),
        ]
    } else {
        vec![
            Contender::Udpferry(CongestionControl::default()),
            Contender::Udpferry(CongestionControl::Standard),
            Contender::Quinn(quic::Controller::Cubic),
            Contender::Quinn(quic::Controller::Bbr),
        ]
    };
    // The binaries, when there is one to run.
    match common::processes::udpferry_bin() {
        Ok(_) => contenders.insert(1, Contender::Cli),
        Err(e) => eprintln!("udpferry serve + get: {e}"),
    }
    // `UDPFERRY_LOSSY_ONLY=udpferry` keeps the contenders whose name starts with it.
    let only = std::env::var("UDPFERRY_LOSSY_ONLY").unwrap_or_default();
    let contenders: Vec<Contender> = contenders
        .into_iter()
        .filter(|c| c.name().starts_with(only.as_str()))
        .collect();
    let (size, cap) = if smoke {
        (MIB, Duration::from_secs(20))
    } else {
        (16 * MIB, Duration::from_secs(40))
    };
    let mut bytes = vec![0u8; size];
    Rng::new(0x1055).fill_bytes(&mut bytes);
    let bytes: Arc<[u8]> = bytes.into();
    let mut quic = Vec::new();
    let mut rows = Vec::new();
    let mut failed = 0;
    for (i, case) in cases.iter().enumerate() {
        for &contender in &contenders {
            eprintln!("{}: {}...", case.label(), contender.name());
            match run(&mut quic, contender, *case, &bytes, cap, 0x1055 + i as u64) {
                Ok(row) => rows.push(row),
                Err(e) => {
                    eprintln!("  failed: {e}");
                    failed += 1;
                }
            }
        }
    }
    println!();
    println!(
        "through udpferry_sim::Relay: {} MiB/s bottleneck, 100 ms queue, {} MiB, cut off at {} s; \
         goodput as a fraction of the link",
        RATE >> 20,
        size / MIB,
        cap.as_secs()
    );
    print!("{:<28}", "RTT, loss each way");
    for c in &contenders {
        print!(" {:>18}", c.name());
    }
    println!();
    for case in &cases {
        print!("{:<28}", case.label());
        for c in &contenders {
            match rows
                .iter()
                .find(|r| r.contender == *c && r.case.label() == case.label())
            {
                Some(r) => print!(
                    " {:>18}",
                    format!(
                        "{:.2}{}",
                        r.fraction_of_link(),
                        if r.completed { "" } else { " (cut)" }
                    )
                ),
                None => print!(" {:>18}", "failed"),
            }
        }
        println!();
    }
    let body: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "    {{\"case\": \"{}\", \"rtt_ms\": {}, \"loss\": {}, \"burst\": {}, \"contender\": \"{}\", \"secs\": {:.3}, \"delivered_bytes\": {}, \"completed\": {}, \"fraction_of_link\": {:.4}, \"queue_dropped\": {}, \"lost\": {}}}",
                r.case.label(),
                r.case.rtt_ms,
                r.case.loss,
                r.case.burst.map_or("null".to_string(), |b| b.to_string()),
                r.contender.name(),
                r.secs,
                r.delivered,
                r.completed,
                r.fraction_of_link(),
                r.queue_dropped,
                r.lost
            )
        })
        .collect();
    let json = format!(
        "{{\n  \"smoke\": {smoke},\n  \"rate_bytes_per_sec\": {RATE},\n  \"size_bytes\": {size},\n  \"cutoff_secs\": {},\n  \"rows\": [\n{}\n  ]\n}}\n",
        cap.as_secs(),
        body.join(",\n")
    );
    common::write_report("lossy-bench.json", &json);
    if let Ok(path) = std::env::var("UDPFERRY_LOSSY_PLOT") {
        match plot(&path, &rows, &contenders, size) {
            Ok(()) => eprintln!("wrote {path}"),
            Err(e) => {
                eprintln!("plot {path}: {e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        std::process::exit(1);
    }
}

const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Goodput against random loss at 40 ms RTT, one line per contender.
fn plot(
    path: &str,
    rows: &[Row],
    contenders: &[Contender],
    size: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    use plotters::style::{register_font, FontStyle};

    let font = std::fs::read(FONT_PATH).map_err(|e| format!("{FONT_PATH}: {e}"))?;
    register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| format!("{FONT_PATH} is not a usable TrueType font"))?;
    let root = BitMapBackend::new(path, (1100, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "Goodput through a lossy link: {} MiB/s bottleneck, 100 ms queue, 40 ms RTT, {} MiB",
            RATE >> 20,
            size / MIB
        ),
        ("sans-serif", 24),
    )?;
    let mut chart = ChartBuilder::on(&root)
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..10.5, 0.0..1.05)?;
    chart
        .configure_mesh()
        .light_line_style(RGBColor(235, 235, 235))
        .x_desc("Random loss each way (%)")
        .y_desc("Goodput / link rate")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 18))
        .draw()?;
    for c in contenders {
        let colour = match c {
            Contender::Udpferry(CongestionControl::Standard) => RGBColor(86, 180, 233),
            Contender::Udpferry(_) => RGBColor(0, 114, 178),
            Contender::Cli => RGBColor(204, 121, 167),
            Contender::Quinn(quic::Controller::Cubic) => RGBColor(213, 94, 0),
            Contender::Quinn(quic::Controller::Bbr) => RGBColor(0, 158, 115),
        };
        let mut points: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.contender == *c && r.case.rtt_ms == 40 && r.case.burst.is_none())
            .map(|r| (r.case.loss * 100.0, r.fraction_of_link()))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(3)))?
            .label(c.name())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 5, colour.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .margin(12)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(180, 180, 180))
        .draw()?;
    root.present()?;
    Ok(())
}
