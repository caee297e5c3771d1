"""udpferry's Python API over plain Python sockets: Endpoint, fetch, Server, errors, resume."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import udpferry
from _helpers import SocketPeer, final_event, run_peers


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def peers():
    made = []

    def make(**kwargs) -> SocketPeer:
        p = SocketPeer(**kwargs)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture
def served_dir(tmp_path: Path):
    """A directory with one 3 MiB random file; returns (dir, id, bytes)."""
    d = tmp_path / "maps"
    d.mkdir()
    data = os.urandom(3 << 20)
    (d / "arena.map").write_bytes(data)
    return d, md5(data), data


def test_object_id_is_md5():
    assert udpferry.object_id(b"hello") == md5(b"hello")
    assert udpferry.object_id(b"") == "d41d8cd98f00b204e9800998ecf8427e"


def test_two_endpoints_move_an_object_into_memory_and_into_a_cache(peers, tmp_path):
    server, client = peers(), peers()
    data = os.urandom((2 << 20) + 12345)
    oid = server.ep.serve_bytes(data)
    assert oid == md5(data)

    # Into memory.
    t = client.ep.fetch(server.addr, oid)
    run_peers([server, client], lambda: final_event(client.events, t) is not None)
    done = final_event(client.events, t)
    assert isinstance(done, udpferry.Completed), getattr(done, "error", done)
    assert done.object == oid and done.size == len(data) and done.path is None
    assert md5(done.data) == oid and done.data == data
    assert tuple(done.peer) == server.addr
    # The serving side reports its own completion (the client confirmed it).
    run_peers(
        [server, client],
        lambda: any(isinstance(e, udpferry.Completed) and not e.fetching for e in server.events),
        timeout=5,
    )
    # Progress was reported and never went backwards.
    progress = [e.bytes_done for e in client.events if isinstance(e, udpferry.Progress) and e.transfer == t]
    assert progress == sorted(progress)

    # Into a cache directory.
    cache = tmp_path / "cache"
    t2 = client.ep.fetch(server.addr, oid, cache)
    assert t2 != t and t2 != 0
    run_peers([server, client], lambda: final_event(client.events, t2) is not None)
    done2 = final_event(client.events, t2)
    assert isinstance(done2, udpferry.Completed), getattr(done2, "error", done2)
    assert done2.data is None and done2.path is not None
    assert Path(done2.path).read_bytes() == data
    assert Path(done2.path).parent == cache

    # Already in the cache: completes at once, transfer 0, nothing sent.
    assert client.ep.fetch(server.addr, oid, cache) == 0
    e = client.ep.next_event()
    assert isinstance(e, udpferry.Completed) and e.transfer == 0 and e.path == done2.path
    assert client.ep.datagrams_to_send() == []


def test_is_udpferry_datagram_tells_udpferry_from_game_bytes(peers):
    client = peers()
    client.ep.fetch(("127.0.0.1", 9), "0" * 32)
    out = client.ep.datagrams_to_send()
    assert out, "a fetch sends a request"
    data, addr = out[0]
    assert addr == ("127.0.0.1", 9)
    assert udpferry.is_udpferry_datagram(data)
    for game in (b"", b"hello game", bytes(100), b"UFRY", b"GAME" + bytes(60), data[:3]):
        assert not udpferry.is_udpferry_datagram(game), game


def test_blocking_fetch_from_a_server(served_dir, tmp_path):
    d, oid, data = served_dir
    with udpferry.Server(d, listen="127.0.0.1:0") as server:
        host, port = server.address
        assert port != 0
        path = udpferry.fetch((host, port), oid, cache=tmp_path / "c1", timeout=20)
        assert Path(path).read_bytes() == data
        # "host:port" and output=.
        out = tmp_path / "out" / "arena.map"
        out.parent.mkdir()
        path2 = udpferry.fetch(f"{host}:{port}", oid, output=out, cache=tmp_path / "c2", timeout=20)
        assert Path(path2).read_bytes() == data
        assert out.read_bytes() == data


def test_blocking_fetch_reports_progress(served_dir, tmp_path):
    d, oid, data = served_dir
    calls = []
    with udpferry.Server(d, listen="127.0.0.1:0", rate=8_000_000) as server:
        path = udpferry.fetch(
            server.address, oid, cache=tmp_path, timeout=20, progress=lambda done, total: calls.append((done, total))
        )
    assert Path(path).read_bytes() == data
    assert calls, "progress was never called"
    assert all(total == len(data) for _, total in calls)
    dones = [done for done, _ in calls]
    assert dones == sorted(dones) and 0 <= dones[0] and dones[-1] <= len(data)


def test_a_raising_progress_callback_stops_the_fetch(served_dir, tmp_path):
    d, oid, _ = served_dir

    class Enough(Exception):
        pass

    def progress(done, total):
        raise Enough()

    with udpferry.Server(d, listen="127.0.0.1:0", rate=1_000_000) as server:
        start = time.monotonic()
        with pytest.raises(Enough):
            udpferry.fetch(server.address, oid, cache=tmp_path, timeout=20, progress=progress)
        assert time.monotonic() - start < 2.5  # 3 MiB at 1 MB/s would take 3 s


def test_a_blocking_fetch_in_a_thread_leaves_the_main_thread_running(tmp_path):
    d = tmp_path / "maps"
    d.mkdir()
    data = os.urandom(4_000_000)
    (d / "big.map").write_bytes(data)
    result = {}

    with udpferry.Server(d, listen="127.0.0.1:0", rate=2_000_000) as server:
        def work():
            t0 = time.monotonic()
            try:
                result["path"] = udpferry.fetch(server.address, md5(data), cache=tmp_path / "c", timeout=30)
            except BaseException as e:  # noqa: BLE001 - reported below
                result["error"] = e
            result["seconds"] = time.monotonic() - t0

        thread = threading.Thread(target=work)
        thread.start()
        count = 0
        longest_gap = 0.0
        last = time.monotonic()
        while thread.is_alive():
            count += 1
            sum(range(200))  # some Python work that needs the GIL
            now = time.monotonic()
            longest_gap = max(longest_gap, now - last)
            last = now
        thread.join()

    assert "error" not in result, result.get("error")
    assert Path(result["path"]).read_bytes() == data
    assert result["seconds"] > 1.0, "the rate cap should make this take about 2 s"
    # The main thread ran all along: many iterations, never held up for long.
    assert count > 10_000, count
    assert longest_gap < 0.25, longest_gap


def test_wrong_types_raise_type_error(tmp_path):
    ep = udpferry.Endpoint()
    oid = "0" * 32
    with pytest.raises(TypeError):
        ep.fetch("127.0.0.1:9", oid)  # not a (host, port) tuple
    with pytest.raises(TypeError):
        ep.fetch(("127.0.0.1",), oid)
    with pytest.raises(TypeError):
        ep.fetch(("127.0.0.1", "port"), oid)
    with pytest.raises(TypeError):
        ep.fetch(("127.0.0.1", 9), 1234)
    with pytest.raises(TypeError):
        ep.serve_bytes("not bytes")
    with pytest.raises(TypeError):
        ep.receive_datagram(b"x", "127.0.0.1")
    with pytest.raises(TypeError):
        udpferry.fetch(12345, oid, cache=tmp_path)
    with pytest.raises(TypeError):
        udpferry.fetch(("127.0.0.1", 9), None, cache=tmp_path)
    with pytest.raises(TypeError):
        udpferry.Endpoint(rate="fast")
    with pytest.raises(TypeError):
        udpferry.is_udpferry_datagram("text")


def test_malformed_ids_and_values_raise_value_error(tmp_path):
    ep = udpferry.Endpoint()
    for bad in ("", "xyz", "0" * 31, "g" * 32, "0" * 33):
        with pytest.raises(ValueError):
            ep.fetch(("127.0.0.1", 9), bad)
        with pytest.raises(ValueError):
            udpferry.fetch(("127.0.0.1", 9), bad, cache=tmp_path, timeout=1)
    with pytest.raises(ValueError):
        udpferry.fetch(("127.0.0.1", 9), "0" * 32, cache=tmp_path, timeout=-1)
    with pytest.raises(ValueError):
        ep.handle_timer(float("nan"))
    # A bad id is not a udpferry.Error, a bad answer is.
    assert not issubclass(ValueError, udpferry.Error)
    assert issubclass(udpferry.NotFound, udpferry.Error) and issubclass(udpferry.TimedOut, udpferry.Error)


def test_unknown_id_raises_not_found(served_dir, tmp_path):
    d, _, _ = served_dir
    with udpferry.Server(d, listen="127.0.0.1:0") as server:
        start = time.monotonic()
        with pytest.raises(udpferry.NotFound):
            udpferry.fetch(server.address, md5(b"no such map"), cache=tmp_path, timeout=10)
        assert time.monotonic() - start < 5


def test_unknown_id_fails_the_endpoint_transfer(peers):
    server, client = peers(), peers()
    server.ep.serve_bytes(b"some map")
    t = client.ep.fetch(server.addr, md5(b"another map"))
    run_peers([server, client], lambda: final_event(client.events, t) is not None, timeout=10)
    e = final_event(client.events, t)
    assert isinstance(e, udpferry.Failed)
    assert isinstance(e.error, udpferry.NotFound)


def test_a_dead_server_raises_timed_out(tmp_path):
    # A socket that receives and never answers: a server that hangs.
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    try:
        start = time.monotonic()
        with pytest.raises(udpferry.TimedOut):
            udpferry.fetch(silent.getsockname(), md5(b"map"), cache=tmp_path, timeout=2)
        assert time.monotonic() - start < 4
    finally:
        silent.close()
    # A port nobody listens on: also TimedOut (maybe sooner, from the ICMP error).
    start = time.monotonic()
    with pytest.raises(udpferry.TimedOut):
        udpferry.fetch(("127.0.0.1", port), md5(b"map"), cache=tmp_path, timeout=2)
    assert time.monotonic() - start < 4


def test_cancel_ends_a_transfer_failed(peers):
    server, client = peers(rate=500_000), peers()
    oid = server.ep.serve_bytes(os.urandom(2 << 20))
    t = client.ep.fetch(server.addr, oid)
    run_peers([server, client], lambda: any(isinstance(e, udpferry.Started) for e in client.events))
    client.ep.cancel(t)
    run_peers([server, client], lambda: final_event(client.events, t) is not None, timeout=5)
    e = final_event(client.events, t)
    assert isinstance(e, udpferry.Failed) and isinstance(e.error, udpferry.Error)
    assert "cancel" in str(e.error)
    # Both sides let go of it (the server hears of the cancel too).
    run_peers(
        [server, client],
        lambda: client.ep.transfer_count() == 0 and server.ep.transfer_count() == 0,
        timeout=5,
    )
    assert any(isinstance(e, udpferry.Failed) and not e.fetching for e in server.events)


def test_an_interrupted_fetch_resumes_from_the_cache(peers, tmp_path):
    data = os.urandom(4 << 20)
    oid = md5(data)
    cache = tmp_path / "cache"

    # First attempt: a slow server (2 MB/s); stop once 2 MB have arrived and the
    # journal had time to record it (it is rewritten at least every 0.5 s while bytes arrive).
    slow, client = peers(rate=2_000_000), peers()
    slow.ep.serve_bytes(data)
    t = client.ep.fetch(slow.addr, oid, cache)

    def far_enough():
        got = [e.bytes_done for e in client.events if isinstance(e, udpferry.Progress) and e.transfer == t]
        return bool(got) and got[-1] >= 2_000_000

    run_peers([slow, client], far_enough, timeout=10)
    first_bytes = client.bytes_in
    assert first_bytes < len(data) * 0.8
    client.ep.cancel(t)
    run_peers([slow, client], lambda: final_event(client.events, t) is not None, timeout=5)
    assert isinstance(final_event(client.events, t), udpferry.Failed)
    partial = cache / f"{oid}.part"
    assert partial.exists(), sorted(p.name for p in cache.iterdir())
    assert not (cache / oid).exists()

    # Second attempt, as a restarted game would: a new endpoint, the same cache, a fast server.
    fast, again = peers(), peers()
    fast.ep.serve_bytes(data)
    t2 = again.ep.fetch(fast.addr, oid, cache)
    run_peers([fast, again], lambda: final_event(again.events, t2) is not None, timeout=20)
    done = final_event(again.events, t2)
    assert isinstance(done, udpferry.Completed), getattr(done, "error", done)
    assert Path(done.path).read_bytes() == data
    # It fetched only what was missing (what the journal had recorded is kept; the last
    # half second before the cancel may be fetched again).
    assert again.bytes_in < len(data) - 500_000, (again.bytes_in, first_bytes, len(data))
    assert not partial.exists()


def test_the_panda3d_module_imports_without_panda3d():
    # Panda3D is needed only once a PandaFerry is made, with a clear message.
    code = (
        "import sys; sys.modules['panda3d'] = None; sys.modules['panda3d.core'] = None\n"
        "import udpferry.panda3d as p\n"
        "try:\n"
        "    p.PandaFerry(None, None)\n"
        "except ImportError as e:\n"
        "    assert 'pip install panda3d' in str(e), e\n"
        "    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_a_game_that_moves_to_a_new_socket_keeps_its_download(peers):
    """The client's socket is replaced mid-download (a new port, as after a NAT re-mapping or
    a network switch): its Endpoint sends from the new socket, the server validates the new
    address and moves the transfer there, and the download completes without starting over."""
    server = peers(rate=4 << 20)
    client = peers()
    data = os.urandom(4 << 20)
    oid = server.ep.serve_bytes(data)
    t = client.ep.fetch(server.addr, oid)

    def holds(n: int):
        return any(
            isinstance(e, udpferry.Progress) and e.transfer == t and e.bytes_done >= n
            for e in client.events
        )

    run_peers([server, client], lambda: holds(1 << 20))
    old_port = client.addr[1]
    client.sock.close()
    client.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.sock.bind(("127.0.0.1", 0))
    client.sock.setblocking(False)
    client.addr = client.sock.getsockname()
    assert client.addr[1] != old_port
    run_peers([server, client], lambda: final_event(client.events, t) is not None)
    end = final_event(client.events, t)
    assert isinstance(end, udpferry.Completed), end
    assert end.data == data
