"""What the proxy puts back at start from the state file: the right key's
state, the right window of spend; and one process per file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from keyrotor.adapters.config import ProxyConfig
from keyrotor.adapters.proxy.runtime import IDLE_LOOK, _flush_every, plan, restore
from keyrotor.adapters.storage import StateStore, StorageError
from keyrotor.core import KeySpec, KeyState, PoolConfig
from keyrotor.transports._driver import Driver

A = "test-secret-aaaaaaaaaaaaaaaaaaaaaaaa"
B = "test-secret-bbbbbbbbbbbbbbbbbbbbbbbb"
DAY = 86_400.0


def config(keys: dict[str, str], specs: list[KeySpec] | None = None) -> ProxyConfig:
    specs = specs or [KeySpec(key_id=alias) for alias in keys]
    return ProxyConfig(keys=keys, pool=PoolConfig(keys=specs), state_path="unused")


def start(cfg: ProxyConfig, store: StateStore, log: list[dict[str, Any]]) -> Driver:
    startup = plan(cfg, store, log.append)
    driver = Driver(startup.keys, startup.pool)
    assert startup.loaded is not None
    restore(driver, startup.loaded)
    return driver


def test_a_state_follows_the_key_not_the_alias(tmp_path: Path) -> None:
    log: list[dict[str, Any]] = []
    with StateStore.open(tmp_path / "s.db", secret_key=None) as store:
        plan(config({"env1": A, "env2": B}), store, log.append)  # binds env1=A, env2=B
        store.record_state("env1", "disabled", None, "operator")
        store.record_spend("env1", cost=3.0)
        # Same keys, same aliases: the state comes back.
        driver = start(config({"env1": A, "env2": B}), store, log)
        assert driver.pool.state_of("env1") is KeyState.DISABLED
        # The environment's keys in the other order: env1 is now B, a healthy key.
        driver = start(config({"env1": B, "env2": A}), store, log)
        assert driver.pool.state_of("env1") is KeyState.HEALTHY
        assert driver.pool.statistics().keys[0].spend == 0.0
        assert any("names another key" in r.get("message", "") for r in log)
        # Its history is kept under a retired name, not lost.
        retired = [row for row in store.ledger() if row.alias.startswith("env1~")]
        assert len(retired) == 1 and retired[0].cost == pytest.approx(3.0)


def test_spend_is_restored_for_the_running_window_only(tmp_path: Path) -> None:
    now = time.time()
    clock = [now - 2 * DAY]  # the spend happened two days ago, then today
    specs = [
        KeySpec(key_id="daily", credits=10.0),  # no window: today's spend only
        KeySpec(key_id="weekly", budget=10.0, budget_window=7 * DAY),
    ]
    cfg = config({"daily": A, "weekly": B}, specs)
    with StateStore.open(tmp_path / "s.db", secret_key=None, wall_clock=lambda: clock[0]) as store:
        plan(cfg, store, lambda record: None)
        for alias in ("daily", "weekly"):
            store.record_spend(alias, cost=12.0)  # old: more than the credits
        clock[0] = now
        for alias in ("daily", "weekly"):
            store.record_spend(alias, cost=1.5)
        driver = start(cfg, store, [])
    spend = {k.key_id: k.spend for k in driver.pool.statistics().keys}
    assert spend == {"daily": pytest.approx(1.5), "weekly": pytest.approx(13.5)}
    # The refunded key is not depleted again by last month's spend...
    assert driver.pool.state_of("daily") is KeyState.HEALTHY
    # ...while the weekly budget, spent within its window, is.
    assert driver.pool.state_of("weekly") is KeyState.DEPLETED


@pytest.mark.parametrize(
    ("window", "restart", "spent_before"),
    [(3600.0, 15 * 3600.0, 300.0), (DAY, 600.0, 1200.0)],  # 15:00 restart; 00:10, spent 23:50
    ids=["an hour, late in the day", "a day, across midnight"],
)
def test_spend_inside_a_short_window_counts_after_a_restart(
    tmp_path: Path, window: float, restart: float, spent_before: float
) -> None:
    """A day's ledger row has no times: it counts as spent at the day's end, so all
    of it stays in a window the day overlaps (it counted as spent at midnight, and
    a window shorter than the time since midnight forgot it)."""
    midnight = 1_700_006_400.0  # 2023-11-15 00:00 UTC
    now = midnight + restart
    wall = [now - spent_before]
    with StateStore.open(tmp_path / "s.db", secret_key=None, wall_clock=lambda: wall[0]) as store:
        store.record_spend("k", cost=8.0)
        wall[0] = now
        loaded = store.load()
    specs = [KeySpec(key_id="k", budget=10.0, budget_window=window)]
    driver = Driver({"k": A}, PoolConfig(keys=specs), wall_clock=lambda: now)
    restore(driver, loaded, wall_now=now)
    assert driver.pool.statistics().keys[0].spend == pytest.approx(8.0)
    from keyrotor.core import SpendRecorded

    driver.feed(SpendRecorded(now=driver.now(), key_id="k", cost=8.0))  # 16 in the window
    assert driver.pool.state_of("k") is KeyState.DEPLETED


def test_one_process_per_state_file(tmp_path: Path) -> None:
    with StateStore.open(tmp_path / "s.db", secret_key=None):
        with pytest.raises(StorageError, match="another keyrotor process is using"):
            StateStore.open(tmp_path / "s.db", secret_key=None)
    StateStore.open(tmp_path / "s.db", secret_key=None).close()  # free again once closed


def test_a_lost_secret_key_is_recovered_by_forgetting_the_stored_keys(tmp_path: Path) -> None:
    import subprocess
    import sys

    from cryptography.fernet import Fernet

    path = tmp_path / "s.db"
    with StateStore.open(path, secret_key=Fernet.generate_key().decode()) as store:
        store.add_key("donor", A, {"rpm": 20.0})
        store.record_spend("donor", cost=2.0)
        store.record_state("donor", "depleted", None, "upstream")
    new_key = Fernet.generate_key().decode()
    with pytest.raises(StorageError, match="does not decrypt"):
        StateStore.open(path, secret_key=new_key)
    done = subprocess.run(
        [sys.executable, "-m", "keyrotor.adapters.storage", "forget-keys", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and "deleted 1 stored key(s)" in done.stdout
    with StateStore.open(path, secret_key=new_key) as store:  # the new key works now
        loaded = store.load()
        assert loaded.keys == [] and [r.cost for r in loaded.ledger] == [2.0]
        store.add_key("donor", A, {})  # and the key can be stored again


@pytest.mark.trio
async def test_the_flusher_sleeps_while_nothing_is_pending(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """It wakes for a record (and writes it ``interval`` later), not ten times a
    second for nothing; a record made on another thread, which cannot wake it,
    is written within ``IDLE_LOOK``."""
    with StateStore.open(tmp_path / "s.db", secret_key=None, flush_in_thread=False) as store:
        flushes: list[float] = []
        flush_nowait = store.flush_nowait

        def counted() -> bool | None:
            flushes.append(trio.current_time())
            return flush_nowait()

        store.flush_nowait = counted  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_flush_every, store, 0.1)
            await trio.sleep(30)  # idle: the old flusher would have run 300 times
            assert flushes == []
            start = trio.current_time()
            store.record_spend("env1", cost=1.0)  # on the loop's thread: wakes it at once
            await trio.sleep(0.05)
            assert flushes == [] and store.pending()
            await trio.sleep(0.1)
            assert [round(t - start, 3) for t in flushes] == [0.1]
            assert not store.pending()
            await trio.to_thread.run_sync(store.record_spend, "env1")
            start = trio.current_time()
            await trio.sleep(IDLE_LOOK + 0.2)
            assert not store.pending() and len(flushes) == 2
            assert flushes[1] - start <= IDLE_LOOK + 0.1 + 1e-6
            nursery.cancel_scope.cancel()
        assert [row.requests for row in store.load().ledger] == [2]


def test_a_stored_key_past_the_ring_cap_is_skipped_not_fatal(tmp_path: Path) -> None:
    # Stored (through the admin API) before the ring's points cap held under
    # every policy: the proxy then refused to start, with no API to remove it.
    from cryptography.fernet import Fernet

    secret = Fernet.generate_key().decode()
    with StateStore.open(tmp_path / "s.db", secret_key=secret) as store:
        store.add_key("big", "sk-or-v1-big-" + "x" * 24, {"weight": 10000.0})
    cfg = config({"a": "sk-or-v1-a-" + "x" * 24}, [KeySpec(key_id="a")])
    log: list[dict[str, Any]] = []
    with StateStore.open(tmp_path / "s.db", secret_key=secret) as store:
        started = plan(cfg, store, log.append)
    assert [k.key_id for k in started.pool.keys] == ["a"]
    assert "stored key 'big' skipped" in log[0]["message"]
    assert "sk-or-v1-big" not in str(log)


def test_a_lifetime_budget_used_up_stays_so_after_a_restart_on_a_later_day(
    tmp_path: Path,
) -> None:
    """Only today's spend came back: a key whose lifetime budget (no window) was
    used up yesterday was probed again after a restart, came back and spent on."""
    from keyrotor.core import Tick

    midnight = 1_700_006_400.0  # 2023-11-15 00:00 UTC
    wall = [midnight - 3600.0]  # spent yesterday, 23:00
    with StateStore.open(tmp_path / "s.db", secret_key=None, wall_clock=lambda: wall[0]) as store:
        store.record_spend("k", cost=12.0)
        store.record_state("k", "depleted", None, "budget")
        store.flush()
        wall[0] = now = midnight + 10 * 3600.0  # restarted the next day, 10:00
        loaded = store.load()
    specs = [KeySpec(key_id="k", budget=10.0), KeySpec(key_id="other")]
    driver = Driver({"k": A, "other": B}, PoolConfig(keys=specs), wall_clock=lambda: now)
    restore(driver, loaded, wall_now=now)
    assert driver.pool.statistics().keys[0].spend == pytest.approx(12.0)
    assert driver.pool.state_of("k") is KeyState.DEPLETED
    probed = driver.feed(Tick(now=driver.now() + 7 * DAY))  # far past every recheck
    assert [d for d in probed if getattr(d, "key_id", None) == "k"] == []
    assert driver.pool.state_of("k") is KeyState.DEPLETED


def test_a_restart_does_not_reopen_a_used_up_budget_window(tmp_path: Path) -> None:
    """Today's spend came back as spent at the restart: a 24 h window used up at
    08:00 (depleted until 08:00 the next day) ran again from a 20:00 restart."""
    midnight = 1_700_006_400.0  # 2023-11-15 00:00 UTC
    spent_at, restart = midnight + 8 * 3600.0, midnight + 20 * 3600.0
    wall = [spent_at]
    specs = [KeySpec(key_id="k", budget=10.0, budget_window=DAY), KeySpec(key_id="other")]
    with StateStore.open(tmp_path / "s.db", secret_key=None, wall_clock=lambda: wall[0]) as store:
        first = Driver({"k": A, "other": B}, PoolConfig(keys=specs), wall_clock=lambda: wall[0])
        first.on_state_change.append(
            lambda c: store.record_state(
                c.key_id,
                c.new.value,
                None if c.until is None else spent_at + c.until - c.now,
                c.reason,
            )
        )
        from keyrotor.core import SpendRecorded

        first.feed(SpendRecorded(now=first.now(), key_id="k", cost=12.0))
        store.record_spend("k", cost=12.0)
        store.flush()
        wall[0] = restart
        loaded = store.load()
    assert loaded.states["k"].until == pytest.approx(spent_at + DAY)
    driver = Driver({"k": A, "other": B}, PoolConfig(keys=specs), wall_clock=lambda: restart)
    restore(driver, loaded, wall_now=restart)
    key = driver.pool.statistics().keys[0]
    assert driver.pool.state_of("k") is KeyState.DEPLETED
    assert key.until == pytest.approx(driver.now() + (spent_at + DAY - restart))  # 08:00, not 20:00
