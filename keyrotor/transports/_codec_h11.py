"""The reference codec: h11 behind ``codec``'s interface (see there)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final, cast

import h11

from .codec import (
    CLOSED,
    CONTROL,
    END,
    NEED_DATA,
    BadMessage,
    BadOutgoing,
    RequestHead,
    ResponseHead,
)

__all__ = ["ClientCodec", "ServerCodec"]

_EOM: Final = h11.EndOfMessage()
_Event = RequestHead | bytes | object


def _reason(exc: BaseException) -> str:
    """h11's message up to its first colon: h11 quotes the offending bytes after it."""
    return str(exc).split(":", 1)[0][:100]


def _refused(exc: BaseException) -> BadOutgoing:
    """h11's refusal without the bytes it quotes (a header value may be a secret)."""
    return BadOutgoing(re.split(r":| b'| b\"| '", str(exc), maxsplit=1)[0][:100])


def _check_request(headers: Iterable[tuple[bytes, bytes]]) -> None:
    """What h11 lets by and httptools' parser does not: control characters in a
    value; a chunked body with an Upgrade (the httptools codec cannot read it)."""
    fields = {}
    for name, value in headers:
        if value.translate(None, CONTROL) != value:
            raise BadMessage(400, "Invalid header value char")
        fields[name] = value
    upgrade = b"upgrade" in fields and b"upgrade" in fields.get(b"connection", b"").lower()
    if upgrade and b"transfer-encoding" in fields:
        raise BadMessage(400, "Upgrade with a chunked body: send it without Upgrade")


class ServerCodec:
    """The server's side of one connection."""

    __slots__ = ("_h",)

    def __init__(self, max_head: int) -> None:
        self._h = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` at EOF."""
        self._h.receive_data(data)

    def next_event(self) -> _Event:
        try:
            event = self._h.next_event()
        except h11.RemoteProtocolError as exc:
            raise BadMessage(exc.error_status_hint, _reason(exc)) from None
        kind = type(event)
        if kind is h11.Data:
            return bytes(event.data)  # type: ignore[union-attr]
        if kind is h11.EndOfMessage:
            return END
        if kind is h11.Request:
            _check_request(event.headers)  # type: ignore[union-attr]
            return RequestHead(
                event.method,  # type: ignore[union-attr]
                event.target,  # type: ignore[union-attr]
                event.headers,  # type: ignore[union-attr]
                event.http_version,  # type: ignore[union-attr]
            )
        if event is h11.NEED_DATA:
            return NEED_DATA
        return CLOSED  # ConnectionClosed, or PAUSED (an upgrade: we close after answering)

    @property
    def buffered(self) -> bool:
        """Bytes of a next request wait in the buffer."""
        return bool(self._h.trailing_data[0])

    @property
    def expects_continue(self) -> bool:
        return self._h.they_are_waiting_for_100_continue

    @property
    def can_respond(self) -> bool:
        """No response to the current request has been started."""
        return self._h.our_state in (h11.IDLE, h11.SEND_RESPONSE)

    @property
    def reusable(self) -> bool:
        """Both messages are complete and the connection may serve another request."""
        h = self._h
        return h.our_state is h11.DONE and h.their_state is h11.DONE

    def close(self) -> None:
        """The connection is over (nothing to let go: h11 holds no callbacks)."""

    def start_next_cycle(self) -> None:
        self._h.start_next_cycle()

    def informational_continue(self) -> bytes:
        return self._h.send(h11.InformationalResponse(status_code=100, headers=[])) or b""

    def head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
        """The response head; a ``content-length`` header frames the body, else chunked
        (or, to an HTTP/1.0 peer, close-delimited)."""
        try:
            return self._h.send(h11.Response(status_code=status, headers=headers, reason=reason))  # type: ignore[return-value]
        except (h11.LocalProtocolError, TypeError, ValueError) as exc:
            raise _refused(exc) from None

    def data(self, chunk: bytes) -> bytes:
        """A body piece, framed (a fixed-length body's piece is returned as it is)."""
        try:
            return b"".join(self._h.send_with_data_passthrough(h11.Data(data=chunk)) or ())
        except h11.LocalProtocolError as exc:
            raise _refused(exc) from None

    def end(self) -> bytes:
        try:
            return self._h.send(_EOM) or b""
        except h11.LocalProtocolError as exc:
            raise _refused(exc) from None


class ClientCodec:
    """The client's side of one connection."""

    __slots__ = ("_h",)

    def __init__(self) -> None:
        self._h = h11.Connection(h11.CLIENT)

    @staticmethod
    def prepare(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> object:
        """A checked request head, ready for ``request`` (``BadOutgoing`` if invalid)."""
        try:
            return h11.Request(method=method, target=target, headers=headers)
        except (h11.LocalProtocolError, TypeError, ValueError) as exc:
            raise _refused(exc) from None

    def request(self, head: object, body: bytes | None) -> bytes:
        """The bytes of a whole request: ``head`` from ``prepare``, then ``body``."""
        h = self._h
        try:
            data = h.send(cast(h11.Request, head))
            if body:
                data += b"".join(h.send_with_data_passthrough(h11.Data(data=body)) or ())
            return data + (h.send(_EOM) or b"")
        except h11.LocalProtocolError as exc:
            raise _refused(exc) from None

    def receive_data(self, data: bytes) -> None:
        self._h.receive_data(data)

    def next_event(self) -> ResponseHead | bytes | object:
        """The final response's head (1xx skipped), body pieces, ``END``, ``NEED_DATA``."""
        h = self._h
        try:
            while True:
                event = h.next_event()
                kind = type(event)
                if kind is h11.Data:
                    return bytes(event.data)  # type: ignore[union-attr]
                if kind is h11.EndOfMessage:
                    return END
                if kind is h11.Response:
                    return ResponseHead(event.status_code, list(event.headers))  # type: ignore[union-attr]
                if event is h11.NEED_DATA:
                    return NEED_DATA
                if kind is not h11.InformationalResponse:
                    raise BadMessage(502, f"unexpected {event!r}")
        except h11.RemoteProtocolError as exc:
            raise BadMessage(502, str(exc)) from None

    @property
    def ready(self) -> bool:
        """Whether ``next_event`` answers without more bytes. h11 cannot tell
        without taking the event: always False ("it may need bytes"), so a
        reader that would write before waiting writes at once."""
        return False

    @property
    def reusable(self) -> bool:
        """The exchange is complete, nothing more was received, and the server keeps
        the connection open."""
        h = self._h
        if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
            return False
        data, closed = h.trailing_data
        return not data and not closed

    def close(self) -> None:
        """The connection is over (nothing to let go: h11 holds no callbacks)."""

    def start_next_cycle(self) -> None:
        self._h.start_next_cycle()
