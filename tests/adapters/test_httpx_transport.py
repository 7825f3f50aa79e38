"""The httpx transports: the official openai SDK on the pool in-process, faulty keys
mixed in, against the fake upstream (asyncio and trio, and the blocking client)."""

from __future__ import annotations

import json
import types
from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from keyrotor.adapters.httpx import (
    AsyncPoolTransport,
    PoolTransport,
    _answer,
    _forwarded_headers,
    _relative_path,
)
from keyrotor.testing import (
    WINDOW_START,
    Credits,
    FakeClock,
    FakeUpstream,
    Invalid,
    Ok,
    RateLimit,
    Scenario,
)
from keyrotor.transports._async import AsyncClient
from keyrotor.transports.sync import Client

SECRETS = {
    "bad": "sk-or-v1-httpx-bad-00000000000000001",
    "poor": "sk-or-v1-httpx-poor-0000000000000002",
    "busy": "sk-or-v1-httpx-busy-0000000000000003",
    "ok": "sk-or-v1-httpx-ok-000000000000000004",
}
MODEL = "openai/gpt-4o-mini"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
BASE = "http://keyrotor/v1"
# This openai release types `http_client` as an httpx2 client but
# accepts an httpx one at run time (it checks for both); hence the type: ignores.


# The SDK's AsyncStream breaks out of its event generator at [DONE] without closing
# it (nor the httpx generators under it); under trio their finalizer then warns,
# whatever the transport. The transport's own body stream is no generator.
pytestmark = [
    pytest.mark.filterwarnings(r"ignore:Async generator 'openai\._streaming\.:ResourceWarning"),
    pytest.mark.filterwarnings(r"ignore:Async generator 'httpx\.:ResourceWarning"),
]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def faulty() -> Scenario:
    sc = Scenario()
    behaviours = {
        "bad": Invalid(),
        "poor": Credits(0.0),
        "busy": RateLimit(limit=1, window=60),
        "ok": Ok(),
    }
    for alias, behaviour in behaviours.items():
        sc.add(SECRETS[alias], behaviour, alias=alias)
    return sc


def only_limited() -> Scenario:
    # limit=0: every call is a 429 whose window ends at the next whole day
    return Scenario().add(SECRETS["busy"], RateLimit(limit=0, window=86_400), alias="busy")


def assert_only_pool_keys(server: FakeUpstream) -> None:
    keys = {entry.key for entry in server.log}
    assert keys and keys <= set(SECRETS), keys  # never "placeholder", never a secret
    assert server.stats("placeholder").requests == 0


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(faulty(), clock=FakeClock(WINDOW_START)).serve() as server:
        yield server


@pytest.fixture
async def pool(upstream: FakeUpstream) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(dict(SECRETS), base_url=upstream.url) as client:
        yield client


@pytest.fixture
async def sdk(pool: AsyncClient) -> AsyncIterator[openai.AsyncOpenAI]:
    http = httpx.AsyncClient(transport=AsyncPoolTransport(pool))
    client = openai.AsyncOpenAI(
        base_url=BASE,
        api_key="placeholder",
        http_client=http,  # type: ignore[arg-type]
        max_retries=0,
    )
    try:
        yield client
    finally:
        await client.close()


# ------------------------------------------------------------------ helpers


def test_paths_are_relative_to_the_prefix() -> None:
    def path(url: str, prefix: str = "/v1") -> str:
        return _relative_path(httpx.Request("GET", url), prefix)

    assert path("http://keyrotor/v1/chat/completions") == "/chat/completions"
    assert path("http://keyrotor/v1/models?limit=2") == "/models?limit=2"
    assert path("http://keyrotor/v1") == "/"
    assert path("http://keyrotor/v10/models") == "/v10/models"  # not under the prefix
    assert path("http://keyrotor/api/v1/key", "") == "/api/v1/key"


def test_credentials_host_and_framing_stay_here() -> None:
    request = httpx.Request(
        "POST",
        f"{BASE}/chat/completions",
        headers={
            "Authorization": "Bearer placeholder",
            "X-Title": "my app",
            "Connection": "keep-alive",
            "Accept-Encoding": "gzip",
        },
        content=b"{}",
    )
    headers = _forwarded_headers(request)
    assert headers["x-title"] == "my app"
    assert not {"authorization", "host", "content-length", "connection", "accept-encoding"} & set(
        headers
    )
    assert "placeholder" not in json.dumps(headers)


def test_cookies_of_a_keys_session_stay_here() -> None:
    """A cookie the upstream sets belongs to the key that served: delivered,
    the caller's client would send it back on whatever key comes next."""
    request = httpx.Request(
        "POST", f"{BASE}/chat/completions", headers={"Cookie": "__cf_bm=a"}, content=b"{}"
    )
    assert "cookie" not in _forwarded_headers(request)
    upstream = types.SimpleNamespace(
        status_code=200,
        headers={"set-cookie": "__cf_bm=b; Path=/, _cfuvid=c", "x-ratelimit-limit": "20"},
        key="ok",
        attempts=1,
    )
    response = _answer(upstream, httpx.ByteStream(b"{}"), request)  # type: ignore[arg-type]
    assert "set-cookie" not in response.headers
    assert response.headers["x-ratelimit-limit"] == "20"
    assert response.headers["x-keyrotor-key"] == "ok"


# ------------------------------------------------------------------ async


@pytest.mark.anyio
async def test_async_sdk_sees_no_error_through_faulty_keys(
    sdk: openai.AsyncOpenAI, pool: AsyncClient, upstream: FakeUpstream
) -> None:
    for _ in range(10):
        answer = await sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert answer.choices[0].message.content
    for _ in range(3):
        stream = await sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text
    states = {k["alias"]: k["state"] for k in pool.status()["keys"]}
    assert states["bad"] == "failed" and states["poor"] == "depleted"
    assert states["ok"] == "healthy"
    assert_only_pool_keys(upstream)
    assert pool.status()["stats"]["inFlight"] == 0


@pytest.mark.anyio
async def test_async_plain_httpx_gets_the_pool_headers(
    pool: AsyncClient, upstream: FakeUpstream
) -> None:
    body = {"model": MODEL, "messages": MESSAGES}
    async with httpx.AsyncClient(
        transport=AsyncPoolTransport(pool), base_url=BASE, headers={"Authorization": "Bearer x"}
    ) as http:
        seen = set()
        for _ in range(4):
            response = await http.post("/chat/completions", json=body)
            assert response.status_code == 200
            assert response.json()["choices"][0]["message"]["content"]
            assert int(response.headers["x-keyrotor-attempts"]) >= 1
            seen.add(response.headers["x-keyrotor-key"])
        assert seen <= set(SECRETS) and "ok" in seen
        models = await http.get("/models")
        assert models.status_code == 200 and models.json()["data"]
    assert {e.path for e in upstream.log} >= {"/chat/completions", "/models"}
    assert_only_pool_keys(upstream)


@pytest.mark.anyio
async def test_async_stream_closed_early_frees_the_key(
    sdk: openai.AsyncOpenAI, pool: AsyncClient
) -> None:
    stream = await sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    async for _ in stream:
        break
    assert pool.status()["stats"]["inFlight"] == 1  # the stream holds its key...
    await stream.close()
    assert pool.status()["stats"]["inFlight"] == 0  # ...until it is closed


@pytest.mark.anyio
async def test_async_no_key_is_the_sdks_rate_limit_error() -> None:
    async with (
        FakeUpstream(only_limited(), clock=FakeClock(WINDOW_START)).serve() as server,
        AsyncClient({"busy": SECRETS["busy"]}, base_url=server.url) as pool,
    ):
        http = httpx.AsyncClient(transport=AsyncPoolTransport(pool))
        sdk = openai.AsyncOpenAI(base_url=BASE, api_key="placeholder", http_client=http)  # type: ignore[arg-type]
        sdk = sdk.with_options(max_retries=0)
        try:
            for _ in range(2):  # the upstream's own 429, then the pool's refusal
                with pytest.raises(openai.RateLimitError) as caught:
                    await sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
            calls = [e for e in server.log if e.path == "/chat/completions"]
            assert len(calls) == 1  # the second never left the pool
            response = caught.value.response
            assert response.status_code == 429
            assert int(response.headers["retry-after"]) > 0
            error = response.json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == 429
            assert "no API key" in error["message"]
        finally:
            await sdk.close()
        assert pool.status()["stats"]["inFlight"] == 0


@pytest.mark.anyio
async def test_async_closed_pool_is_a_connection_error(upstream: FakeUpstream) -> None:
    pool = AsyncClient(dict(SECRETS), base_url=upstream.url)  # never opened
    async with httpx.AsyncClient(transport=AsyncPoolTransport(pool), base_url=BASE) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get("/models")
        sdk = openai.AsyncOpenAI(base_url=BASE, api_key="placeholder", http_client=http)  # type: ignore[arg-type]
        with pytest.raises(openai.APIConnectionError):
            await sdk.with_options(max_retries=0).models.list()


# ------------------------------------------------------------------ sync


@pytest.fixture
def sync_pool() -> Iterator[tuple[Client, FakeUpstream]]:
    with (
        FakeUpstream.running_in_thread(faulty(), clock=FakeClock(WINDOW_START)) as server,
        Client(dict(SECRETS), base_url=server.url) as client,
    ):
        yield client, server


def test_sync_sdk_sees_no_error_through_faulty_keys(
    sync_pool: tuple[Client, FakeUpstream],
) -> None:
    pool, upstream = sync_pool
    with openai.OpenAI(
        base_url=BASE,
        api_key="placeholder",
        http_client=httpx.Client(transport=PoolTransport(pool)),  # type: ignore[arg-type]
        max_retries=0,
    ) as sdk:
        for _ in range(10):
            answer = sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
            assert answer.choices[0].message.content
        for _ in range(3):
            stream = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert text
        stream = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        next(iter(stream))
        assert pool.status()["stats"]["inFlight"] == 1
        stream.close()
        assert pool.status()["stats"]["inFlight"] == 0
    states = {k["alias"]: k["state"] for k in pool.status()["keys"]}
    assert states["bad"] == "failed" and states["poor"] == "depleted"
    assert_only_pool_keys(upstream)


def test_sync_no_key_is_the_sdks_rate_limit_error() -> None:
    with (
        FakeUpstream.running_in_thread(only_limited(), clock=FakeClock(WINDOW_START)) as server,
        Client({"busy": SECRETS["busy"]}, base_url=server.url) as pool,
        openai.OpenAI(
            base_url=BASE,
            api_key="placeholder",
            http_client=httpx.Client(transport=PoolTransport(pool)),  # type: ignore[arg-type]
            max_retries=0,
        ) as sdk,
    ):
        for _ in range(2):
            with pytest.raises(openai.RateLimitError) as caught:
                sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert caught.value.response.json()["error"]["type"] == "rate_limit_error"
        assert "retry-after" in caught.value.response.headers
        assert len([e for e in server.log if e.path == "/chat/completions"]) == 1
        assert pool.status()["stats"]["inFlight"] == 0
