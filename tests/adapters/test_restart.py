"""State that survives restarts: `keyrotor serve --state` as a real process,
stopped gracefully or killed with SIGKILL under load, then started again."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from cryptography.fernet import Fernet

from keyrotor.testing import WINDOW_START, Credits, FakeClock, FakeUpstream, Ok, RateLimit, Scenario

ADMIN = "admin-token-" + "5e" * 12
SECRETS = {
    "ok": "sk-or-v1-restart-ok-" + "1" * 24,
    "poor": "sk-or-v1-restart-poor-" + "2" * 24,
    "busy": "sk-or-v1-restart-busy-" + "3" * 24,
}
EXTRA = "sk-or-v1-restart-extra-" + "4" * 24  # added through the admin API
MODEL = "openai/gpt-4o-mini"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
CONFIG = "".join(
    f'[[keys]]\nalias = "{alias}"\nsecret_env = "KEY_{alias.upper()}"\n' for alias in SECRETS
)


def scenario() -> Scenario:
    sc = Scenario()
    sc.add(SECRETS["ok"], Ok(), alias="ok")
    sc.add(SECRETS["poor"], Credits(0.0), alias="poor")
    sc.add(SECRETS["busy"], RateLimit(limit=1, window=600), alias="busy")
    sc.add(EXTRA, Ok(), alias="extra")
    return sc


class Serve:
    """`keyrotor serve` in a subprocess; the URL from its "listening" log line."""

    def __init__(self, tmp: Path, upstream: str, *extra: str) -> None:
        (tmp / "keyrotor.toml").write_text(CONFIG)
        self.env = {
            **os.environ,
            **{f"KEY_{alias.upper()}": secret for alias, secret in SECRETS.items()},
            "KEYROTOR_ADMIN_TOKEN": ADMIN,
            "KEYROTOR_SECRET_KEY": (tmp / "secret-key").read_text(),
        }
        self.args = [
            sys.executable, "-m", "keyrotor.cli", "serve", "--port", "0",
            "--config", str(tmp / "keyrotor.toml"), "--upstream", upstream,
            *(extra or ("--state", str(tmp / "state" / "keyrotor.db"))),
        ]  # fmt: skip
        self.lines: list[str] = []

    def __enter__(self) -> Serve:
        self.proc = subprocess.Popen(self.args, env=self.env, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if record.get("event") == "listening":
                self.url = record["url"]
                break
        else:
            raise AssertionError(f"keyrotor serve did not start: {self.lines}")
        self._reader = threading.Thread(target=self._drain, args=(self.proc.stderr,))
        self._reader.start()
        self.http = httpx.Client(base_url=self.url, timeout=10)
        return self

    def _drain(self, stream: IO[str]) -> None:
        self.lines.extend(stream)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.http.close()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=20)
        self._reader.join(timeout=10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.stop(signal.SIGKILL)

    def listing(self) -> dict[str, dict[str, Any]]:
        reply = self.http.get("/admin/keys", headers={"authorization": f"Bearer {ADMIN}"})
        return {k["alias"]: k for k in reply.json()["keys"]}


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    (tmp_path / "secret-key").write_text(Fernet.generate_key().decode())
    return tmp_path


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    # The fake's clock drives busy's rate-limit window, aligned on multiples of
    # 600 s: on the wall clock a run just before a boundary saw a 429 with a few
    # seconds left (or none). Stopped at a window's start, it answers 600 s.
    clock = FakeClock(start=WINDOW_START)
    with FakeUpstream.running_in_thread(scenario(), clock=clock) as server:
        yield server


def wait_for(check: Any, timeout: float = 30.0) -> None:  # a hang guard only
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_states_keys_and_spend_survive_a_restart(tmp: Path, upstream: FakeUpstream) -> None:
    with Serve(tmp, upstream.url) as proxy:
        added = proxy.http.post(
            "/admin/keys",
            json={"key": EXTRA, "alias": "extra", "rpm": 600},
            headers={"authorization": f"Bearer {ADMIN}"},
        )
        assert added.status_code == 201 and added.json()["stored"] is True
        for pin in ("poor", "busy", "busy", "ok", "extra", "ok"):
            reply = proxy.http.post(
                "/v1/chat/completions", json=CHAT, headers={"x-keyrotor-key": pin}
            )
            assert reply.status_code == 200  # failover hid the 402 and the 429
        listed_before = time.monotonic()
        before = proxy.listing()
        before_listed = time.monotonic()
        assert before["poor"]["state"] == "depleted"
        assert before["busy"]["state"] == "rate_limited" and before["busy"]["until_in"] > 30
        status = proxy.http.get("/status").json()
        spent = status["stats"]["totalCostToday"]
        assert spent > 0 and status["storage"]["ok"] is True
        assert proxy.stop() == 0
    db = tmp / "state" / "keyrotor.db"
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    for path in db.parent.iterdir():  # the key is in no file in clear
        assert EXTRA.encode() not in path.read_bytes()
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0

    with Serve(tmp, upstream.url) as proxy:
        listed_after = time.monotonic()
        after = proxy.listing()
        after_listed = time.monotonic()
        assert set(after) == {"ok", "poor", "busy", "extra"}
        assert (after["extra"]["source"], after["extra"]["options"]) == ("api", {"rpm": 600.0})
        assert after["poor"]["state"] == "depleted"
        assert after["busy"]["state"] == "rate_limited"
        # The cooldown went on while the proxy was down, by the time between the
        # two listings: bracketed by the clock readings around each, so a slow
        # machine only widens the bracket (the 0.01 s: until_in is rounded).
        left_before, left_after = before["busy"]["until_in"], after["busy"]["until_in"]
        assert left_before - (after_listed - listed_before) - 0.01 <= left_after
        assert left_after <= left_before - (listed_after - before_listed) + 0.01
        for alias in ("ok", "extra"):  # spend restored into the pool, toward budgets
            assert after[alias]["spend"] == pytest.approx(before[alias]["spend"])
            assert after[alias]["state"] == "healthy"
        status = proxy.http.get("/status").json()
        assert status["stats"]["totalCostToday"] == pytest.approx(spent)
        reply = proxy.http.post(
            "/v1/chat/completions", json=CHAT, headers={"x-keyrotor-key": "extra"}
        )
        assert reply.headers["x-keyrotor-key"] == "extra"  # the stored secret works
        wait_for(lambda: proxy.http.get("/status").json()["stats"]["totalCostToday"] > spent)
        removed = proxy.http.delete(
            "/admin/keys/extra", headers={"authorization": f"Bearer {ADMIN}"}
        )
        assert removed.json()["unstored"] is True
        assert proxy.stop() == 0
    with Serve(tmp, upstream.url) as proxy:
        assert set(proxy.listing()) == {"ok", "poor", "busy"}  # removed stays removed
        proxy.stop()
    for line in proxy.lines:
        for secret in (*SECRETS.values(), EXTRA, ADMIN):
            assert secret not in line


def committed(db: Path) -> int:
    """The requests in the ledger on disk (what a reader sees: committed only)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        (requests,) = conn.execute("SELECT COALESCE(SUM(requests), 0) FROM ledger").fetchone()
    finally:
        conn.close()
    return int(requests)


def test_kill_9_under_load_loses_at_most_the_last_batch_and_never_the_file(
    tmp: Path, upstream: FakeUpstream
) -> None:
    served: list[int] = []
    with Serve(tmp, upstream.url) as proxy:
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=proxy.url, timeout=10) as http:
                while not stop.is_set():
                    try:
                        reply = http.post("/v1/chat/completions", json=CHAT)
                    except httpx.HTTPError:
                        return  # the proxy is gone
                    if reply.status_code == 200:
                        served.append(1)

        workers = [threading.Thread(target=load) for _ in range(4)]
        for worker in workers:
            worker.start()
        wait_for(lambda: len(served) >= 100)
        wait_for(lambda: committed(tmp / "state" / "keyrotor.db") > 0)  # some batches on disk
        assert proxy.stop(signal.SIGKILL) == -signal.SIGKILL
        stop.set()
        for worker in workers:
            worker.join(timeout=10)
    db = tmp / "state" / "keyrotor.db"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        (kept,) = conn.execute("SELECT COALESCE(SUM(requests), 0) FROM ledger").fetchone()
    conn.close()
    # Batches were committed while it served, never more than was served. (How many
    # depends on this machine's load: durability itself is tests/adapters/test_storage.py's.)
    assert 0 < kept <= len(served)
    with Serve(tmp, upstream.url) as proxy:  # and it starts again on that file
        assert proxy.http.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert proxy.http.get("/status").json()["storage"]["ok"] is True
        proxy.stop()


def test_no_state_keeps_nothing_and_a_locked_secret_key_refuses_to_store(
    tmp: Path, upstream: FakeUpstream
) -> None:
    with Serve(tmp, upstream.url, "--no-state") as proxy:
        added = proxy.http.post(
            "/admin/keys", json={"key": EXTRA}, headers={"authorization": f"Bearer {ADMIN}"}
        )
        assert added.status_code == 201 and added.json()["stored"] is False
        assert "storage" not in proxy.http.get("/status").json()
        proxy.stop()
    assert not (tmp / "state").exists()
    serve = Serve(tmp, upstream.url)
    del serve.env["KEYROTOR_SECRET_KEY"]
    with serve as proxy:
        refused = proxy.http.post(
            "/admin/keys", json={"key": EXTRA}, headers={"authorization": f"Bearer {ADMIN}"}
        )
        assert refused.status_code == 409
        assert "KEYROTOR_SECRET_KEY" in refused.text and EXTRA not in refused.text
        assert "extra" not in proxy.listing() and len(proxy.listing()) == 3
        proxy.stop()


def test_a_state_file_that_cannot_be_used_stops_the_start_with_one_line(tmp: Path) -> None:
    bad = tmp / "not-a-db"
    bad.write_text("hello, not sqlite")
    env = {**os.environ, "OPENROUTER_KEYS": SECRETS["ok"]}
    result = subprocess.run(
        [sys.executable, "-m", "keyrotor.cli", "serve", "--port", "0", "--state", str(bad)],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("keyrotor serve: ") and str(bad) in result.stderr
    assert "Traceback" not in result.stderr and SECRETS["ok"] not in result.stderr


def test_keys_command_line_against_a_running_proxy(tmp: Path, upstream: FakeUpstream) -> None:
    with Serve(tmp, upstream.url) as proxy:
        env = {**os.environ, "KEYROTOR_URL": proxy.url, "KEYROTOR_ADMIN_TOKEN": ADMIN}

        def keys(*args: str, stdin: str = "", **extra_env: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "keyrotor.cli", "keys", *args],
                env={**env, **extra_env}, input=stdin, capture_output=True, text=True, timeout=30,
            )  # fmt: skip

        added = keys("add", "--alias", "extra", "--weight", "2", stdin=EXTRA + "\n")
        assert added.returncode == 0, added.stderr
        assert (
            added.stdout.startswith("added extra (") and "stored in the state file" in added.stdout
        )
        again = keys("add", "--alias", "other", "--secret-env", "THE_KEY", THE_KEY=EXTRA)
        assert again.returncode == 1 and "already in the pool as 'extra'" in again.stderr
        listed = keys("list")
        assert listed.returncode == 0
        rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
        assert set(rows) == {"ok", "poor", "busy", "extra"} and rows["extra"][1:3] == [
            "main",
            "healthy",
        ]
        marked = keys("mark", "busy", "rate_limited", "--duration", "120")
        assert marked.returncode == 0 and marked.stdout.strip() == "busy is rate_limited"
        as_json = json.loads(keys("list", "--json").stdout)  # GET /admin/keys' shape
        assert {k["alias"]: k["state"] for k in as_json["keys"]}["busy"] == "rate_limited"
        assert keys("probe", "ok").stdout.strip() == "probing ok"
        removed = keys("remove", "extra")
        assert removed.returncode == 0 and "removed extra" in removed.stdout
        missing = keys("remove", "extra")
        assert missing.returncode == 1 and "404" in missing.stderr
        wrong = keys("list", KEYROTOR_ADMIN_TOKEN="wrong-token-" + "0" * 10)
        assert wrong.returncode == 1 and "401" in wrong.stderr
        proxy.stop()
    gone = keys("list")
    assert gone.returncode == 2 and "cannot reach the proxy" in gone.stderr
    for result in (added, again, listed, removed):
        assert EXTRA not in result.stdout + result.stderr
