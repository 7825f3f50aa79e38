"""``keyrotor demo``: the live proxy in front of the bundled fake upstream.

Everything runs in one process on 127.0.0.1, with no API key and no network:
the fake upstream (some keys healthy, one revoked, one running out of credits,
one rate limited, one flaky), the proxy with those keys, and a client sending
traffic through it. The terminal shows which key served each request, every
change of a key's state, and how the pool recovers.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

import trio

from ...core import KeySpec, PoolConfig
from ...testing import Credits, FakeUpstream, Flaky, Invalid, Ok, RateLimit, Scenario
from ...transports.api import ConnectionPool
from ..config import ProxyConfig
from .main import run_proxy

__all__ = ["run_demo"]

KEYS = {
    "alpha": ("sk-or-v1-demo-alpha-000000000000000001", Ok(), "healthy"),
    "bravo": ("sk-or-v1-demo-bravo-000000000000000002", Invalid(), "revoked: every call is 401"),
    "charlie": (
        "sk-or-v1-demo-charlie-0000000000000000003",
        Credits(0.00003),
        "about 6 requests of credits, then 402",
    ),
    "delta": (
        "sk-or-v1-demo-delta-000000000000000004",
        RateLimit(limit=2, window=4.0),
        "2 requests per 4 s, then 429 with Retry-After",
    ),
    "echo": (
        "sk-or-v1-demo-echo-0000000000000000005",
        Flaky(status=502, first=6),
        "its first 6 calls fail with 502",
    ),
}


def _paint(text: str, code: str, color: bool) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if color else text


async def _demo(out: TextIO, requests: int, interval: float, color: bool) -> dict[str, int]:
    scenario = Scenario()
    for alias, (secret, behaviour, _) in KEYS.items():
        scenario.add(secret, behaviour, alias=alias)
    outcome = {"ok": 0, "error": 0}
    started = time.monotonic()

    def stamp() -> str:
        return f"{time.monotonic() - started:5.1f}s"

    def log(record: dict[str, Any]) -> None:
        if record.get("event") == "key_state":
            until = record.get("until")
            wait = ""
            if until is not None:
                wait = f" for {max(until - record['now'], 0):.1f} s"
            line = (
                f"  {stamp()}  key {record['key_id']:<8} {record['old']} -> {record['new']}"
                f" ({record['reason']}){wait}"
            )
            print(_paint(line, "33", color), file=out, flush=True)

    async with FakeUpstream(scenario).serve() as upstream:
        config = ProxyConfig(
            keys={alias: secret for alias, (secret, _, _) in KEYS.items()},
            pool=PoolConfig(
                keys=[KeySpec(key_id=alias) for alias in KEYS],
                degraded_cooldown=3.0,
                error_window=4.0,
                error_min_requests=3,
                recheck_interval=5.0,
                max_attempts=4,
            ),
            upstream=upstream.url,
            server={"host": "127.0.0.1", "port": 0},
        )
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                lambda task_status: run_proxy(
                    config, log=log, shutdown=shutdown, task_status=task_status
                )
            )
            base = f"http://127.0.0.1:{port}"
            print(f"keyrotor demo: the proxy listens on {base}/v1 in front of a fake", file=out)
            print("OpenRouter on 127.0.0.1 (no network, no API key). Its keys:", file=out)
            for alias, (_, _, note) in KEYS.items():
                print(f"  {alias:<8} {note}", file=out)
            print(file=out)
            async with ConnectionPool() as client:
                for i in range(1, requests + 1):
                    stream = i % 4 == 0
                    body = json.dumps(
                        {
                            "model": "openai/gpt-4o-mini",
                            "messages": [{"role": "user", "content": f"question {i}"}],
                            "stream": stream,
                        }
                    ).encode()
                    response = await client.request(
                        b"POST",
                        f"{base}/v1/chat/completions",
                        [(b"content-type", b"application/json")],
                        body,
                        read_timeout=30.0,
                    )
                    try:
                        await response.aread()
                    finally:
                        await response.aclose()
                    headers = {k.decode(): v.decode() for k, v in response.headers}
                    key = headers.get("x-keyrotor-key", "-")
                    attempts = int(headers.get("x-keyrotor-attempts", "0"))
                    ok = response.status == 200
                    outcome["ok" if ok else "error"] += 1
                    kind = "stream" if stream else "json  "
                    failover = f" after {attempts} attempts" if attempts > 1 else ""
                    verdict = _paint(str(response.status), "32" if ok else "31", color)
                    print(
                        f"  {stamp()}  request {i:<3} {kind} {verdict} from {key:<8}{failover}",
                        file=out,
                        flush=True,
                    )
                    await trio.sleep(interval)
                status_response = await client.request(
                    b"GET", f"{base}/status", [], read_timeout=10.0
                )
                status = json.loads(await status_response.aread())
                await status_response.aclose()
            shutdown.set()
    print("\nthe pool now (GET /status):", file=out)
    for key in status["keys"]:
        print(
            f"  {key['alias']:<8} {key['state']:<12} requests={key['requests']:<3} "
            f"ok={key['successes']:<3} spend=${key['spend']:.6f}",
            file=out,
        )
    verdict = (
        "the caller never saw a bad key."
        if outcome["ok"] == requests
        else f"{outcome['error']} failed: the pool did not hide every fault."
    )
    print(
        f"\n{outcome['ok']} of {requests} requests answered 200 through the proxy: {verdict}",
        file=out,
    )
    return outcome


def run_demo(
    out: TextIO = sys.stdout, requests: int = 40, interval: float = 0.25, color: bool = False
) -> dict[str, int]:
    """Run the live demo; returns how many requests got 200 and how many did not."""
    result: dict[str, int] = trio.run(_demo, out, requests, interval, color)
    return result
