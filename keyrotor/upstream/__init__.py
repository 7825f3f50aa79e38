"""keyrotor's model of an OpenRouter-compatible upstream: what a key answers.

Pure and clock-driven (time is ``Call.now``): the fake HTTP server of
``keyrotor.testing`` and the replay simulator of ``keyrotor.replay`` both
answer through these behaviours, so one scenario behaves the same over real
HTTP and on a virtual clock. ``behaviours`` holds the composable per-key
behaviours; ``windows`` the sliding limits and outages of replay models.
"""

from .behaviours import (
    Behaviour,
    Call,
    Credits,
    Drop,
    Hang,
    Outcome,
    Reply,
    key_data,
)
from .windows import TRANSPORT_FAILURES, Outage, SlidingRateLimit, TokenRateLimit

__all__ = [
    "TRANSPORT_FAILURES",
    "Behaviour",
    "Call",
    "Credits",
    "Drop",
    "Hang",
    "Outage",
    "Outcome",
    "Reply",
    "SlidingRateLimit",
    "TokenRateLimit",
    "key_data",
]
