"""The examples in docs/transports.md and docs/embedding.md run as written,
against the fake upstream."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from keyrotor.testing import FakeUpstream, Scenario

DOCS = pathlib.Path(__file__).parents[2] / "docs"
EXAMPLES = [
    (f"{doc}:{name}", code)
    for doc in ("transports.md", "embedding.md")
    for name, code in re.findall(
        r"### (\w+)\n\n```python\n(.*?)```", (DOCS / doc).read_text("utf-8"), re.S
    )
]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream.running_in_thread(Scenario.open()) as server:
        yield server


def test_every_transport_has_an_example() -> None:
    assert [name for name, _ in EXAMPLES] == [
        "transports.md:sync",
        "transports.md:asyncio",
        "transports.md:trio",
        "embedding.md:httpx",
        "embedding.md:asgi",
        "embedding.md:core",
    ]


@pytest.mark.parametrize(("name", "code"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_example_runs(name: str, code: str, upstream: FakeUpstream) -> None:
    env = {
        **os.environ,
        "OPENROUTER_KEYS": "sk-or-v1-docs-example-0001,sk-or-v1-docs-example-0002",
        "OPENROUTER_API_KEY_1": "sk-or-v1-docs-example-0003",
        "OPENROUTER_BASE_URL": upstream.url,
    }
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "the example printed nothing"
    assert "sk-or-v1-docs-example" not in result.stdout + result.stderr
