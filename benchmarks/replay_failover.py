"""Failover latency, pacing on known limits, and seed 001's scenario, by replay.

Three checks against design.md's targets, each printed as a markdown table:

1. Failover: on the scenarios where keys start answering 429, 401 or 402, the
   requests sent to a key after its first such answer (beyond those already
   in flight) must be 0, and an affected request must fail over at once
   (added latency: its error round trip, nothing more in virtual time)
   whenever some key could take it; it may wait only when no key is usable.
   The wall-clock cost of the decision (the ``Pool.handle`` call that takes
   the 429 and returns the next ``Send``) is measured separately: it is the
   "+ 1 ms" of the target.
2. Pacing: with each key's ``rpm`` known, steady load below the pool's total
   limit draws 0 upstream 429s (seed 000's success metric), next to the same
   load with the limits unknown.
3. Seed 001: batches of 7 operations over 4, 5 and 7 usable keys; rate-limited
   and revoked keys come back in batch probes.

Run:

    python -m benchmarks.replay_failover              # under a minute
    python -m benchmarks.replay_failover --requests 20000 --rounds 5
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

from keyrotor.core import (
    POLICIES,
    KeySpec,
    Pool,
    PoolConfig,
    RequestStarted,
    ResponseFinished,
    ResponseReceived,
    Send,
)
from keyrotor.replay import build_scenario, replay

FAILOVER_SCENARIOS = (
    ("failing_key", 4),
    ("rate_limited", 4),
    ("burst", 4),
    ("account_limits", 4),
    ("credits_run_out", 4),
    ("seed001", 7),
    ("thousands_of_keys", 10_000),
)


def decision_time(policy: str, keys: int, rounds: int, cycles: int = 2_000) -> float:
    """Median wall-clock seconds of the handle call that takes a 429 and fails over."""
    medians = []
    for _ in range(rounds):
        pool = Pool(
            PoolConfig(keys=[KeySpec(key_id=f"key-{i}") for i in range(keys)], policy=policy)  # type: ignore[arg-type]
        )
        handle = pool.handle
        samples = []
        now = 0.0
        gc.collect()
        for i in range(cycles):
            rid = f"r{i}"
            now += 0.01
            handle(RequestStarted(request_id=rid, now=now, session=f"s{i % 64}"))
            event = ResponseReceived(request_id=rid, now=now, status=429, retry_after=0.005)
            started = time.perf_counter()
            decisions = handle(event)
            samples.append(time.perf_counter() - started)
            assert any(type(d) is Send for d in decisions), decisions
            handle(ResponseReceived(request_id=rid, now=now, status=200))
            handle(ResponseFinished(request_id=rid, now=now))
        medians.append(statistics.median(samples))
    return statistics.median(medians)


def failover(requests: int, rounds: int, seed: int) -> None:
    print("## Failover: no send after a key's 429/401/402, added latency per request\n")
    print(
        "| scenario | keys | policy | episodes | sends after 429/401/402 | affected requests "
        "| failed over at once | waited, no key usable | waited, a key usable "
        "| error round trip max (ms) | core decision p50 (µs) | verdict |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    decisions: dict[tuple[str, int], float] = {}
    for name, keys in FAILOVER_SCENARIOS:
        count = requests if keys < 1_000 else max(requests, 3 * keys)
        scenario = build_scenario(name, keys=keys, requests=count, seed=seed)
        report = replay(scenario, "all", seed=seed)
        for policy, m in report.results.items():
            size = 4 if keys < 1_000 else keys
            if (policy, size) not in decisions:
                decisions[(policy, size)] = decision_time(policy, size, rounds)
            core = decisions[(policy, size)]
            fo = m["failover"]
            err_max = fo["error_round_trip"]["max"]
            ok = (
                fo["sends_after_blame"] == 0
                and fo["waited_while_a_key_was_usable"] == 0
                and core <= 0.001
            )
            print(
                f"| {name} | {keys:,} | {policy} | {fo['episodes']} | {fo['sends_after_blame']} "
                f"| {fo['affected_requests']:,} | {fo['failed_over_at_once']:,} "
                f"| {fo['waited_no_key_usable']:,} | {fo['waited_while_a_key_was_usable']:,} "
                f"| {_ms(err_max)} | {core * 1e6:.1f} | {'met' if ok else 'NOT MET'} |"
            )
    print()


def pacing(requests: int, seed: int) -> None:
    print("## Pacing on known limits: 85 % of the pool's total rpm, Poisson arrivals\n")
    print(
        "| keys | limits known to the pool | policy | served | upstream 429s "
        "| client errors | queueing p50 (s) | queueing p99 (s) |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for keys in (4, 100):
        count = max(requests, 250 * keys)  # several minutes of virtual time
        for name, known in (("pacing", "yes (rpm=60)"), ("rate_limited", "no")):
            report = replay(build_scenario(name, keys=keys, requests=count, seed=seed), "all")
            for policy, m in report.results.items():
                q = m["queueing"]["delay"]
                print(
                    f"| {keys} | {known} | {policy} | {m['served']:,} "
                    f"| {m['upstream']['rate_limited_429']:,} | {m['client_errors']['total']:,} "
                    f"| {_s(q['p50'])} | {_s(q['p99'])} |"
                )
    print()


def seed001(seed: int) -> None:
    print("## Seed 001: 7 operations per batch over 4, 5, then 7 usable keys\n")
    report = replay(build_scenario("seed001", seed=seed), list(POLICIES), seed=seed)
    print(
        "| policy | batches | on 7 distinct keys | distinct keys per batch (count) "
        "| client errors | probes | recovered | time to recover (s) |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---|")
    for policy, m in report.results.items():
        groups = m["groups"]
        times = ", ".join(
            f"{e['key']} {e['time_to_recover']:.1f}"
            for e in sorted(m["episodes"], key=lambda e: e["key"])
            if e["time_to_recover"] is not None
        )
        spread = ", ".join(f"{k} keys: {v}" for k, v in groups["distinct_keys"].items())
        print(
            f"| {policy} | {groups['count']} | {groups['all_distinct']} | {spread} "
            f"| {m['client_errors']['total']} | {m['upstream']['probes']} "
            f"| {m['recovery']['recovered']} | {times} |"
        )
    print()
    run = report.runs["round_robin"]
    print("State changes (round_robin):\n")
    print("| t (s) | key | new state |")
    print("|---:|---|---|")
    for t, idx, state in run.state_changes:
        print(f"| {t:.3f} | {run.keys[idx]} | {state} |")
    print()


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value * 1000:.2f}"


def _s(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3_000)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the decision timing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    failover(args.requests, args.rounds, args.seed)
    pacing(args.requests, args.seed)
    seed001(args.seed)
    print(f"(benchmark wall time: {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
