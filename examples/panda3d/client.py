"""A minimal Panda3D game client that joins examples/panda3d/server.py, keeps exchanging game
packets, and fetches the map (named by its MD5 in the server's state packets) mid-game over the
same UDP connection with udpferry.

    python examples/panda3d/client.py 127.0.0.1 7878 --cache ./cache
    python examples/panda3d/client.py 127.0.0.1 7878 --seconds 20   # headless, fails after 20 s

Prints a progress line a few times a second, ``map <md5> ready: <path>`` once the download is
verified, and the game packets sent and received; exits 0 once the map is here (after
``--linger`` more seconds of play), 1 if it is not after ``--seconds``.
"""

from __future__ import annotations

import argparse
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

from udpferry.panda3d import Download, PandaFerry

FRAME = 1 / 60


def main() -> int:
    ap = argparse.ArgumentParser(description="Panda3D game client fetching the map with udpferry")
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--cache", type=Path, default=Path("udpferry-cache"), help="map cache directory")
    ap.add_argument("--raw", action="store_true", help="Panda3D raw mode (as the server)")
    ap.add_argument("--seconds", type=float, default=60, help="give up after this long (default 60)")
    ap.add_argument("--linger", type=float, default=0.5, help="seconds of play after the map arrived")
    args = ap.parse_args()

    manager = QueuedConnectionManager()
    connection = manager.openUDPConnection(0)  # any port: bound by the first send
    reader = QueuedConnectionReader(manager, 0)
    writer = ConnectionWriter(manager, 0)
    reader.setRawMode(args.raw)
    writer.setRawMode(args.raw)
    reader.addConnection(connection)
    server = NetAddress()
    if not server.setHost(args.host, args.port):
        print(f"cannot resolve {args.host}", file=sys.stderr)
        return 1

    last_line = [0.0]

    def on_progress(d: Download) -> None:
        now = time.monotonic()
        if now - last_line[0] >= 0.25 and d.total:
            last_line[0] = now
            print(f"map {d.object[:8]}: {d.fraction:6.1%}  {d.bytes_done / 2**20:.1f} of "
                  f"{d.total / 2**20:.1f} MiB", flush=True)

    def on_complete(d: Download) -> None:
        seconds = d.finished_at - d.started_at
        print(f"map {d.object} ready: {d.path} ({d.total} bytes in {seconds:.2f} s, "
              f"{d.total / seconds / 1e6:.1f} MB/s)", flush=True)

    def on_failed(d: Download) -> None:
        print(f"map {d.object} failed: {d.error}", flush=True)

    ferry = PandaFerry(writer, connection, recv_buffer=4 << 20, on_progress=on_progress,
                       on_complete=on_complete, on_failed=on_failed)
    game = {"sent": 0, "received": 0, "map": None, "transfer": None, "done_at": None}

    def network_task(task):
        while reader.dataAvailable():
            dg = NetDatagram()
            if not reader.getData(dg) or ferry.handle(dg):
                continue  # udpferry's
            payload = dg.getMessage()
            if payload.startswith(b"STAT") and len(payload) >= 40:
                game["received"] += 1
                map_id = payload[8:40].decode()
                if game["map"] != map_id:
                    # The server names a map we do not have yet: fetch it, mid-game, from the same
                    # address (already in the cache: done at the next pump).
                    game["map"] = map_id
                    print(f"server's map is {map_id}; fetching", flush=True)
                    game["transfer"] = ferry.fetch(args.host, args.port, map_id, cache_dir=args.cache)
        writer.send(Datagram(b"HELO" + game["sent"].to_bytes(4, "little")), connection, server)
        game["sent"] += 1
        ferry.pump()
        return task.cont

    taskMgr.add(network_task, "network")
    start = next_frame = time.monotonic()
    status = 1
    while time.monotonic() - start < args.seconds:
        taskMgr.step()
        t = game["transfer"]
        d = ferry.downloads.get(t) if t is not None else None
        if d is not None and d.finished:
            if d.state == "failed":
                break
            game["done_at"] = game["done_at"] or time.monotonic()
            if time.monotonic() - game["done_at"] >= args.linger:
                status = 0
                break
        next_frame += FRAME
        delay = next_frame - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_frame = time.monotonic()
    if status and game["transfer"] is None:
        print("no state packet from the server", flush=True)
    s = ferry.stats()
    print(f"game packets sent {game['sent']}, received {game['received']}; adapter per frame "
          f"p50 {s.get('p50', 0):.2f} ms, p95 {s.get('p95', 0):.2f} ms", flush=True)
    manager.closeConnection(connection)
    return status


if __name__ == "__main__":
    sys.exit(main())
