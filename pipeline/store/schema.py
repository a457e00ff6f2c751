"""Column contracts: every column name and Arrow schema a stage reads or writes lives here.

A sample is identified across every table of a pool by ``uid`` (see :func:`pipeline.store.schema.make_uid`).
Stages declare the columns they read and write as module constants below, so a change of contract is
one edit in one place.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa

UID = "uid"
SHARD = "shard"
KEY = "key"
ROW = "row"
URL = "url"
CAPTION = "caption"
STATUS = "status"
ERROR = "error_message"
WIDTH = "width"
HEIGHT = "height"
LISTED = "listed"  # the prepared URL list (input/urls*.parquet): every row, before any download
ORIGINAL_WIDTH = "original_width"
ORIGINAL_HEIGHT = "original_height"
SHA256 = "sha256"
ATTEMPTS = "attempts"

# Download statuses: img2dataset's own two failure classes plus the URLs we refuse to fetch.
STATUS_SUCCESS = "success"
STATUS_FAILED_DOWNLOAD = "failed_to_download"
STATUS_FAILED_RESIZE = "failed_to_resize"
STATUS_INVALID_URL = "invalid_url"
STATUS_NOT_SELECTED = "not_selected"  # left out by ``download.where`` (curated before the download)
# the class of a failed row, derived from status and error_message in the download view
# (:mod:`pipeline.download.errors`), never stored: a pool downloaded before it has the column too
ERROR_CLASS = "error_class"
STATUSES = (STATUS_SUCCESS, STATUS_FAILED_DOWNLOAD, STATUS_FAILED_RESIZE, STATUS_INVALID_URL, STATUS_NOT_SELECTED)
BLURRED = "blurred"

# The prepared URL list (``input/urls.parquet``, the ``listed`` view): the input after validation,
# deduplication and uid assignment; ``download.extra_cols`` (and ``bbox_col``) follow these columns.
INPUT_SCHEMA = pa.schema(
    [
        pa.field(ROW, pa.int64(), nullable=False),  # 0-based row of the user's file (files in name order)
        pa.field(UID, pa.string(), nullable=False),
        pa.field(URL, pa.string()),
        pa.field(CAPTION, pa.string()),
        pa.field(SHARD, pa.int32(), nullable=False),
    ]
)

LISTED_WIDTH = "listed_width"  # the input's own original size (download.size_cols: DataComp's metadata)
LISTED_HEIGHT = "listed_height"

# tables/download/{shard:05d}.parquet: one row per input row of the shard, whatever its fate.
DOWNLOAD_SCHEMA = pa.schema(
    [
        pa.field(UID, pa.string(), nullable=False),
        pa.field(SHARD, pa.int32(), nullable=False),
        pa.field(KEY, pa.string()),  # WebDataset __key__ inside shards/{shard:05d}.tar; null if never written
        pa.field(ROW, pa.int64(), nullable=False),
        pa.field(URL, pa.string()),
        pa.field(CAPTION, pa.string()),
        pa.field(STATUS, pa.string(), nullable=False),
        pa.field(ERROR, pa.string()),
        pa.field(WIDTH, pa.int32()),  # stored image, after resizing
        pa.field(HEIGHT, pa.int32()),
        pa.field(ORIGINAL_WIDTH, pa.int32()),  # as served, before resizing (DataComp's basic filter uses these)
        pa.field(ORIGINAL_HEIGHT, pa.int32()),
        pa.field(SHA256, pa.string()),  # of the downloaded bytes, before any re-encoding
        pa.field(ATTEMPTS, pa.int32()),  # times fetched (0: never; a retry pass adds one, download.max_attempts)
    ]
)



def download_schema(extra: list[pa.Field] | None = None, attempts: bool = True) -> pa.Schema:
    """The ``download`` table of a pool whose input carries ``extra`` columns (``download.extra_cols``,
    ``bbox_col`` and, with a ``bbox_col``, ``blurred``) after the declared ones; without ``attempts``
    for a pool prepared before the column existed (its plan has no ``download_attempts``)."""
    declared = [f for f in DOWNLOAD_SCHEMA if attempts or f.name != ATTEMPTS]
    return pa.schema(declared + list(extra or []))


MATCHED_ENTRY_IDS = "matched_entry_ids"
COUNTED = "counted"
METACLIP_P = "metaclip_p"
METACLIP_KEEP = "metaclip_keep"

# tables/metaclip_match/{shard:05d}.parquet: substring matches (MetaCLIP Sec. 3.2).
METACLIP_MATCH_SCHEMA = pa.schema(
    [
        pa.field(UID, pa.string(), nullable=False),
        pa.field(SHARD, pa.int32(), nullable=False),
        pa.field(MATCHED_ENTRY_IDS, pa.list_(pa.int32()), nullable=False),
        pa.field(COUNTED, pa.bool_(), nullable=False),  # counted towards the pool's entry counts
    ]
)

# tables/metaclip/{shard:05d}.parquet: balancing (MetaCLIP Sec. 3.3).
METACLIP_SCHEMA = pa.schema(
    [
        pa.field(UID, pa.string(), nullable=False),
        pa.field(SHARD, pa.int32(), nullable=False),
        pa.field(METACLIP_P, pa.float64(), nullable=False),  # 1 - prod(1 - min(1, t / count_e))
        pa.field(METACLIP_KEEP, pa.bool_(), nullable=False),
    ]
)

# aggregates/metaclip_entry_counts.parquet: one row per metadata entry.
ENTRY_COUNTS_SCHEMA = pa.schema(
    [
        pa.field("entry_id", pa.int32(), nullable=False),
        pa.field("entry", pa.string(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),  # counted samples matching the entry
        pa.field("p", pa.float64(), nullable=False),  # min(1, t / count)
        pa.field("kept", pa.int64(), nullable=False),  # kept samples matching the entry
    ]
)

# Small per-shard aggregates that a pool-wide step sums with SQL (files under aggregates/).
# metaclip/{counts,kept}/{shard}.parquet: matched or kept samples per metadata entry.
ENTRY_N_SCHEMA = pa.schema([("entry_id", pa.int32()), ("n", pa.int64())])
# metaclip_lang_{counts,kept}/{shard}.parquet (worldwide): the same per (metadata language, entry).
LANG_ENTRY_N_SCHEMA = pa.schema([("lang", pa.string()), ("entry_id", pa.int32()), ("n", pa.int64())])
# aggregates/metaclip_lang_entries.parquet (worldwide): one row per (language, entry) that matched.
LANG_ENTRY_COUNTS_SCHEMA = pa.schema(
    [
        pa.field("lang", pa.string(), nullable=False),
        pa.field("entry_id", pa.int32(), nullable=False),
        pa.field("entry", pa.string(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),  # counted samples of the language matching the entry
        pa.field("p", pa.float64(), nullable=False),  # min(1, t_lang / count)
        pa.field("kept", pa.int64(), nullable=False),
    ]
)
# metaclip_lang_samples/{shard}.parquet (worldwide): counted, matched and kept samples per language.
LANG_SAMPLES_SCHEMA = pa.schema([("lang", pa.string()), ("counted", pa.int64()), ("matched", pa.int64()),
                                 ("kept", pa.int64())])  # fmt: skip
# aggregates/metaclip_languages.parquet (worldwide): one row per metadata language (and "other").
METACLIP_LANGUAGES_SCHEMA = pa.schema(
    [
        pa.field("lang", pa.string(), nullable=False),
        pa.field("entries", pa.int64(), nullable=False),  # the language's list (0: no list)
        pa.field("entries_matched", pa.int64(), nullable=False),
        pa.field("matches", pa.int64(), nullable=False),  # counted (sample, entry) matches
        pa.field("t", pa.float64(), nullable=False),  # t_en, or p_to_t(counts, p)
        pa.field("tail_share", pa.float64()),  # share of matches in entries with count < t
        pa.field("samples", pa.int64(), nullable=False),  # counted samples folded onto the language
        pa.field("kept", pa.int64(), nullable=False),
    ]
)
# rebalance/kept/{shard}.parquet: kept samples per group.
GROUP_N_SCHEMA = pa.schema([("g", pa.int64()), ("n", pa.int64())])
# dedup/assign/{shard}.parquet: each embedded sample's nearest centre, its cosine distance and its
# vector's bytes (the regroup sort writes them cluster by cluster for SemDeDup).
DEDUP_ASSIGN_SCHEMA = pa.schema([("shard", pa.int32()), ("uid", pa.string()), ("cluster", pa.int32()),
                                 ("cos_dist", pa.float64()), ("vector", pa.binary())])  # fmt: skip
# dedup/{exact,semantic}/*.parquet: a dropped duplicate and the sample it duplicates.
DUP_DROPS_SCHEMA = pa.schema([("shard", pa.int32()), ("uid", pa.string()), ("dup_of", pa.string())])
# embed_import/index/{file}.parquet: where each uid's vectors sit in an imported embedding file.
IMPORT_INDEX_SCHEMA = pa.schema([("uid", pa.string()), ("file_id", pa.int32()), ("row", pa.int64()),
                                 ("score", pa.float32())])  # fmt: skip

IMAGE_EMBEDDING = "image_embedding"
TEXT_EMBEDDING = "text_embedding"
CLIP_SCORE = "clip_score"
DECODE_ERROR = "decode_error"
MODEL = "model"
CHECKPOINT_SHA256 = "checkpoint_sha256"
CAPTION_EMBEDDING = "caption_embedding"
CAPTION_MODEL = "caption_model"


SCORER_PREFIX = "clip_score_"  # clip_score_<name>: a further model's cosine of the pair (embed.scorers)
WATERMARK = "watermark"  # LAION-5B's watermark detector: P(watermark) in [0, 1] (embed.watermark)


def embed_schema(dim: int, scorers: tuple[str, ...] = (), watermark: bool = False) -> pa.Schema:
    """tables/embed/{shard:05d}.parquet: one row per sample in the shard's tar.

    Embeddings are L2-normalised float16 fixed-size lists: DuckDB reads them as FLOAT[dim] and numpy
    views them without a copy (``column.values.to_numpy().reshape(-1, dim)``). Each of ``scorers``
    (``embed.scorers``' names) adds ``clip_score_<name>``, then ``watermark`` (``embed.watermark``)
    comes last.
    """
    return pa.schema(
        [
            pa.field(UID, pa.string(), nullable=False),
            pa.field(SHARD, pa.int32(), nullable=False),
            pa.field(IMAGE_EMBEDDING, pa.list_(pa.float16(), dim)),  # null when the image did not decode
            pa.field(TEXT_EMBEDDING, pa.list_(pa.float16(), dim)),
            pa.field(CLIP_SCORE, pa.float32()),  # cos(image, text) in [-1, 1] (DataComp)
            pa.field(DECODE_ERROR, pa.string()),
            pa.field(MODEL, pa.string(), nullable=False),
            pa.field(CHECKPOINT_SHA256, pa.string(), nullable=False),
            *(pa.field(f"{SCORER_PREFIX}{name}", pa.float32()) for name in scorers),  # null where undecoded
            *([pa.field(WATERMARK, pa.float32())] if watermark else []),  # null where undecoded
        ]
    )


def scorers_of(schema: pa.Schema) -> tuple[str, ...]:
    """The further scorers' names an embed table's schema carries."""
    return tuple(n.removeprefix(SCORER_PREFIX) for n in schema.names if n.startswith(SCORER_PREFIX))


def vectors(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An embedding column (fixed-size lists) as a ``(rows, dim)`` array of its stored dtype: a view
    without a copy for a single chunk. Null rows come back as their (meaningless) slots."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


def vector_column(vectors: np.ndarray, valid: np.ndarray | None = None, dtype: Any = np.float16) -> pa.Array:
    """A ``(rows, dim)`` array as an embedding column: fixed-size lists of ``dtype`` (float16, the
    stored form); rows where ``valid`` is False are null, their slots zeros."""
    vectors = np.where(valid[:, None], vectors, 0) if valid is not None else vectors
    values = pa.array(np.ascontiguousarray(vectors, dtype=dtype).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(values, vectors.shape[1], mask=None if valid is None else pa.array(~valid))


def caption_embed_schema(dim: int) -> pa.Schema:
    """tables/caption_embed/{shard:05d}.parquet: caption embeddings for clustering (MoDE)."""
    return pa.schema(
        [
            pa.field(UID, pa.string(), nullable=False),
            pa.field(SHARD, pa.int32(), nullable=False),
            pa.field(CAPTION_EMBEDDING, pa.list_(pa.float16(), dim), nullable=False),
            pa.field(CAPTION_MODEL, pa.string(), nullable=False),
        ]
    )


FINE_ID = "fine_id"
EXPERT_ID = "expert_id"
FINE_DISTANCE = "fine_distance"
FINE_ID_PLAIN = "fine_id_plain"
REBALANCE_P = "rebalance_p"
REBALANCE_KEEP = "rebalance_keep"

# tables/mode/{shard:05d}.parquet: MoDE assignment of each captioned sample.
MODE_SCHEMA = pa.schema(
    [
        pa.field(UID, pa.string(), nullable=False),
        pa.field(SHARD, pa.int32(), nullable=False),
        pa.field(FINE_ID, pa.int32(), nullable=False),
        pa.field(EXPERT_ID, pa.int32(), nullable=False),
        pa.field(FINE_DISTANCE, pa.float32(), nullable=False),  # to the fine centre (cosine: 1 - cos)
        pa.field(FINE_ID_PLAIN, pa.int32(), nullable=False),  # nearest plain (unbalanced) k-means centre
    ]
)

# tables/rebalance/{shard:05d}.parquet: long-tail rebalancing draws.
REBALANCE_SCHEMA = pa.schema(
    [
        pa.field(UID, pa.string(), nullable=False),
        pa.field(SHARD, pa.int32(), nullable=False),
        pa.field(REBALANCE_P, pa.float64(), nullable=False),
        pa.field(REBALANCE_KEEP, pa.bool_(), nullable=False),
    ]
)

LANG = "lang"
LANG_SCORE = "lang_score"
CAPTION_WORDS = "caption_words"
CAPTION_TOKENS = "caption_tokens"
CAPTION_CHARS = "caption_chars"
MIN_SIDE = "min_side"
ASPECT_RATIO = "aspect_ratio"
TEXT_ENTITY = "text_entity"
IMAGE_CLUSTER = "image_cluster"
IMAGE_TARGET = "image_target"
DUP_GROUP = "dup_group"
DUP_KIND = "dup_kind"
DEDUP_KEEP = "dedup_keep"
KEEP = "keep"
DROP_REASON = "drop_reason"

# tables/filters/{shard:05d}.parquet: per-sample scores of DataComp's caption and size rules.
FILTERS_SCHEMA = pa.schema(
    [
        pa.field(UID, pa.string(), nullable=False),
        pa.field(SHARD, pa.int32(), nullable=False),
        pa.field(LANG, pa.string()),  # fastText lid.176 top label; null for a null caption
        pa.field(LANG_SCORE, pa.float32()),
        pa.field(CAPTION_WORDS, pa.int32(), nullable=False),  # len(caption.split())
        pa.field(CAPTION_TOKENS, pa.int32(), nullable=False),  # fastText tokenizer count
        pa.field(CAPTION_CHARS, pa.int32(), nullable=False),  # len(caption), code points
        pa.field(MIN_SIDE, pa.int32()),  # min(original_width, original_height); null if not downloaded
        pa.field(ASPECT_RATIO, pa.float64()),  # max / min of the original size
        pa.field(TEXT_ENTITY, pa.bool_(), nullable=False),  # a word's first WordNet sense is ImageNet-21k
    ]
)

# tables/image_based/{shard:05d}.parquet: DataComp's image-based filter (nearest pool centroid).
IMAGE_BASED_SCHEMA = pa.schema(
    [
        pa.field(UID, pa.string(), nullable=False),
        pa.field(SHARD, pa.int32(), nullable=False),
        pa.field(IMAGE_CLUSTER, pa.int32()),  # null without an image embedding
        pa.field(IMAGE_TARGET, pa.bool_()),  # the cluster is nearest to some target embedding
    ]
)

# tables/dedup/{shard:05d}.parquet: exact (image sha256) and semantic (SemDeDup) duplicates.
DEDUP_SCHEMA = pa.schema(
    [
        pa.field(UID, pa.string(), nullable=False),
        pa.field(SHARD, pa.int32(), nullable=False),
        pa.field(DUP_GROUP, pa.string()),  # uid of the group's first kept sample; null if unique
        pa.field(DUP_KIND, pa.string()),  # why it is dropped: "exact" or "semantic"; null if kept
        pa.field(DEDUP_KEEP, pa.bool_(), nullable=False),
    ]
)

# tables/decisions/{shard:05d}.parquet: a recipe's verdict.
DECISIONS_SCHEMA = pa.schema(
    [
        pa.field(UID, pa.string(), nullable=False),
        pa.field(SHARD, pa.int32(), nullable=False),
        pa.field(KEEP, pa.bool_(), nullable=False),
        pa.field(DROP_REASON, pa.string()),  # the first failing rule; null when kept
    ]
)

AESTHETIC = "aesthetic"
NSFW = "nsfw"
# tables/quality/{shard:05d}.parquet: scoring heads over the image embedding (pipeline.quality); a score is
# null where the image has no embedding or the head is not configured
QUALITY_SCHEMA = pa.schema(
    [
        pa.field(UID, pa.string(), nullable=False),
        pa.field(SHARD, pa.int32(), nullable=False),
        pa.field(AESTHETIC, pa.float32()),  # LAION's aesthetic predictor (v1 linear or the improved v2 MLP)
        pa.field(NSFW, pa.float32()),  # LAION's CLIP-based NSFW detector: 0 (safe) .. 1 (autokeras port)
    ]
)

STAGE_SCHEMAS: dict[str, pa.Schema] = {
    "quality": QUALITY_SCHEMA,
    "mode": MODE_SCHEMA,
    "rebalance": REBALANCE_SCHEMA,
    "download": DOWNLOAD_SCHEMA,
    "metaclip_match": METACLIP_MATCH_SCHEMA,
    "metaclip": METACLIP_SCHEMA,
    "filters": FILTERS_SCHEMA,
    "image_based": IMAGE_BASED_SCHEMA,
    "dedup": DEDUP_SCHEMA,
    "decisions": DECISIONS_SCHEMA,
}


def reserved_columns() -> set[str]:
    """Every column a stage writes: an input column carried into ``download`` must not take one."""
    names = {f.name for schema in STAGE_SCHEMAS.values() for f in schema}
    names |= set(embed_schema(1, watermark=True).names) | set(caption_embed_schema(1).names)
    names |= {BLURRED, "exif", LISTED_WIDTH, LISTED_HEIGHT}
    return names


def make_uid(url: str | None, caption: str | None) -> str:
    """Stable 128-bit sample id: ``md5(url + "\\x00" + caption)`` as 32 hex digits.

    md5 is used as a fingerprint, not for security: it is 128 bits, fast, and built into DuckDB and
    Spark SQL (``md5(concat(url, chr(0), coalesce(caption, '')))``), so any engine or an ad-hoc
    query recomputes the same id. A null caption hashes like an empty one.
    """
    data = (url or "").encode("utf-8") + b"\x00" + (caption or "").encode("utf-8")
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast ``table``'s columns to ``schema`` (missing nullable columns become nulls)."""
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table[field.name].cast(field.type))
        elif field.nullable:
            columns.append(pa.nulls(table.num_rows, field.type))
        else:
            raise KeyError(f"column {field.name!r} is required by the schema but missing")
    return pa.Table.from_arrays(columns, schema=schema)
