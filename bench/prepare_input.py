"""Input preparation (no fetching): URL lists of N rows split over F files -> the pool's prepared list.

    .venv/bin/python bench/prepare_input.py --sizes 1000000 10000000 [--files 20] [--json FILE]
                                            [--work runs/bench_prepare]

Each size gets F Parquet files of ``url`` and ``caption``: real LAION captions (``laion_10k``)
with URLs made unique per row, and 1% of the rows exact (url, caption) repeats of a row of another
file, which the preparation must drop. Then, in a fresh process, :func:`pipeline.download.prepare`
with the local engine (2 worker processes; DuckDB's ``memory_limit`` 96MB, spilling beyond): a
task per file validates it in batches and computes the uids (DuckDB's md5), an engine aggregation
finds the repeats, and the parts are streamed into ``input/urls.parquet``. One JSON line per size:
``seconds`` (the whole process, interpreter start included), ``rows_per_s`` (over those seconds),
``prepare_seconds`` (the call alone), ``peak_rss_gib`` (the preparing process, the kernel's
``ru_maxrss``) and ``worker_peak_rss_gib`` (its largest worker process, a 1 s poll), plus the rows
kept and dropped.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

LAION = REPO / "data" / "laion_10k.parquet"
MEMORY_LIMIT = "96MB"  # DuckDB's, for the repeat aggregation: low enough to bind at every size (it spills)


def build(folder: Path, size: int, files: int) -> None:
    """``files`` Parquet files of ``size`` rows in all, 1% of them repeats of another file's rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    captions = pq.read_table(LAION, columns=["TEXT"])["TEXT"].combine_chunks()
    folder.mkdir(parents=True)
    per = size // files
    rng = np.random.default_rng(0)
    for f in range(files):
        rows = np.arange(f * per, (f + 1) * per, dtype=np.int64)
        repeat = rng.random(per) < 0.01
        if f:  # a repeat is the same row number of the previous file: same url and caption
            rows[repeat] -= per
        ids = pa.array(rows).cast(pa.string())
        url = pc.binary_join_element_wise("https://img.example.com/", pc.cast(ids, pa.string()), ".jpg", "")
        caption = captions.take(pa.array(rows % len(captions)))
        pq.write_table(pa.table({"url": url, "caption": caption}), folder / f"part-{f:03d}.parquet",
                       compression="zstd")  # fmt: skip


def run(pool: Path, source: Path, rss_out: Path) -> None:
    from pipeline.config import parse_config
    from pipeline.download import prepare
    from pipeline.engines.local import LocalEngine
    from pipeline.store.parquet import Pool

    cfg = parse_config({"pool": str(pool), "download": {"input": str(source), "samples_per_shard": 10_000}}, "bench")
    engine = LocalEngine(2, memory_limit=MEMORY_LIMIT, temp_directory=pool.parent / "spill")
    t = time.perf_counter()
    plan = prepare(Pool(pool), cfg.download, engine)
    seconds = time.perf_counter() - t
    print(json.dumps({"prepare_seconds": round(seconds, 1), "rows_kept": plan["num_rows"],
                      "duplicates_dropped": plan["duplicates_dropped"], "shards": plan["num_shards"]}))  # fmt: skip
    rss_out.write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench_prepare")
    ap.add_argument("--run", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        run(*args.run)
        return
    from scale import _Poll, emit

    for size in args.sizes:
        root = args.work / str(size)
        source = root / "lists"
        if not source.exists():
            t = time.perf_counter()
            build(source, size, args.files)
            print(f"# built {size} rows in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        for stale in ("pool", "spill"):
            shutil.rmtree(root / stale, ignore_errors=True)
        cmd = [sys.executable, __file__, "--run", str(root / "pool"), str(source), str(root / "rss")]
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        with _Poll(proc.pid) as poll:
            out, _ = proc.communicate()
        seconds = time.perf_counter() - t
        if proc.returncode:
            raise SystemExit(f"prepare failed at size {size} (exit {proc.returncode})")
        line = {"size": size, "files": args.files, "seconds": round(seconds, 1), "rows_per_s": round(size / seconds),
                "peak_rss_gib": round(float((root / "rss").read_text()), 3),
                "worker_peak_rss_gib": round(poll.peaks["worker"] / 2**30, 3), **json.loads(out)}  # fmt: skip
        emit(line, args.json)


if __name__ == "__main__":
    main()
