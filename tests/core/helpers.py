"""Small builders shared by the core's tests."""

from __future__ import annotations

from typing import Any

from keyrotor.core import (
    Decision,
    Deliver,
    KeySpec,
    KeyStateChanged,
    Pool,
    PoolConfig,
    Probe,
    Reject,
    RequestStarted,
    ResponseFinished,
    ResponseReceived,
    Send,
)


def make_pool(*key_ids: str, **options: Any) -> Pool:
    """A pool of plain keys (``KeySpec`` dicts via ``specs=`` for more)."""
    specs = options.pop("specs", None) or [KeySpec(key_id=k) for k in key_ids]
    return Pool(PoolConfig(keys=specs, **options))


def sends(decisions: list[Decision]) -> list[Send]:
    return [d for d in decisions if isinstance(d, Send)]


def only(decisions: list[Decision], kind: type) -> Any:
    """The single decision of ``kind`` in ``decisions``."""
    found = [d for d in decisions if isinstance(d, kind)]
    assert len(found) == 1, decisions
    return found[0]


def changes(decisions: list[Decision]) -> list[tuple[str, str, str]]:
    return [
        (d.key_id, d.old.value, d.new.value) for d in decisions if isinstance(d, KeyStateChanged)
    ]


def probes(decisions: list[Decision]) -> list[str]:
    return [d.key_id for d in decisions if isinstance(d, Probe)]


__all__ = ["Deliver", "Reject", "changes", "make_pool", "only", "probes", "sends"]


def start(pool: Pool, rid: str, now: float, **kw: object) -> list[Decision]:
    return pool.handle(RequestStarted(request_id=rid, now=now, **kw))  # type: ignore[arg-type]


def respond(pool: Pool, rid: str, now: float, status: int, **kw: object) -> list[Decision]:
    return pool.handle(ResponseReceived(request_id=rid, now=now, status=status, **kw))  # type: ignore[arg-type]


def finish(pool: Pool, rid: str, now: float, **kw: object) -> list[Decision]:
    return pool.handle(ResponseFinished(request_id=rid, now=now, **kw))  # type: ignore[arg-type]
