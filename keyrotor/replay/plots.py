"""PNG plots of a replay: per-key load and key states over virtual time.

Needs matplotlib (``pip install 'keyrotor[plots]'``), imported only here and
only when asked for; the Agg backend is used, so no display is needed.
"""

from __future__ import annotations

import os
import re
from typing import Any

from .engine import RunResult
from .report import Report

__all__ = ["PLOT_KEYS", "PlotError", "plot_report"]

PLOT_KEYS = 16
"""Keys drawn one by one (the first ones in pool order); state counts cover all keys."""

STATE_COLORS = {
    "healthy": "#4caf50",
    "recovering": "#8bc34a",
    "rate_limited": "#ff9800",
    "degraded": "#ffc107",
    "depleted": "#9c27b0",
    "failed": "#f44336",
    "disabled": "#607d8b",
}


class PlotError(RuntimeError):
    """Plots cannot be drawn (matplotlib is missing)."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotError(
            "plots need matplotlib: pip install 'keyrotor[plots]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_report(report: Report, directory: str | os.PathLike[str]) -> list[str]:
    """Write one PNG per policy into ``directory``; return their paths.

    Each figure has three panels over virtual time: requests sent per time
    bucket for the first :data:`PLOT_KEYS` keys, each of those keys' state,
    and how many keys of the whole pool are in each state.
    """
    plt = _pyplot()
    os.makedirs(directory, exist_ok=True)
    paths = []
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(report.source.get("name", "replay")))
    for policy, run in report.runs.items():
        path = os.path.join(os.fspath(directory), f"{name}-{policy}.png")
        _figure(plt, run, f"{report.source.get('name')}: {policy}", path)
        paths.append(path)
    return paths


def _intervals(run: RunResult, end: float) -> dict[int, list[tuple[float, float, str]]]:
    """Per key index, (start, end, state) intervals from the state changes."""
    spans: dict[int, list[tuple[float, float, str]]] = {}
    current: dict[int, tuple[float, str]] = {}
    for t, idx, state in run.state_changes:
        start, old = current.get(idx, (0.0, "healthy"))
        spans.setdefault(idx, []).append((start, t, old))
        current[idx] = (t, state)
    for idx, (start, old) in current.items():
        spans[idx].append((start, end, old))
    return spans


def _figure(plt: Any, run: RunResult, title: str, path: str) -> None:
    end = max(run.end_time, 1e-9)
    shown = min(len(run.keys), PLOT_KEYS)
    fig, (load_ax, state_ax, count_ax) = plt.subplots(
        3, 1, figsize=(10, 9), sharex=True, gridspec_kw={"height_ratios": [3, 2, 2]}
    )
    fig.suptitle(title)
    width = run.bucket or 1.0
    for idx, series in sorted(run.load.items()):
        xs = [i * width for i in range(len(series))]
        load_ax.plot(xs, [c / width for c in series], label=run.keys[idx], linewidth=0.8)
    load_ax.set_ylabel("sends per second")
    if run.load:
        load_ax.legend(fontsize="x-small", ncol=4, loc="upper right")
    spans = _intervals(run, end)
    for row in range(shown):
        row_spans = spans.get(row, [(0.0, end, "healthy")])
        bars = [(s, e - s) for s, e, _ in row_spans if e > s]
        colors = [STATE_COLORS.get(state, "#000000") for s, e, state in row_spans if e > s]
        state_ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=colors)
    state_ax.set_yticks(range(shown), [run.keys[i] for i in range(shown)], fontsize="x-small")
    state_ax.set_ylabel("state")
    # keys in each state over time, for the whole pool
    samples = 200
    times = [end * i / samples for i in range(samples + 1)]
    counts: dict[str, list[int]] = {state: [0] * len(times) for state in STATE_COLORS}
    counts["healthy"] = [len(run.keys) - len(spans)] * len(times)  # never changed
    for idx_spans in spans.values():
        for s, e, state in idx_spans:
            for j, t in enumerate(times):
                if s <= t < e or (t == end and e == end):
                    counts[state][j] += 1
    for state, values in counts.items():
        if any(values):
            count_ax.plot(times, values, label=state, color=STATE_COLORS[state])
    count_ax.set_ylabel("keys")
    count_ax.set_xlabel("virtual time (s)")
    count_ax.legend(fontsize="x-small", ncol=4, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
