"""Scenarios for the fake upstream: which secrets exist and how each behaves.

A ``Scenario`` maps bearer secrets to behaviours (and optional aliases used in
the request log), and holds the model catalog and prices that make every
request's cost deterministic. Built-in scenarios: ``Scenario.demo()``,
``Scenario.healthy(n)``, ``Scenario.open()``; by name through ``scenario()``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from attrs import define, field, frozen

from ..upstream.behaviours import (
    AccountRateLimit,
    Behaviour,
    Credits,
    Drop,
    Hang,
    Invalid,
    Ok,
    RateLimit,
    Reply,
)

__all__ = [
    "DEFAULT_MODELS",
    "DEMO_KEYS",
    "SCENARIOS",
    "Model",
    "Scenario",
    "healthy_secret",
    "scenario",
]


@frozen
class Model:
    """One entry of the ``GET /models`` catalog. Prices are USD decimal strings
    (``"0.0000006"`` = $0.60 per million tokens), as OpenRouter sends: per token
    for ``prompt``, ``completion``, ``internal_reasoning``, ``input_cache_read``
    and ``input_cache_write`` (None: not listed), per request, image and web
    search for ``request``, ``image`` and ``web_search``. ``"-1"`` prompt and
    completion mark a variable-priced router."""

    id: str
    name: str
    prompt: str
    completion: str
    context_length: int = 128_000
    modality: str = "text->text"
    request: str = "0"
    image: str = "0"
    web_search: str = "0"
    internal_reasoning: str | None = None
    input_cache_read: str | None = None
    input_cache_write: str | None = None
    max_completion_tokens: int | None = 16_384
    supported_parameters: tuple[str, ...] = ("max_tokens", "temperature", "stream", "stop")
    input_modalities: tuple[str, ...] = ("text",)
    created: int = 1_700_000_000
    expiration_date: str | None = None

    def prices(self) -> tuple[float, float]:
        """(prompt, completion) USD per token, as floats."""
        return float(self.prompt), float(self.completion)

    def cost(
        self, prompt: int, completion: int, *, cached: int = 0, reasoning: int = 0, images: int = 0
    ) -> float:
        """What the fake charges (``usage.cost``), in exact decimal arithmetic
        rounded to 12 places: cached prompt tokens at ``input_cache_read``,
        reasoning tokens (part of ``completion``) at ``internal_reasoning``,
        each at the prompt or completion price when the model lists none; plus
        ``request`` once and ``image`` per input image. A variable price is 0."""
        if self.prompt == "-1":
            return 0.0
        read = Decimal(self.input_cache_read or self.prompt)
        think = Decimal(self.internal_reasoning or self.completion)
        total = (
            Decimal(self.prompt) * (prompt - cached)
            + read * cached
            + Decimal(self.completion) * (completion - reasoning)
            + think * reasoning
            + Decimal(self.request)
            + Decimal(self.image) * images
        )
        return float(round(total, 12))

    def to_json(self) -> dict[str, Any]:
        """The model in OpenRouter's ``/models`` shape."""
        pricing = {
            "prompt": self.prompt,
            "completion": self.completion,
            "request": self.request,
            "image": self.image,
            "web_search": self.web_search,
        }
        for name in ("internal_reasoning", "input_cache_read", "input_cache_write"):
            value = getattr(self, name)
            if value is not None:
                pricing[name] = value
        return {
            "id": self.id,
            "canonical_slug": self.id.split(":", 1)[0],
            "name": self.name,
            "created": self.created,
            "description": f"{self.name} (served by keyrotor's fake upstream).",
            "context_length": self.context_length,
            "architecture": {
                "modality": self.modality,
                "input_modalities": list(self.input_modalities),
                "output_modalities": ["embeddings" if "embedding" in self.modality else "text"],
                "tokenizer": "Other",
                "instruct_type": None,
            },
            "pricing": pricing,
            "top_provider": {
                "context_length": self.context_length,
                "max_completion_tokens": self.max_completion_tokens,
                "is_moderated": False,
            },
            "per_request_limits": None,
            "supported_parameters": list(self.supported_parameters),
            "default_parameters": {},
            "expiration_date": self.expiration_date,
        }


DEFAULT_MODELS: tuple[Model, ...] = (
    Model("openai/gpt-4o-mini", "OpenAI: GPT-4o-mini", "0.00000015", "0.0000006"),
    Model(
        "anthropic/claude-3.5-haiku",
        "Anthropic: Claude 3.5 Haiku",
        "0.0000008",
        "0.000004",
        context_length=200_000,
    ),
    Model(
        "meta-llama/llama-3.3-70b-instruct:free",
        "Meta: Llama 3.3 70B Instruct (free)",
        "0",
        "0",
        context_length=131_072,
    ),
    Model(
        "openai/text-embedding-3-small",
        "OpenAI: Text Embedding 3 Small",
        "0.00000002",
        "0",
        context_length=8_192,
        modality="text->embeddings",
    ),
)


@define
class Scenario:
    """Secrets, their behaviours, and the catalog.

    - ``keys``: secret -> behaviour. A secret not listed gets ``unknown``
      (``None``: 401 "User not found.", like OpenRouter).
    - ``aliases``: secret -> name shown in the request log and stats (a secret
      without an alias is logged as itself: the log is a test API).
    - ``models``, ``default_model``: the catalog (``GET /models``) and the model
      used when a request names none. Cost = prompt_tokens x prompt price +
      completion_tokens x completion price, from the catalog when the model is
      in it, else ``prompt_price``/``completion_price``; ``:free`` models cost 0.
    - ``default_completion_tokens``: content chunks when ``max_tokens`` is absent.
    - ``comment_every``: an ``: OPENROUTER PROCESSING`` comment before the first
      chunk and after every that many content chunks (0: none).
    - ``catalog_etag``: ``GET /models`` sends an ``ETag`` and answers 304 to
      an ``If-None-Match`` that matches it; ``models_reply``: answer
      ``GET /models`` with this instead (a failing catalog fetch).
    - ``report_cost``: answers carry ``usage.cost`` (OpenRouter's do; False:
      like OpenAI's, tokens only, and a stream's usage only when the request
      asks for it with ``stream_options.include_usage``).
    - ``epoch``: the clock reading that behaviours see as time 0 (``Call.now``
      is the clock minus ``epoch``, ``Call.epoch`` is ``epoch``): a replay
      model's failure windows and limits, in seconds from the replay's start,
      run unchanged on a clock that starts at ``epoch``.
    """

    keys: dict[str, Behaviour] = field(factory=dict, converter=dict)
    aliases: dict[str, str] = field(factory=dict, converter=dict)
    unknown: Behaviour | None = None
    models: tuple[Model, ...] = field(default=DEFAULT_MODELS, converter=tuple)
    default_model: str = "openai/gpt-4o-mini"
    default_completion_tokens: int = 8
    prompt_price: float = 0.000001
    completion_price: float = 0.000002
    comment_every: int = 4
    provider_name: str = "FakeProvider"
    epoch: float = 0.0
    catalog_etag: bool = True
    models_reply: Reply | Hang | Drop | None = None
    report_cost: bool = True

    def add(
        self, secret: str, behaviour: Behaviour | None = None, *, alias: str | None = None
    ) -> Scenario:
        """Register ``secret`` (default behaviour ``Ok()``); returns ``self`` to chain."""
        if not secret:
            raise ValueError("Scenario.add: the secret must not be empty")
        self.keys[secret] = behaviour if behaviour is not None else Ok()
        if alias is not None:
            self.aliases[secret] = alias
        return self

    def alias(self, secret: str | None) -> str | None:
        """The name the log uses for ``secret`` (itself when it has no alias)."""
        if secret is None:
            return None
        return self.aliases.get(secret, secret)

    def secret_for(self, alias: str) -> str:
        """The secret registered under ``alias`` (KeyError if none)."""
        for secret, name in self.aliases.items():
            if name == alias:
                return secret
        if alias in self.keys:
            return alias
        raise KeyError(alias)

    # ------------------------------------------------------------------ built-ins

    @classmethod
    def healthy(cls, n: int = 4) -> Scenario:
        """``n`` healthy keys: ``healthy_secret(i)`` with alias ``key-i``."""
        sc = cls()
        for i in range(n):
            sc.add(healthy_secret(i), Ok(), alias=f"key-{i}")
        return sc

    @classmethod
    def open(cls) -> Scenario:
        """Any bearer secret is a healthy key (handy for load benchmarks)."""
        return cls(unknown=Ok())

    @classmethod
    def faulty(cls) -> Scenario:
        """``open`` plus four faulty keys (secrets in ``FAULTY_KEYS``): ``revoked``
        (401, probes too), ``no-credits`` (402), ``rate-limited`` (5 requests per
        60 s, then 429 with Retry-After) and ``hanging`` (never answers): the
        faults a load benchmark mixes into a healthy pool."""
        sc = cls(unknown=Ok())
        behaviours: dict[str, Behaviour] = {
            "revoked": Invalid(),
            "no-credits": Credits(0.0),
            "rate-limited": RateLimit(5, 60.0),
            "hanging": Hang(),
        }
        for alias, behaviour in behaviours.items():
            sc.add(FAULTY_KEYS[alias], behaviour, alias=alias)
        return sc

    @classmethod
    def demo(cls) -> Scenario:
        """A mixed pool (secrets in ``DEMO_KEYS``, aliases are the keys of it):

        - ``healthy-1``, ``healthy-2``, ``healthy-3``: always fine;
        - ``invalid``: 401 for everything;
        - ``low-credits``: $0.0001 of credits (about 15 default requests), then 402
          ``openrouter_credits``;
        - ``rate-limited``: 3 requests per 60 s window, then 429 with headers;
        - ``free-a``, ``free-b``: one account sharing a free-models-per-min
          limit of 5 requests per minute.
        """
        sc = cls()
        free_account = AccountRateLimit(limit=5)
        behaviours: dict[str, Behaviour] = {
            "healthy-1": Ok(),
            "healthy-2": Ok(),
            "healthy-3": Ok(),
            "invalid": Invalid(),
            "low-credits": Credits(0.0001),
            "rate-limited": RateLimit(3, 60.0),
            "free-a": free_account,
            "free-b": free_account,
        }
        for alias, behaviour in behaviours.items():
            sc.add(DEMO_KEYS[alias], behaviour, alias=alias)
        return sc


def healthy_secret(i: int) -> str:
    """The secret of key ``i`` in ``Scenario.healthy()``."""
    return f"sk-or-v1-fake-healthy-{i:04d}"


DEMO_KEYS: Mapping[str, str] = {
    alias: f"sk-or-v1-fake-demo-{alias}"
    for alias in (
        "healthy-1",
        "healthy-2",
        "healthy-3",
        "invalid",
        "low-credits",
        "rate-limited",
        "free-a",
        "free-b",
    )
}
"""Alias -> secret of the ``demo`` scenario (fake secrets, safe to print)."""

FAULTY_KEYS: Mapping[str, str] = {
    alias: f"sk-or-v1-fake-faulty-{alias}"
    for alias in ("revoked", "no-credits", "rate-limited", "hanging")
}
"""Alias -> secret of the ``faulty`` scenario's faulty keys (fake, safe to print)."""

SCENARIOS: Mapping[str, Callable[[], Scenario]] = {
    "demo": Scenario.demo,
    "faulty": Scenario.faulty,
    "healthy": Scenario.healthy,
    "open": Scenario.open,
}
"""Built-in scenarios by name (each call builds a fresh one)."""


def scenario(name: str) -> Scenario:
    """A fresh built-in scenario by name (``demo``, ``faulty``, ``healthy``, ``open``)."""
    try:
        factory = SCENARIOS[name]
    except KeyError:
        raise ValueError(
            f"unknown scenario {name!r}; built-in scenarios: {', '.join(SCENARIOS)}"
        ) from None
    return factory()
