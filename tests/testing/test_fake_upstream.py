"""Tests of keyrotor.testing: the fake OpenRouter upstream, its behaviours and clock.

Async tests run on asyncio and trio (see conftest.py). Clients are httpx (the
async client in-process, the sync client against the threaded server) or raw
sockets for what httpx cannot send (malformed, chunked, pipelined requests).
"""

from __future__ import annotations

import json
import math
import os
import selectors
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import trio
import trio.testing

from keyrotor.testing import (
    DEMO_KEYS,
    AccountRateLimit,
    Chain,
    Credits,
    Custom,
    Drop,
    FakeClock,
    FakeUpstream,
    Flaky,
    Hang,
    InFlightBudget,
    Intermittent,
    Invalid,
    MidStreamError,
    Ok,
    RateLimit,
    Reply,
    Scenario,
    Sequence,
    Slow,
    SlowStream,
    Truncate,
    UpstreamRateLimited,
    healthy_secret,
    scenario,
)
from keyrotor.testing.certificates import self_signed, server_context
from keyrotor.upstream.behaviours import Call

REPO = Path(__file__).resolve().parents[2]
SECRET = "sk-or-v1-test-secret-aaaaaaaaaaaaaaaaaaaa"
OTHER = "sk-or-v1-test-secret-bbbbbbbbbbbbbbbbbbbb"
THIRD = "sk-or-v1-test-secret-cccccccccccccccccccc"
CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hello world!"}]}
# 12 characters -> 3 prompt tokens; 8 completion tokens by default; gpt-4o-mini prices.
CHAT_COST = round(3 * 0.00000015 + 8 * 0.0000006, 12)
START = 1_700_000_010.5  # FakeClock start used by the rate-limit tests
WORDS = ["Hello", " from", " the", " fake", " upstream", ". "]

pytestmark = pytest.mark.filterwarnings("error")


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def one_key(behaviour: Any, secret: str = SECRET, alias: str = "a") -> Scenario:
    return Scenario().add(secret, behaviour, alias=alias)


@asynccontextmanager
async def running(
    sc: Scenario | None = None, **kwargs: Any
) -> AsyncIterator[tuple[FakeUpstream, httpx.AsyncClient]]:
    server = FakeUpstream(sc, **kwargs)
    async with server.serve(), httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        yield server, client
    assert server.errors == []


async def chat(client: httpx.AsyncClient, secret: str = SECRET, **extra: Any) -> httpx.Response:
    return await client.post("/chat/completions", json={**CHAT, **extra}, headers=auth(secret))


def sse_events(text: str) -> list[str]:
    """The SSE events of a body: data payloads, and comments as they are (':...')."""
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        if block.startswith(":"):
            events.append(block)
        else:
            assert block.startswith("data: "), block
            events.append(block[len("data: ") :])
    return events


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


async def raw_exchange(port: int, data: bytes, *, timeout: float = 3.0) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    received = b""
    with anyio.fail_after(timeout):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(data)
            try:
                while True:
                    received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
    return received


def raw_post(path: str, body: bytes, secret: str = SECRET, *, extra: bytes = b"") -> bytes:
    return (
        b"POST " + path.encode() + b" HTTP/1.1\r\nhost: fake\r\n"
        b"authorization: Bearer " + secret.encode() + b"\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body) + extra + b"\r\n"
    ) + body


# --------------------------------------------------------------------------- success shapes


@pytest.mark.anyio
async def test_chat_completion_has_openrouter_shape_and_deterministic_cost() -> None:
    async with running(one_key(Ok())) as (_, client):
        r = await chat(client)
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("gen-")
    assert r.headers["x-generation-id"] == body["id"]
    assert body["object"] == "chat.completion"
    assert body["model"] == "openai/gpt-4o-mini"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "".join((WORDS * 2)[:8])
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == 3
    assert body["usage"]["completion_tokens"] == 8
    assert body["usage"]["total_tokens"] == 11
    assert body["usage"]["cost"] == pytest.approx(CHAT_COST)
    assert "x-ratelimit-limit" not in r.headers  # successes carry no rate-limit headers
    assert SECRET not in r.text


@pytest.mark.anyio
async def test_paths_with_and_without_prefix_and_unknown_paths() -> None:
    async with running(one_key(Ok())) as (server, client):
        origin = server.origin
        for prefix in ("/api/v1", "/v1", ""):
            r = await client.post(
                f"{origin}{prefix}/chat/completions", json=CHAT, headers=auth(SECRET)
            )
            assert r.status_code == 200, prefix
        missing = await client.get(f"{origin}/api/v1/nope", headers=auth(SECRET))
        wrong_method = await client.get("/chat/completions", headers=auth(SECRET))
        legacy_key = await client.get(f"{origin}/api/v1/auth/key", headers=auth(SECRET))
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == 404
    assert wrong_method.status_code == 405
    assert legacy_key.status_code == 200
    assert server.stats(SECRET).by_endpoint == {
        "/chat/completions": 4,  # three POSTs and the GET (405)
        "/<unknown>": 1,
        "/key": 1,
    }


@pytest.mark.anyio
async def test_max_tokens_sets_completion_tokens_and_free_models_cost_nothing() -> None:
    async with running(one_key(Ok())) as (_, client):
        short = await chat(client, max_tokens=2)
        free = await chat(client, model="meta-llama/llama-3.3-70b-instruct:free")
        unknown_model = await chat(client, model="vendor/unknown", max_tokens=1)
        bad = await chat(client, max_tokens="many")
    assert short.json()["choices"][0]["message"]["content"] == "Hello from"
    assert short.json()["usage"]["completion_tokens"] == 2
    assert free.json()["usage"]["cost"] == 0
    # not in the catalog: the scenario's default prices (1e-6 prompt, 2e-6 completion)
    assert unknown_model.json()["usage"]["cost"] == pytest.approx(3 * 1e-6 + 1 * 2e-6)
    assert unknown_model.json()["model"] == "vendor/unknown"
    assert bad.status_code == 400


@pytest.mark.anyio
async def test_stream_sends_chunks_in_order_with_comments_and_usage_last() -> None:
    async with running(one_key(Ok())) as (_, client):
        r = await chat(client, stream=True, max_tokens=6)
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream"
    events = sse_events(r.text)
    assert events[0] == ": OPENROUTER PROCESSING"
    assert ": OPENROUTER PROCESSING" in events[1:-1]  # interleaved too
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1] if not e.startswith(":")]
    contents = [c["choices"][0]["delta"]["content"] for c in chunks if c["choices"]]
    assert contents[:6] == WORDS
    assert all(c["id"] == r.headers["x-generation-id"] for c in chunks)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert "usage" in chunks[-1]
    assert all("usage" not in c for c in chunks[:-1])
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 6
    assert usage["cost"] == pytest.approx(3 * 0.00000015 + 6 * 0.0000006)


@pytest.mark.anyio
async def test_completions_and_embeddings_endpoints() -> None:
    async with running(one_key(Ok())) as (server, client):
        text = await client.post(
            "/completions", json={"prompt": "abcdefgh", "max_tokens": 3}, headers=auth(SECRET)
        )
        text_stream = await client.post(
            "/completions",
            json={"prompt": "abcdefgh", "max_tokens": 2, "stream": True},
            headers=auth(SECRET),
        )
        emb = await client.post(
            "/embeddings",
            json={"model": "openai/text-embedding-3-small", "input": ["one", "two"]},
            headers=auth(SECRET),
        )
        emb_again = await client.post(
            "/embeddings",
            json={"model": "openai/text-embedding-3-small", "input": ["one", "two"]},
            headers=auth(SECRET),
        )
    assert text.json()["object"] == "text_completion"
    assert text.json()["choices"][0]["text"] == "Hello from the"
    assert text.json()["usage"]["prompt_tokens"] == 2
    chunks = [json.loads(e) for e in sse_events(text_stream.text) if e[0] == "{"]
    assert [c["choices"][0]["text"] for c in chunks[:2]] == ["Hello", " from"]
    body = emb.json()
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert len(body["data"][0]["embedding"]) == 8
    assert body["data"][0]["embedding"] != body["data"][1]["embedding"]
    assert body["data"] == emb_again.json()["data"]  # deterministic
    assert body["usage"]["cost"] == pytest.approx(2 * 0.00000002)
    assert server.stats("a").by_endpoint == {"/completions": 2, "/embeddings": 2}


# --------------------------------------------------------------------------- auth


@pytest.mark.anyio
async def test_unknown_missing_and_invalid_keys_get_401() -> None:
    async with running(one_key(Invalid())) as (server, client):
        unknown = await chat(client, secret=OTHER)
        missing = await client.post("/chat/completions", json=CHAT)
        invalid = await chat(client)
        invalid_probe = await client.get("/key", headers=auth(SECRET))
    assert unknown.status_code == 401
    assert unknown.content == b'{"error":{"code":401,"message":"User not found."}}'
    assert missing.status_code == 401
    assert missing.json()["error"]["message"] == "No auth credentials found"
    assert invalid.status_code == 401
    assert invalid.json() == {"error": {"code": 401, "message": "User not found."}}
    assert invalid_probe.status_code == 401
    assert OTHER not in unknown.text
    assert server.stats(None).by_status == {401: 1}


# --------------------------------------------------------------------------- credits


@pytest.mark.anyio
async def test_credits_are_drawn_down_then_402_openrouter_credits() -> None:
    credits = Credits(2.5 * CHAT_COST)
    async with running(one_key(credits)) as (server, client):
        statuses = [(await chat(client)).status_code for _ in range(3)]
        refused = await chat(client)
        key = await client.get("/key", headers=auth(SECRET))
    # admitted while the balance is above zero: 2.5 -> 1.5 -> 0.5 -> -0.5 requests' worth
    assert statuses == [200, 200, 200]
    assert refused.status_code == 402
    error = refused.json()["error"]
    assert error["code"] == 402
    assert error["metadata"]["limit_source"] == "openrouter_credits"
    assert credits.balance == pytest.approx(-0.5 * CHAT_COST)
    data = key.json()["data"]
    assert data["limit"] == pytest.approx(2.5 * CHAT_COST)
    assert data["limit_remaining"] == pytest.approx(-0.5 * CHAT_COST)
    assert data["usage"] == pytest.approx(3 * CHAT_COST)
    assert data["label"] == "a"
    assert server.stats("a").cost == pytest.approx(3 * CHAT_COST)


@pytest.mark.anyio
async def test_key_limit_402_and_top_up_and_preauthorization() -> None:
    cap = Credits(CHAT_COST / 2, limit_source="openrouter_key_limit")
    strict = Credits(CHAT_COST / 2, preauthorize=True)
    sc = one_key(cap).add(OTHER, strict, alias="strict")
    async with running(sc) as (_, client):
        first = await chat(client)
        capped = await chat(client)
        cap.top_up(10 * CHAT_COST)
        after_top_up = await chat(client)
        too_big = await chat(client, secret=OTHER)
        small_enough = await chat(client, secret=OTHER, max_tokens=1)
    assert first.status_code == 200
    assert capped.status_code == 402
    assert capped.json()["error"]["metadata"]["limit_source"] == "openrouter_key_limit"
    assert "Key limit exceeded" in capped.json()["error"]["message"]
    assert after_top_up.status_code == 200
    assert too_big.status_code == 402
    assert "but can only afford 4" in too_big.json()["error"]["message"]
    assert small_enough.status_code == 200


@pytest.mark.anyio
async def test_shared_credits_are_an_account_balance() -> None:
    account = Credits(1.5 * CHAT_COST)
    sc = one_key(account).add(OTHER, account, alias="b")
    async with running(sc) as (_, client):
        a = await chat(client)
        b = await chat(client, secret=OTHER)
        a_again = await chat(client)
    assert (a.status_code, b.status_code, a_again.status_code) == (200, 200, 402)


# --------------------------------------------------------------------------- rate limits


@pytest.mark.anyio
async def test_rate_limit_window_429_headers_follow_the_fake_clock() -> None:
    clock = FakeClock(START)
    limit = RateLimit(2, 60.0)
    async with running(one_key(limit), clock=clock) as (server, client):
        ok = [(await chat(client)).status_code for _ in range(2)]
        probe = await client.get("/key", headers=auth(SECRET))  # never counted
        limited = await chat(client)
        clock.advance(10)
        still = await chat(client)
        clock.set(1_700_000_040.0)  # the window's end
        fresh = await chat(client)
    assert ok == [200, 200]
    assert probe.status_code == 200
    # windows are aligned on multiples of 60 s: [1_699_999_980, 1_700_000_040)
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == str(math.ceil(1_700_000_040 - START))  # "30"
    assert limited.headers["x-ratelimit-limit"] == "2"
    assert limited.headers["x-ratelimit-remaining"] == "0"
    assert limited.headers["x-ratelimit-reset"] == "1700000040000"
    error = limited.json()["error"]
    assert error["code"] == 429
    assert error["metadata"]["headers"]["X-RateLimit-Reset"] == "1700000040000"
    assert still.headers["retry-after"] == "20"
    assert fresh.status_code == 200
    assert limit.used(clock()) == 1
    assert server.stats("a").probes == 1


@pytest.mark.anyio
async def test_account_wide_limit_is_shared_across_secrets() -> None:
    clock = FakeClock(START)
    account = AccountRateLimit(limit=3)
    sc = one_key(account).add(OTHER, account, alias="b").add(THIRD, Ok(), alias="c")
    async with running(sc, clock=clock) as (server, client):
        for secret in (SECRET, OTHER, SECRET):
            assert (await chat(client, secret=secret)).status_code == 200
        b_limited = await chat(client, secret=OTHER)
        a_limited = await chat(client, secret=SECRET)
        c_fine = await chat(client, secret=THIRD)
    assert (b_limited.status_code, a_limited.status_code, c_fine.status_code) == (429, 429, 200)
    error = b_limited.json()["error"]
    assert error["message"].startswith("Rate limit exceeded: free-models-per-min")
    assert error["metadata"]["limit_source"] == "openrouter_free_tier_minute"
    assert b_limited.headers["retry-after"] == "30"
    assert server.keys_seen() == ["a", "b", "a", "b", "a", "c"]


@pytest.mark.anyio
async def test_upstream_shared_pool_429() -> None:
    async with running(one_key(UpstreamRateLimited(first=1, retry_after=2))) as (_, client):
        limited = await chat(client)
        then_ok = await chat(client)
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "2"
    error = limited.json()["error"]
    assert error["message"] == "Provider returned error"
    assert error["metadata"]["limit_source"] == "upstream_provider_shared_pool"
    assert "openai/gpt-4o-mini is temporarily rate-limited upstream" in error["metadata"]["raw"]
    assert then_ok.status_code == 200


@pytest.mark.anyio
async def test_in_flight_budget_402_with_retry_after() -> None:
    sc = one_key(InFlightBudget(0, retry_after=2.5)).add(
        OTHER, Chain(InFlightBudget(1, retry_after=1), Slow(1.0)), alias="b"
    )
    async with running(sc) as (server, client):
        always = await chat(client)
        results: dict[str, int] = {}

        async def slow() -> None:
            results["slow"] = (await chat(client, secret=OTHER)).status_code

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            await wait_until(lambda: server.stats("b").in_flight == 1)  # held for 1 s
            second = await chat(client, secret=OTHER)
    assert always.status_code == 402
    assert always.headers["retry-after"] == "3"
    error = always.json()["error"]
    assert error["metadata"]["limit_source"] == "openrouter_in_flight_budget"
    assert error["metadata"]["reason"] == "in_flight_budget_exhausted"
    assert second.status_code == 402
    assert results["slow"] == 200


# --------------------------------------------------------------------------- patterns, scripts


@pytest.mark.anyio
async def test_flaky_patterns_are_deterministic() -> None:
    sc = (
        one_key(Flaky(502, every=3))
        .add(OTHER, Flaky(503, first=2), alias="b")
        .add(THIRD, Flaky(500, pattern=[False, True]), alias="c")
    )
    async with running(sc) as (_, client):
        every = [(await chat(client)).status_code for _ in range(6)]
        first = [(await chat(client, secret=OTHER)).status_code for _ in range(4)]
        pattern = [(await chat(client, secret=THIRD)).status_code for _ in range(4)]
        failed = await chat(client)
        await chat(client)
        failed = await chat(client)
    assert every == [200, 200, 502, 200, 200, 502]
    assert first == [503, 503, 200, 200]
    assert pattern == [200, 500, 200, 500]
    assert failed.json()["error"]["metadata"]["error_type"] == "provider_unavailable"


def test_seeded_probability_repeats_and_triggers_are_exclusive() -> None:
    def run(seed: int) -> list[bool]:
        flaky = Flaky(502, probability=0.5, seed=seed)
        return [flaky.decide(Call(endpoint="/chat/completions")) is not None for _ in range(40)]

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert 5 < sum(run(7)) < 35
    with pytest.raises(ValueError, match="at most one"):
        Flaky(502, every=2, first=1)
    hang_every_other = Intermittent(Reply(418), every=2)
    outcomes = [hang_every_other.decide(Call(endpoint="/x")) for _ in range(4)]
    assert [o is not None for o in outcomes] == [False, True, False, True]


@pytest.mark.anyio
async def test_sequence_scripts_exact_responses_then_falls_back() -> None:
    script = Sequence(
        [Reply(503), UpstreamRateLimited(), Ok(), Reply(200, body={"custom": True})],
        then=Invalid(),
    )
    async with running(one_key(script)) as (server, client):
        first = await chat(client)
        probe = await client.get("/key", headers=auth(SECRET))  # does not consume a step
        rest = [await chat(client) for _ in range(5)]
    assert first.status_code == 503
    assert probe.status_code == 200
    assert [r.status_code for r in rest] == [429, 200, 200, 401, 401]
    assert rest[2].json() == {"custom": True}
    assert script.remaining == 0
    assert [e.status for e in server.log] == [503, 200, 429, 200, 200, 401, 401]


@pytest.mark.anyio
async def test_set_behaviour_at_runtime_and_custom_behaviours() -> None:
    seen: list[str] = []

    def record(call: Call) -> Reply | None:
        seen.append(call.model)
        return None

    async with running(one_key(Ok())) as (server, client):
        before = await chat(client)
        server.set_behaviour(SECRET, Invalid())
        after = await chat(client)
        server.set_behaviour(OTHER, Custom(record), alias="b")
        custom = await chat(client, secret=OTHER, model="x/y")
    assert (before.status_code, after.status_code, custom.status_code) == (200, 401, 200)
    assert seen == ["x/y"]
    assert isinstance(server.behaviour(SECRET), Invalid)
    assert server.keys_seen() == ["a", "a", "b"]


@pytest.mark.anyio
async def test_a_bad_behaviour_gets_500_and_is_recorded_not_fatal() -> None:
    sc = one_key(Custom(lambda call: Ok())).add(OTHER, Ok(), alias="b")  # type: ignore[arg-type,return-value]
    server = FakeUpstream(sc)
    async with server.serve(), httpx.AsyncClient(base_url=server.url) as client:
        broken = await chat(client)
        fine = await chat(client, secret=OTHER)
    assert broken.status_code == 500
    assert fine.status_code == 200
    assert [type(e) for e in server.errors] == [TypeError]
    assert server.totals().errors == 1


# ------------------------------------------------------------------ catalog, probes, counters


@pytest.mark.anyio
async def test_models_catalog_and_key_endpoint() -> None:
    limit = RateLimit(1, 60.0)
    credits = Credits(1.0, is_free_tier=True)
    async with running(one_key(Chain(limit, credits))) as (server, client):
        models = await client.get("/models")
        probes = [await client.get("/key", headers=auth(SECRET)) for _ in range(3)]
        used = await chat(client)
        key = await client.get("/key", headers=auth(SECRET))
    catalog = models.json()["data"]
    assert "openai/gpt-4o-mini" in [m["id"] for m in catalog]
    for m in catalog:
        assert isinstance(m["pricing"]["prompt"], str)
        float(m["pricing"]["completion"])  # decimal strings
    assert [p.status_code for p in probes] == [200, 200, 200]
    assert used.status_code == 200  # probes neither counted against the limit...
    data = key.json()["data"]
    assert data["limit"] == 1.0
    assert data["limit_remaining"] == pytest.approx(1.0 - CHAT_COST)  # ...nor cost credits
    assert data["usage"] == pytest.approx(CHAT_COST)
    assert data["is_free_tier"] is True
    assert SECRET not in key.text
    assert server.stats(SECRET).probes == 4


@pytest.mark.anyio
async def test_key_endpoint_reports_the_first_credits_of_a_chain() -> None:
    account = Credits(5.0)
    cap = Credits(0.5, limit_source="openrouter_key_limit")
    async with running(one_key(Chain(cap, account))) as (_, client):
        data = (await client.get("/key", headers=auth(SECRET))).json()["data"]
        await chat(client)
    assert (data["limit"], data["limit_remaining"]) == (0.5, 0.5)
    assert account.spent == cap.spent == pytest.approx(CHAT_COST)  # both are charged


@pytest.mark.anyio
async def test_counters_and_log() -> None:
    sc = one_key(Ok()).add(OTHER, Invalid(), alias="b")
    async with running(sc) as (server, client):
        r1 = await chat(client)
        r2 = await chat(client, stream=True)
        r3 = await chat(client, secret=OTHER)
        await client.get("/key", headers=auth(SECRET))
    a = server.stats("a")
    assert a == server.stats(SECRET)  # by alias or by secret
    assert a.key == "a"
    assert a.requests == 3
    assert a.by_endpoint == {"/chat/completions": 2, "/key": 1}
    assert a.by_status == {200: 3}
    assert a.probes == 1
    assert a.in_flight == 0
    assert a.max_in_flight == 1
    assert a.bytes_in == len(r1.request.content) + len(r2.request.content)
    assert a.bytes_out >= len(r1.content) + len(r2.content)
    assert a.cost == pytest.approx(2 * CHAT_COST)
    assert server.stats("b").by_status == {401: 1}
    assert server.stats("b").bytes_out == len(r3.content)
    assert server.stats("never-seen").requests == 0
    assert [tuple(e) for e in server.log] == [
        ("a", "/chat/completions", 200),
        ("a", "/chat/completions", 200),
        ("b", "/chat/completions", 401),
        ("a", "/key", 200),
    ]
    totals = server.totals()
    assert totals.requests == 4
    assert totals.by_status == {200: 3, 401: 1}
    assert totals.connections == 1  # keep-alive
    server.reset_stats()
    assert server.stats("a").requests == 0
    assert list(server.log) == []


# --------------------------------------------------------------------------- time and streams


def test_latency_uses_the_event_loop_clock_so_trio_mock_clock_skips_it() -> None:
    sc = one_key(Slow(30.0)).add(OTHER, SlowStream(10.0), alias="b")

    async def main() -> tuple[float, float]:
        server = FakeUpstream(sc)
        async with server.serve(), httpx.AsyncClient(base_url=server.url, timeout=None) as client:
            t0 = trio.current_time()
            slow = await chat(client)
            t1 = trio.current_time()
            stream = await chat(client, secret=OTHER, stream=True, max_tokens=3)
            t2 = trio.current_time()
        assert slow.status_code == 200
        assert sse_events(stream.text)[-1] == "[DONE]"
        return t1 - t0, t2 - t1

    # rate=0: the mock clock moves only when trio jumps it to the next deadline
    # because every task waits; so these 30 and 60 virtual seconds are trio
    # sleeps that were skipped, never real waits (those would not move it at all).
    clock = trio.testing.MockClock(rate=0, autojump_threshold=0)
    slow_time, stream_time = trio.run(main, clock=clock)
    assert 30.0 <= slow_time < 31.0
    # comment, 3 chunks, finish, usage, [DONE]: 7 events, 6 delays
    assert 60.0 <= stream_time < 61.0


@pytest.mark.anyio
async def test_small_real_latency_on_both_backends() -> None:
    sc = one_key(Slow(0.1)).add(OTHER, Slow(60.0), alias="b")
    async with running(sc) as (server, client):
        r = await chat(client)
        # The answer is really held back on the real clock: a 60 s latency is
        # still pending when the caller gives up (a timeout firing, not a
        # measured duration).
        with pytest.raises(httpx.ReadTimeout):
            await client.post(
                "/chat/completions",
                json=CHAT,
                headers=auth(OTHER),
                timeout=httpx.Timeout(5.0, read=0.3),
            )
        assert server.stats("b").by_status == {200: 1}  # decided, then held
    assert r.status_code == 200


@pytest.mark.anyio
async def test_mid_stream_error_chunk_then_end() -> None:
    err = MidStreamError(after_chunks=2, code=502, message="Provider disconnected")
    async with running(one_key(err)) as (server, client):
        streamed = await chat(client, stream=True)
        plain = await chat(client)
    assert streamed.status_code == 200
    events = [e for e in sse_events(streamed.text) if not e.startswith(":")]
    assert "[DONE]" not in events
    chunks = [json.loads(e) for e in events]
    assert [c["choices"][0]["delta"]["content"] for c in chunks[:2]] == ["Hello", " from"]
    last = chunks[-1]
    assert len(chunks) == 3
    assert last["error"] == {
        "code": 502,
        "message": "Provider disconnected",
        "metadata": {"error_type": "provider_unavailable"},
    }
    assert last["choices"][0]["finish_reason"] == "error"
    assert plain.status_code == 200
    assert plain.json()["choices"][0]["finish_reason"] == "error"
    assert "error" not in plain.json()  # in the choice, as OpenRouter's (errors-and-debugging)
    assert plain.json()["choices"][0]["error"]["code"] == 502
    assert server.stats("a").by_status == {200: 2}


@pytest.mark.anyio
async def test_truncated_responses_and_drops_then_the_server_still_works() -> None:
    sc = one_key(Truncate(after_chunks=2)).add(OTHER, Drop(), alias="b").add(THIRD, Ok(), alias="c")
    async with running(sc) as (server, client):
        with pytest.raises(httpx.RemoteProtocolError):
            await chat(client, stream=True)
        with pytest.raises(httpx.RemoteProtocolError):
            await chat(client)
        with pytest.raises(httpx.RemoteProtocolError):
            await chat(client, secret=OTHER)
        after = await chat(client, secret=THIRD)
    assert after.status_code == 200
    assert server.stats("b").by_status == {0: 1}


@pytest.mark.anyio
async def test_hang_answers_nothing_until_the_client_goes_away() -> None:
    sc = one_key(Hang()).add(OTHER, Ok(), alias="b")
    async with running(sc) as (server, client):
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/chat/completions", json=CHAT, headers=auth(SECRET), timeout=0.2)
        await wait_until(lambda: server.stats("a").in_flight == 0)
        after = await chat(client, secret=OTHER)
    assert after.status_code == 200
    assert server.stats("a").by_status == {0: 1}


@pytest.mark.anyio
async def test_client_disconnect_mid_stream_does_not_crash_the_server() -> None:
    body = json.dumps({**CHAT, "stream": True, "max_tokens": 100}).encode()
    async with running(one_key(SlowStream(0.02))) as (server, client):
        received = b""
        with anyio.fail_after(3):
            async with await anyio.connect_tcp("127.0.0.1", server.port) as s:
                await s.send(raw_post("/api/v1/chat/completions", body))
                while b"data: {" not in received:
                    received += await s.receive()
        # the client is gone after the first chunk; the server notices on a later write
        await wait_until(lambda: server.stats("a").disconnects == 1)
        server.set_behaviour(SECRET, Ok())
        after = await chat(client)
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert after.status_code == 200
    assert server.stats("a").in_flight == 0
    assert server.stats("a").bytes_out < 10_000  # it stopped writing
    assert server.totals().disconnects == 1


# --------------------------------------------------------------------------- HTTP edge cases


@pytest.mark.anyio
async def test_malformed_requests_get_400_and_close() -> None:
    async with running(one_key(Ok())) as (server, client):
        garbage = await raw_exchange(server.port, b"NOT HTTP AT ALL\r\n\r\n")
        bad_json = await client.post(
            "/chat/completions", content=b"{not json", headers=auth(SECRET)
        )
        after = await chat(client)
    assert garbage.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in garbage.lower()
    assert garbage.endswith(b"}")
    assert bad_json.status_code == 400
    assert bad_json.json()["error"]["code"] == 400
    assert after.status_code == 200
    assert server.totals().malformed == 1


@pytest.mark.anyio
async def test_chunked_request_body_and_pipelined_requests() -> None:
    body = json.dumps(CHAT).encode()
    chunked = (
        b"POST /api/v1/chat/completions HTTP/1.1\r\nhost: fake\r\n"
        b"authorization: Bearer " + SECRET.encode() + b"\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
        b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, body[:10], len(body) - 10, body[10:])
    )
    models = b"GET /api/v1/models HTTP/1.1\r\nhost: fake\r\n\r\n"
    last = b"GET /api/v1/models HTTP/1.1\r\nhost: fake\r\nconnection: close\r\n\r\n"
    async with running(one_key(Ok())) as (server, _):
        received = await raw_exchange(server.port, chunked + models + last)
    assert received.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert b'"prompt_tokens":3' in received
    assert server.totals().connections == 1
    assert server.stats("a").bytes_in == len(body)


@pytest.mark.anyio
async def test_http10_expect_continue_head_and_oversized_bodies() -> None:
    stream_body = json.dumps({**CHAT, "stream": True, "max_tokens": 2}).encode()
    http10 = raw_post("/api/v1/chat/completions", stream_body).replace(b"HTTP/1.1", b"HTTP/1.0")
    head = b"HEAD /api/v1/models HTTP/1.1\r\nhost: fake\r\nconnection: close\r\n\r\n"
    async with running(one_key(Ok()), max_body_size=1000) as (server, _):
        old = await raw_exchange(server.port, http10)
        body = json.dumps(CHAT).encode()
        expecting = raw_post("/chat/completions", body, extra=b"expect: 100-continue\r\n")
        async with await anyio.connect_tcp("127.0.0.1", server.port) as s:
            await s.send(expecting[: -len(body)])  # the headers only
            with anyio.fail_after(2):
                interim = await s.receive()
            await s.send(body)
            with anyio.fail_after(2):
                final = await s.receive()
        head_reply = await raw_exchange(server.port, head)
        too_big = await raw_exchange(server.port, raw_post("/chat/completions", b"x" * 2000))
    # HTTP/1.0: no chunked framing, the body ends with the connection
    assert old.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"transfer-encoding" not in old.lower()
    assert old.endswith(b"data: [DONE]\n\n")
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    assert final.startswith(b"HTTP/1.1 200 OK\r\n")
    assert head_reply.startswith(b"HTTP/1.1 405 ")
    assert head_reply.endswith(b"\r\n\r\n")  # no body for HEAD
    assert too_big.startswith(b"HTTP/1.1 413 ")


@pytest.mark.anyio
async def test_no_response_ever_contains_a_secret() -> None:
    behaviours = [
        Ok(),
        Invalid(),
        Credits(0.0),
        RateLimit(0),
        AccountRateLimit(limit=0),
        UpstreamRateLimited(),
        InFlightBudget(),
        Flaky(500),
        MidStreamError(),
    ]
    secrets = [f"sk-or-v1-leak-check-{i:02d}-zzzzzzzz" for i in range(len(behaviours))]
    sc = Scenario()
    for secret, behaviour in zip(secrets, behaviours, strict=True):
        sc.add(secret, behaviour)  # no alias: the label must not fall back to the secret
    seen = []
    async with running(sc) as (_, client):
        for secret in [*secrets, "sk-or-v1-unknown-zzzzzzzz"]:
            for request in (
                client.build_request("POST", "/chat/completions", json=CHAT, headers=auth(secret)),
                client.build_request(
                    "POST", "/chat/completions", json={**CHAT, "stream": True}, headers=auth(secret)
                ),
                client.build_request("GET", "/key", headers=auth(secret)),
            ):
                r = await client.send(request)
                seen.append((secret, r.text + str(r.headers)))
    assert len(seen) == 30
    for secret, text in seen:
        assert secret not in text
        assert "zzzzzzzz" not in text


# --------------------------------------------------------------------------- lifecycle


@pytest.mark.anyio
async def test_run_with_task_group_start_and_idempotent_aclose() -> None:
    server = FakeUpstream(one_key(Ok()))
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        assert server.url == f"http://127.0.0.1:{server.port}/api/v1"
        async with httpx.AsyncClient(base_url=server.url) as client:
            assert (await client.get("/models")).status_code == 200
        await server.aclose()
        await server.aclose()
    with pytest.raises(OSError):
        await anyio.connect_tcp("127.0.0.1", server.port)
    with pytest.raises(RuntimeError, match="serves once"):
        await server.run()


def test_only_loopback_and_port_before_start() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FakeUpstream(host="0.0.0.0")
    assert FakeUpstream(host="localhost").host == "127.0.0.1"
    with pytest.raises(RuntimeError, match="not listening"):
        _ = FakeUpstream().url


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_running_in_thread_with_a_sync_client(backend: str) -> None:
    clock = FakeClock(START)
    sc = Scenario.healthy(2)
    sc.add(SECRET, RateLimit(1, 60.0), alias="limited")
    with FakeUpstream.running_in_thread(sc, backend=backend, clock=clock) as server:
        with httpx.Client(base_url=server.url, timeout=5) as client:
            ok = client.post("/chat/completions", json=CHAT, headers=auth(healthy_secret(1)))
            client.post("/chat/completions", json=CHAT, headers=auth(SECRET))
            limited = client.post("/chat/completions", json=CHAT, headers=auth(SECRET))
            clock.advance(60)
            again = client.post("/chat/completions", json=CHAT, headers=auth(SECRET))
            server.set_behaviour(healthy_secret(0), Invalid())
            invalid = client.get("/key", headers=auth(healthy_secret(0)))
        port = server.port
        assert server.errors == []
    assert ok.status_code == 200
    assert (limited.status_code, again.status_code, invalid.status_code) == (429, 200, 401)
    assert server.keys_seen(None) == ["key-1", "limited", "limited", "limited", "key-0"]
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_built_in_scenarios() -> None:
    demo = scenario("demo")
    assert set(demo.aliases.values()) == set(DEMO_KEYS)
    assert isinstance(demo.keys[DEMO_KEYS["invalid"]], Invalid)
    assert len(scenario("healthy").keys) == 4
    assert Scenario.healthy(7).secret_for("key-6") == healthy_secret(6)
    assert scenario("open").unknown is not None
    with pytest.raises(ValueError, match="demo"):
        scenario("nope")


def test_fake_clock() -> None:
    clock = FakeClock(100.0)
    assert clock() == clock.now() == 100.0
    clock.advance(2.5)
    assert clock() == 102.5
    with pytest.raises(ValueError):
        clock.advance(-1)
    with pytest.raises(ValueError):
        clock.set(50.0)
    clock.set(200.0)
    assert clock() == 200.0


def printed_url(proc: subprocess.Popen[bytes]) -> str:
    """The first line the fake upstream's command prints: its URL."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(timeout=10), "the CLI printed no URL within 10 s"
    return proc.stdout.readline().decode().strip()


def test_command_line_no_cost_answers_usage_without_its_cost() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    seen = []
    for extra in ([], ["--no-cost"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "keyrotor.testing.fake_upstream", "--port", "0", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=REPO,
            env=env,
        )
        try:
            url = printed_url(proc)
            with httpx.Client(base_url=url, timeout=5) as client:
                answer = client.post(
                    "/chat/completions", json=CHAT, headers=auth(DEMO_KEYS["healthy-1"])
                )
            seen.append(answer.json()["usage"])
        finally:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    reported, unreported = seen
    assert reported["cost"] > 0 and "cost" not in unreported
    assert unreported["prompt_tokens"] == reported["prompt_tokens"] > 0


def test_command_line_serves_the_demo_until_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keyrotor.testing.fake_upstream",
            "--port",
            "0",
            "--scenario",
            "demo",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=env,
    )
    try:
        url = printed_url(proc)
        assert url.startswith("http://127.0.0.1:") and url.endswith("/api/v1")
        with httpx.Client(base_url=url, timeout=5) as client:
            healthy = client.post(
                "/chat/completions", json=CHAT, headers=auth(DEMO_KEYS["healthy-1"])
            )
            invalid = client.post(
                "/chat/completions", json=CHAT, headers=auth(DEMO_KEYS["invalid"])
            )
        assert healthy.status_code == 200
        assert invalid.status_code == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        assert "healthy-1" in stderr
        assert DEMO_KEYS["healthy-1"] not in stderr  # secrets are never printed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_the_faulty_scenario_mixes_four_faults_into_an_open_pool() -> None:
    from keyrotor.testing.fake_upstream import serve_command
    from keyrotor.testing.scenarios import FAULTY_KEYS, scenario

    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    # On a clock of its own: six requests across a minute boundary would all pass.
    with FakeUpstream.running_in_thread(scenario("faulty"), clock=FakeClock(1_000.0)) as server:

        def status(secret: str, timeout: float = 10.0) -> int:
            answer = httpx.post(
                f"{server.url}/chat/completions",
                json=body,
                headers={"authorization": f"Bearer {secret}"},
                timeout=timeout,
            )
            return answer.status_code

        assert status("sk-or-v1-any-key-at-all") == 200
        assert status(FAULTY_KEYS["revoked"]) == 401
        assert status(FAULTY_KEYS["no-credits"]) == 402
        limited = [status(FAULTY_KEYS["rate-limited"]) for _ in range(6)]
        with pytest.raises(httpx.ReadTimeout):
            status(FAULTY_KEYS["hanging"], timeout=0.3)
        line = serve_command(scenario("faulty"), server.url)
    assert limited == [200] * 5 + [429]
    assert "sk-or-v1-fake-open-1" in line and FAULTY_KEYS["hanging"] in line


# --------------------------------------------------------------------------- HTTPS


@pytest.mark.anyio
async def test_https_with_a_self_signed_certificate(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server = FakeUpstream(one_key(Ok()), ssl_context=server_context(cert, key))
    trusting = ssl.create_default_context(cafile=str(cert))
    async with server.serve():
        assert server.url == f"https://127.0.0.1:{server.port}/api/v1"
        async with httpx.AsyncClient(base_url=server.url, verify=trusting, timeout=5) as client:
            answer = await chat(client)
            streamed = await chat(client, stream=True)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 8
        assert streamed.status_code == 200 and sse_events(streamed.text)[-1] == "[DONE]"
        # A client that does not trust the certificate gets no answer, and the
        # server goes on serving (the failed handshake is a disconnect, not a bug).
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as untrusting:
            with pytest.raises(httpx.ConnectError) as caught:
                await chat(untrusting)
        chain: list[BaseException] = []
        error: BaseException | None = caught.value
        while error is not None and len(chain) < 10:
            chain.append(error)
            error = error.__cause__ or error.__context__
        assert any(isinstance(e, ssl.SSLCertVerificationError) for e in chain), chain
        plain = await raw_exchange(server.port, raw_post("/api/v1/chat/completions", b"{}"))
        assert not plain.startswith(b"HTTP/")  # no HTTP answer in the clear
        async with httpx.AsyncClient(base_url=server.url, verify=trusting, timeout=5) as client:
            assert (await chat(client)).status_code == 200
    assert server.errors == []
    assert server.totals().disconnects >= 2  # the untrusting client, the plain one


def test_command_line_serves_https_and_refuses_half_a_certificate(
    certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = certificate
    base = [sys.executable, "-m", "keyrotor.testing.fake_upstream", "--port", "0"]

    def refused(*extra: str) -> str:
        done = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert done.returncode == 2 and done.stdout == ""
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        return done.stderr

    assert "--certfile and --keyfile go together" in refused("--certfile", str(cert))
    assert "--certfile and --keyfile go together" in refused("--keyfile", str(key))
    missing = refused("--certfile", str(tmp_path / "nope.pem"), "--keyfile", str(key))
    assert "cannot load --certfile" in missing and "No such file" in missing
    mismatched = tmp_path / "other"
    mismatched.mkdir()
    _, other_key = self_signed(mismatched)
    assert "fix: a PEM certificate and its matching" in refused(
        "--certfile", str(cert), "--keyfile", str(other_key)
    )

    proc = subprocess.Popen(
        [*base, "--scenario", "open", "--certfile", str(cert), "--keyfile", str(key)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        url = printed_url(proc)
        assert url.startswith("https://127.0.0.1:") and url.endswith("/api/v1")
        assert proc.stdout is not None
        command = proc.stdout.readline().decode()
        assert command.startswith(f"SSL_CERT_FILE={cert} OPENROUTER_KEYS=")
        trusting = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=url, verify=trusting, timeout=5) as client:
            reply = client.post("/chat/completions", json=CHAT, headers=auth(SECRET))
        assert reply.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
