"""The replay engine: determinism, no lost request, pacing, recorded answers."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from keyrotor.core import POLICIES, KeySpec
from keyrotor.replay import (
    Attempt,
    Trace,
    TraceHeader,
    TraceRecord,
    UpstreamModel,
    build_scenario,
    replay,
    simulate,
)


def test_same_trace_and_seed_give_the_same_bytes() -> None:
    scenario = build_scenario("failing_key", requests=600, seed=3)
    first = replay(scenario, "all", seed=5).to_json()
    second = replay(build_scenario("failing_key", requests=600, seed=3), "all", seed=5).to_json()
    assert first == second
    assert replay(scenario, "all", seed=6).to_json() != first  # the seed matters
    text = replay(scenario, "all", seed=5).to_text()
    assert text == replay(scenario, "all", seed=5).to_text()
    for policy in POLICIES:
        assert policy in text.splitlines()[2]


def test_every_scenario_runs_small_without_losing_a_request() -> None:
    for name in (
        "steady",
        "burst",
        "failing_key",
        "rate_limited",
        "pacing",
        "account_limits",
        "credits_run_out",
        "long_streams",
        "seed001",
    ):
        report = replay(build_scenario(name, requests=300), "all")
        for policy, m in report.results.items():
            ended = m["served"] + m["client_errors"]["total"] + m["cancelled"]
            assert (m["lost"], ended) == (0, 300 if name != "seed001" else 294), (name, policy)


def test_thousands_of_keys_scale_down() -> None:
    report = replay(build_scenario("thousands_of_keys", keys=300, requests=600))
    m = report.results["round_robin"]
    assert report.source["keys"] == 300
    assert m["lost"] == 0 and m["client_errors"]["total"] == 0
    assert m["failover"]["sends_after_failure"] == 0
    assert "keys" in m  # per-key listing below 1,000 keys


def test_pacing_on_known_rpm_draws_no_429_and_unknown_limits_do() -> None:
    paced = replay(build_scenario("pacing", requests=1500)).results["round_robin"]
    blind = replay(build_scenario("rate_limited", requests=5000)).results["round_robin"]
    assert paced["upstream"]["rate_limited_429"] == 0
    assert paced["client_errors"]["total"] == 0
    assert blind["upstream"]["rate_limited_429"] > 0


def test_failover_sends_nothing_to_a_key_after_its_429_or_401() -> None:
    episodes = 0
    for name, count in (("failing_key", 600), ("burst", 3000), ("account_limits", 3000)):
        for policy, m in replay(build_scenario(name, requests=count), "all").results.items():
            blamed = [e for e in m["episodes"] if not e["reason"].startswith(("http_5", "tr"))]
            episodes += len(blamed)
            assert all(e["sends_after_failure"] == 0 for e in blamed), (name, policy)
            fo = m["failover"]
            assert fo["sends_after_blame"] == 0, (name, policy)
            # a failed request waits only when no key could take it
            assert fo["waited_while_a_key_was_usable"] == 0, (name, policy)
            waited = fo["failed_over_at_once"] + fo["waited_no_key_usable"]
            assert fo["affected_requests"] == waited, (name, policy)
    assert episodes > 100


def test_seed001_batches_get_distinct_keys_as_keys_come_back() -> None:
    m = replay(build_scenario("seed001")).results["round_robin"]
    # 4 usable keys until t=10, 5 until the batch probe at t=20, then 7
    assert m["groups"]["distinct_keys"] == {"4": 6, "5": 5, "7": 19}
    assert m["recovery"]["recovered"] == 3
    assert m["client_errors"]["total"] == 0


def test_recorded_mode_reissues_the_recorded_answers() -> None:
    records = [
        TraceRecord(
            t=0.0,
            cost=0.01,
            attempts=[
                Attempt(key="old-a", status=500, latency=0.2),
                Attempt(key="old-b", status=200, latency=0.3, duration=1.0),
            ],
        ),
        TraceRecord(
            t=1.0, attempts=[Attempt(key="old-a", status=None, reason="timeout", latency=5.0)]
        ),
    ]
    trace = Trace(TraceHeader(source="proxy", keys=["a", "b"]), records)
    report = replay(trace, options={"max_attempts": 1})
    m = report.results["round_robin"]
    assert report.source["upstream"] == "recorded"
    assert m["upstream"]["answers"] == {"500": 1, "no_response_timeout": 1}
    assert m["client_errors"]["by_status"] == {"500": 1, "502": 1}
    again = replay(trace).results["round_robin"]  # with failover: attempt 2 gets the 200
    # three attempts (max_attempts=3), every one re-issuing the recorded timeout
    assert again["upstream"]["answers"] == {"200": 1, "500": 1, "no_response_timeout": 3}
    assert again["spend"]["total"] == 0.01
    simulated = replay(trace, recorded=False).results["round_robin"]
    assert simulated["upstream"]["answers"] == {"200": 2}


def test_cancelled_requests_end_once() -> None:
    records = [
        TraceRecord(t=0.0, stream=True, completion_tokens=500, cancel_after=2.0),
        TraceRecord(t=0.0, cancel_after=0.1),
        TraceRecord(t=0.5),
    ]
    trace = Trace(TraceHeader(), records)
    result = simulate(trace, UpstreamModel.from_json({"latency": 0.5}))
    assert (result.cancelled, result.served, result.lost) == (2, 1, 0)
    assert result.pool_statistics["cancelled"] == 2


arrival = st.tuples(
    # times on a half-second grid too, so arrivals meet pacing timers and each other
    st.one_of(
        st.floats(min_value=0, max_value=20, allow_nan=False),
        st.integers(min_value=0, max_value=40).map(lambda n: n * 0.5),
    ),
    st.booleans(),
    st.integers(min_value=0, max_value=400),
    st.one_of(st.none(), st.floats(min_value=0, max_value=5)),
    st.one_of(st.none(), st.sampled_from(["s1", "s2", "s3"])),
    st.one_of(st.none(), st.sampled_from(["g1", "g2"])),
)
window = st.fixed_dictionaries(
    {
        "key": st.sampled_from(["key-0", "key-1", "key-2", "*"]),
        "start": st.floats(min_value=0, max_value=10),
        "end": st.floats(min_value=10.5, max_value=30),
        "status": st.sampled_from([401, 402, 429, 500, 503, "timeout", "reset"]),
    }
)
key_model = st.fixed_dictionaries(
    {},
    optional={
        "rpm": st.integers(min_value=1, max_value=30),
        "credits": st.floats(min_value=0, max_value=0.01),
        "account": st.sampled_from(["a1", "a2"]),
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(  # r5's cancel at t=1.0 meets its queue deadline and pacing freeing the keys
    arrivals=[(0.0, False, 0, None, None, None)] * 5
    + [(1.0, False, 0, None, None, None)] * 2
    + [(0.0, False, 0, 1.0, None, None)],
    failures=[],
    keys={},
    policy="round_robin",
    max_in_flight=None,
    known_rpm=60.0,
    queue_timeout=1.0,
    seed=0,
)
@given(
    arrivals=st.lists(arrival, max_size=40),
    failures=st.lists(window, max_size=3),
    keys=st.dictionaries(st.sampled_from(["key-0", "key-1", "key-2"]), key_model),
    policy=st.sampled_from(POLICIES),
    max_in_flight=st.one_of(st.none(), st.integers(min_value=1, max_value=3)),
    known_rpm=st.one_of(st.none(), st.sampled_from([6.0, 60.0])),
    queue_timeout=st.sampled_from([0.0, 1.0, 30.0]),
    seed=st.integers(min_value=0, max_value=3),
)
def test_replay_never_loses_a_request(
    arrivals: list[tuple[float, bool, int, float | None, str | None, str | None]],
    failures: list[dict[str, object]],
    keys: dict[str, dict[str, object]],
    policy: str,
    max_in_flight: int | None,
    known_rpm: float | None,
    queue_timeout: float,
    seed: int,
) -> None:
    """Every arrival ends exactly once: served, a client error, or cancelled
    (pacing and in-flight limits make requests queue and drain on arrivals)."""
    records = [
        TraceRecord(
            t=t,
            stream=stream,
            completion_tokens=tokens,
            cancel_after=cancel,
            session=session,
            group=group,
            prompt_tokens=10,
        )
        for t, stream, tokens, cancel, session, group in sorted(arrivals, key=lambda a: a[0])
    ]
    model = UpstreamModel.from_json(
        {
            "latency": {"kind": "lognormal", "median": 0.3, "sigma": 0.8},
            "failures": failures,
            "keys": keys,
            "accounts": {"a1": {"rpm": 5}},
            "prices": {"prompt": 0.0001},
            "probe_latency": 0.1,
        }
    )
    specs = [
        KeySpec(
            key_id=f"key-{i}",
            max_in_flight=max_in_flight,
            rpm=known_rpm,
            account=keys.get(f"key-{i}", {}).get("account"),
        )  # type: ignore[arg-type]
        for i in range(3)
    ]
    result = simulate(
        Trace(TraceHeader(), records),
        model,
        policy=policy,
        seed=seed,
        keys=specs,
        options={"queue_timeout": queue_timeout, "probe_interval": 1.0, "min_healthy": 2},
    )
    ended = result.served + sum(result.client_errors.values()) + result.cancelled
    assert result.lost == 0
    assert ended == len(records)
    stats = result.pool_statistics
    assert stats["started"] == len(records)
    assert stats["in_flight"] == 0 and stats["queued"] == 0
    assert stats["rejected"] + stats["cancelled"] + stats["delivered"] >= len(records) - 0
    assert stats["rejected"] == result.rejected


def test_an_arrival_that_drains_another_request_loses_nothing() -> None:
    """Regression: r2 arrives when the pacing timer is due (t=1.0): its arrival
    sends r1 while r2 waits. The engine must answer r1, not take that Send for r2's."""
    records = [TraceRecord(t=0.0), TraceRecord(t=0.1), TraceRecord(t=1.0)]
    result = simulate(
        Trace(TraceHeader(), records),
        UpstreamModel.from_json({"latency": 0.2}),
        keys=[KeySpec(key_id="paced", rpm=60)],
    )
    assert (result.served, result.lost) == (3, 0)
    assert result.queue_waits == [0.9, 1.0]  # r1 waits until 1.0, r2 until 2.0


@pytest.mark.parametrize(
    ("rpm", "ended"),
    [
        (60, (1, 1, 0)),  # pacing frees the key at t=1.0: sent, then taken back: cancelled
        (6, (1, 0, 1)),  # nothing frees it: its queue deadline rejects it first (a 503)
    ],
)
def test_a_cancel_at_the_instant_of_a_queued_requests_deadline(
    rpm: float, ended: tuple[int, int, int]
) -> None:
    """Regression: the caller of a queued request gives up at t=1.0, the instant its
    queue deadline passes and pacing may free a key. It ends once, as the pool says."""
    records = [TraceRecord(t=0.0), TraceRecord(t=0.0, cancel_after=1.0)]
    result = simulate(
        Trace(TraceHeader(), records),
        UpstreamModel.from_json({"latency": 0.2}),
        keys=[KeySpec(key_id="paced", rpm=rpm)],
        options={"queue_timeout": 1.0},
    )
    rejected = sum(result.client_errors.values())
    assert (result.served, result.cancelled, rejected) == ended
    assert result.lost == 0
    stats = result.pool_statistics
    assert (stats["cancelled"], stats["rejected"]) == ended[1:]
    assert stats["in_flight"] == 0 and stats["queued"] == 0


def test_sends_before_a_key_is_blamed_are_not_counted_as_sends_after_blame() -> None:
    """Regression: 503s (the key is still in service: an upstream fault) and then
    429s from the same key. Only sends while the key is out of service count."""
    records = [TraceRecord(t=0.1 * i) for i in range(300)]
    model = UpstreamModel.from_json(
        {
            "latency": 0.05,
            "failures": [
                {"key": "key-1", "start": 0.0, "end": 0.5, "status": 503},
                {"key": "key-1", "start": 0.5, "end": 20.0, "status": 429},
            ],
        }
    )
    report = replay(Trace(TraceHeader(), records), "round_robin", keys=4, upstream=model)
    failover = report.results["round_robin"]["failover"]
    assert failover["sends_after_failure"] > 0  # the sends between the 503s and the 429
    assert failover["sends_after_blame"] == 0  # none once the 429 took the key out


def test_an_upstream_model_naming_a_key_the_pool_lacks_is_an_error() -> None:

    model = UpstreamModel.from_json({"failures": [{"key": "kye-1", "start": 0, "status": 503}]})
    with pytest.raises(ValueError, match="names key\\(s\\) 'kye-1' that the pool does not have"):
        replay(Trace(TraceHeader(), [TraceRecord(t=0.0)]), keys=2, upstream=model)


def test_a_failover_that_waits_is_judged_by_the_pools_own_query() -> None:
    """key-1 answers 429 and r1 fails over while key-0 cannot take it: r0's
    stream holds its one slot (max_in_flight), or its rpm pacing is not due.
    Either way r1 waits with no key usable, as ``Pool.usable_now`` says."""
    model = UpstreamModel.from_json(
        {
            "latency": 0.05,
            "stream_rate": 10.0,
            "failures": [{"key": "key-1", "start": 0.0, "end": 100.0, "status": 429}],
        }
    )
    for spec in (KeySpec(key_id="key-0", max_in_flight=1), KeySpec(key_id="key-0", rpm=6)):
        records = [
            TraceRecord(t=0.0, stream=True, completion_tokens=10),  # key-0 for 1 s
            TraceRecord(t=0.1),  # key-1: 429, waits for key-0
        ]
        result = simulate(
            Trace(TraceHeader(), records),
            model,
            keys=[spec, KeySpec(key_id="key-1")],
        )
        assert (result.served, result.lost) == (2, 0), spec
        assert result.upstream_429 == [0, 1], spec
        assert result.failover_waited_no_key == 1, spec
        assert result.failover_waited_key_usable == 0, spec


def recorded_429_trace(wall_start: float | None, reset: float) -> Trace:
    """key-a's recorded 429 says 'reset at `reset`' (epoch ms); 200 requests follow
    from 120 s to 320 s."""
    headers = {"x-ratelimit-limit": "20", "x-ratelimit-remaining": "0"}
    headers["x-ratelimit-reset"] = str(int(reset * 1000))
    first = TraceRecord(
        t=0.0,
        attempts=[
            Attempt(key="key-a", status=429, latency=0.05, headers=headers),
            Attempt(key="key-b", t=0.05, status=200, latency=0.4),
        ],
    )
    rest = [
        TraceRecord(t=120.0 + i, attempts=[Attempt(key="key-b", latency=0.4)]) for i in range(200)
    ]
    header = TraceHeader(source="proxy", keys=["key-a", "key-b"], wall_start=wall_start)
    return Trace(header, [first, *rest])


def test_recorded_resets_are_read_on_the_recordings_wall_clock() -> None:
    wall_start = 1_796_637_600.0  # 2026-12-07 10:00 UTC, the recording's t = 0
    result = replay(recorded_429_trace(wall_start, wall_start + 60)).results["round_robin"]
    assert result["keys"]["key-a"]["final_state"] == "healthy"
    assert result["keys"]["key-a"]["sends"] == 101  # back for half of the later traffic
    assert result["episodes"][0]["time_to_recover"] == pytest.approx(120.35)
    # a trace without wall_start (older keyrotor) is read on the virtual clock, as before
    old = replay(recorded_429_trace(None, 1_767_225_600.0 + 60)).results["round_robin"]
    assert old["keys"]["key-a"]["sends"] == 101


def test_the_upstream_enforces_the_account_the_trace_header_names() -> None:
    records = [TraceRecord(t=i * 0.5) for i in range(240)]  # 120 a minute, for 2 minutes
    model = UpstreamModel.from_json({"accounts": {"acct-1": {"rpm": 10}}})
    keys = [{"key_id": "key-a", "account": "acct-1"}, {"key_id": "key-b", "account": "acct-1"}]
    trace = Trace(TraceHeader(keys=keys), records)
    result = replay(trace, upstream=model).results["round_robin"]
    assert result["upstream"]["answers"]["429"] > 0
    assert result["served"] <= 30  # 10 a minute, account-wide: the first 2 minutes and 1 s
    # the model's own account for a key comes first
    own = UpstreamModel.from_json(
        {"accounts": {"acct-1": {"rpm": 10}}, "keys": {"key-a": {"account": "other"}}}
    )
    result = replay(trace, upstream=own).results["round_robin"]
    assert result["keys"]["key-a"]["served"] > result["keys"]["key-b"]["served"]


def test_a_scenario_with_too_few_keys_says_how_many_it_needs() -> None:
    with pytest.raises(ValueError, match=r"scenario 'failing_key' needs at least 3 keys"):
        replay(build_scenario("failing_key", keys=2, requests=10), keys=2)
    with pytest.raises(ValueError, match=r"scenario 'account_limits' needs at least 2 keys"):
        replay(build_scenario("account_limits", keys=1, requests=10), keys=1)


@pytest.mark.parametrize("name", ["policy", "seed", "keys"])
def test_options_that_replay_sets_itself_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"options\\[{name!r}\\].*{name}="):
        replay(build_scenario("steady", requests=10), options={name: 1})
