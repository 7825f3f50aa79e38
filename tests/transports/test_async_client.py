"""The async client (asyncio and trio) against the fake upstream on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio
import pytest

from keyrotor.core import KeySpec, PoolConfig, Probe
from keyrotor.testing import (
    WINDOW_START,
    Credits,
    FakeClock,
    FakeUpstream,
    Hang,
    Invalid,
    MidStreamError,
    Ok,
    RateLimit,
    Reply,
    Scenario,
    SlowStream,
)
from keyrotor.transports import asyncio as asyncio_transport
from keyrotor.transports import trio as trio_transport
from keyrotor.transports._exchange import Open
from keyrotor.transports.asyncio import Client, HTTPOptions, NoKeyAvailable, UpstreamError
from keyrotor.transports.errors import KeyrotorError

pytestmark = pytest.mark.anyio

MODEL = "openai/gpt-4o-mini"
HI = [{"role": "user", "content": "hi"}]
SECRETS = {
    "good": "sk-or-v1-good0000000000000000000000001",
    "good2": "sk-or-v1-good0000000000000000000000002",
    "bad": "sk-or-v1-bad00000000000000000000000003",
    "poor": "sk-or-v1-poor0000000000000000000000004",
    "busy": "sk-or-v1-busy0000000000000000000000005",
}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def scenario(**behaviours: object) -> Scenario:
    sc = Scenario()
    for alias, behaviour in behaviours.items():
        sc.add(SECRETS[alias], behaviour, alias=alias)  # type: ignore[arg-type]
    return sc


@pytest.fixture
async def mixed() -> AsyncIterator[FakeUpstream]:
    sc = scenario(
        good=Ok(), bad=Invalid(), poor=Credits(0.0), busy=RateLimit(limit=1, window=60), good2=Ok()
    )
    async with FakeUpstream(sc, clock=FakeClock(WINDOW_START)).serve() as server:
        yield server


def keys(*aliases: str) -> dict[str, str]:
    return {alias: SECRETS[alias] for alias in aliases}


def test_both_modules_export_the_same_client() -> None:
    assert asyncio_transport.Client is trio_transport.Client


async def test_failover_hides_bad_keys(mixed: FakeUpstream) -> None:
    async with Client(keys("good", "bad", "poor", "busy", "good2"), mixed.url) as client:
        answers = [await client.chat(model=MODEL, messages=HI) for _ in range(12)]
        status = client.status()
    assert all(a["choices"][0]["message"]["content"] for a in answers)
    states = {k["alias"]: k["state"] for k in status["keys"]}
    assert states["bad"] == "failed"
    assert states["poor"] == "depleted"
    assert states["busy"] == "rate_limited"
    assert states["good"] == states["good2"] == "healthy"
    # The invalid key was tried once for a request and probed once, never again.
    assert mixed.stats("bad").by_endpoint["/chat/completions"] == 1
    assert mixed.stats("busy").by_status.get(429) == 1


async def test_retry_after_is_honoured(mixed: FakeUpstream) -> None:
    async with Client(keys("busy", "good"), mixed.url) as client:
        for _ in range(6):
            await client.chat(model=MODEL, messages=HI)
        status = {k["alias"]: k for k in client.status()["keys"]}
    assert status["busy"]["state"] == "rate_limited"
    assert 0 < status["busy"]["until_in"] <= 60  # until the fake's window ends
    # One 200 and one 429 on busy, then nothing while it cools.
    assert mixed.stats("busy").by_endpoint["/chat/completions"] == 2


async def test_streaming_relays_chunks_in_order_and_accounts_usage(mixed: FakeUpstream) -> None:
    body = {"model": MODEL, "messages": HI, "stream": True, "max_tokens": 6}
    async with Client(keys("good"), mixed.url) as client:
        async with client.stream("POST", "/chat/completions", json=body) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line async for line in response.aiter_lines()]
        spend = client.status()["keys"][0]["spend"]
    data = [line for line in lines if line.startswith("data: ")]
    assert ": OPENROUTER PROCESSING" in lines
    assert data[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in data[:-1]]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content  # six content chunks, joined in order
    usage = chunks[-1]["usage"]
    assert spend == pytest.approx(usage["cost"])


async def test_mid_stream_error_is_accounted_without_retry() -> None:
    sc = scenario(good=MidStreamError(after_chunks=1, code=429), good2=Ok())
    async with FakeUpstream(sc).serve() as server:
        async with Client(keys("good", "good2"), server.url) as client:
            body = {"model": MODEL, "messages": HI, "stream": True}
            async with client.stream("POST", "/chat/completions", json=body) as response:
                text = (await response.aread()).decode()
            status = {k["alias"]: k for k in client.status()["keys"]}
    assert '"error"' in text
    # A 429 after the first token is the provider's (OpenRouter checks its own
    # limits before any work begins): counted, the key left alone.
    assert status["good"]["state"] == "healthy"
    assert status["good"]["errors"]["upstream_busy"] == 1
    assert status["good"]["in_flight"] == 0


async def test_cancelling_a_waiting_request_frees_its_key() -> None:
    async with FakeUpstream(scenario(good=Hang())).serve() as server:
        async with Client(keys("good"), server.url) as client:
            with anyio.move_on_after(0.2):
                await client.chat(model=MODEL, messages=HI)
            status = client.status()
    assert status["stats"]["inFlight"] == 0
    assert status["keys"][0]["state"] == "healthy"  # the caller gave up: not the key's fault


async def test_cancelling_mid_stream_frees_the_key() -> None:
    sc = scenario(good=SlowStream(chunk_delay=0.05))
    async with FakeUpstream(sc).serve() as server:
        async with Client(keys("good"), server.url) as client:
            body = {"model": MODEL, "messages": HI, "stream": True, "max_tokens": 50}
            got = 0
            with anyio.move_on_after(0.3):
                async with client.stream("POST", "/chat/completions", json=body) as response:
                    async for _ in response.aiter_bytes():
                        got += 1
            assert got > 0
            assert client.status()["stats"]["inFlight"] == 0
            # Leaving the block early (break) frees it too.
            async with client.stream("POST", "/chat/completions", json=body) as response:
                async for _ in response.aiter_bytes():
                    break
            assert client.status()["stats"]["inFlight"] == 0
        # The upstream sees the connections go (it notices on its next write).
        with anyio.move_on_after(3):
            while server.stats("good").disconnects < 2:
                await anyio.sleep(0.02)
        assert server.stats("good").disconnects == 2
        assert server.stats("good").in_flight == 0


async def test_first_byte_timeout_fails_over() -> None:
    async with FakeUpstream(scenario(bad=Hang(), good=Ok())).serve() as server:
        options = HTTPOptions(first_byte=1.0)
        async with Client(keys("bad", "good"), server.url, http=options) as client:
            answer = await client.request(
                "POST", "/chat/completions", json={"model": MODEL, "messages": HI}
            )
            status = client.status()
    assert answer.key == "good" and answer.attempts == 2
    assert status["stats"]["inFlight"] == 0
    assert status["keys"][0]["errors"]["transport"] == 1


async def test_parallel_chat_uses_distinct_keys() -> None:
    sc = scenario(good=Ok(), good2=Ok(), poor=Ok(), busy=Ok())
    async with FakeUpstream(sc).serve() as server:
        config = PoolConfig(
            keys=[KeySpec(key_id=k) for k in ("good", "good2", "poor", "busy")],
            policy="least_busy",
        )
        async with Client(keys("good", "good2", "poor", "busy"), server.url, config) as client:
            answers = await client.parallel_chat(
                [{"model": MODEL, "messages": HI} for _ in range(4)]
            )
    assert len(answers) == 4
    served = [entry.key for entry in server.log]
    assert sorted(served) == ["busy", "good", "good2", "poor"]


async def test_parallel_chat_partial_returns_errors_beside_results() -> None:
    bad_request = Reply(400, "invalid prompt")
    async with FakeUpstream(scenario(good=Ok(), good2=bad_request)).serve() as server:
        async with Client(keys("good", "good2"), server.url) as client:
            results = await client.parallel_chat_partial(
                [
                    {"model": MODEL, "messages": HI, "pin": "good"},
                    {"model": MODEL, "messages": HI, "pin": "good2"},
                ]
            )
            with pytest.raises(UpstreamError):
                await client.parallel_chat([{"model": MODEL, "messages": HI, "pin": "good2"}])
    assert isinstance(results[0], dict)
    assert isinstance(results[1], UpstreamError) and results[1].status == 400


async def test_every_key_rate_limited_raises_with_retry_after() -> None:
    sc = scenario(busy=RateLimit(limit=0, window=30))
    async with FakeUpstream(sc, clock=FakeClock(WINDOW_START)).serve() as server:
        async with Client(keys("busy"), server.url) as client:
            with pytest.raises(NoKeyAvailable) as info:
                await client.chat(model=MODEL, messages=HI, timeout=1.0)
    assert info.value.status == 429
    # The fake's window is fixed: the key is back when it ends, at most 30 s away.
    assert info.value.retry_after is not None and 0 < info.value.retry_after <= 30


async def test_pinning_by_alias_and_index(mixed: FakeUpstream) -> None:
    async with Client(keys("good", "good2"), mixed.url) as client:
        first = await client.request(
            "POST", "/chat/completions", json={"model": MODEL, "messages": HI}, pin="good2"
        )
        second = await client.request(
            "POST", "/chat/completions", json={"model": MODEL, "messages": HI}, pin=0
        )
    assert (first.key, second.key) == ("good2", "good")


async def test_secrets_never_leak() -> None:
    sc = scenario(bad=Invalid(), good=Ok(), good2=Reply(400, "invalid prompt"))
    async with FakeUpstream(sc).serve() as server:
        async with Client(keys("bad", "good", "good2"), server.url) as client:
            await client.chat(model=MODEL, messages=HI)
            text = repr(client) + json.dumps(client.status())
            with pytest.raises(UpstreamError) as info:
                await client.chat(model=MODEL, messages=HI, pin="good2")
            text += str(info.value) + repr(info.value.body)
    assert "invalid prompt" in text
    for secret in SECRETS.values():
        assert secret not in text


async def test_caller_authorization_is_never_forwarded(mixed: FakeUpstream) -> None:
    async with Client(keys("good"), mixed.url) as client:
        answer = await client.request(
            "POST",
            "/chat/completions",
            json={"model": MODEL, "messages": HI},
            headers={"Authorization": "Bearer caller-token", "X-Title": "tests"},
        )
    assert answer.status_code == 200
    assert mixed.log[-1].key == "good"  # the pool's key, not the caller's token


async def test_client_outside_its_block_says_how_to_use_it() -> None:
    client = Client(keys("good"), "http://127.0.0.1:9/api/v1")
    with pytest.raises(Exception, match="async with"):
        await client.chat(model=MODEL, messages=HI)


async def test_a_key_removed_after_it_was_chosen_fails_over_instead_of_erroring(
    mixed: FakeUpstream,
) -> None:
    keys = {"good": SECRETS["good"], "good2": SECRETS["good2"]}
    async with Client(keys, mixed.url) as client:
        # The race: the pool chose "good" for a request, then an operator removed
        # it before the request's task looked up its secret.
        del client.driver.secrets["good"]
        reply = await client.request(
            "POST", "/chat/completions", json={"model": MODEL, "messages": HI}, pin="good"
        )
        assert reply.status_code == 200 and reply.key == "good2" and reply.attempts == 2
        assert mixed.stats("good").requests == 0  # nothing was sent with it


async def test_a_pool_closing_under_a_step_is_the_client_closing() -> None:
    """The client's ``aclose`` marks it closed, then closes its pool, while a probe
    or a request may be opening a connection: that step raises ``KeyrotorError``
    (as a request waiting for a key does), never the pool's own error, and a probe
    ends quietly as one that got no answer."""
    async with FakeUpstream(scenario(good=Ok())).serve() as server:
        client = Client({"good": SECRETS["good"]}, base_url=server.url)
        async with client:
            pool = client._http()
            await pool.aclose()  # the pool closes under the next step...
            client._closed = True  # ...after aclose() marked the client closed
            with pytest.raises(KeyrotorError, match="closed while the request ran"):
                await client._step(Open(None, "good", SECRETS["good"]))
            heard: list[int | None] = []
            finished = client.driver.probe_finished
            client.driver.probe_finished = lambda key, status, *rest: heard.append(status)  # type: ignore[method-assign]
            await client._probe(Probe(key_id="good", reason="test"))
            client.driver.probe_finished = finished  # type: ignore[method-assign]
            assert heard == [None]


async def test_closing_the_client_blames_no_key_for_the_requests_it_cuts() -> None:
    """Requests waiting for their answer when the client closes end with
    ``KeyrotorError``; the connections the pool closed are no key's failure."""
    async with FakeUpstream(scenario(good=Hang())).serve() as server:
        client = Client({"good": SECRETS["good"]}, server.url)
        outcomes: list[str] = []

        async def one() -> None:
            try:
                await client.chat(model=MODEL, messages=HI)
            except KeyrotorError as exc:
                outcomes.append(str(exc))

        async with client, anyio.create_task_group() as tasks:
            for _ in range(3):
                tasks.start_soon(one)
            while server.stats("good").requests < 3:
                await anyio.sleep(0.01)
            await client.aclose()
        (key,) = client.status()["keys"]
    assert outcomes == ["the client was closed while the request ran"] * 3
    assert key["errors"]["transport"] == 0 and key["state"] == "healthy"


def test_a_steps_repr_never_holds_the_secret() -> None:
    """A traceback's locals (Sentry keeps them) hold the step being carried out."""
    step = Open(None, "good", SECRETS["good"])
    assert SECRETS["good"] not in repr(step) and "good" in repr(step)


async def test_the_callers_code_goes_on_after_an_aclose_inside_the_block() -> None:
    ran: list[str] = []
    async with FakeUpstream(scenario(good=Ok())).serve() as server:
        async with Client({"good": SECRETS["good"]}, server.url) as client:
            await client.aclose()
            ran.append("after aclose")
            await anyio.sleep(0)
            ran.append("after an await")
            with pytest.raises(KeyrotorError):
                await client.chat(model=MODEL, messages=HI)
        ran.append("after the block")
    assert ran == ["after aclose", "after an await", "after the block"]
