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
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import FilterConfig, config_hash
from pipeline.engines.base import Engine, run_shards
from pipeline.errors import DamagedError, UserError
from pipeline.filters.rules import Rule, decide, recipe_rules
from pipeline.filters.threshold import order_statistic
from pipeline.store import schema as S
from pipeline.store.parquet import Pool, atomic_path, write_json_atomic

STAGE = "decisions"


def resolve_rules(pool: Pool, cfg: FilterConfig, engine: Engine) -> tuple[list[Rule], dict[str, Any]]:
    """The recipe's rules with every parameter known: a ``clip_score`` rule without a threshold gets
    the configured one, or the pool's ``get_threshold`` for its fraction (SQL through the engine)."""
    resolved, thresholds = [], {}
    for rule in recipe_rules(cfg.recipe, cfg.recipes, decoded=bool(pool.done_shards("embed"))):
        if rule.name == "clip_score" and rule.params.get("threshold") is None:
            fraction = rule.params.get("fraction")
            if fraction is None and cfg.clip_score_threshold is not None:
                rule = Rule(rule.name, {**rule.params, "threshold": cfg.clip_score_threshold})
            else:
                fraction = fraction if fraction is not None else cfg.clip_score_fraction
                pool.require_complete("embed")
                threshold = order_statistic(engine, pool.table("embed", [S.UID, S.CLIP_SCORE]), S.CLIP_SCORE, fraction)
                rule = Rule(rule.name, {**rule.params, "fraction": fraction, "threshold": threshold})
            thresholds[str(rule)] = rule.params
        resolved.append(rule)
    return resolved, thresholds


def decide_shard(pool: Pool, shard: int, rules: list[Rule]) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """(uid and shard of every sample of the shard, keep, drop reason) from the stored scores."""
    base = pool.read_shard("download", shard, columns=[S.UID, S.SHARD, S.STATUS])
    columns: dict[str, np.ndarray] = {S.STATUS: base[S.STATUS].to_numpy(zero_copy_only=False)}
    for stage in sorted({r.definition.stage for r in rules} - {"download"}):
        needed = sorted({c for r in rules if r.definition.stage == stage for c in r.definition.columns})
        path = pool.table_path(stage, shard)
        if not path.exists():
            raise DamagedError(f"{path}: missing; stage {stage!r} must finish shard {shard:05d} before the decisions")
        table = pool.read_shard(stage, shard, columns=[S.UID, *needed])
        rows = pc.index_in(base[S.UID], value_set=table[S.UID].combine_chunks())
        for c in needed:
            columns[c] = pc.take(table[c], rows).to_numpy(zero_copy_only=False)
    keep, reason, _ = decide(columns, rules)
    return base.select([S.UID, S.SHARD]), keep, reason


def decide_task(pool_root: str, rules: list[Rule], digest: str, shard: int) -> dict[str, int]:
    """Write ``tables/decisions/{shard}`` and mark it done; the marker counts each rule's drops."""
    pool = Pool(pool_root)
    base, keep, reason = decide_shard(pool, shard, rules)
    table = pa.table({S.UID: base[S.UID], S.SHARD: base[S.SHARD], S.KEEP: pa.array(keep),
                      S.DROP_REASON: pa.array(reason, pa.string())}, schema=S.DECISIONS_SCHEMA)  # fmt: skip
    from pipeline.flips import decision_flips

    flips = decision_flips(pool.table_path(STAGE, shard), base[S.UID], keep, S.KEEP, reason=np.asarray(reason),
                           reason_col=S.DROP_REASON)  # fmt: skip
    pool.write_table(STAGE, shard, table)
    counts = {"samples": table.num_rows, "kept": int(keep.sum()), **flips}
    first = _first_failing(base.num_rows, keep, reason, rules)
    for i in range(len(rules)):
        counts[f"dropped_by_rule_{i}"] = int((first == i).sum())
    pool.mark_done(STAGE, shard, digest, counts)
    return counts


def _first_failing(n: int, keep: np.ndarray, reason: np.ndarray, rules: list[Rule]) -> np.ndarray:
    """Position of the rule each dropped sample failed first (-1 when kept)."""
    first = np.full(n, -1)
    for i in range(len(rules) - 1, -1, -1):  # the earliest position of a repeated name wins
        first[~keep & (reason == rules[i].name)] = i
    return first


def decisions_digest(pool: Pool, cfg: FilterConfig, rules: list[Rule]) -> str:
    upstream = []
    for stage in ("filters", "image_based", "dedup", "embed"):
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
    todo = [s for s in shards if not pool.is_done(STAGE, s, digest)]
    run_shards(pool, engine, functools.partial(decide_task, str(pool.root), rules, digest), todo, desc=STAGE,
               weights=pool.shard_sizes(todo), progress=progress)  # fmt: skip
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
