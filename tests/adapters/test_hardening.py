"""Issue 11's hardening, end to end over loopback sockets: the proxy in a thread in
front of the fake upstream, reached with httpx or raw HTTP/1.1 bytes."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import httpx

from keyrotor.adapters.config import HTTPOptions, ProxyConfig
from keyrotor.core import KeySpec, PoolConfig
from keyrotor.testing import Behaviour, Credits, FakeUpstream, Hang, Invalid, Ok, Scenario, Truncate

from .proxy_thread import ProxyThread

MODEL = "openai/gpt-4o-mini"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
TOKEN = "a-client-token-of-16+chars"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def secret(alias: str) -> str:
    return f"sk-or-v1-hard-{alias}-{sum(map(ord, alias)):018d}"


@contextmanager
def proxy(
    behaviours: dict[str, Behaviour],
    *,
    pool: dict[str, Any] | None = None,
    http: HTTPOptions | None = None,
    server: dict[str, Any] | None = None,
    tokens: tuple[str, ...] = (),
) -> Iterator[tuple[str, FakeUpstream]]:
    """The proxy over one fake upstream key per alias; yields (proxy URL, upstream)."""
    keys = {alias: secret(alias) for alias in behaviours}
    sc = Scenario()
    for alias, behaviour in behaviours.items():
        sc.add(keys[alias], behaviour, alias=alias)
    with FakeUpstream.running_in_thread(sc) as upstream:
        config = ProxyConfig(
            keys=keys,
            pool=PoolConfig(keys=[KeySpec(key_id=alias) for alias in keys], **(pool or {})),
            upstream=upstream.url,
            http=http or HTTPOptions(),
            server={"host": "127.0.0.1", "port": 0, **(server or {})},
            client_tokens=tokens,
        )
        with ProxyThread(config, []) as url:
            yield url, upstream


def chat(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers, timeout=30)


def keys_by_alias(url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    status = httpx.get(f"{url}/status", headers=headers, timeout=10).json()
    return {key["alias"]: key for key in status["keys"]}


# ------------------------------------------------------------------ raw sockets


def connect(url: str, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    return sock


def head(method: str, target: str, *lines: str) -> bytes:
    return "\r\n".join([f"{method} {target} HTTP/1.1", "Host: proxy", *lines, "", ""]).encode()


def read_response(sock: socket.socket, data: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One whole response (head and Content-Length body) from ``sock``."""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a whole response head: {data!r}"
        data += chunk
    raw_head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = raw_head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "closed in the middle of the response body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed (EOF or reset); False if it kept it open."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def raw_exchange(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with connect(url) as sock:
        sock.sendall(request)
        return read_response(sock)


# ------------------------------------------------------------------ 1. a hanging key


def test_a_hanging_key_fails_over_and_is_degraded_without_blaming_the_others() -> None:
    keys = {"ok1": Ok(), "hang": Hang(), "ok2": Ok()}
    with proxy(keys, http=HTTPOptions(first_byte=1.0)) as (url, _):
        replies = [chat(url) for _ in range(8)]
        assert [r.status_code for r in replies] == [200] * 8
        status = keys_by_alias(url)
    assert status["hang"]["state"] == "degraded"
    assert status["hang"]["reason"] == "transport_timeouts"
    assert status["ok1"]["errors"]["transport"] == 0
    assert status["ok2"]["errors"]["transport"] == 0


def test_a_stream_pinned_to_a_hanging_key_uses_the_stream_first_byte_deadline() -> None:
    keys = {"hang": Hang(), "ok1": Ok(), "ok2": Ok()}
    http = HTTPOptions(first_byte=30, first_byte_stream=1.0)
    with proxy(keys, http=http) as (url, _):
        body = {**CHAT, "stream": True}
        with httpx.Client(timeout=10) as client:
            reply = client.post(
                f"{url}/v1/chat/completions", json=body, headers={"x-keyrotor-key": "hang"}
            )
    assert reply.status_code == 200
    assert reply.headers["x-keyrotor-key"] in ("ok1", "ok2")
    assert reply.headers["x-keyrotor-pin"].startswith("fallback")
    assert "data:" in reply.text


# ------------------------------------------------------------------ 2. a broken body


def test_a_body_broken_off_fails_over_and_is_charged_to_its_key() -> None:
    with proxy({"ok1": Ok(), "broken": Truncate()}) as (url, upstream):
        replies = [chat(url) for _ in range(20)]
        status = keys_by_alias(url)
    assert [r.status_code for r in replies] == [200] * 20
    assert all(r.json()["choices"][0]["message"]["content"] for r in replies)
    assert all(r.headers["x-keyrotor-key"] == "ok1" for r in replies)
    assert "broken" in upstream.keys_seen()  # the broken key was tried
    assert status["broken"]["errors"]["transport"] > 0
    assert status["broken"]["successes"] == 0


# ------------------------------------------------------------------ 3. every key dead


def test_when_every_key_is_dead_the_first_request_gets_its_503_without_waiting() -> None:
    keys = {"bad": Invalid(), "poor": Credits(0.0)}
    with proxy(keys, pool={"queue_timeout": 60}) as (url, upstream):
        reply = chat(url)  # 30 s client timeout: the old wait of queue_timeout fails here
        assert sorted(k for k in upstream.keys_seen() if k) == ["bad", "poor"]
    assert reply.status_code == 503
    assert "retry-after" not in reply.headers
    error = reply.json()["error"]
    assert "none is expected back" in error["message"]
    assert "no Retry-After" in error["message"]


# ------------------------------------------------------------------ 4. token before body


def test_a_request_without_a_token_is_refused_from_its_head_before_the_body() -> None:
    with proxy({"ok1": Ok()}, tokens=(TOKEN,)) as (url, upstream):
        for expect in ([], ["Expect: 100-continue"]):
            with connect(url) as sock:
                sock.sendall(
                    head(
                        "POST",
                        "/v1/chat/completions",
                        "Content-Type: application/json",
                        "Content-Length: 10485759",
                        *expect,
                    )
                )  # and no body at all
                status, headers, body = read_response(sock)
                assert status == 401, expect  # not a 100 Continue first
                assert headers["connection"] == "close"
                assert json.loads(body)["error"]["code"] == "invalid_api_key"
                assert closed_by_server(sock)
        assert upstream.keys_seen() == []


# ------------------------------------------------------------------ 5. unproven connections


def test_idle_connections_from_one_address_cannot_take_the_slots_of_others() -> None:
    server = {"max_unproven_per_address": 3}
    with proxy({"ok1": Ok()}, server=server, tokens=(TOKEN,)) as (url, _):
        idle = [connect(url, "127.0.0.2") for _ in range(3)]
        try:
            with connect(url, "127.0.0.2") as fourth:
                assert closed_by_server(fourth)
            assert chat(url, AUTH).status_code == 200  # another address is served
        finally:
            for sock in idle:
                sock.close()
        status = None
        for _ in range(100):  # the server notices the idle sockets closed
            with connect(url, "127.0.0.2") as sock:
                try:
                    sock.sendall(head("GET", "/status", f"Authorization: Bearer {TOKEN}"))
                    status = read_response(sock)[0]
                except (AssertionError, ConnectionResetError, BrokenPipeError):
                    status = None
            if status == 200:
                break
            time.sleep(0.05)
        assert status == 200


# ------------------------------------------------------------------ 6. request_timeout


def test_a_body_trickled_in_is_cut_off_by_the_request_timeout_with_a_408() -> None:
    server = {"request_timeout": 0.5, "body_timeout": 5}
    with proxy({"ok1": Ok()}, server=server, tokens=(TOKEN,)) as (url, upstream):
        with connect(url) as sock:
            sock.sendall(
                head(
                    "POST",
                    "/v1/chat/completions",
                    f"Authorization: Bearer {TOKEN}",
                    "Content-Type: application/json",
                    "Content-Length: 100",
                )
            )
            answer, sent = b"", 0
            sock.settimeout(0.1)
            while sent < 100 and not answer:
                try:
                    sock.sendall(b" ")  # one byte every 0.1 s: 10 s for the whole body
                except OSError:  # the server answered and closed: read what it sent
                    break
                sent += 1
                with suppress(TimeoutError):
                    answer = sock.recv(65536)
            sock.settimeout(10)
            assert answer, "the whole body went in without an answer"
            status, headers, _ = read_response(sock, answer)
            assert status == 408
            assert headers["connection"] == "close"
            assert closed_by_server(sock)
        assert sent < 100
        assert upstream.keys_seen() == []


# ------------------------------------------------------------------ 7. framing


def test_content_length_with_transfer_encoding_is_refused_and_the_connection_closed() -> None:
    with proxy({"ok1": Ok()}, tokens=(TOKEN,)) as (url, upstream):
        with connect(url) as sock:
            sock.sendall(
                head(
                    "POST",
                    "/v1/chat/completions",
                    f"Authorization: Bearer {TOKEN}",
                    "Content-Length: 5",
                    "Transfer-Encoding: chunked",
                )
                + b"2\r\n{}\r\n0\r\n\r\n"
                + head("GET", "/v1/generation?id=gen-1", f"Authorization: Bearer {TOKEN}")
            )  # smuggled: a request the proxy would forward
            status, headers, _ = read_response(sock)
            assert status == 400
            assert headers["connection"] == "close"
            assert closed_by_server(sock)
        # Nothing reached the upstream but the catalog fetch at start (no key).
        assert [(e.path, e.key) for e in upstream.log if e.path != "/models"] == []


# ------------------------------------------------------------------ 8. paths


def test_encoded_slashes_are_refused_and_account_endpoints_are_not_forwarded() -> None:
    with proxy({"ok1": Ok(), "ok2": Ok()}) as (url, upstream):
        for target in ("/v1/..%2fkey", "/v1/%2e%2e%2fkey", "/v1/chat%2Fcompletions"):
            status, _, body = raw_exchange(url, head("GET", target, "Connection: close"))
            assert status == 400, target
            assert json.loads(body)["error"]["type"] == "invalid_request_error"
        key_calls = len(upstream.keys_seen("/key"))
        reply = httpx.get(f"{url}/v1/key", timeout=10)
        assert reply.status_code == 200
        assert "keyrotor" in reply.json()["data"]["label"]
        assert len(upstream.keys_seen("/key")) == key_calls
        for method, path in (("GET", "/v1/credits"), ("GET", "/v1/keys"), ("POST", "/v1/keys")):
            refused = httpx.request(method, f"{url}{path}", json={}, timeout=10)
            assert refused.status_code == 403, (method, path)
        assert not {"/credits", "/keys"} & {entry.path for entry in list(upstream.log)}
        # Disguised: other letters percent-encoded, or upper case (an upstream that
        # decodes or folds them would route to the account endpoints).
        seen = len(upstream.log)
        for target in ("/v1/%6Bey", "/v1/%6beys", "/v1/%63redits", "/v1/%61uth/key", "/v1/KEY"):
            status, _, _ = raw_exchange(url, head("POST", target, "Connection: close"))
            assert status == 403, target
        assert len(upstream.log) == seen  # none of them reached the upstream


# ------------------------------------------------------------------ 9. pins and sessions


def test_pins_say_whether_they_were_honoured_and_an_unknown_one_may_be_refused() -> None:
    with proxy({"ok1": Ok(), "ok2": Ok(), "ok3": Ok()}) as (url, _):
        strict = chat(url, {"x-keyrotor-key": "nosuch", "x-keyrotor-fallback": "false"})
        assert strict.status_code == 400
        assert strict.json()["error"]["type"] == "invalid_request_error"
        assert "nosuch" in strict.json()["error"]["message"]
        loose = chat(url, {"x-keyrotor-key": "nosuch"})
        assert loose.status_code == 200
        assert loose.headers["x-keyrotor-pin"] == "fallback: unknown key"
        honoured = chat(url, {"x-keyrotor-key": "ok2"})
        assert honoured.status_code == 200
        assert honoured.headers["x-keyrotor-key"] == "ok2"
        assert honoured.headers["x-keyrotor-pin"] == "honoured"
        unclear = chat(url, {"x-keyrotor-key": "ok2", "x-keyrotor-fallback": "maybe"})
        assert unclear.status_code == 400
        assert unclear.json()["error"]["type"] == "invalid_request_error"


def test_a_session_stays_on_one_key_under_round_robin() -> None:
    with proxy({"ok1": Ok(), "ok2": Ok(), "ok3": Ok()}) as (url, _):
        in_s1 = {"x-keyrotor-session": "s1"}
        session = {chat(url, in_s1).headers["x-keyrotor-key"] for _ in range(6)}
        plain = {chat(url).headers["x-keyrotor-key"] for _ in range(6)}
    assert len(session) == 1
    assert len(plain) >= 2


# ------------------------------------------------------------------ 10. /healthz


def test_healthz_counts_the_usable_keys() -> None:
    with proxy({"ok1": Ok(), "bad": Invalid(), "ok2": Ok()}) as (url, _):
        assert all(chat(url).status_code == 200 for _ in range(3))
        assert keys_by_alias(url)["bad"]["state"] == "failed"
        health = httpx.get(f"{url}/healthz", timeout=10).json()
    assert health["ok"] is True
    assert type(health["usable_keys"]) is int
    assert health["usable_keys"] == 2
