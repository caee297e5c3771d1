#![cfg(unix)]

//! `serve` follows its directory (issue 13): new, changed and removed files and bundles are
//! served without a restart (a periodic stat-only rescan, and SIGHUP at once); changed files
//! are hashed in the background, never under a request; an unreadable file is skipped with a
//! warning instead of stopping the server.
//!
//! The CLI tests drive the real `udpferry serve` and `udpferry get`. Nothing here asserts a
//! duration: every wait polls with a generous deadline that only guards against hangs.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use udpferry::store::bundle::{Bundle, BundleEntry};
use udpferry::store::SafePath;
use udpferry::ObjectId;

mod common;
use common::cli::*;
use common::TempDir;

/// How long a change may take to show (a guard against hangs on a loaded machine, not a
/// timing assertion: the default rescan runs every 2 s).
const DEADLINE: Duration = Duration::from_secs(60);

/// Calls `f` every 100 ms until it returns `Some`, for at most `limit`.
fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the server's stderr holds a line equal to `line` (or starting with it, when
/// `line` ends with `*`); panics with the stderr after [`DEADLINE`].
fn wait_for_line(server: &Proc, line: &str) {
    let found = poll(DEADLINE, || {
        let err = server.stderr();
        err.lines()
            .any(|l| match line.strip_suffix('*') {
                Some(prefix) => l.starts_with(prefix),
                None => l == line,
            })
            .then_some(())
    });
    assert!(
        found.is_some(),
        "no line {line:?} on the server's stderr within {DEADLINE:?}; stderr:\n{}",
        server.stderr()
    );
}

/// How many lines of the server's stderr start with `prefix`.
fn count_lines(server: &Proc, prefix: &str) -> usize {
    server
        .stderr()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .count()
}

/// One `udpferry get` with a fresh cache and a short timeout.
fn get_once(tmp: &TempDir, addr: SocketAddr, md5: &str, n: &mut u32) -> Run {
    *n += 1;
    get(
        addr,
        md5,
        &tmp.join(&format!("out{n}")),
        &tmp.join(&format!("cache{n}")),
        &["--timeout", "20"],
        GET_LIMIT,
    )
}

/// Gets `md5` again and again (a fresh cache each time) until one succeeds, within
/// [`DEADLINE`]; returns the output path.
fn get_eventually(tmp: &TempDir, addr: SocketAddr, md5: &str, n: &mut u32) -> std::path::PathBuf {
    let mut last = None;
    let ok = poll(DEADLINE, || {
        let r = get_once(tmp, addr, md5, n);
        if r.status.success() {
            return Some(tmp.join(&format!("out{n}")));
        }
        last = Some(r);
        thread::sleep(Duration::from_millis(200));
        None
    });
    ok.unwrap_or_else(|| panic!("{md5} was never served within {DEADLINE:?}; last get: {last:?}"))
}

/// The id of a bundle listing these `(path, bytes)` files.
fn bundle_id(files: &[(&str, &[u8])]) -> ObjectId {
    let bundle = Bundle::build(
        files
            .iter()
            .map(|(p, b)| BundleEntry {
                path: SafePath::parse(p).unwrap(),
                size: b.len() as u64,
                id: ObjectId::md5_of(b),
            })
            .collect(),
    )
    .unwrap();
    Bundle::id(&bundle.encode())
}

/// Writes `bytes` at `path` and dates it a minute back (a map deployed earlier).
fn put_old(path: &Path, bytes: &[u8]) {
    common::put_dated(path, bytes);
}

#[test]
fn serve_picks_up_new_and_removed_files_and_bundles_without_a_restart() {
    let tmp = TempDir::new("follow-new");
    let dir = tmp.join("served");
    let a = content(50_000, 1);
    let a_md5 = put_file(&dir, "a.map", &a);
    let (server, addr, _) = spawn_server(&dir, &["-v"]);
    let mut n = 0;

    // A new file at the top: indexed, reported, served.
    let b = content(300_000, 2);
    let b_md5 = put_file(&dir, "b.map", &b);
    wait_for_line(&server, &format!("indexed {b_md5} {} b.map", b.len()));
    let r = get_once(&tmp, addr, &b_md5, &mut n);
    assert!(r.status.success(), "the new file is served at once: {r:?}");
    assert_file_eq(&tmp.join(&format!("out{n}")), &b);

    // A new top-level subdirectory: its file and its bundle.
    let c = content(20_000, 3);
    let c_md5 = put_file(&dir, "maps/c.map", &c);
    let maps = bundle_id(&[("c.map", &c)]);
    wait_for_line(&server, &format!("indexed {c_md5} {} maps/c.map", c.len()));
    wait_for_line(&server, &format!("indexed bundle {maps} 1 maps/"));
    let out = get_eventually(&tmp, addr, &c_md5, &mut n);
    assert_file_eq(&out, &c);

    // A second file in it changes the bundle's id.
    let d = content(10_000, 4);
    put_file(&dir, "maps/d.map", &d);
    let maps2 = bundle_id(&[("c.map", &c), ("d.map", &d)]);
    wait_for_line(&server, &format!("indexed bundle {maps2} 2 maps/"));

    // Removed: reported, and no longer served.
    fs::remove_file(dir.join("a.map")).unwrap();
    wait_for_line(&server, "removed a.map");
    let r = get_once(&tmp, addr, &a_md5, &mut n);
    assert_fails_with(&r, &["not found"], "a removed file");
    fs::remove_dir_all(dir.join("maps")).unwrap();
    wait_for_line(&server, "removed bundle maps/");
    wait_for_line(&server, "removed maps/c.map");
    assert!(
        !server.stderr().contains("udpferry serve:"),
        "no warnings for ordinary changes: {}",
        server.stderr()
    );
}

#[test]
fn serve_serves_a_changed_file_under_its_new_md5_and_not_its_old() {
    let tmp = TempDir::new("follow-changed");
    let dir = tmp.join("served");
    let old = content(400_000, 5);
    let old_md5 = md5_hex(&old);
    put_old(&dir.join("level.map"), &old);
    let (_server, addr, list) = spawn_server(&dir, &["--list"]);
    assert_eq!(
        list,
        vec![format!("object {old_md5} {} level.map", old.len())]
    );
    let mut n = 0;

    // Rewritten in place, same size: nobody asks for the old id first.
    let mut new = old.clone();
    new[1234] ^= 0x5a;
    let new_md5 = md5_hex(&new);
    fs::write(dir.join("level.map"), &new).unwrap();
    let out = get_eventually(&tmp, addr, &new_md5, &mut n);
    assert_file_eq(&out, &new);
    let r = get_once(&tmp, addr, &old_md5, &mut n);
    assert_fails_with(&r, &["not found"], "the old id of a changed file");

    // Replaced by a rename (the way deployments should do it).
    let newest = content(123_456, 6);
    let newest_md5 = md5_hex(&newest);
    fs::write(dir.join(".level.map.tmp"), &newest).unwrap();
    fs::rename(dir.join(".level.map.tmp"), dir.join("level.map")).unwrap();
    let out = get_eventually(&tmp, addr, &newest_md5, &mut n);
    assert_file_eq(&out, &newest);
    let r = get_once(&tmp, addr, &new_md5, &mut n);
    assert_fails_with(&r, &["not found"], "the previous id after a rename");
}

#[test]
fn sighup_rescans_at_once() {
    let tmp = TempDir::new("follow-hup");
    let dir = tmp.join("served");
    put_file(&dir, "a.map", &content(1000, 7));
    // Periodic rescans off: only SIGHUP (or a request for a file that changed) rescans.
    let (mut server, addr, _) = spawn_server(&dir, &["-v", "--rescan-interval", "0"]);
    let mut n = 0;

    let b = content(70_000, 8);
    let b_md5 = put_file(&dir, "b.map", &b);
    let r = get_once(&tmp, addr, &b_md5, &mut n);
    assert_fails_with(&r, &["not found"], "a new file before any rescan");

    server.signal("HUP");
    wait_for_line(&server, &format!("indexed {b_md5} {} b.map", b.len()));
    let r = get_once(&tmp, addr, &b_md5, &mut n);
    assert!(r.status.success(), "served after SIGHUP: {r:?}");
    assert_file_eq(&tmp.join(&format!("out{n}")), &b);

    // More signals (even in a burst) only rescan; the server keeps running.
    let c = content(5000, 9);
    let c_md5 = put_file(&dir, "c.map", &c);
    for _ in 0..3 {
        server.signal("HUP");
    }
    wait_for_line(&server, &format!("indexed {c_md5} {} c.map", c.len()));
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "SIGHUP must not end the server; stderr: {}",
        server.stderr()
    );
    server.signal("INT");
    let status = server.wait_for(Duration::from_secs(10)).expect("stops");
    assert!(status.success(), "{status:?}: {}", server.stderr());
}

#[test]
fn rescan_interval_flag_is_range_checked() {
    let tmp = TempDir::new("follow-flag");
    let dir = tmp.join("served");
    fs::create_dir_all(&dir).unwrap();
    for bad in ["-1", "soon", "NaN", "inf", "1e20"] {
        let flag = format!("--rescan-interval={bad}");
        let r = run(
            &[
                os("serve"),
                dir.as_os_str(),
                os("--listen"),
                os("127.0.0.1:0"),
                os(&flag),
            ],
            Duration::from_secs(30),
        );
        assert_eq!(r.status.code(), Some(2), "--rescan-interval {bad}: {r:?}");
        assert!(r.stderr.contains("rescan-interval"), "{r:?}");
    }
}

/// A command that runs the binary without the power to read a mode-000 file: the binary
/// itself when this process lacks that power, `setpriv` to user `nobody` when it has it
/// (root), or `None` when neither works.
fn unprivileged(tmp: &TempDir) -> Option<Command> {
    use std::os::unix::fs::PermissionsExt;
    let probe = tmp.join("probe");
    fs::write(&probe, b"x").unwrap();
    fs::set_permissions(&probe, fs::Permissions::from_mode(0o000)).unwrap();
    let privileged = fs::File::open(&probe).is_ok();
    fs::remove_file(&probe).unwrap();
    if !privileged {
        return Some(Command::new(&*BIN));
    }
    // nobody must reach the served directory.
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let setpriv = || {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            BIN.as_str(),
        ]);
        c
    };
    let works = setpriv()
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !works {
        println!("running as root without a working setpriv: mode-000 files are not tested");
    }
    works.then(setpriv)
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().expect("mkfifo");
    assert!(status.success());
}

#[test]
fn unreadable_entries_are_skipped_with_a_warning_and_serve_starts() {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let tmp = TempDir::new("follow-unreadable");
    let dir = tmp.join("served");
    let good = content(30_000, 10);
    let good_md5 = put_file(&dir, "good.map", &good);
    put_file(&dir, "secret.bin", b"mode 000");
    fs::set_permissions(dir.join("secret.bin"), fs::Permissions::from_mode(0o000)).unwrap();
    put_file(&dir, "locked/x.map", b"in a mode-000 directory");
    fs::set_permissions(dir.join("locked"), fs::Permissions::from_mode(0o000)).unwrap();
    // Entries that no process, root included, can serve: a FIFO (opening it would block), a
    // symbolic link to itself (ELOOP) and one to nothing.
    mkfifo(&dir.join("pipe"));
    symlink("loop", dir.join("loop")).unwrap();
    symlink("nowhere", dir.join("dangling")).unwrap();

    let restricted = unprivileged(&tmp);
    let real_permissions = restricted.is_some();
    let command = restricted.unwrap_or_else(|| Command::new(&*BIN));
    let (server, addr, _) = spawn_server_with(command, &dir, &[]);
    let mut n = 0;

    // One warning per entry, naming it, without -v.
    wait_for_line(
        &server,
        "udpferry serve: skipped pipe: it is a FIFO (named pipe)*",
    );
    wait_for_line(&server, "udpferry serve: skipped loop: *");
    wait_for_line(&server, "udpferry serve: skipped dangling: *");
    if real_permissions {
        wait_for_line(
            &server,
            "udpferry serve: skipped secret.bin: could not open it: Permission denied*",
        );
        wait_for_line(
            &server,
            "udpferry serve: skipped locked: could not read the directory: Permission denied*",
        );
    }
    let r = get_once(&tmp, addr, &good_md5, &mut n);
    assert!(r.status.success(), "the readable file is served: {r:?}");

    // Skipped while serving too.
    mkfifo(&dir.join("pipe2"));
    wait_for_line(&server, "udpferry serve: skipped pipe2: *");
    if real_permissions {
        put_file(&dir, "later.bin", b"readable at first");
        let later = md5_hex(b"readable at first");
        get_eventually(&tmp, addr, &later, &mut n);
        fs::set_permissions(dir.join("later.bin"), fs::Permissions::from_mode(0o000)).unwrap();
        wait_for_line(
            &server,
            "udpferry serve: skipped later.bin: could not open it: Permission denied*",
        );
        let r = get_once(&tmp, addr, &later, &mut n);
        assert_fails_with(&r, &["not found"], "a file that became unreadable");
    }
    // A file indexed after the warnings proves a later rescan walked past them all again:
    // each warning is printed once, not once per rescan.
    let after = content(2000, 11);
    let after_md5 = put_file(&dir, "after.map", &after);
    get_eventually(&tmp, addr, &after_md5, &mut n);
    for name in ["pipe", "pipe2", "loop", "dangling"] {
        assert_eq!(
            count_lines(&server, &format!("udpferry serve: skipped {name}: ")),
            1,
            "{name}: {}",
            server.stderr()
        );
    }
    assert!(
        !server.stderr().contains("indexed "),
        "changes are listed only with -v: {}",
        server.stderr()
    );
    // So that the temporary directory can be removed.
    let _ = fs::set_permissions(dir.join("locked"), fs::Permissions::from_mode(0o755));
}

#[test]
fn serve_fails_to_start_only_when_the_directory_itself_cannot_be_read() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = TempDir::new("follow-root");
    let missing = tmp.join("missing");
    let r = run(
        &[
            os("serve"),
            missing.as_os_str(),
            os("--listen"),
            os("127.0.0.1:0"),
        ],
        Duration::from_secs(30),
    );
    assert_fails_with(&r, &["No such file"], "a missing directory");

    let Some(mut command) = unprivileged(&tmp) else {
        return;
    };
    let closed = tmp.join("closed");
    put_file(&closed, "x.map", b"x");
    fs::set_permissions(&closed, fs::Permissions::from_mode(0o000)).unwrap();
    let out = command
        .args([
            os("serve"),
            closed.as_os_str(),
            os("--listen"),
            os("127.0.0.1:0"),
        ])
        .output()
        .unwrap();
    let _ = fs::set_permissions(&closed, fs::Permissions::from_mode(0o755));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("udpferry serve: could not read directory")
            && stderr.contains("Permission denied"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// The library: ContentStore's rescans and the Server that runs them
// ---------------------------------------------------------------------------------------------

use udpferry::{
    Client, ContentStore, FetchOptions, IndexChange, Server, ServerConfig, ServerReport,
};

fn info(store: &ContentStore, path: &str) -> udpferry::ObjectInfo {
    store
        .objects()
        .find(|o| o.path == Path::new(path))
        .unwrap_or_else(|| panic!("{path} is not indexed"))
        .clone()
}

fn lines(changes: &[IndexChange]) -> Vec<String> {
    changes.iter().map(ToString::to_string).collect()
}

#[test]
fn a_rescan_sees_new_changed_and_removed_files_and_hashes_nothing_else() {
    let tmp = TempDir::new("rescan-lib");
    let root = tmp.join("served");
    let (a, b, c) = (content(1000, 20), content(5000, 21), content(7000, 22));
    put_old(&root.join("a.map"), &a);
    put_old(&root.join("b.map"), &b);
    put_old(&root.join("maps/c.map"), &c);
    let mut store = ContentStore::open(&root).unwrap();
    assert_eq!(store.files_hashed(), 3);
    assert_eq!(store.skipped().count(), 0);
    let maps = store.bundles().next().unwrap().id;

    // Nothing changed: nothing reported, nothing read.
    assert_eq!(store.rescan().unwrap(), vec![]);
    assert_eq!(
        store.files_hashed(),
        3,
        "an unchanged file was hashed again"
    );

    // Removed, changed (new size), added at the top and in the bundle.
    fs::remove_file(root.join("a.map")).unwrap();
    let b2 = content(5001, 23);
    put_old(&root.join("b.map"), &b2);
    let d = content(300, 24);
    put_old(&root.join("maps/d.map"), &d);
    let e = content(400, 25);
    put_old(&root.join("new.map"), &e);
    let changes = store.rescan().unwrap();
    assert_eq!(
        store.files_hashed(),
        6,
        "exactly the three new or changed files"
    );
    let maps2 = bundle_id(&[("c.map", &c), ("d.map", &d)]);
    assert_eq!(
        lines(&changes),
        vec![
            "removed a.map".to_string(),
            format!("indexed {} 5001 b.map", ObjectId::md5_of(&b2)),
            format!("indexed {} 300 maps/d.map", ObjectId::md5_of(&d)),
            format!("indexed {} 400 new.map", ObjectId::md5_of(&e)),
            format!("indexed bundle {maps2} 2 maps/"),
        ]
    );
    assert_ne!(maps, maps2);
    assert!(matches!(&changes[1], IndexChange::Indexed(o) if *o == info(&store, "b.map")));
    assert!(store.get(&ObjectId::md5_of(&a)).is_none());
    assert!(store.get(&ObjectId::md5_of(&b)).is_none());
    assert_eq!(
        store.get(&ObjectId::md5_of(&b2)).unwrap().path,
        Path::new("b.map")
    );

    // Touched without a change of bytes: hashed again (its stamp moved), but nothing to report.
    fs::File::options()
        .write(true)
        .open(root.join("maps/c.map"))
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(120))
        .unwrap();
    assert_eq!(store.rescan().unwrap(), vec![]);
    assert_eq!(store.files_hashed(), 7);
    assert_eq!(store.rescan().unwrap(), vec![]);
    assert_eq!(store.files_hashed(), 7);

    // The whole bundle goes.
    fs::remove_dir_all(root.join("maps")).unwrap();
    assert_eq!(
        lines(&store.rescan().unwrap()),
        vec![
            "removed maps/c.map",
            "removed maps/d.map",
            "removed bundle maps/"
        ]
    );
    assert_eq!(store.bundles().count(), 0);
}

#[test]
fn a_file_hashed_right_after_a_write_is_hashed_once_more_when_it_settles() {
    let tmp = TempDir::new("rescan-racy");
    let root = tmp.join("served");
    let fresh = content(2000, 26);
    let written = Instant::now();
    put_file(&root, "fresh.map", &fresh);
    let mut store = ContentStore::open(&root).unwrap();
    assert_eq!(store.files_hashed(), 1);
    // Served at once on its stamp (requests never hash)...
    let id = ObjectId::md5_of(&fresh);
    assert!(store.open_object(&id).unwrap().is_some());
    assert_eq!(store.files_hashed(), 1);
    // ...and not re-hashed by rescans while its mtime is within the racy window (3 s; checked
    // only when this machine got here well within it)...
    store.rescan().unwrap();
    if written.elapsed() < Duration::from_millis(2500) {
        assert_eq!(store.files_hashed(), 1);
    } else {
        println!("too slow to check the racy window: {:?}", written.elapsed());
    }
    // ...but once after it, to settle it; then never again.
    thread::sleep(Duration::from_millis(3500));
    assert_eq!(
        store.rescan().unwrap(),
        vec![],
        "same bytes: nothing to report"
    );
    let settled = store.files_hashed();
    assert!(settled >= 2, "never hashed again to settle it");
    store.rescan().unwrap();
    assert_eq!(
        store.files_hashed(),
        settled,
        "hashed again after it settled"
    );
}

#[test]
fn a_background_rescan_replaces_a_changed_file_and_requests_never_hash() {
    let tmp = TempDir::new("rescan-bg");
    let root = tmp.join("served");
    let old = content(100_000, 27);
    put_old(&root.join("m.map"), &old);
    let mut store = ContentStore::open(&root).unwrap();
    let old_id = ObjectId::md5_of(&old);

    // Rewritten in place, same size, its mtime set to another old time.
    let mut new = old.clone();
    new[99_999] ^= 1;
    put_old(&root.join("m.map"), &new);
    let new_id = ObjectId::md5_of(&new);
    assert!(
        store.open_object(&old_id).unwrap().is_none(),
        "old id, new bytes"
    );
    assert!(
        store.open_object(&new_id).unwrap().is_none(),
        "not indexed yet"
    );
    assert_eq!(store.files_hashed(), 1, "a request hashed a file");
    assert!(store.needs_rescan());

    assert!(store.start_rescan().unwrap());
    assert!(!store.needs_rescan());
    assert!(store.rescanning());
    assert!(!store.start_rescan().unwrap(), "one rescan at a time");
    let mut changes = Vec::new();
    let finished = poll(DEADLINE, || {
        store.poll_rescan(|c| changes.push(c)).then_some(())
    });
    assert!(finished.is_some(), "the rescan never finished");
    assert!(!store.rescanning());
    assert!(
        !store.poll_rescan(|c| changes.push(c)),
        "nothing running any more"
    );
    assert_eq!(
        lines(&changes),
        vec![format!("indexed {new_id} 100000 m.map")]
    );
    assert_eq!(store.files_hashed(), 2);
    assert!(store.open_object(&old_id).unwrap().is_none());
    let (size, _) = store.open_object(&new_id).unwrap().unwrap();
    assert_eq!(size, 100_000);

    // Dropping a store with a rescan running stops it.
    put_old(&root.join("n.map"), &content(50 << 20, 28));
    assert!(store.start_rescan().unwrap());
    drop(store);
}

#[test]
fn entries_that_cannot_be_served_are_skipped_with_a_reason_once() {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let tmp = TempDir::new("rescan-skip");
    let root = tmp.join("served");
    let outside = tmp.join("outside.bin");
    fs::write(&outside, b"outside").unwrap();
    put_old(&root.join("good.map"), b"good");
    mkfifo(&root.join("pipe"));
    symlink("loop", root.join("loop")).unwrap();
    symlink("nowhere", root.join("dangling")).unwrap();
    symlink(&outside, root.join("out")).unwrap();
    symlink(".", root.join("here")).unwrap();
    put_old(&root.join("con.txt"), b"a Windows device name");
    put_old(&root.join("secret.bin"), b"mode 000");
    fs::set_permissions(root.join("secret.bin"), fs::Permissions::from_mode(0o000)).unwrap();
    let privileged = fs::File::open(root.join("secret.bin")).is_ok();

    let mut store = ContentStore::open(&root).unwrap();
    let skipped: Vec<String> = store.skipped().map(ToString::to_string).collect();
    let mut want = vec![
        "con.txt: its name cannot be served: *",
        "dangling: it is a symbolic link that cannot be followed: No such file or directory*",
        "here: it is a symbolic link to a directory (links to directories are not followed)",
        "loop: it is a symbolic link that cannot be followed: *",
        "out: it is a symbolic link to *, outside the served directory",
        "pipe: it is a FIFO (named pipe), not a regular file",
    ];
    if !privileged {
        want.push("secret.bin: could not open it: Permission denied*");
    }
    assert_eq!(skipped.len(), want.len(), "{skipped:#?}");
    for (got, want) in skipped.iter().zip(&want) {
        let ok = match want.split_once('*') {
            None => got == want,
            Some((head, tail)) => got.starts_with(head) && got.ends_with(tail),
        };
        assert!(ok, "{got:?} is not {want:?}");
    }
    let served: Vec<_> = store.objects().map(|o| o.path.clone()).collect();
    let mut expected = vec![Path::new("good.map").to_path_buf()];
    if privileged {
        expected.push("secret.bin".into());
    }
    assert_eq!(served, expected);

    // Known skips are not reported again.
    assert_eq!(store.rescan().unwrap(), vec![]);

    // One that goes is forgotten silently; a link whose target appears is served; a new FIFO
    // is reported.
    fs::remove_file(root.join("pipe")).unwrap();
    put_old(&root.join("nowhere"), b"now somewhere");
    mkfifo(&root.join("pipe2"));
    let changes = lines(&store.rescan().unwrap());
    let id = ObjectId::md5_of(b"now somewhere");
    assert_eq!(
        changes,
        vec![
            "skipped pipe2: it is a FIFO (named pipe), not a regular file".to_string(),
            format!("indexed {id} 13 dangling"),
            format!("indexed {id} 13 nowhere"),
        ]
    );
    assert!(store
        .skipped()
        .all(|s| s.path != Path::new("pipe") && s.path != Path::new("dangling")));
    assert!(store.skipped().any(|s| s.path == Path::new("pipe2")));
}

#[test]
fn a_rescan_that_cannot_read_the_root_keeps_the_index_and_says_so_once() {
    let tmp = TempDir::new("rescan-root");
    let root = tmp.join("served");
    put_old(&root.join("a.map"), b"a");
    let mut store = ContentStore::open(&root).unwrap();
    fs::rename(&root, tmp.join("moved")).unwrap();

    let run = |store: &mut ContentStore| {
        assert!(store.start_rescan().unwrap());
        let mut changes = Vec::new();
        poll(DEADLINE, || {
            store.poll_rescan(|c| changes.push(c)).then_some(())
        })
        .expect("the rescan never finished");
        changes
    };
    let changes = run(&mut store);
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(changes[0].is_warning());
    let line = changes[0].to_string();
    assert!(
        line.starts_with("rescan failed: could not read directory") && line.contains("served"),
        "{line}"
    );
    assert_eq!(run(&mut store), vec![], "reported once");
    assert!(store.rescan().is_err());
    assert_eq!(store.objects().count(), 1, "the index is kept");

    fs::rename(tmp.join("moved"), &root).unwrap();
    assert_eq!(run(&mut store), vec![]);
    fs::rename(&root, tmp.join("moved")).unwrap();
    assert_eq!(
        run(&mut store).len(),
        1,
        "a new failure after a success is reported"
    );
}

#[test]
fn a_server_follows_its_directory_and_reports_each_change() {
    let tmp = TempDir::new("rescan-server");
    let root = tmp.join("served");
    put_old(&root.join("a.map"), &content(1000, 30));
    let store = ContentStore::open(&root).unwrap();
    let config = ServerConfig {
        rescan_interval: None,
        ..ServerConfig::default()
    };
    let mut server = Server::bind("127.0.0.1:0".parse().unwrap(), store, config).unwrap();
    let addr = server.local_addr().unwrap();
    let rescan = server.rescan_flag();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reports = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let thread = {
        let (stop, reports) = (stop.clone(), reports.clone());
        thread::spawn(move || {
            server.run_with_reports(
                &stop,
                |_| {},
                Duration::from_secs(1),
                |r| {
                    if let ServerReport::Index(change) = r {
                        reports.lock().unwrap().push(change.to_string());
                    }
                },
            )
        })
    };
    let client = Client::new(tmp.join("cache")).unwrap();
    let options = FetchOptions {
        timeout: Some(Duration::from_secs(20)),
        ..FetchOptions::default()
    };

    // Periodic rescans are off: a new file is not served until asked for a rescan.
    let b = content(200_000, 31);
    put_old(&root.join("b.map"), &b);
    let b_id = ObjectId::md5_of(&b);
    let err = client.fetch(addr, b_id, &options, |_| {}).unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
    rescan.store(true, std::sync::atomic::Ordering::Relaxed);
    let want = format!("indexed {b_id} 200000 b.map");
    poll(DEADLINE, || {
        reports.lock().unwrap().contains(&want).then_some(())
    })
    .unwrap_or_else(|| panic!("no {want:?} in {:?}", reports.lock().unwrap()));
    let report = client.fetch(addr, b_id, &options, |_| {}).unwrap();
    assert_eq!(fs::read(&report.path).unwrap(), b);

    // A request for a file that changed starts a rescan by itself.
    let mut b2 = b.clone();
    b2[0] ^= 1;
    put_old(&root.join("b.map"), &b2);
    let b2_id = ObjectId::md5_of(&b2);
    let cache2 = Client::new(tmp.join("cache2")).unwrap();
    let err = cache2.fetch(addr, b_id, &options, |_| {}).unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
    let want = format!("indexed {b2_id} 200000 b.map");
    poll(DEADLINE, || {
        reports.lock().unwrap().contains(&want).then_some(())
    })
    .unwrap_or_else(|| panic!("no {want:?} in {:?}", reports.lock().unwrap()));
    let report = cache2.fetch(addr, b2_id, &options, |_| {}).unwrap();
    assert_eq!(fs::read(&report.path).unwrap(), b2);

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    thread.join().unwrap().unwrap();
    assert_eq!(
        *reports.lock().unwrap(),
        vec![
            format!("indexed {b_id} 200000 b.map"),
            format!("indexed {b2_id} 200000 b.map"),
        ]
    );
}
