"""The embed stage beside clip-retrieval's ``inference`` and the bare model forward, side by side.

Same images (one WebDataset shard of the demo's images, fetched from the loopback server into a
pool by ``bench/embed_throughput.py``'s :func:`make_pool`, whose ``bare_forward`` and ``stage``
time the project's side), same open_clip model with the same random weights from one local
``.safetensors`` file, same batch size, same torch threads. Two kinds of work: image embeddings
only, and image + caption embeddings.

- **clip-retrieval 2.45** runs in its own virtualenv (``--venv``, created on first use: it pins
  ``numpy<2``, ``pyarrow<16`` and ``open-clip-torch<3``, so it cannot share the project's), on
  the pool's tar, with ``--clip_model open_clip:ViT-B-32//abs/path.safetensors`` (its loader
  splits the name at the first ``/`` and hands the rest to open_clip's ``pretrained=``: a local
  file loads as it is; nothing of clip-retrieval is patched), ``use_jit False`` and its
  sequential distributor, in-process. Its clock starts once its model is loaded and warmed (the
  same moment as the stage's: :func:`stage` loads the model untimed) and stops when its writer
  has flushed. clip-retrieval runs fp32 on a CPU (its ``OpenClipWrapper``); it has no setting
  for another precision there.
- **The stage** is ``run_embed`` on the pool: the tar read, decode and preprocessing (``workers``
  processes, or inline with 0), the forward, the Parquet tables and markers. Image-only is
  ``embed.text: off`` with no caption model; image + text is the text tower with ``caption_model:
  clip`` (the caption table reuses the text vectors).
- **The bare forward** gets every image decoded and preprocessed and every caption tokenised
  before its clock starts.

Each side's embeddings are checked against the others per sample (cosine > 0.999 for fp32,
> 0.99 for bf16), joined by the tar member's key. Runs alternate; the median of ``--repeats`` is
printed. ``--json`` writes every figure.

    .venv/bin/python bench/embed_vs_clip_retrieval.py [--images 1914] [--repeats 2] [--workers 0 1]
        [--precisions fp32 bf16] [--venv /work/cr_venv] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

CLIP_RETRIEVAL = ["clip-retrieval==2.45.0", "setuptools<81", "torch==2.14.1", "torchvision==0.29.1"]

# Runs inside clip-retrieval's virtualenv: its own `inference` main, timed from the moment its model
# is built (load and warm-up excluded, as the stage's) to the end of its run (writer flushed).
DRIVER = """
import json, sys, time
from clip_retrieval.clip_inference import runner
args = json.loads(sys.argv[1])
marks = {}
call = runner.Runner.__call__
def timed(self, i):
    build = self.mapper_builder
    def mapper_builder():
        mapper = build()
        marks["start"] = time.perf_counter()
        return mapper
    self.mapper_builder = mapper_builder
    call(self, i)
    marks["end"] = time.perf_counter()
runner.Runner.__call__ = timed
from clip_retrieval.clip_inference.main import main
import torch
main(**args)
print("RESULT " + json.dumps({"seconds": marks["end"] - marks["start"], "threads": torch.get_num_threads()}))
"""


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not (venv / ".clip-retrieval-ready").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-cache-dir", *CLIP_RETRIEVAL], check=True)
        (venv / ".clip-retrieval-ready").touch()
    return python


def clip_retrieval(python: Path, tar: Path, out: Path, checkpoint: Path, model: str, batch_size: int,
                   workers: int, text: bool) -> dict[str, Any]:  # fmt: skip
    """One ``clip-retrieval inference`` run; its seconds and embeddings by tar key."""
    import numpy as np
    import pyarrow.parquet as pq

    shutil.rmtree(out, ignore_errors=True)
    args = {"input_dataset": str(tar), "output_folder": str(out), "input_format": "webdataset",
            "batch_size": batch_size, "num_prepro_workers": workers, "enable_text": text, "enable_metadata": False,
            "clip_model": f"open_clip:{model}/{checkpoint.resolve()}", "use_jit": False,
            "distribution_strategy": "sequential", "enable_wandb": False}  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([str(python), "-c", DRIVER, json.dumps(args)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"clip-retrieval failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    found = [line.split("RESULT ", 1)[1] for line in done.stdout.splitlines() if "RESULT " in line]
    if not found:
        raise SystemExit(f"clip-retrieval printed no result:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads(found[0])
    keys = pq.read_table(out / "metadata" / "metadata_0.parquet")["image_path"].to_pylist()
    result["image"] = dict(zip(keys, np.load(out / "img_emb" / "img_emb_0.npy").astype(np.float32), strict=True))
    if text:
        result["text"] = dict(zip(keys, np.load(out / "text_emb" / "text_emb_0.npy").astype(np.float32), strict=True))
    return result


def stage_vectors(pool_root: Path, text: bool) -> dict[str, Any]:
    """The embed table's vectors by tar key, as the stage stored them."""
    import numpy as np

    from pipeline.store import schema as S
    from pipeline.store.parquet import Pool

    pool = Pool(pool_root)
    table = pool.read_table("embed")
    keys = dict(zip(*(pool.read_table("download").column(c).to_pylist() for c in (S.UID, S.KEY)), strict=True))
    order = [keys[u] for u in table[S.UID].to_pylist()]
    out = {"image": dict(zip(order, S.vectors(table[S.IMAGE_EMBEDDING]).astype(np.float32), strict=True))}
    if text:
        out["text"] = dict(zip(order, S.vectors(table[S.TEXT_EMBEDDING]).astype(np.float32), strict=True))
    return out


def min_cosine(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The smallest per-sample cosine of two runs' vectors over the keys both embedded."""
    import numpy as np

    keys = sorted(k for k in set(a) & set(b) if np.any(a[k]) and np.any(b[k]))
    x, y = np.stack([a[k] for k in keys]), np.stack([b[k] for k in keys])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return float((x * y).sum(axis=1).min())


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1914)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="the stage's embed.workers")
    parser.add_argument("--cr-workers", type=int, default=1, help="clip-retrieval's num_prepro_workers")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--venv", type=Path, default=Path("/work/cr_venv"))
    parser.add_argument("--json", type=Path)
    return parser.parse_args()


def _record(rates: dict[str, list[float]], name: str, seconds: float, n: int) -> None:
    rates.setdefault(name, []).append(n / seconds)
    print(f"  {name:<34} {n} images {seconds:6.1f} s {n / seconds:6.2f} images/s", flush=True)


def main() -> None:
    args = _parse()
    import torch
    from embed_throughput import make_pool

    from pipeline.config import EmbedConfig
    from pipeline.embed import ClipEmbedder, save_random_checkpoint

    python = ensure_venv(args.venv)
    work = Path(tempfile.mkdtemp(prefix="bench-embed-cr-"))
    rates: dict[str, list[float]] = {}
    cosines: dict[str, float] = {}
    try:
        pool_root = make_pool(work, args.images)
        checkpoint = save_random_checkpoint(args.model, work / "model.safetensors")
        base = EmbedConfig(model=args.model, checkpoint=str(checkpoint), batch_size=args.batch_size, device="cpu")
        embedders = {p: ClipEmbedder(dataclasses.replace(base, precision=p)).setup() for p in args.precisions}
        print(f"torch threads: {torch.get_num_threads()}, cores: {os.cpu_count()}", flush=True)
        for repeat in range(args.repeats):
            print(f"repeat {repeat + 1}", flush=True)
            for text in (False, True):
                _one_kind(args, python, work, pool_root, checkpoint, base, embedders, text, rates, cosines)
        _summary(args, rates, cosines)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _one_kind(args: argparse.Namespace, python: Path, work: Path, pool_root: Path, checkpoint: Path, base: Any,
              embedders: dict[str, Any], text: bool, rates: dict[str, list[float]],
              cosines: dict[str, float]) -> None:  # fmt: skip
    """clip-retrieval, then per precision the bare forward and the stage with each ``workers``."""
    from embed_throughput import bare_forward, stage

    kind = "image+text" if text else "image"
    cr = clip_retrieval(python, pool_root / "shards" / "00000.tar", work / "cr", checkpoint, args.model,
                        args.batch_size, args.cr_workers, text)  # fmt: skip
    n = len(cr["image"])
    _record(rates, f"{kind} clip-retrieval fp32", cr["seconds"], n)
    for precision, embedder in embedders.items():
        _record(rates, f"{kind} bare {precision}", *bare_forward(embedder, pool_root, args.batch_size, text))
        for workers in args.workers:
            caption = "clip" if text else None
            cfg = dataclasses.replace(base, precision=precision, workers=workers, caption_model=caption,
                                      text="on" if text else "off")  # fmt: skip
            _record(rates, f"{kind} stage {precision} workers={workers}", *stage(cfg, pool_root, text))
            run = stage_vectors(pool_root, text)
            for tower in ("image", "text") if text else ("image",):
                key = f"{kind} {tower}: stage {precision} vs clip-retrieval fp32"
                cosines[key] = min(cosines.get(key, 1.0), min_cosine(run[tower], cr[tower]))


def _summary(args: argparse.Namespace, rates: dict[str, list[float]], cosines: dict[str, float]) -> None:
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(f"\nmedian images/s over {args.repeats} runs, {args.model}, batch {args.batch_size}, {os.cpu_count()} cores")
    for name, rate in medians.items():
        kind = name.split(" ")[0]
        cr, bare = medians[f"{kind} clip-retrieval fp32"], medians.get(f"{kind} bare {name.split(' ')[2]}")
        vs_bare = f"{rate / bare:5.2f}x bare {name.split(' ')[2]}" if bare and " stage " in name else ""
        print(f"  {name:<34} {rate:7.2f}  {rate / cr:5.2f}x clip-retrieval  {vs_bare}")
    print("smallest per-sample cosine:")
    for name, value in cosines.items():
        print(f"  {name:<52} {value:.5f}")
    if args.json:
        args.json.write_text(json.dumps({"rates": rates, "medians": medians, "cosines": cosines,
                                         "images": args.images, "batch_size": args.batch_size}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
