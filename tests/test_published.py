"""Published pools as they are: a DataComp metadata folder (uids kept, faces blurred, embeddings
imported) and a clip-retrieval embedding folder, each written by these tests in the exact published
layout.

No published vectors exist offline, so the fixtures' vectors are real embeddings of the served images
and captions by random-weight open_clip models of DataComp's dimensions (768-d for ``l14``, 512-d
for ``b32``), saved and loaded like real weights: the import must carry them into the pool exactly.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import EmbedConfig, EmbedSourceConfig, ExportConfig, FilterConfig, ModeConfig, parse_config
from pipeline.devserver import kind_of, served_image, token_for
from pipeline.download import InputError, run_download
from pipeline.embed import run_embed
from pipeline.engines.local import LocalEngine
from pipeline.query import query
from pipeline.store.parquet import Pool
from tests.conftest import copy_pool, laion_rows, point_at

BOX = [0.3, 0.3, 0.6, 0.6]


def _tiny_config(dim: int) -> dict:
    return {"embed_dim": dim, "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "head_width": 32,
                                             "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}  # fmt: skip


def _embedders(root: Path) -> dict:
    """Random-weight open_clip models with DataComp's l14 (768) and b32 (512) dimensions."""
    from pipeline.embed import ClipEmbedder, save_random_checkpoint
    from pipeline.embed.stage import _open_clip

    configs = root / "model_configs"
    configs.mkdir(parents=True)
    for key, dim in (("l14", 768), ("b32", 512)):
        (configs / f"published-{key}.json").write_text(json.dumps(_tiny_config(dim)))
    _open_clip().add_model_config(configs)
    out = {}
    for seed, key in enumerate(("l14", "b32")):
        ckpt = save_random_checkpoint(f"published-{key}", root / f"{key}.safetensors", seed=seed)
        out[key] = ClipEmbedder(EmbedConfig(model=f"published-{key}", checkpoint=str(ckpt), device="cpu")).setup()
    return out


def _embed_served(embedder, originals: list[str], captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of the images the server answers for ``originals`` (the LAION URLs) and of the captions."""
    import torch

    pixels = torch.stack([embedder.preprocess(Image.open(io.BytesIO(served_image(token_for(u)))).convert("RGB"))
                          for u in originals])  # fmt: skip
    return embedder.encode_images(pixels), embedder.encode_texts(captions)


@pytest.fixture(scope="module")
def datacomp(tmp_path_factory, image_server):
    """A DataComp metadata folder of two Parquet files with their .npz files, over rows the demo
    server answers with an image (DataComp's vectors are of images that were fetched)."""
    root = tmp_path_factory.mktemp("datacomp")
    rows = laion_rows(400, offset=2000)
    original = rows["url"].to_pylist()
    rows = point_at(rows, image_server)
    served = [i for i, u in enumerate(original) if kind_of(token_for(u)) == "ok"][:120]
    rows = rows.take(served)
    urls, captions = rows["url"].to_pylist(), [c or "" for c in rows["caption"].to_pylist()]
    originals = [original[i] for i in served]
    embedders = _embedders(root / "models")
    folder = root / "metadata"
    folder.mkdir()
    uids = [hashlib.md5(f"datacomp-{i}".encode()).hexdigest() for i in range(len(urls))]
    vectors = {}
    for key, embedder in embedders.items():
        vectors[f"{key}_img"], vectors[f"{key}_txt"] = _embed_served(embedder, originals, captions)
    boxes = [[BOX] if i % 3 == 0 else [] for i in range(len(urls))]
    half = len(urls) // 2
    for part, (lo, hi) in enumerate(((0, half), (half, len(urls)))):
        table = pa.table({
            "uid": uids[lo:hi], "url": urls[lo:hi], "text": captions[lo:hi],
            "original_width": pa.nulls(hi - lo, pa.int64()), "original_height": pa.nulls(hi - lo, pa.int64()),
            "sha256": [hashlib.sha256(served_image(token_for(u))).hexdigest() for u in originals[lo:hi]],
            **{f"clip_{key}_similarity_score": (vectors[f"{key}_img"][lo:hi] * vectors[f"{key}_txt"][lo:hi]).sum(1)
               for key in ("l14", "b32")},
            "face_bboxes": pa.array(boxes[lo:hi], pa.list_(pa.list_(pa.float64()))),
        })  # fmt: skip
        pq.write_table(table, folder / f"{part:08d}.parquet")
        np.savez(folder / f"{part:08d}.npz", **{k: v[lo:hi].astype(np.float16) for k, v in vectors.items()})
    return folder, uids, originals, vectors


def _config(root: Path, folder: Path, **download) -> object:
    settings = {"input": str(folder), "url_col": "url", "caption_col": "text", "uid_col": "uid",
                "extra_cols": ["clip_l14_similarity_score"], "bbox_col": "face_bboxes", "samples_per_shard": 40,
                "timeout": 2.0, "processes": 2, "threads": 8, **download}  # fmt: skip
    return parse_config({"pool": str(root / "pool"), "download": settings}, "test")


@pytest.fixture(scope="module")
def downloaded(datacomp, tmp_path_factory):
    folder = datacomp[0]
    cfg = _config(tmp_path_factory.mktemp("dcpool"), folder)
    pool = Pool(cfg.pool)
    run_download(pool, cfg.download, LocalEngine(2), progress=False)
    return pool, cfg


def test_download_keeps_datacomp_uids_and_extra_columns(datacomp, downloaded):
    folder, uids, _, _ = datacomp
    pool, _ = downloaded
    table = pool.read_table("download").sort_by("row")
    assert table["uid"].to_pylist() == uids  # the list's own uids, in the folder's file order
    assert set(table["status"].to_pylist()) == {"success"}
    published = pq.read_table(sorted(folder.glob("*.parquet")))["clip_l14_similarity_score"]
    assert table["clip_l14_similarity_score"].to_pylist() == published.to_pylist()
    assert table["blurred"].to_pylist() == [i % 3 == 0 for i in range(len(uids))]
    assert pool.read_plan()["source_files"] == 2


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)


def test_faces_are_blurred_inside_their_boxes_only(datacomp, downloaded):
    """The stored image differs from the served one inside the box (img2dataset's blur) and not away
    from it (only JPEG re-encoding noise), as in DataComp's download."""
    _, _, originals, _ = datacomp
    pool, _ = downloaded
    table = pool.read_table("download").sort_by("row")
    members = {}
    for shard in range(pool.read_plan()["num_shards"]):
        with tarfile.open(pool.shard_tar(shard)) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")})
    checked = 0
    for i, (key, blurred) in enumerate(zip(table["key"].to_pylist(), table["blurred"].to_pylist(), strict=True)):
        served = _pixels(served_image(token_for(originals[i])))
        stored = _pixels(members[f"{key}.jpg"])
        if stored.shape != served.shape:  # resized (longest side over 512): not comparable pixel for pixel
            continue
        h, w = served.shape[:2]
        inside = (slice(int(0.33 * h), int(0.57 * h)), slice(int(0.33 * w), int(0.57 * w)))
        away = np.ones((h, w), bool)
        away[int(0.1 * h): int(0.8 * h), int(0.1 * w): int(0.8 * w)] = False
        noise = np.abs(stored - served)[away].mean()
        assert noise < 3.0, (i, noise)  # JPEG re-encoding only
        if not blurred:
            assert np.abs(stored - served).mean() < 3.0
            continue
        detail = np.abs(np.diff(served[inside], axis=1)).mean()
        if detail < 2.0:  # a flat patch looks the same blurred: nothing to see there
            continue
        assert np.abs(stored - served)[inside].mean() > noise + 1.0, i
        checked += 1
    assert checked >= 3


def test_bad_datacomp_lists_are_named(datacomp, tmp_path):
    folder = datacomp[0]
    files = sorted(folder.glob("*.parquet"))
    first = pq.read_table(files[0])
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(first.set_column(0, "uid", pa.array(["XYZ", *first["uid"].to_pylist()[1:]])), bad / "a.parquet")
    with pytest.raises(InputError, match=r"a\.parquet: row 1: uid column 'uid' holds 'XYZ'"):
        run_download(Pool(tmp_path / "p1"), _config(tmp_path, bad).download, LocalEngine(1), progress=False)
    (bad / "a.parquet").unlink()
    pq.write_table(first.slice(0, 5), bad / "a.parquet")
    pq.write_table(first.slice(3, 5), bad / "b.parquet")
    with pytest.raises(InputError, match=r"given twice: .*a\.parquet row 4 and .*b\.parquet row 1"):
        run_download(Pool(tmp_path / "p2"), _config(tmp_path, bad).download, LocalEngine(1), progress=False)
    with pytest.raises(InputError, match="would replace a column the pool computes"):
        cfg = _config(tmp_path, folder, extra_cols=["sha256"])
        run_download(Pool(tmp_path / "p3"), cfg.download, LocalEngine(1), progress=False)


def _import_cfg(folder: Path, key: str = "l14") -> EmbedConfig:
    return EmbedConfig(source=EmbedSourceConfig(path=str(folder), format="datacomp", key=key), caption_model="clip")


@pytest.fixture(scope="module")
def imported(datacomp, downloaded):
    folder = datacomp[0]
    pool, _ = downloaded
    done = run_embed(pool, _import_cfg(folder), LocalEngine(2), progress=False)
    return pool, done


def test_import_carries_the_published_vectors_and_scores(datacomp, imported):
    _, uids, _, vectors = datacomp
    pool, done = imported
    assert sum(c["imported"] for c in done.values()) == len(uids) and not any(c["missing"] for c in done.values())
    emb = query(pool, "select e.uid, e.image_embedding, e.text_embedding, e.clip_score, e.model, c.caption_model "
                      "from embed e join caption_embed c using (uid)")  # fmt: skip
    order = {u: i for i, u in enumerate(uids)}
    at = np.array([order[u] for u in emb["uid"].to_pylist()])
    img = np.asarray(emb["image_embedding"].to_pylist(), np.float32)
    want = vectors["l14_img"][at].astype(np.float16).astype(np.float32)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert img.shape == (len(uids), 768) and np.abs(img - want).max() < 2e-3
    published = (vectors["l14_img"][at] * vectors["l14_txt"][at]).sum(1)
    assert np.allclose(emb["clip_score"].to_numpy(), published, atol=1e-6)  # the published column, as is
    assert set(emb["model"].to_pylist()) == {"ViT-L-14"}
    assert set(emb["caption_model"].to_pylist()) == {"ViT-L-14 text (published)"}
    assert pool.stage_config("embed")["config"]["format"] == "datacomp"


def test_recipes_and_export_run_on_imported_vectors(datacomp, imported, tmp_path):
    """DataComp's clip_score (fraction 0.3) and image_based recipes and MoDE on the imported vectors,
    then a release; its uids.npy holds the release's uids, and ``export --uids`` of it writes the same
    release byte for byte."""
    from pipeline.cli import main
    from pipeline.export import export
    from pipeline.filters.stage import run_filters
    from pipeline.mode import run_mode

    _, _, _, vectors = datacomp
    pool, _ = imported
    np.save(tmp_path / "targets.npy", vectors["l14_img"][[0, 40, 80]])  # ImageNet's place: real l14 vectors
    clip = run_filters(pool, FilterConfig(recipe="clip_score", clip_score_fraction=0.3), LocalEngine(2),
                       progress=False)  # fmt: skip
    scores = query(pool, "select clip_score from embed")["clip_score"].to_numpy()
    threshold = np.sort(scores)[::-1][int(len(scores) * 0.3)]  # DataComp's get_threshold
    assert clip["rule_params"]["clip_score"]["threshold"] == pytest.approx(float(threshold))
    assert clip["kept"] == int((scores >= threshold).sum())
    cfg = FilterConfig(recipe="image_based", image_clusters=4, image_targets=str(tmp_path / "targets.npy"))
    summary = run_filters(pool, cfg, LocalEngine(2), progress=False)
    assert summary["image_based"]["target_embeddings"] == 3 and summary["image_based"]["target_clusters"] >= 1
    kept = query(pool, "select uid from samples where keep")["uid"].to_pylist()
    assert 0 < len(kept) == summary["kept"] < len(scores)
    # MoDE clusters the published text vectors (caption_embed) like computed ones
    mode = run_mode(pool, ModeConfig(n_fine=4, n_experts=2, fit_fraction=1.0, min_fit_samples=0), LocalEngine(2),
                    progress=False)  # fmt: skip
    assert mode["caption_model"] == "ViT-L-14 text (published)"
    assert query(pool, "select count(*) as n from mode")["n"][0].as_py() == len(scores)
    manifest = export(pool, ExportConfig(out=str(tmp_path / "a"), where="keep", samples_per_shard=16, shuffle_seed=3,
                                         embeddings=True), engine=LocalEngine(1))  # fmt: skip
    assert manifest["counts"]["samples"] == len(kept)
    pairs = np.load(tmp_path / "a" / "uids.npy")
    release = pq.read_table(sorted((tmp_path / "a").glob("*.parquet")), columns=["uid"])["uid"].to_pylist()
    assert [f"{int(hi):016x}{int(lo):016x}" for hi, lo in pairs.tolist()] == sorted(release)
    assert set(release) == set(kept)
    args = ["export", str(pool.root), "--out", str(tmp_path / "b"), "--uids", str(tmp_path / "a" / "uids.npy"),
            "--samples-per-shard", "16", "--shuffle-seed", "3", "--embeddings"]  # fmt: skip
    assert main(args) == 0
    for tar in sorted((tmp_path / "a").glob("*.tar")):
        assert (tmp_path / "b" / tar.name).read_bytes() == tar.read_bytes()


def test_import_refuses_a_mismatched_file(datacomp, downloaded, tmp_path):
    import shutil

    from pipeline.embed.imported import EmbeddingImportError

    folder = tmp_path / "metadata"
    shutil.copytree(datacomp[0], folder)
    npz = sorted(folder.glob("*.npz"))[1]
    arrays = dict(np.load(npz))
    arrays["l14_img"] = arrays["l14_img"][:-1]
    np.savez(npz, **arrays)
    pool, _ = downloaded
    with pytest.raises(EmbeddingImportError, match=rf"{npz.name}: l14_img has 59 rows but 00000001\.parquet has 60"):
        run_embed(pool, _import_cfg(folder), LocalEngine(1), progress=False)
    arrays["l14_img"] = np.zeros((60, 512), np.float16)
    np.savez(npz, **arrays)
    with pytest.raises(EmbeddingImportError, match="DataComp's l14 vectors are 768-d"):
        run_embed(pool, _import_cfg(folder), LocalEngine(1), progress=False)


def test_an_npz_of_objects_or_garbage_is_refused_before_any_memory_map(datacomp, downloaded, tmp_path):
    """An object array read through ``np.memmap`` would be read as pointers (the worker segfaulted):
    the dtype is checked from the header first; a file that is no zip is named, not a traceback."""
    import shutil

    from pipeline.embed.imported import EmbeddingImportError, _npz_member

    folder = tmp_path / "metadata"
    shutil.copytree(datacomp[0], folder)
    npz = sorted(folder.glob("*.npz"))[1]
    arrays = dict(np.load(npz))
    pool, _ = downloaded
    for save in (np.savez, np.savez_compressed):  # memory-mapped, and read whole
        objects = np.empty((60, 768), dtype=object)
        objects[:] = 1.0
        save(npz, **{**arrays, "l14_img": objects})
        with pytest.raises(EmbeddingImportError, match=rf"{npz.name}: 'l14_img' is object"):
            _npz_member(npz, "l14_img")
        with pytest.raises(EmbeddingImportError, match=rf"{npz.name}: 'l14_img' is object"):
            run_embed(pool, _import_cfg(folder), LocalEngine(1), progress=False)
    npz.write_bytes(b"not a zip at all" * 100)
    with pytest.raises(EmbeddingImportError, match=rf"{npz.name}: not a readable \.npz"):
        run_embed(pool, _import_cfg(folder), LocalEngine(1), progress=False)


def test_nan_and_inf_vectors_get_a_decode_error_and_never_ship(datacomp, downloaded, tmp_path):
    import shutil

    from pipeline.config import ExportConfig
    from pipeline.export import export

    folder = tmp_path / "metadata"
    shutil.copytree(datacomp[0], folder)
    npz = sorted(folder.glob("*.npz"))[0]
    arrays = dict(np.load(npz))
    arrays["l14_img"][3, 5] = np.nan
    arrays["l14_txt"][7, 0] = np.inf
    np.savez(npz, **arrays)
    bad = {datacomp[1][3], datacomp[1][7]}
    pool = copy_pool(downloaded[0], tmp_path / "pool", ("embed", "caption_embed"))  # not imported yet
    done = run_embed(pool, _import_cfg(folder), LocalEngine(1), progress=False)
    assert sum(c["non_finite"] for c in done.values()) == 2
    rows = query(pool, "select uid, decode_error, clip_score from embed where decode_error is not null")
    assert set(rows["uid"].to_pylist()) == bad and rows["clip_score"].null_count == 2
    assert all(e == "published embedding is not finite (NaN or Inf)" for e in rows["decode_error"].to_pylist())
    manifest = export(pool, ExportConfig(out=str(tmp_path / "rel"), where="true", embeddings=True),
                      engine=LocalEngine(1))  # fmt: skip
    shipped = set(pq.read_table(sorted((tmp_path / "rel").glob("[0-9]*.parquet")), columns=["uid"])["uid"].to_pylist())
    assert manifest["counts"]["samples"] == len(shipped) > 0 and not shipped & bad
    vectors = pq.read_table(sorted((tmp_path / "rel" / "embeddings").glob("*.parquet")))
    assert np.isfinite(np.asarray(vectors["image_embedding"].to_pylist(), np.float32)).all()


# --- clip-retrieval / LAION ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_retrieval(tmp_path_factory, image_server):
    """clip-retrieval's inference output, two numbered parts, over rows the server answers."""
    from pipeline.embed import ClipEmbedder, save_random_checkpoint

    root = tmp_path_factory.mktemp("clipretrieval")
    rows = laion_rows(200, offset=3000)
    original = rows["url"].to_pylist()
    keep = [i for i, u in enumerate(original) if kind_of(token_for(u)) == "ok"][:50]
    rows = point_at(rows, image_server).take(keep)
    urls, captions = rows["url"].to_pylist(), [c or "" for c in rows["caption"].to_pylist()]
    ckpt = save_random_checkpoint("clipcurate-tiny", root / "tiny.safetensors", seed=3)
    embedder = ClipEmbedder(EmbedConfig(model="clipcurate-tiny", checkpoint=str(ckpt), device="cpu")).setup()
    img, txt = _embed_served(embedder, [original[i] for i in keep], captions)
    folder = root / "laion"
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True)
    for part, (lo, hi) in enumerate(((0, 30), (30, len(urls)))):
        np.save(folder / "img_emb" / f"img_emb_{part}.npy", img[lo:hi].astype(np.float16))
        np.save(folder / "text_emb" / f"text_emb_{part}.npy", txt[lo:hi].astype(np.float16))
        pq.write_table(pa.table({"image_path": [str(i) for i in range(lo, hi)], "caption": captions[lo:hi],
                                 "url": urls[lo:hi]}), folder / "metadata" / f"metadata_{part}.parquet")  # fmt: skip
    return folder, urls, img, txt


def test_clip_retrieval_import_joins_on_row_order(clip_retrieval, tmp_path):
    folder, urls, img, _ = clip_retrieval
    cfg = parse_config({"pool": str(tmp_path / "pool"), "download": {
        "input": str(folder / "metadata"), "samples_per_shard": 20, "timeout": 2.0, "threads": 8},
        "embed": {"model": "clipcurate-tiny", "source": {"path": str(folder), "format": "clip-retrieval"}}}, "test")
    pool = Pool(cfg.pool)
    run_download(pool, cfg.download, LocalEngine(2), progress=False)
    done = run_embed(pool, cfg.embed, LocalEngine(2), progress=False)
    assert sum(c["imported"] for c in done.values()) == len(urls)
    emb = query(pool, "select d.url, e.image_embedding, e.clip_score from embed e join download d using (uid)")
    at = np.array([urls.index(u) for u in emb["url"].to_pylist()])
    got = np.asarray(emb["image_embedding"].to_pylist(), np.float32)
    want = img[at].astype(np.float16).astype(np.float32)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert np.abs(got - want).max() < 2e-3
    assert set(emb["clip_score"].is_null().to_pylist()) == {False}  # no score column: the cosine
    assert pool.stage_config("embed")["config"]["model"] == "clipcurate-tiny"


def test_a_pool_whose_rows_are_not_clip_retrievals_is_named_with_rows_counted_from_1(clip_retrieval, tmp_path):
    """The pool prepared from a list whose first part is in another order: the import names the
    metadata file and both rows, each counted from 1 like every row this tool names."""
    import shutil

    from pipeline.engines.base import ShardFailures

    folder, urls, _, _ = clip_retrieval
    listed = tmp_path / "list"
    shutil.copytree(folder / "metadata", listed)
    part = pq.read_table(listed / "metadata_0.parquet")
    pq.write_table(part.take(pa.array(range(part.num_rows - 1, -1, -1))), listed / "metadata_0.parquet")
    cfg = parse_config({"pool": str(tmp_path / "pool"), "download": {
        "input": str(listed), "samples_per_shard": 20, "timeout": 2.0, "threads": 8},
        "embed": {"model": "clipcurate-tiny", "source": {"path": str(folder), "format": "clip-retrieval"}}}, "test")
    pool = Pool(cfg.pool)
    run_download(pool, cfg.download, LocalEngine(2), progress=False)
    with pytest.raises(ShardFailures) as info:
        run_embed(pool, cfg.embed, LocalEngine(2), progress=False)
    want = (f"{folder / 'metadata' / 'metadata_0.parquet'} row 1 has url {urls[0]!r}, but row 1 of the pool's URL "
            f"list has {urls[29]!r}")  # fmt: skip
    assert want in str(info.value) and "Traceback" not in str(info.value), str(info.value)


def test_clip_retrieval_parts_that_disagree_are_named(clip_retrieval, tmp_path):
    import shutil

    from pipeline.embed.imported import EmbeddingImportError, check_clip_retrieval

    folder = tmp_path / "laion"
    shutil.copytree(clip_retrieval[0], folder)
    part = folder / "text_emb" / "text_emb_1.npy"
    np.save(part, np.load(part)[:-2])
    with pytest.raises(EmbeddingImportError, match=r"text_emb_1\.npy: 18 rows but .*metadata_1\.parquet has 20"):
        check_clip_retrieval(folder)


@pytest.mark.spark
@pytest.mark.slow
def test_import_on_spark_equals_local(datacomp, downloaded, imported, tmp_path):
    """The uid join (an engine write) and the per-shard gathers give the local engine's tables on Spark."""
    import shutil

    pytest.importorskip("pyspark")
    from pipeline.config import SparkConfig
    from pipeline.engines.spark import SparkEngine
    from tests.conftest import copy_pool

    local, _ = imported
    pool = copy_pool(local, tmp_path / "pool", tuple(s for s in local.stages() if s != "download"))
    shutil.rmtree(pool.aggregates_dir, ignore_errors=True)
    engine = SparkEngine(SparkConfig(master="local[2]", task_max_failures=2))
    try:
        run_embed(pool, _import_cfg(datacomp[0]), engine, progress=False)
    finally:
        engine.stop()
    for stage in ("embed", "caption_embed"):
        a, b = (p.read_table(stage).sort_by("uid") for p in (local, pool))
        assert a.num_rows > 0 and a.equals(b), stage
