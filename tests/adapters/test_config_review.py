"""Configuration mistakes a review found: each is one ``ConfigError`` line
(never a traceback, never a secret), before anything is served or written."""

from __future__ import annotations

import json
import os
import pathlib
import sqlite3
from typing import Any

import pytest

from keyrotor.adapters.config import ConfigError, load_config, url_problem
from keyrotor.adapters.shared import parse_url
from keyrotor.replay.trace import TraceHeader, TraceWriter

FILE = "keyrotor.toml"
KEY = "sk-or-v1-" + "a1b2c3d4" * 8
KEY2 = "sk-or-v1-" + "e5f6a7b8" * 8
ENV = {"OPENROUTER_KEYS": KEY}
BIG = "1" + "0" * 400  # an integer no float holds


@pytest.fixture(autouse=True)
def _here(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def error_of(text: str | None, environ: dict[str, str] | None = None, **overrides: Any) -> str:
    """The one-line message loading ``text`` (None: no file) fails with."""
    if text is not None:
        pathlib.Path(FILE).write_text(text, "utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(
            None if text is None else FILE,
            ENV if environ is None else environ,
            {"state.enabled": False, **overrides},
        )
    message = str(info.value)
    assert "\n" not in message and KEY not in message and KEY2 not in message
    return message


# 1. --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (f"[http]\nconnect = {BIG}", "[http] connect"),
        (f"[server]\nmax_body_bytes = {BIG}", "[server] max_body_bytes"),
        (f"[server]\nport = {BIG}", "[server] port"),
        (f"[routing]\nfree_per_minute = {BIG}", "[routing] free_per_minute"),
        (f"[pool]\nqueue_timeout = {BIG}", "[pool] queue_timeout"),
        (f"[analytics]\nminute_days = {BIG}", "[analytics] minute_days"),
        (f'[[keys]]\nalias = "a"\nsecret_env = "MYKEY"\nrpm = {BIG}', "[[keys]] #1 (a) rpm"),
    ],
)
def test_a_400_digit_number_is_one_clear_error(text: str, where: str) -> None:
    message = error_of(text, {**ENV, "MYKEY": KEY2})
    assert f"{where} is far too large, got an integer of 1329 bits" in message


def test_a_400_digit_number_on_the_command_line_is_one_clear_error() -> None:
    assert "[server] port is far too large" in error_of(None, port=BIG)
    where = "[routing] free_per_minute"
    assert f"{where} is far too large" in error_of(None, **{"routing.free_per_minute": BIG})


def test_a_number_of_thousands_of_digits_is_one_clear_error() -> None:
    message = error_of("[pool]\npolicy = 1" + "0" * 5000)
    assert message.startswith(f"{FILE}: the file holds a number of thousands of digits")
    message = error_of("[pool]\npolicy = " + BIG)
    assert "[pool] policy must be a string, got an integer of 1329 bits" in message


# 2. and 3. -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[headers]\n"X-Title\\n" = "my app"', "[headers] X-Title\\n is not a valid header name"),
        (
            '[[clients]]\nname = "ci\\n"\ntoken_env = "CI_TOKEN"',
            "[[clients]] #1 name 'ci\\n' must be",
        ),
        (
            '[[providers]]\nname = "groq\\n"\nupstream = "https://api.groq.com/openai/v1"',
            "[[providers]] #1 name 'groq\\n' must be",
        ),
        (
            '[[keys]]\nalias = "a"\nsecret_env = "MYKEY\\n"',
            "[[keys]] #1 (a) secret_env must name an environment variable",
        ),
        ('[[keys]]\nalias = "main\\n"\nsecret_env = "MYKEY"', "invalid key_id 'main\\n'"),
    ],
)
def test_a_name_ending_in_a_newline_is_refused(text: str, message: str) -> None:
    assert message in error_of(text, {**ENV, "MYKEY": KEY2, "MYKEY\n": KEY2})


def test_a_header_given_on_the_command_line_with_a_newline_is_refused() -> None:
    assert "is not a valid header name" in error_of(None, **{"headers.X-Title\n": "app"})


# 4. --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:99999/api/v1", "must have a port from 1 to 65535"),
        ("http://127.0.0.1:abc/api/v1", "must have a port from 1 to 65535"),
        ("http://127.0.0.1:0/api/v1", "must have a port from 1 to 65535"),
        ("http://exämple.com/api/v1", "must have an ASCII host name: write 'xn--exmple-cua.com'"),
        ("http://127.0.0.1:9/api v1", "must not have spaces or control characters"),
        ("http://127.0.0.1:9/api\tv1", "must not have spaces or control characters"),
        ("http://a..b/v1", "must have a valid host name"),
        ("http://[::1/v1", "must be an http(s) URL"),
    ],
)
def test_an_upstream_the_proxy_could_not_use_is_refused_at_load(url: str, problem: str) -> None:
    assert problem in (url_problem(url) or "")
    assert f"command line: upstream {problem}" in error_of(None, upstream=url)
    assert f"upstream {problem}" in error_of(f"upstream = {json.dumps(url)}")
    environ = {**ENV, "OPENROUTER_BASE_URL": url}
    assert f"environment: OPENROUTER_BASE_URL {problem}" in error_of(None, environ)
    provider = (
        f'[[providers]]\nname = "p"\nupstream = {json.dumps(url)}\n'
        '[[keys]]\nalias = "a"\nprovider = "p"\nsecret_env = "MYKEY"'
    )
    assert f"[[providers]] #1 (p) upstream {problem}" in error_of(provider, {**ENV, "MYKEY": KEY2})


@pytest.mark.parametrize(
    "url",
    [
        "https://openrouter.ai/api/v1",
        "http://127.0.0.1:8080/v1",
        "http://[::1]:8080/v1",
        "http://localhost/v1",
        "https://xn--exmple-cua.com/v1",
        "http://host_name.internal:65535",
    ],
)
def test_well_formed_upstreams_still_load(url: str) -> None:
    assert url_problem(url) is None
    assert load_config(None, ENV, {"upstream": url, "state.enabled": False}).upstream == url


# 5. and 6. -------------------------------------------------------------------


def stored_state(path: pathlib.Path) -> bytes:
    sqlite3.connect(path).execute("CREATE TABLE keys (alias TEXT)").connection.commit()
    return path.read_bytes()


def test_record_refuses_the_state_file_and_the_configuration_file(tmp_path: pathlib.Path) -> None:
    state = tmp_path / "s.db"
    before = stored_state(state)
    with pytest.raises(ConfigError) as info:
        load_config(None, ENV, {"state.path": str(state), "record": str(state)})
    assert f"command line: --record {str(state)!r} is the state file" in str(info.value)
    # the same file by another name, given before it exists
    with pytest.raises(ConfigError, match="is the state file"):
        load_config(None, ENV, {"state.path": "new.db", "record": "./new.db"})
    pathlib.Path(FILE).write_text('[pool]\npolicy = "weighted"\n', "utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(FILE, ENV, {"state.enabled": False, "record": FILE})
    assert "is the configuration file: recording would overwrite it" in str(info.value)
    pathlib.Path(FILE).write_text('record = "keyrotor.toml"\n', "utf-8")
    with pytest.raises(ConfigError, match=r"^keyrotor.toml: record 'keyrotor.toml' is the conf"):
        load_config(FILE, ENV, {"state.enabled": False})
    assert state.read_bytes() == before


def test_record_refuses_to_overwrite_a_file_that_is_not_a_trace(tmp_path: pathlib.Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n", "utf-8")
    message = error_of(None, record=str(notes))
    assert "exists and is not a keyrotor trace: it would be overwritten" in message
    assert notes.read_text("utf-8") == "my notes\n"
    earlier = tmp_path / "earlier.jsonl"
    with TraceWriter(earlier, TraceHeader(source="proxy")):
        pass
    for fine in (str(earlier), str(tmp_path / "new.jsonl"), os.devnull):
        config = load_config(None, ENV, {"state.enabled": False, "record": fine})
        assert config.record == fine


def test_an_empty_record_path_is_refused() -> None:
    assert error_of(None, record="") == (
        "command line: --record is an empty path; fix: give --record a file path"
    )
    assert "record is an empty path" in error_of('record = ""')


# 8. --------------------------------------------------------------------------


def test_a_mistyped_shared_url_never_shows_the_password() -> None:
    for url in (
        "redis://:Hunter2-redis-password@10.0.0.5:6379x/0",
        "redis://app:Hunter2-redis-password@10.0.0.5:63790000/0",
        "redis://app:Hunter2-redis-password@[::1/0",
        "redis://app:Hunter2-redis-password@10.0.0.5:6379/x",
        "rediss://app:Hunter2@redis-password@10.0.0.5:6379/0",
    ):
        with pytest.raises(ValueError) as info:
            parse_url(url)
        assert "Hunter2" not in str(info.value) and "redis-password" not in str(info.value)
        message = error_of(None, **{"shared.url": url})
        assert message.startswith("command line: --shared: the shared state URL must be")
        assert message.endswith("fix: give --shared redis://127.0.0.1:6379/0")
        assert "Hunter2" not in message
        in_file = error_of(f'[shared]\nurl = "{url}"')
        assert in_file.startswith(f"{FILE}: the shared state URL") and "Hunter2" not in in_file
    assert "got 'redis://10.0.0.5:6379x/0'" in error_of(
        None, **{"shared.url": "redis://:pw@10.0.0.5:6379x/0"}
    )


# 9. --------------------------------------------------------------------------


def test_a_key_pasted_into_secret_env_or_token_env_is_never_printed() -> None:
    pasted = "gsk_FAKEfake0123456789abcdefghijklmnopqrstuvwxyzABCDEFGH"
    message = error_of(
        f'[[keys]]\nalias = "groq-1"\nsecret_env = "{pasted}"', {"OPENROUTER_KEYS": KEY}
    )
    assert pasted not in message and pasted[4:20] not in message
    assert "secret_env must name a variable, not hold the key" in message
    token = "krtFAKEclienttoken0123456789abcdef"
    message = error_of(f'[[clients]]\nname = "ci"\ntoken_env = "{token}"')
    assert token not in message and "token_env must name a variable, not hold the token" in message
    # a name that looks like one is still named
    message = error_of('[[keys]]\nalias = "a"\nsecret_env = "OPENROUTER_KEY_MAIN"')
    assert "the environment variable OPENROUTER_KEY_MAIN is not set" in message


# 12. -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[alerting]\nwebhooks = ["http://[::1"]', "[alerting] webhooks holds a URL that is not"),
        ('[alerting]\nwebhooks = ["http://h:99999/x"]', "[alerting] webhooks holds a URL that"),
        (
            '[[keys]]\nalias = "a"\nsecret_env = "MYKEY"\nprovider = ["openai"]',
            "[[keys]] #1 (a) provider must be a string, got an array",
        ),
    ],
)
def test_wrong_types_and_malformed_webhooks_are_one_clear_error(text: str, message: str) -> None:
    assert message in error_of(text, {**ENV, "MYKEY": KEY2})


def test_webhooks_may_still_carry_a_query_or_credentials() -> None:
    text = '[alerting]\nwebhooks = ["https://u:p@hooks.example.com/x?token=abc"]'
    pathlib.Path(FILE).write_text(text, "utf-8")
    assert len(load_config(FILE, ENV, {"state.enabled": False}).webhooks) == 1


# 13., 14. and 15. ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[pool]\nseed = 9223372036854775808", "PoolConfig.seed must be a signed 64-bit integer"),
        ("[pool]\nseed = -9223372036854775809", "PoolConfig.seed must be a signed 64-bit integer"),
        ("[pool]\naffinity_vnodes = 1000000000", "affinity_vnodes must be at most 1000"),
        (
            '[pool]\npolicy = "affinity"\naffinity_vnodes = 1000\n'
            '[[keys]]\nalias = "a"\nsecret_env = "MYKEY"\nweight = 1000',
            "key 'a' would have 1000 x 1000 points on the affinity ring, more than 100,000",
        ),
        ("[routing]\nfree_wait = nan", "[routing] free_wait must be a finite number, got nan"),
        ("[routing]\nfree_wait = inf", "[routing] free_wait must be a finite number, got inf"),
        ("[routing]\nfree_wait = -1", "[routing] free_wait must not be negative, got -1"),
    ],
)
def test_pool_and_routing_numbers_out_of_range(text: str, message: str) -> None:
    assert message in error_of(text, {**ENV, "MYKEY": KEY2})


def test_bounds_themselves_are_accepted() -> None:
    text = (
        '[pool]\npolicy = "affinity"\nseed = 9223372036854775807\naffinity_vnodes = 1000\n'
        "[routing]\nfree_wait = 0"
    )
    pathlib.Path(FILE).write_text(text, "utf-8")
    config = load_config(FILE, ENV, {"state.enabled": False})
    assert (config.pool.seed, config.pool.affinity_vnodes) == (2**63 - 1, 1000)


# 16. -------------------------------------------------------------------------


def test_an_empty_state_path_is_refused(tmp_path: pathlib.Path) -> None:
    environ = {**ENV, "XDG_DATA_HOME": str(tmp_path / "xdg")}
    with pytest.raises(ConfigError) as info:
        load_config(None, environ, {"state.path": ""})
    assert (
        str(info.value) == "command line: --state is an empty path; fix: give --state a file path"
    )
    pathlib.Path(FILE).write_text('[state]\npath = ""\n', "utf-8")
    with pytest.raises(ConfigError, match=r"\[state\] path is an empty path"):
        load_config(FILE, environ)
    assert not (tmp_path / "xdg").exists()
