"""What every transport shares: the pool, the secrets, and the routing of decisions.

``Driver`` is synchronous and does no I/O. Each transport wraps it with its
own way to wait (trio/asyncio events, threading conditions) and its own HTTP
client; everything that can be decided here is decided here, once.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Container, Generator, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from ..core import (
    AttemptHeld,
    Decision,
    Deliver,
    Event,
    KeyAdded,
    KeyMarked,
    KeyRemoved,
    KeySpec,
    KeyState,
    KeyStateChanged,
    KeyStatistics,
    Pool,
    PoolConfig,
    Probe,
    ProbeFinished,
    ProbeRequested,
    Reject,
    RequestCancelled,
    Send,
    Tick,
    TransportFailed,
    request_started,
    response_finished,
    response_received,
)
from ..core.classify import LIMIT_HEADER_PREFIXES
from ..core.config import finite, shown
from ._http import answer_error, error_status, number, parse_json
from .errors import ConfigurationError
from .json_body import parse

if TYPE_CHECKING:
    from ..replay.record import TraceRecorder

__all__ = [
    "OPENROUTER_URL",
    "Driver",
    "Slot",
    "StreamAccountant",
    "keys_from_env",
    "mask",
    "usage_of",
    "valid_secret",
]

OPENROUTER_URL = "https://openrouter.ai/api/v1"

Routed = Send | Deliver | Reject

STATUS_STEP = 500
"""Keys per step of ``Driver.status_steps`` (a few ms of the event loop)."""


def mask(secret: str) -> str:
    """A short form of a secret that is safe to show: ``sk-or-v1-…1a2b``.

    At most the prefix up to the last dash of the first 10 characters (the
    key's kind, as ``sk-or-v1-``) and the last 4; nothing of a short secret."""
    if len(secret) < 20:
        return "…"
    start = secret[:10]
    head = start[: start.rfind("-") + 1] if "-" in start else secret[:3]
    return f"{head}…{secret[-4:]}"


def valid_secret(secret: str) -> bool:
    """Whether ``secret`` can be sent as a key: printable ASCII, no space (a
    zero-width space pasted with it, a NUL or DEL from a padded file cannot
    travel in an ``Authorization`` header)."""
    return bool(secret) and secret.isascii() and secret.isprintable() and " " not in secret


def _check_request_options(pin: object, session: object, group: object, timeout: object) -> None:
    """A caller's per-request options, checked before the pool hears of the
    request (``ConfigurationError``: a wrong type reached the core half-way)."""
    if pin is not None and (isinstance(pin, bool) or not isinstance(pin, str | int)):
        raise ConfigurationError(f"pin must be a key's alias or index, got {shown(pin)}")
    for name, value in (("session", session), ("group", group)):
        if value is not None and not isinstance(value, str):
            raise ConfigurationError(f"{name} must be a string, got {shown(value)}")
    if timeout is not None and (not finite(timeout) or timeout < 0):
        raise ConfigurationError(
            f"timeout must be a finite number of seconds, 0 or more, got {shown(timeout)}"
        )


def keys_from_env(environ: Mapping[str, str]) -> list[str]:
    """Secrets named the seeds' way: ``OPENROUTER_KEYS`` (comma-separated),
    ``OPENROUTER_API_KEY``, ``OPENROUTER_API_KEY_1`` .. ``_N``; duplicates dropped."""
    found: list[str] = []
    found += [k.strip() for k in environ.get("OPENROUTER_KEYS", "").split(",")]
    found.append(environ.get("OPENROUTER_API_KEY", "").strip())
    numbered = sorted(
        (int(name.rsplit("_", 1)[1]), value.strip())
        for name, value in environ.items()
        if name.startswith("OPENROUTER_API_KEY_") and name.rsplit("_", 1)[1].isdigit()
    )
    found += [value for _, value in numbered]
    unique = list(dict.fromkeys(k for k in found if k))
    if not unique:
        raise ConfigurationError(
            "no API keys in the environment: set OPENROUTER_KEYS (comma-separated), "
            "OPENROUTER_API_KEY, or OPENROUTER_API_KEY_1, _2, ..."
        )
    return unique


class Slot:
    """One request's mailbox: the decisions routed to it, in order.

    ``wake`` is the transport's way to rouse the waiting task or thread; it is
    called with the driver's lock held (if any) and must not block.
    """

    __slots__ = ("body", "decisions", "tokens", "wake")

    def __init__(
        self, wake: Callable[[], None], body: bytes | None = None, tokens: int = 0
    ) -> None:
        self.decisions: deque[Routed] = deque()
        self.wake = wake
        self.body = body  # kept for ``Driver.price`` only
        self.tokens = tokens  # the request's estimate, for ``Driver.gate``


class Gate(Protocol):
    """Limits kept outside the pool (the proxy's, shared with its other
    processes through Redis: ``keyrotor.adapters.shared_limits``). Before an
    attempt on a key in ``limited``, the async client asks ``admit``: None
    sends it, a number of seconds holds the key that long (``AttemptHeld``)
    and the pool decides again. ``release`` hears of every request's end, and
    of each attempt that ended without an answer to deliver (failover)."""

    @property
    def limited(self) -> Container[str]: ...

    async def admit(self, request_id: str, key_id: str, tokens: int) -> float | None: ...

    def release(self, request_id: str) -> None: ...

    def key_added(self, spec: KeySpec) -> None: ...


class Driver:
    """The pool plus the bookkeeping every transport needs.

    ``feed`` hands an event to the pool and routes each decision: request
    decisions to the request's ``Slot``, probes to ``probes``, state changes to
    the ``on_state_change`` callbacks (one that raises is said to
    ``on_recording_error``; the other decisions are routed all the same).
    ``on_finished`` hears of each delivered
    body's end (the key and its usage, for a spend ledger). ``deadline_changed``
    tells the timer task to look at ``next_deadline()`` again.

    ``price`` (None: off) prices an answer whose ``usage`` reports no cost
    (OpenAI-compatible upstreams): called with the request's body and that
    ``usage``, it returns USD (or None: unknown), which then counts toward
    the key's budget and reaches ``on_finished`` as the accountant's ``cost``
    (a hook that raises leaves the cost at 0, said to ``on_recording_error``).
    ``keyrotor.models.pricer(catalog)`` makes one from a model catalog.
    """

    def __init__(
        self,
        keys: Mapping[str, str] | Iterable[str],
        config: PoolConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        secrets = _aliases(keys, empty_ok=config is not None)
        if config is None:
            config = PoolConfig(keys=[KeySpec(key_id=alias) for alias in secrets])
        configured = {spec.key_id for spec in config.keys}
        if configured != set(secrets):
            raise ConfigurationError(
                "the PoolConfig's key ids and the secrets' aliases differ: "
                f"config has {sorted(configured)}, secrets have {sorted(secrets)}"
            )
        self.secrets: dict[str, str] = dict(secrets)
        self.pool = Pool(config)
        self.clock = clock
        self.wall_clock = wall_clock
        self.slots: dict[str, Slot] = {}
        self.probes: deque[Probe] = deque()
        self.on_state_change: list[Callable[[KeyStateChanged], None]] = []
        self.on_finished: list[Callable[[str, StreamAccountant], None]] = []
        self.price: Callable[[bytes | None, Mapping[str, Any]], float | None] | None = None
        self.recorder: TraceRecorder | None = None  # keyrotor.replay.record
        self.on_recording_error: Callable[[str], None] = _warn
        self.gate: Gate | None = None  # limits shared with other processes (async client)
        self.deadline_changed: Callable[[], None] = _nothing
        self.probe_ready: Callable[[], None] = _nothing
        self._ids = itertools.count(1)
        self._deadline: float | None = None

    # -------------------------------------------------------------- events

    def now(self) -> float:
        """The driver's clock, never behind the pool's (clocks can be coarse)."""
        now = self.clock()
        pool_now = self.pool.now
        return pool_now if now < pool_now else now

    def feed(self, event: Event) -> list[Decision]:
        """Hand ``event`` to the pool and route the decisions."""
        decisions = self.pool.handle(event)
        if self.recorder is not None:
            self._record(self.recorder.observe, event, decisions)
        for decision in decisions:
            if isinstance(decision, (Send, Deliver, Reject)):
                slot = self.slots.get(decision.request_id)
                if slot is not None:
                    slot.decisions.append(decision)
                    slot.wake()
            elif isinstance(decision, Probe):
                self.probes.append(decision)
                self.probe_ready()
            else:
                for callback in self.on_state_change:
                    try:
                        callback(decision)
                    except Exception as exc:  # a hook's bug must not lose the decisions
                        name = type(exc).__name__
                        self.on_recording_error(f"keyrotor: an on_state_change hook failed: {name}")
        deadline = self.pool.next_deadline()
        if deadline != self._deadline:
            self._deadline = deadline
            self.deadline_changed()
        return decisions

    def open(
        self,
        wake: Callable[[], None],
        *,
        pin: str | int | None = None,
        pin_fallback: bool = True,
        session: str | None = None,
        group: str | None = None,
        timeout: float | None = None,
        tokens: int = 0,
        body: bytes | None = None,
        attempts: int | None = None,
        route: str | None = None,
    ) -> tuple[str, Slot]:
        """Start a request: a fresh id, its slot, and the pool told about it
        (``body`` and ``route`` only for a recorder, which notes the model)."""
        if pin is not None or session is not None or group is not None or timeout is not None:
            _check_request_options(pin, session, group, timeout)
        request_id = f"q{next(self._ids)}"
        slot = Slot(wake, body if self.price is not None else None, tokens)
        self.slots[request_id] = slot
        now = self.now()
        deadline = None if timeout is None else now + timeout
        if self.recorder is not None:
            self._record(self.recorder.describe, body, route)
        try:
            self.feed(
                request_started(
                    request_id, now, pin, pin_fallback, session, group, deadline, tokens, attempts
                )
            )
        except BaseException:
            del self.slots[request_id]
            raise
        return request_id, slot

    def close(self, request_id: str, *, ended: bool) -> None:
        """The caller is done with the request. If the pool still holds it
        (``ended`` is False: cancelled, timed out, an error), say so."""
        self.slots.pop(request_id, None)
        if self.gate is not None:
            self.gate.release(request_id)
        if not ended:
            self.feed(RequestCancelled(request_id=request_id, now=self.now()))

    def received(
        self,
        request_id: str,
        attempt: int,
        status: int,
        headers: dict[str, str] | None,
        body: bytes | None,
    ) -> Deliver | None:
        """An attempt's status and headers (and error body) arrived. Returns the
        ``Deliver`` of that attempt, taken from the slot, when the pool hands the
        response to the caller; None when it failed over or the request waits
        (the next decision comes to the slot)."""
        if 200 <= status < 300 and not _limit_headers(headers):
            headers = None  # nothing for the core to classify: its fast path
        self.feed(
            response_received(request_id, self.now(), status, headers, body, self.wall_clock())
        )
        slot = self.slots.get(request_id)
        if slot is not None and slot.decisions:
            decision = slot.decisions[0]
            if isinstance(decision, Deliver) and decision.attempt == attempt:
                slot.decisions.popleft()
                return decision
        return None

    def secret_for(self, request_id: str, send: Send) -> str | None:
        """The secret to carry out ``send`` with; None when its key was removed
        after the pool chose it (the attempt is then failed over to another key)."""
        secret = self.secrets.get(send.key_id)
        if secret is None:
            self.failed(request_id, "key_removed")
        return secret

    def held(self, request_id: str, wait: float) -> None:
        """``Gate.admit`` held the attempt's key for ``wait`` seconds."""
        now = self.now()
        self.feed(AttemptHeld(request_id=request_id, now=now, until=now + max(wait, 0.001)))

    def failed(self, request_id: str, reason: str) -> None:
        """An attempt got no answer (``reason``: ``connect``, ``timeout``, ...)."""
        self.feed(TransportFailed(request_id=request_id, now=self.now(), reason=reason))

    def finish(
        self,
        request_id: str,
        key_id: str,
        accountant: StreamAccountant,
        failure: str | None = None,
    ) -> None:
        """The delivered body (served by ``key_id``) ended, its usage in
        ``accountant``, or broke off (``failure``, a ``TransportFailed``
        reason); the request is done. ``on_finished`` callbacks hear of a
        body that ended, after the pool: a hook that raises is said to
        ``on_recording_error``, and whatever fails here, the pool hears that the
        request ended (a request left in flight would hold its key for good)."""
        told = False
        try:
            if failure is None:
                a = accountant
                if self.price is not None and a.usage is not None and not a.priced:
                    self._price(request_id, a)
                self.feed(
                    response_finished(
                        request_id,
                        self.now(),
                        a.cost,
                        a.prompt_tokens,
                        a.completion_tokens,
                        a.error_status,
                        a.error_body,
                        None if a.error_status is None else self.wall_clock(),
                    )
                )
                told = True
                for callback in self.on_finished:
                    try:
                        callback(key_id, a)
                    except Exception as exc:
                        name = type(exc).__name__
                        self.on_recording_error(f"keyrotor: an on_finished hook failed: {name}")
            else:
                self.failed(request_id, failure)
                told = True
        finally:
            if not told:
                with contextlib.suppress(Exception):  # (what failed is raised to the caller)
                    self.feed(RequestCancelled(request_id=request_id, now=self.now()))
            self.close(request_id, ended=True)

    def _price(self, request_id: str, accountant: StreamAccountant) -> None:
        """``accountant.cost`` from ``price`` (left as it is when that fails)."""
        assert self.price is not None and accountant.usage is not None
        slot = self.slots.get(request_id)
        usage = accountant.usage
        if accountant.web_searches and "server_tool_use" not in usage:  # the Responses API's
            usage = {**usage, "server_tool_use": {"web_search_requests": accountant.web_searches}}
        try:
            cost = self.price(None if slot is None else slot.body, usage)
        except Exception as exc:
            self.on_recording_error(f"keyrotor: the price hook failed: {type(exc).__name__}")
            return
        if cost is not None and math.isfinite(cost) and 0 <= cost <= MAX_COST:
            accountant.cost = cost

    def probe_finished(
        self,
        key_id: str,
        status: int | None,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> None:
        """The answer to a ``Probe`` (``status=None``: none came)."""
        self.feed(
            ProbeFinished(
                key_id=key_id,
                now=self.now(),
                status=status,
                headers=headers,
                body=parse_json(body) if body else None,
                wall_time=self.wall_clock(),
            )
        )

    def next_deadline(self) -> float | None:
        """When the timer task should feed ``Tick``."""
        return self.pool.next_deadline()

    def wait_time(self) -> float:
        """Seconds the timer may sleep before ``tick()`` (``math.inf``: until
        woken by ``deadline_changed``; 0 or less: tick now)."""
        deadline = self.pool.next_deadline()
        return math.inf if deadline is None else deadline - self.now()

    def tick(self) -> None:
        """Time passed: feed ``Tick`` now."""
        self.feed(Tick(now=self.now()))

    def _record(self, method: Callable[..., None], *args: Any) -> None:
        """A recorder call; a failure (a full disk...) stops the recording, never
        the traffic, and is reported through ``on_recording_error``."""
        try:
            method(*args)
        except Exception as exc:
            recorder, self.recorder = self.recorder, None
            message = f"recording stopped: {type(exc).__name__}: {exc}"
            with contextlib.suppress(Exception):
                if recorder is not None:
                    recorder.writer.close()
            self.on_recording_error(message)

    # ------------------------------------------------------ keys at runtime

    def check_new_key(self, alias: str, secret: str) -> None:
        """Raise ``ConfigurationError`` unless ``add_key`` would take this key."""
        if alias in self.secrets or self.pool.key_spec(alias) is not None:
            raise ConfigurationError(
                f"a key with alias {alias!r} is already in the pool (or still finishing its "
                "requests after its removal: try again when they have ended)"
            )
        _aliases({alias: secret}, empty_ok=False)  # the secret's own checks
        for owner, known in self.secrets.items():
            if known == secret:
                raise ConfigurationError(f"this secret is already in the pool as {owner!r}")

    def add_key(self, secret: str, spec: KeySpec) -> None:
        """Add a key (``spec.key_id`` is its alias) to the running pool."""
        self.check_new_key(spec.key_id, secret)
        self.feed(KeyAdded(now=self.now(), key=spec))
        self.secrets[spec.key_id] = secret
        if self.gate is not None:
            self.gate.key_added(spec)

    def remove_key(self, alias: str) -> None:
        """Remove a key: its requests in flight finish, no new ones start."""
        self._known(alias)
        self.feed(KeyRemoved(now=self.now(), key_id=alias))
        del self.secrets[alias]

    def mark_key(
        self, alias: str, state: KeyState, duration: float | None = None, reason: str = "operator"
    ) -> None:
        """Set a key's state (``duration``: seconds until it may be used again)."""
        self._known(alias)
        now = self.now()
        until = None if duration is None else now + duration
        self.feed(KeyMarked(now=now, key_id=alias, state=state, until=until, reason=reason))

    def probe_keys(self, alias: str | None = None) -> None:
        """Probe one key, or every key that is not disabled."""
        if alias is not None:
            self._known(alias)
        self.feed(ProbeRequested(now=self.now(), key_id=alias))

    def _known(self, alias: str) -> None:
        if alias not in self.secrets:
            raise ConfigurationError(f"no key with alias {alias!r} in the pool")

    # -------------------------------------------------------------- status

    def status(self, keys: Container[str] | None = None) -> dict[str, Any]:
        """The JSON-able picture of the pool the proxy also serves (``keys``:
        only those aliases' entries under ``"keys"``; the totals stay the pool's)."""
        steps = self.status_steps(keys)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                picture: dict[str, Any] = done.value
                return picture

    def status_steps(
        self, keys: Container[str] | None = None
    ) -> Generator[None, None, dict[str, Any]]:
        """``status(keys)`` made ``STATUS_STEP`` keys at a time: the generator
        yields between steps (an async caller lets other tasks run there) and
        returns the picture. Each entry is its key as of its step (a key
        removed meanwhile is left out); the health counts and success rate are
        the entries', the request counters and ``totalCost`` (removed keys'
        spend included) the pool's at the end."""
        pool = self.pool
        ids = pool.key_ids(removing=True)
        health = {state.value: 0 for state in KeyState}
        entries = []
        answered = successes = 0
        for start in range(0, len(ids), STATUS_STEP):
            if start:
                yield
            now, wall = self.now(), self.wall_clock()
            for key_id in ids[start : start + STATUS_STEP]:
                key = pool.key_statistics(key_id)
                if key is None:
                    continue
                answered += key.successes + sum(key.errors.values())
                successes += key.successes
                if not key.removing:
                    health[key.state.value] += 1
                if keys is None or key_id in keys:
                    entries.append(self._entry(key, now, wall))
        stats = pool.statistics(keys=False)
        return {
            "totalKeys": sum(health.values()),
            "health": health,
            "stats": {
                "totalRequests": stats.started,
                "successRate": successes / answered if answered else None,
                "totalCost": stats.spend,
                "inFlight": stats.in_flight,
                "queued": stats.queued,
                "delivered": stats.delivered,
                "rejected": stats.rejected,
            },
            "keys": entries,
        }

    def key_entry(self, alias: str) -> dict[str, Any] | None:
        """One key's entry of ``status()["keys"]``, without the rest (a key
        being removed's included); ``None``: no such key."""
        key = self.pool.key_statistics(alias)
        return None if key is None else self._entry(key, self.now(), self.wall_clock())

    def _entry(self, key: KeyStatistics, now: float, wall: float) -> dict[str, Any]:
        item = key.to_json()
        item["alias"] = item.pop("key_id")
        item["masked"] = mask(self.secrets.get(key.key_id, ""))
        if key.until is not None:  # in seconds from now, and the wall clock's time
            del item["until"]
            left = max(key.until - now, 0.0)
            item["until_in"] = round(left, 3)
            item["until_wall"] = wall + left
        return item


def _limit_headers(headers: Mapping[str, str] | None) -> bool:
    """Whether a response's headers (lowercase names) say anything of its key's limits."""
    return headers is not None and any(name.startswith(LIMIT_HEADER_PREFIXES) for name in headers)


def _aliases(keys: Mapping[str, str] | Iterable[str], empty_ok: bool) -> dict[str, str]:
    """alias -> secret; plain secrets get aliases ``key1``, ``key2``, ...

    No keys is a mistake unless a ``PoolConfig`` says so (an empty pool that
    gets its keys at runtime, from an operator)."""
    if isinstance(keys, Mapping):
        pairs = dict(keys)
    else:
        secrets = list(keys)
        if any(not isinstance(s, str) for s in secrets):
            raise ConfigurationError("keys must be strings (the secrets) or an alias->secret map")
        pairs = {f"key{i}": secret for i, secret in enumerate(secrets, 1)}
    if not pairs and not empty_ok:
        raise ConfigurationError("no keys given: pass at least one API key")
    if len(set(pairs.values())) != len(pairs):
        raise ConfigurationError("the same secret is given twice")
    for alias, secret in pairs.items():
        if not isinstance(secret, str) or not valid_secret(secret):
            raise ConfigurationError(
                f"the secret for {alias!r} is empty or has whitespace, control or non-ASCII "
                "characters (a zero-width space pasted with it?): copy the key again"
            )
    return pairs


def _nothing() -> None:
    pass


def _warn(message: str) -> None:
    """``on_recording_error``'s default: a warning on the ``keyrotor`` logger (a
    hook's failure is never silent; the proxy sends it to its own log)."""
    logging.getLogger("keyrotor").warning("%s", message)


# ------------------------------------------------------------------ usage


def usage_of(payload: Any) -> tuple[float, int, int]:
    """(cost, prompt tokens, completion tokens) from a response or chunk's ``usage``.

    Chat Completions' ``prompt_tokens`` / ``completion_tokens``; else the
    Responses API's and Anthropic's ``input_tokens`` / ``output_tokens``, the
    prompt counting Anthropic's cache reads and writes too (its
    ``input_tokens`` leaves them out; OpenAI's include them), as
    ``keyrotor.models.cost.usage_cost`` prices them."""
    usage = payload.get("usage") if isinstance(payload, dict) else None
    if not isinstance(usage, dict):
        return 0.0, 0, 0
    cost = number(usage.get("cost"))
    cost = cost if cost is not None and 0 <= cost <= MAX_COST else 0.0
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        return cost, _tokens(usage.get("prompt_tokens")), _tokens(usage.get("completion_tokens"))
    prompt = (
        _tokens(usage.get("input_tokens"))
        + _tokens(usage.get("cache_read_input_tokens"))
        + _tokens(usage.get("cache_creation_input_tokens"))
    )
    return cost, min(prompt, MAX_TOKENS), _tokens(usage.get("output_tokens"))


MAX_TOKENS = 2**31 - 1
"""The most tokens one answer is counted for (an upstream's ``1e308`` is no count;
no model answers two billion: sums of such stay far inside SQLite's integers)."""
MAX_COST = 1e6
"""The most USD one answer is counted for (an upstream's ``1e306`` is no cost: a
day's sum of such overflowed to infinity in the state file, which then refused
to start the proxy)."""


def _tokens(value: Any) -> int:
    """A token count: a finite number from 0 to ``MAX_TOKENS``, else 0."""
    count = number(value)
    return int(count) if count is not None and 0 < count <= MAX_TOKENS else 0


_DECODER = json.JSONDecoder()


def _usage_object(body: bytes) -> Any:
    """The ``usage`` object of a JSON response body, found without parsing the
    whole body (a long completion's text comes before it)."""
    at = body.rfind(b'"usage"')
    if at < 0:
        return None
    start = body.find(b"{", at)
    if start < 0 or body[at + 7 : start].strip() != b":":
        return None
    try:
        value, _ = _DECODER.raw_decode(body[start:].decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):  # nested too deeply for the stack: bad input too
        return None
    return value


def _mention(data: bytes, name: bytes, start: int, end: int) -> int:
    """Where ``name`` (``b'"usage"'``, ``b'"error"'``) next appears in
    ``data[start:end]`` (-1: nowhere), passing over ``"usage":null`` and
    ``"error": null`` (each chunk of an OpenAI stream that asked for its usage
    carries the one; the Responses API's response object carries both,
    in its JSON and in its stream's first events: nothing to parse there)."""
    at = data.find(name, start, end)
    after = len(name)
    while at >= 0 and (
        data.startswith(b":null", at + after) or data.startswith(b": null", at + after)
    ):
        at = data.find(name, at + after + 5, end)
    return at


_USAGE = b'"usage"'
_ERROR = b'"error"'


def _event_usage(payload: dict[str, Any]) -> Any:
    """The ``usage`` an SSE event carries: at its top level (Chat Completions'
    last chunk, Anthropic's ``message_delta``), else in its ``response`` (the
    Responses API's ``response.completed``) or ``message`` (Anthropic's
    ``message_start``)."""
    usage = payload.get("usage")
    if usage is None:
        for name in ("response", "message"):
            inner = payload.get(name)
            if isinstance(inner, dict):
                usage = inner.get("usage")
                if usage is not None:
                    break
    return usage


class StreamAccountant:
    """Reads an SSE stream as it passes, for its usage and any in-stream error;
    or keeps a JSON body, for its usage (and an ``error`` a 200 may carry, at
    the top level or in a choice: OpenRouter's generation that failed
    midway) when it ends, parsed only when the body holds ``"error"``.

    Only ``data:`` lines that mention ``usage`` or ``error`` (not as
    ``"usage":null``, ``"error": null``) are parsed, found by substring
    searches per chunk (not a step per line). Lines end with LF, CRLF or a
    lone CR (SSE allows each).

    Read the same way: Chat Completions (``usage.prompt_tokens``,
    ``completion_tokens``, ``cost``); the Responses API (``usage.input_tokens``,
    ``output_tokens``; streamed, in ``response.completed``'s ``response``;
    failures in ``response.failed``'s ``response.error`` or an ``error``
    event); Anthropic's Messages API (``usage.input_tokens``,
    ``output_tokens``; streamed, ``message_start``'s ``message.usage``
    merged with ``message_delta``'s cumulative ``usage``; ``error`` events,
    their ``type`` mapped to a status by ``error_status``). Web searches:
    Anthropic's in ``usage.server_tool_use``; the Responses API's counted as
    the ``web_search_call`` items of the answer's ``output`` (for the price hook).
    """

    __slots__ = (
        "_body",
        "_size",
        "_sse",
        "_tail",
        "completion_tokens",
        "cost",
        "error_body",
        "error_status",
        "prompt_tokens",
        "usage",
        "web_searches",
    )

    MAX_JSON = 8 << 20
    """A JSON body is kept whole (to read its usage at the end) up to this
    size; past it, its last ``JSON_TAIL`` bytes (the usage is the last member)."""
    JSON_TAIL = 64 << 10
    MAX_LINE = 1 << 20
    """An SSE line longer than this is not read (nor kept while it grows)."""

    def __init__(self, content_type: str = "text/event-stream") -> None:
        self.cost = 0.0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.usage: dict[str, Any] | None = None  # the answer's ``usage`` (as sent)
        self.web_searches = 0  # the Responses API's: ``web_search_call`` items of its output
        self.error_status: int | None = None
        self.error_body: Any = None
        self._sse = "event-stream" in content_type.lower()  # (media types ignore case)
        self._tail = b""
        self._body: list[bytes] | None = None if self._sse else []
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        """Account the lines completed by ``chunk`` (or keep a JSON body)."""
        body = self._body
        if body is not None:
            body.append(chunk)
            self._size += len(chunk)
            if self._size > self.MAX_JSON:  # keep the end, where the usage is
                self._body = [b"".join(body)[-self.JSON_TAIL :]]
                self._size = self.JSON_TAIL
            return
        if not self._sse:
            return
        if b"\r" in chunk and b"\n" not in chunk:  # lines that end with a lone CR
            chunk = chunk.replace(b"\r", b"\n")  # (a CRLF cut in two: an empty line more)
        data = self._tail + chunk if self._tail else chunk
        end = data.rfind(b"\n") + 1  # the lines completed are data[:end]
        self._tail = data[end:] if len(data) - end <= self.MAX_LINE else b""
        # Only lines that mention usage or an error count: find those by searching
        # the whole block, not line by line (a stream has many lines, few such).
        usage = _mention(data, _USAGE, 0, end)
        error = _mention(data, _ERROR, 0, end)
        if usage < 0 and error < 0:
            return
        starts = set()
        while usage >= 0:
            starts.add(data.rfind(b"\n", 0, usage) + 1)
            usage = _mention(data, _USAGE, data.find(b"\n", usage, end), end)
        while error >= 0:
            starts.add(data.rfind(b"\n", 0, error) + 1)
            error = _mention(data, _ERROR, data.find(b"\n", error, end), end)
        for start in sorted(starts):
            self._line(data[start : data.find(b"\n", start, end)])

    def close(self) -> None:
        """The body ended: account a last line, or the JSON body's usage."""
        if self._body is not None:
            body = b"".join(self._body)
            self._body = None
            self._account(_usage_object(body))
            if b"web_search_call" in body and self.usage is not None:
                self.web_searches = body.count(b'"type":"web_search_call"') + body.count(
                    b'"type": "web_search_call"'
                )
            if _mention(body, _ERROR, 0, len(body)) >= 0:  # only then is the body parsed
                self._error(answer_error(parse_json(body)))
        elif self._tail:
            self._line(self._tail)
            self._tail = b""

    def _account(self, usage: Any, merge: bool = False) -> None:
        """Count ``usage`` (no object: none); ``merge``: over the one seen
        before (Anthropic's ``message_delta`` adds to ``message_start``'s)."""
        if not isinstance(usage, dict):
            self.cost, self.prompt_tokens, self.completion_tokens = 0.0, 0, 0
            self.usage = None
            return
        if merge and self.usage is not None:
            usage = {**self.usage, **{k: v for k, v in usage.items() if v is not None}}
        self.cost, self.prompt_tokens, self.completion_tokens = usage_of({"usage": usage})
        self.usage = usage

    @property
    def priced(self) -> bool:
        """The answer's ``usage`` reported its cost (OpenRouter's do): a finite
        number at least 0 (anything else is priced from the tokens)."""
        usage = self.usage
        cost = None if usage is None else number(usage.get("cost"))
        return cost is not None and cost >= 0

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:") or (b'"usage"' not in line and b'"error"' not in line):
            return
        try:
            payload = parse(line[5:])  # msgspec's decoder when installed: 3x json's here
        except ValueError:  # not JSON, not UTF-8, or nested too deeply
            return
        if not isinstance(payload, dict):
            return
        usage = _event_usage(payload)
        if isinstance(usage, dict):
            self._account(usage, merge=payload.get("type") == "message_delta")
            response = payload.get("response")
            if isinstance(response, dict) and isinstance(response.get("output"), list):
                self.web_searches = sum(
                    isinstance(item, dict) and item.get("type") == "web_search_call"
                    for item in response["output"]
                )
        self._error(answer_error(payload))

    def _error(self, error: Any) -> None:
        """An ``error`` object in a 200's body or chunk (``answer_error``): the
        answer failed (its status: ``error_status``)."""
        status = error_status(error)
        if status is not None:
            self.error_status = status
            self.error_body = {"error": error}
