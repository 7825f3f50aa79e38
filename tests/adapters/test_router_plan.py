"""A routed request's body for each model: the caller's bytes with the model
spliced in where that is exact, the parsed body re-encoded where it is not."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from keyrotor.adapters.proxy.router import Plan, _model_span
from keyrotor.models.routing import Decision, Need, Route, ordered
from tests.transports.test_json_body import bodies

ROUTE: Route = ordered("r", ["a/b"])
DECISION = Decision("r", "a/b", (), (), None, None, 0.25)


@given(bodies(), st.sampled_from(["a/b", 'q"uote\\d', "ünïcode/m"]))
@example(({"model": "y"}, b'{"a": {"model": "x"}, "model": "y"}'), "z")
@example(({"model": "y"}, b'{"model": "x", "model": "y"}'), "z")
@example(({"model": "y"}, b'{"model": "y", "a": {"model": "x"}}'), "z")
@example(({"model": "y"}, b'{"a": {"model": "y"}, "model": "y"}'), "z")  # the same name nested
def test_the_body_sent_is_the_callers_with_only_the_top_level_model_changed(
    case: tuple[Any, bytes], model: str
) -> None:
    _, body = case
    data = json.loads(body)
    if not isinstance(data, dict) or not isinstance(data.get("model"), str):
        return
    span = _model_span(body, data["model"])
    plan = Plan(ROUTE, DECISION, data, Need(prompt_tokens=1), span)
    sent = plan.body_for(model)
    assert json.loads(sent) == {**data, "model": model}
    if span is not None:  # spliced: every other byte as the caller wrote it
        _, start, end = span
        assert sent[:start] == body[:start] and sent[len(sent) - len(body) + end :] == body[end:]


def test_a_long_body_in_the_sdks_order_is_spliced_not_re_encoded() -> None:
    """The openai SDK writes ``model`` after the messages: found from the end."""
    messages = [{"role": "user", "content": 'a "model": "x" {[' * 2_000}]
    body = json.dumps({"messages": messages, "model": "route", "stream": True}).encode()
    span = _model_span(body, "route")
    assert span is not None and body[span[1] : span[2]] == b"route"
    sent = Plan(ROUTE, DECISION, json.loads(body), Need(prompt_tokens=1), span).body_for("a/b")
    assert sent == body.replace(b'"model": "route"', b'"model": "a/b"')
