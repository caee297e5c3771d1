"""A minimal Panda3D game server that names its map by MD5 and lets clients fetch it over the
game's own UDP connection with udpferry.

    python examples/panda3d/server.py --maps ./maps --port 7878
    python examples/panda3d/server.py --generate-mib 4 --port 7878 --seconds 30   # headless test

Every frame (60 Hz) it reads its UDP connection: udpferry's datagrams go to PandaFerry, the rest
are game packets (a client says ``HELO``). To every client heard from in the last 5 s it sends a
game state packet: ``STAT``, the frame number, and the id (MD5) of the current map, which the
client fetches from this same address and port. Prints ``map <md5> <bytes> <name>`` and
``listening on <port>``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

from direct.task.TaskManagerGlobal import taskMgr
from panda3d.core import (
    ConnectionWriter,
    Datagram,
    NetAddress,
    NetDatagram,
    QueuedConnectionManager,
    QueuedConnectionReader,
)

import udpferry
from udpferry.panda3d import PandaFerry

FRAME = 1 / 60


def main() -> int:
    ap = argparse.ArgumentParser(description="Panda3D game server serving its map with udpferry")
    ap.add_argument("--port", type=int, default=7878, help="UDP port (default 7878)")
    ap.add_argument("--maps", type=Path, help="serve every file of this directory; the first is the map")
    ap.add_argument("--generate-mib", type=float, default=4.0, help="without --maps: a random map of this size")
    ap.add_argument("--raw", action="store_true", help="Panda3D raw mode (no 2-byte checksum per datagram)")
    ap.add_argument("--seconds", type=float, default=0, help="stop after this long (default: run until Ctrl-C)")
    args = ap.parse_args()

    manager = QueuedConnectionManager()
    connection = manager.openUDPConnection(args.port)
    if connection is None:
        print(f"cannot open UDP port {args.port}", file=sys.stderr)
        return 1
    reader = QueuedConnectionReader(manager, 0)
    writer = ConnectionWriter(manager, 0)
    reader.setRawMode(args.raw)
    writer.setRawMode(args.raw)
    reader.addConnection(connection)

    # udpferry on the game's connection; a 4 MiB receive buffer holds a frame's worth of data.
    ferry = PandaFerry(writer, connection, recv_buffer=4 << 20, on_event=on_event)
    if args.maps:
        ferry.serve_dir(args.maps)
        files = sorted(p for p in args.maps.rglob("*") if p.is_file())
        if not files:
            print(f"no files under {args.maps}", file=sys.stderr)
            return 1
        map_bytes = files[0].read_bytes()
        map_name = files[0].name
    else:
        rng = random.Random(16)
        map_bytes = rng.randbytes(int(args.generate_mib * (1 << 20)))
        map_name = "generated.map"
        ferry.serve_bytes(map_bytes)
    map_id = udpferry.object_id(map_bytes)
    print(f"map {map_id} {len(map_bytes)} {map_name}", flush=True)
    print(f"listening on {args.port}", flush=True)

    clients = {}  # (host, port) -> [NetAddress, last heard]
    state = {"frame": 0}

    def network_task(task):
        now = time.monotonic()
        while reader.dataAvailable():
            dg = NetDatagram()
            if not reader.getData(dg) or ferry.handle(dg):
                continue  # udpferry's
            payload = dg.getMessage()
            if payload.startswith(b"HELO"):
                a = dg.getAddress()
                key = (a.getIpString(), a.getPort())
                if key not in clients:
                    # A dual-stack socket reports an IPv4 peer as ::ffff:a.b.c.d.
                    print(f"client {key[0].replace('::ffff:', '')}:{key[1]} joined", flush=True)
                    clients[key] = [NetAddress(a), now]
                clients[key][1] = now
        for key in [k for k, (_, heard) in clients.items() if now - heard > 5]:
            print(f"client {key[0].replace('::ffff:', '')}:{key[1]} left", flush=True)
            del clients[key]
        packet = b"STAT" + state["frame"].to_bytes(4, "little") + map_id.encode() + os.urandom(24)
        for address, _ in clients.values():
            writer.send(Datagram(packet), connection, address)
        ferry.pump()
        state["frame"] += 1
        return task.cont

    taskMgr.add(network_task, "network")
    # A ShowBase game would call base.run(); headless, step the task manager at 60 Hz.
    start = next_frame = time.monotonic()
    try:
        while not args.seconds or time.monotonic() - start < args.seconds:
            taskMgr.step()
            next_frame += FRAME
            delay = next_frame - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_frame = time.monotonic()
    except KeyboardInterrupt:
        pass
    s = ferry.stats()
    print(f"served {int(s['datagrams_out'])} udpferry datagrams; adapter per frame p50 "
          f"{s.get('p50', 0):.2f} ms, p95 {s.get('p95', 0):.2f} ms", flush=True)
    manager.closeConnection(connection)
    return 0


def on_event(event) -> None:
    if isinstance(event, udpferry.Completed) and not event.fetching:
        print(f"sent map {event.object} ({event.size} bytes) to {event.peer[0]}:{event.peer[1]}", flush=True)
    elif isinstance(event, udpferry.Failed) and not event.fetching:
        print(f"transfer to {event.peer[0]}:{event.peer[1]} failed: {event.error}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
