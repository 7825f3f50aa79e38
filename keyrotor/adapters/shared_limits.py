"""Limits the pool's processes keep together in Redis (docs/scaling.md).

``SharedLimits`` is the async client's ``Gate`` (``keyrotor.transports``):
before an attempt on a key with an ``rpm``, ``tpm`` or ``max_in_flight``, one
Lua script (one round trip, atomic) paces the key across every process and
counts its requests in flight; a key held elsewhere returns the seconds until
it may be used, and the core (``AttemptHeld``) paces it here that long and
picks another key or waits. ``take_free`` does the same for an account's
free-model day and minute (``keyrotor.models.free_tier``).

Time is Redis's (``TIME``), so the processes' clocks never disagree. A request
in flight is a member of the key's sorted set, scored by when its lease ends:
this process renews its leases every ``lease / 3`` s and removes them when the
requests end; a process that dies (SIGKILL) stops renewing, and its requests
stop counting ``lease`` seconds later. When Redis is away (or slower than
``TIMEOUT``), every process admits on its own view (its core still paces each
key locally) and says so: ``local`` in ``status()``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import anyio

from ..core import KeySpec
from .shared import Outbox

__all__ = ["ADMIT", "TIMEOUT", "SharedLimits"]

TIMEOUT = 0.25
"""Seconds an admission waits for Redis before admitting on the local view."""
BUSY_WAIT = 0.05
"""Seconds a key whose requests in flight are at its limit is held (then asked again)."""

ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if ARGV[6] ~= '' then redis.call('ZREM', KEYS[4], ARGV[6]) end
local wait = 0
local interval = tonumber(ARGV[1])
local rtat = now
if interval > 0 then
  rtat = math.max(tonumber(redis.call('GET', KEYS[1]) or 0), now)
  wait = rtat - now
end
local tcost = tonumber(ARGV[2])
local ttat = now
if tcost >= 0 then
  ttat = math.max(tonumber(redis.call('GET', KEYS[2]) or 0), now)
  wait = math.max(wait, ttat - now - 60)
end
local limit = tonumber(ARGV[3])
local lease = tonumber(ARGV[5])
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= limit then wait = math.max(wait, tonumber(ARGV[7])) end
end
if wait > 0 then return tostring(wait) end
if interval > 0 then
  local next = rtat + interval
  redis.call('SET', KEYS[1], tostring(next), 'PX', math.ceil((next - now) * 1000) + 1000)
end
if tcost >= 0 then
  local next = ttat + tcost
  redis.call('SET', KEYS[2], tostring(next), 'PX', math.ceil((next - now) * 1000) + 1000)
end
if limit > 0 then
  redis.call('ZADD', KEYS[3], now + lease, ARGV[4])
  redis.call('PEXPIRE', KEYS[3], math.ceil(lease * 1000) + 1000)
end
return false
"""
"""KEYS: rpm pace, tpm pace, in-flight set, the request's previous in-flight
set. ARGV: seconds between requests (0: no rpm), this request's seconds of
tpm (-1: no tpm), max in flight (0: none), member, lease, previous member
('': none), busy wait. Returns nil (sent: counted) or the seconds to wait."""

RENEW = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
local ttl = math.ceil(tonumber(ARGV[1]) * 1000) + 1000
for i = 1, #KEYS do
  if redis.call('ZADD', KEYS[i], 'XX', 'CH', until_, ARGV[i + 1]) == 1 then
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return #KEYS
"""
"""KEYS: in-flight sets; ARGV: lease, then one member per set. A set lives as
long as a member renewed in it (the set's expiry, set when a request was
admitted, would otherwise end it under a request that runs longer)."""

FREE_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = tonumber(ARGV[3])
local used = tonumber(redis.call('GET', KEYS[1]) or 0)
if used >= tonumber(ARGV[1]) then return {'day', tostring(used), '0'} end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  return {'minute', tostring(used), tostring(tonumber(oldest[2]) + window - now)}
end
used = redis.call('INCR', KEYS[1])
redis.call('EXPIREAT', KEYS[1], math.floor(tonumber(ARGV[5])) + 3600)
redis.call('ZADD', KEYS[2], now, ARGV[4])
redis.call('EXPIRE', KEYS[2], math.ceil(window) + 1)
return {'ok', tostring(used), '0'}
"""
"""KEYS: the account's day counter, its minute set. ARGV: per day, per
minute, window, member, the day's end (Unix s). Returns [verdict, used
today, seconds until the minute has room]."""

FREE_FIX = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if ARGV[1] == 'back' then
  if tonumber(redis.call('GET', KEYS[1]) or 0) > 0 then redis.call('DECR', KEYS[1]) end
  redis.call('ZREM', KEYS[2], ARGV[2])
elseif ARGV[1] == 'note' then
  redis.call('INCR', KEYS[1])
  redis.call('EXPIREAT', KEYS[1], math.floor(tonumber(ARGV[3])) + 3600)
  redis.call('ZADD', KEYS[2], now, ARGV[2])
  redis.call('EXPIRE', KEYS[2], 120)
elseif ARGV[1] == 'day' then
  local used = tonumber(redis.call('GET', KEYS[1]) or 0)
  if used < tonumber(ARGV[4]) then redis.call('SET', KEYS[1], ARGV[4]) end
  redis.call('EXPIREAT', KEYS[1], math.floor(tonumber(ARGV[3])) + 3600)
else
  for i = 1, tonumber(ARGV[4]) do redis.call('ZADD', KEYS[2], now, ARGV[2] .. ':' .. i) end
  redis.call('EXPIRE', KEYS[2], 120)
end
return 1
"""
"""Background corrections of an account's free counts. ARGV[1]: ``back`` (give
back member ARGV[2]), ``note`` (count member ARGV[2], sent without ``take``),
``day`` (the day is full: ARGV[4] = per day), ``minute`` (the minute is full:
ARGV[4] members named after ARGV[2]). ARGV[3]: the day's end (Unix s)."""


class SharedLimits:
    """Per-key pacing and in-flight counts, and per-account free-tier counts,
    kept in Redis for every process (see the module's docstring)."""

    name = "limits"
    channels: Mapping[str, Callable[[dict[str, Any]], None]] = MappingProxyType({})

    def __init__(
        self,
        specs: Mapping[str, KeySpec],
        *,
        origin: str,
        namespace: str = "keyrotor",
        lease: float = 10.0,
    ) -> None:
        self._specs = dict(specs)
        self.limited: set[str] = {a for a, s in self._specs.items() if _limits(s)}
        self._origin = origin
        self._ns = namespace
        self.lease = lease
        self._client: Any = None
        self._admit: Any = None
        self._renew: Any = None
        self._free_take: Any = None
        self._free_fix: Any = None
        self._held: dict[str, tuple[str, str]] = {}  # request -> (in-flight set, member)
        self._fixes: Outbox[tuple[str, list[str], list[Any]]] = Outbox()
        self._serial = itertools.count(1)
        # account -> this process's members, each with when it was taken
        self._free_mine: dict[str, list[tuple[float | None, str]]] = {}
        self.admitted = self.waits = self.local = self.round_trips = 0

    # ----------------------------------------------------------- keys

    def key_added(self, spec: KeySpec) -> None:
        """A key added at runtime: limited if its spec says so."""
        self._specs[spec.key_id] = spec
        if _limits(spec):
            self.limited.add(spec.key_id)

    async def admit(self, request_id: str, key_id: str, tokens: int) -> float | None:
        """The ``Gate``: None (send, counted in Redis) or seconds to hold ``key_id``."""
        script = self._admit
        if script is None:
            self.local += 1
            return None
        spec = self._specs.get(key_id)
        if spec is None:
            return None
        ns = self._ns
        interval = 60.0 / spec.rpm if spec.rpm else 0.0
        cost = tokens * 60.0 / spec.tpm if spec.tpm else -1.0
        limit = spec.max_in_flight or 0
        key_set = f"{ns}:inflight:{key_id}"
        member = f"{self._origin}:{request_id}"
        previous = self._held.pop(request_id, None)  # an earlier attempt of this request
        prev_set, prev_member = previous if previous is not None else (key_set, "")
        self.round_trips += 1
        try:
            with anyio.fail_after(TIMEOUT):
                answer = await script(
                    keys=[f"{ns}:rpm:{key_id}", f"{ns}:tpm:{key_id}", key_set, prev_set],
                    args=[interval, cost, limit, member, self.lease, prev_member, BUSY_WAIT],
                )
        except Exception:  # slow or gone: the local view decides (the connection notices)
            self.local += 1
            return None
        if answer is None:
            self.admitted += 1
            if limit:
                self._held[request_id] = (key_set, member)
            return None
        self.waits += 1
        wait = float(answer)
        return wait if math.isfinite(wait) and wait > 0 else BUSY_WAIT

    def release(self, request_id: str) -> None:
        """The request ended: its in-flight member goes (in the background)."""
        held = self._held.pop(request_id, None)
        if held is not None:
            self._fix("zrem", [held[0]], [held[1]])

    # ----------------------------------------------------------- free tier

    async def take_free(
        self,
        account: str,
        per_day: int,
        per_minute: int,
        window: float,
        day_end: float,
        at: float | None = None,
    ) -> tuple[str, int, float] | None:
        """Count one free request on ``account`` across the pool (the slot
        taken here at ``at``): (``ok``, ``day`` or ``minute``; used today;
        seconds until the minute has room), or None when Redis cannot say
        (decide locally)."""
        script = self._free_take
        if script is None:
            return None
        member = f"{self._origin}:f{next(self._serial)}"
        keys = self._free_keys(account, day_end)
        self.round_trips += 1
        try:
            with anyio.fail_after(TIMEOUT):
                verdict, used, wait = await script(
                    keys=keys, args=[per_day, per_minute, window, member, day_end]
                )
        except Exception:
            return None
        if verdict == "ok":
            mine = self._free_mine.setdefault(account, [])
            mine.append((at, member))
            del mine[:-100]
        return str(verdict), int(used), float(wait)

    def give_back_free(self, account: str, day_end: float, at: float | None = None) -> None:
        """A slot ``take_free`` counted (at ``at``; default: the latest) whose
        request never reached the upstream."""
        mine = self._free_mine.get(account)
        if not mine:
            return
        found = [i for i, (taken, _) in enumerate(mine) if taken == at] if at is not None else []
        _, member = mine.pop(found[-1] if found else -1)
        self._fix("free", self._free_keys(account, day_end), ["back", member, day_end, 0])

    def note_free(self, account: str, day_end: float) -> None:
        """A free request sent on ``account`` without ``take_free``."""
        member = f"{self._origin}:f{next(self._serial)}"
        self._fix("free", self._free_keys(account, day_end), ["note", member, day_end, 0])

    def free_limit_met(self, account: str, day_end: float, daily: bool, amount: int) -> None:
        """The upstream said the account's day (``amount`` = per day) or minute
        (``amount`` = per minute) is full: every process hears it."""
        member = f"{self._origin}:m{next(self._serial)}"
        how = "day" if daily else "minute"
        self._fix("free", self._free_keys(account, day_end), [how, member, day_end, amount])

    def _free_keys(self, account: str, day_end: float) -> list[str]:
        day = int(day_end // 86400) - 1
        return [f"{self._ns}:free:{account}:{day}", f"{self._ns}:free:{account}:minute"]

    # ----------------------------------------------------------- connection

    async def connected(self, client: Any) -> None:
        self._admit = client.register_script(ADMIT)
        self._renew = client.register_script(RENEW)
        self._free_take = client.register_script(FREE_TAKE)
        self._free_fix = client.register_script(FREE_FIX)
        self._client = client

    def disconnected(self) -> None:
        """Redis went away: admit locally; leases lapse on their own."""
        self._client = self._admit = self._renew = self._free_take = self._free_fix = None
        self._held.clear()

    async def run(self, client: Any) -> None:
        """Renew this process's leases and send the queued corrections."""
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._renewing)
            await self._sending(client)

    async def _renewing(self) -> None:
        while True:
            await anyio.sleep(self.lease / 3)
            held = list(self._held.values())
            if held and self._renew is not None:
                await self._renew(
                    keys=[s for s, _ in held], args=[self.lease, *(m for _, m in held)]
                )

    async def _sending(self, client: Any) -> None:
        async def send(fix: tuple[str, list[str], list[Any]]) -> None:
            kind, keys, args = fix
            if kind == "zrem":
                await client.zrem(keys[0], args)
            else:
                await self._free_fix(keys=keys, args=args)

        await self._fixes.drain(send)

    def _fix(self, kind: str, keys: list[str], args: list[Any]) -> None:
        if self._client is not None:  # Redis away: in-flight leases lapse, free counts stay local
            self._fixes.put((kind, keys, args))

    def status(self) -> dict[str, Any]:
        return {
            "limitedKeys": len(self.limited),
            "admitted": self.admitted,
            "held": self.waits,
            "local": self.local,
            "inFlight": len(self._held),
            "roundTrips": self.round_trips,
            "lease": self.lease,
        }


def _limits(spec: KeySpec) -> bool:
    return spec.rpm is not None or spec.tpm is not None or spec.max_in_flight is not None
