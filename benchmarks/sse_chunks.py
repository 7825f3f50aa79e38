"""How long the proxy holds each SSE chunk: the time from the upstream writing a
chunk to the client reading it, through ``keyrotor serve`` and direct.

A tiny upstream (this module run with ``--upstream``: a trio + h11 server on
loopback, in its own process) answers ``POST /chat/completions`` with a stream of
``--chunks`` chunks, ``--gap`` seconds apart, each ``data:`` line carrying the
``time.time()`` at which it was written, then a usage chunk and ``[DONE]``. The
client (this process, trio + h11) reads each chunk as it arrives and notes
``arrival - stamp``: direct from the upstream, and through the proxy, requests
alternating. The difference of the medians (and p99s) is what the proxy adds per
chunk; the proxy's memory before and after shows whether it grows with the stream.

Run:

    python -m benchmarks.sse_chunks --requests 40 --chunks 200 --gap 0.002

It also prints the proxy's CPU a stream and a chunk (user and system), beside
which ``benchmarks.wakeups`` measures what a bare wake-up costs the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import ExitStack

import h11
import trio

from benchmarks.proxy_load import (
    FAKE_KEYS,
    LOOPBACK,
    _child_env,
    child,
    cpu_times,
    memory,
    pct,
    start_keyrotor,
)

DELTA = {"delta": {"content": "x"}}


async def _serve_one(stream: trio.SocketStream, chunks: int, gap: float) -> None:
    conn = h11.Connection(h11.SERVER)
    async with stream:
        while True:
            event = conn.next_event()
            while event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(bytes(data))
                event = conn.next_event()
            if not isinstance(event, h11.Request):
                return
            while not isinstance(event, h11.EndOfMessage):
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
            head = h11.Response(
                status_code=200,
                headers=[("content-type", "text/event-stream"), ("transfer-encoding", "chunked")],
            )
            await stream.send_all(conn.send(head) or b"")
            for i in range(chunks):
                line = json.dumps(
                    {"i": i, "t": time.time(), "choices": [{"delta": {"content": "x"}}]}
                )
                await stream.send_all(conn.send(h11.Data(data=f"data: {line}\n\n".encode())) or b"")
                await trio.sleep(gap)
            usage = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": chunks}}
            tail = f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode()
            await stream.send_all(conn.send(h11.Data(data=tail)) or b"")
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
            conn.start_next_cycle()


async def upstream_main(chunks: int, gap: float) -> None:
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    port = listeners[0].socket.getsockname()[1]
    print(f"http://{LOOPBACK}:{port}/api/v1", flush=True)

    async def serve_one(stream: trio.SocketStream) -> None:
        await _serve_one(stream, chunks, gap)

    await trio.serve_listeners(serve_one, listeners)


async def one_stream(port: int, path: str, delays: list[float]) -> None:
    """One streamed request; each chunk's arrival minus its stamp goes to ``delays``."""
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    conn = h11.Connection(h11.CLIENT)
    body = json.dumps({"model": "openai/gpt-4o-mini", "stream": True, "messages": []}).encode()
    headers = [
        ("host", LOOPBACK),
        ("content-type", "application/json"),
        ("authorization", f"Bearer {FAKE_KEYS[0]}"),
        ("content-length", str(len(body))),
    ]
    async with stream:
        await stream.send_all(conn.send(h11.Request(method="POST", target=path, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        pending = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            if isinstance(event, h11.Data):
                now = time.time()
                pending += bytes(event.data)
                *lines, pending = pending.split(b"\n\n")
                for line in lines:
                    if line.startswith(b'data: {"i"'):
                        delays.append(now - json.loads(line[6:])["t"])
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return


async def streams(count: int, port: int, path: str, delays: list[float]) -> None:
    """``count`` streamed requests at once."""
    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one_stream, port, path, delays)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--gap", type=float, default=0.002)
    parser.add_argument(
        "--concurrent", type=int, default=1, metavar="N", help="N streams at once each way (1)"
    )
    parser.add_argument("--upstream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.requests, args.chunks, args.concurrent) < 1 or args.gap < 0:
        parser.error("--requests, --chunks and --concurrent must be at least 1, --gap at least 0")
    if args.upstream:
        trio.run(upstream_main, args.chunks, args.gap)
        return 0
    with ExitStack() as stack:
        cmd = [sys.executable, "-m", "benchmarks.sse_chunks", "--upstream",
               "--chunks", str(args.chunks), "--gap", str(args.gap)]  # fmt: skip
        up = stack.enter_context(child("stamping upstream", cmd, _child_env({}), stdout=True))
        assert up.proc.stdout is not None
        url = up.proc.stdout.readline().decode().strip()
        upstream_port = int(url.rsplit(":", 1)[1].split("/")[0])
        proxy, endpoint = start_keyrotor(stack, url, False)
        direct: list[float] = []
        through: list[float] = []
        rss_before = memory(proxy.pid)[0]
        user = system = 0.0  # the proxy's CPU while streams go through it
        for _ in range(args.requests):
            trio.run(streams, args.concurrent, upstream_port, "/api/v1/chat/completions", direct)
            before = cpu_times(proxy.pid)
            trio.run(streams, args.concurrent, endpoint.port, "/v1/chat/completions", through)
            after = cpu_times(proxy.pid)
            user, system = user + after[0] - before[0], system + after[1] - before[1]
        rss_after, rss_peak = memory(proxy.pid)

    def q(values: list[float], p: float) -> float:
        return pct(sorted(values), p) * 1e6

    print(f"{args.requests} rounds of {args.concurrent} stream(s) at once each way, {args.chunks} "
          f"chunks {args.gap * 1000:g} ms apart")  # fmt: skip
    print("| path | chunks | p50 µs | p90 µs | p99 µs |")
    print("|---|---:|---:|---:|---:|")
    for name, values in (("direct", direct), ("through keyrotor", through)):
        print(f"| {name} | {len(values)} | {q(values, 0.5):.0f} | {q(values, 0.9):.0f} | "
              f"{q(values, 0.99):.0f} |")  # fmt: skip
    added = statistics.median(through) - statistics.median(direct)
    print(f"\nadded per chunk: p50 {added * 1e6:+.0f} µs, p99 "
          f"{q(through, 0.99) - q(direct, 0.99):+.0f} µs; proxy RSS {rss_before / 2**20:.1f} -> "
          f"{rss_after / 2**20:.1f} MB over {len(through):,} chunks (at most "
          f"{rss_peak / 2**20:.1f})")  # fmt: skip
    chunks, count = len(through), args.requests * args.concurrent
    print(f"proxy CPU: {(user + system) / count * 1e3:.2f} ms a stream, "
          f"{(user + system) / chunks * 1e6:.1f} µs a chunk ({user / chunks * 1e6:.1f} user, "
          f"{system / chunks * 1e6:.1f} system)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
