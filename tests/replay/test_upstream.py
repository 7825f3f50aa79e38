"""The simulated upstream: limits, balances, failure windows, the model schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from keyrotor.core import Verdict, classify_probe, classify_response
from keyrotor.replay import (
    SimulatedUpstream,
    TraceRecord,
    UpstreamModel,
    UpstreamModelError,
    load_upstream_model,
)
from keyrotor.replay.upstream import EPOCH, RecordedUpstream

REC = TraceRecord(t=0.0, prompt_tokens=100, completion_tokens=50, stream=True)


def upstream(data: dict[str, object], keys: tuple[str, ...] = ("k",)) -> SimulatedUpstream:
    return SimulatedUpstream(UpstreamModel.from_json(data), list(keys), seed=1)


def test_per_key_rpm_window_answers_429_with_retry_after_and_reset() -> None:
    sim = upstream({"default": {"rpm": 2}, "error_latency": 0.05})
    assert sim.send("k", 0.0, REC, 1)[0] == 200
    assert sim.send("k", 10.0, REC, 1)[0] == 200
    status, delay, headers, body, reason, duration, cost = sim.send("k", 20.0, REC, 1)
    assert (status, delay, reason, duration, cost) == (429, 0.05, None, 0.0, 0.0)
    assert headers == {
        "retry-after": "40",
        "x-ratelimit-limit": "2",
        "x-ratelimit-remaining": "0",
        "x-ratelimit-reset": str(int((EPOCH + 60.0) * 1000)),
    }
    verdict = classify_response(429, headers, body, wall_time=EPOCH + 20.0)
    assert verdict.verdict is Verdict.RATE_LIMITED and verdict.cooldown == 40.0
    assert sim.send("k", 60.0, REC, 1)[0] == 200  # the first request left the window


def test_account_limit_is_shared_and_account_wide() -> None:
    sim = upstream(
        {"accounts": {"acct": {"rpm": 1}}, "default": {"account": "acct"}}, keys=("a", "b")
    )
    assert sim.send("a", 0.0, REC, 1)[0] == 200
    status, _, headers, body, *_ = sim.send("b", 1.0, REC, 1)
    assert status == 429
    verdict = classify_response(429, headers, body, wall_time=EPOCH + 1.0)
    assert verdict.account_wide


def test_tokens_per_minute() -> None:
    sim = upstream({"default": {"tpm": 200}})
    assert sim.send("k", 0.0, REC, 1)[0] == 200  # 150 tokens
    assert sim.send("k", 1.0, REC, 1)[0] == 429
    assert sim.send("k", 60.5, REC, 1)[0] == 200


def test_credits_run_out_then_402_and_probe_says_so() -> None:
    sim = upstream({"keys": {"k": {"credits": 0.0002}}, "prices": {"prompt": 0.000001}})
    first = sim.send("k", 0.0, REC, 1)
    assert first[0] == 200 and first[6] == pytest.approx(0.0001)
    assert first[5] == 1.0  # 50 tokens at 50 tokens/s
    assert sim.send("k", 1.0, REC, 1)[0] == 200
    status, _, _, body, *_ = sim.send("k", 2.0, REC, 1)
    assert status == 402
    assert classify_response(402, None, body).verdict is Verdict.DEPLETED
    status, body, _ = sim.probe("k", 3.0)  # GET /key as the fake server answers it
    assert status == 200 and body["data"]["limit_remaining"] == pytest.approx(0.0)
    assert classify_probe(status, None, body).verdict is Verdict.DEPLETED


def test_failure_windows() -> None:
    sim = upstream(
        {
            "failures": [
                {"key": "k", "start": 1, "end": 2, "status": 401},
                {"key": "*", "start": 3, "end": 4, "status": "timeout"},
                {"key": "k", "start": 5, "end": 6, "status": 429, "retry_after": 0},
                {"key": "k", "start": 7, "end": 9, "status": 429},
            ]
        }
    )
    assert sim.send("k", 0.5, REC, 1)[0] == 200
    assert sim.send("k", 1.5, REC, 1)[0] == 401
    assert sim.probe("k", 1.5)[0] == 401
    assert sim.send("k", 3.5, REC, 1)[:5:4] == (None, "timeout")
    assert sim.send("k", 3.5, REC, 1)[1] == 30.0
    assert sim.probe("k", 3.5)[0] is None
    assert sim.send("k", 5.5, REC, 1)[2] is None  # no Retry-After
    assert sim.send("k", 7.5, REC, 1)[2] == {"retry-after": "2"}  # until the window ends
    assert sim.send("k", 9.0, REC, 1)[0] == 200


def test_latency_distributions_are_seeded() -> None:
    data = {"latency": {"kind": "lognormal", "median": 0.4, "sigma": 0.5, "max": 2.0}}
    a = [upstream(data).send("k", 0.0, REC, 1)[1] for _ in range(3)]
    b = upstream(data)
    assert [b.send("k", 0.0, REC, 1)[1] for _ in range(3)] != a  # draws advance
    assert len(set(a)) == 1  # a fresh upstream with the same seed draws the same
    for kind in ({"kind": "uniform", "low": 1, "high": 2}, {"kind": "exponential", "mean": 1}):
        delay = upstream({"latency": kind}).send("k", 0.0, REC, 1)[1]
        assert delay > 0


def test_recorded_upstream_without_attempts_falls_back_to_the_model() -> None:
    sim = RecordedUpstream(UpstreamModel.from_json({"latency": 0.25}), ["k"])
    assert sim.send("k", 0.0, TraceRecord(t=0.0), 1)[:2] == (200, 0.25)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"latency": {"kind": "gamma"}}, "model.latency.kind: expected one of"),
        ({"latency": {"kind": "lognormal", "median": 1}}, "model.latency.sigma: required"),
        ({"latency": -1}, "model.latency.value: expected a non-negative number"),
        ({"keys": {"k": {"rpm": "fast"}}}, "model.keys.k.rpm: expected a non-negative number"),
        ({"keys": {"k": {"secret": "x"}}}, "model.keys.k.secret: unknown field"),
        ({"failures": [{"key": "k", "status": 200}]}, "model.failures[0].status"),
        ({"failures": [{"key": "k", "start": 5, "end": 1}]}, "model.failures[0].end"),
        ({"stream_rate": 0}, "model.stream_rate: must be more than zero"),
        ({"color": "blue"}, "model.color: unknown field"),
    ],
)
def test_model_validation_names_the_field(data: dict[str, object], message: str) -> None:
    with pytest.raises(UpstreamModelError, match=message.replace("[", r"\[").replace("]", r"\]")):
        UpstreamModel.from_json(data)


def test_model_files_json_and_toml(tmp_path: Path) -> None:
    toml = tmp_path / "up.toml"
    toml.write_text(
        'latency = {kind = "fixed", value = 0.3}\n'
        "[default]\nrpm = 60\n"
        '[keys.key-0]\ncredits = 5.0\naccount = "acct"\n'
        '[[failures]]\nkey = "key-1"\nstart = 10\nstatus = 401\n'
    )
    model = load_upstream_model(toml)
    assert model.for_key("key-0").credits == 5.0 and model.for_key("key-0").rpm == 60
    assert model.failures[0].status == 401
    again = tmp_path / "up.json"
    import json

    again.write_text(json.dumps(model.to_json()))
    assert load_upstream_model(again) == model
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(UpstreamModelError, match=r"bad\.json: not valid JSON"):
        load_upstream_model(bad)
    with pytest.raises(UpstreamModelError, match="cannot read"):
        load_upstream_model(tmp_path / "missing.toml")


BIG = 10**400


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"probe_latency": 0}, "probe_latency: must be more than zero"),
        ({"stream_rate": BIG}, "stream_rate: expected a non-negative number"),
        ({"probe_latency": BIG}, "probe_latency: expected a non-negative number"),
        ({"default": {"rpm": BIG}}, "default.rpm: expected a non-negative number"),
        ({"latency": {"kind": "fixed", "value": BIG}}, "latency.value: expected a non-negative"),
        ({"failures": [{"key": "k", "start": BIG}]}, "failures[0].start: expected a non-negative"),
        ({"accounts": {"a": {"credits": BIG}}}, "accounts.a.credits: expected a non-negative"),
    ],
)
def test_model_numbers_must_be_usable(data: dict[str, object], message: str) -> None:
    with pytest.raises(UpstreamModelError) as info:
        UpstreamModel.from_json(data)
    assert message in str(info.value)


def test_a_probe_latency_of_zero_is_refused_from_python_too() -> None:
    """Probes answered at the instant they are sent, with ``probe_interval=0``,
    would hold virtual time still forever."""
    with pytest.raises(UpstreamModelError, match="probe_latency: must be more than zero"):
        SimulatedUpstream(UpstreamModel(probe_latency=0.0), ["k"])


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("m.json", "[" * 100_000 + "]" * 100_000),
        ("m.toml", "a = " + "[" * 100_000 + "]" * 100_000),
        ("n.json", '{"keys": {"k": ' + '{"a":' * 50_000 + "1" + "}" * 50_001 + "}"),
    ],
)
def test_deeply_nested_model_files_are_model_errors(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UpstreamModelError, match="nested too deeply"):
        load_upstream_model(path)
