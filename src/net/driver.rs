//! The socket loop shared by [`Server`](super::Server), [`Client`](super::Client) and the
//! benchmarks: batched receives and sends through quinn-udp (recvmmsg and UDP GRO, UDP GSO on
//! Linux; one datagram per call elsewhere), timers from the endpoint, no threads.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use quinn_udp::{RecvMeta, UdpSockRef, UdpSocketState};

use crate::core::{ChunkSink, Endpoint, EndpointEvent, ObjectProvider};
use crate::wire::MAX_DATAGRAM_SIZE;

/// Where the platform has no precise readiness wait (not Unix), sleeps during a wait are sliced
/// so a datagram arriving meanwhile is read soon: the first slice after a pass that received
/// something is this short, and each quiet pass doubles it up to `LONGEST_SLICE`.
#[cfg(not(unix))]
const SHORTEST_SLICE: Duration = Duration::from_micros(25);
#[cfg(not(unix))]
const LONGEST_SLICE: Duration = Duration::from_millis(1);
/// Receive buffers per batch (one `recvmmsg`).
const RECV_SLOTS: usize = 16;
/// Largest UDP payload a GSO batch may carry.
const MAX_GSO_BYTES: usize = 65_000;
/// How long a send that finds the socket buffer full is retried before the batch is dropped
/// (recovery then treats it as lost).
const SEND_RETRY_FOR: Duration = Duration::from_millis(20);

/// How datagrams are framed on the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Framing {
    /// udpferry's datagrams as they are (docs/PROTOCOL.md).
    #[default]
    Plain,
    /// Panda3D's default UDP framing, for a Panda3D game whose `QueuedConnectionReader` is not
    /// in raw mode: every datagram starts with a 2-byte little-endian additive checksum of the
    /// rest (Panda's `DatagramUDPHeader`), and datagrams whose checksum is wrong are dropped, as
    /// Panda's reader drops them. See [`panda3d_checksum`].
    Panda3d,
}

impl Framing {
    /// Bytes the framing adds in front of each datagram.
    pub fn header_len(self) -> usize {
        match self {
            Framing::Plain => 0,
            Framing::Panda3d => PANDA3D_HEADER,
        }
    }

    /// The udpferry datagram inside `framed`, or `None` when the framing is wrong (too short,
    /// or a bad Panda3D checksum).
    pub fn unwrap(self, framed: &[u8]) -> Option<&[u8]> {
        match self {
            Framing::Plain => Some(framed),
            Framing::Panda3d => {
                let (header, payload) = framed.split_first_chunk::<PANDA3D_HEADER>()?;
                (u16::from_le_bytes(*header) == panda3d_checksum(payload)).then_some(payload)
            }
        }
    }
}

/// The size of Panda3D's UDP header.
pub const PANDA3D_HEADER: usize = 2;

/// Panda3D's UDP checksum of a datagram's payload: the sum of its bytes, modulo 2^16.
pub fn panda3d_checksum(payload: &[u8]) -> u16 {
    payload
        .iter()
        .fold(0u16, |sum, &b| sum.wrapping_add(u16::from(b)))
}

/// Drives one [`Endpoint`] on one UDP socket.
///
/// Call [`turn`](Self::turn) in a loop: it waits for a datagram or the endpoint's next timer
/// (at most the `max_wait` you give it, so you can check a stop flag), feeds every queued
/// datagram, fires due timers, sends everything due and hands out events. [`pump`](Self::pump)
/// does the same without waiting, for loops that sleep on their own.
///
/// Datagrams that are not udpferry's ([`is_udpferry_datagram`](crate::is_udpferry_datagram)) are
/// dropped: a game that shares its socket drives the [`Endpoint`] itself instead (see
/// examples/game_loop.rs).
pub struct Driver {
    socket: UdpSocket,
    state: UdpSocketState,
    /// `RECV_SLOTS` receive slots of `slot` bytes each.
    rx: Vec<u8>,
    slot: usize,
    meta: Vec<RecvMeta>,
    /// One GSO batch: datagrams of equal size to one destination, the last one maybe shorter.
    tx: Vec<u8>,
    /// The socket is IPv6 (maybe dual-stack): IPv4 peers are written to it as IPv4-mapped
    /// addresses and read back as plain IPv4, so the endpoint sees one form of each address.
    v6: bool,
    /// The next sleep slice (see `SHORTEST_SLICE`).
    #[cfg(not(unix))]
    slice: Duration,
    framing: Framing,
}

/// What one [`Driver::pump`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Activity {
    /// Datagrams received (udpferry's or not).
    pub received: usize,
    /// Datagrams handed to the socket.
    pub sent: usize,
}

impl Activity {
    /// True when the pass received or sent anything.
    pub fn is_busy(&self) -> bool {
        self.received > 0 || self.sent > 0
    }
}

impl Driver {
    /// Takes over `socket` (made non-blocking; open it with [`bind`](super::bind) for large
    /// buffers) and probes which batching the platform offers.
    pub fn new(socket: UdpSocket) -> io::Result<Self> {
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        let slot = if state.gro_segments() > 1 {
            MAX_DATAGRAM_SIZE + 29 // 64 KiB: one coalesced GRO read
        } else {
            MAX_DATAGRAM_SIZE + PANDA3D_HEADER
        };
        let slots = quinn_udp::BATCH_SIZE.clamp(1, RECV_SLOTS);
        let v6 = socket.local_addr()?.is_ipv6();
        Ok(Driver {
            v6,
            socket,
            state,
            rx: vec![0; slot * slots],
            slot,
            meta: vec![RecvMeta::default(); slots],
            tx: vec![0; MAX_GSO_BYTES + MAX_DATAGRAM_SIZE + PANDA3D_HEADER],
            #[cfg(not(unix))]
            slice: SHORTEST_SLICE,
            framing: Framing::Plain,
        })
    }

    /// The same driver with `framing` on the socket (both ways). Set it before the first
    /// datagram.
    pub fn with_framing(mut self, framing: Framing) -> Self {
        self.framing = framing;
        self
    }

    /// The socket, for its address.
    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// The socket's local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Sends what is due, waits for a datagram or the endpoint's next timer (at most
    /// `max_wait`), then [`pump`](Self::pump)s. Returns an error only if the socket fails.
    pub fn turn<P: ObjectProvider, K: ChunkSink>(
        &mut self,
        endpoint: &mut Endpoint<P, K>,
        max_wait: Duration,
        on_event: &mut dyn FnMut(&mut Endpoint<P, K>, EndpointEvent),
    ) -> io::Result<Activity> {
        // Send what is already due (a new fetch's request, say) before sleeping.
        let sent = self.flush(endpoint);
        let now = Instant::now();
        let wait = endpoint
            .poll_timeout()
            .map_or(max_wait, |t| t.saturating_duration_since(now))
            .min(max_wait);
        if !wait.is_zero() {
            self.wait(wait)?;
        }
        let mut activity = self.pump(endpoint, on_event)?;
        activity.sent += sent;
        #[cfg(not(unix))]
        {
            self.slice = if activity.received > 0 {
                SHORTEST_SLICE
            } else {
                (self.slice * 2).min(LONGEST_SLICE)
            };
        }
        Ok(activity)
    }

    /// Without waiting: receives every queued datagram (up to a bound, so sending is not
    /// starved), fires due timers, hands events to `on_event` (which may act on the endpoint,
    /// for example cancel a transfer), then sends everything due.
    pub fn pump<P: ObjectProvider, K: ChunkSink>(
        &mut self,
        endpoint: &mut Endpoint<P, K>,
        on_event: &mut dyn FnMut(&mut Endpoint<P, K>, EndpointEvent),
    ) -> io::Result<Activity> {
        let mut activity = Activity::default();
        for _ in 0..64 {
            let got = self.receive(endpoint)?;
            if got == 0 {
                break;
            }
            activity.received += got;
            // Acknowledge (and send) as each batch is read, not once per 64 batches: a sender
            // measures the delivery rate from when acks arrive, and a megabyte acknowledged at
            // once reads as a burst several times the real rate. Events first, as below.
            while let Some(event) = endpoint.poll_event() {
                on_event(endpoint, event);
            }
            activity.sent += self.flush(endpoint);
        }
        let now = Instant::now();
        if endpoint.poll_timeout().is_some_and(|t| t <= now) {
            endpoint.handle_timeout(now);
        }
        // Events before sending, so the caller can act on them first (cancel a download whose
        // offer does not fit, say, before its Start goes out); and after, for what sending
        // reported.
        while let Some(event) = endpoint.poll_event() {
            on_event(endpoint, event);
        }
        activity.sent += self.flush(endpoint);
        while let Some(event) = endpoint.poll_event() {
            on_event(endpoint, event);
        }
        Ok(activity)
    }

    /// Sends every datagram the endpoint has due now, batching runs of equal-sized datagrams to
    /// one destination into one GSO send. Returns how many datagrams it handed to the socket.
    pub fn flush<P: ObjectProvider, K: ChunkSink>(
        &mut self,
        endpoint: &mut Endpoint<P, K>,
    ) -> usize {
        let now = Instant::now();
        let max_segments = self.state.max_gso_segments().max(1);
        let mut sent = 0;
        // The batch being built: tx[..used], `count` datagrams of `segment` bytes to `to`.
        let mut used = 0;
        let mut count = 0;
        let mut segment = 0;
        let mut to: Option<SocketAddr> = None;
        let header = self.framing.header_len();
        while let Some(t) = endpoint.poll_transmit(now, &mut self.tx[used + header..]) {
            if self.framing == Framing::Panda3d {
                let sum = panda3d_checksum(&self.tx[used + header..used + header + t.len]);
                self.tx[used..used + header].copy_from_slice(&sum.to_le_bytes());
            }
            let len = header + t.len;
            let fits = to == Some(t.destination)
                && len <= segment
                && count < max_segments
                && used + len <= MAX_GSO_BYTES;
            if count > 0 && !fits {
                // Send the batch, then move the new datagram to the front.
                self.send_batch(used, segment, count, to);
                sent += count;
                self.tx.copy_within(used..used + len, 0);
                used = 0;
                count = 0;
            }
            if count == 0 {
                to = Some(t.destination);
                segment = len;
            }
            used += len;
            count += 1;
            // A shorter datagram can only end a batch.
            if len < segment || count == max_segments {
                self.send_batch(used, segment, count, to);
                sent += count;
                used = 0;
                count = 0;
            }
        }
        if count > 0 {
            self.send_batch(used, segment, count, to);
            sent += count;
        }
        sent
    }

    fn send_batch(&mut self, len: usize, segment: usize, count: usize, to: Option<SocketAddr>) {
        let Some(mut destination) = to else { return };
        if let (true, SocketAddr::V4(v4)) = (self.v6, destination) {
            destination = SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port());
        }
        let transmit = quinn_udp::Transmit {
            destination,
            ecn: None,
            contents: &self.tx[..len],
            segment_size: (count > 1).then_some(segment),
            src_ip: None,
        };
        let give_up = Instant::now() + SEND_RETRY_FOR;
        loop {
            match self
                .state
                .try_send(UdpSockRef::from(&self.socket), &transmit)
            {
                // The socket's buffer is full: let the kernel drain it a little.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < give_up => {
                    std::thread::sleep(Duration::from_micros(50))
                }
                // Sent, or failed: a failed send is lost datagrams, and recovery handles them.
                _ => return,
            }
        }
    }

    /// One batch of datagrams, fed to the endpoint. Returns how many arrived (0: none queued).
    fn receive<P: ObjectProvider, K: ChunkSink>(
        &mut self,
        endpoint: &mut Endpoint<P, K>,
    ) -> io::Result<usize> {
        let filled = {
            let mut bufs: [IoSliceMut<'_>; RECV_SLOTS] = {
                let mut chunks = self.rx.chunks_mut(self.slot);
                std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or(&mut [])))
            };
            let slots = self.meta.len();
            match self.state.recv(
                UdpSockRef::from(&self.socket),
                &mut bufs[..slots],
                &mut self.meta,
            ) {
                Ok(n) => n,
                Err(e) if is_quiet(&e) => return Ok(0),
                Err(e) => return Err(e),
            }
        };
        let now = Instant::now();
        let mut datagrams = 0;
        for (meta, buf) in self.meta[..filled].iter().zip(self.rx.chunks(self.slot)) {
            let stride = meta.stride.max(1);
            for framed in buf[..meta.len.min(buf.len())].chunks(stride) {
                datagrams += 1;
                let Some(datagram) = self.framing.unwrap(framed) else {
                    continue;
                };
                if crate::is_udpferry_datagram(datagram) {
                    endpoint.handle_datagram(now, canonical_addr(meta.addr), datagram);
                }
            }
        }
        // An ICMP error or similar can fill a slot with nothing; report progress anyway so
        // the caller reads again.
        Ok(datagrams.max(filled))
    }

    /// Blocks until a datagram is queued or `timeout` passes (or a signal arrives): one
    /// `ppoll` with a nanosecond timeout, so pacing timers fire on time.
    #[cfg(unix)]
    fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let timeout = Timespec {
            tv_sec: timeout.as_secs().try_into().unwrap_or(i64::MAX),
            tv_nsec: timeout.subsec_nanos().into(),
        };
        let mut fds = [PollFd::new(&self.socket, PollFlags::IN)];
        match poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Sleeps for `timeout` or one slice, whichever is shorter (see `SHORTEST_SLICE`).
    #[cfg(not(unix))]
    fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        std::thread::sleep(timeout.min(self.slice));
        Ok(())
    }
}

/// An IPv4-mapped IPv6 address (what a dual-stack socket reports for an IPv4 peer, Panda3D's
/// among them) as the plain IPv4 address; any other address as it is. Use it wherever
/// addresses from a socket are compared, so both forms name one peer.
pub fn canonical_addr(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Errors that mean "nothing to read now": no datagram, timeout, signal, or an ICMP error (port
/// unreachable) that Linux reports on the next receive. A peer that is gone is left to the idle
/// timeout.
fn is_quiet(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
            | io::ErrorKind::Interrupted
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panda3d_framing_checks_and_strips_the_checksum() {
        // Panda's checksum is the byte sum modulo 2^16, written little-endian in front.
        assert_eq!(panda3d_checksum(&[]), 0);
        assert_eq!(panda3d_checksum(&[1, 2, 255]), 258);
        assert_eq!(panda3d_checksum(&[0xff; 300]), (300 * 255 % 65536) as u16);
        let framed = [2u8, 1, 1, 2, 255];
        assert_eq!(Framing::Panda3d.unwrap(&framed), Some(&framed[2..]));
        assert_eq!(Framing::Panda3d.unwrap(&[3, 1, 1, 2, 255]), None);
        assert_eq!(Framing::Panda3d.unwrap(&[0]), None);
        assert_eq!(Framing::Panda3d.unwrap(&[0, 0]), Some(&[][..]));
        assert_eq!(Framing::Plain.unwrap(&framed), Some(&framed[..]));
        assert_eq!(Framing::Panda3d.header_len(), 2);
        assert_eq!(Framing::Plain.header_len(), 0);
    }
}
