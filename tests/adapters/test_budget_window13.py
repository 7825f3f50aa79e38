"""A key's budget window that was not used up ends, after a restart, when it
ended before: the state file keeps when each window opened (a day's ledger row
has no times), mirrored from the spend the proxy records."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

from keyrotor.adapters.config import ProxyConfig
from keyrotor.adapters.proxy import runtime
from keyrotor.adapters.proxy.app import ProxyApp
from keyrotor.adapters.proxy.runtime import plan, record, restore
from keyrotor.adapters.proxy.types import Request
from keyrotor.adapters.storage import SCHEMA_VERSION, StateStore
from keyrotor.core import KeySpec, KeyState, PoolConfig, SpendRecorded, Tick
from keyrotor.testing import FakeUpstream, Ok, Scenario
from keyrotor.transports._async import AsyncClient
from keyrotor.transports._driver import Driver, StreamAccountant

A = "test-secret-window-aaaaaaaaaaaaaaaa"
B = "test-secret-window-bbbbbbbbbbbbbbbb"
HOUR = 3600.0
DAY = 86_400.0
MIDNIGHT = 1_700_006_400.0  # 2023-11-15 00:00 UTC
WINDOWED = KeySpec(key_id="k", budget=10.0, budget_window=DAY)


class Wall:
    """A settable wall clock."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def paid(driver: Driver, key_id: str, cost: float) -> None:
    """Tell the driver's ``on_finished`` hooks (``record``'s) that an answer of
    ``key_id`` cost ``cost``, as the driver does when a delivered body ends."""
    usage = StreamAccountant()
    usage.cost = cost
    for hook in driver.on_finished:
        hook(key_id, usage)


def spend_of(driver: Driver, key_id: str) -> float:
    return next(k.spend for k in driver.pool.statistics().keys if k.key_id == key_id)


def until_of(driver: Driver, key_id: str) -> float:
    until = next(k.until for k in driver.pool.statistics().keys if k.key_id == key_id)
    assert until is not None
    return until


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[StateStore, Wall]]:
    wall = Wall(MIDNIGHT)
    with StateStore.open(tmp_path / "s.db", secret_key=None, wall_clock=wall) as opened:
        yield opened, wall


# -- end to end: the reviewer's scenario through open_app -----------------------------------


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def wall_clocked(wall: Wall, made: list[AsyncClient]) -> type[AsyncClient]:
    """``AsyncClient`` whose driver reads ``wall`` as the wall clock (kept in ``made``)."""

    class Client(AsyncClient):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.driver.wall_clock = wall
            made.append(self)

    return Client


async def ask(app: ProxyApp, completion_tokens: int) -> str:
    """One chat request (0.625 USD a completion token); the key that served it."""
    body = {
        "model": "test/flat",
        "max_tokens": completion_tokens,
        "messages": [{"role": "user", "content": "hi"}],
    }
    headers = [("content-type", "application/json")]
    response = await app(
        Request(
            method="POST",
            target="/v1/chat/completions",
            headers=headers,
            body=json.dumps(body).encode(),
        )
    )
    if not isinstance(response.body, bytes):
        async for _ in response.body:
            pass
        if response.aclose is not None:
            await response.aclose()
    assert response.status == 200
    return dict(response.headers)["x-keyrotor-key"]


@pytest.mark.anyio
async def test_a_window_not_used_up_ends_when_it_did_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """24 h window, budget 10: 5 USD at 08:00, restart at 20:00. The next day at
    09:00 the 08:00 window is over and 6.25 USD opens a new one (the window was
    believed to open at the restart, and the key was depleted)."""
    wall = Wall(MIDNIGHT + 8 * HOUR)
    made: list[AsyncClient] = []
    monkeypatch.setattr(runtime, "AsyncClient", wall_clocked(wall, made))
    scenario = Scenario(prompt_price=0.0, completion_price=0.625).add(A, Ok(), alias="k")
    path = tmp_path / "state.db"

    @asynccontextmanager
    async def proxy(url: str) -> AsyncIterator[tuple[ProxyApp, Driver]]:
        config = ProxyConfig(
            keys={"k": A},
            pool=PoolConfig(keys=[WINDOWED]),
            upstream=url,
            state_path=str(path),
            catalog_refresh=None,
        )
        store = StateStore.open(path, secret_key=None, wall_clock=wall, flush_in_thread=False)
        async with runtime.open_app(config, lambda record: None, store=store) as app:
            yield app, made[-1].driver

    async with FakeUpstream(scenario).serve() as server:
        async with proxy(server.url) as (app, driver):
            assert await ask(app, 8) == "k"  # 5 USD at 08:00
            assert spend_of(driver, "k") == pytest.approx(5.0)
        wall.t = MIDNIGHT + 20 * HOUR
        async with proxy(server.url) as (app, driver):
            assert spend_of(driver, "k") == pytest.approx(5.0)
            # 13 hours on: the next day, 09:00.
            wall.t = MIDNIGHT + DAY + 9 * HOUR
            driver.feed(Tick(now=driver.now() + 13 * HOUR))
            assert await ask(app, 10) == "k"  # 6.25 USD
            assert driver.pool.state_of("k") is KeyState.HEALTHY
        # Restarted again at 09:30: the window of 09:00 comes back, and ends at 09:00.
        wall.t = MIDNIGHT + DAY + 9.5 * HOUR
        opened = anyio.current_time()  # the new pool's clock (the fake wall clock stands)
        async with proxy(server.url) as (app, driver):
            assert driver.pool.state_of("k") is KeyState.HEALTHY
            assert await ask(app, 8) == "k"  # 5 USD: 11.25 in the window
            assert driver.pool.state_of("k") is KeyState.DEPLETED
            left, since = until_of(driver, "k") - driver.now(), driver.now() - opened
            ends = MIDNIGHT + 2 * DAY + 9 * HOUR  # 24 h after 09:00, not after 09:30
            assert ends - wall.t - since - 1e-6 <= left <= ends - wall.t + 1e-6
    with StateStore.open(path, secret_key=None, wall_clock=wall) as again:
        assert again.load().windows == {"k": MIDNIGHT + DAY + 9 * HOUR}


# -- restore, driven directly ------------------------------------------------------------------


def test_a_window_opened_yesterday_ends_a_window_after_it_opened(
    store: tuple[StateStore, Wall],
) -> None:
    """Opened yesterday 15:00 by 4 USD, 2 USD at 20:00, 3 USD today at 03:00,
    restart today 10:00: 9 USD in a window that ends today at 15:00 (not at
    yesterday's end + 24 h)."""
    state, wall = store
    wall.t = MIDNIGHT - 9 * HOUR  # yesterday, 15:00
    first = Driver({"k": A}, PoolConfig(keys=[WINDOWED]), wall_clock=wall)
    record(first, state)
    for at, cost in ((-9 * HOUR, 4.0), (-4 * HOUR, 2.0), (3 * HOUR, 3.0)):
        wall.t = MIDNIGHT + at
        paid(first, "k", cost)
    wall.t = now = MIDNIGHT + 10 * HOUR
    loaded = state.load()
    assert loaded.windows == {"k": MIDNIGHT - 9 * HOUR}
    driver = Driver({"k": A}, PoolConfig(keys=[WINDOWED]), wall_clock=wall)
    assert restore(driver, loaded, wall_now=now) == {"k": MIDNIGHT - 9 * HOUR}
    assert spend_of(driver, "k") == pytest.approx(9.0)
    driver.feed(SpendRecorded(now=driver.now(), key_id="k", cost=1.5))
    assert driver.pool.state_of("k") is KeyState.DEPLETED
    assert until_of(driver, "k") == pytest.approx(driver.now() + 5 * HOUR)  # today, 15:00


def test_spend_before_the_window_opened_is_an_earlier_windows(
    store: tuple[StateStore, Wall],
) -> None:
    """A 7-day window that opened two days ago: the days before it belonged to
    the window before, and do not count (they would as days' ends)."""
    state, wall = store
    week = KeySpec(key_id="k", budget=10.0, budget_window=7 * DAY)
    wall.t = MIDNIGHT - 9 * DAY  # a window opens, 9 days ago
    first = Driver({"k": A}, PoolConfig(keys=[week]), wall_clock=wall)
    record(first, state)
    paid(first, "k", 1.0)
    wall.t = MIDNIGHT - 4 * DAY  # 4 days ago, in that window
    paid(first, "k", 6.0)
    wall.t = MIDNIGHT - 2 * DAY + 12 * HOUR  # it ended: a new one, two days ago at noon
    paid(first, "k", 2.0)
    wall.t = now = MIDNIGHT + 10 * HOUR
    loaded = state.load()
    assert loaded.windows == {"k": MIDNIGHT - 2 * DAY + 12 * HOUR}
    driver = Driver({"k": A}, PoolConfig(keys=[week]), wall_clock=wall)
    restore(driver, loaded, wall_now=now)
    driver.feed(SpendRecorded(now=driver.now(), key_id="k", cost=7.5))  # 9.5 in the window
    assert driver.pool.state_of("k") is KeyState.HEALTHY


def test_a_stored_start_whose_window_is_over_is_ignored(store: tuple[StateStore, Wall]) -> None:
    """Its window ended at 04:00 today; without a later start kept, the days
    count as without one: at their ends (or now)."""
    state, wall = store
    state.record_window("k", MIDNIGHT - 20 * HOUR)  # yesterday, 04:00
    wall.t = MIDNIGHT - 20 * HOUR
    state.record_spend("k", cost=8.0)
    wall.t = MIDNIGHT + 2 * HOUR
    state.record_spend("k", cost=1.0)
    wall.t = now = MIDNIGHT + 10 * HOUR
    loaded = state.load()
    assert loaded.windows == {"k": MIDNIGHT - 20 * HOUR}
    drivers = []
    for given in (loaded, attrs.evolve(loaded, windows={})):
        driver = Driver({"k": A}, PoolConfig(keys=[WINDOWED]), wall_clock=wall)
        assert restore(driver, given, wall_now=now) == {"k": MIDNIGHT - 1.0}  # the day's end
        driver.feed(SpendRecorded(now=driver.now(), key_id="k", cost=1.5))
        drivers.append(driver)
    for driver in drivers:
        assert spend_of(driver, "k") == pytest.approx(10.5)
        assert driver.pool.state_of("k") is KeyState.DEPLETED
        assert until_of(driver, "k") == pytest.approx(driver.now() + DAY - 10 * HOUR - 1.0)


def test_keys_without_a_window_keep_none_and_restore_as_before(
    store: tuple[StateStore, Wall],
) -> None:
    state, wall = store
    specs = [
        KeySpec(key_id="life", budget=10.0),  # a lifetime budget: every day counts
        KeySpec(key_id="plain"),  # no budget: today counts
        KeySpec(key_id="nobudget", budget_window=DAY),  # a window without a budget: none
    ]
    keys = {"life": A, "plain": B, "nobudget": A + "c"}
    wall.t = MIDNIGHT - 5 * HOUR
    first = Driver(keys, PoolConfig(keys=specs), wall_clock=wall)
    record(first, state)
    for alias in keys:
        paid(first, alias, 6.0)
    wall.t = now = MIDNIGHT + 10 * HOUR
    for alias in keys:
        paid(first, alias, 1.0)
    state.record_window("plain", MIDNIGHT + HOUR)  # say, a window configured before
    loaded = state.load()
    assert loaded.windows == {"plain": MIDNIGHT + HOUR}  # none of the spend opened one
    driver = Driver(keys, PoolConfig(keys=specs), wall_clock=wall)
    assert restore(driver, loaded, wall_now=now) == {}
    assert {k.key_id: k.spend for k in driver.pool.statistics().keys} == pytest.approx(
        {"life": 7.0, "plain": 1.0, "nobudget": 7.0}  # its window still says which days count
    )


def test_a_key_added_again_starts_a_window_afresh(store: tuple[StateStore, Wall]) -> None:
    """Removed and added again, a key's record in the pool starts afresh: so
    does its window in the file."""
    state, wall = store
    wall.t = MIDNIGHT + 8 * HOUR
    driver = Driver({"k": A}, PoolConfig(keys=[WINDOWED]), wall_clock=wall)
    record(driver, state)
    paid(driver, "k", 1.0)
    wall.t = MIDNIGHT + 9 * HOUR
    paid(driver, "k", 1.0)  # in the running window
    assert state.load().windows == {"k": MIDNIGHT + 8 * HOUR}
    driver.remove_key("k")
    again = json.loads(json.dumps(A))  # the same secret, as the admin API reads it
    driver.add_key(again, attrs.evolve(WINDOWED, budget_window=2 * DAY))
    wall.t = MIDNIGHT + 10 * HOUR
    paid(driver, "k", 1.0)
    assert state.load().windows == {"k": MIDNIGHT + 10 * HOUR}
    wall.t = MIDNIGHT + 40 * HOUR  # past 24 h, within the new key's 48 h
    paid(driver, "k", 1.0)
    assert state.load().windows == {"k": MIDNIGHT + 10 * HOUR}


def test_a_rebound_alias_takes_its_window_start_with_its_history(
    store: tuple[StateStore, Wall],
) -> None:
    state, wall = store
    cfg = ProxyConfig(keys={"k": A}, pool=PoolConfig(keys=[WINDOWED]), state_path="unused")
    plan(cfg, state, lambda record: None)  # binds k = A
    state.record_window("k", MIDNIGHT + HOUR)
    state.record_spend("k", cost=3.0)
    wall.t = MIDNIGHT + 2 * HOUR
    log: list[dict[str, Any]] = []
    other = ProxyConfig(keys={"k": B}, pool=PoolConfig(keys=[WINDOWED]), state_path="unused")
    startup = plan(other, state, log.append)  # k names another key now
    assert startup.loaded is not None and startup.loaded.windows == {}
    windows = state.load().windows
    assert list(windows.values()) == [MIDNIGHT + HOUR]
    (retired,) = windows
    assert retired.startswith("k~")
    assert [row.alias for row in state.ledger()] == [retired]


def test_a_version_6_file_gets_the_windows_table_with_nothing_lost(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    wall = Wall(MIDNIGHT + HOUR)
    with StateStore.open(path, secret_key=None, wall_clock=wall) as state:
        state.record_spend("k", cost=2.5)
        state.record_state("k", "disabled", None, "operator")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DROP TABLE IF EXISTS windows")  # what schema 6 had
    db.execute("PRAGMA user_version = 6")
    db.execute("UPDATE meta SET value = '6' WHERE name = 'schema_version'")
    db.close()
    with StateStore.open(path, secret_key=None, wall_clock=wall) as state:
        loaded = state.load()
        assert loaded.windows == {}
        assert [(row.alias, row.cost) for row in loaded.ledger] == [("k", 2.5)]
        assert loaded.states["k"].state == "disabled"
        state.record_window("k", MIDNIGHT + HOUR)
    with StateStore.open(path, secret_key=None, wall_clock=wall) as state:
        assert state.load().windows == {"k": MIDNIGHT + HOUR}
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert SCHEMA_VERSION >= 7
    db.close()
