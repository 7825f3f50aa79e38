"""Choosing a key: usability, the policies' selection, sending and releasing."""

from __future__ import annotations

from collections.abc import Collection
from heapq import heappush

from ._fields import PoolFields
from ._records import (
    SENT,
    KeyRecord,
    RequestRecord,
)
from ._records import (
    T_PACE as _T_PACE,
)
from ._records import (
    pacing_ready as _pacing_ready,
)
from ._select import HashRing
from .config import KeySpec
from .decisions import Decision, Send
from .states import (
    USABLE_STATES,
    KeyState,
)

_HEALTHY = KeyState.HEALTHY
_RECOVERING = KeyState.RECOVERING
_new = object.__new__
_send_request_id = Send.__dict__["request_id"].__set__
_send_key_id = Send.__dict__["key_id"].__set__
_send_attempt = Send.__dict__["attempt"].__set__


class KeyChoice(PoolFields):
    """The part of ``Pool`` that indexes keys, picks one for a request, and frees it."""

    def _add_key(self, spec: KeySpec) -> None:
        self._key_serial += 1
        key = KeyRecord(spec, self._key_serial)
        self._index_key(key)
        self._by_serial[key.serial] = key
        if self._weighted is not None:
            self._weighted.total_weight += self._weight(key)
        self._select.size_hint += 1
        self._refresh(key)

    def _index_key(self, key: KeyRecord) -> None:
        self._keys[key.key_id] = key
        self._order.append(key)
        if key.account is not None:
            self._accounts.setdefault(key.account, []).append(key)
        if key.state in USABLE_STATES and not key.removed:
            self._available += 1

    def _weight(self, key: KeyRecord) -> float:
        spec = key.spec
        if self._config.weight_by == "credits" and spec.credits is not None:
            return max(spec.credits - key.spend, 1e-9)
        return spec.weight

    def _usable(self, key: KeyRecord) -> bool:
        """May ``key`` take a request right now? (No side effects.)"""
        state = key.state
        if state is not _HEALTHY and (state is not _RECOVERING or key.trial):
            return False
        if key.removed:
            return False
        limit = key.max_in_flight
        if limit is not None and key.in_flight >= limit:
            return False
        now = self._now
        pace = key.pace_at
        if pace is not None and pace > now:
            return False
        tok = key.tok_at
        return tok is None or tok <= now + 60.0

    def _drop(self, key: KeyRecord) -> None:
        """``key`` left a selection structure as unusable: wake it when it may be usable."""
        if key.state is _HEALTHY or key.state is _RECOVERING:
            ready = _pacing_ready(key, self._now)
            if ready is not None and key.pace_timer != ready:
                key.pace_timer = ready
                heappush(self._timers, (ready, _T_PACE, key.serial, ""))

    def _refresh(self, key: KeyRecord) -> None:
        """``key`` may have become usable: file it for selection, wake the queue."""
        if not key.in_sched:
            if self._usable(key):
                self._select.add(key)
                self._wake = True
            else:
                self._drop(key)
        elif self._queued and self._usable(key):
            self._wake = True

    # ----------------------------------------------------------- selection

    def _pick(self, req: RequestRecord) -> KeyRecord | None:
        if not self._available:
            return None
        event = req.event
        if (
            req.tried is None
            and event.group is None
            and event.pin is None
            and event.session is None
            and not self._plain_pick_needs_request
        ):
            return self._select.pick(self._usable_fn, self._drop_fn, None)
        return self._pick_for(req)

    def _pick_for(self, req: RequestRecord) -> KeyRecord | None:
        """``_pick`` for a request with a pin, a session, a group or tried keys.
        Tried keys and the group's are avoided while others serve; a key that
        holds the request off (``_held_off``) is never picked."""
        event = req.event
        held = self._held_off(req)
        avoid: Collection[str] | None = req.tried
        if event.group is not None:
            members = self._groups.get(event.group)
            if members:
                avoid = set(members) | set(avoid or ())
        if event.pin is not None:
            key = self._pinned(event.pin)
            usable = key is not None and self._usable(key)
            free = usable and not (held and key.key_id in held)  # type: ignore[union-attr]
            if free and not (avoid and key.key_id in avoid):  # type: ignore[union-attr]
                return key
            if not event.pin_fallback:
                if key is not None and not usable:
                    self._drop(key)  # its pace timer wakes the queue when the key may serve
                return key if free else None
        if held:
            avoid = held | set(avoid or ())
        key = self._pick_policy(req, avoid)
        if key is None and avoid:
            key = self._pick_policy(req, held)
        return key

    def _held_off(self, req: RequestRecord) -> frozenset[str] | None:
        """The keys ``req`` may not be sent on now: each asked it to wait (a retry
        hint on a fault) until a time still ahead."""
        holds = req.holds
        if holds is None:
            return None
        now = self._now
        held = frozenset(key_id for key_id, until in holds.items() if until > now)
        return held or None

    def _hold(self, req: RequestRecord, key: KeyRecord, until: float) -> None:
        """``key`` answered ``req`` with a fault and a retry hint: ``req`` goes
        there again no sooner than ``until`` (a later hint never shortens it)."""
        holds = req.holds
        if holds is None:
            req.holds = holds = {}
        kept = holds.get(key.key_id)
        if kept is None or until > kept:
            holds[key.key_id] = until

    def _pick_policy(self, req: RequestRecord, avoid: Collection[str] | None) -> KeyRecord | None:
        session = req.event.session
        if session is not None:
            if self._ring is not None:
                key = self._ring.pick(session, self._usable, avoid)
                if key is not None:
                    return key
            elif self._order:
                # Other policies: the session's home key while it is usable (its
                # prompt cache), the policy's choice otherwise.
                if self._sessions is None:
                    self._sessions = HashRing(self._config.affinity_vnodes, self._config.seed)
                    self._sessions.rebuild(self._order)
                key = self._sessions.home(session)
                if self._usable(key) and not (avoid and key.key_id in avoid):
                    return key
        if self._explore and self._rng.random() < self._explore:
            key = self._order[self._rng.randrange(len(self._order))]
            if self._usable(key) and not (avoid and key.key_id in avoid):
                return key
        return self._select.pick(self._usable_fn, self._drop_fn, avoid)

    def _rebuild_rings(self) -> None:
        """The key set changed: place the keys on the hash rings again."""
        if self._ring is not None:
            self._ring.rebuild(self._order)
        self._sessions = None  # rebuilt when the next session asks

    def _pinned(self, pin: str | int) -> KeyRecord | None:
        if isinstance(pin, int):
            return self._order[pin] if 0 <= pin < len(self._order) else None
        return self._keys.get(pin)

    def _assign(self, req: RequestRecord, key: KeyRecord, out: list[Decision]) -> None:
        """Send ``req`` on ``key``."""
        req.key = key
        req.attempt = attempt = req.attempt + 1
        req.state = SENT
        req.sent_at = self._now
        key.in_flight += 1
        key.requests += 1
        if not key.plain or key.state is not _HEALTHY or req.event.group is not None:
            self._assign_limits(req, key)
        key.last_pick = self._pick_seq
        self._pick_seq += 1
        if not key.in_sched:
            self._select.requeue(key)
        elif self._rescore_on_load:
            self._select.rescore(key)
        send = _new(Send)  # make_send(...), inlined on the hottest path
        _send_request_id(send, req.request_id)
        _send_key_id(send, key.key_id)
        _send_attempt(send, attempt)
        out.append(send)

    def _assign_limits(self, req: RequestRecord, key: KeyRecord) -> None:
        """The rarer parts of sending: trials, pacing, groups."""
        now = self._now
        if key.state is _RECOVERING:
            key.trial = req.trial = True
        spec = key.spec
        event = req.event
        if spec.rpm is not None:
            base = key.pace_at if key.pace_at is not None and key.pace_at > now else now
            key.pace_at = base + 60.0 / spec.rpm
        if spec.tpm is not None and event.tokens:
            base = key.tok_at if key.tok_at is not None and key.tok_at > now else now
            key.tok_at = base + event.tokens * 60.0 / spec.tpm
        group = event.group
        if group is not None:
            members = self._groups.setdefault(group, {})
            members[key.key_id] = members.get(key.key_id, 0) + 1

    def _release(self, req: RequestRecord) -> None:
        """The request's attempt no longer holds its key."""
        key = req.key
        assert key is not None
        req.key = None
        key.in_flight -= 1
        if req.trial or key.removed or req.event.group is not None:
            self._release_extras(req, key)
            if key.removed:
                return
        if self._rescore_on_load:
            self._select.rescore(key)
        if not key.in_sched or self._queued:
            self._refresh(key)

    def _release_extras(self, req: RequestRecord, key: KeyRecord) -> None:
        """The rarer parts of releasing: trials, groups, removed keys."""
        if req.trial:
            req.trial = key.trial = False
        group = req.event.group
        if group is not None:
            members = self._groups[group]
            count = members[key.key_id] - 1
            if count:
                members[key.key_id] = count
            else:
                del members[key.key_id]
                if not members:
                    del self._groups[group]
        if key.removed and not key.in_flight:
            del self._dying[key.key_id]
            del self._by_serial[key.serial]

    def _fail_over(self, req: RequestRecord, key: KeyRecord, out: list[Decision]) -> None:
        """The attempt on ``key`` failed: the next attempt, on another key if any."""
        self._release(req)
        if req.tried is None:
            req.tried = [key.key_id]
        else:
            req.tried.append(key.key_id)
        self._send_or_queue(req, out)

    def _try_another_key(
        self, req: RequestRecord, key: KeyRecord, out: list[Decision], shared: bool
    ) -> bool:
        """``key`` cannot serve ``req`` but another may ("can only afford"): send
        it on a usable key it has not tried yet. False when there is none (the
        caller delivers the answer): the keys it tried would only say the same.
        ``shared``: the budget ``req`` is too large for is the account's balance,
        so every key of ``key``'s account would say the same: they count as tried."""
        tried = req.tried
        if tried is None:
            req.tried = tried = [key.key_id]
        else:
            tried.append(key.key_id)
        if shared and key.account is not None:
            members = self._accounts.get(key.account, ())
            tried.extend([k.key_id for k in members if k.key_id not in tried])
        nxt = self._pick_untried(req)
        if nxt is None:
            return False
        self._release(req)
        self._assign(req, nxt, out)
        return True

    def _pick_untried(self, req: RequestRecord) -> KeyRecord | None:
        """A usable key ``req`` has not tried (its group's keys last), if any."""
        if not self._available:
            return None
        event = req.event
        if event.pin is not None and not event.pin_fallback:
            return None  # its one key has been tried
        tried = set(req.tried or ())
        key = None
        if event.group is not None:
            members = self._groups.get(event.group)
            if members:
                key = self._pick_policy(req, tried | set(members))
        if key is None:
            key = self._pick_policy(req, tried)
        return key

    def _send_or_queue(self, req: RequestRecord, out: list[Decision]) -> None:
        """Send ``req`` on the key the policy picks now, or queue it for one."""
        nxt = self._pick(req)
        if nxt is not None:
            self._assign(req, nxt, out)
        else:
            self._enqueue(req, out)

    def _forget(self, req: RequestRecord) -> None:
        req.state = -1
        del self._requests[req.request_id]


def _score_least_busy(key: KeyRecord) -> tuple[int, int]:
    return (key.in_flight, key.last_pick)


def _score_latency(key: KeyRecord) -> tuple[float, int]:
    return (key.ewma * (key.in_flight + 1), key.last_pick)
