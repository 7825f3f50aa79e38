"""The clients of two revisions side by side: did a change make a request slower?

Checks out ``--base`` (a git revision) into a temporary directory, imports its
package as ``keyrotor_base`` next to the working tree's ``keyrotor``, and sends
the same sequential keep-alive ``POST /chat/completions`` through both
revisions' clients (4 keys each) to one fake upstream in another process. The
two alternate round by round (base first in even rounds, last in odd ones), for
the asyncio, trio and blocking clients. Run:

    python -m benchmarks.client_revisions --base cd1f6cf --requests 1000 --rounds 15

The table shows each side's median of per-round medians and the median of the
per-round ratios (working tree / base), the figure to read on a noisy machine.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from benchmarks._harness import median_time
from benchmarks.transport_overhead import BODY, SECRETS, start_upstream

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 200


def import_base(revision: str, into: Path) -> Any:
    """``revision``'s ``keyrotor`` package, imported as ``keyrotor_base``."""
    tree = into / "tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree), revision],
        check=True,
        capture_output=True,
    )
    try:
        shutil.copytree(tree / "keyrotor", into / "keyrotor_base")
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True
        )
    sys.path.insert(0, str(into))
    return importlib.import_module("keyrotor_base")


async def atimed(call: Callable[[], Any], n: int) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


async def run_async(classes: dict[str, Any], url: str, n: int, rounds: int) -> dict[str, list]:
    results: dict[str, list[float]] = {side: [] for side in classes}
    async with classes["base"](SECRETS, url) as base, classes["tree"](SECRETS, url) as tree:
        clients = {"base": base, "tree": tree}

        def call(side: str) -> Callable[[], Any]:
            return lambda: clients[side].request("POST", "/chat/completions", content=BODY)

        for side in clients:
            await atimed(call(side), WARMUP)
        for index in range(rounds):
            for side in ("base", "tree") if index % 2 == 0 else ("tree", "base"):
                results[side].append(await atimed(call(side), n))
    return results


def run_sync(classes: dict[str, Any], url: str, n: int, rounds: int) -> dict[str, list]:
    results: dict[str, list[float]] = {side: [] for side in classes}
    with classes["base"](SECRETS, url) as base, classes["tree"](SECRETS, url) as tree:
        clients = {"base": base, "tree": tree}

        def call(side: str) -> Callable[[], Any]:
            return lambda: clients[side].request("POST", "/chat/completions", content=BODY)

        for side in clients:
            median_time(call(side), WARMUP)
        for index in range(rounds):
            for side in ("base", "tree") if index % 2 == 0 else ("tree", "base"):
                results[side].append(median_time(call(side), n))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the git revision to compare against")
    parser.add_argument("--requests", type=int, default=1000, help="requests per round and side")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="keyrotor-base-") as scratch:
        import_base(args.base, Path(scratch))
        from keyrotor.transports._async import AsyncClient
        from keyrotor.transports.sync import Client

        base_async = importlib.import_module("keyrotor_base.transports._async").AsyncClient
        base_sync = importlib.import_module("keyrotor_base.transports.sync").Client
        proc, url = start_upstream()
        try:
            rows = {
                backend: anyio.run(
                    run_async,
                    {"base": base_async, "tree": AsyncClient},
                    url,
                    args.requests,
                    args.rounds,
                    backend=backend,
                )
                for backend in ("asyncio", "trio")
            }
            rows["sync"] = run_sync(
                {"base": base_sync, "tree": Client}, url, args.requests, args.rounds
            )
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    print(f"{args.rounds} alternating rounds x {args.requests} sequential requests")
    print()
    print(f"| client | {args.base} p50 µs | working tree p50 µs | tree / base |")
    print("|---|---:|---:|---:|")
    for name, result in rows.items():
        pairs = zip(result["tree"], result["base"], strict=True)
        ratio = statistics.median(tree / base for tree, base in pairs)
        base, tree = statistics.median(result["base"]), statistics.median(result["tree"])
        print(f"| {name} | {base:.0f} | {tree:.0f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
