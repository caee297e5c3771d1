//! The `udpferry` binary as tests drive it: guarded child processes, `serve` and `get` runs, and
//! readers for what they print and leave in the cache.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use md5::{Digest, Md5};

/// The binary under test: cargo's `CARGO_BIN_EXE_udpferry`, unless the environment variable
/// `UDPFERRY_BIN` names another. Checkouts (git worktrees) that share one target directory
/// overwrite each other's build there (cargo names a workspace member's artifacts by its path
/// relative to the workspace), so copy this checkout's binary elsewhere right after building
/// it and point `UDPFERRY_BIN` at the copy.
pub static BIN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    std::env::var("UDPFERRY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_udpferry").into())
});
pub const MIB: usize = 1 << 20;

/// Deterministic bytes from splitmix64.
pub fn content(size: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut out = vec![0u8; size];
    for chunk in out.chunks_mut(8) {
        let v = next().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    out
}

pub fn md5_hex(bytes: &[u8]) -> String {
    Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes `bytes` at `dir/rel` (creating parents) and returns its MD5 in hex.
pub fn put_file(dir: &Path, rel: &str, bytes: &[u8]) -> String {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    md5_hex(bytes)
}

/// Collects everything a pipe delivers, in a thread, into a shared string.
pub fn collect(
    mut pipe: impl Read + Send + 'static,
) -> (Arc<Mutex<String>>, thread::JoinHandle<()>) {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    let handle = thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => sink
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    });
    (text, handle)
}

/// A child process that is killed (SIGKILL) and reaped when dropped, unless it already exited.
/// Its stderr is collected in the background for assertions and diagnostics.
pub struct Proc {
    pub child: Child,
    pub stderr: Arc<Mutex<String>>,
}

impl Proc {
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.child.id());
    }

    /// Waits for the process to exit, at most `limit` (a guard against hangs, not a timing test).
    pub fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `udpferry serve DIR --listen 127.0.0.1:0 EXTRA...` and reads its stdout until the
/// `listening on ADDR` line (at most 20 s). Returns the guarded process, the address and the
/// lines printed before it (the `--list` output).
pub fn spawn_server(dir: &Path, extra: &[&str]) -> (Proc, SocketAddr, Vec<String>) {
    spawn_server_with(Command::new(&*BIN), dir, extra)
}

/// [`spawn_server`] through `command`, which must run the binary with the arguments appended
/// (`Command::new(BIN)`, or a wrapper such as `setpriv ... BIN`).
pub fn spawn_server_with(
    mut command: Command,
    dir: &Path,
    extra: &[&str],
) -> (Proc, SocketAddr, Vec<String>) {
    let mut child = command
        .arg("serve")
        .arg(dir)
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn udpferry serve");
    let stdout = child.stdout.take().unwrap();
    let (stderr, _) = collect(child.stderr.take().unwrap());
    let server = Proc { child, stderr };

    let (tx, rx) = mpsc::channel::<String>();
    thread::spawn(move || {
        // Keeps draining stdout after `listening on` so the server can never block on it.
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                // Receiver gone: keep draining silently.
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut before = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let addr: SocketAddr = addr
                        .trim()
                        .parse()
                        .unwrap_or_else(|e| panic!("cannot parse the address in {line:?}: {e}"));
                    assert_ne!(addr.port(), 0, "the server must print the port it picked");
                    return (server, addr, before);
                }
                before.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                "no `listening on` line within 20 s; stdout so far: {before:?}; stderr: {}",
                server.stderr()
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Stdout closed: the server exited. Give stderr a moment to arrive.
                thread::sleep(Duration::from_millis(200));
                panic!(
                    "server exited before listening; stdout: {before:?}; stderr: {}",
                    server.stderr()
                )
            }
        }
    }
}

/// What a finished `udpferry` run produced.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    /// Non-empty stderr lines.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status {:?} after {:.2} s\n--- stdout\n{}--- stderr\n{}---",
            self.status,
            self.elapsed.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }
}

/// Starts `udpferry ARGS...` with piped output (stderr is therefore not a terminal).
pub fn spawn(args: &[&std::ffi::OsStr]) -> (Proc, Arc<Mutex<String>>, Vec<thread::JoinHandle<()>>) {
    let mut child = Command::new(&*BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn udpferry");
    let (stdout, h1) = collect(child.stdout.take().unwrap());
    let (stderr, h2) = collect(child.stderr.take().unwrap());
    (Proc { child, stderr }, stdout, vec![h1, h2])
}

/// Runs `udpferry ARGS...` to completion; panics (after killing it) if it takes longer than
/// `limit`, which is only a guard against hangs.
pub fn run(args: &[&std::ffi::OsStr], limit: Duration) -> Run {
    let started = Instant::now();
    let (mut proc, stdout, readers) = spawn(args);
    let status = proc.wait_for(limit);
    let Some(status) = status else {
        let stderr = proc.stderr();
        drop(proc);
        panic!(
            "udpferry {:?} did not finish within {limit:?}; stderr so far: {stderr}",
            args
        );
    };
    let elapsed = started.elapsed();
    for h in readers {
        let _ = h.join();
    }
    let stdout = stdout.lock().unwrap().clone();
    Run {
        status,
        stdout,
        stderr: proc.stderr(),
        elapsed,
    }
}

pub fn os(s: &str) -> &std::ffi::OsStr {
    s.as_ref()
}

/// `udpferry get SERVER MD5 -o OUT --cache CACHE EXTRA...`.
pub fn get(
    server: SocketAddr,
    md5: &str,
    out: &Path,
    cache: &Path,
    extra: &[&str],
    limit: Duration,
) -> Run {
    let server = server.to_string();
    let mut args: Vec<&std::ffi::OsStr> = vec![
        os("get"),
        os(&server),
        os(md5),
        os("-o"),
        out.as_os_str(),
        os("--cache"),
        cache.as_os_str(),
    ];
    args.extend(extra.iter().map(|s| os(s)));
    run(&args, limit)
}

/// Names of the entries of `dir`, sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Asserts the cache holds exactly the finished object `md5` and nothing in progress.
pub fn assert_cache_done(cache: &Path, md5: &str, expected: &[u8]) {
    let names = entries(cache);
    assert!(
        names.iter().any(|n| n == md5),
        "cache lacks {md5}: {names:?}"
    );
    for n in &names {
        assert!(
            !n.ends_with(".part") && !n.contains(".journal"),
            "download leftovers in the cache: {names:?}"
        );
    }
    let cached = std::fs::read(cache.join(md5)).unwrap();
    assert!(cached == expected, "the cached object's bytes differ");
}

/// Asserts the file at `path` holds exactly `expected` (without printing 64 MiB on failure).
pub fn assert_file_eq(path: &Path, expected: &[u8]) {
    let got = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert_eq!(
        got.len(),
        expected.len(),
        "{} has the wrong size",
        path.display()
    );
    assert!(got == expected, "{} has the wrong bytes", path.display());
    assert_eq!(md5_hex(&got), md5_hex(expected));
}

/// The MB/s figure of a summary line `... (12.34 MB/s) ...`.
pub fn goodput(summary: &str) -> Option<f64> {
    let end = summary.find(" MB/s)")?;
    let start = summary[..end].rfind('(')? + 1;
    summary[start..end].parse().ok()
}

/// N in `resumed from N bytes`.
pub fn resumed_bytes(summary: &str) -> Option<u64> {
    let rest = &summary[summary.find("resumed from ")? + "resumed from ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// Bytes a resume journal vouches for (format in src/store/journal.rs: magic, alg, 16-byte
/// digest, u64 size, u32 count, count * (u64 start, u64 end), crc32; big-endian). `None` if the
/// file is missing or not (yet) a complete journal.
pub fn journal_covered(path: &Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.len() < 37 || &bytes[..4] != b"UFJ1" {
        return None;
    }
    let count = u32::from_be_bytes(bytes[29..33].try_into().unwrap()) as usize;
    if bytes.len() != 33 + count * 16 + 4 {
        return None;
    }
    let mut covered = 0u64;
    for r in bytes[33..33 + count * 16].chunks_exact(16) {
        let start = u64::from_be_bytes(r[..8].try_into().unwrap());
        let end = u64::from_be_bytes(r[8..].try_into().unwrap());
        covered += end.saturating_sub(start);
    }
    Some(covered)
}

/// Asserts a failed run: non-zero exit, exactly one stderr line, containing one of `causes`.
pub fn assert_fails_with(run: &Run, causes: &[&str], what: &str) {
    assert!(
        !run.status.success(),
        "{what}: expected failure, got {run:?}"
    );
    let lines = run.stderr_lines();
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected one line on stderr, got {run:?}"
    );
    assert!(
        causes.iter().any(|c| lines[0].contains(c)),
        "{what}: stderr should name the cause ({causes:?}), got {run:?}"
    );
}

pub const GET_LIMIT: Duration = Duration::from_secs(180);
