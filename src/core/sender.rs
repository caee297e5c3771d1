//! One outgoing transfer: the server's side of a download.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::congestion::{Controller, Delivery};
use super::pacer::Pacer;
use super::ranges::RangeSet;
use super::report::{emit, Report};
use super::rtt::RttEstimator;
use super::{
    chunk_bytes, chunk_count, held_chunks, later, window_chunks, wire_micros, ChunkSource,
    Completion, Event, Stats, TransferConfig, TransferError,
};
use crate::id::ObjectId;
use crate::wire::{
    self, encode_data_in_place, Ack, ConnectionId, Datagram, Frame, Offer, Request, DATA_OVERHEAD,
    DATA_PAYLOAD_OFFSET, MAX_CHUNKS,
};

/// A datagram is lost once this many later ones were acknowledged (RFC 9002 kPacketThreshold).
const PACKET_THRESHOLD: u64 = 3;
/// Most doublings of the probe timeout.
const MAX_PTO_BACKOFF: u32 = 6;
/// The probe timeout never exceeds this, so a path that comes back is noticed quickly.
const MAX_PTO: Duration = Duration::from_secs(2);
/// Offers repeated without a new request. An offer (53 bytes) is a little larger than the
/// smallest request (47 bytes), so two offers per request stay under the 3x anti-amplification
/// bound.
const MAX_OFFER_REPEATS: u32 = 1;
/// Probe timeouts in a row that count as persistent congestion.
const PERSISTENT_CONGESTION_PTOS: u32 = 3;
/// Acknowledgements in a row that claim every chunk, each of a newer data datagram than the one
/// before, without the receiver finishing: it took the object for a larger one (a damaged
/// offer) and still acknowledges data, and the transfer cannot end. An honest receiver sends
/// one such ack, for its last chunk, and then only its Done; one more can be a damaged ack;
/// a third is neither.
const MAX_ACKS_PAST_END: u32 = 3;
/// How long the sender waits for the Done once every chunk is acknowledged, before its first
/// probe (unless its probe timeout is longer). The receiver acknowledges its last chunk and then
/// checks the digest, which may mean reading back and hashing much of the object (a resume);
/// probing meanwhile would only repeat the last chunk to a receiver that holds it.
const DONE_WAIT: Duration = Duration::from_secs(1);
/// How many of the newest datagrams the sender sends a second time the first time it has
/// nothing new left to send (`tail_copy`). A lost datagram is found lost when three sent after
/// it are acknowledged; the last three of the object have fewer than three after them, so their
/// loss would wait for a probe timeout and another round trip. Three copies cost three
/// datagrams per transfer.
const TAIL_COPIES: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Offer sent, waiting for the client's start.
    Offering,
    /// Sending data.
    Sending,
    /// Finished (done received) or failed; nothing more to send but a pending error.
    Closed,
}

#[derive(Debug, Clone, Copy)]
struct SentPacket {
    chunk: u32,
    sent: Instant,
    bytes: u32,
    /// Acknowledged or declared lost: no longer counts as in flight.
    settled: bool,
    /// The congestion controller's delivery state at the send time (its rate sample).
    delivery: Delivery,
    /// A tail copy (`tail_copy`), not a first send or a retransmission.
    copy: bool,
}

/// The sending side of one transfer.
///
/// Create it with [`Sender::accept`] when a request arrives, then follow the call order in the
/// module docs. It sends an offer, waits for the client to echo the offer's nonce
/// (proving its address), then sends chunks paced and windowed by the congestion controller,
/// recovering losses from acknowledgements and from its probe timer. It completes when the client
/// reports the digest verified.
#[derive(Debug)]
pub struct Sender<S> {
    conn_id: ConnectionId,
    config: TransferConfig,
    source: S,
    object: ObjectId,
    size: u64,
    chunk_size: u64,
    chunks: u64,
    nonce: u64,
    state: State,
    created: Instant,
    /// Send time stamps count from here (see `set_clock_epoch`).
    clock_epoch: Instant,
    /// The newest one-way delay sample, until the owner takes it.
    delay_sample: Option<u32>,
    offer_pending: bool,
    /// When the offer last went out, and how many times it was repeated without being asked.
    offer_sent: Option<Instant>,
    offer_repeats: u32,

    next_seq: u64,
    next_new_chunk: u64,
    /// One past the highest chunk ever sent.
    sent_frontier: u64,
    acked: RangeSet,
    lost: RangeSet,
    /// Sent data datagrams by sequence number; the front is the oldest not yet popped.
    sent: VecDeque<SentPacket>,
    first_seq: u64,
    /// Latest sequence number carrying each chunk still in flight.
    chunk_seq: HashMap<u32, u64>,
    bytes_in_flight: u64,
    largest_acked_seq: Option<u64>,
    loss_time: Option<Instant>,
    last_data_sent: Option<Instant>,
    pto_count: u32,
    probes_pending: u32,
    window_end: u64,
    /// Acknowledgements in a row whose cumulative point is at or past the last chunk, each naming
    /// a newer data datagram than the one before (`past_end_seq`).
    acks_past_end: u32,
    /// The `largest_seq` of the last ack counted in `acks_past_end`.
    past_end_seq: Option<u64>,
    /// Since when every chunk is acknowledged (the receiver is verifying; see `DONE_WAIT`).
    all_acked_at: Option<Instant>,
    /// Chunks counted as acknowledged that the newest ack showed missing: withdrawn when the
    /// next newest ack shows them missing too (see `recover_reneged`).
    renege_suspects: Vec<u64>,
    /// The suspects of the ack before, kept as a buffer so that no ack allocates.
    renege_previous: Vec<u64>,
    /// Withdrawn chunks that may still be on their way to the receiver, and when those not
    /// acknowledged by then are lost (see `recover_reneged`).
    renege_pending: RangeSet,
    renege_deadline: Option<Instant>,
    /// Tail copies sent so far (`tail_copy`).
    tail_copies_sent: usize,

    rtt: RttEstimator,
    congestion: Controller,
    pacer: Pacer,
    rate_cap: u64,
    pacing_wait: Option<Instant>,
    last_heard: Instant,

    stats: Stats,
    report: Report,
}

/// How a transfer of `size` bytes answering `request` is cut: (datagram size, chunk size,
/// chunk count), or `TooLarge` when 32-bit chunk indices cannot name every chunk.
fn plan(
    request: &Request<'_>,
    size: u64,
    config: &TransferConfig,
) -> Result<(usize, u64, u64), TransferError> {
    let datagram_size = config
        .datagram_size()
        .min(usize::from(request.max_datagram_size));
    let chunk_size = (datagram_size - DATA_OVERHEAD) as u64;
    let chunks = chunk_count(size, chunk_size);
    if chunks > MAX_CHUNKS {
        return Err(TransferError::TooLarge {
            size,
            max: MAX_CHUNKS * chunk_size,
        });
    }
    Ok((datagram_size, chunk_size, chunks))
}

/// The offer [`Sender::accept`] would send first, for an endpoint that answers requests without
/// keeping state (it creates the sender only when the Start proves the client's address).
pub(crate) fn offer_for(
    request: &Request<'_>,
    size: u64,
    nonce: u64,
    config: &TransferConfig,
) -> Result<Offer, TransferError> {
    let (_, chunk_size, _) = plan(request, size, config)?;
    Ok(Offer {
        object: request.object,
        size,
        // At most the configured datagram size less overhead, which fits u16.
        chunk_size: u16::try_from(chunk_size).unwrap_or(u16::MAX),
        nonce,
    })
}

impl<S: ChunkSource> Sender<S> {
    /// Starts serving `request` (already decoded, from connection `conn_id`) with an object of
    /// `size` bytes readable from `source`.
    ///
    /// The caller has looked the object up (answering "not found" itself otherwise) and chosen
    /// `nonce` unpredictably (it is the address-validation token the client must echo). Next,
    /// drain [`poll_transmit`](Self::poll_transmit): the first datagram is the offer.
    ///
    /// Fails with [`TransferError::TooLarge`] when the object has more chunks than 32-bit chunk
    /// indices can name at the negotiated datagram size; answer the client with an error frame.
    pub fn accept(
        now: Instant,
        conn_id: ConnectionId,
        request: &Request<'_>,
        size: u64,
        source: S,
        nonce: u64,
        config: TransferConfig,
    ) -> Result<Self, TransferError> {
        let (datagram_size, chunk_size, chunks) = plan(request, size, &config)?;
        let acked = held_chunks(request.have.iter(), size, chunk_size);
        let rate_cap = match (
            config.max_rate_bytes_per_sec,
            request.max_rate_bytes_per_sec,
        ) {
            (0, r) | (r, 0) => r,
            (a, b) => a.min(b),
        };
        let burst = u64::from(config.burst_datagrams.max(1)) * datagram_size as u64;
        // Flow control starts from the first chunk the client lacks, so resuming a large
        // partial is not stuck behind a window measured from zero.
        let window_end = acked
            .first_missing_from(0)
            .saturating_add(window_chunks(&config, chunk_size));
        Ok(Sender {
            conn_id,
            source,
            object: request.object,
            size,
            chunk_size,
            chunks,
            nonce,
            state: State::Offering,
            created: now,
            clock_epoch: now,
            delay_sample: None,
            offer_pending: true,
            offer_sent: None,
            offer_repeats: 0,
            next_seq: 0,
            next_new_chunk: acked.first_missing_from(0),
            sent_frontier: 0,
            acked,
            lost: RangeSet::new(),
            sent: VecDeque::new(),
            first_seq: 0,
            chunk_seq: HashMap::new(),
            bytes_in_flight: 0,
            largest_acked_seq: None,
            loss_time: None,
            last_data_sent: None,
            pto_count: 0,
            probes_pending: 0,
            window_end: window_end.max(1),
            acks_past_end: 0,
            past_end_seq: None,
            all_acked_at: None,
            renege_suspects: Vec::new(),
            renege_previous: Vec::new(),
            renege_pending: RangeSet::new(),
            renege_deadline: None,
            tail_copies_sent: 0,
            rtt: RttEstimator::new(config.initial_rtt),
            congestion: Controller::new(config.congestion, datagram_size as u64),
            pacer: Pacer::new(0, burst),
            rate_cap,
            pacing_wait: None,
            last_heard: now,
            stats: Stats::default(),
            report: Report::default(),
            config,
        })
    }

    /// Makes send time stamps count from `epoch` instead of the transfer's creation. An endpoint
    /// gives all its transfers one epoch, so the one-way delay samples of transfers to the same
    /// peer are comparable and can share a base-delay estimate (see
    /// [`set_path_base_delay`](Self::set_path_base_delay)). Call it before the first datagram.
    pub fn set_clock_epoch(&mut self, epoch: Instant) {
        self.clock_epoch = epoch;
    }

    /// Takes the newest one-way delay sample (wrapping microseconds, as on the wire), if one
    /// arrived since the last call. An endpoint pools these per peer.
    pub fn take_delay_sample(&mut self) -> Option<u32> {
        self.delay_sample.take()
    }

    /// Tells the congestion controller the lowest one-way delay seen on this path by any
    /// transfer of the endpoint (same epoch, same peer). Without it, a transfer that starts while
    /// another already fills the bottleneck queue takes that queue for the base delay and
    /// crowds the earlier one out (LEDBAT's latecomer problem).
    pub fn set_path_base_delay(&mut self, owd_us: u32) {
        self.congestion.set_base_hint(owd_us);
    }

    /// The congestion window in bytes.
    pub fn congestion_window(&self) -> u64 {
        self.congestion.window()
    }

    /// Overrides the congestion window: an endpoint evens out the windows of transfers that
    /// share a path (same peer host), keeping their sum.
    pub fn set_congestion_window(&mut self, bytes: u64) {
        self.congestion.set_window(bytes);
    }

    /// Takes the source back, ending the transfer (nothing more is sent or reported).
    pub fn into_source(self) -> S {
        self.source
    }

    /// True while data is flowing (after the client's start, before the end).
    pub fn is_sending(&self) -> bool {
        self.state == State::Sending
    }

    /// The connection id this transfer answers to.
    pub fn connection_id(&self) -> ConnectionId {
        self.conn_id
    }

    /// The object being sent.
    pub fn object(&self) -> ObjectId {
        self.object
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.smoothed_rtt = self.rtt.smoothed();
        s.congestion_window = self.congestion.window();
        s.bytes_in_flight = self.bytes_in_flight;
        s.queueing_delay = self.congestion.queueing_delay();
        s.pacing_rate = self.pacer.rate();
        s
    }

    /// True once the transfer completed or failed (its final event is queued).
    pub fn is_finished(&self) -> bool {
        self.report.is_finished()
    }

    /// The bytes the receiver has acknowledged so far.
    pub fn bytes_acked(&self) -> u64 {
        let full = self.acked.covered() * self.chunk_size;
        // The last chunk may be short.
        if self.chunks > 0 && self.acked.contains(self.chunks - 1) {
            full - (self.chunks * self.chunk_size - self.size)
        } else {
            full
        }
    }

    /// Gives up the transfer: tells the receiver it was cancelled and reports
    /// [`TransferError::Cancelled`]. Drain `poll_transmit` afterwards to send the notice.
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

    /// Like [`handle_datagram`](Self::handle_datagram) for a datagram the caller already decoded
    /// (an endpoint decodes once to find the connection). `len` is its size on the wire.
    pub fn handle_decoded(&mut self, now: Instant, datagram: &Datagram<'_>, len: usize) {
        if datagram.conn_id != self.conn_id {
            self.stats.dropped.wrong_connection += 1;
            return;
        }
        if self.report.is_finished() {
            self.stats.dropped.unexpected += 1;
            return;
        }
        self.stats.datagrams_received += 1;
        self.stats.bytes_received += len as u64;
        self.last_heard = now;
        match &datagram.frame {
            Frame::Request(r) if self.state == State::Offering && r.object == self.object => {
                // The offer was lost; send it again.
                self.offer_pending = true;
            }
            Frame::Start { nonce, .. } if *nonce == self.nonce => {
                if self.state == State::Offering {
                    self.state = State::Sending;
                }
            }
            Frame::Start { .. } if self.state == State::Offering => {
                // The client echoes another nonce: our offer reached it damaged. Offer again,
                // once per start (a start is larger than an offer, so this cannot amplify).
                self.stats.dropped.unexpected += 1;
                self.offer_pending = true;
            }
            Frame::Ack(ack) if self.state == State::Sending => self.on_ack(now, ack),
            Frame::Done if self.state != State::Closed => self.complete(now),
            Frame::Error(e) => {
                self.state = State::Closed;
                self.report
                    .finish(Event::Failed(TransferError::from_peer(e.code, e.reason)));
            }
            _ => self.stats.dropped.unexpected += 1,
        }
    }

    fn on_ack(&mut self, now: Instant, ack: &Ack<'_>) {
        if ack.largest_seq >= self.next_seq {
            // Acknowledges a datagram never sent: a confused or lying peer, a damaged ack, or a
            // receiver whose newest sequence number came from a damaged data datagram (it
            // forgets that number after a few datagrams). Ignore it whole.
            self.stats.dropped.invalid += 1;
            return;
        }
        // An ack that does not list the chunk of the datagram it names as the newest was
        // damaged in flight. Its ranges may still be right, so they are used, but it gives no
        // round-trip or delay sample and does not advance loss detection.
        let seq_sent = self.ack_covers_largest(ack);
        // An ack no older than any before it describes the receiver as it is now.
        let newest = seq_sent && self.largest_acked_seq.is_none_or(|l| ack.largest_seq >= l);
        if self.chunks > 0 && u64::from(ack.cumulative) >= self.chunks {
            // An honest receiver that holds every chunk sends one such ack, then verifies and
            // sends Done; it acknowledges no later datagram. A copy of an ack already counted
            // (a duplicate, a keep-alive) says nothing new.
            if self.past_end_seq.is_none_or(|s| ack.largest_seq > s) {
                self.past_end_seq = Some(ack.largest_seq);
                self.acks_past_end += 1;
            }
            if self.acks_past_end >= MAX_ACKS_PAST_END {
                self.fail_with(TransferError::ProtocolViolation(
                    "the receiver holds every chunk but does not finish: it expects a larger object",
                ));
                return;
            }
        } else {
            self.acks_past_end = 0;
        }
        let mut newly_acked = false;
        let mut acked_bytes = 0u64;
        let cumulative = u64::from(ack.cumulative).min(self.chunks);
        let ranges = std::iter::once(0..cumulative).chain(
            ack.ranges
                .iter()
                .map(|r| r.start.min(self.chunks)..r.end.min(self.chunks)),
        );
        for range in ranges {
            let Self {
                acked,
                chunk_seq,
                sent,
                first_seq,
                bytes_in_flight,
                congestion,
                ..
            } = self;
            acked.insert_with(range, |new| {
                for chunk in new {
                    let Some(seq) = chunk_seq.remove(&(chunk as u32)) else {
                        continue;
                    };
                    let Some(p) = seq
                        .checked_sub(*first_seq)
                        .and_then(|i| sent.get_mut(i as usize))
                    else {
                        continue;
                    };
                    if !p.settled {
                        p.settled = true;
                        *bytes_in_flight -= u64::from(p.bytes);
                        congestion.on_ack(&p.delivery, p.sent, u64::from(p.bytes), now);
                        acked_bytes += u64::from(p.bytes);
                        newly_acked = true;
                    }
                }
            });
        }
        if newest {
            self.recover_reneged(now, ack);
        }
        if seq_sent && self.largest_acked_seq.is_none_or(|l| ack.largest_seq > l) {
            self.largest_acked_seq = Some(ack.largest_seq);
            self.delay_sample = Some(ack.owd_us);
            // The datagram may already be gone from the front (settled by an earlier ack that
            // arrived out of order); then this ack gives no RTT sample.
            let index = ack.largest_seq.checked_sub(self.first_seq);
            let sent = index.and_then(|i| self.sent.get(i as usize)).map(|p| p.sent);
            self.congestion.on_delay_sample(ack.owd_us, sent, now);
            if let Some(p) = index.and_then(|i| self.sent.get(i as usize)) {
                let sample = now.saturating_duration_since(p.sent);
                self.congestion.on_rtt_sample(sample, now);
                let ack_delay = Duration::from_micros(u64::from(ack.ack_delay_us))
                    .min(self.config.max_ack_delay);
                self.rtt.update(sample, ack_delay);
            }
        }
        if newly_acked {
            self.pto_count = 0;
        }
        if self.acked.covered() >= self.chunks {
            self.all_acked_at.get_or_insert(now);
        } else {
            // Withdrawn claims (`recover_reneged`) reopened the transfer.
            self.all_acked_at = None;
        }
        self.window_end = self.window_end.max(u64::from(ack.window_end));
        self.detect_losses(now);
        self.expire_reneged(now);
        self.congestion
            .on_ack_done(now, self.bytes_in_flight, acked_bytes);
        self.report_progress(now);
    }

    /// Whether `ack` covers the chunk of the datagram it names as the newest received. An honest
    /// receiver always does (unless it holds more ranges than an ack lists); when that datagram
    /// is no longer tracked, there is nothing to check.
    fn ack_covers_largest(&self, ack: &Ack<'_>) -> bool {
        let index = ack.largest_seq.checked_sub(self.first_seq);
        let Some(p) = index.and_then(|i| self.sent.get(usize::try_from(i).ok()?)) else {
            return true;
        };
        let chunk = u64::from(p.chunk);
        chunk < u64::from(ack.cumulative) || ack.ranges.iter().any(|r| r.contains(&chunk))
    }

    /// SACK reneging recovery. The newest ack proves that the receiver lacks its cumulative
    /// point and the chunk just past each listed range (the ranges are whole runs of what it
    /// holds). When an earlier ack claimed such a chunk (it was damaged in flight, or the
    /// receiver lies) and the next newest ack says the same (a damaged ack can claim too little
    /// as well as too much), the claim is withdrawn for the run of claimed chunks from there up
    /// to the next range the receiver lists, and the chunks are queued again. The receiver may
    /// hold some of them after all (it lists at most `max_ack_ranges` ranges); they are sent
    /// twice.
    ///
    /// The congestion window gives back what the withdrawn claims gave it, so a receiver that
    /// acknowledges what it never got (to make the sender overrun its window) gains nothing.
    fn recover_reneged(&mut self, now: Instant, ack: &Ack<'_>) {
        let cumulative = u64::from(ack.cumulative);
        let chunks = self.chunks;
        // Walked afresh wherever needed (the ack's ranges are read from its bytes), and the two
        // suspect lists swap buffers: an ack allocates nothing.
        let ranges = || {
            ack.ranges
                .iter()
                .filter(move |r| r.start > cumulative && r.start < chunks)
        };
        std::mem::swap(&mut self.renege_suspects, &mut self.renege_previous);
        let previous = &self.renege_previous;
        self.renege_suspects.clear();
        self.renege_suspects.extend(
            std::iter::once(cumulative)
                .chain(ranges().map(|r| r.end))
                .filter(|&c| c < chunks && self.acked.contains(c)),
        );
        // Allocated only when a claim is withdrawn.
        let mut withdrawn = RangeSet::new();
        for &chunk in self.renege_suspects.iter().filter(|c| previous.contains(c)) {
            let Some(claimed) = self.acked.range_containing(chunk) else {
                continue;
            };
            let next_listed = ranges()
                .map(|r| r.start)
                .find(|&s| s > chunk)
                .unwrap_or(self.chunks);
            let gap = chunk..claimed.end.min(next_listed);
            self.acked.remove(gap.clone());
            // Chunks at or past `next_new_chunk` go out as new data anyway.
            withdrawn.insert(gap.start..gap.end.min(self.next_new_chunk));
        }
        if withdrawn.is_empty() {
            return;
        }
        // Withdrawn chunks past everything the receiver lists may simply not have reached it
        // yet (a total lie claims the whole window in flight): they wait one probe timeout for
        // an acknowledgement before they count as lost. Those below are missing now.
        let held_end = ranges()
            .map(|r| r.end)
            .max()
            .unwrap_or(cumulative)
            .max(cumulative);
        let mut reneged = 0;
        for range in withdrawn.iter() {
            reneged += range.end - range.start;
            let split = held_end.clamp(range.start, range.end);
            self.lost.insert(range.start..split);
            if split < range.end {
                self.renege_pending.insert(split..range.end);
                let wait = self.rtt.pto(self.config.max_ack_delay);
                self.renege_deadline.get_or_insert(now + wait);
            }
        }
        if reneged > 0 {
            self.stats.chunks_reneged += reneged;
            let datagram = DATA_OVERHEAD as u64 + self.chunk_size;
            self.congestion
                .on_acks_withdrawn(reneged.saturating_mul(datagram));
        }
    }

    /// Withdrawn chunks still unacknowledged at their deadline are lost.
    fn expire_reneged(&mut self, now: Instant) {
        if self.renege_deadline.is_none_or(|t| t > now) {
            return;
        }
        self.renege_deadline = None;
        for range in self.renege_pending.iter() {
            for gap in self.acked.gaps(range) {
                self.lost.insert(gap);
            }
        }
        self.renege_pending.clear();
    }

    /// Declares lost every in-flight datagram that later acknowledgements outran (RFC 9002
    /// section 6.1: packet and time thresholds) and pops settled datagrams off the front.
    fn detect_losses(&mut self, now: Instant) {
        self.loss_time = None;
        let Some(largest) = self.largest_acked_seq else {
            return;
        };
        let loss_delay = self.rtt.loss_delay();
        while let Some(&p) = self.sent.front() {
            let seq = self.first_seq;
            if !p.settled {
                if seq >= largest {
                    break;
                }
                let by_count = seq + PACKET_THRESHOLD <= largest;
                // A loss delay too long to add to an instant never expires.
                let lost_at = p.sent.checked_add(loss_delay);
                let by_time = lost_at.is_some_and(|t| t <= now);
                if !(by_count || by_time) {
                    self.loss_time = lost_at;
                    break;
                }
                self.bytes_in_flight -= u64::from(p.bytes);
                if self.chunk_seq.get(&p.chunk) == Some(&seq) {
                    self.chunk_seq.remove(&p.chunk);
                }
                if !self.acked.contains(u64::from(p.chunk)) {
                    self.lost.insert(u64::from(p.chunk)..u64::from(p.chunk) + 1);
                    self.congestion.on_loss(p.sent, u64::from(p.bytes), now);
                }
            }
            self.sent.pop_front();
            self.first_seq += 1;
        }
    }

    fn complete(&mut self, now: Instant) {
        self.state = State::Closed;
        self.acked.insert(0..self.chunks);
        let completion = Completion {
            object: self.object,
            size: self.size,
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
        let (done, total) = (self.bytes_acked(), self.size);
        self.report
            .progress(now, self.config.progress_interval, done, total);
    }

    /// Writes the next datagram to send into `buf` (at least `max_datagram_size` bytes) and
    /// returns its length, or `None` when nothing may be sent now (see
    /// [`poll_timeout`](Self::poll_timeout) for when to ask again).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        self.pacing_wait = None;
        if let Some(n) = self
            .report
            .poll_error_frame(self.conn_id, &mut self.stats, buf)
        {
            return Some(n);
        }
        match self.state {
            State::Closed => None,
            State::Offering => {
                if !self.offer_pending {
                    return None;
                }
                self.offer_pending = false;
                self.offer_sent = Some(now);
                let offer = Offer {
                    object: self.object,
                    size: self.size,
                    chunk_size: self.chunk_size as u16,
                    nonce: self.nonce,
                };
                emit(self.conn_id, &mut self.stats, buf, Frame::Offer(offer))
            }
            State::Sending => self.poll_data(now, buf),
        }
    }

    fn poll_data(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        if buf.len() < DATA_OVERHEAD + self.chunk_size as usize {
            // The caller's buffer is smaller than the datagram size: send nothing rather than
            // take a chunk off the queues and fail to write it.
            return None;
        }
        let probe = self.probes_pending > 0;
        let mut copy = false;
        let chunk = if probe {
            self.probe_chunk()?
        } else {
            let datagram_size = DATA_OVERHEAD as u64 + self.chunk_size;
            if self.bytes_in_flight + datagram_size > self.congestion.window() {
                return None;
            }
            let (chunk, is_copy) = match self.next_chunk() {
                Some(chunk) => (chunk, false),
                None => match self.tail_copy() {
                    Some(chunk) => (chunk, true),
                    None => {
                        // The window has room the sender cannot use.
                        self.congestion.on_app_limited(self.bytes_in_flight);
                        return None;
                    }
                },
            };
            self.update_pacing_rate(now);
            if !self.pacer.try_take(datagram_size, now) {
                self.pacing_wait = Some(self.pacer.ready_at(datagram_size, now));
                return None;
            }
            copy = is_copy;
            if is_copy {
                self.tail_copies_sent += 1;
            } else {
                self.take_chunk(chunk);
            }
            chunk
        };
        let range = chunk_bytes(chunk, self.chunk_size, self.size);
        let len = (range.end - range.start) as usize;
        let payload = buf.get_mut(DATA_PAYLOAD_OFFSET..DATA_PAYLOAD_OFFSET + len)?;
        if let Err(e) = self.source.read_at(range.start, payload) {
            self.fail_with(TransferError::storage("read", &e));
            return self.poll_transmit(now, buf);
        }
        let seq = self.next_seq;
        let n = encode_data_in_place(
            buf,
            self.conn_id,
            seq,
            wire_micros(now, self.clock_epoch),
            chunk as u32,
            len,
        )
        .ok()?;
        if probe {
            self.probes_pending -= 1;
            self.pacer.take(n as u64, now);
        }
        self.next_seq += 1;
        self.chunk_seq.insert(chunk as u32, seq);
        if copy {
            self.stats.tail_copies += 1;
        } else if chunk < self.sent_frontier {
            // New chunks go out in increasing order, so anything below the frontier is a repeat.
            self.stats.chunks_retransmitted += 1;
            self.stats.bytes_retransmitted += n as u64;
        } else {
            self.sent_frontier = chunk + 1;
        }
        let delivery = self.congestion.on_send(now, self.bytes_in_flight);
        self.sent.push_back(SentPacket {
            chunk: chunk as u32,
            sent: now,
            bytes: n as u32,
            settled: false,
            delivery,
            copy,
        });
        self.bytes_in_flight += n as u64;
        self.last_data_sent = Some(now);
        self.stats.chunks_sent += 1;
        self.stats.datagrams_sent += 1;
        self.stats.bytes_sent += n as u64;
        Some(n)
    }

    /// The next chunk to send under flow control: a lost one first, else a new one.
    fn next_chunk(&mut self) -> Option<u64> {
        while let Some(chunk) = self.lost.min() {
            if self.acked.contains(chunk) {
                self.lost.pop_min();
                continue;
            }
            return Some(chunk);
        }
        let limit = self.chunks.min(self.window_end);
        let next = self.acked.first_missing_from(self.next_new_chunk);
        (next < limit).then_some(next)
    }

    /// With every chunk sent and none waiting to be sent again, a chunk of one of the
    /// `TAIL_COPIES` newest datagrams to send a second time: one still unacknowledged whose
    /// newest send that datagram is and that is not itself a copy, the newest first. At most
    /// `TAIL_COPIES` per transfer: retransmissions at the end, which a lossy path makes many
    /// of, get none.
    fn tail_copy(&self) -> Option<u64> {
        // With chunks left that flow control holds back, this is not the tail.
        if self.tail_copies_sent >= TAIL_COPIES
            || self.acked.first_missing_from(self.next_new_chunk) < self.chunks
        {
            return None;
        }
        let newest = self.first_seq + self.sent.len() as u64;
        self.sent
            .iter()
            .rev()
            .zip((0..newest).rev())
            .take(TAIL_COPIES)
            .find(|(p, seq)| {
                !p.settled
                    && !p.copy
                    && !self.acked.contains(u64::from(p.chunk))
                    && self.chunk_seq.get(&p.chunk) == Some(seq)
            })
            .map(|(p, _)| u64::from(p.chunk))
    }

    /// Removes `chunk` (returned by `next_chunk`) from the queues it came from.
    fn take_chunk(&mut self, chunk: u64) {
        if self.lost.min() == Some(chunk) {
            self.lost.pop_min();
        } else {
            self.next_new_chunk = chunk + 1;
        }
    }

    /// What a probe carries. New data when there is some: its acknowledgement tells what became
    /// of everything sent before it, without repeating chunks that may well have arrived (RFC 9002
    /// section 6.2.4). Otherwise the oldest chunk still unacknowledged, or (everything
    /// acknowledged but no `Done` heard) the last chunk, to make the receiver repeat its `Done`.
    fn probe_chunk(&mut self) -> Option<u64> {
        if let Some(chunk) = self.next_chunk() {
            self.take_chunk(chunk);
            return Some(chunk);
        }
        // Skip datagrams whose chunk went out again later, so successive probes walk through
        // the unacknowledged chunks instead of repeating one whose acks keep getting lost.
        let first_seq = self.first_seq;
        let oldest = self
            .sent
            .iter()
            .zip(first_seq..)
            .find(|(p, seq)| {
                !p.settled
                    && !self.acked.contains(u64::from(p.chunk))
                    && self.chunk_seq.get(&p.chunk) == Some(seq)
            })
            .map(|(p, _)| u64::from(p.chunk));
        oldest.or(self.chunks.checked_sub(1))
    }

    fn update_pacing_rate(&mut self, now: Instant) {
        // The model's rate once it has one; before, 1.25 windows per round trip (as quinn and
        // Linux do). Under the rate cap, which makes the transfer app-limited while it binds.
        let model_rate = self.congestion.pacing_rate().unwrap_or_else(|| {
            let rtt = self.rtt.smoothed().max(Duration::from_micros(100));
            let rate = u128::from(self.congestion.window()) * 5 * 1_000_000 / 4 / rtt.as_micros();
            u64::try_from(rate).unwrap_or(u64::MAX)
        });
        let rate = match self.rate_cap {
            0 => model_rate,
            cap if cap < model_rate => {
                self.congestion.on_app_limited(self.bytes_in_flight);
                cap
            }
            _ => model_rate,
        };
        if rate != self.pacer.rate() {
            self.pacer.set_rate(rate.max(1), now);
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called, or `None` when the
    /// transfer is over.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.report.is_finished() {
            return None;
        }
        // An idle timeout too long to add to an instant never expires.
        let idle = self.last_heard.checked_add(self.config.idle_timeout);
        [
            idle,
            self.loss_time,
            self.pto_deadline(),
            self.pacing_wait,
            self.offer_deadline(),
            self.renege_deadline,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// When to repeat the offer unasked: the client's start (or, for an object it already holds,
    /// its done) may have been lost. Bounded, so an unvalidated address never receives more than
    /// a few offers per request (anti-amplification).
    fn offer_deadline(&self) -> Option<Instant> {
        if self.state != State::Offering || self.offer_repeats >= MAX_OFFER_REPEATS {
            return None;
        }
        let pto = self
            .rtt
            .pto(self.config.max_ack_delay)
            .saturating_mul(1 << self.offer_repeats.min(MAX_PTO_BACKOFF));
        self.offer_sent?.checked_add(pto.min(MAX_PTO))
    }

    fn pto_deadline(&self) -> Option<Instant> {
        if self.state != State::Sending || self.probes_pending > 0 {
            return None;
        }
        let last = self.last_data_sent?;
        let nothing_outstanding = self.bytes_in_flight == 0 && self.acked.covered() < self.chunks;
        if nothing_outstanding {
            // Waiting on flow control or the pacer, not on the network.
            return None;
        }
        let pto = self
            .rtt
            .pto(self.config.max_ack_delay)
            .saturating_mul(1 << self.pto_count.min(MAX_PTO_BACKOFF));
        let deadline = last.checked_add(pto.min(MAX_PTO))?;
        match self.all_acked_at {
            // Every chunk is acknowledged: the receiver is checking the digest, and the first
            // probe for its Done waits `DONE_WAIT` (later ones, after a probe went unanswered,
            // follow the probe timer).
            Some(at) if self.acked.covered() >= self.chunks => {
                Some(deadline.max(later(at, DONE_WAIT)))
            }
            _ => Some(deadline),
        }
    }

    /// The client now receives at another address, which its owner validated (docs/PROTOCOL.md
    /// section 5.9); the owner sends from now on there. What was in flight went to the old path
    /// and is presumed lost (queued again, without counting as congestion), and the congestion
    /// state and RTT estimate start over, as for a new path: its bottleneck and delay may be
    /// nothing like the old one's. Chunks acknowledged stay acknowledged. Drain
    /// [`poll_transmit`](Self::poll_transmit) next.
    pub fn migrate(&mut self, now: Instant) {
        if self.state != State::Sending {
            return;
        }
        for p in self.sent.iter_mut().filter(|p| !p.settled) {
            p.settled = true;
            if !self.acked.contains(u64::from(p.chunk)) {
                self.lost
                    .insert(u64::from(p.chunk)..u64::from(p.chunk) + 1);
            }
        }
        self.chunk_seq.clear();
        self.bytes_in_flight = 0;
        self.loss_time = None;
        self.pto_count = 0;
        self.probes_pending = 0;
        self.renege_pending.clear();
        self.renege_deadline = None;
        self.rtt = RttEstimator::new(self.config.initial_rtt);
        self.congestion = Controller::new(
            self.congestion.kind(),
            self.chunk_size + DATA_OVERHEAD as u64,
        );
        self.last_heard = now;
        self.stats.path_changes += 1;
        self.update_pacing_rate(now);
        self.pacing_wait = None;
    }

    /// Call when the instant from [`poll_timeout`](Self::poll_timeout) has passed, then drain
    /// `poll_transmit` and `poll_event`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.report.is_finished() {
            return;
        }
        let idle = self.last_heard.checked_add(self.config.idle_timeout);
        if idle.is_some_and(|t| now >= t) {
            self.state = State::Closed;
            self.report.finish(Event::Failed(TransferError::TimedOut(
                self.config.idle_timeout,
            )));
            return;
        }
        if self.pacing_wait.is_some_and(|t| t <= now) {
            // The pacer has tokens again: the caller's next poll_transmit sends.
            self.pacing_wait = None;
        }
        if self.loss_time.is_some_and(|t| t <= now) {
            self.detect_losses(now);
        }
        self.expire_reneged(now);
        if self.offer_deadline().is_some_and(|t| t <= now) {
            self.offer_repeats += 1;
            self.offer_pending = true;
        }
        if self.pto_deadline().is_some_and(|t| t <= now) {
            self.pto_count += 1;
            self.stats.probe_timeouts += 1;
            self.probes_pending = 2;
            // With every chunk acknowledged the probes only ask for the receiver's Done; their
            // fate says nothing about how much data the path carries.
            let data_outstanding = self.acked.covered() < self.chunks;
            if self.pto_count >= PERSISTENT_CONGESTION_PTOS && data_outstanding {
                self.congestion.on_persistent_congestion(now);
            }
        }
    }

    /// The next event for the user, if any. Drain after every call that feeds the transfer.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.report.poll_event()
    }
}
