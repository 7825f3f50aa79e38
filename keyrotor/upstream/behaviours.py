"""What a key of the upstream answers: small, stateful, composable behaviours.

This is keyrotor's one model of OpenRouter. The fake HTTP server
(``keyrotor.testing``) and the replay simulator (``keyrotor.replay``) both
answer through it, so a scenario behaves the same in both. For every generation
request (``/chat/completions``, ``/completions``, ``/embeddings``) the caller
builds a ``Call`` and asks the key's behaviour to ``decide`` it:

- ``None`` means "no objection": the request succeeds (possibly changed by
  modifiers such as ``Slow`` or ``MidStreamError``, which edit the ``Call``);
- a ``Reply`` is sent as is (an error status with an OpenRouter error body);
- ``Hang()`` never answers (until the client goes away);
- ``Drop()`` closes the connection without a response.

``GET /key`` asks ``probe`` instead (only ``Invalid`` objects to a probe), then
``describe`` fills the ``/key`` data: probes never cost credits and never count
against rate limits.

Behaviours hold state (balances, windows, counters), so sharing one instance
between several secrets shares that state: one ``Credits`` given to two keys is
an account balance, one ``AccountRateLimit`` given to two keys is an
account-wide window (OpenRouter's free-model limits are per account).

Combine with ``Chain(a, b, ...)`` (the first objection wins, in order, so put
limits that sit in front first) and script exact responses with
``Sequence([...], then=...)``. Nothing here reads the wall clock or a global
random generator: time is ``Call.now`` (the server's injected clock, or the
simulator's virtual time, ``Call.epoch`` seconds after the Unix epoch) and
randomness, when asked for, is a ``random.Random(seed)`` owned by the behaviour.
A request is counted by a limit and charged only once every behaviour has let it
through (``Call.on_success``, run by ``Call.commit``).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from typing import Any, Literal, TypeAlias

from attrs import define, field, frozen

__all__ = [
    "AccountRateLimit",
    "Behaviour",
    "Call",
    "Chain",
    "Credits",
    "Custom",
    "Drop",
    "Flaky",
    "FreeModelLimits",
    "Hang",
    "InFlightBudget",
    "Intermittent",
    "Invalid",
    "MidStreamError",
    "NoKeyEndpoint",
    "Ok",
    "Outcome",
    "RateLimit",
    "Reply",
    "Sequence",
    "Slow",
    "SlowStream",
    "Truncate",
    "UpstreamRateLimited",
    "error_body",
    "error_document",
    "key_data",
    "openai_unknown_url",
    "status_line",
]

# Default message and OpenRouter ``error_type`` for statuses the fake emits.
_STATUS_DEFAULTS: dict[int, tuple[str, str]] = {
    400: ("Bad request", "invalid_request"),
    401: ("User not found.", "authentication"),
    402: (
        "Insufficient credits. Add more using https://openrouter.ai/settings/credits",
        "payment_required",
    ),
    403: ("Forbidden", "permission_denied"),
    404: ("Not found", "not_found"),
    405: ("Method not allowed", "invalid_request"),
    408: ("Request timed out", "timeout"),
    413: ("Request entity too large", "invalid_request"),
    429: ("Rate limit exceeded", "rate_limit_exceeded"),
    500: ("Internal Server Error", "server"),
    502: ("Provider returned error", "provider_unavailable"),
    503: ("Service temporarily unavailable", "provider_overloaded"),
    504: ("Gateway timeout", "timeout"),
    524: ("Provider timed out", "timeout"),
    529: ("Provider overloaded", "provider_overloaded"),
}


def default_message(status: int) -> str:
    """The message the fake uses for ``status`` when none is given."""
    return _STATUS_DEFAULTS.get(status, ("Error", "unmapped"))[0]


def default_error_type(status: int) -> str:
    """The OpenRouter ``error_type`` the fake uses for ``status``."""
    return _STATUS_DEFAULTS.get(status, ("Error", "unmapped"))[1]


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def error_document(
    code: int, message: str, metadata: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """OpenRouter's error body: ``{"error":{"code":..,"message":..,"metadata":{..}}}``.

    ``metadata`` is left out when ``None``.
    """
    error: dict[str, Any] = {"code": code, "message": message}
    if metadata is not None:
        error["metadata"] = dict(metadata)
    return {"error": error}


def error_body(code: int, message: str, metadata: Mapping[str, Any] | None = None) -> bytes:
    """``error_document`` encoded as JSON."""
    return _dumps(error_document(code, message, metadata))


class Call:
    """One generation request as a behaviour sees it (and may edit).

    Read-only for behaviours: ``endpoint`` (e.g. ``"/chat/completions"``),
    ``model``, ``stream``, ``body`` (the parsed JSON request), ``prompt_tokens``,
    ``completion_tokens`` (= content chunks; ``reasoning_tokens`` of them
    reasoning), ``cached_tokens`` (of the prompt), ``cost`` (USD, deterministic),
    ``now`` (the clock, in seconds), ``epoch`` (the Unix time of ``now`` 0,
    for the epoch times of rate-limit headers) and ``in_flight`` (this key's
    other requests in flight). Modifiers set ``latency``, ``chunk_delay``,
    ``stream_error`` and ``cut_after``; ``on_success`` registers what happens if
    the request is let through (a limit counting it, a balance charged).
    """

    __slots__ = (
        "body",
        "cached_tokens",
        "chunk_delay",
        "commits",
        "completion_tokens",
        "cost",
        "cut_after",
        "endpoint",
        "epoch",
        "in_flight",
        "latency",
        "model",
        "now",
        "prompt_tokens",
        "reasoning_tokens",
        "stream",
        "stream_error",
    )

    def __init__(
        self,
        *,
        endpoint: str,
        model: str = "",
        stream: bool = False,
        body: Mapping[str, Any] | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cost: float = 0.0,
        now: float = 0.0,
        epoch: float = 0.0,
        in_flight: int = 0,
    ) -> None:
        self.endpoint = endpoint
        self.model = model
        self.stream = stream
        self.body: Mapping[str, Any] = body if body is not None else {}
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.cost = cost
        self.now = now
        self.epoch = epoch
        self.in_flight = in_flight
        self.cached_tokens = 0
        self.reasoning_tokens = 0
        self.latency = 0.0
        self.chunk_delay = 0.0
        self.stream_error: MidStreamError | None = None
        self.cut_after: int | None = None
        self.commits: list[Callable[[], None]] | None = None

    def on_success(self, commit: Callable[[], None]) -> None:
        """Run ``commit`` if every behaviour lets this call through."""
        if self.commits is None:
            self.commits = [commit]
        else:
            self.commits.append(commit)

    def charge_on_success(self, credits: Credits) -> None:
        """Charge ``self.cost`` to ``credits`` if this call is let through."""
        self.on_success(lambda: credits.charge(self.cost))

    def commit(self) -> None:
        """The call was let through: count it and charge it (``on_success``)."""
        if self.commits is not None:
            for commit in self.commits:
                commit()

    def __repr__(self) -> str:
        return (
            f"Call(endpoint={self.endpoint!r}, model={self.model!r}, stream={self.stream!r}, "
            f"completion_tokens={self.completion_tokens!r}, cost={self.cost!r}, now={self.now!r})"
        )


def key_data(label: str, usage: float) -> dict[str, Any]:
    """The ``data`` of a ``GET /key`` answer before the key's behaviour
    ``describe``s it: no limit, ``usage`` USD spent so far."""
    usage = round(usage, 12)
    return {
        "label": label,
        "limit": None,
        "limit_remaining": None,
        "limit_reset": None,
        "include_byok_in_limit": False,
        "usage": usage,
        "usage_daily": usage,
        "usage_weekly": usage,
        "usage_monthly": usage,
        "byok_usage": 0,
        "byok_usage_daily": 0,
        "byok_usage_weekly": 0,
        "byok_usage_monthly": 0,
        "is_free_tier": False,
        "is_management_key": False,
        "is_provisioning_key": False,
        "expires_at": None,
        "rate_limit": {"requests": -1, "interval": "10s", "note": "deprecated"},
    }


class Behaviour:
    """Base class of key behaviours. Subclasses override what they need."""

    __slots__ = ()

    def decide(self, call: Call) -> Outcome | None:
        """Decide a generation request: ``None`` to let it succeed, or an outcome."""
        return None

    def probe(self, call: Call) -> Outcome | None:
        """Decide a ``GET /key`` probe (never costs, never counted by limits)."""
        return None

    def describe(self, data: dict[str, Any]) -> None:
        """Fill ``GET /key`` data (``limit``, ``limit_remaining``, ``is_free_tier`` ...)."""


# --------------------------------------------------------------------------- outcomes


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _normalize_headers(
    value: Iterable[tuple[str, str]] | Mapping[str, str],
) -> tuple[tuple[str, str], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    out = tuple((str(k), str(v)) for k, v in items)
    for name, val in out:
        if not _TOKEN.fullmatch(name) or "\r" in val or "\n" in val or "\0" in val:
            raise ValueError(f"invalid HTTP header {name!r}: {val!r}")
    return out


def status_line(status: int) -> bytes:
    """``HTTP/1.1 <status> <reason>\\r\\n``."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    return f"HTTP/1.1 {status} {reason}\r\n".encode()


@frozen
class Reply(Behaviour):
    """A fixed response; as a behaviour, it answers every request with it.

    ``Reply(503)`` sends OpenRouter's error body with a default message;
    ``message``/``metadata`` fill the error body; ``body`` (a mapping, bytes or
    str) replaces the body entirely, e.g. a custom 200. ``headers`` are added
    (a ``Connection: close`` header also closes the connection). The status
    line, headers and payload are encoded once, when the reply is built.
    """

    status: int
    message: str | None = None
    metadata: Mapping[str, Any] | None = None
    headers: tuple[tuple[str, str], ...] = field(default=(), converter=_normalize_headers)
    body: Mapping[str, Any] | bytes | str | None = None
    document: Any = field(init=False, repr=False, eq=False)
    payload: bytes = field(init=False, repr=False, eq=False)
    head: bytes = field(init=False, repr=False, eq=False)
    closes: bool = field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        if (
            not 200 <= self.status <= 599
            or self.status == 204
            or (self.status == 304 and self.body != b"")
        ):
            raise ValueError(
                "Reply status must be 200..599 (not 204; 304 only with body=b''), "
                f"not {self.status!r}"
            )
        document: Any = None
        if self.body is None:
            message = self.message if self.message is not None else default_message(self.status)
            document = error_document(self.status, message, self.metadata)
            payload = _dumps(document)
        elif isinstance(self.body, bytes):
            payload = self.body
        elif isinstance(self.body, str):
            payload = self.body.encode()
        else:
            document = self.body
            payload = _dumps(self.body)
        object.__setattr__(self, "document", document)
        object.__setattr__(self, "payload", payload)
        lines = [
            status_line(self.status),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(payload),
        ]
        closes = False
        for name, value in self.headers:
            if name.lower() in ("content-length", "transfer-encoding", "content-type"):
                if name.lower() == "content-type":
                    lines[1] = f"content-type: {value}\r\n".encode()
                continue
            if name.lower() == "connection" and "close" in value.lower():
                closes = True
                continue
            lines.append(f"{name}: {value}\r\n".encode())
        object.__setattr__(self, "head", b"".join(lines))
        object.__setattr__(self, "closes", closes)

    def decide(self, call: Call) -> Outcome | None:
        return self

    def json(self) -> Any:
        """The payload, decoded (for assertions)."""
        return json.loads(self.payload)


@frozen
class Hang(Behaviour):
    """Never answer; the server waits until the client goes away (or shutdown).

    ``after``: when the simulator's client gives up (a ``timeout``); None: 30 s."""

    after: float | None = None

    def decide(self, call: Call) -> Outcome | None:
        return self


@frozen
class Drop(Behaviour):
    """Close the connection without sending any response.

    ``reason``: what the simulator's client sees (``"reset"``, or
    ``"connect"``: refused before the request went out), ``after`` seconds
    after sending (None: the key's error latency)."""

    reason: Literal["reset", "connect"] = "reset"
    after: float | None = None

    def decide(self, call: Call) -> Outcome | None:
        return self


Outcome: TypeAlias = Reply | Hang | Drop
"""What a behaviour may answer instead of letting the request succeed."""


def _retry_after_header(seconds: float | None) -> tuple[tuple[str, str], ...]:
    if seconds is None:
        return ()
    return (("Retry-After", str(max(0, math.ceil(seconds)))),)


# --------------------------------------------------------------------------- plain


@frozen
class Ok(Behaviour):
    """A healthy key: every request succeeds (the default)."""


@define
class Invalid(Behaviour):
    """An invalid, disabled or revoked key: 401 for everything, probes included."""

    message: str = "User not found."
    _reply: Reply = field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        self._reply = Reply(401, self.message)

    def decide(self, call: Call) -> Outcome | None:
        return self._reply

    def probe(self, call: Call) -> Outcome | None:
        return self._reply


# --------------------------------------------------------------------------- credits


SPENT = 1e-12
"""A balance at or below this is spent (float sums of prices leave dust)."""

_CREDITS_MESSAGES = {
    "openrouter_credits": (
        "Insufficient credits. Add more using https://openrouter.ai/settings/credits"
    ),
    "openrouter_key_limit": (
        "Key limit exceeded (total limit). Manage it using https://openrouter.ai/settings/keys"
    ),
}


@define
class Credits(Behaviour):
    """A USD balance that each successful request's cost draws down.

    Requests are admitted while ``balance > 0`` (the last one may take it below
    zero, as a real balance can); after that every request gets 402 with
    ``metadata.limit_source`` = ``limit_source``: ``"openrouter_credits"`` (the
    account balance: share one instance between the account's keys) or
    ``"openrouter_key_limit"`` (a per-key cap). With ``preauthorize=True`` a
    request whose cost exceeds the balance is refused up front with OpenRouter's
    "You requested up to N tokens, but can only afford M" 402.

    ``GET /key`` reports ``limit`` (the initial balance plus top-ups),
    ``limit_remaining`` (the balance) and ``is_free_tier``; in a ``Chain`` the
    first ``Credits`` reports (put the key cap before the account balance).
    """

    balance: float
    limit_source: Literal["openrouter_credits", "openrouter_key_limit"] = "openrouter_credits"
    preauthorize: bool = False
    is_free_tier: bool = False
    message: str | None = None
    limit: float = field(init=False)
    spent: float = field(init=False, default=0.0)
    _reply: Reply = field(init=False, repr=False, eq=False)

    @limit.default
    def _limit_default(self) -> float:
        return self.balance

    def __attrs_post_init__(self) -> None:
        if self.limit_source not in _CREDITS_MESSAGES:
            raise ValueError(
                f"Credits.limit_source must be one of {sorted(_CREDITS_MESSAGES)}, "
                f"not {self.limit_source!r}"
            )
        message = self.message or _CREDITS_MESSAGES[self.limit_source]
        self._reply = Reply(402, message, {"limit_source": self.limit_source})

    def decide(self, call: Call) -> Outcome | None:
        if self.balance <= SPENT:
            return self._reply
        if self.preauthorize and call.cost > self.balance:
            affordable = int(call.completion_tokens * self.balance / call.cost)
            return Reply(
                402,
                "This request requires more credits, or fewer max_tokens. You requested up to "
                f"{call.completion_tokens} tokens, but can only afford {affordable}. To increase, "
                "visit https://openrouter.ai/settings/credits and add more credits",
                {"limit_source": self.limit_source},
            )
        call.charge_on_success(self)
        return None

    def charge(self, cost: float) -> None:
        """Draw ``cost`` USD from the balance (the server calls this on success)."""
        self.balance -= cost
        self.spent += cost

    def top_up(self, usd: float) -> None:
        """Add ``usd`` to the balance (and to the reported ``limit``)."""
        self.balance += usd
        self.limit += usd

    def describe(self, data: dict[str, Any]) -> None:
        if data.get("limit") is not None:
            return  # an earlier Credits of a Chain (e.g. the key cap) already answered
        data["limit"] = round(self.limit, 12)
        data["limit_remaining"] = round(self.balance, 12)
        data["is_free_tier"] = self.is_free_tier


# --------------------------------------------------------------------------- rate limits


@define
class RateLimit(Behaviour):
    """At most ``limit`` requests per fixed ``window`` seconds of the server clock.

    Windows are aligned on multiples of ``window`` in clock time: the window
    holding ``now`` ends at ``(floor(now / window) + 1) * window``. Requests past
    the limit get 429 with ``Retry-After`` (seconds to the window's end, rounded
    up), ``X-RateLimit-Limit``/``-Remaining``/``-Reset`` (Unix milliseconds)
    and the same three in ``error.metadata.headers``. Refused requests do not
    count. Share one instance between secrets for an account-wide limit.
    ``message`` may contain ``{model}``.
    """

    limit: int
    window: float = 60.0
    message: str = "Rate limit exceeded: limit_rpm/{model}"
    limit_source: str | None = None
    retry_after: bool = True
    _index: int = field(default=-1, init=False, repr=False, eq=False)
    _count: int = field(default=0, init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        if self.limit < 0 or self.window <= 0:
            raise ValueError(
                f"RateLimit needs limit >= 0 and window > 0, got {self.limit!r}/{self.window!r}"
            )

    def used(self, now: float) -> int:
        """Requests admitted in the window holding ``now``."""
        return self._count if math.floor(now / self.window) == self._index else 0

    def decide(self, call: Call) -> Outcome | None:
        now = call.now
        index = math.floor(now / self.window)
        if index != self._index:
            self._index = index
            self._count = 0
        if self._count < self.limit:
            self._count += 1
            return None
        end = (index + 1) * self.window
        reset_ms = str(round((call.epoch + end) * 1000))
        rate_headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": reset_ms,
        }
        metadata: dict[str, Any] = {"headers": rate_headers, "provider_name": None}
        if self.limit_source is not None:
            metadata["limit_source"] = self.limit_source
        headers = list(rate_headers.items())
        if self.retry_after:
            headers.insert(0, ("Retry-After", str(max(1, math.ceil(end - now)))))
        return Reply(
            429, self.message.replace("{model}", call.model), metadata, headers=tuple(headers)
        )


@define
class AccountRateLimit(RateLimit):
    """OpenRouter's per-account free-model limit (20 requests/minute by default).

    Give the *same instance* to every secret of the account: they share the
    window. The 429 body says "Rate limit exceeded: free-models-per-min." with
    ``metadata.limit_source`` (the exact value OpenRouter uses for the per-minute
    limit is not documented; ``"openrouter_free_tier_minute"`` is this fake's).
    """

    limit: int = 20
    window: float = 60.0
    message: str = "Rate limit exceeded: free-models-per-min. "
    limit_source: str | None = "openrouter_free_tier_minute"
    retry_after: bool = True


@define
class FreeModelLimits(Behaviour):
    """OpenRouter's free-model limits of one account: ``per_minute`` requests in
    each clock minute and ``per_day`` in each UTC day, counting only ``:free``
    models (paid ones pass). Give the *same instance* to every secret of the
    account. A request over a limit gets OpenRouter's 429 ("free-models-per-min"
    or "free-models-per-day", ``X-RateLimit-*`` headers, ``Retry-After``) and
    ``refused`` counts it: a pool that paces its free requests keeps it at 0.
    """

    per_minute: int = 20
    per_day: int = 50
    is_free_tier: bool | None = None  # what /key says; None: per_day < 1000 (never paid)
    refused: int = field(default=0, init=False, eq=False)
    sent: int = field(default=0, init=False, eq=False)  # free requests let through
    _minute: RateLimit = field(init=False, repr=False, eq=False)
    _day: RateLimit = field(init=False, repr=False, eq=False)
    _asked: float | None = field(default=None, init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        self._minute = RateLimit(
            self.per_minute,
            60.0,
            "Rate limit exceeded: free-models-per-min. ",
            "openrouter_free_tier_minute",
        )
        self._day = RateLimit(
            self.per_day,
            86400.0,
            "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free "
            "model requests per day",
            "openrouter_free_tier_daily",
        )

    def decide(self, call: Call) -> Outcome | None:
        if not call.model.endswith(":free"):
            return None
        # Windows of Unix time: the day is the UTC day, whatever the clock's zero.
        shifted = Call(endpoint=call.endpoint, model=call.model, now=call.now + call.epoch)
        for limit in (self._minute, self._day):
            if limit.used(shifted.now) >= limit.limit:
                self.refused += 1
                return limit.decide(shifted)  # over: its 429, nothing counted
        self._minute.decide(shifted)
        self._day.decide(shifted)
        self.sent += 1
        return None

    def probe(self, call: Call) -> Outcome | None:
        self._asked = call.now + call.epoch  # the day ``describe`` reports
        return None

    def describe(self, data: dict[str, Any]) -> None:
        """``is_free_tier`` (set, or: never bought the 10 credits) and the
        day's ``free_model_daily_requests`` as of the probe, as OpenRouter's
        ``/key`` reports them (the tier follows credits bought, not that flag)."""
        tier = self.per_day < 1000 if self.is_free_tier is None else self.is_free_tier
        used = 0 if self._asked is None else self._day.used(self._asked)
        data["is_free_tier"] = tier
        data["free_model_daily_requests"] = {
            "used": used,
            "limit": self.per_day,
            "remaining": max(0, self.per_day - used),
        }


@define
class InFlightBudget(Behaviour):
    """OpenRouter's in-flight spending budget: a temporary 402 with ``Retry-After``.

    Refuses a request when the key already has ``max_in_flight`` requests in
    flight (``0``: refuse every request). The body carries
    ``limit_source: "openrouter_in_flight_budget"`` and
    ``reason: "in_flight_budget_exhausted"``.
    """

    max_in_flight: int = 0
    retry_after: float = 1.0
    _reply: Reply = field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        self._reply = Reply(
            402,
            "Your in-flight spending budget is exhausted: requests that are still running "
            "or just finished are being settled. Retry shortly.",
            {"limit_source": "openrouter_in_flight_budget", "reason": "in_flight_budget_exhausted"},
            headers=_retry_after_header(self.retry_after),
        )

    def decide(self, call: Call) -> Outcome | None:
        if call.in_flight >= self.max_in_flight:
            return self._reply
        return None


@frozen
class NoKeyEndpoint(Behaviour):
    """An OpenAI-compatible upstream, which has no ``GET /key``: a probe there
    gets OpenAI's 404 ``unknown_url`` (put it first in a ``Chain``); the
    requests themselves pass on to the next part."""

    path: str = "/v1/key"

    def probe(self, call: Call) -> Outcome | None:
        return Reply(404, body=openai_unknown_url("GET", self.path))


def openai_unknown_url(method: str, path: str) -> dict[str, Any]:
    """OpenAI's body for a path it does not serve (status 404)."""
    return {
        "error": {
            "message": f"Unknown request URL: {method} {path}. Please check the URL for typos, "
            "or see the docs at https://platform.openai.com/docs/api-reference/.",
            "type": "invalid_request_error",
            "param": None,
            "code": "unknown_url",
        }
    }


# --------------------------------------------------------------------------- patterns


def _bool_tuple(value: Iterable[Any] | None) -> tuple[bool, ...] | None:
    return None if value is None else tuple(bool(x) for x in value)


@define(kw_only=True)
class _Pattern(Behaviour):
    """Deterministic firing pattern, counted over the calls that reach it.

    At most one of: ``every=k`` (the k-th, 2k-th ... call), ``first=n`` (the first
    n calls), ``pattern=[True, False, ...]`` (cycled), ``probability=p`` (with a
    ``random.Random(seed)`` of its own). None of them: fire on every call.
    """

    every: int | None = None
    first: int | None = None
    pattern: tuple[bool, ...] | None = field(default=None, converter=_bool_tuple)
    probability: float | None = None
    seed: int = 0
    calls: int = field(default=0, init=False)
    _random: random.Random | None = field(default=None, init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        given = [
            n for n in ("every", "first", "pattern", "probability") if getattr(self, n) is not None
        ]
        if len(given) > 1:
            raise ValueError(f"{type(self).__name__}: give at most one of {given}")
        if self.every is not None and self.every < 1:
            raise ValueError(f"{type(self).__name__}: every must be >= 1, not {self.every!r}")
        if self.pattern is not None and not self.pattern:
            raise ValueError(f"{type(self).__name__}: pattern must not be empty")
        if self.probability is not None:
            self._random = random.Random(self.seed)

    def fires(self) -> bool:
        """Count one call and say whether the pattern fires for it."""
        self.calls += 1
        n = self.calls
        if self.every is not None:
            return n % self.every == 0
        if self.first is not None:
            return n <= self.first
        if self.pattern is not None:
            return self.pattern[(n - 1) % len(self.pattern)]
        if self._random is not None and self.probability is not None:
            return self._random.random() < self.probability
        return True


@define
class Flaky(_Pattern):
    """Upstream 5xx on a deterministic pattern (see ``_Pattern`` for the triggers).

    ``Flaky(502, every=3)`` fails every third request; ``Flaky(503, first=2)``
    the first two; ``Flaky(500, pattern=[True, False])`` every other one. The
    body has ``metadata.error_type`` and ``provider_name``.
    """

    status: int = 502
    message: str | None = field(default=None, kw_only=True)
    retry_after: float | None = field(default=None, kw_only=True)
    provider_name: str = field(default="FakeProvider", kw_only=True)
    _reply: Reply = field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._reply = Reply(
            self.status,
            self.message if self.message is not None else default_message(self.status),
            {"error_type": default_error_type(self.status), "provider_name": self.provider_name},
            headers=_retry_after_header(self.retry_after),
        )

    def decide(self, call: Call) -> Outcome | None:
        return self._reply if self.fires() else None


@define(kw_only=True)
class UpstreamRateLimited(_Pattern):
    """429 from the upstream provider's shared pool (not the key's fault).

    ``message: "Provider returned error"``, ``metadata.raw: "<model> is
    temporarily rate-limited upstream..."``, ``provider_name`` and
    ``limit_source: "upstream_provider_shared_pool"``. Fires on every call
    unless a pattern (``every``/``first``/``pattern``/``probability``) is given.
    """

    provider_name: str = "FakeProvider"
    retry_after: float | None = None

    def decide(self, call: Call) -> Outcome | None:
        if not self.fires():
            return None
        raw = (
            f"{call.model} is temporarily rate-limited upstream. Please retry shortly, or add "
            "your own key to accumulate your rate limits: "
            "https://openrouter.ai/settings/integrations"
        )
        return Reply(
            429,
            "Provider returned error",
            {
                "raw": raw,
                "provider_name": self.provider_name,
                "is_byok": False,
                "limit_source": "upstream_provider_shared_pool",
            },
            headers=_retry_after_header(self.retry_after),
        )


@define
class Intermittent(_Pattern):
    """Apply ``inner`` only when the pattern fires, e.g. ``Intermittent(Hang(), every=5)``."""

    inner: Behaviour

    def decide(self, call: Call) -> Outcome | None:
        return self.inner.decide(call) if self.fires() else None

    def probe(self, call: Call) -> Outcome | None:
        return self.inner.probe(call)

    def describe(self, data: dict[str, Any]) -> None:
        self.inner.describe(data)


# --------------------------------------------------------------------------- modifiers


@define
class Slow(Behaviour):
    """Add ``latency`` seconds (event-loop sleep) before the response headers."""

    latency: float

    def decide(self, call: Call) -> Outcome | None:
        call.latency += self.latency
        return None


@define
class SlowStream(Behaviour):
    """Wait ``chunk_delay`` seconds (event-loop sleep) between SSE events."""

    chunk_delay: float

    def decide(self, call: Call) -> Outcome | None:
        call.chunk_delay = self.chunk_delay
        return None


@define
class MidStreamError(Behaviour):
    """Fail after the first token: HTTP 200, ``after_chunks`` content chunks, then
    an error chunk ``{"error":{"code","message","metadata":{"error_type"}},
    "choices":[{"finish_reason":"error",...}]}`` and the end of the stream
    (``data: [DONE]`` too when ``send_done``). A non-streaming request gets a 200
    body whose ``choices[0]`` has ``finish_reason: "error"`` and the ``error``
    (OpenRouter's documented shape). The request is charged.
    """

    after_chunks: int = 1
    code: int = 502
    message: str = "Provider disconnected unexpectedly"
    error_type: str = "provider_unavailable"
    send_done: bool = False

    def decide(self, call: Call) -> Outcome | None:
        call.stream_error = self
        return None


@define
class Truncate(Behaviour):
    """Send the headers and ``after_chunks`` content chunks (or half a JSON body),
    then close the connection abruptly, like a connection reset mid-response."""

    after_chunks: int = 1

    def decide(self, call: Call) -> Outcome | None:
        call.cut_after = self.after_chunks
        return None


# --------------------------------------------------------------------------- composition


class Chain(Behaviour):
    """Several behaviours in order: ``Chain(RateLimit(5), Credits(1.0), Slow(0.1))``.

    Each part decides in turn; the first outcome wins and later parts are not
    asked (so a rate limit placed first counts requests a later ``Credits``
    refuses, and not the other way round). Modifiers apply to the request.
    """

    __slots__ = ("parts",)

    def __init__(self, *parts: Behaviour) -> None:
        self.parts: tuple[Behaviour, ...] = parts

    def decide(self, call: Call) -> Outcome | None:
        for part in self.parts:
            outcome = part.decide(call)
            if outcome is not None:
                return outcome
        return None

    def probe(self, call: Call) -> Outcome | None:
        for part in self.parts:
            outcome = part.probe(call)
            if outcome is not None:
                return outcome
        return None

    def describe(self, data: dict[str, Any]) -> None:
        for part in self.parts:
            part.describe(data)

    def __repr__(self) -> str:
        return f"Chain({', '.join(map(repr, self.parts))})"


def _behaviour_list(steps: Iterable[Behaviour]) -> list[Behaviour]:
    return list(steps)


@define
class Sequence(Behaviour):
    """Scripted outcomes consumed one per request, in order, then ``then``.

    ``Sequence([Reply(503), Flaky(502), Ok(), Invalid()], then=Ok())``: each step
    is a behaviour used for exactly one generation request. Probes do not
    consume steps; they go to the next pending step (or ``then``).
    """

    steps: list[Behaviour] = field(converter=_behaviour_list)
    then: Behaviour = field(factory=Ok)
    position: int = field(default=0, init=False)

    @property
    def remaining(self) -> int:
        """Steps not consumed yet."""
        return len(self.steps) - self.position

    def _current(self) -> Behaviour:
        return self.steps[self.position] if self.position < len(self.steps) else self.then

    def decide(self, call: Call) -> Outcome | None:
        if self.position < len(self.steps):
            step = self.steps[self.position]
            self.position += 1
            return step.decide(call)
        return self.then.decide(call)

    def probe(self, call: Call) -> Outcome | None:
        return self._current().probe(call)

    def describe(self, data: dict[str, Any]) -> None:
        self._current().describe(data)


@define
class Custom(Behaviour):
    """A behaviour from plain functions (``probe`` defaults to "no objection")."""

    decide_fn: Callable[[Call], Outcome | None]
    probe_fn: Callable[[Call], Outcome | None] | None = None

    def decide(self, call: Call) -> Outcome | None:
        return self.decide_fn(call)

    def probe(self, call: Call) -> Outcome | None:
        return None if self.probe_fn is None else self.probe_fn(call)
