"""Errors the transports raise. None of them ever holds a secret."""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigurationError",
    "KeyrotorError",
    "NoKeyAvailable",
    "TransportError",
    "UpstreamError",
    "leaves",
]


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc``'s (nested) exception groups, or ``exc``."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


class KeyrotorError(Exception):
    """Base of every error a keyrotor transport raises."""


class ConfigurationError(KeyrotorError, ValueError):
    """Bad keys or options given to a client."""


class NoKeyAvailable(KeyrotorError):
    """The pool could not serve the request in time (the core's ``Reject``).

    ``status`` is 429 when every key is rate limited, 503 when none is usable,
    502 when every attempt failed without an answer; ``retry_after`` is when a
    key is expected back (``None``: not on its own).
    """

    def __init__(self, status: int, retry_after: float | None, reason: str) -> None:
        self.status = status
        self.retry_after = retry_after
        self.reason = reason
        after = f", retry after {retry_after:.1f} s" if retry_after is not None else ""
        super().__init__(f"no key could serve the request ({status}: {reason}{after})")


class UpstreamError(KeyrotorError):
    """The upstream answered with an error that no other key would fix (400,
    404, 413, or the last attempt's error). Carries the status and body."""

    def __init__(self, status: int, body: Any, key: str, attempts: int) -> None:
        self.status = status
        self.body = body
        self.key = key
        self.attempts = attempts
        message = body
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            message = body["error"].get("message", body)
        super().__init__(f"upstream answered {status} (key {key}, attempt {attempts}): {message}")


class TransportError(KeyrotorError):
    """A connection-level failure the pool could not route around."""
