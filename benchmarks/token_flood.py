"""A tokenless flood must not hurt authorised clients of ``keyrotor serve``.

    .venv/bin/python -m benchmarks.token_flood [--duration 60] [--slow 2000] [--big 60]
        [--slow-interval 20] [--baseline] [--connect-each] [--keys 4] [--timeout 10] [--json]

A quick run: ``.venv/bin/python -m benchmarks.token_flood --duration 20 --slow 500 --big 10
--baseline``; the issue's report used ``--slow 10000``.

Linux only (the flood comes from 127.0.0.2, which Linux routes to loopback like
all of 127.0.0.0/8). Raises this process's RLIMIT_NOFILE soft limit to the hard
limit first (the children inherit it) and says so when even that is too low for
the flood. Child processes (each in its own session, with a parent-death signal,
stopped on exit, on errors, on Ctrl-C and on SIGTERM):

- a fake upstream on 127.0.0.1 (``python -m benchmarks._harness``) with ``--keys``
  healthy keys (``Ok``);
- ``keyrotor serve --no-state --upstream URL`` with the keys in ``OPENROUTER_KEYS``
  and one random client token (43 characters) in ``KEYROTOR_CLIENT_TOKENS``,
  everything else at its defaults;
- during the flood phase, the flood itself in its own process (``python -m
  benchmarks.token_flood --flood-worker ...``, so that its sending does not
  stall the measuring client's event loop). Every flood socket is bound to
  ``('127.0.0.2', 0)`` before it connects (at most 256 connects at once), then:
  - ``--slow`` connections (2000) send a request head without a token declaring
    ``Content-Length: 1048576``, then one body byte every ``--slow-interval``
    seconds (20; each connection at its own phase);
  - ``--big`` connections (60) send a head without a token declaring 10 MiB
    (the proxy's default ``max_body_bytes``, so not refused for its size) and
    then 10 MiB less one byte as fast as they can, and wait.
  Each flood connection reads what the proxy sends: an answer's status (401
  expected) and whether and when the proxy closed it.

Meanwhile an authorised client on 127.0.0.1 (``Authorization: Bearer TOKEN``)
sends small non-streaming ``POST /v1/chat/completions`` one after the other for
``--duration`` seconds (60) on one keep-alive connection (``--connect-each``: a
new connection per request), recording latency (send to last byte) and status;
any non-200, transport failure or no answer within ``--timeout`` (10 s) is an
error. ``--baseline`` first runs the same client for ``--duration`` without a
flood, so the report shows both side by side.

The proxy's resident memory (``VmRSS`` of /proc/PID/status, sampled every 0.1 s)
is reported before the flood, at its peak during it, and 5 s after the flood's
connections are closed. The proxy's own log gives what it did with the
127.0.0.2 requests. Target: "authorised p99 under 50 ms during the flood; memory
returns after it". ``--json``: the results as JSON on stdout (the table then goes
to stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import secrets
import signal
import socket
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from typing import Any

import trio

from ._harness import (
    LOOPBACK,
    MB,
    TRANSPORT_ERRORS,
    BenchError,
    Child,
    HTTPConnection,
    LineReader,
    chat_body,
    child,
    child_env,
    memory,
    ms,
    pct,
    raise_nofile_limit,
    run_main,
    run_trio,
    run_trio_until_signal,
    start_proxy,
    start_scripted_upstream,
)
from .proxy_load import _on_sigterm

FLOOD_SOURCE = "127.0.0.2"
SLOW_BODY = 1 << 20  # declared by each slow connection
BIG_BODY = 10 << 20  # declared by each big one; it sends one byte less
CONNECTS_AT_ONCE = 256
CONNECT_TIMEOUT = 10.0
AFTER = 5.0  # seconds after the flood's connections are closed
SAMPLE_EVERY = 0.1
TARGET_P99 = 0.050
MEMORY_SLACK = 20 * MB  # "returns": at most this much above the level before the flood
TARGET = "authorised p99 under 50 ms during the flood; memory returns after it"


# --------------------------------------------------------------------------- the flood worker


@dataclass
class KindStats:
    """What the flood connections of one kind saw."""

    planned: int
    opened: int = 0
    connect_failed: Counter[str] = field(default_factory=Counter)
    answered: Counter[int] = field(default_factory=Counter)  # status -> connections
    closed_by_server: int = 0  # FIN or reset from the proxy
    closed_unanswered: int = 0  # ... without a byte of an answer
    open_at_stop: int = 0
    body_sent: int = 0  # big: sent all of its 10 MiB less one byte
    bytes_sent: int = 0
    answer_after: list[float] = field(default_factory=list)  # connect -> first answer byte
    close_after: list[float] = field(default_factory=list)  # connect -> the proxy's close

    def to_json(self) -> dict[str, Any]:
        def dist(values: list[float]) -> dict[str, float] | None:
            if not values:
                return None
            values = sorted(values)
            return {
                "min": round(values[0], 3),
                "p50": round(pct(values, 0.5), 3),
                "max": round(values[-1], 3),
            }

        return {
            "planned": self.planned,
            "opened": self.opened,
            "connect_failed": dict(self.connect_failed),
            "answered": {str(k): v for k, v in sorted(self.answered.items())},
            "closed_by_server": self.closed_by_server,
            "closed_unanswered": self.closed_unanswered,
            "open_at_stop": self.open_at_stop,
            "body_sent": self.body_sent,
            "bytes_sent": self.bytes_sent,
            "answer_after_s": dist(self.answer_after),
            "close_after_s": dist(self.close_after),
        }


class FloodConnection:
    __slots__ = ("answered", "closed", "opened_at", "scope")

    def __init__(self) -> None:
        self.opened_at = trio.current_time()
        self.answered = False
        self.closed = False
        self.scope = trio.CancelScope()


def _head(port: int, length: int) -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def _body_prefix() -> bytes:
    return b'{"model":"openai/gpt-4o-mini","messages":[{"role":"user","content":"'


def _emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


async def flood(args: argparse.Namespace) -> None:
    port = args.flood_worker
    stats = {"slow": KindStats(args.slow), "big": KindStats(args.big)}
    limiter = trio.CapacityLimiter(CONNECTS_AT_ONCE)
    start = trio.current_time()
    total = args.slow + args.big
    attempted = 0
    big_pending = args.big
    rng = random.Random(0)

    def note_closed(conn: FloodConnection, kind: KindStats) -> None:
        if not conn.closed:
            conn.closed = True
            kind.closed_by_server += 1
            kind.close_after.append(trio.current_time() - conn.opened_at)
            if not conn.answered:
                kind.closed_unanswered += 1
        conn.scope.cancel()

    async def reader(stream: trio.SocketStream, conn: FloodConnection, kind: KindStats) -> None:
        first = b""  # the answer's first bytes, until its status is known
        parsed = False
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    break
                if not conn.answered:
                    conn.answered = True
                    kind.answer_after.append(trio.current_time() - conn.opened_at)
                if not parsed:
                    first += data
                    if len(first) >= 12:  # "HTTP/1.1 401"
                        parsed = True
                        parts = first.split(b" ", 2)
                        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
                        kind.answered[status] += 1
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        note_closed(conn, kind)

    async def slow_writer(stream: trio.SocketStream, conn: FloodConnection) -> None:
        kind = stats["slow"]
        await stream.send_all(_head(port, SLOW_BODY))
        due = conn.opened_at + rng.uniform(0, args.slow_interval)
        for _ in range(SLOW_BODY - 1):  # bounded; the flood's stop ends it long before
            await trio.sleep_until(due)
            await stream.send_all(b"x")
            kind.bytes_sent += 1
            due += args.slow_interval
        await trio.sleep_forever()

    async def big_writer(stream: trio.SocketStream, conn: FloodConnection) -> None:
        nonlocal big_pending
        kind = stats["big"]
        await stream.send_all(_head(port, BIG_BODY))
        prefix = _body_prefix()
        await stream.send_all(prefix)
        left = BIG_BODY - 1 - len(prefix)
        chunk = b"x" * 65536
        while left > 0:
            piece = chunk if left >= len(chunk) else chunk[:left]
            await stream.send_all(piece)
            left -= len(piece)
            kind.bytes_sent += len(piece)
        kind.body_sent += 1
        big_pending -= 1
        if big_pending == 0:
            _emit({"event": "big_sent", "after_s": round(trio.current_time() - start, 3)})
        await trio.sleep_forever()

    async def one(kind_name: str) -> None:
        nonlocal attempted
        kind = stats[kind_name]
        sock: trio.socket.SocketType | None = None
        try:
            try:
                sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                await sock.bind((args.source, 0))
                async with limiter:
                    with trio.fail_after(CONNECT_TIMEOUT):
                        await sock.connect((LOOPBACK, port))
                kind.opened += 1
            except (OSError, trio.TooSlowError) as exc:
                code = getattr(exc, "errno", None)
                reason = os.strerror(code) if isinstance(code, int) else type(exc).__name__
                kind.connect_failed[reason] += 1
                return
            finally:
                attempted += 1
                if attempted == total:
                    _emit(
                        {
                            "event": "connected",
                            "after_s": round(trio.current_time() - start, 3),
                            "opened": sum(s.opened for s in stats.values()),
                        }
                    )
            conn = FloodConnection()
            stream = trio.SocketStream(sock)
            writer = slow_writer if kind_name == "slow" else big_writer
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(reader, stream, conn, kind)
                    try:
                        await writer(stream, conn)
                    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                        note_closed(conn, kind)
        finally:
            if sock is not None:
                sock.close()

    stop = trio.Event()

    async def until_stopped() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            with trio.move_on_after(args.max_seconds):
                async for _ in signals:
                    break
        stop.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(until_stopped)
        _emit({"event": "started", "slow": args.slow, "big": args.big})
        for _ in range(args.slow):
            nursery.start_soon(one, "slow")
        for _ in range(args.big):
            nursery.start_soon(one, "big")
        await stop.wait()
        nursery.cancel_scope.cancel()
    for kind in stats.values():
        kind.open_at_stop = kind.opened - kind.closed_by_server
    _emit({"event": "done", "stats": {name: k.to_json() for name, k in stats.items()}})


def flood_main(args: argparse.Namespace) -> int:
    """The flood, until SIGTERM (or ``--max-seconds``); its stats on stdout."""
    raise_nofile_limit()
    try:
        run_trio(lambda: flood(args))
    except KeyboardInterrupt:
        return 130
    return 0


# --------------------------------------------------------------------------- the authorised client


@dataclass
class ClientRun:
    name: str
    latencies: list[float] = field(default_factory=list)  # successes only
    failed_latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    connections: int = 0
    wall: float = 0.0
    rss: list[tuple[float, int]] = field(default_factory=list)  # (t, VmRSS) samples

    @property
    def requests(self) -> int:
        return len(self.latencies) + len(self.failed_latencies)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            "requests": self.requests,
            "errors": self.error_count,
            "error_kinds": dict(self.errors),
            "statuses": dict(self.statuses),
            "p50": pct(lat, 0.5),
            "p90": pct(lat, 0.9),
            "p99": pct(lat, 0.99),
            "max": lat[-1] if lat else math.nan,
            "over_50ms": sum(x > TARGET_P99 for x in lat),
            "failed_max": max(self.failed_latencies, default=math.nan),
            "connections": self.connections,
            "wall": self.wall,
            "rss_peak": max((r for _, r in self.rss), default=0),
        }


async def sample_rss(pid: int, into: list[tuple[float, int]], start: float) -> None:
    while True:  # cancelled by the caller
        into.append((trio.current_time() - start, memory(pid)[0]))
        await trio.sleep(SAMPLE_EVERY)


async def authorised_client(
    port: int,
    token: str,
    run: ClientRun,
    *,
    duration: float,
    timeout: float,
    connect_each: bool,
    pid: int,
) -> None:
    body = chat_body(content="hello")
    headers = [("authorization", f"Bearer {token}"), ("content-type", "application/json")]
    start = trio.current_time()
    stop = start + duration
    conn: HTTPConnection | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample_rss, pid, run.rss, start)
        try:
            for _ in range(int(duration * 10_000) + 1):  # bounded; the clock ends it first
                sent = trio.current_time()
                if sent >= stop:
                    break
                ok = False
                try:
                    with trio.fail_after(timeout):
                        if conn is None or not conn.reusable or conn.stale():
                            if conn is not None:
                                conn.close()
                            conn = await HTTPConnection.connect(port, timeout=timeout)
                            run.connections += 1
                        reply = await conn.request("POST", "/v1/chat/completions", headers, body)
                    run.statuses[str(reply.status)] += 1
                    ok = reply.status == 200
                    if not ok:
                        run.errors[f"HTTP {reply.status}"] += 1
                except trio.TooSlowError:
                    run.errors[f"no answer within {timeout:g} s"] += 1
                    run.statuses["none"] += 1
                    if conn is not None:
                        conn.close()
                except TRANSPORT_ERRORS as exc:
                    run.errors[type(exc).__name__] += 1
                    run.statuses["none"] += 1
                    if conn is not None:
                        conn.close()
                (run.latencies if ok else run.failed_latencies).append(trio.current_time() - sent)
                if connect_each and conn is not None:
                    conn.close()
        finally:
            if conn is not None:
                conn.close()
            run.wall = trio.current_time() - start
            nursery.cancel_scope.cancel()


async def sample_for(pid: int, seconds: float, into: list[tuple[float, int]]) -> None:
    start = trio.current_time()
    with trio.move_on_after(seconds):
        await sample_rss(pid, into, start)
    into.append((trio.current_time() - start, memory(pid)[0]))


async def warm_up(port: int, token: str) -> None:
    """A few authorised requests (they must succeed) and a tokenless one (it must get 401)."""
    conn = await HTTPConnection.connect(port)
    try:
        body = chat_body()
        with trio.fail_after(30):
            for _ in range(20):
                reply = await conn.request(
                    "POST",
                    "/v1/chat/completions",
                    [("authorization", f"Bearer {token}"), ("content-type", "application/json")],
                    body,
                )
                if reply.status != 200:
                    raise BenchError(f"warm-up: an authorised request got HTTP {reply.status}")
            reply = await conn.request(
                "POST", "/v1/chat/completions", [("content-type", "application/json")], body
            )
            if reply.status != 401:
                raise BenchError(f"warm-up: a request without a token got HTTP {reply.status}")
    finally:
        conn.close()


# --------------------------------------------------------------------------- the proxy's log


def proxy_log_summary(proxy: Child) -> dict[str, Any]:
    """What the proxy logged: requests per source address (status, outcome) and events."""
    by_source: dict[str, Counter[str]] = {}
    events: Counter[str] = Counter()
    durations: dict[str, list[float]] = {}
    for line in proxy.log_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            events["(not JSON)"] += 1
            continue
        if not isinstance(record, dict):
            continue
        if "event" in record:
            events[str(record["event"])] += 1
            continue
        source = str(record.get("client", "")).rsplit(":", 1)[0] or "?"
        label = str(record.get("status"))
        if record.get("outcome"):
            label += f" ({record['outcome']})"
        by_source.setdefault(source, Counter())[label] += 1
        if isinstance(record.get("duration_ms"), int | float):
            durations.setdefault(source, []).append(float(record["duration_ms"]) / 1000)
    return {
        "requests_by_source": {k: dict(v) for k, v in by_source.items()},
        "events": dict(events),
        "duration_by_source": {
            k: {"p50": pct(sorted(v), 0.5), "max": max(v)} for k, v in durations.items()
        },
    }


# --------------------------------------------------------------------------- report


def _rss_at(samples: list[tuple[float, int]], at: float) -> int:
    before = [r for t, r in samples if t <= at]
    return before[-1] if before else (samples[0][1] if samples else 0)


def report(result: dict[str, Any]) -> list[str]:
    o = result["options"]
    mem = result["memory"]
    out = [
        "## A tokenless flood against authorised clients (loopback, fake upstream)",
        "",
        f"- command: `{result['command']}`",
        f"- proxy: `keyrotor serve --no-state`, {o['keys']} healthy keys, one client token, "
        "every other option at its default (`[server] max_connections` 10000, "
        "`max_body_bytes` 10 MiB, `body_timeout` 30 s, `header_timeout` 10 s).",
        f"- flood from {FLOOD_SOURCE}: {o['slow']} slow connections (head without a token, "
        f"Content-Length {SLOW_BODY}, one body byte every {o['slow_interval']:g} s) and "
        f"{o['big']} big ones (head without a token, Content-Length {BIG_BODY}, then "
        f"{BIG_BODY - 1} bytes at full speed).",
        f"- authorised client from {LOOPBACK}: sequential small chat requests for "
        f"{o['duration']:g} s, "
        + ("a new connection per request" if o["connect_each"] else "one keep-alive connection")
        + f", timeout {o['timeout']:g} s.",
        f"- RLIMIT_NOFILE {result['nofile'][0]} (hard {result['nofile'][1]})"
        + (f": **{result['nofile_warning']}**" if result.get("nofile_warning") else "")
        + f"; run time {result['elapsed']:.0f} s.",
        "",
        "### Authorised client",
        "",
        "Latency from send to last byte, percentiles of the successful requests (a failure "
        "is an error, whatever its latency).",
        "",
        "| run | requests | errors | p50 ms | p90 ms | p99 ms | max ms | over 50 ms "
        "| connections | rps |",
        "|" + "---|" * 10,
    ]
    for name, s in result["runs"].items():
        rps = s["requests"] / s["wall"] if s["wall"] else math.nan
        out.append(
            f"| {name} | {s['requests']} | {s['errors']} | {ms(s['p50'])} | {ms(s['p90'])} "
            f"| {ms(s['p99'])} | {ms(s['max'])} | {s['over_50ms']} | {s['connections']} "
            f"| {rps:.0f} |"
        )
    for name, s in result["runs"].items():
        if s["error_kinds"]:
            out.append(f"- {name}: errors {json.dumps(s['error_kinds'])}")
    out += [
        "",
        "### Proxy memory (VmRSS)",
        "",
        "| before the flood | peak during | 5 s after its connections closed | VmHWM at the end |",
        "|---|---|---|---|",
        f"| {mem['before'] / MB:.1f} MB | {mem['peak_during'] / MB:.1f} MB "
        f"| {mem['after'] / MB:.1f} MB | {mem['hwm'] / MB:.1f} MB |",
        "",
        "During the flood (s since its start: MB): "
        + ", ".join(f"{t:.0f}: {r / MB:.0f}" for t, r in mem["during_every_5s"]),
        "",
        "### Flood connections",
        "",
        "| kind | planned | opened | connect failures | answered (status: connections) "
        "| closed by the proxy | of them unanswered | time to the proxy's close s "
        "(min / p50 / max) | still open at the flood's end | bodies sent in full |",
        "|" + "---|" * 10,
    ]
    flood_stats = result["flood"] or {}
    for name in ("slow", "big"):
        k = flood_stats.get(name)
        if k is None:
            out.append(f"| {name} | (the flood worker reported nothing) |" + " |" * 8)
            continue
        close = k["close_after_s"]
        close_text = f"{close['min']} / {close['p50']} / {close['max']}" if close else "-"
        out.append(
            f"| {name} | {k['planned']} | {k['opened']} "
            f"| {json.dumps(k['connect_failed']) if k['connect_failed'] else 0} "
            f"| {json.dumps(k['answered']) if k['answered'] else 'none'} "
            f"| {k['closed_by_server']} | {k['closed_unanswered']} | {close_text} "
            f"| {k['open_at_stop']} | {k['body_sent'] if name == 'big' else '-'} |"
        )
    progress = result["flood_progress"]
    if progress:
        out.append(
            "- flood progress: "
            + "; ".join(
                f"{p['event']} after {p['after_s']} s"
                + (f" ({p['opened']} opened)" if "opened" in p else "")
                for p in progress
            )
        )
    log = result["proxy_log"]
    out += [
        f"- the proxy's log, requests by source: {json.dumps(log['requests_by_source'])}",
        f"- the proxy's log, events: {json.dumps(log['events'])}",
        "",
        f"### Target: {TARGET}",
        "",
        *[f"- {v}" for v in result["verdicts"]],
    ]
    return out


def verdicts(result: dict[str, Any]) -> list[str]:
    during = result["runs"]["during the flood"]
    mem = result["memory"]
    lines = [
        f"authorised p99 during the flood {ms(during['p99'])} ms vs < 50 ms: "
        f"**{'met' if during['p99'] < TARGET_P99 and not during['errors'] else 'NOT met'}**"
        + (" (errors: see below)" if during["errors"] else "")
        + (
            f" (without the flood: {ms(result['runs']['without the flood']['p99'])} ms)"
            if "without the flood" in result["runs"]
            else ""
        ),
        f"authorised errors during the flood: {during['errors']} "
        f"({'none' if not during['errors'] else 'NOT none'})",
    ]
    grew = mem["after"] - mem["before"]
    lines.append(
        f"memory 5 s after the flood {mem['after'] / MB:.1f} MB vs {mem['before'] / MB:.1f} MB "
        f"before (+{grew / MB:.1f} MB; peak {mem['peak_during'] / MB:.1f} MB): "
        f"**{'returned' if grew <= MEMORY_SLACK else 'NOT returned'}** (allowing "
        f"{MEMORY_SLACK / MB:.0f} MB)"
    )
    return lines


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.token_flood",
        description="A tokenless flood from 127.0.0.2 against an authorised client's latency.",
    )
    p.add_argument("--duration", type=float, default=60.0, help="seconds per client run (60)")
    p.add_argument("--slow", type=int, default=2000, help="slow flood connections (2000)")
    p.add_argument("--big", type=int, default=60, help="big-body flood connections (60)")
    p.add_argument(
        "--slow-interval", type=float, default=20.0, help="seconds between slow bytes (20)"
    )
    p.add_argument("--baseline", action="store_true", help="first a run without the flood")
    p.add_argument(
        "--connect-each", action="store_true", help="authorised client: a connection per request"
    )
    p.add_argument("--keys", type=int, default=4, help="healthy upstream keys (4)")
    p.add_argument("--timeout", type=float, default=10.0, help="authorised request timeout (10)")
    p.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    # The flood itself, run by the benchmark in a child process.
    p.add_argument("--flood-worker", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("--source", default=FLOOD_SOURCE, help=argparse.SUPPRESS)
    p.add_argument("--max-seconds", type=float, default=600.0, help=argparse.SUPPRESS)
    return p


def _command(args: argparse.Namespace) -> str:
    parts = [
        ".venv/bin/python -m benchmarks.token_flood",
        f"--duration {args.duration:g}",
        f"--slow {args.slow}",
        f"--big {args.big}",
    ]
    if args.slow_interval != 20.0:
        parts.append(f"--slow-interval {args.slow_interval:g}")
    if args.baseline:
        parts.append("--baseline")
    if args.connect_each:
        parts.append("--connect-each")
    if args.keys != 4:
        parts.append(f"--keys {args.keys}")
    return " ".join(parts)


def _check_source() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((FLOOD_SOURCE, 0))
        except OSError as exc:
            raise BenchError(
                f"cannot bind to {FLOOD_SOURCE} ({exc}): this benchmark needs Linux, where "
                "all of 127.0.0.0/8 is loopback"
            ) from exc


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value


def run_client(name: str, port: int, token: str, pid: int, args: argparse.Namespace) -> ClientRun:
    run = ClientRun(name)
    run_trio_until_signal(
        lambda: authorised_client(
            port,
            token,
            run,
            duration=args.duration,
            timeout=args.timeout,
            connect_each=args.connect_each,
            pid=pid,
        )
    )
    return run


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.flood_worker is not None:
        return flood_main(args)
    if not (
        0 < args.duration <= 3600
        and 0 <= args.slow <= 100_000
        and 0 <= args.big <= 1000
        and 0 < args.slow_interval <= 25
        and 1 <= args.keys <= 100
        and 0 < args.timeout <= 300
    ):
        print(
            "error: need 0 < duration <= 3600, 0 <= slow <= 100000, 0 <= big <= 1000, "
            "0 < slow-interval <= 25 (the proxy's body_timeout is 30 s), 1 <= keys <= 100, "
            "0 < timeout <= 300",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    nofile = raise_nofile_limit()
    needed = args.slow + args.big + 256
    nofile_warning = ""
    if nofile[0] < needed:
        nofile_warning = (
            f"RLIMIT_NOFILE is {nofile[0]} (hard limit {nofile[1]}), below the {needed} file "
            "descriptors the flood and the proxy each need: expect connect failures "
            "(raise the hard limit, e.g. `ulimit -Hn`, as root)"
        )
        print(f"warning: {nofile_warning}", file=sys.stderr, flush=True)
    _check_source()
    started = time.monotonic()
    token = secrets.token_urlsafe(32)
    with ExitStack() as stack:
        keys = {
            f"ok-{i}": (f"sk-or-v1-fake-token-flood-{i}", "ok") for i in range(1, args.keys + 1)
        }
        upstream, url = start_scripted_upstream(stack, keys)
        env = {
            "OPENROUTER_KEYS": ",".join(secret for secret, _ in keys.values()),
            "KEYROTOR_CLIENT_TOKENS": token,
        }
        proxy, port = start_proxy(stack, url, env=env)
        print(
            f"fake upstream pid {upstream.pid} at {url}; proxy pid {proxy.pid} at "
            f"http://{LOOPBACK}:{port}",
            file=sys.stderr,
            flush=True,
        )
        run_trio_until_signal(lambda: warm_up(port, token))
        runs: dict[str, ClientRun] = {}
        if args.baseline:
            print(f"baseline: {args.duration:g} s without the flood", file=sys.stderr, flush=True)
            runs["without the flood"] = run_client(
                "without the flood", port, token, proxy.pid, args
            )
        before = memory(proxy.pid)[0]
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.token_flood",
            "--flood-worker",
            str(port),
            "--slow",
            str(args.slow),
            "--big",
            str(args.big),
            "--slow-interval",
            str(args.slow_interval),
            "--max-seconds",
            str(args.duration + 120),
        ]
        worker = stack.enter_context(child("flood", cmd, child_env({}), stdout=True))
        assert worker.proc.stdout is not None
        lines = LineReader(worker.proc.stdout.fileno())
        first = lines.readline(30.0)
        if not first or json.loads(first).get("event") != "started":
            raise BenchError(f"the flood did not start: {first!r}\n{worker.log_tail()}")
        print(
            f"flood pid {worker.pid}: {args.slow} slow + {args.big} big connections from "
            f"{FLOOD_SOURCE}; authorised client for {args.duration:g} s",
            file=sys.stderr,
            flush=True,
        )
        during = run_client("during the flood", port, token, proxy.pid, args)
        runs["during the flood"] = during
        worker.proc.send_signal(signal.SIGTERM)
        progress: list[dict[str, Any]] = []
        flood_stats: dict[str, Any] | None = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = lines.readline(max(0.1, deadline - time.monotonic()))
            if line is None:
                break
            with suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == "done":
                    flood_stats = record["stats"]
                    break
                progress.append(record)
        with suppress(Exception):
            worker.proc.wait(timeout=10)
        worker.stop()
        if flood_stats is None:
            print(f"warning: no stats from the flood:\n{worker.log_tail()}", file=sys.stderr)
        after_samples: list[tuple[float, int]] = []
        run_trio_until_signal(lambda: sample_for(proxy.pid, AFTER, after_samples))
        if proxy.proc.poll() is not None:
            raise BenchError(f"the proxy exited:\n{proxy.log_tail()}")
        hwm = memory(proxy.pid)[1]
        peak = max([r for _, r in during.rss] + [before])
        result: dict[str, Any] = {
            "command": _command(args),
            "options": {
                "duration": args.duration,
                "slow": args.slow,
                "big": args.big,
                "slow_interval": args.slow_interval,
                "keys": args.keys,
                "timeout": args.timeout,
                "connect_each": args.connect_each,
            },
            "nofile": nofile,
            "nofile_warning": nofile_warning,
            "runs": {name: r.summary() for name, r in runs.items()},
            "memory": {
                "before": before,
                "peak_during": peak,
                "after": after_samples[-1][1] if after_samples else 0,
                "after_min": min((r for _, r in after_samples), default=0),
                "hwm": hwm,
                "during_every_5s": [
                    (t, _rss_at(during.rss, t))
                    for t in range(0, int(during.wall) + 1, 5)
                    if during.rss
                ],
            },
            "flood": flood_stats,
            "flood_progress": progress,
            "proxy_log": proxy_log_summary(proxy),
            "elapsed": time.monotonic() - started,
        }
        result["verdicts"] = verdicts(result)
        text = "\n".join(report(result))
        if args.json:
            print(text, file=sys.stderr, flush=True)
            result["rss_samples"] = {
                "during": during.rss,
                "after": after_samples,
                "median_during": statistics.median([r for _, r in during.rss]) if during.rss else 0,
            }
            print(json.dumps(_nan_to_none(result), indent=1))
        else:
            print(text, flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
