"""The admin API (``/admin/*``): keys added, removed, marked and probed at
runtime, and routes set and removed.

Every change takes effect at once on the running pool. Keys added here are
stored (secret encrypted) in the state file when there is one, before they
join the pool, so an answer of 201 means the key survives a restart. No
answer, log line or error ever holds a secret. docs/operations.md is the
reference, with curl examples.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import anyio
import anyio.lowlevel
import anyio.to_thread
import attrs

from ...core import KeySpec, KeyState, PoolError
from ...core.config import finite
from ...models.routing import route_from_json, route_to_json
from ...transports.api import AsyncClient
from ...transports.errors import ConfigurationError
from ...transports.json_body import parse
from ..config import MAIN_PROVIDER
from ..storage import StorageError, storable
from .json_parts import PER_PART, joined, json_parts, stepped
from .types import Request, Response

if TYPE_CHECKING:
    from ..storage import StateStore
    from .router import Router

__all__ = ["KEY_OPTIONS", "Admin"]

_JSON = ("content-type", "application/json")
_NUMBERS = ("weight", "rpm", "tpm", "budget", "budget_window", "credits")
_SPEC_OPTIONS = ("account", "max_in_flight", *_NUMBERS)
KEY_OPTIONS = ("key", "alias", "provider", *_SPEC_OPTIONS)
"""The fields of ``POST /admin/keys``."""
_SPEC_FIELDS = [field for field in attrs.fields(KeySpec) if field.name != "key_id"]
_MARKABLE = ("healthy", "disabled", "rate_limited", "degraded", "depleted", "failed")
_KEY_PATH = re.compile(r"^/admin/keys/([^/]+)(/state)?$")
_ROUTE_PATH = re.compile(r"^/admin/routes/([^/]+)$")


class AdminError(Exception):
    """A request the admin API refuses: its status and message (never a secret)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Admin:
    """Answers ``/admin/*`` requests whose caller holds the admin token.

    ``sources`` tells where each key came from (``config``, ``environment``,
    ``api``): keys of the file or the environment come back at the next start
    even when removed here. ``log`` gets one record per change.
    """

    def __init__(
        self,
        client: AsyncClient,
        store: StateStore | None,
        sources: dict[str, str],
        log: Callable[[dict[str, Any]], None] = lambda record: None,
        providers: Mapping[str, AsyncClient] | None = None,
        router: Router | None = None,
        stored_routes: Mapping[str, Any] | None = None,
        is_token: Callable[[str], bool] = lambda text: False,
    ) -> None:
        self._clients = {MAIN_PROVIDER: client, **(providers or {})}
        self._is_token = is_token  # (``Auth.is_token``: no alias may be a token)
        self._router = router
        self._stored_routes = dict(stored_routes or {})  # routes set here, as kept
        self._store = store
        self.sources = sources
        self._log = log
        self._lock = anyio.Lock()  # one change at a time: check, store, then pool
        # Told of each main-pool key added or removed here (``shared_keys``).
        self.on_added: Callable[[str, str, Mapping[str, Any]], None] | None = None
        self.on_removed: Callable[[str], None] | None = None
        # Told after every change to keys or routes (the app's cached /status, /metrics).
        self.on_change: Callable[[], None] = lambda: None

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except AdminError as exc:
            kind = "invalid_request_error" if exc.status < 500 else "server_error"
            error = {"message": str(exc), "type": kind, "code": exc.status}
            return _answer(exc.status, {"error": error})

    async def _route(self, request: Request) -> Response:
        path, method = request.path.rstrip("/") or "/", request.method
        if path == "/admin/keys":
            if method == "GET":
                keys = {"keys": await self.all_keys()}
                text = await joined(json_parts(keys, 1, PER_PART))
                return Response(status=200, headers=[_JSON], body=text)
            if method == "POST":
                return await self._add(request)
            raise AdminError(405, f"{method} {path}: use GET or POST")
        if path == "/admin/probe":
            if method != "POST":
                raise AdminError(405, f"{method} {path}: use POST")
            body = _json_object(request.body, allow_empty=True)
            alias = body.get("alias")
            if alias is not None and not isinstance(alias, str):
                raise AdminError(400, "alias must be a string (or absent: probe every key)")
            if alias is not None:
                self._call(self._owner(alias).probe_keys, alias)  # 404 for an unknown key
                targets = [alias]
            else:
                targets = []
                for client in self._clients.values():
                    self._call(client.probe_keys, None)
                    targets += [
                        k["alias"]
                        for k in client.status()["keys"]
                        if k["state"] != "disabled" and not k["removing"]
                    ]
            self.on_change()
            self._log({"event": "admin", "action": "probe", "keys": targets})
            return _answer(202, {"probing": targets})
        if path == "/admin/routes" or path.startswith("/admin/routes/"):
            return await self._routes(request, path, method)
        match = _KEY_PATH.match(path)
        if match is None:
            raise AdminError(404, f"no admin route {method} {path}")
        alias, state = unquote(match.group(1)), match.group(2)
        if state:
            if method != "POST":
                raise AdminError(405, f"{method} {path}: use POST")
            return await self._mark(alias, _json_object(request.body))
        if method == "DELETE":
            return await self._remove(alias)
        if method == "GET":
            return _answer(200, self._entry(alias))
        raise AdminError(405, f"{method} {path}: use GET or DELETE")

    async def _routes(self, request: Request, path: str, method: str) -> Response:
        """``GET /admin/routes``; ``PUT`` and ``DELETE /admin/routes/{name}``."""
        router = self._router
        if router is None:
            raise AdminError(404, "routing is off: it needs the model catalog ([catalog])")
        if path == "/admin/routes":
            if method != "GET":
                raise AdminError(
                    405, f"{method} {path}: use GET (PUT or DELETE /admin/routes/NAME)"
                )
            return _answer(200, router.routes_json())
        match = _ROUTE_PATH.match(path)
        if match is None:
            raise AdminError(404, f"no admin route {method} {path}")
        name = unquote(match.group(1))
        async with self._lock:
            kept = dict(self._stored_routes)
            if method == "PUT":
                body = _json_object(request.body)
                if body.setdefault("name", name) != name:
                    raise AdminError(
                        400, f"the body names route {body['name']!r}, the path {name!r}"
                    )
                try:
                    route = route_from_json(body)
                except ValueError as exc:
                    raise AdminError(400, str(exc)) from None
                kept[name] = route_to_json(route)
                status, action = (
                    (200, "route_replaced") if name in router.routes else (201, "route_added")
                )
            elif method == "DELETE":
                if name not in router.routes:
                    known = ", ".join(sorted(router.routes)) or "none"
                    raise AdminError(404, f"no route {name!r} (routes: {known})")
                kept.pop(name, None)
                status, action = 200, "route_removed"
            else:
                raise AdminError(405, f"{method} {path}: use PUT or DELETE")
            if self._store is not None:  # kept first: a 2xx means it survives a restart
                try:
                    await anyio.to_thread.run_sync(self._store.save_routes, kept)
                except StorageError as exc:
                    raise AdminError(503, str(exc)) from None
            self._stored_routes = kept
            if method == "PUT":
                router.set_route(route)
            else:
                router.remove_route(name)
            self.on_change()
        self._log({"event": "admin", "action": action, "route": name})
        return _answer(status, {"route": name, "stored": self._store is not None})

    # ---------------------------------------------------------------- views

    def list_keys(self, alias: str) -> list[dict[str, Any]]:
        """The keys named ``alias`` (one, or none), found without listing the
        others: alias, its provider (``main``: the main upstream), masked form,
        source, options, state and counters."""
        out = []
        for provider, client in self._clients.items():
            item = client.driver.key_entry(alias)
            if item is not None:
                out.append(self._listed(provider, client, item))
        return out

    async def all_keys(self) -> list[dict[str, Any]]:
        """Every key of every upstream, as ``list_keys`` lists one, made a step
        of keys at a time (other tasks run in between)."""
        out = []
        for provider, client in self._clients.items():
            items = (await stepped(client.driver.status_steps()))["keys"]
            for start in range(0, len(items), PER_PART):
                out += [self._listed(provider, client, i) for i in items[start : start + PER_PART]]
                await anyio.lowlevel.checkpoint()
        return out

    def _listed(self, provider: str, client: AsyncClient, item: dict[str, Any]) -> dict[str, Any]:
        """A key's ``status()`` entry with its provider, source and options
        (those set, not the defaults)."""
        name = item["alias"]
        spec = client.driver.pool.key_spec(name)
        options = {}
        if spec is not None:
            options = {
                field.name: getattr(spec, field.name)
                for field in _SPEC_FIELDS
                if getattr(spec, field.name) != field.default
            }
        source = self.sources.get(name, "api")
        return {**item, "provider": provider, "source": source, "options": options}

    def secret_of(self, alias: str) -> str | None:
        """The secret of the key ``alias`` (None: no such key). Never shown:
        for the shared key records, which say whether a key was replaced."""
        for client in self._clients.values():
            secret = client.driver.secrets.get(alias)
            if secret is not None:
                return secret
        return None

    def _owner(self, alias: str) -> AsyncClient:
        """The client whose pool has the key ``alias`` (404 when none has)."""
        for client in self._clients.values():
            if alias in client.driver.secrets:
                return client
        raise AdminError(404, f"no key with alias {alias!r}")

    def _entry(self, alias: str) -> dict[str, Any]:
        found = self.list_keys(alias)
        if found:
            return found[0]
        raise AdminError(404, f"no key with alias {alias!r}")

    # ------------------------------------------------------------- changes

    async def _add(self, request: Request) -> Response:
        body = _json_object(request.body)
        unknown = sorted(set(body) - set(KEY_OPTIONS))
        if unknown:
            raise AdminError(
                400, f"unknown field(s) {', '.join(unknown)}; fields are {', '.join(KEY_OPTIONS)}"
            )
        secret = body.get("key")
        if not isinstance(secret, str) or not secret.strip():
            raise AdminError(400, 'field "key" (the API key) is required and must be a string')
        secret = secret.strip()
        if not (secret.isascii() and secret.isprintable()) or " " in secret:
            raise AdminError(400, 'field "key" has whitespace or characters no API key has')
        alias = body.get("alias")
        if alias is None:  # a stable name that reveals nothing of the key
            alias = "key-" + hashlib.sha256(secret.encode()).hexdigest()[:8]
        if not isinstance(alias, str):
            raise AdminError(400, "alias must be a string")
        pooled = (c.driver.secrets.values() for c in self._clients.values())
        if alias == secret or any(alias in known for known in pooled) or self._is_token(alias):
            # (an alias is shown to every client token: /status, /metrics, logs)
            raise AdminError(
                400, "alias is a secret or a token: give the key a name that reveals nothing"
            )
        provider = body.get("provider") or MAIN_PROVIDER
        if not isinstance(provider, str) or provider not in self._clients:
            known = ", ".join(self._clients)
            raise AdminError(400, f"provider {provider!r} is not configured (known: {known})")
        spec = {name: body[name] for name in _SPEC_OPTIONS if body.get(name) is not None}
        for name, value in spec.items():
            if name == "account":
                ok = isinstance(value, str) and storable(value)
            elif name == "max_in_flight":
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = finite(value)
            if not ok:
                kind = {"account": "a string", "max_in_flight": "an integer"}.get(name, "a number")
                raise AdminError(400, f"{name} must be {kind}")
        try:
            KeySpec(key_id=alias, **spec)  # the options' own checks
        except PoolError as exc:
            raise AdminError(400, _safe(str(exc), secret)) from None
        stored = await self.add_key(provider, alias, secret, spec)
        if self.on_added is not None and provider == MAIN_PROVIDER:
            self.on_added(alias, secret, spec)
        return _answer(201, {**self._entry(alias), "stored": stored})

    async def add_key(
        self,
        provider: str,
        alias: str,
        secret: str,
        spec: Mapping[str, Any],
        via: str = "admin",
    ) -> bool:
        """Add a checked key to ``provider``'s pool and the state file (``via``:
        ``admin``, or ``shared`` when another process of the pool added it).
        Whether the state file keeps it; ``AdminError`` when refused."""
        client = self._clients[provider]
        # Shielded: a caller who leaves must not cut a change between the
        # state file and the pool in half.
        with anyio.CancelScope(shield=True):
            async with self._lock:
                # Everything the pool would refuse, refused before anything is stored.
                for other in self._clients.values():
                    if other is not client and alias in other.driver.secrets:
                        raise AdminError(409, f"alias {alias!r} is used by another provider's key")
                self._call(client.driver.check_new_key, alias, secret)
                stored_spec = spec if provider == MAIN_PROVIDER else {**spec, "provider": provider}
                stored = False
                if self._store is not None:
                    from ..storage import AlreadyStored, SecretsLocked, StorageError

                    try:  # stored first: a refused key (409) changes nothing in the file
                        await anyio.to_thread.run_sync(
                            self._store.add_key, alias, secret, stored_spec
                        )
                    except (SecretsLocked, AlreadyStored) as exc:
                        raise AdminError(409, str(exc)) from None
                    except StorageError as exc:
                        raise AdminError(503, str(exc)) from None
                    stored = True
                    try:  # a reused alias: the new key inherits none of the old one's record
                        await anyio.to_thread.run_sync(self._store.bind, {alias: secret})
                    except StorageError as exc:
                        await anyio.to_thread.run_sync(self._store.remove_key, alias)
                        raise AdminError(503, str(exc)) from None
                try:
                    self._call(client.add_key, alias, secret, **spec)
                except AdminError:
                    if stored:
                        assert self._store is not None
                        await anyio.to_thread.run_sync(self._store.remove_key, alias)
                    raise
                self.sources[alias] = "api"
                self.on_change()
        self._log(
            {
                "event": "admin",
                "action": "add",
                "key": alias,
                "provider": provider,
                "stored": stored,
                **({"via": via} if via != "admin" else {}),
            }
        )
        return stored

    async def _remove(self, alias: str) -> Response:
        try:
            entry, source, stored = await self.remove_key(alias)
        except AdminError as exc:
            if exc.status != 404 or not await self._unstore_skipped(alias):
                raise
            # A stored key the start skipped (its provider gone, its weight over the
            # cap, its alias or secret configured now): in no pool, but in the file.
            return _answer(
                200,
                {
                    "alias": alias,
                    "removed": True,
                    "in_flight": 0,
                    "unstored": True,
                    "returns_at_restart": False,
                },
            )
        if self.on_removed is not None and entry["provider"] == MAIN_PROVIDER:
            self.on_removed(alias)
        return _answer(
            200,
            {
                "alias": alias,
                "removed": True,
                "in_flight": entry["in_flight"],  # they finish; no new ones start
                "unstored": stored,
                "returns_at_restart": source != "api",
            },
        )

    async def remove_key(self, alias: str, via: str = "admin") -> tuple[dict[str, Any], str, bool]:
        """Remove a key from its pool and the state file (``via`` as for
        ``add_key``): its entry before, where it came from, whether the file
        forgot it. ``AdminError`` when there is no such key."""
        with anyio.CancelScope(shield=True):
            async with self._lock:
                entry = self._entry(alias)
                if entry["removing"]:
                    raise AdminError(404, f"key {alias!r} is already removed")
                source = self.sources.get(alias, "api")
                stored = False
                if self._store is not None and source == "api":  # the file first
                    from ..storage import StorageError

                    try:
                        stored = await anyio.to_thread.run_sync(self._store.remove_key, alias)
                    except StorageError as exc:
                        raise AdminError(503, f"{exc}; the key stays in the pool") from None
                self._call(self._owner(alias).remove_key, alias)
                self.on_change()
        self._log(
            {"event": "admin", "action": "remove", "key": alias}
            | ({"via": via} if via != "admin" else {})
        )
        return entry, source, stored

    async def _unstore_skipped(self, alias: str) -> bool:
        """Forget ``alias`` in the state file when it is stored there but in no
        pool (the start skipped it); whether it was."""
        if self._store is None:
            return False
        from ..storage import StorageError

        with anyio.CancelScope(shield=True):
            async with self._lock:
                if any(alias in client.driver.secrets for client in self._clients.values()):
                    return False
                try:
                    removed = await anyio.to_thread.run_sync(self._store.remove_key, alias)
                except StorageError as exc:
                    raise AdminError(503, str(exc)) from None
        if removed:
            self._log({"event": "admin", "action": "remove", "key": alias, "stored_only": True})
        return bool(removed)

    async def _mark(self, alias: str, body: dict[str, Any]) -> Response:
        state = body.get("state")
        if state == "enabled":
            state = "healthy"
        if state not in _MARKABLE:
            raise AdminError(400, f"state must be one of {', '.join(_MARKABLE)}")
        duration = body.get("duration")
        if duration is not None and (not finite(duration) or not 0 < duration < _LONGEST):
            raise AdminError(400, "duration must be a number of seconds more than zero")
        if state in ("rate_limited", "degraded") and duration is None:
            raise AdminError(400, f"marking a key {state} needs a duration in seconds")
        if self._entry(alias)["removing"]:
            raise AdminError(404, f"key {alias!r} is removed")
        self._call(self._owner(alias).mark_key, alias, KeyState(state), duration=duration)
        self.on_change()
        stored = False
        if self._store is not None:  # committed before the answer, like every admin change
            with anyio.CancelScope(shield=True):
                stored = await anyio.to_thread.run_sync(self._store.flush)
        self._log({"event": "admin", "action": "mark", "key": alias, "state": state})
        return _answer(200, {**self._entry(alias), "stored": stored})

    @staticmethod
    def _call(method: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        """A client call, its refusal as a 4xx answer."""
        try:
            method(*args, **kwargs)
        except ConfigurationError as exc:  # unknown aliases are answered 404 before this
            raise AdminError(409, str(exc)) from None
        except PoolError as exc:
            raise AdminError(409, str(exc)) from None


def _answer(status: int, payload: Any) -> Response:
    return Response(status=status, headers=[_JSON], body=json.dumps(payload).encode())


def _json_object(body: bytes, allow_empty: bool = False) -> dict[str, Any]:
    if allow_empty and not body.strip():
        return {}
    try:
        value = parse(body)
    except ValueError:
        raise AdminError(400, "the body must be a JSON object") from None
    if not isinstance(value, dict):
        raise AdminError(400, "the body must be a JSON object")
    return value


def _safe(message: str, secret: str) -> str:
    return message.replace(secret, "<the key>") if secret else message


_LONGEST = 10 * 365 * 86400.0
"""The longest a key may be marked for (ten years: a longer time is a mistake)."""
