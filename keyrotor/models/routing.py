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

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from .catalog import Catalog, ModelInfo
from .cost import count_images, estimate_tokens

__all__ = ["FREE_ROUTE", "STRATEGIES", "Decision", "Filter", "Need", "Route", "decide", "need_of"]

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
            per_million = sum(pricing.per_million())
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


@attrs.frozen
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


_PARAMETERS = ("tools", "response_format", "seed", "logprobs", "top_logprobs", "stop")


def need_of(request: Mapping[str, Any]) -> Need:
    """The ``Need`` of a chat request body (parsed JSON)."""
    messages = request.get("messages")
    messages = messages if isinstance(messages, list) else []
    limit = request.get("max_completion_tokens", request.get("max_tokens"))
    return Need(
        prompt_tokens=estimate_tokens(messages),
        max_tokens=limit if type(limit) is int and limit > 0 else None,
        parameters=frozenset(p for p in _PARAMETERS if request.get(p) not in (None, False)),
        images=count_images(messages),
    )


@attrs.frozen
class Decision:
    """A route's choice for one request. ``reasons``: one line per candidate
    left out; ``confidence``: 1 when the chosen model's price and latency
    are both known, 0.5 for one of them, 0.25 for neither (0: no model)."""

    route: str
    model: str | None
    fallbacks: tuple[str, ...]
    reasons: tuple[str, ...]
    estimated_cost: float | None
    estimated_latency_ms: float | None
    confidence: float

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


def _candidates(route: Route, catalog: Catalog, reasons: list[str]) -> list[ModelInfo]:
    """The route's candidates as catalog models, in order, each once."""
    seen: set[str] = set()
    out: list[ModelInfo] = []
    for candidate in route.candidates:
        if isinstance(candidate, str):
            model = catalog.get(candidate)
            if model is None:
                reasons.append(f"skipped {candidate}: not in the catalog")
            elif model.id not in seen:
                seen.add(model.id)
                out.append(model)
            continue
        for model in catalog.models:
            if model.id not in seen and candidate.rejects(model) is None:
                seen.add(model.id)
                out.append(model)
    return out


def _fits(model: ModelInfo, need: Need) -> str | None:
    """Why ``model`` cannot serve ``need`` (None: it can)."""
    if model.context_length is not None and model.context_length < need.context:
        return f"context {model.context_length:,} < {need.context:,} needed"
    ceiling = model.max_completion_tokens
    if need.max_tokens is not None and ceiling is not None and ceiling < need.max_tokens:
        return f"max completion {ceiling:,} < {need.max_tokens:,} asked"
    if model.supported_parameters and not model.supports(need.parameters):
        return "lacks " + ", ".join(sorted(need.parameters - model.supported_parameters))
    if need.images and "image" not in model.input_modalities:
        return "no image input"
    return None


def _rank(
    route: Route, models: list[ModelInfo], need: Need, latency: Mapping[str, float]
) -> list[ModelInfo]:
    if route.strategy == "ordered" or not models:
        return models
    costs = {m.id: _cost(m, need) for m in models}
    if route.strategy == "cheapest":  # unknown prices last, then the route's order
        return sorted(models, key=lambda m: (costs[m.id] is None, costs[m.id] or 0.0))
    if route.strategy == "fastest":  # never observed first (measured once), then fastest
        return sorted(models, key=lambda m: (m.id in latency, latency.get(m.id, 0.0)))
    known_costs = [c for c in costs.values() if c is not None]
    top_cost = max(known_costs, default=0.0) or 1.0
    top_latency = max(latency.get(m.id, 0.0) for m in models) or 1.0

    def score(model: ModelInfo) -> float:
        cost = costs[model.id]
        slow = latency.get(model.id)
        cost_part = 1.0 if cost is None else cost / top_cost
        latency_part = 0.0 if slow is None else slow / top_latency  # unobserved: explore
        return route.weight * latency_part + (1 - route.weight) * cost_part

    return sorted(models, key=score)


def decide(
    route: Route,
    catalog: Catalog,
    need: Need,
    latency: Mapping[str, float] | None = None,
) -> Decision:
    """The model ``route`` sends a request needing ``need`` to, and its fallbacks.

    ``latency``: observed time to first byte per model id, in ms."""
    latency = latency or {}
    reasons: list[str] = []
    fitting = []
    for model in _candidates(route, catalog, reasons):
        why = _fits(model, need)
        if why is None:
            fitting.append(model)
        else:
            reasons.append(f"skipped {model.id}: {why}")
    ranked = _rank(route, fitting, need, latency)
    if not ranked:
        return Decision(route.name, None, (), tuple(reasons), None, None, 0.0)
    chosen = ranked[0]
    cost = _cost(chosen, need)
    seen = latency.get(chosen.id)
    confidence = {0: 0.25, 1: 0.5, 2: 1.0}[(cost is not None) + (seen is not None)]
    return Decision(
        route.name,
        chosen.id,
        tuple(m.id for m in ranked[1:]),
        tuple(reasons),
        cost,
        seen,
        confidence,
    )
