"""``json_body.member`` answers as ``json.loads`` does, or says it cannot."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from keyrotor.adapters.proxy.model_health import model_of
from keyrotor.adapters.proxy.providers import MODEL_MEMBER as MODEL
from keyrotor.transports import json_body
from keyrotor.transports._http import _STREAM_TRUE as STREAM_TRUE
from keyrotor.transports._http import wants_stream
from keyrotor.transports.json_body import NEAR, Unsure, member

KEYS = st.one_of(
    st.sampled_from(["stream", "model", "messages", "tools", 'x"model', 'x\\"stream', "\\"]),
    st.text(max_size=6),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=12),
    st.sampled_from(["stream", "model", '"stream": true', 'a\\"b']),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=12,
)
PADDING = st.sampled_from([0, 100, NEAR + 10, 20_000])


@st.composite
def bodies(draw: st.DrawFn) -> tuple[Any, bytes]:
    """A JSON object as a client might write it: members in any order, large
    string members before or after (an agent's messages), any spacing."""
    members = draw(st.dictionaries(KEYS, VALUES, max_size=5))
    before, after = draw(PADDING), draw(PADDING)
    document: Any = {}
    if before:
        document["pad_before"] = 'x"\\{[' * (before // 5)
    document.update(members)
    if after:
        document["pad_after"] = "]}" * (after // 2)
    if draw(st.booleans()):
        document = [document]  # not an object: no member
    text = json.dumps(
        document,
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.sampled_from([None, 0, 2])),
        separators=draw(st.sampled_from([None, (",", ":"), (" ,", " : ")])),
    )
    return document, text.encode()


def answer(body: bytes, pattern: re.Pattern[bytes], key: bytes) -> Any:
    """``member``'s value (decoded), or "unsure"."""
    try:
        found = member(body, key, pattern)
    except Unsure:
        return "unsure"
    if found is None:
        return None
    return json.loads(found.group(1)) if pattern.groups else True


@given(bodies())
@example(({"stream": True}, b'{"stream": true, "stream": false}'))
@example(({"stream": True}, b'{"stream": true, "m": {"stream": false}}'))
@example(({"stream": True}, b'{"stream": true, "mode": "stream"}'))
@example(({"model": "y"}, b'{"a": {"model": "x"}, "model": "y"}'))
@example(({"m": {"stream": True}}, b'{"m": {"stream": true}}'))
@example(({"stream": "true"}, b'{"stream": "true"}'))
@example(({"stream": True}, b'{"stream": true, "x\\"stream": false}'))  # a longer key's end
@example(({"model": "a"}, b'{"model": "a", "x\\"model": "b"}'))
def test_member_agrees_with_json_loads(case: tuple[Any, bytes]) -> None:
    _, body = case
    parsed = json.loads(body)  # a repeated key: the last one, as the upstream reads it
    top = parsed if isinstance(parsed, dict) else {}
    stream = answer(body, STREAM_TRUE, b'"stream"')
    assert stream == "unsure" or stream == (True if top.get("stream") is True else None)
    model = answer(body, MODEL, b'"model"')
    expected = top.get("model") if isinstance(top.get("model"), str) else None
    assert model == "unsure" or model == expected
    assert model_of(body) == model_of(body, strict=True) == expected
    assert wants_stream(body) is (top.get("stream") is True)


def test_a_long_body_is_not_parsed_when_the_key_has_a_short_side(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    messages = [{"role": "user", "content": 'say "stream": true {[' * 400}] * 20
    counted: list[bytes] = []
    opened = json_body._opened

    def counting(text: bytes) -> int:
        counted.append(text)
        return opened(text)

    monkeypatch.setattr(json_body, "_opened", counting)
    last = json.dumps({"messages": messages, "model": "m", "stream": True}).encode()
    first = json.dumps({"stream": True, "model": "m", "messages": messages}).encode()
    assert len(last) > 100_000
    assert member(last, b'"stream"', STREAM_TRUE) is not None
    assert member(first, b'"stream"', STREAM_TRUE) is not None
    assert counted == [b": true}", b"{"]  # only the short side of each
    both = json.dumps({"messages": messages, "stream": True, "tools": messages}).encode()
    with pytest.raises(Unsure):
        member(both, b'"stream"', STREAM_TRUE)
    assert wants_stream(both)  # parsed then


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats()  # NaN and infinities too: json writes and reads them, msgspec does not
    | st.text(),  # lone surrogates too
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=20,
)


def parsed_or_error(body: bytes, parser: Any) -> str:
    """The value as json writes it back (NaN equal to NaN, 1 unlike 1.0), or "error"."""
    try:
        return json.dumps(parser(body))
    except ValueError:
        return "error"


@given(
    JSON_VALUES,
    st.booleans(),
    st.sampled_from([None, 1]),
    st.sampled_from([b"", b"\xef\xbb\xbf", b" ", b"x", b"\xff"]),
)
@example([1, 2], False, None, b"")
@example(10**25, False, None, b"")  # beyond 64 bits: an int (orjson, for one, gives a float)
@example({"seed": -(10**20), "t": float("nan")}, False, None, b"")
def test_parse_reads_what_json_loads_reads_and_refuses_what_it_refuses(
    value: Any, ascii_only: bool, indent: int | None, extra: bytes
) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only, indent=indent)
    body = text.encode("utf-8", "surrogatepass")
    for variant in (body, extra + body, body + extra, body[: len(body) // 2]):
        assert parsed_or_error(variant, json_body.parse) == parsed_or_error(variant, json.loads)


def test_parse_without_the_fast_extra_is_json_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    assert json_body._decode is not None  # the tests install the fast extra
    monkeypatch.setattr(json_body, "_decode", None)
    assert json_body.parse(b'{"a": [1, 2.5, NaN]}')["a"][:2] == [1, 2.5]
    with pytest.raises(ValueError):
        json_body.parse(b"{")


@pytest.mark.parametrize("fast", [True, False])
def test_a_document_nested_too_deeply_is_bad_input_not_a_crash(
    fast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not fast:
        monkeypatch.setattr(json_body, "_decode", None)
    deep = b'{"model": "m", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(RecursionError):
        json.loads(deep)
    with pytest.raises(ValueError, match="nested too deeply"):
        json_body.parse(deep)
