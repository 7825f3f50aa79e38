"""The pool's fields, declared once for the parts of ``Pool`` that live in other
modules (``_choose``, ``_queue``, ``_health``, ``_snapshot``). ``Pool.__init__``
sets every one of them; nothing here runs."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._records import KeyRecord, RequestRecord
    from ._select import HashRing, HeapSelector, RingSelector, WeightedSelector
    from .classify import Classification
    from .config import KeySpec, PoolConfig
    from .decisions import Decision
    from .states import Signal

__all__ = ["PoolFields"]


class PoolFields:
    """Declarations only: the state of one pool (see ``Pool.__init__``)."""

    _config: PoolConfig
    _now: float
    _keys: dict[str, KeyRecord]
    _order: list[KeyRecord]
    _by_serial: dict[int, KeyRecord]
    _accounts: dict[str, list[KeyRecord]]
    _requests: dict[str, RequestRecord]
    _queue: deque[RequestRecord]
    _queued: int
    _groups: dict[str, dict[str, int]]
    _timers: list[tuple[float, int, int, str]]
    _key_serial: int
    _request_serial: int
    _pick_seq: int
    _available: int
    _wake: bool
    _rng: random.Random
    _started: int
    _delivered: int
    _rejected: int
    _cancelled: int
    _spent: float
    _orphan_probes: set[str]
    _last_answer: float
    _answer_serial: int
    _other_answer: float
    _hopeless_check: bool
    _sessions: HashRing | None
    _dying: dict[str, KeyRecord]
    _weighted: WeightedSelector | None
    _ring: HashRing | None
    _select: RingSelector | HeapSelector | WeightedSelector
    _latency: bool
    _rescore_on_load: bool
    _explore: float
    _last_short_scan: float | None
    _usable_fn: Callable[[KeyRecord], bool]
    _drop_fn: Callable[[KeyRecord], None]
    _plain_pick_needs_request: bool
    _queue_timeout: float
    _max_attempts: int
    _handlers: dict[type, Callable[[Any], list[Decision]]]

    if TYPE_CHECKING:  # methods one part calls on another

        def __init__(self, config: PoolConfig) -> None: ...

        def _add_key(self, spec: KeySpec) -> None: ...
        def _index_key(self, key: KeyRecord) -> None: ...
        def _weight(self, key: KeyRecord) -> float: ...
        def _usable(self, key: KeyRecord) -> bool: ...
        def _refresh(self, key: KeyRecord) -> None: ...
        def _pick(self, req: RequestRecord) -> KeyRecord | None: ...
        def _held_off(self, req: RequestRecord) -> frozenset[str] | None: ...
        def _push_request_timers(self, req: RequestRecord) -> None: ...
        def _assign(self, req: RequestRecord, key: KeyRecord, out: list[Decision]) -> None: ...
        def _release(self, req: RequestRecord) -> None: ...
        def _forget(self, req: RequestRecord) -> None: ...
        def _enqueue(self, req: RequestRecord, out: list[Decision]) -> None: ...
        def _drain(self, out: list[Decision]) -> None: ...
        def _earliest(
            self,
            now: float,
            holds: dict[str, float] | None = None,
            keys: Iterable[KeyRecord] | None = None,
        ) -> float | None: ...
        def _earliest_for(self, req: RequestRecord, now: float) -> float | None: ...
        def _pinned(self, pin: str | int) -> KeyRecord | None: ...
        def _reject(
            self, req: RequestRecord, earliest: float | None, why: str, out: list[Decision]
        ) -> None: ...
        def _transition(
            self,
            key: KeyRecord,
            signal: Signal,
            now: float,
            until: float | None,
            reason: str,
            out: list[Decision],
            hard: bool = False,
            force_until: bool = False,
        ) -> None: ...
        def _probe(self, key: KeyRecord, now: float, reason: str, out: list[Decision]) -> None: ...
        def _probe_wanted(self, key: KeyRecord, now: float) -> bool: ...
        def _schedule_probe(self, key: KeyRecord, now: float) -> None: ...
        def _judge(
            self,
            key: KeyRecord,
            verdict: Classification,
            req: RequestRecord | None,
            out: list[Decision],
        ) -> None: ...
        def _pick_policy(
            self, req: RequestRecord, avoid: Collection[str] | None
        ) -> KeyRecord | None: ...
