//! Property: no configuration makes a transfer panic or hang. `TransferConfig` and
//! `EndpointConfig` are driven with extreme values (0, 1, `MAX` for durations, rates, sizes,
//! windows, counts and datagram sizes) through a short simulated download between two
//! endpoints. Every run must end without a panic, in a verified completion or a typed failure,
//! unless an idle timeout longer than the run lets a side wait for ever (as asked).
//!
//! proptest prints the failing configurations; choose another run with `PROPTEST_RNG_SEED=<n>`,
//! and more cases with `PROPTEST_CASES=<n>`.

mod common;

use std::time::{Duration, Instant};

use common::object;
use proptest::prelude::*;
use udpferry::core::{CongestionControl, EndpointConfig, Event, RangeSet, TransferConfig};
use udpferry::ObjectId;
use udpferry_sim::{LinkConfig, Pair, RunOutcome};

/// How far in virtual time a run may go. A 4000-byte object at 1 byte per second takes a little
/// over an hour.
const HORIZON: Duration = Duration::from_secs(24 * 3600);

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::from_nanos(1)),
        Just(Duration::from_millis(1)),
        Just(Duration::from_millis(200)),
        Just(Duration::from_secs(15)),
        Just(Duration::from_secs(u64::MAX)),
        Just(Duration::MAX),
    ]
}

fn count_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0),
        Just(1),
        Just(2),
        Just(1200),
        Just(16 << 20),
        Just(u64::MAX)
    ]
}

fn count_u32() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0), Just(1), Just(2), Just(10), Just(u32::MAX)]
}

fn count_usize() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0),
        Just(1),
        Just(64),
        Just(289),
        Just(290),
        Just(1200),
        Just(65_507),
        Just(65_508),
        Just(usize::MAX)
    ]
}

fn congestion() -> impl Strategy<Value = CongestionControl> {
    prop_oneof![
        Just(CongestionControl::Standard),
        duration().prop_map(|target| CongestionControl::Background { target }),
    ]
}

prop_compose! {
    fn transfer_config()(
        max_datagram_size in count_usize(),
        (idle_timeout, initial_rtt, max_ack_delay, progress_interval, linger, path_lost_after)
            in (duration(), duration(), duration(), duration(), duration(), duration()),
        ack_every in count_u32(),
        max_ack_ranges in count_usize(),
        (receive_window_bytes, max_object_size, max_rate_bytes_per_sec)
            in (count_u64(), count_u64(), count_u64()),
        congestion in congestion(),
        burst_datagrams in count_u32(),
    ) -> TransferConfig {
        TransferConfig {
            max_datagram_size,
            idle_timeout,
            initial_rtt,
            max_ack_delay,
            ack_every,
            max_ack_ranges,
            receive_window_bytes,
            max_object_size,
            max_rate_bytes_per_sec,
            congestion,
            burst_datagrams,
            progress_interval,
            linger,
            path_lost_after,
        }
    }
}

prop_compose! {
    fn endpoint_config()(
        transfer in transfer_config(),
        (max_transfers, max_transfers_per_address, max_pending_replies, max_waiting)
            in (count_usize(), count_usize(), count_usize(), count_usize()),
        rate_limit_bytes_per_sec in count_u64(),
        max_requests_per_address_per_sec in count_u32(),
        seed in any::<u128>(),
    ) -> EndpointConfig {
        EndpointConfig {
            transfer,
            max_transfers,
            max_transfers_per_address,
            max_waiting,
            rate_limit_bytes_per_sec,
            max_pending_replies,
            max_requests_per_address_per_sec,
            seed,
        }
    }
}

/// One download of `size` bytes from a server with `server` settings by a client with `client`
/// settings, over a 10 ms path that loses `loss` each way.
fn run(seed: u64, size: usize, server: EndpointConfig, client: EndpointConfig, loss: f64) {
    let data = object(size, seed);
    let start = Instant::now();
    let client_idle = client.transfer.idle_timeout;
    let server_idle = server.transfer.idle_timeout;
    let link = LinkConfig::clean(Duration::from_millis(10)).with_loss(loss);
    let (_, mut pair) =
        common::endpoint_pair(seed, start, server, client, &data, link.clone(), link);
    // A side whose idle timeout outlasts the run may legitimately wait (and retry) for ever; such
    // a run is only watched for an hour.
    let patient = client_idle >= HORIZON / 4 || server_idle >= HORIZON / 4;
    let horizon = if patient {
        Duration::from_secs(3600)
    } else {
        HORIZON
    };
    let outcome = loop {
        let before = pair.now;
        let outcome = pair.run(100_000, start + horizon);
        if outcome != RunOutcome::StepLimit {
            break outcome;
        }
        // 100 000 steps in under 100 ms of virtual time: the simulation spins.
        assert!(
            pair.now - before >= Duration::from_millis(100),
            "seed {seed:#x}, size {size}: spinning at {:?}",
            pair.now - start
        );
    };
    let end = common::client_end(&pair.b);
    let ctx = format!("seed {seed:#x}, size {size}: {outcome:?}, client's end {end:?}");
    if let Some(Ok(())) = end {
        assert!(pair.b.finished.first() == Some(&data), "{ctx}: wrong bytes");
    }
    if !patient {
        assert!(
            matches!(outcome, RunOutcome::BothFinished | RunOutcome::Stalled),
            "{ctx}: did not end"
        );
        assert!(end.is_some(), "{ctx}: the client never reported an end");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Extreme settings on both sides, the endpoint limits too.
    #[test]
    fn extreme_configs_neither_panic_nor_hang(
        seed in any::<u64>(),
        size in prop_oneof![Just(0usize), Just(1), 0usize..4000],
        server in endpoint_config(),
        client in endpoint_config(),
        lossy in any::<bool>(),
    ) {
        run(seed, size, server, client, if lossy { 0.1 } else { 0.0 });
    }

    /// Extreme transfer settings against a default peer, so more runs get past the handshake.
    #[test]
    fn extreme_transfer_config_against_a_default_peer(
        seed in any::<u64>(),
        size in prop_oneof![Just(0usize), Just(1), 0usize..4000],
        transfer in transfer_config(),
        serving in any::<bool>(),
    ) {
        let extreme = EndpointConfig { transfer, seed: 1, ..EndpointConfig::default() };
        let default = EndpointConfig { seed: 2, ..EndpointConfig::default() };
        let (server, client) = if serving { (extreme, default) } else { (default, extreme) };
        run(seed, size, server, client, 0.0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Extreme transfer settings on a bare `Sender` (created from the Request, so it repeats
    /// its offer on a timer) and `Receiver`, without an endpoint.
    #[test]
    fn extreme_transfer_config_one_shot(
        seed in any::<u64>(),
        size in prop_oneof![Just(0usize), Just(1), 0usize..4000],
        server in transfer_config(),
        client in transfer_config(),
    ) {
        let data = object(size, seed);
        let patient = client.idle_timeout >= HORIZON / 4 || server.idle_timeout >= HORIZON / 4;
        let link = LinkConfig::clean(Duration::from_millis(10));
        let start = Instant::now();
        let sender = udpferry_sim::OneShotServer::new(
            ObjectId::md5_of(&data), size as u64, data.clone(), server, 1);
        let receiver = udpferry::core::Receiver::new(
            start, udpferry::wire::ConnectionId(2), ObjectId::md5_of(&data), &RangeSet::new(),
            Vec::new(), client);
        let mut pair = Pair::new(seed, start, sender, receiver, link.clone(), link);
        let horizon = if patient { Duration::from_secs(3600) } else { HORIZON };
        let outcome = loop {
            let before = pair.now;
            let outcome = pair.run(100_000, start + horizon);
            if outcome != RunOutcome::StepLimit {
                break outcome;
            }
            prop_assert!(pair.now - before >= Duration::from_millis(100), "spinning");
        };
        let end = std::iter::from_fn(|| pair.b.poll_event()).find_map(|e| match e {
            Event::Completed(_) => Some(Ok(())),
            Event::Failed(err) => Some(Err(err)),
            _ => None,
        });
        if let Some(Ok(())) = end {
            prop_assert!(pair.b.sink() == &data, "wrong bytes");
        }
        if !patient {
            prop_assert!(
                matches!(outcome, RunOutcome::BothFinished | RunOutcome::Stalled),
                "did not end: {:?}, {:?}", outcome, end
            );
            prop_assert!(end.is_some(), "the client never reported an end");
        }
    }
}

/// The case: `idle_timeout = Duration::MAX` on both sides panicked in
/// `last_heard + idle_timeout`. Now it never expires, and the download completes.
#[test]
fn an_idle_timeout_of_duration_max_never_expires() {
    let config = TransferConfig {
        idle_timeout: Duration::MAX,
        progress_interval: Duration::MAX,
        linger: Duration::MAX,
        max_ack_delay: Duration::MAX,
        initial_rtt: Duration::MAX,
        ..TransferConfig::default()
    };
    let data = object(300_000, 1);
    let link = LinkConfig::clean(Duration::from_millis(10)).with_loss(0.05);
    let o = common::download(1, &data, link.clone(), link, config);
    assert_eq!(o.run, RunOutcome::BothFinished, "{:?}", o.failure());
    assert!(o.completed() && o.data == data);
    // The receiver lingers at most a minute, whatever `linger` says.
    assert!(o.elapsed < Duration::from_secs(120), "{:?}", o.elapsed);
}
