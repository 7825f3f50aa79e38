"""Recording traces of live traffic: the proxy (`--record`) and the transports
(`client.record`). The trace says what happened, holds no prompt and no
secret, and replays."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai

from keyrotor.core import KeySpec, PoolConfig
from keyrotor.replay import load_trace, replay
from keyrotor.testing import FakeClock, FakeUpstream, Invalid, Ok, RateLimit, Scenario
from keyrotor.transports.sync import Client

SECRETS = {
    # Tails of letters no number or hex id holds: a leak check must not match the
    # digits of an unrounded float (1/9 = 0.1111...).
    "good": "sk-or-v1-record-good-" + "q" * 24,
    "bad": "sk-or-v1-record-bad-" + "w" * 24,
    "busy": "sk-or-v1-record-busy-" + "z" * 24,
}
MODEL = "openai/gpt-4o-mini"
PROMPT = "a prompt that must never be recorded"


def fake_clock() -> FakeClock:
    """The fake upstream's clock, stopped at the start of busy's 60 s window (windows
    are aligned on the clock): on the wall clock a run across a minute's end could
    let busy answer 200 twice."""
    return FakeClock(start=1_700_000_040.0)  # a multiple of 60


def scenario() -> Scenario:
    sc = Scenario()
    sc.add(SECRETS["good"], Ok(), alias="good")
    sc.add(SECRETS["bad"], Invalid(), alias="bad")
    sc.add(SECRETS["busy"], RateLimit(limit=1, window=60), alias="busy")
    return sc


def check_private(text: str) -> None:
    assert PROMPT not in text
    for secret in SECRETS.values():
        assert secret not in text and secret[-16:] not in text


def test_keyrotor_serve_records_a_trace_that_replays(tmp_path: Path) -> None:
    trace_file = tmp_path / "traffic.jsonl"
    toml = "".join(f'[[keys]]\nalias = "{a}"\nsecret_env = "KEY_{a.upper()}"\n' for a in SECRETS)
    (tmp_path / "k.toml").write_text(toml)
    env = {**os.environ, **{f"KEY_{a.upper()}": s for a, s in SECRETS.items()}}
    with FakeUpstream.running_in_thread(scenario(), clock=fake_clock()) as upstream:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "keyrotor.cli", "serve", "--port", "0", "--no-state",
                "--config", str(tmp_path / "k.toml"), "--upstream", upstream.url,
                "--record", str(trace_file),
            ],
            env=env, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stderr is not None
            url = (
                next(line for line in proc.stderr if '"event":"listening"' in line)
                .split('"url":"')[1]
                .split('"')[0]
            )
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            messages = [{"role": "user", "content": PROMPT}]
            for _ in range(6):
                client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
            chunks = client.chat.completions.create(
                model=MODEL,
                messages=messages,  # type: ignore[arg-type]
                stream=True,
                extra_headers={"x-keyrotor-session": "user-42"},
            )
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            client.close()
            models = httpx.get(f"{url}/v1/models")  # from the catalog: no pool request
            assert models.status_code == 200 and models.json()["data"]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
    text = trace_file.read_text()
    check_private(text)
    trace = load_trace(trace_file)
    assert trace.header.source == "proxy"
    assert {k["key_id"] for k in trace.header.keys} == set(SECRETS)
    records = trace.records
    assert len(records) == 7 and all(r.outcome == "delivered" for r in records)
    chats = [r for r in records if r.model == MODEL]
    assert len(chats) == 7
    streamed = [r for r in chats if r.stream]
    assert len(streamed) == 1
    session = streamed[0].session  # a keyed hash, not the caller's label
    assert session is not None and len(session) == 16 and "user-42" not in text
    served = [r.attempts[-1].key for r in chats]
    assert served.count("busy") == 1 and served.count("good") == 6  # busy's one allowed
    for record in chats:
        assert record.attempts[-1].status == 200
        assert record.completion_tokens > 0 and record.cost and record.cost > 0
        assert all(a.t >= 0 and a.latency >= 0 for a in record.attempts)
    failed = [a for r in records for a in r.attempts if a.status != 200]
    assert {(a.key, a.status) for a in failed} == {("bad", 401), ("busy", 429)}
    assert all(a.headers.get("retry-after") for a in failed if a.status == 429)
    arrivals = [r.t for r in records]
    assert arrivals == sorted(arrivals) and arrivals[0] >= 0
    # The recorded outcomes replay through the core, as they were.
    report = replay(trace_file, policy=["round_robin", "least_busy"]).to_json()
    assert '"requests": 7' in report or '"requests":7' in report


def test_a_transport_records_too_and_stops_when_closed(tmp_path: Path) -> None:
    trace_file = tmp_path / "client.jsonl"
    with FakeUpstream.running_in_thread(scenario(), clock=fake_clock()) as upstream:
        with Client(SECRETS, upstream.url) as client:
            recorder = client.record(trace_file)
            for _ in range(4):
                reply = client.request(
                    "POST",
                    "/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]},
                    group="batch-1",
                )
                assert reply.status_code == 200
            assert recorder.writer.written == 4
        assert client.driver.recorder is None
    text = trace_file.read_text()
    check_private(text)
    trace = load_trace(trace_file)
    assert trace.header.source == "transport"
    groups = {r.group for r in trace.records}  # one label, hashed the same way each time
    assert len(groups) == 1 and "batch-1" not in groups and "batch-1" not in text
    assert all(r.attempts[-1].status == 200 for r in trace.records)
    assert {r.attempts[-1].key for r in trace.records} == {"good", "busy"}
    assert sum(len(r.attempts) for r in trace.records) > 4  # the failovers are in it


def test_error_codes_come_from_metadata_never_from_the_message() -> None:
    from keyrotor.replay.record import error_code

    body = (
        b'{"error": {"code": 402, "message": "secret text",'
        b' "metadata": {"limit_source": "openrouter_credits"}}}'
    )
    assert error_code(body) == "openrouter_credits"
    assert error_code({"error": {"code": 429, "message": "x"}}) == "429"
    assert error_code({"error": {"type": "rate_limit_error"}}) == "rate_limit_error"
    assert error_code({"error": {"code": "a message with; punctuation!"}}) is None
    assert error_code({"error": {"code": "Your account john doe is suspended"}}) is None
    assert error_code(b"not json") is None and error_code(None) is None
    assert error_code(b"[" * 50_000 + b"]" * 50_000) is None  # nested too deeply: not JSON


def test_a_request_body_nested_too_deeply_is_described_as_no_model(tmp_path: Path) -> None:
    from keyrotor.replay.record import TraceRecorder

    recorder = TraceRecorder(tmp_path / "t.jsonl", PoolConfig(keys=[KeySpec(key_id="a")]), 0.0)
    recorder.describe(b'{"model": "m", "stream": true}')
    assert recorder._next == ("m", True)
    recorder.describe(b'{"model": "m", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")
    assert recorder._next == (None, False)
    recorder.close()


def test_a_failing_recording_stops_itself_and_never_the_traffic(tmp_path: Path) -> None:
    heard: list[str] = []
    with FakeUpstream.running_in_thread(scenario(), clock=fake_clock()) as upstream:
        with Client({"good": SECRETS["good"]}, upstream.url) as client:
            recorder = client.record(tmp_path / "t.jsonl")

            def full_disk(record: object) -> None:
                raise OSError(28, "No space left on device")

            recorder.writer.write = full_disk  # type: ignore[method-assign]
            client.driver.on_recording_error = heard.append
            for _ in range(3):
                reply = client.request(
                    "POST", "/chat/completions", json={"model": MODEL, "messages": []}
                )
                assert reply.status_code == 200
            assert client.driver.recorder is None
            assert client.status()["stats"]["inFlight"] == 0
    assert len(heard) == 1 and "No space left on device" in heard[0]


def test_a_request_rejected_at_once_is_recorded_with_its_model(tmp_path: Path) -> None:
    from keyrotor.transports.errors import KeyrotorError

    with FakeUpstream.running_in_thread(scenario(), clock=fake_clock()) as upstream:
        config = PoolConfig(keys=[KeySpec(key_id="bad")], queue_timeout=0.2)
        with Client({"bad": SECRETS["bad"]}, upstream.url, config) as client:
            client.record(tmp_path / "t.jsonl")
            for _ in range(2):  # the first revokes the only key; the second finds none
                with contextlib.suppress(KeyrotorError):
                    client.request("POST", "/chat/completions", json={"model": MODEL})
    records = load_trace(tmp_path / "t.jsonl").records
    assert [r.model for r in records] == [MODEL, MODEL]
    assert records[-1].outcome == "rejected" and records[-1].attempts == []
    assert records[0].attempts[0].status == 401
