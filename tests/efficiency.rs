//! Bytes the sender puts on the wire per byte of object (UDP payload, all headers included).
//!
//! Print the figures with `cargo test --release --test efficiency -- --nocapture`.

mod common;

use std::time::Duration;

use common::*;
use udpferry::core::TransferConfig;
use udpferry_sim::{seed_from_env, LinkConfig};

fn ratio(size: usize, loss: f64) -> f64 {
    let seed = seed_from_env(0xeff1_c1e7);
    let data = object(size, seed);
    let link = LinkConfig::clean(Duration::from_millis(20)).with_loss(loss);
    let o = download(seed, &data, link.clone(), link, TransferConfig::default());
    assert!(
        o.completed() && o.data == data,
        "seed {seed:#x}: {:?}",
        o.failure()
    );
    let r = o.overhead(size);
    println!(
        "size {size:>9} B, loss {:>4.1}%: sent/size = {r:.4} (retransmitted {} B), seed {seed:#x}",
        loss * 100.0,
        o.retransmitted_bytes
    );
    r
}

#[test]
fn clean_link_overhead_is_at_most_3_5_percent() {
    for size in [1 << 20, 16 << 20] {
        let r = ratio(size, 0.0);
        assert!(r <= 1.035, "clean link: {r:.4} > 1.035 for {size} bytes");
    }
}

#[test]
fn five_percent_loss_costs_at_most_10_percent() {
    for size in [1 << 20, 16 << 20] {
        let r = ratio(size, 0.05);
        assert!(r <= 1.10, "5% loss: {r:.4} > 1.10 for {size} bytes");
    }
}
