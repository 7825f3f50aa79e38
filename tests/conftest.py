"""Suite-wide settings."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

from keyrotor.testing.certificates import openssl_available, self_signed

# CI explores the same examples on every run (a red CI must be reproducible);
# local runs explore new ones each time. Failing examples are kept as tests.
# No per-example deadline on CI: a shared, loaded VM may take the CPU away for
# longer than hypothesis' 200 ms in any example (speed is measured in benchmarks/).
settings.register_profile("ci", derandomize=True, print_blob=True, deadline=None)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# `keyrotor serve` keeps state in the user's data directory by default: a test
# run (and the processes it starts) must never touch the real one.
_DATA_HOME = tempfile.mkdtemp(prefix="keyrotor-tests-")
os.environ["XDG_DATA_HOME"] = _DATA_HOME
os.environ.pop("KEYROTOR_STATE", None)
for _name in ("KEYROTOR_ADMIN_TOKEN", "KEYROTOR_CLIENT_TOKENS", "KEYROTOR_SECRET_KEY"):
    os.environ.pop(_name, None)


def pytest_unconfigure() -> None:
    shutil.rmtree(_DATA_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for 127.0.0.1 and localhost, and its key
    (``openssl`` command: .ci/run installs it; without it, HTTPS tests skip)."""
    if not openssl_available():
        pytest.skip("HTTPS needs the openssl command to make a certificate")
    return self_signed(tmp_path_factory.mktemp("tls"))
