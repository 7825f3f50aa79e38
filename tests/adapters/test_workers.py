"""``keyrotor serve --workers 2 --shared ...``: real processes on one port, one
killed and started again, all drained by SIGTERM; bad uses refused in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from keyrotor.testing import FakeUpstream, Ok, Scenario

from .test_shared import RedisServer, free_port, needs_redis, wait_until

SECRETS = {f"k{i}": f"sk-or-v1-workers-{i}-" + "jk" * 12 for i in range(1, 3)}
CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyrotor.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OPENROUTER_API_KEY": SECRETS["k1"]},
        cwd=tmp_path,
    )


def test_bad_worker_options_are_one_line_and_exit_2(tmp_path: Path) -> None:
    for args, message in (
        (["--workers", "0"], "--workers takes a number from 1 to 256 or auto, got '0'"),
        (["--workers", "many"], "--workers takes a number from 1 to 256 or auto"),
        (["--workers", "2", "--no-state"], "--workers needs --shared redis://host:port/db"),
    ):
        done = serve(tmp_path, *args)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def pids(url: str, tries: int) -> set[int]:
    seen = set()
    for _ in range(tries):  # a new connection each time: the kernel picks a worker
        with httpx.Client(timeout=10) as http:
            try:
                seen.add(http.get(f"{url}/status").json()["process"]["pid"])
            except httpx.TransportError:  # queued on a killed worker's socket: reset
                continue
    return seen


@needs_redis
def test_two_workers_share_a_port_and_one_killed_is_started_again(tmp_path: Path) -> None:
    redis = RedisServer()
    redis.start()
    fake = Scenario()
    for alias, secret in SECRETS.items():
        fake.add(secret, Ok(), alias=alias)
    port = free_port()
    try:
        with FakeUpstream.running_in_thread(fake) as upstream:
            config = tmp_path / "keyrotor.toml"
            config.write_text(
                f'upstream = "{upstream.url}"\n[server]\ngrace_period = 2\n'
                + "".join(f'[[keys]]\nalias = "{a}"\nsecret_env = "K_{a}"\n' for a in SECRETS)
            )
            env = {**os.environ, **{f"K_{a}": s for a, s in SECRETS.items()}}
            log = (tmp_path / "serve.err").open("w")  # the supervisor's and workers' logs
            supervisor = subprocess.Popen(
                [sys.executable, "-m", "keyrotor.cli", "serve", "--config", str(config),
                 "--workers", "2", "--shared", redis.url, "--port", str(port),
                 "--state", str(tmp_path / "state.db")],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )  # fmt: skip
            log.close()
            url = f"http://127.0.0.1:{port}"
            try:
                wait_until(lambda: _healthy(url), timeout=30)
                first = wait_until(lambda: len(s := pids(url, 8)) == 2 and s, timeout=30)
                for _ in range(10):
                    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 200
                victim = min(first)
                os.kill(victim, signal.SIGKILL)
                later = wait_until(
                    lambda: len(s := pids(url, 8)) == 2 and victim not in s and s, 30
                )
                assert httpx.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 200
            finally:
                supervisor.send_signal(signal.SIGTERM)
                supervisor.wait(timeout=30)
    finally:
        redis.close()
    out = (tmp_path / "serve.err").read_text()
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    kinds = [e.get("event") for e in events]
    assert kinds.count("worker_started") == 3 and "worker_exited" in kinds
    # "listening" only from a worker that accepts (the supervisor's said so seconds early)
    assert kinds.count("starting") == 1 and kinds.count("listening") == 3
    assert all("workers" not in e for e in events if e.get("event") == "listening")
    assert kinds[-1] == "stopped" and supervisor.returncode == 0
    exited = next(e for e in events if e.get("event") == "worker_exited")
    assert exited["pid"] == victim and exited["status"] == -signal.SIGKILL
    assert len(later - first) == 1  # the one started again
    for worker in (1, 2):
        assert (tmp_path / f"state-worker-{worker}.db").exists()  # each its own state file


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
