"""Free-model quotas per account: never over a limit, never idle while one has room."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyrotor.models.free_tier import FREE_PER_DAY, FREE_PER_DAY_WITH_CREDITS, FreeTier

MIDNIGHT = 1_767_225_600.0  # 2026-01-01 00:00 UTC


@settings(max_examples=200, deadline=None)
@given(
    per_day=st.lists(st.sampled_from([0, 1, 3, 7, 50]), min_size=1, max_size=5),
    per_minute=st.integers(1, 4),
    gaps=st.lists(st.floats(0, 40), min_size=1, max_size=300),
    start=st.floats(0, 86_000),
)
def test_no_account_goes_over_a_limit_and_no_request_waits_while_one_has_room(
    per_day: list[int], per_minute: int, gaps: list[float], start: float
) -> None:
    accounts = {f"a{i}": n for i, n in enumerate(per_day)}
    tier = FreeTier(accounts, per_minute=per_minute, window=60.0)
    now = MIDNIGHT + start
    taken: list[tuple[str, float]] = []
    for gap in gaps:
        now += gap
        room = tier.wait(now) == 0.0
        account = tier.take(now)
        assert (account is not None) == room  # wait() and take() agree
        if account is not None:
            taken.append((account, now))
    for name, limit in accounts.items():
        times = [t for a, t in taken if a == name]
        days = Counter(int(t // 86400) for t in times)
        assert all(n <= limit for n in days.values())
        # any 60 s stretch (so every upstream minute window too) holds at most per_minute
        for i, t in enumerate(times):
            assert sum(1 for u in times[i:] if u < t + 60.0) <= per_minute


def test_accounts_add_up_keys_of_one_account_do_not_and_the_day_resets_at_midnight() -> None:
    tier = FreeTier({"team": FREE_PER_DAY_WITH_CREDITS, "alice": FREE_PER_DAY})
    now = MIDNIGHT + 3600
    used = Counter()
    for i in range(2000):
        account = tier.take(now + i * 3.1)  # under one account's pace
        if account is not None:
            used[account] += 1
    assert used == {"team": 1000, "alice": 50}
    skip = tier.skip(MIDNIGHT + 86_399)
    assert skip is not None and skip.reason == "free quota of every account spent until 00:00 UTC"
    assert skip.retry_after == pytest.approx(1.0)
    assert tier.take(MIDNIGHT + 86_400) in ("team", "alice")  # a new UTC day


def test_the_pace_and_a_restart() -> None:
    tier = FreeTier({"a": 50})
    for i in range(20):
        assert tier.take(MIDNIGHT + i * 0.1) == "a"
    skip = tier.skip(MIDNIGHT + 5)
    assert skip is not None and skip.reason.startswith("free-model pace of 20/min reached")
    assert skip.retry_after == pytest.approx(56.0)  # the first of the 20 leaves the 61 s window
    tier.give_back("a", MIDNIGHT + 5)  # never reached the upstream
    assert tier.status(MIDNIGHT + 5)["a"] == {
        "usedToday": 19, "perDay": 50, "lastMinute": 19, "perMinute": 20, "spentAt": None,
    }  # fmt: skip
    again = FreeTier({"a": 50, "b": 50})
    again.restore({"a": 49, "gone": 3}, MIDNIGHT + 10)
    assert [again.take(MIDNIGHT + 10) for _ in range(3)] == ["b", "b", "b"]  # a has 1 left
    assert FreeTier({"a": 0}).skip(MIDNIGHT) is not None
    two = FreeTier({"a": 2})
    two.take(MIDNIGHT + 5), two.take(MIDNIGHT + 6)
    assert two.status(MIDNIGHT + 7)["a"]["spentAt"] == MIDNIGHT + 6  # when the day ran out
    two.give_back("a", MIDNIGHT + 7)
    assert two.status(MIDNIGHT + 7)["a"]["spentAt"] is None
    two.take(MIDNIGHT + 8)
    assert two.status(MIDNIGHT + 86400)["a"]["spentAt"] is None  # a new day
    with pytest.raises(ValueError, match="daily limit must be >= 0"):
        FreeTier({"a": -1})


def test_a_slot_given_back_leaves_its_own_minute_and_day() -> None:
    # A request taken first whose model was down is given back after 19 others:
    # its own entry leaves the minute, so the 20th slot is not handed out early.
    tier = FreeTier({"a": 1000})
    first = MIDNIGHT + 3600
    assert tier.take(first) == "a"
    served = []
    for s in range(10, 29):
        assert tier.take(first + s) == "a"
        served.append(first + s)
    tier.give_back("a", first + 29, at=first)
    assert tier.take(first + 29) == "a"
    served.append(first + 29)
    t = first + 30
    while tier.take(t) is None:
        t += 0.5
    served.append(t)
    assert max(sum(1 for x in served if s <= x < s + 60) for s in served) <= 20
    assert tier.wait(first + 30, among=()) is None  # no account among none
    # A slot of yesterday given back today leaves today's count alone.
    day = FreeTier({"a": 50})
    day.take(MIDNIGHT - 1)
    for s in (1, 2, 3):
        day.take(MIDNIGHT + s)
    day.give_back("a", MIDNIGHT + 5, at=MIDNIGHT - 1)
    assert day.status(MIDNIGHT + 6)["a"]["usedToday"] == 3


def test_only_the_accounts_named_are_waited_for() -> None:
    tier = FreeTier({"full": 1, "open": 50})
    tier.take(MIDNIGHT + 10, ["full"])
    assert tier.wait(MIDNIGHT + 11) == 0.0  # "open" has room
    assert tier.wait(MIDNIGHT + 11, among={"full"}) == pytest.approx(86_400 - 11)
    skip = tier.skip(MIDNIGHT + 11, among={"full"})
    assert skip is not None and skip.reason == "free quota of account full spent until 00:00 UTC"
