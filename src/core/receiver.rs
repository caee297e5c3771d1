//! One incoming transfer: the client's side of a download.

use std::ops::Range;
use std::time::{Duration, Instant};

use super::ranges::RangeSet;
use super::report::{emit, Report};
use super::rtt::RttEstimator;
use super::{
    chunk_bytes, chunk_count, held_chunks, later, window_chunks, wire_micros, ChunkSink,
    Completion, Event, InlineHasher, PrefixHasher, Stats, TransferConfig, TransferError,
};
use crate::id::ObjectId;
use crate::wire::{
    self, Ack, AckRanges, ConnectionId, Data, Datagram, Frame, HaveRanges, Offer, Request, Wait,
    ACK_BASE_LEN, HEADER_LEN, MAX_CHUNKS, MIN_CHUNK_SIZE, TRAILER_LEN,
};

/// Shortest interval between repeated Starts while queued, whatever a Wait asks (a damaged or
/// hostile Wait cannot make the client flood the server).
const MIN_WAIT_REPEAT_MS: u16 = 100;

/// How long after the first Request (and the first Start) a copy of it follows, unless the
/// answer came first. One lost handshake datagram otherwise costs a whole handshake timeout
/// (600 ms before any RTT sample, three round trips after one), as long as the rest of a
/// download on a long path; the copy costs one small datagram, and none at all on a path whose
/// round trip is shorter than this. Far enough behind the first to leave a short loss burst.
const HANDSHAKE_COPY_GAP: Duration = Duration::from_millis(10);

/// Longest wait between keep-alive acknowledgements while data is missing.
const MAX_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// Data datagrams in a row whose chunk index or length does not fit the offer: the offer itself
/// was damaged in flight (one such datagram is a damaged data datagram; many in a row are not),
/// and the transfer cannot complete. The same chunk index arriving unfit twice says the same
/// sooner (a damaged offer's size makes only the last chunk unfit).
const MAX_INVALID_DATA_IN_A_ROW: u32 = 8;
/// Data datagrams in a row older than the newest sequence number seen: that number came from a
/// damaged datagram (the sender never sent it and ignores acks that name it), so the receiver
/// forgets it and reports the newest it actually gets.
const MAX_SEQ_BELOW_LARGEST: u32 = 4;

/// The longest a completed receiver lingers, whatever `TransferConfig::linger` says: a sender
/// that missed the Done probes at least every 2 s, so a minute answers it many times over.
const MAX_LINGER: Duration = Duration::from_secs(60);

/// Bytes of held chunks read back from the sink in one call, to bring the digest up to date.
const READ_BACK_BYTES: u64 = 256 << 10;

/// Largest number of have-ranges one request carries.
/// The `limit` largest ranges of `have`, in ascending order: what a Request can announce when
/// the have-set is more fragmented than one datagram holds. Dropping the smallest ranges costs
/// the fewest re-sent bytes.
fn largest_ranges(have: &RangeSet, limit: usize) -> Vec<Range<u64>> {
    let mut ranges: Vec<Range<u64>> = have.iter().collect();
    if ranges.len() > limit {
        ranges.sort_by_key(|r| std::cmp::Reverse(r.end - r.start));
        ranges.truncate(limit);
        ranges.sort_by_key(|r| r.start);
    }
    ranges
}

fn max_have_ranges(datagram_size: usize, id: &ObjectId) -> usize {
    // Start (the larger: a Request plus the nonce): header, nonce (8), id (algorithm byte and
    // digest: 17 for MD5, 33 for SHA-256), datagram size (2), rate (8), count (2), ranges,
    // trailer.
    let id_len = 1 + id.digest().len();
    datagram_size.saturating_sub(HEADER_LEN + 8 + id_len + 2 + 8 + 2 + TRAILER_LEN) / 16
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Request sent, waiting for the offer.
    Requesting,
    /// Start sent, waiting for the first data.
    Starting,
    /// Receiving data.
    Receiving,
    /// Every chunk is held. The ack that says so goes out first (`acked` is when it left); the
    /// digest is checked at the next `handle_timeout` after that, so a hasher whose `finish`
    /// blocks (a hashing thread catching up) does not hold the ack back.
    Verifying { acked: Option<Instant> },
    /// Completed; answering a sender that missed our `Done` until `until`.
    Lingering { until: Instant },
    /// Over; nothing more to send.
    Closed,
}

/// The copy of the first Request, and of the first Start (`HANDSHAKE_COPY_GAP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HandshakeCopy {
    /// The datagram has not gone out yet.
    Unsent,
    /// It went out; its copy follows at this instant unless the answer comes first.
    Scheduled(Instant),
    /// The copy goes out with the next `poll_transmit`. Its own state, not `Scheduled` with a
    /// time passed, so that `handle_timeout` spends the timer: a caller that cannot send yet (an
    /// endpoint's uplink budget) is not woken again and again until it can.
    Due,
    /// The copy went out, or none is needed (the server queued the Start).
    Sent,
}

/// What the receiver learnt from the offer.
#[derive(Debug, Clone, Copy)]
struct Object {
    size: u64,
    chunk_size: u64,
    chunks: u64,
    nonce: u64,
}

/// The receiving side of one transfer.
///
/// Create it with [`Receiver::new`], then follow the call order in the module docs. It
/// requests the object, checks the offer against its limits, echoes the offer's nonce, stores
/// chunks through its [`ChunkSink`] as they arrive in any order, acknowledges them, hashes the
/// object's in-order prefix as it grows, and reports [`Event::Completed`] only after the digest
/// of all bytes matched the requested id.
///
/// When the last missing chunk arrives, the receiver first sends one ack that claims every
/// chunk (so the sender stops waiting on its probe timer), and checks the digest afterwards:
/// `poll_timeout` then returns the moment that ack left, and the `handle_timeout` that follows
/// calls [`PrefixHasher::finish`] (which may block) and queues the `Done`.
#[derive(Debug)]
pub struct Receiver<K> {
    conn_id: ConnectionId,
    config: TransferConfig,
    sink: K,
    id: ObjectId,
    /// Every byte range already in the sink: chunks wholly inside are never written again.
    have: RangeSet,
    /// The part of `have` the Request and Start list: at most as many ranges as fit in one
    /// datagram, the largest ones, so what the sender re-sends for want of room is small.
    announced: Vec<Range<u64>>,
    state: State,
    created: Instant,
    /// One-way delay samples count from here (see `set_clock_epoch`).
    clock_epoch: Instant,
    object: Option<Object>,

    received: RangeSet,
    hasher: Box<dyn PrefixHasher>,
    /// False when the caller verifies the bytes itself (`verify_by_caller`).
    check_digest: bool,
    hashed_chunks: u64,
    scratch: Vec<u8>,

    largest_seq: Option<u64>,
    largest_seq_at: Instant,
    largest_seq_owd: u32,
    /// Data datagrams in a row with a sequence number below `largest_seq`.
    seq_below_largest: u32,
    /// Data datagrams in a row that did not fit the offer, and their chunk indices.
    invalid_data: Vec<u32>,
    unacked: u32,
    ack_now: bool,
    ack_deadline: Option<Instant>,
    recent: Vec<u64>,
    ack_ranges: Vec<Range<u64>>,
    done_pending: bool,

    rtt: RttEstimator,
    handshake_sent: Option<Instant>,
    handshake_retries: u32,
    handshake_pending: bool,
    /// The copy of the first Request or Start (`HANDSHAKE_COPY_GAP`).
    handshake_copy: HandshakeCopy,
    /// Set by a Wait (the server queued our Start): repeat the Start this often instead of on
    /// the handshake timer, and the requests ahead last reported.
    queued: Option<(Duration, u32)>,
    last_heard: Instant,
    /// When to send a keep-alive acknowledgement, and how many were sent since data last arrived.
    keepalive_due: Instant,
    keepalives: u32,
    /// The token of the newest path challenge, to echo (docs/PROTOCOL.md section 5.9).
    path_response: Option<u64>,

    stats: Stats,
    report: Report,
}

impl<K: ChunkSink> Receiver<K> {
    /// Starts downloading object `id` into `sink`, on connection `conn_id` (choose it at random:
    /// it is what keeps off-path senders out).
    ///
    /// `have` lists byte ranges already present in `sink` (from an earlier, interrupted run):
    /// only the rest is fetched, and the present bytes are read back for hashing. Pass an empty
    /// set for a fresh download. Next, drain [`poll_transmit`](Self::poll_transmit): the first
    /// datagram is the request.
    pub fn new(
        now: Instant,
        conn_id: ConnectionId,
        id: ObjectId,
        have: &RangeSet,
        sink: K,
        config: TransferConfig,
    ) -> Self {
        let limit = max_have_ranges(config.datagram_size(), &id);
        Receiver {
            conn_id,
            sink,
            id,
            announced: largest_ranges(have, limit),
            have: have.clone(),
            state: State::Requesting,
            created: now,
            clock_epoch: now,
            object: None,
            received: RangeSet::new(),
            hasher: Box::new(InlineHasher::for_id(&id)),
            check_digest: true,
            hashed_chunks: 0,
            scratch: Vec::new(),
            largest_seq: None,
            largest_seq_at: now,
            largest_seq_owd: 0,
            seq_below_largest: 0,
            invalid_data: Vec::new(),
            unacked: 0,
            ack_now: false,
            ack_deadline: None,
            recent: Vec::new(),
            ack_ranges: Vec::new(),
            done_pending: false,
            rtt: RttEstimator::new(config.initial_rtt),
            handshake_sent: None,
            handshake_retries: 0,
            handshake_pending: true,
            handshake_copy: HandshakeCopy::Unsent,
            queued: None,
            last_heard: now,
            path_response: None,
            keepalive_due: now,
            keepalives: 0,
            stats: Stats::default(),
            report: Report::default(),
            config,
        }
    }

    /// Leaves the verification of the bytes to the caller: the receiver computes no digest,
    /// and [`Event::Completed`] then means only that every byte arrived, not that they hash to
    /// the id. For transfers whose bytes are checked another way: a piece of a multi-source
    /// download (against the manifest's block hashes) or a manifest (by its own trailing
    /// digest, since its id is derived, not its digest). Call it right after creating the
    /// receiver, like [`set_hasher`](Self::set_hasher); returns false (and changes nothing) once
    /// hashing has begun. The caller must check the sink's bytes before trusting them.
    pub fn verify_by_caller(&mut self) -> bool {
        if self.hashed_chunks > 0 || self.object.is_some() {
            return false;
        }
        self.check_digest = false;
        true
    }

    /// Replaces the hasher that runs on this thread (for example with `net::HashThread`; it
    /// must compute ids of this transfer's algorithm). Call it
    /// before the first datagram; later, the bytes already hashed would be lost, so it is
    /// ignored and returns false.
    pub fn set_hasher(&mut self, hasher: Box<dyn PrefixHasher>) -> bool {
        if self.hashed_chunks > 0 || self.object.is_some() {
            return false;
        }
        self.hasher = hasher;
        true
    }

    /// Makes one-way delay samples count from `epoch` instead of the transfer's creation, so that
    /// the samples of all transfers of one endpoint are comparable. Call it before the first
    /// datagram.
    pub fn set_clock_epoch(&mut self, epoch: Instant) {
        self.clock_epoch = epoch;
    }

    /// The connection id of this transfer.
    pub fn connection_id(&self) -> ConnectionId {
        self.conn_id
    }

    /// The object being fetched.
    pub fn object(&self) -> ObjectId {
        self.id
    }

    /// The sink, to read what arrived (complete only after [`Event::Completed`]).
    pub fn sink(&self) -> &K {
        &self.sink
    }

    /// The sink, mutably: for an owner that must flush or close it (for example once the transfer
    /// finished). Writing object bytes into it behind the receiver's back voids the digest check.
    pub fn sink_mut(&mut self) -> &mut K {
        &mut self.sink
    }

    /// Takes the sink out, ending the transfer's use of it.
    pub fn into_sink(self) -> K {
        self.sink
    }

    /// Object size, once the offer arrived.
    pub fn size(&self) -> Option<u64> {
        self.object.map(|o| o.size)
    }

    /// Byte ranges of the object stored so far (for a resume journal).
    pub fn received_bytes(&self) -> RangeSet {
        let mut out = RangeSet::new();
        if let Some(o) = self.object {
            for r in self.received.iter() {
                out.insert(r.start * o.chunk_size..(r.end * o.chunk_size).min(o.size));
            }
        }
        out
    }

    /// Bytes stored so far.
    pub fn bytes_received(&self) -> u64 {
        self.object.map_or(0, |o| {
            let full = self.received.covered() * o.chunk_size;
            if o.chunks > 0 && self.received.contains(o.chunks - 1) {
                full - (o.chunks * o.chunk_size - o.size)
            } else {
                full
            }
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.smoothed_rtt = self.rtt.smoothed();
        s
    }

    /// True once the transfer completed or failed (its final event is queued). A completed
    /// receiver may still answer a sender that missed its `Done`: keep calling `poll_transmit`
    /// and `handle_timeout` until `poll_timeout` returns `None`.
    pub fn is_finished(&self) -> bool {
        self.report.is_finished()
    }

    /// Gives up the transfer: tells the sender and reports [`TransferError::Cancelled`]. Drain
    /// `poll_transmit` afterwards to send the notice.
    pub fn cancel(&mut self) {
        self.fail_with(TransferError::Cancelled);
    }

    /// Feeds a datagram that arrived for this transfer. Undecodable or unexpected datagrams are
    /// counted in `stats().dropped` and otherwise ignored.
    pub fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) {
        match wire::decode(datagram) {
            Ok(d) => self.handle_decoded(now, &d, datagram.len()),
            Err(e) => self.stats.dropped.count_decode_error(&e),
        }
    }

    /// Like [`handle_datagram`](Self::handle_datagram) for a datagram the caller already decoded.
    /// `len` is its size on the wire.
    pub fn handle_decoded(&mut self, now: Instant, datagram: &Datagram<'_>, len: usize) {
        if datagram.conn_id != self.conn_id {
            self.stats.dropped.wrong_connection += 1;
            return;
        }
        if let (Frame::PathChallenge(token), false) =
            (&datagram.frame, self.state == State::Closed)
        {
            // The server heard this connection from an address that is not the one it sends to
            // (our NAT re-mapped us, or we moved): echo the token, one response per challenge,
            // from where we are now. Answered in every state but Closed, so that a sender still
            // waiting for our Done can find us too.
            self.path_response = Some(*token);
            self.stats.path_changes += 1;
            self.stats.datagrams_received += 1;
            self.stats.bytes_received += len as u64;
            self.last_heard = now;
            return;
        }
        match self.state {
            State::Closed => {
                self.stats.dropped.unexpected += 1;
                return;
            }
            State::Lingering { .. } => {
                // The sender is still sending: it missed our Done. Repeat it (one per datagram
                // received, so this can never amplify).
                if matches!(datagram.frame, Frame::Data(_) | Frame::Offer(_)) {
                    self.done_pending = true;
                }
                return;
            }
            _ => {}
        }
        self.stats.datagrams_received += 1;
        self.stats.bytes_received += len as u64;
        self.last_heard = now;
        match &datagram.frame {
            Frame::Offer(offer) if matches!(self.state, State::Requesting | State::Starting) => {
                self.on_offer(now, offer)
            }
            Frame::Data(data)
                if matches!(
                    self.state,
                    State::Starting | State::Receiving | State::Verifying { .. }
                ) =>
            {
                self.on_data(now, data)
            }
            Frame::Wait(wait) if self.state == State::Starting => self.on_wait(now, wait),
            Frame::Error(e) => {
                self.state = State::Closed;
                self.report
                    .finish(Event::Failed(TransferError::from_peer(e.code, e.reason)));
            }
            _ => self.stats.dropped.unexpected += 1,
        }
    }

    /// The server queued our Start (it is at its limit): keep the place by repeating the Start
    /// as asked, or start at once when a slot is held for us (nothing ahead).
    fn on_wait(&mut self, now: Instant, wait: &Wait) {
        let repeat = Duration::from_millis(u64::from(wait.retry_after_ms.max(MIN_WAIT_REPEAT_MS)));
        self.handshake_retries = 0;
        // The server has the Start: the Wait's own schedule repeats it from now on.
        self.handshake_copy = HandshakeCopy::Sent;
        if wait.place == 0 {
            // A slot is held for us: start now.
            self.queued = Some((repeat, 0));
            self.handshake_pending = true;
            return;
        }
        let ahead = wait.place - 1;
        if self.queued.is_none_or(|(_, known)| known != ahead) {
            self.report.push(Event::Queued { ahead });
        }
        self.queued = Some((repeat, ahead));
        self.handshake_pending = false;
        self.handshake_sent = Some(now);
    }

    fn on_offer(&mut self, now: Instant, offer: &Offer) {
        if offer.object != self.id {
            self.stats.dropped.unexpected += 1;
            return;
        }
        if let Some(known) = &mut self.object {
            // A repeated offer: our start was lost, or it echoed a nonce damaged in flight (the
            // server offers again with a fresh one). The newest nonce is the one to echo.
            if known.size == offer.size && u64::from(offer.chunk_size) == known.chunk_size {
                known.nonce = offer.nonce;
                self.handshake_pending = true;
            } else {
                // An honest server offers one object one way; one of the offers was damaged,
                // and which one cannot be told.
                self.fail_with(TransferError::ProtocolViolation(
                    "the server's offers disagree about the object's size",
                ));
            }
            return;
        }
        if let Some(sent) = self.handshake_sent {
            if self.handshake_retries == 0 {
                self.rtt
                    .update(now.saturating_duration_since(sent), Duration::ZERO);
            }
        }
        let chunk_size = u64::from(offer.chunk_size);
        if offer.size > self.config.max_object_size {
            self.fail_with(TransferError::TooLarge {
                size: offer.size,
                max: self.config.max_object_size,
            });
            return;
        }
        if (offer.chunk_size as usize) < MIN_CHUNK_SIZE
            || offer.chunk_size as usize > self.config.chunk_size()
            || chunk_count(offer.size, chunk_size) > MAX_CHUNKS
        {
            self.fail_with(TransferError::ProtocolViolation(
                "offer's chunk size does not fit the requested datagram size",
            ));
            return;
        }
        let object = Object {
            size: offer.size,
            chunk_size,
            chunks: chunk_count(offer.size, chunk_size),
            nonce: offer.nonce,
        };
        self.object = Some(object);
        // Chunks wholly inside the have-set are already here (the sender applies the same rule
        // to the announced part; chunks held beyond it may be sent again, and are then
        // duplicates, never written over what is held). The Start repeats the request.
        self.received = held_chunks(self.have.iter(), object.size, chunk_size);
        self.report.push(Event::Started { size: offer.size });
        self.state = State::Starting;
        self.handshake_pending = true;
        self.handshake_retries = 0;
        self.handshake_copy = HandshakeCopy::Unsent;
        if self.received.covered() == object.chunks {
            // Empty object, or everything was already here: verify and finish without data
            // (and without an ack: no data arrived, and the sender is told by the Done).
            self.advance_hash(None);
            if !self.report.is_finished() {
                self.verify(now);
            }
        }
    }

    fn on_data(&mut self, now: Instant, data: &Data<'_>) {
        let Some(object) = self.object else {
            return;
        };
        let chunk = u64::from(data.chunk);
        let range = chunk_bytes(chunk, object.chunk_size, object.size);
        if chunk >= object.chunks || data.payload.len() as u64 != range.end - range.start {
            self.stats.dropped.invalid += 1;
            let repeated = self.invalid_data.contains(&data.chunk);
            self.invalid_data.push(data.chunk);
            if repeated || self.invalid_data.len() >= MAX_INVALID_DATA_IN_A_ROW as usize {
                self.fail_with(TransferError::ProtocolViolation(
                    "the data does not fit the offer's size and chunk size",
                ));
            }
            return;
        }
        self.invalid_data.clear();
        if matches!(self.state, State::Verifying { .. }) {
            // Every chunk is held, and the ack that says so is out (or about to be): this is a
            // repeat. It is not acknowledged: the sender counts acks that claim every chunk
            // (PROTOCOL.md 5.3.3), and the Done that follows the verification answers it.
            self.stats.duplicate_chunks += 1;
            return;
        }
        self.state = State::Receiving;
        self.keepalives = 0;
        self.keepalive_due = later(now, self.keepalive_interval());
        let newest = match self.largest_seq {
            Some(l) if data.seq < l => {
                self.seq_below_largest += 1;
                self.seq_below_largest >= MAX_SEQ_BELOW_LARGEST
            }
            Some(l) => data.seq > l,
            None => true,
        };
        if newest {
            self.seq_below_largest = 0;
            self.largest_seq = Some(data.seq);
            self.largest_seq_at = now;
            self.largest_seq_owd =
                wire_micros(now, self.clock_epoch).wrapping_sub(data.send_time_us);
        }
        self.unacked += 1;
        if self.received.contains(chunk) {
            self.stats.duplicate_chunks += 1;
            self.ack_now = true;
            return;
        }
        if let Err(e) = self.sink.write_at(range.start, data.payload) {
            self.fail_with(TransferError::storage("write", &e));
            return;
        }
        let in_order = self.received.max().is_none_or(|m| chunk == m + 1);
        self.received.insert(chunk..chunk + 1);
        self.recent.push(chunk);
        if self.received.covered() == object.chunks {
            // The last missing chunk: acknowledge it at once, and finish the digest only once
            // that ack has left (`handle_timeout`), so the sender learns that every chunk
            // arrived while the digest is still being worked out. Only the payload in hand is
            // hashed now (when it continues the hashed prefix); chunks held past it are read
            // back and hashed in the verification, which on a resume can be most of the object.
            if self.check_digest && chunk == self.hashed_chunks {
                self.hasher.update(data.payload);
                self.hashed_chunks += 1;
            }
            self.state = State::Verifying { acked: None };
            self.ack_now = true;
            return;
        }
        self.advance_hash(Some((chunk, data.payload)));
        if self.report.is_finished() {
            return;
        }
        if !in_order || self.unacked >= self.config.ack_every {
            self.ack_now = true;
        } else if self.ack_deadline.is_none() {
            // None when the delay is too long to add to an instant: acks then go out every
            // `ack_every` datagrams, on gaps, and as keep-alives.
            self.ack_deadline = now.checked_add(self.config.max_ack_delay);
        }
        self.report_progress(now);
    }

    /// Hashes every chunk that now continues the hashed prefix: `fresh` straight from the
    /// datagram, the rest read back from the sink.
    fn advance_hash(&mut self, fresh: Option<(u64, &[u8])>) {
        let Some(object) = self.object.filter(|_| self.check_digest) else {
            return;
        };
        match fresh {
            Some((chunk, payload)) if chunk == self.hashed_chunks => {
                self.hasher.update(payload);
                self.hashed_chunks += 1;
            }
            // Out of order: the prefix cannot have reached it, and nothing else changed.
            Some(_) if !self.received.contains(self.hashed_chunks) => return,
            _ => {}
        }
        // Held chunks are read back a run at a time (at most `READ_BACK_BYTES` per read), not a
        // chunk per system call: after a reordering or a resume, runs of thousands are common.
        let per_read = (READ_BACK_BYTES / object.chunk_size).max(1);
        while self.hashed_chunks < object.chunks {
            let run_end = self
                .received
                .first_missing_from(self.hashed_chunks)
                .min(object.chunks)
                .min(self.hashed_chunks + per_read);
            if run_end == self.hashed_chunks {
                break;
            }
            let start = chunk_bytes(self.hashed_chunks, object.chunk_size, object.size).start;
            let end = chunk_bytes(run_end - 1, object.chunk_size, object.size).end;
            let len = (end - start) as usize;
            if self.scratch.len() < len {
                self.scratch.resize(len, 0);
            }
            let buf = &mut self.scratch[..len];
            if let Err(e) = self.sink.read_at(start, buf) {
                self.fail_with(TransferError::storage("read", &e));
                return;
            }
            self.hasher.update(&*buf);
            self.hashed_chunks = run_end;
        }
    }

    fn verify(&mut self, now: Instant) {
        let actual = match self.check_digest.then(|| self.hasher.finish()) {
            // Verified by the caller (`verify_by_caller`).
            None => self.id,
            Some(Ok(actual)) => actual,
            Some(Err(e)) => {
                self.fail_with(TransferError::storage("hash", &e));
                return;
            }
        };
        if actual != self.id {
            self.fail_with(TransferError::DigestMismatch {
                expected: self.id,
                actual,
            });
            return;
        }
        self.done_pending = true;
        let linger = self
            .config
            .linger
            .max(self.rtt.pto(self.config.max_ack_delay).saturating_mul(4))
            .min(MAX_LINGER);
        self.state = State::Lingering {
            until: later(now, linger),
        };
        let completion = Completion {
            object: self.id,
            size: self.object.map_or(0, |o| o.size),
            duration: now.saturating_duration_since(self.created),
            stats: self.stats(),
        };
        self.report.finish(Event::Completed(completion));
    }

    fn fail_with(&mut self, error: TransferError) {
        if self.report.fail(error) {
            self.state = State::Closed;
        }
    }

    fn report_progress(&mut self, now: Instant) {
        let (done, total) = (self.bytes_received(), self.object.map_or(0, |o| o.size));
        self.report
            .progress(now, self.config.progress_interval, done, total);
    }

    /// Writes the next datagram to send into `buf` (at least `max_datagram_size` bytes) and
    /// returns its length, or `None` when nothing is due now.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        if let Some(n) = self
            .report
            .poll_error_frame(self.conn_id, &mut self.stats, buf)
        {
            return Some(n);
        }
        if let Some(token) = self.path_response.take() {
            return emit(
                self.conn_id,
                &mut self.stats,
                buf,
                Frame::PathResponse(token),
            );
        }
        if self.done_pending {
            self.done_pending = false;
            return emit(self.conn_id, &mut self.stats, buf, Frame::Done);
        }
        match self.state {
            State::Requesting | State::Starting
                if self.handshake_pending || self.handshake_copy == HandshakeCopy::Due =>
            {
                if self.handshake_pending {
                    self.handshake_pending = false;
                    self.handshake_sent = Some(now);
                    self.handshake_copy = match self.handshake_copy {
                        HandshakeCopy::Unsent => {
                            HandshakeCopy::Scheduled(later(now, HANDSHAKE_COPY_GAP))
                        }
                        // A resend before the copy (for a repeated Offer, or on the timer of a
                        // path faster than the gap) is the copy.
                        _ => HandshakeCopy::Sent,
                    };
                } else {
                    // The copy leaves the handshake timer (and the RTT sample the answer
                    // gives) to the first send.
                    self.handshake_copy = HandshakeCopy::Sent;
                }
                // The Start repeats the request exactly, so a server can check its nonce
                // against the request without having kept any state.
                let have = std::mem::take(&mut self.announced);
                let request = Request {
                    object: self.id,
                    max_datagram_size: self.config.datagram_size() as u16,
                    max_rate_bytes_per_sec: 0,
                    have: HaveRanges::List(&have),
                };
                let frame = match self.object {
                    None => Frame::Request(request),
                    Some(o) => Frame::Start {
                        nonce: o.nonce,
                        request,
                    },
                };
                let n = emit(self.conn_id, &mut self.stats, buf, frame);
                self.announced = have;
                n
            }
            State::Receiving if self.ack_now || self.ack_deadline.is_some_and(|t| t <= now) => {
                self.build_ack(now, buf)
            }
            State::Verifying { acked: None } => {
                let n = self.build_ack(now, buf);
                if n.is_some() {
                    self.state = State::Verifying { acked: Some(now) };
                }
                n
            }
            _ => None,
        }
    }

    fn build_ack(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        let object = self.object?;
        let largest_seq = self.largest_seq?;
        let cumulative = self.received.first_missing_from(0);
        // Ranges holding the chunks that arrived since the last ack come first (the sender
        // needs them to settle its newest datagrams), then the highest ranges.
        let mut chosen = std::mem::take(&mut self.ack_ranges);
        chosen.clear();
        let budget = self.config.datagram_size() - ACK_BASE_LEN;
        let max_ranges = self.config.max_ack_ranges.clamp(1, 255);
        let mut bytes = 0;
        let recent = std::mem::take(&mut self.recent);
        let highest = self.received.iter().rev();
        let candidates = recent
            .iter()
            .rev()
            .filter_map(|&c| self.received.range_containing(c))
            .chain(highest);
        for r in candidates {
            if chosen.len() >= max_ranges || r.start <= cumulative {
                if r.start <= cumulative {
                    continue;
                }
                break;
            }
            if chosen.contains(&r) {
                continue;
            }
            // Ranges are sorted only after choosing, so budget each at the worst case: an
            // 8-byte gap and an 8-byte length.
            if bytes + 16 > budget {
                break;
            }
            bytes += 16;
            chosen.push(r);
        }
        chosen.sort_unstable_by_key(|r| r.start);
        self.recent = recent;
        self.recent.clear();
        let window_end = cumulative
            .saturating_add(window_chunks(&self.config, object.chunk_size))
            .min(object.chunks)
            .min(u64::from(u32::MAX));
        let ack = Ack {
            largest_seq,
            ack_delay_us: now
                .saturating_duration_since(self.largest_seq_at)
                .as_micros()
                .min(u128::from(u32::MAX)) as u32,
            owd_us: self.largest_seq_owd,
            window_end: window_end as u32,
            cumulative: cumulative as u32,
            ranges: AckRanges::List(&chosen),
        };
        let n = emit(self.conn_id, &mut self.stats, buf, Frame::Ack(ack));
        self.ack_ranges = chosen;
        self.unacked = 0;
        self.ack_now = false;
        self.ack_deadline = None;
        n
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called, or `None` when there
    /// is nothing left to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Closed => None,
            State::Lingering { until } => Some(until),
            // The ack claiming every chunk is out: verify now.
            State::Verifying { acked: Some(at) } => Some(at),
            State::Requesting
            | State::Starting
            | State::Receiving
            | State::Verifying { acked: None } => {
                // An idle timeout too long to add to an instant never expires.
                let idle = self.last_heard.checked_add(self.config.idle_timeout);
                let handshake = match self.state {
                    State::Requesting | State::Starting => {
                        let timer = self
                            .handshake_sent
                            .map(|sent| later(sent, self.handshake_timeout()));
                        let copy = match self.handshake_copy {
                            HandshakeCopy::Scheduled(at) => Some(at),
                            _ => None,
                        };
                        timer.into_iter().chain(copy).min()
                    }
                    _ => None,
                };
                let keepalive = (self.state == State::Receiving).then_some(self.keepalive_due);
                [idle, handshake, self.ack_deadline, keepalive, self.path_lost_at()]
                    .into_iter()
                    .flatten()
                    .min()
            }
        }
    }

    /// When to repeat the last acknowledgement because data stopped arriving. On a path that
    /// loses most acks this keeps the sender informed (and its idle timer fed) while it waits on
    /// its probe timer.
    fn keepalive_interval(&self) -> Duration {
        let interval = self
            .rtt
            .pto(self.config.max_ack_delay)
            .saturating_mul(1 << self.keepalives.min(6));
        interval.min(MAX_KEEPALIVE_INTERVAL)
    }

    /// When a transfer that is receiving gives up on a silent path
    /// (`TransferConfig::path_lost_after`), if it can (a deadline too far to add never comes).
    fn path_lost_at(&self) -> Option<Instant> {
        (self.state == State::Receiving)
            .then(|| self.last_heard.checked_add(self.config.path_lost_after))
            .flatten()
    }

    fn handshake_timeout(&self) -> Duration {
        if let (State::Starting, Some((repeat, _))) = (self.state, self.queued) {
            return repeat;
        }
        let pto = self
            .rtt
            .pto(Duration::ZERO)
            .saturating_mul(1 << self.handshake_retries.min(6));
        pto.min(MAX_KEEPALIVE_INTERVAL)
    }

    /// Call when the instant from [`poll_timeout`](Self::poll_timeout) has passed, then drain
    /// `poll_transmit` and `poll_event`.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Closed => {}
            State::Lingering { until } => {
                if now >= until {
                    self.state = State::Closed;
                }
            }
            State::Verifying { acked: Some(at) } => {
                if now >= at {
                    self.advance_hash(None);
                    if !self.report.is_finished() {
                        self.verify(now);
                    }
                }
            }
            State::Requesting
            | State::Starting
            | State::Receiving
            | State::Verifying { acked: None } => {
                let idle = self.last_heard.checked_add(self.config.idle_timeout);
                if idle.is_some_and(|t| now >= t) {
                    self.state = State::Closed;
                    self.report.finish(Event::Failed(TransferError::TimedOut(
                        self.config.idle_timeout,
                    )));
                    return;
                }
                if self.path_lost_at().is_some_and(|t| now >= t) {
                    self.state = State::Closed;
                    self.report.finish(Event::Failed(TransferError::PathLost(
                        self.config.path_lost_after,
                    )));
                    return;
                }
                if self.ack_deadline.is_some_and(|t| t <= now) {
                    // The delayed ack is due: it goes out with the next poll_transmit. The timer
                    // is spent, so a caller that cannot send yet (an endpoint's uplink budget)
                    // is not woken again and again until it can.
                    self.ack_deadline = None;
                    self.ack_now = true;
                }
                if self.state == State::Receiving && now >= self.keepalive_due {
                    self.keepalives += 1;
                    self.keepalive_due = later(now, self.keepalive_interval());
                    self.ack_now = true;
                }
                if matches!(self.state, State::Requesting | State::Starting) {
                    if let HandshakeCopy::Scheduled(at) = self.handshake_copy {
                        if now >= at {
                            self.handshake_copy = HandshakeCopy::Due;
                        }
                    }
                    if let Some(sent) = self.handshake_sent {
                        if now >= later(sent, self.handshake_timeout()) {
                            self.handshake_retries += 1;
                            self.handshake_pending = true;
                            self.handshake_sent = None;
                        }
                    }
                }
            }
        }
    }

    /// The next event for the user, if any. Drain after every call that feeds the transfer.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.report.poll_event()
    }
}
