"""``KeySpec`` and ``PoolConfig`` bounds a review found missing: an alias with
a final newline, a seed the hash ring cannot take, an affinity ring too large
to build."""

from __future__ import annotations

import pytest

from keyrotor.core import KeySpec, PoolConfig, PoolError
from keyrotor.core.config import AFFINITY_POINTS_MAX, AFFINITY_VNODES_MAX, SEED_MAX, SEED_MIN


@pytest.mark.parametrize("alias", ["main\n", "nl\n", "a\nb", "\nmain"])
def test_an_alias_with_a_newline_is_refused(alias: str) -> None:
    with pytest.raises(PoolError, match="invalid key_id"):
        KeySpec(key_id=alias)


@pytest.mark.parametrize("seed", [SEED_MAX + 1, SEED_MIN - 1, 2**64, -(2**200)])
def test_a_seed_beyond_64_bits_is_refused(seed: int) -> None:
    with pytest.raises(PoolError, match="seed must be a signed 64-bit integer"):
        PoolConfig(keys=[KeySpec(key_id="a")], policy="affinity", seed=seed)


@pytest.mark.parametrize("seed", [SEED_MAX, SEED_MIN, 0])
def test_every_64_bit_seed_builds_an_affinity_pool(seed: int) -> None:
    from keyrotor.core import Pool

    Pool(PoolConfig(keys=[KeySpec(key_id="a")], policy="affinity", seed=seed))


def test_affinity_vnodes_and_points_per_key_are_bounded() -> None:
    with pytest.raises(PoolError, match=f"affinity_vnodes must be at most {AFFINITY_VNODES_MAX}"):
        PoolConfig(keys=[], affinity_vnodes=AFFINITY_VNODES_MAX + 1)
    heavy = KeySpec(key_id="a", weight=AFFINITY_POINTS_MAX / 16 + 1)
    with pytest.raises(PoolError, match="points on the affinity ring"):
        PoolConfig(keys=[heavy], policy="affinity")
    with pytest.raises(PoolError, match="points on the affinity ring"):
        PoolConfig(keys=[heavy], policy="weighted")  # sessions walk the ring under any policy
    PoolConfig(keys=[KeySpec(key_id="a", weight=AFFINITY_POINTS_MAX / 16)], policy="affinity")
