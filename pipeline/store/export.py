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
from pipeline.store import schema as S
from pipeline.store.parquet import (
    Pool,
    atomic_path,
    file_sha256,
    package_versions,
    write_json_atomic,
    write_parquet_atomic,
)
from pipeline.store.webdataset import IMAGE_EXTENSIONS, _check_name, _split

EMBEDDING_COLUMNS = (S.IMAGE_EMBEDDING, S.TEXT_EMBEDDING, S.CAPTION_EMBEDDING)
_EXPORT_KEY = 0x45585054  # "EXPT": hash key of the shuffle draws


class ExportError(ValueError):
    """A selection that cannot be exported; the message names the predicate or recipe."""


def select(pool: Pool, where: str | None = None, recipe: str | None = None, recipes: dict | None = None,
           con: Any = None) -> pa.Table:  # fmt: skip
    """uid, shard and key of the samples to export, in the pool's (shard, key) order."""
    from pipeline.query import connect

    con = con or connect(pool)
    sql = (f"select {S.UID}, {S.SHARD}, {S.KEY} from samples where {S.STATUS} = 'success' "
           f"and {S.KEY} is not null")  # fmt: skip
    if where:
        sql += f" and ({where})"
    try:
        table = con.sql(sql + f" order by {S.SHARD}, {S.KEY}").fetch_arrow_table()
    except Exception as exc:  # duckdb's errors name the bad column or syntax
        raise ExportError(f"export predicate {where!r} over `samples`: {exc}") from None
    if recipe:
        from pipeline.filters.stage import recipe_keep

        kept = recipe_keep(pool, recipe, recipes or {})
        table = table.filter(pa.compute.is_in(table[S.UID], value_set=kept))
    return table


def _order(selected: pa.Table, seed: int | None) -> np.ndarray:
    if seed is None:
        return np.arange(selected.num_rows)
    from pipeline.sampling import uid_to_uint64, uniform

    draws = uniform(uid_to_uint64(selected[S.UID]), np.uint64(_EXPORT_KEY), seed)
    return np.lexsort((selected[S.UID].to_numpy(zero_copy_only=False), draws))


def _plan_shards(sizes: np.ndarray, per_shard: int, max_bytes: int | None) -> list[tuple[int, int]]:
    """[start, end) of each output shard over the ordered samples."""
    bounds, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        # a tar ends with two zero blocks and is padded to 10 KiB records
        full = max_bytes and -(-(total + size + 1024) // 10240) * 10240 > max_bytes
        if i > start and (i - start >= per_shard or full):
            bounds.append((start, i))
            start, total = i, 0
        total += int(size)
    if start < len(sizes):
        bounds.append((start, len(sizes)))
    return bounds


def _member_index(pool: Pool, shard: int) -> dict[str, dict[str, tuple[int, int]]]:
    """Key -> extension -> (data offset, size) of every member of a source tar (names checked as
    the safe reader checks them)."""
    path = pool.shard_tar(shard)
    members: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(path, mode="r:") as tar:
        for m in tar.getmembers():
            _check_name(path, m.name)
            if m.isfile():
                key, ext = _split(m.name)
                members.setdefault(key, {})[ext] = (m.offset_data, m.size)
    return members


def _locate(pool: Pool, shards: list[int], keys: list[str]) -> list[list[dict[str, Any]]]:
    """Where each selected sample's members lie, indexing each source tar once. The plan carries
    this, so writing an output shard costs one seek per member and never rescans a tar."""
    index: dict[int, dict[str, dict[str, tuple[int, int]]]] = {}
    out = []
    for shard, key in zip(shards, keys, strict=True):
        if shard not in index:
            index[shard] = _member_index(pool, shard)
        if key not in index[shard]:
            raise ExportError(f"{pool.shard_tar(shard)}: sample {key!r} is in the download table but not the tar")
        out.append([{"ext": ext, "offset": o, "size": n} for ext, (o, n) in sorted(index[shard][key].items())])
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


def write_release_shard(pool_root: str, partial: str, starts: list[int], index: int) -> dict[str, int]:
    """Write output shard ``index`` (tar, then embeddings, then the sidecar that marks it done)
    from row group ``index`` of the export plan. Runs anywhere the pool and release are visible."""
    partial_dir = Path(partial)
    plan = pq.ParquetFile(partial_dir / "plan.parquet").read_row_group(index)
    shards, keys, uids, located = (plan[c].to_pylist() for c in ("_source_shard", "_source_key", "_uid", "_members"))
    first = starts[index]
    new_keys = [f"{first + i:09d}" for i in range(plan.num_rows)]
    name = f"{index:05d}"
    reader = _Reader(Pool(pool_root))
    try:
        with (
            atomic_path(partial_dir / f"{name}.tar") as tmp,
            tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tar,
        ):
            for key, shard, source_key, uid, members in zip(new_keys, shards, keys, uids, located, strict=True):
                for member in members:
                    ext, data = member["ext"], reader.read(shard, member["offset"], member["size"])
                    if ext == "json":
                        meta = json.loads(data)
                        meta.update({S.UID: uid, "source_shard": shard, "source_key": source_key})
                        data = json.dumps(meta, sort_keys=True).encode()
                    elif ext not in IMAGE_EXTENSIONS and ext != "txt":
                        continue
                    _add(tar, f"{key}.{ext}", data)
    finally:
        reader.close()
    renames = {S.KEY: "source_key", S.SHARD: "source_shard"}
    side = [c for c in plan.column_names if c.startswith("side.")]
    part = plan.select(side).rename_columns([renames.get(c[5:], c[5:]) for c in side])
    part = part.add_column(0, S.KEY, pa.array(new_keys))
    emb = [c for c in plan.column_names if c.startswith("emb.")]
    if emb:
        write_parquet_atomic(partial_dir / "embeddings" / f"{name}.parquet",
                             plan.select(emb).rename_columns([c[4:] for c in emb]))  # fmt: skip
    write_parquet_atomic(partial_dir / f"{name}.parquet", part)
    return {"samples": plan.num_rows}


def export(pool: Pool, cfg: ExportConfig, progress: bool = False, engine: Any = None) -> dict[str, Any]:
    """Write the release ``cfg`` describes (module docstring); returns its manifest.

    With an ``engine`` (local processes or Spark), the output shards are written in parallel, one
    task each; without one, in this process. The bytes are the same either way."""
    from pipeline.query import connect

    out = Path(cfg.out)
    con = connect(pool)
    selected = select(pool, cfg.where, cfg.recipe, cfg.recipes, con)
    order = _order(selected, cfg.shuffle_seed)
    selected = selected.take(pa.array(order))
    uids = selected[S.UID].to_pylist()
    digest = hashlib.sha256(json.dumps([config_hash(cfg, exclude=("out",)), uids]).encode()).hexdigest()[:16]
    if (out / "manifest.json").exists() and json.loads((out / "manifest.json").read_text()).get("digest") == digest:
        return json.loads((out / "manifest.json").read_text())  # this very release is already there
    partial = out.parent / f".{out.name}.partial"
    if (partial / "plan.json").exists() and json.loads((partial / "plan.json").read_text()).get("digest") != digest:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    write_json_atomic(partial / "plan.json", {"digest": digest})

    shards, keys = selected[S.SHARD].to_pylist(), selected[S.KEY].to_pylist()
    located = _locate(pool, shards, keys)
    sizes = np.array([_output_size(m) for m in located], dtype=np.int64)
    bounds = _plan_shards(sizes, cfg.samples_per_shard, cfg.max_shard_bytes)
    side_cols = [r[0] for r in con.execute("describe samples").fetchall() if r[0] not in EMBEDDING_COLUMNS]
    con.register("export_order", pa.table({S.UID: uids, "_pos": pa.array(range(len(uids)), pa.int64())}))
    quoted = ", ".join(f's."{c}"' for c in side_cols)
    sidecar = con.sql(f"select o._pos, {quoted} from export_order o join samples s using ({S.UID}) "
                      "order by o._pos").fetch_arrow_table().drop(["_pos"])  # fmt: skip
    embeddings = None
    if cfg.embeddings:
        sql = (f"select o._pos, e.{S.UID}, e.{S.IMAGE_EMBEDDING}, e.{S.TEXT_EMBEDDING} from export_order o "
               f"left join embed e using ({S.UID}) order by o._pos")  # fmt: skip
        embeddings = con.sql(sql).fetch_arrow_table().drop(["_pos"])
    # The plan: one Parquet row group per output shard (source shard/key, uid, sidecar columns,
    # embeddings), so each output shard is an independent task for the engine.
    plan = pa.table({"_source_shard": pa.array(shards, pa.int32()), "_source_key": keys, "_uid": uids,
                     "_members": located})  # fmt: skip
    for name in sidecar.column_names:
        plan = plan.append_column(f"side.{name}", sidecar[name])
    if embeddings is not None:
        for name in embeddings.column_names:
            plan = plan.append_column(f"emb.{name}", embeddings[name])
    plan_path = partial / "plan.parquet"
    with atomic_path(plan_path) as tmp, pq.ParquetWriter(tmp, plan.schema) as writer:
        for a, b in bounds:
            writer.write_table(plan.slice(a, b - a), row_group_size=max(1, b - a))
    todo = [i for i in range(len(bounds)) if not (partial / f"{i:05d}.parquet").exists()]
    fn = functools.partial(write_release_shard, str(pool.root), str(partial), [a for a, _ in bounds])
    if engine is None:
        for index in todo:
            fn(index)
    else:
        from pipeline.engines.base import run_shards

        run_shards(pool, engine, fn, todo, desc="export", progress=progress)
    entries = []
    for index, (a, b) in enumerate(bounds):
        tar_path = partial / f"{index:05d}.tar"
        entries.append({"name": tar_path.name, "samples": b - a, "bytes": tar_path.stat().st_size,
                        "sha256": file_sha256(tar_path)})  # fmt: skip
    plan_path.unlink()
    # open_clip_train's get_dataset_size reads sizes.json: --train-num-samples becomes optional
    write_json_atomic(partial / "sizes.json", {e["name"]: e["samples"] for e in entries})
    manifest = _manifest(pool, cfg, digest, entries, len(uids))
    write_json_atomic(partial / "manifest.json", manifest)
    with atomic_path(partial / "README.md") as tmp:
        tmp.write_text(dataset_card(pool, cfg, manifest))
    (partial / "plan.json").unlink()
    if out.exists():
        trash = out.parent / f".{out.name}.old"
        shutil.rmtree(trash, ignore_errors=True)
        out.rename(trash)
        partial.rename(out)
        shutil.rmtree(trash)
    else:
        partial.rename(out)
    return manifest


def _manifest(pool: Pool, cfg: ExportConfig, digest: str, entries: list[dict], n: int) -> dict[str, Any]:
    pool_manifest = pool.update_manifest()
    last = len(entries) - 1
    return {
        "digest": digest,
        "source_pool": str(pool.root.resolve()),
        "where": cfg.where,
        "recipe": cfg.recipe,
        "export_config": dataclasses.asdict(cfg),
        "export_config_hash": config_hash(cfg),
        "pool_config_hashes": {s: e["config_hash"] for s, e in pool_manifest["stages"].items()},
        "counts": {
            "samples": n,
            "shards": len(entries),
            "bytes": sum(e["bytes"] for e in entries),
            "pool_samples": (pool_manifest["input"] or {}).get("num_rows"),
        },
        "shards": entries,
        "train_data": f"{{00000..{last:05d}}}.tar" if entries else None,
        "package_versions": package_versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def dataset_card(pool: Pool, cfg: ExportConfig, manifest: dict[str, Any]) -> str:
    """The release's README.md: what it holds, how it was selected, the funnel, how to train."""
    counts = manifest["counts"]
    lines = [f"# {Path(cfg.out).name}", "", "A CLIP training subset exported by clipcurate.", "",
             f"- samples: {counts['samples']} of {counts['pool_samples']} in the pool `{manifest['source_pool']}`",
             f"- shards: {counts['shards']} ({counts['bytes'] / 2**20:.1f} MiB), each `NNNNN.tar` with a "
             "`NNNNN.parquet` sidecar" + (", embeddings in `embeddings/`" if cfg.embeddings else ""),
             f"- selection: `{cfg.where or 'all downloaded samples'}`"
             + (f", recipe `{cfg.recipe}`" if cfg.recipe else ""),
             f"- order: {'shuffled, seed ' + str(cfg.shuffle_seed) if cfg.shuffle_seed is not None else 'pool order'}",
             "", "## Pool funnel", "", "| stage | samples it keeps (each stage alone) |", "|---|---:|"]  # fmt: skip
    stages = json.loads(pool.manifest_path.read_text())["stage_results"] if pool.manifest_path.exists() else {}
    plan = pool.read_plan() or {}
    lines.append(f"| input rows | {plan.get('num_rows', '?')} |")
    for name, key, label in (("metaclip", "samples_kept", "MetaCLIP balanced"), ("decisions", "kept", "filter recipe"),
                             ("rebalance", "kept", "rebalanced")):  # fmt: skip
        if name in stages and key in stages[name]:
            lines.append(f"| {label} | {stages[name][key]} |")
    lines.append(f"| **this release** | **{counts['samples']}** |")
    decisions = stages.get("decisions")
    if decisions:
        lines += ["", f"Filter recipe `{decisions['recipe']}`, samples left after each rule:", "",
                  "| rule | left |", "|---|---:|"]  # fmt: skip
        lines += [f"| `{f['rule']}` | {f['left']} |" for f in decisions["funnel"]]
    last = counts["shards"] - 1
    lines += ["", "## Training with open_clip", "", "```bash",
              "python -m open_clip_train.main --dataset-type webdataset "
              f"--train-data 'release/{{00000..{last:05d}}}.tar' --train-num-samples {counts['samples']} ...",
              "```", "",
              "Every shard's sha256 is in `manifest.json`."]  # fmt: skip
    return "\n".join(lines) + "\n"
