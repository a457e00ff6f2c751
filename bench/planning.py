"""Planning cost at pool scale: plan every step of the runner for pools of 10,000 and 100,000
recorded shards (issue 20's goal: 100k costs at most 11x 10k).

The pools are synthetic: ``input/plan.json`` and one completion marker per shard and stage, each
recording one small real table file (its size, mtime and sha256, so the quick check is a ``stat``
as on a real pool). Planning reads each candidate shard's marker once, on the driver
(:func:`pipeline.core.runner.plan`); a step is planned over every shard. Each size runs in its own
process, which reports its seconds per step and its peak RSS (``VmHWM``).

    .venv/bin/python bench/planning.py --shards 10000 100000 [--json out.jsonl]
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

STAGES = ("download", "embed", "caption_embed", "filters", "metaclip_match", "metaclip", "image_based", "dedup",
          "decisions", "mode", "rebalance")  # fmt: skip


def build(root: Path, shards: int) -> None:
    """A pool of ``shards`` planned shards, each finished by every stage (a marker per shard)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.store.parquet import file_sha256, write_json_atomic

    table = root / "tables" / "_one.parquet"
    table.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"uid": ["0" * 32]}), table)
    st = table.stat()
    files = {str(table.relative_to(root)): {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                            "sha256": file_sha256(table)}}  # fmt: skip
    for stage in STAGES:
        folder = root / "completions" / stage
        if folder.is_dir() and (folder / f"{shards - 1:05d}.json").exists():
            continue  # built by an earlier run (a stage added since gets its markers now)
        folder.mkdir(parents=True, exist_ok=True)
        for shard in range(shards):
            marker = {"shard": shard, "config_hash": "bench", "counts": {"samples": 10}, "finished_at": 0,
                      "files": files}  # fmt: skip
            (folder / f"{shard:05d}.json").write_text(json.dumps(marker))
    write_json_atomic(root / "input" / "plan.json", {"num_shards": shards, "num_rows": shards * 10,
                                                     "samples_per_shard": 10})  # fmt: skip


def _steps() -> list:
    """One instance of every step on the runner, with the digest the synthetic markers carry."""
    from pipeline.config import EmbedConfig, MetaclipConfig, ModeConfig
    from pipeline.embed import CaptionEmbed, Embed
    from pipeline.filters.decisions import Decide
    from pipeline.filters.dedup import DedupTable
    from pipeline.filters.image_based import AssignImageClusters
    from pipeline.filters.rules import recipe_rules
    from pipeline.filters.stage import CaptionScores
    from pipeline.metaclip.stage import Balance, Match
    from pipeline.mode.stage import AssignExperts
    from pipeline.rebalance.stage import Draw

    metaclip = MetaclipConfig(metadata=str(REPO / "metadata" / "entries.json"))
    steps = [Embed(EmbedConfig(model="m", checkpoint="c"), "sha"), CaptionEmbed("minilm", "bench"),
             CaptionScores("bench"), Decide(recipe_rules("basic", {}, decoded=True), "bench"), Match(metaclip),
             Balance("/p", metaclip, 1.0, "bench"), AssignExperts("/p", ModeConfig(), "bench"),
             AssignImageClusters("/p/c.npz", "bench"), DedupTable("bench")]  # fmt: skip
    from pipeline.config import RebalanceConfig

    steps.append(Draw(RebalanceConfig(), False, 1.0, "/p/g.parquet", "bench"))
    for step in steps:
        step.digest = "bench"
    return steps


def plan_all(root: Path) -> dict:
    """Plan every step over every shard; seconds per step, shards due, and this process's peak."""
    from pipeline.core import runner
    from pipeline.store.parquet import Pool

    pool = Pool(root)
    out = {}
    for step in _steps():
        t = time.perf_counter()
        due = runner.plan(pool, step, pool.require_complete("download"))
        out[step.name] = {"seconds": round(time.perf_counter() - t, 2), "due": len(due)}
    from bench.peaks import peak_gib

    out["peak_rss_gib"] = peak_gib()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench_planning")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plan:  # the child: plan, then print its JSON
        print(json.dumps(plan_all(args.plan)))
        return
    for shards in args.shards:
        root = args.work / str(shards)
        if not all((root / "completions" / s / f"{shards - 1:05d}.json").exists() for s in STAGES):
            t = time.perf_counter()
            build(root, shards)
            print(f"# built {shards} shards x {len(STAGES)} stages in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        os.sync()
        t = time.perf_counter()
        cmd = [sys.executable, __file__, "--plan", str(root)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        result = json.loads(proc.stdout)
        line = {"shards": shards, "seconds": round(time.perf_counter() - t, 1),
                "plan_seconds": round(sum(v["seconds"] for v in result.values() if isinstance(v, dict)), 2),
                "peak_rss_gib": round(result.pop("peak_rss_gib"), 3), "steps": result}  # fmt: skip
        print(json.dumps(line), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
