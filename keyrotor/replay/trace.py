"""The trace format: recorded (or synthetic) traffic, one JSON object per line.

Line 1 is a :class:`TraceHeader`; every further line is a :class:`TraceRecord`,
one per finished request, written when the request ended (so arrivals are not
necessarily in order: readers sort by ``t``). The format never holds prompt
text or secrets: keys appear by alias, HTTP headers only from an allow-list
(:data:`ALLOWED_HEADERS`), error bodies only as a short machine code.
docs/replay.md documents every field.

    with TraceWriter("traffic.jsonl", TraceHeader(source="proxy")) as writer:
        writer.write(TraceRecord(t=0.0, prompt_tokens=12, completion_tokens=40, ...))
    trace = load_trace("traffic.jsonl")      # header + records sorted by arrival
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any, Final, Literal

import attrs

from ..core.config import finite

__all__ = [
    "ALLOWED_HEADERS",
    "FORMAT",
    "KEY_FIELDS",
    "OUTCOMES",
    "SOURCES",
    "VERSION",
    "Attempt",
    "Trace",
    "TraceError",
    "TraceHeader",
    "TraceRecord",
    "TraceWriter",
    "hash_label",
    "load_trace",
    "read_header",
    "read_trace",
    "shorten_label",
]

FORMAT: Final = "keyrotor-trace"
VERSION: Final = 1
SOURCES: Final = ("proxy", "transport", "synthetic")
OUTCOMES: Final = ("delivered", "rejected", "cancelled", "error")
Outcome = Literal["delivered", "rejected", "cancelled", "error"]

ALLOWED_HEADERS: Final = frozenset(
    {
        "retry-after",
        "retry-after-ms",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "x-ratelimit-limit-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-requests",
        "x-ratelimit-reset-tokens",
        *(
            f"anthropic-ratelimit-{bucket}-{part}"
            for bucket in ("requests", "tokens", "input-tokens", "output-tokens")
            for part in ("limit", "remaining", "reset")
        ),
    }
)
"""Response headers a trace may keep (lower case): rate-limit and retry headers only."""

KEY_FIELDS: Final = (
    "key_id",
    "account",
    "weight",
    "rpm",
    "tpm",
    "max_in_flight",
    "credits",
    "budget",
    "budget_window",
)
"""Fields a header's key description may hold (the ``KeySpec`` fields); others are dropped."""

MAX_LABEL: Final = 256
"""The longest session, group, route or model a trace holds (writers shorten longer ones)."""

_ALIAS: Final = re.compile(r"^[A-Za-z0-9._:@+-]{1,128}$")
_CODE: Final = re.compile(r"^[A-Za-z0-9._:/-]{1,64}$")  # no spaces: no sentences
_SECRET_LIKE: Final = re.compile(r"^(?:sk|rk|pk|key)[-_][A-Za-z0-9_-]{16,}$|^[A-Za-z0-9_-]{40,}$")


class TraceError(ValueError):
    """A trace file or record is invalid. The message names the line and the field."""


def hash_label(value: str, key: bytes = b"") -> str:
    """A short stand-in for a session or group label: 16 hex digits of BLAKE2b,
    keyed with ``key`` (a writer draws a random one, so labels stay consistent
    within its trace and cannot be guessed back from it)."""
    return hashlib.blake2b(value.encode(), digest_size=8, key=key).hexdigest()


def shorten_label(value: str, key: bytes = b"") -> str:
    """A label of at most :data:`MAX_LABEL` characters: ``value`` itself if short
    enough, else its first 239 characters, ``#`` and :func:`hash_label` of the
    whole (so distinct long labels stay distinct)."""
    if len(value) <= MAX_LABEL:
        return value
    return value[: MAX_LABEL - 17] + "#" + hash_label(value, key)


_LABELS: Final = ("model", "route", "session", "group")


def _check_alias(value: object, where: str) -> str:
    if not isinstance(value, str) or not _ALIAS.match(value):
        raise TraceError(
            f"{where}: expected a key alias (1-128 of A-Z a-z 0-9 ._:@+-), got {value!r}"
        )
    if _SECRET_LIKE.match(value):
        raise TraceError(
            f"{where}: {value[:6]}... looks like a secret, not an alias; traces hold aliases only"
        )
    return value


def clean_headers(headers: Mapping[str, Any] | None) -> dict[str, str]:
    """The allowed rate-limit and retry headers, names lower-cased, values as text."""
    if not headers:
        return {}
    kept = {}
    for name, value in headers.items():
        lower = name.lower() if isinstance(name, str) else None
        if lower in ALLOWED_HEADERS and isinstance(value, str | int | float):
            kept[lower] = str(value)[:128]
    return dict(sorted(kept.items()))


def clean_code(code: object) -> str | None:
    """A short machine-readable error code, or None if it is not one."""
    if isinstance(code, str) and _CODE.match(code):
        return code
    return None


def _round(value: float) -> float:
    return round(value, 6)


@attrs.define(kw_only=True, slots=True)
class Attempt:
    """One attempt of a request on one key, as the upstream answered it.

    Attributes:
        key: the key's alias.
        t: seconds from the request's arrival to this attempt's send.
        status: the upstream's HTTP status, or None when no response came.
        reason: for ``status=None``, the transport failure (``timeout``,
            ``connect``, ``reset``, ...).
        latency: seconds from send to the response headers (or to the failure).
        duration: seconds from the headers to the end of the body (delivered
            attempts; 0 otherwise).
        headers: the response's rate-limit and retry headers (allow-listed).
        error: a short machine code from the error body (OpenRouter's
            ``metadata.limit_source`` or ``error.code``), never its text.
    """

    key: str
    t: float = 0.0
    status: int | None = 200
    reason: str | None = None
    latency: float = 0.0
    duration: float = 0.0
    headers: dict[str, str] = attrs.field(factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The attempt as a JSON object (default-valued optional fields left out)."""
        data: dict[str, Any] = {
            "key": self.key,
            "t": _round(self.t),
            "status": self.status,
            "latency": _round(self.latency),
        }
        if self.reason is not None:
            data["reason"] = self.reason
        if self.duration:
            data["duration"] = _round(self.duration)
        headers = clean_headers(self.headers)
        if headers:
            data["headers"] = headers
        error = clean_code(self.error)
        if error is not None:
            data["error"] = error
        return data

    @classmethod
    def from_json(cls, data: object, where: str = "attempt") -> Attempt:
        """Build from a JSON object, checking every field (``TraceError`` names it)."""
        if not isinstance(data, dict):
            raise TraceError(f"{where}: expected an object, got {_kind(data)}")
        _unknown(
            data, {"key", "t", "status", "reason", "latency", "duration", "headers", "error"}, where
        )
        key = _check_alias(_required(data, "key", where), f"{where}.key")
        status = data.get("status", 200)
        if status is not None and (not _is_int(status) or not 200 <= status <= 599):
            raise TraceError(
                f"{where}.status: expected a final HTTP status (200-599) or null, got {status!r}"
            )
        reason = data.get("reason")
        if reason is not None and clean_code(reason) is None:
            raise TraceError(f"{where}.reason: expected a short code or null, got {reason!r}")
        if status is None and reason is None:
            raise TraceError(
                f"{where}.reason: an attempt without a status needs the transport failure "
                "(timeout, connect, reset, ...)"
            )
        headers = data.get("headers", {})
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise TraceError(f"{where}.headers: expected an object of strings, got {headers!r}")
        error = data.get("error")
        if error is not None and clean_code(error) is None:
            raise TraceError(f"{where}.error: expected a short code or null, got {error!r}")
        return cls(
            key=key,
            t=_number(data, "t", where, default=0.0),
            status=status,
            reason=reason,
            latency=_number(data, "latency", where, default=0.0),
            duration=_number(data, "duration", where, default=0.0),
            headers=clean_headers(headers),
            error=error,
        )


@attrs.define(kw_only=True, slots=True)
class TraceRecord:
    """One request, from arrival to its end. See docs/replay.md for each field.

    ``t`` is the arrival in seconds since the trace's start; ``cost`` the USD the
    delivered attempt cost (None if unknown); ``cancel_after`` the seconds after
    arrival at which the caller gave up (``outcome="cancelled"``).
    """

    t: float
    model: str | None = None
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    session: str | None = None
    group: str | None = None
    cost: float | None = None
    outcome: Outcome = "delivered"
    cancel_after: float | None = None
    attempts: list[Attempt] = attrs.field(factory=list)
    route: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON object (one line of a trace)."""
        data: dict[str, Any] = {"type": "request", "t": _round(self.t)}
        if self.model is not None:
            data["model"] = self.model
        if self.route is not None:
            data["route"] = self.route
        data["stream"] = self.stream
        data["prompt_tokens"] = self.prompt_tokens
        data["completion_tokens"] = self.completion_tokens
        if self.session is not None:
            data["session"] = self.session
        if self.group is not None:
            data["group"] = self.group
        if self.cost is not None:
            data["cost"] = round(self.cost, 9)
        data["outcome"] = self.outcome
        if self.cancel_after is not None:
            data["cancel_after"] = _round(self.cancel_after)
        data["attempts"] = [a.to_json() for a in self.attempts]
        return data

    @classmethod
    def from_json(cls, data: object, where: str = "record") -> TraceRecord:
        """Build from a JSON object, checking every field (``TraceError`` names it)."""
        if not isinstance(data, dict):
            raise TraceError(f"{where}: expected an object, got {_kind(data)}")
        if data.get("type") != "request":
            raise TraceError(f"{where}.type: expected 'request', got {data.get('type')!r}")
        _unknown(data, _RECORD_FIELDS, where)
        t = _number(data, "t", where)
        model = _optional_str(data, "model", where)
        stream = data.get("stream", False)
        if not isinstance(stream, bool):
            raise TraceError(f"{where}.stream: expected true or false, got {stream!r}")
        outcome = data.get("outcome", "delivered")
        if outcome not in OUTCOMES:
            raise TraceError(
                f"{where}.outcome: expected one of {', '.join(OUTCOMES)}, got {outcome!r}"
            )
        attempts = data.get("attempts", [])
        if not isinstance(attempts, list):
            raise TraceError(f"{where}.attempts: expected a list, got {_kind(attempts)}")
        cost = data.get("cost")
        if cost is not None:
            cost = _number(data, "cost", where)
        cancel_after = data.get("cancel_after")
        if cancel_after is not None:
            cancel_after = _number(data, "cancel_after", where)
        return cls(
            t=t,
            model=model,
            stream=stream,
            prompt_tokens=_count(data, "prompt_tokens", where),
            completion_tokens=_count(data, "completion_tokens", where),
            session=_optional_str(data, "session", where),
            group=_optional_str(data, "group", where),
            cost=cost,
            outcome=outcome,
            cancel_after=cancel_after,
            attempts=[
                Attempt.from_json(a, f"{where}.attempts[{i}]") for i, a in enumerate(attempts)
            ],
            route=_optional_str(data, "route", where),
        )


_RECORD_FIELDS: Final = frozenset(
    {
        "type",
        "t",
        "model",
        "route",
        "stream",
        "prompt_tokens",
        "completion_tokens",
        "session",
        "group",
        "cost",
        "outcome",
        "cancel_after",
        "attempts",
    }
)


def _key_dicts(keys: Iterable[dict[str, Any] | str]) -> list[dict[str, Any]]:
    """Key descriptions as dicts (a bare alias means ``{"key_id": alias}``)."""
    return [{"key_id": k} if isinstance(k, str) else dict(k) for k in keys]


@attrs.define(kw_only=True, slots=True)
class TraceHeader:
    """The first line of a trace: what produced it, and the keys (aliases only).

    Attributes:
        source: ``proxy``, ``transport`` or ``synthetic``.
        keys: the pool's keys as ``KeySpec``-like dicts (only :data:`KEY_FIELDS`
            are kept), or empty when unknown.
        scenario: for synthetic traces, the scenario's name.
        options: ``PoolConfig`` options the traffic ran with (optional).
        wall_start: the Unix time of the trace's t = 0 when it was recorded
            (optional; recorded mode reads absolute rate-limit resets against
            ``wall_start + t``, else against 2026-01-01 00:00 UTC + t).
    """

    source: str = "synthetic"
    keys: list[dict[str, Any]] = attrs.field(factory=list, converter=_key_dicts)
    scenario: str | None = None
    options: dict[str, Any] = attrs.field(factory=dict)
    wall_start: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The header as a JSON object (line 1 of a trace)."""
        data: dict[str, Any] = {
            "type": "header",
            "format": FORMAT,
            "version": VERSION,
            "source": self.source,
            "keys": [_clean_key(k, f"keys[{i}]") for i, k in enumerate(self.keys)],
        }
        if self.scenario is not None:
            data["scenario"] = self.scenario
        if self.options:
            data["options"] = dict(sorted(self.options.items()))
        if self.wall_start is not None:
            data["wall_start"] = round(self.wall_start, 6)
        return data

    @classmethod
    def from_json(cls, data: object, where: str = "header") -> TraceHeader:
        """Build from a JSON object, checking the format and version."""
        if not isinstance(data, dict):
            raise TraceError(f"{where}: expected an object, got {_kind(data)}")
        if data.get("type") != "header" or data.get("format") != FORMAT:
            raise TraceError(
                f"{where}: not a keyrotor trace (line 1 must be "
                f'{{"type": "header", "format": "{FORMAT}", ...}})'
            )
        if not _is_int(data.get("version")) or data.get("version") != VERSION:
            raise TraceError(
                f"{where}.version: this keyrotor reads version {VERSION}, "
                f"got {data.get('version')!r}"
            )
        source = data.get("source")
        if source not in SOURCES:
            raise TraceError(
                f"{where}.source: expected one of {', '.join(SOURCES)}, got {source!r}"
            )
        keys = data.get("keys", [])
        if not isinstance(keys, list):
            raise TraceError(f"{where}.keys: expected a list, got {_kind(keys)}")
        options = data.get("options", {})
        if not isinstance(options, dict):
            raise TraceError(f"{where}.options: expected an object, got {_kind(options)}")
        for name, value in options.items():
            if not (value is None or isinstance(value, bool | str) or finite(value)):
                raise TraceError(
                    f"{where}.options.{name}: expected a finite number, a string, true, false "
                    f"or null, got {_short(value)}"
                )
        wall_start = data.get("wall_start")
        if wall_start is not None:
            wall_start = _number(data, "wall_start", where)
        return cls(
            source=source,
            keys=[_clean_key(k, f"{where}.keys[{i}]") for i, k in enumerate(keys)],
            scenario=_optional_str(data, "scenario", where),
            options=options,
            wall_start=wall_start,
        )


def _clean_key(key: object, where: str) -> dict[str, Any]:
    if isinstance(key, str):
        key = {"key_id": key}
    if not isinstance(key, dict):
        raise TraceError(f"{where}: expected an object with key_id, got {_kind(key)}")
    _check_alias(key.get("key_id"), f"{where}.key_id")
    kept = {name: key[name] for name in KEY_FIELDS if key.get(name) is not None}
    account = kept.get("account")
    if account is not None:
        _check_alias(account, f"{where}.account")
    for name in ("weight", "rpm", "tpm", "credits", "budget", "budget_window", "max_in_flight"):
        value = kept.get(name)
        if value is not None and (not finite(value) or value < 0):
            raise TraceError(f"{where}.{name}: expected a non-negative number, got {_short(value)}")
    return kept


@attrs.define(slots=True)
class Trace:
    """A whole trace in memory: the header and the records sorted by arrival."""

    header: TraceHeader
    records: list[TraceRecord]

    @property
    def duration(self) -> float:
        """Arrival time of the last request (0 for an empty trace)."""
        return self.records[-1].t if self.records else 0.0

    def write(self, path: str | os.PathLike[str] | IO[str]) -> None:
        """Write the trace as JSON lines."""
        with TraceWriter(path, self.header) as writer:
            for record in self.records:
                writer.write(record)


def refuse_overwrite(path: str | os.PathLike[str]) -> str | None:
    """Why a trace must not be written at ``path`` (None: it may): an existing,
    non-empty regular file whose first line is not a trace's header (a state
    file, a configuration file, ...) would be overwritten. A trace may replace
    an earlier trace."""
    try:
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            return None
        with open(path, "rb") as file:
            first = file.readline(4096)
    except (OSError, ValueError):
        return None  # opening it for writing reports the problem
    if _HEADER_START.match(first):  # a long header (many keys) is cut by the readline
        return None
    try:
        header = json.loads(first)
    except (ValueError, RecursionError):
        header = None
    if (
        isinstance(header, dict)
        and header.get("type") == "header"
        and header.get("format") == FORMAT
    ):
        return None
    return "exists and is not a keyrotor trace: it would be overwritten"


_HEADER_START = re.compile(rb'\{\s*"type"\s*:\s*"header"\s*,\s*"format"\s*:\s*"keyrotor-trace"')


class TraceWriter:
    """Appends records to a trace file, one line each, from any thread.

    The header is written when the writer opens. Each ``write`` is one
    line-buffered write under a lock, so a crash loses at most the line being
    written. Use as a context manager, or call ``close()``.

    ``hash_labels=True`` replaces sessions and groups by :func:`hash_label`
    under a random key drawn per writer (they are the caller's own labels and
    may identify people); ``label_key`` fixes that key instead. A session,
    group, route or model longer than :data:`MAX_LABEL` characters (which
    readers refuse) is written as :func:`shorten_label` of it.
    """

    def __init__(
        self,
        target: str | os.PathLike[str] | IO[str],
        header: TraceHeader | None = None,
        *,
        hash_labels: bool = False,
        label_key: bytes | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._hash = hash_labels
        self._label_key = os.urandom(16) if label_key is None else label_key
        if isinstance(target, str | os.PathLike):
            problem = refuse_overwrite(target)
            if problem is not None:
                raise FileExistsError(errno.EEXIST, problem, os.fspath(target))
            self._file: IO[str] = open(target, "w", encoding="utf-8", buffering=1)  # noqa: SIM115
            self._owned = True
        else:
            self._file = target
            self._owned = False
        self._closed = False
        self._file.write(_dumps((header or TraceHeader()).to_json()) + "\n")
        self.written = 0

    def write(self, record: TraceRecord) -> None:
        """Write one record (thread-safe)."""
        data = record.to_json()
        if self._hash:
            for name in ("session", "group"):
                if name in data:
                    data[name] = hash_label(data[name], self._label_key)
        for name in _LABELS:
            value = data.get(name)
            if value is not None and len(value) > MAX_LABEL:
                data[name] = shorten_label(value, self._label_key)
        line = _dumps(data) + "\n"
        with self._lock:
            if self._closed:
                raise ValueError("the trace writer is closed")
            self._file.write(line)
            self.written += 1

    def close(self) -> None:
        """Flush and close (the file only if the writer opened it). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._file.flush()
            if self._owned:
                self._file.close()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lines(source: str | os.PathLike[str] | IO[str] | Iterable[str]) -> Iterator[str]:
    if isinstance(source, str | os.PathLike):
        try:
            with open(source, encoding="utf-8") as file:
                yield from file
        except OSError as exc:
            raise TraceError(f"{os.fspath(source)}: cannot read ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise TraceError(f"{os.fspath(source)}: not UTF-8 text") from None
    else:
        yield from source


def _name(source: object) -> str:
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    return getattr(source, "name", "<trace>") if not isinstance(source, list) else "<trace>"


def _parse(line: str, where: str) -> object:
    try:
        return json.loads(line)
    except ValueError as exc:
        raise TraceError(f"{where}: not valid JSON ({exc})") from None
    except RecursionError:
        raise TraceError(
            f"{where}: nested too deeply (a trace line is a flat object; fix the writer)"
        ) from None


def read_header(
    source: str | os.PathLike[str] | IO[str] | Iterable[str], *, name: str | None = None
) -> TraceHeader:
    """The header of a trace."""
    name = name or _name(source)
    for line in _lines(source):
        return TraceHeader.from_json(_parse(line, f"{name}:1"), f"{name}:1")
    raise TraceError(f"{name}: empty file (line 1 must be the trace header)")


def read_trace(
    source: str | os.PathLike[str] | IO[str] | Iterable[str], *, name: str | None = None
) -> Iterator[TraceRecord]:
    """The records of a trace, in file order, checked line by line.

    A bad line raises ``TraceError`` naming ``file:line`` and the field. Blank
    lines are skipped. The header is checked but not returned (see
    :func:`read_header`, :func:`load_trace`).
    """
    name = name or _name(source)
    lineno = 0
    for lineno, line in enumerate(_lines(source), 1):
        where = f"{name}:{lineno}"
        if lineno == 1:
            TraceHeader.from_json(_parse(line, where), where)
            continue
        if not line.strip():
            continue
        yield TraceRecord.from_json(_parse(line, where), where)
    if lineno == 0:
        raise TraceError(f"{name}: empty file (line 1 must be the trace header)")


def load_trace(source: str | os.PathLike[str] | IO[str] | Iterable[str]) -> Trace:
    """A whole trace: the header and the records sorted by arrival (stable)."""
    name = _name(source)
    lines = list(_lines(source))
    header = read_header(lines, name=name)
    records = list(read_trace(lines, name=name))
    records.sort(key=_arrival)
    return Trace(header, records)


def _arrival(record: TraceRecord) -> float:
    return record.t


def _dumps(data: object) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _required(data: dict[str, Any], name: str, where: str) -> Any:
    if name not in data:
        raise TraceError(f"{where}.{name}: missing")
    return data[name]


def _unknown(data: dict[str, Any], known: Iterable[str], where: str) -> None:
    extra = sorted(set(data) - set(known))
    if extra:
        raise TraceError(
            f"{where}.{extra[0]}: unknown field (prompt text and secrets never belong in a trace)"
        )


def _number(data: dict[str, Any], name: str, where: str, default: float | None = None) -> float:
    if name not in data and default is not None:
        return default
    value = _required(data, name, where)
    if not finite(value) or value < 0:
        raise TraceError(f"{where}.{name}: expected a non-negative number, got {_short(value)}")
    return float(value)


MAX_COUNT: Final = 2**53
"""The largest token count a trace may hold (exact as a float)."""


def _count(data: dict[str, Any], name: str, where: str) -> int:
    value = data.get(name, 0)
    if not _is_int(value) or not 0 <= value <= MAX_COUNT:
        raise TraceError(
            f"{where}.{name}: expected a non-negative integer (at most 2**53), got {_short(value)}"
        )
    return int(value)


def _short(value: object) -> str:
    """``repr(value)``, cut to 40 characters (a 400-digit number stays one short line)."""
    if isinstance(value, int) and not -(10**30) < value < 10**30:
        return "a huge integer"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _optional_str(data: dict[str, Any], name: str, where: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise TraceError(
            f"{where}.{name}: expected a string (at most {MAX_LABEL} characters) or null, "
            f"got {_kind(value)}"
        )
    if value is not None and len(value) > MAX_LABEL:
        raise TraceError(
            f"{where}.{name}: expected a string of at most {MAX_LABEL} characters, got "
            f"{len(value):,} characters (keyrotor's writers shorten longer labels; fix the writer)"
        )
    return value
