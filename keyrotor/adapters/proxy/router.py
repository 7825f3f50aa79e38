"""The proxy's router: which models a request goes to, in which order.

A request is routed when its ``model`` names a route (``[[routes]]``, or the
built-in ``free``) or when it carries OpenRouter's ``models`` fallback list.
``Router.plan`` parses it, asks the pure router (``keyrotor.models.routing``)
for a decision over the merged catalog, with the models cooling after they
were down and the free tier's state, and returns a ``Plan`` (or a ``Refused``
saying why not). The proxy then sends the plan's models in order
(``ProxyApp``), telling the router what each answer said about its model
(``cool``) and taking a free-tier slot for each free model (``take_free``).

Free models (``:free`` ids) are paced per account (``keyrotor.models.free_tier``)
on the main upstream's keys, whatever route or none the request came by: the
router names the key to pin, one of an account with room. Each account's use
today is written to the state file's ``usage`` ledger (scope ``free``), so a
restart keeps counting from where it was; ``GET /key`` tells each account's
daily limit and, where it says, the requests the upstream counted today
(``learn_tiers``).
"""

from __future__ import annotations

import difflib
import functools
import json
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import anyio
import attrs

from ...core import USABLE_STATES, Pool, PoolError
from ...models.cooling import ModelCooling
from ...models.free_tier import FREE_PER_DAY_WITH_CREDITS, FreeTier, utc_day
from ...models.routing import (
    Candidates,
    Decision,
    Need,
    Route,
    Skip,
    candidates,
    decide,
    need_of,
    ordered,
    route_to_json,
)
from ...transports.errors import KeyrotorError
from ...transports.json_body import Unsure, member, parse
from ..config import RoutingOptions
from .providers import MODEL_MEMBER, model_string

if TYPE_CHECKING:
    from ...models import Catalog
    from ...transports.api import AsyncClient
    from ..shared_limits import SharedLimits
    from ..storage import StateStore, UsageRow
    from .catalog import Catalogs
    from .model_health import ModelHealth

__all__ = ["FREE_SCOPE", "MAX_MODELS", "Plan", "Refused", "Router"]

MAX_MODELS = 16
"""The most models a request's ``models`` list may name."""
FREE_SCOPE = "free"
"""The ``usage`` ledger's scope of free-model requests per account."""
_ACCOUNTS_EVERY = 10.0
"""Seconds between looks at which keys the pool holds (keys come and go at runtime)."""
TIERS_EVERY = 6 * 3600.0
"""Seconds between two rounds of asking each account's tier (``GET /key``)."""


@attrs.frozen
class Refused:
    """A routed request that is not sent: its status, one line, a code."""

    status: int
    message: str
    code: str
    retry_after: float | None = None
    decision: Decision | None = None


@attrs.define
class Plan:
    """A routed request: the route, its decision, and the request's JSON with
    ``models`` and ``route`` taken out (each model is sent on its own).
    ``raw``: the body as it came, with the span of its ``model`` string,
    when only that needs replacing (a route's name)."""

    route: Route
    decision: Decision
    data: dict[str, Any]
    need: Need
    raw: tuple[bytes, int, int] | None = None

    def body_for(self, model: str) -> bytes:
        """The request body to send ``model`` (as its upstream names it)."""
        if self.raw is not None:  # the caller's bytes, the model's value spliced in
            body, start, end = self.raw
            return body[:start] + _quoted(model) + body[end:]
        return json.dumps({**self.data, "model": model}, separators=(",", ":")).encode()


@functools.lru_cache(maxsize=1024)
def _quoted(model: str) -> bytes:
    """``model`` as a JSON string's contents (a route's few models, again and again)."""
    return json.dumps(model)[1:-1].encode()


_FIRST = (b'{"model":"', b'{"model": "')
"""A body's opening when the model is its first member (compact, or as ``json.dumps`` writes)."""
_LAST = (b',"model":"', b', "model": "')
"""What comes before the model's string when it is the last member (the openai SDK's order)."""


def _model_span(body: bytes, model: object) -> tuple[bytes, int, int] | None:
    """``body`` and the span of its top-level model's value within the quotes,
    found by ``json_body.member`` (no search from the start of a long body),
    or None when that cannot tell (the plan re-encodes the parsed body then).
    A model written first or last, as ``json.dumps`` writes it, without
    escapes, is found without ``member`` (``_written``): the same span."""
    if isinstance(model, str):
        written = _written(body, _quoted(model))
        if written is not None:
            return body, written[0], written[1]
    try:
        found = member(body, b'"model"', MODEL_MEMBER)
    except Unsure:
        return None
    if found is None or not isinstance(model, str):
        return None
    start, end = found.span(1)
    # Written as json.dumps writes it (nearly always): the same string, not decoded again
    if body[start + 1 : end - 1] != _quoted(model) and model_string(found) != model:
        return None
    return body, start + 1, end - 1


def _written(body: bytes, quoted: bytes) -> tuple[int, int] | None:
    """The span of ``quoted`` (a model's string, no backslash in it) as the
    value of ``body``'s first member ``"model"`` with no other ``"model"``
    after it, or of its last member (the body ends with that string's quote
    and the ``}``); None: neither. ``body`` is a JSON object (parsed), and so
    the span is the one ``member`` finds: a key ``"model"`` first in the
    object, the last in the body, or one after a ``,`` and before the last
    ``}``, and the last ``"model"`` in the body, is the top-level member
    ``member`` takes."""
    if b"\\" in quoted:  # an escape: a quote in the string may end it
        return None
    size = len(quoted)
    for prefix in _FIRST:
        if body.startswith(prefix):
            start = len(prefix)
            end = start + size
            if (
                body.startswith(quoted, start)
                and body.startswith(b'"', end)
                and body.rfind(b'"model"') == 1
            ):
                return start, end
            break
    if body.endswith(b'"}'):
        end = len(body) - 2
        start = end - size
        if body.startswith(quoted, start):
            for prefix in _LAST:
                key = start - len(prefix) + 1
                if (
                    key > 0
                    and body.startswith(prefix, key - 1)
                    and body.rfind(b'"model"') == key  # not a model named "model"
                ):
                    return start, end
    return None


def _day_end(now: float) -> float:
    """When the UTC day of ``now`` ends (Unix s)."""
    return (utc_day(now) + 1) * 86400.0


def _usable(pool: Pool, key_id: str) -> bool:
    """Whether the key may serve now (False too for one removed since the
    accounts were learned)."""
    try:
        return pool.state_of(key_id) in USABLE_STATES
    except PoolError:
        return False


def free_quota(data: object, free_per_day: int) -> tuple[int, int | None] | None:
    """(daily free-model limit, requests counted today or None) from the
    ``data`` of ``GET /key``: its ``free_model_daily_requests`` when it has
    one (``used``, else ``limit - remaining``; the ``limit`` itself from the
    credits tier up, below it no more than ``free_per_day``, which an operator
    may have set lower); else ``is_free_tier`` (true: ``free_per_day``;
    false: 1000, though it only says the account paid, not that it bought the
    10 credits the 1000 need). None: neither says."""
    if not isinstance(data, dict):
        return None
    daily = data.get("free_model_daily_requests")
    limit = _count(daily.get("limit")) if isinstance(daily, dict) else None
    if isinstance(daily, dict) and limit is not None:
        used = _count(daily.get("used"))
        remaining = _count(daily.get("remaining"))
        if used is None and remaining is not None:
            used = max(0, limit - remaining)
        if limit < FREE_PER_DAY_WITH_CREDITS:
            limit = min(limit, free_per_day)
        return limit, used
    tier = data.get("is_free_tier")
    if isinstance(tier, bool):
        return (free_per_day if tier else FREE_PER_DAY_WITH_CREDITS), None
    return None


def _count(value: object) -> int | None:
    """A JSON count: an integer >= 0 (an integral float too), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():  # not inf, not nan
        value = int(value)
    return value if isinstance(value, int) and value >= 0 else None


def is_free(model: str) -> bool:
    """Whether ``model`` is an OpenRouter free variant (paced per account)."""
    return model.endswith(":free")


class Router:
    """Routes, model cooldowns and free-tier pacing (see the module's docstring)."""

    def __init__(
        self,
        routes: Iterable[Route],
        options: RoutingOptions,
        catalogs: Catalogs,
        client: AsyncClient,
        models: ModelHealth,
        *,
        store: StateStore | None = None,
        clock: Callable[[], float] = time.time,
        log: Callable[[dict[str, Any]], None] = lambda record: None,
    ) -> None:
        self.routes = {route.name: route for route in routes}
        self._log = log
        self.options = options
        self._catalogs = catalogs
        self._client = client
        self.models = models
        self._store = store
        self._clock = clock
        self.cooling = ModelCooling(options.model_cooldown)
        # Per route: (the catalog, its candidates there); the catalog itself,
        # not its id(), which a later one may reuse
        self._found: dict[str, tuple[Catalog, Candidates]] = {}
        self.free = FreeTier({}, options.free_per_minute)
        self.shared: SharedLimits | None = None  # free counts kept with other processes
        self.on_cool: Callable[[str, float, str], None] | None = None  # (model, until, why)
        self._keys: dict[str, list[str]] = {}  # account -> its keys
        self._account_of: dict[str, str] = {}
        self._turn: dict[str, int] = {}
        self._learned: dict[str, int] = {}  # account -> daily limit, from GET /key
        self._free_asked = False  # a free model was asked for: learn the tiers
        self._keys_seen: tuple[list[str] | None, float] = (None, -_ACCOUNTS_EVERY)  # (ids, when)
        self._usable: set[str] = set()  # accounts with a usable key, as take_free saw them
        self._refresh_accounts()

    # ---------------------------------------------------------------- routes

    def set_route(self, route: Route) -> None:
        self.routes[route.name] = route
        self._found.pop(route.name, None)

    def remove_route(self, name: str) -> bool:
        self._found.pop(name, None)
        return self.routes.pop(name, None) is not None

    def routed(self, model: str | None, body: bytes) -> bool:
        """Whether a request goes through ``plan`` (cheap: no JSON parsed)."""
        # rfind: about three times as fast as ``in`` on CPython 3.11 (bodies of 100 KB)
        return (model is not None and model in self.routes) or body.rfind(b'"models"') >= 0

    def plan(self, body: bytes) -> Plan | Refused | None:
        """The plan of a routed request body (see ``routed``); None when it is
        not routed after all (``"models"`` was a nested key)."""
        try:
            data: Any = parse(body)
        except ValueError as exc:
            return Refused(400, f"the request body is not JSON: {exc}", "invalid_json")
        if not isinstance(data, dict):
            return Refused(400, "the request body must be a JSON object", "invalid_request")
        route = self._route_of(data)
        if route is None or isinstance(route, Refused):
            return route  # None: a nested "models" key, not a route (no catalog needed)
        catalog = self._catalogs.merged()
        if catalog is None:
            why = self._catalogs.main.last_error or "the first fetch is running"
            return Refused(
                503, f"the model catalog is not loaded yet: {why} (see /status)", "no_catalog"
            )
        need = need_of(data)
        decision = self.decide(route, catalog, need)
        if decision.model is None:
            return self._refusal(decision, catalog)
        if "models" in data or "route" in data:
            data.pop("models", None)
            data.pop("route", None)
            return Plan(route, decision, data, need)
        return Plan(route, decision, data, need, _model_span(body, data.get("model")))

    def _route_of(self, data: dict[str, Any]) -> Route | Refused | None:
        model = data.get("model")
        models = data.get("models")
        if "route" in data and data["route"] != "fallback":
            return Refused(
                400, f'route must be "fallback" (OpenRouter\'s), got {data["route"]!r}', "bad_route"
            )
        if models is None:
            return self.routes.get(model) if isinstance(model, str) else None
        if (
            not isinstance(models, list)
            or not 1 <= len(models) <= MAX_MODELS
            or not all(isinstance(m, str) and m.strip() for m in models)
        ):
            return Refused(
                400,
                f"models must be a list of 1 to {MAX_MODELS} model ids (strings), tried in "
                f"order; got {json.dumps(models)[:200]}",
                "invalid_models",
            )
        if isinstance(model, str) and model in self.routes:
            return Refused(
                400,
                f"model {model!r} is a route: send either a route or a models list",
                "invalid_models",
            )
        first = [model] if isinstance(model, str) and model not in models else []
        return ordered("models", [*first, *models])

    def decide(self, route: Route, catalog: Catalog, need: Need) -> Decision:
        """``route``'s decision for ``need`` now (filter matches kept per catalog)."""
        named = self.routes.get(route.name) is route  # not a request's own models list
        kept = self._found.get(route.name) if named else None
        if kept is None or kept[0] is not catalog:
            kept = (catalog, candidates(route, catalog))
            if named:
                self._found[route.name] = kept
        found = kept[1]
        cooling = self.cooling
        if not cooling and not found.free:  # nothing passed over for now: no clock read
            return decide(route, catalog, need, self.models.latency_ms, found=found)
        now = self._clock()
        return decide(
            route,
            catalog,
            need,
            self.models.latency_ms,
            unavailable=cooling.skips(now) if cooling else None,
            no_free=self.free.skip(now) if found.free else None,
            found=found,
        )

    def _refusal(self, decision: Decision, catalog: Catalog) -> Refused:
        kind = decision.problem_kind
        message = f"{decision.problem}: " + "; ".join(decision.reasons[:8])
        if kind == "too_long":
            return Refused(400, message, "context_length_exceeded", decision=decision)
        if kind == "unfit":
            return Refused(400, message, "no_model_fits", decision=decision)
        if kind == "empty":
            names = [c for c in decision.reasons if "not in the catalog" in c]
            if names and decision.route == "models":
                wanted = [line.split()[1].rstrip(":") for line in names]
                near = sorted({m for w in wanted for m in _near(w, [m.id for m in catalog.models])})
                hint = f" (models with close names: {', '.join(near)})" if near else ""
                return Refused(
                    404,
                    f"no model of the models list is in the catalog{hint}",
                    "model_not_found",
                    decision=decision,
                )
            return Refused(503, message, "route_empty", decision=decision)
        status = 429 if "free quota" in message or "free-model pace" in message else 503
        code = "free_quota_exhausted" if status == 429 else "models_unavailable"
        return Refused(status, message, code, decision.retry_after, decision)

    def near_route(self, model: str) -> bool:
        """Whether ``model`` looks like a mistyped route (no ``/``, close to a
        route's name): ``unknown`` needs the catalog to tell."""
        return "/" not in model and bool(_near(model, list(self.routes)))

    def unknown(self, model: str) -> Refused | None:
        """A 404 for a ``model`` that looks like a mistyped route (no ``/``, not
        in the catalog, close to a route's name); None otherwise."""
        catalog = self._catalogs.merged()
        if "/" in model or catalog is None or catalog.get(model) is not None:
            return None
        near = _near(model, list(self.routes))
        if not near:
            return None
        return Refused(
            404,
            f"{model!r} is neither a route nor a model of the catalog; routes close to it: "
            f"{', '.join(near)} (GET /routing/routes lists them all)",
            "model_not_found",
        )

    # ------------------------------------------------------ model health

    def cool(self, model: str, why: str, retry_after: float | None) -> None:
        """``model`` failed as a model (``why``): pass over it for a while,
        longer for each failure in a row."""
        now = self._clock()
        seconds = self.cooling.fail(model, now, why, retry_after)
        if self.on_cool is not None:
            self.on_cool(model, now + seconds, why)

    # ---------------------------------------------------------- free tier

    def keys_changed(self) -> None:
        """Learn the pool's accounts anew at the next look (a key removed and
        added again under its alias, with another account, leaves the ids)."""
        self._keys_seen = (None, self._keys_seen[1])

    def _refresh_accounts(self) -> None:
        """Learn the main pool's accounts (every ``_ACCOUNTS_EVERY`` s, or when
        its keys changed: one added and another removed leave their number)."""
        pool = self._client.driver.pool
        now = self._clock()
        ids = pool.key_ids()
        if ids == self._keys_seen[0] and now - self._keys_seen[1] < _ACCOUNTS_EVERY:
            return
        self._keys_seen = (ids, now)
        keys: dict[str, list[str]] = {}
        for key_id, spec in pool.key_specs().items():
            keys.setdefault(spec.account or key_id, []).append(key_id)
        self._keys = keys
        self._account_of = {k: account for account, ks in keys.items() for k in ks}
        per_day = {**self._learned, **self.options.accounts}
        self.free.set_accounts(
            {account: per_day.get(account, self.options.free_per_day) for account in keys}
        )

    def take_free(self) -> tuple[str, str, float] | None:
        """(account, key to pin, when counted) for one free-model request now:
        an account with room and one of its usable keys; None: none has room
        (``free_wait`` says until when, among the accounts with a usable key)."""
        self._free_asked = True
        self._refresh_accounts()
        pool = self._client.driver.pool
        now = self._clock()
        self._usable = usable = {
            account for account, keys in self._keys.items() if any(_usable(pool, k) for k in keys)
        }
        account = self.free.take(now, usable)
        if account is None:
            return None
        keys = [k for k in self._keys[account] if _usable(pool, k)]
        turn = self._turn.get(account, 0)
        self._turn[account] = turn + 1
        self._record(account, 1, now)
        return account, keys[turn % len(keys)], now

    def served_free(
        self, taken: str | None, at: float | None, key: str
    ) -> tuple[str, float | None]:
        """A free-model request reached the upstream on ``key``: if the pool
        sent it on another account's key than ``taken`` (counted at ``at``),
        move the count. The account that holds the count now, and when it was
        made (a retry on a third account's key moves it from this one)."""
        account = self._account_of.get(key, key)
        if account == taken:
            return account, at
        now = self._clock()
        if taken is not None:
            self.give_back(taken, at)
        self.free.note(account, now)
        self._record(account, 1, now)
        if self.shared is not None:
            self.shared.note_free(account, _day_end(now))
        return account, now

    def limit_met(self, key: str, retry_after: float | None) -> None:
        """The upstream answered a free request on ``key`` with the account's
        free limit: the per-day one (no hint, or more than two minutes) or
        the per-minute one. The account takes no more until then."""
        account = self._account_of.get(key, key)
        daily = retry_after is None or retry_after > 120
        now = self._clock()
        self.free.limit_met(account, now, daily)
        if self.shared is not None:
            per_day, per_minute, _ = self.free.limits(account)
            amount = per_day if daily else per_minute
            self.shared.free_limit_met(account, _day_end(now), daily, amount)

    async def run(self, every: float = TIERS_EVERY) -> None:
        """In the background, for as long as the proxy runs: each time the
        catalog changes, warn in the log of every route it gives no model;
        once a free model is first asked for, learn the accounts' tiers
        (``learn_tiers``), and again every ``every`` seconds (keys come and
        go, accounts buy credits). A pool that never asks for a free model
        never sends ``GET /key`` for it."""
        seen: Catalog | None = None
        learned_at: float | None = None
        while True:
            catalog = self._catalogs.merged()
            if catalog is not None and catalog is not seen:
                seen = catalog
                for name in self.empty_routes(catalog):
                    self._log(
                        {
                            "event": "warning",
                            "message": f"route {name!r} matches no model of the catalog "
                            f"({len(catalog.models)} models): requests to it get 503 until "
                            "one does; check its candidates (GET /routing/routes)",
                        }
                    )
            if self._free_asked and (learned_at is None or self._clock() - learned_at >= every):
                learned_at = self._clock()
                await self.learn_tiers()
            await anyio.sleep(1.0)

    def empty_routes(self, catalog: Catalog) -> list[str]:
        """The routes with no candidate in ``catalog``."""
        return [name for name, route in self.routes.items() if not candidates(route, catalog)[0]]

    async def learn_tiers(self, at_most: int = 200) -> dict[str, int]:
        """Each account's daily free limit from ``GET /key`` (``free_quota``),
        asked with one of its keys, for the accounts ``[routing.accounts]``
        does not name (at most ``at_most``), and the requests the upstream
        counted today where it says: the day's count becomes the larger of
        that and this pool's (the state file's after a restart), never their
        sum. An account whose answer says nothing keeps ``free_per_day``.
        Returns the limits learned."""
        self.keys_changed()
        self._refresh_accounts()
        learned: dict[str, int] = {}
        used: dict[str, tuple[int, float]] = {}  # account -> (used today, when asked)
        asked = [a for a in self._keys if a not in self.options.accounts][:at_most]
        pool = self._client.driver.pool
        for account in asked:
            # A usable key of the account now (the pool may have changed while the
            # last answer came): a pinned request to a resting one would wait for it.
            key = next((k for k in self._keys.get(account, ()) if _usable(pool, k)), None)
            if key is None:
                continue
            at = self._clock()
            try:
                answer = await self._client.send(
                    "GET", "/key", pin=key, pin_fallback=False, attempts=1
                )
                try:
                    body = await answer.aread()
                finally:
                    await answer.aclose()
                data = parse(body).get("data") if answer.status_code == 200 else None
            except (KeyrotorError, ValueError, AttributeError):
                continue
            quota = free_quota(data, self.options.free_per_day)
            if quota is not None:
                learned[account], today = quota
                if today is not None:
                    used[account] = (today, at)
        self._learned.update(learned)
        self.keys_changed()
        self._refresh_accounts()
        now = self._clock()
        for account, (today, at) in used.items():
            if utc_day(at) == utc_day(now):  # not a count of a day gone since
                self.free.sync(account, now, today)
        return learned

    def not_counted(self, key: str, at: float | None = None) -> None:
        """A free request sent on ``key`` (counted at ``at``) met a model that
        could not serve (no endpoints, no provider up, a shared pool busy):
        the upstream counts no such request against the account, so neither
        does the pool. Were it to, its limit answer fills the account
        (``limit_met``)."""
        self.give_back(self._account_of.get(key, key), at)

    def give_back(self, account: str, at: float | None = None) -> None:
        """A slot ``take_free`` gave (at ``at``) whose request never reached the upstream."""
        now = self._clock()
        self._uncount(account, now, at)
        if self.shared is not None:
            self.shared.give_back_free(account, _day_end(now if at is None else at), at)

    def _uncount(self, account: str, now: float, at: float | None = None) -> None:
        """Take back one free request counted on ``account`` at ``at`` (here
        and in the state file, on the day it was counted)."""
        self.free.give_back(account, now, at)
        self._record(account, -1, now if at is None else at)

    async def shared_take(self, account: str, at: float | None = None) -> bool:
        """With other processes (``shared``): count the slot ``take_free`` gave
        on ``account`` (at ``at``) in Redis too. False: the pool's other
        processes filled the account's day or minute (now known here; the
        slot is given back)."""
        if self.shared is None:
            return True
        now = self._clock()
        per_day, per_minute, window = self.free.limits(account)
        try:
            answer = await self.shared.take_free(
                account, per_day, per_minute, window, _day_end(now), at
            )
        except BaseException:  # the caller left meanwhile: its slot back here (Redis
            self._uncount(account, now, at)  # may have counted it: the safe side there)
            raise
        if answer is None:
            return True  # Redis cannot say: this process's view decides
        verdict, used, wait = answer
        if verdict == "ok":
            self.free.sync(account, now, used)
            return True
        self._uncount(account, now, at)  # Redis counted nothing: nothing to give back there
        self.free.sync(account, now, used, wait if verdict == "minute" else None)
        return False

    def free_wait(self) -> float | None:
        """Seconds until a free request may have a slot (None: not today): the
        sooner of an account with a usable key (as ``take_free`` last saw them)
        getting room, and a key of an account with room coming back."""
        self._refresh_accounts()
        now = self._clock()
        waits = [self.free.wait(now, self._usable), self._keys_back(self._resting(now))]
        return min((w for w in waits if w is not None), default=None)

    def free_skip(self) -> Skip | None:
        """Why no free request can be sent now; None: one can."""
        now = self._clock()
        resting = self._resting(now)
        if resting:  # quota left, but on accounts whose keys all rest
            names = ", ".join(resting[:3]) + (", ..." if len(resting) > 3 else "")
            reason = f"every key of the accounts with free quota left ({names}) rests"
            return Skip(reason, self._keys_back(resting))
        return self.free.skip(now, self._usable)

    def _resting(self, now: float) -> list[str]:
        """The accounts with free room now but no usable key (as ``take_free`` saw them)."""
        return [a for a in self.free.room(now) if a not in self._usable]

    def _keys_back(self, resting: list[str]) -> float | None:
        """Seconds until a key of one of the ``resting`` accounts may serve (its
        cooldown's end); None: none of them, or none comes back on its own."""
        if not resting:
            return None
        driver = self._client.driver
        pictures = (
            driver.pool.key_statistics(k)
            for account in resting
            for k in self._keys.get(account, ())
        )
        untils = [k.until for k in pictures if k is not None and k.until is not None]
        return max(0.0, min(untils) - driver.now()) if untils else None

    def _record(self, account: str, requests: int, now: float) -> None:
        if self._store is not None:
            self._store.record_usage({FREE_SCOPE: account}, requests=requests, at=now)

    def restore(self, rows: Iterable[UsageRow]) -> None:
        """Today's free-model use per account, from the state file."""
        now = self._clock()
        today = time.strftime("%Y-%m-%d", time.gmtime(utc_day(now) * 86400))
        used = {r.name: r.requests for r in rows if r.scope == FREE_SCOPE and r.day == today}
        self.free.restore(used, now)

    # ------------------------------------------------------------ status

    def routes_json(self) -> dict[str, Any]:
        """``GET /routing/routes``: each route and its candidates now."""
        catalog = self._catalogs.merged()
        now = self._clock()
        cooling = self.cooling.skips(now)
        no_free = self.free.skip(now)
        out = []
        for route in self.routes.values():
            entry = route_to_json(route)
            if catalog is not None:
                models, missing = candidates(route, catalog)
                entry["live"] = [
                    {
                        "model": m.id,
                        "context": m.context_length,
                        "free": m.free,
                        "available": m.id not in cooling and not (m.free and no_free),
                        "why": (cooling[m.id].reason if m.id in cooling else None)
                        or (no_free.reason if m.free and no_free else None),
                    }
                    for m in models
                ]
                entry["missing"] = list(missing)
            out.append(entry)
        return {"routes": out, "catalogLoaded": catalog is not None}

    def catalog(self) -> Catalog | None:
        """The merged catalog routes choose from (None before the first fetch)."""
        return self._catalogs.merged()

    def free_status(self) -> dict[str, Any]:
        """Per account: free-model use today (``FreeTier.status``)."""
        self._refresh_accounts()
        return self.free.status(self._clock())

    def status(self) -> dict[str, Any]:
        """For ``/status``: routes, cooling models, and the free-tier use of
        each account that has some today (or in the last window), or whose
        daily limit is set in ``[routing.accounts]`` or learned from ``GET
        /key``; an account left out has used nothing of ``free_per_day``."""
        now = self._clock()
        self._refresh_accounts()
        named = self.options.accounts.keys() | self._learned.keys()
        return {
            "routes": sorted(self.routes),
            "cooling": {
                m: {"for": round(s.retry_after or 0, 1), "why": s.reason}
                for m, s in self.cooling.skips(now).items()
            },
            "freeTier": {
                account: use
                for account, use in self.free.status(now).items()
                if use["usedToday"] or use["lastMinute"] or account in named
            },
        }


def _near(word: str, names: Iterable[str]) -> list[str]:
    return difflib.get_close_matches(word, list(names), n=3, cutoff=0.6)
