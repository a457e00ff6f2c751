"""The quality stage: LAION's aesthetic and NSFW scores of each sample's stored image embedding
(``tables/quality``), from the user's own weights (:mod:`pipeline.quality.heads`).

One step over the embed table's image vectors; the heads are checked on the driver (keys, shapes,
the pool's embedding width) before any task starts, and loaded once per worker. A sample without an
image embedding (it did not decode) gets null scores, which every rule fails.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.config import HeadConfig, QualityConfig
from pipeline.core import runner
from pipeline.core.step import Read, Step
from pipeline.quality.heads import Head, load_head
from pipeline.store import schema as S
from pipeline.store.parquet import Pool, file_sha256

if TYPE_CHECKING:
    from pipeline.engines.base import Engine

STAGE = "quality"
VERSION = "quality-v1"
HEADS = {S.AESTHETIC: "aesthetic", S.NSFW: "nsfw"}  # column -> the config key (and head kind)


class HeadScores(Step):
    """``tables/quality``: each configured head's score of the sample's image embedding."""

    name = STAGE
    schema = S.QUALITY_SCHEMA

    def __init__(self, cfg: QualityConfig, dim: int, digest: str):
        super().__init__(reads=(Read("embed", (S.UID, S.IMAGE_EMBEDDING)),), digest=digest)
        self.cfg, self.dim = cfg, dim
        self._heads: dict[str, Head] = {}

    def setup(self) -> None:
        if not self._heads:
            self._heads = heads_of(self.cfg, self.dim)

    def __call__(self, inputs: dict[str, pa.Table]) -> pa.Table:
        embedded = inputs["embed"]
        column = embedded[S.IMAGE_EMBEDDING].combine_chunks()
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        vectors = S.vectors(column)
        out: dict[str, Any] = {S.UID: embedded[S.UID]}
        for name, head in self._heads.items():
            out[name] = pa.array(head(vectors), pa.float32(), mask=~valid)
        return pa.table(out)


def heads_of(cfg: QualityConfig, dim: int | None) -> dict[str, Head]:
    """The configured heads by column, each checked against its layout and the width ``dim``."""
    found = {}
    for column, key in HEADS.items():
        head_cfg: HeadConfig | None = getattr(cfg, key)
        if head_cfg is not None:
            found[column] = load_head(head_cfg.weights, key, head_cfg.layout, dim)
    return found


def stage_digest(pool: Pool, cfg: QualityConfig, heads: dict[str, Head]) -> str:
    """What the scores depend on: each head's layout and weights (by content) and the embed table's
    config (another model's embeddings are scored again)."""
    from pipeline.filters.common import embed_digest

    parts = [VERSION, embed_digest(pool)]
    parts += [f"{column}:{head.layout.name}:{file_sha256(head.path)}" for column, head in sorted(heads.items())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def quality_step(pool: Pool, cfg: QualityConfig) -> HeadScores:
    """The stage's step: the heads checked on the driver against the pool's embedding width (a
    mismatch is one line naming the file before any task starts), the config recorded in the pool."""
    embedded = pool.table_schema("embed")
    dim = embedded.field(S.IMAGE_EMBEDDING).type.list_size
    heads = heads_of(cfg, dim)
    digest = stage_digest(pool, cfg, heads)
    recorded = {column: {"weights": head.path, "layout": head.layout.name} for column, head in heads.items()}
    pool.check_stage_config(STAGE, recorded, digest)
    return HeadScores(cfg, dim, digest)


def pending_quality(pool: Pool, cfg: QualityConfig, shards: list[int] | None = None) -> list[int]:
    """Embedded shards (of every one, or of ``shards``) not scored with these heads."""
    shards = pool.require_complete("embed") if shards is None else list(shards)
    return runner.plan(pool, quality_step(pool, cfg), shards)


def run_quality(pool: Pool, cfg: QualityConfig, engine: Engine, shards: list[int] | None = None,
                progress: bool = True) -> dict[int, dict[str, int]]:  # fmt: skip
    """Score ``shards`` (already planned: a batch of :func:`pending_quality`'s, whose markers are not
    read again), or, by default, every embedded shard not scored with these heads.

    Raises:
        HeadError: a weights file does not fit its layout or the pool's embeddings.
        ShardFailures: some shards failed; the others are finished and kept.
    """
    step = quality_step(pool, cfg)
    todo = runner.plan(pool, step, pool.require_complete("embed")) if shards is None else list(shards)
    done = runner.run_step(pool, engine, step, todo, progress=progress)
    pool.update_manifest()
    return done
