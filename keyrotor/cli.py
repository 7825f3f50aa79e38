"""The ``keyrotor`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from contextlib import suppress
from typing import NoReturn

__all__ = ["ArgumentParser", "main", "version"]


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose usage errors are one line on stderr, exit status 2.

    Subcommand parsers inherit the class, so ``keyrotor serve --port abc`` says
    ``keyrotor serve: argument --port: invalid int value: 'abc'; see keyrotor
    serve --help`` instead of a usage block.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}; see {self.prog} --help\n")


def version() -> str:
    """The installed package's version (``keyrotor.__version__`` when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("keyrotor")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree
        from . import __version__

        return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``keyrotor`` console script.

    Ctrl-C (``KeyboardInterrupt``) ends any command with one line and exit
    status 130; a closed stdout (``keyrotor ... | head``) quietly with 1; either
    also when it comes out of an event loop's task, wrapped in exception groups
    (with Ctrl-C, beside what it broke in other tasks).
    """
    try:
        return _main(argv)
    except (KeyboardInterrupt, BrokenPipeError, BaseExceptionGroup) as exc:
        from .transports.errors import leaves as inside

        leaves = {type(leaf) for leaf in inside(exc)}
        if KeyboardInterrupt in leaves:
            # What the interrupt cut short (a connection attempt's coroutine) is
            # collected at exit: no "never awaited" warning after the one line.
            warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
            with suppress(OSError):
                print("keyrotor: interrupted", file=sys.stderr)
            return 130
        if leaves == {BrokenPipeError}:  # the reader has what it wanted
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
            return 1
        raise


def _main(argv: Sequence[str] | None) -> int:
    parser = ArgumentParser(
        prog="keyrotor", description="Pool many LLM API keys behind one client or proxy."
    )
    parser.add_argument(
        "--version", action="version", version=f"keyrotor {version()}", help="print the version"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="run a built-in failover and recovery scenario (no network, no API key)"
    )
    demo.add_argument("--requests", type=int, default=40, help="requests to send (default 40)")
    demo.add_argument("--color", action="store_true", help="colour the output")
    demo.add_argument(
        "--core",
        action="store_true",
        help="run the scenario through the core alone, on a virtual clock (no proxy)",
    )
    serve = commands.add_parser(
        "serve", help="run the OpenAI-compatible proxy in front of the key pool"
    )
    serve.add_argument(
        "--config", metavar="FILE", help="TOML configuration (docs/configuration.md)"
    )
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument("--upstream", metavar="URL", help="upstream base URL (default OpenRouter's)")
    serve.add_argument(
        "--record",
        metavar="FILE",
        help="write a trace of the traffic to FILE, for `keyrotor replay` (docs/replay.md)",
    )
    state = serve.add_mutually_exclusive_group()
    state.add_argument(
        "--state",
        metavar="PATH",
        help="the state file: keys added at runtime, health, spend "
        "(default $KEYROTOR_STATE, else the user's data directory)",
    )
    state.add_argument(
        "--no-state", action="store_true", help="keep nothing: a purely in-memory run"
    )
    serve.add_argument(
        "--workers",
        metavar="N",
        default="1",
        help="processes serving one port (a number, or auto: the machine's cores); more than "
        "one needs --shared (docs/scaling.md)",
    )
    serve.add_argument(
        "--shared",
        metavar="URL",
        help="share key health with the pool's other processes through Redis "
        "(redis://host:port/db; docs/scaling.md)",
    )
    from .adapters.keys_cli import add_parser as add_keys_parser

    add_keys_parser(commands)
    from .replay.cli import add_parser as add_replay_parser

    add_replay_parser(commands)
    from .adapters.models_cli import add_parser as add_models_parser

    add_models_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "models":
        from .adapters.models_cli import run as run_models

        return run_models(args)
    if args.command == "replay":
        from .replay.cli import run as run_replay

        return run_replay(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "keys":
        from .adapters.keys_cli import run as run_keys

        return run_keys(args)
    if args.command == "demo":
        if args.requests < 1:
            demo.error("--requests must be at least 1")
        if not args.core:
            try:
                from .adapters.proxy.demo import run_demo
            except ImportError as exc:  # installed without the proxy extra
                print(
                    f"keyrotor demo: the live proxy demo needs `pip install 'keyrotor[proxy]'` "
                    f"({exc.name} is missing); running the core-only demo instead.\n",
                    file=sys.stderr,
                )
            else:
                live = run_demo(sys.stdout, requests=args.requests, color=args.color)
                return 0 if live["error"] == 0 else 1
        from .demo import run

        outcome = run(sys.stdout, requests=args.requests, color=args.color)
        return 0 if outcome["error"] == 0 and outcome["rejected"] == 0 else 1
    parser.print_help()
    print(
        "keyrotor: no command given; choose one of demo, serve, keys, models, replay",
        file=sys.stderr,
    )
    return 2


def _serve(args: argparse.Namespace) -> int:
    import os

    from .adapters.config import ConfigError, load_config

    overrides = {
        name: value
        for name, value in (
            ("host", args.host),
            ("port", args.port),
            ("upstream", args.upstream),
            ("record", args.record),
            ("state.path", args.state),
            ("state.enabled", False if args.no_state else None),
            ("shared.url", args.shared),
        )
        if value is not None
    }
    try:
        config = load_config(args.config, os.environ, overrides)
    except ConfigError as exc:
        print(f"keyrotor serve: {exc}", file=sys.stderr)
        return 2
    from .adapters.proxy.workers import supervise, worker_count

    try:
        workers = worker_count(args.workers)
    except ValueError as exc:
        print(f"keyrotor serve: {exc}", file=sys.stderr)
        return 2
    if workers > 1:
        problem = (
            "--workers needs --shared redis://host:port/db (or [shared] url): without it each "
            "process would keep its own view of the keys (docs/scaling.md)"
            if config.shared_url is None
            else "--workers cannot --record: give each process its own trace, or record with one"
            if config.record is not None
            else None
        )
        if problem is not None:
            print(f"keyrotor serve: {problem}", file=sys.stderr)
            return 2
        child = [
            *(["--config", args.config] if args.config else []),
            # "is not None": an empty --host (every interface) is a value to pass on
            *(["--host", args.host] if args.host is not None else []),
            *(["--upstream", args.upstream] if args.upstream is not None else []),
            *(["--shared", args.shared] if args.shared is not None else []),
            *(["--no-state"] if config.state_path is None else []),
        ]
        from .adapters.proxy.logs import LineLog
        from .adapters.proxy.workers import check
        from .adapters.storage import StorageError

        host, port = config.server["host"], config.server["port"]
        grace = float(config.server["grace_period"])
        log = LineLog(sys.stderr, config.log_format)
        try:
            check(config, workers, log)  # the state files and keys, before any worker starts
            return supervise(child, workers, host, port, config.state_path, grace, log)
        except (ConfigError, StorageError) as exc:
            print(f"keyrotor serve: {exc}", file=sys.stderr)
            return 2
    from .adapters.proxy.main import run
    from .adapters.storage import StorageError

    try:
        run(config)
    except (ConfigError, StorageError) as exc:
        print(f"keyrotor serve: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
