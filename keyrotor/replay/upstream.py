"""The simulated upstream: what each key's requests would get, on a virtual clock.

Pure and seeded: an :class:`UpstreamModel` describes per-key and per-account
limits, credit balances, latency distributions and failure windows (as JSON or
TOML, schema in docs/replay.md); a :class:`SimulatedUpstream` built from it
answers each attempt the replay engine sends. Nothing here sleeps or reads a
clock; randomness comes from one ``random.Random(seed)``, drawn in event order.

Answers follow OpenRouter: a 429 carries ``Retry-After`` (whole seconds) and
``X-RateLimit-Limit/-Remaining/-Reset`` (epoch milliseconds on the virtual wall
clock :data:`EPOCH` + now); account-wide limits name ``free-models-per-min`` in
the body so the core cools the whole account; a spent key answers 402.
"""

from __future__ import annotations

import math
import os
import random
import tomllib
from collections import deque
from collections.abc import Callable, Mapping
from statistics import NormalDist
from typing import Any, Final

import attrs

from .trace import TraceRecord

__all__ = [
    "EPOCH",
    "FAILURE_KINDS",
    "Answer",
    "FailureWindow",
    "KeyModel",
    "RecordedUpstream",
    "SimulatedUpstream",
    "UpstreamModel",
    "UpstreamModelError",
    "load_upstream_model",
]

EPOCH: Final = 1_767_225_600.0
"""Unix time of virtual time 0 (2026-01-01 00:00 UTC): the wall clock of a replay."""

FAILURE_KINDS: Final = ("timeout", "reset", "connect")
"""Failure window kinds that answer with no response (a transport failure)."""

_SPENT: Final = 1e-12
"""A balance at or below this is spent (float sums of prices leave dust)."""

Answer = tuple[int | None, float, Any, Any, str | None, float, float]
"""(status or None, delay until the answer, headers, body, failure reason,
body duration after the headers, cost)."""

Sampler = Callable[[], float]


class UpstreamModelError(ValueError):
    """An upstream model is invalid; the message names the field and the fix."""


def _num(data: Mapping[str, Any], name: str, where: str, *, default: float | None = None) -> Any:
    value = data.get(name, default)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise UpstreamModelError(f"{where}.{name}: expected a non-negative number, got {value!r}")
    return value


def _limit(data: Mapping[str, Any], name: str, where: str) -> Any:
    """A rate limit: absent, or a number more than zero."""
    value = _num(data, name, where)
    if value == 0:
        raise UpstreamModelError(f"{where}.{name}: expected a number more than zero, got 0")
    return value


def _known(data: object, fields: tuple[str, ...], where: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise UpstreamModelError(f"{where}: expected a table/object, got {type(data).__name__}")
    extra = sorted(set(data) - set(fields))
    if extra:
        raise UpstreamModelError(f"{where}.{extra[0]}: unknown field (known: {', '.join(fields)})")
    return data


_LATENCY_FIELDS: Final = ("kind", "value", "median", "sigma", "low", "high", "mean", "min", "max")


def check_latency(spec: object, where: str) -> dict[str, Any]:
    """Validate a latency distribution (a number means ``{"kind": "fixed", "value": n}``)."""
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        spec = {"kind": "fixed", "value": spec}
    data = _known(spec, _LATENCY_FIELDS, where)
    kind = data.get("kind", "fixed")
    needs = {
        "fixed": ("value",),
        "lognormal": ("median", "sigma"),
        "uniform": ("low", "high"),
        "exponential": ("mean",),
    }
    if kind not in needs:
        raise UpstreamModelError(f"{where}.kind: expected one of {', '.join(needs)}, got {kind!r}")
    for name in needs[kind]:
        if _num(data, name, where) is None:
            raise UpstreamModelError(f"{where}.{name}: required for a {kind} distribution")
    for name in ("min", "max"):
        _num(data, name, where)
    if kind == "uniform" and data["high"] < data["low"]:
        raise UpstreamModelError(f"{where}.high: must be at least low")
    if kind == "lognormal" and data["sigma"] > 10:
        raise UpstreamModelError(f"{where}.sigma: at most 10, got {data['sigma']!r}")
    return dict(data)


QUANTILES: Final = 4096
"""Random latencies are drawn from this many quantiles of their distribution."""


def quantile_table(spec: Mapping[str, Any]) -> list[float]:
    """The distribution's quantiles at (i + 1/2) / QUANTILES, clipped to min/max."""
    kind = spec.get("kind", "fixed")
    low = float(spec.get("min", 0.0))
    high = float(spec.get("max", math.inf))
    probs = [(i + 0.5) / QUANTILES for i in range(QUANTILES)]
    if kind == "lognormal":
        median, sigma = max(float(spec["median"]), 1e-9), float(spec["sigma"])
        normal = NormalDist()
        values = [median * math.exp(sigma * normal.inv_cdf(p)) for p in probs]
    elif kind == "uniform":
        a, b = float(spec["low"]), float(spec["high"])
        values = [a + (b - a) * p for p in probs]
    else:
        mean = float(spec["mean"])
        values = [-mean * math.log1p(-p) for p in probs]
    return [min(max(v, low), high) for v in values]


def make_sampler(spec: Mapping[str, Any], rng: random.Random) -> Sampler:
    """A function drawing latencies (seconds) from ``spec`` with ``rng``.

    Fixed latencies are constants; random ones pick one of :data:`QUANTILES`
    precomputed quantiles with one ``rng.random()`` (fast, and exact to
    1/4,096 in probability).
    """
    if spec.get("kind", "fixed") == "fixed":
        value = min(
            max(float(spec["value"]), float(spec.get("min", 0.0))),
            float(spec.get("max", math.inf)),
        )
        return lambda: value
    table = quantile_table(spec)
    uniform = rng.random
    size = float(QUANTILES)

    def draw() -> float:
        return table[int(uniform() * size)]

    return draw


@attrs.define(kw_only=True)
class FailureWindow:
    """Key ``key`` (``"*"``: every key) answers ``status`` to requests sent in [start, end).

    ``status`` is an HTTP status (401 revoked, 402, 429, 500, 503, ...) or one
    of :data:`FAILURE_KINDS` (no response: a transport failure after
    ``after`` seconds, default 30 for ``timeout``, else the error latency).
    ``retry_after`` (429 only) is sent as ``Retry-After``; default: the time
    left until ``end``; 0 sends none. ``error`` is a code put in the error body (e.g.
    ``free-models-per-min`` makes a 429 account-wide).
    """

    key: str
    start: float
    end: float = math.inf
    status: int | str = 500
    retry_after: float | None = None
    error: str | None = None
    after: float | None = None

    @classmethod
    def from_json(cls, data: object, where: str) -> FailureWindow:
        fields = ("key", "start", "end", "status", "retry_after", "error", "after")
        item = _known(data, fields, where)
        key = item.get("key")
        if not isinstance(key, str) or not key:
            raise UpstreamModelError(f"{where}.key: expected a key alias or '*', got {key!r}")
        status = item.get("status", 500)
        if status not in FAILURE_KINDS and not (
            isinstance(status, int) and not isinstance(status, bool) and 300 <= status <= 599
        ):
            raise UpstreamModelError(
                f"{where}.status: expected an HTTP error status (300-599) or one of "
                f"{', '.join(FAILURE_KINDS)}, got {status!r}"
            )
        start = _num(item, "start", where, default=0.0)
        end = _num(item, "end", where)
        end = math.inf if end is None else end
        if end <= start:
            raise UpstreamModelError(f"{where}.end: must be after start ({start})")
        error = item.get("error")
        if error is not None and not isinstance(error, str):
            raise UpstreamModelError(f"{where}.error: expected a string, got {error!r}")
        return cls(
            key=key,
            start=float(start),
            end=float(end),
            status=status,
            retry_after=_num(item, "retry_after", where),
            error=error,
            after=_num(item, "after", where),
        )

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        if data["end"] == math.inf:
            del data["end"]
        return {k: v for k, v in data.items() if v is not None}


_KEY_FIELDS: Final = ("account", "rpm", "tpm", "credits", "latency", "error_latency")


@attrs.define(kw_only=True)
class KeyModel:
    """What the upstream does with one key: limits, balance, latency."""

    account: str | None = None
    rpm: float | None = None
    tpm: float | None = None
    credits: float | None = None
    latency: dict[str, Any] | None = None
    error_latency: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, data: object, where: str) -> KeyModel:
        item = _known(data, _KEY_FIELDS, where)
        account = item.get("account")
        if account is not None and (not isinstance(account, str) or not account):
            raise UpstreamModelError(f"{where}.account: expected a name, got {account!r}")
        latency = item.get("latency")
        error_latency = item.get("error_latency")
        return cls(
            account=account,
            rpm=_limit(item, "rpm", where),
            tpm=_limit(item, "tpm", where),
            credits=_num(item, "credits", where),
            latency=None if latency is None else check_latency(latency, f"{where}.latency"),
            error_latency=None
            if error_latency is None
            else check_latency(error_latency, f"{where}.error_latency"),
        )

    def merged(self, other: KeyModel) -> KeyModel:
        """This model with ``other``'s set fields on top."""
        values = attrs.asdict(self)
        values.update({k: v for k, v in attrs.asdict(other).items() if v is not None})
        return KeyModel(**values)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in attrs.asdict(self).items() if v is not None}


_MODEL_FIELDS: Final = (
    "latency",
    "error_latency",
    "stream_rate",
    "probe_latency",
    "prices",
    "default",
    "keys",
    "accounts",
    "failures",
    "recorded",
)


@attrs.define(kw_only=True)
class UpstreamModel:
    """The whole simulated upstream (schema in docs/replay.md).

    ``latency``: time to the response headers of a successful request;
    ``error_latency``: of an error answer; ``stream_rate``: tokens per second
    of a streamed body; ``prices``: USD per token when a record has no cost;
    ``default``/``keys``: per-key settings; ``accounts``: account-wide
    ``rpm`` and ``credits`` shared by keys naming the account; ``failures``:
    failure windows; ``recorded``: answer with what the trace recorded.
    """

    latency: dict[str, Any] = attrs.field(factory=lambda: {"kind": "fixed", "value": 0.5})
    error_latency: dict[str, Any] = attrs.field(factory=lambda: {"kind": "fixed", "value": 0.05})
    stream_rate: float = 50.0
    probe_latency: float = 0.05
    prices: dict[str, float] = attrs.field(factory=dict)
    default: KeyModel = attrs.field(factory=KeyModel)
    keys: dict[str, KeyModel] = attrs.field(factory=dict)
    accounts: dict[str, dict[str, float]] = attrs.field(factory=dict)
    failures: list[FailureWindow] = attrs.field(factory=list)
    recorded: bool = False

    @classmethod
    def from_json(cls, data: object, where: str = "model") -> UpstreamModel:
        """Build from parsed JSON or TOML, checking every field."""
        item = _known(data, _MODEL_FIELDS, where)
        prices = _known(item.get("prices", {}), ("prompt", "completion"), f"{where}.prices")
        for name in ("prompt", "completion"):
            _num(prices, name, f"{where}.prices")
        keys = item.get("keys", {})
        if not isinstance(keys, Mapping):
            raise UpstreamModelError(f"{where}.keys: expected a table of key aliases")
        accounts = item.get("accounts", {})
        if not isinstance(accounts, Mapping):
            raise UpstreamModelError(f"{where}.accounts: expected a table of account names")
        for name, account in accounts.items():
            fields = _known(account, ("rpm", "credits"), f"{where}.accounts.{name}")
            _limit(fields, "rpm", f"{where}.accounts.{name}")
            _num(fields, "credits", f"{where}.accounts.{name}")
        failures = item.get("failures", [])
        if not isinstance(failures, list):
            raise UpstreamModelError(f"{where}.failures: expected a list of failure windows")
        recorded = item.get("recorded", False)
        if not isinstance(recorded, bool):
            raise UpstreamModelError(f"{where}.recorded: expected true or false")
        stream_rate = _num(item, "stream_rate", where, default=50.0)
        if stream_rate <= 0:
            raise UpstreamModelError(f"{where}.stream_rate: must be more than zero")
        return cls(
            latency=check_latency(item.get("latency", 0.5), f"{where}.latency"),
            error_latency=check_latency(item.get("error_latency", 0.05), f"{where}.error_latency"),
            stream_rate=float(stream_rate),
            probe_latency=float(_num(item, "probe_latency", where, default=0.05)),
            prices={k: float(v) for k, v in prices.items()},
            default=KeyModel.from_json(item.get("default", {}), f"{where}.default"),
            keys={str(k): KeyModel.from_json(v, f"{where}.keys.{k}") for k, v in keys.items()},
            accounts={str(k): dict(v) for k, v in accounts.items()},
            failures=[
                FailureWindow.from_json(f, f"{where}.failures[{i}]") for i, f in enumerate(failures)
            ],
            recorded=recorded,
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (``UpstreamModel.from_json`` rebuilds it)."""
        data: dict[str, Any] = {
            "latency": self.latency,
            "error_latency": self.error_latency,
            "stream_rate": self.stream_rate,
            "probe_latency": self.probe_latency,
        }
        if self.prices:
            data["prices"] = self.prices
        if self.default.to_json():
            data["default"] = self.default.to_json()
        if self.keys:
            data["keys"] = {k: v.to_json() for k, v in self.keys.items()}
        if self.accounts:
            data["accounts"] = self.accounts
        if self.failures:
            data["failures"] = [f.to_json() for f in self.failures]
        if self.recorded:
            data["recorded"] = True
        return data

    def for_key(self, key_id: str) -> KeyModel:
        """The settings of one key: ``default`` with the key's own on top."""
        own = self.keys.get(key_id)
        return self.default if own is None else self.default.merged(own)


def load_upstream_model(path: str | os.PathLike[str]) -> UpstreamModel:
    """Read an upstream model from a ``.json`` or ``.toml`` file."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as file:
            raw = file.read()
    except OSError as exc:
        raise UpstreamModelError(f"{name}: cannot read ({exc.strerror})") from None
    try:
        if name.endswith(".toml"):
            data: object = tomllib.loads(raw.decode())
        else:
            import json

            data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UpstreamModelError(
            f"{name}: not valid {'TOML' if name.endswith('.toml') else 'JSON'} ({exc})"
        ) from None
    return UpstreamModel.from_json(data, name)


# ---------------------------------------------------------------- simulation


class _Account:
    __slots__ = ("balance", "log", "name", "rpm")

    def __init__(self, name: str, rpm: float | None, credits: float | None) -> None:
        self.name = name
        self.rpm = rpm
        self.balance = credits
        self.log: deque[float] = deque()


class _Key:
    __slots__ = (
        "account",
        "balance",
        "error_latency",
        "failures",
        "latency",
        "log",
        "rpm",
        "simple",
        "tok_log",
        "tok_sum",
        "tpm",
    )

    def __init__(
        self,
        spec: KeyModel,
        account: _Account | None,
        latency: Sampler,
        error_latency: Sampler,
        failures: list[FailureWindow],
    ) -> None:
        self.account = account
        self.rpm = spec.rpm
        self.tpm = spec.tpm
        self.balance = spec.credits
        self.latency = latency
        self.error_latency = error_latency
        self.failures = failures
        self.log: deque[float] = deque()
        self.tok_log: deque[tuple[float, int]] = deque()
        self.tok_sum = 0
        self.simple = (
            self.rpm is None
            and self.tpm is None
            and self.balance is None
            and not failures
            and (account is None or (account.rpm is None and account.balance is None))
        )


def _error_body(status: int, message: str, source: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": status, "message": message}
    if source is not None:
        error["metadata"] = {"limit_source": source}
    return {"error": error}


class SimulatedUpstream:
    """A seeded simulated upstream for the keys ``key_ids``.

    ``send(key_id, now, record, attempt)`` answers one attempt sent at ``now``
    (see :data:`Answer`); ``probe(key_id, now)`` answers a probe with
    ``(status, body, delay)``. State (windows, balances) advances with each call.
    """

    recorded = False

    def __init__(self, model: UpstreamModel, key_ids: list[str], seed: int = 0) -> None:
        self.model = model
        self.rng = rng = random.Random(seed)
        self.stream_rate = model.stream_rate
        self.probe_latency = model.probe_latency
        prices = model.prices
        self.price_prompt = prices.get("prompt", 0.0)
        self.price_completion = prices.get("completion", 0.0)
        accounts: dict[str, _Account] = {}
        for name, fields in model.accounts.items():
            accounts[name] = _Account(name, fields.get("rpm"), fields.get("credits"))
        default_latency = make_sampler(model.latency, rng)
        default_error = make_sampler(model.error_latency, rng)
        self.keys: dict[str, _Key] = {}
        for key_id in key_ids:
            spec = model.for_key(key_id)
            account = None
            if spec.account is not None:
                account = accounts.get(spec.account)
                if account is None:
                    account = accounts[spec.account] = _Account(spec.account, None, None)
            failures = [f for f in model.failures if f.key in (key_id, "*")]
            self.keys[key_id] = _Key(
                spec,
                account,
                default_latency if spec.latency is None else make_sampler(spec.latency, rng),
                default_error
                if spec.error_latency is None
                else make_sampler(spec.error_latency, rng),
                failures,
            )
        self.accounts = accounts

    def plain_latency(self, key_id: str) -> Sampler | None:
        """The key's latency sampler if every answer of the key is a 200 (no
        limits, balance or failure window): callers may then build the answer
        themselves, as ``send`` would (``recorded`` upstreams: None)."""
        key = self.keys[key_id]
        return key.latency if key.simple and not self.recorded else None

    def cost(self, record: TraceRecord) -> float:
        """What serving ``record`` costs: its recorded cost, else by the model's prices."""
        if record.cost is not None:
            return record.cost
        return (
            record.prompt_tokens * self.price_prompt
            + record.completion_tokens * self.price_completion
        )

    def send(self, key_id: str, now: float, record: TraceRecord, attempt: int) -> Answer:
        """Answer one attempt of ``record`` sent on ``key_id`` at ``now``."""
        key = self.keys[key_id]
        if key.simple:
            duration = record.completion_tokens / self.stream_rate if record.stream else 0.0
            cost = record.cost
            if cost is None:
                cost = self.cost(record)
            return (200, key.latency(), None, None, None, duration, cost)
        return self._send_limited(key, now, record)

    def _send_limited(self, key: _Key, now: float, record: TraceRecord) -> Answer:
        for window in key.failures:
            if window.start <= now < window.end:
                return self._fail(key, window, now)
        account = key.account
        if key.balance is not None and key.balance <= _SPENT:
            body = _error_body(402, "Insufficient credits: key limit reached")
            return (402, key.error_latency(), None, body, None, 0.0, 0.0)
        if account is not None and account.balance is not None and account.balance <= _SPENT:
            body = _error_body(402, "Insufficient credits", "openrouter_credits")
            return (402, key.error_latency(), None, body, None, 0.0, 0.0)
        if account is not None and account.rpm is not None:
            wait = _window_wait(account.log, account.rpm, now)
            if wait is not None:
                body = _error_body(
                    429, "Rate limit exceeded: free-models-per-min", "free-models-per-min"
                )
                return (
                    429,
                    key.error_latency(),
                    _limit_headers(account.rpm, wait, now),
                    body,
                    None,
                    0.0,
                    0.0,
                )
        if key.rpm is not None:
            wait = _window_wait(key.log, key.rpm, now)
            if wait is not None:
                body = _error_body(429, "Rate limit exceeded")
                return (
                    429,
                    key.error_latency(),
                    _limit_headers(key.rpm, wait, now),
                    body,
                    None,
                    0.0,
                    0.0,
                )
        tokens = record.prompt_tokens + record.completion_tokens
        if key.tpm is not None:
            tok_log = key.tok_log
            while tok_log and tok_log[0][0] <= now - 60.0:
                key.tok_sum -= tok_log.popleft()[1]
            if tok_log and key.tok_sum + tokens > key.tpm:
                wait = tok_log[0][0] + 60.0 - now
                body = _error_body(429, "Rate limit exceeded: tokens per minute")
                return (
                    429,
                    key.error_latency(),
                    _limit_headers(key.tpm, wait, now),
                    body,
                    None,
                    0.0,
                    0.0,
                )
            tok_log.append((now, tokens))
            key.tok_sum += tokens
        if key.rpm is not None:
            key.log.append(now)
        if account is not None and account.rpm is not None:
            account.log.append(now)
        cost = self.cost(record)
        if key.balance is not None:
            key.balance -= cost
        if account is not None and account.balance is not None:
            account.balance -= cost
        duration = record.completion_tokens / self.stream_rate if record.stream else 0.0
        return (200, key.latency(), None, None, None, duration, cost)

    def _fail(self, key: _Key, window: FailureWindow, now: float) -> Answer:
        status = window.status
        if isinstance(status, str):
            after = window.after
            if after is None:
                after = 30.0 if status == "timeout" else key.error_latency()
            return (None, after, None, None, status, 0.0, 0.0)
        headers = None
        if status == 429:
            wait = window.retry_after if window.retry_after is not None else window.end - now
            if math.isfinite(wait) and wait > 0:
                headers = {"retry-after": str(max(1, math.ceil(wait)))}
        message = window.error or {401: "User not found.", 402: "Insufficient credits"}.get(
            status, f"Error {status}"
        )
        body = _error_body(status, message, window.error)
        return (status, key.error_latency(), headers, body, None, 0.0, 0.0)

    def probe(self, key_id: str, now: float) -> tuple[int | None, Any, float]:
        """Answer a probe (OpenRouter ``GET /key``): (status, body, delay).

        Probes are free and never rate limited; a revoked key answers 401, a
        spent key reports ``limit_remaining`` 0, a spent account its usage.
        """
        key = self.keys[key_id]
        for window in key.failures:
            if window.start <= now < window.end:
                status = window.status
                if isinstance(status, str):
                    return None, None, window.after or self.probe_latency
                if status in (401, 403) or status >= 500:
                    return status, _error_body(status, "probe failed"), self.probe_latency
        if key.balance is not None and key.balance <= _SPENT:
            return 200, {"data": {"limit_remaining": 0}}, self.probe_latency
        account = key.account
        if account is not None and account.balance is not None and account.balance <= _SPENT:
            data = {"total_credits": 1.0, "total_usage": 1.0 - account.balance}
            return 200, {"data": data}, self.probe_latency
        return 200, {"data": {"limit_remaining": key.balance}}, self.probe_latency


def _window_wait(log: deque[float], limit: float, now: float) -> float | None:
    """Seconds until a sliding 60 s window with ``limit`` requests has room, or None."""
    horizon = now - 60.0
    while log and log[0] <= horizon:
        log.popleft()
    if len(log) >= limit:
        return log[0] + 60.0 - now
    return None


def _limit_headers(limit: float, wait: float, now: float) -> dict[str, str]:
    reset_ms = int((EPOCH + now + wait) * 1000.0)
    return {
        "retry-after": str(max(1, math.ceil(wait))),
        "x-ratelimit-limit": str(int(limit)),
        "x-ratelimit-remaining": "0",
        "x-ratelimit-reset": str(reset_ms),
    }


class RecordedUpstream(SimulatedUpstream):
    """Re-issues what the trace recorded: attempt *n* of a request gets the
    answer its recorded attempt *n* got (the last one when the replay makes
    more attempts than were recorded), whatever key the pool picks now.
    Records without attempts (rejected before any send) get a 200 drawn
    from the model."""

    recorded = True

    def send(self, key_id: str, now: float, record: TraceRecord, attempt: int) -> Answer:
        attempts = record.attempts
        if not attempts:
            return super().send(key_id, now, record, attempt)
        rec = attempts[min(attempt, len(attempts)) - 1]
        status = rec.status
        headers = rec.headers or None
        body = None
        if status is not None and status >= 300:
            body = _error_body(status, rec.error or f"Error {status}", rec.error)
        cost = self.cost(record) if status is not None and 200 <= status < 300 else 0.0
        return (status, rec.latency, headers, body, rec.reason, rec.duration, cost)

    def probe(self, key_id: str, now: float) -> tuple[int | None, Any, float]:
        return 200, None, self.probe_latency
