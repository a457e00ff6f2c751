"""The embed step with LAION's watermark detector and one further scorer, against the step alone, on
the same demo images: the decode is shared, so the extra cost should be the extra forwards only.

Times, in one process, alternating: the step alone (``run_embed``, the pool's model); the step with
``embed.watermark`` and ``embed.scorers`` (one decode per image, three preprocessings, three
forwards); and the bare forwards of the two extra models on tensors decoded and preprocessed before
the clock starts (the scorer: image and text towers, as the step runs them; the detector: its
image model). Every model has random weights saved to disk and loaded through the same paths as
real weights (speed does not depend on the values); the watermark detector is the real
architecture, timm's ``efficientnet_b3a`` under LAION's head. The models load once, untimed.

    .venv/bin/python bench/embed_extras.py [--images 480] [--repeats 2] [--model ViT-B-32]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def save_watermark(path: Path, arch: str) -> Path:
    """Random weights of LAION's detector (timm ``arch``, LAION's head) in its published key layout."""
    import torch

    from pipeline.quality.watermark import build

    torch.manual_seed(0)
    torch.save(build(arch).state_dict(), str(path))
    return path


def extras_bare(scorer, detector, pool_root: Path, batch_size: int) -> tuple[float, float, int]:
    """Seconds of the scorer's forward (image + text) and of the detector's, on pre-decoded images."""
    import torch

    from pipeline.store.parquet import Pool
    from pipeline.store.webdataset import decode_image, iter_shard

    samples = list(iter_shard(Pool(pool_root).shard_tar(0)))
    images = [decode_image(s["jpg"])[0] for s in samples]
    pixels = torch.stack([scorer.preprocess(im) for im in images])
    marks = torch.stack([detector.preprocess(im) for im in images])
    tokens = scorer.tokenizer([s["txt"] for s in samples])
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(samples), batch_size):
            scorer.model.encode_image(pixels[i : i + batch_size], normalize=True)
            scorer.model.encode_text(tokens[i : i + batch_size], normalize=True)
    middle = time.perf_counter()
    for i in range(0, len(samples), batch_size):
        detector.score(marks[i : i + batch_size])
    return middle - start, time.perf_counter() - middle, len(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--scorer", default="ViT-B-32", help="the further scorer's open_clip architecture")
    parser.add_argument("--watermark", default="efficientnet_b3a", help="the detector's timm architecture")
    args = parser.parse_args()

    import torch
    from embed_throughput import make_pool, stage

    from pipeline.config import EmbedConfig, ScorerConfig, WatermarkConfig
    from pipeline.embed import ClipEmbedder, save_random_checkpoint
    from pipeline.embed.stage import scorer_config
    from pipeline.quality.watermark import WatermarkDetector

    work = Path(tempfile.mkdtemp(prefix="bench-extras-"))
    try:
        pool_root = make_pool(work, args.images)
        model = save_random_checkpoint(args.model, work / "model.safetensors", seed=0)
        second = save_random_checkpoint(args.scorer, work / "scorer.safetensors", seed=1)
        marks = save_watermark(work / "watermark_model_v1.pt", args.watermark)
        alone = EmbedConfig(model=args.model, checkpoint=str(model), batch_size=args.batch_size, caption_model="clip")
        extras = dataclasses.replace(alone, scorers=(ScorerConfig(name="dfn", model=args.scorer,
                                                                  checkpoint=str(second)),),
                                     watermark=WatermarkConfig(weights=str(marks), model=args.watermark))  # fmt: skip
        scorer = ClipEmbedder(scorer_config(alone, extras.scorers[0])).setup()
        detector = WatermarkDetector(extras.watermark).setup()
        print(f"torch threads: {torch.get_num_threads()}; {args.images} images; batch {args.batch_size}", flush=True)
        seconds: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for name, cfg in (("step alone", alone), ("step + watermark + scorer", extras)):
                took, n = stage(cfg, pool_root)
                seconds.setdefault(name, []).append(took)
                print(f"{name:<28} {n} images {took:6.1f} s {n / took:6.2f} images/s", flush=True)
            s_fwd, w_fwd, n = extras_bare(scorer, detector, pool_root, args.batch_size)
            seconds.setdefault("scorer forward (bare)", []).append(s_fwd)
            seconds.setdefault("watermark forward (bare)", []).append(w_fwd)
            print(f"bare forwards: scorer {s_fwd:6.1f} s, watermark {w_fwd:6.1f} s", flush=True)
        med = {k: statistics.median(v) for k, v in seconds.items()}
        extra = med["step + watermark + scorer"] - med["step alone"]
        bare = med["scorer forward (bare)"] + med["watermark forward (bare)"]
        print(f"\nmedians over {args.repeats} runs ({os.cpu_count()} cores):")
        for name, value in med.items():
            print(f"  {name:<28} {value:7.1f} s  {args.images / value:7.2f} images/s")
        print(f"  the extras cost the step {extra:.1f} s; their bare forwards take {bare:.1f} s "
              f"(ratio {extra / bare:.2f})")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
