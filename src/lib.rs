//! udpferry moves files reliably over UDP for game netcode: a map named by the MD5 of its bytes
//! travels over the game's own socket as checksummed, sequenced, selectively acknowledged and
//! paced datagrams, and is reported complete only after its digest matched.
//!
//! # Quick start: fetch a map
//!
//! A client that joins a match without its map fetches it by id from the game server, into a
//! cache, resuming what an earlier attempt left and repairing what arrived damaged:
//!
//! ```no_run
//! use udpferry::{Client, FetchOptions, ObjectId};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let map: ObjectId = "9e107d9d372bb6826bd81d3542a419d6".parse()?; // named by the server
//! let client = Client::new("cache")?; // or Cache::default_dir()
//! let options = FetchOptions {
//!     output: Some("maps/next.bsp".into()), // also put it where the game loads maps
//!     ..FetchOptions::default()
//! };
//! let report = client.fetch("game.example:7878", map, &options, |p| {
//!     println!("{} of {} bytes", p.bytes_done, p.total);
//! })?;
//! println!("{report}"); // verified: "<md5>: <size> bytes in <secs> s ..."
//! # Ok(()) }
//! ```
//!
//! The server side is [`Server::bind`] over a [`ContentStore`] (a directory served by the
//! digests of its files) and [`Server::run_until`], which follows the directory: files added,
//! changed or removed are served without a restart.
//!
//! # In a game loop
//!
//! A game that keeps its own socket drives an [`Endpoint`] (many transfers, either role, behind
//! one socket) from its tick: datagrams for which [`is_udpferry_datagram`] is true go to
//! [`Endpoint::handle_datagram`]; then [`Endpoint::handle_timeout`] when
//! [`Endpoint::poll_timeout`] is due; then [`Endpoint::poll_transmit`] until it returns `None`,
//! sending each datagram; then [`Endpoint::poll_event`] for `Started`, `Progress`, `Completed`
//! and `Failed`. examples/game_loop.rs is a complete 60 Hz loop; [`Receiver`] and [`Sender`] are
//! the same state machines for a single transfer.
//!
//! # Layers
//!
//! Dependencies point down only: the binary on `net`, `net` on `store` and `core`, `core` on
//! `wire`. All are private; this page lists what a game uses.
//!
//! - `wire`: the datagram format (docs/PROTOCOL.md), zero-copy decode, CRC32, and
//!   [`is_udpferry_datagram`], the cheap check that routes our datagrams off a shared socket.
//! - `core`: the sans-IO state machines ([`Endpoint`], [`Receiver`], [`Sender`]): no sockets,
//!   clocks, threads or files; time is an argument and object bytes go through [`ChunkSource`] /
//!   [`ChunkSink`].
//! - `store`: the file system: [`ContentStore`] (server), [`Cache`] and [`PartialFile`]
//!   (client, with a crash-safe resume journal), manifests for delta downloads, bundles.
//! - `net`: the `std::net::UdpSocket` driver ([`Driver`]), [`Client`] and [`Server`].
//!
//! The simulator that tests all of it in virtual time is a crate of its own, `udpferry-sim`
//! (sim/ in the repository), so that no game links it. docs/ARCHITECTURE.md explains the
//! design.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

// The layers are private: what a game needs is re-exported below. The `internals` feature
// (udpferry's own tests, benches, fuzz targets and simulator turn it on) opens them, hidden
// from the docs and without stability promises.
macro_rules! layers {
    ($($(#[$attr:meta])* $name:ident;)*) => {$(
        $(#[$attr])*
        #[cfg(feature = "internals")]
        #[doc(hidden)]
        pub mod $name;
        $(#[$attr])*
        #[cfg(not(feature = "internals"))]
        mod $name;
    )*};
}

mod random;

layers! {
    core;
    id;
    md5;
    net;
    store;
    wire;
}

pub use crate::core::{
    ChunkSink, ChunkSource, Completion, CongestionControl, DropStats, Endpoint, EndpointConfig,
    EndpointEvent, EndpointStats, Event, NoObjects, ObjectProvider, PrefixHasher, RangeSet,
    Receiver, Role, Sender, Stats, TransferConfig, TransferError, TransferId, TransferInfo,
    Transmit,
};
pub use crate::id::{ObjectId, ParseIdError};
pub use crate::net::{
    bind, canonical_addr, loopback_demo, panda3d_checksum, random_seed, Activity, BundleFetchError,
    BundleProgress, BundleReport, Client, DemoReport, Driver, FetchError, FetchOptions, FileError,
    FileFailure, Framing, Got, HashThread, Progress, Report, Server, ServerConfig, ServerHandle,
    ServerReport, ServerStatus, Waiting, CONCURRENT_FILES,
};
pub use crate::store::{
    BlockCheck, BundleInfo, Cache, CacheEntry, CacheListing, CleanReport, ContentStore,
    DamagedEntry, EntryLock, IndexChange, Lookup, ObjectInfo, PartialFile, Removed, Served,
    SkippedFile, StoreError, VerifyReport, CLEAN_AGE, JOURNAL_INTERVAL_BYTES,
    JOURNAL_INTERVAL_TIME,
};
pub use crate::wire::{is_udpferry_datagram, ConnectionId};
