"""Configuration of a pool: the keys (``KeySpec``) and every option (``PoolConfig``).

Both are frozen and checked when built; an invalid value raises ``PoolError``
naming the field and the fix. Times are seconds; money is USD.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable
from typing import Any, Literal, TypeGuard, get_args

import attrs

from .errors import PoolError

__all__ = [
    "AFFINITY_POINTS_MAX",
    "AFFINITY_VNODES_MAX",
    "POLICIES",
    "SEED_MAX",
    "SEED_MIN",
    "KeySpec",
    "Policy",
    "PoolConfig",
]

Policy = Literal["round_robin", "weighted", "least_busy", "latency", "affinity"]
POLICIES: tuple[str, ...] = get_args(Policy)

_KEY_ID = re.compile(r"[A-Za-z0-9._:@+-]{1,128}")  # fullmatch: "$" would pass a final newline
SEED_MIN: int = -(2**63)
SEED_MAX: int = 2**63 - 1
"""``PoolConfig.seed`` bounds: the hash ring salts with it as a signed 64-bit integer."""
AFFINITY_VNODES_MAX: int = 1000
"""``PoolConfig.affinity_vnodes`` at most (points per unit of weight on the ring)."""
AFFINITY_POINTS_MAX: int = 100_000
"""Points one key may have on the ``affinity`` ring (``affinity_vnodes`` x its weight)."""


_FLOAT_MAX = int(sys.float_info.max)


def finite(value: object) -> TypeGuard[float]:
    """Is ``value`` a real number (not a bool) that a float holds finitely? (An
    int too large for a float is not: ``math.isfinite`` would raise on it.)"""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):
        return -_FLOAT_MAX <= value <= _FLOAT_MAX
    return math.isfinite(value)


def shown(value: object) -> str:
    """``repr(value)``, short for an int too large for a float (whose repr may
    even be refused: Python limits int-to-text conversion)."""
    if isinstance(value, int) and not isinstance(value, bool) and not finite(value):
        return f"an integer of {value.bit_length()} bits"
    return repr(value)


def _positive(owner: object, name: str, value: float | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if not finite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = "zero or more" if allow_zero else "more than zero"
        raise PoolError(
            f"{type(owner).__name__}.{name} must be a finite number {bound}, got {shown(value)}",
            fix=f"set {name} to a {'non-negative' if allow_zero else 'positive'} number or None",
        )


@attrs.frozen(kw_only=True)
class KeySpec:
    """One key of the pool, known to the core only by ``key_id`` (never the secret).

    Attributes:
        key_id: alias of the key (letters, digits and ``._:@+-``, at most 128).
        weight: share of traffic under the ``weighted`` policy (and vnode count
            under ``affinity``); more than zero.
        account: keys with the same account share account-wide limits (for
            example OpenRouter's free-model limits): one such 429 cools them all.
        max_in_flight: at most this many requests at once on the key.
        rpm: known requests-per-minute limit; requests are paced evenly under it.
        tpm: known tokens-per-minute limit (prompt + completion).
        budget: spend limit in USD; at or over it the key is ``depleted`` (for a
            lifetime budget, until an operator says otherwise: no probe ends it).
        budget_window: the budget applies per window of this many seconds
            (``None``: for the key's whole life).
        credits: known balance in USD (for ``PoolConfig.weight_by="credits"``).
    """

    key_id: str
    weight: float = 1.0
    account: str | None = None
    max_in_flight: int | None = None
    rpm: float | None = None
    tpm: float | None = None
    budget: float | None = None
    budget_window: float | None = None
    credits: float | None = None

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.key_id, str) or not _KEY_ID.fullmatch(self.key_id):
            raise PoolError(
                f"invalid key_id {self.key_id!r}",
                fix="use an alias of 1-128 letters, digits or ._:@+- (never the secret itself)",
            )
        _positive(self, "weight", self.weight)
        _positive(self, "rpm", self.rpm)
        _positive(self, "tpm", self.tpm)
        _positive(self, "budget", self.budget)
        _positive(self, "budget_window", self.budget_window)
        _positive(self, "credits", self.credits, allow_zero=True)
        if self.max_in_flight is not None and (
            isinstance(self.max_in_flight, bool)
            or not isinstance(self.max_in_flight, int)
            or self.max_in_flight < 1
        ):
            raise PoolError(
                "KeySpec.max_in_flight must be an integer of at least 1, "
                f"got {shown(self.max_in_flight)}",
                fix="set max_in_flight to a positive integer or None for no limit",
            )
        if self.account is not None and (not isinstance(self.account, str) or not self.account):
            raise PoolError(
                f"KeySpec.account must be a non-empty string or None, got {self.account!r}"
            )

    def to_json(self) -> dict[str, Any]:
        """The spec as a JSON-able dict (``KeySpec(**d)`` rebuilds it)."""
        return attrs.asdict(self)


def _key_tuple(keys: Iterable[KeySpec]) -> tuple[KeySpec, ...]:
    return tuple(keys)


@attrs.frozen(kw_only=True)
class PoolConfig:
    """Every option of a pool. Defaults follow the seed documents.

    Choosing a key:
        keys: the keys (ids unique). A pool may start empty (keys added at
            runtime with ``KeyAdded``); until then every request is rejected.
        policy: ``round_robin`` (default), ``weighted`` (smooth, by ``weight`` or
            remaining credits), ``least_busy``, ``latency`` (peak EWMA with
            exploration) or ``affinity`` (consistent hashing on a session key).
        weight_by: ``"weight"`` or ``"credits"`` (remaining credits as weight).
        seed: seeds the pool's own random generator and hashes; same seed and
            events, same decisions.
        latency_alpha: EWMA smoothing factor for the ``latency`` policy.
        latency_explore: share of ``latency`` picks that go round robin instead.
        affinity_vnodes: points per unit of weight on the ``affinity`` hash ring.

    Failover and waiting:
        max_attempts: attempts per request, the first included.
        queue_limit: requests that may wait for a key at once (0: never wait).
        queue_timeout: default longest wait for a key, per request.

    Health:
        rate_limit_cooldown: cooldown after a 429 with no reset signal (15 min).
        in_flight_budget_cooldown: cooldown after OpenRouter's temporary 402.
        degraded_cooldown: cooldown of a degraded key (5 min).
        error_window: seconds of the sliding window that counts upstream faults.
        error_min_requests: a key is judged only after this many requests in it.
        error_threshold: error share above which a key is degraded, when the
            rest of the pool is below it (the key *alone* keeps failing).
        timeout_strikes: attempts on one key that time out in a row, while
            another key answered since the first of them was sent, degrade the
            key at once (a hanging key); a timed-out half-open trial does so
            alone. ``0``: timeouts only count in the error window.
        min_healthy: below this many usable keys, probe every cooling key.
        probe_interval: least time between two probes of one key.
        recheck_interval: failed and depleted keys are probed this often
            (``None``: only by an operator or the ``min_healthy`` rule).
    """

    keys: tuple[KeySpec, ...] = attrs.field(converter=_key_tuple)
    policy: Policy = "round_robin"
    weight_by: Literal["weight", "credits"] = "weight"
    seed: int = 0
    max_attempts: int = 3
    queue_limit: int = 1000
    queue_timeout: float = 30.0
    rate_limit_cooldown: float = 900.0
    in_flight_budget_cooldown: float = 10.0
    degraded_cooldown: float = 300.0
    error_window: float = 60.0
    error_min_requests: int = 5
    error_threshold: float = 0.5
    timeout_strikes: int = 2
    min_healthy: int = 1
    probe_interval: float = 30.0
    recheck_interval: float | None = 900.0
    latency_alpha: float = 0.3
    latency_explore: float = 0.05
    affinity_vnodes: int = 16

    def __attrs_post_init__(self) -> None:
        seen: set[str] = set()
        for spec in self.keys:
            if not isinstance(spec, KeySpec):
                raise PoolError(
                    f"keys must hold KeySpec instances, got {type(spec).__name__}",
                    fix="wrap each key as KeySpec(key_id=...)",
                )
            if spec.key_id in seen:
                raise PoolError(
                    f"duplicate key_id {spec.key_id!r}", fix="give every key its own alias"
                )
            seen.add(spec.key_id)
        if self.policy not in POLICIES:
            raise PoolError(
                f"unknown policy {self.policy!r}", fix=f"choose one of {', '.join(POLICIES)}"
            )
        if self.weight_by not in ("weight", "credits"):
            raise PoolError(
                f"unknown weight_by {self.weight_by!r}", fix="use 'weight' or 'credits'"
            )
        for name in ("max_attempts", "affinity_vnodes"):
            _integer(self, name, minimum=1)
        for name in ("queue_limit", "error_min_requests", "timeout_strikes", "min_healthy"):
            _integer(self, name, minimum=0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise PoolError(f"PoolConfig.seed must be an integer, got {shown(self.seed)}")
        if not SEED_MIN <= self.seed <= SEED_MAX:
            raise PoolError(
                f"PoolConfig.seed must be a signed 64-bit integer, got {shown(self.seed)}",
                fix=f"set seed to an integer from {SEED_MIN} to {SEED_MAX}, such as 0",
            )
        if self.affinity_vnodes > AFFINITY_VNODES_MAX:
            raise PoolError(
                f"PoolConfig.affinity_vnodes must be at most {AFFINITY_VNODES_MAX}, "
                f"got {shown(self.affinity_vnodes)}",
                fix="set affinity_vnodes to 16 (the default) or a few hundred at most",
            )
        for spec in self.keys:  # every policy: requests with a session use the ring too
            if self.affinity_vnodes * spec.weight > AFFINITY_POINTS_MAX:
                raise PoolError(
                    f"key {spec.key_id!r} would have {self.affinity_vnodes} x "
                    f"{spec.weight:g} points on the affinity ring, more than "
                    f"{AFFINITY_POINTS_MAX:,}",
                    fix="lower the key's weight or affinity_vnodes (weights are "
                    "relative: 1 and 3 share as 100 and 300 do)",
                )
        for name in (
            "queue_timeout",
            "rate_limit_cooldown",
            "in_flight_budget_cooldown",
            "degraded_cooldown",
            "probe_interval",
        ):
            _positive(self, name, getattr(self, name), allow_zero=True)
        _positive(self, "error_window", self.error_window)
        _positive(self, "recheck_interval", self.recheck_interval)
        for name in ("error_threshold", "latency_alpha", "latency_explore"):
            value = getattr(self, name)
            _positive(self, name, value, allow_zero=True)
            if value > 1:
                raise PoolError(
                    f"PoolConfig.{name} must be between 0 and 1, got {value!r}",
                    fix=f"set {name} to a fraction such as 0.5",
                )

    def to_json(self) -> dict[str, Any]:
        """The configuration as a JSON-able dict (see :meth:`from_json`)."""
        data = attrs.asdict(self, recurse=False)
        data["keys"] = [spec.to_json() for spec in self.keys]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PoolConfig:
        """Rebuild a configuration from :meth:`to_json` output."""
        fields = dict(data)
        fields["keys"] = [KeySpec(**spec) for spec in fields.get("keys", ())]
        try:
            return cls(**fields)
        except TypeError as exc:
            raise PoolError(f"invalid pool configuration: {exc}") from None


def _integer(owner: object, name: str, *, minimum: int) -> None:
    value = getattr(owner, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PoolError(
            f"PoolConfig.{name} must be an integer of at least {minimum}, got {shown(value)}",
            fix=f"set {name} to an integer >= {minimum}",
        )
