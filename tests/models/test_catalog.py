"""The catalog: parsed from a /models document, every field, bad input named."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyrotor.models import PRICE_FIELDS, CatalogError, parse_catalog
from keyrotor.testing.catalogs import realistic_models


def document(models: Any = None) -> dict[str, Any]:
    models = realistic_models() if models is None else models
    return {"data": [m.to_json() for m in models]}


def test_a_realistic_catalog_parses_whole_with_every_field() -> None:
    catalog = parse_catalog(json.dumps(document()).encode(), etag='W/"1"', fetched_at=5.0)
    assert len(catalog) == 320 and catalog.problems == ()
    assert (catalog.provider, catalog.etag, catalog.fetched_at) == ("openrouter", 'W/"1"', 5.0)
    by_id = {m.id: m for m in realistic_models()}
    for model in catalog.models:
        source = by_id[model.id]
        assert model.context_length == source.context_length
        assert model.max_completion_tokens == source.max_completion_tokens
        assert model.supported_parameters == frozenset(source.supported_parameters)
        assert model.input_modalities == source.input_modalities
        if source.prompt != "-1":
            assert model.pricing.prompt == float(source.prompt)
            assert model.pricing.completion == float(source.completion)
            assert model.pricing.request == float(source.request)
            assert model.pricing.image == float(source.image)
            assert model.pricing.web_search == float(source.web_search)
        for name in ("internal_reasoning", "input_cache_read", "input_cache_write"):
            value = getattr(source, name)
            assert getattr(model.pricing, name) == (None if value is None else float(value))
    # The catalog exercises every pricing field, free models and the variable router.
    for name in PRICE_FIELDS:
        assert any(getattr(m.pricing, name) for m in catalog.models), name
    free = [m.id for m in catalog.models if m.free]
    assert free and all(model_id.endswith(":free") for model_id in free)
    auto = catalog.get("openrouter/auto")
    assert auto is not None and auto.pricing.variable and not auto.free
    assert any(m.expiration_date for m in catalog.models)
    assert "openrouter/auto" in catalog and "nobody/nothing" not in catalog


def test_a_revision_differs_and_round_trips_through_the_state_form() -> None:
    first = parse_catalog(document())
    later = parse_catalog(document(realistic_models(revision=1)))
    assert len(later) == 320
    gone = set(first.by_id) - set(later.by_id)
    assert gone and set(later.by_id) - set(first.by_id)
    repriced = [
        m.id for m in later.models if m.id in first.by_id and m.pricing != first.by_id[m.id].pricing
    ]
    assert repriced
    again = parse_catalog(json.dumps(later.to_json()), etag=later.etag)
    assert again.models == later.models


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b"<html>", "not JSON"),
        (b"[1, 2]", "a list, not an object"),
        (b'{"models": []}', 'no "data" list'),
        (b'{"data": {}}', 'no "data" list'),
    ],
)
def test_a_document_that_is_no_catalog_raises_one_clear_error(
    document: bytes, message: str
) -> None:
    with pytest.raises(CatalogError, match=message):
        parse_catalog(document)


def priced(**pricing: Any) -> dict[str, Any]:
    return {"id": "a/b", "pricing": {"prompt": "0.000001", "completion": "0.000002", **pricing}}


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"id": "a/b"}, "data[0].pricing: missing"),
        (priced(prompt="-0.5"), "data[0].pricing.prompt: expected a price of 0 or more"),
        (priced(completion="cheap"), "data[0].pricing.completion: expected a decimal string"),
        (priced(image="nan"), "data[0].pricing.image: expected a price of 0 or more"),
        (priced(request=True), "data[0].pricing.request: expected a decimal string"),
        ({"id": "a/b", "pricing": {"prompt": "0"}}, "data[0].pricing.completion: missing"),
        ({"id": "", "pricing": {}}, "data[0].id: expected a model id"),
        ("a/b", "data[0]: a model must be an object"),
        ({**priced(), "context_length": -5}, "data[0].context_length: expected a whole number"),
    ],
)
def test_a_bad_model_is_left_out_and_named(entry: Any, problem: str) -> None:
    catalog = parse_catalog({"data": [entry, {**priced(), "id": "good/one"}]})
    assert [m.id for m in catalog.models] == ["good/one"]
    assert len(catalog.problems) == 1 and catalog.problems[0].startswith(problem)


def test_an_openai_compatible_catalog_has_unknown_prices() -> None:
    catalog = parse_catalog({"data": [{"id": "gpt-4o", "object": "model"}]}, "openai", priced=False)
    model = catalog.models[0]
    assert (model.provider, model.name, model.pricing.known, model.free) == (
        "openai",
        "gpt-4o",
        False,
        False,
    )


def test_an_id_given_twice_keeps_the_first() -> None:
    catalog = parse_catalog({"data": [priced(), {**priced(prompt="0.5"), "id": "a/b"}]})
    assert len(catalog) == 1 and catalog.models[0].pricing.prompt == 0.000001
    assert catalog.problems == ("data[1].id: 'a/b' given twice (the first kept)",)


@given(st.decimals(min_value=0, max_value=1, places=12, allow_nan=False))
def test_a_decimal_price_string_parses_to_its_value(price: Decimal) -> None:
    text = format(price, "f")
    model = parse_catalog({"data": [priced(prompt=text)]}).models[0]
    assert model.pricing.prompt == float(text)
