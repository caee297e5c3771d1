"""Bench: a map between two Panda3D game loops at 60 Hz on loopback, through PandaFerry.

    python bindings/python/tests/bench_panda.py                 # 32 MiB, default framing
    python bindings/python/tests/bench_panda.py --raw --size 8  # raw mode, 8 MiB
    python bindings/python/tests/bench_panda.py --profile       # cProfile of the whole run

Both loops run in this process, one frame each in turn on a 1/60 s clock, each with its own
QueuedConnectionManager, UDP connection, reader, writer and PandaFerry sharing the connection
with one 48-byte game packet per frame in each direction. Prints the wall time from ``fetch`` to
the verified object, and the adapter's own time per frame (``handle`` calls + ``pump``, from
``PandaFerry.frame_times``) at p50/p95/p99/max for each side. The issue's target: 32 MiB in at
most 3 s, at most 2 ms p95 per frame. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _helpers import FRAME, PandaGame, run_frames  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=32, help="MiB (default 32)")
    ap.add_argument("--raw", action="store_true", help="Panda3D raw mode (default: checksummed)")
    ap.add_argument("--burst", type=int, default=256, help="Endpoint burst= (default 256)")
    ap.add_argument("--cache", action="store_true", help="fetch into a cache directory, not memory")
    ap.add_argument("--recv-buffer", type=int, default=4 << 20, help="SO_RCVBUF bytes (0: system default)")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the run")
    args = ap.parse_args()

    size = int(args.size * (1 << 20))
    server = PandaGame(raw=args.raw, recv_buffer=args.recv_buffer or None, burst=args.burst)
    client = PandaGame(raw=args.raw, recv_buffer=args.recv_buffer or None, burst=args.burst)
    data = os.urandom(size)
    oid = server.ferry.serve_bytes(data)
    cache = tempfile.TemporaryDirectory() if args.cache else None

    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    start = time.monotonic()
    t = client.ferry.fetch("127.0.0.1", server.port, oid, cache.name if cache else None)
    to_client, to_server = ("127.0.0.1", client.port), ("127.0.0.1", server.port)
    frames = run_frames(
        [lambda: server.frame(to_client), lambda: client.frame(to_server)],
        lambda: client.ferry.downloads[t].finished,
        timeout=120,
    )
    wall = time.monotonic() - start
    if profiler:
        profiler.disable()

    d = client.ferry.downloads[t]
    if d.state != "done":
        print(f"FAILED: {d.error!r}")
        return 1
    got = d.data if d.data is not None else Path(d.path).read_bytes()
    ok = hashlib.md5(got).hexdigest() == oid
    lost = server.game_sent - 1 - len(client.game_received)  # the last one may be in flight

    mode = "raw" if args.raw else "default framing"
    print(f"udpferry Panda3D bench: {size / (1 << 20):g} MiB, 60 Hz, {mode}, burst={args.burst}, "
          f"{'cache' if cache else 'memory'}, SO_RCVBUF request {args.recv_buffer or 'default'}")
    print(f"wall time {wall:.2f} s ({size / wall / 1e6:.1f} MB/s), {frames} frames, md5 {'ok' if ok else 'MISMATCH'}, "
          f"game packets lost: {max(lost, 0)}")
    for name, game in (("server", server), ("client", client)):
        s = game.ferry.stats()
        print(f"{name}: adapter ms/frame p50 {s['p50']:.3f}  p95 {s['p95']:.3f}  p99 {s['p99']:.3f}  "
              f"max {s['max']:.3f}  mean {s['mean']:.3f}   datagrams in {int(s['datagrams_in'])} "
              f"out {int(s['datagrams_out'])}")
    server.close()
    client.close()
    if cache:
        cache.cleanup()
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
