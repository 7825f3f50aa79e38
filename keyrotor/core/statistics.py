"""Frozen pictures of a pool for status pages, metrics and logs."""

from __future__ import annotations

from typing import Any

import attrs

from ._records import ERROR_CLASSES, KeyRecord
from .states import KeyState

__all__ = ["KeyStatistics", "PoolStatistics"]


@attrs.frozen(kw_only=True)
class KeyStatistics:
    """One key: its state and counters since the pool started.

    ``requests`` counts attempts sent on the key; ``errors`` counts answers by
    class (``rate_limited``, ``depleted``, ``invalid``, ``upstream_fault``,
    ``transport``, ``caller_error``, ``upstream_busy``, ``try_another_key``,
    ``model_unavailable``).
    """

    key_id: str
    account: str | None
    state: KeyState
    until: float | None
    reason: str
    in_flight: int
    requests: int
    successes: int
    errors: dict[str, int]
    spend: float
    prompt_tokens: int
    completion_tokens: int
    latency: float | None
    probing: bool
    removing: bool

    @property
    def success_rate(self) -> float | None:
        """Successes over answered attempts, or ``None`` before any answer."""
        answered = self.successes + sum(self.errors.values())
        return self.successes / answered if answered else None

    @classmethod
    def from_record(cls, key: KeyRecord) -> KeyStatistics:
        """Copy the public fields of a working record (through the slots'
        setters, as the core's event builders: half the keyword ``__init__``'s
        cost, for pools of thousands of keys)."""
        stats: KeyStatistics = _new(cls)
        _set_key_id(stats, key.key_id)
        _set_account(stats, key.account)
        _set_state(stats, key.state)
        _set_until(stats, key.until)
        _set_reason(stats, key.reason)
        _set_in_flight(stats, key.in_flight)
        _set_requests(stats, key.requests)
        _set_successes(stats, key.successes)
        _set_errors(stats, dict(zip(ERROR_CLASSES, key.errors, strict=True)))
        _set_spend(stats, key.spend)
        _set_prompt_tokens(stats, key.prompt_tokens)
        _set_completion_tokens(stats, key.completion_tokens)
        _set_latency(stats, key.ewma if key.successes else None)
        _set_probing(stats, key.probing)
        _set_removing(stats, key.removed)
        return stats

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict; the state by its name (the fields in their order,
        then ``success_rate``: written out, as ``attrs.asdict`` costs ~5x)."""
        return {
            "key_id": self.key_id,
            "account": self.account,
            "state": self.state.value,
            "until": self.until,
            "reason": self.reason,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "successes": self.successes,
            "errors": dict(self.errors),
            "spend": self.spend,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency": self.latency,
            "probing": self.probing,
            "removing": self.removing,
            "success_rate": self.success_rate,
        }


_new = object.__new__
(
    _set_key_id,
    _set_account,
    _set_state,
    _set_until,
    _set_reason,
    _set_in_flight,
    _set_requests,
    _set_successes,
    _set_errors,
    _set_spend,
    _set_prompt_tokens,
    _set_completion_tokens,
    _set_latency,
    _set_probing,
    _set_removing,
) = (KeyStatistics.__dict__[field.name].__set__ for field in attrs.fields(KeyStatistics))


@attrs.frozen(kw_only=True)
class PoolStatistics:
    """The whole pool: every key, and request totals since it started
    (``spend``: every key's, those removed since included)."""

    now: float
    keys: tuple[KeyStatistics, ...]
    queued: int
    in_flight: int
    started: int
    delivered: int
    rejected: int
    cancelled: int
    spend: float

    def count_by_state(self) -> dict[str, int]:
        """How many keys are in each state (every state named, zeros included)."""
        counts = {state.value: 0 for state in KeyState}
        for key in self.keys:
            if not key.removing:
                counts[key.state.value] += 1
        return counts

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict."""
        return {
            "now": self.now,
            "keys": [key.to_json() for key in self.keys],
            "states": self.count_by_state(),
            "queued": self.queued,
            "in_flight": self.in_flight,
            "started": self.started,
            "delivered": self.delivered,
            "rejected": self.rejected,
            "cancelled": self.cancelled,
            "spend": self.spend,
        }
