"""Download stage: a URL list -> WebDataset shards + the ``download`` table, through img2dataset.

We call img2dataset's own per-shard ``Downloader`` (the callable its multiprocessing, pyspark and
ray distributors all take) rather than its ``download()`` entry point, because the pool needs
what ``download()`` does not give: shard ids that stay global when only some shards run (one
Prefect task per shard batch, a resume), atomic placement of each finished shard, and one
engine-chosen process pool. Fetching, resizing, hashing and the tar/sidecar writing are all
img2dataset's.

Per shard: the prepared rows (``input/urls.parquet``, one row group per shard) are written to the
feather file img2dataset reads, downloaded into ``_staging/download/``, then the ``download`` table
is written, the tar, sidecar and stats are renamed into ``shards/``, and the completion marker is
written last. A killed shard leaves no marker and is redone whole on the next run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import DownloadConfig, config_dict, config_hash
from pipeline.core import runner
from pipeline.core.step import LISTED, SELECTED, Read, Step
from pipeline.core.where import Where, bind
from pipeline.errors import UserError
from pipeline.store import schema as S
from pipeline.store.parquet import Pool, file_sha256, recorded_change, shard_name, write_json_atomic

STAGE = "download"
_FETCHED_SCHEMES = ("http", "https")
# Fields that change where or how fast the work runs, never its output.
# Politeness, time limits and retry passes change when a fetch succeeds, not what a success holds.
_RUNTIME_FIELDS = ("input", "processes", "threads", "shards_per_task", "warn_success_rate", "warn_min_samples",
                   "per_host_concurrency", "retry_after_max", "shard_time_limit", "retry", "max_attempts")


log = logging.getLogger(__name__)


class InputError(UserError, ValueError):
    """The URL list cannot be used; the message names the file and, where one is at fault, the row."""


# --- reading and preparing the URL list ------------------------------------------------------------

_EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


def _infer_format(path: Path) -> str:
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"{path}: cannot tell the format from the extension; set download.input_format")
    return fmt


def _require_columns(path: Path, available: list[str], wanted: list[str]) -> None:
    missing = [c for c in wanted if c not in available]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))}; the file has "
            f"{', '.join(map(repr, available)) or 'no columns'} (set download.url_col / download.caption_col)"
        )


def _utf8(column: pa.ChunkedArray, path: Path, name: str, offset: int = 0) -> pa.ChunkedArray:
    """``column`` as valid UTF-8 strings, or an error naming the first bad row (1-based, no header;
    ``offset``: the rows of the file before this batch)."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:
            column.validate(full=True)  # Parquet readers do not check UTF-8; this does
            return column.cast(pa.string())
        except pa.ArrowInvalid:
            column = column.cast(pa.binary())
    if pa.types.is_null(column.type):  # every value null
        return column.cast(pa.string())
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise InputError(f"{path}: {name} holds {column.type} values; it must be a string column")
    try:
        return column.cast(pa.string())  # validates UTF-8
    except pa.ArrowInvalid:
        for i, value in enumerate(column.to_pylist()):
            try:
                if value is not None:
                    value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{path}: row {offset + i + 1}: {name} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
                ) from None
        raise


def _csv_batches(path: Path, fmt: str, columns: list[str], text: list[str]) -> Iterator[pa.Table]:
    """The CSV/TSV file in blocks of rows (Arrow's streaming reader: one block in memory at a time)."""
    import pyarrow.csv as pacsv

    parse = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)
    try:
        with pacsv.open_csv(path, parse_options=parse) as reader:
            names = reader.schema.names
    except pa.ArrowInvalid as exc:
        raise InputError(f"{path}: cannot read as {fmt.upper()}: {exc}") from None
    _require_columns(path, names, columns)
    # every column as bytes: the text ones are checked for UTF-8 by the caller, an extra one here
    convert = pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.binary() for c in columns})
    offset = 0
    try:
        with pacsv.open_csv(path, parse_options=parse, convert_options=convert,
                            read_options=pacsv.ReadOptions(block_size=16 << 20)) as reader:  # fmt: skip
            for batch in reader:
                table = pa.Table.from_batches([batch])
                for name in columns:
                    if name not in text:
                        table = table.set_column(table.column_names.index(name), name,
                                                 _utf8(table[name], path, repr(name), offset))  # fmt: skip
                offset += table.num_rows
                yield table
    except pa.ArrowInvalid as exc:
        raise InputError(f"{path}: cannot read as {fmt.upper()}: {exc}") from None


def _read_jsonl(path: Path, columns: list[str], text: list[str]) -> pa.Table:
    import json

    rows = []
    with path.open("rb") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}: line {line_no}: not valid UTF-8 ({exc.reason})") from None
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}: line {line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(rows[-1], dict):
                raise InputError(f"{path}: line {line_no}: expected a JSON object per line")
    if not rows:
        raise InputError(f"{path}: the file holds no rows")
    _require_columns(path, sorted(set().union(*rows)), columns)
    for c in text:
        for i, row in enumerate(rows):
            if not isinstance(row.get(c), str | None):
                raise InputError(f"{path}: object {i + 1}: {c!r} is {type(row[c]).__name__}, not a string")
    out = {}
    for c in columns:
        try:
            out[c] = pa.array([r.get(c) for r in rows], pa.string() if c in text else None)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InputError(f"{path}: column {c!r} mixes value types: {exc}") from None
    return pa.table(out)


_UID_PATTERN = r"^[0-9a-f]{32}$"


def _check_uids(uids: pa.ChunkedArray, path: Path, name: str, offset: int = 0) -> None:
    """32 lowercase hex digits per row (DataComp's uids), none missing; the first bad row is named."""
    ok = pc.fill_null(pc.match_substring_regex(uids, _UID_PATTERN), False).combine_chunks()
    if not pc.all(ok).as_py():
        i = int(pc.index(ok, False).as_py())
        raise InputError(f"{path}: row {offset + i + 1}: uid column {name!r} holds {uids[i].as_py()!r}; "
                         "a uid must be 32 lowercase hex digits")  # fmt: skip


def _check_boxes(column: pa.ChunkedArray, path: Path, name: str) -> pa.ChunkedArray:
    """Face boxes as ``list<list<double>>`` of ``[x0, y0, x1, y1]`` in [0, 1] (DataComp's layout)."""
    want = pa.list_(pa.list_(pa.float64()))
    kind = column.type
    inner = kind.value_type if pa.types.is_list(kind) or pa.types.is_large_list(kind) else None
    if pa.types.is_null(kind):
        return column.cast(want)
    if inner is None or not (pa.types.is_list(inner) or pa.types.is_large_list(inner)
                             or pa.types.is_fixed_size_list(inner)) or not (
            pa.types.is_floating(inner.value_type) or pa.types.is_integer(inner.value_type)):  # fmt: skip
        raise InputError(f"{path}: bbox column {name!r} holds {kind}; it must hold lists of [x0, y0, x1, y1] boxes")
    boxes = column.cast(want)
    sizes = pc.list_value_length(pc.list_flatten(boxes))
    coords = pc.list_flatten(pc.list_flatten(boxes))
    if len(sizes) and not pc.all(pc.equal(sizes, 4)).as_py():
        raise InputError(f"{path}: bbox column {name!r}: every box must have 4 numbers [x0, y0, x1, y1]")
    if len(coords) and not pc.all(pc.and_(pc.greater_equal(coords, 0), pc.less_equal(coords, 1))).as_py():
        raise InputError(f"{path}: bbox column {name!r}: box coordinates must be normalised to [0, 1]")
    return boxes


_BATCH_ROWS = 65_536


def iter_url_list(path: str | Path, cfg: DownloadConfig) -> Iterator[tuple[int, pa.Table]]:
    """Read and validate one URL list file in batches: ``(offset, table)``, where ``offset`` is the
    file's rows before the batch and ``table`` has ``url`` and ``caption`` string columns, then
    ``uid`` (with ``uid_col``), the ``extra_cols`` and the ``bbox_col`` under their own names.
    Parquet and CSV/TSV stream (memory: one batch, whatever the file's size); JSONL is read whole.

    Raises:
        InputError: the file is missing, empty, unreadable, lacks a named column, or holds a
            caption that is not valid UTF-8, a malformed uid or a malformed box (the message names
            the file and, where one is at fault, the row).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: URL list not found")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty")
    fmt = cfg.input_format or _infer_format(path)
    text = [c for c in (cfg.url_col, cfg.caption_col, cfg.uid_col) if c]
    columns = text + list(cfg.extra_cols) + ([cfg.bbox_col] if cfg.bbox_col else []) + list(cfg.size_cols or ())
    batches: Iterator[pa.Table]
    if fmt == "parquet":
        try:
            # pages read as they are decoded, not a whole row group's column chunks up front: memory
            # is a batch, whatever the row groups' size
            parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{path}: cannot read as Parquet: {exc}") from None
        _require_columns(path, parquet.schema_arrow.names, columns)
        read = parquet.iter_batches(batch_size=_BATCH_ROWS, columns=columns, use_threads=False)
        batches = (pa.Table.from_batches([b], schema=b.schema) for b in read)
    elif fmt in ("csv", "tsv"):
        if cfg.bbox_col:
            raise InputError(f"{path}: download.bbox_col needs a Parquet or JSONL list (boxes are lists)")
        batches = _csv_batches(path, fmt, columns, text)
    else:
        batches = iter([_read_jsonl(path, columns, text)])
    offset = 0
    for table in batches:
        if table.num_rows == 0:
            continue
        url = _utf8(table[cfg.url_col], path, f"url column {cfg.url_col!r}", offset)
        caption = (
            _utf8(table[cfg.caption_col], path, f"caption column {cfg.caption_col!r}", offset)
            if cfg.caption_col
            else pa.chunked_array([pa.nulls(table.num_rows, pa.string())])
        )
        out = {S.URL: url, S.CAPTION: caption}
        if cfg.uid_col:
            out[S.UID] = _utf8(table[cfg.uid_col], path, f"uid column {cfg.uid_col!r}", offset)
            _check_uids(out[S.UID], path, cfg.uid_col, offset)
        for name in cfg.extra_cols:
            out[name] = table[name]
        if cfg.bbox_col:
            out[cfg.bbox_col] = _check_boxes(table[cfg.bbox_col], path, cfg.bbox_col)
        for name, column in zip((S.LISTED_WIDTH, S.LISTED_HEIGHT), cfg.size_cols or (), strict=False):
            out[name] = _sizes(table[column], path, column)
        yield offset, pa.table(out)
        offset += table.num_rows
    if offset == 0:
        raise InputError(f"{path}: the file holds no rows")


def _sizes(column: pa.ChunkedArray, path: Path, name: str) -> pa.ChunkedArray:
    """An input's size column as int32 (DataComp's are int64), refusing a column that is not whole
    numbers, naming the file and column."""
    if not (pa.types.is_integer(column.type) or pa.types.is_null(column.type)):
        raise InputError(f"{path}: download.size_cols: column {name!r} holds {column.type}, not whole pixel counts")
    return pc.cast(column, pa.int32())


def read_url_list(path: str | Path, cfg: DownloadConfig) -> pa.Table:
    """The whole validated file (:func:`iter_url_list`'s batches as one table; small lists, tests)."""
    tables = [table for _, table in iter_url_list(path, cfg)]
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def _is_glob(source: Path) -> bool:
    return any(ch in str(source) for ch in "*?[")


def input_files(source: Path) -> list[Path]:
    """The URL list's files: the file itself, a folder's ``*.parquet`` files, or the files a glob
    (``/data/lists/*.csv``) matches, in name order."""
    if _is_glob(source):
        files = sorted(p for p in Path(source.anchor or ".").glob(str(source.relative_to(source.anchor or ".")))
                       if p.is_file())  # fmt: skip
        if not files:
            raise InputError(f"{source}: the pattern matches no file")
        return files
    if not source.is_dir():
        return [source]
    files = sorted(p for p in source.glob("*.parquet") if p.is_file())
    if not files:
        raise InputError(f"{source}: the folder holds no .parquet file")
    return files


def source_digest(source: Path) -> str | None:
    """sha256 of the URL list (of each file's name and sha256, for a folder); None when it is gone."""
    globbed = _is_glob(source)
    if not globbed and not source.exists():
        return None
    if not globbed and not source.is_dir():
        return file_sha256(source)
    try:
        files = input_files(source)
    except InputError:
        return None
    return _names_digest((path.name, file_sha256(path)) for path in files)


def _names_digest(files: Any) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, sha256 in files:
        h.update(f"{name}\0{sha256}\n".encode())
    return h.hexdigest()


def _ingested_digest(source: Path, ingests: list[dict[str, Any]]) -> str | None:
    """:func:`source_digest` of the ingested files, from their records (no file is read again)."""
    records = sorted((f for i in ingests for f in i["files"] or []), key=lambda f: f["path"])
    if not records:
        return None
    if not _is_glob(source) and source.is_file() and len(records) == 1:
        return records[0]["sha256"]
    return _names_digest((Path(f["path"]).name, f["sha256"]) for f in records)


def _check_reserved(cfg: DownloadConfig) -> None:
    taken = sorted((set(cfg.extra_cols) | {cfg.bbox_col} - {None}) & S.reserved_columns())  # type: ignore[operator]
    if taken:
        raise InputError(
            f"download.extra_cols/bbox_col: {', '.join(map(repr, taken))} would replace a column the pool computes "
            "(the download recomputes original_width, original_height and sha256 from the fetched image); "
            "leave it out or rename it in the input"
        )


def _check_same_settings(pool: Pool, plan: dict[str, Any], cfg: DownloadConfig) -> None:
    now = _plan_settings(cfg)
    was = {k: plan.get(k, [] if k == "extra_cols" else None) for k in now}  # plans made before a key existed
    changed = [f"{k}: {was[k]!r} -> {v!r}" for k, v in now.items() if was[k] != v]
    if changed:
        raise InputError(
            f"{pool.root} was prepared from {plan['source']} and this run differs ({'; '.join(changed)}). "
            "Use a new pool directory for another sharding or other columns."
        )


def _file_record(path: Path, rows: int | None = None) -> dict[str, Any]:
    st = path.stat()
    record = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(path)}
    return record if rows is None else {**record, "rows": rows}


def _legacy_ingests(pool: Pool, plan: dict[str, Any], source: Path) -> dict[str, Any]:
    """A plan written before pools grew (one ``source_sha256``, no ``ingests``) as one ingest; its
    files are recorded now if the source is the one it was prepared from, else the run is refused."""
    if plan.get("ingests"):
        return plan
    digest = source_digest(source)
    first = {"file": pool.input_path.name, "first_shard": 0, "num_shards": plan["num_shards"], "first_row": 0,
             "source_rows": plan.get("source_rows", plan["num_rows"]), "num_rows": plan["num_rows"],
             "duplicates_dropped": plan.get("duplicates_dropped", 0), "files": None}  # fmt: skip
    if digest is not None and digest != plan.get("source_sha256"):
        raise InputError(f"{pool.root} was prepared from {plan['source']} before pools recorded their input files, "
                         "and that source has changed since: use a new pool directory for it")  # fmt: skip
    if digest is not None:
        files = input_files(source)
        first["files"] = [_file_record(f, first["source_rows"] if len(files) == 1 else None) for f in files]
    return {**plan, "ingests": [first]}


def scan_inputs(pool: Pool, cfg: DownloadConfig, plan: dict[str, Any] | None = None) -> dict[str, list[str]]:
    """Compare the input's files now with those the pool ingested (by path, size and sha256; the
    sha256 only where the size matches and the mtime moved).

    Returns:
        ``new`` (not ingested yet, in name order) and ``vanished`` (ingested, now gone: their rows stay
        in the pool).

    Raises:
        InputError: an ingested file has changed since; names each such file. Nothing is changed: a
            file's rows are never re-ingested or dropped behind the user's back.
    """
    source = Path(cfg.input)
    plan = plan if plan is not None else pool.read_plan()
    ingested: dict[str, dict[str, Any]] = {}
    for ingest in (plan or {}).get("ingests") or []:
        for record in ingest.get("files") or []:
            ingested[record["path"]] = record
    try:
        now = input_files(source)
    except InputError:
        now = []  # the source is gone: the prepared copy in the pool is all a resume needs
    changed, vanished = [], []
    for path, record in ingested.items():
        change = recorded_change(Path(path), record)
        if change is not None and change[0] == "missing":
            vanished.append(path)
        elif change is not None:
            changed.append(f"{path} ({record['size']} bytes, sha256 {record['sha256'][:12]}... when ingested; "
                           f"{change[1]} bytes now)")  # fmt: skip
    if changed:
        raise InputError(f"input file(s) changed since the pool ingested them: {'; '.join(changed)}. An ingested "
                         "file is never re-read: put new rows in a new file, or restore it (nothing was changed)")
    if vanished:
        log.warning("%d ingested input file(s) are gone (their rows stay in the pool): %s", len(vanished),
                    ", ".join(vanished))  # fmt: skip
    return {"new": [str(p) for p in now if str(p.resolve()) not in ingested], "vanished": vanished}


def _plan_settings(cfg: DownloadConfig) -> dict[str, Any]:
    return {"samples_per_shard": cfg.samples_per_shard, "url_col": cfg.url_col, "caption_col": cfg.caption_col,
            "uid_col": cfg.uid_col, "extra_cols": list(cfg.extra_cols), "bbox_col": cfg.bbox_col,
            **({"size_cols": list(cfg.size_cols)} if cfg.size_cols else {})}  # fmt: skip


_KEY_SHIFT = 1 << 40  # (file, row) as one sortable int64 key: files below 2**23, rows below 2**40


def prepare_file(parts_dir: str, files: list[str], cfg: DownloadConfig, file_id: int) -> dict[str, Any]:
    """Validate one input file and write its part: ``file_row``, ``uid`` (the list's own, or
    ``md5(url + "\\0" + caption)`` computed by DuckDB over each batch's column, no per-row Python),
    url, caption and the extra columns, batch by batch (memory: one batch). A bad file comes back
    as ``{"error": message}``, the message naming the file and row."""
    import itertools

    import duckdb

    from pipeline.store.parquet import atomic_path

    path = Path(files[file_id])
    out = Path(parts_dir) / f"{file_id:05d}.parquet"
    con = duckdb.connect()
    n = 0
    try:
        batches = iter_url_list(path, cfg)
        first = next(batches)  # a file refused at its start leaves nothing behind, not even the folder
        with atomic_path(out) as tmp:
            writer = None
            for offset, table in itertools.chain([first], batches):
                rows = table.num_rows
                if S.UID not in table.column_names:
                    con.register("t", table.select([S.URL, S.CAPTION]))
                    blob = "encode(coalesce(url, '')) || '\\x00'::BLOB || encode(coalesce(caption, ''))"
                    uids = con.sql(f"SELECT md5({blob}) AS uid FROM t").to_arrow_table()["uid"]  # = schema.make_uid
                    con.unregister("t")
                    table = table.append_column(S.UID, uids.cast(pa.string()))
                extras = [c for c in table.column_names if c not in (S.URL, S.CAPTION, S.UID)]
                part = pa.table({"file_row": pa.array(np.arange(offset, offset + rows, dtype=np.int64)),
                                 S.UID: table[S.UID], S.URL: table[S.URL], S.CAPTION: table[S.CAPTION],
                                 **{c: table[c] for c in extras},
                                 "file_id": pa.array(np.full(rows, file_id, np.int32))})  # fmt: skip
                if writer is None:
                    writer = pq.ParquetWriter(tmp, part.schema)
                elif not part.schema.equals(writer.schema):
                    try:  # a later batch of an extra column may type differently (all null, say)
                        part = part.cast(writer.schema)
                    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                        raise InputError(f"{path}: rows from {offset + 1}: the columns change type ({exc})") from None
                writer.write_table(part, row_group_size=_BATCH_ROWS)
                n += rows
            if writer is not None:
                writer.close()
    except InputError as exc:
        return {"error": str(exc)}
    finally:
        con.close()
    return {"rows": n}


def _where_in(files: list[Path], key: int) -> str:
    file_id, row = divmod(int(key), _KEY_SHIFT)
    return f"{files[file_id]} row {row + 1}"


def prepare(pool: Pool, cfg: DownloadConfig, engine: Any) -> dict[str, Any]:
    """Validate the URL list's files not yet in the pool and append them; return the plan.

    The first run ingests every file of ``download.input`` (a file, a folder of Parquet files or a
    glob); each later run ingests the files it has not seen (:func:`scan_inputs`: by path, size
    and sha256) as shards after the last, and refuses, naming them, files that changed since.

    Each new file is validated and turned into a part by an engine task (in parallel; uids
    vectorised). Rows get a ``uid``: the list's own (``uid_col``: checked to be 32 lowercase hex
    digits, and unique across files and the pool's earlier rows by an engine aggregation), or
    ``md5(url, caption)`` (:func:`pipeline.store.schema.make_uid`), in which case exact repeats of
    a (url, caption) pair are the same sample and keep their first occurrence only (an engine
    aggregation finds the others, an earlier ingest's row first). The files are taken in name
    order and numbered as one list, after the rows ingested before; the parts are then streamed,
    one shard at a time, into the ingest's ``urls.parquet`` (``urls-00001.parquet``, ... for later
    ingests), whose row group ``s`` is the ingest's ``s``-th shard (``samples_per_shard`` rows), so
    shard membership never changes on a re-run and the plan is the same on any engine and any
    number of workers. Memory: one file (a task) or one shard (the writer), never the list.
    Nothing is kept unless the new files are all valid; ``plan.json`` is written last.
    """
    source = Path(cfg.input)
    plan = pool.read_plan()
    if plan is not None:
        _check_same_settings(pool, plan, cfg)
        upgraded = _legacy_ingests(pool, plan, source)
        if upgraded is not plan:
            write_json_atomic(pool.plan_path, upgraded)
            plan = upgraded
        files = [Path(f) for f in scan_inputs(pool, cfg, plan)["new"]]
        if not files:
            return plan
    else:
        if not _is_glob(source) and not source.exists():
            raise InputError(f"{source}: URL list not found")
        files = input_files(source)
    _check_reserved(cfg)
    return _ingest(pool, cfg, engine, files, plan, source)


def _ingest(pool: Pool, cfg: DownloadConfig, engine: Any, files: list[Path], plan: dict[str, Any] | None,
            source: Path) -> dict[str, Any]:  # fmt: skip
    """Prepare ``files`` as the pool's next ingest (after ``plan``'s, or the first) and write the plan."""
    import shutil
    import time

    from pipeline.engines.base import Table, read_where, written_files

    made_root = not pool.root.exists()
    ingests = list((plan or {}).get("ingests") or [])
    first_shard = plan["num_shards"] if plan else 0
    first_row = plan.get("source_rows", plan["num_rows"]) if plan else 0
    work = pool.root / "input" / "_prepare"  # the tool's own scratch: removed when done
    if work.exists():
        shutil.rmtree(work)
    parts_dir = work / "parts"
    fn = functools.partial(prepare_file, str(parts_dir), [str(f) for f in files], cfg)
    done = runner.finished(pool, "prepare", engine.map_shards(fn, list(range(len(files))), desc="prepare",
                                                             progress=False))  # fmt: skip
    errors = [done[i]["error"] for i in range(len(files)) if "error" in done[i]]
    if errors:
        _discard(work, first=plan is None, made_root=made_root)
        raise InputError(errors[0])
    counts = np.array([done[i]["rows"] for i in range(len(files))], np.int64)
    starts = first_row + np.concatenate([[0], np.cumsum(counts)])
    part_files = [parts_dir / f"{i:05d}.parquet" for i in range(len(files))]
    part_schema = pa.unify_schemas([pq.read_schema(p) for p in part_files], promote_options="permissive")
    tables = {"parts": Table.of(part_files, part_schema, ["file_id", "file_row", S.UID])}
    key = f"CAST(file_id AS BIGINT) * {_KEY_SHIFT} + file_row"
    rows = f"SELECT uid, {key} AS k FROM parts"
    if plan is not None:  # the rows ingested before come first: a repeat of one of them is the new row
        listed = pool.listed_paths(plan)
        tables["listed"] = Table.of(listed, pq.read_schema(listed[0]), [S.UID, S.SHARD])
        rows += " UNION ALL SELECT uid, CAST(shard AS BIGINT) - 2147483648 AS k FROM listed"
    dropped_dir = _repeats(engine, cfg, tables, key, rows, files, work, discard=functools.partial(
        _discard, work, first=plan is None, made_root=made_root))  # fmt: skip
    extras = [f for f in part_schema if f.name not in (S.UID, S.URL, S.CAPTION, "file_row", "file_id")]
    schema = pa.schema(list(S.INPUT_SCHEMA) + extras)
    if plan is not None:  # every ingest has the first one's columns and types
        schema = pq.read_schema(pool.listed_paths(plan)[0]).with_metadata(None)
    name = pool.input_path.name if not ingests else f"urls-{len(ingests):05d}.parquet"
    n = _write_listed(pool.input_path.parent / name, cfg, part_files, schema, starts, first_shard,
                      dropped_dir if dropped_dir and written_files(dropped_dir) else None, read_where)  # fmt: skip
    ingest = {"file": name, "first_shard": first_shard, "num_shards": -(-n // cfg.samples_per_shard),
              "first_row": first_row, "source_rows": int(counts.sum()), "num_rows": n,
              "duplicates_dropped": int(counts.sum()) - n,
              "ingested_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "files": [_file_record(f, int(c)) for f, c in zip(files, counts, strict=True)]}  # fmt: skip
    plan = _plan_of(source, cfg, [*ingests, ingest], attempts=plan.get("download_attempts", False) if plan else True)
    write_json_atomic(pool.plan_path, plan)  # last: the plan marks the input prepared
    shutil.rmtree(work)
    return plan


def _plan_of(source: Path, cfg: DownloadConfig, ingests: list[dict[str, Any]], attempts: bool) -> dict[str, Any]:
    """``input/plan.json``: the totals over every ingest, the settings that shard the input, the ingests
    (``download_attempts``: the download table records ``attempts``; a pool prepared before has none)."""
    return {
        "source": str(source.resolve()) if source.exists() else str(source),
        "source_files": sum(len(i["files"] or []) for i in ingests),
        "source_sha256": _ingested_digest(source, ingests),
        "source_rows": sum(i["source_rows"] for i in ingests),
        "duplicates_dropped": sum(i["duplicates_dropped"] for i in ingests),
        "num_rows": sum(i["num_rows"] for i in ingests),
        "num_shards": ingests[-1]["first_shard"] + ingests[-1]["num_shards"],
        **_plan_settings(cfg),
        **({"download_attempts": True} if attempts else {}),
        "ingests": ingests,
    }


def _repeats(engine: Any, cfg: DownloadConfig, tables: dict[str, Any], key: str, rows: str, files: list[Path],
             work: Path, discard: Any) -> Path | None:  # fmt: skip
    """Repeated uids among the new rows (and against the rows ingested before): with
    ``download.uid_col`` a repeat is refused, naming both places (``discard`` first removes the
    scratch); else every occurrence but the first is written, sorted by file, to a folder returned
    (read back per file)."""
    if cfg.uid_col:
        repeat = engine.query(f"SELECT uid, min(k) AS lo, max(k) AS hi FROM ({rows}) r GROUP BY uid "
                              "HAVING count(*) > 1 ORDER BY hi LIMIT 1", tables)  # fmt: skip
        if repeat.num_rows:
            discard()
            lo = repeat["lo"][0].as_py()
            first = (f"shard {lo + 2**31:05d} of the pool (ingested before)" if lo < 0 else _where_in(files, lo))
            raise InputError(f"uid {repeat['uid'][0].as_py()} is given twice: {first} and "
                             f"{_where_in(files, repeat['hi'][0].as_py())}; "
                             f"uids in download.uid_col ({cfg.uid_col!r}) must be unique")  # fmt: skip
        return None
    dropped_dir = work / "dropped"
    sql = (f"SELECT p.file_id, p.file_row FROM (SELECT uid, file_id, file_row, {key} AS k FROM parts) p "
           f"JOIN (SELECT uid, min(k) AS first FROM ({rows}) r GROUP BY uid HAVING count(*) > 1) d "
           "ON p.uid = d.uid WHERE p.k <> d.first")  # fmt: skip
    engine.write(sql, tables, dropped_dir, order_by="file_id")
    return dropped_dir


def _discard(work: Path, first: bool = True, made_root: bool = False) -> None:
    """Remove the preparation's scratch (and, on the first ingest, ``input/`` if it held nothing
    else, and the pool's folder if this run made it and it is empty): a refused list leaves the
    pool as it was."""
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    if first:
        for folder in (work.parent, work.parent.parent) if made_root else (work.parent,):
            with contextlib.suppress(OSError):  # not empty, or never made
                folder.rmdir()


def _write_listed(out: Path, cfg: DownloadConfig, part_files: list[Path], schema: pa.Schema, starts: np.ndarray,
                  first_shard: int, dropped_dir: Path | None, read_where: Any) -> int:  # fmt: skip
    """Stream the parts, in file order and without the dropped repeats, into ``out``: one row group
    of exactly ``samples_per_shard`` rows per shard, the first being ``first_shard``. Holds one
    shard and one batch."""
    from pipeline.store.parquet import atomic_path

    per = cfg.samples_per_shard
    written, pending, pending_rows = 0, [], 0

    def flush(writer: Any, last: bool) -> None:
        nonlocal written, pending, pending_rows
        while pending_rows >= per or (last and pending_rows):
            table = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
            take = min(per, table.num_rows)
            head, rest = table.slice(0, take), table.slice(take)
            columns = head.columns
            shard = first_shard + written // per
            columns[head.schema.get_field_index(S.SHARD)] = pa.array(np.full(take, shard, np.int32))
            writer.write_table(pa.Table.from_arrays(columns, schema=writer.schema), row_group_size=per)
            written += take
            pending, pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for file_id, path in enumerate(part_files):
            drop = None
            if dropped_dir is not None:
                found = read_where(dropped_dir, "file_id", file_id, ["file_row"])
                drop = found["file_row"].combine_chunks() if found is not None and found.num_rows else None
            # one row group after another on this thread: the threaded reader reads ahead, and its
            # buffers grew the writer's peak with the parts' size
            part = pq.ParquetFile(path, pre_buffer=False)
            for batch in part.iter_batches(batch_size=_BATCH_ROWS, use_threads=False):
                rows = pa.Table.from_batches([batch])
                if drop is not None:
                    rows = rows.filter(pc.invert(pc.is_in(rows["file_row"], value_set=drop)))
                global_row = pc.add(rows["file_row"], pa.scalar(int(starts[file_id]), pa.int64()))
                out = {S.ROW: global_row, S.UID: rows[S.UID], S.URL: rows[S.URL], S.CAPTION: rows[S.CAPTION],
                       S.SHARD: pa.nulls(rows.num_rows, pa.int32())}  # fmt: skip
                out.update({f.name: rows[f.name] for f in schema if f.name not in out})
                pending.append(_conform_listed(pa.table(out), schema))
                pending_rows += rows.num_rows
                flush(writer, last=False)
        flush(writer, last=True)
    return written


def _conform_listed(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table``'s columns in ``schema``'s order and types (a part's extra column may be all-null)."""
    return pa.Table.from_arrays([table[f.name].cast(f.type) for f in schema], schema=schema.with_metadata(None))


# --- one shard ----------------------------------------------------------------------------------


def stage_hash(cfg: DownloadConfig) -> str:
    """Hash of the settings that shape the download's output (not the worker counts)."""
    return config_hash(cfg, exclude=_RUNTIME_FIELDS)


def _install_opener(cfg: DownloadConfig) -> None:
    """The urllib opener img2dataset fetches with, in this worker, for one shard (:class:`_Polite`):
    redirects only to http(s), every response read under ``download.deadline``, at most
    ``per_host_concurrency`` requests in flight to one host, ``Retry-After`` honoured, and nothing
    fetched past the shard's ``shard_time_limit``.

    img2dataset's ``download_image`` opens each URL with ``urllib.request.urlopen`` (which calls the
    installed opener's ``open``) and reads the body whole inside a ``with``. Its fetch function is
    used unchanged, not forked: everything here wraps the opener it calls. Installed before each
    shard's download (the shard's clock starts then).
    """
    import time
    import urllib.request
    from urllib.error import HTTPError
    from urllib.parse import urlsplit

    class HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
            if urlsplit(newurl).scheme.lower() not in _FETCHED_SCHEMES:
                raise HTTPError(newurl, code, f"redirect to a non-http(s) URL refused: {newurl}", headers, fp)
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    end = None if cfg.shard_time_limit is None else time.monotonic() + cfg.shard_time_limit
    urllib.request.install_opener(_Polite(urllib.request.build_opener(HttpOnlyRedirects), cfg, end))


_HOST_SLOTS: dict[tuple[str, int], Any] = {}  # per (host, limit): a semaphore shared by this worker's download threads


def _host_slot(host: str, limit: int) -> Any:
    import threading

    slot = _HOST_SLOTS.get((host, limit))
    if slot is None:
        slot = _HOST_SLOTS.setdefault((host, limit), threading.BoundedSemaphore(limit))
    return slot


class _Polite:
    """An opener (what ``urllib.request.urlopen`` calls ``open`` on) around urllib's own:

    - ``download.per_host_concurrency``: a request holds one of its host's slots (a semaphore per
      host, shared by the worker's threads) from connecting until its response is closed;
    - HTTP 429/503 with ``Retry-After`` (seconds or an HTTP date): the slot is released, the thread
      sleeps that long and asks again, while the waits for this URL sum to at most
      ``download.retry_after_max`` and end before the shard's time limit; past that, the error
      stands (``http_429``/``http_5xx``, retriable later);
    - the shard's time limit (``end``, monotonic): no request starts after it, and a response being
      read ends at it, as ``stalled`` (:class:`_Deadline`).
    """

    def __init__(self, opener: Any, cfg: DownloadConfig, end: float | None):
        self.opener, self.cfg, self.end = opener, cfg, end

    def _past_end(self) -> None:
        import time

        if self.end is not None and time.monotonic() >= self.end:
            raise TimeoutError(f"stalled: {self._limit_reached()}")

    def open(self, fullurl: Any, data: Any = None, timeout: Any = None) -> Any:
        import time
        from urllib.error import HTTPError
        from urllib.parse import urlsplit

        url = fullurl if isinstance(fullurl, str) else fullurl.full_url
        host = (urlsplit(url).hostname or "").lower()
        limit = self.cfg.per_host_concurrency
        waited = 0.0
        while True:
            self._past_end()
            slot = _host_slot(host, limit) if limit else None
            if slot is not None:
                slot.acquire()
            try:
                response = self.opener.open(fullurl, data, timeout)
            except HTTPError as err:
                if slot is not None:
                    slot.release()
                pause = _retry_after(err)
                if pause is None or waited + pause > self.cfg.retry_after_max or (
                        self.end is not None and time.monotonic() + pause >= self.end):  # fmt: skip
                    raise
                err.close()
                time.sleep(pause)
                waited += pause
                continue
            except BaseException:
                if slot is not None:
                    slot.release()
                raise
            stop, why = None, ""
            if self.cfg.deadline is not None:
                stop = time.monotonic() + self.cfg.deadline
                why = f"the response did not finish within download.deadline ({self.cfg.deadline:g} s)"
            if self.end is not None and (stop is None or self.end < stop):
                stop, why = self.end, self._limit_reached()
            return _Deadline(response, stop, why, slot)

    def _limit_reached(self) -> str:
        return f"the shard's time limit (download.shard_time_limit, {self.cfg.shard_time_limit:g} s) was reached"


def _retry_after(err: Any) -> float | None:
    """The seconds an HTTP 429 or 503 asks to wait (``Retry-After``: seconds or an HTTP date), or None."""
    import email.utils
    import time

    if err.code not in (429, 503) or err.headers is None:
        return None
    value = (err.headers.get("Retry-After") or "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _Deadline:
    """A urllib response whose body must arrive by ``stop`` (monotonic; None: no limit): read in
    pieces (each one socket read), and a ``TimeoutError`` whose text starts ``stalled`` (the error
    class) with ``why`` once the time is up. Closing it releases its host slot. Everything else is
    the response's own."""

    def __init__(self, response: Any, stop: float | None, why: str, slot: Any = None):
        self._response, self._stop, self._why, self._slot = response, stop, why, slot

    def __getattr__(self, name: str) -> Any:
        return getattr(self._response, name)

    def __enter__(self) -> _Deadline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._response.close()
        finally:
            slot, self._slot = self._slot, None
            if slot is not None:
                slot.release()

    def read(self, amt: int | None = None) -> bytes:
        import time

        if self._stop is None:
            return self._response.read() if amt is None else self._response.read(amt)
        parts, size = [], 0
        while amt is None or size < amt:
            if time.monotonic() > self._stop:
                raise TimeoutError(f"stalled: {self._why}")
            piece = self._response.read1(65536 if amt is None else min(65536, amt - size))
            if not piece:
                break
            parts.append(piece)
            size += len(piece)
        return b"".join(parts)


def downloader(cfg: DownloadConfig, out_dir: Path, column_list: list[str]) -> Any:
    """img2dataset's ``Downloader`` and ``Resizer`` set up as its ``download()`` would for ``cfg``,
    with its ``BoundingBoxBlurrer`` when ``bbox_col`` is set (as ``download(bbox_col=...)`` does)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    resizer = Resizer(
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        resize_only_if_bigger=cfg.resize_only_if_bigger,
        encode_quality=cfg.encode_quality,
        encode_format=cfg.encode_format,
        min_image_size=cfg.min_image_size,
        max_image_area=cfg.max_image_area,
        max_aspect_ratio=cfg.max_aspect_ratio if cfg.max_aspect_ratio is not None else float("inf"),
        blurrer=_blurrer() if cfg.bbox_col else None,
    )
    _install_opener(cfg)  # after the imports: a fresh worker's import time is not the shard's time
    return Downloader(
        sample_writer_class=WebDatasetSampleWriter,
        resizer=resizer,
        thread_count=cfg.threads,
        save_caption=cfg.caption_col is not None,
        extract_exif=True,
        output_folder=str(out_dir),
        column_list=column_list,
        timeout=cfg.timeout,
        number_sample_per_shard=cfg.samples_per_shard,
        oom_shard_count=5,
        compute_hash=S.SHA256,
        verify_hash_type=None,
        encode_format=cfg.encode_format,
        retries=cfg.retries,
        user_agent_token=cfg.user_agent_token,
        disallowed_header_directives=list(cfg.disallowed_header_directives) or None,
        blurring_bbox_col=cfg.bbox_col,
    )


def _blurrer() -> Any:
    from img2dataset.blurrer import BoundingBoxBlurrer

    return BoundingBoxBlurrer()


def write_feather(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def download_table(schema: pa.Schema, cfg: DownloadConfig, fetched: pa.Table, refused: pa.Table,
                    skipped: pa.Table, shard: int) -> pa.Table:  # fmt: skip
    """img2dataset's sidecar rows plus the refused and unselected URLs, in input order, as the pool's
    download schema (with a ``bbox_col``: ``blurred``, a fetched image with at least one box)."""
    parts = [fetched.append_column(S.ATTEMPTS, pa.array(np.ones(fetched.num_rows, np.int32)))]
    for rows, status, reason in ((refused, S.STATUS_INVALID_URL, "unsupported URL: only http:// and https:// URLs "
                                  "are fetched"), (skipped, S.STATUS_NOT_SELECTED, None)):  # fmt: skip
        rows = rows.append_column(S.STATUS, pa.array([status] * rows.num_rows, pa.string()))
        rows = rows.append_column(S.ATTEMPTS, pa.array(np.zeros(rows.num_rows, np.int32)))
        parts.append(rows.append_column(S.ERROR, pa.array([reason] * rows.num_rows, pa.string())))
    if cfg.bbox_col:
        for i, part in enumerate(parts):
            has_box = pc.fill_null(pc.greater(pc.list_value_length(part[cfg.bbox_col]), 0), False)
            parts[i] = part.append_column(S.BLURRED, pc.and_(pc.equal(part[S.STATUS], S.STATUS_SUCCESS), has_box))
    parts = [t.drop_columns([S.SHARD]) if S.SHARD in t.column_names else t for t in parts]
    both = pa.concat_tables(
        [S.conform(t.append_column(S.SHARD, pa.array([shard] * t.num_rows, pa.int32())), schema) for t in parts]
    )  # fmt: skip
    return both.sort_by(S.ROW)


class Download(Step):
    """``tables/download`` and ``shards/{shard}.tar`` (+ sidecar, stats): img2dataset's per-shard
    ``Downloader`` over the shard's listed rows that ``download.where`` selects and that are
    http(s) URLs; the others are recorded as ``invalid_url`` or ``not_selected``."""

    name = STAGE
    schema = S.DOWNLOAD_SCHEMA  # plus the input's extra columns: the instance carries the pool's
    files = (".tar", ".parquet", "_stats.json")
    forgets_downstream = True

    def __init__(self, pool: Pool, cfg: DownloadConfig, where: Where | None):
        declared = pool.declared_schema(STAGE)
        listed = tuple(pq.read_schema(pool.listed_paths()[0]).names)
        super().__init__(reads=(Read(LISTED, listed),), digest=stage_hash(cfg), where=where)
        self.cfg, self.schema = cfg, declared  # the digest covers cfg, download.where included
        self.root = str(pool.root)  # part of the set-up key: a worker never takes one pool's step for another's

    def produce(self, inputs: dict[str, pa.Table], shard: int, scratch: Path) -> pa.Table:
        name = shard_name(shard)
        rows = inputs[LISTED]
        chosen = inputs.get(SELECTED)
        wanted = (pa.array([True] * rows.num_rows) if chosen is None
                  else pc.is_in(rows[S.UID], value_set=chosen[S.UID].combine_chunks()))  # fmt: skip
        fetchable = pc.fill_null(pc.match_substring_regex(rows[S.URL], r"^https?://", ignore_case=True), False)
        feather = scratch / f"{name}.feather"
        extras = [c for c in rows.column_names if c not in S.INPUT_SCHEMA.names]
        to_fetch = rows.filter(pc.and_(wanted, fetchable)).select([S.URL, S.CAPTION, S.UID, S.ROW, *extras])
        write_feather(feather, to_fetch)
        downloader(self.cfg, scratch, to_fetch.column_names).download_shard((shard, str(feather)))
        table = download_table(self.schema, self.cfg, pq.read_table(scratch / f"{name}.parquet"),
                                rows.filter(pc.and_(wanted, pc.invert(fetchable))), rows.filter(pc.invert(wanted)),
                                shard)  # fmt: skip
        if table.num_rows != rows.num_rows:
            raise RuntimeError(f"shard {name}: {rows.num_rows} rows in, {table.num_rows} rows out")
        return table

    def counts(self, out: pa.Table) -> dict[str, int]:
        """Samples by status, failed samples by error class (``error:<class>``), ``samples`` and,
        with a ``bbox_col``, ``blurred``."""
        from pipeline.download.errors import CLASS_PREFIX, class_counts

        counts = {k: int(v) for k, v in zip(*_value_counts(out[S.STATUS]), strict=True)}
        counts.update({CLASS_PREFIX + k: v for k, v in class_counts(out).items()})
        counts["samples"] = out.num_rows
        if self.cfg.bbox_col:
            counts["blurred"] = int(pc.sum(out[S.BLURRED]).as_py() or 0)
        return counts


def _value_counts(column: pa.ChunkedArray) -> tuple[list[str], list[int]]:
    vc = pc.value_counts(column)
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()


# --- the stage ----------------------------------------------------------------------------------


def check_where(pool: Pool, where: str) -> list[str]:
    """The stages ``download.where`` reads, each finished on every listed shard (else a row of an
    unfinished shard would read NULL and silently not be fetched).

    Raises:
        InputError: it reads a column known only after the download, a column no finished stage
            has, or a stage with unfinished shards.
    """
    from pipeline.sqlsafe import column_refs

    listed = set(pq.read_schema(pool.listed_paths()[0]).names)
    after = set(pool.declared_schema(STAGE).names) - listed
    owner: dict[str, str] = {}
    for stage in pool.stages():
        if stage != STAGE:
            done = pool.done_shards(stage)
            for name in pool.declared_schema(stage, pool.table_path(stage, done[0])).names:
                owner.setdefault(name, stage)
    refs = column_refs(where)
    late = sorted(refs & after - set(owner))
    if late:
        raise InputError(f"download.where reads {', '.join(late)}, known only after the download")
    unknown = sorted(refs - listed - set(owner))
    if unknown:
        raise InputError(f"download.where reads {', '.join(unknown)}, which no finished stage has: run the "
                         "stages it reads (MetaCLIP with only_downloaded: false, the caption scores) first")
    stages = sorted({owner[c] for c in refs if c in owner and c not in listed})
    for stage in stages:
        pool.require_complete(stage)
    return stages


def check_config(pool: Pool, cfg: DownloadConfig) -> None:
    """Record the download's settings on the first run; refuse a run whose output-shaping settings
    differ from those the finished shards were made with (:meth:`Pool.check_stage_config`)."""
    pool.check_stage_config(STAGE, config_dict(cfg, _RUNTIME_FIELDS), stage_hash(cfg))


def plan_shards(pool: Pool, cfg: DownloadConfig, engine: Any,
                shards: list[int] | None = None) -> tuple[dict[str, Any], list[int]]:  # fmt: skip
    """Prepare the pool's input and return its plan and the shards not yet downloaded (with a
    ``where``: once the stages it reads are finished). ``shards``: a batch already planned (the
    input was prepared): only its markers are read."""
    plan = prepare(pool, cfg, engine) if shards is None else pool.read_plan()
    check_config(pool, cfg)
    candidates = range(plan["num_shards"]) if shards is None else shards
    todo = [s for s in candidates if not pool.is_done(STAGE, s)]
    if todo and cfg.where is not None:
        check_where(pool, cfg.where)
    return plan, todo


def run_download(
    pool: Pool, cfg: DownloadConfig, engine: Any, shards: list[int] | None = None, progress: bool = True
) -> dict[int, dict[str, int]]:
    """Download ``shards`` (default: prepare the input, then every unfinished shard; given: a batch
    of an input already prepared, of which only the unfinished shards run) with ``engine``.

    Returns:
        Counts by shard for the shards this call finished.

    Raises:
        InputError: the URL list is unusable or differs from the one the pool was prepared from.
        ShardFailures: some shards failed; the others are finished and kept.
    """
    todo = plan_shards(pool, cfg, engine, shards)[1]
    if todo:
        where = bind(pool, cfg.where, "download.where", skip=(STAGE,)) if cfg.where is not None else None
        watch = _Health(cfg, download_totals(pool))
        runner.run_step(pool, engine, Download(pool, cfg, where), todo, progress=progress, on_result=watch)
    pool.update_manifest()
    return {s: pool.marker(STAGE, s)["counts"] for s in todo}


class _Health:
    """The early warning (:func:`pipeline.download.errors.health_warning`): the pool's download
    counts so far plus each shard's as it finishes; the warning is logged once per run."""

    def __init__(self, cfg: DownloadConfig, totals: Counter[str]):
        self.cfg, self.totals, self.warned = cfg, totals, False

    def __call__(self, shard: int, counts: dict[str, int]) -> None:
        from pipeline.download.errors import health_warning

        self.totals.update(counts)
        if not self.warned:
            line = health_warning(dict(self.totals), self.cfg.warn_success_rate, self.cfg.warn_min_samples)
            if line is not None:
                self.warned = True
                log.warning("%s", line)


def download_totals(pool: Pool) -> Counter[str]:
    """The download markers' counts summed over the pool's finished shards (by status and error class)."""
    totals: Counter[str] = Counter()
    for marker in pool.completed(STAGE).values():
        totals.update(marker["counts"])
    return totals
