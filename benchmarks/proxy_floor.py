"""The floor under the proxy: the least a Python forwarder can do, beside ``keyrotor serve``.

    python -m benchmarks.proxy_floor --duration 5 --rounds 2 [--no-state] [--keys N]
        [--runtime trio --runtime asyncio --runtime uvloop --runtime server --runtime client]

A *floor* forwarder (``python -m benchmarks.proxy_floor serve --runtime R
--upstream URL``, started here) does per request only what any key-rotating
proxy must: parse the caller's request with httptools, take the next of four
fake keys, write the upstream request on a kept-alive connection (one per
caller connection), parse the answer with httptools and send it on (JSON with
its length; an event stream re-framed chunk by chunk as it arrives). No
timeouts, no logs, no accounting, no error answers: not a proxy anyone should
run, a yardstick. ``trio`` waits on plain non-blocking sockets as keyrotor's
server does, one task per connection; ``asyncio`` and ``uvloop`` are callback
protocols (as uvicorn's httptools protocol), no task at all (``uvloop`` only if
it is importable: ``pip install uvloop`` in the venv; skipped otherwise).

Two *rungs* put one of keyrotor's layers into the trio floor: ``server`` is
keyrotor's proxy server (reader and worker tasks, timeouts, codec, access log)
in front of the floor's upstream half; ``client`` is the floor's caller half
sending through keyrotor's trio client (driver, core, connection pool, exchange
steps, usage read from the answer). What each adds over the trio floor is that
layer's cost; what keyrotor adds beyond both is its application's.

Each floor and ``keyrotor serve`` (4 keys, state file on unless ``--no-state``)
run against the same fake upstream with ``proxy_load``'s generator, one after
the other in each round: closed loop of 32 connections (CPU a request) and an
open loop at 200 requests/s (latency added over the upstream alone), JSON and
SSE. The table says what share of keyrotor's CPU a request the runtime and the
HTTP parsing alone already take, and what a proxy on each runtime adds to the
latency of one client at a light load on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import select
import socket
import statistics
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import ExitStack
from functools import partial
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
import trio

from . import proxy_load as load

KEYS = tuple(f"sk-or-v1-fake-floor-{i}".encode() for i in range(4))
RUNTIMES = ("trio", "asyncio", "uvloop")
RUNGS = ("server", "client")  # keyrotor's server or its client in the trio floor
_RECEIVE = 65536


class _Message:
    """httptools' callbacks for one message at a time (a request or a response)."""

    def __init__(self) -> None:
        self.url = b""
        self.body: list[bytes] = []
        self.headers_done = False
        self.done = False
        self.content_type = b"application/json"

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.content_type = value

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True


def _upstream_head(path: bytes, host: bytes, key: bytes, length: int) -> bytes:
    return b"POST %s HTTP/1.1\r\nhost: %s\r\nauthorization: Bearer %s\r\n" % (path, host, key) + (
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % length
    )


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _json_answer(status: int, content_type: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 %d OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (
        status,
        content_type,
        len(body),
        body,
    )


def _stream_head(status: int, content_type: bytes) -> bytes:
    return b"HTTP/1.1 %d OK\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n\r\n" % (
        status,
        content_type,
    )


# --------------------------------------------------------------------------- trio


async def _trio_send(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


async def _trio_receive(sock: socket.socket) -> bytes:
    await trio.lowlevel.wait_readable(sock)  # an answer is never there at once
    while True:
        try:
            return sock.recv(_RECEIVE)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


async def _trio_request(
    caller: socket.socket, request: _Message, parser: httptools.HttpRequestParser
) -> tuple[bytes, bytes] | None:
    """The caller's next request (target, body), or None once it closed."""
    while not request.done:
        data = await _trio_receive(caller)
        if not data:
            return None
        parser.feed_data(data)
    read = request.url, b"".join(request.body)
    request.__init__()  # type: ignore[misc]
    return read


async def _trio_connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.connect(address)
    except BlockingIOError:
        await trio.lowlevel.wait_writable(sock)
    return sock


async def _trio_connection(
    caller: socket.socket, *, address: tuple[str, int], base: bytes, keys: Iterator[bytes]
) -> None:
    host = b"%s:%d" % (address[0].encode(), address[1])
    upstream: socket.socket | None = None
    request = _Message()
    parser = httptools.HttpRequestParser(request)
    try:
        while (read := await _trio_request(caller, request, parser)) is not None:
            url, body = read
            path = base + url.removeprefix(b"/v1")
            if upstream is None:
                upstream = await _trio_connect(address)
            await _trio_send(upstream, _upstream_head(path, host, next(keys), len(body)) + body)
            if not await _trio_answer(caller, upstream):
                return
    except OSError:
        return
    finally:
        caller.close()
        if upstream is not None:
            upstream.close()


async def _trio_answer(caller: socket.socket, upstream: socket.socket) -> bool:
    """Send the caller the upstream's answer: an event stream (a 200 of
    ``text/event-stream``, known once its head is parsed) re-framed chunked, each
    read's pieces as they come, anything else once whole with its length. False
    if the upstream closed first."""
    answer = _Message()
    parser = httptools.HttpResponseParser(answer)
    streaming: bool | None = None  # None: the head is not parsed yet
    while not answer.done:
        data = await _trio_receive(upstream)
        if not data:
            return False
        parser.feed_data(data)
        if not answer.headers_done:
            continue
        status = parser.get_status_code()
        out = b""
        if streaming is None:
            streaming = status == 200 and b"event-stream" in answer.content_type
            if streaming:
                out = _stream_head(status, answer.content_type)
        if not streaming:
            if answer.done:
                await _trio_send(
                    caller, _json_answer(status, answer.content_type, b"".join(answer.body))
                )
            continue
        out += b"".join(_chunk(piece) for piece in answer.body if piece)
        answer.body.clear()
        if answer.done:
            out += b"0\r\n\r\n"
        if out:
            await _trio_send(caller, out)
    return True


async def _trio_serve(listener: socket.socket, address: tuple[str, int], base: bytes) -> None:
    keys = itertools.cycle(KEYS)
    await _trio_accept(listener, partial(_trio_connection, address=address, base=base, keys=keys))


async def _trio_accept(
    listener: socket.socket, connection: Callable[[socket.socket], Awaitable[None]]
) -> None:
    """Accept connections for ever, each served by ``connection(caller)`` in its task."""
    async with trio.open_nursery() as nursery:
        while True:
            await trio.lowlevel.wait_readable(listener)
            try:
                caller, _ = listener.accept()
            except BlockingIOError:
                continue
            caller.setblocking(False)
            caller.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nursery.start_soon(connection, caller)


# --------------------------------------------------------------------------- rungs


async def _server_rung(address: tuple[str, int], base: bytes) -> None:
    """keyrotor's proxy server (its reader and worker tasks, timeouts, codec, access
    log) in front of the floor's upstream half (an app that forwards as the floor does)."""
    from keyrotor.adapters.proxy.logs import LineLog
    from keyrotor.adapters.proxy.server import ServerOptions, serve
    from keyrotor.adapters.proxy.types import Request, Response

    host = b"%s:%d" % (address[0].encode(), address[1])
    keys = itertools.cycle(KEYS)
    idle: list[socket.socket] = []

    async def app(request: Request) -> Response:
        upstream = idle.pop() if idle else await _trio_connect(address)
        path = base + request.target.removeprefix("/v1").encode()
        body = request.body
        await _trio_send(upstream, _upstream_head(path, host, next(keys), len(body)) + body)
        answer = _Message()
        parser = httptools.HttpResponseParser(answer)
        while not answer.headers_done:
            data = await _trio_receive(upstream)
            if not data:
                raise OSError("the upstream closed")
            parser.feed_data(data)
        headers = [("content-type", answer.content_type.decode())]
        status = parser.get_status_code()
        if b"event-stream" not in answer.content_type:
            while not answer.done:
                parser.feed_data(await _trio_receive(upstream))
            idle.append(upstream)
            return Response(status=status, headers=headers, body=b"".join(answer.body))

        async def chunks() -> Any:
            while True:
                while answer.body:
                    yield answer.body.pop(0)
                if answer.done:
                    idle.append(upstream)
                    return
                parser.feed_data(await _trio_receive(upstream))

        return Response(status=status, headers=headers, body=chunks())

    options = ServerOptions(host=load.LOOPBACK, port=0)
    log = LineLog(sys.stderr)  # the access log as ``keyrotor serve`` writes it: batched
    with log.batched():
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve, app, options, log=log))
            print(f"http://{load.LOOPBACK}:{port}", flush=True)


async def _client_rung(listener: socket.socket, url: str) -> None:
    """The floor's caller half, with keyrotor's async client (driver, core, pool,
    exchange steps) sending upstream."""
    from keyrotor.transports.trio import Client

    aliases = {f"k{i}": key.decode() for i, key in enumerate(KEYS)}
    headers = {"content-type": "application/json"}
    async with Client(aliases, base_url=url) as client:

        async def connection(caller: socket.socket) -> None:
            request = _Message()
            parser = httptools.HttpRequestParser(request)
            try:
                while (read := await _trio_request(caller, request, parser)) is not None:
                    url, body = read
                    path = url.removeprefix(b"/v1").decode()
                    answer = await client.send("POST", path, content=body, headers=headers)
                    try:
                        content_type = answer.headers.get("content-type", "").encode()
                        if b"event-stream" not in content_type:
                            out = await answer.aread()
                            await _trio_send(
                                caller, _json_answer(answer.status_code, content_type, out)
                            )
                            continue
                        await _trio_send(caller, _stream_head(answer.status_code, content_type))
                        async for piece in answer.aiter_bytes():
                            await _trio_send(caller, _chunk(piece))
                        await _trio_send(caller, b"0\r\n\r\n")
                    finally:
                        await answer.aclose()
            except OSError:
                return
            finally:
                caller.close()

        await _trio_accept(listener, connection)


# --------------------------------------------------------------------------- asyncio


def _no_delay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _UpstreamSide(asyncio.Protocol):
    """The upstream half: parses answers and writes them to the caller."""

    def __init__(self, caller: asyncio.Transport) -> None:
        self.caller = caller
        self.answer = _Message()
        self.parser = httptools.HttpResponseParser(self)
        self.streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _no_delay(transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.answer.on_header(name, value)

    def on_body(self, body: bytes) -> None:
        if self.streaming:
            self.caller.write(_chunk(body))
        else:
            self.answer.body.append(body)

    def on_headers_complete(self) -> None:
        # An answer without a length is an event stream: send its head at once.
        if self.parser.get_status_code() == 200 and b"event-stream" in self.answer.content_type:
            self.streaming = True
            self.caller.write(_stream_head(200, self.answer.content_type))

    def on_message_complete(self) -> None:
        if self.streaming:
            self.caller.write(b"0\r\n\r\n")
        else:
            status = self.parser.get_status_code()
            body = b"".join(self.answer.body)
            self.caller.write(_json_answer(status, self.answer.content_type, body))
        self.answer = _Message()
        self.streaming = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.caller.close()


class _CallerSide(asyncio.Protocol):
    """The caller half: parses requests and writes them upstream."""

    def __init__(self, address: tuple[str, int], base: bytes, keys: Iterator[bytes]) -> None:
        self.address = address
        self.host = b"%s:%d" % (address[0].encode(), address[1])
        self.base = base
        self.keys = keys
        self.request = _Message()
        self.parser = httptools.HttpRequestParser(self.request)
        self.upstream: asyncio.Transport | None = None
        self.waiting: list[bytes] = []  # requests framed before the upstream connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        _no_delay(self.transport)
        loop = asyncio.get_running_loop()
        self.connecting = loop.create_task(
            loop.create_connection(lambda: _UpstreamSide(self.transport), *self.address)
        )
        self.connecting.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is not None:
            self.transport.close()
            return
        self.upstream = task.result()[0]
        for framed in self.waiting:
            self.upstream.write(framed)
        self.waiting.clear()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        if not self.request.done:
            return
        body = b"".join(self.request.body)
        path = self.base + self.request.url.removeprefix(b"/v1")
        self.request.__init__()  # type: ignore[misc]
        framed = _upstream_head(path, self.host, next(self.keys), len(body)) + body
        if self.upstream is None:
            self.waiting.append(framed)
        else:
            self.upstream.write(framed)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()
        else:
            self.connecting.cancel()


async def _asyncio_serve(listener: socket.socket, address: tuple[str, int], base: bytes) -> None:
    keys = itertools.cycle(KEYS)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _CallerSide(address, base, keys), sock=listener)
    await server.serve_forever()


# --------------------------------------------------------------------------- serve


def serve(runtime: str, upstream: str) -> None:
    """Listen on a free loopback port, print its URL, forward until killed."""
    parts = urlsplit(upstream)
    if parts.hostname != load.LOOPBACK or parts.port is None:
        raise SystemExit(f"error: the upstream must be http://{load.LOOPBACK}:PORT/...")
    address = (parts.hostname, parts.port)
    base = (parts.path.rstrip("/")).encode()
    if runtime == "server":
        trio.run(_server_rung, address, base)  # it binds, and prints its URL
        return
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((load.LOOPBACK, 0))
    listener.listen(1024)
    listener.setblocking(False)
    print(f"http://{load.LOOPBACK}:{listener.getsockname()[1]}", flush=True)
    if runtime == "trio":
        trio.run(_trio_serve, listener, address, base)
    elif runtime == "client":
        trio.run(_client_rung, listener, upstream)
    elif runtime == "uvloop":
        import uvloop  # type: ignore[import-not-found]

        uvloop.run(_asyncio_serve(listener, address, base))
    else:
        asyncio.run(_asyncio_serve(listener, address, base))


def label(floor: str) -> str:
    """A floor's name in the report."""
    return f"trio floor + keyrotor's {floor}" if floor in RUNGS else f"{floor} floor"


def start_floor(stack: ExitStack, runtime: str, upstream: str) -> tuple[load.Child, load.Endpoint]:
    cmd = [sys.executable, "-m", "benchmarks.proxy_floor", "serve"]
    cmd += ["--runtime", runtime, "--upstream", upstream]
    floor = stack.enter_context(load.child(label(runtime), cmd, load._child_env({}), stdout=True))
    stdout = floor.proc.stdout
    assert stdout is not None
    ready, _, _ = select.select([stdout], [], [], load.STARTUP_TIMEOUT)
    line = stdout.readline().decode().strip() if ready else ""
    if not line:
        raise load.BenchError(f"the {label(runtime)} did not start:\n{floor.log_tail()}")
    return floor, load.Endpoint.parse(line + "/v1/chat/completions")


# --------------------------------------------------------------------------- measure


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("serve", help="run one floor forwarder (started by the benchmark)")
    child.add_argument("--runtime", choices=RUNTIMES + RUNGS, required=True)
    child.add_argument("--upstream", required=True)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds a run (5)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (2)")
    parser.add_argument("--rate", type=float, default=200.0, help="open loop requests/s (200)")
    parser.add_argument("--keys", type=int, default=4, help="keyrotor's fake keys (4)")
    parser.add_argument("--no-state", action="store_true", help="keyrotor without state file")
    parser.add_argument(
        "--runtime",
        action="append",
        choices=RUNTIMES + RUNGS,
        help="floors to run (default: all); server, client: keyrotor's in the trio floor",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        serve(args.runtime, args.upstream)
        return 0
    runtimes = args.runtime or list(RUNTIMES + RUNGS)
    if "uvloop" in runtimes and importlib.util.find_spec("uvloop") is None:
        print("uvloop is not installed: its floor is skipped", file=sys.stderr)
        runtimes.remove("uvloop")
    options = load.Options(
        rate=args.rate,
        duration=args.duration,
        concurrency=32,
        rounds=args.rounds,
        streaming=(False, True),
        warmup=1.0,
        prewarm=16,
        max_connections=256,
    )
    results: list[load.RunResult] = []
    with ExitStack() as stack:
        upstream, url = load.start_upstream(stack)
        targets = [
            load.Target("upstream alone", load.Endpoint.parse(url + "/chat/completions"), None)
        ]
        proxy, endpoint = load.start_keyrotor(stack, url, not args.no_state, keys=args.keys)
        targets.append(load.Target("keyrotor", endpoint, proxy.pid))
        for runtime in runtimes:
            floor, endpoint = start_floor(stack, runtime, url)
            targets.append(load.Target(label(runtime), endpoint, floor.pid))
        for target in targets:
            load.warm_up(target, options)
        for rnd in range(1, args.rounds + 1):
            for streaming in options.streaming:
                for mode in ("closed", "open"):
                    for target in targets:
                        pids = {"upstream": upstream.pid}
                        if target.pid is not None:
                            pids[target.name] = target.pid
                        print(f"  round {rnd} {target.name} {mode}", file=sys.stderr, flush=True)
                        result = load.measure(target, mode, streaming, rnd, options, pids)
                        if result.error_count:
                            raise load.BenchError(f"{target.name}: {dict(result.errors)}")
                        results.append(result)
    print(_report(results, options))
    return 0


def _report(results: list[load.RunResult], options: load.Options) -> str:
    lines = [
        "| target | body | rps (closed loop, each round) | CPU µs a request | x the trio floor "
        f"| added p50 / p99 ms at {options.rate:g} rps |",
        "|---|---|---|---|---|---|",
    ]
    by: dict[tuple[str, bool, str], list[load.RunResult]] = {}
    for r in results:
        by.setdefault((r.target, r.streaming, r.mode), []).append(r)

    def cpu(name: str, streaming: bool) -> float:
        runs = by.get((name, streaming, "closed"), [])
        return statistics.median(r.cpu[name] / r.ok * 1e6 for r in runs) if runs else 0.0

    def latency(name: str, streaming: bool) -> list[float]:
        runs = by[(name, streaming, "open")]
        return sorted(x for r in runs for x in r.latencies)

    for (name, streaming, mode), runs in by.items():
        if mode != "closed":
            continue
        rps = " / ".join(f"{r.rps:,.0f}" for r in runs)
        if name == "upstream alone":
            lines.append(f"| {name} | {load.stream_label(streaming)} | {rps} | | | |")
            continue
        mine = cpu(name, streaming)
        floor = cpu("trio floor", streaming)
        ratio = f"{mine / floor:.2f}" if floor else "-"
        alone, through = latency("upstream alone", streaming), latency(name, streaming)
        added = " / ".join(load.ms(load.pct(through, q) - load.pct(alone, q)) for q in (0.5, 0.99))
        lines.append(
            f"| {name} | {load.stream_label(streaming)} | {rps} | {mine:.0f} | {ratio} | {added} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    load.run_main(main)
