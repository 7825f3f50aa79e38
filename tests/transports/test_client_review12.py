"""Review 12 of the clients: secrets and headers checked at construction, no
secret in a traceback's locals, an unread buffered answer accounted, client
headers overridden whatever their case, ``chat``'s body parameters, HTTPOptions'
bounds, the blocking client's ``close()`` during a request and its first-byte
deadline."""

from __future__ import annotations

import json
import ssl
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpcore
import pytest

import keyrotor
from keyrotor.core import KeySpec, PoolConfig
from keyrotor.testing import (
    Behaviour,
    Call,
    Custom,
    Drop,
    FakeUpstream,
    Hang,
    Ok,
    Reply,
    Scenario,
    Slow,
    SlowStream,
)
from keyrotor.testing.certificates import server_context
from keyrotor.transports import asyncio as aclient
from keyrotor.transports._driver import Driver
from keyrotor.transports._http import Upstream, request_headers
from keyrotor.transports.errors import (
    ConfigurationError,
    KeyrotorError,
    NoKeyAvailable,
    UpstreamError,
)
from keyrotor.transports.sync import Client, HTTPOptions

MESSAGES = [{"role": "user", "content": "hi"}]
MODEL = "openai/gpt-4o-mini"
CHAT = {"model": MODEL, "messages": MESSAGES}
HANG_GUARD = 60.0  # seconds: only a hang guard, never a bound a test relies on


def secret(alias: str) -> str:
    return f"sk-or-v1-test-SECRET{alias.upper()}-0123456789abcdef"


def config(aliases: list[str], **options: Any) -> PoolConfig:
    return PoolConfig(keys=[KeySpec(key_id=alias) for alias in aliases], **options)


@contextmanager
def running(
    behaviours: Mapping[str, Behaviour], *, max_attempts: int = 3, **options: Any
) -> Iterator[tuple[Client, FakeUpstream]]:
    """The fake upstream with one key per alias, and an open blocking client on it."""
    scenario = Scenario()
    for alias, behaviour in behaviours.items():
        scenario.add(secret(alias), behaviour, alias=alias)
    keys = {alias: secret(alias) for alias in behaviours}
    with (
        FakeUpstream.running_in_thread(scenario) as server,
        Client(keys, server.url, config(list(keys), max_attempts=max_attempts), **options) as c,
    ):
        yield c, server


def transport_errors(client: Client) -> dict[str, int]:
    return {k["alias"]: k["errors"]["transport"] for k in client.status()["keys"]}


# ------------------------------------------------------- 1. secrets, headers

BAD_SECRETS = [
    "sk-or-v1-test-0123456789abcdef\u200b",  # a zero-width space pasted with it
    "sk-or-v1-test-0123456789abcdef\x00",  # NUL from a padded file
    "sk-or-v1-test-0123456789abcdef\x7f",  # DEL
    "sk-or-v1-test-0123456789abcdéf",
    "sk-or-v1-test-0123456789abcdef\t",
]


@pytest.mark.parametrize("bad", BAD_SECRETS)
def test_a_secret_http_cannot_carry_is_refused_at_construction(bad: str) -> None:
    keys = {"good": secret("good"), "pasted": bad}
    for make in (Client, aclient.Client):
        with pytest.raises(ConfigurationError) as caught:
            make(keys, "http://127.0.0.1:9/api/v1")
        message = str(caught.value)
        assert "'pasted'" in message and "copy the key again" in message
        assert bad not in message and bad[:-1] not in message and "0123456789" not in message
    from keyrotor.transports._driver import valid_secret

    assert not valid_secret(bad)
    assert valid_secret(secret("good"))


@pytest.mark.parametrize("bad", BAD_SECRETS)
def test_add_key_refuses_a_secret_http_cannot_carry(bad: str) -> None:
    client = Client({"good": secret("good")}, "http://127.0.0.1:9/api/v1")
    with pytest.raises(ConfigurationError) as caught:
        client.add_key("pasted", bad)
    assert "'pasted'" in str(caught.value) and "0123456789" not in str(caught.value)
    driver = Driver({"good": secret("good")})
    with pytest.raises(ConfigurationError):
        driver.check_new_key("pasted", bad)
    assert client.status()["totalKeys"] == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Title", "Café ☕"),  # not Latin-1
        ("X-Title", "one\r\nX-Injected: two"),
        ("X-Title", "nul\x00"),
        ("X Title", "a name with a space"),
        ("X-Título", "a name that is no token"),
    ],
)
def test_client_headers_http_cannot_carry_are_refused_at_construction(
    name: str, value: str
) -> None:
    for make in (Client, aclient.Client):
        with pytest.raises(ConfigurationError) as caught:
            make({"a": secret("a")}, "http://127.0.0.1:9/api/v1", headers={name: value})
        assert repr(name) in str(caught.value)
        assert value not in str(caught.value)


def test_latin1_client_headers_are_accepted() -> None:
    client = Client(
        {"a": secret("a")}, "http://127.0.0.1:9/api/v1", headers={"X-Title": "Café crème"}
    )
    assert client._upstream.headers == {"x-title": "Café crème"}


@pytest.mark.parametrize(
    "headers",
    [
        {"x-custom": "PRIVATEVALUE\x00"},
        {"x-custom": "PRIVATEVALUE\n"},
        {"x-custom": "PRIVATEVALUE☕"},
    ],
)
def test_sync_request_header_http_refuses_blames_no_key_and_shows_no_value(
    headers: dict[str, str],
) -> None:
    with running({"a": Ok(), "b": Ok()}) as (client, _server):
        with pytest.raises(ConfigurationError) as caught:
            client.request("POST", "/chat/completions", json=CHAT, headers=headers)
        error = caught.value
        assert "'x-custom'" in str(error) or "HTTP does not allow" in str(error)
        assert_hidden(error)
        status = client.status()
        assert status["stats"]["inFlight"] == 0
        assert transport_errors(client) == {"a": 0, "b": 0}
        assert client.request("POST", "/chat/completions", json=CHAT).status_code == 200


def assert_hidden(error: BaseException) -> None:
    """Neither the header's value in the error as shown, nor the key's secret
    even in its traceback's locals (an error reporter keeps them)."""
    shown = "".join(traceback.format_exception(error))
    assert "PRIVATEVALUE" not in shown and "SECRET" not in shown
    assert error.__cause__ is None and error.__context__ is None
    assert "SECRET" not in keyrotor_locals(error)


def keyrotor_locals(error: BaseException) -> str:
    """The locals of keyrotor's frames in ``error``'s traceback, as an error
    reporter keeps them (the test's own frames hold the scenario's secrets)."""
    with_locals = traceback.TracebackException.from_exception(error, capture_locals=True)
    package = str(Path(keyrotor.__file__).parent)
    frames = [frame for frame in with_locals.stack if frame.filename.startswith(package)]
    assert frames
    return repr([frame.locals for frame in frames])


def test_async_request_header_not_latin1_blames_no_key_and_shows_no_secret() -> None:
    scenario = Scenario().add(secret("a"), Ok(), alias="a")

    async def main() -> None:
        async with FakeUpstream(scenario).serve() as server:
            async with aclient.Client({"a": secret("a")}, server.url, config(["a"])) as client:
                with pytest.raises(ConfigurationError, match="'x-custom'") as caught:
                    await client.request(
                        "POST",
                        "/chat/completions",
                        json=CHAT,
                        headers={"x-custom": "PRIVATEVALUE☕"},
                    )
                assert_hidden(caught.value)
                assert client.status()["stats"]["inFlight"] == 0
                assert client.status()["keys"][0]["errors"]["transport"] == 0
                assert (await client.request("POST", "/chat/completions", json=CHAT)).is_success

    anyio.run(main)


# ------------------------------------------------- 2. no secret in the locals


def test_no_secret_in_the_locals_of_an_error_through_the_attempts() -> None:
    with running({"a": Drop(), "b": Drop()}, max_attempts=2) as (client, _server):
        with pytest.raises(NoKeyAvailable) as caught:
            client.chat(model=MODEL, messages=MESSAGES)
    shown = traceback.TracebackException.from_exception(caught.value, capture_locals=True)
    assert "attempts" in [frame.name for frame in shown.stack]  # its frame, with its locals
    assert "SECRET" not in "".join(shown.format())
    assert "SECRET" not in keyrotor_locals(caught.value)


# ------------------------------------------- 3. an unread buffered answer


def test_sync_closing_an_unread_buffered_answer_accounts_its_spend() -> None:
    with running({"a": Ok()}) as (client, server):
        response = client.send("POST", "/chat/completions", json=CHAT)
        assert response.status_code == 200
        response.close()  # the body (read whole already) never read by the caller
        charged = server.stats("a").cost
        assert charged > 0
        status = client.status()
        assert status["stats"]["totalCost"] == pytest.approx(charged)
        assert status["stats"]["inFlight"] == 0
        assert status["keys"][0]["successes"] == 1


def test_async_closing_an_unread_buffered_answer_accounts_its_spend() -> None:
    scenario = Scenario().add(secret("a"), Ok(), alias="a")

    async def main() -> None:
        async with FakeUpstream(scenario).serve() as server:
            async with aclient.Client({"a": secret("a")}, server.url, config(["a"])) as client:
                response = await client.send("POST", "/chat/completions", json=CHAT)
                await response.aclose()
                charged = server.stats("a").cost
                assert charged > 0
                assert client.status()["stats"]["totalCost"] == pytest.approx(charged)
                # Read, then closed before the end was asked for: accounted once.
                response = await client.send("POST", "/chat/completions", json=CHAT)
                async for _chunk in response.aiter_bytes():
                    break
                await response.aclose()
                assert client.status()["stats"]["totalCost"] == pytest.approx(2 * charged)

    anyio.run(main)


# --------------------------------------- 4. client headers, case-insensitive


@pytest.mark.parametrize("caller", ["x-title", "X-Title", "X-TITLE"])
def test_a_request_header_replaces_the_clients_whatever_the_case(caller: str) -> None:
    upstream = Upstream.from_url(
        "http://127.0.0.1:9/api/v1", headers={"X-Title": "client", "HTTP-Referer": "r"}
    )
    merged = upstream.merge_headers({caller: "caller", "x-other": "o"})
    sent = request_headers(b"h", secret("a"), merged, None)
    titles = [value for name, value in sent if name.lower() == b"x-title"]
    assert titles == [b"caller"]
    assert [v for n, v in sent if n.lower() == b"http-referer"] == [b"r"]
    assert upstream.merge_headers(None) == {"x-title": "client", "http-referer": "r"}


# ------------------------------------------------------- 5. chat's parameters


def test_chat_sends_route_and_attempts_in_the_body() -> None:
    seen: list[dict[str, Any]] = []

    def note(call: Call) -> None:
        seen.append(dict(call.body))

    with running({"a": Custom(note)}) as (client, _server):
        client.chat(
            model=MODEL, messages=MESSAGES, route="fallback", attempts=2, temperature=0.1, pin="a"
        )
    assert seen[-1]["route"] == "fallback"
    assert seen[-1]["attempts"] == 2
    assert seen[-1]["temperature"] == 0.1
    assert "pin" not in seen[-1]


# ------------------------------------------------------------- 6. HTTPOptions


@pytest.mark.parametrize("name", ["max_connections", "max_connections_per_key"])
@pytest.mark.parametrize("value", [2.5, 0, -1, True, "3", 10.0])
def test_connection_counts_must_be_whole_numbers(name: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=f"HTTPOptions.{name} must be a whole number"):
        HTTPOptions(**{name: value})


@pytest.mark.parametrize("value", [-1, -0.5, float("inf"), float("nan"), None])
def test_keepalive_expiry_must_be_finite_and_not_negative(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="keepalive_expiry"):
        HTTPOptions(keepalive_expiry=value)


def test_sync_keepalive_expiry_zero_serves_one_request_a_connection() -> None:
    with running({"a": Ok()}, http=HTTPOptions(keepalive_expiry=0)) as (client, server):
        before = server.totals().connections
        for _ in range(3):
            assert client.request("POST", "/chat/completions", json=CHAT).status_code == 200
        assert server.totals().connections - before == 3
    with running({"a": Ok()}) as (client, server):  # kept alive otherwise
        before = server.totals().connections
        for _ in range(3):
            client.request("POST", "/chat/completions", json=CHAT)
        assert server.totals().connections - before <= 1


def test_async_keepalive_expiry_zero_runs() -> None:
    scenario = Scenario().add(secret("a"), Ok(), alias="a")
    http = HTTPOptions(keepalive_expiry=0)

    async def main() -> None:
        async with FakeUpstream(scenario).serve() as server:
            keys = {"a": secret("a")}
            async with aclient.Client(keys, server.url, config(["a"]), http=http) as client:
                for _ in range(2):
                    await client.chat(model=MODEL, messages=MESSAGES)

    anyio.run(main)


# ----------------------------------- 7. the blocking client closed mid-request


def blocked_on(
    server: FakeUpstream, call: Callable[[], object], outcome: list[BaseException]
) -> threading.Thread:
    """``call`` on a thread of its own, once the upstream holds its request (the
    thread then waits for the head); what it raises goes to ``outcome``."""

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + HANG_GUARD
    while server.totals().in_flight < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.totals().in_flight == 1
    return thread


def test_sync_close_ends_a_request_blocked_on_the_upstream_blaming_no_key() -> None:
    http = HTTPOptions(first_byte=HANG_GUARD * 2, idle=HANG_GUARD * 2)
    scenario = Scenario().add(secret("a"), Hang(), alias="a").add(secret("b"), Hang(), alias="b")
    outcome: list[BaseException] = []
    with FakeUpstream.running_in_thread(scenario) as server:
        keys = {"a": secret("a"), "b": secret("b")}
        client = Client(keys, server.url, config(["a", "b"]), http=http)
        client.__enter__()

        thread = blocked_on(
            server, lambda: client.request("POST", "/chat/completions", json=CHAT), outcome
        )
        client.close()
        thread.join(HANG_GUARD)
        assert not thread.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], KeyrotorError)
        assert str(outcome[0]) == "the client was closed while the request ran"
        assert transport_errors(client) == {"a": 0, "b": 0}
        assert client.status()["stats"]["inFlight"] == 0


# ------------------------------------------- 8. the blocking client's first byte


def test_sync_first_byte_fails_over_a_key_slow_to_answer() -> None:
    http = HTTPOptions(first_byte=1.0, idle=HANG_GUARD)
    behaviours = {"slow": Slow(10.0), "f1": Ok(), "f2": Ok()}
    with running(behaviours, http=http) as (client, _server):
        response = client.request("POST", "/chat/completions", json=CHAT, pin="slow")
        assert response.key != "slow"
        assert response.attempts >= 2
        assert transport_errors(client)["slow"] == 1


def test_sync_first_byte_stream_bounds_a_streams_head_and_idle_its_body() -> None:
    http = HTTPOptions(first_byte=HANG_GUARD, first_byte_stream=1.0, idle=HANG_GUARD)
    body = {**CHAT, "stream": True, "max_tokens": 2}
    with running({"slow": Slow(10.0), "fast": Ok()}, http=http) as (client, _server):
        with client.stream("POST", "/chat/completions", json=body, pin="slow") as response:
            lines = list(response.iter_lines())
        assert response.key == "fast"
        assert "data: [DONE]" in lines
    # Between two chunks, ``idle`` (not ``first_byte_stream``) bounds the wait.
    http = HTTPOptions(first_byte_stream=1.0, idle=HANG_GUARD)
    with running({"a": SlowStream(1.5)}, http=http) as (client, _server):
        one = {**body, "max_tokens": 1}
        with client.stream("POST", "/chat/completions", json=one) as response:
            lines = list(response.iter_lines())
        assert response.attempts == 1
        assert "data: [DONE]" in lines
        assert transport_errors(client) == {"a": 0}


def test_sync_close_wakes_a_request_blocked_on_a_tls_connection(
    certificate: tuple[Path, Path],
) -> None:
    """The blocking client's backend shuts TLS streams down too (the socket
    a TLS stream reads is not the one TCP connected)."""
    from keyrotor.transports.sync import _Backend

    cert, key = certificate
    scenario = Scenario().add(secret("a"), Hang(), alias="a")
    backend = _Backend()
    trusting = ssl.create_default_context(cafile=str(cert))
    outcome: list[BaseException] = []
    with (
        FakeUpstream.running_in_thread(scenario, ssl_context=server_context(cert, key)) as server,
        httpcore.ConnectionPool(ssl_context=trusting, network_backend=backend) as pool,
    ):
        assert server.url.startswith("https://")
        headers = [("Authorization", f"Bearer {secret('a')}"), ("Content-Type", "application/json")]

        def call() -> None:
            pool.request(
                "POST",
                f"{server.url}/chat/completions",
                headers=headers,
                content=json.dumps(CHAT).encode(),
                extensions={"timeout": {"read": HANG_GUARD * 2}},
            )

        thread = blocked_on(server, call, outcome)
        backend.shutdown()
        thread.join(HANG_GUARD)
        assert not thread.is_alive()
        assert len(outcome) == 1 and isinstance(
            outcome[0], httpcore.NetworkError | httpcore.RemoteProtocolError
        )
        with pytest.raises(httpcore.ConnectError, match="closing"):
            pool.request("GET", f"{server.url}/key", headers=headers)


@pytest.mark.parametrize("value", ["PRIVATEVALUE\x00", "PRIVATEVALUE\n"])
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_request_header_http_refuses_blames_no_key_and_shows_no_secret(
    value: str, backend: str
) -> None:
    # The h11 pool's LocalProtocolError went out as it was: its frames' locals
    # held the Authorization header (the key's secret).
    scenario = Scenario().add(secret("a"), Ok(), alias="a")

    async def main() -> None:
        async with FakeUpstream(scenario).serve() as server:
            async with aclient.Client({"a": secret("a")}, server.url, config(["a"])) as client:
                with pytest.raises(ConfigurationError) as caught:
                    await client.request(
                        "POST", "/chat/completions", json=CHAT, headers={"x-custom": value}
                    )
                assert_hidden(caught.value)
                assert client.status()["stats"]["inFlight"] == 0
                assert client.status()["keys"][0]["errors"]["transport"] == 0
                assert (await client.request("POST", "/chat/completions", json=CHAT)).is_success

    anyio.run(main, backend=backend)


@pytest.mark.parametrize(("code", "status"), [(429, 429), ("503", 503), ("oops", 502), (None, 502)])
def test_chat_raises_on_a_200_whose_body_is_an_error(code: object, status: int) -> None:
    # OpenRouter answers a generation that failed midway with 200 and an error
    # object; chat() returned that body as if it were a completion.
    error = {"message": "provider returned error", "code": code}
    body = {"choices": [{"finish_reason": "error"}], "error": error}
    with running({"a": Reply(200, body=body)}, max_attempts=1) as (client, _server):
        with pytest.raises(UpstreamError) as caught:
            client.chat(model=MODEL, messages=MESSAGES)
    assert caught.value.status == status and caught.value.key == "a"
