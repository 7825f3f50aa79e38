"""Key selection structures: sublinear picks for every policy.

Each structure holds the keys that may be usable (``KeyRecord.in_sched``) and
drops the ones found unusable when they come up (``drop``); the pool adds them
back when they may be usable again. All ties break on the key's serial, so the
order of picks is a function of the keys' fields alone, and a structure
rebuilt from a snapshot picks exactly like the original.

- ``HeapSelector``: a lazy heap by a per-policy score. ``round_robin`` scores
  by last pick (the least recently picked key goes next), ``least_busy`` by
  in-flight count, ``latency`` by peak EWMA (latency x (in flight + 1)).
- ``WeightedSelector``: smooth weighted round robin as earliest-deadline-first
  over virtual time: key i's j-th turn is released at j/w_i and due at
  (j+1)/w_i; each pick advances virtual time by 1/W. Every prefix of picks
  stays within one of each key's ideal share.
- ``HashRing``: consistent hashing (``affinity``): a session goes to the first
  usable key clockwise from its hash; a key leaving moves only its sessions.
"""

from __future__ import annotations

import bisect
import hashlib
from array import array
from collections import deque
from collections.abc import Callable, Collection, Iterable
from heapq import heapify, heappop, heappush
from typing import Any

from ._records import KeyRecord
from .states import KeyState

Usable = Callable[[KeyRecord], bool]
Drop = Callable[[KeyRecord], None]
_EPSILON = 1e-9
_HEALTHY = KeyState.HEALTHY


class RingSelector:
    """Round robin: a ring of keys; the picked key goes to the back."""

    __slots__ = ("_ring", "size_hint")

    def __init__(self) -> None:
        self._ring: deque[KeyRecord] = deque()
        self.size_hint = 0

    def add(self, key: KeyRecord) -> None:
        """A key (back) in service goes first: it is owed its turn."""
        key.in_sched = True
        self._ring.appendleft(key)

    def requeue(self, key: KeyRecord) -> None:
        """The key just picked goes to the back."""
        key.in_sched = True
        self._ring.append(key)

    def pick(self, usable: Usable, drop: Drop, avoid: Collection[str] | None) -> KeyRecord | None:
        """Take the first usable key not in ``avoid`` out of the ring."""
        ring = self._ring
        i = 0
        while i < len(ring):
            key = ring[i]
            if (key.state is _HEALTHY and key.plain) or usable(key):
                if avoid and key.key_id in avoid:
                    i += 1
                    continue
                del ring[i]
                key.in_sched = False
                return key
            del ring[i]
            key.in_sched = False
            drop(key)
        return None

    def rescore(self, key: KeyRecord) -> None:
        """Round robin has no score."""

    def order(self) -> list[int]:
        """Serials of the keys in the ring, front first (for snapshots)."""
        return [k.serial for k in self._ring if not k.removed]

    def rebuild(self, keys: Iterable[KeyRecord], order: Iterable[int] = ()) -> None:
        """Recreate the ring in ``order`` (serials) from the keys in it."""
        by_serial = {k.serial: k for k in keys if k.in_sched}
        self._ring = deque(by_serial[s] for s in order if s in by_serial)


class HeapSelector:
    """A lazy min-heap of (score, serial, version, key) entries."""

    __slots__ = ("_heap", "_limit", "_score", "_size_hint")

    def __init__(self, score: Callable[[KeyRecord], Any]) -> None:
        self._score = score
        self._heap: list[tuple[Any, int, int, KeyRecord]] = []
        self._size_hint = 0
        self._limit = 16

    @property
    def size_hint(self) -> int:
        """Number of keys in the pool: the heap is compacted past 4x this."""
        return self._size_hint

    @size_hint.setter
    def size_hint(self, value: int) -> None:
        self._size_hint = value
        self._limit = 4 * value + 16

    def add(self, key: KeyRecord) -> None:
        """Put ``key`` (not in the structure) in, or refresh its score."""
        key.ver = ver = key.ver + 1
        key.in_sched = True
        heap = self._heap
        heappush(heap, (self._score(key), key.serial, ver, key))
        if len(heap) > self._limit:
            self._compact()

    requeue = add

    def pick(self, usable: Usable, drop: Drop, avoid: Collection[str] | None) -> KeyRecord | None:
        """Take the best usable key not in ``avoid`` out; the caller re-adds it."""
        heap = self._heap
        aside = None
        found = None
        while heap:
            entry = heap[0]
            key = entry[3]
            if entry[2] != key.ver or not key.in_sched:
                heappop(heap)
            elif not ((key.state is _HEALTHY and key.plain) or usable(key)):
                heappop(heap)
                key.in_sched = False
                drop(key)
            elif avoid and key.key_id in avoid:
                if aside is None:
                    aside = []
                aside.append(heappop(heap))
            else:
                heappop(heap)
                key.in_sched = False
                found = key
                break
        if aside:
            for entry in aside:
                heappush(heap, entry)
        return found

    def rescore(self, key: KeyRecord) -> None:
        """The key's score changed (in flight, latency): re-file it if present."""
        if key.in_sched:
            self.add(key)

    def rebuild(self, keys: Iterable[KeyRecord]) -> None:
        """Recreate the heap from the keys' fields (after a restore)."""
        self._heap = [(self._score(k), k.serial, k.ver, k) for k in keys if k.in_sched]
        heapify(self._heap)

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if e[2] == e[3].ver and e[3].in_sched]
        heapify(self._heap)


class WeightedSelector:
    """Smooth weighted round robin as EDF over virtual time (see module doc)."""

    __slots__ = ("_eligible", "_pending", "_weight", "size_hint", "total_weight", "vtime")

    def __init__(self, weight: Callable[[KeyRecord], float]) -> None:
        self._weight = weight
        self._eligible: list[tuple[float, int, int, KeyRecord]] = []  # by deadline
        self._pending: list[tuple[float, int, int, KeyRecord]] = []  # by release
        self.vtime = 0.0
        self.total_weight = 0.0
        self.size_hint = 0

    def add(self, key: KeyRecord) -> None:
        """Put ``key`` in; a key coming back starts at the present, owed nothing."""
        if key.vr < self.vtime or key.vd <= key.vr:
            key.vr = max(key.vr, self.vtime)
            key.vd = key.vr + 1.0 / self._weight(key)
        self._file(key)

    def _file(self, key: KeyRecord) -> None:
        key.ver += 1
        key.in_sched = True
        if key.vr <= self.vtime + _EPSILON:
            heappush(self._eligible, (key.vd, key.serial, key.ver, key))
        else:
            heappush(self._pending, (key.vr, key.serial, key.ver, key))

    def pick(self, usable: Usable, drop: Drop, avoid: Collection[str] | None) -> KeyRecord | None:
        """Take the usable key with the earliest deadline among released ones."""
        eligible, pending = self._eligible, self._pending
        aside = None
        found = None
        while True:
            while pending and pending[0][0] <= self.vtime + _EPSILON:
                entry = heappop(pending)
                heappush(eligible, (entry[3].vd, entry[1], entry[2], entry[3]))
            if not eligible:
                # Entries of keys re-filed or taken out since are dropped first: a
                # stale release time must not move virtual time (a restored pool,
                # whose heaps hold no stale entries, would then pick differently).
                while pending and (
                    pending[0][2] != pending[0][3].ver or not pending[0][3].in_sched
                ):
                    heappop(pending)
                if not pending:
                    break
                # Work conserving: nothing released yet (keys were out), so
                # jump virtual time to the next release.
                self.vtime = pending[0][0]
                continue
            entry = eligible[0]
            key = entry[3]
            if entry[2] != key.ver or not key.in_sched:
                heappop(eligible)
            elif not ((key.state is _HEALTHY and key.plain) or usable(key)):
                heappop(eligible)
                key.in_sched = False
                drop(key)
            elif avoid and key.key_id in avoid:
                if aside is None:
                    aside = []
                aside.append(heappop(eligible))
            else:
                heappop(eligible)
                key.in_sched = False
                found = key
                break
        if aside:
            for entry in aside:
                heappush(eligible, entry)
        return found

    def picked(self, key: KeyRecord) -> None:
        """Account one turn to ``key`` and re-file it."""
        weight = self._weight(key)
        key.vr = key.vd
        key.vd = key.vr + 1.0 / weight
        self.vtime += 1.0 / self.total_weight  # > 0: every weight is
        self._file(key)

    requeue = picked

    def rescore(self, key: KeyRecord) -> None:
        """Load does not change a weighted key's turn."""

    def reweigh(self, key: KeyRecord, old: float, new: float) -> None:
        """The key's weight changed (credits spent): adjust totals and deadline,
        and re-file the key under its new deadline (a heap entry must hold the
        key's current fields, or a restored pool would pick in another order)."""
        self.total_weight += new - old
        key.vd = key.vr + 1.0 / new
        if key.in_sched:
            self._file(key)

    def rebuild(self, keys: Iterable[KeyRecord]) -> None:
        """Recreate both heaps from the keys' fields."""
        live = {k.serial: k for k in keys if k.in_sched}
        self._eligible, self._pending = [], []
        for serial in sorted(live):
            key = live[serial]
            key.ver -= 1  # _file increments it back
            self._file(key)


def stable_hash(text: str, salt: int) -> int:
    """A 64-bit hash that is the same on every machine and every run."""
    digest = hashlib.blake2b(
        text.encode("utf-8"), digest_size=8, salt=salt.to_bytes(8, "little", signed=True)
    ).digest()
    return int.from_bytes(digest, "little")


class HashRing:
    """Consistent-hash ring with ``vnodes x weight`` points per key (``affinity``)."""

    __slots__ = ("_keys", "_owner", "_points", "_salt", "_vnodes")

    MAX_WALK = 256
    """Points inspected clockwise before giving up (the pool then falls back)."""

    def __init__(self, vnodes: int, salt: int) -> None:
        self._vnodes = vnodes
        self._salt = salt
        self._points = array("Q")
        self._owner = array("Q")
        self._keys: dict[int, KeyRecord] = {}

    def rebuild(self, keys: Iterable[KeyRecord]) -> None:
        """Place every key's points on the ring."""
        pairs: list[tuple[int, int]] = []
        self._keys = {}
        for key in keys:
            self._keys[key.serial] = key
            count = max(1, round(self._vnodes * key.spec.weight))
            pairs.extend(
                (stable_hash(f"{key.key_id}#{i}", self._salt), key.serial) for i in range(count)
            )
        pairs.sort()
        self._points = array("Q", (p for p, _ in pairs))
        self._owner = array("Q", (s for _, s in pairs))

    def home(self, session: str) -> KeyRecord:
        """The session's own key: the owner of the first point clockwise."""
        points = self._points
        i = bisect.bisect_left(points, stable_hash(session, self._salt)) % len(points)
        return self._keys[self._owner[i]]

    def pick(self, session: str, usable: Usable, avoid: Collection[str] | None) -> KeyRecord | None:
        """The first usable key clockwise from the session's hash."""
        points = self._points
        n = len(points)  # > 0: the pool asks only while some key is usable
        i = bisect.bisect_left(points, stable_hash(session, self._salt))
        owner, keys = self._owner, self._keys
        for step in range(min(n, self.MAX_WALK)):
            key = keys[owner[(i + step) % n]]
            if usable(key) and not (avoid and key.key_id in avoid):
                return key
        return None
