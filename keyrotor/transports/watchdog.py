"""Deadlines for waits on sockets under trio, without a cancel scope per wait.

A trio cancel scope with a deadline costs a request a few microseconds to enter,
move and leave (its context managers, the run's deadline heap): the connection
pool took one per request for its timeouts, the proxy's server one for its
keep-alive wait. A ``Watchdog`` serves every socket of a trio run with one task:
a deadline is a dict entry, and a wait past it is ended with
``trio.lowlevel.notify_closing``, which is what a timed-out connection needs
anyway (it is closed next). docs/benchmarks.md, "The hot path", has the figures.
"""

from __future__ import annotations

import math
import socket
from typing import Final

import trio

__all__ = ["Watchdog"]


class Watchdog:
    """Ends the waits on sockets that outlive their deadline: one task for a whole
    trio run. ``watch(sock, deadline)`` before waiting on ``sock`` (or while a
    task waits on it), ``unwatch(sock)`` once the wait is over; a wait still on
    at its deadline gets ``trio.ClosedResourceError`` (``notify_closing``), and
    its socket must then be closed by its owner."""

    _RUN_VAR: Final = trio.lowlevel.RunVar["Watchdog"]("keyrotor_watchdog")

    def __init__(self) -> None:
        self.waits: dict[socket.socket, float] = {}  # waiting now -> its deadline
        self.target = math.inf  # when the task wakes next
        self.sleep: trio.CancelScope | None = None  # its sleep, while it sleeps

    @classmethod
    def of_this_run(cls) -> Watchdog:
        """The running trio run's watchdog, started on first use (a system task)."""
        try:
            return cls._RUN_VAR.get()
        except LookupError:
            watchdog = cls()
            cls._RUN_VAR.set(watchdog)
            trio.lowlevel.spawn_system_task(watchdog.run, name="keyrotor-deadlines")
            return watchdog

    def watch(self, sock: socket.socket, deadline: float) -> None:
        self.waits[sock] = deadline
        if deadline < self.target:
            self.target = deadline
            if self.sleep is not None:
                self.sleep.deadline = deadline  # wake earlier

    def unwatch(self, sock: socket.socket) -> None:
        self.waits.pop(sock, None)

    async def run(self) -> None:
        while True:
            with trio.CancelScope(deadline=self.target) as self.sleep:
                await trio.sleep_forever()
            self.sleep = None
            now = trio.current_time()
            target = math.inf
            for sock, deadline in list(self.waits.items()):
                if deadline <= now:
                    del self.waits[sock]
                    if sock.fileno() != -1:
                        trio.lowlevel.notify_closing(sock)
                elif deadline < target:
                    target = deadline
            self.target = target
