"""Model cooldowns: longer for each failure in a row, capped, forgotten on success."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyrotor.models.cooling import ModelCooling


def test_failures_in_a_row_double_the_cooldown_up_to_the_cap() -> None:
    cooling = ModelCooling(60.0, cap=300.0)
    assert not cooling
    now, seen = 0.0, []
    for _ in range(5):
        seconds = cooling.fail("m", now, "answered 503")
        seen.append(seconds)
        assert "m" in cooling.skips(now + seconds - 1)
        now += seconds
        assert cooling.skips(now) == {}  # cooled exactly that long
    assert seen == [60.0, 120.0, 240.0, 300.0, 300.0]
    cooling.ok("m")
    assert cooling.fail("m", now, "answered 503") == 60.0  # a success forgot the streak


def test_retry_after_wins_and_a_shorter_failure_never_shortens_a_cooldown() -> None:
    cooling = ModelCooling(60.0)
    assert cooling.fail("m", 0.0, "busy", retry_after=7.0) == 7.0
    cooling.fail("n", 0.0, "down")
    assert cooling.fail("n", 0.0, "busy", retry_after=1.0) == 60.0
    skip = cooling.skips(30.0)["n"]
    assert skip.retry_after == 30.0 and skip.reason == "down; passed over for 30 s more"


@given(st.lists(st.tuples(st.sampled_from("abc"), st.booleans(), st.floats(0, 4000)), max_size=40))
def test_a_cooldown_is_between_base_and_cap(events: list[tuple[str, bool, float]]) -> None:
    cooling = ModelCooling(30.0, cap=600.0)
    now = 0.0
    for model, failed, step in events:
        now += step
        if failed:
            seconds = cooling.fail(model, now, "down")
            assert 30.0 <= seconds <= 600.0
            assert cooling.skips(now)[model].retry_after == pytest.approx(seconds)
        else:
            cooling.ok(model)
        assert all(0 < s.retry_after <= 600.0 for s in cooling.skips(now).values())  # type: ignore[operator]
