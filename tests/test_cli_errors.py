"""Bad input to every command is one line on stderr naming the problem and the
fix, exit status 2, never a traceback: each case runs as a real process."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyrotor.adapters.config import ConfigError, load_config
from keyrotor.adapters.proxy.main import run
from keyrotor.adapters.storage import StateStore

FAKE_KEY = "sk-or-v1-" + "0123456789abcdef" * 4  # a fake key, never a real one
CLIENT_TOKEN = "client-token-" + "c0ffee" * 4
ADMIN_TOKEN = "admin-token-" + "ad" * 12


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 this test holds with a listening socket."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def environ(tmp: Path, **extra: str) -> dict[str, str]:
    """The caller's environment less keyrotor's variables; state under ``tmp``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OPENROUTER_", "KEYROTOR_"))
    }
    return {**env, "KEYROTOR_STATE": str(tmp / "state.db"), "XDG_DATA_HOME": str(tmp), **extra}


def refused(
    tmp: Path, *args: str, module: str = "keyrotor.cli", **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m module args`` and check: status 2, one line on stderr, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        env=environ(tmp, **env),
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=120,  # a guard against a hang (a serve that started), not a bound on speed
        check=False,
    )
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.strip(), result.stderr
    assert FAKE_KEY not in result.stderr
    return result


KEYS = {"OPENROUTER_KEYS": FAKE_KEY}


def test_serve_on_a_busy_port(tmp_path: Path, busy_port: int) -> None:
    result = refused(tmp_path, "serve", "--no-state", "--port", str(busy_port), **KEYS)
    assert result.stderr == (
        f"keyrotor serve: cannot listen on 127.0.0.1:{busy_port}: address already in use; "
        "fix: choose another --port, or stop the process using it\n"
    )


def test_serve_on_a_busy_port_with_a_state_file(tmp_path: Path, busy_port: int) -> None:
    state = tmp_path / "kept" / "state.db"
    result = refused(tmp_path, "serve", "--port", str(busy_port), "--state", str(state), **KEYS)
    assert "address already in use" in result.stderr


def test_a_failed_bind_closes_the_state_file(tmp_path: Path, busy_port: int) -> None:
    """In this process: the state file's lock is released, so it opens again at once."""
    state = tmp_path / "state.db"
    config = load_config(None, KEYS, {"port": busy_port, "state.path": str(state)})
    with pytest.raises(ConfigError, match="address already in use"):
        run(config, io.StringIO())
    StateStore.open(state, secret_key=None).close()  # StorageError if still locked


@pytest.mark.parametrize("tokens", [{}, {"KEYROTOR_CLIENT_TOKENS": CLIENT_TOKEN}])
@pytest.mark.parametrize(
    ("host", "problem"),
    [
        ("no.such.host.invalid", "host cannot be resolved: 'no.such.host.invalid'"),
        ("999.1.1.1", "host is not a valid IP address: '999.1.1.1'"),
    ],
)
def test_serve_on_a_bad_host_names_the_address_first(
    tmp_path: Path, host: str, problem: str, tokens: dict[str, str]
) -> None:
    result = refused(tmp_path, "serve", "--no-state", "--host", host, **KEYS, **tokens)
    assert problem in result.stderr and "token" not in result.stderr


def test_serve_on_an_address_this_machine_does_not_have(tmp_path: Path) -> None:
    result = refused(
        tmp_path, "serve", "--no-state", "--host", "192.0.2.1", "--port", "0",
        **KEYS, KEYROTOR_CLIENT_TOKENS=CLIENT_TOKEN,
    )  # fmt: skip
    assert "cannot listen on 192.0.2.1:0: no network interface" in result.stderr


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (("--port", "70000"), "[server] port must be from 0 to 65535, got 70000"),
        (("--port", "abc"), "keyrotor serve: argument --port: invalid int value: 'abc'"),
        (("--config", "missing.toml"), "missing.toml: cannot read the configuration file"),
        (("--config", "broken.toml"), "broken.toml: invalid TOML"),
        (("--upstream", "notaurl"), "upstream must be an http(s) URL"),
        (("--record", "."), "cannot write the trace file .: Is a directory"),
    ],
)
def test_serve_bad_input(tmp_path: Path, args: tuple[str, ...], problem: str) -> None:
    (tmp_path / "broken.toml").write_text("[server\nport = 1\n")
    result = refused(tmp_path, "serve", "--no-state", "--port", "0", *args, **KEYS)
    assert problem in result.stderr
    assert "; fix: " in result.stderr or "; see keyrotor serve --help" in result.stderr


def test_serve_without_keys(tmp_path: Path) -> None:
    result = refused(tmp_path, "serve", "--no-state")
    assert "no API keys" in result.stderr and "OPENROUTER_KEYS" in result.stderr


def test_keys_with_a_url_that_is_not_one(tmp_path: Path) -> None:
    result = refused(tmp_path, "keys", "--url", "notaurl", "list", KEYROTOR_ADMIN_TOKEN=ADMIN_TOKEN)
    assert result.stderr == (
        "keyrotor keys: --url 'notaurl' is not an http(s) URL; fix: give the proxy's address, "
        "such as http://127.0.0.1:8080\n"
    )
    from_env = refused(tmp_path, "keys", "list", KEYROTOR_URL="ftp://x", KEYROTOR_ADMIN_TOKEN="t")
    assert "KEYROTOR_URL 'ftp://x' is not an http(s) URL" in from_env.stderr


def test_keys_with_no_proxy_there_is_unusable(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    result = refused(tmp_path, "keys", "--url", url, "list", KEYROTOR_ADMIN_TOKEN=ADMIN_TOKEN)
    assert result.stderr.startswith(f"keyrotor keys list: cannot reach the proxy at {url}: ")


def test_keys_bad_input(tmp_path: Path) -> None:
    assert "KEYROTOR_ADMIN_TOKEN" in refused(tmp_path, "keys", "list").stderr
    assert "required: ACTION" in refused(tmp_path, "keys").stderr
    assert "invalid choice: 'sleepy'" in refused(tmp_path, "keys", "mark", "a", "sleepy").stderr


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (("missing.jsonl",), "missing.jsonl: cannot read"),
        (("--scenario", "nope"), "unknown scenario 'nope'"),
        (("--scenario", "steady", "--keys", "0"), "--keys must be at least 1"),
        (("--scenario", "steady", "--requests", "many"), "invalid int value: 'many'"),
        (("--scenario", "steady", "--upstream-model", "missing.toml"), "cannot read"),
    ],
)
def test_replay_bad_input(tmp_path: Path, args: tuple[str, ...], problem: str) -> None:
    assert problem in refused(tmp_path, "replay", *args).stderr
    assert problem in refused(tmp_path, *args, module="keyrotor.replay.cli").stderr


def test_the_command_itself(tmp_path: Path) -> None:
    assert "invalid choice: 'nosuch'" in refused(tmp_path, "nosuch").stderr
    assert "no command given" in refused(tmp_path).stderr
    demo = refused(tmp_path, "demo", "--requests", "0")
    assert demo.stderr == (
        "keyrotor demo: --requests must be at least 1; see keyrotor demo --help\n"
    )


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (("--host", "10.1.2.3"), "binds to loopback addresses only"),
        (("--port", "70000"), "--port must be from 0 to 65535"),
        (("--scenario", "healthy", "--keys", "0"), "--keys must be at least 1"),
        (("--scenario", "nope"), "invalid choice: 'nope'"),
    ],
)
def test_fake_upstream_bad_input(tmp_path: Path, args: tuple[str, ...], problem: str) -> None:
    result = refused(tmp_path, *args, module="keyrotor.testing.fake_upstream")
    assert result.stderr.startswith("python -m keyrotor.testing.fake_upstream: ")
    assert problem in result.stderr


def test_fake_upstream_on_a_busy_port(tmp_path: Path, busy_port: int) -> None:
    result = refused(tmp_path, "--port", str(busy_port), module="keyrotor.testing.fake_upstream")
    assert f"cannot listen on 127.0.0.1:{busy_port}: address already in use" in result.stderr


def test_forget_keys_refuses_a_path_without_a_state_file(tmp_path: Path) -> None:
    typo = tmp_path / "stat.db"
    result = refused(tmp_path, "forget-keys", str(typo), module="keyrotor.adapters.storage")
    assert result.stderr.startswith(f"keyrotor storage: the state file {typo} does not exist; fix:")
    assert not typo.exists()  # no new, empty state file
    directory = refused(tmp_path, "forget-keys", str(tmp_path), module="keyrotor.adapters.storage")
    assert "is not a file" in directory.stderr
    default = refused(tmp_path, "forget-keys", module="keyrotor.adapters.storage")
    assert str(tmp_path / "state.db") in default.stderr  # $KEYROTOR_STATE, not there either
    assert not (tmp_path / "state.db").exists()
