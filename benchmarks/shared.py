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

With ``--rpm SECONDS``: a key's rpm across three processes instead. Keys k0
(``rpm = 60``) and three plain ones, six callers spread over three ``keyrotor
serve`` processes for SECONDS; the fake upstream notes when each of k0's
requests arrives, and the benchmark reports the most of them in any 60 s, once
with the processes sharing Redis and once without (each process alone), and
the Redis round trips per request (``/status`` ``shared.limits.roundTrips``).

Run:

    python -m benchmarks.shared --rounds 200
    python -m benchmarks.shared --rpm 70
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


def start_proxy(
    stack: ExitStack,
    upstream: str,
    redis: str | None,
    keys: dict[str, str],
    options: dict[str, str] | None = None,
) -> str:
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    config = folder / "keyrotor.toml"
    shared = "" if redis is None else f'[shared]\nurl = "{redis}"\n'
    config.write_text(
        f'upstream = "{upstream}"\n[state]\nenabled = false\n[catalog]\nenabled = false\n'
        + shared
        + "".join(
            f'[[keys]]\nalias = "{a}"\nsecret_env = "K_{a.upper()}"\n' + (options or {}).get(a, "")
            for a in keys
        )
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


def rpm_run(seconds: float, shared: bool) -> tuple[int, int, float]:
    """(most of k0's requests in any 60 s, requests served, round trips per request)."""
    keys = {f"k{i}": f"sk-or-v1-rpm-{i}-" + "jk" * 12 for i in range(4)}
    arrivals: list[float] = []
    fake = Scenario()
    for alias, secret in keys.items():
        note = Custom(lambda call: arrivals.append(time.monotonic()))
        fake.add(secret, note if alias == "k0" else Ok(), alias=alias)
    served = 0
    lock = threading.Lock()
    with ExitStack() as stack:
        upstream = stack.enter_context(FakeUpstream.running_in_thread(fake))
        redis = start_redis(stack) if shared else None
        urls = [
            start_proxy(stack, upstream.url, redis, keys, {"k0": "rpm = 60\n"}) for _ in range(3)
        ]
        time.sleep(1.0)
        stop = time.monotonic() + seconds

        def caller(url: str) -> None:
            nonlocal served
            with httpx.Client(timeout=30) as http:
                while time.monotonic() < stop:
                    if http.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 200:
                        with lock:
                            served += 1

        threads = [threading.Thread(target=caller, args=(u,)) for u in urls for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        trips = 0
        if shared:
            trips = sum(
                httpx.get(f"{u}/status").json()["shared"]["limits"]["roundTrips"] for u in urls
            )
    most = max(
        (sum(1 for t in arrivals if start <= t < start + 60.0) for start in arrivals), default=0
    )
    return most, served, trips / max(served, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--rpm", type=float, metavar="SECONDS", help="the rpm check instead")
    args = parser.parse_args()
    if args.rpm:
        print(f"k0: rpm = 60; 3 processes, 6 callers, {args.rpm:g} s each; loopback")
        print("| processes | most of k0's requests in any 60 s | requests served | "
              "Redis round trips per request |")  # fmt: skip
        print("|---|---:|---:|---:|")
        for shared in (True, False):
            most, served, trips = rpm_run(args.rpm, shared)
            name = "sharing one redis-server" if shared else "each alone (no Redis)"
            print(f"| {name} | {most} | {served} | {trips:.3f} |")
        return
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
