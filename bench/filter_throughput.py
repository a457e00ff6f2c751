"""The whole filtering step on a 1M-sample synthetic pool: samples/s per step and peak memory.

The pool is built, not downloaded: 1,000,000 rows in 100 shards of 10,000, each a real LAION
caption from the bundled 10k recombined (the words of two captions spliced, so the text scorers
see realistic, mostly unseen strings), an original size drawn like the demo server's images, a
sha256 (1% exact repeats), and 512-dimensional float16 image/text embeddings (ViT-B/32's width)
drawn around 2,000 random centres, with 1% planted near duplicates. ``clip_score`` is the cosine
of each pair, as the embed stage stores it.

Timed: the filter stage with every rule (recipe ``all`` below) on the local engine with 2 worker
processes: per-shard scoring (language ID, counts, WordNet entities), the image-based filter
(k-means of 1,000 clusters fitted on a uid-hash sample, assignment per shard), SemDeDup (exact
groups in SQL, 1,000 clusters, per-cluster-group tasks), and the per-shard decisions. Peak memory is
the largest resident set of this process and, separately, of the worker processes.
``bench/scale.py`` runs the same steps one process each, at several pool sizes.

    .venv/bin/python bench/filter_throughput.py [--rows 1000000] [--work runs/bench_filters]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIM = 512
RECIPE = ["english", "caption_words", "caption_chars", "min_side", "aspect_ratio", "text_entity",
          "clip_score", "image_cluster", "dedup"]  # fmt: skip


def build_pool(root: Path, rows: int) -> None:
    """The synthetic pool of ``bench/scale.py`` (the same rows; it also writes tars and caption
    embeddings, which this benchmark does not read)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from scale import build_pool as build

    build(root, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench_filters")
    ap.add_argument("--keep", action="store_true", help="reuse a pool built by an earlier run")
    ap.add_argument("--decisions-out", type=Path, help="write uid, keep, drop_reason here (to compare versions)")
    args = ap.parse_args()

    from pipeline.config import parse_config
    from pipeline.engines.local import LocalEngine
    from pipeline.filters import stage
    from pipeline.filters.decisions import run_decisions
    from pipeline.filters.dedup import run_dedup
    from pipeline.filters.image_based import run_image_based
    from pipeline.store.parquet import Pool

    root = args.work / "pool"
    if not (args.keep and root.exists()):
        shutil.rmtree(args.work, ignore_errors=True)
        t = time.perf_counter()
        build_pool(root, args.rows)
        print(f"built {args.rows} rows in {time.perf_counter() - t:.0f} s")
    for name in ("filters", "image_based", "dedup", "decisions"):
        shutil.rmtree(root / "completions" / name, ignore_errors=True)
        shutil.rmtree(root / "tables" / name, ignore_errors=True)
    shutil.rmtree(root / "aggregates", ignore_errors=True)
    cfg = parse_config({"pool": str(root), "download": {"input": "-"}, "filters": {
        "recipe": "all", "recipes": {"all": RECIPE}, "image_clusters": 1000,
        "image_targets": str(root / "targets.npy"),
        "samples_per_dedup_cluster": 1000, "dedup_eps": 0.01}}).filters  # fmt: skip
    pool = Pool(root)
    engine = LocalEngine(2, memory_limit="1GB", temp_directory=root / "_staging" / "duckdb")
    times = {}
    t0 = time.perf_counter()
    stage.score_shards(pool, engine, stage.pending_scores(pool), progress=False)
    times["scores (2 processes)"] = time.perf_counter() - t0
    t = time.perf_counter()
    image = run_image_based(pool, cfg, engine, progress=False)
    times["image-based: sample, k-means, assignment per shard"] = time.perf_counter() - t
    t = time.perf_counter()
    dedup = run_dedup(pool, cfg, engine, progress=False)
    times["dedup (exact in SQL + SemDeDup per cluster group)"] = time.perf_counter() - t
    t = time.perf_counter()
    summary = run_decisions(pool, cfg, engine, progress=False)
    times["decisions (per shard)"] = time.perf_counter() - t
    total = time.perf_counter() - t0
    if args.decisions_out:
        import pyarrow.parquet as pq

        pq.write_table(pool.read_table("decisions", ["uid", "keep", "drop_reason"]), args.decisions_out)
    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rss_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"\n| step | seconds | samples/s |\n|---|---:|---:|")  # noqa: F541
    for name, sec in times.items():
        print(f"| {name} | {sec:.1f} | {args.rows / sec:,.0f} |")
    print(f"| **whole filter step** | **{total:.1f}** | **{args.rows / total:,.0f}** |")
    print(f"\npeak RSS: main process {rss_self:.2f} GiB, largest worker process {rss_children:.2f} GiB")
    print(json.dumps({"kept": summary["kept"], "drop_reasons": summary["drop_reasons"],
                      "image_based": {k: image[k] for k in ("clusters", "target_clusters")},
                      "dedup": {k: dedup[k] for k in ("exact_dropped", "semantic_dropped")}}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
