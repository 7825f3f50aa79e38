"""Analytics: every answer the proxy delivered, rolled up per minute, hour and day.

The proxy notes each answer (``Rollup.note``) in the state file's pending batch,
per minute and per (key, provider, model, route, client token): requests,
errors by class, tokens, cost, and the times to first byte and to the end as
histograms of 5 % wide buckets (so p50/p95/p99 are exact to 5 %). The storage
thread adds each flush's minutes to their minute rows (``write``), off the
request path, and rolls minute rows up into their hour's and day's rows once
the minute is over (``ROLL_AFTER``), a bounded slice per flush. A cursor in
``meta`` (``ROLLED``) says which minute rows are rolled up: a query of hours
or days adds the minute rows past it, so every answer is counted exactly once
whenever it is asked, and an answer for a minute already rolled up is added to
all three rows at once. Minute rows are dropped after
``minute_days``, hour rows after ``hour_days``, day rows after ``day_days``
(0: kept): the coarser rows still hold what the finer ones did, so old detail
is compacted, never lost unseen.

``query`` reads them back, grouped by minute, hour or day and by one
dimension (the account is the key's, looked up when asked), for
``GET /analytics/usage``, ``/analytics/costs`` and ``/analytics/performance``
(docs/analytics.md). Times are UTC, in and out.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import re
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs

__all__ = [
    "BY",
    "ERROR_CLASSES",
    "GRAINS",
    "KINDS",
    "Query",
    "QueryError",
    "Retention",
    "Rollup",
    "answer",
    "csv_columns",
    "error_class",
    "parse_query",
    "percentile",
    "query",
    "to_csv",
    "write",
]

GRAINS = {"minute": 60, "hour": 3600, "day": 86400}
BY = ("key", "account", "provider", "model", "route", "client")
KINDS = ("usage", "costs", "performance")
DIMENSIONS = ("key", "provider", "model", "route", "client")
"""What each row is kept per (the account is the key's, found when asked)."""
_FACTOR = 1.05  # histogram buckets: each 5 % wider than the last
_LOG = math.log(_FACTOR)
MAX_ROWS = 100_000
"""The most rows one query answers, periods times names (narrow ``from``/``to``,
group coarser or drop ``by``); also the most periods one may ask for."""

Dims = tuple[str, str, str, str, str]  # key, provider, model, route, client ("" for none)


def error_class(status: int) -> str | None:
    """The class an answer's status counts under (None: not an error)."""
    if status < 400:
        return None
    if status == 429:
        return "rate_limited"
    if status in (401, 403):
        return "auth"
    if status == 402:
        return "credits"
    if status == 404:
        return "not_found"
    if status in (408, 504, 524):
        return "timeout"
    if status == 499:
        return "client_gone"
    if status >= 500:
        return "server"
    return "bad_request"


def _bucket(ms: float) -> int:
    """The histogram bucket of ``ms`` (its upper bound is 1.05 ** bucket ms)."""
    return 0 if ms <= 1.0 else math.ceil(math.log(ms) / _LOG)


def percentile(histogram: Mapping[int, int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a histogram, in ms: the upper bound of the
    bucket holding it (at most 5 % above the exact value); None when empty."""
    total = sum(histogram.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return round(_FACTOR**bucket, 3)
    return None  # pragma: no cover - rank <= total


def _add_histogram(mine: dict[int, int], other: Mapping[int, int]) -> None:
    for bucket, count in other.items():
        mine[bucket] = mine.get(bucket, 0) + count


class Rollup:
    """One row's figures: requests, errors by class, tokens, cost, latencies."""

    __slots__ = ("completion", "cost", "errors", "prompt", "requests", "total", "ttfb")

    def __init__(self) -> None:
        self.requests = 0
        self.errors: dict[str, int] = {}
        self.prompt = 0
        self.completion = 0
        self.cost = 0.0
        self.ttfb: dict[int, int] = {}
        self.total: dict[int, int] = {}

    def note(
        self,
        status: int,
        prompt: int,
        completion: int,
        cost: float,
        ttfb_ms: float | None,
        total_ms: float | None,
    ) -> None:
        """Count one answer."""
        self.requests += 1
        kind = error_class(status)
        if kind is not None:
            self.errors[kind] = self.errors.get(kind, 0) + 1
        self.prompt += prompt
        self.completion += completion
        self.cost += cost
        if ttfb_ms is not None:
            b = _bucket(ttfb_ms)
            self.ttfb[b] = self.ttfb.get(b, 0) + 1
        if total_ms is not None:
            b = _bucket(total_ms)
            self.total[b] = self.total.get(b, 0) + 1

    def add(self, other: Rollup) -> None:
        self.requests += other.requests
        for kind, count in other.errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + count
        self.prompt += other.prompt
        self.completion += other.completion
        self.cost += other.cost
        _add_histogram(self.ttfb, other.ttfb)
        _add_histogram(self.total, other.total)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def columns(self) -> tuple[int, int, str, int, int, float, str, str]:
        errors = self.errors
        return (
            self.requests,
            self.error_count,
            json.dumps(errors, sort_keys=True) if errors else "{}",
            self.prompt,
            self.completion,
            self.cost,
            _histogram_text(self.ttfb),
            _histogram_text(self.total),
        )

    @classmethod
    def from_columns(cls, row: Iterable[Any]) -> Rollup:
        requests, _errors, by_class, prompt, completion, cost, ttfb, total = row
        rollup = cls()
        rollup.requests = requests
        rollup.errors = json.loads(by_class) if by_class != "{}" else {}
        rollup.prompt, rollup.completion, rollup.cost = prompt, completion, cost
        rollup.ttfb = _histogram_items(ttfb)
        rollup.total = _histogram_items(total)
        return rollup


SMALL_HISTOGRAM = 8
"""Buckets up to which a histogram's JSON is read and written through caches:
a state file holds few distinct small histograms (a key's minute of a few
answers, as a pool of thousands of keys has them), which repeat; a busy key's
minute holds dozens of buckets, new at every flush, which would only fill the
caches (about 25 MB at 4 busy keys). benchmarks/state_flush.py measures both."""
_SMALL_TEXT = 12 * SMALL_HISTOGRAM
"""Characters up to which a histogram's JSON is read through a cache (about
``SMALL_HISTOGRAM`` buckets: an entry such as '"123": 45, ' takes 11)."""


def _histogram_text(histogram: dict[int, int]) -> str:
    """A histogram's JSON (``json.dumps`` of it: the same text)."""
    if len(histogram) <= SMALL_HISTOGRAM:
        return _small_histogram_text(tuple(histogram.items()))
    return _json_object(histogram.items())


def _histogram_items(text: str) -> dict[int, int]:
    """The histogram a row's JSON holds."""
    if len(text) <= _SMALL_TEXT:
        return dict(_small_histogram_items(text))
    return _parse_histogram(text)


def _json_object(items: Iterable[tuple[int, int]]) -> str:
    """``json.dumps`` of int -> int pairs, written out directly (2.4x faster)."""
    return "{" + ", ".join([f'"{bucket}": {count}' for bucket, count in items]) + "}"


def _parse_histogram(text: str) -> dict[int, int]:
    """``_json_object``'s text read back."""
    return {int(bucket): count for bucket, count in json.loads(text).items()}


@functools.lru_cache(maxsize=4096)
def _small_histogram_text(items: tuple[tuple[int, int], ...]) -> str:
    return _json_object(items)


@functools.lru_cache(maxsize=4096)
def _small_histogram_items(text: str) -> tuple[tuple[int, int], ...]:
    return tuple(_parse_histogram(text).items())


SCHEMA = (
    """CREATE TABLE rollups (
        grain TEXT NOT NULL,
        start INTEGER NOT NULL,
        key TEXT NOT NULL,
        provider TEXT NOT NULL,
        model TEXT NOT NULL,
        route TEXT NOT NULL,
        client TEXT NOT NULL,
        requests INTEGER NOT NULL,
        errors INTEGER NOT NULL,
        errors_by_class TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cost REAL NOT NULL,
        ttfb TEXT NOT NULL,
        total TEXT NOT NULL,
        PRIMARY KEY (grain, start, key, provider, model, route, client)
    ) WITHOUT ROWID""",
)
"""The state file's ``rollups`` table (a migration of ``storage``)."""
_FIGURES = "requests, errors, errors_by_class, prompt_tokens, completion_tokens, cost, ttfb, total"
_ROW = "start, key, provider, model, route, client"
ROLLED = "analytics_rolled"
"""``meta`` name of the roll-up cursor: the JSON ``[start, key, provider,
model, route, client]`` of the last minute row added to its hour and day rows
(rows order by those columns, as the table's key does; ``[t, "", ...]`` with
``t`` past a minute's start means all of that minute)."""
ROLL_AFTER = 60
"""Seconds after a minute ends before its rows are rolled up (answers noted
later for it are added to its minute, hour and day rows at once)."""
ROLL_ROWS = 250
"""The minute rows a flush rolls up, at most (or twice the rows it wrote, if
more: the roll-up keeps up with any traffic), bounding the writer's time."""
MIGRATION = (
    # Rows written before the roll-up cursor were added to all three grains at once.
    f"INSERT OR REPLACE INTO meta (name, value) SELECT '{ROLLED}', "
    '\'[\' || (COALESCE(MAX(start), -1) + 1) || \', "", "", "", "", ""]\' '
    "FROM rollups WHERE grain = 'minute'",
)
"""The step of ``storage``'s migrations that starts the roll-up cursor."""
Cursor = tuple[int, str, str, str, str, str]


@attrs.frozen
class Retention:
    """Days each grain's rows are kept (0: for ever)."""

    minute_days: float = 2.0
    hour_days: float = 90.0
    day_days: float = 0.0


def write(
    conn: sqlite3.Connection,
    minutes: Mapping[tuple[int, Dims], Rollup],
    retention: Retention,
    now: float,
    known: dict[tuple[str, int, Dims], Rollup] | None = None,
) -> None:
    """Add ``minutes`` (minute start, dimensions -> figures) to their minute
    rows (and to their hour and day rows too if that minute is rolled up
    already), roll up a slice of the minutes that are over, and drop rows past
    their retention. Runs inside the caller's transaction.

    ``known``: the minute rows as committed, kept by the caller between calls
    and updated here, so that a row is not read back each flush. Sound because
    a state file has one writer (``storage`` holds its lock); the caller
    empties it when the transaction does not commit."""
    cursor = rolled(conn)
    rows = []
    late: dict[tuple[str, int, Dims], Rollup] = {}
    for (start, dims), rollup in minutes.items():
        rows.append((("minute", start, dims), rollup))
        if (start, *dims) <= cursor:  # its minute is rolled up: its hour and day too
            _add_to(late, "hour", start, dims, rollup)
            _add_to(late, "day", start, dims, rollup)
    _merge_rows(conn, rows, {} if known is None else known)
    _merge_rows(conn, late.items(), {})
    since = cursor[0]
    cursor = _roll_up(conn, cursor, now, max(ROLL_ROWS, 2 * len(minutes)))
    if known and cursor[0] != since:  # retention may drop minutes before the cursor's
        for where in [where for where in known if where[1] < cursor[0]]:
            del known[where]
    for grain, days in (
        ("minute", retention.minute_days),
        ("hour", retention.hour_days),
        ("day", retention.day_days),
    ):
        if days > 0:
            before = now - days * 86400
            if grain == "minute":
                before = min(before, cursor[0])  # never a minute not rolled up
            conn.execute("DELETE FROM rollups WHERE grain = ? AND start < ?", (grain, before))


def rolled(conn: sqlite3.Connection) -> Cursor:
    """The roll-up cursor (every minute row up to it is in its hour and day rows)."""
    found = conn.execute("SELECT value FROM meta WHERE name = ?", (ROLLED,)).fetchone()
    start, *dims = json.loads(found[0]) if found else (0, "", "", "", "", "")
    return (int(start), *dims)  # type: ignore[return-value]


def _add_to(
    rows: dict[tuple[str, int, Dims], Rollup], grain: str, start: int, dims: Dims, rollup: Rollup
) -> None:
    where = (grain, start - start % GRAINS[grain], dims)
    slot = rows.get(where)
    if slot is None:
        slot = rows[where] = Rollup()
    slot.add(rollup)


def _merge_rows(
    conn: sqlite3.Connection,
    rows: Iterable[tuple[tuple[str, int, Dims], Rollup]],
    known: dict[tuple[str, int, Dims], Rollup],
) -> None:
    """Add ``rows`` (left unchanged, so a failed transaction can write them
    again) to the table's: each taken from ``known`` or read back, merged,
    written and kept in ``known``."""
    select = (
        f"SELECT {_FIGURES} FROM rollups WHERE grain = ? AND start = ? AND key = ? "
        "AND provider = ? AND model = ? AND route = ? AND client = ?"
    )
    out = []
    for where, rollup in rows:
        figures = known.get(where)
        if figures is None:
            found = conn.execute(select, (where[0], where[1], *where[2])).fetchone()
            figures = known[where] = Rollup.from_columns(found) if found else Rollup()
        figures.add(rollup)
        out.append((where[0], where[1], *where[2], *figures.columns()))
    conn.executemany(
        f"INSERT OR REPLACE INTO rollups (grain, {_ROW}, {_FIGURES}) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        out,
    )


def _roll_up(conn: sqlite3.Connection, cursor: Cursor, now: float, limit: int) -> Cursor:
    """Add up to ``limit`` minute rows past ``cursor`` of minutes over for
    ``ROLL_AFTER`` seconds to their hour and day rows; the cursor after them."""
    over = int(now) - ROLL_AFTER - 60
    over -= over % 60  # the last minute that is over
    if cursor[0] > over:
        return cursor
    found = conn.execute(
        f"SELECT {_ROW}, {_FIGURES} FROM rollups WHERE grain = 'minute' "
        f"AND ({_ROW}) > (?, ?, ?, ?, ?, ?) AND start <= ? ORDER BY {_ROW} LIMIT ?",
        (*cursor, over, limit),
    ).fetchall()
    rows: dict[tuple[str, int, Dims], Rollup] = {}
    for row in found:
        rollup = Rollup.from_columns(row[6:])
        _add_to(rows, "hour", row[0], row[1:6], rollup)
        _add_to(rows, "day", row[0], row[1:6], rollup)
    _merge_rows(conn, rows.items(), {})
    # The last row rolled up, or all minutes up to ``over`` (past its start, before the next).
    cursor = found[-1][:6] if len(found) == limit else (over + 1, "", "", "", "", "")
    conn.execute(
        "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (ROLLED, json.dumps(cursor))
    )
    return cursor


class QueryError(ValueError):
    """A query parameter that cannot be used (the message names it and the fix)."""


@attrs.frozen
class Query:
    """What an ``/analytics/...`` request asks for."""

    kind: str
    start: int
    end: int
    grain: str
    by: str | None
    csv: bool = False
    client: str | None = None  # only this client token's answers (a client asking)
    merge: bool = False  # one row per name over the whole range (percentiles of it all)


FIRST = -62_135_596_800
"""0001-01-01T00:00:00Z: the earliest time a query may name."""
LAST = 253_402_300_799
"""9999-12-31T23:59:59Z: the latest time a query may name."""
_SECONDS = re.compile(r"-?[0-9]{1,20}(?:\.[0-9]*)?")
"""Unix seconds (ASCII digits, an optional fraction, which is dropped)."""


def _time(value: str, name: str) -> int:
    """``value`` (ISO 8601, UTC unless it says otherwise, or Unix seconds) in
    Unix seconds; ``QueryError`` naming ``name`` if it is no time or out of range."""
    text = value.strip()
    if _SECONDS.fullmatch(text):
        whole, _, fraction = text.partition(".")
        t = int(whole)  # exact: no float rounding of big numbers
        if whole.startswith("-") and fraction.strip("0"):
            t -= 1  # the second it falls in
    else:
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise QueryError(
                f"{name}={value!r} is no time: give ISO 8601 UTC (2026-12-05T10:00:00Z), "
                "an offset (2026-12-05T11:00:00+01:00) or Unix seconds"
            ) from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        t = math.floor(parsed.timestamp())
    if not FIRST <= t <= LAST:
        raise QueryError(
            f"{name}={value!r} is out of range: give a time from 0001-01-01T00:00:00Z "
            f"to 9999-12-31T23:59:59Z (Unix seconds {FIRST} to {LAST})"
        )
    return t


def parse_query(kind: str, params: Mapping[str, str], now: float) -> Query:
    """The ``Query`` of ``/analytics/<kind>?params``; ``QueryError`` if one is bad.
    Defaults: the last 24 hours, grouped by hour, not by a dimension, JSON.
    ``merge=true``: the periods added up into one row (per name) starting at
    ``from``, its percentiles those of every answer in the range (the
    histograms merged), read from the rows of ``group_by``."""
    known = {"from", "to", "group_by", "by", "format", "merge"}
    for name in params:
        if name not in known:
            raise QueryError(f"unknown parameter {name!r}; known: {', '.join(sorted(known))}")
    grain = params.get("group_by", "hour")
    if grain not in GRAINS:
        raise QueryError(f"group_by={grain!r}: choose minute, hour or day")
    by = params.get("by") or None
    if by is not None and by not in BY:
        raise QueryError(f"by={by!r}: choose one of {', '.join(BY)}")
    fmt = params.get("format", "json")
    if fmt not in ("json", "csv"):
        raise QueryError(f"format={fmt!r}: choose json or csv")
    merge = params.get("merge", "false")
    if merge not in ("true", "false"):
        raise QueryError(f"merge={merge!r}: choose true (one row for the whole range) or false")
    end = _time(params["to"], "to") if "to" in params else math.floor(now) + 1  # now included
    start = _time(params["from"], "from") if "from" in params else max(FIRST, end - 86400)
    if start >= end:
        raise QueryError("from must be before to")
    step = GRAINS[grain]
    start -= start % step
    if (end - start) // step > MAX_ROWS:
        raise QueryError(
            f"{(end - start) // step:,} {grain}s asked for, at most {MAX_ROWS:,}: "
            "narrow from/to or group_by a coarser grain"
        )
    return Query(kind, start, end, grain, by, fmt == "csv", merge=merge == "true")


def query(
    conn: sqlite3.Connection,
    q: Query,
    account_of: Callable[[str], str],
    pending: Mapping[tuple[int, Dims], Rollup] | None = None,
) -> list[dict[str, Any]]:
    """The rows ``q`` asks for, oldest first (then by name): from the table
    and from ``pending`` minutes not written yet. ``QueryError`` once they are
    more than ``MAX_ROWS`` (periods times names: by key over a big pool can be
    millions), before reading the rest."""
    step = GRAINS[q.grain]
    most = MAX_ROWS
    groups: dict[tuple[int, str], Rollup] = {}

    def name_of(dims: Dims) -> str:
        if q.by is None:
            return ""
        if q.by == "account":
            return account_of(dims[0]) if dims[0] else ""
        return dims[DIMENSIONS.index(q.by)]

    def add(start: int, dims: Dims, rollup: Rollup, checked: bool = False) -> None:
        if q.client is not None and not checked and dims[4] != q.client:
            return
        where = (q.start if q.merge else start - start % step, name_of(dims))
        slot = groups.get(where)
        if slot is None:
            if len(groups) >= most:  # stop reading: the answer would hold too much
                raise QueryError(
                    f"the answer holds more than {most:,} rows: "
                    "narrow from/to, group coarser or drop by"
                )
            slot = groups[where] = Rollup()
        slot.add(rollup)

    client = " AND client = ?" if q.client is not None else ""  # "" is a filter too
    clients = (q.client,) if q.client is not None else ()
    sources: list[tuple[str, tuple[Any, ...]]] = [
        (f"grain = ? AND start >= ? AND start < ?{client}", (q.grain, q.start, q.end, *clients))
    ]
    began = not conn.in_transaction
    if began:  # one snapshot: no roll-up between reading the rows and the cursor
        conn.execute("BEGIN")
    try:
        if q.grain != "minute":  # and the minute rows not rolled up yet
            sources.append(
                (
                    f"grain = 'minute' AND ({_ROW}) > (?, ?, ?, ?, ?, ?) "
                    f"AND start >= ? AND start < ?{client}",
                    (*rolled(conn), q.start, q.end + (-q.end) % step, *clients),
                )
            )
        for where, args in sources:
            _read(conn, q, where, args, add)
    finally:
        if began:
            conn.execute("COMMIT")
    for (start, dims), rollup in (pending or {}).items():
        if q.start <= start - start % step < q.end:
            add(start, dims, rollup)
    out = []
    for (start, name), rollup in sorted(groups.items()):
        row: dict[str, Any] = {"start": _iso(start)}
        if q.by is not None:
            row["name"] = name
        out.append(row | _figures(q.kind, rollup))
    return out


def _read(
    conn: sqlite3.Connection,
    q: Query,
    where: str,
    args: tuple[Any, ...],
    add: Callable[..., None],
) -> None:
    """``add`` each row (or, for usage and costs, each sum per period and name) ``where`` holds."""
    if q.kind == "performance":  # the histograms are merged here
        cursor = conn.execute(f"SELECT {_ROW}, {_FIGURES} FROM rollups WHERE {where}", args)
        for found in cursor:
            add(found[0], found[1:6], Rollup.from_columns(found[6:]))
        return
    # sums in SQL, per period and dimension; errors by class only where there are some
    column = "key" if q.by in (None, "account") else q.by
    name = "''" if q.by is None else column  # not by anything: one sum per period
    cursor = conn.execute(
        f"SELECT start, {name}, SUM(requests), "
        "group_concat(CASE WHEN errors > 0 THEN errors_by_class END, '|'), "
        "SUM(prompt_tokens), SUM(completion_tokens), SUM(cost) "
        f"FROM rollups WHERE {where} GROUP BY start, {name}",
        args,
    )
    for start, name, requests, by_class, prompt, completion, cost in cursor:
        rollup = Rollup()
        rollup.requests, rollup.prompt, rollup.completion, rollup.cost = (
            requests, prompt, completion, cost,
        )  # fmt: skip
        for part in by_class.split("|") if by_class else ():
            for kind, count in json.loads(part).items():
                rollup.errors[kind] = rollup.errors.get(kind, 0) + count
        add(start, _named(column, name), rollup, True)  # the client: chosen in SQL


def _named(column: str, name: str) -> Dims:
    """Dimensions holding only ``name`` in ``column`` (a row summed over the rest)."""
    dims = ["", "", "", "", ""]
    dims[DIMENSIONS.index(column)] = name
    return (dims[0], dims[1], dims[2], dims[3], dims[4])


def _figures(kind: str, r: Rollup) -> dict[str, Any]:
    if kind == "costs":
        return {
            "requests": r.requests,
            "cost": round(r.cost, 9),
            "costPerRequest": round(r.cost / r.requests, 9) if r.requests else 0.0,
        }
    if kind == "performance":
        return {
            "requests": r.requests,
            "errorShare": round(r.error_count / r.requests, 4) if r.requests else 0.0,
            **{
                f"{name}P{int(q * 100)}Ms": percentile(histogram, q)
                for name, histogram in (("ttfb", r.ttfb), ("total", r.total))
                for q in (0.5, 0.95, 0.99)
            },
        }
    return {
        "requests": r.requests,
        "errors": r.error_count,
        "errorsByClass": dict(sorted(r.errors.items())),
        "promptTokens": r.prompt,
        "completionTokens": r.completion,
        "cost": round(r.cost, 9),
    }


_EPOCH = datetime(1970, 1, 1)


def _iso(t: int) -> str:
    """``t`` as ISO 8601 UTC, the year in four digits (0099-01-01T00:00:00Z)."""
    return (_EPOCH + timedelta(seconds=t)).isoformat() + "Z"


def answer(q: Query, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON document of a query's answer."""
    return {
        "from": _iso(q.start),
        "to": _iso(q.end),
        "groupBy": q.grain,
        "by": q.by,
        "rows": rows,
    }


ERROR_CLASSES = (
    "auth",
    "bad_request",
    "client_gone",
    "credits",
    "not_found",
    "rate_limited",
    "server",
    "timeout",
)
"""Every class ``error_class`` gives (a usage CSV has an ``errors_<class>`` column each)."""
_COLUMNS = {
    "usage": (
        "requests",
        "errors",
        "promptTokens",
        "completionTokens",
        "cost",
        *(f"errors_{kind}" for kind in ERROR_CLASSES),
    ),
    "costs": ("requests", "cost", "costPerRequest"),
    "performance": (
        "requests",
        "errorShare",
        *(f"{name}P{p}Ms" for name in ("ttfb", "total") for p in (50, 95, 99)),
    ),
}
_FORMULA = ("=", "+", "-", "@", "\t", "\r")
"""How a cell a spreadsheet would run as a formula starts."""


def csv_columns(kind: str, by: str | None) -> tuple[str, ...]:
    """A CSV answer's header: the same for every answer of ``kind`` and ``by``."""
    return ("start", *(("name",) if by is not None else ()), *_COLUMNS[kind])


def _cell(value: Any) -> Any:
    """``value`` as written in a CSV cell: text a spreadsheet would run as a
    formula (a client's model name: ``=HYPERLINK(...)``) behind a ``'``."""
    if isinstance(value, str) and value.startswith(_FORMULA):
        return "'" + value
    return value


def to_csv(rows: list[dict[str, Any]], kind: str, by: str | None = None) -> str:
    """``rows`` of a ``kind`` query as CSV (RFC 4180): a header line (``csv_columns``),
    even with no rows, errors by class as ``errors_<class>`` columns (0 when
    none), and text that would start a spreadsheet formula behind a ``'``."""
    columns = csv_columns(kind, by)
    out = io.StringIO()
    writer = csv.writer(out)  # RFC 4180: CRLF, so a CR in a name is quoted too
    writer.writerow(columns)
    for one in rows:
        item = dict(one)
        if kind == "usage":
            by_class = one.get("errorsByClass", {})
            for error in ERROR_CLASSES:
                item[f"errors_{error}"] = by_class.get(error, 0)
        writer.writerow([_cell(item.get(column, "")) for column in columns])
    return out.getvalue()
