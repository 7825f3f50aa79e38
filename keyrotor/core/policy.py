"""What each thing that can happen means for the key it happened on: the policy tables.

``classify`` turns an upstream answer into a :class:`~keyrotor.core.classify.Verdict`;
:data:`VERDICTS` says what that verdict does to the key and the request: the
error class it counts as, the signal it sends through ``states.TRANSITIONS``,
how the key's ``until`` is set, whether a whole account is cooled, whether the
request fails over, what is probed, and whether it closes a half-open trial.
:data:`FAILURES` does the same for attempts that got no answer
(``TransportFailed`` reasons); ``states.STATES`` says what each key state
implies (taking traffic, cooling until a time, probes). The pool's judge reads these
tables; the only other rule that moves a key is the error window (``_fault``).
``docs/state-machine.md`` shows them, rendered by :func:`markdown_tables`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

import attrs

from ._records import REQUEST_LIFECYCLE, describe_state
from .classify import Verdict
from .states import STATES, Signal

__all__ = [
    "FAILURES",
    "REASON_DEFAULTS",
    "VERDICTS",
    "Cooldown",
    "FailureRule",
    "VerdictRule",
    "failure_rule",
    "markdown_tables",
]


class Cooldown(enum.Enum):
    """How a verdict sets the key's ``until``."""

    NONE = "none"
    """No time: the state lasts until a probe, an operator or a budget window says otherwise."""
    SIGNAL = "signal"
    """Only when the upstream gave a time (an exhausted bucket on a 2xx): rate-limited
    until then, and no probe ends it early (hard)."""
    SIGNAL_OR_DEFAULT = "signal or default"
    """The upstream's time as a hard floor; without one, the pool's default (a
    probe may end a default early). A later, shorter signal never shortens it."""
    WINDOW = "error window"
    """No cooldown by itself: counted in the key's error window, which degrades a
    key that alone keeps failing (``degraded_cooldown``)."""


@attrs.frozen
class VerdictRule:
    """What one verdict means for its key and its request."""

    counts_as: str | None
    """The error class counted on the key (``statistics``); None for a success."""
    signal: Signal | None
    """Sent to the key through the transition table; None: its state stays."""
    cooldown: Cooldown
    default: str | None = None
    """The ``PoolConfig`` field of the default cooldown (``SIGNAL_OR_DEFAULT``)."""
    account_wide: bool = False
    """Cools every key of the account when ``classify`` says the limit is the account's."""
    fails_over: bool = False
    """The request is retried on another key (within ``max_attempts``)."""
    hint_holds: bool = False
    """The answer's retry hint (``Retry-After``) holds the request off this key until
    then: it is retried on another key, or waits in the queue within its deadline,
    and is rejected with that time when its deadline comes first. The key itself
    is not cooled (other requests still use it)."""
    confirm_probe: bool = False
    """A key newly moved by it is probed at once to confirm (OpenRouter's false 401s)."""
    passes_trial: bool = False
    """A recovering key that gets this answer passed its trial: it authenticated."""
    from_probe: bool = False
    """The same verdict on a probe's answer is applied too."""


_V = Verdict
VERDICTS: Final[Mapping[Verdict, VerdictRule]] = {
    _V.SUCCESS: VerdictRule(
        None, Signal.SUCCESS, Cooldown.SIGNAL, account_wide=True, passes_trial=True
    ),
    _V.CALLER_ERROR: VerdictRule("caller_error", None, Cooldown.NONE, passes_trial=True),
    _V.UPSTREAM_BUSY: VerdictRule("upstream_busy", None, Cooldown.NONE, passes_trial=True),
    _V.RATE_LIMITED: VerdictRule(
        "rate_limited",
        Signal.RATE_LIMITED,
        Cooldown.SIGNAL_OR_DEFAULT,
        default="rate_limit_cooldown",
        account_wide=True,
        fails_over=True,
        from_probe=True,
    ),
    _V.DEPLETED: VerdictRule(
        "depleted",
        Signal.DEPLETED,
        Cooldown.NONE,
        account_wide=True,
        fails_over=True,
        from_probe=True,
    ),
    _V.INVALID: VerdictRule(
        "invalid",
        Signal.INVALID,
        Cooldown.NONE,
        fails_over=True,
        confirm_probe=True,
        from_probe=True,
    ),
    _V.UPSTREAM_FAULT: VerdictRule(
        "upstream_fault", Signal.UPSTREAM_FAULT, Cooldown.WINDOW, fails_over=True, hint_holds=True
    ),
    _V.TRY_ANOTHER_KEY: VerdictRule("try_another_key", None, Cooldown.NONE, fails_over=True),
    _V.MODEL_UNAVAILABLE: VerdictRule("model_unavailable", None, Cooldown.NONE, passes_trial=True),
}
"""Verdict -> what it means. Every verdict has a row."""

REASON_DEFAULTS: Final[tuple[tuple[str, str], ...]] = (("in_flight", "in_flight_budget_cooldown"),)
"""A ``SIGNAL_OR_DEFAULT`` verdict whose reason holds the first text takes the
second ``PoolConfig`` field as its default: OpenRouter's in-flight budget 402
is a short rest, not a rate limit's."""


@attrs.frozen
class FailureRule:
    """What an attempt that got no answer means for its key."""

    blamed: bool
    """Counted as a ``transport`` error and an upstream fault in the key's window."""
    strike: bool = False
    """A strike against a key that hangs while others answer (``timeout_strikes``)."""


FAILURES: Final[Mapping[str, FailureRule]] = {
    "timeout": FailureRule(blamed=True, strike=True),
    "connect": FailureRule(blamed=True),
    "reset": FailureRule(blamed=True),
    "protocol": FailureRule(blamed=True),
    "busy": FailureRule(blamed=False),  # the key's own connection share stayed full
    "pool": FailureRule(blamed=False),  # no connection slot came free at all
    "key_removed": FailureRule(blamed=False),  # removed between the choice and the send
}
"""``TransportFailed.reason`` -> what it means; every failure fails the request
over. Reasons not listed are blamed, like ``reset``."""

_BLAMED: Final = FailureRule(blamed=True)


def failure_rule(reason: str) -> FailureRule:
    """The rule of a ``TransportFailed`` reason (unknown reasons are blamed)."""
    return FAILURES.get(reason, _BLAMED)


def _yes(flag: bool) -> str:
    return "yes" if flag else ""


def markdown_tables() -> str:
    """The tables as Markdown, for ``docs/state-machine.md``."""
    lines = [
        "| verdict | counts as | signal | cooldown | account-wide | fails over "
        "| hint holds the retry | probe | passes a trial | from a probe |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for verdict, rule in VERDICTS.items():
        cooldown = rule.cooldown.value
        if rule.default is not None:
            cooldown += f" (`{rule.default}`)"
        lines.append(
            f"| `{verdict.value}` | {rule.counts_as or ''} | "
            f"{rule.signal.value if rule.signal else ''} | {cooldown} | "
            f"{_yes(rule.account_wide)} | {_yes(rule.fails_over)} | {_yes(rule.hint_holds)} | "
            f"{'confirm' if rule.confirm_probe else ''} | {_yes(rule.passes_trial)} | "
            f"{_yes(rule.from_probe)} |"
        )
    lines += [
        "",
        "| no answer (`TransportFailed.reason`) | blamed on the key | strike |",
        "|---|---|---|",
    ]
    for reason, failure in FAILURES.items():
        lines.append(f"| `{reason}` | {_yes(failure.blamed)} | {_yes(failure.strike)} |")
    lines += [
        "",
        "| state | usable | cools until a time | probed when short | rechecked |",
        "|---|---|---|---|---|",
    ]
    for state, implies in STATES.items():
        lines.append(
            f"| `{state.value}` | {_yes(implies.usable)} | {_yes(implies.cools)} | "
            f"{_yes(implies.probed_when_short)} | {_yes(implies.rechecked)} |"
        )
    lines += ["", "| request event | meets a request that is | which then is |", "|---|---|---|"]
    for event, moves in REQUEST_LIFECYCLE.items():
        for met, outcome in moves.items():
            lines.append(f"| `{event.__name__}` | {describe_state(met)} | {outcome} |")
    return "\n".join(lines) + "\n"
