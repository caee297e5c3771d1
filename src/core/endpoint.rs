//! Many transfers behind one socket: demultiplexing, accepting requests, limits, a shared
//! uplink budget, and reaping.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::congestion::PathBase;
use super::pacer::Pacer;
use super::ranges::RangeSet;
use super::{ChunkSink, ChunkSource, Event, Receiver, Sender, TransferConfig};
use crate::id::ObjectId;
use crate::wire::{
    self, ConnectionId, Datagram, ErrorCode, ErrorFrame, Frame, Offer, Request, Wait,
};

/// Where a serving endpoint finds objects.
///
/// Implemented by the file store (`store::ContentStore`) and by in-memory maps in tests. An
/// endpoint that only downloads uses [`NoObjects`].
pub trait ObjectProvider {
    /// How the bytes of one object are read.
    type Source: ChunkSource;
    /// Opens object `id` for one transfer: its size and a reader, or `Ok(None)` when this
    /// provider does not have it (the client is told "not found"). An error is answered with an
    /// internal-error frame.
    fn open(&mut self, id: &ObjectId) -> io::Result<Option<(u64, Self::Source)>>;

    /// The size of object `id`, or `Ok(None)` when this provider does not have it, for the
    /// offer answering a request. Nothing is opened for a request (it may come from a forged
    /// address); [`open`](Self::open) follows when the client's Start arrives, and may still
    /// say "not found" then. The default opens the object and drops the reader; a provider
    /// that knows sizes cheaply (an index) should answer from it.
    fn size_of(&mut self, id: &ObjectId) -> io::Result<Option<u64>> {
        Ok(self.open(id)?.map(|(size, _)| size))
    }
}

/// A provider with no objects, for endpoints that only download.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObjects;

impl ObjectProvider for NoObjects {
    type Source = &'static [u8];
    fn open(&mut self, _id: &ObjectId) -> io::Result<Option<(u64, &'static [u8])>> {
        Ok(None)
    }
}

impl ObjectProvider for HashMap<ObjectId, std::sync::Arc<[u8]>> {
    type Source = std::sync::Arc<[u8]>;
    fn open(&mut self, id: &ObjectId) -> io::Result<Option<(u64, Self::Source)>> {
        Ok(self.get(id).map(|d| (d.len() as u64, d.clone())))
    }
    fn size_of(&mut self, id: &ObjectId) -> io::Result<Option<u64>> {
        Ok(self.get(id).map(|d| d.len() as u64))
    }
}

/// Settings of an [`Endpoint`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    /// Settings every transfer of this endpoint uses.
    pub transfer: TransferConfig,
    /// Most transfers at once, both roles together. Requests beyond it are answered "busy".
    pub max_transfers: usize,
    /// Most transfers at once with one peer address.
    pub max_transfers_per_address: usize,
    /// Most requests waiting for a slot (docs/PROTOCOL.md section 5.8): a Start beyond
    /// `max_transfers` or `max_transfers_per_address` takes a place in a FIFO queue (about 80
    /// bytes each) and is answered with its place; only when the queue is full is it answered
    /// "busy". 0: no queue.
    pub max_waiting: usize,
    /// Uplink budget for all transfers together, bytes per second (0: none). Each transfer's own
    /// cap is `transfer.max_rate_bytes_per_sec`.
    pub rate_limit_bytes_per_sec: u64,
    /// Most replies to requests (offers, not found, busy) queued at once; more requests are
    /// dropped unanswered.
    pub max_pending_replies: usize,
    /// Requests answered per second from one IP address (a token bucket holding as many), so
    /// that a forged source address cannot turn the server into a stream of replies at a
    /// victim. Requests beyond it are dropped unanswered. Requests from an address and port
    /// that already has a transfer with this endpoint are not counted (it proved its address;
    /// a multi-source client asks for its next pieces that way). 0: no limit.
    pub max_requests_per_address_per_sec: u32,
    /// The 128-bit key of the SipHash-2-4 that makes connection ids, and offer nonces from
    /// requests. A driver takes it from the operating system's randomness
    /// (`net::random_seed`); tests pass a fixed value. Anyone who knows it can predict the ids
    /// and forge offers, so never log it.
    pub seed: u128,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            transfer: TransferConfig::default(),
            max_transfers: 256,
            max_transfers_per_address: 8,
            max_waiting: 1024,
            rate_limit_bytes_per_sec: 0,
            max_pending_replies: 64,
            max_requests_per_address_per_sec: 20,
            seed: 0,
        }
    }
}

/// A transfer's handle within its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransferId(pub u64);

/// Which side of a transfer this endpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// This endpoint sends the object (it accepted a request).
    Serving,
    /// This endpoint receives the object (it called [`Endpoint::fetch`]).
    Fetching,
}

/// An event of one of the endpoint's transfers.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointEvent {
    /// The transfer.
    pub transfer: TransferId,
    /// Its side.
    pub role: Role,
    /// The peer's address.
    pub peer: SocketAddr,
    /// The object.
    pub object: ObjectId,
    /// What happened.
    pub event: Event,
}

/// A transfer as listed by [`Endpoint::transfers`].
#[derive(Debug, Clone, PartialEq)]
pub struct TransferInfo {
    /// Its handle.
    pub id: TransferId,
    /// Its side.
    pub role: Role,
    /// The peer's address.
    pub peer: SocketAddr,
    /// The object.
    pub object: ObjectId,
    /// True once it completed or failed (it may linger a little longer).
    pub finished: bool,
    /// Its counters: rates, window, round-trip time, queueing delay, bytes sent and repeated.
    pub stats: super::Stats,
}

/// A datagram to send, written into the caller's buffer by [`Endpoint::poll_transmit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Where to send it.
    pub destination: SocketAddr,
    /// Its length at the start of the buffer.
    pub len: usize,
}

/// Counters of an endpoint (its transfers keep their own, see [`Endpoint::transfer_stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EndpointStats {
    /// Datagrams handed to `handle_datagram`.
    pub datagrams_received: u64,
    /// Datagrams sent, all transfers.
    pub datagrams_sent: u64,
    /// Bytes sent, all transfers.
    pub bytes_sent: u64,
    /// Dropped: failed to decode (including bad checksums).
    pub malformed: u64,
    /// Dropped: not a request, and no transfer with that address and connection id.
    pub unknown_connection: u64,
    /// Requests answered "not found".
    pub not_found: u64,
    /// Requests answered "busy" (a limit was reached).
    pub busy: u64,
    /// Requests dropped unanswered because too many replies were queued.
    pub replies_dropped: u64,
    /// Requests answered with an offer (no state is kept until the client's Start).
    pub offers: u64,
    /// Requests dropped unanswered because their address sent too many.
    pub rate_limited: u64,
    /// Starts for no transfer whose nonce was not one this endpoint issued (recently) for
    /// that address, connection and request: answered like a request, with a fresh offer.
    pub bad_starts: u64,
    /// Transfers accepted (serving).
    pub accepted: u64,
    /// Starts that took a place in the admission queue.
    pub queued: u64,
    /// Places in the queue forgotten because their client stopped repeating its Start, or did
    /// not start when its slot came.
    pub queue_expired: u64,
    /// Transfers removed after they finished.
    pub reaped: u64,
    /// Path challenges sent: a serving transfer's client spoke from a new address
    /// (docs/PROTOCOL.md section 5.9).
    pub path_challenges: u64,
    /// Serving transfers moved to a new client address after it echoed a challenge.
    pub migrations: u64,
    /// Path responses that did not echo a token issued for their address (or came for no
    /// serving transfer): dropped.
    pub bad_path_responses: u64,
}

enum Transfer<S, K> {
    Serving(Box<Sender<S>>),
    Fetching(Box<Receiver<SinkSlot<K>>>),
}

struct Slot<S, K> {
    peer: SocketAddr,
    conn_id: ConnectionId,
    object: ObjectId,
    transfer: Transfer<S, K>,
    /// A serving transfer's candidate new path: the latest other address its connection id
    /// came from, and what was received from and sent to it, for the 3x budget.
    probe: Option<PathProbe>,
}

/// Bytes to and from an address not yet validated for a transfer (docs/PROTOCOL.md 5.9): the
/// server sends it at most three times what it received from it.
#[derive(Debug, Clone, Copy)]
struct PathProbe {
    addr: SocketAddr,
    received: u64,
    sent: u64,
}

/// Holds a fetching transfer's sink so the owner can take it out once the transfer finished,
/// while the receiver lingers to answer a sender that missed its `Done`.
struct SinkSlot<K>(Option<K>);

impl<K: ChunkSink> ChunkSink for SinkSlot<K> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        match &mut self.0 {
            Some(k) => k.write_at(offset, data),
            None => Err(io::Error::other("sink already taken")),
        }
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match &mut self.0 {
            Some(k) => k.read_at(offset, buf),
            None => Err(io::Error::other("sink already taken")),
        }
    }
}

/// Many transfers, both roles, behind one socket. Still sans-IO: the caller owns the socket.
///
/// Call order, as for a single transfer (see the module docs):
/// 1. for every datagram the socket receives for which
///    [`is_udpferry_datagram`](crate::is_udpferry_datagram) is true, call
///    [`handle_datagram`](Self::handle_datagram) with its source address;
/// 2. drain [`poll_transmit`](Self::poll_transmit) and send each datagram to its destination;
/// 3. drain [`poll_event`](Self::poll_event);
/// 4. wake at [`poll_timeout`](Self::poll_timeout) and call
///    [`handle_timeout`](Self::handle_timeout), then go back to 2.
///
/// Requests for objects are answered from the [`ObjectProvider`]; downloads are started with
/// [`fetch`](Self::fetch). A game calls steps 1-4 once per tick with its own socket.
pub struct Endpoint<P: ObjectProvider, K> {
    config: EndpointConfig,
    provider: P,
    transfers: BTreeMap<TransferId, Slot<P::Source, K>>,
    by_connection: HashMap<(SocketAddr, ConnectionId), TransferId>,
    /// Serving transfers by connection id alone, to recognise a client that speaks from a new
    /// address. The first transfer with an id keeps the entry (a later one with the same id, from
    /// another address, cannot take over its path).
    serving_by_conn: HashMap<ConnectionId, TransferId>,
    /// The transfers with each IP address (both roles): the per-address limit counts them, and
    /// window sharing walks a host's transfers without scanning the others.
    per_address: HashMap<std::net::IpAddr, Vec<TransferId>>,
    /// How many transfers each peer address (IP and port) has, so that `remove` knows when a
    /// peer's last one ended (and its path state can go) without scanning every connection.
    per_peer: HashMap<SocketAddr, usize>,
    next_id: u64,
    cursor: TransferId,
    replies: VecDeque<(SocketAddr, ConnectionId, Reply)>,
    requests: RequestLimiter,
    events: VecDeque<EndpointEvent>,
    uplink: Pacer,
    /// One clock epoch for every transfer, so their one-way delay samples are comparable.
    epoch: Option<Instant>,
    /// Lowest one-way delay per peer, pooled over that peer's transfers.
    paths: HashMap<SocketAddr, PathBase>,
    uplink_wait: Option<Instant>,
    rng: IdGenerator,
    stats: EndpointStats,
    /// Validated Starts waiting for a slot, oldest first (section 5.8 of the protocol).
    waiting: VecDeque<Waiter>,
    /// A transfer was removed since the queue was last looked at: a slot may be free.
    freed: bool,
    /// Slots held for called waiters.
    called: HeldSlots,
    /// When the queue was last walked for places to forget.
    expiry_scanned: Option<Instant>,
}

/// Slots held for called waiters, in total and per IP address, so that checking a limit
/// never walks the queue.
#[derive(Debug, Default)]
struct HeldSlots {
    total: usize,
    per_address: HashMap<std::net::IpAddr, usize>,
}

impl HeldSlots {
    fn at(&self, ip: std::net::IpAddr) -> usize {
        self.per_address.get(&ip).copied().unwrap_or(0)
    }
    fn hold(&mut self, ip: std::net::IpAddr) {
        self.total += 1;
        *self.per_address.entry(ip).or_default() += 1;
    }
    fn release(&mut self, ip: std::net::IpAddr) {
        self.total = self.total.saturating_sub(1);
        if let Some(n) = self.per_address.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_address.remove(&ip);
            }
        }
    }
}

/// A client waiting in the admission queue: the Start it repeats proves its address.
#[derive(Debug, Clone, Copy)]
struct Waiter {
    peer: SocketAddr,
    conn_id: ConnectionId,
    /// When its Start last came.
    refreshed: Instant,
    /// When a slot was set aside for it (it was told to start at once), if one was.
    called: Option<Instant>,
}

impl<P: ObjectProvider, K: ChunkSink> Endpoint<P, K> {
    /// An endpoint serving from `provider` (use [`NoObjects`] to only download).
    pub fn new(config: EndpointConfig, provider: P) -> Self {
        let burst = u64::from(config.transfer.burst_datagrams.max(1))
            * config.transfer.datagram_size() as u64;
        Endpoint {
            uplink: Pacer::new(config.rate_limit_bytes_per_sec, burst),
            uplink_wait: None,
            epoch: None,
            paths: HashMap::new(),
            rng: IdGenerator::new(config.seed),
            provider,
            transfers: BTreeMap::new(),
            by_connection: HashMap::new(),
            serving_by_conn: HashMap::new(),
            per_address: HashMap::new(),
            per_peer: HashMap::new(),
            next_id: 0,
            cursor: TransferId(0),
            replies: VecDeque::new(),
            requests: RequestLimiter::new(config.max_requests_per_address_per_sec),
            events: VecDeque::new(),
            stats: EndpointStats::default(),
            waiting: VecDeque::new(),
            freed: false,
            called: HeldSlots::default(),
            expiry_scanned: None,
            config,
        }
    }

    /// The provider, for example to rescan a store.
    pub fn provider_mut(&mut self) -> &mut P {
        &mut self.provider
    }

    /// Counters so far.
    pub fn stats(&self) -> &EndpointStats {
        &self.stats
    }

    /// Transfers in progress (or lingering after their end).
    pub fn transfer_count(&self) -> usize {
        self.transfers.len()
    }

    /// Counters of one transfer, while the endpoint still holds it.
    pub fn transfer_stats(&self, id: TransferId) -> Option<super::Stats> {
        self.transfers.get(&id).map(|slot| match &slot.transfer {
            Transfer::Serving(s) => s.stats(),
            Transfer::Fetching(r) => r.stats(),
        })
    }

    /// Every transfer the endpoint holds, with its counters: for a status line or a dashboard.
    pub fn transfers(&self) -> impl Iterator<Item = TransferInfo> + '_ {
        self.transfers.iter().map(|(id, slot)| {
            let (role, stats, finished) = match &slot.transfer {
                Transfer::Serving(s) => (Role::Serving, s.stats(), s.is_finished()),
                Transfer::Fetching(r) => (Role::Fetching, r.stats(), r.is_finished()),
            };
            TransferInfo {
                id: *id,
                role,
                peer: slot.peer,
                object: slot.object,
                finished,
                stats,
            }
        })
    }

    /// Bytes received so far by a fetching transfer, as byte ranges (for a resume journal).
    pub fn received_bytes(&self, id: TransferId) -> Option<RangeSet> {
        match &self.transfers.get(&id)?.transfer {
            Transfer::Fetching(r) => Some(r.received_bytes()),
            Transfer::Serving(_) => None,
        }
    }

    /// Starts downloading object `id` from `server` into `sink`; `have` lists byte ranges
    /// already in `sink` (resume). Drain [`poll_transmit`](Self::poll_transmit) next. The
    /// transfer ends with [`Event::Completed`] or [`Event::Failed`]; then take the sink back with
    /// [`take_sink`](Self::take_sink).
    pub fn fetch(
        &mut self,
        now: Instant,
        server: SocketAddr,
        id: ObjectId,
        have: &RangeSet,
        sink: K,
    ) -> TransferId {
        let conn_id = loop {
            let c = ConnectionId(self.rng.next());
            if !self.by_connection.contains_key(&(server, c)) {
                break c;
            }
        };
        let mut receiver = Receiver::new(
            now,
            conn_id,
            id,
            have,
            SinkSlot(Some(sink)),
            self.config.transfer.clone(),
        );
        receiver.set_clock_epoch(*self.epoch.get_or_insert(now));
        self.insert(server, conn_id, id, Transfer::Fetching(Box::new(receiver)))
    }

    /// Replaces the hasher of fetching transfer `id` (see [`Receiver::set_hasher`]). Call it
    /// right after [`fetch`](Self::fetch), before handing the endpoint any datagram. Returns
    /// false (and changes nothing) for a serving or unknown transfer or one that began hashing.
    pub fn set_hasher(&mut self, id: TransferId, hasher: Box<dyn super::PrefixHasher>) -> bool {
        match self.transfers.get_mut(&id).map(|slot| &mut slot.transfer) {
            Some(Transfer::Fetching(receiver)) => receiver.set_hasher(hasher),
            _ => false,
        }
    }

    /// Leaves the verification of download `id`'s bytes to the caller (see
    /// [`Receiver::verify_by_caller`](super::Receiver::verify_by_caller)): its `Completed` then
    /// means every byte arrived, not that they hash to the id. Call it right after
    /// [`fetch`](Self::fetch); false when `id` is not a download that has not begun.
    pub fn verify_by_caller(&mut self, id: TransferId) -> bool {
        match self.transfers.get_mut(&id).map(|slot| &mut slot.transfer) {
            Some(Transfer::Fetching(receiver)) => receiver.verify_by_caller(),
            _ => false,
        }
    }

    /// Takes back the sink of a fetching transfer that has finished (completed: it holds the
    /// verified object; failed: it holds what arrived, for a resume). `None` while the transfer
    /// runs, for a serving transfer, or if already taken.
    ///
    /// Call it after the transfer's final event: a finished download is removed from the
    /// endpoint only once its sink was taken.
    pub fn take_sink(&mut self, id: TransferId) -> Option<K> {
        match &mut self.transfers.get_mut(&id)?.transfer {
            Transfer::Fetching(r) if r.is_finished() => r.sink_mut().0.take(),
            _ => None,
        }
    }

    /// The sink of a fetching transfer, while the endpoint holds it: for owner bookkeeping such
    /// as recording the object's size once [`Event::Started`] arrives. Writing object bytes into
    /// it voids the digest check.
    pub fn sink_mut(&mut self, id: TransferId) -> Option<&mut K> {
        match &mut self.transfers.get_mut(&id)?.transfer {
            Transfer::Fetching(r) => r.sink_mut().0.as_mut(),
            Transfer::Serving(_) => None,
        }
    }

    /// Cancels a transfer: the peer is told, and the transfer reports
    /// [`TransferError::Cancelled`](super::TransferError::Cancelled).
    pub fn cancel(&mut self, id: TransferId) {
        if let Some(slot) = self.transfers.get_mut(&id) {
            match &mut slot.transfer {
                Transfer::Serving(s) => s.cancel(),
                Transfer::Fetching(r) => r.cancel(),
            }
            self.collect_events(id);
        }
    }

    fn insert(
        &mut self,
        peer: SocketAddr,
        conn_id: ConnectionId,
        object: ObjectId,
        transfer: Transfer<P::Source, K>,
    ) -> TransferId {
        let id = TransferId(self.next_id);
        self.next_id += 1;
        if matches!(transfer, Transfer::Serving(_)) {
            self.serving_by_conn.entry(conn_id).or_insert(id);
        }
        self.index(id, peer, conn_id);
        self.transfers.insert(
            id,
            Slot {
                peer,
                conn_id,
                object,
                transfer,
                probe: None,
            },
        );
        id
    }

    /// Files transfer `id` under its peer address (connection table, per-address and per-peer
    /// counts).
    fn index(&mut self, id: TransferId, peer: SocketAddr, conn_id: ConnectionId) {
        self.by_connection.insert((peer, conn_id), id);
        self.per_address.entry(peer.ip()).or_default().push(id);
        *self.per_peer.entry(peer).or_default() += 1;
    }

    /// Undoes [`index`](Self::index); the peer's path state goes with its last transfer.
    fn unindex(&mut self, id: TransferId, peer: SocketAddr, conn_id: ConnectionId) {
        self.by_connection.remove(&(peer, conn_id));
        if let Some(n) = self.per_peer.get_mut(&peer) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&peer);
                self.paths.remove(&peer);
            }
        }
        if let Some(ids) = self.per_address.get_mut(&peer.ip()) {
            if let Some(i) = ids.iter().position(|t| *t == id) {
                ids.swap_remove(i);
            }
            if ids.is_empty() {
                self.per_address.remove(&peer.ip());
            }
        }
    }

    fn remove(&mut self, id: TransferId) {
        if let Some(slot) = self.transfers.remove(&id) {
            self.unindex(id, slot.peer, slot.conn_id);
            if self.serving_by_conn.get(&slot.conn_id) == Some(&id) {
                self.serving_by_conn.remove(&slot.conn_id);
            }
            self.stats.reaped += 1;
            self.freed = true;
        }
    }

    /// Feeds one datagram received from `from`. Malformed datagrams and datagrams for unknown
    /// connections are counted and dropped without creating state; requests are accepted,
    /// answered "not found", or answered "busy" at a limit.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        self.stats.datagrams_received += 1;
        let datagram = match wire::decode(data) {
            Ok(d) => d,
            Err(_) => {
                self.stats.malformed += 1;
                return;
            }
        };
        if let Some(&id) = self.by_connection.get(&(from, datagram.conn_id)) {
            if let Some(slot) = self.transfers.get_mut(&id) {
                match &mut slot.transfer {
                    Transfer::Serving(s) => {
                        s.handle_decoded(now, &datagram, data.len());
                        if let Some(owd) = s.take_delay_sample() {
                            let path = self.paths.entry(from).or_default();
                            path.sample(owd, now);
                            if let Some(base) = path.base() {
                                s.set_path_base_delay(base);
                            }
                        }
                    }
                    Transfer::Fetching(r) => r.handle_decoded(now, &datagram, data.len()),
                }
                self.collect_events(id);
                if matches!(datagram.frame, Frame::Ack(_)) {
                    self.share_path_window(from.ip());
                }
            }
            return;
        }
        match &datagram.frame {
            Frame::Request(request) => self.offer(now, from, datagram.conn_id, request),
            Frame::Start { .. } => self.accept(now, from, &datagram, data.len()),
            Frame::Ack(_) | Frame::Done => {
                if !self.challenge(now, from, datagram.conn_id, data.len()) {
                    self.stats.unknown_connection += 1;
                }
            }
            Frame::PathResponse(token) => {
                self.validate(now, from, datagram.conn_id, *token);
            }
            _ => self.stats.unknown_connection += 1,
        }
    }

    /// The serving transfer with connection id `conn_id` that is still sending, if its client is
    /// not at `from`.
    fn moved_transfer(&self, from: SocketAddr, conn_id: ConnectionId) -> Option<TransferId> {
        let id = *self.serving_by_conn.get(&conn_id)?;
        let slot = self.transfers.get(&id)?;
        match &slot.transfer {
            Transfer::Serving(s) if s.is_sending() && slot.peer != from => Some(id),
            _ => None,
        }
    }

    /// An ack, done or start of a serving transfer came from `from`, not the transfer's address:
    /// the client's NAT re-mapped it, or it moved, or someone forged it. The transfer stays where
    /// it is; `from` is sent a path challenge, within three times what it sent us
    /// (docs/PROTOCOL.md 5.9). False when no serving transfer has that connection id.
    fn challenge(&mut self, now: Instant, from: SocketAddr, conn_id: ConnectionId, len: usize) -> bool {
        let Some(slot) = self
            .moved_transfer(from, conn_id)
            .and_then(|id| self.transfers.get_mut(&id))
        else {
            return false;
        };
        let probe = match &mut slot.probe {
            Some(p) if p.addr == from => p,
            other => other.insert(PathProbe {
                addr: from,
                received: 0,
                sent: 0,
            }),
        };
        probe.received = probe.received.saturating_add(len as u64);
        let cost = wire::PATH_FRAME_LEN as u64;
        if probe.sent + cost <= probe.received.saturating_mul(3) {
            probe.sent += cost;
            let bucket = self.cookie_bucket(now);
            let token = self.path_token(from, conn_id, bucket);
            self.stats.path_challenges += 1;
            self.queue_reply(from, conn_id, Reply::PathChallenge(token));
        }
        true
    }

    /// A path response from `from`: if it echoes the token issued to that address for a serving
    /// transfer (this cookie period or the one before), the transfer moves there.
    fn validate(&mut self, now: Instant, from: SocketAddr, conn_id: ConnectionId, token: u64) {
        let bucket = self.cookie_bucket(now);
        let valid = self.moved_transfer(from, conn_id).filter(|_| {
            (bucket.saturating_sub(1)..=bucket).any(|b| self.path_token(from, conn_id, b) == token)
        });
        let Some(id) = valid else {
            self.stats.bad_path_responses += 1;
            return;
        };
        let Some(slot) = self.transfers.get_mut(&id) else {
            return;
        };
        let old = std::mem::replace(&mut slot.peer, from);
        slot.probe = None;
        if let Transfer::Serving(s) = &mut slot.transfer {
            s.migrate(now);
        }
        self.unindex(id, old, conn_id);
        self.index(id, from, conn_id);
        self.requests.vouch(from, now);
        self.stats.migrations += 1;
    }

    /// The token of a path challenge: SipHash-2-4 under the endpoint's secret over the address
    /// challenged, the connection id and the cookie period, so only a client that receives at
    /// that address can echo it, and no state is kept per challenge.
    fn path_token(&self, to: SocketAddr, conn_id: ConnectionId, bucket: u64) -> u64 {
        use std::hash::Hasher;
        let mut h = self.rng.hasher();
        h.write_u8(b'P'); // domain: path tokens, never equal to a cookie
        write_addr(&mut h, to);
        h.write_u64(conn_id.0);
        h.write_u64(bucket);
        h.finish()
    }

    /// Transfers to one host share its path, so they share its congestion window: when their
    /// windows drift more than 10% apart, each gets the average (the sum is kept). Without this
    /// a transfer that starts while another already fills the bottleneck takes a long time to
    /// reach an equal share, because a delay-based controller holds the queue steady.
    ///
    /// Called for every ack, so it allocates nothing: it walks the host's transfers twice.
    fn share_path_window(&mut self, host: std::net::IpAddr) {
        let Some(ids) = self.per_address.get(&host) else {
            return;
        };
        if ids.len() < 2 {
            return;
        }
        let transfers = &mut self.transfers;
        let sending = |slot: &Slot<P::Source, K>| match &slot.transfer {
            Transfer::Serving(s) if s.is_sending() => Some(s.congestion_window()),
            _ => None,
        };
        let (mut count, mut min, mut max, mut sum) = (0u64, u64::MAX, 0, 0u64);
        for w in ids
            .iter()
            .filter_map(|id| transfers.get(id).and_then(sending))
        {
            count += 1;
            (min, max, sum) = (min.min(w), max.max(w), sum.saturating_add(w));
        }
        if count < 2 || max <= min + min / 10 {
            return;
        }
        let share = sum / count;
        for id in ids {
            if let Some(Slot {
                transfer: Transfer::Serving(s),
                ..
            }) = transfers.get_mut(id)
            {
                if s.is_sending() {
                    s.set_congestion_window(share);
                }
            }
        }
    }

    /// Whether a transfer with `from` fits the limits now, counting the slots held for called
    /// waiters (except the one at queue index `except`, when it asks for its own slot).
    fn fits(&self, from: SocketAddr, except: Option<usize>) -> bool {
        let (mut total, mut at_address) = (self.called.total, self.called.at(from.ip()));
        if let Some(w) = except.and_then(|i| self.waiting.get(i)) {
            if w.called.is_some() {
                total = total.saturating_sub(1);
                at_address = at_address.saturating_sub(1);
            }
        }
        self.transfers.len() + total < self.config.max_transfers
            && self.per_address.get(&from.ip()).map_or(0, Vec::len) + at_address
                < self.config.max_transfers_per_address
    }

    /// Takes the waiter at `i` out of the queue, giving back the slot held for it.
    fn unqueue(&mut self, i: usize) {
        if let Some(w) = self.waiting.remove(i) {
            if w.called.is_some() {
                self.called.release(w.peer.ip());
            }
        }
    }

    /// Forgets waiters that stopped repeating their Start, and called ones that did not start
    /// in time.
    fn expire_waiters(&mut self, now: Instant) {
        // At most one walk of the queue per interval, however often timers fire: the queue's
        // times are seconds, and this runs on the server's timer path.
        if self
            .expiry_scanned
            .is_some_and(|at| now.saturating_duration_since(at) < EXPIRY_SCAN_EVERY)
        {
            return;
        }
        self.expiry_scanned = Some(now);
        let mut i = 0;
        while i < self.waiting.len() {
            let w = self.waiting[i];
            let stale = now.saturating_duration_since(w.refreshed) >= WAITER_FORGOTTEN_AFTER
                || w.called
                    .is_some_and(|at| now.saturating_duration_since(at) >= CALLED_SLOT_HELD);
            if stale {
                self.unqueue(i);
                self.stats.queue_expired += 1;
                self.freed = true;
            } else {
                i += 1;
            }
        }
    }

    /// After a slot was freed: holds slots for the oldest waiters that fit now and tells each
    /// to start at once (a Wait with place 0), so no slot stays idle until its client's next
    /// repeat.
    fn call_waiters(&mut self, now: Instant) {
        self.freed = false;
        if self.waiting.is_empty() {
            return;
        }
        self.expire_waiters(now);
        self.freed = false;
        for i in 0..self.waiting.len() {
            if self.transfers.len() + self.called.total >= self.config.max_transfers {
                break;
            }
            let w = self.waiting[i];
            if w.called.is_none() && self.fits(w.peer, None) {
                self.waiting[i].called = Some(now);
                self.called.hold(w.peer.ip());
                self.reply_wait(w.peer, w.conn_id, 0);
            }
        }
    }

    /// Whether some waiter before queue index `before` (all of them when `None`) has a slot
    /// held or fits now: then a Start that would fit waits its turn instead.
    fn someone_first(&self, before: Option<usize>) -> bool {
        if self.transfers.len() + self.called.total >= self.config.max_transfers {
            // Nobody fits; only held slots count, and a held slot is its waiter's own.
            return false;
        }
        let n = before.unwrap_or(self.waiting.len());
        self.waiting
            .iter()
            .take(n)
            .any(|w| w.called.is_none() && self.fits(w.peer, None))
    }

    /// Decides a validated Start from `from`: admitted now (true), or answered with its place
    /// in the queue or "busy" (false). FIFO among the clients that fit: a client at its
    /// per-address limit does not hold up one from another address. Costs one walk of the
    /// queue at most (bounded by `max_waiting`).
    fn admit(&mut self, now: Instant, from: SocketAddr, conn_id: ConnectionId) -> bool {
        self.expire_waiters(now);
        let place = self
            .waiting
            .iter()
            .position(|w| w.peer == from && w.conn_id == conn_id);
        if let Some(i) = place {
            self.waiting[i].refreshed = now;
            let called = self.waiting[i].called.is_some();
            if called || (self.fits(from, Some(i)) && !self.someone_first(Some(i))) {
                self.unqueue(i);
                return true;
            }
            self.reply_wait(from, conn_id, i as u32 + 1);
            return false;
        }
        if self.fits(from, None) && !self.someone_first(None) {
            return true;
        }
        if !self.can_wait() {
            self.stats.busy += 1;
            self.reply_error(from, conn_id, ErrorCode::Busy, "server busy");
            return false;
        }
        self.stats.queued += 1;
        self.waiting.push_back(Waiter {
            peer: from,
            conn_id,
            refreshed: now,
            called: None,
        });
        self.reply_wait(from, conn_id, self.waiting.len() as u32);
        false
    }

    /// Whether one more client may wait: the queue has room, and a slot can ever be free (limits
    /// of zero admit nobody, so nobody waits for them).
    fn can_wait(&self) -> bool {
        self.waiting.len() < self.config.max_waiting
            && self.config.max_transfers > 0
            && self.config.max_transfers_per_address > 0
    }

    /// Whether a request from `from` could not even wait (the queue is full and no slot fits);
    /// answers "busy" if so. Requests hold nothing, so a queue with room offers as usual.
    fn refused(&mut self, from: SocketAddr, conn_id: ConnectionId) -> bool {
        // A waiter whose offer expired while it waited is offered again, not refused: it keeps
        // its place.
        let waiting = self
            .waiting
            .iter()
            .any(|w| w.peer == from && w.conn_id == conn_id);
        if !waiting && !self.can_wait() && !self.fits(from, None) {
            self.stats.busy += 1;
            self.reply_error(from, conn_id, ErrorCode::Busy, "server busy");
            return true;
        }
        false
    }

    /// Opens the requested object, or answers "not found" (or "internal") and returns `None`.
    fn open(
        &mut self,
        from: SocketAddr,
        conn_id: ConnectionId,
        object: &ObjectId,
    ) -> Option<(u64, P::Source)> {
        match self.provider.open(object) {
            Ok(Some(found)) => Some(found),
            Ok(None) => {
                self.stats.not_found += 1;
                self.reply_error(from, conn_id, ErrorCode::NotFound, "no such object");
                None
            }
            Err(_) => {
                self.reply_error(from, conn_id, ErrorCode::Internal, "cannot read object");
                None
            }
        }
    }

    /// Answers a request without keeping any state: an Offer whose nonce is a keyed hash of
    /// the client's address, connection id and request (see [`cookie`](Self::cookie)). The
    /// transfer is created only when a Start echoes it (`accept`), so requests from forged
    /// addresses hold nothing.
    fn offer(
        &mut self,
        now: Instant,
        from: SocketAddr,
        conn_id: ConnectionId,
        request: &Request<'_>,
    ) {
        // A peer (address and port) that has a transfer, or started one moments ago, proved
        // its address with a Start: its requests (a multi-source client's next pieces) are
        // answered without a token (see `RequestLimiter::vouch`).
        let proven = self.per_peer.contains_key(&from) || self.requests.vouched(from, now);
        if !proven && !self.requests.allow(from.ip(), now) {
            self.stats.rate_limited += 1;
            return;
        }
        if self.refused(from, conn_id) {
            return;
        }
        let size = match self.provider.size_of(&request.object) {
            Ok(Some(size)) => size,
            Ok(None) => {
                self.stats.not_found += 1;
                self.reply_error(from, conn_id, ErrorCode::NotFound, "no such object");
                return;
            }
            Err(_) => {
                self.reply_error(from, conn_id, ErrorCode::Internal, "cannot read object");
                return;
            }
        };
        let bucket = self.cookie_bucket(now);
        let nonce = self.cookie(from, conn_id, request, bucket);
        match super::sender::offer_for(request, size, nonce, &self.config.transfer) {
            Ok(offer) => {
                self.stats.offers += 1;
                self.queue_reply(from, conn_id, Reply::Offer(offer));
            }
            Err(_) => self.reply_error(from, conn_id, ErrorCode::TooLarge, "object too large"),
        }
    }

    /// A Start for no transfer: if its nonce is one `offer` made for this address, connection
    /// and request in this or the previous cookie period, the client has proved its address, and
    /// the transfer starts sending.
    ///
    /// Any other Start is answered like the request it repeats: with a fresh offer (under the
    /// same per-address limit as requests). The client's offer or request may have been damaged
    /// in flight, or its offer may have expired; the new offer lets it start. A Start is larger
    /// than an offer, so this cannot amplify.
    fn accept(&mut self, now: Instant, from: SocketAddr, datagram: &Datagram<'_>, len: usize) {
        let Frame::Start { nonce, request } = &datagram.frame else {
            return;
        };
        let bucket = self.cookie_bucket(now);
        let valid = *nonce == self.cookie(from, datagram.conn_id, request, bucket)
            || (bucket > 0 && *nonce == self.cookie(from, datagram.conn_id, request, bucket - 1));
        if !valid {
            self.stats.bad_starts += 1;
            // A repeated Start of a transfer already sending, from a new address: the client
            // moved while it waited for the first data (which went to its old address), and its
            // nonce is for the old one. Validate the new address as for an ack; a fresh offer
            // would start a second transfer. (A Start whose nonce is good for its own address
            // makes a transfer of its own, whatever its connection id.)
            if !self.challenge(now, from, datagram.conn_id, len) {
                self.offer(now, from, datagram.conn_id, request);
            }
            return;
        }
        self.requests.vouch(from, now);
        if !self.admit(now, from, datagram.conn_id) {
            return;
        }
        let Some((size, source)) = self.open(from, datagram.conn_id, &request.object) else {
            return;
        };
        match Sender::accept(
            now,
            datagram.conn_id,
            request,
            size,
            source,
            *nonce,
            self.config.transfer.clone(),
        ) {
            Ok(mut sender) => {
                sender.set_clock_epoch(*self.epoch.get_or_insert(now));
                // The Start itself moves the sender past its offer.
                sender.handle_decoded(now, datagram, len);
                self.stats.accepted += 1;
                let id = self.insert(
                    from,
                    datagram.conn_id,
                    request.object,
                    Transfer::Serving(Box::new(sender)),
                );
                self.collect_events(id);
            }
            Err(_) => self.reply_error(
                from,
                datagram.conn_id,
                ErrorCode::TooLarge,
                "object too large",
            ),
        }
    }

    /// Which cookie period `now` falls in: nonces from this and the previous period are
    /// accepted, so an offer stays good for 16 to 32 s.
    fn cookie_bucket(&mut self, now: Instant) -> u64 {
        let epoch = *self.epoch.get_or_insert(now);
        now.saturating_duration_since(epoch).as_secs() / COOKIE_PERIOD_SECS
    }

    /// The nonce for an offer: SipHash-2-4 keyed with the endpoint's secret over the client's
    /// address, connection id, every field of its request, and the cookie period. Nobody
    /// without the key can make one that a Start from another address would pass.
    fn cookie(
        &self,
        from: SocketAddr,
        conn_id: ConnectionId,
        request: &Request<'_>,
        bucket: u64,
    ) -> u64 {
        use std::hash::Hasher;
        let mut h = self.rng.hasher();
        h.write_u8(b'C'); // domain: cookies, never equal to an id from `next`
        write_addr(&mut h, from);
        h.write_u64(conn_id.0);
        h.write_u8(request.object.algorithm());
        h.write(request.object.digest());
        h.write_u16(request.max_datagram_size);
        h.write_u64(request.max_rate_bytes_per_sec);
        for r in request.have.iter() {
            h.write_u64(r.start);
            h.write_u64(r.end);
        }
        h.write_u64(bucket);
        h.finish()
    }

    /// A Wait telling the client its `place` in the queue (0: start now).
    fn reply_wait(&mut self, to: SocketAddr, conn_id: ConnectionId, place: u32) {
        self.queue_reply(to, conn_id, Reply::Wait(place));
    }

    fn reply_error(
        &mut self,
        to: SocketAddr,
        conn_id: ConnectionId,
        code: ErrorCode,
        why: &'static str,
    ) {
        self.queue_reply(to, conn_id, Reply::Error(code, why));
    }

    fn queue_reply(&mut self, to: SocketAddr, conn_id: ConnectionId, reply: Reply) {
        if self.replies.len() >= self.config.max_pending_replies {
            self.stats.replies_dropped += 1;
            return;
        }
        self.replies.push_back((to, conn_id, reply));
    }

    fn collect_events(&mut self, id: TransferId) {
        let Some(slot) = self.transfers.get_mut(&id) else {
            return;
        };
        let (role, peer, object) = match &slot.transfer {
            Transfer::Serving(_) => (Role::Serving, slot.peer, slot.object),
            Transfer::Fetching(_) => (Role::Fetching, slot.peer, slot.object),
        };
        loop {
            let event = match &mut slot.transfer {
                Transfer::Serving(s) => s.poll_event(),
                Transfer::Fetching(r) => r.poll_event(),
            };
            let Some(event) = event else { break };
            self.events.push_back(EndpointEvent {
                transfer: id,
                role,
                peer,
                object,
                event,
            });
        }
    }

    /// Writes the next datagram to send into `buf` (at least the configured datagram size) and
    /// says where it goes, or returns `None` when nothing may be sent now. Transfers take turns,
    /// one datagram each, under the endpoint's uplink budget.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        self.uplink_wait = None;
        if let Some(t) = self.pop_reply(now, buf) {
            return Some(t);
        }
        let datagram_size = self.config.transfer.datagram_size() as u64;
        if self.uplink.rate() != 0 && !self.transfers.is_empty() {
            let ready = self.uplink.ready_at(datagram_size, now);
            if ready > now {
                self.uplink_wait = Some(ready);
                return None;
            }
        }
        // Every transfer once, in id order from the cursor round to just before it. The map is
        // walked by lookups rather than an iterator (a transfer may be removed on the way), so
        // nothing is allocated per call.
        let mut turn = Turns::new(self.cursor);
        while let Some(id) = turn.next(&self.transfers) {
            let Some(slot) = self.transfers.get_mut(&id) else {
                continue;
            };
            let peer = slot.peer;
            let (len, finished, idle) = match &mut slot.transfer {
                Transfer::Serving(s) => (
                    s.poll_transmit(now, buf),
                    s.is_finished(),
                    s.poll_timeout().is_none(),
                ),
                Transfer::Fetching(r) => (
                    r.poll_transmit(now, buf),
                    r.is_finished(),
                    r.poll_timeout().is_none(),
                ),
            };
            self.collect_events(id);
            if let Some(len) = len {
                self.cursor = TransferId(id.0 + 1);
                return Some(self.sent(peer, len, now));
            }
            if finished && idle && self.take_sink_done(id) {
                self.remove(id);
            }
        }
        if self.freed {
            // A transfer ended: the oldest waiters that fit now are told to start.
            self.call_waiters(now);
            return self.pop_reply(now, buf);
        }
        None
    }

    /// The next queued reply to a request or a Start (an offer, a place in the queue, an
    /// error), written into `buf`.
    fn pop_reply(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        let (to, conn_id, reply) = self.replies.pop_front()?;
        let frame = match reply {
            Reply::Error(code, reason) => Frame::Error(ErrorFrame { code, reason }),
            Reply::Offer(offer) => Frame::Offer(offer),
            Reply::Wait(place) => Frame::Wait(Wait {
                place,
                retry_after_ms: WAIT_REPEAT_MS,
            }),
            Reply::PathChallenge(token) => Frame::PathChallenge(token),
        };
        let len = Datagram { conn_id, frame }.encode(buf).ok()?;
        Some(self.sent(to, len, now))
    }

    /// A finished transfer may be removed once nothing is left to send and (for a download) the
    /// owner no longer needs the sink from us: it was taken, or the transfer failed.
    fn take_sink_done(&self, id: TransferId) -> bool {
        match self.transfers.get(&id).map(|s| &s.transfer) {
            Some(Transfer::Fetching(r)) => r.sink().0.is_none(),
            _ => true,
        }
    }

    fn sent(&mut self, to: SocketAddr, len: usize, now: Instant) -> Transmit {
        self.stats.datagrams_sent += 1;
        self.stats.bytes_sent += len as u64;
        if self.uplink.rate() != 0 {
            self.uplink.take(len as u64, now);
        }
        Transmit {
            destination: to,
            len,
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called: the earliest timer of
    /// any transfer, or the moment the uplink budget allows the next datagram.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let transfers = self
            .transfers
            .values()
            .filter_map(|slot| match &slot.transfer {
                Transfer::Serving(s) => s.poll_timeout(),
                Transfer::Fetching(r) => r.poll_timeout(),
            });
        transfers.chain(self.uplink_wait).min()
    }

    /// Call when the instant from [`poll_timeout`](Self::poll_timeout) has passed (calling it
    /// early is harmless), then drain `poll_transmit` and `poll_event`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.uplink_wait.is_some_and(|t| t <= now) {
            self.uplink_wait = None;
        }
        if !self.waiting.is_empty() {
            // Called waiters that never came, and silent ones, give their places back.
            self.expire_waiters(now);
        }
        if self.freed {
            self.call_waiters(now);
        }
        // Transfers are independent (a timeout of one changes no other's timer), so each is
        // checked as the walk reaches it; nothing is allocated.
        let mut turn = Turns::new(TransferId(0));
        while let Some(id) = turn.next(&self.transfers) {
            let Some(slot) = self.transfers.get_mut(&id) else {
                continue;
            };
            let due = match &slot.transfer {
                Transfer::Serving(s) => s.poll_timeout(),
                Transfer::Fetching(r) => r.poll_timeout(),
            };
            if due.is_none_or(|t| t > now) {
                continue;
            }
            match &mut slot.transfer {
                Transfer::Serving(s) => s.handle_timeout(now),
                Transfer::Fetching(r) => r.handle_timeout(now),
            }
            self.collect_events(id);
        }
    }

    /// The next event of any transfer.
    pub fn poll_event(&mut self) -> Option<EndpointEvent> {
        self.events.pop_front()
    }
}

impl<P: ObjectProvider, K> std::fmt::Debug for Endpoint<P, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("transfers", &self.transfers.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// A walk over the transfer ids present in a map, in order from `start` round to just before it,
/// each visited once, that tolerates the map changing between steps (ids removed on the way
/// are skipped; the walk holds no borrow).
struct Turns {
    start: TransferId,
    /// The least id not yet considered in the current lap.
    next: TransferId,
    /// True once the ids from `start` up are done and the walk continues from the lowest id.
    wrapped: bool,
}

impl Turns {
    fn new(start: TransferId) -> Self {
        Turns {
            start,
            next: start,
            wrapped: false,
        }
    }

    fn next<V>(&mut self, map: &BTreeMap<TransferId, V>) -> Option<TransferId> {
        loop {
            let found = if self.wrapped {
                // `next` never passes `start` in this lap, so the range is well formed.
                map.range(self.next..self.start).next()
            } else {
                map.range(self.next..).next()
            };
            match found {
                Some((&id, _)) => {
                    self.next = TransferId(id.0.saturating_add(1));
                    return Some(id);
                }
                None if !self.wrapped && self.start.0 > 0 => {
                    self.wrapped = true;
                    self.next = TransferId(0);
                }
                None => return None,
            }
        }
    }
}

/// A reply to a request, queued until `poll_transmit`.
#[derive(Debug, Clone, Copy)]
enum Reply {
    Error(ErrorCode, &'static str),
    Offer(Offer),
    /// A place in the admission queue (1: first in line; 0: start now).
    Wait(u32),
    /// A path challenge's token.
    PathChallenge(u64),
}

/// Feeds an address (IP and port) to a keyed hash.
fn write_addr(h: &mut impl std::hash::Hasher, addr: SocketAddr) {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => h.write(&ip.octets()),
        std::net::IpAddr::V6(ip) => h.write(&ip.octets()),
    }
    h.write_u16(addr.port());
}

/// How often a waiting client repeats its Start (the Wait's `retry_after_ms`).
const WAIT_REPEAT_MS: u16 = 1000;
/// A waiter whose Start has not come again for this long (three repeats) is forgotten.
const WAITER_FORGOTTEN_AFTER: Duration = Duration::from_millis(3 * WAIT_REPEAT_MS as u64);
/// Least time between two walks of the queue for places to forget.
const EXPIRY_SCAN_EVERY: Duration = Duration::from_millis(100);
/// How long a slot set aside for a called waiter is held for its Start.
const CALLED_SLOT_HELD: Duration = Duration::from_secs(2);

/// Seconds per cookie period (see `Endpoint::cookie_bucket`).
const COOKIE_PERIOD_SECS: u64 = 16;
/// IP addresses the request limiter tracks at most; beyond it, idle ones are forgotten.
const TRACKED_ADDRESSES: usize = 4096;

/// Tokens are counted in billionths, so that the refill keeps the fractions of a token that
/// accrue between requests (a whole token costs this many).
const TOKEN: u64 = 1_000_000_000;

/// How long after its last valid Start a peer's requests take no token.
const VOUCHED_FOR: Duration = Duration::from_secs(10);

/// Per-IP token buckets for requests (`EndpointConfig::max_requests_per_address_per_sec`),
/// in a bounded table, and the peers whose requests need none.
#[derive(Debug)]
struct RequestLimiter {
    per_sec: u32,
    /// Per address: its tokens in billionths ([`TOKEN`] each), as of the instant beside them.
    buckets: HashMap<std::net::IpAddr, (u64, Instant)>,
    /// Peers (address and port) that sent a valid Start, and when they last did.
    vouched: HashMap<SocketAddr, Instant>,
}

impl RequestLimiter {
    fn new(per_sec: u32) -> Self {
        RequestLimiter {
            per_sec,
            buckets: HashMap::new(),
            vouched: HashMap::new(),
        }
    }

    /// `peer` echoed a nonce offered to it: it receives at that address and port. Its requests
    /// for [`VOUCHED_FOR`] take no token: a multi-source client asks each server for piece
    /// after piece, and a request forged with its address can only reach it, with an Offer
    /// barely larger than the Request. The table is bounded like the buckets.
    fn vouch(&mut self, peer: SocketAddr, now: Instant) {
        if self.vouched.len() >= TRACKED_ADDRESSES && !self.vouched.contains_key(&peer) {
            self.vouched
                .retain(|_, at| now.saturating_duration_since(*at) < VOUCHED_FOR);
            if self.vouched.len() >= TRACKED_ADDRESSES {
                self.vouched.clear();
            }
        }
        self.vouched.insert(peer, now);
    }

    fn vouched(&self, peer: SocketAddr, now: Instant) -> bool {
        self.vouched
            .get(&peer)
            .is_some_and(|at| now.saturating_duration_since(*at) < VOUCHED_FOR)
    }

    /// Takes a token for a request from `ip`, refilling at `per_sec` up to `per_sec` tokens.
    fn allow(&mut self, ip: std::net::IpAddr, now: Instant) -> bool {
        if self.per_sec == 0 {
            return true;
        }
        if self.buckets.len() >= TRACKED_ADDRESSES && !self.buckets.contains_key(&ip) {
            // Forget addresses whose buckets have refilled (idle for a second); if a flood from
            // many addresses keeps the table full, start over rather than refuse newcomers.
            self.buckets
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < Duration::from_secs(1));
            if self.buckets.len() >= TRACKED_ADDRESSES {
                self.buckets.clear();
            }
        }
        // At most u32::MAX * 1e9 < 2^63: fits.
        let full = u64::from(self.per_sec) * TOKEN;
        let (tokens, at) = self.buckets.entry(ip).or_insert((full, now));
        // One nanosecond earns `per_sec` billionths of a token: nothing is rounded away, so
        // requests spaced closer than a whole token's refill still earn their share.
        let elapsed = now.saturating_duration_since(*at).as_nanos();
        let earned = elapsed.saturating_mul(u128::from(self.per_sec));
        *tokens = u128::from(*tokens)
            .saturating_add(earned)
            .min(u128::from(full)) as u64;
        *at = now.max(*at);
        if *tokens < TOKEN {
            return false;
        }
        *tokens -= TOKEN;
        true
    }
}

/// Connection ids and nonces: SipHash-2-4, a keyed pseudo-random function, over a counter. The
/// key comes from the endpoint's seed (a driver takes it from the operating system), so values
/// seen on the wire do not reveal the next ones, as they would with a plain seeded generator.
#[derive(Clone)]
struct IdGenerator {
    keys: (u64, u64),
    counter: u64,
}

impl IdGenerator {
    fn new(seed: u128) -> Self {
        let (low, high) = (seed as u64, (seed >> 64) as u64);
        // A small test seed has a zero high half: spread the low half over it too (SplitMix64
        // finaliser), so both key halves depend on every bit.
        let mut z = low.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        IdGenerator {
            keys: (low, high ^ z ^ (z >> 31)),
            counter: 0,
        }
    }

    fn next(&mut self) -> u64 {
        use std::hash::Hasher;
        self.counter += 1;
        let mut h = self.hasher();
        h.write_u64(self.counter);
        h.finish()
    }

    /// SipHash-2-4 with the endpoint's key, for ids and for offer cookies.
    #[allow(deprecated)] // std keeps SipHash-2-4 with explicit keys only under this name
    fn hasher(&self) -> std::hash::SipHasher {
        std::hash::SipHasher::new_with_keys(self.keys.0, self.keys.1)
    }
}

impl std::fmt::Debug for IdGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("IdGenerator").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::{IdGenerator, RequestLimiter, TRACKED_ADDRESSES, VOUCHED_FOR};
    use std::net::{IpAddr, SocketAddr};
    use std::time::{Duration, Instant};

    /// Requests every 40 ms (25/s) against a limit of 20/s: once the initial burst is spent,
    /// 20 a second pass. (The limiter used to drop the fraction of a token earned between two
    /// requests, and admitted 12.5 a second.)
    #[test]
    fn the_request_limiter_keeps_fractions_of_a_token() {
        let ip = IpAddr::from([192, 0, 2, 1]);
        let start = Instant::now();
        let mut limiter = RequestLimiter::new(20);
        let mut admitted_late = 0;
        for i in 0..500u32 {
            let now = start + Duration::from_millis(40) * i;
            let admitted = limiter.allow(ip, now);
            // From 10 s on, the burst of 20 is long spent: count the last 10 s.
            if i >= 250 && admitted {
                admitted_late += 1;
            }
        }
        assert!(
            (199..=201).contains(&admitted_late),
            "admitted {admitted_late} in 10 s at 20/s"
        );

        // A full bucket holds 20, and never more however long it rests.
        let later = start + Duration::from_secs(3600);
        let burst = (0..100).filter(|_| limiter.allow(ip, later)).count();
        assert_eq!(burst, 20);
        // Fractions add up: 30 ms earns 0.6 of a token (refused), 30 ms more makes 1.2
        // (admitted, 0.2 left), and another request at that instant is refused.
        let t = later + Duration::from_millis(30);
        assert!(!limiter.allow(ip, t), "0.6 tokens");
        assert!(
            limiter.allow(ip, t + Duration::from_millis(30)),
            "1.2 tokens"
        );
        assert!(
            !limiter.allow(ip, t + Duration::from_millis(30)),
            "0.2 tokens"
        );
    }

    #[test]
    fn ids_are_deterministic_per_seed_and_differ_across_seeds() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut g = IdGenerator::new(1);
                move |_| g.next()
            })
            .collect();
        let b: Vec<u64> = (0..4)
            .map({
                let mut g = IdGenerator::new(1);
                move |_| g.next()
            })
            .collect();
        let c: Vec<u64> = (0..4)
            .map({
                let mut g = IdGenerator::new(2);
                move |_| g.next()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 4, "ids from one generator are distinct");
    }

    /// A peer that sent a valid Start is vouched for, for that address and port only and for
    /// [`VOUCHED_FOR`]; the table stays bounded under a flood of peers.
    #[test]
    fn vouching_covers_one_peer_for_a_while_in_a_bounded_table() {
        let now = Instant::now();
        let peer = SocketAddr::from(([10, 0, 0, 1], 5000));
        let same_ip = SocketAddr::from(([10, 0, 0, 1], 5001));
        let mut limiter = RequestLimiter::new(20);
        assert!(!limiter.vouched(peer, now));
        limiter.vouch(peer, now);
        assert!(limiter.vouched(peer, now + VOUCHED_FOR - Duration::from_millis(1)));
        assert!(!limiter.vouched(peer, now + VOUCHED_FOR));
        assert!(!limiter.vouched(same_ip, now), "another port is another peer");
        for i in 0..3 * TRACKED_ADDRESSES as u32 {
            let p = SocketAddr::from((std::net::Ipv4Addr::from(i), 1));
            limiter.vouch(p, now);
            assert!(limiter.vouched.len() <= TRACKED_ADDRESSES);
        }
    }
}
