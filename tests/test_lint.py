"""Static checks run with the suite: ruff everywhere, mypy --strict on the core,
plain mypy on the rest and on the benchmarks (which no test runs: a benchmark
that no longer fits the code it measures fails here instead of on its next run)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_ruff_is_clean() -> None:
    for args in (("check", "."), ("format", "--check", ".")):
        result = run("ruff", *args)
        assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_on_the_core_and_plain_on_the_rest() -> None:
    for args in (("--strict", "keyrotor/core"), ("keyrotor", "benchmarks")):
        result = run("mypy", *args)
        assert result.returncode == 0, result.stdout + result.stderr
