"""What callers write and upstreams answer, read as they mean it, through the proxy.

The model a request names is read as the upstream reads it (escapes decoded,
the last of a repeated key), so a per-model budget cannot be slipped; numbers
in an answer's usage that are not finite count as absent; an upstream's
connection headers, cookies and ids stay on its side; a model name any caller
may write comes back as a header, never as a 500 after the upstream served.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from keyrotor.adapters.config import load_config
from keyrotor.adapters.proxy.app import header_value
from keyrotor.adapters.proxy.model_health import model_of
from keyrotor.testing import Chain, Custom, FakeUpstream, Ok, Reply, Scenario
from keyrotor.testing.catalogs import realistic_models
from keyrotor.transports._driver import StreamAccountant, usage_of

from .proxy_thread import ProxyThread

SECRET = "sk-or-v1-inputs-one-aaaaaaaaaaaaaaaa"
MINI = "openai/gpt-4o-mini"
HI = '"messages":[{"role":"user","content":"hi"}]'
PLAIN = json.dumps({"model": MINI, "messages": [{"role": "user", "content": "hi"}]}).encode()
SEEN: list[Any] = []


def note_model(call: Any) -> None:
    SEEN.append(call.body.get("model") if isinstance(call.body, dict) else None)


def proxy_config(tmp_path: Path, url: str, extra: str = "") -> Any:
    path = tmp_path / "keyrotor.toml"
    path.write_text(
        f'upstream = "{url}"\n[state]\nenabled = false\n{extra}\n'
        '[[keys]]\nalias = "k1"\nsecret_env = "KEY_K1"\n'
    )
    return load_config(path, {"KEY_K1": SECRET}, {"port": 0})


def scenario(behaviour: Any = None, **options: Any) -> Scenario:
    fake = Scenario(models=realistic_models(), **options)
    fake.add(SECRET, Chain(Custom(note_model), behaviour or Ok()), alias="k1")
    return fake


def post(url: str, body: bytes, **headers: str | bytes) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json", **headers},
        timeout=30,
    )


@pytest.mark.parametrize(
    "written",
    [
        '{"model":"openai\\/gpt-4o-mini",%s}',  # an escaped slash
        '{"model":"openai/gpt-4o-m\\u0069ni",%s}',  # an escaped letter
        '{"model":"x/other","model":"openai/gpt-4o-mini",%s}',  # the last of a repeated key
        '{"model":"x/other","mod\\u0065l":"openai/gpt-4o-mini",%s}',  # a key with an escape
        '{"model":"x/other","x\\"model":"y","model":"openai/gpt-4o-mini",%s}',  # a longer key
    ],
)
def test_a_model_budget_holds_however_the_caller_writes_the_model(
    tmp_path: Path, written: str
) -> None:
    SEEN.clear()
    budget = f'[[budgets]]\nmodel = "{MINI}"\nbudget = 0.000000001\n'
    with FakeUpstream.running_in_thread(scenario()) as upstream:
        with ProxyThread(proxy_config(tmp_path, upstream.url, budget), []) as url:
            plain = post(url, PLAIN)
            refused = post(url, (written % HI).encode())
            other = post(url, PLAIN.replace(MINI.encode(), b"x/other"))
    for answer in (plain, refused):  # the budget is below any request's estimate
        assert answer.status_code == 429 and answer.json()["error"]["code"] == "budget_exceeded"
    assert other.status_code == 200  # another model has no budget
    assert SEEN == ["x/other"]


def test_model_of_reads_the_model_the_upstream_reads() -> None:
    assert model_of(b'{"messages":[],"model":"a\\"b"}') == 'a"b'
    assert model_of(b'{"model":"x","model":"y"}') == "y"
    assert model_of(b'{"model":"x","x\\"model":"y"}') == "x"
    assert model_of(b'{"model": "\\ud800"}') is None  # JSON, but no string UTF-8 can store
    long_name = "m" * 201
    assert model_of(json.dumps({"model": long_name}).encode()) is None  # no model is named so
    # A key written with escaped letters is the key to the upstream: seen when strict.
    sly = b'{"model":"cheap","mod\\u0065l":"pricey"}'
    assert json.loads(sly)["model"] == "pricey" == model_of(sly, strict=True)
    assert model_of(sly) == "cheap"  # (not strict: not looked for, json_body's docstring)


def test_an_upstreams_connection_headers_cookies_and_ids_stay_on_its_side(tmp_path: Path) -> None:
    sent = {
        "Upgrade": "h2c",
        "Proxy-Authenticate": "Basic realm=up",
        "Trailer": "X-Checksum",
        "Connection": "x-hop-only",
        "X-Hop-Only": "internal",
        "Set-Cookie": "__cf_bm=abc; path=/",
        "X-Request-Id": "req_upstream_1",
        "X-Keyrotor-Key": "forged",
        "Alt-Svc": 'h3=":443"',
    }
    body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "hi"}}]})
    reply = Reply(200, headers=tuple(sent.items()), body=body)
    with FakeUpstream.running_in_thread(scenario(reply)) as upstream:
        with ProxyThread(proxy_config(tmp_path, upstream.url), []) as url:
            answer = post(url, PLAIN)
    assert answer.status_code == 200
    for name in ("upgrade", "proxy-authenticate", "trailer", "x-hop-only", "set-cookie"):
        assert name not in answer.headers
    assert answer.headers.get_list("x-keyrotor-key") == ["k1"]
    assert len(answer.headers.get_list("x-request-id")) == 1  # the proxy's own
    assert answer.headers["x-request-id"] != "req_upstream_1"
    assert answer.headers["x-upstream-request-id"] == "req_upstream_1"
    assert answer.headers["alt-svc"] == 'h3=":443"'  # an end-to-end header passes


def test_a_model_name_any_caller_writes_comes_back_as_a_header_not_a_500(tmp_path: Path) -> None:
    SEEN.clear()
    routing = "[catalog]\nenabled = true\n[routing]\nfree_per_day = 50\n"
    with FakeUpstream.running_in_thread(scenario()) as upstream:
        log: list[dict[str, Any]] = []
        with ProxyThread(proxy_config(tmp_path, upstream.url, routing), log) as url:
            name = "模型 x:free"
            answer = post(url, json.dumps({"model": name, "messages": []}).encode())
            pinned = post(
                url,
                PLAIN,
                **{"x-keyrotor-key": "²".encode("latin-1")},
            )
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-keyrotor-model"] == header_value(name) == "%E6%A8%A1%E5%9E%8B%20x:free"
    assert SEEN[0] == name
    assert pinned.status_code == 200  # "²" is no index: an alias no key has
    assert pinned.headers["x-keyrotor-pin"] == "fallback: unknown key"
    assert not [line for line in log if line.get("event") == "app_error"]
    assert header_value("openai/gpt-4o-mini:free") == "openai/gpt-4o-mini:free"
    assert header_value("a\r\nset-cookie: x") == "a%0D%0Aset-cookie:%20x"


def test_a_nested_models_key_is_forwarded_while_the_catalog_cannot_be_fetched(
    tmp_path: Path,
) -> None:
    SEEN.clear()
    tool = {
        "type": "function",
        "function": {"name": "pick", "parameters": {"required": ["models"]}},
    }
    body = json.dumps({"model": MINI, "messages": [], "tools": [tool]}).encode()
    fake = scenario(models_reply=Reply(503))
    with FakeUpstream.running_in_thread(fake) as upstream:
        config = proxy_config(tmp_path, upstream.url, "[catalog]\nenabled = true\n")
        with ProxyThread(config, []) as url:
            answer = post(url, body)
    assert answer.status_code == 200, answer.text
    assert SEEN == [MINI]


@pytest.mark.parametrize(
    "tokens", ["NaN", "Infinity", "-Infinity", "1e400", "1" + "0" * 400, '"nan"', '"inf"', "-5"]
)
def test_usage_numbers_that_are_not_finite_counts_are_counted_as_none(tokens: str) -> None:
    usage = f'{{"prompt_tokens": {tokens}, "completion_tokens": 3, "cost": {tokens}}}'
    assert usage_of(json.loads(f'{{"usage": {usage}}}'))[1:] == (0, 3)
    for body in (f'{{"usage": {usage}}}', f'data: {{"usage": {usage}}}\n\n'):
        accountant = StreamAccountant("text/event-stream" if body[0] == "d" else "application/json")
        accountant.feed(body.encode())
        accountant.close()
        assert (accountant.cost, accountant.prompt_tokens, accountant.completion_tokens) == (
            0.0,
            0,
            3,
        )
        assert not accountant.priced  # priced from its tokens instead


def test_an_answer_whose_usage_is_not_a_number_is_delivered(tmp_path: Path) -> None:
    usage = '{"prompt_tokens": NaN, "completion_tokens": 1e400, "cost": Infinity}'
    body = '{"choices":[{"message":{"role":"assistant","content":"hi"}}],"usage":' + usage + "}"
    with FakeUpstream.running_in_thread(scenario(Reply(200, body=body))) as upstream:
        with ProxyThread(proxy_config(tmp_path, upstream.url), []) as url:
            answer = post(url, PLAIN)
    assert answer.status_code == 200 and answer.content == body.encode()


def test_model_names_no_catalog_lists_are_not_tracked(tmp_path: Path) -> None:
    """Every name a caller writes would take a row of the model table (1,000 at
    most): a catalog's models would then go uncounted, and a route's ``fastest``
    would never learn their times."""
    with FakeUpstream.running_in_thread(scenario()) as upstream:
        config = proxy_config(tmp_path, upstream.url, "[catalog]\nenabled = true\n")
        with ProxyThread(config, []) as url:
            for name in ("made/up-1", "made/up-2", MINI):
                post(url, json.dumps({"model": name, "messages": []}).encode())
            models = httpx.get(f"{url}/status").json()["models"]
    assert set(models) == {MINI}
