"""Review 13, the free tier under churn: keys added and removed while the
router learns the accounts' tiers or paces free requests, and free requests
whose callers leave while they wait for a key.

The router against the fake upstream over loopback (an ``AsyncClient`` on the
test's own loop), and the proxy on its own trio loop for the callers who leave.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

import anyio
import httpx

from keyrotor.adapters.config import RoutingOptions, load_config
from keyrotor.adapters.proxy.router import Router
from keyrotor.core import KeySpec, KeyState, PoolConfig
from keyrotor.testing import Custom, FakeUpstream, Ok, Scenario, Slow
from keyrotor.transports.api import AsyncClient

from .proxy_thread import ProxyThread

HI = [{"role": "user", "content": "hi"}]
FREE = "meta-llama/llama-3.3-70b-instruct:free"
SECRETS = {alias: f"sk-or-v1-test-churn13-{alias}-jkjkjkjkjkjkjk" for alias in "abcd"}


def fake(*aliases: str) -> Scenario:
    scenario = Scenario()
    for alias in aliases:
        scenario.add(SECRETS[alias], Ok(), alias=alias)
    return scenario


def test_a_key_removed_while_the_tiers_are_learned_leaves_the_learning_whole() -> None:
    """Another free request rebuilds the router's accounts while ``learn_tiers``
    waits for an answer; an account whose key was removed then is passed over
    (it was a ``KeyError`` that ended the proxy)."""

    async def main(url: str) -> tuple[dict[str, int], list[str]]:
        keys = {alias: SECRETS[alias] for alias in "abc"}
        async with AsyncClient(keys, url) as client:
            router = Router([], RoutingOptions(), None, client, None)  # type: ignore[arg-type]
            send = client.send
            pinned: list[str] = []

            async def send_and_churn(*args: Any, **options: Any) -> Any:
                pinned.append(options["pin"])
                if len(pinned) == 1:  # meanwhile: c leaves, a free request comes
                    client.driver.remove_key("c")
                    router.take_free()
                return await send(*args, **options)

            client.send = send_and_churn  # type: ignore[method-assign]
            return await router.learn_tiers(), pinned

    with FakeUpstream.running_in_thread(fake("a", "b", "c")) as server:
        learned, pinned = anyio.run(main, server.url)
    assert pinned == ["a", "b"]
    assert set(learned) == {"a", "b"}


def test_free_requests_after_a_key_rotation_keep_the_same_number_of_keys() -> None:
    """A key added and another removed leave the pool's size: the router's
    accounts must still follow (a removed key was looked up: ``PoolError``)."""

    async def main(url: str) -> list[str]:
        keys = {alias: SECRETS[alias] for alias in "ab"}
        async with AsyncClient(keys, url) as client:
            router = Router([], RoutingOptions(), None, client, None)  # type: ignore[arg-type]
            assert router.take_free() is not None
            client.driver.add_key(SECRETS["c"], KeySpec(key_id="c"))
            client.driver.remove_key("b")
            pinned = []
            for _ in range(4):
                slot = router.take_free()
                assert slot is not None
                pinned.append(slot[1])
            return pinned

    with FakeUpstream.running_in_thread(fake("a", "b", "c")) as server:
        pinned = anyio.run(main, server.url)
    assert set(pinned) == {"a", "c"}


def test_learning_the_tiers_asks_only_keys_that_may_serve_now() -> None:
    """An account whose only key is disabled is not asked (a request pinned to
    it would wait for it until its deadline, and be rejected)."""

    async def main(url: str) -> tuple[dict[str, int], int]:
        keys = {alias: SECRETS[alias] for alias in "ab"}
        config = PoolConfig(keys=[KeySpec(key_id=alias) for alias in keys], queue_timeout=0.5)
        async with AsyncClient(keys, url, config) as client:
            client.driver.mark_key("a", KeyState.DISABLED)
            router = Router([], RoutingOptions(), None, client, None)  # type: ignore[arg-type]
            learned = await router.learn_tiers()
            return learned, client.driver.pool.statistics().rejected

    with FakeUpstream.running_in_thread(fake("a", "b")) as server:
        learned, rejected = anyio.run(main, server.url)
        asked = [entry.key for entry in server.log if entry.path == "/key"]
    assert asked == ["b"]
    assert set(learned) == {"b"} and rejected == 0


def _status(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/status").json()  # type: ignore[no-any-return]


def _wait(check: Any, what: str) -> Any:
    for _ in range(400):
        found = check()
        if found:
            return found
        threading.Event().wait(0.025)
    raise AssertionError(what)


def test_free_requests_whose_callers_leave_while_queued_give_their_slots_back(
    tmp_path: Path,
) -> None:
    """One key, busy with a slow paid request (``max_in_flight = 1``): three
    free requests wait in the queue and their callers leave. None reached the
    upstream, so none counts against the account's free requests."""
    slow = Custom(lambda call: None if call.model.endswith(":free") else Slow(1.5).decide(call))
    scenario = Scenario().add(SECRETS["a"], slow, alias="a")
    config_file = tmp_path / "keyrotor.toml"
    with FakeUpstream.running_in_thread(scenario) as server:
        config_file.write_text(
            f'upstream = "{server.url}"\n[state]\nenabled = false\n'
            f'[[keys]]\nalias = "a"\nsecret = "{SECRETS["a"]}"\nmax_in_flight = 1\n'
        )
        config = load_config(config_file, {}, {"port": 0})
        with ProxyThread(config, []) as url:
            first = httpx.post(f"{url}/v1/chat/completions", json={"model": FREE, "messages": HI})
            assert first.status_code == 200, first.text
            used = _wait(lambda: _status(url)["routing"]["freeTier"].get("a"), "no free tier")
            busy = threading.Thread(
                target=httpx.post,
                args=(f"{url}/v1/chat/completions",),
                kwargs={"json": {"model": "openai/gpt-4o-mini", "messages": HI}, "timeout": 30},
            )
            busy.start()
            _wait(lambda: _status(url)["stats"]["inFlight"] == 1, "the paid request never went")
            raw = json.dumps({"model": FREE, "messages": HI}).encode()
            port = int(url.rsplit(":", 1)[1])
            callers = []
            for _ in range(3):
                caller = socket.create_connection(("127.0.0.1", port))
                caller.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                    b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(raw), raw)
                )
                callers.append(caller)
            _wait(lambda: _status(url)["stats"]["queued"] == 3, "the free requests never queued")
            for caller in callers:
                caller.close()
            _wait(lambda: _status(url)["stats"]["queued"] == 0, "the queue kept them")
            busy.join()
            after = _status(url)["routing"]["freeTier"]["a"]
        chats = [e for e in server.log if e.path == "/chat/completions"]
    assert len(chats) == 2  # the first free request and the paid one
    assert after["usedToday"] == used["usedToday"] == 1
    assert after["lastMinute"] == used["lastMinute"] == 1
