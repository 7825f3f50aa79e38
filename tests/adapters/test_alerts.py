"""Alert rules (``AlertBook``, pure: the figures and the time come in): alerts
that must clear when their subject goes quiet or their rule is replaced."""

from __future__ import annotations

from keyrotor.adapters.alerts import AlertBook, Observed, rule_from_json

FAILING = {
    "name": "failing",
    "kind": "error_share",
    "scope": "key",
    "threshold": 0.5,
    "window": 300,
    "min_requests": 10,
}


def test_an_error_share_alert_clears_after_a_whole_window_without_answers() -> None:
    """It stayed firing for ever once its key got no answers (cooling, disabled)."""
    book = AlertBook([rule_from_json(FAILING)])
    pool = {"k1": "cooling", "k2": "healthy"}
    bad = Observed(answers={300.0: {"key": {"k1": (10, 10)}}}, key_states=pool)
    assert [(a.subject, a.state) for a in book.evaluate(bad, 1000.0)] == [("k1", "firing")]
    few = Observed(answers={300.0: {"key": {"k1": (3, 3)}}}, key_states=pool)
    assert book.evaluate(few, 1100.0) == []  # too few answers to say either way
    quiet = Observed(answers={300.0: {"key": {}}}, key_states=pool)
    assert book.evaluate(quiet, 1200.0) == []  # not a whole window since it fired
    (cleared,) = book.evaluate(quiet, 1300.0)
    assert (cleared.subject, cleared.state, cleared.since) == ("k1", "ok", 1300.0)
    assert cleared.text == "failing: key k1 had no answers in the last 300 s"
    assert book.status()["firing"] == 0
    assert book.evaluate(quiet, 90_000.0) == []  # once
    assert [a.state for a in book.evaluate(bad, 90_010.0)] == ["firing"]  # and again if due


def test_an_error_share_alert_of_a_key_gone_from_the_pool_clears_at_once() -> None:
    book = AlertBook([rule_from_json(FAILING)])
    bad = Observed(answers={300.0: {"key": {"k1": (10, 10)}}}, key_states={"k1": "failed"})
    assert [a.state for a in book.evaluate(bad, 1000.0)] == ["firing"]
    gone = Observed(answers={300.0: {"key": {"k1": (10, 10)}}}, key_states={"k2": "healthy"})
    (cleared,) = book.evaluate(gone, 1010.0)  # its errors are still in the window
    assert (cleared.state, cleared.text) == ("ok", "failing: key k1 is no longer in the pool")
    assert book.evaluate(gone, 1020.0) == []  # and it does not fire again


def test_a_model_error_share_alert_clears_when_the_model_gets_no_answers() -> None:
    book = AlertBook([rule_from_json(FAILING | {"scope": "model", "window": 60})])
    bad = Observed(answers={60.0: {"model": {"m": (20, 19)}}})
    assert [a.state for a in book.evaluate(bad, 0.0)] == ["firing"]
    (cleared,) = book.evaluate(Observed(answers={60.0: {"model": {}}}), 60.0)
    assert cleared.text == "failing: model m had no answers in the last 60 s"


def test_a_rule_replaced_by_another_kind_or_scope_clears_its_alerts_at_once() -> None:
    """They stayed firing for ever: the new rule never looks at those subjects."""
    spend = {"name": "spend", "kind": "spend", "scope": "key", "threshold": 1}
    book = AlertBook([rule_from_json(spend)])
    seen = Observed(spend={"total": {"": 5.0}, "key": {"k1": 5.0, "k2": 3.0}})
    assert len(book.evaluate(seen, 1.0)) == 2
    cleared = book.set_rule(rule_from_json(spend | {"scope": "total", "threshold": 100}), 2.0)
    assert sorted((a.subject, a.state, a.since) for a in cleared) == [
        ("k1", "ok", 2.0),
        ("k2", "ok", 2.0),
    ]
    assert cleared[0].text.startswith("spend: the spend rule watching key k")
    assert cleared[0].text.endswith(" was replaced; its alert no longer applies")
    assert book.evaluate(seen, 3.0) == []  # the new rule: $5 in total is under $100
    status = book.status()
    assert status["firing"] == 0 and [a["state"] for a in status["alerts"]] == ["ok", "ok"]

    book = AlertBook([rule_from_json({"name": "r", "kind": "key_failed"})])
    assert len(book.evaluate(Observed(key_states={"k1": "failed"}, usable_keys=5), 1.0)) == 1
    (gone,) = book.set_rule(rule_from_json({"name": "r", "kind": "usable_keys", "threshold": 1}))
    assert (gone.kind, gone.subject, gone.state) == ("key_failed", "k1", "ok")
    assert book.status()["firing"] == 0


def test_a_new_threshold_alone_keeps_the_alerts_to_the_next_look() -> None:
    rule = {"name": "spend", "kind": "spend", "scope": "key", "threshold": 1}
    book = AlertBook([rule_from_json(rule)])
    seen = Observed(spend={"key": {"k1": 5.0, "k2": 3.0}})
    book.evaluate(seen, 1.0)
    assert book.set_rule(rule_from_json(rule | {"threshold": 4}), 2.0) == []  # no ok, then firing
    (k2,) = book.evaluate(seen, 3.0)
    assert (k2.subject, k2.state) == ("k2", "ok")
    assert k2.text == "spend: spend today of key k2 is $3.00, back under $4.00"
    assert book.status()["firing"] == 1
