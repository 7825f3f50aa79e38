"""The operator's views with big pools: one ``status`` frame per period shared
by every event stream, alerts read from the pools (never from ``/status``),
analytics that build the account map only for ``by=account``."""

from __future__ import annotations

import json
import threading
import types
from typing import Any

import anyio
import pytest
import trio
import trio.testing

from keyrotor.adapters import analytics
from keyrotor.adapters.alerts import Rule
from keyrotor.adapters.proxy.auth import Auth
from keyrotor.adapters.proxy.spend import SpendBook
from keyrotor.adapters.proxy.types import Request
from keyrotor.adapters.proxy.views import _SLICE, STATUS_SHARE, Views, _frame, _frame_of
from keyrotor.core import KeySpec, KeyState, PoolConfig
from keyrotor.transports._driver import Driver


def secrets(*aliases: str) -> dict[str, str]:
    return {alias: f"test-secret-{alias}-not-a-key" for alias in aliases}


def pictured(keys: int) -> dict[str, Any]:
    """A /status-shaped document with ``keys`` keys (more than one slice)."""
    rows = [
        {"alias": f"k{i}", "state": "healthy", "spend": i / 7, "errors": {}} for i in range(keys)
    ]
    providers = {"groq": {"health": {"healthy": 1}, "keys": rows[: _SLICE + 3]}}
    return {"totalKeys": keys, "health": {"healthy": keys}, "keys": rows, "providers": providers}


def test_every_stream_gets_the_same_status_frame_built_once_a_period() -> None:
    # Each open stream built its own /status every second: at 10,000 keys a
    # 5.8 MB picture per tab per second, on the event loop.
    pictures: list[dict[str, Any]] = []

    def status() -> dict[str, Any]:
        pictures.append({**pictured(_SLICE * 2 + 1), "n": len(pictures)})
        return pictures[-1]

    views = Views(types.SimpleNamespace(status=status), Auth(), SpendBook())  # type: ignore[arg-type]
    change = {"key": "k1", "state": "failed"}

    async def main() -> list[tuple[bytes, ...]]:
        tabs = [views._events() for _ in range(3)]
        bodies = [tab.body for tab in tabs]
        seen = []
        for _ in range(2):  # at once, then one period later
            frames = tuple([await body.__anext__() for body in bodies])  # type: ignore[union-attr]
            seen.append(frames)
        views.hub.publish("key", change)
        seen.append(tuple([await body.__anext__() for body in bodies]))  # type: ignore[union-attr]
        for tab, body in zip(tabs, bodies, strict=True):
            await body.aclose()  # type: ignore[union-attr]
            assert tab.aclose is not None
            await tab.aclose()
        return seen

    first, second, key = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(pictures) == 2  # one picture a period, whatever the number of streams
    assert set(first) == {_frame("status", pictures[0])}
    assert set(second) == {_frame("status", pictures[1])}
    assert set(key) == {_frame("key", change)}


def test_a_costly_snapshot_spaces_the_status_frames() -> None:
    # A 10,000-key snapshot took most of each second on the event loop.
    clock = trio.testing.MockClock(autojump_threshold=0)
    taken: list[float] = []

    def status() -> dict[str, Any]:
        taken.append(trio.current_time())
        clock.jump(0.5 if len(taken) < 3 else 0.01)  # a big pool's snapshot, then a small one's
        return {"n": len(taken)}

    views = Views(types.SimpleNamespace(status=status), Auth(), SpendBook())  # type: ignore[arg-type]

    async def main() -> list[bytes]:
        tab = views._events()
        body = tab.body
        frames = [await body.__anext__() for _ in range(4)]  # type: ignore[union-attr]
        await body.aclose()  # type: ignore[union-attr]
        assert tab.aclose is not None
        await tab.aclose()
        return frames

    frames = trio.run(main, clock=clock)
    assert frames == [_frame("status", {"n": n}) for n in (1, 2, 3, 4)]
    space = 0.5 / STATUS_SHARE  # 5 s: a tenth of the loop's time at most
    assert [round(t - taken[0], 6) for t in taken] == [0.0, space, 2 * space, 2 * space + 1.0]


def test_the_sliced_status_frame_is_the_frame_of_one_json_dumps() -> None:
    data = pictured(_SLICE * 3 + 7)
    data["odd"] = {1: "int key", "t": (1, 2), "u": "é\u2028", "none": None, "obj": Rule("r", "x")}
    data["short"] = list(range(_SLICE))
    assert _frame_of("status", data) == _frame("status", data)
    data["keys"][_SLICE + 1]["spend"] = float("nan")
    with pytest.raises(ValueError):  # as before: a stream never sends NaN
        _frame_of("status", data)


def test_alerts_fire_and_clear_from_the_pools_without_a_picture_of_every_key() -> None:
    # observe() built the whole /status (every key turned to JSON) at each look:
    # one usable_keys rule stalled a 10,000-key proxy every 10 s.
    main = Driver(secrets("k1", "k2", "k3"), clock=lambda: 100.0)
    groq = Driver(secrets("g1", "g2"), clock=lambda: 100.0)

    def status() -> dict[str, Any]:
        raise AssertionError("the alerts looked at /status")

    rules = [
        Rule("thin", "usable_keys", 2.0, "total"),
        Rule("dead", "key_failed", 0.0, "key"),
        Rule("errors", "error_share", 0.5, "key", window=300.0, min_requests=3),
    ]
    views = Views(
        types.SimpleNamespace(driver=main, status=status),  # type: ignore[arg-type]
        Auth(),
        SpendBook(),
        rules=rules,
        clock=lambda: 1_000.0,
        providers={"groq": types.SimpleNamespace(driver=groq)},  # type: ignore[dict-item]
    )
    assert views.look() == []
    main.mark_key("k2", KeyState.DISABLED)
    main.mark_key("k3", KeyState.DISABLED)
    groq.mark_key("g1", KeyState.FAILED)
    for _ in range(3):
        views.note_answer("g2", "m", 500)  # a provider's key: still in a pool
    fired = {(a.rule, a.subject): a for a in views.look()}
    assert set(fired) == {("thin", ""), ("dead", "g1"), ("errors", "g2")}
    assert fired["thin", ""].text == "thin: 1 usable keys, under 2"
    assert views.look() == []  # once
    main.mark_key("k2", KeyState.HEALTHY)
    groq.mark_key("g1", KeyState.HEALTHY)
    groq.remove_key("g2")
    cleared = {(a.rule, a.subject): a.text for a in views.look()}
    assert cleared == {
        ("thin", ""): "thin: 2 usable keys, back to 2 or more",
        ("dead", "g1"): "dead: key g1 is back",
        ("errors", "g2"): "errors: key g2 is no longer in the pool",
    }


class Store:
    """A state file's analytics: the rows name each key's account as told."""

    def __init__(self) -> None:
        self.threads: list[bool] = []

    def analytics(self, q: analytics.Query, account_of: Any) -> list[dict[str, Any]]:
        self.threads.append(threading.current_thread() is threading.main_thread())
        return [{"start": q.start, "name": account_of(key), "requests": 1} for key in ("a1", "b1")]


def test_analytics_build_the_account_map_only_by_account_and_answer_off_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every query built pool.statistics() for every key (25 % of a by=key query
    # at 10,000 keys) and encoded its answer on the event loop.
    pool = PoolConfig(keys=[KeySpec(key_id="a1", account="acme"), KeySpec(key_id="b1")])
    driver = Driver(secrets("a1", "b1"), pool, clock=lambda: 100.0)
    asked: list[int] = []
    specs = driver.pool.key_specs

    def key_specs() -> dict[str, KeySpec]:
        asked.append(1)
        return specs()

    monkeypatch.setattr(driver.pool, "key_specs", key_specs)

    def no_statistics() -> None:
        raise AssertionError("a picture of every key")

    monkeypatch.setattr(driver.pool, "statistics", no_statistics)
    encoded: list[bool] = []
    answer = analytics.answer

    def answer_here(q: analytics.Query, rows: list[dict[str, Any]]) -> dict[str, Any]:
        encoded.append(threading.current_thread() is threading.main_thread())
        return answer(q, rows)

    monkeypatch.setattr(analytics, "answer", answer_here)
    store = Store()
    views = Views(
        types.SimpleNamespace(driver=driver, status=dict),  # type: ignore[arg-type]
        Auth(),
        SpendBook(),
        store=store,  # type: ignore[arg-type]
        clock=lambda: 1_764_892_800.0,
    )

    def ask(query: str) -> dict[str, Any]:
        request = Request(method="GET", target=f"/analytics/usage?{query}", headers=[], body=b"")
        response = anyio.run(views, request, "/analytics/usage")
        assert response.status == 200, response.body
        return json.loads(response.body)  # type: ignore[arg-type]

    assert [row["name"] for row in ask("by=key")["rows"]] == ["a1", "b1"]
    assert asked == []  # no account map for by=key
    assert [row["name"] for row in ask("by=account")["rows"]] == ["acme", "b1"]
    assert asked == [1]
    assert store.threads == [False, False] and encoded == [False, False]  # in the worker thread
