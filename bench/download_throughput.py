"""Download throughput: the clipcurate download stage vs plain img2dataset, same URLs, same run.

Both download the 10,000 bundled demo URLs from one loopback image server (its own process) with
the same settings (2 processes x 32 threads, 1,000 samples per shard, keep_ratio_largest 512,
timeout 2 s, 1 retry), alternating A/B so drift hits both equally. The stage's figure includes its
whole overhead: input validation, uids, the download table, atomic placement and markers.

    .venv/bin/python bench/download_throughput.py [--repeats 2] [--rows 10000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = {"processes": 2, "threads": 32, "samples_per_shard": 1000, "image_size": 512, "timeout": 2.0, "retries": 1}


def _serve(port_queue: multiprocessing.Queue, **flaky: float) -> None:
    from pipeline.devserver import DemoImageServer

    server = DemoImageServer(slow_seconds=3.0, **flaky)
    port_queue.put(server.base_url)
    with server:
        while True:
            time.sleep(3600)


def run_img2dataset(url_list: Path, out: Path) -> float:
    from img2dataset import download

    start = time.perf_counter()
    download(
        url_list=str(url_list), output_folder=str(out), processes_count=SETTINGS["processes"],
        thread_count=SETTINGS["threads"], number_sample_per_shard=SETTINGS["samples_per_shard"],
        image_size=SETTINGS["image_size"], resize_mode="keep_ratio_largest", resize_only_if_bigger=True,
        timeout=SETTINGS["timeout"], retries=SETTINGS["retries"], output_format="webdataset",
        input_format="parquet", url_col="url", caption_col="caption", compute_hash="sha256",
        enable_wandb=False, distributor="multiprocessing",
    )  # fmt: skip
    return time.perf_counter() - start


def run_stage(url_list: Path, out: Path, **download: object) -> float:
    from pipeline.config import parse_config
    from pipeline.download import run_download
    from pipeline.engines.local import LocalEngine
    from pipeline.store.parquet import Pool

    cfg = parse_config({"pool": str(out), "download": {"input": str(url_list), **SETTINGS, **download}})
    start = time.perf_counter()
    run_download(Pool(cfg.pool), cfg.download, LocalEngine(SETTINGS["processes"]), progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rows", type=int, default=10_000)
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from pipeline.devserver import rewrite_url_list

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    server = ctx.Process(target=_serve, args=(queue,), daemon=True)
    server.start()
    base_url = queue.get(timeout=30)
    work = Path(tempfile.mkdtemp(prefix="bench-download-"))
    try:
        src = work / "src.parquet"
        pq.write_table(pq.read_table(REPO / "data" / "laion_10k.parquet").slice(0, args.rows), src)
        url_list = work / "urls.parquet"
        rewrite_url_list(src, url_list, base_url)
        times: dict[str, list[float]] = {"img2dataset": [], "clipcurate": []}
        for i in range(args.repeats):
            for name, fn in (("img2dataset", run_img2dataset), ("clipcurate", run_stage)):
                out = work / f"{name}-{i}"
                seconds = fn(url_list, out)
                times[name].append(seconds)
                print(f"{name:<12} run {i}: {seconds:6.1f} s  {args.rows / seconds:6.0f} samples/s", flush=True)
                shutil.rmtree(out, ignore_errors=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\nmedian over {args.repeats} runs of {args.rows} URLs, {os.cpu_count()} cores:")
        for name, seconds in med.items():
            print(f"  {name:<12} {seconds:6.1f} s  {args.rows / seconds:6.0f} samples/s")
        print(f"  stage overhead vs img2dataset: {100 * (med['clipcurate'] / med['img2dataset'] - 1):+.1f}%")
    finally:
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
