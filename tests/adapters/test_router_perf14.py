"""The routed path made cheaper (issue 17): the model's span found without
``member`` where the body is written the usual way (the same span as before),
and what the router keeps per route and catalog (``Candidates``) never outliving
what it was made of, nor standing in for what changes between requests."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from keyrotor.adapters.config import RoutingOptions
from keyrotor.adapters.proxy.catalog import Catalogs, CatalogService
from keyrotor.adapters.proxy.model_health import ModelHealth
from keyrotor.adapters.proxy.providers import MODEL_MEMBER, model_string
from keyrotor.adapters.proxy.router import Plan, Router, _model_span
from keyrotor.models.catalog import Catalog, ModelInfo, Pricing
from keyrotor.models.routing import FREE_ROUTE, Filter, Need, Route
from keyrotor.transports.json_body import Unsure, member
from tests.transports.test_json_body import KEYS, VALUES


def reference_span(body: bytes, model: object) -> tuple[bytes, int, int] | None:
    """``_model_span`` as it was before (keyrotor e5c3466): always ``member``."""
    try:
        found = member(body, b'"model"', MODEL_MEMBER)
    except Unsure:
        return None
    if found is None or model_string(found) != model:
        return None
    start, end = found.span(1)
    return body, start + 1, end - 1


MODELS = st.sampled_from(["bench", "model", "free", "a/b", 'q"uote', "ünï", "", "be"])
SEPARATORS = st.sampled_from([(",", ":"), (", ", ": "), (",", ": "), (" ,", " : ")])


@st.composite
def written(draw: st.DrawFn) -> tuple[bytes, Any]:
    """A body with ``model`` members anywhere (first, last, nested, repeated,
    a key spelled with an escape), in any spacing, and the model it names."""
    comma, colon = draw(SEPARATORS)
    members: list[tuple[str, Any]] = draw(st.lists(st.tuples(KEYS, VALUES), max_size=3))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(["model", "model", "mod\\u0065l", "messages"]))
        value = draw(MODELS | VALUES | st.just({"model": draw(MODELS)}))
        members.insert(draw(st.integers(0, len(members))), (key, value))
    ascii_only = draw(st.booleans())
    parts = []
    for key, value in members:
        name = key if "\\u" in key else json.dumps(key, ensure_ascii=ascii_only)[1:-1]
        text = json.dumps(value, ensure_ascii=ascii_only, separators=(comma, colon))
        parts.append(f'"{name}"{colon}{text}')
    body = ("{" + comma.join(parts) + "}" + draw(st.sampled_from(["", "", "\n"]))).encode()
    data = json.loads(body)
    return body, draw(st.sampled_from([data.get("model"), draw(MODELS)]))


@given(written())
@settings(max_examples=300)
@example((b'{"model":"bench","messages":[]}', "bench"))
@example((b'{"messages":[],"model":"bench"}', "bench"))
@example((b'{"messages": [], "model": "bench"}', "bench"))
@example((b'{"messages":[],"model":"model"}', "model"))  # the value is the last "model"
@example((b'{"model":"model","messages":[]}', "model"))
@example((b'{"model":"bench","model":"bench"}', "bench"))  # repeated: the last is the member
@example((b'{"model":"bench","m":{"model":"bench"}}', "bench"))  # and a nested one
@example((b'{"m":{"model":"x"},"model":"bench"}', "bench"))
@example((b'{"model":"bench","mod\\u0065l":"bench"}', "bench"))  # member misses it too
@example((b'{"model":"bench"}', "bench"))
@example((b'{"model":"be"}', "bench"))
@example((b'{"x":"\\",\\"model\\":\\"bench\\"}"}', "bench"))  # a string that looks like it
def test_the_span_is_the_one_member_finds(case: tuple[bytes, Any]) -> None:
    body, model = case
    assert _model_span(body, model) == reference_span(body, model)


# ------------------------------------------------------------------ the router's cache


class Client:
    """Stands for the proxy's client: a pool of ``keys`` (each its own account)."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        pool = SimpleNamespace(
            key_ids=lambda: list(self.keys),
            key_specs=lambda: {k: SimpleNamespace(account=None) for k in self.keys},
            state_of=lambda k: "active",
            key_statistics=lambda k: None,
        )
        self.driver = SimpleNamespace(pool=pool, now=lambda: 0.0)


def model(model_id: str, prompt: float, completion: float, context: int = 128_000) -> ModelInfo:
    return ModelInfo(
        model_id,
        model_id,
        "main",
        context,
        None,
        Pricing(prompt, completion),
        frozenset(),
        (),
        None,
        None,
        {},
    )


CHEAP, DEAR = model("v/cheap", 1e-7, 4e-7), model("v/dear", 1e-6, 4e-6)
FREE = model("v/m:free", 0.0, 0.0)
PAIR = Route("pair", ("v/cheap", "v/dear"), "cheapest")


def router_for(catalog: Catalog, routes: list[Route], keys: list[str] | None = None) -> Any:
    client = Client(["k1"] if keys is None else keys)
    service = CatalogService(client, refresh=3600)  # type: ignore[arg-type]
    service.catalog = catalog
    now = [1_000_000.0]
    router = Router(
        routes,
        RoutingOptions(),
        Catalogs(service),
        client,  # type: ignore[arg-type]
        ModelHealth(),
        clock=lambda: now[0],
    )
    return router, service, client, now


def order(router: Router, route: str, need: Need | None = None) -> list[str | None]:
    catalog = router.catalog()
    assert catalog is not None
    decision = router.decide(router.routes[route], catalog, need or Need(10))
    return [decision.model, *decision.fallbacks]


def test_a_new_catalog_gives_new_candidates_and_prices() -> None:
    router, service, _, _ = router_for(Catalog("main", (CHEAP, DEAR)), [PAIR])
    assert order(router, "pair") == ["v/cheap", "v/dear"]
    # The refresh makes the first model the dearer one: kept prices would keep the order
    dearer = model("v/cheap", 2e-6, 8e-6)
    service.catalog = Catalog("main", (dearer, DEAR))
    assert order(router, "pair") == ["v/dear", "v/cheap"]
    decision = router.decide(PAIR, service.catalog, Need(10))
    assert decision.estimated_cost == 10 * 1e-6 + 1024 * 4e-6
    # A smaller context in the new catalog: the request no longer fits it
    service.catalog = Catalog("main", (model("v/cheap", 1e-7, 4e-7, context=1_000), DEAR))
    assert order(router, "pair", Need(2_000)) == ["v/dear"]
    service.catalog = Catalog("main", (DEAR,))  # one left
    assert order(router, "pair") == ["v/dear"]


def test_a_route_set_or_removed_at_runtime_is_decided_anew() -> None:
    router, _, _, _ = router_for(Catalog("main", (CHEAP, DEAR, FREE)), [PAIR])
    assert order(router, "pair") == ["v/cheap", "v/dear"]
    router.set_route(Route("pair", ("v/dear", "v/cheap"), "ordered"))  # PUT /admin/routes/pair
    assert order(router, "pair") == ["v/dear", "v/cheap"]
    router.set_route(Route("pair", (Filter(free=True),), "cheapest"))
    assert order(router, "pair") == ["v/m:free"]
    assert router.remove_route("pair")  # DELETE /admin/routes/pair
    assert not router.routed("pair", b'{"model":"pair"}')
    router.set_route(PAIR)
    assert order(router, "pair") == ["v/cheap", "v/dear"]


def test_a_cooling_model_is_passed_over_and_comes_back() -> None:
    router, _, _, now = router_for(Catalog("main", (CHEAP, DEAR)), [PAIR])
    assert order(router, "pair") == ["v/cheap", "v/dear"]
    router.cool("v/cheap", "answered 503 (unavailable)", 30.0)
    assert order(router, "pair") == ["v/dear"]
    catalog = router.catalog()
    decision = router.decide(PAIR, catalog, Need(10))  # type: ignore[arg-type]
    assert any("v/cheap" in line for line in decision.reasons)
    now[0] += 31
    assert order(router, "pair") == ["v/cheap", "v/dear"]


def test_free_models_follow_the_free_tier_and_the_keys() -> None:
    route = Route("mixed", (FREE_ROUTE.candidates[0], "v/dear"), "ordered")
    router, _, client, now = router_for(Catalog("main", (FREE, DEAR)), [route])
    assert order(router, "mixed") == ["v/m:free", "v/dear"]
    router.free.limit_met("k1", now[0], True)  # the account's day is spent
    assert order(router, "mixed") == ["v/dear"]
    client.keys.append("k2")  # a key added: its account has room
    router.status()  # the router looks at the pool's keys
    assert order(router, "mixed") == ["v/m:free", "v/dear"]
    client.keys.clear()  # every key removed: no account at all
    router.status()
    assert order(router, "mixed") == ["v/dear"]


def test_the_latency_and_the_cost_are_the_requests() -> None:
    router, _, _, _ = router_for(Catalog("main", (CHEAP, DEAR)), [PAIR])
    catalog = router.catalog()
    assert catalog is not None
    first = router.decide(PAIR, catalog, Need(10))
    assert first.estimated_latency_ms is None and first.confidence == 0.5
    router.models.record("v/cheap", 200, 0.25)
    second = router.decide(PAIR, catalog, Need(5_000, 100))
    assert second.estimated_latency_ms == 250.0 and second.confidence == 1.0
    assert second.estimated_cost == 5_000 * 1e-7 + 100 * 4e-7


def test_a_plan_splices_the_model_where_the_body_names_it() -> None:
    router, _, _, _ = router_for(Catalog("main", (CHEAP, DEAR)), [PAIR])
    for body in (
        b'{"model":"pair","messages":[{"role":"user","content":"hi"}]}',
        b'{"messages": [{"role": "user", "content": "hi"}], "model": "pair"}',
    ):
        plan = router.plan(body)
        assert isinstance(plan, Plan) and plan.raw is not None
        assert plan.decision.model == "v/cheap"
        assert json.loads(plan.body_for("v/cheap")) == {**json.loads(body), "model": "v/cheap"}
