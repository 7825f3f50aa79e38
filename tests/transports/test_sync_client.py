"""The blocking client against the fake upstream running in a background thread."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpcore
import pytest

from keyrotor.core import KeySpec, PoolConfig
from keyrotor.testing import (
    Behaviour,
    Call,
    Chain,
    Credits,
    Custom,
    Drop,
    FakeClock,
    FakeUpstream,
    Hang,
    Invalid,
    Ok,
    Outcome,
    Reply,
    Scenario,
    Sequence,
    Slow,
    Truncate,
)
from keyrotor.transports._http import LineDecoder
from keyrotor.transports.errors import ConfigurationError, TransportError
from keyrotor.transports.sync import (
    Client,
    HTTPOptions,
    KeyrotorError,
    NoKeyAvailable,
    UpstreamError,
)

MESSAGES = [{"role": "user", "content": "hi"}]
MODEL = "openai/gpt-4o-mini"


def secret(alias: str) -> str:
    """A fake secret whose middle part is easy to look for in output."""
    return f"sk-or-v1-SECRET{alias.upper().replace('-', '')}-0123456789abcdef"


@contextmanager
def running(
    behaviours: Mapping[str, Behaviour],
    *,
    max_attempts: int = 3,
    policy: str = "round_robin",
    fake_clock: FakeClock | None = None,
    **options: Any,
) -> Iterator[tuple[Client, FakeUpstream]]:
    """The fake upstream with one key per alias, and an open client on it."""
    scenario = Scenario()
    for alias, behaviour in behaviours.items():
        scenario.add(secret(alias), behaviour, alias=alias)
    config = PoolConfig(
        keys=[KeySpec(key_id=alias) for alias in behaviours],
        max_attempts=max_attempts,
        policy=policy,  # type: ignore[arg-type]
    )
    server_options: dict[str, Any] = {} if fake_clock is None else {"clock": fake_clock}
    with (
        FakeUpstream.running_in_thread(scenario, **server_options) as server,
        Client(
            {alias: secret(alias) for alias in behaviours}, server.url, config, **options
        ) as client,
    ):
        yield client, server
    assert server.errors == []


def states(client: Client) -> dict[str, str]:
    return {key["alias"]: key["state"] for key in client.status()["keys"]}


def key_status(client: Client, alias: str) -> dict[str, Any]:
    return next(key for key in client.status()["keys"] if key["alias"] == alias)


def in_flight(client: Client) -> int:
    return int(client.status()["stats"]["inFlight"])


# ----------------------------------------------------------------- failover


def test_failover_over_invalid_depleted_and_rate_limited_keys() -> None:
    behaviours = {
        "ok": Ok(),
        "invalid": Invalid(),
        "broke": Credits(0.0),
        "limited": Reply(429, headers={"Retry-After": "3600"}),
    }
    with running(behaviours, max_attempts=4) as (client, server):
        answers = [client.chat(model=MODEL, messages=MESSAGES) for _ in range(12)]

        assert all(a["choices"][0]["message"]["content"] for a in answers)
        seen = server.keys_seen()
        assert seen.count("invalid") == 1  # never used again after its 401
        assert seen.count("broke") == 1
        assert seen.count("limited") == 1
        assert seen.count("ok") == 12
        assert states(client) == {
            "ok": "healthy",
            "invalid": "failed",
            "broke": "depleted",
            "limited": "rate_limited",
        }
        stats = client.status()["stats"]
        assert stats["delivered"] == 12
        assert stats["inFlight"] == 0


def test_a_key_that_drops_the_connection_is_failed_over() -> None:
    with running({"drop": Drop(), "ok": Ok()}) as (client, server):
        response = client.request("POST", "/chat/completions", json={"messages": MESSAGES})

        assert response.status_code == 200
        assert (response.key, response.attempts) == ("ok", 2)
        assert server.keys_seen() == ["drop", "ok"]
        assert key_status(client, "drop")["errors"]["transport"] == 1
        assert in_flight(client) == 0


def test_retry_after_is_honoured() -> None:
    reset = 0.25
    limited = Sequence([Reply(429, headers={"Retry-After": str(reset)})], then=Ok())
    with running({"limited": limited, "ok": Ok()}) as (client, server):
        start = time.monotonic()
        first = client.request("POST", "/chat/completions", json={"messages": MESSAGES})
        assert (first.key, first.attempts) == ("ok", 2)  # the 429, then the failover
        cooling = key_status(client, "limited")
        if cooling["state"] == "rate_limited":  # (a slow machine may see it back already)
            assert 0 < cooling["until_in"] <= reset  # the Retry-After, not a longer default
        # Requests answered while the key is still cooling down (it cannot go
        # back to rate_limited: its next answer is a 200) never go to it. No
        # guess at how many fit in the cooldown: the pool's own state decides.
        during: list[str] = []
        while True:
            response = client.request("POST", "/chat/completions", json={"messages": MESSAGES})
            if states(client)["limited"] != "rate_limited":  # the timer thread ticked
                break
            during.append(str(response.key))
        assert set(during) <= {"ok"}
        assert server.keys_seen().count("ok") == len(during) + 1 + (response.key == "ok")
        # Not before its Retry-After (a lower bound: a slow machine only adds to it).
        assert time.monotonic() >= start + reset

        if states(client)["limited"] == "recovering":
            client.chat(model=MODEL, messages=MESSAGES)
            assert server.keys_seen()[-1] == "limited"  # a trial request after the reset
        assert server.keys_seen().count("limited") == 2  # the 429, then the trial
        assert states(client)["limited"] == "healthy"


def test_no_key_available_when_every_key_is_rate_limited() -> None:
    limited = {alias: Reply(429, headers={"Retry-After": "60"}) for alias in ("a", "b")}
    with running(limited) as (client, server):
        for _ in range(2):
            with pytest.raises(NoKeyAvailable) as caught:
                client.chat(model=MODEL, messages=MESSAGES, timeout=0.2)
            assert caught.value.status == 429
            assert caught.value.retry_after is not None
            assert 55 < caught.value.retry_after <= 60
        assert server.keys_seen() == ["a", "b"]  # the second call never reached the upstream
        assert client.status()["stats"]["rejected"] == 2
        assert in_flight(client) == 0


# ---------------------------------------------------------------- streaming


def _direct_stream(server: FakeUpstream, alias: str, payload: dict[str, Any]) -> bytes:
    """The same request sent straight to the fake, bypassing the client."""
    with httpcore.ConnectionPool() as pool:
        response = pool.request(
            "POST",
            server.url + "/chat/completions",
            headers={"Authorization": f"Bearer {secret(alias)}"},
            content=json.dumps(payload).encode(),
        )
    return response.content


def _normalize(text: str) -> str:
    return re.sub(r"gen-\d+-\d+", "gen-X", text)


def test_streamed_lines_arrive_unchanged_and_usage_is_accounted() -> None:
    payload = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 6}
    with running({"s": Ok()}, fake_clock=FakeClock()) as (client, server):
        with client.stream("POST", "/chat/completions", json=payload) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            lines = list(response.iter_lines())
        with client.stream("POST", "/chat/completions", json=payload) as response:
            raw = b"".join(response.iter_bytes())
        direct = _direct_stream(server, "s", payload)

        assert _normalize(raw.decode()) == _normalize(direct.decode())
        assert _normalize("\n".join(lines) + "\n") == _normalize(direct.decode())
        assert lines[0] == ": OPENROUTER PROCESSING"
        assert lines[-2:] == ["data: [DONE]", ""]
        data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        content = "".join(d["choices"][0]["delta"]["content"] for d in data)
        assert content == "Hello from the fake upstream. "
        usage = data[-1]["usage"]
        assert usage["cost"] > 0

        key = key_status(client, "s")
        assert key["spend"] == pytest.approx(2 * usage["cost"])
        assert key["completion_tokens"] == 2 * usage["completion_tokens"]
        assert key["spend"] == pytest.approx(server.stats("s").cost - usage["cost"])
        assert in_flight(client) == 0


def test_line_decoder_keeps_a_character_split_between_chunks() -> None:
    decoder = LineDecoder()
    encoded = "data: é✓\r\nlast".encode()
    lines = []
    for i in range(len(encoded)):
        lines += decoder.feed(encoded[i : i + 1])
    lines += decoder.flush()
    assert lines == ["data: é✓", "last"]


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"])
def test_line_decoder_ends_lines_as_sse_allows_whatever_the_chunks(end: str) -> None:
    encoded = end.join(["data: a", "", "data: b", "last"]).encode()
    for cut in range(len(encoded) + 1):
        decoder = LineDecoder()
        lines = decoder.feed(encoded[:cut]) + decoder.feed(encoded[cut:]) + decoder.flush()
        assert lines == ["data: a", "", "data: b", "last"], cut


def test_leaving_a_stream_early_frees_the_key() -> None:
    payload = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 50}
    with running({"s": Ok()}) as (client, _server):
        with client.stream("POST", "/chat/completions", json=payload) as response:
            first = next(response.iter_lines())
            assert first.startswith(":") or first.startswith("data:")
            assert in_flight(client) == 1
        assert in_flight(client) == 0

        with (
            pytest.raises(KeyboardInterrupt),
            client.stream("POST", "/chat/completions", json=payload) as response,
        ):
            assert in_flight(client) == 1
            raise KeyboardInterrupt
        assert in_flight(client) == 0

        with pytest.raises(ValueError), client.stream("POST", "/chat/completions", json=payload):
            raise ValueError("the caller's own error")
        assert in_flight(client) == 0

        key = key_status(client, "s")
        assert key["state"] == "healthy"
        assert key["spend"] == 0  # no body ended: nothing accounted
        assert sum(key["errors"].values()) == 0  # a cancellation is nobody's fault
        client.chat(model=MODEL, messages=MESSAGES)  # the key still serves


def test_a_body_that_breaks_off_raises_and_counts_a_transport_error() -> None:
    payload = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 8}
    with running({"t": Truncate(after_chunks=3)}) as (client, _server):
        received: list[str] = []
        with (
            pytest.raises(TransportError),
            client.stream("POST", "/chat/completions", json=payload) as response,
        ):
            received.extend(response.iter_lines())
        assert any(line.startswith("data:") for line in received)
        assert key_status(client, "t")["errors"]["transport"] == 1
        assert in_flight(client) == 0


# ------------------------------------------------------------------ timeouts


def test_a_hanging_key_times_out_and_fails_over() -> None:
    # Hang() never answers: without the timeout the request would wait forever
    # (the worker thread's join below would then give up). No bound on the time
    # taken: what is checked is that the timeout fired, not how fast the machine is.
    options = HTTPOptions(idle=1.0, first_byte=1.0, connect=5.0)
    with running({"hang": Hang(), "ok": Ok()}, http=options) as (client, server):
        answers: list[Any] = []
        worker = threading.Thread(
            target=lambda: answers.append(
                client.request("POST", "/chat/completions", json={"messages": MESSAGES})
            )
        )
        worker.start()
        worker.join(timeout=60)  # a hang guard only: the timeout under test is 1 s
        assert not worker.is_alive(), "the hanging key never timed out"
        (response,) = answers

        assert (response.status_code, response.key, response.attempts) == (200, "ok", 2)
        assert server.keys_seen() == ["hang", "ok"]
        assert key_status(client, "hang")["errors"]["transport"] == 1
        assert key_status(client, "hang")["successes"] == 0
        # The client gave up on the hanging connection (Hang() holds it until then).
        assert server.stats("hang").in_flight == 0
        assert in_flight(client) == 0


def test_a_request_waits_for_a_busy_key_on_another_thread() -> None:
    config_keys = {"only": Slow(0.1)}
    scenario = Scenario().add(secret("only"), config_keys["only"], alias="only")
    config = PoolConfig(keys=[KeySpec(key_id="only", max_in_flight=1)])
    with (
        FakeUpstream.running_in_thread(scenario) as server,
        Client({"only": secret("only")}, server.url, config) as client,
    ):
        results: list[Any] = []
        threads = [
            threading.Thread(target=lambda: results.append(client.chat(model=MODEL, messages=[])))
            for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)  # a hang guard only
        assert len(results) == 2
        assert server.stats("only").max_in_flight == 1  # the second waited for the first
        assert client.status()["stats"]["delivered"] == 2


# ------------------------------------------------------------------ batches


def _no_such_model(call: Call) -> Outcome | None:
    if call.model == "no/such-model":
        return Reply(404, "No endpoints found for no/such-model.")
    return None


def test_parallel_chat_uses_distinct_keys_at_once() -> None:
    aliases = ["k0", "k1", "k2", "k3"]
    # What the fake upstream saw when each chat request arrived: how many other
    # requests it was answering at that moment (each is held 0.5 s).
    others_in_flight: list[int] = []
    upstream: list[FakeUpstream] = []

    hold = [0.5]  # seconds each request is held before its answer

    def observe(call: Call) -> Outcome | None:
        others_in_flight.append(upstream[0].totals().in_flight)
        call.latency += hold[0]
        return None

    behaviours: dict[str, Behaviour] = {
        alias: Chain(Custom(_no_such_model), Custom(observe)) for alias in aliases
    }
    # affinity on one session would put all four on one key; the batch's group
    # must spread them
    with running(behaviours, policy="affinity") as (client, server):
        upstream.append(server)
        request = {"model": MODEL, "messages": MESSAGES, "session": "same"}
        answers = client.parallel_chat([request] * 4)

        assert len(answers) == 4
        assert all(a["object"] == "chat.completion" for a in answers)
        assert sorted(str(k) for k in server.keys_seen()) == aliases
        # All four were at the upstream at once (one after the other: never more
        # than one), whatever the time it took to send them.
        assert len(others_in_flight) == 4
        assert max(others_in_flight) == 3

        hold[0] = 0.0

        server.reset_stats()
        bad = {"model": "no/such-model", "messages": MESSAGES}
        results = client.parallel_chat_partial([request, bad, request, request])
        assert [isinstance(r, UpstreamError) for r in results] == [False, True, False, False]
        error = results[1]
        assert isinstance(error, UpstreamError)
        assert error.status == 404
        assert all(isinstance(results[i], dict) for i in (0, 2, 3))
        assert {results[i]["object"] for i in (0, 2, 3)} == {"chat.completion"}  # type: ignore[index]

        with pytest.raises(UpstreamError):
            client.parallel_chat([request, bad])
        assert client.parallel_chat([]) == []
        assert in_flight(client) == 0


# ------------------------------------------------------------ configuration


def test_from_env_reads_the_seeds_variables() -> None:
    env = {
        "OPENROUTER_KEYS": "sk-a, sk-b,,",
        "OPENROUTER_API_KEY": "sk-c",
        "OPENROUTER_API_KEY_2": "sk-e",
        "OPENROUTER_API_KEY_1": "sk-d",
        "OPENROUTER_API_KEY_10": "sk-a",  # a duplicate, dropped
        "OPENROUTER_API_KEY_X": "sk-ignored",
        "OPENROUTER_BASE_URL": "http://127.0.0.1:9/api/v1",
    }
    client = Client.from_env(env)
    assert client.driver.secrets == {
        "env1": "sk-a",
        "env2": "sk-b",
        "env3": "sk-c",
        "env4": "sk-d",
        "env5": "sk-e",
    }
    assert "http://127.0.0.1:9/api/v1" in repr(client)
    assert "openrouter.ai" in repr(Client.from_env({"OPENROUTER_API_KEY": "sk-only"}))
    with pytest.raises(ConfigurationError, match="OPENROUTER_KEYS"):
        Client.from_env({"HOME": "/root"})

    with FakeUpstream.running_in_thread(Scenario.open()) as server:
        env = {"OPENROUTER_API_KEY_1": "sk-x", "OPENROUTER_BASE_URL": server.url}
        with Client.from_env(env) as client:
            assert client.chat(model=MODEL, messages=MESSAGES)["choices"]
        assert server.keys_seen() == ["sk-x"]


def test_lifecycle() -> None:
    client = Client([secret("a")], "http://127.0.0.1:9/api/v1")
    with pytest.raises(KeyrotorError, match="with Client"):
        client.request("GET", "/models")

    def timers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "keyrotor-timer"]

    before = len(timers())
    with client:
        assert len(timers()) == before + 1
        assert all(t.daemon for t in timers())
        with pytest.raises(KeyrotorError, match="already open"):
            client.__enter__()
    assert len(timers()) == before
    client.close()  # idempotent
    with client:  # and it opens again
        assert client.status()["totalKeys"] == 1
    assert client.status()["stats"]["inFlight"] == 0


# ------------------------------------------------------------------- secrets


def test_no_secret_in_reprs_errors_or_status() -> None:
    behaviours = {
        "good": Ok(),
        "bad": Invalid(),
        "busy": Reply(429, headers={"Retry-After": "60"}),
    }
    texts: list[str] = []
    with running(behaviours) as (client, server):
        texts.append(repr(client))
        client.chat(model=MODEL, messages=MESSAGES)
        client.chat(model=MODEL, messages=MESSAGES)
        with client.stream("POST", "/chat/completions", json={"messages": []}) as response:
            texts.append(repr(response))
        with pytest.raises(UpstreamError) as upstream_error:
            client.chat(model=MODEL, messages=MESSAGES, max_tokens=-1)  # 400 from the fake
        texts.append(str(upstream_error.value))
        texts.append(repr(upstream_error.value))
        server.set_behaviour(secret("good"), Reply(429, headers={"Retry-After": "60"}))
        with pytest.raises(NoKeyAvailable) as no_key:
            for _ in range(3):
                client.chat(model=MODEL, messages=MESSAGES, timeout=0.1)
        texts.append(str(no_key.value))
        status = json.dumps(client.status())
        texts.append(status)
        with client.lock:
            texts.append(repr(client.driver.pool))
            texts.append(json.dumps(client.driver.pool.snapshot()))

    assert '"alias": "bad"' in status  # the status names keys, by alias
    for text in texts:
        for alias in behaviours:
            assert secret(alias) not in text
            assert f"SECRET{alias.upper()}" not in text


def test_a_key_removed_after_it_was_chosen_fails_over_instead_of_erroring() -> None:
    with running({"a": Ok(), "b": Ok()}) as (client, server):
        with client.lock:  # the race: chosen by the pool, then removed by an operator
            del client.driver.secrets["a"]
        reply = client.request(
            "POST", "/chat/completions", json={"model": MODEL, "messages": MESSAGES}, pin="a"
        )
        assert (reply.status_code, reply.key, reply.attempts) == (200, "b", 2)
        assert server.stats("a").requests == 0
