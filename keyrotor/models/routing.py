"""Routes: a named virtual model and the pure choice of a model for a request.

A ``Route`` lists candidates (model ids, or ``Filter`` s over the catalog) and
a strategy. ``decide`` takes the route, a ``Catalog``, what the request needs
(``Need``: its estimated prompt, its completion ceiling, its parameters and
images) and the latencies observed per model, and returns a ``Decision``: the
model to send, the fallbacks in order, and one line per candidate left out.
Nothing here fetches, reads a clock or draws a random number: the same inputs
give the same decision (so replay can compare strategies).

Strategies: ``ordered`` (the route's order), ``cheapest`` (estimated cost at
the catalog's prices), ``fastest`` (observed time to first byte; a model never
observed goes first, once, so every candidate gets measured), ``balanced``
(``weight`` x normalised latency + (1 - ``weight``) x normalised cost).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from ..core.classify import Verdict, classify_response
from .catalog import Catalog, ModelInfo
from .cost import prompt_size

__all__ = [
    "EMPTY",
    "FREE_ROUTE",
    "MODEL_FAILURES",
    "ROUTE_NAME",
    "STRATEGIES",
    "TOO_LONG",
    "UNAVAILABLE",
    "UNFIT",
    "Decision",
    "Filter",
    "Need",
    "Route",
    "Skip",
    "candidates",
    "decide",
    "key_failure",
    "model_failure",
    "need_of",
    "ordered",
    "route_from_json",
    "route_to_json",
]

STRATEGIES = ("ordered", "cheapest", "fastest", "balanced")

COMPLETION_ALLOWANCE = 1024
"""Completion tokens a request without ``max_tokens`` is assumed to need."""


def _names(values: Iterable[str]) -> frozenset[str]:
    return frozenset(values)


def _candidate_tuple(values: Iterable[str | Filter]) -> tuple[str | Filter, ...]:
    return tuple(values)


@attrs.frozen
class Filter:
    """Catalog models that match every condition set (``max_price``: USD per
    million prompt + completion tokens)."""

    free: bool = False
    min_context: int | None = None
    max_price: float | None = None
    parameters: frozenset[str] = attrs.field(default=frozenset(), converter=_names)
    modalities: frozenset[str] = attrs.field(default=frozenset(), converter=_names)

    def rejects(self, model: ModelInfo) -> str | None:
        """Why ``model`` does not match (None: it does)."""
        if self.free and not model.free:
            return "not free"
        if self.min_context is not None and (model.context_length or 0) < self.min_context:
            return f"context {model.context_length or 0:,} < {self.min_context:,}"
        if self.max_price is not None:
            pricing = model.pricing
            if not pricing.known or pricing.variable:
                return "price unknown"
            # Rounded to a billionth of a dollar: $1.1 + $2.2 a million is
            # 3.3000000000000003 in floats, and a model at the limit matches.
            per_million = round(sum(pricing.per_million()), 9)
            if per_million > self.max_price:
                return f"${per_million:g}/M > ${self.max_price:g}/M"
        if not model.supports(self.parameters):
            return "lacks " + ", ".join(sorted(self.parameters - model.supported_parameters))
        missing = self.modalities - set(model.input_modalities)
        if missing:
            return "no " + ", ".join(sorted(missing)) + " input"
        return None


@attrs.frozen
class Route:
    """A named virtual model: its candidates in order and how to choose."""

    name: str
    candidates: tuple[str | Filter, ...] = attrs.field(converter=_candidate_tuple)
    strategy: str = attrs.field(default="ordered")
    weight: float = 0.5  # balanced: 0 = cheapest, 1 = fastest

    @strategy.validator
    def _known(self, _: Any, value: str) -> None:
        if value not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {value!r}")


FREE_ROUTE = Route("free", (Filter(free=True),), strategy="fastest")
"""Every free model of the catalog that fits the request, fastest first."""

ROUTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
"""A route's name: what requests put in ``model``; no ``/``, so that no model
id of a provider's catalog (``vendor/model``) can take it."""
_ROUTE_FIELDS = ("name", "candidates", "strategy", "weight")
_FILTER_FIELDS: dict[str, type | tuple[type, ...]] = {
    "free": bool,
    "min_context": int,
    "max_price": (int, float),
    "parameters": list,
    "modalities": list,
}


def route_from_json(data: Any) -> Route:
    """A route from its JSON (or TOML) form, ``{"name", "candidates",
    "strategy", "weight"}``; a candidate is a model id or a filter table
    (``free``, ``min_context``, ``max_price``, ``parameters``,
    ``modalities``). Raises ``ValueError`` with one line naming the problem."""
    if not isinstance(data, dict):
        raise ValueError("a route must be a table with name, candidates and strategy")
    unknown = sorted(set(data) - set(_ROUTE_FIELDS))
    if unknown:
        raise ValueError(f"unknown route field {unknown[0]!r} (known: {', '.join(_ROUTE_FIELDS)})")
    name = data.get("name")
    if not isinstance(name, str) or not ROUTE_NAME.match(name):
        raise ValueError(
            f"route name {name!r} must be 1-64 letters, digits, '.', '_', ':' or '-' "
            "(no '/': model ids have one)"
        )
    raw = data.get("candidates")
    if not isinstance(raw, list) or not raw:
        raise ValueError(
            f"route {name!r} needs candidates: a list of model ids and filter tables, "
            'e.g. ["openai/gpt-4o-mini", {free = true, min_context = 32000}]'
        )
    found: list[str | Filter] = [_candidate(name, i, c) for i, c in enumerate(raw, 1)]
    strategy = data.get("strategy", "ordered")
    weight = data.get("weight", 0.5)
    if type(weight) not in (int, float) or not 0 <= weight <= 1:
        raise ValueError(f"route {name!r} weight must be a number from 0 to 1, got {weight!r}")
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(
            f"route {name!r} strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}"
        )
    return Route(name, tuple(found), strategy, float(weight))


def _candidate(route: str, index: int, raw: Any) -> str | Filter:
    where = f"route {route!r} candidate #{index}"
    if isinstance(raw, str):
        if not raw.strip() or raw != raw.strip():
            raise ValueError(f"{where} must be a model id, got {raw!r}")
        return raw
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a model id or a filter table, got {raw!r}")
    for field, given in raw.items():
        kind = _FILTER_FIELDS.get(field)
        if kind is None:
            known = ", ".join(_FILTER_FIELDS)
            raise ValueError(f"{where}: unknown filter {field!r} (known: {known})")
        if (type(given) is bool and kind is not bool) or not isinstance(given, kind):
            raise ValueError(f"{where}: {field} has the wrong type: {given!r}")
        value: Any = given
        if kind is list and not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}: {field} must be a list of strings")
        if field in ("min_context", "max_price") and not 0 <= value < math.inf:
            raise ValueError(f"{where}: {field} must be a finite number, not negative")
    return Filter(**raw)


def route_to_json(route: Route) -> dict[str, Any]:
    """The JSON form ``route_from_json`` reads."""
    out: list[Any] = []
    for candidate in route.candidates:
        if isinstance(candidate, str):
            out.append(candidate)
            continue
        table: dict[str, Any] = {}
        for field in _FILTER_FIELDS:
            value = getattr(candidate, field)
            if isinstance(value, frozenset):
                value = sorted(value) if value else None
            if value not in (None, False):
                table[field] = value
        out.append(table)
    return {
        "name": route.name,
        "candidates": out,
        "strategy": route.strategy,
        "weight": route.weight,
    }


@attrs.frozen(slots=False)  # one per routed request: a dict's stores are cheaper than slots'
class Need:
    """What a request needs of a model."""

    prompt_tokens: int
    max_tokens: int | None = None
    parameters: frozenset[str] = attrs.field(default=frozenset(), converter=_names)
    images: int = 0

    @property
    def context(self) -> int:
        """Tokens the model's context must hold: the prompt and the completion."""
        completion = COMPLETION_ALLOWANCE if self.max_tokens is None else self.max_tokens
        return self.prompt_tokens + completion


_PARAMETERS = frozenset({"tools", "response_format", "seed", "logprobs", "top_logprobs", "stop"})
_NO_PARAMETERS: frozenset[str] = frozenset()


def need_of(request: Mapping[str, Any]) -> Need:
    """The ``Need`` of a request body (parsed JSON): Chat Completions' and
    Anthropic's ``messages``, or the Responses API's ``input`` (a string, or
    its items). A parameter counts when it is set to anything but null or
    false (``"seed": 0`` is a seed)."""
    messages = request.get("messages")
    if type(messages) is not list:
        messages = request.get("input")  # the Responses API's
        if isinstance(messages, str):
            messages = [{"content": messages}]
    tokens, images = prompt_size(messages if isinstance(messages, list) else ())
    limit = request.get("max_completion_tokens")
    if limit is None:  # absent or null: the older name says
        limit = request.get("max_tokens")
    named = _PARAMETERS.intersection(request)  # the top-level names, in C
    if named:
        named = frozenset([p for p in named if request[p] is not None and request[p] is not False])
    return Need(
        tokens, limit if type(limit) is int and limit > 0 else None, named or _NO_PARAMETERS, images
    )


@attrs.frozen
class Skip:
    """Why a model is passed over for now (cooling, free quota spent) and in
    how many seconds it may serve again (None: not known)."""

    reason: str
    retry_after: float | None = None


EMPTY, TOO_LONG, UNFIT, UNAVAILABLE = "empty", "too_long", "unfit", "unavailable"
"""Why a decision has no model: the route has no candidate in the catalog; the
request is longer than every candidate's context; no candidate supports what
it asks (parameters, images); every candidate that fits is passed over for now."""


@attrs.frozen(slots=False)  # one per routed request, like Need
class Decision:
    """A route's choice for one request. ``reasons``: one line per candidate
    left out; ``confidence``: 1 when the chosen model's price and latency
    are both known, 0.5 for one of them, 0.25 for neither (0: no model).
    Without a model, ``problem`` says why in one line and ``problem_kind``
    which case it is (``EMPTY``, ``TOO_LONG``, ``UNFIT``, ``UNAVAILABLE``);
    ``retry_after``: seconds until a candidate passed over serves again."""

    route: str
    model: str | None
    fallbacks: tuple[str, ...]
    reasons: tuple[str, ...]
    estimated_cost: float | None
    estimated_latency_ms: float | None
    confidence: float
    problem: str | None = None
    problem_kind: str | None = None
    retry_after: float | None = None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self, recurse=False) | {
            "fallbacks": list(self.fallbacks),
            "reasons": list(self.reasons),
        }


def _cost(model: ModelInfo, need: Need) -> float | None:
    pricing = model.pricing
    if not pricing.known or pricing.variable:
        return None
    completion = COMPLETION_ALLOWANCE if need.max_tokens is None else need.max_tokens
    return (
        need.prompt_tokens * pricing.prompt
        + completion * pricing.completion
        + pricing.request
        + need.images * pricing.image
    )


class Candidates(tuple[tuple[ModelInfo, ...], tuple[str, ...]]):
    """``candidates``' answer, ``(models, missing)``, with what ``decide`` reads
    of each model taken out once (it depends on the route and the catalog only):
    ``free``: whether a model is free; ``in_price_order``:
    the ``cheapest`` order is the route's for every request (the priced models
    come first and no price of one is below the one's before it); and what
    tells at once that every model fits a request: the smallest context and
    completion ceiling stated (None: none states one), the parameters every
    model that lists some supports (None: none lists any), whether every
    model takes images."""

    ids: tuple[str, ...]
    free: bool
    in_price_order: bool
    least_context: int | None
    least_ceiling: int | None
    common_parameters: frozenset[str] | None
    images: bool

    def __new__(cls, models: tuple[ModelInfo, ...], missing: tuple[str, ...]) -> Candidates:
        self = super().__new__(cls, (models, missing))
        self.ids = tuple(m.id for m in models)
        self.free = any(m.free for m in models)
        self.in_price_order = _in_price_order(models)
        contexts = [m.context_length for m in models if m.context_length is not None]
        self.least_context = min(contexts, default=None)
        ceilings = [m.max_completion_tokens for m in models if m.max_completion_tokens is not None]
        self.least_ceiling = min(ceilings, default=None)
        lists = [m.supported_parameters for m in models if m.supported_parameters]
        self.common_parameters = frozenset.intersection(*lists) if lists else None
        self.images = all(not m.input_modalities or "image" in m.input_modalities for m in models)
        return self

    def all_fit(self, need: Need, context: int) -> bool:
        """Whether every model fits ``need`` (its ``context`` given): what
        ``_fits`` finds of each, from the least of the models' limits."""
        least = self.least_context
        ceiling = self.least_ceiling
        common = self.common_parameters
        return (
            (least is None or context <= least)
            and (need.max_tokens is None or ceiling is None or need.max_tokens <= ceiling)
            and (not need.parameters or common is None or need.parameters <= common)
            and (not need.images or self.images)
        )


def _in_price_order(models: tuple[ModelInfo, ...]) -> bool:
    """Whether ``_rank``'s ``cheapest`` keeps ``models`` in their order for any
    need: each price (prompt, completion, request, image) finite, not negative
    and no lower than the one before's, the unpriced models last. ``_cost`` grows with each
    price for counts of 0 or more (floats round monotonically), and ``sorted``
    keeps equal costs in order, so the sort is then the order given."""
    before: tuple[float, ...] | None = None
    unpriced = False
    for model in models:
        pricing = model.pricing
        if not pricing.known or pricing.variable:
            unpriced = True
            continue
        if unpriced:
            return False
        prices = (pricing.prompt, pricing.completion, pricing.request, pricing.image)
        if not all(0 <= p < math.inf for p in prices):  # NaN fails too
            return False
        if before is not None and any(p < b for p, b in zip(prices, before, strict=True)):
            return False
        before = prices
    return True


def candidates(route: Route, catalog: Catalog) -> Candidates:
    """The route's candidates as catalog models, in order, each once, and one
    line per model id the catalog does not list. Depends on the route and the
    catalog only: a caller may keep it until either changes."""
    seen: set[str] = set()
    out: list[ModelInfo] = []
    missing: list[str] = []
    for candidate in route.candidates:
        if isinstance(candidate, str):
            model = catalog.get(candidate)
            if model is None:
                missing.append(f"skipped {candidate}: not in the catalog")
            elif model.id not in seen:
                seen.add(model.id)
                out.append(model)
            continue
        for model in catalog.models:
            if model.id not in seen and candidate.rejects(model) is None:
                seen.add(model.id)
                out.append(model)
    return Candidates(tuple(out), tuple(missing))


def _fits(model: ModelInfo, need: Need, context: int) -> str | None:
    """Why ``model`` cannot serve ``need`` (whose ``context`` is given; None: it can)."""
    if model.context_length is not None and model.context_length < context:
        return f"context {model.context_length:,} < {context:,} needed"
    ceiling = model.max_completion_tokens
    if need.max_tokens is not None and ceiling is not None and ceiling < need.max_tokens:
        return f"max completion {ceiling:,} < {need.max_tokens:,} asked"
    if model.supported_parameters and not model.supports(need.parameters):
        return "lacks " + ", ".join(sorted(need.parameters - model.supported_parameters))
    if need.images and model.input_modalities and "image" not in model.input_modalities:
        return "no image input"
    return None


def _rank(
    route: Route, models: list[ModelInfo], need: Need, latency: Mapping[str, float]
) -> tuple[list[ModelInfo], dict[str, float | None] | None]:
    """``models`` in the route's order of preference, and their costs when
    the strategy priced them (None: it did not)."""
    if route.strategy == "ordered" or not models:
        return models, None
    if route.strategy == "fastest":  # one never observed first (to measure it), then fastest
        ranked = sorted(models, key=lambda m: (m.id in latency, latency.get(m.id, 0.0)))
        return _explore_one(ranked, latency), None
    costs = {m.id: _cost(m, need) for m in models}
    if route.strategy == "cheapest":  # unknown prices last, then the route's order
        return sorted(models, key=lambda m: (costs[m.id] is None, costs[m.id] or 0.0)), costs
    known_costs = [c for c in costs.values() if c is not None]
    top_cost = max(known_costs, default=0.0) or 1.0
    top_latency = max(latency.get(m.id, 0.0) for m in models) or 1.0

    def score(model: ModelInfo) -> float:
        cost = costs[model.id]
        slow = latency.get(model.id)
        cost_part = 1.0 if cost is None else cost / top_cost
        latency_part = 0.0 if slow is None else slow / top_latency  # unobserved: explore
        return route.weight * latency_part + (1 - route.weight) * cost_part

    return _explore_one(sorted(models, key=score), latency), costs


def _explore_one(ranked: list[ModelInfo], latency: Mapping[str, float]) -> list[ModelInfo]:
    """``ranked`` with its models never observed after the first moved to the
    end: a request tries at most one unmeasured model (which may be down)
    before the measured ones, so exploring costs one attempt, not all."""
    fresh = [m for m in ranked if m.id not in latency]
    if len(fresh) < 2:
        return ranked
    later = {m.id for m in fresh[1:]}
    return [m for m in ranked if m.id not in later] + fresh[1:]


def decide(
    route: Route,
    catalog: Catalog,
    need: Need,
    latency: Mapping[str, float] | None = None,
    *,
    unavailable: Mapping[str, Skip] | None = None,
    no_free: Skip | None = None,
    found: tuple[tuple[ModelInfo, ...], tuple[str, ...]] | None = None,
) -> Decision:
    """The model ``route`` sends a request needing ``need`` to, and its fallbacks.

    ``latency``: observed time to first byte per model id, in ms;
    ``unavailable``: models passed over for now (a model cooling after it
    was down); ``no_free``: set when no account has free quota left, so free
    models are passed over; ``found``: ``candidates(route, catalog)``, if
    the caller kept it."""
    latency = latency or {}
    if type(found) is not Candidates:
        found = candidates(route, catalog) if found is None else Candidates(*found)
    models, missing = found
    context = need.context
    # Every candidate fits and none is passed over (the usual case): in the route's order
    whole = not unavailable and no_free is None and found.all_fit(need, context)
    if whole:
        fitting: list[ModelInfo] | tuple[ModelInfo, ...] = models
        reasons: list[str] | tuple[str, ...] = missing
        waits: list[float] = []
        too_long = unfit = 0
    else:
        fitting, reasons, waits, too_long, unfit = _fitting(
            found, need, context, unavailable, no_free
        )
    if route.strategy == "ordered" or (
        route.strategy == "cheapest"
        and found.in_price_order
        and need.prompt_tokens >= 0
        and (need.max_tokens or 0) >= 0
        and need.images >= 0
    ):  # for cheapest: the costs would sort the models into the order they are in
        ranked: Sequence[ModelInfo] = fitting
        costs = None
    else:
        ranked, costs = _rank(route, list(fitting), need, latency)
    if not ranked:
        kind, problem = _problem(route, models, need, too_long, unfit)
        wait = min(waits) if waits else None
        return Decision(route.name, None, (), tuple(reasons), None, None, 0.0, problem, kind, wait)
    chosen = ranked[0]
    cost = _cost(chosen, need) if costs is None else costs[chosen.id]
    seen = latency.get(chosen.id)
    confidence = _CONFIDENCE[(cost is not None) + (seen is not None)]
    return Decision(
        route.name,
        chosen.id,
        found.ids[1:] if ranked is models else tuple(map(_ID, ranked[1:])),
        tuple(reasons),
        cost,
        seen,
        confidence,
    )


def _fitting(
    found: Candidates,
    need: Need,
    context: int,
    unavailable: Mapping[str, Skip] | None,
    no_free: Skip | None,
) -> tuple[list[ModelInfo], list[str], list[float], int, int]:
    """The models of ``found`` that fit ``need`` and are not passed over, in
    order; the reasons, when those passed over are back,
    and how many were too short and how many could not serve it otherwise."""
    reasons = list(found[1])
    fitting: list[ModelInfo] = []
    waits: list[float] = []
    too_long = unfit = 0
    for model in found[0]:
        why = _fits(model, need, context)
        if why is not None:
            if why.startswith("context"):
                too_long += 1
            else:
                unfit += 1
            reasons.append(f"skipped {model.id}: {why}")
            continue
        cooling = unavailable.get(model.id) if unavailable else None
        if cooling is not None or (no_free is not None and model.free):
            skips = [s for s in (no_free if model.free else None, cooling) if s]
            reasons.extend(f"skipped {model.id}: {skip.reason}" for skip in skips)
            back = [skip.retry_after for skip in skips]
            if None not in back:  # back when every reason has passed
                waits.append(max(b for b in back if b is not None))
            continue
        fitting.append(model)
    return fitting, reasons, waits, too_long, unfit


_CONFIDENCE = (0.25, 0.5, 1.0)  # by how many of price and latency are known
_ID = operator.attrgetter("id")


def _problem(
    route: Route, models: tuple[ModelInfo, ...], need: Need, too_long: int, unfit: int
) -> tuple[str, str]:
    """(kind, one line) for a decision without a model."""
    name = f"route {route.name!r}"
    if not models:
        return EMPTY, f"no model of the catalog matches {name}'s candidates"
    if too_long + unfit < len(models):
        return UNAVAILABLE, f"every candidate of {name} that fits is unavailable for now"
    if too_long == len(models):
        largest = max(models, key=lambda m: m.context_length or 0)
        return TOO_LONG, (
            f"the request needs about {need.context:,} tokens (prompt and completion), "
            f"more than any candidate of {name} holds: the largest context is "
            f"{largest.context_length or 0:,} ({largest.id}); shorten the prompt or max_tokens"
        )
    return UNFIT, f"no candidate of {name} supports what the request asks (see reasons)"


def ordered(name: str, models: Iterable[str]) -> Route:
    """The route a request's own ``models`` list makes: those ids, in order."""
    return Route(name, tuple(models), "ordered")


_KEY_VERDICTS = frozenset(
    {Verdict.RATE_LIMITED, Verdict.INVALID, Verdict.DEPLETED, Verdict.TRY_ANOTHER_KEY}
)


def key_failure(status: int, headers: Mapping[str, str] | None, body: bytes | None) -> bool:
    """Whether an error answer is the key's (its own rate limit, revoked, out
    of credits): another key may serve the same model."""
    return status >= 400 and classify_response(status, headers, body).verdict in _KEY_VERDICTS


_CONTEXT = (
    "context length",
    "context_length",
    "maximum context",
    "context window",
    "prompt is too long",
    "too many tokens",
    "reduce the length",
)
MODEL_FAILURES = ("unavailable", "busy", "fault", "free_limit", "context")
"""What ``model_failure`` may say: the model has no endpoint or provider up
now; its provider's shared pool is rate limited; it failed (5xx, 408) on
every key the pool tried; the account's free-model limit; the request does
not fit its context."""


def model_failure(
    status: int, headers: Mapping[str, str] | None, body: bytes | None
) -> tuple[str, float | None] | None:
    """Whether an answer is the model's failure, one that another model may
    not have: (one of ``MODEL_FAILURES``, the upstream's retry hint in
    seconds), or None (a success, or the caller's or a key's problem)."""
    if status < 400:
        return None
    verdict = classify_response(status, headers, body)
    if verdict.verdict is Verdict.MODEL_UNAVAILABLE:
        return "unavailable", verdict.cooldown
    if verdict.verdict is Verdict.UPSTREAM_BUSY:
        return "busy", verdict.cooldown
    if verdict.verdict is Verdict.UPSTREAM_FAULT:  # 5xx on every key tried: 502 model down
        return "fault", verdict.cooldown
    if verdict.verdict is Verdict.RATE_LIMITED and "free" in verdict.reason:
        return "free_limit", verdict.cooldown
    if status in (400, 413) and body:
        text = body[:4096].decode("utf-8", "replace").lower()
        if any(needle in text for needle in _CONTEXT):
            return "context", None
    return None
