"""``TraceWriter`` opening a path: it replaces an earlier trace, never a file
that is something else (a state file, a configuration file, notes)."""

from __future__ import annotations

import errno
import pathlib
import sqlite3

import pytest

from keyrotor.replay.trace import TraceHeader, TraceWriter, load_trace


def test_a_file_that_is_not_a_trace_is_not_overwritten(tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state.db"
    sqlite3.connect(state).execute("CREATE TABLE keys (alias TEXT)").connection.commit()
    config = tmp_path / "keyrotor.toml"
    config.write_text('upstream = "http://127.0.0.1:9/v1"\n', "utf-8")
    for path in (state, config):
        before = path.read_bytes()
        with pytest.raises(FileExistsError) as info:
            TraceWriter(path, TraceHeader(source="proxy"))
        assert info.value.errno == errno.EEXIST and info.value.filename == str(path)
        assert "is not a keyrotor trace" in str(info.value.strerror)
        assert path.read_bytes() == before


def test_an_earlier_trace_an_empty_file_or_a_new_path_are_written(tmp_path: pathlib.Path) -> None:
    many = [{"key_id": f"key-{i:05d}"} for i in range(2000)]  # a header longer than one read
    paths = (tmp_path / "earlier.jsonl", tmp_path / "empty.jsonl", tmp_path / "new.jsonl")
    (tmp_path / "empty.jsonl").touch()
    with TraceWriter(paths[0], TraceHeader(source="proxy", keys=many)):
        pass
    for path in paths:
        with TraceWriter(path, TraceHeader(source="proxy")):
            pass
        assert load_trace(path).header.source == "proxy"
