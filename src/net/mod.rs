//! A thin `std::net::UdpSocket` driver around the sans-IO [`Endpoint`].
//!
//! Two ways in:
//! - blocking: [`Client::fetch`] downloads one object into a cache, [`Server::bind`] +
//!   [`Server::run_until`] serve a [`ContentStore`];
//! - poll-style, for a game that keeps its own socket: use [`Endpoint`] directly (see
//!   examples/game_loop.rs): route datagrams for which
//!   [`is_udpferry_datagram`](crate::is_udpferry_datagram) is true to
//!   [`Endpoint::handle_datagram`], and once per tick drain [`Endpoint::poll_transmit`] into your
//!   socket.
//!
//! [`Driver`] is the whole socket loop: wait for a datagram or the endpoint's next timer, feed
//! the endpoint every queued datagram, fire its timer, send what is due in batches, hand out
//! events.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};


pub use crate::random::random_seed;

mod bundle;
mod demo;
mod client;
mod delta;
mod driver;
mod engine;
mod hasher;
mod multi;
mod server;
pub use bundle::{
    BundleFetchError, BundleProgress, BundleReport, FileError, FileFailure, CONCURRENT_FILES,
};
pub use demo::{loopback_demo, DemoReport};
pub use client::{Client, FetchError, FetchOptions, Got, Progress, Report, Waiting};
pub use driver::{canonical_addr, panda3d_checksum, Activity, Driver, Framing};
pub use hasher::HashThread;
pub use server::{Server, ServerConfig, ServerHandle, ServerReport, ServerStatus};

/// Socket buffer size requested for both directions (the kernel may grant less).
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;
/// Longest the blocking loops sleep without checking their stop flag or deadline.
const MAX_WAIT: Duration = Duration::from_millis(50);

/// Opens a UDP socket bound to `addr` with large send and receive buffers (socket2). An IPv6
/// wildcard address also accepts IPv4 where the system allows it.
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer only costs throughput.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        let _ = socket.set_only_v6(false);
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}
