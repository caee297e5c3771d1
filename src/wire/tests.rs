use std::ops::Range;

use proptest::prelude::*;

use super::frames::{encode_data_in_place, DATA_PAYLOAD_OFFSET};
use super::*;
use crate::id::ObjectId;

fn id() -> ObjectId {
    ObjectId::md5_of(b"map")
}

fn round_trip(d: &Datagram<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    let n = d.encode(&mut buf).expect("encode");
    buf.truncate(n);
    let back = decode(&buf).expect("decode");
    assert_eq!(&back, d);
    assert!(is_udpferry_datagram(&buf));
    buf
}

fn hex(bytes: &[u8]) -> String {
    crate::id::hex(bytes)
}

#[test]
fn every_kind_round_trips() {
    let have = [0..10, 20..4096];
    let ack_ranges = [12..14, 100..101, 70_000..1_000_000];
    let frames = [
        Frame::Request(Request {
            object: id(),
            max_datagram_size: 1200,
            max_rate_bytes_per_sec: 1 << 20,
            have: HaveRanges::List(&have),
        }),
        Frame::Offer(Offer {
            object: id(),
            size: 1 << 40,
            chunk_size: 1166,
            nonce: 0xdead_beef,
        }),
        Frame::Start {
            nonce: 7,
            request: Request {
                object: id(),
                max_datagram_size: 1200,
                max_rate_bytes_per_sec: 0,
                have: HaveRanges::List(&have),
            },
        },
        Frame::Data(Data {
            seq: 1,
            send_time_us: 2,
            chunk: 3,
            payload: b"hello",
        }),
        Frame::Ack(Ack {
            largest_seq: 99,
            ack_delay_us: 250,
            owd_us: 12345,
            window_end: 5000,
            cumulative: 10,
            ranges: AckRanges::List(&ack_ranges),
        }),
        Frame::Done,
        Frame::Error(ErrorFrame {
            code: ErrorCode::NotFound,
            reason: "no such map",
        }),
    ];
    for frame in frames {
        round_trip(&Datagram {
            conn_id: ConnectionId(0x0102_0304_0506_0708),
            frame,
        });
    }
}

/// The worked examples in docs/PROTOCOL.md are these bytes; if this test changes, update the doc.
#[test]
fn golden_data_and_ack_match_protocol_doc() {
    let data = round_trip(&Datagram {
        conn_id: ConnectionId(0x1122_3344_5566_7788),
        frame: Frame::Data(Data {
            seq: 42,
            send_time_us: 1_000_000,
            chunk: 7,
            payload: b"map!",
        }),
    });
    assert_eq!(
        hex(&data),
        "5546525901041122334455667788000000000000002a000f424000000007\
         6d617021a183c15b"
    );
    let ranges = [9..11, 15..16];
    let ack = round_trip(&Datagram {
        conn_id: ConnectionId(0x1122_3344_5566_7788),
        frame: Frame::Ack(Ack {
            largest_seq: 42,
            ack_delay_us: 500,
            owd_us: 20_000,
            window_end: 4096,
            cumulative: 7,
            ranges: AckRanges::List(&ranges),
        }),
    });
    assert_eq!(
        hex(&ack),
        "5546525901051122334455667788000000000000002a000001f400004e20\
         000010000000000702020204015ab2d34b"
    );
}

/// The handshake examples of docs/PROTOCOL.md sections 6.3 to 6.5 (the object `map!`); if this
/// test changes, update the doc (tests/conformance.rs reads the doc's hex and checks it too).
#[test]
fn golden_handshake_matches_protocol_doc() {
    let conn_id = ConnectionId(0x1122_3344_5566_7788);
    let nonce = 0x0123_4567_89ab_cdef;
    let cases = [
        (
            ObjectId::md5_of(b"map!"),
            [
                "5546525901011122334455667788 01f0a87e38a0288e12550da21e4d5344d0 04b0 \
                 0000000000000000 0000 8caa777f",
                "5546525901021122334455667788 01f0a87e38a0288e12550da21e4d5344d0 \
                 0000000000000004 048e 0123456789abcdef 6653c0c0",
                "5546525901031122334455667788 0123456789abcdef \
                 01f0a87e38a0288e12550da21e4d5344d0 04b0 0000000000000000 0000 fd7f1960",
            ],
        ),
        (
            ObjectId::sha256_of(b"map!"),
            [
                "5546525901011122334455667788 \
                 02f7e8b0b0fff507d5d7452ad91fe02df8205219aa39c77d08ad113dc583db5080 04b0 \
                 0000000000000000 0000 110c3145",
                "5546525901021122334455667788 \
                 02f7e8b0b0fff507d5d7452ad91fe02df8205219aa39c77d08ad113dc583db5080 \
                 0000000000000004 048e 0123456789abcdef 73b7f9ee",
                "5546525901031122334455667788 0123456789abcdef \
                 02f7e8b0b0fff507d5d7452ad91fe02df8205219aa39c77d08ad113dc583db5080 04b0 \
                 0000000000000000 0000 9135da64",
            ],
        ),
    ];
    let squeeze = |s: &str| s.split_whitespace().collect::<String>();
    for (object, [request_hex, offer_hex, start_hex]) in cases {
        let request = Request {
            object,
            max_datagram_size: 1200,
            max_rate_bytes_per_sec: 0,
            have: HaveRanges::List(&[]),
        };
        let bytes = round_trip(&Datagram {
            conn_id,
            frame: Frame::Request(request.clone()),
        });
        assert_eq!(hex(&bytes), squeeze(request_hex));
        let bytes = round_trip(&Datagram {
            conn_id,
            frame: Frame::Offer(Offer {
                object,
                size: 4,
                chunk_size: 1166,
                nonce,
            }),
        });
        assert_eq!(hex(&bytes), squeeze(offer_hex));
        let bytes = round_trip(&Datagram {
            conn_id,
            frame: Frame::Start { nonce, request },
        });
        assert_eq!(hex(&bytes), squeeze(start_hex));
    }
    let data = round_trip(&Datagram {
        conn_id,
        frame: Frame::Data(Data {
            seq: 0,
            send_time_us: 250,
            chunk: 0,
            payload: b"map!",
        }),
    });
    assert_eq!(
        hex(&data),
        "5546525901041122334455667788 0000000000000000 000000fa 00000000 6d617021 4e7f59c0"
            .replace(' ', "")
    );
    let done = round_trip(&Datagram {
        conn_id,
        frame: Frame::Done,
    });
    assert_eq!(hex(&done), "5546525901061122334455667788d42a996c");
    let error = round_trip(&Datagram {
        conn_id,
        frame: Frame::Error(ErrorFrame {
            code: ErrorCode::NotFound,
            reason: "no such object",
        }),
    });
    assert_eq!(
        hex(&error),
        "5546525901071122334455667788 0001 0e 6e6f2073756368206f626a656374 0fcd9561"
            .replace(' ', "")
    );
}

/// docs/PROTOCOL.md sections 1.3 and 1.4: the CRC32 check value, and the varint examples both
/// ways (a longer-than-needed encoding decodes too).
#[test]
fn checksum_and_varint_examples_match_protocol_doc() {
    use super::cursor::{Reader, Writer};
    assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
    for (value, encoded) in [
        (37u64, "25"),
        (300, "412c"),
        (16_384, "80004000"),
        (70_000, "80011170"),
        ((1 << 32) - 1, "c0000000ffffffff"),
    ] {
        let mut buf = [0u8; 8];
        let mut w = Writer::new(&mut buf);
        w.varint(value).unwrap();
        let n = w.position();
        assert_eq!(hex(&buf[..n]), encoded);
        let mut r = Reader::new(&buf[..n], "varint");
        assert_eq!(r.varint(), Ok(value));
        r.finish().unwrap();
    }
    assert_eq!(Reader::new(&[0x40, 0x02], "varint").varint(), Ok(2));
}

/// Every error code of docs/PROTOCOL.md section 3.7 decodes to itself, and so does an unknown
/// one: no code makes an Error datagram undecodable.
#[test]
fn every_error_code_decodes() {
    let named = [
        (1, ErrorCode::NotFound),
        (2, ErrorCode::Busy),
        (3, ErrorCode::BadRequest),
        (4, ErrorCode::DigestMismatch),
        (5, ErrorCode::Cancelled),
        (6, ErrorCode::TooLarge),
        (7, ErrorCode::ProtocolViolation),
        (8, ErrorCode::Internal),
    ];
    for n in [0u16, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0xffff] {
        let code = ErrorCode::from_u16(n);
        let expected = named
            .iter()
            .find(|(m, _)| *m == n)
            .map_or(ErrorCode::Other(n), |(_, c)| *c);
        assert_eq!(code, expected);
        assert_eq!(code.to_u16(), n);
        let bytes = round_trip(&Datagram {
            conn_id: ConnectionId(9),
            frame: Frame::Error(ErrorFrame { code, reason: "" }),
        });
        assert_eq!(&bytes[14..17], &[(n >> 8) as u8, n as u8, 0]);
    }
}

#[test]
fn in_place_data_matches_encode() {
    let payload = [0xabu8; 300];
    let mut a = vec![0u8; 1200];
    a[DATA_PAYLOAD_OFFSET..DATA_PAYLOAD_OFFSET + payload.len()].copy_from_slice(&payload);
    let n = encode_data_in_place(&mut a, ConnectionId(5), 6, 7, 8, payload.len()).unwrap();
    let mut b = vec![0u8; 1200];
    let m = Datagram {
        conn_id: ConnectionId(5),
        frame: Frame::Data(Data {
            seq: 6,
            send_time_us: 7,
            chunk: 8,
            payload: &payload,
        }),
    }
    .encode(&mut b)
    .unwrap();
    assert_eq!(a[..n], b[..m]);
    assert_eq!(n, payload.len() + DATA_OVERHEAD);
}

#[test]
fn rejections_are_typed() {
    let mut buf = vec![0u8; 64];
    let n = Datagram {
        conn_id: ConnectionId(1),
        frame: Frame::Done,
    }
    .encode(&mut buf)
    .unwrap();
    let good = buf[..n].to_vec();
    assert_eq!(decode(&good[..5]), Err(DecodeError::TooShort { len: 5 }));
    let mut bad = good.clone();
    bad[0] = b'X';
    assert_eq!(decode(&bad), Err(DecodeError::BadMagic));
    assert!(!is_udpferry_datagram(&bad));
    let mut bad = good.clone();
    bad[4] = 9;
    assert_eq!(decode(&bad), Err(DecodeError::UnsupportedVersion(9)));
    assert!(!is_udpferry_datagram(&bad));
    let mut bad = good.clone();
    bad[10] ^= 1;
    assert!(matches!(decode(&bad), Err(DecodeError::BadChecksum { .. })));
    // A valid checksum over an unknown kind.
    let mut bad = good[..n - 4].to_vec();
    bad[5] = 0x7f;
    let crc = crc32fast::hash(&bad);
    bad.extend_from_slice(&crc.to_be_bytes());
    assert_eq!(decode(&bad), Err(DecodeError::UnknownKind(0x7f)));
}

fn reseal(mut content: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&content);
    content.extend_from_slice(&crc.to_be_bytes());
    content
}

#[test]
fn invalid_fields_are_rejected() {
    let header = |kind: u8| {
        let mut v = MAGIC.to_vec();
        v.push(VERSION);
        v.push(kind);
        v.extend_from_slice(&[0; 8]);
        v
    };
    // Ack whose range has a zero gap.
    let mut ack = header(0x05);
    ack.extend_from_slice(&[0; 8 + 16]);
    ack.extend_from_slice(&[1, 0, 1]);
    assert!(matches!(
        decode(&reseal(ack)),
        Err(DecodeError::InvalidField { .. })
    ));
    // Ack whose range runs past 2^32 - 1.
    let mut ack = header(0x05);
    ack.extend_from_slice(&[0; 8 + 12]);
    ack.extend_from_slice(&u32::MAX.to_be_bytes());
    ack.extend_from_slice(&[1, 1, 1]);
    assert!(matches!(
        decode(&reseal(ack)),
        Err(DecodeError::InvalidField { .. })
    ));
    // Offer with a tiny chunk size.
    let mut offer = header(0x02);
    offer.push(1);
    offer.extend_from_slice(&[0; 16]);
    offer.extend_from_slice(&100u64.to_be_bytes());
    offer.extend_from_slice(&10u16.to_be_bytes());
    offer.extend_from_slice(&[0; 8]);
    assert!(matches!(
        decode(&reseal(offer)),
        Err(DecodeError::InvalidField {
            field: "chunk_size",
            ..
        })
    ));
    // Request whose have-ranges overlap.
    let mut req = header(0x01);
    req.push(1);
    req.extend_from_slice(&[0; 16]);
    req.extend_from_slice(&1200u16.to_be_bytes());
    req.extend_from_slice(&[0; 8]);
    req.extend_from_slice(&2u16.to_be_bytes());
    for (s, e) in [(0u64, 10u64), (5, 20)] {
        req.extend_from_slice(&s.to_be_bytes());
        req.extend_from_slice(&e.to_be_bytes());
    }
    assert!(matches!(
        decode(&reseal(req)),
        Err(DecodeError::InvalidField { .. })
    ));
    // Error with a reason that is not UTF-8, and one with trailing bytes.
    let mut err = header(0x07);
    err.extend_from_slice(&[0, 1, 2, 0xff, 0xfe]);
    assert!(matches!(
        decode(&reseal(err)),
        Err(DecodeError::InvalidField { .. })
    ));
    let mut err = header(0x07);
    err.extend_from_slice(&[0, 1, 1, b'x', b'y']);
    assert!(matches!(
        decode(&reseal(err)),
        Err(DecodeError::TrailingBytes { .. })
    ));
    // Done with a body.
    let mut done = header(0x06);
    done.push(0);
    assert!(matches!(
        decode(&reseal(done)),
        Err(DecodeError::TrailingBytes { .. })
    ));
}

#[test]
fn ack_encode_refuses_unordered_ranges() {
    let ranges = [10..12, 11..20];
    let mut buf = [0u8; 256];
    let err = Datagram {
        conn_id: ConnectionId(1),
        frame: Frame::Ack(Ack {
            largest_seq: 0,
            ack_delay_us: 0,
            owd_us: 0,
            window_end: 0,
            cumulative: 5,
            ranges: AckRanges::List(&ranges),
        }),
    }
    .encode(&mut buf);
    assert!(err.is_err());
}

#[test]
fn encode_reports_small_buffers() {
    let mut buf = [0u8; 20];
    let r = Datagram {
        conn_id: ConnectionId(1),
        frame: Frame::Data(Data {
            seq: 0,
            send_time_us: 0,
            chunk: 0,
            payload: &[0; 100],
        }),
    }
    .encode(&mut buf);
    assert!(matches!(r, Err(EncodeError::BufferTooSmall { .. })));
}

fn ascending_ranges(max_len: usize) -> impl Strategy<Value = Vec<Range<u64>>> {
    prop::collection::vec((1u64..1000, 1u64..1000), 0..max_len).prop_map(|steps| {
        let mut at = 0u64;
        steps
            .into_iter()
            .map(|(gap, len)| {
                let start = at + gap;
                at = start + len;
                start..at
            })
            .collect()
    })
}

proptest! {
    #[test]
    fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..1500)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn decode_never_panics_on_resealed_bodies(kind in 1u8..8, body in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut v = MAGIC.to_vec();
        v.push(VERSION);
        v.push(kind);
        v.extend_from_slice(&[0; 8]);
        v.extend_from_slice(&body);
        let _ = decode(&reseal(v));
    }

    #[test]
    fn any_single_bit_flip_is_rejected(seq in any::<u64>(), chunk in any::<u32>(), payload in prop::collection::vec(any::<u8>(), 0..1166), bit in any::<prop::sample::Index>()) {
        let mut buf = vec![0u8; 1200];
        let n = Datagram { conn_id: ConnectionId(3), frame: Frame::Data(Data { seq, send_time_us: 0, chunk, payload: &payload }) }.encode(&mut buf).unwrap();
        let bit = bit.index(n * 8);
        buf[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(decode(&buf[..n]).is_err());
    }

    #[test]
    fn acks_and_requests_round_trip(cum in 0u32..1_000_000, ranges in ascending_ranges(200), have in ascending_ranges(60), seq in any::<u64>()) {
        let shifted: Vec<Range<u64>> = ranges.iter().map(|r| r.start + u64::from(cum)..r.end + u64::from(cum)).collect();
        round_trip(&Datagram { conn_id: ConnectionId(seq), frame: Frame::Ack(Ack {
            largest_seq: seq, ack_delay_us: 1, owd_us: 2, window_end: 3, cumulative: cum,
            ranges: AckRanges::List(&shifted) }) });
        round_trip(&Datagram { conn_id: ConnectionId(seq), frame: Frame::Request(Request {
            object: id(), max_datagram_size: 1200, max_rate_bytes_per_sec: seq, have: HaveRanges::List(&have) }) });
    }
}
