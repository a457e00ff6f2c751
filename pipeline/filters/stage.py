"""The filtering stage over a pool: scores, the global image-based and dedup steps, then decisions.

1. ``filters`` (per shard, in parallel): caption language and its probability, word / token /
   character counts, the original image's shorter side and aspect ratio, and whether the caption
   names an ImageNet-21k entity. These depend only on the download, not on the config.
2. ``image_based`` (when the recipe uses ``image_cluster``): k-means of the pool's image embeddings
   fitted on a uid-hash sample, target clusters, each sample's cluster assigned per shard
   (:mod:`pipeline.filters.image_based`).
3. ``dedup`` (when the recipe uses ``dedup``): exact duplicates in SQL, then SemDeDup per cluster
   group (:mod:`pipeline.filters.dedup`).
4. ``decisions`` (per shard, once the recipe's parameters are resolved): the recipe's rules in order
   over those scores (and ``clip_score`` from ``embed``) give ``keep`` and ``drop_reason``
   (:mod:`pipeline.filters.decisions`); the funnel and the resolved CLIP-score threshold go to
   ``aggregates/decisions.json`` (and so the manifest) and ``reports/decisions/``.

Every table has one row per sample of the download table, so ``kept + dropped`` is the pool and
``select drop_reason, count(*) from samples group by 1`` explains every sample. No step holds the
pool in memory: see the README's "Pools of any size".
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import EmbedConfig, FilterConfig
from pipeline.core import runner
from pipeline.core.step import Read, Step
from pipeline.filters.common import (  # noqa: F401 - re-exported: the stage names and digests
    DECISION_STAGE,
    DEDUP_STAGE,
    IMAGE_STAGE,
    SCORES_VERSION,
    STAGE,
    embed_digest,
    scores_digest,
    stage_digest,
)
from pipeline.filters.rules import recipe_rules
from pipeline.store import schema as S
from pipeline.store.parquet import Pool

_FASTTEXT_SPACE = re.compile("[ \n\r\t\v\f\x00]")


def fasttext_token_count(text: str) -> int:
    """Tokens of ``fasttext.tokenize(text)``: fastText's ``Dictionary::readWord`` splits on space,
    newline, carriage return, tab, vertical tab, form feed and NUL, and each newline is also a token
    (the end-of-sentence ``</s>``)."""
    return sum(1 for t in _FASTTEXT_SPACE.split(text) if t) + text.count("\n")


@functools.cache
def _matcher():
    from pipeline.filters.wordnet import EntityMatcher
    from pipeline.loads import note_load

    note_load("wordnet")
    return EntityMatcher()


def caption_scores(captions: list[str | None]) -> dict[str, Any]:
    """Language, counts and text entity of each caption (a null caption counts as empty)."""
    from pipeline.filters.language import identify

    langs, probs = identify(captions)
    texts = [c or "" for c in captions]
    matcher = _matcher()
    return {
        S.LANG: pa.array(langs, pa.string()),
        S.LANG_SCORE: pa.array(probs, pa.float32()),
        S.CAPTION_WORDS: pa.array([len(t.split()) for t in texts], pa.int32()),
        S.CAPTION_TOKENS: pa.array([fasttext_token_count(t) for t in texts], pa.int32()),
        S.CAPTION_CHARS: pa.array([len(t) for t in texts], pa.int32()),
        S.TEXT_ENTITY: pa.array([matcher.contains(t) for t in texts], pa.bool_()),
    }


def size_scores(width: pa.Array, height: pa.Array) -> dict[str, pa.Array]:
    """``min_side`` and ``aspect_ratio = max / min`` of the original size (inf for a zero side)."""
    w = pc.cast(width, pa.float64()).to_numpy(zero_copy_only=False)
    h = pc.cast(height, pa.float64()).to_numpy(zero_copy_only=False)
    known = ~(np.isnan(w) | np.isnan(h))
    lo, hi = np.fmin(w, h), np.fmax(w, h)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(lo > 0, hi / np.where(lo > 0, lo, 1), np.inf)
    return {
        S.MIN_SIDE: pa.array(np.where(known, lo, 0).astype(np.int32), pa.int32(), mask=~known),
        S.ASPECT_RATIO: pa.array(ratio, pa.float64(), mask=~known),
    }


class CaptionScores(Step):
    """``tables/filters``: each sample's caption scores and original-size scores (null before the
    shard is downloaded: curating before the download scores the listed captions, and the shard is
    scored again once downloaded). With ``listed_sizes`` (``download.size_cols``), a row not
    fetched takes the input's own size (DataComp's metadata), as DataComp's basic filter reads it."""

    name = STAGE
    schema = S.FILTERS_SCHEMA
    redo_once_downloaded = True

    def __init__(self, digest: str, listed_sizes: bool = False):
        columns = (S.UID, S.SHARD, S.CAPTION, S.ORIGINAL_WIDTH, S.ORIGINAL_HEIGHT)
        columns += (S.LISTED_WIDTH, S.LISTED_HEIGHT) if listed_sizes else ()
        super().__init__(reads=(Read("download", columns, listed_until_downloaded=True),), digest=digest)
        self.listed_sizes = listed_sizes

    def __call__(self, inputs: dict[str, pa.Table]) -> pa.Table:
        dl = inputs["download"]
        width, height = dl[S.ORIGINAL_WIDTH].combine_chunks(), dl[S.ORIGINAL_HEIGHT].combine_chunks()
        if self.listed_sizes:  # the measured size where the row was fetched, else the input's own
            width = pc.coalesce(width, dl[S.LISTED_WIDTH].combine_chunks())
            height = pc.coalesce(height, dl[S.LISTED_HEIGHT].combine_chunks())
        return pa.table({S.UID: dl[S.UID], **caption_scores(dl[S.CAPTION].to_pylist()), **size_scores(width, height)})

    def counts(self, out: pa.Table) -> dict[str, int]:
        return {"samples": out.num_rows, "english": int(pc.sum(pc.equal(out[S.LANG], "en")).as_py() or 0),
                "text_entity": int(pc.sum(out[S.TEXT_ENTITY]).as_py() or 0)}  # fmt: skip


def pending_scores(pool: Pool, listed: bool = False) -> list[int]:
    """Shards to score: of a complete download, or (``listed``) of every listed shard, downloaded
    or not (the caption rules before the download)."""
    shards = pool.listed_shards() if listed else pool.require_complete("download")
    step = scores_step(pool)
    recorded = {"scores_version": SCORES_VERSION, **({"listed_sizes": True} if step.listed_sizes else {})}
    pool.check_stage_config(STAGE, recorded, step.digest)
    return runner.plan(pool, step, shards)


def scores_step(pool: Pool) -> CaptionScores:
    """The scores step of ``pool``: with the input's own sizes where its list carries them."""
    listed_sizes = S.LISTED_WIDTH in pool.declared_schema("download").names
    return CaptionScores(scores_digest() + ("-listed-sizes" if listed_sizes else ""), listed_sizes)


def score_shards(pool: Pool, engine: Any, shards: list[int], progress: bool = True) -> None:
    """Score ``shards`` with ``engine`` (one Prefect task per batch calls this)."""
    runner.run_step(pool, engine, scores_step(pool), shards, progress=progress)


# -- pool-wide steps ---------------------------------------------------------------------------------
# Each is: a bounded aggregation or fit on the driver (SQL through the engine, or a k-means on a
# uid-hash sample), then per-shard (or per-cluster) tasks that write ``tables/<step>/{shard}``. The
# pool-wide steps live in :mod:`pipeline.filters.image_based`, :mod:`pipeline.filters.dedup` and
# :mod:`pipeline.filters.decisions`.


def needed_steps(cfg: FilterConfig) -> set[str]:
    """The global steps the recipe's rules read (``image_based``, ``dedup``)."""
    return {r.definition.stage for r in recipe_rules(cfg.recipe, cfg.recipes)} & {IMAGE_STAGE, DEDUP_STAGE}


def run_filters(pool: Pool, cfg: FilterConfig, engine: Any, embed_cfg: EmbedConfig | None = None,
                progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Score what is left, run the global steps the recipe needs, decide; resumes finished shards.

    Returns:
        The decision summary (also ``aggregates/decisions.json``), with the global steps' summaries.
    """
    from pipeline.filters.decisions import run_decisions
    from pipeline.filters.dedup import run_dedup
    from pipeline.filters.image_based import run_image_based

    score_shards(pool, engine, pending_scores(pool), progress)
    steps = needed_steps(cfg)
    extra = {}
    if IMAGE_STAGE in steps:
        extra[IMAGE_STAGE] = run_image_based(pool, cfg, engine, embed_cfg, progress=progress)
    if DEDUP_STAGE in steps:
        extra[DEDUP_STAGE] = run_dedup(pool, cfg, engine, progress=progress)
    summary = run_decisions(pool, cfg, engine, progress=progress)
    pool.update_manifest()
    return {**summary, **extra, "config": dataclasses.asdict(cfg)}
