"""The embedding stage with a tiny open_clip model whose random weights are saved to disk and loaded
through the same ``checkpoint`` path real weights take."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.embed import (
    CAPTION_STAGE,
    STAGE,
    ClipEmbedder,
    EmbedError,
    checkpoint_sha256,
    run_embed,
)
from pipeline.engines.local import LocalEngine
from pipeline.errors import UserError
from pipeline.store.parquet import Pool
from pipeline.store.webdataset import decode_image, iter_shard
from tests.conftest import LAION, embed_cfg


@pytest.fixture(scope="module")
def embedded(downloaded_pool, tiny_checkpoint, tmp_path_factory):
    pool = Pool(shutil.copytree(downloaded_pool[0].root, tmp_path_factory.mktemp("emb") / "pool"))
    done = run_embed(pool, embed_cfg(tiny_checkpoint), LocalEngine(1), progress=False)
    return pool, done


def _stored(pool: Pool, column: str) -> np.ndarray:
    """The embeddings of every shard as one float16 matrix, viewed without a copy."""
    vectors = []
    for shard in sorted(pool.completed(STAGE)):
        col = pq.read_table(pool.table_path(STAGE, shard), columns=[column])[column].combine_chunks()
        vectors.append(col.values.to_numpy(zero_copy_only=True).reshape(len(col), col.type.list_size))
    return np.concatenate(vectors)


def test_embeddings_round_trip_exactly_through_numpy_and_duckdb(embedded, tiny_checkpoint):
    pool, done = embedded
    statuses = pool.read_table("download")["status"].to_pylist()
    assert sum(c["samples"] for c in done.values()) == statuses.count("success")
    # the same images through the model directly, outside the stage
    embedder = ClipEmbedder(embed_cfg(tiny_checkpoint)).setup()
    samples = list(iter_shard(pool.shard_tar(1)))[:20]
    import torch

    pixels = torch.stack([embedder.preprocess(decode_image(s["jpg"])[0]) for s in samples])
    direct_image = embedder.encode_images(pixels).astype(np.float16)
    direct_text = embedder.encode_texts([s["txt"] for s in samples]).astype(np.float16)
    table = pq.read_table(pool.table_path(STAGE, 1))
    assert table["uid"].to_pylist()[:20] == [s["json"]["uid"] for s in samples]
    numpy_view = table["image_embedding"].combine_chunks().values.to_numpy(zero_copy_only=True).reshape(len(table), -1)
    assert np.array_equal(numpy_view[:20], direct_image)
    rows = duckdb.execute(
        "select image_embedding, text_embedding from read_parquet(?) order by uid", [str(pool.table_path(STAGE, 1))]
    ).fetchall()
    by_uid = dict(zip(sorted(table["uid"].to_pylist()), rows, strict=True))
    for i, s in enumerate(samples):
        image, text = by_uid[s["json"]["uid"]]
        assert np.array_equal(np.array(image, np.float32), direct_image[i].astype(np.float32))
        assert np.array_equal(np.array(text, np.float32), direct_text[i].astype(np.float32))


def test_clip_score_is_the_cosine_of_the_pair(embedded, tiny_checkpoint):
    pool, _ = embedded
    image, text = (
        _stored(pool, "image_embedding").astype(np.float32),
        _stored(pool, "text_embedding").astype(np.float32),
    )
    assert np.allclose(np.linalg.norm(image, axis=1), 1, atol=2e-3)
    score = pool.read_table(STAGE)["clip_score"].to_numpy(zero_copy_only=False)
    assert np.allclose(score, (image * text).sum(axis=1), atol=3e-3)
    assert pool.read_table(STAGE)["checkpoint_sha256"].unique().to_pylist() == [checkpoint_sha256(tiny_checkpoint)]


def test_caption_embeddings_default_to_the_clip_text_tower(embedded):
    pool, _ = embedded
    caption = pool.read_table(CAPTION_STAGE)
    assert caption["uid"].to_pylist() == pool.read_table(STAGE)["uid"].to_pylist()
    assert set(caption["caption_model"].to_pylist()) == {"clip-text"}
    vectors = (
        caption["caption_embedding"].combine_chunks().values.to_numpy(zero_copy_only=True).reshape(caption.num_rows, -1)
    )
    assert np.array_equal(vectors, _stored(pool, "text_embedding"))


def test_rerun_skips_embedded_shards(embedded, tiny_checkpoint):
    pool, _ = embedded
    assert run_embed(pool, embed_cfg(tiny_checkpoint), LocalEngine(1), progress=False) == {}


def _corrupt_one_image(tar_path: Path) -> str:
    """Rewrite ``tar_path`` with its second sample's JPEG cut short; return that sample's key."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = sorted({m.name.split(".")[0] for m, _ in members})
    victim = keys[1]
    with tarfile.open(tar_path, "w") as tar:
        for member, data in members:
            if member.name == f"{victim}.jpg":
                data = data[:40]
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return victim


def test_an_undecodable_image_gives_a_null_embedding_and_a_decode_error(downloaded_pool, tiny_checkpoint, tmp_path):
    pool = Pool(shutil.copytree(downloaded_pool[0].root, tmp_path / "pool"))
    victim = _corrupt_one_image(pool.shard_tar(0))
    done = run_embed(pool, embed_cfg(tiny_checkpoint, workers=0), LocalEngine(1), progress=False)
    assert done[0]["decode_errors"] == 1 and all(c["decode_errors"] == 0 for s, c in done.items() if s)
    row = duckdb.execute(
        "select e.image_embedding, e.clip_score, e.decode_error, e.text_embedding from read_parquet(?) e "
        "join read_parquet(?) d using (uid) where d.key = ?",
        [str(pool.table_path(STAGE, 0)), str(pool.table_path("download", 0)), victim],
    ).fetchone()
    assert row[0] is None and row[1] is None and row[2].startswith("cannot decode image")
    assert row[3] is not None  # the caption still has its text embedding


def test_missing_checkpoint_and_hub_tags_fail_fast_with_instructions(tmp_path):
    with pytest.raises(
        EmbedError, match=r"not found: expected open_clip weights for ViT-B-32 .*huggingface-cli download"
    ):
        ClipEmbedder(embed_cfg(tmp_path / "nope.safetensors", model="ViT-B-32")).setup()
    with pytest.raises(
        EmbedError, match=r"'laion2b_s34b_b79k' looks like a hub tag; clipcurate never downloads weights"
    ):
        ClipEmbedder(embed_cfg("laion2b_s34b_b79k", model="ViT-B-32")).setup()


def test_a_checkpoint_of_another_architecture_is_refused(tiny_checkpoint):
    with pytest.raises(EmbedError, match="does not fit ViT-B-32"):
        ClipEmbedder(embed_cfg(tiny_checkpoint, model="ViT-B-32")).setup()


PARAPHRASES = [  # real demo captions (data/laion_10k.parquet) and paraphrases written for this test
    (3, "Passport holder wallet for travel with a colourful map of the world printed on it"),
    (8, "A grey coffee table whose top is a tray"),
    (13, "Pressure meter photographed with a blurry background"),
    (89, "Stretch denim jeans from the Hugo Boss brand"),
    (233, "A napkin ring with a red chrysanthemum"),
    (377, "Black printer ink cartridge made by Dataproducts"),
    (610, "A designer house available to rent in The Villages, Florida"),
    (144, "Hair clips shaped like butterflies for little girls"),
]


@pytest.mark.slow
def test_minilm_scores_paraphrases_above_unrelated_captions():
    from pipeline.embed import CaptionEncoder

    captions = pq.read_table(LAION, columns=["TEXT"])["TEXT"].to_pylist()
    originals = [captions[i] for i, _ in PARAPHRASES]
    encoder = CaptionEncoder("minilm")
    a = encoder.encode(originals, np.zeros(0))
    b = encoder.encode([p for _, p in PARAPHRASES], np.zeros(0))
    assert a.shape == (8, 384) and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-4)
    sim = a @ b.T
    for i in range(len(PARAPHRASES)):
        unrelated = np.delete(sim[i], i)
        assert sim[i, i] > unrelated.max() + 0.1, (originals[i], sim[i, i], unrelated.max())


def _config(**sections):  # type: ignore[no-untyped-def]
    from pipeline.config import parse_config

    embed = {"model": "clipcurate-tiny", "checkpoint": "w.safetensors", "caption_model": "minilm",
             **sections.pop("embed", {})}  # fmt: skip
    return parse_config({"pool": "p", "download": {"input": "u"}, "embed": embed, **sections})


def test_the_text_tower_is_asked_for_only_by_what_reads_its_output():
    from pipeline.config import ConfigError, text_uses

    assert text_uses(_config(filters={"recipe": "basic"})) == []
    assert text_uses(_config(filters={"recipe": "clip_score"})) == ["filters.recipe clip_score (clip_score)"]
    assert text_uses(_config(filters={"recipe": "laion2b"})) == ["filters.recipe laion2b (clip_score(threshold=0.28))"]
    # a published score (DataComp's metadata) or a further scorer's: not this model's text tower
    mine = {"recipes": {"mine": ["clip_score(column=clip_l14_similarity_score, threshold=0.3)"]}, "recipe": "mine"}
    assert text_uses(_config(filters=mine)) == []
    assert text_uses(_config(embed={"caption_model": "clip"})) == ["embed.caption_model: clip"]
    assert text_uses(_config(export={"out": "r", "where": "keep and clip_score > 0.2"})) == ["export.where"]
    assert text_uses(_config(export={"out": "r", "where": "keep and clip_score_b16 > 0.2"})) == []
    assert text_uses(_config(queries={"top": "select uid from samples order by clip_score"})) == ["queries.top"]
    assert text_uses(_config(export={"out": "r", "embeddings": True})) == ["export.embeddings"]
    with pytest.raises(ConfigError, match=r"embed\.text: off, but filters\.recipe clip_score \(clip_score\) reads"):
        _config(embed={"text": "off"}, filters={"recipe": "clip_score"})
    with pytest.raises(ConfigError, match=r"embed\.text: off leaves no text embeddings for caption_model: clip"):
        _config(embed={"text": "off", "caption_model": "clip"})


def test_without_the_text_tower_the_image_embeddings_are_the_same_and_the_text_columns_null(
    embedded, downloaded_pool, tiny_checkpoint, tmp_path
):
    pool, _ = embedded
    alone = Pool(shutil.copytree(downloaded_pool[0].root, tmp_path / "alone"))
    cfg = embed_cfg(tiny_checkpoint, caption_model=None)
    counts = run_embed(alone, cfg, LocalEngine(1), progress=False, text_needed=False)
    assert sum(c["embedded"] for c in counts.values()) > 0
    both, image_only = pool.read_table(STAGE), alone.read_table(STAGE)
    assert image_only["uid"].to_pylist() == both["uid"].to_pylist()
    assert image_only["image_embedding"].equals(both["image_embedding"])
    assert image_only["decode_error"].equals(both["decode_error"])
    assert image_only["text_embedding"].null_count == image_only.num_rows
    assert image_only["clip_score"].null_count == image_only.num_rows
    assert alone.stage_config(STAGE)["config"]["text"] is False
    # the same config asked to run the text tower on that pool: refused by name, not mixed
    with pytest.raises(UserError, match="text: False -> None"):
        run_embed(alone, cfg, LocalEngine(1), progress=False, text_needed=True)


def test_a_pool_embedded_with_the_text_tower_keeps_it_under_auto(embedded, tiny_checkpoint):
    from pipeline.embed.stage import runs_text

    pool, _ = embedded  # made with the text tower, so its record has no `text`
    assert runs_text(pool, embed_cfg(tiny_checkpoint, caption_model=None), needed=False)
    assert not runs_text(pool, embed_cfg(tiny_checkpoint, caption_model=None, text="off"), needed=False)


def test_bf16_and_decoding_workers_give_the_fp32_inline_embeddings(embedded, downloaded_pool, tiny_checkpoint,
                                                                   tmp_path):  # fmt: skip
    """Each speed option against the stage's fp32, inline-decoded vectors: bf16 (open_clip's mixed
    precision, the pixels cast to the convolution's dtype) within cosine 0.99; decoding workers exactly."""
    pool, _ = embedded
    reference = {t: _stored(pool, f"{t}_embedding").astype(np.float32) for t in ("image", "text")}
    valid = pool.read_table(STAGE)["decode_error"].is_null().to_numpy(zero_copy_only=False)
    for name, options in (("bf16", {"precision": "bf16"}), ("inline", {"workers": 0})):
        other = Pool(shutil.copytree(downloaded_pool[0].root, tmp_path / name))
        run_embed(other, embed_cfg(tiny_checkpoint, caption_model=None, **options), LocalEngine(1), progress=False)
        assert other.read_table(STAGE)["uid"].equals(pool.read_table(STAGE)["uid"])
        for tower, ref in reference.items():
            got = _stored(other, f"{tower}_embedding").astype(np.float32)
            rows = valid if tower == "image" else np.ones(len(ref), bool)
            a, b = got[rows], ref[rows]
            cosine = (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            if name == "bf16":
                assert cosine.min() > 0.99 and not np.array_equal(got, ref), tower  # bf16 ran, and agrees
            else:
                assert np.array_equal(got, ref), tower


def test_one_process_per_device_gives_the_same_tables_and_cuda_falls_back_to_the_cpu(
    embedded, downloaded_pool, tiny_checkpoint, tmp_path, caplog
):
    """embed.devices on a machine without CUDA: two device processes, each its own model, both on
    the CPU (said once), sharing the shards; the tables equal the one-process run's."""
    import torch

    from pipeline.core.runner import share_out

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the fallback to the CPU is not taken")
    pool, _ = embedded
    assert share_out({0: 10, 1: 30, 2: 20, 3: 10}, 2) == [[1, 3], [0, 2]]  # 40 samples each
    spread = Pool(shutil.copytree(downloaded_pool[0].root, tmp_path / "spread"))
    cfg = embed_cfg(tiny_checkpoint, devices=["cuda:0", "cuda:1"])
    done = run_embed(spread, cfg, LocalEngine(1), progress=False)
    assert sorted(done) == sorted(pool.completed(STAGE))
    for stage in (STAGE, CAPTION_STAGE):
        for shard in sorted(pool.completed(stage)):
            ours, theirs = pq.read_table(spread.table_path(stage, shard)), pq.read_table(pool.table_path(stage, shard))
            assert ours.equals(theirs), (stage, shard)
    from pipeline.embed.captions import resolve_device

    caplog.clear()
    with caplog.at_level("WARNING"):
        assert resolve_device("cuda:7") == resolve_device("cuda:7") == "cpu"
    assert [r.getMessage() for r in caplog.records if "cuda:7" in r.getMessage()] == [
        "embed device cuda:7: no CUDA device here (torch.cuda.is_available() is False); on the CPU"]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="no CUDA device on this machine: the GPU branch is not run")
def test_on_a_gpu_the_stage_gives_the_cpu_vectors_in_fp16(embedded, downloaded_pool, tiny_checkpoint, tmp_path):
    """The GPU branch: `auto` precision (fp16), pinned batches copied without blocking, decoding
    workers; the vectors agree with the CPU's fp32 ones within cosine 0.99."""
    pool, _ = embedded
    gpu = Pool(shutil.copytree(downloaded_pool[0].root, tmp_path / "gpu"))
    run_embed(gpu, embed_cfg(tiny_checkpoint, device="cuda", workers=2), LocalEngine(1), progress=False)
    valid = pool.read_table(STAGE)["decode_error"].is_null().to_numpy(zero_copy_only=False)
    for tower in ("image", "text"):
        a = _stored(gpu, f"{tower}_embedding").astype(np.float32)
        b = _stored(pool, f"{tower}_embedding").astype(np.float32)
        rows = valid if tower == "image" else np.ones(len(a), bool)
        cosine = (a[rows] * b[rows]).sum(axis=1) / np.linalg.norm(a[rows], axis=1) / np.linalg.norm(b[rows], axis=1)
        assert cosine.min() > 0.99, tower


def test_curate_embed_runs_the_text_tower_only_when_the_config_reads_it(downloaded_pool, tiny_checkpoint, tmp_path,
                                                                        capsys):  # fmt: skip
    import yaml

    from pipeline.cli import main

    pool = Pool(shutil.copytree(downloaded_pool[0].root, tmp_path / "pool"))
    embed = {"model": "clipcurate-tiny", "checkpoint": str(tiny_checkpoint), "caption_model": None}
    config = {"pool": str(pool.root), "download": {"input": "unused.parquet"}, "filters": {"recipe": "basic"},
              "embed": embed}  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["embed", str(path)]) == 0
    table = pool.read_table(STAGE)
    assert table["clip_score"].null_count == table["text_embedding"].null_count == table.num_rows
    assert table["image_embedding"].null_count < table.num_rows
    # the recipe now reads the computed clip_score: the image-only shards are named, not mixed
    path.write_text(yaml.safe_dump({**config, "filters": {"recipe": "clip_score"}}))
    assert main(["embed", str(path)]) != 0
    assert "another config (text: False -> None)" in capsys.readouterr().err
