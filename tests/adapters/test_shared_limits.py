"""Limits kept in a real Redis by three proxies at once (each its own pool, as
three processes would be): a key's rpm and its requests in flight hold in total,
counted by the fake upstream; none of it costs the callers an error."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest

from keyrotor.adapters import shared_limits
from keyrotor.adapters.config import Budget, ProxyConfig
from keyrotor.core import KeySpec, PoolConfig
from keyrotor.testing import Custom, FakeUpstream, Ok, Reply, Scenario

from .proxy_thread import ProxyThread
from .test_shared import SECRETS, RedisServer, needs_redis, redis, wait_until

__all__ = ["redis"]  # the fixture, shared with test_shared

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
pytestmark = [
    needs_redis,
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture(autouse=True)
def patient_admissions(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests hold limits through Redis, not through the fallback a slow
    Redis gets: a loaded machine must not push an admission past its 0.25 s."""
    monkeypatch.setattr(shared_limits, "TIMEOUT", 30.0)


def three_proxies(
    upstream: str, shared: str | None, namespace: str, k1: KeySpec, **options: Any
) -> ProxyConfig:
    specs = [k1, *(KeySpec(key_id=alias) for alias in SECRETS if alias != "k1")]
    return ProxyConfig(
        keys=dict(SECRETS),
        pool=PoolConfig(keys=specs, max_attempts=3),
        upstream=upstream,
        server={"host": "127.0.0.1", "port": 0},
        shared_url=shared,
        shared_namespace=namespace,
        **options,
    )


def load(urls: list[str], seconds: float, per_url: int = 2) -> list[int]:
    """``per_url`` callers per proxy, each sending one request after another."""
    codes: list[int] = []
    stop = time.monotonic() + seconds  # how long the load runs, not a bound on speed

    def caller(url: str) -> None:
        with httpx.Client(timeout=30) as http:
            while time.monotonic() < stop:
                codes.append(http.post(f"{url}/v1/chat/completions", json=CHAT).status_code)

    threads = [threading.Thread(target=caller, args=(u,)) for u in urls for _ in range(per_url)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


def run_three(
    redis: RedisServer, tmp_path: Path, k1: KeySpec, k1_behaviour: Custom, seconds: float
) -> tuple[list[int], FakeUpstream, list[dict[str, Any]]]:
    fake = Scenario()
    for alias, secret in SECRETS.items():
        fake.add(secret, k1_behaviour if alias == "k1" else Ok(), alias=alias)
    with FakeUpstream.running_in_thread(fake) as upstream:
        options = three_proxies(upstream.url, redis.url, f"t{tmp_path.name[-6:]}", k1)
        with ProxyThread(options, []) as a, ProxyThread(options, []) as b:
            with ProxyThread(options, []) as c:
                urls = [a, b, c]
                for url in urls:
                    wait_until(lambda u=url: httpx.get(f"{u}/status").json()["shared"]["connected"])
                codes = load(urls, seconds)
                statuses = [httpx.get(f"{u}/status").json()["shared"] for u in urls]
                # Any process's /status and /metrics show the whole pool.
                served = codes.count(200)
                pool = wait_until(
                    lambda: (
                        (p := httpx.get(f"{c}/status").json()["pool"])["total"]["delivered"]
                        >= served
                        and p
                    )
                )
                metrics = httpx.get(f"{a}/metrics").text
    assert pool["total"]["processes"] == 3 and len(pool["processes"]) == 3
    assert "keyrotor_shared_processes 3" in metrics
    assert metrics.count("keyrotor_shared_in_flight{process=") == 3
    return codes, upstream, statuses


def arrivals(times: list[float]) -> Callable[[Any], None]:
    def note(call: Any) -> None:
        times.append(time.monotonic())

    return note


def test_a_keys_rpm_holds_across_three_processes(redis: RedisServer, tmp_path: Path) -> None:
    times: list[float] = []
    interval = 0.25  # rpm 240
    codes, _, statuses = run_three(
        redis, tmp_path, KeySpec(key_id="k1", rpm=240), Custom(arrivals(times)), seconds=3.0
    )
    assert codes and set(codes) == {200}
    # The script spaces k1's requests by ``interval`` on Redis's clock; they
    # reach the upstream at most a second later than that spacing says.
    span = times[-1] - times[0]
    assert len(times) <= (span + 1.0) / interval + 1, (len(times), span)
    assert len(times) >= 3  # k1 was used, paced, not shut out
    held = sum(s["limits"]["held"] for s in statuses)
    admitted = sum(s["limits"]["admitted"] for s in statuses)
    assert admitted == len(times) and held > 0
    assert all(s["limits"]["local"] == 0 for s in statuses)


def test_requests_in_flight_on_a_key_hold_across_three_processes(
    redis: RedisServer, tmp_path: Path
) -> None:
    def slow(call: Any) -> None:
        call.latency = 0.05

    codes, upstream, statuses = run_three(
        redis, tmp_path, KeySpec(key_id="k1", max_in_flight=2), Custom(slow), seconds=2.0
    )
    assert codes and set(codes) == {200}
    k1 = upstream.stats("k1")
    assert k1.requests > 10 and k1.max_in_flight <= 2  # 6 callers, 3 processes, at most 2
    assert sum(s["limits"]["held"] for s in statuses) > 0


def test_free_tier_days_hold_across_processes(redis: RedisServer, tmp_path: Path) -> None:
    """Two accounts of 2 free requests a day, two proxies asked in turn: 4 are
    served in total (each proxy alone would send 4), never a limit answer."""
    from .test_routing import HI, free_limits, scenario, write_config

    limits = free_limits(per_day=2)
    extra = (
        "[routing]\nfree_per_day = 2\n"
        f'[shared]\nurl = "{redis.url}"\nnamespace = "t{tmp_path.name[-6:]}"\n'
    )
    with FakeUpstream.running_in_thread(scenario(limits=limits)) as server:
        options = write_config(tmp_path, server.url, extra)
        with ProxyThread(options, []) as a, ProxyThread(options, []) as b:
            for url in (a, b):
                wait_until(lambda u=url: httpx.get(f"{u}/status").json()["shared"]["connected"])
            statuses = [
                httpx.post(
                    f"{url}/v1/chat/completions", json={"model": "free", "messages": HI}
                ).status_code
                for url in (a, b) * 4
            ]
            seen = httpx.get(f"{a}/status").json()["routing"]["freeTier"]
    assert sorted(statuses) == [200] * 4 + [429] * 4
    assert [limit.refused for limit in limits.values()] == [0, 0]
    assert [limit.sent for limit in limits.values()] == [2, 2]
    assert seen["team"]["usedToday"] == 2 and seen["solo"]["usedToday"] == 2


def test_a_budget_holds_in_total_across_three_processes(redis: RedisServer, tmp_path: Path) -> None:
    """A model's budget of 30 requests' cost, 6 callers on 3 proxies: spend
    stops near the budget in total (each proxy alone would spend it 3 times):
    over it by what the callers had in flight (as for one process) and what
    they sent in the milliseconds before the other processes heard."""
    fake = Scenario()
    for alias, secret in SECRETS.items():
        fake.add(secret, Ok(), alias=alias)
    with FakeUpstream.running_in_thread(fake) as upstream:
        with ProxyThread(three_proxies(upstream.url, None, "x", KeySpec(key_id="k1")), []) as one:
            httpx.post(f"{one}/v1/chat/completions", json=CHAT)
            each = upstream.stats("k1").cost + upstream.stats("k2").cost + upstream.stats("k3").cost
        assert each > 0
        budget = Budget("model", CHAT["model"], 30 * each)
        options = three_proxies(
            upstream.url, redis.url, f"t{tmp_path.name[-6:]}", KeySpec(key_id="k1"),
            budgets=[budget],
        )  # fmt: skip
        before = sum(upstream.stats(a).cost for a in SECRETS)
        with ProxyThread(options, []) as a, ProxyThread(options, []) as b:
            with ProxyThread(options, []) as c:
                urls = [a, b, c]
                for url in urls:
                    wait_until(lambda u=url: httpx.get(f"{u}/status").json()["shared"]["connected"])
                codes = load(urls, 2.0)
                spent = sum(upstream.stats(a).cost for a in SECRETS) - before

                def agreed() -> bool:
                    seen = [httpx.get(f"{u}/status").json() for u in urls]
                    return all(
                        abs(s["stats"]["totalCost"] - spent) < 1e-9
                        and abs(s["spend"]["budgets"][0]["spent"] - spent) < 1e-9
                        for s in seen
                    )

                wait_until(agreed)  # every process sees the whole pool's spend
    assert codes.count(200) >= 30 and 429 in codes
    assert spent <= budget.limit + 2 * 6 * each + 1e-12, (spent / each, codes.count(200))


def test_keys_added_and_removed_at_runtime_reach_every_process(
    redis: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = "admin-token-" + "x" * 24
    new_secret = "sk-or-v1-shared-new-" + "jk" * 12
    monkeypatch.setenv("KEYROTOR_SECRET_KEY", "a passphrase every process of the pool knows")
    fake = Scenario()
    for alias, secret in SECRETS.items():
        fake.add(secret, Ok(), alias=alias)
    fake.add(new_secret, Ok(), alias="new")
    auth = {"authorization": f"Bearer {admin}"}
    with FakeUpstream.running_in_thread(fake) as upstream:
        namespace = f"t{tmp_path.name[-6:]}"
        options = three_proxies(
            upstream.url, redis.url, namespace, KeySpec(key_id="k1"), admin_token=admin
        )
        with ProxyThread(options, []) as a, ProxyThread(options, []) as b:
            for url in (a, b):
                wait_until(lambda u=url: httpx.get(f"{u}/status").json()["shared"]["connected"])
            body = {"key": new_secret, "alias": "new", "rpm": 600}
            added = httpx.post(f"{a}/admin/keys", json=body, headers=auth)
            assert added.status_code == 201, added.text

            def aliases(url: str) -> set[str]:
                keys = httpx.get(f"{url}/admin/keys", headers=auth).json()["keys"]
                return {k["alias"] for k in keys if not k["removing"]}

            wait_until(lambda: "new" in aliases(b))
            pinned = httpx.post(
                f"{b}/v1/chat/completions", json=CHAT, headers={"x-keyrotor-key": "new"}
            )
            options_b = next(
                k["options"]
                for k in httpx.get(f"{b}/admin/keys", headers=auth).json()["keys"]
                if k["alias"] == "new"
            )
            stored = subprocess.run(
                ["redis-cli", "-p", str(redis.port), "HGETALL", f"{namespace}:keys:added"],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            assert httpx.delete(f"{b}/admin/keys/new", headers=auth).status_code == 200
            wait_until(lambda: "new" not in aliases(a))
            in_redis = httpx.get(f"{a}/status").json()
    assert pinned.status_code == 200 and upstream.stats("new").requests == 1
    assert options_b == {"rpm": 600}
    assert new_secret not in json.dumps(in_redis)
    assert '"alias": "new"' in stored and new_secret not in stored  # sealed in Redis
    assert in_redis["shared"]["keys"]["applied"] == 1  # the removal, from b


def test_a_model_that_failed_in_one_process_cools_in_the_other(
    redis: RedisServer, tmp_path: Path
) -> None:
    from .test_routing import HI, SENT, scenario, write_config

    extra = f'[shared]\nurl = "{redis.url}"\nnamespace = "t{tmp_path.name[-6:]}"\n'
    with FakeUpstream.running_in_thread(scenario()) as server:
        options = write_config(tmp_path, server.url, extra)
        with ProxyThread(options, []) as a, ProxyThread(options, []) as b:
            for url in (a, b):
                wait_until(lambda u=url: httpx.get(f"{u}/status").json()["shared"]["connected"])
            ranked = httpx.post(f"{a}/routing/recommend", json={"model": "free", "messages": HI})
            first = ranked.json()["model"]
            server.scenario = scenario({first: Reply(404, f"No endpoints found for {first}.")})
            assert (
                httpx.post(
                    f"{a}/v1/chat/completions", json={"model": "free", "messages": HI}
                ).status_code
                == 200
            )  # a fell back past the model, and cooled it
            cooling = wait_until(
                lambda: first in (c := httpx.get(f"{b}/status").json()["routing"]["cooling"]) and c
            )
            SENT.clear()
            answer = httpx.post(f"{b}/v1/chat/completions", json={"model": "free", "messages": HI})
    assert cooling[first]["why"].startswith("shared: answered 404")
    assert answer.status_code == 200 and answer.headers["x-keyrotor-model"] != first
    assert first not in [body["model"] for body in SENT]  # b never tried it


def test_spend_heard_from_others_counts_once_and_never_our_own() -> None:
    """Pure: the growth of another instance's sum is taken once, whatever the
    order and repeats; a key's into the core, a budget's into its window."""
    import trio

    from keyrotor.adapters.proxy.spend import SpendBook
    from keyrotor.adapters.shared_spend import SharedSpend
    from keyrotor.transports.api import Driver

    async def main() -> tuple[float, float, float]:
        driver = Driver({"k1": "sk-or-v1-spend-k1-" + "jk" * 10})
        book = SpendBook([Budget("model", "m", 1.0)], clock=lambda: 1_000_000.0)
        spend = SharedSpend(driver, book, instance="me", clock=lambda: 1_000_000.0)
        minute = 999_960
        for total in (0.25, 0.25, 0.1, 0.5):  # repeated, stale, then grown
            spend.heard({"instance": "other", "values": [["key", "k1", minute, total]]})
            spend.heard({"instance": "other", "values": [["model", "m", minute, total]]})
        spend.heard({"instance": "me", "values": [["key", "k1", minute, 9.0]]})  # our own
        spend.heard({"instance": "other", "values": [["key", "nope", minute, 1.0]]})  # unknown key
        spend.heard({"instance": "other", "values": "garbage"})
        key_spend = driver.pool.statistics().keys[0].spend
        budget = book.status()["budgets"][0]["spent"]
        return key_spend, budget, spend.taken

    key_spend, budget, taken = trio.run(main)
    assert key_spend == pytest.approx(0.5) and budget == pytest.approx(0.5)
    assert taken == pytest.approx(2.0)  # 0.5 + 0.5 + the unknown key's 1.0 (counted, not applied)


def test_a_renewed_lease_keeps_its_in_flight_set(redis: RedisServer) -> None:
    # The set's expiry was set at admission only: a request running longer than
    # lease + 1 s lost its slot (the set expired), and max_in_flight no longer held.
    def cli(*args: str) -> str:
        return subprocess.run(
            ["redis-cli", "-p", str(redis.port), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    key = "renew-test:inflight:k1"
    cli("ZADD", key, "0", "mine")
    cli("PEXPIRE", key, "100")  # what is left of the admission's expiry, near its end
    cli("EVAL", shared_limits.RENEW, "1", key, "10", "mine")
    assert int(cli("PTTL", key)) > 10_000 - 1_000  # the lease again, from now
    cli("EVAL", shared_limits.RENEW, "1", "renew-test:inflight:gone", "10", "other")
    assert cli("EXISTS", "renew-test:inflight:gone") == "0"  # nothing made for a lapsed lease


def test_a_key_replaced_while_a_process_was_away_is_replaced_there_too(
    redis: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Removed, then added again under its alias with a new secret while b was
    # down: b came back with the old (revoked) secret from its state file and
    # skipped the add of an alias it held.
    admin = "admin-token-" + "x" * 24
    passphrase = "a passphrase every process of the pool knows"
    old, new = "sk-or-v1-rotate-old-" + "jk" * 12, "sk-or-v1-rotate-new-" + "jk" * 12
    monkeypatch.setenv("KEYROTOR_SECRET_KEY", passphrase)
    fake = Scenario()
    for alias, secret in SECRETS.items():
        fake.add(secret, Ok(), alias=alias)
    fake.add(old, Ok(), alias="old")
    fake.add(new, Ok(), alias="new")
    auth = {"authorization": f"Bearer {admin}"}
    with FakeUpstream.running_in_thread(fake) as upstream:
        options = three_proxies(
            upstream.url, redis.url, f"t{tmp_path.name[-6:]}", KeySpec(key_id="k1"),
            admin_token=admin,
        )  # fmt: skip
        with_state = attrs.evolve(options, state_path=str(tmp_path / "b.db"), secret_key=passphrase)

        def connected(url: str) -> Any:
            return wait_until(lambda: httpx.get(f"{url}/status").json()["shared"]["connected"])

        def served_by(url: str) -> str:
            sent = httpx.post(
                f"{url}/v1/chat/completions",
                json=CHAT,
                headers={"x-keyrotor-key": "rot", "x-keyrotor-fallback": "false"},
            )
            assert sent.status_code == 200, sent.text
            return "new" if upstream.stats("new").requests else "old"

        body = {"key": old, "alias": "rot"}
        with ProxyThread(options, []) as a:
            with ProxyThread(with_state, []) as b:
                connected(a), connected(b)
                assert httpx.post(f"{a}/admin/keys", json=body, headers=auth).status_code == 201
                wait_until(lambda: "rot" in httpx.get(f"{b}/admin/keys", headers=auth).text)
                assert served_by(b) == "old"
            assert httpx.delete(f"{a}/admin/keys/rot", headers=auth).status_code == 200
            added = httpx.post(f"{a}/admin/keys", json={**body, "key": new}, headers=auth)
            assert added.status_code == 201, added.text
            with ProxyThread(with_state, []) as b:
                connected(b)
                wait_until(lambda: httpx.get(f"{b}/status").json()["shared"]["keys"]["applied"])
                assert served_by(b) == "new"
                status_b = httpx.get(f"{b}/status").json()
    assert status_b["shared"]["keys"]["refused"] == 0
    assert new not in json.dumps(status_b) and old not in json.dumps(status_b)


def test_a_failed_over_attempt_gives_its_keys_slot_back_at_once(
    redis: RedisServer, tmp_path: Path
) -> None:
    # k1 (max_in_flight 1) answered 500 and the request moved to k2, where it
    # runs long: k1's slot in Redis stayed taken until the request's end, and
    # every process refused k1 meanwhile.
    first = []

    def k1(call: Any) -> Reply | None:
        first.append(1)
        return Reply(500, "upstream hiccup") if len(first) == 1 else None

    def k2(call: Any) -> None:
        call.latency = 60.0

    fake = Scenario()
    fake.add(SECRETS["k1"], Custom(k1), alias="k1")
    fake.add(SECRETS["k2"], Custom(k2), alias="k2")
    namespace = f"t{tmp_path.name[-6:]}"
    with FakeUpstream.running_in_thread(fake) as upstream:
        options = ProxyConfig(
            keys={alias: SECRETS[alias] for alias in ("k1", "k2")},
            pool=PoolConfig(keys=[KeySpec(key_id="k1", max_in_flight=1), KeySpec(key_id="k2")]),
            upstream=upstream.url,
            server={"host": "127.0.0.1", "port": 0},
            shared_url=redis.url,
            shared_namespace=namespace,
        )
        with ProxyThread(options, []) as a:
            wait_until(lambda: httpx.get(f"{a}/status").json()["shared"]["connected"])

            body = json.dumps(CHAT).encode()
            caller = socket.create_connection(("127.0.0.1", int(a.rsplit(":", 1)[1])))
            caller.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-keyrotor-key: k1\r\n"
                b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            wait_until(lambda: upstream.stats("k2").requests == 1)  # running on k2 now

            def k1_members() -> list[str]:
                return subprocess.run(
                    ["redis-cli", "-p", str(redis.port), "ZRANGE", f"{namespace}:inflight:k1",
                     "0", "-1"],
                    capture_output=True, text=True, check=True,
                ).stdout.split()  # fmt: skip

            wait_until(lambda: not k1_members())
            pinned = httpx.post(
                f"{a}/v1/chat/completions", json=CHAT,
                headers={"x-keyrotor-key": "k1", "x-keyrotor-fallback": "false"},
            )  # fmt: skip
            caller.close()  # the long request's caller leaves: the proxy stops it
    assert pinned.status_code == 200 and pinned.headers["x-keyrotor-key"] == "k1"
