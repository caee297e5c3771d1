mod common;
use common::*;
use std::time::Duration;
use udpferry::core::TransferConfig;
use udpferry::sim::LinkConfig;

#[test]
fn smoke() {
    for (size, loss) in [
        (0usize, 0.0),
        (1, 0.0),
        (100_000, 0.0),
        (1 << 20, 0.05),
        (1 << 20, 0.2),
    ] {
        let data = object(size, 1);
        let link = LinkConfig::clean(Duration::from_millis(10)).with_loss(loss);
        let o = download(7, &data, link.clone(), link, TransferConfig::default());
        eprintln!("size {size} loss {loss}: {:?} completed {} fail {:?} overhead {:.4} elapsed {:?} steps {} retx {}", o.run, o.completed(), o.failure(), o.overhead(size), o.elapsed, o.steps, o.retransmitted_bytes);
        assert!(o.completed());
        assert_eq!(o.data, data);
    }
}
#[test]
fn big() {
    for (size, loss) in [(64usize << 20, 0.0), (64 << 20, 0.05)] {
        let data = object(size, 1);
        let link = LinkConfig::clean(Duration::from_millis(10)).with_loss(loss);
        let t = std::time::Instant::now();
        let o = download(7, &data, link.clone(), link, TransferConfig::default());
        eprintln!("size {size} loss {loss}: {:?} completed {} fail {:?} overhead {:.4} elapsed {:?} steps {} retx {} wall {:?}", o.run, o.completed(), o.failure(), o.overhead(size), o.elapsed, o.steps, o.retransmitted_bytes, t.elapsed());
        assert!(o.completed());
    }
}
#[test]
fn dbg5() {
    let size = 8usize << 20;
    for (fwd, rev) in [(0.05, 0.0), (0.0, 0.05), (0.05, 0.05)] {
        let data = object(size, 1);
        let o = download(
            7,
            &data,
            LinkConfig::clean(Duration::from_millis(10)).with_loss(fwd),
            LinkConfig::clean(Duration::from_millis(10)).with_loss(rev),
            TransferConfig::default(),
        );
        let udpferry::core::Event::Completed(c) = o.sender_events.last().unwrap() else {
            panic!()
        };
        eprintln!(
            "fwd {fwd} rev {rev}: overhead {:.4} {:?}",
            o.overhead(size),
            c.stats
        );
    }
}
