//! No heap allocation per datagram in steady state, on either side of an `Endpoint`.
//!
//! A server endpoint and a client endpoint run in memory: datagrams move between them by hand
//! through a modelled link (a bottleneck with a drop-tail queue and a propagation delay) on a
//! virtual clock. A counting global allocator counts allocations made inside the endpoints'
//! calls only (the harness's own bookkeeping is not counted), once the transfers are running.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use udpferry::core::{Endpoint, EndpointConfig, Event, NoObjects, RangeSet, TransferConfig};
use udpferry::ObjectId;

// ---------------------------------------------------------------------------------------------
// A global allocator that counts allocations (alloc, alloc_zeroed, realloc) while the calling
// thread's flag is set.

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn note() {
    // `try_with`: an allocation during thread teardown is simply not counted.
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call forwards to the system allocator unchanged; the counting touches only an
// atomic and a const-initialised thread-local, neither of which allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` with counting on (when `on`), and returns its result and the allocations it made.
fn counted<T>(on: bool, f: impl FnOnce() -> T) -> (T, u64) {
    if !on {
        return (f(), 0);
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    COUNTING.with(|c| c.set(true));
    let out = f();
    COUNTING.with(|c| c.set(false));
    (out, ALLOCATIONS.load(Ordering::Relaxed) - before)
}

// ---------------------------------------------------------------------------------------------
// A one-way link: a bottleneck of `rate` bytes per second with a drop-tail queue of `queue`
// datagrams, then `delay` of propagation; it also loses every `lose_every`th datagram, so that
// the measured window includes losses, gaps and repeats. The harness is not counted.

struct Link {
    rate: u64,
    delay: Duration,
    queue: usize,
    lose_every: u64,
    offered: u64,
    /// Datagrams dropped (queue full or lost), all told.
    dropped: u64,
    /// When the bottleneck finishes serialising what it holds.
    free_at: Instant,
    /// (delivery instant, leaves the bottleneck at, length, bytes).
    flight: VecDeque<(Instant, Instant, usize, Box<[u8; 1500]>)>,
    /// Buffers move between `flight` and here as boxes, so no 1500-byte copy per datagram.
    #[allow(clippy::vec_box)]
    spare: Vec<Box<[u8; 1500]>>,
}

impl Link {
    fn new(now: Instant, rate: u64, delay: Duration, queue: usize, lose_every: u64) -> Self {
        Link {
            rate,
            delay,
            queue,
            lose_every,
            offered: 0,
            dropped: 0,
            free_at: now,
            flight: VecDeque::with_capacity(4096),
            spare: (0..4096).map(|_| Box::new([0u8; 1500])).collect(),
        }
    }

    fn send(&mut self, now: Instant, data: &[u8]) {
        self.offered += 1;
        let queued = self.flight.iter().filter(|f| f.1 > now).count();
        if queued >= self.queue || self.offered.is_multiple_of(self.lose_every) {
            self.dropped += 1;
            return;
        }
        let start = self.free_at.max(now);
        let leaves = start + Duration::from_nanos(data.len() as u64 * 1_000_000_000 / self.rate);
        self.free_at = leaves;
        let mut buf = self.spare.pop().unwrap_or_else(|| Box::new([0u8; 1500]));
        buf[..data.len()].copy_from_slice(data);
        self.flight
            .push_back((leaves + self.delay, leaves, data.len(), buf));
    }

    fn next_delivery(&self) -> Option<Instant> {
        self.flight.front().map(|f| f.0)
    }
}

// ---------------------------------------------------------------------------------------------

type Objects = HashMap<ObjectId, Arc<[u8]>>;

fn object(size: usize, seed: u64) -> Vec<u8> {
    // xorshift64*: deterministic, incompressible enough.
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..size)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// What one run measured, over the steady-state window.
#[derive(Debug, Default)]
struct Figures {
    server_allocations: u64,
    server_datagrams: u64,
    client_allocations: u64,
    client_datagrams: u64,
    /// Allocations inside the server's handling of acknowledgements (window sharing among them).
    ack_allocations: u64,
    acks: u64,
    /// Datagrams the links dropped inside the window (down, up).
    dropped: (u64, u64),
}

impl Figures {
    fn server_per_datagram(&self) -> f64 {
        self.server_allocations as f64 / self.server_datagrams.max(1) as f64
    }
    fn client_per_datagram(&self) -> f64 {
        self.client_allocations as f64 / self.client_datagrams.max(1) as f64
    }
    fn per_ack(&self) -> f64 {
        self.ack_allocations as f64 / self.acks.max(1) as f64
    }
}

const SERVER: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)),
    4000,
);
const CLIENT: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2)),
    5000,
);

/// Downloads `transfers` objects of `size` bytes at once from a server endpoint to a client
/// endpoint, counting allocations while the server has sent datagrams number `warmup` to
/// `warmup + window`; then runs to the end and checks every object arrived intact.
fn run(transfers: usize, size: usize, warmup: u64, window: u64) -> Figures {
    let config = EndpointConfig {
        transfer: TransferConfig::default(),
        max_transfers_per_address: transfers.max(8),
        seed: 7,
        ..EndpointConfig::default()
    };
    let objects: Vec<Arc<[u8]>> = (0..transfers)
        .map(|i| Arc::from(object(size, i as u64 + 1)))
        .collect();
    let ids: Vec<ObjectId> = objects.iter().map(|o| ObjectId::md5_of(o)).collect();
    let provider: Objects = ids.iter().copied().zip(objects.iter().cloned()).collect();

    let start = Instant::now();
    let mut now = start;
    let mut server: Endpoint<Objects, Vec<u8>> = Endpoint::new(config.clone(), provider);
    let mut client: Endpoint<NoObjects, Vec<u8>> = Endpoint::new(config, NoObjects);
    // 100 Mbit/s down, 10 Mbit/s up, 10 ms each way, a queue of 100 datagrams; one datagram
    // in 250 lost down, one in 100 up.
    let mut down = Link::new(now, 12_500_000, Duration::from_millis(10), 100, 250);
    let mut up = Link::new(now, 1_250_000, Duration::from_millis(10), 100, 100);

    let handles: Vec<_> = ids
        .iter()
        .map(|id| client.fetch(now, SERVER, *id, &RangeSet::new(), Vec::with_capacity(size)))
        .collect();

    let mut buf = vec![0u8; 1500];
    let mut figures = Figures::default();
    let mut completed = 0;
    let mut sent_by_server = 0u64;
    let deadline = start + Duration::from_secs(600);
    while completed < transfers {
        assert!(now < deadline, "the transfers stalled");
        let measuring = sent_by_server >= warmup && sent_by_server < warmup + window;
        let dropped_before = (down.dropped, up.dropped);

        // Deliver what has arrived.
        while down.next_delivery().is_some_and(|t| t <= now) {
            let (_, _, len, data) = down.flight.pop_front().unwrap();
            let ((), n) = counted(measuring, || {
                client.handle_datagram(now, SERVER, &data[..len])
            });
            down.spare.push(data);
            if measuring {
                figures.client_allocations += n;
                figures.client_datagrams += 1;
            }
        }
        while up.next_delivery().is_some_and(|t| t <= now) {
            let (_, _, len, data) = up.flight.pop_front().unwrap();
            let is_ack = udpferry::wire::decode(&data[..len])
                .is_ok_and(|d| matches!(d.frame, udpferry::wire::Frame::Ack(_)));
            let ((), n) = counted(measuring, || {
                server.handle_datagram(now, CLIENT, &data[..len])
            });
            up.spare.push(data);
            if measuring {
                figures.server_allocations += n;
                figures.server_datagrams += 1;
                if is_ack {
                    figures.ack_allocations += n;
                    figures.acks += 1;
                }
            }
        }

        // Timers.
        let (due, n) = counted(measuring, || server.poll_timeout());
        figures.server_allocations += n;
        if due.is_some_and(|t| t <= now) {
            let ((), n) = counted(measuring, || server.handle_timeout(now));
            figures.server_allocations += n;
        }
        let (due, n) = counted(measuring, || client.poll_timeout());
        figures.client_allocations += n;
        if due.is_some_and(|t| t <= now) {
            let ((), n) = counted(measuring, || client.handle_timeout(now));
            figures.client_allocations += n;
        }

        // Send.
        loop {
            let (t, n) = counted(measuring, || server.poll_transmit(now, &mut buf));
            figures.server_allocations += n;
            let Some(t) = t else { break };
            assert_eq!(t.destination, CLIENT);
            down.send(now, &buf[..t.len]);
            sent_by_server += 1;
            if measuring {
                figures.server_datagrams += 1;
            }
        }
        loop {
            let (t, n) = counted(measuring, || client.poll_transmit(now, &mut buf));
            figures.client_allocations += n;
            let Some(t) = t else { break };
            assert_eq!(t.destination, SERVER);
            up.send(now, &buf[..t.len]);
            if measuring {
                figures.client_datagrams += 1;
            }
        }

        // Events.
        loop {
            let (e, n) = counted(measuring, || server.poll_event());
            figures.server_allocations += n;
            let Some(e) = e else { break };
            if let Event::Failed(err) = e.event {
                panic!("server transfer failed: {err}");
            }
        }
        loop {
            let (e, n) = counted(measuring, || client.poll_event());
            figures.client_allocations += n;
            let Some(e) = e else { break };
            match e.event {
                Event::Completed(_) => {
                    assert!(
                        !measuring,
                        "a transfer completed inside the measured window"
                    );
                    completed += 1;
                }
                Event::Failed(err) => panic!("download failed: {err}"),
                _ => {}
            }
        }

        if measuring {
            figures.dropped.0 += down.dropped - dropped_before.0;
            figures.dropped.1 += up.dropped - dropped_before.1;
        }

        // Advance the virtual clock to the next thing that happens.
        let next = [
            down.next_delivery(),
            up.next_delivery(),
            server.poll_timeout(),
            client.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
        .expect("something is pending while transfers run");
        now = now.max(next);
    }
    assert!(
        sent_by_server >= warmup + window,
        "the transfers ended before the measured window did ({sent_by_server} datagrams)"
    );
    for (i, handle) in handles.into_iter().enumerate() {
        let sink = client
            .take_sink(handle)
            .expect("a finished download gives its sink");
        assert!(sink[..] == objects[i][..], "object {i} arrived intact");
    }
    figures
}

fn report(transfers: usize, f: &Figures) {
    println!(
        "{transfers:>2} transfer(s): server {} allocations / {} datagrams (sent and received) = \
         {:.4} per datagram; client {} / {} = {:.4}; server handling acks {} / {} = {:.4} per ack; dropped {} down, {} up",
        f.server_allocations,
        f.server_datagrams,
        f.server_per_datagram(),
        f.client_allocations,
        f.client_datagrams,
        f.client_per_datagram(),
        f.ack_allocations,
        f.acks,
        f.per_ack(),
        f.dropped.0,
        f.dropped.1,
    );
}

fn check(transfers: usize, f: &Figures) {
    assert!(
        f.server_per_datagram() <= 0.01,
        "server allocates {:.4} per datagram with {transfers} transfer(s)",
        f.server_per_datagram()
    );
    assert!(
        f.client_per_datagram() <= 0.01,
        "client allocates {:.4} per datagram with {transfers} transfer(s)",
        f.client_per_datagram()
    );
    assert!(
        f.per_ack() <= 0.01,
        "the server allocates {:.4} per ack with {transfers} transfer(s)",
        f.per_ack()
    );
}

// One test function, so that the two cases are measured one after the other, and both
// figures are printed before either is checked.
#[test]
fn steady_state_allocates_nothing_per_datagram_with_1_and_16_transfers() {
    // 20,000 datagrams from the server after 4,000 of warm-up; objects large enough that none
    // completes inside the window.
    let one = run(1, 48 << 20, 4_000, 20_000);
    report(1, &one);
    let sixteen = run(16, 3 << 20, 4_000, 20_000);
    report(16, &sixteen);
    check(1, &one);
    check(16, &sixteen);
}
