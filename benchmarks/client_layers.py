"""The client half's CPU by layer, under trio: a bare caller, the pool, the client.

Three ways to send the same ``POST /chat/completions`` to the fake upstream (in
another process), each from ``--streams`` concurrent tasks for ``--requests``
requests, in turn, ``--rounds`` times; the figure is the CPU of this process's
thread per request (the upstream's is not counted):

- **bare**: a raw non-blocking socket per task and httptools, what the floor's
  upstream half does (``proxy_floor``): no pool, no timeouts, no keys;
- **pool**: keyrotor's connection pool alone (``ConnectionPool.request`` and
  ``aread``, one key's header);
- **client**: keyrotor's async client (``AsyncClient.request``: the driver, the
  core, the exchange steps, the answer's usage read), four keys.

Run:

    python -m benchmarks.client_layers [--requests 4000] [--streams 16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import httptools
import trio

from benchmarks.proxy_floor import (
    _Message,
    _trio_connect,
    _trio_receive,
    _trio_send,
    _upstream_head,
)
from benchmarks.transport_overhead import BODY, SECRETS, pool_post, start_upstream
from keyrotor.transports import _h11pool as h11pool
from keyrotor.transports._async import AsyncClient

LAYERS = ("bare", "pool", "client")


async def measure(url: str, requests: int, streams: int, rounds: int) -> dict[str, list[float]]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    address = (parts.hostname, parts.port)
    host = f"{parts.hostname}:{parts.port}".encode()
    path = (parts.path + "/chat/completions").encode()
    key = next(iter(SECRETS.values())).encode()
    options = h11pool.PoolOptions(max_connections=streams * 2)
    async with h11pool.ConnectionPool(options) as pool, AsyncClient(SECRETS, url) as client:

        async def bare(count: int) -> None:
            sock = await _trio_connect(address)
            try:
                for _ in range(count):
                    await _trio_send(sock, _upstream_head(path, host, key, len(BODY)) + BODY)
                    answer = _Message()
                    parser = httptools.HttpResponseParser(answer)
                    while not answer.done:
                        parser.feed_data(await _trio_receive(sock))
                    b"".join(answer.body)
            finally:
                sock.close()

        async def through_pool(count: int) -> None:
            for _ in range(count):
                await pool_post(pool, url)

        async def through_client(count: int) -> None:
            for _ in range(count):
                await client.request("POST", "/chat/completions", content=BODY)

        senders: dict[str, Callable[[int], Awaitable[None]]] = {
            "bare": bare,
            "pool": through_pool,
            "client": through_client,
        }

        async def run(layer: str, count: int) -> float:
            started = time.thread_time()
            async with trio.open_nursery() as nursery:
                for _ in range(streams):
                    nursery.start_soon(senders[layer], count // streams)
            return (time.thread_time() - started) / (count // streams * streams) * 1e6

        for layer in LAYERS:  # warm up: connections open, caches warm
            await run(layer, streams * 50)
        figures: dict[str, list[float]] = {layer: [] for layer in LAYERS}
        for _ in range(rounds):
            for layer in LAYERS:
                figures[layer].append(await run(layer, requests))
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000, help="per layer and round (4000)")
    parser.add_argument("--streams", type=int, default=16, help="concurrent tasks (16)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.streams < 1 or args.rounds < 1 or args.requests < args.streams:
        parser.error("--streams and --rounds must be at least 1, --requests at least --streams")
    proc, url = start_upstream()
    try:
        figures = trio.run(measure, url, args.requests, args.streams, args.rounds)
    finally:
        proc.kill()
        proc.wait()
    print(
        f"{args.requests:,} requests a layer and round, {args.streams} tasks, {args.rounds} "
        "rounds; µs of CPU a request (this thread)\n"
    )
    print("| layer | each round | median | over the layer below |")
    print("|---|---|---:|---:|")
    below = None
    for layer in LAYERS:
        median = statistics.median(figures[layer])
        each = " / ".join(f"{f:.0f}" for f in figures[layer])
        extra = "" if below is None else f"+{median - below:.0f}"
        print(f"| {layer} | {each} | {median:.0f} | {extra} |")
        below = median
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
