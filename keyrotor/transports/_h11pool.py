"""A small async HTTP/1.1 connection pool: h11 or httptools over anyio streams (asyncio and trio).

    async with ConnectionPool(PoolOptions(max_connections=10)) as pool:
        response = await pool.request(b"POST", url, headers, body, read_timeout=30.0)
        try:
            async for chunk in response.aiter_bytes():
                ...
        finally:
            await response.aclose()

``request`` returns once the response head (status and headers) is in; the body
is read from the ``Response``. A connection goes back to the pool when its body
has been read to the end (or is already buffered when ``aclose`` is called);
otherwise ``aclose`` closes it. Always ``aclose`` a response you stop reading.

Connections are kept per origin (scheme, host, port), at most
``max_connections`` in all (open, being opened, or handed to a waiting request).
A request that finds every slot taken waits up to ``pool`` seconds, first come
first served; a freed slot or idle connection is handed directly to the first
waiter, and a waiter that is cancelled or times out with it in hand gives it
back at once (no await), so cancellation can never leak a slot (the flaw of
encode/httpcore#1093). A request may carry a ``tag`` (the transports pass the key it is sent with):
with ``max_per_tag`` set, requests of one tag hold at most that many slots at
once, so one tag's stuck requests cannot take every slot; a request over its
tag's share waits up to ``pool`` seconds for one of them, then fails with
``TagBusy``. Idle connections expire after ``keepalive_expiry``
seconds; an idle connection whose socket is readable (the server closed it, or
sent something unasked) is closed and replaced before any byte is sent on it.

Retry, once: a request is sent again on a new connection if, and only if, (1) it
went out on a kept-alive connection that had already served a response (a
failure on a new connection is never retried), (2) sending failed
(``WriteError``), or the connection was reset (``ReadError``) or closed
(``RemoteProtocolError``) before a single byte of the response arrived, and (3)
it was the first attempt. Timeouts, cancellations and errors after any response
byte are never retried. This covers the keep-alive race (the server closes an
idle connection while the request is on its way), where the server has read
nothing; as in any HTTP/1.1 client, a server that read the request and then
dropped the connection without a byte of answer would see it twice.

Timeouts (``write``, the per-request ``read_timeout`` and ``head_timeout``) are
deadlines on the event loop's clock. Under trio the pool holds its sockets itself
(``_direct.py``) and one watchdog task per run ends a wait past its deadline, so a
request enters no cancel scope of its own; under asyncio each send and receive
runs in an anyio cancel scope with its deadline.

Errors (``HTTPError`` and subclasses) are mapped from anyio, OS, ``ssl`` and the codec
errors where they happen. Whatever is raised, and at whatever await a task is
cancelled, the connection involved is closed (shielded from cancellation) and
its slot freed; nothing half-used is ever put back in the idle set.
``LocalProtocolError`` for a request the codec refuses is raised before any
connection is taken.
"""

from __future__ import annotations

import asyncio
import math
import select
import socket
import ssl
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from functools import lru_cache
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Self, cast
from urllib.parse import urlsplit

import anyio
import anyio.abc
from anyio.abc import SocketAttribute
from attrs import Attribute, field, frozen

from . import codec as http_codec
from .codec import END, NEED_DATA, BadMessage, BadOutgoing, ResponseHead

if TYPE_CHECKING:
    from ._direct import DirectStream

__all__ = [
    "ConnectError",
    "ConnectTimeout",
    "ConnectionPool",
    "HTTPError",
    "LocalProtocolError",
    "PoolOptions",
    "PoolTimeout",
    "ReadError",
    "ReadTimeout",
    "RemoteProtocolError",
    "Response",
    "TagBusy",
    "WriteError",
    "WriteTimeout",
]

CHUNK_SIZE: Final = 65536

# --------------------------------------------------------------------------- errors


class HTTPError(Exception):
    """Base of the pool's errors. Whatever the error, the connection it happened on
    is closed and its slot freed; the pool stays usable."""


class ConnectError(HTTPError):
    """The connection could not be opened (refused, unreachable, DNS, TLS handshake)."""


class ConnectTimeout(ConnectError, TimeoutError):
    """Opening the connection (TCP and TLS) took longer than ``PoolOptions.connect``."""


class ReadError(HTTPError):
    """The connection broke while receiving (reset)."""


class WriteError(HTTPError):
    """The connection broke while sending the request (reset, broken pipe)."""


class ReadTimeout(HTTPError, TimeoutError):
    """No byte arrived for ``read_timeout`` seconds (response head or between body chunks)."""


class WriteTimeout(HTTPError, TimeoutError):
    """Sending the request took longer than ``PoolOptions.write``."""


class PoolTimeout(HTTPError, TimeoutError):
    """No connection slot came free within ``PoolOptions.pool`` seconds."""


class TagBusy(PoolTimeout):
    """The request's tag held its ``max_per_tag`` slots for ``pool`` seconds."""


class RemoteProtocolError(HTTPError):
    """The server broke HTTP/1.1: garbage, a truncated body, or it closed the
    connection without a response."""


class LocalProtocolError(HTTPError):
    """The request cannot be sent as given (bad URL, header or framing): the
    caller's fault. Nothing was sent."""


_IO_ERRORS: Final = (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError)
_CONNECT_ERRORS: Final = (*_IO_ERRORS, anyio.EndOfStream)
_RETRYABLE: Final = (WriteError, ReadError, RemoteProtocolError)


def _connect_failure(host: str, port: int, exc: BaseException) -> str:
    """What ``ConnectError`` says: an untrusted TLS certificate by name, with its fix
    (anyio may wrap the ``ssl`` error, so the chain is searched)."""
    error: BaseException | None = exc
    for _ in range(5):
        if isinstance(error, ssl.SSLCertVerificationError):
            return (
                f"the TLS certificate of {host}:{port} is not trusted ({error.verify_message}); "
                "fix: check the upstream URL, or trust its CA with SSL_CERT_FILE=PATH (a PEM file)"
            )
        if error is None:
            break
        error = error.__cause__ or error.__context__
    return f"cannot connect to {host}:{port}: {exc!r}"


# --------------------------------------------------------------------------- options


def _positive(instance: Any, attribute: Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"PoolOptions.{attribute.name} must be > 0 (seconds), not {value!r}")


def _not_negative(instance: Any, attribute: Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"PoolOptions.{attribute.name} must be >= 0 (seconds), not {value!r}")


def _at_least_one(instance: Any, attribute: Attribute[Any], value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"PoolOptions.{attribute.name} must be an int >= 1, not {value!r}")


def _none_or_at_least_one(instance: Any, attribute: Attribute[Any], value: int | None) -> None:
    if value is not None:
        _at_least_one(instance, attribute, value)


def _ssl_or_none(instance: Any, attribute: Attribute[Any], value: object) -> None:
    if value is not None and not isinstance(value, ssl.SSLContext):
        raise TypeError(f"PoolOptions.ssl_context must be an ssl.SSLContext or None: {value!r}")


def _parser(instance: Any, attribute: Attribute[Any], value: str) -> None:
    http_codec.resolve(value)  # ValueError: unknown, or httptools not installed


@frozen(kw_only=True)
class PoolOptions:
    """Limits and timeouts of a ``ConnectionPool`` (seconds), checked when built.

    - ``connect``: TCP connect plus TLS handshake; ``write``: sending a request;
      ``pool``: waiting for a free slot. The read timeout is per request.
    - ``max_connections``: open connections in all origins together.
    - ``max_per_tag``: slots one request tag may hold at once (``None``: no limit
      but ``max_connections``).
    - ``keepalive_expiry``: idle connections older than this are closed
      (``0``: never reuse a connection).
    - ``ssl_context``: for ``https``; ``None`` = ``ssl.create_default_context()``
      (made once per pool, ALPN ``http/1.1``).
    - ``parser``: ``"auto"`` (httptools when installed, else h11), ``"h11"`` or
      ``"httptools"`` (``codec.py``).
    """

    connect: float = field(default=10.0, validator=_positive)
    write: float = field(default=10.0, validator=_positive)
    pool: float = field(default=10.0, validator=_positive)
    max_connections: int = field(default=10, validator=_at_least_one)
    max_per_tag: int | None = field(default=None, validator=_none_or_at_least_one)
    keepalive_expiry: float = field(default=30.0, validator=_not_negative)
    ssl_context: ssl.SSLContext | None = field(default=None, validator=_ssl_or_none)
    parser: str = field(default="auto", validator=_parser)


# --------------------------------------------------------------------------- helpers

Origin = tuple[str, str, int]
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


@lru_cache(maxsize=256)
def _split_url(url: str) -> tuple[Origin, bytes, bytes]:
    """``(origin, target, host header)`` of an absolute http(s) URL."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = parts.hostname
        default = _DEFAULT_PORTS.get(scheme)
        if default is None or not host:
            raise ValueError("not an absolute http:// or https:// URL")
        port = parts.port or default
        name = f"[{host}]" if ":" in host else host
        authority = name if port == default else f"{name}:{port}"
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        return (scheme, host, port), target.encode("ascii"), authority.encode("ascii")
    except ValueError as exc:  # UnicodeEncodeError included
        raise LocalProtocolError(
            f"cannot request {url!r}: {exc}; give an absolute http(s) URL, non-ASCII "
            "characters percent-encoded"
        ) from None


def _request_head(
    codec: Any,
    method: bytes,
    target: bytes,
    authority: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes | None,
) -> object:
    out = [(b"host", authority)]
    for item in headers:
        name = item[0].lower()
        if name == b"host":
            out[0] = item
            continue
        if name == b"content-length" or name == b"transfer-encoding":
            raise LocalProtocolError(
                f"do not set {item[0]!r}: pass the body as `body` and the pool frames it"
            )
        out.append(item)
    if body is not None:
        out.append((b"content-length", b"%d" % len(body)))
    try:
        return codec.prepare(method, target, out)
    except BadOutgoing as exc:
        raise LocalProtocolError(f"cannot send this request: {exc}") from exc


def _readability_check(sock: socket.socket | None) -> Callable[[], bool]:
    """A function telling, without blocking, whether ``sock`` has anything to read
    (EOF or data): for an idle keep-alive connection, that means do not reuse."""
    if sock is None:
        return lambda: False
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return lambda: bool(poller.poll(0))
    return lambda: bool(select.select([sock], [], [], 0)[0])  # pragma: no cover - Windows


async def _close_stream(stream: anyio.abc.ByteStream) -> None:
    """Close ``stream`` now, shielded from cancellation; errors are irrelevant."""
    with anyio.CancelScope(shield=True), suppress(Exception):
        await stream.aclose()


async def _close(conn: _Connection) -> None:
    """Close ``conn``: its codec (no reference cycle left behind), then its stream."""
    conn.codec.close()
    await _close_stream(conn.stream)


def _in_trio() -> bool:
    """Whether this runs under trio (whose sockets the pool then holds itself)."""
    trio = sys.modules.get("trio")
    return trio is not None and bool(trio.lowlevel.in_trio_run())


def loop_clock() -> Callable[[], float]:
    """The running event loop's clock as a plain function (the same clock as
    ``anyio.current_time``, which finds out which loop runs on every call)."""
    try:
        return asyncio.get_running_loop().time
    except RuntimeError:
        pass
    if _in_trio():
        return sys.modules["trio"].current_time  # type: ignore[no-any-return]
    return anyio.current_time


def _asyncio_transport(stream: anyio.abc.ByteStream) -> asyncio.Transport | None:
    """The asyncio transport under anyio's stream (plain or TLS), or None."""
    inner = getattr(stream, "transport_stream", stream)
    transport = getattr(inner, "_transport", None)  # anyio's, private: checked
    return transport if isinstance(transport, asyncio.Transport) else None


async def _send(conn: _Connection, data: bytes, deadline: float) -> bool:
    """Send all of ``data`` on ``conn``; False if ``deadline`` (the loop's clock)
    passed first, ``WriteError`` if the connection broke. Under trio the stream
    ends its own waits (``_direct``): no cancel scope per request.

    Under asyncio a request that may wait for room (over ``CHUNK_SIZE``) is sent
    with the transport reading: an answer the server sends before it stops
    reading (a 413, then a reset) is kept in anyio's buffer for ``_early_answer``.
    (anyio reads only within ``receive``, and asyncio closes the socket, and what
    it held unread, as soon as a write fails.)"""
    try:
        direct = conn.direct
        if direct is not None:
            return await direct.send_until(data, deadline)
        transport = conn.transport if len(data) > CHUNK_SIZE else None
        if transport is not None:
            transport.resume_reading()
        try:
            with anyio.CancelScope(deadline=deadline):
                await conn.stream.send(data)
                return True
            return False
        finally:
            if transport is not None:
                transport.pause_reading()
    except _IO_ERRORS as exc:
        raise WriteError(f"the connection broke while sending: {exc!r}") from exc


async def _receive(conn: _Connection, deadline: float) -> bytes | None:
    """Up to ``CHUNK_SIZE`` bytes from ``conn``, ``b""`` at EOF; None if ``deadline``
    passed first, ``ReadError`` if the connection broke."""
    try:
        direct = conn.direct
        if direct is not None:
            return await direct.receive_until(deadline, CHUNK_SIZE)
        if deadline == math.inf:
            return await conn.stream.receive(CHUNK_SIZE)
        with anyio.CancelScope(deadline=deadline):
            return await conn.stream.receive(CHUNK_SIZE)
        return None
    except anyio.EndOfStream:
        return b""
    except _IO_ERRORS as exc:
        raise ReadError(f"the connection broke while reading: {exc!r}") from exc


class _Connection:
    """One HTTP/1.1 connection: stream, codec state, bookkeeping."""

    __slots__ = (
        "codec", "direct", "expires", "got_bytes", "origin", "readable", "reused", "stream",
        "transport", "unsent",
    )  # fmt: skip

    def __init__(
        self,
        origin: Origin,
        stream: anyio.abc.ByteStream,
        codec: Any,
        direct: DirectStream | None = None,
    ) -> None:
        self.origin = origin
        self.stream = stream
        self.direct = direct  # the same stream, when the pool holds the socket (trio)
        self.codec = codec
        self.expires = 0.0
        self.reused = False  # has served a response before the current request
        self.got_bytes = False  # a byte of the current response arrived
        self.unsent = False  # the request's write broke (an early answer): never reuse
        self.transport = _asyncio_transport(stream) if direct is None else None
        self.readable = _readability_check(stream.extra(SocketAttribute.raw_socket, None))


class _Share:
    """One tag's slots: how many its requests hold, and who waits for one."""

    __slots__ = ("held", "waiters")

    def __init__(self) -> None:
        self.held = 0
        self.waiters: deque[anyio.Event] = deque()


class _Waiter:
    __slots__ = ("event", "grant")

    def __init__(self) -> None:
        self.event = anyio.Event()
        # None: still waiting; "slot": a free slot (counted); a connection (idle,
        # counted); "closed": the pool was closed.
        self.grant: _Connection | Literal["slot", "closed"] | None = None


# --------------------------------------------------------------------------- pool


class ConnectionPool:
    """An HTTP/1.1 client connection pool; see the module docstring."""

    def __init__(self, options: PoolOptions | None = None) -> None:
        self._options = options if options is not None else PoolOptions()
        self._max = self._options.max_connections
        self._slots = 0  # open + reserved (connecting, or handed over to a waiter)
        self._conns: set[_Connection] = set()  # every open connection, idle or busy
        self._idle: deque[_Connection] = deque()  # oldest first
        self._waiters: deque[_Waiter] = deque()
        self._ssl_context = self._options.ssl_context
        self._direct: bool | None = None  # trio's sockets directly (_direct.py), once known
        self._closed = False
        self._shares: dict[object, _Share] = {}  # tags holding or waiting for slots
        self._codec = http_codec.codecs(self._options.parser)[1]
        self._clock: Callable[[], float] | None = None  # the loop's, from the first use

    def _now(self) -> float:
        clock = self._clock
        if clock is None:
            clock = self._clock = loop_clock()
        return clock()

    @property
    def options(self) -> PoolOptions:
        return self._options

    def stats(self) -> dict[str, int]:
        """``open`` connections (``idle`` + ``busy``), ``connecting`` (slots taken
        without a connection yet) and ``waiting`` requests."""
        open_ = len(self._conns)
        idle = len(self._idle)
        return {
            "open": open_,
            "idle": idle,
            "busy": open_ - idle,
            "connecting": self._slots - open_,
            "waiting": len(self._waiters),
        }

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<ConnectionPool {state} {self.stats()} max={self._max}>"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection (busy ones too: their readers get ``ReadError``);
        requests waiting for a slot fail. Idempotent."""
        if self._closed:
            return
        self._closed = True
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            waiter.grant = "closed"
            waiter.event.set()
        conns = list(self._conns)
        self._conns.clear()
        self._idle.clear()
        self._slots -= len(conns)  # reserved slots are released by their owners
        for conn in conns:
            await _close(conn)

    # ------------------------------------------------------------------ requests

    async def request(
        self,
        method: bytes,
        url: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None = None,
        *,
        read_timeout: float | None,
        head_timeout: float | None = None,
        tag: object = None,
    ) -> Response:
        """Send a request and wait for the response head; read the body from the
        ``Response`` and ``aclose`` it.

        ``url`` is absolute (``http`` or ``https``); the pool adds ``Host`` (unless
        given) and ``Content-Length`` (when ``body`` is not ``None``); ``headers``
        must not frame the body themselves. ``read_timeout`` bounds every wait for
        data (``None``: no bound); ``head_timeout``, if given, bounds the wait for
        the whole response head (a model's time to first token), interim 1xx
        answers included, in place of ``read_timeout`` for its first byte.
        ``tag``: counted against ``max_per_tag`` until the response is closed.
        Raises ``HTTPError`` subclasses.
        """
        origin, target, authority = _split_url(url)
        event = _request_head(self._codec, method, target, authority, headers, body)
        if tag is None or self._options.max_per_tag is None:
            return await self._request(origin, event, body, read_timeout, head_timeout, None)
        await self._take(tag)
        try:
            return await self._request(origin, event, body, read_timeout, head_timeout, tag)
        except BaseException:
            self._give(tag)
            raise

    async def _request(
        self,
        origin: Origin,
        event: object,
        body: bytes | None,
        read_timeout: float | None,
        head_timeout: float | None,
        tag: object,
    ) -> Response:
        conn = await self._checkout(origin)
        retried = False
        while True:
            if conn is None:
                conn = await self._connect(origin)
            try:
                head = await self._exchange(conn, event, body, read_timeout, head_timeout)
            except _RETRYABLE:
                if retried or not conn.reused or conn.got_bytes:
                    await self._discard(conn)
                    raise
                # The keep-alive race: retry once on a new connection, in this slot.
                retried = True
                owned = self._forget(conn)
                await _close(conn)
                if not owned:  # the pool was closed meanwhile
                    raise
                conn = None
                continue
            except BaseException:
                await self._discard(conn)
                raise
            return Response(self, conn, head, read_timeout, tag)

    async def _exchange(
        self,
        conn: _Connection,
        event: object,
        body: bytes | None,
        read_timeout: float | None,
        head_timeout: float | None = None,
    ) -> ResponseHead:
        """Send the request on ``conn`` and receive the response head."""
        h = conn.codec
        conn.got_bytes = False
        try:
            data = h.request(event, body)
        except BadOutgoing as exc:
            raise LocalProtocolError(f"cannot send this request: {exc}") from exc
        try:
            sent = await _send(conn, data, self._now() + self._options.write)
        except WriteError:
            head = await self._early_answer(conn)
            if head is None:
                raise
            conn.unsent = True
            return head
        if not sent:
            raise WriteTimeout(f"sending the request took more than {self._options.write} s")
        first = read_timeout if head_timeout is None else head_timeout
        deadline = math.inf if first is None else self._now() + first
        # head_timeout bounds the whole head, interim 1xx answers included: bytes
        # trickling in, or a 100 Continue and then silence, cannot stretch it.
        head_deadline = deadline if head_timeout is not None else math.inf
        try:
            while True:
                event_in = h.next_event()
                if event_in is NEED_DATA:
                    if conn.got_bytes and read_timeout is not None:
                        deadline = min(head_deadline, self._now() + read_timeout)
                    chunk = await _receive(conn, deadline)
                    if chunk is None:
                        if conn.got_bytes and deadline == head_deadline:
                            raise ReadTimeout(
                                f"the response head was not complete within {head_timeout} s"
                            )
                        waited = read_timeout if conn.got_bytes else first
                        raise ReadTimeout(f"no response data for {waited} s")
                    if not chunk and not conn.got_bytes:
                        raise RemoteProtocolError(
                            "the server closed the connection without sending a response"
                        )
                    conn.got_bytes = True
                    h.receive_data(chunk)
                elif type(event_in) is ResponseHead:
                    return event_in
                else:
                    raise RemoteProtocolError(f"unexpected {event_in!r} instead of a response")
        except BadMessage as exc:
            raise RemoteProtocolError(f"invalid response: {exc}") from exc

    async def _early_answer(self, conn: _Connection) -> ResponseHead | None:
        """After the request's write broke (the server closed its side): the head
        of an answer it sent before it stopped reading (a 401 or a 413 before a
        long body was in), read within ``write`` s; None when there is none. The
        connection is done with: ``_recycle`` never puts it back."""
        h = conn.codec
        deadline = self._now() + self._options.write
        ended = False
        try:
            while True:
                event_in = h.next_event()
                if type(event_in) is ResponseHead:
                    conn.got_bytes = True
                    return event_in
                if event_in is not NEED_DATA or ended:
                    return None
                chunk = await _receive(conn, deadline)
                if chunk is None:
                    return None
                ended = not chunk
                h.receive_data(chunk)  # b"": EOF, after what the server sent
        except (BadMessage, ReadError):
            return None

    # ------------------------------------------------------------------ tags

    async def _take(self, tag: object) -> None:
        """Hold one of ``tag``'s ``max_per_tag`` slots, waiting up to ``pool`` s."""
        share = self._shares.get(tag)
        if share is None:
            share = self._shares[tag] = _Share()
        limit = self._options.max_per_tag
        assert limit is not None
        if share.held < limit and not share.waiters:
            share.held += 1
            return
        granted = anyio.Event()
        share.waiters.append(granted)
        try:
            with anyio.move_on_after(self._options.pool):
                await granted.wait()
        except BaseException:  # cancelled: give back what we may have been handed
            if granted.is_set():
                self._give(tag)
            else:
                share.waiters.remove(granted)
            raise
        if not granted.is_set():
            share.waiters.remove(granted)
            raise TagBusy(
                f"this tag's {limit} connection slots stayed busy for {self._options.pool} s "
                "(max_per_tag)"
            )

    def _give(self, tag: object) -> None:
        """A request of ``tag`` is done: hand its slot to the next waiter, or free it."""
        share = self._shares[tag]
        if share.waiters:
            share.waiters.popleft().set()  # handed over: still held
            return
        share.held -= 1
        if not share.held:
            del self._shares[tag]

    # ------------------------------------------------------------------ slots

    async def _checkout(self, origin: Origin) -> _Connection | None:
        """An idle connection to ``origin`` (now busy), or ``None``: a slot is
        reserved for a new connection, which the caller must open (``_connect``
        releases the slot if that fails)."""
        if self._closed:
            raise _closed()
        idle = self._idle
        if idle:
            if idle[0].expires <= self._now():
                await self._expire()
            for i in range(len(idle) - 1, -1, -1):  # the most recently used first
                conn = idle[i]
                if conn.origin == origin:
                    del idle[i]
                    if conn.readable():  # closed by the server (or garbage): replace
                        await self._replace(conn)
                        return None
                    return conn
            if idle and self._slots >= self._max:
                await self._replace(idle.popleft())  # another origin's, oldest
                return None
        if self._slots < self._max:
            self._slots += 1
            return None
        return await self._wait(origin)

    async def _wait(self, origin: Origin) -> _Connection | None:
        waiter = _Waiter()
        self._waiters.append(waiter)
        try:
            with anyio.move_on_after(self._options.pool):
                await waiter.event.wait()
        except BaseException:  # cancelled: give back what we may have been handed
            self._abandon(waiter)
            raise
        grant = waiter.grant
        if grant is None:
            self._waiters.remove(waiter)
            raise PoolTimeout(
                f"no connection slot came free in {self._options.pool} s "
                f"(max_connections={self._max})"
            )
        if grant == "slot":
            return None
        if grant == "closed":
            raise _closed()
        if grant.origin == origin and not grant.readable():
            return grant
        await self._replace(grant)
        return None

    def _abandon(self, waiter: _Waiter) -> None:
        grant = waiter.grant
        if grant is None:
            self._waiters.remove(waiter)
        elif grant == "slot":
            self._release_slot()
        elif grant != "closed":
            self._give_idle(grant)

    async def _replace(self, conn: _Connection) -> None:
        """Close ``conn`` (idle, taken out of the idle set) and keep its slot for a
        new connection."""
        self._conns.discard(conn)
        try:
            await _close(conn)
        except BaseException:  # pragma: no cover - shielded, errors suppressed
            self._release_slot()
            raise

    async def _expire(self) -> None:
        now = self._now()
        idle = self._idle
        expired = []
        while idle and idle[0].expires <= now:
            conn = idle.popleft()
            self._conns.discard(conn)
            self._release_slot()
            expired.append(conn)
        for conn in expired:
            await _close(conn)

    async def _connect(self, origin: Origin) -> _Connection:
        """Open a connection in a reserved slot; the slot is released on failure."""
        scheme, host, port = origin
        stream: anyio.abc.ByteStream | None = None
        try:
            with anyio.move_on_after(self._options.connect):
                try:
                    if self._direct is None:
                        self._direct = _in_trio()
                    if self._direct:  # trio: the socket itself, trio only waits on it
                        from . import _direct  # imports trio: not for asyncio's users

                        context = self._tls() if scheme == "https" else None
                        stream = await _direct.connect(host, port, context, host)
                    elif scheme == "https":
                        stream = await anyio.connect_tcp(
                            host,
                            port,
                            tls=True,
                            ssl_context=self._tls(),
                            tls_hostname=host,
                            tls_standard_compatible=False,
                        )
                    else:
                        stream = await anyio.connect_tcp(host, port)
                except _CONNECT_ERRORS as exc:
                    raise ConnectError(_connect_failure(host, port, exc)) from exc
            if stream is None:
                raise ConnectTimeout(
                    f"connecting to {host}:{port} took more than {self._options.connect} s"
                )
            if self._closed:
                await _close_stream(stream)
                raise _closed()
        except BaseException:
            self._release_slot()
            raise
        direct = cast("DirectStream", stream) if self._direct else None
        conn = _Connection(origin, stream, self._codec(), direct)
        self._conns.add(conn)
        return conn

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            context = ssl.create_default_context()
            context.set_alpn_protocols(["http/1.1"])
            self._ssl_context = context
        return self._ssl_context

    def _release_slot(self) -> None:
        """A slot came free: hand it to the first waiter, or count it free."""
        waiters = self._waiters
        if waiters:
            waiter = waiters.popleft()
            waiter.grant = "slot"
            waiter.event.set()
        else:
            self._slots -= 1

    def _give_idle(self, conn: _Connection) -> None:
        """A connection became idle: hand it to the first waiter, or keep it."""
        if self._closed:
            return  # aclose() closed it and freed its slot
        waiters = self._waiters
        if waiters:
            waiter = waiters.popleft()
            waiter.grant = conn
            waiter.event.set()
        else:
            conn.expires = self._now() + self._options.keepalive_expiry
            self._idle.append(conn)

    def _recycle(self, conn: _Connection) -> bool:
        """Put ``conn`` back after a complete response, if it can serve another."""
        h = conn.codec
        if (
            conn.unsent
            or not h.reusable
            or conn not in self._conns
            or self._options.keepalive_expiry <= 0
        ):
            return False  # (keepalive_expiry 0: a connection serves one request)
        h.start_next_cycle()
        conn.reused = True
        self._give_idle(conn)
        return True

    def _forget(self, conn: _Connection) -> bool:
        """Take ``conn`` off the books; True if its slot is now the caller's."""
        try:
            self._conns.remove(conn)
        except KeyError:  # aclose() took it (and its slot)
            return False
        return True

    async def _discard(self, conn: _Connection) -> None:
        """Close a busy connection that cannot be reused and free its slot."""
        if self._forget(conn):
            self._release_slot()
        await _close(conn)


def _closed() -> HTTPError:
    return HTTPError("the connection pool is closed; make a new one")


# --------------------------------------------------------------------------- response


class Response:
    """A response whose head is in: ``status`` and ``headers`` (lower-case names).

    Read the body with ``aiter_bytes()`` (or ``async for``) or ``aread()``; each
    wait for data is bounded by the request's ``read_timeout``. ``aclose()``
    releases the connection (idempotent); it happens on its own once the body is
    read to the end, or when reading fails.
    """

    __slots__ = ("_conn", "_pool", "_read_timeout", "_tag", "headers", "status")

    def __init__(
        self,
        pool: ConnectionPool,
        conn: _Connection,
        head: ResponseHead,
        read_timeout: float | None,
        tag: object = None,
    ) -> None:
        self.status: int = head.status
        self.headers: list[tuple[bytes, bytes]] = head.headers
        self._pool = pool
        self._conn: _Connection | None = conn
        self._read_timeout = read_timeout
        self._tag = tag

    def _detach(self) -> None:
        """The response no longer holds its connection: free its tag's slot."""
        self._conn = None
        tag, self._tag = self._tag, None
        if tag is not None:
            self._pool._give(tag)

    def __repr__(self) -> str:
        state = "open" if self._conn is not None else "closed"
        return f"<Response {self.status} {state}>"

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk as it arrives."""
        return self

    @property
    def ready(self) -> bool:
        """Whether the next chunk (or the body's end) is in hand: reading it
        waits for no bytes. False when unsure (the h11 codec cannot tell)."""
        conn = self._conn
        return conn is None or conn.codec.ready

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._next_chunk()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def aread(self, limit: int | None = None) -> bytes:
        """The rest of the body. With ``limit``, reading stops once ``limit`` bytes
        are in: the result is cut to ``limit`` and the connection closed (unless
        the whole body was already there)."""
        parts: list[bytes] = []
        size = 0
        while True:
            chunk = await self._next_chunk()
            if chunk is None:
                break
            parts.append(chunk)
            size += len(chunk)
            if limit is not None and size >= limit:
                await self.aclose()
                return b"".join(parts)[:limit]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def aclose(self) -> None:
        """Release the connection: back to the pool if the body was read to its end
        (or is wholly buffered already), else closed. Idempotent."""
        conn = self._conn
        if conn is None:
            return
        self._detach()
        if _drain_buffered(conn.codec) and self._pool._recycle(conn):
            return
        await self._pool._discard(conn)

    async def _next_chunk(self) -> bytes | None:
        conn = self._conn
        if conn is None:
            return None
        h = conn.codec
        try:
            while True:
                event = h.next_event()
                if type(event) is bytes:
                    return event
                if event is END:
                    self._detach()
                    if not self._pool._recycle(conn):
                        await self._pool._discard(conn)
                    return None
                if event is not NEED_DATA:
                    raise RemoteProtocolError(f"unexpected {event!r} in a response body")
                timeout = self._read_timeout
                deadline = math.inf if timeout is None else self._pool._now() + timeout
                data = await _receive(conn, deadline)
                if data is None:
                    raise ReadTimeout(f"no data from the server for {timeout} s")
                h.receive_data(data)
        except BadMessage as exc:
            self._detach()
            await self._pool._discard(conn)
            raise RemoteProtocolError(f"invalid response body: {exc}") from exc
        except BaseException:
            self._detach()
            await self._pool._discard(conn)
            raise


def _drain_buffered(h: Any) -> bool:
    """Skip the body data already received; True if the message ended there."""
    try:
        while True:
            event = h.next_event()
            if type(event) is not bytes:
                return event is END
    except BadMessage:
        return False
