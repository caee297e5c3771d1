"""udpferry.panda3d.PandaFerry on real Panda3D networking: two 60 Hz game loops in one process,
and Panda3D loops against the udpferry CLI (``--framing panda3d``, and raw mode)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("panda3d.core")

from panda3d.core import QueuedConnectionManager  # noqa: E402

import udpferry  # noqa: E402
from udpferry.panda3d import Download, PandaFerry  # noqa: E402
from _helpers import FRAME, PandaGame, run_frames, serve_cli, start_cli, stop  # noqa: E402


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def games():
    made = []

    def make(**kwargs) -> PandaGame:
        g = PandaGame(**kwargs)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


def assert_all_game_packets_arrived(sender: PandaGame, receiver: PandaGame) -> None:
    got = receiver.game_received
    missing = [s for s in range(sender.game_sent) if s not in got]
    assert not missing, f"{len(missing)} of {sender.game_sent} game packets lost: {missing[:10]}"
    assert all(n == 1 for n in got.values()), "a game packet arrived twice"
    assert receiver.bad_game_packets == 0


@pytest.mark.parametrize("raw", [False, True], ids=["default-framing", "raw"])
def test_two_loops_move_8_mib_beside_game_packets(games, raw):
    server, client = games(raw=raw), games(raw=raw)
    data = os.urandom(8 << 20)
    oid = server.ferry.serve_bytes(data)
    completed, progress = [], []
    client.ferry.on_complete = completed.append
    client.ferry.on_progress = lambda d: progress.append(d.bytes_done)
    t = client.ferry.fetch("127.0.0.1", server.port, oid)
    assert client.ferry.downloads[t].state == "requested"

    to_client = ("127.0.0.1", client.port)
    to_server = ("127.0.0.1", server.port)
    frames = run_frames(
        [lambda: server.frame(to_client), lambda: client.frame(to_server)],
        lambda: client.ferry.downloads[t].finished,
        timeout=20,
    )
    # Let the last game packets land (no new ones).
    for _ in range(6):
        server.frame()
        client.frame()
        time.sleep(FRAME / 2)

    d = client.ferry.downloads[t]
    assert d.state == "done", d.error
    assert d.data is not None and md5(d.data) == oid and len(d.data) == len(data)
    assert d.bytes_done == d.total == len(data)
    assert completed == [d]
    assert progress and progress == sorted(progress)
    # The game's packets went both ways every frame, and none was lost or taken by udpferry.
    assert server.game_sent == client.game_sent == frames
    assert_all_game_packets_arrived(server, client)
    assert_all_game_packets_arrived(client, server)
    # udpferry's datagrams went through the ferry, not to the game.
    assert client.ferry.datagrams_in > len(data) // 1300
    assert server.ferry.datagrams_in > 0 and server.ferry.send_failures == 0
    stats = client.ferry.stats()
    assert stats["frames"] >= frames and stats["p95"] > 0


def test_own_connection_mode_in_a_task_manager(tmp_path):
    from direct.task.TaskManagerGlobal import taskMgr

    manager = QueuedConnectionManager()
    events = []
    server = PandaFerry.open(manager, task_mgr=taskMgr, on_event=events.append)
    client = PandaFerry.open(QueuedConnectionManager(), task_mgr=taskMgr)
    assert isinstance(server.port, int) and server.port > 0 and client.port != server.port
    try:
        maps = tmp_path / "maps"
        maps.mkdir()
        data = os.urandom(4 << 20)
        (maps / "dust.bsp").write_bytes(data)
        assert server.serve_dir(maps) == 1
        failed = []
        client.on_failed = failed.append
        t = client.fetch("127.0.0.1", server.port, md5(data), cache_dir=tmp_path / "cache")
        missing = client.fetch("127.0.0.1", server.port, md5(b"no such map"))
        run_frames(
            [taskMgr.step],
            lambda: client.downloads[t].finished and client.downloads[missing].finished,
            timeout=20,
        )
        d = client.downloads[t]
        assert d.state == "done", d.error
        assert Path(d.path).read_bytes() == data and d.data is None
        m = client.downloads[missing]
        assert m.state == "failed" and isinstance(m.error, udpferry.NotFound)
        assert failed == [m]
        # The serving side's events went to on_event.
        run_frames([taskMgr.step], lambda: any(isinstance(e, udpferry.Completed) for e in events), timeout=5)
        assert all(not e.fetching for e in events)
        # Fetching it again comes from the cache at once.
        again = client.fetch("127.0.0.1", server.port, md5(data), cache_dir=tmp_path / "cache")
        assert again == 0
        taskMgr.step()
        assert client.downloads[0].state == "done" and client.downloads[0].path == d.path
    finally:
        names = [f"udpferry-{f.port}-{id(f):x}" for f in (server, client)]
        server.close()
        client.close()
    assert all(not taskMgr.getTasksNamed(n) for n in names)
    # The port is free again.
    reopened = manager.openUDPConnection(server.port)
    assert reopened is not None
    manager.closeConnection(reopened)


def test_default_mode_client_against_cli_serve_with_panda3d_framing(tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    data = os.urandom(4 << 20)
    (maps / "arena.map").write_bytes(data)
    proc, objects, (host, port) = serve_cli(maps, "--framing", "panda3d")
    try:
        assert objects == {md5(data): len(data)}
        client = PandaFerry.open(QueuedConnectionManager(), raw=False)
        try:
            t = client.fetch(host, port, md5(data), cache_dir=tmp_path / "cache")
            run_frames([client.poll], lambda: client.downloads[t].finished, timeout=20)
            d = client.downloads[t]
            assert d.state == "done", d.error
            assert Path(d.path).read_bytes() == data
        finally:
            client.close()
    finally:
        stop(proc)


def test_raw_mode_client_against_plain_cli_serve(tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    data = os.urandom(2 << 20)
    (maps / "arena.map").write_bytes(data)
    proc, _, (host, port) = serve_cli(maps)
    try:
        with PandaFerry.open(QueuedConnectionManager(), raw=True) as client:
            t = client.fetch(host, port, md5(data))
            run_frames([client.poll], lambda: client.downloads[t].finished, timeout=20)
            d = client.downloads[t]
            assert d.state == "done", d.error
            assert d.data == data
    finally:
        stop(proc)


def test_cli_get_with_panda3d_framing_from_a_default_mode_panda_server(games, tmp_path):
    server = games(raw=False)
    maps = tmp_path / "maps"
    maps.mkdir()
    data = os.urandom(4 << 20)
    (maps / "arena.map").write_bytes(data)
    assert server.ferry.serve_dir(maps) == 1
    served = []
    server.ferry.on_event = served.append
    out = tmp_path / "out.map"
    proc = start_cli(
        [
            "get",
            f"127.0.0.1:{server.port}",
            md5(data),
            "-o",
            str(out),
            "--cache",
            str(tmp_path / "cache"),
            "--framing",
            "panda3d",
            "--timeout",
            "30",
        ]
    )
    try:
        # The Panda3D loop runs in this thread while the CLI downloads.
        run_frames([server.frame], lambda: proc.poll() is not None, timeout=40)
        stdout, stderr = proc.communicate(timeout=5)
    finally:
        stop(proc)
    assert proc.returncode == 0, stderr
    assert out.read_bytes() == data
    assert server.bad_game_packets == 0  # every datagram of the CLI went to the ferry
    # Run a few more frames: the server hears the client's confirmation.
    run_frames([server.frame], lambda: any(isinstance(e, udpferry.Completed) for e in served), timeout=5)
    done = [e for e in served if isinstance(e, udpferry.Completed)]
    assert done[0].object == md5(data) and not done[0].fetching
    assert done[0].peer[0] == "127.0.0.1"  # the IPv4-mapped address, normalised


def test_handle_leaves_game_packets_to_the_game(games):
    from panda3d.core import NetDatagram

    a, b = games(), games()
    a.frame(("127.0.0.1", b.port))
    time.sleep(0.05)
    dg = NetDatagram()
    assert b.reader.dataAvailable() and b.reader.getData(dg)
    assert b.ferry.handle(dg) is False
    assert b.ferry.datagrams_in == 0
    assert isinstance(Download(1, "0" * 32, ("h", 1)).fraction, float)
