"""Shared by ``benchmarks.hanging_key`` and ``benchmarks.token_flood``.

- a fake upstream whose keys have scripted behaviours (``start_scripted_upstream``;
  run as a module, this file *is* that fake upstream:
  ``python -m benchmarks._harness --key ALIAS=SECRET=BEHAVIOUR ... [--stats FILE]``,
  first stdout line its base URL, like ``keyrotor.testing.fake_upstream``; on
  SIGINT/SIGTERM it writes its per-key counters to ``--stats`` as JSON);
- ``keyrotor serve --no-state`` with an optional TOML file (``start_proxy``);
- a minimal h11 client over trio (``HTTPConnection``), with an optional source address;
- small report helpers.

The child processes come from ``benchmarks.proxy_load``'s ``child`` (own session,
parent-death signal, SIGTERM then SIGKILL on exit, whatever happens). Only
127.0.0.0/8 is ever contacted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import resource
import select
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import trio

from .proxy_load import (
    LOOPBACK,
    STARTUP_TIMEOUT,
    BenchError,
    Child,
    Connection,
    _child_env,
    child,
    free_port,
    memory,
    ms,
    pct,
    run_main,
    run_trio,
    wait_ready,
)

__all__ = [
    "LOOPBACK",
    "MB",
    "TRANSPORT_ERRORS",
    "BenchError",
    "Child",
    "HTTPConnection",
    "LineReader",
    "Reply",
    "chat_body",
    "child",
    "child_env",
    "get_json",
    "memory",
    "ms",
    "pct",
    "raise_nofile_limit",
    "run_main",
    "run_trio",
    "run_trio_until_signal",
    "start_proxy",
    "start_scripted_upstream",
]

MB = 1024 * 1024
MODEL = "openai/gpt-4o-mini"
BEHAVIOURS = ("ok", "hang", "drop", "truncate")
TRANSPORT_ERRORS = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    h11.ProtocolError,
    EOFError,
)


def median_time(call: Callable[[], Any], n: int) -> float:
    """Median seconds per call over ``n`` calls of ``call``, each timed alone."""
    times = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """``proxy_load``'s scrubbed environment, without any ``KEYROTOR_*`` variable
    of the caller's either (tokens, a state path), plus ``extra``."""
    env = {k: v for k, v in _child_env({}).items() if not k.startswith("KEYROTOR_")}
    env.update(extra)
    return env


def chat_body(*, stream: bool = False, content: str = "hi") -> bytes:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- the fake upstream


def _behaviour(name: str) -> Any:
    from keyrotor.testing import Drop, Hang, Ok, Truncate

    return {"ok": Ok, "hang": Hang, "drop": Drop, "truncate": Truncate}[name]()


def _upstream_main(argv: Sequence[str] | None = None) -> int:
    import anyio

    from keyrotor.testing import FakeUpstream, Scenario

    parser = argparse.ArgumentParser(prog="python -m benchmarks._harness")
    parser.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="ALIAS=SECRET=BEHAVIOUR",
        help=f"a key; BEHAVIOUR one of {', '.join(BEHAVIOURS)}",
    )
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--stats", metavar="FILE", help="write per-key counters here on exit")
    args = parser.parse_args(argv)
    scenario = Scenario()
    for spec in args.key:
        alias, secret, behaviour = spec.split("=", 2)
        if behaviour not in BEHAVIOURS:
            parser.error(f"unknown behaviour {behaviour!r} in --key {spec!r}")
        scenario.add(secret, _behaviour(behaviour), alias=alias)
    server = FakeUpstream(scenario, host=LOOPBACK, port=args.port)

    async def serve() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with server.serve():
                print(server.url, flush=True)
                async for _ in signals:
                    break

    try:
        anyio.run(serve)
    finally:
        if args.stats:
            stats = {alias: _key_stats(server, alias) for alias in scenario.aliases.values()}
            totals = server.totals()
            out = {
                "keys": stats,
                "totals": {
                    "requests": totals.requests,
                    "connections": totals.connections,
                    "disconnects": totals.disconnects,
                    "errors": totals.errors,
                },
            }
            Path(args.stats).write_text(json.dumps(out))
    return 0


def _key_stats(server: Any, alias: str) -> dict[str, Any]:
    s = server.stats(alias)
    return {
        "requests": s.requests,
        "by_status": {str(k): v for k, v in s.by_status.items()},
        "max_in_flight": s.max_in_flight,
        "in_flight": s.in_flight,
        "disconnects": s.disconnects,
    }


def start_scripted_upstream(
    stack: ExitStack, keys: Mapping[str, tuple[str, str]], stats_file: Path | None = None
) -> tuple[Child, str]:
    """The fake upstream with ``keys`` (alias -> (secret, behaviour)); its base URL."""
    cmd = [sys.executable, "-m", "benchmarks._harness"]
    for alias, (secret, behaviour) in keys.items():
        cmd += ["--key", f"{alias}={secret}={behaviour}"]
    if stats_file is not None:
        cmd += ["--stats", str(stats_file)]
    upstream = stack.enter_context(child("fake upstream", cmd, child_env({}), stdout=True))
    assert upstream.proc.stdout is not None
    line = LineReader(upstream.proc.stdout.fileno()).readline(STARTUP_TIMEOUT)
    if not line or not line.startswith(f"http://{LOOPBACK}:"):
        raise BenchError(f"the fake upstream did not start:\n{upstream.log_tail()}")
    return upstream, line.rstrip("/")


# --------------------------------------------------------------------------- the proxy


def start_proxy(
    stack: ExitStack,
    upstream_url: str,
    *,
    env: Mapping[str, str],
    config: str | None = None,
) -> tuple[Child, int]:
    """``keyrotor serve --no-state --upstream URL`` (with ``config`` written to a
    TOML file in a temporary directory); the process and its port once
    ``/healthz`` answers 200."""
    base = [sys.executable, "-m", "keyrotor.cli", "serve", "--host", LOOPBACK, "--no-state"]
    if config is not None:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        path = folder / "keyrotor.toml"
        path.write_text(config)
        base += ["--config", str(path)]
    attempts: list[str] = []
    for port in (0, free_port()):
        cmd = [*base, "--port", str(port), "--upstream", upstream_url]
        with ExitStack() as attempt:
            proxy = attempt.enter_context(
                child("keyrotor proxy", cmd, child_env(env), stdout=False)
            )
            ready = wait_ready(proxy, None if port == 0 else port, "/healthz")
            if ready is not None:
                stack.enter_context(attempt.pop_all())
                return proxy, ready
            attempts.append(
                f"--port {port}: exit status {proxy.proc.poll()}, log:\n{proxy.log_tail()}"
            )
    raise BenchError("the keyrotor proxy did not become ready:\n" + "\n".join(attempts))


def get_json(port: int, path: str, token: str | None = None, timeout: float = 10.0) -> Any:
    """``GET http://127.0.0.1:PORT/path`` as JSON (BenchError unless 200)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise BenchError(f"GET {path}: HTTP {response.status}: {body[:300]!r}")
        return json.loads(body)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise BenchError(f"GET {path}: {exc!r}") from exc
    finally:
        conn.close()


class LineReader:
    """Lines from a child's stdout pipe with a timeout (``select`` on the fd, no
    buffered reader that could hide a line from ``select``)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""
        self.eof = False

    def readline(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer and not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                data = os.read(self.fd, 65536)
                self.buffer += data
                self.eof = not data
        if b"\n" not in self.buffer:
            line, self.buffer = self.buffer, b""
            return line.decode("utf-8", "replace") or None
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode("utf-8", "replace")


def run_trio_until_signal(fn: Callable[[], Awaitable[None]]) -> None:
    """``proxy_load.run_trio(fn)`` with SIGTERM turned into ``SystemExit(143)``
    inside the run (a handler raising from the middle of trio's loop would tear
    it apart): tasks are cancelled and their ``finally`` blocks run in trio."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGTERM) as signals:

                async def watch() -> None:
                    async for signum in signals:
                        raise SystemExit(128 + signum)

                nursery.start_soon(watch)
                await fn()
                nursery.cancel_scope.cancel()

    run_trio(main)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit (children
    inherit it); returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# --------------------------------------------------------------------------- the h11 client


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    head_at: float  # trio clock, response head received
    end_at: float  # trio clock, last body byte received


class HTTPConnection(Connection):
    """A keep-alive h11 connection (``proxy_load``'s socket handling), opened from an
    optional source address, whose ``request`` returns the whole answer with its timings."""

    def __init__(self, stream: trio.SocketStream) -> None:
        super().__init__(stream)
        self.h11 = h11.Connection(h11.CLIENT)

    @property
    def reusable(self) -> bool:
        return (
            not self.closed and self.h11.our_state is h11.IDLE and self.h11.their_state is h11.IDLE
        )

    @classmethod
    async def connect(
        cls, port: int, *, source: str | None = None, timeout: float = 5.0
    ) -> HTTPConnection:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(LOOPBACK, port, local_address=source)
        return cls(stream)

    def stale(self) -> bool:
        """An idle connection with something to read was closed by the server."""
        return self.closed or self.stream.socket.is_readable()

    async def request(
        self, method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes = b""
    ) -> Reply:
        """Send one request, read its whole response. Transport failures raise."""
        conn = self.h11
        all_headers = [("host", f"{LOOPBACK}"), *headers]
        if body or method in ("POST", "PUT", "PATCH"):
            all_headers.append(("content-length", str(len(body))))
        data = conn.send(h11.Request(method=method, target=target, headers=all_headers)) or b""
        if body:
            data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(data)
        status = 0
        reply_headers: dict[str, str] = {}
        parts: list[bytes] = []
        head_at = math.nan
        while True:
            event: Any = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await self.stream.receive_some(65536))
                continue
            kind = type(event)
            if kind is h11.Data:
                parts.append(bytes(event.data))
            elif kind is h11.Response:
                status = event.status_code
                head_at = trio.current_time()
                reply_headers = {
                    k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers
                }
            elif kind is h11.EndOfMessage:
                break
            elif kind is h11.ConnectionClosed:
                raise EOFError("connection closed by the server mid-response")
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        return Reply(status, reply_headers, b"".join(parts), head_at, trio.current_time())


if __name__ == "__main__":
    raise SystemExit(_upstream_main())
