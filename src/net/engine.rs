//! The download engine. Every download a [`Client`] makes (an object from one server, the
//! pieces of one from several, a manifest, the files of a bundle) is a [`Job`] run by one
//! [`Engine`]: one socket, one [`Endpoint`], one loop that watches the stop flag and the
//! overall timeout, checks each offer against what the job expects and what the disk can hold,
//! keeps what arrived when it stops, and answers late servers when it is done. The callers only
//! choose which jobs to start and what to do with each one that ends.
//!
//! How each job's bytes are checked is explicit ([`Verify`]): by the object's own digest, on a
//! second core, or by the caller (a manifest checks itself; a multi-source piece is checked
//! against the manifest's block hashes).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{
    bind, random_seed, Client, Driver, FetchError, FetchOptions, HashThread, Progress, Waiting,
    MAX_WAIT,
};
use crate::core::{
    ChunkSink, Endpoint, Event, NoObjects, RangeSet, Stats, TransferError, TransferId,
};
use crate::id::ObjectId;
use crate::store::{PartialFile, StoreError};

/// How often a caller is told that a job still waits for its server's first answer.
const WAITING_EVERY: Duration = Duration::from_secs(1);

/// Where a job's bytes go.
// Most jobs write a partial file, and the endpoint holds each sink in place for the whole
// transfer: boxing it would add an indirection to every chunk written.
#[allow(clippy::large_enum_variant)]
pub(super) enum Sink {
    /// The cache's partial file of the object (resumable, journaled).
    File(PartialFile),
    /// One piece of a partial file that several transfers share (multi-source).
    Piece(PieceSink),
    /// Memory: a manifest, checked by its decoder.
    Memory(Vec<u8>),
}

impl ChunkSink for Sink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        match self {
            Sink::File(f) => f.write_at(offset, data),
            Sink::Piece(p) => p.write_at(offset, data),
            Sink::Memory(m) => m.write_at(offset, data),
        }
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self {
            Sink::File(f) => f.read_at(offset, buf),
            Sink::Piece(p) => p.read_at(offset, buf),
            Sink::Memory(m) => m.read_at(offset, buf),
        }
    }
}

/// A partial file that several piece transfers write into at once.
pub(super) type SharedFile = Arc<Mutex<PartialFile>>;

/// Locks a shared file. A holder that panicked left nothing half-written that matters: every
/// piece is checked against the manifest before it counts.
pub(super) fn lock(file: &SharedFile) -> MutexGuard<'_, PartialFile> {
    file.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One piece transfer's view of a shared partial file: it writes only inside its piece (a
/// lying source cannot touch its neighbours' bytes), and reads outside it as zeros.
pub(super) struct PieceSink {
    pub(super) file: SharedFile,
    pub(super) piece: Range<u64>,
}

impl ChunkSink for PieceSink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset + data.len() as u64;
        let (from, to) = (offset.max(self.piece.start), end.min(self.piece.end));
        if from >= to {
            return Ok(());
        }
        let slice = &data[(from - offset) as usize..(to - offset) as usize];
        lock(&self.file).write_at(from, slice)
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        if offset >= self.piece.start && end <= self.piece.end {
            return lock(&self.file).read_at(offset, buf);
        }
        buf.fill(0);
        Ok(())
    }
}

/// What a job expects the server to offer; any other offer is cancelled before its Start goes
/// out (the server is told, no data is sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expect {
    /// Any size the endpoint's limits allow.
    Any,
    /// Exactly this size (a bundle's listing or a manifest gives it).
    Size(u64),
    /// At most this size (a manifest, a bundle listing).
    AtMost(u64),
}

/// How a job's bytes are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verify {
    /// By the id's own digest, computed on a second core ([`HashThread`]) or, if no thread
    /// can start, on this one: the transfer completes only when the digest matches.
    Digest,
    /// By the caller, once the job ends: the transfer completes when every byte arrived.
    ByCaller,
}

/// One download for the [`Engine`].
pub(super) struct Job {
    pub(super) server: SocketAddr,
    pub(super) id: ObjectId,
    /// Byte ranges already held (not asked for).
    pub(super) have: RangeSet,
    pub(super) sink: Sink,
    pub(super) expect: Expect,
    pub(super) verify: Verify,
}

/// How a job ended.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Every byte arrived (and matched the digest, with [`Verify::Digest`]).
    Completed { size: u64 },
    /// The transfer failed, or was cancelled.
    Failed(TransferError),
    /// The server offered another size than the job expects.
    WrongSize { expected: u64, offered: u64 },
    /// The disk cannot hold the offered object.
    NoSpace(StoreError),
}

/// A job that ended: its outcome, its sink back, and its transfer's counters.
pub(super) struct Ended {
    pub(super) transfer: TransferId,
    pub(super) outcome: Outcome,
    pub(super) sink: Sink,
    pub(super) stats: Stats,
}

/// A job in flight.
struct Live {
    expect: Expect,
    /// Set when the engine cancelled the transfer at its offer, and why.
    refused: Option<Outcome>,
    done: u64,
    total: u64,
    /// A progress event arrived since [`Engine::progress`] last looked.
    moved: bool,
    /// When the server was last heard from for this job (its offer, or bytes), or when the
    /// job started.
    heard: Instant,
    server: SocketAddr,
    /// The server offered the object (or refused it).
    answered: bool,
    /// The server queued the job: how many go first (until its first bytes).
    queued: Option<u32>,
    /// When the caller was last told that the job waits for an answer.
    told_waiting: Option<Instant>,
}

/// Runs [`Job`]s over one socket (bound on first use, to the wildcard address of the first
/// server's family unless the client names one) and one endpoint; see the module docs.
pub(super) struct Engine<'a> {
    client: &'a Client,
    options: &'a FetchOptions,
    started: Instant,
    driver: Option<Driver>,
    endpoint: Endpoint<NoObjects, Sink>,
    live: HashMap<TransferId, Live>,
}

impl<'a> Engine<'a> {
    /// An engine for one call of the client's: `options`' stop flag and timeout count from now.
    pub(super) fn new(client: &'a Client, options: &'a FetchOptions) -> Self {
        let mut config = client.config.clone();
        config.seed = random_seed();
        Engine {
            client,
            options,
            started: Instant::now(),
            driver: None,
            endpoint: Endpoint::new(config, NoObjects),
            live: HashMap::new(),
        }
    }

    /// When the call began.
    pub(super) fn started(&self) -> Instant {
        self.started
    }

    /// Binds the engine's socket, if it has none yet, for talking to `servers`: the client's
    /// address if it names one, else the IPv4 wildcard for IPv4 servers only and the IPv6
    /// wildcard (dual-stack: IPv4 servers too) as soon as one server is IPv6. Call it before
    /// the first [`start`](Self::start) when the servers are known; `start` binds for its
    /// job's server otherwise.
    pub(super) fn bind_for(&mut self, servers: &[SocketAddr]) -> io::Result<()> {
        if self.driver.is_none() {
            let v4 = SocketAddr::from(([0u8; 4], 0));
            let socket = match self.client.bind {
                Some(local) => bind(local).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot send from {local}: {e}"))
                })?,
                // Dual-stack; where IPv6 is off, IPv4 still works.
                None if servers.iter().any(|s| s.is_ipv6()) => {
                    bind(SocketAddr::from(([0u16; 8], 0))).or_else(|_| bind(v4))?
                }
                None => bind(v4)?,
            };
            self.driver = Some(Driver::new(socket)?.with_framing(self.client.framing));
        }
        Ok(())
    }

    /// Starts `job`. Its datagrams go out on the next [`turn`](Self::turn). Fails only when no
    /// socket can be bound.
    pub(super) fn start(&mut self, job: Job) -> io::Result<TransferId> {
        self.bind_for(&[job.server])?;
        let transfer =
            self.endpoint
                .fetch(Instant::now(), job.server, job.id, &job.have, job.sink);
        match job.verify {
            Verify::ByCaller => {
                self.endpoint.verify_by_caller(transfer);
            }
            Verify::Digest => {
                self.endpoint
                    .set_hasher(transfer, HashThread::or_inline(&job.id));
            }
        }
        self.live.insert(
            transfer,
            Live {
                expect: job.expect,
                refused: None,
                done: job.have.covered(),
                total: 0,
                moved: false,
                heard: Instant::now(),
                server: job.server,
                answered: false,
                queued: None,
                told_waiting: None,
            },
        );
        Ok(transfer)
    }

    /// Why the call must stop now, if it must: the caller's stop flag, or the overall timeout.
    fn must_stop(&self) -> Option<FetchError> {
        self.options.stop_reason(self.started)
    }

    /// How long a step may still take before the overall timeout, capped at `step`.
    pub(super) fn time_left(&self, step: Duration) -> Duration {
        self.options
            .timeout
            .map_or(step, |t| t.saturating_sub(self.started.elapsed()).min(step))
    }

    /// One pass of the loop: sends what is due, waits (at most 50 ms) for a datagram or a
    /// timer, handles what came, and returns the jobs that ended. When the stop flag is set or
    /// the overall timeout passed, every job in flight is cancelled (the servers are told), what
    /// arrived is kept for a resume, and the reason is returned.
    pub(super) fn turn(&mut self) -> Result<Vec<Ended>, FetchError> {
        if let Some(why) = self.must_stop() {
            self.stop_all();
            return Err(why);
        }
        let Some(driver) = self.driver.as_mut() else {
            // Nothing started yet (a caller waiting to retry a busy server).
            std::thread::sleep(MAX_WAIT);
            return Ok(Vec::new());
        };
        let live = &mut self.live;
        let mut ended = Vec::new();
        let turned = driver.turn(&mut self.endpoint, MAX_WAIT, &mut |ep, e| {
            let Some(job) = live.get_mut(&e.transfer) else {
                return;
            };
            match e.event {
                Event::Started { size } => {
                    job.heard = Instant::now();
                    job.answered = true;
                    job.total = size;
                    job.refused = offer_refused(ep, e.transfer, job.expect, size);
                    if job.refused.is_some() {
                        // Before the Start goes out: the server is told, nothing is sent.
                        ep.cancel(e.transfer);
                    }
                }
                Event::Queued { ahead } => {
                    job.heard = Instant::now();
                    job.queued = Some(ahead);
                    // Told at once: a new place is news.
                    job.told_waiting = None;
                }
                Event::Progress { bytes_done, total } => {
                    job.heard = Instant::now();
                    job.queued = None;
                    job.done = bytes_done;
                    job.total = total;
                    job.moved = true;
                }
                Event::Completed(c) => ended.push((e.transfer, Outcome::Completed { size: c.size })),
                Event::Failed(err) => ended.push((e.transfer, Outcome::Failed(err))),
            }
        });
        if let Err(e) = turned {
            self.stop_all();
            return Err(e.into());
        }
        let mut out = Vec::with_capacity(ended.len());
        for (transfer, outcome) in ended {
            let Some(job) = self.live.remove(&transfer) else {
                continue;
            };
            let stats = self.endpoint.transfer_stats(transfer).unwrap_or_default();
            let Some(sink) = self.endpoint.take_sink(transfer) else {
                continue;
            };
            let outcome = match (outcome, job.refused) {
                (Outcome::Failed(_), Some(why)) => why,
                (outcome, _) => outcome,
            };
            out.push(Ended {
                transfer,
                outcome,
                sink,
                stats,
            });
        }
        Ok(out)
    }

    /// Runs one job to its end, calling `progress` as bytes arrive, and once a second while it
    /// waits for the server's first answer; `limit`, if given, cancels it after that long (it
    /// then fails as timed out).
    pub(super) fn run(
        &mut self,
        job: Job,
        limit: Option<Duration>,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Ended, FetchError> {
        let transfer = self.start(job)?;
        let until = limit.and_then(|l| Instant::now().checked_add(l));
        loop {
            if until.is_some_and(|u| Instant::now() >= u) {
                let sink = self.cancel(transfer);
                let stats = self.endpoint.transfer_stats(transfer).unwrap_or_default();
                let waited = limit.unwrap_or_default();
                return match sink {
                    Some(sink) => Ok(Ended {
                        transfer,
                        outcome: Outcome::Failed(TransferError::TimedOut(waited)),
                        sink,
                        stats,
                    }),
                    None => Err(lost()),
                };
            }
            for ended in self.turn()? {
                if ended.transfer == transfer {
                    return Ok(ended);
                }
            }
            if let Some(p) = self.progress(transfer) {
                progress(&p);
            }
        }
    }

    /// How a job in flight is doing, if there is news since the last look: bytes moved, or it
    /// still waits for the server's first answer (told once a second, from the start).
    pub(super) fn progress(&mut self, transfer: TransferId) -> Option<Progress> {
        let job = self.live.get_mut(&transfer)?;
        let waits = job.queued.is_some() || !job.answered;
        let waiting = if !waits {
            None
        } else if job.told_waiting.is_none_or(|at| at.elapsed() >= WAITING_EVERY) {
            job.told_waiting = Some(Instant::now());
            Some(match job.queued {
                Some(ahead) => Waiting::Slot { ahead },
                None => Waiting::Answer {
                    servers: vec![job.server],
                    waited: job.heard.elapsed(),
                },
            })
        } else {
            return None;
        };
        if waiting.is_none() && !std::mem::take(&mut job.moved) {
            return None;
        }
        Some(Progress {
            bytes_done: job.done,
            total: job.total,
            stats: self.endpoint.transfer_stats(transfer).unwrap_or_default(),
            waiting,
        })
    }

    /// How long the server of a job in flight has been silent for it: since its offer, its
    /// last place in its queue or its last bytes, or since the job started if it never
    /// answered.
    /// A job the server has queued is not silent: its Waits keep coming (the receiver's idle
    /// timeout ends it if they stop).
    pub(super) fn silent_for(&self, transfer: TransferId) -> Option<Duration> {
        let job = self.live.get(&transfer)?;
        Some(match job.queued {
            Some(_) => Duration::ZERO,
            None => job.heard.elapsed(),
        })
    }

    /// Bytes held by the jobs in flight, added up.
    pub(super) fn held(&self) -> u64 {
        self.live.values().map(|j| j.done).sum()
    }

    /// Cancels a job in flight (the server is told) and hands its sink back.
    pub(super) fn cancel(&mut self, transfer: TransferId) -> Option<Sink> {
        self.live.remove(&transfer);
        self.endpoint.cancel(transfer);
        self.endpoint.take_sink(transfer)
    }

    /// Cancels every job in flight, tells the servers, and keeps what arrived (checkpoints).
    fn stop_all(&mut self) {
        let transfers: Vec<TransferId> = self.live.keys().copied().collect();
        for transfer in transfers {
            if let Some(sink) = self.cancel(transfer) {
                keep(sink);
            }
        }
        if let Some(driver) = self.driver.as_mut() {
            driver.flush(&mut self.endpoint);
        }
    }

    /// Sends what is due (the Done of a job that just ended, say).
    pub(super) fn flush(&mut self) {
        if let Some(driver) = self.driver.as_mut() {
            driver.flush(&mut self.endpoint);
        }
    }

    /// Closes the socket once no job is in flight, so that the next [`start`](Self::start) binds
    /// a fresh one (another port; the interface the system routes by now): a download starting
    /// over after its path went silent does not rely on the socket that lost it.
    pub(super) fn new_socket(&mut self) {
        if self.live.is_empty() {
            self.flush();
            self.driver = None;
        }
    }

    /// Ends the call: jobs still in flight are cancelled (what arrived is kept), and a server
    /// that missed a Done is answered for up to `linger` in the background, so the caller has
    /// its result at once. If the process exits first, the server times out on its own.
    pub(super) fn finish(mut self, linger: Duration) {
        self.stop_all();
        let Some(mut driver) = self.driver.take() else {
            return;
        };
        let mut endpoint = self.endpoint;
        driver.flush(&mut endpoint);
        let answer = move || {
            let until = Instant::now() + linger;
            while Instant::now() < until && endpoint.poll_timeout().is_some() {
                if driver.turn(&mut endpoint, MAX_WAIT, &mut |_, _| {}).is_err() {
                    break;
                }
            }
        };
        let _ = std::thread::Builder::new()
            .name("udpferry-linger".into())
            .spawn(answer);
    }
}

/// Why an offer of `size` for `transfer` is refused, if it is: not what the job expects, or
/// more than the disk can hold (checked on the partial file, which learns its size here).
fn offer_refused(
    ep: &mut Endpoint<NoObjects, Sink>,
    transfer: TransferId,
    expect: Expect,
    size: u64,
) -> Option<Outcome> {
    match expect {
        Expect::Size(expected) if expected != size => {
            return Some(Outcome::WrongSize {
                expected,
                offered: size,
            })
        }
        Expect::AtMost(max) if size > max => {
            return Some(Outcome::Failed(TransferError::TooLarge { size, max }))
        }
        _ => {}
    }
    match ep.sink_mut(transfer) {
        Some(Sink::File(partial)) => {
            partial.set_size(size);
            partial.ensure_space().err().map(Outcome::NoSpace)
        }
        _ => None,
    }
}

/// Keeps what a sink holds for a resume: a partial file writes its journal.
pub(super) fn keep(sink: Sink) {
    match sink {
        Sink::File(mut partial) => {
            let _ = partial.checkpoint();
        }
        Sink::Piece(piece) => {
            let _ = lock(&piece.file).checkpoint();
        }
        Sink::Memory(_) => {}
    }
}

/// The error for a transfer whose sink the endpoint no longer holds (a bug, not an input).
pub(super) fn lost() -> FetchError {
    FetchError::Internal("a download lost its partial file")
}
