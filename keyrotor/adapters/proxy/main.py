"""Running the proxy: the pool's client, the app and the server in one trio run."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

import trio

from ..config import ProxyConfig
from .runtime import Startup, open_app, open_store, plan
from .server import ServerOptions, serve

if TYPE_CHECKING:
    from ..storage import StateStore

__all__ = ["json_logger", "run", "run_proxy"]


def json_logger(stream: TextIO = sys.stderr, fmt: str = "json") -> Callable[[dict[str, Any]], None]:
    """One line per record on ``stream``: JSON, or ``key=value`` text.

    Records never hold a secret: the server logs no headers or bodies, and the
    pool knows keys by alias only.
    """

    def log(record: dict[str, Any]) -> None:
        record = {"ts": round(time.time(), 3), **record}
        if fmt == "json":
            line = json.dumps(record, default=str, separators=(",", ":"))
        else:
            line = " ".join(f"{k}={v}" for k, v in record.items())
        print(line, file=stream, flush=True)

    return log


async def run_proxy(
    config: ProxyConfig,
    *,
    log: Callable[[dict[str, Any]], None],
    shutdown: trio.Event,
    store: StateStore | None = None,
    startup: Startup | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``config`` until ``shutdown`` is set; ``task_status`` gets the port.

    ``store``: the state file, already open (``run`` opens it first so that a
    problem with it stops the start with one clear line); closed at the end.
    """
    async with open_app(config, log, store, startup) as app:
        options = ServerOptions(**config.server)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                lambda task_status: serve(
                    app, options, task_status=task_status, shutdown=shutdown, log=log
                )
            )
            status = app.status()
            log(
                {
                    "event": "listening",
                    "url": f"http://{options.host}:{port}",
                    "upstream": config.upstream,
                    "keys": [k["alias"] for k in status["keys"]],
                    "state": config.state_path,
                    "client_tokens": len(config.client_tokens),
                    "admin_api": config.admin_token is not None,
                }
            )
            if not config.client_tokens:
                log(
                    {
                        "event": "warning",
                        "message": "no client tokens: anyone who can connect to "
                        f"{options.host}:{port} may use the pool (set KEYROTOR_CLIENT_TOKENS)",
                    }
                )
            if not status["keys"]:
                log({"event": "warning", "message": "no keys yet: add one with keyrotor keys add"})
            task_status.started(port)


def run(config: ProxyConfig, stream: TextIO = sys.stderr) -> None:
    """Block serving ``config``; SIGINT or SIGTERM shuts down gracefully.

    Raises ``StorageError`` or ``ConfigError`` before serving when the state
    file cannot be used or there is no key to start with.
    """
    log = json_logger(stream, config.log_format)
    store = open_store(config, log)
    try:
        startup = plan(config, store, log)  # fails now, not inside the event loop
    except BaseException:
        if store is not None:
            store.close()
        raise

    async def main() -> None:
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                await nursery.start(
                    lambda task_status: run_proxy(
                        config,
                        log=log,
                        shutdown=shutdown,
                        store=store,
                        startup=startup,
                        task_status=task_status,
                    )
                )
                async for signum in signals:
                    log({"event": "shutdown", "signal": signal.Signals(signum).name})
                    shutdown.set()
                    break

    trio.run(main)
