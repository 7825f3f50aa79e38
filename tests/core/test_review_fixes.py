"""Bugs a review of the core reproduced (scripts in the review's scratch notes),
each pinned by a test that failed before its fix: removed keys' late spend,
lifetime budgets and probes, hard floors of cooldowns, the pool-short scan,
a hanging key's evidence, tpm admission, "try another key", mid-stream 401s,
and the validation of event and configuration numbers."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyrotor.core import (
    AttemptHeld,
    KeyAdded,
    KeyMarked,
    KeyRemoved,
    KeySpec,
    KeyState,
    Pool,
    PoolConfig,
    PoolError,
    Probe,
    ProbeFinished,
    ProbeRequested,
    RequestStarted,
    ResponseFinished,
    ResponseReceived,
    Send,
    Tick,
    TransportFailed,
)

from .helpers import Deliver, Reject, changes, make_pool, only, probes, sends

GET_KEY_OK = {"data": {"limit": None, "limit_remaining": None}}


def _send(pool: Pool, rid: str, now: float, **fields: object) -> Send:
    return only(pool.handle(RequestStarted(request_id=rid, now=now, **fields)), Send)


def _finish(pool: Pool, rid: str, now: float, **fields: object) -> None:
    pool.handle(ResponseReceived(request_id=rid, now=now, status=200))
    pool.handle(ResponseFinished(request_id=rid, now=now, **fields))  # type: ignore[arg-type]


# ---------------------------------------------- 1. weighted by credits, removed keys


def _credits_pool(*credits: float) -> Pool:
    keys = [KeySpec(key_id=f"k{i}", credits=c) for i, c in enumerate(credits)]
    return Pool(PoolConfig(keys=keys, policy="weighted", weight_by="credits"))


def test_a_removed_keys_late_spend_does_not_come_off_the_total_weight() -> None:
    """Removing a key takes its weight off the total once; the cost its draining
    request reports must not take it off again (the total reached 0 and the
    next pick divided by it)."""
    pool = _credits_pool(10.0, 10.0, 5.0)
    _send(pool, "ra", 0.0, pin="k0")
    _send(pool, "rb", 0.0, pin="k1")
    pool.handle(KeyRemoved(now=1.0, key_id="k0"))
    pool.handle(KeyRemoved(now=1.0, key_id="k1"))
    _finish(pool, "ra", 2.0, cost=5.0)
    assert _send(pool, "r1", 3.0).key_id == "k2"


def test_a_key_added_after_a_removed_keys_late_spend_gets_its_share() -> None:
    pool = _credits_pool(10.0, 10.0)
    _send(pool, "ra", 0.0, pin="k0")
    pool.handle(KeyRemoved(now=1.0, key_id="k0"))
    _finish(pool, "ra", 2.0, cost=10.0)
    for i in range(3):
        _send(pool, f"x{i}", 2.5)
        _finish(pool, f"x{i}", 2.5)
    pool.handle(KeyAdded(now=3.0, key=KeySpec(key_id="c", credits=10.0)))
    picks = [_send(pool, f"r{i}", 3.0).key_id for i in range(100)]
    assert picks.count("c") == 50  # equal credits, equal shares


@settings(max_examples=60, deadline=None)
@given(
    credits=st.lists(st.floats(min_value=1.0, max_value=100.0), min_size=2, max_size=5),
    removed=st.sets(st.integers(min_value=0, max_value=4)),
    costs=st.lists(st.floats(min_value=0.0, max_value=200.0), min_size=5, max_size=5),
)
def test_late_spend_of_removed_keys_keeps_the_pool_restorable(
    credits: list[float], removed: set[int], costs: list[float]
) -> None:
    """A restored pool recomputes the total weight from its live keys: after
    removed keys' requests report their cost, the original must still pick
    exactly like its restored copy (and never raise)."""
    pool = _credits_pool(*credits)
    n = len(credits)
    for i in range(n):
        _send(pool, f"r{i}", 0.0, pin=f"k{i}")
    gone = sorted(i for i in removed if i < n)
    for i in gone:
        pool.handle(KeyRemoved(now=1.0, key_id=f"k{i}"))
    for i in range(n):
        _finish(pool, f"r{i}", 2.0, cost=costs[i])
    copy = Pool.restore(pool.snapshot())
    if len(gone) == n:
        return  # no key left to pick
    for j in range(20):
        event = RequestStarted(request_id=f"x{j}", now=3.0)
        assert pool.handle(event) == copy.handle(event)


# ------------------------------------------------ 2. lifetime budgets and probes


def _spent_budget_pool(**options: object) -> Pool:
    pool = make_pool(specs=[KeySpec(key_id="a", budget=1.0)], **options)
    for rid, now in (("r1", 0.0), ("r2", 1.0)):
        _send(pool, rid, now)
        _finish(pool, rid, now + 0.5, cost=0.6)
    assert pool.state_of("a") is KeyState.DEPLETED
    return pool


def test_a_spent_lifetime_budget_is_not_probed_nor_ended_by_a_probe() -> None:
    """``GET /key`` knows nothing of the pool's own budget: its 200 must not
    let the key spend again (it did: the key served a third request)."""
    pool = _spent_budget_pool()
    assert pool.next_deadline() is None  # no pool-short probe, no recheck
    out = pool.handle(ProbeRequested(now=2.0, key_id="a"))  # an operator asks anyway
    assert probes(out) == ["a"]
    out = pool.handle(ProbeFinished(key_id="a", now=3.0, status=200, body=GET_KEY_OK))
    assert changes(out) == []
    assert pool.state_of("a") is KeyState.DEPLETED
    out = pool.handle(Tick(now=10_000.0))
    assert out == []
    out = pool.handle(RequestStarted(request_id="r3", now=10_001.0))
    assert only(out, Reject).status == 503  # at once: no key will come back by itself


def test_a_late_rate_limit_gives_a_spent_budget_no_end() -> None:
    """A 429 (or an empty bucket) answering a request sent before the budget
    ran out must not give the depletion an ``until`` that ends it."""
    pool = make_pool(specs=[KeySpec(key_id="a", budget=1.0), KeySpec(key_id="b")])
    _send(pool, "late", 0.0, pin="a", pin_fallback=False)
    _send(pool, "r1", 0.0, pin="a")
    _finish(pool, "r1", 1.0, cost=1.5)
    assert pool.state_of("a") is KeyState.DEPLETED
    pool.handle(ResponseReceived(request_id="late", now=2.0, status=429, retry_after=5.0))
    pool.handle(Tick(now=100.0))
    assert pool.state_of("a") is KeyState.DEPLETED
    assert pool.statistics().keys[0].until is None


def test_a_marked_healthy_key_past_its_budget_is_depleted_by_its_next_spend() -> None:
    """An operator may still bring the key back (a budget raised elsewhere)."""
    pool = _spent_budget_pool()
    out = pool.handle(KeyMarked(now=2.0, key_id="a", state=KeyState.HEALTHY))
    assert changes(out) == [("a", "depleted", "healthy")]
    _send(pool, "r3", 3.0)
    _finish(pool, "r3", 3.5, cost=0.1)
    assert pool.state_of("a") is KeyState.DEPLETED


# ---------------------------------------------------- 3. hard floors of cooldowns


def test_a_shorter_retry_after_inside_a_default_guess_stays_a_hard_floor() -> None:
    pool = make_pool("a")
    _send(pool, "r1", 0.0)
    _send(pool, "r2", 0.0)
    out = pool.handle(ResponseReceived(request_id="r1", now=1.0, status=429))  # guess: 900 s
    assert probes(out) == ["a"]  # the pool is short: probe the guess at once
    pool.handle(ResponseReceived(request_id="r2", now=1.1, status=429, retry_after=120.0))
    # The probe that was already out answers before the upstream's time.
    out = pool.handle(ProbeFinished(key_id="a", now=2.0, status=200, body=GET_KEY_OK))
    assert pool.state_of("a") is KeyState.RATE_LIMITED
    assert pool.next_deadline() == pytest.approx(121.1)  # the next probe: at the floor
    out = pool.handle(Tick(now=121.1))
    assert probes(out) == ["a"]
    out = pool.handle(ProbeFinished(key_id="a", now=121.5, status=200, body=GET_KEY_OK))
    assert changes(out) == [("a", "rate_limited", "recovering")]


def test_a_later_default_guess_does_not_make_a_hard_cooldown_longer_for_good() -> None:
    """Retry-After 100 s, then a hint-less 429 (the 900 s guess) from a request
    sent earlier: the guess extends the cooldown, but past the upstream's 100 s
    a probe may end it (it used to inherit the hardness: 15 min with no probe)."""
    pool = make_pool("a")
    _send(pool, "r1", 0.0, max_attempts=1)
    _send(pool, "r2", 0.0, max_attempts=1)
    out = pool.handle(ResponseReceived(request_id="r1", now=1.0, status=429, retry_after=100.0))
    assert probes(out) == []  # the upstream's own time: no probe before it
    pool.handle(ResponseReceived(request_id="r2", now=2.0, status=429))
    assert pool.statistics().keys[0].until == pytest.approx(902.0)
    assert pool.next_deadline() == pytest.approx(101.0)
    out = pool.handle(Tick(now=101.0))
    assert probes(out) == ["a"]
    out = pool.handle(ProbeFinished(key_id="a", now=101.5, status=200, body=GET_KEY_OK))
    assert changes(out) == [("a", "rate_limited", "recovering")]


def test_an_operator_until_replaces_the_floor() -> None:
    pool = make_pool("a")
    _send(pool, "r1", 0.0, max_attempts=1)
    pool.handle(ResponseReceived(request_id="r1", now=1.0, status=429, retry_after=500.0))
    pool.handle(KeyMarked(now=2.0, key_id="a", state=KeyState.RATE_LIMITED, until=50.0))
    out = pool.handle(Tick(now=50.0))
    assert changes(out) == [("a", "rate_limited", "recovering")]


# (when, retry_after or None for a hint-less 429)
_ANSWERS_429 = st.lists(
    st.tuples(
        st.floats(min_value=0.1, max_value=200.0),
        st.none() | st.floats(min_value=0.0, max_value=600.0),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(answers=_ANSWERS_429, probe_delay=st.floats(min_value=0.0, max_value=50.0))
def test_no_probe_ends_a_cooldown_before_the_latest_retry_after(
    answers: list[tuple[float, float | None]], probe_delay: float
) -> None:
    """Whatever mix of hinted and hint-less 429s a key gets, and however fast
    its probes answer 200, it takes traffic again only after every Retry-After
    it was given (the floor), and a hint-less guess never keeps it out past
    the floor while the pool is short (a probe comes)."""
    pool = make_pool("a", rate_limit_cooldown=900.0, probe_interval=30.0)
    for i in range(len(answers)):
        _send(pool, f"r{i}", 0.0, max_attempts=1)
    now = 0.0
    floor = -math.inf
    pending: list[float] = []  # probe answers due

    def feed(out: list[object]) -> None:
        nonlocal floor
        for d in out:
            if isinstance(d, Probe):
                pending.append(pool.now + probe_delay)
        state = pool.state_of("a")
        if state in (KeyState.HEALTHY, KeyState.RECOVERING):
            assert pool.now >= floor

    for i, (gap, retry_after) in enumerate(answers):
        now += gap
        while pending and min(pending) <= now:
            when = min(pending)
            pending.remove(when)
            feed(pool.handle(ProbeFinished(key_id="a", now=when, status=200, body=GET_KEY_OK)))
        out = pool.handle(
            ResponseReceived(request_id=f"r{i}", now=now, status=429, retry_after=retry_after)
        )
        if retry_after is not None:
            floor = max(floor, now + retry_after)
        feed(out)
    # Then let time run: probes answer 200 until the key is back.
    for _ in range(200):
        if pool.state_of("a") is not KeyState.RATE_LIMITED:
            break
        deadline = pool.next_deadline()
        when = min([*pending, *([deadline] if deadline is not None else [])])
        if pending and when == min(pending):
            pending.remove(when)
            feed(pool.handle(ProbeFinished(key_id="a", now=when, status=200, body=GET_KEY_OK)))
        else:
            feed(pool.handle(Tick(now=when)))
    assert pool.state_of("a") is not KeyState.RATE_LIMITED
    # Back within a probe interval of the floor or the last 429 (never the whole guess).
    assert pool.now <= max(floor, now) + 30.0 + probe_delay + 1e-6


# --------------------------------------------------------- 4. the pool-short scan


def test_a_2xx_with_an_empty_bucket_that_leaves_the_pool_short_probes_at_once() -> None:
    pool = make_pool("a", "b")
    _send(pool, "r1", 0.0)
    out = pool.handle(ResponseReceived(request_id="r1", now=1.0, status=429))  # a: a guess
    assert only(out, Send).key_id == "b"
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "10m0s"}
    out = pool.handle(ResponseReceived(request_id="r1", now=3.0, status=200, headers=headers))
    assert ("b", "healthy", "rate_limited") in changes(out)
    assert probes(out) == ["a"]  # b's 10 minutes are the upstream's; a's 15 a guess


def test_a_probe_answer_with_an_empty_bucket_that_leaves_the_pool_short_probes_at_once() -> None:
    pool = make_pool("a", "b")
    _send(pool, "r1", 0.0)
    pool.handle(ResponseReceived(request_id="r1", now=1.0, status=429))  # a: a guess
    pool.handle(ProbeRequested(now=2.0, key_id="b"))
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "10m0s"}
    out = pool.handle(ProbeFinished(key_id="b", now=3.0, status=200, headers=headers))
    assert ("b", "healthy", "rate_limited") in changes(out)
    assert probes(out) == ["a"]


@pytest.mark.parametrize("reason", ["connect", "timeout", "reset"])
def test_a_key_degraded_by_transport_failures_gets_the_pool_short_probe(reason: str) -> None:
    pool = make_pool("a", "b", "c", min_healthy=3, error_min_requests=2, timeout_strikes=0)
    t = 0.0
    for i in range(3):
        for j, k in enumerate(("b", "c")):
            _send(pool, f"{k}{i}", t + j * 0.05, pin=k)
            _finish(pool, f"{k}{i}", t + j * 0.05 + 0.01)
        _send(pool, f"a{i}", t + 0.2, pin="a", pin_fallback=False, max_attempts=1)
        out = pool.handle(TransportFailed(request_id=f"a{i}", now=t + 0.3, reason=reason))
        if changes(out):
            assert changes(out) == [("a", "healthy", "degraded")]
            assert probes(out) == ["a"]
            return
        t += 0.5
    raise AssertionError("the key was never degraded")


# ------------------------------------------------------ 5. a hanging key's evidence


def test_a_single_key_is_not_degraded_by_its_own_answer_between_timeouts() -> None:
    pool = make_pool("only")
    for rid in ("r1", "r2", "r3"):
        _send(pool, rid, 0.0)
    _finish(pool, "r3", 50.0)  # the key itself answers: no evidence against it
    pool.handle(TransportFailed(request_id="r1", now=120.0, reason="timeout"))
    pool.handle(TransportFailed(request_id="r2", now=120.5, reason="timeout"))
    assert pool.state_of("only") is KeyState.HEALTHY


def test_another_keys_answer_before_the_first_timeout_was_sent_is_no_evidence() -> None:
    """b answered (t=1) before a's first timed-out attempt was sent (t=2); a's own
    answer later (t=50) must not stand in for b's."""
    pool = make_pool("a", "b", queue_timeout=600.0)
    _send(pool, "rb", 0.0, pin="b")
    _finish(pool, "rb", 1.0)
    for rid in ("x1", "x2", "x3"):
        _send(pool, rid, 2.0, pin="a", pin_fallback=False)
    _finish(pool, "x3", 50.0)
    pool.handle(TransportFailed(request_id="x1", now=120.0, reason="timeout"))
    pool.handle(TransportFailed(request_id="x2", now=120.5, reason="timeout"))
    assert pool.state_of("a") is KeyState.HEALTHY


def test_another_keys_answer_after_the_keys_own_still_counts() -> None:
    pool = make_pool("a", "b", queue_timeout=600.0)
    _send(pool, "x1", 0.0, pin="a", pin_fallback=False, max_attempts=1)
    _send(pool, "x2", 0.0, pin="a", pin_fallback=False, max_attempts=1)
    _send(pool, "x3", 0.0, pin="a", pin_fallback=False)
    _send(pool, "rb", 0.0, pin="b")
    _finish(pool, "rb", 1.0)  # b answers
    _finish(pool, "x3", 2.0)  # then a itself
    pool.handle(TransportFailed(request_id="x1", now=120.0, reason="timeout"))
    out = pool.handle(TransportFailed(request_id="x2", now=120.5, reason="timeout"))
    assert ("a", "healthy", "degraded") in changes(out)


def test_the_evidence_survives_a_snapshot() -> None:
    pool = make_pool("only")
    for rid in ("r1", "r2", "r3"):
        _send(pool, rid, 0.0)
    _finish(pool, "r3", 50.0)
    pool = Pool.restore(pool.snapshot())
    pool.handle(TransportFailed(request_id="r1", now=120.0, reason="timeout"))
    pool.handle(TransportFailed(request_id="r2", now=120.5, reason="timeout"))
    assert pool.state_of("only") is KeyState.HEALTHY


# ----------------------------------------------------------- 8. a mid-stream 401


def test_a_mid_stream_401_is_confirmed_by_a_probe() -> None:
    body = {"error": {"code": 401, "message": "User not found."}}
    pool = make_pool("a", "b", recheck_interval=None)
    _send(pool, "r1", 0.0)
    pool.handle(ResponseReceived(request_id="r1", now=1.0, status=200))
    out = pool.handle(ResponseFinished(request_id="r1", now=2.0, error_status=401, error_body=body))
    assert changes(out) == [("a", "healthy", "failed")]
    assert probes(out) == ["a"]
    out = pool.handle(ProbeFinished(key_id="a", now=2.5, status=200, body=GET_KEY_OK))
    assert changes(out) == [("a", "failed", "recovering")]


def test_a_probes_own_401_is_not_confirmed_by_another_probe() -> None:
    pool = make_pool("a", "b")
    pool.handle(ProbeRequested(now=0.0, key_id="a"))
    out = pool.handle(ProbeFinished(key_id="a", now=0.5, status=401))
    assert changes(out) == [("a", "healthy", "failed")]
    assert probes(out) == []


# ------------------------------------------------- 9. numbers in events and configs


@pytest.mark.parametrize("retry_after", [math.nan, math.inf, -math.inf, -5.0, "30", True])
def test_an_invalid_retry_after_is_refused_and_changes_nothing(retry_after: object) -> None:
    pool = make_pool("a", "b")
    _send(pool, "r1", 0.0)
    before = pool.snapshot()
    event = ResponseReceived(request_id="r1", now=1.0, status=429, retry_after=retry_after)  # type: ignore[arg-type]
    with pytest.raises(PoolError, match="retry_after"):
        pool.handle(event)
    assert pool.snapshot() == before


@settings(max_examples=50, deadline=None)
@given(
    retry_after=st.floats(min_value=0.0, allow_infinity=False, allow_nan=False)
    | st.integers(min_value=0, max_value=10**6)
)
def test_a_finite_retry_after_cools_the_key_until_a_finite_later_time(
    retry_after: float,
) -> None:
    pool = make_pool("a", "b")
    _send(pool, "r1", 0.0)
    pool.handle(ResponseReceived(request_id="r1", now=1.0, status=429, retry_after=retry_after))
    until = pool.statistics().keys[0].until
    assert until is not None and math.isfinite(until) and until >= 1.0


@pytest.mark.parametrize(
    "build",
    [
        lambda: KeySpec(key_id="a", weight=10**400),
        lambda: KeySpec(key_id="a", budget=-(10**400)),
        lambda: KeySpec(key_id="a", credits=10**400),
        lambda: PoolConfig(keys=[], queue_timeout=10**400),
        lambda: PoolConfig(keys=[], error_threshold=10**400),
    ],
)
def test_an_int_too_large_for_a_float_is_a_clear_configuration_error(build: object) -> None:
    with pytest.raises(PoolError, match="finite number"):
        build()  # type: ignore[operator]


# --------------------------------------------------------------- 6. tpm admission


def test_a_large_tpm_request_does_not_hold_the_key_back_from_small_ones() -> None:
    """A key with room for a small request serves it while a large one waits
    elsewhere (an admission that counted the large request's own tokens dropped
    the key from selection until the large one would fit: small ones starved)."""
    pool = make_pool(
        specs=[KeySpec(key_id="a", tpm=6000), KeySpec(key_id="c", max_in_flight=1)],
        queue_timeout=30.0,
    )
    first = _send(pool, "r0", 0.0, pin="a", pin_fallback=False, tokens=5000)
    assert first.key_id == "a"
    big = pool.handle(RequestStarted(request_id="r1", now=1.0, tokens=2000))
    small = pool.handle(RequestStarted(request_id="r2", now=2.0, tokens=100))
    assert len(sends(big)) == 1 and len(sends(small)) == 1
    assert {s.key_id for s in sends(big) + sends(small)} <= {"a", "c"}


# ---------------------------------------------------------- 7. try another key


CAN_ONLY_AFFORD = {
    "error": {
        "code": 402,
        "message": "This request requires more credits, or fewer max_tokens. "
        "You requested up to 16384 tokens, but can only afford 2000.",
    }
}


def test_can_only_afford_is_delivered_once_every_key_said_it() -> None:
    pool = make_pool("a", "b")
    _send(pool, "r1", 0.0)
    out = pool.handle(ResponseReceived(request_id="r1", now=1.0, status=402, body=CAN_ONLY_AFFORD))
    assert only(out, Send).key_id == "b"
    out = pool.handle(ResponseReceived(request_id="r1", now=2.0, status=402, body=CAN_ONLY_AFFORD))
    deliver = only(out, Deliver)
    assert (deliver.key_id, deliver.attempt, deliver.status) == ("b", 2, 402)
    assert sends(out) == []
    pool.handle(ResponseFinished(request_id="r1", now=2.5))
    assert [k.in_flight for k in pool.statistics().keys] == [0, 0]


def test_can_only_afford_on_a_single_key_is_delivered_at_once() -> None:
    pool = make_pool("solo")
    _send(pool, "r1", 0.0)
    out = pool.handle(ResponseReceived(request_id="r1", now=1.0, status=402, body=CAN_ONLY_AFFORD))
    assert only(out, Deliver).status == 402
    assert sends(out) == []


def test_can_only_afford_on_a_pin_without_fallback_is_delivered_at_once() -> None:
    pool = make_pool("a", "b")
    _send(pool, "r1", 0.0, pin="b", pin_fallback=False)
    out = pool.handle(ResponseReceived(request_id="r1", now=1.0, status=402, body=CAN_ONLY_AFFORD))
    assert only(out, Deliver).key_id == "b"


def test_other_failovers_may_still_come_back_to_a_tried_key() -> None:
    """A 5xx may be gone on a second try: only "try another key" is final per key."""
    pool = make_pool("solo")
    _send(pool, "r1", 0.0)
    out = pool.handle(ResponseReceived(request_id="r1", now=1.0, status=502))
    assert only(out, Send).key_id == "solo"


# ---------------------------------------------- a pinned request waiting for its key's pace


@pytest.mark.parametrize("held", [False, True])
def test_a_request_pinned_to_a_paced_key_is_sent_when_the_pace_allows(held: bool) -> None:
    """Pinned without fallback to a key its rpm (or a shared gate's hold) keeps
    busy: the request waits in the queue, and the key's pace timer must wake it
    (nothing armed one: it waited until its deadline and was rejected)."""
    pool = Pool(PoolConfig(keys=[KeySpec(key_id="a", rpm=60), KeySpec(key_id="b")]))
    first = _send(pool, "r1", 0.0, pin="a", pin_fallback=False)
    assert first.key_id == "a"
    if held:  # a gate held the attempt for 2 s: the key waits, so does the request
        out = pool.handle(AttemptHeld(request_id="r1", now=0.01, until=2.0))
        assert not sends(out)
    else:
        _finish(pool, "r1", 0.01)
    assert not sends(pool.handle(RequestStarted(
        request_id="r2", now=0.1, pin="a", pin_fallback=False, deadline=30.0
    )))  # fmt: skip
    waiting = {"r1", "r2"} if held else {"r2"}
    sent: list[Send] = []
    while len(sent) < len(waiting):  # the key's pace wakes each waiting request in turn
        deadline = pool.next_deadline()
        assert deadline is not None and deadline < 30.0  # before r2's deadline
        sent += sends(pool.handle(Tick(now=deadline)))
    assert {(s.request_id, s.key_id) for s in sent} == {(r, "a") for r in waiting}


def test_a_key_added_at_runtime_cannot_build_a_huge_affinity_ring() -> None:
    """The configuration caps points per key on the affinity ring; a key added
    later with a huge weight built 10^9 points (the process hung)."""
    pool = Pool(PoolConfig(keys=[KeySpec(key_id="a")], policy="affinity"))
    huge = KeySpec(key_id="b", weight=1e5)  # 1.6 million points
    with pytest.raises(PoolError, match="points on the affinity ring"):
        pool.handle(KeyAdded(now=1.0, key=huge))
    assert pool.key_ids() == ["a"]  # nothing changed
    pool.handle(KeyAdded(now=1.0, key=KeySpec(key_id="b", weight=3)))
    assert pool.key_ids() == ["a", "b"]


def test_a_spent_lifetime_budget_holds_after_a_late_401_and_a_probe() -> None:
    """A 401 on a request sent before the budget ran out moved the key from
    depleted to failed; the confirming probe's 200 then made it serve again."""
    pool = Pool(PoolConfig(keys=[KeySpec(key_id="a", budget=1.0), KeySpec(key_id="b")]))
    _send(pool, "r1", 0.0, pin="a")
    _send(pool, "r2", 0.0, pin="a")
    _finish(pool, "r1", 1.0, cost=1.5)
    assert pool.state_of("a") is KeyState.DEPLETED
    out = pool.handle(
        ResponseReceived(request_id="r2", now=2.0, status=401, body={"error": {"message": "x"}})
    )
    for key_id in probes(out):
        pool.handle(ProbeFinished(key_id=key_id, now=3.0, status=200))
    assert pool.state_of("a") not in (KeyState.HEALTHY, KeyState.RECOVERING)
    pinned = pool.handle(RequestStarted(request_id="r3", now=4.0, pin="a", pin_fallback=False))
    assert not sends(pinned)
    for _ in range(5):  # no recheck probe either: none can end a spent budget
        deadline = pool.next_deadline()
        if deadline is None:
            break
        assert not probes(pool.handle(Tick(now=deadline)))


def test_the_ring_points_cap_holds_under_every_policy() -> None:
    """Requests with a session walk a hash ring under any policy: a huge weight
    built millions of points there too (one such request took 19 s)."""
    with pytest.raises(PoolError, match="points on the affinity ring"):
        PoolConfig(keys=[KeySpec(key_id="a", weight=1e5)], policy="round_robin")
    pool = Pool(PoolConfig(keys=[KeySpec(key_id="a")], policy="least_busy"))
    with pytest.raises(PoolError, match="points on the affinity ring"):
        pool.handle(KeyAdded(now=1.0, key=KeySpec(key_id="b", weight=1e5)))


def test_a_mid_stream_limit_answer_keeps_its_absolute_reset() -> None:
    """A free-day 429 inside a stream (OpenRouter's error chunk) cooled the
    account for the default guess, soft: its epoch-ms reset needs the wall time."""
    wall = 1_743_638_400.0 - 6 * 3600  # 18:00 UTC; the reset at 00:00, 6 h later
    chunk = {
        "error": {
            "code": 429,
            "message": "Rate limit exceeded: free-models-per-day. ",
            "metadata": {"headers": {"X-RateLimit-Remaining": "0",
                                     "X-RateLimit-Reset": "1743638400000"}},
        }
    }  # fmt: skip
    pool = Pool(PoolConfig(keys=[KeySpec(key_id="a", account="x"), KeySpec(key_id="b")]))
    _send(pool, "r1", 0.0, pin="a")
    pool.handle(ResponseReceived(request_id="r1", now=1.0, status=200, wall_time=wall))
    pool.handle(
        ResponseFinished(
            request_id="r1", now=1.0, error_status=429, error_body=chunk, wall_time=wall
        )
    )
    assert pool.state_of("a") is KeyState.RATE_LIMITED
    assert pool.statistics().keys[0].until == pytest.approx(1.0 + 6 * 3600)
