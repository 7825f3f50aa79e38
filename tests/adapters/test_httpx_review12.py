"""The httpx transports (review 12): header bytes both ways, httpx's read timeout,
the pool closed mid-stream, SDK key headers kept in the process, and a delivered
response freed whatever goes wrong while handing it to httpx."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import httpx
import openai
import pytest

import keyrotor.adapters.httpx as adapter
from keyrotor.adapters.httpx import AsyncPoolTransport, PoolTransport, _forwarded_headers
from keyrotor.core import KeySpec, PoolConfig
from keyrotor.testing import FakeUpstream, Hang, Reply, Scenario, SlowStream
from keyrotor.transports._async import AsyncClient
from keyrotor.transports.sync import Client

SECRET = "sk-or-v1-httpx-review12-000000000001"
BASE = "http://keyrotor/v1"
CHAT: dict[str, Any] = {
    "model": "openai/gpt-4o-mini",
    "messages": [{"role": "user", "content": "hi"}],
}
ANSWER = {"id": "x", "choices": [{"message": {"role": "assistant", "content": "hi"}}]}
CAFE = "Café".encode()  # UTF-8 bytes in a header: relayed as they are
HANG_GUARD = 60  # seconds; only ever reached when a test would hang


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def one_key(behaviour: Any) -> Scenario:
    return Scenario().add(SECRET, behaviour, alias="k1")


def single() -> PoolConfig:
    # One request at a time: a request left in flight would block every later one.
    return PoolConfig(keys=[KeySpec(key_id="k1", max_in_flight=1)], queue_timeout=5.0)


@asynccontextmanager
async def echo_upstream() -> AsyncIterator[str]:
    """A loopback upstream answering each request with its header lines (as
    latin-1 text, so the bytes can be compared), as JSON."""

    async def answer(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive()
            head, body = data.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")[1:]
            fields = dict(line.partition(b":")[::2] for line in lines)
            length = int({k.lower(): v for k, v in fields.items()}.get(b"content-length", 0))
            while len(body) < length:
                body += await stream.receive()
            payload = json.dumps([line.decode("latin-1") for line in lines]).encode()
            await stream.send(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(payload), payload)
            )

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, answer)
        try:
            yield f"http://127.0.0.1:{port}/api/v1"
        finally:
            tasks.cancel_scope.cancel()


# ------------------------------------------------------------------ request headers


def test_sdk_key_headers_stay_here() -> None:
    """Azure- and Anthropic-style SDKs put their key in ``api-key`` / ``x-api-key``."""
    request = httpx.Request(
        "POST",
        f"{BASE}/chat/completions",
        headers={"api-key": "placeholder-a", "X-Api-Key": "placeholder-b", "x-title": "app"},
        content=b"{}",
    )
    headers = _forwarded_headers(request)
    assert headers == {"x-title": "app"}


@pytest.mark.anyio
async def test_request_header_bytes_reach_the_upstream_unchanged() -> None:
    sent = {b"x-title": CAFE, b"x-note": "Coffee ☕".encode()}  # the second is outside latin-1
    with anyio.fail_after(HANG_GUARD):
        async with (
            echo_upstream() as url,
            AsyncClient({"k1": SECRET}, base_url=url) as pool,
            httpx.AsyncClient(transport=AsyncPoolTransport(pool), base_url=BASE) as http,
        ):
            response = await http.post("/chat/completions", json=CHAT, headers=sent)
            assert response.status_code == 200
            received = {}
            for line in response.json():
                name, _, value = line.encode("latin-1").partition(b":")
                received[name.lower()] = value.strip()
            assert received[b"x-title"] == sent[b"x-title"]
            assert received[b"x-note"] == sent[b"x-note"]
            assert pool.status()["stats"]["inFlight"] == 0


# ------------------------------------------------------------------ response headers


@pytest.mark.anyio
async def test_async_non_ascii_response_header_is_relayed_byte_for_byte() -> None:
    reply = Reply(200, headers={"x-provider": "Café"}, body=ANSWER)  # sent as UTF-8
    with anyio.fail_after(HANG_GUARD):
        async with (
            FakeUpstream(one_key(reply)).serve() as server,
            AsyncClient({"k1": SECRET}, base_url=server.url, config=single()) as pool,
            httpx.AsyncClient(transport=AsyncPoolTransport(pool), base_url=BASE) as http,
        ):
            for _ in range(2):  # the first one did not keep the key
                response = await http.post("/chat/completions", json=CHAT)
                assert response.status_code == 200
                assert (b"x-provider", CAFE) in response.headers.raw
                assert response.json() == ANSWER
            assert pool.status()["stats"]["inFlight"] == 0


def test_sync_non_ascii_response_header_is_relayed_byte_for_byte() -> None:
    reply = Reply(200, headers={"x-provider": "Café"}, body=ANSWER)
    with (
        FakeUpstream.running_in_thread(one_key(reply)) as server,
        Client({"k1": SECRET}, base_url=server.url, config=single()) as pool,
        httpx.Client(transport=PoolTransport(pool), base_url=BASE) as http,
    ):
        for _ in range(2):
            response = http.post("/chat/completions", json=CHAT)
            assert (b"x-provider", CAFE) in response.headers.raw
            assert response.json() == ANSWER
        assert pool.status()["stats"]["inFlight"] == 0


def _broken_answer(*args: object) -> httpx.Response:
    raise RuntimeError("cannot build the response")


@pytest.mark.anyio
async def test_async_response_that_cannot_be_built_frees_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with anyio.fail_after(HANG_GUARD):
        async with (
            FakeUpstream(one_key(Reply(200, body=ANSWER))).serve() as server,
            AsyncClient({"k1": SECRET}, base_url=server.url, config=single()) as pool,
            httpx.AsyncClient(transport=AsyncPoolTransport(pool), base_url=BASE) as http,
        ):
            with monkeypatch.context() as patch:
                patch.setattr(adapter, "_answer", _broken_answer)
                with pytest.raises(RuntimeError, match="cannot build"):
                    await http.post("/chat/completions", json=CHAT)
            assert pool.status()["stats"]["inFlight"] == 0
            assert (await http.post("/chat/completions", json=CHAT)).status_code == 200


def test_sync_response_that_cannot_be_built_frees_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with (
        FakeUpstream.running_in_thread(one_key(Reply(200, body=ANSWER))) as server,
        Client({"k1": SECRET}, base_url=server.url, config=single()) as pool,
        httpx.Client(transport=PoolTransport(pool), base_url=BASE) as http,
    ):
        with monkeypatch.context() as patch:
            patch.setattr(adapter, "_answer", _broken_answer)
            with pytest.raises(RuntimeError, match="cannot build"):
                http.post("/chat/completions", json=CHAT)
        assert pool.status()["stats"]["inFlight"] == 0
        assert http.post("/chat/completions", json=CHAT).status_code == 200


# ------------------------------------------------------------------ read timeout


@pytest.mark.anyio
async def test_read_timeout_bounds_the_wait_for_the_head() -> None:
    """An upstream that never answers: httpx's read timeout ends the wait
    (the SDK's ``timeout`` too, as its ``APITimeoutError``), and the key is freed."""
    with anyio.fail_after(HANG_GUARD):
        async with (
            FakeUpstream(one_key(Hang())).serve() as server,
            AsyncClient({"k1": SECRET}, base_url=server.url) as pool,
        ):
            http = httpx.AsyncClient(transport=AsyncPoolTransport(pool), base_url=BASE)
            async with http:
                with pytest.raises(httpx.ReadTimeout):
                    await http.post("/chat/completions", json=CHAT, timeout=0.3)
                assert pool.status()["stats"]["inFlight"] == 0
                sdk = openai.AsyncOpenAI(
                    base_url=BASE,
                    api_key="placeholder",
                    http_client=http,  # type: ignore[arg-type]
                    max_retries=0,
                    timeout=0.3,
                )
                with pytest.raises(openai.APITimeoutError):
                    await sdk.chat.completions.create(**CHAT)
                assert pool.status()["stats"]["inFlight"] == 0


@pytest.mark.anyio
async def test_read_timeout_counts_the_wait_for_a_key() -> None:
    """The only key busy: the read timeout ends the wait before ``queue_timeout``,
    leaving nothing queued, and the key serves the next request once free."""
    stream_chat = {**CHAT, "stream": True, "max_tokens": 20}
    with anyio.fail_after(HANG_GUARD):
        async with (
            FakeUpstream(one_key(SlowStream(0.01))).serve() as server,
            AsyncClient({"k1": SECRET}, base_url=server.url, config=single()) as pool,
            httpx.AsyncClient(transport=AsyncPoolTransport(pool), base_url=BASE) as http,
        ):
            async with http.stream("POST", "/chat/completions", json=stream_chat):
                with pytest.raises(httpx.ReadTimeout):
                    await http.post("/chat/completions", json=CHAT, timeout=0.3)
                assert pool.status()["stats"]["queued"] == 0
            assert pool.status()["stats"]["inFlight"] == 0
            response = await http.post("/chat/completions", json=stream_chat, timeout=None)
            assert response.status_code == 200 and response.content


class _StalledBody:
    """A delivered response whose body never sends a byte."""

    def __init__(self) -> None:
        self.closed = False

    def aiter_bytes(self) -> _StalledBody:
        return self

    async def __anext__(self) -> bytes:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        self.closed = True


@pytest.mark.anyio
async def test_read_timeout_bounds_each_read_of_the_body() -> None:
    upstream = _StalledBody()
    request = httpx.Request("POST", f"{BASE}/chat/completions")
    body = adapter._AsyncBody(upstream, request, 0.01)  # type: ignore[arg-type]
    with anyio.fail_after(HANG_GUARD), pytest.raises(httpx.ReadTimeout):
        await anext(body)
    assert upstream.closed  # the upstream request dropped, the key freed


@pytest.mark.anyio
async def test_no_read_timeout_is_no_bound() -> None:
    with anyio.fail_after(HANG_GUARD):
        async with (
            FakeUpstream(one_key(Reply(200, body=ANSWER))).serve() as server,
            AsyncClient({"k1": SECRET}, base_url=server.url) as pool,
            httpx.AsyncClient(
                transport=AsyncPoolTransport(pool), base_url=BASE, timeout=None
            ) as http,
        ):
            assert (await http.post("/chat/completions", json=CHAT)).json() == ANSWER


# ------------------------------------------------------------------ pool closed mid-stream


@pytest.mark.anyio
async def test_async_pool_closed_mid_stream_is_a_read_error() -> None:
    stream_chat = {**CHAT, "stream": True, "max_tokens": 20}
    with anyio.fail_after(HANG_GUARD):
        async with (
            FakeUpstream(one_key(SlowStream(3600))).serve() as server,  # one event, then none
            AsyncClient({"k1": SECRET}, base_url=server.url) as pool,
            httpx.AsyncClient(transport=AsyncPoolTransport(pool), base_url=BASE) as http,
            http.stream("POST", "/chat/completions", json=stream_chat) as response,
        ):
            chunks = response.aiter_bytes()
            assert await anext(chunks)
            await pool.aclose()  # e.g. the application shutting down
            with pytest.raises(httpx.ReadError):
                await anext(chunks)


def test_sync_pool_closed_mid_stream_is_a_read_error() -> None:
    stream_chat = {**CHAT, "stream": True, "max_tokens": 20}
    with (
        FakeUpstream.running_in_thread(one_key(SlowStream(3600))) as server,
        Client({"k1": SECRET}, base_url=server.url) as pool,
        httpx.Client(transport=PoolTransport(pool), base_url=BASE) as http,
        http.stream("POST", "/chat/completions", json=stream_chat) as response,
    ):
        chunks: Iterator[bytes] = response.iter_bytes()
        assert next(chunks)
        pool.close()
        with pytest.raises(httpx.ReadError):
            next(chunks)
