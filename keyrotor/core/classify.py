"""What an upstream HTTP response means for the key that sent it.

Pure functions: status, headers and body in, a :class:`Classification` out. The
rules follow ``upstream-apis.md`` section 5 and live in one table, :data:`_RULES`.

Time is an input: ``wall_time`` is the Unix time at which the response arrived.
It turns absolute times (an HTTP-date ``Retry-After``, OpenRouter's epoch
``X-RateLimit-Reset``, Anthropic's RFC 3339 resets) into durations; without it,
absolute forms are ignored. Durations are seconds, finite and never negative.

Scope notes:

* 2xx bodies are never read. An error that arrives inside a 2xx (OpenRouter's
  mid-stream ``error`` chunk) is classified by passing its ``error.code`` as the
  status, the chunk as the body and ``mid_stream=True``.
* 3xx is passed through like a caller error (the proxy does not follow
  redirects); 1xx, statuses below 100 and anything unrecognised at or above 500
  are upstream faults. Generic reasons are ``"http_<status>"``.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

import attrs

__all__ = [
    "Classification",
    "Verdict",
    "classify_probe",
    "classify_response",
    "cooldown_from_headers",
    "parse_duration",
    "parse_retry_after",
]


class Verdict(enum.Enum):
    """What a response means for the request and for the key that sent it."""

    SUCCESS = "success"
    """2xx: deliver; the key is fine."""
    CALLER_ERROR = "caller_error"
    """The request's own fault (bad request, moderation, model not found, too large): deliver."""
    UPSTREAM_BUSY = "upstream_busy"
    """The provider's shared pool is rate-limited: another key won't help; deliver."""
    RATE_LIMITED = "rate_limited"
    """The key's (or account's) rate limit: retry on another key; cool this one."""
    DEPLETED = "depleted"
    """Out of credits, quota or spending cap: retry elsewhere; park the key."""
    INVALID = "invalid"
    """The key itself was rejected: retry elsewhere; the key fails (once confirmed)."""
    UPSTREAM_FAULT = "upstream_fault"
    """408, 5xx, overload: retry elsewhere; not the key's fault by itself."""
    TRY_ANOTHER_KEY = "try_another_key"
    """This request is too expensive for this key's balance: retry elsewhere, key unchanged."""
    MODEL_UNAVAILABLE = "model_unavailable"
    """The model cannot serve now (no endpoints, deprecated, no provider up): another
    key won't help, another model may; deliver, key unchanged."""


@attrs.frozen(kw_only=True)
class Classification:
    """The verdict on one response, with the rest and scope it implies."""

    verdict: Verdict
    """What the response means."""
    cooldown: float | None = None
    """Seconds from the response's arrival the key (or account) must rest, as a floor.

    None: the upstream gave no signal (the pool uses its default). For
    ``UPSTREAM_BUSY`` and ``UPSTREAM_FAULT`` it is the upstream's retry hint, not a
    penalty on the key.
    """
    account_wide: bool = False
    """The limit applies to every key of the same account."""
    shared_budget: bool = False
    """``TRY_ANOTHER_KEY``: the budget this request is too large for is the account's
    balance, shared by its keys (not the key's own cap): no key of the same account
    can serve it either."""
    reason: str = ""
    """Short machine-friendly reason, e.g. ``"free-models-per-day"`` or ``"http_503"``."""


_Fallback = Callable[[float | None], float | None]
"""A cooldown computed from ``wall_time`` when the upstream gave no signal."""


def _a_minute(wall_time: float | None) -> float:
    """Per-minute limits with no hint: back off a full minute."""
    return 60.0


def _until_utc_midnight(wall_time: float | None) -> float | None:
    """Per-day limits with no hint: rest until the next 00:00 UTC (needs ``wall_time``)."""
    if wall_time is None or not math.isfinite(wall_time):
        return None
    return 86400.0 - wall_time % 86400.0


def _nth_sunday(year: int, month: int, n: int) -> int:
    """The day of the month of its ``n``-th Sunday."""
    return 1 + (6 - datetime(year, month, 1).weekday()) % 7 + 7 * (n - 1)


def _pacific_daylight(wall_time: float) -> bool:
    """Is California on daylight time at ``wall_time``? (US rules since 2007: from
    the second Sunday of March, 02:00 PST, to the first Sunday of November, 02:00 PDT.)"""
    year = datetime.fromtimestamp(wall_time, UTC).year
    start = datetime(year, 3, _nth_sunday(year, 3, 2), 10, tzinfo=UTC).timestamp()
    end = datetime(year, 11, _nth_sunday(year, 11, 1), 9, tzinfo=UTC).timestamp()
    return start <= wall_time < end


def _until_pacific_midnight(wall_time: float | None) -> float | None:
    """Gemini's per-day quotas reset at midnight Pacific time: the wait until the
    next one (needs ``wall_time``)."""
    if wall_time is None or not math.isfinite(wall_time):
        return None
    try:
        behind = 7 * 3600 if _pacific_daylight(wall_time) else 8 * 3600
        midnight = ((wall_time - behind) // 86400.0 + 1) * 86400.0  # local, as if UTC
        reset = midnight + 8 * 3600  # no clock change lies within two hours of a midnight
        if _pacific_daylight(reset):
            reset -= 3600
    except (ValueError, OverflowError, OSError):
        return None
    return reset - wall_time


@attrs.frozen
class _Rule:
    """If any needle occurs in the error text (or any fact holds), the response
    gets this verdict."""

    verdict: Verdict
    needles: tuple[str, ...]
    """Lowercase substrings of the error's codes and messages."""
    reason: str = ""
    """The reason to report; empty means the needle (or fact) that matched."""
    account_wide: bool = False
    fallback: _Fallback | None = None
    """The cooldown when the upstream gave no time."""
    reset: _Fallback | None = None
    """A per-day limit's reset: the cooldown whatever shorter time the upstream
    gave (its retry hint is the per-minute one); unknown: the pool's default."""
    raw: bool = False
    """Also search OpenRouter's ``metadata.raw`` (the provider's own error text)."""
    facts: tuple[str, ...] = ()
    """Facts about the response's shape (``_facts``), any of which matches too."""
    budget: bool | None = None
    """A 402 that only this request is too large for: is the budget the account's
    balance (True) or the key's own cap (False) when the body does not say
    (``_accounts_balance``)? None: not such a rule."""


_MID_STREAM: Final = "mid_stream"
"""A 429 inside a 200 (after the first token), without OpenRouter's own
``X-RateLimit-*`` headers: OpenRouter checks its limits before any work
begins, so it is the provider's."""
_PROVIDER: Final = "provider_error"
"""``metadata.provider_code`` or ``provider_name`` set, without OpenRouter's own
``X-RateLimit-*`` headers: a provider's error that OpenRouter relays."""
_PER_DAY: Final = "quota_per_day"
"""Gemini's ``QuotaFailure`` names a ``...PerDay...`` quota."""
_PLATFORM_HEADERS: Final = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")
"""Headers OpenRouter sends on its own (platform) 429s."""


_V = Verdict
_RULES: Final[Mapping[int, tuple[_Rule, ...]]] = {
    400: (
        _Rule(_V.INVALID, ("api_key_invalid", "api key not valid"), "api_key_invalid"),
        _Rule(_V.DEPLETED, ("credit balance is too low",), "credit_balance_too_low"),
    ),
    401: (_Rule(_V.INVALID, ("invalid_api_key", "authentication_error")),),
    402: (
        _Rule(
            _V.RATE_LIMITED,
            ("openrouter_in_flight_budget", "in_flight_budget_exhausted"),
            "openrouter_in_flight_budget",
        ),
        # This request is too large for what is left (the balance or the key's
        # cap is still positive): another key may serve it, smaller ones still fit.
        # Whose budget: ``_accounts_balance``. The in-flight budget is capped
        # against the account's balance.
        _Rule(_V.TRY_ANOTHER_KEY, ("can only afford",), "can_only_afford", budget=False),
        _Rule(_V.TRY_ANOTHER_KEY, ("weight_exceeds_budget",), budget=True),
        _Rule(
            _V.TRY_ANOTHER_KEY,
            ("token capacity required", "more credits are required to run this request"),
            "token_capacity",
            budget=False,
        ),
        _Rule(_V.DEPLETED, ("openrouter_key_limit",)),
        _Rule(_V.DEPLETED, ("openrouter_credits",), account_wide=True),
        _Rule(_V.DEPLETED, ("insufficient credits",), "insufficient_credits", account_wide=True),
        _Rule(_V.DEPLETED, ("billing_error",)),
    ),
    403: (
        _Rule(_V.DEPLETED, ("key limit exceeded", "openrouter_key_limit"), "openrouter_key_limit"),
    ),
    404: (
        _Rule(
            _V.MODEL_UNAVAILABLE,
            (
                "no_endpoints",
                "no endpoints found",
                "model_deprecated",
                "has been deprecated",
                "free_variant_ended",
                "model_not_found",
                "model not found",
                "does not exist",
            ),
        ),
    ),
    429: (
        _Rule(_V.UPSTREAM_BUSY, ("upstream_provider_shared_pool", "capacity_exhausted")),
        _Rule(_V.UPSTREAM_BUSY, ("rate-limited upstream",), "rate_limited_upstream", raw=True),
        # OpenRouter relaying a provider's own 429: the provider's limit, shared
        # by everyone its traffic goes to (switching keys won't help).
        _Rule(_V.UPSTREAM_BUSY, ("provider returned error",), "provider_rate_limited"),
        _Rule(
            _V.DEPLETED,
            (
                "credit_balance_exhausted",
                "organization_spend_limit_exceeded",
                "project_spend_limit_exceeded",
                "organization_usage_limit_exceeded",
                "insufficient_quota",
            ),
        ),
        _Rule(_V.CALLER_ERROR, ("request too large",), "request_too_large"),
        _Rule(
            _V.RATE_LIMITED,
            (
                "free-models-per-day-high-balance",
                "free-models-per-day",
                "openrouter_free_tier_daily",
            ),
            account_wide=True,
            fallback=_until_utc_midnight,
        ),
        _Rule(
            _V.RATE_LIMITED,
            ("limit_rpd/",),
            "limit_rpd",
            account_wide=True,
            fallback=_until_utc_midnight,
        ),
        _Rule(_V.RATE_LIMITED, ("free-models-per-min",), account_wide=True, fallback=_a_minute),
        _Rule(_V.RATE_LIMITED, ("limit_rpm/",), "limit_rpm", account_wide=True, fallback=_a_minute),
        _Rule(_V.RATE_LIMITED, ("openrouter_free_tier",), account_wide=True),
        _Rule(
            _V.RATE_LIMITED,
            (),
            _PER_DAY,
            account_wide=True,  # Gemini's quotas are the project's
            reset=_until_pacific_midnight,
            facts=(_PER_DAY,),
        ),
        # A provider's own 429, relayed: not our key's limit (switching keys won't help).
        _Rule(_V.UPSTREAM_BUSY, (), "provider_rate_limited", facts=(_PROVIDER, _MID_STREAM)),
        _Rule(
            _V.RATE_LIMITED,
            (
                "dynamic_request_limited",
                "dynamic_token_limited",
                "rate_limit_error",
                "resource_exhausted",
                "rate_limit_exceeded",
            ),
        ),
    ),
    503: (
        _Rule(
            _V.MODEL_UNAVAILABLE,
            (
                "no instances available",
                "no provider available",
                "no available provider",
                "model_unavailable",
            ),
        ),
    ),
}
"""Per status, the rules tried in order; the first needle found wins."""

_DEFAULTS: Final[Mapping[int, Verdict]] = {
    401: _V.INVALID,
    402: _V.DEPLETED,
    408: _V.UPSTREAM_FAULT,
    429: _V.RATE_LIMITED,
}
"""Verdicts when no rule matches; other 3xx/4xx are caller errors, the rest faults."""

_WITH_COOLDOWN: Final = frozenset(
    {_V.RATE_LIMITED, _V.UPSTREAM_BUSY, _V.UPSTREAM_FAULT, _V.MODEL_UNAVAILABLE}
)
"""Verdicts that carry a cooldown (or retry hint)."""

_SUCCESS: Final = Classification(verdict=_V.SUCCESS)
_KEY_LIMIT_REACHED: Final = Classification(verdict=_V.DEPLETED, reason="key_limit_reached")
_NO_CREDITS: Final = Classification(
    verdict=_V.DEPLETED, account_wide=True, reason="openrouter_credits"
)

_NUMBER: Final = re.compile(r"\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\s*")
_DURATION_PART: Final = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION: Final = re.compile(rf"([+-]?)((?:{_DURATION_PART.pattern})+)")
_NANOS: Final[Mapping[str, float]] = {
    "h": 3.6e12,
    "m": 6e10,
    "s": 1e9,
    "ms": 1e6,
    "us": 1e3,
    "µs": 1e3,
    "μs": 1e3,
    "ns": 1.0,
}
_TRY_AGAIN: Final = re.compile(r"(?:try again|retry) in ([0-9][0-9a-zµμ.]*)")
"""OpenAI's "Please try again in 1.5s", Gemini's "Please retry in 36.2s"."""

_KEY_CAP_HINTS: Final = ("settings/keys", "key with a higher")
"""OpenRouter's 402 text when the key's own cap is short ("To increase, visit
https://openrouter.ai/settings/keys and create a key with a higher total limit")."""
_BALANCE_HINTS: Final = ("settings/credits", "add more credits", "upgrade to a paid account")
"""Its text when the account's balance is short ("... visit
https://openrouter.ai/settings/credits and add more credits")."""

_TEXT_KEYS: Final = ("message", "type", "code", "status", "error_type", "reason", "limit_source")
"""String fields of an error body searched for needles.

``metadata.raw`` is kept apart: it is the provider's error, which says nothing about
our key (a provider out of quota must not park it), so only rules marked ``raw`` read it.
"""


# --- numbers and times -------------------------------------------------------


def _clamp(seconds: float) -> float | None:
    """``seconds`` clamped at 0.0, or None if it is not finite."""
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _number(value: str) -> float | None:
    """A plain decimal number (no exponent, inf or nan), or None."""
    match = _NUMBER.fullmatch(value)
    return float(match[1]) if match else None


def _until(timestamp: float, wall_time: float | None) -> float | None:
    """Seconds from ``wall_time`` to ``timestamp``, or None without a usable wall_time."""
    if wall_time is None or not math.isfinite(wall_time):
        return None
    return _clamp(timestamp - wall_time)


def _until_datetime(when: datetime, wall_time: float | None) -> float | None:
    """Seconds from ``wall_time`` to ``when`` (naive means UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return _until(when.timestamp(), wall_time)


def _longest(waits: Iterable[float | None]) -> float | None:
    """The longest of the waits that are known, or None."""
    return max((w for w in waits if w is not None), default=None)


def parse_duration(value: str) -> float | None:
    """Seconds in a Go-style duration (``6m0s``, ``20ms``, ``1h2m3.5s``) or a plain number.

    Units ``h m s ms us µs ns``; a leading ``-`` clamps to 0.0. None on garbage.
    """
    text = value.strip().lower()
    seconds = _number(text)
    if seconds is not None:
        return _clamp(seconds)
    match = _DURATION.fullmatch(text)
    if match is None:
        return None
    nanos = sum(float(n) * _NANOS[unit] for n, unit in _DURATION_PART.findall(match[2]))
    return _clamp(-nanos / 1e9 if match[1] == "-" else nanos / 1e9)


def parse_retry_after(value: str, *, wall_time: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delta-seconds or an HTTP-date.

    An HTTP-date needs ``wall_time``; without it, or on garbage, None.
    """
    seconds = _number(value)
    if seconds is not None:
        return _clamp(seconds)
    if wall_time is None:
        return None
    when = _parse_http_date(value)
    return None if when is None else _until_datetime(when, wall_time)


_MONTHS: Final = {
    m: i
    for i, m in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1
    )
}
# IMF-fixdate "Sun, 06 Nov 1994 08:49:37 GMT", RFC 850 "Sunday, 06-Nov-94 08:49:37 GMT"
# and asctime "Sun Nov  6 08:49:37 1994" (RFC 9110, section 5.6.7).
_HTTP_DATE: Final = re.compile(
    r"^\s*(?:[a-z]+,?\s+)?(?:"
    r"(?P<d1>\d{1,2})[\s-](?P<m1>[a-z]{3})[\s-](?P<y1>\d{2,4})"
    r"|(?P<m2>[a-z]{3})\s+(?P<d2>\d{1,2})(?=\s+\d{1,2}:)"
    r")\s+(?P<t>\d{1,2}:\d{2}:\d{2})(?:\s+(?P<y2>\d{4}))?\s*(?:gmt|utc|ut|z|[+-]0000)?\s*$",
    re.IGNORECASE,
)


def _parse_http_date(value: str) -> datetime | None:
    """An HTTP-date in any of its three forms, as an aware UTC datetime (stdlib's
    email.utils would pull in the socket module)."""
    match = _HTTP_DATE.match(value)
    if match is None:
        return None
    day, month, year = (
        (match["d1"], match["m1"], match["y1"])
        if match["d1"]
        else (match["d2"], match["m2"], match["y2"])
    )
    if year is None or month.lower() not in _MONTHS:
        return None
    full_year = int(year)
    if len(year) == 2:
        full_year += 2000 if full_year < 70 else 1900
    hour, minute, second = (int(part) for part in match["t"].split(":"))
    try:
        return datetime(
            full_year, _MONTHS[month.lower()], int(day), hour, minute, second, tzinfo=UTC
        )
    except ValueError:
        return None


def _epoch_reset(value: str, wall_time: float | None) -> float | None:
    """``X-RateLimit-Reset``: epoch ms (OpenRouter), epoch s (< 1e11) or, below 1e9, a delta."""
    number = _number(value)
    if number is None:
        return parse_duration(value)
    if number < 1e9:
        return _clamp(number)
    return _until(number if number < 1e11 else number / 1000.0, wall_time)


def _rfc3339_reset(value: str, wall_time: float | None) -> float | None:
    """Anthropic's ``anthropic-ratelimit-*-reset``: an RFC 3339 timestamp."""
    try:
        return _until_datetime(datetime.fromisoformat(value.strip().upper()), wall_time)
    except (ValueError, OverflowError):
        return None


def _retry_after_header(value: str, wall_time: float | None) -> float | None:
    """``Retry-After``: delta-seconds or an HTTP-date."""
    return parse_retry_after(value, wall_time=wall_time)


def _retry_after_ms(value: str, wall_time: float | None) -> float | None:
    """``retry-after-ms``: milliseconds."""
    number = _number(value)
    return None if number is None else _clamp(number / 1000.0)


def _go_duration(value: str, wall_time: float | None) -> float | None:
    """OpenAI/Groq ``x-ratelimit-reset-*``: a Go-style duration."""
    return parse_duration(value)


_Parser = Callable[[str, float | None], float | None]
_SIGNALS: Final[tuple[tuple[str, str | None, _Parser], ...]] = (
    ("retry-after-ms", None, _retry_after_ms),
    ("retry-after", None, _retry_after_header),
    ("x-ratelimit-reset", "x-ratelimit-remaining", _epoch_reset),
    ("x-ratelimit-reset-requests", "x-ratelimit-remaining-requests", _go_duration),
    ("x-ratelimit-reset-tokens", "x-ratelimit-remaining-tokens", _go_duration),
    *(
        (f"anthropic-ratelimit-{b}-reset", f"anthropic-ratelimit-{b}-remaining", _rfc3339_reset)
        for b in ("requests", "tokens", "input-tokens", "output-tokens")
    ),
)
"""(header, its bucket's remaining header or None if it always counts, parser)."""
LIMIT_HEADER_PREFIXES: Final = ("retry-after", "x-ratelimit", "anthropic-ratelimit")
"""Every header ``cooldown_from_headers`` reads starts with one of these (lowercase):
a 2xx without any says nothing of its key's limits."""


def _exhausted(remaining: Any) -> bool:
    """A bucket's ``remaining`` value says nothing is left."""
    try:
        return float(remaining) <= 0
    except (TypeError, ValueError, OverflowError):
        return False


def _text(value: object) -> str | None:
    """A header value as text: strings as they are, JSON numbers spelled out."""
    if isinstance(value, str):
        return value
    number = _as_float(value)
    return None if number is None else f"{number:f}"


def _lower(headers: Mapping[Any, Any]) -> dict[Any, Any]:
    """The headers with lowercased names (names that are not text are dropped)."""
    try:
        return {k.lower(): v for k, v in headers.items()}
    except AttributeError:
        return {k.lower(): v for k, v in headers.items() if isinstance(k, str)}


def cooldown_from_headers(
    headers: Mapping[str, str] | None,
    *,
    wall_time: float | None = None,
    exhausted_only: bool = True,
) -> float | None:
    """The longest wait the headers imply, in seconds, or None if they imply none.

    ``retry-after-ms`` and ``retry-after`` always count. A bucket's reset
    (``x-ratelimit-reset[-requests|-tokens]``, ``anthropic-ratelimit-*-reset``)
    counts only when its ``remaining`` is 0, unless ``exhausted_only`` is False:
    pass False for a 429, where a bucket's reset counts unless its
    ``remaining`` says some is left (a 429 on tokens per minute does not wait
    for the requests-per-day bucket's reset).
    """
    if not headers:
        return None
    lower = _lower(headers)
    longest = None
    for name, remaining, parse in _SIGNALS:
        if name not in lower:
            continue
        if remaining is not None:
            left = lower.get(remaining)
            if (exhausted_only or left is not None) and not _exhausted(left):
                continue
        value = _text(lower[name])
        wait = None if value is None else parse(value, wall_time)
        if wait is not None and (longest is None or wait > longest):
            longest = wait
    return longest


# --- bodies ------------------------------------------------------------------


def _load(body: object) -> object:
    """The body as parsed JSON, if it is bytes or text; None if that fails."""
    if not isinstance(body, bytes | bytearray | str):
        return body
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _parts(doc: object) -> list[dict[Any, Any]]:
    """The dicts of an error body that carry meaning.

    The top level, ``error`` (or a string ``error`` as a message), its
    ``metadata`` and ``availability``, and Gemini's ``details``. A JSON array
    (Gemini) is read through its first element.
    """
    if isinstance(doc, list):
        doc = doc[0] if doc else None
    if not isinstance(doc, dict):
        return []
    parts = [doc]
    error = doc.get("error")
    if isinstance(error, str):
        parts.append({"message": error})
    elif isinstance(error, dict):
        parts.append(error)
        parts.extend(p for k in ("metadata", "availability") if isinstance(p := error.get(k), dict))
        details = error.get("details")
        if isinstance(details, list):
            parts.extend(d for d in details if isinstance(d, dict))
    return parts


def _haystack(parts: list[dict[Any, Any]], keys: tuple[str, ...]) -> str:
    """The lowercased string fields ``keys`` of the parts, one per line."""
    return "\n".join(v.lower() for part in parts for k in keys if isinstance(v := part.get(k), str))


def _as_float(value: object) -> float | None:
    """A JSON number as a float; None for anything else (bools, huge ints)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return None
    return None


def _seconds(value: object, wall_time: float | None) -> float | None:
    """A ``retry_after`` field: a JSON number of seconds or a Retry-After string."""
    if isinstance(value, str):
        return parse_retry_after(value, wall_time=wall_time)
    number = _as_float(value)
    return None if number is None else _clamp(number)


def _body_waits(
    parts: list[dict[Any, Any]],
    texts: tuple[str, str],
    wall_time: float | None,
    exhausted_only: bool,
) -> Iterable[float | None]:
    """Every wait the body implies: ``metadata.headers``, ``retry_after``, ``retryDelay``, text."""
    for part in parts:
        headers = part.get("headers")
        if isinstance(headers, Mapping):
            yield cooldown_from_headers(headers, wall_time=wall_time, exhausted_only=exhausted_only)
        yield _seconds(part.get("retry_after"), wall_time)
        delay = part.get("retryDelay")
        if isinstance(delay, str):
            yield parse_duration(delay)
    for text in texts:
        for match in _TRY_AGAIN.finditer(text):
            yield parse_duration(match[1].rstrip("."))


def _set(value: object) -> bool:
    """A metadata field holds a value (a non-empty string or a number, not null)."""
    return bool(value.strip()) if isinstance(value, str) else _as_float(value) is not None


def _platform(parts: list[dict[Any, Any]], headers: Mapping[str, str] | None) -> bool:
    """OpenRouter's own rate-limit headers, on the response or in ``metadata.headers``."""
    for found in (headers, *(part.get("headers") for part in parts)):
        if isinstance(found, Mapping) and found:
            names = _lower(found)
            if any(name in names for name in _PLATFORM_HEADERS):
                return True
    return False


def _per_day(parts: list[dict[Any, Any]]) -> bool:
    """Gemini's ``QuotaFailure`` names a per-day quota (``...PerDay...`` quotaId)."""
    for part in parts:
        violations = part.get("violations")
        if isinstance(violations, list):
            for violation in violations:
                quota = violation.get("quotaId") if isinstance(violation, dict) else None
                if isinstance(quota, str) and "perday" in quota.lower():
                    return True
    return False


def _facts(
    status: int, parts: list[dict[Any, Any]], headers: Mapping[str, str] | None, mid_stream: bool
) -> frozenset[str]:
    """Facts about a 429's shape that rules match besides text (none for other statuses)."""
    if status != 429:
        return frozenset()
    facts = set()
    if _per_day(parts):
        facts.add(_PER_DAY)
    provider = any(_set(part.get(k)) for part in parts for k in ("provider_code", "provider_name"))
    if (provider or mid_stream) and not _platform(parts, headers):
        if provider:
            facts.add(_PROVIDER)
        if mid_stream:
            facts.add(_MID_STREAM)
    return frozenset(facts)


def _match(status: int, text: str, raw: str, facts: frozenset[str]) -> tuple[_Rule | None, str]:
    """The first rule for ``status`` whose needle occurs in the error text (or one of
    whose facts holds), and the reason."""
    if text or raw or facts:
        for rule in _RULES.get(status, ()):
            for needle in rule.needles:
                if needle in text or (rule.raw and needle in raw):
                    return rule, rule.reason or needle
            for fact in rule.facts:
                if fact in facts:
                    return rule, rule.reason or fact
    return None, f"http_{status}"


def _accounts_balance(parts: list[dict[Any, Any]], text: str, default: bool) -> bool:
    """Is the budget a 402 names the account's balance, shared by its keys? By
    ``metadata.limit_source`` (``openrouter_credits``: yes; ``openrouter_key_limit``:
    the key's own cap), else by the settings page the message points to, else
    ``default``."""
    sources = {v.lower() for part in parts if isinstance(v := part.get("limit_source"), str)}
    if "openrouter_key_limit" in sources:
        return False
    if "openrouter_credits" in sources:
        return True
    if any(hint in text for hint in _KEY_CAP_HINTS):
        return False
    return any(hint in text for hint in _BALANCE_HINTS) or default


def _default(status: int) -> Verdict:
    """The verdict for a status when no rule matched."""
    verdict = _DEFAULTS.get(status)
    if verdict is not None:
        return verdict
    return _V.CALLER_ERROR if 300 <= status < 500 else _V.UPSTREAM_FAULT


# --- public entry points -----------------------------------------------------


def classify_response(
    status: int,
    headers: Mapping[str, str] | None = None,
    body: bytes | str | object | None = None,
    *,
    wall_time: float | None = None,
    mid_stream: bool = False,
) -> Classification:
    """Classify one upstream response; never raises.

    ``body`` may be bytes, JSON text, an already-parsed object or None. A 2xx
    gets a cooldown only when its headers show an exhausted bucket. For a 429
    the cooldown is the longest of every header and body signal. ``mid_stream``:
    the error came inside a 200 (after the first token), so a 429 without
    OpenRouter's own ``X-RateLimit-*`` headers is the provider's.
    """
    if 200 <= status < 300:
        cooldown = cooldown_from_headers(headers, wall_time=wall_time)
        if not cooldown:
            return _SUCCESS
        return Classification(verdict=_V.SUCCESS, cooldown=cooldown, reason="bucket_exhausted")
    parts = _parts(_load(body))
    texts = _haystack(parts, _TEXT_KEYS), _haystack(parts, ("raw",))
    rule, reason = _match(status, *texts, _facts(status, parts, headers, mid_stream))
    verdict = rule.verdict if rule else _default(status)
    cooldown = None
    if verdict in _WITH_COOLDOWN:
        exhausted_only = status != 429
        cooldown = _longest(
            (
                cooldown_from_headers(headers, wall_time=wall_time, exhausted_only=exhausted_only),
                *_body_waits(parts, texts, wall_time, exhausted_only),
            )
        )
        if rule is not None and rule.reset is not None:
            reset = rule.reset(wall_time)
            cooldown = None if reset is None else _longest((reset, cooldown))
        elif cooldown is None and rule is not None and rule.fallback is not None:
            cooldown = rule.fallback(wall_time)
    budget = None if rule is None else rule.budget
    return Classification(
        verdict=verdict,
        cooldown=cooldown,
        account_wide=rule.account_wide if rule else False,
        shared_budget=budget is not None and _accounts_balance(parts, texts[0], budget),
        reason=reason,
    )


def classify_probe(
    status: int,
    headers: Mapping[str, str] | None = None,
    body: bytes | str | object | None = None,
    *,
    wall_time: float | None = None,
) -> Classification:
    """Classify the answer to a probe of a key; never raises.

    OpenRouter ``GET /api/v1/key``: a 2xx whose ``data.limit_remaining`` is <= 0
    means the key's cap is used up. ``GET /api/v1/credits``: ``total_credits -
    total_usage`` <= 0 means the account is out of credits. Anything else is
    classified as by :func:`classify_response`.
    """
    if 200 <= status < 300:
        doc = _load(body)
        data = doc.get("data") if isinstance(doc, dict) else None
        if isinstance(data, dict):
            remaining = _as_float(data.get("limit_remaining"))
            if remaining is not None and remaining <= 0:
                return _KEY_LIMIT_REACHED
            credits = _as_float(data.get("total_credits"))
            usage = _as_float(data.get("total_usage"))
            if credits is not None and usage is not None and credits - usage <= 0:
                return _NO_CREDITS
        body = None
    return classify_response(status, headers, body, wall_time=wall_time)
