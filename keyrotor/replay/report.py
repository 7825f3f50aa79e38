"""Replay reports: the metrics per policy, side by side, as text and JSON.

Every number is computed from virtual time and counts, rounded to fixed
digits; keys are sorted; nothing machine-specific (paths, wall-clock times)
enters the report. The same trace, model and seed give the same bytes.
docs/replay.md defines each metric.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import attrs

from .engine import RunResult

__all__ = ["Report", "jain_index", "percentile", "summarize"]

PER_KEY_LIMIT = 1000
"""Reports list every key only for pools of at most this many keys."""
EPISODE_LIMIT = 100
"""Reports list at most this many failure episodes (all are counted)."""


def jain_index(values: Sequence[float]) -> float | None:
    """Jain's fairness index (sum x)^2 / (n * sum x^2): 1 is perfectly even, 1/n
    is all on one. None for no values or all zeros."""
    n = len(values)
    squares = sum(v * v for v in values)
    if not n or not squares:
        return None
    return sum(values) ** 2 / (n * squares)


def percentile(values: Sequence[float], p: float, zeros: int = 0) -> float | None:
    """Nearest-rank percentile ``p`` (0-100) of ``values`` plus ``zeros`` extra
    zeros (which sort first); None when empty."""
    total = len(values) + zeros
    if not total:
        return None
    rank = max(1, math.ceil(p / 100.0 * total))
    if rank <= zeros:
        return 0.0
    return sorted(values)[rank - zeros - 1]


def _r(value: float | None, digits: int = 6) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits) + 0.0  # no negative zero


def _dist(values: Sequence[float], zeros: int = 0) -> dict[str, float | None]:
    total = len(values) + zeros
    return {
        "p50": _r(percentile(values, 50, zeros)),
        "p99": _r(percentile(values, 99, zeros)),
        "max": _r(max(values) if values else (0.0 if zeros else None)),
        "mean": _r(sum(values) / total if total else None),
    }


def summarize(run: RunResult) -> dict[str, Any]:
    """The metrics of one run (one policy) as JSON-able data."""
    healthy = [i for i, bad in enumerate(run.ever_unhealthy) if not bad]
    shares = [float(run.sends[i]) for i in healthy]
    positive = [s for s in shares if s > 0]
    errors_total = sum(run.client_errors.values())
    episodes = run.episodes
    recovered = [e["time_to_recover"] for e in episodes if e["time_to_recover"] is not None]
    latencies = [e["failover_latency"] for e in episodes]
    ok = len(run.ttfb)
    spend = run.spend
    result: dict[str, Any] = {
        "requests": run.requests,
        "served": run.served,
        "client_errors": {
            "total": errors_total,
            "rate": _r(errors_total / run.requests if run.requests else None),
            "by_status": dict(sorted(run.client_errors.items())),
        },
        "rejected": run.rejected,
        "cancelled": run.cancelled,
        "lost": run.lost,
        "upstream": {
            "attempts": sum(run.sends),
            "answers": dict(sorted(run.upstream_statuses.items())),
            "rate_limited_429": sum(run.upstream_429),
            "probes": run.probes,
        },
        "fairness": {
            "healthy_keys": len(healthy),
            "jain": _r(jain_index(shares)),
            "jain_all_keys": _r(jain_index([float(x) for x in run.sends])),
            "max_min_ratio": _r(max(shares) / min(shares)) if shares and min(shares) > 0 else None,
            "min_share": _r(min(shares) / sum(shares)) if positive else None,
            "max_share": _r(max(shares) / sum(shares)) if positive else None,
        },
        "failover": {
            "episodes": len(episodes),
            "sends_after_failure": sum(e["sends_after_failure"] for e in episodes),
            "sends_after_blame": sum(  # sends while out of service after a 429/401/402
                e["sends_out_of_service"]
                for e in episodes
                if not e["reason"].startswith(("http_5", "transport_"))
            ),
            "latency": _dist(latencies),
            "affected_requests": len(run.failover_extra),
            "added_latency": _dist(run.failover_extra),
            "error_round_trip": _dist(run.failover_error_rtt),
            "added_beyond_error_round_trips": _dist(run.failover_overhead),
            "failed_over_at_once": len(run.failover_immediate),
            "waited_no_key_usable": run.failover_waited_no_key,
            "waited_while_a_key_was_usable": run.failover_waited_key_usable,
        },
        "recovery": {
            "recovered": len(recovered),
            "not_recovered": len(episodes) - len(recovered),
            "time_to_recover": _dist(recovered),
        },
        "spend": {
            "total": _r(sum(spend), 9),
            "min_key": _r(min(spend), 9) if spend else None,
            "max_key": _r(max(spend), 9) if spend else None,
        },
        "queueing": {
            "queued_requests": len(run.queue_waits),
            "delay": _dist(run.queue_waits, zeros=ok - len(run.queue_waits)),
        },
        "time_to_first_byte": _dist(run.ttfb),
        "final_states": _count(run.final_states),
    }
    if len(run.keys) <= PER_KEY_LIMIT:
        result["keys"] = {
            key: {
                "sends": run.sends[i],
                "served": run.served_by_key[i],
                "spend": _r(spend[i], 9),
                "upstream_429": run.upstream_429[i],
                "stayed_healthy": not run.ever_unhealthy[i],
                "final_state": run.final_states[i],
            }
            for i, key in enumerate(run.keys)
        }
    result["episodes"] = [
        {k: (_r(v) if isinstance(v, float) else v) for k, v in e.items()}
        for e in episodes[:EPISODE_LIMIT]
    ]
    if run.groups:
        sizes = [len(keys) for keys in run.groups.values()]
        distinct = [len(set(keys)) for keys in run.groups.values()]
        result["groups"] = {
            "count": len(sizes),
            "all_distinct": sum(1 for s, d in zip(sizes, distinct, strict=True) if s == d),
            "distinct_keys": _count([str(d) for d in distinct]),
        }
    return result


def _count(values: Sequence[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items()))


@attrs.define(kw_only=True)
class Report:
    """What a replay found, per policy.

    ``source`` describes the input (name, requests, duration, keys, seed,
    upstream mode); ``results`` maps each policy to :func:`summarize` output.
    ``runs`` (raw data for plots) and ``elapsed`` (wall-clock seconds per
    policy, for speed figures) are not part of the JSON or text output.
    """

    source: dict[str, Any]
    results: dict[str, dict[str, Any]]
    runs: dict[str, RunResult] = attrs.field(factory=dict, repr=False, eq=False)
    elapsed: dict[str, float] = attrs.field(factory=dict, repr=False, eq=False)

    def to_data(self) -> dict[str, Any]:
        """The report as JSON-able data."""
        return {
            "report": "keyrotor-replay",
            "version": 1,
            "source": self.source,
            "policies": self.results,
        }

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, two-space indent, a final newline."""
        return json.dumps(self.to_data(), sort_keys=True, indent=2, allow_nan=False) + "\n"

    def speed(self) -> dict[str, float]:
        """Simulated requests per wall-clock second, per policy (not deterministic)."""
        requests = self.source["requests"]
        return {p: requests / s if s > 0 else math.inf for p, s in self.elapsed.items()}

    def to_text(self) -> str:
        """A side-by-side table: one column per policy, one row per metric."""
        src = self.source
        lines = [
            f"replay of {src['name']}: {src['requests']:,} requests over "
            f"{src['duration']:,.1f} s (virtual), {src['keys']:,} keys, seed {src['seed']}, "
            f"{src['upstream']} upstream",
            "",
        ]
        policies = list(self.results)
        rows: list[tuple[str, list[str]]] = []
        for label, path, fmt in _ROWS:
            cells = [_fmt(_get(self.results[p], path), fmt) for p in policies]
            rows.append((label, cells))
        width = max(len(label) for label, _ in rows)
        widths = [
            max(len(policy), *(len(cells[i]) for _, cells in rows))
            for i, policy in enumerate(policies)
        ]
        lines.append(
            " " * width
            + "  "
            + "  ".join(p.rjust(w) for p, w in zip(policies, widths, strict=True))
        )
        for label, cells in rows:
            if not label:
                lines.append("")
                continue
            lines.append(
                label.ljust(width)
                + "  "
                + "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))
            )
        return "\n".join(line.rstrip() for line in lines) + "\n"


_ROWS: list[tuple[str, tuple[str, ...], str]] = [
    ("requests served", ("served",), "int"),
    ("client-visible errors", ("client_errors", "total"), "int"),
    ("  rejected by the pool", ("rejected",), "int"),
    ("  cancelled by the caller", ("cancelled",), "int"),
    ("  lost (must be 0)", ("lost",), "int"),
    ("upstream attempts", ("upstream", "attempts"), "int"),
    ("upstream 429s", ("upstream", "rate_limited_429"), "int"),
    ("probes", ("upstream", "probes"), "int"),
    ("", (), ""),
    ("fairness: healthy keys", ("fairness", "healthy_keys"), "int"),
    ("  Jain's index", ("fairness", "jain"), "f4"),
    ("  Jain's index, all keys", ("fairness", "jain_all_keys"), "f4"),
    ("  max/min share", ("fairness", "max_min_ratio"), "f3"),
    ("", (), ""),
    ("failover episodes", ("failover", "episodes"), "int"),
    ("  sends after failure", ("failover", "sends_after_failure"), "int"),
    ("  sends after 429/401/402", ("failover", "sends_after_blame"), "int"),
    ("  failover latency max", ("failover", "latency", "max"), "s"),
    ("  affected requests", ("failover", "affected_requests"), "int"),
    ("  added latency p50", ("failover", "added_latency", "p50"), "s"),
    ("  added latency max", ("failover", "added_latency", "max"), "s"),
    ("  beyond error RTTs, max", ("failover", "added_beyond_error_round_trips", "max"), "s"),
    ("  failed over at once", ("failover", "failed_over_at_once"), "int"),
    ("  waited: no key usable", ("failover", "waited_no_key_usable"), "int"),
    ("  waited: a key usable (0)", ("failover", "waited_while_a_key_was_usable"), "int"),
    ("keys recovered", ("recovery", "recovered"), "int"),
    ("  not recovered by the end", ("recovery", "not_recovered"), "int"),
    ("  time to recover p50", ("recovery", "time_to_recover", "p50"), "s"),
    ("  time to recover max", ("recovery", "time_to_recover", "max"), "s"),
    ("", (), ""),
    ("queued requests", ("queueing", "queued_requests"), "int"),
    ("  queueing delay p50", ("queueing", "delay", "p50"), "s"),
    ("  queueing delay p99", ("queueing", "delay", "p99"), "s"),
    ("  queueing delay max", ("queueing", "delay", "max"), "s"),
    ("time to first byte p50", ("time_to_first_byte", "p50"), "s"),
    ("time to first byte p99", ("time_to_first_byte", "p99"), "s"),
    ("", (), ""),
    ("batches all on distinct keys", ("groups", "all_distinct"), "int"),
    ("", (), ""),
    ("spend total (USD)", ("spend", "total"), "usd"),
    ("  least spent by a key", ("spend", "min_key"), "usd"),
    ("  most spent by a key", ("spend", "max_key"), "usd"),
]


def _get(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = data
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _fmt(value: Any, fmt: str) -> str:
    if not fmt:
        return ""
    if value is None:
        return "-"
    if fmt == "int":
        return f"{value:,}"
    if fmt == "f4":
        return f"{value:.4f}"
    if fmt == "f3":
        return f"{value:.3f}"
    if fmt == "usd":
        return f"{value:.4f}"
    if value < 0.01:
        return f"{value * 1000:.2f} ms"
    return f"{value:.3f} s"
