"""The core's rules at their edges: each test here kills a mutation of the core
(a comparison flipped, a condition dropped) that the rest of the suite let live
(a mutation run over keyrotor/core, 2026-12-07: 51 mutations, these 18 gaps)."""

from __future__ import annotations

import pytest

from keyrotor.core import (
    KeyMarked,
    KeySpec,
    KeyState,
    Pool,
    ProbeFinished,
    ProbeRequested,
    Reject,
    Send,
    SpendRecorded,
    Tick,
    TransportFailed,
)

from .helpers import changes, finish, make_pool, only, probes, respond, sends, start


def one(pool: Pool, rid: str, now: float, status: int, pin: str) -> list:
    """One whole request pinned to ``pin``; the decisions of its answer."""
    assert only(start(pool, rid, now, pin=pin), Send).key_id == pin
    out = respond(pool, rid, now, status)
    finish(pool, rid, now)
    return out


def until(pool: Pool, key_id: str) -> float | None:
    return {k.key_id: k for k in pool.statistics().keys}[key_id].until


# G1 (m01): "more than error_threshold (50 %) faults": exactly half is not enough.
def test_a_key_at_exactly_the_error_threshold_is_not_degraded() -> None:
    pool = make_pool("a", "b", max_attempts=1)
    one(pool, "b0", 0.5, 200, "b")
    for n, status in enumerate((200, 200, 200, 503, 503, 503), start=1):  # 3 of 6: 50 %
        assert changes(one(pool, f"a{n}", float(n), status, "a")) == []
    assert pool.state_of("a") is KeyState.HEALTHY
    out = one(pool, "a7", 7.0, 503, "a")  # 7 requests, 4 faults: over 50 %
    assert changes(out) == [("a", "healthy", "degraded")]


# G2 (m02): "at least error_min_requests requests": the 5th fault of 5 degrades.
def test_the_error_window_trips_at_exactly_error_min_requests() -> None:
    pool = make_pool("a", "b", max_attempts=1)
    one(pool, "b0", 0.5, 200, "b")
    for n in range(1, 5):
        assert changes(one(pool, f"a{n}", float(n), 503, "a")) == []
    assert changes(one(pool, "a5", 5.0, 503, "a")) == [("a", "healthy", "degraded")]


# G3 (m03): the rest of the pool at exactly the threshold is "not above" it: a is blamed.
def test_the_rest_of_the_pool_at_exactly_the_threshold_still_lets_a_key_degrade() -> None:
    pool = make_pool("a", "b", max_attempts=1)
    one(pool, "b0", 0.5, 200, "b")
    one(pool, "b1", 0.6, 503, "b")  # b: 2 requests, 1 fault = 50 %
    for n in range(1, 5):
        one(pool, f"a{n}", float(n), 503, "a")
    assert changes(one(pool, "a5", 5.0, 503, "a")) == [("a", "healthy", "degraded")]


# G4 (m05): late faults on a key that already cools never extend its cooldown.
def test_late_faults_on_a_rate_limited_key_do_not_extend_its_cooldown() -> None:
    pool = make_pool("a", "b", max_attempts=1)
    one(pool, "b0", 0.0, 200, "b")
    for n in range(6):
        assert only(start(pool, f"r{n}", 0.0, pin="a"), Send).key_id == "a"
    out = respond(pool, "r0", 1.0, 429, retry_after=10.0)
    assert changes(out) == [("a", "healthy", "rate_limited")]
    for n in range(1, 6):  # the other five come back 503 while a cools
        assert changes(respond(pool, f"r{n}", 1.0 + n, 503)) == []
    assert until(pool, "a") == pytest.approx(11.0)
    assert changes(pool.handle(Tick(now=11.0))) == [("a", "rate_limited", "recovering")]


# G5 (m07): an answer at the very instant the first timed-out attempt was sent,
# fed before it, is not "since" it.
def test_an_answer_before_the_first_hanging_send_at_the_same_instant_is_no_evidence() -> None:
    pool = make_pool("hang", "ok", max_attempts=1)
    assert only(start(pool, "o", 0.5, pin="ok"), Send).key_id == "ok"
    respond(pool, "o", 1.0, 200)
    assert only(start(pool, "h1", 1.0, pin="hang"), Send).key_id == "hang"
    pool.handle(TransportFailed(request_id="h1", now=2.0, reason="timeout"))
    assert only(start(pool, "h2", 2.0, pin="hang"), Send).key_id == "hang"
    out = pool.handle(TransportFailed(request_id="h2", now=3.0, reason="timeout"))
    assert changes(out) == []


# G6 (m12): an operator's hard floor survives degraded -> rate_limited (a late 429).
def test_an_operators_floor_survives_a_late_429_on_a_marked_key() -> None:
    pool = make_pool("a", "b", min_healthy=2)
    assert only(start(pool, "r1", 0.0, pin="a"), Send).key_id == "a"
    pool.handle(KeyMarked(now=1.0, key_id="a", state=KeyState.DEGRADED, until=1000.0))
    out = respond(pool, "r1", 2.0, 429)  # no Retry-After: the default guess (902)
    assert changes(out)[0] == ("a", "degraded", "rate_limited")
    assert until(pool, "a") == pytest.approx(1000.0)
    assert probes(pool.handle(Tick(now=500.0))) == []  # no probe before the operator's time
    assert pool.state_of("a") is KeyState.RATE_LIMITED


# G7 (m18): the pool-short scan runs again exactly probe_interval after the last one.
def test_the_pool_short_scan_repeats_at_exactly_probe_interval() -> None:
    pool = make_pool("a", max_attempts=1)
    start(pool, "r1", 0.0)
    out = respond(pool, "r1", 0.0, 429)  # default guess: probed at once
    assert probes(out) == ["a"]
    pool.handle(ProbeFinished(key_id="a", now=1.0, status=429))
    out = pool.handle(SpendRecorded(now=30.0, key_id="a", cost=0.01))
    assert probes(out) == ["a"]


# G8 (m19): a 401 on a disabled key (a late answer) starts no confirming probe.
def test_a_late_401_on_a_disabled_key_is_not_probed() -> None:
    pool = make_pool("a", "b")
    assert only(start(pool, "r1", 0.0), Send).key_id == "a"
    pool.handle(KeyMarked(now=1.0, key_id="a", state=KeyState.DISABLED))
    out = respond(pool, "r1", 2.0, 401)
    assert probes(out) == []
    assert pool.state_of("a") is KeyState.DISABLED
    assert only(out, Send).key_id == "b"


# G9 (m20): spend from a budget window that ended exactly now counts for nothing.
def test_spend_from_a_window_that_ended_exactly_now_does_not_deplete() -> None:
    pool = make_pool(specs=[KeySpec(key_id="a", budget=1.0, budget_window=60.0)])
    out = pool.handle(SpendRecorded(now=60.0, key_id="a", cost=1.0, at=0.0))
    assert changes(out) == []
    assert pool.state_of("a") is KeyState.HEALTHY


# G10 (m21): a spend at exactly the window's end opens a new window.
def test_a_spend_at_the_end_of_the_budget_window_opens_a_new_one() -> None:
    pool = make_pool(specs=[KeySpec(key_id="a", budget=1.0, budget_window=60.0)])
    pool.handle(SpendRecorded(now=0.0, key_id="a", cost=0.6))
    out = pool.handle(SpendRecorded(now=60.0, key_id="a", cost=0.6))
    assert changes(out) == []
    assert pool.state_of("a") is KeyState.HEALTHY


# G11 (m25): tpm debt is paid off, never saved up: an idle key sends one
# minute's worth (plus the request that passes it), not more.
def test_tpm_debt_does_not_turn_into_credit_while_idle() -> None:
    pool = make_pool(specs=[KeySpec(key_id="a", tpm=1000)], queue_timeout=300.0)
    assert sends(start(pool, "r0", 0.0, tokens=1000))
    respond(pool, "r0", 0.0, 200)
    finish(pool, "r0", 0.0, prompt_tokens=600, completion_tokens=400)
    assert sends(start(pool, "r1", 600.0, tokens=1000))
    assert sends(start(pool, "r2", 600.0, tokens=1000))
    assert start(pool, "r3", 600.0, tokens=1000) == []  # waits
    assert pool.next_deadline() == pytest.approx(660.0)


# G12 (m26): rpm spaces requests evenly after an idle spell too.
def test_rpm_pacing_after_an_idle_spell_allows_no_burst() -> None:
    pool = make_pool(specs=[KeySpec(key_id="a", rpm=60)])
    assert sends(start(pool, "r0", 0.0))
    assert sends(start(pool, "r1", 100.0))
    assert start(pool, "r2", 100.0) == []  # waits one second
    out = pool.handle(Tick(now=101.0))
    assert only(out, Send).request_id == "r2"


# G13 (m29): a key due back exactly at the request's deadline: the request waits.
def test_a_key_due_back_exactly_at_the_deadline_keeps_the_request() -> None:
    pool = make_pool("a", max_attempts=1)
    start(pool, "r0", 0.0)
    respond(pool, "r0", 0.0, 429, retry_after=10.0)
    assert start(pool, "r1", 1.0, deadline=10.0) == []  # queued, not rejected
    out = pool.handle(Tick(now=10.0))
    assert only(out, Send).request_id == "r1"


# G14 (m30): a deadline that is already now, with no key free: rejected at once.
def test_a_deadline_of_now_with_no_free_key_is_rejected_at_once() -> None:
    pool = make_pool(specs=[KeySpec(key_id="a", max_in_flight=1)])
    assert sends(start(pool, "r1", 0.0))
    out = start(pool, "r2", 5.0, deadline=5.0)
    assert only(out, Reject).status == 503


# G15 (m33): the driver's Retry-After and the headers' resets: the longest wins.
def test_a_longer_retry_after_beats_a_shorter_header_reset() -> None:
    pool = make_pool("a", "b", max_attempts=1)
    start(pool, "r1", 0.0)
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "30s"}
    respond(pool, "r1", 1.0, 429, retry_after=600.0, headers=headers)
    assert until(pool, "a") == pytest.approx(601.0)


# G16 (m42): a trial that gets a 400, a 404 or a shared-pool 429 passed: the key authenticated.
OR_429_SHARED = {
    "error": {
        "code": 429,
        "message": "Provider returned error",
        "metadata": {"limit_source": "upstream_provider_shared_pool"},
    }
}


@pytest.mark.parametrize(
    ("status", "body"),
    [(400, None), (404, {"error": {"message": "model not found"}}), (429, OR_429_SHARED)],
)
def test_a_trial_passes_on_any_answer_that_proves_the_key_authenticates(
    status: int, body: object
) -> None:
    pool = make_pool("a", "b", max_attempts=1)
    start(pool, "r0", 0.0, pin="a")
    respond(pool, "r0", 0.0, 429, retry_after=10.0)
    assert changes(pool.handle(Tick(now=10.0))) == [("a", "rate_limited", "recovering")]
    assert only(start(pool, "t", 10.0, pin="a"), Send).key_id == "a"
    out = respond(pool, "t", 11.0, status, body=body)
    assert changes(out) == [("a", "recovering", "healthy")]


# G17 (m47): a windowed budget, once its window ended, never blocks probes.
def test_a_windowed_budget_does_not_hold_probes_back_after_its_window() -> None:
    pool = make_pool(specs=[KeySpec(key_id="a", budget=1.0, budget_window=60.0)])
    pool.handle(SpendRecorded(now=0.0, key_id="a", cost=1.0))
    assert pool.state_of("a") is KeyState.DEPLETED
    assert changes(pool.handle(Tick(now=60.0))) == [("a", "depleted", "recovering")]
    assert only(start(pool, "r1", 61.0), Send).key_id == "a"
    out = respond(pool, "r1", 62.0, 429)  # a default guess, the pool short
    assert changes(out) == [("a", "recovering", "rate_limited")]
    assert probes(out) == ["a"]


# G18 (m48): an operator's probe of every key skips the disabled ones.
def test_probe_requested_skips_disabled_keys() -> None:
    pool = make_pool("a", "b")
    pool.handle(KeyMarked(now=0.0, key_id="a", state=KeyState.DISABLED))
    assert probes(pool.handle(ProbeRequested(now=1.0))) == ["b"]
    assert probes(pool.handle(ProbeRequested(now=2.0, key_id="a"))) == []


# G19 (m50): the hopeless check keeps a request whose deadline is exactly the earliest return.
def test_the_hopeless_check_keeps_a_request_whose_deadline_is_the_earliest_return() -> None:
    pool = make_pool("a", "b", max_attempts=1)
    start(pool, "ra", 0.0, pin="a")
    respond(pool, "ra", 0.0, 429, retry_after=10.0)
    start(pool, "rb", 0.0, pin="b")
    respond(pool, "rb", 0.0, 429, retry_after=20.0)
    assert start(pool, "r1", 1.0, deadline=10.0) == []
    out = pool.handle(KeyMarked(now=2.0, key_id="b", state=KeyState.DISABLED))
    assert not [d for d in out if isinstance(d, Reject)]
    out = pool.handle(Tick(now=10.0))
    assert only(out, Send).request_id == "r1"


# G20 (m51): the error window slides: faults late in the previous window still count.
def test_faults_just_before_a_window_boundary_still_count() -> None:
    pool = make_pool("a", "b", max_attempts=1)
    one(pool, "b0", 50.0, 200, "b")
    for n, at in enumerate((55.0, 56.0, 57.0, 58.0)):
        assert changes(one(pool, f"a{n}", at, 503, "a")) == []
    assert changes(one(pool, "a5", 61.0, 503, "a")) == []  # 1 + 4 x 59/60 < 5 requests
    assert changes(one(pool, "a6", 61.5, 503, "a")) == [("a", "healthy", "degraded")]
