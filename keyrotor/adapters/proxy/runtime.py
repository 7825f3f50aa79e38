"""One running proxy: the state file, the pool's client and the application.

``open_app`` is shared by the h11 server (``main.py``) and the ASGI front: it
opens the state file, starts the pool on the configured keys plus the stored
ones, puts back what the file remembers (health states with their
until-times, the spend of the running budget windows), records every state
change, every finished request's spend and every budget window it opens while
serving, and builds ``ProxyApp`` with its tokens and the admin API. On exit
the state file is flushed and closed.

Clocks: the core runs on the monotonic clock, the file on wall-clock Unix
time. A stored until-time ``u`` becomes ``mono_now + (u - wall_now)``, and
back the same way.
"""

from __future__ import annotations

import calendar
import contextlib
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import attrs

from ...core import KeySpec, KeyState, KeyStateChanged, PoolConfig, SpendRecorded
from ...core.config import AFFINITY_POINTS_MAX
from ...models import pricer
from ...models.routing import route_from_json
from ...transports.api import AsyncClient, Driver, StreamAccountant
from ..config import ConfigError, Provider, ProxyConfig, probe_path_for
from ..shared import SharedState
from ..shared_keys import SharedKeys
from ..shared_limits import SharedLimits
from ..shared_pool import ProcessBoard, SharedModels
from ..shared_spend import SharedSpend
from ..storage import PROVIDER_CATALOG, day_start
from .admin import Admin
from .app import ProxyApp
from .auth import Auth
from .catalog import Catalogs, CatalogService
from .model_health import ModelHealth
from .providers import Routes, top_model
from .router import Router
from .spend import SpendBook
from .views import Views

if TYPE_CHECKING:
    from ..storage import Loaded, StateStore

__all__ = ["Startup", "open_app", "open_store", "plan", "record", "restore"]

Log = Callable[[dict[str, Any]], None]
_COOLING = frozenset({KeyState.RATE_LIMITED, KeyState.DEGRADED})
_DAY = 86_400.0
_ENV_ALIAS = re.compile(r"^env\d+$")  # the loader's names for the environment's keys
_KEPT = frozenset({KeyState.DEPLETED, KeyState.FAILED, KeyState.DISABLED, *_COOLING})


def open_store(config: ProxyConfig, log: Log) -> StateStore | None:
    """The state file of ``config`` (None with ``--no-state``), flushed by
    ``open_app``'s event loop, or by its own thread (``[state] flush_in``).
    Raises ``StorageError`` when it cannot be used."""
    if config.state_path is None:
        return None
    from ..storage import StateStore

    return StateStore.open(
        config.state_path,
        secret_key=config.secret_key,
        flush_interval=config.state_flush,
        log=lambda message: log({"event": "storage", "message": message}),
        flush_in_thread=config.state_flush_in == "thread",
    )


async def _flush_every(store: StateStore, interval: float) -> None:
    """Commit the state file's records from the event loop (no writer thread
    contending with the request path for the GIL), ``interval`` after the first
    of them. With nothing pending it sleeps until a record comes (an idle proxy
    does not wake ten times a second for it), or ``IDLE_LOOK`` at most: a record
    made on another thread cannot wake it, and is written within that."""
    loop_thread = threading.get_ident()
    ready = anyio.Event()

    def wake() -> None:  # under the store's lock: must not block
        if threading.get_ident() == loop_thread:
            ready.set()

    store.on_pending(wake)
    try:
        while True:
            while not store.pending():
                with anyio.move_on_after(IDLE_LOOK):
                    await ready.wait()
                ready = anyio.Event()
            await anyio.sleep(interval)
            store.flush_nowait()
    finally:
        store.on_pending(None)


IDLE_LOOK = 1.0
"""Seconds the state file's flusher sleeps at most while nothing is pending."""


@attrs.frozen
class Startup:
    """The keys to start with: secrets, the pool's config, where each came from."""

    keys: dict[str, str] = attrs.field(repr=False)  # secrets
    pool: PoolConfig
    sources: dict[str, str]
    loaded: Loaded | None
    # Keys added through the admin API to a [[providers]] upstream: name -> alias -> (secret, spec).
    provider_keys: dict[str, dict[str, tuple[str, KeySpec]]] = attrs.field(factory=dict, repr=False)


def plan(config: ProxyConfig, store: StateStore | None, log: Log) -> Startup:
    """The configured keys plus the stored ones (a stored key whose alias or
    secret the configuration also has is skipped, with a warning)."""
    keys = dict(config.keys)
    sources = {a: "environment" if _ENV_ALIAS.match(a) else "config" for a in keys}
    specs = list(config.pool.keys)
    providers = {p.name: p for p in config.providers}
    every = {**keys, **{a: s for p in config.providers for a, s in p.keys.items()}}
    sources.update((a, "config") for p in config.providers for a in p.keys)
    provider_keys: dict[str, dict[str, tuple[str, KeySpec]]] = {}
    loaded = store.load() if store is not None else None
    for stored in loaded.keys if loaded is not None else ():
        options = dict(stored.spec)
        provider = options.pop("provider", None)
        if provider is not None and provider not in providers:
            log(
                {
                    "event": "warning",
                    "message": f"stored key {stored.alias!r} belongs to provider {provider!r}, "
                    "which is not configured: not loaded (it stays in the state file)",
                }
            )
            continue
        if stored.alias in every or stored.secret in every.values():
            log(
                {
                    "event": "warning",
                    "message": f"stored key {stored.alias!r} is also configured; using the "
                    "configured one",
                }
            )
            continue
        try:
            spec = KeySpec(key_id=stored.alias, **options)
            points = config.pool.affinity_vnodes * spec.weight
            if points > AFFINITY_POINTS_MAX:  # stored before the cap: skipped, not fatal
                raise ValueError(
                    f"its weight gives {points:,.0f} points on the hash ring, more than "
                    f"{AFFINITY_POINTS_MAX:,}; add it again with a lower weight"
                )
        except (TypeError, ValueError) as exc:
            log({"event": "warning", "message": f"stored key {stored.alias!r} skipped: {exc}"})
            continue
        if provider is None:
            specs.append(spec)
            keys[stored.alias] = stored.secret
        else:
            provider_keys.setdefault(provider, {})[stored.alias] = (stored.secret, spec)
        every[stored.alias] = stored.secret
        sources[stored.alias] = "api"
    if store is not None and loaded is not None:
        moved = store.bind(every)
        for alias in moved:
            log(
                {
                    "event": "warning",
                    "message": f"key {alias!r} names another key than before: its stored state "
                    "and spend are not carried over (the history is kept under "
                    f"{alias}~<8 hex digits>)",
                }
            )
        if moved:
            loaded = attrs.evolve(
                loaded,
                states={a: s for a, s in loaded.states.items() if a not in moved},
                ledger=[row for row in loaded.ledger if row.alias not in moved],
                windows={a: start for a, start in loaded.windows.items() if a not in moved},
            )
    if not keys and not config.admin_token:
        skipped = (
            f" ({len(loaded.skipped)} stored key(s) need KEYROTOR_SECRET_KEY)"
            if (loaded is not None and loaded.skipped)
            else ""
        )
        raise ConfigError(
            f"no API keys{skipped}: add [[keys]] to a --config file, set OPENROUTER_KEYS, or set "
            "KEYROTOR_ADMIN_TOKEN to start empty and add keys with `keyrotor keys add`"
        )
    return Startup(keys, attrs.evolve(config.pool, keys=specs), sources, loaded, provider_keys)


def restore(driver: Driver, loaded: Loaded, wall_now: float | None = None) -> dict[str, float]:
    """Put back the stored health states and spend (call before serving);
    returns when each budget window running now opened (wall clock), for ``record``.

    Spend counts again toward budgets and credits as far as it falls in the
    key's running budget window, or (no window) today, UTC: older spend is
    history; a budget without a window (the key's life) counts every day. A
    key depleted earlier stays so through its restored state.

    A day's ledger row has no times. When the file knows when the running
    window opened (``Loaded.windows``, or a used-up window's stored depletion,
    which wins), each day from then on counts as spent at that start or at the
    day's beginning, whichever is later: the window opens and ends when it did
    before the restart, and days before it are an earlier window's. The spend
    of its first day made before it opened counts in it too (the ledger cannot
    split a day): that errs toward spending less, never more. Without a known
    start (or one whose window is over), a day counts as spent at its end (or
    now), so that all of it stays in a window the day overlaps.
    """
    wall = driver.wall_clock() if wall_now is None else wall_now
    offset = driver.now() - wall  # wall-clock time + offset = the pool's clock
    present = set(driver.pool.key_ids())
    for alias, saved in sorted(loaded.states.items()):
        state = KeyState(saved.state)
        if alias not in present or state not in _KEPT:
            continue
        now = driver.now()
        left = None if saved.until is None else saved.until + offset - now
        if (left is not None and left <= 0) or (left is None and state in _COOLING):
            continue  # its time is up: it starts healthy
        driver.mark_key(alias, state, left, "restored")
    specs = driver.pool.config.keys
    windows = {spec.key_id: spec.budget_window for spec in specs}
    budgeted = {s.key_id: w for s in specs if (w := _window(s)) is not None}
    # When each running window opened, which a day's row (no times) cannot tell:
    # the start the file keeps, or the depletion's stored end of a used-up one.
    opened = {
        alias: start
        for alias, start in loaded.windows.items()
        if (window := budgeted.get(alias)) is not None and start + window > wall
    }
    opened.update(
        (alias, saved.until - window)
        for alias, saved in loaded.states.items()
        if saved.state == KeyState.DEPLETED.value
        and saved.reason == "budget"
        and saved.until is not None
        and saved.until > wall
        and (window := windows.get(alias)) is not None
    )
    started: dict[str, float] = {}
    # A budget without a window is the key's life: every day of the ledger counts.
    lifetime = {s.key_id for s in specs if s.budget is not None and s.budget_window is None}
    today = calendar.timegm((*time.gmtime(wall)[:3], 0, 0, 0))
    for row in loaded.ledger:
        if row.alias not in present or not (row.cost or row.prompt_tokens or row.completion_tokens):
            continue
        start = day_start(row.day)
        window = windows.get(row.alias)
        if window is None:
            if start < today and row.alias not in lifetime:
                continue  # spent before today: history
        elif start + _DAY <= wall - window:
            continue  # spent before the running window: history
        first = opened.get(row.alias)
        if first is not None and start + _DAY <= first:
            continue  # spent before the running window opened: an earlier window's
        # A day's row has no times: taken as spent when the window opened (or the day
        # began, if later), else at the day's end (or now), so that all of it counts
        # while the day overlaps the window (never less than was spent).
        spent = start + _DAY - 1.0 if first is None else max(start, first)
        at, length = min(spent, wall), budgeted.get(row.alias)
        if length is not None and row.cost > 0 and at + length > wall:
            started.setdefault(row.alias, at)  # the pool's window opens then
        now = driver.now()
        driver.feed(
            SpendRecorded(
                now=now,
                key_id=row.alias,
                cost=row.cost,
                prompt_tokens=row.prompt_tokens,
                completion_tokens=row.completion_tokens,
                at=min(spent + offset, now),
            )
        )
    return started


def _window(spec: KeySpec) -> float | None:
    """The key's budget window, if its budget has one (the core ignores one without a budget)."""
    return spec.budget_window if spec.budget is not None else None


class _Windows:
    """When each key's budget window opened (wall clock), mirrored from the
    answers this process pays for, as the core counts them (``_spend``): a paid
    answer opens a window when none runs. A key removed or added again (another
    secret object in ``driver.secrets``) starts afresh, as it does in the core."""

    __slots__ = ("_driver", "_keys", "starts")

    def __init__(self, driver: Driver, starts: Mapping[str, float]) -> None:
        self._driver = driver
        secrets = driver.secrets
        self._keys = {  # alias -> (its secret, its budget window)
            alias: (secrets.get(alias), _window(spec))
            for alias, spec in driver.pool.key_specs().items()
        }
        self.starts = dict(starts)

    def paid(self, key_id: str, wall: float) -> float | None:
        """An answer of ``key_id`` cost something at ``wall``: the start of the
        window this opens (None: it opens none)."""
        secret = self._driver.secrets.get(key_id)
        known = self._keys.get(key_id)
        if known is None or known[0] is not secret:  # added, removed or added again
            self.starts.pop(key_id, None)
            spec = self._driver.pool.key_specs().get(key_id)
            known = self._keys[key_id] = (secret, None if spec is None else _window(spec))
        window = known[1]
        if window is None:
            return None
        start = self.starts.get(key_id)
        if start is not None and wall < start + window:
            return None  # the running window
        self.starts[key_id] = wall
        return wall


def _state_logger(log: Log, provider: str) -> Callable[[KeyStateChanged], None]:
    """Logs a provider's key state changes, naming the provider."""

    def logged(change: KeyStateChanged) -> None:
        log({"event": "key_state", "provider": provider, **change.to_json()})

    return logged


def record(driver: Driver, store: StateStore, windows: Mapping[str, float] | None = None) -> None:
    """Write every state change, every finished request's spend and the start of
    every budget window it opens to ``store``. ``windows``: when each window
    running now opened (``restore``'s answer), written again so that the file
    keeps a start ``restore`` inferred from days' rows."""
    mirror = _Windows(driver, windows or {})
    for alias, start in mirror.starts.items():
        store.record_window(alias, start)

    def state_changed(change: KeyStateChanged) -> None:
        wall = driver.wall_clock()
        until = None if change.until is None else wall + (change.until - change.now)
        store.record_state(change.key_id, change.new.value, until, change.reason)

    def finished(key_id: str, usage: StreamAccountant) -> None:
        cost = usage.cost
        store.record_spend(
            key_id,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cost=cost,
        )
        if cost > 0 and (start := mirror.paid(key_id, driver.wall_clock())) is not None:
            store.record_window(key_id, start)

    driver.on_state_change.append(state_changed)
    driver.on_finished.append(finished)


@contextlib.asynccontextmanager
async def open_app(
    config: ProxyConfig,
    log: Log,
    store: StateStore | None = None,
    startup: Startup | None = None,
) -> AsyncIterator[ProxyApp]:
    """The application serving ``config`` for the block's duration.

    ``store``: an already open state file (closed here at the end); None opens
    the one ``config`` names, if any. ``startup``: ``plan``'s answer, if known.
    """
    if store is None:
        store = open_store(config, log)
    try:
        if startup is None:
            startup = plan(config, store, log)
        async with AsyncClient(
            startup.keys,
            config.upstream,
            startup.pool,
            http=config.http,
            headers=config.headers,
            probe_path=probe_path_for(config.probe_path, config.upstream),
        ) as client:
            driver = client.driver
            # The recorder's and the price hook's problems, as warnings.
            driver.on_recording_error = lambda message: log(
                {"event": "warning", "message": message}
            )
            if config.record is not None:
                client.record(config.record, source="proxy")
            driver.on_state_change.append(
                lambda change: log({"event": "key_state", **change.to_json()})
            )
            opened = {} if startup.loaded is None else restore(driver, startup.loaded)
            if store is not None:
                record(driver, store, opened)
            names = config.client_names
            auth = Auth(config.client_tokens, config.admin_token, config.token_ttl, names=names)
            spend = SpendBook(config.budgets, store)
            if startup.loaded is not None:
                spend.restore(startup.loaded.usage)
            main_catalog = _catalog(config, client, store, log)
            provider_catalogs: dict[str, CatalogService] = {}
            async with contextlib.AsyncExitStack() as stack:
                routes = None
                if config.providers:
                    clients = {}
                    for provider in config.providers:
                        added = startup.provider_keys.get(provider.name, {})
                        pool = attrs.evolve(
                            provider.pool,
                            keys=[*provider.pool.keys, *(spec for _, spec in added.values())],
                        )
                        secrets = {**provider.keys, **{a: s for a, (s, _) in added.items()}}
                        other = await stack.enter_async_context(
                            AsyncClient(
                                secrets,
                                provider.upstream,
                                pool,
                                http=config.http,
                                headers=config.headers,
                                probe_path=probe_path_for(
                                    provider.probe_path, provider.upstream, provider.kind
                                ),
                            )
                        )
                        other.driver.on_state_change.append(_state_logger(log, provider.name))
                        loaded = startup.loaded
                        opened = {} if loaded is None else restore(other.driver, loaded)
                        if store is not None:
                            record(other.driver, store, opened)
                        clients[provider.name] = other
                        service = _catalog(config, other, store, log, provider)
                        if service is not None:
                            provider_catalogs[provider.name] = service
                    claimed = {m: p.name for p in config.providers for m in p.models}
                    routes = Routes(clients, claimed)
                catalog = router = None
                if main_catalog is not None:
                    catalog = Catalogs(main_catalog, provider_catalogs, routes)
                    router = Router(
                        config.routes,
                        config.routing,
                        catalog,
                        client,
                        ModelHealth(),
                        store=store,
                        log=log,
                    )
                    if startup.loaded is not None:
                        router.restore(startup.loaded.usage)
                        _restore_routes(router, startup.loaded.routes, log)
                admin = None
                if config.admin_token:
                    others = None if routes is None else routes.clients
                    stored_routes = None if startup.loaded is None else startup.loaded.routes
                    admin = Admin(
                        client,
                        store,
                        startup.sources,
                        log,
                        providers=others,
                        router=router,
                        stored_routes=stored_routes,
                        is_token=auth.is_token,
                    )
                views = Views(
                    client,
                    auth,
                    spend,
                    store=store,
                    router=router,
                    rules=config.alert_rules,
                    webhooks=config.webhooks,
                    interval=config.alert_interval,
                    log=log,
                    providers=None if routes is None else routes.clients,
                )
                if startup.loaded is not None and startup.loaded.alerts is not None:
                    views.restore_rules(startup.loaded.alerts)
                if store is not None:
                    store.retention = config.retention
                driver = client.driver
                driver.on_state_change.append(
                    lambda change: views.hub.key_changed(change, driver.wall_clock())
                )
                shared = None
                if config.shared_url is not None:
                    shared = SharedState(
                        config.shared_url, driver, namespace=config.shared_namespace, log=log
                    )
                    driver.on_state_change.append(shared.state_changed)
                app = ProxyApp(
                    client,
                    routing_note=config.routing_note,
                    auth=auth,
                    admin=admin,
                    store=store,
                    catalog=catalog,
                    reject_unknown_models=config.reject_unknown_models,
                    routes=routes,
                    spend=spend,
                    router=router,
                    views=views,
                    shared=shared,
                )
                views.set_status(app.status_stepped)
                if shared is not None:
                    await _share(shared, config, driver, app, spend, store, router, admin, log)
                async with anyio.create_task_group() as tasks:
                    if catalog is not None:
                        tasks.start_soon(catalog.run)
                    if router is not None:
                        tasks.start_soon(router.run)
                    tasks.start_soon(views.run)
                    if store is not None and not store.flush_in_thread:
                        tasks.start_soon(_flush_every, store, config.state_flush)
                    if shared is not None:
                        tasks.start_soon(shared.run)
                    yield app
                    tasks.cancel_scope.cancel()
    finally:
        if store is not None:
            store.close()


async def _share(
    shared: SharedState,
    config: ProxyConfig,
    driver: Driver,
    app: ProxyApp,
    spend: SpendBook,
    store: StateStore | None,
    router: Router | None,
    admin: Admin | None,
    log: Log,
) -> None:
    """The parts of the state this process shares with the pool's others
    (docs/scaling.md), on ``shared``'s connection; before any request."""
    namespace, origin = config.shared_namespace, shared.origin
    limits = SharedLimits(
        driver.pool.key_specs(), origin=origin, namespace=namespace, lease=config.shared_lease
    )
    driver.gate = limits
    instance = origin.rsplit(":", 1)[-1]
    if store is not None:
        instance = await anyio.to_thread.run_sync(store.instance_id)
    shared.parts += [
        limits,
        SharedSpend(driver, spend, instance=instance, namespace=namespace),
        ProcessBoard(origin, app.summary, namespace=namespace),
    ]
    if router is not None:
        router.shared = limits
        models = SharedModels(router.cooling, origin, namespace=namespace)
        router.on_cool = models.cooled
        shared.parts.append(models)
    if admin is not None:
        shared.parts.append(SharedKeys(admin, origin, namespace=namespace, log=log))


def _restore_routes(router: Router, stored: Mapping[str, Any], log: Log) -> None:
    """The routes set through the admin API before a restart, over the config's."""
    for name, data in stored.items():
        try:
            router.set_route(route_from_json(data))
        except ValueError as exc:
            log({"event": "warning", "message": f"the stored route {name!r} is ignored: {exc}"})


def _catalog(
    config: ProxyConfig,
    client: AsyncClient,
    store: StateStore | None,
    log: Log,
    provider: Provider | None = None,
) -> CatalogService | None:
    """The catalog of the main upstream (or of ``provider``), restored from
    the state file, and its client's price hook for answers without
    ``usage.cost``; None when catalogs are off."""
    if config.catalog_refresh is None:
        return None
    options: dict[str, Any] = {}
    if provider is not None:
        options = {
            "provider": provider.name,
            "public": provider.kind == "openrouter",
            "stored_as": PROVIDER_CATALOG + provider.name,
        }
    service = CatalogService(
        client, refresh=config.catalog_refresh, store=store, log=log, **options
    )
    service.restore()
    client.driver.price = pricer(lambda: service.catalog, top_model)
    return service
