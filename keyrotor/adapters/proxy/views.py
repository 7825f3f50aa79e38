"""The operator's views: analytics, alerts, recommendations and the dashboard.

- ``GET /analytics/usage|costs|performance``: the state file's rollups
  (``..analytics``), JSON or CSV; the admin token sees everything, a client
  token only its own answers.
- ``GET /analytics/recommendations``: plain sentences with figures (``..advice``).
- ``GET /alerts``; ``GET/PUT/DELETE /admin/alerts[/NAME]``: the rules
  (``..alerts``), looked at every ``interval`` seconds; each alert that fires or
  clears goes to the log, to ``/alerts``, to the dashboard's event stream and
  to the webhooks (POSTed in the background, retried with backoff, never
  blocking a request).
- ``GET /dashboard``: the page and its two assets (no data in them); its data
  comes from the endpoints above, ``/status`` and ``GET /dashboard/events``,
  a server-sent event stream (``status`` every second, ``key`` on each key
  state change, ``alert``), all behind the admin token. Each frame is built
  once and the same bytes go to every open stream: one ``status`` frame a
  second whatever the number of streams (its JSON written in a worker thread),
  further apart when a big pool's snapshot would take over a tenth of the loop.

docs/analytics.md and docs/dashboard.md.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import anyio
import anyio.to_thread
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ...transports.api import ConnectionPool
from ...transports.json_body import parse
from .. import analytics
from ..advice import recommendations
from ..alerts import Alert, AlertBook, Observed, Rule, rule_from_json, rule_to_json
from .auth import Auth, Role
from .json_parts import json_parts
from .types import Request, Response

if TYPE_CHECKING:
    from ...core import KeyStateChanged, Pool
    from ...transports.api import AsyncClient
    from ..storage import StateStore
    from .router import Router
    from .spend import SpendBook

__all__ = ["ASSETS", "EventHub", "Views", "Webhooks"]

ASSETS = {
    "/dashboard": ("index.html", "text/html; charset=utf-8"),
    "/dashboard/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
"""The dashboard's files (inside the package: no CDN, works offline)."""
_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
_JSON = ("content-type", "application/json")
SUBSCRIBERS = 32
"""Event streams open at once (each a dashboard tab); more are refused (503)."""
_QUEUE = 256  # events waiting per subscriber; a slower one misses some
STATUS_EVERY = 1.0
"""Seconds between ``status`` frames (at least): one frame each time, shared by every stream."""
STATUS_SHARE = 0.1
"""At most this share of the event loop's time goes to taking ``status`` snapshots:
with a big pool (a snapshot taking more than a tenth of ``STATUS_EVERY``) the
frames come further apart."""
_SLICE = 200  # list items JSON-encoded at a time by ``_frame_of`` (a few ms each)
WEBHOOK_QUEUE = 1000
WEBHOOK_TRIES = 5


def _json(status: int, data: Any) -> Response:
    return Response(status=status, headers=[_JSON], body=json.dumps(data).encode())


def _error(status: int, message: str, code: str | None) -> Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "code": code}}
    return _json(status, body)


class EventHub:
    """Fan-out of dashboard events to every open event stream, each framed
    once (the same bytes to every stream); a stream that cannot keep up misses
    events (``dropped``), never slowing the sender."""

    def __init__(self) -> None:
        self._subscribers: set[MemoryObjectSendStream[bytes]] = set()
        self.dropped = 0
        self.closed = False  # the proxy shuts down: no new stream

    def __len__(self) -> int:
        return len(self._subscribers)

    def publish(self, event: str, data: Any) -> None:
        if not self._subscribers:
            return
        frame = _frame(event, data)
        for stream in list(self._subscribers):
            try:
                stream.send_nowait(frame)
            except anyio.WouldBlock:
                self.dropped += 1
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.discard(stream)
                stream.close()

    def close(self) -> None:
        """End every event stream (the proxy is shutting down: a stream never
        ends by itself, and would hold the graceful shutdown to its grace period).
        A stream asked for later ends at once."""
        self.closed = True
        for stream in self._subscribers:
            stream.close()
        self._subscribers.clear()

    def subscribe(self) -> tuple[MemoryObjectReceiveStream[bytes], Callable[[], Awaitable[None]]]:
        """A new subscriber's stream of frames, and what ends it."""
        send, receive = anyio.create_memory_object_stream[bytes](_QUEUE)
        if self.closed:
            send.close()
        else:
            self._subscribers.add(send)

        async def end() -> None:
            self._subscribers.discard(send)
            send.close()
            await receive.aclose()

        return receive, end

    def key_changed(self, change: KeyStateChanged, wall: float) -> None:
        """A ``Driver.on_state_change`` callback: a ``key`` event."""
        if not self._subscribers:
            return
        until = None if change.until is None else wall + (change.until - change.now)
        data = {
            "key": change.key_id,
            "state": change.new.value,
            "old": change.old.value,
            "until": until,
            "reason": change.reason,
            "at": wall,
        }
        self.publish("key", data)


class Webhooks:
    """POSTs each alert to every webhook URL in the background, retried with
    backoff (1, 2, 4, 8 s; ``WEBHOOK_TRIES`` tries), never blocking the caller.

    Each URL has its own queue (``WEBHOOK_QUEUE`` alerts) and sender, in the
    order the alerts came: a failing or slow webhook holds back only its own
    alerts, never another's (an alert its full queue has no room for is
    ``dropped``)."""

    def __init__(
        self, urls: Iterable[str], log: Callable[[dict[str, Any]], None], backoff: float = 1.0
    ) -> None:
        self.urls = tuple(urls)
        self.backoff = backoff  # seconds before the second try, doubled for each next one
        self._log = log
        self._send: list[MemoryObjectSendStream[bytes]] | None = None  # while ``run`` runs
        self.sent = self.failed = self.dropped = 0

    def post(self, alert: Alert) -> None:
        if self._send is None:
            return
        body = json.dumps({"alert": alert.to_json()}).encode()
        for send in self._send:
            try:
                send.send_nowait(body)
            except anyio.WouldBlock:
                self.dropped += 1

    async def run(self) -> None:
        if not self.urls:
            return
        streams = [anyio.create_memory_object_stream[bytes](WEBHOOK_QUEUE) for _ in self.urls]
        self._send = [send for send, _ in streams]
        try:
            async with ConnectionPool() as pool, anyio.create_task_group() as tasks:
                for url, (_, receive) in zip(self.urls, streams, strict=True):
                    tasks.start_soon(self._sender, pool, url, receive)
        finally:
            self._send = None
            for send, receive in streams:
                send.close()
                receive.close()

    async def _sender(
        self, pool: ConnectionPool, url: str, receive: MemoryObjectReceiveStream[bytes]
    ) -> None:
        """Deliver ``url``'s alerts, one after the other."""
        async with receive:
            async for body in receive:
                await self._deliver(pool, url, body)

    async def _deliver(self, pool: ConnectionPool, url: str, body: bytes) -> None:
        headers = [(b"content-type", b"application/json"), (b"user-agent", b"keyrotor-alerts")]
        why = ""
        for attempt in range(WEBHOOK_TRIES):
            if attempt:
                await anyio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with anyio.fail_after(10):
                    response = await pool.request(b"POST", url, headers, body, read_timeout=10.0)
                    try:
                        await response.aread()
                    finally:
                        await response.aclose()
            except Exception as exc:  # any failure to deliver: try again later
                why = type(exc).__name__
                continue
            if response.status < 300:
                self.sent += 1
                return
            why = f"answered {response.status}"
        self.failed += 1
        where = urlsplit(url)  # the host only: a webhook's path or query may hold a token
        self._log(
            {
                "event": "warning",
                "message": f"alert webhook to {where.scheme}://{where.hostname} failed "
                f"{WEBHOOK_TRIES} times ({why}); the alert is in /alerts and the log",
            }
        )


class _Answers:
    """Answers and errors per key and per model in 10-second buckets, for the
    ``error_share`` rules (the longest window asked is kept)."""

    STEP = 10.0

    def __init__(self) -> None:
        self._buckets: deque[tuple[float, dict[tuple[str, str], list[int]]]] = deque()
        self.keep = 300.0

    def note(self, now: float, key: str, model: str, error: bool) -> None:
        start = now - now % self.STEP
        if not self._buckets or self._buckets[-1][0] < start:
            self._buckets.append((start, {}))
            while self._buckets and self._buckets[0][0] < now - self.keep - self.STEP:
                self._buckets.popleft()
        counts = self._buckets[-1][1]
        for where in (("key", key), ("model", model)):
            if where[1]:
                slot = counts.setdefault(where, [0, 0])
                slot[0] += 1
                slot[1] += error

    def window(self, now: float, seconds: float) -> dict[str, dict[str, tuple[int, int]]]:
        out: dict[str, dict[str, list[int]]] = {"key": {}, "model": {}}
        for start, counts in self._buckets:
            if start >= now - seconds:
                for (scope, name), (answers, errors) in counts.items():
                    slot = out[scope].setdefault(name, [0, 0])
                    slot[0] += answers
                    slot[1] += errors
        return {s: {n: (a, e) for n, (a, e) in names.items()} for s, names in out.items()}


class Views:
    """The operator's endpoints and their background work (``run``)."""

    def __init__(
        self,
        client: AsyncClient,
        auth: Auth,
        spend: SpendBook,
        *,
        store: StateStore | None = None,
        router: Router | None = None,
        rules: Iterable[Rule] = (),
        webhooks: Iterable[str] = (),
        interval: float = 10.0,
        log: Callable[[dict[str, Any]], None] = lambda record: None,
        clock: Callable[[], float] = time.time,
        status: Callable[[], Awaitable[dict[str, Any]]] | None = None,
        providers: Mapping[str, AsyncClient] | None = None,
    ) -> None:
        self._client = client
        self._auth = auth
        self._spend = spend
        self._store = store
        self._router = router
        self._log = log
        self._clock = clock
        self._status = status or _awaited(client.status)
        self.providers = providers or {}  # each [[providers]] pool's client
        self.interval = interval
        self.alerts = AlertBook(rules)
        self.hub = EventHub()
        self.webhooks = Webhooks(webhooks, log)
        self.answers = _Answers()
        self._assets: dict[str, bytes] = {}
        self._status_frame: tuple[float, bytes] | None = None  # (when the next is due, frame)
        self._building: anyio.Event | None = None  # while one is built: set when done
        self._keep_window()

    def set_status(self, status: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        """Where the pool's picture comes from (the app's ``/status``, made a
        step at a time)."""
        self._status = status

    def _pools(self) -> list[Pool]:
        """The main pool and each ``[[providers]]`` pool."""
        return [self._client.driver.pool, *(c.driver.pool for c in self.providers.values())]

    # ------------------------------------------------------------ answers

    def note_answer(self, key: str, model: str, status: int) -> None:
        """Count an answer for the error-share alerts."""
        self.answers.note(self._clock(), key, model, status >= 500 or status in (401, 402, 429))

    # ------------------------------------------------------------ routing

    def allowed(self, request: Request, path: str) -> Response | None:
        """The 401/403 for a caller who may not see ``path``'s operator data
        (analytics are also open to client tokens, for their own answers)."""
        auth = self._auth
        if path in ASSETS:
            return None
        role = auth.role(request)
        own = path.startswith("/analytics/") and path != "/analytics/recommendations"
        if own and role in (Role.CLIENT, Role.ISSUED):
            return None  # their own answers only (with or without an admin token)
        if auth.admin_enabled:
            if role is Role.ADMIN:
                return None
            if role is Role.NONE:
                return _error(
                    401,
                    f"{path} needs the admin token (Authorization: Bearer ...)",
                    "invalid_api_key",
                )
            return _error(403, f"{path} needs the admin token, not a client token", "forbidden")
        if auth.open:
            return None  # no token at all: loopback only, as /status
        return _error(
            403, f"{path} needs the admin token: set KEYROTOR_ADMIN_TOKEN and restart", "admin_off"
        )

    async def __call__(self, request: Request, path: str) -> Response:
        method = request.method
        if path in ASSETS and method == "GET":
            return self._asset(path)
        if path == "/dashboard/events" and method == "GET":
            return self._events()
        if path == "/alerts" and method == "GET":
            return _json(200, self.alerts.status())
        if path == "/analytics/recommendations" and method == "GET":
            return await self._recommendations()
        if path.startswith("/analytics/") and method == "GET":
            return await self._analytics(request, path[len("/analytics/") :])
        if path.startswith("/admin/alerts"):
            return self._admin_alerts(request, path[len("/admin/alerts") :].strip("/"))
        return _error(404, f"no route {method} {path}", None)

    # ------------------------------------------------------------ analytics

    async def _analytics(self, request: Request, kind: str) -> Response:
        if kind not in analytics.KINDS:
            return _error(404, f"no analytics {kind!r}; choose {', '.join(analytics.KINDS)}", None)
        store = self._store
        if store is None:
            return _error(404, "analytics are kept in the state file, which is off ([state])", None)
        # A '+' is a plus sign here (an offset: from=2026-12-07T10:00:00+01:00, as
        # typed), not a space as in a form: no parameter of these holds a space.
        query = urlsplit(request.target).query.replace("+", "%2B")
        params = dict(parse_qsl(query, keep_blank_values=True))
        try:
            q = analytics.parse_query(kind, params, self._clock())
        except analytics.QueryError as exc:
            return _error(400, str(exc), "invalid_query")
        auth = self._auth
        role, caller = auth.identify(request)
        if role is not Role.ADMIN and (auth.admin_enabled or not auth.open):  # its own answers
            if caller is None:  # (its token expired while the request was read)
                return _error(401, "the token is not valid (or has expired)", "invalid_token")
            q = attrs.evolve(q, client=caller)
        accounts = self._accounts() if q.by == "account" else {}  # read on the loop

        def account_of(key: str) -> str:
            return accounts.get(key, key)

        def answer() -> Response:  # in the worker thread: the query and its encoding
            rows = store.analytics(q, account_of)
            if q.csv:
                return Response(
                    status=200,
                    headers=[("content-type", "text/csv; charset=utf-8")],
                    body=analytics.to_csv(rows, q.kind, q.by).encode(),
                )
            return _json(200, analytics.answer(q, rows))

        try:
            return await anyio.to_thread.run_sync(answer)
        except analytics.QueryError as exc:  # too many rows
            return _error(400, str(exc), "invalid_query")

    def _accounts(self) -> dict[str, str]:
        """Each key's account (a key without one is its own), from the keys'
        specs: no picture of every key's figures."""
        specs = self._client.driver.pool.key_specs()
        return {alias: spec.account or alias for alias, spec in specs.items()}

    @staticmethod
    async def _rows(store: StateStore, q: analytics.Query) -> list[Any]:
        """``q``'s rows for the advice; none past ``MAX_ROWS`` (more models or
        keys than that: the advice that needs them is left out, not a 500)."""
        try:
            return await anyio.to_thread.run_sync(store.analytics, q, str)
        except analytics.QueryError:
            return []

    async def _recommendations(self) -> Response:
        store = self._store
        now = self._clock()
        week = analytics.Query("costs", int(now - 7 * 86400), int(now), "day", "model")
        today = analytics.Query("usage", int(now - now % 86400), int(now) + 1, "day", "key")
        costs: dict[str, float] = {}
        key_errors: dict[str, dict[str, int]] = {}
        if store is not None:
            for row in await self._rows(store, week):
                costs[row["name"]] = costs.get(row["name"], 0.0) + row["cost"]
            for row in await self._rows(store, today):
                if row["name"]:  # not keyrotor's own refusals (no key: budgets, routes)
                    key_errors[row["name"]] = row["errorsByClass"]
        catalog = None if self._router is None else self._router.catalog()
        free = {} if self._router is None else self._router.free_status()
        return _json(200, {"recommendations": recommendations(costs, catalog, key_errors, free)})

    # ------------------------------------------------------------ alerts

    def _admin_alerts(self, request: Request, name: str) -> Response:
        if request.method == "GET" and not name:
            return _json(200, self.alerts.status())
        if request.method == "PUT" and name:
            try:
                data = parse(request.body or b"{}")
                if not isinstance(data, dict):
                    raise ValueError("the body must be a JSON object (the rule)")
                rule = rule_from_json({**data, "name": name})
            except ValueError as exc:
                return _error(400, f"alert {name!r}: {exc}", "invalid_alert")
            replaced = name in self.alerts.rules
            self._tell(self.alerts.set_rule(rule, self._clock()))  # the old rule's, if another
            self._keep_window()
            stored = self._save_rules()
            return _json(200 if replaced else 201, {"alert": rule_to_json(rule), "stored": stored})
        if request.method == "DELETE" and name:
            if not self.alerts.remove_rule(name):
                known = ", ".join(self.alerts.rules) or "none"
                return _error(404, f"no alert rule {name!r} (rules: {known})", None)
            return _json(200, {"removed": name, "stored": self._save_rules()})
        return _error(
            405, "use GET /admin/alerts, PUT or DELETE /admin/alerts/NAME", "method_not_allowed"
        )

    def _save_rules(self) -> bool:
        """Keep the rules in the state file (False: there is none, or it failed: logged)."""
        if self._store is None:
            return False
        from ..storage import StorageError

        try:
            self._store.save_meta("alerts", [rule_to_json(r) for r in self.alerts.rules.values()])
        except StorageError as exc:
            self._log({"event": "warning", "message": f"alert rules not stored: {exc}"})
            return False
        return True

    def restore_rules(self, stored: Any) -> None:
        """Put back the rules the admin API stored (over the configuration's)."""
        if not isinstance(stored, list):
            return
        rules = []
        for data in stored:
            try:
                rules.append(rule_from_json(data))
            except ValueError as exc:
                self._log({"event": "warning", "message": f"stored alert rule skipped: {exc}"})
        self.alerts = AlertBook(rules)
        self._keep_window()

    def _keep_window(self) -> None:
        windows = [r.window for r in self.alerts.rules.values() if r.kind == "error_share"]
        self.answers.keep = min(86400.0, max(windows, default=300.0))

    def observe(self) -> Observed:
        """What the rules look at, now: only the figures some rule watches, read
        from the pools and books directly (never ``/status``, a picture of every key)."""
        now = self._clock()
        rules = self.alerts.rules.values()
        kinds = {r.kind for r in rules}
        spend: dict[str, dict[str, float]] = {"total": {}, "key": {}}
        budgets: dict[str, dict[str, float]] = {}
        if kinds & {"spend", "budget"}:
            day = self._spend.status()
            for scope in ("client", "model"):
                spend[scope] = {n: t["cost"] for n, t in day.get(scope + "s", {}).items()}
            if self._store is not None and "spend" in kinds:
                spend["key"] = {row.alias: row.cost for row in self._store.ledger()}
            spend["total"][""] = sum(spend["key"].values()) or sum(spend["model"].values())
            for budget in day.get("budgets", []):
                if budget["budget"]:
                    share = 100.0 * budget["spent"] / budget["budget"]
                    budgets.setdefault(budget["scope"], {})[budget["name"]] = share
        windows = {r.window for r in rules if r.kind == "error_share"}
        free_left: dict[str, float] = {}
        if self._router is not None and "free_quota" in kinds:
            for account, use in self._router.free_status().items():
                per_day = use["perDay"]
                if per_day:
                    free_left[account] = 100.0 * max(0, per_day - use["usedToday"]) / per_day
        usable = 0
        if "usable_keys" in kinds:  # the main pool's, as /healthz counts them
            usable = self._client.driver.pool.count_usable()
        states: dict[str, str] = {}  # every key of every pool, for the rules that name keys
        by_key = any(r.kind == "error_share" and r.scope == "key" for r in rules)
        if by_key or "key_failed" in kinds:
            for pool in self._pools():
                states.update((alias, pool.state_of(alias).value) for alias in pool.key_ids())
        return Observed(
            spend=spend,
            budgets=budgets,
            answers={w: self.answers.window(now, w) for w in windows},
            usable_keys=usable,
            free_left=free_left,
            key_states=states,
        )

    def look(self) -> list[Alert]:
        """Evaluate the rules now; tell of each alert that fired or cleared."""
        if not self.alerts.rules:
            return []
        changed = self.alerts.evaluate(self.observe(), self._clock())
        self._tell(changed)
        return changed

    def _tell(self, changed: Iterable[Alert]) -> None:
        """Each alert that fired or cleared: to the log, the dashboard, the webhooks."""
        for alert in changed:
            self._log({"event": "alert", **alert.to_json()})
            self.hub.publish("alert", alert.to_json())
            self.webhooks.post(alert)

    async def run(self) -> None:
        """Look at the rules every ``interval`` seconds; send the webhooks."""
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self.webhooks.run)
            while True:
                await anyio.sleep(self.interval)
                self.look()

    # ------------------------------------------------------------ dashboard

    def _asset(self, path: str) -> Response:
        name, kind = ASSETS[path]
        body = self._assets.get(name)
        if body is None:
            body = self._assets[name] = (
                resources.files("keyrotor.adapters.proxy").joinpath("dashboard", name).read_bytes()
            )
        headers = [
            ("content-type", kind),
            ("content-security-policy", _CSP),
            ("x-content-type-options", "nosniff"),
            ("referrer-policy", "no-referrer"),
            ("cache-control", "no-cache"),
        ]
        return Response(status=200, headers=headers, body=body)

    def _events(self) -> Response:
        if self.hub.closed:
            return _error(503, "the proxy is shutting down", "shutting_down")
        if len(self.hub) >= SUBSCRIBERS:
            return _error(503, f"at most {SUBSCRIBERS} event streams at once", "too_many_streams")
        receive, end = self.hub.subscribe()
        return Response(
            status=200,
            headers=[
                ("content-type", "text/event-stream"),
                ("cache-control", "no-cache"),
                ("x-accel-buffering", "no"),
            ],
            body=self._stream(receive),
            aclose=end,
        )

    async def _stream(self, receive: MemoryObjectReceiveStream[bytes]) -> AsyncIterator[bytes]:
        """``status`` at once and then each time the last one is due for a new
        one (every stream at the same moment, with the same bytes), the hub's
        events as they come."""
        due, frame = await self.status_frame()
        yield frame
        while True:
            wait = due - anyio.current_time()
            event = None
            if wait > 0:
                with anyio.move_on_after(wait):
                    try:
                        event = await receive.receive()
                    except anyio.EndOfStream:  # closed: the proxy shuts down
                        return
            if event is not None:
                yield event
                continue
            due, frame = await self.status_frame()
            yield frame

    async def status_frame(self) -> tuple[float, bytes]:
        """The current ``status`` frame and when the next one is due: the first
        stream to ask once it is due builds it (the snapshot taken on the loop,
        its JSON written in a worker thread), every other stream gets the same
        bytes. The next is due ``STATUS_EVERY`` seconds later, or later still
        when taking the snapshot took more than ``STATUS_SHARE`` of that."""
        while True:
            last = self._status_frame
            if last is not None and anyio.current_time() < last[0]:
                return last
            building = self._building
            if building is None:
                break
            await building.wait()
            if self._status_frame is not last and self._status_frame is not None:
                return self._status_frame  # the one built meanwhile (else: it failed)
        done = self._building = anyio.Event()
        try:
            started = anyio.current_time()
            snapshot = await self._status()
            cost = anyio.current_time() - started  # the loop's time (it waited for it)
            frame = await anyio.to_thread.run_sync(_frame_of, "status", snapshot)
            self._status_frame = (started + max(STATUS_EVERY, cost / STATUS_SHARE), frame)
        finally:
            self._building = None
            done.set()
        return self._status_frame


def _awaited(status: Callable[[], dict[str, Any]]) -> Callable[[], Awaitable[dict[str, Any]]]:
    """``status`` as a coroutine function."""

    async def awaited() -> dict[str, Any]:
        return status()

    return awaited


def _frame(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {_encode(data)}\n\n".encode()


def _encode(data: Any) -> str:
    """A frame's JSON: no NaN (refused), other values as text (``_plain``)."""
    return json.dumps(data, allow_nan=False, default=_plain)


def _frame_of(event: str, data: Any) -> bytes:
    """``_frame`` in slices (in a worker thread: one ``json.dumps`` of a big
    pool's status would hold the GIL, and so the event loop, throughout)."""
    text = "".join(json_parts(data, 4, _SLICE, _encode))
    return f"event: {event}\ndata: {text}\n\n".encode()


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
