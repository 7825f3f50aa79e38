"""Configuration of ``keyrotor serve``: a TOML file, the environment, command-line overrides.

Precedence, highest first: ``overrides`` (the command line) > the file > the
environment (``OPENROUTER_BASE_URL``) > defaults. Keys are the exception: the
file's ``[[keys]]`` and the environment's keys are united. Every problem is one
``ConfigError`` naming where it is (file, table, option) and the fix; no secret
ever appears in an error or a repr. The reference is docs/configuration.md.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import ipaddress
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit

import attrs

from ..core import POLICIES, KeySpec, PoolConfig, PoolError
from ..core.config import finite, shown
from ..models.routing import FREE_ROUTE, Route, route_from_json
from ..transports.api import (
    OPENROUTER_URL,
    HTTPOptions,
    header_name_ok,
    header_value_ok,
    keys_from_env,
    mask,
    openrouter_like,
    valid_secret,
)
from ..transports.codec import resolve as resolve_parser
from ..transports.errors import ConfigurationError
from .alerts import RULE_FIELDS, Rule, rule_from_json
from .analytics import Retention
from .shared import parse_url
from .storage import default_state_path, secret_key_from_env

__all__ = [
    "KEY_PROBE",
    "LOG_FORMATS",
    "LOOPBACK",
    "MAIN_PROVIDER",
    "MODELS_PROBE",
    "PROVIDER_KINDS",
    "SERVER_DEFAULTS",
    "Budget",
    "ConfigError",
    "Provider",
    "ProxyConfig",
    "RoutingOptions",
    "load_config",
    "probe_path_for",
    "token_name",
    "url_problem",
]

SERVER_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "host": "127.0.0.1",
        "port": 8080,
        "max_header_bytes": 65536,
        "max_body_bytes": 10485760,
        "header_timeout": 10.0,
        "body_timeout": 30.0,
        "idle_timeout": 75.0,
        "request_timeout": 60.0,
        "grace_period": 30.0,
        "max_connections": 10000,
        "max_unproven": 1000,
        "max_unproven_per_address": 64,
        "parser": "auto",
        "gc_threshold": 10000,
    }
)
"""The proxy server's options (its ``ServerOptions`` fields) and their defaults."""
GC_THRESHOLD_MAX: Final = 10_000_000
"""``[server] gc_threshold`` at most (Python's collector takes a C int; far beyond any use)."""
_ZERO_ALLOWED: Final = ("grace_period", "gc_threshold")  # 0: no grace; Python's own collector
_GC_ZERO: Final = ", or 0 for Python's own settings"

LOG_FORMATS = ("json", "text")
STATE_FLUSH_IN = ("loop", "thread")
"""``[state] flush_in``: who commits the state file's batch (docs/operations.md)."""

# Kinds of values: what TOML type an option takes.
_INT = "an integer"
_FLOAT = "a number"
_BOOL = "true or false"
_STR = "a string"
_NEVER = 'a number, or false / "never"'
_STRS = "an array of strings"

_TOP_KINDS = {
    "upstream": _STR,
    "probe_path": _STR,
    "routing_note": _BOOL,
    "log_format": _STR,
    "record": _STR,
}
_PLAIN_TABLES = (
    "server",
    "http",
    "pool",
    "headers",
    "auth",
    "state",
    "catalog",
    "routing",
    "analytics",
    "alerting",
    "shared",
)
"""The tables of options (the others are arrays of tables)."""
_TABLES = (
    *_PLAIN_TABLES,
    "keys",
    "providers",
    "clients",
    "budgets",
    "routes",
    "alerts",
)
_AUTH_KINDS = {"admin_token": _STR, "client_tokens": _STRS, "token_ttl": _FLOAT}
_STATE_KINDS = {"enabled": _BOOL, "path": _STR, "flush_interval": _FLOAT, "flush_in": _STR}
_AUTH_DEFAULTS: Mapping[str, Any] = MappingProxyType({"token_ttl": 3600.0})
_STATE_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {"enabled": True, "flush_interval": 0.1, "flush_in": "loop"}
)
_CATALOG_KINDS = {"enabled": _BOOL, "refresh_interval": _FLOAT, "reject_unknown": _BOOL}
_CATALOG_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {"enabled": True, "refresh_interval": 3600.0}
)
_ROUTING_KINDS = {
    "model_cooldown": _FLOAT,
    "free_per_minute": _INT,
    "free_per_day": _INT,
    "free_wait": _FLOAT,
}
_ANALYTICS_KINDS = {"minute_days": _FLOAT, "hour_days": _FLOAT, "day_days": _FLOAT}
_ALERTING_KINDS = {"webhooks": _STRS, "interval": _FLOAT}
_SHARED_KINDS = {"url": _STR, "namespace": _STR, "lease": _FLOAT}
_MIN_TOKEN = 16
_TOKEN_HELP = "generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def _kind_of(default: Any) -> str:
    """What TOML type an option takes, from its default."""
    return _STR if isinstance(default, str) else _INT if isinstance(default, int) else _FLOAT


_SERVER_KINDS = {name: _kind_of(value) for name, value in SERVER_DEFAULTS.items()}
_HTTP_KINDS = {field.name: _kind_of(field.default) for field in attrs.fields(HTTPOptions)}
_POOL_KINDS = {
    "policy": _STR,
    "weight_by": _STR,
    "seed": _INT,
    "max_attempts": _INT,
    "queue_limit": _INT,
    "queue_timeout": _FLOAT,
    "rate_limit_cooldown": _FLOAT,
    "in_flight_budget_cooldown": _FLOAT,
    "degraded_cooldown": _FLOAT,
    "error_window": _FLOAT,
    "error_min_requests": _INT,
    "error_threshold": _FLOAT,
    "timeout_strikes": _INT,
    "min_healthy": _INT,
    "probe_interval": _FLOAT,
    "recheck_interval": _NEVER,
    "latency_alpha": _FLOAT,
    "latency_explore": _FLOAT,
    "affinity_vnodes": _INT,
}
_KEY_KINDS = {
    "weight": _FLOAT,
    "account": _STR,
    "max_in_flight": _INT,
    "rpm": _FLOAT,
    "tpm": _FLOAT,
    "budget": _FLOAT,
    "budget_window": _FLOAT,
    "credits": _FLOAT,
}
_KEY_OPTIONS = ("alias", "secret", "secret_env", "provider", *_KEY_KINDS)
_PROVIDER_OPTIONS = ("name", "upstream", "kind", "models", "probe_path")
_CLIENT_OPTIONS = ("name", "token", "token_env")
_BUDGET_OPTIONS = ("client", "model", "budget", "budget_window")
# Patterns are used with fullmatch: "$" would also match before a final newline.
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
PROVIDER_KINDS = ("openai-compatible", "openrouter")
_PROVIDER_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_SET_BY_KEYROTOR = frozenset(
    {"authorization", "host", "content-length", "connection", "transfer-encoding", "keep-alive"}
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLAIN_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,63}|[a-z_][a-z0-9_]{0,63}")
"""A variable name safe to show: one case, short (a pasted key or token mixes them)."""
_LOOKS_SECRET = re.compile(r"sk-[A-Za-z0-9_-]{8,}")
_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_HOST_FIX = 'set host = "127.0.0.1" (this machine) or "0.0.0.0" (every interface)'
_ENV_HELP = (
    "set OPENROUTER_KEYS (comma-separated), OPENROUTER_API_KEY or OPENROUTER_API_KEY_1, _2, ..."
)
_REDACT_FROM = 6  # shorter "secrets" (test fakes) would garble messages, not hide anything
_PROBE_KEY = KeySpec(key_id="probe")
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


class ConfigError(Exception):
    """The configuration is wrong; the message says where and how to fix it.

    Attributes:
        source: the file's path, ``"command line"``, ``"environment"``, or
            ``"configuration"`` (no file, nothing more precise).
        where: the table and option (``"[pool] policy"``), or ``""``.
        fix: what to do instead.
    """

    def __init__(self, message: str, *, source: str = "", where: str = "", fix: str = "") -> None:
        self.source = source
        self.where = where
        self.fix = fix
        text = f"{source}: {message}" if source else message
        super().__init__(f"{text}; fix: {fix}" if fix and fix not in text else text)


@attrs.frozen(kw_only=True)
class Provider:
    """An upstream beside the main one, with its own keys (``[[providers]]``).

    A request goes to it when its model is in ``models`` (sent as it is) or
    starts with ``name/`` (sent without that prefix); its keys never serve
    another upstream, nor the main one's keys it."""

    name: str
    upstream: str
    kind: str
    models: frozenset[str]
    keys: dict[str, str]
    pool: PoolConfig
    probe_path: str | None = None  # None: by ``kind`` (``probe_path_for``)

    def __repr__(self) -> str:
        keys = ", ".join(f"{alias!r}: {mask(secret)!r}" for alias, secret in self.keys.items())
        return (
            f"Provider(name={self.name!r}, upstream={self.upstream!r}, kind={self.kind!r}, "
            f"models={sorted(self.models)!r}, keys={{{keys}}}, probe_path={self.probe_path!r})"
        )


KEY_PROBE = "/key"
"""OpenRouter's probe of a key: ``GET /key`` (its limit, balance and tier)."""
MODELS_PROBE = "/models"
"""An OpenAI-compatible upstream's probe: ``GET /models`` (it has no ``/key``)."""


def probe_path_for(configured: str | None, upstream: str, kind: str | None = None) -> str:
    """The path that probes an upstream's keys: ``configured``, else ``/key``
    on OpenRouter's (a provider of ``kind`` ``openrouter``; the main upstream
    when its host is ``openrouter.ai`` or its path ``/api/v1`` as OpenRouter's),
    else ``/models``, which an OpenAI-compatible API serves to a valid key (it
    answers ``/key`` with a 404, which revives no key)."""
    if configured is not None:
        return configured
    if kind is not None:
        return KEY_PROBE if kind == "openrouter" else MODELS_PROBE
    return KEY_PROBE if openrouter_like(upstream) else MODELS_PROBE


def probe_path_problem(value: str) -> str | None:
    """Why ``value`` is not a probe path (None: it is): a path from ``/``,
    printable ASCII without spaces or ``#``."""
    if not value.startswith("/"):
        return 'must be a path starting with "/"'
    if not value.isascii() or _unprintable(value) or "#" in value:
        return "must be printable ASCII without spaces or '#'"
    return None


MAIN_PROVIDER = "main"
"""The main upstream's name where providers are named (the spend ledger, the
admin API); no ``[[providers]]`` may take it."""


@attrs.frozen
class Budget:
    """A spend limit in USD on a client token's or a model's requests
    (``scope`` ``client`` or ``model``), per ``window`` seconds (None: for
    ever); from ``[[budgets]]``."""

    scope: str
    name: str
    limit: float
    window: float | None = None


@attrs.frozen
class RoutingOptions:
    """``[routing]``: how routes treat models and free tiers (docs/routing.md).

    Attributes:
        model_cooldown: seconds a model that answered "unavailable" (no
            endpoints, no provider up) is passed over by routes, when the
            upstream gave no Retry-After; doubled for each failure in a row.
        free_per_minute: free-model requests per account and minute.
        free_per_day: free-model requests per account and UTC day (50; 1000
            for an account that bought 10 credits: list it in ``accounts``).
        free_wait: seconds a free request may wait for its account's pace
            before the route moves to its next candidate.
        accounts: account name -> its daily free-model limit, where it is
            not ``free_per_day``.
    """

    model_cooldown: float = 60.0
    free_per_minute: int = 20
    free_per_day: int = 50
    free_wait: float = 5.0
    accounts: Mapping[str, int] = attrs.Factory(dict)


def token_name(token: str) -> str:
    """The name a client token without a ``[[clients]]`` name goes by in the
    ledger: ``token-`` and 8 hex digits of its SHA-256 (not the token)."""
    return "token-" + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:8]


@attrs.frozen(kw_only=True)
class ProxyConfig:
    """Everything ``keyrotor serve`` needs, checked.

    Attributes:
        keys: alias -> secret (the file's keys, then the environment's ``env1``, ...).
        pool: the pool's options; its key ids are the aliases.
        upstream: base URL of the OpenAI-compatible upstream.
        probe_path: the path that probes its keys (None: ``probe_path_for``'s
            default for ``upstream``: ``/key`` on OpenRouter's, else ``/models``).
        http: connection pooling and timeouts to the upstream.
        server: the proxy server's options (``SERVER_DEFAULTS``' names, all set).
        headers: sent upstream on every request (``HTTP-Referer``, ``X-Title``).
        routing_note: add a ``_routing`` object to non-streaming JSON bodies.
        log_format: ``"json"`` or ``"text"``.
        admin_token: the token of ``/admin/*`` (None: the admin API is off).
        client_tokens: the tokens callers of ``/v1/*`` present (empty: open,
            which the loader allows on a loopback address only).
        token_ttl: lifetime of the bearer tokens ``POST /auth/token`` issues.
        state_path: the SQLite state file (None: nothing is kept).
        state_flush: seconds from a record of state or spend to its batched write.
        state_flush_in: ``"loop"``: the event loop commits them (the least
            CPU); ``"thread"``: a writer thread does, so that a disk that
            stalls (a network volume) never holds the loop.
        secret_key: ``KEYROTOR_SECRET_KEY``, which encrypts stored secrets.
        record: write a trace of the traffic to this file (docs/replay.md).
        providers: the other upstreams, each with its own keys
            (``[[providers]]``; ``keys`` and ``pool`` are the main upstream's).
        catalog_refresh: seconds between fetches of the upstream's model
            catalog (``GET /models``), which ``/v1/models`` serves (None: off,
            ``/v1/models`` is forwarded).
        reject_unknown_models: a request for a model no catalog lists is
            answered 404 here instead of being forwarded (``[catalog]
            reject_unknown``; off by default: a catalog can lag the upstream).
        client_names: client token -> its name in the ledger (``[[clients]]``
            names, else ``token_name``); every client token has one.
        budgets: the spend limits per client token and per model.
        routes: the named routes requests may put in ``model`` (``[[routes]]``;
            the built-in ``free`` route unless one is called that).
        routing: ``[routing]``: model cooldowns and free-tier limits.
        retention: ``[analytics]``: days the analytics rows of each grain are kept.
        alert_rules: the ``[[alerts]]`` (docs/analytics.md).
        webhooks: ``[alerting] webhooks``: URLs each alert is POSTed to.
        alert_interval: ``[alerting] interval``: seconds between looks at the rules.
        shared_url: ``[shared] url``: the Redis other processes of this pool
            share key health through (docs/scaling.md); None: this process alone.
        shared_namespace: ``[shared] namespace``: the prefix of this pool's Redis keys.
        shared_lease: ``[shared] lease``: seconds after which the requests in
            flight of a process that stopped renewing them (it died) stop counting.
    """

    keys: dict[str, str]
    pool: PoolConfig
    upstream: str = OPENROUTER_URL
    probe_path: str | None = None
    http: HTTPOptions = attrs.Factory(HTTPOptions)
    server: dict[str, Any] = attrs.Factory(lambda: dict(SERVER_DEFAULTS))
    headers: dict[str, str] = attrs.Factory(dict)
    routing_note: bool = False
    log_format: str = "json"
    admin_token: str | None = None
    client_tokens: tuple[str, ...] = ()
    token_ttl: float = 3600.0
    state_path: str | None = None
    state_flush: float = 0.1
    state_flush_in: str = "loop"
    secret_key: str | None = None
    record: str | None = None
    catalog_refresh: float | None = 3600.0
    reject_unknown_models: bool = False
    providers: tuple[Provider, ...] = ()
    client_names: dict[str, str] = attrs.Factory(dict)
    budgets: tuple[Budget, ...] = ()
    routes: tuple[Route, ...] = (FREE_ROUTE,)
    routing: RoutingOptions = attrs.Factory(RoutingOptions)
    retention: Retention = attrs.Factory(Retention)
    alert_rules: tuple[Rule, ...] = ()
    webhooks: tuple[str, ...] = attrs.field(default=(), repr=False)  # may hold tokens
    alert_interval: float = 10.0
    shared_url: str | None = attrs.field(default=None, repr=False)  # may hold a password
    shared_namespace: str = "keyrotor"
    shared_lease: float = 10.0

    def __repr__(self) -> str:
        keys = ", ".join(f"{alias!r}: {mask(secret)!r}" for alias, secret in self.keys.items())
        return (
            f"ProxyConfig(keys={{{keys}}}, pool={self.pool!r}, upstream={self.upstream!r}, "
            f"probe_path={self.probe_path!r}, "
            f"http={self.http!r}, server={self.server!r}, headers={self.headers!r}, "
            f"routing_note={self.routing_note!r}, log_format={self.log_format!r}, "
            f"admin_token={'set' if self.admin_token else None}, "
            f"client_tokens={len(self.client_tokens)}, token_ttl={self.token_ttl!r}, "
            f"state_path={self.state_path!r}, state_flush={self.state_flush!r}, "
            f"state_flush_in={self.state_flush_in!r}, "
            f"secret_key={'set' if self.secret_key else None}, record={self.record!r}, "
            f"catalog_refresh={self.catalog_refresh!r}, providers={list(self.providers)!r}, "
            f"clients={sorted(self.client_names.values())!r}, budgets={list(self.budgets)!r}, "
            f"routes={[r.name for r in self.routes]!r}, routing={self.routing!r})"
        )


def load_config(
    path: str | os.PathLike[str] | None,
    environ: Mapping[str, str],
    overrides: Mapping[str, Any] | None = None,
) -> ProxyConfig:
    """Read the TOML file at ``path`` (None: no file), add the keys of ``environ``
    and apply ``overrides`` (command-line values; a None value is ignored).

    Override names are the top-level options (``upstream``, ``routing_note``,
    ``log_format``), the ``[server]`` options bare (``host``, ``port``, ...), or
    ``"table.option"`` for any table (``"pool.policy"``, ``"http.connect"``,
    ``"headers.X-Title"``); string values are converted to the option's type.
    Raises ``ConfigError``.
    """
    return _Loader(path, environ).load(overrides or {})


class _Loader:
    """One load: the sources, and the secrets to keep out of every message."""

    def __init__(self, path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> None:
        self.path = None if path is None else os.fspath(path)
        self.source = self.path or "configuration"
        self.environ = environ
        self.secrets: set[str] = set()

    # ------------------------------------------------------------ errors

    def fail(self, message: str, *, where: str = "", fix: str = "", source: str = "") -> NoReturn:
        """Raise a ``ConfigError`` with every known secret masked out, on one
        line (a name from the file may hold a line break)."""
        raise ConfigError(
            _one_line(self.redact(message)),
            source=source or self.source,
            where=_one_line(where),
            fix=_one_line(self.redact(fix)),
        )

    def redact(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            if len(secret) >= _REDACT_FROM:
                text = text.replace(secret, mask(secret))
        return _LOOKS_SECRET.sub(lambda m: mask(m.group()), text)

    def unknown(self, where: str, name: str, known: list[str], source: str = "") -> NoReturn:
        """An option nobody knows: suggest the closest known one."""
        what = f"{where} {name}".strip()
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        if close:
            self.fail(
                f"unknown option {what}; did you mean {close[0]}?",
                where=where,
                fix=f"did you mean {close[0]}?",
                source=source,
            )
        self.fail(
            f"unknown option {what}",
            where=where,
            fix=f"remove it; the options here are {', '.join(known)}",
            source=source,
        )

    # ------------------------------------------------------------ the load

    def load(self, overrides: Mapping[str, Any]) -> ProxyConfig:
        data = self.read() if self.path is not None else {}
        self.collect_secrets(data)
        for name in data:
            if name not in _TOP_KINDS and name not in _TABLES:
                self.unknown("", name, [*_TOP_KINDS, *_TABLES])
        tables = {name: self.table(data, name) for name in _PLAIN_TABLES}
        tables["routing"] = dict(tables["routing"])
        accounts_table = tables["routing"].pop("accounts", {})
        tables[""] = {name: data[name] for name in _TOP_KINDS if name in data}
        given = self.split_overrides(overrides)

        top: dict[str, Any] = {}
        record_source = self.source
        for name, kind in _TOP_KINDS.items():
            for source, raw, coerce in self.layers(tables[""], given[""], name):
                top[name] = self.check(raw, kind, name, source, coerce)
                if name == "upstream":
                    self.check_url(top[name], name, source)
                elif name == "probe_path":
                    self.check_probe_path(top[name], name, source)
                elif name == "log_format":
                    self.check_choice(top[name], LOG_FORMATS, name, source)
                elif name == "record":
                    self.check_path(top[name], "record", "--record", source)
                    record_source = source
        if "upstream" not in top and self.environ.get("OPENROUTER_BASE_URL", "").strip():
            top["upstream"] = self.environ["OPENROUTER_BASE_URL"].strip()
            self.check_url(top["upstream"], "OPENROUTER_BASE_URL", "environment")

        server = dict(SERVER_DEFAULTS)
        for name in self.names("server", tables, given, _SERVER_KINDS):
            for source, raw, coerce in self.layers(tables["server"], given["server"], name):
                server[name] = self.server_value(name, raw, source, coerce)

        http: dict[str, Any] = {}
        for name in self.names("http", tables, given, _HTTP_KINDS):
            for source, raw, coerce in self.layers(tables["http"], given["http"], name):
                where = f"[http] {name}"
                http[name] = self.check(raw, _HTTP_KINDS[name], where, source, coerce)
                self.build(HTTPOptions, {name: http[name]}, where, source)

        pool: dict[str, Any] = {}
        for name in self.names("pool", tables, given, _POOL_KINDS):
            for source, raw, coerce in self.layers(tables["pool"], given["pool"], name):
                where = f"[pool] {name}"
                pool[name] = self.check(raw, _POOL_KINDS[name], where, source, coerce)
                self.build(PoolConfig, {"keys": [_PROBE_KEY], name: pool[name]}, where, source)

        headers: dict[str, str] = {}
        for source, table in ((self.source, tables["headers"]), ("command line", given["headers"])):
            for name, raw in table.items():
                headers[name] = self.header(name, raw, source)

        auth = dict(_AUTH_DEFAULTS)
        for name in self.names("auth", tables, given, _AUTH_KINDS):
            for source, raw, coerce in self.layers(tables["auth"], given["auth"], name):
                auth[name] = self.check(raw, _AUTH_KINDS[name], f"[auth] {name}", source, coerce)
        state = dict(_STATE_DEFAULTS)
        for name in self.names("state", tables, given, _STATE_KINDS):
            for source, raw, coerce in self.layers(tables["state"], given["state"], name):
                state[name] = self.check(raw, _STATE_KINDS[name], f"[state] {name}", source, coerce)
                if name == "path":
                    self.check_path(state[name], "[state] path", "--state", source)
                if name == "flush_in":
                    self.check_choice(state[name], STATE_FLUSH_IN, "[state] flush_in", source)
        catalog = dict(_CATALOG_DEFAULTS)
        for name in self.names("catalog", tables, given, _CATALOG_KINDS):
            for source, raw, coerce in self.layers(tables["catalog"], given["catalog"], name):
                where = f"[catalog] {name}"
                catalog[name] = self.check(raw, _CATALOG_KINDS[name], where, source, coerce)
        routing = {}
        for name in self.names("routing", tables, given, _ROUTING_KINDS):
            for source, raw, coerce in self.layers(tables["routing"], given["routing"], name):
                where = f"[routing] {name}"
                routing[name] = self.check(raw, _ROUTING_KINDS[name], where, source, coerce)
        retention = {}
        for name in self.names("analytics", tables, given, _ANALYTICS_KINDS):
            for source, raw, coerce in self.layers(tables["analytics"], given["analytics"], name):
                where = f"[analytics] {name}"
                value = self.check(raw, _FLOAT, where, source, coerce)
                if not (value >= 0 and math.isfinite(value)):
                    self.fail(
                        f"{where} must be 0 (keep for ever) or more, got {value}",
                        where=where,
                        fix="days to keep each grain's rows, e.g. minute_days = 2",
                    )
                retention[name] = float(value)
        alerting: dict[str, Any] = {}
        for name in self.names("alerting", tables, given, _ALERTING_KINDS):
            for source, raw, coerce in self.layers(tables["alerting"], given["alerting"], name):
                where = f"[alerting] {name}"
                alerting[name] = self.check(raw, _ALERTING_KINDS[name], where, source, coerce)
        for url in alerting.get("webhooks", []):
            if url_problem(url, webhook=True) is not None:
                self.fail(
                    "[alerting] webhooks holds a URL that is not http(s) or is malformed",
                    where="[alerting] webhooks",
                    fix='write full URLs, e.g. webhooks = ["https://hooks.example.com/keyrotor"]',
                )
        shared: dict[str, Any] = {}
        shared_source = self.source
        for name in self.names("shared", tables, given, _SHARED_KINDS):
            for source, raw, coerce in self.layers(tables["shared"], given["shared"], name):
                where = f"[shared] {name}"
                shared[name] = self.check(raw, _SHARED_KINDS[name], where, source, coerce)
                if name == "url":
                    shared_source = source
        if "url" in shared:
            try:
                parse_url(shared["url"])
            except ValueError as exc:
                cli = shared_source == "command line"
                self.fail(
                    f"{'--shared: ' if cli else ''}{exc}",
                    where="[shared] url",
                    fix="give --shared redis://127.0.0.1:6379/0"
                    if cli
                    else 'write url = "redis://127.0.0.1:6379/0"',
                    source=shared_source,
                )
            if importlib.util.find_spec("coredis") is None:  # the extra is not installed
                self.fail(
                    "a shared pool needs the Redis client coredis, which is not installed",
                    where="--shared" if shared_source == "command line" else "[shared] url",
                    fix="pip install 'keyrotor[shared]' in keyrotor's environment",
                    source=shared_source,
                )
        if not 0.5 <= shared.get("lease", 10.0) <= 3600:
            self.fail(
                "[shared] lease must be 0.5 to 3600 seconds",
                where="[shared] lease",
                fix="write lease = 10 (a dead process's requests stop counting after it)",
            )
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", shared.get("namespace", "keyrotor")):
            self.fail(
                "[shared] namespace must be 1-64 letters, digits, '.', '_', ':' or '-'",
                where="[shared] namespace",
                fix='write namespace = "team-pool" (pools that share one Redis need their own)',
            )
        named = self.clients(data.get("clients", []))
        admin, clients = self.tokens(auth, server["host"], list(named.values()))
        client_names = {token: token_name(token) for token in clients}
        client_names.update((token, name) for name, token in named.items())
        budgets = self.budgets(data.get("budgets", []), set(client_names.values()))
        for where, value in (
            ("[auth] token_ttl", auth["token_ttl"]),
            ("[state] flush_interval", state["flush_interval"]),
            ("[catalog] refresh_interval", catalog["refresh_interval"]),
            ("[routing] model_cooldown", routing.get("model_cooldown", 1.0)),
            ("[routing] free_per_minute", routing.get("free_per_minute", 1)),
            ("[alerting] interval", alerting.get("interval", 1.0)),
        ):
            if not (value > 0 and math.isfinite(value)):
                self.fail(
                    f"{where} must be more than zero, got {value}",
                    where=where,
                    fix=f"set {where.split()[-1]} to a positive number of seconds",
                )
        state_path = None
        if state["enabled"]:
            state_path = state.get("path") or str(default_state_path(self.environ))
        if "record" in top:
            self.check_record(top["record"], state_path, record_source)

        declared = self.providers(data.get("providers", []))
        keys, specs, by_provider = self.keys(
            data.get("keys", []), empty_ok=state_path is not None, providers=declared
        )
        providers = tuple(
            Provider(
                name=name,
                upstream=upstream,
                kind=kind,
                models=models,
                keys=by_provider[name][0],
                pool=self.build(
                    PoolConfig,
                    {"keys": by_provider[name][1], **pool},
                    f"[[providers]] {name!r}",
                    self.source,
                ),
                probe_path=probed,
            )
            for name, (upstream, kind, models, probed) in declared.items()
        )
        return ProxyConfig(
            keys=keys,
            pool=self.build(PoolConfig, {"keys": specs, **pool}, "[pool]", self.source),
            upstream=top.get("upstream", OPENROUTER_URL),
            probe_path=top.get("probe_path"),
            http=HTTPOptions(**http),
            server=server,
            headers=headers,
            routing_note=top.get("routing_note", False),
            log_format=top.get("log_format", "json"),
            admin_token=admin,
            client_tokens=clients,
            token_ttl=auth["token_ttl"],
            state_path=state_path,
            state_flush=state["flush_interval"],
            state_flush_in=state["flush_in"],
            secret_key=secret_key_from_env(self.environ),
            record=top.get("record"),
            catalog_refresh=catalog["refresh_interval"] if catalog["enabled"] else None,
            reject_unknown_models=catalog.get("reject_unknown", False) and catalog["enabled"],
            providers=providers,
            client_names=client_names,
            budgets=budgets,
            routes=self.routes(data.get("routes", []), catalog["enabled"]),
            routing=RoutingOptions(
                **routing, accounts=self.accounts(accounts_table, routing, specs)
            ),
            retention=Retention(**retention),
            alert_rules=self.alert_rules(data.get("alerts", [])),
            webhooks=tuple(alerting.get("webhooks", ())),
            alert_interval=float(alerting.get("interval", 10.0)),
            shared_url=shared.get("url"),
            shared_namespace=shared.get("namespace", "keyrotor"),
            shared_lease=float(shared.get("lease", 10.0)),
        )

    def alert_rules(self, entries: Any) -> tuple[Rule, ...]:
        """The ``[[alerts]]`` tables, checked."""
        rules = self.named(
            entries, "alerts", RULE_FIELDS, rule_from_json, "alert rule", "analytics"
        )
        return tuple(rules.values())

    def named(
        self,
        entries: Any,
        table: str,
        fields: tuple[str, ...],
        parse: Callable[[Any], Any],
        what: str,
        doc: str,
    ) -> dict[str, Any]:
        """The ``[[table]]`` entries, each read by ``parse`` (its ``ValueError``:
        one line naming the entry), by their unique ``name``."""
        found: dict[str, Any] = {}
        for index, entry in enumerate(self.entries(entries, table, fields), 1):
            where = f"[[{table}]] #{index}"
            try:
                item = parse(entry)
            except ValueError as exc:
                self.fail(f"{where}: {exc}", where=where, fix=f"see docs/{doc}.md for the shape")
            if item.name in found:
                self.fail(
                    f"{where}: {what} name {item.name!r} is already used by another {what}",
                    where=f"{where} name",
                    fix=f"give every {what} its own name",
                )
            found[item.name] = item
        return found

    def entries(self, entries: Any, table: str, options: tuple[str, ...]) -> list[dict[str, Any]]:
        """The tables of an array ``[[table]]``, each with known options only."""
        if not isinstance(entries, list):
            self.fail(
                f"{table} must be an array of tables",
                where=f"[[{table}]]",
                fix=f"write [[{table}]] (double brackets) above each entry",
            )
        for index, entry in enumerate(entries, 1):
            where = f"[[{table}]] #{index}"
            if not isinstance(entry, dict):
                self.fail(f"{where} must be a table, got {_describe(entry)}", where=where)
            for name in entry:
                if name not in options:
                    self.unknown(where, name, list(options))
        return entries

    def clients(self, entries: Any) -> dict[str, str]:
        """name -> token of the ``[[clients]]`` tables, checked (the tokens
        themselves are checked with the others by ``tokens``)."""
        named: dict[str, str] = {}
        for index, entry in enumerate(self.entries(entries, "clients", _CLIENT_OPTIONS), 1):
            where = f"[[clients]] #{index}"
            if "name" not in entry:
                self.fail(f"{where} has no name", where=where, fix='give it name = "ci"')
            name = self.check(entry["name"], _STR, f"{where} name", self.source, False)
            if not _CLIENT_NAME.fullmatch(name) or name.startswith("token-"):
                self.fail(
                    f"{where} name {name!r} must be up to 64 letters, digits, '.', '_', '@' "
                    "or '-' and not start with 'token-'",
                    where=f"{where} name",
                    fix='use a short name such as "ci" or "alice"',
                )
            if name in named:
                self.fail(
                    f"{where} name {name!r} is already used by another client",
                    where=f"{where} name",
                    fix="give every client its own name",
                )
            where = f"{where} ({name})"
            if ("token" in entry) == ("token_env" in entry):
                self.fail(
                    f"{where} needs exactly one of token and token_env",
                    where=where,
                    fix='write token_env = "ENV_VAR" (keeps the token out of the file)',
                )
            if "token" in entry:
                token = self.check(entry["token"], _STR, f"{where} token", self.source, False)
                token = token.strip()
            else:
                env = self.check(entry["token_env"], _STR, f"{where} token_env", self.source, False)
                token = self.environ.get(env, "").strip() if _ENV_NAME.fullmatch(env) else ""
                if not token:
                    self.unset_variable(env, f"{where} token_env", "token", f" ({_TOKEN_HELP})")
            if token in named.values():
                self.fail(
                    f"{where} has the token of another client",
                    where=where,
                    fix="give every client its own token",
                )
            named[name] = token
        return named

    def budgets(self, entries: Any, clients: set[str]) -> tuple[Budget, ...]:
        """The ``[[budgets]]`` tables, checked (``clients``: the known client names)."""
        budgets: dict[tuple[str, str], Budget] = {}
        for index, entry in enumerate(self.entries(entries, "budgets", _BUDGET_OPTIONS), 1):
            where = f"[[budgets]] #{index}"
            scopes = [scope for scope in ("client", "model") if scope in entry]
            if len(scopes) != 1:
                self.fail(
                    f"{where} needs exactly one of client and model",
                    where=where,
                    fix='write client = "ci" (a [[clients]] name) or model = "openai/gpt-4o"',
                )
            scope = scopes[0]
            name = self.check(entry[scope], _STR, f"{where} {scope}", self.source, False)
            if scope == "client" and name not in clients:
                known = ", ".join(sorted(clients)) or "none"
                self.fail(
                    f"{where} client {name!r} is not a client (known: {known})",
                    where=f"{where} client",
                    fix="name the client in [[clients]] (name and token_env) and use that name",
                )
            if not name:
                self.fail(f"{where} {scope} is empty", where=f"{where} {scope}")
            if (scope, name) in budgets:
                self.fail(
                    f"{where}: {scope} {name!r} has a budget already",
                    where=where,
                    fix="give each client and model one budget",
                )
            if "budget" not in entry:
                self.fail(f"{where} has no budget", where=where, fix="write budget = 10.0 (USD)")
            limit = self.check(entry["budget"], _FLOAT, f"{where} budget", self.source, False)
            window = entry.get("budget_window")
            if window is not None:
                window = self.check(window, _FLOAT, f"{where} budget_window", self.source, False)
            for option, value in (("budget", limit), ("budget_window", window)):
                if value is not None and not (value > 0 and math.isfinite(value)):
                    self.fail(
                        f"{where} {option} must be more than zero, got {value}",
                        where=f"{where} {option}",
                        fix="USD for budget, seconds for budget_window (86400: a day)",
                    )
            budgets[(scope, name)] = Budget(
                scope, name, float(limit), None if window is None else float(window)
            )
        return tuple(budgets.values())

    def routes(self, entries: Any, catalog: bool) -> tuple[Route, ...]:
        """The ``[[routes]]`` tables, checked, with the built-in ``free`` route
        unless one of them is called that."""
        fields = ("name", "candidates", "strategy", "weight")
        routes: dict[str, Route] = self.named(
            entries, "routes", fields, route_from_json, "route", "routing"
        )
        if routes and not catalog:
            self.fail(
                "[[routes]] choose models from the catalog, "
                "which [catalog] enabled = false turns off",
                where="[catalog] enabled",
                fix="remove enabled = false from [catalog], or remove the [[routes]]",
            )
        if not catalog:
            return ()
        return (
            tuple(routes.values()) if FREE_ROUTE.name in routes else (FREE_ROUTE, *routes.values())
        )

    def accounts(
        self, table: Any, routing: Mapping[str, Any], specs: list[KeySpec]
    ) -> dict[str, int]:
        """``[routing.accounts]``: account -> its daily free-model limit, each
        the account of a key."""
        if not isinstance(table, dict):
            self.fail(
                f"[routing] accounts must be a table, got {_describe(table)}",
                where="[routing] accounts",
                fix="write accounts = { team = 1000 } (account = its free requests per day)",
            )
        known = {spec.account for spec in specs if spec.account is not None}
        out = {}
        for name, value in table.items():
            where = f"[routing.accounts] {name}"
            if name not in known:
                listed = ", ".join(sorted(known)) or "none"
                self.fail(
                    f"{where}: no key has account = {name!r} (accounts of the keys: {listed})",
                    where=where,
                    fix='set account = "..." on the account\'s [[keys]], or fix the name',
                )
            per_day = self.check(value, _INT, where, self.source, False)
            if per_day < 0:
                self.fail(
                    f"{where} must not be negative, got {per_day}",
                    where=where,
                    fix="50 (never bought credits) or 1000 (bought 10 or more)",
                )
            out[name] = per_day
        for name in ("free_per_day", "free_wait"):
            if not (routing.get(name, 0) >= 0 and math.isfinite(routing.get(name, 0))):
                self.fail(
                    f"[routing] {name} must "
                    + ("not be negative" if routing[name] < 0 else "be a finite number")
                    + f", got {routing[name]}",
                    where=f"[routing] {name}",
                    fix="free_per_day: 50 (no credits bought); free_wait: seconds, 0 for none",
                )
        return out

    def providers(self, entries: Any) -> dict[str, tuple[str, str, frozenset[str], str | None]]:
        """name -> (upstream, kind, models, probe path or None) of the
        ``[[providers]]`` tables, checked."""
        declared: dict[str, tuple[str, str, frozenset[str], str | None]] = {}
        claimed: dict[str, str] = {}  # model -> provider
        for index, entry in enumerate(self.entries(entries, "providers", _PROVIDER_OPTIONS), 1):
            where = f"[[providers]] #{index}"
            for required in ("name", "upstream"):
                if required not in entry:
                    self.fail(
                        f"{where} has no {required}",
                        where=where,
                        fix='give it name = "openai" and upstream = "https://api.openai.com/v1"',
                    )
            name = self.check(entry["name"], _STR, f"{where} name", self.source, False)
            if not _PROVIDER_NAME.fullmatch(name):
                self.fail(
                    f"{where} name {name!r} must be lower-case letters, digits, '-', '_' or '.'",
                    where=f"{where} name",
                    fix='use a short name such as "openai": requests name its models "openai/..."',
                )
            if name == MAIN_PROVIDER:
                self.fail(
                    f"{where} name {name!r} is the main upstream's name in the spend ledger",
                    where=f"{where} name",
                    fix="give the provider another name",
                )
            if name in declared:
                self.fail(
                    f"{where} name {name!r} is already used by another provider",
                    where=f"{where} name",
                    fix="give every provider its own name",
                )
            where = f"{where} ({name})"
            upstream = self.check(entry["upstream"], _STR, f"{where} upstream", self.source, False)
            self.check_url(upstream, f"{where} upstream", self.source)
            kind = self.check(
                entry.get("kind", "openai-compatible"), _STR, f"{where} kind", self.source, False
            )
            self.check_choice(kind, PROVIDER_KINDS, f"{where} kind", self.source)
            models = self.check(
                entry.get("models", []), _STRS, f"{where} models", self.source, False
            )
            for model in models:
                if model in claimed:
                    self.fail(
                        f"{where} models: {model!r} is also claimed by provider {claimed[model]!r}",
                        where=f"{where} models",
                        fix="list each model under one provider only",
                    )
                claimed[model] = name
            probed = None
            if "probe_path" in entry:
                where_probe = f"{where} probe_path"
                probed = self.check(entry["probe_path"], _STR, where_probe, self.source, False)
                self.check_probe_path(probed, where_probe, self.source)
            declared[name] = (upstream, kind, frozenset(models), probed)
        return declared

    def tokens(
        self, auth: dict[str, Any], host: str, listed: list[str]
    ) -> tuple[str | None, tuple[str, ...]]:
        """The admin token and the client tokens: ``[[clients]]``' (``listed``),
        the file's (or the command line's) and the environment's, each checked."""
        env_admin = self.environ.get("KEYROTOR_ADMIN_TOKEN", "").strip()
        admin = auth.get("admin_token") or env_admin or None
        env_clients = self.environ.get("KEYROTOR_CLIENT_TOKENS", "")
        clients = [*listed, *auth.get("client_tokens", []), *env_clients.split(",")]
        clients = list(dict.fromkeys(t.strip() for t in clients if t.strip()))
        named = [("admin token", admin)] if admin else []
        named += [(f"client token #{i}", token) for i, token in enumerate(clients, 1)]
        for what, token in named:
            if len(token) < _MIN_TOKEN or not valid_secret(token):
                self.fail(
                    f"the {what} is shorter than {_MIN_TOKEN} characters or has whitespace",
                    where="[auth]",
                    fix=f"use a long random token; {_TOKEN_HELP}",
                )
        if admin in clients:
            self.fail(
                "the admin token is also a client token",
                where="[auth]",
                fix="give the admin API a token of its own",
            )
        if not clients and host not in LOOPBACK:
            self.fail(
                f"listening on {host} without client tokens would open the pool's keys to "
                "the network",
                where="[auth] client_tokens",
                fix="set KEYROTOR_CLIENT_TOKENS (or [auth] client_tokens), or listen on 127.0.0.1",
            )
        return admin, tuple(clients)

    def read(self) -> dict[str, Any]:
        assert self.path is not None
        try:
            with open(self.path, "rb") as file:
                raw = file.read()
        except OSError as exc:
            self.fail(
                f"cannot read the configuration file: {exc.strerror or type(exc).__name__}",
                fix="check the path given to --config and that the file is readable",
            )
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            self.fail(
                f"the file is not UTF-8 text (bad byte at offset {exc.start})",
                fix="save the file as UTF-8",
            )
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            self.fail(f"invalid TOML: {exc}", fix="correct the TOML syntax there")
        except ValueError:  # an integer of over 4300 digits, which Python will not read
            self.fail(
                "the file holds a number of thousands of digits",
                fix="write every number as a reasonable one",
            )

    def collect_secrets(self, data: dict[str, Any]) -> None:
        """Learn every secret first, so that no later message can show one."""
        entries = data.get("keys")
        for entry in entries if isinstance(entries, list) else ():
            if not isinstance(entry, dict):
                continue
            if isinstance(entry.get("secret"), str):
                self.secrets.add(entry["secret"])
            name = entry.get("secret_env")
            if isinstance(name, str) and self.environ.get(name):
                self.secrets.add(self.environ[name])
                self.secrets.add(self.environ[name].strip())
        self.secrets.update(self.env_keys(data))
        auth = data.get("auth")
        if isinstance(auth, dict):
            if isinstance(auth.get("admin_token"), str):
                self.secrets.add(auth["admin_token"])
            tokens = auth.get("client_tokens")
            if isinstance(tokens, list):
                self.secrets.update(t for t in tokens if isinstance(t, str))
        clients = data.get("clients")
        for entry in clients if isinstance(clients, list) else ():
            if isinstance(entry, dict):
                if isinstance(entry.get("token"), str):
                    self.secrets.add(entry["token"])
                env = entry.get("token_env")
                if isinstance(env, str) and self.environ.get(env):
                    self.secrets.update((self.environ[env], self.environ[env].strip()))
        for name in ("KEYROTOR_ADMIN_TOKEN", "KEYROTOR_SECRET_KEY"):
            self.secrets.add(self.environ.get(name, "").strip())
        self.secrets.update(
            t.strip() for t in self.environ.get("KEYROTOR_CLIENT_TOKENS", "").split(",")
        )
        self.secrets.discard("")

    def env_keys(self, data: dict[str, Any]) -> list[str]:
        """The environment's keys, less the variables a ``secret_env`` names."""
        entries = data.get("keys")
        claimed = {
            entry.get("secret_env")
            for entry in (entries if isinstance(entries, list) else ())
            if isinstance(entry, dict)
        }
        environ = {name: value for name, value in self.environ.items() if name not in claimed}
        try:
            return keys_from_env(environ)
        except ConfigurationError:
            return []

    def table(self, data: dict[str, Any], name: str) -> dict[str, Any]:
        value = data.get(name, {})
        if not isinstance(value, dict):
            self.fail(
                f"{name} must be a table, got {_describe(value)}",
                where=f"[{name}]",
                fix=f"write the options under a [{name}] line",
            )
        return value

    def split_overrides(self, overrides: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Overrides by table (``""``: top level); None values dropped."""
        given: dict[str, dict[str, Any]] = {t: {} for t in ("", *_PLAIN_TABLES)}
        for name, value in overrides.items():
            if value is None:
                continue
            table, dot, option = name.partition(".")
            if dot and table in given and table:
                given[table][option] = value
            elif not dot and name in _TOP_KINDS:
                given[""][name] = value
            elif not dot and name in _SERVER_KINDS:
                given["server"][name] = value
            else:
                known = [*_TOP_KINDS, *_SERVER_KINDS, "headers.NAME"]
                known += [f"{t}.{o}" for t, kinds in _TABLE_KINDS.items() for o in kinds]
                self.unknown("override", name, known, source="command line")
        return given

    def names(
        self,
        table: str,
        tables: dict[str, dict[str, Any]],
        given: dict[str, dict[str, Any]],
        kinds: Mapping[str, str],
    ) -> list[str]:
        """The options set for ``table``, each checked to exist."""
        for source, names in ((self.source, tables[table]), ("command line", given[table])):
            for name in names:
                if name not in kinds:
                    self.unknown(f"[{table}]", name, list(kinds), source=source)
        return [name for name in kinds if name in tables[table] or name in given[table]]

    def layers(
        self, file: Mapping[str, Any], cli: Mapping[str, Any], name: str
    ) -> list[tuple[str, Any, bool]]:
        """(source, value, coerce strings) of ``name``, lowest precedence first."""
        found = []
        if name in file:
            found.append((self.source, file[name], False))
        if name in cli:
            found.append(("command line", cli[name], True))
        return found

    # ------------------------------------------------------------ values

    def check(self, value: Any, kind: str, where: str, source: str, coerce: bool) -> Any:
        """``value`` as ``kind`` (ints widened to float for numbers), or fail."""
        if coerce and isinstance(value, str) and kind == _STRS:
            value = [part.strip() for part in value.split(",") if part.strip()]
        elif coerce and isinstance(value, str) and kind != _STR:
            value = _parse(value, kind)
        expected = kind
        if kind == _NEVER:
            if value is False or value == "never":
                return None
            kind = _FLOAT
        ok = {
            _INT: isinstance(value, int) and not isinstance(value, bool),
            _FLOAT: isinstance(value, (int, float)) and not isinstance(value, bool),
            _BOOL: isinstance(value, bool),
            _STR: isinstance(value, str),
            _STRS: isinstance(value, list) and all(isinstance(v, str) for v in value),
        }[kind]
        if not ok:
            unquote = " (write it without quotes)" if isinstance(value, str) and not coerce else ""
            self.fail(
                f"{where} must be {expected}, got {_describe(value)}{unquote}",
                where=where,
                fix=f"set {where.rsplit(' ', 1)[-1]} to {expected}",
                source=source,
            )
        if kind in (_INT, _FLOAT) and isinstance(value, int) and not finite(value):
            self.fail(  # no option takes a number a float cannot hold
                f"{where} is far too large, got {shown(value)}",
                where=where,
                fix=f"set {where.rsplit(' ', 1)[-1]} to a reasonable number "
                "(see docs/configuration.md)",
                source=source,
            )
        return float(value) if kind == _FLOAT else value

    def build(
        self, cls: Callable[..., Any], kwargs: dict[str, Any], where: str, source: str
    ) -> Any:
        """``cls(**kwargs)``, its ``PoolError`` or ``ConfigurationError`` wrapped."""
        try:
            return cls(**kwargs)
        except (PoolError, ConfigurationError) as exc:
            name = where.rsplit(" ", 1)[-1]
            value = kwargs.get(name)
            hint = ""
            if isinstance(value, str) and name in ("policy", "weight_by"):
                choices = POLICIES if name == "policy" else ("weight", "credits")
                close = difflib.get_close_matches(value, choices, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
            numeric = not isinstance(exc, PoolError) and not isinstance(value, str)
            fix = f"set {name} to a number more than zero" if numeric else ""
            self.fail(f"{where} is invalid: {exc}{hint}", where=where, source=source, fix=fix)

    def server_value(self, name: str, raw: Any, source: str, coerce: bool) -> Any:
        where = f"[server] {name}"
        value = self.check(raw, _SERVER_KINDS[name], where, source, coerce)
        if name == "host":
            problem = _host_problem(value)
            if problem is not None:
                self.fail(f"{where} {problem}", where=where, fix=_HOST_FIX, source=source)
        elif name == "port":
            if not 0 <= value <= 65535:
                self.fail(
                    f"{where} must be from 0 to 65535, got {value}",
                    where=where,
                    fix="choose a free TCP port such as 8080 (0: any free port)",
                    source=source,
                )
        elif name == "parser":
            try:
                resolve_parser(value)
            except ValueError as exc:
                self.fail(f"{where}: {exc}", where=where, source=source)
        elif name in _ZERO_ALLOWED and value == 0:
            pass  # 0: shut down without waiting; keep Python's own collector settings
        elif name == "gc_threshold" and value > GC_THRESHOLD_MAX:
            self.fail(
                f"{where} must be at most {GC_THRESHOLD_MAX:,}, got {value}",
                where=where,
                fix=f"set gc_threshold to {SERVER_DEFAULTS[name]} (the default){_GC_ZERO}",
                source=source,
            )
        elif value <= 0 or not math.isfinite(value):
            bound = "zero or more" if name in _ZERO_ALLOWED else "more than zero"
            self.fail(
                f"{where} must be {bound}, got {value}",
                where=where,
                fix=f"set {name} to a positive {'integer' if isinstance(value, int) else 'number'}"
                f" (default {SERVER_DEFAULTS[name]})"
                + (_GC_ZERO if name == "gc_threshold" else ""),
                source=source,
            )
        return value

    def check_url(self, url: str, where: str, source: str) -> None:
        """An upstream base URL: http(s), a host, no credentials, no query."""
        problem = url_problem(url)
        if problem is None:
            return
        shown = "" if "@" in url else f", got {url!r}"
        self.fail(
            f"{where} {problem}{shown}",
            where=where,
            source=source,
            fix=f'set {where} to the base URL, such as "{OPENROUTER_URL}"',
        )

    def check_probe_path(self, value: str, where: str, source: str) -> None:
        """The path that probes an upstream's keys (``probe_path_problem``)."""
        problem = probe_path_problem(value)
        if problem is not None:
            self.fail(
                f"{where} {problem}, got {value!r}",
                where=where,
                source=source,
                fix=f'set {where.split()[-1]} = "{MODELS_PROBE}" (an OpenAI-compatible API) '
                f'or "{KEY_PROBE}" (OpenRouter)',
            )

    def check_path(self, value: str, where: str, flag: str, source: str) -> None:
        """A file path: not empty (an empty one would mean something else silently)."""
        if not value.strip():
            cli = source == "command line"
            self.fail(
                f"{flag if cli else where} is an empty path",
                where=where,
                source=source,
                fix=f"give {flag} a file path"
                if cli
                else f"set {where} to a file path or remove it",
            )

    def check_record(self, record: str, state_path: str | None, source: str) -> None:
        """The ``record`` trace file: neither the state file nor the configuration
        file, and not an existing file that is not a trace (it would be overwritten)."""
        cli = source == "command line"
        name = "--record" if cli else "record"
        fix = f"give {name} a file of its own, such as traffic.jsonl"
        for other, what in ((state_path, "the state file"), (self.path, "the configuration file")):
            if other is not None and _same_file(record, other):
                self.fail(
                    f"{name} {record!r} is {what}: recording would overwrite it",
                    where="record",
                    source=source,
                    fix=fix,
                )
        from ..replay.trace import refuse_overwrite

        problem = refuse_overwrite(record)
        if problem is not None:
            self.fail(f"{name} {record!r} {problem}", where="record", source=source, fix=fix)

    def check_choice(self, value: str, choices: tuple[str, ...], where: str, source: str) -> None:
        if value not in choices:
            close = difflib.get_close_matches(value, choices, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            self.fail(
                f"{where} must be one of {', '.join(choices)}, got {value!r}{hint}",
                where=where,
                source=source,
                fix=f'set {where} = "{choices[0]}"',
            )

    def header(self, name: str, raw: Any, source: str) -> str:
        where = f"[headers] {name}"
        if not header_name_ok(name):
            self.fail(
                f"{where} is not a valid header name",
                where=where,
                source=source,
                fix="use letters, digits and -, such as X-Title",
            )
        if name.lower() in _SET_BY_KEYROTOR:
            self.fail(
                f"{where} is set by keyrotor itself",
                where=where,
                source=source,
                fix=f"remove {name}; keys go in [[keys]]",
            )
        value = self.check(raw, _STR, where, source, False)
        if not header_value_ok(value):
            self.fail(
                f"{where} has characters a header cannot carry",
                where=where,
                source=source,
                fix="use printable Latin-1 text on one line",
            )
        return str(value)

    def unset_variable(self, name: str, where: str, what: str, help_: str) -> NoReturn:
        """``where`` names the variable ``name``, which is not set. The name is
        shown only when it looks like one: a key or token pasted there by
        mistake must not be printed."""
        if _ENV_NAME.fullmatch(name) and _PLAIN_ENV_NAME.fullmatch(name):
            self.fail(
                f"{where}: the environment variable {name if what == 'key' else repr(name)} "
                "is not set",
                where=where,
                fix=f"export {name}=<the {what}> before starting keyrotor{help_}",
            )
        option = where.rsplit(" ", 1)[-1]
        self.fail(
            f"{where}: no environment variable of that name is set (its value is not shown: "
            f"{option} must name a variable, not hold the {what})",
            where=where,
            fix=f'write {option} = "A_VARIABLE_NAME" and export A_VARIABLE_NAME=<the {what}>',
        )

    # ------------------------------------------------------------ keys

    def keys(
        self,
        entries: Any,
        empty_ok: bool,
        providers: Mapping[str, Any] | None = None,
    ) -> tuple[dict[str, str], list[KeySpec], dict[str, tuple[dict[str, str], list[KeySpec]]]]:
        """alias -> secret and the specs of the main upstream: the file's keys,
        then the environment's; and the same per provider (``provider = "..."``).
        None at all is an error unless ``empty_ok`` (the state file may hold
        keys); a provider without keys is always one."""
        providers = providers or {}
        by_provider: dict[str, tuple[dict[str, str], list[KeySpec]]] = {
            name: ({}, []) for name in providers
        }
        if not isinstance(entries, list):
            self.fail(
                "keys must be an array of tables",
                where="[[keys]]",
                fix="write [[keys]] (double brackets) above each key",
            )
        keys: dict[str, str] = {}
        origin: dict[str, str] = {}  # alias -> where it was given
        owner: dict[str, str] = {}  # secret -> alias
        specs: list[KeySpec] = []

        def add(alias: str, secret: str, where: str) -> None:
            if secret in owner:
                other = owner[secret]
                self.fail(
                    f"the same secret is given for {other!r} ({origin[other]}) and "
                    f"{alias!r} ({where})",
                    where=where,
                    fix=f"list each key once: remove {alias!r} or {other!r}",
                )
            keys[alias], origin[alias], owner[secret] = secret, where, alias

        for index, entry in enumerate(entries, 1):
            alias, secret, spec = self.key_entry(index, entry)
            if alias in origin:
                self.fail(
                    f"[[keys]] #{index} alias {alias!r} is already used by {origin[alias]}",
                    where=f"[[keys]] #{index} alias",
                    fix="give every key its own alias",
                )
            provider = entry.get("provider")
            if provider is not None:
                where = f"[[keys]] #{index} ({alias}) provider"
                provider = self.check(provider, _STR, where, self.source, False)
            if provider is None:
                add(alias, secret, f"[[keys]] #{index}")
                specs.append(spec)
                continue
            if provider not in by_provider:
                known = ", ".join(sorted(by_provider)) or "none"
                self.fail(
                    f"[[keys]] #{index} ({alias}) provider {provider!r} is not declared "
                    f"(declared: {known})",
                    where=f"[[keys]] #{index} provider",
                    fix="add a [[providers]] table with that name, or remove provider = ...",
                )
            add(alias, secret, f"[[keys]] #{index}")
            del keys[alias]  # add() checked the secret and the alias; it belongs elsewhere
            by_provider[provider][0][alias] = secret
            by_provider[provider][1].append(spec)
        for name, (provider_keys, _) in by_provider.items():
            if not provider_keys:
                self.fail(
                    f"provider {name!r} has no keys",
                    where="[[providers]]",
                    fix=f'add [[keys]] with provider = "{name}" (and secret_env = "...")',
                )
        for index, secret in enumerate(self.env_keys({"keys": entries}), 1):
            alias = f"env{index}"
            if alias in origin:
                self.fail(
                    f"{origin[alias]} alias {alias!r} is also the name of a key from the "
                    "environment",
                    where=f"{origin[alias]} alias",
                    fix="rename the file's key: env1, env2, ... name the environment's keys",
                )
            if not valid_secret(secret):
                self.fail(
                    f"the environment's key {alias} has whitespace or non-ASCII characters",
                    source="environment",
                    fix="copy the key again into OPENROUTER_KEYS / OPENROUTER_API_KEY*",
                )
            add(alias, secret, "the environment")
            specs.append(KeySpec(key_id=alias))
        if not keys and not empty_ok and not by_provider:
            where = (
                f"add [[keys]] to {self.path}" if self.path else "pass --config FILE with [[keys]]"
            )
            self.fail(f"no API keys: {where} or {_ENV_HELP}", fix=f"{where} or {_ENV_HELP}")
        return keys, specs, by_provider

    def key_entry(self, index: int, entry: Any) -> tuple[str, str, KeySpec]:
        """(alias, secret, spec) of the ``index``-th ``[[keys]]`` table."""
        where = f"[[keys]] #{index}"
        if not isinstance(entry, dict):
            self.fail(
                f"{where} must be a table, got {_describe(entry)}",
                where=where,
                fix='write [[keys]] then alias = "..." and secret_env = "..." on their own lines',
            )
        for name in entry:
            if name not in _KEY_OPTIONS:
                self.unknown(where, name, list(_KEY_OPTIONS))
        if "alias" not in entry:
            self.fail(
                f"{where} has no alias",
                where=where,
                fix='add alias = "main" (a short name shown in logs and status)',
            )
        alias = self.check(entry["alias"], _STR, f"{where} alias", self.source, False)
        if alias in self.secrets:
            self.fail(
                f"{where} alias is a secret",
                where=f"{where} alias",
                fix="use a short name as alias and put the key in secret_env",
            )
        self.build(KeySpec, {"key_id": alias}, f"{where} alias", self.source)
        where = f"{where} ({alias})"
        secret = self.secret(entry, where)
        fields: dict[str, Any] = {}
        for name, kind in _KEY_KINDS.items():
            if name in entry:
                value = self.check(entry[name], kind, f"{where} {name}", self.source, False)
                self.build(KeySpec, {"key_id": alias, name: value}, f"{where} {name}", self.source)
                fields[name] = value
        return alias, secret, KeySpec(key_id=alias, **fields)

    def secret(self, entry: dict[str, Any], where: str) -> str:
        """The secret of a ``[[keys]]`` table: ``secret`` or ``secret_env``."""
        if ("secret" in entry) == ("secret_env" in entry):
            given = "both secret and secret_env" if "secret" in entry else "no secret"
            self.fail(
                f"{where} has {given}",
                where=where,
                fix='give exactly one: secret_env = "ENV_VAR" (keeps the key out of the '
                'file) or secret = "..."',
            )
        if "secret" in entry:
            secret = self.check(entry["secret"], _STR, f"{where} secret", self.source, False)
            if not valid_secret(secret):
                self.fail(
                    f"{where} secret is empty or has whitespace or non-ASCII characters",
                    where=f"{where} secret",
                    fix="copy the key again",
                )
            return str(secret)
        name = self.check(entry["secret_env"], _STR, f"{where} secret_env", self.source, False)
        if not _ENV_NAME.fullmatch(name):
            self.fail(
                f"{where} secret_env must name an environment variable",
                where=f"{where} secret_env",
                fix='write the variable\'s name, such as secret_env = "OPENROUTER_KEY_MAIN"'
                " (the key itself goes in that variable)",
            )
        value = self.environ.get(name, "").strip()
        if not value:
            self.unset_variable(name, f"{where} secret_env", "key", "")
        if not valid_secret(value):
            self.fail(
                f"{where}: the key in {name} has whitespace or non-ASCII characters",
                where=f"{where} secret_env",
                fix=f"copy the key into {name} again",
            )
        return value


_TABLE_KINDS = {
    "server": _SERVER_KINDS,
    "http": _HTTP_KINDS,
    "pool": _POOL_KINDS,
    "auth": _AUTH_KINDS,
    "state": _STATE_KINDS,
    "catalog": _CATALOG_KINDS,
    "routing": _ROUTING_KINDS,
    "analytics": _ANALYTICS_KINDS,
    "alerting": _ALERTING_KINDS,
    "shared": _SHARED_KINDS,
}


def _parse(text: str, kind: str) -> Any:
    """A command-line string as ``kind``; unchanged when it does not parse."""
    word = text.strip().lower()
    try:
        if kind == _INT:
            return int(word)
        if kind in (_FLOAT, _NEVER):
            return "never" if word in ("never", "none", "false") else float(word)
    except ValueError:
        return text
    if kind == _BOOL and word in _TRUE | _FALSE:
        return word in _TRUE
    return text


def _describe(value: Any) -> str:
    """A value's TOML type (a string's content is never shown: it may be a secret)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return shown(value)
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _host_problem(host: str) -> str | None:
    """Why the server cannot listen on ``host`` (None: it can try).

    Checked before the client-token rule, so that a mistyped address is
    reported as such. An IP address is taken as is (whether this machine has
    it shows when binding); a name must be well formed and resolve, as the
    server resolves it. Names under ``.invalid`` never resolve (RFC 6761): no
    lookup is made for them.
    """
    if host == "":
        return None  # every interface
    if any(c.isspace() for c in host):
        return f"must be a host name or address, got {host!r}"
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        pass
    else:
        return None if bare == host else f"takes an IPv6 address without brackets: {bare!r}"
    labels = host.removesuffix(".").split(".")
    if ":" in host or all(label.isdigit() for label in labels):
        return f"is not a valid IP address: {host!r}"
    if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        return f"is not a valid host name or address: {host!r}"
    if labels[-1].lower() == "invalid":
        return f"cannot be resolved: {host!r} is under the reserved .invalid domain"
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return f"cannot be resolved: {host!r} ({reason})"
    return None


def url_problem(url: str, *, webhook: bool = False) -> str | None:
    """Why ``url`` is not a usable http(s) URL (None: it is): a scheme, an
    ASCII host name (or address), a port if any that is one, no whitespace or
    control characters; and unless ``webhook``, no user, password, query or
    fragment (a base URL). The URL itself is not in the answer."""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
        port_error = None
        try:
            parts.port  # noqa: B018 - raises ValueError when out of range or not a number
        except ValueError:
            port_error = "must have a port from 1 to 65535 after the host"
    except ValueError:  # a malformed [IPv6] host
        hostname = None
    if not hostname or parts.scheme not in ("http", "https"):
        return "must be an http(s) URL"
    if not webhook and (parts.username is not None or parts.password is not None):
        return "must not hold a user or password (keys go in [[keys]])"
    if not webhook and (parts.query or parts.fragment):
        return "must not have a query or fragment"
    if _unprintable(url):
        return "must not have spaces or control characters (write a space as %20)"
    if port_error is not None or parts.port == 0:
        return port_error or "must have a port from 1 to 65535 after the host"
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        pass
    else:
        return None
    if not hostname.isascii():
        try:
            ascii_name = hostname.encode("idna").decode("ascii")
        except UnicodeError:
            return "must have a valid host name"
        return f"must have an ASCII host name: write {ascii_name!r} for {hostname!r}"
    labels = hostname.removesuffix(".").split(".")
    if len(hostname) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        return "must have a valid host name (letters, digits and '-' between dots)"
    return None


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _same_file(a: str, b: str) -> bool:
    """Do the paths ``a`` and ``b`` name one file (or would, once created)?"""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)
    except ValueError:  # an embedded NUL
        return False


def _unprintable(text: str) -> bool:
    """Has ``text`` whitespace or control characters (no URL has them raw)?"""
    return any(c.isspace() or not c.isprintable() for c in text)
