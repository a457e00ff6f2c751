"""Deduplication: exact duplicates by image hash, then semantic near-duplicates the SemDeDup way.

**Exact**: samples whose downloaded bytes have the same sha256 form a group; the one with the
smallest uid is kept (deterministic and independent of shard order).

**Semantic** ("SemDeDup: Data-efficient learning at web-scale through semantic deduplication",
Abbas et al. 2023, Sec. 3 and facebookresearch/SemDeDup): over the L2-normalised image embeddings
of the samples left,

1. k-means (faiss, L2); each sample joins its nearest centroid;
2. within each cluster, samples are sorted by cosine distance to the centroid, farthest first
   (SemDeDup's default ``keep_hard=True``: the hardest example of a group is kept; ties by uid);
3. with ``S`` the cluster's cosine-similarity matrix in that order, sample ``j`` is dropped when
   ``max_{i<j} S[i, j] > 1 - eps`` (SemDeDup's ``semdedup``: the column maximum of the strict upper
   triangle, over every earlier sample, dropped or not).

So the first sample of every set of mutual near-duplicates is kept. ``dup_group`` names, for every
sample linked to another by a pair above the threshold (or by an identical hash), the uid of the
first kept sample of its connected group.
"""

from __future__ import annotations

import numpy as np

from pipeline.filters.image_based import kmeans_l2


def exact_groups(uids: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each sample: index of its group's representative (smallest uid) and the group size."""
    order = np.lexsort((uids, hashes))  # by hash, then uid
    h = hashes[order]
    starts = np.r_[True, h[1:] != h[:-1]]
    first = np.maximum.accumulate(np.where(starts, np.arange(len(h)), 0))
    rep = np.empty(len(h), dtype=np.int64)
    rep[order] = order[first]
    sizes = np.bincount(np.cumsum(starts) - 1)
    size = np.empty(len(h), dtype=np.int64)
    size[order] = sizes[np.cumsum(starts) - 1]
    return rep, size


def semdedup(x: np.ndarray, uids: np.ndarray, k: int, eps: float, iterations: int, seed: int,
             max_points_per_centroid: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """SemDeDup over normalised rows ``x`` (module docstring).

    Returns:
        ``keep`` (bool), ``group`` (index of the group's first kept sample, -1 if the sample has no
        near-duplicate) and ``cluster`` (the k-means cluster of each row).
    """
    import faiss
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    keep = np.ones(n, dtype=bool)
    if n < 2:
        return keep, np.full(n, -1), np.zeros(n, dtype=np.int64)
    k = max(1, min(k, n))
    centroids = kmeans_l2(x, k, iterations, seed, max_points_per_centroid)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(centroids)
    cluster = index.search(x, 1)[1][:, 0]
    unit = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    cos_dist = 1.0 - np.einsum("ij,ij->i", x, unit[cluster])
    # members of each cluster, farthest from the centroid first, ties by uid
    order = np.lexsort((uids, -cos_dist, cluster))
    bounds = np.r_[0, np.cumsum(np.bincount(cluster, minlength=k))]
    rows, cols = [], []
    for c in range(k):
        members = order[bounds[c] : bounds[c + 1]]
        if len(members) < 2:
            continue
        xm = x[members]
        for a in range(1, len(members), block):  # columns j in blocks: memory O(cluster size * block)
            b = min(a + block, len(members))
            sim = xm[:b] @ xm[a:b].T  # rows i < b, columns j in [a, b)
            upper = (sim > 1.0 - eps) & (np.arange(b)[:, None] < np.arange(a, b)[None, :])
            keep[members[a:b][upper.any(axis=0)]] = False  # max_{i<j} S[i, j] > 1 - eps
            i, j = np.nonzero(upper)
            rows.append(members[i])
            cols.append(members[a + j])
    group = np.full(n, -1, dtype=np.int64)
    if rows:
        r, c = np.concatenate(rows), np.concatenate(cols)
        linked = np.zeros(n, dtype=bool)
        linked[r] = linked[c] = True
        _, label = connected_components(coo_matrix((np.ones(len(r)), (r, c)), shape=(n, n)), directed=False)
        # the group's first member in SemDeDup order: it has no earlier neighbour, so it is kept
        labels, at = np.unique(label[order], return_index=True)
        first = np.empty(label.max() + 1, dtype=np.int64)
        first[labels] = order[at]
        group[linked] = first[label[linked]]
    return keep, group, cluster
