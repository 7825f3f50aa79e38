"""Tests for keyrotor.core.classify: section 5 of upstream-apis.md, parsers, robustness."""

from __future__ import annotations

import ast
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keyrotor.core.classify as classify_module
from keyrotor.core.classify import (
    Classification,
    Verdict,
    classify_probe,
    classify_response,
    cooldown_from_headers,
    parse_duration,
    parse_retry_after,
)

V = Verdict
NOW = 1743600000.0  # 2025-04-02T13:20:00Z
MIDNIGHT_MS = 1743638400000  # 2025-04-03T00:00:00Z, OpenRouter's daily reset
TO_MIDNIGHT = 38400.0


def openrouter(code: int, message: str, **metadata: Any) -> dict[str, Any]:
    """An OpenRouter error body."""
    error: dict[str, Any] = {"code": code, "message": message}
    if metadata:
        error["metadata"] = metadata
    return {"error": error}


def openai(message: str, type_: str | None, code: str | None) -> dict[str, Any]:
    """An OpenAI error body."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def anthropic(type_: str, message: str) -> dict[str, Any]:
    """An Anthropic error body."""
    return {"type": "error", "error": {"type": type_, "message": message}, "request_id": "req_01"}


def gemini(code: int, status: str, message: str, *details: dict[str, Any]) -> list[Any]:
    """A Gemini error body, wrapped in a JSON array as some endpoints do."""
    return [
        {"error": {"code": code, "message": message, "status": status, "details": list(details)}}
    ]


OR_UPSTREAM_RAW = (
    "google/gemini-2.0-flash-exp:free is temporarily rate-limited upstream. Please retry "
    "shortly, or add your own key to accumulate your rate limits: "
    "https://openrouter.ai/settings/integrations"
)
OR_FREE_DAY_HEADERS = {
    "X-RateLimit-Limit": "50",
    "X-RateLimit-Remaining": "0",
    "X-RateLimit-Reset": str(MIDNIGHT_MS),
}
GEMINI_QUOTA_MSG = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits."
)

# (id, status, headers, body, verdict, account_wide, reason)
TABLE: list[tuple[str, int, dict[str, str], Any, Verdict, bool, str]] = [
    # 401 and Gemini's 400 API_KEY_INVALID: invalid
    ("or-401-user", 401, {}, openrouter(401, "User not found."), V.INVALID, False, "http_401"),
    (
        "or-401-noauth",
        401,
        {},
        openrouter(401, "No auth credentials found"),
        V.INVALID,
        False,
        "http_401",
    ),
    (
        "openai-401",
        401,
        {},
        openai(
            "Incorrect API key provided: sk-abc***xyz.", "invalid_request_error", "invalid_api_key"
        ),
        V.INVALID,
        False,
        "invalid_api_key",
    ),
    (
        "anthropic-401",
        401,
        {},
        anthropic("authentication_error", "invalid x-api-key"),
        V.INVALID,
        False,
        "authentication_error",
    ),
    (
        "gemini-400-key",
        400,
        {},
        gemini(
            400,
            "INVALID_ARGUMENT",
            "API key not valid. Please pass a valid API key.",
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
            },
        ),
        V.INVALID,
        False,
        "api_key_invalid",
    ),
    (
        "gemini-400-key-message-only",
        400,
        {},
        [{"error": {"code": 400, "message": "API key not valid. Please pass a valid API key."}}],
        V.INVALID,
        False,
        "api_key_invalid",
    ),
    # 402 / 403: depleted, in-flight, can only afford
    (
        "or-402-credits",
        402,
        {},
        openrouter(
            402,
            "Insufficient credits. Add more using https://openrouter.ai/settings/credits",
            limit_source="openrouter_credits",
        ),
        V.DEPLETED,
        True,
        "openrouter_credits",
    ),
    (
        "or-402-key-limit",
        402,
        {},
        openrouter(402, "Key limit exceeded", limit_source="openrouter_key_limit"),
        V.DEPLETED,
        False,
        "openrouter_key_limit",
    ),
    (
        "or-403-key-limit",
        403,
        {},
        openrouter(
            403,
            "Key limit exceeded (total limit). Manage it using https://openrouter.ai/settings/keys",
        ),
        V.DEPLETED,
        False,
        "openrouter_key_limit",
    ),
    (
        "or-402-in-flight",
        402,
        {},
        openrouter(
            402,
            "In-flight spending budget exhausted; retry shortly",
            limit_source="openrouter_in_flight_budget",
            reason="in_flight_budget_exhausted",
        ),
        V.RATE_LIMITED,
        False,
        "openrouter_in_flight_budget",
    ),
    (
        "or-402-in-flight-reason-only",
        402,
        {},
        openrouter(402, "Payment required", reason="in_flight_budget_exhausted"),
        V.RATE_LIMITED,
        False,
        "openrouter_in_flight_budget",
    ),
    (
        "or-402-afford",
        402,
        {},
        openrouter(
            402,
            "This request requires more credits, or fewer max_tokens. You requested up to "
            "16384 tokens, but can only afford 3512. To increase, visit "
            "https://openrouter.ai/settings/keys and create a key with a higher total limit",
        ),
        V.TRY_ANOTHER_KEY,
        False,
        "can_only_afford",
    ),
    (
        "anthropic-402-billing",
        402,
        {},
        anthropic("billing_error", "Your account has a billing issue."),
        V.DEPLETED,
        False,
        "billing_error",
    ),
    ("plain-402", 402, {}, b"Payment Required", V.DEPLETED, False, "http_402"),
    (
        "anthropic-400-low-credit",
        400,
        {},
        anthropic(
            "invalid_request_error",
            "Your credit balance is too low to access the Anthropic API. Please go to Plans & "
            "Billing to upgrade or purchase credits.",
        ),
        V.DEPLETED,
        False,
        "credit_balance_too_low",
    ),
    (
        "string-error-403",
        403,
        {},
        {"error": "Key limit exceeded (total limit)"},
        V.DEPLETED,
        False,
        "openrouter_key_limit",
    ),
    # 429: OpenRouter
    (
        "or-429-free-day",
        429,
        {},
        openrouter(
            429,
            "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free model "
            "requests per day",
            headers=OR_FREE_DAY_HEADERS,
            provider_name=None,
            limit_source="openrouter_free_tier_daily",
        ),
        V.RATE_LIMITED,
        True,
        "free-models-per-day",
    ),
    (
        "or-429-free-day-high-balance",
        429,
        {},
        openrouter(429, "Rate limit exceeded: free-models-per-day-high-balance."),
        V.RATE_LIMITED,
        True,
        "free-models-per-day-high-balance",
    ),
    (
        "or-429-free-tier-source-only",
        429,
        {},
        openrouter(429, "Rate limit exceeded", limit_source="openrouter_free_tier_daily"),
        V.RATE_LIMITED,
        True,
        "openrouter_free_tier_daily",
    ),
    (
        "or-429-free-min",
        429,
        {"Retry-After": "20"},
        openrouter(429, "Rate limit exceeded: free-models-per-min."),
        V.RATE_LIMITED,
        True,
        "free-models-per-min",
    ),
    (
        "or-429-limit-rpm",
        429,
        {},
        openrouter(429, "Rate limit exceeded: limit_rpm/google/gemini-2.5-pro-exp-03-25/abc"),
        V.RATE_LIMITED,
        True,
        "limit_rpm",
    ),
    (
        "or-429-limit-rpd",
        429,
        {},
        openrouter(429, "Rate limit exceeded: limit_rpd/deepseek/deepseek-r1:free/abc"),
        V.RATE_LIMITED,
        True,
        "limit_rpd",
    ),
    (
        "or-429-upstream",
        429,
        {},
        openrouter(
            429,
            "Provider returned error",
            raw=OR_UPSTREAM_RAW,
            provider_name="Google AI Studio",
            limit_source="upstream_provider_shared_pool",
        ),
        V.UPSTREAM_BUSY,
        False,
        "upstream_provider_shared_pool",
    ),
    (
        "or-429-upstream-raw-only",
        429,
        {},
        openrouter(429, "Provider returned error", raw=OR_UPSTREAM_RAW, provider_name="Chutes"),
        V.UPSTREAM_BUSY,
        False,
        "rate_limited_upstream",
    ),
    (
        "or-429-capacity",
        429,
        {},
        {
            "error": {
                "code": "429",
                "message": "All providers busy",
                "error_type": "capacity_exhausted",
            }
        },
        V.UPSTREAM_BUSY,
        False,
        "capacity_exhausted",
    ),
    (
        "or-429-provider-out-of-quota-in-raw",  # the provider's quota, not our key's
        429,
        {},
        openrouter(
            429,
            "Provider returned error",
            raw='{"error":{"type":"insufficient_quota","code":"insufficient_quota"}}',
        ),
        V.UPSTREAM_BUSY,
        False,
        "provider_rate_limited",
    ),
    # 429: OpenAI
    (
        "openai-429-rate",
        429,
        {},
        openai(
            "Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM): Limit "
            "30000, Used 29000, Requested 1500. Please try again in 1.5s. Visit "
            "https://platform.openai.com/account/rate-limits to learn more.",
            "tokens",
            "rate_limit_exceeded",
        ),
        V.RATE_LIMITED,
        False,
        "rate_limit_exceeded",
    ),
    (
        "openai-429-quota",
        429,
        {},
        openai(
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            "insufficient_quota",
        ),
        V.DEPLETED,
        False,
        "insufficient_quota",
    ),
    (
        "openai-429-quota-null-code",
        429,
        {},
        openai("You exceeded your current quota.", "insufficient_quota", None),
        V.DEPLETED,
        False,
        "insufficient_quota",
    ),
    *(
        (
            f"openai-429-{code}",
            429,
            {},
            openai("Billing limit reached.", "insufficient_quota", code),
            V.DEPLETED,
            False,
            code,
        )
        for code in (
            "credit_balance_exhausted",
            "organization_spend_limit_exceeded",
            "project_spend_limit_exceeded",
            "organization_usage_limit_exceeded",
        )
    ),
    (
        "openai-429-too-large",
        429,
        {},
        openai(
            "Request too large for gpt-4 in organization org-x on tokens per min (TPM): Limit "
            "10000, Requested 15000. The input or output tokens must be reduced.",
            "tokens",
            "rate_limit_exceeded",
        ),
        V.CALLER_ERROR,
        False,
        "request_too_large",
    ),
    # 429: Anthropic, Together, Gemini, unknown
    (
        "anthropic-429",
        429,
        {"retry-after": "30"},
        anthropic("rate_limit_error", "Number of request tokens has exceeded your rate limit."),
        V.RATE_LIMITED,
        False,
        "rate_limit_error",
    ),
    (
        "together-429",
        429,
        {},
        {"error": {"message": "over dynamic limit", "type": "dynamic_request_limited"}},
        V.RATE_LIMITED,
        False,
        "dynamic_request_limited",
    ),
    (
        "together-429-tokens",
        429,
        {},
        {"error": {"message": "over dynamic limit", "error_type": "dynamic_token_limited"}},
        V.RATE_LIMITED,
        False,
        "dynamic_token_limited",
    ),
    (
        "gemini-429",
        429,
        {},
        gemini(
            429,
            "RESOURCE_EXHAUSTED",
            GEMINI_QUOTA_MSG,
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [{"quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}],
            },
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "36s"},
        ),
        V.RATE_LIMITED,
        False,
        "resource_exhausted",
    ),
    ("bare-429", 429, {}, None, V.RATE_LIMITED, False, "http_429"),
    # caller faults
    (
        "or-400-context",
        400,
        {},
        openrouter(400, "This endpoint's maximum context length is 8192 tokens."),
        V.CALLER_ERROR,
        False,
        "http_400",
    ),
    (
        "or-403-moderation",
        403,
        {},
        openrouter(403, "Your input was flagged", reasons=["violence"], provider_name="OpenAI"),
        V.CALLER_ERROR,
        False,
        "http_403",
    ),
    (
        "or-403-region",
        403,
        {},
        {"error": {"code": 403, "message": "Region restricted", "error_type": "region_restricted"}},
        V.CALLER_ERROR,
        False,
        "http_403",
    ),
    (
        "or-404",
        404,
        {},
        openrouter(404, "No endpoints found for foo/bar."),
        V.MODEL_UNAVAILABLE,
        False,
        "no endpoints found",
    ),
    (
        "or-404-deprecated",
        404,
        {},
        {"error": {"code": 404, "message": "gone", "metadata": {"error_type": "model_deprecated"}}},
        V.MODEL_UNAVAILABLE,
        False,
        "model_deprecated",
    ),
    ("404-path", 404, {}, {"error": {"message": "Not found"}}, V.CALLER_ERROR, False, "http_404"),
    (
        "or-503-no-instances",
        503,
        {},
        openrouter(503, "No instances available for down/model."),
        V.MODEL_UNAVAILABLE,
        False,
        "no instances available",
    ),
    (
        "anthropic-413",
        413,
        {},
        anthropic("request_too_large", "Request exceeds the maximum size"),
        V.CALLER_ERROR,
        False,
        "http_413",
    ),
    ("422", 422, {}, {"detail": "unprocessable"}, V.CALLER_ERROR, False, "http_422"),
    ("409", 409, {}, None, V.CALLER_ERROR, False, "http_409"),
    ("302", 302, {"location": "https://x"}, None, V.CALLER_ERROR, False, "http_302"),
    # upstream faults
    ("408", 408, {}, openrouter(408, "Request timed out"), V.UPSTREAM_FAULT, False, "http_408"),
    *(
        (str(s), s, {}, openrouter(s, "err"), V.UPSTREAM_FAULT, False, f"http_{s}")
        for s in (500, 502, 503, 504, 524, 529)
    ),
    (
        "anthropic-529",
        529,
        {},
        anthropic("overloaded_error", "Overloaded"),
        V.UPSTREAM_FAULT,
        False,
        "http_529",
    ),
    (
        "together-503",
        503,
        {},
        {"error": {"message": "Service unavailable", "type": "service_unavailable"}},
        V.UPSTREAM_FAULT,
        False,
        "http_503",
    ),
    (
        "gemini-503",
        503,
        {},
        gemini(503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
        V.UPSTREAM_FAULT,
        False,
        "http_503",
    ),
    ("html-502", 502, {}, b"<html>Bad gateway</html>", V.UPSTREAM_FAULT, False, "http_502"),
    ("unknown-599", 599, {}, None, V.UPSTREAM_FAULT, False, "http_599"),
    ("1xx", 101, {}, None, V.UPSTREAM_FAULT, False, "http_101"),
    ("600", 600, {}, None, V.UPSTREAM_FAULT, False, "http_600"),
    ("0", 0, {}, None, V.UPSTREAM_FAULT, False, "http_0"),
]


@pytest.mark.parametrize(
    ("status", "headers", "body", "verdict", "account_wide", "reason"),
    [pytest.param(*row[1:], id=row[0]) for row in TABLE],
)
@pytest.mark.parametrize("encode", ["object", "text", "bytes"])
def test_table(
    status: int,
    headers: dict[str, str],
    body: Any,
    verdict: Verdict,
    account_wide: bool,
    reason: str,
    encode: str,
) -> None:
    if encode != "object" and body is not None and not isinstance(body, bytes):
        body = json.dumps(body)
        if encode == "bytes":
            body = body.encode()
    result = classify_response(status, headers, body, wall_time=NOW)
    assert (result.verdict, result.account_wide, result.reason) == (verdict, account_wide, reason)


def test_table_covers_every_verdict() -> None:
    assert {row[4] for row in TABLE} | {V.SUCCESS} == set(Verdict)


# --- cooldowns on errors ----------------------------------------------------


def cooldown(status: int, headers: dict[str, str] | None = None, body: Any = None) -> float | None:
    return classify_response(status, headers, body, wall_time=NOW).cooldown


def test_free_per_day_cools_until_reset_in_body_headers() -> None:
    body = openrouter(429, "Rate limit exceeded: free-models-per-day", headers=OR_FREE_DAY_HEADERS)
    assert cooldown(429, None, body) == TO_MIDNIGHT


def test_free_per_day_reset_in_real_headers_any_case() -> None:
    body = openrouter(429, "Rate limit exceeded: free-models-per-day")
    headers = {"x-ratelimit-remaining": "0", "X-RATELIMIT-RESET": str(MIDNIGHT_MS - 60_000)}
    assert cooldown(429, headers, body) == TO_MIDNIGHT - 60


def test_free_per_day_without_signal_cools_until_utc_midnight() -> None:
    body = openrouter(429, "Rate limit exceeded: free-models-per-day")
    assert cooldown(429, None, body) == TO_MIDNIGHT
    assert classify_response(429, None, body).cooldown is None  # no wall_time: unknown


def test_free_per_min_retry_after_or_a_minute() -> None:
    body = openrouter(429, "Rate limit exceeded: free-models-per-min.")
    assert cooldown(429, {"Retry-After": "7"}, body) == 7.0
    assert cooldown(429, None, body) == 60.0


def test_plain_429_without_signal_has_no_cooldown() -> None:
    assert cooldown(429, None, openai("slow down", "requests", "rate_limit_exceeded")) is None


def test_in_flight_402_cools_for_retry_after() -> None:
    body = openrouter(402, "budget", limit_source="openrouter_in_flight_budget")
    assert cooldown(402, {"Retry-After": "3"}, body) == 3.0
    assert cooldown(402, None, body) is None


def test_depleted_and_invalid_carry_no_cooldown() -> None:
    body = openrouter(402, "Insufficient credits", limit_source="openrouter_credits")
    assert cooldown(402, {"Retry-After": "30"}, body) is None
    assert cooldown(401, {"Retry-After": "30"}, None) is None


def test_upstream_fault_honours_retry_after() -> None:
    assert cooldown(503, {"Retry-After": "12"}, None) == 12.0
    assert cooldown(503, None, None) is None


def test_openrouter_availability_retry_after() -> None:
    body = {"error": {"code": 503, "message": "busy", "availability": {"retry_after": 9}}}
    assert cooldown(503, None, body) == 9.0


def test_openai_message_delay() -> None:
    for text, seconds in (("1.5s", 1.5), ("20ms", 0.02), ("6m0s", 360.0)):
        body = openai(f"Rate limit reached. Please try again in {text}. Visit x", "tokens", None)
        assert cooldown(429, None, body) == pytest.approx(seconds)


def test_gemini_retry_delay_and_message() -> None:
    retry = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "36s"}
    assert cooldown(429, None, gemini(429, "RESOURCE_EXHAUSTED", "quota", retry)) == 36.0
    message = "quota. Please retry in 40.5s."
    assert cooldown(429, None, gemini(429, "RESOURCE_EXHAUSTED", message, retry)) == 40.5


def test_429_longest_signal_wins() -> None:
    headers = {
        "retry-after": "2",
        "retry-after-ms": "2500",
        "x-ratelimit-remaining-requests": "0",  # exhausted: on a 429 its reset counts
        "x-ratelimit-reset-requests": "4s",
        "x-ratelimit-reset-tokens": "1m",
        "anthropic-ratelimit-tokens-reset": "2025-04-02T13:20:30Z",
    }
    body = openai("Please try again in 45s.", "tokens", "rate_limit_exceeded")
    assert cooldown(429, headers, body) == 60.0
    assert cooldown(429, headers, openai("Please try again in 90s.", "tokens", None)) == 90.0
    assert cooldown(429, {**headers, "Retry-After": "100"}, body) == 100.0


def test_a_429_waits_for_no_bucket_that_has_some_left() -> None:
    # Groq's documented 429 on tokens per minute: its requests bucket (per day)
    # has 14,370 left and resets in 3 minutes, which is no reason to wait.
    headers = {
        "retry-after": "2",
        "x-ratelimit-remaining-requests": "14370",
        "x-ratelimit-reset-requests": "2m59.56s",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "7.66s",
    }
    assert cooldown(429, headers, openai("Rate limit reached", "tokens", None)) == 7.66
    no_remaining = {"x-ratelimit-reset-requests": "30s"}  # nothing said left: it counts
    assert cooldown(429, no_remaining, None) == 30.0


def test_a_providers_429_relayed_by_openrouter_is_not_the_keys() -> None:
    relayed = openrouter(
        429, "Provider returned error", raw='{"detail":"Too many requests"}', provider_name="Chutes"
    )
    verdict = classify_response(429, {"Retry-After": "3"}, relayed, wall_time=NOW)
    assert (verdict.verdict, verdict.reason, verdict.cooldown) == (
        V.UPSTREAM_BUSY, "provider_rate_limited", 3.0
    )  # fmt: skip
    own = openrouter(429, "Rate limit exceeded: free-models-per-min. ")
    assert classify_response(429, None, own, wall_time=NOW).verdict is V.RATE_LIMITED


def test_caller_error_and_busy_keep_the_key_fine() -> None:
    busy = classify_response(
        429,
        {"Retry-After": "5"},
        openrouter(429, "x", limit_source="upstream_provider_shared_pool"),
        wall_time=NOW,
    )
    assert busy == Classification(
        verdict=V.UPSTREAM_BUSY, cooldown=5.0, reason="upstream_provider_shared_pool"
    )
    too_large = classify_response(429, {"Retry-After": "5"}, openai("Request too large", "t", None))
    assert too_large.cooldown is None


# --- 2xx --------------------------------------------------------------------


def test_plain_success_is_a_shared_constant() -> None:
    first = classify_response(200)
    assert first == Classification(verdict=V.SUCCESS)
    assert classify_response(204, {}) is first
    assert classify_response(200, {"content-type": "application/json"}, b"{}") is first
    assert classify_response(200, {"x-ratelimit-remaining-requests": "9"}) is first


def test_success_ignores_body_errors() -> None:
    body = openrouter(429, "Rate limit exceeded: free-models-per-day")
    assert classify_response(200, None, body).verdict is V.SUCCESS


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"}, 360.0),
        ({"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "6m0s"}, None),
        ({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "20ms"}, 0.02),
        ({"x-ratelimit-reset-tokens": "20ms"}, None),  # remaining unknown: not exhausted
        (
            {
                "anthropic-ratelimit-requests-remaining": "0",
                "anthropic-ratelimit-requests-reset": "2025-04-02T13:21:00Z",
                "anthropic-ratelimit-tokens-remaining": "500",
                "anthropic-ratelimit-tokens-reset": "2025-04-02T13:30:00Z",
            },
            60.0,
        ),
        ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(MIDNIGHT_MS)}, TO_MIDNIGHT),
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "0s"}, None),
    ],
)
def test_success_with_exhausted_bucket(headers: dict[str, str], expected: float | None) -> None:
    result = classify_response(200, headers, None, wall_time=NOW)
    assert result.verdict is V.SUCCESS
    assert result.cooldown == pytest.approx(expected)
    assert result.reason == ("bucket_exhausted" if expected else "")


# --- cooldown_from_headers --------------------------------------------------


def test_cooldown_from_headers_exhausted_only_switch() -> None:
    headers = {"x-ratelimit-remaining-tokens": "100", "x-ratelimit-reset-tokens": "1h2m3.5s"}
    assert cooldown_from_headers(headers) is None
    assert cooldown_from_headers(headers, exhausted_only=False) is None  # 100 left
    unsaid = {"x-ratelimit-reset-tokens": "1h2m3.5s"}  # how much is left, not said
    assert cooldown_from_headers(unsaid) is None
    assert cooldown_from_headers(unsaid, exhausted_only=False) == 3723.5


def test_cooldown_from_headers_retry_after_always_counts() -> None:
    assert cooldown_from_headers({"Retry-After-Ms": "1500"}) == 1.5
    assert cooldown_from_headers({"Retry-After": "3", "retry-after-ms": "1500"}) == 3.0
    assert cooldown_from_headers(None) is None
    assert cooldown_from_headers({}) is None


@pytest.mark.parametrize(
    ("reset", "wall_time", "expected"),
    [
        (str(MIDNIGHT_MS), NOW, TO_MIDNIGHT),  # epoch milliseconds
        (str(MIDNIGHT_MS // 1000), NOW, TO_MIDNIGHT),  # epoch seconds
        (str(MIDNIGHT_MS), None, None),  # absolute, no wall_time
        (str(MIDNIGHT_MS), MIDNIGHT_MS / 1000 + 5, 0.0),  # in the past: clamped
        ("2", None, 2.0),  # small: seconds from now (Together)
    ],
)
def test_epoch_reset(reset: str, wall_time: float | None, expected: float | None) -> None:
    headers = {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset}
    assert cooldown_from_headers(headers, wall_time=wall_time) == expected


@pytest.mark.parametrize(
    ("reset", "wall_time", "expected"),
    [
        ("2025-04-02T13:20:59Z", NOW, 59.0),
        ("2025-04-02T15:20:59+02:00", NOW, 59.0),
        ("2025-04-02T13:20:00.5Z", NOW, 0.5),
        ("2025-04-02t13:20:59z", NOW, 59.0),
        ("2025-04-02T13:19:00Z", NOW, 0.0),
        ("2025-04-02T13:20:59Z", None, None),
        ("not a time", NOW, None),
    ],
)
def test_rfc3339_reset(reset: str, wall_time: float | None, expected: float | None) -> None:
    headers = {
        "anthropic-ratelimit-output-tokens-remaining": "0",
        "anthropic-ratelimit-output-tokens-reset": reset,
    }
    assert cooldown_from_headers(headers, wall_time=wall_time) == expected


def test_anthropic_429_counts_the_buckets_that_are_used_up() -> None:
    # On a 429 Anthropic's retry-after gives the wait; a bucket with some left
    # (its reset is when it is full again) adds nothing, an empty one does.
    headers = {
        "retry-after": "10",
        "anthropic-ratelimit-input-tokens-remaining": "4000",
        "anthropic-ratelimit-input-tokens-reset": "2025-04-02T13:20:40Z",
    }
    body = anthropic("rate_limit_error", "rate limited")
    assert cooldown(429, headers, body) == 10.0
    empty = {**headers, "anthropic-ratelimit-input-tokens-remaining": "0"}
    assert cooldown(429, empty, body) == 40.0
    assert cooldown_from_headers(headers, wall_time=NOW) == 10.0


# --- parsers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "wall_time", "expected"),
    [
        ("120", None, 120.0),
        (" 1.5 ", None, 1.5),
        ("0", None, 0.0),
        ("Wed, 02 Apr 2025 13:21:00 GMT", NOW, 60.0),
        ("Wed, 02 Apr 2025 13:21:00 -0000", NOW, 60.0),
        ("Wed, 02 Apr 2025 13:21:00 GMT", None, None),
        ("Wed, 02 Apr 2025 13:00:00 GMT", NOW, 0.0),
        ("soon", NOW, None),
        ("", NOW, None),
        ("1e3", None, None),
        ("inf", None, None),
        ("9" * 400, None, None),
    ],
)
def test_parse_retry_after(value: str, wall_time: float | None, expected: float | None) -> None:
    assert parse_retry_after(value, wall_time=wall_time) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("12ms", 0.012),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("1.5s", 1.5),
        ("250us", 0.00025),
        ("250µs", 0.00025),
        ("500ns", 5e-7),
        ("2h", 7200.0),
        ("36", 36.0),
        ("0", 0.0),
        ("-1s", 0.0),
        ("", None),
        ("s", None),
        ("1x", None),
        ("1s garbage", None),
        ("m1s", None),
        ("nan", None),
        ("1" * 400 + "s", None),
    ],
)
def test_parse_duration(value: str, expected: float | None) -> None:
    assert parse_duration(value) == pytest.approx(expected)


# --- probes -----------------------------------------------------------------


def key_info(**fields: Any) -> dict[str, Any]:
    data = {"label": "sk-or-v1-abc...", "limit": 10.0, "usage": 2.5, "is_free_tier": False}
    return {"data": {**data, **fields}}


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (
            200,
            key_info(limit_remaining=0),
            Classification(verdict=V.DEPLETED, reason="key_limit_reached"),
        ),
        (
            200,
            key_info(limit_remaining=-0.3),
            Classification(verdict=V.DEPLETED, reason="key_limit_reached"),
        ),
        (200, key_info(limit_remaining=7.5), Classification(verdict=V.SUCCESS)),
        (200, key_info(limit=None, limit_remaining=None), Classification(verdict=V.SUCCESS)),
        (200, key_info(limit_remaining="0"), Classification(verdict=V.SUCCESS)),
        (200, key_info(limit_remaining=True), Classification(verdict=V.SUCCESS)),
        (
            200,
            {"data": {"total_credits": 10, "total_usage": 10.5}},
            Classification(verdict=V.DEPLETED, account_wide=True, reason="openrouter_credits"),
        ),
        (200, {"data": {"total_credits": 10, "total_usage": 3}}, Classification(verdict=V.SUCCESS)),
        (200, b"not json", Classification(verdict=V.SUCCESS)),
        (200, {"data": [1, 2]}, Classification(verdict=V.SUCCESS)),
        (
            401,
            openrouter(401, "User not found."),
            Classification(verdict=V.INVALID, reason="http_401"),
        ),
        (
            402,
            openrouter(402, "Insufficient credits", limit_source="openrouter_credits"),
            Classification(verdict=V.DEPLETED, account_wide=True, reason="openrouter_credits"),
        ),
    ],
)
def test_classify_probe(status: int, body: Any, expected: Classification) -> None:
    assert classify_probe(status, None, body) == expected
    if not isinstance(body, bytes):
        assert classify_probe(status, None, json.dumps(body).encode()) == expected


# --- robustness -------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xff\xfe\x00garbage",
        "[",
        "[]",
        "[1]",
        "null",
        '"just a string"',
        '{"error": null}',
        '{"error": "rate limited"}',
        '{"error": ["x"]}',
        '{"error": {"metadata": "x", "details": "y", "availability": 3}}',
        '{"error": {"metadata": {"headers": ["x"], "raw": {"a": 1}}}}',
        '{"error": {"availability": {"retry_after": 1e999}}}',
        '{"error": {"availability": {"retry_after": ' + "9" * 1000 + "}}}",
        "[" * 100_000,
        '{"error": {"message": "' + "try again in 1" * 10_000 + '"}}',
        {1: 2, None: [3]},
        object(),
    ],
)
@pytest.mark.parametrize("status", [400, 402, 403, 429, 503])
def test_malformed_bodies_fall_back_to_status(status: int, body: Any) -> None:
    result = classify_response(status, {"retry-after": "x"}, body, wall_time=NOW)
    expected = {400: V.CALLER_ERROR, 402: V.DEPLETED, 403: V.CALLER_ERROR}
    assert result.verdict is expected.get(status, result.verdict)
    assert result.cooldown is None or (math.isfinite(result.cooldown) and result.cooldown >= 0)


def test_numeric_header_values_in_body() -> None:
    body = openrouter(
        429,
        "Rate limit exceeded: free-models-per-day",
        headers={"X-RateLimit-Remaining": 0, "X-RateLimit-Reset": MIDNIGHT_MS - 60_000, 7: "x"},
    )
    assert cooldown(429, None, body) == TO_MIDNIGHT - 60


@pytest.fixture
def local_time_not_utc() -> Iterator[None]:
    """Run with a local time zone far from UTC, so naive datetimes would be misread."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "IST-5:30"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


@pytest.mark.usefixtures("local_time_not_utc")
def test_times_without_offset_are_utc() -> None:
    assert parse_retry_after("Wed, 02 Apr 2025 13:21:00 -0000", wall_time=NOW) == 60.0
    headers = {
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": "2025-04-02T13:21:00",
    }
    assert cooldown_from_headers(headers, wall_time=NOW) == 60.0


def test_module_imports_only_pure_stdlib_and_attrs() -> None:
    allowed = {
        "__future__",
        "json",
        "re",
        "math",
        "enum",
        "email.utils",
        "datetime",
        "collections.abc",
        "typing",
        "attrs",
    }
    source = Path(classify_module.__file__).read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported and imported <= allowed
    assert ".now(" not in source


def test_non_finite_wall_time_is_ignored() -> None:
    headers = {"retry-after": "Wed, 02 Apr 2025 13:21:00 GMT"}
    assert cooldown_from_headers(headers, wall_time=math.nan) is None
    assert cooldown_from_headers(headers, wall_time=math.inf) is None


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(
        [
            "insufficient_quota",
            "free-models-per-day",
            "Please try again in 1.5s",
            "36s",
            "1743638400000",
            "2025-04-02T13:21:00Z",
            "Wed, 02 Apr 2025 13:21:00 GMT",
        ]
    ),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "error",
                    "metadata",
                    "headers",
                    "availability",
                    "retry_after",
                    "details",
                    "retryDelay",
                    "message",
                    "code",
                    "type",
                    "raw",
                    "limit_source",
                    "data",
                    "limit_remaining",
                    "X-RateLimit-Reset",
                ]
            )
            | st.text(max_size=10),
            children,
            max_size=5,
        )
    ),
    max_leaves=30,
)
header_names = st.sampled_from(
    [
        "retry-after",
        "Retry-After-Ms",
        "x-ratelimit-reset",
        "x-ratelimit-remaining",
        "x-ratelimit-reset-tokens",
        "x-ratelimit-remaining-tokens",
        "anthropic-ratelimit-tokens-reset",
        "anthropic-ratelimit-tokens-remaining",
    ]
) | st.text(max_size=20)
header_values = st.sampled_from(["0", "1.5", "6m0s", "1743638400000", "-3"]) | st.text(max_size=40)
bodies = (
    st.none()
    | st.binary(max_size=200)
    | st.text(max_size=200)
    | json_values
    | json_values.map(json.dumps)
    | json_values.map(lambda v: json.dumps(v).encode())
)


@settings(max_examples=500, deadline=None)
@given(
    status=st.integers(100, 599),
    headers=st.none() | st.dictionaries(header_names, header_values, max_size=6),
    body=bodies,
    wall_time=st.none() | st.floats(allow_nan=True, allow_infinity=True),
    probe=st.booleans(),
)
def test_never_raises(
    status: int,
    headers: dict[str, str] | None,
    body: object,
    wall_time: float | None,
    probe: bool,
) -> None:
    classify = classify_probe if probe else classify_response
    result = classify(status, headers, body, wall_time=wall_time)
    assert isinstance(result, Classification)
    assert result.cooldown is None or (
        isinstance(result.cooldown, float)
        and math.isfinite(result.cooldown)
        and result.cooldown >= 0
    )
    assert result.reason or result.verdict is V.SUCCESS
    if 200 <= status < 300:
        assert result.verdict in (V.SUCCESS, V.DEPLETED)


@settings(max_examples=300, deadline=None)
@given(value=st.text(max_size=40), wall_time=st.none() | st.floats())
def test_parsers_never_raise(value: str, wall_time: float | None) -> None:
    for result in (parse_duration(value), parse_retry_after(value, wall_time=wall_time)):
        assert result is None or (math.isfinite(result) and result >= 0)


def test_every_limit_header_the_classifier_reads_has_a_known_prefix() -> None:
    """Drivers pass a 2xx's headers to the core only when one starts with a
    prefix of ``LIMIT_HEADER_PREFIXES``: a header read here must have one."""
    from keyrotor.core.classify import _SIGNALS, LIMIT_HEADER_PREFIXES

    names = [name for name, _, _ in _SIGNALS] + [r for _, r, _ in _SIGNALS if r is not None]
    assert names and all(name.startswith(LIMIT_HEADER_PREFIXES) for name in names)
