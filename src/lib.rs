//! udpferry moves files reliably over UDP for game netcode: a map named by the MD5 of its bytes
//! travels over the game's own socket as checksummed, sequenced, selectively acknowledged and
//! paced datagrams, and is reported complete only after its MD5 matched.
//!
//! # Layers
//!
//! - [`wire`]: the datagram format, [`wire::decode`] / [`wire::Datagram::encode`], and
//!   [`is_udpferry_datagram`], the cheap check a game uses to route our datagrams off its socket.
//! - [`core`]: the sans-IO state machines, [`core::Sender`] and [`core::Receiver`]. They never
//!   read a clock, open a socket or touch a file: time is an argument, datagrams are byte slices,
//!   object bytes go through [`core::ChunkSource`] / [`core::ChunkSink`].
//! - [`sim`]: a seeded network simulator with virtual time, for tests and demos.
//!
//! # Quick start
//!
//! One download, driven by hand through the simulator (a real driver swaps the [`sim::Pair`] for
//! a socket and a clock; the calls are the same):
//!
//! ```
//! use std::time::{Duration, Instant};
//! use udpferry::core::{Event, RangeSet, Receiver, TransferConfig};
//! use udpferry::sim::{LinkConfig, OneShotServer, Pair, RunOutcome};
//! use udpferry::wire::ConnectionId;
//! use udpferry::ObjectId;
//!
//! let map = vec![7u8; 100_000];
//! let id = ObjectId::md5_of(&map);
//! let now = Instant::now();
//! let server = OneShotServer::new(id, map.len() as u64, map.clone(), TransferConfig::default(), 42);
//! let client = Receiver::new(now, ConnectionId(1), id, &RangeSet::new(), Vec::new(),
//!                            TransferConfig::default());
//! let link = LinkConfig::clean(Duration::from_millis(20)).with_loss(0.05);
//! let mut pair = Pair::new(1, now, server, client, link.clone(), link);
//! assert_eq!(pair.run(100_000, now + Duration::from_secs(60)), RunOutcome::BothFinished);
//! let completed = std::iter::from_fn(|| pair.b.poll_event())
//!     .any(|e| matches!(e, Event::Completed(_)));
//! assert!(completed);
//! assert_eq!(pair.b.sink(), &map);
//! ```
//!
//! The call order every driver follows is in the [`core`] module docs. docs/PROTOCOL.md specifies
//! the wire format byte by byte; docs/ARCHITECTURE.md explains the design.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod core;
pub mod id;
pub mod net;
pub mod sim;
pub mod store;
pub mod wire;

pub use id::ObjectId;
pub use wire::is_udpferry_datagram;
