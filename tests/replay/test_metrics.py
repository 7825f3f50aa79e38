"""Metrics on small traces computed by hand."""

from __future__ import annotations

import pytest

from keyrotor.core import KeySpec
from keyrotor.replay import (
    Trace,
    TraceHeader,
    TraceRecord,
    UpstreamModel,
    jain_index,
    percentile,
    replay,
)


def test_jain_index_of_known_share_vectors() -> None:
    assert jain_index([5, 5, 5, 5]) == 1.0
    assert jain_index([1, 0, 0, 0]) == 0.25  # all on one of four keys: 1/n
    assert jain_index([3, 1]) == pytest.approx(16 / 20)  # (3+1)^2 / (2 * (9+1))
    assert jain_index([]) is None
    assert jain_index([0, 0]) is None


def test_percentile_nearest_rank_with_implicit_zeros() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == 2.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 1) == 1.0
    assert percentile(values, 50, zeros=4) == 0.0  # 4 zeros sort first
    assert percentile(values, 75, zeros=4) == 2.0
    assert percentile([], 50) is None


def trace(*arrivals: float, cost: float = 0.001) -> Trace:
    records = [TraceRecord(t=t, cost=cost * (i + 1)) for i, t in enumerate(arrivals)]
    return Trace(TraceHeader(keys=[{"key_id": "key-0"}, {"key_id": "key-1"}]), records)


def test_failover_on_a_three_request_trace() -> None:
    """key-0 starts answering 429 (Retry-After 100 s) at t=0.05.

    round robin: r0 (t=0.0) -> key-0, 200 at 0.5; r1 (t=0.1) -> key-1, 200 at 0.6;
    r2 (t=0.2) -> key-0, 429 at 0.25 -> key-0 rate limited, r2 fails over to key-1
    at 0.25 (same instant), 200 at 0.75. So: one episode, no send to key-0 after
    its 429, r2's added latency = 0.05 s = exactly one error round trip.
    """
    model = UpstreamModel.from_json(
        {
            "latency": 0.5,
            "error_latency": 0.05,
            "failures": [
                {"key": "key-0", "start": 0.05, "status": 429, "retry_after": 100},
            ],
        }
    )
    report = replay(trace(0.0, 0.1, 0.2), "round_robin", upstream=model)
    m = report.results["round_robin"]
    assert m["served"] == 3
    assert m["client_errors"]["total"] == 0
    assert m["upstream"]["answers"] == {"200": 3, "429": 1}
    assert m["upstream"]["rate_limited_429"] == 1
    assert m["keys"]["key-0"] == {
        "sends": 2,
        "served": 1,
        "spend": 0.001,
        "upstream_429": 1,
        "stayed_healthy": False,
        "final_state": "rate_limited",
    }
    assert m["keys"]["key-1"]["sends"] == 2
    assert m["keys"]["key-1"]["spend"] == 0.005  # r1 0.002 + r2 0.003
    assert m["episodes"] == [
        {
            "key": "key-0",
            "reason": "http_429",
            "first_failure": 0.25,
            "out_of_service": 0.25,
            "sends_after_failure": 0,
            "sends_out_of_service": 0,
            "failover_latency": 0.0,
            "time_to_recover": None,
        }
    ]
    failover = m["failover"]
    assert failover["episodes"] == 1
    assert failover["sends_after_failure"] == 0
    assert failover["affected_requests"] == 1
    assert failover["added_latency"]["max"] == 0.05
    assert failover["error_round_trip"]["max"] == 0.05
    assert failover["added_beyond_error_round_trips"]["max"] == 0.0
    assert m["recovery"] == {
        "recovered": 0,
        "not_recovered": 1,
        "time_to_recover": {"p50": None, "p99": None, "max": None, "mean": None},
    }
    # fairness over keys that stayed healthy: key-1 alone
    assert m["fairness"]["healthy_keys"] == 1
    assert m["fairness"]["jain"] == 1.0
    assert m["time_to_first_byte"] == {"p50": 0.5, "p99": 0.55, "max": 0.55, "mean": 0.516667}
    assert m["spend"] == {"total": 0.006, "min_key": 0.001, "max_key": 0.005}


def test_queueing_delay_with_one_slot() -> None:
    """One key, max_in_flight=1, latency 0.5: r1 (t=0.1) waits until r0 ends at 0.5."""
    model = UpstreamModel.from_json({"latency": 0.5})
    report = replay(
        trace(0.0, 0.1),
        keys=[KeySpec(key_id="solo", max_in_flight=1)],
        upstream=model,
    )
    m = report.results["round_robin"]
    assert m["queueing"] == {
        "queued_requests": 1,
        "delay": {"p50": 0.0, "p99": 0.4, "max": 0.4, "mean": 0.2},
    }
    assert m["time_to_first_byte"]["max"] == 0.9


def test_recovery_time_and_fairness_when_a_key_comes_back() -> None:
    """key-1 answers 429 with Retry-After 2 s from t=0 to t=1; requests every 0.5 s.

    r0 (t=0) -> key-0; r1 (t=0.5) -> key-1: 429 at 0.55, rate limited until 2.55
    (Retry-After is whole seconds: 2); r1 fails over to key-0. At 2.55 key-1 is
    recovering; its trial is r6 (t=3.0), 200 at 3.5: healthy again 2.95 s after
    its first failure.
    """
    model = UpstreamModel.from_json(
        {
            "latency": 0.5,
            "error_latency": 0.05,
            "failures": [
                {"key": "key-1", "start": 0.0, "end": 1.0, "status": 429, "retry_after": 2}
            ],
        }
    )
    report = replay(trace(*[i * 0.5 for i in range(10)]), upstream=model)
    m = report.results["round_robin"]
    assert m["recovery"]["recovered"] == 1
    assert m["recovery"]["time_to_recover"]["max"] == 2.95
    assert m["episodes"][0]["first_failure"] == 0.55
    assert m["served"] == 10
    assert m["fairness"]["healthy_keys"] == 1


def test_client_errors_count_rejections_and_delivered_errors() -> None:
    """Every key revoked: each request tries both keys (401, 401), then is rejected."""
    model = UpstreamModel.from_json(
        {"failures": [{"key": "*", "status": 401}], "error_latency": 0.01}
    )
    report = replay(trace(0.0, 1.0), upstream=model, options={"max_attempts": 2})
    m = report.results["round_robin"]
    assert m["served"] == 0
    assert m["client_errors"]["total"] == 2
    assert m["lost"] == 0
    assert m["upstream"]["answers"] == {"401": 2}
    assert sum(m["client_errors"]["by_status"].values()) == 2
