"""What each client adds over its bare HTTP client, per request.

Both send the same sequential keep-alive ``POST /chat/completions`` to the
fake upstream, interleaved round by round in one run:

- **bare**: keyrotor's h11 pool (``_h11pool.ConnectionPool``) alone, one key
  (backend ``sync``: ``httpcore.ConnectionPool``, the blocking client's stack);
- **client**: ``keyrotor.transports.<backend>.Client`` with 4 keys: the pool's
  decisions, the driver, usage accounting, the timer and probe tasks.

The upstream runs in another process (as the proxy's upstream would), so the
client's CPU is not shared with the server's event loop. Run:

    python -m benchmarks.transport_overhead --requests 2000
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import anyio

from keyrotor.transports import _h11pool as h11pool
from keyrotor.transports._async import AsyncClient

BODY = json.dumps(
    {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
).encode()
SECRETS = {f"key{i}": f"sk-or-v1-bench-{i:04d}-0000000000000000" for i in range(4)}
HEADERS = [
    (b"Authorization", b"Bearer " + next(iter(SECRETS.values())).encode()),
    (b"Content-Type", b"application/json"),
]
"""A bare request's headers: the first key's, as a client with one key sends them."""


async def pool_post(pool: h11pool.ConnectionPool, url: str) -> None:
    """``POST url/chat/completions`` through keyrotor's pool alone, its body read."""
    response = await pool.request(
        b"POST", url + "/chat/completions", HEADERS, BODY, read_timeout=30.0
    )
    try:
        await response.aread()
    finally:
        await response.aclose()


def start_upstream() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keyrotor.testing.fake_upstream",
            "--port",
            "0",
            "--scenario",
            "open",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        raise SystemExit(f"the fake upstream did not start: {url!r}")
    return proc, url


async def measure(send: Callable[[], Awaitable[None]], n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        await send()
        times.append(time.perf_counter() - t0)
    return times


async def run(url: str, n: int, rounds: int, warmup: int) -> dict[str, list[list[float]]]:
    results: dict[str, list[list[float]]] = {"bare": [], "client": []}
    async with h11pool.ConnectionPool() as pool, AsyncClient(SECRETS, url) as client:

        async def bare() -> None:
            await pool_post(pool, url)

        async def through_pool() -> None:
            await client.request("POST", "/chat/completions", content=BODY)

        await measure(bare, warmup)
        await measure(through_pool, warmup)
        for _ in range(rounds):
            results["bare"].append(await measure(bare, n))
            results["client"].append(await measure(through_pool, n))
    return results


def run_sync(url: str, n: int, rounds: int, warmup: int) -> dict[str, list[list[float]]]:
    """The blocking client against httpcore alone, the same way."""
    import httpcore

    from keyrotor.transports.sync import Client

    results: dict[str, list[list[float]]] = {"bare": [], "client": []}
    with httpcore.ConnectionPool() as pool, Client(SECRETS, url) as client:

        def bare() -> None:
            pool.request("POST", url + "/chat/completions", headers=HEADERS, content=BODY)

        def through_pool() -> None:
            client.request("POST", "/chat/completions", content=BODY)

        def measure_sync(send: Callable[[], None], count: int) -> list[float]:
            times = []
            for _ in range(count):
                t0 = time.perf_counter()
                send()
                times.append(time.perf_counter() - t0)
            return times

        measure_sync(bare, warmup)
        measure_sync(through_pool, warmup)
        for _ in range(rounds):
            results["bare"].append(measure_sync(bare, n))
            results["client"].append(measure_sync(through_pool, n))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", nargs="*", default=["asyncio", "trio", "sync"])
    args = parser.parse_args()
    proc, url = start_upstream()
    try:
        print(f"{args.rounds} interleaved rounds x {args.requests} sequential requests")
        print()
        print("| backend | side | p50 µs | p99 µs | rps | added p50 µs | added p99 µs |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for backend in args.backends:
            if backend == "sync":
                results = run_sync(url, args.requests, args.rounds, 200)
            else:
                results = anyio.run(run, url, args.requests, args.rounds, 200, backend=backend)
            summary = {}
            for side, rounds in results.items():
                p50 = statistics.median(statistics.median(r) for r in rounds) * 1e6
                p99 = statistics.median(statistics.quantiles(r, n=100)[98] for r in rounds) * 1e6
                rps = statistics.median(len(r) / sum(r) for r in rounds)
                summary[side] = (p50, p99, rps)
            for side in ("bare", "client"):
                p50, p99, rps = summary[side]
                added = ""
                if side == "client":
                    added = f" {p50 - summary['bare'][0]:+.0f} | {p99 - summary['bare'][1]:+.0f} |"
                else:
                    added = " | |"
                print(f"| {backend} | {side} | {p50:.0f} | {p99:.0f} | {rps:,.0f} |{added}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
