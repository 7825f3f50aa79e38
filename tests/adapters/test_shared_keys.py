"""Keys replaced elsewhere, applied here once their old key drained: the
record queue's own logic, with an admin that stands for the proxy's."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from cryptography.fernet import Fernet

from keyrotor.adapters.shared_keys import SharedKeys

pytestmark = pytest.mark.trio
ENV = {"KEYROTOR_SECRET_KEY": Fernet.generate_key().decode()}


class Admin:
    """The pool's keys: alias -> secret and whether it drains; calls counted."""

    def __init__(self) -> None:
        self.keys: dict[str, dict[str, Any]] = {}
        self.sources: dict[str, str] = {}
        self.looks = 0
        self.on_added: Any = None
        self.on_removed: Any = None

    def list_keys(self, alias: str | None = None) -> list[dict[str, Any]]:
        self.looks += 1
        return [
            {"alias": a, "removing": k["removing"]}
            for a, k in self.keys.items()
            if alias is None or a == alias
        ]

    def secret_of(self, alias: str) -> str | None:
        key = self.keys.get(alias)
        return None if key is None else key["secret"]  # type: ignore[no-any-return]

    async def remove_key(self, alias: str, via: str = "admin") -> None:
        self.keys[alias]["removing"] = True  # requests in flight: it drains later

    async def add_key(self, provider: str, alias: str, secret: str, *args: Any) -> None:
        assert alias not in self.keys, "the pool refuses an alias still draining"
        self.keys[alias] = {"secret": secret, "removing": False}
        self.sources[alias] = "api"


def add(shared: SharedKeys, alias: str, secret: str) -> dict[str, Any]:
    token = shared._cipher.encrypt(secret.encode()).decode()
    return {"op": "add", "alias": alias, "origin": "other", "spec": {}, "token": token}


async def test_adds_waiting_for_a_drain_end_and_leave_nothing_behind(autojump_clock: Any) -> None:
    # The record queue waited for the drain (up to 120 s, then dropped the add),
    # an older waiter kept polling once a newer one had added the key, and the
    # last record of every alias ever heard was kept. (Virtual time: trio's clock.)
    admin = Admin()
    shared = SharedKeys(admin, "me", environ=ENV)  # type: ignore[arg-type]
    admin.keys["x"] = {"secret": "s1", "removing": True}  # draining here
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(shared.run, None)
        shared.heard(add(shared, "x", "s2"))  # waits for the drain ...
        shared.heard(add(shared, "x", "s3"))  # ... and so does a newer one
        for i in range(50):  # others are applied meanwhile, not queued behind x
            shared.heard(add(shared, f"k{i}", f"t{i}"))
        await anyio.sleep(0.3)
        assert all(f"k{i}" in admin.keys for i in range(50))
        del admin.keys["x"]  # drained
        await anyio.sleep(0.3)
        assert admin.keys["x"]["secret"] == "s3"  # the newest, once
        looks = admin.looks
        await anyio.sleep(0.3)
        assert admin.looks == looks  # no waiter left polling
        tasks.cancel_scope.cancel()
    assert not shared._latest and not shared._waiting
