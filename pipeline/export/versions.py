"""Versioned releases: each export of a grown or re-curated pool is a new version beside the old.

With ``export.versioned`` the release folder ``out`` holds::

    out/
      v0001/ ...            a release (manifest.json, uids.npy, tars, sidecars, README.md)
      v0002/ ... CHANGES.md  the next one, with its differences from v0001
      latest -> v0002        a relative symlink, replaced atomically once v0002 is complete

A version is built in ``out/.vNNNN.partial`` and renamed into place when complete, and is never
written again: a later export whose selection (the digest of its config and selected uids) equals
the latest version's makes no new version. ``keep_versions`` prunes the oldest versions, and only
folders that are releases of ours holding nothing else; anything else in ``out`` is refused.

``CHANGES.md`` (and ``changes`` in the manifest) count the samples added and removed against the
previous version by reason: new input (a shard the previous version's pool did not have), an old
sample now selected, or, for a removed sample, the decision that now drops it (MetaCLIP balancing,
the filter rule, long-tail rebalancing). Both sides are SQL over the two versions' sidecars and the
pool's decision tables, run by the engine, so the driver only receives the counts.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import ExportConfig
from pipeline.export.release import (
    ExportError,
    build_release,
    check_target,
    foreign_files,
    release_manifest,
    remove_release,
)
from pipeline.store import schema as S
from pipeline.store.parquet import Pool, atomic_path

VERSION = re.compile(r"^v(\d{4,})$")
LATEST = "latest"
LOCK = ".versions.lock"


def list_versions(pool: Pool, out: Path) -> list[tuple[int, Path, dict[str, Any]]]:
    """The versions in ``out`` as (number, folder, manifest), oldest first.

    Raises:
        ExportError: ``out`` is not a folder the export may write versions into, or holds anything
            but versions of ours, the ``latest`` link and our hidden work files (named; nothing removed).
    """
    check_target(pool, out)
    if not out.exists():
        return []
    if not out.is_dir():
        raise ExportError(f"--out {out}: is a file; give a folder for versioned releases (nothing was removed)")
    if release_manifest(out) is not None:
        raise ExportError(f"--out {out}: holds an unversioned release; give another folder for versioned "
                          "releases, or move it into v0001/ (nothing was removed)")  # fmt: skip
    found, foreign = [], []
    for entry in sorted(out.iterdir()):
        if entry.name.startswith(".") or (entry.name == LATEST and entry.is_symlink()):
            continue
        match = VERSION.match(entry.name)
        manifest = release_manifest(entry) if match and entry.is_dir() and not entry.is_symlink() else None
        if manifest is None or foreign_files(entry, manifest):
            foreign.append(entry.name)
        else:
            found.append((int(match.group(1)), entry, manifest))  # type: ignore[union-attr]
    if foreign:
        raise ExportError(f"--out {out}: holds {', '.join(foreign[:5])}, not versions of a clipcurate release; "
                          "move them away first (nothing was removed)")  # fmt: skip
    return sorted(found, key=lambda v: v[0])


def export_version(pool: Pool, cfg: ExportConfig, progress: bool, engine: Any, wait: bool) -> dict[str, Any]:
    """Write the next version of ``cfg.out`` unless the latest one is this very selection.

    Returns:
        The new version's manifest with ``new_version: true``, or the latest version's with
        ``new_version: false``.
    """
    from pipeline.store.lock import writer_lock

    out = Path(cfg.out)
    list_versions(pool, out)
    out.mkdir(parents=True, exist_ok=True)
    with writer_lock(out, f"curate export {pool.root} --out {out}", wait=wait, name=LOCK):
        found = list_versions(pool, out)  # again, under the lock
        last = found[-1] if found else None
        source = last[2].get("source_pool") if last else None
        if source is not None and source != str(pool.root.resolve()):
            raise ExportError(f"--out {out}: its versions are releases of the pool {source}, not of {pool.root}; "
                              "give each pool its own versioned folder (nothing was written)")  # fmt: skip
        name = f"v{(last[0] + 1 if last else 1):04d}"
        one = dataclasses.replace(cfg, out=str(out / name), overwrite=False, versioned=False, keep_versions=None)
        version = {"name": name, "previous_name": last[1].name if last else None,
                   "previous": last[1] if last else None, "previous_manifest": last[2] if last else None}  # fmt: skip
        manifest = build_release(pool, one, progress, engine, version, changes=write_changes)
        newest = name if manifest.get("new_version") is not False else last[1].name  # type: ignore[index]
        point_latest(out, newest)  # also after a no-op run: a kill before the link moved is repaired here
        if manifest.get("new_version") is False:
            return manifest
        if cfg.keep_versions is not None:
            for _, folder, old in list_versions(pool, out)[: -cfg.keep_versions]:
                remove_release(folder, old)  # exactly the files its manifest lists
        return {**manifest, "new_version": True}


def point_latest(out: Path, name: str) -> None:
    """``out/latest`` -> ``name``, replaced atomically (a reader sees the old or the new version)."""
    tmp = out / ".latest.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(name)
    os.replace(tmp, out / LATEST)


def latest_version(out: str | Path) -> Path | None:
    """The folder ``out/latest`` points at, if any."""
    link = Path(out) / LATEST
    return link.resolve() if link.is_symlink() else None


# --- CHANGES.md ------------------------------------------------------------------------------------

_NEW_INPUT = "new input (files ingested since the previous version)"
_NOW_SELECTED = "old sample, now selected (a pool-wide decision moved as the pool grew)"
_REASONS = (("metaclip", "m", "when m.metaclip_keep = false then 'rebalanced: MetaCLIP balancing'"),
            ("decisions", "d", "when d.keep = false then concat('filtered: ', coalesce(d.drop_reason, '?'))"),
            ("rebalance", "b", "when b.rebalance_keep = false then 'rebalanced: long-tail rebalancing'"))  # fmt: skip
_FLIP_STAGES = (("metaclip", "MetaCLIP balancing"), ("decisions", "filter decisions"), ("rebalance", "rebalancing"))


def _sidecars(folder: Path, columns: list[str]) -> Any:
    from pipeline.engines.base import Table

    files = sorted(folder.glob("[0-9]*.parquet"))
    if not files:
        return None
    schema = pq.read_schema(files[0])
    return Table.of(files, pa.schema([schema.field(c) for c in columns]))


def _counts(engine: Any, sql: str, tables: dict[str, Any]) -> dict[str, int]:
    rows = engine.query(sql, tables)
    return {str(r): int(n) for r, n in zip(rows["reason"].to_pylist(), rows["n"].to_pylist(), strict=True)}


def release_changes(pool: Pool, pool_manifest: dict[str, Any], engine: Any, new_dir: Path, previous: Path,
                    previous_manifest: dict[str, Any], samples: int) -> dict[str, Any]:  # fmt: skip
    """Samples added and removed against ``previous`` by reason, new input files, decision flips."""
    new = _sidecars(new_dir, [S.UID, "source_shard"])
    old = _sidecars(previous, [S.UID])
    old_input = previous_manifest.get("pool_input") or {}
    old_shards = old_input.get("num_shards")
    added: dict[str, int] = {}
    removed: dict[str, int] = {}
    if new is not None:
        is_new = f"n.source_shard >= {int(old_shards)}" if old_shards is not None else "false"
        anti = "left join old o on n.uid = o.uid where o.uid is null" if old is not None else ""
        added = _counts(engine, f"select case when {is_new} then '{_NEW_INPUT}' else '{_NOW_SELECTED}' end as reason, "
                                f"count(*) as n from new n {anti} group by 1 order by 1",
                        {"new": new, **({"old": old} if old is not None else {})})  # fmt: skip
    if old is not None:
        stages = set(pool_manifest["stages"])
        tables: dict[str, Any] = {"old": old, **({"new": new} if new is not None else {})}
        joins, cases = [], []
        for stage, alias, case in _REASONS:
            if stage in stages:
                cols = {"metaclip": [S.UID, S.METACLIP_KEEP], "decisions": [S.UID, S.KEEP, S.DROP_REASON],
                        "rebalance": [S.UID, S.REBALANCE_KEEP]}[stage]  # fmt: skip
                tables[stage] = pool.table(stage, cols)
                joins.append(f"left join {stage} {alias} on r.uid = {alias}.uid")
                cases.append(case)
        gone = "select o.uid from old o" + (" left join new n on o.uid = n.uid where n.uid is null" if new else "")
        reason = f"case {' '.join(cases)} else 'no longer selected (selection or download changed)' end"
        removed = _counts(engine, f"select {reason} as reason, count(*) as n from ({gone}) r {' '.join(joins)} "
                                  "group by 1 order by 1", tables)  # fmt: skip
    flips = {}
    for stage, _ in _FLIP_STAGES:
        counts = pool_manifest["stages"].get(stage, {}).get("counts", {})
        picked = {k: v for k, v in counts.items() if k.startswith(("flipped_", "p_changed"))}
        if picked:
            flips[stage] = picked
    known = {f["path"] for f in old_input.get("files") or []}
    now = (pool_manifest.get("input") or {}).get("ingests") or []
    new_files = [{"path": f["path"], "rows": f.get("rows")} for i in now for f in i.get("files") or []
                 if f["path"] not in known]  # fmt: skip
    before = int(previous_manifest["counts"]["samples"])
    return {"previous": previous.name, "samples_before": before, "samples": samples,
            "added": added, "removed": removed, "new_files": new_files if old_input.get("files") is not None else None,
            "flips": flips}  # fmt: skip


def write_changes(pool: Pool, pool_manifest: dict[str, Any], engine: Any, partial: Path, version: dict[str, Any],
                  manifest: dict[str, Any]) -> dict[str, Any] | None:  # fmt: skip
    """``CHANGES.md`` in the version being built (``partial``); returns the manifest's ``changes``."""
    name, samples = version["name"], manifest["counts"]["samples"]
    if version["previous"] is None:
        changes = None
        lines = [f"# {name}", "", f"The first version: {samples} samples."]
    else:
        changes = release_changes(pool, pool_manifest, engine, partial, version["previous"],
                                  version["previous_manifest"], samples)  # fmt: skip
        prev = changes["previous"]
        lines = [f"# {name}: changes from {prev}", "", "| | samples |", "|---|---:|",
                 f"| {prev} | {changes['samples_before']} |", f"| added | {sum(changes['added'].values())} |",
                 f"| removed | {sum(changes['removed'].values())} |",
                 f"| **{name}** | **{samples}** |", ""]  # fmt: skip
        for title, part in (("Added", changes["added"]), ("Removed", changes["removed"])):
            lines += [f"## {title}, by reason", "", "| reason | samples |", "|---|---:|"]
            lines += [f"| {reason} | {n} |" for reason, n in part.items()] or ["| (none) | 0 |"]
            lines.append("")
        if changes["flips"]:
            lines += ["## Decisions that changed on samples of the earlier pool", "",
                      "Every draw is keyed by (seed, uid, entry): an old sample flips only where its probability "
                      "moved (`flipped_p_unchanged` is 0).", "",
                      "| stage | count | samples |", "|---|---|---:|"]  # fmt: skip
            for stage, label in _FLIP_STAGES:
                lines += [f"| {label} | {k} | {v} |" for k, v in sorted(changes["flips"].get(stage, {}).items())]
            lines.append("")
        if changes["new_files"] is not None:
            lines += [f"## Input files new since {prev}", ""]
            lines += [f"- `{f['path']}` ({f['rows']} rows)" for f in changes["new_files"]] or ["- (none)"]
    with atomic_path(partial / "CHANGES.md") as tmp:
        tmp.write_text("\n".join(lines).rstrip() + "\n")
    return changes
