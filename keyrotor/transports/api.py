"""The transports' public API for adapters: what the proxy, the ASGI app, the
httpx transports and the configuration loader build on.

Modules outside ``keyrotor/transports`` import from here (or from the other
public modules: ``asyncio``, ``trio``, ``sync``, ``errors``), never from a
``keyrotor.transports._*`` module; ``tests/test_layering.py`` checks it. The
names, by group:

Clients
    ``AsyncClient``: the async client (anyio: asyncio and trio), the class that
    ``keyrotor.transports.asyncio.Client`` and ``keyrotor.transports.trio.Client``
    name. ``StreamResponse``: what its ``stream()`` yields, a delivered
    response whose body is read as it arrives. The blocking client is
    ``keyrotor.transports.sync.Client`` (with its own ``StreamResponse``).

HTTP
    ``HTTPOptions``: connection and timeout options (docs/transports.md).
    ``ResponseHead``: status, headers, key alias and attempts of a delivered
    response, shared by both clients' ``StreamResponse``.
    ``ConnectionPool``: the small HTTP/1.1 client (h11 over anyio) the async
    client sends with, for an adapter that needs plain HTTP (the demo's
    traffic); usage in its docstring.

Hooks and inspection
    ``Driver``: the type of ``AsyncClient.driver``. Adapters use ``pool`` (read
    only), ``now()``, ``wall_clock()``, ``feed()`` (events such as
    ``SpendRecorded``), ``mark_key(..., reason=)``, ``check_new_key()`` and the
    hooks ``on_state_change``, ``on_finished`` and ``on_recording_error``; its
    slots, probes and request bookkeeping are the transports' own.
    ``StreamAccountant``: what an ``on_finished`` hook receives with the key's
    alias (``cost``, ``prompt_tokens``, ``completion_tokens``).

Configuration helpers
    ``OPENROUTER_URL``: the default upstream. ``keys_from_env(environ)``: the
    secrets of ``OPENROUTER_KEYS``, ``OPENROUTER_API_KEY`` and
    ``OPENROUTER_API_KEY_1..N``, in that order. ``mask(secret)``: the form of a
    secret that logs, status and errors show.

The names are loaded on first use, so importing this module costs nothing more
than what the caller then uses (``adapters/config.py`` needs no async client).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._async import AsyncClient, StreamResponse
    from ._driver import (
        OPENROUTER_URL,
        Driver,
        StreamAccountant,
        keys_from_env,
        mask,
        valid_secret,
    )
    from ._h11pool import ConnectionPool
    from ._http import (
        HTTPOptions,
        ResponseHead,
        header_name_ok,
        header_value_ok,
        openrouter_like,
    )

__all__ = [
    "OPENROUTER_URL",
    "AsyncClient",
    "ConnectionPool",
    "Driver",
    "HTTPOptions",
    "ResponseHead",
    "StreamAccountant",
    "StreamResponse",
    "header_name_ok",
    "header_value_ok",
    "keys_from_env",
    "mask",
    "openrouter_like",
    "valid_secret",
]

_HOMES = {
    # clients
    "AsyncClient": "._async",
    "StreamResponse": "._async",
    # HTTP
    "HTTPOptions": "._http",
    "ResponseHead": "._http",
    "header_name_ok": "._http",
    "header_value_ok": "._http",
    "openrouter_like": "._http",
    "ConnectionPool": "._h11pool",
    # hooks and inspection
    "Driver": "._driver",
    "StreamAccountant": "._driver",
    # configuration helpers
    "OPENROUTER_URL": "._driver",
    "keys_from_env": "._driver",
    "mask": "._driver",
    "valid_secret": "._driver",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __package__), name)
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
