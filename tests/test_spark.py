"""The Spark engine (``local[2]``) gives the local engine's tables, row for row."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import FilterConfig, MetaclipConfig, ModeConfig, RebalanceConfig, SparkConfig
from pipeline.engines.local import LocalEngine
from pipeline.store.parquet import Pool
from tests.conftest import REPO, STAGES_AFTER_MODE, copy_pool, laion_rows, make_config, point_at

pytest.importorskip("pyspark")
pytestmark = [pytest.mark.spark, pytest.mark.slow]


@pytest.fixture(scope="module")
def load_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("loads") / "loads.tsv"
    os.environ["CLIPCURATE_LOAD_LOG"] = str(path)  # before the session: executors inherit it
    yield path
    del os.environ["CLIPCURATE_LOAD_LOG"]


@pytest.fixture(scope="module")
def spark(load_log):
    from pipeline.engines.spark import SparkEngine

    engine = SparkEngine(SparkConfig(master="local[2]", task_max_failures=2))
    yield engine
    engine.stop()


def same_table(a: Pool, b: Pool, stage: str) -> None:
    ta, tb = (p.read_table(stage).sort_by("uid") for p in (a, b))
    assert ta.num_rows > 0 and ta.schema == tb.schema, stage
    for name in ta.column_names:
        assert ta[name].to_pylist() == tb[name].to_pylist(), (stage, name)


def test_download_on_spark_uses_img2dataset_and_equals_local(tmp_path, image_server, spark):
    from pipeline.download import run_download

    pq.write_table(point_at(laion_rows(120, offset=7000), image_server), tmp_path / "u.parquet")
    pools = []
    for name, engine in (("local", LocalEngine(2)), ("spark", spark)):
        cfg = make_config(tmp_path / name, tmp_path / "u.parquet", samples_per_shard=40)
        run_download(Pool(cfg.pool), cfg.download, engine, progress=False)
        pools.append(Pool(cfg.pool))
    same_table(*pools, "download")
    assert sorted(pools[1].completed("download")) == [0, 1, 2]


@pytest.fixture(scope="module")
def curated(clustered, tmp_path_factory, spark, load_log):
    """Copies of the embedded pool curated by each engine: MetaCLIP, filters, MoDE, rebalancing."""
    import numpy as np

    from pipeline.filters.stage import run_filters
    from pipeline.metaclip.stage import run_metaclip
    from pipeline.mode import run_mode
    from pipeline.rebalance import run_rebalance

    targets = tmp_path_factory.mktemp("targets") / "targets.npy"
    emb = clustered[0].read_table("embed", ["uid", "image_embedding"]).sort_by("uid")
    np.save(targets, np.asarray(emb["image_embedding"].drop_null().to_pylist()[:3], np.float32))
    pools = {}
    for name, engine in (("local", LocalEngine(2)), ("spark", spark)):
        load_log.write_text("")  # keep the Spark run's loads only
        pool = copy_pool(clustered[0], tmp_path_factory.mktemp(name) / "pool", STAGES_AFTER_MODE)
        for stage in ("mode",):  # assigned again by this engine
            shutil.rmtree(pool.root / "completions" / stage)
            shutil.rmtree(pool.root / "tables" / stage)
        run_metaclip(pool, MetaclipConfig(metadata=str(REPO / "metadata/entries.json"), t=3), engine, progress=False)
        cfg = FilterConfig(recipe="mine", recipes={"mine": ["english", "clip_score", "image_cluster", "dedup"]},
                           dedup_eps=0.0009, clip_score_fraction=0.6, image_clusters=6,
                           image_targets=str(targets), dedup_clusters=3, dedup_max_cluster_size=40,
                           dedup_vectors_per_task=60)  # fmt: skip
        run_filters(pool, cfg, engine, progress=False)
        run_mode(pool, ModeConfig(n_fine=8, n_experts=2, fit_fraction=0.5, min_fit_samples=0), engine, progress=False)
        # the population in play: the samples view joined in the engine's own SQL
        run_rebalance(pool, RebalanceConfig(t=10, where="metaclip_keep and keep"), engine)
        pools[name] = pool
    return pools["local"], pools["spark"]


@pytest.mark.parametrize("stage", ["metaclip_match", "metaclip", "filters", "image_based", "dedup", "decisions", "mode",
                                   "rebalance"])
def test_stage_tables_equal_local(curated, stage):
    same_table(*curated, stage)


def test_global_steps_equal_local(curated):
    import json

    local, spark = curated
    for name in ("metaclip.json", "decisions.json", "dedup.json", "image_based.json", "rebalance.json"):
        a, b = (json.loads((p.aggregates_dir / name).read_text()) for p in (local, spark))
        for key in ("digest", "seconds"):  # timings differ
            a.pop(key, None), b.pop(key, None)
        assert a == b, name
    a, b = (pq.read_table(p.aggregates_dir / "metaclip_entry_counts.parquet") for p in (local, spark))
    assert a.equals(b)
    dedup = json.loads((spark.aggregates_dir / "dedup.json").read_text())
    assert dedup["semantic_dropped"] > 0 and dedup["split_clusters"] > 0  # a cluster was split on both engines
    a, b = (pq.read_table(p.aggregates_dir / "rebalance" / "groups.parquet") for p in (local, spark))
    assert a.equals(b)


def _hash_pool(tmp_path) -> Pool:
    import numpy as np
    import pyarrow as pa

    from pipeline.store import schema as S
    from pipeline.store.parquet import write_json_atomic

    pool = Pool(tmp_path / "pool")
    rng = np.random.default_rng(0)
    uids = [f"{i:032x}" for i in rng.permutation(300)]
    hashes = [f"h{rng.integers(0, 200)}" for _ in uids]  # about 80 hashes shared by 2+ samples
    write_json_atomic(pool.plan_path, {"num_shards": 3, "samples_per_shard": 100, "num_rows": 300})
    for shard in range(3):
        part = slice(shard * 100, shard * 100 + 100)
        table = S.conform(pa.table({S.UID: uids[part], S.SHARD: pa.array([shard] * 100, pa.int32()),
                                    S.ROW: pa.array(range(100), pa.int64()), S.STATUS: ["success"] * 100,
                                    S.SHA256: hashes[part]}), S.DOWNLOAD_SCHEMA)  # fmt: skip
        pool.write_table("download", shard, table)
        pool.mark_done("download", shard, "x", {"samples": 100})
    return pool


def test_sql_writes_equal_local_rows_and_lookups(tmp_path, spark):
    """The engine seam's ``write``: the exact-duplicate SQL, sorted by shard, gives the same rows on
    both engines, each shard's rows are found through the row groups' statistics, and both equal
    the in-memory numpy grouping."""
    import numpy as np

    from pipeline.engines.base import read_where, written_files
    from pipeline.filters.dedup import _EXACT_SQL, exact_groups
    from pipeline.store import schema as S

    pool = _hash_pool(tmp_path)
    tables = {"download": pool.table("download", [S.UID, S.SHARD, S.STATUS, S.SHA256])}
    found = {}
    for name, engine in (("local", LocalEngine(1)), ("spark", spark)):
        engine.write(_EXACT_SQL, tables, tmp_path / name, order_by="shard")
        assert written_files(tmp_path / name)
        found[name] = {s: sorted(zip(*read_where(tmp_path / name, "shard", s, ["uid", "dup_of"]).to_pydict().values(),
                                     strict=True)) for s in range(3)}  # fmt: skip
    assert found["local"] == found["spark"] and all(found["local"].values())
    d = pool.read_table("download")
    uids, hashes = np.array(d["uid"].to_pylist()), np.array(d["sha256"].to_pylist())
    rep, _ = exact_groups(uids, hashes)
    expected = sorted((uids[i], uids[rep[i]]) for i in range(len(uids)) if rep[i] != i)
    assert sorted(r for rows in found["local"].values() for r in rows) == expected and len(expected) > 50


def test_order_statistic_equals_local(tmp_path, spark):
    import numpy as np
    import pyarrow as pa

    from pipeline.engines.base import Table
    from pipeline.filters.rules import get_threshold
    from pipeline.filters.threshold import order_statistic

    rng = np.random.default_rng(1)
    scores = rng.normal(0.25, 0.05, 5000).astype(np.float32)
    scores[::97] = np.nan
    table = pa.table({"s": pa.array(scores, pa.float32(), mask=np.arange(5000) % 89 == 0)})
    pq.write_table(table, tmp_path / "s.parquet")
    ref = Table.of([tmp_path / "s.parquet"], table.schema)
    for fraction in (0.0, 0.1, 0.3, 0.999, 1.0):
        local = order_statistic(LocalEngine(1), ref, "s", fraction)
        assert order_statistic(spark, ref, "s", fraction) == local
        assert local == get_threshold(table["s"].to_numpy(zero_copy_only=False), fraction)


def test_models_load_once_per_executor_process(curated, load_log):
    rows = [line.split("\t") for line in load_log.read_text().splitlines()]
    for what in ("metaclip-matcher", "wordnet", "lid.176", "mode-centres"):
        pids = [pid for w, pid in rows if w == what]
        assert pids and len(pids) == len(set(pids)), (what, pids)  # never twice in one process
        assert len(set(pids)) <= 2, (what, pids)  # local[2]: at most 2 Python workers for 4 shards


def test_a_failed_task_is_retried_by_spark(clustered, spark, tmp_path):
    from pipeline.core.runner import run_shard
    from pipeline.metaclip.stage import Match

    pools = [Pool(shutil.copytree(clustered[0].root, tmp_path / n)) for n in ("a", "b")]
    cfg = MetaclipConfig(metadata=str(REPO / "metadata/entries.json"))
    flag = tmp_path / "failed-once"
    inner = functools.partial(run_shard, str(pools[1].root), Match(cfg))

    def flaky(shard: int, inner=inner, flag=str(flag)) -> dict:
        if shard == 2 and not Path(flag).exists():
            Path(flag).write_text("failed")
            raise RuntimeError("injected failure in the partition of shard 2")
        return inner(shard)

    result = spark.map_shards(flaky, [0, 1, 2, 3], desc="flaky", progress=False)
    assert flag.exists() and not result.failures and sorted(result.results) == [0, 1, 2, 3]
    LocalEngine(1).map_shards(functools.partial(run_shard, str(pools[0].root), Match(cfg)), [0, 1, 2, 3], desc="x",
                              progress=False)  # fmt: skip
    same_table(*pools, "metaclip_match")


def test_a_task_failing_every_attempt_is_reported_and_the_others_finish(clustered, spark, tmp_path):
    def broken(shard: int) -> dict:
        if shard == 1:
            raise ValueError("shard 1 is broken")
        return {"shard": shard}

    result = spark.map_shards(broken, [0, 1, 2], desc="broken", progress=False)
    assert sorted(result.results) == [0, 2] and "shard 1 is broken" in result.failures[1]


def test_embedding_on_spark_equals_local_and_loads_the_model_once_per_worker(
    downloaded_pool, tiny_checkpoint, spark, load_log, tmp_path
):
    from pipeline.embed import run_embed
    from tests.conftest import embed_cfg

    pools = [copy_pool(downloaded_pool[0], tmp_path / n) for n in ("local", "spark")]
    cfg = embed_cfg(tiny_checkpoint, workers=0)
    run_embed(pools[0], cfg, LocalEngine(1), progress=False)
    load_log.write_text("")
    run_embed(pools[1], cfg, spark, progress=False)
    pids = [line.split("\t")[1] for line in load_log.read_text().splitlines() if line.startswith("open_clip")]
    assert 1 <= len(pids) <= 2 and len(pids) == len(set(pids))  # 4 shards, at most one load per worker
    import numpy as np

    for stage, col in (("embed", "image_embedding"), ("caption_embed", "caption_embedding")):
        a, b = (p.read_table(stage).sort_by("uid") for p in pools)
        assert a["uid"].equals(b["uid"]) and a.num_rows > 250
        x, y = (np.asarray(t[col].to_pylist(), dtype=np.float32) for t in (a, b))
        assert np.array_equal(x, y), stage  # the same float16 vectors on either engine


def test_export_on_spark_writes_the_same_release(curated, spark, tmp_path):
    from pipeline import query
    from pipeline.config import ExportConfig
    from pipeline.export import export

    local, _ = curated
    where = "keep and metaclip_keep"
    # the count depends on the tiny random model's float results on this CPU: size shards from it
    n = query.connect(local).execute(f"select count(*) from samples where {where}").fetchone()[0]
    assert n >= 4
    cfg = {"where": where, "samples_per_shard": n // 2 + 1, "shuffle_seed": 1}
    a = export(local, ExportConfig(out=str(tmp_path / "a"), **cfg), engine=LocalEngine(1))
    b = export(local, ExportConfig(out=str(tmp_path / "b"), **cfg), engine=spark)
    assert len(a["shards"]) > 1 and [e["sha256"] for e in a["shards"]] == [e["sha256"] for e in b["shards"]]


def test_quality_scores_on_spark_equal_local(clustered, spark, tmp_path):
    from pipeline.config import HeadConfig, QualityConfig
    from pipeline.quality.stage import run_quality
    from pipeline.store import schema as S
    from tests.test_quality import published, save

    pools = [copy_pool(clustered[0], tmp_path / n) for n in ("local", "spark")]
    dim = pools[0].table_schema("embed").field(S.IMAGE_EMBEDDING).type.list_size
    cfg = QualityConfig(aesthetic=HeadConfig(weights=str(save(published("aesthetic-mlp", dim), tmp_path / "a.pth"))),
                        nsfw=HeadConfig(weights=str(save(published("nsfw-h14", dim), tmp_path / "n.safetensors"))))
    run_quality(pools[0], cfg, LocalEngine(2), progress=False)
    run_quality(pools[1], cfg, spark, progress=False)
    same_table(*pools, "quality")


def test_a_further_scorer_and_the_watermark_on_spark_equal_local(downloaded_pool, tiny_checkpoint, spark, tmp_path):
    """The embed step with ``embed.scorers`` and ``embed.watermark``: the same rows on either engine
    (one torch thread on both, as a Spark worker has: the float32 scores then agree bit for bit)."""
    import dataclasses

    from pipeline.config import ScorerConfig, WatermarkConfig
    from pipeline.embed import run_embed, save_random_checkpoint
    from tests.conftest import embed_cfg
    from tests.test_quality import save_watermark

    second = save_random_checkpoint("clipcurate-tiny", tmp_path / "second.safetensors", seed=1)
    weights, _ = save_watermark(tmp_path / "watermark_model_v1.pt")
    cfg = dataclasses.replace(embed_cfg(tiny_checkpoint, workers=0, threads=1),
                              scorers=(ScorerConfig(name="dfn", model="clipcurate-tiny", checkpoint=str(second)),),
                              watermark=WatermarkConfig(weights=str(weights), model="test_efficientnet"))  # fmt: skip
    pools = [copy_pool(downloaded_pool[0], tmp_path / n, drop=("embed", "caption_embed")) for n in ("local", "spark")]
    run_embed(pools[0], cfg, LocalEngine(1), progress=False)
    run_embed(pools[1], cfg, spark, progress=False)
    same_table(*pools, "embed")
    table = pools[0].read_table("embed")
    assert {"clip_score_dfn", "watermark"} <= set(table.column_names) and table["watermark"].null_count < 50


def test_worldwide_metaclip_on_spark_equals_local(spark, tmp_path):
    """MetaCLIP 2's per-language matching and balancing give the same rows on Spark as locally."""
    from pipeline.engines.local import LocalEngine
    from tests.test_worldwide import SPACED, UNSPACED, _captions, _lists, _pool, _rows

    _lists(tmp_path / "metadata", SPACED + UNSPACED)
    captions = _captions(40, SPACED + UNSPACED, seed=5)
    local, want = _pool(tmp_path / "local", captions, tmp_path / "metadata", LocalEngine(2))
    on_spark, got = _pool(tmp_path / "spark", captions, tmp_path / "metadata", spark)
    assert _rows(on_spark) == _rows(local)
    assert got["worldwide"] == want["worldwide"] and got["samples_kept"] == want["samples_kept"] > 0
