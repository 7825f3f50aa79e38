"""Snapshots: the whole pool as JSON-able data, and a pool rebuilt from it."""

from __future__ import annotations

import math
from heapq import heappush
from typing import Any, Self

from ._fields import PoolFields
from ._records import (
    QUEUED,
    KeyRecord,
    RequestRecord,
)
from ._records import (
    T_COOLDOWN as _T_COOLDOWN,
)
from ._records import (
    T_PACE as _T_PACE,
)
from ._records import (
    T_PROBE as _T_PROBE,
)
from ._select import RingSelector
from .config import PoolConfig
from .errors import PoolError
from .states import (
    COOLING_STATES,
)

SNAPSHOT_VERSION = 1

_COOLING = COOLING_STATES


class Snapshots(PoolFields):
    """The part of ``Pool`` that saves and restores it."""

    def snapshot(self) -> dict[str, Any]:
        """The whole state as JSON-able data; ``Pool.restore`` continues from it.

        Holds key ids, never secrets.
        """
        keys = [*self._order, *self._dying.values()]
        return {
            "version": SNAPSHOT_VERSION,
            "config": self._config.to_json(),
            "now": None if self._now == -math.inf else self._now,
            "order": [k.key_id for k in self._order],
            "keys": [k.to_json() for k in keys],
            "requests": [r.to_json() for r in self._requests.values()],
            "queue": [r.request_id for r in self._queue if r.state == QUEUED],
            "counters": {
                "key_serial": self._key_serial,
                "request_serial": self._request_serial,
                "pick_seq": self._pick_seq,
                "started": self._started,
                "delivered": self._delivered,
                "rejected": self._rejected,
                "cancelled": self._cancelled,
                "spent": self._spent,
            },
            "vtime": self._weighted.vtime if self._weighted else 0.0,
            "ring": self._select.order() if isinstance(self._select, RingSelector) else [],
            "rng": list(self._rng.getstate()[1]),
            "wake": self._wake,
            "last_short_scan": self._last_short_scan,
            "last_answer": None if self._last_answer == -math.inf else self._last_answer,
            "answer_serial": self._answer_serial,
            "other_answer": None if self._other_answer == -math.inf else self._other_answer,
            "orphan_probes": sorted(self._orphan_probes),
        }

    @classmethod
    def restore(cls, snapshot: dict[str, Any]) -> Self:
        """Rebuild a pool from ``snapshot()``: it continues exactly like the original."""
        version = snapshot.get("version") if isinstance(snapshot, dict) else None
        if version != SNAPSHOT_VERSION:
            raise PoolError(
                "not a keyrotor snapshot of a version this code reads",
                state=f"version {version!r}",
                fix=f"pass the dict returned by Pool.snapshot() (version {SNAPSHOT_VERSION})",
            )
        try:
            return cls._restore(snapshot)
        except (KeyError, TypeError, ValueError) as exc:
            raise PoolError(f"corrupt snapshot: {exc!r}") from None

    @classmethod
    def _restore(cls, data: dict[str, Any]) -> Self:
        pool = cls(PoolConfig.from_json(data["config"]))
        pool._now = -math.inf if data["now"] is None else data["now"]
        pool._keys.clear()
        pool._order.clear()
        pool._by_serial.clear()
        pool._accounts.clear()
        pool._available = 0
        records = [KeyRecord.from_json(k) for k in data["keys"]]
        by_id = {k.key_id: k for k in records}
        for key_id in data["order"]:
            pool._index_key(by_id[key_id])
        for key in records:
            pool._by_serial[key.serial] = key
            if key.removed:
                pool._dying[key.key_id] = key
        counters = data["counters"]
        pool._key_serial = counters["key_serial"]
        pool._request_serial = counters["request_serial"]
        pool._pick_seq = counters["pick_seq"]
        pool._started = counters["started"]
        pool._delivered = counters["delivered"]
        pool._rejected = counters["rejected"]
        pool._cancelled = counters["cancelled"]
        # A snapshot from before the pool's own total: its keys' spend.
        pool._spent = counters.get("spent", sum(k.spend for k in records))
        pool._rng.setstate((3, tuple(data["rng"]), None))
        pool._orphan_probes = set(data["orphan_probes"])
        pool._wake = data["wake"]
        pool._last_short_scan = data["last_short_scan"]
        last_answer = data.get("last_answer")
        pool._last_answer = -math.inf if last_answer is None else last_answer
        # A snapshot from before these fields: the last answer counts as another key's.
        pool._answer_serial = data.get("answer_serial", 0)
        other_answer = data.get("other_answer")
        pool._other_answer = -math.inf if other_answer is None else other_answer
        pool._timers = []
        for item in data["requests"]:
            req = RequestRecord.from_json(item)
            if item["key"] is not None:
                req.key = pool._keys.get(item["key"]) or pool._dying[item["key"]]
                group = req.event.group
                if group is not None:
                    members = pool._groups.setdefault(group, {})
                    members[req.key.key_id] = members.get(req.key.key_id, 0) + 1
            pool._requests[req.request_id] = req
        for request_id in data["queue"]:
            req = pool._requests[request_id]
            pool._queue.append(req)
            pool._queued += 1
            pool._push_request_timers(req)
        for key in records:
            if key.until is not None and key.state in _COOLING:
                heappush(pool._timers, (key.until, _T_COOLDOWN, key.serial, ""))
            if key.pace_timer is not None:
                heappush(pool._timers, (key.pace_timer, _T_PACE, key.serial, ""))
            if key.probe_due is not None:
                heappush(pool._timers, (key.probe_due, _T_PROBE, key.serial, ""))
        live = [k for k in records if not k.removed]
        select = pool._select
        select.size_hint = len(live)
        if isinstance(select, RingSelector):
            select.rebuild(live, data["ring"])
        else:
            select.rebuild(live)
        if pool._weighted is not None:
            pool._weighted.vtime = data["vtime"]
            pool._weighted.total_weight = sum(pool._weight(k) for k in live)
        if pool._ring is not None:
            pool._ring.rebuild(pool._order)
        return pool
