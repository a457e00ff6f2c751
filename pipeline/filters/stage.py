"""The filtering stage over a pool: scores, the global image-based and dedup steps, then decisions.

1. ``filters`` (per shard, in parallel): caption language and its probability, word / token /
   character counts, the original image's shorter side and aspect ratio, and whether the caption
   names an ImageNet-21k entity. These depend only on the download, not on the config.
2. ``image_based`` (global, when the recipe uses ``image_cluster``): k-means of the pool's image
   embeddings, target clusters, each sample's cluster (:mod:`pipeline.filters.image_based`).
3. ``dedup`` (global, when the recipe uses ``dedup``): exact and SemDeDup duplicates
   (:mod:`pipeline.filters.dedup`).
4. ``decisions`` (global): the recipe's rules in order over those scores (and ``clip_score`` from
   ``embed``) give ``keep`` and ``drop_reason`` (:mod:`pipeline.filters.rules`); the funnel and the
   resolved CLIP-score threshold go to ``aggregates/decisions.json`` (and so the manifest) and
   ``reports/decisions/``.

Every table has one row per sample of the download table, so ``kept + dropped`` is the pool and
``select drop_reason, count(*) from samples group by 1`` explains every sample.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import EmbedConfig, FilterConfig, config_hash
from pipeline.engines.base import run_shards
from pipeline.filters.rules import RULES, Rule, decide, get_threshold, recipe_rules
from pipeline.store import schema as S
from pipeline.store.parquet import Pool, atomic_path, file_sha256, write_json_atomic

STAGE = "filters"
IMAGE_STAGE = "image_based"
DEDUP_STAGE = "dedup"
DECISION_STAGE = "decisions"
SCORES_VERSION = "1"  # bump when a score's definition changes: every shard is scored again

_FASTTEXT_SPACE = re.compile("[ \n\r\t\v\f\x00]")


def fasttext_token_count(text: str) -> int:
    """Tokens of ``fasttext.tokenize(text)``: fastText's ``Dictionary::readWord`` splits on space,
    newline, carriage return, tab, vertical tab, form feed and NUL, and each newline is also a token
    (the end-of-sentence ``</s>``)."""
    return sum(1 for t in _FASTTEXT_SPACE.split(text) if t) + text.count("\n")


@functools.cache
def scores_digest() -> str:
    """What the scores depend on: their definitions, the language model, WordNet and ImageNet-21k ids."""
    from pipeline.filters.language import model_path
    from pipeline.filters.wordnet import FIRST_SYNSETS, imagenet21k_offsets

    h = hashlib.sha256(SCORES_VERSION.encode())
    for path in (model_path(), FIRST_SYNSETS):
        h.update(Path(path).read_bytes())
    h.update(",".join(map(str, sorted(imagenet21k_offsets()))).encode())
    return h.hexdigest()[:16]


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


def score_shard(pool_root: str, digest: str, shard: int) -> dict[str, int]:
    """Write ``tables/filters/{shard}`` and mark it done."""
    pool = Pool(pool_root)
    dl = pq.read_table(pool.table_path("download", shard),
                       columns=[S.UID, S.SHARD, S.CAPTION, S.ORIGINAL_WIDTH, S.ORIGINAL_HEIGHT])  # fmt: skip
    sizes = size_scores(dl[S.ORIGINAL_WIDTH].combine_chunks(), dl[S.ORIGINAL_HEIGHT].combine_chunks())
    columns = {S.UID: dl[S.UID], S.SHARD: dl[S.SHARD], **caption_scores(dl[S.CAPTION].to_pylist()), **sizes}
    table = pa.table({f.name: columns[f.name] for f in S.FILTERS_SCHEMA}, schema=S.FILTERS_SCHEMA)
    pool.write_table(STAGE, shard, table)
    counts = {"samples": table.num_rows, "english": int(pc.sum(pc.equal(table[S.LANG], "en")).as_py() or 0),
              "text_entity": int(pc.sum(table[S.TEXT_ENTITY]).as_py() or 0)}  # fmt: skip
    pool.mark_done(STAGE, shard, digest, counts)
    return counts


def pending_scores(pool: Pool) -> list[int]:
    shards = pool.require_complete("download")
    digest = scores_digest()
    pool.check_stage_config(STAGE, {"scores_version": SCORES_VERSION}, digest)
    return [s for s in shards if not pool.is_done(STAGE, s, digest)]


def score_shards(pool: Pool, engine: Any, shards: list[int], progress: bool = True) -> None:
    """Score ``shards`` with ``engine`` (one Prefect task per batch calls this)."""
    fn = functools.partial(score_shard, str(pool.root), scores_digest())
    run_shards(pool, engine, fn, shards, desc=STAGE, weights=pool.shard_sizes(shards), progress=progress)


# -- pool-wide columns -------------------------------------------------------------------------------


def _base(pool: Pool) -> pa.Table:
    """uid, shard, status, sha256 of every sample, in shard order: the row order of every output."""
    pool.require_complete("download")
    return pool.read_table("download", columns=[S.UID, S.SHARD, S.STATUS, S.SHA256])


def _align(base_uids: pa.ChunkedArray, table: pa.Table) -> np.ndarray:
    """Row of ``table`` holding each base uid, -1 where it has none."""
    idx = pc.index_in(base_uids, value_set=table[S.UID].combine_chunks())
    return pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _take(column: pa.ChunkedArray | pa.Array, rows: np.ndarray) -> pa.Array:
    """``column[rows]`` with nulls where ``rows`` is -1."""
    return pc.take(column, pa.array(rows, pa.int64(), mask=rows < 0))


def image_embeddings(pool: Pool, base: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(rows of ``base`` with an image embedding, their normalised float32 embeddings)."""
    embed = pool.read_table("embed", columns=[S.UID, S.IMAGE_EMBEDDING])
    embed = embed.filter(pc.is_valid(embed[S.IMAGE_EMBEDDING]))
    rows = _align(base[S.UID], embed)
    have = np.nonzero(rows >= 0)[0]
    x = S.vectors(embed[S.IMAGE_EMBEDDING])[rows[have]].astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return have, x


class PoolData:
    """The download columns and image embeddings the pool-wide steps read, loaded on first use and
    then shared, so one :func:`run_filters` reads the pool's embeddings once, not once per step."""

    def __init__(self, pool: Pool):
        self.pool = pool

    @functools.cached_property
    def base(self) -> pa.Table:
        return _base(self.pool)

    @functools.cached_property
    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        return image_embeddings(self.pool, self.base)


def _write_global(pool: Pool, stage: str, schema: pa.Schema, base: pa.Table, columns: dict[str, pa.Array],
                  digest: str, counts_of: Any) -> None:  # fmt: skip
    """Split pool-wide columns (aligned with ``base``) into ``tables/<stage>/{shard}``."""
    table = pa.table({S.UID: base[S.UID], S.SHARD: base[S.SHARD], **columns})
    pool.write_by_shard(stage, pa.table({f.name: table[f.name] for f in schema}, schema=schema), digest, counts_of)


def _stage_digest(*parts: Any) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def _embed_digest(pool: Pool) -> str:
    recorded = pool.stage_config("embed")
    return recorded["config_hash"] if recorded else "none"


def _all_done(pool: Pool, stage: str, digest: str) -> bool:
    plan = pool.read_plan() or {"num_shards": 0}
    return all(pool.is_done(stage, s, digest) for s in range(plan["num_shards"]))


def run_image_based(pool: Pool, cfg: FilterConfig, embed_cfg: EmbedConfig | None = None,
                    data: PoolData | None = None) -> dict[str, Any]:  # fmt: skip
    """Cluster the pool's image embeddings and mark the samples of target clusters."""
    from pipeline.filters.image_based import imagenet_text_targets, kmeans_l2, load_targets, nearest_by_dot

    pool.require_complete("embed")
    targets_id = _targets_id(cfg, embed_cfg)
    keys = ("image_clusters", "samples_per_image_cluster", "kmeans_iterations", "kmeans_max_points_per_centroid",
            "seed")  # fmt: skip
    digest = _stage_digest(*(getattr(cfg, k) for k in keys), targets_id, _embed_digest(pool), scores_digest())
    summary_path = pool.aggregates_dir / "image_based.json"
    if _all_done(pool, IMAGE_STAGE, digest) and summary_path.exists():
        return json.loads(summary_path.read_text())
    data = data or PoolData(pool)
    base = data.base
    have, x = data.embeddings
    filters = pool.read_table(STAGE, columns=[S.UID, S.LANG, S.CAPTION_TOKENS, S.CAPTION_CHARS])
    rows = _align(base[S.UID], filters)[have]
    caption_rules = [Rule(n, dict(RULES[n].defaults)) for n in ("english", "caption_tokens", "caption_chars")]
    scores = {c: _take(filters[c], rows).to_numpy(zero_copy_only=False) for c in filters.column_names}
    caption_ok = decide(scores, caption_rules)[0]
    train = x[caption_ok] if caption_ok.any() else x
    if not len(train):
        raise ValueError(f"{pool.root}: no image embeddings to cluster")
    k = min(len(train), cfg.image_clusters or max(1, round(len(train) / cfg.samples_per_image_cluster)))
    centroids = kmeans_l2(train, k, cfg.kmeans_iterations, cfg.seed, cfg.kmeans_max_points_per_centroid)
    if cfg.image_targets:
        targets = load_targets(cfg.image_targets)
    elif embed_cfg is not None:
        from pipeline.embed import ClipEmbedder

        targets = imagenet_text_targets(ClipEmbedder(embed_cfg))
    else:
        raise ValueError("filters.image_targets is null and there is no embed config to embed ImageNet class names")
    if targets.shape[1] != centroids.shape[1]:
        raise ValueError(f"image targets have dimension {targets.shape[1]}, the pool's embeddings {centroids.shape[1]}")
    chosen = np.unique(nearest_by_dot(targets, centroids))
    cluster = np.full(base.num_rows, -1, dtype=np.int64)
    cluster[have] = nearest_by_dot(x, centroids)
    target = np.isin(cluster, chosen)
    mask = cluster < 0
    columns = {S.IMAGE_CLUSTER: pa.array(cluster.astype(np.int32), pa.int32(), mask=mask),
               S.IMAGE_TARGET: pa.array(target, pa.bool_(), mask=mask)}  # fmt: skip
    out = pool.aggregates_dir / "image_based"
    with atomic_path(out / "centroids.npy") as tmp, tmp.open("wb") as f:
        np.save(f, centroids)
    _write_global(pool, IMAGE_STAGE, S.IMAGE_BASED_SCHEMA, base, columns, digest,
                  lambda t: {"samples": t.num_rows, "target": int(pc.sum(t[S.IMAGE_TARGET]).as_py() or 0)})  # fmt: skip
    summary = {"clusters": int(k), "train_samples": len(train), "embedded_samples": len(have),
               "targets": targets_id, "target_embeddings": len(targets), "target_clusters": len(chosen),
               "samples_in_target_clusters": int(target.sum()), "digest": digest}  # fmt: skip
    write_json_atomic(summary_path, summary)
    return summary


def _targets_id(cfg: FilterConfig, embed_cfg: EmbedConfig | None) -> str:
    if cfg.image_targets:
        return f"file:{cfg.image_targets}:{file_sha256(cfg.image_targets)[:16]}"
    if embed_cfg is None:
        return "imagenet-1k class names (no embed config)"
    return f"imagenet-1k class names, {embed_cfg.model} text tower ({config_hash(embed_cfg)})"


def run_dedup(pool: Pool, cfg: FilterConfig, engine: Any = None, data: PoolData | None = None) -> dict[str, Any]:
    """Exact duplicates by image sha256, then SemDeDup over the image embeddings of what is left."""
    from pipeline.filters.dedup import exact_groups, semdedup

    keys = ("dedup_eps", "dedup_clusters", "samples_per_dedup_cluster", "kmeans_iterations",
            "kmeans_max_points_per_centroid", "seed")  # fmt: skip
    pool.require_complete("embed")
    digest = _stage_digest(*(getattr(cfg, k) for k in keys), _embed_digest(pool))
    summary_path = pool.aggregates_dir / "dedup.json"
    if _all_done(pool, DEDUP_STAGE, digest) and summary_path.exists():
        return json.loads(summary_path.read_text())
    data = data or PoolData(pool)
    base = data.base
    n = base.num_rows
    uids = np.asarray(base[S.UID].to_pylist(), dtype=object)
    hashes = base[S.SHA256].to_numpy(zero_copy_only=False)
    downloaded = pc.equal(base[S.STATUS], S.STATUS_SUCCESS).to_numpy(zero_copy_only=False) & pc.is_valid(
        base[S.SHA256]).to_numpy(zero_copy_only=False)  # fmt: skip
    keep = np.ones(n, dtype=bool)
    kind = np.full(n, None, dtype=object)
    group = np.full(n, -1, dtype=np.int64)
    dl = np.nonzero(downloaded)[0]
    if getattr(engine, "name", "") == "spark":  # exact groups as a Spark group-by over the download tables
        from pipeline.engines import spark_steps

        reps = spark_steps.exact_duplicates(engine.spark, pool)
        position = {u: i for i, u in enumerate(uids[dl])}
        rep = np.array([position[reps[h]] if h in reps else i for i, h in enumerate(hashes[dl])], dtype=np.int64)
        size = np.where(np.isin(hashes[dl].astype(str), list(reps)), 2, 1)
    else:
        rep, size = exact_groups(uids[dl].astype(str), hashes[dl].astype(str))
    in_group = size > 1
    group[dl[in_group]] = dl[rep[in_group]]
    exact_drop = dl[rep != np.arange(len(dl))]
    keep[exact_drop] = False
    kind[exact_drop] = "exact"

    have, x = data.embeddings
    left = keep[have]
    rows = have[left]
    k = cfg.dedup_clusters or max(1, round(len(rows) / cfg.samples_per_dedup_cluster))
    sem_keep, sem_group, _ = semdedup(x[left], uids[rows].astype(str), k, cfg.dedup_eps, cfg.kmeans_iterations,
                                      cfg.seed, cfg.kmeans_max_points_per_centroid)  # fmt: skip
    sem_drop = rows[~sem_keep]
    keep[sem_drop] = False
    kind[sem_drop] = "semantic"
    linked = sem_group >= 0
    sem_rep = np.full(n, -1, dtype=np.int64)
    sem_rep[rows[linked]] = rows[sem_group[linked]]
    # an exact group joins its kept sample's semantic group
    exact_member = group >= 0
    via_rep = sem_rep[np.where(exact_member, group, 0)]
    group = np.where(sem_rep >= 0, sem_rep, np.where(exact_member & (via_rep >= 0), via_rep, group))
    has_group = group >= 0
    group_uid = pa.array(np.where(has_group, uids[np.where(has_group, group, 0)], None), pa.string())
    columns = {S.DUP_GROUP: group_uid, S.DUP_KIND: pa.array(kind, pa.string()), S.DEDUP_KEEP: pa.array(keep)}

    def counts(t: pa.Table) -> dict[str, int]:
        return {"samples": t.num_rows, "dropped": int(pc.sum(pc.invert(t[S.DEDUP_KEEP])).as_py() or 0)}

    _write_global(pool, DEDUP_STAGE, S.DEDUP_SCHEMA, base, columns, digest, counts)
    summary = {"exact_dropped": len(exact_drop), "semantic_dropped": len(sem_drop), "semantic_clusters": int(k),
               "semantic_samples": len(rows), "eps": cfg.dedup_eps,
               "groups": len(np.unique(group[has_group])),
               "digest": digest}  # fmt: skip
    write_json_atomic(summary_path, summary)
    return summary


def _decide(pool: Pool, cfg: FilterConfig, engine: Any = None, data: PoolData | None = None
            ) -> tuple[pa.Table, np.ndarray, np.ndarray, list[int], list[Rule], dict]:  # fmt: skip
    rules = recipe_rules(cfg.recipe, cfg.recipes)
    base = (data or PoolData(pool)).base
    columns: dict[str, np.ndarray] = {S.STATUS: base[S.STATUS].to_numpy(zero_copy_only=False)}
    for stage in sorted({r.definition.stage for r in rules} - {"download"}):
        needed = sorted({c for r in rules if r.definition.stage == stage for c in r.definition.columns})
        pool.require_complete(stage)
        table = pool.read_table(stage, columns=[S.UID, *needed])
        rows = _align(base[S.UID], table)
        for c in needed:
            columns[c] = _take(table[c], rows).to_numpy(zero_copy_only=False)
    thresholds = {}
    resolved = []
    for rule in rules:
        if rule.name == "clip_score" and rule.params.get("threshold") is None:
            fraction = rule.params.get("fraction")
            if fraction is None and cfg.clip_score_threshold is not None:
                rule = Rule(rule.name, {**rule.params, "threshold": cfg.clip_score_threshold})
            else:
                fraction = fraction if fraction is not None else cfg.clip_score_fraction
                if getattr(engine, "name", "") == "spark":  # the pool-wide quantile as a Spark sort
                    from pipeline.engines import spark_steps

                    threshold = spark_steps.score_threshold(engine.spark, pool, "embed", S.CLIP_SCORE, fraction)
                else:
                    threshold = get_threshold(columns[S.CLIP_SCORE], fraction)
                rule = Rule(rule.name, {**rule.params, "fraction": fraction, "threshold": threshold})
            thresholds[str(rule)] = rule.params
        resolved.append(rule)
    keep, reason, funnel = decide(columns, resolved)
    return base, keep, reason, funnel, resolved, thresholds


def recipe_keep(pool: Pool, recipe: str, recipes: dict[str, list[str]]) -> pa.Array:
    """uids a recipe keeps, from the stored scores, without writing decisions (for exports)."""
    base, keep, *_ = _decide(pool, FilterConfig(recipe=recipe, recipes=recipes))
    return base[S.UID].filter(pa.array(keep)).combine_chunks()


def run_decisions(pool: Pool, cfg: FilterConfig, engine: Any = None, data: PoolData | None = None) -> dict[str, Any]:
    """Apply the configured recipe; write ``tables/decisions``, the funnel and the summary."""
    base, keep, reason, funnel, resolved, thresholds = _decide(pool, cfg, engine, data)
    digest = _stage_digest(
        config_hash(cfg),
        [r.params for r in resolved],
        *(json.dumps(pool.completed(s).get(0, {}).get("config_hash")) for s in ("filters", "image_based", "dedup")),
    )
    _write_global(pool, DECISION_STAGE, S.DECISIONS_SCHEMA, base,
                  {S.KEEP: pa.array(keep), S.DROP_REASON: pa.array(reason, pa.string())}, digest,
                  lambda t: {"samples": t.num_rows, "kept": int(pc.sum(t[S.KEEP]).as_py() or 0)})  # fmt: skip
    reasons: dict[str, int] = {}
    for r in reason[~keep]:
        reasons[r] = reasons.get(r, 0) + 1
    summary = {
        "recipe": cfg.recipe, "rules": [str(r) for r in resolved],
        "rule_params": {r.name: r.params for r in resolved}, "clip_score_thresholds": thresholds,
        "pool_size": base.num_rows, "kept": int(keep.sum()), "dropped": int((~keep).sum()),
        "funnel": [{"rule": str(r), "left": left} for r, left in zip(resolved, funnel, strict=True)],
        "drop_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
    }  # fmt: skip
    write_json_atomic(pool.aggregates_dir / "decisions.json", summary)
    write_funnel(pool.report_dir(DECISION_STAGE), summary)
    return summary


def write_funnel(out: Path, summary: dict[str, Any]) -> None:
    """``funnel.md`` and ``funnel.json``: samples left after each rule, and the drop reasons."""
    write_json_atomic(out / "funnel.json", summary)
    total = summary["pool_size"]
    lines = [f"# Filter funnel: recipe `{summary['recipe']}`", "", f"Pool: {total} samples.", "",
             "| after rule | samples left | share of pool |", "|---|---:|---:|"]  # fmt: skip
    for step in summary["funnel"]:
        share = f"{100 * step['left'] / total:.1f}%" if total else "-"
        lines.append(f"| `{step['rule']}` | {step['left']} | {share} |")
    lines += ["", "| drop reason | samples |", "|---|---:|"]
    lines += [f"| `{k}` | {v} |" for k, v in summary["drop_reasons"].items()]
    with atomic_path(out / "funnel.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def needed_steps(cfg: FilterConfig) -> set[str]:
    """The global steps the recipe's rules read (``image_based``, ``dedup``)."""
    return {r.definition.stage for r in recipe_rules(cfg.recipe, cfg.recipes)} & {IMAGE_STAGE, DEDUP_STAGE}


def run_filters(pool: Pool, cfg: FilterConfig, engine: Any, embed_cfg: EmbedConfig | None = None,
                progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Score what is left, run the global steps the recipe needs, decide; resumes finished shards.

    Returns:
        The decision summary (also ``aggregates/decisions.json``), with the global steps' summaries.
    """
    score_shards(pool, engine, pending_scores(pool), progress)
    steps = needed_steps(cfg)
    extra = {}
    data = PoolData(pool)  # read once, shared by the steps below
    if IMAGE_STAGE in steps:
        extra[IMAGE_STAGE] = run_image_based(pool, cfg, embed_cfg, data)
    if DEDUP_STAGE in steps:
        extra[DEDUP_STAGE] = run_dedup(pool, cfg, engine, data)
    summary = run_decisions(pool, cfg, engine, data)
    pool.update_manifest()
    return {**summary, **extra, "config": dataclasses.asdict(cfg)}
