"""The async client, written once on anyio: it runs under asyncio and trio.

``keyrotor.transports.asyncio.Client`` and ``keyrotor.transports.trio.Client``
are this class. Everything that can be decided is decided by the ``Driver``
(and the core behind it); this module only sends, waits and sleeps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Self

import anyio

from ..core import Deliver, PoolConfig, Probe, Reject, Send
from . import _h11pool as h11pool
from ._base import ClientBase, chat_payload
from ._driver import OPENROUTER_URL, Driver, Slot, StreamAccountant
from ._http import (
    MAX_ERROR_BODY,
    HTTPOptions,
    LineDecoder,
    Response,
    ResponseHead,
    decode_headers,
    encode_body,
    json_or_raise,
    request_headers,
)
from .errors import KeyrotorError, NoKeyAvailable, TransportError

# An attempt failed without an answer: report TransportFailed and fail over.
# LocalProtocolError is not here: HTTP refuses the caller's own request.
TRANSPORT_ERRORS: tuple[type[Exception], ...] = (
    h11pool.ConnectError,
    h11pool.ReadError,
    h11pool.WriteError,
    h11pool.RemoteProtocolError,
    TimeoutError,  # the pool's timeouts, and our first-byte deadline
)


PROBE_ERRORS: tuple[type[Exception], ...] = (*TRANSPORT_ERRORS, KeyrotorError)
"""A probe that ends with one of these got no answer (``status=None``)."""


def failure_reason(exc: BaseException) -> str:
    """The core's ``TransportFailed.reason`` for an error of the h11 pool. A wait
    for a connection slot is ``busy`` (the key's own share was full) or ``pool``
    (every slot was taken): neither is blamed on the key."""
    if isinstance(exc, h11pool.ConnectError):
        return "connect"
    if isinstance(exc, h11pool.TagBusy):
        return "busy"
    if isinstance(exc, h11pool.PoolTimeout):
        return "pool"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, h11pool.RemoteProtocolError):
        return "protocol"
    return "reset"


__all__ = ["AsyncClient", "StreamResponse"]


class _Waiter:
    """Wakes one waiting task; re-armed after every wait."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = anyio.Event()

    def wake(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = anyio.Event()


class StreamResponse(ResponseHead):
    """A delivered response whose body is read as it arrives.

    Iterate ``aiter_bytes()`` or ``aiter_lines()``; usage in the last SSE
    chunk and an in-stream error are accounted to the key when the body ends.
    A body that breaks off raises ``TransportError``.
    """

    def __init__(
        self,
        client: AsyncClient,
        request_id: str,
        response: h11pool.Response,
        deliver: Deliver,
        headers: dict[str, str],
        prefetched: bytes | None = None,
    ) -> None:
        super().__init__(deliver, headers)
        self._client = client
        self._prefetched = prefetched
        self._request_id = request_id
        self._response = response
        self._accountant = StreamAccountant(headers.get("content-type", ""))
        self._done = False

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk as the upstream sends it.

        An iterator object rather than a generator, so breaking out of the
        loop leaves nothing for the garbage collector to finalize.
        """
        return _Chunks(self)

    def aiter_lines(self) -> AsyncIterator[str]:
        """The body as text lines (SSE ``data:`` and comment lines included)."""
        return _Lines(self)

    async def aread(self) -> bytes:
        """The rest of the body at once."""
        return b"".join([chunk async for chunk in self.aiter_bytes()])

    async def _next_chunk(self) -> bytes | None:
        """The next piece of the body, or None at its end (accounted then)."""
        if self._done:
            return None
        prefetched = self._prefetched
        if prefetched is not None:  # read already: an error answer, or a whole one
            self._prefetched = None
            if prefetched:
                self._accountant.feed(prefetched)
                return prefetched
            chunk = None
        else:
            try:
                chunk = await anext(self._response, None)
            except TRANSPORT_ERRORS as exc:
                await self._end(failure=failure_reason(exc))
                raise TransportError(f"the response body broke off ({exc})") from exc
        if chunk is None:
            self._accountant.close()
            await self._end()
            return None
        self._accountant.feed(chunk)
        return chunk

    async def _end(self, failure: str | None = None) -> None:
        if self._done:
            return
        self._done = True
        try:
            await self._response.aclose()  # frees its slot first; closes shielded
        finally:
            self._client._driver.finish(self._request_id, self.key, self._accountant, failure)

    async def aclose(self) -> None:
        """Stop reading: the upstream request is cancelled and the key freed."""
        if not self._done:
            self._done = True
            try:
                await self._response.aclose()
            finally:
                self._client._driver.close(self._request_id, ended=False)


class _Chunks:
    """``StreamResponse.aiter_bytes()``."""

    __slots__ = ("_response",)

    def __init__(self, response: StreamResponse) -> None:
        self._response = response

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._response._next_chunk()
        if chunk is None:
            raise StopAsyncIteration
        return chunk


class _Lines:
    """``StreamResponse.aiter_lines()``."""

    __slots__ = ("_decoder", "_ready", "_response")

    def __init__(self, response: StreamResponse) -> None:
        self._response = response
        self._decoder: LineDecoder | None = LineDecoder()
        self._ready: deque[str] = deque()

    def __aiter__(self) -> _Lines:
        return self

    async def __anext__(self) -> str:
        while not self._ready:
            if self._decoder is None:
                raise StopAsyncIteration
            chunk = await self._response._next_chunk()
            if chunk is None:
                self._ready.extend(self._decoder.flush())
                self._decoder = None
            else:
                self._ready.extend(self._decoder.feed(chunk))
        return self._ready.popleft()


class AsyncClient(ClientBase):
    """Calls an OpenAI-compatible API through a pool of keys, with failover.

    ``async with AsyncClient(keys) as client:`` runs the pool's timer and its
    probes in a task group for as long as the block lasts.

    Args:
        keys: the secrets (aliases ``key1``, ``key2``, ... are given), or a
            mapping alias -> secret. Secrets stay here: the pool, ``status()``,
            errors and logs know keys by alias only.
        base_url: the upstream, OpenRouter's by default.
        config: the pool's ``PoolConfig`` (its key ids must be the aliases).
        http: connection and timeout options.
        headers: headers sent on every request (``HTTP-Referer``, ``X-Title``).
        probe_path: the cheap call that probes a key (OpenRouter: ``/key``).
    """

    _clock = staticmethod(anyio.current_time)  # the event loop's clock (trio's MockClock too)

    def __init__(
        self,
        keys: Mapping[str, str] | Iterable[str],
        base_url: str = OPENROUTER_URL,
        config: PoolConfig | None = None,
        *,
        http: HTTPOptions | None = None,
        headers: Mapping[str, str] | None = None,
        probe_path: str = "/key",
    ) -> None:
        super().__init__(keys, base_url, config, http=http, headers=headers, probe_path=probe_path)
        self._pool: h11pool.ConnectionPool | None = None
        self._closed = False
        self._tasks: anyio.abc.TaskGroup | None = None
        self._timer = _Waiter()
        self._probes = _Waiter()
        self._driver.deadline_changed = self._timer.wake
        self._driver.probe_ready = self._probes.wake

    @property
    def driver(self) -> Driver:
        """The driver (and through it ``driver.pool``), for inspection and hooks."""
        return self._driver

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        options = self._upstream.options
        self._pool = h11pool.ConnectionPool(
            h11pool.PoolOptions(
                connect=options.connect,
                write=options.write,
                pool=options.pool,
                max_connections=options.max_connections,
                max_per_tag=options.max_connections_per_key,
                keepalive_expiry=options.keepalive_expiry,
            )
        )
        tasks = anyio.create_task_group()
        await tasks.__aenter__()
        self._tasks = tasks
        tasks.start_soon(self._run_timer)
        tasks.start_soon(self._run_probes)
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        tasks = self._tasks
        await self.aclose()
        assert tasks is not None
        return await tasks.__aexit__(*exc_info)

    async def aclose(self) -> None:
        """Stop the timer and probes and close connections. Idempotent.

        Requests still waiting for a key raise ``KeyrotorError``.
        """
        if self._tasks is not None:
            self._tasks.cancel_scope.cancel()
        self._closed = True
        for slot in list(self._driver.slots.values()):
            slot.wake()
        self._stop_recording()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            with anyio.CancelScope(shield=True):
                await pool.aclose()

    def _http(self) -> h11pool.ConnectionPool:
        if self._pool is None:
            raise KeyrotorError("use the client inside `async with Client(...) as client:`")
        return self._pool

    # ------------------------------------------------------------- requests

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        pin: str | int | None = None,
        session: str | None = None,
        group: str | None = None,
        timeout: float | None = None,
    ) -> Response:
        """Send a request through the pool and read the whole response.

        Failover is invisible: the response is the first one the pool delivers
        (a success, or an error no other key would fix). Raises
        ``NoKeyAvailable`` when no key can serve in time.
        """
        response = await self.send(
            method,
            path,
            json=json,
            content=content,
            headers=headers,
            pin=pin,
            session=session,
            group=group,
            timeout=timeout,
        )
        try:
            body = await response.aread()
        finally:
            await response.aclose()
        return response.to_response(body)

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        pin: str | int | None = None,
        session: str | None = None,
        group: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamResponse]:
        """Like ``request``, but the body is read as it arrives (for SSE).

        Leaving the block early cancels the upstream request and frees the key.
        """
        response = await self.send(
            method,
            path,
            json=json,
            content=content,
            headers=headers,
            pin=pin,
            session=session,
            group=group,
            timeout=timeout,
            buffer=False,
        )
        try:
            yield response
        finally:
            await response.aclose()

    async def send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        pin: str | int | None = None,
        session: str | None = None,
        group: str | None = None,
        timeout: float | None = None,
        buffer: bool = True,
        pin_fallback: bool = True,
    ) -> StreamResponse:
        """Like ``stream``, without the block: the delivered response, whose body
        the caller reads and which the caller must ``aclose()`` (the proxy hands
        it to its server, which closes it when the client is done or gone).

        ``buffer``: a successful answer that is not an SSE stream is read whole
        before it is delivered, so a body that breaks off fails over to another
        key like a missing answer (``stream`` passes False). ``pin_fallback``:
        whether a pinned key that is missing or unusable may be replaced
        (False: ``NoKeyAvailable`` with status 400 for an unknown key)."""
        body = encode_body(json, content)
        merged = self._upstream.merge_headers(headers)
        waiter = _Waiter()
        request_id, slot = self._driver.open(
            waiter.wake,
            pin=pin,
            pin_fallback=pin_fallback,
            session=session,
            group=group,
            timeout=timeout,
            body=body,
        )
        return await self._attempts(request_id, slot, waiter, method, path, body, merged, buffer)

    async def _attempts(
        self,
        request_id: str,
        slot: Slot,
        waiter: _Waiter,
        method: str,
        path: str,
        body: bytes | None,
        headers: Mapping[str, str],
        buffer: bool,
    ) -> StreamResponse:
        """Carry out the pool's decisions for one request until one is delivered."""
        driver = self._driver
        ended = False
        try:
            while True:
                while not slot.decisions:
                    if self._closed:
                        raise KeyrotorError("the client was closed while the request waited")
                    await waiter.wait()
                decision = slot.decisions.popleft()
                if isinstance(decision, Reject):
                    ended = True
                    driver.close(request_id, ended=True)
                    raise NoKeyAvailable(decision.status, decision.retry_after, decision.reason)
                assert isinstance(decision, Send)
                opened = await self._send_one(
                    request_id, decision, method, path, body, headers, buffer
                )
                if opened is not None:
                    return opened
        except BaseException:
            if not ended:
                driver.close(request_id, ended=False)
            raise

    async def _send_one(
        self,
        request_id: str,
        send: Send,
        method: str,
        path: str,
        body: bytes | None,
        headers: Mapping[str, str],
        buffer: bool,
    ) -> StreamResponse | None:
        """One attempt: returns the delivered response, or None to go on."""
        driver = self._driver
        upstream = self._upstream
        pool = self._http()
        secret = driver.secret_for(request_id, send)
        if secret is None:
            return None
        options = upstream.options
        try:
            response = await pool.request(
                method.encode("ascii"),
                upstream.url_for(path),
                request_headers(upstream.host, secret, headers, body, frame=False),
                body,
                read_timeout=options.idle,
                head_timeout=options.first_byte_for(body),
                tag=send.key_id,
            )
        except TRANSPORT_ERRORS as exc:
            driver.failed(request_id, failure_reason(exc))
            return None
        try:
            status = response.status
            response_headers = decode_headers(response.headers)
            error = status >= 300  # read (a bounded part) to classify it
            whole = buffer and "event-stream" not in response_headers.get("content-type", "")
            prefetched = None
            if error or whole:  # a whole answer: a body that breaks off fails over
                try:
                    prefetched = await response.aread(limit=MAX_ERROR_BODY if error else None)
                except TRANSPORT_ERRORS as exc:
                    await response.aclose()
                    driver.failed(request_id, failure_reason(exc))
                    return None
            deliver = driver.received(
                request_id,
                send.attempt,
                status,
                response_headers,
                prefetched if error else None,
            )
            if deliver is not None:
                return StreamResponse(
                    self, request_id, response, deliver, response_headers, prefetched
                )
        except BaseException:
            await response.aclose()  # cancellation-safe: the pool shields its closing
            raise
        await response.aclose()  # a failed attempt: drop it, the pool has decided
        return None

    # ------------------------------------------------------------ chat API

    async def chat(
        self,
        *,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        pin: str | int | None = None,
        session: str | None = None,
        group: str | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> Any:
        """``POST /chat/completions``; the parsed JSON body. Raises
        ``UpstreamError`` for an error answer, ``NoKeyAvailable`` if no key."""
        payload = chat_payload(model, messages, params)
        response = await self.request(
            "POST",
            "/chat/completions",
            json=payload,
            pin=pin,
            session=session,
            group=group,
            timeout=timeout,
        )
        return json_or_raise(response)

    async def parallel_chat(self, requests: Sequence[Mapping[str, Any]]) -> list[Any]:
        """Run chat requests at once, each on its own key while enough keys
        are usable (seed 000's ``parallelChat``). Raises the first error."""
        results = await self.parallel_chat_partial(requests)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    async def parallel_chat_partial(
        self, requests: Sequence[Mapping[str, Any]]
    ) -> list[Any | KeyrotorError]:
        """Like ``parallel_chat``, but every item is either its response or the
        error that ended it (seed 000's ``parallelChatWithPartialResults``)."""
        results: list[Any] = [None] * len(requests)
        group = f"batch-{id(results)}"

        async def one(index: int, params: Mapping[str, Any]) -> None:
            try:
                results[index] = await self.chat(**{"group": group, **params})
            except KeyrotorError as exc:
                results[index] = exc

        async with anyio.create_task_group() as tasks:
            for index, params in enumerate(requests):
                tasks.start_soon(one, index, params)
        return results

    def status(self) -> dict[str, Any]:
        """The pool at a glance (same shape as the proxy's ``/status``)."""
        return self._driver.status()

    # ------------------------------------------------------- timer, probes

    async def _run_timer(self) -> None:
        driver = self._driver
        while True:
            delay = driver.wait_time()
            if delay > 0:
                with anyio.move_on_after(delay):
                    await self._timer.wait()
                continue
            driver.tick()

    async def _run_probes(self) -> None:
        driver = self._driver
        async with anyio.create_task_group() as tasks:
            while True:
                while not driver.probes:
                    await self._probes.wait()
                tasks.start_soon(self._probe, driver.probes.popleft())

    async def _probe(self, probe: Probe) -> None:
        driver = self._driver
        upstream = self._upstream
        status: int | None = None
        headers: dict[str, str] | None = None
        body: bytes | None = None
        secret = driver.secrets.get(probe.key_id)
        try:
            if secret is not None:
                with anyio.fail_after(upstream.options.probe_timeout):
                    response = await self._http().request(
                        b"GET",
                        upstream.url_for(upstream.probe_path),
                        request_headers(upstream.host, secret, upstream.headers, None),
                        read_timeout=upstream.options.probe_timeout,
                    )
                    try:
                        body = await response.aread(limit=MAX_ERROR_BODY)
                    finally:
                        await response.aclose()
                status, headers = response.status, decode_headers(response.headers)
        except PROBE_ERRORS:
            status = None
        finally:
            # Always answered, even when the client closes mid-probe: a key
            # left "probing" would never be probed again.
            driver.probe_finished(probe.key_id, status, headers, body)
