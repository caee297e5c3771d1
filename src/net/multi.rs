//! Multi-source downloads for [`Client::fetch_from`](super::Client::fetch_from): the object is
//! cut into pieces along its manifest's blocks, each source fetches one piece at a time (a
//! transfer whose have-set is everything but that piece), every piece is checked against the
//! manifest's block hashes, and a source that fails or lies is dropped and its pieces go to the
//! others. Faster sources finish pieces sooner and so get more of them.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use md5::{Digest, Md5};

use super::client::{fetch_manifest, linger_for};
use super::engine::{lock, lost, Engine, Expect, Job, Outcome, PieceSink, Sink, Verify};
use super::{Client, FetchError, FetchOptions, Progress, Report};
use crate::core::{ChunkSink, RangeSet, Stats, TransferError, TransferId};
use crate::id::ObjectId;
use crate::store::manifest::Manifest;
use crate::store::{EntryLock, PartialFile};

/// Bytes per piece (rounded to whole manifest blocks).
const PIECE_BYTES: u64 = 256 << 10;
/// Pieces in flight per source: the next one's handshake overlaps the current one's tail.
const PIECES_PER_SOURCE: usize = 2;
/// Longest a source may take to deliver its manifest before it is left out.
const MANIFEST_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceState {
    Active,
    /// Failed (timed out, refused, errored): left out.
    Failed,
    /// Delivered bytes that did not match the manifest: left out and named.
    Lied,
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
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no server given").into());
    }
    let mut engine = Engine::new(client, options);
    let started = engine.started();

    // Manifests: every source's; the one most of them agree on is used.
    let mut candidates: Vec<(Manifest, usize)> = Vec::new();
    for &server in servers {
        if let Some(m) = fetch_manifest(&mut engine, server, id, MANIFEST_WAIT)? {
            match candidates.iter_mut().find(|(c, _)| *c == m) {
                Some((_, n)) => *n += 1,
                None => candidates.push((m, 1)),
            }
        }
    }
    candidates.sort_by_key(|c| std::cmp::Reverse(c.1));
    let Some((manifest, _)) = candidates.into_iter().next() else {
        return Err(TransferError::NotFound.into());
    };

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
    let total_pieces = queue.len();
    let file = Arc::new(Mutex::new(partial));
    let mut state = vec![SourceState::Active; servers.len()];
    let mut in_flight: HashMap<TransferId, (usize, Range<usize>)> = HashMap::new();
    let mut done_pieces = 0usize;
    let mut stats = Stats::default();
    let mut last_progress = started;

    while done_pieces < total_pieces {
        // Hand pieces to active sources with room.
        for (s, &server) in servers.iter().enumerate() {
            while state[s] == SourceState::Active
                && in_flight.values().filter(|(src, _)| *src == s).count() < PIECES_PER_SOURCE
            {
                let Some(blocks) = queue.pop_front() else {
                    break;
                };
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
                    // Each piece is checked against the manifest's block hashes below.
                    verify: Verify::ByCaller,
                })?;
                in_flight.insert(t, (s, blocks));
            }
        }
        if in_flight.is_empty() {
            // Pieces remain but no source is left to fetch them.
            let _ = lock(&file).checkpoint();
            return Err(TransferError::TimedOut(started.elapsed()).into());
        }
        for ended in engine.turn()? {
            let Some((s, blocks)) = in_flight.remove(&ended.transfer) else {
                continue;
            };
            drop(ended.sink);
            match ended.outcome {
                Outcome::Completed { .. } => {
                    add_stats(&mut stats, &ended.stats);
                    if blocks_match(&manifest, &blocks, &mut lock(&file)) {
                        done_pieces += 1;
                    } else {
                        state[s] = SourceState::Lied;
                        queue.push_back(blocks);
                    }
                }
                _ => {
                    if state[s] == SourceState::Active {
                        state[s] = SourceState::Failed;
                    }
                    queue.push_back(blocks);
                }
            }
            // A source left out gives back its other pieces.
            if state[s] != SourceState::Active {
                let theirs: Vec<TransferId> = in_flight
                    .iter()
                    .filter(|(_, (src, _))| *src == s)
                    .map(|(&t, _)| t)
                    .collect();
                for t in theirs {
                    engine.cancel(t);
                    if let Some((_, blocks)) = in_flight.remove(&t) {
                        queue.push_back(blocks);
                    }
                }
            }
        }
        if last_progress.elapsed() >= client.config.transfer.progress_interval {
            last_progress = std::time::Instant::now();
            let done = lock(&file).received().covered().min(manifest.size);
            progress(&Progress {
                bytes_done: done,
                total: manifest.size,
                stats: stats.clone(),
            });
        }
    }
    // Every piece matched the manifest; the object's own digest checks the whole.
    engine.finish(linger_for(&stats));
    let Some(mut partial) = Arc::into_inner(file).map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner())) else {
        return Err(lost());
    };
    let actual = partial.digest(&id, manifest.size)?;
    let bad_sources: Vec<SocketAddr> = servers
        .iter()
        .zip(&state)
        .filter(|(_, s)| **s == SourceState::Lied)
        .map(|(a, _)| *a)
        .collect();
    if actual != id {
        let _ = partial.discard();
        return Err(TransferError::DigestMismatch {
            expected: id,
            actual,
        }
        .into());
    }
    progress(&Progress {
        bytes_done: manifest.size,
        total: manifest.size,
        stats: stats.clone(),
    });
    let path = partial.finalize()?;
    if let Some(out) = &options.output {
        client.cache.copy_out(&id, out)?;
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
        duration: started.elapsed(),
        stats,
        bad_sources,
    })
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

/// Whether every block of `blocks` in the partial file has the manifest's strong hash.
fn blocks_match(manifest: &Manifest, blocks: &Range<usize>, partial: &mut PartialFile) -> bool {
    let mut buf = vec![0u8; manifest.block_size as usize];
    blocks.clone().all(|i| {
        let r = manifest.block_range(i);
        let len = (r.end - r.start) as usize;
        if partial.read_at(r.start, &mut buf[..len]).is_err() {
            return false;
        }
        let d: [u8; 16] = Md5::digest(&buf[..len]).into();
        d[..8] == manifest.blocks[i].1
    })
}

fn add_stats(total: &mut Stats, piece: &Stats) {
    total.bytes_received += piece.bytes_received;
    total.datagrams_received += piece.datagrams_received;
    total.datagrams_sent += piece.datagrams_sent;
    total.bytes_sent += piece.bytes_sent;
    total.smoothed_rtt = piece.smoothed_rtt;
}
