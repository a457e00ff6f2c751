"""MoDE: two-level clustering of caption embeddings, data-expert subsets and routing weights.

"MoDE: CLIP Data Experts via Clustering" (Ma et al., CVPR 2024), Sec. 3.2 and the code in
facebookresearch/MetaCLIP ``apps/mode``: captions are embedded by a text encoder, clustered into
many fine-grained clusters (1,024, balanced k-means, fitted on a ~5% sample), whose centres are
clustered again into a few coarse clusters, one per data expert (4). Every sample is then assigned
to its nearest fine centre, and through it to an expert.

Balanced k-means: MoDE uses the auction-based balanced k-means of kernelmachine/balanced-kmeans
(not installable here). We use a documented equivalent: Lloyd iterations whose assignment step
fills each centre up to ``ceil(n / k)`` members, points proposing to their nearest centres in
order of distance and each centre accepting its closest proposers (a greedy, vectorised form of
the same capacity-constrained assignment), started from plain k-means (faiss) centres.

Routing (``post_report_ensemble.py``): each class name of a task is embedded with the same
caption encoder; its Euclidean distance ``d`` to the nearest fine centre and that centre's expert
are found; expert ``e`` gets ``w_e = sum exp((a - d) * m)`` over its classes, with
``a = exp(0.5 - sqrt(n)) if n < 10 else 0`` and ``m = s0 * log10(max(10, n - too_many_class))``
for ``n`` classes, and the weights are ``softmax(w / s1)`` with ``(s0, s1) = (5.0, 8.0)`` and
``too_many_class = 200`` as MoDE sets them.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from pipeline.config import ModeConfig
from pipeline.core.vectors import kmeans, nearest, unit_rows


def normalize(x: np.ndarray) -> np.ndarray:
    """``x`` as float32 rows, L2-normalised, in a new array (``x`` is left as it is)."""
    return unit_rows(np.array(x, dtype=np.float32))


def balanced_assign(x: np.ndarray, centers: np.ndarray, metric: str, candidates: int = 32) -> np.ndarray:
    """Assign every row to a centre, at most ``ceil(n / k)`` rows per centre, nearest first."""
    n, k = len(x), len(centers)
    capacity = math.ceil(n / k)
    ids, dist = nearest(x, centers, metric, min(candidates, k))
    labels = np.full(n, -1, dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    ptr = np.zeros(n, dtype=np.int64)
    for _ in range(ids.shape[1]):
        open_rows = np.nonzero((labels < 0) & (ptr < ids.shape[1]))[0]
        if not open_rows.size:
            break
        cand, d = ids[open_rows, ptr[open_rows]], dist[open_rows, ptr[open_rows]]
        order = np.lexsort((d, cand))  # by centre, then closest first
        cand, rows = cand[order], open_rows[order]
        starts = np.r_[0, np.nonzero(np.diff(cand))[0] + 1]
        rank = np.arange(len(cand)) - np.repeat(starts, np.diff(np.r_[starts, len(cand)]))
        accept = rank < capacity - load[cand]
        labels[rows[accept]] = cand[accept]
        np.add.at(load, cand[accept], 1)
        ptr[rows[~accept]] += 1
    for row in np.nonzero(labels < 0)[0]:  # every candidate was full: the nearest centre with room
        room = np.nonzero(load < capacity)[0]
        best = room[nearest(x[row : row + 1], centers[room], metric)[0][0, 0]]
        labels[row], load[best] = best, load[best] + 1
    return labels


def balanced_kmeans(x: np.ndarray, k: int, metric: str, iterations: int, seed: int) -> np.ndarray:
    """Balanced k-means centres (see the module docstring), from plain k-means centres."""
    centers = kmeans(x, k, iterations=iterations, seed=seed, spherical=metric == "cosine")
    for _ in range(iterations):
        labels = balanced_assign(x, centers, metric)
        sums = np.zeros_like(centers)
        np.add.at(sums, labels, x)
        counts = np.bincount(labels, minlength=k)[:, None]
        centers = np.where(counts > 0, sums / np.maximum(counts, 1), centers).astype(np.float32)
        if metric == "cosine":
            centers = normalize(centers)
    return centers


@dataclass(frozen=True)
class Hierarchy:
    """Fitted MoDE centres."""

    fine: np.ndarray  # (n_fine, d)
    coarse: np.ndarray  # (n_experts, d)
    fine_to_expert: np.ndarray  # (n_fine,)
    plain_fine: np.ndarray  # the plain k-means fine centres (for the balance report)
    plain_fine_to_expert: np.ndarray  # (n_fine,): experts by plain k-means of the fine centres (report)


def fit_hierarchy(x: np.ndarray, cfg: ModeConfig) -> Hierarchy:
    """Fine centres on ``x`` (balanced or plain), then coarse centres of the fine centres."""
    if cfg.metric == "cosine":
        x = normalize(x)
    k = min(cfg.n_fine, len(x))
    plain = kmeans(x, k, iterations=cfg.iterations, seed=cfg.seed, spherical=cfg.metric == "cosine")
    fine = balanced_kmeans(x, k, cfg.metric, cfg.iterations, cfg.seed) if cfg.balanced else plain
    # MoDE's prep_hrchy.py clusters the fine centres into experts with balanced k-means
    # (cluster_coarse(balanced=1)): every expert gets about n_fine / n_experts fine clusters
    spherical = cfg.metric == "cosine"
    plain_coarse = kmeans(fine, cfg.n_experts, iterations=cfg.iterations, seed=cfg.seed, spherical=spherical)
    plain_to_expert = nearest(fine, plain_coarse, cfg.metric)[0][:, 0]
    if cfg.balanced_coarse:
        coarse = balanced_kmeans(fine, cfg.n_experts, cfg.metric, cfg.iterations, cfg.seed)
        fine_to_expert = balanced_assign(fine, coarse, cfg.metric)
    else:
        coarse, fine_to_expert = plain_coarse, plain_to_expert
    return Hierarchy(fine=fine, coarse=coarse, fine_to_expert=fine_to_expert.astype(np.int32), plain_fine=plain,
                     plain_fine_to_expert=plain_to_expert.astype(np.int32))  # fmt: skip


def routing_weights(
    class_embeddings: np.ndarray,
    fine: np.ndarray,
    fine_to_expert: np.ndarray,
    n_experts: int,
    smooth_weight: tuple[float, float] = (5.0, 8.0),
    too_many_class: int = 200,
) -> np.ndarray:
    """MoDE's ensemble weights over experts for a task's class embeddings (module docstring)."""
    ids, dist = nearest(class_embeddings, fine, "euclidean")
    dist, expert = dist[:, 0].astype(np.float64), fine_to_expert[ids[:, 0]]
    n_class = len(class_embeddings)
    sharpen_add = math.exp(0.5 - math.sqrt(n_class)) if n_class < 10 else 0.0
    sharpen_mul = smooth_weight[0] * math.log10(max(10, n_class - too_many_class))
    raw = np.zeros(n_experts)
    for e in range(n_experts):
        if (expert == e).any():
            raw[e] = np.exp((sharpen_add - dist[expert == e]) * sharpen_mul).sum()
    z = raw / smooth_weight[1]
    z = np.exp(z - z.max())
    return z / z.sum()


def gini(sizes: np.ndarray) -> float:
    """Gini coefficient of cluster sizes: 0 for equal sizes, towards 1 for one giant cluster."""
    x = np.sort(np.asarray(sizes, dtype=np.float64))
    if x.sum() == 0:
        return 0.0
    n = len(x)
    return float(2 * (np.arange(1, n + 1) * x).sum() / (n * x.sum()) - (n + 1) / n)


def size_spread(sizes: np.ndarray) -> dict[str, float]:
    sizes = np.asarray(sizes)
    return {"clusters": len(sizes), "min": int(sizes.min()), "median": float(np.median(sizes)),
            "max": int(sizes.max()), "gini": round(gini(sizes), 4)}  # fmt: skip


_WORD = re.compile(r"[a-z][a-z'-]{2,}")


def top_terms(captions: list[str], groups: np.ndarray, n_groups: int, k: int = 10) -> list[list[str]]:
    """The ``k`` most characteristic words of each group's captions (class-based TF-IDF:
    ``tf(t, g) / len(g) * log(1 + mean group length / total count of t)``, stop words removed)."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    counts = [Counter() for _ in range(n_groups)]
    for caption, group in zip(captions, groups, strict=True):
        counts[group].update(w for w in _WORD.findall((caption or "").lower()) if w not in ENGLISH_STOP_WORDS)
    total = sum(counts, Counter())
    mean_len = np.mean([sum(c.values()) for c in counts]) or 1.0
    out = []
    for c in counts:
        size = sum(c.values()) or 1
        scored = sorted(c, key=lambda t: (-(c[t] / size) * math.log(1 + mean_len / total[t]), t))
        out.append(scored[:k])
    return out
