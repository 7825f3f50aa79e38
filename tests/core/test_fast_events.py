"""The positional event builders drivers use build exactly what the keyword constructors do."""

from __future__ import annotations

import attrs
from hypothesis import given
from hypothesis import strategies as st

from keyrotor.core import (
    RequestStarted,
    ResponseFinished,
    ResponseReceived,
    request_started,
    response_finished,
    response_received,
)

ids = st.text(min_size=1, max_size=8)
times = st.floats(min_value=0, max_value=1e9, allow_nan=False)
maybe_int = st.none() | st.integers(min_value=0, max_value=10**6)
bodies = st.none() | st.binary(max_size=8) | st.dictionaries(st.text(max_size=3), st.integers())


@given(
    st.tuples(
        ids,
        times,
        st.none() | ids | st.integers(min_value=0, max_value=9),
        st.booleans(),
        st.none() | ids,
        st.none() | ids,
        st.none() | times,
        st.integers(min_value=0, max_value=10**6),
        maybe_int,
    )
)
def test_request_started(values: tuple[object, ...]) -> None:
    names = [field.name for field in attrs.fields(RequestStarted)]
    expected = RequestStarted(**dict(zip(names, values, strict=True)))
    built = request_started(*values)  # type: ignore[arg-type]
    assert built == expected and hash(built) == hash(expected)
    assert type(built) is RequestStarted


@given(
    st.tuples(
        ids,
        times,
        st.integers(min_value=100, max_value=599),
        st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5)),
        bodies,
        st.none() | times,
    )
)
def test_response_received(values: tuple[object, ...]) -> None:
    request_id, now, status, headers, body, wall_time = values
    expected = ResponseReceived(
        request_id=request_id,  # type: ignore[arg-type]
        now=now,  # type: ignore[arg-type]
        status=status,  # type: ignore[arg-type]
        headers=headers,  # type: ignore[arg-type]
        body=body,  # type: ignore[arg-type]
        wall_time=wall_time,  # type: ignore[arg-type]
    )
    assert response_received(*values) == expected  # type: ignore[arg-type]


@given(
    st.tuples(
        ids,
        times,
        st.floats(min_value=0, max_value=100, allow_nan=False),
        st.integers(min_value=0, max_value=10**6),
        st.integers(min_value=0, max_value=10**6),
        maybe_int,
        bodies,
        st.none() | times,
    )
)
def test_response_finished(values: tuple[object, ...]) -> None:
    names = [field.name for field in attrs.fields(ResponseFinished)]
    expected = ResponseFinished(**dict(zip(names, values, strict=True)))
    assert response_finished(*values) == expected  # type: ignore[arg-type]


def test_the_built_events_are_frozen() -> None:
    event = request_started("r1", 1.0)
    try:
        event.now = 2.0  # type: ignore[misc]
    except attrs.exceptions.FrozenInstanceError:
        pass
    else:  # pragma: no cover - the assertion below reports it
        raise AssertionError("a fast-built event could be changed")
    assert event == RequestStarted(request_id="r1", now=1.0)
