"""The h11 connection pool against the fake upstream and tiny misbehaving servers,
on asyncio and trio."""

from __future__ import annotations

import json
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import trio
import trio.testing
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSListener

from keyrotor.testing import (
    Drop,
    FakeUpstream,
    Hang,
    Ok,
    Reply,
    Scenario,
    Sequence,
    Slow,
    SlowStream,
    Truncate,
)
from keyrotor.testing.certificates import server_context
from keyrotor.transports import codec as http_codec
from keyrotor.transports._direct import YIELD_EVERY, DirectStream
from keyrotor.transports._h11pool import (
    ConnectError,
    ConnectionPool,
    ConnectTimeout,
    HTTPError,
    LocalProtocolError,
    PoolOptions,
    PoolTimeout,
    ReadError,
    ReadTimeout,
    RemoteProtocolError,
    Response,
    WriteTimeout,
)
from keyrotor.transports.codec import codecs


@pytest.fixture(autouse=True, params=["h11", "httptools"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on both HTTP parsers: h11 (the reference) and httptools."""
    chosen = codecs(request.param)
    monkeypatch.setattr(http_codec, "codecs", lambda name: chosen)
    return str(request.param)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str | tuple[str, dict[str, Any]]:
    if request.param == VIRTUAL_TRIO:
        # trio on a MockClock that jumps to the next deadline whenever every task
        # waits: timeouts fire at exact virtual times, whatever the machine's load.
        return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})
    return str(request.param)


VIRTUAL_TRIO = "trio-mock-clock"
# For the tests that check when a timeout fired: on asyncio only that it fired.
with_virtual_trio = pytest.mark.parametrize(
    "anyio_backend", ["asyncio", VIRTUAL_TRIO], indirect=True
)


def virtual(anyio_backend: str | tuple[str, dict[str, Any]]) -> bool:
    """Whether the test runs on trio's MockClock (its times are then exact)."""
    return isinstance(anyio_backend, tuple)


KEY = "sk-or-v1-test"
SLOW_HEAD = "sk-or-v1-slow-head"  # headers after 5 s
SLOW_STREAM = "sk-or-v1-slow-stream"  # an SSE event every 50 ms
SLOWER_STREAM = "sk-or-v1-slower-stream"  # an SSE event every 500 ms
BUSY = "sk-or-v1-busy"  # headers after 10 ms
HANG = "sk-or-v1-hang"


def scenario() -> Scenario:
    return (
        Scenario.open()
        .add(SLOW_HEAD, Slow(5.0))
        .add(SLOW_STREAM, SlowStream(0.05))
        .add(SLOWER_STREAM, SlowStream(0.5))
        .add(BUSY, Slow(0.01))
        .add(HANG, Hang())
    )


def headers(secret: str = KEY) -> list[tuple[bytes, bytes]]:
    return [
        (b"authorization", b"Bearer " + secret.encode()),
        (b"content-type", b"application/json"),
    ]


def chat(*, stream: bool = False, max_tokens: int = 8) -> bytes:
    return json.dumps(
        {
            "model": "openai/gpt-4o-mini",
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": max_tokens,
            "stream": stream,
        }
    ).encode()


@asynccontextmanager
async def upstream(context: ssl.SSLContext | None = None) -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(scenario(), ssl_context=context).serve() as server:
        yield server
        assert server.totals().errors == 0, server.errors


async def post(
    pool: ConnectionPool,
    server: FakeUpstream,
    secret: str = KEY,
    *,
    stream: bool = False,
    read_timeout: float | None = 5.0,
) -> Response:
    return await pool.request(
        b"POST",
        server.url + "/chat/completions",
        headers(secret),
        chat(stream=stream),
        read_timeout=read_timeout,
    )


async def post_read(pool: ConnectionPool, server: FakeUpstream, secret: str = KEY) -> bytes:
    response = await post(pool, server, secret)
    try:
        assert response.status == 200
        return await response.aread()
    finally:
        await response.aclose()


def tls_pair(certificate: tuple[Path, Path]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context for the test certificate, and a client context trusting it."""
    cert, key = certificate
    return server_context(cert, key), ssl.create_default_context(cafile=str(cert))


def assert_quiet(pool: ConnectionPool, *, open_: int | None = None) -> None:
    """Nothing busy, connecting or waiting: every slot is idle or free."""
    stats = pool.stats()
    assert stats["busy"] == 0, stats
    assert stats["connecting"] == 0, stats
    assert stats["waiting"] == 0, stats
    assert stats["open"] == stats["idle"], stats
    if open_ is not None:
        assert stats["open"] == open_, stats


async def eventually(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.005)


# --------------------------------------------------------------------------- raw servers

Handler = Callable[[anyio.abc.ByteStream, "RawServer"], Awaitable[None]]
OK_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


@dataclass
class RawServer:
    port: int
    scheme: str = "http"
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)
    late_bytes: int = 0

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"


@asynccontextmanager
async def raw_server(
    handler: Handler, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[RawServer]:
    """A TCP (or TLS) server on 127.0.0.1 running ``handler`` per connection."""
    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
    listener: anyio.abc.Listener[anyio.abc.ByteStream] = tcp
    if ssl_context is not None:
        listener = TLSListener(tcp, ssl_context, standard_compatible=False)
    server = RawServer(
        tcp.extra(SocketAttribute.local_port), "http" if not ssl_context else "https"
    )

    async def serve(stream: anyio.abc.ByteStream) -> None:
        server.connections += 1
        async with stream:
            with suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                await handler(stream, server)

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()


async def read_head(stream: anyio.abc.ByteStream, buffer: bytearray) -> bytes:
    """One request head (requests in these tests have at most a tiny body)."""
    while b"\r\n\r\n" not in buffer:
        buffer += await stream.receive()
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end])
    del buffer[:end]
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            size = int(line.split(b":")[1])
            while len(buffer) < size:
                buffer += await stream.receive()
            del buffer[:size]
    return head


async def keep_alive_ok(stream: anyio.abc.ByteStream, server: RawServer) -> None:
    buffer = bytearray()
    while True:
        server.heads.append(await read_head(stream, buffer))
        await stream.send(OK_RESPONSE)


async def never_answer(stream: anyio.abc.ByteStream, server: RawServer) -> None:
    with suppress(anyio.EndOfStream):
        while True:
            await stream.receive()


async def never_read(stream: anyio.abc.ByteStream, server: RawServer) -> None:
    await anyio.sleep_forever()


# --------------------------------------------------------------------------- basics


@pytest.mark.anyio
async def test_get_and_post_json() -> None:
    async with upstream() as server, ConnectionPool() as pool:
        response = await pool.request(b"GET", server.url + "/models", [], read_timeout=5.0)
        assert response.status == 200
        assert (b"content-type", b"application/json") in response.headers
        models = json.loads(await response.aread())
        assert any(m["id"] == "openai/gpt-4o-mini" for m in models["data"])

        body = json.loads(await post_read(pool, server))
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"].startswith("Hello")
        assert server.stats(KEY).by_status == {200: 1}
        assert_quiet(pool, open_=1)


@pytest.mark.anyio
async def test_request_head_has_host_and_content_length_and_keeps_callers_headers() -> None:
    async with raw_server(keep_alive_ok) as server, ConnectionPool() as pool:
        response = await pool.request(
            b"POST", server.url + "/a/b?x=1", [(b"x-test", b"yes")], b"{}", read_timeout=5.0
        )
        assert await response.aread() == b"ok"
        response = await pool.request(
            b"GET", server.url + "/", [(b"Host", b"example.test")], read_timeout=5.0
        )
        assert await response.aread() == b"ok"
        first, second = (head.lower() for head in server.heads)
        assert first.startswith(b"post /a/b?x=1 http/1.1\r\n")
        assert first.count(b"host:") == 1
        assert b"host: 127.0.0.1:%d\r\n" % server.port in first
        assert b"content-length: 2\r\n" in first
        assert b"x-test: yes\r\n" in first
        assert b"transfer-encoding" not in first and b"accept-encoding" not in first
        assert second.count(b"host:") == 1 and b"host: example.test\r\n" in second
        assert b"content-length" not in second  # no body, no framing header
        assert server.connections == 1

        with pytest.raises(LocalProtocolError, match="pass the body"):
            await pool.request(
                b"POST", server.url, [(b"Content-Length", b"2")], b"{}", read_timeout=1
            )
        with pytest.raises(LocalProtocolError, match="absolute http"):
            await pool.request(b"GET", "ftp://127.0.0.1/", [], read_timeout=1)
        with pytest.raises(LocalProtocolError):
            await pool.request(b"GET", server.url, [(b"x-bad", b"a\r\nb")], read_timeout=1)
        assert_quiet(pool, open_=1)


@pytest.mark.anyio
async def test_sse_stream_is_read_to_its_end_and_the_connection_reused() -> None:
    async with upstream() as server, ConnectionPool() as pool:
        response = await post(pool, server, SLOW_STREAM, stream=True, read_timeout=1.0)
        assert (b"content-type", b"text/event-stream") in response.headers
        chunks = [chunk async for chunk in response.aiter_bytes()]
        assert all(isinstance(chunk, bytes) for chunk in chunks)
        assert b"".join(chunks).endswith(b"data: [DONE]\n\n")
        assert_quiet(pool, open_=1)  # read to its end: back in the pool
        await response.aclose()  # idempotent, nothing left to do
        assert_quiet(pool, open_=1)


@pytest.mark.anyio
async def test_sse_stream_arrives_chunk_by_chunk() -> None:
    # Lockstep: the server sends event n + 1 only once the caller holds event n.
    # A pool that waited for more bytes (or the whole body) before handing any
    # over would wait forever (the fail_after below is only a hang guard).
    events = [b"data: %d\n\n" % n for n in range(5)]
    received: list[bytes] = []
    caught_up = [anyio.Event() for _ in events]

    async def lockstep(stream: anyio.abc.ByteStream, server: RawServer) -> None:
        await read_head(stream, bytearray())
        await stream.send(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        for event, handed_over in zip(events, caught_up, strict=True):
            await stream.send(b"%x\r\n%s\r\n" % (len(event), event))
            await handed_over.wait()
        await stream.send(b"0\r\n\r\n")
        await never_answer(stream, server)  # keep the connection open

    async with raw_server(lockstep) as server, ConnectionPool() as pool:
        with anyio.fail_after(30):
            response = await pool.request(b"GET", server.url + "/sse", [], read_timeout=30)
            chunks: list[bytes] = []
            async for chunk in response.aiter_bytes():
                chunks.append(chunk)
                received.append(chunk)
                for n in range(b"".join(received).count(b"\n\n")):
                    caught_up[n].set()
        assert b"".join(chunks) == b"".join(events)
        assert len(chunks) >= len(events)  # never two events in one chunk
        assert_quiet(pool, open_=1)


@pytest.mark.anyio
async def test_ready_says_whether_the_next_chunk_is_in_hand(parser: str) -> None:
    # ``ready`` True promises a read that waits for no bytes; it must be False
    # while the server holds the next chunk back (h11 cannot tell: always False).
    release = anyio.Event()

    async def gated(stream: anyio.abc.ByteStream, server: RawServer) -> None:
        await read_head(stream, bytearray())
        await stream.send(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n"
        )
        await release.wait()
        await stream.send(b"6\r\nsecond\r\n0\r\n\r\n")
        await never_answer(stream, server)

    fast = parser == "httptools"
    async with raw_server(gated) as server, ConnectionPool() as pool:
        with anyio.fail_after(30):
            response = await pool.request(b"GET", server.url + "/sse", [], read_timeout=30)
            assert response.ready is fast  # the first chunk came with the head
            assert await anext(response) == b"first"
            assert response.ready is False  # the server holds the second one
            release.set()
            assert await anext(response) == b"second"
            assert response.ready is fast  # the end came with it
            assert await anext(response, None) is None
            assert response.ready is True  # read to its end: nothing to wait for
        assert_quiet(pool, open_=1)


@pytest.mark.anyio
async def test_twenty_sequential_requests_share_one_connection() -> None:
    async with upstream() as server, ConnectionPool() as pool:
        for i in range(20):
            if i % 2:
                await post_read(pool, server)
            else:
                response = await post(pool, server, stream=True)
                assert (await response.aread()).endswith(b"data: [DONE]\n\n")
        assert server.totals().connections == 1
        assert server.stats(KEY).requests == 20
        assert_quiet(pool, open_=1)


@pytest.mark.anyio
async def test_connection_close_from_the_server_is_honoured() -> None:
    async with upstream() as server, ConnectionPool() as pool:
        server.set_behaviour(KEY, Reply(200, body={"ok": True}, headers={"Connection": "close"}))
        for _ in range(2):
            assert json.loads(await post_read(pool, server)) == {"ok": True}
            assert_quiet(pool, open_=0)
        assert server.totals().connections == 2


@pytest.mark.anyio
@with_virtual_trio
async def test_keepalive_expiry(anyio_backend: str | tuple[str, dict[str, Any]]) -> None:
    options = PoolOptions(keepalive_expiry=0.05)
    async with upstream() as server, ConnectionPool(options) as pool:
        await post_read(pool, server)
        await post_read(pool, server)
        reused = server.totals().connections
        if virtual(anyio_backend):  # back to back in virtual time: reused
            assert reused == 1
        await anyio.sleep(0.1)  # at least 0.1 s, however loaded the machine
        await post_read(pool, server)
        assert server.totals().connections == reused + 1  # the expired one was not reused
        assert_quiet(pool, open_=1)


# --------------------------------------------------------------------------- stale connections


async def answer_then_close(stream: anyio.abc.ByteStream, server: RawServer) -> None:
    """Answer one request (keep-alive framing), then close our side; whatever the
    client still sends here went to a connection it should have dropped."""
    server.heads.append(await read_head(stream, bytearray()))
    await stream.send(OK_RESPONSE)
    try:
        await stream.send_eof()
    except NotImplementedError:  # TLS cannot half-close: the whole connection goes
        return
    with suppress(anyio.EndOfStream):
        while True:
            server.late_bytes += len(await stream.receive())


@pytest.mark.anyio
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_idle_connection_closed_by_the_server_is_replaced_before_sending(
    tls: bool, certificate: tuple[Path, Path]
) -> None:
    served, trusting = tls_pair(certificate) if tls else (None, None)
    async with (
        raw_server(answer_then_close, served) as server,
        ConnectionPool(PoolOptions(ssl_context=trusting)) as pool,
    ):
        for _ in range(3):
            response = await pool.request(b"GET", server.url, [], read_timeout=5.0)
            assert await response.aread() == b"ok"
            assert pool.stats()["idle"] == 1
            await anyio.sleep(0.05)  # the server's FIN arrives
        assert len(server.heads) == 3
        assert server.connections == 3
        assert server.late_bytes == 0  # never written to a connection the server closed


@pytest.mark.anyio
async def test_reused_connection_dropped_before_the_response_is_retried_once() -> None:
    async with upstream() as server, ConnectionPool() as pool:
        server.set_behaviour(KEY, Sequence([Ok(), Drop()], then=Ok()))
        await post_read(pool, server)
        body = json.loads(await post_read(pool, server))  # Drop, then a new connection
        assert body["object"] == "chat.completion"
        assert server.stats(KEY).by_status == {200: 2, 0: 1}
        assert server.totals().connections == 2
        assert_quiet(pool, open_=1)


@pytest.mark.anyio
async def test_retry_happens_only_once_and_never_on_a_new_connection() -> None:
    async with upstream() as server, ConnectionPool() as pool:
        server.set_behaviour(KEY, Sequence([Drop(), Ok(), Drop(), Drop()], then=Ok()))
        with pytest.raises(RemoteProtocolError, match="without sending a response"):
            await post_read(pool, server)  # a new connection: not retried
        assert server.stats(KEY).requests == 1
        assert_quiet(pool, open_=0)
        await post_read(pool, server)
        with pytest.raises(RemoteProtocolError):
            await post_read(pool, server)  # reused (dropped), retried once (dropped)
        assert server.stats(KEY).requests == 4
        assert server.totals().connections == 3
        assert_quiet(pool, open_=0)
        await post_read(pool, server)


# --------------------------------------------------------------------------- limits


@pytest.mark.anyio
async def test_max_connections_respected_under_ten_concurrent_requests() -> None:
    async with upstream() as server, ConnectionPool(PoolOptions(max_connections=3)) as pool:
        server.set_behaviour(KEY, Slow(0.05))
        busiest = 0
        results: list[bytes] = []

        async def one() -> None:
            nonlocal busiest
            results.append(await post_read(pool, server))
            busiest = max(busiest, pool.stats()["open"])

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(one)
        assert len(results) == 10
        assert server.totals().connections == 3
        assert server.stats(KEY).max_in_flight == 3
        assert busiest == 3
        assert_quiet(pool, open_=3)


@pytest.mark.anyio
async def test_idle_connection_of_another_origin_is_closed_for_a_new_one() -> None:
    async with (
        upstream() as a,
        upstream() as b,
        ConnectionPool(PoolOptions(max_connections=1)) as pool,
    ):
        await post_read(pool, a)
        await post_read(pool, b)  # does not wait: A's idle connection makes room
        await eventually(lambda: a.totals().open_connections == 0)
        await post_read(pool, a)
        assert (a.totals().connections, b.totals().connections) == (2, 1)
        assert_quiet(pool, open_=1)


@pytest.mark.anyio
@with_virtual_trio
async def test_pool_timeout(anyio_backend: str | tuple[str, dict[str, Any]]) -> None:
    options = PoolOptions(max_connections=1, pool=0.2)
    async with upstream() as server, ConnectionPool(options) as pool:
        held = await post(pool, server, SLOW_STREAM, stream=True)
        start = anyio.current_time()
        # The slot is never freed: without the timeout this would wait forever.
        with pytest.raises(PoolTimeout) as caught:
            await post_read(pool, server)
        assert isinstance(caught.value, TimeoutError)
        if virtual(anyio_backend):
            assert anyio.current_time() - start == pytest.approx(0.2)  # virtual time
        assert pool.stats() == {"open": 1, "idle": 0, "busy": 1, "connecting": 0, "waiting": 0}
        await held.aclose()  # not read to its end: closed, the slot is free
        assert_quiet(pool, open_=0)
        await post_read(pool, server)
        assert server.totals().connections == 2


# --------------------------------------------------------------------------- timeouts and errors


@pytest.mark.anyio
@with_virtual_trio
async def test_read_timeout_waiting_for_the_response_head(
    anyio_backend: str | tuple[str, dict[str, Any]],
) -> None:
    async with upstream() as server, ConnectionPool() as pool:
        start = anyio.current_time()
        # The head comes after 5 s: a ReadTimeout means the 0.2 s one fired first.
        with pytest.raises(ReadTimeout) as caught:
            await post(pool, server, SLOW_HEAD, read_timeout=0.2)
        assert isinstance(caught.value, TimeoutError)
        assert server.stats(SLOW_HEAD).by_status == {200: 1}  # decided, not yet answered
        if virtual(anyio_backend):
            assert anyio.current_time() - start == pytest.approx(0.2)  # virtual time
        assert_quiet(pool, open_=0)
        await post_read(pool, server)


async def slow_head(stream: anyio.abc.ByteStream, server: RawServer) -> None:
    """The head line by line, ``gap`` seconds apart (``GET /<gap>``)."""
    head = await read_head(stream, bytearray())
    gap = float(head.split(b" ")[1].strip(b"/"))
    for line in (b"HTTP/1.1 200 OK\r\n", b"content-length: 2\r\n", b"x-a: 1\r\n", b"\r\nok"):
        await stream.send(line)
        await anyio.sleep(gap)


@pytest.mark.anyio
@with_virtual_trio
async def test_read_timeout_bounds_each_wait_for_the_head_not_the_whole_head() -> None:
    async with raw_server(slow_head) as server, ConnectionPool() as pool:
        # Three gaps of 0.4 s: the head takes 1.2 s, each wait for it less than 1 s
        # (on asyncio, in real time, a margin of 0.6 s for a loaded machine).
        response = await pool.request(b"GET", server.url + "/0.4", [], read_timeout=1.0)
        assert response.status == 200
        assert await response.aread() == b"ok"
        with pytest.raises(ReadTimeout):
            await pool.request(b"GET", server.url + "/3.0", [], read_timeout=1.0)
        assert_quiet(pool)


@pytest.mark.anyio
async def test_read_timeout_between_body_chunks() -> None:
    async with upstream() as server, ConnectionPool() as pool:
        response = await post(pool, server, SLOWER_STREAM, stream=True, read_timeout=0.25)
        first = await response.aiter_bytes().__anext__()
        assert first
        with pytest.raises(ReadTimeout):
            async for _ in response.aiter_bytes():
                pass
        assert_quiet(pool, open_=0)  # closed, not reused
        await response.aclose()
        await post_read(pool, server)


@pytest.mark.anyio
async def test_write_timeout_and_cancelled_write(anyio_backend: str) -> None:
    big = b"x" * (64 << 20)  # more than the socket buffers hold; the server never reads
    options = PoolOptions(write=0.2)
    # asyncio's transport sometimes takes the whole body into its own buffer, so
    # the send "completes" and the stall shows as a read timeout instead.
    expected = WriteTimeout if anyio_backend == "trio" else (WriteTimeout, ReadTimeout)
    async with raw_server(never_read) as server, ConnectionPool(options) as pool:
        with pytest.raises(expected):
            await pool.request(b"POST", server.url, [], big, read_timeout=0.5)
        assert_quiet(pool, open_=0)
        with anyio.move_on_after(0.1) as scope:
            await pool.request(b"POST", server.url, [], big[: 32 << 20], read_timeout=5.0)
        assert scope.cancelled_caught
        assert_quiet(pool, open_=0)


@pytest.mark.anyio
async def test_connect_error_on_a_closed_port() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)
    await listener.aclose()
    async with ConnectionPool() as pool:
        with pytest.raises(ConnectError) as caught:
            await pool.request(b"GET", f"http://127.0.0.1:{port}/", [], read_timeout=1.0)
        assert not isinstance(caught.value, ConnectTimeout)
        assert isinstance(caught.value.__cause__, OSError)
        assert pool.stats() == {"open": 0, "idle": 0, "busy": 0, "connecting": 0, "waiting": 0}


@pytest.mark.anyio
async def test_connect_timeout_and_cancel_during_a_tls_handshake() -> None:
    async with raw_server(never_answer) as server:  # accepts, never answers the ClientHello
        url = f"https://127.0.0.1:{server.port}/"
        async with ConnectionPool(PoolOptions(connect=0.2)) as pool:
            with pytest.raises(ConnectTimeout) as caught:
                await pool.request(b"GET", url, [], read_timeout=1.0)
            assert isinstance(caught.value, TimeoutError)
            assert_quiet(pool, open_=0)

        async with ConnectionPool() as pool:
            accepted = server.connections
            scope = anyio.CancelScope()

            async def connect() -> None:
                with scope:
                    await pool.request(b"GET", url, [], read_timeout=1.0)

            async with anyio.create_task_group() as tg:
                tg.start_soon(connect)
                await eventually(lambda: server.connections == accepted + 1)
                assert pool.stats()["connecting"] == 1
                scope.cancel()  # in the TLS handshake
            assert scope.cancelled_caught
            assert_quiet(pool, open_=0)


async def garbage(stream: anyio.abc.ByteStream, server: RawServer) -> None:
    await read_head(stream, bytearray())
    await stream.send(b"SPAM SPAM SPAM\r\n\r\n")
    await anyio.sleep(1)


@pytest.mark.anyio
async def test_garbage_response_is_a_remote_protocol_error() -> None:
    async with raw_server(garbage) as server, ConnectionPool() as pool:
        with pytest.raises(RemoteProtocolError, match="invalid response"):
            await pool.request(b"GET", server.url, [], read_timeout=1.0)
        assert server.connections == 1  # not retried: the server did answer
        assert_quiet(pool, open_=0)


@pytest.mark.anyio
async def test_truncated_body_is_a_remote_protocol_error() -> None:
    async with upstream() as server, ConnectionPool() as pool:
        server.set_behaviour(KEY, Truncate(after_chunks=2))
        response = await post(pool, server, stream=True)
        with pytest.raises(RemoteProtocolError, match="incomplete"):
            await response.aread()
        assert_quiet(pool, open_=0)
        await response.aclose()


# --------------------------------------------------------------------------- closing and cancelling


@pytest.mark.anyio
async def test_aclose_mid_body_closes_the_connection_and_frees_the_slot() -> None:
    async with upstream() as server, ConnectionPool(PoolOptions(max_connections=1)) as pool:
        response = await post(pool, server, SLOW_STREAM, stream=True)
        assert await response.aiter_bytes().__anext__()
        await response.aclose()
        await response.aclose()
        assert_quiet(pool, open_=0)
        await eventually(lambda: server.stats(SLOW_STREAM).disconnects == 1)
        await post_read(pool, server)
        assert server.totals().connections == 2


@pytest.mark.anyio
async def test_aread_limit() -> None:
    async with upstream() as server, ConnectionPool() as pool:
        response = await post(pool, server)
        assert await response.aread(limit=10) == b'{"id":"gen'
        assert_quiet(pool, open_=1)  # the rest was buffered already: reusable
        response = await post(pool, server, SLOW_STREAM, stream=True)
        assert len(await response.aread(limit=10)) == 10
        assert_quiet(pool, open_=0)  # the rest is still coming: closed
        assert server.totals().connections == 1
        await eventually(lambda: server.stats(SLOW_STREAM).disconnects == 1)


@pytest.mark.anyio
async def test_cancel_while_waiting_for_the_response_head() -> None:
    async with upstream() as server, ConnectionPool() as pool:
        with anyio.move_on_after(0.1) as scope:
            await post(pool, server, HANG)
        assert scope.cancelled_caught
        assert_quiet(pool, open_=0)
        await eventually(lambda: server.totals().open_connections == 0)
        await post_read(pool, server)


@pytest.mark.anyio
async def test_cancel_while_waiting_for_a_slot_even_with_the_slot_in_hand() -> None:
    async with upstream() as server, ConnectionPool(PoolOptions(max_connections=1)) as pool:
        held = await post(pool, server, SLOW_STREAM, stream=True)
        with anyio.move_on_after(0.05):
            await post_read(pool, server)
        assert pool.stats()["waiting"] == 0
        await held.aclose()

        # A waiter is handed the idle connection and cancelled before it runs.
        held = await post(pool, server)  # body buffered with the head: reusable on aclose
        scope = anyio.CancelScope()

        async def waiter() -> None:
            with scope:
                await post_read(pool, server)

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await eventually(lambda: pool.stats()["waiting"] == 1)
            await held.aclose()  # hands the connection over, without awaiting
            scope.cancel()
        assert_quiet(pool)
        await post_read(pool, server)
        assert_quiet(pool, open_=1)


@pytest.mark.anyio
async def test_cancellation_under_contention_leaks_nothing_httpcore_1093() -> None:
    """8 concurrent requests on 2 connections, each with a random 0-30 ms deadline
    against 10 ms of upstream latency, 100 times (encode/httpcore#1093)."""
    options = PoolOptions(max_connections=2, pool=1.0)
    rng = random.Random(0)
    async with upstream() as server, ConnectionPool(options) as pool:
        completed = 0

        async def one(deadline: float) -> None:
            nonlocal completed
            with anyio.move_on_after(deadline):
                await post_read(pool, server, BUSY)
                completed += 1

        for _ in range(100):
            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(one, rng.uniform(0, 0.03))
        assert_quiet(pool)
        assert pool.stats()["open"] <= 2
        assert 0 < completed < 800  # both outcomes happened
        for _ in range(3):
            await post_read(pool, server, BUSY)
        assert_quiet(pool)


@pytest.mark.anyio
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_pool_aclose_closes_busy_and_idle_connections(
    tls: bool, certificate: tuple[Path, Path]
) -> None:
    served, trusting = tls_pair(certificate) if tls else (None, None)
    async with upstream(served) as a, upstream(served) as b:
        pool = ConnectionPool(PoolOptions(ssl_context=trusting))
        await post_read(pool, a)
        streaming = await post(pool, b, SLOW_STREAM, stream=True)
        assert pool.stats()["open"] == 2
        await pool.aclose()
        await pool.aclose()
        assert pool.stats()["open"] == 0
        with pytest.raises(ReadError):
            await streaming.aread()
        await streaming.aclose()
        with pytest.raises(HTTPError, match="closed"):
            await post_read(pool, a)
        await eventually(lambda: a.totals().open_connections + b.totals().open_connections == 0)
        assert pool.stats() == {"open": 0, "idle": 0, "busy": 0, "connecting": 0, "waiting": 0}


@pytest.mark.anyio
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_pool_aclose_while_a_reader_waits_gives_it_a_read_error(
    tls: bool, certificate: tuple[Path, Path]
) -> None:
    """A task waiting for body bytes when the pool closes gets the pool's own
    ``ReadError``, never a stream library's exception."""
    served, trusting = tls_pair(certificate) if tls else (None, None)
    async with upstream(served) as server:
        pool = ConnectionPool(PoolOptions(ssl_context=trusting))
        streaming = await post(pool, server, SLOWER_STREAM, stream=True)
        caught: list[BaseException] = []

        async def read() -> None:
            try:
                await streaming.aread()
            except BaseException as exc:
                caught.append(exc)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(read)
            await anyio.sleep(0.1)  # the reader waits for the next event (every 0.5 s)
            await pool.aclose()
        assert len(caught) == 1 and isinstance(caught[0], ReadError), caught
        await streaming.aclose()


@pytest.mark.trio
async def test_a_body_that_keeps_arriving_does_not_hold_the_event_loop() -> None:
    """The pool's own sockets yield only when they would block; a body whose bytes
    are always there already still lets the other tasks run every ``YIELD_EVERY``
    reads (and a read after the request waits, sparing a read that would fail)."""

    class AlwaysData:  # a socket whose peer is faster than its reader
        reads = 0

        def recv(self, size: int) -> bytes:
            self.reads += 1
            return b"x" * size

    fake = AlwaysData()
    stream = DirectStream(fake)  # type: ignore[arg-type]
    others = 0

    async def other_task() -> None:
        nonlocal others
        while True:
            others += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await trio.lowlevel.checkpoint()  # it has started
        before = others
        for _ in range(10 * YIELD_EVERY):
            assert await stream.receive(1024) == b"x" * 1024
        # 9 yields in 160 reads: the other task ran about once each (trio orders
        # each batch at random); with a yield on no read it would not have run.
        assert others - before >= 5
        nursery.cancel_scope.cancel()
    assert fake.reads == 10 * YIELD_EVERY


# --------------------------------------------------------------------------- options and TLS


def test_options_are_checked() -> None:
    assert PoolOptions().max_connections == 10
    with pytest.raises(ValueError, match="max_connections"):
        PoolOptions(max_connections=0)
    with pytest.raises(ValueError, match="pool"):
        PoolOptions(pool=0)
    with pytest.raises(ValueError, match="keepalive_expiry"):
        PoolOptions(keepalive_expiry=-1)
    with pytest.raises(TypeError, match="ssl_context"):
        PoolOptions(ssl_context="yes")  # type: ignore[arg-type]


def test_tls_context_default_verifies_and_a_given_one_is_used_as_is() -> None:
    default = ConnectionPool()._tls()
    assert default.verify_mode is ssl.CERT_REQUIRED and default.check_hostname
    assert ConnectionPool()._tls() is not default  # one per pool...
    pool = ConnectionPool()
    assert pool._tls() is pool._tls()  # ...made once
    given = ssl.create_default_context()
    assert ConnectionPool(PoolOptions(ssl_context=given))._tls() is given


@pytest.mark.anyio
async def test_tls_round_trip_and_verification(certificate: tuple[Path, Path]) -> None:
    context, trusting = tls_pair(certificate)
    async with raw_server(keep_alive_ok, context) as server:
        async with ConnectionPool(PoolOptions(ssl_context=trusting)) as pool:
            for _ in range(3):
                response = await pool.request(b"GET", server.url + "/", [], read_timeout=5.0)
                assert await response.aread() == b"ok"
            assert server.connections == 1
            assert b"host: 127.0.0.1:%d" % server.port in server.heads[0]
            assert_quiet(pool, open_=1)
        async with ConnectionPool() as pool:  # the default context does not trust it
            with pytest.raises(ConnectError) as caught:
                await pool.request(b"GET", server.url + "/", [], read_timeout=5.0)
            assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)
            assert str(caught.value) == (
                f"the TLS certificate of 127.0.0.1:{server.port} is not trusted (self-signed "
                "certificate); fix: check the upstream URL, or trust its CA with "
                "SSL_CERT_FILE=PATH (a PEM file)"
            )
            assert_quiet(pool, open_=0)


@pytest.mark.anyio
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_large_bodies_both_ways_on_the_sockets_of_each_backend(
    certificate: tuple[Path, Path], tls: bool, anyio_backend: str
) -> None:
    """Megabytes each way, so that sends wait for room and reads span many TLS
    records; under trio the pool holds the sockets itself (``_direct``), under
    asyncio anyio's streams. The body comes back whole, in order, and the
    connection serves the next request."""
    upload = bytes(range(256)) * 4096  # 1 MiB
    answer = bytes(reversed(range(256))) * 8192  # 2 MiB

    async def echo_size(stream: anyio.abc.ByteStream, server: RawServer) -> None:
        buffer = bytearray()
        while True:
            head = await read_head(stream, buffer)  # reads the body too
            server.heads.append(head)
            await stream.send(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(answer))
            await stream.send(answer)

    context, trusting = tls_pair(certificate)
    async with raw_server(echo_size, context if tls else None) as server:
        async with ConnectionPool(PoolOptions(ssl_context=trusting)) as pool:
            for _ in range(2):
                response = await pool.request(
                    b"POST", server.url + "/", [], upload, read_timeout=10.0
                )
                assert response.status == 200
                assert await response.aread() == answer
            (conn,) = pool._conns
            direct = isinstance(conn.stream, DirectStream)
            assert direct == (anyio_backend == "trio")
            if direct:
                assert isinstance(conn.stream.sock, ssl.SSLSocket) == tls
            assert_quiet(pool, open_=1)
    assert server.connections == 1
    assert all(b"content-length: %d" % len(upload) in head for head in server.heads)


# --------------------------------------------------------------------------- review fixes


@pytest.mark.anyio
async def test_keepalive_expiry_zero_gives_each_request_its_own_connection() -> None:
    """0: never reuse, also when a request waits for the connection being released."""
    options = PoolOptions(keepalive_expiry=0, max_connections=1)
    async with raw_server(keep_alive_ok) as server, ConnectionPool(options) as pool:

        async def get() -> None:
            response = await pool.request(b"GET", server.url + "/", [], read_timeout=5)
            await response.aread()
            await response.aclose()

        async with anyio.create_task_group() as tasks:
            for _ in range(2):
                tasks.start_soon(get)
        await get()
        assert server.connections == 3


async def answer_early_then_close(stream: anyio.abc.ByteStream, server: RawServer) -> None:
    """A 401 as soon as the head is in, then close with the body unread (a reset)."""
    buffer = bytearray()
    while b"\r\n\r\n" not in buffer:
        buffer += await stream.receive()
    server.heads.append(bytes(buffer[: buffer.index(b"\r\n\r\n")]))
    body = b'{"error":{"code":401,"message":"User not found."}}'
    await stream.send(
        b"HTTP/1.1 401 Unauthorized\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    await anyio.sleep(0.05)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])  # asyncio's streams drop what was read
async def test_an_answer_sent_before_the_body_was_written_is_read(anyio_backend: str) -> None:
    """A long body the upstream refuses before reading it (401, 413): its answer,
    not a broken write, nor the request sent again on another connection."""
    async with raw_server(answer_early_then_close) as server, ConnectionPool() as pool:
        big = b"x" * (16 << 20)
        response = await pool.request(b"POST", server.url + "/", [], big, read_timeout=5)
        body = await response.aread()
        await response.aclose()
    assert response.status == 401 and b"User not found" in body
    assert server.connections == 1
    assert_quiet(pool)
