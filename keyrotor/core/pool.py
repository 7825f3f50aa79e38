"""The pool: a deterministic state machine from events to decisions.

``Pool.handle(event)`` checks the event against the pool's state (raising
``PoolError`` and changing nothing if it does not fit), advances the clock to
``event.now``, fires the timers that are due (cooldowns ending, pacing slots,
probes due, queued requests' deadlines), applies the event and returns the
decisions. Key health moves only through ``states.TRANSITIONS``, as the
tables of ``policy.py`` say.

``Pool`` is written in parts: this module holds its state, its API and one
handler per event; ``_choose.KeyChoice`` picks, sends and frees keys,
``_queue.RequestQueue`` makes requests wait and fires timers,
``_health.KeyHealth`` judges keys and probes them, ``_snapshot.Snapshots``
saves and restores the whole. ``_fields.PoolFields`` declares the state they share.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable
from heapq import heappop
from typing import Any

import attrs

from ._choose import KeyChoice, _score_latency, _score_least_busy
from ._health import KeyHealth
from ._queue import RequestQueue
from ._records import (
    DELIVERED,
    ERROR_INDEX,
    QUEUED,
    REQUEST_LIFECYCLE,
    SENT,
    KeyRecord,
    RequestRecord,
)
from ._select import HashRing, HeapSelector, RingSelector, WeightedSelector
from ._snapshot import SNAPSHOT_VERSION, Snapshots
from .classify import Classification, Verdict, classify_probe, classify_response
from .config import AFFINITY_POINTS_MAX, KeySpec, PoolConfig, finite, shown
from .decisions import (
    Decision,
    Reject,
    make_deliver,
)
from .errors import PoolError
from .events import (
    AttemptHeld,
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
from .policy import FAILURES, VERDICTS, failure_rule
from .states import (
    USABLE_STATES,
    KeyState,
    Signal,
)
from .statistics import KeyStatistics, PoolStatistics

__all__ = ["SNAPSHOT_VERSION", "Pool"]

_INF = math.inf
_HEALTHY = KeyState.HEALTHY
NOT_THE_KEYS_FAULT = frozenset(reason for reason, rule in FAILURES.items() if not rule.blamed)
"""``TransportFailed`` reasons that fail the attempt over without blaming its key
(``policy.FAILURES``)."""

# Verdicts after which the attempt is retried on another key.
_RETRY = frozenset(verdict for verdict, rule in VERDICTS.items() if rule.fails_over)
_TRY_ANOTHER_KEY = Verdict.TRY_ANOTHER_KEY
# Verdicts whose retry hint holds the request off the key that gave it.
_HINT_HOLDS = frozenset(verdict for verdict, rule in VERDICTS.items() if rule.hint_holds)
_MARK_SIGNALS = {
    KeyState.HEALTHY: Signal.MARK_HEALTHY,
    KeyState.DISABLED: Signal.MARK_DISABLED,
    KeyState.RATE_LIMITED: Signal.MARK_RATE_LIMITED,
    KeyState.DEGRADED: Signal.MARK_DEGRADED,
    KeyState.DEPLETED: Signal.MARK_DEPLETED,
    KeyState.FAILED: Signal.MARK_FAILED,
}


class Pool(KeyChoice, RequestQueue, KeyHealth, Snapshots):
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
        self._spent = 0.0  # every key's spend, removed keys' included
        self._orphan_probes: set[str] = set()
        # A hanging key's evidence: when a key last answered, which key that was
        # (its serial), and when a key other than that one last answered.
        self._last_answer = -math.inf
        self._answer_serial = 0
        self._other_answer = -math.inf
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
            AttemptHeld: self._on_held,
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

    def key_ids(self, *, removing: bool = False) -> list[str]:
        """Ids of the keys in the pool, in configured order; with ``removing``,
        then those removed but still finishing requests."""
        ids = [k.key_id for k in self._order]
        if removing:
            ids += self._dying
        return ids

    def key_specs(self) -> dict[str, KeySpec]:
        """The spec of each key in the pool (removed ones excluded)."""
        return {k.key_id: k.spec for k in self._order}

    def key_spec(self, key_id: str) -> KeySpec | None:
        """The spec of one key (a key being removed's included); ``None``: no such key."""
        key = self._keys.get(key_id) or self._dying.get(key_id)
        return None if key is None else key.spec

    def state_of(self, key_id: str) -> KeyState:
        """The current state of a key."""
        return self._key(key_id, None).state

    def usable_now(self) -> bool:
        """Could some key take a request at ``pool.now``, by the rules the pool
        picks with? (Healthy, or recovering with no trial in flight; under its
        ``max_in_flight``; its ``rpm``/``tpm`` pacing due.) A request's pin,
        group and session rules are not applied. Read-only: no timer fires and
        nothing changes; feed ``Tick`` first to bring the pool to a later time.
        """
        usable = self._usable
        return any(usable(key) for key in self._order)

    def count_by_state(self) -> dict[str, int]:
        """How many keys are in each state (every state named, zeros included;
        keys being removed not counted): ``statistics().count_by_state()``
        without a picture of every key, for health checks of large pools."""
        counts = {state.value: 0 for state in KeyState}
        for key in self._order:
            counts[key.state.value] += 1
        return counts

    def count_usable(self) -> int:
        """How many keys are in a usable state (``USABLE_STATES``; keys being
        removed not counted), without counting them: O(1)."""
        return self._available

    def statistics(self, *, keys: bool = True) -> PoolStatistics:
        """A frozen picture of the pool: per key and in total (JSON via
        ``to_json``); ``keys=False``: the totals only, ``keys`` empty (for
        pools of thousands of keys: no picture of every key)."""
        records = [*self._order, *self._dying.values()]
        return PoolStatistics(
            now=self._now,
            keys=tuple(map(KeyStatistics.from_record, records)) if keys else (),
            queued=self._queued,
            in_flight=sum(k.in_flight for k in records),
            started=self._started,
            delivered=self._delivered,
            rejected=self._rejected,
            cancelled=self._cancelled,
            spend=self._spent,
        )

    def key_statistics(self, key_id: str) -> KeyStatistics | None:
        """One key's picture (``statistics().keys``' entry, without a picture
        of every key), a key being removed's included; ``None``: no such key."""
        key = self._keys.get(key_id) or self._dying.get(key_id)
        return None if key is None else KeyStatistics.from_record(key)

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

    def _attempts(self, req: RequestRecord) -> int:
        """The attempts ``req`` may make: the pool's, or fewer if it asked."""
        asked = req.event.max_attempts
        return self._max_attempts if asked is None else min(asked, self._max_attempts)

    def _request(self, event: Any) -> RequestRecord:
        """The request ``event`` is about, if the lifecycle table lets the event
        meet the request's state."""
        self._check_time(event)
        req = self._requests.get(event.request_id)
        if req is None:
            raise PoolError(
                f"unknown request_id {event.request_id!r}",
                event=event,
                state="the pool holds no such request (never started, or already ended)",
                fix="send RequestStarted first, and no event after a request has ended",
            )
        if req.state not in REQUEST_LIFECYCLE[type(event)]:
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
        limit = event.max_attempts
        if limit is not None and (type(limit) is not int or limit < 1):
            raise PoolError(
                f"max_attempts must be a positive integer or None, got {limit!r}",
                event=event,
                fix="leave it None for the pool's max_attempts",
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
            req = self._request(event)
        retry_after = event.retry_after
        if retry_after is not None:
            _check_retry_after(event, retry_after)
        out: list[Decision] = []
        self._now = now
        if self._timers and self._timers[0][0] <= now:
            self._run_timers(now, out)
        key = req.key
        assert key is not None
        if key.serial != self._answer_serial:
            self._other_answer = self._last_answer
            self._answer_serial = key.serial
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
        kind = verdict.verdict
        retried = False
        if kind in _RETRY and req.attempt < self._attempts(req):
            if kind is _TRY_ANOTHER_KEY:  # never back to a key that said so
                retried = self._try_another_key(req, key, out, verdict.shared_budget)
            else:
                if verdict.cooldown and kind in _HINT_HOLDS:  # the upstream asked to wait
                    self._hold(req, key, now + verdict.cooldown)
                self._fail_over(req, key, out)
                retried = True
        if not retried:
            req.state = DELIVERED
            out.append(make_deliver(req.request_id, key.key_id, req.attempt, status))
            self._delivered += 1
        self._settle(out)
        return out

    def _on_finished(self, event: ResponseFinished) -> list[Decision]:
        req = self._requests.get(event.request_id)
        now = event.now
        if req is None or req.state != DELIVERED or not (self._now <= now < _INF):
            req = self._request(event)
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
        if event.error_status is not None:  # mid-stream: judged, nothing retried
            verdict = classify_response(
                event.error_status,
                None,
                event.error_body,
                wall_time=event.wall_time,
                mid_stream=True,
            )
            self._judge(key, verdict, None, out)
        self._settle(out)
        return out

    def _on_transport_failed(self, event: TransportFailed) -> list[Decision]:
        req = self._request(event)
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
            self._check_short(event.now, out)
        if req.state == SENT and req.attempt < self._attempts(req):
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

    def _on_held(self, event: AttemptHeld) -> list[Decision]:
        req = self._request(event)
        until = event.until
        if not (event.now < until < _INF):
            raise PoolError(
                f"AttemptHeld.until must lie after now, got until={until!r} now={event.now!r}",
                event=event,
                fix="hold the key until a later time on the pool's clock",
            )
        out: list[Decision] = []
        self._advance(event, out)
        key = req.key
        assert key is not None
        if key.pace_at is None or key.pace_at < until:
            key.pace_at = until  # its pacing timer wakes the key (``_drop``)
        key.plain = False  # selection now checks its pacing
        key.requests -= 1
        req.attempt -= 1  # not an attempt: the upstream never saw it
        self._release(req)
        self._send_or_queue(req, out)
        self._settle(out)
        return out

    def _on_cancelled(self, event: RequestCancelled) -> list[Decision]:
        req = self._request(event)
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
        if event.key_id in self._orphan_probes:
            return self._orphan_probe_finished(event)
        key = self._key(event.key_id, event)
        if not key.probing:
            raise PoolError(
                f"no probe of key {event.key_id!r} is running",
                event=event,
                state=f"key {event.key_id!r} is {key.state.value}",
                fix="send ProbeFinished once per Probe decision",
            )
        out: list[Decision] = []
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
                if not self._held(key, now):
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
                    self._check_short(now, out)
            elif VERDICTS[kind].from_probe:
                self._judge(key, verdict, None, out, by_probe=True)
        self._schedule_probe(key, now)
        self._settle(out)
        return out

    def _orphan_probe_finished(self, event: ProbeFinished) -> list[Decision]:
        """The probe of a removed key ended: its answer is ignored. A key added
        since under the same id held its own probes back (``_on_key_added``):
        it may probe now."""
        out: list[Decision] = []
        self._advance(event, out)
        self._orphan_probes.discard(event.key_id)
        key = self._keys.get(event.key_id)
        if key is not None:
            now = event.now
            key.probing = False
            self._hopeless_check = True
            if self._probe_wanted(key, now):
                self._probe(key, now, "recheck", out)
            else:
                self._schedule_probe(key, now)
        self._settle(out)  # timers the event's time fired may have freed a key
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
        self._settle(out)  # timers the event's time fired may have freed a key
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
        config = self._config
        if config.affinity_vnodes * spec.weight > AFFINITY_POINTS_MAX:  # sessions' ring
            raise PoolError(
                f"key {spec.key_id!r} would have {config.affinity_vnodes} x {spec.weight:g} "
                f"points on the affinity ring, more than {AFFINITY_POINTS_MAX:,}",
                event=event,
                fix="give it a lower weight (weights are relative: 1 and 3 share as 100 and 300)",
            )
        out: list[Decision] = []
        self._advance(event, out)
        self._add_key(spec)
        if spec.key_id in self._orphan_probes:
            # The removed key's probe still runs, and its ProbeFinished names only the
            # id: the new key starts no probe of its own until that one has ended.
            self._keys[spec.key_id].probing = True
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
        if not (finite(cost) and cost >= 0) or (at is not None and not finite(at)):
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


def _check_retry_after(event: ResponseReceived, retry_after: float) -> None:
    """``ResponseReceived.retry_after`` is seconds from ``now``: finite, >= 0."""
    if not finite(retry_after) or retry_after < 0 or not event.now + retry_after < _INF:
        raise PoolError(
            f"ResponseReceived.retry_after must be a finite number of seconds >= 0, "
            f"got {shown(retry_after)}",
            event=event,
            fix="pass the parsed Retry-After in seconds from now, or None (the headers "
            "are read too)",
        )


def _with_cooldown(verdict: Classification, cooldown: float) -> Classification:
    return attrs.evolve(verdict, cooldown=cooldown)
