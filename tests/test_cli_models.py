"""``keyrotor models``: the catalog from the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from keyrotor.adapters.config import load_config
from keyrotor.adapters.storage import StateStore
from keyrotor.cli import main
from keyrotor.testing import FakeUpstream, Reply, Scenario
from keyrotor.testing.catalogs import realistic_models

from .adapters.proxy_thread import ProxyThread

MODELS = realistic_models()


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with FakeUpstream.running_in_thread(Scenario(models=MODELS)) as server:
        yield server.url


def listing(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["models", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_free_long_context_models_with_tools_sorted_by_context(
    upstream: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = listing(
        capsys,
        "--upstream", upstream, "--free", "--min-context", "100000",
        "--supports", "tools", "--sort", "context", "--json",
    )  # fmt: skip
    assert code == 0
    chosen = json.loads(out)
    expected = [
        m
        for m in MODELS
        if m.prompt == "0"
        and m.completion == "0"
        and m.context_length >= 100_000
        and "tools" in m.supported_parameters
    ]
    assert expected and {m["id"] for m in chosen} == {m.id for m in expected}
    contexts = [m["context_length"] for m in chosen]
    assert contexts == sorted(contexts, reverse=True)
    assert f"{len(chosen)} of 320 models" in err


def test_the_table_fits_80_columns_and_sorts_by_price(
    upstream: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = listing(capsys, "--upstream", upstream, "--sort", "price", "--limit", "40")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 42  # a head, a rule, 40 models
    assert all(len(line) <= 80 for line in lines)
    assert lines[0].split()[:4] == ["model", "context", "$/M", "in"]
    ids = [line.split()[0] for line in lines[2:]]
    by_id = {m.id: m for m in MODELS}
    prices = [
        float(by_id[i].prompt) + float(by_id[i].completion) for i in ids if i in by_id
    ]  # ids longer than the column are cut with "~"
    assert prices == sorted(prices)
    assert "free" in lines[2]  # the cheapest are the free ones


def test_search_and_provider_filters(upstream: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = listing(
        capsys, "--upstream", upstream, "--provider", "anthropic", "--search", "haiku", "--json"
    )
    ids = [m["id"] for m in json.loads(out)]
    assert code == 0 and ids
    assert all(i.startswith("anthropic/") and "haiku" in i for i in ids)


def test_a_saved_document_and_a_state_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "models.json"
    saved.write_text(json.dumps({"data": [m.to_json() for m in MODELS[:5]]}))
    code, out, _ = listing(capsys, "--file", str(saved), "--json")
    assert code == 0 and len(json.loads(out)) == 5
    store = StateStore.open(tmp_path / "state.db", secret_key=None)
    store.save_catalog("openrouter", {"data": [m.to_json() for m in MODELS[:7]]}, None, 1.0)
    code, out, _ = listing(capsys, "--state", str(tmp_path / "state.db"), "--json")
    assert code == 0 and len(json.loads(out)) == 7
    # A provider's catalog (fetched later) lists its models as requests name them.
    theirs = {"data": [{"id": "gpt-x", "created": 1}, {"id": "gpt-y", "created": 2}]}
    store.save_catalog("provider/other", theirs, None, 2.0)
    code, out, _ = listing(capsys, "--state", str(tmp_path / "state.db"), "--json")
    store.close()  # read while the store (a running proxy) holds the file
    ids = [model["id"] for model in json.loads(out)]
    assert code == 0 and len(ids) == 9 and {"other/gpt-x", "other/gpt-y"} <= set(ids)
    code, out, _ = listing(capsys, "--state", str(tmp_path / "state.db"), "--provider", "other")
    assert code == 0 and "other/gpt-x" in out and MODELS[0].id not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sort", "fastest"], "--sort must be one of price, context, created, name, latency"),
        (["--sort", "latency"], "--sort latency needs --proxy URL"),
        (["--proxy", "127.0.0.1:8080"], "--proxy must be an http:// or https:// URL"),
        (["--min-context", "-1"], "--min-context must be 0 or more"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["--upstream", "ftp://x"], "--upstream must be an http:// or https:// URL"),
        (["--file", "/nonexistent/models.json"], "cannot read /nonexistent/models.json"),
        (["--state", "/nonexistent/state.db"], "no state file at /nonexistent/state.db"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = listing(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("keyrotor models: ") and message in err and err.count("\n") == 1


def test_a_document_that_is_no_catalog_and_an_upstream_that_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "models.json"
    bad.write_text("<html>")
    code, _, err = listing(capsys, "--file", str(bad))
    assert code == 2 and "not JSON" in err
    with FakeUpstream.running_in_thread(Scenario(models_reply=Reply(503))) as server:
        code, _, err = listing(capsys, "--upstream", server.url)
    assert code == 1 and "answered 503" in err and err.count("\n") == 1


def test_the_console_script_runs_it(upstream: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "keyrotor.cli", "models", "--upstream", upstream, "--limit", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 5 and "3 of 320 models" in done.stderr


def test_a_running_proxy_lists_its_catalog_sorted_by_the_latency_it_observed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret, token = "sk-or-v1-cli-proxy-jkjkjkjkjkjkjkjk", "cli-client-token-0123456789"
    environ = {"OPENROUTER_API_KEY": secret, "KEYROTOR_CLIENT_TOKENS": token}
    used = [MODELS[5].id, MODELS[9].id]
    with FakeUpstream.running_in_thread(Scenario(models=MODELS).add(secret)) as server:
        config = load_config(
            None, environ, {"upstream": server.url, "port": 0, "state.enabled": False}
        )
        with ProxyThread(config, []) as url:
            auth = {"authorization": f"Bearer {token}"}
            for model in used:
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                assert httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth).is_success
            code, _, err = listing(capsys, "--proxy", url)  # no token
            assert code == 1 and "answered 401" in err and "KEYROTOR_TOKEN" in err
            monkeypatch.setenv("KEYROTOR_TOKEN", token)
            code, out, err = listing(capsys, "--proxy", f"{url}/v1", "--sort", "latency", "--json")
    assert code == 0, err
    entries = json.loads(out)
    assert len(entries) == len(MODELS)
    observed = entries[:2]
    assert {e["id"] for e in observed} == set(used)
    assert observed[0]["keyrotor_ttfb_ms"] <= observed[1]["keyrotor_ttfb_ms"]
    rest = [e["id"] for e in entries[2:]]
    assert rest == sorted(rest) and all("keyrotor_ttfb_ms" not in e for e in entries[2:])
