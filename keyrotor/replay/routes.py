"""Replaying traffic through a route: strategies side by side on a simulated day.

``keyrotor replay TRACE --route free --strategy fastest,cheapest,ordered`` sends
every request of a trace (its arrival, prompt and completion tokens) through
the route with each strategy, over a model catalog (the fake upstream's 320
models by default), and reports per strategy: requests served (by a free or a
paid model), refused (no model could serve), the upstream's free-limit
answers (target 0: the free tier is paced per account), model fallbacks, the
cost in USD and the time to first byte.

The simulated upstream, per model: a time to first byte drawn once from the
model's id (100 ms to 2 s) plus 2 ms per completion token; a share of models
(``down``) that answer 503 all day, cooled as the proxy cools them (longer
for each failure in a row); OpenRouter's free limits enforced per account (20
a minute in clock minutes, ``per_day`` a UTC day), counting the requests a
model served; the pool gives back the slot of a request a model could not
serve, as the proxy does. A free request that finds no account with room is refused
at once here (the proxy waits up to ``free_wait`` for one). Everything is
deterministic: the same trace, catalog, route and seed give the same report.
The pure router (``keyrotor.models.routing``) and free tier
(``keyrotor.models.free_tier``) decide, as in the proxy; keys are not
simulated here (``keyrotor replay`` without ``--route`` does that).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from ..models import Catalog, parse_catalog
from ..models.cooling import ModelCooling
from ..models.free_tier import FREE_PER_DAY, FREE_PER_MINUTE, WINDOW, FreeTier
from ..models.routing import STRATEGIES, Need, Route, candidates, decide
from .trace import TraceRecord

__all__ = ["NO_PACING", "RouteRow", "day_of_free_traffic", "replay_route", "routes_text"]

NO_PACING = "no-pacing"
"""A pseudo-strategy, what plain key rotation does: ``fastest`` with free
requests sent on the accounts in turn, unpaced, an account's key resting after
a limit answer until that limit's reset (as the core cools a key on a 429 with
``X-RateLimit-Reset``); it shows what pacing saves."""
MODEL_COOLDOWN = 60.0
PER_TOKEN = 0.002  # seconds per completion token
DAY = 86400.0
MIDNIGHT = 1_767_225_600.0  # 2026-01-01 00:00 UTC: the simulated day's start


@attrs.define
class RouteRow:
    """One strategy's result."""

    strategy: str
    requests: int = 0
    served_free: int = 0
    served_paid: int = 0
    refused: int = 0
    limit_answers: int = 0
    fallbacks: int = 0
    cost: float = 0.0
    ttfb: list[float] = attrs.Factory(list)
    models: Counter[str] = attrs.Factory(Counter)

    def to_json(self) -> dict[str, Any]:
        ttfb = sorted(self.ttfb)
        return {
            "strategy": self.strategy,
            "requests": self.requests,
            "servedFree": self.served_free,
            "servedPaid": self.served_paid,
            "refused": self.refused,
            "limitAnswers": self.limit_answers,
            "fallbacks": self.fallbacks,
            "costUsd": round(self.cost, 6),
            "ttfbP50Ms": _ms(_pct(ttfb, 0.5)),
            "ttfbP95Ms": _ms(_pct(ttfb, 0.95)),
            "topModels": self.models.most_common(3),
        }


class _Upstream:
    """The simulated upstream's models: their speed, which are down, and the
    free limits per account (clock minutes and UTC days, as OpenRouter's)."""

    def __init__(self, catalog: Catalog, down: float, seed: int, per_day: dict[str, int]) -> None:
        rng = random.Random(seed)
        ids = [m.id for m in catalog.models]
        self.down = set(rng.sample(ids, round(down * len(ids))))
        self.per_day = per_day
        self.minute: dict[str, tuple[int, int]] = {}
        self.day: dict[str, tuple[int, int]] = {}

    @staticmethod
    def ttfb(model: str) -> float:
        digest = hashlib.sha256(model.encode()).digest()
        return 0.1 + 1.9 * int.from_bytes(digest[:4], "big") / 2**32

    def free_limit(self, account: str, now: float) -> float | None:
        """When the limit a free request of ``account`` meets now resets (None:
        no limit met, the request counts)."""
        minute, day = int(now // 60), int(now // DAY)
        m = self.minute.get(account, (minute, 0))
        d = self.day.get(account, (day, 0))
        m = m if m[0] == minute else (minute, 0)
        d = d if d[0] == day else (day, 0)
        if d[1] >= self.per_day[account]:
            return (day + 1) * DAY
        if m[1] >= FREE_PER_MINUTE:
            return (minute + 1) * 60.0
        self.minute[account], self.day[account] = (minute, m[1] + 1), (day, d[1] + 1)
        return None


def replay_route(
    records: Sequence[TraceRecord],
    route: Route,
    strategies: Iterable[str],
    *,
    catalog: Catalog | None = None,
    accounts: int = 5,
    per_day: int = FREE_PER_DAY,
    down: float = 0.05,
    max_attempts: int = 3,
    seed: int = 0,
) -> list[RouteRow]:
    """Each strategy's ``RouteRow`` for ``records`` sent through ``route``."""
    if catalog is None:
        from ..testing.catalogs import realistic_models

        catalog = parse_catalog({"data": [m.to_json() for m in realistic_models()]})
    names = [f"account-{i + 1}" for i in range(accounts)]
    rows = []
    for strategy in strategies:
        if strategy != NO_PACING and strategy not in STRATEGIES:
            raise ValueError(
                f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}, {NO_PACING}"
            )
        rows.append(
            _one(records, route, strategy, catalog, names, per_day, down, max_attempts, seed)
        )
    return rows


def _one(
    records: Sequence[TraceRecord],
    route: Route,
    strategy: str,
    catalog: Catalog,
    accounts: list[str],
    per_day: int,
    down: float,
    max_attempts: int,
    seed: int,
) -> RouteRow:
    paced = strategy != NO_PACING
    route = attrs.evolve(route, strategy="fastest" if not paced else strategy)
    upstream = _Upstream(catalog, down, seed, dict.fromkeys(accounts, per_day))
    tier = FreeTier(dict.fromkeys(accounts, per_day), FREE_PER_MINUTE, WINDOW)
    row = RouteRow(strategy)
    latency: dict[str, float] = {}
    cooling = ModelCooling(MODEL_COOLDOWN)
    turn = 0
    resting: dict[str, float] = {}  # unpaced: account -> until its limit resets
    found = candidates(route, catalog)
    for record in records:
        now = MIDNIGHT + record.t
        row.requests += 1
        need = Need(record.prompt_tokens, None)
        unavailable = cooling.skips(now) if cooling else None
        no_free = tier.skip(now) if paced else None
        decision = decide(
            route, catalog, need, latency, unavailable=unavailable, no_free=no_free, found=found
        )
        if decision.model is None:
            row.refused += 1
            continue
        attempts = 0
        served = False
        for model in [decision.model, *decision.fallbacks]:
            if attempts >= max_attempts:
                break
            info = catalog.get(model)
            free = info is not None and info.free
            account = None
            if free:
                if paced:
                    account = tier.take(now)
                    if account is None:
                        continue
                else:
                    awake = [a for a in accounts if resting.get(a, 0.0) <= now]
                    if not awake:
                        continue
                    account, turn = awake[turn % len(awake)], turn + 1
            attempts += 1
            if model in upstream.down:
                cooling.fail(model, now, "down")
                if paced and account is not None:
                    tier.give_back(account, now)
                row.fallbacks += 1
                continue
            reset = None if account is None else upstream.free_limit(account, now)
            if account is not None and reset is not None:
                resting[account] = reset
                row.limit_answers += 1
                row.fallbacks += 1
                continue
            cooling.ok(model)
            ttfb = upstream.ttfb(model)
            seen = latency.get(model)
            latency[model] = ttfb * 1000 if seen is None else seen + 0.2 * (ttfb * 1000 - seen)
            row.ttfb.append(ttfb)
            row.models[model] += 1
            if free:
                row.served_free += 1
            else:
                row.served_paid += 1
                if info is not None and info.pricing.known and not info.pricing.variable:
                    p = info.pricing
                    completion = record.completion_tokens
                    row.cost += record.prompt_tokens * p.prompt + completion * p.completion
                    row.cost += p.request
            served = True
            break
        if not served:
            row.refused += 1
    return row


def day_of_free_traffic(requests: int = 2000, seed: int = 0) -> list[TraceRecord]:
    """A day of chat traffic: arrivals following a day's curve (quiet at
    night, busy in the afternoon) with bursts, prompts of 100 to 50,000
    tokens (most short), answers of 50 to 1,500 tokens. Deterministic."""
    rng = random.Random(seed)
    times: list[float] = []
    while len(times) < requests:
        t = rng.uniform(0, DAY)
        hour = t / 3600
        busy = (
            0.15 + 0.85 * max(0.0, math.sin(math.pi * (hour - 6) / 14)) if 6 <= hour <= 20 else 0.15
        )
        if rng.random() < busy:
            times.append(t)
            if rng.random() < 0.02:  # a burst: an agent's loop
                times += [t + i * 0.5 for i in range(1, rng.randint(10, 40))]
    times = sorted(times)[:requests]
    return [
        TraceRecord(
            t=t,
            model="free",
            prompt_tokens=min(50_000, int(rng.lognormvariate(6.5, 1.3)) + 100),
            completion_tokens=rng.randint(50, 1500),
        )
        for t in times
    ]


def routes_text(rows: Sequence[RouteRow], route: Route, accounts: int, per_day: int) -> str:
    """The report as text: one line per strategy."""
    total = rows[0].requests if rows else 0
    lines = [
        f"route {route.name!r}: {total:,} requests; {accounts} accounts at {per_day} free "
        f"requests a day and {FREE_PER_MINUTE} a minute",
        "",
        f"{'strategy':<10} {'served':>7} {'free':>6} {'paid':>6} {'refused':>8} "
        f"{'limit 429s':>10} {'fallbacks':>9} {'cost USD':>10} {'ttfb p50':>9} {'p95':>7}",
    ]
    for row in rows:
        data = row.to_json()
        lines.append(
            f"{row.strategy:<10} {row.served_free + row.served_paid:>7,} {row.served_free:>6,} "
            f"{row.served_paid:>6,} {row.refused:>8,} {row.limit_answers:>10,} "
            f"{row.fallbacks:>9,} {row.cost:>10.4f} {_dash(data['ttfbP50Ms']):>7} ms "
            f"{_dash(data['ttfbP95Ms']):>4} ms"
        )
    return "\n".join(lines) + "\n"


def _dash(value: int | None) -> str:
    """A number of milliseconds, or ``-`` when there is none (as in the replay report)."""
    return "-" if value is None else str(value)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def _ms(seconds: float) -> int | None:
    return None if math.isnan(seconds) else round(seconds * 1000)
