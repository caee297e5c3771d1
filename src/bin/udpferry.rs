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
use udpferry::{resolve_target, Cache, ContentStore, StoreError};
use udpferry::{BundleFetchError, Client, FetchError, FetchOptions, Server, ServerConfig};

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
    /// Serve every file under DIR, addressed by the MD5 of its bytes, until SIGINT or SIGTERM.
    Serve {
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
        /// Report transfers on stderr, and one status line per second while any is active.
        #[arg(short, long)]
        verbose: bool,
    },
    /// Download one object by its MD5 (or SHA-256), verify it, and store it in the cache and/or PATH.
    Get {
        /// Server address (host:port), or several separated by commas to fetch from all of them
        /// at once (faster servers deliver more; one that sends wrong bytes is dropped).
        server: String,
        /// The object's id: its MD5 (32 hex digits, optionally prefixed with `md5:`) or
        /// `sha256:` and its SHA-256 (64 hex digits).
        md5: ObjectId,
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
    },
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

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve {
            dir,
            listen,
            rate,
            client_rate,
            list,
            verbose,
        } => serve(dir, listen, rate, client_rate, list, verbose),
        Command::Get {
            server,
            md5,
            output: Some(dir),
            cache,
            timeout,
            verbose,
            bundle: true,
            ..
        } => get_bundle(&server, md5, dir, cache, timeout, verbose),
        Command::Get {
            server,
            md5,
            bases,
            output,
            cache,
            timeout,
            verbose,
            ..
        } => get(&server, md5, output, cache, timeout, verbose, bases),
        Command::Demo { size_mib, seed } => loopback_demo(size_mib, seed),
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

fn serve(
    dir: PathBuf,
    listen: SocketAddr,
    rate: Option<u64>,
    client_rate: Option<u64>,
    list: bool,
    verbose: bool,
) -> ExitCode {
    let store = match ContentStore::open(&dir) {
        Ok(s) => s,
        Err(e) => return fail("serve", &e.to_string()),
    };
    let mut stdout = std::io::stdout().lock();
    if list {
        for o in store.objects() {
            let _ = writeln!(stdout, "object {} {} {}", o.id, o.size, o.path.display());
        }
        for b in store.bundles() {
            let _ = writeln!(stdout, "bundle {} {} {}/", b.id, b.files, b.dir);
        }
    }
    let mut config = ServerConfig::default();
    config.endpoint.rate_limit_bytes_per_sec = rate.unwrap_or(0);
    config.endpoint.transfer.max_rate_bytes_per_sec = client_rate.unwrap_or(0);
    let mut server = match Server::bind(listen, store, config) {
        Ok(s) => s,
        Err(e) => return fail("serve", &format!("cannot listen on {listen}: {e}")),
    };
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(signal, stop.clone()) {
            return fail("serve", &format!("cannot handle signals: {e}"));
        }
    }
    match server.local_addr() {
        Ok(addr) => {
            let _ = writeln!(stdout, "listening on {addr}");
            let _ = stdout.flush();
        }
        Err(e) => return fail("serve", &e.to_string()),
    }
    drop(stdout);
    let mut last_sent: Option<(Instant, u64)> = None;
    let report = |ep: &udpferry::Endpoint<ContentStore, Vec<u8>>| {
        if !verbose {
            return;
        }
        let now = Instant::now();
        let sent = ep.stats().bytes_sent;
        let rate = last_sent.map_or(0.0, |(then, before): (Instant, u64)| {
            sent.saturating_sub(before) as f64 / (now - then).as_secs_f64().max(1e-9)
        });
        last_sent = Some((now, sent));
        let mut line = format!(
            "{} transfers, sending {:.2} MB/s",
            ep.transfer_count(),
            rate / 1e6
        );
        for t in ep.transfers().filter(|t| !t.finished).take(4) {
            line.push_str(&format!(" | {t}"));
        }
        eprintln!("{line}");
    };
    let result = server.run_with_reports(
        &stop,
        |e| {
            if verbose && matches!(e.event, Event::Completed(_) | Event::Failed(_)) {
                eprintln!("{e}");
            }
        },
        Duration::from_secs(1),
        report,
    );
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail("serve", &format!("socket error: {e}")),
    }
}

fn get(
    server: &str,
    id: ObjectId,
    output: Option<PathBuf>,
    cache: Option<PathBuf>,
    timeout: Option<Duration>,
    verbose: bool,
    bases: Vec<PathBuf>,
) -> ExitCode {
    let Some(cache_dir) = cache.or_else(Cache::default_dir) else {
        return fail(
            "get",
            "no cache directory: pass --cache DIR (or set XDG_CACHE_HOME or HOME)",
        );
    };
    // Refuse an -o that is a device, FIFO or socket before using the network. A directory may
    // still be right: if the object is a bundle listing, -o names the directory to install its
    // files in (see `bundle_listing`); otherwise it is refused after the download.
    if let Some(out) = &output {
        match resolve_target(out, None) {
            Err(StoreError::NotAFile {
                kind: "a directory",
                ..
            }) => {}
            Err(e) => return fail("get", &e.to_string()),
            Ok(_) => {}
        }
    }
    let mut options = FetchOptions::new(cache_dir.clone());
    // The object goes to the cache first. An existing file at -o is searched for reusable
    // blocks.
    options.bases = bases;
    if let Some(out) = output.as_ref().filter(|o| o.is_file()) {
        options.bases.push(out.clone());
    }
    options.timeout = timeout;
    options.stop = match stop_on_signals() {
        Ok(stop) => Some(stop),
        Err(e) => return fail("get", &e),
    };
    let bar = progress_bar("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}");
    // Several servers, comma-separated: fetch from all of them at once.
    let servers: Vec<&str> = server.split(',').map(str::trim).collect();
    let mut addrs: Vec<SocketAddr> = Vec::new();
    if servers.len() > 1 {
        for s in &servers {
            match std::net::ToSocketAddrs::to_socket_addrs(s).map(|mut a| a.next()) {
                Ok(Some(a)) => addrs.push(a),
                _ => return fail("get", &format!("cannot resolve server address {s:?}")),
            }
        }
    }
    let started = Instant::now();
    let mut last_line: Option<(Instant, u64)> = None;
    let on_progress = |p: &udpferry::Progress| {
        if let Some(bar) = &bar {
            bar.set_length(p.total);
            bar.set_position(p.bytes_done);
        }
        if verbose {
            let now = Instant::now();
            let (then, before) = last_line.unwrap_or((started, 0));
            if now >= then + Duration::from_secs(1) {
                let rate =
                    (p.bytes_done.saturating_sub(before)) as f64 / (now - then).as_secs_f64();
                let line = format!(
                    "{:>6.1} s  {}/{} bytes  {:.2} MB/s  rtt {:.1} ms  {} duplicate chunks  {} dropped",
                    (now - started).as_secs_f64(),
                    p.bytes_done,
                    p.total,
                    rate / 1e6,
                    p.stats.smoothed_rtt.as_secs_f64() * 1e3,
                    p.stats.duplicate_chunks,
                    p.stats.dropped.total()
                );
                match &bar {
                    Some(bar) => bar.println(line),
                    None => eprintln!("{line}"),
                }
                last_line = Some((now, p.bytes_done));
            }
        }
    };
    let result = if addrs.is_empty() {
        Client::fetch(server, id, &options, on_progress)
    } else {
        Client::fetch_from(&addrs, id, &options, on_progress)
    };
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    match result {
        Ok(report) => {
            if let Some(out) = output {
                if udpferry::is_bundle_listing(&report.path) {
                    // A bundle: install its files under `out` (the listing is cached now).
                    let first = server.split(',').next().unwrap_or(server);
                    return get_bundle(first, id, out, Some(cache_dir), timeout, verbose);
                }
                let installed =
                    udpferry::Cache::open(&cache_dir).and_then(|cache| cache.copy_out(&id, &out));
                if let Err(e) = installed {
                    return fail("get", &FetchError::Store(e).to_string());
                }
            }
            eprintln!("{report}");
            if verbose {
                eprintln!("{}", report.stats);
            }
            ExitCode::SUCCESS
        }
        Err(e @ FetchError::Stopped) => {
            eprintln!("udpferry get: {e}");
            ExitCode::from(EXIT_STOPPED)
        }
        Err(e) => fail("get", &e.to_string()),
    }
}

/// `get --bundle`: installs every file of bundle `id` under `dir` (see
/// `Client::fetch_bundle`), with one summary line on stderr.
fn get_bundle(
    server: &str,
    id: ObjectId,
    dir: PathBuf,
    cache: Option<PathBuf>,
    timeout: Option<Duration>,
    verbose: bool,
) -> ExitCode {
    if server.contains(',') {
        return fail("get", "--bundle takes a single server address");
    }
    let Some(cache_dir) = cache.or_else(Cache::default_dir) else {
        return fail(
            "get",
            "no cache directory: pass --cache DIR (or set XDG_CACHE_HOME or HOME)",
        );
    };
    let mut options = FetchOptions::new(cache_dir);
    options.timeout = timeout;
    let bar = progress_bar("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}");
    let result = Client::fetch_bundle(server, id, &dir, &options, |p| {
        if let Some(bar) = &bar {
            bar.set_length(p.bytes_total);
            bar.set_position(p.bytes_done);
            bar.set_message(format!("{}/{} files", p.files_done, p.files_total));
        }
    });
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    match result {
        Ok(report) => {
            eprintln!("{report}");
            ExitCode::SUCCESS
        }
        Err(BundleFetchError::Files { failed, report }) => {
            for f in &failed {
                eprintln!("udpferry get: {}: {}", f.path, f.error);
            }
            if verbose {
                eprintln!("{report}");
            }
            fail(
                "get",
                &format!(
                    "{} of {} files were not installed (run again to resume)",
                    failed.len(),
                    report.files
                ),
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

/// `len` pseudo-random bytes from `seed` (splitmix64): a map that does not compress.
fn demo_map(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut map = Vec::with_capacity(len + 8);
    while map.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        map.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    map.truncate(len);
    map
}

/// The size, duration and goodput lines the demo prints.
fn print_size_and_rate(size: u64, secs: f64) {
    println!("size:            {size} bytes");
    println!("duration:        {secs:.2} s");
    println!(
        "goodput:         {:.2} MB/s",
        size as f64 / secs.max(1e-9) / 1e6
    );
}

fn fail(command: &str, message: &str) -> ExitCode {
    eprintln!("udpferry {command}: {message}");
    ExitCode::FAILURE
}

/// A directory removed when dropped: on success, on error, on a panic's unwinding, and after
/// SIGINT or SIGTERM (which stop the demo's download rather than the process).
struct TempDirGuard(PathBuf);

impl Drop for TempDirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn loopback_demo(size_mib: u64, seed: u64) -> ExitCode {
    let stop = match stop_on_signals() {
        Ok(stop) => stop,
        Err(e) => return fail("demo", &e),
    };
    let dir =
        TempDirGuard(std::env::temp_dir().join(format!("udpferry-demo-{}", std::process::id())));
    match run_loopback_demo(&dir.0, size_mib, seed, stop) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail("demo", &message),
    }
}

fn run_loopback_demo(
    dir: &std::path::Path,
    size_mib: u64,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let maps = dir.join("maps");
    std::fs::create_dir_all(&maps).map_err(|e| e.to_string())?;
    let map = demo_map((size_mib << 20) as usize, seed);
    let id = ObjectId::md5_of(&map);
    std::fs::write(maps.join("demo.map"), &map).map_err(|e| e.to_string())?;
    drop(map);
    println!("map: {} bytes, md5 {id}", size_mib << 20);
    let store = ContentStore::open(&maps).map_err(|e| e.to_string())?;
    let server = Server::bind(
        "127.0.0.1:0".parse().map_err(|_| "address")?,
        store,
        ServerConfig::default(),
    )
    .and_then(Server::spawn)
    .map_err(|e| e.to_string())?;
    let addr = server.local_addr();
    println!("server: listening on {addr} (loopback, real UDP sockets)");
    let mut options = FetchOptions::new(dir.join("cache"));
    options.stop = Some(stop);
    let result = Client::fetch(addr, id, &options, |_| {});
    drop(server);
    let report = result.map_err(|e| e.to_string())?;
    let secs = report.duration.as_secs_f64();
    println!(
        "verified: md5 {} matches ({})",
        report.object,
        report.path.display()
    );
    print_size_and_rate(report.size, secs);
    println!(
        "received:        {} datagrams",
        report.stats.datagrams_received
    );
    println!(
        "retransmissions: {} duplicate chunks arrived",
        report.stats.duplicate_chunks
    );
    Ok(())
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
