"""A routing decision on the realistic catalog, against building one small frozen attrs value.

Measured side by side in one run (issue 14's target: a decision with a
300-model catalog and a 10-candidate route in at most 20 times the cost of
building one small frozen attrs value):

- **attrs value**: ``Need(prompt_tokens=..., max_tokens=...)``, the reference;
- **10 ids**: ``decide`` over a route of 10 model ids (looked up, fitted, ranked);
- **free route**: the built-in ``free`` route, a filter over all 320 models
  (scanned every call, and with its candidates kept per catalog, as the proxy does);
- **need_of**: reading a small chat request's needs (estimate, parameters).

Run:

    python -m benchmarks.routing --rounds 7
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable

from benchmarks._harness import median_time
from keyrotor.models import parse_catalog
from keyrotor.models.routing import (
    FREE_ROUTE,
    STRATEGIES,
    Need,
    Route,
    candidates,
    decide,
    need_of,
)
from keyrotor.testing.catalogs import realistic_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    catalog = parse_catalog({"data": [m.to_json() for m in realistic_models()]})
    ids = [m.id for m in catalog.models if m.pricing.known][:10]
    need = Need(prompt_tokens=2_000, max_tokens=500)
    latency = {model_id: 100.0 + i for i, model_id in enumerate(ids[:5])}
    request = {"model": "free", "messages": [{"role": "user", "content": "hi " * 50}]}
    cases: dict[str, Callable[[], object]] = {
        "attrs value (reference)": lambda: Need(prompt_tokens=2_000, max_tokens=500),
        "need_of(request)": lambda: need_of(request),
        **{
            f"10 ids, {strategy}": functools.partial(
                decide, Route("r", ids, strategy), catalog, need, latency
            )
            for strategy in STRATEGIES
        },
        "free route (320 models filtered), fastest": lambda: decide(FREE_ROUTE, catalog, need),
        "free route, candidates kept (the proxy's path)": functools.partial(
            decide, FREE_ROUTE, catalog, need, found=candidates(FREE_ROUTE, catalog)
        ),
    }
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, call in cases.items():  # side by side, every round
            results[name].append(median_time(call, args.calls))
    reference = statistics.median(results["attrs value (reference)"])
    print(f"rounds {args.rounds}, {args.calls} calls each; medians")
    print("| case | median µs | x attrs value |")
    print("|---|---:|---:|")
    for name, times in results.items():
        t = statistics.median(times)
        print(f"| {name} | {t * 1e6:.2f} | {t / reference:.1f} |")


if __name__ == "__main__":
    main()
