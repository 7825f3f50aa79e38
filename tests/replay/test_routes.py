"""Replaying traffic through a route: strategies side by side, the free tier paced."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest

from keyrotor.cli import main
from keyrotor.models.routing import FREE_ROUTE, Filter, Route
from keyrotor.replay.routes import NO_PACING, day_of_free_traffic, replay_route

DAY = day_of_free_traffic(2000, seed=3)
FREE_THEN_PAID = Route("free-then-paid", (Filter(free=True), "openai/gpt-4o-mini"), "fastest")


def test_a_day_on_five_accounts_uses_every_free_quota_and_meets_no_limit() -> None:
    rows = replay_route(DAY, FREE_ROUTE, ["fastest", "cheapest", "ordered", NO_PACING])
    for row in rows[:3]:  # paced: a request a down model could not serve gives its slot back
        assert row.limit_answers == 0
        assert row.served_free == 5 * 50  # every account's day, no more
        assert row.refused == len(DAY) - 250 and row.served_paid == 0 and row.cost == 0
    unpaced = rows[3]  # rotation alone learns each account's day from a limit answer
    assert unpaced.limit_answers >= 5 and unpaced.served_free == 250


def test_a_burst_meets_the_per_minute_limit_only_without_pacing() -> None:
    burst = [attrs.evolve(DAY[0], t=36_000 + i * 0.1) for i in range(300)]  # 300 in 30 s
    paced, unpaced = replay_route(burst, FREE_ROUTE, ["ordered", NO_PACING], down=0)
    assert (paced.served_free, paced.limit_answers) == (100, 0)  # 5 accounts x 20 a minute
    assert unpaced.served_free == 100 and unpaced.limit_answers >= 5


def test_a_route_with_a_paid_fallback_serves_everything_and_prices_the_rest() -> None:
    (row,) = replay_route(DAY, FREE_THEN_PAID, ["fastest"])
    assert (row.served_free, row.refused, row.limit_answers) == (250, 0, 0)
    assert row.served_paid == len(DAY) - 250 and row.cost > 0
    assert row.models["openai/gpt-4o-mini"] == row.served_paid


def test_models_that_are_down_cost_a_fallback_and_the_report_is_deterministic() -> None:
    first = replay_route(DAY[:300], FREE_ROUTE, ["fastest"], down=0.3, seed=1)
    again = replay_route(DAY[:300], FREE_ROUTE, ["fastest"], down=0.3, seed=1)
    assert first[0].to_json() == again[0].to_json()
    assert first[0].fallbacks > 0 and first[0].limit_answers == 0
    with pytest.raises(ValueError, match="unknown strategy 'random'"):
        replay_route(DAY[:1], FREE_ROUTE, ["random"])


def test_the_command_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    routes = tmp_path / "routes.toml"
    routes.write_text(
        '[[routes]]\nname = "free-then-paid"\n'
        'candidates = [{ free = true }, "openai/gpt-4o-mini"]\n'
    )
    code = main(
        ["replay", "--scenario", "free-day", "--requests", "600", "--route", "free-then-paid",
         "--routes", str(routes), "--strategy", "fastest,no-pacing"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("route 'free-then-paid': 600 requests; 5 accounts at 50 free")
    assert lines[3].split()[:6] == ["fastest", "600", "250", "350", "0", "0"]
    assert lines[4].split()[0] == "no-pacing"
    trace = tmp_path / "day.jsonl"
    assert main(["replay", "--scenario", "burst", "--write-trace", str(trace)]) == 0
    capsys.readouterr()
    assert main(["replay", str(trace), "--route", "free", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["strategy"] == "fastest" and row["limitAnswers"] == 0
    for args, message in (
        (["--route", "nope"], "no route 'nope'; routes: free"),
        (["--route", "free", "--strategy", "random"], "unknown strategy 'random'"),
        (["--route", "free", "--accounts", "0"], "need --accounts >= 1"),
        (["--strategy", "fastest"], "need --route NAME"),
        (["--route", "free", "--strategy", ","], "--strategy needs one or more"),
        (["--route", "free", "--routes", str(tmp_path / "none.toml")], "none.toml: cannot read"),
    ):
        assert main(["replay", "--scenario", "free-day", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_a_route_replay_with_no_request_served_prints_dashes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "empty.jsonl"
    trace.write_text('{"type":"header","format":"keyrotor-trace","version":1,"source":"proxy"}\n')
    assert main(["replay", str(trace), "--route", "free"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].split()[-4:] == ["-", "ms", "-", "ms"]
