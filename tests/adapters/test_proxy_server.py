"""The proxy's HTTP/1.1 server (on trio) over real loopback sockets, with each parser.

Every test bounds its time with ``trio.fail_after``; timeouts under test are a
few tenths of a second, and the tests that check when one fired, or sleep to
let the server catch up, run on trio's ``MockClock`` (pytest-trio's
``autojump_clock``): their times are virtual and exact, and a sleep ends only
once every other task waits, on a loaded machine too. Run this file as a script for a load check:
``.venv/bin/python tests/adapters/test_proxy_server.py``.
"""

from __future__ import annotations

import gc
import json
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing

from keyrotor.adapters.proxy.server import ServerOptions, serve
from keyrotor.adapters.proxy.types import App, Request, Response

from .streams import Lookahead

# --------------------------------------------------------------------------- helpers

_PARSER = {"name": "h11"}


@pytest.fixture(autouse=True, params=["h11", "httptools"])
def parser(request: pytest.FixtureRequest) -> str:
    """Every test runs on both HTTP parsers: h11 (the reference) and httptools."""
    _PARSER["name"] = request.param
    return str(request.param)


@asynccontextmanager
async def running(
    app: App,
    *,
    log: Callable[[dict[str, Any]], None] | None = None,
    shutdown: trio.Event | None = None,
    **options: Any,
) -> AsyncIterator[int]:
    """Serve ``app`` on 127.0.0.1 for the block; yields the port. Cancelled at the end
    unless ``shutdown`` is given, in which case the block waits for ``serve`` to return."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            partial(
                serve,
                app,
                ServerOptions(port=0, **{"parser": _PARSER["name"], **options}),
                shutdown=shutdown,
                log=log,
            )
        )
        yield port
        if shutdown is None:
            nursery.cancel_scope.cancel()


@attrs.define
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def raw_request(
    method: str = "GET",
    target: str = "/",
    headers: tuple[tuple[str, str], ...] = (),
    body: bytes | None = None,
    version: str = "1.1",
) -> bytes:
    lines = [f"{method} {target} HTTP/{version}"]
    if version == "1.1":
        lines.append("Host: test")
    lines += [f"{name}: {value}" for name, value in headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


class Raw:
    """A bare client connection that parses what the server sends."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    @classmethod
    async def connect(cls, port: int) -> Raw:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError(bytes(self.buffer))
        self.buffer += data

    async def _until(self, separator: bytes) -> bytes:
        while (index := self.buffer.find(separator)) < 0:
            await self._fill()
        end = index + len(separator)
        data = bytes(self.buffer[:end])
        del self.buffer[:end]
        return data

    async def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            await self._fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def head(self) -> tuple[int, dict[str, str]]:
        lines = (await self._until(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        return status, headers

    async def chunk(self) -> bytes | None:
        """The next chunk's payload, None after the last one (and its trailer)."""
        size = int((await self._until(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await self._until(b"\r\n")
            return None
        data = await self._exactly(size)
        assert await self._exactly(2) == b"\r\n"
        return data

    async def response(self, method: str = "GET") -> Reply:
        status, headers = await self.head()
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif headers.get("transfer-encoding") == "chunked":
            chunks = []
            while (chunk := await self.chunk()) is not None:
                chunks.append(chunk)
            body = b"".join(chunks)
        elif "content-length" in headers:
            body = await self._exactly(int(headers["content-length"]))
        else:
            body = await self.rest()
        return Reply(status, headers, body)

    async def rest(self) -> bytes:
        """Everything up to EOF (a reset counts as EOF)."""
        try:
            while True:
                await self._fill()
        except (EOFError, trio.BrokenResourceError):
            pass
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    async def closed(self) -> bool:
        """Whether the server closed the connection with nothing more to read (then closed)."""
        rest = await self.rest()
        await self.aclose()
        return rest == b""

    async def aclose(self) -> None:
        await self.stream.aclose()


def error_of(reply: Reply) -> dict[str, Any]:
    assert reply.headers["content-type"] == "application/json"
    document = json.loads(reply.body)
    assert set(document) == {"error"}
    assert set(document["error"]) == {"message", "type"}
    error: dict[str, Any] = document["error"]
    return error


async def echo(request: Request) -> Response:
    return Response(
        status=200,
        headers=[("content-type", "text/plain"), ("x-client", request.client)],
        body=f"{request.method} {request.target} ".encode() + request.body,
    )


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


class Closer:
    """A ``Response.aclose`` that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.called = trio.Event()

    async def __call__(self) -> None:
        self.calls += 1
        self.called.set()


# --------------------------------------------------------------------------- options


def test_options_are_checked_when_built() -> None:
    assert ServerOptions().port == 8080
    for bad in (
        {"port": -1},
        {"port": 70000},
        {"header_timeout": 0},
        {"idle_timeout": -1.0},
        {"grace_period": -1},
        {"max_body_bytes": 0},
        {"max_connections": 1.5},
        {"max_header_bytes": True},
    ):
        with pytest.raises(ValueError, match="ServerOptions"):
            ServerOptions(**bad)
    with pytest.raises(TypeError, match="host"):
        ServerOptions(host=None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- requests


@pytest.mark.trio
async def test_get_and_post_with_httpx_on_one_connection() -> None:
    with trio.fail_after(5):
        async with running(echo) as port:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                first = await client.get("/v1/models?x=1")
                second = await client.post("/v1/chat", content=b'{"a": 1}')
                third = await client.post("/v1/chat", content=chunks(b"chun", b"ked"))
    assert first.status_code == 200
    assert first.text == "GET /v1/models?x=1 "
    assert second.text == 'POST /v1/chat {"a": 1}'
    assert third.text == "POST /v1/chat chunked"
    assert first.headers["content-length"] == str(len(first.content))
    assert "date" in first.headers and "server" not in first.headers
    ids = {r.headers["x-request-id"] for r in (first, second, third)}
    assert len(ids) == 3
    # one keep-alive connection served all three
    assert len({r.headers["x-client"] for r in (first, second, third)}) == 1


@pytest.mark.trio
async def test_keep_alive_and_chunked_request_bodies_on_a_raw_socket() -> None:
    with trio.fail_after(5):
        async with running(echo) as port:
            raw = await Raw.connect(port)
            await raw.send(raw_request("POST", "/a", body=b"hello"))
            first = await raw.response()
            await raw.send(
                b"POST /b HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nX-Trailer: 1\r\n\r\n"
            )
            second = await raw.response()
            await raw.send(raw_request("GET", "/c"))
            third = await raw.response()
            await raw.aclose()
    assert (first.status, first.body) == (200, b"POST /a hello")
    assert second.body == b"POST /b abcdefg"
    assert third.body == b"GET /c "
    assert first.headers["x-client"] == third.headers["x-client"]


@pytest.mark.trio
async def test_pipelined_requests_are_answered_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def app(request: Request) -> Response:
        if request.path == "/slow":
            await trio.sleep(0.05)
        return await echo(request)

    with trio.fail_after(5):
        async with running(app) as port:
            raw = await Raw.connect(port)
            await raw.send(
                raw_request("GET", "/slow")
                + raw_request("POST", "/b", body=b"bee")
                + raw_request("GET", "/c")
            )
            bodies = [(await raw.response()).body for _ in range(3)]
            await raw.aclose()
    assert bodies == [b"GET /slow ", b"POST /b bee", b"GET /c "]


@pytest.mark.trio
async def test_requests_pipelined_while_the_app_computes_wait_their_turn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def app(request: Request) -> Response:
        if request.path == "/slow":
            await trio.sleep(0.1)
        return await echo(request)

    with trio.fail_after(5):
        async with running(app, max_header_bytes=1024) as port:
            raw = await Raw.connect(port)
            await raw.send(raw_request("GET", "/slow"))
            await trio.sleep(0.02)  # the app is busy: these are read by the watching reader
            await raw.send(b"".join(raw_request("GET", f"/{n}") for n in range(40)))
            bodies = [(await raw.response()).body for _ in range(41)]
            await raw.aclose()
    assert bodies == [b"GET /slow "] + [f"GET /{n} ".encode() for n in range(40)]


@pytest.mark.trio
async def test_connection_close_and_http_1_0_are_honoured() -> None:
    async def app(request: Request) -> Response:
        if request.path == "/stream":

            async def chunks() -> AsyncIterator[bytes]:
                yield b"one "
                yield b"two"

            return Response(status=200, body=chunks())
        return await echo(request)

    with trio.fail_after(5):
        async with running(app) as port:
            raw = await Raw.connect(port)
            await raw.send(raw_request("GET", "/x", headers=(("Connection", "close"),)))
            closing = await raw.response()
            assert await raw.closed()

            raw = await Raw.connect(port)
            await raw.send(raw_request("GET", "/old", version="1.0"))
            old = await raw.response()
            assert await raw.closed()

            raw = await Raw.connect(port)
            await raw.send(raw_request("GET", "/stream", version="1.0"))
            streamed = await raw.response()  # close-delimited: no chunked for 1.0
            await raw.aclose()
    assert closing.headers["connection"] == "close"
    assert old.body == b"GET /old " and old.headers["connection"] == "close"
    assert "transfer-encoding" not in streamed.headers
    assert streamed.body == b"one two"


@pytest.mark.trio
async def test_expect_100_continue_is_answered() -> None:
    with trio.fail_after(5):
        async with running(echo) as port:
            raw = await Raw.connect(port)
            await raw.send(
                b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
            )
            interim, _ = await raw.head()
            await raw.send(b"body")
            final = await raw.response()
            await raw.aclose()
    assert interim == 100
    assert final.body == b"POST /e body"


@pytest.mark.trio
async def test_head_and_no_content_responses_carry_no_body() -> None:
    async def app(request: Request) -> Response:
        return Response(status=204 if request.path == "/none" else 200, body=b"twelve bytes")

    with trio.fail_after(5):
        async with running(app) as port:
            raw = await Raw.connect(port)
            await raw.send(raw_request("HEAD", "/"))
            head = await raw.response("HEAD")
            await raw.send(raw_request("GET", "/none"))
            none = await raw.response()
            await raw.send(raw_request("GET", "/"))
            full = await raw.response()
            await raw.aclose()
    assert head.headers["content-length"] == "12" and head.body == b""
    assert none.status == 204 and "content-length" not in none.headers
    assert full.body == b"twelve bytes"


# --------------------------------------------------------------------------- streaming


@pytest.mark.trio
async def test_each_chunk_is_sent_as_soon_as_it_is_yielded() -> None:
    release = trio.Event()
    closer = Closer()

    async def app(request: Request) -> Response:
        async def events() -> AsyncIterator[bytes]:
            yield b"data: one\n\n"
            await release.wait()  # only the client's receipt of the first chunk releases this
            yield b""  # empty chunks are skipped, not sent as the terminator
            yield b"data: two\n\n"

        return Response(
            status=200,
            headers=[("content-type", "text/event-stream")],
            body=events(),
            aclose=closer,
        )

    with trio.fail_after(5):
        async with running(app) as port:
            raw = await Raw.connect(port)
            await raw.send(raw_request("GET", "/sse"))
            status, headers = await raw.head()
            first = await raw.chunk()
            release.set()
            second = await raw.chunk()
            end = await raw.chunk()
            await closer.called.wait()
            await raw.aclose()
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    assert "content-length" not in headers
    assert (first, second, end) == (b"data: one\n\n", b"data: two\n\n", None)
    assert closer.calls == 1


@pytest.mark.trio
async def test_client_gone_mid_stream_stops_the_iterator_and_acloses_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    closer = Closer()
    iterator_closed = trio.Event()
    lines: list[dict[str, Any]] = []

    async def app(request: Request) -> Response:
        async def endless() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"tick\n"
                    await trio.sleep(0.01)
            finally:
                iterator_closed.set()

        return Response(status=200, body=endless(), aclose=closer)

    with trio.fail_after(5):
        async with running(app, log=lines.append) as port:
            raw = await Raw.connect(port)
            await raw.send(raw_request("GET", "/stream"))
            await raw.head()
            assert await raw.chunk() == b"tick\n"
            await raw.aclose()
            await closer.called.wait()
            await iterator_closed.wait()
            await trio.sleep(0.05)
    assert closer.calls == 1
    (line,) = [line for line in lines if "event" not in line]
    assert line["outcome"] == "client_gone" and line["status"] == 200


@pytest.mark.trio
async def test_client_gone_while_the_app_computes_cancels_the_app(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cancelled = trio.Event()
    lines: list[dict[str, Any]] = []

    async def app(request: Request) -> Response:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    with trio.fail_after(5):
        async with running(app, log=lines.append) as port:
            raw = await Raw.connect(port)
            await raw.send(raw_request("POST", "/v1/chat", body=b"{}"))
            await trio.sleep(0.05)
            await raw.aclose()
            await cancelled.wait()
            await trio.sleep(0.05)
    (line,) = lines
    assert (line["status"], line["outcome"], line["bytes_out"]) == (499, "client_gone", 0)


@pytest.mark.trio
async def test_a_stream_that_fails_truncates_the_body_and_acloses_once() -> None:
    closer = Closer()
    lines: list[dict[str, Any]] = []

    async def app(request: Request) -> Response:
        async def failing() -> AsyncIterator[bytes]:
            yield b"partial"
            raise RuntimeError("upstream broke")

        return Response(status=200, body=failing(), aclose=closer)

    with trio.fail_after(5):
        async with running(app, log=lines.append) as port:
            raw = await Raw.connect(port)
            await raw.send(raw_request("GET", "/"))
            await raw.head()
            assert await raw.chunk() == b"partial"
            with pytest.raises(EOFError):  # no terminating chunk: the client sees the break
                await raw.chunk()
            await raw.aclose()
    assert closer.calls == 1
    assert [line.get("event") for line in lines] == ["stream_error", None]
    assert lines[-1]["outcome"] == "stream_error"


def record_sends(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every write the server makes to a client socket, in order."""
    from keyrotor.adapters.proxy import sockets

    sent: list[bytes] = []
    send_now = sockets.Stream.send_now

    def recording(self: sockets.Stream, data: bytes) -> int:
        sent.append(bytes(data))
        return send_now(self, data)

    monkeypatch.setattr(sockets.Stream, "send_now", recording)
    return sent


@pytest.mark.trio
async def test_a_stream_whose_chunks_are_in_hand_goes_out_in_one_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent = record_sends(monkeypatch)

    async def app(request: Request) -> Response:
        return Response(status=200, body=Lookahead([b"data: a\n\n", b"data: b\n\n"]))

    with trio.fail_after(5):
        async with running(app) as port:
            raw = await Raw.connect(port)
            await raw.send(raw_request("GET", "/"))
            assert (await raw.head())[0] == 200
            assert [await raw.chunk(), await raw.chunk(), await raw.chunk()] == [
                b"data: a\n\n",
                b"data: b\n\n",
                None,
            ]
            await raw.aclose()
    (write,) = sent  # the head, both chunks and the last chunk together
    assert write.startswith(b"HTTP/1.1 200 ") and write.endswith(b"\r\n0\r\n\r\n")


@pytest.mark.trio
async def test_a_stream_never_holds_bytes_while_it_waits_for_the_next_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The second chunk is released only once the client holds the first: a
    # server that kept the head and the first chunk for a later write would
    # wait forever (the fail_after is only a hang guard).
    sent = record_sends(monkeypatch)
    body = Lookahead([b"data: a\n\n", b"data: b\n\n"], gated=1)

    async def app(request: Request) -> Response:
        return Response(status=200, body=body)

    with trio.fail_after(5):
        async with running(app) as port:
            raw = await Raw.connect(port)
            await raw.send(raw_request("GET", "/"))
            assert (await raw.head())[0] == 200
            assert await raw.chunk() == b"data: a\n\n"
            body.gate.set()
            assert (await raw.chunk(), await raw.chunk()) == (b"data: b\n\n", None)
            await raw.aclose()
    first, second = sent  # before the wait: head and chunk; after it: chunk and end
    assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(b"data: a\n\n\r\n")
    assert second == b"9\r\ndata: b\n\n\r\n0\r\n\r\n"


@pytest.mark.trio
async def test_a_connection_that_ends_leaves_nothing_for_the_garbage_collector() -> None:
    # A client that opens a connection a request: the codec's parser (httptools'
    # holds the codec's callbacks) is let go with it, not left in a cycle.
    n = 30

    async def one(port: int) -> None:
        raw = await Raw.connect(port)
        await raw.send(raw_request("GET", "/x", headers=(("Connection", "close"),)))
        assert (await raw.response()).status == 200
        assert await raw.closed()
        await raw.aclose()

    with trio.fail_after(10):
        async with running(echo) as port:
            for _ in range(5):  # warm up
                await one(port)
            gc.collect()
            gc.disable()
            try:
                for _ in range(n):
                    await one(port)
                await trio.testing.wait_all_tasks_blocked()  # the server's tasks are done
                found = gc.collect()
            finally:
                gc.enable()
    assert found < n, f"{found} objects in cycles after {n} connections"


@pytest.mark.trio
async def test_a_client_that_reads_nothing_is_dropped_after_body_timeout() -> None:
    closer = Closer()

    async def app(request: Request) -> Response:
        async def flood() -> AsyncIterator[bytes]:
            while True:
                yield b"x" * (1 << 20)

        return Response(status=200, body=flood(), aclose=closer)

    lines: list[dict[str, Any]] = []
    with trio.fail_after(5):
        async with running(app, log=lines.append, body_timeout=0.3) as port:
            raw = await Raw.connect(port)
            await raw.send(raw_request("GET", "/flood"))
            await closer.called.wait()  # never reading a byte
            await raw.aclose()
    assert closer.calls == 1
    assert lines[-1]["outcome"] == "write_timeout"


# --------------------------------------------------------------------------- bad requests


@pytest.mark.trio
@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: nope\r\n\r\n",
    ],
    ids=["garbage", "header", "no-host", "chunked", "content-length"],
)
async def test_malformed_requests_get_400_json_and_close(data: bytes) -> None:
    lines: list[dict[str, Any]] = []
    with trio.fail_after(5):
        async with running(echo, log=lines.append) as port:
            raw = await Raw.connect(port)
            await raw.send(data)
            reply = await raw.response()
            assert await raw.closed()
            raw = await Raw.connect(port)  # the server lives on
            await raw.send(raw_request("GET", "/ok"))
            assert (await raw.response()).status == 200
            await raw.aclose()
    assert reply.status == 400 and reply.headers["connection"] == "close"
    error = error_of(reply)
    assert error["type"] == "invalid_request_error"
    assert "Traceback" not in error["message"] and "garbage" not in error["message"]
    assert any(line.get("event") == "bad_request" for line in lines)


@pytest.mark.trio
async def test_connect_gets_405() -> None:
    with trio.fail_after(5):
        async with running(echo) as port:
            raw = await Raw.connect(port)
            await raw.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
            reply = await raw.response()
            assert await raw.closed()
    assert reply.status == 405
    assert error_of(reply)["type"] == "invalid_request_error"


@pytest.mark.trio
@pytest.mark.parametrize(
    "data",
    [b"GET /trunc", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc"],
    ids=["head", "body"],
)
async def test_a_truncated_request_then_eof_is_closed_quietly(data: bytes) -> None:
    lines: list[dict[str, Any]] = []
    with trio.fail_after(5):
        async with running(echo, log=lines.append) as port:
            raw = await Raw.connect(port)
            await raw.send(data)
            await raw.stream.send_eof()
            assert await raw.closed()
            raw = await Raw.connect(port)
            await raw.send(raw_request("GET", "/ok"))
            assert (await raw.response()).status == 200
            await raw.aclose()
    assert not any("event" in line for line in lines)


@pytest.mark.trio
@pytest.mark.parametrize("size", [2_000, 200_000], ids=["whole-in-one-read", "streamed"])
async def test_an_oversized_head_gets_431(size: int) -> None:
    with trio.fail_after(5):
        async with running(echo, max_header_bytes=1024) as port:
            raw = await Raw.connect(port)
            await raw.send(raw_request("GET", "/", headers=(("X-Big", "a" * size),)))
            reply = await raw.response()
            assert await raw.closed()
    assert reply.status == 431
    assert error_of(reply)["type"] == "invalid_request_error"


@pytest.mark.trio
@pytest.mark.parametrize("trusted", [True, False], ids=["admitted-before", "unknown"])
async def test_a_burst_past_the_per_address_cap_is_served_when_its_requests_are_there(
    trusted: bool,
) -> None:
    """Two silent connections hold the address's cap. From an address with an
    admitted connection open, a burst of five that sent their requests at once
    is still served; from an address without one (a flood), they are closed at
    once, as is another silent connection either way."""

    async def ok(request: Request) -> Response:
        return Response(status=200, body=b"ok")

    def status_of(sock: socket.socket) -> int:
        sock.settimeout(10)
        head = b""
        while b"\r\n" not in head:
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                data = b""
            if not data:
                return 0  # closed without an answer
            head += data
        return int(head.split(b" ")[1])

    def closed(sock: socket.socket) -> bool:
        sock.settimeout(10)
        try:
            return sock.recv(1) == b""
        except ConnectionResetError:
            return True

    async with running(ok, max_unproven_per_address=2) as port:
        address = ("127.0.0.1", port)
        first = await Raw.connect(port)
        if trusted:  # a request admitted, the connection kept open
            await first.send(raw_request("GET", "/first"))
            assert (await first.response()).status == 200
        # Plain blocking sockets, no await in between: every connection waits in the
        # listener's backlog, the talkers' requests with them, before any is accepted.
        silent = [socket.create_connection(address) for _ in range(2 if trusted else 1)]
        talkers = [socket.create_connection(address) for _ in range(5)]
        for sock in talkers:
            sock.sendall(raw_request("GET", "/x"))
        late = socket.create_connection(address)
        try:
            statuses = await trio.to_thread.run_sync(lambda: [status_of(s) for s in talkers])
            assert statuses == ([200] * 5 if trusted else [0] * 5)
            assert await trio.to_thread.run_sync(closed, late)
        finally:
            for sock in (*silent, *talkers, late):
                sock.close()
            await first.aclose()


@pytest.mark.trio
async def test_a_large_body_is_received_whole_at_once_or_in_pieces() -> None:
    """An agent's request of several MB: read in many pieces, those that are
    there at once without waiting, the others after a wait; the app gets it
    byte for byte either way."""

    async def digest(request: Request) -> Response:
        return Response(status=200, body=b"%d" % hash(request.body))

    body = bytes(range(256)) * (12 << 10)  # 3 MB
    async with running(digest) as port:
        raw = await Raw.connect(port)
        await raw.send(raw_request("POST", "/", body=body))  # at once
        assert (await raw.response()).body == b"%d" % hash(body)
        head, rest = raw_request("POST", "/", body=body).split(b"\r\n\r\n", 1)
        await raw.send(head + b"\r\n\r\n" + rest[:1000])
        for start in range(1000, len(rest), 1 << 20):  # in pieces, with waits between
            await trio.sleep(0.01)
            await raw.send(rest[start : start + (1 << 20)])
        assert (await raw.response()).body == b"%d" % hash(body)
        await raw.aclose()


@pytest.mark.trio
async def test_an_oversized_body_gets_413_declared_or_chunked() -> None:
    with trio.fail_after(5):
        async with running(echo, max_body_bytes=1000) as port:
            raw = await Raw.connect(port)  # declared: answered before the body is sent
            await raw.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5000000\r\n\r\n")
            declared = await raw.response()
            assert await raw.closed()

            raw = await Raw.connect(port)
            chunk = b"200\r\n" + b"x" * 512 + b"\r\n"
            await raw.send(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
            await raw.send(chunk * 3)
            chunked = await raw.response()
            assert await raw.closed()

            raw = await Raw.connect(port)  # to HEAD: the refusal's head, no body
            await raw.send(b"HEAD / HTTP/1.1\r\nHost: t\r\nContent-Length: 5000000\r\n\r\n")
            head_only = await raw.response("HEAD")
            assert await raw.closed()  # nothing after the head

            raw = await Raw.connect(port)  # exactly at the limit is fine
            await raw.send(raw_request("POST", "/", body=b"y" * 1000))
            fits = await raw.response()
            await raw.aclose()
    assert declared.status == chunked.status == head_only.status == 413
    assert "x-request-id" in declared.headers
    assert "1000" in error_of(chunked)["message"]
    assert fits.status == 200


@pytest.mark.trio
async def test_app_errors_get_500_json_and_the_connection_serves_on() -> None:
    async def app(request: Request) -> Response:
        if request.path == "/raise":
            raise RuntimeError("boom with private details")
        if request.path == "/bad-header":
            return Response(status=200, headers=[("x-bad", "line\r\nbreak")])
        if request.path == "/not-a-response":
            return "nope"  # type: ignore[return-value]
        return await echo(request)

    lines: list[dict[str, Any]] = []
    with trio.fail_after(5):
        async with running(app, log=lines.append) as port:
            raw = await Raw.connect(port)
            replies = []
            for path in ("/raise", "/bad-header", "/not-a-response", "/fine"):
                await raw.send(raw_request("GET", path))
                replies.append(await raw.response())
            await raw.aclose()
    assert [reply.status for reply in replies] == [500, 500, 500, 200]
    for reply in replies[:3]:
        assert error_of(reply) == {"message": "Internal server error", "type": "server_error"}
    errors = [line for line in lines if line.get("event") == "app_error"]
    assert len(errors) == 3 and "RuntimeError" in errors[0]["error"]
    access = [line for line in lines if "event" not in line]
    assert [line["status"] for line in access] == [500, 500, 500, 200]


# --------------------------------------------------------------------------- timeouts and limits


@pytest.mark.trio
async def test_a_head_sent_byte_by_byte_is_cut_off_at_header_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    data = raw_request("GET", "/", headers=(("X-Pad", "p" * 100),))
    with trio.fail_after(5):
        async with running(echo, header_timeout=0.3) as port:
            raw = await Raw.connect(port)
            start = trio.current_time()
            async with trio.open_nursery() as nursery:

                async def drip() -> None:
                    for byte in data[:-1]:  # never complete, ~2.5 s if left alone
                        try:
                            await raw.send(bytes([byte]))
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            return  # the server cut us off (or we saw it and closed)
                        await trio.sleep(0.02)

                nursery.start_soon(drip)
                assert await raw.closed()
                nursery.cancel_scope.cancel()
            elapsed = trio.current_time() - start
    # Virtual time (autojump_clock): exact, whatever the machine's load.
    assert elapsed == pytest.approx(0.3, abs=0.025)  # not the ~2.5 s of the whole drip


@pytest.mark.trio
async def test_an_idle_keep_alive_connection_is_closed_after_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(5):
        async with running(echo, idle_timeout=0.2, header_timeout=2.0) as port:
            raw = await Raw.connect(port)
            await raw.send(raw_request("GET", "/"))
            await raw.response()
            start = trio.current_time()
            assert await raw.closed()
            elapsed = trio.current_time() - start
    assert elapsed == pytest.approx(0.2, abs=0.025)  # virtual time: exact


@pytest.mark.trio
async def test_a_request_in_time_ends_the_keep_alive_wait_and_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The keep-alive deadline (0.2 s after a response) belongs to that wait only: a
    # request that came in time and takes longer than it is answered in full.
    async def slow(request: Request) -> Response:
        await trio.sleep(0.5)
        return await echo(request)

    with trio.fail_after(5):
        async with running(slow, idle_timeout=0.2) as port:
            raw = await Raw.connect(port)
            await raw.send(raw_request("GET", "/first"))
            assert (await raw.response()).status == 200
            await trio.sleep(0.15)
            await raw.send(raw_request("POST", "/second", body=b"late"))
            second = await raw.response()
            start = trio.current_time()
            assert await raw.closed()  # then the next keep-alive wait times out
            elapsed = trio.current_time() - start
    assert (second.status, second.body) == (200, b"POST /second late")
    assert elapsed == pytest.approx(0.2, abs=0.025)


@pytest.mark.trio
async def test_connections_over_max_connections_are_closed_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lines: list[dict[str, Any]] = []
    with trio.fail_after(5):
        async with running(echo, log=lines.append, max_connections=1) as port:
            first = await Raw.connect(port)
            await first.send(raw_request("GET", "/1"))
            await first.response()
            extra = await Raw.connect(port)
            assert await extra.closed()
            await first.aclose()
            await trio.sleep(0.05)
            again = await Raw.connect(port)
            await again.send(raw_request("GET", "/2"))
            assert (await again.response()).status == 200
            await again.aclose()
    assert any(line.get("event") == "connection_limit" for line in lines)


# --------------------------------------------------------------------------- shutdown


@pytest.mark.trio
async def test_shutdown_lets_a_stream_finish_and_refuses_new_connections() -> None:
    shutdown = trio.Event()
    go_on = trio.Event()
    closer = Closer()

    async def app(request: Request) -> Response:
        if request.path == "/slow-bytes":
            await go_on.wait()
            return Response(status=200, body=b"late")

        async def chunks() -> AsyncIterator[bytes]:
            yield b"one"
            await go_on.wait()
            yield b"two"

        return Response(status=200, body=chunks(), aclose=closer)

    with trio.fail_after(5):
        async with running(app, shutdown=shutdown, grace_period=3.0) as port:
            streaming = await Raw.connect(port)
            await streaming.send(raw_request("GET", "/stream"))
            await streaming.head()
            assert await streaming.chunk() == b"one"
            computing = await Raw.connect(port)
            await computing.send(raw_request("GET", "/slow-bytes"))
            await trio.testing.wait_all_tasks_blocked()

            shutdown.set()
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", port)
            go_on.set()
            assert await streaming.chunk() == b"two"
            assert await streaming.chunk() is None
            assert await streaming.closed()
            late = await computing.response()
            assert await computing.closed()
        # the block exits once serve has returned
    assert closer.calls == 1
    assert late.body == b"late" and late.headers["connection"] == "close"


@pytest.mark.trio
async def test_shutdown_closes_idle_connections_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shutdown = trio.Event()
    events: list[dict[str, Any]] = []
    with trio.fail_after(5):
        async with running(echo, shutdown=shutdown, grace_period=3.0, log=events.append) as port:
            idle = await Raw.connect(port)
            await idle.send(raw_request("GET", "/"))
            await idle.response()
            fresh = await Raw.connect(port)
            await trio.testing.wait_all_tasks_blocked()
            shutdown.set()
            assert await idle.closed()
            assert await fresh.closed()
    # Closed by the drain itself, not when the 3 s grace period ran out.
    assert {"event": "draining", "connections": 2} in events
    assert not [e for e in events if e.get("event") == "grace_period_expired"]


@pytest.mark.trio
async def test_after_the_grace_period_an_endless_stream_is_cancelled_and_aclosed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shutdown = trio.Event()
    closer = Closer()
    lines: list[dict[str, Any]] = []

    async def app(request: Request) -> Response:
        async def endless() -> AsyncIterator[bytes]:
            while True:
                yield b"tick"
                await trio.sleep(0.01)

        return Response(status=200, body=endless(), aclose=closer)

    with trio.fail_after(5):
        async with running(app, log=lines.append, shutdown=shutdown, grace_period=0.2) as port:
            raw = await Raw.connect(port)
            await raw.send(raw_request("GET", "/forever"))
            await raw.head()
            await raw.chunk()
            start = trio.current_time()
            shutdown.set()
        elapsed = trio.current_time() - start
        await raw.aclose()
    assert elapsed == pytest.approx(0.2, abs=0.025)  # virtual time: the grace period
    assert closer.calls == 1
    (line,) = [line for line in lines if "event" not in line]
    assert (line["status"], line["outcome"]) == (200, "cancelled")
    events = [line["event"] for line in lines if "event" in line]
    assert events == ["draining", "grace_period_expired"]


@pytest.mark.trio
async def test_run_serves_until_sigterm_then_returns() -> None:
    code = (
        "import json\n"
        "from keyrotor.adapters.proxy.server import ServerOptions, run\n"
        "from keyrotor.adapters.proxy.types import Response\n"
        "async def app(request):\n"
        "    return Response(status=200, body=b'ok')\n"
        "run(app, ServerOptions(port=0), log=lambda line: print(json.dumps(line), flush=True))\n"
        "print('returned', flush=True)\n"
    )
    with trio.fail_after(10):
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", code], stdout=subprocess.PIPE
        )
        assert process.stdout is not None
        output = Raw(process.stdout)  # type: ignore[arg-type]
        try:
            listening = json.loads(await output._until(b"\n"))
            assert listening["event"] == "listening"
            raw = await Raw.connect(listening["port"])
            await raw.send(raw_request("GET", "/"))
            assert (await raw.response()).body == b"ok"
            await raw.aclose()
            process.send_signal(signal.SIGTERM)
            rest = (await output.rest()).decode()
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.stdout.aclose()
    *lines, last = rest.splitlines()
    records = [json.loads(line) for line in lines]
    assert [record["path"] for record in records if "event" not in record] == ["/"]
    assert [record["event"] for record in records if "event" in record] == ["shutdown", "draining"]
    assert last == "returned"


# --------------------------------------------------------------------------- logging


@pytest.mark.trio
async def test_one_log_line_per_request_and_never_a_header_or_query() -> None:
    async def app(request: Request) -> Response:
        return Response(status=201, body=b"{}", log={"model": "m-1", "status": "not mine"})

    lines: list[dict[str, Any]] = []
    with trio.fail_after(5):
        async with running(app, log=lines.append) as port:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                replies = [
                    await client.post(
                        "/v1/chat/completions?api_key=query-secret",
                        headers={"Authorization": "Bearer secret-xyz"},
                        content=b'{"messages": "body-secret"}',
                    )
                    for _ in range(3)
                ]
    assert len(lines) == 3
    for reply, line in zip(replies, lines, strict=True):
        assert set(line) == {
            "request_id",
            "method",
            "path",
            "status",
            "duration_ms",
            "bytes_out",
            "client",
            "model",
        }
        assert line["request_id"] == reply.headers["x-request-id"]
        assert line["method"] == "POST" and line["path"] == "/v1/chat/completions"
        assert line["status"] == 201 and line["model"] == "m-1"
        assert line["bytes_out"] > 2 and line["duration_ms"] >= 0
        assert re.fullmatch(r"127\.0\.0\.1:\d+", line["client"])
    text = repr(lines)
    for secret in ("secret-xyz", "query-secret", "body-secret"):
        assert secret not in text


# --------------------------------------------------------------------------- load check (by hand)


def _load_check(seconds: float = 3.0, connections: int = 32) -> None:
    """Requests/s of a trivial app: the server in a child process, raw keep-alive clients here."""
    import multiprocessing

    def server_main(conn: Any) -> None:
        async def app(request: Request) -> Response:
            return Response(status=200, body=b"ok")

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(partial(serve, app, ServerOptions(port=0)))
                conn.send(port)

        trio.run(main)

    parent, child = multiprocessing.Pipe()
    process = multiprocessing.get_context("fork").Process(target=server_main, args=(child,))
    process.start()
    port = parent.recv()
    request = b"GET /ok HTTP/1.1\r\nHost: bench\r\n\r\n"

    async def client(deadline: float, counts: list[int]) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        buffer = b""
        n = 0
        while trio.current_time() < deadline:
            await stream.send_all(request)
            while True:
                end = buffer.find(b"\r\n\r\n")
                if end >= 0 and len(buffer) >= end + 6:  # head plus the 2-byte body
                    buffer = buffer[end + 6 :]
                    break
                buffer += await stream.receive_some(65536)
            n += 1
        counts.append(n)
        await stream.aclose()

    async def measure(clients: int) -> float:
        counts: list[int] = []
        deadline = trio.current_time() + seconds
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(client, deadline, counts)
        return sum(counts) / seconds

    try:
        sequential = trio.run(measure, 1)
        concurrent = trio.run(measure, connections)
    finally:
        process.terminate()
        process.join()
    print(f"1 keep-alive connection, sequential: {sequential:,.0f} requests/s")
    print(f"{connections} keep-alive connections:         {concurrent:,.0f} requests/s")


if __name__ == "__main__":
    _load_check()


@pytest.mark.trio
async def test_a_fresh_connection_may_wait_past_header_timeout_before_its_first_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Clients and load balancers open connections ahead of time: only the
    # idle timeout applies until the first byte of a request arrives.
    with trio.fail_after(5):
        async with running(echo, header_timeout=0.2, idle_timeout=3.0) as port:
            raw = await Raw.connect(port)
            await trio.sleep(0.5)
            await raw.send(raw_request("GET", "/"))
            reply = await raw.response()
            await raw.aclose()
    assert reply.status == 200
