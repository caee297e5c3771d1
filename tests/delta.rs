//! Delta downloads over loopback: a client that holds an older version of a map fetches the
//! new one's manifest, copies the blocks it already has and downloads only the rest.

mod common;

use common::{object, put_dated, Serving, TempDir};
use std::time::Duration;

use udpferry::net::{Client, FetchOptions};
use udpferry::ObjectId;

const MIB: usize = 1 << 20;

/// The figure: 16 MiB v1; v2 = v1 with 100 bytes inserted near the start (shifting
/// everything after), 4 KiB overwritten in the middle and 10 KiB appended. The server sends at
/// most 2% of 16 MiB (manifest, replies and data together).
#[test]
fn a_client_with_the_old_version_fetches_under_two_percent_of_the_new() {
    let tmp = TempDir::new("figure");
    let v1 = object(16 * MIB, 1);
    let mut v2 = v1.clone();
    v2.splice(3000..3000, object(100, 2));
    let middle = 8 * MIB;
    v2[middle..middle + 4096].copy_from_slice(&object(4096, 3));
    v2.extend_from_slice(&object(10 * 1024, 4));
    let id = ObjectId::md5_of(&v2);
    put_dated(&tmp.join("served/maps/level.bsp"), &v2);
    let old = tmp.join("old/level.bsp");
    put_dated(&old, &v1);

    let server = Serving::dir(&tmp.join("served"));
    std::fs::create_dir_all(tmp.join("new")).unwrap();
    let client = Client::new(tmp.join("cache")).unwrap();
    let options = FetchOptions {
        output: Some(tmp.join("new/level.bsp")),
        bases: vec![old],
        timeout: Some(Duration::from_secs(60)),
        ..FetchOptions::default()
    };
    let report = client.fetch(server.addr, id, &options, |_| {}).unwrap();
    let sent = server.sent();
    assert_eq!(std::fs::read(tmp.join("new/level.bsp")).unwrap(), v2);
    let limit = (16 * MIB) as u64 / 50;
    println!(
        "delta: object {} bytes, reused {} bytes from v1, server sent {} bytes = {:.3}% of 16 MiB (limit 2%)",
        v2.len(),
        report.reused_bytes,
        sent,
        100.0 * sent as f64 / (16 * MIB) as f64
    );
    assert!(
        sent <= limit,
        "server sent {sent} bytes, more than 2% ({limit})"
    );
    assert!(report.reused_bytes > v2.len() as u64 * 9 / 10);
}

/// A base with nothing in common costs the manifest and changes nothing else; the output file
/// that already holds the exact object is used as a base without being named.
#[test]
fn unrelated_bases_fall_back_and_an_existing_output_is_reused() {
    let tmp = TempDir::new("fallback");
    let v = object(3 * MIB + 5, 9);
    let id = ObjectId::md5_of(&v);
    put_dated(&tmp.join("served/a.map"), &v);
    let junk = tmp.join("junk.bin");
    put_dated(&junk, &object(2 * MIB, 10));
    let server = Serving::dir(&tmp.join("served"));

    let client = Client::new(tmp.join("cache1")).unwrap();
    let options = FetchOptions {
        bases: vec![junk, tmp.join("does-not-exist")],
        output: Some(tmp.join("out1.map")),
        ..FetchOptions::default()
    };
    let report = client.fetch(server.addr, id, &options, |_| {}).unwrap();
    assert_eq!(report.reused_bytes, 0);
    assert_eq!(std::fs::read(tmp.join("out1.map")).unwrap(), v);
    let full = server.sent();
    assert!(full >= v.len() as u64, "the whole object was sent: {full}");

    // Same object again into a fresh cache, with the output already in place: only the
    // manifest and the short last block travel.
    let client = Client::new(tmp.join("cache2")).unwrap();
    let options = FetchOptions {
        output: Some(tmp.join("out1.map")),
        ..FetchOptions::default()
    };
    let report = client.fetch(server.addr, id, &options, |_| {}).unwrap();
    let second = server.sent() - full;
    assert_eq!(std::fs::read(tmp.join("out1.map")).unwrap(), v);
    assert!(report.reused_bytes >= v.len() as u64 - 4096, "{report:?}");
    assert!(
        second < v.len() as u64 / 50,
        "second fetch sent {second} bytes"
    );
}

/// Blocks copied from a base are journaled like received ones: a delta download interrupted
/// right after the copy (here stopped at its first progress report) resumes without the base
/// and still fetches only what changed.
#[test]
fn an_interrupted_delta_download_resumes_from_its_journal() {
    let tmp = TempDir::new("resume");
    let v1 = object(4 * MIB, 5);
    let mut v2 = v1.clone();
    v2.splice(777..777, object(50, 6));
    // 64 KiB of new bytes at 64 KiB/s: the download runs long enough to be stopped.
    v2.extend(object(64 << 10, 7));
    let id = ObjectId::md5_of(&v2);
    put_dated(&tmp.join("served/m.bsp"), &v2);
    let old = tmp.join("old.bsp");
    put_dated(&old, &v1);
    let mut config = udpferry::net::ServerConfig::default();
    config.endpoint.rate_limit_bytes_per_sec = 64 << 10;
    let server = Serving::start(
        udpferry::store::ContentStore::open(tmp.join("served")).unwrap(),
        config,
    );

    let client = Client::new(tmp.join("cache")).unwrap();
    let mut options = FetchOptions {
        bases: vec![old],
        ..FetchOptions::default()
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    options.stop = Some(stop.clone());
    let first = client.fetch(server.addr, id, &options, |_| {
        stop.store(true, std::sync::atomic::Ordering::Relaxed)
    });
    assert!(
        matches!(first, Err(udpferry::net::FetchError::Stopped)),
        "{first:?}"
    );
    let after_manifest = server.sent();

    let client = Client::new(tmp.join("cache")).unwrap();
    let options = FetchOptions {
        output: Some(tmp.join("m.out")),
        ..FetchOptions::default()
    };
    let report = client.fetch(server.addr, id, &options, |_| {}).unwrap();
    let second = server.sent() - after_manifest;
    assert_eq!(std::fs::read(tmp.join("m.out")).unwrap(), v2);
    assert!(
        report.resumed_bytes > v2.len() as u64 * 9 / 10,
        "resumed from the copied blocks: {report:?}"
    );
    assert!(
        second < v2.len() as u64 / 50,
        "second run sent {second} bytes"
    );
}
