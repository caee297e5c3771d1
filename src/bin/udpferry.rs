//! The `udpferry` command-line tool: `serve` a directory of maps, `get` one by its MD5, look
//! after the `cache`, or run the `demo` (a 32 MiB map over real loopback sockets).

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
use udpferry::{Cache, ContentStore, CLEAN_AGE};
use udpferry::{Framing, Server, ServerConfig, ServerReport};

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
    /// List, clean or verify the cache that `get` downloads into.
    Cache(CacheArgs),
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
    /// Address to listen on, host:port (a name like localhost:7878 is resolved; port 0 picks
    /// a free port; the chosen address is printed).
    #[arg(long, default_value = "0.0.0.0:7878", value_parser = parse_address)]
    listen: SocketAddr,
    /// Cap on all sending together, bytes per second (e.g. 2000000, 512K, 1.5MiB, 4MB, 10M/s:
    /// K, M, G, KiB, MiB, GiB are binary, KB, MB, GB decimal).
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
    /// How datagrams are framed: `plain` (udpferry's own), or `panda3d` for Panda3D clients in
    /// their default (non-raw) UDP mode, which puts a 2-byte checksum in front of each.
    #[arg(long, default_value = "plain", value_parser = parse_framing)]
    framing: Framing,
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
    /// Local address to send from, host:port (port 0: any free port), e.g. to pick an
    /// interface. Default: any address, of the servers' family.
    #[arg(long, value_parser = parse_address)]
    bind: Option<SocketAddr>,
    /// How datagrams are framed: `plain`, or `panda3d` for a Panda3D server in its default
    /// (non-raw) UDP mode.
    #[arg(long, default_value = "plain", value_parser = parse_framing)]
    framing: Framing,
}

#[derive(clap::Args)]
struct CacheArgs {
    /// Cache directory (default: the platform cache directory, as for `get`).
    #[arg(long, global = true)]
    cache: Option<PathBuf>,
    #[command(subcommand)]
    action: CacheAction,
}

#[derive(Subcommand)]
enum CacheAction {
    /// One line per finished object, partial download and stray file, with sizes and ages.
    List,
    /// Remove partial downloads untouched for DURATION, and stray files (journals without a
    /// download, unfinished journal updates, stale locks). Finished objects stay.
    Clean {
        /// Age of the partial downloads to remove: a number and a unit, s, m, h, d or w
        /// (e.g. 12h, 30d); default 7d.
        #[arg(long, value_name = "DURATION", value_parser = parse_age)]
        older_than: Option<Duration>,
    },
    /// Re-hash every finished object; set damaged ones aside for the next `get` to repair.
    Verify,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::Get(args) => get(args),
        Command::Cache(args) => cache(args),
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

/// Parses `--framing`.
fn parse_framing(text: &str) -> Result<Framing, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "plain" | "udpferry" => Ok(Framing::Plain),
        "panda3d" | "panda" => Ok(Framing::Panda3d),
        _ => Err(format!("{text:?}: expected plain or panda3d")),
    }
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

/// Resolves host:port (an IP address or a name) to its first address.
fn parse_address(text: &str) -> Result<SocketAddr, String> {
    match std::net::ToSocketAddrs::to_socket_addrs(text.trim()).map(|mut a| a.next()) {
        Ok(Some(addr)) => Ok(addr),
        Ok(None) => Err(format!("`{text}` resolves to no address")),
        Err(e) => Err(format!(
            "cannot resolve `{text}` (give host:port, e.g. 0.0.0.0:7878): {e}"
        )),
    }
}

/// Parses `--older-than`: a whole number and a unit, s, m, h, d or w.
fn parse_age(text: &str) -> Result<Duration, String> {
    let bad = || format!("`{text}` is not a whole number and a unit s, m, h, d or w (e.g. 30d)");
    let t = text.trim();
    let (n, unit) = t
        .split_at_checked(t.len().saturating_sub(1))
        .ok_or_else(bad)?;
    let unit = ["s", "m", "h", "d", "w"].iter().position(|u| *u == unit);
    let secs = [1, 60, 3600, 86_400, 604_800].get(unit.ok_or_else(bad)?);
    let secs = secs.and_then(|s| n.parse::<u64>().ok()?.checked_mul(*s));
    secs.map(Duration::from_secs).ok_or_else(bad)
}

/// Parses a rate: a number (fractions allowed) with an optional unit and an optional `/s`.
/// K, M, G, KiB, MiB and GiB are binary (1024^n), KB, MB and GB decimal (1000^n), in any case.
fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let forms = "examples: 2000000, 512K, 1.5MiB, 4MB, 10M/s";
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a rate ({forms})"))?;
    let multiplier: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        _ => return Err(format!("unknown unit in `{text}` ({forms})")),
    };
    let rate = (value * multiplier).round();
    if rate < 1.0 {
        return Err(format!(
            "`{text}`: a rate must be at least 1 byte per second"
        ));
    }
    if rate >= u64::MAX as f64 {
        return Err(format!("`{text}` is too large"));
    }
    Ok(rate as u64)
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
    config.framing = args.framing;
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

const NO_CACHE_DIR: &str = "no cache directory: pass --cache DIR (or set XDG_CACHE_HOME or HOME)";

/// `cache list|clean|verify`: `Cache::entries`, `clean` and `verify_all`, printed.
fn cache(args: CacheArgs) -> ExitCode {
    let Some(dir) = args.cache.or_else(Cache::default_dir) else {
        return fail("cache", NO_CACHE_DIR);
    };
    let report = Cache::open(&dir).and_then(|cache| match args.action {
        CacheAction::List => cache.entries().map(|r| r.to_string()),
        CacheAction::Clean { older_than: age } => {
            cache.clean(age.unwrap_or(CLEAN_AGE)).map(|r| r.to_string())
        }
        CacheAction::Verify => cache.verify_all().map(|r| r.to_string()),
    });
    match report {
        Ok(text) => println!("{text}"),
        Err(e) => return fail("cache", &e.to_string()),
    }
    ExitCode::SUCCESS
}

/// `get`: one object (or a bundle's files) from one server or several, through
/// `Client::get`; a progress bar on a terminal, one status line per second with `-v`.
fn get(args: GetArgs) -> ExitCode {
    let Some(cache_dir) = args.cache.or_else(Cache::default_dir) else {
        return fail("get", NO_CACHE_DIR);
    };
    let client = match Client::new(&cache_dir) {
        Ok(client) => match args.bind {
            Some(local) => client.with_bind(local),
            None => client,
        }
        .with_framing(args.framing),
        Err(e) => return fail("get", &FetchError::from(e).to_string()),
    };
    let mut servers: Vec<SocketAddr> = Vec::new();
    for s in args.server.split(',') {
        match parse_address(s) {
            Ok(a) => servers.push(a),
            Err(e) => return fail("get", &e),
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
    let bar = progress_bar("{msg}{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}");
    let started = Instant::now();
    let mut last_line: Option<(Instant, u64)> = None;
    let result = client.get(&servers, args.id, &options, args.bundle, |p| {
        if let Some(bar) = &bar {
            bar.set_length(p.total);
            bar.set_position(p.bytes_done);
            // "waiting for 10.0.0.5:7878 (3 s)" until the first answer.
            bar.set_message(
                p.waiting
                    .as_ref()
                    .map_or(String::new(), |w| format!("{w} ")),
            );
        }
        let now = Instant::now();
        let (then, before) = last_line.unwrap_or((started, 0));
        if args.verbose && now >= then + Duration::from_secs(1) {
            let rate = (p.bytes_done.saturating_sub(before)) as f64 / (now - then).as_secs_f64();
            let t = (now - started).as_secs_f64();
            let line = match p.waiting {
                Some(_) => format!("{t:>6.1} s  {p}"),
                None => format!("{t:>6.1} s  {p}  {:.2} MB/s", rate / 1e6),
            };
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
    use super::{parse_address, parse_rate};

    #[test]
    fn addresses_resolve_names_and_name_what_they_refuse() {
        assert!(parse_address("localhost:7878").is_ok_and(|a| a.port() == 7878));
        assert_eq!(parse_address("[::1]:9"), Ok("[::1]:9".parse().unwrap()));
        let refused = parse_address("no-port-here").unwrap_err();
        assert!(refused.contains("no-port-here"), "{refused}");
    }

    #[test]
    fn rates_parse_with_binary_and_decimal_units_fractions_and_per_second() {
        for (text, rate) in [
            ("2000000", 2_000_000),
            ("512K", 512 * 1024),
            ("512k", 512 * 1024),
            ("512KiB", 512 * 1024),
            ("1MiB", 1 << 20),
            ("1M/s", 1 << 20),
            ("1.5M", 3 << 19),
            ("2G", 2 << 30),
            ("3GiB/s", 3 << 30),
            ("4MB", 4_000_000),
            ("4kB", 4_000),
            ("0.5GB", 500_000_000),
        ] {
            assert_eq!(parse_rate(text), Ok(rate), "{text}");
        }
    }

    #[test]
    fn bad_rates_are_refused_with_a_reason() {
        for bad in [
            "",
            "fast",
            "1T",
            "0",
            "0.0001",
            "-1",
            "1..5M",
            "99999999999999999999",
            "17179869184G",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }
}
