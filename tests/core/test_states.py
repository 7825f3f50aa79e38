"""The transition table, tested without a pool (h11's test_state.py style)."""

from __future__ import annotations

import pathlib

import pytest

from keyrotor.core import TRANSITIONS, USABLE_STATES, KeyState, Signal, next_state
from keyrotor.core.states import mermaid_diagram

H, RL, DG, DP, F, D, R = (
    KeyState.HEALTHY,
    KeyState.RATE_LIMITED,
    KeyState.DEGRADED,
    KeyState.DEPLETED,
    KeyState.FAILED,
    KeyState.DISABLED,
    KeyState.RECOVERING,
)

# Every (state, signal) pair, written out by hand: the table must match it.
EXPECTED = {
    Signal.SUCCESS: {H: H, RL: RL, DG: DG, DP: DP, F: F, D: D, R: H},
    Signal.UPSTREAM_FAULT: {H: H, RL: RL, DG: DG, DP: DP, F: F, D: D, R: R},
    Signal.ERROR_RATE: {H: DG, RL: RL, DG: DG, DP: DP, F: F, D: D, R: DG},
    Signal.RATE_LIMITED: {H: RL, RL: RL, DG: RL, DP: DP, F: F, D: D, R: RL},
    Signal.DEPLETED: {H: DP, RL: DP, DG: DP, DP: DP, F: F, D: D, R: DP},
    Signal.INVALID: {H: F, RL: F, DG: F, DP: F, F: F, D: D, R: F},
    Signal.COOLDOWN_ENDED: {H: H, RL: R, DG: R, DP: R, F: F, D: D, R: R},
    Signal.PROBE_OK: {H: H, RL: R, DG: R, DP: R, F: R, D: D, R: R},
    Signal.MARK_HEALTHY: dict.fromkeys(KeyState, H),
    Signal.MARK_DISABLED: dict.fromkeys(KeyState, D),
    Signal.MARK_RATE_LIMITED: dict.fromkeys(KeyState, RL),
    Signal.MARK_DEGRADED: dict.fromkeys(KeyState, DG),
    Signal.MARK_DEPLETED: dict.fromkeys(KeyState, DP),
    Signal.MARK_FAILED: dict.fromkeys(KeyState, F),
}


@pytest.mark.parametrize("state", list(KeyState))
@pytest.mark.parametrize("signal", list(Signal))
def test_every_pair(state: KeyState, signal: Signal) -> None:
    assert next_state(state, signal) is EXPECTED[signal][state]


def test_table_is_complete_and_nothing_more() -> None:
    assert set(TRANSITIONS) == {(s, g) for s in KeyState for g in Signal}


def test_only_an_operator_leaves_disabled() -> None:
    for signal in Signal:
        if not signal.name.startswith("MARK_"):
            assert next_state(D, signal) is D


def test_failed_and_depleted_leave_only_by_probe_or_operator_or_budget_window() -> None:
    for signal in Signal:
        if signal.name.startswith("MARK_") or signal is Signal.PROBE_OK:
            continue
        assert next_state(F, signal) is F
        if signal is not Signal.COOLDOWN_ENDED:  # a spend budget's window ends
            assert next_state(DP, signal) in (DP, F)


def test_usable_states() -> None:
    assert {H, R} == USABLE_STATES


def test_status_json_names_are_the_seed_names() -> None:
    assert {s.value for s in KeyState} >= {
        "healthy",
        "rate_limited",
        "degraded",
        "depleted",
        "failed",
        "disabled",
    }


def test_docs_diagram_is_generated_from_the_table() -> None:
    doc = pathlib.Path(__file__).parents[2] / "docs" / "state-machine.md"
    text = doc.read_text(encoding="utf-8")
    assert mermaid_diagram() in text, (
        "docs/state-machine.md is stale: regenerate the diagram with "
        "`python -m keyrotor.core.states` and paste it into the mermaid block"
    )


def test_the_policy_tables_cover_everything_and_are_in_the_docs() -> None:
    from keyrotor.core.classify import Verdict
    from keyrotor.core.policy import FAILURES, VERDICTS, failure_rule, markdown_tables
    from keyrotor.core.states import STATES, KeyState

    assert set(VERDICTS) == set(Verdict)
    assert set(STATES) == set(KeyState)
    assert failure_rule("something new").blamed  # unknown reasons are blamed
    assert {r for r, rule in FAILURES.items() if not rule.blamed} == {"busy", "pool", "key_removed"}
    doc = pathlib.Path(__file__).parents[2] / "docs" / "state-machine.md"
    assert markdown_tables() in doc.read_text(encoding="utf-8"), (
        "docs/state-machine.md is stale: regenerate its policy tables with markdown_tables()"
    )
