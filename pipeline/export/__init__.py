"""Export: a training release cut from the pool (planning per source shard, one task per output
shard; :mod:`pipeline.export.release`), optionally as numbered versions (:mod:`pipeline.export.versions`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pipeline.config import ExportConfig
from pipeline.export.release import (
    ExportError,
    build_release,
    check_out,
    dataset_card,
    plan_release,
    plan_source_shard,
    write_release_shard,
)
from pipeline.export.versions import LATEST, VERSION, export_version
from pipeline.store.parquet import Pool


def export(pool: Pool, cfg: ExportConfig, progress: bool = False, *, engine: Any,
           wait: bool = False) -> dict[str, Any]:  # fmt: skip
    """Write the release ``cfg`` describes (:mod:`pipeline.export.release`); returns its manifest.

    Every step is bounded (:func:`plan_release`, then a task per output shard), run by ``engine``
    (the config's: local processes or Spark); the bytes are the same on either. The pool is only
    read (a read-only pool exports); ``out`` is checked first (:func:`check_out`) and held with a
    writer lock (``wait``: wait for another export).

    Raises:
        ExportError: ``out`` may not be written, the selection is invalid, or a stage it reads is
            unfinished (without ``allow_incomplete``); LockedError: another export writes ``out``.
    """
    from pipeline.store.lock import writer_lock

    cfg = dataclasses.replace(cfg, out=str(resolve_out(Path(cfg.out))))
    if cfg.versioned:
        return export_version(pool, cfg, progress, engine, wait)
    out = Path(cfg.out)
    check_out(pool, out, cfg.overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(out.parent, f"curate export {pool.root} --out {out}", wait=wait, name=f".{out.name}.lock"):
        return build_release(pool, cfg, progress, engine)


def resolve_out(out: Path) -> Path:
    """``--out`` with a symbolic link resolved once (its target is checked and written; the link
    itself is never renamed or replaced).

    Raises:
        ExportError: ``out`` is a version of a versioned release, or its ``latest`` link: names it.
    """
    target = out.resolve() if out.is_symlink() else out
    in_versions = (target.parent / LATEST).is_symlink() and VERSION.match(target.name)
    if (out.name == LATEST and out.is_symlink()) or in_versions:
        raise ExportError(f"--out {out}: is a version of the versioned release {target.parent}; export into "
                          f"{target.parent} with --versioned instead (nothing was written)")  # fmt: skip
    return target


__all__ = ["ExportError", "dataset_card", "export", "plan_release", "plan_source_shard", "write_release_shard"]
