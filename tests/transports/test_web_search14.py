"""Session 14: the Responses API's web searches (``web_search_call`` items of
its output, not in its ``usage``) are priced per search, as Anthropic's are
(``usage.server_tool_use``), in a JSON answer and in a stream."""

from __future__ import annotations

import json
from typing import Any

import pytest

from keyrotor.core import KeySpec, PoolConfig, Send
from keyrotor.models import parse_catalog, pricer
from keyrotor.transports._driver import Driver

from .test_usage_apis13 import JSON, PRICES, RESPONSE, SECRET, SSE, accounted, responses_stream

CATALOG = parse_catalog({"data": [{"id": "gpt-4.1", "pricing": {**PRICES, "web_search": "0.01"}}]})
TOKENS = 36 * 3e-6 + 87 * 15e-6  # RESPONSE's usage
SEARCH = {"type": "web_search_call", "id": "ws_1", "status": "completed"}
SEARCHED = {**RESPONSE, "output": [SEARCH, {**SEARCH, "id": "ws_2"}, *RESPONSE["output"]]}


def priced(body: bytes, content_type: str) -> tuple[float, Any]:
    """What the driver charged for ``body``, and the usage the accountant kept."""
    driver = Driver({"a": SECRET}, PoolConfig(keys=[KeySpec(key_id="a")]))
    driver.price = pricer(CATALOG)
    costs: list[float] = []
    driver.on_finished.append(lambda key, a: costs.append(a.cost))
    request = json.dumps({"model": "gpt-4.1", "input": "news?", "tools": [{"type": "web_search"}]})
    request_id, slot = driver.open(lambda: None, body=request.encode())
    assert isinstance(slot.decisions.popleft(), Send)
    driver.received(request_id, 1, 200, {}, None)
    accountant = accounted(body, content_type)
    driver.finish(request_id, "a", accountant)
    return costs[0], accountant.usage


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_answers_web_searches_are_priced_per_search(indent: int | None) -> None:
    cost, usage = priced(json.dumps(SEARCHED, indent=indent).encode(), JSON)
    assert cost == pytest.approx(TOKENS + 2 * 0.01, rel=1e-12)
    assert usage == RESPONSE["usage"]  # kept as sent


def test_a_streamed_answers_web_searches_are_priced_per_search() -> None:
    done = ("response.completed", {"type": "response.completed", "response": SEARCHED})
    cost, _ = priced(responses_stream(done), SSE)
    assert cost == pytest.approx(TOKENS + 2 * 0.01, rel=1e-12)


def test_an_answer_without_searches_costs_its_tokens() -> None:
    cost, _ = priced(json.dumps(RESPONSE).encode(), JSON)
    assert cost == pytest.approx(TOKENS, rel=1e-12)
