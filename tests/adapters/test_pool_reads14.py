"""Session 14, reading a big pool: one key, the totals and the usable count
without a picture of every key; /status and the dashboard's picture made a
step of keys at a time; a removed key's spend kept in the pool's totals."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import Any

import anyio
import pytest
import trio

from keyrotor.adapters.config import RoutingOptions
from keyrotor.adapters.proxy.app import CACHE_TTL, Rendered
from keyrotor.adapters.proxy.json_parts import stepped
from keyrotor.adapters.proxy.router import Router
from keyrotor.adapters.storage import StateStore
from keyrotor.core import KeyState, KeyStatistics
from keyrotor.testing import FakeUpstream
from keyrotor.transports._driver import STATUS_STEP, Driver
from keyrotor.transports.api import AsyncClient

from .test_status_scale13 import CHAT, CLIENT, SECRETS, body_of, call, healthy, proxy


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def pictures(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys whose ``KeyStatistics`` were built, in order."""
    built: list[str] = []
    real = KeyStatistics.from_record.__func__  # type: ignore[attr-defined]

    def from_record(cls: type[KeyStatistics], key: Any) -> KeyStatistics:
        built.append(key.key_id)
        return real(cls, key)  # type: ignore[no-any-return]

    monkeypatch.setattr(KeyStatistics, "from_record", classmethod(from_record))
    return built


def spent(status: dict[str, Any]) -> float:
    return float(status["stats"]["totalCost"])


@pytest.mark.anyio
async def test_a_removed_keys_spend_stays_in_the_pools_totals() -> None:
    # /status totalCost and /v1/key usage summed the keys still in the pool:
    # removing a key took what it had spent off the pool's totals.
    async with FakeUpstream(healthy()).serve() as server:
        async with proxy(server.url) as p:
            for _ in range(8):
                await p.app(call("POST", "/v1/chat/completions", CHAT, CLIENT))
            before = p.driver.status()
            by_key = {k["alias"]: k["spend"] for k in before["keys"]}
            removed = await p.app(call("DELETE", "/admin/keys/a"))
            after = json.loads(await body_of(await p.app(call("GET", "/status"))))
            usage = json.loads(await body_of(await p.app(call("GET", "/v1/key", token=CLIENT))))
            snapshot = p.driver.pool.snapshot()
    assert removed.status == 200 and by_key["a"] > 0
    assert "a" not in {k["alias"] for k in after["keys"]}  # gone, nothing in flight
    assert spent(after) == spent(before) == pytest.approx(sum(by_key.values()), rel=1e-12)
    assert usage["data"]["usage"] == spent(before)
    assert snapshot["counters"]["spent"] == spent(before)  # kept across a restore too


@pytest.mark.anyio
async def test_one_key_the_totals_and_the_usable_count_picture_no_other_key(
    pictures: list[str],
) -> None:
    # check_new_key, /admin/keys/{alias}, the processes' summary, /v1/key and
    # /healthz each built every key's picture (90 ms at 10,000 keys).
    async with FakeUpstream(healthy()).serve() as server:
        async with proxy(server.url) as p:
            await p.app(call("POST", "/v1/chat/completions", CHAT, CLIENT))
            pictures.clear()
            p.driver.check_new_key("e", "sk-or-v1-reads14-e-" + "pq" * 10)
            new_key = list(pictures)
            one = await p.app(call("GET", "/admin/keys/b"))
            summary = p.app.summary()
            key = await p.app(call("GET", "/v1/key", token=CLIENT))
            health = await p.app(call("GET", "/healthz", token=None))
    assert new_key == []
    assert one.status == key.status == health.status == 200
    assert pictures == ["b"]  # /admin/keys/b: its own, and nothing else
    assert summary["requests"] == 1 and summary["delivered"] == 1


def test_the_status_is_made_a_step_of_keys_at_a_time() -> None:
    n = STATUS_STEP * 2 + 1
    driver = Driver({f"k{i}": f"sk-or-v1-reads14-{i:05d}-" + "xy" * 8 for i in range(n)})
    whole = driver.status()
    steps = driver.status_steps()
    next(steps)  # the first step's keys are taken; the others wait for the next turns
    driver.remove_key(f"k{n - 1}")  # meanwhile: a key of the last step leaves
    turns = 1
    while True:
        try:
            next(steps)
            turns += 1
        except StopIteration as done:
            stepped_status = done.value
            break
    assert turns == 2  # three steps: a turn for other tasks after each of the first two
    assert [k["alias"] for k in stepped_status["keys"]] == [f"k{i}" for i in range(n - 1)]
    assert stepped_status["totalKeys"] == n - 1 == whole["totalKeys"] - 1
    assert stepped_status["keys"] == whole["keys"][:-1]
    assert driver.status() == stepped_status


def test_stepped_lets_other_tasks_run_between_the_steps() -> None:
    ran: list[str] = []

    def steps() -> Any:
        ran.append("step 1")
        yield
        ran.append("step 2")
        yield
        ran.append("step 3")
        return "picture"

    async def other() -> None:
        ran.append("other")

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            return await stepped(steps())

    assert trio.run(main) == "picture"
    assert [r for r in ran if r != "other"] == ["step 1", "step 2", "step 3"]
    assert 0 < ran.index("other") < ran.index("step 3")  # it ran between the steps


@pytest.mark.anyio
async def test_a_draining_key_is_found_alone_and_refused_as_a_new_key() -> None:
    async with FakeUpstream(healthy()).serve() as server:
        async with proxy(server.url, ("a", "b")) as p:
            _, slot = p.driver.open(lambda: None)
            held = slot.decisions[0].key_id  # type: ignore[union-attr]
            p.driver.remove_key(held)
            entry = p.driver.key_entry(held)
            spec = p.driver.pool.key_spec(held)
            with pytest.raises(Exception, match="still finishing its requests"):
                p.driver.check_new_key(held, "sk-or-v1-reads14-new-" + "rs" * 10)
    assert entry is not None and entry["removing"] and entry["alias"] == held
    assert spec is not None and spec.key_id == held
    assert p.driver.key_entry("zz") is None and p.driver.pool.key_spec("zz") is None


def test_the_days_cost_is_the_ledgers_without_its_rows(
    tmp_path: pathlib.Path, opened: Callable[..., StateStore]
) -> None:
    # /status's totalCostToday made every row of today's ledger (one a key).
    now = [1_700_000_000.0]  # 2023-11-14 22:13:20 UTC
    store = opened(tmp_path / "state.db", wall_clock=lambda: now[0])
    for i in range(5):
        store.record_spend(f"k{i}", cost=0.125 * (i + 1), at=now[0] - 86_400 * 3)  # an older day
        store.record_spend(f"k{i}", cost=0.25 * (i + 1), at=now[0] - 86_400)  # yesterday
        store.record_spend(f"k{i % 2}", cost=0.5)  # today: k0 and k1 again and again
    store.flush()
    store.record_spend("k9", cost=2.0)  # not written yet
    days = ["2023-11-11", "2023-11-13", None]
    assert [store.cost_on(day) for day in days] == [
        pytest.approx(sum(row.cost for row in store.ledger(day))) for day in days
    ]
    assert store.cost_on() == pytest.approx(4.5)
    now[0] += 86_400  # the next day: nothing spent yet
    assert store.cost_on() == 0.0 == sum(row.cost for row in store.ledger())


@pytest.mark.anyio
async def test_every_key_listed_a_step_at_a_time_is_listed_as_alone() -> None:
    aliases = [f"k{i}" for i in range(STATUS_STEP + 7)]
    async with FakeUpstream(healthy()).serve() as server:
        async with proxy(server.url, aliases) as p:
            p.driver.mark_key("k3", KeyState.DISABLED)
            answer = await p.app(call("GET", "/admin/keys"))
            body = await body_of(answer)
            assert p.app._admin is not None
            alone = [p.app._admin.list_keys(alias)[0] for alias in aliases]
    listed = json.loads(body)["keys"]
    assert answer.status == 200 and listed == alone
    assert body == json.dumps({"keys": alone}).encode()  # the text of one json.dumps
    assert listed[3]["state"] == "disabled" and listed[0]["options"] == {}


def test_a_free_slot_is_given_back_when_its_caller_leaves_during_the_redis_check() -> None:
    # take_free counted the slot here, then the caller left while Redis was
    # asked: the slot stayed taken until the day ended.
    async def main(url: str) -> tuple[int, int]:
        async with AsyncClient({"a": SECRETS["a"]}, url) as client:
            router = Router([], RoutingOptions(), None, client, None)  # type: ignore[arg-type]
            with anyio.CancelScope() as scope:

                class Hanging:
                    async def take_free(self, *args: Any) -> None:
                        scope.cancel()  # the caller leaves while Redis answers
                        await anyio.sleep_forever()

                router.shared = Hanging()  # type: ignore[assignment]
                slot = router.take_free()
                assert slot is not None
                taken = router.free_status()["a"]["usedToday"]
                await router.shared_take(slot[0], slot[2])
            return taken, router.free_status()["a"]["usedToday"]

    with FakeUpstream.running_in_thread(healthy()) as server:
        taken, left = anyio.run(main, server.url)
    assert (taken, left) == (1, 0)


@pytest.mark.anyio
async def test_callers_waiting_for_a_long_making_get_its_value() -> None:
    # A making that took longer than CACHE_TTL (a big pool on a busy loop) was
    # made again by each caller that had waited for it, one after another.
    now = [0.0]
    rendered: Rendered[int] = Rendered(lambda: now[0])
    makings: list[float] = []

    async def make() -> int:
        makings.append(now[0])
        await anyio.sleep(0)
        now[0] += CACHE_TTL * 1.5
        return len(makings)

    got: list[int] = []

    async def caller() -> None:
        got.append(await rendered.get(make))

    async with anyio.create_task_group() as tasks:
        for _ in range(4):
            tasks.start_soon(caller)
    assert makings == [0.0] and got == [1, 1, 1, 1]
    rendered.forget()
    assert await rendered.get(make) == 2  # a change still makes it anew


@pytest.mark.anyio
async def test_a_key_added_again_with_another_account_is_seen_by_the_free_tier_at_once() -> None:
    # The router learned accounts when the key ids changed or every 10 s: a key
    # removed and added again under its alias, another account's, kept the old one.
    async with FakeUpstream(healthy()).serve() as server:
        async with proxy(server.url, ("a", "b")) as p:
            router = Router([], RoutingOptions(), None, p.app._client, None)  # type: ignore[arg-type]
            p.app.router = router
            before = set(router.free_status())
            await p.app(call("DELETE", "/admin/keys/b"))  # the last: the ids stay in order
            body = json.dumps({"alias": "b", "key": SECRETS["b"], "account": "team"})
            added = await p.app(call("POST", "/admin/keys", body))
            after = set(router.free_status())
    assert added.status == 201
    assert before == {"a", "b"} and after == {"a", "team"}
