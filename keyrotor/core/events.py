"""Input events: facts the driver tells the pool, each carrying ``now``.

``now`` is monotonic seconds (any origin, never going backwards). Events are
small frozen value objects; the pool checks them against its state when they
are handled (not when built, to keep the hot path cheap).

The pool keeps the ``RequestStarted`` it is given (its request's pin, session,
group and token estimate are read from it later, and ``KeyAdded``'s spec) and
no other event: once ``handle`` returns, a driver may reuse the object of any
other event (the replay engine recycles one ``ResponseReceived`` and one
``ResponseFinished`` for speed). A test holds the pool to this.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from .config import KeySpec
from .states import KeyState

__all__ = [
    "AttemptHeld",
    "Event",
    "KeyAdded",
    "KeyMarked",
    "KeyRemoved",
    "ProbeFinished",
    "ProbeRequested",
    "RequestCancelled",
    "RequestStarted",
    "ResponseFinished",
    "ResponseReceived",
    "SpendRecorded",
    "Tick",
    "TransportFailed",
    "request_started",
    "response_finished",
    "response_received",
]

Headers = Mapping[str, str]
"""Response headers; names in any case."""
Body = bytes | str | Mapping[str, Any] | list[Any] | None
"""An (error) body: raw bytes, JSON text, or already-parsed JSON."""


@attrs.frozen(kw_only=True)
class RequestStarted:
    """A caller wants to send a request through the pool.

    Attributes:
        request_id: unique among the requests the pool currently holds.
        pin: ask for one key, by ``key_id`` or by index in the configured keys
            (seed 000's ``keyIndex``).
        pin_fallback: if the pinned key is missing or unusable, use another
            (default); with ``False`` the request waits for that key.
        session: affinity key (``affinity`` policy): the same session goes to
            the same key while it is usable, for prompt-cache hits.
        group: requests of one group (a batch of parallel operations) get
            distinct keys while enough keys are usable.
        deadline: latest time to wait for a key (default ``now +
            PoolConfig.queue_timeout``).
        tokens: estimated tokens, charged to the key's ``tpm`` pacing until the
            real count arrives in ``ResponseFinished``.
        max_attempts: this request's attempts, the first included, at most
            ``PoolConfig.max_attempts`` (None: that limit). A router that
            tries several models gives each the attempts the others left.
    """

    request_id: str
    now: float
    pin: str | int | None = None
    pin_fallback: bool = True
    session: str | None = None
    group: str | None = None
    deadline: float | None = None
    tokens: int = 0
    max_attempts: int | None = None


@attrs.frozen(kw_only=True)
class ResponseReceived:
    """The upstream answered an attempt: status and headers have arrived.

    Attributes:
        retry_after: seconds from ``now``, if the driver parsed it itself.
        headers: the response headers (rate-limit and retry headers are read).
        body: for error statuses, the error body (OpenRouter's metadata tells
            a temporary 402 or a shared-pool 429 apart).
        wall_time: Unix time at arrival, to turn absolute reset times
            (HTTP-date, epoch milliseconds, RFC 3339) into durations.
    """

    request_id: str
    now: float
    status: int
    retry_after: float | None = None
    headers: Headers | None = None
    body: Body = None
    wall_time: float | None = None


@attrs.frozen(kw_only=True)
class ResponseFinished:
    """The delivered response's body ended; the key's slot is free again.

    ``error_status``/``error_body`` report an error that arrived inside a 200
    body or stream (OpenRouter's mid-stream error chunk): the key's health is
    updated, but nothing is retried, since output already reached the caller.
    ``wall_time`` (Unix time, with an error) reads the error's absolute reset
    times (OpenRouter's epoch-ms ``X-RateLimit-Reset`` in its ``metadata``).
    """

    request_id: str
    now: float
    cost: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error_status: int | None = None
    error_body: Body = None
    wall_time: float | None = None


@attrs.frozen(kw_only=True)
class TransportFailed:
    """The attempt failed without a response (or its body broke off).

    ``reason`` is one of ``connect``, ``timeout``, ``reset``, ``protocol`` or
    any short text; these count as upstream faults in the key's error window,
    and ``timeout`` also as a strike against a key that hangs while others
    answer (``PoolConfig.timeout_strikes``). ``busy`` (the key's own connection
    limit was full), ``pool`` (no connection slot came free) and
    ``key_removed`` fail the attempt over without blaming the key.
    """

    request_id: str
    now: float
    reason: str = "error"


@attrs.frozen(kw_only=True)
class AttemptHeld:
    """The driver did not carry out a ``Send``: a limit kept outside this pool
    (the counters the pool's other processes share: rpm, tpm, in-flight) holds
    its key until ``until``. The key is paced until then (as its own ``rpm``
    would) and the request goes to another key, or waits; the attempt does not
    count toward ``max_attempts``.
    """

    request_id: str
    now: float
    until: float


@attrs.frozen(kw_only=True)
class RequestCancelled:
    """The caller gave up (cancelled, timed out, went away). Frees its key."""

    request_id: str
    now: float


@attrs.frozen(kw_only=True)
class Tick:
    """Time passed: feed one at ``pool.next_deadline()``."""

    now: float


@attrs.frozen(kw_only=True)
class ProbeFinished:
    """The result of a ``Probe``: the answer of a cheap call with the key.

    ``status`` is ``None`` when the probe failed without an answer (which
    leaves the key's state alone).
    """

    key_id: str
    now: float
    status: int | None
    headers: Headers | None = None
    body: Body = None
    wall_time: float | None = None


@attrs.frozen(kw_only=True)
class ProbeRequested:
    """An operator asks to probe one key (``key_id``) or every non-disabled key."""

    now: float
    key_id: str | None = None


@attrs.frozen(kw_only=True)
class KeyAdded:
    """An operator adds a key at runtime."""

    now: float
    key: KeySpec


@attrs.frozen(kw_only=True)
class KeyRemoved:
    """An operator removes a key: requests on it finish, no new ones start."""

    now: float
    key_id: str


@attrs.frozen(kw_only=True)
class KeyMarked:
    """An operator sets a key's state (seed 004's "mark healthy" after a refund).

    ``until`` is required for ``rate_limited`` and ``degraded`` and optional
    for ``depleted``; ``recovering`` cannot be set.
    """

    now: float
    key_id: str
    state: KeyState
    until: float | None = None
    reason: str = "operator"


@attrs.frozen(kw_only=True)
class SpendRecorded:
    """Spend made outside this pool's own requests, for its budgets and credits.

    Restored from a ledger after a restart, or (later) reported by another
    instance sharing the key. ``at`` is when it was spent (monotonic, may lie
    before ``now``; default ``now``): a budget with a ``budget_window`` counts
    it only if it falls inside the window still running at ``now``, and a
    window opened by it starts at ``at``. Lifetime budgets and ``credits``
    always count it.
    """

    now: float
    key_id: str
    cost: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    at: float | None = None


Event = (
    RequestStarted
    | ResponseReceived
    | ResponseFinished
    | TransportFailed
    | AttemptHeld
    | RequestCancelled
    | Tick
    | ProbeFinished
    | ProbeRequested
    | KeyAdded
    | KeyRemoved
    | KeyMarked
    | SpendRecorded
)
"""Every event ``Pool.handle`` accepts."""


# Positional builders of the three events of every request, for drivers on the
# hot path: the same frozen objects as the keyword constructors, built through
# the slots' setters, which skips the keyword ``__init__`` (about twice as
# cheap; benchmarks/core_cycle.py). No checks, as for the constructors.
_new = object.__new__


def _setters(cls: type) -> tuple[Any, ...]:
    """The slots' setters of a frozen attrs class, in field order."""
    return tuple(cls.__dict__[field.name].__set__ for field in attrs.fields(cls))


(
    _rs_request_id,
    _rs_now,
    _rs_pin,
    _rs_pin_fallback,
    _rs_session,
    _rs_group,
    _rs_deadline,
    _rs_tokens,
    _rs_max_attempts,
) = _setters(RequestStarted)
(
    _rr_request_id,
    _rr_now,
    _rr_status,
    _rr_retry_after,
    _rr_headers,
    _rr_body,
    _rr_wall_time,
) = _setters(ResponseReceived)
(
    _rf_request_id,
    _rf_now,
    _rf_cost,
    _rf_prompt,
    _rf_completion,
    _rf_error_status,
    _rf_error_body,
    _rf_wall_time,
) = _setters(ResponseFinished)


def request_started(
    request_id: str,
    now: float,
    pin: str | int | None = None,
    pin_fallback: bool = True,
    session: str | None = None,
    group: str | None = None,
    deadline: float | None = None,
    tokens: int = 0,
    max_attempts: int | None = None,
) -> RequestStarted:
    """``RequestStarted(...)``, its fields in order, built fast."""
    event: RequestStarted = _new(RequestStarted)
    _rs_request_id(event, request_id)
    _rs_now(event, now)
    _rs_pin(event, pin)
    _rs_pin_fallback(event, pin_fallback)
    _rs_session(event, session)
    _rs_group(event, group)
    _rs_deadline(event, deadline)
    _rs_tokens(event, tokens)
    _rs_max_attempts(event, max_attempts)
    return event


def response_received(
    request_id: str,
    now: float,
    status: int,
    headers: Headers | None = None,
    body: Body = None,
    wall_time: float | None = None,
) -> ResponseReceived:
    """``ResponseReceived(...)`` (no ``retry_after``), built fast."""
    event: ResponseReceived = _new(ResponseReceived)
    _rr_request_id(event, request_id)
    _rr_now(event, now)
    _rr_status(event, status)
    _rr_retry_after(event, None)
    _rr_headers(event, headers)
    _rr_body(event, body)
    _rr_wall_time(event, wall_time)
    return event


def response_finished(
    request_id: str,
    now: float,
    cost: float = 0.0,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    error_status: int | None = None,
    error_body: Body = None,
    wall_time: float | None = None,
) -> ResponseFinished:
    """``ResponseFinished(...)``, its fields in order, built fast."""
    event: ResponseFinished = _new(ResponseFinished)
    _rf_request_id(event, request_id)
    _rf_now(event, now)
    _rf_cost(event, cost)
    _rf_prompt(event, prompt_tokens)
    _rf_completion(event, completion_tokens)
    _rf_error_status(event, error_status)
    _rf_error_body(event, error_body)
    _rf_wall_time(event, wall_time)
    return event
