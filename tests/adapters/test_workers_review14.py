"""The port of ``keyrotor serve --workers`` is the pool's while no worker
listens (at the start, while all restart): no ``SO_REUSEADDR`` server takes
it, no second pool joins it; real sockets and processes over 127.0.0.1."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from keyrotor.adapters.config import ConfigError
from keyrotor.adapters.proxy import sockets
from keyrotor.adapters.proxy.sockets import bind
from keyrotor.adapters.proxy.workers import _Hold

from .test_shared import RedisServer, needs_redis, wait_until
from .test_workers import SECRETS, _healthy

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
LOOPBACK = socket.getaddrinfo("127.0.0.1", 0, type=socket.SOCK_STREAM)


def reuseaddr_server(port: int) -> socket.socket:
    """A server as most bind (Python's, trio's, nginx's): ``SO_REUSEADDR``, listening."""
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
    except OSError:
        sock.close()
        raise
    return sock


def test_a_held_port_is_the_workers_only() -> None:
    hold = _Hold("127.0.0.1", 0)
    try:
        assert hold.strict
        with pytest.raises(OSError) as refused:
            reuseaddr_server(hold.port)
        assert refused.value.errno == errno.EADDRINUSE
        with pytest.raises(ConfigError, match="address already in use"):
            _Hold("127.0.0.1", hold.port)  # another pool, its workers not listening yet
        infos = [(*info[:4], ("127.0.0.1", hold.port)) for info in LOOPBACK]
        for sock in bind(infos, reuse_port=True):  # a worker (started again)
            sock.close()
    finally:
        hold.close()


def time_wait_port() -> int:
    """A port left with a TIME_WAIT connection of a server without SO_REUSEPORT."""
    server = reuseaddr_server(0)
    port = int(server.getsockname()[1])
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server closes first: its side waits
    client.recv(1)
    client.close()
    server.close()
    return port


def test_a_time_wait_does_not_refuse_the_port_nor_open_it() -> None:
    port = time_wait_port()
    hold = _Hold("127.0.0.1", port)  # starts, as before, during the TIME_WAIT
    try:
        assert hold.port == port and hold.strict  # Linux: beside the first hold
        with pytest.raises(OSError):
            reuseaddr_server(port)
    finally:
        hold.close()


def test_a_refused_strict_hold_is_tried_again_each_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refuse = [True]

    def bind_or_refuse(infos: Any, **options: Any) -> list[socket.socket]:
        if options.get("reuse_addr") is False and refuse[0]:  # as a TIME_WAIT elsewhere
            raise OSError(errno.EADDRINUSE, "Address already in use")
        return bind(infos, **options)

    monkeypatch.setattr(sockets, "bind", bind_or_refuse)
    hold = _Hold("127.0.0.1", 0)
    try:
        assert not hold.strict  # started all the same, held as before
        now = time.monotonic()
        hold.tighten(now + 2.0)
        assert not hold.strict
        refuse[0] = False
        hold.tighten(now + 2.5)  # at most once a second
        assert not hold.strict
        hold.tighten(now + 3.0)
        assert hold.strict
        with pytest.raises(OSError):
            reuseaddr_server(hold.port)
    finally:
        hold.close()


@needs_redis
def test_while_every_worker_is_down_the_port_stays_the_pools(tmp_path: Path) -> None:
    redis = RedisServer()
    redis.start()
    env = {**os.environ, "OPENROUTER_API_KEY": SECRETS["k1"]}
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = int(probe.getsockname()[1])
    probe.close()
    command = [sys.executable, "-m", "keyrotor.cli", "serve", "--workers", "2", "--no-state",
               "--shared", redis.url, "--port", str(port),
               "--upstream", "http://127.0.0.1:9"]  # fmt: skip
    log = (tmp_path / "serve.err").open("w")
    supervisor = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=log, cwd=tmp_path
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    stopped = False
    try:
        wait_until(lambda: _healthy(url), timeout=30)
        events = wait_until(lambda: len(started(tmp_path)) == 2 and started(tmp_path), 30)
        supervisor.send_signal(signal.SIGSTOP)  # no restart while we look
        stopped = True
        for event in events:
            os.kill(int(str(event["pid"])), signal.SIGKILL)
        wait_until(lambda: refused(port), timeout=30)
        with pytest.raises(OSError):  # before: bound and listening, the workers locked out
            reuseaddr_server(port).close()
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
        assert second.returncode == 2  # before: it joined the port (the kernel sharing it)
        assert "address already in use" in second.stderr
        supervisor.send_signal(signal.SIGCONT)
        stopped = False
        wait_until(lambda: _healthy(url), timeout=30)  # the workers started again
    finally:
        if stopped:
            supervisor.send_signal(signal.SIGCONT)
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=30)
        redis.close()
    assert supervisor.returncode == 0
    assert len(started(tmp_path)) == 4


def started(tmp_path: Path) -> list[dict[str, object]]:
    lines = (tmp_path / "serve.err").read_text().splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    return [e for e in events if e.get("event") == "worker_started"]


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False
