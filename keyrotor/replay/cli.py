"""``keyrotor replay``: replay a trace file or a built-in scenario, policies side by side.

    keyrotor replay TRACE [--policy P ...] [--keys N] [--upstream-model FILE]
    keyrotor replay --scenario NAME [--requests N] [--keys N] [--policy all]
    keyrotor replay --scenario list
    keyrotor replay TRACE --route free --strategy fastest,cheapest,ordered
    keyrotor replay --scenario free-day --route NAME --routes FILE.toml

The report goes to stdout (text, or ``--json``); it is byte-identical for the
same input and seed. Speed and progress go to stderr. Bad input exits with
status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from ..core import POLICIES, PoolError

__all__ = ["add_parser", "main", "run"]


MAX_REQUESTS = 10_000_000  # about two minutes of replay at 100,000 per second


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Register ``replay`` on a ``parser.add_subparsers()`` object."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "replay",
        help="replay recorded or synthetic traffic through the pool on a virtual clock",
        description="Replay a trace (JSON lines, docs/replay.md) or a built-in scenario "
        "through the pool against a simulated upstream, and compare policies.",
    )
    configure(parser)
    return parser


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``replay`` arguments to ``parser``."""
    parser.add_argument("trace", nargs="?", metavar="TRACE", help="trace file (JSON lines)")
    parser.add_argument(
        "--scenario", metavar="NAME", help="a built-in synthetic scenario ('list' names them)"
    )
    parser.add_argument(
        "--policy",
        action="append",
        metavar="P",
        help=f"policy to replay, repeatable, or 'all' ({', '.join(POLICIES)}); default round_robin",
    )
    parser.add_argument("--keys", type=int, metavar="N", help="number of keys in the pool")
    parser.add_argument(
        "--requests", type=int, metavar="N", help="requests to generate (scenarios only)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the pool and upstream (0)")
    parser.add_argument(
        "--upstream-model", metavar="FILE", help="simulated upstream, JSON or TOML (docs/replay.md)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--recorded", action="store_true", help="re-issue the answers the trace recorded"
    )
    mode.add_argument(
        "--simulated", action="store_true", help="answer from the upstream model, never the trace"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a PoolConfig option, e.g. --set max_attempts=2 (value as JSON)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--output", metavar="FILE", help="also write the JSON report to FILE")
    parser.add_argument(
        "--write-trace", metavar="FILE", help="write the scenario's trace to FILE and exit"
    )
    parser.add_argument("--plot", metavar="DIR", help="write PNG plots per policy into DIR")
    parser.add_argument(
        "--progress", action="store_true", help="show a progress bar even if stderr is no TTY"
    )
    parser.add_argument(
        "--speed", action="store_true", help="print simulated requests per second on stderr"
    )
    routing = parser.add_argument_group(
        "routes", "replay through a route instead: strategies side by side (docs/routing.md)"
    )
    routing.add_argument(
        "--route", metavar="NAME", help="the route: 'free', or one of --routes FILE"
    )
    routing.add_argument(
        "--routes", metavar="FILE", help="a TOML file with [[routes]] tables (as the config's)"
    )
    routing.add_argument(
        "--strategy",
        metavar="LIST",
        help="comma-separated strategies (ordered, cheapest, fastest, balanced, no-pacing); "
        "default: the route's own",
    )
    routing.add_argument(
        "--accounts", type=int, default=5, metavar="N", help="accounts with a free quota (5)"
    )
    routing.add_argument(
        "--free-per-day", type=int, default=50, metavar="N", help="free requests per account (50)"
    )
    routing.add_argument(
        "--down", type=float, default=0.05, metavar="SHARE", help="share of models down (0.05)"
    )


class UsageError(Exception):
    """Bad input: one line, exit status 2."""


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--set expects NAME=VALUE, got {pair!r}")
        if name in ("policy", "seed", "keys"):
            raise UsageError(
                f"--set {name}=... is not a pool option here: replay sets the {name} itself; "
                f"use --{name}"
            )
        try:
            options[name] = json.loads(raw)
        except RecursionError:
            raise UsageError(f"--set {name}: the value is nested too deeply") from None
        except ValueError:
            options[name] = raw
    return options


class ProgressBar:
    """A one-line progress bar on a stream (redrawn with a carriage return)."""

    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self.stream = stream
        self.width = width

    def __call__(self, policy: str, done: int, total: int) -> None:
        share = done / total if total else 1.0
        filled = int(share * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        end = "\n" if done >= total else ""
        self.stream.write(f"\r{policy:<12} [{bar}] {share:4.0%} {done:,}/{total:,}{end}")
        self.stream.flush()


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Carry out ``keyrotor replay`` with parsed ``args``; return the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        return _run(args, out, err)
    except UsageError as exc:
        print(f"keyrotor replay: {exc}", file=err)
        return 2
    except (ValueError, PoolError, OSError) as exc:  # TraceError, UpstreamModelError too
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"keyrotor replay: {message}", file=err)
        return 2


def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from .api import replay
    from .scenarios import SCENARIOS, build

    if args.scenario == "list":
        from .scenarios import describe

        for name, description in describe():
            print(f"{name:<18} {description}", file=out)
        print(f"{'free-day':<18} with --route: a day of chat traffic for the free tier", file=out)
        return 0
    if args.route is not None or args.routes is not None or args.strategy is not None:
        if args.write_trace:
            raise UsageError(
                "--write-trace does not apply with --route: write the scenario's trace first, "
                "then replay that file with --route"
            )
        return _run_route(args, out)
    if (args.scenario is None) == (args.trace is None):
        raise UsageError("give a TRACE file or --scenario NAME (--scenario list names them)")
    if args.scenario is not None and args.scenario not in SCENARIOS:
        raise UsageError(
            f"unknown scenario {args.scenario!r}; choose one of {', '.join(SCENARIOS)}"
        )
    if args.keys is not None and args.keys < 1:
        raise UsageError("--keys must be at least 1")
    if args.requests is not None and not 1 <= args.requests <= MAX_REQUESTS:
        raise UsageError(f"--requests must be from 1 to {MAX_REQUESTS:,}")
    if args.scenario == "seed001" and args.keys is not None:
        raise UsageError("seed001 is seed 001's 7 keys: --keys does not apply to it")
    if args.requests is not None and args.scenario is None:
        raise UsageError("--requests applies to --scenario only")
    policies = list(dict.fromkeys(args.policy or ["round_robin"]))  # each once
    if "all" in policies:
        policies = list(POLICIES)
    for policy in policies:
        if policy not in POLICIES:
            raise UsageError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)} or all")
    options = _options(args.set)
    source: Any
    if args.scenario is not None:
        source = build(args.scenario, keys=args.keys, requests=args.requests, seed=args.seed)
        if args.write_trace:
            source.trace.write(args.write_trace)
            print(f"wrote {len(source.trace.records):,} requests to {args.write_trace}", file=err)
            return 0
    else:
        if args.write_trace:
            raise UsageError("--write-trace applies to --scenario only")
        source = args.trace
    recorded = True if args.recorded else False if args.simulated else None
    show = args.progress or (err.isatty() if hasattr(err, "isatty") else False)
    report = replay(
        source,
        policies,
        keys=args.keys,
        seed=args.seed,
        upstream=args.upstream_model,
        options=options,
        recorded=recorded,
        progress=ProgressBar(err) if show else None,
        timeline_keys=16 if args.plot else 0,
    )
    out.write(report.to_json() if args.json else report.to_text())
    if args.output:
        with open(args.output, "w", encoding="utf-8") as file:
            file.write(report.to_json())
    if args.speed:
        for policy, speed in report.speed().items():
            print(f"{policy}: {speed:,.0f} simulated requests/s", file=err)
    if args.plot:
        from .plots import PlotError, plot_report

        try:
            paths = plot_report(report, args.plot)
        except PlotError as exc:
            print(f"keyrotor replay: {exc}", file=err)
            return 2
        for path in paths:
            print(f"plot: {path}", file=err)
    return 0


def _run_route(args: argparse.Namespace, out: TextIO) -> int:
    """``--route``: the trace (or the free-day scenario) through a route, per strategy."""
    import tomllib

    from ..models.routing import FREE_ROUTE, route_from_json
    from .routes import day_of_free_traffic, replay_route, routes_text
    from .trace import load_trace

    if args.route is None:
        raise UsageError("--routes and --strategy need --route NAME ('free', or one of --routes)")
    routes = {FREE_ROUTE.name: FREE_ROUTE}
    if args.routes is not None:
        try:
            with open(args.routes, "rb") as file:
                tables = tomllib.load(file).get("routes", [])
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{args.routes}: not TOML: {exc}") from None
        except OSError as exc:
            raise UsageError(f"{args.routes}: cannot read ({exc.strerror})") from None
        if not isinstance(tables, list):
            raise UsageError(f"{args.routes}: routes must be [[routes]] tables")
        for index, table in enumerate(tables, 1):
            try:
                route = route_from_json(table)
            except ValueError as exc:
                raise UsageError(f"{args.routes}: [[routes]] #{index}: {exc}") from None
            routes[route.name] = route
    if args.route not in routes:
        raise UsageError(f"no route {args.route!r}; routes: {', '.join(routes)}")
    route = routes[args.route]
    strategies = [s.strip() for s in (args.strategy or route.strategy).split(",") if s.strip()]
    if not strategies:
        raise UsageError(
            "--strategy needs one or more of ordered, cheapest, fastest, balanced, no-pacing"
        )
    if args.accounts < 1 or args.free_per_day < 0 or not 0 <= args.down < 1:
        raise UsageError("need --accounts >= 1, --free-per-day >= 0 and 0 <= --down < 1")
    if (args.scenario is None) == (args.trace is None):
        raise UsageError("give a TRACE file or --scenario free-day")
    if args.scenario is not None and args.scenario != "free-day":
        raise UsageError("with --route, the scenario is free-day")
    if args.scenario is not None:
        records = day_of_free_traffic(args.requests or 2000, seed=args.seed)
    else:
        records = load_trace(args.trace).records
    rows = replay_route(
        records,
        route,
        strategies,
        accounts=args.accounts,
        per_day=args.free_per_day,
        down=args.down,
        seed=args.seed,
    )
    if args.json:
        out.write(json.dumps([row.to_json() for row in rows], indent=2) + "\n")
    else:
        out.write(routes_text(rows, route, args.accounts, args.free_per_day))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keyrotor.replay.cli``: the same as ``keyrotor replay``."""
    from ..cli import ArgumentParser  # usage errors as one line, exit status 2

    parser = ArgumentParser(prog="keyrotor replay")
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
