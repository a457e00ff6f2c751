"""Export a training subset of a pool as a new WebDataset release.

A release is selected by a SQL predicate over the pool's ``samples`` view (any stage's columns:
``metaclip_keep and keep and expert_id = 2``) and/or a filter recipe, then written as::

    release/
      00000.tar, 00000.parquet, ...     resharded WebDataset + one Parquet sidecar per shard
      embeddings/00000.parquet, ...     (optional) the samples' CLIP embeddings, same order
      manifest.json                     source pool, predicate, config hash, counts, shards + sha256
      sizes.json                        samples per shard, as open_clip's training reads them
      README.md                         dataset card: counts, the funnel, how to train on it

Only downloaded samples with an image in the pool's shards can be exported. Samples keep their
image, caption (``.txt``) and img2dataset metadata (``.json``, with ``uid`` added) under new keys
``{index:09d}``; the order is the pool's (shard, key) order, or a seeded hash of the uid when
shuffled, so the same selection always gives the same bytes.

Tars are written with :mod:`tarfile` directly rather than ``webdataset.TarWriter``: every header
field is fixed (mtime 0, owner 0, mode 0o644), so a release is byte-identical however often it is
rebuilt or resumed, and its shards' sha256 in the manifest can be compared across runs.

Resume: the release is built in ``.<name>.partial/`` beside ``out``; each output shard is complete
once its sidecar exists (the tar is written first, both atomically), a re-run with the same
selection skips complete shards, and the finished directory replaces ``out`` by rename. Output
shards are independent tasks (:func:`write_release_shard` over one row group of the export plan),
so an engine writes them in parallel: local processes, or Spark executors.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import ExportConfig, config_hash
from pipeline.errors import DamagedError, UserError
from pipeline.store import schema as S
from pipeline.store.parquet import (
    Pool,
    atomic_path,
    file_sha256,
    package_versions,
    redo_hint,
    walk_files,
    write_json_atomic,
    write_parquet_atomic,
)
from pipeline.store.webdataset import IMAGE_EXTENSIONS, check_name, split_name

EMBEDDING_COLUMNS = (S.IMAGE_EMBEDDING, S.TEXT_EMBEDDING, S.CAPTION_EMBEDDING)
_EXPORT_KEY = 0x45585054  # "EXPT": hash key of the shuffle draws


class ExportError(UserError, ValueError):
    """A selection that cannot be exported; the message names the predicate or recipe."""


def _predicate(where: str | None, decoded: bool, listed: bool = False) -> str:
    """Only downloaded samples (with a key in a tar) and, on an embedded pool, samples whose image
    decoded: a sample without a decodable image never reaches a release, whatever ``where`` says.
    ``listed``: a pool curated from its metadata alone (its release is uids only): every listed row."""
    if listed:
        return f"({where})" if where else "true"
    base = f"{S.STATUS} = 'success' and {S.KEY} is not null" + (f" and {S.DECODE_ERROR} is null" if decoded else "")
    return f"{base} and ({where})" if where else base


def _decoded(pool: Pool) -> bool:
    return bool(pool.done_shards("embed"))


def needed_stages(pool: Pool, cfg: ExportConfig, rules: list | None) -> list[str]:
    """The stages a release reads: ``download``, the stage of each column ``where`` names (the
    ``samples`` view's first stage with that column), ``embed`` for the decoded check and for
    ``embeddings``, and the stages of the recipe's rules."""
    from pipeline.query import BASE_STAGE
    from pipeline.sqlsafe import column_refs

    stages = [s for s in pool.stages() if pool.table_dir(s).exists()]
    stages = [BASE_STAGE] + [s for s in stages if s != BASE_STAGE]
    owner: dict[str, str] = {}
    for stage in stages:
        done = pool.done_shards(stage)
        for name in pool.declared_schema(stage, pool.table_path(stage, done[0])).names:
            owner.setdefault(name, stage)
    needed = {BASE_STAGE}
    needed |= {owner[c] for c in column_refs(cfg.where) if c in owner} if cfg.where else set()
    if cfg.embeddings or _decoded(pool):
        needed.add("embed")
    needed |= {r.definition.stage for r in rules or []}
    return [s for s in stages if s in needed] + sorted(needed - set(stages))


def check_complete(pool: Pool, stages: list[str], allow: bool) -> dict[str, Any]:
    """Which of ``stages`` have unfinished shards; refuse (naming them) unless ``allow``.

    Returns:
        ``{stage: {"done", "planned", "missing" (first 10), "missing_count"}}`` of the incomplete ones.
    """
    from pipeline.query import completeness, missing_text

    report = completeness(pool, stages)
    incomplete = {s: e for s, e in report.items() if not e["complete"]}
    if incomplete and not allow:
        parts = [f"{stage} ({e['done']}/{e['planned']} shards done; missing {missing_text(e)})"
                 for stage, e in incomplete.items()]  # fmt: skip
        raise ExportError(f"{pool.root}: the release reads unfinished stage(s): {'; '.join(parts)}. Finish them "
                          "(`curate run CONFIG`) or pass --allow-incomplete (recorded in the manifest)")  # fmt: skip
    return incomplete


def _recipe_selection(pool: Pool, cfg: ExportConfig, engine: Any) -> tuple[str | None, list | None, str | None]:
    """``(where, rules, how)`` for ``--recipe R``: the pool's decided recipe reads its stored
    decisions (``keep`` joins the predicate: ``how`` is ``stored``); another recipe is re-decided
    with the pool's recorded filter parameters (its thresholds and fractions), exactly as
    ``curate filter`` would (``re-decided``)."""
    if not cfg.recipe:
        return cfg.where, None, None
    import dataclasses

    from pipeline.filters.decisions import recorded_config, resolve_rules

    decided = recorded_config(pool)
    given = (cfg.recipes or {}).get(cfg.recipe)
    if cfg.recipe == decided.recipe and given in (None, decided.recipes.get(cfg.recipe)):
        return (f"({cfg.where}) and {S.KEEP}" if cfg.where else S.KEEP), None, "stored"
    recipe_cfg = dataclasses.replace(decided, recipe=cfg.recipe, recipes={**decided.recipes, **(cfg.recipes or {})})
    return cfg.where, resolve_rules(pool, recipe_cfg, engine)[0], "re-decided"


def check_predicate(pool: Pool, where: str | None) -> list[str]:
    """Validate ``where`` against the ``samples`` view (no rows read); return the sidecar columns."""
    import duckdb

    from pipeline.query import connect
    from pipeline.sqlsafe import check_expression

    if where is not None:
        check_expression(where, "export.where (--where)")
    con = connect(pool, shards=pool.done_shards("download")[:1], confined=True)
    try:
        predicate = _predicate(where, _decoded(pool), pool.metadata_only())
        con.sql(f"select {S.UID} from samples where {predicate} limit 0").fetchall()
    except duckdb.Error as exc:  # duckdb's errors name the bad column or syntax
        raise ExportError(f"export predicate {where!r} over `samples`: {str(exc).splitlines()[0]}") from None
    # a release holds fetched samples only: the derived error_class is NULL for every one of them, and
    # how many fetches a sample took (attempts) is the pool's bookkeeping, not the sample's
    return [r[0] for r in con.execute("describe samples").fetchall()
            if r[0] not in EMBEDDING_COLUMNS and r[0] not in (S.ERROR_CLASS, S.ATTEMPTS)]  # fmt: skip


def plan_source_shard(pool_root: str, plan_dir: str, where: str | None, rules: list | None, seed: int | None,
                      side_cols: list[str], uids_file: str | None, layout: dict[str, int], listed: bool,
                      shard: int) -> dict[str, Any]:  # fmt: skip
    """The export plan of one source shard: its selected samples in key order, with where each one's
    members lie in the source tar, its size in an output tar, its shuffle draw and its sidecar
    columns. Written to ``plan/{shard}.parquet``; the driver never holds a per-sample plan.
    ``listed``: a pool curated from its metadata alone: its selected rows in uid order, no member."""
    from pipeline.query import connect

    pool = Pool(pool_root)
    # this shard's decode check: the embed stage's, or, where its embed is missing (never embedded,
    # or downloaded again since: --allow-incomplete), export's own below
    decoded = pool.is_done("embed", shard)
    con = connect(pool, shards=[shard], confined=True, layout=layout)
    quoted = ", ".join(f'"{c}"' for c in side_cols)
    order = S.UID if listed else S.KEY
    source = "samples"
    if rules is not None:  # re-decided first, so the view joins and sorts only the kept rows
        from pipeline.filters.decisions import decide_shard

        base, keep = decide_shard(pool, shard, rules)
        con.register("_kept", base.filter(pa.array(keep)))
        source = "(select * from samples semi join _kept using (uid)) as samples"
    sql = f"select {quoted} from {source} where {_predicate(where, decoded, listed)} order by {order}"
    table = con.sql(sql).fetch_arrow_table()
    con.close()
    if uids_file is not None:  # exactly the samples of a DataComp uid file (memory-mapped, binary search)
        from pipeline.export.uids import in_uid_file, open_uid_file

        table = table.filter(pa.array(in_uid_file(open_uid_file(uids_file, check=False), table[S.UID].to_pylist())))
    n, without_image = table.num_rows, 0
    if listed:  # no member anywhere: every row is one empty entry (no per-row work)
        members, sizes = pa.repeat(pa.scalar("[]"), n), pa.array(np.zeros(n, np.int64))
    else:
        located = _locate(pool, shard, table[S.KEY].to_pylist())
        has_image = [any(m["ext"] in IMAGE_EXTENSIONS and m["size"] > 0 for m in ms) for ms in located]
        if not decoded:  # never embedded: decode here what the embed stage would have
            has_image = _decodes(pool, shard, located, has_image)
        without_image = has_image.count(False)
        if without_image:  # a sample without a (decodable) image member is never exported
            table = table.filter(pa.array(has_image))
            located = [m for m, ok in zip(located, has_image, strict=True) if ok]
        members = pa.array([json.dumps(m) for m in located], pa.string())
        sizes = pa.array([_output_size(m) for m in located], pa.int64())
    plan = pa.table({"_source_shard": pa.array(np.full(table.num_rows, shard), pa.int32()),
                     "_source_key": table[S.KEY].cast(pa.string()), "_uid": table[S.UID], "_members": members,
                     "_size": sizes, "_draw": _draws(table[S.UID], seed)})  # fmt: skip
    for name in table.column_names:
        plan = plan.append_column(f"side.{name}", table[name])
    # row groups of a few thousand rows: a release shard's task reads the groups its rows lie in, not the whole plan
    write_parquet_atomic(Path(plan_dir) / f"{shard:05d}.parquet", plan, row_group_size=PLAN_ROW_GROUP)
    uids = "\n".join(table[S.UID].to_pylist()).encode()
    return {"samples": table.num_rows, "uids_sha256": hashlib.sha256(uids).hexdigest(), "without_image": without_image}


def _decodes(pool: Pool, shard: int, located: list[list[dict[str, Any]]], has_image: list[bool]) -> list[bool]:
    """Whether each sample's image decodes (Pillow, with the decompression-bomb limit): the embed
    stage's check, for a pool exported without one."""
    from pipeline.store.webdataset import decode_image

    reader, out = _Reader(pool), []
    try:
        for members, ok in zip(located, has_image, strict=True):
            image = next((m for m in members if m["ext"] in IMAGE_EXTENSIONS), None) if ok else None
            data = reader.read(shard, image["offset"], image["size"]) if image is not None else None
            out.append(data is not None and decode_image(data)[0] is not None)
    finally:
        reader.close()
    return out


def _draws(uids: pa.ChunkedArray, seed: int | None) -> pa.Array:
    if seed is None or len(uids) == 0:
        return pa.array(np.zeros(len(uids)), pa.float64())
    from pipeline.sampling import uid_to_uint64, uniform

    return pa.array(uniform(uid_to_uint64(uids), np.uint64(_EXPORT_KEY), seed), pa.float64())


def _plan_shards(sizes: Any, per_shard: int, max_bytes: int | None) -> list[tuple[int, int]]:
    """[start, end) of each output shard over the ordered samples; ``sizes`` is an iterable of
    arrays of output sizes (streamed batch by batch: only the bounds are held)."""
    bounds, start, total, i = [], 0, 0, 0
    for batch in sizes:
        for size in np.asarray(batch, dtype=np.int64).tolist():
            # a tar ends with two zero blocks and is padded to 10 KiB records
            full = max_bytes and -(-(total + size + 1024) // 10240) * 10240 > max_bytes
            if i > start and (i - start >= per_shard or full):
                bounds.append((start, i))
                start, total = i, 0
            total += size
            i += 1
    if start < i:
        bounds.append((start, i))
    return bounds


def _ordered_files(partial: Path) -> list[Path]:
    return sorted((partial / "ordered").glob("*.parquet"))


def _read_rows(files: list[Path], file_rows: list[int], a: int, b: int) -> pa.Table:
    """Rows [a, b) of the ordered plan (files in name order, ``file_rows`` rows each), reading only
    the row groups needed: a file wholly before ``a`` is not even opened."""
    parts, offset = [], 0
    for path, rows in zip(files, file_rows, strict=True):
        if offset + rows <= a:
            offset += rows
            continue
        meta = pq.ParquetFile(path)
        for g in range(meta.num_row_groups):
            n = meta.metadata.row_group(g).num_rows
            lo, hi = max(a, offset), min(b, offset + n)
            if lo < hi:
                parts.append(meta.read_row_group(g).slice(lo - offset, hi - lo))
            offset += n
            if offset >= b:
                return pa.concat_tables(parts)
    return pa.concat_tables(parts) if parts else pa.table({})


def _embeddings(pool: Pool, uids: list[str], shards: list[int]) -> pa.Table:
    """The samples' CLIP embeddings as the pool stores them, in the given order (null rows where a
    sample has none), read one source shard at a time."""
    order = pa.array(uids, pa.string())
    parts = []
    for shard in sorted(set(shards)):
        table = pool.read_shard("embed", shard, columns=[S.UID, S.IMAGE_EMBEDDING, S.TEXT_EMBEDDING])
        parts.append(table.filter(pa.compute.is_in(table[S.UID], value_set=order)))
    found = pa.concat_tables(parts)
    rows = pa.compute.index_in(order, value_set=found[S.UID].combine_chunks())
    return pa.table({S.UID: order, S.IMAGE_EMBEDDING: found[S.IMAGE_EMBEDDING].take(rows),
                     S.TEXT_EMBEDDING: found[S.TEXT_EMBEDDING].take(rows)})  # fmt: skip


def _member_index(pool: Pool, shard: int) -> dict[str, dict[str, tuple[int, int]]]:
    """Key -> extension -> (data offset, size) of every member of a source tar (names checked as
    the safe reader checks them)."""
    path = pool.shard_tar(shard)
    members: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in tar.getmembers():
                check_name(path, m.name)
                if m.isfile():  # a symlink or device member is no image: the sample has none
                    key, ext = split_name(m.name)
                    members.setdefault(key, {})[ext] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError) as exc:
        raise DamagedError(f"{path}: unreadable shard ({exc}); {redo_hint('download')}") from None
    return members


def _locate(pool: Pool, shard: int, keys: list[str]) -> list[list[dict[str, Any]]]:
    """Where each selected sample's members lie in its source tar (the tar indexed once), so writing
    an output shard costs one seek per member and never rescans a tar."""
    if not keys:
        return []
    index = _member_index(pool, shard)
    out: list[list[dict[str, Any]]] = []
    for key in keys:
        if key not in index:
            raise ExportError(f"{pool.shard_tar(shard)}: sample {key!r} is in the download table but not the tar")
        out.append([{"ext": ext, "offset": o, "size": n} for ext, (o, n) in sorted(index[key].items())])
    return out


def _output_size(members: list[dict[str, Any]]) -> int:
    """Bytes a sample takes in an output tar: a 512-byte header per member, data padded to 512; the
    ``.json`` gains the uid and source fields (at most one more block)."""
    return sum(512 + -(-m["size"] // 512) * 512 + (512 if m["ext"] == "json" else 0) for m in members)


class _Reader:
    """Member bytes by offset from the pool's source tars, through a few open file handles."""

    def __init__(self, pool: Pool, keep_open: int = 16):
        self.pool, self.keep_open = pool, keep_open
        self.files: OrderedDict[int, Any] = OrderedDict()

    def read(self, shard: int, offset: int, size: int) -> bytes:
        if shard in self.files:
            self.files.move_to_end(shard)
        else:
            self.files[shard] = self.pool.shard_tar(shard).open("rb")
            if len(self.files) > self.keep_open:
                self.files.popitem(last=False)[1].close()
        f = self.files[shard]
        f.seek(offset)
        return f.read(size)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def write_release_shard(pool_root: str, partial: str, bounds: list[tuple[int, int]], embeddings: bool,
                        images: bool, file_rows: list[int], index: int) -> dict[str, int]:  # fmt: skip
    """Write output shard ``index`` (tar, then embeddings, then the sidecar that marks it done) from
    rows ``bounds[index]`` of the ordered plan (``file_rows``: each ordered file's rows; ``images``
    false: a uids release, no tar). Runs anywhere the pool and release are visible."""
    partial_dir = Path(partial)
    a, b = bounds[index]
    plan = _read_rows(_ordered_files(partial_dir), file_rows, a, b)
    shards, uids = plan["_source_shard"].to_pylist(), plan["_uid"].to_pylist()
    new_keys = [f"{a + i:09d}" for i in range(plan.num_rows)]
    name = f"{index:05d}"
    repaired = _write_tar(pool_root, partial_dir / f"{name}.tar", plan, new_keys) if images else 0
    renames = {S.KEY: "source_key", S.SHARD: "source_shard"}
    side = [c for c in plan.column_names if c.startswith("side.")]
    part = plan.select(side).rename_columns([renames.get(c[5:], c[5:]) for c in side])
    part = part.add_column(0, S.KEY, pa.array(new_keys))
    if embeddings:
        write_parquet_atomic(partial_dir / "embeddings" / f"{name}.parquet", _embeddings(Pool(pool_root), uids, shards))
    part = part.replace_schema_metadata({"captions_repaired": str(repaired)})
    write_parquet_atomic(partial_dir / f"{name}.parquet", part)
    return {"samples": plan.num_rows, "captions_repaired": repaired}


def _write_tar(pool_root: str, path: Path, plan: pa.Table, new_keys: list[str]) -> int:
    """An output tar of the plan's rows (members copied from the source tars under their new keys;
    the json gains the uid and where the sample came from); returns the captions repaired."""
    shards, keys, uids = (plan[c].to_pylist() for c in ("_source_shard", "_source_key", "_uid"))
    located = [json.loads(m) for m in plan["_members"].to_pylist()]
    reader = _Reader(Pool(pool_root))
    repaired = 0
    try:
        with atomic_path(path) as tmp, tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, shard, source_key, uid, members in zip(new_keys, shards, keys, uids, located, strict=True):
                for member in members:
                    ext, data = member["ext"], reader.read(shard, member["offset"], member["size"])
                    if ext == "json":
                        meta = json.loads(data)
                        meta.update({S.UID: uid, "source_shard": shard, "source_key": source_key})
                        data = json.dumps(meta, sort_keys=True).encode()
                    elif ext == "txt":
                        data, bad = _utf8_caption(data)
                        repaired += bad
                    elif ext not in IMAGE_EXTENSIONS:
                        continue
                    _add(tar, f"{key}.{ext}", data)
    finally:
        reader.close()
    return repaired


def _utf8_caption(data: bytes) -> tuple[bytes, int]:
    """A caption as valid UTF-8: invalid bytes become U+FFFD (Python's ``errors="replace"``), the
    documented repair (README, "Captions that are not UTF-8"); returns (bytes, 1 if repaired)."""
    try:
        data.decode("utf-8")
        return data, 0
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace").encode("utf-8"), 1


PLAN_ROW_GROUP = 4096  # rows per row group of an export plan file
RELEASE_FORMAT = "clipcurate-release/1"  # the manifest key that marks a folder as a release of ours
_TMP = re.compile(r"^\..*\.tmp-\d+-\d+$")  # atomic_path's temporary names


def release_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a release this tool made in ``folder``, else None."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    ours = isinstance(manifest, dict) and (manifest.get("format") == RELEASE_FORMAT
                                           or {"digest", "source_pool", "shards"} <= set(manifest))  # fmt: skip
    return manifest if ours else None


def release_files(manifest: dict[str, Any]) -> set[str]:
    """The paths (relative, ``/``-separated) of every file the release of ``manifest`` wrote: its
    ``files`` list, or, for a release of an earlier version without one, what that version wrote
    (its shards' tars and sidecars, their embeddings when exported, the fixed files, CHANGES.md of a
    version)."""
    if manifest.get("files") is not None:
        return {f["path"] for f in manifest["files"]} | {"manifest.json"}
    names = {"manifest.json", "sizes.json", "README.md", "uids.npy"}
    if manifest.get("version"):
        names.add("CHANGES.md")
    embeddings = (manifest.get("export_config") or {}).get("embeddings")
    for entry in manifest.get("shards", []):
        sidecar = entry["name"].removesuffix(".tar") + ".parquet"
        names |= {entry["name"], sidecar} | ({f"embeddings/{sidecar}"} if embeddings else set())
    return names


def foreign_files(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Files anywhere in a release folder that its manifest does not list (the user's files), by
    relative path; temporary files of a killed export of ours are not foreign."""
    ours = release_files(manifest)
    return [rel for rel in walk_files(folder) if rel not in ours and not _TMP.match(rel.rsplit("/", 1)[-1])]


def file_records(folder: Path) -> list[dict[str, Any]]:
    """``{path, size, sha256}`` of every file in a finished release folder but its manifest: the
    manifest's ``files``, which are all that replacing or pruning the release ever removes."""
    return [{"path": rel, "size": (folder / rel).stat().st_size, "sha256": file_sha256(folder / rel)}
            for rel in walk_files(folder) if rel != "manifest.json"]  # fmt: skip


def remove_release(folder: Path, manifest: dict[str, Any]) -> None:
    """Remove exactly the files of ``manifest``'s release from ``folder``, then the folders left empty.

    Raises:
        ExportError: something not of the release is there (named); nothing was removed.
    """
    foreign = foreign_files(folder, manifest)
    if foreign:
        raise ExportError(f"{folder}: holds files that are not part of its release ({', '.join(foreign[:5])}); "
                          "move them away first (nothing was removed)")  # fmt: skip
    for rel in walk_files(folder):  # ours and temporary files of ours
        (folder / rel).unlink()
    for top, _, _ in sorted(os.walk(folder), key=lambda t: -len(t[0])):  # deepest first
        Path(top).rmdir()


def check_target(pool: Pool, out: Path) -> None:
    """Refuse an ``out`` that is the pool, inside the pool's data, or an ancestor of the pool."""
    from pipeline.store.parquet import POOL_ENTRIES

    target, root = out.resolve(), pool.root.resolve()
    own = target.parent != root or target.name in POOL_ENTRIES or target.name.startswith(".")
    if target == root or (root in target.parents and own):  # `<pool>/release` is fine; `<pool>/tables/x` is not
        raise ExportError(f"--out {out}: is the pool {pool.root} or inside its data; give a folder outside "
                          "the pool, or a new folder directly in it (such as <pool>/release)")  # fmt: skip
    if target in root.parents:
        raise ExportError(f"--out {out}: contains the pool {pool.root}; a release folder must not hold a pool")


def check_out(pool: Pool, out: Path, overwrite: bool) -> dict[str, Any] | None:
    """Refuse an ``out`` the export may not write: the pool, a folder inside the pool's data (a new
    folder directly in the pool, not one of :data:`POOL_ENTRIES`, is allowed), an ancestor of
    the pool, a file, a non-empty folder that is not a release of ours, a release holding files of
    the user's, or the folder where the release is built (``.<out>.partial``) when it is not ours.

    Returns:
        The manifest of the release already in ``out`` (None if ``out`` is missing or empty).

    Raises:
        ExportError: names ``out`` and why; nothing has been written or removed.
    """
    check_target(pool, out)
    partial = out.parent / f".{out.name}.partial"
    if partial.exists() and not (partial / ".clipcurate-partial").exists():
        raise ExportError(f"{partial}: exists and was not made by clipcurate; move it away (nothing was removed)")
    if not out.exists():
        return None
    if not out.is_dir():
        raise ExportError(f"--out {out}: is a file; give a folder (nothing was removed)")
    if not any(out.iterdir()):
        return None
    manifest = release_manifest(out)
    if manifest is None:
        raise ExportError(f"--out {out}: not empty and not a clipcurate release (no release manifest.json); "
                          "give an empty or new folder (nothing was removed)")  # fmt: skip
    foreign = foreign_files(out, manifest)
    if foreign:
        raise ExportError(f"--out {out}: holds files that are not part of its release ({', '.join(foreign[:5])}); "
                          "move them away first (nothing was removed)")  # fmt: skip
    return manifest


def _clean_partial(partial: Path) -> None:
    """Make ``partial`` (ours, :func:`check_out`) ready to resume: no temporary files of a killed run."""
    partial.mkdir(parents=True, exist_ok=True)
    (partial / ".clipcurate-partial").touch()
    for folder in (partial, partial / "embeddings"):
        if folder.is_dir():
            for path in folder.iterdir():
                if _TMP.match(path.name):
                    path.unlink()


def plan_release(pool: Pool, cfg: ExportConfig, engine: Any, progress: bool = False) -> dict[str, Any]:
    """Plan the release in ``.<out>.partial/``: a task per source shard, the engine's sort for a
    shuffled order, and the output shards' bounds streamed from the samples' sizes.

    Returns:
        ``partial`` (the folder), ``digest`` (of the config and the selected uids), ``samples``,
        ``without_image`` (selected samples left out for want of an image member), ``bounds`` (each
        output shard's [start, end) in the ordered plan) and ``incomplete`` (stages read while
        unfinished, with ``allow_incomplete``).
    """
    from pipeline.core import runner
    from pipeline.engines.base import Table

    out = Path(cfg.out)
    where, rules, how = _recipe_selection(pool, cfg, engine)
    side_cols = check_predicate(pool, where)
    sources = pool.require_complete("download")
    needed = needed_stages(pool, cfg, rules)
    incomplete = check_complete(pool, needed, cfg.allow_incomplete)
    # the sidecars carry every stage's columns: none may come from damage, and bit rot keeps the
    # mtime, so every table and tar is hashed against its marker (docs/benchmarks.md: the cost)
    pool.require_intact(pool.stages(), full=True)
    uids_total, uids_file = None, None
    if cfg.uids is not None:
        from pipeline.export.uids import open_uid_file

        uids_total = len(open_uid_file(cfg.uids))  # checked once (sorted, unique); tasks only look up
        uids_file = str(Path(cfg.uids).resolve())
    partial = out.parent / f".{out.name}.partial"
    _clean_partial(partial)
    for stale in ("plan", "ordered"):
        shutil.rmtree(partial / stale, ignore_errors=True)
    from pipeline.query import stage_layout

    listed = pool.metadata_only()  # DataComp's filtering track: every listed row, a uids release
    fn = functools.partial(plan_source_shard, str(pool.root), str(partial / "plan"), where, rules,
                           cfg.shuffle_seed, side_cols, uids_file, stage_layout(pool), listed)  # fmt: skip
    planned = runner.collect(engine, fn, sources, desc="export plan", progress=progress)
    selection = [planned[s]["uids_sha256"] for s in sources]
    # a uid file counts by the uids it selects; where the versions go is not the selection
    hashed = config_hash(cfg, exclude=("out", "overwrite", "uids", "versioned", "keep_versions", "allow_empty"))
    digest = hashlib.sha256(json.dumps([hashed, selection]).encode()).hexdigest()[:16]
    plan_files = [partial / "plan" / f"{s:05d}.parquet" for s in sources]
    if cfg.shuffle_seed is None:  # (shard, key) order: the plan files in shard order are already sorted
        (partial / "ordered").mkdir()
        for i, path in enumerate(plan_files):
            path.rename(partial / "ordered" / f"{i:09d}.parquet")
    else:  # a global sort by (draw, uid): the engine's, out of core
        schema = pq.read_schema(plan_files[0])
        engine.write("select * from plan order by _draw, _uid", {"plan": Table.of(plan_files, schema)},
                     partial / "ordered")  # fmt: skip
    ordered = [pq.ParquetFile(f) for f in _ordered_files(partial)]
    sizes = (batch.column(0) for f in ordered for batch in f.iter_batches(columns=["_size"], batch_size=65536))
    bounds = _plan_shards(sizes, cfg.samples_per_shard, cfg.max_shard_bytes)
    file_rows = [f.metadata.num_rows for f in ordered]
    return {"partial": partial, "digest": digest, "samples": sum(planned[s]["samples"] for s in sources),
            "file_rows": file_rows,
            "without_image": sum(planned[s]["without_image"] for s in sources), "bounds": bounds,
            "uids_total": uids_total, "recipe_decisions": how, "incomplete": incomplete,
            "images": cfg.format == "webdataset" and not listed, "listed": listed}  # fmt: skip


def build_release(pool: Pool, cfg: ExportConfig, progress: bool, engine: Any, version: dict[str, Any] | None = None,
                  changes: Any = None) -> dict[str, Any]:  # fmt: skip
    """Build the release (``version``: a new version of a versioned ``out``, whose ``changes``
    against the previous one :mod:`.versions` writes: ``changes(pool, pool_manifest, engine,
    partial, version, manifest) -> dict``)."""
    from pipeline.core import runner

    out = Path(cfg.out)
    existing = check_out(pool, out, cfg.overwrite) if version is None else None  # again, under the lock
    plan = plan_release(pool, cfg, engine, progress)
    partial, digest, bounds = plan["partial"], plan["digest"], plan["bounds"]
    if not plan["samples"] and not cfg.allow_empty:
        shutil.rmtree(partial, ignore_errors=True)
        raise ExportError(empty_release(pool, cfg, plan["recipe_decisions"]))
    previous = (version or {}).get("previous_manifest")
    if previous is not None and previous.get("digest") == digest:
        shutil.rmtree(partial)
        return {**previous, "new_version": False}  # the latest version is this very selection
    if existing is not None and existing.get("digest") == digest:
        shutil.rmtree(partial)
        return existing  # this very release is already there
    if existing is not None and not cfg.overwrite:
        shutil.rmtree(partial / "plan", ignore_errors=True)
        shutil.rmtree(partial / "ordered", ignore_errors=True)
        raise ExportError(f"--out {out}: holds another release ({existing.get('counts', {}).get('samples')} samples, "
                          f"`{existing.get('where')}`); pass --overwrite to replace it")  # fmt: skip
    if (partial / "plan.json").exists() and json.loads((partial / "plan.json").read_text()).get("digest") != digest:
        for old in [*partial.glob("[0-9]*.*"), *partial.glob("embeddings/*")]:
            old.unlink()
    write_json_atomic(partial / "plan.json", {"digest": digest})
    todo = [i for i in range(len(bounds)) if not (partial / f"{i:05d}.parquet").exists()]
    fn = functools.partial(write_release_shard, str(pool.root), str(partial), bounds, cfg.embeddings, plan["images"],
                           plan["file_rows"])  # fmt: skip
    runner.collect(engine, fn, todo, desc="export", progress=progress)
    entries, repaired = _shard_entries(partial, bounds, plan["images"])
    for stale in ("plan", "ordered"):
        shutil.rmtree(partial / stale, ignore_errors=True)
    if plan["images"]:  # open_clip_train's get_dataset_size reads sizes.json: --train-num-samples becomes optional
        write_json_atomic(partial / "sizes.json", {e["name"]: e["samples"] for e in entries})
    write_release_uids(partial, engine, plan["samples"])
    unmatched = None if plan["uids_total"] is None else plan["uids_total"] - plan["samples"]
    extra = {"without_image": plan["without_image"], "captions_repaired": repaired, "incomplete": plan["incomplete"],
             "uids_unmatched": unmatched, "recipe_decisions": plan["recipe_decisions"], "images": plan["images"],
             "listed": plan["listed"]}  # fmt: skip
    pool_manifest = pool.build_manifest()  # not written: the pool may be read-only
    manifest = _manifest(pool_manifest, cfg, digest, entries, plan["samples"], extra)
    if version is not None:
        manifest["version"] = version["name"]
        manifest["previous_version"] = version.get("previous_name")
        manifest["changes"] = changes(pool, pool_manifest, engine, partial, version, manifest)
    with atomic_path(partial / "README.md") as tmp:
        tmp.write_text(dataset_card(pool, cfg, manifest))
    (partial / "plan.json").unlink()
    marker = partial / ".clipcurate-partial"
    marker.unlink()
    manifest["files"] = file_records(partial)  # what a replacement or a prune may remove, and only that
    write_json_atomic(partial / "manifest.json", manifest)
    _place(partial, out)
    return manifest


def empty_release(pool: Pool, cfg: ExportConfig, how: str | None) -> str:
    """One line saying why a release would hold no sample: the samples left after each step of the
    selection (listed; downloaded with an image; the recipe, with its own funnel; ``where``), counted
    in SQL over ``samples``, and the step that left none. ``how``: the recipe's (stored or re-decided)."""
    from pipeline.query import connect

    listed = pool.metadata_only()
    cond = _predicate(None, _decoded(pool), listed)
    steps = [("listed", "true")] + ([] if listed else [("downloaded with a decodable image", cond)])
    if how == "stored":
        cond = f"{cond} and {S.KEEP}"
        steps.append((f"kept by recipe `{cfg.recipe}`", cond))
    if cfg.where:
        cond = f"{cond} and ({cfg.where})"
        steps.append((f"where `{cfg.where}`", cond))
    con = connect(pool, confined=True)
    counts = con.execute("select " + ", ".join(f"count(*) filter (where {c})" for _, c in steps)
                         + " from samples").fetchone()  # fmt: skip
    con.close()
    shown = [f"{label} {n}" for (label, _), n in zip(steps, counts, strict=True)]
    if how == "re-decided":
        shown.append(f"recipe `{cfg.recipe}` re-decided from the stored scores 0")
    if cfg.uids:
        shown.append(f"in {cfg.uids} 0")
    first = next((i for i, n in enumerate(counts) if n == 0), len(counts))
    emptied = shown[first].rsplit(" ", 1)[0] if first < len(shown) else "the last step"
    why = f"export: the release would hold no sample: {' -> '.join(shown)}; {emptied} left none"
    decisions = pool.aggregates_dir / "decisions.json"
    if how == "stored" and decisions.exists():
        summary = json.loads(decisions.read_text())
        why += f" (recipe `{summary['recipe']}` samples left after each rule: " + ", ".join(
            f"{step['rule']} {step['left']}" for step in summary["funnel"]) + ")"
    return why + ". Nothing was written; pass --allow-empty to write an empty release."


def _shard_entries(partial: Path, bounds: list[tuple[int, int]], images: bool) -> tuple[list[dict[str, Any]], int]:
    """The manifest's entry of each written output shard (name, samples, bytes, sha256: of its tar,
    or of its sidecar in a uids release) and the captions repaired over all of them."""
    entries, repaired = [], 0
    for index, (a, b) in enumerate(bounds):
        tar_path = partial / f"{index:05d}.{'tar' if images else 'parquet'}"
        entries.append({"name": tar_path.name, "samples": b - a, "bytes": tar_path.stat().st_size,
                        "sha256": file_sha256(tar_path)})  # fmt: skip
        meta = pq.read_schema(partial / f"{index:05d}.parquet").metadata or {}
        repaired += int(meta.get(b"captions_repaired", b"0"))
    return entries, repaired


def _place(partial: Path, out: Path) -> None:
    """Rename the finished release into place, replacing what ``out`` holds (empty, or a release of
    ours with nothing else in it: :func:`check_out`)."""
    if not out.exists():
        partial.rename(out)
        return
    trash = out.parent / f".{out.name}.old"
    if trash.exists():  # a replacement killed before it removed the old release
        old = release_manifest(trash)
        if old is None and any(trash.iterdir()):
            raise ExportError(f"{trash}: exists and is not a clipcurate release; move it away (nothing was removed)")
        remove_release(trash, old) if old is not None else trash.rmdir()
    replaced = release_manifest(out)
    out.rename(trash)
    partial.rename(out)
    remove_release(trash, replaced)


def write_release_uids(partial: Path, engine: Any, n: int) -> None:
    """``uids.npy``: the release's uids as DataComp's sorted ``u8,u8`` pairs (its resharder's input,
    a filtering-track submission), sorted by the engine out of core and streamed into the file."""
    from pipeline.engines.base import Table
    from pipeline.export.uids import write_uid_file

    sidecars = sorted(partial.glob("[0-9]*.parquet"))
    if not sidecars:
        write_uid_file(partial / "uids.npy", [], 0)
        return
    schema = pa.schema([pq.read_schema(sidecars[0]).field(S.UID)])
    engine.write(f"select {S.UID} from side order by {S.UID}", {"side": Table.of(sidecars, schema)},
                 partial / "uids_sorted")  # fmt: skip
    batches = (batch.column(0) for f in sorted((partial / "uids_sorted").glob("*.parquet"))
               for batch in pq.ParquetFile(f).iter_batches(batch_size=65536))  # fmt: skip
    write_uid_file(partial / "uids.npy", batches, n)
    shutil.rmtree(partial / "uids_sorted")


def _manifest(pool_manifest: dict[str, Any], cfg: ExportConfig, digest: str, entries: list[dict], n: int,
              extra: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    last = len(entries) - 1
    return {
        "format": RELEASE_FORMAT,
        "digest": digest,
        "source_pool": pool_manifest["pool"],
        "where": cfg.where,
        "recipe": cfg.recipe,
        "export_config": dataclasses.asdict(cfg),
        "export_config_hash": config_hash(cfg),
        "pool_config_hashes": {s: e["config_hash"] for s, e in pool_manifest["stages"].items()},
        "pool_input": pool_input(pool_manifest["input"]),
        "pool_stage_results": pool_manifest["stage_results"],
        "allow_incomplete": cfg.allow_incomplete,
        "incomplete_stages": extra["incomplete"],
        "recipe_decisions": extra["recipe_decisions"],  # --recipe: the pool's stored decisions, or re-decided
        "counts": {
            "samples": n,
            "shards": len(entries),
            "bytes": sum(e["bytes"] for e in entries),
            "pool_samples": (pool_manifest["input"] or {}).get("num_rows"),
            "left_out_without_image": extra["without_image"],
            "uids_unmatched": extra["uids_unmatched"],
            "captions_repaired": extra["captions_repaired"],
        },
        "shards": entries,
        "train_data": f"{{00000..{last:05d}}}.tar" if entries and extra["images"] else None,
        "release_format": "webdataset" if extra["images"] else "uids",  # uids: a submission, no tar
        "metadata_only_pool": extra["listed"],
        "package_versions": package_versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def pool_input(plan: dict[str, Any] | None) -> dict[str, Any] | None:
    """The pool state a release came from: its input files (path, size, sha256, rows), rows, shards."""
    if not plan:
        return None
    files = [{k: f[k] for k in ("path", "size", "sha256", "rows") if k in f}
             for ingest in plan.get("ingests") or [] for f in ingest.get("files") or []]  # fmt: skip
    return {"num_rows": plan["num_rows"], "num_shards": plan["num_shards"], "ingests": len(plan.get("ingests") or [1]),
            "files": files}  # fmt: skip


def dataset_card(pool: Pool, cfg: ExportConfig, manifest: dict[str, Any]) -> str:
    """The release's README.md: what it holds, how it was selected, the funnel, how to train."""
    counts = manifest["counts"]
    if manifest["release_format"] == "uids":
        return _uids_card(cfg, manifest)
    lines = [f"# {Path(cfg.out).name}", "", "A CLIP training subset exported by clipcurate.", "",
             f"- samples: {counts['samples']} of {counts['pool_samples']} in the pool `{manifest['source_pool']}`",
             f"- shards: {counts['shards']} ({counts['bytes'] / 2**20:.1f} MiB), each `NNNNN.tar` with a "
             "`NNNNN.parquet` sidecar" + (", embeddings in `embeddings/`" if cfg.embeddings else ""),
             f"- selection: `{cfg.where or 'all downloaded samples'}`"
             + (f", recipe `{cfg.recipe}`" if cfg.recipe else ""),
             f"- order: {'shuffled, seed ' + str(cfg.shuffle_seed) if cfg.shuffle_seed is not None else 'pool order'}",
             "", "## Pool funnel", "", "| stage | samples it keeps (each stage alone) |", "|---|---:|"]  # fmt: skip
    stages = manifest["pool_stage_results"]
    plan = pool.read_plan() or {}
    lines.append(f"| input rows | {plan.get('num_rows', '?')} |")
    for name, key, label in (("metaclip", "samples_kept", "MetaCLIP balanced"), ("decisions", "kept", "filter recipe"),
                             ("rebalance", "kept", "rebalanced")):  # fmt: skip
        if name in stages and key in stages[name]:
            lines.append(f"| {label} | {stages[name][key]} |")
    lines.append(f"| **this release** | **{counts['samples']}** |")
    worldwide = (stages.get("metaclip") or {}).get("worldwide")
    if worldwide:
        from pipeline.metaclip.report import languages_markdown

        lines += ["", "MetaCLIP 2 worldwide balancing, per language:", "", *languages_markdown(worldwide)]
    decisions = stages.get("decisions")
    if decisions:
        lines += ["", f"Filter recipe `{decisions['recipe']}`, samples left after each rule:", "",
                  "| rule | left |", "|---|---:|"]  # fmt: skip
        lines += [f"| `{f['rule']}` | {f['left']} |" for f in decisions["funnel"]]
    last = counts["shards"] - 1
    lines += ["", "## Training with open_clip", "",
              "From the folder this card is in (in a versioned release, its `vNNNN/`), with webdataset "
              "below 0.2.96 (0.2.96 added an end-of-shard marker that `open_clip_train` 3.3 cannot read):", "",
              "```bash", "python -m open_clip_train.main --dataset-type webdataset "
              f"--train-data '{{00000..{last:05d}}}.tar' --train-num-samples {counts['samples']} ...",
              "```", "",
              "Every shard's sha256 is in `manifest.json`."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _uids_card(cfg: ExportConfig, manifest: dict[str, Any]) -> str:
    """The README.md of a uids release: what it is and how DataComp takes it."""
    counts, why = manifest["counts"], ("the pool was curated from its metadata alone: no image was fetched"
                                       if manifest["metadata_only_pool"] else "export format `uids`")  # fmt: skip
    lines = [f"# {Path(cfg.out).name}", "", "A DataComp filtering-track submission exported by clipcurate: the "
             f"selected samples' uids, no image ({why}).", "",
             f"- samples: {counts['samples']} of {counts['pool_samples']} in the pool `{manifest['source_pool']}`",
             "- `uids.npy`: the uids as DataComp's sorted `u8,u8` pairs (its `resharder.py --subset-file` input)",
             f"- `NNNNN.parquet`: each selected sample's columns ({counts['shards']} files)",
             f"- selection: `{cfg.where or 'all listed samples'}`" + (f", recipe `{cfg.recipe}`" if cfg.recipe else "")]
    decisions = manifest["pool_stage_results"].get("decisions")
    if decisions:
        lines += ["", f"Filter recipe `{decisions['recipe']}`, samples left after each rule:", "",
                  "| rule | left |", "|---|---:|"]  # fmt: skip
        lines += [f"| `{f['rule']}` | {f['left']} |" for f in decisions["funnel"]]
    return "\n".join(lines) + "\n"
