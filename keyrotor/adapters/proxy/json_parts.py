"""A big JSON value's text in parts, for answers the proxy makes of a large
pool (``/status``, ``/admin/keys``, the dashboard's ``status`` frame): a caller
can let other work run between the parts (one ``json.dumps`` of 10,000 keys
holds the GIL, and so the event loop, for its whole length); and the event
loop's helpers that let other tasks run between steps and parts."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any, TypeVar

import anyio.lowlevel

SLICE = 0.005
"""Seconds of making an answer between two turns of the other tasks."""
PER_PART = 500
"""List items JSON-encoded at once."""

T = TypeVar("T")


async def stepped(steps: Generator[None, None, T]) -> T:
    """Run ``steps`` (e.g. ``Driver.status_steps()``) to its value, other tasks
    let run between its steps."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            value: T = done.value
            return value
        await anyio.lowlevel.checkpoint()


async def joined(parts: Iterable[str]) -> bytes:
    """The parts' text, other tasks let run after each ``SLICE`` of making it."""
    out = []
    mark = time.perf_counter()
    for part in parts:
        out.append(part.encode())
        if time.perf_counter() - mark > SLICE:
            await anyio.lowlevel.checkpoint()
            mark = time.perf_counter()
    return b"".join(out)


def json_parts(
    value: Any, depth: int, per_part: int, dumps: Callable[[Any], str] = json.dumps
) -> Iterator[str]:
    """``dumps(value)``, in parts that join to the same text: objects walked
    member by member ``depth`` levels down, lists of more than ``per_part``
    items (at any level) encoded that many at a time."""
    if isinstance(value, list) and len(value) > per_part:
        for start in range(0, len(value), per_part):
            text = dumps(value[start : start + per_part])
            yield ("[" if start == 0 else ", ") + text[1:-1]
        yield "]"
    elif depth and isinstance(value, dict) and all(isinstance(name, str) for name in value):
        before = "{"
        for name, item in value.items():
            yield before + json.dumps(name) + ": "
            yield from json_parts(item, depth - 1, per_part, dumps)
            before = ", "
        yield "{}" if before == "{" else "}"
    else:
        yield dumps(value)
