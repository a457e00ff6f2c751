"""Every pool-wide stage after the download, at several pool sizes: time, throughput, peak memory.

    .venv/bin/python bench/scale.py --sizes 1000000 4000000 [--engine local|spark] [--json FILE]
                                    [--work runs/bench_scale] [--keep]

Each size gets a synthetic pool built like ``bench/filter_throughput.py``'s (real LAION captions
recombined, original sizes like the demo server's, 1% exact repeats, 512-d float16 image/text
embeddings around 2,000 centres with 1% planted near duplicates, ``clip_score`` the pair's cosine),
plus 512-d caption embeddings for MoDE and a tar per shard (a tiny image and a ``.json`` per sample)
so that export planning indexes real tars. The steps, each in a fresh process so that its peak
memory is its own:

- ``metaclip``: matching (per shard) and balancing (SQL counts, per-shard draws);
- ``filter_scores``, ``image_based``, ``dedup``, ``decisions``: the filters with every rule;
- ``mode``: MoDE fit on a capped sample, per-shard assignment, report;
- ``rebalance``: over the fine clusters (SQL group sizes, per-shard draws);
- ``export_plan``: planning a shuffled release of every downloaded sample (the largest plan);
- ``quality``: LAION's aesthetic (v1 linear) and NSFW (autokeras port) heads over every image
  embedding (random weights in the published layouts, 512-d).

One JSON line per step and size: ``step``, ``size``, ``seconds``, ``samples_per_s``,
``peak_rss_gib`` (the step's main process), ``worker_peak_rss_gib`` (its largest other process:
engine workers, Spark's Python workers) and, for Spark, ``jvm_peak_rss_gib``. Every peak is the
kernel's ``VmHWM`` of that process (``/proc/<pid>/status``): the main process reads its own at the
end, the others are read by a 1 s poll of every descendant. (``ru_maxrss`` is not used: it survives
fork+exec, so a step started by a large process reported that process's size.)

``--set KEY=VALUE`` overrides a key of the pool config below (``duckdb.memory_limit=256MB``,
``filters.kmeans_max_sample=20000``), so flatness can be checked at small sizes where the bounds bind.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.peaks import Peaks, peak_gib  # noqa: E402 - after the path is set

DIM = 512
PER_SHARD = 10_000
RECIPE = ["english", "caption_words", "caption_chars", "min_side", "aspect_ratio", "text_entity",
          "clip_score", "image_cluster", "dedup"]  # fmt: skip
STEPS = ("metaclip", "filter_scores", "image_based", "dedup", "decisions", "mode", "rebalance", "export_plan",
         "quality")
CLEARS = {"metaclip": ("metaclip_match", "metaclip"), "filter_scores": ("filters",), "image_based": ("image_based",),
          "dedup": ("dedup",), "decisions": ("decisions",), "mode": ("mode",), "rebalance": ("rebalance",),
          "export_plan": (), "quality": ("quality",)}  # fmt: skip


def config(root: Path, engine: str, overrides: list[str] = ()) -> dict:
    """The pipeline config of the benchmark: memory set here, never by the pool's size."""
    import yaml

    cfg = _base_config(root, engine)
    for pair in overrides:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE, e.g. duckdb.memory_limit=256MB")
        *parents, leaf = key.split(".")
        node = cfg
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = yaml.safe_load(value)
    return cfg


def _base_config(root: Path, engine: str) -> dict:
    return {
        "pool": str(root), "engine": engine, "download": {"input": "-", "processes": 2},
        # the engines' memory is set here, low enough to bind at every size measured
        "spark": {"master": "local[2]", "conf": {"spark.driver.memory": "1g"}},
        "duckdb": {"memory_limit": "1GB"},
        "metaclip": {"metadata": str(REPO / "metadata" / "entries.json"), "scale_t_to_pool": True},
        # k fixed, as SemDeDup fixes it (50,000 clusters for LAION-440M): a k that grows with the pool
        # makes the nearest-centre search cost grow per sample; clusters that outgrow
        # dedup_max_cluster_size are split instead, which bounds the pairwise work per sample
        "filters": {"recipe": "all", "recipes": {"all": RECIPE}, "image_clusters": 1000,
                    "image_targets": str(root / "targets.npy"), "dedup_clusters": 1000,
                    "dedup_max_cluster_size": 2000, "dedup_eps": 0.01},
        "mode": {"n_fine": 1024, "n_experts": 4, "fit_fraction": 0.05, "min_fit_samples": 50_000,
                 "max_fit_samples": 50_000},
        "rebalance": {"group_by": "fine_id", "t": 500},
        "export": {"out": str(root.parent / "release"), "where": "true",  # every downloaded sample: the largest plan
                   "shuffle_seed": 0},
    }  # fmt: skip


# -- the synthetic pool ------------------------------------------------------------------------------


def _tar(path: Path, keys: list[str], uids: list[str], ok) -> None:
    """A WebDataset shard: a 100-byte stand-in image and a .json per downloaded sample."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, uid, good in zip(keys, uids, ok, strict=True):
            if not good:
                continue
            for ext, data in (("jpg", b"\xff\xd8" + uid.encode() * 3), ("json", json.dumps({"uid": uid}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def build_pool(root: Path, rows: int, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.store import schema as S
    from pipeline.store.parquet import Pool, write_json_atomic, write_parquet_atomic

    rng = np.random.default_rng(seed)
    captions = [c for c in pq.read_table(REPO / "data" / "laion_10k.parquet")["TEXT"].to_pylist() if c]
    words = [c.split() for c in captions]
    centres = rng.normal(size=(2000, DIM)).astype(np.float32)
    pool = Pool(root)
    shards = (rows + PER_SHARD - 1) // PER_SHARD
    plan = {"num_shards": shards, "samples_per_shard": PER_SHARD, "num_rows": rows, "source": "synthetic",
            "source_rows": rows, "duplicates_dropped": 0, "download_attempts": True}  # fmt: skip
    write_json_atomic(pool.plan_path, plan)
    embed_schema, caption_schema = S.embed_schema(DIM), S.caption_embed_schema(DIM)
    for shard in range(shards):
        n = min(PER_SHARD, rows - shard * PER_SHARD)
        a, b, cut = rng.integers(0, len(words), n), rng.integers(0, len(words), n), rng.random(n)
        caps = [" ".join(words[i][: max(1, int(len(words[i]) * c))] + words[j][int(len(words[j]) * c):])
                for i, j, c in zip(a, b, cut, strict=True)]  # fmt: skip
        uids = [hashlib.md5(f"{shard}-{i}-{c}".encode()).hexdigest() for i, c in enumerate(caps)]
        keys = [f"{shard:05d}{i:04d}" for i in range(n)]
        ok = rng.random(n) < 0.96
        side = rng.integers(64, 801, n)
        ratio = np.exp(rng.uniform(-1.4, 1.4, n))
        w = np.where(ratio >= 1, side, np.maximum(8, side * ratio)).astype(np.int32)
        h = np.where(ratio >= 1, np.maximum(8, side / ratio), side).astype(np.int32)
        sha = [hashlib.sha256(f"{shard}-{i}".encode()).hexdigest() for i in range(n)]
        for i in np.nonzero(rng.random(n) < 0.01)[0]:
            sha[i] = sha[(i + 1) % n]  # exact repeats
        download = pa.table({
            S.UID: uids, S.SHARD: pa.array([shard] * n, pa.int32()), S.KEY: pa.array(keys, mask=~ok),
            S.ROW: pa.array(np.arange(n) + shard * PER_SHARD, pa.int64()), S.URL: [f"http://x/{u}" for u in uids],
            S.CAPTION: caps, S.STATUS: np.where(ok, S.STATUS_SUCCESS, S.STATUS_FAILED_DOWNLOAD).tolist(),
            S.ERROR: pa.nulls(n, pa.string()), S.WIDTH: pa.array(w, mask=~ok), S.HEIGHT: pa.array(h, mask=~ok),
            S.ORIGINAL_WIDTH: pa.array(w, mask=~ok), S.ORIGINAL_HEIGHT: pa.array(h, mask=~ok),
            S.SHA256: pa.array(sha, mask=~ok), S.ATTEMPTS: pa.array(np.ones(n, np.int32)),
        }, schema=S.DOWNLOAD_SCHEMA)  # fmt: skip
        pool.write_table("download", shard, download)
        _tar(pool.shard_tar(shard), keys, uids, ok)
        pool.mark_done("download", shard, "synthetic", {"samples": n})
        img = centres[rng.integers(0, len(centres), n)] + rng.normal(scale=0.6, size=(n, DIM)).astype(np.float32)
        near = np.nonzero(rng.random(n) < 0.01)[0]
        img[near] = img[(near + 7) % n] + rng.normal(scale=0.01, size=(len(near), DIM))
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        txt = img + rng.normal(scale=1.5, size=(n, DIM)).astype(np.float32) / np.sqrt(DIM) * 20
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        rows_ok = np.nonzero(ok)[0]
        img16, txt16 = img[rows_ok].astype(np.float16), txt[rows_ok].astype(np.float16)
        score = np.einsum("ij,ij->i", img16.astype(np.float32), txt16.astype(np.float32))
        m = len(rows_ok)
        ok_uids = pa.array([uids[i] for i in rows_ok])
        embed = pa.table({
            S.UID: ok_uids, S.SHARD: pa.array([shard] * m, pa.int32()),
            S.IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(img16.ravel()), DIM),
            S.TEXT_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(txt16.ravel()), DIM),
            S.CLIP_SCORE: pa.array(score, pa.float32()), S.DECODE_ERROR: pa.nulls(m, pa.string()),
            S.MODEL: pa.array(["synthetic"] * m), S.CHECKPOINT_SHA256: pa.array(["-"] * m),
        }, schema=embed_schema)  # fmt: skip
        write_parquet_atomic(pool.table_path("embed", shard), embed)
        pool.mark_done("embed", shard, "synthetic", {"samples": m})
        caption = pa.table({S.UID: ok_uids, S.SHARD: pa.array([shard] * m, pa.int32()),
                            S.CAPTION_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(txt16.ravel()), DIM),
                            S.CAPTION_MODEL: pa.array(["synthetic"] * m)}, schema=caption_schema)  # fmt: skip
        write_parquet_atomic(pool.table_path("caption_embed", shard), caption)
        pool.mark_done("caption_embed", shard, "synthetic", {"samples": m})
    write_json_atomic(pool.root / "completions" / "embed" / "config.json",
                      {"config": {"model": "synthetic", "checkpoint": "-"}, "config_hash": "synthetic"})  # fmt: skip
    np.save(root / "targets.npy", centres[:1000] / np.linalg.norm(centres[:1000], axis=1, keepdims=True))


# -- one step, in its own process ----------------------------------------------------------------------


def run_step(step: str, root: Path, engine_name: str, overrides: list[str]) -> None:
    """Run one step on the pool (in this process, which the parent measures)."""
    from pipeline.config import parse_config
    from pipeline.engines import get_engine
    from pipeline.store.parquet import Pool

    cfg = parse_config(config(root, engine_name, overrides), "bench")
    pool, engine = Pool(root), get_engine(cfg)
    if step == "metaclip":
        from pipeline.metaclip.stage import run_metaclip

        run_metaclip(pool, cfg.metaclip, engine, progress=False)
    elif step == "filter_scores":
        from pipeline.filters.stage import pending_scores, score_shards

        score_shards(pool, engine, pending_scores(pool), progress=False)
    elif step == "image_based":
        from pipeline.filters.image_based import run_image_based

        run_image_based(pool, cfg.filters, engine, progress=False)
    elif step == "dedup":
        from pipeline.filters.dedup import run_dedup

        run_dedup(pool, cfg.filters, engine, progress=False)
    elif step == "decisions":
        from pipeline.filters.decisions import run_decisions

        run_decisions(pool, cfg.filters, engine, progress=False)
    elif step == "mode":
        from pipeline.mode import run_mode

        run_mode(pool, cfg.mode, engine, progress=False)
    elif step == "rebalance":
        from pipeline.rebalance import run_rebalance

        run_rebalance(pool, cfg.rebalance, engine, progress=False)
    elif step == "quality":
        run_quality_heads(pool, root, engine)
    elif step == "export_plan":
        from pipeline.export import plan_release

        plan = plan_release(pool, cfg.export, engine)
        print(json.dumps({"release_samples": plan["samples"], "release_shards": len(plan["bounds"])}), file=sys.stderr)
    stop = getattr(engine, "stop", None)
    if stop is not None:
        stop()


def run_quality_heads(pool: object, root: Path, engine: object) -> None:
    """The quality step with LAION's two ViT-B/32-width heads (random weights in their published
    layouts: the v1 aesthetic linear head and the autokeras NSFW port)."""
    import numpy as np
    from safetensors.numpy import save_file

    from pipeline.config import HeadConfig, QualityConfig
    from pipeline.quality.stage import run_quality

    rng = np.random.default_rng(0)
    heads = root.parent / "heads"
    heads.mkdir(exist_ok=True)
    save_file({"weight": rng.normal(size=(1, DIM)).astype(np.float32), "bias": np.zeros(1, np.float32)},
              str(heads / "aesthetic.safetensors"))  # fmt: skip
    nsfw = {"norm.mean": np.zeros(DIM, np.float32), "norm.variance": np.ones(DIM, np.float32)}
    for i, (a, b) in enumerate(zip((DIM, 64, 512, 256), (64, 512, 256, 1), strict=True), start=1):
        nsfw |= {f"linear_{i}.weight": rng.normal(size=(b, a)).astype(np.float32) / np.sqrt(a),
                 f"linear_{i}.bias": np.zeros(b, np.float32)}  # fmt: skip
    save_file(nsfw, str(heads / "nsfw.safetensors"))
    cfg = QualityConfig(aesthetic=HeadConfig(weights=str(heads / "aesthetic.safetensors")),
                        nsfw=HeadConfig(weights=str(heads / "nsfw.safetensors")))  # fmt: skip
    run_quality(pool, cfg, engine, progress=False)


def _step_kind(process: object, is_step: bool) -> str | None:
    """The step's own process is left out (it reads its own peak); the others are workers or JVMs."""
    return None if is_step else ("jvm" if "java" in process.name() else "worker")


def measure(step: str, root: Path, size: int, engine: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--run-step", step, "--pool", str(root), "--engine", engine,
           "--rss-out", str(root.parent / f"{step}.rss"), *(f"--set={pair}" for pair in overrides)]  # fmt: skip
    t = time.perf_counter()
    proc = subprocess.Popen(cmd)
    with Peaks([proc.pid], _step_kind) as poll:
        rc = proc.wait()
    seconds = time.perf_counter() - t
    if rc:
        raise SystemExit(f"step {step} failed at size {size} (exit {rc})")
    main_gib = float((root.parent / f"{step}.rss").read_text())
    line = {"step": step, "size": size, "engine": engine, "seconds": round(seconds, 1),
            "samples_per_s": round(size / seconds), "peak_rss_gib": round(main_gib, 3),
            "worker_peak_rss_gib": round(poll.peaks.get("worker", 0.0), 3), "overrides": overrides}  # fmt: skip
    if engine == "spark":
        line["jvm_peak_rss_gib"] = round(poll.peaks.get("jvm", 0.0), 3)
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000])
    ap.add_argument("--engine", choices=("local", "spark"), default="local")
    ap.add_argument("--json", type=Path, help="append the JSON lines to this file")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench_scale")
    ap.add_argument("--keep", action="store_true", help="reuse pools built by an earlier run")
    ap.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    ap.add_argument("--run-step", choices=STEPS, help=argparse.SUPPRESS)
    ap.add_argument("--pool", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--rss-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of the benchmark's pool config (repeatable)")
    args = ap.parse_args()
    if args.run_step:  # the child: one step, then its own peak RSS (the kernel's VmHWM, exact)
        run_step(args.run_step, args.pool, args.engine, args.set)
        args.rss_out.write_text(str(peak_gib()))
        return
    for size in args.sizes:
        root = args.work / f"{size}" / "pool"
        if not (args.keep and (root / "input" / "plan.json").exists()):
            shutil.rmtree(root.parent, ignore_errors=True)
            t = time.perf_counter()
            build_pool(root, size)
            print(f"# built {size} rows in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        for step in args.steps:  # each measured step starts from none of its own output
            for stage in CLEARS[step]:
                shutil.rmtree(root / "completions" / stage, ignore_errors=True)
                shutil.rmtree(root / "tables" / stage, ignore_errors=True)
                (root / "aggregates" / f"{stage}.json").unlink(missing_ok=True)  # MoDE reuses a recorded fit
        for step in args.steps:
            emit(measure(step, root, size, args.engine, args.set), args.json)


def emit(line: dict, path: Path | None) -> None:
    """Print a benchmark's JSON line, and append it to ``path`` when given."""
    print(json.dumps(line), flush=True)
    if path:
        with path.open("a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
