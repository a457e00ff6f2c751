"""``curate index`` and ``curate search`` on bench/scale.py's synthetic pools (512-d image vectors
around 2,000 centres): build time and peaks, search latency, recall against exact search.

    .venv/bin/python bench/index_search.py --work /work/bench_index --sizes 1000000 4000000 \\
        --recall-size 100000 [--queries 1000] [--json FILE]

For each size (its pool built by bench/scale.py's ``build_pool`` unless already there):

- ``build``: ``curate index`` from no index, in a fresh process (local engine, 2 workers): seconds,
  the main process's peak (its own ``VmHWM``) and the largest worker's (a 1 s poll);
- ``search``: 1,000 queries, each a stored vector of a uid-hash sample of the pool, k = 20, on an
  index and a DuckDB connection opened once (as a browser or a service keeps them): the index's
  latency (faiss search and the uid lookup) and the whole ``search()`` (with the captions from the
  ``samples`` view), p50 and p95, in a fresh process whose peak is reported too.

``--recall-size``: that pool's index against an exhaustive numpy search over all its vectors
(float32, normalised), recall@20 averaged over the queries, at nprobe 8, 16, 32 (the default) and 64.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.peaks import Peaks, peak_gib  # noqa: E402


def _queries(pool, n: int):  # type: ignore[no-untyped-def]
    """``n`` stored image vectors (uid-hash spread over every shard) as float32 rows."""
    import numpy as np

    from pipeline.core.vectors import as_float32, shard_vectors

    shards = pool.done_shards("embed")
    per = max(1, -(-n // len(shards)))
    rows = []
    for shard in shards:
        table = shard_vectors(pool, "embed", "image_embedding", shard)
        rows.append(as_float32(table["image_embedding"].slice(0, per)))
        if sum(len(r) for r in rows) >= n:
            break
    return np.concatenate(rows)[:n]


def run_build(root: Path, segment_rows: int) -> dict:
    from pipeline.engines.local import LocalEngine
    from pipeline.index import build_index
    from pipeline.store.parquet import Pool

    start = time.perf_counter()
    manifest = build_index(Pool(root), LocalEngine(2), segment_rows=segment_rows, progress=False)
    return {"seconds": time.perf_counter() - start, "factory": manifest["factory"], "rows": manifest["rows"],
            "nlist": manifest["nlist"], "segments": len(manifest["segments"]),
            "segment_rows": segment_rows}  # fmt: skip


def run_search(root: Path, queries: int) -> dict:
    import numpy as np

    from pipeline.index.search import Searcher, connect, search
    from pipeline.store.parquet import Pool

    pool = Pool(root)
    x = _queries(pool, queries)
    searcher, con = Searcher(pool), connect(pool)
    index_ms, full_ms = [], []
    for row in x:
        t = time.perf_counter()
        ids, _ = searcher.search(row[None], 20)
        searcher.uids(ids[0])
        index_ms.append(1000 * (time.perf_counter() - t))
        t = time.perf_counter()
        hits = search(pool, row[None], k=20, searcher=searcher, con=con)
        full_ms.append(1000 * (time.perf_counter() - t))
        assert hits.num_rows == 20
    con.close()
    pct = {f"{name}_p{q}_ms": float(np.percentile(v, q)) for name, v in (("index", index_ms), ("search", full_ms))
           for q in (50, 95)}  # fmt: skip
    return {"queries": len(x), **pct}


def run_recall(root: Path, queries: int) -> dict:
    import faiss
    import numpy as np

    from pipeline.core.vectors import as_float32, shard_vectors
    from pipeline.index.search import Searcher
    from pipeline.store.parquet import Pool

    pool = Pool(root)
    uids, parts = [], []
    for shard in pool.done_shards("embed"):
        table = shard_vectors(pool, "embed", "image_embedding", shard)
        uids += table["uid"].to_pylist()
        parts.append(as_float32(table["image_embedding"]))
    x = np.concatenate(parts)
    q = x[:: max(1, len(x) // queries)][:queries]
    exact = np.argsort(-(q @ x.T), axis=1)[:, :20]
    truth = [{uids[i] for i in row} for row in exact]
    out = {}
    for nprobe in (8, 16, 32, 64):
        searcher = Searcher(pool, nprobe=nprobe)
        ids, _ = searcher.search(q, 20)
        got = [set(searcher.uids(row)) for row in ids]
        out[f"recall@20_nprobe{nprobe}"] = float(np.mean([len(g & t) / 20 for g, t in zip(got, truth, strict=True)]))
    del faiss
    return out


def measure(mode: str, root: Path, queries: int, segment_rows: int) -> dict:
    """Run ``mode`` in a fresh process; its result, its own peak and its largest worker's."""
    out = root.parent / f".{mode}.json"
    if mode == "build":  # from no index: the bench's own pool
        import shutil

        shutil.rmtree(root / "index" / "image", ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", mode, "--pool", str(root), "--queries", str(queries), "--out", str(out),
           "--segment-rows", str(segment_rows)]  # fmt: skip
    proc = subprocess.Popen(cmd)
    with Peaks([proc.pid], lambda p, first: None if first else "workers") as peaks:
        proc.wait()
    if proc.returncode:
        raise SystemExit(f"{mode} failed ({proc.returncode})")
    result = json.loads(out.read_text())
    out.unlink()
    return {**result, "worker_peak_rss_gib": round(peaks.peaks.get("workers", 0.0), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench_index")
    ap.add_argument("--sizes", type=int, nargs="*", default=[1_000_000, 4_000_000])
    ap.add_argument("--recall-size", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--segment-rows", type=int, default=1_000_000)
    ap.add_argument("--modes", nargs="+", default=["build", "search"], choices=("build", "search"))
    ap.add_argument("--child", choices=("build", "search", "recall"), help=argparse.SUPPRESS)
    ap.add_argument("--pool", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fn = {"build": lambda: run_build(args.pool, args.segment_rows),
              "search": lambda: run_search(args.pool, args.queries),
              "recall": lambda: run_recall(args.pool, args.queries)}[args.child]  # fmt: skip
        result = fn()
        args.out.write_text(json.dumps({**result, "peak_rss_gib": round(peak_gib(), 3)}))
        return
    from bench.scale import build_pool

    jobs = [(size, mode) for size in args.sizes for mode in args.modes]
    if args.recall_size:
        jobs = [(args.recall_size, "build"), (args.recall_size, "recall"), *jobs]
    for size, mode in jobs:
        root = args.work / str(size) / "pool"
        if not (root / "input" / "plan.json").exists():
            build_pool(root, size)
        line = {"size": size, "step": mode, **measure(mode, root, args.queries, args.segment_rows)}
        print(json.dumps(line), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(line) + "\n")
    print(f"cores: {os.cpu_count()}", file=sys.stderr)


if __name__ == "__main__":
    main()
