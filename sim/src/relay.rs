//! A link emulator for real sockets: a UDP relay on loopback that carries one client's
//! datagrams to a server and back through two [`Link`]s driven by the real clock.
//!
//! The simulator tests the core in virtual time; what users run (the binaries, the driver,
//! quinn for comparison) needs real sockets and a real clock. `tc netem` is not available
//! everywhere (and needs root), so this relay applies the same [`LinkConfig`] impairments in
//! user space: a bottleneck rate with a drop-tail queue, one-way delay, jitter, random and
//! Gilbert-Elliott burst loss, duplication. Use it in benches (and in tests that assert only
//! what does not depend on timing):
//!
//! ```no_run
//! use std::time::Duration;
//! use udpferry_sim::{LinkConfig, Relay};
//! # fn server_addr() -> std::net::SocketAddr { "127.0.0.1:7878".parse().unwrap() }
//! // 4 MiB/s down with a 100 ms queue, 20 ms each way (40 ms RTT), 2% random loss each way.
//! let rate = 4 << 20;
//! let down = LinkConfig::clean(Duration::from_millis(20))
//!     .with_bottleneck(rate, rate as usize / 10)
//!     .with_loss(0.02);
//! let up = LinkConfig::clean(Duration::from_millis(20)).with_loss(0.02);
//! let relay = Relay::start(server_addr(), up, down, 0x5eed).unwrap();
//! // The client talks to `relay.addr()` as if it were the server.
//! let (up_stats, down_stats) = relay.stats();
//! ```
//!
//! One relay serves one client: the first address that sends to it is the client, and replies
//! go there. Timing is as good as the threads' wake-ups (a few tens of microseconds on an idle
//! machine): fine for links of a few MB/s and milliseconds of delay, not for 10 Gbit/s.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{Link, LinkConfig, LinkStats, Rng};

/// Longest a relay thread blocks in `recv` before it looks at its link and the stop flag.
const MAX_WAIT: Duration = Duration::from_millis(5);
/// Shortest read timeout (a zero timeout means "block forever" to `set_read_timeout`).
const MIN_WAIT: Duration = Duration::from_micros(50);

/// A running link emulator between one client and `server`; stopped when dropped. See the
/// module docs.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    links: Arc<[Mutex<Link>; 2]>,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Starts a relay on an ephemeral loopback port that forwards to `server` through `up`
    /// (client to server) and back through `down`, with randomness from `seed`.
    pub fn start(
        server: SocketAddr,
        up: LinkConfig,
        down: LinkConfig,
        seed: u64,
    ) -> io::Result<Relay> {
        let local = SocketAddr::new(server.ip(), 0);
        // Client side: what the client sends to. Server side: what the server answers to.
        let client_side = UdpSocket::bind(local)?;
        let server_side = UdpSocket::bind(local)?;
        server_side.connect(server)?;
        let addr = client_side.local_addr()?;
        let mut rng = Rng::new(seed);
        let links = Arc::new([
            Mutex::new(Link::new(up, rng.fork())),
            Mutex::new(Link::new(down, rng.fork())),
        ]);
        let stop = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let mut threads = Vec::new();
        // Upstream: read the client, deliver to the server.
        {
            let (rx, tx) = (client_side.try_clone()?, server_side.try_clone()?);
            let (links, stop, client) = (links.clone(), stop.clone(), client.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("relay-up".into())
                    .spawn(move || {
                        pump(
                            &rx,
                            &links[0],
                            &stop,
                            |from| {
                                *locked(&client) = Some(from);
                                true
                            },
                            |bytes| {
                                let _ = tx.send(bytes);
                            },
                        )
                    })?,
            );
        }
        // Downstream: read the server, deliver to the client.
        {
            let (rx, tx) = (server_side, client_side);
            let (links, stop) = (links.clone(), stop.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("relay-down".into())
                    .spawn(move || {
                        pump(
                            &rx,
                            &links[1],
                            &stop,
                            |_| true,
                            |bytes| {
                                if let Some(to) = *locked(&client) {
                                    let _ = tx.send_to(bytes, to);
                                }
                            },
                        )
                    })?,
            );
        }
        Ok(Relay {
            addr,
            stop,
            links,
            threads,
        })
    }

    /// The address a client sends to instead of the server's.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What each direction did so far: (client to server, server to client).
    pub fn stats(&self) -> (LinkStats, LinkStats) {
        (
            locked(&self.links[0]).stats().clone(),
            locked(&self.links[1]).stats().clone(),
        )
    }

    /// Changes a direction's impairments from now on (`up`: client to server), e.g. to halve
    /// the bottleneck mid-transfer. Datagrams already on the link keep their schedule.
    pub fn set_config(&self, up: bool, config: LinkConfig) {
        locked(&self.links[usize::from(!up)]).set_config(config);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One direction: datagrams read from `rx` (from a sender `accept` agrees to) enter `link` at
/// the real time they arrive, and leave through `deliver` when the link says they arrive.
fn pump(
    rx: &UdpSocket,
    link: &Mutex<Link>,
    stop: &AtomicBool,
    mut accept: impl FnMut(SocketAddr) -> bool,
    mut deliver: impl FnMut(&[u8]),
) {
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let wait = {
            let mut link = locked(link);
            loop {
                let now = Instant::now();
                match link.deliver(now) {
                    Some(bytes) => deliver(&bytes),
                    None => {
                        break link
                            .next_delivery()
                            .map_or(MAX_WAIT, |at| at.saturating_duration_since(now))
                    }
                }
            }
        };
        if rx
            .set_read_timeout(Some(wait.clamp(MIN_WAIT, MAX_WAIT)))
            .is_err()
        {
            return;
        }
        match rx.recv_from(&mut buf) {
            Ok((n, from)) => {
                if accept(from) {
                    locked(link).send(Instant::now(), &buf[..n]);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_server() -> (SocketAddr, Arc<AtomicBool>, JoinHandle<()>) {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let addr = s.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], from);
                }
            }
        });
        (addr, stop, t)
    }

    fn client() -> UdpSocket {
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        c
    }

    /// Datagrams go through both ways, never sooner than the two delays, and are counted.
    #[test]
    fn carries_both_ways_after_the_delay() {
        let (server, stop, t) = echo_server();
        let delay = Duration::from_millis(15);
        let relay = Relay::start(
            server,
            LinkConfig::clean(delay),
            LinkConfig::clean(delay),
            1,
        )
        .unwrap();
        let c = client();
        for i in 0..5u8 {
            let sent = Instant::now();
            c.send_to(&[i; 100], relay.addr()).unwrap();
            let mut buf = [0u8; 200];
            let (n, from) = c.recv_from(&mut buf).unwrap();
            assert_eq!((n, from, buf[0]), (100, relay.addr(), i));
            assert!(
                sent.elapsed() >= 2 * delay,
                "round trip {:?}",
                sent.elapsed()
            );
        }
        let (up, down) = relay.stats();
        assert_eq!((up.offered, up.delivered), (5, 5));
        assert_eq!((down.offered, down.delivered), (5, 5));
        drop(relay);
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
    }

    /// Loss and the bottleneck's drop-tail queue drop what the configuration says, whatever
    /// the timing: everything with loss 1, all but about a queue's worth of a burst otherwise.
    #[test]
    fn drops_by_loss_and_by_a_full_queue() {
        let (server, stop, t) = echo_server();
        let lossy = Relay::start(
            server,
            LinkConfig::clean(Duration::ZERO).with_loss(1.0),
            LinkConfig::clean(Duration::ZERO),
            2,
        )
        .unwrap();
        let c = client();
        for _ in 0..20 {
            c.send_to(&[7; 100], lossy.addr()).unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        let (up, _) = lossy.stats();
        assert_eq!((up.offered, up.lost, up.delivered), (20, 20, 0));
        drop(lossy);

        // 10 KB/s with a 2 KB queue: a burst of 50 datagrams of 1000 bytes keeps about 2.
        let narrow = Relay::start(
            server,
            LinkConfig::clean(Duration::ZERO).with_bottleneck(10_000, 2_000),
            LinkConfig::clean(Duration::ZERO),
            3,
        )
        .unwrap();
        for _ in 0..50 {
            c.send_to(&[9; 1000], narrow.addr()).unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        let (up, _) = narrow.stats();
        assert_eq!(up.offered, 50, "{up:?}");
        assert!(
            up.queue_dropped >= 45 && up.queue_dropped + up.lost < 50,
            "the queue holds about two datagrams: {up:?}"
        );
        drop(narrow);
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
    }
}
