"""The contract between the HTTP server and the proxy application.

The server (``server.py``, h11 on trio) parses requests, enforces HTTP hygiene
and writes responses; the application (``app.py``) decides what to answer. The
ASGI front (a later adapter) speaks the same contract, so the proxy's logic is
written once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import attrs

__all__ = ["App", "Request", "Response"]


@attrs.define(kw_only=True)
class Request:
    """One HTTP request, its body read whole (bounded by the server's limit).

    Attributes:
        method: ``GET``, ``POST``, ... (upper case).
        target: the request target as sent: path and query (``/v1/models?x=1``).
        headers: (name, value) pairs, names lower case, in order.
        body: the request body.
        client: the peer, ``host:port`` (for logs).
        request_id: a short id the server assigns (for logs and ``x-request-id``).
        admitted: the server already had the app ``admit`` this request's head.
        caller: the name its bearer token spends under, set when the app
            checked the token (None: no client tokens are configured).
    """

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    client: str = ""
    request_id: str = ""
    admitted: bool = False
    caller: str | None = None

    @property
    def path(self) -> str:
        """The target without its query string."""
        return self.target.split("?", 1)[0]

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (lower case), or ``default``."""
        for key, value in self.headers:
            if key == name:
                return value
        return default


@attrs.define(kw_only=True)
class Response:
    """What to answer.

    ``body`` is either bytes (sent with ``Content-Length``) or an async iterator
    of chunks (sent chunked, each chunk flushed as it comes: for SSE). The
    server calls ``aclose`` exactly once when it is done with the response,
    whether the body was sent in full, the client went away, or the server is
    shutting down; a streaming application frees its upstream request there.
    The application may withdraw ``aclose`` (set it to None) once nothing is
    left to close, e.g. when its stream reached its end: the server reads it
    when it is done, and spares a shielded wait (a cancel scope, ~5 µs).
    ``log`` carries fields the application wants in the access log line.
    """

    status: int
    headers: list[tuple[str, str]] = attrs.field(factory=list)
    body: bytes | AsyncIterator[bytes] = b""
    aclose: Callable[[], Awaitable[None]] | None = None
    log: dict[str, object] = attrs.field(factory=dict)


App = Callable[[Request], Awaitable[Response]]
"""The application: a request in, a response out. It may raise; the server
answers 500 then (without details) and logs the error.

An application may also have ``admit(request) -> Response | None``: called
with the request's head (``body`` empty) before any body byte is read; a
Response is sent as the answer and the connection closed, the body never read
(a missing token costs the server no memory). Until a connection has had a
request admitted, it counts against the server's ``max_unproven`` limits.

And ``server_answered(status)``: called for each answer the server writes
itself, never seen by the application (a malformed, oversized or too slow
request refused; a 500 after the application failed), so that its metrics
count every response."""
