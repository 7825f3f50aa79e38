"""A big JSON value's text in parts, for answers the proxy makes of a large
pool (``/status``, the dashboard's ``status`` frame): a caller can let other
work run between the parts (one ``json.dumps`` of 10,000 keys holds the GIL,
and so the event loop, for its whole length)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any


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
