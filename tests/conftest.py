"""Suite-wide settings."""

from __future__ import annotations

import os

from hypothesis import settings

# CI explores the same examples on every run (a red CI must be reproducible);
# local runs explore new ones each time. Failing examples are kept as tests.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
