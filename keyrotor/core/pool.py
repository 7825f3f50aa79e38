"""The pool: a deterministic state machine from events to decisions.

``Pool.handle(event)`` checks the event against the pool's state (raising
``PoolError`` and changing nothing if it does not fit), advances the clock to
``event.now``, fires the timers that are due (cooldowns ending, pacing slots,
probes due, queued requests' deadlines), applies the event and returns the
decisions. Key health moves only through ``states.TRANSITIONS``.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Collection
from heapq import heappop, heappush
from typing import Any

from ._records import (
    DELIVERED,
    ERROR_INDEX,
    QUEUED,
    SENT,
    KeyRecord,
    RequestRecord,
)
from ._select import HashRing, HeapSelector, RingSelector, WeightedSelector
from .classify import Classification, Verdict, classify_probe, classify_response
from .config import KeySpec, PoolConfig
from .decisions import (
    Decision,
    KeyStateChanged,
    Probe,
    Reject,
    Send,
    make_deliver,
)
from .errors import PoolError
from .events import (
    Event,
    KeyAdded,
    KeyMarked,
    KeyRemoved,
    ProbeFinished,
    ProbeRequested,
    RequestCancelled,
    RequestStarted,
    ResponseFinished,
    ResponseReceived,
    SpendRecorded,
    Tick,
    TransportFailed,
)
from .policy import FAILURES, REASON_DEFAULTS, VERDICTS, Cooldown, failure_rule
from .states import (
    COOLING_STATES,
    PROBED_WHEN_SHORT,
    RECHECKED_STATES,
    USABLE_STATES,
    KeyState,
    Signal,
    next_state,
)
from .statistics import KeyStatistics, PoolStatistics

__all__ = ["SNAPSHOT_VERSION", "Pool"]

_new = object.__new__
_send_request_id = Send.__dict__["request_id"].__set__
_send_key_id = Send.__dict__["key_id"].__set__
_send_attempt = Send.__dict__["attempt"].__set__

SNAPSHOT_VERSION = 1

_INF = math.inf
_HEALTHY = KeyState.HEALTHY
_RECOVERING = KeyState.RECOVERING
_RATE_LIMITED = KeyState.RATE_LIMITED
_COOLING = COOLING_STATES
_PROBE_WHEN_SHORT = PROBED_WHEN_SHORT
_RECHECKED = RECHECKED_STATES
NOT_THE_KEYS_FAULT = frozenset(reason for reason, rule in FAILURES.items() if not rule.blamed)
"""``TransportFailed`` reasons that fail the attempt over without blaming its key
(``policy.FAILURES``)."""

# Timer kinds, in the order they fire at one instant.
_T_COOLDOWN, _T_PACE, _T_PROBE, _T_DEADLINE = 0, 1, 2, 3

# Verdicts after which the attempt is retried on another key.
_RETRY = frozenset(verdict for verdict, rule in VERDICTS.items() if rule.fails_over)
_MARK_SIGNALS = {
    KeyState.HEALTHY: Signal.MARK_HEALTHY,
    KeyState.DISABLED: Signal.MARK_DISABLED,
    KeyState.RATE_LIMITED: Signal.MARK_RATE_LIMITED,
    KeyState.DEGRADED: Signal.MARK_DEGRADED,
    KeyState.DEPLETED: Signal.MARK_DEPLETED,
    KeyState.FAILED: Signal.MARK_FAILED,
}


class Pool:
    """A pool of keys: feed it events, act on the decisions it returns.

    >>> from keyrotor.core import Pool, PoolConfig, KeySpec, RequestStarted
    >>> pool = Pool(PoolConfig(keys=[KeySpec(key_id="a"), KeySpec(key_id="b")]))
    >>> pool.handle(RequestStarted(request_id="r1", now=0.0))
    [Send(request_id='r1', key_id='a', attempt=1)]
    """

    def __init__(self, config: PoolConfig) -> None:
        if not isinstance(config, PoolConfig):
            raise PoolError(
                f"Pool needs a PoolConfig, got {type(config).__name__}",
                fix="build one with PoolConfig(keys=[KeySpec(key_id=...)])",
            )
        self._config = config
        self._now = -math.inf
        self._keys: dict[str, KeyRecord] = {}
        self._order: list[KeyRecord] = []  # configured order, for pinning by index
        self._by_serial: dict[int, KeyRecord] = {}
        self._accounts: dict[str, list[KeyRecord]] = {}
        self._requests: dict[str, RequestRecord] = {}
        self._queue: deque[RequestRecord] = deque()
        self._queued = 0
        self._groups: dict[str, dict[str, int]] = {}
        # (when, kind, serial, request_id): serial orders ties canonically; the
        # request id ("" for key timers) finds a deadline's request.
        self._timers: list[tuple[float, int, int, str]] = []
        self._key_serial = 0
        self._request_serial = 0
        self._pick_seq = 0
        self._available = 0  # keys in a usable state (not counting load or pacing)
        self._wake = False  # a key may have become usable: serve the queue
        self._rng = random.Random(config.seed)
        self._started = self._delivered = self._rejected = self._cancelled = 0
        self._orphan_probes: set[str] = set()
        self._last_answer = -math.inf  # when any key last answered (a hanging key's evidence)
        self._hopeless_check = False  # a key stopped being able to come back: recheck the queue
        self._sessions: HashRing | None = None  # session -> home key, for non-affinity policies
        self._dying: dict[str, KeyRecord] = {}  # removed, draining in-flight requests
        policy = config.policy
        self._weighted: WeightedSelector | None = None
        self._ring: HashRing | None = None
        if policy == "weighted":
            self._weighted = WeightedSelector(self._weight)
        elif policy == "affinity":
            self._ring = HashRing(config.affinity_vnodes, config.seed)
        self._select: RingSelector | HeapSelector | WeightedSelector
        if policy == "least_busy":
            self._select = HeapSelector(_score_least_busy)
        elif policy == "latency":
            self._select = HeapSelector(_score_latency)
        else:
            self._select = self._weighted or RingSelector()
        self._latency = policy == "latency"
        self._rescore_on_load = policy in ("least_busy", "latency")
        self._explore = config.latency_explore if self._latency else 0.0
        self._last_short_scan: float | None = None
        self._usable_fn = self._usable
        self._drop_fn = self._drop
        self._plain_pick_needs_request = self._ring is not None or self._explore > 0
        self._queue_timeout = config.queue_timeout
        self._max_attempts = config.max_attempts
        for spec in config.keys:
            self._add_key(spec)
        if isinstance(self._select, RingSelector):  # first turn in configured order
            self._select.rebuild(self._order, [k.serial for k in self._order])
        if self._ring is not None:
            self._ring.rebuild(self._order)
        self._handlers: dict[type, Callable[[Any], list[Decision]]] = {
            RequestStarted: self._on_started,
            ResponseReceived: self._on_response,
            ResponseFinished: self._on_finished,
            TransportFailed: self._on_transport_failed,
            RequestCancelled: self._on_cancelled,
            Tick: self._on_tick,
            ProbeFinished: self._on_probe_finished,
            ProbeRequested: self._on_probe_requested,
            KeyAdded: self._on_key_added,
            KeyRemoved: self._on_key_removed,
            KeyMarked: self._on_key_marked,
            SpendRecorded: self._on_spend_recorded,
        }

    # ------------------------------------------------------------------ API

    @property
    def config(self) -> PoolConfig:
        """The configuration the pool was built with (keys added later excluded)."""
        return self._config

    @property
    def now(self) -> float:
        """The time of the last event handled (``-inf`` before the first)."""
        return self._now

    def handle(self, event: Event) -> list[Decision]:
        """Apply one event; return the decisions it leads to, in order.

        Raises ``PoolError`` (leaving the pool unchanged) when the event does
        not fit the pool's state: unknown or duplicate request ids, time going
        backwards, a response for a request that holds no key, and so on.
        """
        try:
            handler = self._handlers[type(event)]
        except KeyError:
            raise PoolError(
                f"not an event: {type(event).__name__}",
                event=event,
                fix="pass one of the event classes from keyrotor.core",
            ) from None
        return handler(event)

    def next_deadline(self) -> float | None:
        """When the driver should feed ``Tick`` next, or ``None`` for never."""
        timers = self._timers
        while timers and not self._timer_valid(timers[0]):
            heappop(timers)
        return timers[0][0] if timers else None

    def key_ids(self) -> list[str]:
        """Ids of the keys in the pool, in configured order (removed ones excluded)."""
        return [k.key_id for k in self._order]

    def state_of(self, key_id: str) -> KeyState:
        """The current state of a key."""
        return self._key(key_id, None).state

    def statistics(self) -> PoolStatistics:
        """A frozen picture of the pool: per key and in total (JSON via ``to_json``)."""
        keys = tuple(KeyStatistics.from_record(k) for k in [*self._order, *self._dying.values()])
        in_flight = sum(k.in_flight for k in keys)
        return PoolStatistics(
            now=self._now,
            keys=keys,
            queued=self._queued,
            in_flight=in_flight,
            started=self._started,
            delivered=self._delivered,
            rejected=self._rejected,
            cancelled=self._cancelled,
        )

    # ------------------------------------------------------------ snapshot

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
            },
            "vtime": self._weighted.vtime if self._weighted else 0.0,
            "ring": self._select.order() if isinstance(self._select, RingSelector) else [],
            "rng": list(self._rng.getstate()[1]),
            "wake": self._wake,
            "last_short_scan": self._last_short_scan,
            "last_answer": None if self._last_answer == -math.inf else self._last_answer,
            "orphan_probes": sorted(self._orphan_probes),
        }

    @classmethod
    def restore(cls, snapshot: dict[str, Any]) -> Pool:
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
    def _restore(cls, data: dict[str, Any]) -> Pool:
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
        pool._rng.setstate((3, tuple(data["rng"]), None))
        pool._orphan_probes = set(data["orphan_probes"])
        pool._wake = data["wake"]
        pool._last_short_scan = data["last_short_scan"]
        last_answer = data.get("last_answer")
        pool._last_answer = -math.inf if last_answer is None else last_answer
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
            heappush(pool._timers, (req.deadline, _T_DEADLINE, req.serial, req.request_id))
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

    # -------------------------------------------------------------- checks

    def _advance(self, event: Event, out: list[Decision]) -> None:
        """Move the clock to ``event.now`` and fire due timers. Call after checks."""
        now = event.now
        self._now = now
        if self._timers and self._timers[0][0] <= now:
            self._run_timers(now, out)

    def _check_time(self, event: Event) -> None:
        now = event.now
        if not (now >= self._now) or now == math.inf:
            raise PoolError(
                "time went backwards" if now < self._now else f"invalid time {now!r}",
                event=event,
                state=f"the pool's clock is at {self._now!r}",
                fix="feed events in order, with now from one monotonic clock",
            )

    def _request(self, event: Any, *states: int) -> RequestRecord:
        self._check_time(event)
        req = self._requests.get(event.request_id)
        if req is None:
            raise PoolError(
                f"unknown request_id {event.request_id!r}",
                event=event,
                state="the pool holds no such request (never started, or already ended)",
                fix="send RequestStarted first, and no event after a request has ended",
            )
        if req.state not in states:
            raise PoolError(
                f"{type(event).__name__} does not fit the request's state",
                event=event,
                state=req.describe(),
                fix="feed ResponseReceived/TransportFailed after Send, "
                "ResponseFinished after Deliver",
            )
        return req

    def _key(self, key_id: str, event: Any) -> KeyRecord:
        key = self._keys.get(key_id)
        if key is None:
            raise PoolError(
                f"unknown key_id {key_id!r}",
                event=event,
                state=f"keys: {', '.join(self._keys) or 'none'}",
                fix="use the id of a key in the pool",
            )
        return key

    # -------------------------------------------------------------- events

    def _on_started(self, event: RequestStarted) -> list[Decision]:
        now = event.now
        if not (self._now <= now < _INF):
            self._check_time(event)
        request_id = event.request_id
        requests = self._requests
        if request_id in requests:
            raise PoolError(
                f"duplicate request_id {request_id!r}",
                event=event,
                state=requests[request_id].describe(),
                fix="give every request in flight its own id",
            )
        out: list[Decision] = []
        self._now = now
        if self._timers and self._timers[0][0] <= now:
            self._run_timers(now, out)
        req = RequestRecord(event)
        requests[request_id] = req
        self._started += 1
        if event.pin is not None and not event.pin_fallback and self._pinned(event.pin) is None:
            self._forget(req)
            out.append(
                Reject(
                    request_id=request_id,
                    status=400,
                    retry_after=None,
                    reason=f"the pinned key {event.pin!r} is not in the pool",
                )
            )
            self._rejected += 1
            return out
        if self._queued:
            self._enqueue(req, out)  # FIFO: do not overtake waiting requests
            self._drain(out)
            return out
        key = self._pick(req)
        if key is not None:
            self._assign(req, key, out)
        else:
            self._enqueue(req, out)
        self._settle(out)
        return out

    def _on_response(self, event: ResponseReceived) -> list[Decision]:
        req = self._requests.get(event.request_id)
        now = event.now
        if req is None or req.state != SENT or not (self._now <= now < _INF):
            req = self._request(event, SENT)
        out: list[Decision] = []
        self._now = now
        if self._timers and self._timers[0][0] <= now:
            self._run_timers(now, out)
        key = req.key
        assert key is not None
        self._last_answer = now
        if key.timeouts:
            key.timeouts = 0  # it answers: not hanging
        status = event.status
        if 200 <= status < 300 and event.headers is None and event.retry_after is None:
            if key.state is _HEALTHY and not self._latency:  # the common case, inline
                req.state = DELIVERED
                key.successes += 1
                window = key.window
                if now >= window.end:
                    window.roll(now, self._config.error_window)
                window.cur_req += 1
            else:
                self._succeeded(req, key, out)
            out.append(make_deliver(req.request_id, key.key_id, req.attempt, status))
            self._delivered += 1
            if self._wake:
                self._drain(out)
            return out
        verdict = classify_response(status, event.headers, event.body, wall_time=event.wall_time)
        if event.retry_after is not None and (
            verdict.cooldown is None or event.retry_after > verdict.cooldown
        ):
            verdict = _with_cooldown(verdict, event.retry_after)
        self._judge(key, verdict, req, out)
        if verdict.verdict in _RETRY and req.attempt < self._max_attempts:
            self._fail_over(req, key, out)
        else:
            req.state = DELIVERED
            out.append(make_deliver(req.request_id, key.key_id, req.attempt, status))
            self._delivered += 1
        self._settle(out)
        return out

    def _on_finished(self, event: ResponseFinished) -> list[Decision]:
        req = self._requests.get(event.request_id)
        now = event.now
        if req is None or req.state != DELIVERED or not (self._now <= now < _INF):
            req = self._request(event, DELIVERED)
        out: list[Decision] = []
        self._now = now
        if self._timers and self._timers[0][0] <= now:
            self._run_timers(now, out)
        key = req.key
        assert key is not None
        key.prompt_tokens += event.prompt_tokens
        key.completion_tokens += event.completion_tokens
        tpm = None if key.plain else key.spec.tpm
        if tpm is not None:  # correct the estimate before the key is released
            prompt, completion = event.prompt_tokens, event.completion_tokens
            estimate = req.event.tokens
            if prompt + completion != estimate:
                base = key.tok_at if key.tok_at is not None and key.tok_at > now else now
                key.tok_at = max(now, base + (prompt + completion - estimate) * 60.0 / tpm)
        self._release(req)
        req.state = -1
        del self._requests[req.request_id]
        cost = event.cost
        if cost:
            self._spend(key, cost, now, out)
        if event.error_status is not None:
            verdict = classify_response(event.error_status, None, event.error_body)
            self._judge(key, verdict, None, out)
        self._settle(out)
        return out

    def _on_transport_failed(self, event: TransportFailed) -> list[Decision]:
        req = self._request(event, SENT, DELIVERED)
        out: list[Decision] = []
        self._advance(event, out)
        key = req.key
        assert key is not None
        reason = event.reason
        failure = failure_rule(reason)
        if failure.blamed:
            key.errors[ERROR_INDEX["transport"]] += 1
            self._fault(key, event.now, f"transport_{reason}", out)
            if failure.strike and req.state == SENT:
                self._timed_out(key, req, out)
        if req.state == SENT and req.attempt < self._max_attempts:
            self._fail_over(req, key, out)
        elif req.state == SENT:
            # Out of attempts, and no response to deliver: say so honestly.
            self._release(req)
            self._forget(req)
            out.append(
                Reject(
                    request_id=req.request_id,
                    status=502,
                    retry_after=None,
                    reason=f"upstream failed on every attempt ({event.reason})",
                )
            )
            self._rejected += 1
        else:
            # The body broke off after delivery: nothing to retry.
            self._release(req)
            self._forget(req)
        self._settle(out)
        return out

    def _on_cancelled(self, event: RequestCancelled) -> list[Decision]:
        req = self._request(event, QUEUED, SENT, DELIVERED)
        out: list[Decision] = []
        self._advance(event, out)
        if self._requests.get(req.request_id) is not req:
            return out  # its deadline passed at this same instant: already rejected
        if req.state == QUEUED:
            self._queued -= 1
        else:
            self._release(req)
        self._forget(req)
        self._cancelled += 1
        self._settle(out)
        return out

    def _on_tick(self, event: Tick) -> list[Decision]:
        self._check_time(event)
        out: list[Decision] = []
        self._advance(event, out)
        self._settle(out)
        return out

    def _on_probe_finished(self, event: ProbeFinished) -> list[Decision]:
        self._check_time(event)
        key = self._keys.get(event.key_id)
        if key is None and event.key_id in self._orphan_probes:
            out: list[Decision] = []
            self._advance(event, out)
            self._orphan_probes.discard(event.key_id)
            return out
        key = self._key(event.key_id, event)
        if not key.probing:
            raise PoolError(
                f"no probe of key {event.key_id!r} is running",
                event=event,
                state=f"key {event.key_id!r} is {key.state.value}",
                fix="send ProbeFinished once per Probe decision",
            )
        out = []
        self._advance(event, out)
        now = event.now
        key.probing = False
        self._hopeless_check = True
        if event.status is not None:
            verdict = classify_probe(
                event.status, event.headers, event.body, wall_time=event.wall_time
            )
            kind = verdict.verdict
            if kind is Verdict.SUCCESS:
                if not (key.hard_until and key.until is not None and key.until > now):
                    self._transition(key, Signal.PROBE_OK, now, None, "probe_ok", out)
                if verdict.cooldown:
                    self._transition(
                        key,
                        Signal.RATE_LIMITED,
                        now,
                        now + verdict.cooldown,
                        "probe",
                        out,
                        hard=True,
                    )
            elif VERDICTS[kind].from_probe:
                self._judge(key, verdict, None, out)
        self._schedule_probe(key, now)
        self._settle(out)
        return out

    def _on_probe_requested(self, event: ProbeRequested) -> list[Decision]:
        self._check_time(event)
        if event.key_id is not None:
            targets = [self._key(event.key_id, event)]
        else:
            targets = list(self._order)
        out: list[Decision] = []
        self._advance(event, out)
        for key in targets:
            if not key.probing and key.state is not KeyState.DISABLED:
                self._probe(key, event.now, "operator", out)
        return out

    def _on_key_added(self, event: KeyAdded) -> list[Decision]:
        self._check_time(event)
        spec = event.key
        if not isinstance(spec, KeySpec):
            raise PoolError("KeyAdded.key must be a KeySpec", event=event)
        if spec.key_id in self._keys or spec.key_id in self._dying:
            raise PoolError(
                f"duplicate key_id {spec.key_id!r}",
                event=event,
                state="the pool already holds (or is still draining) a key with this id",
                fix="remove it first and wait for its requests to finish, or pick another id",
            )
        out: list[Decision] = []
        self._advance(event, out)
        self._orphan_probes.discard(spec.key_id)
        self._add_key(spec)
        self._rebuild_rings()
        self._settle(out)
        return out

    def _on_key_removed(self, event: KeyRemoved) -> list[Decision]:
        self._check_time(event)
        key = self._key(event.key_id, event)
        out: list[Decision] = []
        self._advance(event, out)
        key.removed = True
        key.plain = False
        key.in_sched = False  # selection structures drop it when they meet it
        if key.probing:
            self._orphan_probes.add(key.key_id)
            key.probing = False
        del self._keys[key.key_id]
        self._order.remove(key)
        if key.state in USABLE_STATES:
            self._available -= 1
        if key.account is not None:
            members = self._accounts[key.account]
            members.remove(key)
            if not members:
                del self._accounts[key.account]
        if self._weighted is not None:
            self._weighted.total_weight -= self._weight(key)
        self._select.size_hint -= 1
        self._rebuild_rings()
        if key.in_flight:
            self._dying[key.key_id] = key
        else:
            del self._by_serial[key.serial]
        self._check_short(event.now, out)
        self._hopeless_check = True
        self._settle(out)
        return out

    def _on_key_marked(self, event: KeyMarked) -> list[Decision]:
        self._check_time(event)
        key = self._key(event.key_id, event)
        signal = _MARK_SIGNALS.get(event.state)
        if signal is None:
            raise PoolError(
                f"an operator cannot set state {event.state!r}",
                event=event,
                fix="mark healthy, disabled, rate_limited, degraded, depleted or failed",
            )
        until = event.until
        if until is None and event.state in (KeyState.RATE_LIMITED, KeyState.DEGRADED):
            raise PoolError(
                f"marking a key {event.state.value} needs an until time",
                event=event,
                fix="pass until=<monotonic time the key may be used again>",
            )
        if until is not None and not (until > event.now and until != math.inf):
            raise PoolError(
                "until must be a finite time after now", event=event, fix="pass a later until"
            )
        out: list[Decision] = []
        self._advance(event, out)
        self._transition(
            key, signal, event.now, until, event.reason, out, hard=True, force_until=True
        )
        self._check_short(event.now, out)
        self._settle(out)
        return out

    def _on_spend_recorded(self, event: SpendRecorded) -> list[Decision]:
        self._check_time(event)
        key = self._key(event.key_id, event)
        cost, at = event.cost, event.at
        if not (math.isfinite(cost) and cost >= 0) or (at is not None and not math.isfinite(at)):
            raise PoolError(
                "spend must be a finite cost >= 0 at a finite time",
                event=event,
                fix="pass cost >= 0 and at=None or a monotonic time",
            )
        out: list[Decision] = []
        self._advance(event, out)
        key.prompt_tokens += event.prompt_tokens
        key.completion_tokens += event.completion_tokens
        if cost:
            self._spend(key, cost, event.now, out, event.now if at is None else min(at, event.now))
        self._settle(out)
        return out

    # ---------------------------------------------------------------- keys

    def _add_key(self, spec: KeySpec) -> None:
        self._key_serial += 1
        key = KeyRecord(spec, self._key_serial)
        self._index_key(key)
        self._by_serial[key.serial] = key
        if self._weighted is not None:
            self._weighted.total_weight += self._weight(key)
        self._select.size_hint += 1
        self._refresh(key)

    def _index_key(self, key: KeyRecord) -> None:
        self._keys[key.key_id] = key
        self._order.append(key)
        if key.account is not None:
            self._accounts.setdefault(key.account, []).append(key)
        if key.state in USABLE_STATES and not key.removed:
            self._available += 1

    def _weight(self, key: KeyRecord) -> float:
        spec = key.spec
        if self._config.weight_by == "credits" and spec.credits is not None:
            return max(spec.credits - key.spend, 1e-9)
        return spec.weight

    def _usable(self, key: KeyRecord) -> bool:
        """May ``key`` take a request right now? (No side effects.)"""
        state = key.state
        if state is not _HEALTHY and (state is not _RECOVERING or key.trial):
            return False
        if key.removed:
            return False
        limit = key.max_in_flight
        if limit is not None and key.in_flight >= limit:
            return False
        now = self._now
        pace = key.pace_at
        if pace is not None and pace > now:
            return False
        tok = key.tok_at
        return tok is None or tok <= now + 60.0

    def _drop(self, key: KeyRecord) -> None:
        """``key`` left a selection structure as unusable: wake it when it may be usable."""
        if key.state is _HEALTHY or key.state is _RECOVERING:
            ready = _pacing_ready(key, self._now)
            if ready is not None and key.pace_timer != ready:
                key.pace_timer = ready
                heappush(self._timers, (ready, _T_PACE, key.serial, ""))

    def _refresh(self, key: KeyRecord) -> None:
        """``key`` may have become usable: file it for selection, wake the queue."""
        if not key.in_sched:
            if self._usable(key):
                self._select.add(key)
                self._wake = True
            else:
                self._drop(key)
        elif self._queued and self._usable(key):
            self._wake = True

    # ----------------------------------------------------------- selection

    def _pick(self, req: RequestRecord) -> KeyRecord | None:
        if not self._available:
            return None
        event = req.event
        avoid: Collection[str] | None = req.tried
        if event.group is not None:
            members = self._groups.get(event.group)
            if members:
                avoid = set(members) | set(avoid or ())
        elif (
            avoid is None
            and event.pin is None
            and event.session is None
            and not self._plain_pick_needs_request
        ):
            return self._select.pick(self._usable_fn, self._drop_fn, None)
        if event.pin is not None:
            key = self._pinned(event.pin)
            if key is not None and self._usable(key) and not (avoid and key.key_id in avoid):
                return key
            if not event.pin_fallback:
                return key if key is not None and self._usable(key) else None
        key = self._pick_policy(req, avoid)
        if key is None and avoid:
            key = self._pick_policy(req, None)
        return key

    def _pick_policy(self, req: RequestRecord, avoid: Collection[str] | None) -> KeyRecord | None:
        session = req.event.session
        if session is not None:
            if self._ring is not None:
                key = self._ring.pick(session, self._usable, avoid)
                if key is not None:
                    return key
            elif self._order:
                # Other policies: the session's home key while it is usable (its
                # prompt cache), the policy's choice otherwise.
                if self._sessions is None:
                    self._sessions = HashRing(self._config.affinity_vnodes, self._config.seed)
                    self._sessions.rebuild(self._order)
                key = self._sessions.home(session)
                if self._usable(key) and not (avoid and key.key_id in avoid):
                    return key
        if self._explore and self._rng.random() < self._explore:
            key = self._order[self._rng.randrange(len(self._order))]
            if self._usable(key) and not (avoid and key.key_id in avoid):
                return key
        return self._select.pick(self._usable_fn, self._drop_fn, avoid)

    def _rebuild_rings(self) -> None:
        """The key set changed: place the keys on the hash rings again."""
        if self._ring is not None:
            self._ring.rebuild(self._order)
        self._sessions = None  # rebuilt when the next session asks

    def _pinned(self, pin: str | int) -> KeyRecord | None:
        if isinstance(pin, int):
            return self._order[pin] if 0 <= pin < len(self._order) else None
        return self._keys.get(pin)

    def _assign(self, req: RequestRecord, key: KeyRecord, out: list[Decision]) -> None:
        """Send ``req`` on ``key``."""
        req.key = key
        req.attempt = attempt = req.attempt + 1
        req.state = SENT
        req.sent_at = self._now
        key.in_flight += 1
        key.requests += 1
        if not key.plain or key.state is not _HEALTHY or req.event.group is not None:
            self._assign_limits(req, key)
        key.last_pick = self._pick_seq
        self._pick_seq += 1
        if not key.in_sched:
            self._select.requeue(key)
        elif self._rescore_on_load:
            self._select.rescore(key)
        send = _new(Send)  # make_send(...), inlined on the hottest path
        _send_request_id(send, req.request_id)
        _send_key_id(send, key.key_id)
        _send_attempt(send, attempt)
        out.append(send)

    def _assign_limits(self, req: RequestRecord, key: KeyRecord) -> None:
        """The rarer parts of sending: trials, pacing, groups."""
        now = self._now
        if key.state is _RECOVERING:
            key.trial = req.trial = True
        spec = key.spec
        event = req.event
        if spec.rpm is not None:
            base = key.pace_at if key.pace_at is not None and key.pace_at > now else now
            key.pace_at = base + 60.0 / spec.rpm
        if spec.tpm is not None and event.tokens:
            base = key.tok_at if key.tok_at is not None and key.tok_at > now else now
            key.tok_at = base + event.tokens * 60.0 / spec.tpm
        group = event.group
        if group is not None:
            members = self._groups.setdefault(group, {})
            members[key.key_id] = members.get(key.key_id, 0) + 1

    def _release(self, req: RequestRecord) -> None:
        """The request's attempt no longer holds its key."""
        key = req.key
        assert key is not None
        req.key = None
        key.in_flight -= 1
        if req.trial or key.removed or req.event.group is not None:
            self._release_extras(req, key)
            if key.removed:
                return
        if self._rescore_on_load:
            self._select.rescore(key)
        if not key.in_sched or self._queued:
            self._refresh(key)

    def _release_extras(self, req: RequestRecord, key: KeyRecord) -> None:
        """The rarer parts of releasing: trials, groups, removed keys."""
        if req.trial:
            req.trial = key.trial = False
        group = req.event.group
        if group is not None:
            members = self._groups[group]
            count = members[key.key_id] - 1
            if count:
                members[key.key_id] = count
            else:
                del members[key.key_id]
                if not members:
                    del self._groups[group]
        if key.removed and not key.in_flight:
            del self._dying[key.key_id]
            del self._by_serial[key.serial]

    def _fail_over(self, req: RequestRecord, key: KeyRecord, out: list[Decision]) -> None:
        """The attempt on ``key`` failed: the next attempt, on another key if any."""
        self._release(req)
        if req.tried is None:
            req.tried = [key.key_id]
        else:
            req.tried.append(key.key_id)
        nxt = self._pick(req)
        if nxt is not None:
            self._assign(req, nxt, out)
        else:
            self._enqueue(req, out)

    def _forget(self, req: RequestRecord) -> None:
        req.state = -1
        del self._requests[req.request_id]

    # --------------------------------------------------------------- queue

    def _enqueue(self, req: RequestRecord, out: list[Decision]) -> None:
        """Wait for a key, or reject at once if waiting cannot help."""
        now = self._now
        req.state = QUEUED
        req.key = None
        if not req.serial:
            event = req.event
            deadline = event.deadline
            req.deadline = event.now + self._queue_timeout if deadline is None else deadline
            self._request_serial = req.serial = self._request_serial + 1
        earliest = self._earliest(now)
        if self._queued >= self._config.queue_limit:
            self._reject(req, earliest, "queue full", out)
        elif req.deadline <= now:
            self._reject(req, earliest, "no key is usable before the deadline", out)
        elif earliest is None:
            self._reject(req, None, "no key is usable", out)
        elif earliest is not None and earliest > req.deadline:
            self._reject(req, earliest, "no key is usable before the deadline", out)
        else:
            self._queue.append(req)
            self._queued += 1
            heappush(self._timers, (req.deadline, _T_DEADLINE, req.serial, req.request_id))

    def _drain(self, out: list[Decision]) -> None:
        """Serve waiting requests, first come first served, while keys are free."""
        self._wake = False
        queue = self._queue
        skipped: list[RequestRecord] = []
        while queue:
            req = queue[0]
            if req.state != QUEUED:
                queue.popleft()
                continue
            key = self._pick(req)
            if key is None:
                if req.event.pin is not None and not req.event.pin_fallback:
                    skipped.append(queue.popleft())  # waits for its own key only
                    continue
                break
            queue.popleft()
            self._queued -= 1
            self._assign(req, key, out)
        if skipped:
            queue.extendleft(reversed(skipped))

    def _settle(self, out: list[Decision]) -> None:
        """The end of every handler: serve the queue if a key may have come free,
        and reject at once what no key can serve before its deadline."""
        if self._wake:
            self._drain(out)
        if self._hopeless_check:
            self._hopeless_check = False
            if self._queued:
                self._reject_hopeless(out)

    def _reject_hopeless(self, out: list[Decision]) -> None:
        """Reject the waiting requests that no key can serve before their deadline
        (failed and depleted keys with no known return, probes over): waiting
        the whole queue timeout would only delay the same answer."""
        now = self._now
        earliest = self._earliest(now)
        if earliest is not None and earliest <= now:
            return
        for req in self._queue:
            if req.state == QUEUED and (earliest is None or earliest > req.deadline):
                self._queued -= 1
                why = "no key is usable" if earliest is None else "no key is usable in time"
                self._reject(req, earliest, why, out)

    def _earliest(self, now: float) -> float | None:
        """Earliest time a key may be usable again: ``now`` if some key only
        waits on load or pacing, ``None`` if no key will come back on its own."""
        best: float | None = None
        for key in self._order:
            if key.state in USABLE_STATES:
                limit = key.max_in_flight
                if key.trial or (limit is not None and key.in_flight >= limit):
                    return now  # frees whenever a response comes back
                when = _pacing_ready(key, now)
                if when is None:
                    return now
            elif key.probing:
                return now
            elif key.until is not None and key.state in _COOLING:
                when = key.until
            else:
                continue
            if best is None or when < best:
                best = when
        return best

    def _reject(
        self, req: RequestRecord, earliest: float | None, why: str, out: list[Decision]
    ) -> None:
        now = self._now
        live = [k for k in self._order if k.state is not KeyState.DISABLED]
        all_limited = (
            not self._available and bool(live) and all(k.state is _RATE_LIMITED for k in live)
        )
        retry_after = None if earliest is None else max(earliest - now, 0.0)
        self._forget(req)
        out.append(
            Reject(
                request_id=req.request_id,
                status=429 if all_limited else 503,
                retry_after=retry_after,
                reason=why,
            )
        )
        self._rejected += 1

    # -------------------------------------------------------------- timers

    def _timer_valid(self, timer: tuple[float, int, int, str]) -> bool:
        when, kind, serial, request_id = timer
        if kind == _T_DEADLINE:
            req = self._requests.get(request_id)
            return (
                req is not None
                and req.serial == serial
                and req.state == QUEUED
                and req.deadline == when
            )
        key = self._by_serial.get(serial)
        if key is None or key.removed:
            return False
        if kind == _T_COOLDOWN:
            return key.until == when and key.state in _COOLING
        if kind == _T_PACE:
            return key.pace_timer == when
        return key.probe_due == when

    def _run_timers(self, now: float, out: list[Decision]) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            timer = heappop(timers)
            if not self._timer_valid(timer):
                continue
            when, kind, serial, request_id = timer
            if kind == _T_DEADLINE:
                if self._wake:
                    self._drain(out)
                req = self._requests[request_id]
                if req.state == QUEUED:
                    self._queued -= 1
                    self._reject(req, self._earliest(when), "waited past its deadline", out)
                continue
            key = self._by_serial[serial]
            if kind == _T_COOLDOWN:
                self._transition(key, Signal.COOLDOWN_ENDED, when, None, "cooldown_ended", out)
            elif kind == _T_PACE:
                key.pace_timer = None
                self._refresh(key)
            else:
                key.probe_due = None
                if not key.probing and (
                    key.state in _RECHECKED
                    or (
                        key.state in _PROBE_WHEN_SHORT
                        and not key.hard_until
                        and self._available < self._config.min_healthy
                    )
                ):
                    self._probe(key, when, "recheck", out)

    # -------------------------------------------------------------- health

    def _succeeded(self, req: RequestRecord, key: KeyRecord, out: list[Decision]) -> None:
        """A 2xx arrived on ``req``'s attempt."""
        now = self._now
        req.state = DELIVERED
        key.successes += 1
        window = key.window
        if now >= window.end:
            window.roll(now, self._config.error_window)
        window.cur_req += 1
        if self._latency:
            alpha = self._config.latency_alpha
            latency = now - req.sent_at
            key.ewma = latency if key.successes == 1 else key.ewma + alpha * (latency - key.ewma)
            # No rescore here: the release that follows files the new score.
        if key.state is _RECOVERING:
            self._transition(key, Signal.SUCCESS, now, None, "trial_ok", out)

    def _judge(
        self,
        key: KeyRecord,
        verdict: Classification,
        req: RequestRecord | None,
        out: list[Decision],
    ) -> None:
        """Apply a classified answer to the key's health (and its account's), as
        ``policy.VERDICTS`` says."""
        now = self._now
        rule = VERDICTS[verdict.verdict]
        signal = rule.signal
        if signal is Signal.SUCCESS:
            if req is not None:
                self._succeeded(req, key, out)
            if verdict.cooldown:  # Cooldown.SIGNAL: an exhausted bucket
                self._cool(key, Signal.RATE_LIMITED, now + verdict.cooldown, True, verdict, out)
            return
        assert rule.counts_as is not None
        key.errors[ERROR_INDEX[rule.counts_as]] += 1
        reason = verdict.reason or verdict.verdict.value
        if rule.cooldown is Cooldown.WINDOW:
            self._fault(key, now, reason, out)
        elif signal is not None:
            until: float | None = None
            hard = False
            if rule.cooldown is Cooldown.SIGNAL_OR_DEFAULT:
                rest = verdict.cooldown
                hard = rest is not None
                if rest is None:
                    rest = self._default_cooldown(rule.default, reason)
                until = now + rest
            old = key.state
            if rule.account_wide:
                self._cool(key, signal, until, hard, verdict, out)
            else:
                self._transition(key, signal, now, until, reason, out)
            if rule.confirm_probe and old is not key.state and not key.probing and req is not None:
                self._probe(key, now, "confirm_" + signal.value, out)  # false 401s happen
        elif rule.passes_trial and key.state is _RECOVERING:
            # The key authenticated and was served: the trial succeeded.
            self._transition(key, Signal.SUCCESS, now, None, "trial_ok", out)
        self._check_short(now, out)

    def _default_cooldown(self, field: str | None, reason: str) -> float:
        """The configured cooldown of a verdict without the upstream's own time."""
        for text, special in REASON_DEFAULTS:
            if text in reason:
                field = special
                break
        assert field is not None
        value: float = getattr(self._config, field)
        return value

    def _cool(
        self,
        key: KeyRecord,
        signal: Signal,
        until: float | None,
        hard: bool,
        verdict: Classification,
        out: list[Decision],
    ) -> None:
        """Apply ``signal`` to the key, or to its whole account when account-wide."""
        targets = [key]
        if verdict.account_wide and key.account is not None:
            targets = self._accounts.get(key.account, [key])
        reason = verdict.reason or signal.value
        for target in targets:
            self._transition(target, signal, self._now, until, reason, out, hard=hard)

    def _fault(self, key: KeyRecord, now: float, reason: str, out: list[Decision]) -> None:
        """Count an upstream fault; degrade the key if it alone keeps failing."""
        config = self._config
        size = config.error_window
        key.window.roll(now, size)
        key.window.cur_req += 1
        key.window.cur_err += 1
        if key.state is not _HEALTHY and key.state is not _RECOVERING:
            return
        requests, errors = key.window.estimate(now, size)
        if requests < config.error_min_requests or errors <= config.error_threshold * requests:
            return
        rest_requests = rest_errors = 0.0
        for other in self._order:
            if other is not key:
                r, e = other.window.estimate(now, size)
                rest_requests += r
                rest_errors += e
        if rest_requests <= 0 or rest_errors > config.error_threshold * rest_requests:
            return  # no evidence it is this key rather than the upstream
        self._transition(key, Signal.ERROR_RATE, now, now + config.degraded_cooldown, reason, out)

    def _timed_out(self, key: KeyRecord, req: RequestRecord, out: list[Decision]) -> None:
        """An attempt on ``key`` got no answer in time. A key that hangs while
        others answer is degraded after ``timeout_strikes`` in a row (a trial at
        once), however little traffic the other keys had: one answer from any
        other key since the first timed-out attempt was sent is the evidence."""
        if key.timeouts == 0:
            key.timeout_since = req.sent_at
        key.timeouts += 1
        strikes = self._config.timeout_strikes
        if (
            strikes
            and key.state in USABLE_STATES
            and (key.timeouts >= strikes or key.state is _RECOVERING)
            and self._last_answer > key.timeout_since
        ):
            key.timeouts = 0
            now = self._now
            until = now + self._config.degraded_cooldown
            self._transition(key, Signal.ERROR_RATE, now, until, "transport_timeouts", out)

    def _spend(
        self, key: KeyRecord, cost: float, now: float, out: list[Decision], at: float | None = None
    ) -> None:
        """Charge ``cost`` spent at ``at`` (default ``now``) to the key's credits and budget."""
        spec = key.spec
        old_weight = self._weight(key) if self._weighted is not None else 0.0
        key.spend += cost
        if self._weighted is not None and self._config.weight_by == "credits":
            self._weighted.reweigh(key, old_weight, self._weight(key))
        if spec.budget is not None:
            window = spec.budget_window
            if at is None:
                at = now
            if window is not None:
                start = key.budget_start
                if at + window <= now:
                    counted = False  # spent in a window that has ended
                elif start is None or now >= start + window:
                    key.budget_start, key.budget_spend, counted = at, 0.0, True
                else:  # the running window; an earlier spend opened it earlier
                    key.budget_start, counted = min(start, at), True
            else:
                counted = True
            if counted:
                key.budget_spend += cost
            if counted and key.budget_spend >= spec.budget:
                until = (
                    None
                    if window is None or key.budget_start is None
                    else (key.budget_start + window)
                )
                self._transition(
                    key, Signal.DEPLETED, now, until, "budget", out, hard=until is not None
                )
        if spec.credits is not None and key.spend >= spec.credits:
            self._transition(key, Signal.DEPLETED, now, None, "credits_spent", out)
        self._check_short(now, out)

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
    ) -> None:
        """Move ``key`` by the table; keep ``until`` as a floor; tell the driver.

        ``hard`` marks an ``until`` that came from the upstream (Retry-After, a
        reset header) or an operator: no probe may end it early.
        """
        if key.removed:
            return  # a removed key only drains its requests; its health is moot
        old = key.state
        new = next_state(old, signal)
        if new is old:
            # Same state: a later, longer cooldown extends it; a shorter one never
            # shortens it (Retry-After is a floor).
            if (
                until is not None
                and new in _COOLING
                and (force_until or key.until is None or until > key.until)
            ):
                key.until = until
                key.reason = reason
                key.hard_until = hard or (key.hard_until and not force_until)
                heappush(self._timers, (until, _T_COOLDOWN, key.serial, ""))
                out.append(_changed(key, old, now))
            return
        if new is KeyState.RATE_LIMITED or new is KeyState.DEGRADED:
            assert until is not None  # every caller gives one (KeyMarked checks)
            if not force_until and old in _COOLING and key.until is not None:
                until = max(until, key.until)
        elif new is not KeyState.DEPLETED:
            until = None
        key.hard_until = hard and until is not None
        key.state = new
        key.until = until
        key.reason = reason
        if old in USABLE_STATES:
            self._available -= 1
        if new in USABLE_STATES:
            self._available += 1
        if old is _RECOVERING:
            key.trial = False
        if until is not None:
            heappush(self._timers, (until, _T_COOLDOWN, key.serial, ""))
        out.append(_changed(key, old, now))
        if new in USABLE_STATES:
            key.probe_due = None
            self._refresh(key)
        else:
            self._hopeless_check = True
            self._schedule_probe(key, now)

    # -------------------------------------------------------------- probes

    def _probe(self, key: KeyRecord, now: float, reason: str, out: list[Decision]) -> None:
        key.probing = True
        key.last_probe = now
        key.probe_due = None
        out.append(Probe(key_id=key.key_id, reason=reason))

    def _schedule_probe(self, key: KeyRecord, now: float) -> None:
        """Plan the key's next probe: rechecks of failed and depleted keys, and
        retries while the pool is short of usable keys."""
        if key.probing or key.removed:
            return
        state = key.state
        config = self._config
        due: float | None = None
        if state in _RECHECKED and config.recheck_interval is not None:
            due = now + config.recheck_interval
        if (
            state in _PROBE_WHEN_SHORT
            and not key.hard_until
            and self._available < config.min_healthy
        ):
            soon = now + config.probe_interval
            due = soon if due is None else min(due, soon)
        if due is not None and due != key.probe_due:
            key.probe_due = due
            heappush(self._timers, (due, _T_PROBE, key.serial, ""))

    def _check_short(self, now: float, out: list[Decision]) -> None:
        """Fewer usable keys than ``min_healthy``: probe every cooling key at once."""
        if self._available >= self._config.min_healthy:
            return
        gap = self._config.probe_interval
        last = self._last_short_scan
        if last is not None and now < last + gap:
            return  # keys that cooled since are probed by their own timers
        self._last_short_scan = now
        for key in self._order:
            if (
                key.state in _PROBE_WHEN_SHORT
                and not key.probing
                and not key.hard_until
                and (key.last_probe is None or now >= key.last_probe + gap)
            ):
                self._probe(key, now, "pool_short", out)


def _score_least_busy(key: KeyRecord) -> tuple[int, int]:
    return (key.in_flight, key.last_pick)


def _score_latency(key: KeyRecord) -> tuple[float, int]:
    return (key.ewma * (key.in_flight + 1), key.last_pick)


def _pacing_ready(key: KeyRecord, now: float) -> float | None:
    """When pacing lets ``key`` send again, if pacing is what holds it back."""
    ready = None
    if key.pace_at is not None and key.pace_at > now:
        ready = key.pace_at
    if key.tok_at is not None and key.tok_at > now + 60.0:
        tok_ready = key.tok_at - 60.0
        ready = tok_ready if ready is None else max(ready, tok_ready)
    return ready


def _changed(key: KeyRecord, old: KeyState, now: float) -> KeyStateChanged:
    return KeyStateChanged(
        key_id=key.key_id, old=old, new=key.state, until=key.until, reason=key.reason, now=now
    )


def _with_cooldown(verdict: Classification, cooldown: float) -> Classification:
    return Classification(
        verdict=verdict.verdict,
        cooldown=cooldown,
        account_wide=verdict.account_wide,
        reason=verdict.reason,
    )
