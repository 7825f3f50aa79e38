"""Command line of the fake OpenRouter upstream (and its public names).

    python -m keyrotor.testing.fake_upstream --port 0 --scenario demo

prints the base URL (``http://127.0.0.1:PORT/api/v1``) as the first line of
stdout, then the line that starts the proxy in front of it with the scenario's
fake keys (``OPENROUTER_KEYS=... keyrotor serve --upstream URL``), then serves
until SIGINT or SIGTERM. It binds to loopback only. The scenario's keys
(aliases and behaviours) go to stderr; the ``demo`` secrets are the fake
values of ``keyrotor.testing.DEMO_KEYS``. With ``--certfile`` and ``--keyfile``
it serves HTTPS (the URL is ``https://``, the printed line trusts the
certificate through ``SSL_CERT_FILE``; ``keyrotor.testing.certificates`` makes a
self-signed one). Bad input (a busy port, a host that is not loopback, half a
certificate) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from .certificates import server_context
from .scenarios import SCENARIOS, Scenario, scenario
from .server import FakeUpstream, KeyStats, LogEntry, ServerStats

__all__ = ["FakeUpstream", "KeyStats", "LogEntry", "ServerStats", "main", "serve_command"]

PROG = "python -m keyrotor.testing.fake_upstream"
_OPEN_KEYS = ("sk-or-v1-fake-open-1", "sk-or-v1-fake-open-2")  # any key works on `open`


def serve_command(scenario: Scenario, url: str, certfile: str | None = None) -> str:
    """The shell line that runs ``keyrotor serve`` in front of the fake upstream
    at ``url``, with the scenario's (fake) keys; where any key works (``open``,
    ``faulty``), two healthy ones are added. ``certfile``: the HTTPS upstream's
    self-signed certificate, which the proxy then trusts (``SSL_CERT_FILE``)."""
    listed = list(scenario.keys)
    if scenario.unknown is not None:
        listed = [*_OPEN_KEYS, *listed]
    keys = ",".join(listed)
    trust = "" if certfile is None else f"SSL_CERT_FILE={certfile} "
    return f"{trust}OPENROUTER_KEYS={keys} keyrotor serve --upstream {url}"


def _parser() -> argparse.ArgumentParser:
    from ..cli import ArgumentParser  # usage errors as one line, exit status 2

    parser = ArgumentParser(
        prog=PROG,
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
    parser.add_argument(
        "--catalog",
        default="default",
        choices=["default", "realistic"],
        help="the /models catalog: 4 models, or realistic_models() (320)",
    )
    parser.add_argument(
        "--certfile",
        help="serve HTTPS with this PEM certificate (chain); needs --keyfile (the URL is https)",
    )
    parser.add_argument("--keyfile", help="the PEM private key of --certfile")
    parser.add_argument(
        "--no-cost",
        action="store_true",
        help="answers' usage without cost, as OpenAI's (OpenRouter's report it)",
    )
    return parser


def _tls(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    """The server context of ``--certfile``/``--keyfile`` (None: plain HTTP);
    ``ValueError`` with the problem and its fix."""
    if certfile is None and keyfile is None:
        return None
    if certfile is None or keyfile is None:
        raise ValueError("--certfile and --keyfile go together; fix: give both, or neither")
    try:
        return server_context(Path(certfile), Path(keyfile))
    except (OSError, ssl.SSLError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(
            f"cannot load --certfile {certfile!r} with --keyfile {keyfile!r}: {problem}; "
            "fix: a PEM certificate and its matching unencrypted PEM key"
        ) from None


def _build(name: str, keys: int) -> Scenario:
    return Scenario.healthy(keys) if name == "healthy" else scenario(name)


async def _serve(server: FakeUpstream, name: str, certfile: str | None) -> None:
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
            print(
                "fake upstream: to run the proxy in front of it with these fake keys, paste:",
                file=sys.stderr,
                flush=True,
            )
            print(serve_command(sc, server.url, certfile), flush=True)
            async for signum in signals:
                print(f"fake upstream: {signal.Signals(signum).name}, stopping", file=sys.stderr)
                break


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fake upstream until SIGINT/SIGTERM; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be from 0 to 65535 (0: any free port), got {args.port}")
    if args.keys < 1:
        parser.error(f"--keys must be at least 1, got {args.keys}")
    try:
        context = _tls(args.certfile, args.keyfile)
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    try:
        built = _build(args.scenario, args.keys)
        if args.catalog == "realistic":
            from .catalogs import realistic_models

            built.models = realistic_models()
        built.report_cost = not args.no_cost
        server = FakeUpstream(built, host=args.host, port=args.port, ssl_context=context)
    except ValueError as exc:
        print(f"{PROG}: {exc}; fix: use --host 127.0.0.1", file=sys.stderr)
        return 2
    try:
        anyio.run(_serve, server, args.scenario, args.certfile, backend=args.backend)
    except (OSError, BaseExceptionGroup) as exc:
        error = _sole(exc)
        if not isinstance(error, OSError):
            raise
        where = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"
        if error.errno == errno.EADDRINUSE:
            problem, fix = "address already in use", "choose another --port (0: any free port)"
        else:
            problem, fix = (error.strerror or str(error)), "check --host and --port"
        print(f"{PROG}: cannot listen on {where}: {problem}; fix: {fix}", file=sys.stderr)
        return 2
    return 0


def _sole(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups (or ``exc``)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":
    raise SystemExit(main())
