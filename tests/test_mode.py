"""MoDE clustering on the real demo captions with the real offline text model (all-MiniLM-L6-v2)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import ModeConfig
from pipeline.engines.local import LocalEngine
from pipeline.mode import (
    balanced_assign,
    expert_uids,
    fit_hierarchy,
    gini,
    nearest,
    routing_weights,
    run_mode,
    top_terms,
)
from tests.conftest import LAION
from tests.test_embed import PARAPHRASES


@pytest.fixture(scope="module")
def demo_captions():
    from pipeline.embed import CaptionEncoder

    captions = pq.read_table(LAION, columns=["TEXT"])["TEXT"].to_pylist()
    encoder = CaptionEncoder("minilm")
    return captions, encoder.encode(captions, np.zeros(0)), encoder


@pytest.fixture(scope="module")
def fitted(demo_captions):
    _captions, x, _ = demo_captions
    cfg = ModeConfig(n_fine=64, n_experts=4, fit_fraction=1.0, iterations=15)
    hierarchy = fit_hierarchy(x, cfg)
    fine = nearest(x, hierarchy.fine, "cosine")[0][:, 0]
    return hierarchy, fine, hierarchy.fine_to_expert[fine]


@pytest.mark.slow
def test_experts_have_clearly_different_top_terms(demo_captions, fitted):
    captions, _, _ = demo_captions
    _, _, experts = fitted
    terms = [set(t) for t in top_terms(captions, experts, 4)]
    for i in range(4):
        for j in range(i + 1, 4):
            overlap = len(terms[i] & terms[j]) / len(terms[i] | terms[j])
            assert overlap <= 0.25, (terms[i], terms[j])


@pytest.mark.slow
def test_paraphrases_share_a_fine_cluster_far_more_often_than_chance(demo_captions, fitted):
    captions, _, encoder = demo_captions
    hierarchy, fine, _ = fitted
    originals = encoder.encode([captions[i] for i, _ in PARAPHRASES], np.zeros(0))
    paraphrases = encoder.encode([p for _, p in PARAPHRASES], np.zeros(0))
    a = nearest(originals, hierarchy.fine, "cosine")[0][:, 0]
    b = nearest(paraphrases, hierarchy.fine, "cosine")[0][:, 0]
    same = float((a == b).mean())
    shares = np.bincount(fine, minlength=64) / len(fine)
    chance = float((shares**2).sum())  # two random captions in one cluster
    assert same >= 0.5 and same >= 10 * chance, (same, chance)


@pytest.mark.slow
def test_class_names_from_one_experts_captions_route_to_that_expert(demo_captions, fitted):
    _captions, x, _ = demo_captions
    hierarchy, _, experts = fitted
    rng = np.random.default_rng(0)
    for e in range(4):
        members = np.nonzero(experts == e)[0]
        names = rng.choice(members, size=10, replace=False)
        weights = routing_weights(x[names], hierarchy.fine, hierarchy.fine_to_expert, 4)
        assert weights.argmax() == e, (e, weights)
        assert weights.sum() == pytest.approx(1.0)


@pytest.mark.slow
def test_balanced_kmeans_evens_out_cluster_sizes(demo_captions, fitted):
    _, x, _ = demo_captions
    hierarchy, fine, _ = fitted
    plain = nearest(x, hierarchy.plain_fine, "cosine")[0][:, 0]
    assert gini(np.bincount(fine, minlength=64)) < 0.75 * gini(np.bincount(plain, minlength=64))


def test_balanced_assignment_respects_capacity():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1000, 8)).astype(np.float32)
    x[:700] += 5  # most points crowd around one place
    centers = rng.normal(size=(10, 8)).astype(np.float32)
    labels = balanced_assign(x, centers, "euclidean")
    assert np.bincount(labels, minlength=10).max() <= 100 and (labels >= 0).all()


def test_routing_formula_matches_mode():
    fine = np.array([[0.0, 0.0], [10.0, 0.0]], np.float32)
    classes = np.array([[0.0, 0.1], [0.0, 0.2], [10.0, 0.5]], np.float32)
    w = routing_weights(classes, fine, np.array([0, 1]), 2)
    n = 3
    add, mul = np.exp(0.5 - np.sqrt(n)), 5.0 * np.log10(10)
    raw = np.array([np.exp((add - 0.1) * mul) + np.exp((add - 0.2) * mul), np.exp((add - 0.5) * mul)])
    expected = np.exp(raw / 8.0) / np.exp(raw / 8.0).sum()
    assert np.allclose(w, expected)


def test_gini():
    assert gini(np.array([5, 5, 5, 5])) == pytest.approx(0.0)
    assert gini(np.array([0, 0, 0, 12])) == pytest.approx(0.75)


def test_stage_assigns_every_captioned_sample(clustered):
    pool, _cfg, summary = clustered
    mode = pool.read_table("mode")
    assert mode["uid"].to_pylist() == pool.read_table("caption_embed")["uid"].to_pylist()
    fine_to_expert = np.load(pool.aggregates_dir / "mode" / "fine_to_expert.npy")
    assert np.array_equal(mode["expert_id"].to_numpy(), fine_to_expert[mode["fine_id"].to_numpy()])
    assert 0 < summary["fit_samples"] < mode.num_rows  # fitted on a sample, assigned to all
    report = json.loads((pool.report_dir("mode") / "clusters.json").read_text())
    assert sum(report["expert_sizes"]) == mode.num_rows and len(report["expert_top_terms"]) == 2
    assert (pool.report_dir("mode") / "cluster_sizes.png").stat().st_size > 1000


def test_rerun_reuses_the_fit_and_the_assignment(clustered):
    pool, cfg, summary = clustered
    before = pool.marker_path("mode", 0).stat().st_mtime_ns
    assert run_mode(pool, cfg, LocalEngine(1), progress=False)["fit_hash"] == summary["fit_hash"]
    assert pool.marker_path("mode", 0).stat().st_mtime_ns == before


def test_expert_subsets_mix_in_a_share_of_other_experts(clustered):
    pool, _, _ = clustered
    pure = expert_uids(pool, 0)
    mixed = expert_uids(pool, 0, mix=0.25, seed=1)
    assert pure["in_expert"].to_pylist() == [True] * pure.num_rows
    outside = mixed.num_rows - pure.num_rows
    available = pool.read_table("mode").num_rows - pure.num_rows
    assert outside == min(available, round(pure.num_rows * 0.25 / 0.75)) > 0
    sizes = np.bincount(pool.read_table("mode")["expert_id"].to_numpy(), minlength=2)
    smaller = int(sizes.argmin())
    small = expert_uids(pool, smaller, mix=0.1)
    mixed_in = (~np.array(small["in_expert"].to_pylist())).sum()
    assert mixed_in == min(sizes.sum() - sizes[smaller], round(sizes[smaller] * 0.1 / 0.9))
    assert expert_uids(pool, 0, mix=0.25, seed=1).equals(mixed)


def test_coarse_level_is_balanced_as_in_mode(demo_captions, fitted):
    """MoDE clusters the fine centres into experts with balanced k-means: each expert holds
    n_fine / n_experts fine clusters, so expert sizes stay close, unlike plain k-means."""
    _captions, x, _ = demo_captions
    hierarchy, fine, expert = fitted
    assert np.bincount(hierarchy.fine_to_expert, minlength=4).tolist() == [16, 16, 16, 16]
    sizes = np.bincount(expert, minlength=4)
    plain = np.bincount(hierarchy.plain_fine_to_expert[fine], minlength=4)
    assert sizes.max() / sizes.min() <= 1.5  # fine clusters are balanced too: about n / 4 each
    assert sizes.max() / sizes.min() < plain.max() / max(1, plain.min())
    unbalanced = fit_hierarchy(x, ModeConfig(n_fine=64, n_experts=4, fit_fraction=1.0, iterations=15,
                                             balanced_coarse=False))  # fmt: skip
    assert np.array_equal(unbalanced.fine_to_expert, hierarchy.plain_fine_to_expert)


def test_report_shows_expert_sizes_with_and_without_balanced_coarse(clustered):
    import json

    pool, cfg, _ = clustered
    report = json.loads((pool.report_dir("mode") / "clusters.json").read_text())
    assert sum(report["expert_sizes"]) == sum(report["expert_sizes_plain_coarse"]) > 250
    assert report["fine_clusters_per_expert"] == [cfg.n_fine // cfg.n_experts] * cfg.n_experts
    assert report["expert_size_ratio"] == round(max(report["expert_sizes"]) / min(report["expert_sizes"]), 3)
    assert "plain coarse k-means" in (pool.report_dir("mode") / "clusters.md").read_text()


def test_two_pools_with_equal_digests_each_assign_with_their_own_centres(clustered, tmp_path):
    """Set-up steps are kept per worker process by their settings, the pool's path among them: a
    second pool whose fit has the same digest (a copy, its centres then changed) is assigned with its
    own centres, not the first pool's."""
    import shutil

    from pipeline.mode import run_mode
    from pipeline.store.parquet import Pool

    pool, cfg, _ = clustered
    copies = [Pool(shutil.copytree(pool.root, tmp_path / name)) for name in ("a", "b")]
    fine = copies[1].aggregates_dir / "mode" / "fine_centers.npy"
    np.save(fine, np.load(fine)[::-1].copy())  # the same centres in reverse order: other ids
    for copy in copies:
        for sub in ("completions", "tables"):
            shutil.rmtree(copy.root / sub / "mode")
        run_mode(copy, cfg, LocalEngine(1), progress=False)  # one process: the step is set up once per key
    a, b = (c.read_table("mode", ["uid", "fine_id"]).sort_by("uid") for c in copies)
    n_fine = len(np.load(fine))
    assert a["uid"].equals(b["uid"])
    assert b["fine_id"].to_pylist() == [n_fine - 1 - i for i in a["fine_id"].to_pylist()]
