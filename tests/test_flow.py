"""The Prefect flow end to end on a small pool (Prefect's test harness: a temporary local server)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import ExportConfig, FilterConfig, MetaclipConfig, ModeConfig, RebalanceConfig
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
    rules = ["downloaded", "decoded", "english", "min_side(min=100)", "dedup"]
    assert manifest["stage_results"]["decisions"]["rules"] == rules
    assert manifest["stage_results"]["decisions"]["pool_size"] == 250
    for stage in ("embed", "caption_embed", "mode", "rebalance", "filters", "dedup", "decisions"):
        assert manifest["stages"][stage]["shards_done"] == [0, 1, 2, 3, 4], stage
    assert manifest["stage_results"]["rebalance"]["group_by"] == "fine_id"
    assert batches([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3], [4]]
    artifact = Artifact.get("curate-counts")
    assert artifact is not None and "| download | 5/5 |" in artifact.data and "| metaclip | 5/5 |" in artifact.data

    again = run(str(config))  # a re-run finds every shard done
    assert again["stages"]["download"]["shards_done"] == [0, 1, 2, 3, 4]


def test_scheduled_deployment_builds_with_its_cron_schedule():
    from flows.curate import deployment

    d = deployment(str(REPO / "configs" / "demo.yaml"), "0 3 * * *", name="nightly")
    assert d.name == "nightly" and d.flow_name == "curate"
    (schedule,) = d.schedules
    assert schedule.schedule.cron == "0 3 * * *" and schedule.schedule.timezone == "UTC"
    assert d.parameters == {"config_path": str(REPO / "configs" / "demo.yaml")}


def test_prefect_yaml_deploys_the_flow_on_a_schedule():
    import yaml

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (dep,) = spec["deployments"]
    module, _, name = dep["entrypoint"].partition(":")
    assert (REPO / module).exists() and name == "curate"
    assert dep["schedules"][0]["cron"] and dep["parameters"]["config_path"]


def _full_config(tmp_path: Path, server, checkpoint, name: str) -> Path:
    pq.write_table(point_at(laion_rows(200, offset=5000), server), tmp_path / "u.parquet")
    cfg = make_config(tmp_path / name, tmp_path / "u.parquet", samples_per_shard=40, shards_per_task=1)
    cfg = dataclasses.replace(
        cfg,
        embed=embed_cfg(checkpoint, workers=0),
        metaclip=MetaclipConfig(metadata=str(REPO / "metadata/entries.json"), t=3),
        filters=FilterConfig(
            recipe="mine", recipes={"mine": ["english", "min_side(min=100)", "dedup"]}, dedup_eps=0.0009
        ),
        mode=ModeConfig(n_fine=6, n_experts=2, fit_fraction=1.0),
        rebalance=RebalanceConfig(t=20),
        export=ExportConfig(
            out=str(tmp_path / name / "release"),
            where="metaclip_keep and keep and rebalance_keep",
            samples_per_shard=16,
            shuffle_seed=3,
        ),
        report=True,
    )
    return write_config(tmp_path / f"{name}.yaml", cfg)


def _curate(config: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip


def test_killed_flow_resumes_to_the_same_release(tmp_path, paced_server, prefect_harness, tiny_checkpoint):
    """SIGKILL the whole flow (and its worker processes) inside each stage in turn; the re-runs end
    with a release byte-identical to an uninterrupted run's."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    reference = _full_config(tmp_path, paced_server, tiny_checkpoint, "reference")
    proc = _curate(reference, env)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]
    want = json.loads((tmp_path / "reference" / "release" / "manifest.json").read_text())
    assert want["counts"]["samples"] > 0

    config = _full_config(tmp_path, paced_server, tiny_checkpoint, "killed")
    pool = Pool(tmp_path / "killed")
    killed_in = []
    for stage in ("download", "embed", "metaclip_match", "filters", "mode", "export"):
        proc = _curate(config, env)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            done = (
                len(pool.completed(stage)) if stage != "export" else (tmp_path / "killed" / ".release.partial").exists()
            )
            if done and (stage == "export" or done < 5):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed_in.append(stage)
                break
            time.sleep(0.02)
        else:
            proc.wait()
    assert len(killed_in) >= 4, killed_in  # most stages were caught mid-way (fast ones may finish first)
    proc = _curate(config, env)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]
    got = json.loads((tmp_path / "killed" / "release" / "manifest.json").read_text())
    assert [s["sha256"] for s in got["shards"]] == [s["sha256"] for s in want["shards"]]
    assert got["counts"] == {**want["counts"], "pool_samples": want["counts"]["pool_samples"]}
    assert (tmp_path / "killed" / "report" / "index.html").exists()


def test_flow_curates_before_downloading_when_download_where_is_set(tmp_path: Path, image_server, prefect_harness):
    """MetaCLIP and the caption scores run on the listed captions, then only the selected rows are
    fetched; the recipe then decides on the downloaded rows."""
    from flows.curate import run
    from pipeline.query import query

    where = "metaclip_keep and lang = 'en'"
    pq.write_table(point_at(laion_rows(200, offset=4000), image_server), tmp_path / "u.parquet")
    cfg = make_config(tmp_path / "pool", tmp_path / "u.parquet", samples_per_shard=50)
    cfg = dataclasses.replace(
        cfg,
        download=dataclasses.replace(cfg.download, where=where),
        metaclip=MetaclipConfig(metadata=str(REPO / "metadata/entries.json"), t=3, only_downloaded=False),
        filters=FilterConfig(recipe="mine", recipes={"mine": ["english", "caption_words"]}),
    )
    manifest = run(str(write_config(tmp_path / "c.yaml", cfg)))
    pool = Pool(cfg.pool)
    selected = query(pool, f"select count(*) as n from samples where {where}")["n"][0].as_py()
    rows = query(pool, "select status, count(*) as n from download group by 1")
    status = dict(zip(rows["status"].to_pylist(), rows["n"].to_pylist(), strict=True))
    assert status.pop("not_selected") == 200 - selected and 0 < selected < 200
    assert sum(status.values()) == selected
    assert manifest["stage_results"]["metaclip"]["pool_size"] == 200  # counted over the listed pool
    kept = query(pool, "select count(*) as n from samples where keep")["n"][0].as_py()
    assert 0 < kept <= status.get("success", 0)
    assert query(pool, "select count(*) as n from samples where keep and not metaclip_keep")["n"][0].as_py() == 0
