"""What the router keeps between requests: a route's candidates in the catalog
they were found in, and only a configured route's."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from keyrotor.adapters.config import RoutingOptions
from keyrotor.adapters.proxy.catalog import Catalogs, CatalogService
from keyrotor.adapters.proxy.model_health import ModelHealth
from keyrotor.adapters.proxy.router import Router
from keyrotor.models.catalog import Catalog, parse_catalog
from keyrotor.models.routing import Filter, Need, Route, ordered
from keyrotor.testing.catalogs import realistic_models

pytestmark = pytest.mark.trio

BEFORE = json.dumps({"data": [m.to_json() for m in realistic_models()]}).encode()
AFTER = json.dumps({"data": [m.to_json() for m in realistic_models(revision=1)]}).encode()


class Client:
    """Stands for the proxy's client: ``get_public`` gives the answers queued."""

    def __init__(self) -> None:
        self.answers: list[Any] = []
        pool = SimpleNamespace(key_ids=lambda: [], key_specs=dict, state_of=lambda k: None)
        self.driver = SimpleNamespace(pool=pool)

    async def get_public(self, path: str, headers: Any = None) -> Any:
        return self.answers.pop(0)


def answer(status: int, body: bytes = b"") -> Any:
    headers = {"etag": '"e"'} if status == 200 else {}
    return SimpleNamespace(status_code=status, content=body, headers=headers)


def router_for(client: Client, routes: list[Route]) -> tuple[Router, CatalogService]:
    service = CatalogService(client, refresh=3600)  # type: ignore[arg-type]
    return Router(routes, RoutingOptions(), Catalogs(service), client, ModelHealth()), service  # type: ignore[arg-type]


async def test_a_route_never_keeps_candidates_of_a_catalog_that_was_replaced() -> None:
    # A replaced catalog, once freed, may give its address to a later one: the
    # router compared id()s and chose models the new catalog did not list.
    route = Route("any", (Filter(min_context=1000),), "ordered")
    client = Client()
    router, _ = router_for(client, [route])
    first = parse_catalog(BEFORE, "main")
    router.decide(route, first, Need(10))
    address = id(first)
    del first  # the service replaced it: freed unless the router holds it
    later = [m for m in parse_catalog(AFTER, "main").models if m.id.startswith("qwen/")]
    made = []
    for _ in range(200):  # a new catalog at the old address, if CPython gives it
        catalog = Catalog("main", tuple(later))
        if id(catalog) == address:
            break
        made.append(catalog)
    decision = router.decide(route, catalog, Need(10))
    assert decision.model is not None
    assert all(catalog.get(m) is not None for m in (decision.model, *decision.fallbacks))


async def test_a_route_named_models_and_a_requests_models_list_stay_apart() -> None:
    client = Client()
    configured = Route("models", ("openai/gpt-4.1-mini", "x-ai/grok-4-mini"), "ordered")
    router, service = router_for(client, [configured])
    client.answers = [answer(200, BEFORE)]
    await service.refresh()
    catalog = router.catalog()
    assert catalog is not None
    own = router.decide(ordered("models", ["cohere/command-r-mini"]), catalog, Need(10))
    assert (own.model, own.fallbacks) == ("cohere/command-r-mini", ())
    route = router.decide(configured, catalog, Need(10))
    assert (route.model, route.fallbacks) == ("openai/gpt-4.1-mini", ("x-ai/grok-4-mini",))
    again = router.decide(ordered("models", ["x-ai/grok-4-mini"]), catalog, Need(10))
    assert again.model == "x-ai/grok-4-mini"
