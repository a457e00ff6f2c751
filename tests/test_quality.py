"""LAION's scoring heads (aesthetic v1 and v2, the NSFW detectors) loaded from weights saved in each
published layout with seeded random values, checked against a numpy forward written here from the
published architectures (not the code under test), and the quality step on an embedded pool."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from pipeline.config import HeadConfig, QualityConfig
from pipeline.engines.local import LocalEngine
from pipeline.quality.heads import HeadError, load_head
from tests.conftest import copy_pool

# The published modules, as their repositories define them (Linear widths; the order of the layers).


def _linear(dim: int, out: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"weight": rng.normal(0, 1 / np.sqrt(dim), (out, dim)).astype(np.float32),
            "bias": rng.normal(0, 0.1, out).astype(np.float32)}  # fmt: skip


def published(layout: str, dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A state dict in ``layout``'s keys, random values."""
    rng = np.random.default_rng(seed)
    if layout == "aesthetic-linear":  # LAION-AI/aesthetic-predictor: nn.Linear(dim, 1)
        return _linear(dim, 1, rng)
    if layout in ("aesthetic-mlp", "aesthetic-mlp-relu"):  # improved-aesthetic-predictor's MLP
        at = (0, 2, 4, 6, 7) if layout == "aesthetic-mlp" else (0, 3, 6, 9, 11)
        widths = (dim, 1024, 128, 64, 16, 1)
    elif layout == "nsfw-autokeras":  # the PyTorch port of CLIP-based-NSFW-Detector
        state = {"norm.mean": rng.normal(0, 0.05, dim).astype(np.float32),
                 "norm.variance": rng.uniform(0.5, 2.0, dim).astype(np.float32)}  # fmt: skip
        for i, (a, b) in enumerate(zip((dim, 64, 512, 256), (64, 512, 256, 1), strict=True), start=1):
            state.update({f"linear_{i}.{k}": v for k, v in _linear(a, b, rng).items()})
        return state
    else:  # h14_nsfw_model.py
        at = (0, 3, 6, 9, 12, 15, 16)
        widths = (dim, 1024, 2048, 1024, 256, 128, 16, 1)
    state = {}
    for i, index in enumerate(at):
        state.update({f"layers.{index}.{k}": v for k, v in _linear(widths[i], widths[i + 1], rng).items()})
    return state


def reference(layout: str, state: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The published forward in float64 on the L2-normalised input."""
    x = np.asarray(x, np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)

    def lin(prefix: str, h: np.ndarray) -> np.ndarray:
        return h @ state[f"{prefix}weight"].astype(np.float64).T + state[f"{prefix}bias"]

    relu = lambda h: np.maximum(h, 0)  # noqa: E731
    if layout == "aesthetic-linear":
        return lin("", x)[:, 0]
    if layout == "aesthetic-mlp":  # Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear
        h = x
        for i in (0, 2, 4, 6, 7):
            h = lin(f"layers.{i}.", h)
        return h[:, 0]
    if layout == "aesthetic-mlp-relu":  # Linear, ReLU, Dropout (x3), Linear, ReLU, Linear
        h = x
        for i in (0, 3, 6, 9):
            h = relu(lin(f"layers.{i}.", h))
        return lin("layers.11.", h)[:, 0]
    if layout == "nsfw-autokeras":  # norm, 3 x (Linear, ReLU), Linear, Sigmoid
        h = (x - state["norm.mean"]) / np.sqrt(state["norm.variance"].astype(np.float64))
        for i in (1, 2, 3):
            h = relu(lin(f"linear_{i}.", h))
        return (1 / (1 + np.exp(-lin("linear_4.", h))))[:, 0]
    h = x  # nsfw-h14: 5 x (Linear, ReLU, Dropout), Linear, Linear
    for i in (0, 3, 6, 9, 12):
        h = relu(lin(f"layers.{i}.", h))
    return lin("layers.16.", lin("layers.15.", h))[:, 0]


def save(state: dict[str, np.ndarray], path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(state, str(path))
    else:
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, str(path))
    return path


LAYOUTS = [("aesthetic", "aesthetic-linear", 768), ("aesthetic", "aesthetic-linear", 512),
           ("aesthetic", "aesthetic-mlp", 768), ("aesthetic", "aesthetic-mlp-relu", 768),
           ("nsfw", "nsfw-autokeras", 768), ("nsfw", "nsfw-autokeras", 512), ("nsfw", "nsfw-h14", 1024)]  # fmt: skip


@pytest.mark.parametrize(("kind", "layout", "dim"), LAYOUTS)
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_each_published_layout_scores_as_its_architecture(tmp_path, kind, layout, dim, suffix):
    state = published(layout, dim)
    path = save(state, tmp_path / f"head{suffix}")
    x = np.random.default_rng(1).normal(size=(300, dim)).astype(np.float32)
    head = load_head(path, kind)  # the layout found from the keys
    assert head.layout.name == layout and head.dim == dim
    np.testing.assert_allclose(head(x), reference(layout, state, x), rtol=1e-5, atol=1e-5)
    assert load_head(path, kind, layout).layout.name == layout


def test_unnormalised_embeddings_score_as_normalised_ones(tmp_path):
    state = published("aesthetic-mlp", 768)
    head = load_head(save(state, tmp_path / "h.safetensors"), "aesthetic")
    x = np.random.default_rng(2).normal(size=(50, 768)).astype(np.float32)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    scaled = x * np.random.default_rng(3).uniform(0.1, 40, (50, 1)).astype(np.float32)
    np.testing.assert_allclose(head(scaled), head(unit), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(head(x), reference("aesthetic-mlp", state, x), rtol=1e-5, atol=1e-5)


def test_wrong_keys_shapes_and_width_are_refused_naming_the_file(tmp_path):
    state = published("aesthetic-mlp", 768)
    renamed = {k.replace("layers.7", "layers.8"): v for k, v in state.items()}
    path = save(renamed, tmp_path / "renamed.safetensors")
    with pytest.raises(HeadError, match=r"renamed\.safetensors: its keys .* match no aesthetic layout"):
        load_head(path, "aesthetic")
    with pytest.raises(HeadError, match=r"renamed\.safetensors: not the aesthetic-mlp layout: missing keys "
                                        r"\['layers\.7\.bias', 'layers\.7\.weight'\]"):  # fmt: skip
        load_head(path, "aesthetic", "aesthetic-mlp")
    narrow = {**state, "layers.2.weight": np.zeros((64, 1024), np.float32)}
    path = save(narrow, tmp_path / "narrow.pth")
    with pytest.raises(HeadError, match=r"narrow\.pth: layers\.2\.weight has shape \(64, 1024\), the aesthetic-mlp "
                                        r"layout needs \(128, 1024\)"):  # fmt: skip
        load_head(path, "aesthetic")
    path = save(state, tmp_path / "l14.safetensors")
    with pytest.raises(HeadError, match=r"l14\.safetensors: the head takes 768-d image embeddings, but the pool's "
                                        r"are 512-d"):  # fmt: skip
        load_head(path, "aesthetic", dim=512)
    with pytest.raises(HeadError, match=r"l14\.safetensors: layout 'nsfw-h14' is not a aesthetic layout"):
        load_head(path, "aesthetic", "nsfw-h14")
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(HeadError, match=r"junk\.pth: not a readable weights file"):
        load_head(tmp_path / "junk.pth", "nsfw")
    with pytest.raises(HeadError, match=r"missing\.pth: no such weights file"):
        load_head(tmp_path / "missing.pth", "nsfw")


def _heads(tmp_path: Path, dim: int) -> QualityConfig:
    aesthetic = save(published("aesthetic-mlp-relu", dim, seed=4), tmp_path / "aesthetic.pth")
    nsfw = save(published("nsfw-autokeras", dim, seed=5), tmp_path / "nsfw.safetensors")
    return QualityConfig(aesthetic=HeadConfig(weights=str(aesthetic)), nsfw=HeadConfig(weights=str(nsfw)))


def test_the_quality_step_scores_every_embedded_sample(clustered, tmp_path):
    from pipeline.quality.stage import run_quality
    from pipeline.store import schema as S

    pool = copy_pool(clustered[0], tmp_path / "pool")
    embedded = pool.read_table("embed", columns=[S.UID, S.IMAGE_EMBEDDING])
    dim = embedded.schema.field(S.IMAGE_EMBEDDING).type.list_size
    cfg = _heads(tmp_path, dim)
    done = run_quality(pool, cfg, LocalEngine(2), progress=False)
    assert sorted(done) == sorted(pool.completed("embed")) and len(done) >= 2
    scored = pool.read_table("quality").sort_by(S.UID)
    embedded = embedded.sort_by(S.UID)
    assert scored[S.UID].equals(embedded[S.UID])
    valid = embedded[S.IMAGE_EMBEDDING].is_valid().to_numpy(zero_copy_only=False)
    assert valid.sum() > 250
    vectors = S.vectors(embedded[S.IMAGE_EMBEDDING].combine_chunks())[valid].astype(np.float32)
    for column, layout, path in ((S.AESTHETIC, "aesthetic-mlp-relu", cfg.aesthetic.weights),
                                 (S.NSFW, "nsfw-autokeras", cfg.nsfw.weights)):  # fmt: skip
        state = {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()} if path.endswith(".pth") else (
            __import__("safetensors.numpy", fromlist=["load_file"]).load_file(path))  # fmt: skip
        got = scored[column].to_numpy(zero_copy_only=False)
        np.testing.assert_allclose(got[valid].astype(np.float64), reference(layout, state, vectors), rtol=1e-5,
                                   atol=1e-5)  # fmt: skip
        assert scored[column].null_count == int((~valid).sum())  # no embedding, no score
    assert run_quality(pool, cfg, LocalEngine(2), progress=False) == {}  # finished: nothing redone


def test_a_head_for_another_model_is_one_line_before_any_task(clustered, tmp_path):
    from pipeline.quality.stage import run_quality

    pool = copy_pool(clustered[0], tmp_path / "pool")
    path = save(published("aesthetic-linear", 768), tmp_path / "sa_0_4_vit_l_14_linear.pth")
    cfg = QualityConfig(aesthetic=HeadConfig(weights=str(path)))
    with pytest.raises(HeadError, match=r"sa_0_4_vit_l_14_linear\.pth: the head takes 768-d image embeddings, but "
                                        r"the pool's are 128-d"):  # fmt: skip
        run_quality(pool, cfg, LocalEngine(2), progress=False)
    assert not pool.completed("quality")


def test_aesthetic_and_nsfw_rules_explain_every_drop(clustered, tmp_path):
    from pipeline.config import FilterConfig
    from pipeline.filters.decisions import run_decisions
    from pipeline.quality.stage import run_quality
    from pipeline.store import schema as S

    pool = copy_pool(clustered[0], tmp_path / "pool")
    dim = pool.table_schema("embed").field(S.IMAGE_EMBEDDING).type.list_size
    engine = LocalEngine(2)
    run_quality(pool, _heads(tmp_path, dim), engine, progress=False)
    scores = pool.read_table("quality")
    aesthetic_min = float(np.nanmedian(scores[S.AESTHETIC].to_numpy(zero_copy_only=False).astype(float)))
    nsfw_max = float(np.nanquantile(scores[S.NSFW].to_numpy(zero_copy_only=False).astype(float), 0.8))
    recipe = [f"aesthetic(min={aesthetic_min!r})", f"nsfw(max={nsfw_max!r})"]
    summary = run_decisions(pool, FilterConfig(recipe="q", recipes={"q": recipe}), engine, progress=False)
    table = pool.read_table("decisions").join(scores.select([S.UID, S.AESTHETIC, S.NSFW]), S.UID).sort_by(S.UID)
    aesthetic = table[S.AESTHETIC].to_numpy(zero_copy_only=False).astype(float)
    nsfw = table[S.NSFW].to_numpy(zero_copy_only=False).astype(float)
    reason = table[S.DROP_REASON].to_pylist()
    keep = table[S.KEEP].to_numpy(zero_copy_only=False)
    scored = ~np.isnan(aesthetic)
    assert (keep == (scored & (aesthetic > aesthetic_min) & (nsfw <= nsfw_max))).all()
    assert all(r == "aesthetic" for r, a in zip(reason, aesthetic, strict=True) if a == a and a <= aesthetic_min)
    dropped_nsfw = [r for r, a, n in zip(reason, aesthetic, nsfw, strict=True) if a > aesthetic_min and n > nsfw_max]
    assert dropped_nsfw and set(dropped_nsfw) == {"nsfw"}
    assert summary["drop_reasons"]["aesthetic"] > 0 and summary["drop_reasons"]["nsfw"] == len(dropped_nsfw)
    assert int(pc.sum(table[S.KEEP]).as_py()) == summary["kept"] > 0
    from pipeline.report import write_report

    page = write_report(pool, thumbnails=0)  # a histogram per score, all and kept
    html = page.read_text()
    for name, title in (("aesthetic", "Aesthetic score"), ("nsfw", "NSFW probability"), ("clip_score", "CLIP score")):
        assert f"<h2>{title}</h2><img class='plot' src='{name}.png'" in html
        assert (page.parent / f"{name}.png").stat().st_size > 5000


def test_published_scores_carried_in_at_download_feed_the_same_rules(tmp_path, image_server):
    """LAION's released ``AESTHETIC_SCORE`` and ``punsafe`` columns, carried into the download table,
    decide as the computed scores would (``column=``), with no quality stage."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import FilterConfig
    from pipeline.download import run_download
    from pipeline.filters.decisions import run_decisions
    from pipeline.store import schema as S
    from pipeline.store.parquet import Pool
    from tests.conftest import laion_rows, make_config, point_at

    rows = point_at(laion_rows(150, offset=3000), image_server)
    rng = np.random.default_rng(7)
    aesthetic = np.round(rng.uniform(3, 8, rows.num_rows), 3)
    punsafe = np.round(rng.uniform(0, 1, rows.num_rows), 3)
    rows = rows.append_column("AESTHETIC_SCORE", pa.array(aesthetic)).append_column("punsafe", pa.array(punsafe))
    pq.write_table(rows, tmp_path / "u.parquet")
    cfg = make_config(tmp_path / "pool", tmp_path / "u.parquet", extra_cols=["AESTHETIC_SCORE", "punsafe"])
    pool = Pool(cfg.pool)
    run_download(pool, cfg.download, LocalEngine(2), progress=False)
    recipe = ["aesthetic(min=5.5, column=AESTHETIC_SCORE)", "nsfw(max=0.4, column=punsafe)"]
    summary = run_decisions(pool, FilterConfig(recipe="q", recipes={"q": recipe}), LocalEngine(2), progress=False)
    table = pool.read_table("decisions").join(pool.read_table("download").select(["uid", "url", S.STATUS]), "uid")
    by_url = dict(zip(rows["url"].to_pylist(), zip(aesthetic, punsafe, strict=True), strict=True))
    ok = np.array([s == S.STATUS_SUCCESS for s in table[S.STATUS].to_pylist()])
    a, n = (np.array([by_url[u][i] for u in table["url"].to_pylist()]) for i in (0, 1))
    assert (table[S.KEEP].to_numpy(zero_copy_only=False) == (ok & (a > 5.5) & (n <= 0.4))).all()
    reasons = table[S.DROP_REASON].to_pylist()
    assert {r for r, o, x in zip(reasons, ok, a, strict=True) if o and x <= 5.5} == {"aesthetic"}
    assert summary["drop_reasons"]["nsfw"] == sum(o and x > 5.5 and y > 0.4 for o, x, y in zip(ok, a, n, strict=True))
    assert not pool.completed("quality")
    with pytest.raises(Exception, match=r"rule aesthetic\(column=aesthetic_score\) reads the download column "
                                        r"'aesthetic_score', which the pool has not got"):  # fmt: skip
        run_decisions(pool, FilterConfig(recipe="q", recipes={"q": ["aesthetic(column=aesthetic_score)"]}),
                      LocalEngine(2), progress=False)  # fmt: skip
    with pytest.raises(Exception, match=r"rule aesthetic\(min=8\.0\) reads the quality stage's scores"):
        run_decisions(pool, FilterConfig(recipe="laion_art"), LocalEngine(2), progress=False)


def test_a_further_scorer_scores_each_pair_in_the_same_decode_pass(downloaded_pool, tiny_checkpoint, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    """``embed.scorers``: a second open_clip model (another random-weight file) scores every pair
    from the same decoded image; its ``clip_score_<name>`` is the score that model gives alone, the
    pool model's columns are unchanged, each image is decoded once, and ``clip_score(score=)`` decides."""
    import dataclasses

    from pipeline.config import FilterConfig, ScorerConfig
    from pipeline.embed import run_embed, save_random_checkpoint
    from pipeline.filters.decisions import run_decisions
    from pipeline.store import images
    from pipeline.store import schema as S
    from tests.conftest import embed_cfg

    second = save_random_checkpoint("clipcurate-tiny", tmp_path / "second.safetensors", seed=1)
    plain, alone = embed_cfg(tiny_checkpoint, workers=0), embed_cfg(second, workers=0)
    scored = dataclasses.replace(plain, scorers=(ScorerConfig(name="dfn", model="clipcurate-tiny",
                                                              checkpoint=str(second)),))  # fmt: skip
    pools = {name: copy_pool(downloaded_pool[0], tmp_path / name) for name in ("scored", "plain", "alone")}
    decodes = []
    real = images.decode_image
    monkeypatch.setattr(images, "decode_image", lambda *a, **k: (decodes.append(1), real(*a, **k))[1])
    run_embed(pools["scored"], scored, LocalEngine(1), progress=False)
    with_scorer = pools["scored"].read_table("embed").sort_by(S.UID)
    assert len(decodes) == with_scorer.num_rows > 250  # once per image, for both models
    for name, cfg in (("plain", plain), ("alone", alone)):
        run_embed(pools[name], cfg, LocalEngine(1), progress=False)
    plain_t, alone_t = (pools[n].read_table("embed").sort_by(S.UID) for n in ("plain", "alone"))
    assert with_scorer.schema.names == [*plain_t.schema.names, "clip_score_dfn"]
    for column in plain_t.column_names:  # the pool model's columns: as without the scorer
        assert with_scorer[column].equals(plain_t[column]), column
    dfn = with_scorer["clip_score_dfn"].to_numpy(zero_copy_only=False).astype(float)
    np.testing.assert_allclose(dfn, alone_t[S.CLIP_SCORE].to_numpy(zero_copy_only=False).astype(float), atol=1e-6)
    assert not np.allclose(dfn, with_scorer[S.CLIP_SCORE].to_numpy(zero_copy_only=False).astype(float))
    threshold = float(np.nanmedian(dfn))
    recipe = FilterConfig(recipe="q", recipes={"q": [f"clip_score(score=dfn, threshold={threshold!r})"]})
    run_decisions(pools["scored"], recipe, LocalEngine(2), progress=False)
    decided = pools["scored"].read_table("decisions").join(with_scorer.select([S.UID, "clip_score_dfn"]), S.UID)
    keep = decided[S.KEEP].to_numpy(zero_copy_only=False)
    assert (keep == (decided["clip_score_dfn"].to_numpy(zero_copy_only=False).astype(float) >= threshold)).all()
    assert 0 < keep.sum() < len(keep)
    with pytest.raises(Exception, match=r"the embed table has no scorer 'nope' \(it has \['dfn'\]\)"):
        run_decisions(pools["scored"], FilterConfig(recipe="q", recipes={"q": ["clip_score(score=nope)"]}),
                      LocalEngine(2), progress=False)  # fmt: skip
