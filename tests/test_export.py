"""Export of training releases: selection parity with DuckDB, WebDataset and open_clip readability,
determinism, byte and sample sharding, resume."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from pipeline.config import ExportConfig
from pipeline.engines.local import LocalEngine
from pipeline.export import ExportError, export
from tests.conftest import STAGES_AFTER_MODE, copy_pool


@pytest.fixture(scope="module")
def pool(clustered, tmp_path_factory):
    """The embedded and clustered 301-row pool, filtered with the basic recipe."""
    from pipeline.config import FilterConfig
    from pipeline.engines.local import LocalEngine
    from pipeline.filters.stage import run_filters

    pool = copy_pool(clustered[0], tmp_path_factory.mktemp("export") / "pool", STAGES_AFTER_MODE)
    run_filters(pool, FilterConfig(recipe="no_filter"), LocalEngine(2), progress=False)
    return pool


def _release_uids(out):
    urls = sorted(str(p) for p in out.glob("*.tar"))
    return [json.loads(s["json"])["uid"] for s in wds.WebDataset(urls, shardshuffle=False)], urls


def test_export_equals_the_duckdb_predicate(pool, tmp_path):
    from pipeline.query import query

    where = "expert_id = 1 and clip_score > -0.05"
    manifest = export(pool, ExportConfig(out=str(tmp_path / "rel"), where=where, samples_per_shard=25),
        engine=LocalEngine(1))
    expected = query(pool, f"select uid from samples where status = 'success' and ({where}) order by shard, key")
    uids, urls = _release_uids(tmp_path / "rel")
    assert uids == expected["uid"].to_pylist() and len(uids) > 25  # sample for sample, in pool order
    assert manifest["counts"]["samples"] == len(uids) and manifest["where"] == where
    assert [e["samples"] for e in manifest["shards"]] == [25] * (len(uids) // 25) + (
        [len(uids) % 25] if len(uids) % 25 else []
    )
    import hashlib

    for entry, url in zip(manifest["shards"], urls, strict=True):
        assert hashlib.sha256(Path(url).read_bytes()).hexdigest() == entry["sha256"]
    # each sample carries its image and caption; the sidecar has one row per sample, same order
    import pyarrow.parquet as pq

    sidecar = pq.read_table(tmp_path / "rel" / "00000.parquet")
    first = next(iter(wds.WebDataset(urls[:1], shardshuffle=False)))
    assert first["__key__"] == sidecar["key"][0].as_py() and first["txt"].decode() == sidecar["caption"][0].as_py()
    assert "image_embedding" not in sidecar.column_names and "expert_id" in sidecar.column_names
    card = (tmp_path / "rel" / "README.md").read_text()
    assert "Training with open_clip" in card
    assert re.search(r"--train-data '\{00000\.\.\d{5}\}\.tar'", card)  # from the card's folder, also inside vNNNN/


def test_open_clip_training_loader_reads_the_release(pool, tmp_path, tiny_checkpoint):
    import argparse

    import open_clip
    from open_clip_train.data import get_dataset_size, get_wds_dataset

    manifest = export(pool, ExportConfig(out=str(tmp_path / "rel"), where="keep", samples_per_shard=40),
        engine=LocalEngine(1))
    last = manifest["counts"]["shards"] - 1
    train_data = str(tmp_path / "rel" / f"{{00000..{last:05d}}}.tar")
    assert get_dataset_size(train_data) == (manifest["counts"]["samples"], manifest["counts"]["shards"])
    _, _, preprocess = open_clip.create_model_and_transforms("clipcurate-tiny")
    args = argparse.Namespace(val_data=train_data, val_num_samples=None, batch_size=16, workers=0)
    data = get_wds_dataset(args, preprocess, is_train=False, tokenizer=open_clip.get_tokenizer("clipcurate-tiny"))
    seen = sum(images.shape[0] for images, texts in data.dataloader)
    assert seen == manifest["counts"]["samples"]


def test_open_clip_trains_on_the_release(pool, tmp_path):
    """``open_clip_train.main``, as a user runs it, for one epoch on CPU over the release (the tiny
    model, ``--workers 0``): every loss it logs is finite and it sees every sample of sizes.json
    (the batch size divides the release, so its loader drops no partial batch)."""
    import math
    import re
    import subprocess
    import sys

    export(pool, ExportConfig(out=str(tmp_path / "rel"), where="keep", samples_per_shard=40), engine=LocalEngine(1))
    sizes = json.loads((tmp_path / "rel" / "sizes.json").read_text())
    total = sum(sizes.values())
    batch = max(b for b in range(1, 17) if total % b == 0)
    assert batch > 1, total  # a contrastive loss over batches of one is always 0
    train_data = str(tmp_path / "rel" / f"{{00000..{len(sizes) - 1:05d}}}.tar")
    configs = Path(__file__).resolve().parents[1] / "pipeline" / "model_configs"
    args = ["--train-data", train_data, "--dataset-type", "webdataset", "--train-num-samples", str(total),
            "--model", "clipcurate-tiny", "--batch-size", str(batch), "--workers", "0", "--epochs", "1",
            "--device", "cpu", "--logs", str(tmp_path / "logs"), "--name", "run", "--log-every-n-steps", "1",
            "--save-frequency", "0", "--lr", "1e-4"]  # fmt: skip
    code = (f"import open_clip; open_clip.add_model_config({str(configs)!r}); "
            f"from open_clip_train.main import main; main({args!r})")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    seen = [int(m) for m in re.findall(r"Train Epoch: 0 \[\s*(\d+)/", log)]
    losses = [float(x) for x in re.findall(r" Loss: (\S+) \(", log)]
    assert seen and max(seen) == total, (seen, total)
    assert len(losses) == total // batch and all(math.isfinite(x) for x in losses), losses


def test_shuffle_is_seeded_and_bytes_are_reproducible(pool, tmp_path):
    a = export(pool, ExportConfig(out=str(tmp_path / "a"), shuffle_seed=7, samples_per_shard=50, embeddings=True),
        engine=LocalEngine(1))
    b = export(pool, ExportConfig(out=str(tmp_path / "b"), shuffle_seed=7, samples_per_shard=50, embeddings=True),
        engine=LocalEngine(1))
    export(pool, ExportConfig(out=str(tmp_path / "c"), shuffle_seed=8, samples_per_shard=50), engine=LocalEngine(1))
    assert [e["sha256"] for e in a["shards"]] == [e["sha256"] for e in b["shards"]]
    ua, _ = _release_uids(tmp_path / "a")
    uc, _ = _release_uids(tmp_path / "c")
    assert sorted(ua) == sorted(uc) and ua != uc
    import pyarrow.parquet as pq

    from pipeline.query import query

    emb = pq.read_table(tmp_path / "a" / "embeddings" / "00000.parquet")
    assert emb["uid"].to_pylist() == ua[:50]
    stored = query(pool, f"select image_embedding from embed where uid = '{ua[0]}'")["image_embedding"][0].as_py()
    assert np.allclose(emb["image_embedding"][0].as_py(), stored)


def test_byte_limit_and_resume(pool, tmp_path):
    full = export(pool, ExportConfig(out=str(tmp_path / "ref"), samples_per_shard=1000, max_shard_bytes=400_000),
        engine=LocalEngine(1))
    assert len(full["shards"]) > 1 and all(e["bytes"] <= 400_000 for e in full["shards"])
    # an interrupted export left its first shard in the partial folder: the re-run keeps it
    partial = tmp_path / ".rel.partial"
    shutil.copytree(tmp_path / "ref", partial)
    for name in ("manifest.json", "README.md", "sizes.json"):
        (partial / name).unlink()
    for p in partial.glob("0000[1-9].*"):
        p.unlink()
    (partial / "plan.json").write_text(json.dumps({"digest": full["digest"]}))
    (partial / ".clipcurate-partial").touch()  # the export's own mark on the folder it builds in
    (partial / ".00001.tar.tmp-4242-1234").write_bytes(b"half a tar")  # a SIGKILLed writer's temp file
    kept_mtime = (partial / "00000.tar").stat().st_mtime_ns
    again = export(pool, ExportConfig(out=str(tmp_path / "rel"), samples_per_shard=1000, max_shard_bytes=400_000),
        engine=LocalEngine(1))
    assert (tmp_path / "rel" / "00000.tar").stat().st_mtime_ns == kept_mtime
    assert [e["sha256"] for e in again["shards"]] == [e["sha256"] for e in full["shards"]]
    assert not partial.exists()
    assert sorted(p.name for p in (tmp_path / "rel").iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir())


def test_bad_predicate_names_itself(pool, tmp_path):
    with pytest.raises(ExportError, match="no_such_column"):
        export(pool, ExportConfig(out=str(tmp_path / "x"), where="no_such_column > 1"), engine=LocalEngine(1))
    assert not (tmp_path / "x").exists()


def test_cli_export(pool, tmp_path, capsys):
    from pipeline.cli import main

    assert main(["export", str(pool.root), "--where", "keep", "--out", str(tmp_path / "r"), "--recipe", "basic"]) == 0
    out = capsys.readouterr().out
    assert "train with: --train-data" in out
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["recipe"] == "basic" and manifest["counts"]["samples"] > 0


def test_parallel_export_writes_the_same_bytes(pool, tmp_path):
    from pipeline.engines.local import LocalEngine

    cfg = {"samples_per_shard": 30, "shuffle_seed": 5, "embeddings": True}
    alone = export(pool, ExportConfig(out=str(tmp_path / "a"), **cfg), engine=LocalEngine(1))
    parallel = export(pool, ExportConfig(out=str(tmp_path / "b"), **cfg), engine=LocalEngine(2))
    assert len(alone["shards"]) > 3
    assert [e["sha256"] for e in alone["shards"]] == [e["sha256"] for e in parallel["shards"]]
    for name in ("00000.parquet", "embeddings/00001.parquet"):
        import pyarrow.parquet as pq

        assert pq.read_table(tmp_path / "a" / name).equals(pq.read_table(tmp_path / "b" / name))


def test_export_recipe_decides_with_the_pools_recorded_parameters(clustered, tmp_path):
    """``--recipe R`` re-decides with the pool's recorded filter config (here a non-default
    ``clip_score_fraction``), so the release is exactly what ``tables/decisions`` keeps."""
    from pipeline.config import FilterConfig
    from pipeline.engines.local import LocalEngine
    from pipeline.filters.stage import run_filters
    from pipeline.query import query

    pool = copy_pool(clustered[0], tmp_path / "pool", STAGES_AFTER_MODE)
    recipes = {"mine": ["english", "clip_score"], "same_rules": ["clip_score", "english"]}
    cfg = FilterConfig(recipe="mine", recipes=recipes, clip_score_fraction=0.55)
    summary = run_filters(pool, cfg, LocalEngine(1), progress=False)
    kept = query(pool, "select uid from samples where keep and status = 'success' and key is not null "
                       "order by shard, key")["uid"].to_pylist()  # fmt: skip
    # the decided recipe reads the stored decisions; another one is re-decided with the pool's
    # recorded parameters (the same rules in another order: the same samples)
    for recipe, how in (("mine", "stored"), ("same_rules", "re-decided")):
        manifest = export(pool, ExportConfig(out=str(tmp_path / recipe), recipe=recipe), engine=LocalEngine(1))
        uids, _ = _release_uids(tmp_path / recipe)
        assert manifest["recipe_decisions"] == how and uids == kept and 0 < len(kept) == summary["kept"]
    # the same recipe with the default fraction (0.3) would keep fewer: the recorded one was used
    fewer = run_filters(pool, FilterConfig(recipe="mine", recipes=cfg.recipes), LocalEngine(1), progress=False)
    assert fewer["kept"] < len(kept)


def test_release_uids_are_datacomps_uid_file_and_select_the_same_release(pool, tmp_path, capsys):
    """uids.npy holds the release's uids as DataComp's sorted u8,u8 pairs; `export --uids` of it (no
    predicate) writes the same shards byte for byte, and counts the file's uids it could not export."""
    import pyarrow.parquet as pq

    from pipeline.cli import main

    settings = {"samples_per_shard": 40, "shuffle_seed": 5}
    first = export(pool, ExportConfig(out=str(tmp_path / "a"), where="keep and clip_score > -0.05", **settings),
        engine=LocalEngine(1))
    pairs = np.load(tmp_path / "a" / "uids.npy")
    assert pairs.dtype == np.dtype("u8,u8") and len(pairs) == first["counts"]["samples"] > 40
    sidecar_uids = pq.read_table(sorted((tmp_path / "a").glob("*.parquet")), columns=["uid"])["uid"].to_pylist()
    assert [f"{int(hi):016x}{int(lo):016x}" for hi, lo in pairs.tolist()] == sorted(sidecar_uids)
    assert np.array_equal(np.sort(pairs), pairs)  # DataComp's own sort order
    # a published subset's uid file, with three uids the pool does not have
    foreign = np.array([(1, 2), (3, 4), (2**64 - 1, 5)], np.dtype("u8,u8"))
    np.save(tmp_path / "subset.npy", np.sort(np.concatenate([pairs, foreign])))
    args = ["export", str(pool.root), "--out", str(tmp_path / "b"), "--uids", str(tmp_path / "subset.npy"),
            "--samples-per-shard", "40", "--shuffle-seed", "5"]  # fmt: skip
    assert main(args) == 0
    assert "3 of its uids are not in the release" in capsys.readouterr().out
    second = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert second["counts"]["uids_unmatched"] == 3 and second["counts"]["samples"] == first["counts"]["samples"]
    assert [e["sha256"] for e in second["shards"]] == [e["sha256"] for e in first["shards"]]
    assert (tmp_path / "b" / "uids.npy").read_bytes() == (tmp_path / "a" / "uids.npy").read_bytes()
    # files that are not a uid file are named
    np.save(tmp_path / "unsorted.npy", pairs[::-1])
    np.save(tmp_path / "ints.npy", np.arange(4))
    for name, why in (("unsorted.npy", "is not above the one before it"), ("ints.npy", "u8,u8")):
        args[3:6] = [str(tmp_path / "c"), "--uids", str(tmp_path / name)]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert str(tmp_path / name) in err and why in err
        assert not (tmp_path / "c").exists() and not (tmp_path / ".c.partial").exists()


def test_versioned_releases_keep_old_versions_prune_by_retention_and_refuse_foreign_files(pool, tmp_path, capsys):
    """v0001, v0002, ... never rewritten; the same selection makes no version; CHANGES.md counts
    the removed samples by the decision that drops them; retention removes only our versions."""
    from pipeline.cli import main
    from pipeline.query import query

    out = tmp_path / "versions"
    first = export(pool, ExportConfig(out=str(out), where="clip_score > -0.05", versioned=True), engine=LocalEngine(1))
    assert first["new_version"] and first["version"] == "v0001" and (out / "latest").readlink().name == "v0001"
    v1 = {p.name: p.read_bytes() for p in (out / "v0001").iterdir()}
    again = export(pool, ExportConfig(out=str(out), where="clip_score > -0.05", versioned=True), engine=LocalEngine(1))
    assert not again["new_version"] and again["version"] == "v0001" and not (out / "v0002").exists()

    where = "clip_score > -0.05 and keep and expert_id = 1"  # a narrower selection: a new version
    assert main(["export", str(pool.root), "--out", str(out), "--where", where, "--versioned"]) == 0
    assert "v0002: new version" in capsys.readouterr().out
    second = json.loads((out / "v0002" / "manifest.json").read_text())
    assert {p.name: p.read_bytes() for p in (out / "v0001").iterdir()} == v1 and second["previous_version"] == "v0001"
    removed = query(pool, "select count(*) as n from samples where status = 'success' and clip_score > -0.05 "
                          "and not (keep and expert_id = 1)")["n"][0].as_py()  # fmt: skip
    changes = second["changes"]
    assert sum(changes["removed"].values()) == removed > 0 and sum(changes["added"].values()) == 0
    dropped = query(pool, "select count(*) as n from samples where status = 'success' and clip_score > -0.05 "
                          "and not keep")["n"][0].as_py()  # fmt: skip
    by_filter = sum(n for r, n in changes["removed"].items() if r.startswith("filtered: "))
    assert by_filter == dropped and "## Removed, by reason" in (out / "v0002" / "CHANGES.md").read_text()

    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"notes\.txt"):
        export(pool, ExportConfig(out=str(out), where="true", versioned=True, keep_versions=1), engine=LocalEngine(1))
    (out / "notes.txt").unlink()
    third = export(pool, ExportConfig(out=str(out), where="true", versioned=True, keep_versions=1),
        engine=LocalEngine(1))
    assert third["version"] == "v0003" and sorted(p.name for p in out.iterdir() if p.name[0] != ".") == [
        "latest", "v0003"]  # fmt: skip
    assert (out / "latest").readlink().name == "v0003"
