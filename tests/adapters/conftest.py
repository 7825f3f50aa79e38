"""Fixtures shared by the adapters' tests."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from keyrotor.adapters.storage import StateStore


@pytest.fixture
def logs() -> list[str]:
    """The lines a store logs (``opened`` hands them its ``log``)."""
    return []


@pytest.fixture
def opened(logs: list[str]) -> Iterator[Callable[..., StateStore]]:
    """``opened(path, **options)``: a store closed after the test. Flushes only when asked."""
    stores: list[StateStore] = []

    def open_(path: pathlib.Path, **options: Any) -> StateStore:
        options.setdefault("secret_key", None)
        options.setdefault("flush_interval", 3600.0)
        options.setdefault("log", logs.append)
        store = StateStore.open(path, **options)
        stores.append(store)
        return store

    yield open_
    for store in stores:
        store.close()
