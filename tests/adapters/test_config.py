"""Configuration of `keyrotor serve`: the file, the environment, overrides, every error."""

from __future__ import annotations

import pathlib
import re
import tomllib
from typing import Any

import attrs
import pytest

from keyrotor.adapters.config import (
    SERVER_DEFAULTS,
    ConfigError,
    ProxyConfig,
    load_config,
)
from keyrotor.adapters.proxy.server import ServerOptions
from keyrotor.core import KeySpec, PoolConfig
from keyrotor.transports._driver import OPENROUTER_URL, mask
from keyrotor.transports._http import HTTPOptions

DOC = pathlib.Path(__file__).parents[2] / "docs" / "configuration.md"
FILE = "keyrotor.toml"

S1 = "sk-or-v1-" + "a1b2c3d4" * 8
S2 = "sk-or-v1-" + "e5f6a7b8" * 8
S3 = "sk-or-v1-" + "c9d0e1f2" * 8
S4 = "sk-or-v1-" + "13572468" * 8
T_ADMIN = "admin-token-" + "0a1b2c3d" * 3
T_CLIENT = "client-token-" + "4e5f6a7b" * 3
SECRETS = (S1, S2, S3, S4, T_ADMIN, T_CLIENT)

POOL_FIELDS = {f.name for f in attrs.fields(PoolConfig)} - {"keys"}
HTTP_FIELDS = {f.name for f in attrs.fields(HTTPOptions)}
KEY_FIELDS = {f.name for f in attrs.fields(KeySpec)} - {"key_id"}


@pytest.fixture(autouse=True)
def _here(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files are written to, and named relative to, a fresh directory."""
    monkeypatch.chdir(tmp_path)


def load(
    text: str, environ: dict[str, str] | None = None, overrides: dict[str, Any] | None = None
) -> ProxyConfig:
    pathlib.Path(FILE).write_text(text, "utf-8")
    return load_config(FILE, environ or {}, overrides)


def error_of(text: str | None, environ: dict[str, str], overrides: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        if text is None:
            load_config(None, environ, overrides)
        else:
            load(text, environ, overrides)
    return info.value


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text
        assert secret[9:-4] not in text  # not even the middle of one


FULL = f"""
upstream = "http://127.0.0.1:9999/v1"
routing_note = true
log_format = "text"

[server]
host = "0.0.0.0"
port = 9001
max_header_bytes = 1000
max_body_bytes = 2000
header_timeout = 1.5
body_timeout = 2.5
idle_timeout = 3.5
request_timeout = 4.5
grace_period = 4
max_connections = 50
max_unproven = 20
max_unproven_per_address = 5
parser = "h11"
gc_threshold = 5000

[http]
connect = 1.0
first_byte = 2.0
first_byte_stream = 1.5
idle = 3.0
write = 4.0
pool = 5.0
max_connections = 6
max_connections_per_key = 3
keepalive_expiry = 7.0
probe_timeout = 8.0
parser = "httptools"

[pool]
policy = "latency"
weight_by = "credits"
seed = 42
max_attempts = 5
queue_limit = 7
queue_timeout = 8.5
rate_limit_cooldown = 60
in_flight_budget_cooldown = 2.0
degraded_cooldown = 120.0
error_window = 30.0
error_min_requests = 9
error_threshold = 0.25
timeout_strikes = 3
min_healthy = 2
probe_interval = 11.0
recheck_interval = 600.0
latency_alpha = 0.6
latency_explore = 0.1
affinity_vnodes = 4

[headers]
"HTTP-Referer" = "https://example.com"
"X-Title" = "Tests"

[auth]
admin_token = "{T_ADMIN}"
client_tokens = ["{T_CLIENT}"]
token_ttl = 600

[state]
path = "state/keyrotor.db"
flush_interval = 0.5
flush_in = "thread"

[[keys]]
alias = "main"
secret = "{S1}"
weight = 2.5
account = "acct"
max_in_flight = 3
rpm = 60.0
tpm = 1000
budget = 10.0
budget_window = 86400.0
credits = 4.5

[[keys]]
alias = "side"
secret_env = "SIDE_KEY"
"""


def test_full_file_lands_every_option_where_it_belongs() -> None:
    config = load(FULL, {"SIDE_KEY": S2})
    assert config.keys == {"main": S1, "side": S2}
    assert config.upstream == "http://127.0.0.1:9999/v1"
    assert config.routing_note is True
    assert config.log_format == "text"
    assert (config.admin_token, config.client_tokens, config.token_ttl) == (
        T_ADMIN,
        (T_CLIENT,),
        600.0,
    )
    assert (config.state_path, config.state_flush) == ("state/keyrotor.db", 0.5)
    assert (config.state_flush_in, load("", {"OPENROUTER_KEYS": S1}).state_flush_in) == (
        "thread",
        "loop",  # the default
    )
    assert config.server == {
        "host": "0.0.0.0",
        "port": 9001,
        "max_header_bytes": 1000,
        "max_body_bytes": 2000,
        "header_timeout": 1.5,
        "body_timeout": 2.5,
        "idle_timeout": 3.5,
        "request_timeout": 4.5,
        "grace_period": 4.0,
        "max_connections": 50,
        "max_unproven": 20,
        "max_unproven_per_address": 5,
        "parser": "h11",
        "gc_threshold": 5000,
    }
    assert isinstance(config.server["grace_period"], float)
    assert config.http == HTTPOptions(
        connect=1.0,
        first_byte=2.0,
        first_byte_stream=1.5,
        idle=3.0,
        write=4.0,
        pool=5.0,
        max_connections=6,
        max_connections_per_key=3,
        keepalive_expiry=7.0,
        probe_timeout=8.0,
        parser="httptools",
    )
    assert config.pool == PoolConfig(
        keys=[
            KeySpec(
                key_id="main",
                weight=2.5,
                account="acct",
                max_in_flight=3,
                rpm=60.0,
                tpm=1000.0,
                budget=10.0,
                budget_window=86400.0,
                credits=4.5,
            ),
            KeySpec(key_id="side"),
        ],
        policy="latency",
        weight_by="credits",
        seed=42,
        max_attempts=5,
        queue_limit=7,
        queue_timeout=8.5,
        rate_limit_cooldown=60.0,
        in_flight_budget_cooldown=2.0,
        degraded_cooldown=120.0,
        error_window=30.0,
        error_min_requests=9,
        error_threshold=0.25,
        timeout_strikes=3,
        min_healthy=2,
        probe_interval=11.0,
        recheck_interval=600.0,
        latency_alpha=0.6,
        latency_explore=0.1,
        affinity_vnodes=4,
    )
    assert config.headers == {"HTTP-Referer": "https://example.com", "X-Title": "Tests"}


def test_the_full_file_sets_every_option_there_is() -> None:
    """Guards the loader's schema against new fields in the classes it fills."""
    data = tomllib.loads(FULL)
    assert set(data["server"]) == set(SERVER_DEFAULTS)
    assert set(data["http"]) == HTTP_FIELDS
    assert set(data["pool"]) == POOL_FIELDS
    assert set(data["keys"][0]) == KEY_FIELDS | {"alias", "secret"}
    for name in [*POOL_FIELDS, *HTTP_FIELDS]:  # and the loader takes each one alone
        table = "pool" if name in POOL_FIELDS else "http"
        value = data[table][name]
        line = f'{name} = "{value}"' if isinstance(value, str) else f"{name} = {value}"
        config = load(f"[{table}]\n{line}", {"OPENROUTER_KEYS": S1})
        assert getattr(config.pool if table == "pool" else config.http, name) == value


def test_server_host_may_be_empty_and_grace_period_zero_as_the_server_allows() -> None:
    environ = {"OPENROUTER_KEYS": S1, "KEYROTOR_CLIENT_TOKENS": T_CLIENT}
    config = load('[server]\nhost = ""\ngrace_period = 0\ngc_threshold = 0', environ)
    assert (config.server["host"], config.server["grace_period"]) == ("", 0.0)
    assert config.server["gc_threshold"] == 0  # Python's own collector settings
    ServerOptions(**config.server)
    for bad in (-1, 2**31, True, 1.5):  # the server's own check, for code that builds it
        with pytest.raises(ValueError, match=r"gc_threshold must be an int in 0\.\.10000000"):
            ServerOptions(gc_threshold=bad)


def test_environment_keys_only_with_every_default() -> None:
    environ = {
        "OPENROUTER_API_KEY_10": S4,
        "OPENROUTER_API_KEY_2": S3,
        "OPENROUTER_API_KEY": S2,
        "OPENROUTER_KEYS": f" {S1} ,",
    }
    config = load_config(None, environ)
    assert config.keys == {"env1": S1, "env2": S2, "env3": S3, "env4": S4}
    assert config.pool == PoolConfig(keys=[KeySpec(key_id=f"env{i}") for i in range(1, 5)])
    assert config.server == dict(SERVER_DEFAULTS)
    assert config.http == HTTPOptions()
    assert config.upstream == OPENROUTER_URL
    assert (config.headers, config.routing_note, config.log_format) == ({}, False, "json")


def test_the_proxy_and_the_client_name_the_environments_keys_alike() -> None:
    from keyrotor.transports.sync import Client

    environ = {
        "OPENROUTER_API_KEY_10": S4,
        "OPENROUTER_API_KEY_2": S3,
        "OPENROUTER_API_KEY": S2,
        "OPENROUTER_KEYS": f"{S1},{S2}",  # S2 twice: dropped the second time, by both
    }
    config = load_config(None, environ, {"state.enabled": False})
    with Client.from_env(environ) as client:
        assert (
            client.driver.secrets == config.keys == {"env1": S1, "env2": S2, "env3": S3, "env4": S4}
        )
        assert [k["alias"] for k in client.status()["keys"]] == ["env1", "env2", "env3", "env4"]


def test_a_host_name_is_resolved_before_the_token_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    looked_up = []

    def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    error = error_of(None, ENV, {"host": "proxy.internal"})  # no client tokens either
    assert str(error) == (
        "command line: [server] host cannot be resolved: 'proxy.internal' (Name or service not "
        'known); fix: set host = "127.0.0.1" (this machine) or "0.0.0.0" (every interface)'
    )
    assert looked_up == ["proxy.internal"]
    for address in ("127.0.0.1", "::", "0.0.0.0", ""):  # addresses are never looked up
        load_config(None, {**ENV, "KEYROTOR_CLIENT_TOKENS": T_CLIENT}, {"host": address})
    assert looked_up == ["proxy.internal"]


def test_an_empty_file_and_environment_keys() -> None:
    config = load("", {"OPENROUTER_API_KEY": S1})
    assert config.keys == {"env1": S1}


def test_file_keys_and_environment_keys_are_united_file_first() -> None:
    text = f'[[keys]]\nalias = "mine"\nsecret = "{S1}"\nrpm = 10\n'
    config = load(text, {"OPENROUTER_KEYS": f"{S2},{S3}"})
    assert config.keys == {"mine": S1, "env1": S2, "env2": S3}
    assert [spec.key_id for spec in config.pool.keys] == ["mine", "env1", "env2"]
    assert config.pool.keys[0].rpm == 10.0


def test_secret_env_reads_its_variable_which_is_then_not_an_environment_key() -> None:
    text = '[[keys]]\nalias = "main"\nsecret_env = "OPENROUTER_API_KEY"\n'
    config = load(text, {"OPENROUTER_API_KEY": f"  {S1}\n", "OPENROUTER_KEYS": S2})
    assert config.keys == {"main": S1, "env1": S2}


def test_recheck_interval_false_or_never_is_none() -> None:
    env = {"OPENROUTER_KEYS": S1}
    assert load("[pool]\nrecheck_interval = false", env).pool.recheck_interval is None
    assert load('[pool]\nrecheck_interval = "never"', env).pool.recheck_interval is None
    assert load("[pool]\nrecheck_interval = 5", env).pool.recheck_interval == 5.0


def test_upstream_precedence_override_then_file_then_environment_then_default() -> None:
    env = {"OPENROUTER_KEYS": S1}
    base = {**env, "OPENROUTER_BASE_URL": "http://env.example/v1"}
    assert load("", env).upstream == OPENROUTER_URL
    assert load("", base).upstream == "http://env.example/v1"
    assert load('upstream = "http://file.example/v1"', base).upstream == "http://file.example/v1"
    overridden = load('upstream = "http://file.example/v1"', base, {"upstream": "http://cli/v1"})
    assert overridden.upstream == "http://cli/v1"


def test_tokens_from_the_environment_and_the_file_are_united() -> None:
    other = "client-token-" + "9" * 20
    environ = {
        "OPENROUTER_KEYS": S1,
        "KEYROTOR_ADMIN_TOKEN": T_ADMIN,
        "KEYROTOR_CLIENT_TOKENS": f"{T_CLIENT}, {other},",
        "KEYROTOR_SECRET_KEY": "a-secret-key-for-storage",
    }
    config = load(f'[auth]\nclient_tokens = ["{T_CLIENT}"]', environ)
    assert config.admin_token == T_ADMIN
    assert config.client_tokens == (T_CLIENT, other)
    assert config.secret_key == "a-secret-key-for-storage"
    for text in (repr(config), str(config)):
        assert_no_secret(text)
        assert other not in text and "a-secret-key-for-storage" not in text


def test_state_defaults_to_the_users_data_directory_and_can_be_turned_off() -> None:
    env = {"OPENROUTER_KEYS": S1}
    assert load("", {**env, "XDG_DATA_HOME": "/data"}).state_path == "/data/keyrotor/state.db"
    assert load("", {**env, "KEYROTOR_STATE": "/x/s.db"}).state_path == "/x/s.db"
    assert load("", env, {"state.path": "here.db"}).state_path == "here.db"
    assert load("[state]\nenabled = false", env).state_path is None
    # With the state on, the stored keys may be all there is: no error here.
    assert load("", {}).keys == {}


@pytest.mark.parametrize(
    ("text", "environ", "match"),
    [
        ('[auth]\nadmin_token = "short"', {}, "admin token is shorter than 16"),
        ("", {"KEYROTOR_CLIENT_TOKENS": "abc"}, "client token #1 is shorter than 16"),
        (f'[auth]\nadmin_token = "{T_CLIENT}"', {"KEYROTOR_CLIENT_TOKENS": T_CLIENT}, "also a"),
        ('[server]\nhost = "0.0.0.0"', {}, "without client tokens"),
        ("[auth]\nclient_tokens = 3", {}, "must be an array of strings"),
        ("[auth]\ntoken_ttl = 0", {}, "token_ttl must be more than zero"),
        ("[state]\nflush_interval = -1", {}, "flush_interval must be more than zero"),
        ("[state]\nfile = 'x'", {}, "unknown option \\[state\\] file"),
        (
            '[state]\nflush_in = "threads"',
            {},
            "\\[state\\] flush_in must be one of loop, thread, got 'threads'; did you mean "
            'thread\\?; fix: set \\[state\\] flush_in = "loop"',
        ),
        ('[server]\nparser = "fast"', {}, 'unknown HTTP parser .fast.: choose "auto"'),
        ('[http]\nparser = "llhttp"', {}, 'unknown HTTP parser .llhttp.: choose "auto"'),
        ("[http]\nparser = 1", {}, "must be a string"),
    ],
)
def test_auth_and_state_errors(text: str, environ: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        load(text, {"OPENROUTER_KEYS": S1, **environ})
    assert "short" not in str(info.value).replace("shorter", "")
    assert_no_secret(str(info.value))


def test_overrides_win_over_the_file_and_none_means_not_given() -> None:
    text = (
        '[server]\nport = 9001\nhost = "0.0.0.0"\n'
        '[pool]\npolicy = "latency"\n[headers]\nX-Title = "file"'
    )
    overrides = {
        "port": 9002,
        "host": None,
        "pool.policy": "least_busy",
        "http.connect": 2,
        "server.max_connections": 7,
        "max_body_bytes": 100,
        "headers.X-Title": "cli",
        "log_format": "text",
        "routing_note": True,
        "auth.client_tokens": f" {T_CLIENT} ,",
        "state.enabled": "false",
    }
    config = load(text, {"OPENROUTER_KEYS": S1}, overrides)
    assert (config.client_tokens, config.state_path) == ((T_CLIENT,), None)
    assert (config.server["port"], config.server["host"]) == (9002, "0.0.0.0")
    assert (config.server["max_connections"], config.server["max_body_bytes"]) == (7, 100)
    assert config.pool.policy == "least_busy"
    assert config.http.connect == 2.0 and config.http.max_connections == 200
    assert config.headers == {"X-Title": "cli"}
    assert (config.log_format, config.routing_note) == ("text", True)


def test_override_strings_are_converted_to_the_options_type() -> None:
    overrides = {
        "port": "9000",
        "routing_note": "yes",
        "pool.recheck_interval": "never",
        "pool.max_attempts": "4",
        "http.idle": "2.5",
    }
    config = load_config(None, {"OPENROUTER_KEYS": S1}, overrides)
    assert config.server["port"] == 9000
    assert config.routing_note is True
    assert config.pool.recheck_interval is None
    assert config.pool.max_attempts == 4
    assert config.http.idle == 2.5
    assert load_config(None, {"OPENROUTER_KEYS": S1}, {"routing_note": "0"}).routing_note is False


# Each case: (id, file text or None for no file, environ, overrides, the whole message).
KEY = f'[[keys]]\nalias = "main"\nsecret = "{S1}"\n'
ENV = {"OPENROUTER_KEYS": S2}
ENV_HELP = (
    "set OPENROUTER_KEYS (comma-separated), OPENROUTER_API_KEY or OPENROUTER_API_KEY_1, _2, ..."
)
ERRORS: list[tuple[str, str | None, dict[str, str], dict[str, Any], str]] = [
    (
        "unknown pool option",
        '[pool]\npolcy = "weighted"',
        ENV,
        {},
        "keyrotor.toml: unknown option [pool] polcy; did you mean policy?",
    ),
    (
        "unknown top-level option",
        'upstrem = "http://x/v1"',
        ENV,
        {},
        "keyrotor.toml: unknown option upstrem; did you mean upstream?",
    ),
    (
        "unknown option far from any",
        "[http]\nzzz = 1",
        ENV,
        {},
        "keyrotor.toml: unknown option [http] zzz; fix: remove it; the options here are connect, "
        "first_byte, first_byte_stream, idle, write, pool, max_connections, "
        "max_connections_per_key, keepalive_expiry, probe_timeout, parser",
    ),
    (
        "unknown key option",
        KEY + "rmp = 5",
        {},
        {},
        "keyrotor.toml: unknown option [[keys]] #1 rmp; did you mean rpm?",
    ),
    (
        "unknown override",
        KEY,
        {},
        {"prot": 1},
        "command line: unknown option override prot; did you mean port?",
    ),
    (
        "unknown override option of a table",
        KEY,
        {},
        {"pool.polcy": "weighted"},
        "command line: unknown option [pool] polcy; did you mean policy?",
    ),
    (
        "quoted integer",
        '[pool]\nmax_attempts = "3"',
        ENV,
        {},
        "keyrotor.toml: [pool] max_attempts must be an integer, got a string (write it without "
        "quotes); fix: set max_attempts to an integer",
    ),
    (
        "float for an integer",
        "[server]\nport = 80.5",
        ENV,
        {},
        "keyrotor.toml: [server] port must be an integer, got 80.5; fix: set port to an integer",
    ),
    (
        "boolean for a number",
        "[http]\nconnect = true",
        ENV,
        {},
        "keyrotor.toml: [http] connect must be a number, got true; fix: set connect to a number",
    ),
    (
        "string for a boolean",
        'routing_note = "yes"',
        ENV,
        {},
        "keyrotor.toml: routing_note must be true or false, got a string (write it without "
        "quotes); fix: set routing_note to true or false",
    ),
    (
        "array for a number",
        "[http]\nconnect = [1]",
        ENV,
        {},
        "keyrotor.toml: [http] connect must be a number, got an array; "
        "fix: set connect to a number",
    ),
    (
        "table for a string",
        "[server]\nhost = { name = 1 }",
        ENV,
        {},
        "keyrotor.toml: [server] host must be a string, got a table; fix: set host to a string",
    ),
    (
        "date for a number",
        "[pool]\nseed = 2024-01-01",
        ENV,
        {},
        "keyrotor.toml: [pool] seed must be an integer, got a date; fix: set seed to an integer",
    ),
    (
        "table given a value",
        "server = 5",
        ENV,
        {},
        "keyrotor.toml: server must be a table, got 5; "
        "fix: write the options under a [server] line",
    ),
    (
        "keys as a single table",
        f'[keys]\nalias = "main"\nsecret = "{S1}"',
        {},
        {},
        "keyrotor.toml: keys must be an array of tables; "
        "fix: write [[keys]] (double brackets) above each key",
    ),
    (
        "keys as an array of strings",
        f'keys = ["{S1}"]',
        {},
        {},
        "keyrotor.toml: [[keys]] #1 must be a table, got a string; fix: write [[keys]] then "
        'alias = "..." and secret_env = "..." on their own lines',
    ),
    (
        "pool value refused by the core",
        "[pool]\nmax_attempts = 0",
        ENV,
        {},
        "keyrotor.toml: [pool] max_attempts is invalid: PoolConfig.max_attempts must be an "
        "integer of at least 1, got 0; fix: set max_attempts to an integer >= 1",
    ),
    (
        "fraction over one",
        "[pool]\nerror_threshold = 1.5",
        ENV,
        {},
        "keyrotor.toml: [pool] error_threshold is invalid: PoolConfig.error_threshold must be "
        "between 0 and 1, got 1.5; fix: set error_threshold to a fraction such as 0.5",
    ),
    (
        "unknown policy",
        '[pool]\npolicy = "roundrobin"',
        ENV,
        {},
        "keyrotor.toml: [pool] policy is invalid: unknown policy 'roundrobin'; fix: choose one of "
        "round_robin, weighted, least_busy, latency, affinity; did you mean round_robin?",
    ),
    (
        "recheck_interval true",
        "[pool]\nrecheck_interval = true",
        ENV,
        {},
        'keyrotor.toml: [pool] recheck_interval must be a number, or false / "never", got true; '
        'fix: set recheck_interval to a number, or false / "never"',
    ),
    (
        "port out of range",
        "[server]\nport = 70000",
        ENV,
        {},
        "keyrotor.toml: [server] port must be from 0 to 65535, got 70000; fix: choose a free TCP "
        "port such as 8080 (0: any free port)",
    ),
    (
        "host with a space",
        '[server]\nhost = "local host"',
        ENV,
        {},
        "keyrotor.toml: [server] host must be a host name or address, got 'local host'; "
        'fix: set host = "127.0.0.1" (this machine) or "0.0.0.0" (every interface)',
    ),
    (
        "host an impossible IPv4 address, reported before the token rule",
        None,
        ENV,
        {"host": "999.1.1.1"},
        "command line: [server] host is not a valid IP address: '999.1.1.1'; "
        'fix: set host = "127.0.0.1" (this machine) or "0.0.0.0" (every interface)',
    ),
    (
        "host a name that cannot resolve (no lookup for .invalid), before the token rule",
        None,
        ENV,
        {"host": "no.such.host.invalid"},
        "command line: [server] host cannot be resolved: 'no.such.host.invalid' is under the "
        'reserved .invalid domain; fix: set host = "127.0.0.1" (this machine) or "0.0.0.0" '
        "(every interface)",
    ),
    (
        "host a malformed name",
        '[server]\nhost = "proxy..example.com"',
        ENV,
        {},
        "keyrotor.toml: [server] host is not a valid host name or address: "
        '\'proxy..example.com\'; fix: set host = "127.0.0.1" (this machine) or "0.0.0.0" '
        "(every interface)",
    ),
    (
        "host an IPv6 address in brackets",
        '[server]\nhost = "[::1]"',
        ENV,
        {},
        "keyrotor.toml: [server] host takes an IPv6 address without brackets: '::1'; "
        'fix: set host = "127.0.0.1" (this machine) or "0.0.0.0" (every interface)',
    ),
    (
        "negative server timeout",
        "[server]\nidle_timeout = -1",
        ENV,
        {},
        "keyrotor.toml: [server] idle_timeout must be more than zero, got -1.0; fix: set "
        "idle_timeout to a positive number (default 75.0)",
    ),
    (
        "negative grace period",
        "[server]\ngrace_period = -1",
        ENV,
        {},
        "keyrotor.toml: [server] grace_period must be zero or more, got -1.0; fix: set "
        "grace_period to a positive number (default 30.0)",
    ),
    (
        "negative gc threshold",
        "[server]\ngc_threshold = -5",
        ENV,
        {},
        "keyrotor.toml: [server] gc_threshold must be zero or more, got -5; fix: set "
        "gc_threshold to a positive integer (default 10000), or 0 for Python's own settings",
    ),
    (
        "gc threshold past a C int",
        "[server]\ngc_threshold = 3000000000",
        ENV,
        {},
        "keyrotor.toml: [server] gc_threshold must be at most 10,000,000, got 3000000000; fix: "
        "set gc_threshold to 10000 (the default), or 0 for Python's own settings",
    ),
    (
        "zero server limit",
        "[server]\nmax_body_bytes = 0",
        ENV,
        {},
        "keyrotor.toml: [server] max_body_bytes must be more than zero, got 0; fix: set "
        "max_body_bytes to a positive integer (default 10485760)",
    ),
    (
        "infinite server timeout",
        "[server]\nbody_timeout = inf",
        ENV,
        {},
        "keyrotor.toml: [server] body_timeout must be more than zero, got inf; fix: set "
        "body_timeout to a positive number (default 30.0)",
    ),
    (
        "http value refused",
        "[http]\nconnect = 0",
        ENV,
        {},
        "keyrotor.toml: [http] connect is invalid: HTTPOptions.connect must be a positive finite "
        "number, got 0.0; fix: set connect to a number more than zero",
    ),
    (
        "infinite http timeout",  # TOML reads 1e400 as inf: no timeout at all
        "[http]\nconnect = 1e400",
        ENV,
        {},
        "keyrotor.toml: [http] connect is invalid: HTTPOptions.connect must be a positive finite "
        "number, got inf; fix: set connect to a number more than zero",
    ),
    (
        "bad override string",
        KEY,
        {},
        {"port": "eighty"},
        "command line: [server] port must be an integer, got a string; fix: set port to an integer",
    ),
    (
        "bad override boolean",
        KEY,
        {},
        {"routing_note": "maybe"},
        "command line: routing_note must be true or false, got a string; "
        "fix: set routing_note to true or false",
    ),
    (
        "bad override value",
        KEY,
        {},
        {"pool.min_healthy": -1},
        "command line: [pool] min_healthy is invalid: PoolConfig.min_healthy must be an integer "
        "of at least 0, got -1; fix: set min_healthy to an integer >= 0",
    ),
    (
        "key value refused by the core",
        KEY + "weight = 0",
        {},
        {},
        "keyrotor.toml: [[keys]] #1 (main) weight is invalid: KeySpec.weight must be a finite "
        "number more than zero, got 0.0; fix: set weight to a positive number or None",
    ),
    (
        "invalid alias",
        f'[[keys]]\nalias = "my key"\nsecret = "{S1}"',
        {},
        {},
        "keyrotor.toml: [[keys]] #1 alias is invalid: invalid key_id 'my key'; fix: use an alias "
        "of 1-128 letters, digits or ._:@+- (never the secret itself)",
    ),
    (
        "missing alias",
        f'[[keys]]\nsecret = "{S1}"',
        {},
        {},
        'keyrotor.toml: [[keys]] #1 has no alias; fix: add alias = "main" (a short name shown in '
        "logs and status)",
    ),
    (
        "both secret and secret_env",
        KEY + 'secret_env = "X"',
        {"X": S2},
        {},
        "keyrotor.toml: [[keys]] #1 (main) has both secret and secret_env; fix: give exactly one: "
        'secret_env = "ENV_VAR" (keeps the key out of the file) or secret = "..."',
    ),
    (
        "neither secret nor secret_env",
        '[[keys]]\nalias = "main"',
        {},
        {},
        "keyrotor.toml: [[keys]] #1 (main) has no secret; fix: give exactly one: "
        'secret_env = "ENV_VAR" (keeps the key out of the file) or secret = "..."',
    ),
    (
        "secret with whitespace",
        f'[[keys]]\nalias = "main"\nsecret = "{S1} {S2}"',
        {},
        {},
        "keyrotor.toml: [[keys]] #1 (main) secret is empty or has whitespace or non-ASCII "
        "characters; fix: copy the key again",
    ),
    (
        "missing secret_env variable",
        '[[keys]]\nalias = "main"\nsecret_env = "OPENROUTER_KEY_MAIN"',
        {},
        {},
        "keyrotor.toml: [[keys]] #1 (main) secret_env: the environment variable "
        "OPENROUTER_KEY_MAIN is not set; fix: export OPENROUTER_KEY_MAIN=<the key> before "
        "starting keyrotor",
    ),
    (
        "doc's missing secret_env variable",
        '[[keys]]\nalias = "main"\nsecret_env = "M"\n'
        '[[keys]]\nalias = "free-1"\nsecret_env = "OPENROUTER_KEY_FREE_1"',
        {"M": S1, "OPENROUTER_KEY_FREE_1": "  "},
        {},
        "keyrotor.toml: [[keys]] #2 (free-1) secret_env: the environment variable "
        "OPENROUTER_KEY_FREE_1 is not set; fix: export OPENROUTER_KEY_FREE_1=<the key> before "
        "starting keyrotor",
    ),
    (
        "secret_env variable with whitespace inside",
        '[[keys]]\nalias = "main"\nsecret_env = "K"',
        {"K": f"{S1} {S2}"},
        {},
        "keyrotor.toml: [[keys]] #1 (main): the key in K has whitespace or non-ASCII characters; "
        "fix: copy the key into K again",
    ),
    (
        "secret_env holding the secret itself",
        f'[[keys]]\nalias = "main"\nsecret_env = "{S1}"',
        {},
        {},
        "keyrotor.toml: [[keys]] #1 (main) secret_env must name an environment variable; fix: "
        'write the variable\'s name, such as secret_env = "OPENROUTER_KEY_MAIN" (the key itself '
        "goes in that variable)",
    ),
    (
        "duplicate alias",
        KEY + f'[[keys]]\nalias = "main"\nsecret = "{S2}"',
        {},
        {},
        "keyrotor.toml: [[keys]] #2 alias 'main' is already used by [[keys]] #1; fix: give every "
        "key its own alias",
    ),
    (
        "same secret in the file and the environment",
        KEY,
        {"OPENROUTER_API_KEY_3": S1},
        {},
        "keyrotor.toml: the same secret is given for 'main' ([[keys]] #1) and 'env1' (the "
        "environment); fix: list each key once: remove 'env1' or 'main'",
    ),
    (
        "same secret twice in the file",
        KEY + '[[keys]]\nalias = "other"\nsecret_env = "K"',
        {"K": S1},
        {},
        "keyrotor.toml: the same secret is given for 'main' ([[keys]] #1) and 'other' ([[keys]] "
        "#2); fix: list each key once: remove 'other' or 'main'",
    ),
    (
        "alias taken from the environment's keys",
        f'[[keys]]\nalias = "env1"\nsecret = "{S1}"',
        ENV,
        {},
        "keyrotor.toml: [[keys]] #1 alias 'env1' is also the name of a key from the environment; "
        "fix: rename the file's key: env1, env2, ... name the environment's keys",
    ),
    (
        "environment key with whitespace",
        None,
        {"OPENROUTER_KEYS": f"{S1},{S2} {S3}"},
        {},
        "environment: the environment's key env2 has whitespace or non-ASCII characters; fix: "
        "copy the key again into OPENROUTER_KEYS / OPENROUTER_API_KEY*",
    ),
    (
        "no keys in the file nor the environment",
        "[pool]\nseed = 1\n[state]\nenabled = false",
        {},
        {},
        f"keyrotor.toml: no API keys: add [[keys]] to keyrotor.toml or {ENV_HELP}",
    ),
    (
        "no keys and no file",
        None,
        {"OPENROUTER_KEYS": " , "},
        {"state.enabled": "false"},
        f"configuration: no API keys: pass --config FILE with [[keys]] or {ENV_HELP}",
    ),
    (
        "invalid TOML",
        'upstream = "http://x/v1"\n\n[pool]\npolicy "weighted"\n',
        ENV,
        {},
        "keyrotor.toml: invalid TOML: Expected '=' after a key in a key/value pair (at line 4, "
        "column 8); fix: correct the TOML syntax there",
    ),
    (
        "invalid upstream",
        'upstream = "openrouter.ai/api/v1"',
        ENV,
        {},
        "keyrotor.toml: upstream must be an http(s) URL, got 'openrouter.ai/api/v1'; fix: set "
        'upstream to the base URL, such as "https://openrouter.ai/api/v1"',
    ),
    (
        "upstream with a password",
        f'upstream = "https://me:{S1}@openrouter.ai/api/v1"',
        ENV,
        {},
        "keyrotor.toml: upstream must not hold a user or password (keys go in [[keys]]); fix: "
        'set upstream to the base URL, such as "https://openrouter.ai/api/v1"',
    ),
    (
        "upstream with a query",
        'upstream = "https://x.example/v1?key=1"',
        ENV,
        {},
        "keyrotor.toml: upstream must not have a query or fragment, got "
        "'https://x.example/v1?key=1'; fix: set upstream to the base URL, such as "
        '"https://openrouter.ai/api/v1"',
    ),
    (
        "upstream with a broken IPv6 host",
        'upstream = "http://[::1/v1"',
        ENV,
        {},
        "keyrotor.toml: upstream must be an http(s) URL, got 'http://[::1/v1'; fix: set "
        'upstream to the base URL, such as "https://openrouter.ai/api/v1"',
    ),
    (
        "invalid OPENROUTER_BASE_URL",
        "",
        {**ENV, "OPENROUTER_BASE_URL": "ftp://x"},
        {},
        "environment: OPENROUTER_BASE_URL must be an http(s) URL, got 'ftp://x'; fix: set "
        'OPENROUTER_BASE_URL to the base URL, such as "https://openrouter.ai/api/v1"',
    ),
    (
        "invalid log_format",
        'log_format = "jsonl"',
        ENV,
        {},
        "keyrotor.toml: log_format must be one of json, text, got 'jsonl'; did you mean json?; "
        'fix: set log_format = "json"',
    ),
    (
        "Authorization header",
        '[headers]\nAuthorization = "Bearer x"',
        ENV,
        {},
        "keyrotor.toml: [headers] Authorization is set by keyrotor itself; fix: remove "
        "Authorization; keys go in [[keys]]",
    ),
    (
        "header value on two lines",
        '[headers]\nX-Title = "a\\nb"',
        ENV,
        {},
        "keyrotor.toml: [headers] X-Title has characters a header cannot carry; fix: use "
        "printable Latin-1 text on one line",
    ),
    (
        "header value outside Latin-1",
        '[headers]\nX-Title = "5 \u20ac"',
        ENV,
        {},
        "keyrotor.toml: [headers] X-Title has characters a header cannot carry; fix: use "
        "printable Latin-1 text on one line",
    ),
    (
        "header name with a space",
        '[headers]\n"X Title" = "a"',
        ENV,
        {},
        "keyrotor.toml: [headers] X Title is not a valid header name; fix: use letters, digits "
        "and -, such as X-Title",
    ),
    (
        "header value not a string",
        "[headers]\nX-Count = 3",
        ENV,
        {},
        "keyrotor.toml: [headers] X-Count must be a string, got 3; fix: set X-Count to a string",
    ),
    # Secrets pasted where they do not belong: the message masks them.
    (
        "secret as an alias",
        f'[[keys]]\nalias = "{S1}"\nsecret = "{S1}"',
        {},
        {},
        "keyrotor.toml: [[keys]] #1 alias is a secret; fix: use a short name as alias and put "
        "the key in secret_env",
    ),
    (
        "secret as a policy",
        f'[pool]\npolicy = "{S2}"',
        ENV,
        {},
        f"keyrotor.toml: [pool] policy is invalid: unknown policy '{mask(S2)}'; fix: choose one "
        "of round_robin, weighted, least_busy, latency, affinity",
    ),
    (
        "unknown secret as a log format",
        f'log_format = "sk-{S4[9:]}"',
        {"OPENROUTER_KEYS": S3},
        {},
        f"keyrotor.toml: log_format must be one of json, text, got '{mask('sk-' + S4[9:])}'; "
        'fix: set log_format = "json"',
    ),
]


@pytest.mark.parametrize(
    ("text", "environ", "overrides", "message"),
    [case[1:] for case in ERRORS],
    ids=[case[0] for case in ERRORS],
)
def test_each_error_names_the_place_and_the_fix_and_no_secret(
    text: str | None, environ: dict[str, str], overrides: dict[str, Any], message: str
) -> None:
    error = error_of(text, environ, overrides)
    assert str(error) == message
    assert_no_secret(str(error))
    assert_no_secret(repr(error))


def test_an_error_carries_its_parts() -> None:
    error = error_of('[pool]\nmax_attempts = "3"', ENV, {})
    assert (error.source, error.where) == (FILE, "[pool] max_attempts")
    assert error.fix == "set max_attempts to an integer"


def test_a_missing_file_or_a_directory_cannot_be_read() -> None:
    for path in ("missing.toml", "."):
        with pytest.raises(ConfigError) as info:
            load_config(path, ENV)
        assert str(info.value).startswith(f"{path}: cannot read the configuration file: ")
        assert str(info.value).endswith(
            "; fix: check the path given to --config and that the file is readable"
        )
    with pytest.raises(ConfigError, match="No such file or directory"):
        load_config(pathlib.Path("missing.toml"), ENV)


def test_a_file_that_is_not_utf8() -> None:
    pathlib.Path(FILE).write_bytes(b'upstream = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(FILE, ENV)
    assert str(info.value) == (
        "keyrotor.toml: the file is not UTF-8 text (bad byte at offset 12); "
        "fix: save the file as UTF-8"
    )


def test_no_secret_in_the_repr_only_aliases_and_masks() -> None:
    config = load(FULL, {"SIDE_KEY": S2, "OPENROUTER_KEYS": S3})
    for text in (repr(config), str(config)):
        assert_no_secret(text)
        assert f"'main': '{mask(S1)}'" in text
        assert f"'side': '{mask(S2)}'" in text
        assert f"'env1': '{mask(S3)}'" in text
        assert "policy='latency'" in text and "'port': 9001" in text


# ----------------------------------------------------------------- the doc


def doc_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text("utf-8"), re.S)


DOC_ENV = {
    "OPENROUTER_KEY_MAIN": S1,
    "OPENROUTER_KEY_FREE_1": S2,
    "OPENROUTER_KEY_FREE_2": S3,
}


def test_the_docs_example_loads_as_documented() -> None:
    (example,) = doc_blocks("toml")
    config = load(example, DOC_ENV)
    assert config.keys == {"main": S1, "free-1": S2, "free-2": S3}
    assert config.pool.policy == "weighted"
    assert config.pool.keys[0] == KeySpec(
        key_id="main",
        weight=3.0,
        max_in_flight=20,
        rpm=200.0,
        tpm=400000.0,
        budget=50.0,
        budget_window=86400.0,
    )
    assert {spec.account for spec in config.pool.keys[1:]} == {"team-free"}
    assert config.headers["X-Title"] == "My app"
    # Its tables show the defaults (the policy aside, as its comment says).
    assert config.server == dict(SERVER_DEFAULTS)
    assert config.http == HTTPOptions()
    defaults = PoolConfig(keys=config.pool.keys)
    assert attrs.evolve(config.pool, policy="round_robin") == defaults
    assert (config.upstream, config.routing_note, config.log_format) == (
        OPENROUTER_URL,
        False,
        "json",
    )


def test_the_docs_example_and_tables_name_every_option() -> None:
    (example,) = doc_blocks("toml")
    data = tomllib.loads(example)
    assert set(data["server"]) == set(SERVER_DEFAULTS)
    assert set(data["http"]) == HTTP_FIELDS
    assert set(data["pool"]) == POOL_FIELDS
    assert set().union(*data["keys"]) == KEY_FIELDS | {"alias", "secret_env"}
    assert set(data["state"]) == {"enabled", "flush_interval", "flush_in"}  # path: commented out
    documented = set(re.findall(r"^\| `(\w+)` \|", DOC.read_text("utf-8"), re.M))
    everything = set(SERVER_DEFAULTS) | HTTP_FIELDS | POOL_FIELDS | KEY_FIELDS
    everything |= {"admin_token", "client_tokens", "token_ttl", "enabled", "path", "flush_in"}
    assert (
        everything | {"upstream", "routing_note", "log_format", "record", "alias", "secret"}
        <= documented
    )


def test_the_docs_error_examples_are_the_loaders_own_messages() -> None:
    (block,) = doc_blocks("text")
    lines = block.strip().splitlines()
    produced = {case[-1] for case in ERRORS}
    assert len(lines) >= 5
    for line in lines:
        assert line in produced


def test_routes_and_routing_options_are_read_with_the_built_in_free_route() -> None:
    text = """
[routing]
model_cooldown = 30
free_per_minute = 10
free_per_day = 50
free_wait = 0
accounts = { acct = 1000 }

[[routes]]
name = "coding"
strategy = "balanced"
weight = 0.25
candidates = ["openai/gpt-4o-mini", { free = true, min_context = 32000, parameters = ["tools"] }]

[[keys]]
alias = "k"
secret_env = "K"
account = "acct"
"""
    config = load(text, {"K": S1})
    assert [r.name for r in config.routes] == ["free", "coding"]
    coding = config.routes[1]
    assert (coding.strategy, coding.weight) == ("balanced", 0.25)
    assert coding.candidates[0] == "openai/gpt-4o-mini"
    assert config.routing.model_cooldown == 30.0 and config.routing.free_wait == 0.0
    assert (config.routing.free_per_minute, config.routing.free_per_day) == (10, 50)
    assert config.routing.accounts == {"acct": 1000}
    assert "routes=['free', 'coding']" in repr(config)
    own_free = load('[[routes]]\nname = "free"\ncandidates = ["a/b"]\n', ENV)
    assert [r.candidates for r in own_free.routes] == [("a/b",)]  # replaces the built-in one
    assert load("[catalog]\nenabled = false\n", ENV).routes == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[routes]]\nname = "a/b"\ncandidates = ["x/y"]',
            "[[routes]] #1: route name 'a/b' must be 1-64 letters",
        ),
        ('[[routes]]\nname = "r"\ncandidates = []', "[[routes]] #1: route 'r' needs candidates"),
        (
            '[[routes]]\nname = "r"\ncandidates = [{ cheap = true }]',
            "route 'r' candidate #1: unknown filter 'cheap'",
        ),
        (
            '[[routes]]\nname = "r"\ncandidates = ["x/y"]\nstrategy = "random"',
            "strategy must be one of ordered, cheapest, fastest, balanced",
        ),
        (
            '[[routes]]\nname = "r"\ncandidates = ["x/y"]\n'
            '[[routes]]\nname = "r"\ncandidates = ["x/z"]',
            "[[routes]] #2: route name 'r' is already used by another route",
        ),
        (
            '[catalog]\nenabled = false\n[[routes]]\nname = "r"\ncandidates = ["x/y"]',
            "[[routes]] choose models from the catalog",
        ),
        ("[routing]\nfree_per_day = -1", "[routing] free_per_day must not be negative"),
        ("[routing]\nfree_per_minute = 0", "[routing] free_per_minute must be more than zero"),
        ('[routing]\nmodel_cooldown = "x"', "[routing] model_cooldown must be a number"),
        ("[routing]\naccounts = { nobody = 1000 }", "no key has account = 'nobody'"),
        ("[routing]\ncolour = 1", "colour"),
    ],
)
def test_bad_routes_and_routing_options_are_one_clear_error(text: str, message: str) -> None:
    error = error_of(text, ENV, {})
    assert message in str(error)
    assert "\n" not in str(error)


def test_analytics_retention_and_alerts_are_read() -> None:
    text = """
[analytics]
minute_days = 1
day_days = 400

[alerting]
webhooks = ["https://hooks.example.com/services/T0/B0/secret-path"]
interval = 5

[[alerts]]
name = "spend"
kind = "spend"
threshold = 25

[[alerts]]
name = "errors"
kind = "error_share"
scope = "model"
threshold = 0.5
window = 600
"""
    config = load(text, ENV)
    assert (config.retention.minute_days, config.retention.hour_days) == (1.0, 90.0)
    assert config.retention.day_days == 400.0
    assert [(r.name, r.kind, r.scope, r.threshold) for r in config.alert_rules] == [
        ("spend", "spend", "total", 25.0),
        ("errors", "error_share", "model", 0.5),
    ]
    assert config.alert_rules[1].window == 600.0 and config.alert_interval == 5.0
    assert config.webhooks == ("https://hooks.example.com/services/T0/B0/secret-path",)
    assert "secret-path" not in repr(config)  # a webhook URL may hold a token


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[analytics]\nminute_days = -1",
            "[analytics] minute_days must be 0 (keep for ever) or more",
        ),
        (
            '[alerting]\nwebhooks = ["ftp://x"]',
            "[alerting] webhooks holds a URL that is not http(s)",
        ),
        ("[alerting]\ninterval = 0", "[alerting] interval must be more than zero"),
        ('[[alerts]]\nname = "a"\nkind = "loud"', "[[alerts]] #1: kind must be one of spend"),
        ('[[alerts]]\nname = "a"\nkind = "spend"', "[[alerts]] #1: threshold must be a number"),
        (
            '[[alerts]]\nname = "a"\nkind = "key_failed"\n'
            '[[alerts]]\nname = "a"\nkind = "key_failed"',
            "[[alerts]] #2: alert rule name 'a' is already used by another alert rule",
        ),
        (
            '[[alerts]]\nname = "a"\nkind = "key_failed"\nloud = 1',
            "unknown option [[alerts]] #1 loud",
        ),
    ],
)
def test_bad_analytics_and_alert_options_are_one_clear_error(text: str, message: str) -> None:
    error = error_of(text, ENV, {})
    assert message in str(error)
    assert "\n" not in str(error)


def test_the_shared_state_url_is_checked_and_never_shown() -> None:
    config = load(
        '[shared]\nurl = "redis://:pw-secret@127.0.0.1:6380/1"\nnamespace = "team"\n', ENV
    )
    assert config.shared_url == "redis://:pw-secret@127.0.0.1:6380/1"
    assert config.shared_namespace == "team" and "pw-secret" not in repr(config)
    over = load_config(None, ENV, {"shared.url": "redis://10.0.0.2:6379/0"})
    assert over.shared_url == "redis://10.0.0.2:6379/0"
    for text, message in (
        ('[shared]\nurl = "http://x"', "the shared state URL must be redis://host:port/db"),
        ('[shared]\nnamespace = "a b"', "[shared] namespace must be 1-64 letters"),
    ):
        error = error_of(text, ENV, {})
        assert message in str(error) and "\n" not in str(error)
