"""OpenRouter's free-model limits, kept per account so they are never hit.

Free (``:free``) models allow each *account* 20 requests a minute and 50 a
day, or 1000 a day once the account bought 10 credits; the day resets at
00:00 UTC (OpenRouter's documented limits). More keys of one account add nothing;
keys of N accounts give N quotas. ``FreeTier`` counts every account's use and
hands out a request slot only where both limits leave room, so the limit
answers do not happen: ``take(now)`` names the account to send on (the one
with the most of its day left) or None, ``wait(now)`` says when a slot opens.

The minute is paced over ``window`` seconds (61 by default: one more than
the upstream's, so that clock skew and the time a request takes to arrive
cannot put 21 requests in one of its minutes). Time is Unix time, passed in;
nothing here reads a clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import attrs

from .routing import Skip

__all__ = ["FREE_PER_DAY", "FREE_PER_DAY_WITH_CREDITS", "FREE_PER_MINUTE", "FreeTier"]

FREE_PER_MINUTE = 20
FREE_PER_DAY = 50
FREE_PER_DAY_WITH_CREDITS = 1000
WINDOW = 61.0
_DAY = 86400.0


def utc_day(now: float) -> int:
    """The UTC day number of Unix time ``now``."""
    return int(now // _DAY)


def _clock_time(seconds: float) -> str:
    """``HH:MM:SS`` UTC of Unix time ``seconds``."""
    s = int(seconds % _DAY)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


@attrs.define
class _Account:
    name: str
    per_day: int
    day: int = -1
    used: int = 0  # requests on ``day``
    recent: deque[float] = attrs.Factory(deque)  # times of the requests in the window
    spent_at: float | None = None  # when ``used`` reached ``per_day`` on ``day``

    def roll(self, now: float, window: float) -> None:
        today = utc_day(now)
        if today != self.day:
            self.day, self.used, self.spent_at = today, 0, None
        recent = self.recent
        while recent and recent[0] <= now - window:
            recent.popleft()

    def mark_spent(self, now: float) -> None:
        if self.spent_at is None and self.used >= self.per_day:
            self.spent_at = now


class FreeTier:
    """Per-account free-model use (see the module's docstring).

    ``accounts``: account name -> its daily limit (``FREE_PER_DAY`` or
    ``FREE_PER_DAY_WITH_CREDITS``)."""

    def __init__(
        self,
        accounts: Mapping[str, int],
        per_minute: int = FREE_PER_MINUTE,
        window: float = WINDOW,
    ) -> None:
        if per_minute < 1 or not window > 0:
            raise ValueError(f"per_minute must be >= 1 and window > 0, got {per_minute}, {window}")
        for name, per_day in accounts.items():
            if type(per_day) is not int or per_day < 0:
                raise ValueError(f"account {name!r}: the daily limit must be >= 0, got {per_day!r}")
        self._accounts = {name: _Account(name, per_day) for name, per_day in accounts.items()}
        self.per_minute = per_minute
        self.window = window

    @property
    def accounts(self) -> list[str]:
        return list(self._accounts)

    def set_accounts(self, accounts: Mapping[str, int]) -> None:
        """The accounts now (keys come and go): new ones start at zero, the
        others keep their counts, with the daily limit given."""
        old = self._accounts
        self._accounts = {
            name: attrs.evolve(old[name], per_day=per_day)
            if name in old
            else _Account(name, per_day)
            for name, per_day in accounts.items()
        }

    def _open(self, now: float) -> list[_Account]:
        """The accounts with room now, the most of their day left first."""
        room = []
        for account in self._accounts.values():
            account.roll(now, self.window)
            if account.used < account.per_day and len(account.recent) < self.per_minute:
                room.append(account)
        room.sort(key=lambda a: (a.used - a.per_day, len(a.recent)))
        return room

    def room(self, now: float) -> list[str]:
        """The accounts with room for a free request now (keys aside)."""
        return [account.name for account in self._open(now)]

    def take(self, now: float, among: Iterable[str] | None = None) -> str | None:
        """Count one free request now on the account with the most room (only
        ``among`` those, if given) and name it; None: no account has room."""
        allowed = None if among is None else set(among)
        for account in self._open(now):
            if allowed is None or account.name in allowed:
                account.used += 1
                account.recent.append(now)
                account.mark_spent(now)
                return account.name
        return None

    def note(self, name: str, now: float) -> None:
        """Count a free request sent on ``name`` without ``take`` (room or not)."""
        account = self._accounts.get(name)
        if account is not None:
            account.roll(now, self.window)
            account.used += 1
            account.recent.append(now)
            account.mark_spent(now)

    def limit_met(self, name: str, now: float, daily: bool) -> None:
        """The upstream answered ``name``'s free request with its limit after
        all (a tier set too high, another client on the account): count the
        day (``daily``) or the window as full, so no more are sent until then."""
        account = self._accounts.get(name)
        if account is None:
            return
        account.roll(now, self.window)
        if daily:
            account.used = max(account.used, account.per_day)
            account.mark_spent(now)
        else:
            account.recent.extend([now] * max(0, self.per_minute - len(account.recent)))

    def limits(self, name: str) -> tuple[int, int, float]:
        """(per day, per minute, window) of account ``name``."""
        return self._accounts[name].per_day, self.per_minute, self.window

    def sync(self, name: str, now: float, used: int, free_in: float | None = None) -> None:
        """What other processes of the pool counted on ``name``: ``used`` requests
        today at least, and (``free_in``) its minute full for that many seconds."""
        account = self._accounts.get(name)
        if account is None:
            return
        account.roll(now, self.window)
        account.used = max(account.used, used)
        account.mark_spent(now)
        if free_in is not None and free_in > 0:
            at = now + free_in - self.window  # leaves the window in ``free_in`` s
            fill = [at] * max(0, self.per_minute - len(account.recent))
            account.recent = deque(sorted([*account.recent, *fill]))

    def give_back(self, name: str, now: float, at: float | None = None) -> None:
        """Uncount a request ``take`` counted at ``at`` (default: the latest)
        that never reached the upstream: its own entry of the minute, and of
        the day only if it was taken today."""
        account = self._accounts.get(name)
        if account is None:
            return
        account.roll(now, self.window)
        if account.used and (at is None or utc_day(at) == account.day):
            account.used -= 1
            if account.used < account.per_day:
                account.spent_at = None
        recent = account.recent
        if at is None:
            if recent:
                recent.pop()
        elif at in recent:  # else it left the window already
            recent.remove(at)

    def wait(self, now: float, among: Collection[str] | None = None) -> float | None:
        """Seconds until some account (of ``among``, if given) has room (0:
        now); None: no such account has a daily quota at all."""
        waits = []
        for account in self._accounts.values():
            if among is not None and account.name not in among:
                continue
            account.roll(now, self.window)
            if account.per_day == 0:
                continue
            if account.used >= account.per_day:
                waits.append((utc_day(now) + 1) * _DAY - now)
            elif len(account.recent) >= self.per_minute:
                waits.append(account.recent[0] + self.window - now)
            else:
                return 0.0
        return max(0.0, min(waits)) if waits else None

    def skip(self, now: float, among: Collection[str] | None = None) -> Skip | None:
        """Why free models are passed over now (None: some account, of
        ``among`` if given, has room)."""
        wait = self.wait(now, among)
        if wait == 0.0:
            return None
        if wait is None:
            return Skip("no account has a free-model quota")
        accounts = [a for a in self._accounts.values() if among is None or a.name in among]
        spent = [a.name for a in accounts if a.used >= a.per_day]
        if len(spent) == len(accounts):
            who = "every account" if len(spent) > 1 else f"account {spent[0]}"
            return Skip(f"free quota of {who} spent until 00:00 UTC", wait)
        return Skip(
            f"free-model pace of {self.per_minute}/min reached on every account until "
            f"{_clock_time(now + wait)} UTC",
            wait,
        )

    def restore(self, used: Mapping[str, int], now: float) -> None:
        """Put back today's counts (account -> requests) after a restart."""
        for name, count in used.items():
            account = self._accounts.get(name)
            if account is not None:
                account.roll(now, self.window)
                account.used = max(account.used, count)

    def status(self, now: float) -> dict[str, Any]:
        """Per account: today's use and limit, the last window's, for ``/status``."""
        out = {}
        for account in self._accounts.values():
            account.roll(now, self.window)
            out[account.name] = {
                "usedToday": account.used,
                "perDay": account.per_day,
                "lastMinute": len(account.recent),
                "perMinute": self.per_minute,
                "spentAt": account.spent_at,
            }
        return out
