"""The ``keyrotor`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``keyrotor`` console script."""
    parser = argparse.ArgumentParser(
        prog="keyrotor", description="Pool many LLM API keys behind one client or proxy."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="run a built-in failover and recovery scenario (no network, no API key)"
    )
    demo.add_argument("--requests", type=int, default=40, help="requests to send (default 40)")
    demo.add_argument("--color", action="store_true", help="colour the output")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.requests < 1:
            parser.error("--requests must be at least 1")
        from .demo import run

        outcome = run(sys.stdout, requests=args.requests, color=args.color)
        return 0 if outcome["error"] == 0 and outcome["rejected"] == 0 else 1
    parser.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
