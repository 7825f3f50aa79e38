"""The operator's views through a running proxy: analytics and who may read
them, the dashboard's event stream, alerts with their webhooks and admin API,
recommendations."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import attrs
import httpx
import openai
import pytest

from keyrotor.adapters.advice import recommendations
from keyrotor.adapters.alerts import AlertBook, Observed, Rule, rule_from_json
from keyrotor.adapters.config import ProxyConfig
from keyrotor.core import KeySpec, PoolConfig
from keyrotor.models import parse_catalog
from keyrotor.testing import Custom, FakeUpstream, Ok, Reply, Scenario
from keyrotor.testing.catalogs import realistic_models

from .proxy_thread import ProxyThread

ADMIN = "admin-token-" + "qz" * 12
WEB = "client-token-web-" + "wy" * 12
CI = "client-token-ci-" + "wy" * 12
SECRETS = {"k1": "sk-or-v1-views-one-" + "jk" * 12, "k2": "sk-or-v1-views-two-" + "mn" * 12}
HI = [{"role": "user", "content": "hi"}]
MODEL = "openai/gpt-4o-mini"


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def config(upstream: str, tmp_path: Path, **options: Any) -> ProxyConfig:
    return ProxyConfig(
        keys=dict(SECRETS),
        pool=PoolConfig(keys=[KeySpec(key_id=alias) for alias in SECRETS], max_attempts=1),
        upstream=upstream,
        server={"host": "127.0.0.1", "port": 0},
        admin_token=ADMIN,
        client_tokens=(WEB, CI),
        client_names={WEB: "web", CI: "ci"},
        state_path=str(tmp_path / "state.db"),
        state_flush=0.05,
        **options,
    )


def scenario() -> Scenario:
    fake = Scenario()
    for alias, secret in SECRETS.items():
        fake.add(secret, Ok(), alias=alias)
    return fake


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[str, FakeUpstream, list[dict[str, Any]]]]:
    log: list[dict[str, Any]] = []
    with FakeUpstream.running_in_thread(scenario()) as upstream:
        with ProxyThread(config(upstream.url, tmp_path), log) as url:
            yield url, upstream, log


def test_analytics_count_what_was_served_and_a_client_sees_only_its_own(
    running: tuple[str, FakeUpstream, list[dict[str, Any]]],
) -> None:
    url, _, _ = running
    for token, times in ((WEB, 3), (CI, 2)):
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0)
        for _ in range(times):
            sdk.chat.completions.create(model=MODEL, messages=HI)  # type: ignore[arg-type]
        sdk.close()
    by_client = httpx.get(
        f"{url}/analytics/usage?by=client&group_by=day", headers=bearer(ADMIN)
    ).json()
    assert by_client["groupBy"] == "day" and by_client["by"] == "client"
    counts = {row["name"]: row["requests"] for row in by_client["rows"]}
    assert counts == {"web": 3, "ci": 2}
    assert all(row["promptTokens"] > 0 and row["cost"] > 0 for row in by_client["rows"])
    mine = httpx.get(f"{url}/analytics/usage?group_by=day", headers=bearer(CI)).json()
    assert [row["requests"] for row in mine["rows"]] == [2]  # its own, nobody else's
    perf = httpx.get(
        f"{url}/analytics/performance?by=key&group_by=minute", headers=bearer(ADMIN)
    ).json()
    assert sum(r["requests"] for r in perf["rows"]) == 5
    assert all(r["ttfbP50Ms"] > 0 and r["totalP99Ms"] >= r["ttfbP50Ms"] for r in perf["rows"])
    text = httpx.get(
        f"{url}/analytics/costs?by=model&group_by=day&format=csv", headers=bearer(ADMIN)
    )
    assert text.headers["content-type"].startswith("text/csv")
    assert text.text.splitlines()[0] == "start,name,requests,cost,costPerRequest"
    assert text.text.splitlines()[1].split(",")[1:3] == [MODEL, "5"]
    bad = httpx.get(f"{url}/analytics/usage?group_by=week", headers=bearer(ADMIN))
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == "group_by='week': choose minute, hour or day"


def test_without_an_admin_token_a_client_still_sees_its_own_analytics(tmp_path: Path) -> None:
    """docs/analytics.md: a client token sees its own answers; with no admin token
    configured that held too (it was a 403), and the rest stays closed."""
    with FakeUpstream.running_in_thread(scenario()) as upstream:
        options = config(upstream.url, tmp_path)
        with ProxyThread(attrs.evolve(options, admin_token=None), []) as url:
            for token in (WEB, CI, CI):
                with openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0) as sdk:
                    sdk.chat.completions.create(model=MODEL, messages=HI)  # type: ignore[arg-type]
            mine = httpx.get(f"{url}/analytics/usage?group_by=day&by=client", headers=bearer(CI))
            nobody = httpx.get(f"{url}/analytics/usage")
            alerts = httpx.get(f"{url}/alerts", headers=bearer(CI))
    assert [(r["name"], r["requests"]) for r in mine.json()["rows"]] == [("ci", 2)]
    assert nobody.status_code == 403 and alerts.status_code == 403


def test_without_the_admin_token_no_operator_data_is_served(
    running: tuple[str, FakeUpstream, list[dict[str, Any]]],
) -> None:
    url, _, _ = running
    page = httpx.get(f"{url}/dashboard")  # the page itself holds no data
    assert page.status_code == 200 and b'id="login-token"' in page.content
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for path in ("/dashboard/dashboard.js", "/dashboard/dashboard.css"):
        assert httpx.get(f"{url}{path}").status_code == 200
    for path in ("/alerts", "/analytics/recommendations", "/dashboard/events", "/analytics/usage"):
        assert httpx.get(f"{url}{path}").status_code == 401
    for path in ("/alerts", "/analytics/recommendations", "/dashboard/events"):
        answer = httpx.get(f"{url}{path}", headers=bearer(WEB))
        assert answer.status_code == 403
        assert answer.json()["error"]["message"].endswith(
            "needs the admin token, not a client token"
        )
    assert httpx.get(f"{url}/admin/alerts", headers=bearer(WEB)).status_code == 403
    assert httpx.get(f"{url}/alerts", headers=bearer(ADMIN)).json()["alerts"] == []


def read_events(response: httpx.Response, found: queue.Queue[tuple[str, Any]]) -> None:
    event = None
    try:
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: ") and event is not None:
                found.put((event, json.loads(line[len("data: ") :])))
    except httpx.HTTPError:  # the test closed the stream
        return


def test_the_event_stream_tells_of_a_key_turning_rate_limited(
    running: tuple[str, FakeUpstream, list[dict[str, Any]]],
) -> None:
    url, upstream, _ = running
    found: queue.Queue[tuple[str, Any]] = queue.Queue()
    with httpx.Client(timeout=30) as http:
        with http.stream("GET", f"{url}/dashboard/events", headers=bearer(ADMIN)) as stream:
            assert stream.headers["content-type"] == "text/event-stream"
            reader = threading.Thread(target=read_events, args=(stream, found), daemon=True)
            reader.start()
            event, status = found.get(timeout=10)
            assert event == "status" and {k["alias"] for k in status["keys"]} == {"k1", "k2"}
            upstream.set_behaviour(
                SECRETS["k1"], Custom(lambda call: Reply(429, "Rate limit exceeded")), alias="k1"
            )
            for _ in range(4):  # k1 gets a request within two
                httpx.post(
                    f"{url}/v1/chat/completions",
                    json={"model": MODEL, "messages": HI},
                    headers=bearer(ADMIN),
                )
            seen = []
            while not any(e == "key" for e, _ in seen):
                seen.append(found.get(timeout=10))
    change = next(data for e, data in seen if e == "key")
    assert change["key"] == "k1" and change["state"] == "rate_limited"
    assert change["until"] > change["at"]


class Receiver:
    """A webhook receiver on a free loopback port: every POSTed JSON document."""

    def __init__(self) -> None:
        got: queue.Queue[dict[str, Any]] = queue.Queue()
        self.got = got

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                got.put(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_an_alert_fires_once_clears_once_and_reaches_the_webhook(tmp_path: Path) -> None:
    receiver = Receiver()
    rules = (Rule("keys", "usable_keys", 2.0, "total"),)
    log: list[dict[str, Any]] = []
    try:
        with FakeUpstream.running_in_thread(scenario()) as upstream:
            options = config(upstream.url, tmp_path, alert_rules=rules, alert_interval=0.05)
            options = _with(options, webhooks=(receiver.url,))
            with ProxyThread(options, log) as url:
                mark = f"{url}/admin/keys/k2/state"
                assert httpx.post(
                    mark, json={"state": "disabled"}, headers=bearer(ADMIN)
                ).is_success
                fired = receiver.got.get(timeout=10)["alert"]
                listed = httpx.get(f"{url}/alerts", headers=bearer(ADMIN)).json()
                assert httpx.post(mark, json={"state": "healthy"}, headers=bearer(ADMIN)).is_success
                cleared = receiver.got.get(timeout=10)["alert"]
    finally:
        receiver.close()
    assert (fired["state"], fired["value"], fired["name"]) == ("firing", 1.0, "keys")
    assert fired["text"] == "keys: 1 usable keys, under 2"
    assert listed["firing"] == 1 and listed["alerts"][0]["state"] == "firing"
    assert (cleared["state"], cleared["text"]) == ("ok", "keys: 2 usable keys, back to 2 or more")
    assert receiver.got.empty()  # once each, not at every look
    assert [e["state"] for e in log if e.get("event") == "alert"] == ["firing", "ok"]


def _with(config: ProxyConfig, **changes: Any) -> ProxyConfig:
    import attrs

    return attrs.evolve(config, **changes)


def test_alert_rules_through_the_admin_api_survive_a_restart(tmp_path: Path) -> None:
    with FakeUpstream.running_in_thread(scenario()) as upstream:
        with ProxyThread(config(upstream.url, tmp_path), []) as url:
            rule = f"{url}/admin/alerts/spend"
            bad = httpx.put(rule, json={"kind": "spend", "threshold": -1}, headers=bearer(ADMIN))
            assert bad.status_code == 400
            assert "threshold -1 is out of range (USD a day)" in bad.json()["error"]["message"]
            deep = httpx.put(rule, content=b"[" * 50_000 + b"]" * 50_000, headers=bearer(ADMIN))
            assert (
                deep.status_code == 400 and "nested too deeply" in deep.json()["error"]["message"]
            )
            made = httpx.put(
                rule,
                json={"kind": "spend", "threshold": 5, "scope": "model"},
                headers=bearer(ADMIN),
            )
            assert made.status_code == 201 and made.json()["stored"] is True
            other = httpx.put(
                f"{url}/admin/alerts/gone", json={"kind": "key_failed"}, headers=bearer(ADMIN)
            )
            assert other.status_code == 201
            assert httpx.delete(f"{url}/admin/alerts/gone", headers=bearer(ADMIN)).is_success
            missing = httpx.delete(f"{url}/admin/alerts/gone", headers=bearer(ADMIN))
            assert missing.status_code == 404
        with ProxyThread(config(upstream.url, tmp_path), []) as url:
            rules = httpx.get(f"{url}/admin/alerts", headers=bearer(ADMIN)).json()["rules"]
    assert rules == [{"name": "spend", "kind": "spend", "threshold": 5.0, "scope": "model"}]


def test_recommendations_name_a_cheaper_model_a_failing_key_and_a_spent_free_day() -> None:
    catalog = parse_catalog({"data": [m.to_json() for m in realistic_models()]})
    dear = max(
        (m for m in catalog.models if m.pricing.known and not m.pricing.variable),
        key=lambda m: m.pricing.prompt + m.pricing.completion,
    )
    advice = recommendations(
        {dear.id: 41.2, "unknown/model": 3.0},
        catalog,
        {"k3": {"auth": 10, "credits": 2}, "k4": {"rate_limited": 25}, "k5": {"auth": 1}},
        {"team": {"perDay": 50, "spentAt": 1_764_926_040.0}, "solo": {"spentAt": None}},
    )
    kinds = [a["kind"] for a in advice]
    assert kinds == ["cheaper_model", "key_failing", "key_rate_limited", "free_quota_spent"]
    assert advice[0]["text"].startswith(f"model {dear.id} cost $41.20 this week; model ")
    assert advice[1]["text"] == (
        "key k3 failed 12 times today (auth 10, credits 2): revoked, or out of credits?"
    )
    assert "ran out at 09:14 UTC today" in advice[3]["text"]
    assert recommendations({}, None, {}, {}) == []


def test_alert_rules_fire_and_clear_per_subject() -> None:
    book = AlertBook(
        [
            rule_from_json({"name": "spend", "kind": "spend", "threshold": 1, "scope": "model"}),
            rule_from_json(
                {"name": "errors", "kind": "error_share", "threshold": 0.5, "min_requests": 4}
            ),
            rule_from_json({"name": "free", "kind": "free_quota", "threshold": 10}),
            rule_from_json({"name": "dead", "kind": "key_failed", "subject": "k1"}),
            rule_from_json({"name": "budget", "kind": "budget", "threshold": 80}),
        ]
    )
    seen = Observed(
        spend={"model": {"a": 2.0, "b": 0.5}},
        budgets={"client": {"ci": 85.0, "web": 10.0}},
        answers={300.0: {"key": {"k1": (4, 3), "k2": (2, 2)}}},
        free_left={"team": 4.0},
        key_states={"k1": "failed"},
    )
    fired = book.evaluate(seen, 100.0)
    assert sorted((a.rule, a.subject) for a in fired) == [
        ("budget", "ci"),
        ("dead", "k1"),
        ("errors", "k1"),
        ("free", "team"),
        ("spend", "a"),
    ]  # fmt: skip  (k2 has too few answers to say)
    assert next(a for a in fired if a.rule == "budget").text == (
        "budget: budget of client ci is 85 % spent in its window, over 80 %"
    )
    assert book.evaluate(seen, 110.0) == []  # once
    calm = Observed(spend={"model": {"a": 0.1}}, key_states={"k1": "healthy"})
    cleared = book.evaluate(calm, 120.0)
    assert sorted(a.rule for a in cleared) == ["budget", "dead", "free", "spend"]  # not errors
    assert book.status()["firing"] == 1
    for data, message in (
        ({"name": "x", "kind": "nope"}, "kind must be one of spend"),
        ({"name": "x", "kind": "spend"}, "threshold must be a number (USD a day)"),
        ({"name": "x", "kind": "spend", "threshold": 1, "scope": "account"}, "scope is one of"),
        ({"name": "", "kind": "spend", "threshold": 1}, "name must be a non-empty string"),
        ({"name": "x", "kind": "spend", "threshold": 1, "colour": 1}, "unknown field 'colour'"),
        ({"name": "x", "kind": "error_share", "threshold": 2}, "out of range"),
    ):
        with pytest.raises(ValueError) as caught:
            rule_from_json(data)
        assert message in str(caught.value)


def free_port() -> int:
    """A loopback port nobody listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_webhook_is_retried_with_backoff_and_a_dead_one_is_logged_by_host_only() -> None:
    import anyio

    from keyrotor.adapters.alerts import Alert
    from keyrotor.adapters.proxy.views import WEBHOOK_TRIES, Webhooks

    receiver = Receiver()
    answers = iter([500, 503])  # then the receiver's own 204
    plain = receiver.server.RequestHandlerClass

    class Failing(plain):  # type: ignore[valid-type,misc]
        def do_POST(self) -> None:
            status = next(answers, None)
            if status is None:
                return super().do_POST()
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(status)
            self.end_headers()

    receiver.server.RequestHandlerClass = Failing
    dead = f"http://127.0.0.1:{free_port()}/hooks/secret-token"
    log: list[dict[str, Any]] = []
    hooks = Webhooks([receiver.url, dead], log.append, backoff=0.01)
    alert = Alert("r", "usable_keys", "", "firing", 1.0, 0.0, 1.0, "r: 0 usable keys, under 1")

    async def main() -> None:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(hooks.run)
            while hooks._send is None:
                await anyio.sleep(0.01)
            hooks.post(alert)
            while hooks.sent + hooks.failed < 2:
                await anyio.sleep(0.01)
            tasks.cancel_scope.cancel()

    try:
        anyio.run(main)
    finally:
        receiver.close()
    assert receiver.got.get(timeout=1)["alert"]["text"] == "r: 0 usable keys, under 1"
    assert (hooks.sent, hooks.failed) == (1, 1)  # the first after two failures
    (warning,) = log
    assert warning["message"] == (
        f"alert webhook to http://127.0.0.1 failed {WEBHOOK_TRIES} times (ConnectError); "
        "the alert is in /alerts and the log"
    )


def test_analytics_times_with_a_plus_offset_and_out_of_range_ones(
    running: tuple[str, FakeUpstream, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A '+hh:mm' offset arrived as a space (a 400); huge Unix seconds were a 500;
    a CSV of no answers had no header; MAX_ROWS bounded periods, not rows."""
    from keyrotor.adapters import analytics

    url, _, _ = running
    usage = f"{url}/analytics/usage"
    plus = httpx.get(f"{usage}?from=2026-12-07T10:00:00+01:00", headers=bearer(ADMIN))
    assert plus.status_code == 200 and plus.json()["from"] == "2026-12-07T09:00:00Z"
    for query, message in (
        ("from=100000000000000000&to=100000000000003600&group_by=minute", "to='1000000"),
        ("from=9223372036854775808&group_by=day", "from='9223372036854775808' is out of range"),
        ("from=0001-01-01T00:00:00+01:00&group_by=day", "from='0001-01-01T00:00:00+01:00' is"),
    ):
        bad = httpx.get(f"{usage}?{query}", headers=bearer(ADMIN))
        assert bad.status_code == 400, query
        assert message in bad.json()["error"]["message"]
        assert "0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z" in bad.json()["error"]["message"]
    empty = httpx.get(f"{url}/analytics/costs?format=csv&by=key", headers=bearer(ADMIN))
    assert empty.text == "start,name,requests,cost,costPerRequest\r\n"
    for token in (WEB, CI):
        with openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0) as sdk:
            sdk.chat.completions.create(model=MODEL, messages=HI)  # type: ignore[arg-type]
    monkeypatch.setattr(analytics, "MAX_ROWS", 1)
    assert len(httpx.get(f"{usage}?group_by=day", headers=bearer(ADMIN)).json()["rows"]) == 1
    many = httpx.get(f"{usage}?group_by=day&by=client", headers=bearer(ADMIN))
    assert many.status_code == 400 and many.json()["error"] == {
        "message": "the answer holds more than 1 rows: narrow from/to, group coarser or drop by",
        "type": "invalid_request_error",
        "code": "invalid_query",
    }


def test_a_rule_replaced_with_put_clears_its_alerts_and_tells_the_webhook(
    tmp_path: Path,
) -> None:
    """A per-key rule replaced by a total one left its alerts firing for ever."""
    receiver = Receiver()
    rules = (Rule("spend", "spend", 0.0, "key"),)
    log: list[dict[str, Any]] = []
    try:
        with FakeUpstream.running_in_thread(scenario()) as upstream:
            options = config(upstream.url, tmp_path, alert_rules=rules, alert_interval=0.05)
            with ProxyThread(_with(options, webhooks=(receiver.url,)), log) as url:
                with openai.OpenAI(base_url=f"{url}/v1", api_key=WEB, max_retries=0) as sdk:
                    sdk.chat.completions.create(model=MODEL, messages=HI)  # type: ignore[arg-type]
                fired = receiver.got.get(timeout=10)["alert"]
                put = httpx.put(
                    f"{url}/admin/alerts/spend",
                    json={"kind": "spend", "scope": "total", "threshold": 100},
                    headers=bearer(ADMIN),
                )
                cleared = receiver.got.get(timeout=10)["alert"]
                listed = httpx.get(f"{url}/alerts", headers=bearer(ADMIN)).json()
    finally:
        receiver.close()
    assert put.status_code == 200
    assert (fired["state"], cleared["state"]) == ("firing", "ok")
    assert cleared["subject"] == fired["subject"] and fired["subject"] in SECRETS
    assert cleared["text"] == (
        f"spend: the spend rule watching key {fired['subject']} was replaced; "
        "its alert no longer applies"
    )
    assert listed["firing"] == 0
    assert [(e["state"], e["subject"]) for e in log if e.get("event") == "alert"] == [
        ("firing", fired["subject"]),
        ("ok", fired["subject"]),
    ]


def test_a_failing_webhook_holds_back_no_alert_to_another() -> None:
    """One alert at a time waited for every webhook's retries: a dead webhook
    delayed every later alert to the healthy ones by its whole backoff."""
    import anyio

    from keyrotor.adapters.alerts import Alert
    from keyrotor.adapters.proxy.views import Webhooks

    receiver = Receiver()
    dead = f"http://127.0.0.1:{free_port()}/hook"
    hooks = Webhooks([dead, receiver.url], [].append, backoff=3600.0)  # retried in an hour
    alerts = [Alert(n, "usable_keys", "", "firing", 1.0, 0.0, 1.0, n) for n in ("a", "b", "c")]

    async def main() -> None:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(hooks.run)
            while hooks._send is None:
                await anyio.sleep(0.01)
            for alert in alerts:
                hooks.post(alert)
            with anyio.fail_after(60):  # a hang guard: the dead webhook waits an hour
                while hooks.sent < 3:
                    await anyio.sleep(0.01)
            tasks.cancel_scope.cancel()

    try:
        anyio.run(main)
    finally:
        receiver.close()
    assert [receiver.got.get_nowait()["alert"]["name"] for _ in alerts] == ["a", "b", "c"]
    assert hooks.failed == 0 and hooks.dropped == 0


def test_recommendations_blame_no_key_for_keyrotors_own_refusals() -> None:
    """Refusals before any key (a client over budget: 429) are rows of key '':
    the advice named a key '' as rate limited."""
    import types

    import anyio

    from keyrotor.adapters.proxy.views import Views

    class Store:
        def analytics(self, q: Any, account_of: Any) -> list[dict[str, Any]]:
            if q.kind == "costs":
                return []
            return [
                {"name": "", "errorsByClass": {"rate_limited": 500}},
                {"name": "k4", "errorsByClass": {"rate_limited": 25}},
            ]

    client = types.SimpleNamespace(status=dict)
    views = Views(client, None, None, store=Store(), clock=lambda: 1_764_892_800.0)  # type: ignore[arg-type]
    answer = anyio.run(views._recommendations)
    advice = json.loads(answer.body)["recommendations"]
    assert [(a["kind"], a["text"].split(" was ")[0]) for a in advice] == [
        ("key_rate_limited", "key k4")
    ]


def test_a_providers_key_can_fire_an_error_share_alert(tmp_path: Path) -> None:
    # The alerts' "key no longer in the pool" looked at the main pool's keys
    # only: a [[providers]] key's alert could never fire.
    from keyrotor.adapters.config import load_config

    fake = Scenario(models=realistic_models())
    secrets = {"m1": "sk-or-v1-main-m1-" + "jk" * 10, "g1": "gsk-provider-g1-" + "jk" * 10}
    for alias, secret in secrets.items():
        fake.add(secret, Reply(500, "boom"), alias=alias)
    with FakeUpstream.running_in_thread(fake) as server:
        (tmp_path / "k.toml").write_text(
            f'upstream = "{server.url}"\n[state]\nenabled = false\n[pool]\nmax_attempts = 1\n'
            '[alerting]\ninterval = 0.2\n[[alerts]]\nname = "failing"\nkind = "error_share"\n'
            'scope = "key"\nthreshold = 0.5\nwindow = 300\nmin_requests = 3\n'
            f'[[providers]]\nname = "groq"\nupstream = "{server.url}"\n'
            'models = ["llama-3.1-8b-instant"]\n'
            '[[keys]]\nalias = "m1"\nsecret_env = "K_M1"\n'
            '[[keys]]\nalias = "g1"\nsecret_env = "K_G1"\nprovider = "groq"\n'
        )
        env = {"K_M1": secrets["m1"], "K_G1": secrets["g1"]}
        log: list[dict[str, Any]] = []
        with ProxyThread(load_config(tmp_path / "k.toml", env, {"port": 0}), log) as url:
            for model in ["openai/gpt-4o-mini"] * 4 + ["llama-3.1-8b-instant"] * 4:
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                assert httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 500
            for _ in range(600):  # the alerts look every 0.2 s
                fired = {e.get("subject") for e in log if e.get("event") == "alert"}
                if fired >= {"m1", "g1"}:
                    break
                threading.Event().wait(0.05)
    assert fired >= {"m1", "g1"}, fired


def test_recommendations_past_max_rows_leave_that_advice_out(tmp_path: Path) -> None:
    # Their queries met the row limit (a client can name any number of models)
    # and the endpoint answered 500.
    import types

    import anyio

    from keyrotor.adapters import analytics
    from keyrotor.adapters.proxy.views import Views
    from keyrotor.adapters.storage import StateStore

    now = 1_764_892_800.0 + 3600
    store = StateStore.open(
        tmp_path / "s.db", secret_key=None, flush_interval=3600, wall_clock=lambda: now
    )
    try:
        for i in range(12):
            store.record_answer(now - 60, ("", "", f"no-such-model-{i}", "", "c1"), 404)
        store.flush()
        client = types.SimpleNamespace(status=dict)
        views = Views(client, None, None, store=store, clock=lambda: now)  # type: ignore[arg-type]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(analytics, "MAX_ROWS", 5)
            answer = anyio.run(views._recommendations)
    finally:
        store.close()
    assert answer.status == 200 and json.loads(answer.body)["recommendations"] == []


def test_an_event_stream_asked_for_during_shutdown_is_refused() -> None:
    # The hub closed the streams open at shutdown, but took new ones: a stream
    # asked for during the drain held the shutdown for its whole grace period.
    import types

    import anyio

    from keyrotor.adapters.proxy.views import Views

    views = Views(types.SimpleNamespace(status=dict), None, None)  # type: ignore[arg-type]
    receive, end = views.hub.subscribe()
    views.hub.close()
    with pytest.raises(anyio.EndOfStream):
        receive.receive_nowait()
    answer = views._events()
    assert answer.status == 503 and json.loads(answer.body)["error"]["code"] == "shutting_down"
    late, end_late = views.hub.subscribe()  # ended at once, whoever asks
    with pytest.raises(anyio.EndOfStream):
        late.receive_nowait()
    assert len(views.hub) == 0
    anyio.run(end)
    anyio.run(end_late)


def test_metrics_count_the_answers_the_server_writes_itself(tmp_path: Path) -> None:
    # keyrotor_proxy_responses_total counted the app's answers only: a 413, 431,
    # 400 or 408 the server wrote never showed.
    import socket

    with FakeUpstream.running_in_thread(scenario()) as upstream:
        cfg = attrs.evolve(
            config(upstream.url, tmp_path),
            server={"host": "127.0.0.1", "port": 0, "max_body_bytes": 64},
        )
        with ProxyThread(cfg, []) as url:
            big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 100}]}
            for _ in range(2):
                answer = httpx.post(f"{url}/v1/chat/completions", json=big, headers=bearer(ADMIN))
                assert answer.status_code == 413
            port = int(url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port)) as raw:
                raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
                assert raw.recv(100).startswith(b"HTTP/1.1 400")
            metrics = httpx.get(f"{url}/metrics", headers=bearer(ADMIN)).text
    assert 'keyrotor_proxy_responses_total{status="413"} 2' in metrics
    assert 'keyrotor_proxy_responses_total{status="400"} 1' in metrics
