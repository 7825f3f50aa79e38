"""Which HTTP client should keyrotor's transports use? Measured side by side.

    .venv/bin/python -m benchmarks.http_clients --requests 2000

Starts the fake OpenRouter upstream (``python -m keyrotor.testing.fake_upstream
--scenario open``) as a separate process on 127.0.0.1, so that client and server
share neither an event loop nor a GIL, then measures sequential keep-alive
``POST /chat/completions`` calls, non-streaming and streaming (``"stream": true``,
the SSE body read to its end), with:

- ``httpx.AsyncClient`` and ``httpcore.AsyncConnectionPool`` on trio and asyncio;
- a bare, hand-written h11 client over an anyio TCP stream on trio and asyncio
  (the floor), and over a native trio stream;
- keyrotor's own pool (``keyrotor.transports._h11pool``: h11 over anyio) on trio
  and asyncio;
- ``httpx.Client``, ``httpcore.ConnectionPool`` and a bare h11 client over a
  blocking socket (the sync floor).

Every (client, backend, mode) runs ``--rounds`` times, interleaved (A B C ... A B
C ...), each time on a fresh client: ``--warmup`` requests, then ``--requests``
timed ones. The tables show the median over the rounds of each round's median and
p99, requests/s, and client-side CPU per request (``time.process_time``; the
upstream runs in another process). Every client sets timeouts (10 s) as a
transport would: httpx and httpcore per operation, the bare h11 clients one
deadline per request (a socket timeout for the sync one).

Then ``--checks`` (on by default) exercises what the transports depend on,
against an in-process fake upstream with slow keys: incremental streaming,
cancelling a stream mid-body (the connection must be closed, not reused), read
and pool timeouts, and cancelling requests while the pool is contended.

Only 127.0.0.1 is ever contacted (httpx runs with ``trust_env=False``, so no
proxy variables apply). The upstream process is stopped on exit, on errors and on
Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import importlib.metadata
import json
import math
import os
import platform
import random
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
    contextmanager,
    suppress,
)
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import anyio
import anyio.abc
import anyio.from_thread
import h11
import httpcore
import httpx
import trio
from anyio.abc import SocketAttribute

from keyrotor.testing import FakeUpstream, Scenario, Slow, SlowStream
from keyrotor.transports._h11pool import ConnectionPool as H11Pool
from keyrotor.transports._h11pool import PoolOptions as H11PoolOptions

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
SECRET = "sk-or-v1-fake-bench"  # the "open" scenario accepts any bearer secret
MODEL = "openai/gpt-4o-mini"
DONE = b"data: [DONE]\n\n"
TIMEOUT = 10.0
MICRO = "\u00b5"
TIMES = "\u00d7"

Backend = Literal["trio", "asyncio", "sync"]
Mode = Literal["post", "stream"]
MODES: tuple[Mode, ...] = ("post", "stream")
MODE_TITLES: dict[Mode, str] = {
    "post": "Sequential keep-alive POST /chat/completions, non-streaming (JSON body read)",
    "stream": 'Sequential keep-alive POST /chat/completions, "stream": true (SSE read to [DONE])',
}

Headers = list[tuple[bytes, bytes]]


class BenchError(RuntimeError):
    """An answer the benchmark did not expect (status, truncated stream, bad URL)."""


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Target:
    """The chat completions endpoint of a loopback upstream."""

    host: str
    port: int
    prefix: str

    @classmethod
    def parse(cls, base_url: str) -> Target:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname != LOOPBACK or parts.port is None:
            raise BenchError(
                f"refusing an upstream that is not http://{LOOPBACK}:PORT: {base_url!r}"
            )
        return cls(parts.hostname, parts.port, parts.path.rstrip("/"))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.prefix}/chat/completions"

    @property
    def path(self) -> bytes:
        return f"{self.prefix}/chat/completions".encode()

    @property
    def authority(self) -> bytes:
        return f"{self.host}:{self.port}".encode()


@dataclass(frozen=True)
class Settings:
    """How a client is built: endpoint, body size, timeouts and pool size."""

    target: Target
    max_tokens: int = 8
    read_timeout: float = TIMEOUT
    pool_timeout: float = TIMEOUT
    max_connections: int = 10


def chat_body(*, stream: bool, max_tokens: int) -> bytes:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def auth_headers(secret: str) -> Headers:
    return [
        (b"authorization", b"Bearer " + secret.encode()),
        (b"content-type", b"application/json"),
    ]


def check_status(status: int) -> None:
    if status != 200:
        raise BenchError(f"the upstream answered {status}, expected 200")


def check_done(tail: bytes) -> None:
    if not tail.endswith(DONE):
        raise BenchError(f"the stream did not end with 'data: [DONE]' (tail {tail!r})")


_TAIL = len(DONE)


def _client_port(extensions: Mapping[str, Any]) -> int:
    """The local port of the connection that carries an httpx/httpcore response."""
    port: int = extensions["network_stream"].get_extra_info("client_addr")[1]
    return port


# --------------------------------------------------------------------------- async clients


@dataclass
class AsyncResponse:
    status: int
    local_port: int
    chunks: AsyncIterator[bytes]


@dataclass
class SyncResponse:
    status: int
    local_port: int
    chunks: Iterator[bytes]


class AsyncBench(Protocol):
    post_body: bytes

    async def post(self) -> None:
        """One non-streaming request, body read (the timed operation)."""

    async def stream(self) -> None:
        """One streaming request, read to ``data: [DONE]`` (the timed operation)."""

    def open_stream(self, secret: str, body: bytes) -> AbstractAsyncContextManager[AsyncResponse]:
        """Send a request; the body is read incrementally from ``chunks``."""
        ...

    def connections(self) -> list[Any] | None:
        """The pool's connections (``None``: the client has no pool)."""

    async def aclose(self) -> None: ...


class SyncBench(Protocol):
    post_body: bytes

    def post(self) -> None: ...

    def stream(self) -> None: ...

    def open_stream(self, secret: str, body: bytes) -> AbstractContextManager[SyncResponse]: ...

    def connections(self) -> list[Any] | None: ...

    def close(self) -> None: ...


class _Bodies:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.post_body = chat_body(stream=False, max_tokens=settings.max_tokens)
        self.stream_body = chat_body(stream=True, max_tokens=settings.max_tokens)


def _httpx_options(s: Settings) -> dict[str, Any]:
    return {
        "trust_env": False,  # never a proxy from the environment: loopback only
        "timeout": httpx.Timeout(TIMEOUT, read=s.read_timeout, pool=s.pool_timeout),
        "limits": httpx.Limits(
            max_connections=s.max_connections, max_keepalive_connections=s.max_connections
        ),
    }


def _httpx_headers(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}", "content-type": "application/json"}


def _httpcore_extensions(s: Settings) -> dict[str, Any]:
    return {
        "timeout": {
            "connect": TIMEOUT,
            "read": s.read_timeout,
            "write": TIMEOUT,
            "pool": s.pool_timeout,
        }
    }


class HttpxAsync(_Bodies):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.client = httpx.AsyncClient(**_httpx_options(settings))
        self.url = httpx.URL(settings.target.url)
        self.headers = _httpx_headers(SECRET)

    async def post(self) -> None:
        response = await self.client.post(self.url, content=self.post_body, headers=self.headers)
        check_status(response.status_code)

    async def stream(self) -> None:
        tail = b""
        async with self.client.stream(
            "POST", self.url, content=self.stream_body, headers=self.headers
        ) as response:
            check_status(response.status_code)
            async for chunk in response.aiter_raw():
                tail = (tail + chunk)[-_TAIL:]
        check_done(tail)

    @asynccontextmanager
    async def open_stream(self, secret: str, body: bytes) -> AsyncIterator[AsyncResponse]:
        async with self.client.stream(
            "POST", self.url, content=body, headers=_httpx_headers(secret)
        ) as response:
            yield AsyncResponse(
                response.status_code, _client_port(response.extensions), response.aiter_raw()
            )

    def connections(self) -> list[Any] | None:
        return list(self.client._transport._pool.connections)  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        await self.client.aclose()


class HttpcoreAsync(_Bodies):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.pool = httpcore.AsyncConnectionPool(
            max_connections=settings.max_connections,
            max_keepalive_connections=settings.max_connections,
        )
        self.url = httpcore.URL(settings.target.url)
        self.headers = auth_headers(SECRET)
        self.extensions = _httpcore_extensions(settings)

    async def post(self) -> None:
        response = await self.pool.request(
            b"POST",
            self.url,
            headers=self.headers,
            content=self.post_body,
            extensions=self.extensions,
        )
        check_status(response.status)

    async def stream(self) -> None:
        tail = b""
        async with self.pool.stream(
            b"POST",
            self.url,
            headers=self.headers,
            content=self.stream_body,
            extensions=self.extensions,
        ) as response:
            check_status(response.status)
            async for chunk in response.aiter_stream():
                tail = (tail + chunk)[-_TAIL:]
        check_done(tail)

    @asynccontextmanager
    async def open_stream(self, secret: str, body: bytes) -> AsyncIterator[AsyncResponse]:
        async with self.pool.stream(
            b"POST",
            self.url,
            headers=auth_headers(secret),
            content=body,
            extensions=self.extensions,
        ) as response:
            yield AsyncResponse(
                response.status, _client_port(response.extensions), response.aiter_stream()
            )

    def connections(self) -> list[Any] | None:
        return list(self.pool.connections)

    async def aclose(self) -> None:
        await self.pool.aclose()


def _encode_request(conn: h11.Connection, path: bytes, headers: Headers, body: bytes) -> bytes:
    head = conn.send(h11.Request(method=b"POST", target=path, headers=headers)) or b""
    data = conn.send(h11.Data(data=body)) or b""
    end = conn.send(h11.EndOfMessage()) or b""
    return head + data + end


def _framed(headers: Headers, authority: bytes, body: bytes) -> Headers:
    return [(b"host", authority), *headers, (b"content-length", b"%d" % len(body))]


class _H11Async(_Bodies):
    """A minimal HTTP/1.1 client on h11: one keep-alive connection, one request at a
    time; Content-Length and chunked response bodies (h11 decodes both). A response
    not read to its end (error, cancellation) closes the connection; the next
    request opens a new one. The I/O primitives come from the subclasses."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        target = settings.target
        self.path = target.path
        self.authority = target.authority
        self.post_headers = _framed(auth_headers(SECRET), self.authority, self.post_body)
        self.stream_headers = _framed(auth_headers(SECRET), self.authority, self.stream_body)
        self.conn = h11.Connection(h11.CLIENT)
        self.connected = False
        self.complete = False
        self.last_body = b""

    # I/O of one stream type ----------------------------------------------------
    async def _connect(self) -> None:
        raise NotImplementedError

    async def _receive(self) -> bytes:
        raise NotImplementedError

    async def _send(self, data: bytes) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        """Close the stream, shielded from cancellation."""
        raise NotImplementedError

    def _deadline(self, seconds: float) -> AbstractContextManager[object]:
        raise NotImplementedError

    def _local_port(self) -> int:
        raise NotImplementedError

    # protocol ------------------------------------------------------------------
    async def _event(self) -> Any:
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await self._receive())
                continue
            return event

    async def _begin(self, headers: Headers, body: bytes) -> int:
        if not self.connected:
            await self._connect()
            self.connected = True
            self.conn = h11.Connection(h11.CLIENT)
        self.complete = False
        await self._send(_encode_request(self.conn, self.path, headers, body))
        while True:
            event = await self._event()
            kind = type(event)
            if kind is h11.Response:
                status: int = event.status_code
                return status
            if kind is not h11.InformationalResponse:
                raise BenchError(f"unexpected {event!r} before the response")

    def _next_cycle(self) -> bool:
        conn = self.conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            return True
        return False

    async def _abort(self) -> None:
        if self.connected:
            self.connected = False
            await self._close()

    # the benchmark's operations ------------------------------------------------
    async def post(self) -> None:
        parts: list[bytes] = []
        try:
            with self._deadline(self.settings.read_timeout):
                check_status(await self._begin(self.post_headers, self.post_body))
                while True:
                    event = await self._event()
                    kind = type(event)
                    if kind is h11.Data:
                        parts.append(event.data)
                    elif kind is h11.EndOfMessage:
                        break
                    else:
                        raise BenchError(f"unexpected {event!r} in a body")
        except BaseException:
            await self._abort()
            raise
        self.last_body = b"".join(parts)
        if not self._next_cycle():
            await self._abort()

    async def stream(self) -> None:
        tail = b""
        try:
            with self._deadline(self.settings.read_timeout):
                check_status(await self._begin(self.stream_headers, self.stream_body))
                while True:
                    event = await self._event()
                    kind = type(event)
                    if kind is h11.Data:
                        tail = (tail + event.data)[-_TAIL:]
                    elif kind is h11.EndOfMessage:
                        break
                    else:
                        raise BenchError(f"unexpected {event!r} in a body")
        except BaseException:
            await self._abort()
            raise
        check_done(tail)
        if not self._next_cycle():
            await self._abort()

    async def _chunks(self) -> AsyncGenerator[bytes, None]:
        while True:
            with self._deadline(self.settings.read_timeout):
                event = await self._event()
            kind = type(event)
            if kind is h11.Data:
                yield event.data
            elif kind is h11.EndOfMessage:
                self.complete = True
                return
            else:
                raise BenchError(f"unexpected {event!r} in a body")

    @asynccontextmanager
    async def open_stream(self, secret: str, body: bytes) -> AsyncIterator[AsyncResponse]:
        headers = _framed(auth_headers(secret), self.authority, body)
        try:
            with self._deadline(self.settings.read_timeout):
                status = await self._begin(headers, body)
            chunks = self._chunks()
            try:
                yield AsyncResponse(status, self._local_port(), chunks)
            finally:
                await chunks.aclose()
        except BaseException:
            await self._abort()
            raise
        if not (self.complete and self._next_cycle()):
            await self._abort()  # body not read to its end: the connection cannot be reused

    def connections(self) -> list[Any] | None:
        return None

    async def aclose(self) -> None:
        await self._abort()


class H11Anyio(_H11Async):
    """The bare h11 client over ``anyio.connect_tcp`` (runs on trio and asyncio)."""

    sock: anyio.abc.SocketStream

    async def _connect(self) -> None:
        self.sock = await anyio.connect_tcp(self.settings.target.host, self.settings.target.port)

    async def _receive(self) -> bytes:
        try:
            return await self.sock.receive(65536)
        except anyio.EndOfStream:
            return b""

    async def _send(self, data: bytes) -> None:
        await self.sock.send(data)

    async def _close(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.sock.aclose()

    def _deadline(self, seconds: float) -> AbstractContextManager[object]:
        return anyio.fail_after(seconds)

    def _local_port(self) -> int:
        return int(self.sock.extra(SocketAttribute.local_address)[1])


class H11Trio(_H11Async):
    """The bare h11 client over ``trio.open_tcp_stream`` (trio only)."""

    sock: trio.SocketStream

    async def _connect(self) -> None:
        self.sock = await trio.open_tcp_stream(self.settings.target.host, self.settings.target.port)

    async def _receive(self) -> bytes:
        return await self.sock.receive_some(65536)

    async def _send(self, data: bytes) -> None:
        await self.sock.send_all(data)

    async def _close(self) -> None:
        with trio.CancelScope(shield=True):
            await self.sock.aclose()

    def _deadline(self, seconds: float) -> AbstractContextManager[object]:
        return trio.fail_after(seconds)

    def _local_port(self) -> int:
        port: int = self.sock.socket.getsockname()[1]
        return port


@dataclass(frozen=True)
class _PoolSlot:
    """A connection of ``H11PoolAsync`` as ``_busy`` sees it (from ``stats()``)."""

    state: str

    def is_idle(self) -> bool:
        return self.state == "idle"

    def is_closed(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"<{self.state}>"


class H11PoolAsync(_Bodies):
    """keyrotor's pool (``keyrotor.transports._h11pool``): h11 over anyio streams."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.pool = H11Pool(
            H11PoolOptions(
                connect=TIMEOUT,
                write=TIMEOUT,
                pool=settings.pool_timeout,
                max_connections=settings.max_connections,
            )
        )
        self.url = settings.target.url
        self.headers = auth_headers(SECRET)
        self.read_timeout = settings.read_timeout

    async def post(self) -> None:
        response = await self.pool.request(
            b"POST", self.url, self.headers, self.post_body, read_timeout=self.read_timeout
        )
        try:
            check_status(response.status)
            await response.aread()
        finally:
            await response.aclose()

    async def stream(self) -> None:
        tail = b""
        response = await self.pool.request(
            b"POST", self.url, self.headers, self.stream_body, read_timeout=self.read_timeout
        )
        try:
            check_status(response.status)
            async for chunk in response.aiter_bytes():
                tail = (tail + chunk)[-_TAIL:]
        finally:
            await response.aclose()
        check_done(tail)

    @asynccontextmanager
    async def open_stream(self, secret: str, body: bytes) -> AsyncIterator[AsyncResponse]:
        response = await self.pool.request(
            b"POST", self.url, auth_headers(secret), body, read_timeout=self.read_timeout
        )
        try:
            conn = response._conn  # private: the benchmark's connection-reuse check
            # The raw socket: the pool's own streams under trio give no other attribute.
            sock = None if conn is None else conn.stream.extra(SocketAttribute.raw_socket)
            port = -1 if sock is None else int(sock.getsockname()[1])
            yield AsyncResponse(response.status, port, response.aiter_bytes())
        finally:
            await response.aclose()

    def connections(self) -> list[Any] | None:
        stats = self.pool.stats()
        busy = stats["busy"] + stats["connecting"]
        return [_PoolSlot("idle")] * stats["idle"] + [_PoolSlot("busy")] * busy

    async def aclose(self) -> None:
        await self.pool.aclose()


# --------------------------------------------------------------------------- sync clients


class HttpxSync(_Bodies):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.client = httpx.Client(**_httpx_options(settings))
        self.url = httpx.URL(settings.target.url)
        self.headers = _httpx_headers(SECRET)

    def post(self) -> None:
        response = self.client.post(self.url, content=self.post_body, headers=self.headers)
        check_status(response.status_code)

    def stream(self) -> None:
        tail = b""
        with self.client.stream(
            "POST", self.url, content=self.stream_body, headers=self.headers
        ) as response:
            check_status(response.status_code)
            for chunk in response.iter_raw():
                tail = (tail + chunk)[-_TAIL:]
        check_done(tail)

    @contextmanager
    def open_stream(self, secret: str, body: bytes) -> Iterator[SyncResponse]:
        with self.client.stream(
            "POST", self.url, content=body, headers=_httpx_headers(secret)
        ) as response:
            yield SyncResponse(
                response.status_code, _client_port(response.extensions), response.iter_raw()
            )

    def connections(self) -> list[Any] | None:
        return list(self.client._transport._pool.connections)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.client.close()


class HttpcoreSync(_Bodies):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.pool = httpcore.ConnectionPool(
            max_connections=settings.max_connections,
            max_keepalive_connections=settings.max_connections,
        )
        self.url = httpcore.URL(settings.target.url)
        self.headers = auth_headers(SECRET)
        self.extensions = _httpcore_extensions(settings)

    def post(self) -> None:
        response = self.pool.request(
            b"POST",
            self.url,
            headers=self.headers,
            content=self.post_body,
            extensions=self.extensions,
        )
        check_status(response.status)

    def stream(self) -> None:
        tail = b""
        with self.pool.stream(
            b"POST",
            self.url,
            headers=self.headers,
            content=self.stream_body,
            extensions=self.extensions,
        ) as response:
            check_status(response.status)
            for chunk in response.iter_stream():
                tail = (tail + chunk)[-_TAIL:]
        check_done(tail)

    @contextmanager
    def open_stream(self, secret: str, body: bytes) -> Iterator[SyncResponse]:
        with self.pool.stream(
            b"POST",
            self.url,
            headers=auth_headers(secret),
            content=body,
            extensions=self.extensions,
        ) as response:
            yield SyncResponse(
                response.status, _client_port(response.extensions), response.iter_stream()
            )

    def connections(self) -> list[Any] | None:
        return list(self.pool.connections)

    def close(self) -> None:
        self.pool.close()


class H11Socket(_Bodies):
    """The bare h11 client over a blocking socket (TCP_NODELAY; the socket timeout
    is the read/write timeout)."""

    sock: socket.socket

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        target = settings.target
        self.path = target.path
        self.authority = target.authority
        self.post_headers = _framed(auth_headers(SECRET), self.authority, self.post_body)
        self.stream_headers = _framed(auth_headers(SECRET), self.authority, self.stream_body)
        self.conn = h11.Connection(h11.CLIENT)
        self.connected = False
        self.complete = False
        self.last_body = b""

    def _event(self) -> Any:
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(self.sock.recv(65536))
                continue
            return event

    def _begin(self, headers: Headers, body: bytes) -> int:
        if not self.connected:
            target = self.settings.target
            sock = socket.create_connection((target.host, target.port), timeout=TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.settings.read_timeout)
            self.sock = sock
            self.connected = True
            self.conn = h11.Connection(h11.CLIENT)
        self.complete = False
        self.sock.sendall(_encode_request(self.conn, self.path, headers, body))
        while True:
            event = self._event()
            kind = type(event)
            if kind is h11.Response:
                status: int = event.status_code
                return status
            if kind is not h11.InformationalResponse:
                raise BenchError(f"unexpected {event!r} before the response")

    def _next_cycle(self) -> bool:
        conn = self.conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            return True
        return False

    def _abort(self) -> None:
        if self.connected:
            self.connected = False
            self.sock.close()

    def post(self) -> None:
        parts: list[bytes] = []
        try:
            check_status(self._begin(self.post_headers, self.post_body))
            while True:
                event = self._event()
                kind = type(event)
                if kind is h11.Data:
                    parts.append(event.data)
                elif kind is h11.EndOfMessage:
                    break
                else:
                    raise BenchError(f"unexpected {event!r} in a body")
        except BaseException:
            self._abort()
            raise
        self.last_body = b"".join(parts)
        if not self._next_cycle():
            self._abort()

    def stream(self) -> None:
        tail = b""
        try:
            check_status(self._begin(self.stream_headers, self.stream_body))
            while True:
                event = self._event()
                kind = type(event)
                if kind is h11.Data:
                    tail = (tail + event.data)[-_TAIL:]
                elif kind is h11.EndOfMessage:
                    break
                else:
                    raise BenchError(f"unexpected {event!r} in a body")
        except BaseException:
            self._abort()
            raise
        check_done(tail)
        if not self._next_cycle():
            self._abort()

    def _chunks(self) -> Generator[bytes, None, None]:
        while True:
            event = self._event()
            kind = type(event)
            if kind is h11.Data:
                yield event.data
            elif kind is h11.EndOfMessage:
                self.complete = True
                return
            else:
                raise BenchError(f"unexpected {event!r} in a body")

    @contextmanager
    def open_stream(self, secret: str, body: bytes) -> Iterator[SyncResponse]:
        headers = _framed(auth_headers(secret), self.authority, body)
        try:
            status = self._begin(headers, body)
            chunks = self._chunks()
            try:
                yield SyncResponse(status, self.sock.getsockname()[1], chunks)
            finally:
                chunks.close()
        except BaseException:
            self._abort()
            raise
        if not (self.complete and self._next_cycle()):
            self._abort()

    def connections(self) -> list[Any] | None:
        return None

    def close(self) -> None:
        self._abort()


class H11PoolPortal(_Bodies):
    """keyrotor's async pool called from a plain thread through an anyio
    ``BlockingPortal`` (asyncio): what the blocking client would cost if it
    ran on the async client's HTTP stack. One hop per request, the fewest a
    whole-body call could take (a streamed body needs one per chunk more).
    Measured only: the checks below are the async pool's own."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._portal_cm = anyio.from_thread.start_blocking_portal("asyncio")
        self.portal = self._portal_cm.__enter__()
        self.inner = self.portal.call(H11PoolAsync, settings)

    def post(self) -> None:
        self.portal.call(self.inner.post)

    def stream(self) -> None:
        self.portal.call(self.inner.stream)

    @contextmanager
    def open_stream(self, secret: str, body: bytes) -> Iterator[SyncResponse]:
        opened = self.portal.wrap_async_context_manager(self.inner.open_stream(secret, body))
        with opened as response:
            chunks = response.chunks

            async def next_chunk() -> bytes | None:
                return await anext(chunks, None)

            def read() -> Iterator[bytes]:
                while (chunk := self.portal.call(next_chunk)) is not None:
                    yield chunk

            yield SyncResponse(response.status, response.local_port, read())

    def connections(self) -> list[Any] | None:
        return self.inner.connections()

    def close(self) -> None:
        self.portal.call(self.inner.aclose)
        self._portal_cm.__exit__(None, None, None)


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    client: str
    backend: Backend
    make_async: Callable[[Settings], AsyncBench] | None = None
    make_sync: Callable[[Settings], SyncBench] | None = None
    floor: bool = False
    pooled: bool = True
    checked: bool = True


CASES: tuple[Case, ...] = (
    Case("httpx.AsyncClient", "trio", make_async=HttpxAsync),
    Case("httpx.AsyncClient", "asyncio", make_async=HttpxAsync),
    Case("httpcore.AsyncConnectionPool", "trio", make_async=HttpcoreAsync),
    Case("httpcore.AsyncConnectionPool", "asyncio", make_async=HttpcoreAsync),
    Case("bare h11 + anyio stream", "trio", make_async=H11Anyio, floor=True, pooled=False),
    Case("bare h11 + anyio stream", "asyncio", make_async=H11Anyio, floor=True, pooled=False),
    Case("bare h11 + trio stream", "trio", make_async=H11Trio, pooled=False),
    Case("keyrotor _h11pool", "trio", make_async=H11PoolAsync),
    Case("keyrotor _h11pool", "asyncio", make_async=H11PoolAsync),
    Case("httpx.Client", "sync", make_sync=HttpxSync),
    Case("httpcore.ConnectionPool", "sync", make_sync=HttpcoreSync),
    Case("bare h11 + socket", "sync", make_sync=H11Socket, floor=True, pooled=False),
    Case("keyrotor _h11pool via portal", "sync", make_sync=H11PoolPortal, checked=False),
)


def run_async(backend: Backend, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` in a fresh event loop: ``trio.run`` or ``asyncio.run``."""
    if backend == "trio":
        return trio.run(fn, *args)
    return asyncio.run(fn(*args))


# --------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class Sample:
    """One run: per-request wall times (ns), the loop's wall and CPU seconds, and
    whether the same connection served the whole run."""

    durations: list[int]
    wall: float
    cpu: float
    reused: bool


async def _port_async(client: AsyncBench) -> int:
    async with client.open_stream(SECRET, client.post_body) as response:
        check_status(response.status)
        async for _ in response.chunks:
            pass
        return response.local_port


def _port_sync(client: SyncBench) -> int:
    with client.open_stream(SECRET, client.post_body) as response:
        check_status(response.status)
        for _ in response.chunks:
            pass
        return response.local_port


async def measure_async(
    make: Callable[[Settings], AsyncBench], settings: Settings, mode: Mode, warmup: int, n: int
) -> Sample:
    client = make(settings)
    try:
        op = client.post if mode == "post" else client.stream
        for _ in range(warmup):
            await op()
        port = await _port_async(client)
        durations = [0] * n
        clock = time.perf_counter_ns
        gc.collect()
        cpu0 = time.process_time()
        start = clock()
        for i in range(n):
            t0 = clock()
            await op()
            durations[i] = clock() - t0
        wall = (clock() - start) / 1e9
        cpu = time.process_time() - cpu0
        reused = await _port_async(client) == port
    finally:
        await client.aclose()
    return Sample(durations, wall, cpu, reused)


def measure_sync(
    make: Callable[[Settings], SyncBench], settings: Settings, mode: Mode, warmup: int, n: int
) -> Sample:
    client = make(settings)
    try:
        op = client.post if mode == "post" else client.stream
        for _ in range(warmup):
            op()
        port = _port_sync(client)
        durations = [0] * n
        clock = time.perf_counter_ns
        gc.collect()
        cpu0 = time.process_time()
        start = clock()
        for i in range(n):
            t0 = clock()
            op()
            durations[i] = clock() - t0
        wall = (clock() - start) / 1e9
        cpu = time.process_time() - cpu0
        reused = _port_sync(client) == port
    finally:
        client.close()
    return Sample(durations, wall, cpu, reused)


def measure(case: Case, settings: Settings, mode: Mode, warmup: int, n: int) -> Sample:
    if case.make_sync is not None:
        return measure_sync(case.make_sync, settings, mode, warmup, n)
    assert case.make_async is not None
    sample: Sample = run_async(
        case.backend, measure_async, case.make_async, settings, mode, warmup, n
    )
    return sample


def percentile(values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass(frozen=True)
class Summary:
    median_us: float
    p99_us: float
    rps: float
    cpu_us: float
    round_medians_us: list[float]
    reused: bool


def summarize(samples: Sequence[Sample]) -> Summary:
    medians = [statistics.median(s.durations) / 1000 for s in samples]
    return Summary(
        median_us=statistics.median(medians),
        p99_us=statistics.median(percentile(s.durations, 0.99) / 1000 for s in samples),
        rps=statistics.median(len(s.durations) / s.wall for s in samples),
        cpu_us=statistics.median(s.cpu / len(s.durations) * 1e6 for s in samples),
        round_medians_us=medians,
        reused=all(s.reused for s in samples),
    )


def table(mode: Mode, summaries: dict[tuple[Case, Mode], Summary]) -> str:
    floors = {
        case.backend: summaries[case, mode].median_us
        for case in CASES
        if case.floor and (case, mode) in summaries
    }
    lines = [
        f"### {MODE_TITLES[mode]}",
        "",
        f"| client | backend | median {MICRO}s | p99 {MICRO}s | rps | client CPU {MICRO}s/req "
        f"| {TIMES} floor | round medians {MICRO}s |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for case in CASES:
        s = summaries.get((case, mode))
        if s is None:
            continue
        floor = floors.get(case.backend)
        ratio = f"{s.median_us / floor:.2f}" if floor else "-"
        name = case.client + (" (floor)" if case.floor else "")
        if not s.reused:
            name += " [connection NOT reused]"
        rounds = " / ".join(f"{m:.0f}" for m in s.round_medians_us)
        lines.append(
            f"| {name} | {case.backend} | {s.median_us:.0f} | {s.p99_us:.0f} | {s.rps:.0f} "
            f"| {s.cpu_us:.0f} | {ratio} | {rounds} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- upstream process


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGTERM the upstream if this process dies without cleaning up."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen[str]) -> None:
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the CLI stops cleanly on SIGTERM/SIGINT
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    except BaseException:
        proc.kill()
        raise
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


@contextmanager
def upstream_process(backend: str, startup_timeout: float = 30.0) -> Iterator[tuple[Target, int]]:
    """Run the fake upstream (scenario ``open``) in a child process on 127.0.0.1;
    yields its endpoint and pid, stops it on exit (also on errors and Ctrl-C)."""
    cmd = [
        sys.executable,
        "-m",
        "keyrotor.testing.fake_upstream",
        "--host",
        LOOPBACK,
        "--port",
        "0",
        "--scenario",
        "open",
        "--backend",
        backend,
    ]
    with tempfile.TemporaryFile(mode="w+") as errors:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], startup_timeout)
            line = proc.stdout.readline().strip() if ready else ""
            if not line:
                errors.seek(0)
                raise BenchError(f"the fake upstream did not start: {errors.read().strip()!r}")
            yield Target.parse(line), proc.pid
        finally:
            _stop(proc)


# --------------------------------------------------------------------------- behaviour checks

SLOW_STREAM = "sk-or-v1-fake-check-slow-stream"  # an SSE event every 50 ms
SLOW_HEAD = "sk-or-v1-fake-check-slow-head"  # response headers after 2 s
BUSY = "sk-or-v1-fake-check-busy"  # response headers after 10 ms
CHUNK_DELAY = 0.05
STREAM_TOKENS = 10  # about 16 SSE events: about 0.75 s in all
CANCEL_AFTER = 0.25
SHORT_TIMEOUT = 0.3
CONTENTION_ROUNDS = 100
CONTENTION_TASKS = 8
CONTENTION_CONNECTIONS = 2
CONTENTION_DEADLINE = 0.03


def check_scenario() -> Scenario:
    return (
        Scenario.open()
        .add(SLOW_STREAM, SlowStream(CHUNK_DELAY))
        .add(SLOW_HEAD, Slow(2.0))
        .add(BUSY, Slow(0.01))
    )


@dataclass
class CheckResult:
    incremental: str = "-"
    cancel: str = "-"
    closed: str = "-"
    read_timeout: str = "-"
    pool_timeout: str = "n/a (no pool)"
    contention: str = "n/a (no pool)"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _busy(connections: list[Any] | None) -> list[Any]:
    """Connections neither idle nor closed (with no request running: leaked)."""
    if connections is None:
        return []
    return [c for c in connections if not c.is_idle() and not c.is_closed()]


async def _read_all(client: AsyncBench, secret: str, body: bytes) -> None:
    async with client.open_stream(secret, body) as response:
        async for _ in response.chunks:
            pass


async def _read_before(client: AsyncBench, body: bytes, deadline: float) -> None:
    with anyio.move_on_after(deadline):
        await _read_all(client, BUSY, body)


async def check_async(
    make: Callable[[Settings], AsyncBench], server: FakeUpstream, target: Target, pooled: bool
) -> CheckResult:
    result = CheckResult()
    settings = Settings(target, max_tokens=STREAM_TOKENS, max_connections=4)
    slow = chat_body(stream=True, max_tokens=STREAM_TOKENS)
    post = chat_body(stream=False, max_tokens=8)
    clock = time.perf_counter

    # Incremental body, then cancellation mid-stream (a cancel scope / task cancel).
    client = make(settings)
    try:
        port_before = await _port_async(client)
        await anyio.sleep(0.3)  # earlier checks' hang-ups are counted by now
        disconnects = server.stats(SLOW_STREAM).disconnects
        times: list[float] = []
        start = clock()
        port_stream = -1
        with anyio.move_on_after(CANCEL_AFTER):
            async with client.open_stream(SLOW_STREAM, slow) as response:
                port_stream = response.local_port
                async for _ in response.chunks:
                    times.append(clock() - start)
        returned = clock() - start
        result.incremental = (
            f"{len(times)} chunks in {_ms(CANCEL_AFTER)}, first at {_ms(times[0])}"
            if times
            else "no chunk"
        )
        port_after = await _port_async(client)  # the next request must work
        await anyio.sleep(0.3)  # the server notices at its next send
        seen = server.stats(SLOW_STREAM).disconnects - disconnects
        reused_before = port_stream == port_before
        result.cancel = f"returned at {_ms(returned)}; next request ok"
        result.closed = (
            f"{'yes' if port_after != port_stream else 'NO'}: new connection after cancel"
            f"{'' if reused_before else ' (stream was not on the pooled one)'}; "
            f"server saw {seen} disconnect(s); busy connections: {len(_busy(client.connections()))}"
        )
    finally:
        await client.aclose()

    # Read timeout: headers arrive after 2 s, read timeout 0.3 s.
    client = make(replace(settings, read_timeout=SHORT_TIMEOUT))
    start = clock()
    try:
        await _read_all(client, SLOW_HEAD, post)
        result.read_timeout = "NO timeout"
    except Exception as exc:
        result.read_timeout = (
            f"{type(exc).__module__}.{type(exc).__name__} at {_ms(clock() - start)}"
        )
    finally:
        await client.aclose()

    if not pooled:
        return result

    # Pool timeout: one connection, held by a stream; a second request waits 0.3 s.
    client = make(replace(settings, max_connections=1, pool_timeout=SHORT_TIMEOUT))
    try:
        async with client.open_stream(SLOW_STREAM, slow):
            start = clock()
            try:
                await _read_all(client, SECRET, post)
                result.pool_timeout = "NO timeout"
            except Exception as exc:
                result.pool_timeout = (
                    f"{type(exc).__module__}.{type(exc).__name__} at {_ms(clock() - start)}"
                )
    finally:
        await client.aclose()

    # Cancellation under contention (httpcore #1093): 8 requests on 2 connections,
    # each with its own random deadline (0-30 ms) against 10 ms of upstream latency,
    # 100 times; then 3 requests with a 1 s pool timeout.
    client = make(replace(settings, max_connections=CONTENTION_CONNECTIONS, pool_timeout=1.0))
    rng = random.Random(0)
    try:
        for _ in range(CONTENTION_ROUNDS):
            async with anyio.create_task_group() as tg:
                for _ in range(CONTENTION_TASKS):
                    tg.start_soon(_read_before, client, post, rng.uniform(0, CONTENTION_DEADLINE))
        await anyio.sleep(0.3)
        leaked = _busy(client.connections())
        states = ", ".join(sorted({repr(c) for c in leaked}))
        ok, failure = 0, ""
        for _ in range(3):
            try:
                await _read_all(client, SECRET, post)
                ok += 1
            except Exception as exc:
                failure = f" ({type(exc).__name__})"
        result.contention = (
            f"{len(leaked)} of {CONTENTION_CONNECTIONS} connections stuck"
            f"{f' {states}' if leaked else ''}; "
            f"{ok}/3 later requests ok{failure}"
        )
    finally:
        await client.aclose()
    return result


def check_sync(
    make: Callable[[Settings], SyncBench], server: FakeUpstream, target: Target, pooled: bool
) -> CheckResult:
    result = CheckResult(contention="n/a (sync)")
    settings = Settings(target, max_tokens=STREAM_TOKENS, max_connections=4)
    slow = chat_body(stream=True, max_tokens=STREAM_TOKENS)
    post = chat_body(stream=False, max_tokens=8)
    clock = time.perf_counter

    # Incremental body, then stop reading mid-stream and close the response.
    client = make(settings)
    try:
        port_before = _port_sync(client)
        time.sleep(0.3)  # earlier checks' hang-ups are counted by now
        disconnects = server.stats(SLOW_STREAM).disconnects
        times: list[float] = []
        start = clock()
        with client.open_stream(SLOW_STREAM, slow) as response:
            port_stream = response.local_port
            for _ in response.chunks:
                times.append(clock() - start)
                if times[-1] >= CANCEL_AFTER:
                    break
        returned = clock() - start
        result.incremental = (
            f"{len(times)} chunks in {_ms(times[-1])}, first at {_ms(times[0])}"
            if times
            else "no chunk"
        )
        port_after = _port_sync(client)
        time.sleep(0.3)
        seen = server.stats(SLOW_STREAM).disconnects - disconnects
        result.cancel = (
            f"break + close: returned {_ms(returned - times[-1])} after the break; next request ok"
            if times
            else "no chunk"
        )
        result.closed = (
            f"{'yes' if port_after != port_stream else 'NO'}: new connection after close"
            f"{'' if port_stream == port_before else ' (stream was not on the pooled one)'}; "
            f"server saw {seen} disconnect(s); busy connections: {len(_busy(client.connections()))}"
        )
    finally:
        client.close()

    client = make(replace(settings, read_timeout=SHORT_TIMEOUT))
    start = clock()
    try:
        with client.open_stream(SLOW_HEAD, post) as response:
            for _ in response.chunks:
                pass
        result.read_timeout = "NO timeout"
    except Exception as exc:
        result.read_timeout = (
            f"{type(exc).__module__}.{type(exc).__name__} at {_ms(clock() - start)}"
        )
    finally:
        client.close()

    if not pooled:
        return result

    client = make(replace(settings, max_connections=1, pool_timeout=SHORT_TIMEOUT))
    try:
        with client.open_stream(SLOW_STREAM, slow):
            start = clock()
            try:
                with client.open_stream(SECRET, post) as response:
                    for _ in response.chunks:
                        pass
                result.pool_timeout = "NO timeout"
            except Exception as exc:
                result.pool_timeout = (
                    f"{type(exc).__module__}.{type(exc).__name__} at {_ms(clock() - start)}"
                )
    finally:
        client.close()
    return result


def run_checks(upstream_backend: str) -> str:
    lines = [
        "### Behaviour checks (in-process fake upstream in a thread; slow keys)",
        "",
        f"Streams: one SSE event every {_ms(CHUNK_DELAY)}, cancelled after {_ms(CANCEL_AFTER)} "
        "(anyio cancel scope; sync: break out of the loop and close the response). "
        f"Read timeout {_ms(SHORT_TIMEOUT)} against headers sent after 2 s. Pool timeout "
        f"{_ms(SHORT_TIMEOUT)} with max_connections=1 held by a stream. Contention: "
        f"{CONTENTION_ROUNDS} rounds of {CONTENTION_TASKS} concurrent requests on "
        f"max_connections={CONTENTION_CONNECTIONS}, each with its own random deadline "
        f"(0-{_ms(CONTENTION_DEADLINE)}) against 10 ms of upstream latency (a proxy whose "
        "callers give up), then 3 requests with a 1 s pool timeout.",
        "",
        "| client | backend | incremental body | cancel mid-stream | connection closed? "
        "| read timeout | pool timeout | cancel under contention |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with FakeUpstream.running_in_thread(check_scenario(), backend=upstream_backend) as server:
        target = Target.parse(server.url)
        for case in (case for case in CASES if case.checked):
            print(f"  check: {case.client} ({case.backend})", file=sys.stderr, flush=True)
            if case.make_sync is not None:
                r = check_sync(case.make_sync, server, target, case.pooled)
            else:
                assert case.make_async is not None
                r = run_async(
                    case.backend, check_async, case.make_async, server, target, case.pooled
                )
            lines.append(
                f"| {case.client} | {case.backend} | {r.incremental} | {r.cancel} | {r.closed} "
                f"| {r.read_timeout} | {r.pool_timeout} | {r.contention} |"
            )
        errors = server.totals().errors
    lines.append("")
    lines.append(f"Fake upstream internal errors during the checks: {errors}.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _versions() -> str:
    names = ("httpx", "httpcore", "h11", "anyio", "trio", "sniffio")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.http_clients",
        description="Per-request cost of candidate HTTP clients against the fake upstream.",
    )
    parser.add_argument(
        "--requests", type=int, default=2000, help="timed requests per run (default 2000)"
    )
    parser.add_argument(
        "--warmup", type=int, default=200, help="untimed requests before each run (default 200)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved repetitions of the whole set (default 3)"
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=8,
        help="completion tokens asked for (SSE content events when streaming; default 8)",
    )
    parser.add_argument(
        "--upstream-backend",
        choices=["asyncio", "trio"],
        default="asyncio",
        help="event loop of the fake upstream (default asyncio)",
    )
    parser.add_argument(
        "--checks",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the behaviour checks (default: yes)",
    )
    return parser


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the upstream's cleanup


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.requests < 1 or args.warmup < 0 or args.rounds < 1:
        print("error: --requests and --rounds must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)

    samples: dict[tuple[Case, Mode], list[Sample]] = {}
    load_before = os.getloadavg()
    started = time.perf_counter()
    with upstream_process(args.upstream_backend) as (target, pid):
        print(f"fake upstream pid {pid} at {target.url}", file=sys.stderr, flush=True)
        settings = Settings(target, max_tokens=args.max_tokens)
        for rnd in range(1, args.rounds + 1):
            for case in CASES:
                for mode in MODES:
                    sample = measure(case, settings, mode, args.warmup, args.requests)
                    samples.setdefault((case, mode), []).append(sample)
                    print(
                        f"round {rnd}/{args.rounds} {case.client} ({case.backend}, {mode}): "
                        f"median {statistics.median(sample.durations) / 1000:.0f} {MICRO}s",
                        file=sys.stderr,
                        flush=True,
                    )
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()
    summaries = {key: summarize(runs) for key, runs in samples.items()}

    out = [
        "## HTTP clients against the fake upstream (separate process, loopback)",
        "",
        f"- command: `.venv/bin/python -m benchmarks.http_clients --requests {args.requests} "
        f"--warmup {args.warmup} --rounds {args.rounds} --max-tokens {args.max_tokens} "
        f"--upstream-backend {args.upstream_backend}`",
        f"- Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs; "
        f"{_versions()}",
        f"- {args.requests} timed requests per run after {args.warmup} warm-up, {args.rounds} "
        f"interleaved rounds; medians over rounds. Run time {elapsed:.0f} s; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after.",
        f"- {TIMES} floor: median over the bare h11 client's median on the same backend "
        "(h11 + anyio stream for trio and asyncio, h11 + socket for sync). Client CPU: "
        "process_time of the client process per request (the upstream is another process).",
        "",
    ]
    for mode in MODES:
        out.append(table(mode, summaries))
        out.append("")
    print("\n".join(out), flush=True)

    if args.checks:
        print(run_checks(args.upstream_backend), flush=True)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:  # the upstream is already stopped (upstream_process)
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
