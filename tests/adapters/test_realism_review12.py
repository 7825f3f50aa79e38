"""Review 12, upstream realism: the free-model daily cap read from ``GET /key``'s
``free_model_daily_requests`` (not guessed from ``is_free_tier``), and probes
that can revive keys of an OpenAI-compatible upstream (``GET /models``, since
such an upstream answers ``/key`` with a 404 that revives nothing).

Through the proxy on its own trio loop against the fake upstream over loopback.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from keyrotor.adapters.config import ConfigError, RoutingOptions, load_config
from keyrotor.adapters.proxy.router import Router
from keyrotor.adapters.storage import UsageRow
from keyrotor.testing import Behaviour, Chain, FakeUpstream, Reply, Scenario, Sequence
from keyrotor.transports.api import AsyncClient

from .proxy_thread import ProxyThread

HI = [{"role": "user", "content": "hi"}]
FREE = "meta-llama/llama-3.3-70b-instruct:free"
SECRET_A = "sk-or-v1-test-realism-a-jkjkjkjkjkjkjkjk"
SECRET_B = "sk-or-v1-test-realism-b-jkjkjkjkjkjkjkjk"
OPENAI_KEY = "sk-test-realism-openai-mnmnmnmnmnmnmnmn"
QUOTA = {  # OpenAI's answer to a key whose account ran out of credit
    "error": {
        "message": "You exceeded your current quota, please check your plan and billing details.",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_quota",
    }
}


class DocumentedKey(Behaviour):
    """OpenRouter's documented ``/key`` of an account that bought fewer than 10
    credits: it paid (``is_free_tier`` false), so its free tier is the lower one,
    and it says so in ``free_model_daily_requests``."""

    def __init__(self, used: int = 12) -> None:
        self.used = used

    def describe(self, data: dict[str, Any]) -> None:
        data["is_free_tier"] = False
        data["free_model_daily_requests"] = {
            "used": self.used,
            "limit": 50,
            "remaining": 50 - self.used,
        }


def until(check: Any, what: str) -> Any:
    """``check()``'s first truthy answer (a generous hang guard only)."""
    deadline = time.monotonic() + 30
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, what
        threading.Event().wait(0.02)


# ------------------------------------------------------------ finding 1


def test_the_free_daily_limit_and_todays_count_come_from_free_model_daily_requests(
    tmp_path: Path,
) -> None:
    """``is_free_tier: false`` with a limit of 50 (12 used): the proxy paces the
    account at 50 a day with 38 left, not at 1000 with 1000 - 1 left."""
    fake = Scenario().add(SECRET_A, DocumentedKey(), alias="a")
    path = tmp_path / "keyrotor.toml"
    with FakeUpstream.running_in_thread(fake) as server:
        path.write_text(
            f'upstream = "{server.url}"\n[state]\nenabled = false\n'
            '[[keys]]\nalias = "a"\nsecret_env = "KEY_A"\n'
        )
        config = load_config(path, {"KEY_A": SECRET_A}, {"port": 0})
        with ProxyThread(config, []) as url:
            served = httpx.post(f"{url}/v1/chat/completions", json={"model": FREE, "messages": HI})

            def learned() -> dict[str, Any] | None:  # the tier is learned in the background
                tier: dict[str, Any] = httpx.get(f"{url}/status").json()["routing"]["freeTier"]
                a = tier["a"]
                return a if a["perDay"] != 50 or a["usedToday"] >= 12 else None

            account = until(learned, "the proxy never learned the account's tier")
            asked = [e for e in server.log if e.path == "/key"]
    assert served.status_code == 200, served.text
    assert asked and asked[0].key == "a"
    assert account["perDay"] == 50
    assert account["usedToday"] == 12  # the upstream's count, ours (1) within it
    assert account["perDay"] - account["usedToday"] == 38


def test_after_a_restart_the_day_counts_the_larger_of_the_state_file_and_get_key() -> None:
    """The state file remembers 20 requests of ``a`` and 5 of ``b`` today; ``GET
    /key`` says 12 of each: ``a`` keeps 20 (no sum: the 12 are among them),
    ``b`` takes 12 (requests made before the state file knew, or elsewhere)."""
    fake = (
        Scenario()
        .add(SECRET_A, DocumentedKey(), alias="a")
        .add(SECRET_B, DocumentedKey(), alias="b")
    )
    today = time.strftime("%Y-%m-%d", time.gmtime())

    def row(name: str, requests: int) -> UsageRow:
        return UsageRow("free", name, today, requests, 0, 0, 0.0)

    async def main(url: str) -> tuple[dict[str, int], dict[str, Any]]:
        keys = {"a": SECRET_A, "b": SECRET_B}
        async with AsyncClient(keys, url) as client:
            router = Router([], RoutingOptions(), None, client, None)  # type: ignore[arg-type]
            router.restore([row("a", 20), row("b", 5)])
            learned = await router.learn_tiers()
            return learned, router.free.status(time.time())

    with FakeUpstream.running_in_thread(fake) as server:
        learned, status = anyio.run(main, server.url)
    assert learned == {"a": 50, "b": 50}
    assert (status["a"]["usedToday"], status["b"]["usedToday"]) == (20, 12)


def test_the_fakes_key_reports_the_days_free_requests_and_the_tier_set() -> None:
    from keyrotor.upstream.behaviours import FreeModelLimits

    paid_little = FreeModelLimits(20, 50, is_free_tier=False)  # bought fewer than 10 credits
    fake = (
        Scenario()
        .add(SECRET_A, paid_little, alias="a")
        .add(SECRET_B, FreeModelLimits(20, 1000), alias="b")
    )
    with FakeUpstream.running_in_thread(fake) as server:
        for _ in range(3):
            sent = httpx.post(
                f"{server.url}/chat/completions",
                json={"model": FREE, "messages": HI},
                headers={"authorization": f"Bearer {SECRET_A}"},
            )
            assert sent.status_code == 200
        a, b = (
            httpx.get(f"{server.url}/key", headers={"authorization": f"Bearer {s}"}).json()["data"]
            for s in (SECRET_A, SECRET_B)
        )
    assert a["is_free_tier"] is False
    assert a["free_model_daily_requests"] == {"used": 3, "limit": 50, "remaining": 47}
    assert b["is_free_tier"] is False
    assert b["free_model_daily_requests"] == {"used": 0, "limit": 1000, "remaining": 1000}


def test_free_quota_reads_the_field_defensively_and_falls_back_to_is_free_tier() -> None:
    from keyrotor.adapters.proxy.router import free_quota

    def daily(**fields: Any) -> dict[str, Any]:
        return {"is_free_tier": False, "free_model_daily_requests": fields}

    assert free_quota(daily(used=12, limit=50, remaining=38), 50) == (50, 12)
    assert free_quota(daily(limit=50, remaining=38), 50) == (50, 12)
    assert free_quota(daily(limit=1000.0), 50) == (1000, None)
    assert free_quota(daily(used=3, limit=50), 40) == (40, 3)  # the operator's lower cap holds
    assert free_quota({"is_free_tier": False}, 50) == (1000, None)  # the field absent
    assert free_quota({"is_free_tier": True}, 40) == (40, None)
    assert free_quota(daily(limit="50"), 50) == (1000, None)  # not a count: is_free_tier
    assert free_quota(daily(limit=True, used=-1), 50) == (1000, None)
    assert free_quota(daily(limit=float("nan")), 50) == (1000, None)
    assert free_quota({"label": "x"}, 50) is None
    assert free_quota(None, 50) is None


# ------------------------------------------------------------ finding 2


def openai_like(inner: Behaviour) -> Behaviour:
    """A key of an OpenAI-compatible upstream: ``GET /key`` is OpenAI's 404."""
    from keyrotor.upstream.behaviours import NoKeyEndpoint

    return Chain(NoKeyEndpoint(), inner)


def out_of_quota_once() -> Behaviour:
    """OpenAI's 429 ``insufficient_quota`` once (the account then topped up)."""
    return openai_like(Sequence([Reply(429, body=QUOTA)]))


def state_of(url: str, alias: str, provider: str | None) -> str:
    status = httpx.get(f"{url}/status").json()
    keys = status["keys"] if provider is None else status["providers"][provider]["keys"]
    return next(k["state"] for k in keys if k["alias"] == alias)  # type: ignore[no-any-return]


def test_a_providers_key_out_of_quota_is_revived_by_its_probe_of_get_models(
    tmp_path: Path,
) -> None:
    """An OpenAI-compatible ``[[providers]]`` upstream: its only key runs out of
    quota, is probed with ``GET /models`` (its ``/key`` is a 404) and serves again."""
    main = Scenario().add(SECRET_A, alias="m1")
    other = Scenario(report_cost=False).add(OPENAI_KEY, out_of_quota_once(), alias="o1")
    path = tmp_path / "keyrotor.toml"
    env = {"KEY_M1": SECRET_A, "KEY_O1": OPENAI_KEY}
    with (
        FakeUpstream.running_in_thread(main) as main_up,
        FakeUpstream.running_in_thread(other) as other_up,
    ):
        path.write_text(
            f'upstream = "{main_up.url}"\n[state]\nenabled = false\n'
            f'[[providers]]\nname = "other"\nupstream = "{other_up.origin}/v1"\n'
            '[[keys]]\nalias = "m1"\nsecret_env = "KEY_M1"\n'
            '[[keys]]\nalias = "o1"\nsecret_env = "KEY_O1"\nprovider = "other"\n'
        )
        config = load_config(path, env, {"port": 0})
        with ProxyThread(config, []) as url:
            chat = {"model": "other/gpt-4o-mini", "messages": HI}
            first = httpx.post(f"{url}/v1/chat/completions", json=chat)
            until(
                lambda: any(e.status == 429 for e in other_up.log),
                "the provider never answered insufficient_quota",
            )
            until(
                lambda: state_of(url, "o1", "other") in ("healthy", "recovering"),
                "the provider's key was never revived by a probe",
            )
            again = httpx.post(f"{url}/v1/chat/completions", json=chat)
            paths = [e.path for e in other_up.log if e.key == "o1"]
    assert first.status_code in (200, 429, 503), first.text
    assert again.status_code == 200 and again.headers["x-keyrotor-key"] == "o1", again.text
    assert "/key" not in paths  # the provider was never asked its OpenRouter-only path


def test_the_main_upstream_not_openrouters_probes_get_models(tmp_path: Path) -> None:
    """``upstream`` an OpenAI-compatible base URL (``/v1``): its key out of quota
    is probed with ``GET /models`` and serves again."""
    fake = Scenario(report_cost=False).add(OPENAI_KEY, out_of_quota_once(), alias="k1")
    path = tmp_path / "keyrotor.toml"
    with FakeUpstream.running_in_thread(fake) as server:
        path.write_text(
            f'upstream = "{server.origin}/v1"\n[state]\nenabled = false\n'
            '[[keys]]\nalias = "k1"\nsecret_env = "KEY_K1"\n'
        )
        config = load_config(path, {"KEY_K1": OPENAI_KEY}, {"port": 0})
        with ProxyThread(config, []) as url:
            chat = {"model": "gpt-4o-mini", "messages": HI}
            httpx.post(f"{url}/v1/chat/completions", json=chat)
            until(
                lambda: state_of(url, "k1", None) in ("healthy", "recovering"),
                "the key was never revived by a probe",
            )
            again = httpx.post(f"{url}/v1/chat/completions", json=chat)
            probes = [e.path for e in server.log if e.key == "k1" and e.path in ("/key", "/models")]
    assert again.status_code == 200, again.text
    assert probes and set(probes) == {"/models"}


def test_the_probe_path_follows_the_upstream_and_can_be_set(tmp_path: Path) -> None:
    from keyrotor.adapters.config import probe_path_for

    path = tmp_path / "keyrotor.toml"
    path.write_text(
        'upstream = "https://api.openai.com/v1"\n[state]\nenabled = false\n'
        '[[providers]]\nname = "groq"\nupstream = "https://api.groq.com/openai/v1"\n'
        '[[providers]]\nname = "or2"\nupstream = "https://openrouter.ai/api/v1"\n'
        'kind = "openrouter"\n'
        '[[providers]]\nname = "own"\nupstream = "https://llm.example.com/v1"\n'
        'probe_path = "/v1/health"\n'
        + "".join(
            f'[[keys]]\nalias = "{n}1"\nsecret = "sk-test-{n}-0000000000"\nprovider = "{n}"\n'
            for n in ("groq", "or2", "own")
        )
        + '[[keys]]\nalias = "m1"\nsecret = "sk-test-main-0000000000"\n'
    )
    config = load_config(path, {}, {})
    assert config.probe_path is None
    assert probe_path_for(config.probe_path, config.upstream) == "/models"
    paths = {p.name: probe_path_for(p.probe_path, p.upstream, p.kind) for p in config.providers}
    assert paths == {"groq": "/models", "or2": "/key", "own": "/v1/health"}
    assert probe_path_for(None, "https://openrouter.ai/api/v1") == "/key"
    assert probe_path_for(None, "http://127.0.0.1:9000/api/v1") == "/key"  # OpenRouter's shape
    assert probe_path_for(None, "http://127.0.0.1:9000/v1") == "/models"
    overridden = load_config(path, {}, {"probe_path": "/key"})
    assert probe_path_for(overridden.probe_path, overridden.upstream) == "/key"


@pytest.mark.parametrize(
    ("top", "provider", "message"),
    [
        ('probe_path = "models"\n', "", 'probe_path must be a path starting with "/"'),
        ("", 'probe_path = "models"\n', r'\(x\) probe_path must be a path starting with "/"'),
        ("", 'probe_path = "/mo dels"\n', "probe_path must be printable ASCII"),
        ("", "probe_path = 1\n", "probe_path must be a string"),
    ],
)
def test_a_bad_probe_path_is_one_clear_line(
    tmp_path: Path, top: str, provider: str, message: str
) -> None:
    path = tmp_path / "keyrotor.toml"
    path.write_text(
        f'{top}[state]\nenabled = false\n[[providers]]\nname = "x"\nupstream = "http://x"\n'
        f'{provider}[[keys]]\nalias = "x1"\nsecret = "sk-test-x-0000000000"\nprovider = "x"\n'
        '[[keys]]\nalias = "m1"\nsecret = "sk-test-main-0000000000"\n'
    )
    with pytest.raises(ConfigError, match=message) as raised:
        load_config(path, {}, {})
    text = str(raised.value)
    assert "\n" not in text and "Traceback" not in text
    if "starting" in message:
        assert 'fix: set probe_path = "/models"' in text
