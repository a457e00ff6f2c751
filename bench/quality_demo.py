"""The quality signals through ``curate run`` on the demo pool: a recipe with ``aesthetic``, ``nsfw``,
``clip_score(score=dfn)`` and ``watermark``, every drop explained.

Needs the demo pool (``make demo``). A copy of it keeps the download (no image is fetched again) and
redoes every later stage with: a further scorer in the embed pass (``clipcurate-tiny``, other random
weights), LAION's watermark detector (its head on timm's smallest EfficientNet, random weights), and
the aesthetic (improved predictor v2) and NSFW (autokeras port) heads, each saved in its published
layout with random weights and loaded through the same paths as real weights. No score here means
anything about an image: the run shows the plumbing, the decisions and the report on 10,000 real
LAION captions. The first run decides with thresholds that keep every scored sample; the second sets
each threshold at the pool's median and re-decides without re-scoring. Then every sample's
``drop_reason`` is checked against the first rule it fails, computed here in SQL from the scores.

    .venv/bin/python bench/quality_demo.py [--pool runs/demo] [--work /tmp/quality-demo]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
KEEP = ("input", "shards", "tables/download", "completions/download", "manifest.json")


def copy_download(pool: Path, dest: Path) -> None:
    """The demo pool's listing, tars and download table only: every later stage is redone."""
    for part in KEEP:
        source, target = pool / part, dest / part
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)


def save_heads(work: Path, dim: int) -> tuple[Path, Path]:
    """Random heads built as their authors' modules (so the keys are the published ones)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    # improved-aesthetic-predictor's MLP: Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear
    aesthetic = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                              nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))  # fmt: skip
    torch.save({f"layers.{k}": v for k, v in aesthetic.state_dict().items()}, work / "aesthetic.pth")

    class Nsfw(nn.Module):  # the PyTorch port of the autokeras detector: norm, 3 x (Linear, ReLU), Linear, sigmoid
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.Module()
            self.norm.register_buffer("mean", torch.randn(dim) * 0.05)
            self.norm.register_buffer("variance", torch.rand(dim) + 0.5)
            self.linear_1, self.linear_2 = nn.Linear(dim, 64), nn.Linear(64, 512)
            self.linear_3, self.linear_4 = nn.Linear(512, 256), nn.Linear(256, 1)

    torch.save(Nsfw().state_dict(), work / "nsfw.pth")
    return work / "aesthetic.pth", work / "nsfw.pth"


def config(work: Path, demo: dict, extras: dict, rules: list[str]) -> Path:
    cfg = {k: v for k, v in demo.items() if k not in ("demo", "export")}
    cfg["pool"] = str(work / "pool")
    cfg["embed"] = {**demo["embed"], **extras["embed"]}
    cfg["quality"] = extras["quality"]
    cfg["filters"] = {**demo["filters"], "recipe": "quality", "recipes": {"quality": rules}}
    path = work / "quality.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def curate(path: Path) -> float:
    start = time.perf_counter()
    subprocess.run([str(REPO / ".venv/bin/curate"), "run", str(path)], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - start


FIRST_FAILED = """
select drop_reason, case
  when status is distinct from 'success' then 'downloaded'
  when decode_error is not null then 'decode_error'
  when lang is distinct from 'en' then 'english'
  when not coalesce(caption_words > 2, false) then 'caption_words'
  when not coalesce(aesthetic > {a}, false) then 'aesthetic'
  when not coalesce(nsfw <= {n}, false) then 'nsfw'
  when not coalesce(clip_score_dfn >= {t}, false) then 'clip_score'
  when not coalesce(watermark < {w}, false) then 'watermark'
  when not coalesce(dedup_keep, false) then 'dedup'
end as first_failed, keep, count(*) as n from samples group by all order by n desc
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pool", default="runs/demo")
    parser.add_argument("--work", default="/tmp/quality-demo")
    args = parser.parse_args()
    import numpy as np

    from pipeline.embed import save_random_checkpoint
    from pipeline.quality.watermark import build
    from pipeline.query import query
    from pipeline.store.parquet import Pool

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    copy_download(REPO / args.pool, work / "pool")
    demo = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    import torch

    torch.manual_seed(0)
    torch.save(build("test_efficientnet").state_dict(), work / "watermark_model_v1.pt")
    second = save_random_checkpoint("clipcurate-tiny", work / "dfn.safetensors", seed=1)
    aesthetic, nsfw = save_heads(work, 128)
    extras = {"embed": {"scorers": [{"name": "dfn", "model": "clipcurate-tiny", "checkpoint": str(second)}],
                        "watermark": {"weights": str(work / "watermark_model_v1.pt"), "model": "test_efficientnet"}},
              "quality": {"aesthetic": {"weights": str(aesthetic)}, "nsfw": {"weights": str(nsfw)}}}  # fmt: skip
    base = ["english", "caption_words"]
    took = curate(config(work, demo, extras, [*base, "aesthetic(min=-1000.0)", "nsfw(max=1.0)", "watermark(max=1.1)"]))
    print(f"curate run (embed with scorer and watermark, quality, every stage): {took:.0f} s")
    pool = Pool(str(work / "pool"))
    scores = query(pool, "select aesthetic, nsfw, watermark from samples where aesthetic is not null")
    a, n, w = (float(np.median(scores[c].to_numpy())) for c in ("aesthetic", "nsfw", "watermark"))
    rules = [*base, f"aesthetic(min={a!r})", f"nsfw(max={n!r})", "clip_score(score=dfn, fraction=0.5)",
             f"watermark(max={w!r})", "dedup"]  # fmt: skip
    took = curate(config(work, demo, extras, rules))
    print(f"curate run with the thresholds at the medians (re-decides only): {took:.0f} s\nrecipe: {rules}")
    dfn = query(pool, "select clip_score_dfn from embed where clip_score_dfn is not null")["clip_score_dfn"]
    t = float(np.sort(dfn.to_numpy())[::-1][int(len(dfn) * 0.5)])  # DataComp's get_threshold
    rows = query(pool, FIRST_FAILED.format(a=a, n=n, t=t, w=w)).to_pylist()
    bad = [r for r in rows if r["drop_reason"] != r["first_failed"] or bool(r["keep"]) != (r["first_failed"] is None)]
    print("\n| drop_reason | first rule failed (SQL) | kept | samples |\n|---|---|---|---:|")
    for r in rows:
        print(f"| {r['drop_reason']} | {r['first_failed']} | {r['keep']} | {r['n']:,} |")
    print(f"\nevery drop explained: {not bad} (rows disagreeing: {bad})")
    print(f"report: {pool.root / 'report' / 'index.html'}")
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
