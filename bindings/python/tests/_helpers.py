"""Shared pieces of the Python tests and the Panda3D bench (not a test module)."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import udpferry

REPO = Path(__file__).resolve().parents[3]
FRAME = 1.0 / 60.0


def udpferry_bin() -> Path:
    """The release CLI: $UDPFERRY_BIN, or <repo>/target/release/udpferry."""
    return Path(os.environ.get("UDPFERRY_BIN", REPO / "target" / "release" / "udpferry"))


def free_udp_port() -> int:
    """A UDP port that was free a moment ago (for peers that need to know theirs up front)."""
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        return s.getsockname()[1]
    finally:
        s.close()


# --------------------------------------------------------------------------- plain sockets


class SocketPeer:
    """A udpferry.Endpoint behind a plain non-blocking UDP socket on 127.0.0.1."""

    def __init__(self, **endpoint_kwargs) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.addr: Tuple[str, int] = self.sock.getsockname()
        self.ep = udpferry.Endpoint(**endpoint_kwargs)
        self.events: List[object] = []
        self.bytes_in = 0
        self.datagrams_in = 0
        self.first_out: List[bytes] = []

    def step(self) -> None:
        now = time.monotonic()
        while True:
            try:
                data, addr = self.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                break
            self.bytes_in += len(data)
            self.datagrams_in += 1
            self.ep.receive_datagram(data, addr[:2], now)
        due = self.ep.get_timer()
        if due is not None and due <= now:
            self.ep.handle_timer(now)
        for data, addr in self.ep.datagrams_to_send(now):
            if len(self.first_out) < 4:
                self.first_out.append(data)
            try:
                self.sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                pass
        while True:
            e = self.ep.next_event()
            if e is None:
                break
            self.events.append(e)

    def close(self) -> None:
        self.sock.close()


def run_peers(peers: List[SocketPeer], until, timeout: float = 20.0) -> float:
    """Steps every peer until ``until()`` is true; returns the elapsed time. Fails on timeout."""
    start = time.monotonic()
    while not until():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"no outcome after {timeout} s")
        for p in peers:
            p.step()
        timers = [p.ep.get_timer() for p in peers]
        wait = 0.005
        now = time.monotonic()
        for t in timers:
            if t is not None:
                wait = min(wait, max(0.0, t - now))
        select.select([p.sock for p in peers], [], [], wait)
    return time.monotonic() - start


def final_event(events: List[object], transfer: int):
    for e in events:
        if isinstance(e, (udpferry.Completed, udpferry.Failed)) and e.transfer == transfer and e.fetching:
            return e
    return None


# --------------------------------------------------------------------------- Panda3D loops

GAME_MAGIC = b"GAME"


def game_packet(seq: int, size: int = 48) -> bytes:
    """A game state packet: not udpferry's (it does not start with udpferry's magic)."""
    body = GAME_MAGIC + seq.to_bytes(4, "little")
    return body + bytes((seq + i) & 0xFF for i in range(size - len(body)))


class PandaGame:
    """One Panda3D game loop: its own QueuedConnectionManager, UDP connection, reader, writer,
    and a PandaFerry sharing the connection (the game's packets and udpferry's on one port)."""

    def __init__(self, raw: bool = False, recv_buffer: Optional[int] = 4 << 20, **ferry_kwargs) -> None:
        from panda3d.core import ConnectionWriter, QueuedConnectionManager, QueuedConnectionReader

        from udpferry.panda3d import PandaFerry

        self.manager = QueuedConnectionManager()
        self.connection = None
        for _ in range(20):
            self.port = free_udp_port()
            self.connection = self.manager.openUDPConnection(self.port)
            if self.connection is not None:
                break
        assert self.connection is not None, "cannot open a Panda3D UDP connection"
        self.reader = QueuedConnectionReader(self.manager, 0)
        self.writer = ConnectionWriter(self.manager, 0)
        self.reader.setRawMode(raw)
        self.writer.setRawMode(raw)
        self.reader.addConnection(self.connection)
        self.ferry = PandaFerry(self.writer, self.connection, recv_buffer=recv_buffer, **ferry_kwargs)
        self.game_sent = 0
        self.game_received: Dict[int, int] = {}
        self.bad_game_packets = 0
        self._peer_addresses: Dict[Tuple[str, int], object] = {}

    def frame(self, game_peer: Optional[Tuple[str, int]] = None) -> None:
        """One frame: read everything (udpferry's to the ferry, the rest is a game packet),
        send one game packet to ``game_peer``, then pump the ferry."""
        from panda3d.core import Datagram, NetAddress, NetDatagram

        reader = self.reader
        while reader.dataAvailable():
            dg = NetDatagram()
            if not reader.getData(dg):
                break
            if self.ferry.handle(dg):
                continue
            payload = dg.getMessage()
            if payload.startswith(GAME_MAGIC) and payload == game_packet(int.from_bytes(payload[4:8], "little")):
                seq = int.from_bytes(payload[4:8], "little")
                self.game_received[seq] = self.game_received.get(seq, 0) + 1
            else:
                self.bad_game_packets += 1
        if game_peer is not None:
            na = self._peer_addresses.get(game_peer)
            if na is None:
                na = NetAddress()
                na.setHost(*game_peer)
                self._peer_addresses[game_peer] = na
            packet = game_packet(self.game_sent)
            assert not udpferry.is_udpferry_datagram(packet)
            assert self.writer.send(Datagram(packet), self.connection, na)
            self.game_sent += 1
        self.ferry.pump()

    def close(self) -> None:
        self.reader.removeConnection(self.connection)
        self.manager.closeConnection(self.connection)


def run_frames(loops, until, timeout: float, frame: float = FRAME) -> int:
    """Steps ``loops`` (callables, one frame each) alternately on a ``frame`` clock until
    ``until()``; returns the number of frames. Fails on timeout."""
    start = time.monotonic()
    next_frame = start
    frames = 0
    while not until():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"no outcome after {timeout} s ({frames} frames)")
        for step in loops:
            step()
        frames += 1
        next_frame += frame
        delay = next_frame - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_frame = time.monotonic()
    return frames


def start_cli(args: List[str], cwd: Optional[Path] = None) -> subprocess.Popen:
    binary = udpferry_bin()
    if not binary.exists():
        raise AssertionError(
            f"{binary} is missing: cargo build --release --bin udpferry, or set UDPFERRY_BIN"
        )
    return subprocess.Popen(
        [str(binary), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )


def serve_cli(directory: Path, *extra: str) -> Tuple[subprocess.Popen, Dict[str, int], Tuple[str, int]]:
    """Starts ``udpferry serve DIR --listen 127.0.0.1:0 --list ...``; returns the process, the
    objects it listed ({md5: size}) and the address it listens on."""
    proc = start_cli(["serve", str(directory), "--listen", "127.0.0.1:0", "--list", *extra])
    objects: Dict[str, int] = {}
    deadline = time.monotonic() + 20
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            proc.kill()
            raise AssertionError(f"udpferry serve ended: {proc.stderr.read() if proc.stderr else ''}")
        words = line.split()
        if words[:1] == ["object"]:
            objects[words[1]] = int(words[2])
        elif line.startswith("listening on "):
            host, _, port = line[len("listening on ") :].strip().rpartition(":")
            return proc, objects, (host.strip("[]"), int(port))
    proc.kill()
    raise AssertionError("udpferry serve printed no address")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
