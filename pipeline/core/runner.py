"""The one caller of steps: plan once, hand the due shards to the engine, and per shard read, call,
conform, write, count flips and mark.

Per shard (in whichever worker the engine runs it):

1. read each declared input's columns (:func:`read_inputs`): a stage's table, the listed rows, and
   the uids a ``where`` selects;
2. call the step (a pure function of those tables) and conform its result to the step's schema,
   the ``shard`` column set to the shard's id;
3. count the decisions that flipped against the table being replaced (:class:`~pipeline.core.step.Flips`);
4. write the table and the step's per-shard aggregates atomically, then the completion marker,
   last: a killed shard has no marker and is redone whole.

Planning (:func:`plan`) reads each candidate shard's marker once, on the driver; tasks never read
another shard's marker. A failed shard is reported with the others' results kept
(:class:`~pipeline.engines.base.ShardFailures`), and the manifest is rebuilt from the markers.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.step import BY_SHARD, IMAGES, LISTED, SELECTED, SHARD_FILE, Read, Step
from pipeline.store import schema as S
from pipeline.store.parquet import Pool, shard_name, write_parquet_atomic

if TYPE_CHECKING:
    from pipeline.engines.base import Engine, ShardResults

_READY: dict[str, Step] = {}  # set-up steps of this worker process, by Step.key()


def shard_digest(pool: Pool, step: Step, shard: int, fetched: bool | None = None) -> str:
    """The digest a shard's marker must carry: a step whose output changes once the shard's images
    are fetched says which it saw (``fetched``: :func:`fetched_images`, if already known). A download that
    fetched nothing (a pool curated from its metadata alone; every row failed) leaves such a step's
    output as it was on the listed rows, so it is not redone for it."""
    if not step.redo_once_downloaded:
        return step.digest
    if fetched is None:
        fetched = fetched_images(pool.done_marker("download", shard))
    return step.digest if fetched else f"{step.digest}-listed"


def fetched_images(download_marker: dict[str, Any] | None) -> bool:
    """Whether a shard's download (its marker, None if not done) fetched at least one image."""
    return download_marker is not None and download_marker["counts"].get(S.STATUS_SUCCESS, 0) > 0


def plan(pool: Pool, step: Step, candidates: Sequence[int]) -> list[int]:
    """The shards of ``candidates`` not finished with the step's digest (or whose files are damaged):
    one marker read per shard, on the driver."""
    return [s for s in candidates if not pool.is_done(step.name, s, shard_digest(pool, step, s))]


def _read(pool: Pool, read: Read, shard: int, downloaded: bool) -> pa.Table:
    columns = list(read.columns)
    if read.kind == SHARD_FILE:
        return pq.read_table(pool.aggregates_dir / read.table / f"{shard_name(shard)}.parquet", columns=columns)
    if read.kind == BY_SHARD:
        from pipeline.engines.base import read_where

        part = read_where(pool.aggregates_dir / read.table, S.SHARD, shard, columns)
        return part if part is not None else pa.table({})  # the step has not run: no rows
    if read.table == LISTED or (read.listed_until_downloaded and not downloaded):
        listed = pool.read_listed(shard)
        declared = pool.declared_schema("download")
        return pa.table({c: listed[c] if c in listed.column_names else pa.nulls(listed.num_rows, declared.field(c).type)
                         for c in columns})  # fmt: skip
    return pool.read_shard(read.table, shard, columns=columns)


def read_inputs(pool: Pool, step: Step, shard: int, downloaded: bool | None = None) -> dict[str, pa.Table]:
    """Every declared input of ``step`` for ``shard``, by table name (:data:`SELECTED`: the uids its
    ``where`` selects); ``downloaded``: whether the shard is downloaded, if already known."""
    if downloaded is None:
        downloaded = any(r.listed_until_downloaded for r in step.reads) and pool.is_done("download", shard)
    inputs = {r.key: _read(pool, r, shard, downloaded) for r in step.reads}
    if step.where is not None:
        from pipeline.core.where import select

        inputs[SELECTED] = pa.table({S.UID: select(pool, step.where, shard)})
    return inputs


def ready(step: Step) -> Step:
    """This process's set-up instance of ``step`` (``setup()`` runs once per worker)."""
    key = step.key()
    if key not in _READY:
        step.setup()
        _READY[key] = step
    return _READY[key]


def conform(step: Step, shard: int, table: pa.Table) -> pa.Table:
    """``table`` with the step's declared columns and types, ``shard`` set to the shard's id."""
    schema = step.schema_of(table)
    if S.SHARD in schema.names:
        column = pa.array([shard] * table.num_rows, pa.int32())
        table = table.set_column(table.column_names.index(S.SHARD), S.SHARD, column) if (
            S.SHARD in table.column_names) else table.append_column(S.SHARD, column)  # fmt: skip
    return S.conform(table, schema)


def flip_counts(pool: Pool, step: Step, shard: int, out: pa.Table) -> dict[str, int]:
    """Decisions of ``out`` that differ from the table it replaces (nothing for a first write)."""
    if step.flips is None:
        return {}
    from pipeline.flips import decision_flips

    f = step.flips

    def values(c: str | None) -> Any:
        return None if c is None else out[c].to_numpy(zero_copy_only=False)

    return decision_flips(pool.table_path(step.name, shard), out[S.UID], values(f.keep), f.keep, values(f.p), f.p,
                          values(f.reason), f.reason)  # fmt: skip


def run_shard(pool_root: str, step: Step, shard: int) -> dict[str, int]:
    """Read, call, conform, write, count flips and mark one shard (the engine's per-shard task)."""
    if step.streams:  # one task per shard (a cluster): the shard's images decoded inline
        return run_stream(pool_root, step, [shard], workers=0, progress=False)[shard]
    pool = Pool(pool_root)
    step = ready(step)
    needs = step.redo_once_downloaded or any(r.listed_until_downloaded for r in step.reads)
    download = pool.done_marker("download", shard) if needs else None  # one marker read, its own
    downloaded = download is not None
    digest = shard_digest(pool, step, shard, fetched_images(download))
    if step.forgets_downstream and (pool.marker_path(step.name, shard).exists()
                                    or pool.table_path(step.name, shard).exists()):  # fmt: skip
        pool.forget_shard(shard, keep=(step.name,))
    inputs = read_inputs(pool, step, shard, downloaded)
    scratch = _scratch(pool, step.name, shard) if step.files else None
    out = step(inputs) if scratch is None else step.produce(inputs, shard, scratch)
    files = [] if scratch is None else _place(pool, scratch, shard, step.files)
    return finish_shard(pool, step, shard, inputs, out, digest, files)


def finish_shard(pool: Pool, step: Step, shard: int, inputs: dict[str, pa.Table], out: pa.Table, digest: str,
                 files: Sequence[Path] = ()) -> dict[str, int]:  # fmt: skip
    """Conform the step's table, count its flips, write its aggregates and commit it."""
    out = conform(step, shard, out)
    flips = flip_counts(pool, step, shard, out)
    for folder, table in step.side(inputs, out).items():
        write_parquet_atomic(pool.aggregates_dir / folder / f"{shard_name(shard)}.parquet", table)
    counts = {**step.counts(out), **flips}
    commit(pool, step.name, shard, out, digest, counts, files=files)
    return counts


def run_stream(pool_root: str, step: Step, shards: Sequence[int], *, workers: int, progress: bool = True,
               done: dict[int, dict[str, int]] | None = None) -> dict[int, dict[str, int]]:  # fmt: skip
    """A streaming step over ``shards`` in this process: a data loader decodes their tars in
    ``workers`` spawned processes (0: inline) while the step encodes each batch; a shard is
    finished as soon as every loader worker sent its last batch of it. Each worker takes every
    ``workers``-th sample of a shard and never mixes shards in a batch. Each finished shard's counts
    go into ``done`` (returned), which keeps them when a later shard fails.

    A finished shard is written here, between batches: a writer thread beside the model was tried
    and gave nothing measurable on a CPU (docs/benchmarks.md, issue 26), so it is not used."""
    import torch

    from pipeline.errors import DamagedError
    from pipeline.progress import Progress
    from pipeline.store.images import ShardImages  # imports torch: only when a streaming step runs

    pool, step = Pool(pool_root), ready(step)
    read = next(r for r in step.reads if r.kind == IMAGES)
    dataset = ShardImages(pool_root, list(shards), step.transform(), step.batch_size, step.max_pixels)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers,
        multiprocessing_context="spawn" if workers else None, prefetch_factor=4 if workers else None,
        pin_memory=step.pin_memory,
    )  # fmt: skip
    sizes = pool.shard_sizes(list(shards))
    parts: dict[int, list[pa.Table]] = {}
    lasts: dict[int, int] = {}
    done = {} if done is None else done
    with Progress(total=sum(sizes.values()), desc=step.name, enabled=progress) as bar:
        for batch in loader:
            if "fatal" in batch:  # from a loader worker: re-raised here, as its message alone
                raise DamagedError(batch["fatal"])
            shard = batch["shard"]
            parts.setdefault(shard, []).append(step.encode(batch))
            lasts[shard] = lasts.get(shard, 0) + batch["last"]
            if lasts[shard] == max(1, workers):
                inputs = {read.key: pa.concat_tables(parts.pop(shard))}
                done[shard] = finish_shard(pool, step, shard, inputs, step(inputs), shard_digest(pool, step, shard))
                bar.update(sizes[shard])
    return done


def _scratch(pool: Pool, name: str, shard: int) -> Path:
    """``_staging/<step>/``, with nothing of this shard's left in it from a killed attempt."""
    scratch = pool.staging_dir / name
    scratch.mkdir(parents=True, exist_ok=True)
    for stale in scratch.glob(f"{shard_name(shard)}*"):
        stale.unlink()
    return scratch


def _place(pool: Pool, scratch: Path, shard: int, suffixes: Sequence[str]) -> list[Path]:
    """Move the files a step made into ``shards/`` (each rename atomic; the marker comes after)."""
    import os

    (pool.root / "shards").mkdir(parents=True, exist_ok=True)
    placed = [pool.root / "shards" / f"{shard_name(shard)}{suffix}" for suffix in suffixes]
    for path in placed:
        os.replace(scratch / path.name, path)
    return placed


def commit(pool: Pool, name: str, shard: int, table: pa.Table, digest: str, counts: dict[str, Any],
           files: Sequence[Path] = ()) -> None:  # fmt: skip
    """Write ``table`` as the shard's table of stage ``name`` (atomically, checked against its
    schema), then the completion marker, last, recording the table and ``files`` (already in place:
    the download's tar, sidecar and stats). The one place a table or a marker is written."""
    path = pool.write_table(name, shard, table)
    pool.mark_done(name, shard, digest, counts, files=[path, *files])


def run_step(pool: Pool, engine: Engine, step: Step, shards: Sequence[int], *, progress: bool = True,
             desc: str | None = None, on_result: Any = None) -> dict[int, dict[str, int]]:  # fmt: skip
    """Run ``step`` over ``shards`` (already planned: :func:`plan`) with ``engine``. A ``one_model``
    step on a one-machine engine runs here, every shard through one set-up instance (a streaming
    step's loader decoding in its ``workers`` processes); elsewhere one engine task per shard.

    ``on_result(shard, counts)``: called in the driver as each shard finishes (not for a
    ``one_model`` step run here).

    Returns:
        The markers' counts by shard.

    Raises:
        ShardFailures: some shards failed; the others are finished and kept, the manifest rebuilt.
    """
    shards = list(shards)
    if step.one_model and engine.one_machine and len(step.devices) > 1 and len(shards) > 1:
        return _on_devices(pool, step, shards)
    if step.one_model and engine.one_machine and shards:
        return _in_process(pool, step, shards, progress)
    fn = functools.partial(run_shard, str(pool.root), step)
    return map_shards(pool, engine, fn, shards, desc=desc or step.name, weights=pool.shard_sizes(shards),
                      progress=progress, on_result=on_result)  # fmt: skip


def _in_process(pool: Pool, step: Step, shards: list[int], progress: bool) -> dict[int, dict[str, int]]:
    """``step`` over ``shards`` in this process. A failure stops it, as one process's error does:
    the shards finished before it are kept (the manifest rebuilt, if there are any), and the error
    is raised as it is."""
    done: dict[int, dict[str, int]] = {}
    try:
        if step.streams:
            return run_stream(str(pool.root), step, shards, workers=step.workers, progress=progress, done=done)
        for shard in shards:
            done[shard] = run_shard(str(pool.root), step, shard)
        return done
    except BaseException:
        if done:
            pool.update_manifest()
        raise


def share_out(sizes: dict[int, int], parts: int) -> list[list[int]]:
    """``sizes``' shards in ``parts`` groups of about equal samples: largest first, each to the
    lightest group so far (each group in shard order)."""
    groups: list[list[int]] = [[] for _ in range(parts)]
    load = [0] * parts
    for shard in sorted(sizes, key=lambda s: (-sizes[s], s)):
        lightest = load.index(min(load))
        groups[lightest].append(shard)
        load[lightest] += sizes[shard]
    return [sorted(g) for g in groups]


def _on_devices(pool: Pool, step: Step, shards: list[int]) -> dict[int, dict[str, int]]:
    """A one-model step on several devices of this machine: one spawned process per device, each
    with its own set-up model (:meth:`Step.on_device`) streaming its share of the shards. Every
    process runs to its end; the shards they finished are kept, and the first error is raised."""
    import concurrent.futures
    import multiprocessing

    groups = share_out(pool.shard_sizes(shards), len(step.devices))
    done: dict[int, dict[str, int]] = {}
    errors: list[BaseException] = []
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with concurrent.futures.ProcessPoolExecutor(len(step.devices), mp_context=context) as pool_of_devices:
        futures = [pool_of_devices.submit(_device_part, str(pool.root), step.on_device(device), group)
                   for device, group in zip(step.devices, groups, strict=True) if group]  # fmt: skip
        for future in concurrent.futures.as_completed(futures):
            try:
                done.update(future.result())
            except BaseException as exc:  # the other devices finish first; raised below
                errors.append(exc)
    if errors:
        pool.update_manifest()
        raise errors[0]
    return done


def _device_part(pool_root: str, step: Step, shards: list[int]) -> dict[int, dict[str, int]]:
    return _in_process(Pool(pool_root), step, shards, False)


def collect(engine: Engine, fn: Any, shards: list[int], *, desc: str, weights: dict[int, int] | None = None,
            progress: bool = True, on_result: Any = None) -> dict[int, Any]:  # fmt: skip
    """``engine.map_shards``: the results by shard, or :class:`~pipeline.engines.base.ShardFailures`
    naming every failed shard (the others finished). Writes nothing: readers (export) use it too."""
    from pipeline.engines.base import ShardFailures

    if not shards:
        return {}
    result = engine.map_shards(fn, shards, desc=desc, weights=weights, progress=progress, on_result=on_result)
    if result.failures:
        raise ShardFailures(desc, result.failures)
    return result.results


def finished(pool: Pool, desc: str, result: ShardResults) -> dict[int, Any]:
    """The results of a map over shards that wrote into ``pool``; when some shards failed, the
    manifest is rebuilt from the finished ones' markers and the failures are raised."""
    from pipeline.engines.base import ShardFailures

    if result.failures:
        pool.update_manifest()
        raise ShardFailures(desc, result.failures)
    return result.results


def map_shards(pool: Pool, engine: Engine, fn: Any, shards: list[int], *, desc: str,
               weights: dict[int, int] | None = None, progress: bool = True,
               on_result: Any = None) -> dict[int, Any]:  # fmt: skip
    """:func:`collect` for a step that writes into ``pool``: when some shards failed, the manifest is
    rebuilt from the finished ones' markers before the failures are raised."""
    from pipeline.engines.base import ShardFailures

    try:
        return collect(engine, fn, shards, desc=desc, weights=weights, progress=progress, on_result=on_result)
    except ShardFailures:
        pool.update_manifest()
        raise


def matching_rows(table: pa.Table, uids: pa.Array | pa.ChunkedArray) -> pa.Table:
    """The rows of ``table`` in the order of ``uids``, null rows where a uid is absent (a step aligns
    one input's rows to another's)."""
    if isinstance(uids, pa.ChunkedArray):
        uids = uids.combine_chunks()
    return table.take(pc.index_in(uids, value_set=table[S.UID].combine_chunks()))
