//! Bundles over loopback: a server lists one bundle per top-level subdirectory; a client
//! installs a bundle's files under a directory, skips what is already there, fetches only what
//! changed, resumes, and refuses hostile listings and wrong bytes without writing anything it
//! should not.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use proptest::prelude::*;
use udpferry::net::{BundleFetchError, Client, FetchOptions, FileError, ServerConfig};
use udpferry::store::bundle::{Bundle, BundleEntry, BundleError, MAGIC};
use udpferry::store::{ContentStore, SafePath};
use udpferry::ObjectId;
use udpferry_sim::Rng;

use common::{Hostile, Serving, TempDir};

const MIB: usize = 1 << 20;

fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    Rng::new(seed).fill_bytes(&mut v);
    v
}

/// Writes `data` and dates it a minute back (a served file is not being written right now).
fn put(path: &Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(SystemTime::now() - Duration::from_secs(60)))
        .unwrap();
}

/// Every file under `dir`, as (relative path with `/`, bytes), sorted.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(read) = std::fs::read_dir(&d) else {
            continue;
        };
        for item in read {
            let item = item.unwrap();
            let path = item.path();
            if item.file_type().unwrap().is_dir() {
                todo.push(path);
            } else {
                let rel = path.strip_prefix(dir).unwrap().to_string_lossy();
                let rel = rel.replace('\\', "/");
                out.push((rel, std::fs::read(&path).unwrap_or_default()));
            }
        }
    }
    out.sort();
    out
}

/// A listing encoded by hand, in the given order and without any check, as a hostile server
/// could send it.
fn raw_listing(entries: &[(&str, u64, ObjectId)]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for (path, size, id) in entries {
        out.extend_from_slice(&(path.len() as u16).to_be_bytes());
        out.extend_from_slice(path.as_bytes());
        out.extend_from_slice(&size.to_be_bytes());
        out.push(id.algorithm());
        out.extend_from_slice(id.digest());
    }
    out
}

fn entry(path: &str, data: &[u8]) -> BundleEntry {
    BundleEntry {
        path: SafePath::parse(path).unwrap(),
        size: data.len() as u64,
        id: ObjectId::md5_of(data),
    }
}

fn options(cache: PathBuf) -> (Client, FetchOptions) {
    let o = FetchOptions {
        timeout: Some(Duration::from_secs(60)),
        ..FetchOptions::default()
    };
    (Client::new(cache).unwrap(), o)
}

/// Serves [`serve_tree`] under `root`, each transfer capped at 2 MiB/s (so a download can be
/// caught halfway): its files, the `maps` bundle's id, the server.
fn serve_maps_capped(root: &Path) -> (Served, ObjectId, Serving) {
    let s = serve_tree(root);
    let store = ContentStore::open(root).unwrap();
    let maps = store.bundles().next().unwrap().id;
    let mut config = ServerConfig::default();
    config.endpoint.transfer.max_rate_bytes_per_sec = 2 * MIB as u64;
    (s, maps, Serving::start(store, config))
}

/// Serves [`serve_tree`] under `tmp/served`: its files, the `maps` bundle's id, the server.
fn serve_maps(tmp: &TempDir) -> (Served, ObjectId, Serving) {
    let root = tmp.join("served");
    let s = serve_tree(&root);
    let store = ContentStore::open(&root).unwrap();
    let maps = store.bundles().next().unwrap().id;
    (s, maps, Serving::start(store, ServerConfig::default()))
}

/// The served tree of the main test: two bundles (`maps`, `mods`) and a file in the root.
struct Served {
    level: Vec<u8>,
    wall: Vec<u8>,
    music: Vec<u8>,
}

fn serve_tree(root: &Path) -> Served {
    let s = Served {
        level: bytes(3 * MIB, 1),
        wall: bytes(20_000, 2),
        music: bytes(5000, 3),
    };
    put(&root.join("maps/level.bsp"), &s.level);
    put(&root.join("maps/textures/stone/wall.png"), &s.wall);
    put(&root.join("maps/empty.cfg"), b"");
    put(&root.join("mods/a/b/music.ogg"), &s.music);
    put(&root.join("readme.txt"), b"in no bundle");
    s
}

#[test]
fn the_store_lists_one_bundle_per_top_level_directory() {
    let tmp = TempDir::new("list");
    let s = serve_tree(&tmp.join("served"));
    let store = ContentStore::open(tmp.join("served")).unwrap();
    let bundles: Vec<_> = store.bundles().cloned().collect();
    let dirs: Vec<&str> = bundles.iter().map(|b| b.dir.as_str()).collect();
    assert_eq!(dirs, ["maps", "mods"]);
    let maps = Bundle::build(vec![
        entry("level.bsp", &s.level),
        entry("textures/stone/wall.png", &s.wall),
        entry("empty.cfg", b""),
    ])
    .unwrap();
    assert_eq!(bundles[0].id, Bundle::id(&maps.encode()));
    assert_eq!(bundles[0].files, 3);
    assert_eq!(bundles[0].bytes, (s.level.len() + s.wall.len()) as u64);
    let mods = Bundle::build(vec![entry("a/b/music.ogg", &s.music)]).unwrap();
    assert_eq!(bundles[1].id, Bundle::id(&mods.encode()));
    assert_eq!(bundles[1].files, 1);
    // The listing is served under its id, from memory.
    assert_eq!(
        store.size_of_any(&bundles[0].id),
        Some(maps.encode().len() as u64)
    );
}

#[test]
fn a_bundle_installs_then_is_skipped_then_only_a_changed_file_is_fetched() {
    let tmp = TempDir::new("main");
    let (s, maps, server) = serve_maps(&tmp);
    let root = tmp.join("served");
    let dir = tmp.join("install/maps");
    let (client, opts) = options(tmp.join("cache"));

    // 1. Into an empty directory: every file, byte for byte, and nothing else.
    let report = client
        .fetch_bundle(server.addr, maps, &dir, &opts, |_| {})
        .unwrap();
    assert_eq!(
        (
            report.files,
            report.fetched,
            report.skipped,
            report.from_cache
        ),
        (3, 3, 0, 0)
    );
    assert_eq!(report.fetched_bytes, (s.level.len() + s.wall.len()) as u64);
    let want = vec![
        ("empty.cfg".to_string(), Vec::new()),
        ("level.bsp".to_string(), s.level.clone()),
        ("textures/stone/wall.png".to_string(), s.wall.clone()),
    ];
    assert_eq!(tree(&dir), want);
    let after_first = server.sent();
    assert!(after_first >= s.level.len() as u64, "sent {after_first}");

    // 2. Again: everything is there, nothing is fetched (the listing is in the cache too).
    let report = client
        .fetch_bundle(server.addr, maps, &dir, &opts, |_| {})
        .unwrap();
    assert_eq!((report.fetched, report.skipped), (0, 3));
    assert!(report.listing_from_cache);
    assert_eq!(
        server.sent(),
        after_first,
        "the second run used the network"
    );
    assert_eq!(tree(&dir), want);
    drop(server);

    // 3. One file changes on the server (rescan): a new bundle id, and only that file moves.
    let wall2 = bytes(20_000, 4);
    put(&root.join("maps/textures/stone/wall.png"), &wall2);
    let mut store = ContentStore::open(&root).unwrap();
    store.rescan().unwrap();
    let maps2 = store.bundles().next().unwrap().id;
    assert_ne!(maps2, maps);
    let server = Serving::start(store, ServerConfig::default());
    let report = client
        .fetch_bundle(server.addr, maps2, &dir, &opts, |_| {})
        .unwrap();
    assert_eq!((report.fetched, report.skipped), (1, 2));
    assert_eq!(report.fetched_bytes, wall2.len() as u64);
    let sent = server.sent();
    assert!(sent < 200_000, "sent {sent} bytes for a 20 kB change");
    assert_eq!(
        tree(&dir.join("textures")),
        vec![("stone/wall.png".into(), wall2)]
    );
}

#[test]
fn a_rescan_changes_only_the_bundle_whose_file_changed() {
    let tmp = TempDir::new("rescan");
    let root = tmp.join("served");
    serve_tree(&root);
    let mut store = ContentStore::open(&root).unwrap();
    let before: Vec<_> = store.bundles().map(|b| b.id).collect();
    put(&root.join("mods/a/b/music.ogg"), &bytes(5000, 9));
    put(&root.join("mods/new.txt"), b"new");
    store.rescan().unwrap();
    let after: Vec<_> = store.bundles().cloned().collect();
    assert_eq!(after[0].id, before[0], "maps did not change");
    assert_ne!(after[1].id, before[1]);
    assert_eq!(after[1].files, 2);
}

#[test]
fn an_interrupted_bundle_download_resumes() {
    let tmp = TempDir::new("resume");
    let root = tmp.join("served");
    let (s, maps, server) = serve_maps_capped(&root);
    let dir = tmp.join("install");
    let (client, mut opts) = options(tmp.join("cache"));
    opts.timeout = Some(Duration::from_millis(700));
    let Err(BundleFetchError::Files { failed, report }) =
        client.fetch_bundle(server.addr, maps, &dir, &opts, |_| {})
    else {
        panic!("a 3 MiB file at 2 MiB/s finished within 0.7 s");
    };
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].path.as_str(), "level.bsp");
    assert!(matches!(failed[0].error, FileError::Deadline(_)));
    assert_eq!(report.fetched, 2, "the small files are installed");
    assert!(
        !dir.join("level.bsp").exists(),
        "a partial file was installed"
    );

    opts.timeout = Some(Duration::from_secs(60));
    let report = client
        .fetch_bundle(server.addr, maps, &dir, &opts, |_| {})
        .unwrap();
    assert_eq!((report.fetched, report.skipped), (1, 2));
    assert!(report.resumed_bytes > 0, "{report:?}");
    assert_eq!(std::fs::read(dir.join("level.bsp")).unwrap(), s.level);
}

#[test]
fn hostile_listings_are_refused_and_nothing_is_written() {
    let ok = b"fine".to_vec();
    let ok_id = ObjectId::md5_of(&ok);
    let good = ("ok.txt", ok.len() as u64, ok_id);
    let listings: Vec<(&str, Vec<u8>)> = vec![
        ("parent", raw_listing(&[("../escape", 4, ok_id), good])),
        (
            "deep parent",
            raw_listing(&[good, ("x/../../escape", 4, ok_id)]),
        ),
        ("absolute", raw_listing(&[("/abs", 4, ok_id), good])),
        ("drive", raw_listing(&[("C:\\x", 4, ok_id), good])),
        ("device", raw_listing(&[("con.txt", 4, ok_id), good])),
        ("duplicate", raw_listing(&[good, good])),
        ("case", raw_listing(&[("OK.txt", 4, ok_id), good])),
        ("file and dir", raw_listing(&[good, ("ok.txt/x", 4, ok_id)])),
        ("garbage", b"UFB1\xff\xff\xff\xffnot a listing".to_vec()),
        ("not a bundle", ok.clone()),
    ];
    let mut objects: HashMap<ObjectId, Arc<[u8]>> = HashMap::new();
    objects.insert(ok_id, ok.clone().into());
    for (_, listing) in &listings {
        objects.insert(ObjectId::md5_of(listing), listing.clone().into());
    }
    let server = Hostile::start(objects);
    for (what, listing) in &listings {
        let tmp = TempDir::new("hostile");
        let dir = tmp.join("work/install");
        let (client, opts) = options(tmp.join("cache"));
        let id = ObjectId::md5_of(listing);
        let result = client.fetch_bundle(server.addr, id, &dir, &opts, |_| {});
        assert!(
            matches!(result, Err(BundleFetchError::Invalid { .. })),
            "{what}: {result:?}"
        );
        // Nothing outside or inside DIR: not even DIR itself; only the cache was written.
        assert!(!tmp.join("work").exists(), "{what}: wrote under work/");
        let top: Vec<_> = std::fs::read_dir(&tmp.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(top, ["cache"], "{what}");
        assert!(!tmp.0.parent().unwrap().join("escape").exists(), "{what}");
        assert!(!Path::new("/abs").exists());
    }
}

#[test]
fn wrong_bytes_and_wrong_sizes_are_not_installed() {
    let good = b"good bytes".to_vec();
    let claimed = b"the listed bytes".to_vec();
    let served_instead = b"other bytes here".to_vec(); // same length as `claimed`
    let big = b"0123456789".to_vec();
    let listing = Bundle::build(vec![
        entry("good.txt", &good),
        entry("sub/bad.txt", &claimed),
        BundleEntry {
            path: SafePath::parse("short.txt").unwrap(),
            size: 4, // the server will offer 10
            id: ObjectId::md5_of(&big),
        },
    ])
    .unwrap()
    .encode();
    let id = Bundle::id(&listing);
    let mut objects: HashMap<ObjectId, Arc<[u8]>> = HashMap::new();
    objects.insert(id, listing.into());
    objects.insert(ObjectId::md5_of(&good), good.clone().into());
    objects.insert(ObjectId::md5_of(&claimed), served_instead.into());
    objects.insert(ObjectId::md5_of(&big), big.into());
    let server = Hostile::start(objects);

    let tmp = TempDir::new("wrong");
    let dir = tmp.join("install");
    let (client, opts) = options(tmp.join("cache"));
    let started = Instant::now();
    let Err(BundleFetchError::Files { failed, report }) =
        client.fetch_bundle(server.addr, id, &dir, &opts, |_| {})
    else {
        panic!("wrong bytes were accepted");
    };
    assert!(started.elapsed() < Duration::from_secs(30));
    let why: Vec<(&str, &FileError)> = failed.iter().map(|f| (f.path.as_str(), &f.error)).collect();
    assert_eq!(why.len(), 2, "{why:?}");
    assert_eq!(why[0].0, "short.txt");
    assert!(
        matches!(
            why[0].1,
            FileError::SizeMismatch {
                listed: 4,
                offered: 10
            }
        ),
        "{why:?}"
    );
    assert_eq!(why[1].0, "sub/bad.txt");
    assert!(
        matches!(
            why[1].1,
            FileError::Transfer(udpferry::core::TransferError::DigestMismatch { .. })
        ),
        "{why:?}"
    );
    assert_eq!(report.fetched, 1);
    // Only the good file, and no temporary file, is in DIR.
    assert_eq!(tree(&dir), vec![("good.txt".to_string(), good)]);
    // The wrong bytes were thrown away, not kept for a resume.
    let cached: Vec<String> = std::fs::read_dir(tmp.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let bad_hex = ObjectId::md5_of(&claimed).to_hex();
    assert!(
        !cached.iter().any(|n| n.starts_with(&bad_hex)),
        "{cached:?}"
    );
}

#[cfg(unix)]
#[test]
fn a_symbolic_link_in_the_directory_is_not_followed() {
    let tmp = TempDir::new("link");
    let (s, maps, server) = serve_maps(&tmp);
    let dir = tmp.join("install");
    let outside = tmp.join("outside");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("textures")).unwrap();
    let (client, opts) = options(tmp.join("cache"));
    let Err(BundleFetchError::Files { failed, report }) =
        client.fetch_bundle(server.addr, maps, &dir, &opts, |_| {})
    else {
        panic!("installed through a symbolic link");
    };
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].path.as_str(), "textures/stone/wall.png");
    assert!(matches!(failed[0].error, FileError::Store(_)));
    assert_eq!(report.fetched, 2);
    assert_eq!(std::fs::read(dir.join("level.bsp")).unwrap(), s.level);
    assert!(tree(&outside).is_empty(), "wrote through the link");
}

#[test]
fn a_bundle_file_never_replaces_a_node_or_follows_a_link_out() {
    let tmp = TempDir::new("filelink");
    let (s, maps, server) = serve_maps(&tmp);
    let dir = tmp.join("install");
    let outside = tmp.join("outside");
    std::fs::create_dir_all(dir.join("textures/stone")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    // level.bsp: a link to a file outside the bundle's directory; wall.png: a FIFO;
    // empty.cfg: a link to a file inside it, which is followed.
    std::fs::write(outside.join("victim"), b"precious").unwrap();
    std::os::unix::fs::symlink(outside.join("victim"), dir.join("level.bsp")).unwrap();
    let fifo = dir.join("textures/stone/wall.png");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    std::fs::write(dir.join("old.cfg"), b"old").unwrap();
    std::os::unix::fs::symlink("old.cfg", dir.join("empty.cfg")).unwrap();
    let (client, opts) = options(tmp.join("cache"));
    let Err(BundleFetchError::Files { failed, .. }) =
        client.fetch_bundle(server.addr, maps, &dir, &opts, |_| {})
    else {
        panic!("installed over a link out and a FIFO");
    };
    let mut why: Vec<(String, String)> = failed
        .iter()
        .map(|f| (f.path.as_str().to_string(), f.error.to_string()))
        .collect();
    why.sort();
    assert_eq!(why.len(), 2, "{why:?}");
    assert_eq!(why[0].0, "level.bsp");
    assert!(why[0].1.contains("outside"), "{why:?}");
    assert_eq!(why[1].0, "textures/stone/wall.png");
    assert!(why[1].1.contains("FIFO"), "{why:?}");
    assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"precious");
    assert!(
        !std::fs::symlink_metadata(&fifo).unwrap().is_file(),
        "the FIFO was replaced"
    );
    assert!(std::fs::symlink_metadata(dir.join("empty.cfg"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(dir.join("old.cfg")).unwrap(), b"");
    drop(s);
}

#[test]
fn a_damaged_cache_entry_is_fetched_again_not_installed() {
    let tmp = TempDir::new("damaged");
    let root = tmp.join("served");
    let s = serve_tree(&root);
    let store = ContentStore::open(&root).unwrap();
    let maps = store.bundles().next().unwrap().id;
    let level = ObjectId::md5_of(&s.level);
    let server = Serving::start(store, ServerConfig::default());
    let cache = tmp.join("cache");
    let (client, opts) = options(cache.clone());
    client
        .fetch_bundle(server.addr, maps, &tmp.join("first"), &opts, |_| {})
        .unwrap();
    // The cached copy of level.bsp is truncated: a second install elsewhere must not copy it.
    std::fs::File::options()
        .write(true)
        .open(cache.join(level.to_hex()))
        .unwrap()
        .set_len(1000)
        .unwrap();
    let dir = tmp.join("second");
    let report = client
        .fetch_bundle(server.addr, maps, &dir, &opts, |_| {})
        .unwrap();
    assert_eq!(report.damaged_in_cache, 1);
    assert_eq!(report.fetched, 1);
    assert_eq!(std::fs::read(dir.join("level.bsp")).unwrap(), s.level);
}

#[test]
fn decode_refuses_what_build_refuses() {
    assert!(matches!(
        Bundle::decode(&raw_listing(&[
            ("b", 1, ObjectId::md5_of(b"")),
            ("a", 1, ObjectId::md5_of(b""))
        ])),
        Err(BundleError::Duplicate { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn decode_never_panics_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Bundle::decode(&data);
        let mut with_magic = MAGIC.to_vec();
        with_magic.extend_from_slice(&data);
        if let Ok(b) = Bundle::decode(&with_magic) {
            prop_assert_eq!(b.encode(), with_magic);
        }
    }

    #[test]
    fn decode_never_panics_on_a_damaged_listing(
        names in proptest::collection::btree_set("[a-zA-Z0-9./\\\\:]{1,12}", 1..8),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        cut in any::<usize>(),
    ) {
        let entries: Vec<(String, u64, ObjectId)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as u64, ObjectId::md5_of(n.as_bytes())))
            .collect();
        let refs: Vec<(&str, u64, ObjectId)> =
            entries.iter().map(|(n, s, id)| (n.as_str(), *s, *id)).collect();
        let mut bytes = raw_listing(&refs);
        for (at, x) in flips {
            let len = bytes.len();
            bytes[at % len] ^= x;
        }
        bytes.truncate(bytes.len() - cut % 3);
        if let Ok(b) = Bundle::decode(&bytes) {
            // Whatever is accepted is canonical, and every name in it is a SafePath.
            prop_assert_eq!(b.encode(), bytes);
            for e in b.entries() {
                prop_assert!(SafePath::parse(e.path.as_str()).is_ok());
            }
        }
    }
}

#[test]
fn two_bundle_downloads_into_one_cache_take_turns_per_file() {
    let tmp = TempDir::new("two-bundles");
    let root = tmp.join("served");
    // The 3 MiB file takes about 1.5 s, so the two downloads of it overlap.
    let (s, maps, server) = serve_maps_capped(&root);
    let addr = server.addr;
    let cache = tmp.join("cache");
    let runs: Vec<_> = (0..2u64)
        .map(|i| {
            let (cache, dir) = (cache.clone(), tmp.join(&format!("install{i}")));
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200 * i));
                let (client, opts) = options(cache);
                let report = client.fetch_bundle(addr, maps, &dir, &opts, |_| {});
                (report, dir)
            })
        })
        .collect();
    let mut fetched = 0;
    for run in runs {
        let (report, dir) = run.join().unwrap();
        let report = report.expect("both installs succeed");
        println!("{report}");
        assert_eq!(report.fetched + report.from_cache, 3, "{report:?}");
        fetched += report.fetched;
        assert_eq!(std::fs::read(dir.join("level.bsp")).unwrap(), s.level);
        assert_eq!(
            std::fs::read(dir.join("textures/stone/wall.png")).unwrap(),
            s.wall
        );
    }
    assert!(fetched < 6, "a file was downloaded twice into one cache");
    let leftovers: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".part") || n.contains(".journal") || n.contains(".lock"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
