"""The blocking client's connect timeout and close() against a connect that
never completes (review 14): a listener on 127.0.0.1 whose accept queue is
full, so the kernel drops further SYNs (a black hole, without the internet)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import httpcore
import pytest

from keyrotor.transports.errors import KeyrotorError, NoKeyAvailable
from keyrotor.transports.sync import Client, HTTPOptions

GUARD = 20.0  # seconds: a hang guard only, never reached when the test passes
SECRET = "sk-test-black-hole-0001"


@contextmanager
def black_hole() -> Iterator[str]:
    """An http URL whose connects hang: a listener with backlog 0 whose accept
    queue is filled (by connections never accepted)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    filled: list[socket.socket] = []
    try:
        while True:  # fill until a connect hangs (Linux: after one)
            probe = socket.socket()
            probe.settimeout(0.1)
            try:
                probe.connect(address)
            except TimeoutError:
                probe.close()
                break
            filled.append(probe)
            assert len(filled) < 64, "the listener's queue does not fill on this system"
        yield f"http://127.0.0.1:{address[1]}"
    finally:
        for sock in filled:
            sock.close()
        listener.close()


def in_thread(target: object) -> tuple[threading.Thread, list[BaseException]]:
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            target()  # type: ignore[operator]
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_connect_to_a_black_hole_ends_at_the_connect_timeout_the_caller_sets() -> None:
    with black_hole() as url, Client({"a": SECRET}, url, http=HTTPOptions(connect=0.1)) as client:
        thread, outcome = in_thread(lambda: client.request("GET", "/models"))
        thread.join(GUARD)
        assert not thread.is_alive(), "the connect was not bounded by HTTPOptions.connect"
        assert len(outcome) == 1 and isinstance(outcome[0], NoKeyAvailable)
        assert client.status()["keys"][0]["errors"]["transport"] >= 1


def test_close_returns_while_a_request_is_stuck_connecting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``close()`` does not wait for a request stuck in connect; the request
    ends at its ``connect`` timeout with the client's closing, no key blamed."""
    connecting = threading.Event()
    connect = httpcore.SyncBackend.connect_tcp

    def connect_tcp(self: httpcore.SyncBackend, *args: object, **kwargs: object) -> object:
        connecting.set()
        return connect(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(httpcore.SyncBackend, "connect_tcp", connect_tcp)
    with black_hole() as url:
        client = Client({"a": SECRET}, url, http=HTTPOptions(connect=0.5))
        client.__enter__()
        thread, outcome = in_thread(lambda: client.request("GET", "/models"))
        assert connecting.wait(GUARD)
        closer, closed = in_thread(client.close)
        closer.join(GUARD)
        assert not closer.is_alive() and not closed, "close() blocked on a connect"
        thread.join(GUARD)
        assert not thread.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], KeyrotorError)
        assert "closed" in str(outcome[0])
        assert client.status()["keys"][0]["errors"]["transport"] == 0


@contextmanager
def trickling_server() -> Iterator[str]:
    """Answers every request with a head that never ends, a byte every 10 ms."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn, suppress(OSError):  # the client gave up: a broken pipe
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nx-a: " + b"a" * 100_000:
                if stop.wait(0.01):
                    return
                conn.sendall(bytes([byte]))

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()


def test_first_byte_bounds_a_trickled_head_in_the_blocking_client() -> None:
    """A head that trickles in (each byte well within ``first_byte``) still
    fails the attempt at ``first_byte``: the deadline is the whole head's."""
    http = HTTPOptions(first_byte=0.2, idle=GUARD * 2)
    with trickling_server() as url, Client({"a": SECRET}, url, http=http) as client:
        thread, outcome = in_thread(lambda: client.request("GET", "/models"))
        thread.join(GUARD)
        assert not thread.is_alive(), "a trickled head escaped first_byte"
        assert len(outcome) == 1 and isinstance(outcome[0], NoKeyAvailable)
        assert client.status()["keys"][0]["errors"]["transport"] >= 1
