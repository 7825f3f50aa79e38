"""The connection pool's sockets under trio: plain non-blocking sockets (and ``ssl``
sockets over them) that trio only waits on.

anyio's streams under trio go through trio's ``SocketStream``, which makes every
send and receive a pass through the scheduler even when the kernel had the bytes
(or the room for them) at once, and its TLS stream runs OpenSSL through memory
buffers pumped by Python code on every read and write. Here a read or a write goes
straight to the socket (for ``https``, an ``ssl.SSLSocket`` in non-blocking mode:
OpenSSL reads and writes the socket itself), and trio is asked to wait
(``trio.lowlevel.wait_readable`` / ``wait_writable``, its public low-level API)
only when the kernel or OpenSSL says it would block. Every wait is a checkpoint,
so cancellation works as on anyio's streams; the pool's timeouts are deadlines
given to ``send_until`` / ``receive_until``, which the run's watchdog task ends
(``watchdog.Watchdog``: one task for every stream, instead of a cancel scope per request).
The proxy's server does the same on its side (``adapters/proxy/sockets.py``);
docs/benchmarks.md, "The hot path", has the figures.

``DirectStream`` is an anyio byte stream with what the pool uses of one:
``send``, ``receive`` (``anyio.EndOfStream`` at EOF), ``aclose`` and the raw
socket as an extra attribute (for the pool's check of idle connections), plus
``send_until`` and ``receive_until`` (False / None once their deadline passed).
Errors are the socket's own ``OSError`` (``ssl.SSLError`` is one); a socket
closed while a task waits on it gives that task ``anyio.ClosedResourceError``,
as anyio's streams do.
TCP connections are opened by anyio (name resolution, happy eyeballs), then
taken over; asyncio keeps anyio's streams throughout.
"""

from __future__ import annotations

import math
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from typing import Any

import anyio
import anyio.abc
import trio
from anyio.abc import SocketAttribute

from .watchdog import Watchdog

__all__ = ["YIELD_EVERY", "DirectStream", "connect"]

YIELD_EVERY = 16
"""Reads in a row that did not wait (up to 1 MiB at the pool's 64 KiB) before one
yields to the scheduler anyway: trio's streams yield on every operation, these
only when the socket would block, so a body that keeps arriving faster than it
is read would otherwise hold the event loop until it ends."""


class DirectStream(anyio.abc.ByteStream):
    """One client connection, plain or TLS, on a non-blocking socket."""

    __slots__ = ("_sent", "_unwaited", "_watchdog", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._sent = False  # a request went out: its answer cannot be there yet
        self._unwaited = 0  # reads in a row that found their bytes there at once
        self._watchdog: Watchdog | None = None  # this run's, from the first deadline

    async def send(self, data: bytes) -> None:
        """Send all of ``data``, waiting for room (or for OpenSSL) as needed."""
        await self.send_until(data, math.inf)

    async def send_until(self, data: bytes, deadline: float) -> bool:
        """``send`` with a deadline on trio's clock: False if it passed first (the
        stream is then unusable: close it)."""
        sock = self.sock
        view = memoryview(data)
        sent = 0
        while sent < len(data):
            try:
                sent += sock.send(view[sent:])
            except (BlockingIOError, ssl.SSLWantWriteError):
                if not await self._wait(trio.lowlevel.wait_writable, deadline):
                    return False
            except ssl.SSLWantReadError:
                if not await self._wait(trio.lowlevel.wait_readable, deadline):
                    return False
        self._sent = True
        return True

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes`` bytes, waiting for some if none are there;
        ``anyio.EndOfStream`` once the server closed the connection."""
        data = await self.receive_until(math.inf, max_bytes)
        assert data is not None  # no deadline
        return data

    async def receive_until(self, deadline: float, max_bytes: int = 65536) -> bytes | None:
        """``receive`` with a deadline on trio's clock: None if it passed first (the
        stream is then unusable: close it)."""
        sock = self.sock
        waited = self._sent
        if waited:  # the answer to what was just sent: wait, sparing a failed read
            self._sent = False
            if not await self._wait(trio.lowlevel.wait_readable, deadline):
                return None
        elif self._unwaited >= YIELD_EVERY:  # a body that keeps coming must not
            self._unwaited = 0  # keep the event loop from every other task
            await trio.lowlevel.checkpoint()
        while True:
            try:
                data = sock.recv(max_bytes)
            except (BlockingIOError, ssl.SSLWantReadError):
                if not await self._wait(trio.lowlevel.wait_readable, deadline):
                    return None
                waited = True
                continue
            except ssl.SSLWantWriteError:
                if not await self._wait(trio.lowlevel.wait_writable, deadline):
                    return None
                waited = True
                continue
            self._unwaited = 0 if waited else self._unwaited + 1
            if not data:
                raise anyio.EndOfStream
            return data

    async def _wait(
        self, wait: Callable[[socket.socket], Awaitable[None]], deadline: float
    ) -> bool:
        """``wait(sock)``; False if ``deadline`` passed first. A socket closed
        meanwhile: ``anyio.ClosedResourceError`` (the pool catches anyio's, not trio's)."""
        sock = self.sock
        if deadline == math.inf:
            watchdog = None
        else:
            watchdog = self._watchdog
            if watchdog is None:
                watchdog = self._watchdog = Watchdog.of_this_run()
            watchdog.watch(sock, deadline)
        try:
            await wait(sock)
        except trio.ClosedResourceError as exc:
            if watchdog is not None and trio.current_time() >= deadline:
                return False  # the watchdog ended the wait
            raise anyio.ClosedResourceError from exc
        finally:
            if watchdog is not None:
                watchdog.unwatch(sock)
        return True

    async def _handshake(self) -> None:
        """The TLS handshake of a wrapped socket (``connect``'s)."""
        sock = self.sock
        assert isinstance(sock, ssl.SSLSocket)
        while True:
            try:
                sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                await self._wait(trio.lowlevel.wait_readable, math.inf)
            except ssl.SSLWantWriteError:
                await self._wait(trio.lowlevel.wait_writable, math.inf)

    async def send_eof(self) -> None:
        """Not used by the pool (it never half-closes a connection)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close at once (no TLS close_notify: the pool never needs one)."""
        close(self.sock)

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """The raw socket (``SocketAttribute.raw_socket``), for the pool's check of
        idle connections."""
        return {SocketAttribute.raw_socket: lambda: self.sock}


def close(sock: socket.socket) -> None:
    """Close ``sock``; a task waiting on it gets ``ClosedResourceError``. Idempotent."""
    if sock.fileno() != -1:
        trio.lowlevel.notify_closing(sock)
    sock.close()


async def connect(
    host: str, port: int, context: ssl.SSLContext | None, server_hostname: str
) -> DirectStream:
    """A TCP connection opened by anyio, taken over as a non-blocking socket, with
    the TLS handshake done on it if ``context`` is given. Errors as anyio's
    ``connect_tcp`` raises them (``OSError``; ``ssl.SSLError`` for the handshake)."""
    opened = await anyio.connect_tcp(host, port)
    try:
        raw: socket.socket = opened.extra(SocketAttribute.raw_socket)
        sock = socket.socket(raw.family, raw.type, raw.proto, os.dup(raw.fileno()))
    finally:
        with anyio.CancelScope(shield=True), suppress(Exception):
            await opened.aclose()
    try:
        # Cancelled during that close (the client closing): say so before the
        # caller goes on with a connection it no longer wants.
        await trio.lowlevel.checkpoint_if_cancelled()
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            sock = context.wrap_socket(
                sock, server_hostname=server_hostname, do_handshake_on_connect=False
            )
        stream = DirectStream(sock)
        if context is not None:
            await stream._handshake()
    except BaseException:
        close(sock)
        raise
    return stream
