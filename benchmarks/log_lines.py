"""The access log's cost per line: written at once, or in batches (``LineLog``).

Logs ``--lines`` access-log records (the proxy's usual fields) from a trio task
that yields to the scheduler every 8 records, as a busy server does between
requests, to three kinds of stderr: a file, a pipe read by another process
(``cat``, as journald or a container runtime reads a service's stderr), and
``/dev/null``; three ways: ``printed`` (how the proxy logged up to e98e8c3:
``json.dumps`` and a flushed ``print`` per record), ``LineLog`` outside
``batched`` (each line written at once) and inside it (how ``keyrotor serve``
logs). Prints this process's CPU per line (the reader's is not counted),
median of ``--rounds`` alternating runs. Run:

    python -m benchmarks.log_lines [--lines 50000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import trio

from keyrotor.adapters.proxy.logs import LineLog

MODES = ("printed", "LineLog at once", "LineLog batched")
RECORD = {
    "request_id": "a1b2c3f00d",
    "method": "POST",
    "path": "/v1/chat/completions",
    "status": 200,
    "duration_ms": 1.234,
    "bytes_out": 412,
    "client": "127.0.0.1:50312",
    "key": "key-2",
    "attempts": 1,
    "model": "openai/gpt-4o-mini",
    "cost_usd": 0.000123,
}


def printed(stream: TextIO) -> Callable[[dict[str, Any]], None]:
    """How the proxy logged up to commit e98e8c3: a dict with "ts", json.dumps, a
    flushed print per record."""

    def log(record: dict[str, Any]) -> None:
        record = {"ts": round(time.time(), 3), **record}
        print(json.dumps(record, default=str, separators=(",", ":")), file=stream, flush=True)

    return log


def cpu_per_line(stream: TextIO, lines: int, mode: str) -> float:
    """µs of this process's CPU per line logged to ``stream`` in ``mode``."""
    log = printed(stream) if mode == MODES[0] else LineLog(stream)
    batched = mode == MODES[2]

    async def emit() -> None:
        for i in range(lines):
            log(RECORD)
            if i % 8 == 7:
                await trio.lowlevel.checkpoint()

    async def main() -> None:
        if batched:
            assert isinstance(log, LineLog)
            with log.batched():
                await emit()
        else:
            await emit()

    start = time.process_time()
    trio.run(main)
    return (time.process_time() - start) / lines * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.lines < 1 or args.rounds < 1:
        parser.error("--lines and --rounds must be at least 1")
    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        reader = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        assert reader.stdin is not None
        pipe = os.fdopen(reader.stdin.fileno(), "w", closefd=False)
        with open(Path(folder) / "log", "w") as file, open(os.devnull, "w") as null:
            sinks = {"file": file, "pipe (cat)": pipe, "/dev/null": null}
            for _ in range(args.rounds):
                for name, sink in sinks.items():
                    for mode in MODES:
                        figure = cpu_per_line(sink, args.lines, mode)
                        results.setdefault((name, mode), []).append(figure)
                file.truncate(0)
        reader.stdin.close()
        reader.wait()
    print(f"{args.lines:,} lines, median of {args.rounds} rounds, µs of CPU per line\n")
    print("| stderr | " + " | ".join(MODES) + " | batched / printed |")
    print("|---|" + "---:|" * (len(MODES) + 1))
    for name in ("file", "pipe (cat)", "/dev/null"):
        figures = [statistics.median(results[(name, mode)]) for mode in MODES]
        cells = " | ".join(f"{figure:.2f}" for figure in figures)
        print(f"| {name} | {cells} | {figures[2] / figures[0]:.2f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
