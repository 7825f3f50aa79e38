"""``keyrotor demo``: a built-in scenario run through the core, no network needed.

A virtual clock and a small simulated upstream stand in for the world: five
keys, of which one is revoked, one runs out of credits, one hits its rate
limit and one has a flaky stretch. The demo prints which key served each
request, every failover inside a request, and how the pool recovers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

import attrs

from .core import (
    Decision,
    Deliver,
    KeySpec,
    KeyStateChanged,
    Pool,
    PoolConfig,
    Probe,
    ProbeFinished,
    Reject,
    RequestStarted,
    ResponseFinished,
    ResponseReceived,
    Send,
    Tick,
)


@attrs.define
class SimKey:
    """What the simulated upstream does for one key."""

    credits: float = 1.0
    invalid: bool = False
    limit: int | None = None  # requests per window
    window: float = 10.0
    flaky_from: float | None = None  # 503s between these times
    flaky_to: float | None = None
    served: list[float] = attrs.field(factory=list)

    def answer(self, now: float) -> tuple[int, float | None]:
        """(status, retry_after) for a request at ``now``."""
        if self.invalid:
            return 401, None
        if self.credits <= 0:
            return 402, None
        if self.flaky_from is not None and self.flaky_from <= now < (self.flaky_to or now):
            return 503, None
        if self.limit is not None:
            recent = [t for t in self.served if t > now - self.window]
            if len(recent) >= self.limit:
                return 429, round(recent[0] + self.window - now, 3)
        self.served.append(now)
        return 200, None


COST = 0.01


def scenario() -> tuple[PoolConfig, dict[str, SimKey]]:
    """The demo's keys: five aliases and what the upstream does with each."""
    sim = {
        "alpha": SimKey(credits=10.0),
        "bravo": SimKey(invalid=True),
        "charlie": SimKey(credits=0.05),
        "delta": SimKey(credits=10.0, limit=2, window=10.0),
        "echo": SimKey(credits=10.0, flaky_from=4.0, flaky_to=9.0),
    }
    config = PoolConfig(
        keys=[KeySpec(key_id=k) for k in sim],
        degraded_cooldown=8.0,
        error_window=5.0,
        error_min_requests=2,
        recheck_interval=12.0,
    )
    return config, sim


def run(out: TextIO = sys.stdout, requests: int = 40, color: bool = False) -> dict[str, int]:
    """Run the scenario; print a timeline; return request outcome counts."""
    config, sim = scenario()
    pool = Pool(config)
    paint: Callable[[str, str], str] = _paint if color else (lambda text, _: text)
    outcome = {"ok": 0, "error": 0, "rejected": 0}
    pending_probes: list[str] = []

    def act(now: float, decisions: list[Decision]) -> None:
        for d in decisions:
            if isinstance(d, KeyStateChanged):
                until = f" until t={d.until:.1f}" if d.until is not None else ""
                print(
                    paint(
                        f"  t={now:5.1f}  key {d.key_id:<8} {d.old.value} -> {d.new.value}"
                        f" ({d.reason}){until}",
                        "33",
                    ),
                    file=out,
                )
            elif isinstance(d, Probe):
                print(f"  t={now:5.1f}  probe {d.key_id} ({d.reason})", file=out)
                pending_probes.append(d.key_id)
            elif isinstance(d, Send):
                status, retry_after = sim[d.key_id].answer(now)
                label = f"attempt {d.attempt}" if d.attempt > 1 else "sent"
                print(
                    f"  t={now:5.1f}  {d.request_id:<4} {label:<9} -> {d.key_id:<8} {status}",
                    file=out,
                )
                if status == 200:
                    sim[d.key_id].credits -= COST
                act(
                    now,
                    pool.handle(
                        ResponseReceived(
                            request_id=d.request_id, now=now, status=status, retry_after=retry_after
                        )
                    ),
                )
            elif isinstance(d, Deliver):
                ok = d.status == 200
                outcome["ok" if ok else "error"] += 1
                act(
                    now,
                    pool.handle(
                        ResponseFinished(
                            request_id=d.request_id,
                            now=now,
                            cost=COST if ok else 0.0,
                            prompt_tokens=12,
                            completion_tokens=30,
                        )
                    ),
                )
                mark = paint("delivered", "32") if ok else paint(f"error {d.status}", "31")
                print(f"  t={now:5.1f}  {d.request_id:<4} {mark} by {d.key_id}", file=out)
            elif isinstance(d, Reject):
                outcome["rejected"] += 1
                print(
                    paint(f"  t={now:5.1f}  {d.request_id:<4} rejected {d.status}", "31"), file=out
                )

    print("keyrotor demo: 5 keys, a simulated upstream, a virtual clock (no network)", file=out)
    print("  alpha: healthy   bravo: revoked   charlie: almost out of credits", file=out)
    print("  delta: 2 requests / 10 s   echo: answers 503 between t=4 and t=9\n", file=out)
    now = 0.0
    for i in range(requests):
        now = round(i * 0.5, 3)
        deadline = pool.next_deadline()
        while deadline is not None and deadline <= now:
            act(deadline, pool.handle(Tick(now=deadline)))
            deadline = pool.next_deadline()
        while pending_probes:
            key_id = pending_probes.pop(0)
            status = 401 if sim[key_id].invalid else (402 if sim[key_id].credits <= 0 else 200)
            act(now, pool.handle(ProbeFinished(key_id=key_id, now=now, status=status)))
        act(now, pool.handle(RequestStarted(request_id=f"r{i + 1}", now=now)))
    stats = pool.statistics()
    print("\nper key:", file=out)
    for key in stats.keys:
        print(
            f"  {key.key_id:<8} {key.state.value:<12} requests={key.requests:<3} "
            f"ok={key.successes:<3} spend=${key.spend:.2f}",
            file=out,
        )
    print(
        f"\n{outcome['ok']} of {requests} requests delivered, {outcome['error']} errors,"
        f" {outcome['rejected']} rejected: the caller never saw a bad key.",
        file=out,
    )
    return outcome


def _paint(text: str, code: str) -> str:
    return f"\x1b[{code}m{text}\x1b[0m"
