"""``keyrotor replay``: scenarios, files, determinism, bad input, plots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from keyrotor.cli import main
from keyrotor.replay import SCENARIOS


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["replay", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_scenario_list_names_every_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--scenario", "list")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == [*SCENARIOS, "free-day"]


def test_scenario_run_prints_policies_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "--scenario", "failing_key", "--requests", "400", "--policy", "round_robin",
        "--policy", "least_busy", "--speed",
    )  # fmt: skip
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("replay of failing_key: 400 requests")
    assert lines[2].split() == ["round_robin", "least_busy"]
    served = next(line for line in lines if line.startswith("requests served"))
    assert served.split()[-2:] == ["400", "400"]
    assert "simulated requests/s" in err


def test_same_input_same_bytes_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--scenario", "burst", "--requests", "500", "--policy", "all", "--seed", "4", "--json")
    first = run(capsys, *args)
    second = run(capsys, *args)
    assert first[0] == 0 and first[1] == second[1]
    data = json.loads(first[1])
    assert data["source"]["seed"] == 4 and len(data["policies"]) == 5


def test_file_run_with_an_upstream_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "steady.jsonl"
    code, _, err = run(
        capsys, "--scenario", "steady", "--requests", "300", "--write-trace", str(trace)
    )
    assert code == 0 and "wrote 300 requests" in err
    model = tmp_path / "up.toml"
    model.write_text('[[failures]]\nkey = "key-0"\nstart = 5\nstatus = 401\n')
    report = tmp_path / "report.json"
    code, out, _ = run(
        capsys, str(trace), "--upstream-model", str(model), "--keys", "3",
        "--set", "max_attempts=2", "--output", str(report),
    )  # fmt: skip
    assert code == 0
    data = json.loads(report.read_text())
    assert data["source"] == {
        "name": "steady.jsonl",
        "requests": 300,
        "duration": data["source"]["duration"],
        "keys": 3,
        "seed": 0,
        "upstream": "simulated",
        "options": {"max_attempts": 2},
    }
    m = data["policies"]["round_robin"]
    assert m["served"] == 300 and m["upstream"]["answers"]["401"] == 1
    assert "replay of steady.jsonl" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give a TRACE file or --scenario NAME"),
        (("--scenario", "nope"), "unknown scenario 'nope'"),
        (("--scenario", "steady", "--policy", "random"), "unknown policy 'random'"),
        (("--scenario", "steady", "--keys", "0"), "--keys must be at least 1"),
        (("--scenario", "steady", "--set", "max_attempts"), "--set expects NAME=VALUE"),
        (("--scenario", "steady", "--requests", "5", "--set", "max_attempts=0"), "max_attempts"),
        (("missing.jsonl",), "missing.jsonl: cannot read"),
        (("--scenario", "steady", "--upstream-model", "missing.toml"), "cannot read"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    code, out, err = run(capsys, *args)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("keyrotor replay: ") and message in err


def test_bad_trace_line_in_a_subprocess_has_no_traceback(tmp_path: Path) -> None:
    trace = tmp_path / "bad.jsonl"
    trace.write_text(
        '{"type":"header","format":"keyrotor-trace","version":1,"source":"proxy"}\n'
        '{"type":"request","t":"soon"}\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "keyrotor.cli", "replay", str(trace)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"keyrotor replay: {trace}:2.t: expected a non-negative number, got 'soon'\n"
    )


def test_plots_are_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys, "--scenario", "seed001", "--policy", "round_robin", "--plot", str(tmp_path)
    )
    assert code == 0
    png = tmp_path / "seed001-round_robin.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    assert f"plot: {png}" in err


def test_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--scenario", "steady", "--requests", "5000", "--progress")
    assert code == 0
    assert "\rround_robin  [" in err and "100% 5,000/5,000\n" in err


BIG = "1" + "0" * 400
HEADER = '{"type":"header","format":"keyrotor-trace","version":1,"source":"synthetic"}'


@pytest.mark.parametrize(
    ("files", "args", "message"),
    [
        ({"t.jsonl": HEADER + "\n" + "[" * 100_000 + "]" * 100_000}, ("t.jsonl",), "nested"),
        ({"t.jsonl": f'{HEADER}\n{{"type":"request","t":{BIG}}}'}, ("t.jsonl",), "2.t: expected"),
        (
            {"t.jsonl": HEADER[:-1] + f',"keys":[{{"key_id":"a","rpm":{BIG}}}]}}\n'},
            ("t.jsonl",),
            "keys[0].rpm: expected",
        ),
        (
            {"t.jsonl": HEADER[:-1] + f',"options":{{"queue_timeout":{BIG}}}}}\n'},
            ("t.jsonl",),
            "options.queue_timeout: expected",
        ),
        (
            {"m.json": "[" * 100_000 + "]" * 100_000},
            ("--scenario", "steady", "--requests", "10", "--upstream-model", "m.json"),
            "nested too deeply",
        ),
        (
            {"m.toml": "a = " + "[" * 100_000 + "]" * 100_000},
            ("--scenario", "steady", "--requests", "10", "--upstream-model", "m.toml"),
            "nested too deeply",
        ),
        (
            {"m.json": f'{{"stream_rate": {BIG}}}'},
            ("--scenario", "steady", "--requests", "10", "--upstream-model", "m.json"),
            "stream_rate: expected",
        ),
        (
            {"m.json": '{"probe_latency": 0}'},
            ("--scenario", "steady", "--requests", "10", "--upstream-model", "m.json"),
            "probe_latency: must be more than zero",
        ),
        (
            {},
            ("--scenario", "failing_key", "--keys", "2"),
            "3 keys (its upstream model names 'key-2')",
        ),
        ({}, ("--scenario", "account_limits", "--keys", "1"), "needs at least 2 keys"),
        ({}, ("--scenario", "steady", "--set", "policy=least_busy"), "use --policy"),
        ({}, ("--scenario", "steady", "--set", "seed=7"), "use --seed"),
        ({}, ("--scenario", "steady", "--set", "keys=3"), "use --keys"),
    ],
)
def test_hostile_input_exits_2_with_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    files: dict[str, str],
    args: tuple[str, ...],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    code, out, err = run(capsys, *args)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith("keyrotor replay: ") and message in err
    assert "fix" in err or "expected" in err or "use --" in err or "must be" in err
