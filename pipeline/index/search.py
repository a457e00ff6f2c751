"""``curate search POOL (--uid U | --image FILE | --text "...") [-k 20] [--where SQL]``.

A query is a vector in the index's space: a sample's own stored embedding (``--uid``), or a text or
an image encoded by the model the pool recorded for that space, loaded from its local checkpoint
(checked against the sha256 the pool recorded; never downloaded). A pool whose vectors were
imported (DataComp's, clip-retrieval's) has no checkpoint to encode a new query with, and such a
query is refused by name; ``--uid`` still works.

``--where`` keeps only samples a predicate over the ``samples`` view selects: the predicate is one
SQL expression checked by :mod:`pipeline.sqlsafe` and run on the confined connection. The index is
asked for more neighbours until ``k`` pass it (or every indexed vector was asked for).

Search reads the pool and never writes into it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.index.build import (
    ID_SHIFT,
    SPACES,
    IndexUnavailable,
    faiss_quiet,
    index_dir,
    read_manifest,
    shard_version,
)
from pipeline.store import schema as S
from pipeline.store.parquet import Pool, shard_name

NPROBE = 32  # inverted lists visited per query (IVF): recall against latency, docs/benchmarks.md


class Searcher:
    """An opened index of one space: ``search(vectors, k)`` -> uids and scores per query."""

    def __init__(self, pool: Pool, space: str = "image", nprobe: int = NPROBE):
        import faiss

        manifest = read_manifest(pool, space)
        if manifest is None:
            raise IndexUnavailable(f"{pool.root}: no {space} index; run `curate index {pool.root}` first")
        self.pool, self.space, self.manifest = pool, space, manifest
        folder = index_dir(pool, space)
        self.segments = []
        for segment in manifest.get("segments") or [{"files": manifest["files"]}]:
            path = str(folder / segment["files"][0])
            if manifest["kind"] == "ivf":  # the inverted lists stay on disk, memory-mapped beside the index file
                with faiss_quiet():
                    index = faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR)
                faiss.extract_index_ivf(index).nprobe = nprobe
            else:
                index = faiss.read_index(path)
            self.segments.append(index)
        self.ntotal = sum(index.ntotal for index in self.segments)
        self._uids: dict[int, pa.Array] = {}

    def stale(self) -> str | None:
        """A line when the pool's embeddings have changed since the index was built, else None."""
        markers = self.pool.completed(self.manifest["stage"])
        now = {str(s): shard_version(m) for s, m in markers.items()}
        if now == self.manifest["shards"]:
            return None
        new = len(set(now) - set(self.manifest["shards"]))
        changed = sum(1 for s, v in now.items() if s in self.manifest["shards"] and self.manifest["shards"][s] != v)
        return (f"note: the {self.space} index predates {new} new and {changed} changed shard(s) of "
                f"{self.manifest['stage']}; run `curate index {self.pool.root}` to include them")  # fmt: skip

    def uids(self, ids: np.ndarray) -> list[str | None]:
        out: list[str | None] = []
        for i in ids.tolist():
            if i < 0:
                out.append(None)
                continue
            shard, pos = i >> ID_SHIFT, i & ((1 << ID_SHIFT) - 1)
            if shard not in self._uids:
                path = index_dir(self.pool, self.space) / "ids" / f"{shard_name(shard)}.parquet"
                self._uids[shard] = pq.read_table(path, columns=[S.UID])[S.UID].combine_chunks()
            out.append(self._uids[shard][pos].as_py())
        return out

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest indexed vectors (inner product of unit vectors) of each row of ``x``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        k = max(1, min(k, self.ntotal))
        found = [index.search(x, k) for index in self.segments]
        if len(found) == 1:
            return found[0][1], found[0][0]
        scores = np.concatenate([f[0] for f in found], axis=1)  # each segment's best k, then the best of them
        ids = np.concatenate([f[1] for f in found], axis=1)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(ids, best, axis=1), np.take_along_axis(scores, best, axis=1)


def query_vector(pool: Pool, space: str, uid: str | None = None, text: str | None = None,
                 image: str | None = None, con: Any = None) -> np.ndarray:  # fmt: skip
    """The query as a ``(1, dim)`` vector (module docstring). ``con``: an open connection to the
    pool's views to find ``uid``'s shard with (the browser's, under its lock); else one is opened."""
    stage, column = SPACES[space]
    if uid is not None:
        from pipeline.core.vectors import as_float32

        own = con is None
        con = connect(pool) if own else con
        try:
            found = con.execute(f"select shard from {stage} where uid = ?", [uid]).fetchall()
        finally:
            if own:
                con.close()
        if not found:
            raise IndexUnavailable(f"--uid {uid}: no such sample with a {stage} row in {pool.root}")
        table = pool.read_shard(stage, found[0][0], columns=[S.UID, column])
        row = table.filter(pa.compute.equal(table[S.UID], uid))
        if row[column].null_count:
            raise IndexUnavailable(f"--uid {uid}: the sample has no {column} (its image did not decode)")
        return as_float32(row[column])
    return _encoded(pool, stage, text=text, image=image)


def _encoded(pool: Pool, stage: str, text: str | None, image: str | None) -> np.ndarray:
    """A text or an image encoded by the pool's recorded model for ``stage``, from its checkpoint."""
    from pipeline.config import EmbedConfig
    from pipeline.embed.stage import ClipEmbedder, checkpoint_sha256

    recorded = (pool.stage_config("embed") or {}).get("config") or {}
    what = "--text" if text is not None else "--image"
    if recorded.get("source") or not recorded.get("checkpoint"):
        raise IndexUnavailable(f"{what}: {pool.root}'s embeddings were imported, not computed from a local "
                               "checkpoint, so a new query cannot be encoded in their space; search with --uid")
    if stage == "caption_embed" and recorded.get("caption_model") != "clip":
        raise IndexUnavailable(f"{what}: the caption index holds {recorded.get('caption_model')} vectors; search "
                               "the image index (--space image) with CLIP's text tower instead")  # fmt: skip
    checkpoint = Path(recorded["checkpoint"])
    if not checkpoint.is_file():
        raise IndexUnavailable(f"{what}: the pool's checkpoint {checkpoint} is not there; copy it back to encode")
    if checkpoint_sha256(checkpoint) != recorded.get("checkpoint_sha256"):
        raise IndexUnavailable(f"{what}: {checkpoint} is not the checkpoint the pool was embedded with "
                               "(its sha256 differs)")  # fmt: skip
    embedder = ClipEmbedder(EmbedConfig(model=recorded["model"], checkpoint=str(checkpoint))).setup()
    if text is not None:
        return embedder.encode_texts([text])
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as img:
            pixels = embedder.preprocess(img.convert("RGB")).unsqueeze(0)
    except (OSError, UnidentifiedImageError) as exc:
        raise IndexUnavailable(f"--image {image}: cannot read it as an image ({exc})") from None
    return embedder.encode_images(pixels)


def search(pool: Pool, vector: np.ndarray, k: int = 20, where: str | None = None, space: str = "image",
           searcher: Searcher | None = None, con: Any = None) -> pa.Table:  # fmt: skip
    """The ``k`` nearest samples to ``vector`` that ``where`` selects: ``rank``, ``uid``, ``score``
    (cosine similarity), ``caption``. ``searcher`` and ``con`` (a confined connection,
    :func:`connect`): an opened index and connection to reuse across queries."""
    from pipeline.sqlsafe import check_expression

    searcher = searcher or Searcher(pool, space)
    if where is not None:
        check_expression(where, "--where")
    own = con is None
    con = connect(pool) if own else con
    try:
        ask, total = k if where is None else 4 * k, searcher.ntotal
        while True:
            ids, scores = searcher.search(vector, ask)
            found = [(u, float(sc), int(i) >> ID_SHIFT) for u, sc, i in
                     zip(searcher.uids(ids[0]), scores[0], ids[0], strict=True) if u is not None]  # fmt: skip
            kept = _selected(con, found, where)
            hits = [hit for hit in found if hit[0] in kept][:k]
            if len(hits) >= k or ask >= total:
                break
            ask = min(4 * ask, total)
        captions = _captions(con, hits)
    finally:
        if own:
            con.close()
    return pa.table({"rank": pa.array(range(1, len(hits) + 1), pa.int32()), S.UID: [h[0] for h in hits],
                     "score": pa.array([h[1] for h in hits], pa.float32()),
                     S.CAPTION: [captions.get(h[0]) for h in hits]})  # fmt: skip


def _in_shards(hits: list[tuple[str, float, int]]) -> str:
    """``shard in (...)`` of the hits' shards (whole numbers from the index's ids): DuckDB then reads
    only those shards' files, by their statistics, instead of the whole pool."""
    return f"shard in ({', '.join(str(s) for s in sorted({h[2] for h in hits}) or [-1])})"


def connect(pool: Pool) -> Any:
    """The pool's views on a confined connection (user SQL runs on it: :func:`pipeline.query.connect`)."""
    from pipeline.query import connect as views

    return views(pool, confined=True)


def _selected(con: Any, hits: list[tuple[str, float, int]], where: str | None) -> set[str]:
    if where is None:
        return {h[0] for h in hits}
    import duckdb

    from pipeline.errors import UserError

    try:
        rows = con.execute(f"select uid from samples where {_in_shards(hits)} and uid in (select unnest(?)) "
                           f"and ({where})", [[h[0] for h in hits]]).fetchall()  # fmt: skip
    except duckdb.Error as exc:
        raise UserError(f"--where {where!r}: {str(exc).splitlines()[0]}") from None
    return {u for (u,) in rows}


def _captions(con: Any, hits: list[tuple[str, float, int]]) -> dict[str, str | None]:
    rows = con.execute(f"select uid, caption from download where {_in_shards(hits)} and uid in (select unnest(?))",
                       [[h[0] for h in hits]]).fetchall()  # fmt: skip
    return dict(rows)
