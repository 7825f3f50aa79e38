"""Behaviour of ``Pool``: one test per rule of the design, through the public API."""

from __future__ import annotations

import json
from typing import Any

import pytest

from keyrotor.core import (
    AttemptHeld,
    Deliver,
    KeyAdded,
    KeyMarked,
    KeyRemoved,
    KeySpec,
    KeyState,
    Pool,
    PoolConfig,
    PoolError,
    ProbeFinished,
    ProbeRequested,
    Reject,
    RequestCancelled,
    RequestStarted,
    ResponseFinished,
    ResponseReceived,
    Send,
    SpendRecorded,
    Tick,
    TransportFailed,
)

from .helpers import changes, finish, make_pool, only, probes, respond, sends, start

OR_429_SHARED = {
    "error": {
        "code": 429,
        "message": "Provider returned error",
        "metadata": {
            "raw": "deepseek/deepseek-r1:free is temporarily rate-limited upstream",
            "provider_name": "Chutes",
            "limit_source": "upstream_provider_shared_pool",
        },
    }
}
OR_402_IN_FLIGHT = {
    "error": {
        "code": 402,
        "message": "In-flight budget exhausted",
        "metadata": {
            "limit_source": "openrouter_in_flight_budget",
            "reason": "in_flight_budget_exhausted",
        },
    }
}
OPENAI_QUOTA = {
    "error": {
        "message": "You exceeded your current quota, please check your plan and billing details.",
        "type": "insufficient_quota",
        "code": "insufficient_quota",
    }
}
OR_FREE_PER_MIN = {
    "error": {
        "code": 429,
        "message": "Rate limit exceeded: free-models-per-min.",
        "metadata": {"limit_source": "openrouter_free_tier_minute"},
    }
}


def serve(pool: Pool, rid: str, now: float, status: int = 200) -> str:
    """One whole successful request; returns the key that served it."""
    key = only(start(pool, rid, now), Send).key_id
    only(respond(pool, rid, now, status), Deliver)
    finish(pool, rid, now)
    return key


# ---------------------------------------------------------------- contract


def test_design_contract_example() -> None:
    pool = make_pool(specs=[KeySpec(key_id="a"), KeySpec(key_id="b", weight=2)], seed=0)
    assert start(pool, "r1", 0.0) == [Send(request_id="r1", key_id="a", attempt=1)]
    out = respond(pool, "r1", 0.2, 429, retry_after=30.0)
    assert changes(out) == [("a", "healthy", "rate_limited")]
    assert out[0].until == pytest.approx(30.2)
    assert out[1] == Send(request_id="r1", key_id="b", attempt=2)
    assert respond(pool, "r1", 0.4, 200) == [
        Deliver(request_id="r1", key_id="b", attempt=2, status=200)
    ]
    assert finish(pool, "r1", 0.5, cost=0.0001, prompt_tokens=10, completion_tokens=8) == []
    assert pool.next_deadline() == pytest.approx(30.2)
    out = pool.handle(Tick(now=30.2))
    assert changes(out) == [("a", "rate_limited", "recovering")]
    stats = {k.key_id: k for k in pool.statistics().keys}
    assert stats["b"].spend == pytest.approx(0.0001)
    assert stats["b"].prompt_tokens == 10 and stats["b"].completion_tokens == 8
    assert stats["a"].errors["rate_limited"] == 1
    assert json.loads(json.dumps(pool.statistics().to_json()))["keys"][0]["state"] == "recovering"


# ---------------------------------------------------------------- health


def test_rate_limit_without_retry_after_uses_default_15_minutes() -> None:
    pool = make_pool("a", "b")
    start(pool, "r1", 0.0)
    out = respond(pool, "r1", 1.0, 429)
    assert changes(out) == [("a", "healthy", "rate_limited")]
    assert pool.statistics().keys[0].until == pytest.approx(901.0)


def test_retry_after_is_a_floor_that_a_shorter_signal_never_shortens() -> None:
    pool = make_pool("a", "b", "c", max_attempts=1)
    start(pool, "r1", 0.0, pin="a")
    start(pool, "r2", 0.0, pin="a")
    respond(pool, "r1", 1.0, 429, retry_after=100.0)
    out = respond(pool, "r2", 2.0, 429, retry_after=5.0)  # later but shorter
    assert changes(out) == []
    assert pool.statistics().keys[0].until == pytest.approx(101.0)
    # A longer one extends it.
    start(pool, "r3", 3.0, pin="a", pin_fallback=False)  # waits: a is cooling
    pool.handle(KeyMarked(key_id="b", state=KeyState.DISABLED, now=3.0))
    assert pool.state_of("a") is KeyState.RATE_LIMITED
    assert pool.next_deadline() is not None


def test_late_success_does_not_end_a_cooldown() -> None:
    pool = make_pool("a", "b", max_attempts=1)
    start(pool, "r1", 0.0, pin="a")
    start(pool, "r2", 0.0, pin="a")
    respond(pool, "r1", 1.0, 429, retry_after=60.0)
    respond(pool, "r2", 2.0, 200)  # sent before the 429 arrived
    assert pool.state_of("a") is KeyState.RATE_LIMITED


def test_one_transient_error_never_degrades_a_key() -> None:
    pool = make_pool("a", "b")
    start(pool, "r1", 0.0)
    out = respond(pool, "r1", 0.1, 502)
    assert changes(out) == []
    assert only(out, Send).key_id == "b"  # retried elsewhere
    assert pool.state_of("a") is KeyState.HEALTHY


def test_key_that_alone_keeps_failing_is_degraded_then_recovers_half_open() -> None:
    pool = make_pool("a", "b", "c", max_attempts=1)
    now = 0.0
    for i in range(30):
        now += 0.5
        key = only(start(pool, f"r{i}", now), Send).key_id
        status = 503 if key == "a" else 200
        out = respond(pool, f"r{i}", now, status)
        if ("a", "healthy", "degraded") in changes(out):
            break
        finish(pool, f"r{i}", now)
    else:
        pytest.fail("key a was never degraded")
    stats = {k.key_id: k for k in pool.statistics().keys}
    assert stats["a"].errors["upstream_fault"] >= 3  # not on the first error
    assert stats["a"].until == pytest.approx(now + 300.0)
    # Nothing goes to a while it cools.
    for j in range(6):
        assert serve(pool, f"s{j}", now + 1 + j) != "a"
    out = pool.handle(Tick(now=now + 300.0))
    assert changes(out) == [("a", "degraded", "recovering")]
    # Half-open: one trial at a time on a.
    got = []
    for j in range(6):
        got.append(only(start(pool, f"t{j}", now + 301), Send).key_id)
    assert got.count("a") == 1
    trial = f"t{got.index('a')}"
    out = respond(pool, trial, now + 302, 200)
    assert changes(out) == [("a", "recovering", "healthy")]


def test_upstream_wide_faults_degrade_no_key() -> None:
    pool = make_pool("a", "b", max_attempts=1)
    for i in range(40):
        start(pool, f"r{i}", i * 0.1)
        respond(pool, f"r{i}", i * 0.1, 500)
        finish(pool, f"r{i}", i * 0.1)
    assert [k.state for k in pool.statistics().keys] == [KeyState.HEALTHY] * 2


def test_single_key_pool_is_never_degraded_by_faults() -> None:
    pool = make_pool("a", max_attempts=1)
    for i in range(20):
        start(pool, f"r{i}", float(i))
        respond(pool, f"r{i}", float(i), 503)
        finish(pool, f"r{i}", float(i))
    assert pool.state_of("a") is KeyState.HEALTHY


def test_401_fails_the_key_and_asks_for_a_confirming_probe() -> None:
    pool = make_pool("a", "b")
    start(pool, "r1", 0.0)
    out = respond(pool, "r1", 0.1, 401)
    assert changes(out) == [("a", "healthy", "failed")]
    assert probes(out) == ["a"]
    assert only(out, Send).key_id == "b"
    # A false 401: the probe answers 200, the key recovers half-open.
    out = pool.handle(ProbeFinished(key_id="a", now=1.0, status=200))
    assert changes(out) == [("a", "failed", "recovering")]


def test_failed_key_stays_failed_without_probe_or_operator() -> None:
    pool = make_pool("a", "b", recheck_interval=None)
    start(pool, "r1", 0.0)
    respond(pool, "r1", 0.1, 401)
    pool.handle(ProbeFinished(key_id="a", now=0.2, status=401))
    pool.handle(Tick(now=10_000.0))
    assert pool.state_of("a") is KeyState.FAILED
    assert pool.next_deadline() is None
    out = pool.handle(KeyMarked(key_id="a", state=KeyState.HEALTHY, now=10_001.0))
    assert changes(out) == [("a", "failed", "healthy")]


def test_depleted_key_is_rechecked_by_probe_and_comes_back_when_refunded() -> None:
    pool = make_pool("a", "b", recheck_interval=600.0)
    start(pool, "r1", 0.0)
    out = respond(pool, "r1", 0.1, 402)
    assert changes(out) == [("a", "healthy", "depleted")]
    assert pool.next_deadline() == pytest.approx(600.1)
    out = pool.handle(Tick(now=600.1))
    assert probes(out) == ["a"]
    body = {"data": {"limit": 10.0, "limit_remaining": 0.0, "usage": 10.0}}
    out = pool.handle(ProbeFinished(key_id="a", now=600.2, status=200, body=body))
    assert pool.state_of("a") is KeyState.DEPLETED
    assert pool.next_deadline() == pytest.approx(1200.2)
    pool.handle(Tick(now=1200.2))
    body = {"data": {"limit": 20.0, "limit_remaining": 10.0, "usage": 10.0}}
    out = pool.handle(ProbeFinished(key_id="a", now=1200.3, status=200, body=body))
    assert changes(out) == [("a", "depleted", "recovering")]


def test_in_flight_budget_402_is_a_short_rate_limit_not_depletion() -> None:
    pool = make_pool("a", "b")
    start(pool, "r1", 0.0)
    out = respond(pool, "r1", 0.0, 402, body=OR_402_IN_FLIGHT)
    assert changes(out) == [("a", "healthy", "rate_limited")]
    assert pool.statistics().keys[0].until == pytest.approx(10.0)
    out = respond(pool, "r1", 0.0, 402, body=OR_402_IN_FLIGHT, headers={"Retry-After": "3"})
    assert changes(out) == [("b", "healthy", "rate_limited")]
    assert pool.statistics().keys[1].until == pytest.approx(3.0)


def test_shared_pool_429_is_delivered_and_does_not_blame_the_key() -> None:
    pool = make_pool("a", "b")
    start(pool, "r1", 0.0)
    out = respond(pool, "r1", 0.1, 429, body=OR_429_SHARED)
    assert out == [Deliver(request_id="r1", key_id="a", attempt=1, status=429)]
    assert pool.state_of("a") is KeyState.HEALTHY


def test_insufficient_quota_429_depletes() -> None:
    pool = make_pool("a", "b")
    start(pool, "r1", 0.0)
    out = respond(pool, "r1", 0.1, 429, body=OPENAI_QUOTA)
    assert changes(out) == [("a", "healthy", "depleted")]
    assert only(out, Send).key_id == "b"


def test_caller_errors_pass_through_unchanged() -> None:
    pool = make_pool("a", "b")
    for status in (400, 404, 413, 422):
        start(pool, f"r{status}", 0.0)
        out = respond(pool, f"r{status}", 0.0, status)
        assert only(out, Deliver).status == status
        assert not sends(out)
        finish(pool, f"r{status}", 0.0)
    assert all(k.state is KeyState.HEALTHY for k in pool.statistics().keys)


def test_account_wide_limit_cools_every_key_of_the_account() -> None:
    specs = [
        KeySpec(key_id="a1", account="acct"),
        KeySpec(key_id="a2", account="acct"),
        KeySpec(key_id="b", account="other"),
    ]
    pool = make_pool(specs=specs)
    start(pool, "r1", 0.0)
    out = respond(pool, "r1", 0.0, 429, body=OR_FREE_PER_MIN, headers={"retry-after": "40"})
    assert sorted(changes(out)) == [
        ("a1", "healthy", "rate_limited"),
        ("a2", "healthy", "rate_limited"),
    ]
    assert only(out, Send).key_id == "b"


def test_mid_stream_error_updates_health_without_retry() -> None:
    pool = make_pool("a", "b")
    start(pool, "r1", 0.0)
    respond(pool, "r1", 0.1, 200)
    # A bare 429 after the first token is the provider's (upstream_busy); the
    # free tier's per-minute limit is the key's own.
    limit = {"error": {"code": 429, "message": "Rate limit exceeded: free-models-per-min. "}}
    out = finish(pool, "r1", 0.5, error_status=429, error_body=limit)
    assert changes(out) == [("a", "healthy", "rate_limited")]
    assert not sends(out)


def test_proactive_cooldown_when_headers_show_bucket_exhausted() -> None:
    pool = make_pool("a", "b")
    start(pool, "r1", 0.0)
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "20s"}
    out = respond(pool, "r1", 1.0, 200, headers=headers)
    assert only(out, Deliver).status == 200
    assert changes(out) == [("a", "healthy", "rate_limited")]
    assert pool.statistics().keys[0].until == pytest.approx(21.0)


# -------------------------------------------------------------- failover


def test_failover_never_repeats_a_key_while_another_is_usable() -> None:
    pool = make_pool("a", "b", "c", max_attempts=3)
    start(pool, "r1", 0.0)
    keys = ["a"]
    for _ in range(2):
        keys.append(only(respond(pool, "r1", 0.0, 503), Send).key_id)
    assert keys == ["a", "b", "c"]
    out = respond(pool, "r1", 0.0, 503)  # third attempt: out of attempts
    assert only(out, Deliver).status == 503


def test_a_request_may_ask_for_fewer_attempts_never_more() -> None:
    pool = make_pool("a", "b", "c", max_attempts=2)
    start(pool, "r1", 0.0, max_attempts=1)  # a router's last model: one attempt left
    assert only(respond(pool, "r1", 0.0, 503), Deliver).attempt == 1
    start(pool, "r2", 0.0, max_attempts=5)  # capped at the pool's 2
    assert only(respond(pool, "r2", 0.0, 503), Send).attempt == 2
    assert only(respond(pool, "r2", 0.0, 503), Deliver).attempt == 2
    before = pool.snapshot()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(PoolError, match="max_attempts must be a positive integer"):
            start(pool, "r3", 1.0, max_attempts=bad)
    assert pool.snapshot() == before


def test_a_model_that_is_unavailable_is_delivered_at_once_and_leaves_the_key_alone() -> None:
    pool = make_pool("a", "b", max_attempts=3)
    body = {"error": {"code": 503, "message": "No instances available for m/x."}}
    start(pool, "r1", 0.0)
    out = respond(pool, "r1", 0.0, 503, body=json.dumps(body).encode())
    assert only(out, Deliver).attempt == 1  # another key would not help: another model may
    errors = pool.statistics().keys[0].errors
    assert errors["model_unavailable"] == 1 and errors["upstream_fault"] == 0


def test_single_key_retries_on_itself() -> None:
    pool = make_pool("a", max_attempts=2)
    start(pool, "r1", 0.0)
    out = respond(pool, "r1", 0.0, 502)
    assert only(out, Send) == Send(request_id="r1", key_id="a", attempt=2)


def test_transport_failure_retries_then_rejects_with_502() -> None:
    pool = make_pool("a", "b", max_attempts=2)
    start(pool, "r1", 0.0)
    out = pool.handle(TransportFailed(request_id="r1", now=0.1, reason="reset"))
    assert only(out, Send).key_id == "b"
    out = pool.handle(TransportFailed(request_id="r1", now=0.2, reason="timeout"))
    reject = only(out, Reject)
    assert reject.status == 502
    assert pool.statistics().in_flight == 0


def test_transport_failure_after_delivery_frees_the_key() -> None:
    pool = make_pool("a", "b")
    start(pool, "r1", 0.0)
    respond(pool, "r1", 0.0, 200)
    assert pool.handle(TransportFailed(request_id="r1", now=1.0)) == []
    assert pool.statistics().in_flight == 0


# -------------------------------------------------------------- policies


def test_round_robin_rotates_in_order() -> None:
    pool = make_pool("a", "b", "c")
    assert [serve(pool, f"r{i}", float(i)) for i in range(6)] == ["a", "b", "c"] * 2


def test_weighted_shares_follow_weights() -> None:
    specs = [KeySpec(key_id="a", weight=1), KeySpec(key_id="b", weight=3)]
    pool = make_pool(specs=specs, policy="weighted")
    picks = [serve(pool, f"r{i}", float(i)) for i in range(8)]
    assert picks.count("a") == 2 and picks.count("b") == 6
    assert picks[:4].count("b") == 3  # smooth: interleaved, not batched


def test_weighted_by_remaining_credits() -> None:
    specs = [KeySpec(key_id="a", credits=1.0), KeySpec(key_id="b", credits=9.0)]
    pool = make_pool(specs=specs, policy="weighted", weight_by="credits")
    picks = [serve(pool, f"r{i}", float(i)) for i in range(20)]
    assert picks.count("b") == 18


def test_least_busy_prefers_fewest_in_flight() -> None:
    pool = make_pool("a", "b", "c", policy="least_busy")
    first = [only(start(pool, f"r{i}", 0.0), Send).key_id for i in range(3)]
    assert sorted(first) == ["a", "b", "c"]
    respond(pool, "r1", 0.1, 200)
    finish(pool, "r1", 0.1)
    assert only(start(pool, "r9", 0.2), Send).key_id == first[1]


def test_latency_prefers_the_fast_key() -> None:
    pool = make_pool("fast", "slow", policy="latency", latency_explore=0.0)
    now = 0.0
    picks = []
    for i in range(40):
        key = only(start(pool, f"r{i}", now), Send).key_id
        picks.append(key)
        now += 0.05 if key == "fast" else 1.0
        respond(pool, f"r{i}", now, 200)
        finish(pool, f"r{i}", now)
    assert picks[-20:].count("fast") == 20


def test_affinity_keeps_sessions_on_their_key_and_moves_few_when_a_key_leaves() -> None:
    pool = make_pool(*[f"k{i}" for i in range(8)], policy="affinity")
    sessions = [f"s{i}" for i in range(200)]
    first = {s: serve(pool, f"a{s}", 0.0) for s in sessions for _ in [0]}
    again = {}
    for s in sessions:
        only(start(pool, f"b{s}", 1.0, session=s), Send)
    for s in sessions:
        pool.handle(RequestCancelled(request_id=f"b{s}", now=1.0))
    for s in sessions:
        again[s] = only(start(pool, f"c{s}", 2.0, session=s), Send).key_id
        pool.handle(RequestCancelled(request_id=f"c{s}", now=2.0))
    first = again
    repeat = {s: only(start(pool, f"d{s}", 3.0, session=s), Send).key_id for s in sessions}
    assert repeat == first
    for s in sessions:
        pool.handle(RequestCancelled(request_id=f"d{s}", now=3.0))
    assert len(set(first.values())) == 8  # spread over every key
    pool.handle(KeyRemoved(key_id="k3", now=4.0))
    moved = {}
    for s in sessions:
        moved[s] = only(start(pool, f"e{s}", 5.0, session=s), Send).key_id
        pool.handle(RequestCancelled(request_id=f"e{s}", now=5.0))
    changed = [s for s in sessions if moved[s] != first[s]]
    assert changed and all(first[s] == "k3" for s in changed)


def test_pin_by_id_and_index_with_fallback() -> None:
    pool = make_pool("a", "b", "c")
    assert only(start(pool, "r1", 0.0, pin="c"), Send).key_id == "c"
    assert only(start(pool, "r2", 0.0, pin=1), Send).key_id == "b"
    assert only(start(pool, "r3", 0.0, pin="missing"), Send).key_id in {"a", "b", "c"}
    pool.handle(KeyMarked(key_id="a", state=KeyState.DISABLED, now=0.0))
    assert only(start(pool, "r4", 0.0, pin="a"), Send).key_id != "a"
    out = start(pool, "r5", 0.0, pin="a", pin_fallback=False, deadline=5.0)
    assert only(out, Reject).request_id == "r5"  # a disabled key does not come back on its own


def test_batch_group_gets_distinct_keys() -> None:
    pool = make_pool("a", "b", "c", "d", policy="least_busy")
    keys = [only(start(pool, f"r{i}", 0.0, group="g"), Send).key_id for i in range(4)]
    assert sorted(keys) == ["a", "b", "c", "d"]
    # More operations than keys: repeats allowed, still served.
    assert only(start(pool, "r5", 0.0, group="g"), Send).key_id in keys


def test_max_in_flight_limits_a_key() -> None:
    specs = [KeySpec(key_id="a", max_in_flight=1), KeySpec(key_id="b", max_in_flight=1)]
    pool = make_pool(specs=specs)
    assert only(start(pool, "r1", 0.0), Send).key_id == "a"
    assert only(start(pool, "r2", 0.0), Send).key_id == "b"
    assert start(pool, "r3", 0.0) == []  # waits in the queue
    respond(pool, "r1", 1.0, 200)
    out = finish(pool, "r1", 1.0)
    assert out == [Send(request_id="r3", key_id="a", attempt=1)]


def test_rpm_pacing_spaces_requests_instead_of_drawing_429s() -> None:
    pool = make_pool(specs=[KeySpec(key_id="a", rpm=60)])
    assert only(start(pool, "r1", 0.0), Send)
    assert start(pool, "r2", 0.0) == []  # paced: next slot at t=1
    assert pool.next_deadline() == pytest.approx(1.0)
    out = pool.handle(Tick(now=1.0))
    assert out == [Send(request_id="r2", key_id="a", attempt=1)]


def test_tpm_pacing_counts_tokens() -> None:
    pool = make_pool(specs=[KeySpec(key_id="a", tpm=1000)], queue_timeout=120.0)
    start(pool, "r1", 0.0, tokens=2500)
    respond(pool, "r1", 0.0, 200)
    finish(pool, "r1", 0.0, prompt_tokens=2000, completion_tokens=500)
    # 2,500 tokens = 150 s of budget at 1,000/min: next send once debt < 60 s.
    assert start(pool, "r2", 0.0) == []
    out = pool.handle(Tick(now=pool.next_deadline() or 0.0))
    assert only(out, Send).request_id == "r2"
    assert pool.now == pytest.approx(90.0)


def test_spend_budget_depletes_until_window_ends() -> None:
    pool = make_pool(
        specs=[KeySpec(key_id="a", budget=1.0, budget_window=100.0), KeySpec(key_id="b")]
    )
    start(pool, "r1", 0.0, pin="a")
    respond(pool, "r1", 0.0, 200)
    out = finish(pool, "r1", 1.0, cost=1.5)
    assert changes(out) == [("a", "healthy", "depleted")]
    assert pool.statistics().keys[0].until == pytest.approx(101.0)
    out = pool.handle(Tick(now=101.0))
    assert changes(out) == [("a", "depleted", "recovering")]


# ------------------------------------------------------------ no key now


def test_request_waits_for_cooldown_and_is_sent_when_key_recovers() -> None:
    pool = make_pool("a", queue_timeout=60.0)
    start(pool, "r1", 0.0)
    out = respond(pool, "r1", 0.0, 429, retry_after=10.0)
    assert changes(out) == [("a", "healthy", "rate_limited")]
    assert not sends(out)  # waits: the only key is cooling
    assert pool.next_deadline() == pytest.approx(10.0)
    out = pool.handle(Tick(now=10.0))
    assert changes(out) == [("a", "rate_limited", "recovering")]
    assert only(out, Send) == Send(request_id="r1", key_id="a", attempt=2)


def test_reject_with_honest_retry_after_when_wait_exceeds_deadline() -> None:
    pool = make_pool("a", "b", queue_timeout=5.0)
    for rid in ("r1", "r2"):
        start(pool, rid, 0.0, pin_fallback=False, pin="a" if rid == "r1" else "b")
    respond(pool, "r1", 0.0, 429, retry_after=30.0)
    out = respond(pool, "r2", 0.0, 429, retry_after=20.0)
    out = start(pool, "r3", 1.0)
    reject = only(out, Reject)
    assert reject.status == 429
    assert reject.retry_after == pytest.approx(19.0)


def test_queue_deadline_rejects_with_next_deadline() -> None:
    specs = [KeySpec(key_id="a", max_in_flight=1)]
    pool = make_pool(specs=specs, queue_timeout=2.0)
    start(pool, "r1", 0.0)
    assert start(pool, "r2", 0.5) == []
    assert pool.next_deadline() == pytest.approx(2.5)
    out = pool.handle(Tick(now=2.5))
    reject = only(out, Reject)
    assert reject.request_id == "r2" and reject.status == 503
    assert pool.statistics().queued == 0


def test_queue_limit() -> None:
    specs = [KeySpec(key_id="a", max_in_flight=1)]
    pool = make_pool(specs=specs, queue_limit=1)
    start(pool, "r1", 0.0)
    assert start(pool, "r2", 0.0) == []
    assert only(start(pool, "r3", 0.0), Reject).reason == "queue full"


def test_fifo_order_is_kept() -> None:
    specs = [KeySpec(key_id="a", max_in_flight=1)]
    pool = make_pool(specs=specs)
    start(pool, "r1", 0.0)
    start(pool, "r2", 0.1)
    start(pool, "r3", 0.2)
    respond(pool, "r1", 1.0, 200)
    assert only(finish(pool, "r1", 1.0), Send).request_id == "r2"


def test_all_keys_down_recovers_by_probes() -> None:
    pool = make_pool("a", "b", min_healthy=1, probe_interval=30.0)
    start(pool, "r1", 0.0)
    out = respond(pool, "r1", 0.0, 503, retry_after=None)
    assert only(out, Send).key_id == "b"
    out = respond(pool, "r1", 0.1, 401)
    # a failed -> a probe; b failed too -> pool short: probe both.
    start(pool, "r2", 0.2)
    pool.handle(KeyMarked(key_id="a", state=KeyState.FAILED, now=0.3))
    out = pool.handle(ProbeRequested(now=0.4))
    assert set(probes(out)) <= {"a", "b"}
    for key_id in ("a", "b"):
        if pool.statistics().keys[0].probing or key_id == "b":
            pass
    stats = {k.key_id: k for k in pool.statistics().keys}
    assert all(k.state is KeyState.FAILED for k in stats.values())
    assert any(k.probing for k in stats.values())


def test_min_healthy_probes_every_cooling_key_at_once() -> None:
    pool = make_pool("a", "b", "c", min_healthy=2, recheck_interval=None)
    pool.handle(KeyMarked(key_id="a", state=KeyState.DEPLETED, now=0.0))
    out = pool.handle(KeyMarked(key_id="b", state=KeyState.FAILED, now=0.0))
    assert sorted(probes(out)) == ["a", "b"]
    out = pool.handle(ProbeFinished(key_id="a", now=1.0, status=200))
    assert changes(out) == [("a", "depleted", "recovering")]
    out = pool.handle(ProbeFinished(key_id="b", now=1.0, status=401))
    assert pool.state_of("b") is KeyState.FAILED
    # Still short (2 usable needed, a and c usable now): nothing more to do.
    assert pool.statistics().count_by_state()["failed"] == 1


def test_probe_never_ends_a_retry_after_early() -> None:
    pool = make_pool("a", "b")
    start(pool, "r1", 0.0, pin="a")
    respond(pool, "r1", 0.0, 429, retry_after=100.0)
    out = pool.handle(ProbeRequested(now=1.0, key_id="a"))
    assert probes(out) == ["a"]
    out = pool.handle(ProbeFinished(key_id="a", now=2.0, status=200))
    assert pool.state_of("a") is KeyState.RATE_LIMITED


# ------------------------------------------------------------- operators


def test_add_remove_and_mark_keys_at_runtime() -> None:
    pool = make_pool("a")
    start(pool, "r1", 0.0)
    pool.handle(KeyAdded(key=KeySpec(key_id="b"), now=0.0))
    assert only(start(pool, "r2", 0.0), Send).key_id == "b"
    pool.handle(KeyRemoved(key_id="a", now=0.1))
    assert pool.key_ids() == ["b"]
    # a's request still finishes; a takes nothing new.
    respond(pool, "r1", 0.2, 200)
    finish(pool, "r1", 0.3)
    assert [serve(pool, f"s{i}", 1.0 + i) for i in range(3)] == ["b"] * 3
    assert [k.key_id for k in pool.statistics().keys] == ["b"]
    # The id can be reused once drained.
    pool.handle(KeyAdded(key=KeySpec(key_id="a"), now=5.0))
    out = pool.handle(KeyMarked(key_id="b", state=KeyState.DISABLED, now=5.0))
    assert changes(out) == [("b", "healthy", "disabled")]
    assert serve(pool, "t", 6.0) == "a"


def test_marking_rate_limited_needs_until() -> None:
    pool = make_pool("a")
    with pytest.raises(PoolError, match="until"):
        pool.handle(KeyMarked(key_id="a", state=KeyState.RATE_LIMITED, now=0.0))
    out = pool.handle(KeyMarked(key_id="a", state=KeyState.RATE_LIMITED, now=0.0, until=5.0))
    assert changes(out) == [("a", "healthy", "rate_limited")]
    with pytest.raises(PoolError, match="recovering"):
        pool.handle(KeyMarked(key_id="a", state=KeyState.RECOVERING, now=0.0))


def test_cancellation_frees_the_slot_everywhere() -> None:
    specs = [KeySpec(key_id="a", max_in_flight=1)]
    pool = make_pool(specs=specs)
    start(pool, "r1", 0.0)
    start(pool, "r2", 0.0)  # queued
    assert pool.handle(RequestCancelled(request_id="r2", now=0.1)) == []
    assert pool.statistics().queued == 0
    assert pool.handle(RequestCancelled(request_id="r1", now=0.2)) == []
    assert pool.statistics().in_flight == 0
    assert serve(pool, "r3", 0.3) == "a"


# -------------------------------------------------------------- misuse


@pytest.mark.parametrize(
    ("event", "match"),
    [
        (ResponseReceived(request_id="nope", now=1.0, status=200), "unknown request_id"),
        (RequestStarted(request_id="r1", now=1.0), "duplicate request_id"),
        (RequestStarted(request_id="x", now=0.5), "time went backwards"),
        (RequestStarted(request_id="x", now=float("nan")), "invalid time"),
        (ResponseFinished(request_id="r1", now=1.0), "does not fit"),
        (ProbeFinished(key_id="a", now=1.0, status=200), "no probe"),
        (KeyRemoved(key_id="zz", now=1.0), "unknown key_id"),
        (KeyAdded(key=KeySpec(key_id="a"), now=1.0), "duplicate key_id"),
    ],
)
def test_misuse_raises_pool_error_and_changes_nothing(event: object, match: str) -> None:
    pool = make_pool("a", "b")
    start(pool, "r1", 1.0)
    before = pool.snapshot()
    with pytest.raises(PoolError, match=match) as info:
        pool.handle(event)  # type: ignore[arg-type]
    assert "fix:" in str(info.value)
    assert pool.snapshot() == before


def test_not_an_event() -> None:
    with pytest.raises(PoolError, match="not an event"):
        make_pool("a").handle(object())  # type: ignore[arg-type]


def test_finished_request_cannot_be_finished_again() -> None:
    pool = make_pool("a")
    serve(pool, "r1", 0.0)
    with pytest.raises(PoolError, match="unknown request_id"):
        finish(pool, "r1", 1.0)


@pytest.mark.parametrize("policy", ["round_robin", "weighted", "least_busy", "latency", "affinity"])
def test_an_empty_pool_rejects_until_a_key_is_added(policy: str) -> None:
    pool = Pool(PoolConfig(keys=[], policy=policy))  # type: ignore[arg-type]
    out = pool.handle(RequestStarted(request_id="r1", now=0.0, session="s"))
    assert [type(d) for d in out] == [Reject] and out[0].status == 503
    pool.handle(KeyAdded(now=1.0, key=KeySpec(key_id="a")))
    out = pool.handle(RequestStarted(request_id="r2", now=1.0, session="s"))
    assert out == [Send(request_id="r2", key_id="a", attempt=1)]


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: PoolConfig(keys=[KeySpec(key_id="a")], policy="random"), "unknown policy"),
        (lambda: KeySpec(key_id="a", weight=-1), "weight"),
        (lambda: KeySpec(key_id="a", weight=float("inf")), "weight"),
        (lambda: KeySpec(key_id="sk or v1 secret"), "invalid key_id"),
        (lambda: KeySpec(key_id="a", max_in_flight=0), "max_in_flight"),
        (lambda: PoolConfig(keys=[KeySpec(key_id="a")] * 2), "duplicate key_id"),
        (lambda: PoolConfig(keys=[KeySpec(key_id="a")], max_attempts=0), "max_attempts"),
        (lambda: PoolConfig(keys=[KeySpec(key_id="a")], error_threshold=2), "between 0 and 1"),
        (lambda: PoolConfig(keys=["a"]), "KeySpec"),  # type: ignore[list-item]
        (lambda: Pool("config"), "PoolConfig"),  # type: ignore[arg-type]
    ],
)
def test_invalid_configuration(build: object, match: str) -> None:
    with pytest.raises(PoolError, match=match) as info:
        build()  # type: ignore[operator]
    assert "fix:" in str(info.value)


def test_restore_rejects_garbage() -> None:
    with pytest.raises(PoolError, match="snapshot"):
        Pool.restore({"version": 99})
    snap = make_pool("a").snapshot()
    del snap["keys"]
    with pytest.raises(PoolError, match="corrupt"):
        Pool.restore(snap)


# ------------------------------------------------------------ edge cases


def test_config_and_decision_helpers() -> None:
    pool = make_pool("a", "b")
    assert pool.config.keys[0].key_id == "a"
    assert pool.now == float("-inf")
    send = only(start(pool, "r1", 0.0), Send)
    assert not send.is_retry
    retry = only(respond(pool, "r1", 0.0, 503), Send)
    assert retry.is_retry
    pool.handle(KeyMarked(key_id="a", state=KeyState.DISABLED, now=1.0))
    change = pool.statistics().keys[0]
    assert change.state is KeyState.DISABLED
    out = pool.handle(KeyMarked(key_id="a", state=KeyState.HEALTHY, now=2.0))
    assert out[0].to_json() == {
        "key_id": "a",
        "old": "disabled",
        "new": "healthy",
        "until": None,
        "reason": "operator",
        "now": 2.0,
    }


def test_a_429_on_a_degraded_key_never_shortens_its_cooldown() -> None:
    pool = make_pool("a", "b", max_attempts=1)
    start(pool, "r1", 0.0, pin="a")
    pool.handle(KeyMarked(key_id="a", state=KeyState.DEGRADED, until=300.0, now=0.0))
    out = respond(pool, "r1", 1.0, 429, retry_after=10.0)
    assert changes(out) == [("a", "degraded", "rate_limited")]
    assert pool.statistics().keys[0].until == pytest.approx(300.0)


def test_known_credits_spent_deplete_the_key_and_reweigh() -> None:
    specs = [KeySpec(key_id="a", credits=0.02), KeySpec(key_id="b", credits=10.0)]
    pool = make_pool(specs=specs, policy="weighted", weight_by="credits")
    start(pool, "r1", 0.0, pin="a")
    respond(pool, "r1", 0.0, 200)
    assert changes(finish(pool, "r1", 0.0, cost=0.01)) == []
    start(pool, "r2", 0.0, pin="a")
    respond(pool, "r2", 0.0, 200)
    out = finish(pool, "r2", 0.0, cost=0.01)
    assert changes(out) == [("a", "healthy", "depleted")]
    assert {serve(pool, f"s{i}", 1.0) for i in range(5)} == {"b"}


def test_probe_answer_with_an_empty_bucket_cools_the_key() -> None:
    pool = make_pool("a", "b")
    pool.handle(ProbeRequested(now=0.0, key_id="a"))
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "30s"}
    out = pool.handle(ProbeFinished(key_id="a", now=1.0, status=200, headers=headers))
    assert changes(out) == [("a", "healthy", "rate_limited")]
    assert pool.statistics().keys[0].until == pytest.approx(31.0)


def test_probe_result_for_a_removed_key_is_ignored_once() -> None:
    pool = make_pool("a", "b")
    pool.handle(ProbeRequested(now=0.0, key_id="a"))
    pool.handle(KeyRemoved(key_id="a", now=0.5))
    assert pool.handle(ProbeFinished(key_id="a", now=1.0, status=200)) == []
    with pytest.raises(PoolError, match="unknown key_id"):
        pool.handle(ProbeFinished(key_id="a", now=1.0, status=200))


def test_cancel_at_the_instant_the_deadline_rejects() -> None:
    specs = [KeySpec(key_id="a", max_in_flight=1)]
    pool = make_pool(specs=specs, queue_timeout=5.0)
    start(pool, "r1", 0.0)
    start(pool, "r2", 0.0)
    out = pool.handle(RequestCancelled(request_id="r2", now=5.0))
    assert only(out, Reject).request_id == "r2"  # the deadline came first
    assert pool.statistics().cancelled == 0


def test_removing_a_key_with_requests_in_flight_keeps_counting_it_as_removing() -> None:
    pool = make_pool("a", "b")
    start(pool, "r1", 0.0)
    pool.handle(KeyRemoved(key_id="a", now=0.1))
    stats = pool.statistics()
    assert [(k.key_id, k.removing) for k in stats.keys] == [("b", False), ("a", True)]
    assert stats.count_by_state()["healthy"] == 1


@pytest.mark.parametrize(
    ("event", "match"),
    [
        (KeyMarked(key_id="a", state=KeyState.RATE_LIMITED, until=0.5, now=1.0), "after now"),
        (KeyAdded(key="a", now=1.0), "KeySpec"),  # type: ignore[arg-type]
    ],
)
def test_more_misuse(event: object, match: str) -> None:
    pool = make_pool("a")
    pool.handle(Tick(now=1.0))
    with pytest.raises(PoolError, match=match):
        pool.handle(event)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: KeySpec(key_id="a", account=""), "account"),
        (lambda: PoolConfig(keys=[KeySpec(key_id="a")], weight_by="age"), "weight_by"),
        (lambda: PoolConfig(keys=[KeySpec(key_id="a")], seed="x"), "seed"),
        (lambda: PoolConfig.from_json({"keys": [{"key_id": "a"}], "colour": 1}), "colour"),
    ],
)
def test_more_invalid_configuration(build: object, match: str) -> None:
    with pytest.raises(PoolError, match=match):
        build()  # type: ignore[operator]


def test_lifetime_budget_depletes_for_good() -> None:
    pool = make_pool(specs=[KeySpec(key_id="a", budget=1.0), KeySpec(key_id="b")])
    for rid, cost in (("r1", 0.6), ("r2", 0.6)):
        start(pool, rid, 0.0, pin="a")
        respond(pool, rid, 0.0, 200)
        out = finish(pool, rid, 0.0, cost=cost)
    assert changes(out) == [("a", "healthy", "depleted")]
    assert pool.statistics().keys[0].until is None


def test_recorded_spend_in_the_running_window_counts_toward_the_budget() -> None:
    # After a restart: 0.8 spent at t=-50 (before this process) in a 100 s window.
    pool = make_pool(
        specs=[KeySpec(key_id="a", budget=1.0, budget_window=100.0), KeySpec(key_id="b")]
    )
    out = pool.handle(SpendRecorded(key_id="a", now=0.0, cost=0.8, at=-50.0, prompt_tokens=7))
    assert changes(out) == []
    assert pool.statistics().keys[0].spend == pytest.approx(0.8)
    assert pool.statistics().keys[0].prompt_tokens == 7
    start(pool, "r1", 1.0, pin="a")
    respond(pool, "r1", 1.0, 200)
    out = finish(pool, "r1", 2.0, cost=0.3)
    assert changes(out) == [("a", "healthy", "depleted")]
    # The window opened by the recorded spend ends at -50 + 100.
    assert pool.statistics().keys[0].until == pytest.approx(50.0)


def test_recorded_spend_from_an_ended_window_counts_only_toward_lifetime_spend() -> None:
    pool = make_pool(
        specs=[
            KeySpec(key_id="a", budget=1.0, budget_window=100.0),
            KeySpec(key_id="b", budget=1.0),
            KeySpec(key_id="c", credits=2.0),
        ]
    )
    assert pool.handle(SpendRecorded(key_id="a", now=500.0, cost=5.0, at=0.0)) == []
    assert pool.state_of("a") is KeyState.HEALTHY
    assert pool.statistics().keys[0].spend == pytest.approx(5.0)
    out = pool.handle(SpendRecorded(key_id="b", now=500.0, cost=1.0, at=0.0))
    assert changes(out) == [("b", "healthy", "depleted")]  # lifetime budget: for good
    assert pool.statistics().keys[1].until is None
    pool.handle(SpendRecorded(key_id="c", now=500.0, cost=1.5))
    out = pool.handle(SpendRecorded(key_id="c", now=501.0, cost=0.5))
    assert changes(out) == [("c", "healthy", "depleted")]


def test_recorded_spend_rejects_bad_values_and_unknown_keys() -> None:
    pool = make_pool("a")
    before = json.dumps(pool.snapshot())
    for event in (
        SpendRecorded(key_id="a", now=0.0, cost=-1.0),
        SpendRecorded(key_id="a", now=0.0, cost=float("nan")),
        SpendRecorded(key_id="a", now=0.0, cost=1.0, at=float("-inf")),
        SpendRecorded(key_id="zz", now=0.0, cost=1.0),
    ):
        with pytest.raises(PoolError):
            pool.handle(event)
    assert json.dumps(pool.snapshot()) == before


def test_tpm_estimate_is_corrected_by_the_real_count() -> None:
    pool = make_pool(specs=[KeySpec(key_id="a", tpm=600)], queue_timeout=1000.0)
    start(pool, "r1", 0.0, tokens=6000)  # estimate: 10 minutes of tokens
    assert start(pool, "r2", 0.0) == []  # paced
    respond(pool, "r1", 1.0, 200)
    out = finish(pool, "r1", 1.0, prompt_tokens=50, completion_tokens=10)  # only 6 s worth
    assert only(out, Send).request_id == "r2"


def test_snapshot_keeps_pacing_timers() -> None:
    pool = make_pool(specs=[KeySpec(key_id="a", rpm=30)])
    start(pool, "r1", 0.0)
    start(pool, "r2", 0.0)
    restored = Pool.restore(json.loads(json.dumps(pool.snapshot())))
    assert restored.next_deadline() == pool.next_deadline() == pytest.approx(2.0)
    assert restored.handle(Tick(now=2.0)) == pool.handle(Tick(now=2.0))


def test_a_200_reported_inside_a_stream_changes_nothing() -> None:
    pool = make_pool("a")
    start(pool, "r1", 0.0)
    respond(pool, "r1", 0.0, 200)
    assert finish(pool, "r1", 0.1, error_status=200) == []


def test_the_pool_keeps_no_event_but_request_started_so_drivers_may_reuse_them() -> None:
    import gc
    import weakref

    pool = make_pool("a", "b")
    start(pool, "r1", 0.0)
    start(pool, "r2", 0.0)
    events = [
        ResponseReceived(request_id="r1", now=0.1, status=429, retry_after=5.0),  # fails over
        ResponseReceived(request_id="r1", now=0.2, status=200),
        ResponseFinished(request_id="r1", now=0.3, cost=0.1, prompt_tokens=3),
        TransportFailed(request_id="r2", now=0.3, reason="reset"),
        RequestCancelled(request_id="r2", now=0.4),
        Tick(now=6.0),
        SpendRecorded(key_id="a", now=6.0, cost=0.1),
    ]
    refs = [weakref.ref(event) for event in events]
    for event in events:
        pool.handle(event)
    del events, event
    gc.collect()
    assert [ref() for ref in refs] == [None] * len(refs)


def test_a_restored_latency_pool_picks_like_the_original_mid_response() -> None:
    """Found by the stateful property test: a 2xx updates the key's latency
    EWMA before its body ends; the heap entry must be refiled then, or a pool
    restored in between (its heap rebuilt from the fields) picks differently."""
    specs = [KeySpec(key_id=k) for k in ("k0", "k1", "n3", "n4", "n5")]
    config = PoolConfig(keys=specs, policy="latency", max_attempts=2, min_healthy=0)
    pool, twin = Pool(config), Pool(config)

    def feed(event: Any) -> list[Any]:
        out = pool.handle(event)
        assert twin.handle(event) == out
        return out

    def restore() -> Pool:
        restored = Pool.restore(json.loads(json.dumps(pool.snapshot())))
        assert restored.snapshot() == twin.snapshot()
        return restored

    assert sends(feed(RequestStarted(request_id="r1", now=0.0)))[0].key_id == "k0"
    feed(KeyMarked(now=0.0, key_id="k0", state=KeyState.DEPLETED, reason="operator"))
    feed(ResponseReceived(request_id="r1", now=0.3, status=200))  # the body still runs
    feed(RequestStarted(request_id="r2", now=0.3))
    pool = restore()
    feed(ResponseReceived(request_id="r2", now=0.3, status=401))
    for request_id in ("r3", "r4", "r5"):
        feed(RequestStarted(request_id=request_id, now=0.3))
    pool = restore()


def test_a_held_attempt_goes_to_another_key_and_does_not_count() -> None:
    pool = make_pool("a", "b", max_attempts=1)
    first = only(pool.handle(RequestStarted(request_id="r", now=0.0)), Send)
    out = pool.handle(AttemptHeld(request_id="r", now=0.0, until=5.0))
    again = only(out, Send)
    assert (first.key_id, again.key_id, again.attempt) == ("a", "b", 1)
    # The held key stays out until 5 s, then takes requests again.
    assert only(pool.handle(RequestStarted(request_id="s", now=1.0)), Send).key_id == "b"
    assert only(pool.handle(RequestStarted(request_id="t", now=5.0)), Send).key_id == "a"
    assert pool.statistics().keys[0].requests == 1  # the held attempt is not counted


def test_a_held_request_waits_for_its_only_key_and_bad_holds_are_refused() -> None:
    pool = make_pool("a")
    pool.handle(RequestStarted(request_id="r", now=0.0))
    assert sends(pool.handle(AttemptHeld(request_id="r", now=0.0, until=2.0))) == []
    assert pool.next_deadline() == 2.0
    assert only(pool.handle(Tick(now=2.0)), Send).key_id == "a"
    with pytest.raises(PoolError, match="until must lie after now"):
        pool.handle(AttemptHeld(request_id="r", now=2.0, until=2.0))
    pool.handle(ResponseReceived(request_id="r", now=2.1, status=200))
    with pytest.raises(PoolError, match="does not fit"):
        pool.handle(AttemptHeld(request_id="r", now=2.2, until=3.0))
