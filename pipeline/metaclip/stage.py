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
from pipeline.core import runner
from pipeline.core.step import SELECTED, Flips, Read, Step
from pipeline.core.where import Where, bind
from pipeline.errors import UserError
from pipeline.metaclip.balancing import balance, entry_probabilities, expected_sizes, scale_t
from pipeline.metaclip.matching import file_digest, load_entries, matcher_for
from pipeline.sampling import solve_increasing
from pipeline.store import schema as S
from pipeline.store.parquet import Pool, write_json_atomic, write_parquet_atomic

MATCH_STAGE = "metaclip_match"
STAGE = "metaclip"
COUNTS_FILE = "metaclip_entry_counts.parquet"
COUNTS_DIR = "metaclip_counts"  # aggregates/<dir>/{shard}.parquet: counted matches per entry
KEPT_DIR = "metaclip_kept"  # ... and kept samples per entry


def match_hash(cfg: MetaclipConfig) -> str:
    """What the matches depend on: the entries file's content, case handling, what counts."""
    blob = f"{file_digest(cfg.metadata)}|{cfg.case_sensitive}|{cfg.only_downloaded}|{cfg.where}|markers-v2"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Match(Step):
    """``tables/metaclip_match``: the entries each caption contains (MetaCLIP's substring matching)
    and whether the sample counts towards the pool (``only_downloaded``: its download succeeded;
    ``where``: it is in the population). Before the download, the listed captions (MetaCLIP's order)."""

    name = MATCH_STAGE
    schema = S.METACLIP_MATCH_SCHEMA

    def __init__(self, cfg: MetaclipConfig, where: Where | None = None):
        reads = (Read("download", (S.UID, S.CAPTION, S.STATUS), listed_until_downloaded=True),)
        super().__init__(reads=reads, digest=match_hash(cfg), where=where)
        self.cfg = cfg

    def setup(self) -> None:
        matcher_for(self.cfg.metadata, self.cfg.case_sensitive)

    def __call__(self, inputs: dict[str, pa.Table]) -> pa.Table:
        dl = inputs["download"]
        matched = matcher_for(self.cfg.metadata, self.cfg.case_sensitive)(dl[S.CAPTION])
        counted = pc.equal(dl[S.STATUS], S.STATUS_SUCCESS) if self.cfg.only_downloaded else pa.array(
            [True] * dl.num_rows)  # fmt: skip
        if self.where is not None:  # the population counted and drawn
            counted = pc.and_(counted, pc.is_in(dl[S.UID], value_set=inputs[SELECTED][S.UID].combine_chunks()))
        return pa.table({S.UID: dl[S.UID], S.MATCHED_ENTRY_IDS: matched, S.COUNTED: counted})

    def counts(self, out: pa.Table) -> dict[str, int]:
        lengths = pc.list_value_length(out[S.MATCHED_ENTRY_IDS]).to_numpy(zero_copy_only=False)
        is_counted = out[S.COUNTED].to_numpy(zero_copy_only=False)
        matched = lengths > 0
        return {"samples": out.num_rows, "matched": int(matched.sum()), "matches": int(lengths.sum()),
                "counted": int(is_counted.sum()), "counted_matched": int((matched & is_counted).sum())}  # fmt: skip

    def side(self, inputs: dict[str, pa.Table], out: pa.Table) -> dict[str, pa.Table]:
        """This shard's counted matches per entry: a grown pool adds its new shards' counts to the
        stored ones."""
        return {COUNTS_DIR: entry_counts(out[S.MATCHED_ENTRY_IDS].combine_chunks(), out[S.COUNTED].combine_chunks())}


def _counts_path(pool: Pool, shard: int) -> Any:
    return pool.aggregates_dir / COUNTS_DIR / f"{shard:05d}.parquet"


def entry_counts(matched: pa.ListArray, rows: pa.Array) -> pa.Table:
    """Samples per entry among ``rows`` of a shard's ``matched`` lists, as ``(entry_id, n)``: the
    pool's figure is the engine's SQL sum of these small files, with no join."""
    entry_ids, n = np.unique(matched.filter(rows).flatten().to_numpy(zero_copy_only=False), return_counts=True)
    return pa.table({"entry_id": pa.array(entry_ids, pa.int32()), "n": pa.array(n, pa.int64())},
                    schema=S.ENTRY_N_SCHEMA)  # fmt: skip


def shard_counts_task(pool_root: str, shard: int) -> int:
    """The per-entry counts of a shard matched before they were stored (a pool of an earlier version)."""
    pool = Pool(pool_root)
    match = pool.read_shard(MATCH_STAGE, shard, [S.MATCHED_ENTRY_IDS, S.COUNTED])
    write_parquet_atomic(_counts_path(pool, shard), entry_counts(match[S.MATCHED_ENTRY_IDS].combine_chunks(),
                                                                 match[S.COUNTED].combine_chunks()))  # fmt: skip
    return shard


def _balance_hash(cfg: MetaclipConfig, t: float, counts_digest: str) -> str:
    return hashlib.sha256(f"{config_hash(cfg)}|{t!r}|{counts_digest}|kept-v1".encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=2)
def _load_counts(path: str, digest: str) -> np.ndarray:
    return pq.read_table(path, columns=["count"])["count"].to_numpy()


class Balance(Step):
    """``tables/metaclip``: each sample's keep probability and draw from the pool's entry counts and
    t (MetaCLIP's balancing, "Demystifying CLIP Data" Sec. 3.3); only counted samples are kept."""

    name = STAGE
    schema = S.METACLIP_SCHEMA
    flips = Flips(S.METACLIP_KEEP, p=S.METACLIP_P)

    def __init__(self, pool_root: str, cfg: MetaclipConfig, t: float, counts_digest: str):
        super().__init__(reads=(Read(MATCH_STAGE, tuple(S.METACLIP_MATCH_SCHEMA.names)),),
                         digest=_balance_hash(cfg, t, counts_digest))  # fmt: skip
        self.counts_path = str(Pool(pool_root).aggregates_dir / COUNTS_FILE)
        self.counts_digest, self.t, self.seed = counts_digest, t, cfg.seed

    def setup(self) -> None:
        _load_counts(self.counts_path, self.counts_digest)

    def __call__(self, inputs: dict[str, pa.Table]) -> pa.Table:
        match = inputs[MATCH_STAGE]
        counts = _load_counts(self.counts_path, self.counts_digest)
        p, keep = balance(match[S.UID], match[S.MATCHED_ENTRY_IDS].combine_chunks(), counts, self.t, self.seed)
        keep &= match[S.COUNTED].to_numpy(zero_copy_only=False)
        return pa.table({S.UID: match[S.UID], S.METACLIP_P: p, S.METACLIP_KEEP: keep})

    def counts(self, out: pa.Table) -> dict[str, int]:
        return {"samples": out.num_rows, "kept": int(pc.sum(out[S.METACLIP_KEEP]).as_py() or 0)}

    def side(self, inputs: dict[str, pa.Table], out: pa.Table) -> dict[str, pa.Table]:
        """The shard's kept samples per entry (summed in SQL for the report)."""
        matched = inputs[MATCH_STAGE][S.MATCHED_ENTRY_IDS].combine_chunks()
        return {KEPT_DIR: entry_counts(matched, out[S.METACLIP_KEEP].combine_chunks())}


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
            parts = runner.collect(engine, fn, shards, desc="metaclip t", progress=False)
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
    return runner.plan(pool, Match(cfg, _bound(pool, cfg)), shards)


def match_shards(pool: Pool, cfg: MetaclipConfig, engine: Any, shards: list[int], progress: bool = True) -> None:
    """Match ``shards`` with ``engine`` (one Prefect task per batch calls this)."""
    runner.run_step(pool, engine, Match(cfg, _bound(pool, cfg)), shards, progress=progress)


def _bound(pool: Pool, cfg: MetaclipConfig) -> Where | None:
    """``metaclip.where`` bound against the pool's columns (refused, naming the key, before any task)."""
    return None if cfg.where is None else bind(pool, cfg.where, "metaclip.where", skip=(MATCH_STAGE, STAGE))


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
    runner.map_shards(pool, engine, functools.partial(shard_counts_task, str(pool.root)), missing,
                      desc="metaclip counts", progress=False)  # fmt: skip
    stored = Table.of([_counts_path(pool, s) for s in shards], S.ENTRY_N_SCHEMA)
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

    step = Balance(str(pool.root), cfg, t, digest)
    runner.run_step(pool, engine, step, runner.plan(pool, step, shards), progress=progress)

    kept_files = [pool.aggregates_dir / KEPT_DIR / f"{s:05d}.parquet" for s in shards]
    kept_counts = entry_counts_sql(engine, _KEPT_SQL, {"kept": Table.of(kept_files, S.ENTRY_N_SCHEMA)}, len(entries))
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
