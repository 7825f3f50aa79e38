"""What the sync and async clients share above the driver: construction,
``from_env``, ``repr`` and the chat payload."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Self

from ..core import KeySpec, KeyState, PoolConfig
from ._driver import OPENROUTER_URL, Driver, keys_from_env
from ._http import HTTPOptions, Upstream
from .errors import ConfigurationError, KeyrotorError

if TYPE_CHECKING:
    from ..replay.record import TraceRecorder
    from ..replay.trace import TraceWriter

__all__ = ["ClientBase"]


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
        ``OPENROUTER_API_KEY_1..N``; base URL from ``OPENROUTER_BASE_URL`` if set.

        The keys are named ``env1``, ``env2``, ... in that order, as ``keyrotor
        serve`` names the same environment's keys, so status, logs and traces
        of the client and the proxy agree."""
        env = os.environ if environ is None else environ
        if "base_url" not in options and env.get("OPENROUTER_BASE_URL"):
            options["base_url"] = env["OPENROUTER_BASE_URL"]
        keys = {f"env{i}": secret for i, secret in enumerate(keys_from_env(env), 1)}
        return cls(keys, **options)

    # ------------------------------------------------------ keys at runtime
    # Raise ``ConfigurationError`` (unknown or duplicate alias, a bad secret)
    # or ``keyrotor.core.PoolError`` (a state the pool refuses), never with a
    # secret in the message.

    def add_key(self, alias: str, secret: str, **spec: Any) -> None:
        """Add a key to the running pool; ``spec``: ``KeySpec``'s options
        (``weight``, ``account``, ``max_in_flight``, ``rpm``, ``tpm``,
        ``budget``, ``budget_window``, ``credits``)."""
        key = KeySpec(key_id=alias, **spec)
        with self._guard():
            self._driver.add_key(secret, key)

    def remove_key(self, alias: str) -> None:
        """Remove a key: requests on it finish, no new ones start."""
        with self._guard():
            self._driver.remove_key(alias)

    def mark_key(self, alias: str, state: KeyState | str, *, duration: float | None = None) -> None:
        """Set a key's state as an operator: ``healthy`` (after a refund),
        ``disabled``, ``depleted``, ``failed``, or ``rate_limited`` /
        ``degraded`` for ``duration`` seconds."""
        try:
            key_state = KeyState(state)
        except ValueError:
            names = ", ".join(s.value for s in KeyState)
            raise ConfigurationError(f"unknown state {state!r}; states are {names}") from None
        with self._guard():
            self._driver.mark_key(alias, key_state, duration)

    def probe_keys(self, alias: str | None = None) -> None:
        """Probe one key now, or every key that is not disabled."""
        with self._guard():
            self._driver.probe_keys(alias)

    # ------------------------------------------------------------ recording

    def record(
        self,
        target: str | os.PathLike[str] | TraceWriter,
        *,
        source: str = "transport",
        hash_labels: bool = True,
    ) -> TraceRecorder:
        """Record the traffic from now on as a trace (docs/replay.md): one
        JSON line per finished request, no prompt text, no secret; sessions and
        groups replaced by keyed hashes unless ``hash_labels=False``. Recording
        stops when the client closes, or on a write error (the traffic goes on;
        the driver's ``on_recording_error`` hears of it)."""
        from ..replay.record import TraceRecorder

        with self._guard():
            driver = self._driver
            if driver.recorder is not None:
                raise KeyrotorError("this client is already recording a trace")
            driver.recorder = TraceRecorder(
                target, driver.pool.config, driver.now(), source, hash_labels,
                wall_start=driver.wall_clock(),
            )  # fmt: skip
            return driver.recorder

    def _stop_recording(self) -> None:
        with self._guard():
            recorder, self._driver.recorder = self._driver.recorder, None
        if recorder is not None:
            recorder.close()

    def _guard(self) -> contextlib.AbstractContextManager[Any]:
        """Held around calls into the driver (the blocking client's lock)."""
        return contextlib.nullcontext()

    def __repr__(self) -> str:
        keys = list(self._driver.secrets)
        return f"<{type(self).__name__} {self._upstream.url} keys={keys}>"
