"""Long-tail rebalancing of a pool over a grouping column (MoDE fine clusters by default).

Two rules, each per group g of ``count_g`` samples:

- ``cap``: ``p_g = min(1, t / count_g)``, MetaCLIP's balancing rule ("Demystifying CLIP Data",
  Sec. 3.3) applied to clusters: groups above t are cut to about t, smaller groups are kept whole.
- ``temperature``: ``p_g = min(1, s * count_g ** (alpha - 1))``, so a group keeps about
  ``s * count_g ** alpha`` samples: alpha = 1 keeps proportions, alpha = 0 equalises groups
  (temperature sampling as used for multilingual and multi-domain mixtures).

``target_size`` solves t (or s) by bisection on the expected subset size ``sum_g p_g * count_g``.
For a list column (``matched_entry_ids``) the cap is MetaCLIP's any-entry rule itself
(:func:`pipeline.metaclip.balancing.balance`). Draws are hashes of (seed, uid, group), as in
:mod:`pipeline.sampling`: deterministic and independent of partitioning.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import RebalanceConfig, config_hash
from pipeline.sampling import uid_to_uint64, uniform
from pipeline.store import schema as S
from pipeline.store.parquet import Pool, write_json_atomic

STAGE = "rebalance"


def group_probabilities(counts: np.ndarray, method: str, param: float, alpha: float) -> np.ndarray:
    """Keep probability of each group (module docstring); ``param`` is t (cap) or s (temperature)."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    if method == "cap":
        return np.minimum(1.0, param / counts)
    return np.minimum(1.0, param * counts ** (alpha - 1.0))


def solve_param(counts: np.ndarray, method: str, alpha: float, target: float) -> float:
    """t or s whose expected subset size ``sum(p_g * count_g)`` is ``target``."""
    counts = np.asarray(counts, dtype=np.float64)
    if target >= counts.sum():
        raise ValueError(f"target size {target:g} is not below the {counts.sum():g} samples to rebalance")
    lo, hi = 0.0, float(counts.max())
    for _ in range(200):
        mid = (lo + hi) / 2
        size = (group_probabilities(counts, method, mid, alpha) * counts).sum()
        lo, hi = (mid, hi) if size < target else (lo, mid)
        if hi - lo <= 1e-9 * max(hi, 1.0):
            break
    return hi


def rebalance(uids: pa.Array, groups: np.ndarray, p_group: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's probability (its group's) and its draw."""
    p = p_group[groups]
    keep = uniform(uid_to_uint64(uids), groups.astype(np.uint64), seed) < p
    return p, keep


def run_rebalance(pool: Pool, cfg: RebalanceConfig, engine: Any = None) -> dict[str, Any]:
    """Rebalance every sample that has ``cfg.group_by``; write ``tables/rebalance/{shard}``.

    With the Spark engine, the group sizes are a Spark aggregation over the stage's tables."""
    from pipeline.query import connect

    con = connect(pool)
    columns = {name: dtype for name, dtype, *_ in con.execute("describe samples").fetchall()}
    if cfg.group_by not in columns:
        raise ValueError(f"rebalance.group_by: no column {cfg.group_by!r} in the pool; it has {sorted(columns)}")
    data = con.sql(f'select uid, shard, "{cfg.group_by}" as g from samples where "{cfg.group_by}" is not null '
                   "order by shard, uid").fetch_arrow_table()  # fmt: skip
    if columns[cfg.group_by].endswith("[]"):
        p, keep, counts, kept, param = _entries(data, cfg)
    else:
        groups, index = np.unique(data["g"].to_numpy(), return_inverse=True)
        counts = np.bincount(index, minlength=len(groups))
        stage = _stage_of(con, cfg.group_by)
        if getattr(engine, "name", "") == "spark" and stage:
            from pipeline.engines import spark_steps

            sizes = spark_steps.group_counts(engine.spark, pool, stage, cfg.group_by)
            counts = np.array([sizes.get(g.item(), 0) for g in groups], dtype=np.int64)
        param = solve_param(counts, cfg.method, cfg.alpha, cfg.target_size) if cfg.target_size else (
            cfg.t if cfg.method == "cap" else 1.0)  # fmt: skip
        p, keep = rebalance(data["uid"], index, group_probabilities(counts, cfg.method, param, cfg.alpha), cfg.seed)
        kept = np.bincount(index[keep], minlength=len(groups))
    counts_digest = hashlib.sha256(counts.tobytes()).hexdigest()
    digest = hashlib.sha256(f"{config_hash(cfg)}|{counts_digest}".encode()).hexdigest()[:16]
    pool.require_complete("download")
    table = pa.table({S.UID: data["uid"], S.SHARD: data["shard"].cast(pa.int32()), S.REBALANCE_P: p,
                      S.REBALANCE_KEEP: keep}, schema=S.REBALANCE_SCHEMA)  # fmt: skip

    def counts_of(part: pa.Table) -> dict[str, int]:
        return {"samples": part.num_rows, "kept": int(pa.compute.sum(part[S.REBALANCE_KEEP]).as_py() or 0)}

    pool.write_by_shard(STAGE, table, digest, counts_of)
    summary = {"group_by": cfg.group_by, "method": cfg.method, "param": param, "alpha": cfg.alpha,
               "samples": len(p), "kept": int(keep.sum()), "expected_kept": float(p.sum()),
               "groups": int((counts > 0).sum())}  # fmt: skip
    write_json_atomic(pool.aggregates_dir / "rebalance.json", summary)
    _report(pool, cfg, counts, kept, summary)
    pool.update_manifest()
    return summary


def _stage_of(con: Any, column: str) -> str | None:
    """The stage table holding ``column`` (for a Spark aggregation over its files)."""
    for (name,) in con.execute("select view_name from duckdb_views() where not internal").fetchall():
        if name != "samples" and column in {r[0] for r in con.execute(f'describe "{name}"').fetchall()}:
            return name
    return None


def _entries(data: pa.Table, cfg: RebalanceConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """MetaCLIP's any-entry rule over ``matched_entry_ids`` (cap only)."""
    from pipeline.metaclip.balancing import balance, t_for_size
    from pipeline.metaclip.matching import entry_counts

    if cfg.method != "cap":
        raise ValueError("rebalance.method: a list column (MetaCLIP entries) supports only `cap`")
    matched = data["g"].combine_chunks().cast(pa.list_(pa.int32()))
    size = int(pa.compute.max(matched.flatten()).as_py() or 0) + 1
    counts = entry_counts(matched, size)
    t = t_for_size(matched, counts, cfg.target_size) if cfg.target_size else cfg.t
    p, keep = balance(data["uid"], matched, counts, t, cfg.seed)
    return p, keep, counts, entry_counts(matched, size, keep), t


def _report(pool: Pool, cfg: RebalanceConfig, counts: np.ndarray, kept: np.ndarray, summary: dict[str, Any]) -> None:
    from pipeline.mode import size_spread
    from pipeline.mode_stage import plot_sizes
    from pipeline.store.parquet import atomic_path

    out = pool.report_dir(STAGE)
    present = counts > 0
    spreads = {"before": size_spread(counts[present]), "after": size_spread(kept[present])}
    write_json_atomic(out / "group_sizes.json", {**summary, **spreads})
    plot_sizes(out / "group_sizes.png", {"before": counts[present], "after": kept[present]},
               f"Group sizes ({cfg.group_by}) before and after rebalancing")  # fmt: skip
    lines = [f"# Rebalancing over `{cfg.group_by}` ({cfg.method})", "", "| | groups | min | median | max | Gini |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, v in spreads.items():
        lines.append(f"| {name} | {v['clusters']} | {v['min']} | {v['median']} | {v['max']} | {v['gini']} |")
    with atomic_path(out / "group_sizes.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
