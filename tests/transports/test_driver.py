"""The shared driver's pure helpers: key discovery, masking, usage accounting."""

from __future__ import annotations

import json

import pytest

from keyrotor.transports._driver import Driver, StreamAccountant, keys_from_env, mask
from keyrotor.transports.errors import ConfigurationError


def test_keys_from_env_in_the_seeds_order_without_duplicates() -> None:
    env = {
        "OPENROUTER_KEYS": "sk-a, sk-b,,",
        "OPENROUTER_API_KEY": "sk-c",
        "OPENROUTER_API_KEY_10": "sk-e",
        "OPENROUTER_API_KEY_2": "sk-d",
        "OPENROUTER_API_KEY_X": "ignored",
        "OPENROUTER_API_KEY_1": "sk-a",
    }
    assert keys_from_env(env) == ["sk-a", "sk-b", "sk-c", "sk-d", "sk-e"]
    with pytest.raises(ConfigurationError, match="OPENROUTER_KEYS"):
        keys_from_env({})


def test_mask_shows_only_a_prefix_and_the_last_four() -> None:
    secret = "sk-or-v1-fake-0123456789abcdef-0123456789abcdef"
    shown = mask(secret)
    assert shown.endswith("cdef") and shown.startswith("sk-or-v1")
    assert "0123456789" not in shown
    assert mask("short") == "…"


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ([], "no keys"),
        (["sk-a", "sk-a"], "twice"),
        (["sk a"], "whitespace"),
        ({"a": ""}, "empty"),
        ([1], "strings"),
    ],
)
def test_bad_keys(keys: object, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Driver(keys)  # type: ignore[arg-type]


def test_sse_usage_from_the_last_chunk_split_anywhere() -> None:
    usage = {"prompt_tokens": 7, "completion_tokens": 9, "cost": 0.0042}
    stream = (
        b": OPENROUTER PROCESSING\n\n"
        b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
        + b"data: "
        + json.dumps({"choices": [], "usage": usage}).encode()
        + b"\n\ndata: [DONE]\n\n"
    )
    for cut in range(1, len(stream)):
        accountant = StreamAccountant("text/event-stream; charset=utf-8")
        accountant.feed(stream[:cut])
        accountant.feed(stream[cut:])
        accountant.close()
        assert (accountant.cost, accountant.prompt_tokens, accountant.completion_tokens) == (
            0.0042,
            7,
            9,
        )
        assert accountant.error_status is None


def test_sse_error_chunk_is_reported() -> None:
    accountant = StreamAccountant("text/event-stream")
    chunk = {"error": {"code": 429, "message": "rate limited"}, "choices": []}
    accountant.feed(b"data: " + json.dumps(chunk).encode())  # no final newline
    accountant.close()
    assert accountant.error_status == 429
    assert accountant.error_body == {"error": chunk["error"]}


def test_json_usage_without_parsing_the_completion() -> None:
    body = {
        "choices": [{"message": {"content": 'a "usage": {"cost": 99} inside text'}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "cost": 0.5},
    }
    accountant = StreamAccountant("application/json")
    raw = json.dumps(body).encode()
    accountant.feed(raw[:10])
    accountant.feed(raw[10:])
    accountant.close()
    assert (accountant.cost, accountant.prompt_tokens, accountant.completion_tokens) == (0.5, 3, 4)


@pytest.mark.parametrize("body", [b"not json", b'{"usage": "none"}', b'{"usage": {"cost": -1}}'])
def test_odd_bodies_account_nothing(body: bytes) -> None:
    accountant = StreamAccountant("application/json")
    accountant.feed(body)
    accountant.close()
    assert accountant.cost == 0.0
