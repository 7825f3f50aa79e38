"""The proxy end to end: the official openai SDK as the client, faulty keys mixed in,
and `keyrotor serve` started as a subprocess the way a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import openai
import pytest

from keyrotor.adapters.config import ProxyConfig
from keyrotor.core import KeySpec, PoolConfig
from keyrotor.testing import (
    Credits,
    FakeClock,
    FakeUpstream,
    Invalid,
    Ok,
    RateLimit,
    Scenario,
    SlowStream,
)
from keyrotor.testing.certificates import server_context

from .proxy_thread import ProxyThread

SECRETS = {
    "ok1": "sk-or-v1-e2e-ok1-00000000000000000001",
    "bad": "sk-or-v1-e2e-bad-00000000000000000002",
    "poor": "sk-or-v1-e2e-poor-0000000000000000003",
    "busy": "sk-or-v1-e2e-busy-0000000000000000004",
    "ok2": "sk-or-v1-e2e-ok2-00000000000000000005",
}
MODEL = "openai/gpt-4o-mini"


def scenario() -> Scenario:
    sc = Scenario()
    behaviours = {
        "ok1": Ok(),
        "bad": Invalid(),
        "poor": Credits(0.0),
        "busy": RateLimit(limit=1, window=60),
        "ok2": SlowStream(chunk_delay=0.005),
    }
    for alias, behaviour in behaviours.items():
        sc.add(SECRETS[alias], behaviour, alias=alias)
    return sc


def fake_clock() -> FakeClock:
    """The fake upstream's clock, stopped at the start of busy's 60 s window (windows
    are aligned on the clock): on the wall clock, a run across a minute's end let
    busy answer 200 twice, or sent a 429 with a Retry-After of 1 s."""
    return FakeClock(start=1_700_000_040.0)  # a multiple of 60


def config(upstream: str) -> ProxyConfig:
    return ProxyConfig(
        keys=dict(SECRETS),
        # One attempt per key: three of the five keys fail at first, and parallel
        # requests sent before the pool heard of it may meet all three in turn.
        pool=PoolConfig(
            keys=[KeySpec(key_id=alias) for alias in SECRETS], max_attempts=len(SECRETS)
        ),
        upstream=upstream,
        server={"host": "127.0.0.1", "port": 0},
    )


@pytest.fixture(params=["http", "https"])
def proxy_url(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, FakeUpstream, list[dict[str, Any]]]]:
    """The proxy in a thread in front of the fake upstream, over plain HTTP and
    over HTTPS (as OpenRouter is: a self-signed certificate the proxy trusts
    through ``SSL_CERT_FILE``)."""
    log: list[dict[str, Any]] = []
    context = None
    if request.param == "https":
        cert, key = request.getfixturevalue("certificate")
        context = server_context(cert, key)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    with (
        FakeUpstream.running_in_thread(
            scenario(), clock=fake_clock(), ssl_context=context
        ) as upstream,
        ProxyThread(config(upstream.url), log) as url,
    ):
        yield url, upstream, log


def test_openai_sdk_sync_and_streaming_see_no_error(proxy_url: Any) -> None:
    url, upstream, log = proxy_url
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="caller-token", max_retries=0)
    answers = [
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        for _ in range(8)
    ]
    assert all(a.choices[0].message.content for a in answers)
    for _ in range(3):
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text
    client.close()
    status = httpx.get(f"{url}/status").json()
    states = {k["alias"]: k["state"] for k in status["keys"]}
    assert sorted(states.values()).count("healthy") >= 2
    assert {"failed", "depleted", "rate_limited"} <= set(states.values())
    # The caller's own token never went upstream; the pool's keys did, and the
    # catalog fetch (GET /models, public on OpenRouter) carried none.
    assert all(entry.key in SECRETS for entry in upstream.log if entry.path != "/models")
    assert {entry.key for entry in upstream.log if entry.path == "/models"} == {None}
    text = json.dumps(log) + json.dumps(status) + httpx.get(f"{url}/metrics").text
    for secret in SECRETS.values():
        assert secret not in text
    access = [line for line in log if line.get("path") == "/v1/chat/completions"]
    assert len(access) == 11 and all(line["status"] == 200 for line in access)


def test_openai_sdk_async_in_parallel(proxy_url: Any) -> None:
    url, _, _ = proxy_url

    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="caller-token", max_retries=0)
        results: list[str] = []

        async def one() -> None:
            answer = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}]
            )
            results.append(answer.choices[0].message.content or "")

        async with anyio.create_task_group() as tasks:
            for _ in range(10):
                tasks.start_soon(one)
        await client.close()
        return results

    results = anyio.run(main)
    assert len(results) == 10 and all(results)


GC_PROBE = """
import gc, json, sys
from keyrotor.adapters.proxy.main import tune_gc
held = [[i] for i in range(1000)]  # built at "startup": frozen with the rest
tune_gc(int(sys.argv[1]))
print(json.dumps([gc.get_threshold(), gc.get_freeze_count()]))
"""


@pytest.mark.parametrize("threshold", [0, 5000])
def test_tune_gc_freezes_startup_and_raises_the_first_threshold(threshold: int) -> None:
    # In a child: the collector's settings are the whole process's.
    out = subprocess.run(
        [sys.executable, "-c", GC_PROBE, str(threshold)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    (first, *rest), frozen = json.loads(out)
    if threshold:
        assert (first, rest) == (5000, [10, 10])
        assert frozen > 1000
    else:  # Python's own settings, nothing frozen
        assert (first, frozen) == (700, 0)


def test_keyrotor_serve_as_a_subprocess(tmp_path: Any) -> None:
    with FakeUpstream.running_in_thread(scenario(), clock=fake_clock()) as upstream:
        # Its own data directory: the default state file of another test (with
        # other secrets under these aliases) would make it start with a warning.
        env = {
            **os.environ,
            "OPENROUTER_KEYS": ",".join(SECRETS.values()),
            "XDG_DATA_HOME": str(tmp_path),
        }
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "keyrotor.cli",
                "serve",
                "--port",
                "0",
                "--upstream",
                upstream.url,
            ],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stderr is not None
            early = []  # the catalog's first fetch may log before the server listens
            while (line := json.loads(proc.stderr.readline()))["event"] != "listening":
                early.append(line)
            listening = line
            assert all(e["event"] == "catalog" for e in early), early
            assert listening["http_parser"] == "httptools"  # "auto", the fast extra installed
            assert listening["gc_threshold"] == 10000  # tuned once listening (main.tune_gc)
            url = listening["url"]
            reply = httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                timeout=10,
            )
            assert reply.status_code == 200
            assert httpx.get(f"{url}/healthz").json()["ok"] is True
            assert "keyrotor_key_state" in httpx.get(f"{url}/metrics").text
            assert httpx.get(f"{url}/status").json()["totalKeys"] == 5
            for probe in ("/healthz", "/status", "/metrics"):  # a load balancer may send HEAD
                head = httpx.head(f"{url}{probe}")
                assert head.status_code == 200 and head.content == b"", probe
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
            rest = json.dumps([*early, listening]) + proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
    assert '"event":"shutdown"' in rest
    for secret in SECRETS.values():
        assert secret not in rest


def test_keyrotor_serve_without_keys_exits_2_with_a_clear_message() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENROUTER")}
    result = subprocess.run(
        [sys.executable, "-m", "keyrotor.cli", "serve", "--port", "0"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,  # a hang guard (TimeoutExpired fails the test): it must exit, not serve
    )
    assert result.returncode == 2
    assert "OPENROUTER_KEYS" in result.stderr
    assert "Traceback" not in result.stderr
    assert '"event":"listening"' not in result.stderr  # it never started serving


def test_client_leaving_mid_stream_cancels_the_upstream_request(proxy_url: Any) -> None:
    url, upstream, _ = proxy_url
    body = json.dumps({"model": MODEL, "messages": [], "stream": True, "max_tokens": 400}).encode()
    pinned = {"x-keyrotor-key": "ok2"}  # the slow streamer: 400 chunks 5 ms apart
    with httpx.Client(timeout=10) as client:
        with client.stream(
            "POST", f"{url}/v1/chat/completions", content=body, headers=pinned
        ) as response:
            assert response.headers["x-keyrotor-key"] == "ok2"
            first = next(response.iter_raw())  # output has started, then the caller leaves
        assert first
    deadline = time.monotonic() + 30  # a hang guard: the whole stream takes 2 s
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/status").json()
        if status["stats"]["inFlight"] == 0 and upstream.stats("ok2").disconnects:
            break
        time.sleep(0.05)
    assert status["stats"]["inFlight"] == 0
    assert upstream.stats("ok2").disconnects == 1  # the upstream request was cancelled
    assert upstream.stats("ok2").in_flight == 0


def test_keyrotor_serve_on_an_https_upstream_trusted_through_ssl_cert_file(
    tmp_path: Any, certificate: tuple[Any, Any]
) -> None:
    """An upstream whose certificate the system does not trust (a private CA, a
    self-signed gateway): trusted through ``SSL_CERT_FILE``; without it, the
    catalog's log line says which certificate and how to trust it."""
    cert, key = certificate
    context = server_context(cert, key)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    with FakeUpstream.running_in_thread(
        scenario(), clock=fake_clock(), ssl_context=context
    ) as upstream:
        assert upstream.url.startswith("https://")
        for trusted in (True, False):
            env = {
                **{
                    k: v
                    for k, v in os.environ.items()
                    if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")
                },
                "OPENROUTER_KEYS": SECRETS["ok1"],
                "XDG_DATA_HOME": str(tmp_path / str(trusted)),
            }
            if trusted:
                env["SSL_CERT_FILE"] = str(cert)
            proc = subprocess.Popen(
                [sys.executable, "-m", "keyrotor.cli", "serve", "--port", "0", "--no-state",
                 "--upstream", upstream.url],
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            try:
                assert proc.stderr is not None
                lines = [json.loads(proc.stderr.readline()) for _ in range(3)]
                url = next(line["url"] for line in lines if line.get("event") == "listening")
                catalog = next(line for line in lines if line.get("event") == "catalog")
                reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
                streamed = httpx.post(
                    f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=10
                )
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=20)
                if proc.stderr is not None:
                    proc.stderr.close()
            if trusted:
                assert catalog["outcome"] == "refreshed" and catalog["models"] == 4, catalog
                assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] > 0
                assert streamed.status_code == 200 and "data: [DONE]" in streamed.text
            else:
                assert catalog["outcome"] == "failed"
                assert "is not trusted (self-signed certificate)" in catalog["error"]
                assert "SSL_CERT_FILE" in catalog["error"]
                assert reply.status_code == 502 and streamed.status_code == 502
                # The caller is told why (not that the keys failed: they are fine).
                message = reply.json()["error"]["message"]
                assert message.startswith("the upstream gave no answer on any attempt")
                assert "is not trusted (self-signed certificate)" in message
                assert "SSL_CERT_FILE" in message and "failed, depleted" not in message
