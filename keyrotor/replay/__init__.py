"""Replay recorded or synthetic traffic through the core, on a virtual clock.

    from keyrotor.replay import build_scenario, replay

    report = replay(build_scenario("failing_key", requests=2_000), policy="all", seed=1)
    print(report.to_text())          # the policies side by side
    report.to_json()                 # the same, canonical JSON (byte-identical per input)

Pieces: the trace format (:mod:`.trace`: ``TraceWriter``, ``load_trace``), the
simulated upstream (:mod:`.upstream`), the engine (:mod:`.engine`), the
metrics (:mod:`.report`), built-in scenarios (:mod:`.scenarios`) and the
``keyrotor replay`` command (:mod:`.cli`). See docs/replay.md.
"""

from .api import replay
from .engine import RunResult, pool_keys, simulate
from .report import Report, jain_index, percentile, summarize
from .scenarios import SCENARIOS, Scenario
from .scenarios import build as build_scenario
from .trace import (
    Attempt,
    Trace,
    TraceError,
    TraceHeader,
    TraceRecord,
    TraceWriter,
    load_trace,
    read_header,
    read_trace,
)
from .upstream import (
    FailureWindow,
    KeyModel,
    SimulatedUpstream,
    UpstreamModel,
    UpstreamModelError,
    load_upstream_model,
)

__all__ = [
    "SCENARIOS",
    "Attempt",
    "FailureWindow",
    "KeyModel",
    "Report",
    "RunResult",
    "Scenario",
    "SimulatedUpstream",
    "Trace",
    "TraceError",
    "TraceHeader",
    "TraceRecord",
    "TraceWriter",
    "UpstreamModel",
    "UpstreamModelError",
    "build_scenario",
    "jain_index",
    "load_trace",
    "load_upstream_model",
    "percentile",
    "pool_keys",
    "read_header",
    "read_trace",
    "replay",
    "simulate",
    "summarize",
]
