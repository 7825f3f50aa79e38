"""Spend per provider, model and client token, budgets, and cost from the
catalog when an upstream reports none (issue 13)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyrotor.adapters.config import Budget, ConfigError, load_config, token_name
from keyrotor.adapters.proxy.providers import top_model
from keyrotor.adapters.proxy.spend import MAX_NAMES, SpendBook
from keyrotor.adapters.storage import StateStore, UsageRow
from keyrotor.models import parse_catalog, pricer, usage_cost
from keyrotor.testing import FakeUpstream, Scenario
from keyrotor.testing.catalogs import realistic_models
from keyrotor.transports.api import AsyncClient, StreamAccountant

from .proxy_thread import ProxyThread

DAY = 86400.0
NOON = 1_796_472_000.0  # 2026-12-05 12:00 UTC
ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef00"
KEYS = {"k1": "sk-or-v1-spend-one-aaaaaaaaaaaa", "k2": "sk-or-v1-spend-two-bbbbbbbbbbbb"}
HI = [{"role": "user", "content": "hi"}]


class Clock:
    def __init__(self, now: float = NOON) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def answer(cost: float, prompt: int = 10, completion: int = 5) -> StreamAccountant:
    """An accountant that read an answer with this usage."""
    usage = StreamAccountant("application/json")
    tokens = {"prompt_tokens": prompt, "completion_tokens": completion, "cost": cost}
    usage.feed(json.dumps({"usage": tokens}).encode())
    usage.close()
    return usage


# ------------------------------------------------------------------ the book


def test_a_windowed_budget_refuses_until_spend_leaves_its_window() -> None:
    clock = Clock()
    book = SpendBook([Budget("client", "alice", 1.0, 3600.0)], clock=clock)
    book.charge({"client": "alice", "model": "m"}, answer(0.6))
    assert book.refusal("alice", "m") is None
    clock.now += 600
    book.charge({"client": "alice"}, answer(0.5))
    refused = book.refusal("alice", "m")
    assert refused is not None and refused.spent == pytest.approx(1.1)
    assert "alice" in refused.message and "$1.00" in refused.message
    # The first 0.6 leaves the window an hour (and at most a minute) after it was spent.
    assert refused.retry_after is not None and 3000 <= refused.retry_after <= 3060
    assert book.refusal("bob", "m") is None  # another client is not concerned
    clock.now += refused.retry_after
    assert book.refusal("alice", "m") is None
    assert book.status()["budgets"][0]["spent"] == pytest.approx(0.5)


def test_a_budget_for_ever_has_no_retry_after_and_a_model_budget_stops_every_client() -> None:
    book = SpendBook([Budget("model", "big/model", 0.5)], clock=Clock())
    book.charge({"model": "big/model", "client": "alice"}, answer(0.5))
    for client in ("alice", "bob", None):
        refused = book.refusal(client, "big/model")
        assert refused is not None and refused.retry_after is None
    assert book.refusal("alice", "small/model") is None
    (budget,) = book.status()["budgets"]
    assert budget == {
        **{"scope": "model", "name": "big/model", "budget": 0.5, "window": None},
        **{"spent": 0.5, "remaining": 0.0, "exhausted": True},
    }


def document() -> dict[str, Any]:
    return {"data": [m.to_json() for m in realistic_models()]}


def test_the_estimated_prompt_counts_before_the_request_is_sent() -> None:
    catalog = parse_catalog(document())
    paid = next(m for m in catalog.models if m.pricing.prompt > 1e-6 and not m.pricing.variable)
    long = json.dumps({"model": paid.id, "messages": [{"role": "user", "content": "x" * 4000}]})
    ahead = 1007 * paid.pricing.prompt + paid.pricing.request  # 4000 chars / 4 + framing
    book = SpendBook([Budget("client", "alice", 2 * ahead)], clock=Clock())
    book.charge({"client": "alice"}, answer(1.5 * ahead))  # room for half the prompt
    refused = book.refusal("alice", paid.id, long.encode(), paid)
    assert refused is not None and refused.ahead == pytest.approx(ahead)
    assert "estimated" in refused.message
    short = json.dumps({"model": paid.id, "messages": HI}).encode()
    assert book.refusal("alice", paid.id, short, paid) is None
    assert book.refusal("alice", paid.id, long.encode(), None) is None  # no prices: spend only


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 4000), st.floats(0, 1)),  # (seconds since the last, cost)
        max_size=40,
    ),
    st.floats(60, 7200),
    st.floats(0, 10000),
)
def test_a_window_counts_what_was_spent_in_it_to_the_minute(
    charges: list[tuple[float, float]], window: float, later: float
) -> None:
    clock = Clock()
    book = SpendBook([Budget("client", "c", 1e9, window)], clock=clock)
    spent_at = []
    for gap, cost in charges:
        clock.now += gap
        book.charge({"client": "c"}, answer(cost))
        spent_at.append((clock.now, cost))
    clock.now += later
    counted = book.status()["budgets"][0]["spent"]
    exact = sum(c for t, c in spent_at if t > clock.now - window)
    loose = sum(c for t, c in spent_at if t > clock.now - window - 60)  # one bucket more
    assert exact - 1e-6 <= counted <= loose + 1e-6


def test_todays_totals_per_scope_roll_over_at_midnight_and_stay_bounded() -> None:
    clock = Clock()
    book = SpendBook(clock=clock)
    names = {"provider": "main", "model": "a/b", "client": "alice"}
    book.charge(names, answer(0.25, 100, 20))
    book.charge(names, answer(0.25, 100, 20))
    book.charge(names, None)  # broke off: nothing
    book.charge(names, StreamAccountant("text/event-stream"))  # no usage: nothing
    status = book.status()
    assert status["day"] == "2026-12-05"
    for scope in ("providers", "models", "clients"):
        (row,) = status[scope].values()
        assert row == {"requests": 2, "prompt_tokens": 200, "completion_tokens": 40, "cost": 0.5}
    for i in range(MAX_NAMES + 5):
        book.charge({"model": f"m{i}"}, answer(0.001))
    assert len(book.status()["models"]) == MAX_NAMES + 1  # the rest under "(other)"
    assert book.status()["models"]["(other)"]["requests"] == 6
    clock.now += DAY / 2
    assert book.status()["models"] == {} and book.status()["day"] == "2026-12-06"


def test_restored_rows_count_toward_todays_totals_and_running_windows() -> None:
    clock = Clock()
    book = SpendBook(
        [Budget("client", "alice", 1.0, DAY), Budget("model", "a/b", 1.0, 3600.0)], clock=clock
    )
    book.restore(
        [
            UsageRow("client", "alice", "2026-12-05", 3, 30, 15, 0.7),
            UsageRow("client", "alice", "2026-12-04", 3, 30, 15, 0.2),  # yesterday, in the day
            UsageRow("client", "alice", "2026-12-01", 3, 30, 15, 5.0),  # long gone
            UsageRow("model", "a/b", "2026-12-04", 1, 1, 1, 9.0),  # before the hour
        ]
    )
    status = book.status()
    assert status["clients"]["alice"]["cost"] == pytest.approx(0.7)
    assert [b["spent"] for b in status["budgets"]] == [pytest.approx(0.9), 0.0]
    assert book.refusal("alice", None) is None
    book.charge({"client": "alice"}, answer(0.15))
    assert book.refusal("alice", None) is not None


# ------------------------------------------------------------------ the state file


def test_usage_is_kept_in_the_state_file_per_scope_and_day(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "state.db"
    with StateStore.open(path, secret_key=None, wall_clock=clock) as store:
        names = {"provider": "main", "model": "a/b", "client": "alice"}
        store.record_usage(names, prompt_tokens=10, completion_tokens=2, cost=0.5)
        store.record_usage(names, prompt_tokens=10, completion_tokens=2, cost=0.25)
        store.record_usage({"model": "a/b"}, cost=1.0, at=NOON - DAY)
    with StateStore.open(path, secret_key=None, wall_clock=clock) as store:
        rows = store.load().usage
    assert rows == [
        UsageRow("model", "a/b", "2026-12-04", 1, 0, 0, 1.0),
        UsageRow("client", "alice", "2026-12-05", 2, 20, 4, 0.75),
        UsageRow("model", "a/b", "2026-12-05", 2, 20, 4, 0.75),
        UsageRow("provider", "main", "2026-12-05", 2, 20, 4, 0.75),
    ]
    with sqlite3.connect(path) as db:  # the versioned schema has the step
        assert db.execute("SELECT count(*) FROM usage").fetchone() == (4,)


# ------------------------------------------------------------------ priced by the catalog


def test_a_client_prices_answers_without_usage_cost_from_the_catalog() -> None:
    scenario = Scenario(models=realistic_models(), report_cost=False)
    scenario.add(KEYS["k1"], alias="k1")
    catalog = parse_catalog(document())
    paid = next(m for m in catalog.models if m.pricing.prompt > 0 and not m.pricing.variable)

    async def main() -> tuple[dict[str, Any], float, list[float]]:
        async with FakeUpstream(scenario).serve() as upstream:
            async with AsyncClient({"k1": KEYS["k1"]}, upstream.origin + "/v1") as client:
                client.driver.price = pricer(catalog)
                seen: list[float] = []
                client.driver.on_finished.append(lambda key, usage: seen.append(usage.cost))
                for stream in (False, True):
                    body = {"model": paid.id, "messages": HI, "stream": stream, "max_tokens": 7}
                    reply = await client.request("POST", "/chat/completions", json=body)
                    assert reply.status_code == 200
                return client.status(), upstream.stats("k1").cost, seen

    status, charged, seen = anyio.run(main)
    assert charged > 0 and len(seen) == 2
    assert sum(seen) == pytest.approx(charged, rel=1e-9)  # what the fake charged, unreported
    (key,) = status["keys"]
    assert key["spend"] == pytest.approx(charged, rel=1e-9)  # counts toward the key's budget


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(["image", "plain", "unknown"]),
    st.integers(0, 3),
    st.sampled_from([0, 3_000, 30_000]),
    st.booleans(),
    st.booleans(),
)
def test_the_proxys_price_hook_reads_the_model_without_parsing_and_prices_as_parsing_does(
    which: str, images: int, padding: int, model_last: bool, nested: bool
) -> None:
    """The proxy's hook finds the model with ``top_model`` (no parse of a long
    body) and parses only to count images for a model that charges for them:
    the same price as the hook that parses every body."""
    catalog = parse_catalog(document())
    image = next(m for m in catalog.models if m.pricing.image and not m.pricing.variable)
    plain = next(m for m in catalog.models if m.pricing.prompt and not m.pricing.image)
    model = {"image": image.id, "plain": plain.id, "unknown": "no/such-model"}[which]
    parts = [{"type": "text", "text": '"model": "x" {[' * (padding // 16)}]
    parts += [{"type": "image_url", "image_url": {"url": "data:,"}}] * images
    request: dict[str, Any] = {"messages": [{"role": "user", "content": parts}]}
    if nested:
        request["metadata"] = {"model": plain.id}
    request = {"model": model, **request} if not model_last else {**request, "model": model}
    body = json.dumps(request).encode()
    usage = {"prompt_tokens": 100, "completion_tokens": 20}
    parsed: list[bytes] = []
    real_loads = json.loads

    def counting(text: Any, **kwargs: Any) -> Any:
        if text == body:
            parsed.append(text)
        return real_loads(text, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(json, "loads", counting)
        fast = pricer(catalog, top_model)(body, usage)
    assert fast == pricer(catalog)(body, usage)
    info = catalog.get(model)
    assert fast == (None if info is None else usage_cost(info.pricing, usage, images=images))
    if which != "image" and (model_last or not nested):  # the last "model" is the top one
        assert parsed == []


def test_a_failing_price_hook_leaves_the_cost_at_zero_and_says_so() -> None:
    scenario = Scenario(report_cost=False)
    scenario.add(KEYS["k1"], alias="k1")
    said: list[str] = []

    def broken(body: bytes | None, usage: Any) -> float | None:
        raise RuntimeError("no prices")

    async def main() -> float:
        async with FakeUpstream(scenario).serve() as upstream:
            async with AsyncClient({"k1": KEYS["k1"]}, upstream.url) as client:
                client.driver.price = broken
                client.driver.on_recording_error = said.append
                reply = await client.request("POST", "/chat/completions", json={"messages": HI})
                assert reply.status_code == 200
                return float(client.status()["keys"][0]["spend"])

    assert anyio.run(main) == 0.0
    assert said == ["keyrotor: the price hook failed: RuntimeError"]


# ------------------------------------------------------------------ the proxy


def write_config(tmp_path: Path, url: str, extra: str = "", catalog: bool = False) -> Path:
    keys = "".join(f'[[keys]]\nalias = "{a}"\nsecret = "{s}"\n' for a, s in KEYS.items())
    path = tmp_path / "keyrotor.toml"
    path.write_text(
        f'upstream = "{url}"\n[state]\npath = "{tmp_path / "state.db"}"\n'
        f"[catalog]\nenabled = {str(catalog).lower()}\n"
        f'[auth]\nclient_tokens = ["{BOB}"]\n'
        f'[[clients]]\nname = "alice"\ntoken_env = "ALICE_TOKEN"\n{extra}\n{keys}'
    )
    return path


def fake_upstream(report_cost: bool = True, **options: Any) -> Scenario:
    scenario = Scenario(report_cost=report_cost, **options)
    for alias, secret in KEYS.items():
        scenario.add(secret, alias=alias)
    return scenario


def chat(url: str, token: str, model: str = "openai/gpt-4o-mini", stream: bool = False) -> Any:
    with openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0) as sdk:
        if stream:
            chunks = sdk.chat.completions.create(
                model=model,
                messages=HI,  # type: ignore[arg-type]
                stream=True,
                stream_options={"include_usage": True},
            )
            return list(chunks)
        return sdk.chat.completions.create(model=model, messages=HI)  # type: ignore[arg-type]


def test_the_proxy_keeps_spend_per_client_model_and_provider_and_enforces_budgets(
    tmp_path: Path,
) -> None:
    budgets = (
        '[[budgets]]\nclient = "alice"\nbudget = 0.00003\nbudget_window = 86400\n'
        '[[budgets]]\nmodel = "openai/gpt-4o"\nbudget = 0.00001\n'
    )
    env = {"ALICE_TOKEN": ALICE}
    bob = token_name(BOB)
    with FakeUpstream.running_in_thread(fake_upstream()) as upstream:
        config = load_config(write_config(tmp_path, upstream.url, budgets), env, {"port": 0})
        assert config.client_names == {ALICE: "alice", BOB: bob}
        with ProxyThread(config, []) as url:
            chat(url, ALICE)
            chat(url, ALICE, stream=True)
            issued = httpx.post(f"{url}/auth/token", headers={"authorization": f"Bearer {ALICE}"})
            chat(url, issued.json()["access_token"])  # spends under alice, its issuer
            chat(url, BOB, model="openai/gpt-4o")
            with pytest.raises(openai.RateLimitError) as over:  # the model's budget is spent
                chat(url, ALICE, model="openai/gpt-4o")
            assert "the model 'openai/gpt-4o' has spent" in str(over.value)
            while True:  # alice's requests until her budget (per day) is spent
                try:
                    chat(url, ALICE)
                except openai.RateLimitError as exc:
                    refused = exc.response
                    break
            assert refused.status_code == 429
            assert refused.json()["error"]["type"] == "insufficient_quota"
            assert refused.json()["error"]["code"] == "budget_exceeded"
            assert 0 < int(refused.headers["retry-after"]) <= 86400 + 60
            chat(url, BOB)  # bob has no budget
            status = httpx.get(f"{url}/status", headers={"authorization": f"Bearer {BOB}"}).json()
        charged = sum(upstream.stats(alias).cost for alias in KEYS)
    spend = status["spend"]
    assert set(spend["clients"]) == {"alice", bob}
    assert spend["providers"]["main"]["cost"] == pytest.approx(charged)
    assert sum(r["cost"] for r in spend["clients"].values()) == pytest.approx(charged)
    assert sum(r["cost"] for r in spend["models"].values()) == pytest.approx(charged)
    assert spend["models"]["openai/gpt-4o"]["requests"] == 1
    assert spend["clients"][bob]["requests"] == 2
    alice = spend["clients"]["alice"]
    assert alice["cost"] >= 0.00003 and alice["prompt_tokens"] > 0
    assert [b["exhausted"] for b in spend["budgets"]] == [True, True]

    # A restart serves the stored spend: the budgets stay spent.
    with FakeUpstream.running_in_thread(fake_upstream()) as upstream:
        config = load_config(write_config(tmp_path, upstream.url, budgets), env, {"port": 0})
        with ProxyThread(config, []) as url:
            with pytest.raises(openai.RateLimitError):
                chat(url, ALICE)
            chat(url, BOB)
            status = httpx.get(f"{url}/status", headers={"authorization": f"Bearer {BOB}"}).json()
    assert status["spend"]["clients"]["alice"] == alice
    assert status["spend"]["clients"][bob]["requests"] == 3


def test_the_proxy_prices_answers_from_its_catalog_when_the_upstream_reports_no_cost(
    tmp_path: Path,
) -> None:
    models = realistic_models()
    paid = next(m for m in models if float(m.prompt) > 0 and m.id.startswith("openai/"))
    scenario = fake_upstream(report_cost=False, models=models)
    with FakeUpstream.running_in_thread(scenario) as upstream:
        path = write_config(tmp_path, upstream.url, catalog=True)
        config = load_config(path, {"ALICE_TOKEN": ALICE}, {"port": 0})
        with ProxyThread(config, []) as url:
            listed = httpx.get(f"{url}/v1/models", headers={"authorization": f"Bearer {BOB}"})
            assert paid.id in {m["id"] for m in listed.json()["data"]}  # the catalog is in
            answers = [chat(url, ALICE, paid.id), chat(url, ALICE, paid.id, stream=True)]
            status = httpx.get(f"{url}/status", headers={"authorization": f"Bearer {BOB}"}).json()
        charged = sum(upstream.stats(alias).cost for alias in KEYS)
    assert answers[0].usage is not None and not hasattr(answers[0].usage, "cost")
    assert charged > 0
    assert status["spend"]["models"][paid.id]["cost"] == pytest.approx(charged, rel=1e-9)
    assert sum(k["spend"] for k in status["keys"]) == pytest.approx(charged, rel=1e-9)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[[budgets]]\nclient = "carol"\nbudget = 1.0\n', "client 'carol' is not a client"),
        ('[[budgets]]\nclient = "alice"\nmodel = "x"\nbudget = 1\n', "exactly one of client"),
        ('[[budgets]]\nmodel = "x"\n', "has no budget"),
        ('[[budgets]]\nmodel = "x"\nbudget = -1.0\n', "budget must be more than zero"),
        ('[[budgets]]\nmodel = "x"\nbudget = 1\nbudget_window = 0\n', "budget_window must be"),
        ('[[budgets]]\nmodel = "x"\nbudget = "ten"\n', "budget"),
        (
            '[[budgets]]\nmodel = "x"\nbudget = 1\n[[budgets]]\nmodel = "x"\nbudget = 2\n',
            "has a budget already",
        ),
        ('[[budgets]]\nmodel = "x"\nbudget = 1\ncolour = 1\n', "unknown option"),
        ('[[clients]]\nname = "alice"\ntoken = "another-token-0123456789"\n', "already used"),
        ('[[clients]]\nname = "bad name"\ntoken = "another-token-0123456789"\n', "must be up to"),
        ('[[clients]]\nname = "carol"\ntoken_env = "UNSET_VAR"\n', "UNSET_VAR' is not set"),
        ('[[clients]]\nname = "carol"\n', "exactly one of token and token_env"),
        (f'[[clients]]\nname = "carol"\ntoken = "{ALICE}"\n', "token of another client"),
        ('[[clients]]\nname = "carol"\ntoken = "short"\n', "shorter than 16"),
        ("budgets = 3\n", "budgets must be an array of tables"),
    ],
)
def test_bad_clients_and_budgets_are_one_clear_error(
    tmp_path: Path, extra: str, message: str
) -> None:
    top = extra.startswith("budgets =")  # a top-level key must come before the tables
    path = write_config(tmp_path, "http://127.0.0.1:9", "" if top else extra)
    if top:
        path.write_text(extra + path.read_text())
    with pytest.raises(ConfigError, match=message) as error:
        load_config(path, {"ALICE_TOKEN": ALICE}, {})
    assert ALICE not in str(error.value) and BOB not in str(error.value)
