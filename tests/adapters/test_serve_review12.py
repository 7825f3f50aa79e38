"""``keyrotor serve`` stopping, with and without ``--workers``: real processes
on free loopback ports (review 12).

A second signal cuts the drain short but still flushes the state file and the
log; workers drain once whoever signals them (a terminal's Ctrl-C, systemd's
stop, the supervisor), exit when the supervisor is killed, and bad input, a
busy port or a port another pool shares end the supervisor in one line, exit 2.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import trio

from keyrotor.testing import Custom, FakeUpstream, Hang, Ok, Scenario

from .test_shared import RedisServer, free_port, needs_redis, wait_until

SECRETS = {f"k{i}": f"sk-or-v1-test-review12-{i}-" + "cd" * 12 for i in range(1, 3)}
CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
HANG = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hang"}]}
NOWHERE = "redis://127.0.0.1:9/0"  # never reached: these runs stop before any worker
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def clean_env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENROUTER", "KEYROTOR"))}
    return {**env, **more}


def key_env() -> dict[str, str]:
    return clean_env(**{f"K_{alias}": secret for alias, secret in SECRETS.items()})


def write_config(path: Path, upstream: str, extra: str = "") -> Path:
    path.write_text(
        f'upstream = "{upstream}"\n[catalog]\nenabled = false\n{extra}\n'
        + "".join(f'[[keys]]\nalias = "{a}"\nsecret_env = "K_{a}"\n' for a in SECRETS)
    )
    return path


def events(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def kinds(path: Path) -> list[Any]:
    return [e.get("event") for e in events(path)]


@contextmanager
def spawned(
    args: list[str], env: dict[str, str], stderr: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """``keyrotor ARGS`` in a session of its own (as a shell job: its workers in
    its process group); whatever of that group is left at the end is killed."""
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "keyrotor.cli", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group this test created
        proc.wait()


def refused(args: list[str], env: dict[str, str], tmp_path: Path) -> tuple[int, str]:
    """Run ``keyrotor ARGS`` that should stop at once: its exit status and stderr."""
    with spawned(args, env, tmp_path / "refused.err") as proc:
        code = proc.wait(timeout=60)  # a hang guard: it used to run for ever
    return code, (tmp_path / "refused.err").read_text()


def ledger_requests(state: Path) -> int:
    with sqlite3.connect(f"file:{state}?mode=ro", uri=True) as db:
        (requests,) = db.execute("SELECT COALESCE(SUM(requests), 0) FROM ledger").fetchone()
    return int(requests)


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def post(url: str, body: dict[str, Any], results: list[Any]) -> None:
    try:
        results.append(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=90).status_code)
    except httpx.HTTPError as exc:
        results.append(type(exc).__name__)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return not stat.read_text().rsplit(") ", 1)[1].startswith("Z")  # a zombie is gone
    except (OSError, IndexError):
        return False


# 1. -------------------------------------------------------------------------


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_cuts_the_drain_short_but_flushes_state_and_log(
    tmp_path: Path, second: signal.Signals
) -> None:
    fake = Scenario()
    hang = Custom(lambda call: Hang() if "hang" in json.dumps(call.body) else None)
    fake.add(SECRETS["k1"], hang, alias="k1")
    fake.add(SECRETS["k2"], hang, alias="k2")
    port, state, err = free_port(), tmp_path / "state.db", tmp_path / "serve.err"
    with FakeUpstream.running_in_thread(fake) as upstream:
        # the answered request's spend stays pending (flush_interval): only the
        # flush at exit can write it
        config = write_config(
            tmp_path / "k.toml",
            upstream.url,
            "[server]\ngrace_period = 120\n[state]\nflush_interval = 600\n",
        )
        args = ["serve", "--config", str(config), "--port", str(port), "--state", str(state)]
        with spawned(args, key_env(), err) as proc:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: healthy(url), timeout=60)
            answered: list[Any] = []
            post(url, CHAT, answered)
            assert answered == [200]
            cut: list[Any] = []
            client = threading.Thread(target=post, args=(url, HANG, cut))
            client.start()
            wait_until(lambda: upstream.totals().in_flight == 1, timeout=60)
            proc.send_signal(signal.SIGTERM)  # drains: the hanging request holds it
            wait_until(lambda: "draining" in kinds(err), timeout=60)
            proc.send_signal(second)
            code = proc.wait(timeout=60)  # a hang guard, not a bound on speed
            client.join(timeout=60)
    text = err.read_text()
    assert code == 0 and "Traceback" not in text, text
    seen = kinds(err)
    assert seen.index("shutdown") < seen.index("draining") < seen.index("stopping_now")
    stopping = next(e for e in events(err) if e.get("event") == "stopping_now")
    assert stopping["signal"] == second.name
    assert cut and cut != [200]
    assert ledger_requests(state) == 1  # written at exit, though the drain was cut


# 2. -------------------------------------------------------------------------


class GatedUpstream(FakeUpstream):
    """A fake upstream that holds every answer until ``gate`` is set."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()

    async def _send_success(self, *args: Any) -> bool:
        await anyio.to_thread.run_sync(self.gate.wait, 120)  # a hang guard
        return await super()._send_success(*args)


@contextmanager
def pool(tmp_path: Path, redis: RedisServer, grace: int = 120) -> Iterator[Any]:
    """A gated fake upstream and ``serve --workers 2`` in front of it, both workers up."""
    fake = Scenario()
    for alias, secret in SECRETS.items():
        fake.add(secret, Ok(), alias=alias)
    port, err = free_port(), tmp_path / "serve.err"
    with GatedUpstream.running_in_thread(fake) as upstream:
        extra = f"[server]\ngrace_period = {grace}"
        config = write_config(tmp_path / "k.toml", upstream.url, extra)
        args = [
            "serve", "--config", str(config), "--workers", "2", "--shared", redis.url,
            "--port", str(port), "--state", str(tmp_path / "state.db"),
        ]  # fmt: skip
        try:
            with spawned(args, key_env(), err) as proc:
                url = f"http://127.0.0.1:{port}"
                workers = lambda: [e for e in events(err) if "upstream" in e]  # noqa: E731
                wait_until(lambda: len(workers()) == 2 and healthy(url), timeout=90)
                yield proc, url, upstream, err
        finally:
            upstream.gate.set()


def in_flight(url: str, upstream: Any, count: int) -> tuple[list[Any], list[threading.Thread]]:
    results: list[Any] = []
    threads = [threading.Thread(target=post, args=(url, CHAT, results)) for _ in range(count)]
    for thread in threads:
        thread.start()
    wait_until(lambda: upstream.totals().in_flight == count, timeout=60)
    return results, threads


@needs_redis
@pytest.mark.parametrize(
    ("whom", "signum"),
    [("group", signal.SIGINT), ("group", signal.SIGTERM), ("supervisor", signal.SIGINT)],
    ids=["terminal-ctrl-c", "systemd-stop", "kill-supervisor"],
)
def test_workers_drain_once_whoever_signals_them(
    tmp_path: Path, whom: str, signum: signal.Signals
) -> None:
    redis = RedisServer()
    redis.start()
    try:
        with pool(tmp_path, redis) as (proc, url, upstream, err):
            results, threads = in_flight(url, upstream, 4)
            if whom == "group":  # what a terminal's Ctrl-C, or systemd's stop, does
                os.killpg(proc.pid, signum)
            else:
                proc.send_signal(signum)
            drains = lambda: kinds(err).count("draining")  # noqa: E731
            wait_until(lambda: drains() == 2 or proc.poll() is not None, timeout=60)
            assert drains() == 2
            upstream.gate.set()
            for thread in threads:
                thread.join(timeout=60)
            code = proc.wait(timeout=60)
    finally:
        redis.close()
    text = err.read_text()
    assert results == [200] * 4, text
    assert code == 0 and "Traceback" not in text, text
    assert "stopping_now" not in kinds(err) and kinds(err)[-1] == "stopped"


@needs_redis
def test_a_second_signal_to_the_supervisor_stops_the_workers_now(tmp_path: Path) -> None:
    redis = RedisServer()
    redis.start()
    try:
        with pool(tmp_path, redis) as (proc, url, upstream, err):
            results, threads = in_flight(url, upstream, 2)
            proc.send_signal(signal.SIGTERM)
            wait_until(lambda: kinds(err).count("draining") == 2, timeout=60)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)  # the grace period is 120 s: cut short
            for thread in threads:
                thread.join(timeout=60)
    finally:
        redis.close()
    # a worker with no request in flight may have finished draining before
    assert code == 0 and "stopping_now" in kinds(err), err.read_text()
    assert 200 not in results


# 3. -------------------------------------------------------------------------


@needs_redis
def test_workers_exit_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    redis = RedisServer()
    redis.start()
    try:
        with pool(tmp_path, redis, grace=2) as (proc, _, upstream, err):
            pids = [e["pid"] for e in events(err) if e.get("event") == "worker_started"]
            assert len(pids) == 2 and all(map(alive, pids))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            wait_until(lambda: not any(map(alive, pids)), timeout=60)
            upstream.gate.set()
    finally:
        redis.close()
    gone = [e for e in events(err) if e.get("event") == "shutdown"]
    assert [e.get("reason") for e in gone] == ["supervisor gone"] * 2  # drained, not killed


# 4. -------------------------------------------------------------------------


def test_workers_with_bad_input_stop_in_one_line_before_starting(tmp_path: Path) -> None:
    port = free_port()
    args = ["serve", "--workers", "2", "--shared", NOWHERE, "--port", str(port)]
    code, err = refused([*args, "--state", str(tmp_path / "s.db")], clean_env(), tmp_path)
    assert code == 2 and err.startswith("keyrotor serve: no API keys"), err
    assert len(err.strip().splitlines()) == 1


def test_a_worker_refused_at_its_first_start_stops_them_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from keyrotor.adapters.proxy.workers import supervise

    for name in list(os.environ):
        if name.startswith(("OPENROUTER", "KEYROTOR")):
            monkeypatch.delenv(name)  # the workers have no key: each exits 2
    records: list[dict[str, Any]] = []
    args = ["--no-state", "--upstream", "http://127.0.0.1:9/api/v1"]
    assert supervise(args, 2, "127.0.0.1", 0, None, 5.0, records.append) == 2
    seen = [r["event"] for r in records]
    assert seen.count("worker_failed") == 1 and "worker_exited" not in seen
    assert seen[-1] == "stopped"


# 5. and 6. ------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True], ids=["busy", "another-pool"])
def test_workers_refuse_a_port_in_use_in_one_line(tmp_path: Path, shared: bool) -> None:
    with socket.socket() as busy:
        if shared:  # as another pool's workers bind it: SO_REUSEPORT would let us in
            busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ["serve", "--workers", "2", "--shared", NOWHERE, "--port", str(port)]
        env = clean_env(OPENROUTER_API_KEY=SECRETS["k1"])
        code, err = refused([*args, "--state", str(tmp_path / "s.db")], env, tmp_path)
    assert code == 2, err
    assert err == (
        f"keyrotor serve: cannot listen on 127.0.0.1:{port}: address already in use; "
        "fix: choose another --port, or stop the process using it\n"
    )


# 7. -------------------------------------------------------------------------


def test_every_interface_on_any_port_is_one_port_with_a_usable_url() -> None:
    from keyrotor.adapters.proxy.main import url_of
    from keyrotor.adapters.proxy.sockets import listen

    async def ports() -> set[int]:
        sockets = await listen("", 0)
        try:
            return {sock.getsockname()[1] for sock in sockets}
        finally:
            for sock in sockets:
                sock.close()

    for _ in range(5):  # a chance of two equal random ports is no pass
        assert len(trio.run(ports)) == 1
    assert url_of("", 8080) == "http://0.0.0.0:8080"
    assert url_of("::1", 8080) == "http://[::1]:8080"
    assert url_of("127.0.0.1", 8080) == "http://127.0.0.1:8080"
