"""Spend per provider, per model and per client token, and their budgets.

The pool keeps each key's spend and budget (the core). The proxy also knows
which provider, model and client token an answer was for, so ``SpendBook``
charges every answer whose body was read to its end and reported ``usage``
to each of the three: in the state file's ``usage`` ledger (per UTC day,
surviving restarts), in today's totals for ``/status``, and in the running
windows of the ``[[budgets]]`` that apply.

A budget is checked before a request is sent: a client token or model whose
spend in its window has reached the limit, or would pass it with the
request's estimated prompt cost (when the catalog prices the model), is
answered 429 with ``Retry-After`` when spend leaves the window. Requests in
flight when a budget is reached still finish, so spend can pass a limit by
what those requests cost.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ...models import ModelInfo, estimate
from ...transports.json_body import parse
from ..config import Budget
from ..storage import Spend, day_start

if TYPE_CHECKING:
    from ...transports.api import StreamAccountant
    from ..storage import StateStore, UsageRow

__all__ = ["MAX_NAMES", "Refusal", "SpendBook"]

MAX_NAMES = 1000
"""Names kept per scope in today's totals; spend of more goes under ``(other)``."""

_DAY = 86400
_BUCKET = 60.0  # a budget window's resolution, in seconds


class _Window:
    """Spend of the last ``window`` seconds (None: ever), in one-minute buckets."""

    __slots__ = ("buckets", "total", "window")

    def __init__(self, window: float | None) -> None:
        self.window = window
        self.buckets: deque[list[float]] = deque()  # [start, cost], oldest first
        self.total = 0.0

    def add(self, at: float, cost: float) -> None:
        self.total += cost
        if self.window is None:
            return
        start = at - at % _BUCKET
        if self.buckets and self.buckets[-1][0] >= start:
            self.buckets[-1][1] += cost
        else:
            self.buckets.append([start, cost])

    def spent(self, now: float) -> float:
        """Spend in the window ending ``now`` (a bucket counts until all of it left)."""
        if self.window is not None:
            horizon = now - self.window
            while self.buckets and self.buckets[0][0] + _BUCKET <= horizon:
                self.total -= self.buckets.popleft()[1]
            if not self.buckets:
                self.total = 0.0  # no float residue
        return self.total

    def back_under(self, limit: float, now: float) -> float | None:
        """Seconds until spend in the window falls under ``limit`` (None: never)."""
        if self.window is None:
            return None
        left = self.spent(now)
        for start, cost in self.buckets:
            left -= cost
            if left < limit:
                return max(0.0, start + _BUCKET + self.window - now)
        return 0.0


class Refusal:
    """Why a request is not sent: its budget, spent, and when to come back."""

    __slots__ = ("ahead", "budget", "retry_after", "spent")

    def __init__(
        self, budget: Budget, spent: float, retry_after: float | None, ahead: float = 0.0
    ) -> None:
        self.budget = budget
        self.spent = spent
        self.retry_after = retry_after
        self.ahead = ahead  # the request's estimated prompt cost

    @property
    def message(self) -> str:
        b = self.budget
        per = "in total" if b.window is None else f"per {b.window:g} s"
        text = f"the {b.scope} {b.name!r} has spent ${self.spent:.4f} of its ${b.limit:.2f} budget"
        if self.spent < b.limit:
            text += f" and this request's prompt is estimated at ${self.ahead:.4f}"
        return f"{text} ({per})"


class SpendBook:
    """Spend per provider, model and client token (see the module's docstring)."""

    def __init__(
        self,
        budgets: Iterable[Budget] = (),
        store: StateStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._budgets = {(b.scope, b.name): b for b in budgets}
        self._windows = {where: _Window(b.window) for where, b in self._budgets.items()}
        self._store = store
        self._clock = clock
        self._day = ""
        self._day_end = 0.0  # when ``_day`` ends (a float compare per charge, not a strftime)
        self._totals: dict[str, dict[str, Spend]] = {"provider": {}, "model": {}, "client": {}}
        self._roll(clock())
        self.budgeted_models = frozenset(n for s, n in self._budgets if s == "model")
        self.budgeted_clients = frozenset(n for s, n in self._budgets if s == "client")
        self.on_budgeted: Callable[[str, str, float, float], None] | None = None
        """Hears (scope, name, cost, at) of each charge to a budget (``shared_spend``)."""

    def restore(self, rows: Iterable[UsageRow]) -> None:
        """Put back stored spend: today's totals, and what falls in each budget's
        window (a day's spend counts as of that day's end, or now for today)."""
        now = self._clock()
        self._roll(now)
        for row in rows:
            if row.day == self._day:
                counts = (row.requests, row.prompt_tokens, row.completion_tokens, row.cost)
                self._total(row.scope, row.name, *counts)
            window = self._windows.get((row.scope, row.name))
            if window is None or not row.cost:
                continue
            try:
                day_end = day_start(row.day) + _DAY
            except ValueError:
                continue
            if window.window is not None and day_end <= now - window.window:
                continue  # spent before the running window
            window.add(min(day_end - 1, now), row.cost)

    def refusal(
        self,
        client: str | None,
        model: str | None,
        body: bytes = b"",
        info: ModelInfo | None = None,
    ) -> Refusal | None:
        """The budget that stops a request of ``client`` for ``model`` (None: send it).

        With the model's catalog entry (``info``) and its prices, the request's
        estimated prompt cost counts too (its JSON ``body`` parsed only then)."""
        budgets = [
            self._budgets[where]
            for where in (("client", client), ("model", model))
            if where[1] is not None and where in self._budgets
        ]
        if not budgets:
            return None
        now = self._clock()
        ahead = self._estimate(body, info)
        for budget in budgets:
            window = self._windows[(budget.scope, budget.name)]
            spent = window.spent(now)
            if spent >= budget.limit or (ahead and spent + ahead > budget.limit):
                room = budget.limit - ahead  # spend must fall under this for the request to fit
                retry = window.back_under(room, now) if room > 0 else None
                return Refusal(budget, spent, retry, ahead)
        return None

    @staticmethod
    def _estimate(body: bytes, info: ModelInfo | None) -> float:
        """The request's estimated prompt cost in USD (0 when unknown)."""
        if info is None or not body:
            return 0.0
        try:
            request = parse(body)
        except ValueError:
            return 0.0
        messages = request.get("messages") if isinstance(request, dict) else None
        if not isinstance(messages, list):
            return 0.0
        low = estimate(info.pricing, messages).low
        return low if low is not None and math.isfinite(low) else 0.0

    def charge(self, names: Mapping[str, str | None], usage: StreamAccountant | None) -> None:
        """Charge an answer's ``usage`` to each ``scope: name`` (None names are
        skipped); nothing for an answer without ``usage`` or that broke off."""
        if usage is None or usage.usage is None:
            return
        named = {scope: name for scope, name in names.items() if name is not None}
        cost = usage.cost
        now = self._clock()
        self._roll(now)
        windows = self._windows
        for scope, name in named.items():
            self._total(scope, name, 1, usage.prompt_tokens, usage.completion_tokens, cost)
            if windows:
                window = windows.get((scope, name))
                if window is not None:
                    window.add(now, cost)
                    if self.on_budgeted is not None and cost:
                        self.on_budgeted(scope, name, cost, now)
        if self._store is not None:
            self._store.record_usage(
                named,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cost=cost,
                at=now,
            )

    def add_remote(self, scope: str, name: str, cost: float, at: float) -> None:
        """Spend another process of the pool charged to the budget of ``scope:
        name`` at ``at`` (Unix s): it counts toward the budget here too."""
        window = self._windows.get((scope, name))
        if window is None or cost <= 0:
            return
        now = self._clock()
        if window.window is not None and at <= now - window.window:
            return  # spent before the running window
        window.add(min(at, now), cost)

    def _roll(self, now: float) -> None:
        """Start today's totals afresh once midnight UTC has passed."""
        if now < self._day_end:
            return
        start = now - now % _DAY
        self._day, self._day_end = time.strftime("%Y-%m-%d", time.gmtime(start)), start + _DAY
        for totals in self._totals.values():
            totals.clear()

    def _total(
        self, scope: str, name: str, requests: int, prompt: int, completion: int, cost: float
    ) -> None:
        totals = self._totals.get(scope)
        if totals is None:
            return
        total = totals.get(name)
        if total is None:
            if len(totals) >= MAX_NAMES:
                name = "(other)"
            total = totals.setdefault(name, Spend())
        total.count(requests, prompt, completion, cost)

    def status(self) -> dict[str, Any]:
        """Today's spend per provider, model and client, and every budget's state."""
        now = self._clock()
        self._roll(now)
        out: dict[str, Any] = {"day": self._day}
        for scope, totals in self._totals.items():
            out[scope + "s"] = {name: t.to_json() for name, t in sorted(totals.items())}
        budgets = []
        for where, budget in self._budgets.items():
            spent = self._windows[where].spent(now)
            budgets.append(
                {
                    "scope": budget.scope,
                    "name": budget.name,
                    "budget": budget.limit,
                    "window": budget.window,
                    "spent": round(spent, 9),
                    "remaining": round(max(0.0, budget.limit - spent), 9),
                    "exhausted": spent >= budget.limit,
                }
            )
        out["budgets"] = budgets
        return out
