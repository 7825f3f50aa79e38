"""Realistic model catalogs for the fake upstream, built by the project.

``realistic_models()`` is a deterministic catalog of 320 models in the shape
OpenRouter lists them: free and paid, short and long context, text and vision,
with every pricing field in use somewhere (per-request, image and web-search
charges, reasoning and cache prices), a few models due to expire, and one
variable-priced router (``"-1"``). ``realistic_models(revision=1)`` is the
same catalog a while later: some models gone, some new, some repriced (for
refresh tests). Serve one with ``Scenario(models=realistic_models())``.
"""

from __future__ import annotations

import random
from decimal import Decimal

import attrs

from .scenarios import Model

__all__ = ["realistic_models"]

_VENDORS = (
    ("openai", "OpenAI", ("gpt-4o", "gpt-4.1", "o3", "o4", "gpt-5")),
    ("anthropic", "Anthropic", ("claude-3.5-haiku", "claude-sonnet-4", "claude-opus-4")),
    ("google", "Google", ("gemini-2.0-flash", "gemini-2.5-pro", "gemma-3")),
    ("meta-llama", "Meta", ("llama-3.1", "llama-3.3", "llama-4-scout", "llama-4-maverick")),
    ("mistralai", "Mistral", ("mistral-small", "mistral-medium", "codestral", "ministral")),
    ("qwen", "Qwen", ("qwen-2.5", "qwen3", "qwen3-coder", "qwq")),
    ("deepseek", "DeepSeek", ("deepseek-chat", "deepseek-r1", "deepseek-v3")),
    ("x-ai", "xAI", ("grok-3", "grok-4")),
    ("cohere", "Cohere", ("command-r", "command-a")),
    ("microsoft", "Microsoft", ("phi-4", "wizardlm-2")),
    ("nousresearch", "Nous", ("hermes-3", "deephermes")),
    ("amazon", "Amazon", ("nova-lite", "nova-pro")),
)
_SIZES = ("mini", "small", "8b", "32b", "70b", "large", "turbo", "preview")
_CONTEXTS = (4_096, 8_192, 16_384, 32_768, 65_536, 128_000, 131_072, 200_000, 1_000_000)
_EXTRA_PARAMETERS = (
    "tools",
    "tool_choice",
    "response_format",
    "structured_outputs",
    "seed",
    "top_p",
    "frequency_penalty",
    "presence_penalty",
    "logprobs",
)
_BASE_PARAMETERS = ("max_tokens", "temperature", "stream", "stop")


def _usd(per_million: float) -> str:
    """USD per million tokens as OpenRouter's per-token decimal string."""
    value = (Decimal(str(round(per_million, 4))) / Decimal(1_000_000)).normalize()
    return format(value, "f")


def _model(rng: random.Random, vendor: str, label: str, family: str, size: str) -> Model:
    prompt = rng.choice((0.02, 0.05, 0.1, 0.15, 0.25, 0.4, 0.8, 1.1, 2.5, 3.0, 5.0, 15.0))
    completion = prompt * rng.choice((1, 2, 3, 4, 5))
    reasoning = (
        "r1" in family
        or family.startswith(("o3", "o4", "qwq", "deephermes"))
        or (rng.random() < 0.15)
    )
    vision = rng.random() < 0.35
    parameters = _BASE_PARAMETERS + tuple(p for p in _EXTRA_PARAMETERS if rng.random() < 0.5)
    if reasoning:
        parameters += ("reasoning", "include_reasoning")
    context = rng.choice(_CONTEXTS)
    cached = rng.random() < 0.3
    return Model(
        id=f"{vendor}/{family}-{size}",
        name=f"{label}: {family.replace('-', ' ').title()} {size.upper()}",
        prompt=_usd(prompt),
        completion=_usd(completion),
        context_length=context,
        modality="text+image->text" if vision else "text->text",
        request=rng.choice(("0",) * 8 + ("0.0001", "0.005")),
        image=_usd(rng.choice((1445.0, 765.0, 2400.0))) if vision else "0",
        web_search=rng.choice(("0",) * 6 + ("0.004", "0.01")),
        internal_reasoning=_usd(completion * rng.choice((1, 1.5))) if reasoning else None,
        input_cache_read=_usd(prompt * 0.1) if cached else None,
        input_cache_write=_usd(prompt * 1.25) if cached and rng.random() < 0.5 else None,
        max_completion_tokens=min(context, rng.choice((4_096, 8_192, 16_384, 32_768, 65_536))),
        supported_parameters=parameters,
        input_modalities=("text", "image") if vision else ("text",),
        created=1_690_000_000 + rng.randrange(0, 40_000_000),
        expiration_date="2027-01-31" if rng.random() < 0.03 else None,
    )


def _free(model: Model) -> Model:
    """The ``:free`` variant OpenRouter lists beside some models."""
    return Model(
        id=f"{model.id}:free",
        name=f"{model.name} (free)",
        prompt="0",
        completion="0",
        context_length=model.context_length,
        modality=model.modality,
        max_completion_tokens=model.max_completion_tokens,
        supported_parameters=model.supported_parameters,
        input_modalities=model.input_modalities,
        created=model.created,
    )


def realistic_models(revision: int = 0, size: int = 320) -> tuple[Model, ...]:
    """``size`` models (at least 2) as OpenRouter would list them; ``revision``
    1, 2 ...: the same catalog later (about 1 in 30 gone, as many new ones, 1
    in 15 repriced), ids otherwise stable."""
    if size < 2:
        raise ValueError("realistic_models: size must be at least 2")
    rng = random.Random(20_261_205)
    models: list[Model] = [
        Model("openrouter/auto", "Auto Router", "-1", "-1", context_length=2_000_000)
    ]
    index = 0
    while len(models) < size:
        vendor, label, families = _VENDORS[index % len(_VENDORS)]
        family = families[(index // len(_VENDORS)) % len(families)]
        variant = _SIZES[(index // (len(_VENDORS) * 3)) % len(_SIZES)]
        generation = index // (len(_VENDORS) * 3 * len(_SIZES))
        suffix = variant if generation == 0 else f"{variant}-v{generation + 1}"
        model = _model(rng, vendor, label, family, suffix)
        index += 1
        if any(m.id == model.id for m in models[-40:]):
            continue
        models.append(model)
        if rng.random() < 0.12 and len(models) < size:
            models.append(_free(model))
    for step in range(1, revision + 1):
        later = random.Random(step)
        kept = [m for m in models if m.id == "openrouter/auto" or later.random() >= 1 / 30]
        repriced = [
            _repriced(m, later) if later.random() < 1 / 15 and m.prompt not in ("0", "-1") else m
            for m in kept
        ]
        new = [
            _model(later, "newlab", "New Lab", f"nova-{step}", f"{n}b")
            for n in range(size - len(repriced))
        ]
        models = repriced + new
    return tuple(models[:size])


def _repriced(model: Model, rng: random.Random) -> Model:
    factor = Decimal(rng.choice(("0.5", "0.8", "1.25", "2")))
    return attrs.evolve(
        model,
        prompt=format((Decimal(model.prompt) * factor).normalize(), "f"),
        completion=format((Decimal(model.completion) * factor).normalize(), "f"),
    )
