"""One hanging key among four healthy ones at 10 requests/s, through ``keyrotor serve``.

    .venv/bin/python -m benchmarks.hanging_key [--rate 10] [--duration 150]
        [--first-byte 2.0] [--first-byte-stream S] [--max-connections-per-key N]
        [--streams] [--split 60] [--timeout 300] [--json]

A quick run: ``.venv/bin/python -m benchmarks.hanging_key --duration 20``.

Starts two child processes on 127.0.0.1 (each in its own session, with a
parent-death signal, stopped on exit, on errors, on Ctrl-C and on SIGTERM):

- a fake upstream (``python -m benchmarks._harness``, keyrotor.testing's
  ``FakeUpstream``) with 5 keys: ``hang`` (behaviour ``Hang``: accepts the
  request, never answers) and ``ok-1`` .. ``ok-4`` (``Ok``);
- ``keyrotor serve --no-state --config FILE --upstream URL``: the file lists the
  5 keys as ``[[keys]]`` (``hang`` first, secrets in the environment) and
  ``[http] first_byte = --first-byte`` (2.0 s). ``first_byte_stream`` and
  ``max_connections_per_key`` are written only when given, so the script runs on
  proxies that do not know them yet; with ``--streams`` and a keyrotor whose
  ``HTTPOptions`` has ``first_byte_stream``, that option gets the
  ``--first-byte`` value unless ``--first-byte-stream`` says otherwise.

Then open-loop traffic: request ``i`` is due at ``start + i / rate`` and sent
then from its own trio task on an idle keep-alive connection (a new one when
none is idle), whatever happened to earlier requests: ``POST
/v1/chat/completions``, non-streaming (``--streams``: ``"stream": true``, the SSE
body read to its end). Latency runs from the scheduled time to the last body
byte (no coordinated omission); a request gets ``--timeout`` seconds (300). Per
request: scheduled time, latency, time to the response head, status, and the
``x-keyrotor-key`` / ``x-keyrotor-attempts`` response headers.

Report: requests, errors (non-200 or transport failure), latency p50/p90/p99/max
in the first ``--split`` seconds (60) and after, requests over 1 s in each phase,
how many requests went first to the hanging key (``x-keyrotor-attempts`` > 1),
``GET /status`` at the end (each key's state and its errors by class: the
healthy keys must not be charged transport errors), and what the fake upstream
saw per key. Target: "p99 under 2x the first-byte deadline for the first minute
and under 1 s after it". ``--json``: the results as JSON on stdout (the table
then goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio

from ._harness import (
    MB,
    TRANSPORT_ERRORS,
    BenchError,
    HTTPConnection,
    chat_body,
    get_json,
    memory,
    ms,
    pct,
    run_main,
    run_trio_until_signal,
    start_proxy,
    start_scripted_upstream,
)
from .proxy_load import _on_sigterm

HANG_ALIAS = "hang"
OK_ALIASES = ("ok-1", "ok-2", "ok-3", "ok-4")
SLOW = 1.0  # "requests over 1 s"
TARGET = "p99 under 2x the first-byte deadline for the first minute and under 1 s after it"


@dataclass
class Sample:
    scheduled: float  # seconds after the first scheduled request
    latency: float  # scheduled time -> last body byte (or failure), seconds
    head: float  # scheduled time -> response head, seconds (nan: none)
    status: int  # 0: transport failure or client timeout
    error: str  # "" when status is 200
    key: str
    attempts: int  # 0: header absent


def _secret(alias: str) -> str:
    return f"sk-or-v1-fake-hanging-key-{alias}"


def _env_name(alias: str) -> str:
    return "BENCH_KEY_" + alias.upper().replace("-", "_")


def http_option_names() -> set[str]:
    """The ``[http]`` options this checkout's keyrotor knows."""
    import attrs

    from keyrotor.transports._http import HTTPOptions

    return {f.name for f in attrs.fields(HTTPOptions)}


def build_config(args: argparse.Namespace, known: set[str]) -> tuple[str, dict[str, Any]]:
    """The TOML text, and the ``[http]`` options it sets."""
    http: dict[str, Any] = {"first_byte": args.first_byte}
    if args.first_byte_stream is not None:
        http["first_byte_stream"] = args.first_byte_stream
    elif args.streams and "first_byte_stream" in known:
        http["first_byte_stream"] = args.first_byte
    if args.max_connections_per_key is not None:
        http["max_connections_per_key"] = args.max_connections_per_key
    lines = ["[http]", *(f"{name} = {value!r}" for name, value in http.items()), ""]
    for alias in (HANG_ALIAS, *OK_ALIASES):
        lines += ["[[keys]]", f'alias = "{alias}"', f'secret_env = "{_env_name(alias)}"', ""]
    return "\n".join(lines), http


def stream_deadline(http: dict[str, Any], streams: bool) -> float:
    """The first-byte deadline the requests of this run are under."""
    if streams and "first_byte_stream" in http:
        return float(http["first_byte_stream"])
    return float(http["first_byte"])


# --------------------------------------------------------------------------- load


class Pool:
    """Idle keep-alive connections (LIFO); a new one whenever none is idle."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[HTTPConnection] = []
        self.opened = 0
        self.busy = 0
        self.peak_busy = 0

    async def acquire(self) -> HTTPConnection:
        while self.idle:
            conn = self.idle.pop()
            if not conn.stale():
                break
            conn.close()
        else:
            conn = await HTTPConnection.connect(self.port)
            self.opened += 1
        self.busy += 1
        self.peak_busy = max(self.peak_busy, self.busy)
        return conn

    def release(self, conn: HTTPConnection) -> None:
        self.busy -= 1
        if conn.reusable:
            self.idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


async def one_request(
    pool: Pool, body: bytes, streaming: bool, scheduled: float, start: float, timeout: float
) -> Sample:
    headers = [("content-type", "application/json")]
    if streaming:
        headers.append(("accept", "text/event-stream"))
    conn: HTTPConnection | None = None
    status, error, key, attempts, head = 0, "", "", 0, math.nan
    try:
        with trio.move_on_at(scheduled + timeout) as scope:
            conn = await pool.acquire()
            reply = await conn.request("POST", "/v1/chat/completions", headers, body)
            status = reply.status
            head = reply.head_at - scheduled
            key = reply.headers.get("x-keyrotor-key", "")
            raw = reply.headers.get("x-keyrotor-attempts", "")
            attempts = int(raw) if raw.isdigit() else 0
            if status != 200:
                error = f"HTTP {status}"
            elif streaming and not reply.body.rstrip().endswith(b"data: [DONE]"):
                error = "stream without data: [DONE]"
        if scope.cancelled_caught:
            error = f"client timeout ({timeout:g} s)"
            if conn is not None:
                conn.close()
    except TRANSPORT_ERRORS as exc:
        error = f"{type(exc).__name__}"
        if conn is not None:
            conn.close()
    finally:
        if conn is not None:
            pool.release(conn)
    return Sample(
        scheduled=scheduled - start,
        latency=trio.current_time() - scheduled,
        head=head,
        status=status,
        error=error,
        key=key,
        attempts=attempts,
    )


async def open_loop(
    port: int, *, rate: float, duration: float, streaming: bool, timeout: float
) -> tuple[list[Sample], dict[str, Any]]:
    samples: list[Sample] = []
    lags: list[float] = []
    pool = Pool(port)
    body = chat_body(stream=streaming)
    count = max(1, round(rate * duration))
    interval = 1.0 / rate
    start = trio.current_time() + 0.05
    progress_every = max(1, round(rate * 10))

    pending: set[float] = set()  # scheduled times of the requests in flight

    async def request(scheduled: float) -> None:
        lags.append(trio.current_time() - scheduled)
        pending.add(scheduled)
        try:
            samples.append(await one_request(pool, body, streaming, scheduled, start, timeout))
        finally:
            pending.discard(scheduled)

    try:
        async with trio.open_nursery() as nursery:
            for i in range(count):
                scheduled = start + i * interval
                await trio.sleep_until(scheduled)
                nursery.start_soon(request, scheduled)
                if i and i % progress_every == 0:
                    now = trio.current_time()
                    recent = [s for s in samples if s.scheduled >= i * interval - 10]
                    slow = sum(s.latency > SLOW for s in recent)
                    old = sum(now - t > SLOW for t in pending)
                    print(
                        f"  t={i * interval:5.0f} s: {i} sent, {len(samples)} done, "
                        f"{len(pending)} in flight ({old} for over 1 s), {slow} of those sent "
                        "in the last 10 s took over 1 s",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        pool.close()
    lags.sort()
    notes = {
        "connections_opened": pool.opened,
        "peak_in_flight": pool.peak_busy,
        "dispatch_lag_p99_ms": round(pct(lags, 0.99) * 1000, 3) if lags else None,
    }
    samples.sort(key=lambda s: s.scheduled)
    return samples, notes


# --------------------------------------------------------------------------- report


def phase_stats(samples: list[Sample]) -> dict[str, Any]:
    lat = sorted(s.latency for s in samples)
    heads = sorted(s.head for s in samples if not math.isnan(s.head))
    return {
        "requests": len(samples),
        "errors": sum(s.status != 200 or bool(s.error) for s in samples),
        "p50": pct(lat, 0.5),
        "p90": pct(lat, 0.9),
        "p99": pct(lat, 0.99),
        "max": lat[-1] if lat else math.nan,
        "head_p99": pct(heads, 0.99),
        "over_1s": sum(s.latency > SLOW for s in samples),
        "failed_over": sum(s.attempts > 1 for s in samples),
        "served_by": dict(Counter(s.key or "(none)" for s in samples)),
    }


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def report(result: dict[str, Any]) -> list[str]:
    args = result["options"]
    deadline = result["deadline"]
    phases = result["phases"]
    split = args["split"]
    out = [
        "## One hanging key among four healthy ones (loopback, fake upstream)",
        "",
        f"- command: `{result['command']}`",
        f"- {args['rate']:g} requests/s open loop for {args['duration']:g} s, "
        f"{'streaming' if args['streams'] else 'non-streaming'} POST /v1/chat/completions; "
        f"client timeout {args['timeout']:g} s; latency from the scheduled send to the last byte.",
        f"- keys: `{HANG_ALIAS}` (Hang: never answers), "
        + ", ".join(f"`{a}`" for a in OK_ALIASES)
        + " (Ok); proxy `[http]` "
        + ", ".join(f"{k} = {v}" for k, v in result["http"].items())
        + f"; first-byte deadline of these requests: {deadline:g} s.",
        f"- generator: {result['notes']['connections_opened']} connections opened, at most "
        f"{result['notes']['peak_in_flight']} requests in flight, dispatch lag p99 "
        f"{result['notes']['dispatch_lag_p99_ms']} ms; run time {result['elapsed']:.0f} s.",
        "",
        "| phase | requests | errors | p50 ms | p90 ms | p99 ms | max ms | head p99 ms "
        "| over 1 s | first sent to the hanging key (attempts > 1) |",
        "|" + "---|" * 10,
    ]
    for name, label in (("first", f"first {split:g} s"), ("rest", f"after {split:g} s")):
        p = phases[name]
        if not p["requests"]:
            out.append(f"| {label} | 0 | | | | | | | | |")
            continue
        out.append(
            f"| {label} | {p['requests']} | {p['errors']} | {ms(p['p50'])} | {ms(p['p90'])} "
            f"| {ms(p['p99'])} | {ms(p['max'])} | {ms(p['head_p99'])} | {p['over_1s']} "
            f"| {p['failed_over']} |"
        )
    p = phases["all"]
    out.append(
        f"| all | {p['requests']} | {p['errors']} | {ms(p['p50'])} | {ms(p['p90'])} "
        f"| {ms(p['p99'])} | {ms(p['max'])} | {ms(p['head_p99'])} | {p['over_1s']} "
        f"| {p['failed_over']} |"
    )
    out += ["", "Served by (x-keyrotor-key): " + json.dumps(p["served_by"], sort_keys=True)]
    if result["error_kinds"]:
        out.append("Errors by kind: " + json.dumps(result["error_kinds"]))
    out += [
        "",
        "### GET /status at the end",
        "",
        "| key | state | until_in s | reason | requests | successes | in flight | errors |",
        "|" + "---|" * 8,
    ]
    for k in result["status_keys"]:
        errors = {c: n for c, n in k.get("errors", {}).items() if n}
        out.append(
            f"| {k.get('alias')} | {k.get('state')} | {k.get('until_in', '')} "
            f"| {k.get('reason', '')} | {k.get('requests')} | {k.get('successes')} "
            f"| {k.get('in_flight')} | {json.dumps(errors) if errors else 0} |"
        )
    stats = result["status_stats"]
    out += [
        "",
        f"Pool: health {json.dumps(result['status_health'])}; failovers "
        f"{stats.get('failovers')}, delivered {stats.get('delivered')}, rejected "
        f"{stats.get('rejected')}.",
    ]
    upstream = result.get("upstream")
    if upstream:
        seen = ", ".join(
            f"{alias}: {s['requests']} requests, statuses {s['by_status']}, "
            f"max in flight {s['max_in_flight']}, disconnects {s['disconnects']}"
            for alias, s in upstream["keys"].items()
        )
        out.append(f"Fake upstream saw: {seen}; {upstream['totals']['connections']} connections.")
    out.append(
        f"Proxy memory: VmRSS {result['rss'][0] / MB:.1f} MB, VmHWM {result['rss'][1] / MB:.1f} MB."
    )
    out += ["", f"### Target: {TARGET}", ""]
    out += [f"- {line}" for line in result["verdicts"]]
    return out


def verdicts(result: dict[str, Any]) -> list[str]:
    deadline = result["deadline"]
    first, rest = result["phases"]["first"], result["phases"]["rest"]
    split = result["options"]["split"]
    lines = []
    if first["requests"]:
        ok = first["p99"] < 2 * deadline
        lines.append(
            f"first {split:g} s: p99 {ms(first['p99'])} ms vs < {2 * deadline * 1000:.0f} ms "
            f"(2x {deadline:g} s): **{'met' if ok else 'NOT met'}**"
        )
    if rest["requests"]:
        ok = rest["p99"] < SLOW
        lines.append(
            f"after {split:g} s: p99 {ms(rest['p99'])} ms vs < 1000 ms: "
            f"**{'met' if ok else 'NOT met'}**"
        )
    else:
        lines.append(f"after {split:g} s: no requests (run longer than --split to measure it)")
    errors = result["phases"]["all"]["errors"]
    lines.append(f"errors: {errors} ({'none' if not errors else 'NOT none'})")
    charged = {
        k["alias"]: {c: n for c, n in k.get("errors", {}).items() if n}
        for k in result["status_keys"]
        if k.get("alias") in OK_ALIASES and any(k.get("errors", {}).values())
    }
    lines.append(
        "healthy keys charged errors: "
        + (json.dumps(charged) + " (**NOT none**)" if charged else "none (met)")
    )
    return lines


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.hanging_key",
        description="One hanging key among four healthy ones, open-loop load through the proxy.",
    )
    p.add_argument("--rate", type=float, default=10.0, help="requests/s (10)")
    p.add_argument("--duration", type=float, default=150.0, help="seconds of traffic (150)")
    p.add_argument("--first-byte", type=float, default=2.0, help="[http] first_byte, seconds (2.0)")
    p.add_argument(
        "--first-byte-stream",
        type=float,
        default=None,
        help="[http] first_byte_stream, seconds (not written unless given, or --streams on a "
        "keyrotor that knows it: then --first-byte)",
    )
    p.add_argument(
        "--max-connections-per-key",
        type=int,
        default=None,
        help="[http] max_connections_per_key (not written unless given)",
    )
    p.add_argument("--streams", action="store_true", help='send "stream": true requests')
    p.add_argument("--split", type=float, default=60.0, help="seconds of the first phase (60)")
    p.add_argument(
        "--timeout", type=float, default=300.0, help="client timeout per request, s (300)"
    )
    p.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    return p


def _command(args: argparse.Namespace) -> str:
    parts = [
        ".venv/bin/python -m benchmarks.hanging_key",
        f"--rate {args.rate:g}",
        f"--duration {args.duration:g}",
        f"--first-byte {args.first_byte:g}",
    ]
    if args.first_byte_stream is not None:
        parts.append(f"--first-byte-stream {args.first_byte_stream:g}")
    if args.max_connections_per_key is not None:
        parts.append(f"--max-connections-per-key {args.max_connections_per_key}")
    if args.streams:
        parts.append("--streams")
    if args.split != 60.0:
        parts.append(f"--split {args.split:g}")
    if args.timeout != 300.0:
        parts.append(f"--timeout {args.timeout:g}")
    return " ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not (
        0 < args.rate <= 1000
        and 0 < args.duration <= 3600
        and 0 < args.first_byte <= 600
        and (args.first_byte_stream is None or 0 < args.first_byte_stream <= 600)
        and (args.max_connections_per_key is None or args.max_connections_per_key >= 1)
        and args.split > 0
        and 0 < args.timeout <= 3600
    ):
        print(
            "error: need 0 < rate <= 1000, 0 < duration <= 3600, 0 < first-byte(-stream) <= "
            "600, max-connections-per-key >= 1, split > 0, 0 < timeout <= 3600",
            file=sys.stderr,
        )
        return 2
    known = http_option_names()
    wanted = {
        "first_byte_stream": args.first_byte_stream,
        "max_connections_per_key": args.max_connections_per_key,
    }
    missing = [name for name, value in wanted.items() if value is not None and name not in known]
    if missing:
        print(
            f"error: this keyrotor's [http] has no {', '.join(missing)} yet "
            f"(it knows: {', '.join(sorted(known))})",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    config, http = build_config(args, known)
    deadline = stream_deadline(http, args.streams)
    started = time.monotonic()
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        stats_file = folder / "upstream-stats.json"
        keys = {HANG_ALIAS: (_secret(HANG_ALIAS), "hang")}
        keys.update({alias: (_secret(alias), "ok") for alias in OK_ALIASES})
        upstream, url = start_scripted_upstream(stack, keys, stats_file)
        env = {_env_name(alias): secret for alias, (secret, _) in keys.items()}
        proxy, port = start_proxy(stack, url, env=env, config=config)
        print(
            f"fake upstream pid {upstream.pid} at {url}; proxy pid {proxy.pid} at "
            f"http://127.0.0.1:{port}; [http] {http}; sending {args.rate:g} rps for "
            f"{args.duration:g} s",
            file=sys.stderr,
            flush=True,
        )
        samples: list[Sample] = []
        notes: dict[str, Any] = {}

        async def run() -> None:
            nonlocal samples, notes
            samples, notes = await open_loop(
                port,
                rate=args.rate,
                duration=args.duration,
                streaming=args.streams,
                timeout=args.timeout,
            )

        try:
            run_trio_until_signal(run)
        except TRANSPORT_ERRORS as exc:
            raise BenchError(f"cannot reach the proxy: {exc!r}") from exc
        if proxy.proc.poll() is not None:
            raise BenchError(f"the proxy exited during the run:\n{proxy.log_tail()}")
        status = get_json(port, "/status")
        rss = memory(proxy.pid)
        upstream.stop()  # it writes its counters on SIGTERM
        upstream_stats = json.loads(stats_file.read_text()) if stats_file.exists() else None
        result: dict[str, Any] = {
            "command": _command(args),
            "options": {
                "rate": args.rate,
                "duration": args.duration,
                "streams": args.streams,
                "split": args.split,
                "timeout": args.timeout,
            },
            "http": http,
            "deadline": deadline,
            "notes": notes,
            "phases": {
                "first": phase_stats([s for s in samples if s.scheduled < args.split]),
                "rest": phase_stats([s for s in samples if s.scheduled >= args.split]),
                "all": phase_stats(samples),
            },
            "error_kinds": dict(Counter(s.error for s in samples if s.error)),
            "status_keys": status.get("keys", []),
            "status_health": status.get("health", {}),
            "status_stats": status.get("stats", {}),
            "upstream": upstream_stats,
            "rss": rss,
            "elapsed": time.monotonic() - started,
        }
        result["verdicts"] = verdicts(result)
        text = "\n".join(report(result))
        if args.json:
            print(text, file=sys.stderr, flush=True)
            result["samples"] = [asdict(s) for s in samples]
            print(json.dumps(_nan_to_none(result), indent=1))
        else:
            print(text, flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
