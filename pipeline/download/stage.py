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

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import DownloadConfig, config_dict, config_hash
from pipeline.errors import UserError
from pipeline.store import schema as S
from pipeline.store.parquet import Pool, file_sha256, shard_name, write_json_atomic, write_parquet_atomic

STAGE = "download"
_FETCHED_SCHEMES = ("http", "https")
# Fields that change where or how fast the work runs, never its output.
_RUNTIME_FIELDS = ("input", "processes", "threads", "shards_per_task")


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


def _utf8(column: pa.ChunkedArray, path: Path, name: str) -> pa.ChunkedArray:
    """``column`` as valid UTF-8 strings, or an error naming the first bad row (1-based, no header)."""
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
                    f"{path}: row {i + 1}: {name} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
                ) from None
        raise


def _read_csv(path: Path, fmt: str, columns: list[str], text: list[str]) -> pa.Table:
    import pyarrow.csv as pacsv

    parse = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)
    try:
        with pacsv.open_csv(path, parse_options=parse) as reader:
            names = reader.schema.names
    except pa.ArrowInvalid as exc:
        raise InputError(f"{path}: cannot read as {fmt.upper()}: {exc}") from None
    _require_columns(path, names, columns)
    # every column as bytes: the text ones are checked for UTF-8 below, an extra one stays a string
    convert = pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.binary() for c in columns})
    try:
        table = pacsv.read_csv(path, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as exc:
        raise InputError(f"{path}: cannot read as {fmt.upper()}: {exc}") from None
    for name in columns:
        if name not in text:
            table = table.set_column(table.column_names.index(name), name, _utf8(table[name], path, repr(name)))
    return table


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


def _check_uids(uids: pa.ChunkedArray, path: Path, name: str) -> None:
    """32 lowercase hex digits per row (DataComp's uids), none missing; the first bad row is named."""
    ok = pc.fill_null(pc.match_substring_regex(uids, _UID_PATTERN), False).combine_chunks()
    if not pc.all(ok).as_py():
        i = int(pc.index(ok, False).as_py())
        raise InputError(f"{path}: row {i + 1}: uid column {name!r} holds {uids[i].as_py()!r}; "
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


def read_url_list(path: str | Path, cfg: DownloadConfig) -> pa.Table:
    """Read and validate one URL list file into ``url`` and ``caption`` string columns, then
    ``uid`` (with ``uid_col``), the ``extra_cols`` and the ``bbox_col`` under their own names.

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
    columns = text + list(cfg.extra_cols) + ([cfg.bbox_col] if cfg.bbox_col else [])
    if fmt == "parquet":
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{path}: cannot read as Parquet: {exc}") from None
        _require_columns(path, parquet.schema_arrow.names, columns)
        table = parquet.read(columns=columns)
    elif fmt in ("csv", "tsv"):
        if cfg.bbox_col:
            raise InputError(f"{path}: download.bbox_col needs a Parquet or JSONL list (boxes are lists)")
        table = _read_csv(path, fmt, columns, text)
    else:
        table = _read_jsonl(path, columns, text)
    if table.num_rows == 0:
        raise InputError(f"{path}: the file holds no rows")
    url = _utf8(table[cfg.url_col], path, f"url column {cfg.url_col!r}")
    caption = (
        _utf8(table[cfg.caption_col], path, f"caption column {cfg.caption_col!r}")
        if cfg.caption_col
        else pa.chunked_array([pa.nulls(table.num_rows, pa.string())])
    )
    out = {S.URL: url, S.CAPTION: caption}
    if cfg.uid_col:
        out[S.UID] = _utf8(table[cfg.uid_col], path, f"uid column {cfg.uid_col!r}")
        _check_uids(out[S.UID], path, cfg.uid_col)
    for name in cfg.extra_cols:
        out[name] = table[name]
    if cfg.bbox_col:
        out[cfg.bbox_col] = _check_boxes(table[cfg.bbox_col], path, cfg.bbox_col)
    return pa.table(out)


def input_files(source: Path) -> list[Path]:
    """The URL list's files: the file itself, or a folder's ``*.parquet`` files in name order."""
    if not source.is_dir():
        return [source]
    files = sorted(p for p in source.glob("*.parquet") if p.is_file())
    if not files:
        raise InputError(f"{source}: the folder holds no .parquet file")
    return files


def source_digest(source: Path) -> str | None:
    """sha256 of the URL list (of each file's name and sha256, for a folder); None when it is gone."""
    if not source.exists():
        return None
    if not source.is_dir():
        return file_sha256(source)
    import hashlib

    h = hashlib.sha256()
    for path in input_files(source):
        h.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return h.hexdigest()


def _check_reserved(cfg: DownloadConfig) -> None:
    taken = sorted((set(cfg.extra_cols) | {cfg.bbox_col} - {None}) & S.reserved_columns())  # type: ignore[operator]
    if taken:
        raise InputError(
            f"download.extra_cols/bbox_col: {', '.join(map(repr, taken))} would replace a column the pool computes "
            "(the download recomputes original_width, original_height and sha256 from the fetched image); "
            "leave it out or rename it in the input"
        )


_PLAN_KEYS = ("samples_per_shard", "url_col", "caption_col", "uid_col", "extra_cols", "bbox_col")


def _check_same_input(pool: Pool, plan: dict[str, Any], digest: str | None, cfg: DownloadConfig) -> None:
    now: dict[str, Any] = {"source_sha256": digest, **_plan_settings(cfg)}
    if digest is None:  # the source is gone; the prepared copy in the pool is all a resume needs
        del now["source_sha256"]
    was = {k: plan.get(k, [] if k == "extra_cols" else None) for k in now}  # plans made before a key existed
    changed = [f"{k}: {was[k]!r} -> {v!r}" for k, v in now.items() if was[k] != v]
    if changed:
        raise InputError(
            f"{pool.root} was prepared from {plan['source']} and this run differs ({'; '.join(changed)}). "
            "Use a new pool directory for a new URL list."
        )


def _plan_settings(cfg: DownloadConfig) -> dict[str, Any]:
    return {"samples_per_shard": cfg.samples_per_shard, "url_col": cfg.url_col, "caption_col": cfg.caption_col,
            "uid_col": cfg.uid_col, "extra_cols": list(cfg.extra_cols), "bbox_col": cfg.bbox_col}  # fmt: skip


def _first_repeat(uids: pa.ChunkedArray) -> tuple[int, int] | None:
    """The 0-based rows of the first uid given twice, or None."""
    table = pa.table({"uid": uids, "i": pa.array(range(len(uids)), pa.int64())})
    groups = table.group_by("uid", use_threads=False).aggregate([("i", "min"), ("i", "max"), ("i", "count")])
    repeated = groups.filter(pc.greater(groups["i_count"], 1))
    if repeated.num_rows == 0:
        return None
    first = repeated.sort_by("i_max").slice(0, 1)
    return int(first["i_min"][0].as_py()), int(first["i_max"][0].as_py())


def prepare(pool: Pool, cfg: DownloadConfig) -> dict[str, Any]:
    """Validate the URL list and write ``input/urls.parquet`` and ``input/plan.json`` once.

    Rows get a ``uid``: the list's own (``uid_col``: checked to be 32 lowercase hex digits and
    unique), or :func:`pipeline.store.schema.make_uid`, in which case exact repeats of a (url,
    caption) pair are the same sample and keep their first occurrence only. A folder's Parquet
    files are read in name order and numbered as one list. Shard ``s`` is row group ``s`` of
    ``urls.parquet`` (``samples_per_shard`` rows each), so shard membership never changes on a
    re-run. Nothing is written unless the whole list is valid. Later runs check that the same list
    and sharding are asked for.
    """
    source = Path(cfg.input)
    plan = pool.read_plan()
    if plan is not None:
        _check_same_input(pool, plan, source_digest(source), cfg)
        return plan
    if not source.exists():
        raise InputError(f"{source}: URL list not found")
    _check_reserved(cfg)
    files = input_files(source)
    parts = [read_url_list(path, cfg) for path in files]
    table = pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]
    rows = pa.array(range(table.num_rows), pa.int64())
    if cfg.uid_col:
        repeat = _first_repeat(table[S.UID])
        if repeat is not None:
            starts = np.cumsum([0] + [p.num_rows for p in parts])
            where = [f"{files[int(np.searchsorted(starts, r, 'right')) - 1]} row "
                     f"{r - starts[int(np.searchsorted(starts, r, 'right')) - 1] + 1}" for r in repeat]  # fmt: skip
            raise InputError(f"uid {table[S.UID][repeat[0]].as_py()} is given twice: {where[0]} and {where[1]}; "
                             f"uids in download.uid_col ({cfg.uid_col!r}) must be unique")  # fmt: skip
        uids, first = table[S.UID], None
    else:
        made = [S.make_uid(u, c) for u, c in zip(table[S.URL].to_pylist(), table[S.CAPTION].to_pylist(), strict=True)]
        seen: set[str] = set()
        first = pa.array([not (u in seen or seen.add(u)) for u in made])  # type: ignore[func-returns-value]
        uids = pa.array(made, pa.string())
    extras = [c for c in table.column_names if c not in (S.URL, S.CAPTION, S.UID)]
    prepared = pa.table({S.ROW: rows, S.UID: uids, S.URL: table[S.URL], S.CAPTION: table[S.CAPTION],
                         **{c: table[c] for c in extras}})  # fmt: skip
    if first is not None:
        prepared = prepared.filter(first)
    n = prepared.num_rows
    shard = pa.array(np.arange(n, dtype=np.int64) // cfg.samples_per_shard, pa.int32())
    prepared = prepared.add_column(4, S.SHARD, shard)
    schema = pa.schema(list(S.INPUT_SCHEMA) + [prepared.schema.field(c) for c in extras])
    write_parquet_atomic(pool.input_path, prepared.cast(schema), row_group_size=cfg.samples_per_shard)
    plan = {
        "source": str(source.resolve()),
        "source_files": len(files),
        "source_sha256": source_digest(source),
        "source_rows": table.num_rows,
        "duplicates_dropped": table.num_rows - n,
        "num_rows": n,
        "num_shards": -(-n // cfg.samples_per_shard),
        **_plan_settings(cfg),
    }
    write_json_atomic(pool.plan_path, plan)
    return plan


# --- one shard ----------------------------------------------------------------------------------


def stage_hash(cfg: DownloadConfig) -> str:
    """Hash of the settings that shape the download's output (not the worker counts)."""
    return config_hash(cfg, exclude=_RUNTIME_FIELDS)


def _http_only_redirects() -> None:
    """Make urllib (which img2dataset fetches with) refuse redirects to anything but http(s).

    The input is checked for http(s) URLs, but urllib's default redirect handler would still follow
    a server's redirect to ``ftp://``. Installed once per worker process, before any download.
    """
    import urllib.request
    from urllib.error import HTTPError
    from urllib.parse import urlsplit

    class HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
            if urlsplit(newurl).scheme.lower() not in _FETCHED_SCHEMES:
                raise HTTPError(newurl, code, f"redirect to a non-http(s) URL refused: {newurl}", headers, fp)
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    urllib.request.install_opener(urllib.request.build_opener(HttpOnlyRedirects))


def _downloader(cfg: DownloadConfig, out_dir: Path, column_list: list[str]) -> Any:
    """img2dataset's ``Downloader`` and ``Resizer`` set up as its ``download()`` would for ``cfg``,
    with its ``BoundingBoxBlurrer`` when ``bbox_col`` is set (as ``download(bbox_col=...)`` does)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    _http_only_redirects()
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


def _write_feather(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _download_table(pool: Pool, cfg: DownloadConfig, fetched: pa.Table, refused: pa.Table, skipped: pa.Table,
                    shard: int) -> pa.Table:  # fmt: skip
    """img2dataset's sidecar rows plus the refused and unselected URLs, in input order, as the pool's
    download schema (with a ``bbox_col``: ``blurred``, a fetched image with at least one box)."""
    schema = pool.declared_schema(STAGE)
    parts = [fetched]
    for rows, status, reason in ((refused, S.STATUS_INVALID_URL, "unsupported URL: only http:// and https:// URLs "
                                  "are fetched"), (skipped, S.STATUS_NOT_SELECTED, None)):  # fmt: skip
        rows = rows.append_column(S.STATUS, pa.array([status] * rows.num_rows, pa.string()))
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


def selected(pool: Pool, shard: int, where: str | None) -> pa.Array | None:
    """The uids of ``shard`` that ``download.where`` selects (None: every row)."""
    if where is None:
        return None
    from pipeline.query import select_uids

    return select_uids(pool, shard, where)


def download_shard(pool_root: str, cfg: DownloadConfig, shard: int) -> dict[str, int]:
    """Download one shard into the pool and mark it done. Safe to re-run after a kill.

    Returns:
        Sample counts by status, plus ``samples``.
    """
    pool = Pool(pool_root)
    name = shard_name(shard)
    # a shard downloaded again (its files were damaged) may hold other images: what later stages
    # made of the old one is no longer theirs to keep, so their markers for it go first (a first
    # download keeps what the text stages made of its captions before it: ``download.where``)
    if pool.marker_path(STAGE, shard).exists() or pool.table_path(STAGE, shard).exists():
        pool.forget_shard(shard, keep=(STAGE,))
    rows = pq.ParquetFile(pool.input_path).read_row_group(shard)
    chosen = selected(pool, shard, cfg.where)
    wanted = pa.array([True] * rows.num_rows) if chosen is None else pc.is_in(rows[S.UID], value_set=chosen)
    fetchable = pc.fill_null(pc.match_substring_regex(rows[S.URL], r"^https?://", ignore_case=True), False)
    staging = pool.staging_dir / STAGE
    staging.mkdir(parents=True, exist_ok=True)
    for stale in staging.glob(f"{name}*"):
        stale.unlink()
    feather = staging / f"{name}.feather"
    extras = [c for c in rows.column_names if c not in S.INPUT_SCHEMA.names]
    to_fetch = rows.filter(pc.and_(wanted, fetchable)).select([S.URL, S.CAPTION, S.UID, S.ROW, *extras])
    _write_feather(feather, to_fetch)
    _downloader(cfg, staging, to_fetch.column_names).download_shard((shard, str(feather)))

    table = _download_table(pool, cfg, pq.read_table(staging / f"{name}.parquet"),
                            rows.filter(pc.and_(wanted, pc.invert(fetchable))), rows.filter(pc.invert(wanted)),
                            shard)  # fmt: skip
    if table.num_rows != rows.num_rows:
        raise RuntimeError(f"shard {name}: {rows.num_rows} rows in, {table.num_rows} rows out")
    pool.write_table(STAGE, shard, table)
    (pool.root / "shards").mkdir(parents=True, exist_ok=True)
    for suffix in (".tar", ".parquet", "_stats.json"):
        os.replace(staging / f"{name}{suffix}", pool.root / "shards" / f"{name}{suffix}")
    counts = {k: int(v) for k, v in zip(*_value_counts(table[S.STATUS]), strict=True)}
    counts["samples"] = table.num_rows
    if cfg.bbox_col:
        counts["blurred"] = int(pc.sum(table[S.BLURRED]).as_py() or 0)
    shard_files = [pool.root / "shards" / f"{name}{suffix}" for suffix in (".tar", ".parquet", "_stats.json")]
    pool.mark_done(STAGE, shard, stage_hash(cfg), counts, files=[pool.table_path(STAGE, shard), *shard_files])
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

    listed = set(pq.read_schema(pool.input_path).names)
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


def plan_shards(pool: Pool, cfg: DownloadConfig) -> tuple[dict[str, Any], list[int]]:
    """Prepare the pool's input and return its plan and the shards not yet downloaded (with a
    ``where``: once the stages it reads are finished)."""
    plan = prepare(pool, cfg)
    pool.check_stage_config(STAGE, config_dict(cfg, _RUNTIME_FIELDS), stage_hash(cfg))
    todo = [s for s in range(plan["num_shards"]) if not pool.is_done(STAGE, s)]
    if todo and cfg.where is not None:
        check_where(pool, cfg.where)
    return plan, todo


def run_download(
    pool: Pool, cfg: DownloadConfig, engine: Any, shards: list[int] | None = None, progress: bool = True
) -> dict[int, dict[str, int]]:
    """Download ``shards`` (default: every unfinished shard) with ``engine``.

    Returns:
        Counts by shard for the shards this call finished.

    Raises:
        InputError: the URL list is unusable or differs from the one the pool was prepared from.
        ShardFailures: some shards failed; the others are finished and kept.
    """
    from pipeline.engines.base import raise_failures

    _, todo = plan_shards(pool, cfg)
    if shards is not None:
        pending = set(todo)
        todo = [s for s in shards if s in pending]
    fn = functools.partial(download_shard, str(pool.root), cfg)
    result = engine.map_download(fn, todo, desc=STAGE, staging=pool.staging_dir, weights=pool.shard_sizes(todo),
                                 progress=progress)  # fmt: skip
    pool.update_manifest()
    raise_failures(pool, STAGE, result)
    return {s: pool.marker(STAGE, s)["counts"] for s in todo}
