"""The fast codec: httptools (llhttp) parses, heads are written here (see ``codec``).

llhttp parses eagerly: one ``feed_data`` may complete several pipelined
requests, so parsed events wait in a queue and each request's own facts
(keep-alive, HEAD, ``Expect``) travel with its head. What llhttp leaves to its
user is done here the way h11 does it: the head-size limit, EOF (a body read
to EOF ends there; anything else cut short is an error), HEAD responses (no
body whatever their headers say), framing and validating what we send.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Final, cast

import httptools

from .codec import (
    CLOSED,
    END,
    NEED_DATA,
    TOKEN,
    BadMessage,
    BadOutgoing,
    RequestHead,
    ResponseHead,
    check_fields,
)

__all__ = ["ClientCodec", "ServerCodec"]

_IDLE: Final = 0
_SENDING: Final = 1
_DONE: Final = 2
_NO_BODY_STATUSES: Final = frozenset({204, 304})
_CLOSE: Final = (b"connection", b"close")
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"
_BAD_TARGET: Final = re.compile(rb"[\x00-\x20\x7f]")


def _head_lines(first: bytes, headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """A head's first line and a line per field (checked by the caller), without
    the blank line that ends it."""
    return [first, *(b"%s: %s\r\n" % field for field in headers)]


class _Request(RequestHead):
    """A parsed head with the facts its response needs."""

    __slots__ = ("expect", "keep_alive")
    expect: bool
    keep_alive: bool


class _Inert:
    """A parser's protocol with no callbacks: what a closed codec's parser holds."""


_INERT: Final = _Inert()


class ServerCodec:
    """The server's side of one connection."""

    __slots__ = (
        "_begun",
        "_chunked",
        "_close",
        "_continue",
        "_current",
        "_eof",
        "_events",
        "_expect",
        "_head_bytes",
        "_headers",
        "_in_head",
        "_left",
        "_max_head",
        "_no_body",
        "_our",
        "_parser",
        "_partial",
        "_raw_left",
        "_refused",
        "_stopped",
        "_their_done",
        "_url",
    )

    def __init__(self, max_head: int) -> None:
        self._parser = httptools.HttpRequestParser(self)  # holds this codec: see ``close``
        self._max_head = max_head
        self._events: deque[object] = deque()
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._partial = False  # a request has begun and is not complete
        self._raw_left = 0  # body bytes of an Upgrade request still to come (read here)
        self._in_head = False  # ... and its head is not complete
        self._head_bytes = 0  # bytes received while a head was incomplete
        self._begun = 0  # requests begun
        self._eof = False
        self._stopped = False  # an upgrade or a parse error: read nothing more
        self._refused: BadMessage | None = None  # a head we refused in a callback
        self._current: _Request | None = None  # the request being answered
        self._expect = False
        self._continue = False
        self._their_done = False
        self._our = _IDLE
        self._close = False
        self._chunked = False
        self._no_body = False
        self._left = -1  # body bytes still to send under a content-length (-1: none)

    # -------------------------------------------------------------- llhttp callbacks

    def on_message_begin(self) -> None:
        self._begun += 1
        self._partial = self._in_head = True
        self._url = b""
        self._headers = []
        self._continue = False  # this head asks for 100 Continue (on_header)

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # a chunked body's trailer fields are not the head's (as h11)
            # llhttp keeps a value's trailing whitespace; RFC 9110 5.5 (and h11) do not
            name = name.lower()
            value = value.rstrip(b" \t")
            self._headers.append((name, value))
            if name == b"expect":
                self._continue = value.lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = parser.get_http_version().encode("ascii")
        if version == b"1.1":  # RFC 9112 3.2, as h11 checks: exactly one Host
            hosts = sum(1 for name, _ in self._headers if name == b"host")
            if hosts != 1:
                self._refused = BadMessage(
                    400,
                    "Missing mandatory Host: header"
                    if not hosts
                    else "Found multiple Host: headers",
                )
                raise self._refused
        head = _Request(parser.get_method(), self._url, self._headers, version)
        head.keep_alive = version == b"1.1" and parser.should_keep_alive()
        head.expect = version == b"1.1" and self._continue  # (on_header saw it)
        self._events.append(head)
        self._in_head = False

    def on_body(self, body: bytes) -> None:
        self._events.append(body)

    def on_message_complete(self) -> None:
        self._events.append(END)
        self._partial = False

    # -------------------------------------------------------------- receiving

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` at EOF."""
        if not data:
            self._eof = True
            return
        if self._raw_left:
            self._take_raw(data)
            return
        if self._stopped:
            return
        begun = self._begun
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgraded(data, exc.args[0] if exc.args else len(data))
            return
        except httptools.HttpParserError as exc:
            self._stopped = True
            reason = str(exc.args[0] if exc.args else "invalid request")[:100]
            self._events.append(self._refused or BadMessage(400, reason))
            return
        if self._in_head:  # bound what llhttp keeps of a head that has not ended
            if self._begun == begun:
                self._head_bytes += len(data)
            else:  # begun in this read: what of it was parsed so far
                self._head_bytes = len(self._url) + sum(len(n) + len(v) for n, v in self._headers)
            if self._head_bytes > self._max_head:
                self._stopped = True
                self._events.append(BadMessage(431, "Request head too large"))

    def _upgraded(self, data: bytes, offset: int) -> None:
        """llhttp stops after an Upgrade (or CONNECT) request's head, its body
        skipped, to hand the connection over. This server upgrades nothing: the
        request is answered as any other (CONNECT is refused), its
        ``Content-Length`` body read here (a chunked one refused), then the
        connection closes."""
        self._stopped = True
        events = self._events
        head = next((e for e in reversed(events) if type(e) is _Request), None)
        if head is None:
            return
        head.keep_alive = False
        fields = dict(head.headers)
        if b"transfer-encoding" in fields:
            while events and events[-1] is not head:
                events.pop()
            events.pop()
            events.append(BadMessage(400, "Upgrade with a chunked body: send it without Upgrade"))
            return
        length = int(fields.get(b"content-length", b"0") or 0)
        if length > 0 and events and events[-1] is END:
            events.pop()  # llhttp skipped the body: it comes from here
            self._partial = True
            self._raw_left = length
            self._take_raw(data[offset:])

    def _take_raw(self, data: bytes) -> None:
        """Body bytes of an Upgrade request (``_upgraded``); what follows it is dropped."""
        piece = data[: self._raw_left]
        if piece:
            self._events.append(piece)
            self._raw_left -= len(piece)
        if not self._raw_left:
            self._events.append(END)
            self._partial = False

    def next_event(self) -> object:
        events = self._events
        if events:
            event = events.popleft()
            kind = type(event)
            if kind is bytes:
                self._expect = False
            elif event is END:
                self._their_done = True
                self._expect = False
            elif kind is _Request:
                self._start(event)  # type: ignore[arg-type]
            else:
                raise event  # type: ignore[misc]
            return event
        if self._eof:
            if self._partial:
                raise BadMessage(400, "the client closed the connection in the middle of a request")
            return CLOSED
        return NEED_DATA

    def _start(self, head: _Request) -> None:
        self._current = head
        self._expect = head.expect
        self._their_done = False
        self._our = _IDLE

    @property
    def buffered(self) -> bool:
        """Bytes of a next request wait (parsed or not)."""
        return bool(self._events) or self._partial

    @property
    def expects_continue(self) -> bool:
        return self._expect and self._our == _IDLE

    @property
    def can_respond(self) -> bool:
        return self._our == _IDLE

    @property
    def reusable(self) -> bool:
        current = self._current
        return (
            self._our == _DONE
            and self._their_done
            and not self._close
            and current is not None
            and current.keep_alive
        )

    def close(self) -> None:
        """The connection is over. The parser holds this codec's callbacks, so the
        two make a reference cycle the garbage collector would have to find; a
        parser with no callbacks takes its place (what it is fed now is lost)."""
        self._parser = httptools.HttpRequestParser(_INERT)

    def start_next_cycle(self) -> None:
        if not self.reusable:
            raise BadOutgoing("the connection cannot serve another request")
        self._our = _IDLE
        self._their_done = False

    # -------------------------------------------------------------- sending

    def informational_continue(self) -> bytes:
        self._expect = False
        return _CONTINUE

    def head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
        """The response head; a ``content-length`` header frames the body, else chunked
        (or, to an HTTP/1.0 peer, close-delimited)."""
        if self._our != _IDLE:
            raise BadOutgoing("a response was already started")
        if type(status) is not int or not 200 <= status <= 999:
            raise BadOutgoing(f"invalid status code {status!r}")
        check_fields(headers)
        current = self._current
        close = current is None or not current.keep_alive
        length = -1
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                if length >= 0 or not value.isdigit():
                    raise BadOutgoing("invalid or repeated content-length")
                length = int(value)
            elif lower == b"transfer-encoding":
                raise BadOutgoing("transfer-encoding is the codec's to set")
            elif lower == b"connection" and b"close" in value.lower():
                close = True
        no_body = status in _NO_BODY_STATUSES or (current is not None and current.method == b"HEAD")
        lines = _head_lines(b"HTTP/1.1 %d %s\r\n" % (status, reason), headers)
        # No length: chunked (so that a body cut short is seen to be: also when the
        # connection closes after it), or to an HTTP/1.0 peer, up to the close (as h11).
        chunked = (
            length < 0
            and status not in _NO_BODY_STATUSES
            and current is not None
            and current.http_version == b"1.1"
        )
        if chunked:
            lines.append(b"transfer-encoding: chunked\r\n")
        if close and _CLOSE not in headers:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        self._close = close
        self._chunked = chunked and not no_body
        self._no_body = no_body
        self._left = length
        self._our = _SENDING
        self._expect = False
        return b"".join(lines)

    def data(self, chunk: bytes) -> bytes:
        """A body piece, framed (a fixed-length body's piece is returned as it is)."""
        if self._our != _SENDING:
            raise BadOutgoing("no response head was sent")
        if self._no_body:
            return b""
        if self._chunked:
            return b"%x\r\n%s\r\n" % (len(chunk), chunk)
        if self._left >= 0:
            if len(chunk) > self._left:
                raise BadOutgoing("too much data for the declared content-length")
            self._left -= len(chunk)
        return chunk

    def end(self) -> bytes:
        if self._our != _SENDING:
            raise BadOutgoing("no response head was sent")
        if self._left > 0 and not self._no_body:
            raise BadOutgoing("too little data for the declared content-length")
        self._our = _DONE
        return _LAST_CHUNK if self._chunked else b""


class ClientCodec:
    """The client's side of one connection."""

    __slots__ = (
        "_done",
        "_eof",
        "_events",
        "_extra",
        "_framed",
        "_head_only",
        "_headers",
        "_keep",
        "_parser",
        "_started",
    )

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)  # holds this codec: see ``close``
        self._events: deque[object] = deque()
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_only = False  # the request is HEAD: no body, whatever the headers say
        self._framed = False  # content-length or chunked: EOF before the end is an error
        self._started = False  # the final response has begun
        self._done = False  # ... and is complete
        self._keep = False
        self._extra = False  # bytes beyond the response (or a HEAD's): do not reuse
        self._eof = False

    @staticmethod
    def prepare(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> object:
        """A checked request head, ready for ``request`` (``BadOutgoing`` if invalid)."""
        if not TOKEN.fullmatch(method):
            raise BadOutgoing(f"invalid method {method!r}")
        if not target or _BAD_TARGET.search(target):
            raise BadOutgoing(f"invalid target {target!r}")
        check_fields(headers)
        lines = _head_lines(b"%s %s HTTP/1.1\r\n" % (method, target), headers)
        lines.append(b"\r\n")
        return (method == b"HEAD", b"".join(lines))

    def request(self, head: object, body: bytes | None) -> bytes:
        """The bytes of a whole request: ``head`` from ``prepare``, then ``body``."""
        self._head_only, data = cast(tuple[bool, bytes], head)
        return data + body if body else data

    # -------------------------------------------------------------- llhttp callbacks

    def on_message_begin(self) -> None:
        if self._started:
            self._extra = True
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._started or self._done:  # (not a chunked body's trailer fields)
            self._headers.append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            return  # 100 Continue and other interim answers: skipped
        if self._started:
            return  # a second response: unasked for, never delivered
        self._started = True
        self._events.append(ResponseHead(status, self._headers))
        if self._head_only:
            self._events.append(END)
            self._extra = True  # llhttp now waits for a body that never comes
            return
        self._framed = status in _NO_BODY_STATUSES or any(
            name == b"content-length" or name == b"transfer-encoding" for name, _ in self._headers
        )

    def on_body(self, body: bytes) -> None:
        if not self._head_only and not self._done and not self._extra:
            self._events.append(body)

    def on_message_complete(self) -> None:
        if self._started and not self._done and not self._head_only:
            self._done = True
            self._keep = self._parser.should_keep_alive()
            self._events.append(END)

    # -------------------------------------------------------------- receiving

    def receive_data(self, data: bytes) -> None:
        if not data:
            self._eof = True
            return
        if self._extra and self._head_only:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._events.append(BadMessage(502, "the server switched protocols"))
        except httptools.HttpParserError as exc:
            reason = str(exc.args[0] if exc.args else "invalid response")[:100]
            self._events.append(BadMessage(502, reason))

    def next_event(self) -> object:
        """The final response's head, body pieces, ``END``, ``NEED_DATA``."""
        events = self._events
        if events:
            event = events.popleft()
            if isinstance(event, BadMessage):
                events.appendleft(event)  # stays broken
                raise event
            return event
        if self._eof and not self._done:
            if self._started and not self._framed and not self._head_only:
                self._done = True  # a body delimited by the close
                self._keep = False
                return END
            raise BadMessage(502, "the server closed the connection with the response incomplete")
        return NEED_DATA

    @property
    def ready(self) -> bool:
        """Whether ``next_event`` answers without more bytes (an event, an error
        or the end is in hand)."""
        return bool(self._events) or (self._eof and not self._done)

    @property
    def reusable(self) -> bool:
        return self._done and self._keep and not self._extra and not self._eof

    def close(self) -> None:
        """The connection is over (see ``ServerCodec.close``)."""
        self._parser = httptools.HttpResponseParser(_INERT)

    def start_next_cycle(self) -> None:
        if not self.reusable:
            raise BadOutgoing("the connection cannot serve another request")
        self._started = self._done = self._keep = False
