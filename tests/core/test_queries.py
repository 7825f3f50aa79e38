"""The pool's read-only queries: ``Pool.usable_now``, one key's picture, the totals."""

from __future__ import annotations

from keyrotor.core import (
    KeyMarked,
    KeySpec,
    KeyState,
    Pool,
    RequestStarted,
    ResponseFinished,
    ResponseReceived,
    Send,
    Tick,
)

from .helpers import changes, make_pool, only


def _send(pool: Pool, request_id: str, now: float) -> str:
    return str(only(pool.handle(RequestStarted(request_id=request_id, now=now)), Send).key_id)


def test_usable_now_follows_in_flight_limits() -> None:
    pool = make_pool(specs=[KeySpec(key_id="a", max_in_flight=1), KeySpec(key_id="b")])
    assert pool.usable_now()
    pool.handle(KeyMarked(key_id="b", state=KeyState.DISABLED, now=0.0))
    assert pool.usable_now()  # a is free
    assert _send(pool, "r1", 0.0) == "a"
    assert not pool.usable_now()  # a at its limit, b disabled
    assert pool.handle(RequestStarted(request_id="r2", now=0.1)) == []  # queued: agrees
    pool.handle(ResponseReceived(request_id="r1", now=0.2, status=200))
    out = pool.handle(ResponseFinished(request_id="r1", now=0.3))
    assert only(out, Send).request_id == "r2"
    assert not pool.usable_now()  # r2 holds a now
    pool.handle(ResponseReceived(request_id="r2", now=0.4, status=200))
    pool.handle(ResponseFinished(request_id="r2", now=0.5))
    assert pool.usable_now()


def test_usable_now_sees_pacing_and_cooldowns_at_the_pools_time() -> None:
    pool = make_pool(specs=[KeySpec(key_id="a", rpm=60)])
    assert _send(pool, "r1", 0.0) == "a"
    assert not pool.usable_now()  # next slot at 1.0
    pool.handle(Tick(now=0.5))
    assert not pool.usable_now()
    pool.handle(Tick(now=1.0))
    assert pool.usable_now()
    pool.handle(KeyMarked(key_id="a", state=KeyState.RATE_LIMITED, now=1.0, until=5.0))
    assert not pool.usable_now()
    out = pool.handle(Tick(now=5.0))
    assert changes(out) == [("a", "rate_limited", "recovering")]
    # r1, sent before the cooldown, is still in flight: it is no trial, so the
    # recovering key may take one.
    assert pool.statistics().keys[0].in_flight == 1
    assert pool.usable_now()


def test_usable_now_a_recovering_key_takes_one_trial() -> None:
    pool = make_pool("a")
    pool.handle(KeyMarked(key_id="a", state=KeyState.DEGRADED, now=0.0, until=5.0))
    assert not pool.usable_now()
    out = pool.handle(Tick(now=5.0))
    assert changes(out) == [("a", "degraded", "recovering")]
    assert pool.usable_now()
    assert _send(pool, "trial", 5.0) == "a"
    assert not pool.usable_now()  # one trial at a time


def test_usable_now_is_read_only() -> None:
    pool = make_pool(specs=[KeySpec(key_id="a", rpm=60), KeySpec(key_id="b", max_in_flight=1)])
    _send(pool, "r1", 0.0)
    _send(pool, "r2", 0.0)
    pool.handle(RequestStarted(request_id="r3", now=0.0))
    before = (pool.snapshot(), pool.next_deadline(), pool.now, pool.statistics())
    for _ in range(3):
        assert not pool.usable_now()
    assert (pool.snapshot(), pool.next_deadline(), pool.now, pool.statistics()) == before
    # No timer fires: the pool stays at its time until an event moves it.
    assert not pool.usable_now() and pool.now == 0.0


def test_a_keys_picture_copies_every_field_to_its_own_name() -> None:
    # ``from_record`` sets the slots in field order: a field added or moved
    # out of order would put a value under another name.
    from keyrotor.core import KeyStatistics
    from keyrotor.core._records import ERROR_CLASSES, KeyRecord

    key = KeyRecord(KeySpec(key_id="a", account="acct"), serial=1)
    key.state, key.until, key.reason = KeyState.RATE_LIMITED, 12.5, "http_429"
    key.in_flight, key.requests, key.successes = 2, 30, 17
    key.errors = list(range(100, 100 + len(ERROR_CLASSES)))
    key.spend, key.prompt_tokens, key.completion_tokens = 0.25, 400, 500
    key.ewma, key.probing, key.removed = 0.75, True, True
    picture = KeyStatistics.from_record(key)
    assert picture == KeyStatistics(
        key_id="a",
        account="acct",
        state=KeyState.RATE_LIMITED,
        until=12.5,
        reason="http_429",
        in_flight=2,
        requests=30,
        successes=17,
        errors=dict(zip(ERROR_CLASSES, range(100, 100 + len(ERROR_CLASSES)), strict=True)),
        spend=0.25,
        prompt_tokens=400,
        completion_tokens=500,
        latency=0.75,
        probing=True,
        removing=True,
    )
    key.errors[0] += 1  # a copy: the record goes on counting
    assert picture.errors[ERROR_CLASSES[0]] == 100


def test_one_keys_picture_and_the_totals_match_the_whole() -> None:
    pool = make_pool(specs=[KeySpec(key_id="a"), KeySpec(key_id="b")])
    rid = "r1"
    key = _send(pool, rid, 0.0)
    pool.handle(ResponseReceived(request_id=rid, now=0.1, status=200))
    pool.handle(ResponseFinished(request_id=rid, now=0.2, cost=0.5))
    whole = pool.statistics()
    assert pool.key_statistics(key) == next(k for k in whole.keys if k.key_id == key)
    assert pool.key_statistics("zz") is None and pool.key_spec("zz") is None
    assert pool.statistics(keys=False).keys == () and whole.spend == 0.5
    assert pool.count_usable() == 2
