"""Deadlines under trio without cancel scopes (``transports/watchdog.py``), as the
pool's own sockets use them (``transports/_direct.py``).

A wait of a ``DirectStream`` ends at its deadline by the run's watchdog task, not
by a cancel scope: each wait ends at its own deadline (virtual time, exact),
whatever the others wait for; a wait that got its bytes in time leaves the
stream as it was; a socket closed under a wait is a closed socket, not a timeout.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import anyio
import pytest
import trio
import trio.testing

from keyrotor.transports._direct import DirectStream, close
from keyrotor.transports.watchdog import Watchdog


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made: list[tuple[socket.socket, socket.socket]] = []
    yield made
    for ours, theirs in made:
        ours.close()
        theirs.close()


def pair(made: list[tuple[socket.socket, socket.socket]]) -> tuple[DirectStream, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    made.append((ours, theirs))
    return DirectStream(ours), theirs


@pytest.mark.trio
async def test_each_wait_ends_at_its_own_deadline(
    autojump_clock: trio.testing.MockClock, pairs: list[tuple[socket.socket, socket.socket]]
) -> None:
    start = trio.current_time()
    ended: dict[str, tuple[float, bytes | None]] = {}

    async def wait(name: str, stream: DirectStream, after: float) -> None:
        got = await stream.receive_until(start + after)
        ended[name] = (trio.current_time() - start, got)

    (early, _), (late, _), (answered, peer) = pair(pairs), pair(pairs), pair(pairs)
    with trio.fail_after(60):  # virtual: a wait the watchdog misses fails, not hangs
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait, "late", late, 3.0)  # the watchdog sleeps until 3 s...
            await trio.sleep(0.5)
            nursery.start_soon(wait, "early", early, 1.0)  # ...and is woken for this one
            nursery.start_soon(wait, "answered", answered, 2.0)
            await trio.sleep(1.0)
            peer.send(b"in time")  # at 1.5 s
    assert ended == {
        "early": (pytest.approx(1.0), None),
        "answered": (pytest.approx(1.5), b"in time"),
        "late": (pytest.approx(3.0), None),
    }
    # The stream that was answered in time is as good as before: it waits again.
    peer.send(b"again")
    assert await answered.receive_until(trio.current_time() + 1.0) == b"again"


@pytest.mark.trio
async def test_a_send_that_finds_no_room_ends_at_its_deadline(
    autojump_clock: trio.testing.MockClock, pairs: list[tuple[socket.socket, socket.socket]]
) -> None:
    stream, _ = pair(pairs)  # the peer never reads
    start = trio.current_time()
    with trio.fail_after(60):
        assert await stream.send_until(b"x" * (64 << 20), start + 0.2) is False
    assert trio.current_time() - start == pytest.approx(0.2)


@pytest.mark.trio
async def test_a_socket_closed_under_a_wait_is_closed_not_timed_out(
    autojump_clock: trio.testing.MockClock, pairs: list[tuple[socket.socket, socket.socket]]
) -> None:
    stream, _ = pair(pairs)
    start = trio.current_time()
    caught: list[BaseException] = []

    async def wait() -> None:
        try:
            await stream.receive_until(start + 5.0)
        except BaseException as exc:
            caught.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.sleep(1.0)
        close(stream.sock)
    assert [type(exc) for exc in caught] == [anyio.ClosedResourceError]
    assert trio.current_time() - start == pytest.approx(1.0)


@pytest.mark.trio
async def test_waits_without_a_deadline_start_no_watchdog(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    stream, peer = pair(pairs)
    peer.send(b"hello")
    assert await stream.receive() == b"hello"
    await stream.send(b"back")
    assert peer.recv(10) == b"back"
    with pytest.raises(LookupError):
        Watchdog._RUN_VAR.get()
