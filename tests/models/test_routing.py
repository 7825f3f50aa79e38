"""The pure router: routes, filters, context fit, strategies (issue 14, first part)."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyrotor.models import parse_catalog
from keyrotor.models.routing import (
    COMPLETION_ALLOWANCE,
    EMPTY,
    FREE_ROUTE,
    STRATEGIES,
    TOO_LONG,
    UNAVAILABLE,
    UNFIT,
    Filter,
    Need,
    Route,
    Skip,
    decide,
    model_failure,
    need_of,
    route_from_json,
    route_to_json,
)
from keyrotor.testing.catalogs import realistic_models

CATALOG = parse_catalog({"data": [m.to_json() for m in realistic_models()]})
FREE = [m for m in CATALOG.models if m.free]


def test_the_free_route_takes_free_models_that_fit_and_says_why_others_were_left() -> None:
    need = Need(prompt_tokens=100_000, max_tokens=4_000)
    decision = decide(FREE_ROUTE, CATALOG, need)
    chosen = [decision.model, *decision.fallbacks]
    assert chosen and all(CATALOG.get(m).free for m in chosen)  # type: ignore[union-attr]
    assert all((CATALOG.get(m).context_length or 0) >= 104_000 for m in chosen)  # type: ignore[union-attr]
    small = [m for m in FREE if (m.context_length or 0) < 104_000]
    assert small  # the catalog has free models too small for this request
    for model in small:
        line = f"skipped {model.id}: context {model.context_length:,} < 104,000 needed"
        assert line in decision.reasons
    assert decision.confidence == 0.5  # a free price is known, no latency yet


def test_fastest_measures_every_model_once_then_takes_the_fastest() -> None:
    need = Need(prompt_tokens=10)
    first = decide(FREE_ROUTE, CATALOG, need)
    every = [first.model, *first.fallbacks]
    latency = {model: 100.0 + i for i, model in enumerate(every)}
    del latency[every[-1]]  # one not measured yet: it goes first
    assert decide(FREE_ROUTE, CATALOG, need, latency).model == every[-1]
    latency[every[-1]] = 500.0
    decision = decide(FREE_ROUTE, CATALOG, need, latency)
    assert decision.model == every[0] and decision.estimated_latency_ms == 100.0
    assert decision.confidence == 1.0


def test_ordered_cheapest_and_model_ids_not_in_the_catalog() -> None:
    paid = [m for m in CATALOG.models if m.pricing.known and not m.pricing.variable][:6]
    ids = [m.id for m in paid]
    need = Need(prompt_tokens=1_000, max_tokens=100)
    ordered = decide(Route("r", ["nobody/nothing", *ids], "ordered"), CATALOG, need)
    assert [ordered.model, *ordered.fallbacks] == ids
    assert ordered.reasons == ("skipped nobody/nothing: not in the catalog",)
    cheapest = decide(Route("r", ids, "cheapest"), CATALOG, need)
    costs = [
        1_000 * m.pricing.prompt + 100 * m.pricing.completion + m.pricing.request for m in paid
    ]
    assert [cheapest.model, *cheapest.fallbacks] == [
        m.id for _, m in sorted(zip(costs, paid, strict=True), key=lambda pair: pair[0])
    ]
    assert cheapest.estimated_cost == pytest.approx(min(costs))


def test_a_request_that_fits_no_candidate_gets_no_model_and_every_reason() -> None:
    decision = decide(FREE_ROUTE, CATALOG, Need(prompt_tokens=50_000_000))
    assert decision.model is None and decision.confidence == 0.0
    assert len(decision.reasons) == len(FREE)
    with pytest.raises(ValueError, match="strategy must be one of"):
        Route("r", ["x"], "random")


def test_the_need_of_a_request() -> None:
    need = need_of(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url"}, {"type": "text", "text": "abcd" * 10}],
                }
            ],
            "max_tokens": 50,
            "tools": [{"type": "function"}],
            "stream": True,
        }
    )
    assert (need.max_tokens, need.parameters, need.images) == (50, {"tools"}, 1)
    assert need.prompt_tokens == 10 + 4 + 3 and need.context == 67
    assert need_of({"messages": "no"}).max_tokens is None
    # a parameter set to anything but null or false is asked for: a seed of 0 too
    asked = need_of({"seed": 0, "top_logprobs": 0, "stop": [], "tools": None, "logprobs": False})
    assert asked.parameters == {"seed", "top_logprobs", "stop"}
    assert need_of({"messages": [], "temperature": 0}).parameters == frozenset()
    # a null max_completion_tokens leaves max_tokens to say (json.loads gives None for both)
    assert need_of({"max_completion_tokens": None, "max_tokens": 70}).max_tokens == 70


@settings(max_examples=150, deadline=None)
@given(
    prompt=st.integers(0, 300_000),
    max_tokens=st.one_of(st.none(), st.integers(1, 100_000)),
    parameters=st.sets(st.sampled_from(["tools", "response_format", "seed"])),
    images=st.integers(0, 2),
    strategy=st.sampled_from(STRATEGIES),
    free=st.booleans(),
    min_context=st.one_of(st.none(), st.integers(0, 1_000_000)),
    max_price=st.one_of(st.none(), st.floats(0, 100)),
    latency=st.dictionaries(
        st.sampled_from([m.id for m in CATALOG.models[:40]]), st.floats(1, 5000)
    ),
)
def test_a_chosen_model_always_fits_the_request_and_the_filters(**drawn: Any) -> None:
    need = Need(drawn["prompt"], drawn["max_tokens"], drawn["parameters"], drawn["images"])
    route_filter = Filter(
        free=drawn["free"], min_context=drawn["min_context"], max_price=drawn["max_price"]
    )
    route = Route("r", [route_filter], drawn["strategy"])
    decision = decide(route, CATALOG, need, drawn["latency"])
    assert decision == decide(route, CATALOG, need, dict(drawn["latency"]))  # deterministic
    if decision.model is not None:  # the chosen model's own estimate, whatever ranked it
        chosen = CATALOG.get(decision.model)
        assert chosen is not None
        pricing = chosen.pricing
        completion = COMPLETION_ALLOWANCE if need.max_tokens is None else need.max_tokens
        expected = (
            None
            if not pricing.known or pricing.variable
            else need.prompt_tokens * pricing.prompt
            + completion * pricing.completion
            + pricing.request
            + need.images * pricing.image
        )
        assert decision.estimated_cost == expected
    for model_id in [decision.model, *decision.fallbacks] if decision.model else []:
        model = CATALOG.get(model_id)
        assert model is not None and route_filter.rejects(model) is None
        assert model.context_length is None or model.context_length >= need.context
        assert not need.images or not model.input_modalities or "image" in model.input_modalities
        assert not model.supported_parameters or model.supports(need.parameters)


def test_the_docs_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    import pathlib

    doc = (pathlib.Path(__file__).parents[2] / "docs" / "routing.md").read_text("utf-8")
    (code,) = re.findall(r"```python\n(.*?)```", doc, re.S)
    exec(compile(code, "docs/routing.md", "exec"), {})
    first, second = capsys.readouterr().out.splitlines()
    assert first == "True True"
    assert re.fullmatch(r"skipped \S+:free: context [\d,]+ < 104,007 needed", second)


def test_a_request_too_long_for_every_candidate_names_the_largest_context() -> None:
    decision = decide(FREE_ROUTE, CATALOG, Need(prompt_tokens=50_000_000))
    largest = max(FREE, key=lambda m: m.context_length or 0)
    assert decision.problem_kind == TOO_LONG
    assert decision.problem is not None
    assert f"the largest context is {largest.context_length:,} ({largest.id})" in decision.problem


def test_no_candidate_in_the_catalog_or_none_supporting_the_request() -> None:
    empty = decide(Route("r", ["nobody/a", Filter(min_context=10**9)]), CATALOG, Need(10))
    assert empty.problem_kind == EMPTY and empty.reasons == (
        "skipped nobody/a: not in the catalog",
    )
    plain = [
        m
        for m in CATALOG.models
        if m.supported_parameters and "tools" not in m.supported_parameters
    ]
    unfit = decide(Route("r", [plain[0].id]), CATALOG, Need(10, parameters={"tools"}))
    assert unfit.problem_kind == UNFIT and unfit.reasons == (f"skipped {plain[0].id}: lacks tools",)


def test_models_passed_over_for_now_are_skipped_with_the_earliest_return() -> None:
    first = decide(FREE_ROUTE, CATALOG, Need(10))
    every = [first.model, *first.fallbacks]
    down = {every[0]: Skip("cooling for 30 s (503 no instances)", 30.0)}
    decision = decide(FREE_ROUTE, CATALOG, Need(10), unavailable=down)
    assert decision.model == every[1]
    assert f"skipped {every[0]}: cooling for 30 s (503 no instances)" in decision.reasons
    spent = Skip("free quota of every account spent until 00:00 UTC", 3600.0)
    none = decide(FREE_ROUTE, CATALOG, Need(10), unavailable=down, no_free=spent)
    assert none.model is None and none.problem_kind == UNAVAILABLE
    assert none.retry_after == 3600.0  # free models are back at midnight, cooling or not
    assert f"skipped {every[0]}: free quota of every account spent until 00:00 UTC" in none.reasons
    paid = next(m for m in CATALOG.models if not m.free and m.pricing.known)
    mixed = decide(
        Route("r", [FREE_ROUTE.candidates[0], paid.id]), CATALOG, Need(10), no_free=spent
    )
    assert mixed.model == paid.id  # free quota spent: the route's paid candidate


def test_what_an_answer_says_about_the_model() -> None:
    def body(code: int, message: str, **metadata: Any) -> bytes:
        return json.dumps(
            {"error": {"code": code, "message": message, "metadata": metadata}}
        ).encode()

    assert model_failure(404, None, body(404, "No endpoints found for x/y.")) == (
        "unavailable",
        None,
    )
    assert model_failure(
        503, {"retry-after": "7"}, body(503, "No instances available for x/y")
    ) == (
        "unavailable",
        7.0,
    )
    shared = body(429, "Provider returned error", limit_source="upstream_provider_shared_pool")
    assert model_failure(429, None, shared)[0] == "busy"  # type: ignore[index]
    free = body(429, "Rate limit exceeded: free-models-per-min. ")
    assert model_failure(429, None, free)[0] == "free_limit"  # type: ignore[index]
    context = body(400, "This endpoint's maximum context length is 8192 tokens.")
    assert model_failure(400, None, context) == ("context", None)
    overloaded = body(503, "Provider returned error", error_type="provider_overloaded")
    assert model_failure(503, None, overloaded) == ("fault", None)
    assert model_failure(502, {"retry-after": "3"}, body(502, "down"))[0] == "fault"  # type: ignore[index]
    for status, text in ((400, "Invalid JSON"), (401, "No auth credentials found"), (200, "")):
        assert model_failure(status, None, body(status, text)) is None
    assert model_failure(429, None, body(429, "Rate limit exceeded: limit_rpm/x")) is None


def test_routes_read_from_json_and_written_back() -> None:
    data = {
        "name": "free-fast",
        "candidates": [
            "openai/gpt-4o-mini",
            {"free": True, "min_context": 32000, "parameters": ["tools"]},
        ],
        "strategy": "balanced",
        "weight": 0.25,
    }
    route = route_from_json(data)
    assert route.candidates[1] == Filter(free=True, min_context=32000, parameters={"tools"})
    assert route_to_json(route) == data
    assert route_from_json(route_to_json(route)) == route
    bad = [
        ({**data, "name": "a/b"}, "route name 'a/b' must be"),
        ({**data, "candidates": []}, "needs candidates"),
        ({**data, "candidates": [3]}, "candidate #1 must be a model id or a filter table"),
        ({**data, "candidates": [{"cheap": True}]}, "unknown filter 'cheap'"),
        ({**data, "candidates": [{"min_context": "big"}]}, "min_context has the wrong type"),
        ({**data, "candidates": [{"free": 1}]}, "free has the wrong type"),
        ({**data, "strategy": "random"}, "strategy must be one of ordered, cheapest"),
        ({**data, "weight": 2}, "weight must be a number from 0 to 1"),
        ({**data, "colour": "red"}, "unknown route field 'colour'"),
    ]
    for table, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            route_from_json(table)


def test_a_model_priced_exactly_at_max_price_matches() -> None:
    # The limit is "at most": $1.1 + $2.2 a million is 3.3000000000000003 in floats.
    checked = 0
    for model in CATALOG.models:
        pricing = model.raw.get("pricing", {})
        if not model.pricing.known or model.pricing.variable or model.pricing.free:
            continue
        exact = (Decimal(pricing["prompt"]) + Decimal(pricing["completion"])) * 1_000_000
        assert Filter(max_price=float(exact)).rejects(model) is None, (model.id, exact)
        assert Filter(max_price=float(exact) * 0.999).rejects(model) is not None
        checked += 1
    assert checked > 100


def test_models_whose_catalog_lists_no_modalities_take_images() -> None:
    # OpenAI's GET /models lists neither modalities nor parameters: unknown, not "text only".
    listed = {"object": "list", "data": [{"id": "gpt-4o", "object": "model", "created": 1}]}
    catalog = parse_catalog(listed, "openai", priced=False)
    assert catalog.get("gpt-4o").input_modalities == ()  # type: ignore[union-attr]
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    request = {"messages": [{"role": "user", "content": [{"type": "text", "text": "?"}, image]}]}
    decision = decide(Route("r", ["gpt-4o"]), catalog, need_of(request))
    assert decision.model == "gpt-4o", decision.reasons
    text_only = next(m for m in CATALOG.models if "image" not in m.input_modalities)
    refused = decide(Route("r", [text_only.id]), CATALOG, need_of(request))
    assert refused.model is None and f"skipped {text_only.id}: no image input" in refused.reasons
