"""The simulated upstream: what each key's requests would get, on a virtual clock.

Pure and seeded: an :class:`UpstreamModel` describes per-key and per-account
limits, credit balances, latency distributions and failure windows (as JSON or
TOML, schema in docs/replay.md); a :class:`SimulatedUpstream` built from it
answers each attempt the replay engine sends. Nothing here sleeps or reads a
clock; randomness comes from one ``random.Random(seed)``, drawn in event order.

Answers follow OpenRouter: a 429 carries ``Retry-After`` (whole seconds) and
``X-RateLimit-Limit/-Remaining/-Reset`` (epoch milliseconds on the virtual wall
clock :data:`EPOCH` + now, or the recording's wall clock in recorded mode);
account-wide limits name ``free-models-per-min`` in the body so the core cools
the whole account; a spent key answers 402.
"""

from __future__ import annotations

import math
import os
import random
import tomllib
from collections.abc import Callable, Mapping
from statistics import NormalDist
from typing import Any, Final

import attrs

from ..core.config import finite
from ..upstream.behaviours import (
    Behaviour,
    Call,
    Chain,
    Credits,
    Hang,
    Ok,
    Reply,
    error_document,
    key_data,
)
from ..upstream.windows import TRANSPORT_FAILURES, Outage, SlidingRateLimit, TokenRateLimit
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

FAILURE_KINDS: Final = TRANSPORT_FAILURES
"""Failure window kinds that answer with no response (a transport failure)."""

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
    if not finite(value) or value < 0:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise UpstreamModelError(f"{where}.{name}: expected a non-negative number, got {shown}")
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

    def behaviour(self) -> Outage:
        """The window as the upstream model runs it (for the keys it names)."""
        return Outage(
            start=self.start,
            end=self.end,
            status=self.status,
            retry_after=self.retry_after,
            error=self.error,
            after=self.after,
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
        probe_latency = _num(item, "probe_latency", where, default=0.05)
        _check_probe_latency(probe_latency, where)
        return cls(
            latency=check_latency(item.get("latency", 0.5), f"{where}.latency"),
            error_latency=check_latency(item.get("error_latency", 0.05), f"{where}.error_latency"),
            stream_rate=float(stream_rate),
            probe_latency=float(probe_latency),
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


def _check_probe_latency(value: float, where: str) -> None:
    """A probe's answer must take time: answered at the instant it is sent, with a
    ``probe_interval`` of 0, probes would follow each other without end at one
    virtual instant."""
    if not value > 0:
        raise UpstreamModelError(
            f"{where}.probe_latency: must be more than zero, got {value!r} "
            "(fix: a probe's round trip, e.g. 0.05)"
        )


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
    except RecursionError:
        raise UpstreamModelError(
            f"{name}: nested too deeply (an upstream model is a few levels of tables; fix the file)"
        ) from None
    try:
        return UpstreamModel.from_json(data, name)
    except RecursionError:  # pragma: no cover - the parsers refuse such nesting first
        raise UpstreamModelError(f"{name}: nested too deeply (fix the file)") from None


# ---------------------------------------------------------------- simulation


class _Key:
    __slots__ = ("behaviour", "error_latency", "latency", "simple", "usage")

    def __init__(
        self, behaviour: Behaviour | None, latency: Sampler, error_latency: Sampler
    ) -> None:
        self.behaviour = behaviour
        self.latency = latency
        self.error_latency = error_latency
        self.simple = behaviour is None  # every answer a 200
        self.usage = 0.0


def _account_parts(fields: Mapping[str, float]) -> list[Behaviour]:
    """An account's shared balance and per-minute limit (free-model style)."""
    parts: list[Behaviour] = []
    if fields.get("credits") is not None:
        parts.append(Credits(float(fields["credits"]), limit_source="openrouter_credits"))
    if fields.get("rpm") is not None:
        parts.append(
            SlidingRateLimit(
                fields["rpm"],
                message="Rate limit exceeded: free-models-per-min",
                limit_source="free-models-per-min",
            )
        )
    return parts


class SimulatedUpstream:
    """A seeded simulated upstream for the keys ``key_ids``.

    Every key is a chain of the behaviours of ``keyrotor.upstream`` (the model
    the fake HTTP server runs too): its failure windows (``Outage``), its own
    balance, its account's balance and per-minute limit (instances shared by the
    account's keys), its ``rpm`` and its ``tpm``, asked in that order.
    ``send(key_id, now, record, attempt)`` answers one attempt sent at ``now``
    (see :data:`Answer`); ``probe(key_id, now)`` answers a probe with
    ``(status, body, delay)``. State (windows, balances) advances with each call.

    ``accounts`` maps a key to its account when the model names none for it
    (the pool's keys: the trace header's ``account``); the model's own
    ``account`` for a key comes first. ``epoch`` is the Unix time of virtual
    time 0, for the absolute times in answers (``X-RateLimit-Reset``).
    """

    recorded = False

    def __init__(
        self,
        model: UpstreamModel,
        key_ids: list[str],
        seed: int = 0,
        *,
        accounts: Mapping[str, str | None] | None = None,
        epoch: float = EPOCH,
    ) -> None:
        _check_probe_latency(model.probe_latency, "model")
        self.model = model
        self.epoch = epoch
        self.rng = rng = random.Random(seed)
        self.stream_rate = model.stream_rate
        self.probe_latency = model.probe_latency
        prices = model.prices
        self.price_prompt = prices.get("prompt", 0.0)
        self.price_completion = prices.get("completion", 0.0)
        shared = {name: _account_parts(f) for name, f in model.accounts.items()}
        pool_accounts = accounts or {}
        default_latency = make_sampler(model.latency, rng)
        default_error = make_sampler(model.error_latency, rng)
        self.keys: dict[str, _Key] = {}
        for key_id in key_ids:
            spec = model.for_key(key_id)
            parts: list[Behaviour] = [
                f.behaviour() for f in model.failures if f.key in (key_id, "*")
            ]
            if spec.credits is not None:
                parts.append(Credits(float(spec.credits), limit_source="openrouter_key_limit"))
            account = spec.account if spec.account is not None else pool_accounts.get(key_id)
            if account is not None:
                parts.extend(shared.get(account, ()))
            if spec.rpm is not None:
                parts.append(SlidingRateLimit(spec.rpm))
            if spec.tpm is not None:
                parts.append(TokenRateLimit(spec.tpm))
            self.keys[key_id] = _Key(
                Chain(*parts) if parts else None,
                default_latency if spec.latency is None else make_sampler(spec.latency, rng),
                default_error
                if spec.error_latency is None
                else make_sampler(spec.error_latency, rng),
            )

    def behaviour(self, key_id: str) -> Behaviour:
        """What ``key_id`` answers with (``Ok()`` for a key without limits): the
        fake HTTP server runs the same instances (``scenario``)."""
        return self.keys[key_id].behaviour or Ok()

    def scenario(self, secrets: Mapping[str, str]) -> Any:
        """A ``keyrotor.testing.Scenario`` serving this model's behaviours over HTTP
        (alias -> secret in ``secrets``), at the model's prices, with its clock's
        time 0 at this upstream's ``epoch`` (:data:`EPOCH` by default). It shares
        this upstream's state."""
        from ..testing import Scenario

        scenario = Scenario(
            prompt_price=self.price_prompt,
            completion_price=self.price_completion,
            models=(),
            epoch=self.epoch,
        )
        for alias, secret in secrets.items():
            scenario.add(secret, self.behaviour(alias), alias=alias)
        return scenario

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
        duration = record.completion_tokens / self.stream_rate if record.stream else 0.0
        behaviour = key.behaviour
        if behaviour is None:
            return (200, key.latency(), None, None, None, duration, self.cost(record))
        call = Call(
            endpoint="/chat/completions",
            model=record.model or "",
            stream=record.stream,
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            cost=self.cost(record),
            now=now,
            epoch=self.epoch,
        )
        outcome = behaviour.decide(call)
        if outcome is None:
            call.commit()
            key.usage += call.cost
            return (200, key.latency(), None, None, None, duration, call.cost)
        if isinstance(outcome, Reply):
            headers = {name.lower(): value for name, value in outcome.headers} or None
            return (outcome.status, key.error_latency(), headers, outcome.document, None, 0.0, 0.0)
        if isinstance(outcome, Hang):
            after = 30.0 if outcome.after is None else outcome.after
            return (None, after, None, None, "timeout", 0.0, 0.0)
        after = key.error_latency() if outcome.after is None else outcome.after
        return (None, after, None, None, outcome.reason, 0.0, 0.0)

    def probe(self, key_id: str, now: float) -> tuple[int | None, Any, float]:
        """Answer a probe (OpenRouter ``GET /key``): (status, body, delay).

        Probes are free and never rate limited; a revoked key answers 401; the
        body's ``limit_remaining`` is the key's balance (else its account's)."""
        key = self.keys[key_id]
        delay = self.probe_latency
        behaviour = key.behaviour
        if behaviour is None:
            return 200, {"data": key_data(key_id, key.usage)}, delay
        outcome = behaviour.probe(Call(endpoint="/key", now=now, epoch=self.epoch))
        if outcome is None:
            data = key_data(key_id, key.usage)
            behaviour.describe(data)
            return 200, {"data": data}, delay
        if isinstance(outcome, Reply):
            return outcome.status, outcome.document, delay
        return None, None, outcome.after or delay


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
            metadata = None if rec.error is None else {"limit_source": rec.error}
            body = error_document(status, rec.error or f"Error {status}", metadata)
        cost = self.cost(record) if status is not None and 200 <= status < 300 else 0.0
        return (status, rec.latency, headers, body, rec.reason, rec.duration, cost)

    def probe(self, key_id: str, now: float) -> tuple[int | None, Any, float]:
        return 200, None, self.probe_latency
