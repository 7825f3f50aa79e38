"""Load benchmark of ``keyrotor serve`` against the fake upstream, on loopback.

    .venv/bin/python -m benchmarks.proxy_load [--rate 200] [--duration 10]
        [--concurrency 32] [--rounds 1] [--no-stream]

Starts two child processes on 127.0.0.1, each in its own session (so that a
Ctrl-C on the terminal reaches the benchmark only) and with a parent-death signal
(so that they go away even if the benchmark is killed):

- the fake upstream, ``python -m keyrotor.testing.fake_upstream --port 0
  --scenario open`` (the first line of its stdout is its base URL);
- the proxy, ``python -m keyrotor.cli serve --host 127.0.0.1 --port 0 --upstream
  URL`` with ``OPENROUTER_KEYS`` set to 4 fake secrets (if ``--port 0`` does not
  work, a free port is picked and passed); ready when ``GET /healthz`` answers 200.
  Its state file lives in a temporary directory (``--state file``, the default,
  as ``keyrotor serve`` runs); ``--state none`` runs it ``--no-state`` and
  ``--state both`` measures the two side by side.

The load generator runs in this process: trio + httptools, many keep-alive
connections, one request per connection at a time, no HTTP client library. Two
modes, each for ``--duration`` seconds:

1. open loop at ``--rate`` requests/s: request ``i`` is due at ``start + i/rate``
   and is sent then, on an idle pooled connection (a new one is opened when none
   is idle, up to ``--max-connections``), whatever happened to earlier requests.
   Latency runs from the *scheduled* time to the last body byte, so queueing in
   the generator or the server is counted (no coordinated omission). The
   generator sleeps until 1 ms before a due time and yields to the scheduler for
   the rest (a poll timeout is rounded up to the millisecond: a bare sleep would
   add up to 1 ms to every sample); the notes give its dispatch lag;
2. closed loop: ``--concurrency`` connections, each sending back to back; the
   result is requests/s. Latency runs from send to last byte.

Both run against the fake upstream directly (``<url>/chat/completions``) and
through the proxy (``/v1/chat/completions``), interleaved (A B, then A B again
with ``--rounds 2``), for non-streaming and streaming (``"stream": true``, the SSE
body read to ``data: [DONE]``) requests. A request counts as ok when the status is
200 and the body is complete; anything else (status, truncated stream, reset,
timeout after 10 s) is an error, counted by kind.

``--tls`` also starts a second fake upstream that serves HTTPS (a self-signed
certificate made with the ``openssl`` command) and the proxy in front of it,
trusting it through ``SSL_CERT_FILE``: the TLS work OpenRouter's upstream costs.

``--python PATH`` (repeatable) also starts the proxy on another interpreter (a
venv with this tree installed), side by side with this one. ``--gc both`` also
starts each proxy with ``[server] gc_threshold = 0`` (Python's own garbage
collector settings) beside the tuned one (``--gc python``: only that).

Other options: ``--warmup`` (untimed seconds per target and body before the
first round, 1), ``--prewarm`` and ``--max-connections`` (open loop: connections
opened before the clock starts, 16, and the cap, 256), ``--upstream-only`` (no
proxy: the generator and the fake alone). A default run takes about 90 s.

The report (markdown, on stdout; progress on stderr) has one row per run, the proxy's added latency
(through the proxy minus alone, same mode, percentiles of the samples of every
round), the CPU used by each process during each run, and the proxy's resident
memory after each run (``VmRSS``) and at its peak (``VmHWM``), then a summary of
the proxy's log (statuses, retries, its own slowest requests and when). If ``litellm`` is
importable, its proxy is measured the same way (4 deployments of the model, one
per fake key); otherwise one line says it was skipped.

Between runs the benchmark waits (up to 30 s) until every process is quiet: a
proxy that fell behind an open loop (LiteLLM's) keeps working off its backlog
after the run and would take that CPU from the next target's run.

Only 127.0.0.1 is contacted. Every child is stopped on exit, on errors, on Ctrl-C
and on SIGTERM. The generator's garbage collector is paused while a run is
measured (and collected between runs).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import http.client
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import platform
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Literal
from urllib.parse import urlsplit

import h11
import httptools
import trio

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
MODEL = "openai/gpt-4o-mini"


def fake_key(i: int) -> str:
    """The ``i``-th fake secret (the fake upstream's ``open`` scenario takes any)."""
    return f"sk-or-v1-fake-proxy-load-{i}"


def fake_keys_config(count: int) -> str:
    """``[[keys]]`` tables of ``count`` fake keys (too many for an environment variable)."""
    return "".join(f'[[keys]]\nalias = "k{i}"\nsecret = "{fake_key(i)}"\n' for i in range(count))


FAKE_KEYS = tuple(fake_key(i) for i in range(4))
DONE = b"data: [DONE]\n\n"
REQUEST_TIMEOUT = 10.0  # per request, from its scheduled (open) or send (closed) time
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
SETTLE_LIMIT = 30.0  # seconds to wait for every process to go quiet between runs
CONNECT_TIMEOUT = 5.0
RECEIVE_SIZE = 65536
SPIN = 0.001  # open loop: last stretch before a due time spent yielding, not sleeping
MB = 1024 * 1024
MICRO = "\u00b5"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Never hand the children a real key, a real upstream or an HTTP proxy.
SCRUBBED_ENV = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")

Mode = Literal["open", "closed"]


class BenchError(RuntimeError):
    """Something the benchmark cannot go on with (a child that does not start...)."""


class ResponseError(Exception):
    """A complete exchange whose answer is not a success (status, truncated stream)."""


# --------------------------------------------------------------------------- endpoints


@dataclass(frozen=True)
class Endpoint:
    """``POST`` target on 127.0.0.1."""

    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname != LOOPBACK or parts.port is None:
            raise BenchError(f"refusing a URL that is not http://{LOOPBACK}:PORT/...: {url!r}")
        return cls(parts.hostname, parts.port, parts.path or "/")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"


# An agent's turn of context: prose and code with quotes, newlines and backslashes,
# which JSON escapes (about 1 KB once encoded).
CONTEXT = (
    "The test fails on the second call; here is the function and its log:\n"
    "```python\ndef load(path: str) -> dict[str, object]:\n"
    '    with open(path, encoding="utf-8") as f:\n'
    '        return {"path": path, "rows": [line.split("\\t") for line in f]}\n```\n'
    'ERROR  load("data/2024.tsv") -> KeyError: \'rows\' (see "parse" at line 12)\n'
) * 3


def chat_body(*, stream: bool, model: str = MODEL, prompt_kb: int = 0) -> bytes:
    """The benchmark's request: "hi", or (``prompt_kb``) about that many KB of an
    agent's earlier turns before it, as coding agents send, the members in the
    order the openai Python SDK writes them (the messages first)."""
    messages: list[dict[str, str]] = []
    turn = 0
    while len(json.dumps(messages)) < prompt_kb * 1024:
        messages.append({"role": ("user", "assistant")[turn % 2], "content": CONTEXT})
        turn += 1
    messages.append({"role": "user", "content": "hi"})
    body: dict[str, Any] = {"model": model, "messages": messages}
    if prompt_kb:
        body = {"messages": messages, "model": model}
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class RequestSpec:
    """One prepared request, its bytes built once per run and sent again and again."""

    endpoint: Endpoint
    streaming: bool
    wire: bytes

    @classmethod
    def build(
        cls, endpoint: Endpoint, *, streaming: bool, model: str = MODEL, prompt_kb: int = 0
    ) -> RequestSpec:
        body = chat_body(stream=streaming, model=model, prompt_kb=prompt_kb)
        headers = [
            (b"host", f"{endpoint.host}:{endpoint.port}".encode()),
            (b"authorization", b"Bearer " + FAKE_KEYS[0].encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if streaming:
            headers.append((b"accept", b"text/event-stream"))
        # h11 checks the request once; the load sends its bytes.
        writer = h11.Connection(h11.CLIENT)
        request = h11.Request(method=b"POST", target=endpoint.path, headers=headers)
        wire = b"".join(
            writer.send(event) or b""
            for event in (request, h11.Data(data=body), h11.EndOfMessage())
        )
        return cls(endpoint, streaming, wire)


# --------------------------------------------------------------------------- the client


class _Answer:
    """What ``Connection.exchange`` checks of a response, from httptools' callbacks."""

    __slots__ = ("done", "first", "keep", "parser", "status", "tail")

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.tail = b""  # the body's last bytes (a stream ends with data: [DONE])
        self.first = b""  # an error answer's first bytes
        self.done = False
        self.keep = True  # the server keeps the connection (read when the answer is complete)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.tail = (self.tail + body)[-len(DONE) :]
        if self.status != 200 and len(self.first) < 300:
            self.first += body

    def on_message_complete(self) -> None:
        if self.status >= 200:  # an interim answer (100 Continue) is skipped
            self.done = True
            self.keep = self.parser.should_keep_alive()


class Connection:
    """One keep-alive HTTP/1.1 connection over a trio socket stream; answers are
    parsed by httptools (llhttp, C), so the generator spends little CPU of the
    machine it shares with the proxy and the upstream (with h11, pure Python, it
    took about 1.6x the CPU a request: docs/benchmarks.md)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.answer = _Answer()
        self.closed = False

    @classmethod
    async def open(cls, endpoint: Endpoint) -> Connection:
        with trio.fail_after(CONNECT_TIMEOUT):
            stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
        return cls(stream)  # trio sets TCP_NODELAY on its socket streams

    @property
    def reusable(self) -> bool:
        return not self.closed and self.answer.keep and self.answer.done

    def close(self) -> None:
        """Close now (synchronous, so it is safe in ``finally`` under cancellation)."""
        if not self.closed:
            self.closed = True
            self.stream.socket.close()

    async def exchange(self, spec: RequestSpec) -> None:
        """Send one request and read its response to the end.

        Raises ``ResponseError`` for a complete non-success answer (the connection
        stays usable if HTTP allows), anything else for a transport failure.
        """
        answer = self.answer
        answer.status, answer.tail, answer.first, answer.done = 0, b"", b"", False
        await self.stream.send_all(spec.wire)
        while not answer.done:
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise ConnectionResetError("connection closed by the server mid-response")
            answer.parser.feed_data(data)
        status = answer.status
        if status != 200:
            raise ResponseError(f"HTTP {status}", answer.first[:300].decode("utf-8", "replace"))
        if spec.streaming and answer.tail != DONE:
            tail = answer.tail.decode("utf-8", "replace")
            raise ResponseError("stream without data: [DONE]", tail)


TRANSPORT_ERRORS = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    httptools.HttpParserError,
)


class ConnectionPool:
    """Idle connections (LIFO) and a cap on how many exist at once."""

    def __init__(self, endpoint: Endpoint, limit: int) -> None:
        self.endpoint = endpoint
        self.slots = trio.Semaphore(limit)
        self.idle: list[Connection] = []
        self.opened = 0
        self.stale = 0  # idle connections found closed by the server, replaced
        self.peak_busy = 0
        self.busy = 0

    async def prewarm(self, count: int) -> None:
        for _ in range(count):
            self.idle.append(await Connection.open(self.endpoint))
            self.opened += 1

    async def acquire(self) -> Connection:
        await self.slots.acquire()
        try:
            conn = self.idle.pop() if self.idle else None
            while conn is not None and conn.stream.socket.is_readable():
                # An idle connection with something to read has been closed by the
                # server (as httpcore does, check before reuse rather than fail).
                conn.close()
                self.stale += 1
                conn = self.idle.pop() if self.idle else None
            if conn is None:
                conn = await Connection.open(self.endpoint)
                self.opened += 1
        except BaseException:
            self.slots.release()
            raise
        self.busy += 1
        self.peak_busy = max(self.peak_busy, self.busy)
        return conn

    def release(self, conn: Connection) -> None:
        self.busy -= 1
        if conn.reusable:
            self.idle.append(conn)
        else:
            conn.close()
        self.slots.release()

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


# --------------------------------------------------------------------------- measuring


@dataclass
class RunResult:
    """What one run (target, mode, streaming, round) measured."""

    target: str
    mode: Mode
    streaming: bool
    round: int
    latencies: list[float] = field(default_factory=list)  # seconds, successes only
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: dict[str, str] = field(default_factory=dict)
    lags: list[float] = field(default_factory=list)  # open loop: dispatch - scheduled
    wall: float = 0.0  # first scheduled/sent to last completion
    connections: int = 0
    stale: int = 0
    peak_busy: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds
    rss_after: dict[str, tuple[int, int]] = field(default_factory=dict)  # VmRSS, VmHWM
    span: tuple[float, float] = (0.0, 0.0)  # wall clock (time.time) around the run

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def rps(self) -> float:
        return self.ok / self.wall if self.wall > 0 else 0.0

    def record_error(self, kind: str, detail: str = "") -> None:
        self.errors[kind] += 1
        if kind not in self.error_samples:
            self.error_samples[kind] = detail


async def _one(spec: RequestSpec, pool: ConnectionPool, started: float, result: RunResult) -> float:
    """One request on a pooled connection; returns its completion time."""
    conn: Connection | None = None
    try:
        with trio.move_on_at(started + REQUEST_TIMEOUT) as scope:
            conn = await pool.acquire()
            await conn.exchange(spec)
            result.latencies.append(trio.current_time() - started)
        if scope.cancelled_caught:
            result.record_error("timeout", f"no complete answer within {REQUEST_TIMEOUT:.0f} s")
    except ResponseError as exc:
        result.record_error(exc.args[0], exc.args[1] if len(exc.args) > 1 else "")
    except TRANSPORT_ERRORS as exc:
        result.record_error(type(exc).__name__, str(exc)[:200])
        if conn is not None:
            conn.close()
    finally:
        if conn is not None:
            pool.release(conn)
    return trio.current_time()


async def open_loop(
    spec: RequestSpec,
    result: RunResult,
    *,
    rate: float,
    duration: float,
    prewarm: int,
    max_connections: int,
) -> None:
    pool = ConnectionPool(spec.endpoint, max_connections)
    try:
        await pool.prewarm(prewarm)
        count = max(1, round(rate * duration))
        interval = 1.0 / rate
        start = trio.current_time() + 0.05
        last = start

        async def request(scheduled: float) -> None:
            nonlocal last
            result.lags.append(trio.current_time() - scheduled)
            last = max(last, await _one(spec, pool, scheduled, result))

        # The kernel rounds poll timeouts up to the millisecond, so a plain sleep
        # wakes up to 1 ms late (and phase-locks there at a steady rate): sleep
        # until shortly before, then yield to the scheduler until the due time.
        spin = min(SPIN, interval / 4)
        async with trio.open_nursery() as nursery:
            for i in range(count):
                scheduled = start + i * interval
                if scheduled - trio.current_time() > spin:
                    await trio.sleep_until(scheduled - spin)
                while trio.current_time() < scheduled:
                    await trio.lowlevel.checkpoint()
                nursery.start_soon(request, scheduled)
        result.wall = last - start
        result.connections = pool.opened
        result.stale = pool.stale
        result.peak_busy = pool.peak_busy
    finally:
        pool.close()


async def closed_loop(
    spec: RequestSpec, result: RunResult, *, concurrency: int, duration: float
) -> None:
    pool = ConnectionPool(spec.endpoint, concurrency)
    try:
        await pool.prewarm(concurrency)
        start = trio.current_time()
        stop = start + duration
        last = start

        async def worker() -> None:
            nonlocal last
            while trio.current_time() < stop:
                last = max(last, await _one(spec, pool, trio.current_time(), result))

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        result.wall = last - start
        result.connections = pool.opened
        result.stale = pool.stale
        result.peak_busy = pool.peak_busy
    finally:
        pool.close()


# --------------------------------------------------------------------------- processes


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGTERM the child if the benchmark dies without cleaning up."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OPENROUTER_", "OPENAI_", "LITELLM_"))
        and name.lower() not in SCRUBBED_ENV
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Child:
    """A child process whose stderr goes to a temporary file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: IO[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        # pread: the child shares this file's offset (its stderr is a dup of it),
        # so seeking here would make its next lines overwrite earlier ones.
        fd = self.log.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", "replace")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self) -> None:
        proc = self.proc
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    print(
                        f"{self.name}: no exit {STOP_TIMEOUT:.0f} s after SIGTERM, killing",
                        file=sys.stderr,
                    )
                    proc.kill()
                    proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if proc.stdout is not None:
                proc.stdout.close()


@contextmanager
def child(
    name: str, cmd: list[str], env: dict[str, str], *, stdout: bool, cwd: Path = ROOT
) -> Iterator[Child]:
    """Run ``cmd`` in ``cwd`` (``python -m`` imports that tree's ``keyrotor``); stop it
    (SIGTERM, then SIGKILL) on exit, whatever happens."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,  # a terminal Ctrl-C reaches the benchmark only
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        proc_child = Child(name, proc, log)
        try:
            yield proc_child
        finally:
            proc_child.stop()


def start_upstream(
    stack: ExitStack,
    catalog: str = "default",
    scenario: str = "open",
    tls: tuple[Path, Path] | None = None,
    no_cost: bool = False,
) -> tuple[Child, str]:
    """The fake upstream: ``open`` (any key is healthy), or ``faulty`` (the same,
    plus ``FAULTY_KEYS``: revoked, out of credits, rate limited, hanging);
    ``tls``: (certificate, key) to serve HTTPS with; ``no_cost``: answers whose
    usage has no cost (the proxy prices them from its catalog), at the fake's
    ``/v1``, an OpenAI-compatible base URL: streams carry their usage only when
    asked for it, which the proxy then does (a tree from before 2026-12-07's
    twelfth session does not: its streams are not priced)."""
    cmd = [
        sys.executable,
        "-m",
        "keyrotor.testing.fake_upstream",
        "--host",
        LOOPBACK,
        "--port",
        "0",
        "--scenario",
        scenario,
    ]
    if catalog != "default":  # an older fake upstream knows no --catalog
        cmd += ["--catalog", catalog]
    if tls is not None:
        cmd += ["--certfile", str(tls[0]), "--keyfile", str(tls[1])]
    if no_cost:
        cmd.append("--no-cost")
    upstream = stack.enter_context(child("fake upstream", cmd, _child_env({}), stdout=True))
    stdout = upstream.proc.stdout
    assert stdout is not None
    ready, _, _ = select.select([stdout], [], [], STARTUP_TIMEOUT)
    line = stdout.readline().decode().strip() if ready else ""
    if not line:
        raise BenchError(f"the fake upstream did not start:\n{upstream.log_tail()}")
    Endpoint.parse(line.replace("https://", "http://", 1))  # loopback check
    if no_cost:  # as OpenAI's: its /v1 (the proxy asks a stream for its usage there)
        line = line.rstrip("/").removesuffix("/api/v1") + "/v1"
    return upstream, line.rstrip("/")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def http_get_status(host: str, port: int, path: str) -> int | None:
    conn = http.client.HTTPConnection(host, port, timeout=1.0)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _listening_port(log: str) -> int | None:
    for line in log.splitlines():
        with suppress(ValueError, TypeError, AttributeError):
            record = json.loads(line)
            if record.get("event") == "listening":
                port = Endpoint.parse(str(record["url"]) + "/").port
                return port
    return None


def wait_ready(
    proxy: Child, port: int | None, health: str, timeout: float = STARTUP_TIMEOUT
) -> int | None:
    """Poll until ``GET health`` answers 200; the port comes from the ``listening``
    log line when ``port`` is None. Returns the port, or None if the process died
    or did not become ready in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proxy.proc.poll() is not None:
            return None
        if port is None:
            port = _listening_port(proxy.log_text())
        if port is not None and http_get_status(LOOPBACK, port, health) == 200:
            return port
        time.sleep(0.05)
    return None


ROUTE = "bench"
ROUTE_CONFIG = f"""\
[[routes]]
name = "{ROUTE}"
strategy = "cheapest"
candidates = ["{MODEL}", "anthropic/claude-3.5-haiku"]
"""
"""``--route``: the route a second target names, two models of the fake's catalog."""


def start_redis(stack: ExitStack) -> str:
    """Debian's ``redis-server`` on a free loopback port, in a temporary directory."""
    port = free_port()
    folder = stack.enter_context(tempfile.TemporaryDirectory())
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
         LOOPBACK, "--save", "", "--appendonly", "no", "--dir", folder],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    stack.callback(proc.wait, 10)
    stack.callback(proc.terminate)
    for _ in range(200):
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(8).startswith(b"+PONG"):
                    return f"redis://{LOOPBACK}:{port}/0"
        except OSError:
            time.sleep(0.05)
    raise BenchError("redis-server did not start")


def start_keyrotor(
    stack: ExitStack,
    upstream_url: str,
    state: bool,
    route: bool = False,
    workers: int = 1,
    shared: str | None = None,
    limited: bool = False,
    faults: bool = False,
    parser: str = "auto",
    keys: int = len(FAKE_KEYS),
    python_gc: bool = False,
    python: str = sys.executable,
    flush_in: str | None = None,
    ca_file: Path | None = None,
    tree: Path = ROOT,
) -> tuple[Child, Endpoint]:
    """The proxy with its state file in a fresh temporary directory (``state``),
    or ``--no-state``; with ``route``, a config file holding ``ROUTE_CONFIG``;
    ``workers`` processes sharing key health through ``shared`` (Redis); with
    ``limited``, keys with an rpm and a max_in_flight far above the load, so
    that every attempt asks Redis (one Lua round trip) and none is held; with
    ``faults``, the four faulty keys of the ``faulty`` scenario too, and a first
    byte awaited 2 s (then the attempt fails over); ``parser``: the HTTP parser of
    its server and of its upstream pool (``[server]`` and ``[http] parser``);
    ``keys``: a pool of that many fake keys (``[[keys]]`` tables) instead of 4;
    ``python_gc``: ``[server] gc_threshold = 0`` (Python's own collector settings);
    ``python``: the interpreter that runs it (a venv with this tree installed);
    ``flush_in``: ``[state] flush_in`` (None: not written, the default);
    ``ca_file``: the certificate an HTTPS upstream is trusted by (``SSL_CERT_FILE``);
    ``tree``: the source tree whose ``keyrotor`` it runs (a ``git worktree``)."""
    env = _child_env({"OPENROUTER_KEYS": ",".join(FAKE_KEYS)})
    base = [python, "-m", "keyrotor.cli", "serve", "--host", LOOPBACK]
    if shared is not None:
        base += ["--workers", str(workers), "--shared", shared]
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    config = f'[server]\nparser = "{parser}"\n'
    if flush_in is not None:  # an older proxy knows no flush_in: only when asked
        config = f'[state]\nflush_in = "{flush_in}"\n' + config
    if python_gc:  # an older proxy knows no gc_threshold: only when asked
        config += "gc_threshold = 0\n"
    config += f'[http]\nparser = "{parser}"\n'  # [http] last
    if route:
        config += ROUTE_CONFIG
    elif faults:
        from keyrotor.testing.scenarios import FAULTY_KEYS  # this revision's fake upstream

        pool = {**{f"k{i}": key for i, key in enumerate(FAKE_KEYS)}, **FAULTY_KEYS}
        env = _child_env({f"K_{i}": key for i, key in enumerate(pool.values())})
        config += "first_byte = 2.0\nfirst_byte_stream = 2.0\n" + "".join(
            f'[[keys]]\nalias = "{alias}"\nsecret_env = "K_{i}"\n' for i, alias in enumerate(pool)
        )
    elif limited:
        env = _child_env({f"K{i}": key for i, key in enumerate(FAKE_KEYS)})
        config += "".join(
            f'[[keys]]\nalias = "k{i}"\nsecret_env = "K{i}"\nrpm = 6000000\n'
            "max_in_flight = 100000\n"
            for i in range(len(FAKE_KEYS))
        )
    if keys != len(FAKE_KEYS):
        env = _child_env({})
        config += fake_keys_config(keys)
    if ca_file is not None:
        env["SSL_CERT_FILE"] = str(ca_file)
    (folder / "keyrotor.toml").write_text(config)
    base += ["--config", str(folder / "keyrotor.toml")]
    if state:
        base += ["--state", str(folder / "state.db")]
    else:
        base.append("--no-state")
    attempts: list[str] = []
    for port in (0, free_port()):
        cmd = [*base, "--port", str(port), "--upstream", upstream_url]
        with ExitStack() as attempt:
            proxy = attempt.enter_context(child("keyrotor proxy", cmd, env, stdout=False, cwd=tree))
            ready = wait_ready(proxy, None if port == 0 else port, "/healthz")
            if ready is not None:
                stack.enter_context(attempt.pop_all())  # the outer stack stops it now
                return proxy, Endpoint(LOOPBACK, ready, "/v1/chat/completions")
            attempts.append(
                f"--port {port}: exit status {proxy.proc.poll()}, log:\n{proxy.log_tail()}"
            )
        print(f"keyrotor proxy not ready with --port {port}", file=sys.stderr, flush=True)
    raise BenchError("the keyrotor proxy did not become ready:\n" + "\n".join(attempts))


LITELLM_CONFIG = """\
model_list:
{deployments}
litellm_settings:
  telemetry: false
"""
LITELLM_DEPLOYMENT = """\
  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: {base}
      api_key: {key}
"""


def python_version(python: str) -> str:
    """The version of the interpreter at ``python`` ("3.13.0"); ``BenchError`` (one
    line) if it does not run or cannot import this tree's keyrotor (from ``ROOT``,
    as the proxy it would run does)."""
    probe = "import platform, keyrotor.adapters.proxy.main; print(platform.python_version())"
    try:
        done = subprocess.run(
            [python, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise BenchError(f"--python {python}: cannot run it ({why})") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(
            f"--python {python}: cannot import keyrotor ({last}); install this tree in its "
            f"venv: {python} -m pip install -e '.[proxy,fast]'"
        )
    return done.stdout.strip()


def start_litellm(
    stack: ExitStack, upstream_url: str, python: str = sys.executable, workers: int = 1
) -> tuple[Child, Endpoint]:
    """LiteLLM's proxy with 4 deployments of MODEL, one per fake key, run by
    ``python`` (a venv with ``litellm[proxy]``), ``workers`` processes (its
    ``--num_workers``); not exercised where litellm is not installed."""
    config = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "litellm.yaml"
    deployments = "".join(
        LITELLM_DEPLOYMENT.format(model=MODEL, base=upstream_url, key=key) for key in FAKE_KEYS
    )
    config.write_text(LITELLM_CONFIG.format(deployments=deployments))
    port = free_port()
    cmd = [
        python,
        "-m",
        "litellm.proxy.proxy_cli",
        "--config",
        str(config),
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        *(["--num_workers", str(workers)] if workers > 1 else []),
    ]
    env = _child_env(
        {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no download at start
            # Loopback and fake keys: recent versions refuse to start without a master key.
            "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
        }
    )
    proxy = stack.enter_context(child("litellm proxy", cmd, env, stdout=False))
    if wait_ready(proxy, port, "/health/liveliness", timeout=90.0) is None:
        raise BenchError(f"LiteLLM's proxy did not become ready:\n{proxy.log_tail()}")
    return proxy, Endpoint(LOOPBACK, port, "/v1/chat/completions")


# --------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """utime + stime of a process, or of one of its threads (0.0 if it is gone)."""
    return sum(cpu_times(pid, thread))


def cpu_times(pid: int, thread: int | None = None) -> tuple[float, float]:
    """(utime, stime) of a process, or of one of its threads ((0, 0) if it is gone)."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # fields 14 and 15 of stat


def settle(pids: Mapping[str, int], limit: float | None = None) -> str | None:
    """Wait, up to ``limit`` s (``SETTLE_LIMIT``), until no process of ``pids`` uses
    more than a tenth of a core (over 0.2 s): a proxy that fell behind an open
    loop (LiteLLM's, at 200 requests/s) works off its backlog after the run, and
    would take that CPU from the next run's target. The name of one still busy
    at the limit, else None."""
    give_up = time.monotonic() + (SETTLE_LIMIT if limit is None else limit)
    while True:
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        time.sleep(0.2)
        busy = [name for name, pid in pids.items() if cpu_seconds(pid) - before[name] > 0.02]
        if not busy:
            return None
        if time.monotonic() >= give_up:
            return busy[0]


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes, (0, 0) if the process is gone."""
    values = {"VmRSS:": 0, "VmHWM:": 0}
    with suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            parts = line.split()  # "VmRSS:\t   12345 kB"
            if parts and parts[0] in values:
                values[parts[0]] = int(parts[1]) * 1024
    return values["VmRSS:"], values["VmHWM:"]


# --------------------------------------------------------------------------- orchestration


@dataclass(frozen=True)
class Target:
    name: str
    endpoint: Endpoint
    pid: int | None  # the proxy's process, None for the upstream alone
    model: str = MODEL  # what requests put in "model" (a route's name, for --route)
    dashboards: int = 0  # event streams held open during the run (--dashboard)


async def hold_dashboard(endpoint: Endpoint, seen: list[int]) -> None:
    """One open dashboard: ``GET /dashboard/events`` read for as long as it runs
    (``seen[0]``: bytes read)."""
    stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
    async with stream:
        head = f"GET /dashboard/events HTTP/1.1\r\nhost: {endpoint.host}\r\n\r\n"
        await stream.send_all(head.encode())
        while data := await stream.receive_some(65536):
            seen[0] += len(data)


@dataclass
class Options:
    rate: float
    duration: float
    concurrency: int
    rounds: int
    streaming: tuple[bool, ...]
    warmup: float
    prewarm: int
    max_connections: int
    prompt_kb: int = 0  # KB of earlier turns in each request body (--prompt-kb)


def run_trio(fn: Callable[[], Awaitable[None]]) -> None:
    """``trio.run``, with a Ctrl-C or SIGTERM that struck inside a nursery raised
    bare (not inside an exception group), so that the caller's cleanup and exit
    status are those of an interrupted benchmark."""
    try:
        trio.run(fn)
    except BaseExceptionGroup as group:
        for kind in (KeyboardInterrupt, SystemExit):
            match, _ = group.split(kind)
            if match is not None:
                first: BaseException = match
                while isinstance(first, BaseExceptionGroup):
                    first = first.exceptions[0]
                raise first from None
        raise


def measure(
    target: Target,
    mode: Mode,
    streaming: bool,
    rnd: int,
    options: Options,
    pids: dict[str, int],
) -> RunResult:
    result = RunResult(target.name, mode, streaming, rnd)
    spec = RequestSpec.build(
        target.endpoint, streaming=streaming, model=target.model, prompt_kb=options.prompt_kb
    )
    runner: Callable[[], Awaitable[None]]
    if mode == "open":

        async def runner() -> None:
            await open_loop(
                spec,
                result,
                rate=options.rate,
                duration=options.duration,
                prewarm=options.prewarm,
                max_connections=options.max_connections,
            )
    else:

        async def runner() -> None:
            await closed_loop(
                spec, result, concurrency=options.concurrency, duration=options.duration
            )

    if target.dashboards:
        load = runner
        seen = [0]

        async def runner() -> None:
            async with trio.open_nursery() as nursery:
                for _ in range(target.dashboards):
                    nursery.start_soon(hold_dashboard, target.endpoint, seen)
                await trio.sleep(0.2)  # the streams are open before the load starts
                await load()
                nursery.cancel_scope.cancel()
            if seen[0] == 0:
                raise BenchError(f"{target.name}: the event streams sent nothing")

    gc.collect()
    gc.disable()
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    gen_before = time.process_time()
    wall_start = time.time()
    try:
        run_trio(runner)
    except TRANSPORT_ERRORS as exc:  # the connections opened before the clock starts
        raise BenchError(f"{target.name}: cannot open connections: {exc!r}") from exc
    finally:
        gc.enable()
    result.cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    result.cpu["generator"] = time.process_time() - gen_before
    result.span = (wall_start, time.time())
    for name, pid in pids.items():
        if name != "upstream":
            result.rss_after[name] = memory(pid)
    return result


def warm_up(target: Target, options: Options) -> None:
    """Untimed closed-loop traffic; fails early if the target answers nothing."""
    for streaming in options.streaming:
        result = RunResult(target.name, "closed", streaming, 0)
        spec = RequestSpec.build(
            target.endpoint, streaming=streaming, model=target.model, prompt_kb=options.prompt_kb
        )

        async def runner(spec: RequestSpec = spec, result: RunResult = result) -> None:
            await closed_loop(spec, result, concurrency=8, duration=options.warmup)

        try:
            run_trio(runner)
        except TRANSPORT_ERRORS as exc:
            raise BenchError(f"{target.name}: cannot open connections: {exc!r}") from exc
        if result.ok == 0:
            kinds = "; ".join(
                f"{k} x{n}: {result.error_samples[k]!r}" for k, n in result.errors.items()
            )
            raise BenchError(
                f"{target.name} ({'stream' if streaming else 'json'}) answered no request "
                f"successfully during warm-up: {kinds or 'nothing sent'}"
            )
        print(
            f"  warm-up {target.name} ({'stream' if streaming else 'json'}): {result.ok} ok, "
            f"{result.error_count} errors",
            file=sys.stderr,
            flush=True,
        )


# --------------------------------------------------------------------------- report


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted ``values`` (seconds), ``nan`` if empty."""
    if not values:
        return math.nan
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.2f}"


def mode_label(mode: Mode, options: Options) -> str:
    return f"open {options.rate:g} rps" if mode == "open" else f"closed {options.concurrency}"


def stream_label(streaming: bool) -> str:
    return "stream" if streaming else "json"


def runs_table(results: list[RunResult], options: Options, proc_names: list[str]) -> list[str]:
    cpu_names = ["generator", *proc_names]
    header = (
        "| target | mode | body | round | ok | errors | rps | p50 ms | p90 ms | p99 ms | max ms "
        f"| CPU % ({' / '.join(cpu_names)}) |"
    )
    lines = [header, "|" + "---|" * 12]
    for r in results:
        lat = sorted(r.latencies)
        cpu = " / ".join(
            f"{100 * r.cpu.get(name, 0.0) / r.wall:.0f}" if r.wall else "-" for name in cpu_names
        )
        lines.append(
            f"| {r.target} | {mode_label(r.mode, options)} | {stream_label(r.streaming)} "
            f"| {r.round} | {r.ok} | {r.error_count} | {r.rps:.0f} | {ms(pct(lat, 0.5))} "
            f"| {ms(pct(lat, 0.9))} | {ms(pct(lat, 0.99))} | {ms(lat[-1] if lat else math.nan)} "
            f"| {cpu} |"
        )
    return lines


def added_table(results: list[RunResult], options: Options, baseline: str) -> list[str]:
    lines = [
        "| through | mode | body | p50 alone | p50 through | **added p50** | p99 alone "
        "| p99 through | **added p99** | rps alone | rps through |",
        "|" + "---|" * 11,
    ]
    pooled: dict[tuple[str, Mode, bool], list[float]] = {}
    rps: dict[tuple[str, Mode, bool], list[float]] = {}
    for r in results:
        key = (r.target, r.mode, r.streaming)
        pooled.setdefault(key, []).extend(r.latencies)
        rps.setdefault(key, []).append(r.rps)
    for (name, mode, streaming), values in pooled.items():
        if name == baseline:
            continue
        alone = sorted(pooled.get((baseline, mode, streaming), []))
        through = sorted(values)
        a50, a99 = pct(alone, 0.5), pct(alone, 0.99)
        t50, t99 = pct(through, 0.5), pct(through, 0.99)
        lines.append(
            f"| {name} | {mode_label(mode, options)} | {stream_label(streaming)} | {ms(a50)} "
            f"| {ms(t50)} | **{ms(t50 - a50)}** | {ms(a99)} | {ms(t99)} | **{ms(t99 - a99)}** "
            f"| {statistics.median(rps.get((baseline, mode, streaming), [math.nan])):.0f} "
            f"| {statistics.median(rps[(name, mode, streaming)]):.0f} |"
        )
    return lines


def memory_table(
    results: list[RunResult], proxies: list[Target], start: dict[str, tuple[int, int]]
) -> list[str]:
    names = [t.name for t in proxies]
    cols = " | ".join(f"{n}: VmRSS / VmHWM MB | {n}: requests so far" for n in names)
    lines = [f"| after run | {cols} |", "|---|" + "---|---|" * len(names)]
    served: Counter[str] = Counter()
    row = " | ".join(
        f"{start[n][0] / MB:.1f} / {start[n][1] / MB:.1f} | {served[n]}" for n in names
    )
    lines.append(f"| start (after warm-up) | {row} |")
    for r in results:
        served[r.target] += r.ok + r.error_count
        row = " | ".join(
            f"{r.rss_after[n][0] / MB:.1f} / {r.rss_after[n][1] / MB:.1f} | {served[n]}"
            for n in names
        )
        lines.append(
            f"| {r.target}, {r.mode}, {stream_label(r.streaming)}, round {r.round} | {row} |"
        )
    return lines


def notes(results: list[RunResult], options: Options) -> list[str]:
    lines = []
    for r in results:
        parts = []
        if r.mode == "open":
            lags = sorted(r.lags)
            parts.append(
                f"dispatch lag p50 {ms(pct(lags, 0.5))} / p99 {ms(pct(lags, 0.99))} / max "
                f"{ms(lags[-1] if lags else math.nan)} ms"
            )
        parts.append(f"{r.connections} connections opened, at most {r.peak_busy} busy")
        if r.stale:
            parts.append(
                f"{r.stale} idle connections found closed by the server before reuse "
                "(replaced, not counted as errors)"
            )
        if r.ok:  # over successes, as rps is (what failed requests cost is in it)
            per = ", ".join(f"{name} {1e6 * cpu / r.ok:.0f}" for name, cpu in r.cpu.items())
            parts.append(
                f"CPU per request ({MICRO}s, over {r.ok} successes, {r.error_count} errors): {per}"
            )
        for kind, count in r.errors.most_common():
            parts.append(f"error {kind} x{count} (first: {r.error_samples[kind]!r})")
        lines.append(
            f"- {r.target}, {mode_label(r.mode, options)}, {stream_label(r.streaming)}, "
            f"round {r.round}: " + "; ".join(parts)
        )
    return lines


def proxy_log_summary(
    proxy: Child, target: str, results: list[RunResult], options: Options
) -> list[str]:
    """What the proxy said on stderr: events, per-request statuses and retries, its
    own view of request durations (and when the slowest happened), and the first
    unusual lines verbatim."""
    slowest: list[tuple[float, float]] = []  # (duration s, ts)
    events: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    upstream: Counter[str] = Counter()
    retried = 0
    durations: list[float] = []
    unusual: list[str] = []
    for line in proxy.log_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            events["(not JSON)"] += 1
            if len(unusual) < 5:
                unusual.append(line[:300])
            continue
        if "event" in record:
            event = str(record["event"])
            events[event] += 1
            if event not in ("listening", "starting") and len(unusual) < 5:
                unusual.append(line[:300])
            continue
        events["(request)"] += 1
        statuses[str(record.get("status"))] += 1
        if "upstream_status" in record:
            upstream[str(record["upstream_status"])] += 1
        if isinstance(record.get("attempts"), int) and record["attempts"] > 1:
            retried += 1
        if record.get("method") == "POST" and isinstance(record.get("duration_ms"), int | float):
            durations.append(float(record["duration_ms"]) / 1000)
            if isinstance(record.get("ts"), int | float):
                slowest.append((durations[-1], float(record["ts"])))
        if record.get("status") != 200 and len(unusual) < 5:
            unusual.append(line[:300])
    durations.sort()
    out = [
        f"- {proxy.name} log ({sum(events.values())} lines): "
        + ", ".join(f"{e} x{n}" for e, n in events.most_common())
        + (f"; statuses {dict(statuses)}" if statuses else "")
        + (f"; upstream statuses {dict(upstream)}" if upstream else "")
        + f"; {retried} requests with more than one attempt"
        + (
            f"; its own duration_ms for POSTs: p50 {ms(pct(durations, 0.5))}, "
            f"p99 {ms(pct(durations, 0.99))}, max {ms(durations[-1])} ms"
            if durations
            else ""
        )
    ]
    for duration, ts in sorted(slowest, reverse=True)[:3]:
        during = next(
            (
                f"{r.target}, {mode_label(r.mode, options)}, {stream_label(r.streaming)}, "
                f"round {r.round}, ended {ts - r.span[0]:.1f} s into the run"
                for r in results
                if r.target == target and r.span[0] <= ts <= r.span[1] + 0.5
            ),
            "warm-up or between runs",
        )
        out.append(f"  - slow in the proxy's log: {ms(duration)} ms, logged during {during}")
    out += [f"  - unusual: `{line}`" for line in unusual]
    return out


def _versions() -> str:
    found = []
    for name in ("trio", "httptools"):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.proxy_load",
        description="Open- and closed-loop load through keyrotor's proxy vs the fake upstream.",
    )
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop requests/s (200)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (10)")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop connections (32)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions (1)")
    parser.add_argument("--no-stream", action="store_true", help="non-streaming requests only")
    parser.add_argument(
        "--prompt-kb",
        type=int,
        default=0,
        metavar="N",
        help="about N KB of an agent's earlier turns in every request body (0: just 'hi')",
    )
    parser.add_argument(
        "--state",
        choices=("file", "none", "both"),
        default="file",
        help="the proxy keeps its state file (in a temporary directory; the default, as "
        "`keyrotor serve` does), runs --no-state, or both side by side",
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="untimed seconds per target and body (1)"
    )
    parser.add_argument(
        "--prewarm", type=int, default=16, help="open loop: connections opened before (16)"
    )
    parser.add_argument(
        "--max-connections", type=int, default=256, help="open loop: connection cap (256)"
    )
    parser.add_argument(
        "--upstream-only",
        action="store_true",
        help="measure the fake upstream alone (no proxy)",
    )
    parser.add_argument(
        "--route",
        action="store_true",
        help=f"also send requests naming a route ({ROUTE!r}: the cheaper of two models) to "
        "the same proxy process, interleaved with the plain ones",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="also measure `keyrotor serve --workers N` sharing key health through a "
        "redis-server started here (needs Debian's redis-server)",
    )
    parser.add_argument(
        "--faults",
        action="store_true",
        help="also a proxy whose 4 healthy keys are mixed with 4 faulty ones (revoked, out "
        "of credits, rate limited, hanging; first byte awaited 2 s): the faults' cost",
    )
    parser.add_argument(
        "--peer",
        choices=("litellm",),
        help="measure a peer's proxy side by side: litellm (from this venv, or the python "
        "given with --litellm-python)",
    )
    parser.add_argument(
        "--limited",
        action="store_true",
        help="with --workers N: also N workers whose keys have an rpm and max_in_flight "
        "(far above the load), so that every attempt makes one Redis round trip",
    )
    parser.add_argument(
        "--litellm-python",
        metavar="PATH",
        help="the python of a separate venv with LiteLLM's proxy (python3 -m venv "
        "/tmp/litellm && /tmp/litellm/bin/pip install 'litellm[proxy]'): measure it side "
        "by side (with --workers N: also at N workers); default: litellm in this venv, if any",
    )
    parser.add_argument(
        "--keys",
        type=int,
        default=0,
        metavar="N",
        help="also a proxy whose pool holds N fake keys (e.g. 10000) instead of 4",
    )
    parser.add_argument(
        "--parser",
        choices=("auto", "h11", "httptools", "both"),
        default="auto",
        help="the proxy's HTTP parser (auto: httptools when installed); both: also a "
        "proxy on h11 side by side",
    )
    parser.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="PATH",
        help="also the proxy (state file, 4 keys) run by this interpreter, side by side: the "
        "python of a venv with this tree installed (python3.13 -m venv /tmp/py313 && "
        "/tmp/py313/bin/pip install -e '.[proxy,fast]'); may be given more than once",
    )
    parser.add_argument(
        "--gc",
        choices=("tuned", "python", "both"),
        default="tuned",
        help="the proxy's garbage collector: tuned (`[server] gc_threshold`'s default), "
        "python (gc_threshold = 0: Python's own settings), or both side by side (with "
        "--keys N, for that pool too)",
    )
    parser.add_argument(
        "--dashboard",
        type=int,
        default=0,
        metavar="N",
        help="also measure the same proxy process with N dashboards open (each an event "
        "stream: the pool's status every second), interleaved with the plain runs",
    )
    parser.add_argument(
        "--catalog",
        default="default",
        choices=["default", "realistic"],
        help="the fake upstream's /models: 4 models, or 320 (the proxy loads it at start)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="also the proxy in front of a second fake upstream that serves HTTPS (as "
        "OpenRouter does; a self-signed certificate made with the openssl command, trusted "
        "through SSL_CERT_FILE), side by side with the plain-HTTP one",
    )
    return parser


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every child's cleanup


ALWAYS_SHOWN = ("rate", "duration", "concurrency", "rounds")  # in the command even at default


def _command(args: argparse.Namespace) -> str:
    """The command line of this run: the load's four settings, then every option
    whose value differs from its default, in the parser's order."""
    parts = [".venv/bin/python -m benchmarks.proxy_load"]
    actions = [a for a in _parser()._actions if a.option_strings and a.dest != "help"]
    for action in sorted(actions, key=lambda a: a.dest not in ALWAYS_SHOWN):
        value = getattr(args, action.dest)
        if value == action.default and action.dest not in ALWAYS_SHOWN:
            continue
        option = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            parts.append(option)
        elif isinstance(action, argparse._AppendAction):
            parts += [f"{option} {shlex.quote(str(v))}" for v in value]
        else:
            text = f"{value:g}" if isinstance(value, float) else str(value)
            parts.append(f"{option} {shlex.quote(text)}")
    return " ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not (
        0 < args.rate <= 20000
        and 0 < args.duration <= 600
        and 1 <= args.concurrency <= 1024
        and 1 <= args.rounds <= 20
        and 0 <= args.keys <= 100_000
        and 0 < args.warmup <= 60
        and 0 <= args.prewarm <= args.max_connections <= 4096
        and 0 <= args.prompt_kb <= 8192
    ):
        print(
            "error: need 0 < rate <= 20000, 0 < duration <= 600, 1 <= concurrency <= 1024, "
            "1 <= rounds <= 20, 0 <= keys <= 100000, 0 < warmup <= 60, "
            "0 <= prewarm <= max-connections <= 4096, 0 <= prompt-kb <= 8192",
            file=sys.stderr,
        )
        return 2
    try:  # before anything starts: a missing interpreter is one line, not a traceback
        versions = {python: python_version(python) for python in args.python}
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    options = Options(
        rate=args.rate,
        duration=args.duration,
        concurrency=args.concurrency,
        rounds=args.rounds,
        streaming=(False,) if args.no_stream else (False, True),
        warmup=args.warmup,
        prewarm=args.prewarm,
        max_connections=args.max_connections,
        prompt_kb=args.prompt_kb,
    )
    litellm_python = args.litellm_python or sys.executable
    litellm_found = (
        args.litellm_python is not None or importlib.util.find_spec("litellm") is not None
    )
    load_before = os.getloadavg()
    started = time.perf_counter()
    with ExitStack() as stack:
        scenario = "faulty" if args.faults else "open"
        upstream, upstream_url = start_upstream(stack, args.catalog, scenario)
        print(f"fake upstream pid {upstream.pid} at {upstream_url}", file=sys.stderr, flush=True)
        baseline = "upstream alone"
        targets = [Target(baseline, Endpoint.parse(upstream_url + "/chat/completions"), None)]
        proxies: list[tuple[Target, Child]] = []
        pids_extra: dict[str, int] = {}  # other upstreams' CPU, reported too
        if not args.upstream_only:
            parser = "auto" if args.parser == "both" else args.parser
            states = {"file": (True,), "none": (False,), "both": (True, False)}[args.state]
            gcs = {"tuned": (False,), "python": (True,), "both": (False, True)}[args.gc]
            for state, python_gc in itertools.product(states, gcs):
                proxy, endpoint = start_keyrotor(
                    stack, upstream_url, state, args.route, parser=parser, python_gc=python_gc
                )
                name = "through keyrotor" if state else "through keyrotor --no-state"
                name += ", Python's gc" if python_gc else ""
                print(f"{name}: pid {proxy.pid} at {endpoint.url}", file=sys.stderr, flush=True)
                proxies.append((Target(name, endpoint, proxy.pid), proxy))
                if args.route:  # the same process, requests naming the route
                    routed = Target(f"{name}, route {ROUTE}", endpoint, proxy.pid, ROUTE)
                    proxies.append((routed, proxy))
                if args.dashboard:  # the same process, dashboards open during the run
                    watched = Target(
                        f"{name}, {args.dashboard} dashboards open",
                        endpoint,
                        proxy.pid,
                        dashboards=args.dashboard,
                    )
                    proxies.append((watched, proxy))
            for state, python_gc in itertools.product(states, gcs):
                if not args.keys:  # the same proxy with a pool of many keys, its own process
                    break
                many_keys, endpoint = start_keyrotor(
                    stack, upstream_url, state, parser=parser, keys=args.keys, python_gc=python_gc
                )
                name = f"through keyrotor, {args.keys:,} keys" + ("" if state else " --no-state")
                name += ", Python's gc" if python_gc else ""
                print(f"{name}: pid {many_keys.pid} at {endpoint.url}", file=sys.stderr, flush=True)
                proxies.append((Target(name, endpoint, many_keys.pid), many_keys))
            if args.tls:  # the same proxy in front of an HTTPS upstream, its own process
                from keyrotor.testing.certificates import self_signed

                folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                try:
                    cert, key = self_signed(folder)
                except RuntimeError as exc:
                    raise BenchError(f"--tls: {exc}") from None
                secure, secure_url = start_upstream(stack, args.catalog, tls=(cert, key))
                pids_extra["upstream (HTTPS)"] = secure.pid
                tls_proxy, endpoint = start_keyrotor(stack, secure_url, True, ca_file=cert)
                name = "through keyrotor, HTTPS upstream"
                print(f"{name}: pid {tls_proxy.pid} at {endpoint.url}", file=sys.stderr, flush=True)
                proxies.append((Target(name, endpoint, tls_proxy.pid), tls_proxy))
            for python in args.python:  # the same proxy on another interpreter
                other, endpoint = start_keyrotor(stack, upstream_url, True, python=python)
                name = f"through keyrotor, Python {versions[python]}"
                print(f"{name}: pid {other.pid} at {endpoint.url}", file=sys.stderr, flush=True)
                proxies.append((Target(name, endpoint, other.pid), other))
            if args.parser == "both":  # the same proxy on h11, side by side
                reference, endpoint = start_keyrotor(stack, upstream_url, True, parser="h11")
                name = "through keyrotor, h11 parser"
                print(f"{name}: pid {reference.pid} at {endpoint.url}", file=sys.stderr, flush=True)
                proxies.append((Target(name, endpoint, reference.pid), reference))
            if args.faults:  # the same proxy's keys plus four faulty ones, a process of its own
                faulty, endpoint = start_keyrotor(stack, upstream_url, True, faults=True)
                name = "through keyrotor, 4 faulty keys mixed in"
                print(f"{name}: pid {faulty.pid} at {endpoint.url}", file=sys.stderr, flush=True)
                proxies.append((Target(name, endpoint, faulty.pid), faulty))
            if args.workers > 1:  # N processes, their CPU not counted (children of one pid)
                redis = start_redis(stack)
                many, endpoint = start_keyrotor(
                    stack, upstream_url, True, workers=args.workers, shared=redis
                )
                name = f"through keyrotor, {args.workers} workers"
                print(f"{name}: supervisor pid {many.pid} at {endpoint.url}", file=sys.stderr)
                proxies.append((Target(name, endpoint, None), many))
                if args.limited:
                    many, endpoint = start_keyrotor(
                        stack, upstream_url, True, workers=args.workers, shared=redis, limited=True
                    )
                    name += ", shared limits"
                    print(f"{name}: supervisor pid {many.pid} at {endpoint.url}", file=sys.stderr)
                    proxies.append((Target(name, endpoint, None), many))
            if litellm_found:
                lproxy, lendpoint = start_litellm(stack, upstream_url, litellm_python)
                print(f"litellm pid {lproxy.pid} at {lendpoint.url}", file=sys.stderr, flush=True)
                proxies.append((Target("through LiteLLM", lendpoint, lproxy.pid), lproxy))
                if args.workers > 1:
                    lmany, lendpoint = start_litellm(
                        stack, upstream_url, litellm_python, args.workers
                    )
                    name = f"through LiteLLM, {args.workers} workers"
                    print(f"{name}: pid {lmany.pid} at {lendpoint.url}", file=sys.stderr)
                    proxies.append((Target(name, lendpoint, None), lmany))
        targets += [t for t, _ in proxies]
        pids = {
            "upstream": upstream.pid,
            **pids_extra,
            **{t.name: t.pid for t, _ in proxies if t.pid},
        }

        for target in targets:
            warm_up(target, options)
        start_memory = {t.name: memory(t.pid) for t, _ in proxies if t.pid}

        results: list[RunResult] = []
        for rnd in range(1, options.rounds + 1):
            for streaming in options.streaming:
                for mode in ("open", "closed"):
                    for target in targets:
                        r = measure(target, mode, streaming, rnd, options, pids)
                        results.append(r)
                        lat = sorted(r.latencies)
                        print(
                            f"round {rnd}/{options.rounds} {target.name}, "
                            f"{mode_label(mode, options)}, {stream_label(streaming)}: "
                            f"{r.ok} ok, {r.error_count} errors, {r.rps:.0f} rps, "
                            f"p50 {ms(pct(lat, 0.5))} ms, p99 {ms(pct(lat, 0.99))} ms",
                            file=sys.stderr,
                            flush=True,
                        )
                        for proc in [upstream, *(c for _, c in proxies)]:
                            if proc.proc.poll() is not None:
                                raise BenchError(
                                    f"{proc.name} exited during the run:\n{proc.log_tail()}"
                                )
                        busy = settle(pids)
                        if busy is not None:
                            print(
                                f"  {busy} still busy {SETTLE_LIMIT:g} s after that run",
                                file=sys.stderr,
                                flush=True,
                            )
        elapsed = time.perf_counter() - started
        load_after = os.getloadavg()

        out = [
            "## Proxy load (loopback, fake upstream in its own process)",
            "",
            f"- command: `{_command(args)}`",
            f"- Python {platform.python_version()} on {platform.machine()}, "
            f"{os.cpu_count()} CPUs; generator {_versions()} (one process, one trio thread); "
            f"run time {elapsed:.0f} s; load average {load_before[0]:.2f} before, "
            f"{load_after[0]:.2f} after.",
            f"- request: `POST` `{chat_body(stream=False).decode()}`"
            + (
                f" with about {options.prompt_kb} KB of earlier turns before the 'hi' "
                f"({len(chat_body(stream=False, prompt_kb=options.prompt_kb)):,} bytes)"
                if options.prompt_kb
                else ""
            )
            + " (streaming: plus "
            '`"stream":true`, SSE read to `data: [DONE]`); upstream alone at '
            f"`{targets[0].endpoint.url}`"
            + "".join(f", {t.name} at `{t.endpoint.url}`" for t, _ in proxies)
            + f"; {len(FAKE_KEYS)} fake keys.",
            f"- open loop: {options.rate:g} requests/s for {options.duration:g} s, latency from "
            f"the scheduled send time to the last body byte, up to {options.max_connections} "
            f"connections ({options.prewarm} opened beforehand). Closed loop: "
            f"{options.concurrency} keep-alive connections back to back for "
            f"{options.duration:g} s, latency from send to last byte. rps = successes / (first "
            "send to last completion). Errors: any non-200, incomplete stream, reset, or no "
            f"answer within {REQUEST_TIMEOUT:.0f} s.",
            "- CPU %: CPU time of each process during the run over its wall time (100 = one core).",
            "",
            "### Runs",
            "",
            *runs_table(results, options, list(pids)),
            "",
        ]
        if proxies:
            out += [
                "### Added latency (through the proxy minus the upstream alone, same mode)",
                "",
                "Percentiles of all rounds' samples; the difference of two p99s is not the "
                "p99 of a difference, but it is what a caller sees. Target (design.md): "
                "p50 <= 1 ms, p99 <= 5 ms at 200 rps.",
                "",
                *added_table(results, options, baseline),
                "",
                "### Proxy memory (/proc/PID/status)",
                "",
                *memory_table(results, [t for t, _ in proxies if t.pid], start_memory),
                "",
            ]
            for target, proc in proxies:
                if not target.pid:  # several workers: no one process to look at
                    continue
                rss, hwm = memory(proc.pid)
                out.append(
                    f"- {target.name}: peak RSS (VmHWM) {hwm / MB:.1f} MB, RSS now "
                    f"{rss / MB:.1f} MB (target <= 80 MB)."
                )
        else:
            out.append("- no proxy measured (--upstream-only).")
        out.append(
            "- LiteLLM: measured above."
            if litellm_found and proxies
            else "- LiteLLM: skipped (litellm is not importable in this environment)."
            if not litellm_found
            else "- LiteLLM: skipped (--upstream-only)."
        )
        out += ["", "### Notes per run", "", *notes(results, options)]
        for target, proc in proxies:
            out += proxy_log_summary(proc, target.name, results, options)
        print("\n".join(out), flush=True)
    return 0


def run_main(main: Callable[[], int]) -> None:
    """A benchmark's entry point: exit codes 130 on Ctrl-C, 1 with one line on a
    ``BenchError`` (every child is stopped by then)."""
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    run_main(main)
