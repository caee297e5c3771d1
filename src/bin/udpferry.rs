//! The `udpferry` command-line tool: `serve` a directory of maps, `get` one by its MD5, or run the
//! `demo` (a 32 MiB map over real loopback sockets; `--simulated` for the network simulator).

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use udpferry::Event;
use udpferry::ObjectId;
use udpferry::{BundleFetchError, Client, FetchError, FetchOptions, Got};
use udpferry::{Cache, ContentStore};
use udpferry::{Server, ServerConfig, ServerReport};

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
    /// Serve every file under DIR, addressed by the MD5 of its bytes, until SIGINT or SIGTERM;
    /// files added, changed or removed while serving are followed (SIGHUP: rescan at once).
    Serve(ServeArgs),
    /// Download one object by its MD5 (or SHA-256), verify it, and store it in the cache and/or PATH.
    Get(GetArgs),
    /// Send a generated map from a server to a client in this process, over loopback UDP, and
    /// print what it cost. (The same through the network simulator, with loss and latency:
    /// `cargo run --release -p udpferry-sim --example simulated_demo`.)
    Demo {
        /// Map size in MiB (1 to 2048; the demo holds the map in memory).
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=2048))]
        size_mib: u64,
        /// Seed for the map's bytes.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Directory to serve.
    dir: PathBuf,
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "0.0.0.0:7878")]
    listen: SocketAddr,
    /// Cap on all sending together, bytes per second (e.g. 1MiB, 512K, 2000000, 1M/s).
    #[arg(long, value_parser = parse_rate)]
    rate: Option<u64>,
    /// Cap on each client, bytes per second (same units as --rate).
    #[arg(long, value_parser = parse_rate)]
    client_rate: Option<u64>,
    /// Print one line per object before listening: `object <md5hex> <bytes> <path>`, then
    /// one per bundle (each top-level subdirectory): `bundle <md5hex> <files> <dir>/`.
    #[arg(long)]
    list: bool,
    /// Report transfers on stderr, one status line per second while any is active, and each
    /// change to what is served (`indexed ...`, `removed ...`) as a rescan finds it.
    #[arg(short, long)]
    verbose: bool,
    /// Seconds between two rescans of DIR, which pick up new, changed and removed files
    /// (stat only; new and changed files are hashed in the background). 0: rescan only on
    /// SIGHUP. Fractions allowed; at most a week.
    #[arg(long, value_name = "SECONDS", default_value = "2", value_parser = parse_interval)]
    rescan_interval: Duration,
}

#[derive(clap::Args)]
struct GetArgs {
    /// Server address (host:port), or several separated by commas to fetch from all of them
    /// at once (faster servers deliver more; one that sends wrong bytes is dropped).
    server: String,
    /// The object's id: its MD5 (32 hex digits, optionally prefixed with `md5:`) or
    /// `sha256:` and its SHA-256 (64 hex digits).
    #[arg(value_name = "MD5")]
    id: ObjectId,
    /// Also write the verified object to this path (atomically).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Cache directory (default: the platform cache directory, e.g. $XDG_CACHE_HOME/udpferry).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Give up after this many seconds in total (above 0, at most a week; fractions allowed).
    #[arg(long, value_parser = parse_timeout)]
    timeout: Option<Duration>,
    /// One status line per second on stderr, and the transfer's counters at the end.
    #[arg(short, long)]
    verbose: bool,
    /// A local file that may hold parts of the object, such as an older version of the
    /// map (repeatable). Blocks found in it are copied instead of downloaded; an existing
    /// file at --output is searched too.
    #[arg(long = "base", value_name = "PATH")]
    bases: Vec<PathBuf>,
    /// The id names a bundle (as `serve --list` prints them): install every file it lists
    /// under the directory given with -o, fetching only files not already there. Without
    /// the flag, a fetched object that turns out to be a bundle listing is installed the
    /// same way.
    #[arg(long, requires = "output", conflicts_with = "bases")]
    bundle: bool,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::Get(args) => get(args),
        Command::Demo { size_mib, seed } => demo(size_mib, seed),
    }
}

/// Longest `--timeout` accepted: a week. Anything longer is a typo, and would overflow the
/// deadline arithmetic of a clock long before it mattered.
const MAX_TIMEOUT_SECS: f64 = 7.0 * 24.0 * 3600.0;

/// Parses `--timeout`: seconds, above zero and at most a week, fractions allowed.
fn parse_timeout(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds (examples: 30, 2.5)"))?;
    if !(secs > 0.0 && secs <= MAX_TIMEOUT_SECS) {
        return Err(format!(
            "`{text}` is out of range: give a number of seconds above 0 and at most {MAX_TIMEOUT_SECS} (a week)"
        ));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{text}`: {e}"))
}

/// Parses `--rescan-interval`: seconds, 0 (never) up to a week, fractions allowed.
fn parse_interval(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds (examples: 2, 0.5, 0)"))?;
    if !(0.0..=MAX_TIMEOUT_SECS).contains(&secs) {
        return Err(format!(
            "`{text}` is out of range: give a number of seconds from 0 (rescan only on SIGHUP) to {MAX_TIMEOUT_SECS} (a week)"
        ));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{text}`: {e}"))
}

/// Parses a rate: a plain integer or one with a suffix K, M, G, KiB, MiB, GiB (all binary:
/// K and KiB both mean 1024), optionally followed by `/s`.
fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a rate (examples: 1MiB, 512K, 2000000)"))?;
    let multiplier: u64 = match unit {
        "" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => {
            return Err(format!(
                "unknown unit in `{text}` (use K, M, G, KiB, MiB or GiB)"
            ))
        }
    };
    let rate = value
        .checked_mul(multiplier)
        .ok_or_else(|| format!("`{text}` is too large"))?;
    if rate == 0 {
        return Err("a rate must be above zero".into());
    }
    Ok(rate)
}

/// `serve`: the directory's objects and bundles until SIGINT or SIGTERM.
fn serve(args: ServeArgs) -> ExitCode {
    let store = match ContentStore::open(&args.dir) {
        Ok(s) => s,
        Err(e) => return fail("serve", &e.to_string()),
    };
    for skipped in store.skipped() {
        eprintln!("udpferry serve: skipped {skipped}");
    }
    let mut stdout = std::io::stdout().lock();
    if args.list {
        for o in store.objects() {
            let _ = writeln!(stdout, "{o}");
        }
        for b in store.bundles() {
            let _ = writeln!(stdout, "{b}");
        }
    }
    let mut config = ServerConfig::default();
    config.endpoint.rate_limit_bytes_per_sec = args.rate.unwrap_or(0);
    config.endpoint.transfer.max_rate_bytes_per_sec = args.client_rate.unwrap_or(0);
    config.rescan_interval = Some(args.rescan_interval).filter(|i| !i.is_zero());
    let listen = args.listen;
    let mut server = match Server::bind(listen, store, config) {
        Ok(s) => s,
        Err(e) => return fail("serve", &format!("cannot listen on {listen}: {e}")),
    };
    let stop = match stop_on_signals() {
        Ok(stop) => stop,
        Err(e) => return fail("serve", &e),
    };
    #[cfg(unix)]
    if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGHUP, server.rescan_flag()) {
        return fail("serve", &format!("cannot handle signals: {e}"));
    }
    match server.local_addr() {
        Ok(addr) => {
            let _ = writeln!(stdout, "listening on {addr}");
            let _ = stdout.flush();
        }
        Err(e) => return fail("serve", &e.to_string()),
    }
    drop(stdout);
    let verbose = args.verbose;
    let result = server.run_with_reports(
        &stop,
        |e| {
            if verbose && matches!(e.event, Event::Completed(_) | Event::Failed(_)) {
                eprintln!("{e}");
            }
        },
        Duration::from_secs(1),
        |report| match report {
            ServerReport::Index(change) if change.is_warning() => {
                eprintln!("udpferry serve: {change}");
            }
            _ if verbose => eprintln!("{report}"),
            _ => {}
        },
    );
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail("serve", &format!("socket error: {e}")),
    }
}

/// `get`: one object (or a bundle's files) from one server or several, through
/// `Client::get`; a progress bar on a terminal, one status line per second with `-v`.
fn get(args: GetArgs) -> ExitCode {
    let Some(cache_dir) = args.cache.or_else(Cache::default_dir) else {
        return fail(
            "get",
            "no cache directory: pass --cache DIR (or set XDG_CACHE_HOME or HOME)",
        );
    };
    let client = match Client::new(&cache_dir) {
        Ok(client) => client,
        Err(e) => return fail("get", &FetchError::from(e).to_string()),
    };
    let mut servers: Vec<SocketAddr> = Vec::new();
    for s in args.server.split(',').map(str::trim) {
        match std::net::ToSocketAddrs::to_socket_addrs(s).map(|mut a| a.next()) {
            Ok(Some(a)) => servers.push(a),
            _ => return fail("get", &format!("cannot resolve server address {s:?}")),
        }
    }
    let options = FetchOptions {
        output: args.output,
        timeout: args.timeout,
        bases: args.bases,
        stop: match stop_on_signals() {
            Ok(stop) => Some(stop),
            Err(e) => return fail("get", &e),
        },
    };
    let bar = progress_bar("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}");
    let started = Instant::now();
    let mut last_line: Option<(Instant, u64)> = None;
    let result = client.get(&servers, args.id, &options, args.bundle, |p| {
        if let Some(bar) = &bar {
            bar.set_length(p.total);
            bar.set_position(p.bytes_done);
        }
        let now = Instant::now();
        let (then, before) = last_line.unwrap_or((started, 0));
        if args.verbose && now >= then + Duration::from_secs(1) {
            let rate = (p.bytes_done.saturating_sub(before)) as f64 / (now - then).as_secs_f64();
            let line = format!(
                "{:>6.1} s  {p}  {:.2} MB/s",
                (now - started).as_secs_f64(),
                rate / 1e6
            );
            match &bar {
                Some(bar) => bar.println(line),
                None => eprintln!("{line}"),
            }
            last_line = Some((now, p.bytes_done));
        }
    });
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    match result {
        Ok(got) => {
            eprintln!("{got}");
            if let (true, Got::Object(report)) = (args.verbose, &got) {
                eprintln!("{}", report.stats);
            }
            ExitCode::SUCCESS
        }
        Err(e @ FetchError::Stopped) => {
            eprintln!("udpferry get: {e}");
            ExitCode::from(EXIT_STOPPED)
        }
        Err(FetchError::Bundle(BundleFetchError::Files { failed, report })) => {
            for f in &failed {
                eprintln!("udpferry get: {}: {}", f.path, f.error);
            }
            let (n, of) = (failed.len(), report.files);
            fail(
                "get",
                &format!("{n} of {of} files were not installed (run again to resume)"),
            )
        }
        Err(e) => fail("get", &e.to_string()),
    }
}

/// A flag that SIGINT and SIGTERM set: a download stops at its next turn and keeps what
/// arrived for a resume (see `FetchOptions::stop`).
fn stop_on_signals() -> Result<Arc<AtomicBool>, String> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())
            .map_err(|e| format!("cannot handle signals: {e}"))?;
    }
    Ok(stop)
}

/// Exit status of a download stopped by SIGINT or SIGTERM (128 + SIGINT, as shells report it).
const EXIT_STOPPED: u8 = 130;

/// A progress bar with `template` when stderr is a terminal.
fn progress_bar(template: &str) -> Option<indicatif::ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(template)
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    })
}

fn fail(command: &str, message: &str) -> ExitCode {
    eprintln!("udpferry {command}: {message}");
    ExitCode::FAILURE
}

/// `demo`: a generated map served and fetched over loopback (`udpferry::loopback_demo`).
fn demo(size_mib: u64, seed: u64) -> ExitCode {
    let stop = match stop_on_signals() {
        Ok(stop) => Some(stop),
        Err(e) => return fail("demo", &e),
    };
    let len = (size_mib << 20) as usize;
    let shown = |id| println!("map: {len} bytes, md5 {id}");
    match udpferry::loopback_demo(len, seed, stop, shown) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => fail("demo", &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn rates_parse_with_binary_suffixes_and_per_second() {
        assert_eq!(parse_rate("2000000"), Ok(2_000_000));
        assert_eq!(parse_rate("512K"), Ok(512 * 1024));
        assert_eq!(parse_rate("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_rate("1MiB"), Ok(1 << 20));
        assert_eq!(parse_rate("1M/s"), Ok(1 << 20));
        assert_eq!(parse_rate("2G"), Ok(2 << 30));
        assert_eq!(parse_rate("3GiB/s"), Ok(3 << 30));
    }

    #[test]
    fn bad_rates_are_refused_with_a_reason() {
        for bad in [
            "",
            "fast",
            "1T",
            "0",
            "1.5M",
            "-1",
            "99999999999999999999",
            "17179869184G",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }
}
