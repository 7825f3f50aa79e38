"""The trace format: round trip, validation errors, the writer's safety rules."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest

from keyrotor.replay import (
    Attempt,
    TraceError,
    TraceHeader,
    TraceRecord,
    TraceWriter,
    load_trace,
    read_header,
    read_trace,
)
from keyrotor.replay.trace import ALLOWED_HEADERS, hash_label


def sample_records() -> list[TraceRecord]:
    return [
        TraceRecord(
            t=1.5,
            model="openai/gpt-4o-mini",
            stream=True,
            prompt_tokens=120,
            completion_tokens=48,
            session="user-7",
            group="batch-1",
            cost=0.000123,
            outcome="delivered",
            attempts=[
                Attempt(
                    key="key-a",
                    t=0.0,
                    status=429,
                    latency=0.05,
                    headers={"retry-after": "30", "x-ratelimit-remaining": "0"},
                    error="free-models-per-min",
                ),
                Attempt(key="key-b", t=0.05, status=200, latency=0.4, duration=2.0),
            ],
        ),
        TraceRecord(t=0.25, outcome="rejected"),
        TraceRecord(
            t=0.75,
            outcome="error",
            attempts=[Attempt(key="key-a", status=None, reason="timeout", latency=30.0)],
        ),
        TraceRecord(t=2.0, outcome="cancelled", cancel_after=1.25),
    ]


def test_round_trip_through_a_file_sorts_by_arrival(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    header = TraceHeader(
        source="proxy",
        keys=[{"key_id": "key-a", "account": "acct", "rpm": 60}, {"key_id": "key-b"}],
        options={"max_attempts": 2},
    )
    records = sample_records()
    with TraceWriter(path, header) as writer:
        for record in records:
            writer.write(record)
    assert writer.written == 4
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {
        "type": "header",
        "format": "keyrotor-trace",
        "version": 1,
        "source": "proxy",
        "keys": [{"key_id": "key-a", "account": "acct", "rpm": 60}, {"key_id": "key-b"}],
        "options": {"max_attempts": 2},
    }
    trace = load_trace(path)
    assert trace.header == header
    assert trace.records == sorted(records, key=lambda r: r.t)
    assert list(read_trace(path)) == records  # file order
    assert read_header(path) == header
    assert trace.duration == 2.0


def test_record_json_is_compact_and_complete() -> None:
    data = sample_records()[0].to_json()
    assert data == {
        "type": "request",
        "t": 1.5,
        "model": "openai/gpt-4o-mini",
        "stream": True,
        "prompt_tokens": 120,
        "completion_tokens": 48,
        "session": "user-7",
        "group": "batch-1",
        "cost": 0.000123,
        "outcome": "delivered",
        "attempts": [
            {
                "key": "key-a",
                "t": 0.0,
                "status": 429,
                "latency": 0.05,
                "headers": {"retry-after": "30", "x-ratelimit-remaining": "0"},
                "error": "free-models-per-min",
            },
            {"key": "key-b", "t": 0.05, "status": 200, "latency": 0.4, "duration": 2.0},
        ],
    }
    assert TraceRecord.from_json(data) == sample_records()[0]


def test_writer_keeps_only_allowed_headers_and_fields() -> None:
    out = io.StringIO()
    header = TraceHeader(keys=[{"key_id": "key-a", "secret": "hunter2", "rpm": 10}])
    record = TraceRecord(
        t=0.0,
        attempts=[
            Attempt(
                key="key-a",
                headers={
                    "Retry-After": "5",
                    "Authorization": "Bearer hunter2",
                    "Set-Cookie": "session=hunter2",
                    "X-RateLimit-Reset": "1767225600000",
                },
                error="Your prompt 'tell me a secret' was flagged!",  # free text: dropped
            )
        ],
    )
    with TraceWriter(out, header, hash_labels=True, label_key=b"k") as writer:
        writer.write(record)
        writer.write(TraceRecord(t=1.0, session="alice@example.com", group="g"))
    text = out.getvalue()
    assert "hunter2" not in text and "secret" not in text and "alice" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines[0]["keys"] == [{"key_id": "key-a", "rpm": 10}]
    assert lines[1]["attempts"][0]["headers"] == {
        "retry-after": "5",
        "x-ratelimit-reset": "1767225600000",
    }
    assert "error" not in lines[1]["attempts"][0]
    assert lines[2]["session"] == hash_label("alice@example.com", b"k")
    assert hash_label("alice@example.com", b"other") != lines[2]["session"]
    assert set(ALLOWED_HEADERS) >= {"retry-after", "x-ratelimit-remaining"}


def test_writer_refuses_secret_shaped_aliases() -> None:
    with pytest.raises(TraceError, match="looks like a secret"):
        TraceWriter(io.StringIO(), TraceHeader(keys=[{"key_id": "sk-or-v1-" + "ab12" * 8}]))


def test_writer_is_thread_safe_and_line_buffered(tmp_path: Path) -> None:
    path = tmp_path / "threads.jsonl"
    writer = TraceWriter(path, TraceHeader(source="transport"))

    def work(n: int) -> None:
        for i in range(200):
            writer.write(TraceRecord(t=n * 1000 + i, prompt_tokens=i, session=f"s{n}" * 20))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(path.read_text().splitlines()) == 801  # visible before close: line-buffered
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        writer.write(TraceRecord(t=0.0))
    assert len(load_trace(path).records) == 800


HEADER = '{"type":"header","format":"keyrotor-trace","version":1,"source":"proxy"}'


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "t.jsonl:2: not valid JSON"),
        ('{"type":"request"}', "t.jsonl:2.t: missing"),
        ('{"type":"request","t":-1}', "t.jsonl:2.t: expected a non-negative number, got -1"),
        ('{"type":"request","t":1,"stream":"yes"}', "t.jsonl:2.stream: expected true or false"),
        ('{"type":"request","t":1,"outcome":"ok"}', "t.jsonl:2.outcome: expected one of"),
        ('{"type":"request","t":1,"prompt":"hello"}', "t.jsonl:2.prompt: unknown field"),
        ('{"type":"request","t":1,"prompt_tokens":1.5}', "t.jsonl:2.prompt_tokens"),
        (
            '{"type":"request","t":1,"attempts":[{"key":"k","status":999}]}',
            "t.jsonl:2.attempts[0].status: expected a final HTTP status",
        ),
        (
            '{"type":"request","t":1,"attempts":[{"status":200}]}',
            "t.jsonl:2.attempts[0].key: missing",
        ),
        (
            '{"type":"request","t":1,"attempts":[{"key":"k","status":101}]}',
            "t.jsonl:2.attempts[0].status: expected a final HTTP status",
        ),
        (
            '{"type":"request","t":1,"attempts":[{"key":"k","status":null}]}',
            "t.jsonl:2.attempts[0].reason: an attempt without a status needs",
        ),
        (
            '{"type":"request","t":1,"attempts":[{"key":"bad key"}]}',
            "t.jsonl:2.attempts[0].key: expected a key alias",
        ),
        ('{"type":"header"}', "t.jsonl:2.type: expected 'request'"),
    ],
)
def test_bad_records_name_the_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(f"{HEADER}\n{line}\n")
    with pytest.raises(TraceError) as info:
        load_trace(path)
    assert message in str(info.value)
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize(
    ("first", "message"),
    [
        ("", "empty file"),
        ('{"type":"request","t":0}', "not a keyrotor trace"),
        (HEADER.replace('"version":1', '"version":2'), "reads version 1, got 2"),
        (HEADER.replace("proxy", "guess"), "source: expected one of"),
    ],
)
def test_bad_headers(tmp_path: Path, first: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(first + "\n" if first else "")
    with pytest.raises(TraceError, match=message):
        load_trace(path)


def test_missing_file_is_a_trace_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read"):
        load_trace(tmp_path / "nope.jsonl")


def test_blank_lines_are_skipped_and_streams_are_read() -> None:
    trace = load_trace(io.StringIO(f'{HEADER}\n\n{{"type":"request","t":3}}\n'))
    assert [r.t for r in trace.records] == [3.0]
