"""httpx transports that send through the pool: the openai SDK on keyrotor, in-process.

    import httpx, openai
    from keyrotor.adapters.httpx import AsyncPoolTransport
    from keyrotor.transports.asyncio import Client

    async with Client.from_env() as pool:
        sdk = openai.AsyncOpenAI(
            base_url="http://keyrotor/v1",  # any host: nothing connects to it
            api_key="placeholder",  # never sent: the pool adds its key's Authorization
            http_client=httpx.AsyncClient(transport=AsyncPoolTransport(pool)),
            max_retries=1,
        )
        answer = await sdk.chat.completions.create(model=..., messages=[...])
        await sdk.close()

``PoolTransport`` is the same for the blocking ``keyrotor.transports.sync.Client``
and ``openai.OpenAI(http_client=httpx.Client(transport=PoolTransport(pool)))``.

What is forwarded: the method, the path and query *relative to* ``prefix``
(``"/v1"``: ``http://keyrotor/v1/chat/completions`` goes upstream as
``/chat/completions``), the body, and the caller's headers minus
Authorization, ``api-key`` and ``x-api-key`` (where SDKs put their key), Host,
Content-Length, Accept-Encoding (the pool reads bodies to account usage, so
they stay uncompressed), Cookie and hop-by-hop headers. The SDK's ``api_key``
therefore never leaves the process. Header values go byte for byte both ways.
The response is streamed as it arrives, without the upstream's ``Set-Cookie``
(a cookie belongs to one key's session with the upstream: sent back, it would
follow the caller onto other keys), with ``x-keyrotor-key`` (the alias that
served it) and ``x-keyrotor-attempts`` added; closing it (the SDK does, also
when a stream is left early) cancels the upstream request and frees the key.

When no key can serve (``NoKeyAvailable``) the transport answers like the
proxy would: its status (429 every key rate limited, 503 none usable, 502 every
attempt failed), ``retry-after`` when known, and an OpenAI-shaped error body,
so the SDK raises its usual ``RateLimitError`` / ``InternalServerError``. Other
client errors (the pool not open, closed mid-request) become
``httpx.ConnectError``, and a body that breaks off after delivery (the pool
closed meanwhile included) becomes ``httpx.ReadError``: the SDK's
``APIConnectionError``.

Retries: keyrotor fails over *inside* one SDK call (up to the pool's
``max_attempts``, on other keys), so the SDK's own retries only ever see what
the pool could not fix: typically every key busy, a 429 with ``retry-after``,
which the SDK honours before it tries again. Use ``max_retries=0`` to get that
429 at once, or 1-2 to ride out a short rate-limit window; there is no double
counting, since each SDK retry is a new, independent pool request.

Timeouts: with ``AsyncPoolTransport``, httpx's ``read`` timeout (the SDK's
``timeout``) bounds the wait for the answer, failover and the wait for a key
included: the head of a stream, or the whole of an answer that is not one (the
pool reads it before delivery, so that one that breaks off fails over), then
each read of a stream's body; past it, ``httpx.ReadTimeout`` (the SDK's
``APITimeoutError``) and the upstream request is dropped. ``None``: no
bound. The wait for a key alone ends at the pool's ``queue_timeout`` (or the
transport's ``timeout`` argument) with the answer above. ``PoolTransport``
cannot cut a blocking call short: it ignores httpx's timeouts; the blocking
client's ``HTTPOptions`` (``idle``, ``connect``, ...) bound each attempt.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, Generic, TypeVar

import anyio
import httpx

from ..transports.api import AsyncClient, ResponseHead, StreamResponse
from ..transports.errors import KeyrotorError, NoKeyAvailable
from ..transports.sync import Client
from ..transports.sync import StreamResponse as SyncStreamResponse
from .proxy.app import HOP_BY_HOP, delivered_headers, rejection

__all__ = ["AsyncPoolTransport", "PoolTransport"]

C = TypeVar("C")

# Request headers that stay here: the SDK's key (the pool sets its own), host and
# framing.
_REQUEST_DROPPED = frozenset(
    {
        "authorization",
        "api-key",
        "x-api-key",
        "cookie",
        "host",
        "content-length",
        "accept-encoding",
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Upstream headers not delivered: those of one connection, and the cookies of
# a key's session (the caller's client would send them back on any key).
_RESPONSE_DROPPED = HOP_BY_HOP | {"set-cookie"}


def _relative_path(request: httpx.Request, prefix: str) -> str:
    """``/v1/chat/completions?x=1`` -> ``/chat/completions?x=1`` (prefix ``/v1``)."""
    target = request.url.raw_path.decode("ascii")
    if prefix:
        path = target.split("?", 1)[0]
        if path == prefix or path.startswith(prefix + "/"):
            target = target[len(prefix) :]
            if not target.startswith("/"):
                target = "/" + target
    return target


def _forwarded_headers(request: httpx.Request) -> dict[str, str]:
    """The caller's headers minus credentials, host, framing and hop-by-hop;
    latin-1 text, which the pool encodes back to the very bytes sent."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in request.headers.raw:
        lower = raw_name.decode("latin-1").lower()
        if lower in _REQUEST_DROPPED:
            continue
        value = raw_value.decode("latin-1")
        headers[lower] = f"{headers[lower]}, {value}" if lower in headers else value
    return headers


def _read_timeout(request: httpx.Request) -> float | None:
    """httpx's ``read`` timeout of ``request`` (the SDK's ``timeout``); None: no bound."""
    timeout = request.extensions.get("timeout")
    return timeout.get("read") if isinstance(timeout, dict) else None


def _timed_out(request: httpx.Request, what: str, seconds: float) -> httpx.ReadTimeout:
    return httpx.ReadTimeout(f"{what} within the read timeout ({seconds:g} s)", request=request)


def _refused(exc: KeyrotorError, request: httpx.Request) -> httpx.Response:
    """``NoKeyAvailable`` as the answer the proxy would give; another client
    error (the pool not open, closed mid-request) as ``httpx.ConnectError``."""
    if not isinstance(exc, NoKeyAvailable):
        raise httpx.ConnectError(str(exc), request=request) from exc
    status, headers, body = rejection(exc)
    return httpx.Response(status, headers=headers, content=body, request=request)


def _answer(
    upstream: ResponseHead,
    stream: httpx.SyncByteStream | httpx.AsyncByteStream,
    request: httpx.Request,
) -> httpx.Response:
    """The delivered response for httpx, its body read from ``stream``; header
    values as the upstream sent their bytes (decoded as latin-1)."""
    headers = [
        (name.encode("latin-1"), value.encode("latin-1"))
        for name, value in delivered_headers(upstream, _RESPONSE_DROPPED)
    ]
    return httpx.Response(upstream.status_code, headers=headers, stream=stream, request=request)


class _AsyncBody(httpx.AsyncByteStream):
    """A delivered body for httpx: chunks as they arrive, each within ``timeout``
    (None: no bound); ``aclose`` frees the key."""

    # Its own iterator rather than an async generator: a stream left early
    # leaves nothing for the garbage collector to finalize on the event loop.

    def __init__(
        self, upstream: StreamResponse, request: httpx.Request, timeout: float | None
    ) -> None:
        self._upstream = upstream
        self._request = request
        self._timeout = timeout
        self._chunks = upstream.aiter_bytes()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        try:
            if self._timeout is None:
                return await anext(self._chunks)
            with anyio.move_on_after(self._timeout):
                return await anext(self._chunks)
        except KeyrotorError as exc:  # broken off, or the pool closed meanwhile
            raise httpx.ReadError(str(exc), request=self._request) from exc
        await self._upstream.aclose()
        raise _timed_out(self._request, "no body chunk", self._timeout)

    async def aclose(self) -> None:
        await self._upstream.aclose()


class _SyncBody(httpx.SyncByteStream):
    """The blocking twin of ``_AsyncBody``."""

    def __init__(self, upstream: SyncStreamResponse, request: httpx.Request) -> None:
        self._upstream = upstream
        self._request = request

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._upstream.iter_bytes()
        except KeyrotorError as exc:  # broken off, or the pool closed meanwhile
            raise httpx.ReadError(str(exc), request=self._request) from exc

    def close(self) -> None:
        self._upstream.close()


class _Forwarding(Generic[C]):
    """What both transports share: their arguments and the request they forward."""

    def __init__(self, client: C, *, prefix: str = "/v1", timeout: float | None = None) -> None:
        self._client = client
        self._prefix = prefix.rstrip("/")
        self._timeout = timeout

    def _forward(self, request: httpx.Request, body: bytes) -> dict[str, Any]:
        """``send``'s arguments: the path relative to the prefix, the caller's
        headers minus what stays here, the body (None for a bodiless GET)."""
        return {
            "method": request.method,
            "path": _relative_path(request, self._prefix),
            "content": body if body or request.method in ("POST", "PUT", "PATCH") else None,
            "headers": _forwarded_headers(request),
            "timeout": self._timeout,
        }


class AsyncPoolTransport(_Forwarding[AsyncClient], httpx.AsyncBaseTransport):
    """Sends httpx requests through a keyrotor ``AsyncClient`` (asyncio or trio).

    The caller opens the client (``async with``) and keeps it open while the
    transport is used; closing the transport does not close the client.

    Args:
        client: the pool's async client.
        prefix: the path prefix of the base URL the SDK was given, stripped
            before forwarding (``""``: forward paths as they are).
        timeout: longest wait for a key (``None``: the pool's ``queue_timeout``).

    httpx's ``read`` timeout bounds the wait for the answer (the wait for a
    key included; a stream's head, or the whole of an answer that is not a
    stream) and each read of a stream's body: ``httpx.ReadTimeout``.
    """

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        arguments = self._forward(request, await request.aread())
        timeout = _read_timeout(request)
        try:
            upstream = await self._send(arguments, request, timeout)
        except KeyrotorError as exc:
            return _refused(exc, request)
        try:
            return _answer(upstream, _AsyncBody(upstream, request, timeout), request)
        except BaseException:
            await upstream.aclose()
            raise

    async def _send(
        self, arguments: dict[str, Any], request: httpx.Request, timeout: float | None
    ) -> StreamResponse:
        """The pool's delivered response, within ``timeout`` (None: no bound)."""
        if timeout is None:
            return await self._client.send(**arguments)
        with anyio.move_on_after(timeout):
            return await self._client.send(**arguments)
        raise _timed_out(request, "no answer", timeout)


class PoolTransport(_Forwarding[Client], httpx.BaseTransport):
    """Sends httpx requests through a blocking keyrotor ``Client``.

    Same arguments and behaviour as ``AsyncPoolTransport``; the client must be
    open (``with Client(...) as client:``) while the transport is used. httpx's
    timeouts do not apply (a blocking call cannot be cut short): the client's
    ``HTTPOptions`` bound each attempt.
    """

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            upstream = self._client.send(**self._forward(request, request.read()))
        except KeyrotorError as exc:
            return _refused(exc, request)
        try:
            return _answer(upstream, _SyncBody(upstream, request), request)
        except BaseException:
            upstream.close()
            raise
