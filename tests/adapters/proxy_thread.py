"""The proxy (``run_proxy``) on its own trio loop in a thread, for blocking test code."""

from __future__ import annotations

import queue
import threading
from typing import Any

import trio

from keyrotor.adapters.config import ProxyConfig
from keyrotor.adapters.proxy.main import run_proxy


class ProxyThread:
    """``with ProxyThread(config, log) as url:`` serves ``config`` until the block ends.

    ``log`` collects the proxy's log records; ``store``, an already open state
    file, is handed to ``run_proxy`` (which closes it).
    """

    def __init__(self, config: ProxyConfig, log: list[dict[str, Any]], store: Any = None) -> None:
        self.config = config
        self.log = log
        self.store = store
        self._ready: queue.Queue[int] = queue.Queue()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        self._shutdown = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                lambda task_status: run_proxy(
                    self.config,
                    log=self.log.append,
                    shutdown=self._shutdown,
                    store=self.store,
                    task_status=task_status,
                )
            )
            self._ready.put(port)

    def __enter__(self) -> str:
        self._thread.start()
        return f"http://127.0.0.1:{self._ready.get(timeout=10)}"

    def __exit__(self, *exc: object) -> None:
        trio.from_thread.run_sync(self._shutdown.set, trio_token=self._token)
        self._thread.join(timeout=10)
        assert not self._thread.is_alive()
