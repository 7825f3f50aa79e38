"""Cost: each pricing field, the estimate, and thousands of answers of the fake
upstream priced by keyrotor as the upstream reports them."""

from __future__ import annotations

import random
from types import MappingProxyType
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyrotor.models import Pricing, estimate, estimate_tokens, parse_catalog, spend, usage_cost
from keyrotor.models.cost import count_images
from keyrotor.testing import FakeUpstream, Scenario
from keyrotor.testing.catalogs import realistic_models

PRICES = Pricing(prompt=1e-6, completion=2e-6)


def usage(prompt: int = 0, completion: int = 0, cached: int = 0, written: int = 0, **extra: Any):
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "prompt_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written},
        "completion_tokens_details": {"reasoning_tokens": extra.pop("reasoning", 0)},
        **extra,
    }


@pytest.mark.parametrize(
    ("pricing", "answer", "options", "cost"),
    [
        # prompt and completion, per token
        (PRICES, usage(1000, 500), {}, 1000 * 1e-6 + 500 * 2e-6),
        # request: once per answer
        (Pricing(prompt=1e-6, request=0.005), usage(100), {}, 100e-6 + 0.005),
        # image: per input image
        (Pricing(image=0.001445), usage(), {"images": 3}, 3 * 0.001445),
        # web_search: per search
        (Pricing(web_search=0.004), usage(), {"web_searches": 2}, 0.008),
        # internal_reasoning: reasoning tokens (part of completion) at their own price
        (
            Pricing(completion=2e-6, internal_reasoning=5e-6),
            usage(0, 100, reasoning=40),
            {},
            60 * 2e-6 + 40 * 5e-6,
        ),
        # without that price, reasoning tokens are plain completion tokens
        (PRICES, usage(0, 100, reasoning=40), {}, 100 * 2e-6),
        # input_cache_read: cached prompt tokens at the cache price
        (Pricing(prompt=1e-6, input_cache_read=1e-7), usage(1000, cached=600), {}, 400e-6 + 60e-6),
        # input_cache_write: prompt tokens written to the cache
        (
            Pricing(prompt=1e-6, input_cache_write=1.25e-6),
            usage(1000, written=200),
            {},
            800e-6 + 250e-6,
        ),
        # cache fields without cache prices: the prompt price
        (PRICES, usage(1000, cached=600, written=100), {}, 1000e-6),
    ],
)
def test_each_pricing_field(pricing: Pricing, answer: Any, options: Any, cost: float) -> None:
    assert usage_cost(pricing, answer, **options) == pytest.approx(cost, rel=1e-12)


def test_spend_prefers_the_reported_cost_and_knows_when_it_cannot_tell() -> None:
    assert spend(PRICES, {**usage(1000, 500), "cost": 0.25}) == 0.25
    assert spend(PRICES, usage(1000, 500)) == pytest.approx(0.002)
    assert spend(None, usage(1000, 500)) is None
    assert spend(Pricing(known=False), usage(10)) is None
    assert spend(Pricing(variable=True), usage(10)) is None
    assert spend(PRICES, {**usage(10), "cost": "0.3"}) == pytest.approx(10e-6)  # not a number
    assert usage_cost(PRICES, {"prompt_tokens": "9", "completion_tokens": -4}) == 0.0


def test_the_estimate_prices_the_prompt_and_the_ceiling() -> None:
    messages = [
        {"role": "system", "content": "x" * 40},
        {"role": "user", "content": [{"type": "text", "text": "y" * 7}, {"type": "image_url"}]},
    ]
    tokens = estimate_tokens(messages)
    assert tokens == 10 + 2 + 2 * 4 + 3  # 47 characters -> 12 tokens, framing, priming
    assert count_images(messages) == 1
    pricing = Pricing(prompt=1e-6, completion=2e-6, image=0.001, request=0.01)
    guess = estimate(pricing, messages, max_tokens=100)
    assert guess.prompt_tokens == tokens
    assert guess.low == pytest.approx(tokens * 1e-6 + 0.001 + 0.01)
    assert guess.high == pytest.approx(guess.low + 100 * 2e-6)
    assert estimate(pricing, messages).high is None
    assert estimate(Pricing(variable=True), messages).low is None
    # Any mapping counts as a message (parsed JSON gives dicts, a caller may not);
    # names and tool-call arguments count, things that are not messages do not.
    views = [MappingProxyType(message) for message in messages]
    assert (estimate_tokens(views), count_images(views)) == (tokens, 1)
    call = {"function": {"name": "f" * 4, "arguments": "a" * 8}}
    other = [{"role": "tool", "name": "n" * 4, "content": None, "tool_calls": [call]}, "text"]
    assert estimate_tokens(other) == 4 + 2 * 4 + 3  # 16 characters -> 4 tokens
    assert count_images([*other, *views]) == 1


@given(st.lists(st.text(max_size=200), max_size=8), st.text(min_size=1, max_size=50))
def test_more_text_never_estimates_fewer_tokens(texts: list[str], more: str) -> None:
    messages = [{"role": "user", "content": text} for text in texts]
    longer = [*messages, {"role": "user", "content": more}]
    assert estimate_tokens(longer) > estimate_tokens(messages)


def chat(rng: random.Random, model: Any) -> dict[str, Any]:
    words = " ".join(
        rng.choice(("alpha", "beta", "gamma", "delta")) for _ in range(rng.randrange(1, 400))
    )
    parts: list[dict[str, Any]] = [{"type": "text", "text": words}]
    if rng.random() < 0.3:
        parts[0]["cache_control"] = {"type": "ephemeral"}
    if "image" in model.input_modalities and rng.random() < 0.5:
        parts.extend(
            {"type": "image_url", "image_url": {"url": "data:,"}}
            for _ in range(rng.randrange(1, 3))
        )
    body: dict[str, Any] = {
        "model": model.id,
        "messages": [{"role": "user", "content": parts}],
        "max_tokens": rng.randrange(0, 300),
    }
    if rng.random() < 0.5:
        body["reasoning"] = {"effort": "low"}
    return body


def test_thousands_of_answers_priced_as_the_upstream_reports_them() -> None:
    """Every answer's computed cost is the fake's ``usage.cost`` to the last
    cent (in fact to 1e-9 USD), and the total within 0.1 %."""
    models = realistic_models()
    catalog = parse_catalog({"data": [m.to_json() for m in models]})
    priced = [m for m in models if m.prompt != "-1"]
    rng = random.Random(7)
    scenario = Scenario(models=models).add("sk-or-v1-cost-test-00000000", alias="k")
    reported = computed = 0.0
    fields_seen: set[str] = set()
    with FakeUpstream.running_in_thread(scenario) as server:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            auth = {"Authorization": "Bearer sk-or-v1-cost-test-00000000"}
            for _ in range(2000):
                model = rng.choice(priced)
                body = chat(rng, model)
                answer = http.post("/chat/completions", json=body, headers=auth).json()
                used = answer["usage"]
                info = catalog.get(model.id)
                assert info is not None
                mine = usage_cost(info.pricing, used, images=count_images(body["messages"]))
                assert mine is not None
                assert abs(mine - used["cost"]) < 1e-9, (model.id, used)
                reported += used["cost"]
                computed += mine
                if used["prompt_tokens_details"]["cached_tokens"]:
                    fields_seen.add("input_cache_read")
                if used["completion_tokens_details"]["reasoning_tokens"]:
                    fields_seen.add("internal_reasoning")
                if count_images(body["messages"]) and info.pricing.image:
                    fields_seen.add("image")
                if info.pricing.request:
                    fields_seen.add("request")
    assert computed == pytest.approx(reported, rel=1e-3)
    assert fields_seen == {"input_cache_read", "internal_reasoning", "image", "request"}
