"""The proxy's log (``adapters/proxy/logs.py``): lines written at once outside
``batched``, in batches inside it, none lost and in order, whatever the thread.

The batching tests run on trio's MockClock (``autojump_clock``): their times are
virtual and exact.
"""

from __future__ import annotations

import io
import json

import pytest
import trio
import trio.testing

from keyrotor.adapters.proxy.logs import FLUSH_INTERVAL, MAX_BATCH, LineLog


class CountingStream(io.StringIO):
    """A text stream that counts its writes (each one a system call on a file)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)

    def records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.getvalue().splitlines()]


def test_a_record_is_one_json_line_written_at_once_outside_batched() -> None:
    stream = CountingStream()
    log = LineLog(stream)
    log({"event": "start", "port": 8080})
    assert stream.writes == 1
    (record,) = stream.records()
    assert record["event"] == "start" and record["port"] == 8080
    assert isinstance(record["ts"], float)


def test_json_lines_keep_every_field_and_type() -> None:
    stream = CountingStream()
    log = LineLog(stream)
    log({"status": 200, "cost_usd": 0.000123, "ok": True, "none": None, "path": 'a"b\\c'})
    log({})  # only the time
    log({"ts": 5, "event": "replayed"})  # a record's own "ts" wins, as it always did
    log({"error": ValueError("boom")})  # not JSON: written as its str
    first, empty, own, error = stream.records()
    assert first == {
        "ts": first["ts"], "status": 200, "cost_usd": 0.000123, "ok": True, "none": None,
        "path": 'a"b\\c',
    }  # fmt: skip
    assert set(empty) == {"ts"} and isinstance(empty["ts"], float)
    assert own == {"ts": 5, "event": "replayed"}
    assert error["error"] == "boom"


def test_the_text_format_is_key_value_pairs() -> None:
    stream = CountingStream()
    LineLog(stream, "text")({"event": "start", "port": 8080})
    assert stream.getvalue().endswith(" event=start port=8080\n")
    assert stream.getvalue().startswith("ts=")


def test_a_text_value_cannot_start_a_line_or_a_field_of_its_own() -> None:
    """A caller names the model: its newlines, spaces and ``=`` are quoted."""
    stream = CountingStream()
    forged = "x:free\nts=1 event=admin action=remove alias=k1"
    LineLog(stream, "text")({"event": "request", "model": forged, "empty": "", "n": 3})
    line = stream.getvalue()
    assert line.count("\n") == 1 and line.endswith("\n")
    assert f" model={json.dumps(forged)} " in line
    assert ' empty="" n=3' in line
    assert " event=request " in line and "event=admin" not in line.replace(json.dumps(forged), "")


@pytest.mark.trio
async def test_lines_are_written_together_one_interval_after_the_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = CountingStream()
    log = LineLog(stream)
    with log.batched():
        start = trio.current_time()
        for i in range(5):
            log({"n": i})
            await trio.sleep(FLUSH_INTERVAL / 10)
        assert stream.writes == 0  # queued, not written
        await trio.sleep(FLUSH_INTERVAL - 5 * FLUSH_INTERVAL / 10 + 0.001)
        assert stream.writes == 1
        assert trio.current_time() - start < FLUSH_INTERVAL + 0.01
        assert [r["n"] for r in stream.records()] == [0, 1, 2, 3, 4]
        await trio.sleep(30)  # idle: nothing to write, no write
        assert stream.writes == 1
        log({"n": 5})
        await trio.sleep(FLUSH_INTERVAL + 0.001)
        assert stream.writes == 2
    assert [r["n"] for r in stream.records()] == [0, 1, 2, 3, 4, 5]


@pytest.mark.trio
async def test_leaving_batched_writes_what_is_queued_and_later_lines_go_straight_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = CountingStream()
    log = LineLog(stream)
    with pytest.raises(ValueError):
        with log.batched():
            log({"n": 1})
            log({"n": 2})
            raise ValueError("the server failed")
    assert [r["n"] for r in stream.records()] == [1, 2]
    log({"n": 3})
    assert [r["n"] for r in stream.records()] == [1, 2, 3]


@pytest.mark.trio
async def test_a_full_batch_is_written_at_once(autojump_clock: trio.testing.MockClock) -> None:
    stream = CountingStream()
    log = LineLog(stream)
    with log.batched():
        for i in range(MAX_BATCH):
            log({"n": i})
        assert stream.writes == 1  # no wait for the interval
        assert len(stream.records()) == MAX_BATCH


@pytest.mark.trio
async def test_a_record_from_another_thread_joins_the_queue_and_is_written(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = CountingStream()
    log = LineLog(stream)
    with log.batched():
        log({"n": 1})
        await trio.sleep(FLUSH_INTERVAL + 0.001)
        assert stream.writes == 1
        # Nothing queued: only the other thread's record can wake the flusher.
        await trio.to_thread.run_sync(log, {"n": 2, "from": "thread"})
        await trio.sleep(FLUSH_INTERVAL + 0.001)
        assert stream.writes == 2  # written by the flusher, inside the block
    assert [r["n"] for r in stream.records()] == [1, 2]


@pytest.mark.trio
async def test_batched_twice_at_once_is_refused() -> None:
    log = LineLog(CountingStream())
    with log.batched():
        with pytest.raises(RuntimeError, match="already batched"):
            with log.batched():
                pass  # pragma: no cover


class BrokenPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.trio
async def test_a_log_that_cannot_be_written_loses_lines_not_the_proxy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = LineLog(BrokenPipe())
    log({"n": 0})  # at once: no exception
    with log.batched():
        log({"n": 1})
        await trio.sleep(FLUSH_INTERVAL + 0.001)  # the flusher's write fails: it lives on
        log({"n": 2})
        await trio.sleep(FLUSH_INTERVAL + 0.001)
    closed = io.StringIO()
    closed.close()
    LineLog(closed)({"n": 3})  # a closed stream: ValueError, suppressed too
