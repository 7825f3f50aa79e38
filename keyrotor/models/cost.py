"""Cost to the cent: an estimate before a request, the spend after it.

Before: ``estimate(pricing, messages, max_tokens)`` counts prompt tokens with
``estimate_tokens`` (no tokenizer download: about 4 characters a token, plus
OpenAI's per-message framing) and prices them, with the completion's ceiling
when ``max_tokens`` is known.

After: ``spend(pricing, usage)`` is the answer's ``usage.cost`` when the
upstream reports one (OpenRouter does, in USD), else the cost computed from
``usage`` by ``usage_cost``:

- prompt tokens not read from or written to the cache x ``prompt``;
- ``prompt_tokens_details.cached_tokens`` x ``input_cache_read`` and
  ``cache_write_tokens`` x ``input_cache_write`` (the prompt price when the
  catalog gives none);
- ``completion_tokens`` x ``completion``, except
  ``completion_tokens_details.reasoning_tokens``, billed at
  ``internal_reasoning`` when the catalog has that price;
- ``request`` once, ``image`` per input image, ``web_search`` per search.

The same for the Responses API's ``usage`` (``input_tokens``, with
``input_tokens_details.cached_tokens``; ``output_tokens``, with
``output_tokens_details.reasoning_tokens``) and Anthropic's (``input_tokens``
are the prompt tokens the cache neither read nor wrote;
``cache_read_input_tokens`` are billed as cache reads,
``cache_creation_input_tokens`` as cache writes, whatever their lifetime;
``output_tokens``).

Input images are counted in the request (``request_images``): Chat
Completions' ``image_url`` parts, Anthropic's ``image`` blocks (also inside
``tool_result`` blocks), the Responses API's ``input_image`` parts (of its
``input`` messages and function call outputs). Web searches are read from the
answer's ``usage.server_tool_use.web_search_requests`` (Anthropic's count of
its server-side searches) unless given.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from .catalog import Catalog, Pricing

__all__ = [
    "Estimate",
    "Price",
    "count_images",
    "estimate",
    "estimate_tokens",
    "price_answer",
    "pricer",
    "prompt_size",
    "request_images",
    "spend",
    "usage_cost",
    "web_searches_of",
]

Price = Callable[[bytes | None, Mapping[str, Any]], float | None]
"""A price hook: (the request's body, the answer's ``usage``) -> USD or None."""

CHARS_PER_TOKEN = 4
"""The estimator's rate: English text runs at about 4 characters a token."""

MESSAGE_TOKENS = 4
"""Tokens of framing per chat message (role and separators, as OpenAI counts them)."""

REPLY_TOKENS = 3
"""Tokens that prime the reply (``<|start|>assistant<|message|>``)."""


_IMAGE_PARTS = frozenset({"image_url", "image", "input_image"})
"""An input image's part type: Chat Completions', Anthropic's, the Responses API's."""


def prompt_size(messages: Iterable[Mapping[str, Any]]) -> tuple[int, int]:
    """(``estimate_tokens``, ``count_images``) of chat ``messages``, in one pass
    (a routed request's need reads both)."""
    chars = count = images = 0
    for message in messages:
        count += 1
        # type() first: parsed JSON is dicts, and the Mapping check is ten times slower
        if type(message) is not dict and not isinstance(message, Mapping):
            continue
        content = message.get("content")
        if type(content) is str:
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping):
                    text = part.get("text")
                    if isinstance(text, str):
                        chars += len(text)
                    if part.get("type") in _IMAGE_PARTS:
                        images += 1
        name = message.get("name")
        if isinstance(name, str):
            chars += len(name)
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                function = call.get("function") if isinstance(call, Mapping) else None
                if isinstance(function, Mapping):
                    chars += len(str(function.get("name", ""))) + len(
                        str(function.get("arguments", ""))
                    )
    return -(-chars // CHARS_PER_TOKEN) + count * MESSAGE_TOKENS + REPLY_TOKENS, images


def estimate_tokens(messages: Iterable[Mapping[str, Any]]) -> int:
    """Prompt tokens of chat ``messages``: their text (string contents and
    ``text`` parts, names and tool-call arguments) at ``CHARS_PER_TOKEN``,
    rounded up, plus ``MESSAGE_TOKENS`` per message and ``REPLY_TOKENS``."""
    return prompt_size(messages)[0]


def count_images(messages: Iterable[Mapping[str, Any]]) -> int:
    """Input images in ``messages`` (``image_url``, ``image`` and
    ``input_image`` parts: Chat Completions', Anthropic's, the Responses API's)."""
    return prompt_size(messages)[1]


def request_images(request: Mapping[str, Any]) -> int:
    """Input images of a request body of any of the three APIs: parts of its
    ``messages``' contents (Chat Completions, Anthropic's Messages API, with
    ``tool_result`` blocks' contents) and of its ``input`` items' contents and
    outputs (the Responses API's messages and ``function_call_output``)."""
    images = 0
    for name in ("messages", "input"):
        items = request.get(name)
        if isinstance(items, list):
            for item in items:
                if isinstance(item, Mapping):
                    images += _images_in(item.get("content")) + _images_in(item.get("output"))
    return images


def _images_in(parts: object) -> int:
    if not isinstance(parts, list):
        return 0
    images = 0
    for part in parts:
        if isinstance(part, Mapping):
            kind = part.get("type")
            if kind in _IMAGE_PARTS:
                images += 1
            elif kind == "tool_result":  # Anthropic's: text and images
                images += _images_in(part.get("content"))
    return images


def web_searches_of(usage: Mapping[str, Any]) -> int:
    """Server-side web searches an answer's ``usage`` reports
    (``server_tool_use.web_search_requests``, Anthropic's); 0 when none."""
    return _count(usage.get("server_tool_use"), "web_search_requests")


@attrs.frozen
class Estimate:
    """A request's cost before it is sent: ``low`` prices the prompt alone
    (and per-request charges), ``high`` adds ``max_tokens`` of completion
    (None when the request sets no ceiling); both None for unknown prices."""

    prompt_tokens: int
    max_tokens: int | None
    low: float | None
    high: float | None


def estimate(
    pricing: Pricing, messages: Iterable[Mapping[str, Any]], max_tokens: int | None = None
) -> Estimate:
    """What a chat request may cost at ``pricing``."""
    tokens, images = prompt_size(messages)
    if not pricing.known or pricing.variable:
        return Estimate(tokens, max_tokens, None, None)
    low = tokens * pricing.prompt + pricing.request + images * pricing.image
    high = None if max_tokens is None else low + max_tokens * pricing.completion
    return Estimate(tokens, max_tokens, low, high)


def _count(data: object, name: str) -> int:
    value = data.get(name) if isinstance(data, Mapping) else None
    return value if type(value) is int and value > 0 else 0


def _counts(usage: Mapping[str, Any]) -> tuple[int, int, int, int, int]:
    """(prompt, cache read, cache written, completion, reasoning) tokens of a
    Chat Completions, Responses API or Anthropic ``usage`` (the prompt with
    every cached token in it, as ``keyrotor.transports`` counts it)."""
    if "prompt_tokens" in usage or "completion_tokens" in usage:  # Chat Completions
        details = usage.get("prompt_tokens_details")
        return (
            _count(usage, "prompt_tokens"),
            _count(details, "cached_tokens"),
            _count(details, "cache_write_tokens"),
            _count(usage, "completion_tokens"),
            _count(usage.get("completion_tokens_details"), "reasoning_tokens"),
        )
    read = _count(usage, "cache_read_input_tokens")  # Anthropic: not in its input_tokens
    written = _count(usage, "cache_creation_input_tokens")
    return (
        _count(usage, "input_tokens") + read + written,
        read + _count(usage.get("input_tokens_details"), "cached_tokens"),  # Responses
        written,
        _count(usage, "output_tokens"),
        _count(usage.get("output_tokens_details"), "reasoning_tokens"),
    )


def usage_cost(
    pricing: Pricing,
    usage: Mapping[str, Any],
    *,
    images: int = 0,
    web_searches: int | None = None,
) -> float | None:
    """USD for an answer's ``usage`` at ``pricing`` (None when the price is
    unknown or variable); ``web_searches`` None: ``web_searches_of(usage)``.
    See the module's docstring for the rules."""
    if not pricing.known or pricing.variable:
        return None
    if web_searches is None:
        web_searches = web_searches_of(usage)
    prompt, cached, written, completion, reasoning = _counts(usage)
    reasoning = min(reasoning, completion)
    fresh = max(0, prompt - cached - written)
    read_price = pricing.prompt if pricing.input_cache_read is None else pricing.input_cache_read
    write_price = pricing.prompt if pricing.input_cache_write is None else pricing.input_cache_write
    think_price = (
        pricing.completion if pricing.internal_reasoning is None else pricing.internal_reasoning
    )
    return (
        fresh * pricing.prompt
        + cached * read_price
        + written * write_price
        + (completion - reasoning) * pricing.completion
        + reasoning * think_price
        + pricing.request
        + images * pricing.image
        + web_searches * pricing.web_search
    )


def spend(
    pricing: Pricing | None,
    usage: Mapping[str, Any],
    *,
    images: int = 0,
    web_searches: int | None = None,
) -> float | None:
    """What an answer cost: ``usage.cost`` when the upstream reports it, else
    ``usage_cost`` at ``pricing`` (None: unknown)."""
    reported = usage.get("cost")
    if isinstance(reported, int | float) and not isinstance(reported, bool) and reported >= 0:
        return float(reported)
    if pricing is None:
        return None
    return usage_cost(pricing, usage, images=images, web_searches=web_searches)


def price_answer(
    catalog: Catalog | None,
    body: bytes | None,
    usage: Mapping[str, Any],
    *,
    model_of: Callable[[bytes], str | None] | None = None,
) -> float | None:
    """USD for the answer to the JSON request ``body`` whose ``usage`` is
    given, at ``catalog``'s pricing of the request's ``model`` (its input
    images counted by ``request_images``, its web searches read from ``usage``);
    None when the body names no model the catalog prices.

    ``model_of``: the request's top-level ``model`` read without parsing the
    body (the proxy's, for an agent's long body); the body is then parsed only
    when the model charges for images, to count them."""
    if catalog is None or not body:
        return None
    request = None
    if model_of is None:
        request = _json_object(body)
        model = None if request is None else request.get("model")
    else:
        model = model_of(body)
    info = catalog.get(model) if isinstance(model, str) else None
    if info is None:
        return None
    images = 0
    if info.pricing.image:  # images change the price only then
        request = _json_object(body) if request is None else request
        images = 0 if request is None else request_images(request)
    return usage_cost(info.pricing, usage, images=images)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        request = json.loads(body)
    except ValueError:
        return None
    return request if isinstance(request, dict) else None


def pricer(
    catalog: Catalog | Callable[[], Catalog | None],
    model_of: Callable[[bytes], str | None] | None = None,
) -> Price:
    """A ``Driver.price`` hook pricing answers at ``catalog`` (or at what a
    function returns each time, for a catalog that is refreshed); ``model_of``
    as ``price_answer`` takes it."""
    current = catalog if callable(catalog) else (lambda: catalog)

    def price(body: bytes | None, usage: Mapping[str, Any]) -> float | None:
        return price_answer(current(), body, usage, model_of=model_of)

    return price
