"""The replay engine: a discrete-event loop feeding ``keyrotor.core.Pool``.

A heap of (virtual time, sequence, kind, ...) holds upstream answers, body
ends, probe answers and cancellations; arrivals come from the trace in order.
Before each step the engine feeds ``Tick`` at ``pool.next_deadline()`` when that
comes first. No sleeping, no sockets, no wall clock: the same trace, model and
seed give the same decisions and the same numbers.

Hot path notes (the target is 100,000 simulated requests per second for a
4-key pool): a successful answer and a body end are fed through two event
objects reused for every request (the core keeps neither), ``RequestStarted``
is built without its keyword ``__init__``, and metrics are kept in flat lists.
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
    RequestStarted,
    ResponseFinished,
    ResponseReceived,
    Send,
    Tick,
    TransportFailed,
)
from .trace import Trace, TraceHeader
from .upstream import EPOCH, RecordedUpstream, SimulatedUpstream, UpstreamModel

__all__ = ["RunResult", "pool_keys", "simulate"]

_ANSWER, _FINISH, _PROBE, _CANCEL = 0, 1, 2, 3
# Request state slots (a list per request in flight).
_REC, _ARRIVAL, _READY, _QWAIT, _SENT, _ERR, _ATTEMPT, _FAILED, _ANS, _WAITED, _FWAIT = range(11)

_USABLE = (KeyState.HEALTHY, KeyState.RECOVERING)
_HEALTHY = KeyState.HEALTHY

_new = object.__new__
# The engine builds RequestStarted through its slots and reuses one
# ResponseReceived and one ResponseFinished (the core keeps neither:
# keyrotor/core/events.py). Fail at import, not with a half-built event, if
# those classes ever gain a field this code does not set.
_SET = {
    RequestStarted: (
        "request_id", "now", "pin", "pin_fallback", "session", "group", "deadline", "tokens"
    ),
    ResponseReceived: (
        "request_id", "now", "status", "retry_after", "headers", "body", "wall_time"
    ),
    ResponseFinished: (
        "request_id", "now", "cost", "prompt_tokens", "completion_tokens", "error_status",
        "error_body",
    ),
}  # fmt: skip
for _cls, _names in _SET.items():
    if tuple(f.name for f in attrs.fields(_cls)) != _names:  # pragma: no cover
        raise ImportError(f"keyrotor.replay.engine does not know {_cls.__name__}'s fields")
_RS = [
    RequestStarted.__dict__[name].__set__
    for name in ("request_id", "now", "pin", "pin_fallback", "session", "group", "deadline")
]
_RS_TOKENS = RequestStarted.__dict__["tokens"].__set__
_RR_ID = ResponseReceived.__dict__["request_id"].__set__
_RR_NOW = ResponseReceived.__dict__["now"].__set__
_RR_STATUS = ResponseReceived.__dict__["status"].__set__
_RF_ID = ResponseFinished.__dict__["request_id"].__set__
_RF_NOW = ResponseFinished.__dict__["now"].__set__
_RF_COST = ResponseFinished.__dict__["cost"].__set__
_RF_PROMPT = ResponseFinished.__dict__["prompt_tokens"].__set__
_RF_COMPLETION = ResponseFinished.__dict__["completion_tokens"].__set__


def _any_usable(pool: Pool, specs: Sequence[KeySpec]) -> bool:
    """Could some key take a request now? (Healthy under its in-flight limit, or
    recovering with no trial in flight; keys paced by rpm/tpm count as busy.)"""
    for spec, key in zip(specs, pool.statistics().keys, strict=False):
        if spec.rpm is not None or spec.tpm is not None:
            continue
        if key.state is _HEALTHY and (
            spec.max_in_flight is None or key.in_flight < spec.max_in_flight
        ):
            return True
        if key.state is KeyState.RECOVERING and not key.in_flight:
            return True
    return False


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
    specs = list(keys) if keys is not None else pool_keys(trace.header, model)
    config = PoolConfig(keys=specs, policy=policy, seed=seed, **dict(options or {}))  # type: ignore[arg-type]
    pool = Pool(config)
    ids = [s.key_id for s in specs]
    index = {key_id: i for i, key_id in enumerate(ids)}
    use_recorded = model.recorded if recorded is None else recorded
    upstream = (RecordedUpstream if use_recorded else SimulatedUpstream)(model, ids, seed)
    send_upstream = upstream.send
    plain = [upstream.plain_latency(key_id) for key_id in ids]
    stream_rate = upstream.stream_rate
    records = trace.records
    total = len(records)
    n_keys = len(ids)
    result = RunResult(policy=policy, keys=ids, requests=total)
    sends = [0] * n_keys
    served = [0] * n_keys
    spend = [0.0] * n_keys
    r429 = [0] * n_keys
    unusable = [False] * n_keys
    ever_unhealthy = [False] * n_keys
    first_fail: list[float | None] = [None] * n_keys
    fail_sends = [0] * n_keys  # sends since the key's first failure (before it is out)
    fail_last: list[float | None] = [None] * n_keys
    episode: list[list[Any] | None] = [None] * n_keys
    episodes: list[dict[str, Any]] = []
    statuses: dict[str, int] = {}
    client_errors: dict[str, int] = {}
    queue_waits: list[float] = []
    ttfb: list[float] = []
    fo_extra: list[float] = []
    fo_overhead: list[float] = []
    fo_err: list[float] = []
    fo_immediate: list[float] = []  # added latency beyond error round trips, no wait
    fo_waited = [0, 0]  # failed over into the queue: no key usable / a key usable
    state_changes: list[tuple[float, int, str]] = []
    groups: dict[str, list[int]] = {}
    bucket = (trace.duration or 1.0) / timeline_buckets
    load = {i: [0] * (timeline_buckets + 2) for i in range(min(timeline_keys, n_keys))}
    timeline = bool(load)
    counters = {"delivered": 0, "rejected": 0, "cancelled": 0, "probes": 0}

    handle = pool.handle
    next_deadline = pool.next_deadline
    heap: list[tuple[Any, ...]] = []
    seq = count().__next__
    open_: dict[str, list[Any]] = {}
    rr = ResponseReceived(request_id="", now=0.0, status=200)
    rf = ResponseFinished(request_id="", now=0.0)

    def episode_open(idx: int, now: float, reason: str) -> None:
        first = first_fail[idx]
        if first is None:
            first_fail[idx] = now
            episode[idx] = [now, now, reason, 0, None, 0]
        else:  # first failure, out of service, reason, sends since the failure, last one,
            # and sends while out of service (the core must never make one)
            episode[idx] = [first, now, reason, fail_sends[idx], fail_last[idx], 0]

    def episode_close(idx: int, now: float | None) -> None:
        ep = episode[idx]
        assert ep is not None
        start, out_at, reason, after, last, out_sends = ep
        episodes.append(
            {
                "key": ids[idx],
                "reason": reason,
                "first_failure": start,
                "out_of_service": out_at,
                "sends_after_failure": after,
                "sends_out_of_service": out_sends,
                "failover_latency": 0.0 if last is None else last - start,
                "time_to_recover": None if now is None else now - start,
            }
        )
        episode[idx] = None

    def clear_failure(idx: int) -> None:
        first_fail[idx] = None
        fail_sends[idx] = 0
        fail_last[idx] = None

    def process(decisions: list[Any], now: float) -> None:
        for d in decisions:
            tp = type(d)
            if tp is Send:
                rid = d.request_id
                st = open_[rid]
                idx = index[d.key_id]
                sends[idx] += 1
                if first_fail[idx] is not None:  # sent to a key that has failed
                    ep = episode[idx]
                    if ep is None:  # failing, not yet out of service (5xx, timeouts)
                        fail_sends[idx] += 1
                        fail_last[idx] = now
                    elif unusable[idx]:  # out of service: the core must never do this
                        ep[3] += 1
                        ep[4] = now
                        ep[5] += 1
                if timeline and idx in load:  # sends after the last arrival: the last bucket
                    load[idx][min(int(now / bucket), timeline_buckets + 1)] += 1
                wait = now - st[_READY]
                attempt = d.attempt
                if wait > 0.0:
                    st[_QWAIT] += wait
                    if attempt > 1:
                        st[_FWAIT] += wait
                st[_SENT] = now
                st[_ATTEMPT] = attempt
                ans = send_upstream(d.key_id, now, st[_REC], attempt)
                heappush(heap, (now + ans[1], seq(), _ANSWER, rid, attempt, idx, ans))
            elif tp is Deliver:
                rid = d.request_id
                st = open_[rid]
                ans = st[_ANS]
                counters["delivered"] += 1
                if 200 <= d.status < 300:
                    arrival = st[_ARRIVAL]
                    ttfb.append(now - arrival)
                    if st[_FAILED]:
                        fo_extra.append(st[_ERR] + st[_FWAIT])
                        fo_err.append(st[_ERR])
                        fo_overhead.append(st[_FWAIT])
                        waited = st[_WAITED]
                        if waited:
                            fo_waited[waited - 1] += 1
                        else:
                            fo_immediate.append(st[_FWAIT])
                    if st[_QWAIT]:
                        queue_waits.append(st[_QWAIT])
                    group = st[_REC].group
                    if group is not None:
                        groups.setdefault(group, []).append(index[d.key_id])
                    duration = ans[5]
                    idx = index[d.key_id]
                    if duration > 0.0:
                        heappush(heap, (now + duration, seq(), _FINISH, rid, idx))
                    else:  # the body came with the headers: finish now
                        finish(rid, st, idx, now)
                else:
                    name = str(d.status)
                    client_errors[name] = client_errors.get(name, 0) + 1
                    del open_[rid]
                    _RF_ID(rf, rid)
                    _RF_NOW(rf, now)
                    _RF_COST(rf, 0.0)
                    _RF_PROMPT(rf, 0)
                    _RF_COMPLETION(rf, 0)
                    process(handle(rf), now)
            elif tp is KeyStateChanged:
                idx = index[d.key_id]
                new = d.new
                state_changes.append((now, idx, new.value))
                if new in _USABLE:
                    unusable[idx] = False
                    if new is _HEALTHY and episode[idx] is not None:
                        episode_close(idx, now)
                        clear_failure(idx)
                else:
                    unusable[idx] = True
                    if episode[idx] is None:
                        episode_open(idx, now, d.reason)
                if new is not _HEALTHY:
                    ever_unhealthy[idx] = True
            elif tp is Reject:
                rid = d.request_id
                st = open_.pop(rid)
                counters["rejected"] += 1
                name = str(d.status)
                client_errors[name] = client_errors.get(name, 0) + 1
            elif tp is Probe:
                counters["probes"] += 1
                status, body, delay = upstream.probe(d.key_id, now)
                heappush(heap, (now + delay, seq(), _PROBE, d.key_id, status, body))

    def finish(rid: str, st: list[Any], idx: int, now: float) -> None:
        del open_[rid]
        rec = st[_REC]
        cost = st[_ANS][6]
        served[idx] += 1
        spend[idx] += cost
        _RF_ID(rf, rid)
        _RF_NOW(rf, now)
        _RF_COST(rf, cost)
        _RF_PROMPT(rf, rec.prompt_tokens)
        _RF_COMPLETION(rf, rec.completion_tokens)
        more = handle(rf)
        if more:
            process(more, now)

    set_id, set_now, set_pin, set_fallback, set_session, set_group, set_deadline = _RS
    set_tokens = _RS_TOKENS
    inf = math.inf
    ok200 = 0  # answers and deliveries counted on the inlined path
    counters_delivered = 0
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
            process(handle(Tick(now=now)), now)
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
                status = ans[0]
                idx = item[5]
                if status == 200 and ans[2] is None:
                    if first_fail[idx] is not None and episode[idx] is None:
                        clear_failure(idx)
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
                    ):  # the common case: process() and finish() inlined (the hot path)
                        ok200 += 1
                        counters_delivered += 1
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
                            process(more, now)
                        continue
                    name = "200"
                else:
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
                            wall_time=EPOCH + now,
                        )
                    if status is None or status >= 300:
                        if first_fail[idx] is None:
                            first_fail[idx] = now
                        st[_ERR] += now - st[_SENT]
                        st[_FAILED] += 1
                        st[_READY] = now
                        if status == 429:
                            r429[idx] += 1
                    elif first_fail[idx] is not None and episode[idx] is None:
                        clear_failure(idx)
                    decisions = handle(event)
                    if status is None or status >= 300:
                        statuses[name] = statuses.get(name, 0) + 1
                        process(decisions, now)
                        if rid in open_ and st[_SENT] != now and not st[_WAITED]:
                            # failed over into the queue: could any key have taken it?
                            st[_WAITED] = 2 if _any_usable(pool, specs) else 1
                        continue
                statuses[name] = statuses.get(name, 0) + 1
                process(decisions, now)
            elif kind == _FINISH:
                rid = item[3]
                st = open_.get(rid)
                if st is not None:
                    finish(rid, st, item[4], now)
            elif kind == _PROBE:
                process(
                    handle(ProbeFinished(key_id=item[3], now=now, status=item[4], body=item[5])),
                    now,
                )
            else:
                rid = item[3]
                if rid in open_:
                    del open_[rid]
                    counters["cancelled"] += 1
                    process(handle(RequestCancelled(request_id=rid, now=now)), now)
        else:
            rec = records[i]
            now = next_arrival
            rid = f"r{i}"
            i += 1
            next_arrival = records[i].t if i < total else inf
            ev = _new(RequestStarted)  # RequestStarted(...) without the keyword __init__
            set_id(ev, rid)
            set_now(ev, now)
            set_pin(ev, None)
            set_fallback(ev, True)
            set_session(ev, rec.session)
            set_group(ev, rec.group)
            set_deadline(ev, None)
            set_tokens(ev, rec.prompt_tokens + rec.completion_tokens)
            open_[rid] = state = [rec, now, now, 0.0, now, 0.0, 0, 0, None, 0, 0.0]
            if rec.cancel_after is not None:
                heappush(heap, (now + rec.cancel_after, seq(), _CANCEL, rid))
            decisions = handle(ev)
            if (
                len(decisions) == 1
                and type(d := decisions[0]) is Send
                and d.request_id == rid
                and not timeline
            ):
                idx = index[d.key_id]  # the common case, process() inlined
                if first_fail[idx] is None:
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
                    process(decisions, now)
            else:
                process(decisions, now)
            if progress is not None and i % step == 0:
                progress(i, total)
    if progress is not None:
        progress(total, total)

    for idx in range(n_keys):
        if episode[idx] is not None:
            episode_close(idx, None)
    if ok200:
        statuses["200"] = statuses.get("200", 0) + ok200
    stats = pool.statistics()
    result.delivered = counters["delivered"] + counters_delivered
    result.rejected = counters["rejected"]
    result.cancelled = counters["cancelled"]
    result.probes = counters["probes"]
    result.served = sum(served)
    result.lost = len(open_)
    result.client_errors = client_errors
    result.upstream_statuses = statuses
    result.sends = sends
    result.served_by_key = served
    result.spend = spend
    result.upstream_429 = r429
    result.ever_unhealthy = ever_unhealthy
    result.final_states = [k.state.value for k in stats.keys]
    result.episodes = episodes
    result.queue_waits = queue_waits
    result.ttfb = ttfb
    result.failover_extra = fo_extra
    result.failover_overhead = fo_overhead
    result.failover_error_rtt = fo_err
    result.failover_immediate = fo_immediate
    result.failover_waited_no_key = fo_waited[0]
    result.failover_waited_key_usable = fo_waited[1]
    result.end_time = now
    result.groups = groups
    result.state_changes = state_changes
    result.load = load
    result.bucket = bucket
    result.pool_statistics = {
        "started": stats.started,
        "delivered": stats.delivered,
        "rejected": stats.rejected,
        "cancelled": stats.cancelled,
        "in_flight": stats.in_flight,
        "queued": stats.queued,
    }
    return result
