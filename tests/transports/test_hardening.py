"""The transports' side of issue 11: per-key connection shares, a broken body
that fails over, separate first-byte deadlines for streams, slot waits that are
not blamed on a key."""

from __future__ import annotations

import json
from collections.abc import Callable

import anyio
import pytest

from keyrotor.testing import FakeUpstream, Hang, Ok, Scenario, Truncate
from keyrotor.transports import sync
from keyrotor.transports._h11pool import ConnectionPool, PoolOptions, TagBusy
from keyrotor.transports.asyncio import Client, HTTPOptions

MODEL = "openai/gpt-4o-mini"
HI = [{"role": "user", "content": "hi"}]
SECRETS = {
    "ok": "sk-or-v1-hardening-ok-000000000000000001",
    "ok2": "sk-or-v1-hardening-ok-000000000000000002",
    "broken": "sk-or-v1-hardening-broken-0000000000003",
    "hang": "sk-or-v1-hardening-hang-00000000000000004",
}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def scenario(**behaviours: object) -> Scenario:
    sc = Scenario()
    for alias, behaviour in behaviours.items():
        sc.add(SECRETS[alias], behaviour, alias=alias)  # type: ignore[arg-type]
    return sc


def keys(*aliases: str) -> dict[str, str]:
    return {alias: SECRETS[alias] for alias in aliases}


def chat(stream: bool = False) -> bytes:
    return json.dumps({"model": MODEL, "messages": HI, "stream": stream}).encode()


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait until ``condition`` holds (a guard of 10 s turns a hang into a failure)."""
    with anyio.fail_after(10):
        while not condition():
            await anyio.sleep(0.005)


def head(secret: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", b"Bearer " + secret.encode())]


# ------------------------------------------------------------------ the h11 pool


@pytest.mark.anyio
async def test_a_tag_holds_at_most_its_share_and_other_tags_go_on() -> None:
    async with FakeUpstream(scenario(hang=Hang(), ok=Ok())).serve() as server:
        url = server.url + "/chat/completions"
        options = PoolOptions(max_connections=4, max_per_tag=2, pool=0.2)
        async with ConnectionPool(options) as pool, anyio.create_task_group() as tasks:
            started = anyio.Event()
            held = 0

            async def stuck() -> None:
                nonlocal held
                held += 1
                if held == 2:
                    started.set()
                await pool.request(
                    b"POST", url, head(SECRETS["hang"]), chat(), read_timeout=None, tag="hang"
                )

            tasks.start_soon(stuck)
            tasks.start_soon(stuck)
            await started.wait()
            await eventually(lambda: server.stats("hang").in_flight == 2)  # both at the upstream
            with pytest.raises(TagBusy):
                await pool.request(
                    b"POST", url, head(SECRETS["hang"]), chat(), read_timeout=None, tag="hang"
                )
            for _ in range(3):  # the other tag still has slots
                response = await pool.request(
                    b"POST", url, head(SECRETS["ok"]), chat(), read_timeout=5.0, tag="ok"
                )
                assert response.status == 200
                await response.aread()
            tasks.cancel_scope.cancel()
        assert pool._shares == {}  # every share given back, also by the cancelled ones


@pytest.mark.anyio
async def test_a_waiter_gets_the_slot_its_tag_frees() -> None:
    async with FakeUpstream(scenario(ok=Ok())).serve() as server:
        url = server.url + "/chat/completions"
        options = PoolOptions(max_connections=4, max_per_tag=1, pool=5.0)
        async with ConnectionPool(options) as pool:
            first = await pool.request(
                b"POST", url, head(SECRETS["ok"]), chat(stream=True), read_timeout=5.0, tag="k"
            )
            results: list[int] = []

            async def second() -> None:
                response = await pool.request(
                    b"POST", url, head(SECRETS["ok"]), chat(), read_timeout=5.0, tag="k"
                )
                results.append(response.status)
                await response.aread()

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(second)
                await eventually(lambda: bool(pool._shares["k"].waiters))
                assert results == []  # waits: its tag's one slot is held
                await first.aread()  # the body ends: the slot passes on
            assert results == [200]
            assert pool._shares == {}


def test_pool_options_refuse_a_bad_share() -> None:
    with pytest.raises(ValueError, match="max_per_tag"):
        PoolOptions(max_per_tag=0)


# ------------------------------------------------------------------ the async client


@pytest.mark.anyio
async def test_a_body_that_breaks_off_fails_over_and_blames_its_key() -> None:
    async with FakeUpstream(scenario(broken=Truncate(), ok=Ok())).serve() as server:
        async with Client(keys("broken", "ok"), server.url) as client:
            answers = [await client.chat(model=MODEL, messages=HI) for _ in range(6)]
            status = client.status()
    assert all(answer["choices"] for answer in answers)
    by_alias = {key["alias"]: key for key in status["keys"]}
    assert by_alias["broken"]["successes"] == 0
    assert by_alias["broken"]["errors"]["transport"] >= 1
    assert by_alias["ok"]["errors"]["transport"] == 0
    assert status["stats"]["inFlight"] == 0


@pytest.mark.anyio
async def test_a_stream_still_breaks_off_in_the_callers_hands() -> None:
    """``stream()`` does not buffer: a stream that breaks off after its head was
    delivered is the caller's to see (nothing can be retried once read)."""
    from keyrotor.transports.errors import TransportError

    async with FakeUpstream(scenario(broken=Truncate(after_chunks=1))).serve() as server:
        async with Client(keys("broken"), server.url) as client:
            with pytest.raises(TransportError):
                async with client.stream(
                    "POST",
                    "/chat/completions",
                    json={"model": MODEL, "messages": HI, "stream": True},
                ) as response:
                    async for _ in response.aiter_bytes():
                        pass


@pytest.mark.anyio
async def test_a_stream_has_its_own_first_byte_deadline() -> None:
    async with FakeUpstream(scenario(hang=Hang(), ok=Ok())).serve() as server:
        options = HTTPOptions(first_byte=60.0, first_byte_stream=1.0)
        async with Client(keys("hang", "ok"), server.url, http=options) as client:
            async with client.stream(
                "POST",
                "/chat/completions",
                json={"model": MODEL, "messages": HI, "stream": True},
                pin="hang",
            ) as response:
                body = await response.aread()
            status = client.status()
    assert response.key == "ok" and response.attempts == 2
    assert b"data:" in body
    assert status["keys"][0]["errors"]["transport"] == 1


@pytest.mark.anyio
async def test_a_requests_first_byte_deadline_is_found_once_for_all_its_attempts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bodies: list[bytes | None] = []
    found = HTTPOptions.first_byte_for

    def counting(self: HTTPOptions, body: bytes | None) -> float:
        bodies.append(body)
        return found(self, body)

    monkeypatch.setattr(HTTPOptions, "first_byte_for", counting)
    async with FakeUpstream(scenario(hang=Hang(), ok=Ok())).serve() as server:
        options = HTTPOptions(first_byte=1.0)
        async with Client(keys("hang", "ok"), server.url, http=options) as client:
            response = await client.request("POST", "/chat/completions", content=chat(), pin="hang")
    assert (response.key, response.attempts) == ("ok", 2)
    assert bodies == [chat()]  # read once, not once an attempt


@pytest.mark.anyio
async def test_a_hanging_key_is_taken_out_after_two_timeouts() -> None:
    async with FakeUpstream(scenario(hang=Hang(), ok=Ok(), ok2=Ok())).serve() as server:
        options = HTTPOptions(first_byte=1.0)
        async with Client(keys("hang", "ok", "ok2"), server.url, http=options) as client:
            served = []
            for _ in range(9):
                response = await client.request(
                    "POST", "/chat/completions", json={"model": MODEL, "messages": HI}
                )
                served.append((response.key, response.attempts))
            status = client.status()
    by_alias = {key["alias"]: key for key in status["keys"]}
    assert by_alias["hang"]["state"] == "degraded"
    assert by_alias["hang"]["reason"] == "transport_timeouts"
    assert by_alias["hang"]["errors"]["transport"] == 2  # and no third attempt
    assert sum(1 for _, attempts in served if attempts > 1) == 2
    assert by_alias["ok"]["errors"]["transport"] == by_alias["ok2"]["errors"]["transport"] == 0


def test_wants_stream_reads_only_bodies_that_mention_it() -> None:
    from keyrotor.transports._http import wants_stream

    assert wants_stream(chat(stream=True))
    assert not wants_stream(chat(stream=False))
    assert not wants_stream(b'{"messages": [{"content": "\\"stream\\": true"}]}')
    assert not wants_stream(None)
    assert not wants_stream(b'not json but mentions "stream"')
    assert HTTPOptions().first_byte_for(chat(stream=True)) == HTTPOptions().first_byte_stream


# ------------------------------------------------------------------ the sync client


def test_the_sync_client_fails_over_a_body_that_breaks_off() -> None:
    with (
        FakeUpstream.running_in_thread(scenario(broken=Truncate(), ok=Ok())) as server,
        sync.Client(keys("broken", "ok"), server.url) as client,
    ):
        answers = [client.chat(model=MODEL, messages=HI) for _ in range(4)]
        status = client.status()
    assert all(answer["choices"] for answer in answers)
    by_alias = {key["alias"]: key for key in status["keys"]}
    assert by_alias["broken"]["successes"] == 0
    assert by_alias["broken"]["errors"]["transport"] >= 1
