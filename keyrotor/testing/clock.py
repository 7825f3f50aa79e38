"""Clocks for the fake upstream: the wall clock, and a manual clock for tests.

The fake upstream reads time only through a ``Clock`` (any callable returning
seconds since the Unix epoch as a float). Rate-limit windows and the
``X-RateLimit-Reset`` header (epoch milliseconds) are computed from it.
Latency behaviours do *not* use it: they sleep on the event loop, so trio's
``MockClock(autojump_threshold=0)`` can skip them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["Clock", "FakeClock", "wall_clock"]

Clock = Callable[[], float]
"""Any callable returning the current time in seconds since the Unix epoch."""


WINDOW_START = 1_699_920_000.0
"""A Unix time that is a whole day (so a whole hour, minute, 30 s ...):
``FakeClock(WINDOW_START)`` starts every ``RateLimit`` window at its beginning,
and a clock that is not advanced never rolls one over mid-test (the real
clock can, which makes a test that counts on a window flaky)."""


def wall_clock() -> float:
    """The real time, in seconds since the Unix epoch (``time.time()``)."""
    return time.time()


class FakeClock:
    """A clock that moves only when told to.

    Usable wherever a ``Clock`` is expected (it is callable), and safe to
    advance from a test thread while the server reads it from its own thread.

    >>> clock = FakeClock(start=1_700_000_000.0)
    >>> clock.advance(1.5)
    >>> clock()
    1700000001.5
    """

    __slots__ = ("_lock", "_now")

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def now(self) -> float:
        """The current fake time, in seconds since the Unix epoch."""
        return self._now

    __call__ = now

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` (which must not be negative)."""
        if seconds < 0:
            raise ValueError(f"FakeClock.advance({seconds!r}): time cannot go backwards")
        with self._lock:
            self._now += seconds

    def set(self, now: float) -> None:
        """Jump to the absolute time ``now`` (which must not be in the past)."""
        with self._lock:
            if now < self._now:
                raise ValueError(
                    f"FakeClock.set({now!r}): time cannot go backwards (now is {self._now!r})"
                )
            self._now = float(now)

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now!r})"
