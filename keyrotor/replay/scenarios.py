"""Built-in synthetic scenarios: seeded traces with the upstream that goes with them.

Each scenario is a function ``(keys, requests, seed) -> Scenario``: a trace
(header with the pool's keys, and requests with Poisson arrivals, token
counts and, for some, sessions or batch groups), an :class:`UpstreamModel`
(limits, balances, latencies, failure windows) and the ``PoolConfig``
options to replay with. Same arguments, same scenario, on every machine.

``SCENARIOS`` maps names to builders; :func:`build` builds one by name.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import attrs

from .trace import Trace, TraceHeader, TraceRecord
from .upstream import FailureWindow, KeyModel, UpstreamModel

__all__ = ["SCENARIOS", "Scenario", "build", "describe"]

PRICES = {"prompt": 0.000001, "completion": 0.000002}
LATENCY = {"kind": "lognormal", "median": 0.4, "sigma": 0.4, "max": 5.0}
ERROR_LATENCY = {"kind": "fixed", "value": 0.05}


@attrs.define(kw_only=True)
class Scenario:
    """A named synthetic workload: trace, simulated upstream and pool options."""

    name: str
    description: str
    trace: Trace
    model: UpstreamModel
    options: dict[str, Any] = attrs.field(factory=dict)


Builder = Callable[[int | None, int | None, int], Scenario]


def _keys(n: int, **fields: Any) -> list[dict[str, Any]]:
    return [{"key_id": f"key-{i}", **fields} for i in range(n)]


def _model(**fields: Any) -> UpstreamModel:
    base: dict[str, Any] = {
        "latency": LATENCY,
        "error_latency": ERROR_LATENCY,
        "prices": PRICES,
        "stream_rate": 50.0,
    }
    base.update(fields)
    return UpstreamModel.from_json(base)


def _poisson(
    rng: random.Random,
    count: int,
    rate: Callable[[float], float] | float,
    *,
    stream: float = 0.0,
    prompt: tuple[int, int] = (50, 2000),
    completion: tuple[int, int] = (20, 600),
    sessions: int = 0,
) -> list[TraceRecord]:
    """``count`` requests with Poisson arrivals at ``rate`` per second (or ``rate(t)``)."""
    records = []
    t = 0.0
    rate_at = rate if callable(rate) else None
    fixed = float(rate) if not callable(rate) else 0.0
    for i in range(count):
        t += rng.expovariate(rate_at(t) if rate_at is not None else fixed)
        records.append(
            TraceRecord(
                t=round(t, 6),
                model="synthetic/model",
                stream=rng.random() < stream,
                prompt_tokens=rng.randint(*prompt),
                completion_tokens=rng.randint(*completion),
                session=f"s{rng.randrange(sessions)}" if sessions else None,
            )
        )
        del i
    return records


def _scenario(
    name: str,
    description: str,
    keys: list[dict[str, Any]],
    records: list[TraceRecord],
    model: UpstreamModel,
    **options: Any,
) -> Scenario:
    header = TraceHeader(source="synthetic", keys=keys, scenario=name, options=options)
    return Scenario(
        name=name,
        description=description,
        trace=Trace(header, records),
        model=model,
        options=options,
    )


def steady(keys: int | None, requests: int | None, seed: int) -> Scenario:
    n = keys or 4
    rng = random.Random(seed)
    records = _poisson(rng, requests or 20_000, 2.5 * n, sessions=64)
    return _scenario(
        "steady",
        "Poisson arrivals at 2.5 requests/s per key, healthy keys, lognormal latency",
        _keys(n),
        records,
        _model(),
    )


def burst(keys: int | None, requests: int | None, seed: int) -> Scenario:
    n = keys or 4
    rng = random.Random(seed)

    def rate(t: float) -> float:
        return (10.0 if t % 60.0 < 3.0 else 0.5) * n

    records = _poisson(rng, requests or 20_000, rate)
    return _scenario(
        "burst",
        "0.5 requests/s per key with 3 s bursts of 10/s per key every minute; "
        "the upstream allows 60 requests/min per key (unknown to the pool)",
        _keys(n),
        records,
        _model(default={"rpm": 60}),
    )


def failing_key(keys: int | None, requests: int | None, seed: int) -> Scenario:
    n = max(keys or 4, 3)
    count = requests or 20_000
    rng = random.Random(seed)
    rate = 2.5 * n
    records = _poisson(rng, count, rate)
    end = records[-1].t
    failures = [
        FailureWindow(key="key-1", start=0.4 * end, status=401),
        FailureWindow(key="key-2", start=0.2 * end, end=0.3 * end, status=503),
    ]
    model = _model()
    model.failures = failures
    return _scenario(
        "failing_key",
        "key-1 is revoked (401) from 40 % of the run; key-2 answers 503 from 20 % to 30 %",
        _keys(n),
        records,
        model,
    )


def rate_limited(keys: int | None, requests: int | None, seed: int) -> Scenario:
    n = keys or 4
    rng = random.Random(seed)
    records = _poisson(rng, requests or 20_000, 0.85 * n)  # 51/min per key
    return _scenario(
        "rate_limited",
        "each key allows 60 requests/min upstream (the pool does not know); "
        "load is 85 % of the total, so keys hit the limit in random peaks",
        _keys(n),
        records,
        _model(default={"rpm": 60}),
    )


def pacing(keys: int | None, requests: int | None, seed: int) -> Scenario:
    n = keys or 4
    rng = random.Random(seed)
    records = _poisson(rng, requests or 20_000, 0.85 * n)
    return _scenario(
        "pacing",
        "as rate_limited, but the pool knows each key's 60 requests/min (KeySpec.rpm): "
        "it paces instead of drawing 429s",
        _keys(n, rpm=60),
        records,
        _model(default={"rpm": 60}),
        queue_timeout=60.0,
    )


def account_limits(keys: int | None, requests: int | None, seed: int) -> Scenario:
    n = max(keys or 4, 2)
    rng = random.Random(seed)
    accounts = {f"acct-{a}": {"rpm": 30.0 * n / 2} for a in range(2)}
    model = _model(accounts=accounts)
    model.keys = {f"key-{i}": KeyModel(account=f"acct-{i % 2}") for i in range(n)}
    records = _poisson(rng, requests or 20_000, 0.4 * n)
    keyspecs = [{"key_id": f"key-{i}", "account": f"acct-{i % 2}"} for i in range(n)]
    return _scenario(
        "account_limits",
        "keys in two accounts, each account allowing 30 requests/min per key it holds "
        "(free-model style, account-wide 429s); load 24 requests/min per key",
        keyspecs,
        records,
        model,
    )


def credits_run_out(keys: int | None, requests: int | None, seed: int) -> Scenario:
    n = keys or 4
    count = requests or 20_000
    rng = random.Random(seed)
    records = _poisson(rng, count, 2.5 * n)
    mean_cost = 1025 * PRICES["prompt"] + 310 * PRICES["completion"]
    total = count * mean_cost
    model = _model()
    # key i can pay for about (i + 1) / (n + 1) of a fair share of the run: they run out in turn
    model.keys = {
        f"key-{i}": KeyModel(credits=round(total / n * (i + 1) / (n + 1) * 1.6, 6))
        for i in range(n)
    }
    model.keys[f"key-{n - 1}"] = KeyModel(credits=None)
    return _scenario(
        "credits_run_out",
        "each key's balance runs out one after another (402), the last key has no limit",
        _keys(n),
        records,
        model,
        recheck_interval=120.0,
    )


def long_streams(keys: int | None, requests: int | None, seed: int) -> Scenario:
    n = keys or 4
    rng = random.Random(seed)
    records = _poisson(rng, requests or 5_000, 0.25 * n, stream=1.0, completion=(500, 4000))
    return _scenario(
        "long_streams",
        "streamed answers of 500-4,000 tokens at 50 tokens/s (10-80 s each), "
        "at most 16 streams per key",
        _keys(n, max_in_flight=16),
        records,
        _model(),
        queue_timeout=120.0,
    )


def thousands_of_keys(keys: int | None, requests: int | None, seed: int) -> Scenario:
    n = keys or 10_000
    rng = random.Random(seed)
    records = _poisson(rng, requests or 50_000, 0.1 * n)
    end = records[-1].t if records else 1.0
    failures = [FailureWindow(key=f"key-{i}", start=0.0, status=401) for i in range(0, n, 100)] + [
        FailureWindow(key=f"key-{i}", start=0.3 * end, end=0.5 * end, status=429)
        for i in range(50, n, 100)
    ]
    model = _model()
    model.failures = failures
    return _scenario(
        "thousands_of_keys",
        "10,000 keys (by default): 1 % revoked from the start, another 1 % rate limited "
        "from 30 % to 50 % of the run",
        _keys(n),
        records,
        model,
    )


def seed001(keys: int | None, requests: int | None, seed: int) -> Scenario:
    n = 7
    batches = (requests or 210) // 7
    rng = random.Random(seed)
    records = []
    for b in range(batches):
        t = 2.0 * b
        for op in range(7):
            records.append(
                TraceRecord(
                    t=round(t + op * 0.001, 6),
                    model="synthetic/model",
                    prompt_tokens=rng.randint(50, 500),
                    completion_tokens=rng.randint(20, 200),
                    group=f"batch-{b}",
                )
            )
    model = _model(latency={"kind": "fixed", "value": 0.5})
    model.failures = [
        FailureWindow(key="key-4", start=0.0, end=10.0, status=429, retry_after=0.0),
        FailureWindow(key="key-5", start=0.0, end=20.0, status=401),
        FailureWindow(key="key-6", start=0.0, end=20.0, status=401),
    ]
    del keys
    return _scenario(
        "seed001",
        "seed 001: batches of 7 parallel operations over 7 keys, of which 4, then 5, then 7 "
        "are usable: key-4 rate limited until t=10 s (no Retry-After), key-5 and key-6 revoked "
        "until t=20 s; "
        "they recover in batch probes (min_healthy=7)",
        _keys(n),
        records,
        model,
        min_healthy=7,
        probe_interval=5.0,
        recheck_interval=5.0,
    )


SCENARIOS: dict[str, Builder] = {
    "steady": steady,
    "burst": burst,
    "failing_key": failing_key,
    "rate_limited": rate_limited,
    "pacing": pacing,
    "account_limits": account_limits,
    "credits_run_out": credits_run_out,
    "long_streams": long_streams,
    "thousands_of_keys": thousands_of_keys,
    "seed001": seed001,
}
"""Every built-in scenario by name."""


def build(
    name: str, *, keys: int | None = None, requests: int | None = None, seed: int = 0
) -> Scenario:
    """Build the scenario ``name`` (``keys`` and ``requests`` override its defaults)."""
    try:
        builder = SCENARIOS[name]
    except KeyError:
        raise ValueError(
            f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}"
        ) from None
    if keys is not None and keys < 1:
        raise ValueError("keys must be at least 1")
    if requests is not None and requests < 1:
        raise ValueError("requests must be at least 1")
    return builder(keys, requests, seed)


def describe() -> list[tuple[str, str]]:
    """(name, description) of every scenario, built small to read the description."""
    return [(name, build(name, keys=None, requests=7).description) for name in SCENARIOS]
