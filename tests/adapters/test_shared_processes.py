"""Three ``keyrotor serve`` processes, one pool, a real redis-server, under load
from a round-robin client, with faulty keys mixed in (rate limited, revoked):
a key's rpm and a budget hold in total, faulty keys are tried a handful of
times by all three together, and one process killed with SIGKILL costs the
callers only the requests it had in flight, its in-flight count on a key
released when its lease ends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from keyrotor.testing import Custom, FakeUpstream, Reply, Scenario

from .test_shared import RedisServer, free_port, needs_redis, wait_until

pytestmark = [
    needs_redis,
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]
SECRETS = {f"k{i}": f"sk-or-v1-procs-{i}-" + "jk" * 12 for i in range(1, 7)}
CHEAP, BUDGETED = "openai/gpt-4o-mini", "openai/gpt-4o"
HI = [{"role": "user", "content": "hi"}]
RPM = 120  # k1's
LEASE = 2.0
PIN = {"x-keyrotor-key": "k2"}
REVOKED = Reply(401, "User not found.")


def config(tmp_path: Path, upstream: str, budget: float) -> Path:
    path = tmp_path / "keyrotor.toml"
    options = {"k1": f"rpm = {RPM}\n", "k2": "max_in_flight = 2\n"}
    path.write_text(
        f'upstream = "{upstream}"\n[server]\ngrace_period = 1\n[shared]\nlease = {LEASE}\n'
        f'[[budgets]]\nmodel = "{BUDGETED}"\nbudget = {budget!r}\n'
        + "".join(
            f'[[keys]]\nalias = "{a}"\nsecret_env = "K_{a}"\n' + options.get(a, "") for a in SECRETS
        )
    )
    return path


class Caller:
    """A round-robin client: each request to the next process; a process that
    refuses the connection is skipped, as a load balancer would."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.turn = 0
        self.lock = threading.Lock()
        self.answers: list[tuple[str, str, int]] = []  # (process url, model, status)
        self.cut: list[tuple[str, float, float]] = []  # (url, sent, failed): never answered

    def next_url(self) -> str:
        with self.lock:
            self.turn += 1
            return self.urls[self.turn % len(self.urls)]

    def run(self, stop: threading.Event, model: str) -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                url = self.next_url()
                sent = time.monotonic()
                try:
                    answer = http.post(
                        f"{url}/v1/chat/completions", json={"model": model, "messages": HI}
                    )
                except httpx.ConnectError:
                    continue  # nothing sent: the balancer tries the next process
                except httpx.TransportError:
                    self.cut.append((url, sent, time.monotonic()))
                    continue
                self.answers.append((url, model, answer.status_code))


def members(redis: RedisServer, key: str) -> list[str]:
    out = subprocess.run(
        ["redis-cli", "-p", str(redis.port), "ZRANGE", key, "0", "-1"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return out.split()


def test_three_processes_hold_limits_and_budgets_and_survive_a_sigkill(tmp_path: Path) -> None:
    arrivals: list[float] = []  # k1's requests, as the upstream saw them
    costs: list[tuple[str, float]] = []  # (model, cost) of every request served

    def served(call: Any) -> None:
        costs.append((call.model, call.cost))
        if call.model == CHEAP and call.body.get("slow"):
            call.latency = 1.0

    def k1(call: Any) -> None:
        arrivals.append(time.monotonic())
        served(call)

    def k2(call: Any) -> None:
        call.latency = 0.2
        served(call)

    fake = Scenario()
    behaviours: dict[str, Any] = {
        "k1": Custom(k1),
        "k2": Custom(k2),
        "k3": Reply(429, "Rate limit exceeded", headers=(("retry-after", "60"),)),
        "k4": Custom(lambda call: REVOKED, lambda call: REVOKED),  # its probes too
    }
    for alias, secret in SECRETS.items():
        fake.add(secret, behaviours.get(alias, Custom(served)), alias=alias)
    redis = RedisServer()
    redis.start()
    procs: list[subprocess.Popen[str]] = []
    try:
        with FakeUpstream.running_in_thread(fake) as upstream:
            one = httpx.post(
                f"{upstream.url}/chat/completions",
                json={"model": BUDGETED, "messages": HI},
                headers={"authorization": f"Bearer {SECRETS['k5']}"},
            ).json()["usage"]["cost"]
            costs.clear()
            budget = 25 * one
            path = config(tmp_path, upstream.url, budget)
            env = {**os.environ, **{f"K_{a}": s for a, s in SECRETS.items()}}
            urls = []
            for i in range(3):
                port = free_port()
                command = [
                    sys.executable, "-m", "keyrotor.cli", "serve", "--config", str(path),
                    "--shared", redis.url, "--port", str(port),
                    "--state", str(tmp_path / f"state-{i}.db"),
                ]  # fmt: skip
                out = subprocess.DEVNULL
                procs.append(subprocess.Popen(command, env=env, stdout=out, stderr=out, text=True))
                urls.append(f"http://127.0.0.1:{port}")
            for url in urls:
                wait_until(lambda u=url: _connected(u), timeout=60)
            victim_url = urls[2]
            victim = httpx.get(f"{victim_url}/status").json()["shared"]["origin"]
            caller = Caller(urls)
            stop = threading.Event()
            threads = [
                threading.Thread(target=caller.run, args=(stop, model))
                for model in (CHEAP, CHEAP, CHEAP, BUDGETED, BUDGETED, CHEAP)
            ]
            for t in threads:
                t.start()
            time.sleep(2.0)  # load for a while (its length, not a bound on speed)
            # Slow requests on the victim, pinned to k2: once one holds a k2
            # slot in Redis, SIGKILL the victim.
            pinning = threading.Event()
            pinner = threading.Thread(target=_pin_slowly, args=(victim_url, pinning))
            pinner.start()
            inflight = "keyrotor:inflight:k2"
            while True:  # freeze the victim while it holds a k2 slot, then kill it
                wait_until(lambda: any(m.startswith(victim) for m in members(redis, inflight)))
                procs[2].send_signal(signal.SIGSTOP)
                held = [m for m in members(redis, inflight) if m.startswith(victim)]
                if held:
                    break
                procs[2].send_signal(signal.SIGCONT)  # its request ended meanwhile: again
            killed = time.monotonic()
            procs[2].send_signal(signal.SIGKILL)
            procs[2].wait(timeout=30)
            dead = time.monotonic()
            pinning.set()
            # Its lease lapses: the survivors get k2's slot back.
            wait_until(lambda: not any(m.startswith(victim) for m in members(redis, inflight)))
            pool = wait_until(
                lambda: (
                    (s := httpx.get(f"{urls[0]}/status").json())["pool"]["total"]["processes"] == 2
                    and s
                )
            )
            time.sleep(1.0)  # the two survivors go on a while
            stop.set()
            for t in [*threads, pinner]:
                t.join()
            k_stats = {a: upstream.stats(a) for a in SECRETS}
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
        redis.close()

    answers = caller.answers
    cheap = [status for _, model, status in answers if model == CHEAP]
    assert cheap and set(cheap) == {200}  # faults and a SIGKILL cost the callers nothing
    # Only what the victim had taken when it died: sent before it was gone (the
    # kernel still queues connections on its socket while it is stopped or
    # dying), cut no sooner than the SIGKILL.
    assert {url for url, _, _ in caller.cut} <= {victim_url}
    assert all(sent < dead and failed >= killed for _, sent, failed in caller.cut), caller.cut
    # k1's rpm held in total: its requests spaced 60/RPM s apart on Redis's clock.
    span = arrivals[-1] - arrivals[0]
    assert len(arrivals) <= (span + 1.0) * RPM / 60 + 1, (len(arrivals), span)
    # The budget held in total: over it by what was in flight, no more.
    spent = sum(cost for model, cost in costs if model == BUDGETED)
    assert 429 in [status for _, model, status in answers if model == BUDGETED]
    assert spent <= budget + 2 * 6 * one + 1e-12, spent / one
    # Faulty keys: tried a handful of times by the three together, then left.
    assert k_stats["k3"].by_endpoint.get("/chat/completions", 0) <= 3
    assert k_stats["k4"].by_endpoint.get("/chat/completions", 0) <= 3
    assert k_stats["k2"].max_in_flight <= 2
    assert held  # the victim died holding a k2 slot, released by its lease (above)
    assert pool["keys"][3]["state"] == "failed"


def _connected(url: str) -> bool:
    try:
        return bool(httpx.get(f"{url}/status", timeout=2).json()["shared"]["connected"])
    except (httpx.HTTPError, KeyError, ValueError):
        return False


def _pin_slowly(url: str, stop: threading.Event) -> None:
    """Slow requests pinned to k2 on ``url``, two at a time, until ``stop``."""
    body = {"model": CHEAP, "messages": HI, "slow": True}

    def one() -> None:
        with contextlib.suppress(httpx.HTTPError):  # its process is killed under it
            httpx.post(f"{url}/v1/chat/completions", json=body, headers=PIN, timeout=30)

    while not stop.is_set():
        pair = [threading.Thread(target=one) for _ in range(2)]
        for t in pair:
            t.start()
        for t in pair:
            t.join()
