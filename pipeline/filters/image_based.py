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

from pathlib import Path

import numpy as np


def kmeans_l2(x: np.ndarray, k: int, iterations: int, seed: int, max_points_per_centroid: int) -> np.ndarray:
    """faiss k-means centroids (L2, as DataComp and SemDeDup train them)."""
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, max_points_per_centroid=max_points_per_centroid,
                      verbose=False)  # fmt: skip
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids.copy()


def nearest_by_dot(x: np.ndarray, centroids: np.ndarray, batch: int = 65536) -> np.ndarray:
    """Index of the centroid with the largest dot product (DataComp's ``get_centroid_ids_gpu``)."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    out = np.empty(len(x), dtype=np.int64)
    for i in range(0, len(x), batch):
        out[i : i + batch] = index.search(np.ascontiguousarray(x[i : i + batch], dtype=np.float32), 1)[1][:, 0]
    return out


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
            raise ValueError(f"{path}: needs an `embedding` list column; it has {table.column_names}")
        x = np.asarray(table["embedding"].to_pylist(), dtype=np.float32)
    else:
        raise ValueError(f"{path}: image_targets must be .npy or .parquet")
    if x.ndim != 2 or not len(x):
        raise ValueError(f"{path}: expected a non-empty 2-D array of embeddings, got shape {x.shape}")
    return x.astype(np.float32)


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
