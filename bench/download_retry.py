"""A web that fails now and then: success rate and wall time of img2dataset alone, the download
stage, and the stage plus one retry pass (issue 24).

The demo's 10,000 URLs are served by the loopback image server in its own process with
``transient_share`` set: that share of all requests fails once, whatever the URL (half HTTP 503,
half an answer after 3 s, past the 2 s timeout), as DataComp's downloads see 5-14% transient
failures (DataComp#3, #39, #41). A later request for the same URL may succeed. Everything else is
bench/download_throughput.py's settings (2 processes x 32 threads, 1,000 samples per shard, timeout
2 s, 1 retry in img2dataset's own loop). The retry pass asks for ``timeout,http_5xx``.

Success rate: successes over the URLs fetched (the http(s) rows). Peaks: VmHWM of this process and
of its worker processes (the image server left out).

    .venv/bin/python bench/download_retry.py [--rows 10000] [--share 0.1]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from download_throughput import SETTINGS, _serve, run_img2dataset, run_stage  # noqa: E402
from peaks import Peaks, peak_gib  # noqa: E402


def img2dataset_rate(out: Path) -> tuple[int, int]:
    import pyarrow.parquet as pq

    files = sorted(out.glob("*.parquet"))
    status = [s for f in files for s in pq.read_table(f, columns=["status"])["status"].to_pylist()]
    return status.count("success"), len(status)


def stage_rate(pool: Path) -> tuple[int, int]:
    from pipeline.query import connect
    from pipeline.store.parquet import Pool

    con = connect(Pool(pool))
    ok, fetched = con.execute("select count(*) filter (status = 'success'), count(*) filter (attempts > 0) "
                              "from download").fetchone()  # fmt: skip
    con.close()
    return int(ok), int(fetched)


def run_retry_pass(pool: Path, url_list: Path) -> tuple[float, dict]:
    from pipeline.config import parse_config
    from pipeline.download.retry import run_retry
    from pipeline.engines.local import LocalEngine
    from pipeline.store.parquet import Pool

    cfg = parse_config({"pool": str(pool), "download": {"input": str(url_list), **SETTINGS}})
    start = time.perf_counter()
    result = run_retry(Pool(cfg.pool), cfg.download, LocalEngine(SETTINGS["processes"]), ["timeout", "http_5xx"],
                       progress=False)  # fmt: skip
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--share", type=float, default=0.1, help="share of requests that fail once")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from pipeline.devserver import rewrite_url_list

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    server = ctx.Process(target=_serve, args=(queue,), kwargs={"transient_share": args.share}, daemon=True)
    server.start()
    base_url = queue.get(timeout=30)
    work = Path(tempfile.mkdtemp(prefix="bench-retry-"))
    rows: list[dict] = []

    def kind(p, first):  # type: ignore[no-untyped-def]
        return None if p.pid == server.pid else ("main" if first else "workers")

    try:
        src = work / "src.parquet"
        pq.write_table(pq.read_table(REPO / "data" / "laion_10k.parquet").slice(0, args.rows), src)
        url_list = work / "urls.parquet"
        rewrite_url_list(src, url_list, base_url)
        with Peaks([os.getpid()], kind) as peaks:
            seconds = run_img2dataset(url_list, work / "img2dataset")
        ok, fetched = img2dataset_rate(work / "img2dataset")
        rows.append({"run": "img2dataset alone", "seconds": seconds, "success": ok, "fetched": fetched,
                     "peaks": dict(peaks.peaks)})  # fmt: skip
        with Peaks([os.getpid()], kind) as peaks:
            seconds = run_stage(url_list, work / "pool")
        ok, fetched = stage_rate(work / "pool")
        rows.append({"run": "the stage", "seconds": seconds, "success": ok, "fetched": fetched,
                     "peaks": dict(peaks.peaks)})  # fmt: skip
        with Peaks([os.getpid()], kind) as peaks:
            retry_seconds, result = run_retry_pass(work / "pool", url_list)
        ok, fetched = stage_rate(work / "pool")
        rows.append({"run": "the stage + one retry pass", "seconds": seconds + retry_seconds, "success": ok,
                     "fetched": fetched, "retry_seconds": retry_seconds, "retry": result["by_class"],
                     "retried_shards": len(result["shards"]), "peaks": dict(peaks.peaks)})  # fmt: skip
        print(f"{args.rows} URLs, {args.share:.0%} of requests fail once, {os.cpu_count()} cores")
        for r in rows:
            print(f"  {r['run']:<28} {r['seconds']:6.1f} s  success {r['success']}/{r['fetched']} "
                  f"({100 * r['success'] / r['fetched']:.1f}%)  peaks GiB {r['peaks']}")  # fmt: skip
        print(f"  retry pass alone: {retry_seconds:.1f} s over {len(result['shards'])} shards, by class "
              f"{result['by_class']}; main process peak {peak_gib():.3f} GiB")  # fmt: skip
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    finally:
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
