"""What the state file's records and flushes cost per request, with few keys and with many.

Each request records what the proxy records for an answer (its analytics row
with latencies spread as a model's are and a few errors,
its key's ledger, the usage by provider and model); a flush then writes the
batch, as the writer thread does every ``flush_interval``. With round robin
over N keys, a batch of B requests touches min(N, B) keys' rows. Reported:
µs of records per request (the request path's three store calls), µs of
flush per request, and the share of it in ``analytics.write`` (each
row read back, merged and written); then, once that minute is over, the time
the following flushes take to roll its min(N, requests) rows up into their
hour and day rows, and that time spread over a minute of requests at
``--rate``. Run:

    python -m benchmarks.state_flush --keys 4 10000 --batch 400
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from keyrotor.adapters import analytics
from keyrotor.adapters.storage import StateStore
from keyrotor.testing.clock import FakeClock

NAMES = {"provider": "main", "model": "openai/gpt-4o-mini"}
DIMS = ("main", "openai/gpt-4o-mini", "", "")  # an answer's analytics dimensions after its key


def run(keys: int, batch: int, batches: int) -> tuple[float, float, float, float]:
    """(µs of flush per request, share of it in analytics.write, ms to roll the minute
    up, µs of records per request)."""
    spent = {"analytics": 0.0, "records": 0.0}
    write = analytics.write

    def timed_write(*args: object, **kwargs: object) -> None:
        start = time.perf_counter()
        write(*args, **kwargs)  # type: ignore[arg-type]
        spent["analytics"] += time.perf_counter() - start

    with tempfile.TemporaryDirectory() as folder:
        now = time.time() // 60 * 60  # every answer in one minute
        clock = FakeClock(now)
        store = StateStore.open(
            Path(folder) / "state.db", secret_key=None, flush_interval=3600, wall_clock=clock
        )
        n = 0
        rng = random.Random(17)  # latencies spread as a model's are: 0.2 to 20 s, most near 1

        def record(count: int) -> None:
            """``count`` answers' records, as the request path makes them (timed)."""
            nonlocal n
            answers = []
            for _ in range(count):
                alias = f"k{n % keys}"
                n += 1
                ttfb = rng.lognormvariate(6.5, 0.8)  # ms
                status = 200 if rng.random() < 0.97 else rng.choice((429, 500, 502))
                total = ttfb + rng.lognormvariate(7.0, 0.9)
                answers.append((alias, (alias, *DIMS), status, ttfb, total))
            start = time.perf_counter()
            for alias, dims, status, ttfb, total in answers:
                store.record_answer(now, dims, status, 10, 20, 0.0001, ttfb, total)
                store.record_spend(alias, prompt_tokens=10, completion_tokens=20, cost=0.0001)
                store.record_usage(NAMES, prompt_tokens=10, completion_tokens=20, cost=0.0001)
            spent["records"] += time.perf_counter() - start

        for _ in range(max(1, min(keys, 20_000) // batch)):  # every key's rows exist
            record(batch)
            store.flush()
        analytics.write = timed_write  # type: ignore[assignment]
        spent["records"] = 0.0
        try:
            total = 0.0
            for _ in range(batches):
                record(batch)
                start = time.perf_counter()
                store.flush()
                total += time.perf_counter() - start
        finally:
            analytics.write = write  # type: ignore[assignment]
        clock.advance(60 + analytics.ROLL_AFTER)  # the minute is over
        rolling = 0.0
        with store._db_lock:
            conn = store._connection()
        while analytics.rolled(conn)[0] <= now:  # a flush rolls up ROLL_ROWS rows at a time
            store.record_spend("k0")
            start = time.perf_counter()
            store.flush()
            rolling += time.perf_counter() - start
        store.close()
    requests = batch * batches
    return (
        total / requests * 1e6,
        spent["analytics"] / total,
        rolling * 1e3,
        spent["records"] / requests * 1e6,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[4, 10_000])
    parser.add_argument("--batch", type=int, default=400, help="requests per flush (400)")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--rate", type=int, default=4000, help="requests/s (4000) the roll-up is over"
    )
    args = parser.parse_args()
    print(f"{args.batch} requests per flush, {args.batches} flushes, median of {args.rounds}\n")
    print(
        "| keys | records µs per request | flush µs per request | in analytics.write "
        f"| roll-up of the minute, ms | roll-up µs per request at {args.rate:,}/s "
        "| flush and roll-up µs per request |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for keys in args.keys:
        runs = [run(keys, args.batch, args.batches) for _ in range(args.rounds)]
        per = statistics.median(r[0] for r in runs)
        share = statistics.median(r[1] for r in runs)
        rolling = statistics.median(r[2] for r in runs)
        records = statistics.median(r[3] for r in runs)
        spread = rolling * 1e3 / (60 * args.rate)
        print(
            f"| {keys:,} | {records:.1f} | {per:.1f} | {share:.0%} | {rolling:.0f} "
            f"| {spread:.2f} | {per + spread:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
