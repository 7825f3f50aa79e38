"""A catalog's per-unit prices (``request``, ``image``, ``web_search``) priced
alike for Chat Completions, the Responses API and Anthropic's Messages API:
input images in each request shape, Anthropic's server-side web searches."""

from __future__ import annotations

import json
from typing import Any

import pytest

from keyrotor.models import Pricing, parse_catalog, price_answer, spend, usage_cost
from keyrotor.models.cost import request_images, web_searches_of
from keyrotor.transports._driver import StreamAccountant

PRICING = {
    "prompt": "0.000003",
    "completion": "0.000015",
    "request": "0.002",
    "image": "0.0048",
    "web_search": "0.01",  # Anthropic's $10 per 1,000 searches
}
CATALOG = parse_catalog({"data": [{"id": "m", "name": "M", "pricing": PRICING}]})
IMAGE = "https://example.invalid/cat.png"
TOKENS = 1000 * 3e-6 + 100 * 15e-6


def cost(request: dict[str, Any], usage: dict[str, Any]) -> float | None:
    return price_answer(CATALOG, json.dumps({"model": "m", **request}).encode(), usage)


CHAT = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": IMAGE}},
                {"type": "image_url", "image_url": {"url": IMAGE}},
            ],
        },
    ]
}
RESPONSES = {
    "input": [
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "what is this?"},
                {"type": "input_image", "image_url": IMAGE},
            ],
        },
        {"type": "function_call", "call_id": "c1", "name": "shot", "arguments": "{}"},
        {
            "type": "function_call_output",
            "call_id": "c1",
            "output": [{"type": "input_image", "image_url": IMAGE}],
        },
    ]
}
MESSAGES = {
    "system": "be brief",
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "image", "source": {"type": "url", "url": IMAGE}},
                {"type": "text", "text": "what is this?"},
            ],
        },
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "shot"}]},
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "t1",
                    "content": [{"type": "image", "source": {"type": "url", "url": IMAGE}}],
                }
            ],
        },
    ],
}


@pytest.mark.parametrize(
    ("request_", "usage"),
    [
        (CHAT, {"prompt_tokens": 1000, "completion_tokens": 100}),
        (RESPONSES, {"input_tokens": 1000, "output_tokens": 100}),
        (MESSAGES, {"input_tokens": 1000, "output_tokens": 100}),
    ],
    ids=["chat", "responses", "messages"],
)
def test_two_input_images_are_priced_in_each_api(
    request_: dict[str, Any], usage: dict[str, Any]
) -> None:
    assert request_images(request_) == 2
    assert cost(request_, usage) == pytest.approx(TOKENS + 0.002 + 2 * 0.0048, rel=1e-12)


def test_anthropic_server_side_web_searches_are_priced_per_search() -> None:
    usage = {
        "input_tokens": 1000,
        "output_tokens": 100,
        "server_tool_use": {"web_search_requests": 3, "web_fetch_requests": 2},
    }
    assert web_searches_of(usage) == 3
    expected = TOKENS + 0.002 + 3 * 0.01
    assert cost({"messages": []}, usage) == pytest.approx(expected, rel=1e-12)
    pricing = Pricing(prompt=3e-6, completion=15e-6, request=0.002, web_search=0.01)
    assert spend(pricing, usage) == pytest.approx(expected, rel=1e-12)
    assert usage_cost(pricing, usage, web_searches=1) == pytest.approx(expected - 0.02)
    for odd in (None, {}, {"web_search_requests": -1}, {"web_search_requests": "3"}, []):
        assert web_searches_of({**usage, "server_tool_use": odd}) == 0


def test_a_streamed_anthropic_answer_keeps_its_searches_for_the_price() -> None:
    start = {
        "type": "message_start",
        "message": {"id": "msg_1", "usage": {"input_tokens": 1000, "output_tokens": 1}},
    }
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn"},
        "usage": {"output_tokens": 100, "server_tool_use": {"web_search_requests": 2}},
    }
    stream = "".join(
        f"event: {event['type']}\ndata: {json.dumps(event)}\n\n" for event in (start, delta)
    )
    accountant = StreamAccountant()
    accountant.feed(stream.encode())
    accountant.close()
    assert accountant.usage is not None
    assert cost(MESSAGES, accountant.usage) == pytest.approx(
        TOKENS + 0.002 + 2 * 0.0048 + 2 * 0.01, rel=1e-12
    )


def test_bodies_without_images_or_of_odd_shapes_count_none() -> None:
    for request in (
        {},
        {"input": "just text"},
        {"messages": "nope", "input": [None, 3, {"content": "text"}, {"output": "text"}]},
        {"messages": [{"role": "user", "content": [None, {"type": "tool_result"}]}]},
    ):
        assert request_images(request) == 0
        assert cost(request, {"input_tokens": 1000, "output_tokens": 100}) == pytest.approx(
            TOKENS + 0.002, rel=1e-12
        )
