"""The HTTP layer the transports share: options, responses and error mapping.

httpcore is the client (see docs/transports.md for the measurement behind the
choice); it speaks h11, pools connections, does TLS, and runs on asyncio, trio
(through anyio) and plain threads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs
import httpcore

from .errors import ConfigurationError

__all__ = ["HTTPOptions", "Response", "failure_reason", "request_headers", "split_url"]

MAX_ERROR_BODY = 1 << 20
"""Error bodies are read (for classification) up to this many bytes."""

_HOP_BY_HOP = frozenset(
    {"authorization", "host", "content-length", "connection", "transfer-encoding", "keep-alive"}
)


@attrs.frozen(kw_only=True)
class HTTPOptions:
    """Connection pooling and timeouts (seconds) for the upstream.

    Attributes:
        connect: to open a connection (TCP and TLS).
        first_byte: from sending a request to its response's headers.
        idle: between two chunks of a body (streams included).
        write: to send a request.
        pool: to wait for a free connection.
        max_connections: connections kept to the upstream at most.
        keepalive_expiry: idle connections are closed after this long.
        probe_timeout: a whole probe (``GET /key``).
    """

    connect: float = 10.0
    first_byte: float = 120.0
    idle: float = 120.0
    write: float = 30.0
    pool: float = 30.0
    max_connections: int = 200
    keepalive_expiry: float = 30.0
    probe_timeout: float = 15.0

    def __attrs_post_init__(self) -> None:
        for field in attrs.fields(HTTPOptions):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigurationError(
                    f"HTTPOptions.{field.name} must be positive, got {value!r}"
                )

    def timeouts(self) -> dict[str, float]:
        """httpcore's per-request timeout extension (first byte is enforced apart)."""
        return {"connect": self.connect, "read": self.idle, "write": self.write, "pool": self.pool}


def split_url(base_url: str) -> tuple[str, str, bytes]:
    """``(origin, path prefix, Host header)`` of an upstream base URL, checked."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.username:
        raise ConfigurationError(
            f"invalid upstream URL {base_url!r}: use http(s)://host[:port]/path"
        )
    return f"{parts.scheme}://{parts.netloc}", parts.path.rstrip("/"), parts.netloc.encode()


def request_headers(
    host: bytes,
    secret: str,
    extra: Mapping[str, str] | Iterable[tuple[str, str]] | None,
    body: bytes | None,
) -> list[tuple[bytes, bytes]]:
    """Headers for one attempt: Host, the key's Authorization, the body's
    length and type, then the caller's own (minus Authorization, Host and
    hop-by-hop headers)."""
    headers = [(b"Host", host), (b"Authorization", b"Bearer " + secret.encode("ascii"))]
    has_body = body is not None
    if has_body:
        headers.append((b"Content-Length", str(len(body)).encode()))
        headers.append((b"Content-Type", b"application/json"))
    items = extra.items() if isinstance(extra, Mapping) else (extra or ())
    for name, value in items:
        lower = name.lower()
        if lower in _HOP_BY_HOP or (has_body and lower == "content-type"):
            continue
        headers.append((name.encode("latin-1"), value.encode("latin-1")))
    return headers


def decode_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Response headers as a dict with lower-case names (repeats joined by ', ')."""
    headers: dict[str, str] = {}
    for name, value in raw:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


def parse_json(body: bytes) -> Any:
    """JSON of an (error) body, or None when it is not JSON."""
    try:
        return json.loads(body)
    except ValueError:
        return None


def failure_reason(exc: BaseException) -> str:
    """The core's ``TransportFailed.reason`` for an httpcore exception."""
    if isinstance(exc, (httpcore.ConnectError, httpcore.ConnectTimeout)):
        return "connect"
    if isinstance(exc, httpcore.TimeoutException):
        return "timeout"
    if isinstance(exc, (httpcore.RemoteProtocolError, httpcore.LocalProtocolError)):
        return "protocol"
    return "reset"


@attrs.define
class Response:
    """An upstream response delivered through the pool.

    Attributes:
        status_code: the upstream's status.
        headers: response headers, lower-case names.
        content: the whole body (non-streaming requests).
        key: alias of the key that served it (never the secret).
        attempts: attempts it took (2 or more: failover happened).
    """

    status_code: int
    headers: dict[str, str]
    content: bytes
    key: str
    attempts: int

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.content)

    @property
    def text(self) -> str:
        """The body as text."""
        return self.content.decode("utf-8", errors="replace")

    @property
    def is_success(self) -> bool:
        """2xx."""
        return 200 <= self.status_code < 300
