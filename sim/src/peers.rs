//! The core's state machines as simulator [`Peer`]s, and a minimal one-object server.

use std::time::Instant;

use super::pair::Peer;
use udpferry::core::{ChunkSink, ChunkSource, Event, Receiver, Sender, TransferConfig};
use udpferry::id::ObjectId;
use udpferry::wire::{self, Datagram, ErrorCode, ErrorFrame, Frame};

impl<K: ChunkSink> Peer for Receiver<K> {
    fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) {
        Receiver::handle_datagram(self, now, datagram);
    }
    fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        Receiver::poll_transmit(self, now, buf)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        Receiver::poll_timeout(self)
    }
    fn handle_timeout(&mut self, now: Instant) {
        Receiver::handle_timeout(self, now);
    }
    fn is_finished(&self) -> bool {
        Receiver::is_finished(self)
    }
}

/// A server for one object and one transfer, enough to drive a [`Receiver`] through the
/// simulator: it answers the first request for its object with a [`Sender`], and any request for
/// another object with a not-found error. A request from another connection before the client's
/// start arrived replaces the sender (the first request may have been damaged in flight). It is
/// finished when its sender is, or once it has refused a request without ever starting a sender.
///
/// Events of the sender are collected in [`events`](Self::events).
pub struct OneShotServer<S> {
    object: ObjectId,
    size: u64,
    source: Option<S>,
    config: TransferConfig,
    nonce: u64,
    sender: Option<Sender<S>>,
    not_found: Option<wire::ConnectionId>,
    /// A not-found answer went out.
    refused: bool,
    /// Every event the sender reported, in order.
    pub events: Vec<Event>,
    /// Datagrams that were not for the transfer (before it started or for another connection).
    pub stray: u64,
}

impl<S: ChunkSource> OneShotServer<S> {
    /// Serves `source`, an object of `size` bytes named `object`, with `config`. `nonce` is the
    /// address-validation token (any value in a simulation).
    pub fn new(object: ObjectId, size: u64, source: S, config: TransferConfig, nonce: u64) -> Self {
        OneShotServer {
            object,
            size,
            source: Some(source),
            config,
            nonce,
            sender: None,
            not_found: None,
            refused: false,
            events: Vec::new(),
            stray: 0,
        }
    }

    /// The sender, once a request arrived.
    pub fn sender(&self) -> Option<&Sender<S>> {
        self.sender.as_ref()
    }
}

impl<S: ChunkSource> Peer for OneShotServer<S> {
    fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) {
        let decoded = wire::decode(datagram);
        if let Some(sender) = &mut self.sender {
            let replace = match &decoded {
                Ok(Datagram {
                    conn_id,
                    frame: Frame::Request(_),
                }) => {
                    let offering = !sender.is_sending() && !sender.is_finished();
                    *conn_id != sender.connection_id() && offering
                }
                _ => false,
            };
            if !replace {
                sender.handle_datagram(now, datagram);
                while let Some(e) = sender.poll_event() {
                    self.events.push(e);
                }
                return;
            }
            self.source = self.sender.take().map(Sender::into_source);
        }
        let Ok(Datagram {
            conn_id,
            frame: Frame::Request(request),
        }) = decoded
        else {
            self.stray += 1;
            return;
        };
        if request.object != self.object {
            self.not_found = Some(conn_id);
            return;
        }
        let Some(source) = self.source.take() else {
            return;
        };
        self.sender = Sender::accept(
            now,
            conn_id,
            &request,
            self.size,
            source,
            self.nonce,
            self.config.clone(),
        )
        .ok();
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        if let Some(conn_id) = self.not_found.take() {
            self.refused = true;
            return Datagram {
                conn_id,
                frame: Frame::Error(ErrorFrame {
                    code: ErrorCode::NotFound,
                    reason: "no such object",
                }),
            }
            .encode(buf)
            .ok();
        }
        let sender = self.sender.as_mut()?;
        let n = sender.poll_transmit(now, buf);
        while let Some(e) = sender.poll_event() {
            self.events.push(e);
        }
        n
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.sender.as_ref()?.poll_timeout()
    }

    fn handle_timeout(&mut self, now: Instant) {
        if let Some(sender) = &mut self.sender {
            sender.handle_timeout(now);
            while let Some(e) = sender.poll_event() {
                self.events.push(e);
            }
        }
    }

    fn is_finished(&self) -> bool {
        match &self.sender {
            Some(sender) => sender.is_finished(),
            None => self.refused,
        }
    }
}
