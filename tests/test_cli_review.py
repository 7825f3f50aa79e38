"""Command-line mistakes a review found: each is one line on stderr naming the
problem and the fix, exit status 2, no traceback, no secret, nothing stored lost."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from keyrotor.cli import main

from .test_cli_errors import ADMIN_TOKEN, FAKE_KEY, closed_port, refused

KEYS = {"OPENROUTER_KEYS": FAKE_KEY}
PASSWORD = "Hunter2-pass"


def one_line(capsys: pytest.CaptureFixture[str], code: int, *secrets: str) -> str:
    """The single stderr line of a command that exited ``code`` 2."""
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert err.count("\n") == 1 and err.strip(), err
    for secret in secrets:
        assert secret not in out + err
    return err


# 1., 4., 5. and 8.: serve, as a real process -----------------------------------


def test_serve_with_a_400_digit_number_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "k.toml").write_text("[http]\nconnect = 1" + "0" * 400 + "\n", "utf-8")
    result = refused(tmp_path, "serve", "--no-state", "--config", "k.toml", **KEYS)
    assert "[http] connect is far too large" in result.stderr


def test_serve_with_an_upstream_port_that_is_not_one(tmp_path: Path) -> None:
    url = "http://127.0.0.1:99999/api/v1"
    result = refused(tmp_path, "serve", "--no-state", "--port", "0", "--upstream", url, **KEYS)
    assert "upstream must have a port from 1 to 65535" in result.stderr


def test_serve_refuses_to_record_over_its_state_file(tmp_path: Path) -> None:
    state = tmp_path / "s.db"
    db = sqlite3.connect(state)
    db.execute("CREATE TABLE keep (alias TEXT)")
    db.execute("INSERT INTO keep VALUES ('runtime-key')")
    db.commit()
    db.close()
    before = state.read_bytes()
    result = refused(
        tmp_path, "serve", "--port", "0", "--state", str(state), "--record", str(state), **KEYS
    )
    assert "is the state file: recording would overwrite it" in result.stderr
    assert state.read_bytes() == before


def test_serve_with_a_mistyped_shared_url_never_shows_its_password(tmp_path: Path) -> None:
    url = f"redis://:{PASSWORD}@10.0.0.5:6379x/0"
    result = refused(tmp_path, "serve", "--no-state", "--port", "0", "--shared", url, **KEYS)
    assert result.stderr.startswith("keyrotor serve: command line: --shared: ")
    assert PASSWORD not in result.stderr


# 7. --------------------------------------------------------------------------


def test_workers_get_an_empty_host_passed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import keyrotor.adapters.proxy.workers as workers

    seen: dict[str, Any] = {}

    def supervise(args: list[str], count: int, host: str, *rest: Any) -> int:
        seen.update(args=args, count=count, host=host)
        return 0

    monkeypatch.setattr(workers, "supervise", supervise)
    monkeypatch.setenv("OPENROUTER_KEYS", FAKE_KEY)
    monkeypatch.setenv("KEYROTOR_CLIENT_TOKENS", "client-token-" + "c0ffee" * 4)
    shared = "redis://127.0.0.1:6379/0"
    argv = ["serve", "--host", "", "--workers", "2", "--shared", shared, "--no-state"]
    assert main(argv) == 0
    assert seen["host"] == "" and seen["count"] == 2
    assert seen["args"][seen["args"].index("--host") + 1] == ""


# 10. and 18. -------------------------------------------------------------------


@pytest.mark.parametrize(
    "token", ["admin-SECRET-token-0123456789\n# rotated", "admin-SECRET-token-0123456789€"]
)
def test_keys_never_shows_an_admin_token_it_cannot_send(
    token: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KEYROTOR_ADMIN_TOKEN", token)
    code = main(["keys", "--url", f"http://127.0.0.1:{closed_port()}", "list"])
    err = one_line(capsys, code, "SECRET")
    assert "KEYROTOR_ADMIN_TOKEN has whitespace, a second line" in err


@pytest.mark.parametrize(
    "token", ["client-SECRET-token-0123456789\n# ci", "client-SECRET-token-0123456789€"]
)
def test_models_never_shows_a_client_token_it_cannot_send(
    token: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KEYROTOR_TOKEN", token)
    code = main(["models", "--proxy", f"http://127.0.0.1:{closed_port()}"])
    assert "KEYROTOR_TOKEN has whitespace" in one_line(capsys, code, "SECRET")


def test_a_user_and_password_in_a_proxy_url_are_never_shown(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KEYROTOR_ADMIN_TOKEN", ADMIN_TOKEN)
    url = f"https://admin:{PASSWORD}@127.0.0.1:{closed_port()}"
    err = one_line(capsys, main(["keys", "--url", url, "list"]), PASSWORD)
    assert "--url must not hold a user or password" in err
    err = one_line(capsys, main(["models", "--proxy", url]), PASSWORD)
    assert "--proxy must not hold a user or password" in err


# 11. -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["--upstream", "http://[::1"], "--upstream must be an http(s) URL"),
        (["--upstream", "http://127.0.0.1:abc"], "--upstream must have a port from 1 to 65535"),
        (["--upstream", "http://exa mple.com"], "--upstream must not have spaces"),
        (["--upstream", "http://a..b"], "--upstream must have a valid host name"),
        (["--proxy", "http://[::1"], "--proxy must be an http(s) URL"),
        (["--proxy", "http://127.0.0.1:99999"], "--proxy must have a port from 1 to 65535"),
    ],
)
def test_models_with_a_malformed_url(
    argv: list[str], problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = one_line(capsys, main(["models", *argv]))
    assert err.startswith(f"keyrotor models: {problem}") and "; fix: " in err


def test_models_with_a_malformed_base_url_in_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OPENROUTER_BASE_URL", "http://127.0.0.1:abc")
    err = one_line(capsys, main(["models"]))
    assert err.startswith("keyrotor models: OPENROUTER_BASE_URL must have a port")


def test_models_with_a_deeply_nested_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000, "utf-8")
    err = one_line(capsys, main(["models", "--file", str(deep)]))
    assert "nested too deeply" in err
    deep.write_text(json.dumps({"data": []}), "utf-8")  # a shallow file still reads
    assert main(["models", "--file", str(deep)]) == 0


# 17. -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["add", "--weight", "nan"], "argument --weight: must be a finite number more than 0"),
        (["add", "--weight", "-1"], "argument --weight: must be a finite number more than 0"),
        (["add", "--rpm", "inf"], "argument --rpm: must be a finite number more than 0"),
        (["add", "--credits", "-0.5"], "argument --credits: must be a finite number 0 or more"),
        (["add", "--max-in-flight", "0"], "argument --max-in-flight: must be at least 1"),
        (["mark", "env1", "rate_limited", "--duration", "1e12"], "less than 315360000"),
        (["mark", "env1", "rate_limited", "--duration", "-5"], "more than 0, not '-5'"),
        (["mark", "env1", "rate_limited", "--duration", "nan"], "more than 0, not 'nan'"),
        (["add", "--alias", "nl\n"], "argument --alias: 'nl\\n' is not an alias"),
    ],
)
def test_keys_flag_values_are_checked_before_the_proxy_is_asked(
    argv: list[str],
    problem: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("KEYROTOR_ADMIN_TOKEN", ADMIN_TOKEN)
    with pytest.raises(SystemExit) as info:
        main(["keys", "--url", f"http://127.0.0.1:{closed_port()}", *argv])
    code = info.value.code
    assert problem in one_line(capsys, code if isinstance(code, int) else 1)


def test_output_cut_short_by_a_pipe_is_no_traceback(tmp_path: Path) -> None:
    # `keyrotor models --json | head`: the reader leaves; a traceback followed.
    from keyrotor.testing.catalogs import realistic_models

    catalog = tmp_path / "models.json"
    catalog.write_text(json.dumps({"data": [m.to_json() for m in realistic_models()]}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "keyrotor.cli", "models", "--file", str(catalog), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(100)  # the reader takes a little, then goes
    proc.stdout.close()
    with proc.stderr:
        errors = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in errors and "BrokenPipeError" not in errors, errors


def test_write_trace_with_a_route_is_refused_not_ignored(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "keyrotor.cli", "replay", "--scenario", "free-day", "--route",
         "free", "--requests", "10", "--write-trace", str(trace)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and "--write-trace does not apply with --route" in done.stderr
    assert not trace.exists()


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]])
def test_a_shared_pool_without_the_redis_client_is_one_line(
    tmp_path: Path, workers: list[str]
) -> None:
    # Without the `shared` extra, --shared was a traceback (exit 1); with
    # --workers, each worker died so and was started again every 30 s, forever.
    (tmp_path / "no_coredis.py").write_text(
        "import sys\nsys.modules['coredis'] = None  # not installed\n"
        "from keyrotor.cli import main\nsys.exit(main())\n",
        "utf-8",
    )
    shared = "redis://127.0.0.1:9/0"
    argv = ["serve", "--no-state", "--port", "0", "--shared", shared, *workers]
    result = refused(tmp_path, *argv, module="no_coredis", **KEYS)
    assert "needs the Redis client coredis" in result.stderr
    assert "pip install 'keyrotor[shared]'" in result.stderr
