"""The examples in docs/transports.md, docs/embedding.md and the README's client
example run as written, against the fake upstream."""

from __future__ import annotations

import os
import pathlib
import re
import selectors
import shlex
import signal
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


README = DOCS.parent / "README.md"
README_URL = "http://127.0.0.1:9000/api/v1"  # the port the README starts the fake upstream on


def test_the_readme_client_example_runs_against_the_fake_upstream_it_starts() -> None:
    """The README's first Python example, after the fake upstream started by the
    README's own command (on a free port instead of 9000), with no key in the
    environment: distinct placeholder keys, nothing else needed."""
    text = README.read_text("utf-8")
    start = re.search(r"```sh\n(python -m keyrotor\.testing\.fake_upstream [^#\n]*)", text)
    code = re.search(
        r"```python\n(from keyrotor\.transports\.sync import Client\n.*?)```", text, re.S
    )
    assert start is not None and code is not None
    assert text.index(start[0]) < text.index(code[0]) and README_URL in code[1]
    args = shlex.split(start[1])
    assert args[:3] == ["python", "-m", "keyrotor.testing.fake_upstream"] and "9000" in args
    args[args.index("9000")] = "0"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENROUTER_", "KEYROTOR_"))}
    fake = subprocess.Popen(
        [sys.executable, *args[1:]], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert fake.stdout is not None
        with selectors.DefaultSelector() as sel:  # a guard against a hang, not a speed bound
            sel.register(fake.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=60), "the fake upstream printed no URL"
        url = fake.stdout.readline().strip()
        assert re.sub(r":\d+/", ":9000/", url, count=1) == README_URL
        result = subprocess.run(
            [sys.executable, "-c", code[1].replace(README_URL, url)],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        fake.send_signal(signal.SIGTERM)
        fake.wait(timeout=30)
        if fake.stdout is not None:
            fake.stdout.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "the example printed nothing"
