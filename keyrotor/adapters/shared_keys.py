"""Keys added or removed through one process's admin API, on every process of
the pool (docs/scaling.md).

An added key travels encrypted: its secret is sealed with Fernet under
``KEYROTOR_SECRET_KEY`` (the same value on every process; a passphrase is
stretched with a salt made of the namespace), kept in the Redis hash
``<namespace>:keys:added`` and published on ``<namespace>:keys:admin``. The
other processes open it and add the key as their own admin API would (pool,
state file). A removal is kept in ``<namespace>:keys:removed`` and published the
same way. A process that (re)connects reads both hashes: it adds the keys it
lacks and removes those removed meanwhile (only keys added at runtime: keys of
a process's configuration stay). Without ``KEYROTOR_SECRET_KEY`` nothing is
shared (said once in the log): a secret never reaches Redis in the clear.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio

from ..core import KeySpec, PoolError
from .config import MAIN_PROVIDER
from .shared import Outbox
from .storage import StorageError, cipher_for, secret_key_from_env

if TYPE_CHECKING:
    from .proxy.admin import Admin

__all__ = ["SharedKeys"]


class SharedKeys:
    """Runtime key changes of this process published; the others' applied."""

    name = "keys"

    def __init__(
        self,
        admin: Admin,
        origin: str,
        *,
        namespace: str = "keyrotor",
        environ: Mapping[str, str] | None = None,
        log: Callable[[dict[str, Any]], None] = lambda record: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._admin = admin
        self.origin = origin
        self._log = log
        self._clock = clock
        self.channel = f"{namespace}:keys:admin"
        self.channels = {self.channel: self.heard}
        self._added = f"{namespace}:keys:added"
        self._removed = f"{namespace}:keys:removed"
        self._out: Outbox[tuple[str, str, dict[str, Any]]] = Outbox()
        self._in: Outbox[dict[str, Any]] = Outbox()
        self.applied = self.refused = 0
        self._tasks: Any = None  # ``run``'s task group: adds that wait for an alias to drain
        self._latest: dict[str, dict[str, Any]] = {}  # per alias, the last record not done
        self._waiting: set[str] = set()  # aliases whose add waits for the old key to drain
        self._cipher: Any = None
        self.why_not: str | None = None
        key = secret_key_from_env() if environ is None else secret_key_from_env(environ)
        if key is None:
            self.why_not = (
                "keys added through the admin API stay on the process that added them: "
                "set KEYROTOR_SECRET_KEY (the same on every process) to share them"
            )
        else:
            try:
                self._cipher = cipher_for(key, f"keyrotor shared keys {namespace}".encode())
            except StorageError as exc:
                self.why_not = str(exc)
        admin.on_added = self.added
        admin.on_removed = self.removed

    # ------------------------------------------------------ this process

    def added(self, alias: str, secret: str, spec: Mapping[str, Any]) -> None:
        """The admin API added ``alias`` here: seal and publish it."""
        if self._cipher is None:
            return
        token = self._cipher.encrypt(secret.encode()).decode()
        record = {"op": "add", "alias": alias, "spec": dict(spec), "token": token}
        self._latest.pop(alias, None)  # newer than any add of it heard: that one waits no more
        self._send(self._added, alias, record)

    def removed(self, alias: str) -> None:
        """The admin API removed ``alias`` here."""
        if self._cipher is not None:
            self._latest.pop(alias, None)
            self._send(self._removed, alias, {"op": "remove", "alias": alias})

    def _send(self, where: str, alias: str, record: dict[str, Any]) -> None:
        record |= {"origin": self.origin, "at": self._clock()}
        self._out.put((where, alias, record))

    # ------------------------------------------------------ the others

    def heard(self, record: dict[str, Any]) -> None:
        if record.get("origin") != self.origin and self._cipher is not None:
            self._in.put(record)

    async def connected(self, client: Any) -> None:
        """Take what was added or removed elsewhere while this process was away."""
        if self._cipher is None:
            if self.why_not is not None:
                self._log({"event": "warning", "message": self.why_not})
                self.why_not = None  # said once
            return
        removed = await client.hgetall(self._removed)
        added = await client.hgetall(self._added)
        for text in [*added.values(), *removed.values()]:
            try:
                record = json.loads(text)
            except ValueError:
                continue
            if isinstance(record, dict):
                self._in.put(record)

    async def run(self, client: Any) -> None:
        async def publish(change: tuple[str, str, dict[str, Any]]) -> None:
            where, alias, record = change
            other = self._removed if where == self._added else self._added
            async with client.pipeline(transaction=False) as pipe:
                pipe.hset(where, {alias: json.dumps(record)})
                pipe.hdel(other, [alias])
                pipe.publish(self.channel, json.dumps(record))

        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            tasks.start_soon(self._in.drain, self._apply)
            await self._out.drain(publish)

    async def _apply(self, record: dict[str, Any]) -> None:
        alias = record.get("alias")
        if not isinstance(alias, str):
            return
        self._latest[alias] = record
        try:
            await self._apply_one(alias, record)
        finally:  # done with it, unless it waits for the alias to drain
            if self._latest.get(alias) is record and alias not in self._waiting:
                del self._latest[alias]

    async def _apply_one(self, alias: str, record: dict[str, Any]) -> None:
        from .proxy.admin import AdminError

        admin = self._admin
        entry = self._entry(alias)
        try:
            if record.get("op") == "add":
                secret = self._cipher.decrypt(str(record["token"]).encode()).decode()
                spec = dict(record.get("spec") or {})
                KeySpec(key_id=alias, **spec)  # the options' own checks
                if entry is not None and not entry["removing"]:
                    if admin.sources.get(alias) != "api" or admin.secret_of(alias) == secret:
                        return  # the same key, or one of this process's configuration
                    await admin.remove_key(alias, "shared")  # replaced elsewhere: rotated
                if entry is not None and self._tasks is not None:  # the old one drains first
                    self._waiting.add(alias)
                    self._tasks.start_soon(self._when_drained, alias, record)
                    return
                await admin.add_key(MAIN_PROVIDER, alias, secret, spec, "shared")
            elif (
                record.get("op") == "remove"
                and entry is not None
                and not entry["removing"]
                and admin.sources.get(alias) == "api"
            ):
                await admin.remove_key(alias, "shared")
            else:
                return
        except (AdminError, PoolError, KeyError, TypeError, ValueError) as exc:
            self.refused += 1
            self._log({"event": "warning", "message": f"shared key {alias!r} not applied: {exc}"})
            return
        except Exception:  # a token sealed under another KEYROTOR_SECRET_KEY
            self.refused += 1
            self._log(
                {
                    "event": "warning",
                    "message": f"shared key {alias!r} cannot be opened: is KEYROTOR_SECRET_KEY "
                    "the same on every process?",
                }
            )
            return
        self.applied += 1

    def _entry(self, alias: str) -> dict[str, Any] | None:
        found = self._admin.list_keys(alias)
        return found[0] if found else None

    async def _when_drained(self, alias: str, record: dict[str, Any]) -> None:
        """Apply ``record`` (an add) once the pool holds no key ``alias`` (a key
        removed finishes its requests first), unless a newer record of the
        alias came meanwhile; the others are applied while it waits."""
        try:
            while self._latest.get(alias) is record:  # a newer change of it ends the wait
                if self._entry(alias) is None:
                    self._in.put(record)
                    return
                await anyio.sleep(0.05)
        finally:
            self._waiting.discard(alias)

    def disconnected(self) -> None:
        """Changes made here while away stay queued."""

    def status(self) -> dict[str, Any]:
        return {
            "shared": self._cipher is not None,
            "queued": len(self._out),
            "applied": self.applied,
            "refused": self.refused,
        }
