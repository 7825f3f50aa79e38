"""``keyrotor serve --workers N``: N proxy processes on one port, supervised.

The supervisor checks what every worker will check at its start (each state
file, the keys) and that the port is free, even of another pool's workers; then
it starts N ``keyrotor serve`` processes with the same arguments, each told by
``KEYROTOR_WORKER`` (``i/N``) to bind the port with ``SO_REUSEPORT``: the kernel
spreads new connections among them. Several processes share key health only
through Redis, so N > 1 needs ``--shared`` (docs/scaling.md). Each worker keeps
its own state file (``NAME-worker-i.db`` beside the configured one: a state file
is locked by one process).

A worker that exits is started again (after 1 s, doubling up to 30 s while it
keeps dying within 10 s of its start); one whose first start fails with exit
status 2 (bad input: it said why on stderr) stops them all, exit status 2.

Stopping goes through a pipe per worker (``KEYROTOR_WORKER_PIPE``, the fd of its
end), not through signals: on its first SIGINT or SIGTERM the supervisor writes
``STOP`` (drain for the grace period), on the next ones ``STOP_NOW`` (cut the
grace short); a worker takes each once, whatever else told it. So a worker that
got the same signal itself (a terminal's Ctrl-C reaches the whole process group;
systemd's stop signals every process of the service) drains once instead of
taking the supervisor's word as a second signal; and when the supervisor dies
(``kill -9``, the OOM killer) the pipe's EOF tells each worker to drain and
exit, on every platform, with no race at its start. Workers still running
``grace_period`` + 5 s after the first signal are killed. The supervisor logs
its own events (``worker_started`` ...) on stderr, as the workers do.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from ..config import ProxyConfig

__all__ = [
    "PIPE_ENV",
    "STOP",
    "STOP_NOW",
    "WORKER_ENV",
    "check",
    "state_path_of",
    "stop_pipe",
    "supervise",
    "worker_count",
]

WORKER_ENV: Final = "KEYROTOR_WORKER"
"""Set by the supervisor in each worker: ``i/N`` (and the port is shared)."""
PIPE_ENV: Final = "KEYROTOR_WORKER_PIPE"
"""Set by the supervisor in each worker: the fd of the pipe it stops it through."""
STOP: Final = b"s"
"""Written to a worker's pipe: drain for the grace period, then exit (as EOF)."""
STOP_NOW: Final = b"n"
"""Written to a worker's pipe: cut the grace period short (a second signal)."""
_MAX_BACKOFF = 30.0
_STABLE = 10.0  # a worker that ran this long resets its backoff
_BAD_INPUT = 2  # a worker's exit status for a refused start (one line on stderr)

Log = Callable[[dict[str, Any]], None]


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


def check(config: ProxyConfig, count: int, log: Log) -> None:
    """Raise what a worker's start would (``StorageError``, ``ConfigError``): each
    worker's state file and the keys, checked as ``keyrotor serve`` checks them
    before serving (``main.check``), every file let go of after."""
    import attrs

    from .main import check as check_one

    if config.state_path is None:
        check_one(config, log)
        return
    for worker in range(1, count + 1):
        one = attrs.evolve(config, state_path=state_path_of(config.state_path, worker))
        check_one(one, lambda record: log({**record, "worker": worker}))  # noqa: B023 - called now


def stop_pipe() -> int | None:
    """This worker's end of its supervisor's pipe (``PIPE_ENV``), non-blocking;
    None in a process that is no worker (or when the fd is no pipe)."""
    if WORKER_ENV not in os.environ:
        return None
    try:
        fd = int(os.environ[PIPE_ENV])
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return None
    except (KeyError, ValueError, OSError):
        return None
    os.set_blocking(fd, False)
    os.set_inheritable(fd, False)
    return fd


class _Hold:
    """The sockets holding ``host``:``port`` for the workers while the supervisor
    runs: bound with ``SO_REUSEPORT``, not listening, so that a worker (started
    again too) binds the port and no one else does.

    A first bind without ``SO_REUSEPORT`` refuses a port in use, even by sockets
    that would share it (another pool's listening workers). Then the port is
    held with ``SO_REUSEADDR`` (as the workers bind it, which a ``TIME_WAIT``
    connection does not refuse), and also without: Linux lets ``SO_REUSEADDR``
    sockets share a port on which none listens, so held only with it the port
    was any such server's (and another pool's, its check passed) whenever no
    worker listened, while they start or all restart. Held without it (``strict``)
    only ``SO_REUSEPORT`` sockets of this user bind the port. Linux takes that
    hold beside the first at once; where it is refused (a ``TIME_WAIT`` of a
    server without ``SO_REUSEPORT``), ``tighten`` tries it again each second.

    ``ConfigError`` when the port cannot be had.
    """

    def __init__(self, host: str, port: int) -> None:
        from .main import listen_error
        from .sockets import bind

        try:
            infos = socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            probe = bind(infos, backlog=0)
            self.port = int(probe[0].getsockname()[1])
            for sock in probe:
                sock.close()
            self.infos = [(*info[:4], (info[4][0], self.port, *info[4][2:])) for info in infos]
            self.sockets = bind(self.infos, reuse_port=True, backlog=0)
            self.strict, self.next_try = False, 0.0
            self.tighten(time.monotonic())
        except OSError as exc:
            raise listen_error(host, port, exc) from None

    def tighten(self, now: float) -> None:
        """Hold the port without ``SO_REUSEADDR`` if not yet (at most once a second)."""
        from .sockets import bind

        if self.strict or now < self.next_try:
            return
        self.next_try = now + 1.0
        try:
            strict = bind(self.infos, reuse_port=True, reuse_addr=False, backlog=0)
        except OSError:  # EADDRINUSE: a TIME_WAIT, a socket bound but not listening
            return
        self.sockets += strict
        self.strict = True

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


class _Workers:
    """The workers: their processes, the write ends of their pipes, their restarts."""

    def __init__(
        self, args: Sequence[str], count: int, port: int, state_path: str | None, log: Log
    ) -> None:
        self.args = args
        self.count = count
        self.port = port
        self.state_path = state_path
        self.log = log
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.pipes: dict[int, int] = {}
        self.started: dict[int, float] = {}
        self.starts: dict[int, int] = {}
        self.backoff: dict[int, float] = {}
        self.due: dict[int, float] = {}

    def start(self, worker: int) -> None:
        """Start ``worker`` (again), with a new pipe."""
        cmd = [sys.executable, "-m", "keyrotor.cli", "serve", *self.args, "--port", str(self.port)]
        if self.state_path is not None:
            cmd += ["--state", state_path_of(self.state_path, worker)]
        read, write = os.pipe()
        try:
            env = {**os.environ, WORKER_ENV: f"{worker}/{self.count}", PIPE_ENV: str(read)}
            proc = subprocess.Popen(cmd, env=env, pass_fds=(read,))
        except BaseException:
            os.close(write)
            raise
        finally:
            os.close(read)
        os.set_blocking(write, False)
        self.procs[worker], self.pipes[worker] = proc, write
        self.started[worker] = time.monotonic()
        self.starts[worker] = self.starts.get(worker, 0) + 1
        self.log({"event": "worker_started", "worker": worker, "pid": proc.pid, "port": self.port})

    def reap(self, now: float) -> int | None:
        """Note the workers that exited and when each starts again; the first whose
        first start was refused (exit status 2: bad input), if any."""
        for worker, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None or worker in self.due:
                continue
            with suppress(OSError):
                os.close(self.pipes.pop(worker))
            if code == _BAD_INPUT and self.starts[worker] == 1:
                self.log(
                    {
                        "event": "worker_failed",
                        "worker": worker,
                        "pid": proc.pid,
                        "status": code,
                        "message": "its start was refused (the reason is on stderr): stopping",
                    }
                )
                return worker
            quick = now - self.started[worker] < _STABLE
            wait = min(_MAX_BACKOFF, self.backoff.get(worker, 0.5) * 2) if quick else 1.0
            self.backoff[worker], self.due[worker] = wait, now + wait
            self.log(
                {
                    "event": "worker_exited",
                    "worker": worker,
                    "pid": proc.pid,
                    "status": code,
                    "restart_in": wait,
                }
            )
        return None

    def restart_due(self, now: float) -> None:
        for worker, when in list(self.due.items()):
            if when <= now:
                del self.due[worker]
                self.start(worker)

    def tell(self, message: bytes) -> None:
        """Write ``message`` to every running worker's pipe."""
        for fd in self.pipes.values():
            with suppress(OSError):  # a worker that has just exited
                os.write(fd, message)

    def running(self) -> list[subprocess.Popen[bytes]]:
        return [proc for proc in self.procs.values() if proc.poll() is None]

    def stop(self, signals: list[int], grace: float) -> None:
        """Tell every worker to stop (drain), and to stop now on each signal
        beyond the first; kill those still running ``grace`` + 5 s later."""
        self.tell(STOP)
        seen = 1 if signals else 0  # the first signal is the one that stops
        deadline = time.monotonic() + grace + 5.0
        while self.running() and time.monotonic() < deadline:
            if len(signals) > seen:
                seen = len(signals)
                self.tell(STOP_NOW)
            time.sleep(0.05)
        for proc in self.running():
            proc.kill()
        for proc in self.procs.values():
            proc.wait()
        for fd in self.pipes.values():
            with suppress(OSError):
                os.close(fd)
        self.pipes.clear()


def supervise(
    args: Sequence[str],
    count: int,
    host: str,
    port: int,
    state_path: str | None,
    grace: float,
    log: Log | None = None,
) -> int:
    """Run ``count`` workers of ``keyrotor serve ARGS`` on ``host``:``port`` until
    SIGINT or SIGTERM (0), or until a worker's first start is refused (2).

    Raises ``ConfigError`` when the port cannot be had: in use (even by sockets
    that would share it), an unknown host. ``log``: the supervisor's events (a
    JSON line each on stderr by default).
    """
    from .main import url_of

    if log is None:
        from .logs import LineLog

        log = LineLog(sys.stderr)
    hold = _Hold(host, port)
    port = hold.port
    signals: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        signals.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    workers = _Workers(args, count, port, state_path, log)
    failed = None
    try:
        for worker in range(1, count + 1):
            workers.start(worker)
        # Not "listening": each worker says so itself once it accepts (a worker's
        # start takes seconds; a connection before then is refused).
        log({"event": "starting", "url": url_of(host, port), "workers": count})
        while not signals and failed is None:
            time.sleep(0.1)
            now = time.monotonic()
            failed = workers.reap(now)
            if failed is None and not signals:
                hold.tighten(now)
                workers.restart_due(now)
    finally:
        workers.stop(signals, grace)
        hold.close()
        for signum, handler in previous.items():
            if handler is not None:  # None: set from C, cannot be restored
                signal.signal(signum, handler)
        log({"event": "stopped", "workers": count})
    return 0 if failed is None else _BAD_INPUT
