"""Long-tail rebalancing of a pool over a grouping column (MoDE fine clusters by default).

Two rules, each per group g of ``count_g`` samples:

- ``cap``: ``p_g = min(1, t / count_g)``, MetaCLIP's balancing rule ("Demystifying CLIP Data",
  Sec. 3.3) applied to clusters: groups above t are cut to about t, smaller groups are kept whole.
- ``temperature``: ``p_g = min(1, s * count_g ** (alpha - 1))``, so a group keeps about
  ``s * count_g ** alpha`` samples: alpha = 1 keeps proportions, alpha = 0 equalises groups
  (temperature sampling as used for multilingual and multi-domain mixtures).

``target_size`` solves t (or s) by bisection on the expected subset size ``sum_g p_g * count_g``.
For a list column (``matched_entry_ids``) the cap is MetaCLIP's any-entry rule itself
(:func:`pipeline.metaclip.balancing.balance`). Draws are hashes of (seed, uid, group value), as in
:mod:`pipeline.sampling`: deterministic, independent of partitioning and of which other groups
exist. At pool scale the group sizes are one SQL aggregation (a row per group), and every shard
draws in its own task.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import RebalanceConfig, config_hash
from pipeline.core.step import SHARD_FILE, Flips, Read, Step
from pipeline.core.where import Where, bind, select
from pipeline.errors import UserError
from pipeline.sampling import solve_increasing, uid_to_uint64, uniform
from pipeline.store import schema as S
from pipeline.store.parquet import Pool, write_json_atomic, write_parquet_atomic

STAGE = "rebalance"


def group_probabilities(counts: np.ndarray, method: str, param: float, alpha: float) -> np.ndarray:
    """Keep probability of each group (module docstring); ``param`` is t (cap) or s (temperature)."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    if method == "cap":
        return np.minimum(1.0, param / counts)
    return np.minimum(1.0, param * counts ** (alpha - 1.0))


def solve_param(counts: np.ndarray, method: str, alpha: float, target: float) -> float:
    """t or s whose expected subset size ``sum(p_g * count_g)`` is ``target`` (to 1e-9 relative)."""
    counts = np.asarray(counts, dtype=np.float64)
    if target >= counts.sum():
        raise UserError(f"target size {target:g} is not below the {counts.sum():g} samples to rebalance")

    def expected(params: list[float]) -> list[float]:
        return [float((group_probabilities(counts, method, x, alpha) * counts).sum()) for x in params]

    return solve_increasing(expected, target, float(counts.max()), passes=12, rel=1e-9)


def group_keys(values: np.ndarray) -> np.ndarray:
    """The draw key of each group value: the value itself (an integer id), so a sample's draw does not
    depend on which other groups exist."""
    return np.asarray(values, dtype=np.int64).view(np.uint64)


def rebalance(uids: pa.Array, values: np.ndarray, p: np.ndarray, seed: int) -> np.ndarray:
    """Each sample's draw: kept with its group's probability ``p``, keyed by (seed, uid, group value)."""
    return uniform(uid_to_uint64(uids), group_keys(values), seed) < p


def _locate(pool: Pool, column: str) -> tuple[str, pa.DataType]:
    """The stage table holding ``column`` and its type."""
    found = []
    for stage in pool.stages():
        if stage == STAGE or not pool.table_dir(stage).exists():
            continue
        schema = pool.table_schema(stage)
        if column in schema.names:
            return stage, schema.field(column).type
        found += schema.names
    raise UserError(f"rebalance.group_by: no column {column!r} in the pool; it has {sorted(set(found))}")


@functools.lru_cache(maxsize=2)
def _groups(path: str, digest: str) -> dict[str, np.ndarray]:
    """``aggregates/rebalance/groups.parquet``: group value ``g``, size ``n`` and (for a scalar
    column) probability ``p``; cached per worker process."""
    table = pq.read_table(path)
    return {name: table[name].to_numpy() for name in table.column_names}


def _dir(pool: Pool) -> Any:
    return pool.aggregates_dir / STAGE


def population_task(pool_root: str, cfg: RebalanceConfig, stage: str, where: Where | None, shard: int) -> int:
    """This shard's samples in play (a group, and ``where`` when given) with their group value, to
    ``aggregates/rebalance/input/{shard}.parquet``: what the group sizes are counted over (a SQL
    aggregation of these narrow files, with no pool-sized join) and what the draws read."""
    pool = Pool(pool_root)
    table = pool.read_shard(stage, shard, columns=[S.UID, cfg.group_by])
    table = table.filter(pc.is_valid(table[cfg.group_by])).sort_by(S.UID)
    if where is not None:  # only the samples in play are counted and drawn
        table = table.filter(pc.is_in(table[S.UID], value_set=select(pool, where, shard)))
    write_parquet_atomic(_dir(pool) / "input" / f"{shard:05d}.parquet", table.rename_columns([S.UID, "g"]))
    return table.num_rows


class Draw(Step):
    """``tables/rebalance``: each sample in play (its shard's population file) drawn with its group's
    keep probability; a list column (MetaCLIP entries) by MetaCLIP's any-entry rule."""

    name = STAGE
    schema = S.REBALANCE_SCHEMA
    flips = Flips(S.REBALANCE_KEEP, p=S.REBALANCE_P)

    def __init__(self, cfg: RebalanceConfig, listed: bool, param: float, groups_path: str, digest: str):
        super().__init__(reads=(Read(f"{STAGE}/input", (S.UID, "g"), kind=SHARD_FILE, name="input"),), digest=digest)
        self.seed, self.listed, self.param, self.groups_path = cfg.seed, listed, param, groups_path

    def setup(self) -> None:
        _groups(self.groups_path, self.digest)

    def __call__(self, inputs: dict[str, pa.Table]) -> pa.Table:
        from pipeline.metaclip.balancing import balance

        table, groups = inputs["input"], _groups(self.groups_path, self.digest)
        if self.listed:
            matched = table["g"].combine_chunks().cast(pa.list_(pa.int32()))
            p, keep = balance(table[S.UID], matched, groups["n"], self.param, self.seed)
        else:
            g = table["g"].to_numpy()
            p = groups["p"][np.searchsorted(groups["g"], g)]
            keep = rebalance(table[S.UID], g, p, self.seed)
        return pa.table({S.UID: table[S.UID], S.REBALANCE_P: pa.array(p, pa.float64()), S.REBALANCE_KEEP: keep})

    def counts(self, out: pa.Table) -> dict[str, int]:
        return {"samples": out.num_rows, "kept": int(pc.sum(out[S.REBALANCE_KEEP]).as_py() or 0),
                "expected": float(out[S.REBALANCE_P].to_numpy().sum())}  # fmt: skip

    def side(self, inputs: dict[str, pa.Table], out: pa.Table) -> dict[str, pa.Table]:
        """The shard's kept samples per group (``aggregates/rebalance/kept/``, summed in SQL)."""
        keep = out[S.REBALANCE_KEEP].combine_chunks()
        g = inputs["input"]["g"].combine_chunks()
        kept = g.cast(pa.list_(pa.int32())).filter(keep).flatten() if self.listed else g.filter(keep)
        values, counts = np.unique(kept.to_numpy(zero_copy_only=False), return_counts=True)
        return {f"{STAGE}/kept": pa.table({"g": pa.array(values, pa.int64()), "n": pa.array(counts, pa.int64())},
                                             schema=S.GROUP_N_SCHEMA)}


def _expected_task(pool_root: str, groups_path: str, digest: str, ts: list[float], shard: int) -> list[float]:
    from pipeline.metaclip.balancing import expected_sizes

    table = pq.read_table(_dir(Pool(pool_root)) / "input" / f"{shard:05d}.parquet")
    return expected_sizes(table["g"].combine_chunks().cast(pa.list_(pa.int32())), _groups(groups_path, digest)["n"], ts)


def _sizes(pool: Pool, engine: Any, shards: list[int], listed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Samples in play per group value: one SQL aggregation over the per-shard input files."""
    from pipeline.engines.base import Table

    files = [_dir(pool) / "input" / f"{s:05d}.parquet" for s in shards]
    table = Table.of(files, pq.read_schema(files[0]))
    inner = "select unnest(g) as g from input" if listed else "select g from input"
    sizes = engine.query(f"select g, count(*) as n from ({inner}) x group by g order by g", {"input": table})
    return sizes["g"].to_numpy().astype(np.int64), sizes["n"].to_numpy().astype(np.int64)


def run_rebalance(pool: Pool, cfg: RebalanceConfig, engine: Any, progress: bool = True) -> dict[str, Any]:
    """Rebalance the samples in play: each shard lists its population (per-shard tasks), the group
    sizes are SQL over those lists, the probabilities come from the sizes (one row per group), and
    each shard draws in its own task."""
    from pipeline.core import runner
    from pipeline.engines.base import Table

    shards = pool.require_complete("download")
    stage, dtype = _locate(pool, cfg.group_by)
    listed = pa.types.is_list(dtype) or pa.types.is_large_list(dtype)
    if not (listed or pa.types.is_integer(dtype)):
        raise UserError(f"rebalance.group_by: {cfg.group_by!r} is {dtype}; it must be an integer id or a list of them")
    if listed and cfg.method != "cap":
        raise UserError("rebalance.method: a list column (MetaCLIP entries) supports only `cap`")
    pool.require_complete(stage)
    where = None if cfg.where is None else bind(pool, cfg.where, "rebalance.where", skip=(STAGE,))
    runner.map_shards(pool, engine, functools.partial(population_task, str(pool.root), cfg, stage, where), shards,
                      desc="rebalance population", progress=False)  # fmt: skip
    values, counts = _sizes(pool, engine, shards, listed)
    groups_path = _dir(pool) / "groups.parquet"
    if listed:  # MetaCLIP's any-entry rule: dense per-entry counts, t solved on the expected size
        dense = np.zeros(int(values.max(initial=-1)) + 1, dtype=np.int64)
        dense[values] = counts
        counts_digest = hashlib.sha256(dense.tobytes()).hexdigest()
        digest = hashlib.sha256(f"{config_hash(cfg)}|{counts_digest}".encode()).hexdigest()[:16]
        write_parquet_atomic(groups_path, pa.table({"g": np.arange(len(dense)), "n": dense}))
        param = cfg.t
        if cfg.target_size:
            def expected(ts: list[float]) -> np.ndarray:
                fn = functools.partial(_expected_task, str(pool.root), str(groups_path), digest, ts)
                parts = runner.map_shards(pool, engine, fn, shards, desc="rebalance t", progress=False)
                return np.sum([parts[s] for s in shards], axis=0)

            param = solve_increasing(expected, cfg.target_size, max(1.0, float(dense.max(initial=1))))
    else:
        param = solve_param(counts, cfg.method, cfg.alpha, cfg.target_size) if cfg.target_size else (
            cfg.t if cfg.method == "cap" else 1.0)  # fmt: skip
        p = group_probabilities(counts, cfg.method, param, cfg.alpha)
        blob = f"{config_hash(cfg)}|{param!r}|{hashlib.sha256(counts.tobytes() + values.tobytes()).hexdigest()}"
        digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
        write_parquet_atomic(groups_path, pa.table({"g": values, "n": counts, "p": p}))
    step = Draw(cfg, listed, param, str(groups_path), digest)
    runner.run_step(pool, engine, step, runner.plan(pool, step, shards), progress=progress)
    kept_files = [_dir(pool) / "kept" / f"{s:05d}.parquet" for s in shards]
    kept_rows = engine.query("select g, sum(n) as n from kept group by g",
                             {"kept": Table.of(kept_files, S.GROUP_N_SCHEMA)})  # fmt: skip
    kept = np.zeros(len(values), dtype=np.int64)
    kept[np.searchsorted(values, kept_rows["g"].to_numpy())] = kept_rows["n"].to_numpy()
    markers = pool.completed(STAGE)
    summary = {"group_by": cfg.group_by, "where": cfg.where, "method": cfg.method, "param": param, "alpha": cfg.alpha,
               "samples": sum(m["counts"]["samples"] for m in markers.values()),
               "kept": sum(m["counts"]["kept"] for m in markers.values()),
               "expected_kept": sum(m["counts"]["expected"] for m in markers.values()),
               "groups": len(values)}  # fmt: skip
    write_json_atomic(pool.aggregates_dir / "rebalance.json", summary)
    _report(pool, cfg, counts, kept, summary)
    pool.update_manifest()
    return summary


def _report(pool: Pool, cfg: RebalanceConfig, counts: np.ndarray, kept: np.ndarray, summary: dict[str, Any]) -> None:
    from pipeline.mode import plot_sizes, size_spread
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
