//! The `udpferry` command line as scripts use it: `serve` and `get` as real processes talking over
//! loopback UDP.
//!
//! Contract checked here:
//! - `serve DIR [--listen ADDR] [--rate R] [--client-rate R] [--list]` prints
//!   `object <md5hex> <bytes> <path>` per object (with `--list`), then one `listening on <ADDR>`
//!   line, and exits 0 on SIGINT or SIGTERM;
//! - with `--list`, `bundle <md5hex> <files> <dir>/` per top-level subdirectory after them;
//! - `get SERVER ID -o DIR --bundle` installs every file of a bundle under DIR and, run again,
//!   fetches nothing;
//! - `get SERVER MD5 [-o PATH] [--cache DIR] [--timeout S]` exits 0 only with verified bytes,
//!   prints a one-line summary on stderr, resumes from the cache's journal, copies from the cache
//!   without the network, and on failure exits non-zero with one line naming the cause (leaving
//!   nothing in the cache when nothing arrived);
//! - two `get`s of one object into one cache take turns: one downloads, the other waits and
//!   copies from the cache;
//! - `cache list|clean|verify [--cache DIR]` print one line per entry (or per file removed, per
//!   damaged entry) and a summary.
//!
//! Every process is owned by a guard that kills it on drop, so a failing test leaves nothing
//! running. Timings are printed, never asserted (shared, noisy machines); the only time limits are
//! generous guards against hangs.

use std::net::{SocketAddr, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use udpferry::store::bundle::{Bundle, BundleEntry};
use udpferry::store::SafePath;
use udpferry::ObjectId;

mod common;
use common::cli::*;
use common::TempDir;

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn serve_lists_objects_and_get_downloads_64_mib() {
    let tmp = TempDir::new("big");
    let dir = tmp.join("served");
    let big = content(64 * MIB, 64);
    let small = b"hello, udpferry\n".to_vec();
    let big_md5 = put_file(&dir, "maps/big.map", &big);
    let small_md5 = put_file(&dir, "a.txt", &small);

    let (_server, addr, list) = spawn_server(&dir, &["--list"]);
    let mut got = list.clone();
    got.sort();
    // The top-level subdirectory `maps` is also served as a bundle, listed after the objects.
    let maps = Bundle::build(vec![BundleEntry {
        path: SafePath::parse("big.map").unwrap(),
        size: big.len() as u64,
        id: ObjectId::md5_of(&big),
    }])
    .unwrap();
    let maps_id = Bundle::id(&maps.encode());
    let mut want = vec![
        format!("object {small_md5} {} a.txt", small.len()),
        format!("object {big_md5} {} maps/big.map", big.len()),
        format!("bundle {maps_id} 1 maps/"),
    ];
    want.sort();
    assert_eq!(got, want, "--list output");
    assert!(
        list.last().is_some_and(|l| l.starts_with("bundle ")),
        "bundle lines come after the object lines: {list:?}"
    );

    let out = tmp.join("out");
    let cache = tmp.join("c");
    let r = get(addr, &big_md5, &out, &cache, &[], GET_LIMIT);
    assert!(r.status.success(), "get failed: {r:?}");
    assert_file_eq(&out, &big);
    assert_cache_done(&cache, &big_md5, &big);
    assert_eq!(
        entries(tmp.path()),
        vec!["c", "out", "served"],
        "no temporary files next to the output"
    );

    let lines = r.stderr_lines();
    assert_eq!(lines.len(), 1, "one summary line on stderr: {r:?}");
    let summary = lines[0];
    assert!(
        summary.contains(&big_md5),
        "summary names the object: {summary}"
    );
    assert!(
        summary.contains(&format!("{} bytes", big.len())),
        "summary gives the size: {summary}"
    );
    assert!(!summary.contains("resumed"), "nothing to resume: {summary}");
    let mbps = goodput(summary).unwrap_or_else(|| panic!("no MB/s figure in {summary:?}"));
    assert!(mbps > 0.0, "{summary}");
    println!("64 MiB get: {summary}");
    println!(
        "64 MiB get: goodput {mbps:.2} MB/s (wall time of the process {:.2} s)",
        r.elapsed.as_secs_f64()
    );

    // The small object too, with md5: prefix and upper case accepted.
    let out_small = tmp.join("small");
    let prefixed = format!("md5:{}", small_md5.to_uppercase());
    let r = get(addr, &prefixed, &out_small, &cache, &[], GET_LIMIT);
    assert!(r.status.success(), "get of the small object failed: {r:?}");
    assert_file_eq(&out_small, &small);
}

#[test]
fn second_get_uses_the_cache_without_network() {
    let tmp = TempDir::new("cache");
    let dir = tmp.join("served");
    let data = content(8 * MIB + 12345, 2);
    let md5 = put_file(&dir, "level.map", &data);
    let cache = tmp.join("c");

    let (mut server, addr, list) = spawn_server(&dir, &[]);
    assert!(list.is_empty(), "no object lines without --list: {list:?}");
    let first = get(addr, &md5, &tmp.join("one"), &cache, &[], GET_LIMIT);
    assert!(first.status.success(), "first get: {first:?}");
    assert_file_eq(&tmp.join("one"), &data);

    server.signal("TERM");
    let status = server
        .wait_for(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("server still running 10 s after SIGTERM"));
    // Checked at the end, so that a bad exit status does not hide how the cache behaves.
    let term_problem = (!status.success()).then(|| {
        format!(
            "SIGTERM must end the server with status 0, got {status:?}; stderr: {}",
            server.stderr()
        )
    });

    // Nothing listens now: only the cache can satisfy this (a network attempt would time out).
    let second = get(
        addr,
        &md5,
        &tmp.join("two"),
        &cache,
        &["--timeout", "20"],
        GET_LIMIT,
    );
    assert!(second.status.success(), "second get: {second:?}");
    assert_file_eq(&tmp.join("two"), &data);
    let lines = second.stderr_lines();
    assert_eq!(lines.len(), 1, "{second:?}");
    assert!(
        lines[0].contains("cache"),
        "the summary should say the cache served it: {second:?}"
    );
    assert_cache_done(&cache, &md5, &data);
    println!(
        "first get {:.2} s, second get (cache) {:.2} s: {}",
        first.elapsed.as_secs_f64(),
        second.elapsed.as_secs_f64(),
        lines[0]
    );
    if let Some(problem) = term_problem {
        panic!("{problem}");
    }
}

/// `get --bind` sends from the address given (the server sees it), and an address this host
/// does not have fails with a clear message before any transfer.
#[test]
fn get_bind_sends_from_the_given_address() {
    let tmp = TempDir::new("bind");
    let dir = tmp.join("served");
    let data = content(300_000, 9);
    let md5 = put_file(&dir, "level.map", &data);
    let (mut server, addr, _) = spawn_server(&dir, &["-v"]);
    let r = get(
        addr,
        &md5,
        &tmp.join("one"),
        &tmp.join("c"),
        &["--bind", "127.0.0.7:0"],
        GET_LIMIT,
    );
    assert!(r.status.success(), "get --bind 127.0.0.7:0: {r:?}");
    assert_file_eq(&tmp.join("one"), &data);
    let r = get(
        addr,
        &md5,
        &tmp.join("two"),
        &tmp.join("c2"),
        &["--bind", "192.0.2.1:0"],
        GET_LIMIT,
    );
    assert!(
        !r.status.success(),
        "bound to an address not on this host: {r:?}"
    );
    assert!(
        r.stderr.contains("192.0.2.1"),
        "the message names the address: {r:?}"
    );
    server.signal("TERM");
    let _ = server.wait_for(Duration::from_secs(10));
    let log = server.stderr();
    assert!(
        log.contains("to 127.0.0.7:"),
        "the server saw the bound address: {log}"
    );
}

/// `--framing panda3d` on both sides: each datagram carries Panda3D's 2-byte checksum header
/// (what a Panda3D game in its default UDP mode sends and expects). A plain `get` against such
/// a server is not understood (its datagrams lack the header) and times out; the framed one
/// downloads. The Python tests check the same against real Panda3D loops.
#[test]
fn framing_panda3d_on_both_sides_interoperates_and_plain_does_not() {
    let tmp = TempDir::new("framing");
    let dir = tmp.join("served");
    let data = content(700_000, 12);
    let md5 = put_file(&dir, "arena.bam", &data);
    let (mut server, addr, _) = spawn_server(&dir, &["--framing", "panda3d"]);
    let r = get(
        addr,
        &md5,
        &tmp.join("framed"),
        &tmp.join("c"),
        &["--framing", "panda3d"],
        GET_LIMIT,
    );
    assert!(r.status.success(), "get --framing panda3d: {r:?}");
    assert_file_eq(&tmp.join("framed"), &data);
    let r = get(
        addr,
        &md5,
        &tmp.join("plain"),
        &tmp.join("c2"),
        &["--timeout", "2"],
        GET_LIMIT,
    );
    assert!(
        !r.status.success(),
        "a plain get cannot talk to a framed server: {r:?}"
    );
    assert!(!tmp.join("plain").exists());
    let r = run(
        &[os("serve"), os("--framing"), os("raw"), dir.as_os_str()],
        GET_LIMIT,
    );
    assert!(!r.status.success() && r.stderr.contains("panda3d"), "{r:?}");
    server.signal("TERM");
    let _ = server.wait_for(Duration::from_secs(10));
}

#[test]
fn get_failures_name_the_cause() {
    let tmp = TempDir::new("fail");
    let dir = tmp.join("served");
    let data = content(100_000, 3);
    let md5 = put_file(&dir, "x.map", &data);
    let (_server, addr, _) = spawn_server(&dir, &[]);

    // Unknown object against a live server.
    let unknown = md5_hex(b"not served anywhere");
    assert_ne!(unknown, md5);
    let r = get(
        addr,
        &unknown,
        &tmp.join("u"),
        &tmp.join("c1"),
        &[],
        GET_LIMIT,
    );
    assert_fails_with(&r, &["not found"], "unknown md5");
    assert!(!tmp.join("u").exists(), "no output for a failed get");
    assert_eq!(
        entries(&tmp.join("c1")),
        Vec::<String>::new(),
        "an object never found leaves nothing in the cache"
    );
    println!("unknown md5: {}", r.stderr.trim());

    // A port where nothing listens (ICMP port unreachable), with --timeout 3; and a peer that
    // swallows everything silently (no ICMP), which only the idle timeout can end. Both run at
    // the same time.
    let dead = {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();

    let t_dead = {
        let (out, cache) = (tmp.join("d"), tmp.join("c2"));
        let md5 = md5.clone();
        thread::spawn(move || {
            get(
                dead,
                &md5,
                &out,
                &cache,
                &["--timeout", "3"],
                Duration::from_secs(30),
            )
        })
    };
    let t_silent = {
        let (out, cache) = (tmp.join("s"), tmp.join("c3"));
        let md5 = md5.clone();
        thread::spawn(move || {
            get(
                silent_addr,
                &md5,
                &out,
                &cache,
                &[],
                Duration::from_secs(60),
            )
        })
    };
    let r = t_dead.join().unwrap();
    assert_fails_with(
        &r,
        &["timed out", "gave up"],
        "nothing listening, --timeout 3",
    );
    assert!(
        r.elapsed < Duration::from_secs(30),
        "--timeout 3 must end the get (guard 30 s): {r:?}"
    );
    assert_eq!(entries(&tmp.join("c2")), Vec::<String>::new(), "{r:?}");
    println!(
        "dead port, --timeout 3: {} ({:.2} s)",
        r.stderr.trim(),
        r.elapsed.as_secs_f64()
    );

    let r = t_silent.join().unwrap();
    assert_fails_with(&r, &["timed out", "gave up"], "silent peer, idle timeout");
    assert_eq!(entries(&tmp.join("c3")), Vec::<String>::new(), "{r:?}");
    println!(
        "silent peer, no --timeout: {} ({:.2} s)",
        r.stderr.trim(),
        r.elapsed.as_secs_f64()
    );
    drop(silent);

    // Malformed ids and arguments: usage errors, before any network use.
    for bad in [
        "xyz",
        "0123456789abcdef0123456789abcde",
        "md5:zz23456789abcdef0123456789abcdef",
    ] {
        let server = addr.to_string();
        let r = run(
            &[
                os("get"),
                os(&server),
                os(bad),
                os("--cache"),
                tmp.join("c4").as_os_str(),
            ],
            Duration::from_secs(30),
        );
        assert!(!r.status.success(), "malformed md5 {bad:?} accepted: {r:?}");
        assert_eq!(
            r.status.code(),
            Some(2),
            "clap usage error for {bad:?}: {r:?}"
        );
        assert!(
            r.stderr.contains("32 hex"),
            "the message explains the format: {r:?}"
        );
    }
    for bad in ["--timeout=-1", "--timeout=0", "--timeout=soon"] {
        let r = get(
            addr,
            &md5,
            &tmp.join("t"),
            &tmp.join("c5"),
            &[bad],
            GET_LIMIT,
        );
        assert!(!r.status.success(), "{bad} accepted: {r:?}");
        assert!(
            r.stderr.contains("timeout"),
            "{bad}: the message names the flag: {r:?}"
        );
        assert!(!tmp.join("t").exists(), "{bad}: no output");
    }

    // The server is unharmed by all this: a good get still works.
    let r = get(addr, &md5, &tmp.join("ok"), &tmp.join("c6"), &[], GET_LIMIT);
    assert!(r.status.success(), "{r:?}");
    assert_file_eq(&tmp.join("ok"), &data);
}

#[test]
fn killed_get_resumes_from_the_journal() {
    const SIZE: usize = 48 * MIB;
    const RATE: f64 = 8.0 * MIB as f64;
    let tmp = TempDir::new("resume");
    let dir = tmp.join("served");
    let data = content(SIZE, 48);
    let md5 = put_file(&dir, "huge.map", &data);
    let cache = tmp.join("c");
    let part = cache.join(format!("{md5}.part"));
    let journal = cache.join(format!("{md5}.journal"));

    let (server, addr, _) = spawn_server(&dir, &["--rate", "8MiB", "-v"]);

    // First attempt: killed (SIGKILL) once the journal vouches for at least 24 MiB (half).
    let server_s = addr.to_string();
    let out = tmp.join("out");
    let started = Instant::now();
    let (mut first, _, _) = spawn(&[
        os("get"),
        os(&server_s),
        os(&md5),
        os("-o"),
        out.as_os_str(),
        os("--cache"),
        cache.as_os_str(),
    ]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let covered = loop {
        if let Some(c) = journal_covered(&journal) {
            if c >= 24 * MIB as u64 {
                break c;
            }
        }
        if let Some(status) = first.try_wait().unwrap() {
            panic!(
                "the first get ended ({status:?}) before the journal held 20 MiB; stderr: {}",
                first.stderr()
            );
        }
        assert!(
            Instant::now() < deadline,
            "journal did not reach 20 MiB within 120 s (covered {:?}, .part {:?} bytes); stderr: {}",
            journal_covered(&journal),
            std::fs::metadata(&part).map(|m| m.len()).ok(),
            first.stderr()
        );
        thread::sleep(Duration::from_millis(20));
    };
    first.kill().unwrap();
    let status = first.wait().unwrap();
    let killed_after = started.elapsed();
    assert!(!status.success(), "the first get was killed: {status:?}");
    assert!(
        first.stderr().trim().is_empty(),
        "the killed get printed: {}",
        first.stderr()
    );
    drop(first);

    let kept = journal_covered(&journal).expect("the journal survives the kill");
    assert!(kept >= covered, "journal shrank: {kept} < {covered}");
    assert!(part.exists(), "the partial file survives the kill");
    assert!(!cache.join(&md5).exists(), "nothing finished yet");
    assert!(!out.exists(), "no output from a killed get");
    println!(
        "killed the first get after {:.2} s with {} bytes journaled ({:.2} MB/s under --rate 8MiB)",
        killed_after.as_secs_f64(),
        kept,
        kept as f64 / killed_after.as_secs_f64() / 1e6
    );

    // Second attempt: resumes.
    let r = get(addr, &md5, &out, &cache, &[], GET_LIMIT);
    assert!(r.status.success(), "resumed get failed: {r:?}");
    assert_file_eq(&out, &data);
    assert_cache_done(&cache, &md5, &data);
    let lines = r.stderr_lines();
    assert_eq!(lines.len(), 1, "{r:?}");
    let n = resumed_bytes(lines[0])
        .unwrap_or_else(|| panic!("the summary should say `resumed from N bytes`: {r:?}"));
    assert!(n >= 20 * MIB as u64, "resumed from only {n} bytes: {r:?}");
    assert!(
        n >= kept,
        "resumed from {n} bytes but the journal held {kept}"
    );
    assert!(n < SIZE as u64, "resumed from {n} of {SIZE}");

    // The server's -v line for the completed second transfer gives the bytes it put on the
    // wire: at most 0.6 of the object after a kill at about half.
    let mut wire = None;
    for _ in 0..100 {
        wire = server.stderr().lines().find_map(|l| {
            let rest = l.strip_prefix(&format!("sent {md5} ("))?;
            let (_, after) = rest.split_once(": ")?;
            after.split_whitespace().next()?.parse::<u64>().ok()
        });
        if wire.is_some() {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    for line in server.stderr().lines() {
        println!("server -v: {line}");
    }
    let wire = wire.expect("the server reports the completed transfer with -v");
    println!(
        "second run: the server sent {wire} bytes = {:.3} of the object",
        wire as f64 / SIZE as f64
    );
    assert!(
        wire as f64 <= 0.6 * SIZE as f64,
        "server sent {wire} of {SIZE} bytes"
    );
    let full_estimate = SIZE as f64 / RATE;
    let rest_estimate = (SIZE as u64 - n) as f64 / RATE;
    println!("resumed get: {}", lines[0]);
    println!(
        "resume saving: {n} of {SIZE} bytes ({:.0}%) not sent again; second get took {:.2} s \
         (wall) vs ~{full_estimate:.1} s for the whole object at 8 MiB/s (~{rest_estimate:.1} s \
         expected for the rest)",
        n as f64 * 100.0 / SIZE as f64,
        r.elapsed.as_secs_f64(),
    );
}

#[test]
fn sigint_stops_the_server_cleanly() {
    let tmp = TempDir::new("sigint");
    let dir = tmp.join("served");
    let data = content(300_000, 5);
    let md5 = put_file(&dir, "m.map", &data);
    let (mut server, addr, _) = spawn_server(&dir, &[]);

    // It serves before the signal...
    let r = get(addr, &md5, &tmp.join("o"), &tmp.join("c"), &[], GET_LIMIT);
    assert!(r.status.success(), "{r:?}");

    server.signal("INT");
    let status = server
        .wait_for(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("server still running 10 s after SIGINT"));
    assert!(
        status.success(),
        "SIGINT must end the server with status 0, got {status:?}; stderr: {}",
        server.stderr()
    );
    assert!(
        server.stderr().trim().is_empty(),
        "a clean stop prints nothing on stderr: {}",
        server.stderr()
    );
}

#[test]
fn rate_flags_accept_units_and_reject_garbage() {
    let tmp = TempDir::new("rate");
    let dir = tmp.join("served");
    let data = content(64 * 1024, 6);
    let md5 = put_file(&dir, "r.map", &data);

    // Decimal units and fractions too (the issue's `4MB`, `1.5M`), and a host name to listen on.
    let (_server, addr, _) = spawn_server(&dir, &["--rate", "4MB", "--client-rate", "1.5M"]);
    let r = get(addr, &md5, &tmp.join("o"), &tmp.join("c"), &[], GET_LIMIT);
    assert!(
        r.status.success(),
        "a rate-capped server still serves: {r:?}"
    );
    assert_file_eq(&tmp.join("o"), &data);

    for (flag, bad) in [
        ("--rate", "fast"),
        ("--client-rate", "1.5T"),
        ("--rate", "0"),
    ] {
        let r = run(
            &[
                os("serve"),
                dir.as_os_str(),
                os("--listen"),
                os("127.0.0.1:0"),
                os(flag),
                os(bad),
            ],
            Duration::from_secs(20),
        );
        assert!(!r.status.success(), "{flag} {bad} accepted: {r:?}");
        assert!(
            !r.stdout.contains("listening on"),
            "{flag} {bad}: must not start listening: {r:?}"
        );
        assert!(
            r.stderr.contains(bad) && r.stderr.contains(flag.trim_start_matches('-')),
            "{flag} {bad}: the message should name the flag and the value: {r:?}"
        );
        if bad == "fast" {
            println!("--rate fast: {}", r.stderr.lines().next().unwrap_or(""));
        }
    }

    // A name to listen on is resolved (the issue: `--listen localhost:7878` was refused), and
    // one that does not resolve is named in the error.
    let listen = |address: &str| {
        run(
            &[os("serve"), dir.as_os_str(), os("--listen"), os(address)],
            Duration::from_secs(20),
        )
    };
    let r = listen("nowhere.invalid:7878");
    assert_eq!(r.status.code(), Some(2), "{r:?}");
    assert!(r.stderr.contains("nowhere.invalid:7878"), "{r:?}");
}

/// Peak resident memory of process `pid` in KiB (Linux: `VmHWM` in /proc).
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// 100 000 hostile datagrams (garbage, half-open requests that never start, starts with forged
/// nonces) from 50 addresses while a real client downloads: the download completes, no
/// half-open request holds anything, and the server's memory stays bounded.
#[test]
fn a_flood_of_garbage_and_half_open_requests_does_not_stop_a_real_download() {
    let tmp = TempDir::new("flood");
    let dir = tmp.join("served");
    let data = content(8 * MIB, 77);
    let md5 = put_file(&dir, "map.bsp", &data);
    let (server, addr, _) = spawn_server(&dir, &[]);
    let pid = server.child.id();
    let baseline = peak_rss_kib(pid);

    // The flood, from 127.0.1.1 to 127.0.1.50 (Linux routes all of 127/8 to loopback), so the
    // per-address request limit passes a share of it and the stateless handshake is exercised.
    let id_bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&md5[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let id = udpferry::ObjectId::Md5(id_bytes.try_into().unwrap());
    let flood = thread::spawn(move || {
        let sockets: Vec<UdpSocket> = (1..=50u8)
            .filter_map(|i| UdpSocket::bind(SocketAddr::from(([127, 0, 1, i], 0))).ok())
            .collect();
        assert!(!sockets.is_empty(), "no source addresses to flood from");
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut buf = vec![0u8; 1500];
        let mut sent = 0u32;
        while sent < 100_000 {
            let conn = udpferry::wire::ConnectionId(next());
            let request = udpferry::wire::Request {
                object: id,
                max_datagram_size: 1200,
                max_rate_bytes_per_sec: 0,
                have: udpferry::wire::HaveRanges::List(&[]),
            };
            let frame = match sent % 3 {
                0 => udpferry::wire::Frame::Request(request),
                1 => udpferry::wire::Frame::Start {
                    nonce: next(),
                    request,
                },
                _ => {
                    // Garbage: random bytes, sometimes with our magic in front.
                    let len = (next() % 1400) as usize + 1;
                    for b in buf[..len].iter_mut() {
                        *b = next() as u8;
                    }
                    if next() % 2 == 0 && len >= 5 {
                        buf[..5].copy_from_slice(b"UFRY\x01");
                    }
                    let s = &sockets[sent as usize % sockets.len()];
                    let _ = s.send_to(&buf[..len], addr);
                    sent += 1;
                    continue;
                }
            };
            let n = udpferry::wire::Datagram {
                conn_id: conn,
                frame,
            }
            .encode(&mut buf)
            .unwrap();
            let s = &sockets[sent as usize % sockets.len()];
            let _ = s.send_to(&buf[..n], addr);
            sent += 1;
            if sent.is_multiple_of(2000) {
                thread::sleep(Duration::from_millis(2)); // let the socket buffers drain a little
            }
        }
        // The server answered some of the forged-looking requests with offers (the per-address
        // limit drops the rest) and kept no state for them.
        thread::sleep(Duration::from_millis(200));
        let mut offers = 0;
        for s in &sockets {
            s.set_nonblocking(true).unwrap();
            while let Ok(n) = s.recv(&mut buf) {
                if let Ok(d) = udpferry::wire::decode(&buf[..n]) {
                    offers += usize::from(matches!(d.frame, udpferry::wire::Frame::Offer(_)));
                }
            }
        }
        (sent, offers)
    });

    let out = tmp.join("map.out");
    let cache = tmp.join("cache");
    let r = get(addr, &md5, &out, &cache, &[], GET_LIMIT);
    let (sent, offers) = flood.join().unwrap();
    assert_eq!(sent, 100_000);
    assert!(
        offers > 0,
        "the flood's requests were never answered: not exercised"
    );
    assert!(
        r.status.success(),
        "the real download failed during the flood: {r:?}"
    );
    assert_file_eq(&out, &data);
    let peak = peak_rss_kib(pid);
    println!(
        "flood of {sent} datagrams ({offers} offers came back): download {}; server peak RSS {} KiB (before the flood {} KiB)",
        r.stderr_lines().first().cloned().unwrap_or_default(),
        peak.map_or("?".into(), |p| p.to_string()),
        baseline.map_or("?".into(), |p| p.to_string()),
    );
    if let Some(peak) = peak {
        assert!(
            peak < 64 * 1024,
            "server peak RSS {peak} KiB: memory must not grow with a flood"
        );
    }
    drop(server);
}

/// A client that does not trust the server's choice of object asks by SHA-256: the server
/// serves the same file under both ids, the download is verified with SHA-256, and the cache
/// names it by its 64-digit hex.
#[test]
fn get_by_sha256_id_verifies_with_sha256() {
    let tmp = TempDir::new("sha256");
    let dir = tmp.join("served");
    let data = content(3 * MIB + 77, 31);
    let md5 = put_file(&dir, "assets/pack.bin", &data);
    let sha = udpferry::ObjectId::sha256_of(&data);
    let (server, addr, _) = spawn_server(&dir, &[]);
    let cache = tmp.join("c");
    let out = tmp.join("pack.out");
    let r = get(addr, &sha.to_string(), &out, &cache, &[], GET_LIMIT);
    assert!(r.status.success(), "get by sha256: {r:?}");
    assert_file_eq(&out, &data);
    assert!(
        cache.join(sha.to_hex()).exists(),
        "cached under the SHA-256 hex: {:?}",
        entries(&cache)
    );
    assert!(!cache.join(&md5).exists(), "not under the MD5");
    // A bare 64-digit id is refused (the algorithm must be explicit).
    let bare = get(addr, &sha.to_hex(), &tmp.join("x"), &cache, &[], GET_LIMIT);
    assert!(!bare.status.success(), "{bare:?}");
    // An id nobody serves is not found, not confused with the MD5.
    let other = udpferry::ObjectId::sha256_of(b"not served");
    let missing = get(
        addr,
        &other.to_string(),
        &tmp.join("y"),
        &cache,
        &[],
        GET_LIMIT,
    );
    assert_fails_with(&missing, &["not found"], "an unknown sha256 id");
    drop(server);
}

#[test]
fn get_bundle_installs_a_directory_and_skips_it_the_second_time() {
    let tmp = TempDir::new("bundle");
    let dir = tmp.join("served");
    let big = content(3 * MIB, 7);
    put_file(&dir, "maps/level.bsp", &big);
    put_file(&dir, "maps/textures/wall.png", b"wall");
    put_file(&dir, "maps/empty", b"");
    put_file(&dir, "readme.txt", b"not in any bundle");
    let (_server, addr, list) = spawn_server(&dir, &["--list"]);
    let line = list
        .iter()
        .find(|l| l.starts_with("bundle ") && l.ends_with(" 3 maps/"))
        .unwrap_or_else(|| panic!("no bundle line for maps/: {list:?}"));
    let id = line.split(' ').nth(1).unwrap().to_string();

    let out = tmp.join("out");
    let cache = tmp.join("c");
    let r = get(addr, &id, &out, &cache, &["--bundle"], GET_LIMIT);
    assert!(r.status.success(), "get --bundle failed: {r:?}");
    assert!(r.stderr.contains("3 downloaded"), "{r:?}");
    assert_file_eq(&out.join("level.bsp"), &big);
    assert_file_eq(&out.join("textures/wall.png"), b"wall");
    assert_file_eq(&out.join("empty"), b"");
    assert_eq!(entries(&out), vec!["empty", "level.bsp", "textures"]);

    let again = get(addr, &id, &out, &cache, &["--bundle"], GET_LIMIT);
    assert!(
        again.status.success(),
        "second get --bundle failed: {again:?}"
    );
    assert!(again.stderr.contains("0 downloaded"), "{again:?}");
    assert!(again.stderr.contains("3 already present"), "{again:?}");

    // --bundle needs a directory.
    let no_dir = run(
        &[os("get"), os(&addr.to_string()), os(&id), os("--bundle")],
        GET_LIMIT,
    );
    assert_eq!(no_dir.status.code(), Some(2), "{no_dir:?}");

    // The form, without --bundle: the id turns out to name a bundle listing, so -o is
    // the directory its files go to (a fresh cache and directory).
    let plain_out = tmp.join("plain");
    let plain = get(addr, &id, &plain_out, &tmp.join("c2"), &[], GET_LIMIT);
    assert!(
        plain.status.success(),
        "get of a bundle id failed: {plain:?}"
    );
    assert!(plain_out.is_dir(), "-o became a directory");
    assert_file_eq(&plain_out.join("level.bsp"), &big);
    assert_file_eq(&plain_out.join("textures/wall.png"), b"wall");
    assert_eq!(entries(&plain_out), vec!["empty", "level.bsp", "textures"]);
}

#[test]
fn two_gets_of_one_object_into_one_cache_take_turns() {
    let tmp = TempDir::new("two-gets");
    let dir = tmp.join("served");
    let data = content(4 * MIB, 21);
    let md5 = put_file(&dir, "m.map", &data);
    // About two seconds per download, so that the two overlap.
    let (_server, addr, _) = spawn_server(&dir, &["--client-rate", "2MiB"]);
    let cache = tmp.join("c");
    let first = {
        let (out, cache, md5) = (tmp.join("one"), cache.clone(), md5.clone());
        thread::spawn(move || get(addr, &md5, &out, &cache, &[], GET_LIMIT))
    };
    // The second starts once the first holds the object's lock.
    let lock = cache.join(format!("{md5}.lock"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lock.exists() {
        assert!(
            Instant::now() < deadline,
            "the first get never took the lock"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let second = get(addr, &md5, &tmp.join("two"), &cache, &[], GET_LIMIT);
    let first = first.join().unwrap();
    for (r, out) in [(&first, "one"), (&second, "two")] {
        assert!(r.status.success(), "{r:?}");
        assert_eq!(r.stderr_lines().len(), 1, "{r:?}");
        assert_file_eq(&tmp.join(out), &data);
    }
    assert!(!first.stderr.contains("already in the cache"), "{first:?}");
    assert!(
        second.stderr.contains("already in the cache"),
        "the second waited for the first and used its download: {second:?}"
    );
    assert_cache_done(&cache, &md5, &data);
    assert_eq!(
        entries(&cache),
        vec![md5.clone(), format!("{md5}.verified")]
    );
    println!(
        "first: {} ({:.2} s); second: {} ({:.2} s)",
        first.stderr.trim(),
        first.elapsed.as_secs_f64(),
        second.stderr.trim(),
        second.elapsed.as_secs_f64()
    );
}

/// `udpferry cache ARGS... --cache CACHE`.
fn cache_cmd(cache: &std::path::Path, args: &[&str]) -> Run {
    let mut all: Vec<&std::ffi::OsStr> = vec![os("cache")];
    all.extend(args.iter().map(|a| os(a)));
    all.extend([os("--cache"), cache.as_os_str()]);
    run(&all, Duration::from_secs(60))
}

#[test]
fn cache_list_clean_and_verify_print_what_they_find_and_do() {
    use udpferry::store::Cache;
    use udpferry::ChunkSink;
    let tmp = TempDir::new("cache-cmd");
    let dir = tmp.join("served");
    let data = content(3 * MIB, 31);
    let md5 = put_file(&dir, "m.map", &data);
    let (_server, addr, _) = spawn_server(&dir, &[]);
    let cache = tmp.join("c");
    let r = get(addr, &md5, &tmp.join("out"), &cache, &[], GET_LIMIT);
    assert!(r.status.success(), "{r:?}");

    // A partial download nobody touched for ten days, and a torn journal update.
    let other = content(100_000, 32);
    let other_id = ObjectId::md5_of(&other);
    let other_md5 = other_id.to_hex();
    {
        let c = Cache::open(&cache).unwrap();
        let (mut partial, _) = c.begin(&other_id).unwrap();
        partial.set_size(other.len() as u64);
        partial.write_at(0, &other[..40_000]).unwrap();
        partial.checkpoint().unwrap();
    }
    let ten_days_ago = std::time::SystemTime::now() - Duration::from_secs(10 * 86_400);
    for suffix in [".part", ".journal"] {
        std::fs::File::options()
            .write(true)
            .open(cache.join(format!("{other_md5}{suffix}")))
            .and_then(|f| f.set_modified(ten_days_ago))
            .unwrap();
    }
    std::fs::write(cache.join(format!("{md5}.journal.tmp")), b"torn").unwrap();

    let r = cache_cmd(&cache, &["list"]);
    assert!(r.status.success() && r.stderr.is_empty(), "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    let size = data.len();
    assert_eq!(lines.len(), 4, "{r:?}");
    assert!(
        lines.contains(&format!("partial {other_md5} 40000/100000 bytes, 10d old").as_str()),
        "{r:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("complete {md5} {size} bytes, "))),
        "{r:?}"
    );
    assert!(
        lines.iter().any(
            |l| l.starts_with(&format!("stray {md5}.journal.tmp 4 bytes, "))
                && l.ends_with(": unfinished journal update")
        ),
        "{r:?}"
    );
    assert_eq!(
        lines[3],
        format!("1 complete ({size} bytes), 1 partial (40000 bytes on disk), 1 stray (4 bytes)")
    );

    // A recent age keeps nothing of the old partial; the global --cache works before the action.
    let r = run(
        &[os("cache"), os("--cache"), cache.as_os_str(), os("clean")],
        Duration::from_secs(60),
    );
    assert!(r.status.success() && r.stderr.is_empty(), "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{r:?}");
    assert!(
        lines.contains(
            &format!("removed {other_md5}.part (40000 bytes): partial download untouched for 10d")
                .as_str()
        ),
        "{r:?}"
    );
    assert!(
        lines.contains(
            &format!("removed {md5}.journal.tmp (4 bytes): unfinished journal update").as_str()
        ),
        "{r:?}"
    );
    assert_eq!(
        lines[3],
        "removed 3 files (40057 bytes); kept 0 partial downloads touched within 7d"
    );
    assert_eq!(
        entries(&cache),
        vec![md5.clone(), format!("{md5}.verified")]
    );

    // Bit rot in the finished entry: verify sets it aside, and the next get repairs it,
    // keeping the blocks that still match.
    let entry = cache.join(&md5);
    let mut rotten = std::fs::read(&entry).unwrap();
    rotten[1_000_000] ^= 1;
    std::fs::write(&entry, &rotten).unwrap();
    let r = cache_cmd(&cache, &["verify"]);
    assert!(r.status.success() && r.stderr.is_empty(), "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{r:?}");
    assert!(
        lines[0].starts_with(&format!("damaged {md5}: its bytes hash to ")),
        "{r:?}"
    );
    assert!(
        lines[0].ends_with(&format!(
            "set aside as {md5}.part for the next download to repair"
        )),
        "{r:?}"
    );
    assert_eq!(
        lines[1],
        "verified 1 complete entries (0 bytes): 0 good, 1 damaged"
    );
    assert_eq!(entries(&cache), vec![format!("{md5}.part")]);
    let r = get(addr, &md5, &tmp.join("again"), &cache, &[], GET_LIMIT);
    assert!(r.status.success(), "{r:?}");
    assert!(
        r.stderr
            .contains("unjournaled bytes that matched the manifest"),
        "{r:?}"
    );
    assert_file_eq(&tmp.join("again"), &data);
    let r = cache_cmd(&cache, &["verify"]);
    assert_eq!(
        r.stdout.trim(),
        format!("verified 1 complete entries ({size} bytes): 1 good, 0 damaged")
    );

    // --older-than takes a whole number and a unit; anything else is a usage error.
    for bad in ["7", "1.5d", "-1d", "7y", "d", "99999999999999999999w"] {
        let r = cache_cmd(&cache, &["clean", &format!("--older-than={bad}")]);
        assert_eq!(r.status.code(), Some(2), "{bad}: {r:?}");
        assert!(r.stderr.contains("whole number and a unit"), "{bad}: {r:?}");
    }
    let r = cache_cmd(&cache, &["clean", "--older-than", "12h"]);
    assert!(
        r.stdout
            .ends_with("kept 0 partial downloads touched within 12h\n"),
        "{r:?}"
    );
}
