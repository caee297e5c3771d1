"""udpferry for Panda3D: fetch and serve maps over the game's own UDP connection.

``PandaFerry`` adapts a ``udpferry.Endpoint`` to Panda3D's networking
(``QueuedConnectionManager``, ``QueuedConnectionReader``, ``ConnectionWriter``), for a game that
polls its reader once a frame. Two ways to use it:

Shared connection (the game already has a UDP connection)::

    ferry = PandaFerry(writer, udp_connection)
    # every frame, in the game's network task:
    while reader.dataAvailable():
        dg = NetDatagram()
        if reader.getData(dg) and not ferry.handle(dg):
            game.on_datagram(dg)              # not udpferry's: the game's own packet
    ferry.pump()                             # timers, sending, events (once per frame)

Own connection (the game talks TCP, or wants udpferry on a port of its own)::

    ferry = PandaFerry.open(cManager, port=7878, task_mgr=taskMgr)   # a task does the rest
    transfer = ferry.fetch(server_host, 7878, map_md5, cache_dir="cache")
    ...
    ferry.downloads[transfer].state          # 'requested', 'queued', 'running', 'done', 'failed'

Framing: a Panda3D reader and writer in their default mode put a 2-byte checksum in front of
each UDP datagram and drop datagrams without one; in raw mode (``setRawMode(True)``) they send
the payload as it is. Two Panda3D peers just have to agree. Against the plain ``udpferry`` CLI
(or ``udpferry.Server``/``udpferry.fetch``) use raw mode, or run the CLI with
``--framing panda3d`` and keep Panda3D's default mode.

Panda3D is imported when a ``PandaFerry`` is made, not when this module is imported.
"""

from __future__ import annotations

import collections
import os
import socket
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from . import Completed, Endpoint, Failed, Progress, Queued, Started, is_udpferry_datagram

Address = Tuple[str, int]

__all__ = ["Download", "PandaFerry"]

_monotonic = time.monotonic
_perf = time.perf_counter


def _core() -> Any:
    try:
        import panda3d.core as core
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "udpferry.panda3d needs Panda3D: pip install panda3d (or udpferry[panda3d])"
        ) from e
    return core


class Download:
    """What the adapter knows about one fetch (``PandaFerry.downloads[transfer]``).

    ``state``: ``'requested'`` (asked, no answer yet), ``'queued'`` (the server is at its limit;
    ``ahead`` requests before this one), ``'running'``, ``'done'`` (verified: ``path`` for a
    fetch into a cache directory, ``data`` for one into memory) or ``'failed'`` (``error`` is the
    exception, a ``udpferry.Error``; a cache download keeps what arrived, so fetching again
    resumes).
    """

    __slots__ = (
        "transfer",
        "object",
        "peer",
        "state",
        "bytes_done",
        "total",
        "ahead",
        "path",
        "data",
        "error",
        "started_at",
        "finished_at",
    )

    def __init__(self, transfer: int, object: str, peer: Address) -> None:
        self.transfer = transfer
        self.object = object
        self.peer = peer
        self.state = "requested"
        self.bytes_done = 0
        self.total: Optional[int] = None
        self.ahead: Optional[int] = None
        self.path: Optional[str] = None
        self.data: Optional[bytes] = None
        self.error: Optional[BaseException] = None
        self.started_at = _monotonic()
        self.finished_at: Optional[float] = None

    @property
    def finished(self) -> bool:
        """True once the download is ``'done'`` or ``'failed'``."""
        return self.state in ("done", "failed")

    @property
    def fraction(self) -> float:
        """How much is done, 0.0 to 1.0 (0.0 while the size is unknown)."""
        if self.state == "done":
            return 1.0
        return self.bytes_done / self.total if self.total else 0.0

    def __repr__(self) -> str:
        return (
            f"Download(transfer={self.transfer}, object={self.object!r}, state={self.state!r}, "
            f"bytes_done={self.bytes_done}, total={self.total})"
        )


DownloadCallback = Callable[[Download], Any]
EventCallback = Callable[[Any], Any]


class PandaFerry:
    """A udpferry endpoint on a Panda3D UDP connection.

    Make it with the game's ``ConnectionWriter`` and UDP ``Connection`` (shared mode), or with
    ``PandaFerry.open(cManager, ...)`` (own connection, optionally driven by a task).

    Per frame, in this order:

    1. ``handle(dg)`` for every datagram the game's reader returned (it takes udpferry's and
       returns True; the game handles the rest), or ``receive_all(reader, on_game)``;
    2. ``pump()`` once: fires due timers, sends what udpferry wants to send through the writer,
       and turns events into ``downloads`` updates and callbacks.

    Callbacks (keyword arguments, all optional, called from ``pump``): ``on_progress(download)``,
    ``on_complete(download)``, ``on_failed(download)`` for this side's fetches, and
    ``on_event(event)`` for every event of either role (``udpferry.Started``, ``Queued``,
    ``Progress``, ``Completed``, ``Failed``).

    Other keyword arguments make the ``udpferry.Endpoint`` (``rate``, ``client_rate``,
    ``standard``, ``seed``, ``burst``) unless ``endpoint`` is given. ``burst`` (default 256) is
    how many datagrams a transfer may send in one go: at 60 Hz it bounds a transfer to about
    ``burst * 1200 * 60`` bytes a second.

    ``frame_times`` holds the adapter's own time (seconds) for each of the last ``history``
    frames: the ``handle`` calls since the previous ``pump`` plus the ``pump``; ``stats()``
    summarises it.

    ``recv_buffer``: if given, sets the connection's socket receive buffer (bytes; the kernel
    caps it at ``net.core.rmem_max``). A game that reads once a frame needs a frame's worth of
    udpferry datagrams to fit, or the kernel drops datagrams, the game's own among them; at 60 Hz
    and 16 MB/s that is about 270 KB of payload, more than Linux's default buffer (208 KiB,
    which counts kernel overhead too) holds. 4 MiB is plenty.
    """

    def __init__(
        self,
        writer: Any,
        connection: Any,
        endpoint: Optional[Endpoint] = None,
        *,
        on_progress: Optional[DownloadCallback] = None,
        on_complete: Optional[DownloadCallback] = None,
        on_failed: Optional[DownloadCallback] = None,
        on_event: Optional[EventCallback] = None,
        history: int = 3600,
        recv_buffer: Optional[int] = None,
        **endpoint_kwargs: Any,
    ) -> None:
        core = _core()
        if endpoint is not None and endpoint_kwargs:
            raise TypeError("pass either endpoint or Endpoint keyword arguments, not both")
        self.endpoint: Endpoint = endpoint if endpoint is not None else Endpoint(**endpoint_kwargs)
        self.writer = writer
        self.connection = connection
        if recv_buffer:
            connection.getSocket().SetRecvBufferSize(int(recv_buffer))
        self.on_progress = on_progress
        self.on_complete = on_complete
        self.on_failed = on_failed
        self.on_event = on_event
        #: Fetches started with ``fetch``, by transfer number.
        self.downloads: Dict[int, Download] = {}
        #: The adapter's time (seconds) in each of the last frames: ``handle`` calls + ``pump``.
        self.frame_times: Deque[float] = collections.deque(maxlen=history)
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.send_failures = 0
        self._handle_time = 0.0
        self._addresses: Dict[Address, Any] = {}
        self._NetAddress = core.NetAddress
        self._Datagram = core.Datagram
        self._NetDatagram = core.NetDatagram
        # Own-connection mode (set by ``open``).
        self.manager: Any = None
        self.reader: Any = None
        self.port: Optional[int] = None
        self.on_game_datagram: Optional[Callable[[Any], Any]] = None
        self._task: Any = None
        self._task_mgr: Any = None
        self._closed = False

    # ------------------------------------------------------------------ own connection mode

    @classmethod
    def open(
        cls,
        cManager: Any,
        port: int = 0,
        task_mgr: Any = None,
        raw: bool = False,
        *,
        recv_buffer: Optional[int] = 4 << 20,
        task_sort: int = -40,
        on_game_datagram: Optional[Callable[[Any], Any]] = None,
        **kwargs: Any,
    ) -> "PandaFerry":
        """Opens a UDP connection of its own on the game's ``QueuedConnectionManager``.

        ``port``: the UDP port to listen on (0: a free one; ``ferry.port`` tells which).
        ``raw``: Panda3D's raw mode for its reader and writer (no 2-byte checksum; what the
        plain ``udpferry`` CLI speaks); the default mode matches other Panda3D peers in default
        mode and ``udpferry ... --framing panda3d``. ``recv_buffer``: the socket's receive
        buffer in bytes (the kernel caps it at ``net.core.rmem_max``; a frame's worth of
        datagrams has to fit, None keeps the system's). With ``task_mgr`` (e.g. ShowBase's
        ``taskMgr``) a task reads the connection and calls ``pump`` every frame; without it,
        call ``poll()`` once a frame yourself. Datagrams that are not udpferry's go to
        ``on_game_datagram(dg)`` if given. Other keyword arguments are ``PandaFerry``'s.
        ``close()`` removes the task and closes the connection.
        """
        core = _core()
        connection = cManager.openUDPConnection(port)
        if connection is None:
            raise OSError(f"Panda3D could not open a UDP connection on port {port}")
        try:
            bound = _bind_any_port(connection) if port == 0 else port
            reader = core.QueuedConnectionReader(cManager, 0)
            writer = core.ConnectionWriter(cManager, 0)
            reader.setRawMode(bool(raw))
            writer.setRawMode(bool(raw))
            reader.addConnection(connection)
            ferry = cls(writer, connection, recv_buffer=recv_buffer, **kwargs)
        except BaseException:
            cManager.closeConnection(connection)
            raise
        ferry.manager = cManager
        ferry.reader = reader
        ferry.port = bound
        ferry.on_game_datagram = on_game_datagram
        if task_mgr is not None:
            ferry._task_mgr = task_mgr
            ferry._task = task_mgr.add(
                ferry._run_task, f"udpferry-{bound}-{id(ferry):x}", sort=task_sort
            )
        return ferry

    def _run_task(self, task: Any) -> Any:
        self.poll()
        return task.cont

    def poll(self) -> None:
        """Own-connection mode without a task: read every datagram waiting and ``pump``.

        Call it once a frame.
        """
        if self.reader is None:
            raise RuntimeError("poll() is for a PandaFerry made with PandaFerry.open()")
        self.receive_all(self.reader, self.on_game_datagram)
        self.pump()

    def close(self) -> None:
        """Removes the task and, in own-connection mode, closes the connection. Transfers in
        progress stop where they are: a later fetch of the same id into the same cache resumes
        from the last journal update (at most about 0.5 s of progress is fetched again)."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None and self._task_mgr is not None:
            self._task_mgr.remove(self._task)
            self._task = None
        if self.manager is not None:
            if self.reader is not None:
                self.reader.removeConnection(self.connection)
            self.manager.closeConnection(self.connection)

    def __enter__(self) -> "PandaFerry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ per frame

    def handle(self, dg: Any) -> bool:
        """Offers one received ``NetDatagram`` to udpferry. Returns True when it was
        udpferry's (it is consumed), False when it is the game's own packet.

        Call it for every datagram the reader returns, before ``pump``.
        """
        t0 = _perf()
        data = dg.getMessage()
        if not is_udpferry_datagram(data):
            self._handle_time += _perf() - t0
            return False
        a = dg.getAddress()
        self.endpoint.receive_datagram(data, (a.getIpString(), a.getPort()), _monotonic())
        self.datagrams_in += 1
        self._handle_time += _perf() - t0
        return True

    def receive_all(
        self, reader: Any, on_game: Optional[Callable[[Any], Any]] = None
    ) -> int:
        """Reads every datagram ``reader`` has: udpferry's go to the endpoint, the others to
        ``on_game(dg)`` (dropped without it). Returns how many datagrams were read.

        A faster replacement for the game's own read loop plus ``handle``; call it before
        ``pump``. The time spent in ``on_game`` is not counted as the adapter's.
        """
        t0 = _perf()
        game_time = 0.0
        n = 0
        ours = 0
        available = reader.dataAvailable
        get = reader.getData
        NetDatagram = self._NetDatagram
        receive = self.endpoint.receive_datagram
        is_ours = is_udpferry_datagram
        now = _monotonic()
        while available():
            dg = NetDatagram()
            if not get(dg):
                break
            n += 1
            data = dg.getMessage()
            if is_ours(data):
                a = dg.getAddress()
                receive(data, (a.getIpString(), a.getPort()), now)
                ours += 1
            elif on_game is not None:
                g0 = _perf()
                on_game(dg)
                game_time += _perf() - g0
        self.datagrams_in += ours
        self._handle_time += _perf() - t0 - game_time
        return n

    def pump(self, now: Optional[float] = None) -> None:
        """Once a frame, after the received datagrams went through ``handle``: fires udpferry's
        timers when due, sends everything it wants to send through the writer, and processes
        its events (``downloads``, callbacks). ``now``: ``time.monotonic()`` (the default)."""
        t0 = _perf()
        if now is None:
            now = _monotonic()
        ep = self.endpoint
        due = ep.get_timer()
        if due is not None and due <= now:
            ep.handle_timer(now)
        out = ep.datagrams_to_send(now)
        if out:
            send = self.writer.send
            conn = self.connection
            addresses = self._addresses
            Datagram = self._Datagram
            failed = 0
            for data, addr in out:
                na = addresses.get(addr)
                if na is None:
                    na = self._net_address(addr)
                if not send(Datagram(data), conn, na):
                    failed += 1
            self.datagrams_out += len(out)
            self.send_failures += failed
        event = ep.next_event()
        callbacks = 0.0
        while event is not None:
            c0 = _perf()
            self._dispatch(event)
            callbacks += _perf() - c0
            event = ep.next_event()
        self.frame_times.append(_perf() - t0 - callbacks + self._handle_time)
        self._handle_time = 0.0

    def _net_address(self, addr: Address) -> Any:
        host, port = addr
        na = self._NetAddress()
        if not na.setHost(host, port):
            raise OSError(f"Panda3D cannot address {host}:{port}")
        if len(self._addresses) > 4096:
            self._addresses.clear()
        self._addresses[addr] = na
        return na

    def _dispatch(self, event: Any) -> None:
        # Adapter bookkeeping is cheap; callbacks run after it (their time is not counted).
        if event.fetching:
            d = self.downloads.get(event.transfer)
            if d is None:
                d = Download(event.transfer, event.object, tuple(event.peer))
                self.downloads[event.transfer] = d
            cls = type(event)
            callback: Optional[DownloadCallback] = None
            if cls is Progress:
                d.state = "running"
                d.bytes_done = event.bytes_done
                d.total = event.total
                callback = self.on_progress
            elif cls is Started:
                d.state = "running"
                d.total = event.size
                callback = self.on_progress
            elif cls is Completed:
                d.state = "done"
                d.total = event.size
                d.bytes_done = event.size
                d.path = event.path
                d.data = event.data
                d.finished_at = _monotonic()
                callback = self.on_complete
            elif cls is Failed:
                d.state = "failed"
                d.error = event.error
                d.finished_at = _monotonic()
                callback = self.on_failed
            elif cls is Queued:
                d.state = "queued"
                d.ahead = event.ahead
            if callback is not None:
                callback(d)
        if self.on_event is not None:
            self.on_event(event)

    # ------------------------------------------------------------------ transfers

    def fetch(
        self, host: str, port: int, id: str, cache_dir: Optional["os.PathLike[str] | str"] = None
    ) -> int:
        """Starts fetching object ``id`` (MD5 hex) from ``host:port``; returns the transfer
        number (the key of ``downloads``). With ``cache_dir`` the object goes into that cache
        (resuming an earlier partial download; ``Download.path`` on completion), without it into
        memory (``Download.data``). An object already in the cache completes at the next
        ``pump`` with transfer number 0. The request leaves at the next ``pump``."""
        transfer = self.endpoint.fetch((host, port), id, cache_dir, _monotonic())
        d = Download(transfer, id.strip().lower(), (host, port))
        self.downloads[transfer] = d
        return transfer

    def cancel(self, transfer: int) -> None:
        """Stops a fetch; it ends ``'failed'`` at the next ``pump``."""
        self.endpoint.cancel(transfer)

    def serve_dir(self, path: "os.PathLike[str] | str") -> int:
        """Serves every file under ``path`` by the MD5 of its bytes (hashed now, once); returns
        how many objects."""
        return self.endpoint.serve_dir(path)

    def serve_bytes(self, data: bytes) -> str:
        """Serves ``data`` from memory; returns its id (the MD5, hex), the name to tell
        clients."""
        return self.endpoint.serve_bytes(data)

    # ------------------------------------------------------------------ measurements

    def stats(self) -> Dict[str, float]:
        """The adapter's time per frame over ``frame_times``, in milliseconds (``p50``,
        ``p95``, ``p99``, ``max``, ``mean``), and ``frames``, ``datagrams_in``,
        ``datagrams_out``, ``send_failures``."""
        times: List[float] = sorted(self.frame_times)
        out: Dict[str, float] = {
            "frames": float(len(times)),
            "datagrams_in": float(self.datagrams_in),
            "datagrams_out": float(self.datagrams_out),
            "send_failures": float(self.send_failures),
        }
        if times:
            def pick(q: float) -> float:
                return times[min(len(times) - 1, int(q * len(times)))] * 1e3

            out.update(
                p50=pick(0.50),
                p95=pick(0.95),
                p99=pick(0.99),
                max=times[-1] * 1e3,
                mean=sum(times) / len(times) * 1e3,
            )
        return out


def _bind_any_port(connection: Any) -> int:
    """Binds a Panda3D UDP connection opened with port 0 (Panda3D leaves it unbound until its
    first send) to a free port and returns it. Works on a duplicate of the socket's descriptor,
    which shares the socket."""
    fd = connection.getSocket().GetSocket()
    for family, any_host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            dup = socket.fromfd(fd, family, socket.SOCK_DGRAM)
        except OSError:
            continue
        try:
            name = dup.getsockname()
            if name[1]:
                return int(name[1])
            dup.bind((any_host, 0))
            return int(dup.getsockname()[1])
        except OSError:
            continue
        finally:
            dup.close()
    raise OSError("cannot bind the Panda3D UDP connection to a free port")
