"""The ``curate`` flow: a list of stages (:data:`STAGES`), one Prefect task per batch of shards.

Each entry runs when the config has its section: a retry pass of the download's failed rows
(``download.retry``); download; embed (per shard batch); quality
scores (per shard batch); MetaCLIP
(matching per shard batch, then one global balancing task); filters (scores per shard batch,
then the recipe's global steps and decisions); MoDE clustering (global fit, per-shard
assignment); rebalancing (global). With ``download.where`` the caption stages come first
(:data:`TEXT_FIRST`). The flow chooses the engine once and hands it to every task. Runs without a
Prefect server (Prefect's ephemeral mode) unless ``PREFECT_API_URL`` points at one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.config import PipelineConfig, load_config, text_uses
from pipeline.download import plan_shards, run_download
from pipeline.engines import get_engine
from pipeline.engines.base import Engine
from pipeline.metaclip.stage import match_shards, pending_matches, run_metaclip
from pipeline.mode import run_mode
from pipeline.rebalance import run_rebalance
from pipeline.store.lock import writer_lock
from pipeline.store.parquet import Pool


def batches(shards: list[int], size: int) -> list[list[int]]:
    return [shards[i : i + size] for i in range(0, len(shards), size)]


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_task(cfg: PipelineConfig, engine: Engine) -> dict[str, Any]:
    """Validate the input files the pool has not ingested yet and append their shards (the first
    run: every file); refuse, naming them, files that changed since they were ingested."""
    from pipeline.download import prepare
    from pipeline.download.stage import scan_inputs

    pool = Pool(cfg.pool)
    was = pool.read_plan()
    before = len(was.get("ingests") or [1]) if was else 0  # a plan of an earlier version: one ingest
    plan = prepare(pool, cfg.download, engine)
    new = plan["ingests"][before:]
    first = new[0]["first_shard"] if new else plan["num_shards"]
    return {"new_files": [{"path": f["path"], "rows": f.get("rows")} for i in new for f in i["files"] or []],
            "new_shards": list(range(first, plan["num_shards"])),
            "vanished": scan_inputs(pool, cfg.download)["vanished"],
            "num_shards": plan["num_shards"], "num_rows": plan["num_rows"]}  # fmt: skip


@task(name="plan-download", cache_policy=NO_CACHE)
def plan_download(cfg: PipelineConfig, engine: Engine) -> list[int]:
    """Validate the URL list into the pool; return the shards still to download."""
    _, todo = plan_shards(Pool(cfg.pool), cfg.download, engine)
    return todo


@task(name="retry-download", cache_policy=NO_CACHE)
def retry_download(cfg: PipelineConfig, engine: Engine) -> dict[str, Any]:
    """One retry pass of ``download.retry``'s error classes over the shards finished in earlier runs
    (each row at most ``download.max_attempts`` times in all); their later stages are redone by
    the stages after it. Nothing when ``download.retry`` is empty."""
    from pipeline.download.retry import format_retry, run_retry

    if not cfg.download.retry:
        return {"shards": [], "by_class": {}}
    result = run_retry(Pool(cfg.pool), cfg.download, engine)
    print(format_retry(result))
    return result


@task(name="download-shards", cache_policy=NO_CACHE)
def download_batch(cfg: PipelineConfig, engine: Engine, shards: list[int]) -> dict[int, dict[str, int]]:
    """Download one batch of shards; a retry redoes only the shards without a completion marker."""
    return run_download(Pool(cfg.pool), cfg.download, engine, shards=shards)


@task(name="plan-embed", cache_policy=NO_CACHE)
def plan_embed(cfg: PipelineConfig, engine: Engine) -> list[int]:
    """Shards still to embed with this model and checkpoint (hashes the weights file, loads no model)."""
    from pipeline.embed import pending_shards

    return pending_shards(Pool(cfg.pool), cfg.embed, text_needed=bool(text_uses(cfg)))


@task(name="embed-shards", cache_policy=NO_CACHE)
def embed_batch(cfg: PipelineConfig, engine: Engine, shards: list[int]) -> dict[int, dict[str, int]]:
    """Embed one batch of shards (image/text embeddings, clip_score, caption embeddings)."""
    from pipeline.embed import run_embed

    return run_embed(Pool(cfg.pool), cfg.embed, engine, shards=shards, text_needed=bool(text_uses(cfg)))


@task(name="plan-quality", cache_policy=NO_CACHE)
def plan_quality(cfg: PipelineConfig, engine: Engine) -> list[int]:
    """Embedded shards not yet scored by these heads (each head checked against the pool first)."""
    from pipeline.quality.stage import pending_quality

    return pending_quality(Pool(cfg.pool), cfg.quality)


@task(name="quality-shards", cache_policy=NO_CACHE)
def quality_batch(cfg: PipelineConfig, engine: Engine, shards: list[int]) -> dict[int, dict[str, int]]:
    """Score one batch of shards with the aesthetic and NSFW heads."""
    from pipeline.quality.stage import run_quality

    return run_quality(Pool(cfg.pool), cfg.quality, engine, shards=shards)


@task(name="plan-metaclip", cache_policy=NO_CACHE)
def plan_metaclip(cfg: PipelineConfig, engine: Engine) -> list[int]:
    return pending_matches(Pool(cfg.pool), cfg.metaclip)


@task(name="metaclip-match", cache_policy=NO_CACHE)
def metaclip_match_batch(cfg: PipelineConfig, engine: Engine, shards: list[int]) -> None:
    """Substring-match one batch of shards against the metadata entries."""
    match_shards(Pool(cfg.pool), cfg.metaclip, engine, shards)


@task(name="metaclip-balance", cache_policy=NO_CACHE)
def metaclip_balance(cfg: PipelineConfig, engine: Engine) -> dict[str, Any]:
    """Sum the entry counts over the pool, then balance every shard (global step)."""
    return run_metaclip(Pool(cfg.pool), cfg.metaclip, engine)


@task(name="plan-filters", cache_policy=NO_CACHE)
def plan_filters(cfg: PipelineConfig, engine: Engine, listed: bool = False) -> list[int]:
    from pipeline.filters.stage import pending_scores

    return pending_scores(Pool(cfg.pool), listed=listed)


@task(name="filter-scores", cache_policy=NO_CACHE)
def filter_scores_batch(cfg: PipelineConfig, engine: Engine, shards: list[int]) -> None:
    """Caption language, counts, sizes and text entities of one batch of shards."""
    from pipeline.filters.stage import score_shards

    score_shards(Pool(cfg.pool), engine, shards)


@task(name="filter-decide", cache_policy=NO_CACHE)
def filter_decide(cfg: PipelineConfig, engine: Engine) -> dict[str, Any]:
    """The recipe's global steps (image clusters, dedup), then keep / drop_reason for every sample."""
    from pipeline.filters.stage import run_filters

    return run_filters(Pool(cfg.pool), cfg.filters, engine, embed_cfg=cfg.embed)


@task(name="mode", cache_policy=NO_CACHE)
def mode_task(cfg: PipelineConfig, engine: Engine) -> dict[str, Any]:
    """Fit the MoDE centres on a sample (global), then assign every shard."""
    return run_mode(Pool(cfg.pool), cfg.mode, engine)


@task(name="rebalance", cache_policy=NO_CACHE)
def rebalance_task(cfg: PipelineConfig, engine: Engine) -> dict[str, Any]:
    """Long-tail rebalancing over the configured grouping column (global counts)."""
    return run_rebalance(Pool(cfg.pool), cfg.rebalance, engine)


@task(name="export", cache_policy=NO_CACHE)
def export_task(cfg: PipelineConfig, engine: Engine) -> dict[str, Any]:
    """Write the training release (WebDataset shards + Parquet sidecars + manifest + card)."""
    import dataclasses

    from pipeline.export import export

    export_cfg = cfg.export
    if cfg.filters is not None and not export_cfg.recipes:
        export_cfg = dataclasses.replace(export_cfg, recipes=dict(cfg.filters.recipes))
    return export(Pool(cfg.pool), export_cfg, engine=engine)


@task(name="report", cache_policy=NO_CACHE)
def report_task(cfg: PipelineConfig) -> str:
    """The HTML report of the pool (and of the release, if one was exported)."""
    from pathlib import Path

    from pipeline.report import write_report

    release = Path(cfg.export.out) if cfg.export is not None else None
    if release is not None and cfg.export.versioned:
        from pipeline.export.versions import latest_version

        release = latest_version(release)
    return str(write_report(Pool(cfg.pool), release=release))


def _submit_batches(task_fn: Any, cfg: PipelineConfig, engine: Engine, shards: list[int]) -> list[Exception]:
    """Run ``task_fn`` once per batch of shards with the configured retries; collect failures. After
    each download batch, the early warning (a failing run: its top error classes) is published once
    as the ``download-warning`` artifact."""
    configured = task_fn.with_options(retries=cfg.flow.task_retries, retry_delay_seconds=cfg.flow.task_retry_delay_s)
    futures = [configured.submit(cfg, engine, batch) for batch in batches(shards, cfg.download.shards_per_task)]
    errors, warned = [], False
    for future in futures:
        try:
            future.result()
        except Exception as exc:  # report every failed batch, not only the first
            errors.append(exc)
        if task_fn is download_batch and not warned:  # over the markers, as the batch's manifest update reads them
            from pipeline.download.errors import health_warning
            from pipeline.download.stage import download_totals

            line = health_warning(dict(download_totals(Pool(cfg.pool))), cfg.download.warn_success_rate,
                                  cfg.download.warn_min_samples)  # fmt: skip
            if line is not None:
                warned = True
                create_markdown_artifact(markdown=f"**{line}**", key="download-warning",
                                         description=f"Download of {cfg.pool} going badly")  # fmt: skip
    return errors


def _counts_markdown(pool: Pool) -> str:
    manifest = pool.update_manifest()
    lines = ["| stage | shards done | counts |", "|---|---|---|"]
    for stage, entry in manifest["stages"].items():
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(entry["counts"].items()))
        lines.append(f"| {stage} | {len(entry['shards_done'])}/{entry['shards_planned']} | {counts} |")
    return "\n".join(lines)


def _stage_artifact(pool: Pool, stage: str) -> None:
    """A markdown artifact of one stage's counts, keyed ``stage-<name>``."""
    if not pool.manifest_path.exists():
        return
    manifest = json.loads(pool.manifest_path.read_text())  # every stage rewrites it as it ends
    entry = manifest["stages"].get(stage)
    if entry is None:
        return
    lines = [f"### {stage}", "", "| count | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(entry["counts"].items())]
    lines.append(f"| shards done | {len(entry['shards_done'])}/{entry['shards_planned']} |")
    create_markdown_artifact(markdown="\n".join(lines), key=f"stage-{stage.replace('_', '-')}",
                             description=f"{stage} in {pool.root}")  # fmt: skip


def _release_markdown(manifest: dict[str, Any]) -> str:
    counts = manifest["counts"]
    head = (f"Release of `{manifest['where']}`: **{counts['samples']} samples** in {counts['shards']} shards "
            f"({counts['bytes'] / 2**20:.1f} MiB)")  # fmt: skip
    rows = [f"| {e['name']} | {e['samples']} | `{e['sha256'][:16]}` |" for e in manifest["shards"]]
    return "\n".join([head, "", "| shard | samples | sha256 |", "|---|---:|---|", *rows])


@dataclass(frozen=True)
class FlowStage:
    """One entry of the flow: run when the config has ``section``; ``plan`` lists the shards due and
    ``batch`` runs one batch of them (a task per batch, ``download.shards_per_task`` shards each),
    then ``finish`` runs the stage's pool-wide part; ``artifact`` names the stage whose counts are
    published."""

    section: str
    plan: Any = None
    batch: Any = None
    finish: Any = None
    artifact: str | None = None
    listed: bool = False  # plan over the listed shards (curating before the download)


STAGES = [
    FlowStage("download", finish=retry_download),
    FlowStage("download", plan_download, download_batch, artifact="download"),
    FlowStage("embed", plan_embed, embed_batch, artifact="embed"),
    FlowStage("quality", plan_quality, quality_batch, artifact="quality"),
    FlowStage("metaclip", plan_metaclip, metaclip_match_batch, metaclip_balance, artifact="metaclip"),
    FlowStage("filters", plan_filters, filter_scores_batch, filter_decide, artifact="decisions"),
    FlowStage("mode", finish=mode_task, artifact="mode"),
    FlowStage("rebalance", finish=rebalance_task, artifact="rebalance"),
]
# MetaCLIP's order (``download.where``): the caption stages on the listed captions, then the rest
_METACLIP = next(s for s in STAGES if s.section == "metaclip")
TEXT_FIRST = [_METACLIP, FlowStage("filters", plan_filters, filter_scores_batch, listed=True), *STAGES]


def stages_for(cfg: PipelineConfig) -> list[FlowStage]:
    """The entries a config runs, in order."""
    order = TEXT_FIRST if cfg.download.where is not None else STAGES
    return [stage for stage in order if getattr(cfg, stage.section) is not None]


def run_stage(stage: FlowStage, cfg: PipelineConfig, engine: Engine, pool: Pool) -> list[Exception]:
    """One entry: its batches, then (when they all finished) its pool-wide part; the failures."""
    errors = []
    if stage.batch is not None:
        shards = stage.plan(cfg, engine, listed=True) if stage.listed else stage.plan(cfg, engine)
        errors = _submit_batches(stage.batch, cfg, engine, shards)
    if not errors and stage.finish is not None:
        stage.finish.with_options(retries=cfg.flow.task_retries)(cfg, engine)
    if stage.artifact is not None:
        _stage_artifact(pool, stage.artifact)
    return errors


@flow(name="curate", log_prints=True)
def curate(config_path: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Curate the pool described by the YAML config at ``config_path``: ingest, the entries of
    :func:`stages_for` in order, then the release and the report."""
    cfg = load_config(config_path, overrides)
    engine = get_engine(cfg)
    pool = Pool(cfg.pool)
    with writer_lock(pool.root, f"curate run {config_path}"):  # one writer per pool
        errors: list[Exception] = []
        ingested = ingest_task(cfg, engine)
        state = _cycle_state(cfg, ingested)
        if cfg.flow.skip_unchanged and not ingested["new_files"] and _unchanged(pool, state) and not _retry_due(
                cfg, pool):  # fmt: skip
            create_markdown_artifact(markdown=_cycle_markdown(ingested, None, pool, skipped=True), key="curate-cycle",
                                     description=f"Curation cycle of {pool.root}")  # fmt: skip
            return {**pool.build_manifest(), "cycle": "unchanged"}
        for stage in stages_for(cfg):
            errors = run_stage(stage, cfg, engine, pool)
            if errors:
                break
        release = None
        if not errors and cfg.export is not None:
            release = export_task.with_options(retries=cfg.flow.task_retries)(cfg, engine)
            create_markdown_artifact(markdown=_release_markdown(release), key="curate-release",
                                     description=f"Release {cfg.export.out}")  # fmt: skip
        if not errors and cfg.report:
            report_task(cfg)
        create_markdown_artifact(
            markdown=_counts_markdown(pool), key="curate-counts", description=f"Samples per stage in {pool.root}"
        )
        create_markdown_artifact(markdown=_cycle_markdown(ingested, release, pool), key="curate-cycle",
                                 description=f"Curation cycle of {pool.root}")  # fmt: skip
        if errors:
            raise _one_error(errors)
        from pipeline.store.parquet import write_json_atomic

        write_json_atomic(_cycle_path(pool), {"state": state, "release": (release or {}).get("version")})
        return {**pool.update_manifest(), "release": release}


def _one_error(errors: list[Exception]) -> Exception:
    """What the run raises: every batch's failed shards of the stage in one report (a user's mistake
    is then one line however many batches it stopped), else the first error."""
    from pipeline.engines.base import ShardFailures

    if all(isinstance(e, ShardFailures) for e in errors):
        return ShardFailures.merged(errors)
    return errors[0]


def _cycle_path(pool: Pool) -> Any:
    return pool.aggregates_dir / "cycle.json"


def _cycle_state(cfg: PipelineConfig, ingested: dict[str, Any]) -> str:
    """What a run's result depends on: the config (every section) and the pool's ingested input."""
    import hashlib

    from pipeline.config import config_dict  # a section added since, left unset, keeps an older pool's state

    blob = json.dumps([config_dict(cfg), ingested["num_shards"], ingested["num_rows"]], sort_keys=True,
                      default=str)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _retry_due(cfg: PipelineConfig, pool: Pool) -> bool:
    """Whether ``download.retry`` has rows to fetch again (below ``download.max_attempts``): then a
    cycle runs though nothing else changed."""
    from pipeline.download.errors import check_retry_classes
    from pipeline.download.retry import plan_retry

    classes = check_retry_classes(cfg.download.retry)
    return bool(classes) and bool(plan_retry(pool, cfg.download, classes))


def _unchanged(pool: Pool, state: str) -> bool:
    """The last successful run had this state and no file a completion marker records is damaged
    since (the quick check: a stat per file)."""
    path = _cycle_path(pool)
    if not path.exists() or json.loads(path.read_text()).get("state") != state:
        return False
    return not any(pool.damaged_files(stage) for stage in pool.stages())


def _cycle_markdown(ingested: dict[str, Any], release: dict[str, Any] | None, pool: Pool,
                    skipped: bool = False) -> str:  # fmt: skip
    """The run's artifact: new inputs, new shards, decision flips, the release version and its changes."""
    if skipped:
        return (f"Nothing new in `{pool.root}`: no new input file, the same config, no damaged file. "
                "No stage ran and no release version was made.")  # fmt: skip
    files = ingested["new_files"]
    lines = [f"## Curation cycle of `{pool.root}`", "", f"New input files: {len(files)}"]
    lines += [f"- `{f['path']}` ({f['rows']} rows)" for f in files]
    shards = ingested["new_shards"]
    lines += ["", f"New shards: {len(shards)}" + (f" ({shards[0]:05d}-{shards[-1]:05d})" if shards else "")]
    if ingested["vanished"]:
        lines += ["", f"Ingested files now gone (their rows stay in the pool): {len(ingested['vanished'])}"]
        lines += [f"- `{path}`" for path in ingested["vanished"]]
    stages = pool.build_manifest()["stages"]
    flips = [(stage, k, v) for stage in ("metaclip", "decisions", "rebalance")
             for k, v in sorted(stages.get(stage, {}).get("counts", {}).items())
             if k.startswith("flipped_")]  # fmt: skip
    if flips:
        lines += ["", "Decisions that changed on old samples:", "", "| stage | count | samples |", "|---|---|---:|"]
        lines += [f"| {stage} | {k} | {v} |" for stage, k, v in flips]
    if release is not None:
        version = release.get("version")
        state = "" if version is None else (" (new)" if release.get("new_version") else " (unchanged: no new version)")
        lines += ["", f"Release: `{version or release.get('where')}`{state}, {release['counts']['samples']} samples"]
        if version and release.get("new_version"):
            from pathlib import Path

            changes = Path(release["export_config"]["out"]) / "CHANGES.md"
            if changes.exists():
                lines += ["", changes.read_text()]
    return "\n".join(lines)


def run(config_path: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the flow with the task concurrency the config asks for."""
    cfg = load_config(config_path, overrides)
    runner = ThreadPoolTaskRunner(max_workers=cfg.flow.task_concurrency)
    return curate.with_options(task_runner=runner)(config_path, overrides)


def deployment(config_path: str, cron: str, name: str = "scheduled-curation", timezone: str = "UTC") -> Any:
    """A deployment of the ``curate`` flow for ``config_path`` on a cron schedule (served by
    :func:`serve` or a Prefect worker)."""
    from pathlib import Path

    from prefect.schedules import Cron

    # at most one run of this deployment at a time (Prefect's limit; the pool's writer lock as well)
    return curate.to_deployment(name=name, schedule=Cron(cron, timezone=timezone), concurrency_limit=1,
                                parameters={"config_path": str(Path(config_path).resolve())},
                                description=f"clipcurate on {config_path}, cron {cron!r}")  # fmt: skip


def serve(config_path: str, cron: str, name: str = "scheduled-curation") -> None:
    """Serve the scheduled deployment from this process until interrupted (needs a Prefect server:
    ``prefect server start`` and ``PREFECT_API_URL``)."""
    from prefect import serve as prefect_serve

    prefect_serve(deployment(config_path, cron, name))
