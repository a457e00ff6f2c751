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

So the first sample of every set of mutual near-duplicates is kept.

At pool scale (:func:`run_dedup`) the work is split into bounded steps, as NeMo Curator's semantic
dedup and datatrove's MinHash dedup split theirs:

1. exact groups: SQL (group by sha256, join back) written by the engine, sorted by shard;
2. k-means fitted on a uid-hash sample of the images left (:mod:`pipeline.core.vectors`);
3. per shard: each image's cluster and distance, written with its vector;
4. cluster sizes (SQL), packed into groups; the engine regroups the vectors by group (a sorted SQL
   write), and one task per group applies SemDeDup to each of its clusters, loading only that group;
5. a cluster above ``dedup_max_cluster_size`` is a group of its own, whose task splits it by a second
   k-means fitted on a sample of it (its members are compared only within their sub-cluster, still
   in the order of their distance to the first-level centre);
6. only the dropped samples are stored, each with ``dup_of``: for an exact duplicate the group's
   kept sample (smallest uid), for a semantic one the most similar kept sample before it in
   SemDeDup's order; they are regrouped by shard (SQL) and each shard writes ``tables/dedup``.

``dup_group`` is that ``dup_of`` uid for a dropped sample, null for a kept one.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.core.step import BY_SHARD, Read, Step
from pipeline.core.vectors import kmeans, nearest
from pipeline.store import schema as S


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


def dedup_members(xm: np.ndarray, eps: float, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """SemDeDup inside one cluster whose rows ``xm`` are in SemDeDup order.

    Returns:
        ``keep`` and, for each dropped row, the most similar kept row before it (-1 for kept rows).
        Memory: ``len(xm) * block`` similarities at a time.
    """
    n = len(xm)
    keep = np.ones(n, dtype=bool)
    dup_of = np.full(n, -1, dtype=np.int64)
    for a in range(1, n, block):  # columns j in blocks
        b = min(a + block, n)
        sim = xm[:b] @ xm[a:b].T  # rows i < b, columns j in [a, b)
        earlier = np.arange(b)[:, None] < np.arange(a, b)[None, :]
        dropped = ((sim > 1.0 - eps) & earlier).any(axis=0)  # max_{i<j} S[i, j] > 1 - eps
        keep[a:b][dropped] = False
        if dropped.any():
            # keep[:b] is final for every row before each dropped column j (rows a..j-1 of this block
            # are decided by earlier rows only)
            candidates = np.where(earlier & keep[:b, None], sim, -np.inf)
            dup_of[a:b][dropped] = np.argmax(candidates[:, dropped], axis=0)
    return keep, dup_of


def semdedup(x: np.ndarray, uids: np.ndarray, k: int, eps: float, iterations: int, seed: int,
             max_points_per_centroid: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """SemDeDup over normalised rows ``x`` held in memory (module docstring): the reference the
    pool-scale :func:`run_dedup` is tested against.

    Returns:
        ``keep`` (bool), ``dup_of`` (index of the kept sample a dropped one duplicates, -1 for kept
        ones) and ``cluster`` (the k-means cluster of each row).
    """
    n = len(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    keep = np.ones(n, dtype=bool)
    dup_of = np.full(n, -1, dtype=np.int64)
    if n < 2:
        return keep, dup_of, np.zeros(n, dtype=np.int64)
    k = max(1, min(k, n))
    centroids = kmeans(x, k, iterations=iterations, seed=seed, max_points_per_centroid=max_points_per_centroid)
    cluster = nearest(x, centroids, "euclidean")[0][:, 0]
    cos_dist = centre_distance(x, centroids, cluster)
    # members of each cluster, farthest from the centroid first, ties by uid
    order = np.lexsort((uids, -cos_dist, cluster))
    bounds = np.r_[0, np.cumsum(np.bincount(cluster, minlength=k))]
    for c in range(k):
        members = order[bounds[c] : bounds[c + 1]]
        if len(members) < 2:
            continue
        kept, of = dedup_members(x[members], eps, block)
        keep[members] = kept
        dup_of[members[~kept]] = members[of[~kept]]
    return keep, dup_of, cluster


def centre_distance(x: np.ndarray, centroids: np.ndarray, cluster: np.ndarray) -> np.ndarray:
    """Cosine distance of each row to its centroid (SemDeDup's sort key)."""
    unit = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return 1.0 - np.einsum("ij,ij->i", x, unit[cluster])


# -- the pool-scale step ----------------------------------------------------------------------------

_SAMPLE_KEY = 0x53454D44  # "SEMD": hash key of the k-means sample's draws
_SPLIT_KEY = 0x53504C54  # "SPLT": hash key of a big cluster's sample
_EXACT_SQL = """
with reps as (
  select sha256, min(uid) as rep from download
  where status = 'success' and sha256 is not null group by sha256 having count(*) > 1)
select d.shard, d.uid, r.rep as dup_of from download d join reps r on d.sha256 = r.sha256
where d.status = 'success' and d.uid <> r.rep
"""


def _dirs(pool: Any) -> dict[str, Path]:
    base = pool.aggregates_dir / "dedup"
    names = ("exact", "sample", "assign", "by_group", "semantic", "drops")
    return {name: base / name for name in names} | {"base": base}


def _exact_dropped(pool_root: str, shard: int) -> pa.Array:
    from pipeline.engines.base import read_where
    from pipeline.store.parquet import Pool

    part = read_where(_dirs(Pool(pool_root))["exact"], "shard", shard)
    return part["uid"].combine_chunks() if part is not None else pa.array([], pa.string())


def _left_vectors(pool_root: str, shard: int) -> pa.Table:
    """This shard's images left after exact dedup, in download order."""
    import pyarrow.compute as pc

    from pipeline.core.vectors import shard_vectors
    from pipeline.store import schema as S
    from pipeline.store.parquet import Pool

    table = shard_vectors(Pool(pool_root), "embed", S.IMAGE_EMBEDDING, shard)
    return table.filter(pc.invert(pc.is_in(table[S.UID], value_set=_exact_dropped(pool_root, shard))))


def count_shard(pool_root: str, shard: int) -> int:
    """This shard's images left after exact dedup (SemDeDup's population), without reading vectors."""
    import pyarrow.compute as pc

    from pipeline.store import schema as S
    from pipeline.store.parquet import Pool

    embed = Pool(pool_root).read_shard("embed", shard, columns=[S.UID, S.DECODE_ERROR])
    uids = embed[S.UID].filter(pc.is_null(embed[S.DECODE_ERROR]))  # null exactly when there is an image embedding
    return int(pc.sum(pc.invert(pc.is_in(uids, value_set=_exact_dropped(pool_root, shard)))).as_py() or 0)


def sample_shard(pool_root: str, out_dir: str, rate: float, seed: int, shard: int) -> int:
    from pipeline.core.vectors import drawn, write_sample
    from pipeline.store import schema as S

    table = _left_vectors(pool_root, shard)
    table = table.filter(pa.array(drawn(table[S.UID], _SAMPLE_KEY, seed, rate)))
    uids, vectors = table[S.UID].combine_chunks(), table[S.IMAGE_EMBEDDING].combine_chunks()
    return write_sample(Path(out_dir), shard, uids, vectors)


@functools.lru_cache(maxsize=2)
def _load_npz(path: str, digest: str) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def assign_shard(pool_root: str, centres_path: str, digest: str, shard: int) -> int:
    """Each image's cluster, its SemDeDup distance and its stored vector (as bytes, so any engine
    can regroup it), to ``assign/{shard}.parquet``."""
    from pipeline.core.vectors import as_float32
    from pipeline.store import schema as S
    from pipeline.store.parquet import Pool, shard_name, write_parquet_atomic

    centroids = _load_npz(centres_path, digest)["centroids"]
    table = _left_vectors(pool_root, shard)
    x = as_float32(table[S.IMAGE_EMBEDDING])
    cluster = nearest(x, centroids, "euclidean")[0][:, 0] if len(x) else np.zeros(0, dtype=np.int64)
    vectors = _encode(table[S.IMAGE_EMBEDDING])
    out = pa.table({"shard": pa.array(np.full(len(x), shard), pa.int32()), "uid": table[S.UID],
                    "cluster": pa.array(cluster, pa.int32()),
                    "cos_dist": pa.array(centre_distance(x, centroids, cluster), pa.float64()),
                    "vector": vectors}, schema=S.DEDUP_ASSIGN_SCHEMA)  # fmt: skip
    write_parquet_atomic(_dirs(Pool(pool_root))["assign"] / f"{shard_name(shard)}.parquet", out)
    return len(x)


def _encode(column: pa.ChunkedArray) -> pa.Array:
    """Stored float16 vectors as one binary value per row (no copy of the values)."""
    if len(column) == 0:
        return pa.array([], pa.binary())
    stored = column.combine_chunks()
    data = stored.values.to_numpy(zero_copy_only=False).view(np.uint8)
    width = 2 * stored.type.list_size
    offsets = np.arange(len(stored) + 1, dtype=np.int32) * width
    return pa.Array.from_buffers(pa.binary(), len(stored), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _decode(column: pa.Array | pa.ChunkedArray, dim: int) -> np.ndarray:
    """Stored float16 vector bytes -> normalised float32 rows (as the in-memory path computes them)."""
    from pipeline.core.vectors import unit_rows

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if len(column) == 0:
        return np.zeros((0, dim), dtype=np.float32)
    if pa.types.is_large_binary(column.type):
        column = column.cast(pa.binary())
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset : column.offset + len(column) + 1]
    data = np.frombuffer(column.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return unit_rows(data.view(np.float16).reshape(len(column), dim).astype(np.float32))


def _dedup_unit(table: pa.Table, eps: float, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """SemDeDup over one cluster (or sub-cluster): (dropped uids, the kept uid each duplicates)."""
    uids = table["uid"].to_numpy(zero_copy_only=False).astype(str)
    order = np.lexsort((uids, -table["cos_dist"].to_numpy()))  # farthest from the centre first, ties by uid
    if len(order) < 2:
        return np.zeros(0, dtype=str), np.zeros(0, dtype=str)
    keep, of = dedup_members(_decode(table["vector"].take(pa.array(order)), dim), eps)
    uids = uids[order]
    return uids[~keep], uids[of[~keep]]


def _split(by_group: Path, group: int, n: int, cfg: Any, dim: int, tmp: Path) -> list[Path]:
    """A cluster of ``n`` > ``dedup_max_cluster_size`` vectors, split without holding it: pass 1
    draws a uid-hash sample of at most that size and fits a second-level k-means on it; pass 2
    streams the cluster again and writes each row to its sub-cluster's file."""
    import pyarrow.parquet as pq

    from pipeline.core.vectors import drawn
    from pipeline.engines.base import batches_where
    from pipeline.store.parquet import vector_write_options

    rate = cfg.dedup_max_cluster_size / n
    parts = [b.filter(pa.array(drawn(b.column("uid"), _SPLIT_KEY, cfg.seed, rate)))
             for b in batches_where(by_group, "grp", group, ["uid", "vector"])]  # fmt: skip
    sample = pa.Table.from_batches(parts).sort_by("uid")  # a fixed order: k-means depends on it
    k = max(2, min(sample.num_rows, math.ceil(4 * n / cfg.dedup_max_cluster_size)))
    centres = kmeans(_decode(sample["vector"], dim), k, iterations=cfg.kmeans_iterations, seed=cfg.seed,
                     max_points_per_centroid=cfg.kmeans_max_points_per_centroid)  # fmt: skip
    del sample, parts
    paths = [tmp / f"sub-{i:05d}.parquet" for i in range(k)]
    writers: dict[int, Any] = {}
    try:
        for batch in batches_where(by_group, "grp", group, ["shard", "uid", "cos_dist", "vector"]):
            sub = nearest(_decode(batch.column("vector"), dim), centres, "euclidean")[0][:, 0]
            for i in np.unique(sub):
                if i not in writers:
                    writers[i] = pq.ParquetWriter(paths[i], batch.schema, **vector_write_options(batch.schema))
                writers[i].write_batch(batch.filter(pa.array(sub == i)))
    finally:
        for writer in writers.values():
            writer.close()
    return [paths[i] for i in sorted(writers)]


def group_task(pool_root: str, cfg: Any, dim: int, group: int) -> dict[str, int]:
    """SemDeDup over every cluster of one group, loading only that group: small clusters together
    (at most ``dedup_vectors_per_task`` vectors), or one big cluster, split first by :func:`_split`
    so that no more than about ``dedup_max_cluster_size`` vectors are held at once. Writes the
    dropped samples with ``dup_of`` to ``semantic/{group}.parquet``."""
    import tempfile

    import pyarrow.parquet as pq

    from pipeline.engines.base import read_where
    from pipeline.store.parquet import Pool, shard_name, write_parquet_atomic

    dirs = _dirs(Pool(pool_root))
    units = pq.read_table(dirs["base"] / "groups.parquet").filter(pa.compute.field("grp") == group)
    columns = ["shard", "uid", "cluster", "cos_dist", "vector"]
    parts, largest, split = [], 0, 0
    with tempfile.TemporaryDirectory(dir=dirs["base"]) as tmp:
        if units.num_rows == 1 and units["n"][0].as_py() > cfg.dedup_max_cluster_size:
            pieces = (pq.read_table(p) for p in _split(dirs["by_group"], group, units["n"][0].as_py(), cfg, dim,
                                                      Path(tmp)))  # fmt: skip
            split = 1
        else:
            table = read_where(dirs["by_group"], "grp", group, columns)
            cluster = table["cluster"].to_numpy()
            pieces = (table.filter(pa.array(cluster == c)) for c in np.unique(cluster))
        for piece in pieces:
            largest = max(largest, piece.num_rows)
            dropped, dup_of = _dedup_unit(piece, cfg.dedup_eps, dim)
            uids = pa.array(dropped.tolist(), pa.string())
            rows = pa.compute.index_in(uids, value_set=piece["uid"].combine_chunks())
            parts.append(pa.table({"shard": piece["shard"].take(rows), "uid": uids,
                                   "dup_of": pa.array(dup_of.tolist(), pa.string())}))  # fmt: skip
    out = pa.concat_tables(parts).sort_by("uid") if parts else S.DUP_DROPS_SCHEMA.empty_table()
    write_parquet_atomic(dirs["semantic"] / f"{shard_name(group)}.parquet", out)
    # a worker runs hundreds of these tasks (Spark reuses its Python workers): hand the group's
    # buffers back to the system rather than letting Arrow's allocator keep its high-water mark
    pa.default_memory_pool().release_unused()
    return {"dropped": out.num_rows, "split": split, "largest": largest}


class DedupTable(Step):
    """``tables/dedup``: each sample's duplicate group (the uid it duplicates, kept), the kind of
    duplicate (``exact``: the same image sha256; ``semantic``: SemDeDup) and ``dedup_keep``, from the
    pool-wide drop list sorted by shard (``aggregates/dedup/drops``)."""

    name = "dedup"
    schema = S.DEDUP_SCHEMA

    def __init__(self, digest: str):
        drops = Read("dedup/drops", ("uid", "dup_of", "kind"), kind=BY_SHARD, name="drops")
        super().__init__(reads=(Read("download", (S.UID,)), drops), digest=digest)

    def __call__(self, inputs: dict[str, pa.Table]) -> pa.Table:
        import pyarrow.compute as pc

        base, part = inputs["download"], inputs["drops"]
        group = kind = pa.nulls(base.num_rows, pa.string())
        if part.num_rows:
            rows = pc.index_in(base[S.UID], value_set=part["uid"].combine_chunks())
            group, kind = pc.take(part["dup_of"], rows), pc.take(part["kind"], rows)
        return pa.table({S.UID: base[S.UID], S.DUP_GROUP: group, S.DUP_KIND: kind, S.DEDUP_KEEP: pc.is_null(kind)})

    def counts(self, out: pa.Table) -> dict[str, int]:
        import pyarrow.compute as pc

        counts = {"samples": out.num_rows}
        for label in ("exact", "semantic"):
            counts[label] = int(pc.sum(pc.equal(out[S.DUP_KIND], label)).as_py() or 0)
        counts["dropped"] = int(pc.sum(pc.invert(out[S.DEDUP_KEEP])).as_py() or 0)
        return counts


def _groups(clusters: list[int], sizes: list[int], per_task: int, max_cluster: int) -> pa.Table:
    """Pack clusters, in order, into groups of at most ``per_task`` vectors; a cluster above
    ``max_cluster`` forms a group of its own (its task splits it)."""
    grp, group, load = [], 0, 0
    for n in sizes:
        if load and (load + n > per_task or n > max_cluster):
            group, load = group + 1, 0
        grp.append(group)
        load += n
        if n > max_cluster:
            group, load = group + 1, 0
    return pa.table({"cluster": pa.array(clusters, pa.int32()), "n": pa.array(sizes, pa.int64()),
                     "grp": pa.array(grp, pa.int32())})  # fmt: skip




def run_dedup(pool: Any, cfg: Any, engine: Any, progress: bool = True) -> dict[str, Any]:
    """Exact duplicates by image sha256, then SemDeDup over what is left, at any pool size (module
    docstring): every step is SQL run by the engine, a fit on a bounded sample, or a task over one
    shard or one cluster group."""
    import json

    from pipeline.core import runner
    from pipeline.engines.base import Table, written_files
    from pipeline.filters.common import DEDUP_STAGE, embed_digest, stage_digest
    from pipeline.store import schema as S
    from pipeline.store.parquet import write_json_atomic

    keys = ("dedup_eps", "dedup_clusters", "samples_per_dedup_cluster", "kmeans_iterations",
            "kmeans_max_points_per_centroid", "kmeans_max_sample", "dedup_max_cluster_size",
            "dedup_vectors_per_task", "seed")  # fmt: skip
    shards = pool.require_complete("embed")
    # ... and the pool it is computed over: in a grown pool an old sample can duplicate a new one
    digest = stage_digest(*(getattr(cfg, k) for k in keys), embed_digest(pool),
                          pool.content_digest(["download", "embed"]))  # fmt: skip
    summary_path = pool.aggregates_dir / "dedup.json"
    step = DedupTable(digest)
    if not runner.plan(pool, step, shards) and summary_path.exists():
        return json.loads(summary_path.read_text())
    dirs = _dirs(pool)
    clock = _Clock()
    download = {"download": pool.table("download", [S.UID, S.SHARD, S.STATUS, S.SHA256])}
    engine.write(_EXACT_SQL, download, dirs["exact"], order_by="shard")
    clock.lap("exact (SQL)")
    counts = runner.map_shards(pool, engine, functools.partial(count_shard, str(pool.root)), shards, desc="dedup count",
                        progress=False)  # fmt: skip
    population = sum(counts.values())
    clock.lap("count")
    semantic = _semantic(pool, engine, cfg, dirs, shards, population, digest, progress, clock)
    # every drop, by shard; an exact duplicate whose kept copy was then dropped as a near duplicate
    # points on to the sample that one duplicates (always kept: SemDeDup's dup_of is kept)
    engine.write("select x.shard, x.uid, coalesce(s.dup_of, x.dup_of) as dup_of, 'exact' as kind "
                 "from exact x left join semantic s on x.dup_of = s.uid "
                 "union all select shard, uid, dup_of, 'semantic' as kind from semantic",
                 {"exact": Table.of(written_files(dirs["exact"]), S.DUP_DROPS_SCHEMA),
                  "semantic": Table.of(written_files(dirs["semantic"]), S.DUP_DROPS_SCHEMA)},
                 dirs["drops"], order_by="shard")  # fmt: skip
    clock.lap("drops by shard (SQL)")
    runner.run_step(pool, engine, step, runner.plan(pool, step, shards), progress=progress)
    clock.lap("tables per shard")
    exact_dropped = sum(m["counts"]["exact"] for m in pool.completed(DEDUP_STAGE).values())
    summary = {"exact_dropped": exact_dropped, **semantic, "semantic_samples": int(population),
               "eps": cfg.dedup_eps, "seconds": clock.laps, "digest": digest}  # fmt: skip
    write_json_atomic(summary_path, summary)
    return summary


class _Clock:
    """Seconds per phase, recorded in the summary (where the time of a pool-wide step goes)."""

    def __init__(self) -> None:
        import time

        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        import time

        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 2)
        self._last = now


def _semantic(pool: Any, engine: Any, cfg: Any, dirs: dict[str, Path], shards: list[int], population: int,
              digest: str, progress: bool, clock: _Clock) -> dict[str, int]:  # fmt: skip
    """SemDeDup's part: sample, fit, assign per shard, split big clusters, regroup, one task per
    group. Leaves ``semantic/{group}.parquet`` (the dropped samples) and returns its counts."""
    from pipeline.core import runner
    from pipeline.core.vectors import clusters_for, fit_sample, kmeans_on_sample, sample_rate, sample_size
    from pipeline.engines.base import Table, written_files
    from pipeline.store.parquet import atomic_path, write_parquet_atomic

    for old in written_files(dirs["semantic"]):  # a re-run starts from no drops
        old.unlink()
    dirs["semantic"].mkdir(parents=True, exist_ok=True)
    k = clusters_for(population, cfg.dedup_clusters, cfg.samples_per_dedup_cluster)
    wanted = sample_size(k, cfg.kmeans_max_points_per_centroid, cfg.kmeans_max_sample)
    task = functools.partial(sample_shard, str(pool.root), str(dirs["sample"]), sample_rate(wanted, population),
                             cfg.seed)  # fmt: skip
    _, train = fit_sample(pool, engine, task, shards, dirs["sample"], desc="dedup sample", progress=progress)
    clock.lap("sample")
    if len(train) < 2:
        return {"semantic_dropped": 0, "semantic_clusters": 0, "split_clusters": 0, "cluster_tasks": 0,
                "largest_task_unit": 0}  # fmt: skip
    k = max(1, min(k, len(train)))
    centres_path = dirs["base"] / "centroids.npz"
    with atomic_path(centres_path) as tmp, tmp.open("wb") as f:
        np.savez(f, centroids=kmeans_on_sample(train, k, cfg))
    dim = train.shape[1]
    del train
    clock.lap("k-means fit")
    runner.map_shards(pool, engine, functools.partial(assign_shard, str(pool.root), str(centres_path), digest), shards,
               desc="dedup assign", weights=pool.shard_sizes(shards), progress=progress)  # fmt: skip
    clock.lap("assign per shard")

    files = written_files(dirs["assign"])
    assign = {"assign": Table.of(files, S.DEDUP_ASSIGN_SCHEMA)}
    sizes = engine.query("select cluster, count(*) as n from assign group by cluster order by cluster",
                         {"assign": Table.of(files, S.DEDUP_ASSIGN_SCHEMA, ["cluster"])})  # fmt: skip
    groups = _groups(sizes["cluster"].to_pylist(), sizes["n"].to_pylist(), cfg.dedup_vectors_per_task,
                     cfg.dedup_max_cluster_size)  # fmt: skip
    write_parquet_atomic(dirs["base"] / "groups.parquet", groups)
    tables = {**assign, "groups": Table.of([dirs["base"] / "groups.parquet"], groups.schema, ["cluster", "grp"])}
    engine.write("select a.shard, a.uid, a.cluster, a.cos_dist, a.vector, g.grp from assign a "
                 "join groups g on a.cluster = g.cluster", tables, dirs["by_group"], order_by="grp")  # fmt: skip
    clock.lap("sizes and regroup by cluster (SQL)")
    tasks = int(groups["grp"][-1].as_py()) + 1 if groups.num_rows else 0
    fn = functools.partial(group_task, str(pool.root), cfg, dim)
    results = runner.map_shards(pool, engine, fn, list(range(tasks)), desc="dedup clusters",
                                progress=progress).values()  # fmt: skip
    clock.lap("SemDeDup per cluster group")
    return {"semantic_dropped": sum(r["dropped"] for r in results), "semantic_clusters": int(k),
            "split_clusters": sum(r["split"] for r in results), "cluster_tasks": tasks,
            "largest_task_unit": max((r["largest"] for r in results), default=0)}  # fmt: skip
