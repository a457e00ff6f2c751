"""Embedding stage throughput vs the bare model forward, ViT-B-32 on CPU, same images, same run.

The bare forward gets every image decoded and preprocessed, and every caption tokenised, before
the clock starts, and times only ``encode_image`` + ``encode_text`` over batches. The stage is
``run_embed`` over a pool holding the same images: reading the tar, decoding and preprocessing
(in ``--workers`` processes, or inline with 0), tokenising, the same forward, and writing the
Parquet tables and markers. Both use one loaded model (random ViT-B-32 weights saved to disk and
loaded through the checkpoint path: speed does not depend on the weight values). Runs alternate
bare / stage. The model load is timed once, apart.

    .venv/bin/python bench/embed_throughput.py [--images 960] [--workers 0 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
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


def make_pool(work: Path, images: int, per_shard: int | None = None, generated: bool = False) -> Path:
    """Download ``images`` images from the loopback server into a pool (one shard, or shards of
    ``per_shard``): the demo's URLs the server answers with an image, or (``generated``) as many
    generated URLs of that kind as asked, captioned with the demo's captions in turn."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from download_throughput import _serve

    from pipeline.config import parse_config
    from pipeline.devserver import kind_of, rewrite_url_list, token_for
    from pipeline.download import run_download
    from pipeline.engines.local import LocalEngine
    from pipeline.store.parquet import Pool

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    server = ctx.Process(target=_serve, args=(queue,), daemon=True)
    server.start()
    base_url = queue.get(timeout=60)
    table = pq.read_table(REPO / "data" / "laion_10k.parquet")
    if generated:
        tokens = (token_for(f"generated-{i}") for i in itertools.count())
        urls = [f"{base_url}/img/{t}.jpg" for t in itertools.islice((t for t in tokens if kind_of(t) == "ok"), images)]
        captions = table["TEXT"].to_pylist()
        pq.write_table(pa.table({"url": urls, "caption": [captions[j % len(captions)] or "" for j in range(images)]}),
                       work / "urls.parquet")  # fmt: skip
    else:
        urls = table["URL"].to_pylist()
        ok = [i for i, u in enumerate(urls) if u.startswith("http") and kind_of(token_for(u)) == "ok"]
        pq.write_table(table.take(ok[:images]), work / "src.parquet")
        rewrite_url_list(work / "src.parquet", work / "urls.parquet", base_url)
    download = {"input": str(work / "urls.parquet"), "samples_per_shard": per_shard or images, "threads": 64}
    cfg = parse_config({"pool": str(work / "pool"), "download": download})
    run_download(Pool(cfg.pool), cfg.download, LocalEngine(max(2, min(8, (os.cpu_count() or 2) - 1))), progress=False)
    server.terminate()
    return work / "pool"


def sync() -> None:
    """Wait for the GPU's queued work (nothing on a CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bare_forward(embedder, pool_root: Path, batch_size: int, text: bool = True) -> tuple[float, int]:
    """Seconds and images of the model alone over every image of the pool, decoded, preprocessed
    (and tokenised) before the clock: batches copied to the embedder's device in its input dtype,
    ``encode_image`` (and ``encode_text``)."""
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
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(samples), batch_size):
            x = pixels[i : i + batch_size].to(embedder.device, dtype=dtype, non_blocking=True)
            embedder.model.encode_image(x, normalize=True).float().cpu()
            if text:
                t = tokens[i : i + batch_size].to(embedder.device, non_blocking=True)
                embedder.model.encode_text(t, normalize=True).float().cpu()
    sync()
    return time.perf_counter() - start, len(samples)


def stage(cfg, pool_root: Path, text_needed: bool = True) -> tuple[float, int]:
    """Seconds and images of ``run_embed`` over the pool (its embed tables removed first), the
    model loaded before the clock."""
    from pipeline.core import runner
    from pipeline.embed import embed_steps, run_embed
    from pipeline.engines.local import LocalEngine
    from pipeline.store.parquet import Pool

    pool = Pool(pool_root)
    for name in ("completions/embed", "completions/caption_embed", "tables/embed", "tables/caption_embed"):
        shutil.rmtree(pool.root / name, ignore_errors=True)
    for step in embed_steps(pool, cfg, text_needed):  # the models load here, untimed (the runner keeps them)
        runner.ready(step)
    start = time.perf_counter()
    done = run_embed(pool, cfg, LocalEngine(1), progress=False, text_needed=text_needed)
    sync()
    return time.perf_counter() - start, sum(c["samples"] for c in done.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=960)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="ViT-B-32")
    args = parser.parse_args()

    import dataclasses

    import torch

    from pipeline.config import EmbedConfig
    from pipeline.embed import ClipEmbedder, save_random_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    try:
        pool_root = make_pool(work, args.images)
        checkpoint = save_random_checkpoint(args.model, work / "model.safetensors")
        cfg = EmbedConfig(
            model=args.model, checkpoint=str(checkpoint), batch_size=args.batch_size, caption_model="clip"
        )
        start = time.perf_counter()
        embedder = ClipEmbedder(cfg).setup()
        print(f"model load: {time.perf_counter() - start:.1f} s; torch threads: {torch.get_num_threads()}", flush=True)
        rates: dict[str, list[float]] = {"bare": []}
        for _ in range(args.repeats):
            seconds, n = bare_forward(embedder, pool_root, args.batch_size)
            rates["bare"].append(n / seconds)
            print(f"bare forward       {n} images {seconds:6.1f} s {n / seconds:6.2f} images/s", flush=True)
            for workers in args.workers:
                run_cfg = dataclasses.replace(cfg, workers=workers)
                seconds, n = stage(run_cfg, pool_root)
                rates.setdefault(f"stage workers={workers}", []).append(n / seconds)
                print(f"stage workers={workers}  {n} images {seconds:6.1f} s {n / seconds:6.2f} images/s", flush=True)
        bare = statistics.median(rates["bare"])
        print(
            f"\nmedian images/s over {args.repeats} runs, {args.model}, "
            f"batch {args.batch_size}, {os.cpu_count()} cores:"
        )
        for name, values in rates.items():
            rate = statistics.median(values)
            print(f"  {name:<18} {rate:6.2f} images/s  ({100 * rate / bare:5.1f}% of bare)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
