"""The same behaviour tests through both fronts of the proxy: the h11 server and
the ASGI app. Both wrap one ``ProxyApp``, so the answers must be the same."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio

from keyrotor.adapters.asgi import ASGIApp
from keyrotor.adapters.config import ProxyConfig
from keyrotor.adapters.proxy.app import ProxyApp
from keyrotor.adapters.proxy.main import run_proxy
from keyrotor.core import KeySpec, PoolConfig
from keyrotor.testing import (
    WINDOW_START,
    FakeClock,
    FakeUpstream,
    Invalid,
    Ok,
    RateLimit,
    Reply,
    Scenario,
)
from keyrotor.transports._async import AsyncClient

SECRETS = {
    "bad": "sk-or-v1-fronts-bad-000000000000001",
    "good": "sk-or-v1-fronts-good-00000000000002",
    "busy": "sk-or-v1-fronts-busy-00000000000003",
    "picky": "sk-or-v1-fronts-picky-0000000000004",
}
CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def scenario() -> Scenario:
    sc = Scenario()
    behaviours = {
        "bad": Invalid(),
        "good": Ok(),
        "busy": RateLimit(limit=0, window=30),
        "picky": Reply(400, "invalid prompt"),
    }
    for alias, behaviour in behaviours.items():
        sc.add(SECRETS[alias], behaviour, alias=alias)
    return sc


def config(upstream: str) -> ProxyConfig:
    return ProxyConfig(
        keys=dict(SECRETS),
        pool=PoolConfig(
            keys=[KeySpec(key_id=alias) for alias in SECRETS], queue_timeout=1.0, max_attempts=4
        ),
        upstream=upstream,
        server={"host": "127.0.0.1", "port": 0},
    )


@asynccontextmanager
async def front(kind: str) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to the proxy through the ``kind`` front."""
    async with FakeUpstream(scenario(), clock=FakeClock(WINDOW_START)).serve() as upstream:
        cfg = config(upstream.url)
        if kind == "h11":
            shutdown = trio.Event()
            async with trio.open_nursery() as nursery:
                port = await nursery.start(
                    lambda task_status: run_proxy(
                        cfg, log=lambda record: None, shutdown=shutdown, task_status=task_status
                    )
                )
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                    yield http
                shutdown.set()
        else:
            async with AsyncClient(cfg.keys, cfg.upstream, cfg.pool) as client:
                app = ASGIApp(ProxyApp(client))
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as http:
                    yield http


FRONTS = pytest.mark.parametrize("kind", ["h11", "asgi"])


@FRONTS
@pytest.mark.trio
async def test_failover_headers_and_body(kind: str) -> None:
    async with front(kind) as http:
        reply = await http.post("/v1/chat/completions", json=CHAT)
    assert reply.status_code == 200
    assert reply.headers["x-keyrotor-key"] == "good"
    assert reply.headers["x-keyrotor-attempts"] == "2"  # bad (401), then good
    assert reply.json()["choices"][0]["message"]["content"]


@FRONTS
@pytest.mark.trio
async def test_caller_error_passes_through_and_pinning(kind: str) -> None:
    async with front(kind) as http:
        reply = await http.post(
            "/v1/chat/completions", json=CHAT, headers={"x-keyrotor-key": "picky"}
        )
    assert reply.status_code == 400
    assert reply.json()["error"]["message"] == "invalid prompt"


@FRONTS
@pytest.mark.trio
async def test_streaming_arrives_whole(kind: str) -> None:
    async with front(kind) as http:
        body = {**CHAT, "stream": True}
        async with http.stream("POST", "/v1/chat/completions", json=body) as reply:
            lines = [line async for line in reply.aiter_lines()]
            status = reply.status_code
    data = [line for line in lines if line.startswith("data: ")]
    assert status == 200
    assert data[-1] == "data: [DONE]"
    assert json.loads(data[-2][6:])["usage"]["cost"] > 0


@FRONTS
@pytest.mark.trio
async def test_status_metrics_healthz_and_404(kind: str) -> None:
    async with front(kind) as http:
        await http.post("/v1/chat/completions", json=CHAT)
        status = (await http.get("/status")).json()
        metrics = (await http.get("/metrics")).text
        health = (await http.get("/healthz")).json()
        missing = await http.get("/nowhere")
    assert status["totalKeys"] == 4 and status["health"]["failed"] == 1
    assert 'keyrotor_key_state{key="bad",state="failed"} 1' in metrics
    assert health["ok"] is True
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "invalid_request_error"
    for secret in SECRETS.values():
        assert secret not in json.dumps(status) + metrics


@FRONTS
@pytest.mark.trio
async def test_no_usable_key_is_an_honest_error(kind: str) -> None:
    async with front(kind) as http:
        reply = await http.post(
            "/v1/chat/completions", json=CHAT, headers={"x-keyrotor-key": "busy"}
        )
        # busy answered 429: the request fails over to good.
        assert reply.status_code == 200 and reply.headers["x-keyrotor-key"] == "good"
        status = (await http.get("/status")).json()
    states = {key["alias"]: key["state"] for key in status["keys"]}
    assert states["busy"] == "rate_limited"
