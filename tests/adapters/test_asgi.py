"""The ASGI front: the proxy application behind ASGI messages, against the fake upstream.

httpx's ``ASGITransport`` buffers whole responses, so streaming and disconnects
are checked by calling the ASGI application with hand-written receive/send.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from keyrotor.adapters.asgi import MAX_BODY_BYTES, ASGIApp
from keyrotor.adapters.config import ProxyConfig
from keyrotor.adapters.proxy.app import ProxyApp
from keyrotor.adapters.proxy.types import Request, Response
from keyrotor.core import KeySpec, PoolConfig
from keyrotor.testing import FakeUpstream, Invalid, Ok, Scenario, SlowStream
from keyrotor.transports._async import AsyncClient

from .streams import Lookahead

pytestmark = pytest.mark.anyio

Message = MutableMapping[str, Any]

SECRETS = {
    "bad": "sk-or-v1-asgi-bad-00000000000000001",
    "good": "sk-or-v1-asgi-good-0000000000000002",
}
CHAT = json.dumps({"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def scenario(**behaviours: object) -> Scenario:
    sc = Scenario()
    for alias, behaviour in behaviours.items():
        sc.add(SECRETS[alias], behaviour, alias=alias)  # type: ignore[arg-type]
    return sc


def upstream(**behaviours: object) -> FakeUpstream:
    return FakeUpstream(scenario(**behaviours))


@asynccontextmanager
async def proxied(server: FakeUpstream, *aliases: str) -> AsyncIterator[AsyncClient]:
    config = PoolConfig(keys=[KeySpec(key_id=a) for a in aliases], queue_timeout=1.0)
    async with AsyncClient({a: SECRETS[a] for a in aliases}, server.url, config) as client:
        yield client


def http_client(app: ASGIApp, **options: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, **options)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://proxy.test")


def scope(method: str, path: str, headers: list[tuple[bytes, bytes]] | None = None) -> Message:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers or [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


class Exchange:
    """Hand-written receive/send: the body in ``parts``, then waits for ``hang_up``."""

    def __init__(self, *parts: bytes) -> None:
        self.incoming: list[Message] = [
            {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
            for i, part in enumerate(parts)
        ]
        self.sent: list[Message] = []
        self.hang_up = anyio.Event()
        self.on_send: Callable[[Exchange], None] = lambda exchange: None

    async def receive(self) -> Message:
        if self.incoming:
            return self.incoming.pop(0)
        await self.hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        self.on_send(self)

    @property
    def bodies(self) -> list[Message]:
        return [m for m in self.sent if m["type"] == "http.response.body"]

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])


def stream_body(max_tokens: int) -> bytes:
    payload = {"model": "m", "messages": [], "stream": True, "max_tokens": max_tokens}
    return json.dumps(payload).encode()


# ---------------------------------------------------------------------------- http


async def test_chat_fails_over_and_forwards_through_asgi() -> None:
    async with upstream(bad=Invalid(), good=Ok()).serve() as server:
        async with (
            proxied(server, "bad", "good") as client,
            http_client(ASGIApp(ProxyApp(client))) as http,
        ):
            response = await http.post(
                "/v1/chat/completions",
                content=CHAT,
                headers={"content-type": "application/json", "authorization": "Bearer mine"},
            )
            models = await http.get("/v1/models?limit=1")
            in_flight = client.status()["stats"]["inFlight"]
    assert response.status_code == 200
    assert response.headers["x-keyrotor-attempts"] == "2"
    assert response.headers["x-keyrotor-key"] == "good"
    assert response.headers["content-length"] == str(len(response.content))
    assert response.json()["choices"][0]["message"]["content"]
    assert models.status_code == 200 and models.json()["data"]
    assert [e.key for e in server.log if e.path.endswith("completions")] == ["bad", "good"]
    assert in_flight == 0


async def test_body_parts_are_joined_and_the_request_is_built_from_the_scope() -> None:
    seen: list[Request] = []

    async def echo(request: Request) -> Response:
        seen.append(request)
        return Response(status=200, headers=[("content-length", "999")], body=request.body)

    exchange = Exchange(b"ab", b"", b"cd")
    mounted = scope("POST", "/keyrotor/v1/x y", [(b"X-Title", b"demo")])
    mounted.update(root_path="/keyrotor", raw_path=b"/keyrotor/v1/x%20y", query_string=b"q=1")
    await ASGIApp(echo)(mounted, exchange.receive, exchange.send)
    request = seen[0]
    assert request.body == b"abcd" and request.method == "POST"
    assert request.target == "/v1/x%20y?q=1"
    assert request.headers == [("x-title", "demo")] and request.client == "127.0.0.1:50000"
    assert exchange.sent[0]["headers"] == [(b"content-length", b"4")]  # the app's is dropped
    assert exchange.bodies == [{"type": "http.response.body", "body": b"abcd"}]


@pytest.mark.parametrize(
    ("root", "raw", "target"),
    [
        ("/v", b"/v1/models", "/v1/models"),  # not under the mount point /v
        ("/v", b"/v/v1/models", "/v1/models"),
        ("/keyrotor/", b"/keyrotor/v1/models", "/v1/models"),
        ("/keyrotor", b"/keyrotor", "/"),
    ],
)
async def test_the_mount_point_is_stripped_on_a_segment_boundary(
    root: str, raw: bytes, target: str
) -> None:
    seen: list[Request] = []

    async def app(request: Request) -> Response:
        seen.append(request)
        return Response(status=200)

    for with_raw in (True, False):
        mounted = scope("GET", raw.decode())
        mounted.update(root_path=root, raw_path=raw if with_raw else None)
        exchange = Exchange(b"")
        await ASGIApp(app)(mounted, exchange.receive, exchange.send)
        assert seen.pop().target == target


async def test_status_metrics_and_healthz_hold_no_secret() -> None:
    async with upstream(bad=Invalid(), good=Ok()).serve() as server:
        async with (
            proxied(server, "bad", "good") as client,
            http_client(ASGIApp(ProxyApp(client))) as http,
        ):
            await http.post("/v1/chat/completions", content=CHAT)
            status = await http.get("/status")
            metrics = await http.get("/metrics")
            health = await http.get("/healthz")
            missing = await http.get("/nope")
    for secret in SECRETS.values():
        assert secret not in status.text and secret not in metrics.text
    assert status.json()["health"]["failed"] == 1
    assert 'keyrotor_key_state{key="bad",state="failed"} 1' in metrics.text
    assert health.json() == {"ok": True, "usable_keys": True}
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "invalid_request_error"


async def test_a_stream_arrives_as_several_body_messages() -> None:
    async with upstream(good=SlowStream(chunk_delay=0.01)).serve() as server:
        async with proxied(server, "good") as client:
            exchange = Exchange(stream_body(5))
            with anyio.fail_after(10):
                await ASGIApp(ProxyApp(client))(
                    scope("POST", "/v1/chat/completions"), exchange.receive, exchange.send
                )
            in_flight = client.status()["stats"]["inFlight"]
    bodies = exchange.bodies
    assert exchange.status == 200
    assert b"content-length" not in dict(exchange.sent[0]["headers"])
    assert len(bodies) > 3
    assert all(m["more_body"] for m in bodies[:-1])
    assert bodies[-1]["more_body"] is False  # with the last chunk, if the end came with it
    text = b"".join(m["body"] for m in bodies).decode()
    assert text.rstrip().endswith("data: [DONE]")
    assert in_flight == 0


async def test_a_disconnect_mid_stream_stops_it_and_frees_the_key() -> None:
    async with upstream(good=SlowStream(chunk_delay=0.05)).serve() as server:
        async with proxied(server, "good") as client:
            exchange = Exchange(stream_body(500))  # 25 s of stream if nobody stopped it

            def leave_after_two_chunks(exchange: Exchange) -> None:
                if len(exchange.bodies) == 2:
                    exchange.hang_up.set()

            exchange.on_send = leave_after_two_chunks
            with anyio.fail_after(20):  # a hang guard only: the whole stream is 25 s
                await ASGIApp(ProxyApp(client))(
                    scope("POST", "/v1/chat/completions"), exchange.receive, exchange.send
                )
                status = client.status()
                # The upstream saw its client leave: the stream was cut, not run out.
                while server.stats("good").disconnects == 0:
                    await anyio.sleep(0.01)
    assert server.stats("good").by_status == {200: 1}
    assert 2 <= len(exchange.bodies) <= 3
    assert all(m.get("more_body") for m in exchange.bodies)  # never finished
    assert status["stats"]["inFlight"] == 0
    assert status["health"]["healthy"] == 1


async def test_a_disconnect_while_waiting_for_the_app_cancels_it() -> None:
    closed: list[str] = []

    async def slow(request: Request) -> Response:
        try:
            await anyio.sleep(30)
        finally:
            closed.append("cancelled")
        raise AssertionError("not reached")

    exchange = Exchange(b"")
    exchange.hang_up.set()
    with anyio.fail_after(5):
        await ASGIApp(slow)(scope("GET", "/v1/models"), exchange.receive, exchange.send)
    assert closed == ["cancelled"] and exchange.sent == []


async def test_aclose_is_called_once_even_when_the_stream_fails() -> None:
    calls: list[str] = []

    async def chunks() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        raise RuntimeError("broken")

    async def close() -> None:
        calls.append("aclose")

    async def app(request: Request) -> Response:
        return Response(status=200, body=chunks(), aclose=close)

    exchange = Exchange(b"")
    with pytest.raises(RuntimeError, match="broken"):
        await ASGIApp(app)(scope("GET", "/v1/models"), exchange.receive, exchange.send)
    assert calls == ["aclose"]
    assert [m["body"] for m in exchange.bodies] == [b"data: 1\n\n"]


async def test_an_app_error_is_a_500_in_openai_shape_and_reaches_the_server() -> None:
    async def broken(request: Request) -> Response:
        raise ValueError("bug")

    async with http_client(ASGIApp(broken), raise_app_exceptions=False) as http:
        response = await http.get("/v1/models")
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    exchange = Exchange(b"")
    with pytest.raises(ValueError, match="bug"):
        await ASGIApp(broken)(scope("GET", "/v1/models"), exchange.receive, exchange.send)


async def test_an_oversized_body_gets_413() -> None:
    assert MAX_BODY_BYTES == 10 * 1024 * 1024
    seen: list[Request] = []

    async def app(request: Request) -> Response:
        seen.append(request)
        return Response(status=200)

    small = ASGIApp(app, max_body_bytes=1000)
    exchange = Exchange(b"x" * 600, b"x" * 600)  # too large only once joined
    await small(scope("POST", "/v1/chat/completions"), exchange.receive, exchange.send)
    assert exchange.status == 413
    assert json.loads(exchange.bodies[0]["body"])["error"]["code"] == 413
    async with http_client(ASGIApp(app)) as http:  # the default limit, declared up front
        declared = await http.post("/v1/chat/completions", content=b"x" * (MAX_BODY_BYTES + 1))
        fits = await http.post("/v1/chat/completions", content=b"x" * 1000)
    assert declared.status_code == 413
    assert "too large" in declared.json()["error"]["message"]
    assert fits.status_code == 200 and len(seen) == 1


async def test_answers_written_by_the_front_are_counted_by_the_app() -> None:
    # The front's own 413s and 500s never reached the app's metrics.
    class Counting:
        def __init__(self) -> None:
            self.answered: list[int] = []

        def server_answered(self, status: int) -> None:
            self.answered.append(status)

        async def __call__(self, request: Request) -> Response:
            if request.path == "/v1/broken":
                raise ValueError("bug")
            return Response(status=200)

    app = Counting()
    front = ASGIApp(app, max_body_bytes=1000)
    exchange = Exchange(b"x" * 600, b"x" * 600)
    await front(scope("POST", "/v1/chat/completions"), exchange.receive, exchange.send)
    async with http_client(front, raise_app_exceptions=False) as http:
        assert (await http.post("/v1/chat/completions", content=b"x" * 2000)).status_code == 413
        assert (await http.get("/v1/broken")).status_code == 500
        assert (await http.get("/v1/models")).status_code == 200  # the app's own: not here
    assert app.answered == [413, 413, 500]


# ------------------------------------------------------------------------ lifespan


async def test_lifespan_builds_and_closes_the_client_from_config() -> None:
    async with upstream(bad=Invalid(), good=Ok()).serve() as server:
        config = ProxyConfig(
            keys=dict(SECRETS),
            pool=PoolConfig(keys=[KeySpec(key_id="bad"), KeySpec(key_id="good")]),
            upstream=server.url,
        )
        records: list[dict[str, Any]] = []
        asgi = ASGIApp.from_config(config, log=records.append, allow_open=True)
        to_app, app_inbox = anyio.create_memory_object_stream[Message](4)
        app_outbox, from_app = anyio.create_memory_object_stream[Message](4)

        async def send(message: Message) -> None:
            await app_outbox.send(message)

        async with http_client(asgi) as http, to_app, app_inbox, app_outbox, from_app:
            before = await http.get("/healthz")
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(asgi, {"type": "lifespan"}, app_inbox.receive, send)
                await to_app.send({"type": "lifespan.startup"})
                assert (await from_app.receive())["type"] == "lifespan.startup.complete"
                chat = await http.post("/v1/chat/completions", content=CHAT)
                assert asgi.app is not None
                status = json.loads(await _body(asgi.app, "/status"))
                await to_app.send({"type": "lifespan.shutdown"})
                assert (await from_app.receive())["type"] == "lifespan.shutdown.complete"
            after = await http.get("/healthz")
    assert before.status_code == 503 and "lifespan" in before.json()["error"]["message"]
    assert chat.status_code == 200 and chat.headers["x-keyrotor-attempts"] == "2"
    assert status["stats"]["inFlight"] == 0 and status["health"]["failed"] == 1
    assert [r["key_id"] for r in records if r["event"] == "key_state"] == ["bad"]
    assert asgi.app is None and after.status_code == 503


async def test_a_startup_failure_is_reported_to_the_server() -> None:
    config = ProxyConfig(keys={"a": "sk-a"}, pool=PoolConfig(keys=[KeySpec(key_id="a")]))
    asgi = ASGIApp.from_config(config, allow_open=True)
    sent: list[Message] = []
    incoming = [{"type": "lifespan.startup"}]

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "lifespan.startup.complete":
            raise RuntimeError("the server refused")

    await asgi({"type": "lifespan"}, receive, send)
    assert sent[-1]["type"] == "lifespan.startup.failed"
    assert "the server refused" in sent[-1]["message"]
    assert asgi.app is None


async def test_a_running_app_has_a_trivial_lifespan_and_refuses_websockets() -> None:
    async def app(request: Request) -> Response:
        return Response(status=200)  # pragma: no cover

    asgi = ASGIApp(app)
    incoming: list[Message] = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await asgi({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert asgi.app is app
    sent.clear()
    incoming.append({"type": "websocket.connect"})
    await asgi({"type": "websocket", "path": "/v1/realtime"}, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1000}]


async def test_an_app_answering_something_else_is_a_500() -> None:
    async def odd(request: Request) -> Response:
        return "not a response"  # type: ignore[return-value]

    exchange = Exchange(b"")
    with pytest.raises(TypeError, match="returned str"):
        await ASGIApp(odd)(scope("GET", "/v1/models"), exchange.receive, exchange.send)
    assert exchange.status == 500


async def test_running_is_the_lifespan_for_a_parent_app() -> None:
    async with upstream(good=Ok()).serve() as server:
        config = ProxyConfig(
            keys={"good": SECRETS["good"]},
            pool=PoolConfig(keys=[KeySpec(key_id="good")]),
            upstream=server.url,
        )
        asgi = ASGIApp.from_config(config, allow_open=True)
        async with asgi.running() as app, http_client(asgi) as http:
            response = await http.post("/v1/chat/completions", content=CHAT)
            with pytest.raises(RuntimeError, match="already running"):
                async with asgi.running():
                    pass  # pragma: no cover
            assert asgi.app is app
    assert response.status_code == 200 and asgi.app is None


async def _body(app: Callable[[Request], Awaitable[Response]], path: str) -> bytes:
    response = await app(Request(method="GET", target=path, headers=[], body=b""))
    assert isinstance(response.body, bytes)
    return response.body


# ------------------------------------------------------------------- a real server

_SERVERS = [name for name in ("uvicorn", "hypercorn") if importlib.util.find_spec(name)]
_SERVE = """
import sys
from keyrotor.adapters.asgi import ASGIApp
from keyrotor.adapters.config import ProxyConfig
from keyrotor.core import KeySpec, PoolConfig

name, url, port, bad, good = sys.argv[1:]
config = ProxyConfig(
    keys={"bad": bad, "good": good},
    pool=PoolConfig(keys=[KeySpec(key_id="bad"), KeySpec(key_id="good")]),
    upstream=url,
)
app = ASGIApp.from_config(config, allow_open=True)
if name == "uvicorn":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(port), lifespan="on", log_level="warning")
else:
    import asyncio

    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    hc = Config()
    hc.bind = [f"127.0.0.1:{port}"]
    asyncio.run(serve(app, hc))
"""


@pytest.mark.skipif(not _SERVERS, reason="neither uvicorn nor hypercorn is installed")
def test_a_real_asgi_server_serves_the_proxy() -> None:
    with FakeUpstream.running_in_thread(scenario(bad=Invalid(), good=Ok())) as server:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        args = [_SERVERS[0], server.url, str(port), SECRETS["bad"], SECRETS["good"]]
        env = {**os.environ, "PYTHONPATH": os.getcwd()}
        process = subprocess.Popen([sys.executable, "-c", _SERVE, *args], env=env)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
                deadline = time.monotonic() + 30  # a start-up guard, not a bound
                while True:
                    try:
                        if http.get("/healthz").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert time.monotonic() < deadline, "the ASGI server did not start"
                    time.sleep(0.1)
                response = http.post("/v1/chat/completions", content=CHAT)
        finally:
            process.terminate()
            process.wait(10)
    assert response.status_code == 200
    assert response.headers["x-keyrotor-attempts"] == "2"


def test_from_config_refuses_an_open_pool_unless_told_it_is_private() -> None:
    from keyrotor.adapters.config import ConfigError

    config = ProxyConfig(
        keys={"a": "test-secret-for-asgi-0001"}, pool=PoolConfig(keys=[KeySpec(key_id="a")])
    )
    with pytest.raises(ConfigError, match="no client tokens") as info:
        ASGIApp.from_config(config)
    assert "allow_open=True" in str(info.value) and "test-secret" not in str(info.value)
    assert ASGIApp.from_config(config, allow_open=True).app is None
    tokens = ProxyConfig(
        keys=config.keys, pool=config.pool, client_tokens=("client-token-" + "7" * 20,)
    )
    assert ASGIApp.from_config(tokens).app is None


async def test_the_dashboard_and_its_data_are_served_through_asgi_too() -> None:
    async with upstream(good=Ok()).serve() as server:
        async with (
            proxied(server, "good") as client,
            http_client(ASGIApp(ProxyApp(client))) as http,
        ):
            page = await http.get("/dashboard")
            script = await http.get("/dashboard/dashboard.js")
            alerts = await http.get("/alerts")
    assert page.status_code == 200 and b'id="login-token"' in page.content
    assert script.headers["content-type"].startswith("text/javascript")
    assert alerts.json()["alerts"] == []  # no token configured: open, like /status


async def test_what_a_stream_has_in_hand_goes_in_one_message_and_nothing_waits() -> None:
    async def app(request: Request) -> Response:
        return Response(status=200, body=body)

    body = Lookahead([b"a", b"b", b"c"])
    whole = Exchange(b"")
    with anyio.fail_after(10):
        await ASGIApp(app)(scope("GET", "/s"), whole.receive, whole.send)
    assert whole.bodies == [{"type": "http.response.body", "body": b"abc", "more_body": False}]

    # The third chunk waits until the server has sent the first two: a front that
    # held them for a later message would wait forever (fail_after: a hang guard).
    body = Lookahead([b"a", b"b", b"c"], gated=2)
    gated = Exchange(b"")

    async def send(message: Message) -> None:
        await gated.send(message)
        if message.get("body") == b"ab":
            body.gate.set()

    with anyio.fail_after(10):
        await ASGIApp(app)(scope("GET", "/s"), gated.receive, send)
    assert [(m["body"], m["more_body"]) for m in gated.bodies] == [(b"ab", True), (b"c", False)]


async def test_a_chunk_in_hand_goes_out_before_the_streams_error() -> None:
    """The first chunk is held (the second is in hand), then reading the second
    fails: the first still reaches the server, as the proxy's own server sends it."""

    class Breaks(Lookahead):
        async def __anext__(self) -> bytes:
            if self.index == 1:
                raise RuntimeError("the stream broke")
            return await super().__anext__()

    async def app(request: Request) -> Response:
        return Response(status=200, body=Breaks([b"first", b"never"]))

    exchange = Exchange(b"")
    with anyio.fail_after(10), pytest.raises(RuntimeError, match="broke"):
        await ASGIApp(app)(scope("GET", "/s"), exchange.receive, exchange.send)
    assert [(m["body"], m["more_body"]) for m in exchange.bodies] == [(b"first", True)]
