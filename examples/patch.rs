//! A map patch: the server has version 2 of a 16 MiB map, the player still has version 1. With
//! `FetchOptions::bases` pointing at version 1, the client fetches version 2's manifest, copies
//! every block it already has (wherever it moved to) and downloads only the rest. The example
//! fetches version 2 twice, without and with the old file, and prints what the server sent.
//!
//! ```text
//! cargo run --release --example patch
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use udpferry::ContentStore;
use udpferry::ObjectId;
use udpferry::{Client, FetchOptions, Server, ServerConfig};
use udpferry_sim::Rng;

const MIB: usize = 1 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("udpferry-patch-example-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let result = run(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    // Version 1, and version 2: 100 bytes inserted near the start (everything after shifts),
    // 4 KiB rewritten in the middle, 10 KiB of new entities appended.
    let mut v1 = vec![0u8; 16 * MIB];
    Rng::new(1).fill_bytes(&mut v1);
    let mut v2 = v1.clone();
    v2.splice(3000..3000, std::iter::repeat_n(7u8, 100));
    v2[8 * MIB..8 * MIB + 4096].fill(9);
    v2.extend(std::iter::repeat_n(5u8, 10 * 1024));
    let id = ObjectId::md5_of(&v2);

    let served = dir.join("server/maps");
    std::fs::create_dir_all(&served)?;
    write_old(&served.join("harbour.bsp"), &v2)?;
    let old = dir.join("player/harbour-v1.bsp");
    std::fs::create_dir_all(dir.join("player"))?;
    std::fs::write(&old, &v1)?;

    let server = Server::bind(
        "127.0.0.1:0".parse()?,
        ContentStore::open(dir.join("server"))?,
        ServerConfig::default(),
    )?
    .spawn()?;
    let addr = server.local_addr();

    let mut sent_before = 0;
    for (label, bases) in [("without v1", vec![]), ("with v1", vec![old.clone()])] {
        let client = Client::new(dir.join(format!("player/cache-{}", bases.len())))?;
        let options = FetchOptions {
            bases,
            output: Some(dir.join(format!("player/harbour-{}.bsp", label.replace(' ', "-")))),
            ..FetchOptions::default()
        };
        let report = client.fetch(addr, id, &options, |_| {})?;
        std::thread::sleep(Duration::from_millis(100));
        let now = server.bytes_sent();
        let this = now - sent_before;
        sent_before = now;
        println!(
            "{label:>10}: {} bytes verified in {:.2} s; reused {:>8} bytes locally; server sent {:>8} bytes ({:.2}% of the map)",
            report.size,
            report.duration.as_secs_f64(),
            report.reused_bytes,
            this,
            100.0 * this as f64 / report.size as f64
        );
        let out: PathBuf = options.output.unwrap_or_default();
        assert_eq!(
            std::fs::read(out)?,
            v2,
            "the result is version 2, byte for byte"
        );
    }
    server.stop()?;
    Ok(())
}

/// Writes a served file dated a minute back, as a map that is not being written right now.
fn write_old(path: &Path, data: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, data)?;
    std::fs::File::options()
        .write(true)
        .open(path)?
        .set_modified(SystemTime::now() - Duration::from_secs(60))
}
