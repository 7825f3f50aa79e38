"""What the sync and async clients share above the driver: construction,
``from_env``, ``repr`` and the chat payload."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Self

from ..core import PoolConfig
from ._driver import OPENROUTER_URL, Driver, keys_from_env
from ._http import HTTPOptions, Upstream

__all__ = ["ClientBase", "chat_payload"]


class ClientBase:
    """Calls an OpenAI-compatible API through a pool of keys, with failover.

    Args:
        keys: the secrets (aliases ``key1``, ``key2``, ... are given), or a
            mapping alias -> secret. Secrets stay here: the pool, ``status()``,
            errors and logs know keys by alias only.
        base_url: the upstream, OpenRouter's by default.
        config: the pool's ``PoolConfig`` (its key ids must be the aliases).
        http: connection and timeout options.
        headers: headers sent on every request (``HTTP-Referer``, ``X-Title``).
        probe_path: the cheap call that probes a key (OpenRouter: ``/key``).
    """

    _clock: Callable[[], float] | None = None  # the driver's clock, if not time.monotonic

    def __init__(
        self,
        keys: Mapping[str, str] | Iterable[str],
        base_url: str = OPENROUTER_URL,
        config: PoolConfig | None = None,
        *,
        http: HTTPOptions | None = None,
        headers: Mapping[str, str] | None = None,
        probe_path: str = "/key",
    ) -> None:
        clock = {"clock": self._clock} if self._clock is not None else {}
        self._driver = Driver(keys, config, **clock)
        self._upstream = Upstream.from_url(base_url, http, headers, probe_path)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **options: Any) -> Self:
        """Keys from ``OPENROUTER_KEYS``, ``OPENROUTER_API_KEY`` and
        ``OPENROUTER_API_KEY_1..N``; base URL from ``OPENROUTER_BASE_URL`` if set."""
        env = os.environ if environ is None else environ
        if "base_url" not in options and env.get("OPENROUTER_BASE_URL"):
            options["base_url"] = env["OPENROUTER_BASE_URL"]
        return cls(keys_from_env(env), **options)

    def __repr__(self) -> str:
        keys = list(self._driver.secrets)
        return f"<{type(self).__name__} {self._upstream.url} keys={keys}>"


def chat_payload(
    model: str, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``/chat/completions`` body."""
    return {"model": model, "messages": list(messages), **params}
