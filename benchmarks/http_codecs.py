"""The HTTP/1.1 codecs side by side: µs per proxied request's worth of HTTP.

One "request" is what the proxy does with HTTP for a non-streaming call: as a
server, parse a client's POST (head and JSON body) and frame a response with a
body; as a client, frame the upstream request and parse the upstream's
response. Both codecs through the interface the server and the pool use
(``keyrotor/transports/codec.py``), rounds alternating, the median kept. Run:

    python -m benchmarks.http_codecs --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from keyrotor.transports import _codec_h11, _codec_httptools
from keyrotor.transports.codec import END, NEED_DATA

BODY = b'{"model":"openai/gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    b"Accept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\nAccept: application/json\r\n"
    b"Content-Type: application/json\r\nAuthorization: Bearer sk-placeholder-token\r\n"
    b"User-Agent: OpenAI/Python 1.40.0\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)
ANSWER = b'{"id":"x","choices":[{"message":{"content":"hello"}}],"usage":{"total_tokens":9}}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ndate: Sun, 06 Dec 2026 03:00:00 GMT\r\n"
    b"x-ratelimit-remaining: 99\r\ncontent-length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)
)
OUT_HEADERS = [
    (b"content-type", b"application/json"),
    (b"x-keyrotor-key", b"k1"),
    (b"x-keyrotor-attempts", b"1"),
    (b"content-length", b"%d" % len(ANSWER)),
    (b"date", b"Sun, 06 Dec 2026 03:00:00 GMT"),
    (b"x-request-id", b"a1b2c3d4"),
]
UP_HEADERS = [
    (b"host", b"openrouter.ai"),
    (b"authorization", b"Bearer sk-placeholder-key"),
    (b"content-type", b"application/json"),
    (b"accept", b"application/json"),
    (b"content-length", b"%d" % len(BODY)),
]


def drain(codec: Any) -> None:
    while (event := codec.next_event()) is not END:
        assert event is not NEED_DATA


def server_side(module: Any, n: int) -> float:
    codec = module.ServerCodec(65536)
    start = time.perf_counter()
    for _ in range(n):
        codec.receive_data(REQUEST)
        drain(codec)
        codec.head(200, b"OK", list(OUT_HEADERS))
        codec.data(ANSWER)
        codec.end()
        codec.start_next_cycle()
    return (time.perf_counter() - start) / n * 1e6


def client_side(module: Any, n: int) -> float:
    codec = module.ClientCodec()
    start = time.perf_counter()
    for _ in range(n):
        codec.request(codec.prepare(b"POST", b"/api/v1/chat/completions", UP_HEADERS), BODY)
        codec.receive_data(RESPONSE)
        drain(codec)
        codec.start_next_cycle()
    return (time.perf_counter() - start) / n * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    figures: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name, module in (("h11", _codec_h11), ("httptools", _codec_httptools)):
            for side, run in (("server", server_side), ("client", client_side)):
                figures.setdefault((name, side), []).append(run(module, args.requests))
    print(f"median of {args.rounds} alternating rounds x {args.requests:,} requests\n")
    print("| codec | as server µs | as client µs | a proxied request µs |")
    print("|---|---:|---:|---:|")
    for name in ("h11", "httptools"):
        server = statistics.median(figures[(name, "server")])
        client = statistics.median(figures[(name, "client")])
        print(f"| {name} | {server:.1f} | {client:.1f} | {server + client:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
