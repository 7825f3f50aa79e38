"""Review 13, operator endpoints of big pools: /status, /metrics, /v1/key,
/healthz and /admin/keys/{alias} give what they gave, made cheaply; big
pools' answers are made once a second for every caller (an injected clock
here), an admin change is seen at once, and a HEAD makes nothing.

The proxy application driven directly against the fake upstream; the old
renderings are kept below as the reference the new ones must match byte for
byte.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import attrs
import pytest

from keyrotor.adapters.config import RoutingOptions, token_name
from keyrotor.adapters.proxy.admin import Admin
from keyrotor.adapters.proxy.app import CACHE_TTL, ProxyApp, Rendered
from keyrotor.adapters.proxy.auth import Auth
from keyrotor.adapters.proxy.metrics import ProxyCounters, render
from keyrotor.adapters.proxy.router import Router
from keyrotor.adapters.proxy.types import Request, Response
from keyrotor.core import KeySpec, KeyState, KeyStatistics, PoolConfig
from keyrotor.testing import FakeClock, FakeUpstream, Invalid, Ok, RateLimit, Scenario
from keyrotor.transports._async import AsyncClient
from keyrotor.transports._driver import Driver, mask

pytestmark = pytest.mark.anyio

ADMIN = "admin-token-" + "qz" * 12
CLIENT = "client-token-" + "wy" * 12
SECRETS = {alias: f"sk-or-v1-scale13-{alias}-" + "jk" * 10 for alias in ("a", "b", "c", "d")}
WALL = 1_700_000_000.0
CHAT = json.dumps({"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def call(method: str, path: str, body: str = "", token: str | None = ADMIN) -> Request:
    headers = [("content-type", "application/json")]
    if token is not None:
        headers.append(("authorization", f"Bearer {token}"))
    return Request(method=method, target=path, headers=headers, body=body.encode())


async def body_of(response: Response) -> bytes:
    if isinstance(response.body, bytes):
        return response.body
    return b"".join([chunk async for chunk in response.body])


@attrs.define
class Counted:
    """A driver's pictures of the pool (``status``, ``status_steps``: their
    ``keys``), one key's entries, and counts of its keys, counted."""

    status: list[object] = attrs.Factory(list)
    entries: list[str] = attrs.Factory(list)
    counts: int = 0


def count_calls(driver: Driver) -> Counted:
    seen = Counted()
    steps, key_entry, pool = driver.status_steps, driver.key_entry, driver.pool
    count_by_state, count_usable = pool.count_by_state, pool.count_usable

    def counted_steps(keys: Any = None) -> Any:
        seen.status.append(keys)
        return steps() if keys is None else steps(keys)

    def counted_entry(alias: str) -> Any:
        seen.entries.append(alias)
        return key_entry(alias)

    def counted_counts() -> dict[str, int]:
        seen.counts += 1
        return count_by_state()

    def counted_usable() -> int:
        seen.counts += 1
        return count_usable()

    driver.status_steps = counted_steps  # type: ignore[method-assign]
    driver.key_entry = counted_entry  # type: ignore[method-assign]
    pool.count_by_state = counted_counts  # type: ignore[method-assign]
    pool.count_usable = counted_usable  # type: ignore[method-assign]
    return seen


@attrs.frozen
class Proxy:
    app: ProxyApp
    driver: Driver
    clock: FakeClock  # the cache's


@asynccontextmanager
async def proxy(
    url: str, aliases: Iterable[str] = SECRETS, *, big: bool = False
) -> AsyncIterator[Proxy]:
    """The app with an admin API and a client token; its wall clocks stopped
    (``big``: served as a big pool's, whatever its size)."""
    keys = {a: SECRETS.get(a) or f"sk-or-v1-scale13-{a}-" + "mn" * 10 for a in aliases}
    config = PoolConfig(keys=[KeySpec(key_id=alias) for alias in keys], queue_timeout=1.0)
    async with AsyncClient(keys, url, config) as client:
        clock = FakeClock(start=100.0)
        auth = Auth([CLIENT], ADMIN)
        admin = Admin(client, None, dict.fromkeys(keys, "config"))
        app = ProxyApp(client, clock=lambda: WALL, auth=auth, admin=admin, monotonic=clock)
        if big:
            app.cache_from_keys = 1
        client.driver.wall_clock = lambda: WALL
        yield Proxy(app, client.driver, clock)


def freeze(driver: Driver) -> None:
    now = driver.now()
    driver.clock = lambda: now


# ------------------------------------------------- the old renderings (reference)


def old_key_json(key: KeyStatistics) -> dict[str, Any]:
    data = attrs.asdict(key)
    data["state"] = key.state.value
    data["success_rate"] = key.success_rate
    return data


def old_status(driver: Driver) -> dict[str, Any]:
    stats = driver.pool.statistics()
    now, wall = driver.now(), driver.wall_clock()
    keys = []
    for key in stats.keys:
        item = old_key_json(key)
        item["alias"] = item.pop("key_id")
        item["masked"] = mask(driver.secrets.get(key.key_id, ""))
        if key.until is not None:
            item["until_in"] = round(max(key.until - now, 0.0), 3)
            item["until_wall"] = wall + max(key.until - now, 0.0)
            del item["until"]
        keys.append(item)
    answered = sum(k["successes"] + sum(k["errors"].values()) for k in keys)
    successes = sum(k["successes"] for k in keys)
    return {
        "totalKeys": len([k for k in stats.keys if not k.removing]),
        "health": stats.count_by_state(),
        "stats": {
            "totalRequests": stats.started,
            "successRate": successes / answered if answered else None,
            "totalCost": stats.spend,  # since the 14th session: removed keys' spend included
            "inFlight": stats.in_flight,
            "queued": stats.queued,
            "delivered": stats.delivered,
            "rejected": stats.rejected,
        },
        "keys": keys,
    }


def _old_labels(**labels: Any) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{n}="{_old_escape(str(v))}"' for n, v in labels.items())
    return "{" + inner + "}"


def _old_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _old_number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _old_family(name: str, kind: str, text: str, samples: Iterable[Any]) -> list[str]:
    lines = [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
    return lines + [f"{name}{_old_labels(**lab)} {_old_number(v)}" for lab, v in samples]


def old_metrics(status: dict[str, Any], counters: ProxyCounters) -> str:
    """The old ``render`` of one pool (no providers, no shared pool)."""
    keys = [({"key": k["alias"]}, k) for k in status["keys"]]
    lines = _old_family(
        "keyrotor_key_state",
        "gauge",
        "1 for the state each key is in.",
        (
            ({**key, "state": s.value}, int(k["state"] == s.value))
            for key, k in keys
            for s in KeyState
        ),
    )
    for name, kind, text, field in (
        ("keyrotor_key_in_flight", "gauge", "Requests in flight on each key.", "in_flight"),
        ("keyrotor_key_requests_total", "counter", "Attempts sent on each key.", "requests"),
        ("keyrotor_key_successes_total", "counter", "2xx answers on each key.", "successes"),
    ):
        lines += _old_family(name, kind, text, ((key, k[field]) for key, k in keys))
    lines += _old_family(
        "keyrotor_key_errors_total",
        "counter",
        "Error answers on each key, by class.",
        (({**key, "class": n}, c) for key, k in keys for n, c in k["errors"].items()),
    )
    lines += _old_family(
        "keyrotor_key_spend_usd_total",
        "counter",
        "Spend on each key, in USD, as reported by the upstream.",
        ((key, k["spend"]) for key, k in keys),
    )
    lines += _old_family(
        "keyrotor_key_tokens_total",
        "counter",
        "Tokens on each key, by kind.",
        (
            ({**key, "kind": kd}, k[f"{kd}_tokens"])
            for key, k in keys
            for kd in ("prompt", "completion")
        ),
    )
    lines += _old_family(
        "keyrotor_pool_requests_total",
        "counter",
        "Requests through the pool, by outcome.",
        (({"outcome": o}, status["stats"][o]) for o in ("delivered", "rejected")),
    )
    lines += _old_family(
        "keyrotor_pool_queued",
        "gauge",
        "Requests waiting for a key.",
        [({}, status["stats"]["queued"])],
    )
    lines += _old_family(
        "keyrotor_proxy_responses_total",
        "counter",
        "Responses the proxy sent, by status.",
        (({"status": code}, n) for code, n in sorted(counters.by_status.items())),
    )
    lines += _old_family(
        "keyrotor_proxy_failovers_total",
        "counter",
        "Responses that needed more than one attempt (failover the caller never saw).",
        [({}, counters.failovers)],
    )
    lines += _old_family(
        "keyrotor_proxy_stream_errors_total",
        "counter",
        "Streams that ended with an error event after output had started.",
        [({}, counters.stream_errors)],
    )
    return "\n".join(lines) + "\n"


def mixed() -> Scenario:
    """``a`` serves, ``b`` is invalid, ``c`` is rate limited after one answer."""
    return (
        Scenario()
        .add(SECRETS["a"], Ok(), alias="a")
        .add(SECRETS["b"], Invalid(), alias="b")
        .add(SECRETS["c"], RateLimit(1, 60), alias="c")
        .add(SECRETS["d"], Ok(), alias="d")
    )


def healthy() -> Scenario:
    scenario = Scenario()
    for alias, secret in SECRETS.items():
        scenario.add(secret, Ok(), alias=alias)
    return scenario


async def with_traffic(proxy: Proxy) -> None:
    """Answers of every kind, a key marked for a while, a key removed with a
    request still on it (listed as ``removing``); then the driver's clock stops."""
    for _ in range(6):
        await proxy.app(call("POST", "/v1/chat/completions", CHAT, CLIENT))
    driver = proxy.driver
    driver.mark_key("d", KeyState.RATE_LIMITED, duration=30)
    _, slot = driver.open(lambda: None)
    driver.remove_key(slot.decisions[0].key_id)  # type: ignore[union-attr]
    freeze(driver)


# ------------------------------------------------------------------- outputs


async def test_the_status_and_metrics_are_byte_for_byte_the_old_ones() -> None:
    async with FakeUpstream(mixed()).serve() as server:
        async with proxy(server.url) as p:
            await with_traffic(p)
            stats = p.driver.pool.statistics()
            keys = [key.to_json() for key in stats.keys]
            status = p.driver.status()
            expected = json.dumps(p.app.status()).encode()
            as_admin = await body_of(await p.app(call("GET", "/status")))
            reference = old_metrics(old_status(p.driver), p.app.counters)
            metrics = await body_of(await p.app(call("GET", "/metrics", token=CLIENT)))
            as_client = json.loads(await body_of(await p.app(call("GET", "/status", token=CLIENT))))
    assert json.dumps(keys) == json.dumps([old_key_json(k) for k in stats.keys])
    assert json.dumps(status) == json.dumps(old_status(p.driver))
    assert {k["state"] for k in status["keys"]} >= {"failed", "rate_limited", "healthy"}
    assert any(k["removing"] for k in status["keys"]) and status["totalKeys"] == 3
    assert as_admin == expected
    assert metrics.decode() == reference
    assert set(json.loads(as_admin)["spend"]["clients"]) == {token_name(CLIENT)}
    assert as_client == {**json.loads(as_admin), "spend": as_client["spend"]}
    assert set(as_client["spend"]["clients"]) == {token_name(CLIENT)}  # its own


async def test_a_status_longer_than_one_part_is_the_same_json() -> None:
    aliases = [f"k{i}" for i in range(1_100)]
    async with FakeUpstream(Scenario()).serve() as server:
        async with proxy(server.url, aliases, big=True) as p:
            freeze(p.driver)
            expected = json.dumps(p.app.status()).encode()
            body = await body_of(await p.app(call("GET", "/status")))
    assert body == expected
    assert len(json.loads(body)["keys"]) == 1_100


async def test_v1_key_counts_keys_without_the_status() -> None:
    async with FakeUpstream(mixed()).serve() as server:
        async with proxy(server.url) as p:
            await with_traffic(p)
            status = old_status(p.driver)
            seen = count_calls(p.driver)
            info = json.loads(await body_of(await p.app(call("GET", "/v1/key", token=CLIENT))))
    usable = status["health"]["healthy"] + status["health"]["recovering"]
    assert info["data"] == {
        "label": f"keyrotor pool ({status['totalKeys']} keys, {usable} usable)",
        "usage": status["stats"]["totalCost"],
        "limit": None,
        "limit_remaining": None,
        "is_free_tier": False,
        "keyrotor": {"totalKeys": status["totalKeys"], "usableKeys": usable},
    }
    assert status["totalKeys"] == 3 and status["stats"]["totalCost"] > 0
    assert seen.status == []  # no key's entry made


async def test_one_key_is_looked_up_alone_and_listed_as_in_the_whole_list() -> None:
    async with FakeUpstream(mixed()).serve() as server:
        async with proxy(server.url) as p:
            await with_traffic(p)
            listed = json.loads(await body_of(await p.app(call("GET", "/admin/keys"))))["keys"]
            removing = next(k["alias"] for k in listed if k["removing"])
            seen = count_calls(p.driver)
            one = json.loads(await body_of(await p.app(call("GET", "/admin/keys/d"))))
            gone = json.loads(await body_of(await p.app(call("GET", f"/admin/keys/{removing}"))))
            missing = await p.app(call("GET", "/admin/keys/zz"))
            only = p.driver.status(("d",))
    assert one == next(k for k in listed if k["alias"] == "d")
    assert gone == next(k for k in listed if k["alias"] == removing)
    assert missing.status == 404
    assert seen.entries == ["d", removing, "zz"]  # one key looked up, no other key's entry
    assert seen.status == [("d",)]  # only the status(("d",)) below
    assert [k["alias"] for k in only["keys"]] == ["d"]
    assert {**only, "keys": []} == {**old_status(p.driver), "keys": []}  # the pool's totals


# ------------------------------------------------------------------ freshness


async def test_a_big_pools_answers_are_made_once_a_second_and_anew_after_an_admin_change() -> None:
    async with FakeUpstream(healthy()).serve() as server:
        async with proxy(server.url, big=True) as p:
            seen = count_calls(p.driver)

            async def status() -> dict[str, Any]:
                answer = await p.app(call("GET", "/status", token=CLIENT))
                return json.loads(await body_of(answer))  # type: ignore[no-any-return]

            async def healthz() -> int:
                answer = await p.app(call("GET", "/healthz", token=None))
                return int(json.loads(await body_of(answer))["usable_keys"])

            first, usable = await status(), await healthz()
            await p.app(call("POST", "/v1/chat/completions", CHAT, CLIENT))
            p.clock.advance(CACHE_TTL / 2)
            within, usable_within = await status(), await healthz()
            p.clock.advance(CACHE_TTL / 2)
            after = await status()
            marked = await p.app(call("POST", "/admin/keys/a/state", '{"state": "disabled"}'))
            at_once, usable_at_once = await status(), await healthz()
    assert within == first and usable_within == usable == 4
    assert after["stats"]["totalRequests"] == first["stats"]["totalRequests"] + 1
    assert marked.status == 200
    assert next(k for k in at_once["keys"] if k["alias"] == "a")["state"] == "disabled"
    assert usable_at_once == 3
    assert seen.counts == 2  # /healthz: at its first call, and after the change
    assert seen.status.count(None) == 3  # /status: first, a second later, after the change


async def test_a_small_pool_is_made_anew_at_every_call() -> None:
    async with FakeUpstream(healthy()).serve() as server:
        async with proxy(server.url) as p:
            before = json.loads(await body_of(await p.app(call("GET", "/status"))))
            await p.app(call("POST", "/v1/chat/completions", CHAT, CLIENT))
            after = json.loads(await body_of(await p.app(call("GET", "/status"))))
    assert after["stats"]["totalRequests"] == before["stats"]["totalRequests"] + 1


async def test_a_head_of_a_big_pool_makes_nothing() -> None:
    paths = ("/status", "/metrics")
    async with FakeUpstream(healthy()).serve() as server:
        async with proxy(server.url, big=True) as p:
            seen = count_calls(p.driver)
            heads = [await p.app(call("HEAD", path, token=CLIENT)) for path in paths]
            made = len(seen.status)
            got = [await body_of(await p.app(call("GET", path, token=CLIENT))) for path in paths]
            again = [await p.app(call("HEAD", path, token=CLIENT)) for path in paths]
            empty = [await body_of(head) for head in heads]
    assert [head.status for head in heads] == [200, 200] and made == 0
    assert [isinstance(head.body, bytes) for head in heads] == [False, False]  # no length said
    assert empty == [b"", b""]
    assert [head.body for head in again] == got  # a fresh one: its length (no body is sent)


async def test_concurrent_callers_share_one_making_and_a_change_meanwhile_is_not_kept() -> None:
    clock = FakeClock(start=0.0)
    rendered: Rendered[int] = Rendered(clock)
    gates: list[anyio.Event] = []

    async def make() -> int:
        gates.append(anyio.Event())
        await gates[-1].wait()
        return len(gates)

    got: list[int] = []

    async def caller() -> None:
        got.append(await rendered.get(make))

    async with anyio.create_task_group() as tasks:
        for _ in range(3):
            tasks.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        assert rendered.fresh() is None  # (a HEAD's look): nothing made yet
        gates[-1].set()
    assert len(gates) == 1 and got == [1, 1, 1]
    clock.advance(CACHE_TTL - 0.001)
    assert await rendered.get(make) == 1 and len(gates) == 1
    clock.advance(0.001)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        rendered.forget()  # an admin change while it is made
        gates[-1].set()
    assert got[-1] == 2  # its caller has it, begun before the change
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        gates[-1].set()
    assert got[-1] == 3  # not kept: made anew


async def test_a_caller_that_leaves_while_making_lets_the_next_one_make_it() -> None:
    rendered: Rendered[str] = Rendered(FakeClock(start=0.0))

    async def never() -> str:
        await anyio.sleep_forever()
        raise AssertionError

    async def quick() -> str:
        return "made"

    with anyio.move_on_after(0.01):
        await rendered.get(never)
    with anyio.fail_after(5):
        assert await rendered.get(quick) == "made"


# ------------------------------------------------------------------ free tier


async def test_the_free_tier_lists_the_accounts_with_use_or_a_set_limit() -> None:
    keys = {alias: SECRETS[alias] for alias in "abc"}
    async with AsyncClient(keys, "http://127.0.0.1:9") as client:
        options = RoutingOptions(accounts={"c": 10})  # less room than the others
        router = Router([], options, None, client, None)  # type: ignore[arg-type]
        assert router.status()["freeTier"].keys() == {"c"}
        taken = router.take_free()
        tiers = router.status()["freeTier"]
        every = router.free_status()
    assert taken is not None and taken[0] != "c"
    assert tiers.keys() == {taken[0], "c"}
    assert tiers[taken[0]]["usedToday"] == 1 and tiers["c"]["perDay"] == 10
    assert every.keys() == {"a", "b", "c"}  # the alerts and the dashboard's events: all


def test_an_idle_pool_renders_as_before() -> None:
    driver = Driver(SECRETS)
    status = driver.status()
    assert json.dumps(status) == json.dumps(old_status(driver))
    assert render(status, ProxyCounters()) == old_metrics(status, ProxyCounters())
