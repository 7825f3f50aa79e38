"""The command line: `keyrotor demo` runs the core on a built-in scenario;
`--version`; `keys list --json`; the proxy in front of the bundled fake upstream."""

from __future__ import annotations

import io
import json
import os
import pathlib
import queue
import shlex
import signal
import subprocess
import sys
import threading
from importlib.metadata import version
from typing import IO

import httpx
import pytest

from keyrotor.adapters.config import ProxyConfig
from keyrotor.cli import main
from keyrotor.core import KeySpec, PoolConfig
from keyrotor.demo import run
from keyrotor.testing import DEMO_KEYS, FakeUpstream, Scenario

from .adapters.proxy_thread import ProxyThread

PROXY_DOC = pathlib.Path(__file__).parents[1] / "docs" / "proxy.md"
ADMIN = "admin-token-" + "ab" * 12
CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


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


def test_version_is_the_installed_packages() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "keyrotor.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"keyrotor {version('keyrotor')}\n"


def test_keys_list_json_is_what_get_admin_keys_answers(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = {"main": "sk-or-v1-" + "a0" * 32, "spare": "sk-or-v1-" + "b1" * 32}
    scenario = Scenario()
    for alias, secret in secrets.items():
        scenario.add(secret, alias=alias)
    with FakeUpstream.running_in_thread(scenario) as upstream:
        config = ProxyConfig(
            keys=secrets,
            pool=PoolConfig(keys=[KeySpec(key_id=alias, weight=2.0) for alias in secrets]),
            upstream=upstream.url,
            server={"host": "127.0.0.1", "port": 0},
            admin_token=ADMIN,
        )
        with ProxyThread(config, []) as url:
            monkeypatch.setenv("KEYROTOR_ADMIN_TOKEN", ADMIN)
            assert main(["keys", "--url", url, "list", "--json"]) == 0
            printed = json.loads(capsys.readouterr().out)
            answered = httpx.get(
                f"{url}/admin/keys", headers={"authorization": f"Bearer {ADMIN}"}
            ).json()
    assert printed == answered
    assert [key["alias"] for key in printed["keys"]] == ["main", "spare"]


class _Output:
    """A child's output line by line, read by a thread that keeps the pipe drained
    and closes it at its end."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                self._lines.put(line)
        self._lines.put("")

    def next(self) -> str:
        """The next line; "" once the child closed it."""
        return self._lines.get(timeout=60)  # a guard against a hang, not a speed bound

    def join(self) -> None:
        self._thread.join(timeout=60)


def test_the_fake_upstream_prints_the_line_that_runs_the_proxy_in_front_of_it(
    tmp_path: pathlib.Path,
) -> None:
    """The line it prints is docs/proxy.md's (for its port), and pasted it serves."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENROUTER_", "KEYROTOR_"))}
    fake = subprocess.Popen(
        [sys.executable, "-m", "keyrotor.testing.fake_upstream", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    proxy = None
    outputs: list[_Output] = []
    try:
        assert fake.stdout is not None
        outputs.append(printed := _Output(fake.stdout))
        url = printed.next().strip()
        command = printed.next().strip()
        keys = ",".join(DEMO_KEYS.values())
        assert command == f"OPENROUTER_KEYS={keys} keyrotor serve --upstream {url}"
        port = url.split(":")[2].split("/")[0]
        documented = command.replace(f":{port}/", ":9000/")
        assert f"\n{documented}\n" in PROXY_DOC.read_text()
        assignment, *args = shlex.split(command)
        name, value = assignment.split("=", 1)
        assert args[:2] == ["keyrotor", "serve"]
        proxy = subprocess.Popen(  # as pasted, on a free port and a state file of its own
            [sys.executable, "-m", "keyrotor.cli", *args[1:], "--port", "0"],
            stderr=subprocess.PIPE,
            text=True,
            env={**env, name: value, "KEYROTOR_STATE": str(tmp_path / "state.db")},
        )
        assert proxy.stderr is not None
        outputs.append(logged := _Output(proxy.stderr))
        while True:
            line = logged.next()
            assert line, "keyrotor serve stopped before listening"
            record = json.loads(line)
            if record.get("event") == "listening":
                break
        answer = httpx.post(f"{record['url']}/v1/chat/completions", json=CHAT, timeout=30)
        assert answer.status_code == 200 and answer.headers["x-keyrotor-key"].startswith("env")
    finally:
        for process in (proxy, fake):
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
        for output in outputs:
            output.join()


def test_the_live_demo_does_not_claim_a_clean_run_when_requests_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # It said "the caller never saw a bad key" whatever the count.
    import io

    from keyrotor.adapters.proxy import demo
    from keyrotor.testing import Invalid

    only = {"bravo": ("sk-or-v1-demo-bravo-000000000000000002", Invalid(), "revoked")}
    monkeypatch.setattr(demo, "KEYS", only)
    out = io.StringIO()
    outcome = demo.run_demo(out, requests=2, interval=0.0)
    assert outcome == {"ok": 0, "error": 2}
    assert "never saw a bad key" not in out.getvalue()
    assert "0 of 2 requests answered 200 through the proxy: 2 failed" in out.getvalue()
