"""Waiting requests and timers: the FIFO queue, deadlines, honest rejections."""

from __future__ import annotations

from collections.abc import Iterable
from heapq import heappop, heappush

from ._fields import PoolFields
from ._records import (
    QUEUED,
    KeyRecord,
    RequestRecord,
)
from ._records import (
    T_COOLDOWN as _T_COOLDOWN,
)
from ._records import (
    T_DEADLINE as _T_DEADLINE,
)
from ._records import (
    T_HOLD as _T_HOLD,
)
from ._records import (
    T_PACE as _T_PACE,
)
from ._records import (
    pacing_ready as _pacing_ready,
)
from .decisions import Decision, Reject
from .states import (
    COOLING_STATES,
    USABLE_STATES,
    KeyState,
    Signal,
)

_RATE_LIMITED = KeyState.RATE_LIMITED
_COOLING = COOLING_STATES


class RequestQueue(PoolFields):
    """The part of ``Pool`` that makes requests wait for a key and fires timers."""

    def _enqueue(self, req: RequestRecord, out: list[Decision]) -> None:
        """Wait for a key, or reject at once if waiting cannot help."""
        now = self._now
        req.state = QUEUED
        req.key = None
        if not req.serial:
            event = req.event
            deadline = event.deadline
            req.deadline = event.now + self._queue_timeout if deadline is None else deadline
            self._request_serial = req.serial = self._request_serial + 1
        earliest = self._earliest_for(req, now)
        if self._queued >= self._config.queue_limit:
            self._reject(req, earliest, "queue full", out)
        elif req.deadline <= now:
            self._reject(req, earliest, "no key is usable before the deadline", out)
        elif earliest is None:
            self._reject(req, None, "no key is usable", out)
        elif earliest is not None and earliest > req.deadline:
            self._reject(req, earliest, "no key is usable before the deadline", out)
        else:
            self._queue.append(req)
            self._queued += 1
            self._push_request_timers(req)

    def _push_request_timers(self, req: RequestRecord) -> None:
        """Timers of a queued request: its deadline, and the ends of its holds
        (a key that asked it to wait may serve it then)."""
        timers, serial, request_id = self._timers, req.serial, req.request_id
        heappush(timers, (req.deadline, _T_DEADLINE, serial, request_id))
        if req.holds:
            for until in sorted(set(req.holds.values())):
                if until > self._now:
                    heappush(timers, (until, _T_HOLD, serial, request_id))

    def _drain(self, out: list[Decision]) -> None:
        """Serve waiting requests, first come first served, while keys are free."""
        self._wake = False
        queue = self._queue
        skipped: list[RequestRecord] = []
        while queue:
            req = queue[0]
            if req.state != QUEUED:
                queue.popleft()
                continue
            key = self._pick(req)
            if key is None:
                if (req.event.pin is not None and not req.event.pin_fallback) or (
                    req.holds is not None and self._held_off(req)
                ):
                    # Waits for its own key, or for keys that hold it off: the
                    # requests behind it may take the keys it cannot.
                    skipped.append(queue.popleft())
                    continue
                break
            queue.popleft()
            self._queued -= 1
            self._assign(req, key, out)
        if skipped:
            queue.extendleft(reversed(skipped))

    def _settle(self, out: list[Decision]) -> None:
        """The end of every handler: serve the queue if a key may have come free,
        and reject at once what no key can serve before its deadline."""
        if self._wake:
            self._drain(out)
        if self._hopeless_check:
            self._hopeless_check = False
            if self._queued:
                self._reject_hopeless(out)

    def _reject_hopeless(self, out: list[Decision]) -> None:
        """Reject the waiting requests that no key can serve before their deadline
        (failed and depleted keys with no known return, probes over): waiting
        the whole queue timeout would only delay the same answer."""
        now = self._now
        pooled = self._earliest(now)
        if pooled is not None and pooled <= now and not any(map(_own_keys, self._queue)):
            return
        for req in self._queue:
            if req.state != QUEUED:
                continue
            earliest = pooled if not _own_keys(req) else self._earliest_for(req, now)
            if earliest is None or earliest > req.deadline:
                self._queued -= 1
                why = "no key is usable" if earliest is None else "no key is usable in time"
                self._reject(req, earliest, why, out)

    def _earliest_for(self, req: RequestRecord, now: float) -> float | None:
        """``_earliest`` for ``req``: its holds, and only its key when it is
        pinned without fallback (a key that cannot come back on its own is
        then no reason to wait, whatever the other keys do)."""
        event = req.event
        if event.pin is not None and not event.pin_fallback:
            key = self._pinned(event.pin)
            return self._earliest(now, req.holds, () if key is None else (key,))
        return self._earliest(now, req.holds)

    def _earliest(
        self,
        now: float,
        holds: dict[str, float] | None = None,
        keys: Iterable[KeyRecord] | None = None,
    ) -> float | None:
        """Earliest time a key (of ``keys``; default every key) may be usable
        again: ``now`` if some key only waits on load or pacing, ``None`` if no
        key will come back on its own. ``holds``: a request's
        (``RequestRecord.holds``), for the earliest time a key may serve that
        request: not before the key's hold ends."""
        best: float | None = None
        for key in self._order if keys is None else keys:
            if key.state in USABLE_STATES:
                limit = key.max_in_flight
                if key.trial or (limit is not None and key.in_flight >= limit):
                    when = now  # frees whenever a response comes back
                else:
                    ready = _pacing_ready(key, now)
                    when = now if ready is None else ready
            elif key.probing:
                when = now
            elif key.until is not None and key.state in _COOLING:
                when = key.until
            else:
                continue
            if holds:
                held = holds.get(key.key_id)
                if held is not None and held > when:
                    when = held
            if when <= now:
                return now
            if best is None or when < best:
                best = when
        return best

    def _reject(
        self, req: RequestRecord, earliest: float | None, why: str, out: list[Decision]
    ) -> None:
        now = self._now
        live = [k for k in self._order if k.state is not KeyState.DISABLED]
        all_limited = (
            not self._available and bool(live) and all(k.state is _RATE_LIMITED for k in live)
        )
        retry_after = None if earliest is None else max(earliest - now, 0.0)
        self._forget(req)
        out.append(
            Reject(
                request_id=req.request_id,
                status=429 if all_limited else 503,
                retry_after=retry_after,
                reason=why,
            )
        )
        self._rejected += 1

    # -------------------------------------------------------------- timers

    def _timer_valid(self, timer: tuple[float, int, int, str]) -> bool:
        when, kind, serial, request_id = timer
        if kind == _T_DEADLINE:
            req = self._requests.get(request_id)
            return (
                req is not None
                and req.serial == serial
                and req.state == QUEUED
                and req.deadline == when
            )
        if kind == _T_HOLD:
            req = self._requests.get(request_id)
            return (
                req is not None
                and req.serial == serial
                and req.state == QUEUED
                and req.holds is not None
                and when in req.holds.values()
            )
        key = self._by_serial.get(serial)
        if key is None or key.removed:
            return False
        if kind == _T_COOLDOWN:
            return key.until == when and key.state in _COOLING
        if kind == _T_PACE:
            return key.pace_timer == when
        return key.probe_due == when

    def _run_timers(self, now: float, out: list[Decision]) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            timer = heappop(timers)
            if not self._timer_valid(timer):
                continue
            when, kind, serial, request_id = timer
            if kind == _T_DEADLINE:
                if self._wake:
                    self._drain(out)
                req = self._requests[request_id]
                if req.state == QUEUED:
                    self._queued -= 1
                    earliest = self._earliest_for(req, when)
                    self._reject(req, earliest, "waited past its deadline", out)
                continue
            if kind == _T_HOLD:
                self._wake = True  # a key that held a waiting request off may serve it
                continue
            key = self._by_serial[serial]
            if kind == _T_COOLDOWN:
                self._transition(key, Signal.COOLDOWN_ENDED, when, None, "cooldown_ended", out)
            elif kind == _T_PACE:
                key.pace_timer = None
                self._refresh(key)
            else:
                key.probe_due = None
                if self._probe_wanted(key, when):
                    self._probe(key, when, "recheck", out)


def _own_keys(req: RequestRecord) -> bool:
    """Whether ``req`` may wait for other keys than the pool's first usable one:
    it has holds, or is pinned without fallback."""
    return bool(req.holds) or (req.event.pin is not None and not req.event.pin_fallback)
