"""``keyrotor serve --workers N``: N proxy processes on one port, supervised.

The supervisor starts N ``keyrotor serve`` processes with the same arguments,
each told by ``KEYROTOR_WORKER`` (``i/N``) to bind the port with
``SO_REUSEPORT``: the kernel spreads new connections among them. Several
processes share key health only through Redis, so N > 1 needs ``--shared``
(docs/scaling.md). Each worker keeps its own state file (``NAME-worker-i.db``
beside the configured one: a state file is locked by one process).

A worker that exits is started again (after 1 s, doubling up to 30 s while it
keeps dying within 10 s of its start). SIGINT or SIGTERM is passed to every
worker, which drains its requests (the proxy's grace period); workers still
running after it are killed. The supervisor writes its own events as JSON
lines, like the proxy's log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = ["WORKER_ENV", "state_path_of", "supervise", "worker_count"]

WORKER_ENV = "KEYROTOR_WORKER"
"""Set by the supervisor in each worker: ``i/N`` (and the port is shared)."""
_MAX_BACKOFF = 30.0
_STABLE = 10.0  # a worker that ran this long resets its backoff


def worker_count(text: str) -> int:
    """``--workers`` as a number (``auto``: the machine's cores); ``ValueError`` naming the fix."""
    if text.strip().lower() == "auto":
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= 256:
        raise ValueError(f"--workers takes a number from 1 to 256 or auto, got {text!r}")
    return count


def state_path_of(path: str, worker: int) -> str:
    """Worker ``worker``'s own state file, beside ``path``."""
    p = Path(path)
    return str(p.with_name(f"{p.stem}-worker-{worker}{p.suffix or '.db'}"))


def _reserve(host: str, port: int) -> tuple[socket.socket, int]:
    """A socket bound (not listening) with SO_REUSEPORT: holds the port, tells it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host or "0.0.0.0", port))
    return sock, int(sock.getsockname()[1])


def supervise(
    args: Sequence[str],
    count: int,
    host: str,
    port: int,
    state_path: str | None,
    grace: float,
    out: TextIO = sys.stdout,
) -> int:
    """Run ``count`` workers of ``keyrotor serve ARGS`` until SIGINT or SIGTERM."""

    def log(record: dict[str, Any]) -> None:
        out.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        out.flush()

    holder, port = _reserve(host, port)
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    procs: dict[int, subprocess.Popen[bytes]] = {}
    started: dict[int, float] = {}
    backoff: dict[int, float] = {}
    due: dict[int, float] = {}

    def start(worker: int) -> None:
        cmd = [sys.executable, "-m", "keyrotor.cli", "serve", *args, "--port", str(port)]
        if state_path is not None:
            cmd += ["--state", state_path_of(state_path, worker)]
        env = {**os.environ, WORKER_ENV: f"{worker}/{count}"}
        procs[worker] = subprocess.Popen(cmd, env=env)
        started[worker] = time.monotonic()
        log({"event": "worker_started", "worker": worker, "pid": procs[worker].pid, "port": port})

    try:
        for worker in range(1, count + 1):
            start(worker)
        log({"event": "listening", "url": f"http://{host}:{port}", "workers": count})
        while not stopping:
            time.sleep(0.1)
            now = time.monotonic()
            for worker, proc in list(procs.items()):
                code = proc.poll()
                if code is None or worker in due:
                    continue
                quick = now - started[worker] < _STABLE
                wait = min(_MAX_BACKOFF, backoff.get(worker, 0.5) * 2) if quick else 1.0
                backoff[worker], due[worker] = wait, now + wait
                log(
                    {
                        "event": "worker_exited",
                        "worker": worker,
                        "pid": proc.pid,
                        "status": code,
                        "restart_in": wait,
                    }
                )
            for worker, when in list(due.items()):
                if when <= now and not stopping:
                    del due[worker]
                    start(worker)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace + 5.0
        for proc in procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        holder.close()
        log({"event": "stopped", "workers": count})
    return 0
