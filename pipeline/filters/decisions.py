"""The decision step: a recipe's rules turned into ``keep`` and ``drop_reason``, shard by shard.

The only pool-wide inputs of a recipe are its resolved parameters (a CLIP-score threshold from a
fraction: DataComp's ``get_threshold``, an exact order statistic computed in SQL by
:func:`pipeline.filters.threshold.order_statistic`) and the global steps' own per-shard tables
(``image_based``, ``dedup``). Once those are known, every shard is decided by its own task, and the
funnel is summed from the shards' completion markers: each marker counts the samples each rule (by
position) dropped, so "left after rule i" is the pool minus the drops of rules 0..i.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import FilterConfig, config_hash
from pipeline.core import runner
from pipeline.core.step import Flips, Read, Step
from pipeline.engines.base import Engine
from pipeline.errors import UserError
from pipeline.filters.rules import Rule, decide, recipe_rules
from pipeline.filters.threshold import order_statistic
from pipeline.store import schema as S
from pipeline.store.parquet import Pool, atomic_path, write_json_atomic

STAGE = "decisions"


def resolve_rules(pool: Pool, cfg: FilterConfig, engine: Engine) -> tuple[list[Rule], dict[str, Any]]:
    """The recipe's rules with every parameter known: a ``clip_score`` rule without a threshold gets
    the configured one, or the pool's ``get_threshold`` for its fraction (SQL through the engine)."""
    resolved, thresholds = [], {}
    listed = pool.metadata_only()  # DataComp's filtering track: no implicit downloaded / decoded rule
    for rule in recipe_rules(cfg.recipe, cfg.recipes, decoded=bool(pool.done_shards("embed")), listed=listed):
        _check_columns(pool, cfg, rule)
        column = rule.params.get("column")
        if column and column not in pool.declared_schema("download").names:
            raise UserError(f"filters.recipe {cfg.recipe!r}: rule {rule} reads the download column {column!r}, which "
                            f"the pool has not got; carry it in with download.extra_cols")  # fmt: skip
        if rule.definition.stage == "quality" and not pool.done_shards("quality"):
            raise UserError(f"filters.recipe {cfg.recipe!r}: rule {rule} reads the quality stage's scores, which "
                            f"this pool has not got; configure `quality:` (the heads' weights) or drop the rule")
        if rule.name == "clip_score" and rule.params.get("threshold") is None:
            fraction = rule.params.get("fraction")
            if fraction is None and cfg.clip_score_threshold is not None:
                rule = Rule(rule.name, {**rule.params, "threshold": cfg.clip_score_threshold})
            else:
                fraction = fraction if fraction is not None else cfg.clip_score_fraction
                stage = rule.definition.stage  # embed; download for a published column (every listed row)
                if stage == "embed":
                    pool.require_complete("embed")
                (column,) = rule.definition.columns  # clip_score, a further scorer's clip_score_<name>, or column=
                threshold = order_statistic(engine, pool.table(stage, [S.UID, column]), column, fraction)
                rule = Rule(rule.name, {**rule.params, "fraction": fraction, "threshold": threshold})
            thresholds[str(rule)] = rule.params
        resolved.append(rule)
    return resolved, thresholds


def _check_columns(pool: Pool, cfg: FilterConfig, rule: Rule) -> None:
    """A ``clip_score(score=<name>)`` rule names a scorer the embed table has, a ``watermark`` rule
    without ``column`` needs the detector's column (one line each, before any task)."""
    score = rule.params.get("score")
    if score and pool.done_shards("embed"):
        have = S.scorers_of(pool.table_schema("embed"))
        if score not in have:
            raise UserError(f"filters.recipe {cfg.recipe!r}: rule {rule}: the embed table has no scorer {score!r} "
                            f"(it has {list(have) or 'none'}); add it to embed.scorers")  # fmt: skip
    wants = rule.name == "watermark" and not rule.params.get("column")
    if wants and not (pool.done_shards("embed") and S.WATERMARK in pool.table_schema("embed").names):
        raise UserError(f"filters.recipe {cfg.recipe!r}: rule {rule} reads the watermark detector's scores, "
                        f"which this pool's embed table has not got; configure embed.watermark (LAION's "
                        f"watermark_model_v1.pt), or use LAION's published column: "
                        f"watermark(column=pwatermark) with download.extra_cols: [pwatermark]")  # fmt: skip


class Decide(Step):
    """``tables/decisions``: the recipe's rules, in order, over the stored scores give ``keep`` and
    ``drop_reason``; the marker counts each rule's drops (by position) for the funnel."""

    name = STAGE
    schema = S.DECISIONS_SCHEMA
    flips = Flips(S.KEEP, reason=S.DROP_REASON)

    def __init__(self, rules: list[Rule], digest: str):
        self.rules = rules
        published = sorted({c for r in rules if r.definition.stage == "download" for c in r.definition.columns}
                           - {S.UID, S.SHARD, S.STATUS})  # scores carried in at download (a rule's column=)
        reads = [Read("download", (S.UID, S.SHARD, S.STATUS, *published))]
        for stage in sorted({r.definition.stage for r in rules} - {"download"}):
            needed = sorted({c for r in rules if r.definition.stage == stage for c in r.definition.columns})
            reads.append(Read(stage, (S.UID, *needed)))
        super().__init__(reads=tuple(reads), digest=digest)

    def __call__(self, inputs: dict[str, pa.Table]) -> pa.Table:
        base = inputs["download"]
        columns: dict[str, np.ndarray] = {c: base[c].to_numpy(zero_copy_only=False) for c in self.reads[0].columns[2:]}
        for read in self.reads[1:]:  # each stage's rows aligned to the download table's by uid
            table = runner.matching_rows(inputs[read.table], base[S.UID])
            for c in read.columns[1:]:
                columns[c] = table[c].to_numpy(zero_copy_only=False)
        keep, reason, _ = decide(columns, self.rules)
        return pa.table({S.UID: base[S.UID], S.KEEP: pa.array(keep), S.DROP_REASON: pa.array(reason, pa.string())})

    def counts(self, out: pa.Table) -> dict[str, int]:
        keep = out[S.KEEP].to_numpy(zero_copy_only=False)
        reason = out[S.DROP_REASON].to_numpy(zero_copy_only=False)
        counts = {"samples": out.num_rows, "kept": int(keep.sum())}
        first = _first_failing(out.num_rows, keep, reason, self.rules)
        for i in range(len(self.rules)):
            counts[f"dropped_by_rule_{i}"] = int((first == i).sum())
        return counts


def decide_shard(pool: Pool, shard: int, rules: list[Rule]) -> tuple[pa.Table, np.ndarray]:
    """(uid of every sample of the shard, keep) under ``rules`` from the stored scores, without
    writing anything (an export of another recipe of the pool)."""
    step = Decide(rules, "")
    out = step(runner.read_inputs(pool, step, shard))
    return out.select([S.UID]), out[S.KEEP].to_numpy(zero_copy_only=False)


def _first_failing(n: int, keep: np.ndarray, reason: np.ndarray, rules: list[Rule]) -> np.ndarray:
    """Position of the rule each dropped sample failed first (-1 when kept)."""
    first = np.full(n, -1)
    for i in range(len(rules) - 1, -1, -1):  # the earliest position of a repeated name wins
        first[~keep & (reason == rules[i].name)] = i
    return first


def decisions_digest(pool: Pool, cfg: FilterConfig, rules: list[Rule]) -> str:
    upstream = []
    scored = ("quality",) if any(r.definition.stage == "quality" for r in rules) else ()  # as before, without it
    for stage in ("filters", "image_based", "dedup", "embed", *scored):
        path = pool.marker_path(stage, 0)
        upstream.append(json.loads(path.read_text()).get("config_hash") if path.exists() else None)
    blob = json.dumps([config_hash(cfg), [r.params for r in rules], upstream], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_decisions(pool: Pool, cfg: FilterConfig, engine: Engine, progress: bool = True) -> dict[str, Any]:
    """Resolve the recipe's parameters, decide every shard not yet decided with them, and write the
    summary (``aggregates/decisions.json``) and the funnel (``reports/decisions/``)."""
    shards = pool.require_complete("download")
    rules, thresholds = resolve_rules(pool, cfg, engine)
    digest = decisions_digest(pool, cfg, rules)
    step = Decide(rules, digest)
    runner.run_step(pool, engine, step, runner.plan(pool, step, shards), progress=progress)
    totals: dict[str, int] = {}
    for marker in pool.completed(STAGE).values():
        for key, value in marker["counts"].items():
            totals[key] = totals.get(key, 0) + value
    left, funnel, reasons = totals["samples"], [], {}
    for i, rule in enumerate(rules):
        dropped = totals.get(f"dropped_by_rule_{i}", 0)
        left -= dropped
        funnel.append({"rule": str(rule), "left": left})
        if dropped:
            why = rule.definition.drop_reason or rule.name
            reasons[why] = reasons.get(why, 0) + dropped
    summary = {
        "recipe": cfg.recipe, "rules": [str(r) for r in rules],
        "rule_params": {r.name: r.params for r in rules}, "clip_score_thresholds": thresholds,
        "pool_size": totals["samples"], "kept": totals["kept"], "dropped": totals["samples"] - totals["kept"],
        "funnel": funnel, "drop_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "config": dataclasses.asdict(cfg),
    }  # fmt: skip
    write_json_atomic(pool.aggregates_dir / "decisions.json", summary)
    write_funnel(pool.report_dir(STAGE), summary)
    return summary


def recorded_config(pool: Pool, recipe: str | None = None) -> FilterConfig:
    """The filter config the pool's decisions were made with (another ``recipe`` of it on request),
    so an export re-decides with the pool's own thresholds and fractions."""
    path = pool.aggregates_dir / "decisions.json"
    if not path.exists():
        raise UserError(f"{pool.root}: no filter decisions yet; run `curate filter` first")
    data = json.loads(path.read_text()).get("config")
    if data is None:
        raise UserError(f"{path}: made by an older version without its config; run `curate filter` again")
    data = {**data, "recipe": recipe or data["recipe"]}
    return FilterConfig(**data)


def write_funnel(out: Path, summary: dict[str, Any]) -> None:
    """``funnel.md`` and ``funnel.json``: samples left after each rule, and the drop reasons."""
    write_json_atomic(out / "funnel.json", summary)
    total = summary["pool_size"]
    lines = [f"# Filter funnel: recipe `{summary['recipe']}`", "", f"Pool: {total} samples.", "",
             "| after rule | samples left | share of pool |", "|---|---:|---:|"]  # fmt: skip
    for step in summary["funnel"]:
        share = f"{100 * step['left'] / total:.1f}%" if total else "-"
        lines.append(f"| `{step['rule']}` | {step['left']} | {share} |")
    lines += ["", "| drop reason | samples |", "|---|---:|"]
    lines += [f"| `{k}` | {v} |" for k, v in summary["drop_reasons"].items()]
    with atomic_path(out / "funnel.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
