//! Multi-source downloads for [`Client::fetch_from`](super::Client::fetch_from): the object is
//! cut into pieces along its manifest's blocks, each source fetches one piece at a time (a
//! transfer whose have-set is everything but that piece), every piece is checked against the
//! manifest's block hashes, and a source that fails or lies is dropped and its pieces go to the
//! others. Faster sources finish pieces sooner and so get more of them.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::rc::Rc;
use std::time::{Duration, Instant};

use md5::{Digest, Md5};

use super::{delta, FetchError, FetchOptions, Progress, Report, MAX_WAIT};
use crate::core::{
    ChunkSink, Endpoint, Event, NoObjects, RangeSet, Stats, TransferError, TransferId,
};
use crate::id::ObjectId;
use crate::store::manifest::Manifest;
use crate::store::{Cache, PartialFile};

/// Bytes per piece (rounded to whole manifest blocks).
const PIECE_BYTES: u64 = 256 << 10;
/// Pieces in flight per source: the next one's handshake overlaps the current one's tail.
const PIECES_PER_SOURCE: usize = 2;
/// Longest a source may take to deliver its manifest before it is left out.
const MANIFEST_WAIT: Duration = Duration::from_secs(3);

/// One piece transfer's view of the shared partial file: it writes only inside its piece (a
/// lying source cannot touch its neighbours' bytes), and reads outside it as zeros. The piece's
/// receiver computes no digest (`verify_by_caller`): the piece is checked against the
/// manifest's block hashes when it completes.
struct PieceSink {
    file: Rc<RefCell<PartialFile>>,
    piece: Range<u64>,
}

impl ChunkSink for PieceSink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset + data.len() as u64;
        let (from, to) = (offset.max(self.piece.start), end.min(self.piece.end));
        if from >= to {
            return Ok(());
        }
        let slice = &data[(from - offset) as usize..(to - offset) as usize];
        self.file.borrow_mut().write_at(from, slice)
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        if offset >= self.piece.start && end <= self.piece.end {
            return self.file.borrow_mut().read_at(offset, buf);
        }
        buf.fill(0);
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceState {
    Active,
    /// Failed (timed out, refused, errored): left out.
    Failed,
    /// Delivered bytes that did not match the manifest: left out and named.
    Lied,
}

/// The multi-source download; see the module docs.
pub(super) fn fetch_from(
    servers: &[SocketAddr],
    id: ObjectId,
    options: &FetchOptions,
    progress: &mut dyn FnMut(&Progress),
    started: Instant,
    cache: &Cache,
) -> Result<Report, FetchError> {
    let first = servers
        .first()
        .copied()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no server given"))?;
    let mut driver = options.driver_for(first)?;

    // Manifests: every source's; the one most of them agree on is used.
    let mut candidates: Vec<(Manifest, usize)> = Vec::new();
    for &server in servers {
        if let Ok(m) = delta::fetch_manifest(
            &mut driver,
            server,
            id,
            options.endpoint.clone(),
            MANIFEST_WAIT,
        )? {
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

    let (mut partial, have) = cache.begin_sized(&id, Some(manifest.size))?;
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
        delta::reuse_blocks(&manifest, &bases, &mut partial)?
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
    let file = Rc::new(RefCell::new(partial));
    let mut config = options.endpoint.clone();
    config.seed = super::random_seed();
    let mut endpoint: Endpoint<NoObjects, PieceSink> = Endpoint::new(config, NoObjects);
    let mut state = vec![SourceState::Active; servers.len()];
    let mut in_flight: HashMap<TransferId, (usize, Range<usize>)> = HashMap::new();
    let mut done_pieces = 0usize;
    let mut stats = Stats::default();
    let mut last_progress = Instant::now();

    while done_pieces < total_pieces {
        if let Some(limit) = options.timeout {
            if started.elapsed() >= limit {
                for (&t, _) in in_flight.iter() {
                    endpoint.cancel(t);
                }
                driver.flush(&mut endpoint);
                let _ = file.borrow_mut().checkpoint();
                return Err(FetchError::Deadline(limit));
            }
        }
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
                let sink = PieceSink {
                    file: file.clone(),
                    piece,
                };
                let t = endpoint.fetch(Instant::now(), server, id, &have, sink);
                endpoint.verify_by_caller(t);
                in_flight.insert(t, (s, blocks));
            }
        }
        if in_flight.is_empty() {
            // Pieces remain but no source is left to fetch them.
            let _ = file.borrow_mut().checkpoint();
            return Err(TransferError::TimedOut(started.elapsed()).into());
        }
        let mut finished: Vec<(TransferId, Result<Stats, TransferError>)> = Vec::new();
        driver.turn(&mut endpoint, MAX_WAIT, &mut |_, e| match e.event {
            Event::Completed(c) => finished.push((e.transfer, Ok(c.stats))),
            Event::Failed(err) => finished.push((e.transfer, Err(err))),
            _ => {}
        })?;
        for (t, outcome) in finished {
            let _ = endpoint.take_sink(t);
            let Some((s, blocks)) = in_flight.remove(&t) else {
                continue;
            };
            match outcome {
                Ok(piece_stats) => {
                    add_stats(&mut stats, &piece_stats);
                    if blocks_match(&manifest, &blocks, &mut file.borrow_mut()) {
                        done_pieces += 1;
                    } else {
                        state[s] = SourceState::Lied;
                        queue.push_back(blocks);
                    }
                }
                Err(_) => {
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
                    endpoint.cancel(t);
                    if let Some((_, blocks)) = in_flight.remove(&t) {
                        queue.push_back(blocks);
                    }
                    let _ = endpoint.take_sink(t);
                }
            }
        }
        if last_progress.elapsed() >= options.endpoint.transfer.progress_interval {
            last_progress = Instant::now();
            let done = file.borrow().received().covered().min(manifest.size);
            progress(&Progress {
                bytes_done: done,
                total: manifest.size,
                stats: stats.clone(),
            });
        }
    }
    driver.flush(&mut endpoint);
    // Every piece matched the manifest; the object's own digest checks the whole.
    drop(endpoint);
    let Some(mut partial) = Rc::into_inner(file).map(RefCell::into_inner) else {
        return Err(io::Error::other("download lost its partial file").into());
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
        cache.copy_out(&id, out)?;
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
