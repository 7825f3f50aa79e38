"""Spend the pool's processes add up in Redis, so budgets hold in total
(docs/scaling.md).

Each process sums what it spent per key, and per client token or model that
has a ``[[budgets]]`` window, by minute, and writes the sums (in one pipeline:
at once when a budget or a key's ``budget``/``credits`` waits for them, else
every ``LAZY`` s) to its own fields ``<minute>|<instance>`` of
the Redis hashes ``<namespace>:spend:<scope>:<name>``, then publishes them.
Another process takes the growth of each field it has not seen yet: a key's
spend enters its core as ``SpendRecorded`` (key budgets, credits, ``/status``),
a budget's into ``SpendBook.add_remote``. Totals, not increments, travel and
each field has one writer, so a record heard twice counts once; after a
reconnect (or at start) each process reads the hashes (catching up on what it
missed) and writes its own sums again (a Redis that restarted empty gets them
back). Spend not yet in Redis waits here while Redis is away: none is lost.

``instance`` is kept in the state file (``StateStore.instance_id``): a process
that restarts restores its own spend from its ledger and does not take its own
fields from Redis a second time.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

from ..core import PoolError, SpendRecorded

if TYPE_CHECKING:
    from ..transports.api import Driver, StreamAccountant
    from .proxy.spend import SpendBook

__all__ = ["KEEP", "LAZY", "SharedSpend"]

LAZY = 1.0
"""Seconds spend that no budget or credit limit waits for is summed before it
is written (a budgeted client or model, or a key with a ``budget`` or
``credits``, is written at once: under load, what is spent while a pipeline is
on its way joins the next one)."""
KEEP = 2 * 86400
"""Seconds a minute's spend is kept in Redis (and taken at start)."""
_MINUTE = 60


class SharedSpend:
    """This process's spend written to Redis, and the others' taken here."""

    name = "spend"

    def __init__(
        self,
        driver: Driver,
        book: SpendBook,
        *,
        instance: str,
        namespace: str = "keyrotor",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._driver = driver
        self._book = book
        self.instance = instance
        self._ns = namespace
        self._clock = clock
        self.channel = f"{namespace}:spend"
        self.channels = {self.channel: self.heard}
        self._index = f"{namespace}:spend:index"
        self._mine: dict[tuple[str, str, int], float] = {}  # this process's sums
        self._dirty: set[tuple[str, str, int]] = set()  # sums not yet in Redis
        self._seen: dict[tuple[str, str, int, str], float] = {}  # others' sums taken
        self._wake: anyio.Event | None = None
        self._hurry: anyio.Event | None = None
        self._urgent = False
        specs = driver.pool.key_specs().values()
        self._limited = {s.key_id for s in specs if s.budget is not None or s.credits is not None}
        self.taken = 0.0
        driver.on_finished.append(self._finished)
        book.on_budgeted = self.charged

    # ------------------------------------------------------ this process

    def _finished(self, key_id: str, usage: StreamAccountant) -> None:
        if usage.cost:
            self.charged("key", key_id, usage.cost, self._clock(), key_id in self._limited)

    def charged(self, scope: str, name: str, cost: float, at: float, urgent: bool = True) -> None:
        """``cost`` USD spent here on ``scope: name`` at ``at`` (Unix s); ``urgent``:
        a limit waits for it (``SpendBook`` hears only of budgeted spend)."""
        where = (scope, name, int(at // _MINUTE) * _MINUTE)
        self._mine[where] = self._mine.get(where, 0.0) + cost
        self._dirty.add(where)
        if self._wake is not None:
            self._wake.set()
        if urgent:
            self._urgent = True
            if self._hurry is not None:
                self._hurry.set()

    async def run(self, client: Any) -> None:
        """Write the sums that changed: at once when a limit waits for them, else
        every ``LAZY`` s."""
        while True:
            if not self._dirty:
                self._wake = anyio.Event()
                await self._wake.wait()
                self._wake = None
            if not self._urgent:
                self._hurry = anyio.Event()
                with anyio.move_on_after(LAZY):
                    await self._hurry.wait()
                self._hurry = None
            self._urgent = False
            batch, self._dirty = self._dirty, set()
            try:
                await self._write(client, batch)
            except BaseException:
                self._dirty |= batch  # not in Redis: written next time
                raise

    async def _write(self, client: Any, batch: set[tuple[str, str, int]]) -> None:
        values: list[tuple[str, str, int, float]] = [(*where, self._mine[where]) for where in batch]
        hashes = {self._hash(scope, name) for scope, name, _, _ in values}
        async with client.pipeline(transaction=False) as pipe:
            for scope, name, minute, total in values:
                pipe.hset(self._hash(scope, name), {f"{minute}|{self.instance}": repr(total)})
            for hash_name in hashes:
                pipe.expire(hash_name, KEEP)
            pipe.sadd(self._index, list(hashes))
            pipe.publish(self.channel, json.dumps({"instance": self.instance, "values": values}))
        horizon = self._clock() - KEEP
        if len(self._mine) > 10_000:
            self._mine = {k: v for k, v in self._mine.items() if k[2] >= horizon}

    def _hash(self, scope: str, name: str) -> str:
        return f"{self._ns}:spend:{scope}:{name}"

    # ------------------------------------------------------ the others

    def heard(self, record: dict[str, Any]) -> None:
        """Another process's sums (its published record)."""
        instance = record.get("instance")
        values = record.get("values")
        if instance == self.instance or not isinstance(values, list):
            return
        for value in values:
            try:
                scope, name, minute, total = value
                self._take(str(scope), str(name), int(minute), str(instance), float(total))
            except (TypeError, ValueError):
                continue

    async def connected(self, client: Any) -> None:
        """Catch up from the hashes (every other instance's spend of the last
        ``KEEP`` s not taken yet) and write this process's sums again."""
        prefix = f"{self._ns}:spend:"
        since = self._clock() - KEEP
        for hash_name in await client.smembers(self._index):
            scope, _, name = str(hash_name)[len(prefix) :].partition(":")
            fields = await client.hgetall(hash_name)
            if not fields:
                await client.srem(self._index, [hash_name])  # expired
                continue
            for field, total in fields.items():
                minute, _, instance = str(field).partition("|")
                try:
                    if int(minute) < since:
                        continue
                    if instance == self.instance:  # this file's, from before a restart
                        where = (scope, name, int(minute))
                        self._mine[where] = max(self._mine.get(where, 0.0), float(total))
                    else:
                        self._take(scope, name, int(minute), instance, float(total))
                except ValueError:
                    continue
        self._dirty |= {where for where in self._mine if where[2] >= since}

    def _take(self, scope: str, name: str, minute: int, instance: str, total: float) -> None:
        where = (scope, name, minute, instance)
        grown = total - self._seen.get(where, 0.0)
        if grown <= 1e-12:
            return
        self._seen[where] = total
        self.taken += grown
        if scope == "key":
            driver = self._driver
            now = driver.now()
            at = now - max(0.0, self._clock() - minute)
            with contextlib.suppress(PoolError):  # a key this process does not have
                driver.feed(SpendRecorded(now=now, key_id=name, cost=grown, at=at))
        else:
            self._book.add_remote(scope, name, grown, float(minute))
        if len(self._seen) > 100_000:  # forget minutes older than KEEP
            horizon = self._clock() - KEEP
            self._seen = {k: v for k, v in self._seen.items() if k[2] >= horizon}

    def disconnected(self) -> None:
        """Sums not written stay marked until Redis is back."""

    def status(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "unwritten": len(self._dirty),
            "takenUsd": round(self.taken, 9),
        }
