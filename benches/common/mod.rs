//! Pieces every bench binary needs: the smoke flag, scratch directories, served files, the JSON
//! report's place, and (in `processes`) the real binaries as child processes. Included by the
//! root benches (`mod common;`) and by the peer comparison (`#[path = "../common/mod.rs"]`);
//! each bench uses only part of it.
#![allow(dead_code)]

pub mod processes;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// True for a quick check that everything runs (`-- --smoke` or `UDPFERRY_BENCH_SMOKE=1`), not
/// a measurement. `cargo bench` passes `--bench` too; every other argument is ignored.
pub fn smoke() -> bool {
    std::env::args().any(|a| a == "--smoke")
        || std::env::var("UDPFERRY_BENCH_SMOKE").is_ok_and(|v| v == "1")
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A scratch directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> io::Result<Self> {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("udpferry-bench-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `data` at `path` as a served map is: dated back a minute. A file written moments ago
/// is hashed again once it settles (its timestamps cannot yet be trusted, see ContentStore); a
/// served map is older than that, and the timed runs measure serving, not hashing.
pub fn put_served(path: &Path, data: &[u8]) -> io::Result<()> {
    std::fs::write(path, data)?;
    let a_minute_ago = SystemTime::now() - Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(a_minute_ago))
}

/// Writes a bench's JSON report as `$CARGO_TARGET_DIR/NAME`, or into the workspace's `target/`
/// (a bench runs in its own package's directory), where scripts/benchmarks.sh reads it.
pub fn write_report(name: &str, json: &str) {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
            while !dir.join("Cargo.lock").is_file() && dir.pop() {}
            dir.join("target")
        });
    let path = target.join(name);
    match std::fs::create_dir_all(&target).and_then(|_| std::fs::write(&path, json)) {
        Ok(()) => eprintln!("wrote {}", path.display()),
        Err(e) => eprintln!("could not write {}: {e}", path.display()),
    }
}
