"""What a route costs, in process: the proxy's application, plain against routed requests.

The proxy's application (``open_app``: the client, the pool, the router, the
spend and analytics records; no server, no state file) answers ``Request``
objects in this process, against the fake upstream in another. Blocks of
plain requests (``proxy_load``'s model) and of routed ones (its ``bench``
route: the cheaper of two models) alternate, each from ``--concurrency``
tasks; the figure is this thread's CPU a request, and the ratio routed over
plain is taken per pair of blocks (the median of the pairs). Without the
server, the load generator and a second process in the measure, it is steadier
than ``proxy_pairs . . --b-route`` and says how much of a routed request's CPU
the route is.

Run:

    python -m benchmarks.route_cost [--blocks 20] [--requests 1000] [--stream] [--prompt-kb 0]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import trio

from benchmarks.proxy_load import FAKE_KEYS, MODEL, ROUTE, ROUTE_CONFIG, chat_body, start_upstream
from keyrotor.adapters.config import load_config
from keyrotor.adapters.proxy.runtime import open_app
from keyrotor.adapters.proxy.types import App, Request

HEADERS = [("content-type", "application/json"), ("host", "127.0.0.1")]


async def answer(app: App, body: bytes) -> None:
    """One request through the application, its body read to the end."""
    request = Request(method="POST", target="/v1/chat/completions", headers=HEADERS, body=body)
    response = await app(request)
    if response.status != 200:
        raise SystemExit(f"route_cost: the proxy answered {response.status}: {response.body!r}")
    if not isinstance(response.body, bytes):
        async for _ in response.body:
            pass
    if response.aclose is not None:
        await response.aclose()


async def block(app: App, body: bytes, requests: int, concurrency: int) -> float:
    """µs of this thread's CPU a request over ``requests`` requests."""

    async def task(count: int) -> None:
        for _ in range(count):
            await answer(app, body)

    started = time.thread_time()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(task, requests // concurrency)
    return (time.thread_time() - started) / (requests // concurrency * concurrency) * 1e6


async def measure(url: str, folder: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    path = folder / "keyrotor.toml"
    path.write_text(ROUTE_CONFIG)
    overrides = {"upstream": url, "state.enabled": False}
    config = load_config(str(path), {"OPENROUTER_KEYS": ",".join(FAKE_KEYS)}, overrides)
    kinds = {
        name: chat_body(stream=args.stream, model=model, prompt_kb=args.prompt_kb)
        for name, model in (("plain", MODEL), ("routed", ROUTE))
    }
    figures: dict[str, list[float]] = {name: [] for name in kinds}
    async with open_app(config, lambda record: None) as app:
        for body in kinds.values():  # warm-up: connections, caches, the catalog
            await block(app, body, 2000, args.concurrency)
        for index in range(args.blocks):
            order = list(kinds) if index % 2 == 0 else list(reversed(kinds))
            for name in order:
                figures[name].append(await block(app, kinds[name], args.requests, args.concurrency))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=20, help="pairs of blocks (20)")
    parser.add_argument("--requests", type=int, default=1000, help="requests a block (1000)")
    parser.add_argument("--concurrency", type=int, default=16, help="tasks a block (16)")
    parser.add_argument("--stream", action="store_true", help="SSE instead of JSON")
    parser.add_argument("--prompt-kb", type=int, default=0, help="KB of earlier turns (0)")
    args = parser.parse_args()
    with ExitStack() as stack, tempfile.TemporaryDirectory() as folder:
        _, url = start_upstream(stack)
        figures = trio.run(measure, url, Path(folder), args)
    plain, routed = figures["plain"], figures["routed"]
    ratios = sorted(r / p for p, r in zip(plain, routed, strict=True))
    quartiles = statistics.quantiles(ratios, n=4)
    body = "SSE" if args.stream else "JSON"
    print(
        f"{args.blocks} pairs of {args.requests} requests, {body}, {args.prompt_kb} KB of prompt\n"
    )
    print("| requests | µs a request (median of blocks) | routed / plain (median of pairs) |")
    print("|---|---:|---|")
    print(f"| plain | {statistics.median(plain):.1f} | |")
    print(
        f"| routed | {statistics.median(routed):.1f} | **{statistics.median(ratios):.3f}** "
        f"(quartiles {quartiles[0]:.3f} - {quartiles[2]:.3f}) |"
    )


if __name__ == "__main__":
    main()
