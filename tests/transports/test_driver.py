"""The shared driver's pure helpers: key discovery, masking, usage accounting."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyrotor.transports._driver import Driver, StreamAccountant, keys_from_env, mask
from keyrotor.transports.errors import ConfigurationError


def test_keys_from_env_in_the_seeds_order_without_duplicates() -> None:
    env = {
        "OPENROUTER_KEYS": "sk-a, sk-b,,",
        "OPENROUTER_API_KEY": "sk-c",
        "OPENROUTER_API_KEY_10": "sk-e",
        "OPENROUTER_API_KEY_2": "sk-d",
        "OPENROUTER_API_KEY_X": "ignored",
        "OPENROUTER_API_KEY_1": "sk-a",
    }
    assert keys_from_env(env) == ["sk-a", "sk-b", "sk-c", "sk-d", "sk-e"]
    with pytest.raises(ConfigurationError, match="OPENROUTER_KEYS"):
        keys_from_env({})


def test_mask_shows_only_a_prefix_and_the_last_four() -> None:
    secret = "sk-or-v1-fake-0123456789abcdef-0123456789abcdef"
    shown = mask(secret)
    assert shown.endswith("cdef") and shown.startswith("sk-or-v1")
    assert "0123456789" not in shown
    assert mask("short") == "…"
    assert mask("ab-cdefghi-jk") == "…"  # short: nothing of it
    # A dash late in the secret never widens the prefix shown.
    assert mask("abcdefghijklmnopqrs-tuvwxyz0123") == "abc…0123"
    assert mask("sk-ant-api03-" + "x" * 30 + "wxyz") == "sk-ant-…wxyz"


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ([], "no keys"),
        (["sk-a", "sk-a"], "twice"),
        (["sk a"], "whitespace"),
        ({"a": ""}, "empty"),
        ([1], "strings"),
    ],
)
def test_bad_keys(keys: object, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Driver(keys)  # type: ignore[arg-type]


def test_sse_usage_from_the_last_chunk_split_anywhere() -> None:
    usage = {"prompt_tokens": 7, "completion_tokens": 9, "cost": 0.0042}
    stream = (
        b": OPENROUTER PROCESSING\n\n"
        b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
        + b"data: "
        + json.dumps({"choices": [], "usage": usage}).encode()
        + b"\n\ndata: [DONE]\n\n"
    )
    for cut in range(1, len(stream)):
        accountant = StreamAccountant("text/event-stream; charset=utf-8")
        accountant.feed(stream[:cut])
        accountant.feed(stream[cut:])
        accountant.close()
        assert (accountant.cost, accountant.prompt_tokens, accountant.completion_tokens) == (
            0.0042,
            7,
            9,
        )
        assert accountant.error_status is None


@pytest.mark.parametrize("media", ["text/event-stream", "Text/Event-Stream; charset=UTF-8"])
def test_sse_error_chunk_is_reported(media: str) -> None:
    accountant = StreamAccountant(media)  # (a media type's case means nothing)
    chunk = {"error": {"code": 429, "message": "rate limited"}, "choices": []}
    accountant.feed(b"data: " + json.dumps(chunk).encode())  # no final newline
    accountant.close()
    assert accountant.error_status == 429
    assert accountant.error_body == {"error": chunk["error"]}


def test_json_usage_without_parsing_the_completion() -> None:
    body = {
        "choices": [{"message": {"content": 'a "usage": {"cost": 99} inside text'}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "cost": 0.5},
    }
    accountant = StreamAccountant("application/json")
    raw = json.dumps(body).encode()
    accountant.feed(raw[:10])
    accountant.feed(raw[10:])
    accountant.close()
    assert (accountant.cost, accountant.prompt_tokens, accountant.completion_tokens) == (0.5, 3, 4)


DEEP = b"[" * 50_000 + b"]" * 50_000  # deeper than the interpreter's stack: bad input


@pytest.mark.parametrize(
    "body",
    [b"not json", b'{"usage": "none"}', b'{"usage": {"cost": -1}}', b'{"usage": {"x": %s}}' % DEEP],
)
def test_odd_bodies_account_nothing(body: bytes) -> None:
    accountant = StreamAccountant("application/json")
    accountant.feed(body)
    accountant.close()
    assert accountant.cost == 0.0


def test_an_sse_line_nested_too_deeply_is_skipped_not_a_crash() -> None:
    accountant = StreamAccountant("text/event-stream")
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "cost": 0.25}
    accountant.feed(b'data: {"usage": {"x": %s}}\n\n' % DEEP)
    accountant.feed(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
    accountant.feed(b'data: {"error": %s}' % DEEP)  # the last line, read at close
    accountant.close()
    assert (accountant.cost, accountant.completion_tokens, accountant.error_status) == (
        0.25,
        2,
        None,
    )


def test_keys_are_added_marked_probed_and_removed_at_runtime() -> None:
    from keyrotor.core import KeySpec, KeyState, PoolConfig, Probe

    driver = Driver({}, PoolConfig(keys=[]), clock=lambda: 5.0)
    changes: list[tuple[str, str]] = []
    driver.on_state_change.append(lambda c: changes.append((c.key_id, c.new.value)))
    driver.add_key("test-secret-one", KeySpec(key_id="one", weight=2.0))
    assert driver.pool.key_ids() == ["one"] and driver.secrets == {"one": "test-secret-one"}
    with pytest.raises(ConfigurationError, match="already in the pool as 'one'") as info:
        driver.add_key("test-secret-one", KeySpec(key_id="two"))
    assert "test-secret-one" not in str(info.value)
    with pytest.raises(ConfigurationError, match="already in the pool"):
        driver.add_key("test-secret-two", KeySpec(key_id="one"))
    with pytest.raises(ConfigurationError, match="whitespace"):
        driver.add_key("bad secret", KeySpec(key_id="two"))
    assert driver.pool.key_ids() == ["one"]

    driver.mark_key("one", KeyState.RATE_LIMITED, 30.0)
    assert changes == [("one", "rate_limited")]
    assert driver.pool.statistics().keys[0].until == 35.0
    driver.mark_key("one", KeyState.HEALTHY)
    driver.probe_keys("one")
    assert [p.key_id for p in driver.probes if isinstance(p, Probe)] == ["one"]
    with pytest.raises(ConfigurationError, match="no key with alias 'nope'"):
        driver.mark_key("nope", KeyState.DISABLED)
    driver.remove_key("one")
    assert driver.pool.key_ids() == [] and driver.secrets == {}
    with pytest.raises(ConfigurationError, match="no key"):
        driver.remove_key("one")


def test_a_2xx_reaches_the_core_with_its_headers_only_when_they_speak_of_limits() -> None:
    """A plain 2xx takes the core's fast path (no headers); one whose bucket is
    exhausted still cools its key."""
    clock = [100.0]
    driver = Driver(["sk-a-0123456789", "sk-b-0123456789"], clock=lambda: clock[0])
    seen = []
    original = driver.pool.handle
    driver.pool.handle = lambda event: (seen.append(event), original(event))[1]  # type: ignore[method-assign]
    first, slot = driver.open(lambda: None)
    send = slot.decisions.popleft()
    assert driver.received(first, send.attempt, 200, {"content-type": "json"}, None) is not None
    second, slot = driver.open(lambda: None)
    send = slot.decisions.popleft()
    exhausted = {"x-ratelimit-remaining": "0", "retry-after": "30"}
    assert driver.received(second, send.attempt, 200, exhausted, None) is not None
    answers = [e for e in seen if type(e).__name__ == "ResponseReceived"]
    assert answers[0].headers is None and answers[1].headers == exhausted
    assert driver.pool.state_of(send.key_id).value == "rate_limited"


_SSE_LINES = st.sampled_from(
    [
        b"",
        b": OPENROUTER PROCESSING",
        b'data: {"choices":[{"delta":{"content":"hi"}}]}',
        b'data: {"choices":[{"delta":{"content":"the \\"usage\\" of words"}}]}',
        b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":9,"cost":0.0042}}',
        b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"cost":0.5}}\r',
        b'data: {"error":{"code":429,"message":"rate limited"}}',
        b'data: {"error":{"code":"oops"},"usage":{"prompt_tokens":3}}',
        b'event: usage "usage" "error"',
        b"data: [DONE]",
        b'data: {"usage": not json',
        b'data: {"choices":[],"usage":{"cost":1}} \xff',  # not UTF-8: not accounted
    ]
)


@settings(max_examples=300)
@given(
    st.lists(_SSE_LINES, max_size=12),
    st.lists(st.integers(0, 400), max_size=6),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),  # SSE allows each line end
)
def test_a_stream_is_accounted_as_its_lines_one_by_one_whatever_its_chunks(
    lines: list[bytes], cuts: list[int], end: bytes
) -> None:
    stream = end.join(lines)
    reference = StreamAccountant("text/event-stream")  # every line through _line, in order
    for line in stream.split(end):
        reference._line(line)
    accountant = StreamAccountant("text/event-stream")
    points = sorted({min(cut, len(stream)) for cut in cuts})
    for start, stop in zip([0, *points], [*points, len(stream)], strict=True):
        accountant.feed(stream[start:stop])
    accountant.close()
    fields = ("cost", "prompt_tokens", "completion_tokens", "usage", "error_status", "error_body")
    assert [getattr(accountant, f) for f in fields] == [getattr(reference, f) for f in fields]


def test_a_json_answer_past_max_json_is_still_charged_from_its_end() -> None:
    usage = {"prompt_tokens": 11, "completion_tokens": 7, "cost": 0.5}
    data = [[0.123456] * 1024] * 1400  # about 10 MB of embeddings, the usage last
    body = json.dumps({"data": data, "usage": usage}).encode()
    assert len(body) > StreamAccountant.MAX_JSON
    for pieces in (1, 200):
        accountant = StreamAccountant("application/json")
        step = -(-len(body) // pieces)
        for start in range(0, len(body), step):
            accountant.feed(body[start : start + step])
        accountant.close()
        assert (accountant.cost, accountant.prompt_tokens, accountant.completion_tokens) == (
            0.5,
            11,
            7,
        )


def test_a_200_json_answer_that_carries_an_error_is_reported() -> None:
    """OpenRouter's generation that failed midway, not streamed: status 200."""
    error = {"code": 502, "message": "provider returned error"}
    body = {"choices": [{"finish_reason": "error"}], "error": error}
    accountant = StreamAccountant("application/json")
    accountant.feed(json.dumps(body).encode())
    accountant.close()
    assert (accountant.error_status, accountant.error_body) == (502, {"error": error})
    plain = StreamAccountant("application/json")  # the word in a completion is no error
    plain.feed(json.dumps({"choices": [{"message": {"content": '"error"'}}]}).encode())
    plain.close()
    assert plain.error_status is None


@pytest.mark.parametrize("cause", ["hook", "tokens"])
def test_a_request_whose_accounting_fails_is_not_left_in_flight(cause: str) -> None:
    """Whatever fails while a finished answer is accounted (a spend hook that
    raises, an upstream's absurd token count on a key with a tpm), the pool
    hears that the request ended: a request left in flight holds its key."""
    from keyrotor.core import KeySpec, PoolConfig

    said: list[str] = []
    config = PoolConfig(keys=[KeySpec(key_id="a", tpm=1000, max_in_flight=1)])
    driver = Driver({"a": "sk-a-0123456789"}, config)
    driver.on_recording_error = said.append
    if cause == "hook":

        def broken(key_id: str, usage: StreamAccountant) -> None:
            raise RuntimeError("the ledger is unavailable")

        driver.on_finished.append(broken)
    accountant = StreamAccountant("application/json")
    tokens = 10 if cause == "hook" else 1e308
    accountant.feed(
        json.dumps({"usage": {"prompt_tokens": tokens, "completion_tokens": 1}}).encode()
    )
    accountant.close()
    for _ in range(2):  # the second request gets the key: the first one ended
        request, slot = driver.open(lambda: None)
        send = slot.decisions.popleft()
        assert driver.received(request, send.attempt, 200, None, None) is not None
        driver.finish(request, send.key_id, accountant)
        assert driver.pool.statistics().in_flight == 0
    assert said == (
        ["keyrotor: an on_finished hook failed: RuntimeError"] * 2 if cause == "hook" else []
    )
    assert accountant.prompt_tokens == (10 if cause == "hook" else 0)


def test_a_state_change_hook_that_raises_loses_no_decision() -> None:
    """A 429 turns key a rate limited and retries on b in one ``feed``: a hook
    that raised on the change lost the retry (the caller got the hook's error;
    on the timer's ``feed`` it would end the client's timer)."""
    from keyrotor.core import KeySpec, PoolConfig, Send

    said: list[str] = []
    config = PoolConfig(keys=[KeySpec(key_id="a"), KeySpec(key_id="b")], policy="round_robin")
    driver = Driver({"a": "sk-a-0123456789", "b": "sk-b-0123456789"}, config)
    driver.on_recording_error = said.append
    seen: list[str] = []

    def broken(change: object) -> None:
        raise RuntimeError("the hook's bug")

    driver.on_state_change += [broken, lambda change: seen.append(change.key_id)]  # type: ignore[attr-defined]
    request, slot = driver.open(lambda: None)
    first = slot.decisions.popleft()
    assert isinstance(first, Send)
    driver.received(request, first.attempt, 429, {"retry-after": "30"}, None)
    retry = slot.decisions.popleft()
    assert isinstance(retry, Send) and retry.key_id != first.key_id
    assert seen == [first.key_id]  # the next hook still heard of it
    assert said == ["keyrotor: an on_state_change hook failed: RuntimeError"]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"session": 5}, "session must be a string, got 5"),
        ({"group": ["x"]}, "group must be a string"),
        ({"pin": 1.5}, "pin must be a key's alias or index"),
        ({"pin": True}, "pin must be a key's alias or index"),
        ({"timeout": "3"}, "timeout must be a finite number"),
        ({"timeout": float("nan")}, "timeout must be a finite number"),
        ({"timeout": -1}, "timeout must be a finite number"),
    ],
)
def test_bad_request_options_are_refused_before_the_pool_hears_of_them(
    options: dict[str, object], match: str
) -> None:
    """They reached the core, which failed half-way (AttributeError, TypeError)
    with the request counted and left in flight, or took NaN for a deadline."""
    from keyrotor.core import KeySpec, PoolConfig

    driver = Driver({"a": "sk-a-0123456789"}, PoolConfig(keys=[KeySpec(key_id="a")]))
    with pytest.raises(ConfigurationError, match=match):
        driver.open(lambda: None, **options)  # type: ignore[arg-type]
    assert driver.slots == {}
    stats = driver.pool.statistics()
    assert stats.in_flight == 0 and stats.started == 0
    driver.open(lambda: None, pin=0, session="s", group="g", timeout=0)  # all fine


def test_a_hooks_failure_is_a_warning_on_the_keyrotor_logger_by_default(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from keyrotor.core import KeySpec, KeyState, PoolConfig

    driver = Driver({"a": "sk-a-0123456789"}, PoolConfig(keys=[KeySpec(key_id="a")]))

    def broken(change: object) -> None:
        raise RuntimeError("the hook's bug")

    driver.on_state_change.append(broken)
    with caplog.at_level("WARNING", logger="keyrotor"):
        driver.mark_key("a", KeyState.RATE_LIMITED, 30.0)
    assert [r.getMessage() for r in caplog.records] == [
        "keyrotor: an on_state_change hook failed: RuntimeError"
    ]


@pytest.mark.parametrize(("cost", "counted"), [(1e306, 0.0), (1e6, 1e6), (0.25, 0.25), (-1, 0.0)])
def test_an_absurd_cost_counts_as_none(cost: float, counted: float) -> None:
    """A day's sum of 1e306 costs overflowed to infinity in the state file, and
    a proxy would then not start on it (the pool refuses an infinite spend)."""
    from keyrotor.transports._driver import usage_of

    assert usage_of({"usage": {"cost": cost, "prompt_tokens": 1}})[0] == counted
