"""The replay engine: a discrete-event loop feeding ``keyrotor.core.Pool``.

A heap of (virtual time, sequence, kind, ...) holds upstream answers, body
ends, probe answers and cancellations; arrivals come from the trace in order.
Before each step the engine feeds ``Tick`` at ``pool.next_deadline()`` when that
comes first. No sleeping, no sockets, no wall clock: the same trace, model and
seed give the same decisions and the same numbers. ``simulate`` runs one
``_Replay`` (setup, the event loop, answers, finishing, timers, the pool's
decisions, collecting the metrics); what the engine needs to know about the
pool it asks the pool (``Pool.usable_now``), never re-derives.

Hot path notes (the target is 100,000 simulated requests per second for a
4-key pool): a successful answer and a body end are fed through two event
objects reused for every request (the core keeps neither), ``RequestStarted``
is built with the core's positional builder, and metrics are kept in flat lists.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from heapq import heappop, heappush
from itertools import count
from typing import Any

import attrs

from ..core import (
    Deliver,
    KeySpec,
    KeyState,
    KeyStateChanged,
    Pool,
    PoolConfig,
    Probe,
    ProbeFinished,
    Reject,
    RequestCancelled,
    ResponseFinished,
    ResponseReceived,
    Send,
    Tick,
    TransportFailed,
    request_started,
)
from .trace import Trace, TraceHeader
from .upstream import EPOCH, RecordedUpstream, SimulatedUpstream, UpstreamModel

__all__ = ["RunResult", "pool_keys", "simulate"]

_ANSWER, _FINISH, _PROBE, _CANCEL = 0, 1, 2, 3
# Request state slots (a list per request in flight).
_REC, _ARRIVAL, _READY, _QWAIT, _SENT, _ERR, _ATTEMPT, _FAILED, _ANS, _WAITED, _FWAIT = range(11)

_USABLE = (KeyState.HEALTHY, KeyState.RECOVERING)
_HEALTHY = KeyState.HEALTHY

# The engine reuses one ResponseReceived and one ResponseFinished (the core
# keeps neither: keyrotor/core/events.py). Fail at import, not with a
# half-built event, if those classes ever gain a field this code does not set.
_SET = {
    ResponseReceived: (
        "request_id", "now", "status", "retry_after", "headers", "body", "wall_time"
    ),
    ResponseFinished: (
        "request_id", "now", "cost", "prompt_tokens", "completion_tokens", "error_status",
        "error_body", "wall_time",
    ),
}  # fmt: skip
for _cls, _names in _SET.items():
    if tuple(f.name for f in attrs.fields(_cls)) != _names:  # pragma: no cover
        raise ImportError(f"keyrotor.replay.engine does not know {_cls.__name__}'s fields")
_RR_ID = ResponseReceived.__dict__["request_id"].__set__
_RR_NOW = ResponseReceived.__dict__["now"].__set__
_RR_STATUS = ResponseReceived.__dict__["status"].__set__
_RF_ID = ResponseFinished.__dict__["request_id"].__set__
_RF_NOW = ResponseFinished.__dict__["now"].__set__
_RF_COST = ResponseFinished.__dict__["cost"].__set__
_RF_PROMPT = ResponseFinished.__dict__["prompt_tokens"].__set__
_RF_COMPLETION = ResponseFinished.__dict__["completion_tokens"].__set__


def pool_keys(header: TraceHeader, model: UpstreamModel, keys: int | None = None) -> list[KeySpec]:
    """The pool's keys for a replay.

    Without ``keys``: the trace header's keys under their own aliases; without
    them, the upstream model's named keys; else 4 plain keys ``key-0`` ..
    ``key-3``. With ``keys`` (a count), always ``keys`` keys named ``key-0``,
    ``key-1``, ... (whatever the header calls them, even when the count is the
    header's), their options cycled from the header's keys (or the model's
    named keys). A key's ``account`` comes from the header, else from the
    upstream model.
    """
    base = [dict(k) for k in header.keys]
    if not base and model.keys:
        base = [{"key_id": alias} for alias in model.keys]
    if keys is not None:
        if keys < 1:
            raise ValueError("keys must be at least 1")
        template = base or [{}]
        base = [{**template[i % len(template)], "key_id": f"key-{i}"} for i in range(keys)]
    elif not base:
        base = [{"key_id": f"key-{i}"} for i in range(4)]
    specs = []
    for fields in base:
        if fields.get("account") is None:
            account = model.for_key(fields["key_id"]).account
            if account is not None:
                fields["account"] = account
        specs.append(KeySpec(**fields))
    return specs


@attrs.define(kw_only=True)
class RunResult:
    """The raw outcome of one replay with one policy (``report.py`` summarises it)."""

    policy: str
    keys: list[str]
    requests: int
    delivered: int = 0
    served: int = 0
    client_errors: dict[str, int] = attrs.field(factory=dict)
    rejected: int = 0
    cancelled: int = 0
    lost: int = 0
    upstream_statuses: dict[str, int] = attrs.field(factory=dict)
    probes: int = 0
    sends: list[int] = attrs.field(factory=list)
    served_by_key: list[int] = attrs.field(factory=list)
    spend: list[float] = attrs.field(factory=list)
    upstream_429: list[int] = attrs.field(factory=list)
    ever_unhealthy: list[bool] = attrs.field(factory=list)
    final_states: list[str] = attrs.field(factory=list)
    episodes: list[dict[str, Any]] = attrs.field(factory=list)
    queue_waits: list[float] = attrs.field(factory=list)
    ttfb: list[float] = attrs.field(factory=list)
    failover_extra: list[float] = attrs.field(factory=list)
    failover_overhead: list[float] = attrs.field(factory=list)
    failover_error_rtt: list[float] = attrs.field(factory=list)
    failover_immediate: list[float] = attrs.field(factory=list)
    failover_waited_no_key: int = 0
    failover_waited_key_usable: int = 0
    end_time: float = 0.0
    state_changes: list[tuple[float, int, str]] = attrs.field(factory=list)
    load: dict[int, list[int]] = attrs.field(factory=dict)
    bucket: float = 0.0
    pool_statistics: dict[str, int] = attrs.field(factory=dict)
    groups: dict[str, list[int]] = attrs.field(factory=dict)


def simulate(
    trace: Trace,
    model: UpstreamModel,
    *,
    policy: str = "round_robin",
    seed: int = 0,
    keys: Sequence[KeySpec] | None = None,
    options: Mapping[str, Any] | None = None,
    recorded: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
    timeline_keys: int = 0,
    timeline_buckets: int = 200,
) -> RunResult:
    """Replay ``trace`` through a fresh pool against the simulated upstream.

    ``keys`` defaults to :func:`pool_keys`; ``options`` are extra
    ``PoolConfig`` fields; ``recorded`` re-issues the recorded answers
    (default: the model's ``recorded``); ``progress(done, total)`` is called
    every 4,096 arrivals; ``timeline_keys`` keys (in pool order) get their
    sends counted in ``timeline_buckets`` time buckets, for plots.
    """
    replay = _Replay(
        trace,
        model,
        policy=policy,
        seed=seed,
        keys=keys,
        options=options,
        recorded=recorded,
        timeline_keys=timeline_keys,
        timeline_buckets=timeline_buckets,
    )
    replay.run(progress)
    return replay.collect()


class _Replay:
    """One replay of a trace with one policy, in parts.

    - setup (``__init__``): the pool, the upstream model, the metrics' flat lists;
    - :meth:`run`, the event loop: the next of an arrival, a heap item (an
      answer, a body end, a probe answer, a cancellation) or a ``Tick`` at
      ``pool.next_deadline()``. It holds the two hot paths inlined (an arrival
      sent at once to a plain key; a 200 delivered with its body, on a request
      that never failed or waited) and hands everything else to the parts below;
    - answers (:meth:`_answer`: errors, transport failures, other statuses),
      finishing (:meth:`_finish`), timers (:meth:`_tick`, :meth:`_probe_answered`,
      :meth:`_cancel`);
    - the pool's decisions (:meth:`_decide` and one method per decision), which
      keep the metrics, and the failure episodes (:meth:`_episode_open`, ...);
    - :meth:`collect`: the ``RunResult``.

    Per request in flight, a list indexed by the ``_REC`` .. ``_FWAIT`` slots.
    """

    __slots__ = (
        "bucket",
        "client_errors",
        "counts",
        "end_time",
        "episode",
        "episodes",
        "epoch",
        "ever_unhealthy",
        "fail_last",
        "fail_sends",
        "first_fail",
        "fo_err",
        "fo_extra",
        "fo_immediate",
        "fo_overhead",
        "fo_waited",
        "groups",
        "handle",
        "heap",
        "ids",
        "index",
        "load",
        "ok200",
        "open",
        "plain",
        "policy",
        "pool",
        "queue_waits",
        "r429",
        "records",
        "rf",
        "rr",
        "send_upstream",
        "sends",
        "seq",
        "served",
        "spend",
        "state_changes",
        "statuses",
        "timeline",
        "timeline_buckets",
        "ttfb",
        "unusable",
        "upstream",
    )

    def __init__(
        self,
        trace: Trace,
        model: UpstreamModel,
        *,
        policy: str,
        seed: int,
        keys: Sequence[KeySpec] | None,
        options: Mapping[str, Any] | None,
        recorded: bool | None,
        timeline_keys: int,
        timeline_buckets: int,
    ) -> None:
        # The pool and the simulated (or recorded) upstream.
        specs = list(keys) if keys is not None else pool_keys(trace.header, model)
        config = PoolConfig(keys=specs, policy=policy, seed=seed, **dict(options or {}))  # type: ignore[arg-type]
        self.policy = policy
        self.pool = pool = Pool(config)
        self.handle = pool.handle
        self.ids = ids = [s.key_id for s in specs]
        self.index = {key_id: i for i, key_id in enumerate(ids)}
        use_recorded = model.recorded if recorded is None else recorded
        # Absolute times in answers (X-RateLimit-Reset, Retry-After dates) are read
        # on a wall clock: in recorded mode the recording's own (the header's
        # wall_start, when it has one), else the virtual one from EPOCH.
        wall_start = trace.header.wall_start
        epoch = wall_start if use_recorded and wall_start is not None else EPOCH
        self.epoch = epoch
        upstream = (RecordedUpstream if use_recorded else SimulatedUpstream)(
            model, ids, seed, accounts={s.key_id: s.account for s in specs}, epoch=epoch
        )
        self.upstream = upstream
        self.send_upstream = upstream.send
        self.plain = [upstream.plain_latency(key_id) for key_id in ids]
        self.records = trace.records
        # The event heap, the requests in flight, the two reused events.
        self.heap: list[tuple[Any, ...]] = []
        self.seq = count().__next__
        self.open: dict[str, list[Any]] = {}
        self.rr = ResponseReceived(request_id="", now=0.0, status=200)
        self.rf = ResponseFinished(request_id="", now=0.0)
        # The metrics: per key (index of ``ids``), per request, in total.
        n_keys = len(ids)
        self.sends = [0] * n_keys
        self.served = [0] * n_keys
        self.spend = [0.0] * n_keys
        self.r429 = [0] * n_keys
        self.unusable = [False] * n_keys
        self.ever_unhealthy = [False] * n_keys
        self.first_fail: list[float | None] = [None] * n_keys
        self.fail_sends = [0] * n_keys  # sends since the key's first failure (before it is out)
        self.fail_last: list[float | None] = [None] * n_keys
        self.episode: list[list[Any] | None] = [None] * n_keys
        self.episodes: list[dict[str, Any]] = []
        self.statuses: dict[str, int] = {}
        self.client_errors: dict[str, int] = {}
        self.queue_waits: list[float] = []
        self.ttfb: list[float] = []
        self.fo_extra: list[float] = []
        self.fo_overhead: list[float] = []
        self.fo_err: list[float] = []
        self.fo_immediate: list[float] = []  # added latency beyond error round trips, no wait
        self.fo_waited = [0, 0]  # failed over into the queue: no key usable / a key usable
        self.state_changes: list[tuple[float, int, str]] = []
        self.groups: dict[str, list[int]] = {}
        self.timeline_buckets = timeline_buckets
        self.bucket = (trace.duration or 1.0) / timeline_buckets
        self.load = {i: [0] * (timeline_buckets + 2) for i in range(min(timeline_keys, n_keys))}
        self.timeline = bool(self.load)
        # delivered, rejected, cancelled, probes (the hot paths count theirs in run())
        self.counts = [0, 0, 0, 0]
        self.ok200 = 0  # 200s delivered on the hot path (added to statuses["200"] at the end)
        self.end_time = 0.0

    # ------------------------------------------------------------ event loop

    def run(self, progress: Callable[[int, int], None] | None) -> None:
        """Feed the whole trace, then every answer, body end and timer it leads to."""
        pool = self.pool
        handle = self.handle
        next_deadline = pool.next_deadline
        heap = self.heap
        seq = self.seq
        open_ = self.open
        rr = self.rr
        rf = self.rf
        records = self.records
        index = self.index
        plain = self.plain
        upstream = self.upstream
        send_upstream = self.send_upstream
        stream_rate = upstream.stream_rate
        first_fail = self.first_fail
        episode = self.episode
        sends = self.sends
        served = self.served
        spend = self.spend
        ttfb = self.ttfb
        timeline = self.timeline
        decide = self._decide
        answer = self._answer
        tick = self._tick
        total = len(records)
        inf = math.inf
        ok200 = 0  # answers and deliveries counted on the hot path
        i = 0
        next_arrival = records[0].t if total else inf
        now = 0.0
        step = 4096
        while True:
            t_heap = heap[0][0] if heap else inf
            upcoming = next_arrival if next_arrival < t_heap else t_heap
            deadline = next_deadline()
            if deadline is not None and deadline < upcoming:
                if upcoming == inf and not open_:
                    break
                now = deadline
                tick(now)
                continue
            if upcoming == inf or (i >= total and not open_):
                break
            if t_heap <= next_arrival:
                item = heappop(heap)
                now = item[0]
                kind = item[2]
                if kind == _ANSWER:
                    rid = item[3]
                    st = open_.get(rid)
                    if st is None or st[_ATTEMPT] != item[4]:
                        continue  # cancelled meanwhile
                    ans = item[6]
                    st[_ANS] = ans
                    idx = item[5]
                    if ans[0] != 200 or ans[2] is not None:
                        answer(rid, st, idx, ans, now)
                        continue
                    if first_fail[idx] is not None and episode[idx] is None:
                        self._clear_failure(idx)
                    _RR_ID(rr, rid)
                    _RR_NOW(rr, now)
                    decisions = handle(rr)
                    rec = st[_REC]
                    if (
                        len(decisions) == 1
                        and ans[5] == 0.0
                        and not st[_FAILED]
                        and not st[_QWAIT]
                        and rec.group is None
                        and type(decisions[0]) is Deliver
                        and decisions[0].request_id == rid
                    ):  # the hot path: _deliver() and _finish() inlined
                        ok200 += 1
                        ttfb.append(now - st[_ARRIVAL])
                        del open_[rid]
                        cost = ans[6]
                        served[idx] += 1
                        spend[idx] += cost
                        _RF_ID(rf, rid)
                        _RF_NOW(rf, now)
                        _RF_COST(rf, cost)
                        _RF_PROMPT(rf, rec.prompt_tokens)
                        _RF_COMPLETION(rf, rec.completion_tokens)
                        more = handle(rf)
                        if more:
                            decide(more, now)
                        continue
                    statuses = self.statuses
                    statuses["200"] = statuses.get("200", 0) + 1
                    decide(decisions, now)
                elif kind == _FINISH:
                    rid = item[3]
                    st = open_.get(rid)
                    if st is not None:
                        self._finish(rid, st, item[4], now)
                elif kind == _PROBE:
                    self._probe_answered(item, now)
                else:
                    self._cancel(item[3], now)
            else:  # an arrival
                rec = records[i]
                now = next_arrival
                rid = f"r{i}"
                i += 1
                next_arrival = records[i].t if i < total else inf
                tokens = rec.prompt_tokens + rec.completion_tokens
                ev = request_started(rid, now, None, True, rec.session, rec.group, None, tokens)
                open_[rid] = state = [rec, now, now, 0.0, now, 0.0, 0, 0, None, 0, 0.0]
                if rec.cancel_after is not None:
                    heappush(heap, (now + rec.cancel_after, seq(), _CANCEL, rid))
                decisions = handle(ev)
                if (
                    len(decisions) == 1
                    and type(d := decisions[0]) is Send
                    and d.request_id == rid
                    and not timeline
                    and first_fail[idx := index[d.key_id]] is None
                ):  # the hot path: _send() inlined
                    sends[idx] += 1
                    draw = plain[idx]
                    if draw is not None:  # send_upstream(), inlined for a plain key
                        cost = rec.cost
                        ans = (
                            200,
                            draw(),
                            None,
                            None,
                            None,
                            rec.completion_tokens / stream_rate if rec.stream else 0.0,
                            upstream.cost(rec) if cost is None else cost,
                        )
                    else:
                        ans = send_upstream(d.key_id, now, rec, 1)
                    state[_ATTEMPT] = 1
                    heappush(heap, (now + ans[1], seq(), _ANSWER, rid, 1, idx, ans))
                else:
                    decide(decisions, now)
                if progress is not None and i % step == 0:
                    progress(i, total)
        if progress is not None:
            progress(total, total)
        self.ok200 += ok200
        self.end_time = now

    # ----------------------------------------------------- answers and timers

    def _answer(self, rid: str, st: list[Any], idx: int, ans: tuple[Any, ...], now: float) -> None:
        """An upstream answer off the hot path: an error status, no answer at
        all (a transport failure), or a success with headers or another 2xx."""
        status = ans[0]
        if status is None:
            name = f"no_response_{ans[4]}"
            event: Any = TransportFailed(request_id=rid, now=now, reason=ans[4])
        else:
            name = str(status)
            event = ResponseReceived(
                request_id=rid,
                now=now,
                status=status,
                headers=ans[2],
                body=ans[3],
                wall_time=self.epoch + now,
            )
        first_fail = self.first_fail
        failed = status is None or status >= 300
        if failed:
            if first_fail[idx] is None:
                first_fail[idx] = now
            st[_ERR] += now - st[_SENT]
            st[_FAILED] += 1
            st[_READY] = now
            if status == 429:
                self.r429[idx] += 1
        elif first_fail[idx] is not None and self.episode[idx] is None:
            self._clear_failure(idx)
        decisions = self.handle(event)
        statuses = self.statuses
        statuses[name] = statuses.get(name, 0) + 1
        self._decide(decisions, now)
        if failed and rid in self.open and st[_SENT] != now and not st[_WAITED]:
            # failed over into the queue: could any key have taken it?
            st[_WAITED] = 2 if self.pool.usable_now() else 1

    def _finish(self, rid: str, st: list[Any], idx: int, now: float) -> None:
        """A delivered answer's body ended: the request is served."""
        del self.open[rid]
        rec = st[_REC]
        cost = st[_ANS][6]
        self.served[idx] += 1
        self.spend[idx] += cost
        rf = self.rf
        _RF_ID(rf, rid)
        _RF_NOW(rf, now)
        _RF_COST(rf, cost)
        _RF_PROMPT(rf, rec.prompt_tokens)
        _RF_COMPLETION(rf, rec.completion_tokens)
        more = self.handle(rf)
        if more:
            self._decide(more, now)

    def _tick(self, now: float) -> None:
        """The pool's next deadline came before any other event."""
        self._decide(self.handle(Tick(now=now)), now)

    def _probe_answered(self, item: tuple[Any, ...], now: float) -> None:
        self._decide(
            self.handle(ProbeFinished(key_id=item[3], now=now, status=item[4], body=item[5])),
            now,
        )

    def _cancel(self, rid: str, now: float) -> None:
        """The caller gives up (``cancel_after``), if the request is still open.

        The pool first does what was due at this instant: its queue deadline
        may reject the request (then it ends rejected, not cancelled), or a key
        that pacing frees may be given to it (a ``Send`` the pool takes back as
        it cancels: dropped, as the transports' driver drops decisions for a
        request its caller has closed)."""
        if rid not in self.open:
            return
        decisions = self.handle(RequestCancelled(request_id=rid, now=now))
        if not any(type(d) is Reject and d.request_id == rid for d in decisions):
            del self.open[rid]
            self.counts[2] += 1
            decisions = [d for d in decisions if getattr(d, "request_id", None) != rid]
        self._decide(decisions, now)

    # ------------------------------------------------------------- decisions

    def _decide(self, decisions: list[Any], now: float) -> None:
        """Carry out the pool's decisions, in order, keeping the metrics."""
        for d in decisions:
            tp = type(d)
            if tp is Send:
                self._send(d, now)
            elif tp is Deliver:
                self._deliver(d, now)
            elif tp is KeyStateChanged:
                self._key_state_changed(d, now)
            elif tp is Reject:
                del self.open[d.request_id]
                self.counts[1] += 1
                name = str(d.status)
                self.client_errors[name] = self.client_errors.get(name, 0) + 1
            elif tp is Probe:
                self.counts[3] += 1
                status, body, delay = self.upstream.probe(d.key_id, now)
                heappush(self.heap, (now + delay, self.seq(), _PROBE, d.key_id, status, body))

    def _send(self, d: Send, now: float) -> None:
        rid = d.request_id
        st = self.open[rid]
        idx = self.index[d.key_id]
        self.sends[idx] += 1
        if self.first_fail[idx] is not None:  # sent to a key that has failed
            ep = self.episode[idx]
            if ep is None:  # failing, not yet out of service (5xx, timeouts)
                self.fail_sends[idx] += 1
                self.fail_last[idx] = now
            elif self.unusable[idx]:  # out of service: the core must never do this
                ep[3] += 1
                ep[4] = now
                ep[5] += 1
        load = self.load
        if self.timeline and idx in load:  # sends after the last arrival: the last bucket
            load[idx][min(int(now / self.bucket), self.timeline_buckets + 1)] += 1
        wait = now - st[_READY]
        attempt = d.attempt
        if wait > 0.0:
            st[_QWAIT] += wait
            if attempt > 1:
                st[_FWAIT] += wait
        st[_SENT] = now
        st[_ATTEMPT] = attempt
        ans = self.send_upstream(d.key_id, now, st[_REC], attempt)
        heappush(self.heap, (now + ans[1], self.seq(), _ANSWER, rid, attempt, idx, ans))

    def _deliver(self, d: Deliver, now: float) -> None:
        rid = d.request_id
        st = self.open[rid]
        ans = st[_ANS]
        self.counts[0] += 1
        if 200 <= d.status < 300:
            self.ttfb.append(now - st[_ARRIVAL])
            if st[_FAILED]:
                self.fo_extra.append(st[_ERR] + st[_FWAIT])
                self.fo_err.append(st[_ERR])
                self.fo_overhead.append(st[_FWAIT])
                waited = st[_WAITED]
                if waited:
                    self.fo_waited[waited - 1] += 1
                else:
                    self.fo_immediate.append(st[_FWAIT])
            if st[_QWAIT]:
                self.queue_waits.append(st[_QWAIT])
            group = st[_REC].group
            if group is not None:
                self.groups.setdefault(group, []).append(self.index[d.key_id])
            duration = ans[5]
            idx = self.index[d.key_id]
            if duration > 0.0:
                heappush(self.heap, (now + duration, self.seq(), _FINISH, rid, idx))
            else:  # the body came with the headers: finish now
                self._finish(rid, st, idx, now)
        else:  # an error answer delivered: the caller has it, the key is free
            name = str(d.status)
            self.client_errors[name] = self.client_errors.get(name, 0) + 1
            del self.open[rid]
            rf = self.rf
            _RF_ID(rf, rid)
            _RF_NOW(rf, now)
            _RF_COST(rf, 0.0)
            _RF_PROMPT(rf, 0)
            _RF_COMPLETION(rf, 0)
            self._decide(self.handle(rf), now)

    def _key_state_changed(self, d: KeyStateChanged, now: float) -> None:
        idx = self.index[d.key_id]
        new = d.new
        self.state_changes.append((now, idx, new.value))
        if new in _USABLE:
            self.unusable[idx] = False
            if new is _HEALTHY and self.episode[idx] is not None:
                self._episode_close(idx, now)
                self._clear_failure(idx)
        else:
            self.unusable[idx] = True
            if self.episode[idx] is None:
                self._episode_open(idx, now, d.reason)
        if new is not _HEALTHY:
            self.ever_unhealthy[idx] = True

    # -------------------------------------------------------------- episodes

    def _episode_open(self, idx: int, now: float, reason: str) -> None:
        first = self.first_fail[idx]
        if first is None:
            self.first_fail[idx] = now
            self.episode[idx] = [now, now, reason, 0, None, 0]
        else:  # first failure, out of service, reason, sends since the failure, last one,
            # and sends while out of service (the core must never make one)
            self.episode[idx] = [first, now, reason, self.fail_sends[idx], self.fail_last[idx], 0]

    def _episode_close(self, idx: int, now: float | None) -> None:
        ep = self.episode[idx]
        assert ep is not None
        start, out_at, reason, after, last, out_sends = ep
        self.episodes.append(
            {
                "key": self.ids[idx],
                "reason": reason,
                "first_failure": start,
                "out_of_service": out_at,
                "sends_after_failure": after,
                "sends_out_of_service": out_sends,
                "failover_latency": 0.0 if last is None else last - start,
                "time_to_recover": None if now is None else now - start,
            }
        )
        self.episode[idx] = None

    def _clear_failure(self, idx: int) -> None:
        self.first_fail[idx] = None
        self.fail_sends[idx] = 0
        self.fail_last[idx] = None

    # --------------------------------------------------------------- metrics

    def collect(self) -> RunResult:
        """The run's ``RunResult`` (call once, after :meth:`run`)."""
        for idx in range(len(self.ids)):
            if self.episode[idx] is not None:
                self._episode_close(idx, None)
        statuses = self.statuses
        if self.ok200:
            statuses["200"] = statuses.get("200", 0) + self.ok200
        stats = self.pool.statistics()
        delivered, rejected, cancelled, probes = self.counts
        return RunResult(
            policy=self.policy,
            keys=self.ids,
            requests=len(self.records),
            delivered=delivered + self.ok200,
            served=sum(self.served),
            client_errors=self.client_errors,
            rejected=rejected,
            cancelled=cancelled,
            lost=len(self.open),
            upstream_statuses=statuses,
            probes=probes,
            sends=self.sends,
            served_by_key=self.served,
            spend=self.spend,
            upstream_429=self.r429,
            ever_unhealthy=self.ever_unhealthy,
            final_states=[k.state.value for k in stats.keys],
            episodes=self.episodes,
            queue_waits=self.queue_waits,
            ttfb=self.ttfb,
            failover_extra=self.fo_extra,
            failover_overhead=self.fo_overhead,
            failover_error_rtt=self.fo_err,
            failover_immediate=self.fo_immediate,
            failover_waited_no_key=self.fo_waited[0],
            failover_waited_key_usable=self.fo_waited[1],
            end_time=self.end_time,
            state_changes=self.state_changes,
            load=self.load,
            bucket=self.bucket,
            pool_statistics={
                "started": stats.started,
                "delivered": stats.delivered,
                "rejected": stats.rejected,
                "cancelled": stats.cancelled,
                "in_flight": stats.in_flight,
                "queued": stats.queued,
            },
            groups=self.groups,
        )
