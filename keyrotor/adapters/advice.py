"""Recommendations: plain sentences with figures, from the catalog and the
recorded usage (``GET /analytics/recommendations``, the dashboard).

- a model that cost money this week, beside the cheapest paid model of the
  catalog with at least its context, its parameters and its input
  modalities, at half its price or less;
- a key whose answers today were mostly auth or credit failures (revoked?
  out of credits?), or that was rate limited often (its account is shared or
  on a low tier?);
- an account whose free-model day ran out, and when.

Pure: figures in, sentences out.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from ..models import Catalog, ModelInfo

__all__ = ["recommendations"]

MIN_COST = 0.01
"""A model's week below this (USD) is not worth a sentence."""
MAX_SHARE = 0.5
"""An alternative must cost at most this share of the model's price."""
FAILED = 5
RATE_LIMITED = 20


def _price(model: ModelInfo) -> float | None:
    p = model.pricing
    if not p.known or p.variable:
        return None
    return p.prompt + p.completion


def _can_replace(old: ModelInfo, new: ModelInfo) -> bool:
    if new.id == old.id or (old.context_length or 0) > (new.context_length or 0):
        return False
    if old.supported_parameters and not old.supported_parameters <= new.supported_parameters:
        return False
    return set(old.input_modalities) <= set(new.input_modalities)


def recommendations(
    week_costs: Mapping[str, float],
    catalog: Catalog | None,
    key_errors: Mapping[str, Mapping[str, int]],
    free: Mapping[str, Mapping[str, Any]],
) -> list[dict[str, str]]:
    """``week_costs``: model -> USD of the last 7 days; ``key_errors``: key ->
    errors by class today; ``free``: account -> ``FreeTier.status`` entry."""
    out: list[dict[str, str]] = []
    if catalog is not None:
        paid = [(price, m) for m in catalog.models if (price := _price(m))]
        for model_id, cost in sorted(week_costs.items(), key=lambda kv: (-kv[1], kv[0]))[:10]:
            old = catalog.get(model_id)
            old_price = None if old is None else _price(old)
            if cost < MIN_COST or old is None or not old_price:
                continue
            fits = [
                (p, m.id, m) for p, m in paid if p <= MAX_SHARE * old_price and _can_replace(old, m)
            ]
            if not fits:
                continue
            price, _, new = min(fits, key=lambda f: (f[0], f[1]))
            out.append(
                {
                    "kind": "cheaper_model",
                    "text": f"model {model_id} cost ${cost:,.2f} this week; model {new.id} has "
                    f"its context and parameters at {price / old_price:.0%} of the price",
                }
            )
    for key, errors in sorted(key_errors.items()):
        failed = errors.get("auth", 0) + errors.get("credits", 0)
        if failed >= FAILED:
            out.append(
                {
                    "kind": "key_failing",
                    "text": f"key {key} failed {failed} times today (auth {errors.get('auth', 0)}, "
                    f"credits {errors.get('credits', 0)}): revoked, or out of credits?",
                }
            )
        limited = errors.get("rate_limited", 0)
        if limited >= RATE_LIMITED:
            out.append(
                {
                    "kind": "key_rate_limited",
                    "text": f"key {key} was rate limited {limited} times today: its account may "
                    "be shared with other keys or clients, or on a low tier",
                }
            )
    for account, use in sorted(free.items()):
        spent = use.get("spentAt")
        if spent is not None:
            at = time.strftime("%H:%M", time.gmtime(spent))
            out.append(
                {
                    "kind": "free_quota_spent",
                    "text": f"free quota of account {account} ({use.get('perDay')} requests) ran "
                    f"out at {at} UTC today: another account's keys, or 10 credits bought "
                    "(1000 a day), would add room",
                }
            )
    return out
