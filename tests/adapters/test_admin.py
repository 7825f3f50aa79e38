"""The admin API and access control, in process: keys added, listed, marked,
probed and removed while traffic flows; tokens checked; no secret ever returned."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from keyrotor.adapters.config import ProxyConfig
from keyrotor.adapters.proxy.auth import Auth, Role
from keyrotor.adapters.proxy.types import Request
from keyrotor.core import KeySpec, PoolConfig
from keyrotor.testing import Credits, FakeUpstream, Ok, Scenario

from .proxy_thread import ProxyThread as Proxy

# The fake secrets end in letters no number can hold (no digit, no e/E, not
# even a hex digit): a tail of one found in an answer is a leak, never a float
# such as a successRate of 1/3 = 0.3333333333333333, a cost or a hex request id.
ADMIN = "admin-token-" + "qz" * 12
CLIENT = "client-token-" + "wy" * 12
SECRETS = {
    "one": "sk-or-v1-admin-one-" + "jk" * 12,
    "two": "sk-or-v1-admin-two-" + "mn" * 12,
}
NEW = "sk-or-v1-admin-new-" + "pr" * 12  # added at runtime
POOR = "sk-or-v1-admin-poor-" + "st" * 12  # added at runtime, no credits
ALL_SECRETS = (*SECRETS.values(), NEW, POOR, ADMIN, CLIENT)
NUMBER_CHARACTERS = set("0123456789.+-abcdefABCDEF")
assert all(not set(secret[-12:]) & NUMBER_CHARACTERS for secret in ALL_SECRETS)
MODEL = "openai/gpt-4o-mini"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def scenario() -> Scenario:
    sc = Scenario()
    for alias, secret in SECRETS.items():
        sc.add(secret, Ok(), alias=alias)
    sc.add(NEW, Ok(), alias="new")
    sc.add(POOR, Credits(0.0), alias="poor")
    return sc


def make_config(upstream: str, **options: Any) -> ProxyConfig:
    return ProxyConfig(
        keys=dict(SECRETS),
        pool=PoolConfig(keys=[KeySpec(key_id=alias) for alias in SECRETS]),
        upstream=upstream,
        server={"host": "127.0.0.1", "port": 0},
        **options,
    )


@pytest.fixture
def proxy() -> Iterator[tuple[str, FakeUpstream, list[dict[str, Any]]]]:
    log: list[dict[str, Any]] = []
    with FakeUpstream.running_in_thread(scenario()) as upstream:
        config = make_config(upstream.url, admin_token=ADMIN, client_tokens=(CLIENT,))
        with Proxy(config, log) as url:
            yield url, upstream, log


def admin(token: str = ADMIN) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def assert_no_secret(text: str) -> None:
    for secret in ALL_SECRETS:
        assert secret not in text
        assert secret[-12:] not in text  # not even a long tail of one


def eventually(check: Callable[[], bool], what: str) -> None:
    """Wait until ``check()`` holds; the 30 s are a hang guard, not a bound."""
    for _ in range(3000):
        if check():
            return
        pause(0.01)
    raise AssertionError(f"never happened: {what}")


def in_flight(status: Callable[[], httpx.Response], alias: str) -> int:
    """The key's requests in flight as ``/status`` lists them (a removed key
    stays listed, removing, while its requests finish; then 0)."""
    keys = status().json()["keys"]
    return next((int(key["in_flight"]) for key in keys if key["alias"] == alias), 0)


def test_keys_are_added_listed_marked_probed_and_removed_while_traffic_flows(
    proxy: Any,
) -> None:
    url, upstream, log = proxy
    seen: list[str] = []  # every body and header the proxy answered
    stop = threading.Event()
    served: list[str] = []
    errors: list[Any] = []

    def traffic() -> None:
        with httpx.Client(base_url=url, headers=admin(CLIENT), timeout=10) as http:
            while not stop.is_set():
                reply = http.post("/v1/chat/completions", json=CHAT)
                if reply.status_code == 200:
                    served.append(reply.headers["x-keyrotor-key"])
                else:
                    errors.append((reply.status_code, reply.text))

    def more_served(n: int) -> None:
        """Wait until the traffic thread has been answered ``n`` more times."""
        mark = len(served)
        eventually(lambda: len(served) >= mark + n or bool(errors), f"{n} more served")

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        with httpx.Client(base_url=url, headers=admin(), timeout=10) as http:

            def call(method: str, path: str, **kw: Any) -> httpx.Response:
                reply = http.request(method, path, **kw)
                seen.append(reply.text + json.dumps(dict(reply.headers)))
                return reply

            def get_status() -> httpx.Response:
                return call("GET", "/status")  # its answers are checked for secrets too

            listed = call("GET", "/admin/keys").json()["keys"]
            assert [(k["alias"], k["state"], k["source"]) for k in listed] == [
                ("one", "healthy", "config"),
                ("two", "healthy", "config"),
            ]
            added = call("POST", "/admin/keys", json={"key": NEW, "alias": "new", "weight": 2})
            assert added.status_code == 201, added.text
            body = added.json()
            assert (body["alias"], body["state"], body["source"]) == ("new", "healthy", "api")
            assert body["options"] == {"weight": 2.0} and body["stored"] is False
            # Without an alias: a stable name derived from (not showing) the key.
            poor = call("POST", "/admin/keys", json={"key": POOR, "max_in_flight": 2})
            assert poor.status_code == 201 and poor.json()["alias"].startswith("key-")
            poor_alias = poor.json()["alias"]
            eventually(  # the new keys take traffic at once
                lambda: "new" in served and upstream.stats("poor").requests > 0,
                "the new keys took traffic",
            )
            # The key without credits answered 402 and was set aside, invisibly.
            eventually(
                lambda: call("GET", f"/admin/keys/{poor_alias}").json()["state"] == "depleted",
                "the key without credits was set aside",
            )

            # Duplicates are refused, naming the alias, never the key.
            again = call("POST", "/admin/keys", json={"key": NEW, "alias": "other"})
            assert again.status_code == 409 and "'new'" in again.text
            assert call("POST", "/admin/keys", json={"key": "x y"}).status_code == 400
            assert call("POST", "/admin/keys", json={"key": 5}).status_code == 400
            assert call("POST", "/admin/keys", content=b"[1]").status_code == 400
            deep = call("POST", "/admin/keys", content=b"[" * 50_000 + b"]" * 50_000)
            assert deep.status_code == 400 and "must be a JSON object" in deep.text
            assert call("POST", "/admin/keys", json={"key": NEW, "weight": -1}).status_code == 400
            assert call("POST", "/admin/keys", json={"key": NEW, "alias": "a b"}).status_code == 400
            bad = call("POST", "/admin/keys", json={"key": NEW[:-1] + "9", "wieght": 1})
            assert bad.status_code == 400 and "wieght" in bad.text

            marked = call("POST", "/admin/keys/one/state", json={"state": "disabled"})
            assert marked.status_code == 200 and marked.json()["state"] == "disabled"
            # Requests sent to it before may still be on their way to the upstream:
            # count from when none is left in flight, then let 20 more be served.
            eventually(lambda: in_flight(get_status, "one") == 0, "one's requests ended")
            before = upstream.stats("one").requests
            more_served(20)
            assert upstream.stats("one").requests == before  # no new traffic
            cooling = call(
                "POST", "/admin/keys/two/state", json={"state": "rate_limited", "duration": 60}
            ).json()
            assert cooling["state"] == "rate_limited" and 59 < cooling["until_in"] <= 60
            enabled = call("POST", "/admin/keys/one/state", json={"state": "enabled"})
            assert enabled.json()["state"] == "healthy"
            assert call("POST", "/admin/keys/one/state", json={"state": "x"}).status_code == 400
            needs = call("POST", "/admin/keys/two/state", json={"state": "degraded"})
            assert needs.status_code == 400 and "duration" in needs.text

            probes_before = upstream.stats("poor").probes
            probing = call("POST", "/admin/probe", json={})
            assert probing.status_code == 202
            assert set(probing.json()["probing"]) == {"one", "two", "new", poor_alias}
            eventually(lambda: upstream.stats("poor").probes > probes_before, "a probe of poor")
            one = call("POST", "/admin/probe", json={"alias": "one"})
            assert one.status_code == 202 and one.json()["probing"] == ["one"]
            assert call("POST", "/admin/probe", json={"alias": "zz"}).status_code == 404

            removed = call("DELETE", "/admin/keys/new")
            assert removed.status_code == 200
            assert removed.json()["removed"] is True
            assert removed.json()["returns_at_restart"] is False
            eventually(lambda: in_flight(get_status, "new") == 0, "new's requests ended")
            count = upstream.stats("new").requests
            more_served(20)
            assert upstream.stats("new").requests == count  # nothing new on it
            assert call("DELETE", "/admin/keys/new").status_code == 404
            gone = call("GET", "/admin/keys/new")
            assert gone.status_code == 404
            error = gone.json()["error"]  # OpenAI's shape, as every error the proxy makes
            assert (error["type"], error["code"]) == ("invalid_request_error", 404)
            listed = call("GET", "/admin/keys").json()["keys"]
            assert [k["alias"] for k in listed] == ["one", "two", poor_alias]
            assert call("PUT", "/admin/keys").status_code == 405
            assert call("GET", "/admin/nothing").status_code == 404
            status = call("GET", "/status")
            assert status.status_code == 200
    finally:
        stop.set()
        worker.join(timeout=10)
    assert served and not errors  # every caller served, through every change
    for text in seen + [json.dumps(record) for record in log]:
        assert_no_secret(text)
    actions = [r["action"] for r in log if r.get("event") == "admin"]
    assert actions == ["add", "add", "mark", "mark", "mark", "probe", "probe", "remove"]


def pause(seconds: float) -> None:
    threading.Event().wait(seconds)


@pytest.mark.parametrize(
    ("path", "method"),
    [("/admin/keys", "GET"), ("/admin/keys", "POST"), ("/admin/probe", "POST")],
)
def test_admin_endpoints_refuse_missing_wrong_and_client_tokens(
    proxy: Any, path: str, method: str
) -> None:
    url, _, _ = proxy
    with httpx.Client(base_url=url, timeout=10) as http:
        missing = http.request(method, path, json={"key": NEW})
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = http.request(method, path, json={"key": NEW}, headers=admin(ADMIN[:-1] + "x"))
        assert wrong.status_code == 401
        as_client = http.request(method, path, json={"key": NEW}, headers=admin(CLIENT))
        assert as_client.status_code == 403
        basic = http.request(method, path, headers={"authorization": f"Basic {ADMIN}"})
        assert basic.status_code == 401
        listed = http.get("/admin/keys", headers=admin()).json()["keys"]
        assert [k["alias"] for k in listed] == ["one", "two"]  # nothing was added


def test_clients_need_a_token_and_may_exchange_it_for_a_short_lived_one(proxy: Any) -> None:
    url, _, _ = proxy
    refused = openai.OpenAI(base_url=f"{url}/v1", api_key="not-a-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        refused.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    refused.close()
    good = openai.OpenAI(base_url=f"{url}/v1", api_key=CLIENT, max_retries=0)
    reply = good.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    good.close()
    assert reply.choices[0].message.content
    with httpx.Client(base_url=url, timeout=10) as http:
        assert http.get("/status").status_code == 401
        assert http.get("/metrics").status_code == 401
        assert http.get("/healthz").status_code == 200
        assert http.get("/status", headers=admin(CLIENT)).status_code == 200
        assert http.post("/auth/token").status_code == 401
        issued = http.post("/auth/token", headers=admin(CLIENT)).json()
        assert issued["token_type"] == "bearer" and issued["expires_in"] == 3600.0
        token = issued["access_token"]
        assert token.startswith("krt_") and token != CLIENT
    short = openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0)
    assert short.chat.completions.create(**CHAT).choices  # type: ignore[call-overload]
    short.close()
    with httpx.Client(base_url=url, timeout=10) as http:
        # A short-lived token cannot renew itself, nor reach the admin API.
        assert http.post("/auth/token", headers=admin(token)).status_code == 403
        assert http.get("/admin/keys", headers=admin(token)).status_code == 403
        # A pool key must not reach other upstream paths.
        for path in ("/v1/%2e%2e/key", "/v1//key", "/v1/a/%2E/b", "/v1/a\\..\\key"):
            assert http.get(path, headers=admin(CLIENT)).status_code == 400, path
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:  # no client normalizing
        raw.sendall(
            f"GET /v1/../../key HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        assert raw.recv(100).startswith(b"HTTP/1.1 400 ")


def test_the_admin_api_is_off_without_an_admin_token_and_v1_open_without_client_tokens() -> None:
    with FakeUpstream.running_in_thread(scenario()) as upstream:
        log: list[dict[str, Any]] = []
        with Proxy(make_config(upstream.url), log) as url, httpx.Client(base_url=url) as http:
            off = http.get("/admin/keys", headers=admin())
            assert off.status_code == 403 and "KEYROTOR_ADMIN_TOKEN" in off.text
            assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
            assert http.get("/status").status_code == 200
            assert http.post("/auth/token").status_code == 404
    warnings = [r["message"] for r in log if r.get("event") == "warning"]
    assert any("no client tokens" in w for w in warnings)


def test_an_empty_pool_with_an_admin_token_starts_and_takes_keys() -> None:
    with FakeUpstream.running_in_thread(scenario()) as upstream:
        config = ProxyConfig(
            keys={},
            pool=PoolConfig(keys=[]),
            upstream=upstream.url,
            server={"host": "127.0.0.1", "port": 0},
            admin_token=ADMIN,
        )
        log: list[dict[str, Any]] = []
        with Proxy(config, log) as url, httpx.Client(base_url=url) as http:
            empty = http.post("/v1/chat/completions", json=CHAT)
            assert empty.status_code == 503 and empty.json()["error"]["message"]
            added = http.post("/admin/keys", json={"key": NEW, "alias": "new"}, headers=admin())
            assert added.status_code == 201
            reply = http.post("/v1/chat/completions", json=CHAT)
            assert reply.status_code == 200 and reply.headers["x-keyrotor-key"] == "new"
    assert any("no keys yet" in r.get("message", "") for r in log)


def test_tokens_compare_in_constant_time_and_issued_ones_expire() -> None:
    now = [0.0]
    auth = Auth([CLIENT], ADMIN, ttl=10.0, clock=lambda: now[0])

    def role(value: str | None) -> Role:
        headers = [] if value is None else [("authorization", value)]
        return auth.role(Request(method="GET", target="/", headers=headers, body=b""))

    assert role(f"Bearer {ADMIN}") is Role.ADMIN
    assert role(f"bearer  {CLIENT} ") is Role.CLIENT
    assert role(f"Bearer {CLIENT[:-1]}") is Role.NONE
    assert role(None) is Role.NONE and role("Bearer") is Role.NONE
    token, ttl = auth.issue()
    assert ttl == 10.0 and role(f"Bearer {token}") is Role.ISSUED
    now[0] = 10.5
    assert role(f"Bearer {token}") is Role.NONE  # expired, and forgotten
    assert not Auth().admin_enabled and Auth().open and not auth.open


@pytest.mark.parametrize("flush_in", ["loop", "thread"])
def test_a_failing_state_file_is_reported_and_the_proxy_keeps_serving(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, flush_in: str
) -> None:
    import sqlite3

    from keyrotor.adapters.proxy.runtime import open_store

    writers: set[str] = set()

    def broken(*args: Any) -> None:
        writers.add(threading.current_thread().name)
        raise sqlite3.OperationalError("database or disk is full")

    log: list[dict[str, Any]] = []
    with FakeUpstream.running_in_thread(scenario()) as upstream:
        config = make_config(
            upstream.url,
            state_path=str(tmp_path / "state.db"),
            state_flush=0.05,
            state_flush_in=flush_in,
        )
        store = open_store(config, log.append)
        assert store is not None
        monkeypatch.setattr(store, "_write_batch", broken)
        with Proxy(config, log, store) as url, httpx.Client(base_url=url) as http:
            for _ in range(5):
                assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
            eventually(  # the next flush fails (then every one after it)
                lambda: http.get("/status").json()["storage"]["ok"] is False, "a failed flush"
            )
            failed = http.get("/status").json()["storage"]["failed_writes"]
            eventually(  # a few more, all failing (and logged once, below)
                lambda: http.get("/status").json()["storage"]["failed_writes"] >= failed + 3,
                "three more failed flushes",
            )
            storage = http.get("/status").json()["storage"]
            assert storage["ok"] is False and "disk is full" in storage["last_error"]
            assert storage["pending"] > 0  # kept in memory for the next try
            assert http.get("/status").json()["stats"]["totalCostToday"] > 0
            monkeypatch.undo()  # the disk has room again
            eventually(lambda: http.get("/status").json()["storage"]["ok"] is True, "a flush")
    logged = [r["message"] for r in log if r.get("event") == "storage"]
    assert len([m for m in logged if "disk is full" in m]) == 1  # once, not per flush
    # By default the proxy's event loop flushes (no writer thread contending for
    # the GIL); with flush_in = "thread", the store's own thread does.
    if flush_in == "loop":
        assert writers and "keyrotor-storage" not in writers and not store.flush_in_thread
    else:
        assert writers == {"keyrotor-storage"} and store.flush_in_thread


# --------------------------------------------------------------- a review's findings

BIG = "1" + "0" * 400  # a JSON integer no float holds


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/admin/keys", '{"key": "@NEW", "provider": ["main"]}'),
        ("POST", "/admin/keys", '{"key": "@NEW", "rpm": @BIG}'),
        ("POST", "/admin/keys", '{"key": "@NEW", "account": "\\ud800"}'),
        ("POST", "/admin/keys/one/state", '{"state": "rate_limited", "duration": @BIG}'),
        ("POST", "/admin/keys/one/state", '{"state": "rate_limited", "duration": 1e300}'),
        ("PUT", "/admin/alerts/a", '{"kind": "spend", "threshold": @BIG}'),
        ("PUT", "/admin/alerts/b", '{"kind": "key_failed", "threshold": 1e999}'),
        ("PUT", "/admin/alerts/c", '{"kind": "error_share", "threshold": 0.5, "window": @BIG}'),
    ],
)
def test_bad_admin_input_gets_one_clear_400(
    proxy: tuple[str, FakeUpstream, list[dict[str, Any]]], method: str, path: str, body: str
) -> None:
    url, _, log = proxy
    content = body.replace("@NEW", NEW).replace("@BIG", BIG).encode()
    answer = httpx.request(method, url + path, headers=admin(), content=content)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["message"]
    assert not [line for line in log if line.get("event") == "app_error"]
    assert "Infinity" not in httpx.get(url + "/alerts", headers=admin()).text


@pytest.mark.parametrize("alias", [NEW, SECRETS["one"], CLIENT, ADMIN])
def test_an_alias_that_is_a_secret_or_a_token_is_refused(
    proxy: tuple[str, FakeUpstream, list[dict[str, Any]]], alias: str
) -> None:
    """An alias is shown to every client token (/status, /metrics, the log)."""
    url, _, log = proxy
    answer = httpx.post(url + "/admin/keys", headers=admin(), json={"key": NEW, "alias": alias})
    assert answer.status_code == 400 and "reveals nothing" in answer.text
    assert_no_secret(answer.text + json.dumps(log))
    assert_no_secret(httpx.get(url + "/status", headers=admin(CLIENT)).text)


def test_status_shows_a_client_its_own_spend_not_the_others(
    proxy: tuple[str, FakeUpstream, list[dict[str, Any]]],
) -> None:
    url, _, _ = proxy
    for token in (CLIENT, ADMIN):  # two callers: the admin's spend goes under "admin"
        with openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0) as sdk:
            sdk.chat.completions.create(model=MODEL, messages=CHAT["messages"])  # type: ignore[arg-type]
    issued = httpx.post(url + "/auth/token", headers=admin(CLIENT)).json()["access_token"]
    as_admin = httpx.get(url + "/status", headers=admin()).json()["spend"]["clients"]
    as_client = httpx.get(url + "/status", headers=admin(CLIENT)).json()["spend"]["clients"]
    as_issued = httpx.get(url + "/status", headers=admin(issued)).json()["spend"]["clients"]
    assert len(as_admin) == 2 and "admin" in as_admin
    assert len(as_client) == 1 and "admin" not in as_client  # its own row only
    assert as_issued == as_client  # (an issued token spends under its issuer)


def test_a_refused_add_leaves_the_state_file_as_it_was(tmp_path: Any) -> None:
    # The alias was bound to the new secret (its state and spend moved to
    # "one~xxxxxxxx") before the file refused the key: a 409 that changed the
    # file, and at the next start "one" came back enabled with no spend.
    import sqlite3

    log: list[dict[str, Any]] = []
    with FakeUpstream.running_in_thread(scenario()) as upstream:
        config = make_config(
            upstream.url, admin_token=ADMIN, state_path=str(tmp_path / "s.db"), state_flush=0.05
        )
        with Proxy(config, log) as url, httpx.Client(base_url=url, headers=admin()) as http:
            for _ in range(4):
                assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
            state = http.post("/admin/keys/one/state", json={"state": "disabled"})
            assert state.status_code == 200
            assert http.delete("/admin/keys/one").status_code == 200
            refused = http.post("/admin/keys", json={"key": NEW, "alias": "one"})
            assert refused.status_code == 409  # no KEYROTOR_SECRET_KEY: nothing stored
    db = sqlite3.connect(tmp_path / "s.db")
    try:
        aliases = {row[0] for row in db.execute("SELECT alias FROM ledger")}
        states = dict(db.execute("SELECT alias, state FROM states").fetchall())
    finally:
        db.close()
    assert "one" in aliases and not any(alias.startswith("one~") for alias in aliases)
    assert states.get("one") == "disabled"


def test_a_stored_key_the_start_skipped_can_be_removed(tmp_path: Any) -> None:
    # A stored key whose [[providers]] entry is gone is in no pool: DELETE was a
    # 404 and POST with its alias a 409 "remove it first" (only forget-keys,
    # which deletes every stored key, got it out).
    import sqlite3

    from cryptography.fernet import Fernet

    from keyrotor.adapters.config import load_config

    env = {
        "KEYROTOR_SECRET_KEY": Fernet.generate_key().decode(),
        "K_ONE": SECRETS["one"],
        "K_TWO": SECRETS["two"],
    }
    with FakeUpstream.running_in_thread(scenario()) as upstream:
        base = (
            f'upstream = "{upstream.url}"\n[state]\npath = "{tmp_path / "s.db"}"\n'
            f'[auth]\nadmin_token = "{ADMIN}"\n[[keys]]\nalias = "one"\nsecret_env = "K_ONE"\n'
        )
        provider = (
            f'[[providers]]\nname = "p2"\nupstream = "{upstream.url}"\nmodels = ["p2/m"]\n'
            '[[keys]]\nalias = "two"\nprovider = "p2"\nsecret_env = "K_TWO"\n'
        )
        (tmp_path / "with.toml").write_text(base + provider)
        (tmp_path / "without.toml").write_text(base)
        config = load_config(tmp_path / "with.toml", env, {"port": 0})
        with Proxy(config, []) as url, httpx.Client(base_url=url, headers=admin()) as http:
            added = http.post("/admin/keys", json={"key": NEW, "alias": "new", "provider": "p2"})
            assert added.status_code == 201 and added.json()["stored"] is True
        config = load_config(tmp_path / "without.toml", env, {"port": 0})
        with Proxy(config, []) as url, httpx.Client(base_url=url, headers=admin()) as http:
            removed = http.delete("/admin/keys/new")
            assert removed.status_code == 200 and removed.json()["unstored"] is True
            assert http.delete("/admin/keys/new").status_code == 404  # gone now
            again = http.post("/admin/keys", json={"key": NEW, "alias": "new"})
            assert again.status_code == 201, again.text
    db = sqlite3.connect(tmp_path / "s.db")
    try:
        stored = [row[0] for row in db.execute("SELECT alias FROM keys")]
    finally:
        db.close()
    assert stored == ["new"]  # stored again, for the main pool
