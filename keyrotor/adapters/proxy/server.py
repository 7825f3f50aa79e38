"""The proxy's HTTP/1.1 front on trio, serving an ``App`` (``types.py``).

    port = await nursery.start(serve, app, ServerOptions(port=0))   # in a trio program
    run(app, ServerOptions(port=8080), log=print)                    # or blocking, until a signal

HTTP/1.1 is parsed and framed by a codec (``transports/codec.py``:
httptools when installed, else h11; ``ServerOptions.parser``); the sockets are
plain non-blocking ones that trio only waits on (``sockets.py``). Each
connection runs the loop of h11's ``examples/trio-server.py`` split over
two tasks that live as long as the connection: the reader reads a request head
and its whole body and hands the request over; the worker calls the application,
writes the response and starts the next cycle. Keep-alive, pipelining (requests
are answered in order), ``Connection: close``, HTTP/1.0 peers and
``Expect: 100-continue`` come from the codec.

Responses: a bytes body is sent with ``Content-Length`` in one write; an async
iterator body is sent chunked (close-delimited to HTTP/1.0 peers), each chunk
written as soon as it is yielded (SSE is never buffered). The application's
``content-length`` and ``transfer-encoding`` headers are dropped: the server
frames the body. Added headers: ``date`` (cached per second) and ``x-request-id``.

While the worker computes or streams a response, the reader keeps reading the
socket: bytes it reads belong to the next pipelined request and go to the codec's
buffer (up to ``max_header_bytes``; past that it stops reading until the
response is done and lets TCP push back); EOF or a reset means the client went
away, and the application call or its stream is cancelled (while pipelined bytes
wait in the buffer, the reader waits for the worker instead). When the response is
done, that same pending read becomes the keep-alive wait for the next request,
its ``idle_timeout`` kept by the run's watchdog (``transports/watchdog.py``), so a
request costs no new task and no cancel scope. ``Response.aclose`` is called exactly once for
every response the application returned (sent in full, client gone, error,
shutdown), shielded, bounded by ``CLEANUP_TIMEOUT``; an iterator body that has
an ``aclose`` (an async generator) is closed first the same way. A client that
half-closes its side after sending a request counts as gone.

Errors never reach the client as a traceback. A malformed request (garbage,
invalid headers, bad chunked framing) gets 400, ``CONNECT`` 405, a head larger than
``max_header_bytes`` 431, a body larger than ``max_body_bytes`` 413 (before any
of it is read when ``Content-Length`` says so): a small JSON body
``{"error": {"message": ..., "type": "invalid_request_error"}}``, then the
connection is closed (our side shut down first, then the rest of the request
drained briefly, so the client reads the answer rather than a reset). An
application exception before the response head gets 500, same shape, type
``server_error``, no details; the connection stays usable. An exception in a
stream after the head is sent can only end the connection (the client sees a
truncated chunked body).

Timeouts (``ServerOptions``): a connection, fresh or kept alive, waits
``idle_timeout`` for a request's first byte, then ``header_timeout`` for the
rest of its head (slowloris); each read of a body, and each write (a client that reads nothing),
``body_timeout``. Timeouts close the connection without an answer.

Connections beyond ``max_connections`` are accepted and closed at once (no
answer), so clients fail fast instead of waiting in the listen backlog; a
warning is logged at most once a second.

Shutdown (``shutdown`` set): the listening sockets are closed at once (new
connections are refused), idle keep-alive connections are closed, requests in
flight (and their streams) may finish for ``grace_period`` and are answered
with ``Connection: close``; then whatever is left is cancelled and every
connection closed. Cancelling ``serve`` skips the grace period.

Logging: ``log`` (optional) gets one dict per request: ``request_id``,
``method``, ``path`` (never the query string), ``status`` (499 when the client
went away before the head was sent, 0 when cancelled by shutdown), ``duration_ms``,
``bytes_out``, ``client``, ``outcome`` when it did not end normally
(``client_gone``, ``app_error``, ``stream_error``, ``write_timeout``,
``protocol_error``, ``cancelled``), then the fields of ``Response.log`` (they never override the
server's). Server events are dicts with an ``event`` key (``bad_request``,
``app_error``, ``stream_error``, ``protocol_error``, ``aclose_error``, ``stream_close_error``,
``connection_limit``, ``accept_error``, ``connection_error``, ``draining``,
``grace_period_expired``; ``run`` adds ``listening``, ``shutdown``,
``stopping_now``). Headers and bodies are never logged; the application's
exceptions are (type and message, cut at 500 characters), parse errors only
as the parser's short reason (never the offending bytes). A
``log`` that raises is ignored.
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Final

import attrs
import trio

from ...transports import codec as http_codec
from ...transports.codec import END, NEED_DATA, BadMessage, BadOutgoing, RequestHead
from ...transports.watchdog import Watchdog
from .sockets import Stream, accept, close, listen
from .types import App, Request, Response

__all__ = ["CLEANUP_TIMEOUT", "ServerOptions", "run", "serve"]

Log = Callable[[dict[str, Any]], None]

CLEANUP_TIMEOUT: Final = 5.0
"""Seconds a shielded ``Response.aclose`` (or a stream's ``aclose``) may take."""

_RECEIVE_SIZE: Final = 65536
_LINGER_SECONDS: Final = 1.0
_LINGER_BYTES: Final = 1 << 20
_SMALL_BODY: Final = 65536  # below this, head and body go out in one write
_IO_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
_ACCEPT_RESOURCE_ERRORS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)
_FRAMING_HEADERS: Final = frozenset({"content-length", "transfer-encoding"})
_FRAMING_NAMES: Final = frozenset({b"content-length", b"transfer-encoding"})
_REASONS: Final = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}
_NO_BODY_STATUSES: Final = frozenset({204, 304})

_CONTENT_TYPE_JSON: Final = (b"content-type", b"application/json")
_CONNECTION_CLOSE: Final = (b"connection", b"close")


def _error_body(message: str, kind: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": kind}}).encode()


_BODY_500: Final = _error_body("Internal server error", "server_error")

# --------------------------------------------------------------------------- options


def _positive(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"ServerOptions.{attribute.name} must be a number > 0, not {value!r}")


def _not_negative(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"ServerOptions.{attribute.name} must be a number >= 0, not {value!r}")


def _positive_int(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ServerOptions.{attribute.name} must be an int >= 1, not {value!r}")


def _gc_threshold(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10_000_000:
        raise ValueError(f"ServerOptions.gc_threshold must be an int in 0..10000000, not {value!r}")


def _port(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"ServerOptions.port must be an int in 0..65535 (0: any), not {value!r}")


def _host(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"ServerOptions.host must be a str ('' for every interface): {value!r}")


def _parser(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    http_codec.resolve(value)  # ValueError: unknown, or httptools not installed


@attrs.frozen(kw_only=True)
class ServerOptions:
    """Where to listen, limits (bytes, connections) and timeouts (seconds), checked when built.

    - ``host``/``port``: the address to bind (``port=0``: any free port, reported by
      ``serve``; ``host=""``: every interface).
    - ``max_header_bytes``: a larger request head gets 431; ``max_body_bytes``: a
      larger body (declared or chunked) gets 413; both close the connection.
    - ``header_timeout``: a request head must arrive whole within this of its
      first byte (slowloris);
      ``body_timeout``: the longest wait for a body read or a response write;
      ``idle_timeout``: a kept-alive connection without a request is closed after this.
    - ``grace_period``: on shutdown, how long requests in flight may still run.
    - ``request_timeout``: a request's head and body must arrive whole within
      this of its first byte (a slow body cannot hold a connection for ever).
    - ``max_connections``: connections beyond this are accepted and closed at once.
    - ``max_unproven``: connections that have not yet sent a request the app
      admitted (see ``App.admit`` in ``types.py``), at once; beyond, new
      connections are accepted and closed, so unauthorised ones can never take
      the slots of clients that proved themselves.
    - ``max_unproven_per_address``: the same, per client address; past it, a
      connection from an address with an admitted connection open whose whole
      request head has arrived already is let in (a client's burst of
      connections: each is admitted or refused as soon as it is read).
    - ``parser``: the HTTP/1.1 parser, ``"auto"`` (httptools when installed,
      else h11), ``"h11"`` or ``"httptools"`` (``transports/codec.py``).
    - ``gc_threshold``: not the server's but its process's: ``main.run`` (``keyrotor
      serve``) sets the cyclic garbage collector's first threshold to it once
      listening, after freezing what startup built (``main.tune_gc``); 0 leaves
      Python's own settings.
    """

    host: str = attrs.field(default="127.0.0.1", validator=_host)
    port: int = attrs.field(default=8080, validator=_port)
    max_header_bytes: int = attrs.field(default=64 * 1024, validator=_positive_int)
    max_body_bytes: int = attrs.field(default=10 * 1024 * 1024, validator=_positive_int)
    header_timeout: float = attrs.field(default=10.0, validator=_positive)
    body_timeout: float = attrs.field(default=30.0, validator=_positive)
    idle_timeout: float = attrs.field(default=75.0, validator=_positive)
    request_timeout: float = attrs.field(default=60.0, validator=_positive)
    grace_period: float = attrs.field(default=30.0, validator=_not_negative)
    max_connections: int = attrs.field(default=10_000, validator=_positive_int)
    max_unproven: int = attrs.field(default=1_000, validator=_positive_int)
    max_unproven_per_address: int = attrs.field(default=64, validator=_positive_int)
    parser: str = attrs.field(default="auto", validator=_parser)
    gc_threshold: int = attrs.field(default=10_000, validator=_gc_threshold)


# --------------------------------------------------------------------------- helpers

_date_second = -1
_date_value = b""


def _date() -> bytes:
    """The ``Date`` header value, formatted once per second."""
    global _date_second, _date_value
    now = time.time()
    second = int(now)
    if second != _date_second:
        _date_value = formatdate(now, usegmt=True).encode("ascii")
        _date_second = second
    return _date_value


class _Reject(Exception):
    """A request the server answers itself with an error, then closes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _WriteTimeout(Exception):
    """The client read nothing for ``body_timeout``."""


class _Incoming:
    """A request head as parsed, before its body is read."""

    __slots__ = ("event", "method", "target")

    def __init__(self, event: RequestHead) -> None:
        self.event = event
        self.method = event.method.decode("latin-1")
        self.target = event.target.decode("latin-1")

    def check(self, max_header_bytes: int) -> None:
        """Refuse a head the server must not serve (``_Reject``)."""
        if self.head_size() > max_header_bytes:
            # The parser only bounds incomplete heads: this one came whole in one read.
            raise _Reject(431, f"Request head too large (limit {max_header_bytes} bytes)")
        if self.method == "CONNECT":
            raise _Reject(405, "CONNECT is not supported: this is not a forward proxy")
        framing = {name for name, _ in self.event.headers if name in _FRAMING_NAMES}
        if len(framing) > 1:
            # RFC 9112 section 6.3: a message with both may be a smuggling attempt.
            raise _Reject(400, "Content-Length and Transfer-Encoding together: send one of them")

    def head_size(self) -> int:
        """The head's size in bytes, give or take optional whitespace."""
        event = self.event
        size = len(event.method) + len(event.target) + 14  # " " " HTTP/1.1\r\n" "\r\n"
        for name, value in event.headers:
            size += len(name) + len(value) + 4
        return size


# --------------------------------------------------------------------------- server


def _count(counts: dict[str, int], address: str, change: int) -> None:
    """Add ``change`` to ``address``'s count, which is left out at zero."""
    left = counts.get(address, 0) + change
    if left:
        counts[address] = left
    else:
        del counts[address]


class _Server:
    """Shared state of one ``serve`` call: options, live connections, drain flag."""

    def __init__(self, app: App, options: ServerOptions, log: Log | None) -> None:
        self.app = app
        self.options = options
        self.log = log
        self.connections: set[_Connection] = set()
        self.draining = False
        self.id_prefix = secrets.token_hex(3)
        self.ids = itertools.count(1)
        self.nursery: trio.Nursery | None = None
        self.rejected = 0
        self.rejected_logged_at = -1.0
        self.admit: Callable[[Request], Response | None] | None = getattr(app, "admit", None)
        self.answered: Callable[[int], None] | None = getattr(app, "server_answered", None)
        self.unproven: dict[str, int] = {}  # client address -> connections not yet admitted
        self.unproven_total = 0
        self.trusted: dict[str, int] = {}  # client address -> open connections admitted
        self.codec = http_codec.codecs(options.parser)[0]
        self._watchdog: Watchdog | None = None

    def watchdog(self) -> Watchdog:
        """The run's watchdog (keep-alive deadlines), found once."""
        watchdog = self._watchdog
        if watchdog is None:
            watchdog = self._watchdog = Watchdog.of_this_run()
        return watchdog

    def emit(self, line: dict[str, Any]) -> None:
        if self.log is not None:
            with suppress(Exception):  # a broken logger must not break serving
                self.log(line)

    async def accept_loop(self, listener: socket.socket) -> None:
        assert self.nursery is not None
        limit = self.options.max_connections
        while True:
            try:
                stream, address = await accept(listener)
            except OSError as exc:
                if exc.errno not in _ACCEPT_RESOURCE_ERRORS:
                    raise
                self.emit({"event": "accept_error", "error": errno.errorcode.get(exc.errno, "")})
                await trio.sleep(0.1)
                continue
            if (
                len(self.connections) >= limit
                or self.unproven_total >= self.options.max_unproven
                or (
                    self.unproven.get(address, 0) >= self.options.max_unproven_per_address
                    # A burst of connections from an address that has one admitted
                    # open, each with its request there already: admitted or refused
                    # as soon as its head is read.
                    and not (
                        address in self.trusted
                        and stream.head_waiting(self.options.max_header_bytes)
                    )
                )
            ):
                stream.close()
                self._note_rejected()
                continue
            connection = _Connection(self, stream, address)
            self.connections.add(connection)  # counted now: a burst of accepts sees it
            _count(self.unproven, address, 1)
            self.unproven_total += 1
            self.nursery.start_soon(connection.run)

    def proven(self, address: str, admitted: bool) -> None:
        """A connection from ``address`` is no longer unproven: a request of it was
        ``admitted`` (it counts as trusted until it ends), or it ended without one."""
        _count(self.unproven, address, -1)
        self.unproven_total -= 1
        if admitted:
            _count(self.trusted, address, 1)

    def _note_rejected(self) -> None:
        self.rejected += 1
        now = trio.current_time()
        if now - self.rejected_logged_at >= 1.0:
            self.emit(
                {
                    "event": "connection_limit",
                    "max_connections": self.options.max_connections,
                    "unproven": self.unproven_total,
                    "rejected": self.rejected,
                }
            )
            self.rejected = 0
            self.rejected_logged_at = now

    def start_draining(self) -> None:
        """Stop keeping connections alive and close the idle ones now."""
        self.draining = True
        for connection in self.connections:
            if connection.idle_scope is not None:  # waiting for its first request
                connection.idle_scope.cancel()
            elif connection.kept_alive:  # waiting for its next one: end that wait
                trio.lowlevel.notify_closing(connection.stream.sock)


class _Connection:
    """One client connection: a reader (this task) and a worker (one more task).

    The reader parses request heads and bodies and hands each request to the
    worker; while the worker runs the application and writes the response, the
    reader keeps reading: bytes are the next pipelined request's (the codec buffers
    them); EOF or a reset means the client went away: the reader returns, which
    cancels the worker and its request. When the response is done, that same
    read becomes the keep-alive wait for the next request, so the common path
    costs no task and no cancellation per request.
    """

    __slots__ = (
        "address",
        "busy",
        "bytes_out",
        "client",
        "closing",
        "codec",
        "gone",
        "idle_scope",
        "kept_alive",
        "nursery",
        "pending",
        "proven",
        "reader_lot",
        "request_deadline",
        "server",
        "started",
        "stream",
        "worker_lot",
    )

    def __init__(self, server: _Server, stream: Stream, address: str = "") -> None:
        self.server = server
        self.stream = stream
        self.address = address
        self.proven = False  # a request of this connection was admitted
        self.request_deadline = math.inf  # the head and body must be in by then
        self.codec = server.codec(server.options.max_header_bytes)
        peer = stream.peer()
        if peer is None:
            self.client = ""
        else:
            host, port = peer
            self.client = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.nursery: trio.Nursery | None = None
        self.pending: tuple[Request, float] | None = None  # for the worker
        self.busy = False  # a request is with the worker
        self.closing = False  # the worker ends the connection
        self.gone = False  # the client closed or reset the connection
        self.bytes_out = 0
        self.worker_lot = trio.lowlevel.ParkingLot()
        self.reader_lot = trio.lowlevel.ParkingLot()
        self.idle_scope: trio.CancelScope | None = None  # a fresh connection's wait
        self.kept_alive = False  # the reader's read is the keep-alive wait (a deadline)

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._worker)
                try:
                    await self._reader()
                finally:
                    nursery.cancel_scope.cancel()
        except Exception as exc:  # e.g. an app's exception group mixed with our cancellation
            self._bug(exc)
        finally:
            self.server.connections.discard(self)
            if self.kept_alive:  # cancelled in the keep-alive wait (shutdown's grace)
                self.server.watchdog().unwatch(self.stream.sock)
            if self.proven:
                _count(self.server.trusted, self.address, -1)
            else:
                self.server.proven(self.address, admitted=False)
            self.stream.close()
            self.codec.close()  # no reference cycle left for the garbage collector

    # ----------------------------------------------------------------- the reader

    async def _reader(self) -> None:
        """Read requests and hand them to the worker until the connection should end."""
        server = self.server
        try:
            while True:
                incoming = await self._receive_head()
                if incoming is None:
                    return
                start = trio.current_time()
                request_id = f"{server.id_prefix}{next(server.ids):x}"
                request = Request(
                    method=incoming.method,
                    target=incoming.target,
                    headers=[
                        (name.decode("latin-1"), value.decode("latin-1"))
                        for name, value in incoming.event.headers
                    ],
                    body=b"",
                    client=self.client,
                    request_id=request_id,
                )
                try:
                    incoming.check(server.options.max_header_bytes)
                    if server.admit is not None:
                        refusal = server.admit(request)  # from the head: no body read yet
                        if refusal is not None:
                            await self._refuse_with(refusal, request_id, incoming.method)
                            self._log(
                                incoming.method, incoming.target, request_id, refusal.status, start
                            )
                            return
                        request.admitted = True
                    if not self.proven:
                        self.proven = True
                        server.proven(self.address, admitted=True)
                    body = await self._receive_body(incoming)
                except _Reject as reject:
                    self.bytes_out = 0
                    await self._refuse(reject.status, reject.message, request_id, incoming.method)
                    self._log(incoming.method, incoming.target, request_id, reject.status, start)
                    if reject.status == 408:
                        server.emit({"event": "request_timeout", "client": self.client})
                    return
                if body is None:
                    return
                request.body = body
                self.pending = (request, start)
                self.busy = True
                self.worker_lot.unpark()
                if not await self._watch() or self.closing:
                    return
        except BadMessage as exc:
            if not self.gone:
                reason = exc.reason
                server.emit(
                    {
                        "event": "bad_request",
                        "status": exc.status,
                        "reason": reason,
                        "client": self.client,
                    }
                )
                if exc.status == 431:
                    limit = server.options.max_header_bytes
                    message = f"Request head too large (limit {limit} bytes)"
                else:
                    message = f"Malformed HTTP request ({reason})"
                await self._refuse(exc.status, message, None)
        except (*_IO_ERRORS, _WriteTimeout):
            pass
        except Exception as exc:  # a bug here must not take the server down
            self._bug(exc)

    async def _receive(self) -> None:
        """Read once from the socket into the codec (EOF included)."""
        self._received(await self.stream.receive_some(_RECEIVE_SIZE))

    def _received(self, data: bytes) -> None:
        if not data:
            self.gone = True
        self.codec.receive_data(data)

    async def _receive_head(self) -> _Incoming | None:
        """The next request head, or None to close quietly (EOF, timeout, drain)."""
        conn = self.codec
        event = conn.next_event()
        if event is NEED_DATA:
            if self.server.draining:
                return None
            options = self.server.options
            if not conn.buffered:
                # Nothing of the request yet: an idle wait, which shutdown may end.
                # A fresh connection waits like a kept-alive one: clients and load
                # balancers open connections ahead of their first request.
                idle = trio.current_time() + options.idle_timeout
                with trio.CancelScope(deadline=idle) as scope:
                    self.idle_scope = scope
                    try:
                        await self._receive()
                    finally:
                        self.idle_scope = None
                if scope.cancelled_caught:
                    return None
            now = trio.current_time()
            self.request_deadline = now + options.request_timeout
            with trio.CancelScope(
                deadline=now + min(options.header_timeout, options.request_timeout)
            ):
                while (event := conn.next_event()) is NEED_DATA:
                    await self._receive()
        else:  # the whole head was in the buffer already (pipelined)
            self.request_deadline = trio.current_time() + self.server.options.request_timeout
        if isinstance(event, RequestHead):
            return _Incoming(event)
        return None  # ConnectionClosed, or the head timed out

    async def _receive_body(self, incoming: _Incoming) -> bytes | None:
        """The whole request body, or None to close quietly (EOF, timeout)."""
        conn = self.codec
        options = self.server.options
        limit = options.max_body_bytes
        for name, value in incoming.event.headers:
            if name == b"content-length" and int(value) > limit:
                raise _Reject(413, f"Request body too large (limit {limit} bytes)")
        if conn.expects_continue:
            await self._write(conn.informational_continue())
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if type(event) is bytes:
                size += len(event)
                if size > limit:
                    raise _Reject(413, f"Request body too large (limit {limit} bytes)")
                chunks.append(event)
            elif event is END:
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            elif event is NEED_DATA:
                data = self.stream.receive_now(_RECEIVE_SIZE)
                if data is not None:  # the rest was there already (a large body): no timer
                    self._received(data)
                    continue
                now = trio.current_time()
                deadline = min(now + options.body_timeout, self.request_deadline)
                with trio.CancelScope(deadline=deadline) as scope:
                    await self._receive()
                if scope.cancelled_caught:
                    raise _Reject(
                        408,
                        "Request body not received in time (body_timeout "
                        f"{options.body_timeout} s between reads, request_timeout "
                        f"{options.request_timeout} s in all)",
                    )
            else:
                return None

    async def _watch(self) -> bool:
        """Read while the worker answers; then wait for the next request's first bytes.

        True: bytes of the next request are in the codec's buffer. False: the client went
        away (its request, if any, is cancelled), or the keep-alive wait timed out
        or was ended by shutdown. While bytes of a pipelined request (or, past
        ``max_header_bytes``, more) wait in the buffer, the reader stops reading
        until the worker is done.
        """
        conn = self.codec
        budget = self.server.options.max_header_bytes
        while True:
            if self.busy and (budget <= 0 or conn.buffered):
                await self.reader_lot.park()
                if not self.busy:
                    return True
            try:
                data = await self.stream.receive_some(_RECEIVE_SIZE, wait_first=True)
            except _IO_ERRORS:
                data = b""
            if self.kept_alive:  # the worker was done: that was the keep-alive wait
                self.kept_alive = False
                self.server.watchdog().unwatch(self.stream.sock)
                if not data:  # the client closed, the idle timeout or shutdown
                    return False
            if not data:
                self.gone = True  # returning cancels the worker, and its request with it
                return False
            conn.receive_data(data)
            if not self.busy:
                return True
            budget -= len(data)

    # ----------------------------------------------------------------- the worker

    async def _worker(self) -> None:
        """Answer the requests the reader hands over, one at a time."""
        assert self.nursery is not None
        conn = self.codec
        try:
            while True:
                while self.pending is None:
                    await self.worker_lot.park()
                request, start = self.pending
                self.pending = None
                keep = await self._respond(request, start)
                if keep and not self.server.draining and conn.reusable:
                    conn.start_next_cycle()
                    self.busy = False
                    self._wake_reader()
                else:  # Connection: close, HTTP/1.0, an error, or shutdown
                    self.closing = True
                    self.busy = False
                    self.nursery.cancel_scope.cancel()
                    return
        except Exception as exc:  # a bug here must not take the server down
            self._bug(exc)
            self.nursery.cancel_scope.cancel()

    def _wake_reader(self) -> None:
        """The response is done: the reader's read becomes the keep-alive wait."""
        if self.reader_lot:
            self.reader_lot.unpark_all()  # a pipelined request waits in the buffer
        else:
            self.kept_alive = True
            deadline = trio.current_time() + self.server.options.idle_timeout
            self.server.watchdog().watch(self.stream.sock, deadline)

    async def _respond(self, request: Request, start: float) -> bool:
        """Run the application and send its answer. True: the connection may be reused."""
        self.bytes_out = 0
        response: Response | None = None
        status = 0
        outcome: str | None = "cancelled"
        try:
            try:
                answer = await self.server.app(request)
                if not isinstance(answer, Response):
                    raise TypeError(f"the app returned {type(answer).__name__}")
                response = answer
            except Exception as exc:
                self._app_error("app_error", request.request_id, exc)
                status, outcome = 500, "app_error"
                self._answered(500)  # the app failed before counting an answer
                await self._send_error_500(request)
            else:
                status = response.status
                status, outcome = await self._send(request, response)
        except (*_IO_ERRORS, _WriteTimeout) as exc:
            outcome = "write_timeout" if isinstance(exc, _WriteTimeout) else "client_gone"
        except BadOutgoing as exc:  # the codec refused what we sent: end the connection
            self._app_error("protocol_error", request.request_id, exc)
            outcome = "protocol_error"
        finally:
            if self.gone and outcome == "cancelled":
                outcome = "client_gone"
            if self.bytes_out == 0 and outcome in ("client_gone", "cancelled"):
                status = 499 if outcome == "client_gone" else 0
            if response is not None and response.aclose is not None:
                await self._cleanup(response.aclose, "aclose_error", request.request_id)
            self._log(
                request.method, request.target, request.request_id, status, start, outcome, response
            )
        return outcome is None or outcome == "app_error"

    def _head(self, request_id: str, status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
        """The response head's bytes (``BadOutgoing`` for a bad status or header: the
        codec checks before it commits to anything)."""
        headers.append((b"date", _date()))
        headers.append((b"x-request-id", request_id.encode("ascii")))
        if self.server.draining:
            headers.append(_CONNECTION_CLOSE)
        return self.codec.head(status, _REASONS.get(status, b""), headers)

    async def _send(self, request: Request, response: Response) -> tuple[int, str | None]:
        """Send ``response``: the status sent and the outcome (None: sent in full)."""
        status = response.status
        body = response.body
        try:
            headers = [
                (name.encode("latin-1"), value.encode("latin-1"))
                for name, value in response.headers
                if name.lower() not in _FRAMING_HEADERS
            ]
            if isinstance(body, bytes | bytearray | memoryview):
                body = bytes(body)
                if status not in _NO_BODY_STATUSES:
                    headers.append((b"content-length", b"%d" % len(body)))
            else:
                body = body.__aiter__()
            head = self._head(request.request_id, status, headers)
        except (ValueError, TypeError, AttributeError, BadOutgoing) as exc:
            # A head the codec refuses (bad status or header): nothing is sent yet.
            self._app_error("app_error", request.request_id, exc)
            await self._send_error_500(request)
            return 500, "app_error"
        if isinstance(body, bytes):
            await self._send_whole(request, status, head, body)
            return status, None
        return status, await self._stream(request, status, head, body)

    async def _send_error_500(self, request: Request) -> None:
        headers = [_CONTENT_TYPE_JSON, (b"content-length", b"%d" % len(_BODY_500))]
        head = self._head(request.request_id, 500, headers)
        await self._send_whole(request, 500, head, _BODY_500)

    async def _send_whole(self, request: Request, status: int, head: bytes, body: bytes) -> None:
        """Send a head and a ``Content-Length`` body (none for HEAD, 204, 304)."""
        conn = self.codec
        if request.method == "HEAD" or status in _NO_BODY_STATUSES:
            body = b""
        elif body:
            body = conn.data(body)  # a fixed-length body goes out as it is
        conn.end()  # nothing to send after a fixed-length body
        if len(body) < _SMALL_BODY:
            await self._write(head + body)
        else:
            await self._write(head)
            await self._write(body)

    async def _stream(
        self, request: Request, status: int, head: bytes, body: AsyncIterator[bytes]
    ) -> str | None:
        """Send a chunked body, each chunk as it comes: the outcome (None: sent in full).

        A body with a ``ready`` property (True: its next chunk, or its end, is in
        hand: reading it waits for nothing) has what is ready joined into one
        write: the head with the first chunk, the last chunk with the end. Bytes
        are never held over a wait: before a read that is not ready, what is
        held goes out."""
        conn = self.codec
        lookahead = hasattr(body, "ready")
        held = [head]
        try:
            if request.method != "HEAD" and status not in _NO_BODY_STATUSES:
                while True:
                    if held and not (lookahead and body.ready):  # type: ignore[attr-defined]
                        await self._write_held(held)
                    try:
                        chunk = await body.__anext__()
                        if not chunk:
                            continue
                        held.append(conn.data(chunk))
                    except StopAsyncIteration:
                        break
                    except Exception as exc:  # the stream failed, or yielded no bytes
                        self._app_error("stream_error", request.request_id, exc)
                        await self._write_held(held)  # what came before the failure
                        return "stream_error"
            held.append(conn.end())
            await self._write_held(held)
            return None
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await self._cleanup(aclose, "stream_close_error", request.request_id)

    # ----------------------------------------------------------------- writing

    async def _write_held(self, held: list[bytes]) -> None:
        """Send the pieces ``held`` in one write (none if they are empty), and forget them."""
        data = b"".join(held)
        held.clear()
        if data:
            await self._write(data)

    async def _write(self, data: bytes) -> None:
        """Send: at once if the kernel takes it all (no timer, no scheduler pass),
        else giving up (``_WriteTimeout``) after ``body_timeout``."""
        stream = self.stream
        sent = stream.send_now(data)
        if sent < len(data):
            with trio.move_on_after(self.server.options.body_timeout) as scope:
                await stream.send_rest(data, sent)
            if scope.cancelled_caught:
                raise _WriteTimeout
        self.bytes_out += len(data)

    async def _refuse(
        self, status: int, message: str, request_id: str | None, method: str = ""
    ) -> None:
        """Answer an error ourselves and close: shut our side, drain the rest briefly."""
        self._answered(status)
        body = _error_body(message)
        await self._close_with(status, [_CONTENT_TYPE_JSON], body, request_id, method)

    def _answered(self, status: int) -> None:
        """Tell the app of an answer the server writes itself (its metrics count it)."""
        answered = self.server.answered
        if answered is not None:
            answered(status)

    async def _refuse_with(self, response: Response, request_id: str, method: str) -> None:
        """Send the app's refusal of a request head (its body unread), then close."""
        body = response.body if isinstance(response.body, bytes) else b""
        headers = [
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in response.headers
            if name.lower() not in _FRAMING_HEADERS and name.lower() != "connection"
        ]
        self.bytes_out = 0
        await self._close_with(response.status, headers, body, request_id, method)

    async def _close_with(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        request_id: str | None,
        method: str = "",
    ) -> None:
        """Send one whole answer with ``Connection: close`` (its body but to a
        ``HEAD``), shut our side, and drain what the client still sends for a
        moment (so it reads the answer, not a reset); nothing read is kept."""
        conn = self.codec
        if not conn.can_respond:
            return
        headers = [
            *headers,
            (b"content-length", b"%d" % len(body)),
            _CONNECTION_CLOSE,
            (b"date", _date()),
        ]
        if request_id is not None:
            headers.append((b"x-request-id", request_id.encode("ascii")))
        try:
            head = conn.head(status, _REASONS.get(status, b""), headers)
            await self._write(head if method == "HEAD" else head + body)
            self.stream.send_eof()
            with trio.move_on_after(_LINGER_SECONDS):
                drained = 0
                while drained < _LINGER_BYTES:
                    data = await self.stream.receive_some(_RECEIVE_SIZE)
                    if not data:
                        break
                    drained += len(data)
        except (*_IO_ERRORS, BadOutgoing, _WriteTimeout):
            pass

    # ----------------------------------------------------------------- cleanup and logs

    async def _cleanup(
        self, aclose: Callable[[], Awaitable[object]], event: str, request_id: str
    ) -> None:
        """Await ``aclose()`` shielded from cancellation, at most ``CLEANUP_TIMEOUT``."""
        with trio.move_on_after(CLEANUP_TIMEOUT, shield=True) as scope:
            try:
                await aclose()
            except Exception as exc:
                self._app_error(event, request_id, exc)
        if scope.cancelled_caught:
            self.server.emit({"event": event, "request_id": request_id, "error": "timeout"})

    def _app_error(self, event: str, request_id: str, exc: BaseException) -> None:
        self.server.emit(
            {
                "event": event,
                "request_id": request_id,
                "error": f"{type(exc).__name__}: {exc}"[:500],
            }
        )

    def _bug(self, exc: BaseException) -> None:
        self.server.emit(
            {"event": "connection_error", "error": type(exc).__name__, "client": self.client}
        )

    def _log(
        self,
        method: str,
        target: str,
        request_id: str,
        status: int,
        start: float,
        outcome: str | None = None,
        response: Response | None = None,
    ) -> None:
        """The access log line of one request."""
        if self.server.log is None:
            return
        line: dict[str, Any] = {
            "request_id": request_id,
            "method": method,
            "path": target.split("?", 1)[0],
            "status": status,
            "duration_ms": round((trio.current_time() - start) * 1000, 3),
            "bytes_out": self.bytes_out,
            "client": self.client,
        }
        if outcome is not None:
            line["outcome"] = outcome
        if response is not None and response.log:
            for key, value in response.log.items():
                line.setdefault(key, value)
        self.server.emit(line)


# --------------------------------------------------------------------------- entry points


async def serve(
    app: App,
    options: ServerOptions,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    shutdown: trio.Event | None = None,
    log: Log | None = None,
    reuse_port: bool = False,
) -> None:
    """Serve ``app`` until ``shutdown`` is set (then drain gracefully) or until cancelled.

    Reports the bound port through ``task_status``:
    ``port = await nursery.start(serve, app, options)``. With ``port=0`` every
    address of ``host`` gets the port the first one got.
    ``reuse_port``: bind with ``SO_REUSEPORT``, so that several processes
    (``keyrotor serve --workers N``) share the port and the kernel spreads
    the connections among them.
    """
    listeners = await listen(options.host, options.port, reuse_port)
    server = _Server(app, options, log)
    try:
        async with trio.open_nursery() as connections:
            server.nursery = connections
            async with trio.open_nursery() as acceptors:
                for listener in listeners:
                    acceptors.start_soon(server.accept_loop, listener)
                task_status.started(listeners[0].getsockname()[1])
                if shutdown is None:
                    await trio.sleep_forever()
                await shutdown.wait()
                acceptors.cancel_scope.cancel()
            for listener in listeners:
                close(listener)  # new connections are refused from now on
            server.emit({"event": "draining", "connections": len(server.connections)})
            server.start_draining()
            connections.cancel_scope.deadline = trio.current_time() + options.grace_period
        if connections.cancel_scope.cancelled_caught:
            server.emit({"event": "grace_period_expired"})
    finally:
        for listener in listeners:
            close(listener)


def run(app: App, options: ServerOptions, *, log: Log | None = None) -> None:
    """Serve ``app`` (blocking) until SIGINT or SIGTERM, then shut down gracefully.

    Logs ``{"event": "listening", "host", "port"}`` once bound. A second signal
    during the grace period stops at once.
    """

    def emit(line: dict[str, Any]) -> None:
        if log is not None:
            with suppress(Exception):
                log(line)

    async def main() -> None:
        shutdown = trio.Event()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def serve_then_stop(task_status: trio.TaskStatus[int]) -> None:
                    await serve(app, options, task_status=task_status, shutdown=shutdown, log=log)
                    nursery.cancel_scope.cancel()

                port = await nursery.start(serve_then_stop)
                emit({"event": "listening", "host": options.host, "port": port})
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if shutdown.is_set():
                        emit({"event": "stopping_now", "signal": name})
                        nursery.cancel_scope.cancel()
                        break
                    emit({"event": "shutdown", "signal": name})
                    shutdown.set()

    trio.run(main)
