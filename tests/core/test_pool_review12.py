"""A key removed while it was probed and added again under the same id: the old
probe's ``ProbeFinished`` names only the id, so the new key starts no probe of
its own until it has ended, and its answer never reaches the new key (review 12)."""

from __future__ import annotations

import json

import pytest

from keyrotor.core import (
    KeyAdded,
    KeyRemoved,
    KeySpec,
    KeyState,
    Pool,
    PoolError,
    ProbeFinished,
    ProbeRequested,
    RequestStarted,
    ResponseReceived,
    Send,
)

from .helpers import changes, make_pool, only, probes


def _readded_while_probed() -> Pool:
    """``a`` probed, removed, and added again: its old probe still runs."""
    pool = make_pool("a", "b")
    assert probes(pool.handle(ProbeRequested(now=0.0, key_id="a"))) == ["a"]
    pool.handle(KeyRemoved(key_id="a", now=0.5))
    pool.handle(KeyAdded(key=KeySpec(key_id="a"), now=0.6))
    return pool


def test_the_old_probes_end_does_not_reach_the_new_key() -> None:
    pool = _readded_while_probed()
    out = pool.handle(ProbeFinished(key_id="a", now=1.0, status=401))
    assert changes(out) == [] and probes(out) == []
    assert pool.state_of("a") is KeyState.HEALTHY
    # Answered once: a second end is a driver's mistake, refused as before.
    with pytest.raises(PoolError, match="no probe of key 'a' is running"):
        pool.handle(ProbeFinished(key_id="a", now=1.1, status=200))


def test_the_new_key_probes_only_once_the_old_probe_has_ended() -> None:
    pool = _readded_while_probed()
    assert probes(pool.handle(ProbeRequested(now=0.7, key_id="a"))) == []
    # A 401 on the new key: its confirming probe waits for the old one.
    send = only(pool.handle(RequestStarted(request_id="r", now=0.8, pin="a")), Send)
    assert send.key_id == "a"
    out = pool.handle(ResponseReceived(request_id="r", now=0.9, status=401))
    assert changes(out) == [("a", "healthy", "failed")] and probes(out) == []
    # The old probe's 200 does not recover the new key; the new key is probed now.
    out = pool.handle(ProbeFinished(key_id="a", now=1.0, status=200))
    assert changes(out) == [] and probes(out) == ["a"]
    assert pool.state_of("a") is KeyState.FAILED
    out = pool.handle(ProbeFinished(key_id="a", now=1.5, status=200))
    assert changes(out) == [("a", "failed", "recovering")]


def test_removed_again_before_the_old_probe_ended() -> None:
    pool = _readded_while_probed()
    pool.handle(KeyRemoved(key_id="a", now=0.7))
    assert pool.handle(ProbeFinished(key_id="a", now=1.0, status=200)) == []
    pool.handle(KeyAdded(key=KeySpec(key_id="a"), now=1.1))
    assert probes(pool.handle(ProbeRequested(now=1.2, key_id="a"))) == ["a"]


def test_a_snapshot_keeps_the_held_back_probe() -> None:
    pool = Pool.restore(json.loads(json.dumps(_readded_while_probed().snapshot())))
    assert pool.handle(ProbeFinished(key_id="a", now=1.0, status=401)) == []
    assert probes(pool.handle(ProbeRequested(now=1.1, key_id="a"))) == ["a"]
