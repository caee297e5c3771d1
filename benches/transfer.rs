//! Criterion benches of the core: MD5 (ours against the `md-5` crate), datagram encode/decode,
//! range sets under SACK churn, the pacer, and whole in-memory transfers through the simulator
//! (no sockets, virtual time) on a clean link and at 5% loss, with MD5 and without (a hasher
//! that skips hashing, to time the protocol alone).
//!
//! `cargo bench --bench transfer`; CI runs each once with `-- --test`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use udpferry::core::{Event, Pacer, RangeSet, Receiver, TransferConfig};
use udpferry::wire::{self, ConnectionId, Data, Datagram, Frame};
use udpferry::ObjectId;
use udpferry_sim::{LinkConfig, OneShotServer, Pair, Rng, RunOutcome};

fn transfer(data: &[u8], id: ObjectId, link: &LinkConfig, md5: bool) -> u64 {
    let start = Instant::now();
    let config = TransferConfig::default();
    let server = OneShotServer::new(id, data.len() as u64, data, config.clone(), 1);
    let mut rx = Receiver::new(
        start,
        ConnectionId(2),
        id,
        &RangeSet::new(),
        Vec::new(),
        config,
    );
    if !md5 {
        rx.verify_by_caller(); // the protocol without MD5
    }
    let mut pair = Pair::new(3, start, server, rx, link.clone(), link.clone());
    let outcome = pair.run(u64::MAX, start + Duration::from_secs(24 * 3600));
    assert_eq!(outcome, RunOutcome::BothFinished);
    let mut ok = false;
    while let Some(e) = pair.b.poll_event() {
        ok |= matches!(e, Event::Completed(_));
    }
    assert!(ok, "transfer did not complete");
    pair.steps()
}

fn bench_transfer(c: &mut Criterion) {
    let size = 4 << 20;
    let mut data = vec![0u8; size];
    Rng::new(7).fill_bytes(&mut data);
    let id = ObjectId::md5_of(&data);
    let mut group = c.benchmark_group("transfer_4MiB");
    group.throughput(Throughput::Bytes(size as u64));
    group.sample_size(10);
    let clean = LinkConfig::clean(Duration::from_millis(10));
    let lossy = clean.clone().with_loss(0.05);
    for (name, link, md5) in [
        ("clean", &clean, true),
        ("loss_5pct", &lossy, true),
        ("clean_no_md5", &clean, false),
        ("loss_5pct_no_md5", &lossy, false),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| transfer(black_box(&data), id, link, md5))
        });
    }
    group.finish();
}

/// A receiver's and a sender's range sets under SACK churn: 8192 chunks arrive in a scrambled
/// order with every 7th one lost and filled in later, while the cumulative point is asked for
/// and gaps are listed as an ack would.
fn bench_ranges(c: &mut Criterion) {
    const CHUNKS: u64 = 8192;
    let order: Vec<u64> = {
        let mut rng = Rng::new(11);
        let mut v: Vec<u64> = (0..CHUNKS).collect();
        // Local reordering: swap within windows of 64, as a network reorders.
        for i in 0..v.len() {
            let j = (i + (rng.next_u64() % 64) as usize).min(v.len() - 1);
            v.swap(i, j);
        }
        v
    };
    let mut group = c.benchmark_group("ranges");
    group.throughput(Throughput::Elements(CHUNKS));
    group.bench_function("sack_churn_8192", |b| {
        b.iter(|| {
            let mut got = RangeSet::new();
            let mut late = Vec::new();
            let mut gaps = 0usize;
            for (i, &c) in order.iter().enumerate() {
                if c % 7 == 3 {
                    late.push(c);
                } else {
                    got.insert(c..c + 1);
                }
                if i % 2 == 1 {
                    // An ack every other datagram: the cumulative point and up to 64 ranges.
                    let cum = got.first_missing_from(0);
                    gaps += got.iter().rev().take(64).filter(|r| r.start > cum).count();
                }
                if i % 256 == 255 {
                    for c in late.drain(..) {
                        got.insert(c..c + 1);
                    }
                }
            }
            for c in late {
                got.insert(c..c + 1);
            }
            assert_eq!(got.covered(), CHUNKS);
            black_box(gaps)
        })
    });
    group.finish();
}

/// The pacer's per-datagram work: ask when 1200 bytes may go, then take them, at 100 MB/s in
/// virtual time.
fn bench_pacer(c: &mut Criterion) {
    let mut group = c.benchmark_group("pacer");
    group.throughput(Throughput::Elements(10_000));
    group.bench_function("ready_at_take_10000", |b| {
        b.iter(|| {
            let start = Instant::now();
            let mut pacer = Pacer::new(100_000_000, 12_000);
            let mut now = start;
            for _ in 0..10_000 {
                now = pacer.ready_at(1200, now).max(now);
                pacer.take(1200, now);
            }
            black_box(now - start)
        })
    });
    group.finish();
}

fn bench_wire(c: &mut Criterion) {
    let payload = vec![0xa5u8; 1166];
    let datagram = Datagram {
        conn_id: ConnectionId(1),
        frame: Frame::Data(Data {
            seq: 123_456,
            send_time_us: 99,
            chunk: 4242,
            payload: &payload,
        }),
    };
    let mut buf = vec![0u8; 1500];
    let n = datagram.encode(&mut buf).expect("encode");
    let mut group = c.benchmark_group("wire");
    group.throughput(Throughput::Bytes(n as u64));
    group.bench_function("encode_data_1200", |b| {
        b.iter(|| black_box(&datagram).encode(black_box(&mut buf)))
    });
    let encoded = buf[..n].to_vec();
    group.bench_function("decode_data_1200", |b| {
        b.iter(|| wire::decode(black_box(&encoded)).is_ok())
    });
    group.finish();
}

/// The digest every downloaded byte goes through: udpferry's MD5 (src/md5.rs) against the
/// `md-5` crate's portable one, on 1 MiB.
fn bench_md5(c: &mut Criterion) {
    use md5::Digest;
    let mut data = vec![0u8; 1 << 20];
    Rng::new(5).fill_bytes(&mut data);
    let mut group = c.benchmark_group("md5");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("udpferry_1MiB", |b| {
        b.iter(|| ObjectId::md5_of(black_box(&data)))
    });
    group.bench_function("md-5_crate_1MiB", |b| {
        b.iter(|| md5::Md5::digest(black_box(&data)))
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_md5,
    bench_transfer,
    bench_wire,
    bench_ranges,
    bench_pacer
);
criterion_main!(benches);
