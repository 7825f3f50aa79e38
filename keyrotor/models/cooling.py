"""Models that failed as models (no endpoints, no provider up, a shared pool
busy), passed over by routes for a while: apart from keys, whose health the
core keeps.

A model cools for ``base`` seconds (or the upstream's Retry-After), doubled for
each failure in a row up to ``cap``: a model that is down all day is tried a
handful of times, not once a minute, and a success forgets its streak. Pure:
``now`` comes in, nothing is read from a clock.
"""

from __future__ import annotations

from .routing import Skip

__all__ = ["MAX_COOLDOWN", "ModelCooling"]

MAX_COOLDOWN = 1800.0
"""The longest a model cools without a Retry-After saying so (30 minutes)."""


class ModelCooling:
    """Per model: cooling until when and why, and its failures in a row."""

    def __init__(self, base: float = 60.0, cap: float = MAX_COOLDOWN) -> None:
        self.base = base
        self.cap = max(cap, base)
        self._until: dict[str, tuple[float, str]] = {}
        self._streak: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self._until)

    def fail(self, model: str, now: float, why: str, retry_after: float | None = None) -> float:
        """``model`` failed as a model: the seconds it is passed over from
        ``now`` (a failure never shortens a cooldown already running)."""
        streak = self._streak.get(model, 0) + 1
        self._streak[model] = streak
        seconds = retry_after or min(self.cap, self.base * 2 ** min(streak - 1, 30))
        until, _ = self._until.get(model, (0.0, ""))
        if now + seconds <= until:
            return until - now
        self._until[model] = (now + seconds, why)
        return seconds

    def hold(self, model: str, until: float, why: str) -> bool:
        """Pass over ``model`` until ``until`` (another process of the pool saw
        it fail: ``why``), unless it cools that long already; its streak here
        is left alone. Whether that changed anything."""
        current, _ = self._until.get(model, (0.0, ""))
        if until <= current:
            return False
        self._until[model] = (until, why)
        return True

    def ok(self, model: str) -> None:
        """``model`` served: its next failure cools it for ``base`` again."""
        if self._streak:
            self._streak.pop(model, None)

    def skips(self, now: float) -> dict[str, Skip]:
        """The models cooling at ``now``, each with why and for how long."""
        until = self._until
        for model in [m for m, (end, _) in until.items() if end <= now]:
            del until[model]
        return {
            model: Skip(f"{why}; passed over for {end - now:.0f} s more", end - now)
            for model, (end, why) in until.items()
        }
