//! What both sides of a transfer keep to report to their user and to tell the peer how it ended.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{Event, Stats, TransferError};
use crate::wire::{ConnectionId, Datagram, ErrorFrame, Frame};

/// Longest error reason an error frame carries.
const MAX_REASON: usize = 255;

/// The user-facing side of a transfer: queued events, whether it is over, the error frame still
/// owed to the peer, and progress throttling.
#[derive(Debug, Default)]
pub(crate) struct Report {
    events: VecDeque<Event>,
    finished: bool,
    error_for_peer: Option<TransferError>,
    last_progress: Option<Instant>,
}

impl Report {
    /// True once the final event is queued.
    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    /// Queues the final event.
    pub(crate) fn finish(&mut self, event: Event) {
        self.finished = true;
        self.events.push_back(event);
    }

    /// Ends the transfer with `error` (unless it already ended), owing the peer an error frame
    /// when the error is one to tell. Returns false when it had already ended.
    pub(crate) fn fail(&mut self, error: TransferError) -> bool {
        if self.finished {
            return false;
        }
        if error.code_for_peer().is_some() {
            self.error_for_peer = Some(error.clone());
        }
        self.finish(Event::Failed(error));
        true
    }

    /// Queues a progress event unless one was queued less than `interval` ago.
    pub(crate) fn progress(
        &mut self,
        now: Instant,
        interval: Duration,
        bytes_done: u64,
        total: u64,
    ) {
        // An interval too long to add to an instant means "never again".
        let too_soon = |t: Instant| t.checked_add(interval).is_none_or(|due| now < due);
        if self.last_progress.is_some_and(too_soon) {
            return;
        }
        self.last_progress = Some(now);
        self.events.push_back(Event::Progress { bytes_done, total });
    }

    /// Queues an event that is neither progress nor final.
    pub(crate) fn push(&mut self, event: Event) {
        self.events.push_back(event);
    }

    /// The next event for the user.
    pub(crate) fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Writes the error frame owed to the peer, if any.
    pub(crate) fn poll_error_frame(
        &mut self,
        conn_id: ConnectionId,
        stats: &mut Stats,
        buf: &mut [u8],
    ) -> Option<usize> {
        let error = self.error_for_peer.take()?;
        let code = error.code_for_peer()?;
        let reason = error.to_string();
        let mut end = reason.len().min(MAX_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let frame = Frame::Error(ErrorFrame {
            code,
            reason: &reason[..end],
        });
        emit(conn_id, stats, buf, frame)
    }
}

/// Encodes `frame` for `conn_id` into `buf` and counts it as sent.
pub(crate) fn emit(
    conn_id: ConnectionId,
    stats: &mut Stats,
    buf: &mut [u8],
    frame: Frame<'_>,
) -> Option<usize> {
    let n = Datagram { conn_id, frame }.encode(buf).ok()?;
    stats.datagrams_sent += 1;
    stats.bytes_sent += n as u64;
    Some(n)
}
