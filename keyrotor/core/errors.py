"""The one error type the core raises, for misuse and bad configuration."""

from __future__ import annotations

__all__ = ["PoolError"]


class PoolError(Exception):
    """The caller broke the core's contract, or a configuration is invalid.

    Raised for an unknown or duplicate ``request_id``, time going backwards, an
    event that does not fit the request's state, or an invalid ``PoolConfig``.
    The pool is left exactly as it was before the call that raised.

    Attributes:
        event: the offending event or configuration object (its repr never
            holds a secret: the core knows keys only by their ids).
        state: a short description of the relevant state (e.g. ``"request r1 is
            queued"``), or ``""`` when there is none.
        fix: what the caller should do instead.
    """

    def __init__(self, message: str, *, event: object = None, state: str = "", fix: str = ""):
        self.event = event
        self.state = state
        self.fix = fix
        parts = [message]
        if event is not None:
            parts.append(f"event: {event!r}")
        if state:
            parts.append(f"state: {state}")
        if fix:
            parts.append(f"fix: {fix}")
        super().__init__("; ".join(parts))
