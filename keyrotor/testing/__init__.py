"""Test helpers: a scripted, OpenRouter-compatible fake upstream and a fake clock.

    from keyrotor.testing import FakeUpstream, Scenario, FakeClock, Credits, RateLimit

    clock = FakeClock()
    scenario = Scenario().add("sk-a", Credits(0.01), alias="a").add("sk-b", RateLimit(2, 60))
    async with FakeUpstream(scenario, clock=clock).serve() as server:
        ...  # httpx.AsyncClient(base_url=server.url), server.stats("a"), server.log

Sync code: ``with FakeUpstream.running_in_thread(scenario) as server:``.
Command line: ``python -m keyrotor.testing.fake_upstream --port 0 --scenario demo``.
"""

from ..upstream.behaviours import (
    AccountRateLimit,
    Behaviour,
    Call,
    Chain,
    Credits,
    Custom,
    Drop,
    Flaky,
    FreeModelLimits,
    Hang,
    InFlightBudget,
    Intermittent,
    Invalid,
    MidStreamError,
    Ok,
    Outcome,
    RateLimit,
    Reply,
    Sequence,
    Slow,
    SlowStream,
    Truncate,
    UpstreamRateLimited,
    error_body,
)
from .catalogs import realistic_models
from .clock import WINDOW_START, Clock, FakeClock, wall_clock
from .scenarios import (
    DEFAULT_MODELS,
    DEMO_KEYS,
    SCENARIOS,
    Model,
    Scenario,
    healthy_secret,
    scenario,
)
from .server import FakeUpstream, KeyStats, LogEntry, ServerStats

__all__ = [
    "DEFAULT_MODELS",
    "DEMO_KEYS",
    "SCENARIOS",
    "WINDOW_START",
    "AccountRateLimit",
    "Behaviour",
    "Call",
    "Chain",
    "Clock",
    "Credits",
    "Custom",
    "Drop",
    "FakeClock",
    "FakeUpstream",
    "Flaky",
    "FreeModelLimits",
    "Hang",
    "InFlightBudget",
    "Intermittent",
    "Invalid",
    "KeyStats",
    "LogEntry",
    "MidStreamError",
    "Model",
    "Ok",
    "Outcome",
    "RateLimit",
    "Reply",
    "Scenario",
    "Sequence",
    "ServerStats",
    "Slow",
    "SlowStream",
    "Truncate",
    "UpstreamRateLimited",
    "error_body",
    "healthy_secret",
    "realistic_models",
    "scenario",
    "wall_clock",
]
