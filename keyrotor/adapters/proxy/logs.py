"""The proxy's log: one line per record, written in batches while it serves.

A line per request written and flushed on its own costs a ``write`` system call
per request (and, when the log is a pipe, a wake-up of its reader). While
``batched`` runs, lines are queued and written together ``FLUSH_INTERVAL`` after
the first of a batch (or at once when ``MAX_BATCH`` are waiting); nothing is
queued while nothing is logged, and leaving ``batched`` (shutdown, an error)
writes what is left. Outside it, each record is written and flushed at once.
A process killed without warning (SIGKILL) loses at most ``FLUSH_INTERVAL`` of
lines.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, Final, TextIO

import trio

FLUSH_INTERVAL: Final = 0.1
"""Seconds from a batch's first line to its write."""
MAX_BATCH: Final = 1000
"""Lines waiting that are written at once, whatever the interval."""
_ENCODER: Final = json.JSONEncoder(default=str, separators=(",", ":"))
_QUOTED: Final = re.compile(r'[\s="\\]')
"""Characters for which a text value is written quoted: a caller's model name
holding a newline or ``" key=value"`` must not start a line or a field of its own."""


def _text_value(value: object) -> str:
    """``value`` in a ``key=value`` line: as it is, or JSON-quoted (escaped) when
    it is empty or holds whitespace, ``=``, ``"``, ``\\`` or unprintable characters."""
    text = str(value)
    if text and text.isprintable() and _QUOTED.search(text) is None:
        return text
    return json.dumps(text)


class LineLog:
    """A logger: ``log(record)`` writes one line, JSON or ``key=value`` text.

    Records never hold a secret: the server logs no headers or bodies, and the
    pool knows keys by alias only. Thread-safe: records from other threads
    (the state file's writer) join the same queue, in order.
    """

    def __init__(self, stream: TextIO = sys.stderr, fmt: str = "json") -> None:
        self.stream = stream
        self.fmt = fmt
        self._pending: deque[str] = deque()  # appended anywhere, drained on one thread
        self._lock = threading.Lock()  # one writer of the stream at a time
        self._wake: trio.Event | None = None  # set: a flusher runs (``batched``)
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = 0

    def __call__(self, record: dict[str, Any]) -> None:
        if self.fmt != "json":
            items = {"ts": round(time.time(), 3), **record}.items()
            line = " ".join(f"{k}={_text_value(v)}" for k, v in items)
        elif record and "ts" not in record:  # the usual line: no dict built for "ts"
            line = f'{{"ts":{time.time():.3f},' + _ENCODER.encode(record)[1:]
        else:
            line = _ENCODER.encode({"ts": round(time.time(), 3), **record})
        wake = self._wake
        if wake is None:
            self.flush(line)
            return
        pending = self._pending
        pending.append(line)
        if threading.get_ident() != self._thread:
            self._poke_from_thread()
        elif len(pending) >= MAX_BATCH:
            self.flush()
        elif len(pending) == 1:
            wake.set()

    def flush(self, *more: str) -> None:
        """Write every queued line now, then ``more``. A log that cannot be written
        (a closed pipe, a full disk) loses its lines; it never stops the proxy."""
        pending = self._pending
        with self._lock:
            lines = [pending.popleft() for _ in range(len(pending))]
            lines.extend(more)
            if lines:
                stream = self.stream
                with suppress(OSError, ValueError):  # ValueError: the stream was closed
                    stream.write("\n".join(lines) + "\n")
                    stream.flush()

    @contextmanager
    def batched(self, interval: float = FLUSH_INTERVAL) -> Iterator[None]:
        """Queue lines while the block runs (in trio); write what is left on leaving."""
        if self._wake is not None:
            raise RuntimeError("this log is already batched")
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.get_ident()
        self._wake = trio.Event()
        scope = trio.CancelScope()

        async def flusher() -> None:
            with scope:
                await self._flush_every(interval)

        # A system task: no nursery, so what the block raises is not wrapped.
        trio.lowlevel.spawn_system_task(flusher, name="keyrotor-log")
        try:
            yield
        finally:
            scope.cancel()
            self._wake = None
            self._token = None
            self.flush()

    async def _flush_every(self, interval: float) -> None:
        while (wake := self._wake) is not None:  # None: the block ended (maybe before we ran)
            await wake.wait()
            self._wake = trio.Event()
            await trio.sleep(interval)
            self.flush()

    def _poke_from_thread(self) -> None:
        """A line queued by another thread: wake the flusher from its own thread."""
        token = self._token
        if token is not None:
            try:
                token.run_sync_soon(self._set_wake)
                return
            except trio.RunFinishedError:
                pass
        self.flush()  # the flusher is gone: write it ourselves

    def _set_wake(self) -> None:
        wake = self._wake
        if wake is not None:
            wake.set()
        else:
            self.flush()
