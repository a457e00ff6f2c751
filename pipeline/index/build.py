"""``curate index POOL``: a faiss index of a pool's image (or caption) embeddings, built per shard.

The index lives in ``<pool>/index/<space>/`` and is one of two kinds, by the pool's size:

- ``flat``: an exact inner-product search (faiss ``IndexFlatIP`` over the L2-normalised vectors)
  while the pool holds at most ``exact_below`` vectors (its memory is then bounded by that);
- ``ivf``: ``IVF{nlist},SQ8``: an inverted file whose coarse quantizer and 8-bit scalar quantizer
  are trained on a bounded uid-hash sample (:mod:`pipeline.core.vectors`: the same sample on any
  engine), each shard's vectors encoded by its own engine task into a part, and the parts merged
  into inverted lists on disk (faiss's ``merge_ondisk``, the way faiss builds billion-scale
  indexes and autofaiss its large ones). Search memory-maps the lists; building holds one shard
  per task and the training sample in the driver, whatever the pool's size. SQ8 rather than PQ:
  one byte per dimension keeps recall close to exact search (docs/benchmarks.md), at ``dim`` bytes
  a vector on disk.

Every vector's faiss id is ``shard << 32 | position`` (its place among the shard's rows with a vector,
in the download table's order); ``ids/{shard}.parquet`` maps positions back to uids.

What a build depends on is recorded in ``index.json``: per shard, the version of its embeddings
(the embed marker's digest and its table's sha256), and the trained quantizer's digest. A re-run
encodes again only the shards whose embeddings changed or are new (a grown pool), and merges again
only the segments holding them, reusing the trained quantizer while the pool's size asks for about
the same number of lists (within 2x); otherwise it trains again and re-encodes every shard. The
merged files are written under new names (a segment's digest),
``index.json`` is replaced last, and only then are the files of the previous build deleted, each
by the name ``index.json`` listed (or had announced as ``pending`` before a killed build made them).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline.store import schema as S
from pipeline.store.parquet import Pool, shard_name, write_json_atomic, write_parquet_atomic

# a space: the stage whose table holds the vectors, and the column
SPACES = {"image": ("embed", S.IMAGE_EMBEDDING), "caption": ("caption_embed", S.CAPTION_EMBEDDING)}
EXACT_BELOW = 50_000  # vectors: an exact index up to this many (at most 200 MB of float32 at 1024 dims)
SEGMENT_ROWS = 1_000_000  # vectors per merged segment (its merge maps about 1 GB at 512 dims)
MAX_TRAIN = 100_000  # vectors in the training sample (fixed: the driver's memory does not grow with the pool)
ID_SHIFT = 32


class IndexUnavailable(UserError):
    """The pool has no index, or no embeddings, for what was asked; the message says what to run."""


@contextlib.contextmanager
def faiss_quiet() -> Iterator[None]:
    """faiss's on-disk inverted lists print progress with C's printf to standard output (where
    ``curate search --json`` writes its rows): for the block, file descriptor 1 goes to standard error."""
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def index_dir(pool: Pool, space: str) -> Path:
    return pool.root / "index" / space


def read_manifest(pool: Pool, space: str) -> dict[str, Any] | None:
    path = index_dir(pool, space) / "index.json"
    return json.loads(path.read_text()) if path.exists() else None


def shard_version(marker: dict[str, Any]) -> str:
    """What a shard's embeddings are, by its marker: the stage digest and the sha256 of its files."""
    blob = marker["config_hash"] + "".join(sorted(f["sha256"] for f in marker.get("files", {}).values()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def nlist_for(rows: int) -> int:
    """Inverted lists for ``rows`` vectors: about 4 sqrt(rows) (faiss's guideline), a power of two,
    and at least 39 training vectors per list from the sample."""
    want = 2 ** round(math.log2(max(4 * math.sqrt(max(rows, 1)), 16)))
    return int(max(16, min(want, MAX_TRAIN // 39)))


def _sample_task(pool_root: str, stage: str, column: str, out_dir: str, rate: float, shard: int) -> int:
    from pipeline.core.vectors import drawn, shard_vectors, write_sample

    table = shard_vectors(Pool(pool_root), stage, column, shard)
    keep = drawn(table[S.UID], key=0x1DE7, seed=0, rate=rate)
    return write_sample(Path(out_dir), shard, table[S.UID].filter(pa.array(keep)),
                        table[column].filter(pa.array(keep)))  # fmt: skip


def _part_task(pool_root: str, space: str, kind: str, shard: int) -> int:
    """Encode one shard: ``ids/{shard}.parquet`` (uid per position; for a flat index the vectors
    too) and, for an IVF index, ``parts/{shard}.index`` (the trained index with the shard's vectors)."""
    import faiss

    from pipeline.core.vectors import as_float32, shard_vectors

    pool = Pool(pool_root)
    stage, column = SPACES[space]
    folder = index_dir(pool, space)
    table = shard_vectors(pool, stage, column, shard)
    x = as_float32(table[column])
    if not np.isfinite(x).all():
        raise UserError(f"{pool.table_path(stage, shard)}: {column} holds a value that is not finite; "
                        f"run `curate embed` again for shard {shard_name(shard)}")  # fmt: skip
    ids = (np.int64(shard) << ID_SHIFT) + np.arange(len(x), dtype=np.int64)
    columns = {S.UID: table[S.UID], "id": pa.array(ids)}
    if kind == "flat":
        columns["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    write_parquet_atomic(folder / "ids" / f"{shard_name(shard)}.parquet", pa.table(columns))
    if kind == "ivf":
        index = faiss.read_index(str(folder / "trained.index"))
        index.add_with_ids(x, ids)
        part = folder / "parts" / f"{shard_name(shard)}.index"
        part.parent.mkdir(parents=True, exist_ok=True)
        tmp = part.with_name(f".{part.name}.tmp")
        faiss.write_index(index, str(tmp))
        os.replace(tmp, part)
    return len(x)


def build_index(pool: Pool, engine: Any, space: str = "image", exact_below: int = EXACT_BELOW,
                segment_rows: int = SEGMENT_ROWS, progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Build or bring up to date the ``space`` index of ``pool`` (module docstring).

    Returns:
        The index's manifest (``index.json``), with ``encoded``: the shards encoded by this run, and
        ``merged``: the segments merged by it.

    Raises:
        IndexUnavailable: the pool has no finished shard of the space's stage.
    """
    from pipeline.core import runner

    if space not in SPACES:
        raise IndexUnavailable(f"unknown index space {space!r}; one of {', '.join(SPACES)}")
    stage, column = SPACES[space]
    markers = pool.completed(stage)
    if not markers:
        raise IndexUnavailable(f"{pool.root}: no finished {stage} shard to index; run `curate embed` first")
    folder = index_dir(pool, space)
    old = read_manifest(pool, space) or {}
    _remove_pending(folder, old)
    versions = {s: shard_version(m) for s, m in sorted(markers.items())}
    rows = sum(int(m["counts"].get("samples", 0)) for m in markers.values())
    kind = "flat" if rows <= exact_below else "ivf"
    dim = pool.declared_schema(stage, pool.table_path(stage, min(markers))).field(column).type.list_size
    model = (pool.stage_config(stage) or {}).get("config_hash", "")
    trained = _trained(pool, engine, old, kind, rows, dim, model, stage, column, progress)
    reuse = old.get("trained") == trained["digest"]
    due = [s for s, v in versions.items() if not reuse or (old.get("shards") or {}).get(str(s)) != v]
    fn = functools.partial(_part_task, str(pool.root), space, kind)
    counts = runner.collect(engine, fn, due, desc=f"index {space}", progress=progress)
    sizes = {int(s): n for s, n in (old.get("sizes") or {}).items() if reuse}
    sizes.update(counts)
    sizes = {s: sizes[s] for s in versions}
    segments = _segments(kind, trained["digest"], versions, sizes, segment_rows)
    files = [f for seg in segments for f in seg["files"]]
    digest = hashlib.sha256(json.dumps([seg["digest"] for seg in segments]).encode()).hexdigest()[:16]
    manifest = {"space": space, "stage": stage, "column": column, "kind": kind, "dim": dim, "model": model,
                "trained": trained["digest"], "nlist": trained.get("nlist"), "factory": trained.get("factory"),
                "trained_rows": trained.get("trained_rows"), "digest": digest, "rows": int(sum(sizes.values())),
                "shards": {str(s): v for s, v in versions.items()}, "sizes": {str(s): n for s, n in sizes.items()},
                "segments": segments, "files": files, "built_at": time.time()}  # fmt: skip
    todo = [i for i, seg in enumerate(segments) if not all((folder / f).exists() for f in seg["files"])]
    if todo:
        write_json_atomic(folder / "index.json", {**old, "pending": files})  # a killed build's files are ours
        merge = functools.partial(_merge_segment, str(folder), kind, dim, segments)
        runner.collect(engine, merge, todo, desc=f"index {space} merge", progress=progress)
    write_json_atomic(folder / "index.json", manifest)
    _remove_unlisted(folder, old, manifest, versions)
    return {**manifest, "encoded": due, "merged": todo}


def _segments(kind: str, trained: str, versions: dict[int, str], sizes: dict[int, int],
              segment_rows: int) -> list[dict[str, Any]]:  # fmt: skip
    """The shards in order, cut into segments of at most ``segment_rows`` vectors (a shard larger
    than that alone); a flat index is one segment. Each segment's files are named by its digest
    (the trained quantizer and its shards' versions), so only a segment whose shards changed, or a
    new one, is merged again."""
    groups: list[list[int]] = [[]]
    held = 0
    for shard in versions:
        if kind == "ivf" and groups[-1] and held + sizes[shard] > segment_rows:
            groups.append([])
            held = 0
        groups[-1].append(shard)
        held += sizes[shard]
    out = []
    for shards in groups:
        digest = hashlib.sha256(json.dumps([trained, [(s, versions[s]) for s in shards]]).encode()).hexdigest()[:16]
        files = [f"seg-{digest}.index", f"seg-{digest}.ivfdata"] if kind == "ivf" else [f"flat-{digest}.index"]
        out.append({"shards": shards, "digest": digest, "files": files})
    return out


def _trained(pool: Pool, engine: Any, old: dict[str, Any], kind: str, rows: int, dim: int, model: str,
             stage: str, column: str, progress: bool) -> dict[str, Any]:  # fmt: skip
    """The trained quantizer (``trained.index``) of an IVF index: the previous one while the pool's
    size asks for about the same number of lists and the model is the same, else one trained now on
    a uid-hash sample of at most ``MAX_TRAIN`` vectors."""
    if kind == "flat":
        return {"digest": f"flat|{dim}|{model}"}
    if (old.get("kind") == "ivf" and old.get("model") == model and old.get("dim") == dim
            and 0.5 <= nlist_for(rows) / nlist_for(old["trained_rows"]) <= 2):  # fmt: skip
        return {key: old[key] for key in ("nlist", "factory", "trained_rows")} | {"digest": old["trained"]}
    import faiss

    from pipeline.core.vectors import fit_sample, sample_rate

    folder = index_dir(pool, SPACES_BY_STAGE[stage])
    sample_dir = folder / "_sample"
    rate = sample_rate(MAX_TRAIN, rows)
    task = functools.partial(_sample_task, str(pool.root), stage, column, str(sample_dir), rate)
    _, x = fit_sample(pool, engine, task, pool.done_shards(stage), sample_dir, desc="index sample", by_uid=True,
                      progress=progress)  # fmt: skip
    nlist = min(nlist_for(rows), max(1, len(x) // 39))
    factory = f"IVF{nlist},SQ8"
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(x))
    tmp = folder / ".trained.index.tmp"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, folder / "trained.index")
    for part in sample_dir.glob("*.parquet"):
        part.unlink()
    sample_dir.rmdir()
    digest = hashlib.sha256(f"{factory}|{dim}|{model}|{time.time_ns()}".encode()).hexdigest()[:16]
    return {"digest": digest, "nlist": nlist, "factory": factory, "trained_rows": rows}


SPACES_BY_STAGE = {stage: space for space, (stage, _) in SPACES.items()}


def _merge_segment(folder: str, kind: str, dim: int, segments: list[dict[str, Any]], i: int) -> int:
    """One segment's searchable index from its shards' parts (an engine task: its memory is the
    segment's, set by ``segment_rows``): the IVF parts merged into inverted lists on disk, or the
    flat index's vectors added from the id files."""
    import faiss

    base, seg = Path(folder), segments[i]
    if kind == "ivf":
        index = faiss.read_index(str(base / "trained.index"))
        with faiss_quiet():
            _merge_ondisk(index, [str(base / "parts" / f"{shard_name(s)}.index") for s in seg["shards"]],
                          str(base / seg["files"][1]))  # fmt: skip
            faiss.write_index(index, str(base / seg["files"][0]))
        return int(index.ntotal)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    for shard in seg["shards"]:
        table = pq.read_table(base / "ids" / f"{shard_name(shard)}.parquet", columns=["id", "vector"])
        if table.num_rows:
            x = S.vectors(table["vector"].combine_chunks()).astype(np.float32)
            index.add_with_ids(np.ascontiguousarray(x), table["id"].to_numpy())
    tmp = base / f".{seg['files'][0]}.tmp"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, base / seg["files"][0])
    return int(index.ntotal)


def _merge_ondisk(index: Any, parts: list[str], ivfdata: str) -> None:
    """faiss's ``contrib.ondisk.merge_ondisk``, except that the parts' memory-mapped inverted lists
    are released afterwards: faiss's helper disowns them (``own_invlists = False``), so in an engine
    worker that merges several segments their mappings accumulate (the worker's peak grew with the
    pool: 0.69 GiB at 1M, 1.38 GiB at 4M, 250k-vector segments). Here the parts stay owned by their
    indexes, alive until the merge is done, and are unmapped when those go."""
    import faiss

    opened = [faiss.read_index(path, faiss.IO_FLAG_MMAP) for path in parts]
    lists = faiss.InvertedListsPtrVector()
    for part in opened:
        lists.push_back(faiss.extract_index_ivf(part).invlists)
    ivf = faiss.extract_index_ivf(index)
    merged = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, ivfdata)
    ntotal = merged.merge_from_multiple(lists.data(), lists.size(), False)
    index.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(merged, True)
    merged.this.disown()  # the index owns it now
    del lists, opened


def _remove_pending(folder: Path, old: dict[str, Any]) -> None:
    """Files a killed build announced (``pending``) and never listed as its result."""
    for name in set(old.get("pending") or []) - set(old.get("files") or []):
        (folder / name).unlink(missing_ok=True)


def _remove_unlisted(folder: Path, old: dict[str, Any], new: dict[str, Any], versions: dict[int, str]) -> None:
    """The previous build's merged files, and the parts and id files of shards no longer indexed:
    each by a name a manifest of ours listed."""
    for name in set(old.get("files") or []) - set(new["files"]):
        (folder / name).unlink(missing_ok=True)
    for shard in {int(s) for s in old.get("shards") or {}} - set(versions):
        for path in (folder / "parts" / f"{shard_name(shard)}.index", folder / "ids" / f"{shard_name(shard)}.parquet"):
            path.unlink(missing_ok=True)
