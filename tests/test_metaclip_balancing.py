from __future__ import annotations

import math
import random

import numpy as np
import pyarrow as pa
import pytest

from pipeline.errors import UserError
from pipeline.metaclip.balancing import (
    balance,
    entry_probabilities,
    sample_probabilities,
    scale_t,
    t_for_size,
)
from pipeline.sampling import uid_to_uint64, uniform


def _uids(n: int, seed: int = 0) -> pa.Array:
    rng = random.Random(seed)
    return pa.array([f"{rng.getrandbits(128):032x}" for _ in range(n)], pa.string())


COUNTS = np.array([50, 500, 2_000, 8_000, 20_000])
T = 1_000


@pytest.fixture(scope="module")
def synthetic():
    """A pool where entry e is matched by exactly COUNTS[e] samples, one entry per sample."""
    entry_of = np.repeat(np.arange(len(COUNTS)), COUNTS)
    matched = pa.array([[int(e)] for e in entry_of], pa.list_(pa.int32()))
    return _uids(len(entry_of)), matched, entry_of


def test_kept_fraction_per_entry_is_min_1_t_over_count(synthetic):
    uids, matched, entry_of = synthetic
    p, keep = balance(uids, matched, COUNTS, T, seed=7)
    for e, count in enumerate(COUNTS):
        expected = min(1.0, T / count)
        kept = keep[entry_of == e].mean()
        bound = 4.5 * math.sqrt(expected * (1 - expected) / count)  # binomial, z = 4.5
        assert abs(kept - expected) <= bound, (e, kept, expected, bound)
        assert np.allclose(p[entry_of == e], expected)
    assert keep[entry_of <= 1].all()  # tail entries (count < t) keep every sample


def test_same_seed_same_uids_other_seed_other_uids(synthetic):
    uids, matched, _ = synthetic
    _, a = balance(uids, matched, COUNTS, T, seed=3)
    _, b = balance(uids, matched, COUNTS, T, seed=3)
    _, c = balance(uids, matched, COUNTS, T, seed=4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_draws_do_not_depend_on_partitioning(synthetic):
    uids, matched, _ = synthetic
    _, whole = balance(uids, matched, COUNTS, T, seed=11)
    order = np.random.default_rng(0).permutation(len(uids))
    shuffled_keep = np.empty_like(whole)
    for part in np.array_split(order, 7):  # 7 partitions in a shuffled order
        idx = pa.array(part)
        _, keep = balance(uids.take(idx), matched.take(idx), COUNTS, T, seed=11)
        shuffled_keep[part] = keep
    assert np.array_equal(whole, shuffled_keep)


def test_a_sample_with_several_entries_is_kept_if_any_is_drawn():
    n = 40_000
    matched = pa.array([[2, 3]] * n, pa.list_(pa.int32()))
    p, keep = balance(_uids(n, seed=1), matched, COUNTS, T, seed=0)
    expected = 1 - (1 - 0.5) * (1 - 0.125)
    assert np.allclose(p, expected)
    assert abs(keep.mean() - expected) <= 4.5 * math.sqrt(expected * (1 - expected) / n)
    none = balance(_uids(3), pa.array([[], [], []], pa.list_(pa.int32())), COUNTS, T, seed=0)
    assert none[0].tolist() == [0, 0, 0] and not none[1].any()  # no match, never kept


def test_probabilities_formula():
    assert entry_probabilities(np.array([0, 10, 100, 1000]), 100).tolist() == [1.0, 1.0, 1.0, 0.1]
    matched = pa.array([[0, 3], [3], []], pa.list_(pa.int32()))
    p = sample_probabilities(matched, entry_probabilities(np.array([0, 10, 100, 1000]), 100))
    assert p.tolist() == [1.0, pytest.approx(0.1), 0.0]


def test_scale_t_is_linear_in_pool_size():
    assert scale_t(400_000_000) == 20_000
    assert scale_t(4_000_000) == 200
    assert scale_t(10_000) == 1.0  # never below one sample per entry


def test_t_for_size_hits_the_expected_size(synthetic):
    _, matched, _ = synthetic
    t = t_for_size(matched, COUNTS, 5_000)
    expected = sample_probabilities(matched, entry_probabilities(COUNTS, t)).sum()
    assert expected == pytest.approx(5_000, rel=1e-3)
    with pytest.raises(UserError, match="exceeds the 30550 samples"):
        t_for_size(matched, COUNTS, 40_000)


def test_uid_hashing_is_vectorised_correctly():
    uids = _uids(1000, seed=5)
    assert uid_to_uint64(uids).tolist() == [int(u[:16], 16) for u in uids.to_pylist()]
    sliced = uids.slice(10, 20)
    assert uid_to_uint64(sliced).tolist() == [int(u[:16], 16) for u in sliced.to_pylist()]
    with pytest.raises(ValueError, match="32 hex digits"):
        uid_to_uint64(pa.array(["abc"]))
    draws = uniform(uid_to_uint64(uids), np.zeros(1000, np.uint64), 0)
    assert draws.min() >= 0 and draws.max() < 1 and abs(draws.mean() - 0.5) < 0.05
