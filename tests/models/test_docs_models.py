"""The Python examples of docs/models.md run as written."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
from typing import Any

import pytest

DOC = pathlib.Path(__file__).parents[2] / "docs" / "models.md"
EXAMPLES = re.findall(r"### (\w+)\n\n```python\n(.*?)```", DOC.read_text("utf-8"), re.S)


def test_the_doc_has_its_examples() -> None:
    assert [name for name, _ in EXAMPLES] == ["catalog"]


@pytest.mark.parametrize(("name", "code"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_an_example_runs(name: str, code: str) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"docs/models.md:{name}", "exec"), {})
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"320 models, \d+ free with 100k\+ context", lines[0])
    assert re.fullmatch(r"\d+ prompt tokens, \$0\.0\d+ to \$0\.0\d+", lines[1])
    assert lines[2].startswith("spent $0.0000")


def load_section(heading: str, tmp_path: pathlib.Path, environ: dict[str, str]) -> Any:
    """The configuration of the first TOML block under ``heading``, loaded without a state file."""
    from keyrotor.adapters.config import load_config

    section = DOC.read_text("utf-8").split(heading, 1)[1]
    toml = re.search(r"```toml\n(.*?)```", section, re.S)
    assert toml is not None
    path = tmp_path / "keyrotor.toml"
    path.write_text(toml.group(1) + "[state]\nenabled = false\n")
    return load_config(path, environ, {})


def test_the_providers_example_is_a_valid_configuration(tmp_path: pathlib.Path) -> None:
    environ = {"OPENROUTER_KEY_MAIN": "sk-or-v1-doc-main-000", "OPENAI_KEY_1": "sk-doc-openai-000"}
    config = load_section("## Several providers in one proxy", tmp_path, environ)
    (provider,) = config.providers
    assert (provider.name, provider.kind, set(provider.models)) == (
        "openai",
        "openai-compatible",
        {"gpt-4o-mini"},
    )
    assert set(config.keys) == {"or-main"} and set(provider.keys) == {"oa-1"}


def test_the_budgets_example_is_a_valid_configuration(tmp_path: pathlib.Path) -> None:
    from keyrotor.adapters.config import Budget

    environ = {
        "OPENROUTER_API_KEY": "sk-or-v1-doc-main-000",
        "KEYROTOR_TOKEN_CI": "ci-token-0123456789abcdef",
        "KEYROTOR_TOKEN_ALICE": "alice-token-0123456789abcdef",
    }
    config = load_section("## Spend and budgets", tmp_path, environ)
    assert sorted(config.client_names.values()) == ["alice", "ci"]
    assert config.budgets == (
        Budget("client", "ci", 5.0, 86400.0),
        Budget("model", "anthropic/claude-opus-4", 20.0, 604800.0),
    )
