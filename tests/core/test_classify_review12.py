"""Review 12: upstream answers documented by OpenRouter and Google that the rules
misread (402 for one request too large, provider 429s, per-day Gemini quotas,
probes that cannot show an account's balance)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from keyrotor.core import (
    KeySpec,
    Pool,
    PoolConfig,
    ProbeFinished,
    RequestStarted,
    ResponseFinished,
    ResponseReceived,
    Send,
)
from keyrotor.core.classify import Verdict, classify_response

from .helpers import changes, only, sends

V = Verdict


def _pool(*keys: tuple[str, str | None], **options: Any) -> Pool:
    specs = [KeySpec(key_id=key_id, account=account) for key_id, account in keys]
    return Pool(PoolConfig(keys=specs, **options))


def _states(pool: Pool) -> dict[str, str]:
    return {k.key_id: k.state.value for k in pool.statistics().keys}


def _answer(pool: Pool, status: int, body: Any, now: float = 0.1, **extra: Any) -> list[Any]:
    """Start ``r1`` (it goes to the first key) and answer it with ``status``/``body``."""
    assert only(pool.handle(RequestStarted(request_id="r1", now=0.0)), Send).key_id
    return pool.handle(
        ResponseReceived(request_id="r1", now=now, status=status, body=body, **extra)
    )


# --- A: 402 weight_exceeds_budget ---------------------------------------------

# OpenRouter's docs (api-reference/limits): one request's estimated cost exceeds the
# whole in-flight budget, "retrying will not help. Lower max_tokens or the prompt size".
WEIGHT_EXCEEDS_BUDGET = {
    "error": {
        "code": 402,
        "message": "This request's estimated cost exceeds your in-flight spending budget.",
        "metadata": {
            "reason": "weight_exceeds_budget",
            "limit_source": "openrouter_credits",
            "remedy_hint": "Lower max_tokens or the prompt size, or add credits.",
        },
    }
}


def test_a_402_weight_exceeds_budget_is_the_requests_problem() -> None:
    verdict = classify_response(402, {}, WEIGHT_EXCEEDS_BUDGET)
    assert verdict.verdict is V.TRY_ANOTHER_KEY
    assert not verdict.account_wide
    assert verdict.reason == "weight_exceeds_budget"


def test_a_402_weight_exceeds_budget_parks_no_key() -> None:
    pool = _pool(("a1", "A"), ("a2", "A"), ("b1", "B"))
    out = _answer(pool, 402, json.dumps(WEIGHT_EXCEEDS_BUDGET).encode())
    assert changes(out) == []
    assert sends(out)  # tried on another key
    assert set(_states(pool).values()) == {"healthy"}


def test_a_402_of_the_balance_without_that_reason_still_depletes_the_account() -> None:
    body = {"error": {"code": 402, "message": "Insufficient credits",
                      "metadata": {"limit_source": "openrouter_credits"}}}  # fmt: skip
    verdict = classify_response(402, {}, body)
    assert (verdict.verdict, verdict.account_wide) == (V.DEPLETED, True)


# --- B: a provider's 429 ------------------------------------------------------

# OpenRouter's docs (errors-and-debugging, "Provider errors").
PROVIDER_429 = {
    "error": {
        "code": 429,
        "message": "Rate limit exceeded",
        "metadata": {"error_type": "rate_limit_exceeded", "provider_code": "rate_limited"},
    }
}
# OpenRouter's docs (limits, "Mid-stream rate limits"): the chunk after the first token.
MID_STREAM_429 = {
    "id": "cmpl-abc123",
    "object": "chat.completion.chunk",
    "created": 1234567890,
    "model": "openai/gpt-4o",
    "provider": "openai",
    "error": {"code": 429, "message": "Rate limit exceeded"},
    "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
}


@pytest.mark.parametrize(
    "metadata",
    [
        {"error_type": "rate_limit_exceeded", "provider_code": "rate_limited"},
        {"provider_code": 429},
        {"provider_name": "Together"},
    ],
)
def test_a_429_relayed_from_a_provider_is_upstream_busy(metadata: dict[str, Any]) -> None:
    body = {"error": {"code": 429, "message": "Rate limit exceeded", "metadata": metadata}}
    verdict = classify_response(429, {"Retry-After": "3"}, body)
    assert (verdict.verdict, verdict.reason) == (V.UPSTREAM_BUSY, "provider_rate_limited")
    assert verdict.cooldown == 3.0  # the provider's hint, no penalty on the key


def test_a_provider_429_leaves_the_key_alone() -> None:
    pool = _pool(("a", None), ("b", None))
    out = _answer(pool, 429, PROVIDER_429)
    assert changes(out) == [] and not sends(out)  # delivered: another key won't help
    assert _states(pool) == {"a": "healthy", "b": "healthy"}


@pytest.mark.parametrize(
    "headers",
    [
        {"X-RateLimit-Limit": "20", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "60"},
        None,  # in metadata.headers below
    ],
)
def test_a_platform_429_with_its_headers_still_limits_the_key(
    headers: dict[str, str] | None,
) -> None:
    metadata: dict[str, Any] = {"provider_name": "Together"}
    if headers is None:
        metadata["headers"] = {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "60"}
    body = {"error": {"code": 429, "message": "Rate limit exceeded", "metadata": metadata}}
    for mid_stream in (False, True):
        verdict = classify_response(429, headers, body, mid_stream=mid_stream)
        assert verdict.verdict is V.RATE_LIMITED, mid_stream


def test_a_free_tier_429_with_a_null_provider_stays_account_wide() -> None:
    # Gitlawb/openclaude#936: the platform's daily free limit, provider_name null.
    body = {"error": {"code": 429, "message": "Rate limit exceeded: free-models-per-day. ",
                      "metadata": {"provider_name": None}}}  # fmt: skip
    verdict = classify_response(429, None, body, wall_time=1_785_564_863.0)
    assert (verdict.verdict, verdict.account_wide) == (V.RATE_LIMITED, True)


def test_a_mid_stream_429_is_the_providers() -> None:
    verdict = classify_response(429, None, MID_STREAM_429, mid_stream=True)
    assert verdict.verdict is V.UPSTREAM_BUSY
    assert classify_response(429, None, MID_STREAM_429).verdict is V.RATE_LIMITED  # before


def test_a_mid_stream_429_does_not_cool_the_key() -> None:
    pool = _pool(("a", None), ("b", None))
    pool.handle(RequestStarted(request_id="r1", now=0.0))
    pool.handle(ResponseReceived(request_id="r1", now=0.1, status=200))
    out = pool.handle(
        ResponseFinished(
            request_id="r1", now=5.0, error_status=429, error_body=json.dumps(MID_STREAM_429)
        )
    )
    assert changes(out) == []
    assert _states(pool) == {"a": "healthy", "b": "healthy"}
    key = pool.statistics().keys[0]
    assert key.errors["upstream_busy"] == 1 and key.errors["rate_limited"] == 0


# --- C: 402 bodies without limit_source ---------------------------------------

# Gitlawb/openclaude#43, continuedev/continue#10877: an account that never bought credits.
NEVER_PURCHASED = {
    "error": {
        "message": "Insufficient credits. This account never purchased credits. Make sure "
        "your key is on the correct account or org, and if so, purchase more at "
        "https://openrouter.ai/settings/credits",
        "code": 402,
    }
}
# tailcallhq/forgecode#571: the key's cap is too small for this request only.
TOKEN_CAPACITY = {
    "error": {
        "message": "More credits are required to run this request. 128000 token capacity "
        "required, 19484 available. To increase, visit https://openrouter.ai/settings/keys "
        "and create a key with a higher limit",
        "code": 402,
    }
}


def test_insufficient_credits_is_the_accounts_balance() -> None:
    verdict = classify_response(402, {}, NEVER_PURCHASED)
    assert (verdict.verdict, verdict.account_wide) == (V.DEPLETED, True)
    assert verdict.reason == "insufficient_credits"
    pool = _pool(("a1", "A"), ("a2", "A"), ("b1", "B"))
    out = _answer(pool, 402, NEVER_PURCHASED)
    assert changes(out) == [("a1", "healthy", "depleted"), ("a2", "healthy", "depleted")]
    assert only(out, Send).key_id == "b1"


def test_a_request_larger_than_the_keys_capacity_tries_another_key() -> None:
    verdict = classify_response(402, {}, TOKEN_CAPACITY)
    assert (verdict.verdict, verdict.reason) == (V.TRY_ANOTHER_KEY, "token_capacity")
    pool = _pool(("a", None), ("b", None))
    out = _answer(pool, 402, TOKEN_CAPACITY)
    assert changes(out) == [] and only(out, Send).key_id == "b"
    assert _states(pool) == {"a": "healthy", "b": "healthy"}  # smaller requests still fit


# --- D: Gemini's per-day quota ------------------------------------------------

# diegosouzapw/OmniRoute#9504: a per-day quota with a short RetryInfo.
GEMINI_PER_DAY = [
    {
        "error": {
            "code": 429,
            "status": "RESOURCE_EXHAUSTED",
            "message": "You exceeded your current quota, please check your plan and billing "
            "details.\n* Quota exceeded for metric: generativelanguage.googleapis.com/"
            "generate_content_free_tier_requests, limit: 20, model: gemini-2.5-flash\n"
            "Please retry in 36.429760048s.",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [
                        {
                            "quotaMetric": "generativelanguage.googleapis.com/"
                            "generate_content_free_tier_requests",
                            "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                            "quotaValue": "20",
                        }
                    ],
                },
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "36s"},
            ],
        }
    }
]


def _utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("now", "reset"),
    [
        ("2026-08-01T06:14:23", "2026-08-01T07:00:00"),  # PDT: midnight is 07:00 UTC
        ("2026-08-01T07:00:00", "2026-08-02T07:00:00"),
        ("2026-01-15T12:00:00", "2026-01-16T08:00:00"),  # PST: 08:00 UTC
        ("2026-03-08T09:30:00", "2026-03-09T07:00:00"),  # 01:30 PST, clocks go forward
        ("2026-11-01T08:30:00", "2026-11-02T08:00:00"),  # 01:30 PDT, clocks go back
        ("2026-11-01T09:30:00", "2026-11-02T08:00:00"),  # 01:30 PST, the second time
        ("2026-12-31T23:00:00", "2027-01-01T08:00:00"),
    ],
)
def test_a_gemini_per_day_quota_rests_until_midnight_pacific(now: str, reset: str) -> None:
    verdict = classify_response(429, None, GEMINI_PER_DAY, wall_time=_utc(now))
    assert verdict.verdict is V.RATE_LIMITED
    assert verdict.account_wide  # the project's quota
    assert verdict.reason == "quota_per_day"
    assert verdict.cooldown == pytest.approx(_utc(reset) - _utc(now))


def test_the_pacific_reset_agrees_with_the_tz_database() -> None:
    zoneinfo = pytest.importorskip("zoneinfo")
    try:
        pacific = zoneinfo.ZoneInfo("America/Los_Angeles")
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip("no tz database here")
    wall = _utc("2025-01-01T00:00:00")
    while wall < _utc("2027-01-01T00:00:00"):
        local = datetime.fromtimestamp(wall, pacific)
        nxt = (local + timedelta(days=1)).date()
        midnight = datetime(nxt.year, nxt.month, nxt.day, tzinfo=pacific).timestamp()
        got = classify_response(429, None, GEMINI_PER_DAY, wall_time=wall).cooldown
        expected = max(midnight - wall, 36.429760048)  # a longer hint still counts
        assert got == pytest.approx(expected), datetime.fromtimestamp(wall, UTC)
        wall += 7 * 3600 + 1234.5


@pytest.mark.parametrize("wall_time", [None, float("nan"), 1e300])
def test_a_per_day_quota_without_a_usable_clock_takes_the_default(
    wall_time: float | None,
) -> None:
    verdict = classify_response(429, None, GEMINI_PER_DAY, wall_time=wall_time)
    assert verdict.verdict is V.RATE_LIMITED
    assert verdict.cooldown is None  # the pool's rate_limit_cooldown, not 36 s


def test_a_per_minute_quota_keeps_its_retry_delay() -> None:
    body = json.loads(json.dumps(GEMINI_PER_DAY))
    details = body[0]["error"]["details"]
    details[0]["violations"][0]["quotaId"] = "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
    details[0]["violations"].insert(0, "not a violation")
    verdict = classify_response(429, None, body, wall_time=_utc("2026-08-01T06:14:23"))
    assert verdict.verdict is V.RATE_LIMITED and not verdict.account_wide
    assert verdict.cooldown == pytest.approx(36.429760048)


def test_a_per_day_quota_cools_the_whole_project() -> None:
    pool = _pool(("g1", "proj"), ("g2", "proj"), ("h", "other"))
    wall = _utc("2026-08-01T06:14:23")
    out = _answer(pool, 429, GEMINI_PER_DAY, now=10.0, wall_time=wall)
    assert changes(out) == [("g1", "healthy", "rate_limited"), ("g2", "healthy", "rate_limited")]
    untils = {k.key_id: k.until for k in pool.statistics().keys}
    assert untils["g1"] == untils["g2"] == pytest.approx(10.0 + 2737.0)


# --- a depleted account balance comes back by trial ---------------------------

# OpenRouter's GET /key for a key without its own cap: no balance in it.
REAL_KEY = {"data": {"label": "sk-or-v1-abc...", "limit": None, "limit_remaining": None}}


def test_a_depleted_balance_is_tried_again_after_a_probe() -> None:
    """``GET /key`` cannot show the balance (``limit: null``): a probe's 200 lets
    the key back for one trial request (a top-up is found without an operator;
    a 402 to the trial depletes the account again)."""
    pool = _pool(("a", "acc"), ("b", "acc"), recheck_interval=900.0)
    _answer(pool, 402, NEVER_PURCHASED)
    assert _states(pool) == {"a": "depleted", "b": "depleted"}
    out = pool.handle(ProbeFinished(key_id="a", now=1.0, status=200, body=json.dumps(REAL_KEY)))
    assert changes(out) == [("a", "depleted", "recovering")]
