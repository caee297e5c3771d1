//! Issue 17 from outside: `udpferry get` from `udpferry serve --rate 4MiB` through a loopback
//! relay that re-maps the client's port mid-download as a NAT does (the old mapping goes silent
//! both ways). The download must finish on its own, with the right bytes, the server sending
//! little more than the object; the time it took is printed (a figure, not asserted: this
//! machine is shared).

use std::time::Duration;

mod common;
use common::cli::*;
use common::relay::{Relay, RelayConfig};
use common::TempDir;

const MIB: usize = 1 << 20;
const SIZE: usize = 8 * MIB;

/// One download of 8 MiB through a relay that re-maps at each of `rebind_at` (bytes passed on
/// to the client).
fn download_through_rebinding(name: &str, rebind_at: Vec<u64>, eat_path_challenges: bool) -> Run {
    let tmp = TempDir::new(name);
    let data = content(SIZE, 17);
    let md5 = put_file(&tmp.join("maps"), "pack.bin", &data);
    let (_server, addr, _) = spawn_server(&tmp.join("maps"), &["--rate", "4MiB"]);
    let relay = Relay::start(
        addr,
        RelayConfig {
            rebind_at: rebind_at.clone(),
            eat_path_challenges,
            ..RelayConfig::default()
        },
    );
    let (out, cache) = (tmp.join("out.bin"), tmp.join("cache"));
    let r = get(
        relay.addr(),
        &md5,
        &out,
        &cache,
        &["--timeout", "40"],
        Duration::from_secs(60),
    );
    let stats = relay.stats();
    let ratio = stats.from_server_bytes as f64 / SIZE as f64;
    println!(
        "{name}: exit {:?} in {:.2} s, {} re-mapping(s) at {rebind_at:?}; the server sent {:.3}x the object ({} B to dropped mappings); {}",
        r.status.code(),
        r.elapsed.as_secs_f64(),
        stats.rebinds,
        ratio,
        stats.to_dead_mappings,
        r.stderr.trim()
    );
    assert!(r.status.success(), "{r:?}");
    assert_eq!(
        stats.rebinds,
        rebind_at.len() as u64,
        "the relay did not re-map as planned: {stats:?}"
    );
    assert_file_eq(&out, &data);
    assert_cache_done(&cache, &md5, &data);
    // Migration costs what was in flight to the old mapping; a fallback restart also the
    // offer exchange and what the old transfer sent into the dead mapping until it gave up.
    let limit = if eat_path_challenges { 1.25 } else { 1.1 };
    assert!(
        ratio <= limit,
        "the server sent {ratio:.3}x the object: {stats:?}"
    );
    r
}

/// The case: one re-mapping once 3 MB were delivered.
#[test]
fn a_download_survives_a_nat_rebinding() {
    let r = download_through_rebinding("rebind-once", vec![3_000_000], false);
    assert!(!r.stderr.contains("started over"), "{r:?}");
}

/// Two re-mappings in one download.
#[test]
fn a_download_survives_two_nat_rebindings() {
    download_through_rebinding("rebind-twice", vec![3_000_000, 6_000_000], false);
}

/// Migration cannot work (a middlebox eats the path challenges): the client notices the
/// silence, starts over on a new connection from its new address resuming what it holds (not
/// from zero), and says so.
#[test]
fn a_download_falls_back_to_a_resume_when_migration_fails() {
    let r = download_through_rebinding("rebind-eaten", vec![3_000_000], true);
    assert!(
        r.stderr.contains("started over 1 time(s)"),
        "the summary does not say it started over: {r:?}"
    );
}
