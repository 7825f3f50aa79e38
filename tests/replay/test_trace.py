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


def test_an_attempt_without_a_status_means_200(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(f'{HEADER}\n{{"type":"request","t":0.5,"attempts":[{{"key":"key-a"}}]}}\n')
    assert load_trace(path).records[0].attempts[0].status == 200
    path.write_text(
        f'{HEADER}\n{{"type":"request","t":0,"attempts":[{{"key":"a","status":null}}]}}\n'
    )
    with pytest.raises(TraceError, match=r"attempts\[0\]\.reason: an attempt without a status"):
        load_trace(path)


@pytest.mark.parametrize("field", ["session", "group", "route", "model"])
def test_long_labels_are_written_so_that_they_read_back(tmp_path: Path, field: str) -> None:
    """Written without hashing, a label over 256 characters becomes its first 239,
    '#' and a hash of the whole: readable, and distinct labels stay distinct."""
    path = tmp_path / "t.jsonl"
    long_a, long_b = "user-42/" + "x" * 300, "user-42/" + "x" * 299 + "y"
    with TraceWriter(path, TraceHeader(), label_key=b"k") as writer:
        for i, value in enumerate([long_a, long_b, "short", long_a]):
            writer.write(TraceRecord(t=float(i), **{field: value}))
    labels = [getattr(r, field) for r in load_trace(path).records]
    assert [len(label) for label in labels] == [256, 256, 5, 256]
    assert labels[0] == labels[3] != labels[1] and labels[2] == "short"
    assert labels[0].startswith(long_a[:239] + "#")


def test_a_too_long_label_is_refused_with_its_length(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(HEADER + "\n" + json.dumps({"type": "request", "t": 0, "session": "s" * 300}))
    with pytest.raises(TraceError, match=r":2\.session: .*at most 256 characters.*got 300"):
        load_trace(path)


BIG = "1" + "0" * 400


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, ":2: nested too deeply"),
        (f'{{"type":"request","t":{BIG}}}', ":2.t: expected a non-negative number"),
        (f'{{"type":"request","t":1,"cost":{BIG}}}', ":2.cost: expected a non-negative number"),
        (f'{{"type":"request","t":1,"prompt_tokens":{BIG}}}', ":2.prompt_tokens: expected"),
        (
            f'{{"type":"request","t":1,"attempts":[{{"key":"a","latency":{BIG}}}]}}',
            ":2.attempts[0].latency: expected a non-negative number",
        ),
    ],
    ids=["nested", "t", "cost", "tokens", "latency"],
)
def test_hostile_lines_are_trace_errors(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(f"{HEADER}\n{line}\n")
    with pytest.raises(TraceError) as info:
        load_trace(path)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ('"keys":[{"key_id":"a","rpm":BIG}]', "keys[0].rpm: expected a non-negative number"),
        ('"options":{"queue_timeout":BIG}', "options.queue_timeout: expected a finite number"),
        ('"options":{"queue_timeout":[BIG]}', "options.queue_timeout: expected a finite number"),
        ('"wall_start":BIG', "wall_start: expected a non-negative number"),
        ('"wall_start":"now"', "wall_start: expected a non-negative number"),
    ],
)
def test_hostile_headers_are_trace_errors(tmp_path: Path, header: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(HEADER[:-1] + "," + header.replace("BIG", BIG) + "}\n")
    with pytest.raises(TraceError) as info:
        load_trace(path)
    assert message in str(info.value)


def test_the_wall_clock_start_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with TraceWriter(path, TraceHeader(source="proxy", wall_start=1_796_637_600.5)):
        pass
    assert json.loads(path.read_text())["wall_start"] == 1_796_637_600.5
    assert read_header(path).wall_start == 1_796_637_600.5
    assert TraceHeader().to_json().get("wall_start") is None  # optional: old traces lack it
