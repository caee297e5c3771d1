//! Two sans-IO state machines joined by two [`Link`]s, driven in virtual time.

use std::fmt;
use std::time::Instant;

use super::link::{Link, LinkConfig};
use super::rng::Rng;

/// Size of the buffer handed to [`Peer::poll_transmit`].
const TRANSMIT_BUF_LEN: usize = 65_536;

/// Most datagrams taken from one peer in one [`Pair::step`]; the rest are
/// drained in the following steps without advancing time.
const MAX_DRAIN_PER_STEP: usize = 10_000;

/// What the simulator needs from a sans-IO state machine.
///
/// udpferry's sender, receiver and endpoint implement it; tests implement it
/// for toy peers. The simulator only ever passes virtual time to these
/// methods, and never passes a time earlier than one it passed before.
pub trait Peer {
    /// Processes one datagram that arrived from the other side at `now`.
    fn handle_datagram(&mut self, now: Instant, datagram: &[u8]);
    /// Write the next datagram to send into buf and return its length, or None when nothing is due now.
    ///
    /// Called repeatedly until it returns `None`; `buf` is 65 536 bytes long
    /// and a returned length larger than that is truncated to it.
    fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize>;
    /// Returns when [`Peer::handle_timeout`] should next be called, or `None`
    /// if no timer is armed. A time in the past means "now".
    fn poll_timeout(&self) -> Option<Instant>;
    /// Fires the timer; called with `now >= poll_timeout()`.
    fn handle_timeout(&mut self, now: Instant);
    /// True once this side has nothing more to do (finished or failed).
    fn is_finished(&self) -> bool;
}

/// Which way a datagram travels; passed to the [`Pair::set_observer`] callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Sent by [`Pair::a`] towards [`Pair::b`] (over [`Pair::a_to_b`]).
    AtoB,
    /// Sent by [`Pair::b`] towards [`Pair::a`] (over [`Pair::b_to_a`]).
    BtoA,
}

/// Why [`Pair::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RunOutcome {
    /// Both peers report [`Peer::is_finished`].
    BothFinished,
    /// `max_steps` steps were taken in this call without finishing.
    StepLimit,
    /// The next event lies after the deadline; `now` was left at the deadline
    /// (or where it was, if already past it) with that event unprocessed, so
    /// a later `run` continues exactly where this one stopped.
    Deadline,
    /// No timer is armed and nothing is in flight, yet a peer is not finished:
    /// nothing can ever happen again.
    Stalled,
}

/// Callback invoked for each datagram a peer sends (before the link).
type Observer = Box<dyn FnMut(Instant, Direction, &[u8])>;

/// Result of one internal step.
enum StepResult {
    /// An event was processed.
    Progress,
    /// Nothing can ever happen again.
    Idle,
    /// The next event is after the given limit and was not processed.
    PastLimit,
}

/// Two peers connected by a link in each direction, with a virtual clock.
///
/// Build it with [`Pair::new`], then call [`Pair::run`] (or [`Pair::step`]
/// for fine control) and inspect the peers, the links' stats and `now`.
/// Virtual time jumps straight to the next event, so long transfers over slow
/// links run as fast as the CPU allows, and everything is reproducible from
/// `seed`.
pub struct Pair<A: Peer, B: Peer> {
    /// The first peer; its datagrams travel over `a_to_b`.
    pub a: A,
    /// The second peer; its datagrams travel over `b_to_a`.
    pub b: B,
    /// The link carrying datagrams from `a` to `b`.
    pub a_to_b: Link,
    /// The link carrying datagrams from `b` to `a`.
    pub b_to_a: Link,
    /// The current virtual time.
    pub now: Instant,
    /// The seed everything was derived from (print it to replay a failure).
    pub seed: u64,
    steps: u64,
    observer: Option<Observer>,
    buf: Vec<u8>,
}

impl<A: Peer, B: Peer> fmt::Debug for Pair<A, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pair")
            .field("a_to_b", &self.a_to_b)
            .field("b_to_a", &self.b_to_a)
            .field("now", &self.now)
            .field("seed", &self.seed)
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

impl<A: Peer, B: Peer> Pair<A, B> {
    /// Connects `a` and `b` with a link in each direction, starting the
    /// virtual clock at `start` (any `Instant`, e.g. one taken once at the
    /// start of a test). Each link gets its own random stream derived from
    /// `seed`.
    pub fn new(
        seed: u64,
        start: Instant,
        a: A,
        b: B,
        a_to_b: LinkConfig,
        b_to_a: LinkConfig,
    ) -> Self {
        let mut root = Rng::new(seed);
        let a_to_b = Link::new(a_to_b, root.fork());
        let b_to_a = Link::new(b_to_a, root.fork());
        Pair {
            a,
            b,
            a_to_b,
            b_to_a,
            now: start,
            seed,
            steps: 0,
            observer: None,
            buf: vec![0; TRANSMIT_BUF_LEN],
        }
    }

    /// Performs one iteration of the simulation.
    ///
    /// Drains both peers' [`Peer::poll_transmit`] into their links (at most
    /// 10 000 datagrams per peer per step), advances `now` to the earliest
    /// of the next link delivery and both peers' timeouts (never backwards;
    /// not at all while a peer still has datagrams waiting to be drained),
    /// delivers every datagram due at `now`, and fires the timer of each peer
    /// whose timeout is `<= now`. Returns `false`, without advancing time, if
    /// nothing could ever happen again (no timers, nothing in flight).
    pub fn step(&mut self) -> bool {
        matches!(self.step_until(None), StepResult::Progress)
    }

    /// Steps until both peers are finished, `max_steps` steps have been taken
    /// in this call, the next event lies after `deadline`, or the simulation
    /// has stalled, and says which.
    ///
    /// Finishing takes precedence: if both peers are finished on entry, no
    /// step is taken.
    pub fn run(&mut self, max_steps: u64, deadline: Instant) -> RunOutcome {
        let mut taken = 0u64;
        loop {
            if self.both_finished() {
                return RunOutcome::BothFinished;
            }
            if self.now > deadline {
                return RunOutcome::Deadline;
            }
            if taken >= max_steps {
                return RunOutcome::StepLimit;
            }
            let result = self.step_until(Some(deadline));
            // Draining may have finished a peer even if no event followed.
            if self.both_finished() {
                return RunOutcome::BothFinished;
            }
            match result {
                StepResult::Progress => taken += 1,
                StepResult::Idle => return RunOutcome::Stalled,
                StepResult::PastLimit => return RunOutcome::Deadline,
            }
        }
    }

    /// Returns how many steps have been taken since the pair was created.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Installs a callback invoked with (send time, direction, bytes) for
    /// every datagram a peer sends, before the link impairs it; tests use it
    /// to count or inspect traffic on the wire. Replaces any earlier one.
    #[allow(clippy::type_complexity)] // the signature spells out the callback for readers
    pub fn set_observer(&mut self, f: Box<dyn FnMut(Instant, Direction, &[u8])>) {
        self.observer = Some(f);
    }

    fn both_finished(&self) -> bool {
        self.a.is_finished() && self.b.is_finished()
    }

    /// One step; events after `limit` are left unprocessed.
    fn step_until(&mut self, limit: Option<Instant>) -> StepResult {
        let now = self.now;
        let a_more = drain(
            &mut self.a,
            &mut self.a_to_b,
            &mut self.buf,
            now,
            Direction::AtoB,
            &mut self.observer,
        );
        let b_more = drain(
            &mut self.b,
            &mut self.b_to_a,
            &mut self.buf,
            now,
            Direction::BtoA,
            &mut self.observer,
        );

        let next = if a_more || b_more {
            Some(now)
        } else {
            [
                self.a_to_b.next_delivery(),
                self.b_to_a.next_delivery(),
                self.a.poll_timeout(),
                self.b.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min()
        };
        let Some(next) = next else {
            return StepResult::Idle;
        };
        let next = next.max(now);
        if let Some(limit) = limit {
            if next > limit {
                self.now = now.max(limit);
                return StepResult::PastLimit;
            }
        }
        self.now = next;

        while let Some(d) = self.a_to_b.deliver(next) {
            self.b.handle_datagram(next, &d);
        }
        while let Some(d) = self.b_to_a.deliver(next) {
            self.a.handle_datagram(next, &d);
        }
        if self.a.poll_timeout().is_some_and(|t| t <= next) {
            self.a.handle_timeout(next);
        }
        if self.b.poll_timeout().is_some_and(|t| t <= next) {
            self.b.handle_timeout(next);
        }
        self.steps += 1;
        StepResult::Progress
    }
}

/// Moves up to [`MAX_DRAIN_PER_STEP`] datagrams from `peer` into `link`;
/// returns `true` if the cap was reached (the peer may have more).
fn drain<P: Peer>(
    peer: &mut P,
    link: &mut Link,
    buf: &mut [u8],
    now: Instant,
    direction: Direction,
    observer: &mut Option<Observer>,
) -> bool {
    for _ in 0..MAX_DRAIN_PER_STEP {
        let Some(len) = peer.poll_transmit(now, buf) else {
            return false;
        };
        let datagram = &buf[..len.min(buf.len())];
        if let Some(observe) = observer.as_mut() {
            observe(now, direction, datagram);
        }
        link.send(now, datagram);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::rc::Rc;
    use std::time::Duration;

    const MS: Duration = Duration::from_millis(1);

    /// Sends `total` numbered pings one at a time, retransmitting on timeout.
    struct Pinger {
        total: u32,
        next: u32,
        rto: Duration,
        timer: Option<Instant>,
        need_send: bool,
    }

    impl Pinger {
        fn new(total: u32) -> Self {
            Pinger {
                total,
                next: 0,
                rto: 50 * MS,
                timer: None,
                need_send: total > 0,
            }
        }
    }

    impl Peer for Pinger {
        fn handle_datagram(&mut self, _now: Instant, d: &[u8]) {
            if d.len() == 8 && &d[..4] == b"ECHO" {
                let k = u32::from_le_bytes([d[4], d[5], d[6], d[7]]);
                if k == self.next {
                    self.next += 1;
                    self.timer = None;
                    self.need_send = self.next < self.total;
                }
            }
        }

        fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
            if !self.need_send || self.next >= self.total {
                return None;
            }
            self.need_send = false;
            self.timer = Some(now + self.rto);
            buf[..4].copy_from_slice(b"PING");
            buf[4..8].copy_from_slice(&self.next.to_le_bytes());
            Some(8)
        }

        fn poll_timeout(&self) -> Option<Instant> {
            self.timer
        }

        fn handle_timeout(&mut self, _now: Instant) {
            self.timer = None;
            self.need_send = true;
        }

        fn is_finished(&self) -> bool {
            self.next >= self.total
        }
    }

    /// Echoes every ping; finished once it has seen the last one.
    struct Echoer {
        last: u32,
        pending: VecDeque<u32>,
        seen_last: bool,
    }

    impl Echoer {
        fn new(total: u32) -> Self {
            Echoer {
                last: total.saturating_sub(1),
                pending: VecDeque::new(),
                seen_last: total == 0,
            }
        }
    }

    impl Peer for Echoer {
        fn handle_datagram(&mut self, _now: Instant, d: &[u8]) {
            if d.len() == 8 && &d[..4] == b"PING" {
                let k = u32::from_le_bytes([d[4], d[5], d[6], d[7]]);
                self.seen_last |= k == self.last;
                self.pending.push_back(k);
            }
        }

        fn poll_transmit(&mut self, _now: Instant, buf: &mut [u8]) -> Option<usize> {
            let k = self.pending.pop_front()?;
            buf[..4].copy_from_slice(b"ECHO");
            buf[4..8].copy_from_slice(&k.to_le_bytes());
            Some(8)
        }

        fn poll_timeout(&self) -> Option<Instant> {
            None
        }

        fn handle_timeout(&mut self, _now: Instant) {}

        fn is_finished(&self) -> bool {
            self.seen_last
        }
    }

    /// Does nothing and never finishes.
    struct Idle;

    impl Peer for Idle {
        fn handle_datagram(&mut self, _now: Instant, _d: &[u8]) {}
        fn poll_transmit(&mut self, _now: Instant, _buf: &mut [u8]) -> Option<usize> {
            None
        }
        fn poll_timeout(&self) -> Option<Instant> {
            None
        }
        fn handle_timeout(&mut self, _now: Instant) {}
        fn is_finished(&self) -> bool {
            false
        }
    }

    /// Always has another (oversized-length) datagram to send.
    struct Firehose;

    impl Peer for Firehose {
        fn handle_datagram(&mut self, _now: Instant, _d: &[u8]) {}
        fn poll_transmit(&mut self, _now: Instant, _buf: &mut [u8]) -> Option<usize> {
            Some(usize::MAX)
        }
        fn poll_timeout(&self) -> Option<Instant> {
            None
        }
        fn handle_timeout(&mut self, _now: Instant) {}
        fn is_finished(&self) -> bool {
            false
        }
    }

    /// Fires a timer every `period` forever, starting at `next`.
    struct Ticker {
        next: Instant,
        period: Duration,
        fired: Vec<Instant>,
    }

    impl Peer for Ticker {
        fn handle_datagram(&mut self, _now: Instant, _d: &[u8]) {}
        fn poll_transmit(&mut self, _now: Instant, _buf: &mut [u8]) -> Option<usize> {
            None
        }
        fn poll_timeout(&self) -> Option<Instant> {
            Some(self.next)
        }
        fn handle_timeout(&mut self, now: Instant) {
            self.fired.push(now);
            self.next = now + self.period;
        }
        fn is_finished(&self) -> bool {
            false
        }
    }

    fn lossy() -> LinkConfig {
        LinkConfig::clean(20 * MS)
            .with_loss(0.2)
            .with_jitter(5 * MS)
            .with_duplicate(0.05)
    }

    fn ping_pair(seed: u64, start: Instant, total: u32) -> Pair<Pinger, Echoer> {
        Pair::new(
            seed,
            start,
            Pinger::new(total),
            Echoer::new(total),
            lossy(),
            lossy(),
        )
    }

    #[test]
    fn ping_pong_completes_over_lossy_link() {
        let seed = crate::seed_from_env(0x5EED);
        let start = Instant::now();
        let mut pair = ping_pair(seed, start, 200);
        let sent = Rc::new(RefCell::new([0u64; 2]));
        let counter = Rc::clone(&sent);
        pair.set_observer(Box::new(move |_, dir, d| {
            assert_eq!(d.len(), 8);
            counter.borrow_mut()[dir as usize] += 1;
        }));
        let outcome = pair.run(1_000_000, start + Duration::from_secs(3600));
        assert_eq!(outcome, RunOutcome::BothFinished, "seed {seed}");
        assert_eq!(pair.a.next, 200);
        assert!(pair.b.seen_last);
        let [a_sent, b_sent] = *sent.borrow();
        assert_eq!(pair.a_to_b.stats().offered, a_sent);
        assert_eq!(pair.b_to_a.stats().offered, b_sent);
        assert!(pair.a_to_b.stats().lost > 0, "seed {seed}");
        assert!(a_sent > 200, "no retransmissions (seed {seed})");
        // Each round trip takes at least 40 ms of virtual time.
        assert!(pair.now - start >= 200 * 40 * MS);
        assert!(pair.now - start < Duration::from_secs(3600));
    }

    /// (steps, elapsed virtual time, every datagram sent relative to start).
    type Trace = (u64, Duration, Vec<(Duration, Direction, Vec<u8>)>);

    fn trace(seed: u64, start: Instant) -> Trace {
        let mut pair = ping_pair(seed, start, 100);
        let log = Rc::new(RefCell::new(Vec::new()));
        let sink = Rc::clone(&log);
        pair.set_observer(Box::new(move |t, dir, d| {
            sink.borrow_mut().push((t - start, dir, d.to_vec()));
        }));
        let outcome = pair.run(1_000_000, start + Duration::from_secs(3600));
        assert_eq!(outcome, RunOutcome::BothFinished);
        let log = log.borrow().clone();
        (pair.steps(), pair.now - start, log)
    }

    #[test]
    fn identical_seeds_give_identical_runs() {
        let start = Instant::now();
        let (steps1, t1, log1) = trace(42, start);
        let (steps2, t2, log2) = trace(42, start);
        assert_eq!(steps1, steps2);
        assert_eq!(t1, t2);
        assert_eq!(log1, log2);
        // Independent of the base instant too.
        let (steps3, t3, log3) = trace(42, start + Duration::from_secs(5));
        assert_eq!((steps1, t1, &log1), (steps3, t3, &log3));
        let (steps4, t4, log4) = trace(43, start);
        assert!(steps4 != steps1 || t4 != t1 || log4 != log1);
    }

    #[test]
    fn stalled_when_nothing_can_happen() {
        let start = Instant::now();
        let mut pair = Pair::new(
            1,
            start,
            Idle,
            Idle,
            LinkConfig::default(),
            LinkConfig::default(),
        );
        assert!(!pair.step());
        assert_eq!(
            pair.run(100, start + Duration::from_secs(1)),
            RunOutcome::Stalled
        );
        assert_eq!(pair.steps(), 0);
        assert_eq!(pair.now, start);

        // A pinger with a zero retransmit timeout over a link that loses
        // everything retransmits at the same instant forever; only the step
        // limit stops it.
        let mut pinger = Pinger::new(1);
        pinger.rto = Duration::ZERO;
        let mut pair = Pair::new(
            2,
            start,
            pinger,
            Echoer::new(1),
            LinkConfig::default().with_loss(1.0),
            LinkConfig::default(),
        );
        assert_eq!(
            pair.run(50, start + Duration::from_secs(1)),
            RunOutcome::StepLimit
        );
    }

    /// Sends one datagram, then never anything again.
    struct OneShot(bool);

    impl Peer for OneShot {
        fn handle_datagram(&mut self, _now: Instant, _d: &[u8]) {}
        fn poll_transmit(&mut self, _now: Instant, buf: &mut [u8]) -> Option<usize> {
            if self.0 {
                return None;
            }
            self.0 = true;
            buf[0] = 1;
            Some(1)
        }
        fn poll_timeout(&self) -> Option<Instant> {
            None
        }
        fn handle_timeout(&mut self, _now: Instant) {}
        fn is_finished(&self) -> bool {
            false
        }
    }

    #[test]
    fn stalls_after_last_datagram_arrives() {
        let start = Instant::now();
        let mut pair = Pair::new(
            3,
            start,
            OneShot(false),
            Idle,
            LinkConfig::default(),
            LinkConfig::default(),
        );
        assert_eq!(
            pair.run(100, start + Duration::from_secs(1)),
            RunOutcome::Stalled
        );
        assert_eq!(pair.steps(), 1);
        assert_eq!(pair.now, start + 10 * MS);
        assert_eq!(pair.a_to_b.stats().delivered, 1);
    }

    #[test]
    fn step_limit_reached() {
        let start = Instant::now();
        let mut pair = ping_pair(4, start, 1000);
        assert_eq!(
            pair.run(5, start + Duration::from_secs(3600)),
            RunOutcome::StepLimit
        );
        assert_eq!(pair.steps(), 5);
        assert_eq!(
            pair.run(0, start + Duration::from_secs(3600)),
            RunOutcome::StepLimit
        );
        assert_eq!(pair.steps(), 5);
        assert_eq!(
            pair.run(7, start + Duration::from_secs(3600)),
            RunOutcome::StepLimit
        );
        assert_eq!(pair.steps(), 12);
    }

    #[test]
    fn deadline_reached_and_resumable() {
        let start = Instant::now();
        let deadline = start + 500 * MS;
        let mut pair = ping_pair(5, start, 100);
        assert_eq!(pair.run(1_000_000, deadline), RunOutcome::Deadline);
        assert_eq!(pair.now, deadline);
        assert!(!pair.a.is_finished());
        assert_eq!(pair.run(1_000_000, deadline - MS), RunOutcome::Deadline);
        assert_eq!(pair.now, deadline);

        // Running in many short slices gives exactly the uninterrupted run.
        let mut whole = ping_pair(5, start, 100);
        let end = start + Duration::from_secs(3600);
        assert_eq!(whole.run(1_000_000, end), RunOutcome::BothFinished);
        let mut sliced = ping_pair(5, start, 100);
        let mut limit = start;
        let outcome = loop {
            limit += 7 * MS;
            match sliced.run(1_000_000, limit) {
                RunOutcome::Deadline => assert_eq!(sliced.now, limit),
                other => break other,
            }
        };
        assert_eq!(outcome, RunOutcome::BothFinished);
        assert_eq!(sliced.steps(), whole.steps());
        assert_eq!(sliced.now, whole.now);
        assert_eq!(sliced.a_to_b.stats(), whole.a_to_b.stats());
    }

    #[test]
    fn deadline_with_endless_timer() {
        let start = Instant::now();
        let ticker = Ticker {
            next: start,
            period: 10 * MS,
            fired: Vec::new(),
        };
        let mut pair = Pair::new(
            6,
            start,
            ticker,
            Idle,
            LinkConfig::default(),
            LinkConfig::default(),
        );
        assert_eq!(pair.run(u64::MAX, start + 95 * MS), RunOutcome::Deadline);
        let expected: Vec<Instant> = (0..10).map(|k| start + 10 * MS * k).collect();
        assert_eq!(pair.a.fired, expected);
        assert_eq!(pair.now, start + 95 * MS);
    }

    #[test]
    fn past_timeout_fires_now_without_going_backwards() {
        let start = Instant::now();
        let ticker = Ticker {
            next: start,
            period: 10 * MS,
            fired: Vec::new(),
        };
        let later = start + Duration::from_secs(1);
        let mut pair = Pair::new(
            7,
            later,
            ticker,
            Idle,
            LinkConfig::default(),
            LinkConfig::default(),
        );
        assert!(pair.step());
        assert_eq!(pair.now, later);
        assert_eq!(pair.a.fired, vec![later]);
        assert!(pair.step());
        assert_eq!(pair.now, later + 10 * MS);
    }

    #[test]
    fn firehose_is_capped_per_step() {
        let start = Instant::now();
        let mut pair = Pair::new(
            8,
            start,
            Firehose,
            Idle,
            LinkConfig::default(),
            LinkConfig::default(),
        );
        assert!(pair.step());
        assert_eq!(pair.now, start, "time must not advance while draining");
        assert_eq!(pair.a_to_b.stats().offered, MAX_DRAIN_PER_STEP as u64);
        // Lengths beyond the buffer are truncated to it (and then exceed the
        // default MTU).
        assert_eq!(
            pair.a_to_b.stats().offered_bytes,
            (MAX_DRAIN_PER_STEP * TRANSMIT_BUF_LEN) as u64
        );
        assert_eq!(pair.a_to_b.stats().oversize, MAX_DRAIN_PER_STEP as u64);
        assert_eq!(
            pair.run(3, start + Duration::from_secs(1)),
            RunOutcome::StepLimit
        );
        assert_eq!(pair.a_to_b.stats().offered, 4 * MAX_DRAIN_PER_STEP as u64);
    }

    #[test]
    fn both_finished_takes_no_steps() {
        let start = Instant::now();
        let mut pair = ping_pair(9, start, 0);
        assert_eq!(pair.run(10, start), RunOutcome::BothFinished);
        assert_eq!(pair.steps(), 0);
        assert!(format!("{pair:?}").contains("Pair"));
    }
}
