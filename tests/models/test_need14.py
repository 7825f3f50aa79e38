"""A routed request's need read from the three APIs' shapes: the Responses
API's ``input`` (its prompt was read as empty) and Anthropic's and the
Responses API's images (only ``image_url`` parts counted)."""

from __future__ import annotations

from keyrotor.models.cost import REPLY_TOKENS, prompt_size
from keyrotor.models.routing import need_of

TEXT = "x" * 4000  # 1,000 tokens at 4 characters a token
PIXEL = "data:image/png;base64,iVBORw0KGgo="


def test_the_responses_apis_input_is_the_prompt_as_a_string_or_as_items() -> None:
    chat = need_of({"messages": [{"role": "user", "content": TEXT}]})
    as_string = need_of({"input": TEXT})
    as_items = need_of(
        {"input": [{"role": "user", "content": [{"type": "input_text", "text": TEXT}]}]}
    )
    assert chat.prompt_tokens == as_string.prompt_tokens == as_items.prompt_tokens > 1000
    assert need_of({"input": 3}).prompt_tokens == REPLY_TOKENS  # not a prompt: none


def test_images_count_in_each_apis_parts() -> None:
    chat = {"type": "image_url", "image_url": {"url": PIXEL}}
    anthropic = {"type": "image", "source": {"type": "base64", "data": "iVBORw0KGgo="}}
    responses = {"type": "input_image", "image_url": PIXEL}
    assert need_of({"messages": [{"role": "user", "content": [chat]}]}).images == 1
    assert need_of({"messages": [{"role": "user", "content": [anthropic]}]}).images == 1
    assert need_of({"input": [{"role": "user", "content": [responses]}]}).images == 1
    assert prompt_size([{"content": [chat, anthropic, responses, {"type": "text"}]}])[1] == 3
