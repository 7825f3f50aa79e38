"""The upstreams' model catalogs, kept by the proxy: ``/v1/models`` without an upstream call.

``CatalogService`` keeps one provider's catalog: the state file's at start
(so a restart answers at once), then the one it fetches (``GET /models``,
with ``If-None-Match`` when the upstream sent an ``ETag``) at start and every
``refresh`` seconds. OpenRouter's ``/models`` is public, so no key is used for
it; an OpenAI-compatible provider's is fetched through its pool, with a key,
and its models have prices only if the upstream lists them. A fetch that
fails, or brings a document that is no catalog, keeps the catalog it had and
says why in ``/status``; a good one replaces it and is written to the state file.

``Catalogs`` merges the main upstream's catalog with the ``[[providers]]``'
under the names requests use for their models (``Routes``): a provider's
model is ``provider/model``, or its bare id when the provider claims it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import attrs

from ...models import Catalog, CatalogError, ModelInfo, parse_catalog
from ...transports.api import AsyncClient
from ...transports.errors import KeyrotorError

if TYPE_CHECKING:
    from ..storage import StateStore
    from .providers import Routes

__all__ = ["CatalogService", "Catalogs"]

READY_WAIT = 10.0
"""How long a ``/v1/models`` request waits for a first catalog (a fetch in
progress, or its own) before it is answered 503."""


class CatalogService:
    """The proxy's catalog of ``provider``'s models (see the module's docstring).

    ``log`` receives ``catalog`` events (``refreshed``, ``unchanged``,
    ``failed``, ``restored``) as JSON-able dicts."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        refresh: float,
        store: StateStore | None = None,
        log: Callable[[dict[str, Any]], None] = lambda event: None,
        clock: Callable[[], float] = time.time,
        provider: str = "openrouter",
        public: bool = True,
        stored_as: str | None = None,
    ) -> None:
        self._client = client
        self._public = public  # OpenRouter's: fetched with no key, every model priced
        self._refresh = refresh
        self._store = store
        self._log = log
        self._clock = clock
        self.provider = provider
        self._stored_as = stored_as or provider  # its row in the state file's catalogs
        self.catalog: Catalog | None = None
        self.source: str | None = None  # "state file" or "upstream"
        self.last_error: str | None = None
        self.last_attempt: float | None = None
        self._lock = anyio.Lock()
        self._encoded: tuple[Catalog, bytes, dict[str, bytes]] | None = None

    # ------------------------------------------------------------ loading

    def restore(self) -> None:
        """Serve the state file's catalog until a fetch brings a newer one."""
        if self._store is None:
            return
        stored = self._store.catalogs().get(self._stored_as)
        if stored is None:
            return
        try:
            catalog = parse_catalog(
                stored.document,
                self.provider,
                priced=self._public,
                etag=stored.etag,
                fetched_at=stored.fetched_at,
            )
        except CatalogError as exc:
            self._log({"event": "catalog", "outcome": "unreadable", "error": str(exc)})
            return
        self.catalog, self.source = catalog, "state file"
        self._encode(catalog)
        self._log({"event": "catalog", "outcome": "restored", "models": len(catalog)})

    async def refresh(self) -> bool:
        """Fetch the catalog now (one fetch at a time); whether it is current."""
        async with self._lock:
            return await self._fetch()

    async def _fetch(self) -> bool:
        now = self.last_attempt = self._clock()
        old = self.catalog
        headers = {"If-None-Match": old.etag} if old is not None and old.etag else None
        try:
            if self._public:  # no key is spent on it
                response = await self._client.get_public("/models", headers=headers)
            else:  # a key of the provider's pool, with failover
                response = await self._client.request("GET", "/models", headers=headers)
        except KeyrotorError as exc:
            return self._failed(f"no answer from the upstream: {exc}")
        if response.status_code == 304 and old is not None:
            self.catalog = attrs.evolve(old, fetched_at=now)
            self.last_error = None
            self._log({"event": "catalog", "outcome": "unchanged", "models": len(old)})
            return True
        if response.status_code != 200:
            return self._failed(f"the upstream answered {response.status_code} to GET /models")
        try:
            catalog = parse_catalog(
                response.content,
                self.provider,
                priced=self._public,
                etag=response.headers.get("etag"),
                fetched_at=now,
            )
        except CatalogError as exc:
            return self._failed(str(exc))
        if not catalog.models:
            return self._failed("the upstream's catalog has no model that parses")
        self.catalog, self.source, self.last_error = catalog, "upstream", None
        self._encode(catalog)  # here, not on the first /v1/models after it
        if self._store is not None:
            try:
                self._store.save_catalog(self._stored_as, catalog.to_json(), catalog.etag, now)
            except Exception as exc:  # the catalog still serves; the file is the operator's
                self._log({"event": "warning", "message": f"catalog not stored: {exc}"})
        self._log(
            {
                "event": "catalog",
                "outcome": "refreshed",
                "models": len(catalog),
                "problems": list(catalog.problems[:5]),
            }
        )
        return True

    def _failed(self, why: str) -> bool:
        self.last_error = why
        kept = "none" if self.catalog is None else f"{len(self.catalog)} models kept"
        self._log({"event": "catalog", "outcome": "failed", "error": why, "kept": kept})
        return False

    async def run(self) -> None:
        """Fetch now, then every ``refresh`` seconds, for as long as it runs."""
        while True:
            await self.refresh()
            await anyio.sleep(self._refresh)

    async def ready(self) -> Catalog | None:
        """The catalog, fetched first if there is none yet (None: still none
        after waiting at most ``READY_WAIT`` seconds for a fetch)."""
        if self.catalog is None:
            with anyio.move_on_after(READY_WAIT):
                async with self._lock:
                    if self.catalog is None:
                        await self._fetch()
        return self.catalog

    # ------------------------------------------------------------ answers

    def models_body(self, catalog: Catalog) -> bytes:
        """``GET /v1/models``: OpenAI's list shape, OpenRouter's fields kept."""
        return self._encode(catalog)[1]

    def model_body(self, catalog: Catalog, model_id: str) -> bytes | None:
        """``GET /v1/models/{id}`` (None: no such model)."""
        return self._encode(catalog)[2].get(model_id)

    def _encode(self, catalog: Catalog) -> tuple[Catalog, bytes, dict[str, bytes]]:
        encoded = self._encoded
        if encoded is None or encoded[0] is not catalog:
            entries = [_openai_shape(model.raw) for model in catalog.models]
            encoded = self._encoded = (catalog, *_bodies(entries))
        return encoded

    def status(self) -> dict[str, Any]:
        """The catalog in ``/status``."""
        catalog = self.catalog
        return {
            "provider": self.provider,
            "models": 0 if catalog is None else len(catalog),
            "source": self.source,
            "fetchedAt": None if catalog is None else catalog.fetched_at,
            "lastAttempt": self.last_attempt,
            "lastError": self.last_error,
            "problems": [] if catalog is None else list(catalog.problems),
            "refreshInterval": self._refresh,
        }


def _bodies(entries: list[dict[str, Any]]) -> tuple[bytes, dict[str, bytes]]:
    """The ``/v1/models`` answer for ``entries``, and each entry's own by id."""
    whole = json.dumps({"object": "list", "data": entries}).encode()
    return whole, {entry["id"]: json.dumps(entry).encode() for entry in entries}


def _openai_shape(raw: Any) -> dict[str, Any]:
    """An upstream model entry with OpenAI's ``object`` and ``owned_by`` added."""
    entry = dict(raw)
    entry.setdefault("object", "model")
    entry.setdefault("owned_by", str(entry["id"]).split("/", 1)[0])
    if not isinstance(entry.get("created"), int):
        entry["created"] = 0
    return entry


class Catalogs:
    """The main upstream's catalog and the providers', as requests name models.

    ``providers``: a ``CatalogService`` per ``[[providers]]`` name; ``routes``
    (with them) says which upstream a model name goes to, so a main-catalog
    model whose name goes to a provider (``openai/...`` with a provider
    called ``openai``) is left out: the provider's own entry stands for it."""

    def __init__(
        self,
        main: CatalogService,
        providers: Mapping[str, CatalogService] | None = None,
        routes: Routes | None = None,
    ) -> None:
        self.main = main
        self.providers = dict(providers or {})
        self._routes = routes
        self._merged: tuple[tuple[Catalog | None, ...], bytes, dict[str, bytes]] | None = None
        # (the catalogs it was merged from, the merged one): kept, not their
        # id()s, which a later catalog may reuse once one is freed
        self._one: tuple[tuple[Catalog | None, ...], Catalog] | None = None

    def services(self) -> list[CatalogService]:
        return [self.main, *self.providers.values()]

    async def run(self) -> None:
        """Keep every catalog fresh, for as long as it runs."""
        async with anyio.create_task_group() as tasks:
            for service in self.services():
                tasks.start_soon(service.run)

    async def ready(self) -> bool:
        """Whether the main catalog is there (fetched first if need be; the
        providers' serve what they have)."""
        return await self.main.ready() is not None

    def get(self, model: str) -> ModelInfo | None:
        """The model a request naming ``model`` would reach, if a catalog lists it."""
        routed = None if self._routes is None else self._routes.route(model)
        if routed is not None:
            catalog = self.providers[routed[0]].catalog if routed[0] in self.providers else None
            return None if catalog is None else catalog.get(routed[1])
        catalog = self.main.catalog
        return None if catalog is None else catalog.get(model)

    def merged(self) -> Catalog | None:
        """Every model a request can name, as one catalog under those names
        (the router chooses from it); None before the main catalog is in.
        Built again only when a catalog was replaced."""
        main = self.main.catalog
        if main is None:
            return None
        if not self.providers:
            return main
        sources = tuple(s.catalog for s in self.services())
        one = self._one
        if one is not None and _same(one[0], sources):
            return one[1]
        routes = self._routes
        models = [m for m in main.models if routes is None or routes.route(m.id) is None]
        for name, service in self.providers.items():
            catalog = service.catalog
            for model in () if catalog is None else catalog.models:
                claimed = routes is not None and routes.claimed.get(model.id) == name
                models.append(model if claimed else attrs.evolve(model, id=f"{name}/{model.id}"))
        merged = Catalog("merged", tuple(models), fetched_at=main.fetched_at)
        self._one = (sources, merged)
        return merged

    def models_body(self) -> bytes:
        """``GET /v1/models``: every model a request can name."""
        return self._encode()[1]

    def model_body(self, model_id: str) -> bytes | None:
        """``GET /v1/models/{id}`` (None: no such model)."""
        return self._encode()[2].get(model_id)

    def _encode(self) -> tuple[tuple[Catalog | None, ...], bytes, dict[str, bytes]]:
        main = self.main.catalog
        if not self.providers and main is not None:  # one upstream: its own cache
            whole, one = self.main._encode(main)[1:]
            return (), whole, one
        sources = tuple(s.catalog for s in self.services())
        merged = self._merged
        if merged is not None and _same(merged[0], sources):
            return merged
        entries = []
        routes = self._routes
        for model in () if main is None else main.models:
            if routes is None or routes.route(model.id) is None:
                entries.append(_openai_shape(model.raw))
        for name, service in self.providers.items():
            catalog = service.catalog
            for model in () if catalog is None else catalog.models:
                entry = _openai_shape(model.raw)
                claimed = routes is not None and routes.claimed.get(model.id) == name
                entry["id"] = model.id if claimed else f"{name}/{model.id}"
                entry["keyrotor_provider"] = name
                entries.append(entry)
        self._merged = (sources, *_bodies(entries))
        return self._merged

    def status(self) -> dict[str, Any]:
        """The main catalog in ``/status`` (as before), with the providers' under ``providers``."""
        status = self.main.status()
        if self.providers:
            status["providers"] = {name: s.status() for name, s in self.providers.items()}
        return status


def _same(kept: tuple[Catalog | None, ...], now: tuple[Catalog | None, ...]) -> bool:
    """Whether ``now`` holds the very catalogs of ``kept`` (not equal ones:
    the same objects, so that nothing changed since)."""
    return len(kept) == len(now) and all(a is b for a, b in zip(kept, now, strict=True))
