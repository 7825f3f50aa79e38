"""What the proxy sees of each model, kept apart from key health.

Per model named in a request: requests, answers by class, the "model is not
available" answers (404: no endpoints, deprecated, free variant ended; 503:
no provider available), and the time to the answer's head (an EWMA and the
last value). It only observes: keys are judged by the core alone. A model's
"unavailable" answers (404 no endpoints or deprecated, 503 no instances) are
the core's ``model_unavailable`` verdict: delivered at once, the key left
alone; a route moves to its next model and cools this one (``router.py``),
and its ``fastest`` strategy reads ``latency_ms``.
"""

from __future__ import annotations

from typing import Any

from ..storage import storable
from .providers import top_model

__all__ = ["MAX_MODEL_CHARS", "ModelHealth", "model_of"]

MAX_MODEL_CHARS = 200
"""The longest model name taken from a request (no model is named longer)."""
MAX_MODELS = 1000
"""Distinct models tracked; later ones are counted under ``"(other)"``."""
ALPHA = 0.2
"""Weight of the newest time in the EWMA."""
UNAVAILABLE = frozenset({404, 503})


def model_of(body: bytes, strict: bool = False) -> str | None:
    """The ``model`` of a JSON request body as the upstream reads it
    (``providers.top_model``: the top-level member, the last of a repeated key,
    escapes decoded), without parsing the body where that can be told; None
    for none, for a name longer than ``MAX_MODEL_CHARS`` or not UTF-8. ``strict``: parsed
    (msgspec: 0.5 µs for a short body, 30 at 64 KB), so that a key written with
    escaped letters is seen too: where a policy hangs on the model (per-model
    budgets), so that no caller names one model to the proxy and another to
    the upstream."""
    if not body:
        return None
    model = top_model(body, strict)
    if model is None or len(model) > MAX_MODEL_CHARS:
        return None
    if not model.isascii() and not storable(model):  # a lone surrogate is no name
        return None
    return model


class _Row:
    __slots__ = ("errors", "last_error", "last_ttfb", "ok", "requests", "ttfb", "unavailable")

    def __init__(self) -> None:
        self.requests = self.ok = self.errors = self.unavailable = 0
        self.ttfb: float | None = None
        self.last_ttfb: float | None = None
        self.last_error: int | None = None


class ModelHealth:
    """Per-model counters and times (``record`` per delivered answer)."""

    def __init__(self, limit: int = MAX_MODELS) -> None:
        self._rows: dict[str, _Row] = {}
        self._limit = limit
        self.latency_ms: dict[str, float] = {}
        """Per model, the EWMA of the time to the answer's head in ms (the router's ``fastest``)."""

    def record(self, model: str, status: int, ttfb: float) -> None:
        """An answer with ``status`` whose head came ``ttfb`` seconds after the request."""
        row = self._rows.get(model)
        if row is None:
            if len(self._rows) >= self._limit:
                model = "(other)"
                row = self._rows.get(model)
            if row is None:
                row = self._rows[model] = _Row()
        row.requests += 1
        if status < 300:
            row.ok += 1
            row.ttfb = ttfb if row.ttfb is None else row.ttfb + ALPHA * (ttfb - row.ttfb)
            row.last_ttfb = ttfb
            self.latency_ms[model] = row.ttfb * 1000
        else:
            row.errors += 1
            row.last_error = status
            if status in UNAVAILABLE:
                row.unavailable += 1

    def status(self) -> dict[str, Any]:
        """For ``/status``: per model, counts, error share and times in ms."""
        return {
            model: {
                "requests": row.requests,
                "ok": row.ok,
                "errors": row.errors,
                "unavailable": row.unavailable,
                "errorShare": round(row.errors / row.requests, 4),
                "ttfbMs": None if row.ttfb is None else round(row.ttfb * 1000, 1),
                "lastTtfbMs": None if row.last_ttfb is None else round(row.last_ttfb * 1000, 1),
                "lastError": row.last_error,
            }
            for model, row in sorted(self._rows.items())
        }
