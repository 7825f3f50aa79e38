"""The pool's head deadline and early answers (review 14): raw servers on
127.0.0.1, on asyncio and trio (trio on a MockClock where a time is checked),
with both HTTP parsers."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.abc
import pytest
import trio
import trio.testing

from keyrotor.transports import codec as http_codec
from keyrotor.transports._h11pool import ConnectionPool, ReadTimeout
from keyrotor.transports.asyncio import Client
from keyrotor.transports.codec import codecs

from .test_h11pool import RawServer, assert_quiet, raw_server, read_head

pytestmark = pytest.mark.anyio

GUARD = 10  # seconds: a hang guard only, never reached when the test passes
VIRTUAL_TRIO = "trio-mock-clock"


@pytest.fixture(autouse=True, params=["h11", "httptools"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    chosen = codecs(request.param)
    monkeypatch.setattr(http_codec, "codecs", lambda name: chosen)
    return str(request.param)


@pytest.fixture(params=["asyncio", "trio", VIRTUAL_TRIO])
def anyio_backend(request: pytest.FixtureRequest) -> str | tuple[str, dict[str, Any]]:
    if request.param == VIRTUAL_TRIO:
        return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})
    return str(request.param)


def virtual(anyio_backend: str | tuple[str, dict[str, Any]]) -> bool:
    return isinstance(anyio_backend, tuple)


# ------------------------------------------------- 1. the head's deadline


async def interim_then_nothing(stream: anyio.abc.ByteStream, server: RawServer) -> None:
    """An interim answer (``GET /100`` or ``/103``), then silence."""
    head = await read_head(stream, bytearray())
    status = head.split(b" ")[1].strip(b"/")
    await stream.send(b"HTTP/1.1 %s Interim\r\nlink: </a.css>; rel=preload\r\n\r\n" % status)
    await anyio.sleep_forever()


async def trickled_head(stream: anyio.abc.ByteStream, server: RawServer) -> None:
    """A head that never ends, one byte every 10 ms."""
    await read_head(stream, bytearray())
    for byte in b"HTTP/1.1 200 OK\r\nx-a: " + b"a" * 100_000:
        await stream.send(bytes([byte]))
        await anyio.sleep(0.01)


@pytest.mark.parametrize("path", ["/100", "/103", "/trickle"])
async def test_head_timeout_bounds_the_whole_head_interim_answers_and_trickles_included(
    anyio_backend: str | tuple[str, dict[str, Any]], path: str
) -> None:
    """``head_timeout`` ends the wait for the final head even when bytes came
    (an interim 1xx, a head sent byte by byte); ``read_timeout`` is far off."""
    handler = trickled_head if path == "/trickle" else interim_then_nothing
    with anyio.fail_after(GUARD):
        async with raw_server(handler) as server, ConnectionPool() as pool:
            start = anyio.current_time()
            with pytest.raises(ReadTimeout, match="head"):
                await pool.request(
                    b"GET", server.url + path, [], read_timeout=1000.0, head_timeout=0.1
                )
            if virtual(anyio_backend):
                assert anyio.current_time() - start == pytest.approx(0.1)
            assert_quiet(pool, open_=0)


async def slow_interim(stream: anyio.abc.ByteStream, server: RawServer) -> None:
    """100 Continue at once, the final answer 0.3 s later."""
    await read_head(stream, bytearray())
    await stream.send(b"HTTP/1.1 100 Continue\r\n\r\n")
    await anyio.sleep(0.3)
    await stream.send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")


@pytest.mark.parametrize("anyio_backend", [VIRTUAL_TRIO], indirect=True)
async def test_read_timeout_still_bounds_each_wait_within_the_head() -> None:
    """Within the head's deadline each wait is still bounded by ``read_timeout``;
    an answer within both is read."""
    with anyio.fail_after(GUARD):
        async with raw_server(slow_interim) as server, ConnectionPool() as pool:
            start = anyio.current_time()
            with pytest.raises(ReadTimeout):
                await pool.request(b"GET", server.url, [], read_timeout=0.2, head_timeout=5.0)
            assert anyio.current_time() - start == pytest.approx(0.2)
            response = await pool.request(
                b"GET", server.url, [], read_timeout=0.5, head_timeout=5.0
            )
            assert response.status == 200
            assert await response.aread() == b"ok"
            assert_quiet(pool)


# ------------------------------------------------- 2. an answer before the body is in


async def refuse_early(stream: anyio.abc.ByteStream, server: RawServer) -> None:
    """A 413 as soon as the head is in, then close with the body unread (a reset)."""
    buffer = bytearray()
    while b"\r\n\r\n" not in buffer:
        buffer += await stream.receive()
    server.heads.append(bytes(buffer[: buffer.index(b"\r\n\r\n")]))
    body = b'{"error":{"code":413,"message":"Request too large."}}'
    await stream.send(b"HTTP/1.1 413 Too Large\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    await anyio.sleep(0.05)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"], indirect=True)
async def test_an_early_answer_to_a_large_body_is_read_on_both_backends() -> None:
    """The upstream answers (413) and closes before reading an 8 MiB body: the
    caller gets that answer, not a broken write (nor a retry)."""
    with anyio.fail_after(GUARD):
        async with raw_server(refuse_early) as server, ConnectionPool() as pool:
            big = b"x" * (8 << 20)
            response = await pool.request(b"POST", server.url + "/", [], big, read_timeout=5)
            body = await response.aread()
            await response.aclose()
            assert response.status == 413 and b"too large" in body
            assert server.connections == 1
            assert_quiet(pool, open_=0)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"], indirect=True)
@pytest.mark.parametrize("parser", ["auto"], indirect=True)
async def test_the_async_client_delivers_an_early_413_without_blaming_the_key() -> None:
    """Through the async client: the upstream's 413, its only attempt, and no
    transport error counted against the key."""
    with anyio.fail_after(GUARD):
        async with raw_server(refuse_early) as server:
            async with Client({"a": "sk-test-early-answer"}, server.url) as client:
                answer = await client.request("POST", "/chat/completions", content=b"x" * (8 << 20))
                status = client.status()
    assert answer.status_code == 413 and b"too large" in answer.content
    assert answer.attempts == 1 and server.connections == 1
    assert status["keys"][0]["errors"]["transport"] == 0
