"""Recording live traffic as a trace: what a transport's driver sees, one line per request.

A ``TraceRecorder`` watches every event the driver feeds the pool and every
decision that comes back, and writes one ``TraceRecord`` when a request ends:
its arrival, model and streaming flag (read from the request body's ``model``
and ``stream`` fields, nothing else of it), session and group, each attempt's
key, status or failure, latency and allow-listed rate-limit headers, the error
body's machine code, and the tokens and cost of the delivered answer. Never a
prompt, never a secret: keys appear by alias.

Attach one with ``Client(..., record="traffic.jsonl")`` or ``keyrotor serve
--record FILE``. Times come from the driver's monotonic clock, relative to the
recorder's start.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import attrs

from ..core import (
    Decision,
    Deliver,
    Event,
    PoolConfig,
    Reject,
    RequestCancelled,
    RequestStarted,
    ResponseFinished,
    ResponseReceived,
    Send,
    TransportFailed,
)
from .trace import (
    KEY_FIELDS,
    Attempt,
    TraceHeader,
    TraceRecord,
    TraceWriter,
    clean_code,
    clean_headers,
)

__all__ = ["TraceRecorder", "error_code", "header_options"]

_KEY_FIELDS = tuple(name for name in KEY_FIELDS if name != "key_id")
# The replay runs the policies and the seed it is given, on keys of its own:
# every other PoolConfig option is recorded when it is not the default.
_NOT_REPLAYED = frozenset({"keys", "policy", "seed"})


def header_options(config: PoolConfig) -> dict[str, Any]:
    """The options a trace header records for ``config``: its policy (for
    information) and every option replay applies that is not the default, so a
    replay runs the pool the way the traffic ran."""
    options: dict[str, Any] = {"policy": config.policy}
    for field in attrs.fields(PoolConfig):
        if field.name in _NOT_REPLAYED:
            continue
        value = getattr(config, field.name)
        if not (value is None or isinstance(value, bool | int | float | str)):
            continue  # not a JSON scalar: nothing a trace header can hold
        if value != field.default or type(value) is not type(field.default):
            options[field.name] = value
    return options


def error_code(body: Any) -> str | None:
    """The machine code of an error body: OpenRouter's ``metadata.limit_source``,
    else ``error.code`` or ``error.type``, when it is a short code without
    spaces (never a message, which may name people or quote a prompt)."""
    if isinstance(body, bytes | str):
        try:
            body = json.loads(body)
        except (ValueError, RecursionError):  # not JSON, or nested too deeply
            return None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None
    metadata = error.get("metadata")
    if isinstance(metadata, dict) and clean_code(metadata.get("limit_source")):
        return str(metadata["limit_source"])
    for name in ("code", "type"):
        value = error.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if clean_code(value):
            return str(value)
    return None


class _Open:
    """A request on its way: what the trace record will say."""

    __slots__ = ("arrival", "delivered_at", "record", "sent_at")

    def __init__(self, event: RequestStarted, origin: float) -> None:
        self.arrival = event.now
        self.record = TraceRecord(
            t=event.now - origin, session=event.session, group=event.group, outcome="error"
        )
        self.sent_at = event.now
        self.delivered_at: float | None = None


class TraceRecorder:
    """Turns a driver's events and decisions into trace records.

    ``describe(body)`` with a request's body just before its ``RequestStarted``
    is handled, ``observe(event, decisions)`` after every ``Pool.handle``,
    ``close`` at the end. ``origin`` is the driver's clock at the trace's
    t = 0, ``wall_start`` the Unix time then (default: now, as the recorder
    is made when ``origin`` is read); the header keeps it, so a replay reads
    the recorded absolute rate-limit resets on the recording's own clock.
    Not thread-safe on its own: the driver calls it under its own lock.
    """

    def __init__(
        self,
        target: str | os.PathLike[str] | TraceWriter,
        config: PoolConfig,
        origin: float,
        source: str = "transport",
        hash_labels: bool = True,
        wall_start: float | None = None,
    ) -> None:
        if isinstance(target, TraceWriter):
            self.writer = target
        else:
            keys = [
                {"key_id": spec.key_id}
                | {n: getattr(spec, n) for n in _KEY_FIELDS if getattr(spec, n) is not None}
                for spec in config.keys
            ]
            header = TraceHeader(
                source=source,
                keys=keys,
                options=header_options(config),
                wall_start=time.time() if wall_start is None else wall_start,
            )
            self.writer = TraceWriter(target, header, hash_labels=hash_labels)
        self._origin = origin
        self._open: dict[str, _Open] = {}
        self._next: tuple[str | None, bool] = (None, False)  # the next request's model, stream
        self._route: str | None = None  # and its route

    def describe(self, body: bytes | None, route: str | None = None) -> None:
        """Note the model and the streaming flag of the next request's JSON body,
        and the route that chose that model."""
        self._next = (None, False)
        self._route = route
        if not body or b'"model"' not in body:
            return
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):  # not JSON, or nested too deeply
            return
        if isinstance(payload, dict):
            model = payload.get("model")
            ok = isinstance(model, str) and len(model) <= 256 and model.isprintable()
            self._next = (model if ok else None, payload.get("stream") is True)

    def observe(self, event: Event, decisions: Sequence[Decision]) -> None:
        """One ``Pool.handle`` call: the event, then the decisions it gave."""
        if isinstance(event, RequestStarted):
            opened = self._open[event.request_id] = _Open(event, self._origin)
            opened.record.model, opened.record.stream = self._next
            opened.record.route = self._route
            self._next, self._route = (None, False), None
        elif isinstance(event, ResponseReceived | TransportFailed):
            self._answered(event)
        elif isinstance(event, ResponseFinished):
            pending = self._open.get(event.request_id)
            if pending is not None:
                record = pending.record
                record.prompt_tokens = event.prompt_tokens
                record.completion_tokens = event.completion_tokens
                record.cost = event.cost if math.isfinite(event.cost) else None
                if record.attempts and pending.delivered_at is not None:
                    record.attempts[-1].duration = event.now - pending.delivered_at
                self._end(event.request_id, "delivered")
        elif isinstance(event, RequestCancelled):
            pending = self._open.get(event.request_id)
            if pending is not None:
                pending.record.cancel_after = event.now - pending.arrival
                self._end(event.request_id, "cancelled")
        for decision in decisions:
            if isinstance(decision, Send):
                pending = self._open.get(decision.request_id)
                if pending is not None:
                    pending.sent_at = event.now
                    pending.record.attempts.append(
                        Attempt(key=decision.key_id, t=event.now - pending.arrival, status=None)
                    )
            elif isinstance(decision, Deliver):
                pending = self._open.get(decision.request_id)
                if pending is not None:
                    pending.delivered_at = event.now
            elif isinstance(decision, Reject):
                self._end(decision.request_id, "rejected")

    def _answered(self, event: ResponseReceived | TransportFailed) -> None:
        """An attempt's answer, or its failure (before or after delivery)."""
        pending = self._open.get(event.request_id)
        if pending is None or not pending.record.attempts:
            return
        attempt = pending.record.attempts[-1]
        if isinstance(event, ResponseReceived):
            attempt.status = event.status
            attempt.latency = event.now - pending.sent_at
            attempt.headers = clean_headers(event.headers)
            if event.status >= 400:
                attempt.error = error_code(event.body)
        elif pending.delivered_at is None:
            attempt.status, attempt.reason = None, event.reason
            attempt.latency = event.now - pending.sent_at
        else:  # the delivered body broke off
            attempt.duration = event.now - pending.delivered_at
            self._end(event.request_id, "error")

    def close(self) -> None:
        """Write what is still open as cancelled (the client is closing) and close."""
        for request_id in list(self._open):
            self._end(request_id, "cancelled")
        self.writer.close()

    def _end(self, request_id: str, outcome: str) -> None:
        pending = self._open.pop(request_id, None)
        if pending is None:
            return
        record = pending.record
        record.outcome = outcome  # type: ignore[assignment]
        if outcome == "delivered" and record.attempts:
            final = record.attempts[-1]
            if final.status is None:
                final.status = 200
            elif final.status >= 400:  # an error answer, delivered as such
                record.outcome = "error"
        self.writer.write(record)
