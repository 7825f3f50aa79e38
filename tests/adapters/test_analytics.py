"""Analytics rollups: hand-computed traffic in, the same figures out, per minute,
hour and day, across a restart and past retention."""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyrotor.adapters import analytics
from keyrotor.adapters.analytics import (
    Query,
    QueryError,
    Retention,
    Rollup,
    error_class,
    parse_query,
    percentile,
    to_csv,
)
from keyrotor.adapters.storage import StateStore

T0 = 1_764_892_800  # 2025-12-05 00:00:00 UTC
SK = "a-passphrase-of-sixteen-or-more"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def open_store(path: Path, clock: Clock, retention: Retention | None = None) -> StateStore:
    store = StateStore.open(path, secret_key=SK, flush_interval=3600, wall_clock=clock)
    if retention is not None:
        store.retention = retention
    return store


def q(kind: str, start: float, end: float, grain: str, by: str | None = None) -> Query:
    return Query(kind, int(start), int(end), grain, by)


@given(st.lists(st.floats(0.5, 600_000), min_size=1, max_size=300))
def test_percentiles_are_within_five_percent_of_the_exact_ones(values: list[float]) -> None:
    rollup = Rollup()
    for v in values:
        rollup.note(200, 0, 0, 0.0, v, None)
    exact = sorted(values)
    for quantile in (0.5, 0.95, 0.99):
        want = exact[max(1, math.ceil(quantile * len(exact))) - 1]
        got = percentile(rollup.ttfb, quantile)
        assert got is not None
        assert max(want, 1.0) <= got * 1.0001 and got <= max(want, 1.0) * 1.05 + 1e-9


def test_error_classes() -> None:
    assert [error_class(s) for s in (200, 400, 401, 402, 404, 408, 429, 499, 500, 503)] == [
        None, "bad_request", "auth", "credits", "not_found", "timeout", "rate_limited",
        "client_gone", "server", "server",
    ]  # fmt: skip
    assert percentile({}, 0.5) is None


def traffic(store: StateStore, start: float) -> None:
    """Two hours of hand-counted answers: per minute of the first 90, one
    answer on k1 / gpt (200, 100+10 tokens, $0.0125, 100 ms first byte, 400 ms
    in all) and, every 10th minute, a 429 on k2 / claude by client ci."""
    for minute in range(90):
        at = start + minute * 60 + 5
        store.record_answer(at, ("k1", "main", "gpt", "", "web"), 200, 100, 10, 0.0125, 100, 400)
        if minute % 10 == 0:
            store.record_answer(at, ("k2", "main", "claude", "free", "ci"), 429, 0, 0, 0.0, 20, 20)


def test_hand_computed_traffic_per_minute_hour_and_day(tmp_path: Path) -> None:
    clock = Clock(T0 + 7200)
    store = open_store(tmp_path / "s.db", clock)
    try:
        traffic(store, T0)
        # Pending rows are seen before any flush; then the same after one.
        for _ in range(2):
            hours = store.analytics(q("usage", T0, T0 + 7200, "hour"), str)
            assert [(r["start"], r["requests"], r["errors"]) for r in hours] == [
                ("2025-12-05T00:00:00Z", 66, 6),
                ("2025-12-05T01:00:00Z", 33, 3),
            ]
            assert hours[0]["errorsByClass"] == {"rate_limited": 6}
            assert hours[0]["cost"] == pytest.approx(60 * 0.0125)
            assert hours[0]["promptTokens"] == 6000 and hours[0]["completionTokens"] == 600
            store.flush()
        minutes = store.analytics(q("usage", T0, T0 + 600, "minute", "model"), str)
        assert len(minutes) == 11  # 10 minutes of gpt, one of claude
        assert minutes[0] == {
            "start": "2025-12-05T00:00:00Z", "name": "claude", "requests": 1, "errors": 1,
            "errorsByClass": {"rate_limited": 1}, "promptTokens": 0, "completionTokens": 0,
            "cost": 0.0,
        }  # fmt: skip
        days = store.analytics(q("costs", T0, T0 + 86400, "day", "client"), str)
        assert days == [
            {"start": "2025-12-05T00:00:00Z", "name": "ci", "requests": 9, "cost": 0.0,
             "costPerRequest": 0.0},
            {"start": "2025-12-05T00:00:00Z", "name": "web", "requests": 90,
             "cost": pytest.approx(1.125), "costPerRequest": pytest.approx(0.0125)},
        ]  # fmt: skip
        perf = store.analytics(q("performance", T0, T0 + 86400, "day", "route"), str)
        free = next(r for r in perf if r["name"] == "free")
        plain = next(r for r in perf if r["name"] == "")
        assert free["errorShare"] == 1.0 and plain["errorShare"] == 0.0
        assert 100 <= plain["ttfbP50Ms"] <= 105 and 400 <= plain["totalP99Ms"] <= 420
        accounts = store.analytics(
            q("usage", T0, T0 + 86400, "day", "account"), {"k1": "team", "k2": "team"}.__getitem__
        )
        assert [(r["name"], r["requests"]) for r in accounts] == [("team", 99)]
        mine = store.analytics(Query("usage", T0, T0 + 86400, "day", None, client="ci"), str)
        assert [r["requests"] for r in mine] == [9]
        # "" is a client filter too (no client has that name): never every client's rows
        assert store.analytics(Query("usage", T0, T0 + 86400, "day", None, client=""), str) == []
    finally:
        store.close()


def test_a_restart_in_the_middle_keeps_every_answer(tmp_path: Path) -> None:
    clock = Clock(T0 + 7200)
    store = open_store(tmp_path / "s.db", clock)
    traffic(store, T0)
    store.close()  # flushes what is pending
    again = open_store(tmp_path / "s.db", clock)
    try:
        traffic(again, T0)  # the same traffic once more, into the same rows
        rows = again.analytics(q("usage", T0, T0 + 86400, "day"), str)
        assert [(r["requests"], r["errors"]) for r in rows] == [(198, 18)]
        assert rows[0]["cost"] == pytest.approx(2 * 90 * 0.0125)
    finally:
        again.close()


def test_old_minutes_are_compacted_into_hours_and_days_not_lost(tmp_path: Path) -> None:
    clock = Clock(T0 + 3 * 86400)  # three days later
    store = open_store(tmp_path / "s.db", clock, Retention(minute_days=2, hour_days=2.5))
    try:
        traffic(store, T0)
        traffic(store, T0 + 2.9 * 86400)  # recent: its minutes stay
        store.flush()
        old_minutes = store.analytics(q("usage", T0, T0 + 7200, "minute"), str)
        new_minutes = store.analytics(q("usage", T0 + 2.9 * 86400, clock.now, "minute"), str)
        old_hours = store.analytics(q("usage", T0, T0 + 7200, "hour"), str)
        days = store.analytics(q("usage", T0, clock.now, "day"), str)
    finally:
        store.close()
    assert old_minutes == [] and old_hours == []  # past retention: dropped
    assert sum(r["requests"] for r in new_minutes) == 99
    assert [r["requests"] for r in days] == [99, 99]  # the days still hold both


def test_query_parameters_and_their_errors() -> None:
    now = T0 + 86400
    q1 = parse_query("usage", {}, now)
    assert (q1.start, q1.end, q1.grain, q1.by, q1.csv) == (T0, now + 1, "hour", None, False)
    q2 = parse_query(
        "costs",
        {"from": "2025-12-05T10:30:00Z", "to": str(now), "group_by": "day", "by": "model",
         "format": "csv"},
        now,
    )  # fmt: skip
    assert (q2.start, q2.grain, q2.by, q2.csv) == (T0, "day", "model", True)
    assert parse_query("usage", {"from": "2025-12-05T01:00:00"}, now).start == T0 + 3600  # UTC
    assert parse_query("usage", {"from": "2025-12-05T03:00:00+02:00"}, now).start == T0 + 3600
    for params, message in (
        ({"group_by": "week"}, "group_by='week': choose minute, hour or day"),
        ({"by": "colour"}, "by='colour': choose one of key, account"),
        ({"from": "yesterday"}, "from='yesterday' is no time: give ISO 8601"),
        ({"from": str(now), "to": str(now)}, "from must be before to"),
        ({"format": "xml"}, "format='xml': choose json or csv"),
        ({"colour": "red"}, "unknown parameter 'colour'"),
        ({"from": "0", "group_by": "minute"}, "narrow from/to or group_by a coarser grain"),
    ):
        with pytest.raises(QueryError) as caught:
            parse_query("usage", params, now)
        assert message in str(caught.value)


def test_times_out_of_range_are_refused_naming_the_parameter() -> None:
    """Huge Unix seconds were a 500 (gmtime, SQLite's int64) or rounded as floats;
    years before 1000 were written without their leading zeros."""
    now = T0 + 86400
    for params, message in (
        ({"from": "100000000000000000", "to": "100000000000003600"}, "to='100000000000003600'"),
        ({"from": "9223372036854775808"}, "from='9223372036854775808' is out of range"),
        ({"from": "99999999999999999990", "to": "99999999999999999999"}, "to='9999"),
        ({"from": "253402300799", "to": "253402300900"}, "to='253402300900' is out of range"),
        ({"from": "0001-01-01T00:00:00+01:00", "to": "2025-01-01"}, "from='0001-01-01T00:00"),
        ({"to": "9999-12-31T23:00:00-14:00"}, "to='9999-12-31T23:00:00-14:00' is out of range"),
        ({"from": "\u0661\u0662\u0663", "to": "200"}, "from='\u0661\u0662\u0663' is no time"),
        ({"from": "1e9"}, "from='1e9' is no time"),
    ):
        with pytest.raises(QueryError) as caught:
            parse_query("usage", params, now)
        assert message in str(caught.value)
        assert "0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z" in str(caught.value) or (
            "is no time" in str(caught.value)
        )
    exact = parse_query("usage", {"from": "1764892860.9", "to": "1764892861"}, now)
    assert (exact.start, exact.end) == (T0, 1764892861)
    assert parse_query("usage", {"from": "-0.5", "to": "1"}, now).start == -3600
    first = parse_query(
        "usage", {"from": "0001-01-01T00:00:00Z", "to": "0099-01-01", "group_by": "day"}, now
    )
    last = parse_query("usage", {"from": "9999-12-31", "to": "9999-12-31T23:59:59Z"}, now)
    conn = sqlite3.connect(":memory:")
    for statement in analytics.SCHEMA:
        conn.execute(statement)
    conn.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT)")
    assert analytics.query(conn, first, str) == analytics.query(conn, last, str) == []
    assert analytics.answer(first, [])["from"] == "0001-01-01T00:00:00Z"
    assert analytics.answer(first, [])["to"] == "0099-01-01T00:00:00Z"
    assert analytics.answer(last, [])["to"] == "9999-12-31T23:59:59Z"


@pytest.mark.parametrize("kind", analytics.KINDS)
def test_a_query_of_more_rows_than_max_rows_stops_reading_and_says_how_to_narrow_it(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MAX_ROWS bounded periods, not rows: by key over many keys was millions of rows."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    for statement in analytics.SCHEMA:
        conn.execute(statement)
    conn.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT)")
    rollup = Rollup()
    rollup.note(200, 10, 10, 0.001, 100.0, 200.0)
    conn.executemany(
        "INSERT INTO rollups VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        [
            ("minute", T0 + 60 * m, f"k{k}", "main", "gpt", "", "web", *rollup.columns())
            for m in range(10)
            for k in range(20)
        ],
    )  # 10 minutes of 20 keys: 200 rows by minute and key, 10 by minute, 20 by hour and key
    monkeypatch.setattr(analytics, "MAX_ROWS", 50)
    bounds = {"from": str(T0), "to": str(T0 + 600)}
    for params in ({"group_by": "minute"}, {"group_by": "hour", "by": "key"}):
        rows = analytics.query(conn, parse_query(kind, bounds | params, T0 + 7200), str)
        assert sum(r["requests"] for r in rows) == 200
    with pytest.raises(QueryError) as caught:
        analytics.query(
            conn, parse_query(kind, bounds | {"group_by": "minute", "by": "key"}, T0 + 7200), str
        )
    assert str(caught.value) == (
        "the answer holds more than 50 rows: narrow from/to, group coarser or drop by"
    )


def test_csv_has_a_header_and_a_column_per_error_class() -> None:
    rows: list[dict[str, Any]] = [
        {"start": "a", "requests": 2, "errors": 1, "errorsByClass": {"auth": 1}, "cost": 0.5},
        {"start": "b", "requests": 1, "errors": 1, "errorsByClass": {"server": 1}, "cost": 0.0},
    ]
    assert to_csv(rows, "usage").splitlines() == [
        "start,requests,errors,promptTokens,completionTokens,cost,errors_auth,errors_bad_request,"
        "errors_client_gone,errors_credits,errors_not_found,errors_rate_limited,errors_server,"
        "errors_timeout",
        "a,2,1,,,0.5,1,0,0,0,0,0,0,0",
        "b,1,1,,,0.0,0,0,0,0,0,0,1,0",
    ]
    assert analytics.answer(q("usage", T0, T0 + 60, "minute"), [])["from"] == "2025-12-05T00:00:00Z"


def test_csv_of_no_rows_has_the_same_header_as_one_with_rows() -> None:
    """An empty range was no header at all, and the columns changed with the data."""
    every_class = {kind: 1 for kind in analytics.ERROR_CLASSES}
    assert set(analytics.ERROR_CLASSES) == {error_class(s) for s in range(400, 600)} - {None}
    for kind in analytics.KINDS:
        for by in (None, "model"):
            header = to_csv([], kind, by)
            assert header.count("\r\n") == 1 and header.startswith("start,")
            assert ("start,name," in header) == (by is not None)
            for by_class in ({}, {"auth": 2}, every_class):
                row = {"start": "2025-12-05T00:00:00Z", "name": "m", "requests": 3}
                text = to_csv([row | {"errorsByClass": by_class}], kind, by)
                assert text.splitlines()[0] == header.strip()
    assert to_csv([], "costs", "key") == "start,name,requests,cost,costPerRequest\r\n"


def test_csv_text_a_spreadsheet_would_run_is_quoted_and_numbers_are_not() -> None:
    """A client's model name (``=HYPERLINK(...)``) became a live formula in the export."""
    names = ['=HYPERLINK("http://x.invalid","x")', "+1", "-1", "@SUM(A1)", "\tx", "\rx", "\r=x"]
    rows = [{"start": "s", "name": n, "requests": 1, "cost": -0.5} for n in names]
    rows.append({"start": "s", "name": "openai/gpt-4o", "requests": 1, "cost": 0.25})
    cells = list(csv.reader(io.StringIO(to_csv(rows, "costs", "model"), newline="")))
    assert [c[1] for c in cells[1:]] == ["'" + n for n in names] + ["openai/gpt-4o"]
    assert [c[3] for c in cells[1:]] == ["-0.5"] * len(names) + ["0.25"]  # numbers as they are


@given(
    st.lists(
        st.tuples(
            st.sampled_from([200, 200, 200, 400, 401, 402, 429, 500, 503]),
            st.integers(0, 10_000),
            st.integers(0, 10_000),
            st.floats(0, 1, allow_nan=False),
            st.none() | st.floats(0.1, 600_000, allow_nan=False),
            st.none() | st.floats(0.1, 600_000, allow_nan=False),
        ),
        max_size=30,
    )
)
def test_a_rollup_survives_its_columns(answers: list[Any]) -> None:
    """What a flush writes (``columns``) reads back (``from_columns``) as it was, through
    the histogram caches too."""
    rollup = analytics.Rollup()
    for answer in answers:
        rollup.note(*answer)
    columns = rollup.columns()
    back = analytics.Rollup.from_columns(columns)
    assert back.columns() == columns
    assert (back.requests, back.errors, back.ttfb, back.total) == (
        rollup.requests,
        rollup.errors,
        rollup.ttfb,
        rollup.total,
    )
    back.add(back)  # a read-back rollup is the caller's to change: the cache must not be
    assert analytics.Rollup.from_columns(columns).columns() == columns


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.integers(0, 2_000), st.integers(1, 10**12), max_size=60))
def test_a_histogram_is_written_as_json_dumps_writes_it(histogram: dict[int, int]) -> None:
    """The histograms' hand-written JSON is ``json.dumps``' text, and reads back."""
    text = analytics._histogram_text(histogram)
    assert text == json.dumps(histogram)
    assert analytics._histogram_items(text) == histogram
    assert list(analytics._histogram_items(text)) == list(histogram)  # bucket order kept


def test_only_small_histograms_are_cached() -> None:
    """A busy key's large histogram, new at every flush, stays out of the caches."""
    small = {3: 1, 40: 2}
    large = {bucket: 1 for bucket in range(100, 100 + 2 * analytics.SMALL_HISTOGRAM)}
    assert len(analytics._histogram_text(large)) > analytics._SMALL_TEXT
    analytics._small_histogram_text.cache_clear()
    analytics._small_histogram_items.cache_clear()
    for histogram in (small, large, small):
        analytics._histogram_items(analytics._histogram_text(histogram))
    text, items = (
        analytics._small_histogram_text.cache_info(),
        analytics._small_histogram_items.cache_info(),
    )
    assert (text.currsize, text.hits, items.currsize, items.hits) == (1, 1, 1, 1)


# -- the roll-up of minutes into hours and days ----------------------------------------------

Answer = tuple[int, str, str, int, float]  # at, key, model, status, ttfb


def expected(answers: list[Answer], grain: str, by: str | None) -> dict[tuple[str, str], Any]:
    """What ``usage`` and ``performance`` must say, counted in Python from the answers."""
    step = analytics.GRAINS[grain]
    rows: dict[tuple[str, str], Rollup] = {}
    for at, key, model, status, ttfb in answers:
        name = {"key": key, "model": model, None: ""}[by]
        rows.setdefault((analytics._iso(at - at % step), name), Rollup()).note(
            status, 1, 2, 0.5, ttfb, None
        )
    return {
        where: (r.requests, r.error_count, r.prompt, r.completion, percentile(r.ttfb, 0.5))
        for where, r in rows.items()
    }


def seen(store: StateStore, grain: str, by: str | None, end: float) -> dict[tuple[str, str], Any]:
    usage = store.analytics(q("usage", T0, end, grain, by), str)
    perf = store.analytics(q("performance", T0, end, grain, by), str)
    out = {}
    for u, p in zip(usage, perf, strict=True):
        assert (u["start"], u.get("name", "")) == (p["start"], p.get("name", ""))
        out[(u["start"], u.get("name", ""))] = (
            u["requests"], u["errors"], u["promptTokens"], u["completionTokens"], p["ttfbP50Ms"],
        )  # fmt: skip
    return out


@settings(max_examples=40, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(0, 300),  # seconds the clock moves on
            st.integers(-400, 0),  # the answer's time against the clock (late answers too)
            st.sampled_from(["k1", "k2", "k3"]),
            st.sampled_from(["gpt", "claude"]),
            st.sampled_from([200, 200, 429, 500]),
            st.sampled_from(["", "", "flush", "restart"]),  # then
        ),
        min_size=1,
        max_size=40,
    ),
    roll_rows=st.integers(1, 4),
)
def test_every_answer_is_counted_once_in_every_grain_while_minutes_roll_up(
    steps: list[Any], roll_rows: int
) -> None:
    """Answers (some for minutes rolled up already) are noted, flushed and the
    proxy restarted at random while the clock runs: at every moment minutes,
    hours and days hold each answer exactly once, whichever slice the roll-up
    is at; then the roll-up catches up."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "s.db"
        clock = Clock(T0 + 400)
        store = open_store(path, clock)
        old, analytics.ROLL_ROWS = analytics.ROLL_ROWS, roll_rows
        answers: list[Answer] = []
        try:
            for move, late, key, model, status, then in steps:
                clock.now += move
                ttfb = float(10 + len(answers) % 7 * 50)
                answers.append((int(clock.now) + late, key, model, status, ttfb))
                dims = (key, "main", model, "", "")
                store.record_answer(answers[-1][0], dims, status, 1, 2, 0.5, ttfb, None)
                if then == "flush":
                    store.flush()
                elif then == "restart":
                    store.close()
                    store = open_store(path, clock)
                for grain, by in (("minute", None), ("hour", "key"), ("day", "model")):
                    assert seen(store, grain, by, clock.now + 1) == expected(answers, grain, by)
            for _ in range(200):  # the minutes roll up, a slice per flush
                clock.now += 30
                answers.append((int(clock.now), "k9", "gpt", 200, 10.0))
                store.record_answer(clock.now, ("k9", "main", "gpt", "", ""), 200, 1, 2, 0.5, 10.0)
                store.flush()
            for grain, by in (("minute", "model"), ("hour", "key"), ("day", None)):
                assert seen(store, grain, by, clock.now + 1) == expected(answers, grain, by)
            with store._db_lock:
                cursor = analytics.rolled(store._connection())
            assert cursor[0] >= clock.now - analytics.ROLL_AFTER - 120  # caught up
        finally:
            analytics.ROLL_ROWS = old
            store.close()


def test_retention_never_drops_a_minute_not_rolled_up(tmp_path: Path) -> None:
    clock = Clock(T0 + 7200)
    store = open_store(tmp_path / "s.db", clock, Retention(minute_days=2))
    saved = analytics.ROLL_ROWS, analytics.ROLL_AFTER
    try:
        analytics.ROLL_AFTER = 10**9  # nothing rolled up yet
        traffic(store, T0)  # 99 answers in 99 minute rows
        store.flush()
        clock.now = T0 + 3 * 86400  # three days later, past the minutes' retention
        analytics.ROLL_ROWS, analytics.ROLL_AFTER = 10, saved[1]
        store.record_spend("k1")
        store.flush()  # rolls up the first 10 rows (minutes 0-8) and drops minutes 0-7
        minutes = store.analytics(q("usage", T0, T0 + 7200, "minute"), str)
        assert sum(r["requests"] for r in minutes) == 99 - 9
        for client, count in (("ci", 9), ("web", 90)):  # a client's own, rolled up or not
            mine = store.analytics(Query("usage", T0, T0 + 86400, "day", None, client=client), str)
            assert [r["requests"] for r in mine] == [count]
        for _ in range(9):
            store.record_spend("k1")  # something to flush: the roll-up goes on
            store.flush()
        assert store.analytics(q("usage", T0, T0 + 7200, "minute"), str) == []
        hours = store.analytics(q("usage", T0, T0 + 7200, "hour"), str)
        assert [r["requests"] for r in hours] == [66, 33]  # every answer, once
        traffic(store, T0)
        store.flush()  # late answers: straight into their minute, hour and day rows
        hours = store.analytics(q("usage", T0, T0 + 7200, "hour"), str)
        assert [r["requests"] for r in hours] == [132, 66]
        days = store.analytics(q("usage", T0, T0 + 86400, "day"), str)
        assert [r["requests"] for r in days] == [198]
    finally:
        analytics.ROLL_ROWS, analytics.ROLL_AFTER = saved
        store.close()


def test_a_file_written_before_the_roll_up_counts_its_minutes_once(tmp_path: Path) -> None:
    """Schema 5 added each minute to its hour and day at once: the step to 6
    starts the cursor past those minutes, so none is added twice."""
    import sqlite3

    clock = Clock(T0 + 7200)
    store = open_store(tmp_path / "s.db", clock)
    traffic(store, T0)
    store.close()
    db = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    figures = analytics._FIGURES
    minutes = db.execute(
        f"SELECT start, key, provider, model, route, client, {figures} FROM rollups "
        "WHERE grain = 'minute'"
    ).fetchall()
    # What schema 5 wrote: every minute row also added to its hour and day rows at once.
    db.execute("DELETE FROM rollups WHERE grain != 'minute'")
    db.execute("DELETE FROM meta WHERE name = ?", (analytics.ROLLED,))
    db.execute("PRAGMA user_version = 5")
    db.execute("UPDATE meta SET value = '5' WHERE name = 'schema_version'")
    rollups: dict[Any, Rollup] = {}
    for row in minutes:
        start, dims = row[0], row[1:6]
        for coarse, step in (("hour", 3600), ("day", 86400)):
            where = (coarse, start - start % step, *dims)
            rollups.setdefault(where, Rollup()).add(Rollup.from_columns(row[6:]))
    db.executemany(
        f"INSERT INTO rollups (grain, start, key, provider, model, route, client, {figures}) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(*where, *r.columns()) for where, r in rollups.items()],
    )
    db.close()
    again = open_store(tmp_path / "s.db", clock)  # migrates to 6
    try:
        for _ in range(3):
            hours = again.analytics(q("usage", T0, T0 + 7200, "hour"), str)
            assert [r["requests"] for r in hours] == [66, 33]
            again.record_spend("k1")
            again.flush()  # the roll-up has nothing of schema 5's to add again
    finally:
        again.close()


def test_a_flush_that_fails_after_writing_the_rows_counts_them_once_when_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows a flush merged are kept in memory for the next one: a transaction
    that does not commit must not leave them there (the retry would count twice)."""
    import sqlite3

    clock = Clock(T0 + 600)
    store = open_store(tmp_path / "s.db", clock)
    write = analytics.write

    def write_then_fail(*args: Any) -> None:
        write(*args)
        raise sqlite3.OperationalError("disk I/O error")

    try:
        dims = ("k1", "main", "gpt", "", "")
        store.record_answer(T0 + 590, dims, 200, 1, 2, 0.5, 100.0, None)
        assert store.flush()
        store.record_answer(T0 + 595, dims, 200, 1, 2, 0.5, 100.0, None)
        monkeypatch.setattr(analytics, "write", write_then_fail)
        assert not store.flush()  # kept pending, retried
        monkeypatch.setattr(analytics, "write", write)
        assert store.flush()
        store.record_answer(T0 + 598, dims, 200, 1, 2, 0.5, 100.0, None)
        assert store.flush()
        for grain in ("minute", "hour"):
            rows = store.analytics(q("usage", T0, T0 + 601, grain), str)
            assert [(r["requests"], r["promptTokens"]) for r in rows] == [(3, 3)]
    finally:
        store.close()


def test_merge_answers_one_row_a_name_with_the_percentiles_of_the_whole_range() -> None:
    """The dashboard averaged each hour's percentiles: 98 answers of 10 ms and
    2 of 1000 ms came out as a p50 of 30 ms."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    for statement in analytics.SCHEMA:
        conn.execute(statement)
    conn.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT)")
    fast, slow = Rollup(), Rollup()
    for _ in range(98):
        fast.note(200, 1, 1, 0.0, 10.0, 20.0)
    for _ in range(2):
        slow.note(500, 1, 1, 0.0, 1000.0, 2000.0)
    conn.executemany(
        "INSERT INTO rollups VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        [
            ("hour", T0, "k1", "main", "m", "", "", *fast.columns()),
            ("hour", T0 + 3600, "k1", "main", "m", "", "", *slow.columns()),
            ("hour", T0 + 3600, "k2", "main", "n", "", "", *slow.columns()),
        ],
    )
    conn.execute(
        "INSERT INTO meta VALUES (?, ?)", (analytics.ROLLED, f'[{T0 + 7200}, "", "", "", "", ""]')
    )
    params = {"from": str(T0 + 1800), "to": str(T0 + 7200), "by": "model", "merge": "true"}
    merged = analytics.query(conn, parse_query("performance", params, T0 + 7200), str)
    assert [(r["start"], r["name"], r["requests"]) for r in merged] == [
        ("2025-12-05T00:00:00Z", "m", 100),
        ("2025-12-05T00:00:00Z", "n", 2),
    ]
    m = merged[0]
    assert m["errorShare"] == 0.02
    assert 10 <= m["ttfbP50Ms"] <= m["ttfbP95Ms"] <= 10.5 and 1000 <= m["ttfbP99Ms"] <= 1050
    usage = analytics.query(conn, parse_query("usage", params, T0 + 7200), str)
    assert [(r["requests"], r["errorsByClass"]) for r in usage] == [
        (100, {"server": 2}),
        (2, {"server": 2}),
    ]
    with pytest.raises(QueryError) as caught:
        parse_query("usage", {"merge": "yes"}, T0)
    assert str(caught.value) == "merge='yes': choose true (one row for the whole range) or false"
