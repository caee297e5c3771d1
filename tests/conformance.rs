//! docs/PROTOCOL.md against a running server, as a second implementation would check it.
//!
//! Everything this test sends is built by hand, as hex, from the field tables of the spec (with
//! `crc32fast` for the trailer of section 1.3), and everything the server sends back is decoded
//! by hand from the same tables and asserted field by field. Nothing here calls udpferry's own
//! encoder or decoder, but for one test named below: the server is a real
//! `udpferry::net::Server` over a `ContentStore` on 127.0.0.1, and the test talks to it with a
//! plain `std::net::UdpSocket`. If the spec and the server disagree, a test here fails.
//!
//! Every hex example in PROTOCOL.md is read out of the document and compared with the bytes
//! the field tables give (`every_hex_example_in_the_spec_follows_its_field_tables`); the
//! reference encoder is held to the same bytes by the golden tests in `src/wire/tests.rs`,
//! and, for the Wait of section 6.6, which has no golden test there, by
//! `the_wait_example_is_what_the_reference_encoder_makes` here.

mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::{put_dated, Serving, TempDir};
use md5::{Digest, Md5};
use sha2::Sha256;

/// The connection id of the spec's worked examples (section 6).
const EXAMPLE_CONN: u64 = 0x1122_3344_5566_7788;
/// The server's datagram size (section 1.5: the default).
const SERVER_DATAGRAM: usize = 1200;
/// The spec, read at build time: its hex examples are checked below.
const SPEC: &str = include_str!("../docs/PROTOCOL.md");

// ---------------------------------------------------------------------------------------------
// Bytes by hand

/// Bytes from hex digits; spaces and newlines are ignored, so fields can be written apart.
fn hx(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert!(
        digits.len().is_multiple_of(2),
        "odd number of hex digits in {text:?}"
    );
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Section 2.1: magic `UFRY`, version 1, kind, connection id, body, then the CRC32 (section 1.3)
/// of everything before it, big-endian.
fn datagram(kind: u8, conn: u64, body_hex: &str) -> Vec<u8> {
    let mut d = hx(&format!("55465259 01 {kind:02x} {conn:016x}"));
    d.extend_from_slice(&hx(body_hex));
    let crc = crc32fast::hash(&d);
    d.extend_from_slice(&crc.to_be_bytes());
    d
}

/// An object id as it appears on the wire (section 4): algorithm byte, then the digest.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Id {
    algorithm: u8,
    digest: Vec<u8>,
}

impl Id {
    fn md5(bytes: &[u8]) -> Self {
        Id {
            algorithm: 1,
            digest: Md5::digest(bytes).to_vec(),
        }
    }

    fn sha256(bytes: &[u8]) -> Self {
        Id {
            algorithm: 2,
            digest: Sha256::digest(bytes).to_vec(),
        }
    }

    /// The id's own algorithm over `bytes` (section 4).
    fn of_same_kind(&self, bytes: &[u8]) -> Self {
        match self.algorithm {
            1 => Id::md5(bytes),
            2 => Id::sha256(bytes),
            a => panic!("no algorithm {a}"),
        }
    }

    fn hex(&self) -> String {
        format!("{:02x}{}", self.algorithm, hex(&self.digest))
    }

    /// Section 8.1: `H("udpferry manifest v1" || 0x00 || X.algorithm || X.digest)`, where the
    /// label is its 20 ASCII bytes.
    fn manifest_id(&self) -> Self {
        let mut input = b"udpferry manifest v1".to_vec();
        input.push(0x00);
        input.push(self.algorithm);
        input.extend_from_slice(&self.digest);
        self.of_same_kind(&input)
    }
}

/// Section 3.1: a Request, field by field.
fn request(conn: u64, id: &Id, max_datagram_size: u16, have: &[(u64, u64)]) -> Vec<u8> {
    let mut body = format!(
        "{id} {max_datagram_size:04x} {rate:016x} {count:04x}",
        id = id.hex(),
        rate = 0u64,
        count = have.len()
    );
    for (start, end) in have {
        body += &format!(" {start:016x} {end:016x}");
    }
    datagram(0x01, conn, &body)
}

/// Section 3.3: a Start echoes the nonce and repeats the Request's body (offsets 14 to the CRC).
fn start(conn: u64, nonce: u64, request: &[u8]) -> Vec<u8> {
    let request_body = &request[14..request.len() - 4];
    datagram(0x03, conn, &format!("{nonce:016x} {}", hex(request_body)))
}

/// Section 1.4: the shortest QUIC varint.
fn varint(v: u64) -> String {
    match v {
        0..=63 => format!("{v:02x}"),
        64..=16_383 => format!("{:04x}", v | 0x4000),
        16_384..=1_073_741_823 => format!("{:08x}", v | 0x8000_0000),
        _ => format!("{:016x}", v | 0xc000_0000_0000_0000),
    }
}

/// Section 3.5: an Ack. `ranges` are chunk ranges above `cumulative`, ascending and apart.
fn ack(
    conn: u64,
    largest_seq: u64,
    ack_delay_us: u32,
    owd_us: u32,
    window_end: u32,
    cumulative: u32,
    ranges: &[(u64, u64)],
) -> Vec<u8> {
    let mut body = format!(
        "{largest_seq:016x} {ack_delay_us:08x} {owd_us:08x} {window_end:08x} {cumulative:08x} {:02x}",
        ranges.len()
    );
    let mut prev_end = u64::from(cumulative);
    for &(start, end) in ranges {
        body += &format!(" {} {}", varint(start - prev_end), varint(end - start));
        prev_end = end;
    }
    datagram(0x05, conn, &body)
}

/// Section 3.6.
fn done(conn: u64) -> Vec<u8> {
    datagram(0x06, conn, "")
}

// ---------------------------------------------------------------------------------------------
// Reading by hand

/// Big-endian fields read in order from a body; every read is checked against its end.
struct Fields<'a> {
    bytes: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Fields { bytes, at: 0, what }
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        assert!(
            self.at + n <= self.bytes.len(),
            "{}: truncated at byte {} of the body (wanted {n} more)",
            self.what,
            self.at
        );
        self.at += n;
        &self.bytes[self.at - n..self.at]
    }
    fn uint(&mut self, n: usize) -> u64 {
        self.take(n).iter().fold(0, |v, &b| (v << 8) | u64::from(b))
    }
    fn rest(&mut self) -> &'a [u8] {
        self.take(self.bytes.len() - self.at)
    }
    /// Section 1.4.
    fn varint(&mut self) -> u64 {
        let first = self.take(1)[0];
        let len = 1usize << (first >> 6);
        let more = self.uint(len - 1);
        (u64::from(first & 0x3f) << (8 * (len - 1))) | more
    }
    fn end(&self) {
        assert_eq!(
            self.at,
            self.bytes.len(),
            "{}: trailing bytes after the last field",
            self.what
        );
    }
}

/// Section 2.3, steps 1 to 5, by hand: the datagram's kind, connection id and body.
fn open(d: &[u8]) -> (u8, u64, &[u8]) {
    assert!(
        d.len() >= 18,
        "a {}-byte datagram (section 2.1: at least 18)",
        d.len()
    );
    assert_eq!(&d[..4], b"UFRY", "magic");
    assert_eq!(d[4], 1, "version");
    let (content, trailer) = d.split_at(d.len() - 4);
    assert_eq!(
        u32::from_be_bytes(trailer.try_into().unwrap()),
        crc32fast::hash(content),
        "CRC32 trailer of {}",
        hex(d)
    );
    let kind = d[5];
    assert!((1..=8).contains(&kind), "unknown kind {kind}");
    let conn = u64::from_be_bytes(d[6..14].try_into().unwrap());
    (kind, conn, &content[14..])
}

/// Section 3.2, decoded by hand.
#[derive(Debug)]
struct Offer {
    id: Id,
    size: u64,
    chunk_size: u64,
    nonce: u64,
}

fn read_id(f: &mut Fields<'_>) -> Id {
    let algorithm = f.take(1)[0];
    let len = match algorithm {
        1 => 16,
        2 => 32,
        a => panic!("{}: algorithm byte {a} (section 4 allows 1 and 2)", f.what),
    };
    Id {
        algorithm,
        digest: f.take(len).to_vec(),
    }
}

fn read_offer(body: &[u8]) -> Offer {
    let mut f = Fields::new(body, "offer");
    let id = read_id(&mut f);
    let size = f.uint(8);
    let chunk_size = f.uint(2);
    let nonce = f.uint(8);
    f.end();
    assert_eq!(
        body.len(),
        1 + id.digest.len() + 18,
        "an Offer's body is the id and 18 bytes"
    );
    assert!(chunk_size >= 256, "chunk_size {chunk_size} below 256");
    assert!(size.div_ceil(chunk_size) <= u64::from(u32::MAX));
    Offer {
        id,
        size,
        chunk_size,
        nonce,
    }
}

/// Section 3.4, decoded by hand.
struct Data<'a> {
    seq: u64,
    send_time_us: u32,
    chunk: u64,
    payload: &'a [u8],
}

fn read_data(body: &[u8]) -> Data<'_> {
    let mut f = Fields::new(body, "data");
    Data {
        seq: f.uint(8),
        send_time_us: f.uint(4) as u32,
        chunk: f.uint(4),
        payload: f.rest(),
    }
}

/// Section 3.7, decoded by hand: code and reason.
fn read_error(body: &[u8]) -> (u16, String) {
    let mut f = Fields::new(body, "error");
    let code = f.uint(2) as u16;
    let len = f.uint(1) as usize;
    let reason = std::str::from_utf8(f.take(len))
        .expect("section 3.7: the reason is UTF-8")
        .to_owned();
    f.end();
    (code, reason)
}

/// Section 3.8, decoded by hand: place and retry_after_ms, and nothing after them.
fn read_wait(body: &[u8]) -> (u32, u16) {
    let mut f = Fields::new(body, "wait");
    let place = f.uint(4) as u32;
    let retry_after_ms = f.uint(2) as u16;
    f.end();
    (place, retry_after_ms)
}

/// Section 1.6: the byte range of chunk `i`.
fn chunk_range(i: u64, chunk_size: u64, size: u64) -> std::ops::Range<u64> {
    (i * chunk_size).min(size)..((i + 1) * chunk_size).min(size)
}

/// Section 5.4, exactly as worded: merge and clip the have ranges, then keep whole chunks.
fn held_chunks(have: &[(u64, u64)], size: u64, chunk_size: u64) -> BTreeSet<u64> {
    let chunk_count = size.div_ceil(chunk_size);
    let mut clipped: Vec<(u64, u64)> = have
        .iter()
        .map(|&(s, e)| (s.min(size), e.min(size)))
        .filter(|(s, e)| s < e)
        .collect();
    clipped.sort();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in clipped {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let mut held = BTreeSet::new();
    for (s, e) in merged {
        let first = s.div_ceil(chunk_size);
        let last = if e == size {
            chunk_count
        } else {
            e / chunk_size
        };
        held.extend(first..last.max(first));
    }
    held
}

/// Chunk ranges `[start, end)` of a set, ascending.
fn runs(set: &BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &c in set {
        match out.last_mut() {
            Some(r) if r.1 == c => r.1 += 1,
            _ => out.push((c, c + 1)),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// A client written from the spec

/// A plain UDP socket and the receiver's clock (section 1.7).
struct Peer {
    socket: UdpSocket,
    server: SocketAddr,
    epoch: Instant,
    /// Transfers this client finished: their Data is answered with Done (section 5.2.5).
    lingering: Vec<u64>,
}

impl Peer {
    fn new(server: SocketAddr) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        Peer {
            socket,
            server,
            epoch: Instant::now(),
            lingering: Vec::new(),
        }
    }

    fn send(&self, d: &[u8]) {
        self.socket.send_to(d, self.server).unwrap();
    }

    /// The next datagram from the server, or `None` after `wait`.
    fn recv(&self, wait: Duration) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65_536];
        self.socket
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .unwrap();
        match self.socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                assert_eq!(from, self.server, "a datagram from elsewhere");
                buf.truncate(n);
                Some(buf)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("recv: {e}"),
        }
    }

    /// The receiver's clock in wrapping microseconds (section 1.7).
    fn clock_us(&self) -> u32 {
        self.epoch.elapsed().as_micros() as u32
    }

    /// A datagram for a transfer this client already finished: a lingering receiver answers
    /// Data (and Offer) with Done and ignores the rest (section 5.2.5). Returns whether it was one.
    fn linger(&self, kind: u8, conn: u64) -> bool {
        if !self.lingering.contains(&conn) {
            return false;
        }
        if kind == 0x04 || kind == 0x02 {
            self.send(&done(conn));
        }
        true
    }

    /// Sends Done for `conn` (section 3.6) and lingers from now on.
    fn finish(&mut self, conn: u64) {
        self.send(&done(conn));
        self.lingering.push(conn);
    }

    /// Lingers for 3 s and checks that every finished transfer is over at the server: a server
    /// that took the Done sends nothing more, while one that missed it would go on probing
    /// (section 5.3.6, at least every 2 s). Data that was already on its way when a Done left
    /// may arrive during the first second and is answered with Done.
    fn check_server_finished(&self) {
        let start = Instant::now();
        while let Some(left) = Duration::from_secs(3).checked_sub(start.elapsed()) {
            let Some(d) = self.recv(left) else { break };
            let (kind, conn, _) = open(&d);
            assert!(
                self.linger(kind, conn),
                "kind {kind} for connection {conn:#x}, which this client never used"
            );
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "the server still sends kind {kind} on {conn:#x} {:?} after Done: it did not \
                 take the Done as final (section 5.3.7)",
                start.elapsed()
            );
        }
    }
}

/// What one download showed, decoded by hand.
struct Transcript {
    offer: Offer,
    /// The Offer, whole.
    offer_bytes: Vec<u8>,
    /// The Start sent, as bytes.
    start: Vec<u8>,
    /// The object, complete.
    object: Vec<u8>,
    /// Chunks the have-set covered (section 5.4).
    held: BTreeSet<u64>,
    /// (seq, send_time_us, chunk) of every Data datagram, in arrival order, dropped ones included.
    data: Vec<(u64, u32, u64)>,
    /// The first Data datagram, whole.
    first_data: Vec<u8>,
    /// Acks sent.
    acks: Vec<Vec<u8>>,
}

/// Downloads by the receiver rules of section 5.2 with the Request `request` (built by the
/// caller), up to the moment every chunk is held and the ack that says so has left; the caller
/// checks the bytes and sends Done.
/// `known` holds the object's bytes wherever `have` says the client has them. The first Data
/// datagram carrying a chunk in `lose` is ignored, as if lost on the way.
fn download(peer: &Peer, request: &[u8], known: &[u8], lose: &[u64]) -> Transcript {
    let deadline = Instant::now() + Duration::from_secs(10);
    // The request, read back by hand (section 3.1).
    let (kind, conn, body) = open(request);
    assert_eq!(kind, 0x01);
    let mut f = Fields::new(body, "request");
    let id = read_id(&mut f);
    let max_datagram_size = f.uint(2) as usize;
    let _rate = f.uint(8);
    let have: Vec<(u64, u64)> = (0..f.uint(2)).map(|_| (f.uint(8), f.uint(8))).collect();
    f.end();
    assert_eq!(
        request.len(),
        31 + id.digest.len() + 16 * have.len(),
        "section 3: a Request is 31 + d + 16 * have_count bytes"
    );

    // Request until an Offer comes (section 5.2.2; the handshake timer starts at 600 ms).
    let (offer, offer_bytes) = 'offer: loop {
        assert!(Instant::now() < deadline, "no Offer for {conn:#x}");
        peer.send(request);
        let sent = Instant::now();
        while let Some(left) = Duration::from_millis(600).checked_sub(sent.elapsed()) {
            let Some(d) = peer.recv(left) else { break };
            let (kind, from_conn, body) = open(&d);
            if peer.linger(kind, from_conn) {
                continue;
            }
            assert_eq!(from_conn, conn, "an answer on another connection");
            if kind == 0x07 {
                let (code, reason) = read_error(body);
                panic!("the server answered the Request with Error {code}: {reason}");
            }
            assert_eq!(
                kind, 0x02,
                "the answer to a Request is an Offer or an Error"
            );
            assert_eq!(d.len(), 37 + id.digest.len(), "section 3: Offer length");
            break 'offer (read_offer(body), d.clone());
        }
    };
    assert_eq!(offer.id, id, "the Offer echoes the object id");
    assert_eq!(
        offer.chunk_size as usize,
        SERVER_DATAGRAM.min(max_datagram_size) - 34,
        "section 1.5: chunk_size = min(server's, client's datagram size) - 34"
    );
    assert_eq!(offer.size, known.len() as u64, "the object's size");
    let (size, cs) = (offer.size, offer.chunk_size);
    let count = size.div_ceil(cs);

    // Section 5.4: what the have-set already covers is held, and its bytes are here.
    let held_by_have = held_chunks(&have, size, cs);
    let mut held = held_by_have.clone();
    let mut object = vec![0u8; size as usize];
    for &c in &held {
        let r = chunk_range(c, cs, size);
        object[r.start as usize..r.end as usize]
            .copy_from_slice(&known[r.start as usize..r.end as usize]);
    }
    let start_dgram = start(conn, offer.nonce, request);
    assert_eq!(
        start_dgram.len(),
        39 + id.digest.len() + 16 * have.len(),
        "section 3: a Start is 39 + d + 16 * have_count bytes"
    );
    let mut transcript = Transcript {
        offer,
        offer_bytes,
        start: start_dgram,
        object: Vec::new(),
        held: held_by_have.clone(),
        data: Vec::new(),
        first_data: Vec::new(),
        acks: Vec::new(),
    };
    if held.len() as u64 == count {
        // Section 5.2.2: nothing missing, no Start.
        transcript.object = object;
        return transcript;
    }

    peer.send(&transcript.start);
    let mut last_sent = Instant::now();
    let mut lost: Vec<u64> = Vec::new();
    let mut largest: Option<(u64, Instant, u32)> = None;
    let mut unacked = 0u32;
    let mut ack_due: Option<Instant> = None;
    let window = |cumulative: u64| (cumulative + (16u64 << 20) / cs).min(count);
    let send_ack = |peer: &Peer, held: &BTreeSet<u64>, largest: (u64, Instant, u32)| {
        let cumulative = (0..).find(|c| !held.contains(c)).unwrap();
        let ranges: Vec<(u64, u64)> = runs(held)
            .into_iter()
            .filter(|r| r.0 > cumulative)
            .collect();
        let a = ack(
            conn,
            largest.0,
            largest.1.elapsed().as_micros() as u32,
            largest.2,
            window(cumulative) as u32,
            cumulative as u32,
            &ranges,
        );
        peer.send(&a);
        a
    };
    while (held.len() as u64) < count {
        assert!(
            Instant::now() < deadline,
            "download of {conn:#x} stalled: {} of {count} chunks after {} Data datagrams and {} acks",
            held.len(),
            transcript.data.len(),
            transcript.acks.len()
        );
        let wait = match ack_due {
            Some(t) => t.saturating_duration_since(Instant::now()),
            None => Duration::from_millis(600),
        };
        let Some(d) = peer.recv(wait) else {
            if let (Some(_), Some(l)) = (ack_due, largest) {
                // Section 5.2.4: at the latest max_ack_delay (10 ms) after an in-order chunk.
                transcript.acks.push(send_ack(peer, &held, l));
                unacked = 0;
                ack_due = None;
            } else if let Some(l) = largest {
                // Keep-alive ack (section 5.2.4).
                transcript.acks.push(send_ack(peer, &held, l));
            } else if last_sent.elapsed() >= Duration::from_millis(600) {
                // Handshake timer in STARTING: the Start again, unchanged.
                peer.send(&transcript.start);
                last_sent = Instant::now();
            }
            continue;
        };
        let arrival = Instant::now();
        let (kind, from_conn, body) = open(&d);
        if peer.linger(kind, from_conn) {
            continue;
        }
        assert_eq!(from_conn, conn, "a datagram on another connection");
        match kind {
            0x04 => {}
            0x07 => {
                let (code, reason) = read_error(body);
                panic!("the server ended the transfer with Error {code}: {reason}");
            }
            // Section 5.2.1: a repeated Offer (this client may have repeated its Request) is
            // answered with the Start again in STARTING, echoing the newest Offer's nonce
            // (section 5.2.2), and dropped in RECEIVING.
            0x02 => {
                let again = read_offer(body);
                assert_eq!((again.size, again.chunk_size), (size, cs));
                if largest.is_none() {
                    transcript.start = start(conn, again.nonce, request);
                    peer.send(&transcript.start);
                }
                continue;
            }
            other => panic!("kind {other} from the server during a download"),
        }
        let data = read_data(body);
        assert_eq!(d.len(), 34 + data.payload.len(), "section 3: Data length");
        // Section 3.4: seq is new and larger than every seq before (loopback keeps order).
        if let Some(&(prev, _, _)) = transcript.data.last() {
            assert!(
                data.seq > prev,
                "seq {} after seq {prev}: section 3.4 wants a new, larger seq for every Data \
                 datagram",
                data.seq
            );
        }
        if transcript.data.is_empty() {
            transcript.first_data = d.clone();
        }
        transcript
            .data
            .push((data.seq, data.send_time_us, data.chunk));
        // Section 5.2.3, step 1: only a chunk that fits the offer counts.
        assert!(data.chunk < count, "chunk {} of {count}", data.chunk);
        let range = chunk_range(data.chunk, cs, size);
        assert_eq!(
            data.payload.len() as u64,
            range.end - range.start,
            "chunk {} must be sent at its exact length",
            data.chunk
        );
        assert!(
            !held_by_have.contains(&data.chunk),
            "chunk {} is covered by the have-set and must never be sent (section 5.4)",
            data.chunk
        );
        if lose.contains(&data.chunk) && !lost.contains(&data.chunk) {
            lost.push(data.chunk);
            continue;
        }
        // Step 3: largest_seq, its arrival time and its one-way-delay sample.
        if largest.is_none_or(|l| data.seq > l.0) {
            let owd = peer.clock_us().wrapping_sub(data.send_time_us);
            largest = Some((data.seq, arrival, owd));
        }
        let l = largest.unwrap();
        unacked += 1;
        if held.contains(&data.chunk) {
            // Step 4: a duplicate is acknowledged at once.
            transcript.acks.push(send_ack(peer, &held, l));
            unacked = 0;
            ack_due = None;
            continue;
        }
        let in_order = held.last().is_none_or(|&m| data.chunk == m + 1);
        object[range.start as usize..range.end as usize].copy_from_slice(data.payload);
        held.insert(data.chunk);
        if held.len() as u64 == count {
            // Step 7: the last chunk is acknowledged at once (an ack claiming every chunk),
            // before the digest is checked; the caller checks it and sends Done.
            transcript.acks.push(send_ack(peer, &held, l));
            break;
        }
        if !in_order || unacked >= 2 {
            transcript.acks.push(send_ack(peer, &held, l));
            unacked = 0;
            ack_due = None;
        } else if ack_due.is_none() {
            ack_due = Some(arrival + Duration::from_millis(10));
        }
    }
    transcript.object = object;
    transcript
}

// ---------------------------------------------------------------------------------------------
// The objects the server serves

/// Pseudo-random bytes (an LCG): a map stand-in.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 56) as u8
        })
        .collect()
}

/// The 4-byte object of the worked examples in section 6.
const MAP: &[u8] = b"map!";

struct Served {
    server: Serving,
    /// 10 000 bytes: 40 chunks of 256 bytes at 290-byte datagrams, the last 16 bytes long.
    big: Vec<u8>,
    /// 40 000 bytes: 35 chunks of 1166 bytes at 1200-byte datagrams.
    large: Vec<u8>,
    /// 2660 bytes: 11 chunks of 256 bytes, the last 100 bytes long.
    resume: Vec<u8>,
    _dir: TempDir,
}

fn serve(name: &str) -> Served {
    serve_with(name, udpferry::EndpointConfig::default())
}

/// The objects of `serve`, by a server with the limits of `endpoint`.
fn serve_with(name: &str, endpoint: udpferry::EndpointConfig) -> Served {
    let dir = TempDir::new(name);
    let (big, large, resume) = (bytes(10_000, 1), bytes(40_000, 2), bytes(2660, 3));
    put_dated(&dir.join("map.txt"), MAP);
    put_dated(&dir.join("big.bin"), &big);
    put_dated(&dir.join("large.bin"), &large);
    put_dated(&dir.join("resume.bin"), &resume);
    let server = Serving::start(
        udpferry::ContentStore::open(dir.path()).unwrap(),
        udpferry::ServerConfig {
            endpoint,
            ..udpferry::ServerConfig::default()
        },
    );
    Served {
        server,
        big,
        large,
        resume,
        _dir: dir,
    }
}

// ---------------------------------------------------------------------------------------------
// The spec's own examples

/// Every block in PROTOCOL.md that starts with the line `hex offset`, as bytes, in order. The
/// offsets at the start of each line are checked too.
fn spec_hex_examples() -> Vec<Vec<u8>> {
    let mut examples = Vec::new();
    let mut lines = SPEC.lines();
    while let Some(line) = lines.next() {
        if line.trim() != "hex offset" {
            continue;
        }
        let mut bytes = Vec::new();
        for line in lines.by_ref() {
            if line.trim_start().starts_with("```") {
                break;
            }
            let mut words = line.split_whitespace();
            let offset = usize::from_str_radix(words.next().unwrap(), 16).unwrap();
            assert_eq!(offset, bytes.len(), "offset column of {line:?}");
            for w in words {
                assert_eq!(w.len(), 2, "{w:?} in {line:?}");
                bytes.push(u8::from_str_radix(w, 16).unwrap());
            }
        }
        examples.push(bytes);
    }
    examples
}

/// The nonce of the spec's example Offer (section 6.3).
const EXAMPLE_NONCE: u64 = 0x0123_4567_89ab_cdef;

/// Section 6.3's Request for `map!`, with an id of either algorithm.
fn example_request(id: &Id) -> Vec<u8> {
    request(EXAMPLE_CONN, id, 1200, &[])
}

/// Section 6.3's Offer: 4 bytes, chunk_size 1166, the example nonce.
fn example_offer(id: &Id) -> Vec<u8> {
    datagram(
        0x02,
        EXAMPLE_CONN,
        &format!("{} {:016x} {:04x} {EXAMPLE_NONCE:016x}", id.hex(), 4, 1166),
    )
}

/// Section 8.2's manifest of `map!`: one 4-byte block of 512.
fn example_manifest(id: &Id) -> Vec<u8> {
    // weak: a = 0x6d + 0x61 + 0x70 + 0x21 = 0x15f; b = 4*0x6d + 3*0x61 + 2*0x70 + 0x21 = 0x3d8.
    let mut m = hx(&format!(
        "55464d31 {} {:016x} {:08x} {:08x} 03d8015f {}",
        id.hex(),
        4,
        512,
        1,
        hex(&Md5::digest(MAP)[..8])
    ));
    let own = Md5::digest(&m);
    m.extend_from_slice(&own);
    m
}

#[test]
fn every_hex_example_in_the_spec_follows_its_field_tables() {
    let md5 = Id::md5(MAP);
    let sha = Id::sha256(MAP);
    let expected: Vec<(&str, Vec<u8>)> = vec![
        (
            "6.1 Data",
            datagram(
                0x04,
                EXAMPLE_CONN,
                "000000000000002a 000f4240 00000007 6d617021",
            ),
        ),
        (
            "6.2 Ack",
            ack(EXAMPLE_CONN, 42, 500, 20_000, 4096, 7, &[(9, 11), (15, 16)]),
        ),
        ("6.3 Request", example_request(&md5)),
        ("6.3 Offer", example_offer(&md5)),
        (
            "6.3 Start",
            start(EXAMPLE_CONN, EXAMPLE_NONCE, &example_request(&md5)),
        ),
        (
            "6.3 Data",
            datagram(
                0x04,
                EXAMPLE_CONN,
                "0000000000000000 000000fa 00000000 6d617021",
            ),
        ),
        ("6.3 Done", done(EXAMPLE_CONN)),
        ("6.4 Request", example_request(&sha)),
        ("6.4 Offer", example_offer(&sha)),
        (
            "6.4 Start",
            start(EXAMPLE_CONN, EXAMPLE_NONCE, &example_request(&sha)),
        ),
        (
            "6.5 Error",
            datagram(
                0x07,
                EXAMPLE_CONN,
                &format!("0001 0e {}", hex(b"no such object")),
            ),
        ),
        // Section 3.8: place 3, retry_after_ms 1000.
        ("6.6 Wait", datagram(0x08, EXAMPLE_CONN, "00000003 03e8")),
        ("8.2 manifest", example_manifest(&md5)),
    ];
    let found = spec_hex_examples();
    assert_eq!(
        found.len(),
        expected.len(),
        "PROTOCOL.md has {} hex examples; this test knows {} (add a check for a new one)",
        found.len(),
        expected.len()
    );
    for ((name, want), got) in expected.iter().zip(&found) {
        assert_eq!(hex(got), hex(want), "example {name}");
    }
    for (name, d) in &expected[..12] {
        let (_, conn, _) = open(d);
        assert_eq!(conn, EXAMPLE_CONN, "{name}");
    }
    assert_eq!(hex(&md5.digest), "f0a87e38a0288e12550da21e4d5344d0");
    for id in [&md5, &sha] {
        assert!(
            SPEC.contains(&hex(&id.digest)),
            "the id {} in the text",
            id.hex()
        );
        let manifest = id.manifest_id();
        assert!(
            SPEC.contains(&hex(&manifest.digest)),
            "section 8.1 gives the manifest id {} of {}",
            hex(&manifest.digest),
            id.hex()
        );
    }
    // Section 1.3: the CRC's check value; section 1.4: the varint examples, both ways.
    assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
    assert!(SPEC.contains("`0xCBF43926`"));
    let varints = [
        (37u64, "25"),
        (300, "412c"),
        (16_384, "80004000"),
        (70_000, "80011170"),
        (u64::from(u32::MAX), "c0000000ffffffff"),
    ];
    for (value, encoded) in varints {
        assert_eq!(varint(value), encoded);
        let spaced: Vec<String> = hx(encoded).iter().map(|b| format!("{b:02x}")).collect();
        assert!(
            SPEC.contains(&format!("is `{}`", spaced.join(" "))),
            "section 1.4 lists {value} as {encoded}"
        );
        assert_eq!(Fields::new(&hx(encoded), "varint").varint(), value);
    }
    assert_eq!(Fields::new(&hx("4002"), "varint").varint(), 2);
}

// ---------------------------------------------------------------------------------------------
// The server, by the spec

/// Section 6.3 against the server: the spec's Request, byte for byte, is answered with the
/// spec's Offer (only the nonce, and so the CRC, differ), the Start brings the spec's Data
/// (only the send time and CRC differ), and the spec's Done ends it.
#[test]
fn the_worked_handshake_runs_against_the_server() {
    let served = serve("conf-example");
    let mut peer = Peer::new(served.server.addr);
    let examples = spec_hex_examples();
    let md5 = Id::md5(MAP);
    let (request, offer, data, done_example) =
        (&examples[2], &examples[3], &examples[5], &examples[6]);
    assert_eq!(request, &example_request(&md5));

    let t = download(&peer, request, MAP, &[]);
    // The server's Offer differs from the example in the nonce (and so the CRC) only.
    let mut got_offer = t.offer_bytes.clone();
    assert_eq!(got_offer.len(), 53);
    assert_eq!(hex(&got_offer[..41]), hex(&offer[..41]));
    got_offer[41..49].copy_from_slice(&EXAMPLE_NONCE.to_be_bytes());
    let crc = crc32fast::hash(&got_offer[..49]);
    got_offer[49..].copy_from_slice(&crc.to_be_bytes());
    assert_eq!(hex(&got_offer), hex(offer));
    assert_eq!(t.offer.size, 4);
    assert_eq!(t.offer.chunk_size, 1166);
    // One Data datagram: seq 0 (the reference sender starts there), chunk 0, `map!`.
    assert_eq!(t.data.len(), 1, "one chunk, sent once");
    assert_eq!(t.first_data.len(), 38);
    assert_eq!(t.first_data[..22], data[..22], "header and seq");
    assert_eq!(
        t.first_data[26..34],
        data[26..34],
        "chunk index and payload"
    );
    assert_eq!(t.object, MAP);
    assert_eq!(Id::md5(&t.object), md5);
    assert_eq!(done_example, &done(EXAMPLE_CONN));
    peer.finish(EXAMPLE_CONN);
    peer.check_server_finished();
}

/// The handshake and the data phase with an MD5 id over 290-byte datagrams (the smallest a
/// Request may ask for): 40 chunks, more than the initial window, so the transfer only
/// finishes quickly if the server reads the acks as section 3.5 words them. The first copy of
/// chunk 2 is "lost": the acks then report a gap, and the server must send chunk 2 again
/// under a new, larger seq.
#[test]
fn md5_download_with_acks_and_a_loss() {
    let served = serve("conf-md5");
    let mut peer = Peer::new(served.server.addr);
    let id = Id::md5(&served.big);
    let conn = 0x0bad_cafe_0000_0001;
    let req = request(conn, &id, 290, &[]);
    assert_eq!(
        req.len(),
        47,
        "section 3: an MD5 Request without have ranges"
    );
    let began = Instant::now();
    let t = download(&peer, &req, &served.big, &[2]);
    let took = began.elapsed();

    assert_eq!(t.offer.chunk_size, 256, "min(1200, 290) - 34");
    assert_eq!(t.object, served.big);
    assert_eq!(Id::md5(&t.object), id, "the object's MD5 is its id");
    assert!(
        took < Duration::from_secs(5),
        "40 chunks took {took:?}: without the acks only probes would move the transfer"
    );
    assert!(!t.acks.is_empty());
    let copies: Vec<u64> = t.data.iter().filter(|d| d.2 == 2).map(|d| d.0).collect();
    assert!(
        copies.len() >= 2 && copies[1] > copies[0],
        "chunk 2 again under a fresh seq after its loss, got seqs {copies:?}"
    );
    assert_eq!(t.data[0].0, 0, "the reference sender's first seq");
    // The send times are one microsecond clock (section 1.7): they never run ahead of the
    // time that passed here, modulo 2^32.
    let span = t.data.last().unwrap().1.wrapping_sub(t.data[0].1);
    assert!(
        u128::from(span) <= took.as_micros() + 1000,
        "send times span {span} µs"
    );
    // Every chunk appears; the acks this client sent follow section 3.5 (checked in the
    // example test), the last one claiming all 40 chunks (section 5.2.3, step 7).
    let chunks: BTreeSet<u64> = t.data.iter().map(|d| d.2).collect();
    assert_eq!(chunks.len(), 40);
    let last_ack = t.acks.last().unwrap();
    assert_eq!(
        last_ack[34..38],
        40u32.to_be_bytes(),
        "cumulative = chunk_count"
    );
    // The digest check takes 300 ms here (a resume re-hashing what it held, say). With every
    // chunk acknowledged the server waits for the Done and does not probe (sections 5.3.3 and
    // 5.3.6); only Data already on its way when the ack left may still arrive, at once.
    let checking = Instant::now();
    while let Some(left) = Duration::from_millis(300).checked_sub(checking.elapsed()) {
        let Some(d) = peer.recv(left) else { break };
        let (kind, from_conn, _) = open(&d);
        assert!(
            (kind, from_conn) == (0x04, conn) && checking.elapsed() < Duration::from_millis(50),
            "kind {kind} on {from_conn:#x} {:?} after the ack of every chunk: the server \
             probed while the digest was being checked",
            checking.elapsed()
        );
    }
    peer.finish(conn);
    peer.check_server_finished();
}

/// SHA-256 ids (section 4, algorithm 2): the Request is 63 bytes, the Offer 69 and the Start
/// 71, the spec's own example (section 6.4) first, then 35 chunks at 1200-byte datagrams.
#[test]
fn sha256_downloads() {
    let served = serve("conf-sha");
    let mut peer = Peer::new(served.server.addr);
    let examples = spec_hex_examples();
    let sha = Id::sha256(MAP);
    let (request, offer, start_example) = (&examples[7], &examples[8], &examples[9]);
    assert_eq!(request.len(), 63);
    assert_eq!(offer.len(), 69);
    assert_eq!(start_example.len(), 71);
    let t = download(&peer, request, MAP, &[]);
    assert_eq!(t.offer.id, sha);
    assert_eq!(t.offer.size, 4);
    assert_eq!(t.start[..14], start_example[..14]);
    assert_eq!(
        t.start[22..67],
        start_example[22..67],
        "the repeated request"
    );
    assert_eq!(Id::sha256(&t.object), sha);
    peer.finish(EXAMPLE_CONN);

    let id = Id::sha256(&served.large);
    let conn = 0x0bad_cafe_0000_0002;
    let req = request_for(conn, &id);
    let t = download(&peer, &req, &served.large, &[]);
    assert_eq!(t.offer.chunk_size, 1166);
    assert_eq!(t.offer.size, 40_000);
    assert_eq!(t.object, served.large);
    assert_eq!(Id::sha256(&t.object), id, "the object's SHA-256 is its id");
    peer.finish(conn);
    peer.check_server_finished();
}

fn request_for(conn: u64, id: &Id) -> Vec<u8> {
    request(conn, id, 1200, &[])
}

/// Resume (section 5.4): a Request with a have-set gets exactly the chunks it lacks. The
/// have-set has two touching ranges (held as one), a range with partial chunks at both ends,
/// and one that runs past the end of the object (clipped; it covers the short last chunk).
#[test]
fn resume_sends_only_the_missing_chunks() {
    let served = serve("conf-resume");
    let mut peer = Peer::new(served.server.addr);
    let id = Id::md5(&served.resume);
    let have = [(0, 600), (600, 1024), (1300, 2000), (2500, 9999)];
    let conn = 0x0bad_cafe_0000_0003;
    let req = request(conn, &id, 290, &have);
    assert_eq!(req.len(), 47 + 16 * 4);
    // Only the have ranges' bytes are known to this client.
    let mut known = vec![0u8; served.resume.len()];
    for &(s, e) in &have {
        let e = e.min(known.len() as u64) as usize;
        known[s as usize..e].copy_from_slice(&served.resume[s as usize..e]);
    }
    let t = download(&peer, &req, &known, &[]);
    assert_eq!(t.offer.chunk_size, 256);
    assert_eq!(
        t.held,
        BTreeSet::from([0, 1, 2, 3, 6, 10]),
        "section 5.4 by hand: [0, 1024) is chunks 0-3, [1300, 2000) chunk 6, [2500, 2660) chunk 10"
    );
    let sent: BTreeSet<u64> = t.data.iter().map(|d| d.2).collect();
    assert_eq!(
        sent,
        BTreeSet::from([4, 5, 7, 8, 9]),
        "exactly the chunks the have-set does not cover"
    );
    assert_eq!(t.object, served.resume);
    assert_eq!(Id::md5(&t.object), id);
    peer.finish(conn);
    peer.check_server_finished();
}

/// Section 8: the manifest under its derived id (8.1), laid out as 8.2 says, naming the object.
#[test]
fn manifests_by_their_derived_ids() {
    let served = serve("conf-manifest");
    let mut peer = Peer::new(served.server.addr);
    let examples = spec_hex_examples();

    // `map!`: the manifest is the spec's example, byte for byte, under both ids.
    for (n, id) in [Id::md5(MAP), Id::sha256(MAP)].into_iter().enumerate() {
        let conn = 0x0bad_cafe_0000_0100 + n as u64;
        let manifest_id = id.manifest_id();
        assert_eq!(manifest_id.algorithm, id.algorithm);
        let expected = example_manifest(&id);
        let t = download(&peer, &request_for(conn, &manifest_id), &expected, &[]);
        assert_eq!(t.offer.id, manifest_id);
        assert_eq!(hex(&t.object), hex(&expected));
        if id.algorithm == 1 {
            assert_eq!(t.object, examples[12], "the example of section 8.2");
        }
        check_manifest(&t.object, &id, MAP);
        peer.finish(conn);
    }

    // A manifest of several blocks, the last one short.
    let id = Id::md5(&served.big);
    let conn = 0x0bad_cafe_0000_0200;
    let manifest_id = id.manifest_id();
    // Its size is known from the layout: 4 + 17 + 16 + 12 * 20 + 16 bytes.
    let len = 4 + 17 + 16 + 12 * 20 + 16;
    let req = request(conn, &manifest_id, 290, &[]);
    let t = download(&peer, &req, &vec![0; len], &[]);
    check_manifest(&t.object, &id, &served.big);
    peer.finish(conn);
    peer.check_server_finished();
}

/// Section 8.2 by hand: `bytes` is the manifest of `object`, whose id is `id`.
fn check_manifest(bytes: &[u8], id: &Id, object: &[u8]) {
    let mut f = Fields::new(bytes, "manifest");
    assert_eq!(f.take(4), b"UFM1");
    assert_eq!(&read_id(&mut f), id, "the manifest names its object");
    let size = f.uint(8);
    assert_eq!(size, object.len() as u64);
    let block_size = f.uint(4);
    // Section 8.4: the integer square root of the size, rounded up to a power of two, within
    // 512 B to 1 MiB.
    let root = (size as f64).sqrt() as u64;
    assert_eq!(
        block_size,
        root.max(1).next_power_of_two().clamp(512, 1 << 20)
    );
    let count = f.uint(4);
    assert_eq!(count, size.div_ceil(block_size));
    for (i, block) in object.chunks(block_size as usize).enumerate() {
        let weak = f.uint(4) as u32;
        let strong = f.take(8);
        // Section 8.2: a = sum of bytes, b = sum of (len - i) * byte_i, both mod 2^32, and
        // weak = (a mod 2^16) | ((b << 16) mod 2^32).
        let a = block
            .iter()
            .fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
        let n = block.len() as u32;
        let b = block.iter().enumerate().fold(0u32, |b, (i, &x)| {
            b.wrapping_add((n - i as u32).wrapping_mul(u32::from(x)))
        });
        assert_eq!(weak, (a & 0xffff) | (b << 16), "weak checksum of block {i}");
        assert_eq!(strong, &Md5::digest(block)[..8], "strong hash of block {i}");
    }
    let own = f.take(16);
    f.end();
    assert_eq!(
        own,
        &Md5::digest(&bytes[..bytes.len() - 16])[..],
        "trailing digest"
    );
}

/// An id the server does not have gets one Error 1 NotFound (sections 3.7, 5.1), with either
/// algorithm. Malformed datagrams sent before it are never answered (section 2.3), nor are
/// well-formed ones for no transfer (section 5.1): the first answer is the Error.
#[test]
fn unknown_ids_and_malformed_datagrams() {
    let served = serve("conf-unknown");
    let peer = Peer::new(served.server.addr);
    let id = Id::md5(&served.big);
    // Each of these would be a valid Request for an object the server has, but for one field.
    let good = request(0x51, &id, 1200, &[]);
    let mut bad_crc = good.clone();
    *bad_crc.last_mut().unwrap() ^= 1;
    let mut version_2 = good.clone();
    version_2[4] = 2;
    let mut no_kind = good.clone();
    no_kind[5] = 0x09;
    let crc = crc32fast::hash(&no_kind[..no_kind.len() - 4]);
    let at = no_kind.len() - 4;
    no_kind[at..].copy_from_slice(&crc.to_be_bytes());
    let malformed = [
        bad_crc,
        version_2,
        no_kind,
        // Algorithm byte 3 (section 4).
        datagram(
            0x01,
            0x52,
            &format!("03{} 04b0 {:016x} 0000", hex(&id.digest), 0),
        ),
        // max_datagram_size 289 (section 3.1: at least 290).
        request(0x53, &id, 289, &[]),
        // A trailing byte after the have ranges.
        datagram(0x01, 0x54, &format!("{} 04b0 {:016x} 0000 00", id.hex(), 0)),
        // Have ranges that overlap, and an empty one.
        request(0x55, &id, 1200, &[(0, 10), (5, 20)]),
        request(0x56, &id, 1200, &[(7, 7)]),
        // 17 bytes: too short.
        good[..17].to_vec(),
        // An Offer with chunk_size 255 (section 3.2), sent to the server for no transfer.
        datagram(
            0x02,
            0x57,
            &format!("{} {:016x} 00ff {:016x}", id.hex(), 4, 1),
        ),
    ];
    for d in &malformed {
        peer.send(d);
    }
    // Well-formed, but for no transfer: dropped (section 5.1).
    peer.send(&done(0x58));
    peer.send(&ack(0x59, 0, 0, 0, 10, 0, &[]));
    peer.send(&datagram(0x07, 0x5a, "0005 00"));

    for (conn, unknown) in [
        (0x61, Id::md5(b"no such map")),
        (0x62, Id::sha256(b"no such map")),
    ] {
        let req = request(conn, &unknown, 1200, &[]);
        peer.send(&req);
        let d = peer
            .recv(Duration::from_secs(5))
            .expect("an answer to a Request for an unknown id");
        let (kind, from_conn, body) = open(&d);
        assert_eq!(
            (kind, from_conn),
            (0x07, conn),
            "the first answer is the Error for {conn:#x}: nothing answers malformed datagrams"
        );
        let (code, reason) = read_error(body);
        assert_eq!(code, 1, "NotFound");
        assert_eq!(d.len(), 21 + reason.len(), "section 3: 21 + reason_len");
    }
    // And nothing else follows.
    if let Some(d) = peer.recv(Duration::from_millis(500)) {
        let (kind, conn, _) = open(&d);
        panic!("unexpected kind {kind} on {conn:#x}");
    }
    // The id it does have is offered (so the malformed ones failed for their flaw alone).
    peer.send(&good);
    let d = peer.recv(Duration::from_secs(5)).expect("an Offer");
    let (kind, conn, body) = open(&d);
    assert_eq!((kind, conn), (0x02, 0x51));
    assert_eq!(read_offer(body).size, served.big.len() as u64);
}

// ---------------------------------------------------------------------------------------------
// The admission queue (sections 3.8 and 5.8)

/// Where section 6.6's Wait is among the spec's hex examples.
const WAIT_EXAMPLE: usize = 11;

/// Section 6.6 against udpferry's own encoder and decoder (the one place this file uses them:
/// `src/wire/tests.rs` has no golden test for the Wait), and the text's place-0 variant.
#[test]
fn the_wait_example_is_what_the_reference_encoder_makes() {
    use udpferry::wire::{self, ConnectionId, Datagram, Frame, Wait};
    let example = &spec_hex_examples()[WAIT_EXAMPLE];
    assert_eq!(example.len(), 24, "section 3: a Wait is 24 bytes");
    let (kind, conn, body) = open(example);
    assert_eq!((kind, conn), (0x08, EXAMPLE_CONN));
    assert_eq!(read_wait(body), (3, 1000));

    let wait = Frame::Wait(Wait {
        place: 3,
        retry_after_ms: 1000,
    });
    let mut buf = [0u8; 64];
    let len = Datagram {
        conn_id: ConnectionId(EXAMPLE_CONN),
        frame: wait.clone(),
    }
    .encode(&mut buf)
    .unwrap();
    assert_eq!(hex(&buf[..len]), hex(example), "the reference encoder");
    let decoded = wire::decode(example).expect("the reference decoder takes the example");
    assert_eq!(decoded.conn_id, ConnectionId(EXAMPLE_CONN));
    assert_eq!(decoded.frame, wait);

    // Section 3.8: the body is exactly 6 bytes.
    for body in ["00000003 03", "00000003 03e8 00", ""] {
        assert!(
            wire::decode(&datagram(0x08, EXAMPLE_CONN, body)).is_err(),
            "a Wait with the body {body:?} must fail decoding"
        );
    }
    // The text gives the CRC of the same Wait with place 0 ("start now").
    let called = datagram(0x08, EXAMPLE_CONN, "00000000 03e8");
    let crc: Vec<String> = called[20..].iter().map(|b| format!("{b:02x}")).collect();
    assert!(
        SPEC.contains(&format!("`{}`", crc.join(" "))),
        "section 6.6 gives the CRC of place 0 as {crc:?}"
    );
    let len = Datagram {
        conn_id: ConnectionId(EXAMPLE_CONN),
        frame: Frame::Wait(Wait {
            place: 0,
            retry_after_ms: 1000,
        }),
    }
    .encode(&mut buf)
    .unwrap();
    assert_eq!(hex(&buf[..len]), hex(&called));
}

/// The Offer that answers `request` (section 5.1: requests hold nothing, even at the limits).
fn offered(peer: &Peer, request: &[u8]) -> Offer {
    let (_, conn, _) = open(request);
    peer.send(request);
    let d = peer
        .recv(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no answer to the Request of {conn:#x}"));
    let (kind, from_conn, body) = open(&d);
    assert_eq!(from_conn, conn);
    if kind == 0x07 {
        let (code, reason) = read_error(body);
        panic!("the Request of {conn:#x} got Error {code}: {reason}");
    }
    assert_eq!(kind, 0x02, "the answer to a Request is an Offer");
    read_offer(body)
}

/// The next datagram for `conn`, as (kind, body), within `wait`.
fn answer(peer: &Peer, conn: u64, wait: Duration, what: &str) -> (u8, Vec<u8>) {
    let d = peer
        .recv(wait)
        .unwrap_or_else(|| panic!("{what}: nothing within {wait:?}"));
    let (kind, from_conn, body) = open(&d);
    assert_eq!(from_conn, conn, "{what}: on another connection");
    if kind == 0x08 {
        assert_eq!(d.len(), 24, "{what}: section 3: a Wait is 24 bytes");
    }
    (kind, body.to_vec())
}

/// Section 5.8 against a server that allows one transfer per IP address: client A (one port of
/// 127.0.0.1) downloads `map!` and has not sent its Done yet; client B (another port of the same
/// address) is offered the object all the same, its Start is answered with a Wait (place 1,
/// repeat every 1000 ms) and so is the Start it repeats 1000 ms later; once A's Done ends A's
/// transfer, the server sends B a Wait with place 0 unasked, and B's Start then gets the data.
#[test]
fn a_start_beyond_the_per_address_limit_waits_its_turn() {
    let served = serve_with(
        "conf-queue",
        udpferry::EndpointConfig {
            max_transfers_per_address: 1,
            ..udpferry::EndpointConfig::default()
        },
    );
    let mut a = Peer::new(served.server.addr);
    let mut b = Peer::new(served.server.addr);
    assert_eq!(
        a.socket.local_addr().unwrap().ip(),
        b.socket.local_addr().unwrap().ip()
    );
    let md5 = Id::md5(MAP);
    let (conn_a, conn_b) = (0x0bad_cafe_0000_0a01, 0x0bad_cafe_0000_0b01);
    // A holds the address's one slot: every chunk is here, and the server waits for the Done.
    let t = download(&a, &request_for(conn_a, &md5), MAP, &[]);
    assert_eq!(t.object, MAP);

    // B: a Request holds nothing, so it is offered as usual (section 5.8, rule 2).
    let req_b = request_for(conn_b, &md5);
    let offer = offered(&b, &req_b);
    let start_b = start(conn_b, offer.nonce, &req_b);
    b.send(&start_b);
    let (kind, body) = answer(&b, conn_b, Duration::from_secs(5), "B's Start");
    assert_eq!(kind, 0x08, "a valid Start beyond the limit gets a Wait");
    assert_eq!(
        read_wait(&body),
        (1, 1000),
        "first in line; repeat every 1000 ms"
    );
    // Nothing else: no Data while B waits.
    if let Some(d) = b.recv(Duration::from_millis(300)) {
        let (kind, conn, _) = open(&d);
        panic!("kind {kind} on {conn:#x} to a queued client");
    }
    // Section 5.2.2, step 6: B repeats its Start after retry_after_ms and keeps its place.
    std::thread::sleep(Duration::from_millis(700));
    b.send(&start_b);
    let (kind, body) = answer(&b, conn_b, Duration::from_secs(5), "B's repeated Start");
    assert_eq!(
        (kind, read_wait(&body)),
        (0x08, (1, 1000)),
        "the same place"
    );

    // A's Done ends A's transfer; the server holds the freed slot for B and tells it so.
    a.finish(conn_a);
    let (kind, body) = answer(
        &b,
        conn_b,
        Duration::from_secs(2),
        "the slot freed by A's Done",
    );
    assert_eq!(kind, 0x08, "an unasked Wait");
    assert_eq!(read_wait(&body), (0, 1000), "place 0: send the Start now");
    // B's Start (the same one: the nonce is good for 16 to 32 s) is admitted.
    b.send(&start_b);
    let (kind, body) = answer(&b, conn_b, Duration::from_secs(5), "B's admitted Start");
    assert_eq!(kind, 0x04, "Data for the admitted Start");
    let data = read_data(&body);
    assert_eq!((data.seq, data.chunk, data.payload), (0, 0, MAP));
    b.finish(conn_b);
    b.check_server_finished();
}

/// Section 5.8 with no queue (`max_waiting` 0): a valid Start beyond the per-address limit is
/// answered with Error 2 Busy, and so is a Request, since no slot fits and it could not wait.
#[test]
fn without_a_queue_a_start_beyond_the_limit_is_busy() {
    let served = serve_with(
        "conf-busy",
        udpferry::EndpointConfig {
            max_transfers_per_address: 1,
            max_waiting: 0,
            ..udpferry::EndpointConfig::default()
        },
    );
    let mut a = Peer::new(served.server.addr);
    let b = Peer::new(served.server.addr);
    let md5 = Id::md5(MAP);
    let (conn_a, conn_b, conn_b2) = (
        0x0bad_cafe_0000_0c01,
        0x0bad_cafe_0000_0d01,
        0x0bad_cafe_0000_0d02,
    );
    // B is offered the object while the address has no transfer.
    let req_b = request_for(conn_b, &md5);
    let offer = offered(&b, &req_b);
    // A takes the address's one slot.
    let t = download(&a, &request_for(conn_a, &md5), MAP, &[]);
    assert_eq!(t.object, MAP);
    // B's Start, its nonce good, finds no slot and no queue.
    b.send(&start(conn_b, offer.nonce, &req_b));
    for (conn, what) in [(conn_b, "B's Start"), (conn_b2, "B's second Request")] {
        if conn == conn_b2 {
            b.send(&request_for(conn_b2, &md5));
        }
        let d = b
            .recv(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{what}: no answer"));
        let (kind, from_conn, body) = open(&d);
        assert_eq!((kind, from_conn), (0x07, conn), "{what}: an Error");
        let (code, reason) = read_error(body);
        assert_eq!(code, 2, "{what}: Busy ({reason})");
        assert_eq!(d.len(), 21 + reason.len());
    }
    a.finish(conn_a);
    a.check_server_finished();
}
