"""LAION's heads alone, per core: each published layout over float16 image embeddings, in the numpy
forward the quality step runs (:class:`pipeline.quality.heads.Head`, one BLAS thread) and in a torch
forward of the same module on one thread, with the multiply-adds each sample costs.

This is the ceiling of the quality step per core (the step also reads the Parquet shard and writes
its table): it says which layouts can reach 1M samples/s per core and which cannot, and whether
numpy is as fast as torch for these MLPs.

    .venv/bin/python bench/quality_heads.py [--rows 200000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core: torch and BLAS alike
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = (("aesthetic", "aesthetic-linear", 768), ("aesthetic", "aesthetic-mlp", 768),
         ("aesthetic", "aesthetic-mlp-relu", 768), ("nsfw", "nsfw-autokeras", 768), ("nsfw", "nsfw-autokeras", 512),
         ("nsfw", "nsfw-h14", 1024))  # fmt: skip


def random_state(layout, dim: int, rng) -> dict:
    """Random tensors in ``layout``'s keys and shapes."""
    import numpy as np

    state, width = {}, dim
    for prefix, out in zip(layout.linears, layout.widths, strict=True):
        key = f"{prefix}." if prefix else ""
        state[f"{key}weight"] = (rng.normal(size=(out, width)) / np.sqrt(width)).astype(np.float32)
        state[f"{key}bias"] = np.zeros(out, np.float32)
        width = out
    if layout.norm:
        state["norm.mean"], state["norm.variance"] = np.zeros(dim, np.float32), np.ones(dim, np.float32)
    return state


def torch_forward(head):
    """The same layers as a torch module (float32, eval): Linear, then ReLU where the layout has one."""
    import torch
    from torch import nn

    layers: list[nn.Module] = []
    for prefix, relu in zip(head.layout.linears, head.layout.relu, strict=True):
        key = f"{prefix}." if prefix else ""
        w = torch.from_numpy(head.tensors[f"{key}weight"])
        linear = nn.Linear(w.shape[1], w.shape[0])
        linear.weight.data, linear.bias.data = w, torch.from_numpy(head.tensors[f"{key}bias"])
        layers += [linear] + ([nn.ReLU()] if relu else [])
    net = nn.Sequential(*layers).eval()

    def run(x16):
        with torch.inference_mode():
            x = torch.from_numpy(x16).float()
            x = x / x.norm(dim=1, keepdim=True)
            if head.layout.norm:
                mean, var = (torch.from_numpy(head.tensors[f"norm.{k}"]) for k in ("mean", "variance"))
                x = (x - mean) / var.sqrt()
            out = net(x)
            return torch.sigmoid(out) if head.layout.sigmoid else out

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import numpy as np
    import torch
    from safetensors.numpy import save_file

    from pipeline.quality.heads import LAYOUTS, load_head

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    print(f"{args.rows:,} float16 embeddings, one core, median of {args.repeats}\n")
    print("| layout | width | multiply-adds/sample | numpy samples/s | torch samples/s | numpy GMAC/s |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind, name, dim in CASES:
            path = Path(tmp) / f"{name}-{dim}.safetensors"
            save_file(random_state(LAYOUTS[name], dim, rng), str(path))
            head = load_head(path, kind, name, dim)
            x = rng.normal(size=(args.rows, dim)).astype(np.float16)
            macs = sum(w.size for k, w in head.tensors.items() if k.endswith("weight"))
            run_torch = torch_forward(head)
            np.testing.assert_allclose(run_torch(x[:1000]).numpy()[:, 0], head(x[:1000]), rtol=1e-4, atol=1e-4)
            times = {"numpy": [], "torch": []}
            for _ in range(args.repeats):
                for label, fn in (("numpy", head), ("torch", run_torch)):
                    start = time.perf_counter()
                    for i in range(0, args.rows, 10_000):  # a shard's rows at a time, as the step scores
                        fn(x[i : i + 10_000])
                    times[label].append(time.perf_counter() - start)
            rate = {k: args.rows / statistics.median(v) for k, v in times.items()}
            print(f"| {name} | {dim} | {macs:,} | {rate['numpy']:,.0f} | {rate['torch']:,.0f} | "
                  f"{rate['numpy'] * macs / 1e9:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
