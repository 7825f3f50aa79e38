"""``decide`` after its per-request work moved into ``Candidates`` (issue 17):
the same decision as the way before, for any catalog, route, need and state."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from keyrotor.models.catalog import UNKNOWN_PRICING, Catalog, ModelInfo, Pricing
from keyrotor.models.routing import (
    STRATEGIES,
    Candidates,
    Decision,
    Filter,
    Need,
    Route,
    Skip,
    _cost,
    _fits,
    _problem,
    _rank,
    candidates,
    decide,
)

IDS = [f"v/m{i}" for i in range(8)] + ["v/m0:free", "v/m1:free"]
PRICES = st.sampled_from([0.0, 1e-7, 1.1e-6, 2.2e-6, 3.3e-6, 1e-5, 0.5])
PARAMETERS = st.frozensets(st.sampled_from(["tools", "seed", "stop", "response_format"]))


def reference(
    route: Route,
    catalog: Catalog,
    need: Need,
    latency: dict[str, float] | None = None,
    *,
    unavailable: dict[str, Skip] | None = None,
    no_free: Skip | None = None,
    found: Any = None,
) -> Decision:
    """``decide`` as it was before (keyrotor e5c3466): every candidate checked
    with ``_fits``, every strategy but ``ordered`` ranked by ``_rank``."""
    latency = latency or {}
    unavailable = unavailable or {}
    models, missing = found if found is not None else candidates(route, catalog)
    reasons = list(missing)
    fitting = []
    waits: list[float] = []
    too_long = unfit = 0
    context = need.context
    for model in models:
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
            if None not in back:
                waits.append(max(b for b in back if b is not None))
            continue
        fitting.append(model)
    ranked, costs = _rank(route, fitting, need, latency)
    if not ranked:
        kind, problem = _problem(route, models, need, too_long, unfit)
        wait = min(waits) if waits else None
        return Decision(route.name, None, (), tuple(reasons), None, None, 0.0, problem, kind, wait)
    chosen = ranked[0]
    cost = _cost(chosen, need) if costs is None else costs[chosen.id]
    seen = latency.get(chosen.id)
    confidence = (0.25, 0.5, 1.0)[(cost is not None) + (seen is not None)]
    return Decision(
        route.name,
        chosen.id,
        tuple([m.id for m in ranked[1:]]),
        tuple(reasons),
        cost,
        seen,
        confidence,
    )


@st.composite
def pricings(draw: st.DrawFn) -> Pricing:
    kind = draw(st.sampled_from(["priced", "priced", "priced", "free", "unknown", "variable"]))
    if kind == "unknown":
        return UNKNOWN_PRICING
    if kind == "variable":
        return Pricing(-1.0, -1.0, variable=True)
    if kind == "free":
        return Pricing()
    odd = st.sampled_from([math.inf, math.nan, -1e-6])  # prices no catalog sends: not in order
    prompt, completion = draw(PRICES), draw(PRICES | odd if draw(st.booleans()) else PRICES)
    return Pricing(prompt, completion, draw(st.sampled_from([0.0, 0.0, 0.001])), draw(PRICES))


@st.composite
def models(draw: st.DrawFn, model_id: str) -> ModelInfo:
    pricing = Pricing() if model_id.endswith(":free") else draw(pricings())
    return ModelInfo(
        id=model_id,
        name=model_id,
        provider="main",
        context_length=draw(st.sampled_from([None, 1_000, 8_192, 32_000, 128_000])),
        max_completion_tokens=draw(st.sampled_from([None, 100, 4_096])),
        pricing=pricing,
        supported_parameters=draw(PARAMETERS),
        input_modalities=draw(st.sampled_from([(), ("text",), ("text", "image")])),
        created=None,
        expiration_date=None,
        raw={},
    )


@st.composite
def catalogs(draw: st.DrawFn) -> Catalog:
    ids = draw(st.lists(st.sampled_from(IDS), unique=True, max_size=len(IDS)))
    return Catalog("main", tuple(draw(models(i)) for i in ids))


FILTERS = st.builds(
    Filter,
    free=st.booleans(),
    min_context=st.sampled_from([None, 8_000, 100_000]),
    max_price=st.sampled_from([None, 3.3, 100.0]),
    parameters=st.frozensets(st.sampled_from(["tools", "seed"]), max_size=1),
    modalities=st.sampled_from([frozenset(), frozenset({"image"})]),
)
ROUTES = st.builds(
    Route,
    name=st.just("r"),
    candidates=st.lists(st.sampled_from([*IDS, "v/absent"]) | FILTERS, min_size=1, max_size=6),
    strategy=st.sampled_from(STRATEGIES),
    weight=st.sampled_from([0.0, 0.5, 1.0]),
)
NEEDS = st.builds(
    Need,
    prompt_tokens=st.sampled_from([-5, 0, 3, 900, 7_000, 31_000, 200_000]),
    max_tokens=st.sampled_from([None, None, -1, 0, 50, 100, 4_000, 40_000]),
    parameters=PARAMETERS,
    images=st.sampled_from([0, 0, 1, 3]),
)
SKIPS = st.builds(Skip, st.just("passed over"), st.sampled_from([None, 5.0, 60.0]))


@given(
    catalogs(),
    ROUTES,
    NEEDS,
    st.dictionaries(st.sampled_from(IDS), st.sampled_from([50.0, 120.5, 900.0]), max_size=6),
    st.dictionaries(st.sampled_from(IDS), SKIPS, max_size=3),
    st.none() | SKIPS,
    st.sampled_from(["none", "kept", "plain tuple"]),
)
@settings(max_examples=300)
@example(
    Catalog(
        "main",
        (
            ModelInfo(
                "v/a",
                "a",
                "main",
                8_192,
                None,
                Pricing(2e-6, 2e-6),
                frozenset(),
                (),
                None,
                None,
                {},
            ),
            ModelInfo(
                "v/b",
                "b",
                "main",
                8_192,
                None,
                Pricing(1e-6, 3e-6),
                frozenset(),
                (),
                None,
                None,
                {},
            ),
        ),
    ),
    Route("r", ("v/a", "v/b"), "cheapest"),
    Need(10),
    {},
    {},
    None,
    "kept",
)  # prices that cross: the order depends on the need
def test_decide_decides_as_before(
    catalog: Catalog,
    route: Route,
    need: Need,
    latency: dict[str, float],
    unavailable: dict[str, Skip],
    no_free: Skip | None,
    kept: str,
) -> None:
    found: Any = None
    if kept != "none":
        found = candidates(route, catalog)
        if kept == "plain tuple":
            found = tuple(found)
    expected = reference(
        route, catalog, need, latency, unavailable=unavailable, no_free=no_free, found=found
    )
    decision = decide(
        route, catalog, need, latency, unavailable=unavailable, no_free=no_free, found=found
    )
    assert repr(decision) == repr(expected)  # repr: NaN costs compare equal too


@given(catalogs(), ROUTES, NEEDS)
@settings(max_examples=150)
def test_all_fit_says_what_fits_says_of_every_model(
    catalog: Catalog, route: Route, need: Need
) -> None:
    found = candidates(route, catalog)
    every = all(_fits(m, need, need.context) is None for m in found[0])
    assert found.all_fit(need, need.context) is every


def test_candidates_are_still_the_pair_they_were() -> None:
    model = ModelInfo("v/a", "a", "main", 1_000, None, Pricing(), frozenset(), (), None, None, {})
    found = candidates(Route("r", ("v/a", "v/b")), Catalog("main", (model,)))
    assert isinstance(found, Candidates)
    assert found == ((model,), ("skipped v/b: not in the catalog",))
    models, missing = found
    assert models == (model,) and missing == found[1] and len(found) == 2
