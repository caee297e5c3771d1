"""udpferry: reliable file transfer over a game's own UDP socket.

A game server names the map of the next match by the MD5 of its bytes; a client without it
fetches it over the game's UDP connection, verified, resumable, paced so the game's own packets
keep their latency.

- ``fetch(server, id, ...)`` and ``Server(dir, ...)``: blocking client and threaded server.
- ``Endpoint``: the sans-IO endpoint for a game that keeps its socket (``receive_datagram``,
  ``datagrams_to_send``, ``get_timer``, ``handle_timer``, ``next_event``).
- ``udpferry.panda3d.PandaFerry``: the adapter for a Panda3D ``QueuedConnectionReader`` loop.

Every error is a ``udpferry.Error``: ``NotFound``, ``TimedOut``, ``DigestMismatch``, ``Busy``,
``ProtocolError``, ``StorageError``, ``Stopped``. A malformed id raises ``ValueError``.
"""

from ._udpferry import (
    Busy,
    Completed,
    DigestMismatch,
    Endpoint,
    Error,
    Failed,
    NotFound,
    Progress,
    ProtocolError,
    Queued,
    Server,
    Started,
    Stopped,
    StorageError,
    TimedOut,
    fetch,
    is_udpferry_datagram,
    object_id,
)

__all__ = [
    "Busy",
    "Completed",
    "DigestMismatch",
    "Endpoint",
    "Error",
    "Failed",
    "NotFound",
    "Progress",
    "ProtocolError",
    "Queued",
    "Server",
    "Started",
    "Stopped",
    "StorageError",
    "TimedOut",
    "fetch",
    "is_udpferry_datagram",
    "object_id",
]
