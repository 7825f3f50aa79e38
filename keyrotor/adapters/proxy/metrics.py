"""``GET /metrics``: the pool and the proxy in the Prometheus text format (0.0.4).

Written by hand: a dozen metric families do not need a library, and the
exposition rules that matter (HELP/TYPE once per family, escaped label values,
``_total`` counters, a final newline) are tested.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from ...core import KeyState

__all__ = ["ProxyCounters", "render", "render_parts"]


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
    return "{" + _inner(labels) + "}" if labels else ""


def _inner(labels: Mapping[str, Any]) -> str:
    return ",".join(f'{name}="{_escape(str(value))}"' for name, value in labels.items())


def _family(
    name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, Any], float]]
) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{_labels(**labels)} {_number(value)}" for labels, value in samples]
    return lines


def _number(value: float) -> str:
    if type(value) is int:
        return str(value)
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
    return "".join(render_parts(status, counters, providers, pool))


def render_parts(
    status: dict[str, Any],
    counters: ProxyCounters,
    providers: Mapping[str, dict[str, Any]] | None = None,
    pool: dict[str, Any] | None = None,
    keys_per_part: int = 500,
) -> Iterator[str]:
    """``render``'s text in parts, each of at most ``keys_per_part`` keys (an
    empty part: the keys' labels made): a caller may let other work run
    between them. ``counters`` are read when their part is made."""
    pools = [({}, status), *(({"provider": name}, s) for name, s in (providers or {}).items())]
    keys = [(where, k) for where, s in pools for k in s["keys"]]
    parts: list[_Part] = []
    for i in range(0, len(keys), keys_per_part):
        parts.append(
            [(_inner({**w, "key": k["alias"]}), k) for w, k in keys[i : i + keys_per_part]]
        )
        yield ""
    for name, kind, help_text, family in _KEY_FAMILIES:
        yield f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"
        for part in parts:
            yield family(name, part)
    lines: list[str] = []
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
    yield "\n".join(lines) + "\n"


# The per-key families, each a function of its name and some keys (their
# labels, from ``_inner``, and ``status()`` entries) giving their lines: written
# out, as a big pool's text is mostly these (22 lines a key).
_STATE_LABELS = tuple((state.value, _escape(state.value)) for state in KeyState)
_Part = list[tuple[str, dict[str, Any]]]


def _states(name: str, part: _Part) -> str:
    return "".join(
        [
            f'{name}{{{labels},state="{shown}"}} {int(k["state"] == value)}\n'
            for labels, k in part
            for value, shown in _STATE_LABELS
        ]
    )


def _field(field: str) -> Callable[[str, _Part], str]:
    def lines(name: str, part: _Part) -> str:
        return "".join([f"{name}{{{labels}}} {_number(k[field])}\n" for labels, k in part])

    return lines


def _errors(name: str, part: _Part) -> str:
    return "".join(
        [
            f'{name}{{{labels},class="{_escape(str(kind))}"}} {_number(count)}\n'
            for labels, k in part
            for kind, count in k["errors"].items()
        ]
    )


def _tokens(name: str, part: _Part) -> str:
    return "".join(
        [
            f'{name}{{{labels},kind="{kind}"}} {_number(k[field])}\n'
            for labels, k in part
            for kind, field in (("prompt", "prompt_tokens"), ("completion", "completion_tokens"))
        ]
    )


_KEY_FAMILIES: tuple[tuple[str, str, str, Callable[[str, _Part], str]], ...] = (
    ("keyrotor_key_state", "gauge", "1 for the state each key is in.", _states),
    ("keyrotor_key_in_flight", "gauge", "Requests in flight on each key.", _field("in_flight")),
    ("keyrotor_key_requests_total", "counter", "Attempts sent on each key.", _field("requests")),
    ("keyrotor_key_successes_total", "counter", "2xx answers on each key.", _field("successes")),
    ("keyrotor_key_errors_total", "counter", "Error answers on each key, by class.", _errors),
    (
        "keyrotor_key_spend_usd_total",
        "counter",
        "Spend on each key, in USD, as reported by the upstream.",
        _field("spend"),
    ),
    ("keyrotor_key_tokens_total", "counter", "Tokens on each key, by kind.", _tokens),
)


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
