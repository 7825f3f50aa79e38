"""The proxy's model catalog: /v1/models from it, refreshes, failures, restarts."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest

from keyrotor.adapters.config import load_config
from keyrotor.adapters.proxy import catalog as catalog_module
from keyrotor.adapters.proxy.app import ProxyApp
from keyrotor.adapters.proxy.catalog import CatalogService
from keyrotor.adapters.proxy.model_health import model_of
from keyrotor.adapters.proxy.types import Request
from keyrotor.adapters.storage import StateStore
from keyrotor.testing import Custom, FakeUpstream, Hang, Reply, Scenario
from keyrotor.testing.catalogs import realistic_models
from keyrotor.transports.api import AsyncClient

from .proxy_thread import ProxyThread

SECRET = "sk-or-v1-catalog-test-jkjkjkjkjkjkjkjkjkjk"


def scenario(**options: Any) -> Scenario:
    return Scenario(models=realistic_models(), **options).add(SECRET, alias="k")


def upstream_models(server: FakeUpstream) -> list[int]:
    """The statuses of the upstream's GET /models answers so far."""
    return [entry.status for entry in server.log if entry.path == "/models"]


def config(url: str, tmp_path: Path | None = None, **options: Any) -> Any:
    environ = {"OPENROUTER_API_KEY": SECRET}
    overrides = {"upstream": url, "port": 0, **options}
    if tmp_path is None:
        overrides["state.enabled"] = False
    else:
        overrides["state.path"] = str(tmp_path / "state.db")
    return load_config(None, environ, overrides)


def test_the_openai_sdk_lists_and_retrieves_models_without_an_upstream_call() -> None:
    log: list[dict[str, Any]] = []
    with FakeUpstream.running_in_thread(scenario()) as server:
        with ProxyThread(config(server.url), log) as url:
            with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as sdk:
                listed = list(sdk.models.list())
                one = sdk.models.retrieve("anthropic/claude-3.5-haiku-mini")
                with pytest.raises(openai.NotFoundError, match="not in the catalog"):
                    sdk.models.retrieve("nobody/nothing")
            status = httpx.get(f"{url}/status").json()
    assert len(listed) == 320
    assert {m.id for m in listed} == {m.id for m in realistic_models()}
    assert one.id == "anthropic/claude-3.5-haiku-mini" and one.owned_by == "anthropic"
    first = next(m for m in listed if m.id == "openrouter/auto")
    assert first.model_extra is not None and first.model_extra["pricing"]["prompt"] == "-1"
    assert upstream_models(server) == [200]  # fetched once at start, never per request
    catalog = status["catalog"]
    assert (catalog["models"], catalog["source"], catalog["lastError"]) == (320, "upstream", None)
    assert any(e.get("event") == "catalog" and e["outcome"] == "refreshed" for e in log)


def test_a_restart_serves_the_stored_catalog_when_the_upstream_fails(tmp_path: Path) -> None:
    log: list[dict[str, Any]] = []
    with FakeUpstream.running_in_thread(scenario()) as server:
        with ProxyThread(config(server.url, tmp_path), log) as url:
            assert len(httpx.get(f"{url}/v1/models").json()["data"]) == 320
        server.scenario = scenario(models_reply=Reply(503))
        with ProxyThread(config(server.url, tmp_path), log) as url:
            models = httpx.get(f"{url}/v1/models")
            deadline = time.monotonic() + 30
            while httpx.get(f"{url}/status").json()["catalog"]["lastError"] is None:
                assert time.monotonic() < deadline, "the failed refresh never showed"
                time.sleep(0.01)
            catalog = httpx.get(f"{url}/status").json()["catalog"]
    assert models.status_code == 200 and len(models.json()["data"]) == 320
    assert catalog["source"] == "state file" and catalog["models"] == 320
    assert "503" in catalog["lastError"]
    assert upstream_models(server) == [200, 503]


def test_with_no_catalog_at_all_models_is_a_clear_503() -> None:
    with FakeUpstream.running_in_thread(scenario(models_reply=Reply(500))) as server:
        with ProxyThread(config(server.url), []) as url:
            answer = httpx.get(f"{url}/v1/models")
    assert answer.status_code == 503
    error = answer.json()["error"]
    assert error["code"] == "catalog_unavailable" and "500" in error["message"]


def test_a_hanging_first_fetch_gives_a_503_after_a_bounded_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(catalog_module, "READY_WAIT", 0.2)
    with FakeUpstream.running_in_thread(scenario(models_reply=Hang())) as server:
        with ProxyThread(config(server.url), []) as url:
            answer = httpx.get(f"{url}/v1/models", timeout=30)
    assert answer.status_code == 503
    assert "the first fetch is running" in answer.json()["error"]["message"]


def test_the_catalog_can_be_turned_off_and_models_is_forwarded() -> None:
    with FakeUpstream.running_in_thread(scenario()) as server:
        with ProxyThread(config(server.url, **{"catalog.enabled": False}), []) as url:
            answer = httpx.get(f"{url}/v1/models")
            status = httpx.get(f"{url}/status").json()
    assert answer.status_code == 200 and "catalog" not in status
    assert [(e.path, e.key) for e in server.log] == [("/models", "k")]  # through the pool


@pytest.mark.anyio
async def test_refreshes_honour_the_etag_and_a_failure_keeps_the_catalog(
    tmp_path: Path,
) -> None:
    async with FakeUpstream(scenario()).serve() as server:
        async with AsyncClient({"k": SECRET}, server.url) as client:
            store = StateStore.open(tmp_path / "state.db", secret_key=None)
            events: list[dict[str, Any]] = []
            service = CatalogService(client, refresh=3600, store=store, log=events.append)
            assert await service.refresh() and service.catalog is not None
            first = service.catalog
            assert await service.refresh()  # If-None-Match: 304, the catalog kept
            assert service.catalog.models == first.models
            server.scenario = Scenario(models=realistic_models(revision=1)).add(SECRET)
            assert await service.refresh()
            later = service.catalog
            assert later.models != first.models and len(later) == 320
            server.scenario = Scenario(models_reply=Reply(200, body=b"<html>")).add(SECRET)
            assert not await service.refresh()
            assert service.catalog is later and "not JSON" in (service.last_error or "")
            stored = store.catalogs()["openrouter"]
            store.close()
    assert upstream_models(server) == [200, 304, 200, 200]
    assert [e["outcome"] for e in events] == ["refreshed", "unchanged", "refreshed", "failed"]
    assert len(json.loads(json.dumps(stored.document))["data"]) == 320
    assert stored.etag == later.etag


@pytest.mark.anyio
async def test_an_upstream_without_etag_is_fetched_whole_each_time() -> None:
    async with FakeUpstream(scenario(catalog_etag=False)).serve() as server:
        async with AsyncClient({"k": SECRET}, server.url) as client:
            service = CatalogService(client, refresh=0.01)
            with anyio.move_on_after(60):
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(service.run)
                    while len(upstream_models(server)) < 3:
                        await anyio.sleep(0.005)
                    tasks.cancel_scope.cancel()
    assert upstream_models(server)[:3] == [200, 200, 200]
    assert service.catalog is not None and service.catalog.etag is None


def test_model_of_reads_the_model_without_parsing_the_body() -> None:
    assert model_of(b'{"model": "openai/gpt-4o", "messages": []}') == "openai/gpt-4o"
    assert model_of(b'{"messages":[],"model":"a\\"b"}') == 'a"b'
    assert model_of(b"") is None and model_of(b'{"messages": []}') is None
    assert model_of(b'{"model": 5}') is None
    # The top-level member, wherever it is (an SDK puts the messages first):
    nested = b'{"metadata": {"model": "not-this"}, "messages": [], "model": "this"}'
    assert model_of(nested) == "this"
    assert model_of(b'{"messages": [{"content": "x"}], "model": "m"' + b" " * 100_000 + b"}") == "m"


@pytest.mark.anyio
async def test_model_health_is_observed_per_model_and_leaves_keys_alone() -> None:
    def decide(call: Any) -> Any:
        if call.model == "down/model":
            return Reply(404, "No endpoints found for down/model.")
        return None

    keys = Scenario().add(SECRET, Custom(decide), alias="k")
    async with FakeUpstream(keys).serve() as server:
        async with AsyncClient({"k": SECRET}, server.url) as client:
            app = ProxyApp(client)
            for model in ("up/model", "down/model", "down/model", "up/model"):
                body = json.dumps({"model": model, "messages": []}).encode()
                request = Request(
                    method="POST", target="/v1/chat/completions", headers=[], body=body
                )
                await app(request)
            models = app.status()["models"]
            state = client.status()["keys"][0]["state"]
    assert models["down/model"]["unavailable"] == 2 and models["down/model"]["errorShare"] == 1.0
    assert models["down/model"]["lastError"] == 404 and models["down/model"]["ttfbMs"] is None
    assert models["up/model"]["ok"] == 2 and models["up/model"]["ttfbMs"] is not None
    assert state == "healthy"  # a model without endpoints is not the key's fault


@pytest.mark.anyio
async def test_a_model_that_is_down_on_every_key_cools_none_of_them() -> None:
    """503 "model unavailable" on every key for one model, mixed with a model
    that works: the keys' errors look alike, so none is blamed (a key is
    degraded only when it alone keeps failing)."""

    def decide(call: Any) -> Any:
        if call.model == "down/model":
            return Reply(503, "No instances available for down/model.")
        return None

    secrets = {f"k{i}": f"sk-or-v1-model-down-{i}-jkjkjkjkjkjkjkjk" for i in range(4)}
    keys = Scenario()
    for alias, secret in secrets.items():
        keys.add(secret, Custom(decide), alias=alias)
    async with FakeUpstream(keys).serve() as server:
        async with AsyncClient(secrets, server.url) as client:
            app = ProxyApp(client)
            statuses = []
            for i in range(200):
                model = "down/model" if i % 2 else "up/model"
                body = json.dumps({"model": model, "messages": []}).encode()
                request = Request(
                    method="POST", target="/v1/chat/completions", headers=[], body=body
                )
                statuses.append((model, (await app(request)).status))
            models = app.status()["models"]
            states = {k["alias"]: k["state"] for k in client.status()["keys"]}
    assert {s for m, s in statuses if m == "up/model"} == {200}
    assert {s for m, s in statuses if m == "down/model"} == {503}
    assert models["down/model"]["unavailable"] == 100
    assert states == dict.fromkeys(secrets, "healthy")


def test_unknown_models_are_refused_here_when_asked_and_forwarded_by_default() -> None:
    with FakeUpstream.running_in_thread(scenario()) as server:
        for reject in (True, False):
            with ProxyThread(config(server.url, **{"catalog.reject_unknown": reject}), []) as url:
                httpx.get(f"{url}/v1/models")  # the catalog is in
                server.reset_stats()
                with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as sdk:
                    hi = [{"role": "user", "content": "hi"}]
                    known = realistic_models()[3].id
                    for model in (known, f"{known}:online"):
                        sdk.chat.completions.create(model=model, messages=hi)  # type: ignore[arg-type]
                    if reject:
                        with pytest.raises(openai.NotFoundError, match="not in the catalog"):
                            sdk.chat.completions.create(model="nobody/nothing", messages=hi)  # type: ignore[arg-type]
                    else:  # the fake upstream serves any model
                        sdk.chat.completions.create(model="nobody/nothing", messages=hi)  # type: ignore[arg-type]
            sent = [entry.path for entry in server.log if entry.path == "/chat/completions"]
            assert len(sent) == (2 if reject else 3)
