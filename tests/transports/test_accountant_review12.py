"""Review 12 of the accountant and the fake's answer bodies.

1. OpenRouter's non-streaming answer whose generation failed midway is a 200
   with the error in ``choices[0].error`` (errors-and-debugging, "Skin-specific
   error formats"); it counted as a success.
2. An OpenAI-compatible upstream streams usage only when the request asks
   (``stream_options.include_usage``); keyrotor never asked, so a streamed
   answer cost $0. The fake, as OpenAI, now sends it only when asked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest

from keyrotor.adapters.config import load_config
from keyrotor.testing import FakeUpstream, MidStreamError, Scenario
from keyrotor.testing.catalogs import realistic_models
from keyrotor.transports import _driver, _http
from keyrotor.transports._http import Response, json_or_raise
from keyrotor.transports.api import AsyncClient, StreamAccountant
from keyrotor.transports.errors import UpstreamError

from ..adapters.proxy_thread import ProxyThread

SECRET = "sk-or-v1-test-review12-accountant-aaaa"
KEYS = {"k1": "sk-or-v1-test-review12-one-bbbbbbbbb", "k2": "sk-or-v1-test-review12-two-ccccccccc"}
ALICE = "alice-token-review12-0123456789"
HI = [{"role": "user", "content": "hi"}]
FAILED = {"code": 502, "message": "Provider disconnected", "metadata": {"error_type": "x"}}


def failed_answer(error: Any, where: str) -> dict[str, Any]:
    """OpenRouter's non-streaming answer that failed midway, its error at ``where``."""
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": "partial output..."},
        "finish_reason": "error",
    }
    answer: dict[str, Any] = {"id": "gen-1", "object": "chat.completion", "choices": [choice]}
    if where == "choice":
        choice["error"] = error
    else:
        answer["error"] = error
    return answer


def accounted(body: bytes, content_type: str = "application/json") -> StreamAccountant:
    accountant = StreamAccountant(content_type)
    half = len(body) // 2
    accountant.feed(body[:half])
    accountant.feed(body[half:])
    accountant.close()
    return accountant


# ------------------------------------------------------------------ 1. an error in a choice


@pytest.mark.parametrize("where", ["choice", "top"])
@pytest.mark.parametrize(("code", "status"), [(502, 502), (429, 429), ("oops", 502), (99, 502)])
def test_a_json_answer_that_carries_an_error_in_a_choice_or_on_top_failed(
    where: str, code: Any, status: int
) -> None:
    error = {**FAILED, "code": code}
    accountant = accounted(json.dumps(failed_answer(error, where)).encode())
    assert accountant.error_status == status
    assert accountant.error_body == {"error": error}


def test_a_later_choice_error_counts_and_an_error_that_is_no_object_does_not() -> None:
    answer = failed_answer(FAILED, "choice")
    answer["choices"].insert(0, {"index": 1, "message": {"content": "ok"}, "error": "text"})
    assert accounted(json.dumps(answer).encode()).error_status == 502
    answer["choices"] = [{"index": 0, "error": None}, "not a choice"]
    assert accounted(json.dumps(answer).encode()).error_status is None


def test_a_json_answer_without_error_bytes_is_never_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(body: bytes) -> Any:
        raise AssertionError("the whole body was parsed")

    monkeypatch.setattr(_driver, "parse_json", refuse)
    text = 'the model wrote "error" and {"error": 1} in its answer ' * 2000  # escaped in JSON
    body = json.dumps(
        {
            "choices": [{"index": 0, "message": {"content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "cost": 0.5},
        }
    ).encode()
    assert b'"error"' not in body
    accountant = accounted(body)
    assert accountant.error_status is None
    assert (accountant.cost, accountant.completion_tokens) == (0.5, 4)


def test_an_sse_chunk_whose_choice_carries_an_error_failed() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]}
    chunk["choices"][0]["error"] = {"code": 429, "message": "slow down"}
    stream = (
        b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\ndata: '
        + json.dumps(chunk).encode()
        + b"\n\n"
    )
    accountant = accounted(stream, "text/event-stream")
    assert accountant.error_status == 429
    assert accountant.error_body == {"error": chunk["choices"][0]["error"]}


def test_chat_raises_for_a_200_whose_choice_carries_an_error() -> None:
    body = json.dumps(failed_answer(FAILED, "choice")).encode()
    with pytest.raises(UpstreamError) as raised:
        json_or_raise(Response(200, {}, body, "k1", 1))
    assert raised.value.status == 502
    fine = json.dumps({"choices": [{"index": 0, "message": {"content": "ok"}}]}).encode()
    assert json_or_raise(Response(200, {}, fine, "k1", 1))["choices"][0]["message"]


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_the_fake_puts_a_failed_generations_error_in_its_choice_and_the_client_counts_it(
    path: str,
) -> None:
    scenario = Scenario().add(SECRET, MidStreamError(after_chunks=2, code=503), alias="k")

    async def main() -> tuple[Any, dict[str, Any], int]:
        async with FakeUpstream(scenario).serve() as upstream:
            async with AsyncClient({"k": SECRET}, upstream.url) as client:
                body = {"model": "openai/gpt-4o-mini", "messages": HI, "prompt": "hi"}
                reply = await client.request("POST", path, json=body)
                with pytest.raises(UpstreamError) as raised:
                    json_or_raise(reply)
                return reply.json(), client.status()["keys"][0], raised.value.status

    answer, key, status = anyio.run(main)
    assert "error" not in answer  # OpenRouter's documented non-streaming shape
    (choice,) = answer["choices"]
    assert choice["finish_reason"] == "error"
    assert choice["error"]["code"] == 503 and choice["error"]["metadata"]["error_type"]
    assert status == 503
    assert sum(key["errors"].values()) == 1  # (its 200 head counted as a success too)


# ------------------------------------------------------------------ 2. usage in a stream


def sse_data(text: str) -> list[Any]:
    lines = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize(
    ("report_cost", "options", "usage_chunk"),
    [
        (False, None, None),
        (False, {"include_usage": False}, None),
        (False, {"include_usage": True}, "openai"),
        (True, None, "openrouter"),
        (True, {"include_usage": True}, "openrouter"),
    ],
)
def test_the_fake_as_openai_streams_its_usage_only_when_asked(
    report_cost: bool, options: Any, usage_chunk: str | None
) -> None:
    scenario = Scenario(report_cost=report_cost).add(SECRET, alias="k")
    body: dict[str, Any] = {"model": "openai/gpt-4o-mini", "messages": HI, "stream": True}
    if options is not None:
        body["stream_options"] = options
    with FakeUpstream.running_in_thread(scenario) as upstream:
        reply = httpx.post(
            f"{upstream.url}/chat/completions",
            json={**body, "max_tokens": 3},
            headers={"Authorization": f"Bearer {SECRET}"},
        )
    chunks = sse_data(reply.text)
    last = chunks[-1]
    if usage_chunk is None:
        assert all("usage" not in chunk for chunk in chunks)
        return
    assert last["usage"]["completion_tokens"] == 3
    assert ("cost" in last["usage"]) is report_cost
    if usage_chunk == "openai":  # choices empty; the chunks before it carry "usage": null
        assert last["choices"] == []
        assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    else:
        assert len(last["choices"]) == 1


@pytest.mark.parametrize(
    ("url", "asks"),
    [
        ("https://openrouter.ai/api/v1", False),
        ("https://eu.openrouter.ai/api/v1/", False),
        ("https://api.mistral.ai/v1", False),
        ("http://127.0.0.1:9000/api/v1", False),  # laid out as OpenRouter's (the fake's)
        ("https://api.openai.com/v1", True),
        ("https://api.groq.com/openai/v1", True),
        ("http://127.0.0.1:9000/v1", True),
        ("https://notopenrouter.ai/v1", True),
    ],
)
def test_a_client_asks_for_stream_usage_unless_the_upstream_reports_it_unasked(
    url: str, asks: bool
) -> None:
    assert _http.Upstream.from_url(url).stream_usage is asks
    assert _http.Upstream.from_url(url, stream_usage=not asks).stream_usage is not asks


ASK = {"include_usage": True}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"model":"m","stream":true}', {"model": "m", "stream": True, "stream_options": ASK}),
        (b' {"stream" : true , "n": 1 }\n', {"stream": True, "n": 1, "stream_options": ASK}),
        (b'{"stream":false}', None),
        (b'{"model":"m","messages":[]}', None),
        (b'{"stream":true,"stream_options":{"include_usage":false}}', None),  # the caller's
        (b'{"stream":true,"stream_options":null}', None),
        (b'{"messages":[{"content":"\\"stream\\": true"}]}', None),  # a string, not a member
        (b'{"stream": true', None),  # no JSON object: left to the upstream
        (b"[1]", None),
    ],
)
def test_ask_usage_adds_stream_options_to_a_stream_without_them(
    body: bytes, expected: dict[str, Any] | None
) -> None:
    sent = _http.ask_usage(body)
    if expected is None:
        assert sent is body
    else:
        assert json.loads(sent) == expected


def test_ask_usage_finds_the_members_without_parsing_a_long_body(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(body: bytes) -> Any:
        raise AssertionError("the whole body was parsed")

    monkeypatch.setattr(_http, "parse_json", refuse)
    turns = [{"role": "user", "content": '"stream_options" x ' * 20} for _ in range(2000)]
    body = json.dumps({"model": "gpt-4o", "messages": turns, "stream": True}).encode()
    assert len(body) > 200_000
    sent = _http.ask_usage(body)
    assert sent == body[:-1] + b',"stream_options":{"include_usage":true}}'


@pytest.mark.parametrize(
    ("path", "changed"),
    [
        ("/chat/completions", True),
        ("/chat/completions?trace=1", True),
        ("/completions", True),
        ("/responses", False),
        ("/embeddings", False),
        ("/models", False),
    ],
)
def test_only_completions_are_asked_for_usage_and_only_on_such_upstreams(
    path: str, changed: bool
) -> None:
    body = b'{"model":"m","stream":true}'
    asking = _http.Upstream.from_url("https://api.openai.com/v1")
    assert (asking.body_for(path, body) != body) is changed
    assert _http.Upstream.from_url("https://openrouter.ai/api/v1").body_for(path, body) is body


def test_the_accountant_parses_no_usage_null_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """An OpenAI stream that asked for its usage has ``"usage":null`` in every
    chunk: only the last one, the usage, is parsed."""
    parsed: list[bytes] = []
    real = _driver.parse

    def counting(data: bytes) -> Any:
        parsed.append(data)
        return real(data)

    monkeypatch.setattr(_driver, "parse", counting)
    chunk = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"Hi"}}],"usage":null}\n\n'
    usage = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7}}\n\n'
    accountant = accounted(chunk * 50 + usage + b"data: [DONE]\n\n", "text/event-stream")
    assert (accountant.prompt_tokens, accountant.completion_tokens) == (5, 7)
    assert len(parsed) == 1


def write_config(tmp_path: Path, url: str) -> Path:
    keys = "".join(f'[[keys]]\nalias = "{a}"\nsecret = "{s}"\n' for a, s in KEYS.items())
    path = tmp_path / "keyrotor.toml"
    path.write_text(
        f'upstream = "{url}"\n[state]\nenabled = false\n[catalog]\nenabled = true\n'
        '[[clients]]\nname = "alice"\ntoken_env = "ALICE_TOKEN"\n'
        '[[budgets]]\nclient = "alice"\nbudget = 100.0\n'
        f"{keys}"
    )
    return path


def test_the_proxy_asks_an_openai_compatible_upstream_for_stream_usage_and_charges_it(
    tmp_path: Path,
) -> None:
    models = realistic_models()
    paid = next(m for m in models if float(m.prompt) > 0 and m.id.startswith("openai/"))
    scenario = Scenario(report_cost=False, models=models)  # OpenAI's: usage only when asked
    for alias, secret in KEYS.items():
        scenario.add(secret, alias=alias)
    auth = {"authorization": f"Bearer {ALICE}"}
    with FakeUpstream.running_in_thread(scenario) as upstream:
        path = write_config(tmp_path, upstream.origin + "/v1")  # laid out as OpenAI's
        config = load_config(path, {"ALICE_TOKEN": ALICE}, {"port": 0})
        with ProxyThread(config, []) as url:
            listed = httpx.get(f"{url}/v1/models", headers=auth)
            assert paid.id in {m["id"] for m in listed.json()["data"]}  # prices are in
            with openai.OpenAI(base_url=f"{url}/v1", api_key=ALICE, max_retries=0) as sdk:
                chunks = list(
                    sdk.chat.completions.create(
                        model=paid.id,
                        messages=HI,  # type: ignore[arg-type]
                        stream=True,  # and no stream_options: the proxy asks
                        max_tokens=6,
                    )
                )
            status = httpx.get(f"{url}/status", headers=auth).json()
        charged = sum(upstream.stats(alias).cost for alias in KEYS)
    # The usage chunk OpenAI sends when asked (no choices) reaches the caller.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert charged > 0
    spend = status["spend"]
    assert spend["models"][paid.id]["cost"] == pytest.approx(charged, rel=1e-9)
    assert sum(k["spend"] for k in status["keys"]) == pytest.approx(charged, rel=1e-9)
    (budget,) = spend["budgets"]
    assert budget["spent"] == pytest.approx(charged, rel=1e-9)
