//! The file-system layer against real temporary directories: content store, cache, journal,
//! and a killed-then-resumed download through the simulator.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use md5::{Digest, Md5};
use udpferry::core::{ChunkSink, ChunkSource, Event, Receiver, TransferConfig};
use udpferry::store::{journal, Cache, ContentStore, StoreError};
use udpferry::wire::ConnectionId;
use udpferry::ObjectId;
use udpferry_sim::{LinkConfig, OneShotServer, Pair, Rng, RunOutcome};

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("udpferry-{name}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn put(&self, rel: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn bytes(size: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; size];
    Rng::new(seed).fill_bytes(&mut data);
    data
}

fn read_all(src: &mut impl ChunkSource, size: u64) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    src.read_at(0, &mut out).unwrap();
    out
}

#[test]
fn content_store_indexes_nested_files_sorted_and_keeps_inside_the_root() {
    let root = TempDir::new("content");
    let outside = TempDir::new("outside");
    let (a, b, c) = (bytes(1000, 1), bytes(70_000, 2), b"tiny".to_vec());
    root.put("zeta.bin", &a);
    root.put("maps/b.map", &b);
    root.put("maps/deep/c.map", &c);
    let secret = outside.put("secret.bin", b"not for the network");
    #[cfg(unix)]
    {
        use std::os::unix::fs::symlink;
        symlink(&secret, root.0.join("leak")).unwrap();
        symlink(root.0.join("maps"), root.0.join("maps-again")).unwrap();
        symlink(root.0.join("zeta.bin"), root.0.join("alias.bin")).unwrap();
    }
    let mut store = ContentStore::open(&root.0).unwrap();
    let listed: Vec<(PathBuf, ObjectId, u64)> = store
        .objects()
        .map(|o| (o.path.clone(), o.id, o.size))
        .collect();
    let mut expected = vec![
        (
            PathBuf::from("maps/b.map"),
            ObjectId::md5_of(&b),
            b.len() as u64,
        ),
        (PathBuf::from("maps/deep/c.map"), ObjectId::md5_of(&c), 4),
        (PathBuf::from("zeta.bin"), ObjectId::md5_of(&a), 1000),
    ];
    if cfg!(unix) {
        expected.insert(0, (PathBuf::from("alias.bin"), ObjectId::md5_of(&a), 1000));
    }
    assert_eq!(listed, expected);

    let secret_id = ObjectId::md5_of(b"not for the network");
    assert!(store.get(&secret_id).is_none());
    assert!(store.open_object(&secret_id).unwrap().is_none());

    let id = ObjectId::md5_of(&b);
    assert_eq!(store.get(&id).unwrap().path, Path::new("maps/b.map"));
    let (size, mut src) = store.open_object(&id).unwrap().unwrap();
    assert_eq!(read_all(&mut src, size), b);

    fs::remove_file(root.0.join("maps/deep/c.map")).unwrap();
    root.put("new.bin", b"new");
    store.rescan().unwrap();
    assert!(store.get(&ObjectId::md5_of(&c)).is_none());
    assert!(store.get(&ObjectId::md5_of(b"new")).is_some());
    assert!(matches!(
        ContentStore::open(root.0.join("zeta.bin")),
        Err(StoreError::NotADirectory { .. })
    ));
}

/// The served file is read ahead in blocks; whatever order the sender asks in (retransmissions
/// jump back, the last chunk is short, a manifest build reads large runs) it gets the file's bytes.
#[test]
fn file_source_serves_the_files_bytes_in_any_order() {
    let root = TempDir::new("read-ahead");
    let data = bytes(300_001, 11);
    root.put("map.bin", &data);
    let id = ObjectId::md5_of(&data);
    let mut store = ContentStore::open(&root.0).unwrap();
    let (size, mut src) = store.open_object(&id).unwrap().unwrap();
    assert_eq!(size, data.len() as u64);
    let mut rng = Rng::new(5);
    let mut offset = 0u64;
    for step in 0..5_000 {
        // Mostly in order, 1166-byte chunks; now and then a jump back or ahead and a long read.
        let len = match rng.next_u64() % 50 {
            0 => 40_000 + rng.next_u64() % 40_000,
            1 => 1 + rng.next_u64() % 100,
            _ => 1166,
        };
        if rng.next_u64().is_multiple_of(20) {
            offset = rng.next_u64() % size;
        }
        let len = len.min(size - offset);
        let mut buf = vec![0u8; len as usize];
        src.read_at(offset, &mut buf).unwrap();
        assert!(
            buf == data[offset as usize..(offset + len) as usize],
            "step {step}: {len} bytes at {offset} differ from the file"
        );
        offset += len;
        if offset == size {
            offset = 0;
        }
    }
    let mut past = [0u8; 10];
    assert!(
        src.read_at(size - 5, &mut past).is_err(),
        "a read past the end succeeded"
    );
}

#[test]
fn changed_file_is_never_served_under_its_old_id() {
    let root = TempDir::new("changed");
    let old = bytes(200_000, 3);
    let path = root.put("map.bin", &old);
    let old_id = ObjectId::md5_of(&old);
    let mut store = ContentStore::open(&root.0).unwrap();
    let (_, mut early) = store.open_object(&old_id).unwrap().unwrap();
    let mut buf = [0u8; 1000];
    early.read_at(0, &mut buf).unwrap();
    assert_eq!(buf[..], old[..1000]);

    // Same size, different bytes, and a different mtime (set explicitly: the clock the file
    // system stamps files with may not have ticked since the file was written).
    let mut new = old.clone();
    new[0] ^= 0xff;
    let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    (&f).write_all(&new).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    drop(f);

    let err = (0..65)
        .find_map(|_| early.read_at(1000, &mut buf).err())
        .expect("the source kept serving a changed file");
    assert_eq!(err.kind(), std::io::ErrorKind::Other);
    assert_eq!(
        err.to_string(),
        "object changed on disk since it was indexed"
    );

    // The request path never hashes: the changed file is refused, and left to a rescan.
    let hashed = store.files_hashed();
    assert!(store.open_object(&old_id).unwrap().is_none());
    assert_eq!(store.files_hashed(), hashed, "a request hashed a file");
    assert!(store.needs_rescan());
    let new_id = ObjectId::md5_of(&new);
    assert!(store.get(&new_id).is_none(), "not hashed yet");
    store.rescan().unwrap();
    assert!(!store.needs_rescan());
    assert!(store.open_object(&old_id).unwrap().is_none());
    assert_eq!(store.get(&new_id).unwrap().path, Path::new("map.bin"));
    let (size, mut src) = store.open_object(&new_id).unwrap().unwrap();
    assert_eq!(read_all(&mut src, size), new);

    // A size change is caught too, and a deleted file stops being served.
    let (_, mut before) = store.open_object(&new_id).unwrap().unwrap();
    before.read_at(0, &mut buf).unwrap();
    fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(b"more")
        .unwrap();
    assert!((0..65).any(|_| before.read_at(0, &mut buf).is_err()));
    assert!(store.open_object(&new_id).unwrap().is_none());
    fs::remove_file(&path).unwrap();
    let newest = ObjectId::md5_of(&[&new[..], b"more"].concat());
    assert!(store.open_object(&newest).unwrap().is_none());
    assert!(store.open_object(&new_id).unwrap().is_none());
    store.rescan().unwrap();
    assert_eq!(store.objects().count(), 0);
}

#[test]
fn a_64_mib_file_is_hashed_correctly() {
    let root = TempDir::new("big");
    let mut file = fs::File::create(root.0.join("big.pak")).unwrap();
    let mut hasher = Md5::new();
    let mut block = bytes(1 << 20, 4);
    for i in 0..64u8 {
        block[0] = i;
        hasher.update(&block);
        file.write_all(&block).unwrap();
    }
    drop(file);
    let id = ObjectId::Md5(hasher.finalize().into());
    let store = ContentStore::open(&root.0).unwrap();
    let info = store.get(&id).expect("64 MiB file indexed under its MD5");
    assert_eq!(info.size, 64 << 20);
}

#[test]
fn cache_resumes_from_checkpoint_and_distrusts_bad_journals() {
    let dir = TempDir::new("cache");
    let cache = Cache::open(dir.0.join("nested/cache")).unwrap();
    let data = bytes(10_000, 5);
    let id = ObjectId::md5_of(&data);
    let hex = id.to_hex();
    assert_eq!(cache.path_of(&id), dir.0.join("nested/cache").join(&hex));

    let (mut part, have) = cache.begin_sized(&id, Some(10_000)).unwrap();
    assert!(have.is_empty());
    for r in [6000..7000usize, 0..1000, 1000..2500, 9000..10_000] {
        part.write_at(r.start as u64, &data[r]).unwrap();
    }
    assert!(
        part.write_at(9500, &[0; 600]).is_err(),
        "write past the size"
    );
    part.checkpoint().unwrap();
    let expected = part.received().clone();
    drop(part);

    let (mut part, have) = cache.begin(&id).unwrap();
    assert_eq!(have, expected);
    assert_eq!(part.size(), Some(10_000));
    for r in have.iter() {
        let mut buf = vec![0u8; (r.end - r.start) as usize];
        part.read_at(r.start, &mut buf).unwrap();
        assert_eq!(buf[..], data[r.start as usize..r.end as usize]);
    }
    drop(part);

    let journal_path = cache.root().join(format!("{hex}.journal"));
    let good = fs::read(&journal_path).unwrap();
    let part_path = cache.root().join(format!("{hex}.part"));
    let restarts = |damaged: &[u8]| {
        fs::write(&journal_path, damaged).unwrap();
        let (part, have) = cache.begin(&id).unwrap();
        // Nothing is vouched for; the bytes stay, unverified, for a check against the manifest.
        let restarted = have.is_empty()
            && part.has_unverified()
            && fs::metadata(&part_path).unwrap().len() == data.len() as u64;
        fs::write(&part_path, &data).unwrap();
        restarted
    };
    fs::write(&part_path, &data).unwrap();
    let mut flipped = good.clone();
    flipped[40] ^= 1;
    assert!(restarts(&flipped), "flipped byte");
    assert!(restarts(&good[..good.len() - 3]), "truncated");
    let other = journal::encode(&ObjectId::md5_of(b"other"), 10_000, &expected);
    assert!(restarts(&other), "journal of another object");
    assert!(!restarts(&good), "an intact journal is trusted");
    fs::write(&journal_path, &good).unwrap();
    let (_, have) = cache.begin_sized(&id, Some(20_000)).unwrap();
    assert!(have.is_empty(), "journal for another size");
    assert!(!journal_path.exists());
    let (_, have) = cache.begin(&id).unwrap();
    assert!(have.is_empty(), "a missing journal vouches for nothing");
}

#[test]
fn journal_is_written_automatically_and_finalize_publishes_atomically() {
    let dir = TempDir::new("finalize");
    let cache = Cache::open(&dir.0).unwrap();
    let data = bytes(5000, 6);
    let id = ObjectId::md5_of(&data);
    let (mut part, _) = cache.begin(&id).unwrap();
    part.set_journal_interval(2000);
    part.set_size(5000);
    part.write_at(0, &data[..1500]).unwrap();
    let journal_path = dir.0.join(format!("{}.journal", id.to_hex()));
    assert!(!journal_path.exists(), "not yet 2000 new bytes");
    part.write_at(3000, &data[3000..4000]).unwrap();
    let (jid, size, ranges) = journal::decode(&fs::read(&journal_path).unwrap()).unwrap();
    assert_eq!((jid, size, ranges), (id, 5000, part.received().clone()));
    // While it is open, no second download of the object may begin in this cache.
    assert!(matches!(cache.begin(&id), Err(StoreError::Locked { .. })));

    // The process ends without a checkpoint (its lock goes with it); the next one resumes.
    drop(part);
    let (mut part, have) = cache.begin(&id).unwrap();
    for gap in have.gaps(0..5000).collect::<Vec<_>>() {
        let (s, e) = (gap.start as usize, gap.end as usize);
        part.write_at(gap.start, &data[s..e]).unwrap();
    }
    assert!(!cache.contains(&id));
    let final_path = part.finalize().unwrap();
    assert_eq!(final_path, cache.path_of(&id));
    assert!(cache.contains(&id));
    assert_eq!(fs::read(&final_path).unwrap(), data);
    let names: Vec<_> = fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let mut names: Vec<String> = names
        .into_iter()
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![id.to_hex(), format!("{}.verified", id.to_hex())],
        "no .part, no journal; the record of what was verified"
    );

    let dest = dir.0.join("game/maps/level.map");
    fs::create_dir_all(dest.parent().unwrap()).unwrap();
    fs::write(&dest, b"old version").unwrap();
    cache.copy_out(&id, &dest).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), data);
    assert_eq!(
        fs::read_dir(dest.parent().unwrap()).unwrap().count(),
        1,
        "no temp file left"
    );
    let missing = ObjectId::md5_of(b"missing");
    assert!(matches!(
        cache.copy_out(&missing, &dest),
        Err(StoreError::NotInCache { .. })
    ));
    fs::write(cache.path_of(&id), b"bit rot").unwrap();
    assert!(matches!(
        cache.copy_out(&id, &dest),
        Err(StoreError::Corrupt { .. })
    ));
    assert_eq!(
        fs::read(&dest).unwrap(),
        data,
        "a failed copy leaves dest alone"
    );

    let (mut part, _) = cache.begin_sized(&missing, Some(100)).unwrap();
    part.write_at(0, &[1; 50]).unwrap();
    let err = part.finalize().unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Incomplete {
                have: 50,
                size: 100,
                ..
            }
        ),
        "{err}"
    );
    assert!(!cache.contains(&missing));
}

/// Steps `pair` until the receiver holds `target` bytes or the transfer ends.
fn run_until<A: udpferry_sim::Peer, B: udpferry_sim::Peer>(
    pair: &mut Pair<A, B>,
    mut done: impl FnMut(&Pair<A, B>) -> bool,
) {
    for _ in 0..10_000_000 {
        if done(pair) || !pair.step() {
            return;
        }
    }
    panic!("simulation did not reach its goal");
}

#[test]
fn download_killed_halfway_resumes_from_the_journal() {
    let server_dir = TempDir::new("e2e-server");
    let client_dir = TempDir::new("e2e-client");
    let size = 32usize << 20;
    let data = bytes(size, 7);
    server_dir.put("level.map", &data);
    let mut store = ContentStore::open(&server_dir.0).unwrap();
    let id = ObjectId::md5_of(&data);
    let cache = Cache::open(&client_dir.0).unwrap();
    let config = TransferConfig::default();
    let link = LinkConfig::clean(Duration::from_millis(15)).with_loss(0.01);
    let start = Instant::now();

    // First run: killed (everything dropped, no checkpoint) once half the bytes arrived.
    let (mut part, have) = cache.begin_sized(&id, Some(size as u64)).unwrap();
    part.set_journal_interval(1 << 20);
    let (len, src) = store.open_object(&id).unwrap().unwrap();
    let server = OneShotServer::new(id, len, src, config.clone(), 1);
    let receiver = Receiver::new(start, ConnectionId(11), id, &have, part, config.clone());
    let mut pair = Pair::new(1, start, server, receiver, link.clone(), link.clone());
    run_until(&mut pair, |p| p.b.bytes_received() >= size as u64 / 2);
    assert!(!pair.b.is_finished());
    drop(pair);

    // Second run: resumes from what the last automatic journal update vouched for.
    let (part, have) = cache.begin(&id).unwrap();
    assert!(
        have.covered() >= (size as u64 / 2) - (2 << 20),
        "have {}",
        have.covered()
    );
    let (len, src) = store.open_object(&id).unwrap().unwrap();
    let server = OneShotServer::new(id, len, src, config.clone(), 2);
    let receiver = Receiver::new(pair_now(start), ConnectionId(12), id, &have, part, config);
    let mut pair = Pair::new(2, pair_now(start), server, receiver, link.clone(), link);
    let outcome = pair.run(10_000_000, pair_now(start) + Duration::from_secs(3600));
    assert_eq!(outcome, RunOutcome::BothFinished);
    let completed =
        std::iter::from_fn(|| pair.b.poll_event()).any(|e| matches!(e, Event::Completed(_)));
    assert!(completed);
    let sent = pair.a.sender().unwrap().stats().bytes_sent;
    assert!(
        (sent as f64) <= 0.6 * size as f64,
        "resumed run sent {sent} bytes for a {size}-byte object"
    );
    let final_path = pair.b.into_sink().finalize().unwrap();
    assert!(
        fs::read(&final_path).unwrap() == data,
        "final file differs from the source"
    );
}

/// A start time for the second run, later than any the first could have reached.
fn pair_now(start: Instant) -> Instant {
    start + Duration::from_secs(7200)
}

#[test]
fn default_cache_dir_follows_the_platform_convention() {
    if let Some(dir) = Cache::default_dir() {
        assert!(dir.is_absolute());
        assert!(dir.ends_with("udpferry"));
    }
}

#[test]
fn gathered_writes_read_back_and_reach_the_file_on_checkpoint() {
    let dir = TempDir::new("runs");
    let cache = Cache::open(&dir.0).unwrap();
    let data = bytes(700_000, 9);
    let id = ObjectId::md5_of(&data);
    let (mut part, _) = cache.begin(&id).unwrap();
    part.set_size(data.len() as u64);
    // In order, chunk by chunk (gathered in memory), then one chunk out of order.
    for (i, chunk) in data[..300_000].chunks(1168).enumerate() {
        part.write_at((i * 1168) as u64, chunk).unwrap();
    }
    part.write_at(600_000, &data[600_000..601_168]).unwrap();
    // Bytes not yet on disk read back the same as bytes that are.
    let mut back = vec![0u8; 5000];
    part.read_at(295_000, &mut back).unwrap();
    assert_eq!(back, data[295_000..300_000]);
    part.read_at(600_000, &mut back[..1168]).unwrap();
    assert_eq!(back[..1168], data[600_000..601_168]);
    // A checkpoint puts every listed byte in the file before the journal lists it.
    part.checkpoint().unwrap();
    let on_disk = fs::read(dir.0.join(format!("{}.part", id.to_hex()))).unwrap();
    let (_, _, ranges) =
        journal::decode(&fs::read(dir.0.join(format!("{}.journal", id.to_hex()))).unwrap())
            .unwrap();
    assert_eq!(ranges.covered(), 301_168);
    for r in ranges.iter() {
        let (s, e) = (r.start as usize, r.end as usize);
        assert_eq!(on_disk[s..e], data[s..e], "journal lists {s}..{e}");
    }
}

#[test]
fn background_journal_updates_list_only_bytes_on_disk_and_resume() {
    let dir = TempDir::new("bgjournal");
    let cache = Cache::open(&dir.0).unwrap();
    let data = bytes(3_000_000, 10);
    let id = ObjectId::md5_of(&data);
    let (mut part, _) = cache.begin(&id).unwrap();
    part.set_size(data.len() as u64);
    part.set_journal_interval(100_000);
    part.set_background_journal(true).unwrap();
    for (i, chunk) in data[..2_000_000].chunks(1168).enumerate() {
        part.write_at((i * 1168) as u64, chunk).unwrap();
    }
    // Turning the thread off waits for the update it is running.
    part.set_background_journal(false).unwrap();
    let journal_path = dir.0.join(format!("{}.journal", id.to_hex()));
    let (_, size, ranges) = journal::decode(&fs::read(&journal_path).unwrap()).unwrap();
    assert_eq!(size, data.len() as u64);
    // At least the first automatic update landed; later ones wait while one is syncing, so how
    // many more depends on the disk.
    assert!(
        (100_000..=2_000_000).contains(&ranges.covered()),
        "{} bytes listed",
        ranges.covered()
    );
    let on_disk = fs::read(dir.0.join(format!("{}.part", id.to_hex()))).unwrap();
    for r in ranges.iter() {
        let (s, e) = (r.start as usize, r.end as usize);
        assert_eq!(on_disk[s..e], data[s..e], "journal lists {s}..{e}");
    }
    // Killed here (no checkpoint): the next run resumes from what the journal vouched for.
    drop(part);
    let (mut part, have) = cache.begin(&id).unwrap();
    assert_eq!(have, ranges);
    part.set_background_journal(true).unwrap();
    for gap in have.gaps(0..data.len() as u64).collect::<Vec<_>>() {
        let (s, e) = (gap.start as usize, gap.end as usize);
        part.write_at(gap.start, &data[s..e]).unwrap();
    }
    let path = part.finalize().unwrap();
    assert_eq!(fs::read(path).unwrap(), data);
}

// ---------------------------------------------------------------------------------------------
// Cache upkeep: entries, clean, verify_all
// ---------------------------------------------------------------------------------------------

/// Stores `data` in `cache` as a finished download.
fn store_object(cache: &Cache, data: &[u8]) -> ObjectId {
    let id = ObjectId::md5_of(data);
    let (mut partial, _) = cache.begin(&id).unwrap();
    partial.set_size(data.len() as u64);
    partial.write_at(0, data).unwrap();
    partial.finalize().unwrap();
    id
}

/// Leaves a partial download of `data` in `cache` holding its first `held` bytes, journaled.
fn store_partial(cache: &Cache, data: &[u8], held: usize) -> ObjectId {
    let id = ObjectId::md5_of(data);
    let (mut partial, _) = cache.begin(&id).unwrap();
    partial.set_size(data.len() as u64);
    partial.write_at(0, &data[..held]).unwrap();
    partial.checkpoint().unwrap();
    id
}

/// Sets the modification time of `path` to `ago` before now.
fn date_back(path: &Path, ago: Duration) {
    fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(SystemTime::now() - ago))
        .unwrap();
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

const DAY: Duration = Duration::from_secs(86_400);

#[test]
fn cache_entries_list_complete_partial_and_stray_files() {
    use udpferry::store::CacheEntry;
    let dir = TempDir::new("entries");
    let cache = Cache::open(&dir.0).unwrap();
    let done = bytes(10_000, 1);
    let done_id = store_object(&cache, &done);
    let part = bytes(50_000, 2);
    let part_id = store_partial(&cache, &part, 20_000);
    date_back(
        &cache.root().join(format!("{}.part", part_id.to_hex())),
        2 * DAY,
    );
    date_back(
        &cache.root().join(format!("{}.journal", part_id.to_hex())),
        2 * DAY,
    );
    let stray = ObjectId::md5_of(b"stray").to_hex();
    fs::write(dir.0.join(format!("{stray}.journal")), b"junk").unwrap();
    fs::write(dir.0.join("notes.txt"), b"not ours").unwrap();

    let listing = cache.entries().unwrap();
    let text = listing.to_string();
    println!("{text}");
    assert_eq!(listing.entries.len(), 3, "{text}");
    assert!(
        listing.entries.iter().any(|e| matches!(e,
        CacheEntry::Complete { id, size: 10_000, .. } if *id == done_id)),
        "{text}"
    );
    assert!(
        listing.entries.iter().any(|e| matches!(e,
        CacheEntry::Partial { id, held: 20_000, total: Some(50_000), in_use: false, .. }
            if *id == part_id)),
        "{text}"
    );
    assert!(
        listing.entries.iter().any(|e| matches!(e,
        CacheEntry::Stray { name, .. } if *name == format!("{stray}.journal"))),
        "{text}"
    );
    assert!(
        text.contains(&format!("complete {done_id} 10000 bytes, ")),
        "{text}"
    );
    assert!(
        text.contains(&format!("partial {part_id} 20000/50000 bytes, 2d old")),
        "{text}"
    );
    assert!(
        !text.contains("notes.txt"),
        "only the cache's own names: {text}"
    );
    assert!(
        text.ends_with(
            "1 complete (10000 bytes), 1 partial (20000 bytes on disk), 1 stray (4 bytes)"
        ),
        "{text}"
    );

    // A partial whose download is running says so.
    let (_running, _) = cache.begin(&part_id).unwrap();
    let text = cache.entries().unwrap().to_string();
    assert!(
        text.contains(&format!(
            "partial {part_id} 20000/50000 bytes, 2d old, in use"
        )),
        "{text}"
    );
}

#[test]
fn cache_clean_removes_stale_partials_and_strays_and_nothing_else() {
    let dir = TempDir::new("clean");
    let cache = Cache::open(&dir.0).unwrap();
    let done = bytes(10_000, 1);
    let done_id = store_object(&cache, &done);
    // Fresh and stale partial downloads, the stale one untouched for 8 days.
    let fresh_id = store_partial(&cache, &bytes(40_000, 2), 10_000);
    let stale_id = store_partial(&cache, &bytes(40_000, 3), 30_000);
    for suffix in [".part", ".journal"] {
        date_back(
            &dir.0.join(format!("{}{suffix}", stale_id.to_hex())),
            8 * DAY,
        );
    }
    // What older versions left for an object that was never found.
    let empty = ObjectId::md5_of(b"never found").to_hex();
    fs::write(dir.0.join(format!("{empty}.part")), b"").unwrap();
    fs::write(dir.0.join(format!("{empty}.journal")), b"UFJ1...").unwrap();
    // Strays: a journal without a partial, a torn journal update, a stamp without an entry,
    // a lock file a killed download left.
    let lone = ObjectId::md5_of(b"lone").to_hex();
    fs::write(dir.0.join(format!("{lone}.journal")), b"junk").unwrap();
    fs::write(
        dir.0.join(format!("{}.journal.tmp", fresh_id.to_hex())),
        b"torn",
    )
    .unwrap();
    fs::write(dir.0.join(format!("{lone}.verified")), b"1 2 3").unwrap();
    fs::write(dir.0.join(format!("{lone}.lock")), b"").unwrap();
    // Not ours, however old.
    fs::write(dir.0.join("notes.txt"), b"keep me").unwrap();
    date_back(&dir.0.join("notes.txt"), 100 * DAY);
    // A stale partial whose download is running right now is not touched.
    let busy_id = store_partial(&cache, &bytes(40_000, 4), 5_000);
    for suffix in [".part", ".journal"] {
        date_back(
            &dir.0.join(format!("{}{suffix}", busy_id.to_hex())),
            30 * DAY,
        );
    }
    let running = cache.begin(&busy_id).unwrap();

    let report = cache.clean(udpferry::store::CLEAN_AGE).unwrap();
    let text = report.to_string();
    println!("{text}");
    let removed: Vec<&str> = report.removed.iter().map(|r| r.name.as_str()).collect();
    let stale = stale_id.to_hex();
    let fresh = fresh_id.to_hex();
    for gone in [
        format!("{stale}.part"),
        format!("{stale}.journal"),
        format!("{empty}.part"),
        format!("{empty}.journal"),
        format!("{lone}.journal"),
        format!("{fresh}.journal.tmp"),
        format!("{lone}.verified"),
        format!("{lone}.lock"),
    ] {
        assert!(
            removed.contains(&gone.as_str()),
            "{gone} not removed: {text}"
        );
        assert!(!dir.0.join(&gone).exists(), "{gone} still there");
    }
    assert_eq!(removed.len(), 8, "{text}");
    assert_eq!(report.kept, 1, "{text}");
    assert_eq!(report.in_use, 1, "{text}");
    assert!(
        text.contains(&format!(
            "removed {stale}.part (30000 bytes): partial download untouched for 8d"
        )),
        "{text}"
    );
    assert!(
        text.contains("kept 1 partial downloads touched within 7d; skipped 1 in use"),
        "{text}"
    );
    let busy = busy_id.to_hex();
    let done_hex = done_id.to_hex();
    let mut want = vec![
        done_hex.clone(),
        format!("{done_hex}.verified"),
        format!("{fresh}.journal"),
        format!("{fresh}.part"),
        format!("{busy}.journal"),
        format!("{busy}.lock"),
        format!("{busy}.part"),
        "notes.txt".to_string(),
    ];
    want.sort();
    assert_eq!(names(&dir.0), want);
    assert!(cache.contains(&done_id));
    // The running download resumes what it holds.
    assert_eq!(running.1.covered(), 5_000);
    drop(running);

    // With a shorter age the fresh partial goes too; finished objects never do.
    let report = cache.clean(Duration::ZERO).unwrap();
    assert_eq!(report.kept, 0, "{report}");
    assert_eq!(
        names(&dir.0),
        vec![
            done_hex.clone(),
            format!("{done_hex}.verified"),
            "notes.txt".into()
        ]
    );
}

#[test]
fn cache_verify_rehashes_and_sets_damaged_entries_aside() {
    use udpferry::store::Lookup;
    let dir = TempDir::new("verify");
    let cache = Cache::open(&dir.0).unwrap();
    let good = bytes(100_000, 1);
    let good_id = store_object(&cache, &good);
    let rotten = bytes(200_000, 2);
    let rotten_id = store_object(&cache, &rotten);
    // Bit rot: one byte flipped in place, the stamp put back as it was (size and times), so
    // that a lookup alone would not see it... except for ctime, which verify does not need.
    let path = cache.path_of(&rotten_id);
    let modified = fs::metadata(&path).unwrap().modified().unwrap();
    let mut bytes_now = fs::read(&path).unwrap();
    bytes_now[12_345] ^= 0x40;
    fs::write(&path, &bytes_now).unwrap();
    fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(modified)
        .unwrap();

    let report = cache.verify_all().unwrap();
    let text = report.to_string();
    println!("{text}");
    assert_eq!((report.good, report.good_bytes), (1, 100_000), "{text}");
    assert_eq!(report.damaged.len(), 1, "{text}");
    assert_eq!(report.damaged[0].id, rotten_id);
    assert!(report.damaged[0].left_alone.is_none(), "{text}");
    let hex = rotten_id.to_hex();
    assert!(
        text.contains(&format!("damaged {rotten_id}: its bytes hash to ")),
        "{text}"
    );
    assert!(text.contains(&format!("set aside as {hex}.part")), "{text}");
    assert!(
        text.ends_with("verified 2 complete entries (100000 bytes): 1 good, 1 damaged"),
        "{text}"
    );
    // Set aside: never served again, its bytes kept for the next download to salvage.
    assert_eq!(cache.lookup(&rotten_id).unwrap(), Lookup::Missing);
    assert_eq!(
        fs::read(dir.0.join(format!("{hex}.part"))).unwrap(),
        bytes_now
    );
    let (partial, have) = cache.begin(&rotten_id).unwrap();
    assert!(have.is_empty() && partial.has_unverified());
    drop(partial);
    assert!(cache.contains(&good_id));
    // Nothing left to find.
    let again = cache.verify_all().unwrap();
    assert_eq!((again.good, again.damaged.len()), (1, 0), "{again}");
}
