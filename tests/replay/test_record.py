"""The recorder's trace header (keys, options, the wall clock) and what replay does with it."""

from __future__ import annotations

import json
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

from keyrotor.core import (
    Deliver,
    Event,
    KeySpec,
    Pool,
    PoolConfig,
    RequestStarted,
    ResponseFinished,
    ResponseReceived,
    Send,
)
from keyrotor.replay import read_header, replay
from keyrotor.replay.record import TraceRecorder

WALL = 1_796_637_600.0  # 2026-12-07 10:00 UTC: a recording's wall clock at t = 0


def test_the_header_keeps_every_key_field_and_every_non_default_option(tmp_path: Path) -> None:
    config = PoolConfig(
        keys=[
            KeySpec(key_id="key-a", budget=1.0, budget_window=3600.0, max_in_flight=4, rpm=60.0),
            KeySpec(key_id="key-b", account="acct-1", tpm=1000.0, credits=5.0, weight=2.0),
        ],
        policy="least_busy",
        probe_interval=5.0,
        error_window=30.0,
        degraded_cooldown=60.0,
        recheck_interval=None,
        weight_by="credits",
        timeout_strikes=0,
    )
    TraceRecorder(tmp_path / "t.jsonl", config, 0.0, wall_start=WALL).close()
    header = read_header(tmp_path / "t.jsonl")
    assert header.keys == [
        {"key_id": "key-a", "weight": 1.0, "rpm": 60.0, "max_in_flight": 4, "budget": 1.0,
         "budget_window": 3600.0},
        {"key_id": "key-b", "account": "acct-1", "weight": 2.0, "tpm": 1000.0, "credits": 5.0},
    ]  # fmt: skip
    assert header.options == {
        "policy": "least_busy",  # for information: replay runs the policies it is given
        "probe_interval": 5.0,
        "error_window": 30.0,
        "degraded_cooldown": 60.0,
        "recheck_interval": None,
        "weight_by": "credits",
        "timeout_strikes": 0,
    }
    assert header.wall_start == WALL
    report = replay(tmp_path / "t.jsonl")
    assert report.source["options"] == {k: v for k, v in header.options.items() if k != "policy"}


def test_a_recorded_budget_window_is_replayed(tmp_path: Path) -> None:
    """key-a may spend $1 an hour; the traffic spends $6 an hour over 4 hours."""
    config = PoolConfig(
        keys=[KeySpec(key_id="key-a", budget=1.0, budget_window=3600.0), KeySpec(key_id="key-b")]
    )
    recorder = TraceRecorder(tmp_path / "t.jsonl", config, 0.0)
    pool = Pool(config)
    for i in range(240):
        now, rid = i * 60.0, f"q{i}"
        decisions = feed(pool, recorder, RequestStarted(request_id=rid, now=now))
        assert [type(d) for d in decisions] == [Send]
        feed(pool, recorder, ResponseReceived(request_id=rid, now=now + 0.1, status=200))
        feed(pool, recorder, ResponseFinished(request_id=rid, now=now + 0.1, cost=0.1))
    recorder.close()
    live = {k.key_id: k.state.value for k in pool.statistics().keys}
    result = replay(tmp_path / "t.jsonl")
    key_a = result.results["round_robin"]["keys"]["key-a"]
    assert key_a["served"] >= 40  # about 10 in each of the 4 hours, not 10 for life
    assert key_a["final_state"] == live["key-a"]


def test_the_wall_clock_start_defaults_to_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("keyrotor.replay.record.time.time", lambda: WALL)
    TraceRecorder(tmp_path / "t.jsonl", PoolConfig(keys=[KeySpec(key_id="a")]), 0.0).close()
    line = json.loads((tmp_path / "t.jsonl").read_text().splitlines()[0])
    assert line["wall_start"] == WALL


def feed(pool: Pool, recorder: TraceRecorder, event: Event) -> list[Any]:
    decisions = pool.handle(event)
    recorder.observe(event, decisions)
    return decisions


@pytest.mark.parametrize(
    "headers",
    [
        {"x-ratelimit-limit": "20", "x-ratelimit-remaining": "0",
         "x-ratelimit-reset": str(int((WALL + 60.05) * 1000))},
        {"retry-after": formatdate(WALL + 61, usegmt=True)},
        {"anthropic-ratelimit-requests-remaining": "0",
         "anthropic-ratelimit-requests-reset": "2026-12-07T10:01:01Z"},
    ],
    ids=["openrouter-epoch-ms", "retry-after-date", "anthropic-rfc3339"],
)  # fmt: skip
def test_recorded_absolute_resets_are_read_on_the_recordings_wall_clock(
    tmp_path: Path, headers: dict[str, str]
) -> None:
    """Recorded live (as ``Client.record`` does), a 429 whose reset is an absolute time
    60 s after it, replayed in recorded mode: key-a is back for the later traffic."""
    config = PoolConfig(keys=[KeySpec(key_id="key-a"), KeySpec(key_id="key-b")])
    pool = Pool(config)
    recorder = TraceRecorder(tmp_path / "live.jsonl", config, 0.0, wall_start=WALL)
    for i, t in enumerate([0.0] + [100.0 + i for i in range(1, 201)]):
        rid = f"q{i}"
        recorder.describe(b'{"model":"openai/gpt-4o-mini"}')
        decisions = feed(pool, recorder, RequestStarted(request_id=rid, now=t))
        while True:
            send = next(d for d in decisions if isinstance(d, Send))
            t += 0.05
            if send.key_id == "key-a" and i == 0:
                answer = ResponseReceived(
                    request_id=rid, now=t, status=429, headers=headers, wall_time=WALL + t
                )
                decisions = feed(pool, recorder, answer)
                continue
            answer = ResponseReceived(request_id=rid, now=t, status=200, wall_time=WALL + t)
            assert any(isinstance(d, Deliver) for d in feed(pool, recorder, answer))
            feed(pool, recorder, ResponseFinished(request_id=rid, now=t, cost=0.001))
            break
    live = {k.key_id: k.state.value for k in pool.statistics().keys}
    recorder.close()
    assert live == {"key-a": "healthy", "key-b": "healthy"}
    result = replay(tmp_path / "live.jsonl").results["round_robin"]
    assert result["keys"]["key-a"]["final_state"] == "healthy"
    assert result["keys"]["key-a"]["sends"] > 90  # its share of the 200 later requests
