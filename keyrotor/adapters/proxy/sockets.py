"""The server's sockets: plain non-blocking sockets that trio only waits on.

trio's ``SocketStream`` makes every send and receive a checkpoint, a pass
through the scheduler even when the kernel had the bytes (or the room for
them) at once. Here a read or a write goes straight to the socket, and trio is
asked to wait (``trio.lowlevel.wait_readable`` / ``wait_writable``, its public
low-level API) only when the kernel says it would block. Every wait is a
checkpoint, so cancel scopes and timeouts work as before; what is saved is a
scheduler pass per operation that did not block (docs/benchmarks.md, "The hot
path"). A task that never waits never yields: the server's loops wait at least
once per request (the worker for the next request, the reader for bytes).

Errors are the socket's own ``OSError`` (``ConnectionResetError``,
``BrokenPipeError``...); EOF is ``b""``.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence
from contextlib import suppress
from typing import Any, Final

import trio

__all__ = ["Stream", "accept", "bind", "close", "listen"]

_NODELAY: Final = (socket.AF_INET, socket.AF_INET6)
# accept() errors about one connection, not the listener (as trio's listener
# ignores them): a firewall's denial, a client's reset before it was accepted.
_ONE_CONNECTION_ERRNOS: Final = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
        "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH",
    )
    if hasattr(errno, name)
)  # fmt: skip


class Stream:
    """One accepted TCP connection."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in _NODELAY:  # as trio's SocketStream sets them (and as it, an
            # error ignored: macOS refuses options on a connection reset before accept)
            with suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            lowat = getattr(socket, "TCP_NOTSENT_LOWAT", None)
            if lowat is not None:  # a slow reader is seen soon, not after megabytes
                with suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, lowat, 2**14)
        self.sock = sock

    async def receive_some(self, max_bytes: int, *, wait_first: bool = False) -> bytes:
        """Up to ``max_bytes`` bytes, waiting for some if none are there; ``b""`` at EOF.
        ``wait_first``: the caller expects nothing yet (it read all there was):
        wait before reading, sparing a read that would fail."""
        sock = self.sock
        if wait_first:
            await trio.lowlevel.wait_readable(sock)
        while True:
            try:
                return sock.recv(max_bytes)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)

    def receive_now(self, max_bytes: int) -> bytes | None:
        """Up to ``max_bytes`` bytes that are there now (``b""`` at EOF), or None
        when there are none yet; never waits."""
        try:
            return self.sock.recv(max_bytes)
        except BlockingIOError:
            return None

    def head_waiting(self, limit: int) -> bool:
        """Whether a whole request head (of at most ``limit`` bytes) has arrived
        and waits to be read; never waits, reads nothing."""
        try:
            return b"\r\n\r\n" in self.sock.recv(limit + 4, socket.MSG_PEEK)
        except OSError:  # nothing yet (BlockingIOError), or the connection is gone
            return False

    def send_now(self, data: bytes) -> int:
        """Send what the kernel takes now, without waiting: the bytes sent."""
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0

    async def send_rest(self, data: bytes, sent: int) -> None:
        """Send ``data`` from byte ``sent`` on, waiting for room as needed."""
        view = memoryview(data)
        sock = self.sock
        while sent < len(data):
            await trio.lowlevel.wait_writable(sock)
            with suppress(BlockingIOError):
                sent += sock.send(view[sent:])

    def send_eof(self) -> None:
        """Shut our side: the client reads EOF after what was sent."""
        self.sock.shutdown(socket.SHUT_WR)

    def peer(self) -> tuple[str, int] | None:
        """The client's address and port (None if the connection is gone)."""
        try:
            host, port = self.sock.getpeername()[:2]
        except (OSError, ValueError):
            return None
        return str(host), int(port)

    def close(self) -> None:
        """Close at once; a task waiting on the socket gets ``ClosedResourceError``."""
        close(self.sock)


async def listen(host: str, port: int, reuse_port: bool = False) -> list[socket.socket]:
    """Listening sockets on every address of ``host`` (``""``: every interface),
    as ``trio.open_tcp_listeners`` binds them but all on one port (``port=0``:
    the one the first address got); with ``reuse_port``, bound with
    ``SO_REUSEPORT`` so that several processes share the port."""
    infos = await trio.socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    return bind(infos, reuse_port=reuse_port)


def bind(
    infos: Sequence[tuple[Any, ...]],
    *,
    reuse_port: bool = False,
    reuse_addr: bool = True,
    backlog: int | None = None,
) -> list[socket.socket]:
    """Sockets bound to every address of ``infos`` (``getaddrinfo``'s answer),
    listening with ``backlog`` (None: ``SOMAXCONN``; 0: not listening). With port
    0, the first address's port is taken for the others too (tried again on a
    new port, a few times, when another address has it taken); all closed on
    failure. ``reuse_addr=False``: without ``SO_REUSEADDR``, so that the port is
    refused while any socket (even in ``TIME_WAIT``) that ``SO_REUSEPORT`` does
    not share has it, and a bound socket that is not listening keeps other
    ``SO_REUSEADDR`` sockets out (Linux lets those share a port none listens on)."""
    reuse = getattr(socket, "SO_REUSEPORT", None)
    if reuse_port and reuse is None:  # pragma: no cover - Linux, the BSDs and macOS have it
        raise OSError(errno.ENOPROTOOPT, "SO_REUSEPORT is not available on this platform")
    tries = _PORT_TRIES if len(infos) > 1 and infos[0][4][1] == 0 else 1
    while True:
        try:
            return _bind_all(infos, reuse if reuse_port else None, reuse_addr, backlog)
        except OSError as exc:
            tries -= 1
            if exc.errno != errno.EADDRINUSE or not tries:
                raise


_PORT_TRIES: Final = 8
"""Ports tried when binding several addresses on any free port (``port=0``)."""


def _bind_all(
    infos: Sequence[tuple[Any, ...]], reuse: int | None, reuse_addr: bool, backlog: int | None
) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    port = 0
    try:
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            if reuse_addr:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse is not None:
                sock.setsockopt(socket.SOL_SOCKET, reuse, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port and address[1] == 0:  # the port the first address got
                address = (address[0], port, *address[2:])
            sock.bind(address)
            port = port or int(sock.getsockname()[1])
            if backlog != 0:
                sock.listen(socket.SOMAXCONN if backlog is None else backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def accept(listener: socket.socket) -> tuple[Stream, str]:
    """The next connection and its client's address (no port). Always a checkpoint."""
    while True:
        try:
            sock, address = listener.accept()
        except BlockingIOError:
            await trio.lowlevel.wait_readable(listener)
            continue
        except OSError as exc:
            if exc.errno not in _ONE_CONNECTION_ERRNOS:
                raise  # resource errors are the caller's (it waits and retries)
            await trio.lowlevel.checkpoint()
            continue
        try:
            await trio.lowlevel.checkpoint()  # a flood of connections must not starve the rest
        except BaseException:
            sock.close()
            raise
        host = address[0] if isinstance(address, tuple) else ""
        return Stream(sock), str(host)


def close(sock: socket.socket) -> None:
    """Close a socket at once (a listener: new connections are refused from now
    on); a task waiting on it gets ``ClosedResourceError``. Idempotent."""
    if sock.fileno() != -1:
        trio.lowlevel.notify_closing(sock)
    sock.close()
