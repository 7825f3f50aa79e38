"""``GET /metrics``: the pool and the proxy in the Prometheus text format (0.0.4).

Written by hand: a dozen metric families do not need a library, and the
exposition rules that matter (HELP/TYPE once per family, escaped label values,
``_total`` counters, a final newline) are tested.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from ...core import KeyState

__all__ = ["ProxyCounters", "render"]


class ProxyCounters:
    """Counts the proxy keeps beside the pool's own statistics."""

    __slots__ = ("by_status", "failovers", "stream_errors")

    def __init__(self) -> None:
        self.by_status: Counter[int] = Counter()
        self.failovers = 0  # responses that took more than one attempt
        self.stream_errors = 0  # streams that ended with an error event


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: Any) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{name}="{_escape(str(value))}"' for name, value in labels.items())
    return "{" + inner + "}"


def _family(
    name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, Any], float]]
) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{_labels(**labels)} {_number(value)}" for labels, value in samples]
    return lines


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def render(
    status: dict[str, Any],
    counters: ProxyCounters,
    providers: Mapping[str, dict[str, Any]] | None = None,
    pool: dict[str, Any] | None = None,
) -> str:
    """The exposition text for ``status`` (the driver's ``status()``) and
    ``counters``; the keys and pools of ``providers`` (name -> their
    ``status()``) carry a ``provider`` label, the main upstream's none. With
    other processes sharing the pool, ``pool`` (``ProcessBoard.pool()``) adds
    the ``keyrotor_shared_*`` families: every live process, by ``process``."""
    pools = [({}, status), *(({"provider": name}, s) for name, s in (providers or {}).items())]
    keys = [({**where, "key": k["alias"]}, k) for where, s in pools for k in s["keys"]]
    lines: list[str] = []
    lines += _family(
        "keyrotor_key_state",
        "gauge",
        "1 for the state each key is in.",
        (
            ({**key, "state": state.value}, int(k["state"] == state.value))
            for key, k in keys
            for state in KeyState
        ),
    )
    lines += _family(
        "keyrotor_key_in_flight",
        "gauge",
        "Requests in flight on each key.",
        ((key, k["in_flight"]) for key, k in keys),
    )
    lines += _family(
        "keyrotor_key_requests_total",
        "counter",
        "Attempts sent on each key.",
        ((key, k["requests"]) for key, k in keys),
    )
    lines += _family(
        "keyrotor_key_successes_total",
        "counter",
        "2xx answers on each key.",
        ((key, k["successes"]) for key, k in keys),
    )
    lines += _family(
        "keyrotor_key_errors_total",
        "counter",
        "Error answers on each key, by class.",
        (({**key, "class": name}, count) for key, k in keys for name, count in k["errors"].items()),
    )
    lines += _family(
        "keyrotor_key_spend_usd_total",
        "counter",
        "Spend on each key, in USD, as reported by the upstream.",
        ((key, k["spend"]) for key, k in keys),
    )
    lines += _family(
        "keyrotor_key_tokens_total",
        "counter",
        "Tokens on each key, by kind.",
        (
            ({**key, "kind": kind}, k[f"{kind}_tokens"])
            for key, k in keys
            for kind in ("prompt", "completion")
        ),
    )
    lines += _family(
        "keyrotor_pool_requests_total",
        "counter",
        "Requests through the pool, by outcome.",
        (
            ({**where, "outcome": outcome}, s["stats"][outcome])
            for where, s in pools
            for outcome in ("delivered", "rejected")
        ),
    )
    lines += _family(
        "keyrotor_pool_queued",
        "gauge",
        "Requests waiting for a key.",
        ((where, s["stats"]["queued"]) for where, s in pools),
    )
    lines += _family(
        "keyrotor_proxy_responses_total",
        "counter",
        "Responses the proxy sent, by status.",
        (({"status": code}, count) for code, count in sorted(counters.by_status.items())),
    )
    lines += _family(
        "keyrotor_proxy_failovers_total",
        "counter",
        "Responses that needed more than one attempt (failover the caller never saw).",
        [({}, counters.failovers)],
    )
    lines += _family(
        "keyrotor_proxy_stream_errors_total",
        "counter",
        "Streams that ended with an error event after output had started.",
        [({}, counters.stream_errors)],
    )
    if pool is not None:
        lines += _shared(pool["processes"])
    return "\n".join(lines) + "\n"


def _shared(processes: list[dict[str, Any]]) -> list[str]:
    lines = _family(
        "keyrotor_shared_processes",
        "gauge",
        "Processes sharing this pool that were heard from in the last 5 s.",
        [({}, len(processes))],
    )
    lines += _family(
        "keyrotor_shared_requests_total",
        "counter",
        "Requests through each process of the pool, by outcome.",
        (
            ({"process": p["origin"], "outcome": outcome}, p.get(outcome) or 0)
            for p in processes
            for outcome in ("delivered", "rejected")
        ),
    )
    lines += _family(
        "keyrotor_shared_in_flight",
        "gauge",
        "Requests in flight in each process of the pool.",
        (({"process": p["origin"]}, p.get("inFlight") or 0) for p in processes),
    )
    return lines
