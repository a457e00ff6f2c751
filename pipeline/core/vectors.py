"""Vector steps at any pool size: fit on a bounded sample, then apply per shard.

A k-means (DataComp's image-based filter, SemDeDup, MoDE) is trained on a deterministic uniform
sample of the pool, chosen by a hash of the uid (:mod:`pipeline.sampling`), so the sample is the
same on any engine, partitioning or re-run. Each shard task writes its part of the sample to
``<dir>/{shard:05d}.parquet``; the driver reads the parts back in shard order, which bounds its
memory by the sample size, never by the pool. The centres are saved in the pool and every shard is
then assigned by its own task. Anchors: faiss's ``max_points_per_centroid`` (faiss itself
subsamples to at most 256 points per centre), MoDE's fit on about 5% of the pool.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.sampling import uid_to_uint64, uniform
from pipeline.store import schema as S
from pipeline.store.parquet import Pool, shard_name, write_parquet_atomic

VECTOR = "vector"


def sample_rate(wanted: int, population: int) -> float:
    """Share of the population to draw for about ``wanted`` rows (1 when it is all of them)."""
    return 1.0 if population <= wanted else wanted / population


def sample_size(k: int, max_points_per_centroid: int, max_sample: int) -> int:
    """Points a k-means of ``k`` centres trains on: faiss's own cap (``k * max_points_per_centroid``),
    bounded by ``max_sample`` so that memory does not grow with the pool."""
    return max(k, min(k * max_points_per_centroid, max_sample))


def drawn(uids: pa.Array | pa.ChunkedArray, key: int, seed: int, rate: float) -> np.ndarray:
    """The rows of a uniform sample at ``rate``, by hash of (seed, uid, key)."""
    if rate >= 1.0:
        return np.ones(len(uids), dtype=bool)
    return uniform(uid_to_uint64(uids), np.uint64(key), seed) < rate


def shard_vectors(pool: Pool, stage: str, column: str, shard: int, columns: tuple[str, ...] = ()) -> pa.Table:
    """``uid``, the vector column and ``columns`` of one shard, in the download table's row order
    (deterministic: img2dataset writes a shard's samples in varying order), rows without a vector
    left out."""
    order = pool.read_shard("download", shard, columns=[S.UID])[S.UID]
    table = pool.read_shard(stage, shard, columns=[S.UID, column, *columns])
    table = table.filter(pc.is_valid(table[column]))
    rows = pc.index_in(order, value_set=table[S.UID].combine_chunks())
    rows = rows.filter(pc.is_valid(rows))
    return table.take(rows)


def as_float32(column: pa.ChunkedArray | pa.Array, normalise: bool = True) -> np.ndarray:
    """A fixed-size-list vector column as a ``(rows, dim)`` float32 array, L2-normalised."""
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 0:
            return np.zeros((0, column.type.list_size), dtype=np.float32)
        column = column.combine_chunks()
    x = S.vectors(column).astype(np.float32)
    return unit_rows(x) if normalise else x


def unit_rows(x: np.ndarray) -> np.ndarray:
    """``x`` (float32, rows) L2-normalised in place, and returned."""
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def write_sample(out_dir: Path, shard: int, uids: pa.Array, vectors: pa.Array) -> int:
    """One shard's part of a sample (uid + the stored vectors, as they are)."""
    write_parquet_atomic(Path(out_dir) / f"{shard_name(shard)}.parquet", pa.table({S.UID: uids, VECTOR: vectors}))
    return len(uids)


def read_sample(out_dir: Path, shards: list[int], normalise: bool = True) -> tuple[pa.Array, np.ndarray]:
    """The sample's uids and float32 vectors (L2-normalised when ``normalise``), in shard order, read
    into one array sized from the files' footers: the sample is held once, however many shards it
    came from."""
    paths = [Path(out_dir) / f"{shard_name(shard)}.parquet" for shard in shards]
    sizes = [pq.ParquetFile(p).metadata.num_rows for p in paths]
    total = sum(sizes)
    if not total:
        return pa.array([], pa.string()), np.zeros((0, 0), dtype=np.float32)
    dim = next(pq.read_schema(p).field(VECTOR).type.list_size for p, n in zip(paths, sizes, strict=True) if n)
    x = np.empty((total, dim), dtype=np.float32)
    uids, at = [], 0
    for path, n in zip(paths, sizes, strict=True):
        if n:
            table = pq.read_table(path)
            uids.append(table[S.UID].combine_chunks())
            x[at : at + n] = as_float32(table[VECTOR], normalise)
            at += n
    return pa.concat_arrays(uids), x


def clusters_for(rows: int, k: int | None, per_cluster: int) -> int:
    """k as configured, or the pool's rows over ``per_cluster`` (at least 1)."""
    return k or max(1, round(rows / per_cluster))


# -- the one k-means, the one nearest-centre search and the one sample fit ---------------------------

def kmeans(x: np.ndarray, k: int, *, iterations: int, seed: int, max_points_per_centroid: int = 1 << 20,
           spherical: bool = False) -> np.ndarray:  # fmt: skip
    """faiss k-means centres (L2 as DataComp and SemDeDup train them; ``spherical`` keeps the centres
    normalised, for cosine, as MoDE's). faiss subsamples to ``k * max_points_per_centroid`` points."""
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, spherical=spherical,
                      max_points_per_centroid=max_points_per_centroid, verbose=False)  # fmt: skip
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids.copy()


def kmeans_on_sample(train: np.ndarray, k: int, cfg: Any) -> np.ndarray:
    """k-means centres of an already bounded uid-hash sample (the image filter's and SemDeDup's, with
    their ``kmeans_*`` settings): faiss trains on all of it rather than copying a subsample of its
    own (its cap is raised to the sample's size)."""
    return kmeans(train, k, iterations=cfg.kmeans_iterations, seed=cfg.seed,
                  max_points_per_centroid=max(cfg.kmeans_max_points_per_centroid, -(-len(train) // k)))  # fmt: skip


def nearest(x: np.ndarray, centres: np.ndarray, metric: str, k: int = 1,
            batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The ``k`` nearest centres of each row (an exact faiss flat search), ``batch`` rows at a time.

    Args:
        metric: ``dot`` (largest dot product, DataComp's ``get_centroid_ids_gpu``), ``cosine`` (the
            same search over normalised rows; distance ``1 - cos``) or ``euclidean`` (L2).

    Returns:
        ``(ids, scores)``, each ``(rows, k)``: the dot product for ``dot``, ``1 - cos`` for
        ``cosine``, the L2 distance for ``euclidean``.
    """
    import faiss

    if metric not in ("dot", "cosine", "euclidean"):
        raise ValueError(f"unknown metric {metric!r}")
    dim = centres.shape[1]
    index = faiss.IndexFlatL2(dim) if metric == "euclidean" else faiss.IndexFlatIP(dim)
    index.add(np.ascontiguousarray(centres, dtype=np.float32))
    step = batch or max(len(x), 1)
    ids, scores = np.empty((len(x), k), dtype=np.int64), np.empty((len(x), k), dtype=np.float32)
    for i in range(0, len(x), step):
        rows = np.ascontiguousarray(x[i : i + step], dtype=np.float32)
        scores[i : i + step], ids[i : i + step] = index.search(rows, k)
    if metric == "cosine":
        scores = 1.0 - scores
    elif metric == "euclidean":
        scores = np.sqrt(np.maximum(scores, 0))
    return ids, scores.astype(np.float32)


def fit_sample(pool: Pool, engine: Any, task: Callable[[int], int], shards: list[int], out_dir: Path, *,
               desc: str, by_uid: bool = False, normalise: bool = True,
               progress: bool = True) -> tuple[pa.Array, np.ndarray]:  # fmt: skip
    """The one sample fit's draw: ``task(shard)`` writes each shard's part of a uid-hash sample
    (:func:`write_sample`) as an engine task; the parts are read back in shard order (or in uid
    order, ``by_uid``: then neither a shard's row order nor the sharding changes what a k-means is
    fitted on) into one array the size of the sample, never of the pool.

    Returns:
        The sample's uids and float32 vectors (L2-normalised when ``normalise``).
    """
    from pipeline.core import runner

    runner.map_shards(pool, engine, task, shards, desc=desc, progress=progress)
    uids, x = read_sample(out_dir, shards, normalise=normalise)
    if by_uid and len(uids):
        order = np.argsort(uids.to_numpy(zero_copy_only=False).astype("U32"), kind="stable")
        uids, x = uids.take(pa.array(order)), x[order]
    return uids, x
