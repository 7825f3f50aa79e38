"""The HTTP layer the transports share: options, requests, responses, errors.

The sync client sends with httpcore, the async one with keyrotor's own h11
pool (``_h11pool``); see docs/transports.md for the measurement behind both.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
import httpcore

from ..core import Deliver
from ..core.config import finite, shown
from . import codec as http_codec
from .errors import ConfigurationError, UpstreamError
from .json_body import Unsure, member, parse

__all__ = [
    "MAX_ERROR_BODY",
    "REFUSED",
    "TRANSPORT_ERRORS",
    "USAGE_UNASKED",
    "HTTPOptions",
    "LineDecoder",
    "Response",
    "ResponseHead",
    "Upstream",
    "answer_error",
    "ask_usage",
    "asks_stream_usage",
    "client_headers",
    "decode_headers",
    "encode_body",
    "error_status",
    "failure_reason",
    "header_name_ok",
    "header_value_ok",
    "json_or_raise",
    "number",
    "openrouter_like",
    "parse_json",
    "read_bounded",
    "request_headers",
    "split_url",
    "wants_stream",
]

MAX_ERROR_BODY = 1 << 20
"""Error bodies are read (for classification) up to this many bytes."""

TRANSPORT_ERRORS: tuple[type[Exception], ...] = (
    httpcore.NetworkError,
    httpcore.TimeoutException,
    httpcore.RemoteProtocolError,
    TimeoutError,
)
"""An attempt failed without an answer (connect, timeout, reset, the upstream
breaking HTTP): report ``TransportFailed`` and let the pool fail over.
``LocalProtocolError`` is not here: it is the caller's request that HTTP refuses."""

REFUSED = (
    "the request could not be sent: a header name or value has characters HTTP does "
    "not allow; use printable Latin-1 text on one line"
)
"""A request HTTP refuses (a caller's header): never its value, which may be private."""

_COUNTS = ("max_connections", "max_connections_per_key")
"""The ``HTTPOptions`` that count connections (whole numbers)."""

_HOP_BY_HOP = frozenset(
    {"authorization", "host", "content-length", "connection", "transfer-encoding", "keep-alive"}
)


@attrs.frozen(kw_only=True)
class HTTPOptions:
    """Connection pooling and timeouts (seconds) for the upstream.

    Attributes:
        connect: to open a connection (TCP and TLS).
        first_byte: from sending a request to its response's headers, for a
            request that is not a stream; past it the attempt fails over to
            another key and counts as a timeout against its key. It bounds
            the whole head, interim 1xx answers and bytes trickling in included
            (the sync client counts it from the first read of the head).
        first_byte_stream: the same for a stream (``"stream": true`` in the
            body): the time to the stream's first byte.
        idle: between two chunks of a body (streams included).
        write: to send a request.
        pool: to wait for a free connection.
        max_connections: connections kept to the upstream at most.
        max_connections_per_key: connections one key's requests may hold at
            once (the async clients), so that a key whose requests hang cannot
            take the others' slots; a request over it waits up to ``pool``
            seconds, then fails over without blame.
        keepalive_expiry: idle connections are closed after this long (0: a
            connection serves one request).
        probe_timeout: a whole probe (``GET /key``).
        parser: the async clients' HTTP/1.1 parser: ``"auto"`` (httptools when
            installed, else h11), ``"h11"`` or ``"httptools"``.
    """

    connect: float = 10.0
    first_byte: float = 120.0
    first_byte_stream: float = 60.0
    idle: float = 120.0
    write: float = 30.0
    pool: float = 30.0
    max_connections: int = 200
    max_connections_per_key: int = 100
    keepalive_expiry: float = 30.0
    probe_timeout: float = 15.0
    parser: str = "auto"

    def __attrs_post_init__(self) -> None:
        try:
            http_codec.resolve(self.parser)
        except ValueError as exc:
            raise ConfigurationError(f"HTTPOptions.parser: {exc}") from None
        for field in attrs.fields(HTTPOptions):
            name = field.name
            value = getattr(self, name)
            if name == "parser":
                continue
            if name in _COUNTS:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigurationError(
                        f"HTTPOptions.{name} must be a whole number of at least 1, "
                        f"got {shown(value)}"
                    )
            elif name == "keepalive_expiry":  # 0: a connection serves one request
                if not finite(value) or value < 0:
                    raise ConfigurationError(
                        f"HTTPOptions.{name} must be a finite number of seconds, 0 or more, "
                        f"got {shown(value)}"
                    )
            elif not finite(value) or not value > 0:  # inf (TOML's 1e400) is no timeout
                raise ConfigurationError(
                    f"HTTPOptions.{name} must be a positive finite number, got {shown(value)}"
                )

    def first_byte_for(self, body: bytes | None) -> float:
        """The first-byte deadline of a request with ``body``."""
        return self.first_byte_stream if wants_stream(body) else self.first_byte

    def timeouts(self, read: float | None = None) -> dict[str, float]:
        """httpcore's per-request timeout extension; ``read``: in place of
        ``idle`` (the sync client's first-byte deadline, for the head)."""
        return {
            "connect": self.connect,
            "read": self.idle if read is None else read,
            "write": self.write,
            "pool": self.pool,
        }

    def probe_timeouts(self) -> dict[str, float]:
        """``timeouts()`` with every phase capped at ``probe_timeout``."""
        cap = self.probe_timeout
        return {phase: min(value, cap) for phase, value in self.timeouts().items()}


def split_url(base_url: str) -> tuple[str, str, bytes]:
    """``(origin, path prefix, Host header)`` of an upstream base URL, checked."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.username:
        raise ConfigurationError(
            f"invalid upstream URL {base_url!r}: use http(s)://host[:port]/path"
        )
    return f"{parts.scheme}://{parts.netloc}", parts.path.rstrip("/"), parts.netloc.encode()


@attrs.frozen
class Upstream:
    """Where requests go, and the ``httpcore.Request`` of each attempt and probe.

    Attributes:
        origin: ``scheme://host[:port]``.
        prefix: the base URL's path (``/api/v1``), no trailing slash.
        host: the ``Host`` header.
        options: connection and timeout options.
        headers: headers sent on every request.
        probe_path: the cheap call that probes a key.
        stream_usage: a streamed completion is sent asking for its usage
            (``stream_options.include_usage``, see ``body_for``): an
            OpenAI-compatible upstream reports none in a stream otherwise.
    """

    origin: str
    prefix: str
    host: bytes
    options: HTTPOptions
    headers: dict[str, str]
    probe_path: str
    stream_usage: bool = False

    @classmethod
    def from_url(
        cls,
        base_url: str,
        options: HTTPOptions | None = None,
        headers: Mapping[str, str] | None = None,
        probe_path: str = "/key",
        stream_usage: bool | None = None,
    ) -> Upstream:
        """Check ``base_url`` and ``headers`` (their names lower-cased, so that a
        request's own replace them whatever their case) and gather the rest.
        ``stream_usage`` None: from the URL (``asks_stream_usage``)."""
        origin, prefix, host = split_url(base_url)
        own = client_headers(headers or {})
        if stream_usage is None:
            stream_usage = asks_stream_usage(base_url)
        return cls(origin, prefix, host, options or HTTPOptions(), own, probe_path, stream_usage)

    @property
    def url(self) -> str:
        """The base URL (no secrets in it)."""
        return f"{self.origin}{self.prefix}"

    def url_for(self, path: str) -> str:
        """The absolute URL of ``path`` (``/chat/completions``) upstream."""
        return f"{self.origin}{self.prefix}{path}"

    def body_for(self, path: str, body: bytes) -> bytes:
        """``body`` as sent to ``path`` upstream: with ``stream_usage``, a
        streamed completion (``/chat/completions``, ``/completions``) asks for
        its usage (``ask_usage``); anything else goes as it is, at the cost of
        one attribute test when ``stream_usage`` is off (OpenRouter)."""
        if not self.stream_usage or not body or not _COMPLETIONS.search(path):
            return body
        return ask_usage(body)

    def merge_headers(self, extra: Mapping[str, str] | None) -> Mapping[str, str]:
        """The client's headers overridden by one request's own, names compared
        without case (the client's are lower-case: the adapters' and the
        proxy's names are too, so that is one dict merge)."""
        own = self.headers
        if not extra:
            return own
        if own and not "".join(extra).islower():  # a caller's "X-Title" (one C call)
            merged = dict(own)
            for name, value in extra.items():
                merged[name.lower()] = value
            return merged
        return {**own, **extra}

    def request(
        self,
        method: str,
        path: str,
        secret: str,
        headers: Mapping[str, str],
        body: bytes | None,
        first_byte: float | None = None,
    ) -> httpcore.Request:
        """One attempt with ``secret``; ``headers`` as from ``merge_headers``;
        ``first_byte``: the read timeout until the head (then set it to ``idle``
        in ``extensions["timeout"]``, which httpcore reads again for the body)."""
        return httpcore.Request(
            method,
            self.url_for(path),
            headers=request_headers(self.host, secret, headers, body),
            content=body,
            extensions={"timeout": self.options.timeouts(first_byte)},
        )

    def probe(self, secret: str) -> httpcore.Request:
        """``GET probe_path`` with ``secret``, every timeout capped at ``probe_timeout``."""
        return httpcore.Request(
            "GET",
            self.url_for(self.probe_path),
            headers=request_headers(self.host, secret, self.headers, None),
            extensions={"timeout": self.options.probe_timeouts()},
        )


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def header_name_ok(name: str) -> bool:
    """Whether ``name`` is a header name (RFC 9110's token)."""
    return _TOKEN.fullmatch(name) is not None


USAGE_UNASKED = ("openrouter.ai", "api.mistral.ai")
"""Hosts (and their subdomains) whose streams are not sent ``stream_options``:
OpenRouter's report usage unasked (and ignore the member), Mistral's do too
and refuse the member (422, ``extra_forbidden``)."""

_COMPLETIONS = re.compile(r"/completions/?(?:\?|$)")
"""A path of ``/chat/completions`` or ``/completions`` (a query may follow)."""

_ASK_USAGE = b',"stream_options":{"include_usage":true}'
_STREAM_OPTIONS = re.compile(rb'"stream_options"')


def asks_stream_usage(base_url: str) -> bool:
    """Whether streams to ``base_url`` should ask for their usage: not on the
    hosts of ``USAGE_UNASKED``, nor on a base URL laid out as OpenRouter's
    (``openrouter_like``); on any other OpenAI-compatible upstream, yes."""
    return not (_on_host(base_url, USAGE_UNASKED) or openrouter_like(base_url))


def openrouter_like(base_url: str) -> bool:
    """Whether ``base_url`` is OpenRouter's, or laid out as its (the path ends
    with ``/api/v1``: a gateway in front of it, the bundled fake)."""
    return _on_host(base_url, ("openrouter.ai",)) or (
        urlsplit(base_url).path.rstrip("/").endswith("/api/v1")
    )


def _on_host(base_url: str, hosts: Sequence[str]) -> bool:
    """Whether ``base_url``'s host is one of ``hosts`` or a subdomain of one."""
    host = (urlsplit(base_url).hostname or "").rstrip(".")
    return any(host == name or host.endswith("." + name) for name in hosts)


def ask_usage(body: bytes) -> bytes:
    """A JSON request ``body`` that asks for a stream, with
    ``"stream_options":{"include_usage":true}`` added as its last member
    (OpenAI's streams carry usage only then, in a last chunk whose
    ``choices`` is empty). Unchanged when it asks for no stream, has a
    ``stream_options`` of its own (the caller's choice stands), or is no
    JSON object. Found as ``wants_stream`` finds ``stream``: no parse of a
    long body (the body is copied once, with the member appended)."""
    if not wants_stream(body):
        return body
    try:
        if member(body, b'"stream_options"', _STREAM_OPTIONS) is not None:
            return body
    except Unsure:
        payload = parse_json(body)
        if not isinstance(payload, dict) or "stream_options" in payload:
            return body
    end = len(body.rstrip())
    if body[end - 1 : end] != b"}":
        return body
    return body[: end - 1] + _ASK_USAGE + body[end - 1 :]


def client_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """A client's own headers, checked once (``ConfigurationError`` naming
    the header, never its value) and with lower-case names."""
    checked: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not header_name_ok(name):
            raise ConfigurationError(
                f"the client header {name!r} is not a valid header name: "
                "use letters, digits and -, such as X-Title"
            )
        if not isinstance(value, str) or not header_value_ok(value):
            raise ConfigurationError(
                f"the client header {name!r} has characters a header cannot carry: "
                "use printable Latin-1 text on one line"
            )
        checked[name.lower()] = value
    return checked


def header_value_ok(value: str) -> bool:
    """Printable Latin-1 on one line (no CR, LF, NUL nor other control)."""
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return value.isprintable()


_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true\b')


def wants_stream(body: bytes | None) -> bool:
    """Whether a JSON request body asks for a stream (a top-level ``"stream":
    true``), parsed only when ``json_body.member`` cannot tell without."""
    if not body:
        return False
    try:
        return member(body, b'"stream"', _STREAM_TRUE) is not None
    except Unsure:
        payload = parse_json(body)
        return isinstance(payload, dict) and payload.get("stream") is True


def encode_body(json_body: Any, content: bytes | None) -> bytes | None:
    """The request body from ``json=`` or ``content=`` (not both)."""
    if json_body is not None and content is not None:
        raise ValueError("pass json= or content=, not both")
    if json_body is not None:
        return json.dumps(json_body, separators=(",", ":")).encode("utf-8")
    return content


def request_headers(
    host: bytes,
    secret: str | None,
    extra: Mapping[str, str] | Iterable[tuple[str, str]] | None,
    body: bytes | None,
    *,
    frame: bool = True,
) -> list[tuple[bytes, bytes]]:
    """Headers for one attempt: Host, the key's Authorization (none when
    ``secret`` is None), the caller's own (minus Authorization, Host and
    hop-by-hop headers), then the body's length (unless ``frame`` is False: the
    h11 pool frames bodies itself) and type (JSON unless the caller gave one).

    A caller's header that is not Latin-1 raises ``ConfigurationError`` naming
    it (not its value), with the secret gone from this frame's locals first."""
    headers = [(b"Host", host)]
    if secret is not None:
        headers.append((b"Authorization", b"Bearer " + secret.encode("ascii")))
    typed = False
    items = extra.items() if isinstance(extra, Mapping) else (extra or ())
    try:
        for name, value in items:
            lower = name.lower()
            if lower in _HOP_BY_HOP:
                continue
            typed = typed or lower == "content-type"
            headers.append((name.encode("latin-1"), value.encode("latin-1")))
    except UnicodeEncodeError:
        refused = True
    else:
        refused = False
    if refused:  # raised here, not in ``except``: no chained error, no secret in the locals
        del secret, headers
        raise ConfigurationError(
            f"the request header {name!r} has characters a header cannot carry: "
            "use printable Latin-1 text on one line"
        )
    if body is not None:
        if frame:
            headers.append((b"Content-Length", str(len(body)).encode()))
        if not typed:
            headers.append((b"Content-Type", b"application/json"))
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
        return parse(body)
    except ValueError:
        return None


def read_bounded(chunks: Iterable[bytes], limit: int | None) -> bytes:
    """A body read to its end, or until about ``limit`` bytes (an error body
    read to classify it)."""
    parts: list[bytes] = []
    size = 0
    for chunk in chunks:
        parts.append(chunk)
        size += len(chunk)
        if limit is not None and size >= limit:
            break
    return b"".join(parts)


def failure_reason(exc: BaseException) -> str:
    """The core's ``TransportFailed.reason`` for an httpcore exception (or the
    builtin ``TimeoutError`` of a first-byte deadline)."""
    if isinstance(exc, (httpcore.ConnectError, httpcore.ConnectTimeout)):
        return "connect"
    if isinstance(exc, httpcore.PoolTimeout):
        return "pool"  # no connection slot came free: not the key's fault
    if isinstance(exc, (httpcore.TimeoutException, TimeoutError)):
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


class ResponseHead:
    """The head of a delivered response: what both clients' ``StreamResponse``
    share (status, headers, the key's alias, attempts), never a secret."""

    def __init__(self, deliver: Deliver, headers: dict[str, str]) -> None:
        self.status_code = deliver.status
        self.headers = headers
        self.key = deliver.key_id
        self.attempts = deliver.attempt

    @property
    def is_success(self) -> bool:
        """2xx."""
        return 200 <= self.status_code < 300

    def to_response(self, content: bytes) -> Response:
        """The whole response, once ``content`` is read."""
        return Response(
            status_code=self.status_code,
            headers=self.headers,
            content=content,
            key=self.key,
            attempts=self.attempts,
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.status_code} key={self.key} attempts={self.attempts}>"


class LineDecoder:
    """Bytes in, text lines out (ended by LF, CRLF or a lone CR, as SSE allows).

    UTF-8 is decoded incrementally, so a character split between two chunks
    arrives whole; invalid bytes become U+FFFD.
    """

    __slots__ = ("_decoder", "_pending")

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def feed(self, chunk: bytes) -> list[str]:
        """The lines ``chunk`` completes."""
        text = self._pending + self._decoder.decode(chunk)
        if "\r" not in text:
            *lines, self._pending = text.split("\n")
            return lines
        half = text.endswith("\r")  # maybe the first half of a CRLF: kept for the next chunk
        text = (text[:-1] if half else text).replace("\r\n", "\n").replace("\r", "\n")
        *lines, pending = text.split("\n")
        self._pending = pending + "\r" if half else pending
        return lines

    def flush(self) -> list[str]:
        """The last line, if the body did not end with a newline."""
        rest = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        if rest.endswith("\r"):  # a line ended by a lone CR
            return [rest[:-1]]
        return [rest] if rest else []


def json_or_raise(response: Response) -> Any:
    """The parsed body of a 2xx JSON response; else ``UpstreamError`` (also for
    a 200 that carries an ``error``, ``answer_error``: a generation that
    failed, its status the error's code)."""
    body = parse_json(response.content)
    if not response.is_success:
        raise UpstreamError(response.status_code, body, response.key, response.attempts)
    if body is None:
        raise UpstreamError(
            response.status_code, response.text[:200], response.key, response.attempts
        )
    failed = error_status(answer_error(body))
    if failed is not None:
        raise UpstreamError(failed, body, response.key, response.attempts)
    return body


def answer_error(payload: Any) -> Any:
    """The ``error`` object a 2xx answer or SSE event carries (None: none): its
    top-level ``error`` (OpenRouter's mid-stream error chunk, Anthropic's
    ``error`` event), else the first of its ``choices`` that has one
    (OpenRouter's non-streaming answer whose generation failed midway:
    ``choices[0].error``, ``finish_reason: "error"``), else the Responses
    API's: ``response.error`` (``response.failed``) or an ``error`` event's
    own ``code`` and ``message``."""
    if not isinstance(payload, dict):
        return None
    error = payload.get("error")
    if isinstance(error, dict):
        return error
    choices = payload.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            inner = choice.get("error") if isinstance(choice, dict) else None
            if isinstance(inner, dict):
                return inner
    response = payload.get("response")
    if isinstance(response, dict) and isinstance(response.get("error"), dict):
        return response["error"]
    if payload.get("type") == "error":
        return {k: payload[k] for k in ("code", "message", "param") if k in payload}
    return None


NAMED_STATUS: dict[str, int] = {
    # Anthropic's error types (docs.anthropic.com/en/api/errors), mid-stream too
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
    # OpenAI's error codes (the Responses API's ``response.error.code``)
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
    "server_error": 500,
    "invalid_prompt": 400,
}
"""The HTTP status an in-answer error stands for when its ``code`` is no
status: its ``code``, else its ``type``, by name."""


def error_status(error: Any) -> int | None:
    """The status an ``error`` object in a 2xx body stands for (None: no
    object): its ``code`` when that is an HTTP status, else a name of
    ``NAMED_STATUS`` in its ``code`` or ``type`` (Anthropic's
    ``overloaded_error`` is its 529), else 502."""
    if not isinstance(error, dict):
        return None
    code = number(error.get("code"))
    if code is not None:
        return int(code) if 100 <= code < 600 else 502
    for field in ("code", "type"):
        name = error.get(field)
        if isinstance(name, str) and name in NAMED_STATUS:
            return NAMED_STATUS[name]
    return 502


def number(value: Any) -> float | None:
    """A finite number, from a JSON number or a numeric string (None: anything
    else, NaN, an infinity or an integer too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        found = float(value)
    except (ValueError, OverflowError):
        return None
    return found if math.isfinite(found) else None
