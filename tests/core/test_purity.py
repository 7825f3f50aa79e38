"""keyrotor.core stays sans-IO: no clock, sockets, threads, logging or global random."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import keyrotor.core

CORE = pathlib.Path(keyrotor.core.__file__).parent
FORBIDDEN = {
    "time",
    "asyncio",
    "trio",
    "anyio",
    "socket",
    "ssl",
    "threading",
    "multiprocessing",
    "logging",
    "h11",
    "httpx",
    "httpcore",
    "os",
    "select",
    "selectors",
    "subprocess",
}


def imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_core_sources_import_nothing_forbidden() -> None:
    files = sorted(CORE.glob("*.py"))
    assert len(files) >= 8
    for path in files:
        bad = imported_modules(path) & FORBIDDEN
        assert not bad, f"{path.name} imports {bad}"


def test_core_uses_no_global_random() -> None:
    for path in CORE.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        for call in ("random.random(", "random.choice(", "random.randrange(", "random.shuffle("):
            assert call not in text, f"{path.name} uses the global random generator"


def test_importing_core_loads_no_io_module() -> None:
    code = (
        "import sys; before = set(sys.modules); import keyrotor.core; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True
        ).stdout.split()
    )
    # (attrs itself imports threading, so that one is not checked here.)
    assert not loaded & {"asyncio", "trio", "anyio", "socket", "select", "logging", "h11", "time"}
