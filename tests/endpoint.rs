//! The endpoint without sockets: accepting, refusing, reaping, sharing the uplink.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use udpferry::core::{Endpoint, EndpointConfig, Event, NoObjects, RangeSet, Role};
use udpferry::wire::{self, ConnectionId, Datagram, ErrorCode, Frame};
use udpferry::ObjectId;

type Maps = HashMap<ObjectId, Arc<[u8]>>;

fn maps(objects: &[&[u8]]) -> Maps {
    objects
        .iter()
        .map(|o| (ObjectId::md5_of(o), Arc::from(*o)))
        .collect()
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], port))
}

fn drain(ep: &mut Endpoint<Maps, Vec<u8>>, now: Instant) -> Vec<(SocketAddr, Vec<u8>)> {
    let mut buf = vec![0u8; 1500];
    let mut out = Vec::new();
    while let Some(t) = ep.poll_transmit(now, &mut buf) {
        out.push((t.destination, buf[..t.len].to_vec()));
    }
    out
}

/// Request, read the offer's nonce, Start: the transfer exists only after the Start. Returns the
/// datagrams the endpoint sent besides the offer (a Busy, say), and whether an offer came.
fn handshake(
    ep: &mut Endpoint<Maps, Vec<u8>>,
    now: Instant,
    from: SocketAddr,
    conn: u64,
    id: ObjectId,
) -> Option<u64> {
    ep.handle_datagram(now, from, &common::request_datagram(conn, id));
    let mut nonce = None;
    let mut buf = vec![0u8; 1500];
    while let Some(t) = ep.poll_transmit(now, &mut buf) {
        if let Ok(d) = wire::decode(&buf[..t.len]) {
            if let Frame::Offer(o) = d.frame {
                assert_eq!(t.destination, from);
                nonce = Some(o.nonce);
            }
        }
    }
    let nonce = nonce?;
    ep.handle_datagram(now, from, &common::start_datagram(conn, id, nonce));
    Some(nonce)
}

#[test]
fn unknown_objects_get_not_found_and_no_state() {
    let now = Instant::now();
    let mut ep: Endpoint<Maps, Vec<u8>> = Endpoint::new(EndpointConfig::default(), maps(&[b"map"]));
    ep.handle_datagram(
        now,
        addr(1),
        &common::request_datagram(7, ObjectId::md5_of(b"other")),
    );
    let out = drain(&mut ep, now);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, addr(1));
    let d = wire::decode(&out[0].1).unwrap();
    assert_eq!(d.conn_id, ConnectionId(7));
    assert!(matches!(d.frame, Frame::Error(e) if e.code == ErrorCode::NotFound));
    assert_eq!(ep.transfer_count(), 0);
    assert_eq!(ep.stats().not_found, 1);
}

#[test]
fn limits_per_address_and_in_total_answer_busy() {
    let now = Instant::now();
    let config = EndpointConfig {
        max_transfers: 3,
        max_transfers_per_address: 2,
        // No admission queue: beyond a limit is "busy" (the queue is tested below).
        max_waiting: 0,
        ..EndpointConfig::default()
    };
    let id = ObjectId::md5_of(b"map");
    let mut ep: Endpoint<Maps, Vec<u8>> = Endpoint::new(config, maps(&[b"map"]));
    let mut busy = 0;
    let mut count_busy = |ep: &mut Endpoint<Maps, Vec<u8>>| {
        busy += drain(ep, now)
            .into_iter()
            .filter(|(_, d)| matches!(wire::decode(d).unwrap().frame, Frame::Error(e) if e.code == ErrorCode::Busy))
            .count();
    };
    for conn in 0..2 {
        assert!(handshake(&mut ep, now, addr(1), conn, id).is_some());
    }
    assert_eq!(ep.transfer_count(), 2);
    assert!(
        handshake(&mut ep, now, addr(1), 2, id).is_none(),
        "third request from the same address gets no offer"
    );
    assert_eq!(ep.transfer_count(), 2);
    assert!(handshake(&mut ep, now, SocketAddr::from(([10, 0, 0, 2], 1)), 9, id).is_some());
    assert!(handshake(&mut ep, now, SocketAddr::from(([10, 0, 0, 3], 1)), 9, id).is_none());
    assert_eq!(ep.transfer_count(), 3, "the total limit holds");
    assert_eq!(ep.stats().busy, 2);
    // (handshake drained the Busy replies; the counter shows them.)
    count_busy(&mut ep);
    assert_eq!(busy, 0, "nothing else queued");
}

/// The Waits in `datagrams` to `to`: each one's place.
fn places(datagrams: &[(SocketAddr, Vec<u8>)], to: SocketAddr) -> Vec<u32> {
    datagrams
        .iter()
        .filter(|(dest, _)| *dest == to)
        .filter_map(|(_, d)| match wire::decode(d).ok()?.frame {
            Frame::Wait(w) => Some(w.place),
            _ => None,
        })
        .collect()
}

/// Beyond the limits a validated Start waits in a FIFO queue and is told its place; repeating
/// the Start keeps it; a freed slot is held for the first in line that fits, who is told to
/// start at once; the queue is bounded (beyond it: busy) and forgets a client that stops
/// repeating its Start.
#[test]
fn starts_beyond_the_limits_wait_in_a_bounded_fifo_queue() {
    let t0 = Instant::now();
    let config = EndpointConfig {
        max_transfers: 8,
        max_transfers_per_address: 1,
        max_waiting: 2,
        ..EndpointConfig::default()
    };
    let id = ObjectId::md5_of(b"map");
    let mut ep: Endpoint<Maps, Vec<u8>> = Endpoint::new(config, maps(&[b"map"]));
    let a = addr(1);
    assert!(handshake(&mut ep, t0, a, 0, id).is_some());
    assert_eq!(ep.transfer_count(), 1);
    drain(&mut ep, t0);
    // Two more from the same address: offered (requests hold nothing), then queued in order.
    let n1 = handshake(&mut ep, t0, a, 1, id).expect("an offer");
    assert_eq!(places(&drain(&mut ep, t0), a), vec![1]);
    let n2 = handshake(&mut ep, t0, a, 2, id).expect("an offer");
    assert_eq!(places(&drain(&mut ep, t0), a), vec![2]);
    assert_eq!(ep.transfer_count(), 1, "queued Starts hold no transfer");
    // A fourth finds the queue full: busy.
    handshake(&mut ep, t0, a, 3, id);
    assert_eq!(ep.stats().busy, 1);
    assert_eq!(ep.stats().queued, 2);
    // Another address fits at once: a client at its per-address limit does not hold it up.
    let other = SocketAddr::from(([10, 0, 0, 2], 1));
    assert!(handshake(&mut ep, t0, other, 0, id).is_some());
    assert_eq!(ep.transfer_count(), 2);
    drain(&mut ep, t0);
    // Repeating the Start keeps the place.
    let t1 = t0 + Duration::from_millis(900);
    ep.handle_datagram(t1, a, &common::start_datagram(2, id, n2));
    assert_eq!(places(&drain(&mut ep, t1), a), vec![2]);
    // The running transfer from `a` is cancelled: its slot is held for the first in line,
    // which is told to start now (place 0); the second moves up when it repeats.
    let first = ep.transfers().find(|t| t.peer == a).map(|t| t.id).unwrap();
    ep.cancel(first);
    let t2 = t1 + Duration::from_millis(100);
    let mut now = t2;
    let mut sent = Vec::new();
    while ep.transfer_count() == 2 {
        // Drain until the cancelled transfer is reaped and the first waiter called.
        sent.extend(drain(&mut ep, now));
        ep.handle_timeout(now);
        now += Duration::from_millis(10);
        assert!(
            now < t2 + Duration::from_secs(5),
            "the cancelled transfer was never reaped"
        );
    }
    sent.extend(drain(&mut ep, now));
    let called = places(&sent, a);
    assert!(
        called.contains(&0),
        "the first in line is told to start: {called:?}"
    );
    // Nobody else can take the held slot: the second waiter's repeat keeps it waiting.
    ep.handle_datagram(now, a, &common::start_datagram(2, id, n2));
    assert_eq!(places(&drain(&mut ep, now), a), vec![2]);
    assert_eq!(ep.transfer_count(), 1);
    // The called waiter starts, and the second is first in line.
    ep.handle_datagram(now, a, &common::start_datagram(1, id, n1));
    assert_eq!(
        ep.transfer_count(),
        2,
        "the called waiter's Start is admitted"
    );
    drain(&mut ep, now);
    ep.handle_datagram(now, a, &common::start_datagram(2, id, n2));
    assert_eq!(places(&drain(&mut ep, now), a), vec![1]);
    // A waiter that stops repeating is forgotten after three intervals.
    let later = now + Duration::from_secs(4);
    ep.handle_timeout(later);
    assert_eq!(ep.stats().queue_expired, 1);
}

/// A waiter whose offer expired (its nonce no longer checks out) is offered again, never
/// refused, even when the queue is full: it keeps its place.
#[test]
fn a_waiter_whose_offer_expired_is_offered_again_not_refused() {
    let t0 = Instant::now();
    let config = EndpointConfig {
        max_transfers_per_address: 1,
        max_waiting: 1,
        ..EndpointConfig::default()
    };
    let id = ObjectId::md5_of(b"map");
    let mut ep: Endpoint<Maps, Vec<u8>> = Endpoint::new(config, maps(&[b"map"]));
    let a = addr(1);
    assert!(handshake(&mut ep, t0, a, 0, id).is_some());
    drain(&mut ep, t0);
    handshake(&mut ep, t0, a, 1, id).expect("an offer");
    assert_eq!(
        places(&drain(&mut ep, t0), a),
        vec![1],
        "queued; the queue is now full"
    );
    // Its repeat carries a nonce that no longer checks out (an expired offer, say).
    let t1 = t0 + Duration::from_millis(900);
    ep.handle_datagram(t1, a, &common::start_datagram(1, id, 12345));
    let answers: Vec<Frame> = drain(&mut ep, t1)
        .iter()
        .filter_map(|(_, d)| wire::decode(d).ok().map(|d| d.frame))
        .map(|f| match f {
            Frame::Offer(o) => Frame::Offer(o),
            Frame::Error(e) => {
                assert_ne!(e.code, ErrorCode::Busy, "a waiter is never refused");
                Frame::Done
            }
            other => panic!("unexpected answer {other:?}"),
        })
        .collect();
    assert!(
        answers.iter().any(|f| matches!(f, Frame::Offer(_))),
        "a fresh offer: {answers:?}"
    );
    assert_eq!(ep.stats().busy, 0);
}

/// A flood of validated Starts (clients that prove their address, then never go away) cannot
/// grow the queue past `max_waiting`: beyond it they are answered "busy", and the queue forgets
/// them all once they stop repeating. Forged Starts never get in at all.
#[test]
fn a_flood_of_starts_fills_the_queue_only_to_its_bound() {
    let t0 = Instant::now();
    let config = EndpointConfig {
        max_requests_per_address_per_sec: 0,
        ..EndpointConfig::default()
    };
    let (max_transfers, max_waiting) = (config.max_transfers, config.max_waiting);
    let id = ObjectId::md5_of(b"map");
    let mut ep: Endpoint<Maps, Vec<u8>> = Endpoint::new(config, maps(&[b"map"]));
    // Forged: Starts with nonces nobody was given.
    for conn in 0..5_000u64 {
        let from = SocketAddr::from(([10, 1, (conn >> 8) as u8, conn as u8], 9));
        ep.handle_datagram(t0, from, &common::start_datagram(conn, id, conn * 7919));
        drain(&mut ep, t0);
    }
    assert_eq!(ep.stats().queued, 0, "an unproved address never waits");
    assert_eq!(ep.transfer_count(), 0);
    // Proved: 2000 clients from 250 addresses, 8 each.
    let clients = 2_000u64;
    for conn in 0..clients {
        let from = SocketAddr::from(([10, 2, 0, (conn / 8) as u8], 9));
        handshake(&mut ep, t0, from, conn, id);
        drain(&mut ep, t0);
    }
    let stats = ep.stats().clone();
    println!(
        "{clients} proved clients: {} transfers, {} queued, {} busy",
        ep.transfer_count(),
        stats.queued,
        stats.busy
    );
    assert_eq!(ep.transfer_count(), max_transfers);
    assert_eq!(
        stats.queued as usize, max_waiting,
        "the queue stops at its bound"
    );
    assert_eq!(
        stats.busy as usize,
        clients as usize - max_transfers - max_waiting,
        "beyond the bound: busy"
    );
    // They never repeat their Starts: all forgotten.
    ep.handle_timeout(t0 + Duration::from_secs(4));
    assert_eq!(ep.stats().queue_expired as usize, max_waiting);
}

#[test]
fn a_start_is_accepted_only_with_the_nonce_offered_to_that_address_and_request() {
    let now = Instant::now();
    let id = ObjectId::md5_of(b"map");
    let other = ObjectId::md5_of(b"other map");
    let mut ep: Endpoint<Maps, Vec<u8>> =
        Endpoint::new(EndpointConfig::default(), maps(&[b"map", b"other map"]));
    ep.handle_datagram(now, addr(1), &common::request_datagram(4, id));
    let offer = drain(&mut ep, now);
    let Frame::Offer(o) = wire::decode(&offer[0].1).unwrap().frame else {
        panic!("expected an offer");
    };
    assert_eq!(ep.transfer_count(), 0, "a request alone creates no state");
    // Wrong nonce, other address, other connection id, other object: all dropped.
    ep.handle_datagram(now, addr(1), &common::start_datagram(4, id, o.nonce ^ 1));
    ep.handle_datagram(now, addr(2), &common::start_datagram(4, id, o.nonce));
    ep.handle_datagram(now, addr(1), &common::start_datagram(5, id, o.nonce));
    ep.handle_datagram(now, addr(1), &common::start_datagram(4, other, o.nonce));
    assert_eq!(ep.transfer_count(), 0);
    assert_eq!(ep.stats().bad_starts, 4);
    // Still good in the next cookie period, not after that.
    let later = now + Duration::from_secs(20);
    ep.handle_datagram(later, addr(1), &common::start_datagram(4, id, o.nonce));
    assert_eq!(
        ep.transfer_count(),
        1,
        "the right Start starts the transfer"
    );
    let stale = now + Duration::from_secs(40);
    ep.handle_datagram(now, addr(3), &common::request_datagram(6, id));
    let Frame::Offer(o3) = wire::decode(&drain(&mut ep, now)[0].1).unwrap().frame else {
        panic!("expected an offer");
    };
    ep.handle_datagram(stale, addr(3), &common::start_datagram(6, id, o3.nonce));
    assert_eq!(
        ep.transfer_count(),
        1,
        "a nonce from two periods ago is refused"
    );
}

#[test]
fn requests_beyond_the_per_address_rate_are_dropped() {
    let now = Instant::now();
    let id = ObjectId::md5_of(b"map");
    let config = EndpointConfig {
        max_requests_per_address_per_sec: 5,
        max_pending_replies: 1000,
        ..EndpointConfig::default()
    };
    let mut ep: Endpoint<Maps, Vec<u8>> = Endpoint::new(config, maps(&[b"map"]));
    for conn in 0..50 {
        ep.handle_datagram(now, addr(1), &common::request_datagram(conn, id));
    }
    assert_eq!(drain(&mut ep, now).len(), 5, "a burst of 5, then nothing");
    assert_eq!(ep.stats().rate_limited, 45);
    // Another IP address has its own bucket (another port on the same IP does not); the first
    // refills at 5 per second.
    let elsewhere = SocketAddr::from(([10, 0, 0, 2], 1));
    ep.handle_datagram(now, elsewhere, &common::request_datagram(1, id));
    ep.handle_datagram(now, addr(2), &common::request_datagram(1, id));
    let later = now + Duration::from_millis(400);
    for conn in 100..110 {
        ep.handle_datagram(later, addr(1), &common::request_datagram(conn, id));
    }
    let out = drain(&mut ep, later);
    let to = |a: SocketAddr| out.iter().filter(|(d, _)| *d == a).count();
    assert_eq!(
        (to(elsewhere), to(addr(2)), to(addr(1))),
        (1, 0, 2),
        "two tokens earned in 0.4 s"
    );
}

/// A multi-source client asks each server for piece after piece on one socket. Once that
/// address and port has a transfer (it proved its address with a Start), its requests are not
/// counted against the per-address rate: they cannot be forged to reach anyone else, and an
/// Offer is barely larger than a Request. Another port on the same IP is still limited.
#[test]
fn a_peer_with_a_transfer_asks_for_more_without_the_rate_limit() {
    let now = Instant::now();
    let id = ObjectId::md5_of(b"map");
    let config = EndpointConfig {
        max_requests_per_address_per_sec: 5,
        max_pending_replies: 1000,
        max_transfers_per_address: 100,
        ..EndpointConfig::default()
    };
    let mut ep: Endpoint<Maps, Vec<u8>> = Endpoint::new(config, maps(&[b"map"]));
    assert!(handshake(&mut ep, now, addr(1), 1, id).is_some());
    assert_eq!(ep.transfer_count(), 1);
    drain(&mut ep, now);
    for conn in 10..30 {
        ep.handle_datagram(now, addr(1), &common::request_datagram(conn, id));
        ep.handle_datagram(now, addr(2), &common::request_datagram(conn, id));
    }
    let out = drain(&mut ep, now);
    let offers_to = |a: SocketAddr| {
        out.iter()
            .filter(|(d, bytes)| {
                *d == a && matches!(wire::decode(bytes).map(|d| d.frame), Ok(Frame::Offer(_)))
            })
            .count()
    };
    assert_eq!(
        (offers_to(addr(1)), offers_to(addr(2))),
        (20, 4),
        "the peer with a transfer is answered every time; the other port shares what is left of the bucket"
    );
}

#[test]
fn garbage_and_stray_datagrams_create_no_state() {
    let now = Instant::now();
    let mut ep: Endpoint<Maps, Vec<u8>> = Endpoint::new(EndpointConfig::default(), maps(&[b"map"]));
    ep.handle_datagram(now, addr(1), b"hello, not ours");
    let mut buf = [0u8; 64];
    let n = Datagram {
        conn_id: ConnectionId(3),
        frame: Frame::Done,
    }
    .encode(&mut buf)
    .unwrap();
    ep.handle_datagram(now, addr(1), &buf[..n]);
    assert_eq!(ep.transfer_count(), 0);
    assert_eq!(ep.stats().malformed, 1);
    assert_eq!(ep.stats().unknown_connection, 1);
    assert!(drain(&mut ep, now).is_empty(), "never answer garbage");
}

#[test]
fn a_client_that_requests_and_vanishes_gets_one_offer_and_leaves_no_state() {
    let now = Instant::now();
    let mut ep: Endpoint<Maps, Vec<u8>> = Endpoint::new(EndpointConfig::default(), maps(&[b"map"]));
    let request = common::request_datagram(1, ObjectId::md5_of(b"map"));
    ep.handle_datagram(now, addr(1), &request);
    assert_eq!(ep.transfer_count(), 0);
    let out = drain(&mut ep, now);
    let sent_bytes: usize = out.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(out.len(), 1, "one offer");
    // Anti-amplification: an address that never proved itself gets at most 3x what it sent.
    assert!(
        sent_bytes <= 3 * request.len(),
        "{sent_bytes} bytes sent for a {}-byte request",
        request.len()
    );
    assert_eq!(ep.poll_timeout(), None, "nothing to wake for");
}

#[test]
fn a_client_that_starts_and_vanishes_is_reaped() {
    let start = Instant::now();
    let mut ep: Endpoint<Maps, Vec<u8>> = Endpoint::new(EndpointConfig::default(), maps(&[b"map"]));
    assert!(handshake(&mut ep, start, addr(1), 1, ObjectId::md5_of(b"map")).is_some());
    assert_eq!(ep.transfer_count(), 1);
    let mut now = start;
    for _ in 0..1000 {
        drain(&mut ep, now);
        let Some(t) = ep.poll_timeout() else { break };
        assert!(t >= now, "timers never go backwards");
        now = t;
        ep.handle_timeout(now);
    }
    drain(&mut ep, now);
    assert_eq!(ep.transfer_count(), 0, "reaped");
    assert_eq!(ep.poll_timeout(), None, "nothing left to wake for");
    assert!(now - start <= Duration::from_secs(16));
    let failed = std::iter::from_fn(|| ep.poll_event())
        .any(|e| e.role == Role::Serving && matches!(e.event, Event::Failed(_)));
    assert!(failed);
}

#[test]
fn a_fetch_through_two_endpoints_completes_and_hands_back_the_sink() {
    // Client and server endpoints wired back to back, lossless, virtual time.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    let id = ObjectId::md5_of(&data);
    let mut server: Endpoint<Maps, Vec<u8>> =
        Endpoint::new(EndpointConfig::default(), maps(&[&data]));
    let mut client: Endpoint<NoObjects, Vec<u8>> = Endpoint::new(
        EndpointConfig {
            seed: 5,
            ..EndpointConfig::default()
        },
        NoObjects,
    );
    let (server_addr, client_addr) = (addr(1), addr(2));
    let mut now = Instant::now();
    let transfer = client.fetch(now, server_addr, id, &RangeSet::new(), Vec::new());
    let mut buf = vec![0u8; 1500];
    let mut done = false;
    for _ in 0..100_000 {
        while let Some(t) = client.poll_transmit(now, &mut buf) {
            assert_eq!(t.destination, server_addr);
            server.handle_datagram(now, client_addr, &buf[..t.len]);
        }
        while let Some(t) = server.poll_transmit(now, &mut buf) {
            assert_eq!(t.destination, client_addr);
            client.handle_datagram(now, server_addr, &buf[..t.len]);
        }
        while let Some(e) = client.poll_event() {
            if matches!(e.event, Event::Completed(_)) {
                done = true;
            }
        }
        if done {
            break;
        }
        let next = [client.poll_timeout(), server.poll_timeout()]
            .into_iter()
            .flatten()
            .min();
        if let Some(t) = next {
            now = now.max(t);
            client.handle_timeout(now);
            server.handle_timeout(now);
        }
    }
    assert!(done);
    assert_eq!(client.take_sink(transfer), Some(data));
    assert_eq!(client.take_sink(transfer), None, "taken once");
}

/// Drives one server and several clients with zero-latency links in virtual time; datagrams to
/// or from client `i` are dropped with probability `loss[i]`. Returns when each client's
/// download completed (seconds since start).
fn serve_clients(
    server_config: EndpointConfig,
    objects: &[Vec<u8>],
    loss: &[f64],
) -> Vec<Option<f64>> {
    let maps: Maps = objects
        .iter()
        .map(|o| (ObjectId::md5_of(o), Arc::from(o.as_slice())))
        .collect();
    let mut server: Endpoint<Maps, Vec<u8>> = Endpoint::new(server_config, maps);
    let server_addr = addr(1);
    let start = Instant::now();
    let mut now = start;
    let mut clients: Vec<Endpoint<NoObjects, Vec<u8>>> = (0..objects.len())
        .map(|i| {
            Endpoint::new(
                EndpointConfig {
                    seed: i as u128 + 100,
                    ..EndpointConfig::default()
                },
                NoObjects,
            )
        })
        .collect();
    for (c, o) in clients.iter_mut().zip(objects) {
        c.fetch(
            now,
            server_addr,
            ObjectId::md5_of(o),
            &RangeSet::new(),
            Vec::new(),
        );
    }
    let mut rng = udpferry_sim::Rng::new(7);
    let mut done = vec![None; objects.len()];
    let mut buf = vec![0u8; 1500];
    let latency = Duration::from_millis(5);
    // In-flight datagrams: (arrival, to client index or None for the server, from, bytes).
    let mut flight: Vec<(Instant, Option<usize>, SocketAddr, Vec<u8>)> = Vec::new();
    for _ in 0..5_000_000 {
        for (i, c) in clients.iter_mut().enumerate() {
            while let Some(t) = c.poll_transmit(now, &mut buf) {
                if !rng.chance(loss[i]) {
                    flight.push((
                        now + latency,
                        None,
                        addr(10 + i as u16),
                        buf[..t.len].to_vec(),
                    ));
                }
            }
            while let Some(e) = c.poll_event() {
                if matches!(e.event, Event::Completed(_)) {
                    done[i] = Some((now - start).as_secs_f64());
                }
            }
        }
        while let Some(t) = server.poll_transmit(now, &mut buf) {
            let i = (t.destination.port() - 10) as usize;
            if !rng.chance(loss[i]) {
                flight.push((now + latency, Some(i), server_addr, buf[..t.len].to_vec()));
            }
        }
        if done.iter().all(|d| d.is_some()) {
            break;
        }
        let next_arrival = flight.iter().map(|f| f.0).min();
        let timers = clients
            .iter()
            .filter_map(|c| c.poll_timeout())
            .chain(server.poll_timeout());
        let Some(next) = timers.chain(next_arrival).min() else {
            break;
        };
        now = now.max(next);
        let (due, rest): (Vec<_>, Vec<_>) = flight.into_iter().partition(|f| f.0 <= now);
        flight = rest;
        for (_, to, from, d) in due {
            match to {
                Some(i) => clients[i].handle_datagram(now, from, &d),
                None => server.handle_datagram(now, from, &d),
            }
        }
        server.handle_timeout(now);
        for c in &mut clients {
            c.handle_timeout(now);
        }
    }
    done
}

#[test]
fn a_lossy_client_does_not_slow_the_others() {
    let objects: Vec<Vec<u8>> = (0..3u32)
        .map(|i| {
            (0..3_000_000u32)
                .map(|j| (j.wrapping_mul(31) ^ i) as u8)
                .collect()
        })
        .collect();
    let config = EndpointConfig {
        rate_limit_bytes_per_sec: 3 << 20,
        ..EndpointConfig::default()
    };
    let clean = serve_clients(config.clone(), &objects, &[0.0, 0.0, 0.0]);
    let lossy = serve_clients(config, &objects, &[0.0, 0.0, 0.3]);
    println!("all clean: {clean:?} s; third client at 30% loss: {lossy:?} s");
    // The two clean clients finish no later than when all three shared the cap evenly.
    for i in 0..2 {
        assert!(
            lossy[i].unwrap() <= clean[i].unwrap() * 1.02,
            "{clean:?} vs {lossy:?}"
        );
    }
}

/// On a 200 ms path the client sends its first Request and its first Start twice, 10 ms apart
/// (PROTOCOL.md section 5.2.2): the server answers both Requests with the same Offer, admits
/// one transfer, counts neither copy as a bad Start or against the request rate, and the
/// download completes.
#[test]
fn handshake_copies_reach_the_server_as_one_transfer() {
    use udpferry_sim::{EndpointPeer, LinkConfig, Pair, RunOutcome};
    let data = common::object(300_000, 5);
    let id = ObjectId::md5_of(&data);
    let (server_addr, client_addr) = (addr(7878), addr(5000));
    let server: EndpointPeer<Maps, Vec<u8>> = EndpointPeer::new(
        Endpoint::new(EndpointConfig::default(), maps(&[&data])),
        client_addr,
    );
    let client: EndpointPeer<NoObjects, Vec<u8>> = EndpointPeer::new(
        Endpoint::new(
            EndpointConfig {
                seed: 9,
                ..EndpointConfig::default()
            },
            NoObjects,
        ),
        server_addr,
    );
    let start = Instant::now();
    let link = LinkConfig::clean(Duration::from_millis(100));
    let mut pair = Pair::new(1, start, server, client, link.clone(), link);
    let t = pair
        .b
        .endpoint
        .fetch(start, server_addr, id, &RangeSet::new(), Vec::new());
    let outcome = pair.run(u64::MAX, start + Duration::from_secs(60));
    assert_eq!(outcome, RunOutcome::BothFinished);
    assert!(
        pair.b
            .events
            .iter()
            .any(|(_, e)| e.transfer == t && matches!(e.event, Event::Completed(_))),
        "{:?}",
        pair.b.events
    );
    assert_eq!(pair.b.finished.first(), Some(&data));
    let s = pair.a.endpoint.stats();
    assert_eq!(
        (s.offers, s.accepted, s.bad_starts, s.rate_limited),
        (2, 1, 0, 0),
        "{s:?}"
    );
}
