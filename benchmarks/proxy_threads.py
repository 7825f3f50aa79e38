"""The proxy's CPU a request by thread: its event loop's against the others'.

``proxy_load``'s closed loop (32 connections, JSON) against one ``keyrotor
serve`` on the fake upstream, and each of the proxy's threads' CPU read from
``/proc/PID/task`` around each round: the main thread runs the event loop
(every request), the others the state file's thread and anyio's workers.
Run it in a tree (a ``git worktree``) to measure that revision; alternate two
trees by hand for a comparison::

    python -m benchmarks.proxy_threads --keys 10000 --rounds 2          # state file on
    python -m benchmarks.proxy_threads --keys 10000 --flush-in thread   # its writer thread
    python -m benchmarks.proxy_threads --keys 4 --no-state
"""

from __future__ import annotations

import argparse
import os
from contextlib import ExitStack
from functools import partial

import trio

from . import proxy_load as load


def thread_cpu(pid: int) -> dict[int, float]:
    """Thread id -> CPU seconds (user + system) of each thread of ``pid``
    (a thread that ended meanwhile, read as 0.0, is left out)."""
    seconds = {int(tid): load.cpu_seconds(pid, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}
    return {tid: used for tid, used in seconds.items() if used > 0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=4, help="the pool's fake keys (4)")
    parser.add_argument("--no-state", action="store_true", help="no state file")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds a round (8)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--flush-in", choices=("loop", "thread"), help="[state] flush_in (default: not set)"
    )
    args = parser.parse_args()
    print("| round | rps | µs of CPU a request | event loop's thread | other threads |")
    print("|---:|---:|---:|---:|---:|")
    with ExitStack() as stack:
        _, url = load.start_upstream(stack)
        proxy, endpoint = load.start_keyrotor(
            stack, url, not args.no_state, keys=args.keys, flush_in=args.flush_in
        )
        pid = proxy.proc.pid
        spec = load.RequestSpec.build(endpoint, streaming=False)
        for round_ in range(args.rounds + 1):  # round 0 warms up
            result = load.RunResult("keyrotor", "closed", False, round_)
            before = thread_cpu(pid)
            run = partial(load.closed_loop, spec, result, concurrency=32, duration=args.duration)
            trio.run(run)
            after = thread_cpu(pid)
            if round_ == 0:
                continue
            if result.error_count or not result.ok:
                raise load.BenchError(f"round {round_}: {result.error_count} errors")
            used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
            main_thread = used.pop(pid, 0.0)
            others = sum(used.values())
            per = 1e6 / result.ok
            print(
                f"| {round_} | {result.rps:,.0f} | {(main_thread + others) * per:.0f} "
                f"| {main_thread * per:.0f} | {others * per:.1f} |"
            )
    return 0


if __name__ == "__main__":
    load.run_main(main)
