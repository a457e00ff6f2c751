"""The ``curate`` flow: one Prefect task per batch of shards for each stage.

Today it runs the download stage; each later stage adds its tasks here the same way. The flow
chooses the engine once and hands it to every task. Runs without a Prefect server (Prefect's
ephemeral mode) unless ``PREFECT_API_URL`` points at one.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.config import PipelineConfig, load_config
from pipeline.download import plan_shards, run_download
from pipeline.engines import get_engine
from pipeline.engines.base import Engine
from pipeline.store.parquet import Pool


def batches(shards: list[int], size: int) -> list[list[int]]:
    return [shards[i : i + size] for i in range(0, len(shards), size)]


@task(name="plan-download", cache_policy=NO_CACHE)
def plan_download(cfg: PipelineConfig) -> list[int]:
    """Validate the URL list into the pool; return the shards still to download."""
    _, todo = plan_shards(Pool(cfg.pool), cfg.download)
    return todo


@task(name="download-shards", cache_policy=NO_CACHE)
def download_batch(cfg: PipelineConfig, engine: Engine, shards: list[int]) -> dict[int, dict[str, int]]:
    """Download one batch of shards; a retry redoes only the shards without a completion marker."""
    return run_download(Pool(cfg.pool), cfg.download, engine, shards=shards)


def _counts_markdown(pool: Pool) -> str:
    manifest = pool.update_manifest()
    lines = ["| stage | shards done | counts |", "|---|---|---|"]
    for stage, entry in manifest["stages"].items():
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(entry["counts"].items()))
        lines.append(f"| {stage} | {len(entry['shards_done'])}/{entry['shards_planned']} | {counts} |")
    return "\n".join(lines)


@flow(name="curate", log_prints=True)
def curate(config_path: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Curate the pool described by the YAML config at ``config_path``."""
    cfg = load_config(config_path, overrides)
    engine = get_engine(cfg)
    pool = Pool(cfg.pool)
    todo = plan_download(cfg)
    download = download_batch.with_options(
        retries=cfg.flow.task_retries, retry_delay_seconds=cfg.flow.task_retry_delay_s
    )
    futures = [download.submit(cfg, engine, batch) for batch in batches(todo, cfg.download.shards_per_task)]
    errors = []
    for future in futures:
        try:
            future.result()
        except Exception as exc:  # report every failed batch, not only the first
            errors.append(exc)
    create_markdown_artifact(markdown=_counts_markdown(pool), key="curate-counts",
                             description=f"Samples per stage in {pool.root}")  # fmt: skip
    if errors:
        raise errors[0]
    return pool.update_manifest()


def run(config_path: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the flow with the task concurrency the config asks for."""
    cfg = load_config(config_path, overrides)
    runner = ThreadPoolTaskRunner(max_workers=cfg.flow.task_concurrency)
    return curate.with_options(task_runner=runner)(config_path, overrides)
