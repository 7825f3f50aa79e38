"""Key health: a key's answers, faults, spend and probes move it through the tables
(``policy.py``, ``states.py``)."""

from __future__ import annotations

from heapq import heappush

from ._fields import PoolFields
from ._records import (
    DELIVERED,
    ERROR_INDEX,
    KeyRecord,
    RequestRecord,
)
from ._records import (
    T_COOLDOWN as _T_COOLDOWN,
)
from ._records import (
    T_PROBE as _T_PROBE,
)
from .classify import Classification
from .decisions import Decision, KeyStateChanged, Probe
from .policy import REASON_DEFAULTS, VERDICTS, Cooldown
from .states import (
    COOLING_STATES,
    PROBED_WHEN_SHORT,
    RECHECKED_STATES,
    USABLE_STATES,
    KeyState,
    Signal,
    next_state,
)

_HEALTHY = KeyState.HEALTHY
_DEPLETED = KeyState.DEPLETED
_RECOVERING = KeyState.RECOVERING
_COOLING = COOLING_STATES
_PROBE_WHEN_SHORT = PROBED_WHEN_SHORT
_RECHECKED = RECHECKED_STATES


class KeyHealth(PoolFields):
    """The part of ``Pool`` that judges keys: verdicts, faults, spend, transitions, probes."""

    def _succeeded(self, req: RequestRecord, key: KeyRecord, out: list[Decision]) -> None:
        """A 2xx arrived on ``req``'s attempt."""
        now = self._now
        req.state = DELIVERED
        key.successes += 1
        window = key.window
        if now >= window.end:
            window.roll(now, self._config.error_window)
        window.cur_req += 1
        if self._latency:
            alpha = self._config.latency_alpha
            latency = now - req.sent_at
            key.ewma = latency if key.successes == 1 else key.ewma + alpha * (latency - key.ewma)
            # Filed now, not at the release (which waits for the body's end):
            # a heap entry must always hold its key's current score, or a pool
            # restored from a snapshot (its heap rebuilt from the fields) would
            # pick in another order than the original.
            if key.in_sched:
                self._select.rescore(key)
        if key.state is _RECOVERING:
            self._transition(key, Signal.SUCCESS, now, None, "trial_ok", out)

    def _judge(
        self,
        key: KeyRecord,
        verdict: Classification,
        req: RequestRecord | None,
        out: list[Decision],
        by_probe: bool = False,
    ) -> None:
        """Apply a classified answer to the key's health (and its account's), as
        ``policy.VERDICTS`` says. ``req`` is None for an answer that came inside a
        delivered body (mid-stream) or from a probe (``by_probe``)."""
        now = self._now
        rule = VERDICTS[verdict.verdict]
        signal = rule.signal
        if signal is Signal.SUCCESS:
            if req is not None:
                self._succeeded(req, key, out)
            if verdict.cooldown:  # Cooldown.SIGNAL: an exhausted bucket
                self._cool(key, Signal.RATE_LIMITED, now + verdict.cooldown, True, verdict, out)
                self._check_short(now, out)
            return
        assert rule.counts_as is not None
        key.errors[ERROR_INDEX[rule.counts_as]] += 1
        reason = verdict.reason or verdict.verdict.value
        if rule.cooldown is Cooldown.WINDOW:
            self._fault(key, now, reason, out)
        elif signal is not None:
            until: float | None = None
            hard = False
            if rule.cooldown is Cooldown.SIGNAL_OR_DEFAULT:
                rest = verdict.cooldown
                hard = rest is not None
                if rest is None:
                    rest = self._default_cooldown(rule.default, reason)
                until = now + rest
            old = key.state
            if rule.account_wide:
                self._cool(key, signal, until, hard, verdict, out)
            else:
                self._transition(key, signal, now, until, reason, out)
            if rule.confirm_probe and old is not key.state and not key.probing and not by_probe:
                self._probe(key, now, "confirm_" + signal.value, out)  # false 401s happen
        elif rule.passes_trial and key.state is _RECOVERING:
            # The key authenticated and was served: the trial succeeded.
            self._transition(key, Signal.SUCCESS, now, None, "trial_ok", out)
        self._check_short(now, out)

    def _default_cooldown(self, field: str | None, reason: str) -> float:
        """The configured cooldown of a verdict without the upstream's own time."""
        for text, special in REASON_DEFAULTS:
            if text in reason:
                field = special
                break
        assert field is not None
        value: float = getattr(self._config, field)
        return value

    def _cool(
        self,
        key: KeyRecord,
        signal: Signal,
        until: float | None,
        hard: bool,
        verdict: Classification,
        out: list[Decision],
    ) -> None:
        """Apply ``signal`` to the key, or to its whole account when account-wide."""
        targets = [key]
        if verdict.account_wide and key.account is not None:
            targets = self._accounts.get(key.account, [key])
        reason = verdict.reason or signal.value
        for target in targets:
            self._transition(target, signal, self._now, until, reason, out, hard=hard)

    def _fault(self, key: KeyRecord, now: float, reason: str, out: list[Decision]) -> None:
        """Count an upstream fault; degrade the key if it alone keeps failing."""
        config = self._config
        size = config.error_window
        key.window.roll(now, size)
        key.window.cur_req += 1
        key.window.cur_err += 1
        if key.state is not _HEALTHY and key.state is not _RECOVERING:
            return
        requests, errors = key.window.estimate(now, size)
        if requests < config.error_min_requests or errors <= config.error_threshold * requests:
            return
        rest_requests = rest_errors = 0.0
        for other in self._order:
            if other is not key:
                r, e = other.window.estimate(now, size)
                rest_requests += r
                rest_errors += e
        if rest_requests <= 0 or rest_errors > config.error_threshold * rest_requests:
            return  # no evidence it is this key rather than the upstream
        self._transition(key, Signal.ERROR_RATE, now, now + config.degraded_cooldown, reason, out)

    def _timed_out(self, key: KeyRecord, req: RequestRecord, out: list[Decision]) -> None:
        """An attempt on ``key`` got no answer in time. A key that hangs while
        others answer is degraded after ``timeout_strikes`` in a row (a trial at
        once), however little traffic the other keys had: one answer from any
        other key since the first timed-out attempt was sent is the evidence
        (the key's own answers are not)."""
        if key.timeouts == 0:
            key.timeout_since = req.sent_at
        key.timeouts += 1
        strikes = self._config.timeout_strikes
        if (
            strikes
            and key.state in USABLE_STATES
            and (key.timeouts >= strikes or key.state is _RECOVERING)
            and self._answered_since(key) > key.timeout_since
        ):
            key.timeouts = 0
            now = self._now
            until = now + self._config.degraded_cooldown
            self._transition(key, Signal.ERROR_RATE, now, until, "transport_timeouts", out)

    def _answered_since(self, key: KeyRecord) -> float:
        """When a key other than ``key`` last answered (``-inf``: never)."""
        if key.serial == self._answer_serial:
            return self._other_answer
        return self._last_answer

    def _spend(
        self, key: KeyRecord, cost: float, now: float, out: list[Decision], at: float | None = None
    ) -> None:
        """Charge ``cost`` spent at ``at`` (default ``now``) to the key's credits and budget."""
        spec = key.spec
        # A removed key's weight left the total when it was removed: its late
        # spend (a request draining) must not come off the total again.
        weighted = (
            self._weighted if self._config.weight_by == "credits" and not key.removed else None
        )
        old_weight = self._weight(key) if weighted is not None else 0.0
        key.spend += cost
        self._spent += cost
        if weighted is not None:
            weighted.reweigh(key, old_weight, self._weight(key))
        if spec.budget is not None:
            window = spec.budget_window
            if at is None:
                at = now
            if window is not None:
                start = key.budget_start
                if at + window <= now:
                    counted = False  # spent in a window that has ended
                elif start is None or now >= start + window:
                    key.budget_start, key.budget_spend, counted = at, 0.0, True
                else:  # the running window; an earlier spend opened it earlier
                    key.budget_start, counted = min(start, at), True
            else:
                counted = True
            if counted:
                key.budget_spend += cost
            if counted and key.budget_spend >= spec.budget:
                until = (
                    None
                    if window is None or key.budget_start is None
                    else (key.budget_start + window)
                )
                self._transition(
                    key, Signal.DEPLETED, now, until, "budget", out, hard=until is not None
                )
        if spec.credits is not None and key.spend >= spec.credits:
            self._transition(key, Signal.DEPLETED, now, None, "credits_spent", out)
        self._check_short(now, out)

    def _transition(
        self,
        key: KeyRecord,
        signal: Signal,
        now: float,
        until: float | None,
        reason: str,
        out: list[Decision],
        hard: bool = False,
        force_until: bool = False,
    ) -> None:
        """Move ``key`` by the table; keep ``until`` as a floor; tell the driver.

        ``hard`` marks an ``until`` that came from the upstream (Retry-After, a
        reset header) or an operator: it raises the key's hard floor
        (``KeyRecord.hard_until``), before which no probe ends the cooldown. A
        default guess extends the cooldown without making it hard; a hard time
        inside a longer guess stays the floor.
        """
        if key.removed:
            return  # a removed key only drains its requests; its health is moot
        old = key.state
        new = next_state(old, signal)
        floor = until if hard else None
        if new is old:
            # Same state: a later, longer cooldown extends it; a shorter one never
            # shortens it (Retry-After is a floor).
            if until is None or new not in _COOLING:
                return
            if force_until:
                key.until, key.hard_until = until, floor
            elif key.until is None:
                # Depleted until a probe or an operator says otherwise (a 402, a
                # lifetime budget): a cooldown's time does not end that.
                return
            else:
                raised = floor is not None and (key.hard_until is None or floor > key.hard_until)
                if raised:
                    key.hard_until = floor
                extended = until > key.until
                if extended:
                    key.until = until
                if raised or extended:
                    self._probe_at_floor(key, now)
                if not extended:
                    return
            key.reason = reason
            heappush(self._timers, (until, _T_COOLDOWN, key.serial, ""))
            out.append(_changed(key, old, now))
            return
        if new is KeyState.RATE_LIMITED or new is KeyState.DEGRADED:
            assert until is not None  # every caller gives one (KeyMarked checks)
            if not force_until and old in _COOLING and key.until is not None:
                until = max(until, key.until)
                kept = key.hard_until
                if kept is not None and (floor is None or kept > floor):
                    floor = kept
        elif new is not KeyState.DEPLETED or until is None:
            until = floor = None
        key.hard_until = floor
        key.state = new
        key.until = until
        key.reason = reason
        if old in USABLE_STATES:
            self._available -= 1
        if new in USABLE_STATES:
            self._available += 1
        if old is _RECOVERING:
            key.trial = False
        if until is not None:
            heappush(self._timers, (until, _T_COOLDOWN, key.serial, ""))
        out.append(_changed(key, old, now))
        if new in USABLE_STATES:
            key.probe_due = None
            self._refresh(key)
        else:
            self._hopeless_check = True
            self._schedule_probe(key, now)

    # -------------------------------------------------------------- probes

    def _held(self, key: KeyRecord, now: float) -> bool:
        """May no probe end the key's state at ``now``? Its hard floor (the
        upstream's own time) lies ahead, or its lifetime spend budget is used up
        (a probe of the upstream knows nothing of the pool's own budget, in
        whatever state a late answer left the key: a 401 fails it too)."""
        hard = key.hard_until
        if hard is not None and hard > now:
            return True
        return _budget_spent(key)

    def _probe_wanted(self, key: KeyRecord, now: float) -> bool:
        """Is a probe of ``key`` due at ``now`` worth sending (its timer fired)?"""
        if key.probing or _budget_spent(key):
            return False
        if key.state in _RECHECKED:
            return True
        return (
            key.state in _PROBE_WHEN_SHORT
            and not self._held(key, now)
            and self._available < self._config.min_healthy
        )

    def _probe(self, key: KeyRecord, now: float, reason: str, out: list[Decision]) -> None:
        key.probing = True
        key.last_probe = now
        key.probe_due = None
        out.append(Probe(key_id=key.key_id, reason=reason))

    def _schedule_probe(self, key: KeyRecord, now: float) -> None:
        """Plan the key's next probe: rechecks of failed and depleted keys, and
        retries while the pool is short of usable keys (not before the key's
        hard floor, and only if the cooldown would not end first)."""
        if key.probing or key.removed:
            return
        state = key.state
        if _budget_spent(key):
            key.probe_due = None  # no probe can end it
            return
        config = self._config
        due: float | None = None
        if state in _RECHECKED and config.recheck_interval is not None:
            due = now + config.recheck_interval
        if state in _PROBE_WHEN_SHORT and self._available < config.min_healthy:
            soon = now + config.probe_interval
            hard = key.hard_until
            if hard is None or hard <= now:
                due = soon if due is None else min(due, soon)
            else:
                soon = max(soon, hard)
                if key.until is not None and soon < key.until:
                    due = soon if due is None else min(due, soon)
        if due is not None and due != key.probe_due:
            key.probe_due = due
            heappush(self._timers, (due, _T_PROBE, key.serial, ""))

    def _probe_at_floor(self, key: KeyRecord, now: float) -> None:
        """A cooling key's hard floor lies ahead and a default guess extends its
        cooldown beyond it: while the pool is short, probe it at the floor."""
        hard, until = key.hard_until, key.until
        if (
            hard is not None
            and until is not None
            and now < hard < until
            and key.state in _PROBE_WHEN_SHORT
            and not key.probing
            and self._available < self._config.min_healthy
            and key.probe_due != hard
        ):
            key.probe_due = hard
            heappush(self._timers, (hard, _T_PROBE, key.serial, ""))

    def _check_short(self, now: float, out: list[Decision]) -> None:
        """Fewer usable keys than ``min_healthy``: probe every cooling key at once
        (a key whose hard floor lies ahead: at its floor)."""
        if self._available >= self._config.min_healthy:
            return
        gap = self._config.probe_interval
        last = self._last_short_scan
        if last is not None and now < last + gap:
            return  # keys that cooled since are probed by their own timers
        self._last_short_scan = now
        for key in self._order:
            if key.state not in _PROBE_WHEN_SHORT or key.probing:
                continue
            hard = key.hard_until
            if hard is not None and hard > now:
                self._probe_at_floor(key, now)
            elif (key.last_probe is None or now >= key.last_probe + gap) and not self._held(
                key, now
            ):
                self._probe(key, now, "pool_short", out)


def _budget_spent(key: KeyRecord) -> bool:
    """Is the key's lifetime spend budget (one without a window) used up?"""
    spec = key.spec
    budget = spec.budget
    return budget is not None and spec.budget_window is None and key.budget_spend >= budget


def _changed(key: KeyRecord, old: KeyState, now: float) -> KeyStateChanged:
    return KeyStateChanged(
        key_id=key.key_id, old=old, new=key.state, until=key.until, reason=key.reason, now=now
    )
