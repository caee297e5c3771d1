//! Criterion benches of the core: datagram encode/decode and whole in-memory transfers through
//! the simulator (no sockets, virtual time), on a clean link and at 5% loss.
//!
//! `cargo bench --bench transfer`; CI runs each once with `-- --test`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use udpferry::core::{Event, RangeSet, Receiver, TransferConfig};
use udpferry::sim::{LinkConfig, OneShotServer, Pair, Rng, RunOutcome};
use udpferry::wire::{self, ConnectionId, Data, Datagram, Frame};
use udpferry::ObjectId;

fn transfer(data: &[u8], id: ObjectId, link: &LinkConfig) -> u64 {
    let start = Instant::now();
    let config = TransferConfig::default();
    let server = OneShotServer::new(id, data.len() as u64, data, config.clone(), 1);
    let rx = Receiver::new(
        start,
        ConnectionId(2),
        id,
        &RangeSet::new(),
        Vec::new(),
        config,
    );
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
    group.bench_function("clean", |b| {
        b.iter(|| transfer(black_box(&data), id, &clean))
    });
    let lossy = clean.clone().with_loss(0.05);
    group.bench_function("loss_5pct", |b| {
        b.iter(|| transfer(black_box(&data), id, &lossy))
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

criterion_group!(benches, bench_transfer, bench_wire);
criterion_main!(benches);
