//! A seeded, sans-IO network emulator for deterministic tests of the core: udpferry's test
//! fixture, in a crate of its own so that no game links it (a dev-dependency of udpferry's tests
//! and benches).
//!
//! udpferry's state machines never touch a socket or a clock: they take
//! datagrams and the current time as inputs and hand back datagrams to send
//! and the time of their next timer. This crate exploits that to test them
//! over hostile networks quickly and reproducibly:
//!
//! * [`Rng`] is a small seeded generator (xoshiro256**); a single `u64` seed
//!   determines every random choice of a run.
//! * [`Link`] is one direction of a path. Its [`LinkConfig`] sets latency,
//!   jitter (reordering), random and Gilbert-Elliott burst loss,
//!   duplication, bit corruption, mutation that passes the CRC32, an MTU,
//!   and a bandwidth bottleneck with a tail-drop queue. [`LinkStats`]
//!   counts what happened.
//! * [`CubicSender`] and [`CubicReceiver`] are a loss-based flow (CUBIC, RFC 9438) to share a
//!   bottleneck with, as a TCP or QUIC download beside udpferry's would.
//! * [`Relay`] is the same link model for real sockets: a loopback UDP relay between one
//!   client and a server, driven by the real clock, for benches of what users run (the
//!   binaries, the driver, quinn for comparison).
//! * [`Pair`] joins two [`Peer`]s with a link in each direction and runs them
//!   in *virtual time*: instead of sleeping, the clock jumps straight to the
//!   next event (a datagram arrival or a peer's timer). A transfer that would
//!   take minutes over a 1 MB/s link with 100 ms latency runs in
//!   milliseconds, and no real clock is ever read.
//!
//! Everything is exactly reproducible: the same seed and the same peer
//! behaviour give the same sequence of events, datagram for datagram, on
//! every machine (no real time, no hash-map iteration order).
//!
//! # Replaying a failure
//!
//! Take the seed from [`seed_from_env`] and print it (or put it in assertion
//! messages). When a randomised test fails, rerun just that test with the
//! printed seed:
//!
//! ```text
//! UDPFERRY_SEED=0x5eed cargo test ping_pong_completes_over_lossy_link
//! ```
//!
//! `UDPFERRY_SEED` accepts decimal or `0x`-prefixed hexadecimal.
//!
//! # Example
//!
//! ```
//! use std::time::{Duration, Instant};
//! use udpferry_sim::{seed_from_env, LinkConfig, Pair, Peer, RunOutcome};
//!
//! /// Sends one datagram; done once it has been sent.
//! struct Hello(bool);
//! impl Peer for Hello {
//!     fn handle_datagram(&mut self, _now: Instant, _d: &[u8]) {}
//!     fn poll_transmit(&mut self, _now: Instant, buf: &mut [u8]) -> Option<usize> {
//!         if self.0 { return None; }
//!         self.0 = true;
//!         buf[..5].copy_from_slice(b"hello");
//!         Some(5)
//!     }
//!     fn poll_timeout(&self) -> Option<Instant> { None }
//!     fn handle_timeout(&mut self, _now: Instant) {}
//!     fn is_finished(&self) -> bool { self.0 }
//! }
//!
//! /// Done once it has received anything.
//! struct Listener(bool);
//! impl Peer for Listener {
//!     fn handle_datagram(&mut self, _now: Instant, _d: &[u8]) { self.0 = true; }
//!     fn poll_transmit(&mut self, _now: Instant, _buf: &mut [u8]) -> Option<usize> { None }
//!     fn poll_timeout(&self) -> Option<Instant> { None }
//!     fn handle_timeout(&mut self, _now: Instant) {}
//!     fn is_finished(&self) -> bool { self.0 }
//! }
//!
//! let seed = seed_from_env(1);
//! let start = Instant::now();
//! let link = LinkConfig::clean(Duration::from_millis(40));
//! let mut pair = Pair::new(seed, start, Hello(false), Listener(false), link.clone(), link);
//! let outcome = pair.run(1_000, start + Duration::from_secs(10));
//! assert_eq!(outcome, RunOutcome::BothFinished, "seed {seed}");
//! assert_eq!(pair.now - start, Duration::from_millis(40));
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod cubic;
mod game;
mod link;
mod pair;
mod peers;
mod relay;
mod rng;

pub use cubic::{CubicReceiver, CubicSender};
pub use game::{EndpointPeer, GameTraffic};
pub use link::{mutate, GilbertElliott, Link, LinkConfig, LinkStats};
pub use pair::{Direction, Pair, Peer, RunOutcome};
pub use peers::OneShotServer;
pub use relay::Relay;
pub use rng::{seed_from_env, Rng};
