"""The proxy application, driven directly (no HTTP server) against the fake upstream."""

from __future__ import annotations

import gc
import json
import re
from collections.abc import AsyncIterator

import pytest

from keyrotor.adapters.proxy.app import ProxyApp
from keyrotor.adapters.proxy.types import Request, Response
from keyrotor.core import KeySpec, PoolConfig
from keyrotor.testing import (
    WINDOW_START,
    FakeClock,
    FakeUpstream,
    Invalid,
    Ok,
    RateLimit,
    Reply,
    Scenario,
    SlowStream,
    Truncate,
)
from keyrotor.transports._async import AsyncClient

pytestmark = pytest.mark.anyio

SECRETS = {
    "good": "sk-or-v1-proxy-good-000000000000001",
    "bad": "sk-or-v1-proxy-bad-0000000000000002",
    "busy": "sk-or-v1-proxy-busy-000000000000003",
    "picky": "sk-or-v1-proxy-picky-00000000000004",
    "cut": "sk-or-v1-proxy-cut-0000000000000005",
}
CHAT = json.dumps({"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def scenario(**behaviours: object) -> Scenario:
    sc = Scenario()
    for alias, behaviour in behaviours.items():
        sc.add(SECRETS[alias], behaviour, alias=alias)  # type: ignore[arg-type]
    return sc


def post(path: str, body: str | bytes, **headers: str) -> Request:
    raw = body.encode() if isinstance(body, str) else body
    pairs = [("content-type", "application/json"), *headers.items()]
    return Request(method="POST", target=path, headers=pairs, body=raw)


def get(path: str) -> Request:
    return Request(method="GET", target=path, headers=[], body=b"")


async def body_of(response: Response) -> bytes:
    if isinstance(response.body, bytes):
        return response.body
    chunks = [chunk async for chunk in response.body]
    if response.aclose is not None:
        await response.aclose()
    return b"".join(chunks)


async def proxy(server: FakeUpstream, *aliases: str, **options: bool) -> AsyncIterator[ProxyApp]:
    # A short wait for a key: a request the pool cannot serve within 1 s is rejected.
    config = PoolConfig(keys=[KeySpec(key_id=a) for a in aliases], queue_timeout=1.0)
    async with AsyncClient({a: SECRETS[a] for a in aliases}, server.url, config) as client:
        yield ProxyApp(client, **options)


async def test_chat_is_forwarded_with_failover_invisible() -> None:
    async with FakeUpstream(scenario(bad=Invalid(), good=Ok())).serve() as server:
        async for app in proxy(server, "bad", "good"):
            response = await app(post("/v1/chat/completions", CHAT, authorization="Bearer mine"))
            payload = json.loads(await body_of(response))
            headers = dict(response.headers)
            status = app.status()
    assert response.status == 200
    assert payload["choices"][0]["message"]["content"]
    assert headers["x-keyrotor-key"] == "good" and headers["x-keyrotor-attempts"] == "2"
    assert response.log == {"key": "good", "attempts": 2, "upstream_status": 200}
    assert [entry.key for entry in server.log if entry.path.endswith("completions")] == [
        "bad",
        "good",
    ]
    assert status["stats"]["failovers"] == 1
    assert status["totalKeys"] == 2 and status["health"]["failed"] == 1


async def test_stream_is_relayed_chunk_by_chunk() -> None:
    body = json.dumps({"model": "m", "messages": [], "stream": True, "max_tokens": 5})
    async with FakeUpstream(scenario(good=SlowStream(chunk_delay=0.02))).serve() as server:
        async for app in proxy(server, "good"):
            response = await app(post("/v1/chat/completions", body))
            assert not isinstance(response.body, bytes)
            assert response.aclose is not None  # until the stream's end
            chunks = [chunk async for chunk in response.body]
            # Read to its end: the upstream request is done, the app withdrew
            # aclose (the server spares a shielded wait), the key is free.
            assert response.aclose is None
            spend = app.status()["keys"][0]["spend"]
            in_flight = app.status()["stats"]["inFlight"]
    text = b"".join(chunks).decode()
    assert len(chunks) > 1
    assert ": OPENROUTER PROCESSING" in text and text.rstrip().endswith("data: [DONE]")
    assert spend > 0 and in_flight == 0


async def test_a_stream_in_hand_says_so_to_the_server() -> None:
    # The fake upstream writes a whole stream at once: the relay's ``ready``
    # holds from its first chunk to its end, so the server sends it in one write.
    body = json.dumps({"model": "m", "messages": [], "stream": True, "max_tokens": 3})
    async with FakeUpstream(scenario(good=Ok())).serve() as server:
        async for app in proxy(server, "good"):
            response = await app(post("/v1/chat/completions", body))
            relay = response.body
            assert not isinstance(relay, bytes)
            seen = [relay.ready]  # type: ignore[attr-defined]
            chunks = []
            async for chunk in relay:
                chunks.append(chunk)
                seen.append(relay.ready)  # type: ignore[attr-defined]
            in_flight = app.status()["stats"]["inFlight"]
    assert b"".join(chunks).rstrip().endswith(b"data: [DONE]")
    assert all(seen) and in_flight == 0 and response.aclose is None


async def cycles_left(app: ProxyApp, body: str, n: int) -> int:
    """Objects the garbage collector finds in reference cycles after ``n`` requests."""
    gc.collect()
    gc.disable()
    try:
        for _ in range(n):
            assert await body_of(await app(post("/v1/chat/completions", body)))
        return gc.collect()
    finally:
        gc.enable()


async def test_answers_leave_nothing_for_the_garbage_collector() -> None:
    # A request whose objects form a reference cycle lives on until a collection
    # walks it: memory churn and collector time for every request (a relayed
    # stream's response once held its relay, which held a closure holding it).
    n = 40
    found = {}
    async with FakeUpstream(scenario(good=Ok())).serve() as server:
        async for app in proxy(server, "good"):
            for stream in (False, True, False, True):  # the first two warm up
                body = json.dumps({"model": "m", "messages": [], "stream": stream})
                found["stream" if stream else "json"] = await cycles_left(app, body, n)
    assert all(count < n for count in found.values()), f"objects in cycles after {n}: {found}"


# On trio only: asyncio's own socket transports leave cycles when a connection closes.
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_a_broken_stream_leaves_nothing_for_the_garbage_collector() -> None:
    # Its upstream connection is closed, not reused: the codec's parser, which
    # holds the codec's callbacks, is let go with it.
    n = 20
    body = json.dumps({"model": "m", "messages": [], "stream": True, "max_tokens": 8})
    async with FakeUpstream(scenario(cut=Truncate(after_chunks=2))).serve() as server:
        async for app in proxy(server, "cut"):
            await cycles_left(app, body, 5)  # warm up
            found = await cycles_left(app, body, n)
    assert found < n, f"{found} objects in cycles after {n} broken streams"


async def test_stream_that_breaks_off_ends_with_an_error_event() -> None:
    body = json.dumps({"model": "m", "messages": [], "stream": True, "max_tokens": 8})
    async with FakeUpstream(scenario(cut=Truncate(after_chunks=2))).serve() as server:
        async for app in proxy(server, "cut"):
            response = await app(post("/v1/chat/completions", body))
            text = (await body_of(response)).decode()
            status = app.status()
    last = [line for line in text.splitlines() if line.startswith("data: ")][-1]
    assert json.loads(last[6:])["error"]["type"] == "upstream_error"
    assert status["stats"]["streamErrors"] == 1
    assert status["stats"]["inFlight"] == 0


async def test_no_key_gives_429_with_retry_after_in_openai_shape() -> None:
    async with FakeUpstream(
        scenario(busy=RateLimit(limit=0, window=30)), clock=FakeClock(WINDOW_START)
    ).serve() as server:
        async for app in proxy(server, "busy"):
            response = await app(post("/v1/chat/completions", CHAT))
            payload = json.loads(await body_of(response))
    headers = dict(response.headers)
    assert response.status == 429
    assert 0 < int(headers["retry-after"]) <= 30
    assert payload["error"]["type"] == "rate_limit_error"


async def test_caller_errors_pass_through_unchanged() -> None:
    picky = Reply(400, "This model's maximum context length is 8192 tokens")
    async with FakeUpstream(scenario(picky=picky)).serve() as server:
        async for app in proxy(server, "picky"):
            response = await app(post("/v1/chat/completions", CHAT))
            payload = json.loads(await body_of(response))
    assert response.status == 400
    assert "maximum context length" in payload["error"]["message"]


async def test_get_models_and_routing_note_and_pin_header() -> None:
    async with FakeUpstream(scenario(good=Ok(), picky=Ok())).serve() as server:
        async for app in proxy(server, "good", "picky", routing_note=True):
            models = await app(get("/v1/models"))
            listed = json.loads(await body_of(models))
            pinned = await app(post("/v1/chat/completions", CHAT, **{"x-keyrotor-key": "picky"}))
            note = json.loads(await body_of(pinned))["_routing"]
    assert models.status == 200 and listed["data"]
    assert note == {"key": "picky", "attempts": 1}


async def test_status_metrics_healthz_and_404_hold_no_secret() -> None:
    async with FakeUpstream(scenario(good=Ok(), bad=Invalid())).serve() as server:
        async for app in proxy(server, "good", "bad"):
            await app(post("/v1/chat/completions", CHAT))
            await app(post("/v1/chat/completions", CHAT))
            status = await app(get("/status"))
            metrics = await app(get("/metrics"))
            health = await app(get("/healthz"))
            missing = await app(get("/nope"))
    text = (await body_of(status)).decode() + (await body_of(metrics)).decode()
    for secret in SECRETS.values():
        assert secret not in text
    assert health.status == 200 and json.loads(await body_of(health))["ok"] is True
    assert missing.status == 404
    assert json.loads(await body_of(missing))["error"]["type"] == "invalid_request_error"
    exposition = (await body_of(metrics)).decode()
    assert dict(metrics.headers)["content-type"].startswith("text/plain; version=0.0.4")
    assert 'keyrotor_key_state{key="bad",state="failed"} 1' in exposition
    assert 'keyrotor_key_requests_total{key="good"} 2' in exposition
    # two chats and the /status call had been answered when /metrics rendered
    assert 'keyrotor_proxy_responses_total{status="200"} 3' in exposition
    families = re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M)
    assert len(families) == len({name for name, _ in families}) >= 10
    for line in exposition.splitlines():
        if not line.startswith("#"):
            assert re.match(r'^[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? \S+$', line), line
    assert exposition.endswith("\n")


async def test_total_cost_today_restarts_at_midnight_utc() -> None:
    now = [86_400.0 * 20_000 + 3_600]
    async with FakeUpstream(scenario(good=Ok())).serve() as server:
        async with AsyncClient({"good": SECRETS["good"]}, server.url) as client:
            app = ProxyApp(client, clock=lambda: now[0])
            await body_of(await app(post("/v1/chat/completions", CHAT)))
            first = app.status()["stats"]
            now[0] += 86_400  # the next day
            after_midnight = app.status()["stats"]
            await body_of(await app(post("/v1/chat/completions", CHAT)))
            later = app.status()["stats"]
    assert first["totalCostToday"] == pytest.approx(first["totalCost"]) and first["totalCost"] > 0
    assert after_midnight["totalCostToday"] == 0
    assert later["totalCostToday"] == pytest.approx(later["totalCost"] - first["totalCost"])
