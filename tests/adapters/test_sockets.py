"""The server's sockets (``proxy/sockets.py``): what trio's listener and streams did for it."""

from __future__ import annotations

import errno
import socket
from typing import Any

import pytest
import trio

from keyrotor.adapters.proxy.sockets import Stream, accept, listen


class _Listener:
    """A listener whose accept() fails with ``errors`` first, then hands over ``sock``."""

    def __init__(self, sock: socket.socket, *errors: OSError) -> None:
        self.sock = sock
        self.errors = list(errors)
        self.calls = 0

    def accept(self) -> tuple[socket.socket, Any]:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.sock, ("127.0.0.1", 5000)


@pytest.mark.trio
async def test_accept_skips_connections_that_died_before_they_were_accepted() -> None:
    ours, theirs = socket.socketpair()
    listener = _Listener(
        ours,
        ConnectionAbortedError(errno.ECONNABORTED, "reset before accept"),
        PermissionError(errno.EPERM, "denied by a firewall"),
    )
    with theirs:
        stream, host = await accept(listener)  # type: ignore[arg-type]
        assert (stream.sock, host, listener.calls) == (ours, "127.0.0.1", 3)
        stream.close()


@pytest.mark.trio
async def test_accept_leaves_resource_errors_to_the_caller() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        listener = _Listener(ours, OSError(errno.EMFILE, "too many open files"))
        with pytest.raises(OSError) as caught:
            await accept(listener)  # type: ignore[arg-type]
        assert caught.value.errno == errno.EMFILE


@pytest.mark.trio
async def test_a_stream_reads_writes_waits_for_room_and_ends() -> None:
    ours, theirs = socket.socketpair()
    stream = Stream(ours)
    theirs.setblocking(False)
    big = b"x" * (8 << 20)  # more than the socket buffers hold: send_rest must wait for room
    received = bytearray()

    async def drain() -> None:
        while len(received) < len(big):
            await trio.lowlevel.wait_readable(theirs)
            received.extend(theirs.recv(1 << 20))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            sent = stream.send_now(big)
            assert sent < len(big)
            await stream.send_rest(big, sent)
    assert bytes(received) == big
    assert stream.receive_now(100) is None  # nothing there yet: no wait
    theirs.send(b"hello")
    assert await stream.receive_some(100, wait_first=True) == b"hello"
    theirs.send(b"again")
    assert stream.receive_now(100) == b"again"
    stream.send_eof()
    theirs.close()
    assert stream.receive_now(100) == b""  # EOF
    assert await stream.receive_some(100) == b""
    stream.close()
    stream.close()  # twice: no error


@pytest.mark.trio
async def test_listen_binds_every_address_and_closes_them_all_on_failure() -> None:
    sockets = await listen("127.0.0.1", 0)
    try:
        port = sockets[0].getsockname()[1]
        with pytest.raises(OSError):
            await listen("127.0.0.1", port)  # taken
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.trio
async def test_head_waiting_peeks_for_a_whole_head_without_reading_it() -> None:
    ours, theirs = socket.socketpair()
    stream = Stream(ours)
    try:
        assert not stream.head_waiting(1024)  # nothing yet
        theirs.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        assert not stream.head_waiting(1024)  # a part of a head
        theirs.sendall(b"\r\n")
        assert stream.head_waiting(1024)
        assert not stream.head_waiting(8)  # longer than the limit: not looked for past it
        assert stream.receive_now(1024) == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"  # still all there
        theirs.close()
        assert not stream.head_waiting(1024)  # EOF
    finally:
        stream.close()
