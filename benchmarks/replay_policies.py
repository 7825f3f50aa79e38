"""The policies compared on the synthetic scenarios, and replay speed.

Part 1 replays each scenario at 4 and 100 keys with every policy, and the
``thousands_of_keys`` scenario at 10,000 keys (``--full``: every scenario at
10,000 keys too, with 5 requests per key), and prints the main metrics side by
side (a markdown table per scenario and size). The scenarios' request rates
scale with the number of keys, so runs use at least 100 requests per key at
100 keys (5 with ``--full`` at 10,000, 3 for ``thousands_of_keys``).
Part 2 measures replay speed: simulated requests per wall-clock second for a
4-key pool on the ``steady`` scenario, median of ``--rounds`` rounds, next to
the core alone (the three ``Pool.handle`` calls of a request, events built
beforehand): the ceiling the engine can approach. Run:

    python -m benchmarks.replay_policies                 # about a minute
    python -m benchmarks.replay_policies --full          # every scenario at 10,000 keys (minutes)
    python -m benchmarks.replay_policies --quick         # a smoke run
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

from benchmarks.core_cycle import make_pool, time_event_build, time_handle
from keyrotor.core import (
    POLICIES,
)
from keyrotor.replay import build_scenario, pool_keys, replay, simulate

SCENARIOS = (
    "steady",
    "burst",
    "failing_key",
    "rate_limited",
    "pacing",
    "account_limits",
    "credits_run_out",
    "long_streams",
)
SIZES = (4, 100, 10_000)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}"


def runs(
    scenarios: list[str], sizes: list[int], requests: int, full: bool
) -> list[tuple[str, int, int]]:
    """(scenario, keys, requests) to compare."""
    plan = []
    for name in scenarios:
        for size in sizes:
            if size >= 1_000 and not full:
                continue
            per_key = 5 if size >= 1_000 else 100  # the scenarios' load scales with the keys
            plan.append((name, size, max(requests, per_key * size)))
    if 10_000 in sizes and not full:
        plan.append(("thousands_of_keys", 10_000, max(requests, 30_000)))
    return plan


def compare(plan: list[tuple[str, int, int]], seed: int) -> None:
    print("## Policies side by side\n")
    for name, size, requests in plan:
        scenario = build_scenario(name, keys=size, requests=requests, seed=seed)
        report = replay(scenario, "all", seed=seed)
        print(
            f"### {name}, {size:,} keys, {requests:,} requests "
            f"({report.source['duration']:,.0f} s virtual)\n"
        )
        print(
            "| policy | served | client errors | upstream 429s | Jain (healthy) | Jain (all) "
            "| max/min "
            "| sends after 429/401/402 | added latency max (s) | recover p50 (s) "
            "| queue p99 (s) | sim req/s |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        speed = report.speed()
        for policy, m in report.results.items():
            blamed = m["failover"]["sends_after_blame"]
            print(
                f"| {policy} | {m['served']:,} | {m['client_errors']['total']:,} "
                f"| {m['upstream']['rate_limited_429']:,} | {_fmt(m['fairness']['jain'], 4)} "
                f"| {_fmt(m['fairness']['jain_all_keys'], 4)} "
                f"| {_fmt(m['fairness']['max_min_ratio'])} | {blamed} "
                f"| {_fmt(m['failover']['added_latency']['max'])} "
                f"| {_fmt(m['recovery']['time_to_recover']['p50'])} "
                f"| {_fmt(m['queueing']['delay']['p99'])} | {speed[policy]:,.0f} |"
            )
        print()


def core_ceiling(requests: int, policy: str) -> float:
    """Requests per second through the core alone (4 keys, events prebuilt):
    ``benchmarks.core_cycle``'s cycle."""
    return 1.0 / time_handle(make_pool(policy, 4), requests, 0.0, policy)


def speed(requests: int, rounds: int, seed: int) -> None:
    scenario = build_scenario("steady", keys=4, requests=requests, seed=seed)
    specs = pool_keys(scenario.trace.header, scenario.model)
    build = statistics.median(time_event_build(100_000, 1.0) for _ in range(rounds))
    print(f"## Replay speed: steady, 4 keys, {requests:,} requests, median of {rounds} rounds\n")
    print(f"One frozen event build: {build * 1e6:.2f} µs in this run.\n")
    print(
        "| policy | replay (simulated requests/s) | µs per request | = event builds "
        "| core alone (requests/s) | replay / core |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for policy in POLICIES:
        replayed = []
        alone = []
        for _ in range(rounds):
            gc.collect()
            started = time.perf_counter()
            simulate(scenario.trace, scenario.model, policy=policy, seed=seed, keys=specs)
            replayed.append(requests / (time.perf_counter() - started))
            alone.append(core_ceiling(min(requests, 30_000), policy))
        r, c = statistics.median(replayed), statistics.median(alone)
        print(
            f"| {policy} | {r:,.0f} | {1e6 / r:.1f} | {1 / r / build:.1f} "
            f"| {c:,.0f} | {r / c:.2f} |"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2_000, help="requests per scenario run")
    parser.add_argument("--speed-requests", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS))
    parser.add_argument("--sizes", nargs="*", type=int, default=list(SIZES))
    parser.add_argument("--quick", action="store_true", help="small runs, one round")
    parser.add_argument("--full", action="store_true", help="every scenario at 10,000 keys")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.speed_requests, args.rounds = 500, 20_000, 1
    started = time.perf_counter()
    plan = runs(args.scenarios, args.sizes, args.requests, args.full)
    if args.quick:
        plan = [(name, size, min(n, 10_000)) for name, size, n in plan]
    compare(plan, args.seed)
    speed(args.speed_requests, args.rounds, args.seed)
    print(f"(benchmark wall time: {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
