"""Type stubs for the udpferry extension module (Rust, PyO3)."""

from os import PathLike
from typing import Callable, List, Optional, Tuple, Union

Address = Tuple[str, int]
StrPath = Union[str, "PathLike[str]"]

class Error(Exception):
    """Base class of every udpferry error."""

class NotFound(Error):
    """The server does not have the object."""

class TimedOut(Error):
    """No answer in time: the server is gone, the path to it went silent mid-transfer (and
    starting over did not help), or the timeout passed."""

class DigestMismatch(Error):
    """The bytes that arrived do not have the MD5 they were asked for; nothing was kept."""

class Busy(Error):
    """The server is at its limit and refused the transfer."""

class ProtocolError(Error):
    """The peer broke the protocol."""

class StorageError(Error):
    """Reading or writing the disk failed."""

class Stopped(Error):
    """The fetch was stopped (its progress callback raised)."""

class Started:
    """The server offered the object; the download runs."""
    transfer: int
    object: str
    peer: Address
    fetching: bool
    size: int

class Queued:
    """The server is at its limit and queued the request; it starts by itself later."""
    transfer: int
    object: str
    peer: Address
    fetching: bool
    ahead: int

class Progress:
    """More of the object is done (a few times a second at most)."""
    transfer: int
    object: str
    peer: Address
    fetching: bool
    bytes_done: int
    total: int

class Completed:
    """The object arrived whole and its MD5 matched (or the client confirmed it). Final."""
    transfer: int
    object: str
    peer: Address
    fetching: bool
    size: int
    path: Optional[str]
    """The file, for a fetch into a cache directory."""
    data: Optional[bytes]
    """The bytes, for a fetch without a cache directory."""

class Failed:
    """The transfer ended without success. Final. A cache download keeps what arrived."""
    transfer: int
    object: str
    peer: Address
    fetching: bool
    error: Error

Event = Union[Started, Queued, Progress, Completed, Failed]

class Endpoint:
    """A udpferry endpoint without I/O: many transfers, both roles, behind your socket.

    Each tick: ``receive_datagram`` for every udpferry datagram that arrived, ``handle_timer``
    once ``get_timer`` has passed, send every ``(data, addr)`` of ``datagrams_to_send``, then
    drain ``next_event``. ``now`` is your clock in seconds (``time.monotonic()``); omit it and
    the endpoint reads its own. Addresses are ``(host, port)``; IPv4-mapped IPv6 addresses
    (``::ffff:a.b.c.d``) are the same peer as ``a.b.c.d``.
    """

    def __init__(
        self,
        *,
        rate: Optional[int] = None,
        client_rate: Optional[int] = None,
        standard: bool = False,
        seed: Optional[int] = None,
        burst: int = 256,
    ) -> None: ...
    def serve_dir(self, path: StrPath) -> int:
        """Serve every file under ``path`` by its MD5; returns how many objects."""
    def serve_bytes(self, data: bytes) -> str:
        """Serve ``data`` from memory; returns its id (MD5 hex)."""
    def fetch(
        self,
        addr: Address,
        id: str,
        cache_dir: Optional[StrPath] = None,
        now: Optional[float] = None,
    ) -> int:
        """Start fetching ``id`` from ``addr``; returns the transfer number events carry."""
    def cancel(self, transfer: int) -> None: ...
    def receive_datagram(self, data: bytes, addr: Address, now: Optional[float] = None) -> None: ...
    def datagrams_to_send(self, now: Optional[float] = None) -> List[Tuple[bytes, Address]]: ...
    def get_timer(self) -> Optional[float]: ...
    def handle_timer(self, now: Optional[float] = None) -> None: ...
    def next_event(self) -> Optional[Event]: ...
    def transfer_count(self) -> int: ...

class Server:
    """Serves a directory by the MD5 of each file, on its own threads (GIL released)."""

    def __init__(
        self,
        dir: StrPath,
        listen: str = "0.0.0.0:7878",
        rate: Optional[int] = None,
        client_rate: Optional[int] = None,
    ) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    @property
    def address(self) -> Optional[Address]: ...
    def __enter__(self) -> "Server": ...
    def __exit__(self, *args: object) -> bool: ...

def fetch(
    server: Union[str, Address],
    id: str,
    output: Optional[StrPath] = None,
    cache: Optional[StrPath] = None,
    timeout: Optional[float] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> str:
    """Fetch ``id`` from ``server`` (blocking, GIL released); returns the verified file's path."""

def is_udpferry_datagram(data: bytes) -> bool:
    """True when ``data`` is a udpferry datagram (routes a shared socket's traffic)."""

def object_id(data: bytes) -> str:
    """The MD5 of ``data`` as an object id (hex)."""
