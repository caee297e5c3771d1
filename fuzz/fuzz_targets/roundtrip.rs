//! Structured datagrams built from arbitrary input: every one that encodes decodes to the same
//! frame, and encoding never panics (values the format cannot hold are typed errors).
#![no_main]
use std::ops::Range;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use udpferry::wire::{
    self, Ack, AckRanges, ConnectionId, Data, Datagram, ErrorCode, ErrorFrame, Frame, HaveRanges,
    Offer, Request, Wait,
};
use udpferry::ObjectId;

#[derive(Arbitrary, Debug)]
enum Shape {
    Request { max: u16, rate: u64, have: Vec<(u64, u64)> },
    Offer { size: u64, chunk: u16, nonce: u64 },
    Start { nonce: u64, max: u16, have: Vec<(u64, u64)> },
    Data { seq: u64, time: u32, chunk: u32, payload: Vec<u8> },
    Ack { seq: u64, delay: u32, owd: u32, window: u32, cum: u32, ranges: Vec<(u32, u32)> },
    Done,
    Error { code: u16, reason: String },
    Wait { place: u32, retry_after_ms: u16 },
    PathChallenge { token: u64 },
    PathResponse { token: u64 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    conn: u64,
    digest: [u8; 16],
    shape: Shape,
}

/// Turns arbitrary pairs into ascending, disjoint, non-empty ranges starting at or above `from`
/// (gaps of at least `min_gap`).
fn ranges<T: Copy + Into<u64>>(pairs: &[(T, T)], from: u64, min_gap: u64) -> Vec<Range<u64>> {
    let mut at = from;
    let mut out = Vec::new();
    for &(gap, len) in pairs {
        let start = at.saturating_add(gap.into() % 1000).saturating_add(min_gap);
        let end = start.saturating_add(1 + len.into() % 1000);
        if end <= start || end == u64::MAX {
            break;
        }
        out.push(start..end);
        at = end;
    }
    out
}

fuzz_target!(|input: Input| {
    let object = ObjectId::Md5(input.digest);
    let mut buf = vec![0u8; 70_000];
    let (have, acked, reason);
    let frame = match &input.shape {
        Shape::Request { max, rate, have: h } => {
            have = ranges(h, 0, 0);
            Frame::Request(Request {
                object,
                max_datagram_size: *max,
                max_rate_bytes_per_sec: *rate,
                have: HaveRanges::List(&have),
            })
        }
        Shape::Offer { size, chunk, nonce } => Frame::Offer(Offer {
            object,
            size: *size,
            chunk_size: *chunk,
            nonce: *nonce,
        }),
        Shape::Start { nonce, max, have: h } => {
            have = ranges(h, 0, 0);
            Frame::Start {
                nonce: *nonce,
                request: Request {
                    object,
                    max_datagram_size: *max,
                    max_rate_bytes_per_sec: 0,
                    have: HaveRanges::List(&have),
                },
            }
        }
        Shape::Data { seq, time, chunk, payload } => Frame::Data(Data {
            seq: *seq,
            send_time_us: *time,
            chunk: *chunk,
            payload,
        }),
        Shape::Ack { seq, delay, owd, window, cum, ranges: r } => {
            acked = ranges(r, u64::from(*cum), 1);
            Frame::Ack(Ack {
                largest_seq: *seq,
                ack_delay_us: *delay,
                owd_us: *owd,
                window_end: *window,
                cumulative: *cum,
                ranges: AckRanges::List(&acked),
            })
        }
        Shape::Done => Frame::Done,
        Shape::Error { code, reason: r } => {
            reason = r.clone();
            Frame::Error(ErrorFrame {
                code: ErrorCode::from_u16(*code),
                reason: &reason,
            })
        }
        Shape::Wait { place, retry_after_ms } => Frame::Wait(Wait {
            place: *place,
            retry_after_ms: *retry_after_ms,
        }),
        Shape::PathChallenge { token } => Frame::PathChallenge(*token),
        Shape::PathResponse { token } => Frame::PathResponse(*token),
    };
    let datagram = Datagram {
        conn_id: ConnectionId(input.conn),
        frame,
    };
    let Ok(n) = datagram.encode(&mut buf) else {
        return; // a value the format cannot carry: a typed error, which is fine
    };
    match wire::decode(&buf[..n]) {
        Ok(back) => assert_eq!(back, datagram, "decode(encode(x)) != x"),
        // The encoder does not enforce what only the decoder validates (minimum datagram or
        // chunk size, range bounds): such frames must come back as typed errors, not panics.
        Err(_) => {}
    }
});
