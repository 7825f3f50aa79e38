"""Two source trees' proxies side by side, in short alternating bursts: small differences.

``proxy_revisions`` starts a whole ``proxy_load`` run per tree and round (about a
minute each), so the machine's drift between runs (±10 % here) hides a change of
a few percent. This starts one fake upstream and both proxies at once (each run
from its tree, ``python -m keyrotor.cli serve`` in a ``git worktree``), then
loads them in turn with ``proxy_load``'s closed loop (32 connections) for
``--burst`` seconds each, in A B B A order, ``--pairs`` times per body. A burst's
figure is the proxy's CPU per request (from ``/proc``); a pair's is B's over A's
measured a few seconds apart, so the drift cancels. Prints each side's median and
the median ratio with its quartiles (the spread of the pairs), per body. Run:

    git worktree add /tmp/before HEAD~1
    python -m benchmarks.proxy_pairs /tmp/before /work/main --pairs 20 [--burst 2] \
        [--state] [--keys N] [--no-stream]

One tree against itself with B configured otherwise measures what a setting
costs, e.g. the state file at 10,000 keys, or a route (``--b-route``: B's
requests name ``proxy_load``'s route, A's its model)::

    python -m benchmarks.proxy_pairs . . --state --keys 10000 --b-no-state --no-stream
    python -m benchmarks.proxy_pairs . . --state --b-route
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

from benchmarks.proxy_load import (
    MODEL,
    ROUTE,
    BenchError,
    Options,
    Target,
    cpu_seconds,
    measure,
    run_main,
    start_keyrotor,
    start_upstream,
    warm_up,
)


def burst(target: Target, streaming: bool, options: Options) -> float:
    """µs of the proxy's CPU per request over one closed-loop burst."""
    assert target.pid is not None
    before = cpu_seconds(target.pid)
    result = measure(target, "closed", streaming, 0, options, {})
    used = cpu_seconds(target.pid) - before
    if result.error_count or not result.ok:
        raise BenchError(f"{target.name}: {result.error_count} errors, {result.ok} ok")
    return used / result.ok * 1e6


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs=2, metavar="TREE", type=Path, help="A, then B")
    parser.add_argument("--pairs", type=int, default=20, help="A B pairs per body (20)")
    parser.add_argument("--burst", type=float, default=2.0, help="seconds per burst (2)")
    parser.add_argument("--state", action="store_true", help="both with a state file")
    parser.add_argument("--keys", type=int, default=4, metavar="N", help="fake keys (4)")
    parser.add_argument("--no-stream", action="store_true", help="JSON only")
    parser.add_argument(
        "--prompt-kb", type=int, default=0, metavar="N", help="N KB of earlier turns a request"
    )
    parser.add_argument("--b-keys", type=int, metavar="N", help="B's fake keys (default: --keys)")
    parser.add_argument("--b-no-state", action="store_true", help="B without the state file")
    parser.add_argument(
        "--route", action="store_true", help=f"both sides' requests name the route {ROUTE!r}"
    )
    parser.add_argument("--b-route", action="store_true", help=f"B's requests name {ROUTE!r}")
    parser.add_argument(
        "--no-cost",
        action="store_true",
        help="the upstream's usage has no cost, as OpenAI's (the proxies price answers)",
    )
    args = parser.parse_args()
    b_keys = args.keys if args.b_keys is None else args.b_keys
    for tree in args.trees:
        if not (tree / "keyrotor" / "cli.py").is_file():
            parser.error(f"{tree} is not a keyrotor source tree (no keyrotor/cli.py)")
    if args.pairs < 1 or args.burst <= 0 or min(args.keys, b_keys) < 1:
        parser.error("--pairs and --keys must be at least 1, --burst above 0")
    if not 0 <= args.prompt_kb <= 8192:
        parser.error("--prompt-kb must be between 0 and 8192")
    bodies = (False,) if args.no_stream else (False, True)
    options = Options(
        rate=200.0, duration=args.burst, concurrency=32, rounds=1, streaming=bodies,
        warmup=1.0, prewarm=16, max_connections=256, prompt_kb=args.prompt_kb,
    )  # fmt: skip
    names = [f"A {args.trees[0]}", f"B {args.trees[1]}"]
    figures: dict[tuple[str, bool], list[float]] = {}
    with ExitStack() as stack:
        _, upstream_url = start_upstream(stack, no_cost=args.no_cost)
        targets = []
        sides = [
            (args.state, args.keys, args.route),
            (args.state and not args.b_no_state, b_keys, args.route or args.b_route),
        ]
        routes = args.route or args.b_route  # both proxies know the route
        for name, tree, (state, keys, routed) in zip(names, args.trees, sides, strict=True):
            proxy, endpoint = start_keyrotor(
                stack, upstream_url, state, routes, keys=keys, tree=tree.resolve()
            )
            model = ROUTE if routed else MODEL
            targets.append(Target(name, endpoint, proxy.pid, model))
        for target in targets:
            warm_up(target, options)
        for streaming in bodies:
            for pair in range(args.pairs):
                order = targets if pair % 2 == 0 else targets[::-1]  # A B, then B A
                for target in order:
                    figure = burst(target, streaming, options)
                    figures.setdefault((target.name, streaming), []).append(figure)
                a, b = (figures[(name, streaming)][-1] for name in names)
                body = "SSE" if streaming else "JSON"
                print(
                    f"{body} pair {pair + 1}: A {a:.0f} µs, B {b:.0f} µs, B/A {b / a:.3f}",
                    file=sys.stderr,
                    flush=True,
                )
    print(
        f"{args.pairs} pairs of {args.burst:g} s bursts per body, closed loop of 32, "
        f"{args.keys} keys, state file {'on' if args.state else 'off'}"
        + (f"; B: {b_keys} keys" if b_keys != args.keys else "")
        + ("; B: no state file" if args.state and args.b_no_state else "")
        + (f"; requests name the route {ROUTE!r}" if args.route else "")
        + (f"; B's requests name the route {ROUTE!r}" if args.b_route and not args.route else "")
        + ("; the upstream reports no cost" if args.no_cost else "")
        + "\n"
    )
    print("| body | A, µs a request | B, µs a request | B/A, median of pairs | quartiles |")
    print("|---|---:|---:|---:|---|")
    for streaming in bodies:
        a_values, b_values = (figures[(name, streaming)] for name in names)
        ratios = [b / a for a, b in zip(a_values, b_values, strict=True)]
        low, high = quartiles(ratios)
        print(
            f"| {'SSE' if streaming else 'JSON'} | {statistics.median(a_values):.0f} | "
            f"{statistics.median(b_values):.0f} | {statistics.median(ratios):.3f} | "
            f"{low:.3f} - {high:.3f} |"
        )
    print(f"\nA = {args.trees[0]}, B = {args.trees[1]}")
    return 0


if __name__ == "__main__":
    run_main(main)
