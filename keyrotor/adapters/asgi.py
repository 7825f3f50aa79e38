"""The proxy as an ASGI 3 application: host keyrotor in uvicorn or hypercorn, or
mount it in Starlette or FastAPI.

``ASGIApp`` carries ASGI messages to and from the same ``ProxyApp`` the h11
server runs (``proxy/types.py``'s ``Request``/``Response`` contract), so the
routes (``/v1/*``, ``/status``, ``/metrics``, ``/healthz``) and their logic are
written once::

    # uvicorn mymodule:app   (the server must run the lifespan protocol:
    #                         uvicorn and hypercorn do)
    from keyrotor.adapters.asgi import ASGIApp
    from keyrotor.adapters.config import load_config
    app = ASGIApp.from_config(load_config("keyrotor.toml", os.environ))  # with client tokens

``from_config`` builds the pool's ``AsyncClient`` (whose task group runs the
pool's timer and probes) and the ``ProxyApp`` at lifespan startup and closes
them at shutdown. Without lifespan (a Starlette ``Mount`` does not forward it to
the mounted app) enter ``async with app.running():`` in the parent's lifespan;
until then every request is answered 503. ``ASGIApp(proxy_app)`` wraps an
application that is already running (its client's lifetime is the caller's).

Per request: the body is read whole, at most ``max_body_bytes`` (413 beyond);
a streaming body is sent chunk by chunk, one ``http.response.body`` message
each; ``Response.aclose`` is awaited exactly once, shielded. A client that
disconnects (``http.disconnect``) while its request waits for a key, for the
upstream or in the middle of a stream cancels it, which frees the key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager, suppress
from typing import Any, Final
from urllib.parse import quote

import anyio

from .config import ConfigError, ProxyConfig
from .proxy.app import error_body
from .proxy.types import App, Request, Response

__all__ = ["CLEANUP_TIMEOUT", "MAX_BODY_BYTES", "ASGIApp"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Log = Callable[[dict[str, Any]], None]

MAX_BODY_BYTES: Final = 10 * 1024 * 1024
"""The default limit on a request body (413 beyond)."""
CLEANUP_TIMEOUT: Final = 5.0
"""Seconds a shielded ``Response.aclose`` (or a stream's ``aclose``) may take."""

_JSON: Final = (b"content-type", b"application/json")
_FRAMING: Final = frozenset({"content-length", "transfer-encoding"})
_NO_BODY_STATUSES: Final = frozenset({204, 304})
_BODY_500: Final = error_body("Internal server error", "server_error")
_NOT_STARTED: Final = (
    "keyrotor has not started: run the ASGI server with lifespan support (uvicorn and "
    "hypercorn have it), or enter `async with app.running():` in the parent app's lifespan"
)


class ASGIApp:
    """An ASGI 3 application (``http`` and ``lifespan`` scopes) around a ``ProxyApp``.

    Args:
        app: the application to serve, already running; ``None`` only through
            ``from_config``.
        max_body_bytes: the largest request body accepted (413 beyond).
    """

    def __init__(self, app: App | None = None, *, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self._app = app
        self._config: ProxyConfig | None = None
        self._log: Log | None = None
        self.max_body_bytes = max_body_bytes

    @classmethod
    def from_config(
        cls,
        config: ProxyConfig,
        *,
        log: Log | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        allow_open: bool = False,
    ) -> ASGIApp:
        """An application that builds its client and ``ProxyApp`` from ``config``
        at lifespan startup (or in ``running()``) and closes them at shutdown.
        ``log`` (optional) gets one dict per key state change.

        Without client tokens anyone who reaches the app may spend the pool's
        keys, and an ASGI app cannot see which address its server listens on:
        that takes ``allow_open=True`` (for a server on a loopback address, or
        behind a front that authenticates callers itself). Raises ``ConfigError``.
        """
        if not config.client_tokens and not allow_open:
            raise ConfigError(
                "the configuration has no client tokens, so anyone who reaches this app may use "
                "the pool",
                source="configuration",
                where="[auth] client_tokens",
                fix="set KEYROTOR_CLIENT_TOKENS (or [auth] client_tokens), or pass "
                "allow_open=True when the server listens on a loopback address only",
            )
        asgi = cls(max_body_bytes=max_body_bytes)
        asgi._config = config
        asgi._log = log
        return asgi

    @property
    def app(self) -> App | None:
        """The application in service (``None`` before startup and after shutdown)."""
        return self._app

    @asynccontextmanager
    async def running(self) -> AsyncIterator[App]:
        """Build the client and ``ProxyApp`` (``from_config``) for the block's duration.

        The lifespan handler uses this; a parent application that does not
        forward lifespan to a mounted app can enter it in its own lifespan.
        """
        config = self._config
        if config is None:  # an application the caller runs
            if self._app is None:
                raise RuntimeError("ASGIApp() needs an app; or use ASGIApp.from_config(config)")
            yield self._app
            return
        if self._app is not None:
            raise RuntimeError("this ASGIApp is already running")
        # Deferred: the client pulls in the transports (anyio, h11).
        from .proxy.runtime import open_app

        log = self._log if self._log is not None else _no_log
        async with open_app(config, log) as app:
            self._app = app
            try:
                yield app
            finally:
                self._app = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":  # no websocket route: refuse the handshake (403)
            await receive()
            await send({"type": "websocket.close", "code": 1000})
        else:
            raise ValueError(f"unsupported ASGI scope type {kind!r}")

    # ------------------------------------------------------------------ lifespan

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":  # pragma: no cover - a server bug
            raise RuntimeError(f"expected lifespan.startup, got {message['type']!r}")
        started = False
        try:
            async with self.running():
                await send({"type": "lifespan.startup.complete"})
                started = True
                while (await receive())["type"] != "lifespan.shutdown":
                    pass
        except Exception as exc:
            phase = "shutdown" if started else "startup"
            await send({"type": f"lifespan.{phase}.failed", "message": f"{exc!r}"[:500]})
            return
        await send({"type": "lifespan.shutdown.complete"})

    # ---------------------------------------------------------------------- http

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self._app
        if app is None:
            await _send_json(send, 503, error_body(_NOT_STARTED, "service_unavailable", 503))
            return
        client = scope.get("client")
        request = Request(
            method=scope["method"],
            target=_target(scope),
            headers=[
                (name.decode("latin-1").lower(), value.decode("latin-1"))
                for name, value in scope.get("headers", ())
            ],
            body=b"",
            client=f"{client[0]}:{client[1]}" if client else "",
        )
        admit = getattr(app, "admit", None)
        if admit is not None:  # the token, from the head: no body is read for a refusal
            refusal = admit(request)
            if refusal is not None:
                head, with_body = _head(request, refusal)
                await send(head)
                await _send_body(send, refusal.body, with_body)
                return
            request.admitted = True
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _send_too_large(send, self.max_body_bytes, app)
            return
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # gone before the body arrived: nothing was started
            if message["type"] != "http.request":
                continue
            part = message.get("body", b"")
            size += len(part)
            if size > self.max_body_bytes:
                await _send_too_large(send, self.max_body_bytes, app)
                return
            parts.append(part)
            if not message.get("more_body", False):
                break
        request.body = b"".join(parts)

        response: Response | None = None
        error: Exception | None = None
        try:
            # The watcher cancels the scope when the client disconnects: while the
            # request waits for a key or the upstream, or while its stream runs.
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(_watch_disconnect, receive, tasks.cancel_scope)
                started = False
                try:
                    answer = await app(request)
                    if not isinstance(answer, Response):
                        raise TypeError(f"the app returned {type(answer).__name__}")
                    response = answer
                    head, with_body = _head(request, response)
                    started = True
                    await send(head)
                    await _send_body(send, response.body, with_body)
                except Exception as exc:
                    if not (started and isinstance(exc, OSError)):  # OSError: the client left
                        error = exc
                    if not started:  # answer 500 (OpenAI shape); the server logs the error
                        _answered(app, 500)
                        with suppress(OSError):
                            await _send_json(send, 500, _BODY_500)
                tasks.cancel_scope.cancel()  # stop the watcher
        finally:
            if response is not None and response.aclose is not None:
                with anyio.move_on_after(CLEANUP_TIMEOUT, shield=True):
                    await response.aclose()
        if error is not None:
            raise error


async def _watch_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def _target(scope: Scope) -> str:
    """Path and query as the client sent them, less the mount point (``root_path``)."""
    root = scope.get("root_path", "").rstrip("/")
    raw = scope.get("raw_path")
    if raw:
        path = _under(raw.decode("latin-1"), quote(root, safe="/"))
    else:
        path = quote(_under(scope["path"], root), safe="/:@!$&'()*+,;=-._~%")
    query = scope.get("query_string", b"")
    return path + ("?" + query.decode("latin-1") if query else "")


def _under(path: str, root: str) -> str:
    """``path`` less the mount point ``root`` when it lies under it (``/v1`` is
    not under ``/v``)."""
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root) :] or "/"
    return path


def _head(request: Request, response: Response) -> tuple[Message, bool]:
    """The ``http.response.start`` message, and whether a body follows it."""
    headers = [
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in response.headers
        if name.lower() not in _FRAMING
    ]
    no_body_status = response.status in _NO_BODY_STATUSES
    if isinstance(response.body, bytes) and not no_body_status:
        headers.append((b"content-length", b"%d" % len(response.body)))
    head = {"type": "http.response.start", "status": response.status, "headers": headers}
    return head, not (no_body_status or request.method == "HEAD")


async def _send_body(send: Send, body: bytes | AsyncIterator[bytes], with_body: bool) -> None:
    """The whole body in one message; a stream's chunks as they come. A stream
    that says its next chunk is in hand (``ready``, as the proxy's relay does)
    has what is ready joined into one message, its last chunk with the end;
    nothing is held while the next chunk is awaited."""
    if isinstance(body, bytes):
        await send({"type": "http.response.body", "body": body if with_body else b""})
        return
    chunks = body.__aiter__()
    lookahead = hasattr(chunks, "ready")
    held: list[bytes] = []
    try:
        if with_body:
            while True:
                if held and not (lookahead and chunks.ready):  # type: ignore[attr-defined]
                    more = {"type": "http.response.body", "body": b"".join(held), "more_body": True}
                    held.clear()
                    await send(more)
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                except Exception:
                    if held:  # what was in hand goes out before the stream's error does
                        last = {"type": "http.response.body", "body": b"".join(held)}
                        await send({**last, "more_body": True})
                    raise
                if chunk:
                    held.append(chunk)
        await send({"type": "http.response.body", "body": b"".join(held), "more_body": False})
    finally:
        aclose = getattr(chunks, "aclose", None)  # an async generator's
        if aclose is not None:
            with anyio.move_on_after(CLEANUP_TIMEOUT, shield=True):
                await aclose()


async def _send_json(send: Send, status: int, body: bytes) -> None:
    headers = [_JSON, (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _answered(app: App, status: int) -> None:
    """An answer written here, not by ``app``: counted in its metrics (``types.App``)."""
    answered = getattr(app, "server_answered", None)
    if answered is not None:
        answered(status)


async def _send_too_large(send: Send, limit: int, app: App) -> None:
    _answered(app, 413)
    message = f"Request body too large (limit {limit} bytes)"
    await _send_json(send, 413, error_body(message, "invalid_request_error", 413))


def _no_log(record: dict[str, Any]) -> None:
    pass
