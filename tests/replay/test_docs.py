"""docs/replay.md stays true: its worked example and its Python example run as shown."""

from __future__ import annotations

import pathlib
import re
import shlex

import pytest

from keyrotor.cli import main
from keyrotor.replay import Attempt, TraceHeader, TraceRecord, TraceWriter

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


def test_the_command_with_an_upstream_model_and_keys_runs_as_written(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The doc's `--upstream-model upstream.toml --keys 8` line, on a trace the proxy
    recorded with 8 keys of its own names (env1 ..), and the doc's upstream model
    (which names key-0 and key-1): --keys always names the pool's keys key-0, ..."""
    text = DOC.read_text()
    command = next(
        line.split("#", 1)[0]
        for line in text.split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
        if "--upstream-model upstream.toml" in line
    )
    model = text.split("## The simulated upstream", 1)[1].split("```toml\n", 1)[1]
    (tmp_path / "upstream.toml").write_text(model.split("```", 1)[0])
    aliases = [f"env{i}" for i in range(1, 9)]
    with TraceWriter(
        tmp_path / "traffic.jsonl", TraceHeader(source="proxy", keys=aliases)
    ) as writer:
        for i in range(40):
            key = aliases[i % 8]
            writer.write(TraceRecord(t=i * 0.5, attempts=[Attempt(key=key, latency=0.3)]))
    monkeypatch.chdir(tmp_path)
    args = shlex.split(command)
    assert args[:2] == ["keyrotor", "replay"] and args[args.index("--keys") + 1] == "8"
    assert main(args[1:]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.startswith("replay of traffic.jsonl: 40 requests") and ", 8 keys," in out
    # the same trace without --keys keeps its aliases, so the model's key-0 is unknown:
    assert main([a for a in args[1:] if a not in ("--keys", "8")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'key-0', 'key-1'" in err and "--keys N" in err
