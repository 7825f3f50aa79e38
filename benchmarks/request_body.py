"""What reading a request body costs the proxy, by body size, against parsing it whole.

Coding agents send the conversation so far: tens or hundreds of KB a request.
The proxy asks a few things of each body; this times each way it asks them,
in one process, beside ``json.loads`` of the same body (the yardstick: what
reading the body whole costs). The bodies are ``proxy_load``'s (``--prompt-kb``:
earlier turns of prose and code, the messages before the model as the openai
SDK writes them).

- ``wants_stream``, ``model_of``: every request (the first-byte deadline, the model's counters);
- ``price hook``: an answer whose ``usage`` reports no cost (OpenAI and most
  OpenAI-compatible providers), as the proxy prices it (``top_model``) and by
  parsing the body (``pricer(catalog)`` without ``model_of``);
- ``json_body.parse``, ``need_of`` and ``_model_span``: a request naming a route
  (parsed whole: its route is ranked on the whole prompt).

Run:

    python -m benchmarks.request_body --rounds 7
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import timeit
from collections.abc import Callable

from benchmarks.proxy_load import chat_body
from keyrotor.adapters.proxy.model_health import model_of
from keyrotor.adapters.proxy.providers import top_model
from keyrotor.adapters.proxy.router import _model_span
from keyrotor.models import parse_catalog, pricer
from keyrotor.models.routing import need_of
from keyrotor.testing.catalogs import realistic_models
from keyrotor.transports._http import wants_stream
from keyrotor.transports.json_body import parse

SIZES = (0, 16, 64, 256)
USAGE = {"prompt_tokens": 1000, "completion_tokens": 100}


def per_call(call: Callable[[], object], rounds: int, budget: float = 0.02) -> float:
    """Median µs a call over ``rounds`` rounds of about ``budget`` seconds each."""
    number = max(1, int(budget / max(timeit.timeit(call, number=3) / 3, 1e-7)))
    return statistics.median(timeit.repeat(call, number=number, repeat=rounds)) / number * 1e6


def cases_for(body: bytes, stream: bytes, model: str) -> dict[str, Callable[[], object]]:
    data = json.loads(body)
    return {
        "json.loads (yardstick)": lambda: json.loads(body),
        "json_body.parse (msgspec with the fast extra)": lambda: parse(body),
        "wants_stream, a stream": lambda: wants_stream(stream),
        "wants_stream, not one": lambda: wants_stream(body),
        "model_of": lambda: model_of(body),
        "route: need_of (after the parse)": lambda: need_of(data),
        "route: _model_span": lambda: _model_span(body, model),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    catalog = parse_catalog({"data": [m.to_json() for m in realistic_models()]})
    plain = next(m for m in catalog.models if m.pricing.prompt and not m.pricing.image)
    parsing, proxys = pricer(catalog), pricer(catalog, top_model)
    rows = []
    for kb in SIZES:
        body = chat_body(stream=False, model=plain.id, prompt_kb=kb)
        cases = cases_for(body, chat_body(stream=True, model=plain.id, prompt_kb=kb), plain.id)
        cases["price hook, parsing"] = functools.partial(parsing, body, USAGE)
        cases["price hook, the proxy's (top_model)"] = functools.partial(proxys, body, USAGE)
        figures = {name: per_call(call, args.rounds) for name, call in cases.items()}
        rows.append((kb, len(body), figures))
    names = list(rows[0][2])
    print(f"median µs a call, {args.rounds} rounds; bodies in the SDK's order, model last\n")
    print("| case | " + " | ".join(f"{kb} KB ({size:,} B)" for kb, size, _ in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{figures[name]:.1f}" for _, _, figures in rows) + " |")


if __name__ == "__main__":
    main()
