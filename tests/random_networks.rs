//! Property: over any network with up to 40% loss, duplication, reordering and corruption, every
//! download ends with byte-identical data and a verified digest, in a bounded number of steps.
//! Never a panic, never a wrong success.
//!
//! proptest prints the failing parameters (including the simulator seed); choose another run with
//! `PROPTEST_RNG_SEED=<n>`, and more cases with `PROPTEST_CASES=<n>`.

mod common;

use std::time::Duration;

use common::*;
use proptest::prelude::*;
use udpferry::core::{Event, TransferConfig, TransferError};
use udpferry_sim::{LinkConfig, RunOutcome};

#[derive(Debug, Clone)]
struct Net {
    latency_ms: u64,
    jitter_ms: u64,
    loss: f64,
    duplicate: f64,
    corrupt: f64,
}

fn net() -> impl Strategy<Value = Net> {
    (1u64..80, 0u64..40, 0.0..0.4f64, 0.0..0.1f64, 0.0..0.05f64).prop_map(
        |(latency_ms, jitter_ms, loss, duplicate, corrupt)| Net {
            latency_ms,
            jitter_ms,
            loss,
            duplicate,
            corrupt,
        },
    )
}

impl Net {
    fn link(&self) -> LinkConfig {
        LinkConfig::clean(Duration::from_millis(self.latency_ms))
            .with_jitter(Duration::from_millis(self.jitter_ms))
            .with_loss(self.loss)
            .with_duplicate(self.duplicate)
            .with_corrupt(self.corrupt)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn downloads_complete_byte_identical(
        seed in any::<u64>(),
        size in prop_oneof![0usize..3000, 0usize..(4 << 20)],
        down in net(),
        up in net(),
    ) {
        let data = object(size, seed);
        let o = download(seed, &data, down.link(), up.link(), TransferConfig::default());
        let ctx = format!("seed {seed:#x}, size {size}: run {:?}, failure {:?}", o.run, o.failure());
        prop_assert_eq!(o.run, RunOutcome::BothFinished, "{}", &ctx);
        prop_assert!(o.completed(), "{}", &ctx);
        prop_assert!(o.data == data, "{}: bytes differ", &ctx);
    }

    #[test]
    fn a_dead_link_ends_in_a_clean_timeout(
        seed in any::<u64>(),
        size in 1usize..200_000,
        cut_after in 0u64..2000,
    ) {
        // The link dies for good at a random moment: the only acceptable ends are a verified
        // completion (it finished first) or a typed timeout, never a wrong success.
        let data = object(size, seed);
        let config = TransferConfig { idle_timeout: Duration::from_secs(3), ..TransferConfig::default() };
        let o = common::download_cut(seed, &data, Duration::from_millis(cut_after), config);
        prop_assert!(o.run != RunOutcome::StepLimit, "seed {:#x}", seed);
        match o.receiver_events.last() {
            Some(Event::Completed(_)) => prop_assert!(o.data == data),
            Some(Event::Failed(TransferError::TimedOut(_))) => {}
            other => prop_assert!(false, "seed {:#x}: unexpected end {:?}", seed, other),
        }
    }
}
