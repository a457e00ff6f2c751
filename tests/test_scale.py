"""Pool-wide steps at any size: SQL aggregations, sample fits, per-cluster SemDeDup, one engine seam.

Each pool-scale path is checked against the in-memory computation it replaces (numpy over the whole
column, SemDeDup over every vector, k-means over every point), on pools small enough for both.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.config import FilterConfig, MetaclipConfig, RebalanceConfig
from pipeline.engines.local import LocalEngine
from pipeline.store import schema as S
from pipeline.store.parquet import Pool, write_json_atomic, write_parquet_atomic
from tests.conftest import REPO, STAGES_AFTER_MODE, copy_pool

ROOT = Path(__file__).resolve().parents[1]


# -- one engine seam ---------------------------------------------------------------------------------


def test_no_stage_asks_which_engine_it_runs_on():
    check = re.compile(r"getattr\(\s*engine|engine\.name|\.name\s*==\s*['\"](spark|local)['\"]|"
                       r"isinstance\([^)]*(Spark|Local)Engine")  # fmt: skip
    offenders = []
    for path in [*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]:
        if "engines" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if check.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
    assert not (ROOT / "pipeline" / "store" / "export.py").exists()  # export is a stage, not storage


# -- SQL aggregations equal the numpy results ---------------------------------------------------------


@pytest.fixture(scope="module")
def curated(clustered, tmp_path_factory):
    from pipeline.filters.stage import run_filters
    from pipeline.metaclip.stage import run_metaclip
    from pipeline.rebalance import run_rebalance

    pool = copy_pool(clustered[0], tmp_path_factory.mktemp("scale") / "pool", STAGES_AFTER_MODE)
    engine = LocalEngine(1)
    run_metaclip(pool, MetaclipConfig(metadata=str(REPO / "metadata/entries.json"), t=3), engine, progress=False)
    cfg = FilterConfig(recipe="mine", recipes={"mine": ["english", "caption_words", "clip_score", "dedup"]},
                       dedup_eps=0.0009, clip_score_fraction=0.4)  # fmt: skip
    summary = run_filters(pool, cfg, engine, progress=False)
    run_rebalance(pool, RebalanceConfig(t=10), engine, progress=False)
    return pool, cfg, summary


def test_metaclip_entry_counts_equal_numpy(curated):
    import pyarrow.parquet as pq

    from pipeline.metaclip.matching import entry_counts

    pool, _, _ = curated
    match = pool.read_table("metaclip_match")
    table = pq.read_table(pool.aggregates_dir / "metaclip_entry_counts.parquet")
    counted = match["counted"].to_numpy(zero_copy_only=False)
    matched = match["matched_entry_ids"].combine_chunks()
    assert np.array_equal(table["count"].to_numpy(), entry_counts(matched, table.num_rows, counted))
    kept = pool.read_table("metaclip", ["uid", "metaclip_keep"])
    keep = pc.is_in(match["uid"], value_set=kept["uid"].filter(kept["metaclip_keep"])).to_numpy(zero_copy_only=False)
    assert np.array_equal(table["kept"].to_numpy(), entry_counts(matched, table.num_rows, keep))
    assert table["count"].to_numpy().sum() > 0 and table["kept"].to_numpy().sum() > 0


def test_threshold_funnel_and_drop_reasons_equal_numpy(curated):
    from pipeline.filters.rules import Rule, decide, get_threshold, parse_rule

    pool, _, summary = curated
    embed = pool.read_table("embed", ["uid", "clip_score"])
    threshold = get_threshold(embed["clip_score"].to_numpy(zero_copy_only=False), 0.4)
    assert summary["rule_params"]["clip_score"]["threshold"] == threshold
    # the whole pool's columns, aligned in memory, decided at once
    base = pool.read_table("download", ["uid", "status"])
    columns = {"status": base["status"].to_numpy(zero_copy_only=False)}
    reads = [("filters", ["lang", "caption_words"]), ("embed", ["clip_score", "decode_error"])]
    reads.append(("dedup", ["dedup_keep"]))
    for stage, names in reads:
        table = pool.read_table(stage, ["uid", *names])
        rows = pc.index_in(base["uid"], value_set=table["uid"].combine_chunks())
        for name in names:
            columns[name] = pc.take(table[name], rows).to_numpy(zero_copy_only=False)
    rules = [Rule("downloaded"), Rule("decoded"), parse_rule("english"), parse_rule("caption_words"),
             Rule("clip_score", {"threshold": threshold, "fraction": 0.4}), parse_rule("dedup")]  # fmt: skip
    keep, reason, funnel = decide(columns, rules)
    assert [f["left"] for f in summary["funnel"]] == funnel
    expected = {r: int((reason[~keep] == r).sum()) for r in set(reason[~keep])}
    assert summary["drop_reasons"] == expected and summary["kept"] == int(keep.sum())
    decisions = pool.read_table("decisions", ["uid", "keep"])
    rows = pc.index_in(base["uid"], value_set=decisions["uid"].combine_chunks())
    assert np.array_equal(pc.take(decisions["keep"], rows).to_numpy(zero_copy_only=False), keep)


def test_exact_duplicates_and_group_sizes_equal_numpy(curated):
    import json

    from pipeline.filters.dedup import exact_groups

    pool, _, _ = curated
    d = pool.read_table("download", ["uid", "status", "sha256"])
    ok = (pc.equal(d["status"], "success").to_numpy(zero_copy_only=False)) & pc.is_valid(d["sha256"]).to_numpy(
        zero_copy_only=False)  # fmt: skip
    uids = np.array(d["uid"].to_pylist())[ok]
    rep, _ = exact_groups(uids, np.array(d["sha256"].to_pylist())[ok])
    dedup = pool.read_table("dedup", ["uid", "dup_kind"])
    exact = set(dedup["uid"].filter(pc.equal(dedup["dup_kind"], "exact")).to_pylist())
    assert exact == {uids[i] for i in range(len(uids)) if rep[i] != i}
    # rebalancing's group sizes
    mode = pool.read_table("mode", ["fine_id"])["fine_id"].to_numpy()
    sizes = np.bincount(mode)
    report = json.loads((pool.report_dir("rebalance") / "group_sizes.json").read_text())
    assert report["before"]["max"] == sizes.max() and report["before"]["min"] == sizes[sizes > 0].min()
    rebalance = pool.read_table("rebalance", ["rebalance_p"])["rebalance_p"].to_numpy()
    fine = pool.read_table("mode", ["uid", "fine_id"]).sort_by("uid")["fine_id"].to_numpy()
    p = pool.read_table("rebalance", ["uid", "rebalance_p"]).sort_by("uid")["rebalance_p"].to_numpy()
    assert np.allclose(p, np.minimum(1, 10 / sizes[fine])) and len(rebalance) == len(mode)


# -- vector steps: a synthetic pool with planted near duplicates ---------------------------------------


def _synthetic_pool(root: Path, shards: int = 3, per_shard: int = 300, dim: int = 32, seed: int = 0) -> Pool:
    """Random unit vectors (unrelated images are far apart) plus tight planted near-duplicate pairs and
    byte-identical repeats (same sha256), in a pool of ``shards`` shards."""
    rng = np.random.default_rng(seed)
    pool = Pool(root)
    write_json_atomic(pool.plan_path, {"num_shards": shards, "samples_per_shard": per_shard,
                                       "num_rows": shards * per_shard})  # fmt: skip
    centres = rng.normal(size=(6, dim))
    for shard in range(shards):
        n = per_shard
        uids = [hashlib.md5(f"{seed}-{shard}-{i}".encode()).hexdigest() for i in range(n)]
        x = centres[rng.integers(0, 6, n)] + rng.normal(scale=0.8, size=(n, dim))
        near = rng.choice(n, 30, replace=False)
        x[near[:15]] = x[near[15:]] + rng.normal(scale=0.002, size=(15, dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        sha = [f"h{shard}-{i}" for i in range(n)]
        for i in rng.choice(n, 10, replace=False):
            sha[i] = sha[(i + 3) % n]
        dl = S.conform(pa.table({S.UID: uids, S.SHARD: pa.array([shard] * n, pa.int32()),
                                 S.KEY: [f"{shard:05d}{i:04d}" for i in range(n)],
                                 S.ROW: pa.array(range(n), pa.int64()),
                                 S.STATUS: ["success"] * n, S.SHA256: sha}), S.DOWNLOAD_SCHEMA)  # fmt: skip
        pool.write_table("download", shard, dl)
        pool.mark_done("download", shard, "synthetic", {"samples": n})
        order = rng.permutation(n)  # the embed table's order differs from the download's, as img2dataset's
        x16 = x[order].astype(np.float16)
        emb = pa.table({S.UID: pa.array(uids).take(pa.array(order)), S.SHARD: pa.array([shard] * n, pa.int32()),
                        S.IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(x16.ravel()), dim),
                        S.TEXT_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(x16.ravel()), dim),
                        S.CLIP_SCORE: pa.array(np.ones(n), pa.float32()), S.DECODE_ERROR: pa.nulls(n, pa.string()),
                        S.MODEL: ["synthetic"] * n, S.CHECKPOINT_SHA256: ["-"] * n},
                       schema=S.embed_schema(dim))  # fmt: skip

        write_parquet_atomic(pool.table_path("embed", shard), emb)
        pool.mark_done("embed", shard, "synthetic", {"samples": n})
    write_json_atomic(root / "completions" / "embed" / "config.json", {"config": {}, "config_hash": "synthetic"})
    return pool


def _in_memory_semdedup(pool: Pool, k: int, eps: float, cfg: FilterConfig) -> dict[str, bool]:
    """Today's in-memory SemDeDup over the whole pool: every vector in download order."""
    from pipeline.core.vectors import as_float32, shard_vectors
    from pipeline.filters.dedup import exact_groups, semdedup

    d = pool.read_table("download", ["uid", "sha256"])
    uids_all = np.array(d["uid"].to_pylist())
    rep, _ = exact_groups(uids_all, np.array(d["sha256"].to_pylist()))
    exact_drop = set(uids_all[rep != np.arange(len(rep))])
    parts = [shard_vectors(pool, "embed", S.IMAGE_EMBEDDING, s) for s in range(3)]
    table = pa.concat_tables(parts)
    left = ~pc.is_in(table["uid"], value_set=pa.array(sorted(exact_drop))).to_numpy(zero_copy_only=False)
    uids = np.array(table["uid"].to_pylist())[left]
    x = as_float32(table[S.IMAGE_EMBEDDING])[left]
    keep, _, _ = semdedup(x, uids, k, eps, cfg.kmeans_iterations, cfg.seed, cfg.kmeans_max_points_per_centroid)
    out = dict.fromkeys(uids_all.tolist(), True)
    out.update(dict.fromkeys(exact_drop, False))
    out.update(zip(uids.tolist(), keep.tolist(), strict=True))
    return out


@pytest.mark.parametrize("split", [False, True])
def test_per_cluster_semdedup_equals_in_memory(tmp_path, split):
    from pipeline.filters.dedup import run_dedup

    pool = _synthetic_pool(tmp_path / "pool")
    cfg = FilterConfig(recipe="dedup", dedup_eps=0.01, dedup_clusters=4,
                       dedup_max_cluster_size=60 if split else 20_000,
                       dedup_vectors_per_task=120 if split else 200_000)  # fmt: skip
    summary = run_dedup(pool, cfg, LocalEngine(2), progress=False)
    table = pool.read_table("dedup", ["uid", "dedup_keep", "dup_kind", "dup_group"])
    got = dict(zip(table["uid"].to_pylist(), table["dedup_keep"].to_pylist(), strict=True))
    assert got == _in_memory_semdedup(pool, 4, 0.01, cfg)
    assert summary["exact_dropped"] >= 25 and summary["semantic_dropped"] >= 40
    if split:  # the clusters were split inside their tasks, and no sub-cluster came near a cluster's size
        assert summary["split_clusters"] >= 3 and summary["largest_task_unit"] <= 120
        assert summary["cluster_tasks"] >= 4
    # a dropped sample names a kept one
    kept = set(table["uid"].filter(table["dedup_keep"]).to_pylist())
    assert all(g in kept for g, k in zip(table["dup_group"].to_pylist(), table["dedup_keep"].to_pylist(),
                                         strict=True) if not k)  # fmt: skip


def test_a_sample_equal_to_the_pool_gives_the_in_memory_image_clusters(tmp_path):
    """With ``kmeans_max_sample`` at least the pool, the image-based filter's fit sees every
    embedding in download order: the centroids and decisions are those of k-means on the whole
    pool, as before the pool-scale rework. A smaller sample changes the centres."""
    import faiss
    import pyarrow.parquet as pq

    from pipeline.core.vectors import as_float32, shard_vectors
    from pipeline.filters.image_based import run_image_based

    pool = _synthetic_pool(tmp_path / "pool")
    for shard in range(3):  # every caption passes DataComp's caption rule
        n = 300
        uids = pq.read_table(pool.table_path("download", shard), columns=["uid"])["uid"]
        scores = S.conform(pa.table({S.UID: uids, S.SHARD: pa.array([shard] * n, pa.int32()), S.LANG: ["en"] * n,
                                     S.CAPTION_WORDS: pa.array([5] * n, pa.int32()),
                                     S.CAPTION_TOKENS: pa.array([5] * n, pa.int32()),
                                     S.CAPTION_CHARS: pa.array([30] * n, pa.int32()),
                                     S.TEXT_ENTITY: [False] * n}), S.FILTERS_SCHEMA)  # fmt: skip
        pool.write_table("filters", shard, scores)
        pool.mark_done("filters", shard, "synthetic", {"samples": n})
    x = as_float32(pa.concat_tables([shard_vectors(pool, "embed", S.IMAGE_EMBEDDING, s) for s in range(3)])[
        S.IMAGE_EMBEDDING])  # fmt: skip
    np.save(tmp_path / "targets.npy", x[[5, 400, 800]])
    cfg = FilterConfig(recipe="image_based", image_clusters=8, image_targets=str(tmp_path / "targets.npy"),
                       kmeans_max_sample=900)  # fmt: skip
    run_image_based(pool, cfg, LocalEngine(2), progress=False)
    # faiss itself, as DataComp calls it, on the whole pool in download order
    km = faiss.Kmeans(x.shape[1], 8, niter=cfg.kmeans_iterations, seed=cfg.seed,
                      max_points_per_centroid=cfg.kmeans_max_points_per_centroid, verbose=False)  # fmt: skip
    km.train(x)
    centroids = km.centroids
    saved = np.load(pool.aggregates_dir / "image_based" / "centroids.npz")["centroids"]
    assert np.array_equal(saved, centroids)
    chosen = set(np.argmax(x[[5, 400, 800]] @ centroids.T, axis=1).tolist())
    table = pool.read_table("image_based").sort_by("uid")
    uids = pa.concat_tables([shard_vectors(pool, "embed", S.IMAGE_EMBEDDING, s) for s in range(3)])["uid"]
    nearest = np.argmax(x @ centroids.T, axis=1)
    expected = dict(zip(uids.to_pylist(), (c in chosen for c in nearest.tolist()), strict=True))
    assert dict(zip(table["uid"].to_pylist(), table["image_target"].to_pylist(), strict=True)) == expected
    # a sample of a third of the pool: another fit (documented in docs/benchmarks.md)
    small = FilterConfig(**{**cfg.__dict__, "kmeans_max_sample": 300})
    summary = run_image_based(pool, small, LocalEngine(1), progress=False)
    assert 200 <= summary["train_samples"] <= 400
    assert not np.array_equal(np.load(pool.aggregates_dir / "image_based" / "centroids.npz")["centroids"], centroids)
