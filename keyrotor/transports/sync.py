"""The pool as a blocking client: ``from keyrotor.transports.sync import Client``.

The twin of ``keyrotor.transports.asyncio.Client`` for threaded code, with the
same API in blocking form. ``with Client(keys) as client:`` starts one daemon
thread that feeds the pool's timer (``Tick`` at ``next_deadline()``) and hands
probes to a small thread pool. Requests run on the caller's threads, any
number at once: every call into the driver holds the client's lock, never
during network I/O, and a request waits for its decisions on a condition of
that lock.

Timeouts: httpcore's blocking API cannot cancel a call, so ``HTTPOptions.idle``
(httpcore's per-read timeout) also bounds the wait for the first byte, in
place of ``first_byte``; a probe's every phase is capped at ``probe_timeout``.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Self

import httpcore

from ..core import Deliver, PoolConfig, Probe, Reject, Send
from ._base import ClientBase, chat_payload
from ._driver import OPENROUTER_URL, Driver, Slot, StreamAccountant
from ._http import (
    TRANSPORT_ERRORS,
    HTTPOptions,
    LineDecoder,
    Response,
    ResponseHead,
    decode_headers,
    encode_body,
    failure_reason,
    json_or_raise,
    read_bounded,
)
from .errors import KeyrotorError, NoKeyAvailable, TransportError, UpstreamError

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


class StreamResponse(ResponseHead):
    """A delivered response whose body is read as it arrives.

    Iterate ``iter_bytes()`` or ``iter_lines()``; usage in the last SSE chunk
    and an in-stream error are accounted to the key when the body ends. A body
    that breaks off raises ``TransportError``.
    """

    def __init__(
        self,
        client: Client,
        request_id: str,
        response: httpcore.Response,
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

    def iter_bytes(self) -> Iterator[bytes]:
        """The body, chunk by chunk as the upstream sends it."""
        if self._done:
            return
        accountant = self._accountant
        if self._prefetched is not None:  # read already: an error answer, or a whole one
            accountant.feed(self._prefetched)
            if self._prefetched:
                yield self._prefetched
        else:
            try:
                for chunk in self._response.iter_stream():
                    accountant.feed(chunk)
                    yield chunk
            except TRANSPORT_ERRORS as exc:
                self._end(failure=failure_reason(exc))
                raise TransportError(f"the response body broke off ({exc})") from exc
        accountant.close()
        self._end()

    def iter_lines(self) -> Iterator[str]:
        """The body as text lines (SSE ``data:`` and comment lines included)."""
        decoder = LineDecoder()
        for chunk in self.iter_bytes():
            yield from decoder.feed(chunk)
        yield from decoder.flush()

    def read(self) -> bytes:
        """The rest of the body at once."""
        return b"".join(self.iter_bytes())

    def _end(self, failure: str | None = None) -> None:
        if self._done:
            return
        self._done = True
        client = self._client
        try:
            self._response.close()
        finally:
            with client._lock:
                client._driver.finish(self._request_id, self.key, self._accountant, failure)

    def close(self) -> None:
        """Stop reading: the upstream request is dropped and the key freed."""
        if not self._done:
            self._done = True
            client = self._client
            try:
                self._response.close()
            finally:
                with client._lock:
                    client._driver.close(self._request_id, ended=False)


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
            self._pool = httpcore.ConnectionPool(
                max_connections=options.max_connections,
                keepalive_expiry=options.keepalive_expiry,
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
        """Stop the timer, wait for running probes (each at most ``probe_timeout``)
        and close connections. Idempotent.

        Requests still waiting for a key raise ``KeyrotorError``.
        """
        with self._lock:
            self._stop("the client was closed while the request waited for a key")
            thread, self._thread = self._thread, None
            probes, self._probes = self._probes, None
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

    def request(
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
        response = self.send(
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
            body = response.read()
        finally:
            response.close()
        return response.to_response(body)

    @contextmanager
    def stream(
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
    ) -> Iterator[StreamResponse]:
        """Like ``request``, but the body is read as it arrives (for SSE).

        Leaving the block early drops the upstream request and frees the key.
        ``timeout`` bounds the wait for a key, not the HTTP exchange.
        """
        response = self.send(
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
            response.close()

    def send(
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
    ) -> StreamResponse:
        """Like ``stream``, without the block: the delivered response, whose body
        the caller reads and which the caller must ``close()`` (the twin of the
        async client's ``send``; the httpx transport hands it to httpx).

        ``buffer``: a successful answer that is not an SSE stream is read whole
        before it is delivered, so a body that breaks off fails over to another
        key like a missing answer (``stream`` passes False)."""
        body = encode_body(json, content)
        merged = self._upstream.merge_headers(headers)
        self._http()
        driver = self._driver
        with self._lock:
            waiter = threading.Condition(self._lock)
            request_id, slot = driver.open(
                waiter.notify, pin=pin, session=session, group=group, timeout=timeout, body=body
            )
        return self._attempts(request_id, slot, waiter, method, path, body, merged, buffer)

    def _attempts(
        self,
        request_id: str,
        slot: Slot,
        waiter: threading.Condition,
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
                with self._lock:
                    while not slot.decisions:
                        if self._stopped is not None:
                            raise KeyrotorError(self._stopped)
                        waiter.wait()
                    decision = slot.decisions.popleft()
                    if isinstance(decision, Reject):
                        ended = True
                        driver.close(request_id, ended=True)
                        raise NoKeyAvailable(decision.status, decision.retry_after, decision.reason)
                    assert isinstance(decision, Send)
                    secret = driver.secret_for(request_id, decision)
                    if secret is None:
                        continue
                opened = self._send_one(
                    request_id, decision, secret, method, path, body, headers, buffer
                )
                if opened is not None:
                    return opened
        except BaseException:
            if not ended:
                with self._lock:
                    driver.close(request_id, ended=False)
            raise

    def _send_one(
        self,
        request_id: str,
        send: Send,
        secret: str,
        method: str,
        path: str,
        body: bytes | None,
        headers: Mapping[str, str],
        buffer: bool,
    ) -> StreamResponse | None:
        """One attempt: returns the delivered response, or None to go on."""
        driver = self._driver
        request = self._upstream.request(method, path, secret, headers, body)
        try:
            response = self._http().handle_request(request)
        except TRANSPORT_ERRORS as exc:
            with self._lock:
                driver.failed(request_id, failure_reason(exc))
            return None
        try:
            status = response.status
            response_headers = decode_headers(response.headers)
            prefetched = None
            try:
                if status >= 300:  # an error answer: read to classify it
                    prefetched = read_bounded(response)
                elif buffer and "event-stream" not in response_headers.get("content-type", ""):
                    # A whole answer: a body that breaks off fails over.
                    prefetched = b"".join(response.iter_stream())
            except TRANSPORT_ERRORS as exc:
                response.close()
                with self._lock:
                    driver.failed(request_id, failure_reason(exc))
                return None
            with self._lock:
                deliver = driver.received(
                    request_id,
                    send.attempt,
                    status,
                    response_headers,
                    prefetched if status >= 300 else None,
                )
            if deliver is not None:
                return StreamResponse(
                    self, request_id, response, deliver, response_headers, prefetched
                )
        except BaseException:
            response.close()
            raise
        response.close()  # a failed attempt: drop it, the pool has decided
        return None

    # ------------------------------------------------------------ chat API

    def chat(
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
        response = self.request(
            "POST",
            "/chat/completions",
            json=payload,
            pin=pin,
            session=session,
            group=group,
            timeout=timeout,
        )
        return json_or_raise(response)

    def parallel_chat(self, requests: Sequence[Mapping[str, Any]]) -> list[Any]:
        """Run chat requests at once, each on its own key while enough keys
        are usable (seed 000's ``parallelChat``). Raises the first error."""
        results = self.parallel_chat_partial(requests)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

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
        driver = self._driver
        upstream = self._upstream
        status: int | None = None
        headers: dict[str, str] | None = None
        body: bytes | None = None
        try:
            with self._lock:
                secret = driver.secrets.get(probe.key_id)
                pool = None if self._stopped is not None else self._pool
            if secret is not None and pool is not None:
                try:
                    response = pool.handle_request(upstream.probe(secret))
                    try:
                        body = read_bounded(response)
                    finally:
                        response.close()
                    status, headers = response.status, decode_headers(response.headers)
                except TRANSPORT_ERRORS:
                    status = None
        finally:
            with self._lock:
                driver.probe_finished(probe.key_id, status, headers, body)


def _log_failure(future: Future[None]) -> None:
    """A probe thread's unexpected error (a bug) is logged, not lost."""
    exc = future.exception()
    if exc is not None:
        logger.error("keyrotor probe failed", exc_info=exc)
