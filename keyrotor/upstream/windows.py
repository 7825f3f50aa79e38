"""Behaviours over time windows: sliding request and token limits, outages.

The replay simulator's upstream model (``rpm``, ``tpm``, ``accounts`` and
``failures`` in docs/replay.md) is made of these, and the fake HTTP server runs
them too. A limit counts a request only when every behaviour of the key has let
it through (``Call.on_success``): a request refused by a later limit or by a
spent balance is not counted.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from attrs import define, field

from .behaviours import Behaviour, Call, Drop, Hang, Outcome, Reply

__all__ = ["TRANSPORT_FAILURES", "Outage", "SlidingRateLimit", "TokenRateLimit"]

TRANSPORT_FAILURES = ("timeout", "reset", "connect")
"""``Outage`` statuses that send no answer at all."""


def limited(call: Call, limit: float, wait: float, message: str, source: str | None) -> Reply:
    """A 429 of a limit with room again in ``wait`` seconds: ``retry-after``
    (whole seconds) and ``x-ratelimit-*`` (the reset in Unix milliseconds)."""
    reset_ms = int((call.epoch + call.now + wait) * 1000.0)
    headers = (
        ("retry-after", str(max(1, math.ceil(wait)))),
        ("x-ratelimit-limit", str(int(limit))),
        ("x-ratelimit-remaining", "0"),
        ("x-ratelimit-reset", str(reset_ms)),
    )
    metadata = None if source is None else {"limit_source": source}
    return Reply(429, message, metadata, headers=headers)


def _positive(instance: Any, attribute: Any, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{type(instance).__name__}.{attribute.name} must be more than 0")


@define
class SlidingRateLimit(Behaviour):
    """At most ``limit`` requests in any ``window`` seconds (a sliding log).

    A request past the limit gets 429 (see ``limited``) with ``message`` and,
    when set, ``metadata.limit_source``. Share one instance between secrets for
    an account-wide limit (``message`` naming ``free-models-per-min`` makes the
    core cool the whole account)."""

    limit: float = field(validator=_positive)
    window: float = field(default=60.0, validator=_positive)
    message: str = "Rate limit exceeded"
    limit_source: str | None = None
    _log: deque[float] = field(factory=deque, init=False, repr=False, eq=False)

    def decide(self, call: Call) -> Outcome | None:
        now = call.now
        log = self._log
        horizon = now - self.window
        while log and log[0] <= horizon:
            log.popleft()
        if len(log) >= self.limit:
            wait = log[0] + self.window - now
            return limited(call, self.limit, wait, self.message, self.limit_source)
        call.on_success(lambda: log.append(now))
        return None


@define
class TokenRateLimit(Behaviour):
    """At most ``limit`` tokens (prompt + completion) in any ``window`` seconds.

    A request that would pass the limit gets 429, unless the window is empty
    (a single request larger than the limit still goes through)."""

    limit: float = field(validator=_positive)
    window: float = field(default=60.0, validator=_positive)
    message: str = "Rate limit exceeded: tokens per minute"
    _log: deque[tuple[float, int]] = field(factory=deque, init=False, repr=False, eq=False)
    _sum: int = field(default=0, init=False, repr=False, eq=False)

    def decide(self, call: Call) -> Outcome | None:
        now = call.now
        log = self._log
        while log and log[0][0] <= now - self.window:
            self._sum -= log.popleft()[1]
        tokens = call.prompt_tokens + call.completion_tokens
        if log and self._sum + tokens > self.limit:
            wait = log[0][0] + self.window - now
            return limited(call, self.limit, wait, self.message, None)
        call.on_success(lambda: self._count(now, tokens))
        return None

    def _count(self, now: float, tokens: int) -> None:
        self._log.append((now, tokens))
        self._sum += tokens


_OUTAGE_MESSAGES = {401: "User not found.", 402: "Insufficient credits"}


@define(kw_only=True)
class Outage(Behaviour):
    """Answer ``status`` to every request made in [``start``, ``end``).

    ``status``: an HTTP error status (401 revoked, 402, 429, 5xx, ...) or one of
    ``TRANSPORT_FAILURES``: no answer (``Hang`` for ``timeout``, ``Drop``
    otherwise), ``after`` seconds after sending in the simulator. A 429 sends
    ``retry-after``: ``retry_after`` seconds, default the time left until
    ``end`` (0: none). ``error`` is the body's message and
    ``metadata.limit_source`` (``free-models-per-min`` makes a 429
    account-wide). Probes in the window fail too when the status says the key
    is revoked (401, 403), the upstream broken (5xx) or unreachable.
    """

    start: float = 0.0
    end: float = math.inf
    status: int | str = 500
    retry_after: float | None = None
    error: str | None = None
    after: float | None = None

    def decide(self, call: Call) -> Outcome | None:
        if not self.start <= call.now < self.end:
            return None
        status = self.status
        if isinstance(status, str):
            return self._no_answer()
        headers: tuple[tuple[str, str], ...] = ()
        if status == 429:
            wait = self.retry_after if self.retry_after is not None else self.end - call.now
            if math.isfinite(wait) and wait > 0:
                headers = (("retry-after", str(max(1, math.ceil(wait)))),)
        message = self.error or _OUTAGE_MESSAGES.get(status, f"Error {status}")
        metadata = None if self.error is None else {"limit_source": self.error}
        return Reply(status, message, metadata, headers=headers)

    def probe(self, call: Call) -> Outcome | None:
        if not self.start <= call.now < self.end:
            return None
        status = self.status
        if isinstance(status, str):
            return self._no_answer()
        if status in (401, 403) or status >= 500:
            return Reply(status, "probe failed")
        return None

    def _no_answer(self) -> Hang | Drop:
        if self.status == "timeout":
            return Hang(after=self.after)
        return Drop(reason="connect" if self.status == "connect" else "reset", after=self.after)
