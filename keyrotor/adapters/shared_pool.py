"""What the pool's processes tell each other through Redis besides key health,
limits and spend (docs/scaling.md):

- ``ProcessBoard``: every second each process writes a summary of itself
  (pid, worker, requests, in flight) to the hash ``<namespace>:processes``
  and reads the others', so that ``/status`` and ``/metrics`` of any process show
  the whole pool; a process silent for ``STALE`` s is left out (and removed
  from the hash after a minute).
- ``SharedModels``: a model that failed as a model here (no endpoints, no
  provider up) cools in every process: its ``until`` is published on
  ``<namespace>:models`` and taken by the others unless they cool it longer.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import anyio

from .shared import Outbox

if TYPE_CHECKING:
    from ..models.cooling import ModelCooling

__all__ = ["EVERY", "STALE", "ProcessBoard", "SharedModels"]

EVERY = 1.0
"""Seconds between a process's summaries."""
STALE = 5.0
"""Seconds after which a silent process is left out of the pool's view."""
_FORGET = 60.0
_SUMMED = ("requests", "delivered", "rejected", "inFlight", "queued", "failovers")


class ProcessBoard:
    """This process's summary in Redis, and every live process's, for ``/status``."""

    name = "processes"
    channels: Mapping[str, Callable[[dict[str, Any]], None]] = MappingProxyType({})

    def __init__(
        self,
        origin: str,
        summary: Callable[[], dict[str, Any]],
        *,
        namespace: str = "keyrotor",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.origin = origin
        self._summary = summary
        self._clock = clock
        self.hash = f"{namespace}:processes"
        self._others: dict[str, dict[str, Any]] = {}

    def mine(self) -> dict[str, Any]:
        """This process's summary now."""
        return {
            "origin": self.origin,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "worker": os.environ.get("KEYROTOR_WORKER"),
            "at": self._clock(),
            **self._summary(),
        }

    async def connected(self, client: Any) -> None:
        await self._exchange(client)

    async def run(self, client: Any) -> None:
        while True:
            await anyio.sleep(EVERY)
            await self._exchange(client)

    async def _exchange(self, client: Any) -> None:
        now = self._clock()
        await client.hset(self.hash, {self.origin: json.dumps(self.mine())})
        others: dict[str, dict[str, Any]] = {}
        gone = []
        for origin, text in (await client.hgetall(self.hash)).items():
            try:
                summary = json.loads(text)
                at = float(summary["at"])
            except (ValueError, KeyError, TypeError):
                gone.append(origin)
                continue
            if now - at > _FORGET:
                gone.append(origin)
            elif origin != self.origin:
                others[str(origin)] = summary
        if gone:
            await client.hdel(self.hash, gone)
        self._others = others

    def disconnected(self) -> None:
        """Without Redis, the pool's view is this process alone."""
        self._others = {}

    def pool(self) -> dict[str, Any]:
        """``/status``'s ``pool``: each live process and their totals."""
        now = self._clock()
        processes = [self.mine()]
        processes += [s for s in self._others.values() if now - float(s["at"]) <= STALE]
        total: dict[str, Any] = {name: sum(p.get(name) or 0 for p in processes) for name in _SUMMED}
        total["processes"] = len(processes)
        return {"processes": processes, "total": total}

    def status(self) -> dict[str, Any]:
        return {"known": len(self._others) + 1}


class SharedModels:
    """Model cooldowns published to the other processes and taken from them."""

    name = "models"

    def __init__(
        self,
        cooling: ModelCooling,
        origin: str,
        *,
        namespace: str = "keyrotor",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._cooling = cooling
        self.origin = origin
        self._clock = clock
        self.channel = f"{namespace}:models"
        self.channels = {self.channel: self.heard}
        self.outbox: Outbox[dict[str, Any]] = Outbox(1000)
        self.taken = 0

    def cooled(self, model: str, until: float, why: str) -> None:
        """The router's ``on_cool``: ``model`` cools here until ``until`` (Unix s)."""
        self.outbox.put({"model": model, "until": until, "why": why, "origin": self.origin})

    def heard(self, record: dict[str, Any]) -> None:
        if record.get("origin") == self.origin:
            return
        try:
            model, until, why = str(record["model"]), float(record["until"]), str(record["why"])
        except (KeyError, TypeError, ValueError):
            return
        if until > self._clock() and self._cooling.hold(model, until, f"shared: {why}"[:200]):
            self.taken += 1

    async def connected(self, client: Any) -> None:
        """Cooldowns are short-lived: those missed while away are not fetched."""

    async def run(self, client: Any) -> None:
        await self.outbox.drain(lambda record: client.publish(self.channel, json.dumps(record)))

    def disconnected(self) -> None:
        """Cooldowns decided while away stay in the outbox (at most 1000)."""

    def status(self) -> dict[str, Any]:
        return {"queued": len(self.outbox), "taken": self.taken}
