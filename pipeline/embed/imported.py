"""Published embeddings imported as the ``embed`` and ``caption_embed`` tables, instead of computed.

Two published layouts:

- **DataComp** (``format: datacomp``): the pool's metadata folder, ``*.parquet`` (``uid``, ...,
  ``clip_b32_similarity_score``, ``clip_l14_similarity_score``) with an ``.npz`` of the same stem
  beside each, holding ``l14_img``, ``l14_txt``, ``b32_img`` and ``b32_txt`` row-aligned with the
  Parquet file. Joined on ``uid`` (DataComp's own tools do the same), so the pool must keep
  DataComp's uids (``download.uid_col: uid``).
- **clip-retrieval** (``format: clip-retrieval``; LAION's released embeddings use it too):
  ``img_emb/img_emb_N.npy``, ``text_emb/text_emb_N.npy`` and ``metadata/metadata_N.parquet``,
  row-aligned part by part. Joined on row order: the pool's ``row`` is the row of ``metadata/`` taken
  as one list (files in name order, as embedding-reader reads the ``.npy`` parts), so the pool is
  prepared from that folder (``download.input: <folder>/metadata``). Where the metadata has a URL
  column, each shard checks that its URLs are the metadata's at those rows.

``clip_score`` is the published score of the chosen model where the layout has one (DataComp's
``clip_<key>_similarity_score``, on the same cosine scale), else the cosine of the two vectors.
Vectors are L2-normalised and stored as float16, like computed ones. A sample whose uid (or row)
has no published vector gets null embeddings and the ``decode_error`` ``no published embedding``,
so the implicit ``decoded`` rule drops it, as an undecodable image is dropped.

Scale: nothing holds the pool. The DataComp join is SQL: one task per metadata file writes
``(uid, file, row, score)`` from the uid column, the engine joins it with the download table sorted
by shard, and one task per pool shard reads its rows and gathers their vectors by memory-mapping the
``.npz`` members (``np.savez`` stores them uncompressed; a compressed member is read whole, which a
file's size bounds, never the pool's). The clip-retrieval import reads each shard's row range
through embedding-reader.
"""

from __future__ import annotations

import functools
import hashlib
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import EmbedConfig, EmbedSourceConfig
from pipeline.core import runner
from pipeline.core.step import BY_SHARD, Read, Step
from pipeline.core.vectors import unit_rows
from pipeline.embed.captions import STAGE, CaptionEmbed
from pipeline.errors import UserError
from pipeline.store import schema as S
from pipeline.store.parquet import Pool, write_parquet_atomic

_CHUNK = 8192  # rows normalised at a time (float32): a worker holds a shard's vectors once, as published
MISSING = "no published embedding"
NON_FINITE = "published embedding is not finite (NaN or Inf)"
# DataComp's keys: (the model that made them, its published score column, its dimension)
DATACOMP = {"l14": ("ViT-L-14", "clip_l14_similarity_score", 768),
            "b32": ("ViT-B-32", "clip_b32_similarity_score", 512)}  # fmt: skip


class EmbeddingImportError(UserError, ValueError):
    """Published embeddings that cannot be imported; the message names the file."""


# --- reading the published layouts -----------------------------------------------------------------


def _npz_member(path: Path, name: str) -> np.ndarray:
    """``name`` of an ``.npz`` as an array: memory-mapped when stored uncompressed (``np.savez``), so a
    task reads only the rows it gathers; read whole when compressed (``np.savez_compressed``)."""
    try:
        with zipfile.ZipFile(path) as zf:
            try:
                info = zf.getinfo(f"{name}.npy")
            except KeyError:
                held = ", ".join(sorted(zf.namelist()))
                raise EmbeddingImportError(f"{path}: no {name!r} array (it holds {held})") from None
            if info.compress_type != zipfile.ZIP_STORED:
                with zf.open(info) as f:
                    _check_dtype(path, name, *_header(f))
                with zf.open(info) as f:
                    return np.lib.format.read_array(f, allow_pickle=False)
        with path.open("rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            data_start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(
                local[28:30], "little")  # fmt: skip
            f.seek(data_start)
            shape, fortran, dtype = _header(f)
            offset = f.tell()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise EmbeddingImportError(f"{path}: not a readable .npz ({type(exc).__name__}: {exc})") from None
    _check_dtype(path, name, shape, fortran, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """An ``.npy`` member's (shape, fortran order, dtype), read from its header alone."""
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read_header(f)


def _check_dtype(path: Path, name: str, shape: tuple[int, ...], fortran: bool, dtype: np.dtype) -> None:
    """Refuse, before any memory map, a member that is not a 2-d array of plain numbers: an object
    array read through ``np.memmap`` would be read as pointers."""
    if dtype.kind not in "fiu" or dtype.hasobject or dtype.fields is not None or len(shape) != 2:
        raise EmbeddingImportError(f"{path}: {name!r} is {dtype} of shape {shape}; a vector array must be a 2-d "
                                   "array of floats (or integers)")  # fmt: skip


def datacomp_files(folder: Path) -> list[Path]:
    """The metadata folder's Parquet files in name order (the download reads them in this order)."""
    if not folder.is_dir():
        raise EmbeddingImportError(f"{folder}: not a folder (a DataComp metadata folder of .parquet and .npz files)")
    files = sorted(p for p in folder.glob("*.parquet") if p.is_file())
    if not files:
        raise EmbeddingImportError(f"{folder}: no .parquet files")
    return files


def check_datacomp(folder: Path, key: str) -> list[Path]:
    """Every Parquet file has its ``.npz`` with ``<key>_img`` and ``<key>_txt`` of the key's
    dimension and the file's row count; returns the Parquet files.

    Raises:
        EmbeddingImportError: names the file and what differs.
    """
    _, _, dim = DATACOMP[key]
    files = datacomp_files(folder)
    for path in files:
        npz = path.with_suffix(".npz")
        if not npz.is_file():
            raise EmbeddingImportError(f"{npz}: missing (DataComp puts an .npz of embeddings beside each .parquet)")
        rows = pq.ParquetFile(path).metadata.num_rows
        for part in ("img", "txt"):
            array = _npz_member(npz, f"{key}_{part}")
            if array.ndim != 2 or array.shape[1] != dim:
                raise EmbeddingImportError(
                    f"{npz}: {key}_{part} has shape {array.shape}; DataComp's {key} vectors are {dim}-d")
            if array.shape[0] != rows:
                raise EmbeddingImportError(f"{npz}: {key}_{part} has {array.shape[0]} rows but {path.name} has {rows}")
        if "uid" not in pq.read_schema(path).names:
            raise EmbeddingImportError(f"{path}: no uid column")
    return files


def index_file(out_dir: str, files: list[str], key: str, file_id: int) -> dict[str, int]:
    """``(uid, file_id, row, score)`` of one DataComp metadata file (its uid and score columns only,
    a row group at a time)."""
    path = Path(files[file_id])
    _, score_col, _ = DATACOMP[key]
    parquet = pq.ParquetFile(path)
    has_score = score_col in parquet.schema_arrow.names
    parts, start = [], 0
    for batch in parquet.iter_batches(columns=["uid", score_col] if has_score else ["uid"], batch_size=65536):
        n = batch.num_rows
        score = batch.column(score_col).cast(pa.float32()) if has_score else pa.nulls(n, pa.float32())
        parts.append(pa.table({"uid": batch.column("uid").cast(pa.string()),
                               "file_id": pa.array(np.full(n, file_id, np.int32)),
                               "row": pa.array(np.arange(start, start + n, dtype=np.int64)), "score": score},
                              schema=S.IMPORT_INDEX_SCHEMA))  # fmt: skip
        start += n
    write_parquet_atomic(Path(out_dir) / f"{file_id:05d}.parquet", pa.concat_tables(parts))
    return {"rows": start}


@functools.lru_cache(maxsize=4)
def _reader(folder: str) -> Any:
    from embedding_reader import EmbeddingReader

    try:
        return EmbeddingReader(folder, file_format="npy")
    except ValueError as exc:
        raise EmbeddingImportError(f"{folder}: cannot read the .npy embeddings: {exc}") from None


def check_clip_retrieval(folder: Path) -> dict[str, Any]:
    """``img_emb/``, ``text_emb/`` and ``metadata/`` agree part by part (rows) and in dimension.

    Raises:
        EmbeddingImportError: names the part at fault.
    """
    for sub in ("img_emb", "text_emb", "metadata"):
        if not (folder / sub).is_dir():
            raise EmbeddingImportError(
                f"{folder / sub}: missing (clip-retrieval writes img_emb/, text_emb/ and metadata/)")
    img, txt = _reader(str(folder / "img_emb")), _reader(str(folder / "text_emb"))
    if img.dimension != txt.dimension:
        raise EmbeddingImportError(
            f"{folder}: img_emb vectors are {img.dimension}-d but text_emb vectors {txt.dimension}-d")
    metas = sorted((folder / "metadata").glob("*.parquet"))
    heads = [img.reader.headers, txt.reader.headers]
    if not len(metas) == len(heads[0]) == len(heads[1]):
        raise EmbeddingImportError(
            f"{folder}: {len(heads[0])} img_emb, {len(heads[1])} text_emb and {len(metas)} metadata parts")
    for i, meta in enumerate(metas):
        rows = pq.ParquetFile(meta).metadata.num_rows
        for head in heads:
            name, count = head.iloc[i]["filename"], int(head.iloc[i]["count"])
            if count != rows:
                raise EmbeddingImportError(f"{name}: {count} rows but {meta} has {rows}")
    return {"dim": int(img.dimension), "rows": int(img.count), "metadata": [str(m) for m in metas]}


# --- the stage -------------------------------------------------------------------------------------


def source_model(cfg: EmbedConfig) -> str:
    assert cfg.source is not None
    return DATACOMP[cfg.source.key][0] if cfg.source.format == "datacomp" else cfg.model


def source_digest(source: EmbedSourceConfig) -> str:
    """What the imported tables depend on: the layout, key and each published file's name and size
    (hashing terabytes of vectors to plan would cost more than the import; a re-published file of
    another size is noticed)."""
    folder = Path(source.path)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".npz", ".npy", ".parquet"))
    h = hashlib.sha256(f"{source.format}|{source.key}|import-v1".encode())
    for path in files:
        h.update(f"{path.relative_to(folder)}\0{path.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def recorded_config(cfg: EmbedConfig, listed: bool = False) -> dict[str, Any]:
    assert cfg.source is not None
    recorded = {"model": source_model(cfg), "source": str(Path(cfg.source.path).resolve()),
                "format": cfg.source.format, "key": cfg.source.key if cfg.source.format == "datacomp" else None,
                "caption_model": cfg.caption_model}  # fmt: skip
    return {**recorded, "rows": "listed"} if listed else recorded


def import_hash(cfg: EmbedConfig, listed: bool = False) -> str:
    """The import's digest; ``listed``: a pool curated from its metadata alone, whose vectors attach
    to every listed row (:meth:`pipeline.store.parquet.Pool.metadata_only`), not the downloaded ones."""
    assert cfg.source is not None
    blob = f"{source_digest(cfg.source)}|{source_model(cfg)}|{cfg.caption_model}" + ("|listed" if listed else "")
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def joined_table(digest: str) -> str:
    """Where, under ``aggregates/``, the DataComp import's join of the pool with the published
    index lies, sorted by shard."""
    return f"embed_import/{digest}/joined"


class ImportEmbeddings(Step):
    """A shard's ``embed`` table from published vectors: its downloaded rows in tar order (on a pool
    curated from its metadata alone, ``listed``: every listed row, in list order), each with
    its published image and text vectors (normalised), the published score (else their cosine), or
    null vectors and the reason (:data:`MISSING`, :data:`NON_FINITE`). It reads the published files
    (outside the pool, never written): memory-mapped ``.npz`` members at the rows the pool-wide join
    found (DataComp), or the shard's row range through embedding-reader (clip-retrieval)."""

    name = STAGE
    sized = staticmethod(S.embed_schema)
    sized_column = S.IMAGE_EMBEDDING

    def __init__(self, cfg: EmbedConfig, digest: str, listed: bool = False):
        source = cfg.source
        assert source is not None
        reads = [Read("download", (S.UID, S.ROW, S.URL, S.STATUS, S.KEY))]
        if source.format == "datacomp":
            reads.append(Read(joined_table(digest), ("uid", "file_id", "row", "score"), kind=BY_SHARD, name="joined"))
        super().__init__(reads=tuple(reads), digest=digest)
        self.format, self.path, self.source_key = source.format, str(source.path), source.key
        self.model, self.listed = source_model(cfg), listed

    def __call__(self, inputs: dict[str, pa.Table]) -> pa.Table:
        dl = inputs["download"]
        if self.listed:  # DataComp's filtering track: every listed row, none fetched
            dl = dl.filter(pc.equal(dl[S.STATUS], S.STATUS_NOT_SELECTED))  # in list order
        else:
            dl = dl.filter(pc.equal(dl[S.STATUS], S.STATUS_SUCCESS)).sort_by(S.KEY)  # the tar's order
        if self.format == "datacomp":
            img, txt, score, found = _gather_datacomp(Path(self.path), self.source_key, inputs["joined"], dl)
        else:
            img, txt, score, found = _gather_clip_retrieval(Path(self.path), dl)
        n, dim = img.shape
        finite, cosine = np.zeros(n, bool), np.zeros(n, np.float32)
        img16, txt16 = np.zeros((n, dim), np.float16), np.zeros((n, dim), np.float16)  # the stored form
        for lo in range(0, n, _CHUNK):  # float32 a chunk at a time: the shard is held once, as float16
            a, b = (np.asarray(x[lo : lo + _CHUNK], np.float32) for x in (img, txt))
            ok = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)  # a NaN or Inf row never ships
            finite[lo : lo + _CHUNK] = ok
            keep = (found[lo : lo + _CHUNK] & ok)[:, None]
            a, b = unit_rows(np.where(keep, a, 0)), unit_rows(np.where(keep, b, 0))
            cosine[lo : lo + _CHUNK] = (a * b).sum(axis=1)
            img16[lo : lo + _CHUNK], txt16[lo : lo + _CHUNK] = a, b
        del img, txt
        errors = [None if f and ok else (MISSING if not f else NON_FINITE) for f, ok in zip(found, finite, strict=True)]
        found = found & finite
        score = np.where(np.isnan(score), cosine, score).astype(np.float32)
        return pa.table({S.UID: dl[S.UID], S.IMAGE_EMBEDDING: S.vector_column(img16, found),
                         S.TEXT_EMBEDDING: S.vector_column(txt16, found),
                         S.CLIP_SCORE: pa.array(score, pa.float32(), mask=~found),
                         S.DECODE_ERROR: pa.array(errors, pa.string()),
                         S.MODEL: pa.array([self.model] * n, pa.string()),
                         S.CHECKPOINT_SHA256: pa.array([f"imported:{self.digest}"] * n, pa.string())})  # fmt: skip

    def counts(self, out: pa.Table) -> dict[str, int]:
        errors = out[S.DECODE_ERROR].to_pylist()
        found = errors.count(None)
        return {"samples": out.num_rows, "embedded": found, "decode_errors": out.num_rows - found, "imported": found,
                "missing": errors.count(MISSING), "non_finite": errors.count(NON_FINITE)}  # fmt: skip


def import_steps(pool: Pool, cfg: EmbedConfig) -> list[Step]:
    """The import's steps: the embed table from the published vectors, then the caption table (the
    published text vectors, or MiniLM over the captions). Records the stage's config in the pool."""
    listed = pool.metadata_only()
    digest = import_hash(cfg, listed)
    pool.check_stage_config(STAGE, recorded_config(cfg, listed), digest)
    steps: list[Step] = [ImportEmbeddings(cfg, digest, listed)]
    if cfg.caption_model is not None:
        steps.append(CaptionEmbed(cfg.caption_model, digest, clip_name=f"{source_model(cfg)} text (published)"))
    return steps


def _gather_datacomp(folder: Path, key: str, rows: pa.Table,
                     dl: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    _, _, dim = DATACOMP[key]
    n = dl.num_rows
    if rows.num_rows == 0:
        return np.zeros((n, dim), np.float32), np.zeros((n, dim), np.float32), np.full(n, np.nan, np.float32), np.zeros(
            n, bool)  # fmt: skip
    files = datacomp_files(folder)
    file_ids = rows["file_id"].to_numpy()
    members = {(int(f), part): _npz_member(files[int(f)].with_suffix(".npz"), f"{key}_{part}")
               for f in np.unique(file_ids) for part in ("img", "txt")}  # fmt: skip
    dtype = np.result_type(*(m.dtype for m in members.values()))
    img, txt = np.zeros((n, dim), dtype), np.zeros((n, dim), dtype)  # as published (float16): no wider copy
    score, found = np.full(n, np.nan, np.float32), np.zeros(n, bool)
    position = {u: i for i, u in enumerate(dl[S.UID].to_pylist())}
    at = np.array([position[u] for u in rows["uid"].to_pylist()], np.int64)
    source_rows = rows["row"].to_numpy()
    published = rows["score"].to_numpy(zero_copy_only=False)
    for file_id in np.unique(file_ids):
        pick = np.flatnonzero(file_ids == file_id)
        pick = pick[np.argsort(source_rows[pick], kind="stable")]  # read the member in file order
        img[at[pick]] = members[int(file_id), "img"][source_rows[pick]]
        txt[at[pick]] = members[int(file_id), "txt"][source_rows[pick]]
    score[at] = np.asarray(published, np.float32)
    found[at] = True
    return img, txt, score, found


def _gather_clip_retrieval(folder: Path, dl: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    img_reader, txt_reader = _reader(str(folder / "img_emb")), _reader(str(folder / "text_emb"))
    dim, n = int(img_reader.dimension), dl.num_rows
    img, txt = np.zeros((n, dim), np.float32), np.zeros((n, dim), np.float32)
    score, found = np.full(n, np.nan, np.float32), np.zeros(n, bool)
    if n == 0:
        return img, txt, score, found
    rows = dl[S.ROW].to_numpy()
    ok = rows < img_reader.count
    if not ok.any():
        return img, txt, score, found
    lo, hi = int(rows[ok].min()), int(rows[ok].max()) + 1
    for reader, out in ((img_reader, img), (txt_reader, txt)):
        for batch, meta in reader(batch_size=hi - lo, start=lo, end=hi, show_progress=False):
            index = meta["i"].to_numpy() - lo
            block = np.empty((hi - lo, dim), np.float32)
            block[index] = batch
            out[ok] = block[rows[ok] - lo]
    _check_urls(folder, dl, rows, ok)
    found[ok] = True
    return img, txt, score, found


def _check_urls(folder: Path, dl: pa.Table, rows: np.ndarray, ok: np.ndarray) -> None:
    """Where ``metadata/`` has a url column, the pool's rows must be its rows (same URL)."""
    metas = sorted((folder / "metadata").glob("*.parquet"))
    if not metas or "url" not in pq.read_schema(metas[0]).names:
        return
    counts = np.cumsum([0] + [pq.ParquetFile(m).metadata.num_rows for m in metas])
    urls = dl[S.URL].to_pylist()
    for i in np.flatnonzero(ok)[:: max(1, int(ok.sum()) // 16)]:  # a few rows of the shard: cheap, and enough
        part = int(np.searchsorted(counts, rows[i], "right")) - 1
        local = int(rows[i] - counts[part])
        published = pq.ParquetFile(metas[part]).read(columns=["url"]).column("url")[local].as_py()
        if published != urls[i]:
            raise EmbeddingImportError(
                f"{metas[part]} row {local + 1} has url {published!r}, but row {rows[i] + 1} of the pool's URL "
                f"list has {urls[i]!r}; prepare the pool from {folder / 'metadata'} so rows align")


def check_source(cfg: EmbedConfig) -> list[str]:
    """The published files, checked before anything else (a bad one is named before any work): the
    DataComp layout's Parquet files, in order (none for clip-retrieval's).

    Raises:
        EmbeddingImportError: the layout is incomplete, or a file's dimension or row count differs.
    """
    source = cfg.source
    assert source is not None
    if source.format != "datacomp":
        check_clip_retrieval(Path(source.path))
        return []
    return [str(p) for p in check_datacomp(Path(source.path), source.key)]


def prepare_import(pool: Pool, cfg: EmbedConfig, engine: Any, files: list[str]) -> None:
    """For DataComp's layout (``files``: :func:`check_source`'s), index each file's uids (one task per
    file) and join them with the pool's downloads, sorted by shard (:func:`joined_table`): what the
    import step reads."""
    from pipeline.engines.base import Table

    source = cfg.source
    assert source is not None
    if source.format != "datacomp":
        return
    listed = pool.metadata_only()  # the rows vectors attach to: every listed one, or the downloaded ones
    digest = import_hash(cfg, listed)
    work = pool.aggregates_dir / "embed_import" / digest
    index_dir = work / "index"
    missing = [i for i in range(len(files)) if not (index_dir / f"{i:05d}.parquet").exists()]
    fn = functools.partial(index_file, str(index_dir), files, source.key)
    runner.finished(pool, "embed import index", engine.map_shards(fn, missing, desc="embed index", progress=False))
    index = Table.of([index_dir / f"{i:05d}.parquet" for i in range(len(files))], S.IMPORT_INDEX_SCHEMA)
    download = pool.table("download", [S.UID, S.SHARD, S.STATUS])
    status = S.STATUS_NOT_SELECTED if listed else S.STATUS_SUCCESS
    sql = ("select d.shard, i.uid, i.file_id, i.row, i.score from download d join idx i on d.uid = i.uid "
           f"where d.status = '{status}'")  # fmt: skip
    engine.write(sql, {"download": download, "idx": index}, pool.aggregates_dir / joined_table(digest),
                 order_by="shard")  # fmt: skip
