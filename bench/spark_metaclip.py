"""MetaCLIP matching + counting + balancing on a 1M-caption pool: local engine vs Spark ``local[2]``.

The pool is built from the bundled 10k LAION captions, recombined (the words of two real captions
spliced at a random point) into 1,000,000 rows in 100 shards of 10,000; only the ``download`` table
is needed (uid, caption, status). Both engines run ``run_metaclip`` with the bundled
``metadata/entries.json`` (220,598 entries) and t = 20,000 scaled to the pool: per-shard matching
(Aho-Corasick, built once per worker process), the pool-wide entry counts (numpy on the driver
for the local engine, a Spark explode + group-by for Spark) and per-shard balancing.

Spark's fixed cost is measured apart: starting the session plus a no-op job over 2 partitions.

    .venv/bin/python bench/spark_metaclip.py [--rows 1000000] [--work runs/bench_spark]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_pool(root: Path, rows: int, per_shard: int = 10_000, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.store import schema as S
    from pipeline.store.parquet import Pool, write_json_atomic

    rng = np.random.default_rng(seed)
    words = [c.split() for c in pq.read_table(REPO / "data" / "laion_10k.parquet")["TEXT"].to_pylist() if c]
    pool = Pool(root)
    shards = (rows + per_shard - 1) // per_shard
    write_json_atomic(pool.plan_path, {"num_shards": shards, "samples_per_shard": per_shard, "num_rows": rows})
    for shard in range(shards):
        n = min(per_shard, rows - shard * per_shard)
        a, b, cut = rng.integers(0, len(words), n), rng.integers(0, len(words), n), rng.random(n)
        caps = [" ".join(words[i][: max(1, int(len(words[i]) * c))] + words[j][int(len(words[j]) * c) :])
                for i, j, c in zip(a, b, cut, strict=True)]  # fmt: skip
        uids = [hashlib.md5(f"{shard}-{i}-{c}".encode()).hexdigest() for i, c in enumerate(caps)]
        table = S.conform(pa.table({
            S.UID: uids, S.SHARD: pa.array([shard] * n, pa.int32()), S.ROW: pa.array(np.arange(n) + shard * per_shard),
            S.CAPTION: caps, S.STATUS: [S.STATUS_SUCCESS] * n}), S.DOWNLOAD_SCHEMA)  # fmt: skip
        pool.write_table("download", shard, table)
        pool.mark_done("download", shard, "synthetic", {"samples": n})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench_spark")
    ap.add_argument("--master", default="local[2]")
    args = ap.parse_args()

    from pipeline.config import MetaclipConfig, SparkConfig
    from pipeline.engines.local import LocalEngine
    from pipeline.engines.spark import SparkEngine
    from pipeline.metaclip.stage import run_metaclip
    from pipeline.store.parquet import Pool

    root = args.work / "pool"
    if not (root / "completions" / "download").exists():
        shutil.rmtree(args.work, ignore_errors=True)
        t = time.perf_counter()
        build_pool(root, args.rows)
        print(f"built {args.rows} rows in {time.perf_counter() - t:.0f} s")
    cfg = MetaclipConfig(metadata=str(REPO / "metadata" / "entries.json"), scale_t_to_pool=True)
    pool = Pool(root)

    def clean() -> None:
        for stage in ("metaclip_match", "metaclip"):
            for sub in ("completions", "tables"):
                shutil.rmtree(root / sub / stage, ignore_errors=True)

    times, summaries = {}, {}
    clean()
    t = time.perf_counter()
    summaries["local"] = run_metaclip(pool, cfg, LocalEngine(2), progress=False)
    times["local engine (2 processes)"] = time.perf_counter() - t

    engine = SparkEngine(SparkConfig(master=args.master))
    t = time.perf_counter()
    engine.map_shards(_noop, [0, 1], desc="warm-up", progress=False)
    fixed = time.perf_counter() - t
    clean()
    t = time.perf_counter()
    summaries["spark"] = run_metaclip(pool, cfg, engine, progress=False)
    times[f"Spark {args.master} (session already up)"] = time.perf_counter() - t
    engine.stop()

    assert summaries["local"]["samples_kept"] == summaries["spark"]["samples_kept"], summaries
    print("\n| engine | seconds | samples/s | samples/s per core |\n|---|---:|---:|---:|")
    for name, sec in times.items():
        print(f"| {name} | {sec:.1f} | {args.rows / sec:,.0f} | {args.rows / sec / 2:,.0f} |")
    print(f"\nSpark fixed cost (session start + a no-op job over 2 partitions): {fixed:.1f} s")
    print(f"kept {summaries['local']['samples_kept']} of {args.rows} (t = {summaries['local']['t']:.1f}), "
          "identical on both engines")  # fmt: skip


def _noop(shard: int) -> int:
    return shard


if __name__ == "__main__":
    main()
