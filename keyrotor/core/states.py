"""Key health: the states, the signals that move a key between them, and the table.

Every transition a key can make is one row of :data:`TRANSITIONS`; nothing else
in the package changes a key's state.  The diagram in ``docs/state-machine.md``
is generated from this table by :func:`mermaid_diagram`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

import attrs

__all__ = [
    "COOLING_STATES",
    "PROBED_WHEN_SHORT",
    "RECHECKED_STATES",
    "STATES",
    "TRANSITIONS",
    "USABLE_STATES",
    "KeyState",
    "Signal",
    "StateRule",
    "next_state",
]


class KeyState(enum.Enum):
    """Health of one key. Values are the names used in status JSON."""

    HEALTHY = "healthy"
    """Takes full traffic."""
    RATE_LIMITED = "rate_limited"
    """Cooling down until a time (Retry-After, a reset header, or the default)."""
    DEGRADED = "degraded"
    """Too many upstream faults on this key alone; cooling down until a time."""
    DEPLETED = "depleted"
    """No credits, or its spend budget is used up (until the budget window ends)."""
    FAILED = "failed"
    """Invalid or revoked (401); confirmed by a probe, left only by a probe or operator."""
    DISABLED = "disabled"
    """Switched off by an operator; only an operator switches it back on."""
    RECOVERING = "recovering"
    """Half-open: after a cooldown or a good probe, one trial request at a time."""


class Signal(enum.Enum):
    """What happened to a key: the inputs of the transition table."""

    SUCCESS = "success"
    """A 2xx response on this key."""
    UPSTREAM_FAULT = "upstream_fault"
    """A 5xx, timeout or reset: counted in the error window, no state change by itself."""
    ERROR_RATE = "error_rate"
    """The error window tripped: this key alone keeps failing."""
    RATE_LIMITED = "rate_limited"
    """A 429 (or OpenRouter's temporary in-flight-budget 402) blamed on the key or account."""
    DEPLETED = "depleted"
    """Out of credits or quota, or the key's spend budget is used up."""
    INVALID = "invalid"
    """The upstream rejected the key itself (401, Gemini's API_KEY_INVALID)."""
    COOLDOWN_ENDED = "cooldown_ended"
    """The state's ``until`` time has come."""
    PROBE_OK = "probe_ok"
    """A probe of the key succeeded."""
    MARK_HEALTHY = "mark_healthy"
    """Operator: the key is good again (after a refund, a fix, a manual check)."""
    MARK_DISABLED = "mark_disabled"
    """Operator: switch the key off."""
    MARK_RATE_LIMITED = "mark_rate_limited"
    """Operator: rest the key until a given time."""
    MARK_DEGRADED = "mark_degraded"
    """Operator: treat the key as degraded until a given time."""
    MARK_DEPLETED = "mark_depleted"
    """Operator: the key has no credits."""
    MARK_FAILED = "mark_failed"
    """Operator: the key is invalid."""


@attrs.frozen
class StateRule:
    """What a key in one state implies."""

    usable: bool
    """It may be chosen for a request."""
    cools: bool
    """An ``until`` time ends it (``cooldown_ended``), when it has one."""
    probed_when_short: bool
    """Probed when fewer than ``min_healthy`` keys are usable (unless its time came
    from the upstream)."""
    rechecked: bool
    """Probed every ``recheck_interval``."""


STATES: Final[Mapping[KeyState, StateRule]] = {
    KeyState.HEALTHY: StateRule(usable=True, cools=False, probed_when_short=False, rechecked=False),
    KeyState.RATE_LIMITED: StateRule(
        usable=False, cools=True, probed_when_short=True, rechecked=False
    ),
    KeyState.DEGRADED: StateRule(usable=False, cools=True, probed_when_short=True, rechecked=False),
    KeyState.DEPLETED: StateRule(usable=False, cools=True, probed_when_short=True, rechecked=True),
    KeyState.FAILED: StateRule(usable=False, cools=False, probed_when_short=True, rechecked=True),
    KeyState.DISABLED: StateRule(
        usable=False, cools=False, probed_when_short=False, rechecked=False
    ),
    KeyState.RECOVERING: StateRule(
        usable=True, cools=False, probed_when_short=False, rechecked=False
    ),
}
"""Key state -> what it implies. Every state has a row."""


USABLE_STATES = frozenset(state for state, rule in STATES.items() if rule.usable)
"""States in which a key may be chosen for a request."""
COOLING_STATES = frozenset(state for state, rule in STATES.items() if rule.cools)
"""States an ``until`` time ends (``cooldown_ended``)."""
PROBED_WHEN_SHORT = frozenset(state for state, rule in STATES.items() if rule.probed_when_short)
"""States probed when fewer than ``min_healthy`` keys are usable."""
RECHECKED_STATES = frozenset(state for state, rule in STATES.items() if rule.rechecked)
"""States probed every ``recheck_interval``."""

_H, _RL, _DG, _DP, _F, _D, _R = (
    KeyState.HEALTHY,
    KeyState.RATE_LIMITED,
    KeyState.DEGRADED,
    KeyState.DEPLETED,
    KeyState.FAILED,
    KeyState.DISABLED,
    KeyState.RECOVERING,
)
_ALL = (_H, _RL, _DG, _DP, _F, _D, _R)


def _row(signal: Signal, **targets: KeyState) -> dict[tuple[KeyState, Signal], KeyState]:
    """One signal's column: ``targets`` maps state names to next states; others stay."""
    return {(s, signal): targets.get(s.name, s) for s in _ALL}


TRANSITIONS: dict[tuple[KeyState, Signal], KeyState] = {
    # A success closes a half-open trial. In other states it is the late answer
    # to a request sent before the key cooled, and changes nothing: a cooldown
    # is a floor that a late success does not shorten.
    **_row(Signal.SUCCESS, RECOVERING=_H),
    **_row(Signal.UPSTREAM_FAULT),
    **_row(Signal.ERROR_RATE, HEALTHY=_DG, RECOVERING=_DG),
    **_row(Signal.RATE_LIMITED, HEALTHY=_RL, RECOVERING=_RL, DEGRADED=_RL),
    **_row(Signal.DEPLETED, HEALTHY=_DP, RECOVERING=_DP, RATE_LIMITED=_DP, DEGRADED=_DP),
    **_row(
        Signal.INVALID,
        HEALTHY=_F,
        RECOVERING=_F,
        RATE_LIMITED=_F,
        DEGRADED=_F,
        DEPLETED=_F,
    ),
    **_row(Signal.COOLDOWN_ENDED, RATE_LIMITED=_R, DEGRADED=_R, DEPLETED=_R),
    **_row(Signal.PROBE_OK, RATE_LIMITED=_R, DEGRADED=_R, DEPLETED=_R, FAILED=_R),
    # An operator's word is final: each mark sets its state from any state.
    **_row(Signal.MARK_HEALTHY, **{s.name: _H for s in _ALL}),
    **_row(Signal.MARK_DISABLED, **{s.name: _D for s in _ALL}),
    **_row(Signal.MARK_RATE_LIMITED, **{s.name: _RL for s in _ALL}),
    **_row(Signal.MARK_DEGRADED, **{s.name: _DG for s in _ALL}),
    **_row(Signal.MARK_DEPLETED, **{s.name: _DP for s in _ALL}),
    **_row(Signal.MARK_FAILED, **{s.name: _F for s in _ALL}),
}
"""(state, signal) -> next state, for every pair. Self-loops mean "no change"."""


def next_state(state: KeyState, signal: Signal) -> KeyState:
    """Look up the table: the state a key in ``state`` moves to on ``signal``."""
    return TRANSITIONS[(state, signal)]


def mermaid_diagram() -> str:
    """The state diagram (Mermaid) of every automatic transition in the table.

    Operator marks (``MARK_*``) are left out: they set any state from any state.
    """
    edges: dict[tuple[KeyState, KeyState], list[str]] = {}
    for (old, signal), new in TRANSITIONS.items():
        if old is not new and not signal.name.startswith("MARK_"):
            edges.setdefault((old, new), []).append(signal.value)
    lines = ["stateDiagram-v2", "    [*] --> healthy"]
    for (old, new), signals in edges.items():
        lines.append(f"    {old.value} --> {new.value}: {', '.join(signals)}")
    return "\n".join(lines) + "\n"
