"""DataComp's image-based filter: keep samples whose image falls in a cluster that targets select.

DataComp ("DataComp", Sec. 3.4; ``baselines/image_based_clustering.py`` and ``apply_filter.py``):

1. k-means (faiss, L2, 20 iterations) of the pool's image embeddings, after the caption filter
   (English, more than one fastText token, more than 5 characters).
2. Each target embedding (ImageNet-1k training images in DataComp) picks the pool centroid with the
   largest dot product; the set of picked centroids are the target clusters.
3. Each sample is assigned to the centroid with the largest dot product with its embedding and kept
   when that centroid is a target cluster.

Differences, all configurable: the targets default to the CLIP text embeddings of open_clip's
ImageNet-1k class names (mean of the 7 "simple" templates, normalised; zero-shot classifier
weights) because ImageNet images are not available here; any ``.npy``/``.parquet`` of embeddings
in the pool's CLIP space can replace them. faiss trains on at most
``kmeans_max_points_per_centroid * k`` points (DataComp disables that subsampling).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.core import runner
from pipeline.core.step import Read, Step
from pipeline.core.vectors import nearest
from pipeline.errors import UserError
from pipeline.store import schema as S


def nearest_by_dot(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the centroid with the largest dot product (DataComp's ``get_centroid_ids_gpu``),
    65,536 rows at a time."""
    return nearest(x, centroids, "dot", batch=65536)[0][:, 0]


def target_clusters(targets: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The sorted unique pool centroids picked by the target embeddings."""
    return np.unique(nearest_by_dot(targets, centroids))


def load_targets(path: str | Path) -> np.ndarray:
    """Target embeddings from ``.npy`` (2-D) or ``.parquet`` (an ``embedding`` list column)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: image_targets file not found")
    if path.suffix == ".npy":
        x = np.load(path, allow_pickle=False)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "embedding" not in table.column_names:
            raise UserError(f"{path}: needs an `embedding` list column; it has {table.column_names}")
        x = np.asarray(table["embedding"].to_pylist(), dtype=np.float32)
    else:
        raise UserError(f"{path}: image_targets must be .npy or .parquet")
    if x.ndim != 2 or not len(x):
        raise UserError(f"{path}: expected a non-empty 2-D array of embeddings, got shape {x.shape}")
    return x.astype(np.float32)


def load_centroids(path: str | Path, dim: int) -> np.ndarray:
    """Given pool centroids, ``(k, dim)`` float32: an ``.npy`` (no pickle), or DataComp's published
    ``{scale}_centroids`` (a NumPy array saved with ``torch.save``; read with ``weights_only=True``
    and only NumPy's array types allowed, so no other pickled code runs). Checked before any task:
    a numeric 2-D array of the pool's width with finite values, else one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"filters.image_centroids: {path} not found")
    try:
        if path.suffix == ".npy":
            x = np.load(path, allow_pickle=False)
        else:
            import torch
            from torch.serialization import safe_globals

            kinds = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.Float16DType,
                     np.dtypes.Float32DType, np.dtypes.Float64DType]  # fmt: skip
            with safe_globals(kinds):
                x = torch.load(str(path), map_location="cpu", weights_only=True)
            x = x.numpy() if hasattr(x, "numpy") else x
    except Exception as exc:  # a pickle of other objects, a truncated file, another format
        raise UserError(f"{path}: not an array of centroids ({type(exc).__name__}: {str(exc)[:200]})") from None
    x = np.asarray(x)
    if x.dtype.kind not in "fiu" or x.ndim != 2 or x.shape[1] != dim or not len(x):
        raise UserError(f"{path}: centroids must be a numeric (k, {dim}) array for this pool's {dim}-d embeddings; "
                        f"it holds {x.dtype} {x.shape}")  # fmt: skip
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise UserError(f"{path}: centroids hold NaN or Inf")
    return x


def imagenet_text_targets(embedder) -> np.ndarray:
    """Zero-shot ImageNet-1k class embeddings: per class, the normalised mean of the normalised text
    embeddings of open_clip's ``SIMPLE_IMAGENET_TEMPLATES`` filled with the class name."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, SIMPLE_IMAGENET_TEMPLATES

    embedder.setup()
    out = []
    for name in IMAGENET_CLASSNAMES:
        e = embedder.encode_texts([t(name) for t in SIMPLE_IMAGENET_TEMPLATES]).mean(axis=0)
        out.append(e / max(np.linalg.norm(e), 1e-12))
    return np.stack(out).astype(np.float32)


# -- the pool-wide step: count per shard, sample per shard, fit, assign per shard --------------------

_SAMPLE_KEY = 0x494D4753  # "IMGS": hash key of the k-means sample's draws


def _caption_ok(scores: dict[str, np.ndarray]) -> np.ndarray:
    """DataComp's caption filter before the image clustering: the recipe rules ``english``,
    ``caption_tokens`` and ``caption_chars`` with their default parameters."""
    from pipeline.filters.rules import RULES, Rule, decide

    return decide(scores, [Rule(n, dict(RULES[n].defaults)) for n in ("english", "caption_tokens", "caption_chars")])[0]


def sample_shard(pool_root: str, out_dir: str, rate: float, seed: int, captioned: bool, shard: int) -> int:
    """This shard's part of the k-means sample: embedded images (whose caption passes DataComp's
    caption filter when ``captioned``) drawn at ``rate`` by uid hash, in download order."""
    from pipeline.core.vectors import drawn, shard_vectors, write_sample
    from pipeline.store import schema as S
    from pipeline.store.parquet import Pool

    pool = Pool(pool_root)
    table = shard_vectors(pool, "embed", S.IMAGE_EMBEDDING, shard)
    if captioned:
        table = _with_caption_ok(pool, shard, table)
    table = table.filter(pa.array(drawn(table[S.UID], _SAMPLE_KEY, seed, rate)))
    uids, vectors = table[S.UID].combine_chunks(), table[S.IMAGE_EMBEDDING].combine_chunks()
    return write_sample(Path(out_dir), shard, uids, vectors)


def _with_caption_ok(pool, shard: int, table):
    import pyarrow.compute as pc

    from pipeline.store import schema as S

    columns = [S.UID, S.LANG, S.CAPTION_TOKENS, S.CAPTION_CHARS]
    scores = pool.read_shard("filters", shard, columns=columns)
    ok = _caption_ok({c: scores[c].to_numpy(zero_copy_only=False) for c in scores.column_names[1:]})
    return table.filter(pc.is_in(table[S.UID], value_set=scores[S.UID].filter(pa.array(ok)).combine_chunks()))


def count_shard(pool_root: str, shard: int) -> dict[str, int]:
    """This shard's embedded images, and those whose caption passes DataComp's caption filter: the
    population the sample is drawn from, counted by the same per-row test the sampling task applies
    (and with no pool-sized join)."""
    import pyarrow.compute as pc

    from pipeline.store import schema as S
    from pipeline.store.parquet import Pool

    pool = Pool(pool_root)
    embed = pool.read_shard("embed", shard, columns=[S.UID, S.DECODE_ERROR])
    embedded = embed[S.UID].filter(pc.is_null(embed[S.DECODE_ERROR]))  # null exactly when there is an image embedding
    captioned = _with_caption_ok(pool, shard, pa.table({S.UID: embedded}))
    return {"embedded": len(embedded), "captioned": captioned.num_rows}


@functools.lru_cache(maxsize=2)
def _centres(path: str, digest: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(path)
    return data["centroids"], data["chosen"]


class AssignImageClusters(Step):
    """``tables/image_based``: each image's nearest centroid by dot product (DataComp's
    ``get_centroid_ids_gpu``) and whether it is a target cluster; null without an image."""

    name = "image_based"
    schema = S.IMAGE_BASED_SCHEMA

    def __init__(self, centres_path: str, digest: str):
        reads = (Read("download", (S.UID,)), Read("embed", (S.UID, S.IMAGE_EMBEDDING)))
        super().__init__(reads=reads, digest=digest)
        self.centres_path = centres_path

    def setup(self) -> None:
        _centres(self.centres_path, self.digest)

    def __call__(self, inputs: dict[str, pa.Table]) -> pa.Table:
        import pyarrow.compute as pc

        from pipeline.core.vectors import as_float32

        centroids, chosen = _centres(self.centres_path, self.digest)
        base, have = inputs["download"], inputs["embed"]
        have = have.filter(pc.is_valid(have[S.IMAGE_EMBEDDING]))
        cluster = np.full(base.num_rows, -1, dtype=np.int64)
        rows = pc.index_in(have[S.UID], value_set=base[S.UID].combine_chunks()).to_numpy(zero_copy_only=False)
        if have.num_rows:
            cluster[rows] = nearest_by_dot(as_float32(have[S.IMAGE_EMBEDDING]), centroids)
        mask = cluster < 0
        return pa.table({S.UID: base[S.UID],
                         S.IMAGE_CLUSTER: pa.array(cluster.astype(np.int32), pa.int32(), mask=mask),
                         S.IMAGE_TARGET: pa.array(np.isin(cluster, chosen), pa.bool_(), mask=mask)})  # fmt: skip

    def counts(self, out: pa.Table) -> dict[str, int]:
        import pyarrow.compute as pc

        return {"samples": out.num_rows, "target": int(pc.sum(out[S.IMAGE_TARGET]).as_py() or 0)}


def _targets_id(cfg, embed_cfg) -> str:
    from pipeline.config import config_hash
    from pipeline.store.parquet import file_sha256

    if cfg.image_targets:
        return f"file:{cfg.image_targets}:{file_sha256(cfg.image_targets)[:16]}"
    if embed_cfg is None:
        return "imagenet-1k class names (no embed config)"
    return f"imagenet-1k class names, {embed_cfg.model} text tower ({config_hash(embed_cfg)})"


def _targets(cfg, embed_cfg) -> np.ndarray:
    if cfg.image_targets:
        return load_targets(cfg.image_targets)
    if embed_cfg is None:
        raise UserError("filters.image_targets is null and there is no embed config to embed ImageNet class names")
    if embed_cfg.source is not None:
        raise UserError("filters.image_targets is null, but the pool's embeddings are imported: there is no text tower "
                        "here to embed ImageNet class names; set image_targets to an .npy or .parquet of target "
                        "embeddings in the imported model's space (DataComp's: ImageNet-1k training image "
                        "embeddings)")  # fmt: skip
    from pipeline.embed import ClipEmbedder

    return imagenet_text_targets(ClipEmbedder(embed_cfg))


def run_image_based(pool, cfg, engine, embed_cfg=None, progress: bool = True) -> dict:
    """DataComp's image-based filter at any pool size: count the caption-filtered embedded images
    (per shard), fit k-means on a uid-hash sample of them (:mod:`pipeline.core.vectors`), pick the target
    clusters, then assign every shard in its own task."""
    import json

    from pipeline.core.vectors import clusters_for, fit_sample, kmeans_on_sample, sample_rate, sample_size
    from pipeline.filters.common import embed_digest, scores_digest, stage_digest
    from pipeline.store.parquet import write_json_atomic

    shards = pool.require_complete("embed")
    targets_id = _targets_id(cfg, embed_cfg)
    if cfg.image_centroids:  # given centres (DataComp's): no fit, so the pool's content is not in the digest
        return _given_centroids(pool, cfg, engine, embed_cfg, targets_id, progress)
    keys = ("image_clusters", "samples_per_image_cluster", "kmeans_iterations", "kmeans_max_points_per_centroid",
            "kmeans_max_sample", "seed")  # fmt: skip
    # ... and the pool it is computed over: a grown or re-embedded pool is clustered and assigned again
    digest = stage_digest(*(getattr(cfg, k) for k in keys), targets_id, embed_digest(pool), scores_digest(),
                          pool.content_digest(["embed", "filters"]))  # fmt: skip
    summary_path = pool.aggregates_dir / "image_based.json"
    out = pool.aggregates_dir / "image_based"
    step = AssignImageClusters(str(out / "centroids.npz"), digest)
    if not runner.plan(pool, step, shards) and summary_path.exists():
        return json.loads(summary_path.read_text())
    pool.require_complete("filters")
    parts = runner.map_shards(pool, engine, functools.partial(count_shard, str(pool.root)), shards,
                              desc="image_based count", progress=False)  # fmt: skip
    counts = {key: sum(p[key] for p in parts.values()) for key in ("embedded", "captioned")}
    captioned = counts["captioned"] > 0  # DataComp trains on the caption-filtered images, if any
    population = counts["captioned"] if captioned else counts["embedded"]
    if not population:
        raise UserError(f"{pool.root}: no image embeddings to cluster")
    k = clusters_for(population, cfg.image_clusters, cfg.samples_per_image_cluster)
    wanted = sample_size(k, cfg.kmeans_max_points_per_centroid, cfg.kmeans_max_sample)
    sample_dir = out / "sample"
    fn = functools.partial(sample_shard, str(pool.root), str(sample_dir), sample_rate(wanted, population), cfg.seed,
                           captioned)  # fmt: skip
    _, train = fit_sample(pool, engine, fn, shards, sample_dir, desc="image_based sample", progress=progress)
    k = min(k, len(train))
    summary = _assign(pool, engine, step, shards, kmeans_on_sample(train, k, cfg), cfg, embed_cfg, progress)
    summary = {"clusters": int(k), "train_samples": len(train), "train_population": population,
               "embedded_samples": counts["embedded"], "targets": targets_id, **summary, "digest": digest}  # fmt: skip
    write_json_atomic(summary_path, summary)
    return summary


def _assign(pool, engine, step: AssignImageClusters, shards: list[int], centroids: np.ndarray, cfg, embed_cfg,
            progress: bool) -> dict:  # fmt: skip
    """The targets pick their nearest centroids (saved with them for the tasks), then every shard
    due is assigned in its own task; returns the summary's counts."""
    from pipeline.filters.common import IMAGE_STAGE
    from pipeline.store.parquet import atomic_path

    targets = _targets(cfg, embed_cfg)
    if targets.shape[1] != centroids.shape[1]:
        raise UserError(f"image targets have dimension {targets.shape[1]}, the pool's embeddings {centroids.shape[1]}")
    chosen = np.unique(nearest_by_dot(targets, centroids))
    centres_path = Path(step.centres_path)
    centres_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(centres_path) as tmp, tmp.open("wb") as f:
        np.savez(f, centroids=centroids, chosen=chosen)
    runner.run_step(pool, engine, step, runner.plan(pool, step, shards), progress=progress)
    in_target = sum(m["counts"]["target"] for m in pool.completed(IMAGE_STAGE).values())
    return {"target_embeddings": len(targets), "target_clusters": len(chosen), "samples_in_target_clusters": in_target}


def _given_centroids(pool, cfg, engine, embed_cfg, targets_id: str, progress: bool) -> dict:
    """The image-based filter over given centres (``filters.image_centroids``: DataComp's
    ``load_uids_with_image_filter`` with its published pool centroids): no fit, so the digest covers
    the file rather than the pool's content."""
    import json

    from pipeline.filters.common import embed_digest, stage_digest
    from pipeline.store.parquet import file_sha256, write_json_atomic

    shards = pool.require_complete("embed")
    dim = pool.table_schema("embed").field(S.IMAGE_EMBEDDING).type.list_size
    centres_id = f"file:{cfg.image_centroids}:{file_sha256(cfg.image_centroids)[:16]}"
    digest = stage_digest("given-centroids", centres_id, targets_id, embed_digest(pool))
    summary_path = pool.aggregates_dir / "image_based.json"
    step = AssignImageClusters(str(pool.aggregates_dir / "image_based" / "centroids.npz"), digest)
    if runner.plan(pool, step, shards) or not summary_path.exists():
        centroids = load_centroids(cfg.image_centroids, dim)
        summary = _assign(pool, engine, step, shards, centroids, cfg, embed_cfg, progress)
        write_json_atomic(summary_path, {"clusters": len(centroids), "centroids": centres_id, "targets": targets_id,
                                         **summary, "digest": digest})  # fmt: skip
    return json.loads(summary_path.read_text())
