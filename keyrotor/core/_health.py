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
    ) -> None:
        """Apply a classified answer to the key's health (and its account's), as
        ``policy.VERDICTS`` says."""
        now = self._now
        rule = VERDICTS[verdict.verdict]
        signal = rule.signal
        if signal is Signal.SUCCESS:
            if req is not None:
                self._succeeded(req, key, out)
            if verdict.cooldown:  # Cooldown.SIGNAL: an exhausted bucket
                self._cool(key, Signal.RATE_LIMITED, now + verdict.cooldown, True, verdict, out)
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
            if rule.confirm_probe and old is not key.state and not key.probing and req is not None:
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
        other key since the first timed-out attempt was sent is the evidence."""
        if key.timeouts == 0:
            key.timeout_since = req.sent_at
        key.timeouts += 1
        strikes = self._config.timeout_strikes
        if (
            strikes
            and key.state in USABLE_STATES
            and (key.timeouts >= strikes or key.state is _RECOVERING)
            and self._last_answer > key.timeout_since
        ):
            key.timeouts = 0
            now = self._now
            until = now + self._config.degraded_cooldown
            self._transition(key, Signal.ERROR_RATE, now, until, "transport_timeouts", out)

    def _spend(
        self, key: KeyRecord, cost: float, now: float, out: list[Decision], at: float | None = None
    ) -> None:
        """Charge ``cost`` spent at ``at`` (default ``now``) to the key's credits and budget."""
        spec = key.spec
        old_weight = self._weight(key) if self._weighted is not None else 0.0
        key.spend += cost
        if self._weighted is not None and self._config.weight_by == "credits":
            self._weighted.reweigh(key, old_weight, self._weight(key))
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
        reset header) or an operator: no probe may end it early.
        """
        if key.removed:
            return  # a removed key only drains its requests; its health is moot
        old = key.state
        new = next_state(old, signal)
        if new is old:
            # Same state: a later, longer cooldown extends it; a shorter one never
            # shortens it (Retry-After is a floor).
            if (
                until is not None
                and new in _COOLING
                and (force_until or key.until is None or until > key.until)
            ):
                key.until = until
                key.reason = reason
                key.hard_until = hard or (key.hard_until and not force_until)
                heappush(self._timers, (until, _T_COOLDOWN, key.serial, ""))
                out.append(_changed(key, old, now))
            return
        if new is KeyState.RATE_LIMITED or new is KeyState.DEGRADED:
            assert until is not None  # every caller gives one (KeyMarked checks)
            if not force_until and old in _COOLING and key.until is not None:
                until = max(until, key.until)
        elif new is not KeyState.DEPLETED:
            until = None
        key.hard_until = hard and until is not None
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

    def _probe(self, key: KeyRecord, now: float, reason: str, out: list[Decision]) -> None:
        key.probing = True
        key.last_probe = now
        key.probe_due = None
        out.append(Probe(key_id=key.key_id, reason=reason))

    def _schedule_probe(self, key: KeyRecord, now: float) -> None:
        """Plan the key's next probe: rechecks of failed and depleted keys, and
        retries while the pool is short of usable keys."""
        if key.probing or key.removed:
            return
        state = key.state
        config = self._config
        due: float | None = None
        if state in _RECHECKED and config.recheck_interval is not None:
            due = now + config.recheck_interval
        if (
            state in _PROBE_WHEN_SHORT
            and not key.hard_until
            and self._available < config.min_healthy
        ):
            soon = now + config.probe_interval
            due = soon if due is None else min(due, soon)
        if due is not None and due != key.probe_due:
            key.probe_due = due
            heappush(self._timers, (due, _T_PROBE, key.serial, ""))

    def _check_short(self, now: float, out: list[Decision]) -> None:
        """Fewer usable keys than ``min_healthy``: probe every cooling key at once."""
        if self._available >= self._config.min_healthy:
            return
        gap = self._config.probe_interval
        last = self._last_short_scan
        if last is not None and now < last + gap:
            return  # keys that cooled since are probed by their own timers
        self._last_short_scan = now
        for key in self._order:
            if (
                key.state in _PROBE_WHEN_SHORT
                and not key.probing
                and not key.hard_until
                and (key.last_probe is None or now >= key.last_probe + gap)
            ):
                self._probe(key, now, "pool_short", out)


def _changed(key: KeyRecord, old: KeyState, now: float) -> KeyStateChanged:
    return KeyStateChanged(
        key_id=key.key_id, old=old, new=key.state, until=key.until, reason=key.reason, now=now
    )
