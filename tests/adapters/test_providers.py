"""Several providers in one proxy: a request's model picks the upstream, and a
provider's keys never serve another."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyrotor.adapters.config import ConfigError, load_config
from keyrotor.adapters.proxy.app import ProxyApp
from keyrotor.adapters.proxy.providers import Routes, top_model
from keyrotor.adapters.proxy.types import Request
from keyrotor.testing import FakeUpstream, Model, Scenario
from keyrotor.transports.api import AsyncClient

from .proxy_thread import ProxyThread

MAIN = {"m1": "sk-or-v1-main-one-jkjkjkjkjkjkjkjk", "m2": "sk-or-v1-main-two-jkjkjkjkjkjkjkjk"}
OTHER = {"o1": "sk-other-one-mnmnmnmnmnmnmnmnmnmn", "o2": "sk-other-two-mnmnmnmnmnmnmnmnmnmn"}


def fake(secrets: dict[str, str]) -> Scenario:
    scenario = Scenario()
    for alias, secret in secrets.items():
        scenario.add(secret, alias=alias)
    return scenario


def write_config(tmp_path: Path, main_url: str, other_url: str, extra: str = "") -> Path:
    keys = "".join(
        f'[[keys]]\nalias = "{alias}"\nsecret_env = "KEY_{alias.upper()}"\n{provider}\n'
        for secrets, provider in ((MAIN, ""), (OTHER, 'provider = "other"'))
        for alias in secrets
    )
    path = tmp_path / "keyrotor.toml"
    path.write_text(
        f'upstream = "{main_url}"\n[state]\nenabled = false\n'
        f'[[providers]]\nname = "other"\nupstream = "{other_url}"\n'
        f'models = ["special-model"]\n{extra}\n{keys}'
    )
    return path


def environ() -> dict[str, str]:
    return {f"KEY_{alias.upper()}": secret for alias, secret in {**MAIN, **OTHER}.items()}


def wait_for_catalog(url: str, models: int = 1) -> None:
    """Until the provider's catalog (fetched at start, beside everything else) is in."""
    deadline = time.monotonic() + 30  # a hang guard only
    while httpx.get(f"{url}/status").json()["catalog"]["providers"]["other"]["models"] < models:
        assert time.monotonic() < deadline, "the provider's catalog never came"
        time.sleep(0.02)


def test_requests_go_to_the_provider_their_model_names(tmp_path: Path) -> None:
    with (
        FakeUpstream.running_in_thread(fake(MAIN)) as main,
        FakeUpstream.running_in_thread(fake(OTHER)) as other,
    ):
        config = load_config(write_config(tmp_path, main.url, other.url), environ(), {"port": 0})
        assert [p.name for p in config.providers] == ["other"]
        assert set(config.keys) == set(MAIN) and set(config.providers[0].keys) == set(OTHER)
        with ProxyThread(config, []) as url:
            wait_for_catalog(url)
            hi = [{"role": "user", "content": "hi"}]
            with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as sdk:
                served = {
                    model: sdk.chat.completions.create(model=model, messages=hi).model  # type: ignore[arg-type]
                    for model in ("openai/gpt-4o-mini", "other/gpt-x", "special-model")
                }
            status = httpx.get(f"{url}/status").json()
            metrics = httpx.get(f"{url}/metrics").text
    # The prefix is taken off for the provider; a claimed model goes as it is.
    assert served == {
        "openai/gpt-4o-mini": "openai/gpt-4o-mini",
        "other/gpt-x": "gpt-x",
        "special-model": "special-model",
    }
    chats = [(e.key, e.path) for e in main.log if e.path == "/chat/completions"]
    assert [key for key, _ in chats] == ["m1"]
    assert sorted(e.key for e in other.log if e.path == "/chat/completions") == ["o1", "o2"]
    assert set(status["providers"]) == {"other"}
    assert {k["alias"] for k in status["providers"]["other"]["keys"]} == set(OTHER)
    assert {k["alias"] for k in status["keys"]} == set(MAIN)
    # /metrics: the main upstream's keys as before, a provider's with its name.
    assert 'keyrotor_key_state{key="m1",state="healthy"} 1' in metrics
    sent = re.findall(r'keyrotor_key_requests_total\{provider="other",key="o\d"\} (\d+)', metrics)
    delivered = 'keyrotor_pool_requests_total{provider="other",outcome="delivered"} 3'
    assert sum(map(int, sent)) == 3 and delivered in metrics  # two chats and its catalog


@pytest.mark.parametrize(
    ("extra", "keys_for", "message"),
    [
        ("", {"other": []}, "provider 'other' has no keys"),
        ('[[providers]]\nname = "other"\nupstream = "http://127.0.0.1:9"\n', None, "already used"),
        (
            '[[providers]]\nname = "third"\nupstream = "http://127.0.0.1:9"\n'
            'models = ["special-model"]\n[[keys]]\nalias = "t1"\nsecret = "sk-third-000000"\n'
            'provider = "third"\n',
            None,
            "'special-model' is also claimed by provider 'other'",
        ),
        ('[[providers]]\nname = "Bad Name"\nupstream = "http://x"\n', None, "lower-case"),
        ('[[providers]]\nname = "x"\nupstream = "http://x"\nkind = "soap"\n', None, "kind"),
        ('[[providers]]\nname = "x"\n', None, "has no upstream"),
        ('[[providers]]\nname = "x"\nupstream = "ftp://x"\n', None, r"http\(s\) URL"),
        ('[[providers]]\nname = "x"\nupstream = "http://x"\ncolor = 1\n', None, "unknown option"),
        ('[[providers]]\nname = "main"\nupstream = "http://x"\n', None, "main upstream's name"),
    ],
)
def test_bad_providers_are_one_clear_error(
    tmp_path: Path, extra: str, keys_for: Any, message: str
) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2", extra)
    if keys_for is not None:  # the provider's keys taken away
        text = path.read_text().replace('provider = "other"', "")
        text = text.replace('alias = "o1"', 'alias = "x1"').replace('alias = "o2"', 'alias = "x2"')
        path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ(), {})


def test_a_key_naming_an_undeclared_provider_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.toml"
    path.write_text('[[keys]]\nalias = "a"\nsecret = "sk-aaaaaaaaaaaaaaaa"\nprovider = "nowhere"\n')
    with pytest.raises(ConfigError, match="provider 'nowhere' is not declared"):
        load_config(path, {}, {})


MODELS = st.sampled_from(
    [
        "openai/gpt-4o-mini",
        "other/gpt-x",
        "other/",
        "other",
        "otherx/y",
        "/other",
        "special-model",
        "special-model-2",
        "Other/gpt",
    ]
)


@settings(max_examples=20, deadline=None)
@given(st.lists(MODELS, min_size=1, max_size=6))
def test_a_key_of_one_provider_never_reaches_another(models: list[str]) -> None:
    async def main() -> tuple[list[Any], list[Any]]:
        async with (
            FakeUpstream(fake(MAIN)).serve() as main_server,
            FakeUpstream(fake(OTHER)).serve() as other_server,
            AsyncClient(MAIN, main_server.url) as main_client,
            AsyncClient(OTHER, other_server.url) as other_client,
        ):
            routes = Routes({"other": other_client}, {"special-model": "other"})
            app = ProxyApp(main_client, routes=routes)
            for model in models:
                body = json.dumps({"model": model, "messages": [{"role": "user", "content": "x"}]})
                request = Request(
                    method="POST",
                    target="/v1/chat/completions",
                    headers=[("content-type", "application/json")],
                    body=body.encode(),
                )
                answer = await app(request)
                assert answer.status == 200
            return list(main_server.log), list(other_server.log)

    main_log, other_log = anyio.run(main)
    assert {e.key for e in main_log} <= set(MAIN)
    assert {e.key for e in other_log} <= set(OTHER)
    expected_other = sum(
        1 for m in models if m == "special-model" or (m.startswith("other/") and m != "other/")
    )
    assert len(other_log) == expected_other
    assert len(main_log) == len(models) - expected_other


def test_each_providers_catalog_is_listed_under_request_names_and_prices_its_answers(
    tmp_path: Path,
) -> None:
    theirs = (
        Model("special-model", "Special", "0.000001", "0.000002"),
        Model("gpt-x", "GPT X", "0.000003", "0.000004"),
    )
    other_scenario = fake(OTHER)
    other_scenario.models, other_scenario.report_cost = theirs, False
    with (
        FakeUpstream.running_in_thread(fake(MAIN)) as main,
        FakeUpstream.running_in_thread(other_scenario) as other,
    ):
        config = load_config(write_config(tmp_path, main.url, other.url), environ(), {"port": 0})
        with ProxyThread(config, []) as url:
            wait_for_catalog(url, 2)
            with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as sdk:
                ids = {m.id for m in sdk.models.list()}
                assert sdk.models.retrieve("other/gpt-x").id == "other/gpt-x"
                hi = [{"role": "user", "content": "hi"}]
                sdk.chat.completions.create(model="other/gpt-x", messages=hi)  # type: ignore[arg-type]
            status = httpx.get(f"{url}/status").json()
    # The claimed model under its own name, the other as other/...; the main catalog's too.
    assert {"special-model", "other/gpt-x", "openai/gpt-4o-mini"} <= ids
    assert "other/special-model" not in ids
    # An OpenAI-compatible /models needs a key: one of its own pool's; the main one's is public.
    fetched = [e.key for e in other.log if e.path == "/models"]
    assert fetched and set(fetched) <= set(OTHER)
    assert {e.key for e in main.log if e.path == "/models"} == {None}
    # Its answers report no cost: priced from its catalog.
    charged = sum(other.stats(alias).cost for alias in OTHER)
    assert charged > 0
    assert status["spend"]["providers"]["other"]["cost"] == pytest.approx(charged, rel=1e-9)


def test_the_admin_api_adds_lists_marks_and_removes_a_providers_keys_across_restarts(
    tmp_path: Path,
) -> None:
    admin = "admin-token-" + "pq" * 12
    extra = "sk-other-three-mnmnmnmnmnmnmnmnmn"
    env = {
        **environ(),
        "KEYROTOR_ADMIN_TOKEN": admin,
        "KEYROTOR_SECRET_KEY": "hW5g9Qm3R0c2Qm1u8cH3xJ7S9bL4pV2nZ6tY1wE5aUk=",
    }
    other_scenario = fake(OTHER).add(extra, alias="o3")
    auth = {"authorization": f"Bearer {admin}"}
    with (
        FakeUpstream.running_in_thread(fake(MAIN)) as main,
        FakeUpstream.running_in_thread(other_scenario) as other,
    ):
        path = write_config(tmp_path, main.url, other.url)
        path.write_text(path.read_text().replace("enabled = false", f'path = "{tmp_path}/s.db"'))

        def serve() -> ProxyThread:
            return ProxyThread(load_config(path, env, {"port": 0}), [])

        with serve() as url:
            admin_api = httpx.Client(base_url=url, headers=auth)
            added = admin_api.post(
                "/admin/keys", json={"key": extra, "alias": "o3", "provider": "other", "rpm": 60}
            )
            assert added.status_code == 201, added.text
            assert (added.json()["provider"], added.json()["stored"]) == ("other", True)
            refused = [
                admin_api.post("/admin/keys", json={"key": "sk-x-" + "k" * 20, "provider": "nope"}),
                admin_api.post("/admin/keys", json={"key": "sk-y-" + "k" * 20, "alias": "o1"}),
            ]
            assert [r.status_code for r in refused] == [400, 409]
            assert "not configured" in refused[0].text and "another provider" in refused[1].text
            listed = {
                k["alias"]: k["provider"] for k in admin_api.get("/admin/keys").json()["keys"]
            }
            assert listed == {
                "m1": "main",
                "m2": "main",
                "o1": "other",
                "o2": "other",
                "o3": "other",
            }
            for alias in ("o1", "o2"):  # only o3 left to serve the provider
                marked = admin_api.post(f"/admin/keys/{alias}/state", json={"state": "disabled"})
                assert marked.json()["state"] == "disabled"
            hi = [{"role": "user", "content": "hi"}]
            answer = httpx.post(
                f"{url}/v1/chat/completions", json={"model": "other/x", "messages": hi}
            )
            assert answer.headers["x-keyrotor-key"] == "o3"
            admin_api.close()
        with serve() as url:  # the stored key comes back in its provider's pool
            admin_api = httpx.Client(base_url=url, headers=auth)
            keys = {k["alias"]: k for k in admin_api.get("/admin/keys").json()["keys"]}
            assert (keys["o3"]["provider"], keys["o3"]["source"]) == ("other", "api")
            assert keys["o3"]["options"] == {"rpm": 60.0}
            assert admin_api.delete("/admin/keys/o3").json()["unstored"] is True
            assert admin_api.post("/admin/probe", json={"alias": "o3"}).status_code == 404
            admin_api.close()
        with serve() as url:
            listed = httpx.get(f"{url}/admin/keys", headers=auth).json()["keys"]
            assert "o3" not in {k["alias"] for k in listed}
    assert extra not in (tmp_path / "s.db").read_bytes().decode("latin-1")


@settings(max_examples=200, deadline=None)
@given(
    MODELS,
    st.sampled_from([0, 2_000, 40_000]),
    st.sampled_from([0, 2_000, 40_000]),
    st.sampled_from([None, "other/nested", "special-model"]),
    st.booleans(),
)
def test_the_provider_found_without_parsing_is_the_one_parsing_finds(
    model: str, before: int, after: int, nested: str | None, spaced: bool
) -> None:
    """``Routes.pick`` reads the model without parsing when it can (an agent's
    long body) and replaces it in place: the same provider and the same
    document as parsing and rewriting the body."""
    routes = Routes({"other": object()}, {"special-model": "other"})  # type: ignore[dict-item]
    document: dict[str, Any] = {"messages": [{"role": "user", "content": '"\\{[' * (before // 4)}]}
    if nested is not None:
        document["metadata"] = {"model": nested}
    document["model"] = model
    document["tools"] = [{"description": "]}" * (after // 2)}]
    body = json.dumps(document, separators=(", ", ": ") if spaced else (",", ":")).encode()
    picked, parsed = routes.pick(body), routes._pick_parsed(body)
    assert (picked is None) == (parsed is None)
    if picked is not None and parsed is not None:
        assert picked[0] == parsed[0]
        assert json.loads(picked[1]) == json.loads(parsed[1])
        if nested is None and 0 in (before, after):  # not parsed: rewritten in place
            assert picked[1].replace(b'"gpt-x"', b'"other/gpt-x"') == body


def test_top_model_reads_the_top_level_model_string_as_json_does() -> None:
    assert top_model(b'{"messages": [], "model": "a/b"}') == "a/b"
    assert top_model(b'{"model": "a\\/b\\u00e9"}') == "a/b\u00e9"  # escapes decoded
    assert top_model(b'{"model": "\xff"}') is None  # not UTF-8: refused upstream
    assert top_model(b'{"model": 7}') is None
    assert top_model(b'{"meta": {"model": "x"}}') is None
    big = json.dumps(
        {"pad": "x" * 50_000, "model": "y", "meta": {"model": "x"}, "tail": "z" * 50_000}
    )
    assert top_model(big.encode()) == "y"  # both sides long, the last one nested: parsed
    assert top_model(b"not json" + b" " * 50_000 + b'"model" "model": x' + b" " * 50_000) is None
