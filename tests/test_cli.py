"""The command line: `keyrotor demo` runs the core on a built-in scenario."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from keyrotor.cli import main
from keyrotor.demo import run


def test_demo_shows_failover_and_recovery_and_no_caller_error() -> None:
    out = io.StringIO()
    outcome = run(out, requests=40)
    text = out.getvalue()
    assert outcome == {"ok": 40, "error": 0, "rejected": 0}
    assert "key bravo    healthy -> failed (http_401)" in text
    assert "attempt 2" in text  # failover inside a request
    assert "-> rate_limited" in text and "-> degraded" in text
    assert "degraded -> recovering" in text and "recovering -> healthy" in text
    assert "probe bravo (confirm_invalid)" in text
    assert "charlie  depleted" in text


def test_demo_is_deterministic() -> None:
    first, second = io.StringIO(), io.StringIO()
    run(first)
    run(second)
    assert first.getvalue() == second.getvalue()


def test_cli_demo_exit_status_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--core", "--requests", "5"]) == 0
    assert "5 of 5 requests delivered" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["demo", "--requests", "0"])
    assert info.value.code == 2
    assert main([]) == 2


def test_console_script_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "keyrotor.cli", "demo", "--core", "--requests", "3", "--color"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "\x1b[32mdelivered" in result.stdout


def test_live_proxy_demo_answers_every_request_and_shows_recovery() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "keyrotor.cli", "demo", "--requests", "40"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "40 of 40 requests answered 200 through the proxy" in out
    assert "key bravo    healthy -> failed" in out
    assert "key charlie  healthy -> depleted" in out
    assert "key delta    healthy -> rate_limited" in out
    assert "after 2 attempts" in out
    assert "recovering -> healthy" in out
    assert "sk-or-v1-demo" not in out + result.stderr
