"""docs/replay.md stays true: its worked example and its Python example run as shown."""

from __future__ import annotations

import pathlib
import re
import shlex

import pytest

from keyrotor.cli import main

DOC = pathlib.Path(__file__).parents[2] / "docs" / "replay.md"


def test_the_worked_example_prints_what_the_doc_shows(capsys: pytest.CaptureFixture[str]) -> None:
    text = DOC.read_text()
    block = text.split("### A worked example", 1)[1].split("```\n", 2)[1]
    command, expected = block.split("\n", 1)
    assert command.startswith("$ keyrotor replay ")
    assert main(shlex.split(command)[2:]) == 0
    assert capsys.readouterr().out == expected


def test_the_python_trace_example_runs(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = DOC.read_text()
    section = text.split("### Writing and reading from Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(code[1], str(DOC), "exec"), namespace)
    trace = namespace["trace"]
    assert [r.t for r in trace.records] == [0.0]  # type: ignore[attr-defined]
    assert (tmp_path / "traffic.jsonl").read_text().count("\n") == 2
