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
LANG_COUNTS_DIR = "metaclip_lang_counts"  # worldwide: counted matches per (language, entry)
LANG_KEPT_DIR = "metaclip_lang_kept"  # ... kept samples per (language, entry)
LANG_SAMPLES_DIR = "metaclip_lang_samples"  # ... counted, matched and kept samples per language
LANG_ENTRIES_FILE = "metaclip_lang_entries.parquet"
LANGUAGES_FILE = "metaclip_languages.parquet"


def match_hash(cfg: MetaclipConfig) -> str:
    """What the matches depend on: the entries file's content (every language's, worldwide), case
    handling, what counts."""
    blob = f"{file_digest(cfg.metadata)}|{cfg.case_sensitive}|{cfg.only_downloaded}|{cfg.where}|markers-v2"
    if cfg.worldwide:
        from pipeline.metaclip.worldwide import metadata_digest, metadata_files

        files = metadata_files(cfg.metadata_dir, cfg.metadata)
        blob += f"|worldwide-v1|{metadata_digest(files)}|{cfg.unlisted_languages}"
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
        matched = self.matcher(inputs)
        counted = pc.equal(dl[S.STATUS], S.STATUS_SUCCESS) if self.cfg.only_downloaded else pa.array(
            [True] * dl.num_rows)  # fmt: skip
        if self.where is not None:  # the population counted and drawn
            counted = pc.and_(counted, pc.is_in(dl[S.UID], value_set=inputs[SELECTED][S.UID].combine_chunks()))
        return pa.table({S.UID: dl[S.UID], S.MATCHED_ENTRY_IDS: matched, S.COUNTED: counted})

    def matcher(self, inputs: dict[str, pa.Table]) -> pa.ListArray:
        """The shard's ``matched_entry_ids``."""
        return matcher_for(self.cfg.metadata, self.cfg.case_sensitive)(inputs["download"][S.CAPTION])

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


class WorldMatch(Match):
    """``tables/metaclip_match`` of MetaCLIP 2's worldwide curation: each caption matched against its
    own language's list only (:mod:`pipeline.metaclip.worldwide`), its language being the filters'
    fastText ``lang`` score folded onto the metadata's languages; ``matched_entry_ids`` are ids in
    that language's list. The same table as MetaCLIP 1's; the language is folded again wherever it
    is needed (:meth:`languages_of`), from the same score and the same settings."""

    def __init__(self, cfg: MetaclipConfig, where: Where | None = None):
        from pipeline.filters.common import STAGE as SCORES
        from pipeline.metaclip.worldwide import metadata_files

        super().__init__(cfg, where)
        self.reads = (*self.reads, Read(SCORES, (S.UID, S.LANG), name="scores"))
        self.lang_files = {lang: str(path) for lang, path in metadata_files(cfg.metadata_dir, cfg.metadata).items()}

    def setup(self) -> None:
        """Nothing up front: a language's automaton is built the first time one of its captions
        comes to this worker, and kept (at most one per language)."""

    def languages_of(self, uids: pa.ChunkedArray | pa.Array, scores: pa.Table) -> pa.Array:
        """The metadata language of each uid (``scores``: the shard's filters rows, by uid). The
        shard's call and its ``side`` ask for the same rows: the second is answered from a memo of
        the first (the same objects), not folded again."""
        from pipeline.metaclip.worldwide import fold_column

        memo = getattr(self, "_memo", None)
        if memo is not None and memo[0] is uids and memo[1] is scores:
            return memo[2]
        at = pc.index_in(uids, value_set=scores[S.UID].combine_chunks())
        if at.null_count:
            raise RuntimeError("a sample of the shard has no caption scores: the scores step must run first")
        langs = fold_column(scores[S.LANG].combine_chunks().take(at), frozenset(self.lang_files),
                            self.cfg.unlisted_languages)  # fmt: skip
        self._memo = (uids, scores, langs)
        return langs

    def match(self, captions: pa.ChunkedArray | pa.Array, langs: pa.Array) -> pa.ListArray:
        """Each caption matched by its language's automaton only; no match for a language without a
        list. The captions are grouped by language with one sort, each language's run is matched as
        a slice, and one take puts the lists back in the shard's order."""
        if isinstance(captions, pa.ChunkedArray):
            captions = captions.combine_chunks() if captions.num_chunks else pa.array([], pa.string())
        encoded = langs.dictionary_encode()
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        order = np.argsort(codes, kind="stable")
        grouped = captions.take(pa.array(order))
        bounds = np.searchsorted(codes[order], np.arange(len(encoded.dictionary) + 1))
        parts = []
        for code, lang in enumerate(encoded.dictionary.to_pylist()):
            run = grouped.slice(bounds[code], bounds[code + 1] - bounds[code])
            if lang in self.lang_files:
                parts.append(matcher_for(self.lang_files[lang], self.cfg.case_sensitive, worldwide=True)(run))
            else:
                empty = pa.array(np.zeros(len(run) + 1, np.int32))
                parts.append(pa.ListArray.from_arrays(empty, pa.array([], pa.int32())))
        matched = pa.concat_arrays([p.cast(pa.list_(pa.int32())) for p in parts]) if parts else pa.array(
            [], pa.list_(pa.int32()))  # fmt: skip
        inverse = np.empty(len(order), np.int64)
        inverse[order] = np.arange(len(order))
        return matched.take(pa.array(inverse))

    def __call__(self, inputs: dict[str, pa.Table]) -> pa.Table:
        dl = inputs["download"]
        langs = self.languages_of(dl[S.UID], inputs["scores"])
        return super().__call__({**inputs, "_langs": langs})

    def matcher(self, inputs: dict[str, pa.Table]) -> pa.ListArray:
        return self.match(inputs["download"][S.CAPTION], inputs["_langs"])

    def side(self, inputs: dict[str, pa.Table], out: pa.Table) -> dict[str, pa.Table]:
        """This shard's counted matches per (language, entry)."""
        langs = self.languages_of(inputs["download"][S.UID], inputs["scores"])  # the call's rows, in its order
        return {LANG_COUNTS_DIR: lang_entry_counts(out[S.MATCHED_ENTRY_IDS].combine_chunks(), langs,
                                                   out[S.COUNTED].combine_chunks())}  # fmt: skip


def lang_entry_counts(matched: pa.ListArray, langs: pa.Array, rows: pa.Array) -> pa.Table:
    """Samples per (language, entry) among ``rows`` of a shard's ``matched`` lists."""
    matched, langs = matched.filter(rows), langs.filter(rows)
    encoded = langs.dictionary_encode()
    parents = pc.list_parent_indices(matched).to_numpy()
    flat = matched.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    pairs, n = np.unique(encoded.indices.to_numpy(zero_copy_only=False)[parents].astype(np.int64) << 32 | flat,
                         return_counts=True)  # fmt: skip
    names = encoded.dictionary.take(pa.array(pairs >> 32)) if len(pairs) else pa.array([], pa.string())
    return pa.table({"lang": names.cast(pa.string()), "entry_id": pa.array(pairs & 0xFFFFFFFF, pa.int32()),
                     "n": pa.array(n, pa.int64())}, schema=S.LANG_ENTRY_N_SCHEMA)  # fmt: skip


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


@functools.lru_cache(maxsize=2)
def _load_lang_p(path: str, digest: str) -> tuple[np.ndarray, np.ndarray]:
    """The (language, entry) draw keys of every matched entry, sorted, and their probabilities."""
    from pipeline.metaclip.worldwide import draw_keys

    table = pq.read_table(path, columns=["lang", "entry_id", "p"])
    keys, ps = [], []
    for part in table.group_by("lang").aggregate([("entry_id", "list"), ("p", "list")]).to_pylist():
        keys.append(draw_keys(part["lang"], np.asarray(part["entry_id_list"], np.int64)))
        ps.append(np.asarray(part["p_list"], np.float64))
    keys_all = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    ps_all = np.concatenate(ps) if ps else np.zeros(0)
    order = np.argsort(keys_all)
    return keys_all[order], ps_all[order]


class WorldBalance(Balance):
    """``tables/metaclip`` of MetaCLIP 2's worldwide balancing: each sample's matched entries take
    their language's probability ``min(1, t_lang / count)`` (``aggregates/metaclip_lang_entries``),
    a sample is kept when one is drawn, and the draws are keyed by (seed, uid, language, entry)."""

    def __init__(self, pool_root: str, cfg: MetaclipConfig, t: float, counts_digest: str, match: WorldMatch):
        super().__init__(pool_root, cfg, t, counts_digest)
        self.reads = (*self.reads, match.reads[-1])
        self.match = match
        self.entries_path = str(Pool(pool_root).aggregates_dir / LANG_ENTRIES_FILE)

    def setup(self) -> None:
        _load_lang_p(self.entries_path, self.counts_digest)

    def __call__(self, inputs: dict[str, pa.Table]) -> pa.Table:
        from pipeline.metaclip.balancing import pair_draws, pair_probabilities
        from pipeline.metaclip.worldwide import lang_key

        match = inputs[MATCH_STAGE]
        langs = self.match.languages_of(match[S.UID], inputs["scores"])
        matched = match[S.MATCHED_ENTRY_IDS].combine_chunks()
        encoded = langs.dictionary_encode()
        row_key = np.array([lang_key(v) for v in encoded.dictionary.to_pylist()], np.uint64)
        parents = pc.list_parent_indices(matched).to_numpy()
        flat = matched.flatten().to_numpy(zero_copy_only=False).astype(np.uint64)
        keys = row_key[encoded.indices.to_numpy(zero_copy_only=False)][parents] | flat
        known, p = _load_lang_p(self.entries_path, self.counts_digest)
        at = np.searchsorted(known, keys)
        found = at < len(known)
        found[found] = known[at[found]] == keys[found]
        pair_p = np.ones(len(keys))  # an entry no counted sample matched: count 0, p 1
        pair_p[found] = p[at[found]]
        keep = pair_draws(match[S.UID], parents, keys, pair_p, self.seed) & match[S.COUNTED].to_numpy(
            zero_copy_only=False)  # fmt: skip
        return pa.table({S.UID: match[S.UID], S.METACLIP_P: pair_probabilities(parents, pair_p, len(matched)),
                         S.METACLIP_KEEP: keep})  # fmt: skip

    def side(self, inputs: dict[str, pa.Table], out: pa.Table) -> dict[str, pa.Table]:
        """The shard's kept samples per (language, entry), and counted, matched and kept samples per language."""
        match = inputs[MATCH_STAGE]
        langs = self.match.languages_of(match[S.UID], inputs["scores"])
        matched, keep = match[S.MATCHED_ENTRY_IDS].combine_chunks(), out[S.METACLIP_KEEP].combine_chunks()
        counted = match[S.COUNTED].combine_chunks()
        has = pc.greater(pc.list_value_length(matched), 0)
        per = pa.table({"lang": langs, "counted": pc.cast(counted, pa.int64()),
                        "matched": pc.cast(pc.and_(counted, has), pa.int64()), "kept": pc.cast(keep, pa.int64())})
        per = per.group_by("lang").aggregate([("counted", "sum"), ("matched", "sum"), ("kept", "sum")])
        per = pa.table({"lang": per["lang"], "counted": per["counted_sum"], "matched": per["matched_sum"],
                        "kept": per["kept_sum"]}, schema=S.LANG_SAMPLES_SCHEMA)  # fmt: skip
        return {LANG_KEPT_DIR: lang_entry_counts(matched, langs, keep), LANG_SAMPLES_DIR: per}


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
    if cfg.worldwide:
        from pipeline.metaclip.worldwide import load_lang_entries, metadata_files

        for path in metadata_files(cfg.metadata_dir, cfg.metadata).values():
            load_lang_entries(path)
    recorded = {"metadata_sha256": file_digest(cfg.metadata), **dataclasses.asdict(cfg)}
    pool.check_stage_config(MATCH_STAGE, recorded, match_hash(cfg))
    return runner.plan(pool, match_step(cfg, _bound(pool, cfg)), shards)


def match_step(cfg: MetaclipConfig, where: Where | None) -> Match:
    """MetaCLIP 1's matching step, or MetaCLIP 2's worldwide one."""
    return WorldMatch(cfg, where) if cfg.worldwide else Match(cfg, where)


def match_shards(pool: Pool, cfg: MetaclipConfig, engine: Any, shards: list[int], progress: bool = True) -> None:
    """Match ``shards`` with ``engine`` (one Prefect task per batch calls this). Worldwide, the
    captions' languages come first: the filters' scores step runs on those of ``shards`` it has not
    scored (the same step and table as the filters stage's)."""
    if cfg.worldwide and shards:
        from pipeline.filters.stage import pending_scores, score_shards

        due = set(shards)
        score_shards(pool, engine, [s for s in pending_scores(pool, listed=not cfg.only_downloaded) if s in due],
                     progress=progress)  # fmt: skip
    runner.run_step(pool, engine, match_step(cfg, _bound(pool, cfg)), shards, progress=progress)


def _bound(pool: Pool, cfg: MetaclipConfig) -> Where | None:
    """``metaclip.where`` bound against the pool's columns (refused, naming the key, before any task)."""
    return None if cfg.where is None else bind(pool, cfg.where, "metaclip.where", skip=(MATCH_STAGE, STAGE))


def run_metaclip(pool: Pool, cfg: MetaclipConfig, engine: Any, progress: bool = True) -> dict[str, Any]:
    """Match what is left, count, and balance the whole pool; resumes finished shards.

    Returns:
        The summary also written to ``aggregates/metaclip.json`` (t, pool size, kept samples, ...).
    """
    match_shards(pool, cfg, engine, pending_matches(pool, cfg), progress)
    if cfg.worldwide:
        return run_worldwide(pool, cfg, engine, progress)
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


def run_worldwide(pool: Pool, cfg: MetaclipConfig, engine: Any, progress: bool = True) -> dict[str, Any]:
    """MetaCLIP 2's balancing over the matched pool (``global_count``, then ``curate``): counts per
    (language, entry) summed by the engine, t_en as configured, p = t_to_p(English counts, t_en),
    t_lang = p_to_t(the language's counts, p), then every shard balanced; the per-language table is
    written to ``aggregates/metaclip_languages.parquet`` and the summary's ``worldwide`` key."""
    from pipeline.metaclip import worldwide as W

    shards = pool.require_complete(MATCH_STAGE)
    files = W.metadata_files(cfg.metadata_dir, cfg.metadata)
    counts, names = _lang_counts(pool, engine, shards, files)
    markers = pool.completed(MATCH_STAGE)
    pool_size = sum(m["counts"]["counted"] for m in markers.values())
    reachable = sum(m["counts"]["counted_matched"] for m in markers.values())
    if W.ENGLISH not in counts or not counts[W.ENGLISH].sum():
        raise UserError(f"{pool.root}: worldwide balancing needs English matches: t_en sets the tail share p "
                        "that every other language keeps, and no counted English caption matched an English entry")
    t_en = resolve_t(pool, cfg, engine, counts[W.ENGLISH], pool_size, reachable, "")
    p = W.t_to_p(counts[W.ENGLISH], t_en)
    ts = {lang: (t_en if lang == W.ENGLISH else W.p_to_t(c, p)) for lang, c in counts.items()}
    table = _lang_entries(counts, names, ts)
    blob = hashlib.sha256()
    for lang in sorted(counts):
        blob.update(f"{lang}|{ts[lang]!r}|".encode() + counts[lang].tobytes())
    entries_path = pool.aggregates_dir / LANG_ENTRIES_FILE
    write_parquet_atomic(entries_path, table)

    step = WorldBalance(str(pool.root), cfg, t_en, blob.hexdigest()[:16], WorldMatch(cfg, _bound(pool, cfg)))
    runner.run_step(pool, engine, step, runner.plan(pool, step, shards), progress=progress)

    kept_n, per_lang = _lang_kept(pool, engine, shards)
    table = table.set_column(5, "kept", pa.array([kept_n.get((lang, e), 0) for lang, e in zip(
        table["lang"].to_pylist(), table["entry_id"].to_pylist(), strict=True)], pa.int64()))  # fmt: skip
    write_parquet_atomic(entries_path, table)
    langs = sorted(set(counts) | set(per_lang), key=lambda x: (x == W.OTHER, x))
    languages = W.lang_table(langs, [len(counts.get(lang, ())) for lang in langs], counts, ts,
                             kept={k: int(v["kept"]) for k, v in per_lang.items()},
                             samples={k: int(v["counted"]) for k, v in per_lang.items()})  # fmt: skip
    write_parquet_atomic(pool.aggregates_dir / LANGUAGES_FILE, languages)
    summary = {
        "t": t_en, "seed": cfg.seed, "metadata": cfg.metadata, "metadata_sha256": file_digest(cfg.metadata),
        "entries": len(counts[W.ENGLISH]), "pool_size": pool_size, "samples_matched": reachable,
        "samples_kept": sum(m["counts"]["kept"] for m in pool.completed(STAGE).values()),
        "entries_matched": int(sum((c > 0).sum() for c in counts.values())),
        "entries_over_t": int(sum((c > ts[lang]).sum() for lang, c in counts.items())),
        "worldwide": {"metadata_dir": cfg.metadata_dir, "unlisted_languages": cfg.unlisted_languages,
                      "t_en": t_en, "tail_share_p": p, "languages": languages.to_pylist()},
    }  # fmt: skip
    if p == 0:  # MetaCLIP 2's rule then keeps no sample of any other language: say so
        summary["worldwide"]["note"] = (
            f"p = 0: no English entry has fewer than t_en = {t_en:g} matches, so every other language's t is 0 "
            "and none of its samples is kept; raise metaclip.t")  # fmt: skip
    write_json_atomic(pool.aggregates_dir / "metaclip.json", summary)
    from pipeline.metaclip.report import write_languages_report, write_report

    english = _dense_kept(kept_n, W.ENGLISH, len(counts[W.ENGLISH]))
    write_report(pool.report_dir(STAGE), W.load_lang_entries(files[W.ENGLISH]), counts[W.ENGLISH], english,
                 t_en)  # English's distribution, as MetaCLIP 1's  # fmt: skip
    write_languages_report(pool.report_dir(STAGE), summary["worldwide"])
    pool.update_manifest()
    return summary


def _lang_counts(pool: Pool, engine: Any, shards: list[int], files: dict[str, Any]
                 ) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:  # fmt: skip
    """Each language's counted samples per entry (dense over its list: MetaCLIP 2's ``p_to_t``
    sorts every entry's count, zeros included), summed by the engine from the shards' files, and
    the names of the entries that matched. One language's list is in memory at a time."""
    from pipeline.engines.base import Table
    from pipeline.metaclip.worldwide import load_lang_entries

    sql = "select lang, entry_id, sum(n) as n from counts group by lang, entry_id order by lang, entry_id"
    summed = engine.query(sql, {"counts": Table.of([pool.aggregates_dir / LANG_COUNTS_DIR / f"{s:05d}.parquet"
                                                    for s in shards], S.LANG_ENTRY_N_SCHEMA)})  # fmt: skip
    found = {row["lang"]: row for row in
             summed.group_by("lang").aggregate([("entry_id", "list"), ("n", "list")]).to_pylist()}  # fmt: skip
    counts, names = {}, {}
    for lang in sorted(files):
        entries = load_lang_entries(files[lang])
        dense = np.zeros(len(entries), np.int64)
        if lang in found:
            dense[np.asarray(found[lang]["entry_id_list"], np.int64)] = found[lang]["n_list"]
        counts[lang], names[lang] = dense, [entries[i] for i in np.flatnonzero(dense)]
    return counts, names


def _lang_entries(counts: dict[str, np.ndarray], names: dict[str, list[str]], ts: dict[str, float]) -> pa.Table:
    """``metaclip_lang_entries``: count and ``min(1, t_lang / count)`` of every matched entry."""
    from pipeline.metaclip.worldwide import lang_probabilities

    parts = []
    for lang in sorted(counts):
        ids = np.flatnonzero(counts[lang])
        parts.append(pa.table({"lang": pa.array([lang] * len(ids), pa.string()), "entry_id": pa.array(ids, pa.int32()),
                               "entry": pa.array(names[lang], pa.string()), "count": counts[lang][ids],
                               "p": lang_probabilities(counts[lang][ids], ts[lang]),
                               "kept": np.zeros(len(ids), np.int64)}, schema=S.LANG_ENTRY_COUNTS_SCHEMA))  # fmt: skip
    return pa.concat_tables(parts) if parts else S.LANG_ENTRY_COUNTS_SCHEMA.empty_table()


def _lang_kept(pool: Pool, engine: Any, shards: list[int]) -> tuple[dict[tuple[str, int], int], dict[str, Any]]:
    """Kept samples per (language, entry), and counted, matched and kept samples per language,
    summed by the engine from the balancing's per-shard files."""
    from pipeline.engines.base import Table

    kept_files = [pool.aggregates_dir / LANG_KEPT_DIR / f"{s:05d}.parquet" for s in shards]
    kept = engine.query("select lang, entry_id, sum(n) as n from kept group by lang, entry_id",
                        {"kept": Table.of(kept_files, S.LANG_ENTRY_N_SCHEMA)})  # fmt: skip
    sample_files = [pool.aggregates_dir / LANG_SAMPLES_DIR / f"{s:05d}.parquet" for s in shards]
    per = engine.query("select lang, sum(counted) as counted, sum(matched) as matched, sum(kept) as kept "
                       "from per group by lang", {"per": Table.of(sample_files, S.LANG_SAMPLES_SCHEMA)})  # fmt: skip
    return {(r["lang"], r["entry_id"]): r["n"] for r in kept.to_pylist()}, {r["lang"]: r for r in per.to_pylist()}


def _dense_kept(kept: dict[tuple[str, int], int], lang: str, size: int) -> np.ndarray:
    out = np.zeros(size, np.int64)
    for (code, entry), n in kept.items():
        if code == lang:
            out[entry] = n
    return out
