"""The demo flow (`curate demo`, 10,000 rows) on the local engine, on Spark ``local[2]`` and on a
standalone cluster (a master and two one-core workers started with pyspark's own ``spark-class``):
wall time, every process's peak RSS (``VmHWM``, polled each second over all descendants, the cluster's
JVMs included), and whether each release's tars and ``uids.npy`` equal the local engine's.

    .venv/bin/python bench/spark_demo.py [--engines local spark-local cluster] [--json out.jsonl]

Each run gets its own pool under ``runs/bench_demo/<engine>`` from a copy of ``configs/demo.yaml``
(``embed.threads: 1`` on every engine, so the embed tables are bit-identical too: README, "On a
Spark cluster").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.peaks import Peaks  # noqa: E402 - after the path is set


def _kind(process: object, is_driver: bool) -> str:
    return "jvm" if "java" in process.name() else ("driver" if is_driver else "python")


def _config(name: str, engine: dict) -> Path:
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    root = REPO / "runs" / "bench_demo" / name
    shutil.rmtree(root, ignore_errors=True)
    data.update(engine, pool=str(root / "pool"), report=False)
    data["export"]["out"] = str(root / "release")
    data["embed"]["threads"] = 1
    root.mkdir(parents=True)
    path = root / "demo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _release(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())
            if f.suffix in (".tar", ".npy")}  # fmt: skip


def run(name: str, engine: dict, extra_roots: list[int]) -> dict:
    config = _config(name, engine)
    env = {**os.environ, "PREFECT_HOME": str(config.parent / "prefect-home"), "SPARK_LOCAL_IP": "127.0.0.1",
           "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}  # fmt: skip
    env.pop("PREFECT_API_URL", None)
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "demo", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    with Peaks([proc.pid, *extra_roots], _kind) as peaks:
        _, err = proc.communicate()
    seconds = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{name}: curate demo failed:\n{err[-3000:]}")
    release = _release(config.parent / "release")
    rss = {k: round(v, 3) for k, v in peaks.peaks.items()}
    return {"engine": name, "seconds": round(seconds, 1), "peak_rss_gib": rss, "release": release}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", nargs="+", default=["local", "spark-local", "cluster"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = []
    for name in args.engines:
        if name == "cluster":
            from tests.test_spark_cluster import Cluster  # the tests' launcher: pyspark's spark-class

            cluster = Cluster(REPO / "runs" / "bench_demo" / "cluster-procs")
            try:
                pids = [cluster.master.pid, *(w.pid for w in cluster.workers)]
                line = run(name, {"engine": "spark", "spark": {"master": cluster.url}}, pids)
            finally:
                cluster.stop()
        elif name == "spark-local":
            line = run(name, {"engine": "spark", "spark": {"master": "local[2]"}}, [])
        else:
            line = run(name, {"engine": "local"}, [])
        if results:
            line["release_equals_local"] = line["release"] == results[0]["release"]
        results.append(line)
        print(json.dumps({k: v for k, v in line.items() if k != "release"}), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
