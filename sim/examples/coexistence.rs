//! A map download beside a 60 Hz game flow, once with each congestion controller, drawn as a
//! figure.
//!
//! The scenario is the one `tests/rates.rs` checks: a 1 MB/s bottleneck with a 200 ms queue in
//! both directions (20 ms latency), a 100-byte game packet every 16.7 ms each way, and one 8 MiB
//! map downloaded from the server to the client. It runs in the simulator's virtual time, so it
//! takes a second or two and gives the same figure on every machine.
//!
//! The figure has two panels sharing the time axis: the server's udpferry send rate in 100 ms
//! bins, and the one-way delay of every server-to-client game packet. With
//! [`CongestionControl::Background`] the download keeps the queue near its 25 ms target; with
//! [`CongestionControl::Standard`] it fills the path, keeping a shorter queue of its own.
//!
//! ```text
//! cargo run --release -p udpferry-sim --example coexistence [-- OUTPUT.png]
//! ```
//!
//! The output defaults to `docs/coexistence.png`. Text is drawn with DejaVu Sans, loaded from
//! `/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf` (Debian/Ubuntu: `apt install
//! fonts-dejavu-core`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use udpferry::core::{CongestionControl, Endpoint, EndpointConfig, Event, NoObjects, RangeSet};
use udpferry::{is_udpferry_datagram, ObjectId};
use udpferry_sim::{Direction, EndpointPeer, GameTraffic, LinkConfig, Pair, Rng, RunOutcome};

const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const DEFAULT_OUTPUT: &str = "docs/coexistence.png";

/// Bottleneck rate, bytes per second, both directions.
const CAPACITY: u64 = 1_000_000;
/// Bottleneck queue: 200 ms at `CAPACITY`.
const QUEUE_BYTES: usize = 200_000;
/// One-way path latency without queueing.
const LATENCY: Duration = Duration::from_millis(20);
/// Background mode's queueing-delay target.
const TARGET: Duration = Duration::from_millis(25);
/// The map.
const MAP_BYTES: usize = 8 << 20;
/// One game tick at 60 Hz.
const TICK: Duration = Duration::from_micros(16_667);
/// Bytes per game packet.
const GAME_PACKET: usize = 100;
/// Width of a send-rate bin.
const BIN: Duration = Duration::from_millis(100);

const SERVER: ([u8; 4], u16) = ([10, 0, 0, 1], 7878);
const CLIENT: ([u8; 4], u16) = ([10, 0, 0, 2], 5000);

/// What one run recorded, in seconds since the start.
struct Trace {
    name: &'static str,
    /// When the client had the verified map.
    done: f64,
    /// Server udpferry bytes sent in each `BIN`, from t = 0.
    bins: Vec<u64>,
    /// Every server-to-client game packet: (arrival, one-way delay).
    game: Vec<(f64, Duration)>,
    /// Server game packets sent and lost (tail-dropped at the bottleneck).
    game_sent: u64,
    game_lost: u64,
    /// Datagrams the bottleneck's queue dropped, server to client.
    queue_dropped: u64,
}

fn run(name: &'static str, kind: CongestionControl) -> Trace {
    let mut map = vec![0u8; MAP_BYTES];
    Rng::new(1).fill_bytes(&mut map);
    let id = ObjectId::md5_of(&map);
    let maps: HashMap<ObjectId, Arc<[u8]>> = HashMap::from([(id, Arc::from(map))]);

    let mut config = EndpointConfig::default();
    config.transfer.congestion = kind;
    let mut server = EndpointPeer::new(
        Endpoint::<_, Vec<u8>>::new(config.clone(), maps),
        SocketAddr::from(CLIENT),
    );
    let mut client = EndpointPeer::new(
        Endpoint::<_, Vec<u8>>::new(EndpointConfig { seed: 9, ..config }, NoObjects),
        SocketAddr::from(SERVER),
    );

    let start = Instant::now();
    server.game = Some(GameTraffic::new(TICK, GAME_PACKET, start));
    client.game = Some(GameTraffic::new(TICK, GAME_PACKET, start));
    let link = LinkConfig::clean(LATENCY).with_bottleneck(CAPACITY, QUEUE_BYTES);
    let mut pair = Pair::new(1, start, server, client, link.clone(), link);

    let bins = Rc::new(RefCell::new(Vec::<u64>::new()));
    let log = bins.clone();
    pair.set_observer(Box::new(move |t, dir, d| {
        if dir == Direction::AtoB && is_udpferry_datagram(d) {
            let i = ((t - start).as_nanos() / BIN.as_nanos()) as usize;
            let mut bins = log.borrow_mut();
            if bins.len() <= i {
                bins.resize(i + 1, 0);
            }
            bins[i] += d.len() as u64;
        }
    }));

    let transfer = pair.b.endpoint.fetch(
        start,
        SocketAddr::from(SERVER),
        id,
        &RangeSet::new(),
        Vec::new(),
    );
    let outcome = pair.run(u64::MAX, start + Duration::from_secs(3600));
    assert_eq!(outcome, RunOutcome::BothFinished, "{name}");

    let done = pair
        .b
        .events
        .iter()
        .find(|(_, e)| e.transfer == transfer && matches!(e.event, Event::Completed(_)))
        .map(|(t, _)| *t)
        .unwrap_or_else(|| panic!("{name}: the download did not complete"));
    let game_sent = pair.a.game.as_ref().unwrap().sent;
    let game = &pair.b.game.as_ref().unwrap().received;
    let bins = bins.borrow().clone();
    Trace {
        name,
        done: (done - start).as_secs_f64(),
        bins,
        game: game
            .iter()
            .map(|(t, d)| ((*t - start).as_secs_f64(), *d))
            .collect(),
        game_sent,
        game_lost: game_sent - game.len() as u64,
        queue_dropped: pair.a_to_b.stats().queue_dropped,
    }
}

/// The `q`-quantile of sorted `xs`.
fn quantile(xs: &[Duration], q: f64) -> Duration {
    xs[((xs.len() - 1) as f64 * q).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn summary(t: &Trace) {
    let mut during: Vec<Duration> = t
        .game
        .iter()
        .filter(|(at, _)| *at < t.done)
        .map(|(_, d)| *d)
        .collect();
    during.sort_unstable();
    println!(
        "{:<10}  download {:5.2} s, goodput {:.3} MB/s | game delay while downloading: p50 {:5.1} ms, p95 {:5.1} ms, max {:5.1} ms | game packets lost {}/{} | bottleneck drops {}",
        t.name,
        t.done,
        MAP_BYTES as f64 / t.done / 1e6,
        ms(quantile(&during, 0.5)),
        ms(quantile(&during, 0.95)),
        ms(*during.last().unwrap()),
        t.game_lost,
        t.game_sent,
        t.queue_dropped,
    );
}

/// A short dashed line for a legend entry at (x, y).
fn dash_sample(
    x: i32,
    y: i32,
    style: ShapeStyle,
) -> DashedPathElement<std::array::IntoIter<(i32, i32), 2>, i32> {
    DashedPathElement::new([(x, y), (x + 24, y)], 6, 4, style)
}

fn draw(path: &str, traces: &[(Trace, RGBColor)]) -> Result<(), Box<dyn std::error::Error>> {
    let x_end = traces.iter().map(|(t, _)| t.done).fold(0.0, f64::max) * 1.04;
    let rate_max = traces
        .iter()
        .flat_map(|(t, _)| &t.bins)
        .map(|b| *b as f64 / BIN.as_secs_f64() / 1e6)
        .fold(CAPACITY as f64 / 1e6, f64::max)
        * 1.1;
    let delay_max = traces
        .iter()
        .flat_map(|(t, _)| t.game.iter().filter(|(at, _)| *at <= x_end))
        .map(|(_, d)| ms(*d))
        .fold(ms(LATENCY + TARGET), f64::max)
        * 1.08;

    let root = BitMapBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        "Map download beside a 60 Hz game flow, 1 MB/s bottleneck, 200 ms queue",
        ("sans-serif", 26),
    )?;
    let (top, bottom) = root.split_vertically(370);
    let label = ("sans-serif", 18);
    let grey = RGBColor(110, 110, 110);

    // Top: the download's send rate.
    let mut chart = ChartBuilder::on(&top)
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_end, 0.0..rate_max)?;
    chart
        .configure_mesh()
        .light_line_style(RGBColor(235, 235, 235))
        .y_desc("Server send rate (MB/s, 100 ms bins)")
        .label_style(("sans-serif", 15))
        .axis_desc_style(label)
        .draw()?;
    for (t, colour) in traces {
        let bin = BIN.as_secs_f64();
        // A step line: each bin's rate held across its width.
        let steps = t.bins.iter().enumerate().flat_map(|(i, b)| {
            let rate = *b as f64 / bin / 1e6;
            [(i as f64 * bin, rate), ((i + 1) as f64 * bin, rate)]
        });
        chart
            .draw_series(LineSeries::new(steps, colour.stroke_width(2)))?
            .label(format!("{} (map done at {:.1} s)", t.name, t.done))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3))
            });
    }
    chart
        .draw_series(DashedLineSeries::new(
            [(0.0, CAPACITY as f64 / 1e6), (x_end, CAPACITY as f64 / 1e6)],
            8,
            6,
            grey.stroke_width(1),
        ))?
        .label("bottleneck capacity")
        .legend(move |(x, y)| dash_sample(x, y, grey.stroke_width(1)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerMiddle)
        .margin(12)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(180, 180, 180))
        .draw()?;

    // Bottom: the game packets' one-way delay.
    let mut chart = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_end, 0.0..delay_max)?;
    chart
        .configure_mesh()
        .light_line_style(RGBColor(235, 235, 235))
        .x_desc("Time since the download started (s, virtual)")
        .y_desc("Game packet one-way delay (ms)")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 15))
        .axis_desc_style(label)
        .draw()?;
    for (t, colour) in traces {
        chart
            .draw_series(LineSeries::new(
                t.game
                    .iter()
                    .filter(|(at, _)| *at <= x_end)
                    .map(|(at, d)| (*at, ms(*d))),
                colour.stroke_width(2),
            ))?
            .label(format!("{}, server to client", t.name))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3))
            });
    }
    for (level, text, style) in [
        (
            ms(LATENCY),
            format!("path latency ({:.0} ms)", ms(LATENCY)),
            BLACK.stroke_width(1),
        ),
        (
            ms(LATENCY + TARGET),
            format!(
                "latency + Background target ({:.0} ms)",
                ms(LATENCY + TARGET)
            ),
            grey.stroke_width(1),
        ),
    ] {
        chart
            .draw_series(DashedLineSeries::new(
                [(0.0, level), (x_end, level)],
                8,
                6,
                style,
            ))?
            .label(text)
            .legend(move |(x, y)| dash_sample(x, y, style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperMiddle)
        .margin(12)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(180, 180, 180))
        .draw()?;

    root.present()?;
    Ok(())
}

fn main() -> ExitCode {
    let output = std::env::args()
        .nth(1)
        .unwrap_or_else(|| DEFAULT_OUTPUT.to_string());
    let font = match std::fs::read(FONT_PATH) {
        Ok(bytes) => Box::leak(bytes.into_boxed_slice()),
        Err(e) => {
            eprintln!(
                "error: cannot read the font {FONT_PATH}: {e}\n\
                 The figure's text needs DejaVu Sans (Debian/Ubuntu: apt install fonts-dejavu-core)."
            );
            return ExitCode::FAILURE;
        }
    };
    if register_font("sans-serif", FontStyle::Normal, font).is_err() {
        eprintln!("error: {FONT_PATH} is not a usable TrueType font");
        return ExitCode::FAILURE;
    }

    let traces = [
        (
            run(
                "Background",
                CongestionControl::Background { target: TARGET },
            ),
            RGBColor(0, 114, 178),
        ),
        (
            run("Standard", CongestionControl::Standard),
            RGBColor(213, 94, 0),
        ),
    ];
    for (t, _) in &traces {
        summary(t);
    }
    if let Err(e) = draw(&output, &traces) {
        eprintln!("error: drawing {output}: {e}");
        return ExitCode::FAILURE;
    }
    println!("wrote {output}");
    ExitCode::SUCCESS
}
