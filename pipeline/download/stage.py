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


def _read_csv(path: Path, fmt: str, columns: list[str]) -> pa.Table:
    import pyarrow.csv as pacsv

    parse = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)
    try:
        with pacsv.open_csv(path, parse_options=parse) as reader:
            names = reader.schema.names
    except pa.ArrowInvalid as exc:
        raise InputError(f"{path}: cannot read as {fmt.upper()}: {exc}") from None
    _require_columns(path, names, columns)
    convert = pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.binary() for c in columns})
    try:
        return pacsv.read_csv(path, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as exc:
        raise InputError(f"{path}: cannot read as {fmt.upper()}: {exc}") from None


def _read_jsonl(path: Path, columns: list[str]) -> pa.Table:
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
    for c in columns:
        for i, row in enumerate(rows):
            if not isinstance(row.get(c), str | None):
                raise InputError(f"{path}: object {i + 1}: {c!r} is {type(row[c]).__name__}, not a string")
    return pa.table({c: pa.array([r.get(c) for r in rows], pa.string()) for c in columns})


def read_url_list(path: str | Path, cfg: DownloadConfig) -> pa.Table:
    """Read and validate a URL list into ``url`` and ``caption`` string columns.

    Raises:
        InputError: the file is missing, empty, unreadable, lacks the url/caption column, or holds a
            caption that is not valid UTF-8 (the message names the file and the row).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: URL list not found")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty")
    fmt = cfg.input_format or _infer_format(path)
    columns = [cfg.url_col] + ([cfg.caption_col] if cfg.caption_col else [])
    if fmt == "parquet":
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{path}: cannot read as Parquet: {exc}") from None
        _require_columns(path, parquet.schema_arrow.names, columns)
        table = parquet.read(columns=columns)
    elif fmt in ("csv", "tsv"):
        table = _read_csv(path, fmt, columns)
    else:
        table = _read_jsonl(path, columns)
    if table.num_rows == 0:
        raise InputError(f"{path}: the file holds no rows")
    url = _utf8(table[cfg.url_col], path, f"url column {cfg.url_col!r}")
    caption = (
        _utf8(table[cfg.caption_col], path, f"caption column {cfg.caption_col!r}")
        if cfg.caption_col
        else pa.chunked_array([pa.nulls(table.num_rows, pa.string())])
    )
    return pa.table({S.URL: url, S.CAPTION: caption})


def _check_same_input(pool: Pool, plan: dict[str, Any], digest: str | None, cfg: DownloadConfig) -> None:
    now = {"source_sha256": digest, "samples_per_shard": cfg.samples_per_shard,
           "url_col": cfg.url_col, "caption_col": cfg.caption_col}  # fmt: skip
    if digest is None:  # the source is gone; the prepared copy in the pool is all a resume needs
        del now["source_sha256"]
    changed = [f"{k}: {plan[k]!r} -> {v!r}" for k, v in now.items() if plan.get(k) != v]
    if changed:
        raise InputError(
            f"{pool.root} was prepared from {plan['source']} and this run differs ({'; '.join(changed)}). "
            "Use a new pool directory for a new URL list."
        )


def prepare(pool: Pool, cfg: DownloadConfig) -> dict[str, Any]:
    """Validate the URL list and write ``input/urls.parquet`` and ``input/plan.json`` once.

    Rows get a ``uid`` (:func:`pipeline.store.schema.make_uid`); exact repeats of a (url, caption)
    pair are the same sample and keep their first occurrence only. Shard ``s`` is row group ``s`` of
    ``urls.parquet`` (``samples_per_shard`` rows each), so shard membership never changes on a
    re-run. Nothing is written unless the whole list is valid. Later runs check that the same list
    and sharding are asked for.
    """
    source = Path(cfg.input)
    plan = pool.read_plan()
    if plan is not None:
        _check_same_input(pool, plan, file_sha256(source) if source.is_file() else None, cfg)
        return plan
    table = read_url_list(source, cfg)
    uids = [S.make_uid(u, c) for u, c in zip(table[S.URL].to_pylist(), table[S.CAPTION].to_pylist(), strict=True)]
    seen: set[str] = set()
    first = [not (u in seen or seen.add(u)) for u in uids]  # type: ignore[func-returns-value]
    prepared = pa.table(
        {S.ROW: pa.array(range(table.num_rows), pa.int64()), S.UID: pa.array(uids, pa.string()),
         S.URL: table[S.URL], S.CAPTION: table[S.CAPTION]},
        schema=S.INPUT_SCHEMA,
    ).filter(pa.array(first))  # fmt: skip
    write_parquet_atomic(pool.input_path, prepared, row_group_size=cfg.samples_per_shard)
    n = prepared.num_rows
    plan = {
        "source": str(source.resolve()),
        "source_sha256": file_sha256(source),
        "source_rows": table.num_rows,
        "duplicates_dropped": table.num_rows - n,
        "num_rows": n,
        "samples_per_shard": cfg.samples_per_shard,
        "num_shards": -(-n // cfg.samples_per_shard),
        "url_col": cfg.url_col,
        "caption_col": cfg.caption_col,
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
    )


def _write_feather(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _download_table(fetched: pa.Table, refused: pa.Table, shard: int) -> pa.Table:
    """img2dataset's sidecar rows plus the refused URLs, in input order, as the download schema."""
    reason = "unsupported URL: only http:// and https:// URLs are fetched"
    refused = refused.append_column(S.STATUS, pa.array([S.STATUS_INVALID_URL] * refused.num_rows))
    refused = refused.append_column(S.ERROR, pa.array([reason] * refused.num_rows))
    both = pa.concat_tables(
        [S.conform(t.append_column(S.SHARD, pa.array([shard] * t.num_rows, pa.int32())), S.DOWNLOAD_SCHEMA)
         for t in (fetched, refused)]
    )  # fmt: skip
    return both.sort_by(S.ROW)


def download_shard(pool_root: str, cfg: DownloadConfig, shard: int) -> dict[str, int]:
    """Download one shard into the pool and mark it done. Safe to re-run after a kill.

    Returns:
        Sample counts by status, plus ``samples``.
    """
    pool = Pool(pool_root)
    name = shard_name(shard)
    # a shard downloaded again (its files were damaged) may hold other images: what later stages
    # made of the old one is no longer theirs to keep, so their markers for it go first
    pool.forget_shard(shard, keep=(STAGE,))
    rows = pq.ParquetFile(pool.input_path).read_row_group(shard)
    fetchable = pc.fill_null(pc.match_substring_regex(rows[S.URL], r"^https?://", ignore_case=True), False)
    staging = pool.staging_dir / STAGE
    staging.mkdir(parents=True, exist_ok=True)
    for stale in staging.glob(f"{name}*"):
        stale.unlink()
    feather = staging / f"{name}.feather"
    to_fetch = rows.filter(fetchable).select([S.URL, S.CAPTION, S.UID, S.ROW])
    _write_feather(feather, to_fetch)
    _downloader(cfg, staging, to_fetch.column_names).download_shard((shard, str(feather)))

    table = _download_table(pq.read_table(staging / f"{name}.parquet"), rows.filter(pc.invert(fetchable)), shard)
    if table.num_rows != rows.num_rows:
        raise RuntimeError(f"shard {name}: {rows.num_rows} rows in, {table.num_rows} rows out")
    pool.write_table(STAGE, shard, table)
    (pool.root / "shards").mkdir(parents=True, exist_ok=True)
    for suffix in (".tar", ".parquet", "_stats.json"):
        os.replace(staging / f"{name}{suffix}", pool.root / "shards" / f"{name}{suffix}")
    counts = {k: int(v) for k, v in zip(*_value_counts(table[S.STATUS]), strict=True)}
    counts["samples"] = table.num_rows
    shard_files = [pool.root / "shards" / f"{name}{suffix}" for suffix in (".tar", ".parquet", "_stats.json")]
    pool.mark_done(STAGE, shard, stage_hash(cfg), counts, files=[pool.table_path(STAGE, shard), *shard_files])
    return counts


def _value_counts(column: pa.ChunkedArray) -> tuple[list[str], list[int]]:
    vc = pc.value_counts(column)
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()


# --- the stage ----------------------------------------------------------------------------------


def plan_shards(pool: Pool, cfg: DownloadConfig) -> tuple[dict[str, Any], list[int]]:
    """Prepare the pool's input and return its plan and the shards not yet downloaded."""
    plan = prepare(pool, cfg)
    pool.check_stage_config(STAGE, config_dict(cfg, _RUNTIME_FIELDS), stage_hash(cfg))
    todo = [s for s in range(plan["num_shards"]) if not pool.is_done(STAGE, s)]
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
