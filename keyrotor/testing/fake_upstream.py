"""Command line of the fake OpenRouter upstream (and its public names).

    python -m keyrotor.testing.fake_upstream --port 0 --scenario demo

prints the base URL (``http://127.0.0.1:PORT/api/v1``) as the first line of
stdout, then serves until SIGINT or SIGTERM. It binds to loopback only. The
scenario's keys (aliases and behaviours, never the secrets) go to stderr; the
``demo`` secrets are the fake values of ``keyrotor.testing.DEMO_KEYS``.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

import anyio

from .scenarios import SCENARIOS, Scenario, scenario
from .server import FakeUpstream, KeyStats, LogEntry, ServerStats

__all__ = ["FakeUpstream", "KeyStats", "LogEntry", "ServerStats", "main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m keyrotor.testing.fake_upstream",
        description="A scripted, OpenRouter-compatible fake upstream on 127.0.0.1.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="TCP port, 0 for any (default 0)")
    parser.add_argument(
        "--scenario", default="demo", choices=sorted(SCENARIOS), help="built-in scenario"
    )
    parser.add_argument(
        "--keys", type=int, default=4, help="number of keys of the 'healthy' scenario (default 4)"
    )
    parser.add_argument(
        "--backend", default="asyncio", choices=["asyncio", "trio"], help="event loop"
    )
    return parser


def _build(name: str, keys: int) -> Scenario:
    return Scenario.healthy(keys) if name == "healthy" else scenario(name)


async def _serve(server: FakeUpstream, name: str) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with server.serve():
            print(server.url, flush=True)
            sc = server.scenario
            print(f"fake upstream: scenario {name!r}, {len(sc.keys)} keys", file=sys.stderr)
            for secret, behaviour in sc.keys.items():
                print(f"  {sc.aliases.get(secret, '<no alias>')}: {behaviour!r}", file=sys.stderr)
            if name in ("demo", "healthy"):
                where = "DEMO_KEYS" if name == "demo" else "healthy_secret(i)"
                print(f"  (fake secrets: keyrotor.testing.{where})", file=sys.stderr)
            sys.stderr.flush()
            async for signum in signals:
                print(f"fake upstream: {signal.Signals(signum).name}, stopping", file=sys.stderr)
                break


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fake upstream until SIGINT/SIGTERM; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        server = FakeUpstream(_build(args.scenario, args.keys), host=args.host, port=args.port)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    anyio.run(_serve, server, args.scenario, backend=args.backend)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
