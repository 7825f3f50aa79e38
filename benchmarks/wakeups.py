"""What one wake-up costs this machine: the yardstick for a stream's chunks.

A trio task waits on a socket that another task writes 100 bytes to every
``--gap`` seconds, and does about 10 µs of Python work a message, as a proxy
forwarding a stream chunk by chunk does; the figure is the process's CPU per
message (user and system, from ``os.times``). With no gap the messages come
back to back and a wake-up serves several; with a gap every message is a
wake-up of an idle process, which on a virtual machine costs far more than the
work itself (``sse_chunks`` measures the proxy's CPU a chunk the same way).

Run:

    python -m benchmarks.wakeups --messages 400 --gaps 0 0.001 0.005
"""

from __future__ import annotations

import argparse
import os

import trio


def work(n: int = 300) -> int:
    """About 10 µs of Python work (a chunk's parsing and framing)."""
    total = 0
    for i in range(n):
        total += i * i
    return total


async def measure(gap: float, messages: int) -> tuple[float, float]:
    """(user, system) CPU seconds a message."""
    ours, theirs = trio.socket.socketpair()

    async def writer() -> None:
        for _ in range(messages):
            await trio.sleep(gap)
            await theirs.send(b"x" * 100)
        theirs.close()

    before = os.times()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        while await ours.recv(65536):
            work()
    after = os.times()
    ours.close()
    return (after.user - before.user) / messages, (after.system - before.system) / messages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--gaps", type=float, nargs="+", default=[0.0, 0.001, 0.005])
    args = parser.parse_args()
    if args.messages < 1 or any(gap < 0 for gap in args.gaps):
        parser.error("--messages must be at least 1 and --gaps at least 0")
    print("| gap between messages | CPU a message, µs | user | system |")
    print("|---|---:|---:|---:|")
    for gap in args.gaps:
        user, system = trio.run(measure, gap, args.messages)
        print(f"| {gap * 1000:g} ms | {(user + system) * 1e6:.0f} | {user * 1e6:.0f} | "
              f"{system * 1e6:.0f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
