"""Staleness of shared key health: one proxy's 429 to another treating the key as cooling.

Two ``keyrotor serve --shared redis://...`` processes (each its own process,
its own trio loop, its own Redis connection) in front of one fake upstream, a
real ``redis-server`` on a free loopback port. For each round a different key
starts answering 429 (``Retry-After: 2``); one request pinned to it goes to
process A (which fails over to another key and publishes the change); the
benchmark reads process B's dashboard event stream and notes when B's ``key``
event for that key arrives. Reported: the time from A's answer reaching the
client to B's event reaching the client (what the other process lags behind,
its own event-stream delivery included), and from sending to A.

Run:

    python -m benchmarks.shared --rounds 200
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from benchmarks.proxy_load import child, free_port, start_redis, wait_ready
from keyrotor.testing import Custom, FakeUpstream, Ok, Reply, Scenario

KEYS = 40
CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def start_proxy(stack: ExitStack, upstream: str, redis: str, keys: dict[str, str]) -> str:
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    config = folder / "keyrotor.toml"
    config.write_text(
        f'upstream = "{upstream}"\n[state]\nenabled = false\n[catalog]\nenabled = false\n'
        f'[shared]\nurl = "{redis}"\n'
        + "".join(f'[[keys]]\nalias = "{a}"\nsecret_env = "K_{a.upper()}"\n' for a in keys)
    )
    env = {**os.environ, **{f"K_{a.upper()}": s for a, s in keys.items()}}
    port = free_port()
    cmd = [sys.executable, "-m", "keyrotor.cli", "serve", "--config", str(config), "--port",
           str(port)]  # fmt: skip
    proxy = stack.enter_context(child("keyrotor proxy", cmd, env, stdout=False))
    if wait_ready(proxy, port, "/healthz") is None:
        raise SystemExit(f"the proxy did not start:\n{proxy.log_tail()}")
    return f"http://127.0.0.1:{port}"


def read_events(url: str, found: queue.Queue[tuple[float, dict[str, object]]]) -> None:
    with httpx.Client(timeout=None) as http, http.stream("GET", f"{url}/dashboard/events") as s:
        event = None
        for line in s.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "key":
                found.put((time.perf_counter(), json.loads(line[6:])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    keys = {f"k{i}": f"sk-or-v1-stale-{i}-" + "jk" * 12 for i in range(KEYS)}
    fake = Scenario()
    for alias, secret in keys.items():
        fake.add(secret, Ok(), alias=alias)
    limited = Custom(lambda call: Reply(429, "Rate limit exceeded", headers={"retry-after": "2"}))
    after_answer: list[float] = []
    after_send: list[float] = []
    with ExitStack() as stack:
        upstream = stack.enter_context(FakeUpstream.running_in_thread(fake))
        redis = start_redis(stack)
        a = start_proxy(stack, upstream.url, redis, keys)
        b = start_proxy(stack, upstream.url, redis, keys)
        for url in (a, b):
            for _ in range(100):
                if httpx.get(f"{url}/status").json().get("shared", {}).get("connected"):
                    break
                time.sleep(0.05)
        found: queue.Queue[tuple[float, dict[str, object]]] = queue.Queue()
        threading.Thread(target=read_events, args=(b, found), daemon=True).start()
        time.sleep(0.5)
        with httpx.Client() as http:
            for rnd in range(args.rounds):
                alias = f"k{rnd % KEYS}"
                if rnd >= KEYS:
                    time.sleep(max(0.0, 2.2 - KEYS * 0.02))  # its last cooldown is over
                upstream.set_behaviour(keys[alias], limited, alias=alias)
                sent = time.perf_counter()
                http.post(f"{a}/v1/chat/completions", json=CHAT, headers={"x-keyrotor-key": alias})
                answered = time.perf_counter()
                upstream.set_behaviour(keys[alias], Ok(), alias=alias)
                while True:
                    at, data = found.get(timeout=10)
                    if data["key"] == alias and data["state"] == "rate_limited":
                        break
                after_answer.append(max(0.0, at - answered))
                after_send.append(at - sent)

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    print(f"rounds {args.rounds}; two proxy processes, one redis-server, loopback")
    print("| from | p50 ms | p90 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|")
    for name, values in (("A's answer at the client", after_answer), ("sending to A", after_send)):
        print(
            f"| {name} | {statistics.median(values) * 1000:.2f} | {pct(values, 0.9):.2f} | "
            f"{pct(values, 0.99):.2f} | {max(values) * 1000:.2f} |"
        )


if __name__ == "__main__":
    main()
