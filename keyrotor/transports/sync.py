"""The pool as a blocking client: ``from keyrotor.transports.sync import Client``.

The twin of ``keyrotor.transports.asyncio.Client`` for threaded code, with the
same API in blocking form. ``with Client(keys) as client:`` starts one daemon
thread that feeds the pool's timer (``Tick`` at ``next_deadline()``) and hands
probes to a small thread pool. Requests run on the caller's threads, any
number at once: every call into the driver holds the client's lock, never
during network I/O, and a request waits for its decisions on a condition of
that lock.

Timeouts: httpcore's blocking API cannot cancel a call, so ``first_byte``
(``first_byte_stream`` for a stream) caps each read while an attempt waits for
the head, counted from its first read, so that the whole head comes within it;
``idle`` bounds each read of the body; a probe's every
phase is capped at ``probe_timeout``. ``close()`` shuts the connections down,
so that requests blocked on the upstream on other threads end at once
(``KeyrotorError``, no key blamed); one still connecting ends at its
``connect`` timeout (httpcore registers a connection once it is made).
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Any, Self, TypeVar, Unpack

import httpcore

from ..core import PoolConfig, Probe
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
    TRANSPORT_ERRORS,
    HTTPOptions,
    LineDecoder,
    Response,
    decode_headers,
    failure_reason,
    json_or_raise,
    read_bounded,
)
from .errors import ConfigurationError, KeyrotorError, NoKeyAvailable, UpstreamError

T = TypeVar("T")

__all__ = [
    "Client",
    "HTTPOptions",
    "KeyrotorError",
    "NoKeyAvailable",
    "Response",
    "StreamResponse",
    "UpstreamError",
]

logger = logging.getLogger(__name__)

PROBE_THREADS = 4
"""Probes run at once, at most (each a cheap ``GET /key``)."""

_CLOSED = "the client was closed while the request ran"

_head = threading.local()
"""This thread's attempt waiting for its head: ``first_byte`` (seconds) and,
from its first read, ``deadline`` (``time.monotonic``), which caps every read."""


class StreamResponse(StreamBody):
    """A delivered response whose body is read as it arrives.

    Iterate ``iter_bytes()`` or ``iter_lines()``; usage in the last SSE chunk
    and an in-stream error are accounted to the key when the body ends. A body
    that breaks off raises ``TransportError``.
    """

    def __init__(self, client: Client, request_id: str, delivered: Delivered) -> None:
        super().__init__(client._driver, request_id, delivered)
        self._client = client

    def iter_bytes(self) -> Iterator[bytes]:
        """The body, chunk by chunk as the upstream sends it."""
        run = self._client._run
        while (chunk := run(self._next_chunk())) is not None:
            yield chunk

    def iter_lines(self) -> Iterator[str]:
        """The body as text lines (SSE ``data:`` and comment lines included)."""
        decoder = LineDecoder()
        for chunk in self.iter_bytes():
            yield from decoder.feed(chunk)
        yield from decoder.flush()

    def read(self) -> bytes:
        """The rest of the body at once."""
        return self._client._run(self._rest())

    def close(self) -> None:
        """Stop reading: the upstream request is dropped and the key freed."""
        if not self._done:
            self._client._run(self._closing())


class _Body:
    """An httpcore response and the one iterator its body is read through."""

    __slots__ = ("chunks", "response")

    def __init__(self, response: httpcore.Response) -> None:
        self.response = response
        self.chunks = response.iter_stream()


class Client(ClientBase):
    """Calls an OpenAI-compatible API through a pool of keys, with failover.

    ``with Client(keys) as client:`` runs the pool's timer and its probes on
    background threads for as long as the block lasts. The client is safe to
    share between threads.

    Args:
        keys: the secrets (aliases ``key1``, ``key2``, ... are given), or a
            mapping alias -> secret. Secrets stay here: the pool, ``status()``,
            errors and logs know keys by alias only.
        base_url: the upstream, OpenRouter's by default.
        config: the pool's ``PoolConfig`` (its key ids must be the aliases).
        http: connection and timeout options (see the module's note on
            ``first_byte``).
        headers: headers sent on every request (``HTTP-Referer``, ``X-Title``).
        probe_path: the cheap call that probes a key (OpenRouter: ``/key``).
    """

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
        self._lock = threading.RLock()
        self._timer = threading.Condition(self._lock)
        self._pool: httpcore.ConnectionPool | None = None
        self._backend: _Backend | None = None
        self._closing = False  # close() has begun: a step that fails blames no key
        self._thread: threading.Thread | None = None
        self._probes: ThreadPoolExecutor | None = None
        self._stopped: str | None = None  # why waiting requests must give up
        self._driver.deadline_changed = self._timer.notify
        self._driver.probe_ready = self._timer.notify

    @property
    def driver(self) -> Driver:
        """The driver (and through it ``driver.pool``), for inspection and hooks.

        It is not thread-safe: hold ``client.lock`` to call it. Its
        ``on_state_change`` callbacks run with that lock held, on whichever
        thread fed the event: they must not block or close the client."""
        return self._driver

    @property
    def lock(self) -> threading.RLock:
        """The lock that guards every call into the driver."""
        return self._lock

    def _guard(self) -> threading.RLock:
        return self._lock

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
        with self._lock:
            if self._thread is not None:
                raise KeyrotorError("the client is already open; enter it once at a time")
            options = self._upstream.options
            self._stopped = None
            self._closing = False
            self._backend = _Backend()
            self._pool = httpcore.ConnectionPool(
                max_connections=options.max_connections,
                # keepalive_expiry 0: no idle connection is kept (one request each)
                max_keepalive_connections=None if options.keepalive_expiry else 0,
                keepalive_expiry=options.keepalive_expiry,
                network_backend=self._backend,
            )
            self._probes = ThreadPoolExecutor(PROBE_THREADS, thread_name_prefix="keyrotor-probe")
            self._thread = threading.Thread(
                target=self._run_timer, name="keyrotor-timer", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the timer, shut the connections down, wait for running probes
        and close. Idempotent.

        Requests still waiting for a key, or for the upstream on other threads,
        raise ``KeyrotorError`` (no key is blamed).
        """
        with self._lock:
            self._closing = True
            self._stop("the client was closed while the request waited for a key")
            thread, self._thread = self._thread, None
            probes, self._probes = self._probes, None
            backend = self._backend
        if backend is not None:  # wakes the threads blocked on the upstream
            backend.shutdown()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if probes is not None:
            probes.shutdown(wait=True)
        with self._lock:
            pool, self._pool = self._pool, None
            driver = self._driver
            while driver.probes:  # never started: the pool must not wait for them
                driver.probe_finished(driver.probes.popleft().key_id, None)
        if pool is not None:
            pool.close()
        self._stop_recording()

    def _stop(self, why: str) -> None:
        """Stop the timer and wake every waiting request (lock held)."""
        if self._stopped is None:
            self._stopped = why
        self._timer.notify_all()
        for slot in list(self._driver.slots.values()):
            slot.wake()

    def _http(self) -> httpcore.ConnectionPool:
        pool = self._pool
        if pool is None:
            raise KeyrotorError("use the client inside `with Client(...) as client:`")
        return pool

    # ------------------------------------------------------------- requests

    def request(self, method: str, path: str, **options: Unpack[RequestOptions]) -> Response:
        """Send a request through the pool and read the whole response.

        Failover is invisible: the response is the first one the pool delivers
        (a success, or an error no other key would fix). Raises
        ``NoKeyAvailable`` when no key can serve in time. Options: ``json`` or
        ``content``, ``headers``, ``pin``, ``session``, ``group``, ``timeout``
        (``RequestOptions``).
        """
        response = self.send(method, path, **options)
        try:
            body = response.read()
        finally:
            response.close()
        return response.to_response(body)

    @contextmanager
    def stream(
        self, method: str, path: str, **options: Unpack[RequestOptions]
    ) -> Iterator[StreamResponse]:
        """Like ``request``, but the body is read as it arrives (for SSE).

        Leaving the block early drops the upstream request and frees the key.
        ``timeout`` bounds the wait for a key, not the HTTP exchange.
        """
        response = self.send(method, path, buffer=False, **options)
        try:
            yield response
        finally:
            response.close()

    def send(
        self,
        method: str,
        path: str,
        *,
        buffer: bool = True,
        pin_fallback: bool = True,
        **options: Unpack[RequestOptions],
    ) -> StreamResponse:
        """Like ``stream``, without the block: the delivered response, whose body
        the caller reads and which the caller must ``close()`` (the httpx
        transport hands it to httpx).

        ``buffer``: a successful answer that is not an SSE stream is read whole
        before it is delivered, so a body that breaks off fails over to another
        key like a missing answer (``stream`` passes False). ``pin_fallback``:
        whether a pinned key that is missing or unusable may be replaced
        (False: an unknown key is refused, ``NoKeyAvailable`` with status 400;
        an unusable one is waited for)."""
        request = outgoing(self._upstream, method, path, options)
        self._http()
        with self._lock:
            waiter = threading.Condition(self._lock)
            request_id, slot = self._driver.open(
                waiter.notify, pin_fallback=pin_fallback, body=request.body, **route(options)
            )
        steps = attempts(self._driver, request_id, slot, request, buffer)
        return StreamResponse(self, request_id, self._run(steps, waiter))

    # ------------------------------------------------------------ chat API

    def chat(
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
        return json_or_raise(self.request("POST", "/chat/completions", **options))

    def parallel_chat(self, requests: Sequence[Mapping[str, Any]]) -> list[Any]:
        """Run chat requests at once, each on its own key while enough keys
        are usable (seed 000's ``parallelChat``). Raises the first error."""
        return first_error(self.parallel_chat_partial(requests))

    def parallel_chat_partial(
        self, requests: Sequence[Mapping[str, Any]]
    ) -> list[Any | KeyrotorError]:
        """Like ``parallel_chat``, but every item is either its response or the
        error that ended it (seed 000's ``parallelChatWithPartialResults``).

        Runs one thread per request and returns when all are done."""
        results: list[Any] = [None] * len(requests)
        if not requests:
            return results
        group = f"batch-{id(results)}"

        def one(index: int, params: Mapping[str, Any]) -> None:
            try:
                results[index] = self.chat(**{"group": group, **params})
            except KeyrotorError as exc:
                results[index] = exc

        with ThreadPoolExecutor(len(requests), thread_name_prefix="keyrotor-batch") as threads:
            futures = [threads.submit(one, i, params) for i, params in enumerate(requests)]
        for future in futures:
            future.result()  # an error other than KeyrotorError: re-raised here
        return results

    def status(self) -> dict[str, Any]:
        """The pool at a glance (same shape as the proxy's ``/status``)."""
        with self._lock:
            return self._driver.status()

    # ------------------------------------------------------- timer, probes

    def _run_timer(self) -> None:
        try:
            self._timer_loop()
        except BaseException:
            with self._lock:
                self._stop("the client's timer thread failed (see its traceback)")
            raise

    def _timer_loop(self) -> None:
        driver = self._driver
        timer = self._timer
        while True:
            with self._lock:
                if self._stopped is not None:
                    return
                probes = list(driver.probes)
                driver.probes.clear()
                executor = self._probes
                if not probes:
                    delay = driver.wait_time()
                    if delay <= 0:
                        driver.tick()
                    else:
                        timer.wait(None if math.isinf(delay) else min(delay, threading.TIMEOUT_MAX))
                    continue
            assert executor is not None
            for probe in probes:
                executor.submit(self._probe, probe).add_done_callback(_log_failure)

    def _probe(self, probe: Probe) -> None:
        with suppress(KeyrotorError):  # the client closing: answered as no answer
            self._run(probe_steps(self._driver, probe.key_id))

    # ------------------------------------------------------ carrying out steps

    def _run(self, steps: Steps[T], waiter: threading.Condition | None = None) -> T:
        """Carry out ``steps`` (``_exchange``) until it returns: each step's
        result is sent back in, its exception thrown in. The generator runs
        (and waits for decisions) with the lock held; the I/O runs without."""
        value: Any = None
        error: BaseException | None = None
        while True:
            with self._lock:
                while True:
                    try:
                        step = steps.send(value) if error is None else steps.throw(error)
                    except StopIteration as stop:
                        return stop.value  # type: ignore[no-any-return]
                    value = error = None
                    if step is not WAIT:
                        break
                    try:
                        if self._stopped is not None:
                            raise KeyrotorError(self._stopped)
                        assert waiter is not None
                        waiter.wait()
                    except BaseException as exc:
                        error = exc
            try:
                value = self._step(step)
            except BaseException as exc:
                error = exc

    def _step(self, step: Open | Read | NextChunk | Close | Admit) -> Any:
        """One step's I/O on httpcore; no answer is ``Failed``. A step that fails
        because the client is closing raises ``KeyrotorError``; a request HTTP
        refuses, ``ConfigurationError``: neither blames the key, and neither
        chains httpcore's error (whose message or frames may hold the headers)."""
        if isinstance(step, Admit):
            raise KeyrotorError("limits shared through Driver.gate need the async client")
        if isinstance(step, Close):
            step.handle.response.close()
            return None
        try:
            if isinstance(step, NextChunk):
                return next(step.handle.chunks, None)
            if isinstance(step, Read):
                return read_bounded(step.handle.chunks, step.limit)
            body = _Body(self._open(step))
        except TRANSPORT_ERRORS as exc:
            if not self._closing:
                return Failed(failure_reason(exc), exc)
            error: KeyrotorError = KeyrotorError(_CLOSED)
        except httpcore.LocalProtocolError:  # HTTP refuses the request: no key's fault
            error = ConfigurationError(REFUSED)
        except ConfigurationError as exc:  # (a header that is not Latin-1)
            error = ConfigurationError(str(exc))
        else:
            response = body.response
            return Opened(body, response.status, decode_headers(response.headers))
        raise error  # not chained: httpcore's message or frames may hold the headers

    def _open(self, step: Open) -> httpcore.Response:
        upstream = self._upstream
        request = step.request
        if request is None:  # the key's probe; none once the client is closing
            pool = None if self._stopped is not None else self._pool
            if pool is None:
                raise httpcore.ConnectError("the client is closing")
            return pool.handle_request(upstream.probe(step.secret))
        if self._closing:
            raise KeyrotorError(_CLOSED)
        options = upstream.options
        first_byte = request.first_byte
        if first_byte is None:  # once a request, not once an attempt: it may read the body
            first_byte = request.first_byte = options.first_byte_for(request.body)
        http = upstream.request(
            request.method, request.path, step.secret, request.headers, request.body, first_byte
        )
        _head.first_byte, _head.deadline = first_byte, None
        try:
            response = self._http().handle_request(http)
        finally:
            _head.first_byte = None
        # The head is in: the body's reads wait up to ``idle`` (httpcore reads
        # the timeout again when the body is first read).
        http.extensions["timeout"]["read"] = options.idle
        return response


class _Backend(httpcore.NetworkBackend):
    """httpcore's blocking backend, keeping the streams it opens so that
    ``shutdown`` can wake the threads blocked on them (closing a socket does
    not wake a thread blocked reading it; shutting it down does)."""

    def __init__(self) -> None:
        self._backend = httpcore.SyncBackend()
        self._streams: weakref.WeakSet[_Stream] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._shut = False

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._backend.connect_tcp(host, port, timeout, local_address, socket_options)
        return self.keep(stream)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        return self.keep(self._backend.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)

    def keep(self, stream: httpcore.NetworkStream) -> _Stream:
        """``stream``, kept until it is dropped (or closed, if shut down already)."""
        kept = _Stream(stream, self)
        with self._lock:
            if not self._shut:
                self._streams.add(kept)
                return kept
        stream.close()
        raise httpcore.ConnectError("the client is closing")

    def shutdown(self) -> None:
        """Shut every stream down (reads and writes on them end at once)."""
        with self._lock:
            self._shut = True
            streams = list(self._streams)
        for stream in streams:
            stream.shutdown()


class _Stream(httpcore.NetworkStream):
    """A stream of ``_Backend``: httpcore's, and a way to shut it down."""

    def __init__(self, stream: httpcore.NetworkStream, backend: _Backend) -> None:
        self._stream = stream
        self._backend = backend

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """httpcore's read; while an attempt waits for its head, ``timeout`` is
        capped so that the whole head (1xx answers, trickled bytes) comes
        within ``first_byte`` of the first read."""
        first_byte = getattr(_head, "first_byte", None)
        if first_byte is not None:
            now = time.monotonic()
            if _head.deadline is None:
                _head.deadline = now + first_byte
            left = _head.deadline - now
            if left <= 0:
                raise httpcore.ReadTimeout(
                    f"the response head was not complete within {first_byte} s"
                )
            timeout = left if timeout is None else min(timeout, left)
        return self._stream.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        return self._backend.keep(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)

    def shutdown(self) -> None:
        sock = self._stream.get_extra_info("socket")
        if isinstance(sock, socket.socket):
            with suppress(OSError):  # closed already
                sock.shutdown(socket.SHUT_RDWR)


def _log_failure(future: Future[None]) -> None:
    """A probe thread's unexpected error (a bug) is logged, not lost."""
    exc = future.exception()
    if exc is not None:
        logger.error("keyrotor probe failed", exc_info=exc)
