"""How long one request cycle takes in the core, and how much memory a key costs.

A cycle is the three events of a successful request, each through
``Pool.handle``: ``RequestStarted`` -> ``Send``, ``ResponseReceived(200)`` ->
``Deliver``, ``ResponseFinished`` -> nothing. Two figures per case:

- ``handle``: the core alone (events built before the clock starts);
- ``cycle``: also building the three events with their keyword constructors;
- ``driver cycle``: building them as the transports' driver does, with the
  core's positional builders (``request_started``, ``response_received``,
  ``response_finished``), every field given.

Each case runs ``--rounds`` rounds of ``--cycles`` cycles; the median round is
reported (the machine is shared and noisy). Run:

    python -m benchmarks.core_cycle                 # every policy x 4, 100, 1,000, 10,000 keys
    python -m benchmarks.core_cycle --quick         # fewer cycles, for a smoke run
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import time
import tracemalloc
from collections.abc import Callable

from keyrotor.core import (
    POLICIES,
    KeySpec,
    Pool,
    PoolConfig,
    RequestStarted,
    ResponseFinished,
    ResponseReceived,
    request_started,
    response_finished,
    response_received,
)

SIZES = (4, 100, 1_000, 10_000)


def make_pool(policy: str, n_keys: int) -> Pool:
    keys = [KeySpec(key_id=f"key-{i}") for i in range(n_keys)]
    return Pool(PoolConfig(keys=keys, policy=policy))  # type: ignore[arg-type]


def sessions_for(policy: str, count: int) -> list[str | None]:
    """Affinity needs a session per request (1,000 distinct, reused)."""
    if policy != "affinity":
        return [None] * count
    return [f"session-{i % 1000}" for i in range(count)]


def time_handle(pool: Pool, cycles: int, start_at: float, policy: str) -> float:
    """Seconds per cycle, events built beforehand."""
    sessions = sessions_for(policy, cycles)
    events = []
    now = start_at
    for i in range(cycles):
        rid = f"r{i}"
        now += 0.001
        events.append(
            (
                RequestStarted(request_id=rid, now=now, session=sessions[i]),
                ResponseReceived(request_id=rid, now=now, status=200),
                ResponseFinished(request_id=rid, now=now, cost=0.0001),
            )
        )
    handle = pool.handle
    gc.collect()
    t0 = time.perf_counter()
    for started, received, finished in events:
        handle(started)
        handle(received)
        handle(finished)
    return (time.perf_counter() - t0) / cycles


def time_cycle(pool: Pool, cycles: int, start_at: float, policy: str) -> float:
    """Seconds per cycle, building the events inside the loop."""
    sessions = sessions_for(policy, cycles)
    ids = [f"q{i}" for i in range(cycles)]
    handle = pool.handle
    now = start_at
    gc.collect()
    t0 = time.perf_counter()
    for i in range(cycles):
        rid = ids[i]
        now += 0.001
        handle(RequestStarted(request_id=rid, now=now, session=sessions[i]))
        handle(ResponseReceived(request_id=rid, now=now, status=200))
        handle(ResponseFinished(request_id=rid, now=now, cost=0.0001))
    return (time.perf_counter() - t0) / cycles


def time_driver_cycle(pool: Pool, cycles: int, start_at: float, policy: str) -> float:
    """Seconds per cycle, the events built as ``transports/_driver.py`` builds them."""
    sessions = sessions_for(policy, cycles)
    ids = [f"d{i}" for i in range(cycles)]
    handle = pool.handle
    now = start_at
    gc.collect()
    t0 = time.perf_counter()
    for i in range(cycles):
        rid = ids[i]
        now += 0.001
        handle(request_started(rid, now, None, True, sessions[i], None, now + 30.0, 0, None))
        handle(response_received(rid, now, 200, None, None, 1.7e9))
        handle(response_finished(rid, now, 0.0001, 10, 20, None, None))
    return (time.perf_counter() - t0) / cycles


def time_event_build(cycles: int, start_at: float) -> float:
    """Seconds to build one frozen event: the machine's yardstick."""
    ids = [f"e{i}" for i in range(cycles)]
    gc.collect()
    t0 = time.perf_counter()
    for rid in ids:
        RequestStarted(request_id=rid, now=start_at)
    return (time.perf_counter() - t0) / cycles


def _at(
    timer: Callable[[Pool, int, float, str], float], pool: Pool, cycles: int, policy: str, at: float
) -> float:
    """``timer`` for one round starting at clock time ``at`` (``median_us``'s argument)."""
    return timer(pool, cycles, at, policy)


def median_us(measure: Callable[[float], float], rounds: int) -> float:
    results = [measure(r * 1_000.0) for r in range(rounds)]
    return statistics.median(results) * 1e6


def memory_per_key(policy: str, n_keys: int) -> float:
    """Bytes allocated per key by building a pool of ``n_keys`` keys."""
    specs = [KeySpec(key_id=f"key-{i}") for i in range(n_keys)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    pool = Pool(PoolConfig(keys=specs, policy=policy))  # type: ignore[arg-type]
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del pool
    return (after - before) / n_keys


def growth_per_request(policy: str, requests: int) -> float:
    """Bytes retained per finished request after ``requests`` cycles (want ~0)."""
    pool = make_pool(policy, 4)
    time_cycle(pool, 1_000, 0.0, policy)  # warm up caches and structures
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    time_cycle(pool, requests, 10_000.0, policy)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=20_000, help="cycles per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per case (median)")
    parser.add_argument("--policies", nargs="*", default=list(POLICIES))
    parser.add_argument("--sizes", nargs="*", type=int, default=list(SIZES))
    parser.add_argument("--quick", action="store_true", help="2,000 cycles x 3 rounds")
    args = parser.parse_args()
    if args.quick:
        args.cycles, args.rounds = 2_000, 3

    build_us = median_us(lambda at: time_event_build(args.cycles, at), args.rounds)
    print(f"median of {args.rounds} rounds x {args.cycles:,} cycles")
    print(f"reference on this machine, same run: building one RequestStarted = {build_us:.2f} µs")
    print()
    print(
        "| policy | keys | handle µs/cycle | x event build | cycle µs/cycle (events built too)"
        " | x event build | driver cycle µs | x event build | driver cycles/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for policy in args.policies:
        for n_keys in args.sizes:
            pool = make_pool(policy, n_keys)
            handle_us = median_us(
                functools.partial(_at, time_handle, pool, args.cycles, policy), args.rounds
            )
            pool = make_pool(policy, n_keys)
            cycle_us = median_us(
                functools.partial(_at, time_cycle, pool, args.cycles, policy), args.rounds
            )
            pool = make_pool(policy, n_keys)
            driver_us = median_us(
                functools.partial(_at, time_driver_cycle, pool, args.cycles, policy), args.rounds
            )
            print(
                f"| {policy} | {n_keys:,} | {handle_us:.2f} | {handle_us / build_us:.1f} | "
                f"{cycle_us:.2f} | {cycle_us / build_us:.1f} | {driver_us:.2f} | "
                f"{driver_us / build_us:.1f} | {1e6 / driver_us:,.0f} |"
            )
    print()
    print("| policy | bytes per key (10,000 keys) | bytes kept per finished request |")
    print("|---|---:|---:|")
    for policy in args.policies:
        per_key = memory_per_key(policy, 10_000)
        growth = growth_per_request(policy, 100_000 if not args.quick else 10_000)
        print(f"| {policy} | {per_key:,.0f} | {growth:.3f} |")


if __name__ == "__main__":
    main()
