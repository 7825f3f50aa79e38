"""One upstream model: the replay simulator and the fake HTTP server answer alike.

The same upstream model (balances, a shared account, request and token limits,
failure windows) and the same script of requests and probes go through the
simulator (``SimulatedUpstream.send`` / ``probe`` on its virtual clock) and
through the fake OpenRouter server over loopback HTTP (its clock set to the
script's times); every answer must match: status, error body, rate-limit
headers, cost, the ``GET /key`` document, and a missing answer.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from keyrotor.replay import UpstreamModel
from keyrotor.replay.trace import TraceRecord
from keyrotor.replay.upstream import EPOCH, SimulatedUpstream
from keyrotor.testing import FakeClock, FakeUpstream

MODEL = UpstreamModel.from_json(
    {
        "prices": {"prompt": 0.000001, "completion": 0.000002},
        "keys": {
            "capped": {"credits": 0.00012},
            "limited": {"rpm": 2},
            "tokens": {"tpm": 100},
            "free1": {"account": "free"},
            "free2": {"account": "free", "rpm": 5},
        },
        "accounts": {"free": {"rpm": 3, "credits": 0.001}},
        "failures": [
            {"key": "flaky", "start": 5, "end": 12, "status": 503},
            {"key": "flaky", "start": 20, "end": 40, "status": 429},
            {"key": "flaky", "start": 60, "end": 61, "status": "reset"},
            {"key": "gone", "start": 30, "status": 401, "error": "revoked"},
        ],
    }
)
KEYS = ["capped", "limited", "tokens", "free1", "free2", "flaky", "gone"]
SECRETS = {key: f"sk-or-v1-one-model-{key}-00000000" for key in KEYS}
CONTENT = "x" * 40  # the fake counts 4 characters a token: 10 prompt tokens

# (time, key, max_tokens) for a request; max_tokens None for a probe (GET /key).
SCRIPT: list[tuple[float, str, int | None]] = [
    (0.0, "capped", 20),
    (0.5, "capped", 20),
    (1.0, "capped", 20),  # 3 x 0.00005 passes 0.00012: this one still goes through...
    (1.5, "capped", 20),  # ...and this one finds the balance spent: 402
    (2.0, "capped", None),
    (0.0 + 3, "limited", 5),
    (3.5, "limited", 5),
    (4.0, "limited", 5),  # third in a minute: 429 with the window's reset
    (63.5, "limited", 5),  # the first two have left the window
    (5.0, "tokens", 40),
    (6.0, "tokens", 40),  # 100 tokens in the window: the next one is refused
    (7.0, "tokens", 10),
    (66.0, "tokens", 10),
    (8.0, "free1", 8),
    (8.5, "free2", 8),
    (9.0, "free1", 8),
    (9.5, "free2", 8),  # the account's fourth in a minute: 429 for both keys
    (10.0, "free1", None),
    (4.5, "flaky", 8),
    (6.0, "flaky", 8),  # 503 in its window
    (7.0, "flaky", None),  # a probe in a 5xx window fails too
    (25.0, "flaky", 8),  # 429, retry-after up to the window's end
    (45.0, "flaky", 8),
    (60.5, "flaky", 8),  # no answer: the connection is dropped
    (29.0, "gone", 8),
    (31.0, "gone", 8),  # revoked from 30 s on
    (32.0, "gone", None),
]


def record(max_tokens: int) -> TraceRecord:
    cost = round(10 * 0.000001 + max_tokens * 0.000002, 12)  # as the fake prices it
    return TraceRecord(
        t=0.0, model="test/model", prompt_tokens=10, completion_tokens=max_tokens, cost=cost
    )


def simulated(sim: SimulatedUpstream, now: float, key: str, max_tokens: int | None) -> Any:
    if max_tokens is None:
        status, body, _ = sim.probe(key, now)
        return ("probe", status, body)
    status, _, headers, body, reason, _, cost = sim.send(key, now, record(max_tokens), 1)
    if status is None:
        return ("no answer", reason)
    if status == 200:
        return ("ok", round(cost, 12))
    return ("error", status, body, headers or {})


def served(http: httpx.Client, clock: FakeClock, now: float, key: str, n: int | None) -> Any:
    clock.set(EPOCH + now)
    auth = {"Authorization": f"Bearer {SECRETS[key]}"}
    if n is None:
        answer = http.get("/key", headers=auth)
        return ("probe", answer.status_code, answer.json())
    body = {"model": "test/model", "messages": [{"role": "user", "content": CONTENT}]}
    try:
        answer = http.post("/chat/completions", json={**body, "max_tokens": n}, headers=auth)
    except httpx.RemoteProtocolError:
        return ("no answer", "reset")
    if answer.status_code == 200:
        return ("ok", round(answer.json()["usage"]["cost"], 12))
    limits = {
        name: value
        for name, value in answer.headers.items()
        if name
        in ("retry-after", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")
    }
    return ("error", answer.status_code, json.loads(answer.content), limits)


def test_the_simulator_and_the_fake_server_answer_the_same_script_alike() -> None:
    sim = SimulatedUpstream(MODEL, KEYS)
    served_model = SimulatedUpstream(MODEL, KEYS)  # its own state, served over HTTP
    clock = FakeClock(start=EPOCH)
    scenario = served_model.scenario(SECRETS)
    expected_kinds = []
    with FakeUpstream.running_in_thread(scenario, clock=clock) as server:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            for now, key, max_tokens in sorted(SCRIPT, key=lambda step: step[0]):
                want = simulated(sim, now, key, max_tokens)
                got = served(http, clock, now, key, max_tokens)
                assert got == want, (now, key)
                expected_kinds.append(want[:2] if want[0] == "error" else want[:1])
    # The script covers what it means to: every kind of answer came up.
    assert {("error", 402), ("error", 429), ("error", 503), ("error", 401)} <= set(
        kind for kind in expected_kinds if kind[0] == "error"
    )
    assert ("no answer",) in expected_kinds and ("probe",) in expected_kinds


@pytest.mark.parametrize("key", ["capped", "free1"])
def test_a_probe_of_a_spent_balance_reports_it_in_both(key: str) -> None:
    """The probe document is the fake server's ``GET /key`` data in both."""
    sim = SimulatedUpstream(MODEL, KEYS)
    for step in range(25):
        sim.send(key, step * 30.0, record(20), 1)  # spaced out of every rate window
    status, body, _ = sim.probe(key, 400.0)
    assert status == 200 and body["data"]["limit_remaining"] <= 0
    assert body["data"]["label"] == key and body["data"]["usage"] > 0
