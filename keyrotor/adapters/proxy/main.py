"""Running the proxy: the pool's client, the app and the server in one trio run."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import trio

from ...core import KeyStateChanged
from ...transports._async import AsyncClient
from ..config import ProxyConfig
from .app import ProxyApp
from .server import ServerOptions, serve

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
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``config`` until ``shutdown`` is set; ``task_status`` gets the port."""
    async with AsyncClient(
        config.keys, config.upstream, config.pool, http=config.http, headers=config.headers
    ) as client:

        def state_changed(change: KeyStateChanged) -> None:
            log({"event": "key_state", **change.to_json()})

        client.driver.on_state_change.append(state_changed)
        app = ProxyApp(client, routing_note=config.routing_note)
        options = ServerOptions(**config.server)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                lambda task_status: serve(
                    app, options, task_status=task_status, shutdown=shutdown, log=log
                )
            )
            log(
                {
                    "event": "listening",
                    "url": f"http://{options.host}:{port}",
                    "upstream": config.upstream,
                    "keys": list(config.keys),
                }
            )
            task_status.started(port)


def run(config: ProxyConfig, stream: TextIO = sys.stderr) -> None:
    """Block serving ``config``; SIGINT or SIGTERM shuts down gracefully."""
    log = json_logger(stream, config.log_format)

    async def main() -> None:
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                await nursery.start(
                    lambda task_status: run_proxy(
                        config, log=log, shutdown=shutdown, task_status=task_status
                    )
                )
                if config.server.get("host") not in ("127.0.0.1", "localhost", "::1"):
                    log({"event": "warning", "message": "listening beyond loopback"})
                async for signum in signals:
                    log({"event": "shutdown", "signal": signal.Signals(signum).name})
                    shutdown.set()
                    break

    trio.run(main)
