//! Multi-source downloads for [`Client::fetch_from`](super::Client::fetch_from).
//!
//! 1. Every source is asked for the object's manifest at once; the manifest most of them agree
//!    on is used, once the first has arrived and the others had a moment to follow. Sources
//!    that did not answer yet are set aside, not dropped.
//! 2. The object is cut into pieces along the manifest's blocks; each source fetches up to two
//!    pieces at a time (a transfer whose have-set is everything but that piece), faster
//!    sources finish sooner and so get more. Pieces grow with the source's measured rate to
//!    about [`PIECE_TIME`] each, so a fast source makes a request or two per second, well
//!    inside a server's per-address request limit (which does not count a peer that proved its
//!    address anyway). New pieces wait while the download is far ahead of its digest
//!    ([`digest_allows`]), and when nothing is left to hand out, an idle source shares a busy
//!    one's piece ([`piece_to_share`]).
//! 3. The object's digest is computed while the pieces arrive, over the received prefix, on a
//!    second core ([`InOrderDigest`]): one pass over the bytes, as for one source. Only when it
//!    does not match the id are the pieces checked against the manifest's block hashes: the
//!    sources whose blocks differ lied, are dropped and named, and their blocks are fetched
//!    again from the others (then the whole is hashed once more). A download with a liar costs
//!    the liar's share again; one without costs one digest.
//! 4. A source that fails is dropped, and one that stays silent for a piece (no offer, no
//!    bytes) for [`SILENCE`] is set aside and tried again later; either way its pieces go to
//!    the others. The overall timeout bounds every step.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::md5::Md5;

use super::client::linger_for;
use super::delta::manifest_job;
use super::engine::{lock, lost, Engine, Expect, Job, Outcome, PieceSink, SharedFile, Sink, Verify};
use super::hasher::FileHashThread;
use super::{Client, FetchError, FetchOptions, Progress, Report, Waiting};
use crate::core::{ChunkSink, RangeSet, Stats, TransferError, TransferId};
use crate::id::ObjectId;
use crate::store::manifest::Manifest;
use crate::store::{EntryLock, PartialFile};

/// Bytes of a source's first piece (rounded to whole manifest blocks), and the unit pieces are
/// cut from.
const PIECE_BYTES: u64 = 256 << 10;
/// Later pieces grow with the source's measured rate, to about this long each: one request per
/// piece, so a fast source is not held back by the server's per-address request limit.
const PIECE_TIME: Duration = Duration::from_secs(1);
/// The largest piece.
const MAX_PIECE_BYTES: u64 = 32 << 20;
/// Pieces in flight per source: the next one's handshake overlaps the current one's tail.
const PIECES_PER_SOURCE: usize = 2;
/// Longest the sources may take to deliver a first manifest (less under the overall timeout).
const MANIFEST_WAIT: Duration = Duration::from_secs(5);
/// After the first manifest arrived, the others get this long, or as long again as the first
/// took if that is longer, to arrive and vote.
const MANIFEST_GRACE: Duration = Duration::from_millis(250);
/// Attempts at one source's manifest (a damaged copy or a "not found" from an altered request
/// is asked again).
const MANIFEST_ATTEMPTS: u32 = 3;
/// A source silent this long for a piece (no offer, no bytes) is set aside.
pub(super) const SILENCE: Duration = Duration::from_secs(1);
/// A source set aside is tried again after this long.
const RETRY_AFTER: Duration = Duration::from_secs(3);
/// Times a source is set aside before it is left out for good.
const MAX_SET_ASIDE: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceState {
    Active,
    /// Silent: tried again from `until`; set aside `times` times so far.
    Resting { until: Instant, times: u32 },
    /// Failed (refused, errored, or silent too often): left out.
    Failed,
    /// Delivered bytes that did not match the manifest: left out and named.
    Lied,
}

impl SourceState {
    /// Set aside once more after `now`'s silence, or left out when that happened too often.
    fn silenced(self, now: Instant) -> Self {
        let times = match self {
            SourceState::Resting { times, .. } => times + 1,
            SourceState::Active => 1,
            other => return other,
        };
        if times >= MAX_SET_ASIDE {
            SourceState::Failed
        } else {
            SourceState::Resting {
                until: now + RETRY_AFTER,
                times,
            }
        }
    }
}

/// The multi-source download under `entry`, the object's lock in the cache; see the module
/// docs.
pub(super) fn fetch_from(
    client: &Client,
    servers: &[SocketAddr],
    id: ObjectId,
    entry: EntryLock,
    options: &FetchOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, FetchError> {
    if servers.is_empty() {
        return Err(FetchError::Usage("no server given"));
    }
    let mut engine = Engine::new(client, options);
    engine.bind_for(servers)?;
    let started = engine.started();
    let (manifest, mut state) = manifests(&mut engine, servers, id, progress)?;

    let (mut partial, have) = client.cache.begin_locked(entry, Some(manifest.size))?;
    partial.set_background_journal(true)?;
    partial.set_size(manifest.size);
    let resumed_bytes = have.covered();
    // Bytes on disk no journal vouches for (a kill, a damaged entry set aside): keep the
    // blocks that match.
    let salvaged_bytes = if partial.has_unverified() {
        partial.salvage(&manifest)?.gained
    } else {
        0
    };
    let bases = options.all_bases();
    let reused_bytes = if bases.is_empty() {
        0
    } else {
        super::delta::reuse_blocks(&manifest, &bases, &mut partial)?
    };

    // Pieces: whole blocks, skipping what is already here.
    let blocks_per_piece = (PIECE_BYTES / u64::from(manifest.block_size)).max(1) as usize;
    let mut queue: VecDeque<Range<usize>> = (0..manifest.blocks.len())
        .step_by(blocks_per_piece)
        .map(|b| b..(b + blocks_per_piece).min(manifest.blocks.len()))
        .filter(|blocks| {
            !partial
                .received()
                .contains_range(byte_range(&manifest, blocks))
        })
        .collect();
    // Blocks still to fetch (pieces are cut from the queue's units at any size).
    let mut blocks_left: usize = queue.iter().map(|r| r.end - r.start).sum();
    let file = Arc::new(Mutex::new(partial));
    let mut digest = InOrderDigest::new(&id, manifest.size);
    // Pieces in flight: their source, their blocks, and when they were asked for.
    let mut in_flight: HashMap<TransferId, (usize, Range<usize>, Instant)> = HashMap::new();
    // Pieces delivered in this download, and by whom: checked against the manifest only if
    // the digest does not match.
    let mut delivered: Vec<(usize, Range<usize>)> = Vec::new();
    // Each source's rate, bytes per second of one piece, from its last piece.
    let mut rate: Vec<Option<f64>> = vec![None; servers.len()];
    let mut stats = Stats::default();
    let mut last_error: Option<TransferError> = None;
    let mut last_progress = started;

    loop {
        if blocks_left == 0 {
            // Every piece arrived: the digest decides, and names liars if it does not match.
            digest.advance(&file, true)?;
            let actual = digest.finish()?;
            if actual == id {
                break;
            }
            let liars = liars(&manifest, &delivered, &mut lock(&file));
            if liars.is_empty() {
                // Bytes hashed while they arrived may have been written again since (a piece
                // cancelled and fetched from another source): the file is hashed once more.
                if lock(&file).digest(&id, manifest.size)? == id {
                    break;
                }
                // The manifest itself (most sources agreed on it) does not describe `id`: the
                // bytes are another object's, and are not kept.
                engine.finish(Duration::ZERO);
                if let Some(partial) = Arc::into_inner(file) {
                    let _ = partial
                        .into_inner()
                        .unwrap_or_else(|p| p.into_inner())
                        .discard();
                }
                return Err(TransferError::DigestMismatch {
                    expected: id,
                    actual,
                }
                .into());
            }
            // Everything a liar delivered is fetched again, in runs as long as possible (each
            // piece is a request, and a server limits requests per address); the whole is
            // hashed once more after.
            let mut again = RangeSet::new();
            for (_, blocks) in delivered.iter().filter(|(s, _)| liars.contains(s)) {
                again.insert(blocks.start as u64..blocks.end as u64);
            }
            queue = again
                .iter()
                .map(|r| r.start as usize..r.end as usize)
                .collect();
            blocks_left = queue.iter().map(|r| r.end - r.start).sum();
            for s in liars {
                state[s] = SourceState::Lied;
            }
            delivered.retain(|(s, _)| state[*s] != SourceState::Lied);
            digest = InOrderDigest::new(&id, manifest.size);
            continue;
        }
        let now = Instant::now();
        // Sources set aside long enough get another chance.
        for s in state.iter_mut() {
            if matches!(*s, SourceState::Resting { until, .. } if until <= now) {
                *s = SourceState::Active;
            }
        }
        // Hand pieces to active sources with room, unless the download is far ahead of its
        // digest (see `digest_allows`).
        for (s, &server) in servers.iter().enumerate() {
            while state[s] == SourceState::Active
                && in_flight.values().filter(|(src, ..)| *src == s).count() < PIECES_PER_SOURCE
            {
                let active = state.iter().filter(|s| **s == SourceState::Active).count();
                let want = piece_blocks(&manifest, rate[s], &queue, active);
                let Some(blocks) = take_piece(&mut queue, want) else {
                    break;
                };
                if !digest_allows(&manifest, &blocks, &in_flight, &digest, &lock(&file)) {
                    queue.push_front(blocks);
                    break;
                }
                let piece = byte_range(&manifest, &blocks);
                let mut have = RangeSet::new();
                have.insert(0..piece.start);
                have.insert(piece.end..manifest.size);
                let sink = Sink::Piece(PieceSink {
                    file: file.clone(),
                    piece,
                });
                let t = engine.start(Job {
                    server,
                    id,
                    have,
                    sink,
                    expect: Expect::Size(manifest.size),
                    // The object's digest checks the whole (see the module docs).
                    verify: Verify::ByCaller,
                })?;
                in_flight.insert(t, (s, blocks, Instant::now()));
            }
        }
        // Nothing left to hand out, a source idle, another still busy for a while: the busy
        // piece's missing blocks are shared out again.
        if queue.is_empty() {
            let share = piece_to_share(&manifest, &state, &in_flight, &lock(&file));
            if let Some(t) = share {
                if let Some((s, blocks, _)) = in_flight.remove(&t) {
                    engine.cancel(t);
                    let partial = lock(&file);
                    for (run, arrived) in block_runs(&manifest, &blocks, partial.received()) {
                        if arrived {
                            blocks_left -= run.end - run.start;
                            delivered.push((s, run));
                        } else {
                            queue.push_back(run);
                        }
                    }
                }
                continue;
            }
        }
        let resting = state
            .iter()
            .any(|s| matches!(s, SourceState::Resting { .. }));
        if in_flight.is_empty() && !resting {
            // Pieces remain but no source is left to fetch them.
            let _ = lock(&file).checkpoint();
            return Err(match last_error {
                Some(e) => e.into(),
                None => FetchError::Unreachable {
                    servers: servers.to_vec(),
                    waited: started.elapsed(),
                },
            });
        }
        let mut dropped: Vec<usize> = Vec::new();
        for ended in engine.turn()? {
            let Some((s, blocks, began)) = in_flight.remove(&ended.transfer) else {
                continue;
            };
            drop(ended.sink);
            let mut arrived = false;
            match ended.outcome {
                Outcome::Completed { .. } => {
                    add_stats(&mut stats, &ended.stats);
                    arrived = true;
                    let piece = byte_range(&manifest, &blocks);
                    let secs = began.elapsed().as_secs_f64().max(1e-3);
                    rate[s] = Some((piece.end - piece.start) as f64 / secs);
                }
                Outcome::Failed(err) if err.is_silence() => {
                    state[s] = state[s].silenced(Instant::now());
                }
                Outcome::Failed(TransferError::Busy) => {
                    // Its slots are taken (by other clients, or this one's other pieces).
                    state[s] = state[s].silenced(Instant::now());
                }
                Outcome::Failed(err) => {
                    last_error = Some(err);
                    state[s] = SourceState::Failed;
                }
                Outcome::WrongSize { .. } | Outcome::NoSpace(_) => state[s] = SourceState::Failed,
            }
            if arrived {
                blocks_left -= blocks.end - blocks.start;
                delivered.push((s, blocks));
            } else {
                queue.push_back(blocks);
            }
            if state[s] != SourceState::Active {
                dropped.push(s);
            }
        }
        // A source silent for a piece is set aside.
        let now = Instant::now();
        for (&t, &(s, ..)) in &in_flight {
            if state[s] == SourceState::Active
                && engine.silent_for(t).is_some_and(|d| d >= SILENCE)
            {
                state[s] = state[s].silenced(now);
                dropped.push(s);
            }
        }
        // A source set aside or left out gives back its pieces.
        for s in dropped {
            let theirs: Vec<TransferId> = in_flight
                .iter()
                .filter(|(_, (src, ..))| *src == s)
                .map(|(&t, _)| t)
                .collect();
            for t in theirs {
                engine.cancel(t);
                if let Some((_, blocks, _)) = in_flight.remove(&t) {
                    queue.push_back(blocks);
                }
            }
        }
        digest.advance(&file, false)?;
        if last_progress.elapsed() >= client.config.transfer.progress_interval {
            last_progress = Instant::now();
            let done = lock(&file).received().covered().min(manifest.size);
            progress(&Progress {
                bytes_done: done,
                total: manifest.size,
                stats: stats.clone(),
                waiting: None,
            });
        }
    }
    // The digest matched.
    engine.finish(linger_for(&stats));
    let Some(partial) =
        Arc::into_inner(file).map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
    else {
        return Err(lost());
    };
    let bad_sources: Vec<SocketAddr> = servers
        .iter()
        .zip(&state)
        .filter(|(_, s)| **s == SourceState::Lied)
        .map(|(a, _)| *a)
        .collect();
    progress(&Progress {
        bytes_done: manifest.size,
        total: manifest.size,
        stats: stats.clone(),
        waiting: None,
    });
    let path = partial.finalize()?;
    if let Some(out) = &options.output {
        client.publish(&id, out, true)?;
    }
    Ok(Report {
        object: id,
        size: manifest.size,
        path,
        from_cache: false,
        resumed_bytes,
        salvaged_bytes,
        reused_bytes,
        damaged_entry: None,
        repaired_bytes: 0,
        path_restarts: 0,
        duration: started.elapsed(),
        stats,
        bad_sources,
    })
}

/// Asks every source for the manifest of `id` at once (see the module docs) and returns the
/// one most of them agree on, with each source's starting state: active if it answered with a
/// manifest, resting if it has not answered yet, failed if it refused. Fails with
/// `NotFound` when every source that answered refused, and with `Unreachable` when none
/// answered at all (within [`MANIFEST_WAIT`] or the overall timeout).
fn manifests(
    engine: &mut Engine<'_>,
    servers: &[SocketAddr],
    id: ObjectId,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(Manifest, Vec<SourceState>), FetchError> {
    let job = |server| manifest_job(server, id);
    let started = engine.started();
    let mut pending: HashMap<TransferId, (usize, u32)> = HashMap::new();
    for (s, &server) in servers.iter().enumerate() {
        pending.insert(engine.start(job(server))?, (s, 1));
    }
    let mut got: Vec<Option<Manifest>> = vec![None; servers.len()];
    let mut state = vec![SourceState::Resting {
        until: started + RETRY_AFTER,
        times: 1,
    }; servers.len()];
    let mut refusal: Option<TransferError> = None;
    let mut first: Option<Instant> = None;
    let mut told: Option<Instant> = None;
    while !pending.is_empty() {
        let now = Instant::now();
        if first.is_none() && told.is_none_or(|at| now - at >= Duration::from_secs(1)) {
            // Nothing yet: say whom the download waits for.
            told = Some(now);
            let silent: Vec<SocketAddr> = pending.values().map(|&(s, _)| servers[s]).collect();
            progress(&Progress {
                bytes_done: 0,
                total: 0,
                stats: Stats::default(),
                waiting: Some(Waiting::Answer {
                    servers: silent,
                    waited: now - started,
                }),
            });
        }
        let waited = match first {
            Some(at) => at.elapsed() >= MANIFEST_GRACE.max(at - started),
            None => now - started >= MANIFEST_WAIT,
        };
        if waited {
            break;
        }
        let ended = match engine.turn() {
            Ok(ended) => ended,
            Err(FetchError::Deadline(_)) if refusal.is_none() && first.is_none() => {
                return Err(FetchError::Unreachable {
                    servers: servers.to_vec(),
                    waited: started.elapsed(),
                })
            }
            Err(e) => return Err(e),
        };
        for ended in ended {
            let Some((s, attempts)) = pending.remove(&ended.transfer) else {
                continue;
            };
            let again = match (ended.outcome, ended.sink) {
                (Outcome::Completed { .. }, Sink::Memory(bytes)) => {
                    match Manifest::decode(&bytes, &id) {
                        Ok(m) => {
                            got[s] = Some(m);
                            state[s] = SourceState::Active;
                            first.get_or_insert_with(Instant::now);
                            false
                        }
                        // Altered on its way: ask again.
                        Err(_) => true,
                    }
                }
                (Outcome::Failed(err), _) if err.is_silence() => false,
                (Outcome::Failed(err), _) => {
                    // It answered, but not with a manifest: an altered request names another
                    // object, so a "not found" is asked once more.
                    state[s] = SourceState::Failed;
                    let retry = matches!(err, TransferError::NotFound);
                    refusal = Some(err);
                    retry
                }
                _ => false,
            };
            if again && attempts < MANIFEST_ATTEMPTS {
                pending.insert(engine.start(job(servers[s]))?, (s, attempts + 1));
            }
        }
    }
    for (t, _) in pending.drain() {
        engine.cancel(t);
    }
    // The manifest most sources agree on.
    let mut candidates: Vec<(&Manifest, usize)> = Vec::new();
    for m in got.iter().flatten() {
        match candidates.iter_mut().find(|(c, _)| *c == m) {
            Some((_, n)) => *n += 1,
            None => candidates.push((m, 1)),
        }
    }
    candidates.sort_by_key(|c| std::cmp::Reverse(c.1));
    match candidates.first() {
        Some((m, _)) => Ok(((*m).clone(), state)),
        None => Err(match refusal {
            Some(err) => err.into(),
            None => FetchError::Unreachable {
                servers: servers.to_vec(),
                waited: started.elapsed(),
            },
        }),
    }
}

/// How many blocks the next piece for a source of `rate` should have: [`PIECE_TIME`] of its
/// rate (the first piece, before a rate is known, is [`PIECE_BYTES`]), bounded by
///
/// - [`MAX_PIECE_BYTES`], and an even share of [`DIGEST_AHEAD`] among the pieces the `active`
///   sources may have in flight, so that one source's pieces never hold the others back (see
///   [`digest_allows`]);
/// - an even share of what is left among the `active` sources, so that the end of the download
///   is not one slow source's piece, but never less than [`PIECE_BYTES`] (unless less is
///   left): halving shares made a tail of pieces of a block or two, each a request of its own.
fn piece_blocks(
    manifest: &Manifest,
    rate: Option<f64>,
    queue: &VecDeque<Range<usize>>,
    active: usize,
) -> usize {
    let block = u64::from(manifest.block_size).max(1);
    let bytes = rate.map_or(PIECE_BYTES, |r| (r * PIECE_TIME.as_secs_f64()) as u64);
    // Every source's pieces fit within what the digest lets the download ask for ahead.
    let largest = (DIGEST_AHEAD / (PIECES_PER_SOURCE * active.max(1)) as u64)
        .clamp(PIECE_BYTES, MAX_PIECE_BYTES);
    let wanted = (bytes.clamp(PIECE_BYTES, largest) / block).max(1) as usize;
    let smallest = (PIECE_BYTES / block).max(1) as usize;
    let left: usize = queue.iter().map(|r| r.end - r.start).sum();
    let share = left.div_ceil(active.max(1));
    wanted.min(share.max(smallest))
}

/// Takes the next piece off the queue: its first range, grown by the ranges right after it
/// (the queue holds the object's units in order until failures put some back at its end)
/// while it has fewer than `blocks` blocks; a range longer than that is split.
fn take_piece(queue: &mut VecDeque<Range<usize>>, blocks: usize) -> Option<Range<usize>> {
    let mut piece = queue.pop_front()?;
    if piece.end - piece.start > blocks {
        queue.push_front(piece.start + blocks..piece.end);
        piece.end = piece.start + blocks;
        return Some(piece);
    }
    while piece.end - piece.start < blocks {
        let Some(next) = queue.front_mut() else { break };
        if next.start != piece.end {
            break;
        }
        let take = (blocks - (piece.end - piece.start)).min(next.end - next.start);
        piece.end += take;
        next.start += take;
        if next.start == next.end {
            queue.pop_front();
        }
    }
    Some(piece)
}

/// A piece in flight is shared out again (see [`piece_to_share`]) only when it has at least
/// this much missing...
const SHARE_MIN_BYTES: u64 = 2 * PIECE_BYTES;
/// ... and would take at least this long more at its rate so far.
const SHARE_MIN_TIME: Duration = Duration::from_millis(50);
/// A piece's rate is judged only once it has run this long.
const SHARE_AFTER: Duration = Duration::from_millis(20);

/// When the queue is empty and an active source has room for a piece, the piece of another
/// source that would take longest to finish at its rate so far, if that is more than
/// [`SHARE_MIN_TIME`] and its missing bytes are at least [`SHARE_MIN_BYTES`]. The caller cancels
/// it and queues its missing blocks, which the idle source and the busy one then share: without
/// this, a download from a fast and a slow source ended with the slow one alone finishing a
/// piece of up to 32 MiB (two loopback servers: the last 0.3 s of 0.7 s).
fn piece_to_share(
    manifest: &Manifest,
    state: &[SourceState],
    in_flight: &HashMap<TransferId, (usize, Range<usize>, Instant)>,
    partial: &PartialFile,
) -> Option<TransferId> {
    let busy = |s: usize| in_flight.values().filter(|(src, ..)| *src == s).count();
    let idle: Vec<usize> = (0..state.len())
        .filter(|&s| state[s] == SourceState::Active && busy(s) < PIECES_PER_SOURCE)
        .collect();
    let now = Instant::now();
    let mut longest: Option<(TransferId, f64)> = None;
    for (&t, (s, blocks, began)) in in_flight {
        if idle.iter().all(|i| i == s) {
            continue; // only another source can take over
        }
        let age = now.saturating_duration_since(*began);
        let range = byte_range(manifest, blocks);
        let missing: u64 = partial
            .received()
            .gaps(range.clone())
            .map(|g| g.end - g.start)
            .sum();
        let arrived = (range.end - range.start) - missing;
        if age < SHARE_AFTER || missing < SHARE_MIN_BYTES {
            continue;
        }
        let secs_left = if arrived == 0 {
            f64::INFINITY
        } else {
            missing as f64 * age.as_secs_f64() / arrived as f64
        };
        if secs_left >= SHARE_MIN_TIME.as_secs_f64()
            && longest.is_none_or(|(_, longest)| secs_left > longest)
        {
            longest = Some((t, secs_left));
        }
    }
    longest.map(|(t, _)| t)
}

/// The blocks of `blocks` in runs, each with whether all its bytes arrived.
fn block_runs(
    manifest: &Manifest,
    blocks: &Range<usize>,
    received: &RangeSet,
) -> Vec<(Range<usize>, bool)> {
    let mut runs: Vec<(Range<usize>, bool)> = Vec::new();
    for i in blocks.clone() {
        let arrived = received.contains_range(manifest.block_range(i));
        match runs.last_mut() {
            Some((run, a)) if *a == arrived => run.end = i + 1,
            _ => runs.push((i..i + 1, arrived)),
        }
    }
    runs
}

fn byte_range(manifest: &Manifest, blocks: &Range<usize>) -> Range<u64> {
    let start = manifest.block_range(blocks.start).start;
    let end = if blocks.end == 0 {
        start
    } else {
        manifest.block_range(blocks.end - 1).end
    };
    start..end
}

/// The sources that delivered a block of `delivered` that does not have the manifest's strong
/// hash in the partial file (a block that cannot be read counts as not matching).
fn liars(
    manifest: &Manifest,
    delivered: &[(usize, Range<usize>)],
    partial: &mut PartialFile,
) -> Vec<usize> {
    let mut buf = vec![0u8; manifest.block_size as usize];
    let mut liars: Vec<usize> = Vec::new();
    for (source, blocks) in delivered {
        if liars.contains(source) {
            continue;
        }
        let lied = blocks.clone().any(|i| {
            let r = manifest.block_range(i);
            let len = (r.end - r.start) as usize;
            partial.read_at(r.start, &mut buf[..len]).is_err() || {
                let d: [u8; 16] = Md5::digest(&buf[..len]);
                d[..8] != manifest.blocks[i].1
            }
        });
        if lied {
            liars.push(*source);
        }
    }
    liars
}

/// Bytes a download may have received or asked for beyond what its digest was handed.
const DIGEST_AHEAD: u64 = 64 << 20;

/// Whether the piece `next` may start now: with it, the bytes received or asked for beyond what
/// the digest was handed stay within [`DIGEST_AHEAD`], or it holds the bytes the digest waits
/// for. Without this a download from several fast sources ran far ahead of MD5 (two loopback
/// servers: every byte in 0.28 s, the digest 0.4 s later, alone on one core) and took the core
/// the digest needed; a single-source download is held to its digest's pace the same way (its
/// hash thread's queue is bounded). Links slower than MD5 never reach the bound.
fn digest_allows(
    manifest: &Manifest,
    next: &Range<usize>,
    in_flight: &HashMap<TransferId, (usize, Range<usize>, Instant)>,
    digest: &InOrderDigest,
    partial: &PartialFile,
) -> bool {
    let received = partial.received();
    let waited_for = received.first_missing_from(digest.hashed);
    let next = byte_range(manifest, next);
    if next.start <= waited_for {
        return true;
    }
    let asked: u64 = in_flight
        .values()
        .map(|(_, blocks, _)| {
            let r = byte_range(manifest, blocks);
            r.end - r.start
        })
        .sum::<u64>()
        + (next.end - next.start);
    received.covered().saturating_sub(digest.hashed) + asked <= DIGEST_AHEAD
}

/// Bytes read back and handed to the digest at once.
const DIGEST_READ: usize = 256 << 10;

/// The object's digest over the received prefix of a multi-source download's partial file,
/// computed as the pieces arrive. A thread of its own ([`FileHashThread`]) reads the bytes back
/// (from the page cache, mostly) and hashes them: reading them on the receive thread cost it a
/// fifth of its time, and two loopback servers then delivered 0.8x of what one does. Where no
/// thread can start, the bytes are read and hashed here.
struct InOrderDigest {
    id: ObjectId,
    thread: Option<FileHashThread>,
    /// Without a thread: the hasher, and a buffer to read into.
    inline: Option<(crate::id::IdHasher, Vec<u8>)>,
    hashed: u64,
    size: u64,
}

impl InOrderDigest {
    fn new(id: &ObjectId, size: u64) -> Self {
        InOrderDigest {
            id: *id,
            thread: None,
            inline: None,
            hashed: 0,
            size,
        }
    }

    /// Hashes what arrived past the hashed prefix. During the download (`all` false) it hands
    /// over only whole ranges of [`DIGEST_READ`] and only while the thread has room, so the
    /// receive loop never waits for the digest; at the end (`all`) everything.
    fn advance(&mut self, file: &SharedFile, all: bool) -> Result<(), FetchError> {
        let storage = |e: std::io::Error| FetchError::from(TransferError::storage("read", &e));
        loop {
            let mut partial = lock(file);
            let end = partial
                .received()
                .first_missing_from(self.hashed)
                .min(self.size);
            let len = (end - self.hashed).min(DIGEST_READ as u64);
            let full = self.thread.as_ref().is_some_and(FileHashThread::is_full);
            if len == 0 || (!all && (len < DIGEST_READ as u64 || full)) {
                return Ok(());
            }
            let range = self.hashed..self.hashed + len;
            partial.write_out(range.clone()).map_err(storage)?;
            if self.thread.is_none() && self.inline.is_none() {
                match partial
                    .reader()
                    .and_then(|reader| FileHashThread::start(reader, &self.id))
                {
                    Ok(thread) => self.thread = Some(thread),
                    Err(_) => self.inline = Some((self.id.hasher(), Vec::new())),
                }
            }
            match (&mut self.thread, &mut self.inline) {
                (Some(thread), _) => thread.hash(range.clone()),
                (None, Some((hasher, buf))) => {
                    buf.resize(len as usize, 0);
                    partial.read_at(range.start, buf).map_err(storage)?;
                    hasher.update(buf);
                }
                (None, None) => return Err(lost()),
            }
            self.hashed = range.end;
        }
    }

    /// What the whole object hashes to; call it after `advance(.., true)`, once.
    fn finish(&mut self) -> Result<ObjectId, FetchError> {
        if self.hashed < self.size {
            // Every piece arrived, so the prefix reaches the end; a gap means bytes were lost.
            return Err(lost());
        }
        let digest = match (self.thread.take(), self.inline.take()) {
            (Some(mut thread), _) => thread.finish(),
            (None, Some((hasher, _))) => Ok(hasher.finish()),
            // An empty object: nothing was handed over.
            (None, None) => Ok(self.id.hasher().finish()),
        };
        digest.map_err(|e| TransferError::storage("hash", &e).into())
    }
}

fn add_stats(total: &mut Stats, piece: &Stats) {
    total.bytes_received += piece.bytes_received;
    total.datagrams_received += piece.datagrams_received;
    total.datagrams_sent += piece.datagrams_sent;
    total.bytes_sent += piece.bytes_sent;
    total.smoothed_rtt = piece.smoothed_rtt;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Cache;

    #[test]
    fn pieces_grow_over_contiguous_units_and_split_long_ranges() {
        let mut queue: VecDeque<_> = [0..4, 4..8, 8..12, 20..24].into_iter().collect();
        assert_eq!(take_piece(&mut queue, 10), Some(0..10), "grown over three units");
        assert_eq!(queue, [10..12, 20..24]);
        assert_eq!(take_piece(&mut queue, 10), Some(10..12), "stops at a gap");
        assert_eq!(take_piece(&mut queue, 1), Some(20..21), "a long range is split");
        assert_eq!((queue.len(), queue.front()), (1, Some(&(21..24))));
        assert_eq!(take_piece(&mut queue, 8), Some(21..24));
        assert_eq!(take_piece(&mut queue, 8), None);
    }

    /// The queue is empty, source 0 is idle, source 1 has a piece half done at a slow rate: its
    /// missing blocks are shared out. Not a piece of the idle source's own, not one nearly
    /// finished, not one too young to judge, and not when no other source is idle.
    #[test]
    fn a_slow_piece_is_shared_out_when_another_source_is_idle() {
        let dir = std::env::temp_dir().join(format!(
            "udpferry-share-{}-{}",
            std::process::id(),
            crate::random::random_u64()
        ));
        let size: u64 = 8 << 20;
        let data = vec![7u8; size as usize];
        let id = ObjectId::md5_of(&data);
        let manifest = Manifest::build(id, size, &data[..]).unwrap();
        let block = manifest.block_size as usize;
        let blocks = manifest.blocks.len();
        let cache = Cache::open(&dir).unwrap();
        let (mut partial, _) = cache.begin_sized(&id, Some(size)).unwrap();
        // The slow piece: the second half of the object, its first quarter arrived.
        let slow = blocks / 2..blocks;
        let arrived = (slow.end - slow.start) / 4;
        let from = slow.start * block;
        partial
            .write_at(from as u64, &data[from..from + arrived * block])
            .unwrap();
        let now = Instant::now();
        let long_ago = now - Duration::from_secs(1);
        let mut in_flight: HashMap<TransferId, (usize, Range<usize>, Instant)> = HashMap::new();
        in_flight.insert(TransferId(1), (1, slow.clone(), long_ago));
        let active = [SourceState::Active, SourceState::Active];
        assert_eq!(
            piece_to_share(&manifest, &active, &in_flight, &partial),
            Some(TransferId(1))
        );
        let runs = block_runs(&manifest, &slow, partial.received());
        assert_eq!(
            runs,
            vec![
                (slow.start..slow.start + arrived, true),
                (slow.start + arrived..slow.end, false)
            ]
        );
        // Source 1 alone is idle (source 0 failed): nobody can take over.
        let one = [SourceState::Failed, SourceState::Active];
        assert_eq!(piece_to_share(&manifest, &one, &in_flight, &partial), None);
        // Too young to judge its rate.
        in_flight.insert(TransferId(1), (1, slow.clone(), Instant::now()));
        assert_eq!(piece_to_share(&manifest, &active, &in_flight, &partial), None);
        // Nearly done: less than SHARE_MIN_BYTES missing.
        let nearly = slow.end - 1..slow.end;
        in_flight.insert(TransferId(1), (1, nearly, long_ago));
        assert_eq!(piece_to_share(&manifest, &active, &in_flight, &partial), None);
        // Source 0 has both its pieces in flight: not idle.
        in_flight.insert(TransferId(1), (1, slow.clone(), long_ago));
        in_flight.insert(TransferId(2), (0, 0..1, now));
        in_flight.insert(TransferId(3), (0, 1..2, now));
        assert_eq!(piece_to_share(&manifest, &active, &in_flight, &partial), None);
        drop(partial);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// New pieces wait while the download is more than DIGEST_AHEAD ahead of its digest, except
    /// the piece that holds the bytes the digest waits for.
    #[test]
    fn new_pieces_wait_for_a_digest_far_behind_except_the_one_it_needs() {
        let dir = std::env::temp_dir().join(format!(
            "udpferry-ahead-{}-{}",
            std::process::id(),
            crate::random::random_u64()
        ));
        let size: u64 = 256 << 20;
        let id = ObjectId::md5_of(b"a large object");
        let manifest = Manifest {
            object: id,
            size,
            block_size: 1 << 20,
            blocks: vec![(0, [0; 8]); 256],
        };
        let cache = Cache::open(&dir).unwrap();
        let (mut partial, _) = cache.begin_sized(&id, Some(size)).unwrap();
        // 40 MiB arrived from 8 MiB on; the first 8 MiB (the digest's next bytes) are missing.
        let mib = vec![1u8; 1 << 20];
        for m in 8..48u64 {
            partial.write_at(m << 20, &mib).unwrap();
        }
        let digest = InOrderDigest::new(&id, size);
        let mut in_flight: HashMap<TransferId, (usize, Range<usize>, Instant)> = HashMap::new();
        let now = Instant::now();
        assert!(
            digest_allows(&manifest, &(48..64), &in_flight, &digest, &partial),
            "40 + 16 MiB ahead is within the bound"
        );
        in_flight.insert(TransferId(1), (1, 48..64, now));
        assert!(
            !digest_allows(&manifest, &(64..80), &in_flight, &digest, &partial),
            "40 + 16 + 16 MiB ahead is not"
        );
        assert!(
            digest_allows(&manifest, &(0..8), &in_flight, &digest, &partial),
            "the bytes the digest waits for may always be fetched"
        );
        drop(partial);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
