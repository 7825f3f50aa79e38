"""The fake OpenRouter upstream: h11 over anyio streams, loopback only.

Runs in-process under trio or asyncio (anyio), in a background thread for
sync code, or from the command line (``python -m keyrotor.testing.fake_upstream``).
See ``FakeUpstream``.

The per-request path is kept lean for load benchmarks: h11 parses every request
(Content-Length or chunked bodies, pipelining, malformed input -> 400), while
responses are written from pre-encoded byte templates (h11's send path costs as
much as its parser); each keep-alive cycle starts a fresh ``h11.Connection`` fed
with the bytes the client already pipelined.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import ssl
import zlib
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any, NamedTuple, cast

import anyio
import anyio.abc
import h11
from anyio.abc import SocketAttribute, SocketListener
from anyio.streams.tls import TLSStream
from attrs import field, frozen

from ..upstream.behaviours import (
    Behaviour,
    Call,
    Drop,
    Hang,
    MidStreamError,
    Reply,
    key_data,
)
from .clock import Clock, wall_clock
from .scenarios import Model, Scenario

__all__ = ["FakeUpstream", "KeyStats", "LogEntry", "ServerStats"]

_ROUTES: dict[str, bytes] = {
    "/chat/completions": b"POST",
    "/completions": b"POST",
    "/embeddings": b"POST",
    "/models": b"GET",
    "/key": b"GET",
}
_PREFIXES = ("/api/v1", "/v1")
_MAX_CHUNKS = 4096  # max_tokens above this is clamped (content chunks)
_MAX_PATH_CACHE = 1024
_EMBEDDING_DIM = 8

_WORDS = ("Hello", " from", " the", " fake", " upstream", ". ")
_WORD_JSON = tuple(json.dumps(w).encode() for w in _WORDS)

_COMMENT = b": OPENROUTER PROCESSING\n\n"
_DONE = b"data: [DONE]\n\n"

_CHAT_BODY = (
    b'{"id":"%s","provider":%s,"model":%s,"object":"chat.completion","created":%d,'
    b'"choices":[{"index":0,"logprobs":null,"finish_reason":"stop","native_finish_reason":"stop",'
    b'"message":{"role":"assistant","content":%s,"refusal":null,"reasoning":null}}],'
    b'"usage":%s}'
)
# A non-streaming answer whose generation failed midway: the error sits in the
# choice, beside the partial output (OpenRouter's errors-and-debugging page,
# "Skin-specific error formats"); a stream's error chunk has it at the top level.
_CHAT_ERROR_BODY = (
    b'{"id":"%s","provider":%s,"model":%s,"object":"chat.completion","created":%d,'
    b'"choices":[{"index":0,"logprobs":null,"finish_reason":"error","native_finish_reason":"error",'
    b'"message":{"role":"assistant","content":%s,"refusal":null,"reasoning":null},'
    b'"error":%s}]}'
)
_TEXT_BODY = (
    b'{"id":"%s","provider":%s,"model":%s,"object":"text_completion","created":%d,'
    b'"choices":[{"index":0,"text":%s,"logprobs":null,"finish_reason":"stop",'
    b'"native_finish_reason":"stop"}],"usage":%s}'
)
_TEXT_ERROR_BODY = (
    b'{"id":"%s","provider":%s,"model":%s,"object":"text_completion","created":%d,'
    b'"choices":[{"index":0,"text":%s,"logprobs":null,"finish_reason":"error",'
    b'"native_finish_reason":"error","error":%s}]}'
)
_CHAT_CHUNK = (
    b'data: {"id":"%s","provider":%s,"model":%s,"object":"chat.completion.chunk","created":%d,'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":%s},"finish_reason":%s,'
    b'"native_finish_reason":%s,"logprobs":null}]%s}\n\n'
)
_TEXT_CHUNK = (
    b'data: {"id":"%s","provider":%s,"model":%s,"object":"text_completion","created":%d,'
    b'"choices":[{"index":0,"text":%s,"finish_reason":%s,"native_finish_reason":%s,'
    b'"logprobs":null}]%s}\n\n'
)
# OpenAI's last chunk of a stream that asked for its usage: no choices, the usage.
_USAGE_CHUNK = (
    b'data: {"id":"%s","provider":%s,"model":%s,"object":"%s","created":%d,'
    b'"choices":[],"usage":%s}\n\n'
)
_USAGE_NULL = b',"usage":null'
_USAGE = (
    b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d,"cost":%s,"is_byok":false,'
    b'"prompt_tokens_details":{"cached_tokens":%d,"cache_write_tokens":0},'
    b'"cost_details":{"upstream_inference_cost":null},'
    b'"completion_tokens_details":{"reasoning_tokens":%d}}'
)

_JSON_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
    b"x-generation-id: %s\r\n"
)
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"x-generation-id: %s\r\n"
)
_KEEP_END = b"\r\n"
_CLOSE_END = b"connection: close\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_DISCONNECTED = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    ConnectionError,
    OSError,
)


def _reply(status: int, message: str, *, close: bool = False, metadata: Any = None) -> Reply:
    headers = (("Connection", "close"),) if close else ()
    return Reply(status, message, metadata, headers=headers)


_NO_AUTH = _reply(401, "No auth credentials found")
_UNKNOWN_KEY = _reply(401, "User not found.")
_NOT_FOUND = _reply(
    404,
    "Not found. The fake upstream serves POST /chat/completions, /completions, /embeddings "
    "and GET /models, /key under /api/v1 (or /v1, or no prefix).",
)
_TOO_LARGE = _reply(413, "Request body too large", close=True)
_BAD_JSON = _reply(400, "Invalid JSON body", metadata={"error_type": "invalid_request"})
_SERVER_ERROR = _reply(500, "Internal Server Error", close=True)


_METHOD_NOT_ALLOWED = {
    method: _reply(405, f"Method not allowed; use {method.decode()}")
    for method in (b"GET", b"POST")
}
_MALFORMED = {status: _reply(status, "Malformed HTTP request", close=True) for status in (400, 431)}


class LogEntry(NamedTuple):
    """One request as the server saw it: key (alias, or secret without alias;
    ``None`` without credentials), normalized path (``"/chat/completions"``,
    ``"/key"``...) and the status decided (``0``: hung up or dropped)."""

    key: str | None
    path: str
    status: int


@frozen
class KeyStats:
    """Counters of one key (a snapshot): ``requests`` (all endpoints, probes
    included), ``by_endpoint`` (normalized path -> count), ``by_status``
    (status -> count, ``0`` for hang/drop), ``probes`` (``GET /key``),
    ``in_flight`` now and its maximum, ``bytes_in``/``bytes_out`` (bodies),
    ``cost`` charged (USD) and ``disconnects`` (client went away mid-response)."""

    key: str | None
    requests: int = 0
    by_endpoint: Mapping[str, int] = field(factory=dict)
    by_status: Mapping[int, int] = field(factory=dict)
    probes: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    cost: float = 0.0
    disconnects: int = 0


@frozen
class ServerStats:
    """Server-wide counters (a snapshot). ``errors`` counts bugs in the fake
    itself (each answered with a 500); tests should expect 0."""

    requests: int
    by_status: Mapping[int, int]
    connections: int
    open_connections: int
    in_flight: int
    malformed: int
    disconnects: int
    errors: int


class _Counters:
    __slots__ = (
        "by_endpoint",
        "by_status",
        "bytes_in",
        "bytes_out",
        "cost",
        "disconnects",
        "in_flight",
        "max_in_flight",
        "probes",
        "requests",
    )

    def __init__(self) -> None:
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        """Zero every counter but ``in_flight`` (requests still running)."""
        self.requests = 0
        self.by_endpoint: dict[str, int] = {}
        self.by_status: dict[int, int] = {}
        self.probes = 0
        self.max_in_flight = self.in_flight
        self.bytes_in = 0
        self.bytes_out = 0
        self.cost = 0.0
        self.disconnects = 0


class _Totals:
    __slots__ = (
        "by_status",
        "connections",
        "disconnects",
        "errors",
        "in_flight",
        "malformed",
        "open_connections",
        "requests",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.by_status: dict[int, int] = {}
        self.connections = 0
        self.open_connections = 0
        self.in_flight = 0
        self.malformed = 0
        self.disconnects = 0
        self.errors = 0


def _loopback_host(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        is_loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        is_loopback = False
    if not is_loopback:
        raise ValueError(
            f"FakeUpstream binds to loopback addresses only (such as 127.0.0.1), not {host!r}"
        )
    return host


def _text_chars(value: Any) -> int:
    """Characters of text in a message content / prompt / input value."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        total = 0
        for part in value:
            if isinstance(part, str):
                total += len(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    total += len(text)
        return total
    return 0


def _prompt_tokens(endpoint: str, body: Mapping[str, Any]) -> int:
    """Deterministic token estimate: about 4 characters a token, at least 1."""
    if endpoint == "/chat/completions":
        chars = 0
        messages = body.get("messages")
        if isinstance(messages, list):
            for message in messages:
                if isinstance(message, dict):
                    chars += _text_chars(message.get("content"))
    elif endpoint == "/completions":
        chars = _text_chars(body.get("prompt"))
    else:
        chars = _text_chars(body.get("input"))
    return max(1, (chars + 3) // 4)


def _cache_and_images(messages: list[Any], prompt: int, entry: Model) -> tuple[int, int]:
    """(cached prompt tokens, input images) of a chat request: half the prompt
    is read from the cache when a content part asks for caching
    (``cache_control``) and the model has a cache price; every ``image_url``
    part is an image."""
    cache = images = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict):
                    cache = cache or "cache_control" in part
                    images += part.get("type") == "image_url"
    cached = prompt // 2 if cache and entry.input_cache_read is not None else 0
    return cached, images


def _asks_usage(body: Mapping[str, Any]) -> bool:
    """Whether a request asks for a stream's usage, as OpenAI reads it:
    ``"stream_options": {"include_usage": true}``."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _embedding(text: str) -> list[float]:
    seed = zlib.crc32(text.encode())
    out = []
    for i in range(_EMBEDDING_DIM):
        seed = zlib.crc32(i.to_bytes(1, "little"), seed)
        out.append(round((seed % 20001 - 10000) / 10000, 4))
    return out


class FakeUpstream:
    """A scripted, OpenRouter-compatible HTTP server on 127.0.0.1 for tests,
    demos and benchmarks.

    Async (trio or asyncio)::

        async with FakeUpstream(scenario).serve() as server:
            httpx.AsyncClient(base_url=server.url)   # "http://127.0.0.1:PORT/api/v1"

    or ``await task_group.start(server.run)`` then ``await server.aclose()``.
    From sync code: ``with FakeUpstream.running_in_thread(scenario) as server:``.

    Keys are the bearer secrets of ``scenario.keys`` (see ``Scenario``). Change
    them at runtime with ``set_behaviour``; read ``stats(key)``, ``totals()``
    and ``log`` (``LogEntry`` tuples, oldest first, at most ``log_limit``).
    ``clock`` (seconds since the epoch) drives rate-limit windows and
    ``X-RateLimit-Reset``; latency behaviours sleep on the event loop.
    ``ssl_context`` (a server context with its certificate loaded): HTTPS,
    and ``url`` starts with ``https://`` (as OpenRouter's does).
    """

    def __init__(
        self,
        scenario: Scenario | None = None,
        *,
        clock: Clock = wall_clock,
        host: str = "127.0.0.1",
        port: int = 0,
        log_limit: int | None = 100_000,
        max_body_size: int = 8 * 1024 * 1024,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._scenario = scenario if scenario is not None else Scenario.healthy()
        self.clock = clock
        self.host = _loopback_host(host)
        self._requested_port = port
        self.max_body_size = max_body_size
        self.ssl_context = ssl_context
        self.log: deque[LogEntry] = deque(maxlen=log_limit)
        self._counters: dict[str | None, _Counters] = {}
        self._totals = _Totals()
        self._errors: list[BaseException] = []
        self._seq = 0
        self._path_cache: dict[bytes, str] = {}
        self._entries: dict[str, Model | None] = {}
        self._model_json: dict[str, bytes] = {}
        self._models_reply: Reply | None = None
        self._not_modified: Reply | None = None
        self._models_etag: bytes | None = None
        self._content_cache: dict[int, bytes] = {}
        self._port: int | None = None
        self._state = "new"  # new -> running -> closed
        self._task_group: anyio.abc.TaskGroup | None = None
        self._stopped: anyio.Event | None = None
        self._closing = False

    # ------------------------------------------------------------------ public API

    @property
    def scenario(self) -> Scenario:
        """The scenario served; assigning a new one takes effect at once."""
        return self._scenario

    @scenario.setter
    def scenario(self, value: Scenario) -> None:
        self._scenario = value
        self._invalidate_catalog()

    @property
    def port(self) -> int:
        """The TCP port listened on (known once started)."""
        if self._port is None:
            raise RuntimeError("FakeUpstream is not listening yet: use serve(), run() or a thread")
        return self._port

    @property
    def origin(self) -> str:
        """``http://127.0.0.1:PORT`` (no path; ``https://`` with ``ssl_context``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "http" if self.ssl_context is None else "https"
        return f"{scheme}://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The OpenRouter-style base URL, ``http://127.0.0.1:PORT/api/v1``."""
        return self.origin + "/api/v1"

    def set_behaviour(self, secret: str, behaviour: Behaviour, *, alias: str | None = None) -> None:
        """Give ``secret`` a new behaviour (adding the key if it is new)."""
        self._scenario.add(secret, behaviour, alias=alias)

    def behaviour(self, secret: str) -> Behaviour | None:
        """The behaviour of ``secret`` (``None`` if the scenario does not list it)."""
        return self._scenario.keys.get(secret)

    def stats(self, key: str | None) -> KeyStats:
        """Counters of one key, by secret or alias (``None``: requests without
        credentials). A key never seen has all counters at zero."""
        c = self._counters.get(key)
        if c is None and key is not None:
            try:
                c = self._counters.get(self._scenario.secret_for(key))
            except KeyError:
                c = None
        alias = self._scenario.alias(key) if key is not None else None
        if c is None:
            return KeyStats(key=alias)
        return KeyStats(
            key=alias,
            requests=c.requests,
            by_endpoint=dict(c.by_endpoint),
            by_status=dict(c.by_status),
            probes=c.probes,
            in_flight=c.in_flight,
            max_in_flight=c.max_in_flight,
            bytes_in=c.bytes_in,
            bytes_out=c.bytes_out,
            cost=c.cost,
            disconnects=c.disconnects,
        )

    def totals(self) -> ServerStats:
        """Server-wide counters."""
        t = self._totals
        return ServerStats(
            requests=t.requests,
            by_status=dict(t.by_status),
            connections=t.connections,
            open_connections=t.open_connections,
            in_flight=t.in_flight,
            malformed=t.malformed,
            disconnects=t.disconnects,
            errors=t.errors,
        )

    @property
    def errors(self) -> list[BaseException]:
        """Exceptions raised by bugs in the fake itself (expected: empty)."""
        return list(self._errors)

    def keys_seen(self, path: str | None = "/chat/completions") -> list[str | None]:
        """The keys of the log's requests to ``path`` in order (``None``: all paths)."""
        entries = list(self.log)  # one atomic copy: the server thread may be appending
        return [e.key for e in entries if path is None or e.path == path]

    def reset_stats(self) -> None:
        """Forget counters (in-flight counts are kept) and the log."""
        self.log.clear()
        for c in self._counters.values():
            c.reset()
        t = self._totals
        t.requests = t.malformed = t.disconnects = t.connections = 0
        t.by_status = {}

    # ------------------------------------------------------------------ lifecycle

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[FakeUpstream] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve until cancelled or ``aclose()``d; for ``tg.start``."""
        if self._state != "new":
            raise RuntimeError("a FakeUpstream serves once; build a new one to serve again")
        self._state = "running"
        self._stopped = anyio.Event()
        try:
            multi = await anyio.create_tcp_listener(
                local_host=self.host, local_port=self._requested_port
            )
            async with multi, anyio.create_task_group() as tg:
                self._port = multi.extra(SocketAttribute.local_port)
                self._task_group = tg
                if self._closing:
                    tg.cancel_scope.cancel()
                for listener in multi.listeners:
                    tg.start_soon(self._accept_loop, cast(SocketListener, listener), tg)
                task_status.started(self)
        finally:
            self._state = "closed"
            self._task_group = None
            self._stopped.set()

    async def aclose(self) -> None:
        """Stop serving and close every connection; idempotent."""
        self._closing = True
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()
        if self._state == "running" and self._stopped is not None:
            await self._stopped.wait()

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[FakeUpstream]:
        """``async with server.serve():`` listen (port known on entry), stop on exit."""
        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            await tg.start(self.run)
            try:
                yield self
            except Exception as exc:  # re-raised below, not wrapped in an ExceptionGroup
                error = exc
            finally:
                await self.aclose()
        if error is not None:
            raise error

    @classmethod
    @contextmanager
    def running_in_thread(
        cls,
        scenario: Scenario | None = None,
        *,
        backend: str = "asyncio",
        **kwargs: Any,
    ) -> Iterator[FakeUpstream]:
        """Serve from a background thread with its own event loop (``backend``:
        ``"asyncio"`` or ``"trio"``); yields once listening, stops on exit.
        ``kwargs`` go to ``FakeUpstream``."""
        server = cls(scenario, **kwargs)
        with (
            anyio.from_thread.start_blocking_portal(backend) as portal,
            portal.wrap_async_context_manager(server.serve()),
        ):
            yield server

    # ------------------------------------------------------------------ connections

    async def _accept_loop(self, listener: SocketListener, tg: anyio.abc.TaskGroup) -> None:
        while True:
            try:
                stream = await listener.accept()
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                return
            except OSError:  # e.g. too many open files: back off, keep serving
                await anyio.sleep(0.01)
                continue
            tg.start_soon(self._handle_connection, stream)

    async def _handle_connection(self, stream: anyio.abc.ByteStream) -> None:
        totals = self._totals
        totals.connections += 1
        totals.open_connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            if self.ssl_context is not None:
                context = self.ssl_context
                stream = await TLSStream.wrap(
                    stream, server_side=True, ssl_context=context, standard_compatible=False
                )
            while True:
                try:
                    event = await self._next_event(conn, stream)
                    if type(event) is not h11.Request:
                        return  # ConnectionClosed
                    if conn.they_are_waiting_for_100_continue:
                        await stream.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                    body = await self._read_body(conn, stream)
                except h11.RemoteProtocolError as exc:
                    totals.malformed += 1
                    await self._send_protocol_error(stream, exc.error_status_hint)
                    return
                try:
                    keep_alive = await self._serve_request(stream, event, body)
                except _DISCONNECTED:
                    raise
                except Exception as exc:  # a bug in the fake: 500, record it, close
                    totals.errors += 1
                    self._errors.append(exc)
                    with suppress(*_DISCONNECTED):
                        await stream.send(_SERVER_ERROR.head + _CLOSE_END + _SERVER_ERROR.payload)
                    return
                if not keep_alive:
                    return
                data, closed = conn.trailing_data
                conn = h11.Connection(h11.SERVER)
                if data:
                    conn.receive_data(data)
                if closed:
                    conn.receive_data(b"")
        except _DISCONNECTED:
            totals.disconnects += 1
        except Exception as exc:  # a bug in the fake: record it, drop the connection
            totals.errors += 1
            self._errors.append(exc)
        finally:
            totals.open_connections -= 1
            with anyio.CancelScope(shield=True), suppress(*_DISCONNECTED):
                await stream.aclose()

    async def _next_event(self, conn: h11.Connection, stream: anyio.abc.ByteStream) -> Any:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive(65536)
                except anyio.EndOfStream:
                    data = b""
                conn.receive_data(data)
                continue
            return event

    async def _read_body(self, conn: h11.Connection, stream: anyio.abc.ByteStream) -> bytes | None:
        """The request body; ``None`` if larger than ``max_body_size``."""
        parts: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event(conn, stream)
            kind = type(event)
            if kind is h11.Data:
                parts.append(event.data)
                size += len(event.data)
                if size > self.max_body_size:
                    return None
            elif kind is h11.EndOfMessage:
                if len(parts) == 1:
                    return parts[0]
                return b"".join(parts)
            else:  # pragma: no cover - h11 yields only Data/EndOfMessage here
                raise h11.RemoteProtocolError(f"unexpected {event!r} in a request body")

    async def _send_protocol_error(self, stream: anyio.abc.ByteStream, status: int) -> None:
        reply = _MALFORMED.get(status) or _reply(status, "Malformed HTTP request", close=True)
        totals = self._totals
        totals.requests += 1
        totals.by_status[status] = totals.by_status.get(status, 0) + 1
        await stream.send(reply.head + _CLOSE_END + reply.payload)

    # ------------------------------------------------------------------ requests

    def _normalize(self, target: bytes) -> str:
        path = self._path_cache.get(target)
        if path is not None:
            return path
        raw = target.split(b"?", 1)[0].decode("latin-1")
        path = raw.rstrip("/") or "/"
        for prefix in _PREFIXES:
            if path == prefix:
                path = "/"
                break
            if path.startswith(prefix + "/"):
                path = path[len(prefix) :]
                break
        if path == "/auth/key":
            path = "/key"
        if path not in _ROUTES:
            path = "/<unknown>"
        if len(self._path_cache) < _MAX_PATH_CACHE:
            self._path_cache[target] = path
        return path

    def _counter(self, secret: str | None) -> _Counters:
        c = self._counters.get(secret)
        if c is None:
            c = self._counters[secret] = _Counters()
        return c

    async def _serve_request(
        self, stream: anyio.abc.ByteStream, request: h11.Request, body: bytes | None
    ) -> bool:
        """Answer one request; returns whether the connection stays open."""
        path = self._normalize(request.target)
        keep = http11 = request.http_version == b"1.1"
        secret: str | None = None
        if_none_match: bytes | None = None
        for raw_name, value in request.headers.raw_items():
            name = raw_name.lower()
            if name == b"if-none-match":
                if_none_match = value
            elif name == b"authorization":
                if value[:7].lower() == b"bearer ":
                    secret = value[7:].strip().decode("latin-1") or None
            elif name == b"connection" and b"close" in value.lower():
                keep = False
        head_only = request.method == b"HEAD"
        scenario = self._scenario
        c = self._counter(secret)
        c.requests += 1
        c.by_endpoint[path] = c.by_endpoint.get(path, 0) + 1
        if body is not None:
            c.bytes_in += len(body)
        totals = self._totals
        totals.requests += 1

        # Decide.
        outcome: Reply | Hang | Drop | None
        call: Call | None = None
        expected = _ROUTES.get(path)
        if body is None:
            outcome = _TOO_LARGE
        elif expected is None:
            outcome = _NOT_FOUND
        elif request.method != expected:
            outcome = _METHOD_NOT_ALLOWED[expected]
        elif path == "/models":
            outcome = self._models(if_none_match)
        elif secret is None:
            outcome = _NO_AUTH
        else:
            behaviour = scenario.keys.get(secret, scenario.unknown)
            if behaviour is None:
                outcome = _UNKNOWN_KEY
            elif path == "/key":
                c.probes += 1
                epoch = scenario.epoch
                call = Call(
                    endpoint=path, now=self.clock() - epoch, epoch=epoch, in_flight=c.in_flight
                )
                outcome = behaviour.probe(call)
                if outcome is None:
                    outcome = self._key_info(secret, behaviour, c)
            else:
                call = self._make_call(path, body, c)
                outcome = _BAD_JSON if call is None else behaviour.decide(call)

        if outcome is None:
            status = 200
        elif isinstance(outcome, Reply):
            status = outcome.status
        elif isinstance(outcome, Hang | Drop):
            status = 0
        else:
            raise TypeError(
                f"a behaviour returned {outcome!r}; decide() and probe() must return "
                "None, a Reply, Hang() or Drop()"
            )
        by_status = c.by_status
        by_status[status] = by_status.get(status, 0) + 1
        by_status = totals.by_status
        by_status[status] = by_status.get(status, 0) + 1
        self.log.append(LogEntry(scenario.alias(secret), path, status))
        if outcome is None and call is not None:
            c.cost += call.cost
            call.commit()

        # Answer.
        in_flight = c.in_flight = c.in_flight + 1
        if in_flight > c.max_in_flight:
            c.max_in_flight = in_flight
        totals.in_flight += 1
        try:
            if isinstance(outcome, Hang):
                await self._wait_for_disconnect(stream)
                return False
            if call is not None and call.latency > 0:
                await anyio.sleep(call.latency)
            if isinstance(outcome, Reply):
                keep = keep and not outcome.closes
                data = outcome.head + (_KEEP_END if keep else _CLOSE_END)
                if not head_only:
                    data += outcome.payload
                    c.bytes_out += len(outcome.payload)
                await stream.send(data)
                return keep
            if outcome is None and call is not None:
                return await self._send_success(stream, call, c, keep, http11)
            return False  # Drop
        except _DISCONNECTED:
            c.disconnects += 1
            raise
        finally:
            c.in_flight -= 1
            totals.in_flight -= 1

    def _make_call(self, path: str, body: bytes, c: _Counters) -> Call | None:
        try:
            data = json.loads(body) if body else {}
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(data, dict):
            return None
        scenario = self._scenario
        model = data.get("model") or scenario.default_model
        if not isinstance(model, str):
            return None
        if path == "/embeddings":
            stream = False
            completion = 0
        else:
            stream = data.get("stream") is True
            max_tokens = data.get("max_tokens", data.get("max_completion_tokens"))
            if max_tokens is None:
                completion = scenario.default_completion_tokens
            elif type(max_tokens) is int and max_tokens >= 0:
                completion = min(max_tokens, _MAX_CHUNKS)
            else:
                return None
        prompt = _prompt_tokens(path, data)
        entry = self._entry(model)
        cached = reasoning = images = 0
        if entry is None:
            if model.endswith(":free"):
                cost = 0.0
            else:
                prices = scenario.prompt_price, scenario.completion_price
                cost = round(prompt * prices[0] + completion * prices[1], 12)
        else:
            messages = data.get("messages")
            if isinstance(messages, list):
                cached, images = _cache_and_images(messages, prompt, entry)
            if "reasoning" in data and "reasoning" in entry.supported_parameters:
                reasoning = completion // 2
            cost = entry.cost(prompt, completion, cached=cached, reasoning=reasoning, images=images)
        call = Call(
            endpoint=path,
            model=model,
            stream=stream,
            body=data,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost=cost,
            now=self.clock() - scenario.epoch,
            epoch=scenario.epoch,
            in_flight=c.in_flight,
        )
        call.cached_tokens = cached
        call.reasoning_tokens = reasoning
        return call

    # ------------------------------------------------------------------ catalog

    def _invalidate_catalog(self) -> None:
        self._entries.clear()
        self._model_json.clear()
        self._models_reply = self._not_modified = None

    def _entry(self, model: str) -> Model | None:
        """The catalog's entry for ``model`` (None: not in the catalog)."""
        if model in self._entries:
            return self._entries[model]
        entry = next((m for m in self._scenario.models if m.id == model), None)
        if len(self._entries) < _MAX_PATH_CACHE:
            self._entries[model] = entry
        return entry

    def _models(self, if_none_match: bytes | None) -> Reply | Hang | Drop:
        """``GET /models``: the catalog with an ``ETag`` (304 when the caller
        already has it), or the scenario's ``models_reply``."""
        scenario = self._scenario
        if scenario.models_reply is not None:
            return scenario.models_reply
        reply = self._models_reply
        if reply is None:
            data = {"data": [m.to_json() for m in scenario.models]}
            payload = json.dumps(data, separators=(",", ":")).encode()
            etag = f'"{hashlib.sha256(payload).hexdigest()[:20]}"'
            tag = (("etag", etag),) if scenario.catalog_etag else ()
            reply = self._models_reply = Reply(200, body=payload, headers=tag)
            self._not_modified = Reply(304, body=b"", headers=tag)
            self._models_etag = etag.encode() if scenario.catalog_etag else None
        not_modified = self._not_modified
        if if_none_match is not None and if_none_match == self._models_etag and not_modified:
            return not_modified
        return reply

    def _key_info(self, secret: str, behaviour: Behaviour, c: _Counters) -> Reply:
        alias = self._scenario.aliases.get(secret)
        data = key_data(alias if alias is not None else "fake-key", c.cost)
        behaviour.describe(data)
        return Reply(200, body={"data": data})

    # ------------------------------------------------------------------ success bodies

    def _model_bytes(self, model: str) -> bytes:
        encoded = self._model_json.get(model)
        if encoded is None:
            encoded = json.dumps(model).encode()
            if len(self._model_json) < _MAX_PATH_CACHE:
                self._model_json[model] = encoded
        return encoded

    def _content(self, n: int) -> bytes:
        encoded = self._content_cache.get(n)
        if encoded is None:
            text = "".join(_WORDS[i % len(_WORDS)] for i in range(n))
            encoded = self._content_cache[n] = json.dumps(text).encode()
        return encoded

    def _usage(self, call: Call) -> bytes:
        p, n = call.prompt_tokens, call.completion_tokens
        cost = repr(call.cost).encode()
        usage = _USAGE % (p, n, p + n, cost, call.cached_tokens, call.reasoning_tokens)
        if not self._scenario.report_cost:
            usage = usage.replace(b'"cost":%s,' % cost, b"", 1)
        return usage

    @staticmethod
    def _error_json(err: MidStreamError) -> bytes:
        return json.dumps(
            {
                "code": err.code,
                "message": err.message,
                "metadata": {"error_type": err.error_type},
            },
            separators=(",", ":"),
        ).encode()

    async def _send_success(
        self, stream: anyio.abc.ByteStream, call: Call, c: _Counters, keep: bool, http11: bool
    ) -> bool:
        self._seq += 1
        created = int(call.now)
        gen_id = b"gen-%d-%08d" % (created, self._seq)
        if call.stream and call.endpoint != "/embeddings":
            return await self._send_stream(stream, call, c, gen_id, created, keep, http11)
        model = self._model_bytes(call.model)
        provider = self._model_bytes(self._scenario.provider_name)
        err = call.stream_error
        chat = call.endpoint == "/chat/completions"
        if call.endpoint == "/embeddings":
            payload = self._embeddings_body(call, gen_id, model, provider)
        elif err is not None:
            shown = min(err.after_chunks, call.completion_tokens)
            payload = (_CHAT_ERROR_BODY if chat else _TEXT_ERROR_BODY) % (
                gen_id,
                provider,
                model,
                created,
                self._content(shown),
                self._error_json(err),
            )
        else:
            payload = (_CHAT_BODY if chat else _TEXT_BODY) % (
                gen_id,
                provider,
                model,
                created,
                self._content(call.completion_tokens),
                self._usage(call),
            )
        head = _JSON_HEAD % (len(payload), gen_id)
        if call.cut_after is not None:  # half a body, then hang up
            half = payload[: len(payload) // 2]
            await stream.send(head + _CLOSE_END + half)
            c.bytes_out += len(half)
            return False
        await stream.send(head + (_KEEP_END if keep else _CLOSE_END) + payload)
        c.bytes_out += len(payload)
        return keep

    def _embeddings_body(self, call: Call, gen_id: bytes, model: bytes, provider: bytes) -> bytes:
        raw = call.body.get("input")
        inputs = raw if isinstance(raw, list) else [raw]
        data = [
            {"object": "embedding", "index": i, "embedding": _embedding(str(text))}
            for i, text in enumerate(inputs)
        ]
        p = call.prompt_tokens
        usage = {"prompt_tokens": p, "total_tokens": p, "cost": call.cost}
        return b'{"id":"%s","object":"list","provider":%s,"model":%s,"data":%s,"usage":%s}' % (
            gen_id,
            provider,
            model,
            json.dumps(data, separators=(",", ":")).encode(),
            json.dumps(usage, separators=(",", ":")).encode(),
        )

    def _stream_events(self, call: Call, gen_id: bytes, created: int) -> tuple[list[bytes], int]:
        """The SSE events, and how many to send before hanging up (cut)."""
        scenario = self._scenario
        model = self._model_bytes(call.model)
        provider = self._model_bytes(scenario.provider_name)
        chat = call.endpoint == "/chat/completions"
        template = _CHAT_CHUNK if chat else _TEXT_CHUNK
        every = scenario.comment_every
        err = call.stream_error
        n = call.completion_tokens if err is None else min(err.after_chunks, call.completion_tokens)
        # OpenRouter's streams end with a usage chunk; OpenAI's (report_cost False)
        # only when the request asks (stream_options.include_usage), the chunks
        # before it then carrying "usage":null.
        openai = not scenario.report_cost
        asked = openai and _asks_usage(call.body)
        extra = _USAGE_NULL if asked else b""
        events: list[bytes] = []
        if every > 0:
            events.append(_COMMENT)
        cut = -1
        for i in range(n):
            if i == call.cut_after:
                cut = len(events)
            word = _WORD_JSON[i % len(_WORD_JSON)]
            events.append(
                template % (gen_id, provider, model, created, word, b"null", b"null", extra)
            )
            if every > 0 and (i + 1) % every == 0 and i + 1 < n:
                events.append(_COMMENT)
        if call.cut_after is not None and cut < 0:
            cut = len(events)
        if err is not None:
            error = b',"error":' + self._error_json(err)
            events.append(
                b'data: {"id":"%s","provider":%s,"model":%s,"object":"%s","created":%d%s,'
                b'"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error",'
                b'"native_finish_reason":"error"}]}\n\n'
                % (
                    gen_id,
                    provider,
                    model,
                    b"chat.completion.chunk" if chat else b"text_completion",
                    created,
                    error,
                )
            )
            if err.send_done:
                events.append(_DONE)
        else:
            empty = b'""'
            events.append(
                template % (gen_id, provider, model, created, empty, b'"stop"', b'"stop"', extra)
            )
            if asked:
                kind = b"chat.completion.chunk" if chat else b"text_completion"
                usage = self._usage(call)
                events.append(_USAGE_CHUNK % (gen_id, provider, model, kind, created, usage))
            elif not openai:
                usage = b',"usage":' + self._usage(call)
                events.append(
                    template % (gen_id, provider, model, created, empty, b"null", b"null", usage)
                )
            events.append(_DONE)
        return events, cut

    async def _send_stream(
        self,
        stream: anyio.abc.ByteStream,
        call: Call,
        c: _Counters,
        gen_id: bytes,
        created: int,
        keep: bool,
        chunked: bool,
    ) -> bool:
        events, cut = self._stream_events(call, gen_id, created)
        if cut >= 0:  # a truncated stream: no last chunk, then hang up
            events = events[:cut]
            keep = False
        # HTTP/1.1: chunked; HTTP/1.0: the end of the body is the end of the connection.
        keep = keep and chunked
        head = _SSE_HEAD % gen_id
        if chunked:
            head += b"transfer-encoding: chunked\r\n"
        head += _KEEP_END if keep else _CLOSE_END
        delay = call.chunk_delay
        if delay <= 0:
            payload = b"".join(events)
            data = head + (_chunk(payload) if chunked else payload)
            if chunked and cut < 0:
                data += _LAST_CHUNK
            await stream.send(data)
            c.bytes_out += len(payload)
        else:
            await stream.send(head)
            for i, event in enumerate(events):
                if i:
                    await anyio.sleep(delay)
                await stream.send(_chunk(event) if chunked else event)
                c.bytes_out += len(event)
            if chunked and cut < 0:
                await stream.send(_LAST_CHUNK)
        return keep

    @staticmethod
    async def _wait_for_disconnect(stream: anyio.abc.ByteStream) -> None:
        try:
            while True:
                await stream.receive(65536)
        except _DISCONNECTED:
            return
