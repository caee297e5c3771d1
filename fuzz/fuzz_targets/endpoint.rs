//! An endpoint serving one object and fetching another, fed arbitrary (source, datagram, time
//! step) sequences (each resealed with a valid CRC so they reach the state machines). Starts
//! echo the nonce of an offer the endpoint sent to that address and connection when the input
//! says so, so transfers get created past the stateless handshake, and path responses echo the
//! token of a challenge the endpoint sent to that address, so transfers migrate between the
//! input's addresses. Never a panic; state stays within the configured limits.
#![no_main]
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use udpferry::core::{Endpoint, EndpointConfig, RangeSet};
use udpferry::ObjectId;

fuzz_target!(|data: &[u8]| {
    let map: Arc<[u8]> = Arc::from(vec![3u8; 50_000]);
    let id = ObjectId::md5_of(&map);
    let mut maps = HashMap::new();
    maps.insert(id, map);
    let config = EndpointConfig {
        max_transfers: 8,
        max_transfers_per_address: 3,
        ..EndpointConfig::default()
    };
    let mut ep: Endpoint<_, Vec<u8>> = Endpoint::new(config, maps);
    let start = Instant::now();
    let mut now = start;
    ep.fetch(
        now,
        SocketAddr::from(([10, 0, 0, 9], 9)),
        ObjectId::md5_of(b"x"),
        &RangeSet::new(),
        Vec::new(),
    );
    let mut buf = vec![0u8; 2048];
    // Offers the endpoint sent: (to, connection id) -> nonce.
    let mut offers: HashMap<(SocketAddr, u64), u64> = HashMap::new();
    // Path challenges the endpoint sent: (to, connection id) -> token.
    let mut challenges: HashMap<(SocketAddr, u64), u64> = HashMap::new();
    // Records: [len][source][kind][step_ms][conn id byte][body...]
    let mut rest = data;
    while rest.len() >= 5 {
        let len = usize::from(rest[0]).min(rest.len() - 5);
        let from = SocketAddr::from(([10, 0, 0, rest[1] % 4], 1000 + u16::from(rest[1] >> 6)));
        let kind = rest[2] % 11;
        now += Duration::from_millis(u64::from(rest[3]));
        let conn = u64::from(rest[4] % 4);
        let body = &rest[5..5 + len];
        rest = &rest[5 + len..];
        let mut d = Vec::with_capacity(len + 18);
        d.extend_from_slice(b"UFRY\x01");
        d.push(kind);
        d.extend_from_slice(&conn.to_be_bytes());
        let request_body = |d: &mut Vec<u8>, served: bool| {
            d.push(1);
            d.extend_from_slice(if served { id.digest() } else { &[0u8; 16] });
            d.extend_from_slice(&1200u16.to_be_bytes());
            d.extend_from_slice(&[0u8; 10]);
        };
        let echo = offers.get(&(from, conn)).copied();
        let token = challenges.get(&(from, conn)).copied();
        if kind == 1 {
            // Half the requests name the served object, so offers get made.
            request_body(&mut d, body.first().is_some_and(|b| b & 1 == 0));
        } else if kind == 3 && echo.is_some() && body.first().is_some_and(|b| b & 3 != 0) {
            // Most Starts to an address that got an offer echo its nonce (so transfers get
            // created); the rest carry whatever the input says.
            d.extend_from_slice(&echo.unwrap_or(0).to_be_bytes());
            request_body(&mut d, true);
        } else if kind == 0x0A && token.is_some() && body.first().is_some_and(|b| b & 1 == 0) {
            // Half the path responses from a challenged address echo its token, so transfers
            // migrate between the input's addresses.
            d.extend_from_slice(&token.unwrap_or(0).to_be_bytes());
        } else {
            d.extend_from_slice(body);
        }
        let crc = crc32fast::hash(&d);
        d.extend_from_slice(&crc.to_be_bytes());
        ep.handle_datagram(now, from, &d);
        if ep.poll_timeout().is_some_and(|t| t <= now) {
            ep.handle_timeout(now);
        }
        while let Some(t) = ep.poll_transmit(now, &mut buf) {
            assert!(t.len <= 1200);
            if let Ok(d) = udpferry::wire::decode(&buf[..t.len]) {
                match d.frame {
                    udpferry::wire::Frame::Offer(o) => {
                        offers.insert((t.destination, d.conn_id.0), o.nonce);
                    }
                    udpferry::wire::Frame::PathChallenge(token) => {
                        challenges.insert((t.destination, d.conn_id.0), token);
                    }
                    _ => {}
                }
            }
        }
        while ep.poll_event().is_some() {}
        assert!(ep.transfer_count() <= 8);
    }
});
