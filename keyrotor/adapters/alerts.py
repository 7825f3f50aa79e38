"""Alerts: thresholds over the pool's spend, errors, keys and free quotas.

A ``Rule`` names what to watch (``kind``), over which ``scope`` (every key,
client token, model or account, or one ``subject``), and a ``threshold``:

- ``spend``: USD spent today (UTC) in total or per key / client / model;
  fires over the threshold;
- ``error_share``: errors / answers in the last ``window`` seconds, per key or
  model; fires over the threshold (0..1), with at least ``min_requests`` answers;
  clears under it, after a whole window without answers, or when the key is
  no longer in the pool;
- ``budget``: % of a ``[[budgets]]`` window's limit spent, per client or
  model budget; fires over the threshold;
- ``usable_keys``: keys that can take traffic; fires under the threshold;
- ``free_quota``: % of an account's free-model day left; fires under it;
- ``key_failed``: a key is ``failed`` (revoked) or ``depleted``; fires while it is.

``AlertBook.evaluate`` compares an ``Observed`` snapshot with the rules and
returns the alerts that changed: each (rule, subject) fires once when its
threshold is crossed and clears once when it is back. Pure: the snapshot and
``now`` come in (docs/analytics.md).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from ..core.config import finite

__all__ = [
    "KINDS",
    "RULE_FIELDS",
    "Alert",
    "AlertBook",
    "Observed",
    "Rule",
    "rule_from_json",
    "rule_to_json",
]

KINDS: Mapping[str, tuple[str, ...]] = {
    "spend": ("total", "key", "client", "model"),
    "budget": ("client", "model"),
    "error_share": ("key", "model"),
    "usable_keys": ("total",),
    "free_quota": ("account",),
    "key_failed": ("key",),
}
"""Each kind and the scopes it may watch (the first is its default)."""
RULE_FIELDS = ("name", "kind", "threshold", "scope", "subject", "window", "min_requests")
"""The fields of a rule (a ``[[alerts]]`` table, an admin request's JSON)."""
_BAD_STATES = ("failed", "depleted")
RECENT = 50
"""Cleared alerts kept for ``/alerts`` and the dashboard."""


@attrs.frozen
class Rule:
    """One alert rule (see the module's table)."""

    name: str
    kind: str
    threshold: float = 0.0
    scope: str = ""
    subject: str | None = None
    window: float = 300.0  # error_share: seconds of answers looked at
    min_requests: int = 10  # error_share: fewer answers say nothing


def rule_from_json(data: Any) -> Rule:
    """A ``Rule`` from a config table or an admin request's JSON; ``ValueError``
    naming the field and the fix."""
    if not isinstance(data, dict):
        raise ValueError(f"an alert rule is a table/object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(RULE_FIELDS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}; the fields are {', '.join(RULE_FIELDS)}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 100:
        raise ValueError('name must be a non-empty string (at most 100 characters), e.g. "spend"')
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    scope = data.get("scope", KINDS[kind][0])
    if scope not in KINDS[kind]:
        raise ValueError(f"a {kind} rule's scope is one of {', '.join(KINDS[kind])}, got {scope!r}")
    threshold = data.get("threshold", 0.0 if kind == "key_failed" else None)
    if not finite(threshold):  # a number, not a bool, not 1e999 (JSON's infinity)
        raise ValueError(f"threshold must be a number ({_UNITS[kind]}), finite")
    if threshold < 0 or (kind == "error_share" and threshold > 1):
        raise ValueError(f"threshold {threshold} is out of range ({_UNITS[kind]})")
    subject = data.get("subject")
    if subject is not None and (not isinstance(subject, str) or not subject):
        raise ValueError("subject must be a non-empty string (one key, client, model or account)")
    window = data.get("window", 300.0)
    if not finite(window):
        raise ValueError("window must be a finite number of seconds above 0")
    if not window > 0:
        raise ValueError("window must be a number of seconds above 0")
    least = data.get("min_requests", 10)
    if isinstance(least, bool) or not isinstance(least, int) or least < 1:
        raise ValueError("min_requests must be an integer of at least 1")
    return Rule(name, kind, float(threshold), scope, subject, float(window), least)


_UNITS = {
    "spend": "USD a day",
    "budget": "a percentage of the budget spent, 0 to 100 or more",
    "error_share": "a share from 0 to 1",
    "usable_keys": "a number of keys",
    "free_quota": "a percentage left, 0 to 100",
    "key_failed": "not used",
}


def rule_to_json(rule: Rule) -> dict[str, Any]:
    out = attrs.asdict(rule)
    if rule.kind != "error_share":
        del out["window"], out["min_requests"]
    if out["subject"] is None:
        del out["subject"]
    return out


@attrs.frozen
class Observed:
    """What the rules look at, now.

    ``spend``: scope ("total", "key", "client", "model") -> name -> USD today
    (the total under name ""); ``answers``: scope ("key", "model") -> name ->
    (answers, errors) per window length; ``usable_keys``; ``free_left``:
    account -> % of its free day left; ``key_states``: key -> state, for every
    key of the pool (an ``error_share`` alert of a key not among them clears;
    empty: the keys are not known)."""

    spend: Mapping[str, Mapping[str, float]] = attrs.Factory(dict)
    answers: Mapping[float, Mapping[str, Mapping[str, tuple[int, int]]]] = attrs.Factory(dict)
    usable_keys: int = 0
    budgets: Mapping[str, Mapping[str, float]] = attrs.Factory(dict)  # scope -> name -> % spent
    free_left: Mapping[str, float] = attrs.Factory(dict)
    key_states: Mapping[str, str] = attrs.Factory(dict)


@attrs.frozen
class Alert:
    """A rule's state for one subject: firing or back to ok, since when, and why."""

    rule: str
    kind: str
    subject: str
    state: str  # "firing" or "ok"
    since: float
    value: float
    threshold: float
    text: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.rule,
            "kind": self.kind,
            "subject": self.subject,
            "state": self.state,
            "since": self.since,
            "value": self.value,
            "threshold": self.threshold,
            "text": self.text,
        }


class AlertBook:
    """The rules and which (rule, subject) fire now."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self.rules: dict[str, Rule] = {rule.name: rule for rule in rules}
        self.firing: dict[tuple[str, str], Alert] = {}
        self.cleared: deque[Alert] = deque(maxlen=RECENT)

    def set_rule(self, rule: Rule, now: float = 0.0) -> list[Alert]:
        """Add or replace a rule; the alerts this clears (to be told as any other).

        A rule replaced by one watching something else (another kind, scope,
        subject, window or least number of answers) clears every alert of the
        old one at once: the new rule may never look at those subjects again,
        and they would stay firing for ever. A new threshold alone clears or
        keeps them at the next look, as the figures say."""
        old = self.rules.get(rule.name)
        self.rules[rule.name] = rule
        if old is None or attrs.evolve(old, threshold=rule.threshold) == rule:
            return []
        cleared = []
        for where in [w for w in self.firing if w[0] == rule.name]:
            was = self.firing.pop(where)
            who = f"{old.scope} {was.subject}" if was.subject else old.scope
            alert = Alert(
                was.rule,
                was.kind,
                was.subject,
                "ok",
                now,
                was.value,
                was.threshold,
                f"{rule.name}: the {old.kind} rule watching {who} was replaced; "
                "its alert no longer applies",
            )
            self.cleared.appendleft(alert)
            cleared.append(alert)
        return cleared

    def remove_rule(self, name: str) -> bool:
        """Remove a rule and forget its alerts (no clear is sent); False: no such rule."""
        if self.rules.pop(name, None) is None:
            return False
        for where in [w for w in self.firing if w[0] == name]:
            del self.firing[where]
        return True

    def evaluate(self, seen: Observed, now: float) -> list[Alert]:
        """The alerts that fired or cleared since the last look."""
        changed = []
        for rule in self.rules.values():
            now_firing = {s: a for (name, s), a in self.firing.items() if name == rule.name}
            quiet: dict[str, str] = {}  # error_share subjects cleared for want of answers
            for subject, value, crossed in _values(rule, seen, now_firing, now, quiet):
                where = (rule.name, subject)
                firing = self.firing.get(where)
                if crossed is None or crossed == (firing is not None):
                    continue
                alert = Alert(
                    rule.name,
                    rule.kind,
                    subject,
                    "firing" if crossed else "ok",
                    now,
                    round(value, 6),
                    rule.threshold,
                    quiet.get(subject) or _text(rule, subject, value, crossed),
                )
                if crossed:
                    self.firing[where] = alert
                else:
                    del self.firing[where]
                    self.cleared.appendleft(alert)
                changed.append(alert)
        return changed

    def status(self) -> dict[str, Any]:
        """``GET /alerts``: firing alerts (newest first), recently cleared, and the rules."""
        firing = sorted(self.firing.values(), key=lambda a: -a.since)
        return {
            "alerts": [a.to_json() for a in [*firing, *self.cleared]],
            "firing": len(firing),
            "rules": [rule_to_json(r) for r in self.rules.values()],
        }


def _values(
    rule: Rule, seen: Observed, firing: Mapping[str, Alert], now: float, quiet: dict[str, str]
) -> list[tuple[str, float, bool | None]]:
    """(subject, value, crossed) per subject the rule watches (those ``firing``
    now too, so that one gone from the figures clears); crossed None: too
    little data to say. ``quiet``: the text of an ``error_share`` alert that
    clears for want of answers rather than by its figures."""
    out: list[tuple[str, float, bool | None]] = []

    def subjects(names: Iterable[str]) -> list[str]:
        listed = [rule.subject] if rule.subject else list(names)
        return listed + [s for s in firing if s not in listed]

    if rule.kind == "spend":
        spent = seen.spend.get(rule.scope, {})
        for name in [""] if rule.scope == "total" else subjects(spent):
            value = spent.get(name, 0.0)
            out.append((name, value, value > rule.threshold))
    elif rule.kind == "error_share":
        counts = seen.answers.get(rule.window, {}).get(rule.scope, {})
        for name in subjects(counts):
            answers, errors = counts.get(name, (0, 0))
            share = errors / answers if answers else 0.0
            crossed: bool | None = None
            if rule.scope == "key" and seen.key_states and name not in seen.key_states:
                crossed = False  # no longer a key of the pool: nothing to watch
                quiet[name] = f"{rule.name}: key {name} is no longer in the pool"
            elif answers >= rule.min_requests:
                crossed = share > rule.threshold
            elif answers == 0 and name in firing and now - firing[name].since >= rule.window:
                crossed = False  # no answer for a whole window (cooling, disabled, unused)
                quiet[name] = (
                    f"{rule.name}: {rule.scope} {name} had no answers "
                    f"in the last {rule.window:.0f} s"
                )
            out.append((name, share, crossed))
    elif rule.kind == "budget":
        spent = seen.budgets.get(rule.scope, {})
        for name in subjects(spent):
            value = spent.get(name, 0.0)
            out.append((name, value, value > rule.threshold))
    elif rule.kind == "usable_keys":
        out.append(("", float(seen.usable_keys), seen.usable_keys < rule.threshold))
    elif rule.kind == "free_quota":
        left = seen.free_left
        for name in subjects(left):
            value = left.get(name, 100.0)  # an account gone: nothing to watch
            out.append((name, value, value < rule.threshold))
    else:  # key_failed
        states = seen.key_states
        for name in subjects(states):
            bad = states.get(name) in _BAD_STATES
            out.append((name, 1.0 if bad else 0.0, bad))
    return out


def _text(rule: Rule, subject: str, value: float, crossed: bool) -> str:
    """One line: what is over or under, and the threshold."""
    who = f"{rule.scope} {subject}" if subject else rule.scope
    t = rule.threshold
    if rule.kind == "spend":
        what = f"spend today of {who}" if subject else "spend today in total"
        line = f"{what} is ${value:,.2f}, " + (
            f"over ${t:,.2f}" if crossed else f"back under ${t:,.2f}"
        )
    elif rule.kind == "error_share":
        line = f"errors of {who} are {value:.0%} of its answers in the last {rule.window:.0f} s, "
        line += f"over {t:.0%}" if crossed else f"back under {t:.0%}"
    elif rule.kind == "budget":
        line = f"budget of {who} is {value:.0f} % spent in its window, "
        line += f"over {t:.0f} %" if crossed else f"back under {t:.0f} %"
    elif rule.kind == "usable_keys":
        line = f"{value:.0f} usable keys, " + (
            f"under {t:.0f}" if crossed else f"back to {t:.0f} or more"
        )
    elif rule.kind == "free_quota":
        line = f"free quota of account {subject} is {value:.0f} % left, "
        line += f"under {t:.0f} %" if crossed else f"back to {t:.0f} % or more"
    else:
        line = f"key {subject} " + (
            "is failed or depleted: revoked, or out of credits?" if crossed else "is back"
        )
    return f"{rule.name}: {line}"
