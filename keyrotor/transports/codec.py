"""HTTP/1.1 message codecs: one interface, two parsers.

The proxy's server and the async transports' connection pool speak HTTP/1.1
through a codec: bytes in (``receive_data``), events out (``next_event``),
bytes to send out of heads and body chunks. Two implementations:

- ``h11`` (``_codec_h11.py``): the reference, pure Python; always installed.
- ``httptools`` (``_codec_httptools.py``): llhttp, the C parser of Node.js
  and uvicorn, with heads written by hand; an optional extra
  (``pip install 'keyrotor[fast]'``), about 10x less CPU per message.

``parser="auto"`` (the default everywhere) takes httptools when it is
installed, else h11. The test suite runs the server's and the pool's tests
on both. Events:

- ``RequestHead`` / ``ResponseHead``: a head; header names lower-case.
- ``bytes``: a piece of body.
- ``END``: the message is complete. ``NEED_DATA``: feed more bytes.
  ``CLOSED``: the peer closed between messages.

``close()`` when the connection is over: a codec may hold a reference
cycle until then (httptools' parser holds the codec's callbacks).

Errors: ``BadMessage`` (the peer broke HTTP/1.1: ``status`` is the answer a
server gives, ``reason`` a short text that never quotes the peer's bytes) and
``BadOutgoing`` (what we were about to send is not valid HTTP; nothing of it
was produced).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final, Literal

__all__ = [
    "CLOSED",
    "CONTROL",
    "END",
    "NEED_DATA",
    "TOKEN",
    "BadMessage",
    "BadOutgoing",
    "RequestHead",
    "ResponseHead",
    "check_fields",
    "codecs",
    "resolve",
]


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA: Final = _Marker("NEED_DATA")
END: Final = _Marker("END")
CLOSED: Final = _Marker("CLOSED")


class BadMessage(Exception):
    """The peer broke HTTP/1.1. ``status``: what a server answers (400, 431...)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class BadOutgoing(Exception):
    """A head or body we were about to send is not valid HTTP/1.1 (nothing was sent)."""


class RequestHead:
    """A request's method, target, headers (names lower-case) and version (b"1.1")."""

    __slots__ = ("headers", "http_version", "method", "target")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        http_version: bytes,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.http_version = http_version


class ResponseHead:
    """A final response's status and headers (names lower-case)."""

    __slots__ = ("headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.headers = headers


# RFC 9110 5.1 (token) and 5.5 (field values: no control characters but the
# tab, no leading or trailing whitespace); h11 checks the same.
TOKEN: Final = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
CONTROL: Final = bytes([*range(0x09), *range(0x0A, 0x20), 0x7F])
"""The control characters no field value may hold (the tab may)."""
_good_names: set[bytes] = set()


def check_fields(headers: Sequence[tuple[bytes, bytes]]) -> None:
    """Refuse (``BadOutgoing``) a header name that is not a token or a value
    with control characters or surrounding whitespace. Messages name the
    header, never its value (it may be a secret)."""
    for field in headers:
        try:
            name, value = field
        except (TypeError, ValueError):
            raise BadOutgoing(
                f"a header must be a (name, value) pair of bytes, not {type(field).__name__}"
            ) from None
        if type(name) is not bytes or type(value) is not bytes:
            raise BadOutgoing("a header's name and value must be bytes")
        if name not in _good_names:
            if not TOKEN.fullmatch(name):
                raise BadOutgoing(f"invalid header name {name[:40]!r}")
            if len(_good_names) < 1024:
                _good_names.add(name)
        # translate and strip give back the value itself when there is nothing to
        # remove: two C calls, 2-4x quicker than a regex search a value.
        if value.translate(None, CONTROL) != value or value.strip(b" \t") != value:
            raise BadOutgoing(f"invalid value for header {name.decode('latin-1')}")


def codecs(parser: str) -> tuple[type[Any], type[Any]]:
    """The (server, client) codec classes of ``parser`` (see ``resolve``)."""
    if resolve(parser) == "httptools":
        from . import _codec_httptools as chosen
    else:
        from . import _codec_h11 as chosen  # type: ignore[no-redef]
    return chosen.ServerCodec, chosen.ClientCodec


def httptools_available() -> bool:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(parser: str) -> Literal["h11", "httptools"]:
    """The parser ``parser`` names: ``auto`` is httptools when installed, else h11.

    Raises ``ValueError`` for an unknown name or httptools not installed.
    """
    if parser == "h11":
        return "h11"
    if parser == "auto":
        return "httptools" if httptools_available() else "h11"
    if parser == "httptools":
        if not httptools_available():
            raise ValueError(
                "the httptools parser is not installed: pip install 'keyrotor[fast]', "
                'or choose parser = "h11"'
            )
        return "httptools"
    raise ValueError(f'unknown HTTP parser {parser!r}: choose "auto", "h11" or "httptools"')
