"""Running the proxy: the pool's client, the app and the server in one trio run."""

from __future__ import annotations

import errno
import gc
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TextIO

import trio

from ...transports.codec import resolve as resolve_parser
from ..config import ConfigError, ProxyConfig
from .logs import LineLog
from .runtime import Startup, open_app, open_store, plan
from .server import ServerOptions, serve
from .workers import STOP_NOW, WORKER_ENV, stop_pipe

if TYPE_CHECKING:
    from ..storage import StateStore

__all__ = ["check", "json_logger", "listen_error", "run", "run_proxy", "tune_gc", "url_of"]


def tune_gc(threshold: int) -> None:
    """Tune this process's cyclic garbage collector for serving (0: leave it).

    What startup built (the keys' records, catalogs, modules) is collected once
    and frozen, so that no later collection walks it again, and the first
    generation's threshold is raised from Python's 700 to ``threshold``: a
    proxied request allocates a few dozen containers that outlive it briefly,
    and with 700 a collection ran every few dozen requests, with a full one
    (tens of ms with 10,000 keys) every few seconds (docs/benchmarks.md,
    "The garbage collector"). Cycles still get collected, less often; a frozen
    object that later ends in a cycle (a catalog replaced by a refresh) is not,
    which bounds what that can keep to what startup built, once.
    """
    if threshold:
        gc.collect()
        gc.freeze()
        gc.set_threshold(threshold, *gc.get_threshold()[1:])


def json_logger(stream: TextIO = sys.stderr, fmt: str = "json") -> LineLog:
    """One line per record on ``stream``: JSON, or ``key=value`` text (``LineLog``)."""
    return LineLog(stream, fmt)


async def run_proxy(
    config: ProxyConfig,
    *,
    log: Callable[[dict[str, Any]], None],
    shutdown: trio.Event,
    stop_now: trio.Event | None = None,
    store: StateStore | None = None,
    startup: Startup | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    process: bool = False,
) -> None:
    """Serve ``config`` until ``shutdown`` is set; ``task_status`` gets the port.

    ``stop_now``: once set (after ``shutdown``: a second signal), the grace
    period is cut short: what is still in flight is cancelled, then the app
    closes as usual (the state file and the log still get everything).
    ``store``: the state file, already open (``run`` opens it first so that a
    problem with it stops the start with one clear line); closed at the end.
    ``process``: the process is the proxy's own (``run``), so its garbage
    collector is tuned once listening (``tune_gc``).
    """
    async with open_app(config, log, store, startup) as app:
        options = ServerOptions(**config.server)
        async with trio.open_nursery() as nursery:

            async def serving(task_status: trio.TaskStatus[int]) -> None:
                await serve(
                    app,
                    options,
                    task_status=task_status,
                    shutdown=shutdown,
                    log=log,
                    reuse_port=WORKER_ENV in os.environ,
                )
                nursery.cancel_scope.cancel()  # the watchers below

            try:
                port = await nursery.start(serving)
            except OSError as exc:  # before listening: only the bind can fail this way
                raise listen_error(options.host, options.port, exc) from None

            async def end_streams() -> None:
                await shutdown.wait()
                app.views.hub.close()

            async def cut(stop_now: trio.Event) -> None:
                await stop_now.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(end_streams)
            if stop_now is not None:
                nursery.start_soon(cut, stop_now)
            if process:
                tune_gc(options.gc_threshold)
            status = app.status()
            log(
                {
                    "event": "listening",
                    "url": url_of(options.host, port),
                    "upstream": config.upstream,
                    "keys": [k["alias"] for k in status["keys"]],
                    "state": config.state_path,
                    "client_tokens": len(config.client_tokens),
                    "admin_api": config.admin_token is not None,
                    "http_parser": resolve_parser(options.parser),
                    "gc_threshold": gc.get_threshold()[0],
                }
            )
            if not config.client_tokens:
                log(
                    {
                        "event": "warning",
                        "message": "no client tokens: anyone who can connect to "
                        f"{url_of(options.host, port)} may use the pool "
                        "(set KEYROTOR_CLIENT_TOKENS)",
                    }
                )
            if not status["keys"]:
                log({"event": "warning", "message": "no keys yet: add one with keyrotor keys add"})
            task_status.started(port)


def url_of(host: str, port: int) -> str:
    """The URL of a server on ``host``:``port`` (``""``, every interface: 0.0.0.0)."""
    host = host or "0.0.0.0"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def listen_error(host: str, port: int, exc: OSError) -> ConfigError:
    """A failed bind (or name lookup) of ``host``:``port`` as one clear line."""
    where = f"[{host}]:{port}" if ":" in host else f"{host or '*'}:{port}"
    reason = exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, socket.gaierror):
        problem = f"cannot resolve the address {host!r} ({reason})"
        fix = "set --host to an address of this machine: 127.0.0.1 (this machine) or 0.0.0.0"
    elif exc.errno == errno.EADDRINUSE:
        problem = "address already in use"
        fix = "choose another --port, or stop the process using it"
    elif exc.errno == errno.EACCES:
        problem = "permission denied"
        fix = "choose a --port from 1024 up (lower ones need privileges)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        problem = "no network interface of this machine has that address"
        fix = "set --host to 127.0.0.1 (this machine) or 0.0.0.0 (every interface)"
    else:
        problem = reason[:1].lower() + reason[1:]
        fix = "check --host and --port"
    return ConfigError(f"cannot listen on {where}: {problem}", fix=fix)


def _sole(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups (or ``exc``)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def check(config: ProxyConfig, log: Callable[[dict[str, Any]], None]) -> None:
    """Raise what ``run`` would before serving (the state file, the keys: see
    there), then let go of the state file."""
    store, _ = _prepare(config, log)
    if store is not None:
        store.close()


def _prepare(
    config: ProxyConfig, log: Callable[[dict[str, Any]], None]
) -> tuple[StateStore | None, Startup]:
    """The open state file and the start's plan; the file closed if planning fails."""
    store = open_store(config, log)
    try:
        return store, plan(config, store, log)  # fails now, not inside the event loop
    except BaseException:
        if store is not None:
            store.close()
        raise


class _Stop:
    """Requests to stop: the first sets ``shutdown`` (drain), the next ``now`` (cut)."""

    def __init__(self, log: Callable[[dict[str, Any]], None]) -> None:
        self.log = log
        self.shutdown = trio.Event()
        self.now = trio.Event()
        self.signals = 0

    def request(self, now: bool, **why: str) -> None:
        """Drain (``now``: stop now), saying ``why`` in the log; again is a no-op."""
        if now and not self.now.is_set():
            self.log({"event": "stopping_now", **why})
            self.shutdown.set()
            self.now.set()
        elif not self.shutdown.is_set():
            self.log({"event": "shutdown", **why})
            self.shutdown.set()

    async def on_signals(self, signals: AsyncIterator[int]) -> None:
        """The first SIGINT or SIGTERM drains, the next ones stop now."""
        async for signum in signals:
            self.signals += 1
            self.request(self.signals > 1, signal=signal.Signals(signum).name)

    async def on_supervisor(self, fd: int) -> None:
        """The supervisor's word through its pipe (``workers.STOP``, ``STOP_NOW``);
        its EOF (the supervisor is gone, even killed) drains."""
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                data = os.read(fd, 64)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if STOP_NOW in data:
                self.request(True, reason="supervisor")
            elif data:
                self.request(False, reason="supervisor")
            else:
                self.request(False, reason="supervisor gone")
                return


def run(config: ProxyConfig, stream: TextIO = sys.stderr) -> None:
    """Block serving ``config``; SIGINT or SIGTERM shuts down gracefully, a
    second one cuts the grace period short (the state file and the log still
    get everything). A worker of ``--workers`` also stops on its supervisor's
    word, or when the supervisor is gone (``workers.py``).

    Raises ``StorageError`` or ``ConfigError`` before serving when the state
    file cannot be used or there is no key to start with, and ``ConfigError``
    when the address cannot be listened on (busy port, unknown host) or the
    ``--record`` file cannot be written. The state file is closed in every case.
    """
    log = json_logger(stream, config.log_format)
    store, startup = _prepare(config, log)
    pipe = stop_pipe()

    async def main() -> None:
        stop = _Stop(log)
        # Open for the whole run: a signal never meets Python's default handling
        # (death, KeyboardInterrupt) while the proxy drains or closes.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals, log.batched():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop.on_signals, signals)
                if pipe is not None:
                    nursery.start_soon(stop.on_supervisor, pipe)
                await run_proxy(
                    config,
                    log=log,
                    shutdown=stop.shutdown,
                    stop_now=stop.now,
                    store=store,
                    startup=startup,
                    process=True,
                )
                nursery.cancel_scope.cancel()

    from ..storage import StorageError

    try:
        trio.run(main)
    except (BaseExceptionGroup, OSError) as exc:  # trio's nurseries wrap what tasks raise
        sole = _sole(exc)
        if isinstance(sole, (ConfigError, StorageError)):
            raise sole from None
        if isinstance(sole, OSError) and config.record and sole.filename == config.record:
            fix = (
                "give --record a file of its own (a new one, or an earlier trace)"
                if isinstance(sole, FileExistsError)
                else "give --record a path in an existing directory this user may write to"
            )
            raise ConfigError(
                f"cannot write the trace file {config.record}: {sole.strerror or sole}", fix=fix
            ) from None
        raise
    finally:
        if store is not None:
            store.close()  # idempotent: normally open_app closed it already
