"""Routing through the proxy: routes, model fallback, free-tier pacing, the decision on record.

Real processes' worth of parts: the proxy on its own trio loop, the fake
upstream (OpenRouter's catalog, its model failures and its per-account free
limits) over loopback, and the official openai SDK as the client.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from keyrotor.adapters.config import load_config
from keyrotor.testing import Chain, Custom, FakeUpstream, FreeModelLimits, Ok, Reply, Scenario
from keyrotor.testing.catalogs import realistic_models

from .proxy_thread import ProxyThread

HI = [{"role": "user", "content": "hi"}]
KEYS = {  # alias -> (account, secret)
    "a1": ("team", "sk-or-v1-routing-a1-jkjkjkjkjkjkjkjkjk"),
    "a2": ("team", "sk-or-v1-routing-a2-jkjkjkjkjkjkjkjkjk"),
    "b1": ("solo", "sk-or-v1-routing-b1-jkjkjkjkjkjkjkjkjk"),
}
PAID = "openai/gpt-4o-mini"


SENT: list[dict[str, Any]] = []
"""The request bodies the fake upstream got, in order (reset per test)."""


@pytest.fixture(autouse=True)
def _sent() -> None:
    SENT.clear()


def model_failures(down: dict[str, Reply]) -> Custom:
    """Answers ``down[model]`` for the models listed, lets the others through;
    notes every body in ``SENT``."""

    def decide(call: Any) -> Reply | None:
        SENT.append(dict(call.body))
        return down.get(call.model)

    return Custom(decide)


def sent_models() -> list[str]:
    return [body["model"] for body in SENT]


def scenario(
    down: dict[str, Reply] | None = None, limits: dict[str, FreeModelLimits] | None = None
) -> Scenario:
    """Three keys of two accounts, each account with OpenRouter's free limits
    (``limits`` per account; 1000 a day by default)."""
    limits = limits or free_limits(per_day=1000)
    fake = Scenario(models=realistic_models())
    for alias, (account, secret) in KEYS.items():
        fake.add(secret, Chain(model_failures(down or {}), limits[account]), alias=alias)
    return fake


def free_limits(per_day: int = 50, per_minute: int = 20) -> dict[str, FreeModelLimits]:
    return {account: FreeModelLimits(per_minute, per_day) for account, _ in KEYS.values()}


def write_config(
    tmp_path: Path, url: str, extra: str = "", state: bool = False, top: str = ""
) -> Any:
    keys = "".join(
        f'[[keys]]\nalias = "{alias}"\nsecret_env = "KEY_{alias.upper()}"\naccount = "{account}"\n'
        for alias, (account, _) in KEYS.items()
    )
    stored = f'path = "{tmp_path}/state.db"' if state else "enabled = false"
    path = tmp_path / "keyrotor.toml"
    path.write_text(f'upstream = "{url}"\n{top}\n[state]\n{stored}\n{extra}\n{keys}')
    environ = {f"KEY_{alias.upper()}": secret for alias, (_, secret) in KEYS.items()}
    return load_config(path, environ, {"port": 0})


@pytest.fixture
def sdk_for() -> Iterator[Any]:
    clients: list[openai.OpenAI] = []

    def make(url: str) -> openai.OpenAI:
        clients.append(openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


def recommend(url: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = httpx.post(f"{url}/routing/recommend", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def test_the_free_route_serves_through_models_that_are_down_with_no_error_reaching_the_client(
    tmp_path: Path, sdk_for: Any
) -> None:
    with FakeUpstream.running_in_thread(scenario()) as server:
        log: list[dict[str, Any]] = []
        config = write_config(tmp_path, server.url, "[pool]\nmax_attempts = 3")
        with ProxyThread(config, log) as url:
            order = recommend(url, {"model": "free", "messages": HI})
            ranked = [order["model"], *order["fallbacks"]]
            # The first two in the route's order are down, one more further on.
            down = {
                ranked[0]: Reply(503, f"No instances available for {ranked[0]}."),
                ranked[1]: Reply(404, f"No endpoints found for {ranked[1]}."),
                ranked[5]: Reply(
                    429,
                    "Provider returned error",
                    {"limit_source": "upstream_provider_shared_pool", "raw": "busy"},
                ),
            }
            server.scenario = scenario(down)
            sdk = sdk_for(url)
            served = []
            for _ in range(30):
                raw = sdk.chat.completions.with_raw_response.create(model="free", messages=HI)  # type: ignore[arg-type]
                assert raw.http_response.status_code == 200
                assert raw.headers["x-keyrotor-route"] == "free"
                served.append(raw.headers["x-keyrotor-model"])
            status = httpx.get(f"{url}/status").json()
    assert not set(served) & set(down)
    assert set(served) <= set(ranked)
    first = next(e for e in log if e.get("route") == "free")
    assert first["model"] == ranked[2] and len(first["tried"]) == 2
    cooling = status["routing"]["cooling"]
    assert {ranked[0], ranked[1]} <= set(cooling)
    # A model that could not serve gave its free slot back: 30 served, 30 counted.
    assert sum(a["usedToday"] for a in status["routing"]["freeTier"].values()) == 30
    assert "answered 503 (unavailable)" in cooling[ranked[0]]["why"]
    assert {k["alias"]: k["state"] for k in status["keys"]} == dict.fromkeys(KEYS, "healthy")
    sent = sent_models()
    assert sent.count(ranked[0]) == 1 and sent.count(ranked[1]) == 1  # cooled after one answer


def test_a_stream_that_fails_before_its_first_byte_moves_to_the_next_model(
    tmp_path: Path, sdk_for: Any
) -> None:
    first, second = "qwen/qwen3-large:free", "openai/o3-8b:free"
    route = f'[[routes]]\nname = "pair"\ncandidates = ["{first}", "{second}"]\n'
    down = {first: Reply(503, f"No instances available for {first}.")}
    with FakeUpstream.running_in_thread(scenario(down)) as server:
        with ProxyThread(write_config(tmp_path, server.url, route), []) as url:
            sdk = sdk_for(url)
            with sdk.chat.completions.with_streaming_response.create(
                model="pair",
                messages=HI,
                stream=True,  # type: ignore[arg-type]
            ) as response:
                model = response.headers["x-keyrotor-model"]
                chunks = list(response.parse())
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert model == second and text
    assert chunks[0].model == second


def test_the_decision_headers_and_recommend_agree_with_what_was_done(tmp_path: Path) -> None:
    route = (
        '[[routes]]\nname = "cheap-tools"\nstrategy = "cheapest"\n'
        'candidates = [{ max_price = 5.0, parameters = ["tools"] }]\n'
    )
    body = {
        "model": "cheap-tools",
        "messages": HI,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    }
    with FakeUpstream.running_in_thread(scenario()) as server:
        with ProxyThread(write_config(tmp_path, server.url, route), []) as url:
            decision = recommend(url, body)
            sent_before = len(SENT)
            answer = httpx.post(f"{url}/v1/chat/completions", json=body)
            routes = httpx.get(f"{url}/routing/routes").json()
    assert len(SENT) == sent_before + 1  # recommend sent nothing
    assert answer.status_code == 200
    assert answer.headers["x-keyrotor-model"] == decision["model"] != "cheap-tools"
    assert answer.headers["x-keyrotor-route"] == "cheap-tools"
    assert answer.json()["model"] == decision["model"]
    chosen = next(m for m in realistic_models() if m.id == decision["model"])
    assert "tools" in chosen.to_json()["supported_parameters"]
    assert decision["estimated_cost"] == 0.0 and chosen.id.endswith(":free")  # cheapest: free
    assert decision["confidence"] == 0.5  # price known, latency not yet
    listed = {r["name"]: r for r in routes["routes"]}
    assert set(listed) == {"free", "cheap-tools"}
    assert decision["model"] in [c["model"] for c in listed["cheap-tools"]["live"]]


def test_free_requests_are_paced_per_account_and_never_meet_the_limit(
    tmp_path: Path, sdk_for: Any
) -> None:
    """Two accounts (team: two keys; solo: one) of 4 free requests a day each:
    8 are served, never 12, and the upstream never answers a limit."""
    limits = free_limits(per_day=4)
    fake = scenario(limits=limits)
    extra = (
        "[routing]\nfree_per_day = 4\n"
        f'[[routes]]\nname = "free-or-paid"\ncandidates = [{{ free = true }}, "{PAID}"]\n'
    )
    with FakeUpstream.running_in_thread(fake) as server:
        with ProxyThread(write_config(tmp_path, server.url, extra, state=True), []) as url:
            sdk = sdk_for(url)
            served = []
            for _ in range(8):
                raw = sdk.chat.completions.with_raw_response.create(model="free", messages=HI)  # type: ignore[arg-type]
                served.append(raw.headers["x-keyrotor-key"])
            with pytest.raises(
                openai.RateLimitError, match="free quota of every account spent"
            ) as caught:
                sdk.chat.completions.create(model="free", messages=HI)  # type: ignore[arg-type]
            after = caught.value.response.headers
            paid = sdk.chat.completions.with_raw_response.create(model="free-or-paid", messages=HI)  # type: ignore[arg-type]
            plain = httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": "openai/o3-8b:free", "messages": HI},
            )
            status = httpx.get(f"{url}/status").json()["routing"]["freeTier"]
        # A restart remembers the day's use.
        with ProxyThread(write_config(tmp_path, server.url, extra, state=True), []) as url:
            again = httpx.post(f"{url}/v1/chat/completions", json={"model": "free", "messages": HI})
    accounts = {alias: account for alias, (account, _) in KEYS.items()}
    assert sorted(accounts[k] for k in served) == ["solo"] * 4 + ["team"] * 4
    assert 1 <= int(after["retry-after"]) <= 86400
    assert paid.headers["x-keyrotor-model"] == PAID  # the route's paid candidate
    assert plain.status_code == 429  # a free model named directly is paced too
    assert status["team"]["usedToday"] == 4 and status["solo"]["usedToday"] == 4
    assert again.status_code == 429
    assert [limit.refused for limit in limits.values()] == [0, 0]
    assert [limit.sent for limit in limits.values()] == [4, 4]


def test_the_per_minute_pace_waits_for_a_slot_instead_of_meeting_the_limit(tmp_path: Path) -> None:
    limits = free_limits(per_minute=2)
    fake = scenario(limits=limits)
    extra = "[routing]\nfree_per_minute = 2\nfree_wait = 0\n"
    with FakeUpstream.running_in_thread(fake) as server:
        with ProxyThread(write_config(tmp_path, server.url, extra), []) as url:
            statuses = [
                httpx.post(
                    f"{url}/v1/chat/completions", json={"model": "free", "messages": HI}
                ).status_code
                for _ in range(6)
            ]
    assert statuses == [200] * 4 + [429] * 2  # two accounts, two a minute each
    assert [limit.refused for limit in limits.values()] == [0, 0]


def test_a_free_request_whose_accounts_have_no_usable_key_gets_the_pools_answer_at_once(
    tmp_path: Path,
) -> None:
    # Every key rests after a 429 on a paid model: the free quota is untouched,
    # yet no account can send. The pool says so (with its Retry-After), at
    # once, instead of the request waiting out free_wait for a quota it has.
    busy = Reply(429, "Rate limit exceeded", headers=(("retry-after", "120"),))
    extra = "[pool]\nmax_attempts = 3\n[routing]\nfree_wait = 3\n"
    free = "qwen/qwen3-large:free"
    with FakeUpstream.running_in_thread(scenario({PAID: busy})) as server:
        with ProxyThread(write_config(tmp_path, server.url, extra), []) as url:
            paid = httpx.post(f"{url}/v1/chat/completions", json={"model": PAID, "messages": HI})
            states = {k["alias"]: k["state"] for k in httpx.get(f"{url}/status").json()["keys"]}
            answer = httpx.post(f"{url}/v1/chat/completions", json={"model": free, "messages": HI})
            used = httpx.get(f"{url}/status").json()["routing"]["freeTier"]
    assert paid.status_code == 429 and set(states.values()) == {"rate_limited"}
    assert answer.status_code == 429, answer.text
    assert "free-model quota" not in answer.text
    assert answer.headers["retry-after"] and float(answer.headers["retry-after"]) > 60
    assert all(account["usedToday"] == 0 for account in used.values())


def test_a_spent_free_quota_holds_also_while_every_key_rests(tmp_path: Path) -> None:
    # No account had a usable key, so the request went to the pool unpinned and
    # was sent once a key came back: past the day's quota.
    busy = Reply(429, "Rate limit exceeded", headers=(("retry-after", "2"),))
    extra = "[pool]\nmax_attempts = 3\n[routing]\nfree_per_day = 1\nfree_wait = 1\n"
    free = "qwen/qwen3-large:free"
    limits = free_limits(per_day=1000)  # only the proxy's count guards the day here
    with FakeUpstream.running_in_thread(scenario({PAID: busy}, limits)) as server:
        with ProxyThread(write_config(tmp_path, server.url, extra), []) as url:

            def post(model: str) -> httpx.Response:
                body = {"model": model, "messages": HI}
                return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)

            assert [post(free).status_code for _ in range(3)] == [200, 200, 429]
            assert post(PAID).status_code == 429  # every key rests now
            answer = post(free)
            used = httpx.get(f"{url}/status").json()["routing"]["freeTier"]
    assert answer.status_code == 429, answer.text
    assert answer.json()["error"]["code"] == "free_quota_exhausted"
    assert all(a["usedToday"] <= a["perDay"] for a in used.values()), used


def test_a_spent_accounts_keys_coming_back_first_do_not_carry_a_free_request(
    tmp_path: Path,
) -> None:
    # One account spent its day, the other has room; every key rests, the spent
    # account's first back: the request went to whichever key came back.
    spent: list[str] = []  # the account the first free request used

    def make(account: str) -> Custom:
        def decide(call: Any) -> Reply | None:
            SENT.append(dict(call.body))
            if call.model == PAID:
                back = "1" if spent and account == spent[0] else "30"
                return Reply(429, "Rate limit exceeded", headers=(("retry-after", back),))
            return None

        return Custom(decide)

    fake = Scenario(models=realistic_models())
    limits = free_limits(per_day=1000)
    for alias, (account, secret) in KEYS.items():
        fake.add(secret, Chain(make(account), limits[account]), alias=alias)
    extra = "[pool]\nmax_attempts = 3\n[routing]\nfree_per_day = 1\nfree_wait = 1\n"
    free = "qwen/qwen3-large:free"
    with FakeUpstream.running_in_thread(fake) as server:
        with ProxyThread(write_config(tmp_path, server.url, extra), []) as url:

            def post(model: str) -> httpx.Response:
                body = {"model": model, "messages": HI}
                return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)

            first = post(free)
            assert first.status_code == 200
            spent.append(KEYS[first.headers["x-keyrotor-key"]][0])
            assert post(PAID).status_code == 429  # every key rests now
            answer = post(free)
            used = httpx.get(f"{url}/status").json()["routing"]["freeTier"]
    assert answer.status_code == 429, answer.text  # the account with room: 30 s away
    assert "rests" in answer.json()["error"]["message"]
    assert all(a["usedToday"] <= a["perDay"] for a in used.values()), used


def test_an_accounts_tier_is_learned_from_get_key_once_free_models_are_asked_for(
    tmp_path: Path,
) -> None:
    """``team`` bought credits (1000 free requests a day), ``solo`` did not: the
    proxy asks ``GET /key`` once per account after the first free request,
    and paces ``team`` at 1000 a day, ``solo`` at the configured 40."""
    limits = {"team": FreeModelLimits(20, 1000), "solo": FreeModelLimits(20, 50)}
    extra = "[routing]\nfree_per_day = 40\n"
    with FakeUpstream.running_in_thread(scenario(limits=limits)) as server:
        with ProxyThread(write_config(tmp_path, server.url, extra), []) as url:
            probes_before = sum(server.stats(alias).probes for alias in KEYS)
            served = httpx.post(
                f"{url}/v1/chat/completions", json={"model": "free", "messages": HI}
            )
            tiers: dict[str, Any] = {}
            for _ in range(600):  # the learning runs in the background: wait for it
                tiers = httpx.get(f"{url}/status").json()["routing"]["freeTier"]
                if tiers.get("team", {}).get("perDay") == 1000:
                    break
                threading.Event().wait(0.05)
            probes = sum(server.stats(alias).probes for alias in KEYS)
    assert served.status_code == 200 and probes_before == 0
    assert tiers["team"]["perDay"] == 1000 and tiers["solo"]["perDay"] == 40
    assert probes == 2  # one GET /key per account, not per key


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"model": "fre", "messages": HI}, 404, "routes close to it: free"),
        (
            {"model": "x/y", "models": "x/y", "messages": HI},
            400,
            "models must be a list of 1 to 16",
        ),
        ({"model": "x/y", "models": [], "messages": HI}, 400, "models must be a list"),
        ({"models": [1, 2], "messages": HI}, 400, "models must be a list"),
        ({"model": "free", "models": ["x/y"], "messages": HI}, 400, "is a route"),
        ({"models": ["x/y"], "route": "cheapest", "messages": HI}, 400, 'route must be "fallback"'),
        ({"models": ["nobody/nothing-at-al"], "messages": HI}, 404, "no model of the models list"),
        (
            {"model": "free", "messages": [{"role": "user", "content": "x" * 8_000_000}]},
            400,
            "the largest context is 1,000,000 (",
        ),
        ({"model": "empty", "messages": HI}, 503, "no model of the catalog matches route 'empty'"),
    ],
)
def test_bad_routed_requests_get_one_clear_error(
    tmp_path: Path, body: dict[str, Any], status: int, message: str
) -> None:
    extra = '[[routes]]\nname = "empty"\ncandidates = [{ min_context = 1000000000 }]\n'
    log: list[dict[str, Any]] = []
    with FakeUpstream.running_in_thread(scenario()) as server:
        with ProxyThread(write_config(tmp_path, server.url, extra), log) as url:
            answer = httpx.post(f"{url}/v1/chat/completions", json=body)
            for _ in range(600 if status == 503 else 0):  # the router looks in the background
                warned = [e["message"] for e in log if "route" in e.get("message", "")]
                if warned:
                    assert warned == [
                        "route 'empty' matches no model of the catalog (320 models): requests "
                        "to it get 503 until one does; check its candidates (GET /routing/routes)"
                    ]
                    break
                threading.Event().wait(0.05)
            else:
                assert status != 503, "no warning of the route that matches nothing"
    assert answer.status_code == status
    error = answer.json()["error"]
    assert message in error["message"]
    assert not SENT  # nothing was sent


def test_a_routed_body_that_is_not_json_or_nested_too_deeply_gets_one_clear_error(
    tmp_path: Path,
) -> None:
    deep = b'{"model": "free", "messages": [], "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    log: list[dict[str, Any]] = []
    with FakeUpstream.running_in_thread(scenario()) as server:
        with ProxyThread(write_config(tmp_path, server.url), log) as url:
            answers = [
                httpx.post(f"{url}/v1/chat/completions", content=body)
                for body in (deep, b'{"model": "free", "messages": [}')
            ]
            plain = deep.replace(b'"free"', f'"{PAID}"'.encode())  # not routed: recommend parses
            recommended = httpx.post(f"{url}/routing/recommend", content=plain)
    assert recommended.status_code == 400
    assert recommended.json()["error"]["message"] == "the request body is not a JSON object"
    assert [a.status_code for a in answers] == [400, 400]
    deep_error, broken_error = (a.json()["error"] for a in answers)
    assert deep_error["message"] == (
        "the request body is not JSON: the JSON document is nested too deeply"
    )
    assert broken_error["message"].startswith("the request body is not JSON: Expecting value")
    assert deep_error["code"] == broken_error["code"] == "invalid_json"
    assert not SENT
    assert not [e for e in log if e.get("event") == "error" or "Traceback" in str(e)]


def test_a_model_that_fails_with_5xx_on_every_key_is_cooled_and_passed_over(
    tmp_path: Path,
) -> None:
    # A 502 provider_unavailable (model down) or 503 provider_overloaded: no
    # rule of the core's names them, yet the model failed on every key tried.
    first, second = "qwen/qwen3-large:free", "openai/o3-8b:free"
    route = f'[[routes]]\nname = "pair"\ncandidates = ["{first}", "{second}"]\n'
    extra = f"[pool]\nmax_attempts = 5\n{route}"
    down = {first: Reply(502, "Provider returned error", {"error_type": "provider_unavailable"})}
    with FakeUpstream.running_in_thread(scenario(down)) as server:
        with ProxyThread(write_config(tmp_path, server.url, extra), []) as url:
            served = []
            for _ in range(5):
                answer = httpx.post(
                    f"{url}/v1/chat/completions", json={"model": "pair", "messages": HI}
                )
                assert answer.status_code == 200, answer.text
                served.append(answer.headers["x-keyrotor-model"])
            cooling = httpx.get(f"{url}/status").json()["routing"]["cooling"]
    assert served == [second] * 5
    assert "answered 502 (fault)" in cooling[first]["why"]
    sent = sent_models()
    # The first request tried the model on 4 of its 5 attempts, keeping one for
    # the fallback; the model then cooled, and no later request sent it.
    assert sent == [first] * 4 + [second] * 5


@contextmanager
def first_catalog_failed(tmp_path: Path) -> Iterator[tuple[FakeUpstream, str]]:
    """The fake upstream and a proxy whose first catalog fetch has failed."""
    failing = scenario()
    failing.models_reply = Reply(500)
    with FakeUpstream.running_in_thread(failing) as server:
        log: list[dict[str, Any]] = []
        with ProxyThread(write_config(tmp_path, server.url), log) as url:
            for _ in range(600):  # until the first fetch has failed
                if any(e.get("event") == "catalog" for e in log):
                    break
                threading.Event().wait(0.05)
            yield server, url


def test_a_mistyped_route_is_told_also_before_the_first_catalog_is_in(tmp_path: Path) -> None:
    # The catalog's first fetch failed: a name like a route's was sent upstream
    # as a model instead of the 404 that names the route.
    with first_catalog_failed(tmp_path) as (server, url):
        server.scenario = scenario()  # the upstream's catalog is back
        answer = httpx.post(f"{url}/v1/chat/completions", json={"model": "fre", "messages": HI})
    assert answer.status_code == 404, answer.text
    assert "routes close to it: free" in answer.json()["error"]["message"]
    assert not SENT


def test_a_name_unlike_any_route_does_not_wait_for_a_missing_catalog(tmp_path: Path) -> None:
    # Every request naming a model without '/' fetched the catalog again (and
    # waited up to 10 s for it) while the upstream's /models failed.
    with first_catalog_failed(tmp_path) as (server, url):
        fetches = server.stats(None).requests
        for _ in range(3):
            answer = httpx.post(
                f"{url}/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI}
            )
            assert answer.status_code == 200, answer.text
        assert server.stats(None).requests == fetches  # no fetch of the catalog per request


def test_a_keys_own_429_on_a_route_with_many_fallbacks_still_fails_over(tmp_path: Path) -> None:
    # Keeping an attempt for each of four fallbacks left the first model one
    # attempt (max_attempts 3): the first key's own 429 reached the caller. The
    # key failed, not the model: the same model again, on another key.
    paid = [m.id for m in realistic_models() if not m.id.endswith(":free")][:5]
    fake = Scenario(models=realistic_models())
    limited = Reply(429, "Rate limit exceeded", headers=(("retry-after", "30"),))
    for alias, (_, secret) in KEYS.items():
        fake.add(secret, limited if alias == "a1" else Ok(), alias=alias)
    names = ", ".join(f'"{m}"' for m in paid)
    extra = f'[pool]\nmax_attempts = 3\n[[routes]]\nname = "chat"\ncandidates = [{names}]\n'
    with FakeUpstream.running_in_thread(fake) as server:
        with ProxyThread(write_config(tmp_path, server.url, extra), []) as url:
            answer = httpx.post(
                f"{url}/v1/chat/completions", json={"model": "chat", "messages": HI}
            )
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-keyrotor-model"] == paid[0]
    assert answer.headers["x-keyrotor-key"] != "a1"
    assert answer.headers["x-keyrotor-fallbacks"] == "1"  # a1's 429, then another key


def test_a_route_whose_first_models_are_down_is_served_by_a_later_one(tmp_path: Path) -> None:
    # A model kept two attempts whatever its fallbacks: with max_attempts 3 and
    # the first two models down, the third was never tried.
    paid = [m.id for m in realistic_models() if not m.id.endswith(":free")][:3]
    down = {m: Reply(503, "upstream overloaded") for m in paid[:2]}
    names = ", ".join(f'"{m}"' for m in paid)
    extra = f'[pool]\nmax_attempts = 3\n[[routes]]\nname = "chat"\ncandidates = [{names}]\n'
    with FakeUpstream.running_in_thread(scenario(down)) as server:
        with ProxyThread(write_config(tmp_path, server.url, extra), []) as url:
            answer = httpx.post(
                f"{url}/v1/chat/completions", json={"model": "chat", "messages": HI}
            )
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-keyrotor-model"] == paid[2]
    assert sent_models() == paid  # one attempt each: exploring costs one at most


def test_the_models_list_falls_back_in_order_like_openrouters(tmp_path: Path) -> None:
    first, second = "qwen/qwen3-large:free", PAID
    down = {first: Reply(404, f"No endpoints found for {first}.")}
    with FakeUpstream.running_in_thread(scenario(down)) as server:
        with ProxyThread(write_config(tmp_path, server.url), []) as url:
            body = {"model": first, "models": [second], "route": "fallback", "messages": HI}
            answer = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert answer.status_code == 200 and answer.headers["x-keyrotor-model"] == second
    assert sent_models() == [first, second]
    assert all("models" not in s and "route" not in s for s in SENT)  # each model on its own


def test_a_context_length_error_moves_to_a_larger_model_only(tmp_path: Path) -> None:
    small, same, large = "qwen/qwen3-70b:free", "openai/gpt-5-70b:free", "qwen/qwen3-large:free"
    route = f'[[routes]]\nname = "grow"\ncandidates = ["{small}", "{same}", "{large}"]\n'
    too_long = Reply(400, "This endpoint's maximum context length is 32768 tokens.")
    with FakeUpstream.running_in_thread(scenario({small: too_long})) as server:
        with ProxyThread(write_config(tmp_path, server.url, route), []) as url:
            answer = httpx.post(
                f"{url}/v1/chat/completions", json={"model": "grow", "messages": HI}
            )
    assert answer.status_code == 200 and answer.headers["x-keyrotor-model"] == large
    assert sent_models() == [small, large]  # the 32,768-token model of the same size was skipped


def test_routes_set_through_the_admin_api_work_at_once_and_survive_a_restart(
    tmp_path: Path,
) -> None:
    admin = {"authorization": "Bearer admin-token-0123456789abcdef"}
    extra = '[auth]\nadmin_token = "admin-token-0123456789abcdef"\n'
    route = {"candidates": [PAID], "strategy": "ordered"}
    with FakeUpstream.running_in_thread(scenario()) as server:
        with ProxyThread(write_config(tmp_path, server.url, extra, state=True), []) as url:
            put = httpx.put(f"{url}/admin/routes/mine", json=route, headers=admin)
            used = httpx.post(f"{url}/v1/chat/completions", json={"model": "mine", "messages": HI})
            bad = httpx.put(f"{url}/admin/routes/x", json={"candidates": []}, headers=admin)
            no_token = httpx.put(f"{url}/admin/routes/y", json=route)
        with ProxyThread(write_config(tmp_path, server.url, extra, state=True), []) as url:
            listed = httpx.get(f"{url}/admin/routes", headers=admin).json()
            gone = httpx.delete(f"{url}/admin/routes/mine", headers=admin)
            missing = httpx.delete(f"{url}/admin/routes/mine", headers=admin)
        with ProxyThread(write_config(tmp_path, server.url, extra, state=True), []) as url:
            after = httpx.get(f"{url}/routing/routes").json()
    assert put.status_code == 201 and put.json() == {"route": "mine", "stored": True}
    assert used.headers["x-keyrotor-model"] == PAID and used.headers["x-keyrotor-route"] == "mine"
    assert bad.status_code == 400 and "needs candidates" in bad.json()["error"]["message"]
    assert no_token.status_code == 401
    assert "mine" in {r["name"] for r in listed["routes"]}
    assert gone.status_code == 200 and missing.status_code == 404
    assert {r["name"] for r in after["routes"]} == {"free"}


def test_the_recorded_trace_and_the_log_line_say_what_the_route_did(tmp_path: Path) -> None:
    first, second = "qwen/qwen3-large:free", "openai/o3-8b:free"
    route = f'[[routes]]\nname = "pair"\ncandidates = ["{first}", "{second}"]\n'
    trace = tmp_path / "trace.jsonl"
    down = {first: Reply(503, f"No instances available for {first}.")}
    log: list[dict[str, Any]] = []
    with FakeUpstream.running_in_thread(scenario(down)) as server:
        config = write_config(tmp_path, server.url, route, top=f'record = "{trace}"')
        with ProxyThread(config, log) as url:
            answer = httpx.post(
                f"{url}/v1/chat/completions", json={"model": "pair", "messages": HI}
            )
    assert answer.status_code == 200
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    records = [r for r in lines if r["type"] == "request"]
    assert [(r["route"], r["model"], r["attempts"][0]["status"]) for r in records] == [
        ("pair", first, 503),
        ("pair", second, 200),
    ]
    access = next(e for e in log if e.get("route") == "pair")
    assert (access["model"], access["tried"]) == (second, [f"{first}: answered 503 (unavailable)"])


def test_only_the_top_level_model_is_replaced(tmp_path: Path) -> None:
    route = f'[[routes]]\nname = "one"\ncandidates = ["{PAID}"]\n'
    nested = {"model": "one", "note": "a nested model key"}
    with FakeUpstream.running_in_thread(scenario()) as server:
        with ProxyThread(write_config(tmp_path, server.url, route), []) as url:
            for body in (
                {"model": "one", "messages": HI},  # the body's bytes, the value spliced
                {"metadata": nested, "model": "one", "messages": HI},  # encoded again
            ):
                assert httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 200
    assert SENT[0] == {"model": PAID, "messages": HI}
    assert SENT[1] == {"metadata": nested, "model": PAID, "messages": HI}


def test_the_docs_configuration_loads_and_its_coding_route_decides_as_shown(tmp_path: Path) -> None:
    doc = (Path(__file__).parents[2] / "docs" / "routing.md").read_text("utf-8")
    toml = doc.split("## Routes", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "keyrotor.toml"
    with FakeUpstream.running_in_thread(scenario()) as server:
        path.write_text(f'upstream = "{server.url}"\n{toml}[state]\nenabled = false\n')
        environ = {"OPENROUTER_KEY_TEAM_1": KEYS["a1"][1], "OPENROUTER_KEY_TEAM_2": KEYS["a2"][1]}
        config = load_config(path, environ, {"port": 0})
        assert [r.name for r in config.routes] == ["free", "coding", "fast-vision"]
        assert config.routing.accounts == {"team": 1000}
        with ProxyThread(config, []) as url:
            body = {
                "model": "coding",
                "max_tokens": 4000,
                "messages": [{"role": "user", "content": "x" * 36_000}],
            }
            decision = recommend(url, body)
            vision = recommend(url, {"model": "fast-vision", "messages": HI})
    models = {m.id: m.to_json() for m in realistic_models()}
    chosen = models[decision["model"]]
    assert decision["model"].endswith(":free") and "tools" in chosen["supported_parameters"]
    assert chosen["context_length"] >= 64000
    assert decision["fallbacks"][-2:] == ["openai/gpt-4o-mini", "anthropic/claude-3.5-haiku-mini"]
    assert "image" in models[vision["model"]]["architecture"]["input_modalities"]


def test_a_nested_models_key_leaves_a_plain_request_alone(tmp_path: Path) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"models": 1}}}]
    body = {"model": PAID, "messages": HI, "tools": tools}
    with FakeUpstream.running_in_thread(scenario()) as server:
        with ProxyThread(write_config(tmp_path, server.url), []) as url:
            answer = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert answer.status_code == 200 and "x-keyrotor-route" not in answer.headers
    assert [body] == SENT
