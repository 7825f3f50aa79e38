"""The async client's block, re-entry, probes and batches (review 12), on
asyncio and trio against the fake upstream on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from keyrotor.testing import Drop, FakeUpstream, Ok, Scenario
from keyrotor.transports import _h11pool as h11pool
from keyrotor.transports._exchange import Open
from keyrotor.transports.asyncio import Client, NoKeyAvailable
from keyrotor.transports.errors import KeyrotorError

pytestmark = pytest.mark.anyio

MODEL = "openai/gpt-4o-mini"
HI = [{"role": "user", "content": "hi"}]
BODY = {"model": MODEL, "messages": HI}
SECRETS = {
    "a": "sk-or-v1-test-a000000000000000000000001",
    "b": "sk-or-v1-test-b000000000000000000000002",
    "drop": "sk-or-v1-test-drop00000000000000000003",
}
NEW_A = "sk-or-v1-test-newa0000000000000000000004"
GUARD = 30  # seconds: a hang guard only, never reached when the test passes


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def server() -> AsyncIterator[FakeUpstream]:
    sc = Scenario()
    sc.add(SECRETS["a"], Ok(), alias="a")
    sc.add(SECRETS["b"], Ok(), alias="b")
    sc.add(SECRETS["drop"], Drop(), alias="drop")
    sc.add(NEW_A, Ok(), alias="a2")
    async with FakeUpstream(sc).serve() as upstream:
        yield upstream


def keys(*aliases: str) -> dict[str, str]:
    return {alias: SECRETS[alias] for alias in aliases}


# ------------------------------------------- 1. the block's errors as they came


async def test_the_clients_own_error_leaves_the_block_unwrapped(server: FakeUpstream) -> None:
    with pytest.raises(NoKeyAvailable):
        async with Client(keys("a"), server.url) as client:
            client.mark_key("a", "disabled")
            await client.chat(model=MODEL, messages=HI)


@pytest.mark.parametrize(
    "error",
    [ValueError("mine"), ExceptionGroup("my own tasks", [ValueError("mine")])],
    ids=["ValueError", "ExceptionGroup"],
)
async def test_the_callers_error_leaves_the_block_as_it_is(
    server: FakeUpstream, error: Exception
) -> None:
    with pytest.raises(type(error)) as raised:
        async with Client(keys("a"), server.url):
            raise error
    assert raised.value is error


async def test_cancelling_the_block_still_cancels_it(server: FakeUpstream) -> None:
    with anyio.fail_after(GUARD), anyio.CancelScope() as scope:
        async with Client(keys("a"), server.url):
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    async with anyio.create_task_group() as tasks:  # a task that holds a client

        async def user() -> None:
            async with Client(keys("a"), server.url):
                await anyio.sleep_forever()

        tasks.start_soon(user)
        await anyio.sleep(0)
        tasks.cancel_scope.cancel()


async def test_an_asyncio_task_cancelled_in_the_block_ends_cancelled(
    server: FakeUpstream, anyio_backend: str
) -> None:
    if anyio_backend != "asyncio":
        pytest.skip("asyncio's Task.cancel()")
    entered = anyio.Event()

    async def user() -> None:
        async with Client(keys("a"), server.url):
            entered.set()
            await anyio.sleep_forever()

    task = asyncio.get_running_loop().create_task(user())
    with anyio.fail_after(GUARD):
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert task.cancelled()


async def test_a_failure_of_the_clients_own_tasks_still_surfaces(server: FakeUpstream) -> None:
    client = Client(keys("a"), server.url)

    async def broken_timer() -> None:
        await anyio.sleep(0)
        raise RuntimeError("the timer broke")

    client._run_timer = broken_timer  # type: ignore[method-assign]
    with anyio.fail_after(GUARD), pytest.raises(BaseExceptionGroup) as raised:
        async with client:
            await anyio.sleep_forever()  # cancelled by the failure
    assert raised.value.subgroup(RuntimeError) is not None


# ------------------------------- 2. a key rotated while its probe is in flight


async def test_readding_a_key_while_its_probe_runs(
    server: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """The orphaned probe's end reaches neither the new key nor the block."""
    started, release, answered = anyio.Event(), anyio.Event(), anyio.Event()
    async with Client(keys("a", "b"), server.url) as client:
        opener = client._open

        async def held_probe(step: Open) -> h11pool.Response:
            if step.request is None:  # the probe of the old key
                started.set()
                await release.wait()
                raise h11pool.ConnectError("no answer")
            return await opener(step)

        finished = client.driver.probe_finished

        def heard(key_id: str, *rest: Any) -> None:
            try:
                finished(key_id, *rest)
            finally:
                answered.set()

        client._open = held_probe  # type: ignore[method-assign]
        client.driver.probe_finished = heard  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR), anyio.fail_after(GUARD):
            client.probe_keys("a")
            await started.wait()
            client.remove_key("a")
            client.add_key("a", NEW_A)
            release.set()
            await answered.wait()
            answer = await client.request("POST", "/chat/completions", json=BODY, pin="a")
        (a,) = [k for k in client.status()["keys"] if k["alias"] == "a"]
    assert answer.status_code == 200 and answer.key == "a"
    assert a["state"] == "healthy" and not a["probing"]
    assert not caplog.records  # the pool took the orphan's end: no error to log


async def test_a_probe_that_fails_unexpectedly_is_logged_not_raised(
    server: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    answered = anyio.Event()
    async with Client(keys("a", "b"), server.url) as client:

        def broken(key_id: str, *rest: Any) -> None:
            answered.set()
            raise RuntimeError("a bug")

        client.driver.probe_finished = broken  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR), anyio.fail_after(GUARD):
            client.probe_keys("a")
            await answered.wait()
            answer = await client.chat(model=MODEL, messages=HI)
    assert answer["choices"]
    assert "keyrotor probe of key 'a' failed" in caplog.text
    assert SECRETS["a"] not in caplog.text


# ------------------------------------------------------------- 3. re-entry


async def test_a_client_entered_again_fails_over_again(server: FakeUpstream) -> None:
    client = Client(keys("drop", "a"), server.url)
    for _ in range(2):
        async with client:
            answer = await client.request("POST", "/chat/completions", json=BODY, pin="drop")
            assert (answer.key, answer.attempts) == ("a", 2)
            client.mark_key("drop", "healthy")


async def test_a_client_is_entered_once_at_a_time(server: FakeUpstream) -> None:
    async with Client(keys("a"), server.url) as client:
        with pytest.raises(KeyrotorError, match="already open"):
            await client.__aenter__()
        assert (await client.chat(model=MODEL, messages=HI))["choices"]


# --------------------------------------------------- 4. parallel_chat's errors


async def test_parallel_chat_raises_an_error_of_its_own_kind(server: FakeUpstream) -> None:
    unencodable = {"model": MODEL, "messages": HI, "seed": {1, 2}}  # json.dumps refuses a set
    async with Client(keys("a", "b"), server.url) as client:
        with pytest.raises(TypeError, match="not JSON serializable"):
            await client.parallel_chat_partial([BODY, unencodable])
        with pytest.raises(TypeError, match="not JSON serializable"):
            await client.parallel_chat([unencodable, BODY])
        status = client.status()
    assert status["stats"]["delivered"] == 2  # the other requests ran to their end


# ----------------------------------------------------- 5. used before entering


async def test_a_client_not_entered_says_so_instead_of_waiting(server: FakeUpstream) -> None:
    client = Client(keys("a"), server.url)
    client.mark_key("a", "rate_limited", duration=1)  # the request would wait for it
    with anyio.fail_after(GUARD), pytest.raises(KeyrotorError, match="inside `async with"):
        await client.chat(model=MODEL, messages=HI, timeout=2)
    assert client.status()["stats"]["totalRequests"] == 0


def test_time_goes_on_when_the_client_is_entered_again_in_another_trio_run() -> None:
    # Each trio.run's clock starts anywhere: entered again in a run whose clock
    # was behind the pool's time, no deadline passed (Driver.now() never goes
    # back) — cooldowns and timeouts waited for that clock to catch up.
    import trio
    import trio.testing

    from keyrotor.core import KeyState
    from keyrotor.transports.trio import Client as TrioClient

    client = TrioClient(keys("a"), "http://127.0.0.1:9/api/v1")

    def state() -> str:
        return str(client.status()["keys"][0]["state"])

    async def first() -> None:
        async with client:
            await trio.sleep(100_000)  # this run's clock is far ahead of the next one's
            client.driver.mark_key("a", KeyState.RATE_LIMITED, 30.0)

    async def second() -> None:
        async with client:
            assert state() == "rate_limited"  # its 30 s are not over...
            await trio.sleep(31)
            assert state() == "recovering"  # ...and then they are (on trial)

    trio.run(first, clock=trio.testing.MockClock(autojump_threshold=0))
    trio.run(second, clock=trio.testing.MockClock(autojump_threshold=0))
