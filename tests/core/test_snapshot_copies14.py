"""A snapshot holds copies: later events change neither it nor a pool restored
from it in memory (the request's ``tried`` keys and ``holds`` were shared)."""

from __future__ import annotations

import copy
import json

from keyrotor.core import KeySpec, Pool, PoolConfig, RequestStarted, ResponseReceived


def pool_with_a_held_request() -> Pool:
    """``r1`` answered 503 with a Retry-After on its first key: held off it, sent on."""
    pool = Pool(PoolConfig(keys=[KeySpec(key_id=k) for k in "abc"], seed=0))
    pool.handle(RequestStarted(request_id="r1", now=0.0))
    pool.handle(ResponseReceived(request_id="r1", now=0.1, status=503, retry_after=10.0))
    return pool


def test_a_snapshot_does_not_change_after_it_is_taken() -> None:
    pool = pool_with_a_held_request()
    snapshot = pool.snapshot()
    taken = copy.deepcopy(snapshot)
    pool.handle(ResponseReceived(request_id="r1", now=0.2, status=503, retry_after=20.0))
    assert snapshot == taken
    (request,) = snapshot["requests"]
    assert len(request["tried"]) == 1 and len(request["holds"]) == 1


def test_a_pool_restored_in_memory_does_not_see_the_originals_events() -> None:
    pool = pool_with_a_held_request()
    twin = Pool.restore(pool.snapshot())
    before = json.dumps(twin.snapshot())
    pool.handle(ResponseReceived(request_id="r1", now=0.2, status=503, retry_after=20.0))
    assert json.dumps(twin.snapshot()) == before
