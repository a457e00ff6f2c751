"""The embed stage on whatever GPU it finds, against the bare forward (issue 26's device check).

A pool of ``--images`` generated images (the loopback server's: URLs whose token the server
answers with an image, captions from the demo's LAION rows), fetched by the download stage into
shards of 2,000. For each model (random weights saved to a local file and loaded through
``embed.checkpoint``, as every model here):

- the bare forward: every image decoded and preprocessed before the clock, then batches copied to
  the device and ``encode_image`` + ``encode_text`` in the stage's precision;
- the stage: ``run_embed`` over the pool (tar read, decode and preprocessing in ``--workers``
  processes overlapping the forward, pinned batches, the Parquet tables and markers), with the
  text tower and without it (``embed.text: off``).

It prints one JSON line per run (images/s, seconds, peak GPU memory from
``torch.cuda.max_memory_allocated`` since just before the run: the stage's model load included)
and a summary. The pool and both timings are ``bench/embed_throughput.py``'s. Without a GPU it
says so and runs on the CPU (small ``--images`` then). Everything is timed after the model is loaded.

    bash bench/device_embed.sh                      # ViT-B-32 and ViT-L-14, 20,000 images
    .venv/bin/python bench/device_embed.py --images 2000 --models ViT-B-32
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def _peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[256, 128], help="per model, in order")
    parser.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch
    from embed_throughput import bare_forward, make_pool, stage

    from pipeline.config import EmbedConfig
    from pipeline.embed import ClipEmbedder, save_random_checkpoint

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    print(json.dumps({"gpu": gpu, "cores": os.cpu_count(), "torch": torch.__version__}), flush=True)
    if gpu is None:
        print("no GPU found: the runs below are on the CPU", flush=True)
    work = Path(tempfile.mkdtemp(prefix="device-embed-"))
    lines = []
    try:
        start = time.perf_counter()
        pool_root = make_pool(work, args.images, per_shard=2000, generated=True)
        print(json.dumps({"pool_seconds": round(time.perf_counter() - start, 1)}), flush=True)
        for model, batch in zip(args.models, args.batch_size, strict=False):
            checkpoint = save_random_checkpoint(model, work / f"{model}.safetensors")
            cfg = EmbedConfig(model=model, checkpoint=str(checkpoint), batch_size=batch, workers=args.workers,
                              caption_model="clip")  # fmt: skip
            image_only = dataclasses.replace(cfg, caption_model=None, text="off")
            embedder = ClipEmbedder(cfg).setup()
            runs = {}
            timed = {"bare": functools.partial(bare_forward, embedder, pool_root, batch),
                     "stage": functools.partial(stage, cfg, pool_root),
                     "stage image only": functools.partial(stage, image_only, pool_root, False)}
            for name, run in timed.items():
                _reset_peak()
                seconds, images = run()
                runs[name] = {"seconds": seconds, "images": images, "peak_gpu_gib": _peak_gib()}
            for name, run in runs.items():
                line = {"model": model, "run": name, "batch": batch, "workers": args.workers, "device": embedder.device,
                        "images_per_s": round(run["images"] / run["seconds"], 1), **run}  # fmt: skip
                lines.append(line)
                print(json.dumps(line), flush=True)
            ratio = runs["stage"]["seconds"] and runs["bare"]["seconds"] / runs["stage"]["seconds"]
            print(f"{model}: the stage at {ratio:.2f}x the bare forward (image + text)", flush=True)
            del embedder
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text("\n".join(json.dumps(line) for line in lines) + "\n")


if __name__ == "__main__":
    main()
