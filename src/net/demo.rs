//! The demo `udpferry demo` runs: a generated map served and fetched in one process over real
//! loopback sockets, the whole path a game's client and server take.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::{Client, FetchError, FetchOptions, Report, Server, ServerConfig};
use crate::id::ObjectId;
use crate::store::{ContentStore, StoreError};

/// What [`loopback_demo`] did: the server's address and the client's report. Displays as the
/// lines `udpferry demo` prints.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// Where the server listened.
    pub server: std::net::SocketAddr,
    /// The fetch of the map, verified.
    pub report: Report,
}

impl std::fmt::Display for DemoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = &self.report;
        let secs = r.duration.as_secs_f64();
        writeln!(
            f,
            "server: listening on {} (loopback, real UDP sockets)",
            self.server
        )?;
        writeln!(f, "verified: md5 {} matches ({})", r.object, r.path.display())?;
        writeln!(f, "size:            {} bytes", r.size)?;
        writeln!(f, "duration:        {secs:.2} s")?;
        writeln!(
            f,
            "goodput:         {:.2} MB/s",
            r.size as f64 / secs.max(1e-9) / 1e6
        )?;
        writeln!(f, "received:        {} datagrams", r.stats.datagrams_received)?;
        write!(
            f,
            "retransmissions: {} duplicate chunks arrived",
            r.stats.duplicate_chunks
        )
    }
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

/// A directory removed when dropped: on success, on error, on a panic's unwinding, and after
/// a stop (which ends the demo's download rather than the process).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a `len`-byte map made from `seed` into a temporary directory, serves it on
/// 127.0.0.1 with a [`Server`] on its own thread, fetches it by its MD5 with a [`Client`]
/// into a cache beside it, and removes the directory again. `on_map` is told the map's id
/// before the download starts; `stop` ends the download early ([`FetchError::Stopped`]).
pub fn loopback_demo(
    len: usize,
    seed: u64,
    stop: Option<Arc<AtomicBool>>,
    on_map: impl FnOnce(ObjectId),
) -> Result<DemoReport, FetchError> {
    let dir = TempDir(std::env::temp_dir().join(format!("udpferry-demo-{}", std::process::id())));
    let maps = dir.0.join("maps");
    let create = |path: &Path, what| {
        std::fs::create_dir_all(path).map_err(|e| StoreError::io(what, path, e))
    };
    create(&maps, "create directory")?;
    let map = demo_map(len, seed);
    let id = ObjectId::md5_of(&map);
    let file = maps.join("demo.map");
    std::fs::write(&file, &map).map_err(|e| StoreError::io("write", &file, e))?;
    drop(map);
    on_map(id);
    let store = ContentStore::open(&maps)?;
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let server = Server::bind(loopback, store, ServerConfig::default())?.spawn()?;
    let options = FetchOptions {
        stop,
        ..FetchOptions::default()
    };
    let client = Client::new(dir.0.join("cache"))?;
    let report = client.fetch(server.local_addr(), id, &options, |_| {})?;
    Ok(DemoReport {
        server: server.local_addr(),
        report,
    })
}
