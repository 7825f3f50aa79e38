"""Decisions: what the pool tells the driver to do, in the order given.

The pool proposes and the driver acts (wsproto's style). Decisions are frozen
value objects; the pool builds the hot ones through private fast constructors.
"""

from __future__ import annotations

from typing import Any

import attrs

from .states import KeyState

__all__ = ["Decision", "Deliver", "KeyStateChanged", "Probe", "Reject", "Send"]


@attrs.frozen(kw_only=True)
class Send:
    """Send the request on ``key_id``. ``attempt`` > 1 is a failover retry:
    drop the previous attempt's response and send again on this key."""

    request_id: str
    key_id: str
    attempt: int = 1

    @property
    def is_retry(self) -> bool:
        """True for a failover attempt (``attempt > 1``)."""
        return self.attempt > 1


@attrs.frozen(kw_only=True)
class Deliver:
    """Give the caller the response of ``attempt`` (``status`` is the upstream's).

    The key stays held until ``ResponseFinished`` (or a failure or a
    cancellation) says its body has ended.
    """

    request_id: str
    key_id: str
    attempt: int
    status: int


@attrs.frozen(kw_only=True)
class Reject:
    """No key can serve the request in time: answer the caller with ``status``
    (429 when every key is rate limited, else 503) and ``retry_after`` seconds
    (``None`` when no key is expected back on its own)."""

    request_id: str
    status: int
    retry_after: float | None
    reason: str


@attrs.frozen(kw_only=True)
class Probe:
    """Check ``key_id`` with a cheap call (OpenRouter: ``GET /key``) and report
    the answer as ``ProbeFinished``."""

    key_id: str
    reason: str


@attrs.frozen(kw_only=True)
class KeyStateChanged:
    """A key moved between states (for logs, metrics and storage)."""

    key_id: str
    old: KeyState
    new: KeyState
    until: float | None
    reason: str
    now: float

    def to_json(self) -> dict[str, Any]:
        """JSON-able form, states by their names."""
        return {
            "key_id": self.key_id,
            "old": self.old.value,
            "new": self.new.value,
            "until": self.until,
            "reason": self.reason,
            "now": self.now,
        }


Decision = Send | Deliver | Reject | Probe | KeyStateChanged
"""Every decision ``Pool.handle`` returns."""


# A positional constructor for ``Deliver`` that skips the keyword ``__init__``
# (three times cheaper); the pool builds ``Send`` the same way, inline.
_new = object.__new__
_deliver_request_id = Deliver.__dict__["request_id"].__set__
_deliver_key_id = Deliver.__dict__["key_id"].__set__
_deliver_attempt = Deliver.__dict__["attempt"].__set__
_deliver_status = Deliver.__dict__["status"].__set__


def make_deliver(request_id: str, key_id: str, attempt: int, status: int) -> Deliver:
    """``Deliver(...)``, built fast."""
    obj: Deliver = _new(Deliver)
    _deliver_request_id(obj, request_id)
    _deliver_key_id(obj, key_id)
    _deliver_attempt(obj, attempt)
    _deliver_status(obj, status)
    return obj
