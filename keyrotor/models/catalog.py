"""A provider's model catalog as a pure value, parsed from its ``GET /models``.

OpenRouter's schema (its API reference for ``GET /models``): every model has an ``id``,
a ``name``, a ``context_length``, ``pricing`` as decimal strings in USD (per
token for ``prompt``, ``completion``, ``internal_reasoning``,
``input_cache_read`` and ``input_cache_write``; per request, image and web
search for ``request``, ``image`` and ``web_search``), ``top_provider``,
``supported_parameters``, ``architecture`` and ``expiration_date``. An
OpenAI-compatible ``/models`` (``{"data": [{"id": ...}]}`` without pricing)
parses too: its models have unknown prices.

``parse_catalog`` never fetches and never raises for one bad model: a model
whose fields do not parse is left out and named in ``Catalog.problems`` (one
line each, the field and what was wrong), so a catalog with one odd entry still
serves the rest. A document that is not a catalog at all raises
``CatalogError``, and the caller keeps the catalog it had.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

__all__ = ["PRICE_FIELDS", "Catalog", "CatalogError", "ModelInfo", "Pricing", "parse_catalog"]

PRICE_FIELDS = (
    "prompt",
    "completion",
    "request",
    "image",
    "web_search",
    "internal_reasoning",
    "input_cache_read",
    "input_cache_write",
)
"""The pricing fields keyrotor reads, in OpenRouter's names (USD decimal strings)."""


class CatalogError(ValueError):
    """A ``/models`` document that is not a catalog; the message says why."""


@attrs.frozen
class Pricing:
    """USD prices of one model: per token (``prompt``, ``completion``,
    ``internal_reasoning``, ``input_cache_read``, ``input_cache_write``), per
    request, per image, per web search. The last three per-token prices are
    None when the catalog leaves them out (those tokens are then billed at the
    prompt or completion price). ``variable``: the price depends on the model
    a router picks (OpenRouter's ``"-1"``, e.g. ``openrouter/auto``);
    ``known``: False when the catalog gave no pricing at all."""

    prompt: float = 0.0
    completion: float = 0.0
    request: float = 0.0
    image: float = 0.0
    web_search: float = 0.0
    internal_reasoning: float | None = None
    input_cache_read: float | None = None
    input_cache_write: float | None = None
    variable: bool = False
    known: bool = True

    @property
    def free(self) -> bool:
        """Whether a plain request costs nothing (``"0"`` prompt and completion)."""
        return (
            self.known
            and not self.variable
            and self.prompt == 0
            and self.completion == 0
            and self.request == 0
        )

    def per_million(self) -> tuple[float, float]:
        """(prompt, completion) in USD per million tokens, for display."""
        return self.prompt * 1e6, self.completion * 1e6


UNKNOWN_PRICING = Pricing(known=False)


@attrs.frozen
class ModelInfo:
    """One model of a provider's catalog (``raw``: its entry as the upstream sent it)."""

    id: str
    name: str
    provider: str
    context_length: int | None
    max_completion_tokens: int | None
    pricing: Pricing
    supported_parameters: frozenset[str]  # empty: not listed (OpenAI's /models lists none)
    input_modalities: tuple[str, ...]  # empty: not listed (nor these)
    created: int | None
    expiration_date: str | None
    raw: Mapping[str, Any] = attrs.field(eq=False, repr=False)

    @property
    def free(self) -> bool:
        return self.pricing.free

    def supports(self, parameters: Iterable[str]) -> bool:
        """Whether the model accepts every one of ``parameters`` (``tools``, ...)."""
        return self.supported_parameters.issuperset(parameters)


@attrs.frozen
class Catalog:
    """A provider's models, in the upstream's order, indexed by id.

    ``etag``: the upstream's validator, sent back as ``If-None-Match`` on the
    next refresh; ``fetched_at``: Unix time of the fetch; ``problems``: one
    line per model left out."""

    provider: str
    models: tuple[ModelInfo, ...]
    etag: str | None = None
    fetched_at: float | None = None
    problems: tuple[str, ...] = ()
    by_id: Mapping[str, ModelInfo] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "by_id", {model.id: model for model in self.models})

    def __len__(self) -> int:
        return len(self.models)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self.by_id

    def get(self, model_id: str) -> ModelInfo | None:
        return self.by_id.get(model_id)

    def to_json(self) -> dict[str, Any]:
        """The catalog as the state file keeps it (``parse_catalog`` reads it back)."""
        return {
            "provider": self.provider,
            "etag": self.etag,
            "fetched_at": self.fetched_at,
            "data": [dict(model.raw) for model in self.models],
        }


def parse_catalog(
    document: bytes | str | Mapping[str, Any],
    provider: str = "openrouter",
    *,
    priced: bool = True,
    etag: str | None = None,
    fetched_at: float | None = None,
) -> Catalog:
    """The catalog in a ``GET /models`` answer (bytes, text or parsed JSON).

    Raises ``CatalogError`` when ``document`` is not ``{"data": [...]}``; a
    model that does not parse is left out and described in ``problems``.
    ``priced``: every model must carry ``pricing`` (OpenRouter); False for an
    OpenAI-compatible catalog, whose models then have unknown prices. A model
    id given twice keeps its first entry."""
    if isinstance(document, bytes | str):
        try:
            document = json.loads(document)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CatalogError(f"the models document is not JSON ({exc})") from None
    if not isinstance(document, Mapping):
        raise CatalogError(f"the models document is a {type(document).__name__}, not an object")
    entries = document.get("data")
    if not isinstance(entries, list):
        raise CatalogError('the models document has no "data" list')
    models: list[ModelInfo] = []
    problems: list[str] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        try:
            model = _model(entry, provider, priced)
        except _Bad as bad:
            problems.append(f"data[{index}]{bad.where}: {bad.what}")
            continue
        if model.id in seen:
            problems.append(f"data[{index}].id: {model.id!r} given twice (the first kept)")
            continue
        seen.add(model.id)
        models.append(model)
    return Catalog(
        provider,
        tuple(models),
        etag=etag,
        fetched_at=fetched_at,
        problems=tuple(problems),
    )


class _Bad(Exception):
    def __init__(self, where: str, what: str) -> None:
        self.where = where
        self.what = what


def _model(entry: object, provider: str, priced: bool) -> ModelInfo:
    if not isinstance(entry, Mapping):
        raise _Bad("", f"a model must be an object, got {type(entry).__name__}")
    model_id = entry.get("id")
    if not isinstance(model_id, str) or not model_id.strip():
        raise _Bad(".id", f"expected a model id, got {model_id!r}")
    name = entry.get("name")
    top = entry.get("top_provider")
    top = top if isinstance(top, Mapping) else {}
    architecture = entry.get("architecture")
    architecture = architecture if isinstance(architecture, Mapping) else {}
    parameters = entry.get("supported_parameters")
    modalities = architecture.get("input_modalities")
    expiration = entry.get("expiration_date")
    return ModelInfo(
        id=model_id,
        name=name if isinstance(name, str) and name else model_id,
        provider=provider,
        context_length=_count(entry.get("context_length"), ".context_length"),
        max_completion_tokens=_count(
            top.get("max_completion_tokens"), ".top_provider.max_completion_tokens"
        ),
        pricing=_pricing(entry.get("pricing"), priced),
        supported_parameters=frozenset(p for p in parameters if isinstance(p, str))
        if isinstance(parameters, list)
        else frozenset(),
        input_modalities=tuple(m for m in modalities if isinstance(m, str))
        if isinstance(modalities, list)
        else (),
        created=entry["created"] if type(entry.get("created")) is int else None,
        expiration_date=expiration if isinstance(expiration, str) else None,
        raw=entry,
    )


def _count(value: object, where: str) -> int | None:
    """A token count: absent (None) or a whole number > 0."""
    if value is None:
        return None
    if type(value) is not int or value <= 0:
        raise _Bad(where, f"expected a whole number of tokens more than 0, got {value!r}")
    return value


def _pricing(pricing: object, priced: bool) -> Pricing:
    if pricing is None:
        if priced:
            raise _Bad(".pricing", "missing (an OpenRouter model always has prices)")
        return UNKNOWN_PRICING
    if not isinstance(pricing, Mapping):
        raise _Bad(".pricing", f"expected an object of prices, got {type(pricing).__name__}")
    if "prompt" not in pricing or "completion" not in pricing:
        missing = "prompt" if "prompt" not in pricing else "completion"
        raise _Bad(f".pricing.{missing}", "missing (every priced model has prompt and completion)")
    prices: dict[str, Any] = {}
    variable = False
    for name in PRICE_FIELDS:
        value = pricing.get(name)
        if value is None:
            continue
        price = _price(value, f".pricing.{name}")
        if price == -1.0:
            variable = True
            continue
        prices[name] = price
    return Pricing(**prices, variable=variable)


def _price(value: object, where: str) -> float:
    """A USD decimal string (numbers tolerated) at or above 0, or ``-1``."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _Bad(where, f'expected a decimal string such as "0.000001", got {value!r}')
    try:
        price = float(value)
    except ValueError:
        raise _Bad(where, f'expected a decimal string such as "0.000001", got {value!r}') from None
    if price == -1.0:
        return price
    if not math.isfinite(price) or price < 0:
        raise _Bad(where, f"expected a price of 0 or more (or -1: variable), got {value!r}")
    return price
