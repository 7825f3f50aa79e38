"""Property tests of the pool: random event sequences, invariants checked at every step."""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from keyrotor.core import (
    POLICIES,
    USABLE_STATES,
    AttemptHeld,
    Decision,
    Deliver,
    KeyAdded,
    KeyMarked,
    KeyRemoved,
    KeySpec,
    KeyState,
    KeyStateChanged,
    Pool,
    PoolConfig,
    Probe,
    ProbeFinished,
    ProbeRequested,
    Reject,
    RequestCancelled,
    RequestStarted,
    ResponseFinished,
    ResponseReceived,
    Send,
    SpendRecorded,
    Tick,
    TransportFailed,
)

SHARED_POOL = {
    "error": {"code": 429, "metadata": {"limit_source": "upstream_provider_shared_pool"}}
}
IN_FLIGHT = {"error": {"code": 402, "metadata": {"limit_source": "openrouter_in_flight_budget"}}}
FREE_MIN = {"error": {"code": 429, "message": "Rate limit exceeded: free-models-per-min"}}

# (status, retry_after, body)
ANSWERS = st.sampled_from(
    [
        (200, None, None),
        (200, None, None),
        (200, None, None),
        (400, None, None),
        (401, None, None),
        (402, None, None),
        (402, 5.0, IN_FLIGHT),
        (429, None, None),
        (429, 3.0, None),
        (429, 40.0, FREE_MIN),
        (429, None, SHARED_POOL),
        (500, None, None),
        (502, None, None),
        (503, 2.0, None),
    ]
)
USABLE = {KeyState.HEALTHY.value, KeyState.RECOVERING.value}


class PoolMachine(RuleBasedStateMachine):
    """Drives a pool with random events; a mirror built from the decisions alone
    checks the pool's promises, and a twin that is never restored from a
    snapshot checks that restore and replay change nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.events: list[Any] = []
        self.outputs: list[list[Decision]] = []
        self.serial = 0
        self.key_serial = 0
        self.charged = 0.0  # every cost fed, removed keys' included

    @initialize(
        n_keys=st.integers(1, 5),
        policy=st.sampled_from(POLICIES),
        limits=st.lists(st.sampled_from([None, None, 1, 2]), min_size=5, max_size=5),
        accounts=st.lists(st.sampled_from([None, "x", "y"]), min_size=5, max_size=5),
        max_attempts=st.integers(1, 4),
        min_healthy=st.integers(0, 3),
        seed=st.integers(0, 3),
    )
    def setup(
        self,
        n_keys: int,
        policy: str,
        limits: list[int | None],
        accounts: list[str | None],
        max_attempts: int,
        min_healthy: int,
        seed: int,
    ) -> None:
        specs = [
            KeySpec(
                key_id=f"k{i}",
                weight=1 + i % 3,
                max_in_flight=limits[i],
                account=accounts[i],
                rpm=120.0 if i == 4 else None,
                budget=2.0 if i == 1 else None,
                budget_window=100.0 if i == 1 else None,
            )
            for i in range(n_keys)
        ]
        self.key_serial = n_keys
        self.config = PoolConfig(
            keys=specs,
            policy=policy,  # type: ignore[arg-type]
            max_attempts=max_attempts,
            min_healthy=min_healthy,
            seed=seed,
            queue_timeout=20.0,
            queue_limit=6,
            error_min_requests=3,
        )
        self.pool = Pool(self.config)
        self.twin = Pool(self.config)
        # Fed every plain 2xx with empty headers instead of none: the general
        # path, where the pool takes its fast path for a plain 2xx.
        self.general = Pool(self.config)
        # Mirror, from decisions only.
        self.state = {s.key_id: KeyState.HEALTHY.value for s in specs}
        self.limit = {s.key_id: s.max_in_flight for s in specs}
        self.in_flight = {s.key_id: 0 for s in specs}
        self.not_before: dict[str, float] = {}
        self.removed: set[str] = set()
        self.live: dict[str, str | None] = {}  # request -> key (None: queued)
        self.delivered: set[str] = set()
        self.ended: set[str] = set()
        self.probing: set[str] = set()

    # ------------------------------------------------------------ feeding

    def feed(self, event: Any) -> list[Decision]:
        out = self.pool.handle(event)
        assert self.twin.handle(event) == out, "restored pool diverged from its twin"
        slow = event
        if isinstance(event, ResponseReceived) and event.headers is None:
            slow = attrs.evolve(event, headers={})
        assert self.general.handle(slow) == out, "the plain-2xx fast path differs"
        self.events.append(event)
        self.outputs.append(out)
        note(f"{event!r} -> {out!r}")
        self.check(event, out)
        return out

    def check(self, event: Any, out: list[Decision]) -> None:
        """Apply the decisions to the mirror, checking each promise on the way."""
        # The event itself closes an attempt, unless the response is delivered.
        if isinstance(
            event,
            (ResponseReceived, ResponseFinished, RequestCancelled, TransportFailed, AttemptHeld),
        ):
            rid = event.request_id
            delivered_now = any(isinstance(d, Deliver) and d.request_id == rid for d in out)
            key = self.live[rid]
            if key is not None and not delivered_now:
                self.in_flight[key] -= 1
                self.live[rid] = None
            if isinstance(event, (ResponseFinished, RequestCancelled)) or (
                isinstance(event, TransportFailed) and rid in self.delivered
            ):
                self.end(rid)
        for d in out:
            if isinstance(d, KeyStateChanged):
                assert self.state[d.key_id] == d.old.value, (d, self.state[d.key_id])
                self.state[d.key_id] = d.new.value
                if d.new is KeyState.RATE_LIMITED and d.until is not None:
                    assert d.until >= self.now
            elif isinstance(d, Send):
                assert d.request_id in self.live and d.request_id not in self.delivered
                assert d.key_id not in self.removed
                assert self.state[d.key_id] in USABLE, (d, self.state[d.key_id])
                limit = self.limit[d.key_id]
                assert limit is None or self.in_flight[d.key_id] < limit
                assert self.now >= self.not_before.get(d.key_id, -1.0), "sent during Retry-After"
                self.in_flight[d.key_id] += 1
                self.live[d.request_id] = d.key_id
            elif isinstance(d, Deliver):
                assert self.live.get(d.request_id) == d.key_id
                assert d.request_id not in self.delivered
                self.delivered.add(d.request_id)
            elif isinstance(d, Reject):
                assert d.request_id in self.live and d.request_id not in self.delivered
                assert d.retry_after is None or d.retry_after >= 0
                key = self.live[d.request_id]
                if key is not None:
                    self.in_flight[key] -= 1
                self.end(d.request_id)
            elif isinstance(d, Probe):
                assert d.key_id not in self.probing, "two probes at once"
                self.probing.add(d.key_id)
        if isinstance(event, ResponseReceived) and event.retry_after and event.status == 429:
            key = next(
                (
                    d.key_id
                    for d in out
                    if isinstance(d, KeyStateChanged) and d.new is KeyState.RATE_LIMITED
                ),
                None,
            )
            if key is not None and event.body is None:
                self.not_before[key] = max(
                    self.not_before.get(key, -1.0), event.now + event.retry_after
                )

    def end(self, rid: str) -> None:
        assert rid not in self.ended, f"{rid} ended twice"
        self.ended.add(rid)
        self.live.pop(rid)
        self.delivered.discard(rid)

    # -------------------------------------------------------------- rules

    requests = Bundle("requests")

    @rule(
        target=requests,
        pin=st.sampled_from([None, None, None, "k0", 1, "k9"]),
        fallback=st.booleans(),
        group=st.sampled_from([None, None, "g"]),
        session=st.sampled_from([None, "s1", "s2"]),
    )
    def start(self, pin: Any, fallback: bool, group: str | None, session: str | None) -> str:
        self.serial += 1
        rid = f"r{self.serial}"
        self.live[rid] = None
        self.feed(
            RequestStarted(
                request_id=rid,
                now=self.now,
                pin=pin,
                pin_fallback=fallback,
                group=group,
                session=session,
            )
        )
        return rid

    def sent(self) -> list[str]:
        return sorted(r for r, k in self.live.items() if k is not None and r not in self.delivered)

    @precondition(lambda self: bool(self.sent()))
    @rule(
        data=st.data(),
        answer=ANSWERS,
        headers=st.booleans(),
        dt=st.sampled_from([0.0, 0.0, 0.3, 5.0, 60.0]),
    )
    def respond(
        self, data: st.DataObject, answer: tuple[int, float | None, Any], headers: bool, dt: float
    ) -> None:
        rid = data.draw(st.sampled_from(self.sent()))
        self.now += dt  # responses arrive later: timers fire inside this handle
        status, retry_after, body = answer
        hdrs = {"retry-after": str(int(retry_after))} if headers and retry_after else None
        self.feed(
            ResponseReceived(
                request_id=rid,
                now=self.now,
                status=status,
                retry_after=None if hdrs else retry_after,
                headers=hdrs,
                body=body,
            )
        )

    @precondition(lambda self: bool(self.delivered))
    @rule(
        data=st.data(),
        cost=st.sampled_from([0.0, 0.001]),
        error=st.sampled_from([None, None, 429, 502]),
    )
    def finish(self, data: st.DataObject, cost: float, error: int | None) -> None:
        rid = data.draw(st.sampled_from(sorted(self.delivered)))
        self.now += 0.25
        self.feed(
            ResponseFinished(
                request_id=rid,
                now=self.now,
                cost=cost,
                prompt_tokens=3,
                completion_tokens=4,
                error_status=error,
            )
        )
        self.charged += cost

    @precondition(lambda self: any(k is not None for k in self.live.values()))
    @rule(data=st.data())
    def transport_failure(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(r for r, k in self.live.items() if k is not None)))
        reason = data.draw(st.sampled_from(["reset", "timeout", "connect", "busy", "pool"]))
        self.feed(TransportFailed(request_id=rid, now=self.now, reason=reason))

    @precondition(lambda self: bool(self.sent()))
    @rule(data=st.data(), hold=st.sampled_from([0.01, 1.0, 30.0]))
    def held(self, data: st.DataObject, hold: float) -> None:
        """A shared limit elsewhere holds the attempt's key: not sent on it before then."""
        rid = data.draw(st.sampled_from(self.sent()))
        key = self.live[rid]
        assert key is not None
        self.feed(AttemptHeld(request_id=rid, now=self.now, until=self.now + hold))
        self.not_before[key] = max(self.not_before.get(key, -1.0), self.now + hold)

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        self.feed(RequestCancelled(request_id=rid, now=self.now))

    @rule(dt=st.sampled_from([0.0, 0.01, 0.5, 2.0, 30.0, 400.0]))
    def advance(self, dt: float) -> None:
        self.now += dt
        self.feed(Tick(now=self.now))

    @precondition(lambda self: self.pool.next_deadline() is not None)
    @rule()
    def tick_at_deadline(self) -> None:
        deadline = self.pool.next_deadline()
        assert deadline is not None and deadline >= self.now
        self.now = deadline
        self.feed(Tick(now=self.now))

    @precondition(lambda self: bool(self.probing))
    @rule(data=st.data(), status=st.sampled_from([200, 200, 401, 402, 429, 503, None]))
    def probe_finished(self, data: st.DataObject, status: int | None) -> None:
        key = data.draw(st.sampled_from(sorted(self.probing)))
        self.probing.discard(key)
        self.feed(ProbeFinished(key_id=key, now=self.now, status=status))

    @rule(
        data=st.data(),
        state=st.sampled_from(
            [
                KeyState.HEALTHY,
                KeyState.DISABLED,
                KeyState.DEPLETED,
                KeyState.FAILED,
                KeyState.RATE_LIMITED,
            ]
        ),
    )
    def mark(self, data: st.DataObject, state: KeyState) -> None:
        keys = sorted(set(self.state) - self.removed)
        assume(keys)
        key = data.draw(st.sampled_from(keys))
        until = self.now + 10.0 if state is KeyState.RATE_LIMITED else None
        self.not_before.pop(key, None)  # an operator's word overrides Retry-After
        self.feed(KeyMarked(key_id=key, state=state, until=until, now=self.now))

    @rule(data=st.data(), cost=st.sampled_from([0.0, 0.5, 3.0]), ago=st.sampled_from([0, 50, 500]))
    def recorded_spend(self, data: st.DataObject, cost: float, ago: int) -> None:
        keys = sorted(set(self.state) - self.removed)
        key = data.draw(st.sampled_from(keys))
        self.feed(SpendRecorded(key_id=key, now=self.now, cost=cost, at=self.now - ago))
        self.charged += cost

    @rule()
    def add_key(self) -> None:
        self.key_serial += 1
        key = f"n{self.key_serial}"
        self.state[key] = KeyState.HEALTHY.value
        self.limit[key] = None
        self.in_flight[key] = 0
        self.feed(KeyAdded(key=KeySpec(key_id=key), now=self.now))

    @precondition(lambda self: len(set(self.state) - self.removed) > 1)
    @rule(data=st.data())
    def remove_key(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(set(self.state) - self.removed)))
        self.removed.add(key)
        self.probing.discard(key)  # its probe result is now ignored
        self.feed(KeyRemoved(key_id=key, now=self.now))

    @rule(one=st.booleans())
    def operator_probe(self, one: bool) -> None:
        keys = sorted(set(self.state) - self.removed)
        self.feed(ProbeRequested(now=self.now, key_id=keys[0] if one else None))

    @rule()
    def snapshot_restore(self) -> None:
        data = json.loads(json.dumps(self.pool.snapshot()))
        self.pool = Pool.restore(data)
        assert self.pool.snapshot() == self.twin.snapshot()

    # -------------------------------------------------------- invariants

    @invariant()
    def in_flight_matches(self) -> None:
        if not hasattr(self, "pool"):
            return
        stats = self.pool.statistics()
        for key in stats.keys:
            assert key.in_flight == self.in_flight[key.key_id], key
            assert key.state.value == self.state[key.key_id]
        assert stats.queued == sum(1 for k in self.live.values() if k is None)
        counts = self.pool.count_by_state()
        assert counts == stats.count_by_state()  # the cheap counts agree
        assert self.pool.count_usable() == sum(counts[s.value] for s in USABLE_STATES)
        for key in stats.keys:  # one key's picture is its entry in the whole
            assert self.pool.key_statistics(key.key_id) == key
        assert self.pool.key_ids(removing=True) == [k.key_id for k in stats.keys]
        assert stats.spend == pytest.approx(self.charged, abs=1e-9)  # removed keys' too
        totals = self.pool.statistics(keys=False)
        assert totals == attrs.evolve(stats, keys=())

    def teardown(self) -> None:
        if not hasattr(self, "pool"):
            return
        # Every request still held ends cleanly, leaving nothing behind.
        for rid in sorted(self.live):
            self.feed(RequestCancelled(request_id=rid, now=self.now))
        stats = self.pool.statistics()
        assert stats.in_flight == 0 and stats.queued == 0
        assert all(k.in_flight == 0 for k in stats.keys)
        assert stats.started == len(self.ended)
        # Replay from scratch gives the same decisions, byte for byte.
        replay = Pool(self.config)
        assert [replay.handle(e) for e in self.events] == self.outputs


PoolMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_pool_state_machine = PoolMachine.TestCase


# ------------------------------------------------------------- fairness


@settings(max_examples=200, deadline=None)
@given(
    n_healthy=st.integers(1, 5),
    n_flaky=st.integers(0, 3),
    steps=st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=120),
)
def test_round_robin_counts_of_steady_keys_differ_by_at_most_one(
    n_healthy: int, n_flaky: int, steps: list[tuple[bool, bool]]
) -> None:
    """Keys that stay healthy get turns that differ by at most one, at every
    step, while other keys fall in and out (429s with Retry-After)."""
    steady = [f"h{i}" for i in range(n_healthy)]
    flaky = [f"f{i}" for i in range(n_flaky)]
    pool = Pool(PoolConfig(keys=[KeySpec(key_id=k) for k in steady + flaky]))
    counts = dict.fromkeys(steady, 0)
    now = 0.0
    for i, (fail_flaky, long_wait) in enumerate(steps):
        now += 0.5
        out = pool.handle(RequestStarted(request_id=f"r{i}", now=now))
        while True:
            send = next(d for d in out if isinstance(d, Send))
            if send.key_id in counts:
                counts[send.key_id] += 1
                out = pool.handle(ResponseReceived(request_id=f"r{i}", now=now, status=200))
                break
            status = 429 if fail_flaky else 200
            out = pool.handle(
                ResponseReceived(
                    request_id=f"r{i}",
                    now=now,
                    status=status,
                    retry_after=30.0 if long_wait else 1.0,
                )
            )
            if any(isinstance(d, Deliver) for d in out):
                break
        pool.handle(ResponseFinished(request_id=f"r{i}", now=now))
        assert max(counts.values()) - min(counts.values()) <= 1, counts


@settings(max_examples=200, deadline=None)
@given(
    weights=st.lists(st.integers(1, 6), min_size=1, max_size=6),
    n=st.integers(1, 200),
    concurrent=st.booleans(),
)
def test_weighted_shares_stay_within_one_of_ideal_at_every_prefix(
    weights: list[int], n: int, concurrent: bool
) -> None:
    specs = [KeySpec(key_id=f"k{i}", weight=w) for i, w in enumerate(weights)]
    pool = Pool(PoolConfig(keys=specs, policy="weighted"))
    total = sum(weights)
    counts = [0] * len(weights)
    held: list[str] = []
    for t in range(1, n + 1):
        rid = f"r{t}"
        send = pool.handle(RequestStarted(request_id=rid, now=float(t)))[0]
        assert isinstance(send, Send)
        counts[int(send.key_id[1:])] += 1
        for i, w in enumerate(weights):
            assert abs(counts[i] - t * w / total) < 1.0, (t, counts)
        held.append(rid)
        if not concurrent or len(held) > 3:
            done = held.pop(0)
            pool.handle(ResponseReceived(request_id=done, now=float(t), status=200))
            pool.handle(ResponseFinished(request_id=done, now=float(t)))


@settings(max_examples=100, deadline=None)
@given(n_keys=st.integers(2, 12), n=st.integers(1, 60))
def test_batch_of_parallel_operations_gets_distinct_keys(n_keys: int, n: int) -> None:
    for policy in POLICIES:
        pool = Pool(
            PoolConfig(keys=[KeySpec(key_id=f"k{i}") for i in range(n_keys)], policy=policy)
        )
        keys = []
        for i in range(n):
            out = pool.handle(
                RequestStarted(request_id=f"r{i}", now=0.0, group="batch", session=f"s{i}")
            )
            keys.append(next(d for d in out if isinstance(d, Send)).key_id)
        assert len(set(keys)) == min(n, n_keys), (policy, keys)
