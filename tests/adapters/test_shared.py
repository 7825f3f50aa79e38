"""Key health shared through a real Redis (Debian's redis-server, started here
on a free loopback port with its own directory): a 429 one proxy saw stops the
other from using that key; Redis stopped and started again mid-run, no request
failing and no spend lost."""

from __future__ import annotations

import gc
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from keyrotor.adapters.config import ProxyConfig
from keyrotor.adapters.shared import SharedState, accepts, parse_url
from keyrotor.core import KeySpec, KeyState, KeyStateChanged, PoolConfig
from keyrotor.testing import Custom, FakeUpstream, Ok, Reply, Scenario

from .proxy_thread import ProxyThread

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
needs_redis = pytest.mark.skipif(
    not Path(REDIS).exists(), reason="needs Debian's redis-server (.ci/run installs it)"
)
# coredis leaves the memory streams of connections that failed or were cut
# unclosed (garbage-collected later, with a ResourceWarning): its own, not keyrotor's.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
SECRETS = {f"k{i}": f"sk-or-v1-shared-{i}-" + "jk" * 12 for i in range(1, 4)}
CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
H, R, D, F, DIS = (
    KeyState.HEALTHY,
    KeyState.RATE_LIMITED,
    KeyState.DEPLETED,
    KeyState.FAILED,
    KeyState.DISABLED,
)


def test_conflicts_resolve_by_the_written_rules() -> None:
    # the later and longer cooldown wins
    assert accepts(H, None, R, 100.0, "http_429")
    assert accepts(R, 50.0, R, 100.0, "http_429")
    assert not accepts(R, 150.0, R, 100.0, "http_429")
    # an operator's mark wins over automatic states, both ways
    assert accepts(R, 150.0, H, None, "operator")
    assert accepts(H, None, DIS, None, "operator")
    assert not accepts(DIS, None, R, 100.0, "http_429")
    # depleted beats healthy until an operator or a probe says otherwise
    assert accepts(H, None, D, None, "openrouter_credits")
    assert not accepts(D, None, H, None, "http_200")
    assert accepts(D, None, H, None, "probe_ok")
    assert not accepts(D, None, R, 100.0, "http_429")  # worse stays
    assert accepts(H, None, F, None, "http_401")
    assert accepts(D, None, F, None, "http_401")  # failed beats depleted ...
    assert not accepts(F, None, D, 3600.0, "budget")  # ... and is not replaced by it
    assert not accepts(R, 10.0, KeyState.RECOVERING, None, "cooldown_over")
    assert parse_url("redis://127.0.0.1:6380/2") == ("127.0.0.1", 6380, 2)
    for bad in ("http://x", "redis://", "redis://h:port/x"):
        with pytest.raises(ValueError, match="redis://host:port/db"):
            parse_url(bad)


@pytest.fixture(autouse=True)
def _collect_coredis_garbage() -> Iterator[None]:
    """Collect what coredis left behind here, under this module's filter, not
    in some later test."""
    yield
    gc.collect()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """``redis-server`` on a free loopback port, in its own directory."""

    def __init__(self) -> None:
        self.port = free_port()
        self.folder = tempfile.mkdtemp(prefix="keyrotor-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.folder],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


def config(upstream: str, shared: str, namespace: str) -> ProxyConfig:
    return ProxyConfig(
        keys=dict(SECRETS),
        pool=PoolConfig(keys=[KeySpec(key_id=alias) for alias in SECRETS], max_attempts=3),
        upstream=upstream,
        server={"host": "127.0.0.1", "port": 0},
        shared_url=shared,
        shared_namespace=namespace,
    )


def states(url: str) -> dict[str, tuple[str, str]]:
    keys = httpx.get(f"{url}/status").json()["keys"]
    return {k["alias"]: (k["state"], k.get("reason", "")) for k in keys}


def wait_until(check: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout  # a bound on the wait, not on the system's speed
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("the condition never held")
        time.sleep(0.02)


def scenario() -> Scenario:
    fake = Scenario()
    for alias, secret in SECRETS.items():
        fake.add(secret, Ok(), alias=alias)
    return fake


@needs_redis
def test_a_429_seen_by_one_process_stops_the_other_from_using_the_key(
    redis: RedisServer, tmp_path: Path
) -> None:
    with FakeUpstream.running_in_thread(scenario()) as upstream:
        options = config(upstream.url, redis.url, f"t{tmp_path.name[-6:]}")
        with ProxyThread(options, []) as a, ProxyThread(options, []) as b:
            wait_until(lambda: httpx.get(f"{a}/status").json()["shared"]["connected"])
            wait_until(lambda: httpx.get(f"{b}/status").json()["shared"]["connected"])
            upstream.set_behaviour(
                SECRETS["k1"], Custom(lambda call: Reply(429, "Rate limit exceeded")), alias="k1"
            )
            answer = httpx.post(
                f"{a}/v1/chat/completions",
                json=CHAT,
                headers={"x-keyrotor-key": "k1"},
            )  # k1 answers 429 in a, which fails over to another key
            assert answer.status_code == 200
            seen = wait_until(lambda: states(b)["k1"][0] == "rate_limited" and states(b))
            before = upstream.stats("k1").requests
            for _ in range(20):  # b never sends to k1 while it cools
                assert httpx.post(f"{b}/v1/chat/completions", json=CHAT).status_code == 200
            after = upstream.stats("k1").requests
            status_b = httpx.get(f"{b}/status").json()
            health = httpx.get(f"{b}/healthz").json()
    assert seen["k1"][1].startswith("shared: ")
    assert after == before
    assert status_b["shared"]["applied"] >= 1 and status_b["shared"]["url"] == redis.url
    assert health["shared"] is True


@needs_redis
def test_redis_stopped_and_started_again_mid_run(redis: RedisServer, tmp_path: Path) -> None:
    log_a: list[dict[str, Any]] = []
    with FakeUpstream.running_in_thread(scenario()) as upstream:
        options = config(upstream.url, redis.url, f"t{tmp_path.name[-6:]}")
        with ProxyThread(options, log_a) as a, ProxyThread(options, []) as b:
            wait_until(lambda: httpx.get(f"{b}/status").json()["shared"]["connected"])
            redis.stop()
            wait_until(lambda: not httpx.get(f"{a}/status").json()["shared"]["connected"])
            # Both keep serving on their own view; nothing waits on Redis.
            stop = threading.Event()
            codes: list[int] = []

            def load() -> None:
                with httpx.Client(timeout=10) as http:
                    while not stop.is_set():
                        codes.append(http.post(f"{b}/v1/chat/completions", json=CHAT).status_code)

            loader = threading.Thread(target=load)
            loader.start()
            # A key that fails while Redis is away: a keeps the change queued.
            upstream.set_behaviour(
                SECRETS["k2"], Custom(lambda call: Reply(401, "User not found.")), alias="k2"
            )
            httpx.post(f"{a}/v1/chat/completions", json=CHAT, headers={"x-keyrotor-key": "k2"})
            queued = httpx.get(f"{a}/status").json()["shared"]["queued"]
            redis.start()  # the same port, empty: a reconnects and publishes what it queued
            wait_until(lambda: states(b)["k2"][0] == "failed", timeout=30)
            stop.set()
            loader.join()
            # No spend lost: what b spent while Redis was away (and what the
            # restarted, empty Redis forgot) reaches a once b writes it again.
            spent = sum(upstream.stats(alias).cost for alias in SECRETS)

            def whole(url: str) -> bool:
                return abs(httpx.get(f"{url}/status").json()["stats"]["totalCost"] - spent) < 1e-9

            wait_until(lambda: whole(a) and whole(b), timeout=30)
            health_a = httpx.get(f"{a}/healthz").json()
    assert queued >= 1
    assert codes and set(codes) == {200}  # served all along
    assert health_a["ok"] is True
    warnings = [e["message"] for e in log_a if e.get("event") == "warning"]
    assert any("unreachable" in w and "serving on this process's own view" in w for w in warnings)


@needs_redis
def test_an_acl_user_in_the_url_is_the_one_that_logs_in(redis: RedisServer, tmp_path: Path) -> None:
    # A managed Redis with ACL users: the user name was dropped, so the password
    # was sent as the default user's and never accepted.
    subprocess.run(
        ["redis-cli", "-p", str(redis.port), "ACL", "SETUSER", "alice", "on", ">s@cret:x",
         "~*", "&*", "+@all"],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        ["redis-cli", "-p", str(redis.port), "ACL", "SETUSER", "default", "off"],
        check=True, capture_output=True,
    )  # fmt: skip
    url = f"redis://alice:s%40cret%3Ax@127.0.0.1:{redis.port}/0"
    with FakeUpstream.running_in_thread(scenario()) as upstream:
        options = config(upstream.url, url, f"t{tmp_path.name[-6:]}")
        with ProxyThread(options, []) as a:
            shared = wait_until(
                lambda: (s := httpx.get(f"{a}/status").json()["shared"])["connected"] and s
            )
    assert "s@cret" not in json.dumps(shared) and "%40" not in json.dumps(shared)


def test_a_key_a_probe_restored_is_published_healthy_for_the_probe() -> None:
    # The probe moved the key to recovering (never shared), its trial to healthy
    # as "trial_ok", which no other process takes: the others kept it failed.
    driver: Any = SimpleNamespace(wall_clock=lambda: 1000.0)
    shared = SharedState("redis://127.0.0.1:1/0", driver)

    def change(old: KeyState, new: KeyState, reason: str) -> KeyStateChanged:
        return KeyStateChanged(key_id="k1", old=old, new=new, until=None, reason=reason, now=5.0)

    shared.state_changed(change(KeyState.FAILED, KeyState.RECOVERING, "probe_ok"))
    shared.state_changed(change(KeyState.RECOVERING, KeyState.HEALTHY, "trial_ok"))
    shared.state_changed(change(KeyState.HEALTHY, KeyState.RATE_LIMITED, "http_429"))
    shared.state_changed(change(KeyState.RATE_LIMITED, KeyState.RECOVERING, "cooldown_over"))
    shared.state_changed(change(KeyState.RECOVERING, KeyState.HEALTHY, "trial_ok"))
    # Our probe, then another process's 429 applied here, then a plain trial:
    # that trial's healthy is not the probe's.
    shared.state_changed(change(KeyState.HEALTHY, KeyState.RECOVERING, "probe_ok"))
    shared.state_changed(change(KeyState.RECOVERING, KeyState.RATE_LIMITED, "shared: http_429"))
    shared.state_changed(change(KeyState.RATE_LIMITED, KeyState.RECOVERING, "cooldown_over"))
    shared.state_changed(change(KeyState.RECOVERING, KeyState.HEALTHY, "trial_ok"))
    sent = [(r["state"], r["reason"]) for r in shared.outbox.items]
    assert sent == [
        ("healthy", "probe_ok, trial_ok"), ("rate_limited", "http_429"), ("healthy", "trial_ok"),
        ("healthy", "trial_ok"),
    ]  # fmt: skip
    assert accepts(KeyState.FAILED, None, KeyState.HEALTHY, None, sent[0][1])
    assert not accepts(KeyState.FAILED, None, KeyState.HEALTHY, None, sent[2][1])
