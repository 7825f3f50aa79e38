"""The package's layers, checked on every module's imports (read with ``ast``).

Every import counts: module level, inside functions, under ``TYPE_CHECKING``;
relative imports are resolved. The rules:

1. ``keyrotor.core`` imports nothing of keyrotor outside ``keyrotor.core``, and
   nothing outside the standard library but ``attrs``; the same for the
   upstream model, ``keyrotor.upstream``, and the catalog, costs and router,
   ``keyrotor.models``, which may also read the core (the router asks the
   core's ``classify`` what an answer means for a model).
2. ``keyrotor.transports`` imports no ``keyrotor.adapters`` and no
   ``keyrotor.replay`` at import time. Inside a function (recording loads
   ``keyrotor.replay`` on demand) or under ``TYPE_CHECKING`` is allowed.
3. No module outside ``keyrotor/transports`` imports a private module
   (``keyrotor.transports._*``) or a private name of the transports: adapters
   use ``keyrotor.transports.api`` and the other public modules.
4. The same for the core: no module outside ``keyrotor/core`` imports a private
   module (``keyrotor.core._*``) or a private name of the core.
"""

from __future__ import annotations

import ast
import pathlib
import sys
from collections.abc import Iterator

import attrs
import pytest

import keyrotor

PACKAGE = pathlib.Path(keyrotor.__file__).parent
ROOT = PACKAGE.parent
STDLIB = sys.stdlib_module_names


@attrs.frozen
class Import:
    """One imported module (or name of a module) at one line of one file."""

    path: str  # relative to the repository
    line: int
    source: str  # the statement as written
    module: str  # absolute: what ``from``/``import`` names
    name: str | None  # ``from module import name``; None for ``import module``
    runtime: bool  # runs when the module is imported (not in a function, not TYPE_CHECKING)

    @property
    def targets(self) -> tuple[str, ...]:
        """What it may load: the module, and ``module.name`` (a submodule, maybe)."""
        if self.name is None or self.name == "*":
            return (self.module,)
        return (self.module, f"{self.module}.{self.name}")

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.source}"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str, module: str, path: str, is_package: bool = False) -> Iterator[Import]:
    """Every import in ``source``, the text of ``module`` (stored at ``path``)."""
    package = module if is_package else module.rpartition(".")[0]

    def walk(node: ast.AST, runtime: bool) -> Iterator[Import]:
        if isinstance(node, ast.Import):
            text = ast.unparse(node)
            for alias in node.names:
                yield Import(path, node.lineno, text, alias.name, None, runtime)
        elif isinstance(node, ast.ImportFrom):
            text = ast.unparse(node)
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                yield Import(path, node.lineno, text, target, alias.name, runtime)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            for child in ast.iter_child_nodes(node):
                yield from walk(child, False)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from walk(child, False)
            for child in node.orelse:
                yield from walk(child, runtime)
        else:
            for child in ast.iter_child_nodes(node):
                yield from walk(child, runtime)

    yield from walk(ast.parse(source, path), True)


def package_imports() -> list[Import]:
    out = []
    for file in sorted(PACKAGE.rglob("*.py")):
        out.extend(
            imports_of(
                file.read_text(encoding="utf-8"),
                module_name(file),
                file.relative_to(ROOT).as_posix(),
                is_package=file.name == "__init__.py",
            )
        )
    return out


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _reaches_private(imp: Import, package: str) -> bool:
    """Does ``imp`` name a private module or a private name inside ``package``?"""
    for target in imp.targets:
        if _within(target, package):
            rest = target[len(package) :].split(".")
            if any(_private(part) for part in rest if part):
                return True
    return False


# -------------------------------------------------------------------- rules


_MAY_READ = {"keyrotor.models": "keyrotor.core"}
"""The other pure package a pure package may import."""


def core_violations(imports: list[Import], package: str = "keyrotor.core") -> list[Import]:
    """Rule 1: the core (and the upstream model) imports only itself, the
    standard library and attrs."""
    bad = []
    for imp in imports:
        if not _within(imp.path.removesuffix(".py").replace("/", "."), package):
            continue
        top = imp.module.split(".")[0]
        if _within(imp.module, package) or _within(imp.module, _MAY_READ.get(package, package)):
            continue
        if top == "keyrotor" or (top not in STDLIB and top != "attrs"):
            bad.append(imp)
    return bad


def transport_violations(imports: list[Import]) -> list[Import]:
    """Rule 2: no adapter and no replay when a transport module is imported."""
    return [
        imp
        for imp in imports
        if imp.path.startswith("keyrotor/transports/")
        and imp.runtime
        and any(
            _within(target, layer)
            for target in imp.targets
            for layer in ("keyrotor.adapters", "keyrotor.replay")
        )
    ]


def private_violations(imports: list[Import], package: str) -> list[Import]:
    """Rules 3 and 4: nothing outside ``package`` reaches into its private parts."""
    folder = package.replace(".", "/") + "/"
    return [
        imp for imp in imports if not imp.path.startswith(folder) and _reaches_private(imp, package)
    ]


def _report(rule: str, bad: list[Import]) -> str:
    lines = dict.fromkeys(f"  {imp}" for imp in bad)  # one line per statement
    return rule + ":\n" + "\n".join(lines)


# -------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    found = package_imports()
    files = {imp.path for imp in found}
    # Not a vacuous walk: every layer is there.
    for folder in (
        "core",
        "transports",
        "adapters",
        "adapters/proxy",
        "replay",
        "testing",
        "upstream",
    ):
        assert any(path.startswith(f"keyrotor/{folder}/") for path in files), folder
    return found


@pytest.mark.parametrize("package", ["keyrotor.core", "keyrotor.upstream", "keyrotor.models"])
def test_core_imports_only_itself_the_stdlib_and_attrs(imports: list[Import], package: str) -> None:
    bad = core_violations(imports, package)
    assert not bad, _report(f"{package} imports outside itself, the stdlib and attrs", bad)


def test_transports_import_no_adapter_and_no_replay_at_import_time(
    imports: list[Import],
) -> None:
    bad = transport_violations(imports)
    assert not bad, _report(
        "keyrotor.transports imports an adapter or replay at import time "
        "(move it into the function that needs it, or under TYPE_CHECKING)",
        bad,
    )


def test_nothing_outside_the_transports_imports_their_private_modules(
    imports: list[Import],
) -> None:
    bad = private_violations(imports, "keyrotor.transports")
    assert not bad, _report(
        "private transport modules or names imported from outside keyrotor/transports "
        "(use keyrotor.transports.api)",
        bad,
    )


def test_nothing_outside_the_core_imports_its_private_modules(imports: list[Import]) -> None:
    bad = private_violations(imports, "keyrotor.core")
    assert not bad, _report(
        "private core modules or names imported from outside keyrotor/core "
        "(use the names keyrotor.core exports)",
        bad,
    )


def test_the_public_api_resolves_to_the_transports_own_objects() -> None:
    import importlib

    from keyrotor.transports import api

    assert set(api.__all__) == set(api._HOMES)
    for name in api.__all__:
        home = importlib.import_module(api._HOMES[name], "keyrotor.transports")
        assert getattr(api, name) is getattr(home, name), name
    with pytest.raises(AttributeError):
        _ = api.Slot


# --------------------------------------------- the checker catches what it must


def _check(source: str, path: str) -> list[str]:
    module = path.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
    found = list(imports_of(source, module, path, is_package=path.endswith("__init__.py")))
    bad = (
        core_violations(found)
        + transport_violations(found)
        + private_violations(found, "keyrotor.transports")
        + private_violations(found, "keyrotor.core")
    )
    return [str(imp) for imp in bad]


@pytest.mark.parametrize(
    ("path", "source"),
    [
        # rule 1
        ("keyrotor/core/pool.py", "from ..transports import errors"),
        ("keyrotor/core/pool.py", "from .. import transports"),
        ("keyrotor/core/pool.py", "def f():\n    import keyrotor.adapters.config"),
        ("keyrotor/core/pool.py", "import httpx"),
        ("keyrotor/core/__init__.py", "from ..replay import trace"),
        # rule 2
        ("keyrotor/transports/_base.py", "from ..replay.record import TraceRecorder"),
        ("keyrotor/transports/sync.py", "import keyrotor.adapters.proxy.app"),
        ("keyrotor/transports/sync.py", "from .. import adapters"),
        ("keyrotor/transports/sync.py", "class A:\n    from ..replay import trace"),
        # rule 3
        ("keyrotor/adapters/config.py", "from ..transports._driver import mask"),
        ("keyrotor/adapters/proxy/demo.py", "from ...transports import _h11pool as h11pool"),
        ("keyrotor/adapters/httpx.py", "if TYPE_CHECKING:\n    from ..transports._async import A"),
        ("keyrotor/replay/engine.py", "def f():\n    import keyrotor.transports._http"),
        ("keyrotor/testing/x.py", "from keyrotor.transports.sync import _Private"),
        # rule 4
        ("keyrotor/adapters/storage.py", "from ..core._records import X"),
        ("keyrotor/transports/_driver.py", "from ..core import _select"),
    ],
)
def test_the_checker_catches_a_forbidden_import(path: str, source: str) -> None:
    bad = _check(source, path)
    assert len(bad) == 1, bad
    assert bad[0].startswith(f"{path}:"), bad


@pytest.mark.parametrize(
    ("path", "source"),
    [
        ("keyrotor/core/pool.py", "from .config import KeySpec\nimport attrs\nimport heapq"),
        ("keyrotor/core/pool.py", "from __future__ import annotations"),
        ("keyrotor/transports/_base.py", "def f():\n    from ..replay.record import R"),
        ("keyrotor/transports/_base.py", "if TYPE_CHECKING:\n    from ..replay.trace import W"),
        ("keyrotor/transports/_async.py", "from ._driver import Driver\nfrom . import _h11pool"),
        ("keyrotor/adapters/config.py", "from ..transports.api import mask, HTTPOptions"),
        ("keyrotor/adapters/httpx.py", "from ..transports.errors import TransportError"),
        ("keyrotor/adapters/app.py", "from ..core import Pool, __version__"),
        ("keyrotor/core/pool.py", "from ._records import X\nfrom . import _select"),
    ],
)
def test_the_checker_allows_what_the_layers_allow(path: str, source: str) -> None:
    assert _check(source, path) == []
