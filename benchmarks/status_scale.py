"""What polling the operator endpoints costs the proxied requests of a big pool.

    .venv/bin/python -m benchmarks.status_scale [--keys 10000] [--duration 8]
        [--rate 50] [--only status,metrics] [--pollers 1] [--interval 1.0]
        [--before /path/to/another/tree] [--no-populate]

Starts the fake upstream and ``keyrotor serve`` (``benchmarks.proxy_load``'s
helpers: a pool of ``--keys`` fake keys, state file on, the ``bench`` route,
an admin token and a client token), sends one request per key (so that every
key has counters and spend), then for each endpoint: ``--duration`` s of
proxied JSON requests at ``--rate`` requests/s, open loop (latency from the
scheduled time: a request queued behind a stalled event loop counts its wait),
without and then with ``--pollers`` connections (a child process each) calling
the endpoint every ``--interval`` s (0: back to back). With ``--before TREE``
the same runs against that tree's proxy too (its ``keyrotor`` package, e.g. a
``git worktree`` of an older revision), the two interleaved endpoint by
endpoint, so that a noisy machine weighs on both alike.

The report (Markdown, on stdout; progress on stderr): per endpoint and tree,
the endpoint's time per call (median, max) and body size, and the proxied
requests' p50, p99 and max without and with the pollers; the max is the
longest stall a proxied request met. Only 127.0.0.1 is contacted; every child
is stopped on exit. A default run with ``--before`` takes about 5 minutes.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11

from benchmarks.proxy_load import (
    LOOPBACK,
    MODEL,
    ROOT,
    Endpoint,
    RequestSpec,
    RunResult,
    chat_body,
    closed_loop,
    open_loop,
    pct,
    run_main,
    run_trio,
    start_keyrotor,
    start_upstream,
)

ADMIN = "status-scale-admin-token-0123456789abcdef"
CLIENT = "status-scale-client-token-0123456789abcdef"
ENDPOINTS = {  # name: (method, path, token)
    "healthz": ("GET", "/healthz", None),
    "status": ("GET", "/status", CLIENT),
    "status_head": ("HEAD", "/status", CLIENT),
    "metrics": ("GET", "/metrics", CLIENT),
    "v1_key": ("GET", "/v1/key", CLIENT),
    "admin_keys": ("GET", "/admin/keys", ADMIN),
    "admin_key": ("GET", "/admin/keys/k5", ADMIN),
}


@dataclass
class Proxy:
    tree: str
    endpoint: Endpoint
    spec: RequestSpec


def proxied_spec(endpoint: Endpoint) -> RequestSpec:
    """A chat request with the client token."""
    body = chat_body(stream=False, model=MODEL)
    headers = [
        (b"host", f"{endpoint.host}:{endpoint.port}".encode()),
        (b"authorization", b"Bearer " + CLIENT.encode()),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    writer = h11.Connection(h11.CLIENT)
    request = h11.Request(method=b"POST", target=endpoint.path, headers=headers)
    events = (request, h11.Data(data=body), h11.EndOfMessage())
    return RequestSpec(endpoint, False, b"".join(writer.send(e) or b"" for e in events))


def load(spec: RequestSpec, rate: float, duration: float) -> RunResult:
    result = RunResult("proxy", "open", False, 0)

    async def run() -> None:
        await open_loop(spec, result, rate=rate, duration=duration, prewarm=8, max_connections=64)

    run_trio(run)
    return result


def populate(proxy: Proxy, requests: int) -> None:
    """At least ``requests`` chats, 8 at a time (the pool turns over every key)."""
    done = 0
    while done < requests:
        result = RunResult("proxy", "closed", False, 0)

        async def run(result: RunResult = result) -> None:
            await closed_loop(proxy.spec, result, concurrency=8, duration=2.0)

        run_trio(run)
        done += result.ok
        if result.error_count:
            print(f"{proxy.tree}: populate errors {dict(result.errors)}", file=sys.stderr)


def poll(port: int, method: str, path: str, token: str, interval: float, duration: float) -> None:
    """The poller child: one connection, a JSON line per call on stdout."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=120)
    headers = {"authorization": f"Bearer {token}"} if token != "-" else {}
    start = time.monotonic()
    due = start
    while due - start < duration:
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        sent = time.monotonic()
        try:
            conn.request(method, path, headers=headers)
            answer = conn.getresponse()
            size = len(answer.read())
            line: dict[str, Any] = {
                "status": answer.status,
                "secs": time.monotonic() - sent,
                "bytes": size,
            }
        except (OSError, http.client.HTTPException) as exc:
            line = {"status": 0, "error": type(exc).__name__}
            conn.close()
            conn = http.client.HTTPConnection(LOOPBACK, port, timeout=120)
        print(json.dumps(line), flush=True)
        due = max(due + interval, time.monotonic()) if interval else time.monotonic()


def polled(
    proxy: Proxy, name: str, args: argparse.Namespace
) -> tuple[RunResult, list[dict[str, Any]]]:
    """The load while the pollers call ``name``; their lines."""
    method, path, token = ENDPOINTS[name]
    command = [sys.executable, "-m", "benchmarks.status_scale", "--poll", str(proxy.endpoint.port)]
    command += [method, path, token or "-", str(args.interval), str(args.duration + 0.5)]
    with ExitStack() as stack:
        pollers = [
            stack.enter_context(
                subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
            )
            for _ in range(args.pollers)
        ]
        time.sleep(0.3)
        result = load(proxy.spec, args.rate, args.duration)
        lines = []
        for poller in pollers:
            out, _ = poller.communicate(timeout=300)
            lines += [json.loads(line) for line in out.splitlines() if line.strip()]
    return result, lines


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f}" if seconds >= 0.0095 else f"{seconds * 1e3:.1f}"


def latencies(result: RunResult) -> str:
    lat = sorted(result.latencies)
    if not lat:
        return "no answer"
    errors = f" ({result.error_count} errors)" if result.error_count else ""
    return f"{ms(pct(lat, 0.5))} / {ms(pct(lat, 0.99))} / {ms(max(lat))}{errors}"


def calls(lines: list[dict[str, Any]]) -> tuple[str, str]:
    """The endpoint's calls that answered 200: how many, median / max time; its size."""
    ok = [line for line in lines if line.get("status") == 200]
    if not ok:
        return f"none of {len(lines)} answered 200", ""
    secs = [line["secs"] for line in ok]
    return f"{len(ok)}: {ms(statistics.median(secs))} / {ms(max(secs))}", f"{ok[-1]['bytes']:,}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per run")
    parser.add_argument("--rate", type=float, default=50.0, help="proxied requests/s")
    parser.add_argument("--only", default="", help="endpoints, comma-separated")
    parser.add_argument("--pollers", type=int, default=1, help="connections polling")
    parser.add_argument("--interval", type=float, default=1.0, help="s between calls (0: none)")
    parser.add_argument("--before", type=Path, help="another tree, measured alongside")
    parser.add_argument("--no-populate", action="store_true", help="no request per key first")
    parser.add_argument("--poll", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.poll:
        port, method, path, token, interval, duration = args.poll
        poll(int(port), method, path, token, float(interval), float(duration))
        return 0
    names = [n for n in args.only.split(",") if n] or list(ENDPOINTS)
    unknown = sorted(set(names) - set(ENDPOINTS))
    if unknown or args.keys < 10 or args.pollers < 1 or args.rate <= 0 or args.duration <= 0:
        parser.error(f"unknown endpoints {unknown}" if unknown else "a value is out of range")
    os.environ["KEYROTOR_ADMIN_TOKEN"] = ADMIN
    os.environ["KEYROTOR_CLIENT_TOKENS"] = CLIENT
    trees = {"this tree": ROOT}
    if args.before is not None:
        trees["before"] = args.before.resolve()
    rows = []
    with ExitStack() as stack:
        _, upstream = start_upstream(stack)
        proxies = []
        for label, tree in trees.items():
            _, endpoint = start_keyrotor(
                stack, upstream, state=True, route=True, keys=args.keys, tree=tree
            )
            proxy = Proxy(label, endpoint, proxied_spec(endpoint))
            if not args.no_populate:
                started = time.monotonic()
                populate(proxy, int(args.keys * 1.1))
                took = time.monotonic() - started
                print(f"{label}: populated in {took:.0f} s", file=sys.stderr, flush=True)
            proxies.append(proxy)
        for name in names:
            for proxy in proxies:
                quiet = load(proxy.spec, args.rate, args.duration)
                busy, lines = polled(proxy, name, args)
                row = [name, proxy.tree, *calls(lines), latencies(quiet), latencies(busy)]
                print(" | ".join(row), file=sys.stderr, flush=True)
                rows.append(row)
    poller = (
        f"{args.pollers} connection(s), every {args.interval:g} s"
        if args.interval
        else (f"{args.pollers} connection(s), back to back")
    )
    print(f"## Operator endpoints, {args.keys:,} keys\n")
    print(
        f"Proxied JSON chats at {args.rate:g}/s, open loop, {args.duration:g} s per run; "
        f"the endpoint polled by {poller}. Times in ms; proxied: p50 / p99 / max "
        "(max: the longest stall a request met).\n"
    )
    print("| endpoint | tree | calls: median / max | body bytes | proxied, alone | polled |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    run_main(main)
