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
``torch.cuda.max_memory_allocated``) and a summary. Without a GPU it says so and runs on the CPU
(small ``--images`` then). Everything is timed after the model is loaded.

    bash bench/device_embed.sh                      # ViT-B-32 and ViT-L-14, 20,000 images
    .venv/bin/python bench/device_embed.py --images 2000 --models ViT-B-32
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def make_pool(work: Path, images: int, per_shard: int = 2000) -> Path:
    """``images`` generated images fetched from the loopback server by the download stage."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from download_throughput import _serve

    from pipeline.config import parse_config
    from pipeline.devserver import kind_of
    from pipeline.download import run_download
    from pipeline.engines.local import LocalEngine
    from pipeline.store.parquet import Pool

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    server = ctx.Process(target=_serve, args=(queue,), daemon=True)
    server.start()
    base_url = queue.get(timeout=60)
    captions = pq.read_table(REPO / "data" / "laion_10k.parquet", columns=["TEXT"])["TEXT"].to_pylist()
    tokens: list[str] = []
    i = 0
    while len(tokens) < images:  # tokens the server answers with a plain image
        token = hashlib.md5(f"device-embed-{i}".encode(), usedforsecurity=False).hexdigest()[:16]
        if kind_of(token) == "ok":
            tokens.append(token)
        i += 1
    urls = [f"{base_url}/img/{t}.jpg" for t in tokens]
    pq.write_table(pa.table({"url": urls, "caption": [captions[j % len(captions)] or "" for j in range(images)]}),
                   work / "urls.parquet")  # fmt: skip
    cfg = parse_config({"pool": str(work / "pool"), "download": {"input": str(work / "urls.parquet"),
                        "samples_per_shard": per_shard, "threads": 64}})  # fmt: skip
    run_download(Pool(cfg.pool), cfg.download, LocalEngine(max(1, min(8, (os.cpu_count() or 2) - 1))), progress=False)
    server.terminate()
    return work / "pool"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def bare(embedder: Any, pool_root: Path, batch_size: int) -> dict[str, Any]:
    import torch

    from pipeline.store.parquet import Pool
    from pipeline.store.webdataset import decode_image, iter_shard

    pool = Pool(pool_root)
    samples = [s for shard in pool.completed("download") for s in iter_shard(pool.shard_tar(shard))]
    pixels = torch.stack([embedder.preprocess(decode_image(s["jpg"])[0]) for s in samples])
    tokens = embedder.tokenizer([s["txt"] for s in samples])
    if embedder.device.startswith("cuda"):
        pixels, tokens = pixels.pin_memory(), tokens.pin_memory()
    dtype = embedder.input_dtype or torch.float32
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    _sync()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(samples), batch_size):
            x = pixels[i : i + batch_size].to(embedder.device, dtype=dtype, non_blocking=True)
            t = tokens[i : i + batch_size].to(embedder.device, non_blocking=True)
            embedder.model.encode_image(x, normalize=True).float().cpu()
            embedder.model.encode_text(t, normalize=True).float().cpu()
    _sync()
    return {"seconds": time.perf_counter() - start, "images": len(samples), "peak_gpu_gib": _peak_gib()}


def stage(cfg: Any, pool_root: Path, text: bool) -> dict[str, Any]:
    import torch

    from pipeline.core import runner
    from pipeline.embed import embed_steps, run_embed
    from pipeline.engines.local import LocalEngine
    from pipeline.store.parquet import Pool

    pool = Pool(pool_root)
    for name in ("completions/embed", "completions/caption_embed", "tables/embed", "tables/caption_embed"):
        shutil.rmtree(pool.root / name, ignore_errors=True)
    for step in embed_steps(pool, cfg, text_needed=text):
        runner.ready(step)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    done = run_embed(pool, cfg, LocalEngine(1), progress=False, text_needed=text)
    _sync()
    return {"seconds": time.perf_counter() - start, "images": sum(c["samples"] for c in done.values()),
            "peak_gpu_gib": _peak_gib()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[256, 128], help="per model, in order")
    parser.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

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
        pool_root = make_pool(work, args.images)
        print(json.dumps({"pool_seconds": round(time.perf_counter() - start, 1)}), flush=True)
        for model, batch in zip(args.models, args.batch_size, strict=False):
            checkpoint = save_random_checkpoint(model, work / f"{model}.safetensors")
            cfg = EmbedConfig(model=model, checkpoint=str(checkpoint), batch_size=batch, workers=args.workers,
                              caption_model="clip")  # fmt: skip
            embedder = ClipEmbedder(cfg).setup()
            runs = {"bare": bare(embedder, pool_root, batch), "stage": stage(cfg, pool_root, True),
                    "stage image only": stage(dataclasses.replace(cfg, caption_model=None, text="off"), pool_root,
                                              False)}  # fmt: skip
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
