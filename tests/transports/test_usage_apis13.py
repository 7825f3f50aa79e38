"""Usage and errors of the Responses API and Anthropic's Messages API (review 13).

The accountant read only Chat Completions' ``usage.prompt_tokens`` /
``completion_tokens``: a Responses API or Anthropic answer counted 0 tokens
(so an unpriced one cost $0), a streamed one too (their usage is nested in an
event's ``response`` / ``message``), Anthropic's ``message_delta`` would have
replaced ``message_start``'s input tokens, and their in-stream errors were
missed (``response.failed``, a flat ``error`` event) or read as a 502
(Anthropic's ``overloaded_error`` is its 529). The bodies are shaped as the
official docs show them (platform.openai.com API reference, "Create a model
response" and "Streaming events"; docs.anthropic.com "Messages" and
"Streaming messages").
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from keyrotor.core import KeySpec, PoolConfig, Send
from keyrotor.models import parse_catalog, pricer, usage_cost
from keyrotor.transports import _driver, _http
from keyrotor.transports._driver import Driver, StreamAccountant
from keyrotor.transports.sync import Client

SECRET = "sk-test-review13-usage-apis-0000000000"

# ------------------------------------------------------------------ bodies (official shapes)

RESPONSE = {
    "id": "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
    "object": "response",
    "created_at": 1741476542,
    "status": "completed",
    "error": None,
    "incomplete_details": None,
    "instructions": None,
    "max_output_tokens": None,
    "model": "gpt-4.1-2025-04-14",
    "output": [
        {
            "type": "message",
            "id": "msg_67ccd2bf17f0819081ff3bb2cf6508e60bb6a6b452d3795b",
            "status": "completed",
            "role": "assistant",
            "content": [
                {
                    "type": "output_text",
                    "text": 'In a peaceful grove beneath a silver moon, a unicorn said "error"...',
                    "annotations": [],
                }
            ],
        }
    ],
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "reasoning": {"effort": None, "summary": None},
    "store": True,
    "temperature": 1.0,
    "text": {"format": {"type": "text"}},
    "tool_choice": "auto",
    "tools": [],
    "top_p": 1.0,
    "truncation": "disabled",
    "usage": {
        "input_tokens": 36,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 87,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 123,
    },
    "user": None,
    "metadata": {},
}

MESSAGE = {
    "content": [{"text": "Hi! My name is Claude.", "type": "text"}],
    "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
    "model": "claude-sonnet-4-5-20250929",
    "role": "assistant",
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "type": "message",
    "usage": {"input_tokens": 2095, "output_tokens": 503},
}


def sse(*events: tuple[str, Any]) -> bytes:
    """Named SSE events, their data compact (as OpenAI sends them)."""
    return b"".join(
        f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
        for name, data in events
    )


def responses_stream(last: tuple[str, Any] | None = None, *extra: tuple[str, Any]) -> bytes:
    """A Responses API stream: created, in progress, text deltas, then ``last``
    (``response.completed`` with the usage unless given)."""
    opening = {**RESPONSE, "status": "in_progress", "output": [], "usage": None}
    done = {**RESPONSE}
    item = {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant"}
    deltas = [
        (
            "response.output_text.delta",
            {
                "type": "response.output_text.delta",
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "delta": word,
                "sequence_number": 4 + n,
            },
        )
        for n, word in enumerate(["In", " a", " peaceful", " grove"])
    ]
    return sse(
        (
            "response.created",
            {"type": "response.created", "response": opening, "sequence_number": 0},
        ),
        (
            "response.in_progress",
            {"type": "response.in_progress", "response": opening, "sequence_number": 1},
        ),
        (
            "response.output_item.added",
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {**item, "content": []},
            },
        ),
        *deltas,
        *extra,
        last
        or (
            "response.completed",
            {"type": "response.completed", "response": done, "sequence_number": 9},
        ),
    )


def anthropic_stream(
    start_usage: dict[str, Any], delta_usage: dict[str, Any], *extra: bytes
) -> bytes:
    """An Anthropic Messages stream, its data as the docs print it (spaces after colons)."""
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": "claude-sonnet-4-5-20250929",
            "stop_reason": None,
            "stop_sequence": None,
            "usage": start_usage,
        },
    }
    events = [
        ("message_start", start),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        ("ping", {"type": "ping"}),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "Hello"},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "!"},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ]
    head = b"".join(f"event: {n}\ndata: {json.dumps(d)}\n\n".encode() for n, d in events)
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": delta_usage,
    }
    tail = (
        f"event: message_delta\ndata: {json.dumps(delta)}\n\n"
        + 'event: message_stop\ndata: {"type": "message_stop"}\n\n'
    )
    return head + b"".join(extra) + tail.encode()


def accounted(body: bytes, content_type: str, pieces: int = 3) -> StreamAccountant:
    accountant = StreamAccountant(content_type)
    step = -(-len(body) // pieces)
    for at in range(0, len(body), step):
        accountant.feed(body[at : at + step])
    accountant.close()
    return accountant


OVERLOADED = (
    b"event: error\n"
    b'data: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}\n\n'
)
SSE = "text/event-stream"
JSON = "application/json"


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every SSE line the accountant parses."""
    seen: list[bytes] = []
    real = _driver.parse

    def counting(data: bytes) -> Any:
        seen.append(data)
        return real(data)

    monkeypatch.setattr(_driver, "parse", counting)
    return seen


# ------------------------------------------------------------------ Responses API


def test_a_responses_api_json_answer_counts_its_tokens_without_parsing_the_body(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(body: bytes) -> Any:
        raise AssertionError("the whole body was parsed")

    monkeypatch.setattr(_driver, "parse_json", refuse)  # its "error": null is no error
    body = json.dumps(RESPONSE, indent=2).encode()  # OpenAI's JSON is pretty-printed
    accountant = accounted(body, JSON)
    assert (accountant.prompt_tokens, accountant.completion_tokens) == (36, 87)
    assert accountant.usage == RESPONSE["usage"] and not accountant.priced
    assert accountant.error_status is None


def test_a_failed_responses_api_json_answer_is_an_error() -> None:
    failed = {**RESPONSE, "status": "failed", "usage": None}
    failed["error"] = {"code": "server_error", "message": "The server had an error"}
    accountant = accounted(json.dumps(failed, indent=2).encode(), JSON)
    assert accountant.error_status == 500
    assert accountant.error_body == {"error": failed["error"]}
    assert accountant.usage is None


def test_a_responses_api_stream_counts_the_usage_of_response_completed_parsing_only_it(
    parsed: list[bytes],
) -> None:
    accountant = accounted(responses_stream(), SSE, pieces=7)
    assert (accountant.prompt_tokens, accountant.completion_tokens) == (36, 87)
    assert accountant.usage == RESPONSE["usage"]
    assert accountant.error_status is None
    # created and in_progress carry "usage":null and "error":null: not parsed
    assert len(parsed) == 1 and b'"response.completed"' in parsed[0]


def test_response_incomplete_counts_its_usage_too() -> None:
    cut = {
        **RESPONSE,
        "status": "incomplete",
        "incomplete_details": {"reason": "max_output_tokens"},
    }
    event = ("response.incomplete", {"type": "response.incomplete", "response": cut})
    accountant = accounted(responses_stream(event), SSE)
    assert (accountant.prompt_tokens, accountant.completion_tokens) == (36, 87)
    assert accountant.error_status is None


@pytest.mark.parametrize(
    ("code", "status"),
    [("server_error", 500), ("rate_limit_exceeded", 429), ("vector_store_timeout", 502)],
)
def test_response_failed_is_an_error_with_the_status_its_code_names(code: str, status: int) -> None:
    error = {"code": code, "message": "Request too large for gpt-4o ... (TPM): Limit 1"}
    failed = {**RESPONSE, "status": "failed", "error": error, "usage": None}
    event = (
        "response.failed",
        {"type": "response.failed", "sequence_number": 9, "response": failed},
    )
    accountant = accounted(responses_stream(event), SSE)
    assert accountant.error_status == status
    assert accountant.error_body == {"error": error}


def test_a_responses_api_error_event_is_an_error() -> None:
    # The API reference's ResponseErrorEvent: code and message at its top level.
    flat = {
        "type": "error",
        "code": "ERR_SOMETHING",
        "message": "Something went wrong",
        "param": None,
        "sequence_number": 1,
    }
    accountant = accounted(responses_stream(("error", flat)), SSE)
    assert accountant.error_status == 502
    assert accountant.error_body == {
        "error": {"code": "ERR_SOMETHING", "message": "Something went wrong", "param": None}
    }
    # As seen in real streams: nested in ``error``.
    nested = {
        "type": "error",
        "sequence_number": 2,
        "error": {"code": "rate_limit_exceeded", "message": "x", "param": None},
    }
    assert accounted(responses_stream(("error", nested)), SSE).error_status == 429


# ------------------------------------------------------------------ Anthropic Messages API


def test_an_anthropic_json_answer_counts_its_tokens() -> None:
    accountant = accounted(json.dumps(MESSAGE, indent=2).encode(), JSON)
    assert (accountant.prompt_tokens, accountant.completion_tokens) == (2095, 503)
    assert accountant.usage == MESSAGE["usage"] and accountant.error_status is None


def test_anthropic_cache_reads_and_writes_count_as_prompt_tokens() -> None:
    usage = {
        "input_tokens": 10,
        "cache_creation_input_tokens": 200,
        "cache_read_input_tokens": 1000,
        "output_tokens": 5,
    }
    accountant = accounted(json.dumps({**MESSAGE, "usage": usage}).encode(), JSON)
    assert (accountant.prompt_tokens, accountant.completion_tokens) == (1210, 5)


def test_an_anthropic_stream_merges_message_start_and_message_delta(parsed: list[bytes]) -> None:
    accountant = accounted(
        anthropic_stream({"input_tokens": 25, "output_tokens": 1}, {"output_tokens": 15}),
        SSE,
        pieces=5,
    )
    assert (accountant.prompt_tokens, accountant.completion_tokens) == (25, 15)
    assert accountant.usage == {"input_tokens": 25, "output_tokens": 15}
    assert accountant.error_status is None
    assert len(parsed) == 2  # message_start and message_delta only


def test_an_anthropic_stream_keeps_the_cache_counts_and_takes_message_deltas_newer_ones() -> None:
    start = {
        "input_tokens": 3,
        "cache_creation_input_tokens": 40,
        "cache_read_input_tokens": 500,
        "output_tokens": 1,
    }
    delta = {"input_tokens": 4, "cache_read_input_tokens": None, "output_tokens": 89}  # cumulative
    accountant = accounted(anthropic_stream(start, delta), SSE)
    assert (accountant.prompt_tokens, accountant.completion_tokens) == (4 + 40 + 500, 89)


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        ("overloaded_error", 529),
        ("rate_limit_error", 429),
        ("api_error", 500),
        ("authentication_error", 401),
        ("billing_error", 402),
        ("invalid_request_error", 400),
        ("something_new_error", 502),
    ],
)
def test_an_anthropic_error_event_has_the_status_of_its_type(kind: str, status: int) -> None:
    data = json.dumps({"type": "error", "error": {"type": kind, "message": "Overloaded"}})
    error = f"event: error\ndata: {data}\n\n"
    accountant = accounted(
        anthropic_stream(
            {"input_tokens": 25, "output_tokens": 1}, {"output_tokens": 2}, error.encode()
        ),
        SSE,
    )
    assert accountant.error_status == status
    assert accountant.error_body == {"error": {"type": kind, "message": "Overloaded"}}


def test_an_overloaded_error_mid_stream_is_an_upstream_fault_not_the_keys() -> None:
    driver = Driver({"a": SECRET}, PoolConfig(keys=[KeySpec(key_id="a")]))
    request_id, slot = driver.open(lambda: None)
    assert isinstance(slot.decisions.popleft(), Send)
    assert driver.received(request_id, 1, 200, {}, None) is not None
    error = OVERLOADED
    accountant = accounted(
        anthropic_stream({"input_tokens": 25, "output_tokens": 1}, {"output_tokens": 2}, error), SSE
    )
    driver.finish(request_id, "a", accountant)
    (key,) = driver.status()["keys"]
    assert key["state"] == "healthy"
    assert {name: n for name, n in key["errors"].items() if n} == {"upstream_fault": 1}


# ------------------------------------------------------------------ chat completions as before


def test_chat_completions_usage_and_errors_read_as_before(parsed: list[bytes]) -> None:
    chunk = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"Hi"}}],"usage":null}\n\n'
    usage = (
        b'data: {"id":"c","choices":[],'
        b'"usage":{"prompt_tokens":5,"completion_tokens":7,"cost":0.5}}\n\n'
    )
    accountant = accounted(chunk * 20 + usage + b"data: [DONE]\n\n", SSE)
    assert (accountant.cost, accountant.prompt_tokens, accountant.completion_tokens) == (0.5, 5, 7)
    assert accountant.priced and len(parsed) == 1
    failed = b'data: {"error":{"code":429,"message":"slow","metadata":{}},"choices":[]}\n\n'
    assert accounted(chunk + failed, SSE).error_status == 429


def test_an_error_whose_code_is_a_name_has_that_names_status() -> None:
    """OpenRouter's docs show ``code`` as a string at times; OpenAI's codes are names."""
    for code, status in (("rate_limit_exceeded", 429), ("insufficient_quota", 429), ("x", 502)):
        named = f'data: {{"error":{{"code":"{code}","message":"slow"}}}}\n\n'.encode()
        assert accounted(named, SSE).error_status == status


# ------------------------------------------------------------------ pricing from the tokens

PRICES = {
    "prompt": "0.000003",
    "completion": "0.000015",
    "input_cache_read": "0.0000003",
    "input_cache_write": "0.00000375",
    "internal_reasoning": "0.00001",
}
CATALOG = parse_catalog(
    {"data": [{"id": "gpt-4.1", "pricing": PRICES}, {"id": "claude-sonnet-4-5", "pricing": PRICES}]}
)
P = CATALOG.get("gpt-4.1").pricing  # type: ignore[union-attr]


def test_usage_cost_prices_responses_api_usage() -> None:
    usage = {
        "input_tokens": 1000,
        "input_tokens_details": {"cached_tokens": 600},
        "output_tokens": 300,
        "output_tokens_details": {"reasoning_tokens": 100},
    }
    expected = 400 * 3e-6 + 600 * 3e-7 + 200 * 15e-6 + 100 * 1e-5
    assert usage_cost(P, usage) == pytest.approx(expected, rel=1e-12)


def test_usage_cost_prices_anthropic_usage_with_its_cache() -> None:
    usage = {
        "input_tokens": 10,
        "cache_creation_input_tokens": 200,
        "cache_read_input_tokens": 1000,
        "output_tokens": 5,
    }
    expected = 10 * 3e-6 + 200 * 3.75e-6 + 1000 * 3e-7 + 5 * 15e-6
    assert usage_cost(P, usage) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("model", "body", "content_type", "expected"),
    [
        ("gpt-4.1", json.dumps(RESPONSE, indent=2).encode(), JSON, 36 * 3e-6 + 87 * 15e-6),
        ("gpt-4.1", responses_stream(), SSE, 36 * 3e-6 + 87 * 15e-6),
        ("claude-sonnet-4-5", json.dumps(MESSAGE).encode(), JSON, 2095 * 3e-6 + 503 * 15e-6),
        (
            "claude-sonnet-4-5",
            anthropic_stream(
                {"input_tokens": 25, "cache_read_input_tokens": 100, "output_tokens": 1},
                {"output_tokens": 15},
            ),
            SSE,
            25 * 3e-6 + 100 * 3e-7 + 15 * 15e-6,
        ),
    ],
)
def test_the_driver_prices_an_unpriced_answer_from_its_tokens(
    model: str, body: bytes, content_type: str, expected: float
) -> None:
    driver = Driver({"a": SECRET}, PoolConfig(keys=[KeySpec(key_id="a")]))
    driver.price = pricer(CATALOG)
    finished: list[tuple[float, int, int]] = []
    driver.on_finished.append(
        lambda key, a: finished.append((a.cost, a.prompt_tokens, a.completion_tokens))
    )
    request = json.dumps({"model": model, "input": "hi", "stream": content_type == SSE}).encode()
    request_id, slot = driver.open(lambda: None, body=request)
    assert isinstance(slot.decisions.popleft(), Send)
    assert driver.received(request_id, 1, 200, {}, None) is not None
    driver.finish(request_id, "a", accounted(body, content_type))
    ((cost, prompt, completion),) = finished
    assert (prompt, completion) != (0, 0)
    assert cost == pytest.approx(expected, rel=1e-12)
    assert driver.status()["keys"][0]["spend"] == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------ no stream_options there


@pytest.mark.parametrize(
    "path",
    ["/responses", "/responses?x=1", "/messages", "/messages?beta=true", "/messages/count_tokens"],
)
def test_responses_and_messages_streams_are_not_sent_stream_options(path: str) -> None:
    body = b'{"model":"m","stream":true,"input":"hi"}'
    asking = _http.Upstream.from_url("https://api.openai.com/v1")
    assert asking.stream_usage
    assert asking.body_for(path, body) is body
    assert asking.body_for("/chat/completions", body) != body  # (the rewrite is on)


# ------------------------------------------------------------------ over loopback


class _Fake(BaseHTTPRequestHandler):
    """Answers ``/v1/responses`` and ``/v1/messages`` with a canned stream or
    JSON body, keeping each request's body."""

    answers: ClassVar[dict[str, tuple[str, bytes]]] = {}
    seen: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        self.seen.append((self.path, body))
        content_type, answer = self.answers[self.path]
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake() -> Iterator[str]:
    _Fake.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize(
    ("path", "answer", "tokens"),
    [
        ("/responses", (SSE, responses_stream()), (36, 87)),
        ("/responses", (JSON, json.dumps(RESPONSE, indent=2).encode()), (36, 87)),
        (
            "/messages",
            (
                SSE,
                anthropic_stream({"input_tokens": 25, "output_tokens": 1}, {"output_tokens": 15}),
            ),
            (25, 15),
        ),
        ("/messages", (JSON, json.dumps(MESSAGE).encode()), (2095, 503)),
    ],
)
def test_a_client_sends_these_apis_as_they_are_and_counts_their_usage(
    fake: str, path: str, answer: tuple[str, bytes], tokens: tuple[int, int]
) -> None:
    _Fake.answers = {f"/v1{path}": answer}
    model = "gpt-4.1" if path == "/responses" else "claude-sonnet-4-5"
    request = {"model": model, "stream": answer[0] == SSE, "input": "hi", "max_tokens": 64}
    finished: list[StreamAccountant] = []
    with Client({"a": SECRET}, fake) as client:
        assert client._upstream.stream_usage  # an OpenAI-compatible upstream: asked for usage
        client.driver.price = pricer(CATALOG)
        client.driver.on_finished.append(lambda key, a: finished.append(a))
        with client.stream("POST", path, json=request) as reply:
            received = b"".join(reply.iter_bytes())
        status = client.status()
    assert received == answer[1]
    ((sent_path, sent),) = _Fake.seen
    assert sent_path == f"/v1{path}" and b"stream_options" not in sent
    (accountant,) = finished
    assert (accountant.prompt_tokens, accountant.completion_tokens) == tokens
    expected = tokens[0] * 3e-6 + tokens[1] * 15e-6
    assert accountant.cost == pytest.approx(expected, rel=1e-12)
    assert status["keys"][0]["spend"] == pytest.approx(expected, rel=1e-12)
