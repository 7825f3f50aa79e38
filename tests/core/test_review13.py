"""Review 13: a fault's retry hint holds the retry off its key; a 402 about the
account's balance skips the account's other keys."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyrotor.core import (
    Decision,
    Deliver,
    KeyMarked,
    KeyRemoved,
    KeySpec,
    KeyState,
    Pool,
    ProbeFinished,
    ProbeRequested,
    Reject,
    RequestStarted,
    ResponseFinished,
    ResponseReceived,
    Send,
    Tick,
)
from keyrotor.core.classify import Verdict, classify_response

from .helpers import make_pool, only, respond, sends, start

# --------------------------------------------- 1. a fault's Retry-After holds the retry


@pytest.mark.parametrize(
    "hint",
    [
        {"headers": {"Retry-After": "30"}},
        {"retry_after": 30.0},
        {"body": {"error": {"code": 503, "message": "busy", "availability": {"retry_after": 30}}}},
    ],
    ids=["header", "field", "body"],
)
def test_a_single_key_is_not_asked_again_before_its_retry_after(hint: dict[str, Any]) -> None:
    pool = make_pool("a")
    assert only(start(pool, "r1", 0.0, deadline=100.0), Send).attempt == 1
    out = respond(pool, "r1", 1.0, 503, **hint)
    assert out == []  # waits: no Send, no Deliver, no Reject
    assert pool.next_deadline() == 31.0
    assert pool.handle(Tick(now=30.9)) == []
    send = only(pool.handle(Tick(now=31.0)), Send)
    assert (send.key_id, send.attempt) == ("a", 2)


def test_a_retry_after_past_the_deadline_rejects_at_once_with_that_time() -> None:
    pool = make_pool("a")  # queue_timeout 30: the deadline is 30.0
    start(pool, "r1", 0.0)
    reject = only(respond(pool, "r1", 1.0, 503, headers={"Retry-After": "30"}), Reject)
    assert (reject.status, reject.retry_after) == (503, 30.0)
    assert pool.next_deadline() is None
    assert pool.statistics().in_flight == 0


def test_a_hold_that_ends_at_the_deadline_is_still_served() -> None:
    pool = make_pool("a")
    start(pool, "r1", 0.0, deadline=30.0)
    assert respond(pool, "r1", 1.0, 500, retry_after=29.0) == []
    assert only(pool.handle(Tick(now=30.0)), Send).key_id == "a"


def test_every_key_that_asked_to_wait_is_waited_for() -> None:
    pool = make_pool("a", "b")
    start(pool, "r1", 0.0, deadline=100.0)
    assert only(respond(pool, "r1", 1.0, 503, retry_after=30.0), Send).key_id == "b"
    assert respond(pool, "r1", 1.5, 503, retry_after=30.0) == []  # it went back to a at once
    assert pool.handle(Tick(now=30.9)) == []
    send = only(pool.handle(Tick(now=31.0)), Send)
    assert (send.key_id, send.attempt) == ("a", 3)


def test_a_held_request_does_not_hold_up_the_requests_behind_it() -> None:
    pool = make_pool("a", max_attempts=2)
    start(pool, "r1", 0.0, deadline=100.0)
    assert respond(pool, "r1", 1.0, 503, retry_after=30.0) == []
    assert only(start(pool, "r2", 2.0), Send).key_id == "a"  # the key is not blamed
    assert pool.state_of("a").value == "healthy"
    assert only(pool.handle(Tick(now=31.0)), Send).request_id == "r1"


def test_a_pinned_request_waits_for_its_key_hint() -> None:
    pool = make_pool("a", "b")
    start(pool, "r1", 0.0, pin="a", pin_fallback=False, deadline=100.0)
    assert respond(pool, "r1", 1.0, 502, retry_after=10.0) == []
    assert pool.next_deadline() == 11.0
    assert only(pool.handle(Tick(now=11.0)), Send).key_id == "a"


@pytest.mark.parametrize("hint", [None, 0.0])
def test_no_hint_or_a_zero_hint_retries_at_once(hint: float | None) -> None:
    pool = make_pool("a")
    start(pool, "r1", 0.0)
    assert only(respond(pool, "r1", 1.0, 503, retry_after=hint), Send).key_id == "a"


def test_a_restored_pool_keeps_the_hold() -> None:
    pool = make_pool("a")
    start(pool, "r1", 0.0, deadline=100.0)
    respond(pool, "r1", 1.0, 503, retry_after=30.0)
    copy = Pool.restore(pool.snapshot())
    assert copy.next_deadline() == 31.0
    assert copy.handle(Tick(now=20.0)) == []
    assert only(copy.handle(Tick(now=31.0)), Send).attempt == 2


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_no_attempt_goes_to_a_key_before_the_hint_it_gave_that_request(data: Any) -> None:
    """Random answers (2xx, faults with and without hints, 429s) on 1 to 3 keys:
    no request is sent again on a key before the wait that key's fault asked of
    it, and once the upstream answers 200 every request ends."""
    n = data.draw(st.integers(1, 3), label="keys")
    pool = make_pool(*[f"k{i}" for i in range(n)], max_attempts=data.draw(st.integers(1, 4)))
    holds: dict[tuple[str, str], float] = {}
    sent: dict[str, str] = {}
    ended: set[str] = set()
    now = 0.0

    def take(out: list[Decision], at: float) -> None:
        for d in out:
            if isinstance(d, Send):
                assert at >= holds.get((d.request_id, d.key_id), -math.inf), (d, holds)
                sent[d.request_id] = d.key_id
            elif isinstance(d, Deliver):
                sent.pop(d.request_id, None)
                take(pool.handle(ResponseFinished(request_id=d.request_id, now=at)), at)
                ended.add(d.request_id)
            elif isinstance(d, Reject):
                sent.pop(d.request_id, None)
                ended.add(d.request_id)

    def tick_until(at: float) -> None:
        due = pool.next_deadline()
        while due is not None and due <= at:
            take(pool.handle(Tick(now=due)), due)
            due = pool.next_deadline()

    started = 0
    for _ in range(data.draw(st.integers(1, 25), label="steps")):
        now += data.draw(st.sampled_from([0.0, 0.5, 3.0, 20.0]))
        tick_until(now)
        if not sent or data.draw(st.booleans(), label="start"):
            started += 1
            deadline = data.draw(st.sampled_from([None, now + 10.0, now + 100.0]))
            event = RequestStarted(request_id=f"r{started}", now=now, deadline=deadline)
            take(pool.handle(event), now)
            continue
        rid = data.draw(st.sampled_from(sorted(sent)))
        status = data.draw(st.sampled_from([200, 429, 500, 503]))
        hint = data.draw(st.sampled_from([None, 0.0, 5.0, 40.0]))
        held = (rid, sent.pop(rid))  # the answer ends that attempt
        if status >= 500 and hint:
            holds[held] = max(holds.get(held, -math.inf), now + hint)
        event = ResponseReceived(request_id=rid, now=now, status=status, retry_after=hint)
        take(pool.handle(event), now)
    for _ in range(200):  # the upstream heals: every request ends
        if sent:
            for rid in sorted(sent):
                take(pool.handle(ResponseReceived(request_id=rid, now=now, status=200)), now)
            continue
        due = pool.next_deadline()
        if due is None:
            break
        now = max(now, due)
        take(pool.handle(Tick(now=now)), now)
    assert not sent
    assert ended == {f"r{i}" for i in range(1, started + 1)}


# ------------------------------------ 2. a 402 about the account's balance, or the key's cap

BARE = (
    "This request requires more credits, or fewer max_tokens. You requested up to 16384 "
    "tokens, but can only afford 3512."
)
AFFORD = BARE + " To increase, visit "
BALANCE_SHORT = {  # QwenLM/qwen-code#73
    "error": {
        "code": 402,
        "message": AFFORD + "https://openrouter.ai/settings/credits and add more credits",
    }
}
KEY_CAP_SHORT = {  # anomalyco/opencode#12219
    "error": {
        "code": 402,
        "message": AFFORD + "https://openrouter.ai/settings/keys and create a key with a higher "
        "total limit",
    }
}
IN_FLIGHT_BUDGET = {
    "error": {
        "code": 402,
        "message": "This request's estimated cost exceeds your in-flight spending budget.",
        "metadata": {"reason": "weight_exceeds_budget", "limit_source": "openrouter_credits"},
    }
}


def _with_source(body: dict[str, Any], source: str) -> dict[str, Any]:
    error = dict(body["error"])
    error["metadata"] = {**error.get("metadata", {}), "limit_source": source}
    return {"error": error}


@pytest.mark.parametrize(
    ("body", "shared"),
    [
        (BALANCE_SHORT, True),
        (KEY_CAP_SHORT, False),
        (IN_FLIGHT_BUDGET, True),
        (_with_source(IN_FLIGHT_BUDGET, "openrouter_key_limit"), False),
        # limit_source decides over the page the message points to.
        (_with_source(BALANCE_SHORT, "openrouter_key_limit"), False),
        (_with_source(KEY_CAP_SHORT, "openrouter_credits"), True),
        # Nothing says whose: the account's other keys may still serve it.
        ({"error": {"code": 402, "message": BARE}}, False),
        (
            {
                "error": {
                    "code": 402,
                    "message": "More credits are required to run this request. 128000 token "
                    "capacity required, 19484 available. To increase, visit "
                    "https://openrouter.ai/settings/keys and create a key with a higher limit",
                }
            },
            False,
        ),
    ],
    ids=[
        "balance",
        "key-cap",
        "in-flight",
        "in-flight-key-limit",
        "source-key",
        "source-credits",
        "bare",
        "token-capacity",
    ],
)
def test_whose_budget_a_try_another_key_402_names(body: dict[str, Any], shared: bool) -> None:
    verdict = classify_response(402, {}, body)
    assert verdict.verdict is Verdict.TRY_ANOTHER_KEY
    assert verdict.shared_budget is shared
    assert not verdict.account_wide  # no key is parked


def _accounts(*pairs: tuple[str, str | None], **options: Any) -> Pool:
    return make_pool(specs=[KeySpec(key_id=k, account=a) for k, a in pairs], **options)


@pytest.mark.parametrize("body", [BALANCE_SHORT, IN_FLIGHT_BUDGET], ids=["balance", "in-flight"])
def test_the_accounts_balance_sends_the_retry_to_another_account(body: dict[str, Any]) -> None:
    pool = _accounts(("a1", "A"), ("a2", "A"), ("b1", "B"))
    assert only(start(pool, "r1", 0.0), Send).key_id == "a1"
    out = respond(pool, "r1", 1.0, 402, body=body)
    assert only(out, Send).key_id == "b1"
    assert {pool.state_of(k).value for k in ("a1", "a2", "b1")} == {"healthy"}


def test_the_accounts_balance_on_a_one_account_pool_is_delivered_at_once() -> None:
    pool = _accounts(("a1", "A"), ("a2", "A"), ("a3", "A"))
    start(pool, "r1", 0.0)
    out = respond(pool, "r1", 1.0, 402, body=BALANCE_SHORT)
    deliver = only(out, Deliver)
    assert (deliver.key_id, deliver.status) == ("a1", 402)
    assert sends(out) == []


def test_the_keys_own_cap_leaves_the_accounts_other_keys_to_try() -> None:
    pool = _accounts(("a1", "A"), ("a2", "A"), ("b1", "B"))
    start(pool, "r1", 0.0)
    assert only(respond(pool, "r1", 1.0, 402, body=KEY_CAP_SHORT), Send).key_id == "a2"


@settings(max_examples=150, deadline=None)
@given(
    accounts=st.lists(st.sampled_from(["A", "B", "C", None]), min_size=1, max_size=6),
    first=st.integers(0, 5),
)
def test_a_balance_402_tries_each_account_once(accounts: list[str | None], first: int) -> None:
    """Every key answers the account-balance 402: the request visits one key per
    account (a key without an account is its own) and then gets the 402."""
    pool = _accounts(*[(f"k{i}", a) for i, a in enumerate(accounts)], max_attempts=10)
    out = start(pool, "r1", 0.0, pin=first % len(accounts))
    account_of = dict(zip([f"k{i}" for i in range(len(accounts))], accounts, strict=True))
    seen: list[str] = []
    now = 0.0
    while (sent := sends(out)) != []:
        key = only(sent, Send).key_id
        seen.append(key)
        now += 1.0
        out = respond(pool, "r1", now, 402, body=BALANCE_SHORT)
    assert only(out, Deliver).status == 402
    named = [account_of[k] for k in seen if account_of[k] is not None]
    assert len(named) == len(set(named))  # no account asked twice
    groups = {a for a in accounts if a is not None} | {
        k for k, a in account_of.items() if a is None
    }
    assert len(seen) == len(groups)  # and every account asked once


# ------------------------- 3. every event serves the queue its time may have freed


def test_an_operators_probe_request_serves_a_request_its_time_freed_a_key_for() -> None:
    pool = make_pool("a", "b")
    start(pool, "r1", 0.0, deadline=100.0)
    start(pool, "r2", 0.0, deadline=100.0)
    respond(pool, "r1", 1.0, 429, headers={"Retry-After": "10"})  # r1 to b
    respond(pool, "r2", 1.0, 429, headers={"Retry-After": "10"})  # both cool: r2 waits
    out = pool.handle(ProbeRequested(now=12.0, key_id="b"))  # a's cooldown ended at 11
    assert [(s.request_id, s.key_id) for s in sends(out)] == [("r2", "a")]


def test_a_removed_keys_probe_ending_serves_a_request_its_time_freed_a_key_for() -> None:
    pool = make_pool("a", "b", "c")
    pool.handle(ProbeRequested(now=0.0, key_id="c"))
    pool.handle(KeyRemoved(now=0.0, key_id="c"))  # its probe still runs
    start(pool, "r1", 0.0, deadline=100.0)
    start(pool, "r2", 0.0, deadline=100.0)
    respond(pool, "r1", 1.0, 429, headers={"Retry-After": "10"})
    respond(pool, "r2", 1.0, 429, headers={"Retry-After": "10"})
    out = pool.handle(ProbeFinished(now=12.0, key_id="c", status=200))
    assert [(s.request_id, s.key_id) for s in sends(out)] == [("r2", "a")]


# ------------- 4. a request pinned without fallback waits only for its own key


def test_a_request_pinned_to_a_key_that_cannot_come_back_is_rejected_at_once() -> None:
    pool = make_pool("a", "b")
    pool.handle(KeyMarked(now=0.0, key_id="a", state=KeyState.DISABLED))
    out = start(pool, "r1", 1.0, pin="a", pin_fallback=False, deadline=100.0)
    reject = only(out, Reject)
    assert reject.retry_after is None
    assert pool.statistics().queued == 0


def test_a_pinned_key_resting_past_the_deadline_rejects_with_its_return() -> None:
    pool = make_pool("a", "b")
    only(start(pool, "r0", 0.0, pin="a"), Send)
    respond(pool, "r0", 1.0, 429, headers={"Retry-After": "60"})  # a rests until 61; r0 to b
    reject = only(start(pool, "r1", 2.0, pin="a", pin_fallback=False, deadline=30.0), Reject)
    assert reject.retry_after == 59.0
    assert start(pool, "r2", 2.0, pin="a", pin_fallback=False, deadline=90.0) == []  # waits
    assert [(s.request_id, s.key_id) for s in sends(pool.handle(Tick(now=61.0)))] == [("r2", "a")]
