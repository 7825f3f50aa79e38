"""One conformance script, run through every transport: sync, asyncio and trio.

The same scripted upstream and the same calls must give the same sequence of
keys and the same outcomes, whatever the concurrency model.
"""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import pytest

from keyrotor.core import KeySpec, PoolConfig
from keyrotor.testing import (
    Credits,
    FakeClock,
    FakeUpstream,
    Flaky,
    Invalid,
    Ok,
    RateLimit,
    Reply,
    Scenario,
)
from keyrotor.transports import sync
from keyrotor.transports._async import AsyncClient
from keyrotor.transports.errors import KeyrotorError

MODEL = "openai/gpt-4o-mini"
HI = [{"role": "user", "content": "hi"}]
SECRETS = {
    "good": "sk-or-v1-conformance-good-0000000000001",
    "bad": "sk-or-v1-conformance-bad-00000000000002",
    "poor": "sk-or-v1-conformance-poor-0000000000003",
    "busy": "sk-or-v1-conformance-busy-0000000000004",
    "flaky": "sk-or-v1-conformance-flaky-000000000005",
    "picky": "sk-or-v1-conformance-picky-000000000006",
}
CONFIG = PoolConfig(keys=[KeySpec(key_id=alias) for alias in SECRETS], max_attempts=4)
CALLS = 10


def scenario() -> Scenario:
    sc = Scenario()
    behaviours = {
        "good": Ok(),
        "bad": Invalid(),
        "poor": Credits(0.0),
        "busy": RateLimit(limit=1, window=60),
        "flaky": Flaky(status=502, every=2),
        "picky": Reply(400, "invalid prompt"),
    }
    for alias, behaviour in behaviours.items():
        sc.add(SECRETS[alias], behaviour, alias=alias)
    return sc


def outcome(result: Any) -> Any:
    """What a call ended with, in transport-neutral terms."""
    if isinstance(result, KeyrotorError):
        return ("error", type(result).__name__, getattr(result, "status", None))
    return ("ok", result.status_code, result.key, result.attempts)


def probed(server: FakeUpstream) -> bool:
    """The invalid key's probe has been answered: the probe runs beside the
    requests (the sync client's on its timer and worker threads), so a loaded
    machine may end the script before it; each runner waits for it."""
    return any(e.key == "bad" and e.path == "/key" for e in server.log)


def summary(server: FakeUpstream, results: list[Any], status: dict[str, Any]) -> dict[str, Any]:
    # Probes run concurrently with requests, so only their count is compared.
    return {
        "results": results,
        "keys_seen": [(e.key, e.path, e.status) for e in server.log if e.path != "/key"],
        "probes": sorted((e.key, e.status) for e in server.log if e.path == "/key"),
        "states": {key["alias"]: key["state"] for key in status["keys"]},
        "in_flight": status["stats"]["inFlight"],
    }


def run_sync() -> dict[str, Any]:
    clock = FakeClock(1_000.0)
    with FakeUpstream.running_in_thread(scenario(), clock=clock) as server:
        with sync.Client(SECRETS, server.url, CONFIG) as client:
            results = []
            for _ in range(CALLS):
                try:
                    results.append(
                        outcome(
                            client.request(
                                "POST", "/chat/completions", json={"model": MODEL, "messages": HI}
                            )
                        )
                    )
                except KeyrotorError as exc:
                    results.append(outcome(exc))
            body = {"model": MODEL, "messages": HI, "stream": True}
            with client.stream("POST", "/chat/completions", json=body, pin="good") as stream:
                lines = list(stream.iter_lines())
            results.append(("stream", stream.key, [x for x in lines if x][-1]))
            deadline = time.monotonic() + 30  # a hang guard only
            while not probed(server) and time.monotonic() < deadline:
                time.sleep(0.01)
            return summary(server, results, client.status())


def run_async(backend: str) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        clock = FakeClock(1_000.0)
        async with FakeUpstream(scenario(), clock=clock).serve() as server:
            async with AsyncClient(SECRETS, server.url, CONFIG) as client:
                results = []
                for _ in range(CALLS):
                    try:
                        results.append(
                            outcome(
                                await client.request(
                                    "POST",
                                    "/chat/completions",
                                    json={"model": MODEL, "messages": HI},
                                )
                            )
                        )
                    except KeyrotorError as exc:
                        results.append(outcome(exc))
                body = {"model": MODEL, "messages": HI, "stream": True}
                async with client.stream("POST", "/chat/completions", json=body, pin="good") as s:
                    lines = [line async for line in s.aiter_lines()]
                results.append(("stream", s.key, [x for x in lines if x][-1]))
                with anyio.move_on_after(30):  # a hang guard only
                    while not probed(server):
                        await anyio.sleep(0.01)
                return summary(server, results, client.status())

    return anyio.run(main, backend=backend)


@pytest.fixture(scope="module")
def runs() -> dict[str, dict[str, Any]]:
    return {"sync": run_sync(), "asyncio": run_async("asyncio"), "trio": run_async("trio")}


def test_every_transport_gives_the_same_keys_and_outcomes(runs: dict[str, Any]) -> None:
    reference = json.dumps(runs["sync"], sort_keys=True)
    for name in ("asyncio", "trio"):
        assert json.dumps(runs[name], sort_keys=True) == reference, name


def test_the_script_exercises_failover_and_passthrough(runs: dict[str, Any]) -> None:
    run = runs["sync"]
    results = run["results"]
    assert results[0] == ("ok", 200, "good", 1)
    # bad (401) -> poor (402) -> busy: three attempts, the caller sees one 200.
    assert results[1] == ("ok", 200, "busy", 3)
    assert ("ok", 400, "picky", 1) in results  # a caller error passes through unchanged
    assert all(r[0] == "ok" for r in results[:CALLS])
    assert run["states"] == {
        "good": "healthy",
        "bad": "failed",
        "poor": "depleted",
        "busy": "rate_limited",
        "flaky": "healthy",  # one 502 never blames a key
        "picky": "healthy",
    }
    assert run["results"][-1] == ("stream", "good", "data: [DONE]")
    assert run["in_flight"] == 0
    # The invalid key saw one request and one probe, nothing more.
    assert [k for k in run["keys_seen"] if k[0] == "bad"] == [("bad", "/chat/completions", 401)]
    assert run["probes"] == [("bad", 401)]


def chat_and_strict_pin_sync() -> list[Any]:
    with FakeUpstream.running_in_thread(scenario(), clock=FakeClock(1_000.0)) as server:
        with sync.Client(SECRETS, server.url, CONFIG) as client:
            answer = client.chat(model=MODEL, messages=HI, pin="good", max_tokens=3, session="s")
            body = {"model": MODEL, "messages": HI}
            try:
                client.send("POST", "/chat/completions", json=body, pin="gone", pin_fallback=False)
            except KeyrotorError as exc:
                refused = outcome(exc)
            return [answer, server.log[-1].key, refused, client.status()["stats"]["inFlight"]]


def chat_and_strict_pin_async(backend: str) -> list[Any]:
    async def main() -> list[Any]:
        async with FakeUpstream(scenario(), clock=FakeClock(1_000.0)).serve() as server:
            async with AsyncClient(SECRETS, server.url, CONFIG) as client:
                answer = await client.chat(
                    model=MODEL, messages=HI, pin="good", max_tokens=3, session="s"
                )
                body = {"model": MODEL, "messages": HI}
                try:
                    await client.send(
                        "POST", "/chat/completions", json=body, pin="gone", pin_fallback=False
                    )
                except KeyrotorError as exc:
                    refused = outcome(exc)
                return [answer, server.log[-1].key, refused, client.status()["stats"]["inFlight"]]

    return anyio.run(main, backend=backend)


@pytest.mark.parametrize("transport", ["sync", "asyncio", "trio"])
def test_chat_routes_by_its_pool_options_and_sends_the_rest(transport: str) -> None:
    """``chat``'s ``pin``/``session`` go to the pool, ``max_tokens`` into the
    body; ``send(pin_fallback=False)`` refuses an unknown key with a 400."""
    if transport == "sync":
        answer, key, refused, in_flight = chat_and_strict_pin_sync()
    else:
        answer, key, refused, in_flight = chat_and_strict_pin_async(transport)
    assert key == "good"
    assert answer["usage"]["completion_tokens"] == 3  # max_tokens reached the upstream
    assert refused == ("error", "NoKeyAvailable", 400)
    assert in_flight == 0
