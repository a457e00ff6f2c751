"""MetaCLIP balancing ("Demystifying CLIP Data", Sec. 3.3, Algorithm 1).

Each entry with ``count`` matching samples is given the probability ``min(1, t / count)``: tail
entries (count < t) keep all their samples, head entries are cut to about t. A sample is kept
when at least one of its matched entries is drawn, each entry independently (MetaCLIP's
``balance_sampling``: ``any(random() < entry_prob[e] for e in matched)``), so its keep probability
is ``1 - prod(1 - p_e)``; a sample that matches no entry is never kept. MetaCLIP uses t = 20,000
for its 400M set (and 170k for 2.5B).

The draws come from :mod:`pipeline.sampling` (a hash of seed, uid and entry id) instead of a global
random stream, so the kept set does not depend on how the pool is partitioned.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.errors import UserError
from pipeline.sampling import solve_increasing, uid_to_uint64, uniform

METACLIP_T = 20_000
METACLIP_POOL = 400_000_000  # the pool size t = 20,000 was chosen for


def scale_t(pool_size: int, t: float = METACLIP_T, reference_pool: int = METACLIP_POOL) -> float:
    """Scale t linearly to a pool of ``pool_size`` samples.

    Entry counts grow in proportion to the pool, so ``t * pool_size / reference_pool`` keeps the same
    entries on the head side of the cut as t does at the reference size. MetaCLIP's own 2.5B
    setting (170k, where linear would be 125k) shows this is a rule of thumb; for an exact subset
    size use :func:`t_for_size`.
    """
    if pool_size <= 0:
        raise ValueError(f"pool_size must be > 0, got {pool_size}")
    return max(1.0, t * pool_size / reference_pool)


def entry_probabilities(counts: np.ndarray, t: float) -> np.ndarray:
    """``min(1, t / count)`` per entry (1 for entries no sample matched)."""
    counts = np.asarray(counts, dtype=np.float64)
    return np.minimum(1.0, t / np.maximum(counts, 1.0))


def sample_probabilities(matched: pa.ListArray, entry_p: np.ndarray) -> np.ndarray:
    """``1 - prod(1 - p_e)`` over each sample's matched entries; 0 for no match."""
    parents = pa.compute.list_parent_indices(matched).to_numpy()
    flat = matched.flatten().to_numpy(zero_copy_only=False)
    return pair_probabilities(parents, entry_p[flat], len(matched))


def pair_probabilities(parents: np.ndarray, pair_p: np.ndarray, n: int) -> np.ndarray:
    """``1 - prod(1 - p)`` over each of ``n`` samples' (sample, entry) pairs (``parents``: each
    pair's sample, ``pair_p``: its entry's probability); 0 for a sample with no pair."""
    with np.errstate(divide="ignore"):
        log_miss = np.log1p(-pair_p)  # -inf where p == 1
    total = np.bincount(parents, weights=log_miss, minlength=n)
    return 1.0 - np.exp(total)


def pair_draws(uids: pa.Array, parents: np.ndarray, keys: np.ndarray, pair_p: np.ndarray, seed: int) -> np.ndarray:
    """MetaCLIP's draw: a sample is kept when one of its (sample, entry) pairs is drawn, each with its
    entry's probability; each pair's draw is keyed by (seed, the sample's uid, the pair's ``keys``)."""
    draws = uniform(uid_to_uint64(uids)[parents], keys, seed)
    return np.bincount(parents[draws < pair_p], minlength=len(uids)) > 0


def t_for_size(matched: pa.ListArray, counts: np.ndarray, target: float) -> float:
    """The t whose expected number of kept samples is ``target`` (within 0.01%).

    The expected size is the sum of the samples' keep probabilities, ``sum(1 - prod(1 - p_e))``,
    which grows with t, so t is found by :func:`pipeline.sampling.solve_increasing` over
    ``[0, max(count)]``.

    Raises:
        ValueError: ``target`` is more than the samples that match any entry (the most t can keep).
    """
    counts = np.asarray(counts, dtype=np.float64)
    reachable = float(np.count_nonzero(pa.compute.list_value_length(matched).to_numpy(zero_copy_only=False)))
    if target > reachable:
        raise UserError(f"target size {target:g} exceeds the {reachable:g} samples that match an entry")

    def expected(ts: list[float]) -> list[float]:
        return expected_sizes(matched, counts, ts)

    return solve_increasing(expected, target, max(1.0, float(counts.max(initial=1.0))))


def balance(
    uids: pa.Array, matched: pa.ListArray, counts: np.ndarray, t: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """MetaCLIP's balanced sampling for a batch of samples.

    Args:
        uids: Sample uids (the draws are keyed by them).
        matched: ``matched_entry_ids`` of each sample.
        counts: Global entry counts over the whole pool.
        t: The balancing threshold.
        seed: Seed of the draws; the same seed selects the same samples.

    Returns:
        ``(metaclip_p, metaclip_keep)``: each sample's keep probability and its draw.
    """
    entry_p = entry_probabilities(counts, t)
    parents = pa.compute.list_parent_indices(matched).to_numpy()
    flat = matched.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    keep = pair_draws(uids, parents, flat.astype(np.uint64), entry_p[flat], seed)
    return sample_probabilities(matched, entry_p), keep


def expected_sizes(matched: pa.ListArray, counts: np.ndarray, ts: list[float]) -> list[float]:
    """Expected kept samples of a batch for each t of ``ts`` (one shard's part of a grid pass)."""
    return [float(sample_probabilities(matched, entry_probabilities(counts, t)).sum()) for t in ts]


