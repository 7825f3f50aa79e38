"""Several processes, one pool: state shared through Redis (docs/scaling.md).

``SharedState`` keeps this process connected to Redis and shares key health
itself; the other parts (``SharedPart``: the counters of ``shared_limits``, the
spend of ``shared_spend``, the processes and models of ``shared_pool``) ride on
its connection, its subscription and its reconnects.

Each process keeps its own pool (the core stays pure and local). What its core
decides about a key's health leaves as a record, published on a Redis channel
and kept in a Redis hash (for processes that start or reconnect later); what
other processes decided arrives as records and enters the core as an event
(``KeyMarked``, reason ``shared: ...``), subject to fixed rules (``accepts``):

1. a mark by an operator wins over automatic states, both ways;
2. a cooldown (``rate_limited``, ``degraded``) is taken when the key is usable
   here, or cooling here until sooner: the later and longer cooldown wins;
3. ``depleted`` and ``failed`` are taken unless the key is disabled here, and
   stay until an operator or a probe says the key is healthy;
4. ``healthy`` is taken only from an operator or a probe; ``recovering`` (each
   process tries a key again on its own after a cooldown) is never shared.

Records that came from Redis are not published again. The request path never
waits for Redis: a change is queued (at most ``QUEUE`` records) and sent by a
background task; when Redis is unreachable each process keeps serving on its
own view, says so in ``status()`` (``/status``, ``/healthz``, the log),
notices within a second (a PING every 0.5 s), reconnects with backoff (0.1 s
doubling to 5 s), then reconciles: it reads the
hash, applies what it missed, and publishes what it queued meanwhile.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

import anyio

from ..core import KeyState

if TYPE_CHECKING:
    from ..core import KeyStateChanged
    from ..transports.api import Driver

__all__ = ["PREFIX", "QUEUE", "Outbox", "SharedPart", "SharedState", "accepts", "parse_url"]

PREFIX = "shared: "
"""The reason of a state this process took from another one."""
QUEUE = 10_000
"""Changes kept while Redis is unreachable (the oldest are dropped beyond)."""
HEARTBEAT = 0.5
"""Seconds between PINGs that tell a lost Redis (within twice that)."""
_COOLING = (KeyState.RATE_LIMITED, KeyState.DEGRADED)
_USABLE = (KeyState.HEALTHY, KeyState.RECOVERING)
_AUTHORITY = ("operator", "probe")  # reasons that may say a key is healthy again
T = TypeVar("T")


def parse_url(url: str) -> tuple[str, int, int]:
    """(host, port, db) of ``redis://host[:port][/db]``; ``ValueError`` naming the
    fix (which shows the URL without its user and password)."""
    bad = f"the shared state URL must be redis://host:port/db, got {_without_password(url)!r}"
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
        port = parts.port or 6379
        db = int(parts.path.strip("/") or 0)
    except ValueError:  # a port that is not one, a malformed [IPv6] host, a db not a number
        raise ValueError(bad) from None
    if parts.scheme != "redis" or not hostname:
        raise ValueError(bad)
    return hostname, port, db


def _without_password(url: str) -> str:
    """``url`` as it may be shown: without whatever comes before an ``@``
    (a user and password), and cut short."""
    scheme, sep, rest = url.partition("://")
    if "@" in url:
        rest = (rest if sep else url).rpartition("@")[2]
        url = f"{scheme}{sep}{rest}" if sep else rest
    return url if len(url) <= 200 else url[:200] + "..."


def _authoritative(reason: str) -> bool:
    return any(word in reason for word in _AUTHORITY)


def accepts(
    local: KeyState,
    local_until: float | None,
    remote: KeyState,
    remote_until: float | None,
    reason: str,
) -> bool:
    """Whether a remote record (``remote`` until ``remote_until``, for
    ``reason``) changes a key that is ``local`` here (until ``local_until``;
    times on one wall clock). The module's rules, in order."""
    if remote == local and remote_until == local_until:
        return False
    operator = "operator" in reason
    if local == KeyState.DISABLED and not operator:
        return False
    if operator:
        return remote != KeyState.RECOVERING
    if remote in _COOLING:
        if local in _USABLE:
            return True
        if local in _COOLING:
            return (remote_until or 0.0) > (local_until or 0.0)
        return False  # failed or depleted here stays
    if remote in (KeyState.DEPLETED, KeyState.FAILED):
        # A key revoked here (failed) stays failed: depleted may end with a
        # window and would send on a key the upstream refuses.
        return local != remote and local != KeyState.FAILED
    if remote == KeyState.HEALTHY:
        return _authoritative(reason) and local != KeyState.HEALTHY
    return False


def _ours(exc: BaseException) -> Exception:
    """The error a lost connection raised; anything else (cancellation at
    shutdown, ^C), even inside an exception group, is raised again."""
    if isinstance(exc, BaseExceptionGroup):
        errors, rest = exc.split(Exception)
        if rest is not None:
            raise rest from None
        assert errors is not None
        return _ours(errors.exceptions[0])
    if not isinstance(exc, Exception):
        raise exc
    return exc


class Outbox(Generic[T]):
    """What a process has to send to Redis, in order, kept while Redis is away
    (at most ``limit``: the oldest are dropped beyond, counted in ``dropped``)."""

    def __init__(self, limit: int = QUEUE) -> None:
        self.items: deque[T] = deque(maxlen=limit)
        self.dropped = 0
        self._wake: anyio.Event | None = None  # set while ``drain`` waits

    def __len__(self) -> int:
        return len(self.items)

    def put(self, item: T) -> None:
        if len(self.items) == self.items.maxlen:
            self.dropped += 1
        self.items.append(item)
        if self._wake is not None:
            self._wake.set()

    async def drain(self, send: Callable[[T], Awaitable[Any]]) -> None:
        """For as long as it runs: ``send`` each item; one leaves only once sent."""
        while True:
            while self.items:
                await send(self.items[0])
                self.items.popleft()
            self._wake = anyio.Event()
            if not self.items:
                await self._wake.wait()
            self._wake = None


class SharedPart(Protocol):
    """A part of the shared state, on ``SharedState``'s connection: records
    on its ``channels`` reach their handlers; ``connected`` reconciles after a
    (re)connect, ``run`` works in the background while connected, and
    ``disconnected`` hears that Redis went away."""

    name: str

    @property
    def channels(self) -> Mapping[str, Callable[[dict[str, Any]], None]]: ...

    async def connected(self, client: Any) -> None: ...

    async def run(self, client: Any) -> None: ...

    def disconnected(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


class SharedState:
    """This process's link to Redis: publishes its key state changes, applies
    the others', and carries the ``parts``."""

    def __init__(
        self,
        url: str,
        driver: Driver,
        *,
        namespace: str = "keyrotor",
        log: Callable[[dict[str, Any]], None] = lambda record: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host, self.port, self.db = parse_url(url)
        # redis://[USER]:PASSWORD@host (percent-encoded): sent, never shown
        parts = urlsplit(url)
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password is not None else None
        self.url = f"redis://{self.host}:{self.port}/{self.db}"
        self._driver = driver
        self._log = log
        self._clock = clock
        self.origin = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.channel = f"{namespace}:keys"
        self.hash = f"{namespace}:state"
        self.outbox: Outbox[dict[str, Any]] = Outbox()
        self.connected = False
        self.since: float | None = None
        self.last_error: str | None = None
        self.published = self.applied = self.ignored = 0
        self.parts: list[SharedPart] = []
        self._probed: set[str] = set()  # keys recovering after a probe here

    # ------------------------------------------------------------ local -> shared

    def state_changed(self, change: KeyStateChanged) -> None:
        """A ``Driver.on_state_change`` hook: queue this process's own change.
        A key a probe found good again, then served (``trial_ok``), is
        published healthy for that probe: the others take it (rule 4)."""
        reason = change.reason
        if reason.startswith(PREFIX):
            self._probed.discard(change.key_id)  # another process's record: not our probe's
            return
        if change.new == KeyState.RECOVERING:
            if "probe" in reason:
                self._probed.add(change.key_id)
            return
        if change.key_id in self._probed:
            self._probed.discard(change.key_id)
            if change.new == KeyState.HEALTHY:
                reason = f"probe_ok, {reason}"
        wall = self._driver.wall_clock()
        until = None if change.until is None else wall + (change.until - change.now)
        self.outbox.put(
            {
                "key": change.key_id,
                "state": change.new.value,
                "until": until,
                "reason": reason,
                "at": wall,
                "origin": self.origin,
            }
        )

    # ------------------------------------------------------------ shared -> local

    def apply(self, record: Mapping[str, Any]) -> bool:
        """Take another process's record into this pool, if the rules say so."""
        try:
            alias = record["key"]
            remote = KeyState(record["state"])
            until = record.get("until")
            reason = str(record.get("reason", ""))
        except (KeyError, ValueError, TypeError):
            self.ignored += 1
            return False
        if record.get("origin") == self.origin:
            return False
        driver = self._driver
        local = driver.pool.key_statistics(alias)
        if local is None:
            self.ignored += 1
            return False
        now, wall = driver.now(), driver.wall_clock()
        local_until = None if local.until is None else wall + (local.until - now)
        if until is not None and until <= wall and remote in _COOLING:
            self.ignored += 1  # over already
            return False
        if not accepts(local.state, local_until, remote, until, reason):
            self.ignored += 1
            return False
        duration = None if until is None else max(0.001, until - wall)
        if remote in _COOLING and duration is None:
            duration = 60.0
        try:
            driver.mark_key(alias, remote, duration, reason=PREFIX + reason[:200])
        except Exception as exc:  # a record the core refuses: said once, never fatal
            self.ignored += 1
            self.last_error = f"record for {alias!r} refused: {exc}"
            return False
        self.applied += 1
        return True

    # ------------------------------------------------------------ the connection

    async def run(self) -> None:
        """Stay connected (with backoff), reconcile, publish and listen."""
        import coredis

        backoff = 0.1
        while True:
            client = coredis.Redis(
                host=self.host, port=self.port, db=self.db,
                username=self._username, password=self._password,
                decode_responses=True, connect_timeout=2.0, stream_timeout=10.0,
            )  # fmt: skip
            try:
                async with client:
                    await client.ping()
                    handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
                        self.channel: self.apply
                    }
                    for part in self.parts:
                        handlers.update(part.channels)
                    # Subscribed before reading what was missed: nothing falls between.
                    async with client.pubsub(channels=list(handlers)) as pubsub:
                        await self._reconcile(client)
                        for part in self.parts:
                            await part.connected(client)
                        self._up()
                        backoff = 0.1
                        async with anyio.create_task_group() as tasks:
                            tasks.start_soon(self._send, client)
                            tasks.start_soon(self._heartbeat, client)
                            for part in self.parts:
                                tasks.start_soon(part.run, client)
                            await self._listen(pubsub, handlers)
                            tasks.cancel_scope.cancel()
            except BaseException as exc:  # unreachable, restarted, timed out: serve locally
                for part in self.parts:
                    part.disconnected()
                self._down(_ours(exc))
            await anyio.sleep(backoff)
            backoff = min(5.0, backoff * 2)

    async def _reconcile(self, client: Any) -> None:
        """Apply what the other processes recorded while this one was away."""
        stored = await client.hgetall(self.hash)
        for text in stored.values():
            try:
                self.apply(json.loads(text))
            except ValueError:
                self.ignored += 1

    async def _send(self, client: Any) -> None:
        async def send(record: dict[str, Any]) -> None:
            text = json.dumps(record)
            async with client.pipeline(transaction=False) as pipe:
                pipe.hset(self.hash, {record["key"]: text})
                pipe.publish(self.channel, text)
            self.published += 1

        await self.outbox.drain(send)

    async def _heartbeat(self, client: Any) -> None:
        """A PING every ``HEARTBEAT`` s: a subscription does not notice a Redis
        that went away, a PING unanswered in time does."""
        while True:
            await anyio.sleep(HEARTBEAT)
            with anyio.fail_after(HEARTBEAT * 2):
                await client.ping()

    async def _listen(
        self, pubsub: Any, handlers: Mapping[str, Callable[[dict[str, Any]], Any]]
    ) -> None:
        async for message in pubsub:
            if message.get("type") != "message":
                continue
            try:
                record = json.loads(message["data"])
            except (ValueError, TypeError):
                self.ignored += 1
                continue
            handler = handlers.get(message.get("channel"))
            if isinstance(record, dict) and handler is not None:
                handler(record)
        raise ConnectionError("the subscription ended")

    def _up(self) -> None:
        if not self.connected:
            self.connected, self.since = True, self._clock()
            self._log({"event": "shared", "connected": True, "url": self.url})

    def _down(self, exc: BaseException) -> None:
        why = f"{type(exc).__name__}: {str(exc)[:200]}"
        if self.connected or self.since is None:
            self._log(
                {
                    "event": "warning",
                    "message": f"shared state at {self.url} unreachable ({why}); serving on this "
                    "process's own view, reconnecting",
                }
            )
        self.connected, self.since, self.last_error = False, self._clock(), why

    def part(self, name: str) -> Any:
        """The part called ``name`` (None: no such part)."""
        return next((part for part in self.parts if part.name == name), None)

    def status(self) -> dict[str, Any]:
        """For ``/status`` and ``/healthz``."""
        return {
            "url": self.url,
            "origin": self.origin,
            "connected": self.connected,
            "since": self.since,
            "lastError": self.last_error,
            "queued": len(self.outbox),
            "published": self.published,
            "applied": self.applied,
            "ignored": self.ignored,
            "dropped": self.outbox.dropped,
            **{part.name: part.status() for part in self.parts},
        }
