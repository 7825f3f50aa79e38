"""The pool's mutable working records: one per key, one per request.

Plain slotted classes (no attrs, no validation): they live on the hot path and
never leave the core. ``Pool.snapshot`` turns them into JSON.
"""

from __future__ import annotations

import math
from typing import Any

from .config import KeySpec
from .events import (
    AttemptHeld,
    RequestCancelled,
    RequestStarted,
    ResponseFinished,
    ResponseReceived,
    TransportFailed,
)
from .states import KeyState

# Error classes counted per key, in the order of ``_Key.errors``.
ERROR_CLASSES: tuple[str, ...] = (
    "rate_limited",
    "depleted",
    "invalid",
    "upstream_fault",
    "transport",
    "caller_error",
    "upstream_busy",
    "try_another_key",
    "model_unavailable",
)
ERROR_INDEX = {name: i for i, name in enumerate(ERROR_CLASSES)}


class Window:
    """Sliding-window counter of requests and upstream faults, in O(1) memory.

    Two aligned tumbling windows; the estimate weights the previous one by the
    part of it still inside the sliding window (Cloudflare's approximation).
    ``end`` is where the current window ends: counting is one comparison and
    one increment until then.
    """

    __slots__ = ("cur_err", "cur_req", "end", "prev_err", "prev_req")

    def __init__(self) -> None:
        self.end = -math.inf
        self.cur_req = self.cur_err = self.prev_req = self.prev_err = 0

    def roll(self, now: float, size: float) -> None:
        """Advance to the window holding ``now``."""
        if now >= self.end:
            aligned = now - (now % size)
            if aligned == self.end:
                self.prev_req, self.prev_err = self.cur_req, self.cur_err
            else:
                self.prev_req = self.prev_err = 0
            self.cur_req = self.cur_err = 0
            self.end = aligned + size

    def estimate(self, now: float, size: float) -> tuple[float, float]:
        """(requests, errors) in the sliding window ending at ``now``."""
        self.roll(now, size)
        weight = (self.end - now) / size  # share of the previous window still inside
        return (
            self.cur_req + self.prev_req * weight,
            self.cur_err + self.prev_err * weight,
        )

    def to_json(self) -> list[Any]:
        return [None if self.end == -math.inf else self.end, *self._counts()]

    def _counts(self) -> list[int]:
        return [self.cur_req, self.cur_err, self.prev_req, self.prev_err]

    def load(self, data: list[Any]) -> None:
        end, self.cur_req, self.cur_err, self.prev_req, self.prev_err = data
        self.end = -math.inf if end is None else end


class KeyRecord:
    """Everything the pool knows about one key."""

    __slots__ = (
        "account",
        "budget_spend",
        "budget_start",
        "completion_tokens",
        "errors",
        "ewma",
        "hard_until",
        "in_flight",
        "in_sched",
        "key_id",
        "last_pick",
        "last_probe",
        "max_in_flight",
        "pace_at",
        "pace_timer",
        "plain",
        "probe_due",
        "probing",
        "prompt_tokens",
        "reason",
        "removed",
        "requests",
        "serial",
        "spec",
        "spend",
        "state",
        "successes",
        "timeout_since",
        "timeouts",
        "tok_at",
        "trial",
        "until",
        "vd",
        "ver",
        "vr",
        "window",
    )

    def __init__(self, spec: KeySpec, serial: int) -> None:
        self.spec = spec
        self.key_id = spec.key_id
        self.serial = serial
        self.account = spec.account
        self.max_in_flight = spec.max_in_flight
        # No per-key limits: usable whenever healthy (the hot path's shortcut).
        self.plain = spec.max_in_flight is None and spec.rpm is None and spec.tpm is None
        self.state = KeyState.HEALTHY
        self.until: float | None = None
        # The hard floor of a cooldown: the latest time the upstream (Retry-After, a
        # reset header) or an operator gave; no probe ends the cooldown before it.
        # At most ``until``; None when the whole cooldown was only a default guess.
        self.hard_until: float | None = None
        self.reason = ""
        self.removed = False
        self.in_flight = 0
        self.trial = False  # a half-open trial request is in flight
        self.requests = 0
        self.successes = 0
        self.errors = [0] * len(ERROR_CLASSES)
        self.spend = 0.0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.budget_start: float | None = None
        self.budget_spend = 0.0
        self.window = Window()
        self.timeouts = 0  # attempts timed out in a row (a hanging key)
        self.timeout_since = 0.0  # when the first of them was sent
        self.ewma = 0.0
        self.pace_at: float | None = None  # rpm pacing: earliest next send
        self.tok_at: float | None = None  # tpm pacing: tokens paid up to this time
        self.pace_timer: float | None = None  # pending pacing timer, if any
        self.probing = False
        self.last_probe: float | None = None
        self.probe_due: float | None = None
        # Selection structures (see _select.py).
        self.in_sched = False
        self.ver = 0
        self.last_pick = -1
        self.vr = 0.0
        self.vd = 0.0

    _SAVED = (
        "state",
        "until",
        "hard_until",
        "reason",
        "removed",
        "in_flight",
        "trial",
        "requests",
        "successes",
        "errors",
        "spend",
        "prompt_tokens",
        "completion_tokens",
        "budget_start",
        "budget_spend",
        "ewma",
        "pace_at",
        "tok_at",
        "pace_timer",
        "probing",
        "last_probe",
        "probe_due",
        "in_sched",
        "ver",
        "last_pick",
        "vr",
        "vd",
    )
    _ADDED = (("timeouts", 0), ("timeout_since", 0.0))
    """Fields newer than the snapshot format: a snapshot without them restores."""

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"spec": self.spec.to_json(), "serial": self.serial}
        for name in self._SAVED:
            data[name] = getattr(self, name)
        for name, _ in self._ADDED:
            data[name] = getattr(self, name)
        data["state"] = self.state.value
        data["errors"] = list(self.errors)
        data["window"] = self.window.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyRecord:
        key = cls(KeySpec(**data["spec"]), data["serial"])
        for name in cls._SAVED:
            setattr(key, name, data[name])
        for name, default in cls._ADDED:
            setattr(key, name, data.get(name, default))
        key.state = KeyState(data["state"])
        if isinstance(key.hard_until, bool):  # a snapshot from when it was a flag
            key.hard_until = key.until if key.hard_until else None
        key.plain = key.plain and not key.removed and key.pace_at is None
        errors = list(data["errors"])  # a snapshot from before a class was added has fewer
        key.errors = errors + [0] * (len(ERROR_CLASSES) - len(errors))
        key.window.load(data["window"])
        return key


# Request states.
QUEUED, SENT, DELIVERED = 0, 1, 2
_STATE_NAMES = {QUEUED: "queued", SENT: "sent", DELIVERED: "delivered"}

REQUEST_LIFECYCLE: dict[type, dict[int, str]] = {
    RequestStarted: {-1: "sent on a key, queued, or rejected"},
    ResponseReceived: {
        SENT: "delivered; or sent again on another key, queued, or rejected (a failover)",
    },
    TransportFailed: {
        SENT: "sent again on another key, queued, or rejected with a 502",
        DELIVERED: "ended: its body broke off",
    },
    AttemptHeld: {SENT: "sent again on another key, or queued (the attempt does not count)"},
    ResponseFinished: {DELIVERED: "ended"},
    RequestCancelled: {QUEUED: "ended", SENT: "ended", DELIVERED: "ended"},
}
"""The request lifecycle: for each event about a request, the request states it
may meet (-1: none yet) and where each leads. ``Pool`` checks an event against
this table in one place and refuses any other pair with ``PoolError``; a
deadline that passes while queued rejects the request (its ``Tick``)."""


def describe_state(state: int) -> str:
    """A request state's name (``new`` before its ``RequestStarted``)."""
    return _STATE_NAMES.get(state, "new")


class RequestRecord:
    """A request the pool holds: waiting for a key, sent, or being delivered.

    ``event`` is the ``RequestStarted`` that opened it: its pin, session, group
    and token estimate are read from there rather than copied.
    """

    __slots__ = (
        "attempt",
        "deadline",
        "event",
        "holds",
        "key",
        "request_id",
        "sent_at",
        "serial",
        "state",
        "trial",
        "tried",
    )

    def __init__(self, event: RequestStarted) -> None:
        self.request_id = event.request_id
        self.event = event
        self.serial = 0  # set when queued: orders deadline timers
        self.deadline = 0.0  # set when queued
        self.state = QUEUED
        self.key: KeyRecord | None = None
        self.attempt = 0
        self.sent_at = 0.0
        self.trial = False
        # Keys already tried, or known to answer the same (an account's balance), if any.
        self.tried: list[str] | None = None
        # key_id -> time before which this request is not sent on that key again:
        # the upstream's retry hint on a fault it answered there (``_choose._hold``).
        self.holds: dict[str, float] | None = None

    def describe(self) -> str:
        """Human description of the state, for error messages."""
        where = f" on key {self.key.key_id}" if self.key is not None else ""
        return f"request {self.request_id!r} is {_STATE_NAMES.get(self.state, 'ended')}{where}"

    def to_json(self) -> dict[str, Any]:
        event = self.event
        return {
            "request_id": self.request_id,
            "started": event.now,
            "pin": event.pin,
            "pin_fallback": event.pin_fallback,
            "session": event.session,
            "group": event.group,
            "tokens": event.tokens,
            "max_attempts": event.max_attempts,
            "asked_deadline": event.deadline,
            "serial": self.serial,
            "deadline": self.deadline,
            "state": self.state,
            "key": self.key.key_id if self.key is not None else None,
            "attempt": self.attempt,
            "sent_at": self.sent_at,
            "trial": self.trial,
            "tried": None if self.tried is None else list(self.tried),  # copies: a
            "holds": None if self.holds is None else dict(self.holds),  # snapshot is frozen
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestRecord:
        event = RequestStarted(
            request_id=data["request_id"],
            now=data["started"],
            pin=data["pin"],
            pin_fallback=data["pin_fallback"],
            session=data["session"],
            group=data["group"],
            deadline=data["asked_deadline"],
            tokens=data["tokens"],
            max_attempts=data.get("max_attempts"),
        )
        req = cls(event)
        req.serial = data["serial"]
        req.deadline = data["deadline"]
        req.state = data["state"]
        req.attempt = data["attempt"]
        req.sent_at = data["sent_at"]
        req.trial = data["trial"]
        tried, holds = data["tried"], data.get("holds")  # no holds: an older snapshot
        req.tried = None if tried is None else list(tried)  # copies: the snapshot's
        req.holds = None if holds is None else dict(holds)  # are not the pool's
        return req


# Timer kinds, in the order they fire at one instant (a hold that ends at a
# request's deadline lets it be sent then). Not saved: a restore rebuilds timers.
T_COOLDOWN, T_PACE, T_PROBE, T_HOLD, T_DEADLINE = 0, 1, 2, 3, 4


def pacing_ready(key: KeyRecord, now: float) -> float | None:
    """When pacing lets ``key`` send again, if pacing is what holds it back."""
    ready = None
    if key.pace_at is not None and key.pace_at > now:
        ready = key.pace_at
    if key.tok_at is not None and key.tok_at > now + 60.0:
        tok_ready = key.tok_at - 60.0
        ready = tok_ready if ready is None else max(ready, tok_ready)
    return ready
