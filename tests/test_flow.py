"""The Prefect flow end to end on a small pool (Prefect's test harness: a temporary local server)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import FilterConfig, MetaclipConfig, ModeConfig, RebalanceConfig
from pipeline.store.parquet import Pool
from tests.conftest import REPO, embed_cfg, laion_rows, make_config, point_at, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_curate_flow_runs_every_stage_in_shard_batches(tmp_path: Path, image_server, prefect_harness, tiny_checkpoint):
    from prefect.artifacts import Artifact

    from flows.curate import batches, run

    pq.write_table(point_at(laion_rows(250, offset=3000), image_server), tmp_path / "u.parquet")
    cfg = make_config(tmp_path / "pool", tmp_path / "u.parquet", samples_per_shard=50, shards_per_task=2)
    cfg = dataclasses.replace(
        cfg,
        embed=embed_cfg(tiny_checkpoint, workers=0),
        metaclip=MetaclipConfig(metadata=str(REPO / "metadata/entries.json"), t=3),
        mode=ModeConfig(n_fine=6, n_experts=2, fit_fraction=1.0),
        rebalance=RebalanceConfig(t=20),
        filters=FilterConfig(recipe="mine", recipes={"mine": ["english", "min_side(min=100)", "dedup"]}),
    )
    config = write_config(tmp_path / "c.yaml", cfg)

    manifest = run(str(config))
    assert manifest["stages"]["download"]["shards_done"] == [0, 1, 2, 3, 4]
    assert manifest["stages"]["download"]["counts"]["samples"] == 250
    assert Pool(cfg.pool).read_table("download").num_rows == 250
    assert manifest["stages"]["metaclip"]["shards_done"] == [0, 1, 2, 3, 4]
    assert manifest["stage_results"]["metaclip"]["t"] == 3
    assert manifest["stage_results"]["decisions"]["rules"] == ["downloaded", "english", "min_side(min=100)", "dedup"]
    assert manifest["stage_results"]["decisions"]["pool_size"] == 250
    for stage in ("embed", "caption_embed", "mode", "rebalance", "filters", "dedup", "decisions"):
        assert manifest["stages"][stage]["shards_done"] == [0, 1, 2, 3, 4], stage
    assert manifest["stage_results"]["rebalance"]["group_by"] == "fine_id"
    assert batches([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3], [4]]
    artifact = Artifact.get("curate-counts")
    assert artifact is not None and "| download | 5/5 |" in artifact.data and "| metaclip | 5/5 |" in artifact.data

    again = run(str(config))  # a re-run finds every shard done
    assert again["stages"]["download"]["shards_done"] == [0, 1, 2, 3, 4]
