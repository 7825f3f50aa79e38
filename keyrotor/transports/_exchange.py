"""One request's exchange with the upstream, written once for every client.

A request's attempts, a delivered body read to its end, and a probe are written
here as generators of *steps*: each ``yield`` asks the client for one piece of
I/O (wait for the pool's next decision, open an HTTP request, read, close) and
gets its result back. Every decision between two steps (which key, what to
read, what to tell the pool) is taken here, so the blocking client and the
async one differ only in how they carry out a step (``sync.py`` with httpcore
under its lock, ``_async.py`` with the h11 pool under anyio). A client runs a
generator with its ``_run`` loop: it sends each step's result back in, or
throws the step's exception (a cancellation, a bug) in, so that the
generator's clean-up (closing the response, telling the pool) runs in one place.

A step that fails for want of an answer (connect, reset, a timeout) does not
raise: the client turns it into ``Failed`` with the core's
``TransportFailed.reason``, and the generator fails over.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from typing import Any, TypedDict, TypeVar, cast

import attrs

from ..core import Deliver, Reject, Send
from ._driver import Driver, Slot, StreamAccountant
from ._http import MAX_ERROR_BODY, ResponseHead, Upstream, encode_body
from .errors import NoKeyAvailable, TransportError

__all__ = [
    "WAIT",
    "Close",
    "Delivered",
    "Failed",
    "NextChunk",
    "Open",
    "Opened",
    "Outgoing",
    "Read",
    "RequestOptions",
    "StreamBody",
    "attempts",
    "chat_options",
    "first_error",
    "outgoing",
    "probe",
    "route",
]

T = TypeVar("T")
Steps = Generator[Any, Any, T]
# The steps and results below are made for every request: plain slotted
# classes (attrs.define), which are built about twice as fast as frozen ones.
"""A generator of steps (``WAIT``, ``Open``, ``Read``, ``NextChunk``,
``Close``) that returns a ``T``."""


class RequestOptions(TypedDict, total=False):
    """The keyword options of ``request``, ``stream`` and ``send``.

    Keys:
        json: a body to send as JSON (or ``content``: bytes as they are).
        headers: headers of this request (over the client's own).
        pin: a key (alias or index) to send on.
        session: a label whose requests stay on one key while it is usable.
        group: a label whose requests spread over distinct keys.
        timeout: the longest wait for a key, in seconds (``None``: the pool's
            ``queue_timeout``).
        attempts: this request's attempts, at most the pool's ``max_attempts``.
        route: the route that chose the request's model (a recorded trace
            notes it).
    """

    json: Any
    content: bytes | None
    headers: Mapping[str, str] | None
    pin: str | int | None
    session: str | None
    group: str | None
    timeout: float | None
    attempts: int | None
    route: str | None


class _Wait:
    """Wait until the pool routes the request's next decision (or the client closes)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "WAIT"


WAIT = _Wait()


@attrs.define
class Outgoing:
    """What every attempt of one request sends (a key's secret aside);
    ``first_byte``: its first-byte deadline, once the async client has found it."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes | None
    first_byte: float | None = None


def outgoing(upstream: Upstream, method: str, path: str, options: RequestOptions) -> Outgoing:
    """The request ``options`` describe: its body encoded, its headers merged."""
    body = encode_body(options.get("json"), options.get("content"))
    if body:  # a stream to an OpenAI-compatible upstream asks for its usage
        body = upstream.body_for(path, body)
    return Outgoing(method, path, upstream.merge_headers(options.get("headers")), body)


def route(options: RequestOptions) -> dict[str, Any]:
    """The options the pool routes by (``Driver.open``'s keywords)."""
    return {name: options[name] for name in _ROUTING if name in options}  # type: ignore[literal-required]


_ROUTING = ("pin", "session", "group", "timeout", "attempts", "route")
_CHAT_POOL = ("pin", "session", "group", "timeout")
"""The ``chat`` parameters that are the pool's; the rest (OpenRouter's own
``route`` among them) go into the body."""


def chat_options(
    model: str, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]
) -> RequestOptions:
    """``chat(model=, messages=, **params)`` as ``request`` options: the pool's
    (``pin``, ``session``, ``group``, ``timeout``) taken out, the rest in the
    ``/chat/completions`` body."""
    options = {name: params[name] for name in _CHAT_POOL if name in params}
    body = {name: value for name, value in params.items() if name not in _CHAT_POOL}
    options["json"] = {"model": model, "messages": list(messages), **body}
    return cast(RequestOptions, options)


@attrs.define
class Open:
    """Send ``request`` on ``key_id`` with ``secret`` and wait for its head;
    result: ``Opened`` or ``Failed``. ``request`` None: the key's probe."""

    request: Outgoing | None
    key_id: str
    secret: str = attrs.field(repr=False)  # a traceback's locals may be kept (Sentry)


@attrs.define
class Opened:
    """An answer's head; ``handle`` is the client's own response object."""

    handle: Any
    status: int
    headers: dict[str, str]


@attrs.define
class Read:
    """Read the rest of ``handle``'s body (at most ``limit`` bytes, when set);
    result: the bytes, or ``Failed``."""

    handle: Any
    limit: int | None = None


@attrs.define
class NextChunk:
    """Read the next piece of ``handle``'s body; result: the bytes, None at
    its end, or ``Failed``."""

    handle: Any


@attrs.define
class Close:
    """Drop ``handle`` (its connection is reused only if its body was read);
    never fails."""

    handle: Any


@attrs.define
class Admit:
    """Ask ``Driver.gate`` (limits shared with other processes) whether
    ``key_id`` may take the attempt now; result: None (yes) or the seconds
    until it may (the attempt is then held: ``Driver.held``)."""

    request_id: str
    key_id: str
    tokens: int


@attrs.define
class Failed:
    """A step got no answer: ``reason`` as ``TransportFailed`` has it."""

    reason: str
    error: BaseException


@attrs.define
class Delivered:
    """The answer the pool hands to the caller: ``prefetched``, its body if it
    was read already (an error answer, or a whole one)."""

    handle: Any
    deliver: Deliver
    headers: dict[str, str]
    prefetched: bytes | None


def attempts(
    driver: Driver, request_id: str, slot: Slot, outgoing: Outgoing, buffer: bool
) -> Steps[Delivered]:
    """Carry out the pool's decisions for one request until one is delivered.

    ``buffer``: a successful answer that is not an SSE stream is read whole
    before the pool hears of it, so that a body breaking off fails over like
    a missing answer. Raises ``NoKeyAvailable`` when the pool rejects it."""
    ended = False
    unreached = ""  # why the last connection could not be opened (before a byte was sent)
    try:
        while True:
            while not slot.decisions:
                yield WAIT
            decision = slot.decisions.popleft()
            if isinstance(decision, Reject):
                ended = True
                driver.close(request_id, ended=True)
                reason = decision.reason
                if decision.status == 502 and unreached:  # an untrusted certificate, by name
                    reason = f"{reason}: {unreached}"
                raise NoKeyAvailable(decision.status, decision.retry_after, reason)
            assert isinstance(decision, Send)
            gate = driver.gate
            if gate is not None and decision.key_id in gate.limited:
                wait = yield Admit(request_id, decision.key_id, slot.tokens)
                if wait is not None:
                    driver.held(request_id, wait)
                    continue
            # No local holds the secret: this frame is in the traceback of every
            # error raised here, and error reporters keep a traceback's locals.
            if driver.secret_for(request_id, decision) is None:
                continue  # removed after the pool chose it: failed over already
            opened = yield Open(outgoing, decision.key_id, driver.secrets[decision.key_id])
            if isinstance(opened, Failed):
                driver.failed(request_id, opened.reason)
                if opened.reason == "connect":
                    unreached = str(opened.error)[:300]
            else:
                delivered = yield from _answer(driver, request_id, decision.attempt, opened, buffer)
                if delivered is not None:
                    return delivered
            if gate is not None:  # the attempt is over: its key's in-flight slot too
                gate.release(request_id)
    except BaseException:
        if not ended:
            driver.close(request_id, ended=False)
        raise


def _answer(
    driver: Driver, request_id: str, attempt: int, opened: Opened, buffer: bool
) -> Steps[Delivered | None]:
    """One attempt's answer told to the pool: delivered, or None to go on."""
    handle, status, headers = opened.handle, opened.status, opened.headers
    try:
        error = status >= 300  # read (a bounded part) to classify it
        prefetched = None
        if error or (buffer and "event-stream" not in headers.get("content-type", "").lower()):
            prefetched = yield Read(handle, MAX_ERROR_BODY if error else None)
            if isinstance(prefetched, Failed):
                yield Close(handle)
                driver.failed(request_id, prefetched.reason)
                return None
        deliver = driver.received(
            request_id, attempt, status, headers, prefetched if error else None
        )
    except GeneratorExit:
        raise
    except BaseException:
        yield Close(handle)
        raise
    if deliver is None:
        yield Close(handle)  # a failed attempt: drop it, the pool has decided
        return None
    return Delivered(handle, deliver, headers, prefetched)


def probe(driver: Driver, key_id: str) -> Steps[None]:
    """Probe ``key_id`` and tell the pool what came back (``status`` None when
    nothing did: no answer, the key gone, the client closing)."""
    status: int | None = None
    headers: dict[str, str] | None = None
    body: bytes | None = None
    try:
        if key_id in driver.secrets:  # (no local holds the secret: see ``attempts``)
            opened = yield Open(None, key_id, driver.secrets[key_id])
            if not isinstance(opened, Failed):
                try:
                    read = yield Read(opened.handle, MAX_ERROR_BODY)
                finally:
                    yield Close(opened.handle)
                if not isinstance(read, Failed):
                    status, headers, body = opened.status, opened.headers, read
    finally:
        # Always answered: a key left "probing" would never be probed again.
        driver.probe_finished(key_id, status, headers, body)


class StreamBody(ResponseHead):
    """A delivered response whose body is read as it arrives: what both
    clients' ``StreamResponse`` share. Usage in the last SSE chunk and an
    in-stream error are accounted to the key when the body ends; a body that
    breaks off raises ``TransportError``."""

    def __init__(self, driver: Driver, request_id: str, delivered: Delivered) -> None:
        super().__init__(delivered.deliver, delivered.headers)
        self._driver = driver
        self._request_id = request_id
        self._handle = delivered.handle
        self._prefetched = delivered.prefetched
        self._accountant = StreamAccountant(delivered.headers.get("content-type", ""))
        self._done = False
        self._ended = False

    @property
    def usage(self) -> StreamAccountant | None:
        """What the answer used (``cost``, ``prompt_tokens``,
        ``completion_tokens``, the raw ``usage``) once its body was read to
        the end (or read whole before delivery: an answer that is not a stream,
        closed unread); None before that, or when it broke off or was closed early."""
        return self._accountant if self._ended else None

    @property
    def ready(self) -> bool:
        """Whether the next chunk (or the body's end) is in hand: reading it
        waits for nothing from the upstream. False when unsure (a client whose
        HTTP library cannot tell). A relay writes what it holds before a read
        that is not ready, and joins what is ready into one write."""
        if self._done or self._prefetched is not None:
            return True
        return getattr(self._handle, "ready", False) is True

    def _next_chunk(self) -> Steps[bytes | None]:
        """The next piece of the body, or None at its end (accounted then)."""
        if self._done:
            return None
        prefetched = self._prefetched
        if prefetched is not None:  # read already (an error answer, or a whole one): all of it
            self._prefetched = b""  # so the next call ends the body
            chunk: bytes | None = prefetched or None
        else:
            read = yield NextChunk(self._handle)
            if isinstance(read, Failed):
                yield from self._end(read.reason)
                raise TransportError(f"the response body broke off ({read.error})") from read.error
            chunk = read
        if chunk is None:
            self._accountant.close()
            self._ended = True
            yield from self._end()
            return None
        self._accountant.feed(chunk)
        return chunk

    def _rest(self) -> Steps[bytes]:
        """The rest of the body at once (one run of the client for all of it)."""
        parts = []
        while (chunk := (yield from self._next_chunk())) is not None:
            parts.append(chunk)
        return b"".join(parts)

    def _end(self, failure: str | None = None) -> Steps[None]:
        """The body ended (or broke off, ``failure``): the request is done."""
        if self._done:
            return
        self._done = True
        try:
            yield Close(self._handle)  # frees its connection slot first
        finally:
            self._driver.finish(self._request_id, self.key, self._accountant, failure)

    def _closing(self) -> Steps[None]:
        """The caller stops reading: the upstream request is dropped, the key
        freed. A body read whole already (the upstream charged for it) is
        accounted as if the caller had read it."""
        if self._done:
            return
        prefetched = self._prefetched
        if prefetched is not None:
            self._prefetched = b""
            self._accountant.feed(prefetched)  # (b"" once the caller had it: nothing)
            self._accountant.close()
            self._ended = True
            yield from self._end()
            return
        self._done = True
        try:
            yield Close(self._handle)
        finally:
            self._driver.close(self._request_id, ended=False)


def first_error(results: list[Any]) -> list[Any]:
    """``parallel_chat``: the results, or the first error among them raised."""
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results
