"""The async client, written once on anyio: it runs under asyncio and trio.

``keyrotor.transports.asyncio.Client`` and ``keyrotor.transports.trio.Client``
are this class. Everything that can be decided is decided by the ``Driver``
(and the core behind it) and by the steps of ``_exchange``, which the blocking
client shares; this module only carries the steps out on keyrotor's h11 pool:
it sends, reads, waits and sleeps.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any, Self, TypeVar, Unpack

import anyio

from ..core import PoolConfig, Probe
from . import _h11pool as h11pool
from ._base import ClientBase
from ._driver import OPENROUTER_URL, Driver
from ._exchange import (
    WAIT,
    Admit,
    Close,
    Delivered,
    Failed,
    NextChunk,
    Open,
    Opened,
    Read,
    RequestOptions,
    Steps,
    StreamBody,
    attempts,
    chat_options,
    first_error,
    outgoing,
    route,
)
from ._exchange import probe as probe_steps
from ._http import (
    REFUSED,
    HTTPOptions,
    LineDecoder,
    Response,
    decode_headers,
    json_or_raise,
    request_headers,
)
from .errors import ConfigurationError, KeyrotorError, TransportError, leaves

T = TypeVar("T")

logger = logging.getLogger(__name__)

# An attempt failed without an answer: report TransportFailed and fail over.
# LocalProtocolError is not here: HTTP refuses the caller's own request.
TRANSPORT_ERRORS: tuple[type[Exception], ...] = (
    h11pool.ConnectError,
    h11pool.ReadError,
    h11pool.WriteError,
    h11pool.RemoteProtocolError,
    TimeoutError,  # the pool's timeouts, and our first-byte deadline
)
_STEP_ERRORS: tuple[type[Exception], ...] = (*TRANSPORT_ERRORS, h11pool.HTTPError)
"""What a step may raise from the pool: no answer (``Failed``), or the pool's own."""


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


class StreamResponse(StreamBody):
    """A delivered response whose body is read as it arrives.

    Iterate ``aiter_bytes()`` or ``aiter_lines()``; usage in the last SSE
    chunk and an in-stream error are accounted to the key when the body ends.
    A body that breaks off raises ``TransportError``.
    """

    def __init__(self, client: AsyncClient, request_id: str, delivered: Delivered) -> None:
        super().__init__(client._driver, request_id, delivered)
        self._client = client

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
        return await self._client._run(self._rest())

    async def aclose(self) -> None:
        """Stop reading: the upstream request is cancelled and the key freed."""
        if not self._done:
            await self._client._run(self._closing())

    async def _chunk(self) -> bytes | None:
        return await self._client._run(self._next_chunk())


class _Chunks:
    """``StreamResponse.aiter_bytes()``."""

    __slots__ = ("_response",)

    def __init__(self, response: StreamResponse) -> None:
        self._response = response

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._response._chunk()
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
            chunk = await self._response._chunk()
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
        self._background: anyio.CancelScope | None = None  # the timer's and the probes'
        self._loop_clock: Callable[[], float] | None = None  # set on the driver by us
        # (the pool's time, time.monotonic()) when a block ended: another loop's
        # clock (a new trio.run's starts anywhere) is shifted to go on from it
        self._left: tuple[float, float] | None = None
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
        if self._tasks is not None:
            raise KeyrotorError("the client is already open; enter it once at a time")
        options = self._upstream.options
        if self._driver.clock in (anyio.current_time, self._loop_clock):
            clock = h11pool.loop_clock()  # the loop's clock, asked directly
            if self._left is not None:  # entered again: the pool's time goes on from there
                pool_now, left = self._left
                clock = _shifted(clock, pool_now + (time.monotonic() - left) - clock())
            self._driver.clock = self._loop_clock = clock
        self._closed = False  # entered again after an earlier block
        self._timer = _Waiter()
        self._probes = _Waiter()
        self._driver.deadline_changed = self._timer.wake
        self._driver.probe_ready = self._probes.wake
        self._pool = h11pool.ConnectionPool(
            h11pool.PoolOptions(
                connect=options.connect,
                write=options.write,
                pool=options.pool,
                max_connections=options.max_connections,
                max_per_tag=options.max_connections_per_key,
                keepalive_expiry=options.keepalive_expiry,
                parser=options.parser,
            )
        )
        tasks = anyio.create_task_group()
        await tasks.__aenter__()
        self._tasks = tasks
        self._background = anyio.CancelScope()
        tasks.start_soon(self._run_background, self._background)
        return self

    async def _run_background(self, scope: anyio.CancelScope) -> None:
        """The timer and the probes until ``aclose``, under a scope of their own:
        the task group's encloses the caller's block, whose code goes on after
        an ``aclose`` inside it."""
        with scope:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._run_timer)
                tasks.start_soon(self._run_probes)

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        """Close the client. The block's own exception leaves it as it came (as
        the blocking client's), not wrapped in the task group's ExceptionGroup;
        a failure of the timer or of a probe task is raised in that group."""
        tasks, self._tasks = self._tasks, None
        assert tasks is not None
        try:
            await self.aclose()
        finally:
            swallowed = await _leave(tasks, exc_info)
        return swallowed

    async def aclose(self) -> None:
        """Stop the timer and probes and close connections. Idempotent.

        Requests still waiting for a key raise ``KeyrotorError``.
        """
        if self._background is not None:
            self._background.cancel()
        if not self._closed and self._driver.clock is self._loop_clock:
            self._left = (self._driver.now(), time.monotonic())
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

    async def request(self, method: str, path: str, **options: Unpack[RequestOptions]) -> Response:
        """Send a request through the pool and read the whole response.

        Failover is invisible: the response is the first one the pool delivers
        (a success, or an error no other key would fix). Raises
        ``NoKeyAvailable`` when no key can serve in time. Options: ``json`` or
        ``content``, ``headers``, ``pin``, ``session``, ``group``, ``timeout``
        (``RequestOptions``).
        """
        response = await self.send(method, path, **options)
        try:
            body = await response.aread()
        finally:
            await response.aclose()
        return response.to_response(body)

    @asynccontextmanager
    async def stream(
        self, method: str, path: str, **options: Unpack[RequestOptions]
    ) -> AsyncIterator[StreamResponse]:
        """Like ``request``, but the body is read as it arrives (for SSE).

        Leaving the block early cancels the upstream request and frees the key.
        """
        response = await self.send(method, path, buffer=False, **options)
        try:
            yield response
        finally:
            await response.aclose()

    async def send(
        self,
        method: str,
        path: str,
        *,
        buffer: bool = True,
        pin_fallback: bool = True,
        **options: Unpack[RequestOptions],
    ) -> StreamResponse:
        """Like ``stream``, without the block: the delivered response, whose body
        the caller reads and which the caller must ``aclose()`` (the proxy hands
        it to its server, which closes it when the client is done or gone).

        ``buffer``: a successful answer that is not an SSE stream is read whole
        before it is delivered, so a body that breaks off fails over to another
        key like a missing answer (``stream`` passes False). ``pin_fallback``:
        whether a pinned key that is missing or unusable may be replaced
        (False: an unknown key is refused, ``NoKeyAvailable`` with status 400;
        an unusable one is waited for)."""
        request = outgoing(self._upstream, method, path, options)
        if self._pool is None:  # not entered: no timer would end its wait for a key
            self._http()  # raises
        waiter = _Waiter()
        request_id, slot = self._driver.open(
            waiter.wake, pin_fallback=pin_fallback, body=request.body, **route(options)
        )
        steps = attempts(self._driver, request_id, slot, request, buffer)
        return StreamResponse(self, request_id, await self._run(steps, waiter))

    async def get_public(self, path: str, *, headers: Mapping[str, str] | None = None) -> Response:
        """``GET path`` on the upstream with no key, outside the pool (no
        failover, nothing accounted, no key's rate limit used): for public
        endpoints such as OpenRouter's ``/models``. The answer's ``key`` is
        ``""``. Raises ``TransportError`` when none comes."""
        upstream = self._upstream
        options = upstream.options
        raw = request_headers(upstream.host, None, upstream.merge_headers(headers), None)
        try:
            response = await self._http().request(
                b"GET",
                upstream.url_for(path),
                raw,
                read_timeout=options.idle,
                head_timeout=options.first_byte,
            )
            try:
                body = await response.aread()
            finally:
                await response.aclose()
        except TRANSPORT_ERRORS as exc:
            raise TransportError(f"GET {path}: no answer ({failure_reason(exc)}: {exc})") from exc
        return Response(response.status, decode_headers(response.headers), body, "", 1)

    # ------------------------------------------------------------ chat API

    async def chat(
        self,
        *,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        **params: Any,
    ) -> Any:
        """``POST /chat/completions``; the parsed JSON body. Raises
        ``UpstreamError`` for an error answer, ``NoKeyAvailable`` if no key.
        ``pin``, ``session``, ``group`` and ``timeout`` are the pool's; other
        ``params`` go into the body."""
        options = chat_options(model, messages, params)
        return json_or_raise(await self.request("POST", "/chat/completions", **options))

    async def parallel_chat(self, requests: Sequence[Mapping[str, Any]]) -> list[Any]:
        """Run chat requests at once, each on its own key while enough keys
        are usable (seed 000's ``parallelChat``). Raises the first error."""
        return first_error(await self.parallel_chat_partial(requests))

    async def parallel_chat_partial(
        self, requests: Sequence[Mapping[str, Any]]
    ) -> list[Any | KeyrotorError]:
        """Like ``parallel_chat``, but every item is either its response or the
        error that ended it (seed 000's ``parallelChatWithPartialResults``).
        An error other than ``KeyrotorError`` (a body JSON cannot encode) is
        raised itself once every request is done, the first in order."""
        results: list[Any] = [None] * len(requests)
        unexpected: dict[int, Exception] = {}
        group = f"batch-{id(results)}"

        async def one(index: int, params: Mapping[str, Any]) -> None:
            try:
                results[index] = await self.chat(**{"group": group, **params})
            except KeyrotorError as exc:
                results[index] = exc
            except Exception as exc:  # as the blocking client: not an ExceptionGroup
                unexpected[index] = exc

        async with anyio.create_task_group() as tasks:
            for index, params in enumerate(requests):
                tasks.start_soon(one, index, params)
        if unexpected:
            raise unexpected[min(unexpected)]
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
        # A probe cut short (its deadline, the client closing) counts as no answer.
        # (The client closing raises KeyrotorError: answered as no answer too.)
        # Any other error (a bug) is logged: it must not end the client's task group.
        try:
            with anyio.move_on_after(self._upstream.options.probe_timeout), suppress(KeyrotorError):
                await self._run(probe_steps(self._driver, probe.key_id))
        except Exception:
            logger.exception("keyrotor probe of key %r failed", probe.key_id)

    # ------------------------------------------------------ carrying out steps

    async def _run(self, steps: Steps[T], waiter: _Waiter | None = None) -> T:
        """Carry out ``steps`` (``_exchange``) until it returns: each step's
        result is sent back in, its exception thrown in."""
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = steps.send(value) if error is None else steps.throw(error)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            value = error = None
            try:
                if step is WAIT:
                    if self._closed:
                        raise KeyrotorError("the client was closed while the request waited")
                    assert waiter is not None
                    await waiter.wait()
                else:
                    value = await self._step(step)
            except BaseException as exc:
                error = exc

    async def _step(self, step: Open | Read | NextChunk | Close | Admit) -> Any:
        """One step's I/O on the h11 pool; no answer is ``Failed``."""
        if isinstance(step, Admit):
            gate = self._driver.gate
            assert gate is not None
            return await gate.admit(step.request_id, step.key_id, step.tokens)
        if isinstance(step, Close):
            await step.handle.aclose()  # cancellation-safe: the pool shields its closing
            return None
        try:
            if isinstance(step, NextChunk):
                return await anext(step.handle, None)
            if isinstance(step, Read):
                return await step.handle.aread(limit=step.limit)
            response = await self._open(step)
        except h11pool.LocalProtocolError:  # HTTP refuses the request: no key's fault
            refused = True
        except _STEP_ERRORS as exc:
            if self._closed:  # the pool closed under this step: no key's failure
                raise KeyrotorError("the client was closed while the request ran") from exc
            if isinstance(exc, TRANSPORT_ERRORS):
                return Failed(failure_reason(exc), exc)
            raise
        else:
            return Opened(response, response.status, decode_headers(response.headers))
        if refused:  # raised here, not chained: the pool's frames hold the headers (the key)
            raise ConfigurationError(REFUSED)

    async def _open(self, step: Open) -> h11pool.Response:
        upstream = self._upstream
        options = upstream.options
        request = step.request
        if request is None:  # the key's probe
            return await self._http().request(
                b"GET",
                upstream.url_for(upstream.probe_path),
                request_headers(upstream.host, step.secret, upstream.headers, None),
                read_timeout=options.probe_timeout,
            )
        first_byte = request.first_byte
        if first_byte is None:  # once a request, not once an attempt: it may read the body
            first_byte = request.first_byte = options.first_byte_for(request.body)
        return await self._http().request(
            request.method.encode("ascii"),
            upstream.url_for(request.path),
            request_headers(upstream.host, step.secret, request.headers, request.body, frame=False),
            request.body,
            read_timeout=options.idle,
            head_timeout=first_byte,
            tag=step.key_id,
        )


def _shifted(clock: Callable[[], float], shift: float) -> Callable[[], float]:
    """``clock`` moved by ``shift`` seconds."""
    return lambda: clock() + shift


async def _leave(tasks: anyio.abc.TaskGroup, exc_info: tuple[Any, ...]) -> bool | None:
    """Exit the task group that ran a client's block. When what it raises holds
    nothing but the block's own exception (the task group wraps it in a group;
    trio copies a group the block raised), False: that exception goes on
    unchanged. A cancellation is the task group's to handle, as before."""
    block = exc_info[1]
    try:
        return await tasks.__aexit__(*exc_info)
    except BaseExceptionGroup as group:
        if block is not None and {id(e) for e in leaves(group)} <= {id(e) for e in leaves(block)}:
            return False
        raise
