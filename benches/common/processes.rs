//! Contenders that run what users run (issue 14): the real `udpferry` binary (`serve`, then one
//! `get -o` process per run) and an HTTP server with `curl -o` and `md5sum`, each timed from
//! process start to exit. The binary is the one `UDPFERRY_BIN` names (scripts/benchmarks.sh and
//! .ci/run build the release binary and set it); without it these contenders are not run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// The `udpferry` binary to run, from `UDPFERRY_BIN`.
pub fn udpferry_bin() -> Result<PathBuf, String> {
    std::env::var_os("UDPFERRY_BIN")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .ok_or_else(|| {
            "not run: set UDPFERRY_BIN to the release binary (scripts/benchmarks.sh does)".into()
        })
}

/// A child process, killed when dropped.
pub struct Proc(Child);

impl Proc {
    /// Starts `command` with no input and its output thrown away.
    pub fn quiet(mut command: Command) -> std::io::Result<Proc> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(Proc)
    }

    /// The process id, for `/proc/PID/...`.
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.0.wait()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `command` with its stdout piped and returns it with the first stdout line for which
/// `ready` gives a value; stdout is drained afterwards so the process never blocks on it.
fn start_until<T>(
    mut command: Command,
    what: &str,
    ready: impl Fn(&str) -> Option<T>,
) -> Result<(Proc, T), String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("not run: cannot start {what}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let proc = Proc(child);
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.map_err(|e| e.to_string())?;
        if let Some(found) = ready(&line) {
            thread::spawn(move || lines.for_each(drop));
            return Ok((proc, found));
        }
    }
    Err(format!("{what} exited before it was ready"))
}

/// `udpferry serve DIR --listen 127.0.0.1:0 --list`, and the address it printed. `--list`
/// indexes DIR before listening, so a run starts with every file known.
pub fn udpferry_serve(bin: &Path, dir: &Path) -> Result<(Proc, String), String> {
    let mut command = Command::new(bin);
    command
        .arg("serve")
        .arg(dir)
        .args(["--listen", "127.0.0.1:0", "--list"]);
    start_until(command, "udpferry serve", |line| {
        line.strip_prefix("listening on ").map(str::to_string)
    })
}

/// `python3 -m http.server` over `dir` on 127.0.0.1, and its base URL.
pub fn http_serve(dir: &Path) -> Result<(Proc, String), String> {
    let mut command = Command::new("python3");
    command
        .args([
            "-u",
            "-m",
            "http.server",
            "0",
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(dir);
    start_until(command, "python3 -m http.server", |line| {
        // "Serving HTTP on 127.0.0.1 port 40123 (http://127.0.0.1:40123/) ..."
        let port = line.split(" port ").nth(1)?.split_whitespace().next()?;
        Some(format!("http://127.0.0.1:{port}"))
    })
}

static RUN: AtomicU64 = AtomicU64::new(0);

/// One `udpferry get ADDR ID -o OUT --cache CACHE` into a fresh cache under `scratch`: seconds
/// from spawn to exit. The process verifies the object; its exit status and the output's size
/// are checked here.
pub fn udpferry_get(
    bin: &Path,
    addr: &str,
    id: &str,
    scratch: &Path,
    size: usize,
) -> Result<f64, String> {
    udpferry_get_within(bin, addr, id, scratch, size, None)?
        .ok_or_else(|| "udpferry get did not finish".to_string())
}

/// [`udpferry_get`], killed once `cap` has passed: `None` then.
pub fn udpferry_get_within(
    bin: &Path,
    addr: &str,
    id: &str,
    scratch: &Path,
    size: usize,
    cap: Option<Duration>,
) -> Result<Option<f64>, String> {
    let n = RUN.fetch_add(1, Ordering::Relaxed);
    let cache = scratch.join(format!("cache-{n}"));
    let out = scratch.join(format!("out-{n}"));
    let start = Instant::now();
    let mut child = Command::new(bin)
        .args(["get", addr, id, "-o"])
        .arg(&out)
        .arg("--cache")
        .arg(&cache)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let status = match cap {
        // No time limit: wait in the kernel, so the time measured is not rounded to a poll.
        None => Some(child.wait().map_err(|e| e.to_string())?),
        Some(cap) => loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                break Some(status);
            }
            if start.elapsed() >= cap {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            thread::sleep(Duration::from_millis(2));
        },
    };
    let secs = start.elapsed().as_secs_f64();
    let len = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    let _ = std::fs::remove_dir_all(&cache);
    let _ = std::fs::remove_file(&out);
    let Some(status) = status else {
        return Ok(None);
    };
    if !status.success() || len != size as u64 {
        return Err(format!(
            "udpferry get failed: {status}, {len} bytes written"
        ));
    }
    Ok(Some(secs))
}

/// One `curl -o OUT URL` followed by `md5sum OUT` (what a user without udpferry runs to get a
/// verified file): seconds from the first spawn to the second exit. The digest is compared with
/// `expected_hex`.
pub fn curl_md5sum(url: &str, scratch: &Path, expected_hex: &str) -> Result<f64, String> {
    let n = RUN.fetch_add(1, Ordering::Relaxed);
    let out = scratch.join(format!("curl-{n}"));
    let start = Instant::now();
    let fetched = Command::new("curl")
        .args(["-s", "-f", "-o"])
        .arg(&out)
        .arg(url)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("not run: cannot start curl: {e}"))?;
    let summed = Command::new("md5sum")
        .arg(&out)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("not run: cannot start md5sum: {e}"))?;
    let secs = start.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&out);
    let digest = String::from_utf8_lossy(&summed.stdout);
    if !fetched.success() || digest.split_whitespace().next() != Some(expected_hex) {
        return Err(format!("curl + md5sum failed: {fetched}, digest {digest}"));
    }
    Ok(secs)
}
