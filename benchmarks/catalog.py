"""Importing a model catalog and answering /v1/models, against json.loads.

Measured side by side in one run, on the fake upstream's realistic catalog
(``keyrotor.testing.catalogs.realistic_models()``, 320 models, as the bytes a
``GET /models`` brings):

- **json.loads**: decoding the document alone (the floor of any import);
- **import**: ``parse_catalog`` (decode, validate every field, index by id);
- **encode**: a new catalog's ``/v1/models`` body built and encoded, once per
  catalog (the proxy does it when a refresh brings one, in the background);
- **answer**: every later ``GET /v1/models`` through ``ProxyApp`` (served
  from the encoded bytes; no upstream call), and ``GET /v1/models/{id}``.

Run:

    python -m benchmarks.catalog --rounds 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import trio

from benchmarks._harness import median_time
from keyrotor.adapters.proxy.app import ProxyApp
from keyrotor.adapters.proxy.catalog import Catalogs, CatalogService
from keyrotor.adapters.proxy.types import Request
from keyrotor.models import parse_catalog
from keyrotor.testing.catalogs import realistic_models
from keyrotor.transports.api import AsyncClient


async def answers(document: bytes, n: int) -> tuple[float, float, float]:
    """(encoding a new catalog's answers, /v1/models, /v1/models/{id}) median seconds."""
    async with AsyncClient({"k": "sk-or-v1-bench-catalog-0000"}, "http://127.0.0.1:9") as client:
        service = CatalogService(client, refresh=3600)
        app = ProxyApp(client, catalog=Catalogs(service))
        listing = Request(method="GET", target="/v1/models", headers=[], body=b"")
        one = Request(method="GET", target="/v1/models/openai/gpt-4o-mini", headers=[], body=b"")
        firsts: list[float] = []
        laters: list[float] = []
        ones: list[float] = []
        for _ in range(n):
            catalog = service.catalog = parse_catalog(document)
            started = time.perf_counter()
            service.models_body(catalog)  # encodes: a new catalog
            firsts.append(time.perf_counter() - started)
            for times, request in ((laters, listing), (ones, one)):
                started = time.perf_counter()
                answer = await app(request)
                times.append(time.perf_counter() - started)
                assert answer.status == 200
        return statistics.median(firsts), statistics.median(laters), statistics.median(ones)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds (medians over them)")
    parser.add_argument("--per-round", type=int, default=50, help="timed calls per round")
    args = parser.parse_args()
    models = realistic_models()
    document = json.dumps({"data": [m.to_json() for m in models]}).encode()
    rows: dict[str, list[float]] = {
        "json.loads": [],
        "import": [],
        "encode": [],
        "answer": [],
        "one model": [],
    }
    for _ in range(args.rounds):
        rows["json.loads"].append(median_time(lambda: json.loads(document), args.per_round))
        rows["import"].append(median_time(lambda: parse_catalog(document), args.per_round))
        first, later, one = trio.run(answers, document, args.per_round)
        rows["encode"].append(first)
        rows["answer"].append(later)
        rows["one model"].append(one)
    floor = statistics.median(rows["json.loads"])
    print(f"{len(models)} models, {len(document):,} bytes; {args.rounds} rounds")
    print()
    print("| step | median ms | x json.loads |")
    print("|---|---:|---:|")
    for name, values in rows.items():
        value = statistics.median(values)
        print(f"| {name} | {value * 1e3:.3f} | {value / floor:.2f} |")


if __name__ == "__main__":
    main()
