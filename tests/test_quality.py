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
    pwatermark = np.round(rng.uniform(0, 1, rows.num_rows), 3)
    rows = rows.append_column("AESTHETIC_SCORE", pa.array(aesthetic)).append_column("punsafe", pa.array(punsafe))
    rows = rows.append_column("pwatermark", pa.array(pwatermark))
    pq.write_table(rows, tmp_path / "u.parquet")
    cfg = make_config(tmp_path / "pool", tmp_path / "u.parquet",
                      extra_cols=["AESTHETIC_SCORE", "punsafe", "pwatermark"])  # fmt: skip
    pool = Pool(cfg.pool)
    run_download(pool, cfg.download, LocalEngine(2), progress=False)
    recipe = ["aesthetic(min=5.5, column=AESTHETIC_SCORE)", "nsfw(max=0.4, column=punsafe)",
              "watermark(max=0.7, column=pwatermark)"]  # fmt: skip
    summary = run_decisions(pool, FilterConfig(recipe="q", recipes={"q": recipe}), LocalEngine(2), progress=False)
    table = pool.read_table("decisions").join(pool.read_table("download").select(["uid", "url", S.STATUS]), "uid")
    by_url = dict(zip(rows["url"].to_pylist(), zip(aesthetic, punsafe, pwatermark, strict=True), strict=True))
    ok = np.array([s == S.STATUS_SUCCESS for s in table[S.STATUS].to_pylist()])
    a, n, w = (np.array([by_url[u][i] for u in table["url"].to_pylist()]) for i in (0, 1, 2))
    assert (table[S.KEEP].to_numpy(zero_copy_only=False) == (ok & (a > 5.5) & (n <= 0.4) & (w < 0.7))).all()
    reasons = table[S.DROP_REASON].to_pylist()
    assert {r for r, o, x in zip(reasons, ok, a, strict=True) if o and x <= 5.5} == {"aesthetic"}
    assert summary["drop_reasons"]["nsfw"] == sum(o and x > 5.5 and y > 0.4 for o, x, y in zip(ok, a, n, strict=True))
    assert summary["drop_reasons"]["watermark"] == int((ok & (a > 5.5) & (n <= 0.4) & (w >= 0.7)).sum()) > 0
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


# LAION-5B's watermark detector as LAION-AI/LAION-5B-WatermarkDetection builds it (inference.py): a timm
# EfficientNet with two classes whose classifier is replaced, its preprocessing, and P(watermark) = softmax[:, 0].
# Written here from the published code, not imported from the code under test; the smallest timm EfficientNet
# (``test_efficientnet``, 0.1M parameters) stands in for efficientnet_b3a, the head on its own width.
def laion_watermark(arch: str = "test_efficientnet", seed: int = 0) -> torch.nn.Module:
    import timm
    from torch import nn

    torch.manual_seed(seed)
    net = timm.create_model(arch, pretrained=False, num_classes=2)
    net.classifier = nn.Sequential(nn.Linear(net.num_features, 625), nn.ReLU(), nn.Dropout(p=0.3),
                                   nn.Linear(625, 256), nn.ReLU(), nn.Linear(256, 2))  # fmt: skip
    for module in net.modules():  # running statistics unlike a fresh BatchNorm's: a loader skipping buffers differs
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    net.eval()
    # A random backbone pools nearly the same features from any image, so P(watermark) would be one value to
    # 1e-5: centre and scale the first Linear on a few images' features (still random, now telling images apart).
    rng = np.random.default_rng(seed)
    probe = torch.from_numpy(rng.uniform(-2, 2, (8, 3, 64, 64)).astype(np.float32))
    probe[4:] = probe[4:].mean(dim=(2, 3), keepdim=True)  # flat colours beside noise
    with torch.no_grad():
        features = net.forward_head(net.forward_features(probe), pre_logits=True)
        first = net.classifier[0]
        first.weight.div_(features.std(dim=0).clamp_min(1e-6))
        first.bias.copy_(-(first.weight @ features.mean(dim=0)))
    return net


def laion_watermark_scores(net: torch.nn.Module, images: list) -> np.ndarray:
    from torchvision import transforms as T

    preprocessing = T.Compose([T.Resize((256, 256)), T.ToTensor(),
                               T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])  # fmt: skip
    with torch.no_grad():
        return torch.nn.functional.softmax(net(torch.stack([preprocessing(im) for im in images])), dim=1)[:, 0].numpy()


def save_watermark(path: Path, arch: str = "test_efficientnet", seed: int = 0) -> tuple[Path, torch.nn.Module]:
    net = laion_watermark(arch, seed)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    else:
        torch.save(net.state_dict(), str(path))
    return path, net


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_the_watermark_detector_scores_as_laions_model(tmp_path, suffix):
    from PIL import Image

    from pipeline.config import WatermarkConfig
    from pipeline.quality.watermark import WatermarkDetector

    path, net = save_watermark(tmp_path / f"watermark_model_v1{suffix}")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
              for h, w in ((300, 200), (64, 640), (256, 256), (517, 333))]  # fmt: skip
    detector = WatermarkDetector(WatermarkConfig(weights=str(path), model="test_efficientnet")).setup()
    got = detector.score(torch.stack([detector.preprocess(im) for im in images]))
    want = laion_watermark_scores(net, images)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert ((got > 0) & (got < 1)).all() and np.ptp(got) > 1e-4  # a probability, and the images differ


def test_a_wrong_watermark_file_is_one_line_naming_it(tmp_path):
    from pipeline.config import WatermarkConfig
    from pipeline.quality.watermark import WatermarkError, check_detector

    def check(path: Path, model: str = "test_efficientnet") -> None:
        check_detector(WatermarkConfig(weights=str(path), model=model))

    path, net = save_watermark(tmp_path / "w.pt")
    check(path)  # the right file passes
    renamed = {k.replace("classifier.5", "classifier.6"): v for k, v in net.state_dict().items()}
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(WatermarkError, match=r"renamed\.pt: not LAION's watermark detector on test_efficientnet: "
                                             r"missing keys \['classifier\.5\.bias', 'classifier\.5\.weight'\], "
                                             r"unexpected keys \['classifier\.6\.bias', 'classifier\.6\.weight'\]"):
        check(tmp_path / "renamed.pt")
    wide = {**net.state_dict(), "classifier.0.weight": torch.zeros(625, 1536)}  # a B3 head on another backbone
    torch.save(wide, tmp_path / "wide.pt")
    with pytest.raises(WatermarkError, match=r"wide\.pt: classifier\.0\.weight has shape \(625, 1536\), "
                                             r"test_efficientnet with LAION's head needs \(625, 256\)"):
        check(tmp_path / "wide.pt")
    with pytest.raises(WatermarkError, match=r"w\.pt: not LAION's watermark detector on efficientnet_b3a"):
        check(path, "efficientnet_b3a")  # weights of another architecture
    (tmp_path / "junk.pt").write_bytes(b"not a state dict")
    with pytest.raises(WatermarkError, match=r"junk\.pt: not a readable weights file"):
        check(tmp_path / "junk.pt")
    with pytest.raises(WatermarkError, match=r"embed\.watermark\.weights: .*missing\.pt not found"):
        check(tmp_path / "missing.pt")
    with pytest.raises(WatermarkError, match=r"embed\.watermark\.model: .*no_such_net"):
        check(path, "no_such_net")


def _tar_images(pool) -> dict[str, object]:
    """Every image of the pool's tars by uid, decoded here with PIL (not the pipeline's reader)."""
    import io
    import json
    import tarfile

    from PIL import Image

    found: dict[str, object] = {}
    for shard in pool.completed("download"):
        with tarfile.open(pool.shard_tar(shard)) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for m in tar.getmembers():
                key, _, ext = m.name.rpartition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for parts in members.values():
            if "jpg" in parts:
                uid = json.loads(parts["json"])["uid"]
                found[uid] = Image.open(io.BytesIO(parts["jpg"])).convert("RGB")
    return found


def test_the_watermark_and_a_further_scorer_share_one_decode_and_feed_the_rules(
    downloaded_pool, tiny_checkpoint, tmp_path, monkeypatch
):
    """``embed.watermark`` with ``embed.scorers``: every image decoded once for three models; the
    watermark column equals LAION's model run here on the tar's images; the watermark rule and
    ``clip_score(score=)`` decide, every drop explained by the first rule a sample fails."""
    import dataclasses

    from pipeline.config import FilterConfig, ScorerConfig, WatermarkConfig
    from pipeline.embed import run_embed, save_random_checkpoint
    from pipeline.filters.decisions import run_decisions
    from pipeline.store import images
    from pipeline.store import schema as S
    from tests.conftest import embed_cfg

    second = save_random_checkpoint("clipcurate-tiny", tmp_path / "second.safetensors", seed=1)
    path, net = save_watermark(tmp_path / "watermark_model_v1.pt")
    cfg = dataclasses.replace(embed_cfg(tiny_checkpoint, workers=0),
                              scorers=(ScorerConfig(name="dfn", model="clipcurate-tiny", checkpoint=str(second)),),
                              watermark=WatermarkConfig(weights=str(path), model="test_efficientnet"))  # fmt: skip
    pool = copy_pool(downloaded_pool[0], tmp_path / "pool", drop=("embed", "caption_embed"))
    decodes = []
    real = images.decode_image
    monkeypatch.setattr(images, "decode_image", lambda *a, **k: (decodes.append(1), real(*a, **k))[1])
    run_embed(pool, cfg, LocalEngine(1), progress=False)
    table = pool.read_table("embed").sort_by(S.UID)
    assert len(decodes) == table.num_rows > 250  # once per image, for the CLIP model, the scorer and the detector
    assert table.schema.names[-2:] == ["clip_score_dfn", S.WATERMARK]
    valid = table[S.DECODE_ERROR].is_null().to_numpy(zero_copy_only=False)
    assert table[S.WATERMARK].null_count == int((~valid).sum())
    pictures = _tar_images(pool)
    uids = [u for u, ok in zip(table[S.UID].to_pylist(), valid, strict=True) if ok]
    want = np.concatenate([laion_watermark_scores(net, [pictures[u] for u in uids[i:i + 64]])
                           for i in range(0, len(uids), 64)])  # fmt: skip
    got = table[S.WATERMARK].to_numpy(zero_copy_only=False)[valid].astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    w_max = float(np.median(got))
    dfn = table["clip_score_dfn"].to_numpy(zero_copy_only=False).astype(float)
    recipe = ["clip_score(score=dfn, fraction=0.7)", f"watermark(max={w_max!r})"]
    summary = run_decisions(pool, FilterConfig(recipe="q", recipes={"q": recipe}), LocalEngine(2), progress=False)
    decided = (pool.read_table("decisions").join(table.select([S.UID, "clip_score_dfn", S.WATERMARK]), S.UID)
               .join(pool.read_table("download").select([S.UID, S.STATUS]), S.UID))  # fmt: skip
    keep = decided[S.KEEP].to_numpy(zero_copy_only=False)
    fetched = [s == S.STATUS_SUCCESS for s in decided[S.STATUS].to_pylist()]
    score = decided["clip_score_dfn"].to_numpy(zero_copy_only=False).astype(float)
    mark = decided[S.WATERMARK].to_numpy(zero_copy_only=False).astype(float)
    threshold = np.sort(dfn[~np.isnan(dfn)])[::-1][int((~np.isnan(dfn)).sum() * 0.7)]  # DataComp's get_threshold
    first = [None if k else "downloaded" if not f else "decode_error" if s != s else
             "clip_score" if s < threshold else "watermark" for k, f, s in zip(keep, fetched, score, strict=True)]
    assert decided[S.DROP_REASON].to_pylist() == first
    assert (keep == (np.array(fetched) & (score >= threshold) & (mark < w_max))).all()
    assert summary["drop_reasons"]["watermark"] > 0 and summary["drop_reasons"]["clip_score"] > 0

    plain = copy_pool(downloaded_pool[0], tmp_path / "plain", drop=("embed", "caption_embed"))
    run_embed(plain, embed_cfg(tiny_checkpoint, workers=0), LocalEngine(1), progress=False)
    with pytest.raises(Exception, match=r"rule watermark reads the watermark detector's scores, which this pool's "
                                        r"embed table has not got; configure embed\.watermark"):  # fmt: skip
        run_decisions(plain, FilterConfig(recipe="q", recipes={"q": ["min_side", "watermark"]}), LocalEngine(2),
                      progress=False)  # fmt: skip


def test_a_wrong_watermark_file_stops_the_embed_stage_before_any_task(downloaded_pool, tiny_checkpoint, tmp_path):
    import dataclasses

    from pipeline.config import WatermarkConfig
    from pipeline.embed import run_embed
    from pipeline.quality.watermark import WatermarkError
    from tests.conftest import embed_cfg

    path, _ = save_watermark(tmp_path / "b0.pt", arch="test_efficientnet_gn")
    cfg = dataclasses.replace(embed_cfg(tiny_checkpoint, workers=0),
                              watermark=WatermarkConfig(weights=str(path), model="test_efficientnet"))  # fmt: skip
    pool = copy_pool(downloaded_pool[0], tmp_path / "pool", drop=("embed", "caption_embed"))
    with pytest.raises(WatermarkError, match=r"b0\.pt: not LAION's watermark detector on test_efficientnet"):
        run_embed(pool, cfg, LocalEngine(1), progress=False)
    assert not pool.completed("embed")
