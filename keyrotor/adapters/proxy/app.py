"""The proxy's application: OpenAI-compatible routes in front of the pool.

``ProxyApp`` answers one ``Request`` with one ``Response`` (``types.py``); the
h11 server (``server.py``) and, later, an ASGI front carry them over HTTP. The
pool and its failover live in the async transport's client, shared by every
request.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from urllib.parse import quote, unquote

import anyio
import anyio.lowlevel
import attrs

from ...core import USABLE_STATES
from ...models.routing import key_failure, model_failure
from ...transports.api import AsyncClient, ResponseHead, StreamResponse
from ...transports.errors import NoKeyAvailable, TransportError
from ...transports.json_body import parse
from ..analytics import Dims
from ..config import MAIN_PROVIDER
from .admin import Admin
from .auth import Auth, Role
from .json_parts import PER_PART, joined, json_parts, stepped
from .metrics import ProxyCounters, render_parts
from .model_health import ModelHealth, model_of
from .router import Plan, Refused, Router, is_free
from .spend import Refusal, SpendBook
from .types import Request, Response
from .views import Views

if TYPE_CHECKING:
    from ..shared import SharedState
    from ..storage import StateStore
    from .catalog import Catalogs
    from .providers import Routes

__all__ = ["HOP_BY_HOP", "ProxyApp", "delivered_headers", "error_body", "header_value", "rejection"]

# Caller headers passed upstream (OpenRouter's app attribution and content
# negotiation); everything else, the caller's Authorization first, stays here.
_FORWARDED = frozenset(
    {"http-referer", "x-title", "x-openrouter-title", "content-type", "accept", "user-agent"}
)
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
"""Headers of one connection (RFC 9110 7.6.1), never relayed: with those a
``Connection`` header names."""
# Upstream headers not passed back: framing is the server's; cookies the upstream
# sets are for a key's session, not the caller's; the upstream's request id
# comes as x-upstream-request-id (the server's own x-request-id names the request).
_DROPPED = HOP_BY_HOP | {"content-length", "date", "server", "set-cookie", "x-request-id"}
_JSON = ("content-type", "application/json")
_READ = frozenset({"GET", "HEAD"})  # a load balancer probes with either (HEAD: no body sent)
# "." and ".." segments (also percent-encoded), "//", backslashes and encoded
# slashes in a /v1/ path: an upstream that decodes them would route elsewhere.
_ESCAPES = re.compile(r"(^|/)(\.|%2e){1,2}(/|$)|//|\\|%5c|%2f", re.IGNORECASE)
# OpenRouter's account endpoints: what the pool key itself is, what its account
# has, its keys. The pool answers ``/key`` itself; the rest is never forwarded.
# Matched on the path percent-decoded and lower-cased: an upstream that decodes
# "%6bey" or folds case must not reach them either.
_KEY_INFO = frozenset({"/v1/key", "/v1/auth/key"})
_ACCOUNT = re.compile(r"^/v1/(keys?|credits|auth|activity)(/|$)")
_MODELS = re.compile(r"^/v1/models(/|$)")


def _path_kind(path: str) -> tuple[bool, str]:
    """Whether a request path is the catalog's listing, and what else it is:
    ``unsafe`` (it could reach other upstream paths), ``key_info`` (an account
    endpoint too, but answered by the pool for GET), ``account`` (the accounts'
    own endpoints) or ``forward``."""
    plain = unquote(path).lower()
    if _ESCAPES.search(path) or _ESCAPES.search(plain):
        kind = "unsafe"
    elif plain.rstrip("/") in _KEY_INFO:
        kind = "key_info"
    elif _ACCOUNT.match(plain):
        kind = "account"
    else:
        kind = "forward"
    return bool(_MODELS.match(path)), kind


_known_path_kind = lru_cache(maxsize=512)(_path_kind)  # paths repeat; short ones are cached
_CACHED_PATH = 256


_REJECT_TYPES = {
    400: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
}


def error_body(message: str, kind: str, code: str | int | None = None) -> bytes:
    """An OpenAI-shaped error body."""
    error = {"message": message, "type": kind, "param": None, "code": code}
    return json.dumps({"error": error}).encode()


def rejection(exc: NoKeyAvailable) -> tuple[int, list[tuple[str, str]], bytes]:
    """The answer when no key can serve: its status, ``retry-after`` when a key
    is expected back, and an OpenAI-shaped body (the proxy and the httpx
    transports both answer this way)."""
    headers = [_JSON]
    if exc.status == 400:  # the caller's own request (a pinned key that does not exist)
        message = exc.reason
    elif exc.retry_after is not None:
        headers.append(("retry-after", str(max(0, round(exc.retry_after)))))
        message = f"no API key can serve this request now ({exc.reason})"
    elif exc.status == 502:  # keys fine, the upstream not reached or no answer
        message = f"the upstream gave no answer on any attempt ({exc.reason})"
    else:
        message = (
            f"no API key can serve this request now ({exc.reason}), and none is expected "
            "back on its own: the keys are failed, depleted or disabled (see /status), "
            "so there is no Retry-After"
        )
    body = error_body(message, _REJECT_TYPES.get(exc.status, "service_unavailable"), exc.status)
    return exc.status, headers, body


def delivered_headers(
    upstream: ResponseHead, dropped: frozenset[str] = _DROPPED
) -> list[tuple[str, str]]:
    """The upstream's headers minus ``dropped``, those its ``Connection`` header
    names and its own ``x-keyrotor-*`` (an upstream that is a keyrotor too),
    plus which key served the response and after how many attempts. When
    ``dropped`` holds ``x-request-id``, the upstream's comes as
    ``x-upstream-request-id`` (what its support asks for)."""
    received = upstream.headers
    named = received.get("connection")
    if named:
        dropped = dropped | {token.strip().lower() for token in named.split(",")}
    headers = [
        (k, v) for k, v in received.items() if k not in dropped and not k.startswith("x-keyrotor-")
    ]
    if "x-request-id" in dropped and "x-request-id" in received:
        headers.append(("x-upstream-request-id", received["x-request-id"]))
    headers += [("x-keyrotor-key", upstream.key), ("x-keyrotor-attempts", str(upstream.attempts))]
    return headers


def header_value(text: str) -> str:
    """``text`` as a response header's value: printable ASCII as it is, anything
    else percent-encoded (a model named by the caller may hold any character,
    and a header that the codec refuses would turn a served answer into a 500)."""
    if text.isascii() and text.isprintable() and text.strip() == text:
        return text
    return quote(text, safe="/:@!$&'()*+,;=~")


CACHE_TTL = 1.0
"""Seconds a big pool's /status, /metrics, /v1/key and /healthz answers are
served as made (an admin change makes them anew at once)."""
CACHE_FROM_KEYS = 100
"""Pools of this many keys or more (providers' included) are big: below it,
every call makes its answer (a few keys cost little, and stay exact)."""

T = TypeVar("T")


class Rendered(Generic[T]):
    """One answer made for every caller: reused for ``CACHE_TTL`` seconds of
    ``clock``, made once for the callers that come while it is made.

    ``forget`` drops it: the next caller makes it anew, and one being made
    then is not kept (it was begun before the change).
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._value: T | None = None
        self._at = -math.inf
        self._generation = 0
        self._made_in = -1
        self._made = 0  # values made so far
        self._making: anyio.Event | None = None

    def forget(self) -> None:
        self._generation += 1

    def fresh(self) -> T | None:
        """The value, while it is fresh; else None."""
        if self._made_in == self._generation and self._clock() - self._at < CACHE_TTL:
            return self._value
        return None

    async def get(self, make: Callable[[], Awaitable[T]], cache: bool = True) -> T:
        """The value: ``make()``'s for every call when not ``cache``; else the
        fresh one, or one made now (or the one another caller is making)."""
        if not cache:
            return await make()
        while True:
            value = self.fresh()
            if value is not None:
                return value
            making = self._making
            if making is None:
                break
            made = self._made
            await making.wait()  # then the value it made (however long it took), or a turn
            if self._made != made and self._made_in == self._generation:
                return self._value  # type: ignore[return-value]
        making = self._making = anyio.Event()
        generation, at = self._generation, self._clock()
        try:
            value = await make()
        finally:
            self._making = None
            making.set()
        self._value, self._at, self._made_in = value, at, generation
        self._made += 1
        return value


async def _nothing() -> AsyncIterator[bytes]:
    """A body of nothing, length unsaid (``HEAD`` of an answer not made)."""
    return
    yield b""  # an async generator


class ProxyApp:
    """Routes: ``/v1/*`` forwarded through the pool; ``/status``, ``/metrics``,
    ``/healthz``; ``/admin/*`` and ``POST /auth/token`` (docs/operations.md).
    Everything else is a 404 in the OpenAI error shape.

    With client tokens (``auth``), ``/v1/*``, ``/status``, ``/metrics`` and
    ``/auth/token`` need one (or the admin token); ``/admin/*`` always needs
    the admin token; ``/healthz`` is open.

    Per request, a caller may pin a key with ``X-Keyrotor-Key: ALIAS`` (or an
    index; ``X-Keyrotor-Fallback: false`` forbids another key, and an unknown
    one is then a 400) and keep a session on one key with
    ``X-Keyrotor-Session: ID`` (under every policy). ``x-keyrotor-pin`` in the
    answer says whether the pin was honoured, or why another key served.
    ``GET /v1/key`` is answered by the pool itself; OpenRouter's account
    endpoints (``/v1/keys``, ``/v1/credits``, ``/v1/auth/...``) are refused.
    """

    def __init__(
        self,
        client: AsyncClient,
        *,
        routing_note: bool = False,
        clock: Callable[[], float] = time.time,
        auth: Auth | None = None,
        admin: Admin | None = None,
        store: StateStore | None = None,
        catalog: Catalogs | None = None,
        routes: Routes | None = None,
        spend: SpendBook | None = None,
        reject_unknown_models: bool = False,
        router: Router | None = None,
        views: Views | None = None,
        shared: SharedState | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._reject_unknown = reject_unknown_models and catalog is not None
        self._client = client
        self.spend = spend or SpendBook()
        self._catalog = catalog
        self._routes = routes
        self.models = router.models if router is not None else ModelHealth()
        self.router = router
        self._routing_note = routing_note
        self._clock = clock
        self._auth = auth or Auth()
        self._admin = admin
        self._store = store
        self.counters = ProxyCounters()
        self.started = clock()
        self._day = int(self.started // 86_400)  # the UTC day, for totalCostToday
        self._spend_before_today = 0.0
        self.shared = shared
        self.views = views or Views(
            client, self._auth, self.spend, store=store, router=router, status=self.status_stepped
        )
        # Big pools: what /status, /metrics, /v1/key and /healthz show, made at
        # most once a CACHE_TTL for every caller (docs/proxy.md).
        self.cache_from_keys = CACHE_FROM_KEYS
        self._status_made: Rendered[tuple[bytes, dict[str, Any]]] = Rendered(monotonic)
        self._metrics_made: Rendered[bytes] = Rendered(monotonic)
        self._key_counts: Rendered[dict[str, Any]] = Rendered(monotonic)
        self._usable: Rendered[int] = Rendered(monotonic)
        if admin is not None:
            admin.on_change = self.forget_rendered

    def admit(self, request: Request) -> Response | None:
        """The refusal of a request from its head alone (no body read yet): the
        server calls it first, so a caller without a token costs no memory."""
        refusal = self._refusal(request, request.path)
        if refusal is not None:
            self.counters.by_status[refusal.status] += 1
        return refusal

    def server_answered(self, status: int) -> None:
        """An answer the server wrote itself (``types.App``): counted by status."""
        self.counters.by_status[status] += 1

    async def __call__(self, request: Request) -> Response:
        path = request.path
        refusal = None if request.admitted else self._refusal(request, path)
        if refusal is not None:
            response = refusal
        elif path.startswith("/v1/"):
            response = await self._forward(request)
            if response.status >= 400 and "key" not in response.log and self._store is not None:
                # refused before any upstream answered (no key, budget, route): count it too
                model = response.log.get("model") or model_of(request.body)
                self._store.record_answer(
                    self._clock(),
                    (
                        "",
                        "",
                        str(model or ""),
                        str(response.log.get("route") or ""),
                        request.caller or "",
                    ),
                    response.status,
                )
        elif path.startswith("/admin/alerts"):
            response = await self.views(request, path)
        elif path.startswith("/admin/"):
            assert self._admin is not None
            response = await self._admin(request)
        elif path.startswith(_VIEWS):
            response = await self.views(request, path)
        elif path == "/auth/token" and request.method == "POST":
            token, ttl = self._auth.issue(request.caller)
            response = self._json(
                200, {"access_token": token, "token_type": "bearer", "expires_in": ttl}
            )
        elif path == "/status" and request.method in _READ:
            response = await self._status_response(request)
        elif path == "/metrics" and request.method in _READ:
            cached = self._cached()
            if request.method == "HEAD" and cached:  # nothing made for it
                text = self._metrics_made.fresh()
            else:
                text = await self._metrics_made.get(self._metrics_text, cached)
            response = Response(
                status=200,
                headers=[("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                body=_nothing() if text is None else text,
            )
        elif path.startswith("/routing/"):
            response = self._routing(request, path)
        elif path == "/healthz" and request.method in _READ:
            usable = await self._usable.get(self._usable_keys, self._cached())
            health: dict[str, Any] = {"ok": True, "usable_keys": usable}
            if self.shared is not None:  # still ok without Redis: it serves on its own view
                health["shared"] = self.shared.connected
            response = self._json(200, health)
        else:
            response = Response(
                status=404,
                headers=[_JSON],
                body=error_body(f"no route {request.method} {path}", "invalid_request_error"),
            )
        self.counters.by_status[response.status] += 1
        return response

    def _routing(self, request: Request, path: str) -> Response:
        """``GET /routing/routes`` and ``POST /routing/recommend`` (nothing sent)."""
        router = self.router
        if router is None:
            return _refuse(404, "routing is off: it needs the model catalog ([catalog])", None)
        if path == "/routing/routes" and request.method == "GET":
            return self._json(200, router.routes_json())
        if path == "/routing/recommend" and request.method == "POST":
            body = request.body
            model = model_of(body)
            if not router.routed(model, body):
                if model is None:
                    return _invalid(
                        "the body must be a chat request with a model, a route or models"
                    )
                try:
                    body = json.dumps({**parse(body), "models": [model]}).encode()
                except (ValueError, TypeError):
                    return _invalid("the request body is not a JSON object")
            plan = router.plan(body)
            if plan is None:
                return _invalid("the body must be a chat request with a model, a route or models")
            if isinstance(plan, Refused):
                if plan.decision is None:
                    return _refused(plan)
                answer = plan.decision.to_json() | {"status": plan.status, "error": plan.message}
                return self._json(200, answer)
            return self._json(200, plan.decision.to_json() | {"status": 200})
        return _refuse(404, f"no route {request.method} {path}", None)

    def _refusal(self, request: Request, path: str) -> Response | None:
        """The 401/403/404 answer when the caller may not use ``path``."""
        if path == "/healthz":
            return None
        if path.startswith(_VIEWS):
            return self.views.allowed(request, path)
        auth = self._auth
        if path.startswith("/admin/"):
            if self._admin is None or not auth.admin_enabled:
                return _refuse(
                    403, "the admin API is off: set KEYROTOR_ADMIN_TOKEN and restart", "admin_off"
                )
            role = auth.role(request)
            if role is Role.ADMIN:
                return None
            if role in (Role.CLIENT, Role.ISSUED):
                return _refuse(403, "this token may not use the admin API", "forbidden")
            return _refuse(401, "the admin API needs the admin token", "invalid_api_key")
        if path == "/auth/token" and auth.open:
            return _refuse(
                404, "no client tokens are configured, so there is no token to exchange", None
            )
        if auth.open:
            return None
        role, request.caller = auth.identify(request)  # checked once, kept for the ledger
        if role is Role.ISSUED and path == "/auth/token":
            return _refuse(403, "a short-lived token cannot be exchanged again", "forbidden")
        if role is not Role.NONE:
            return None
        return _refuse(
            401, "missing or wrong token: send Authorization: Bearer <token>", "invalid_api_key"
        )

    def status(self, pool: dict[str, Any] | None = None) -> dict[str, Any]:
        """Seed 004's status shape plus per-key detail (aliases, never secrets);
        ``pool``: the client's ``status()``, when taken already."""
        status = self._client.status() if pool is None else pool
        now = self._clock()
        total = status["stats"]["totalCost"]
        day = int(now // 86_400)
        if day != self._day:  # midnight UTC passed since the last look
            self._day, self._spend_before_today = day, total
        if self._store is not None:  # the ledger also knows what was spent before a restart
            status["stats"]["totalCostToday"] = self._store.cost_on()
            status["storage"] = self._store.health()
        else:
            status["stats"]["totalCostToday"] = total - self._spend_before_today
        status["uptime"] = round(now - self.started, 3)
        if self.shared is not None:
            status["shared"] = self.shared.status()
            status["process"] = {"pid": os.getpid(), "worker": os.environ.get("KEYROTOR_WORKER")}
            board = self.shared.part("processes")
            if board is not None:
                status["pool"] = board.pool()
        if self._catalog is not None:
            status["catalog"] = self._catalog.status()
        if self._routes is not None:
            status["providers"] = self._routes.status()
        if self.router is not None:
            status["routing"] = self.router.status()
        status["models"] = self.models.status()
        status["spend"] = self.spend.status()
        status["stats"]["failovers"] = self.counters.failovers
        status["stats"]["streamErrors"] = self.counters.stream_errors
        return status

    def forget_rendered(self) -> None:
        """Make /status, /metrics, /v1/key and /healthz anew at their next call
        (an admin change: its effect is seen at once), and the router's
        accounts at its next look."""
        for rendered in (self._status_made, self._metrics_made, self._key_counts, self._usable):
            rendered.forget()
        if self.router is not None:
            self.router.keys_changed()

    def _cached(self) -> bool:
        """Whether the pools hold ``cache_from_keys`` keys or more: their
        pictures are then served for up to ``CACHE_TTL`` seconds."""
        pooled = len(self._client.driver.secrets)
        if self._routes is not None:
            pooled += sum(len(c.driver.secrets) for c in self._routes.clients.values())
        return pooled >= self.cache_from_keys

    async def _status_response(self, request: Request) -> Response:
        """``/status``: a client sees only its own spend (as analytics shows a
        client its own answers); ``HEAD`` of a big pool renders nothing new."""
        cached = self._cached()
        if request.method == "HEAD" and cached:  # nothing made for it
            made = self._status_made.fresh()
        else:
            made = await self._status_made.get(self._status_text, cached)
        if made is None:
            return Response(status=200, headers=[_JSON], body=_nothing())
        head, spend = made
        role, caller = self._auth.identify(request)
        if self._auth.admin_enabled and role is not Role.ADMIN:
            spend = dict(spend)  # the made one is every caller's
            _own_spend(spend, caller)
        return Response(status=200, headers=[_JSON], body=head + json.dumps(spend).encode() + b"}")

    async def _status_text(self) -> tuple[bytes, dict[str, Any]]:
        """``status()`` as JSON, all but its last member (``spend``, which
        differs by caller): the text up to ``"spend": ``, and ``spend``."""
        status = await self.status_stepped()
        spend = status.pop("spend")
        text = await joined(json_parts(status, 3, PER_PART))
        return text[:-1] + (b', "spend": ' if status else b'"spend": '), spend

    async def _metrics_text(self) -> bytes:
        providers = None if self._routes is None else self._routes.status()
        board = None if self.shared is None else self.shared.part("processes")
        pool = None if board is None else board.pool()
        status = await stepped(self._client.driver.status_steps())
        return await joined(render_parts(status, self.counters, providers, pool))

    async def status_stepped(self) -> dict[str, Any]:
        """``status()``, the pool's keys taken a step at a time (for the dashboard)."""
        return self.status(await stepped(self._client.driver.status_steps()))

    async def _usable_keys(self) -> int:
        return self._client.driver.pool.count_usable()

    async def _pool_counts(self) -> dict[str, Any]:
        """What ``GET /v1/key`` tells: keys, usable keys, spend (no key's entry made)."""
        pool = self._client.driver.pool
        return {
            "total": sum(pool.count_by_state().values()),
            "usable": pool.count_usable(),
            "spend": pool.statistics(keys=False).spend,
        }

    def summary(self) -> dict[str, Any]:
        """This process's figures for the pool's other processes (``ProcessBoard``)."""
        stats = self._client.driver.pool.statistics(keys=False)
        return {
            "requests": stats.started,
            "delivered": stats.delivered,
            "rejected": stats.rejected,
            "inFlight": stats.in_flight,
            "queued": stats.queued,
            "failovers": self.counters.failovers,
            "responses": {str(code): n for code, n in self.counters.by_status.items()},
        }

    async def _models(self, model_id: str) -> Response:
        """``/v1/models`` and ``/v1/models/{id}`` from the catalog (no upstream call)."""
        catalogs = self._catalog
        assert catalogs is not None
        if not await catalogs.ready():
            return _refuse(
                503,
                "the model catalog is not loaded yet: "
                f"{catalogs.main.last_error or 'the first fetch is running'} (see /status)",
                "catalog_unavailable",
            )
        if not model_id:
            body = catalogs.models_body()
        else:
            found = catalogs.model_body(model_id)
            if found is None:
                return _refuse(
                    404,
                    f"the model {model_id!r} is not in the catalog (GET /v1/models lists it)",
                    "model_not_found",
                )
            body = found
        return Response(status=200, headers=[_JSON], body=body)

    def _known(self, model: str) -> bool:
        """Whether a catalog lists ``model`` (a ``:variant`` of a listed model
        counts, and anything while no catalog is loaded yet)."""
        catalogs = self._catalog
        assert catalogs is not None
        if catalogs.main.catalog is None:
            return True  # nothing to judge by: the upstream decides
        return catalogs.get(model) is not None or catalogs.get(model.partition(":")[0]) is not None

    @staticmethod
    def _pin_note(client: AsyncClient, pin: str | int, served_by: str) -> str:
        """``x-keyrotor-pin``: ``honoured``, or ``fallback: ...`` and why."""
        pool = client.driver.pool
        ids = pool.key_ids()
        if isinstance(pin, int):
            if not 0 <= pin < len(ids):
                return f"fallback: no key at index {pin}"
            pin = ids[pin]
        if pin == served_by:
            return "honoured"
        if pin not in ids:
            return "fallback: unknown key"
        state = pool.state_of(pin)
        if state in USABLE_STATES:
            return f"fallback: {pin} was busy or failed this request"
        return f"fallback: {pin} is {state.value}"

    async def _key_info(self) -> dict[str, Any]:
        """``GET /v1/key`` in OpenRouter's shape, for the pool as a whole (what
        its keys spent through keyrotor); nothing of any one key or account."""
        counts = await self._key_counts.get(self._pool_counts, self._cached())
        total, usable = counts["total"], counts["usable"]
        return {
            "data": {
                "label": f"keyrotor pool ({total} keys, {usable} usable)",
                "usage": counts["spend"],
                "limit": None,
                "limit_remaining": None,
                "is_free_tier": False,
                "keyrotor": {"totalKeys": total, "usableKeys": usable},
            }
        }

    @staticmethod
    def _json(status: int, payload: Any) -> Response:
        return Response(status=status, headers=[_JSON], body=json.dumps(payload).encode())

    async def _forward(self, request: Request) -> Response:
        path = request.path
        models, kind = (_known_path_kind if len(path) <= _CACHED_PATH else _path_kind)(path)
        if models and self._catalog is not None and request.method == "GET":
            # Answered here, never forwarded: an id may hold an encoded slash
            # (the SDKs send "openai%2Fgpt-4o").
            return await self._models(unquote(path)[len("/v1/models") :].strip("/"))
        if kind == "unsafe":
            # A pool key must not reach other upstream paths.
            return _invalid(
                "the path may not hold '..', '.', empty segments or encoded slashes or backslashes"
            )
        if kind == "key_info" and request.method == "GET":
            return self._json(200, await self._key_info())
        if kind == "account" or kind == "key_info":  # /v1/key, not with GET: an account's
            return _refuse(
                403,
                f"{path} manages the pool keys' accounts and is not forwarded; "
                "see GET /v1/key and /status for the pool's own view",
                "forbidden",
            )
        headers = {k: v for k, v in request.headers if k in _FORWARDED}
        asked = request.header("x-keyrotor-key")
        pin: str | int | None = asked
        if asked is not None and asked.isascii() and asked.isdigit():  # "²" is a digit too
            pin = int(asked)
        fallback = (request.header("x-keyrotor-fallback") or "true").strip().lower()
        if fallback not in _BOOLEANS:
            return _invalid("X-Keyrotor-Fallback must be true or false")
        body = request.body
        caller = request.caller
        spend = self.spend
        # A budget hangs on the model: read it as the upstream will, whatever the caller wrote.
        model = model_of(
            body, strict=bool(spend.budgeted_models) or caller in spend.budgeted_clients
        )
        routes = {} if self.router is None else self.router.routes
        if (
            self._reject_unknown
            and model is not None
            and model not in routes
            and not self._known(model)
        ):
            return _refuse(
                404,
                f"the model {model!r} is not in the catalog; GET /v1/models lists the models "
                "(a model new upstream appears at the next catalog refresh)",
                "model_not_found",
            )
        if caller in spend.budgeted_clients or model in spend.budgeted_models:
            info = None if self._catalog is None or model is None else self._catalog.get(model)
            refused = spend.refusal(caller, model, body, info)
            if refused is not None:
                return _over_budget(refused)
        router = self.router
        send = _Send(request, headers, pin, _BOOLEANS[fallback])
        if router is not None and body and request.method == "POST":
            if router.routed(model, body):
                plan = router.plan(body)
                if isinstance(plan, Refused) and plan.code == "no_catalog":
                    assert self._catalog is not None
                    await self._catalog.ready()  # the first fetch (READY_WAIT at most)
                    plan = router.plan(body)
                if isinstance(plan, Refused):
                    return _refused(plan)
                if plan is not None:
                    return await self._send_models(send, plan)
            if model is not None:
                if is_free(model):
                    return await self._send_models(send, None, model)
                unknown = router.unknown(model)
                if unknown is None and router.catalog() is None and router.near_route(model):
                    assert self._catalog is not None  # a name close to a route's: is it a model?
                    await self._catalog.ready()  # the first fetch (READY_WAIT at most)
                    unknown = router.unknown(model)
                if unknown is not None:
                    return _refused(unknown)
        client, provider, body = self._upstream(body)
        charged = {"provider": provider, "model": model, "client": caller}
        started = client.driver.now()
        try:
            upstream = await send.to(client, body)
        except NoKeyAvailable as exc:
            return _rejected(exc)
        if model is not None and (self._catalog is None or self._known(model)):
            # (a name no catalog lists is not tracked: callers could fill the table)
            self.models.record(model, upstream.status_code, client.driver.now() - started)
        return await self._deliver(send, client, upstream, charged)

    def _upstream(self, body: bytes) -> tuple[AsyncClient, str, bytes]:
        """The client a request body's model goes to, its provider's name, and
        the body as that provider names the model."""
        if self._routes is not None and body:
            routed = self._routes.pick(body)
            if routed is not None:  # another provider's model: its own keys
                provider, body = routed
                return self._routes.clients[provider], provider, body
        return self._client, MAIN_PROVIDER, body

    async def _deliver(
        self,
        send: _Send,
        client: AsyncClient,
        upstream: StreamResponse,
        charged: dict[str, str | None],
        extra: list[tuple[str, str]] | None = None,
        log: dict[str, object] | None = None,
        content: bytes | None = None,
    ) -> Response:
        """The answer to the caller: the upstream's, with keyrotor's headers
        (``extra`` too), its spend charged once its body has been read."""
        if upstream.attempts > 1:
            self.counters.failovers += 1
        out_headers = delivered_headers(upstream)
        if extra:
            out_headers += extra
        if send.pin is not None:
            out_headers.append(("x-keyrotor-pin", self._pin_note(client, send.pin, upstream.key)))
        log = {
            "key": upstream.key,
            "attempts": upstream.attempts,
            "upstream_status": upstream.status_code,
            **(log or {}),
        }
        spend = self.spend
        ttfb = (time.perf_counter() - send.started) * 1000
        noted = False

        def note(status: int) -> None:  # once per answer: the analytics' row
            nonlocal noted
            if noted:
                return
            noted = True
            self.views.note_answer(upstream.key, charged.get("model") or "", status)
            if self._store is not None:
                u = upstream.usage
                tokens, cost = (0, 0), 0.0
                if u is not None and u.usage is not None:
                    tokens, cost = (u.prompt_tokens, u.completion_tokens), u.cost
                self._store.record_answer(
                    self._clock(),
                    _dims(upstream.key, charged, log),
                    status,
                    *tokens,
                    cost,
                    ttfb,
                    (time.perf_counter() - send.started) * 1000,
                )

        if content is None and "event-stream" in upstream.headers.get("content-type", "").lower():

            def ended(whole: bool) -> None:
                # The upstream request is done (read to its end, or broken off):
                # nothing is left to close, and the server need not wait on it.
                # (A weak reference: the response holds the relay, which holds
                # this function; a strong one would make a cycle a request.)
                response = withdraw()
                if response is not None:
                    response.aclose = None
                if whole:
                    spend.charge(charged, upstream.usage)
                note(upstream.status_code if whole else 502)

            async def aclose() -> None:
                note(499)  # the caller went away before the stream's end
                await upstream.aclose()

            relayed = Response(
                status=upstream.status_code,
                headers=out_headers,
                body=_Relay(upstream, self.counters, ended),
                aclose=aclose,
                log=log,
            )
            withdraw = weakref.ref(relayed)
            return relayed
        try:
            if content is None:
                content = await upstream.aread()
        finally:
            await upstream.aclose()
        spend.charge(charged, upstream.usage)
        note(upstream.status_code)
        if self._routing_note and upstream.is_success:
            content = _with_routing(content, upstream)
        return Response(status=upstream.status_code, headers=out_headers, body=content, log=log)

    async def _send_models(self, send: _Send, plan: Plan | None, model: str = "") -> Response:
        """Send a routed request (``plan``), or a plain one for a free
        ``model``, model after model until one answers as a model should: a
        model that is unavailable, busy, over the free limit or too small for
        the prompt passes the request to the next, within the pool's attempts.
        Free models take a slot of an account with room (waiting up to
        ``free_wait`` for one)."""
        router = self.router
        assert router is not None
        catalog = self._catalog
        if plan is not None:
            decision = plan.decision
            models = [decision.model or "", *decision.fallbacks]
            route: str | None = plan.route.name
        else:
            models, route = [model], None
        left = self._client.driver.pool.config.max_attempts
        tried: list[str] = []  # one line per model that did not serve
        refused: NoKeyAvailable | Refused | None = None
        done: set[int] = set()  # clients that had no key: their other models won't either
        outgrown = 0  # the context of a model that found the request too long
        for index, name in enumerate(models):
            info = None if catalog is None else catalog.get(name)
            context = None if info is None else info.context_length
            if outgrown and context is not None and context <= outgrown:
                tried.append(
                    f"{name}: context {context:,} no larger than a model's that was too small"
                )
                continue
            body = send.request.body if plan is None else plan.body_for(name)
            if name in self.spend.budgeted_models:
                over = self.spend.refusal(None, name, body, info)
                if over is not None:
                    tried.append(f"{name}: {over.message}")
                    continue
            client, provider, body = self._upstream(body)
            if id(client) in done:
                continue
            taken = pin = taken_at = None
            paced = is_free(name) and provider == MAIN_PROVIDER  # the free tier's counts
            if paced and send.pin is None:
                # A refusal holds for every free model (the quota is the accounts')
                slot = refused if isinstance(refused, Refused) else await self._free_slot()
                if isinstance(slot, Refused):
                    tried.append(f"{name}: {slot.message}")
                    refused = slot
                    continue
                taken, pin, taken_at = slot
            later = len(models) - index - 1
            no_key: NoKeyAvailable | None = None
            sent = False  # the free slot's request reached the upstream
            while True:
                started = client.driver.now()
                # Each later model keeps an attempt where the budget allows: a
                # model failing on every key with 5xx leaves the fallbacks theirs.
                attempts = max(1, left - later)
                try:
                    upstream = await send.to(client, body, attempts=attempts, pin=pin, route=route)
                except NoKeyAvailable as exc:
                    no_key = exc
                    break
                except BaseException:  # the caller left while it waited for a key
                    if taken is not None and not sent:
                        router.give_back(taken, taken_at)
                    raise
                if paced:
                    taken, taken_at = router.served_free(taken, taken_at, upstream.key)
                    sent = True
                status = upstream.status_code
                if plan is not None or self._known(name):  # a plan's models are the catalog's
                    self.models.record(name, status, client.driver.now() - started)
                left -= upstream.attempts
                content = None
                failure = None
                if status >= 400:  # an error body is short, and read already
                    content = await upstream.aread()
                    failure = model_failure(status, upstream.headers, content)
                    if (
                        failure is None
                        and later
                        and left > 0
                        and pin is None
                        and key_failure(status, upstream.headers, content)
                    ):  # the key failed, not the model: this model again, on another key
                        await upstream.aclose()
                        tried.append(f"{name}: key {upstream.key} answered {status}")
                        continue
                break
            if no_key is not None:
                if taken is not None and not sent:
                    router.give_back(taken, taken_at)
                tried.append(f"{name}: no key ({no_key.reason})")
                refused = no_key
                done.add(id(client))
                continue
            if failure is not None:
                kind, hint = failure
                if kind in ("unavailable", "busy", "fault"):
                    router.cool(name, f"answered {status} ({kind})", hint)
                    if paced:
                        router.not_counted(upstream.key, taken_at)
                elif kind == "free_limit":
                    router.limit_met(upstream.key, hint)
                elif kind == "context":
                    outgrown = max(outgrown, context or 0)
                if later and left > 0:
                    await upstream.aclose()
                    tried.append(f"{name}: answered {status} ({kind})")
                    continue
            elif status < 400:
                router.cooling.ok(name)
            extra = [("x-keyrotor-model", header_value(name))]
            if route is not None:
                extra.append(("x-keyrotor-route", header_value(route)))
            log: dict[str, object] = {"model": name}
            if route is not None:
                log["route"] = route
            if tried:
                log["tried"] = tried
                extra.append(("x-keyrotor-fallbacks", str(len(tried))))
            charged = {"provider": provider, "model": name, "client": send.request.caller}
            return await self._deliver(send, client, upstream, charged, extra, log, content)
        if isinstance(refused, NoKeyAvailable):
            return _rejected(refused)
        why = f"no model of route {route!r} could serve: " + "; ".join(tried)
        if isinstance(refused, Refused):  # out of free quota: 429 until a slot comes
            return _refused(refused if plan is None else attrs.evolve(refused, message=why))
        return _refused(Refused(503, why, "models_unavailable"))

    async def _free_slot(self) -> tuple[str, str, float] | Refused:
        """(account, key, when counted) for a free-model request, waiting up to
        ``free_wait`` seconds for an account's pace or for a key of an account
        with room to come back; a 429 ``Refused`` when none comes in time."""
        router = self.router
        assert router is not None
        waited = 0.0
        while True:
            slot = router.take_free()
            if slot is not None:
                if await router.shared_take(slot[0], slot[2]):
                    return slot
                continue  # filled by other processes: another account, or wait
            wait = router.free_wait()
            if wait is None or waited + wait > router.options.free_wait:
                skip = router.free_skip()
                return Refused(
                    429,
                    skip.reason if skip else "no account has free-model quota",
                    "free_quota_exhausted",
                    None if skip is None else skip.retry_after,
                )
            await anyio.sleep(wait + 0.001)
            waited += wait + 0.001


class _Send:
    """What every attempt of one request shares: the caller's request, the
    headers passed upstream and the caller's pin."""

    __slots__ = ("headers", "pin", "pin_fallback", "request", "started")

    def __init__(
        self,
        request: Request,
        headers: dict[str, str],
        pin: str | int | None,
        pin_fallback: bool,
    ) -> None:
        self.request = request
        self.headers = headers
        self.pin = pin
        self.pin_fallback = pin_fallback
        self.started = time.perf_counter()  # for the analytics' times

    async def to(
        self,
        client: AsyncClient,
        body: bytes,
        attempts: int | None = None,
        pin: str | None = None,
        route: str | None = None,
    ) -> StreamResponse:
        """Send the request with ``body`` through ``client`` (on ``pin``, the
        free tier's key, if given: another key only if that one cannot). A
        stream to an OpenAI-compatible upstream asks for its usage chunk
        (``Upstream.body_for``), which is passed through to the caller."""
        request = self.request
        return await client.send(
            request.method,
            request.target[3:],  # "/v1/chat/completions?x" -> "/chat/completions?x"
            content=body if body or request.method in ("POST", "PUT", "PATCH") else None,
            headers=self.headers,
            pin=self.pin if pin is None else pin,
            pin_fallback=self.pin_fallback if pin is None else True,
            session=request.header("x-keyrotor-session"),
            attempts=attempts,
            route=route,
        )


def _own_spend(spend: dict[str, Any], caller: str | None) -> None:
    """``spend`` (``SpendBook.status``) as a client may see it: its own totals and
    budgets, not the other clients' (as analytics shows a client its own answers)."""
    clients = spend.get("clients", {})
    spend["clients"] = {name: row for name, row in clients.items() if name == caller}
    spend["budgets"] = [
        b for b in spend.get("budgets", []) if b["scope"] != "client" or b["name"] == caller
    ]


def _rejected(exc: NoKeyAvailable) -> Response:
    status, reply_headers, reply = rejection(exc)
    return Response(status=status, headers=reply_headers, body=reply, log={"outcome": "rejected"})


def _refused(refused: Refused) -> Response:
    """A routed request not sent (or sent to no avail): its error, and
    ``Retry-After`` when a model or a free quota comes back."""
    headers = [_JSON]
    if refused.retry_after is not None:
        headers.append(("retry-after", str(max(1, math.ceil(refused.retry_after)))))
    kind = {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error"}
    body = error_body(
        refused.message, kind.get(refused.status, "service_unavailable"), refused.code
    )
    log: dict[str, object] = {"outcome": "not_routed", "code": refused.code}
    if refused.decision is not None:
        log["route"] = refused.decision.route
    return Response(status=refused.status, headers=headers, body=body, log=log)


_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _invalid(message: str) -> Response:
    return Response(status=400, headers=[_JSON], body=error_body(message, "invalid_request_error"))


def _over_budget(refused: Refusal) -> Response:
    headers = [_JSON]
    if refused.retry_after is not None:
        headers.append(("retry-after", str(math.ceil(refused.retry_after))))
    body = error_body(refused.message, "insufficient_quota", "budget_exceeded")
    return Response(status=429, headers=headers, body=body, log={"outcome": "over_budget"})


def _refuse(status: int, message: str, code: str | None) -> Response:
    headers = [_JSON]
    if status == 401:
        headers.append(("www-authenticate", 'Bearer realm="keyrotor"'))
    kind = "authentication_error" if status == 401 else "permission_error"
    if status == 404:
        kind = "invalid_request_error"
    return Response(status=status, headers=headers, body=error_body(message, kind, code))


def _with_routing(content: bytes, upstream: StreamResponse) -> bytes:
    """Seed 004's routing note: ``_routing`` added to a JSON object body."""
    try:
        payload = json.loads(content)
    except ValueError:
        return content
    if not isinstance(payload, dict):
        return content
    payload["_routing"] = {"key": upstream.key, "attempts": upstream.attempts}
    return json.dumps(payload).encode()


class _Relay:
    """A delivered SSE stream, chunk by chunk as it arrives. If the upstream
    breaks off after output has started, the stream ends with an OpenAI-shaped
    error event (the caller already has part of the answer: no silent retry)."""

    __slots__ = ("_chunks", "_counters", "_done", "_ended", "_upstream")

    def __init__(
        self, upstream: StreamResponse, counters: ProxyCounters, ended: Callable[[bool], None]
    ) -> None:
        self._upstream = upstream
        self._chunks = upstream.aiter_bytes()
        self._counters = counters
        self._done = False
        self._ended = ended  # called once at the end: True when the whole stream went through

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    @property
    def ready(self) -> bool:
        """Whether the next chunk (or the end) is in hand: the server joins
        what is ready into one write (``server._Connection._stream``)."""
        return self._done or self._upstream.ready

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        try:
            return await anext(self._chunks)
        except StopAsyncIteration:
            self._done = True
            self._ended(True)
            raise
        except TransportError:
            self._done = True
            self._ended(False)
            self._counters.stream_errors += 1
            event = error_body("the upstream stream broke off", "upstream_error", 502)
            return b"data: " + event + b"\n\n"


_VIEWS = ("/dashboard", "/analytics/", "/alerts")
"""The operator's views (``views.Views``): the dashboard, analytics and alerts."""


def _dims(key: str, charged: dict[str, str | None], log: dict[str, object]) -> Dims:
    """An answer's analytics dimensions: key, provider, model, route, client."""
    route = log.get("route")
    return (
        key,
        charged.get("provider") or "",
        charged.get("model") or "",
        route if isinstance(route, str) else "",
        charged.get("client") or "",
    )
