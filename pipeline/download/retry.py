"""A retry pass: fetch again only the rows of finished shards that failed with given error classes.

img2dataset can only redownload whole shards (img2dataset#333, #452; DataComp#84), though the
failures worth retrying (timeouts, HTTP 429/5xx, DNS errors under load) are a few percent of a
run. Here a shard with such rows is redone as one step of the runner, like any download:

1. its rows of the classes asked for (``download.retry``, ``curate download --retry``) whose
   ``attempts`` are below ``download.max_attempts`` go to img2dataset's own per-shard downloader,
   exactly as a first download sends them;
2. the shard's tar is rewritten: every member of the old tar first, copied header and bytes as they
   were, then the newly fetched samples under the keys their rows had (a failed row keeps its key),
   so a sample that had succeeded keeps its bytes exactly; the sidecar's rows keep their order, the
   retried ones replaced in place; img2dataset's stats are updated and record the pass;
3. the ``download`` table gets the retried rows' new outcome with ``attempts`` one higher.

The runner then writes the table and the marker and forgets the shard's later stages (a download
step forgets downstream), so the next run of the flow redoes that shard's later stages and no other
shard's. The marker's counts say how many rows of each class were retried and recovered
(``retried:<class>``, ``recovered:<class>``).
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import DownloadConfig
from pipeline.core import runner
from pipeline.core.step import LISTED, Read
from pipeline.download.errors import check_retry_classes, error_classes
from pipeline.download.stage import STAGE, Download, InputError, check_config, download_table, downloader, write_feather
from pipeline.store import schema as S
from pipeline.store.parquet import Pool, shard_name

RETRIED, RECOVERED = "retried:", "recovered:"  # a retried shard's marker counts, by class


def retry_rows(table: pa.Table, classes: list[str], max_attempts: int) -> pa.Array:
    """The mask of ``table``'s rows (a download table) a retry of ``classes`` fetches again: failed
    with one of those classes, fetched fewer than ``max_attempts`` times."""
    kinds = error_classes(table)
    attempts = pc.fill_null(table[S.ATTEMPTS], 1)
    wanted = pc.fill_null(pc.is_in(kinds, value_set=pa.array(classes, pa.string())), False)
    return pc.and_(wanted, pc.less(attempts, max_attempts)).combine_chunks()


class Retry(Download):
    """``tables/download`` and ``shards/{shard}.{tar,parquet,_stats.json}`` of a finished shard,
    with its rows of ``classes`` fetched again (module docstring). Reads the shard's download table
    and listed rows, and the files it replaces (``shards/``)."""

    def __init__(self, pool: Pool, cfg: DownloadConfig, classes: list[str]):
        super().__init__(pool, cfg, where=None)
        self.reads = (*self.reads, Read(STAGE, tuple(self.schema.names)))
        self.classes = ",".join(classes)  # a scalar: part of the set-up key
        self.max_attempts = cfg.max_attempts

    def produce(self, inputs: dict[str, pa.Table], shard: int, scratch: Path) -> pa.Table:
        name = shard_name(shard)
        old = inputs[STAGE]
        redo = retry_rows(old, self.classes.split(","), self.max_attempts)
        retried = old.filter(redo)
        work = scratch / f"retry-{name}"  # not matched by the runner's clean-up of scratch/{name}*
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            listed = inputs[LISTED]
            extras = [c for c in listed.column_names if c not in S.INPUT_SCHEMA.names]
            to_fetch = runner.matching_rows(listed, retried[S.UID]).select([S.URL, S.CAPTION, S.UID, S.ROW, *extras])
            write_feather(work / f"{name}.feather", to_fetch)
            downloader(self.cfg, work, to_fetch.column_names).download_shard((shard, str(work / f"{name}.feather")))
            fresh = _rekey(pq.read_table(work / f"{name}.parquet"), retried)
            shards = Path(self.root) / "shards"
            _merge_tar(shards / f"{name}.tar", work / f"{name}.tar", fresh, scratch / f"{name}.tar")
            sidecar = _merge_sidecar(pq.read_table(shards / f"{name}.parquet"), fresh)
            pq.write_table(sidecar, scratch / f"{name}.parquet")
            _merge_stats(shards / f"{name}_stats.json", sidecar, retried, self.classes, scratch / f"{name}_stats.json")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        empty = listed.slice(0, 0)
        new = download_table(self.schema, self.cfg, fresh, empty, empty, shard)
        new = runner.matching_rows(new, retried[S.UID])
        attempts = pc.add(pc.fill_null(retried[S.ATTEMPTS], 1), 1).cast(pa.int32())
        new = new.set_column(new.schema.get_field_index(S.ATTEMPTS), S.ATTEMPTS, attempts)
        table = pa.concat_tables([old.filter(pc.invert(redo)), new.select(old.column_names).cast(old.schema)])
        table = table.sort_by(S.ROW)
        self._tally = _tally(retried, new)
        return table

    def counts(self, out: pa.Table) -> dict[str, int]:
        return {**super().counts(out), **getattr(self, "_tally", {})}


def _tally(retried: pa.Table, new: pa.Table) -> dict[str, int]:
    """``retried:<class>`` and ``recovered:<class>`` of the shard's retried rows (by their class before)."""
    before = error_classes(retried).to_pylist()
    ok = pc.equal(new[S.STATUS], S.STATUS_SUCCESS).to_pylist()
    counts: dict[str, int] = {}
    for cls, success in zip(before, ok, strict=True):
        counts[RETRIED + cls] = counts.get(RETRIED + cls, 0) + 1
        counts[RECOVERED + cls] = counts.get(RECOVERED + cls, 0) + int(bool(success))
    return counts


def _rekey(fresh: pa.Table, retried: pa.Table) -> pa.Table:
    """img2dataset's sidecar of the retried rows with each row's key set to the key it had in the
    shard (img2dataset numbers a shard's rows by their place in its input; a failed row has a key
    too), the retry's own key kept in ``_retry_key`` (its tar's member names)."""
    keys = runner.matching_rows(retried.select([S.UID, S.KEY]), fresh[S.UID])[S.KEY]
    if keys.null_count:
        raise RuntimeError("a retried row has no key in the shard's download table")
    at = fresh.schema.get_field_index(S.KEY)
    return fresh.set_column(at, S.KEY, keys.cast(fresh.schema.field(S.KEY).type)).append_column(
        _RETRY_KEY, fresh[S.KEY])  # fmt: skip


_RETRY_KEY = "_retry_key"


def _merge_tar(old: Path, fetched: Path, fresh: pa.Table, out: Path) -> None:
    """``out``: every member of ``old`` (header and bytes as they were), then ``fetched``'s members
    renamed to the keys of ``fresh`` (their ``.json`` says the new key), in key order."""
    local = dict(zip(fresh[_RETRY_KEY].to_pylist(), fresh[S.KEY].to_pylist(), strict=True))
    with tarfile.open(out, "w") as dst:
        with tarfile.open(old) as src:
            for member in src:
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
        with tarfile.open(fetched) as src:
            members = sorted(src.getmembers(), key=lambda m: (local[m.name.split(".", 1)[0]], m.name))
            for member in members:
                stem, ext = member.name.split(".", 1)
                data = src.extractfile(member).read()  # type: ignore[union-attr]
                if ext == "json":
                    meta = json.loads(data)
                    meta[S.KEY] = local[stem]
                    data = json.dumps(meta, indent=4).encode()  # as img2dataset's writer dumps it
                info = tarfile.TarInfo(f"{local[stem]}.{ext}")
                info.size, info.mtime, info.mode = len(data), member.mtime, member.mode
                info.uname, info.gname, info.uid, info.gid = member.uname, member.gname, member.uid, member.gid
                dst.addfile(info, io.BytesIO(data))


def _merge_sidecar(old: pa.Table, fresh: pa.Table) -> pa.Table:
    """The shard's img2dataset sidecar with the retried rows replaced in place (by uid)."""
    fresh = fresh.drop_columns([_RETRY_KEY]).select(old.column_names).cast(old.schema)
    hit = pc.is_in(old[S.UID], value_set=fresh[S.UID].combine_chunks()).to_numpy(zero_copy_only=False)
    place = runner.matching_rows(pa.table({S.UID: old[S.UID], "i": pa.array(np.arange(old.num_rows))}),
                                 fresh[S.UID])["i"].to_numpy(zero_copy_only=False)  # fmt: skip
    order = np.argsort(np.concatenate([np.flatnonzero(~hit), place]), kind="stable")
    return pa.concat_tables([old.filter(pa.array(~hit)), fresh]).take(pa.array(order))


def _merge_stats(old: Path, sidecar: pa.Table, retried: pa.Table, classes: str, out: Path) -> None:
    """img2dataset's stats of the shard, its totals recounted from the merged sidecar, with the
    pass recorded under ``retries``."""
    import time

    stats = json.loads(old.read_text())
    status = sidecar["status"].to_pylist()
    stats.update(successes=status.count(S.STATUS_SUCCESS), failed_to_download=status.count(S.STATUS_FAILED_DOWNLOAD),
                 failed_to_resize=status.count(S.STATUS_FAILED_RESIZE))  # fmt: skip
    stats.setdefault("retries", []).append({"classes": classes.split(","), "rows": retried.num_rows,
                                            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})  # fmt: skip
    out.write_text(json.dumps(stats, indent=4))


def plan_retry(pool: Pool, cfg: DownloadConfig, classes: list[str]) -> list[int]:
    """The finished shards with rows to retry: those whose marker counts a failure of ``classes``,
    then (reading only their ``status``, ``error_message`` and ``attempts``) with such a row fetched
    fewer than ``download.max_attempts`` times. Memory: one shard's three columns."""
    from pipeline.download.errors import CLASS_PREFIX

    if S.ATTEMPTS not in pool.declared_schema(STAGE).names:
        raise InputError(f"{pool.root}: this pool was prepared before the download table recorded attempts, so a "
                         "retry cannot be bounded: retry by downloading into a new pool")  # fmt: skip
    due = []
    for shard, marker in sorted(pool.completed(STAGE).items()):
        if any(marker["counts"].get(CLASS_PREFIX + c, 0) for c in classes):
            table = pool.read_shard(STAGE, shard, columns=[S.STATUS, S.ERROR, S.ATTEMPTS])
            if pc.any(retry_rows(table, classes, cfg.max_attempts)).as_py():
                due.append(shard)
    return due


def run_retry(pool: Pool, cfg: DownloadConfig, engine: Any, classes: Any = None,
              progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """One retry pass of ``classes`` (default ``download.retry``) over the pool's finished shards.

    Returns:
        ``shards`` (retried), and per class ``retried`` and ``recovered`` rows.

    Raises:
        UserError: an unknown or never-retried class, or a pool without ``attempts``.
        ShardFailures: some shards failed; the others are finished and kept.
    """
    classes = check_retry_classes(cfg.retry if classes is None else classes,
                                  "download.retry" if classes is None else "--retry")  # fmt: skip
    if not classes:
        return {"shards": [], "by_class": {}}
    check_config(pool, cfg)
    due = plan_retry(pool, cfg, classes)
    done = runner.run_step(pool, engine, Retry(pool, cfg, classes), due, progress=progress, desc="retry")
    pool.update_manifest()
    by_class: dict[str, dict[str, int]] = {}
    for counts in done.values():
        for key, n in counts.items():
            for prefix, field in ((RETRIED, "retried"), (RECOVERED, "recovered")):
                if key.startswith(prefix):
                    entry = by_class.setdefault(key.removeprefix(prefix), {"retried": 0, "recovered": 0})
                    entry[field] += n
    return {"shards": due, "by_class": by_class}


def format_retry(result: dict[str, Any]) -> str:
    """One line: the rows retried and recovered by class."""
    if not result["shards"]:
        return "retry: no row to retry (no failure of those classes below download.max_attempts)"
    by = result["by_class"]
    parts = ", ".join(f"{c} {v['recovered']}/{v['retried']}" for c, v in sorted(by.items()))
    total = sum(v["retried"] for v in by.values())
    recovered = sum(v["recovered"] for v in by.values())
    return (
        f"retry: {total} row(s) in {len(result['shards'])} shard(s) fetched again, {recovered} recovered "
        f"(recovered/retried by class: {parts})"
    )
