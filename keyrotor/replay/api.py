"""The Python API: ``replay(source, policy=..., ...) -> Report``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from ..core import POLICIES, KeySpec, PoolConfig, PoolError
from .engine import pool_keys, simulate
from .report import Report, summarize
from .scenarios import Scenario
from .trace import Trace, load_trace
from .upstream import UpstreamModel, load_upstream_model

__all__ = ["replay"]

Source = Scenario | Trace | str | os.PathLike[str]


def _resolve(
    source: Source, upstream: UpstreamModel | str | os.PathLike[str] | None
) -> tuple[str, Trace, UpstreamModel, dict[str, Any], bool]:
    """(name, trace, model, options, recorded-by-default) for a source."""
    if isinstance(upstream, str | os.PathLike):
        upstream = load_upstream_model(upstream)
    if isinstance(source, Scenario):
        return (
            source.name,
            source.trace,
            upstream or source.model,
            dict(source.options),
            False,
        )
    if isinstance(source, Trace):
        trace, name = source, source.header.scenario or "trace"
    else:
        trace, name = load_trace(source), os.path.basename(os.fspath(source))
    recorded = upstream is None and trace.header.source != "synthetic"
    return name, trace, upstream or UpstreamModel(), dict(trace.header.options), recorded


def _check_options(options: Mapping[str, Any], specs: Sequence[KeySpec]) -> None:
    """``ValueError`` naming an unknown ``PoolConfig`` option or a bad value."""
    known = sorted({f.name for f in attrs.fields(PoolConfig)} - {"keys", "policy", "seed"})
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"unknown pool option(s) {', '.join(map(repr, unknown))}; the options are "
            + ", ".join(known)
        )
    try:
        PoolConfig(keys=list(specs), **options)
    except (PoolError, TypeError, OverflowError) as exc:
        raise ValueError(f"bad pool option: {exc}") from None


# PoolConfig fields replay sets itself, each from its own argument of the same name.
_OWN = ("policy", "seed", "keys")


def _needed_keys(names: Sequence[str]) -> int | None:
    """How many keys ``key-0`` .. ``key-<n-1>`` it takes to have every name, or None
    when some name is not of that form."""
    counts = []
    for name in names:
        number = name.removeprefix("key-")
        if name == number or not number.isdigit() or len(number) > 9:
            return None
        counts.append(int(number) + 1)
    return max(counts) if counts else None


def replay(
    source: Source,
    policy: str | Sequence[str] = "round_robin",
    *,
    keys: int | Sequence[KeySpec] | None = None,
    seed: int = 0,
    upstream: UpstreamModel | str | os.PathLike[str] | None = None,
    options: Mapping[str, Any] | None = None,
    recorded: bool | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    timeline_keys: int = 0,
) -> Report:
    """Replay a scenario, a trace or a trace file with one or more policies.

    Args:
        source: a :class:`Scenario` (``scenarios.build(name)``), a :class:`Trace`
            or the path of a trace file.
        policy: a policy name, a list of them, or ``"all"``.
        keys: the number of keys, always named ``key-0``, ``key-1``, ...
            (see :func:`engine.pool_keys`), or the ``KeySpec`` list itself;
            default: the trace header's keys under their own aliases.
        seed: seeds the pool and the simulated upstream.
        upstream: an :class:`UpstreamModel` or the path of one (JSON or TOML);
            default: the scenario's own, or for recorded traces (source
            ``proxy``/``transport``) the recorded answers.
        options: ``PoolConfig`` fields on top of the trace's or scenario's.
        recorded: force (True) or refuse (False) re-issuing recorded answers.
        progress: ``progress(policy, done, total)`` during each run.
        timeline_keys: collect per-key load over time for this many keys (plots).

    Every policy runs on a fresh pool and upstream with the same seed.
    """
    name, trace, model, base_options, recorded_default = _resolve(source, upstream)
    policies = (
        list(POLICIES) if policy == "all" else [policy] if isinstance(policy, str) else list(policy)
    )
    for p in policies:
        if p not in POLICIES:
            raise ValueError(f"unknown policy {p!r}; choose from {', '.join(POLICIES)} or all")
    if not policies:
        raise ValueError("no policy to replay")
    specs = (
        list(keys)
        if keys is not None and not isinstance(keys, int)
        else pool_keys(trace.header, model, keys)
    )
    for reserved in _OWN:
        if reserved in (options or {}):
            raise ValueError(
                f"options[{reserved!r}] is not applied: replay sets the pool's {reserved} "
                f"itself; fix: pass {reserved}= (--{reserved} on the command line)"
            )
    pool_options = {**base_options, **dict(options or {})}
    for reserved in _OWN:  # the header's record of the recorded pool's (information)
        pool_options.pop(reserved, None)
    _check_options(pool_options, specs)
    ids = {spec.key_id for spec in specs}
    named = {w.key for w in model.failures} | set(model.keys)
    strangers = sorted(named - ids - {"*"})
    needed = _needed_keys(strangers) if isinstance(source, Scenario) else None
    if strangers and needed is not None:
        raise ValueError(
            f"scenario {name!r} needs at least {needed} keys (its upstream model names "
            f"{', '.join(map(repr, strangers))}), the pool has {len(specs)}; "
            f"fix: --keys {needed} or more (keys={needed} in Python)"
        )
    if strangers:
        some = ", ".join(sorted(ids)[:8]) + (", ..." if len(ids) > 8 else "")
        if isinstance(keys, int):
            naming = f"--keys {keys} names them key-0 to key-{keys - 1}"
            fix = "name only those keys in the model"
        elif keys is None:
            naming = "the trace's own aliases"
            fix = "name those in the model, or pass --keys N (which names them key-0, key-1, ...)"
        else:
            naming = "the KeySpecs given"
            fix = "name those in the model"
        raise ValueError(
            f"the upstream model names key(s) {', '.join(map(repr, strangers))} that the pool "
            f"does not have (its keys: {some}; {naming}); fix: {fix}"
        )
    use_recorded = recorded if recorded is not None else (recorded_default or model.recorded)
    results: dict[str, dict[str, Any]] = {}
    runs = {}
    elapsed = {}
    for p in policies:
        tick = None if progress is None else (lambda done, total, p=p: progress(p, done, total))
        started = time.perf_counter()
        run = simulate(
            trace,
            model,
            policy=p,
            seed=seed,
            keys=specs,
            options=pool_options,
            recorded=use_recorded,
            progress=tick,
            timeline_keys=timeline_keys,
        )
        elapsed[p] = time.perf_counter() - started
        runs[p] = run
        results[p] = summarize(run)
    source_info = {
        "name": name,
        "requests": len(trace.records),
        "duration": round(trace.duration, 6),
        "keys": len(specs),
        "seed": seed,
        "upstream": "recorded" if use_recorded else "simulated",
        "options": {k: pool_options[k] for k in sorted(pool_options)},
    }
    return Report(source=source_info, results=results, runs=runs, elapsed=elapsed)
