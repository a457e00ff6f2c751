"""The MetaCLIP stage over a pool: match every shard, sum entry counts, balance every shard.

1. ``metaclip_match`` (per shard, in parallel): ``matched_entry_ids`` of each caption and whether
   the sample counts towards the pool (``only_downloaded``: its download succeeded).
2. Entry counts (global): the per-shard counts (``aggregates/metaclip_counts/``, written with
   each shard's matches) summed by the engine, written to
   ``aggregates/metaclip_entry_counts.parquet``; t is resolved (fixed, scaled, or solved for a
   target size) and recorded in ``aggregates/metaclip.json``.
3. ``metaclip`` (per shard): ``metaclip_p`` and ``metaclip_keep`` from the global counts. Its
   completion markers carry a hash of the counts and t, so new counts redo it.
4. A report of the entry distribution before and after balancing in ``reports/metaclip/``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import MetaclipConfig, config_hash
from pipeline.engines.base import run_shards
from pipeline.errors import UserError
from pipeline.flips import decision_flips
from pipeline.metaclip.balancing import balance, entry_probabilities, expected_sizes, scale_t, solve_increasing
from pipeline.metaclip.matching import file_digest, load_entries, matcher_for
from pipeline.store import schema as S
from pipeline.store.parquet import Pool, write_json_atomic, write_parquet_atomic

MATCH_STAGE = "metaclip_match"
STAGE = "metaclip"
COUNTS_FILE = "metaclip_entry_counts.parquet"


def match_hash(cfg: MetaclipConfig) -> str:
    """What the matches depend on: the entries file's content, case handling, what counts."""
    blob = f"{file_digest(cfg.metadata)}|{cfg.case_sensitive}|{cfg.only_downloaded}|{cfg.where}|markers-v2"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def match_shard(pool_root: str, cfg: MetaclipConfig, shard: int) -> dict[str, int]:
    """Write ``tables/metaclip_match/{shard}`` and mark it done."""
    pool = Pool(pool_root)
    if pool.is_done("download", shard):
        dl = pool.read_shard("download", shard, columns=[S.UID, S.CAPTION, S.STATUS])
    else:  # curating before the download: the listed captions (only_downloaded is false)
        dl = pool.read_listed(shard, [S.UID, S.CAPTION])
        dl = dl.append_column(S.STATUS, pa.nulls(dl.num_rows, pa.string()))
    matched = matcher_for(cfg.metadata, cfg.case_sensitive)(dl[S.CAPTION])
    counted = pc.equal(dl[S.STATUS], S.STATUS_SUCCESS) if cfg.only_downloaded else pa.array([True] * dl.num_rows)
    if cfg.where:  # the population counted and drawn
        from pipeline.query import select_uids

        counted = pc.and_(counted, pc.is_in(dl[S.UID], value_set=select_uids(pool, shard, cfg.where)))
    table = pa.table(
        {S.UID: dl[S.UID], S.SHARD: pa.array([shard] * dl.num_rows, pa.int32()),
         S.MATCHED_ENTRY_IDS: matched, S.COUNTED: counted},
        schema=S.METACLIP_MATCH_SCHEMA,
    )  # fmt: skip
    pool.write_table(MATCH_STAGE, shard, table)
    _write_shard_counts(pool, shard, table)
    lengths = pc.list_value_length(matched).to_numpy(zero_copy_only=False)
    is_counted = counted.to_numpy(zero_copy_only=False)
    counts = {"samples": dl.num_rows, "matched": int((lengths > 0).sum()), "matches": int(lengths.sum()),
              "counted": int(is_counted.sum()), "counted_matched": int(((lengths > 0) & is_counted).sum())}  # fmt: skip
    pool.mark_done(MATCH_STAGE, shard, match_hash(cfg), counts)
    return counts


def _counts_path(pool: Pool, shard: int) -> Any:
    return pool.aggregates_dir / "metaclip_counts" / f"{shard:05d}.parquet"


def _write_entry_counts(path: Any, matched: pa.ListArray, rows: pa.Array) -> None:
    """Samples per entry among ``rows`` of a shard's ``matched`` lists, as ``(entry_id, n)``: the
    pool's figure is the engine's SQL sum of these small files, with no join."""
    entry_ids, n = np.unique(matched.filter(rows).flatten().to_numpy(zero_copy_only=False), return_counts=True)
    write_parquet_atomic(path, pa.table({"entry_id": pa.array(entry_ids, pa.int32()), "n": pa.array(n, pa.int64())}))


def _write_shard_counts(pool: Pool, shard: int, match: pa.Table) -> None:
    """This shard's counted matches per entry: a grown pool adds its new shards' counts to the
    stored ones."""
    _write_entry_counts(_counts_path(pool, shard), match[S.MATCHED_ENTRY_IDS].combine_chunks(),
                        match[S.COUNTED].combine_chunks())  # fmt: skip


def shard_counts_task(pool_root: str, shard: int) -> int:
    """The per-entry counts of a shard matched before they were stored (a pool of an earlier version)."""
    pool = Pool(pool_root)
    _write_shard_counts(pool, shard, pool.read_shard(MATCH_STAGE, shard, [S.MATCHED_ENTRY_IDS, S.COUNTED]))
    return shard


def _balance_hash(cfg: MetaclipConfig, t: float, counts_digest: str) -> str:
    return hashlib.sha256(f"{config_hash(cfg)}|{t!r}|{counts_digest}|kept-v1".encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=2)
def _load_counts(path: str, digest: str) -> np.ndarray:
    return pq.read_table(path, columns=["count"])["count"].to_numpy()


def balance_shard(pool_root: str, cfg: MetaclipConfig, t: float, digest: str, shard: int) -> dict[str, int]:
    """Write ``tables/metaclip/{shard}`` (keep probability and draw) and mark it done."""
    pool = Pool(pool_root)
    counts = _load_counts(str(pool.aggregates_dir / COUNTS_FILE), digest)
    match = pool.read_shard(MATCH_STAGE, shard)
    matched = match[S.MATCHED_ENTRY_IDS].combine_chunks()
    p, keep = balance(match[S.UID], matched, counts, t, cfg.seed)
    keep &= match[S.COUNTED].to_numpy(zero_copy_only=False)
    table = pa.table(
        {S.UID: match[S.UID], S.SHARD: match[S.SHARD], S.METACLIP_P: p, S.METACLIP_KEEP: keep},
        schema=S.METACLIP_SCHEMA,
    )
    flips = decision_flips(pool.table_path(STAGE, shard), match[S.UID], keep, S.METACLIP_KEEP, p, S.METACLIP_P)
    pool.write_table(STAGE, shard, table)
    _write_entry_counts(pool.aggregates_dir / "metaclip_kept" / f"{shard:05d}.parquet", matched, pa.array(keep))
    result = {"samples": table.num_rows, "kept": int(keep.sum()), **flips}
    pool.mark_done(STAGE, shard, _balance_hash(cfg, t, digest), result)
    return result


def expected_task(pool_root: str, counts_path: str, digest: str, ts: list[float], shard: int) -> list[float]:
    """This shard's expected kept samples for each t of ``ts`` (counted samples only)."""
    counts = _load_counts(counts_path, digest)
    match = Pool(pool_root).read_shard(MATCH_STAGE, shard, columns=[S.MATCHED_ENTRY_IDS, S.COUNTED])
    matched = match[S.MATCHED_ENTRY_IDS].combine_chunks().filter(match[S.COUNTED].combine_chunks())
    return expected_sizes(matched, counts, ts)


def resolve_t(pool: Pool, cfg: MetaclipConfig, engine: Any, counts: np.ndarray, pool_size: int, reachable: int,
              digest: str) -> float:  # fmt: skip
    """t as the config asks: solved for ``target_size`` (grid passes over the shards), scaled to the
    pool, or as given."""
    if cfg.target_size is not None:
        if cfg.target_size > reachable:
            raise UserError(f"target size {cfg.target_size:g} exceeds the {reachable:g} samples that match an entry")
        shards = pool.require_complete(MATCH_STAGE)
        path = str(pool.aggregates_dir / COUNTS_FILE)

        def expected(ts: list[float]) -> np.ndarray:
            fn = functools.partial(expected_task, str(pool.root), path, digest, ts)
            parts = run_shards(pool, engine, fn, shards, desc="metaclip t", progress=False)
            return np.sum([parts[s] for s in shards], axis=0)

        return solve_increasing(expected, cfg.target_size, max(1.0, float(counts.max(initial=1))))
    if cfg.scale_t_to_pool:
        return scale_t(pool_size, cfg.t)
    return float(cfg.t)


_KEPT_SQL = "select entry_id, sum(n) as n from kept group by entry_id"


def entry_counts_sql(engine: Any, sql: str, tables: dict[str, Any], num_entries: int) -> np.ndarray:
    """A per-entry count query's small result as a dense array over the entries."""
    rows = engine.query(sql, tables)
    counts = np.zeros(num_entries, dtype=np.int64)
    counts[rows["entry_id"].to_numpy()] = rows["n"].to_numpy()
    return counts


def pending_matches(pool: Pool, cfg: MetaclipConfig) -> list[int]:
    """Shards still to match: with ``only_downloaded`` the download must be complete; without it
    MetaCLIP runs on the listed captions, before (or without) any download, counting the whole
    listed pool as MetaCLIP does."""
    shards = pool.require_complete("download") if cfg.only_downloaded else pool.listed_shards()
    load_entries(cfg.metadata)  # a bad entries file fails here, before any work
    recorded = {"metadata_sha256": file_digest(cfg.metadata), **dataclasses.asdict(cfg)}
    pool.check_stage_config(MATCH_STAGE, recorded, match_hash(cfg))
    return [s for s in shards if not pool.is_done(MATCH_STAGE, s, match_hash(cfg))]


def match_shards(pool: Pool, cfg: MetaclipConfig, engine: Any, shards: list[int], progress: bool = True) -> None:
    """Match ``shards`` with ``engine`` (one Prefect task per batch calls this)."""
    fn = functools.partial(match_shard, str(pool.root), cfg)
    run_shards(pool, engine, fn, shards, desc=MATCH_STAGE, weights=pool.shard_sizes(shards), progress=progress)


def run_metaclip(pool: Pool, cfg: MetaclipConfig, engine: Any, progress: bool = True) -> dict[str, Any]:
    """Match what is left, count, and balance the whole pool; resumes finished shards.

    Returns:
        The summary also written to ``aggregates/metaclip.json`` (t, pool size, kept samples, ...).
    """
    match_shards(pool, cfg, engine, pending_matches(pool, cfg), progress)
    shards = pool.require_complete(MATCH_STAGE)
    entries = load_entries(cfg.metadata)

    from pipeline.engines.base import Table

    # the sum of the stored per-shard counts (a grown pool: the old shards' plus the new ones')
    missing = [s for s in shards if not _counts_path(pool, s).exists()]
    run_shards(pool, engine, functools.partial(shard_counts_task, str(pool.root)), missing, desc="metaclip counts",
               progress=False)  # fmt: skip
    count_schema = pa.schema([("entry_id", pa.int32()), ("n", pa.int64())])
    stored = Table.of([_counts_path(pool, s) for s in shards], count_schema)
    counts = entry_counts_sql(engine, _KEPT_SQL, {"kept": stored}, len(entries))
    markers = pool.completed(MATCH_STAGE)
    pool_size = sum(m["counts"]["counted"] for m in markers.values())
    reachable = sum(m["counts"]["counted_matched"] for m in markers.values())
    counts_path = pool.aggregates_dir / COUNTS_FILE
    table = pa.table(
        {"entry_id": pa.array(range(len(entries)), pa.int32()), "entry": entries, "count": counts,
         "p": np.ones(len(entries)), "kept": np.zeros(len(entries), np.int64)},
        schema=S.ENTRY_COUNTS_SCHEMA,
    )  # fmt: skip
    digest = hashlib.sha256(counts.tobytes()).hexdigest()[:16]
    write_parquet_atomic(counts_path, table)
    t = resolve_t(pool, cfg, engine, counts, pool_size, reachable, digest)
    table = table.set_column(3, "p", pa.array(entry_probabilities(counts, t)))

    todo = [s for s in shards if not pool.is_done(STAGE, s, _balance_hash(cfg, t, digest))]
    fn = functools.partial(balance_shard, str(pool.root), cfg, t, digest)
    run_shards(pool, engine, fn, todo, desc=STAGE, weights=pool.shard_sizes(todo), progress=progress)

    kept_files = [pool.aggregates_dir / "metaclip_kept" / f"{s:05d}.parquet" for s in shards]
    kept_schema = pa.schema([("entry_id", pa.int32()), ("n", pa.int64())])
    kept_counts = entry_counts_sql(engine, _KEPT_SQL, {"kept": Table.of(kept_files, kept_schema)}, len(entries))
    write_parquet_atomic(counts_path, table.set_column(4, "kept", pa.array(kept_counts, pa.int64())))
    summary = {
        "t": t, "seed": cfg.seed, "metadata": cfg.metadata, "metadata_sha256": file_digest(cfg.metadata),
        "entries": len(entries), "pool_size": pool_size, "samples_matched": reachable,
        "samples_kept": sum(m["counts"]["kept"] for m in pool.completed(STAGE).values()),
        "entries_matched": int((counts > 0).sum()), "entries_over_t": int((counts > t).sum()),
    }  # fmt: skip
    write_json_atomic(pool.aggregates_dir / "metaclip.json", summary)
    from pipeline.metaclip.report import write_report

    write_report(pool.report_dir(STAGE), entries, counts, kept_counts, t)
    pool.update_manifest()
    return summary
