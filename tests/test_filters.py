"""DataComp filters, SemDeDup and decisions: rule parity on hand-checked cases and real pools."""

from __future__ import annotations

import collections

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, parse_config
from pipeline.devserver import DemoImageServer, kind_of, shared_seed, token_for
from pipeline.errors import UserError
from pipeline.filters import rules as R
from pipeline.filters.dedup import exact_groups, semdedup
from pipeline.filters.stage import caption_scores, fasttext_token_count, run_filters, size_scores
from pipeline.filters.wordnet import EntityMatcher, wordnet
from pipeline.store.parquet import Pool
from tests.conftest import STAGES_AFTER_MODE, copy_pool, embed_cfg, laion_rows, make_config, point_at


def filter_cfg(**kw):
    return parse_config({"pool": "p", "download": {"input": "u"}, "filters": kw}).filters


def cols(**kw):
    return {k: np.asarray(v, dtype=object if isinstance(v[0], str | type(None)) else None) for k, v in kw.items()}


# -- DataComp's rules, boundary values -------------------------------------------------------------


def test_basic_rule_boundaries():
    sizes = size_scores(pa.array([200, 199, 600, 601, 300, None, 0], pa.int32()),
                        pa.array([300, 300, 200, 200, 200, 100, 50], pa.int32()))  # fmt: skip
    assert sizes["min_side"].to_pylist() == [200, 199, 200, 200, 200, None, 0]
    assert sizes["aspect_ratio"].to_pylist()[:4] == [1.5, 300 / 199, 3.0, 3.005]
    c = {"min_side": sizes["min_side"].to_numpy(zero_copy_only=False),
         "aspect_ratio": sizes["aspect_ratio"].to_numpy(zero_copy_only=False)}  # fmt: skip
    min_side = R.RULES["min_side"].test(c, {"min": 200})
    aspect = R.RULES["aspect_ratio"].test(c, {"max": 3.0})
    assert min_side.tolist() == [True, False, True, True, True, False, False]  # exactly 200 px passes
    assert aspect.tolist() == [True, True, True, False, True, False, False]  # exactly 3.0 passes, inf fails


def test_caption_rule_boundaries():
    scores = caption_scores(["two words", "three small words", "a b c", "abcdef", "abcde", None])
    assert scores["caption_words"].to_pylist() == [2, 3, 3, 1, 1, 0]
    assert scores["caption_chars"].to_pylist() == [9, 17, 5, 6, 5, 0]
    c = {k: v.to_numpy(zero_copy_only=False) for k, v in scores.items()}
    assert R.RULES["caption_words"].test(c, {"min": 2}).tolist() == [False, True, True, False, False, False]
    assert R.RULES["caption_chars"].test(c, {"min": 5}).tolist() == [True, True, False, True, False, False]


def test_fasttext_tokens_count_newlines_as_end_of_sentence():
    assert fasttext_token_count("a dog") == 2
    assert fasttext_token_count("  a\tdog  ") == 2
    assert fasttext_token_count("a\ndog") == 3  # a, </s>, dog
    assert fasttext_token_count("") == 0


def test_language_id_runs_offline_on_demo_captions():
    table = laion_rows(10_000)
    captions = table["caption"].to_pylist()
    english = [c for c in captions if c in {
        "Tavern Brawl by velinov", "Dark granite or marble texture abstract background.",
        "Coffee Table with Tray Top Color: Gray", "EASY sunflower kissing balls home decor craft"}]  # fmt: skip
    assert len(english) == 4
    foreign = {"de": "Socionext hat den Display-Controller SC1711 für den Betrieb von Head-Up-Displays optimiert.",
               "fr": "NBA Draft 2019 : un enfant de Guinée Conakry vers les Washington Wizards mais pas que...",
               "ru": "Кроссовки Nike Dunk Retro QS"}  # fmt: skip
    assert set(foreign.values()) <= set(captions)  # real demo captions
    scores = caption_scores([*english, *foreign.values()])
    assert scores["lang"].to_pylist() == ["en"] * 4 + list(foreign)
    assert all(0 < p <= 1.0001 for p in scores["lang_score"].to_pylist())  # quantised model: p may round above 1
    # the non-English captions of the real demo set are found too
    found = collections.Counter(caption_scores(captions[:2000])["lang"].to_pylist())
    assert found["en"] > 1500 and found["de"] > 10 and found["fr"] > 10


def test_text_entity_follows_first_wordnet_sense():
    wn = wordnet()
    assert wn.first_synset("dogs") == 2084071  # dog.n.01 via morphy
    assert wn.first_synset("Dog") == 2084071
    assert wn.first_synset("running") == 558883  # nouns come first: running.n.01, not the verb run
    m = EntityMatcher()
    assert m.contains("a photo of two dogs")  # dog.n.01 is n02084071, an ImageNet-21k synset
    assert not m.contains("the of and")  # no WordNet sense
    assert not m.contains("dogs.")  # DataComp splits on whitespace only: "dogs." has no sense


def test_clip_score_threshold_is_datacomps_get_threshold():
    scores = np.array([0.1, 0.5, 0.3, np.nan, 0.9, 0.7, 0.2, 0.4, 0.6, 0.8, 0.35])
    # 10 scores, fraction 0.3: sorted decreasing, index int(10 * 0.3) = 3 -> 0.6; ">=" keeps 4 (0.9, 0.8, 0.7, 0.6)
    assert R.get_threshold(scores, 0.3) == 0.6
    assert R.get_threshold(scores, 1.0) == 0.1  # index n is past the end: keep everything
    keep = R.RULES["clip_score"].test({"clip_score": scores}, {"threshold": 0.6})
    assert keep.sum() == 4 and not keep[3]  # a null score fails


def test_recipes_parse_and_decide_in_order():
    assert [str(r) for r in R.recipe_rules("laion2b", {})] == ["downloaded", "english", "clip_score(threshold=0.28)"]
    assert [r.name for r in R.recipe_rules("basic", {})] == ["downloaded", "english", "caption_words", "caption_chars",
                                                             "min_side", "aspect_ratio"]  # fmt: skip
    with pytest.raises(UserError, match="unknown rule 'englsh'"):
        R.parse_rule("englsh")
    with pytest.raises(UserError, match="bad parameter"):
        R.parse_rule("min_side(max=3)")
    rules = R.parse_recipe(["english", "min_side(min=256)"])
    c = cols(status=["success", "success", "success", "failed_to_download"], lang=["en", "fr", "en", None],
             min_side=[300, 300, 255, 300])  # fmt: skip
    keep, reason, funnel = R.decide(c, rules)
    assert keep.tolist() == [True, False, False, False]
    assert reason.tolist() == [None, "english", "min_side", "downloaded"]
    assert funnel == [3, 2, 1]


def test_config_names_bad_recipes():
    with pytest.raises(ConfigError, match=r"filters\.recipe"):
        filter_cfg(recipe="nope")
    with pytest.raises(ConfigError, match=r"recipes\.mine: unknown rule 'clipscore'"):
        filter_cfg(recipe="mine", recipes={"mine": ["english", "clipscore"]})
    assert (
        filter_cfg(recipe="mine", recipes={"mine": ["english", "clip_score(threshold=0.3)", "dedup"]}).recipe == "mine"
    )


# -- deduplication ---------------------------------------------------------------------------------


def test_exact_groups_keep_smallest_uid():
    uids = np.array(["c", "a", "b", "d", "e"])
    hashes = np.array(["h1", "h1", "h2", "h1", "h3"])
    rep, size = exact_groups(uids, hashes)
    assert rep.tolist() == [1, 1, 2, 1, 4] and size.tolist() == [3, 3, 1, 3, 1]


def test_semdedup_keeps_the_first_of_each_group_in_semdedup_order():
    rng = np.random.default_rng(0)
    centre = rng.normal(size=16)
    base = [centre + rng.normal(scale=2.0, size=16) for _ in range(6)]
    x = np.stack([*base, base[0] + 0.01 * rng.normal(size=16), base[0] + 0.02 * rng.normal(size=16),
                  base[3] + 0.01 * rng.normal(size=16)])  # fmt: skip
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    uids = np.array([f"u{i}" for i in range(len(x))])
    keep, group, cluster = semdedup(x, uids, k=1, eps=0.01, iterations=5, seed=0, max_points_per_centroid=256)
    assert (cluster == 0).all()
    # in each planted group exactly one survives: the one farthest from the centroid (SemDeDup keep_hard)
    centroid = x.mean(axis=0)
    dist = 1 - x @ (centroid / np.linalg.norm(centroid))
    for members in ([0, 6, 7], [3, 8]):
        kept = [m for m in members if keep[m]]
        assert kept == [max(members, key=lambda m: dist[m])]
        # a dropped sample names the kept one it duplicates; a kept one names none
        assert all(group[m] == kept[0] for m in members if m != kept[0]) and group[kept[0]] == -1
    assert keep[[1, 2, 4, 5]].all() and (group[[1, 2, 4, 5]] == -1).all()


@pytest.fixture(scope="module")
def dup_pool(tmp_path_factory, tiny_checkpoint):
    """Real LAION rows: 80 plain images plus every URL the server answers with one of 6 shared
    images, byte-identical (exact duplicates) or resized and re-encoded (near duplicates)."""
    from pipeline.download import run_download
    from pipeline.embed import run_embed
    from pipeline.engines.local import LocalEngine

    rows = laion_rows(10_000)
    urls = rows["url"].to_pylist()
    groups = collections.defaultdict(list)
    ok = []
    for i, u in enumerate(urls):
        kind = kind_of(token_for(u)) if u.startswith("http") else None
        if kind in ("duplicate", "near_duplicate"):
            groups[shared_seed(token_for(u))].append(i)
        elif kind == "ok" and len(ok) < 80:
            ok.append(i)
    seeds = sorted(groups, key=lambda s: (-len(groups[s]), s))[:6]
    root = tmp_path_factory.mktemp("dedup")
    with DemoImageServer() as server:
        table = point_at(rows.take(pa.array(sorted(ok + [i for s in seeds for i in groups[s]]))), server)
        pq.write_table(table, root / "urls.parquet")
        cfg = make_config(root / "pool", root / "urls.parquet", samples_per_shard=40)
        run_download(Pool(cfg.pool), cfg.download, LocalEngine(2), progress=False)
    pool = Pool(cfg.pool)
    run_embed(pool, embed_cfg(tiny_checkpoint, workers=0), LocalEngine(1), progress=False)
    planted = {token_for(urls[i]): s for s in seeds for i in groups[s]}
    return pool, planted


def test_dedup_finds_planted_exact_and_near_duplicates(dup_pool):
    from pipeline.engines.local import LocalEngine
    from pipeline.query import query

    pool, planted = dup_pool
    # The tiny model has random weights: two unrelated images of one dominant colour already score
    # about 0.999, planted near duplicates at least 0.9991 in this pool, so eps is set tight.
    cfg = filter_cfg(recipe="dedup", dedup_eps=0.0009, samples_per_dedup_cluster=50)
    summary = run_filters(pool, cfg, LocalEngine(2), progress=False)
    rows = query(pool, "select uid, url, sha256, dup_group, dup_kind, dedup_keep, keep, drop_reason from samples "
                       "where status = 'success'").to_pylist()  # fmt: skip
    vectors = {r["uid"]: np.asarray(r["image_embedding"], np.float32)
               for r in query(pool, "select uid, image_embedding from embed").to_pylist()}  # fmt: skip
    by_seed = collections.defaultdict(list)
    unplanted_drops = 0
    for r in rows:
        seed = planted.get(r["url"].rsplit("/", 1)[1].removesuffix(".jpg"))
        if seed is not None:
            by_seed[seed].append(r)
        elif not r["dedup_keep"]:
            # The random model puts two mostly-blue images at 0.9992: a drop outside the planted
            # groups must still be justified by another image above 1 - eps.
            unplanted_drops += 1
            v = vectors[r["uid"]] / np.linalg.norm(vectors[r["uid"]])
            others = [vectors[o["uid"]] for o in rows if o["uid"] != r["uid"]]
            assert max(float(v @ (o / np.linalg.norm(o))) for o in others) > 1 - 0.0009
    assert unplanted_drops <= 1
    assert len(by_seed) == 6
    for members in by_seed.values():
        kept = [m for m in members if m["dedup_keep"]]
        assert len(kept) == 1, members  # one of each group survives
        # every dropped copy names the kept one; the kept one names none
        assert {m["dup_group"] for m in members if m is not kept[0]} == {kept[0]["uid"]}
        assert kept[0]["dup_group"] is None
        for m in members:
            if not m["dedup_keep"]:
                # byte-identical copies of the kept image are exact, the rest semantic
                assert m["dup_kind"] == ("exact" if m["sha256"] == kept[0]["sha256"] or any(
                    o["sha256"] == m["sha256"] and o["uid"] < m["uid"] for o in members) else "semantic")  # fmt: skip
                assert not m["keep"] and m["drop_reason"] == "dedup"
    kinds = collections.Counter(r["dup_kind"] for r in rows if r["dup_kind"])
    assert kinds["exact"] > 0 and kinds["semantic"] > 0
    assert summary["dedup"]["exact_dropped"] == kinds["exact"]


# -- the stage on a real pool ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def filtered(clustered, tmp_path_factory):
    """A copy of the embedded 301-row pool, filtered with the basic recipe."""
    from pipeline.engines.local import LocalEngine

    pool = copy_pool(clustered[0], tmp_path_factory.mktemp("filters") / "pool", STAGES_AFTER_MODE)
    summary = run_filters(pool, filter_cfg(recipe="basic"), LocalEngine(2), progress=False)
    return pool, summary


def test_basic_recipe_matches_datacomp_on_the_pool(filtered):
    """The basic filter recomputed from the download table the way DataComp's script does it."""
    from pipeline.filters.language import identify
    from pipeline.query import query

    pool, summary = filtered
    rows = query(pool, "select uid, status, caption, original_width w, original_height h, keep, drop_reason "
                       "from samples order by uid").to_pylist()  # fmt: skip
    assert len(rows) == 301 == summary["pool_size"] == summary["kept"] + summary["dropped"]
    langs, _ = identify([r["caption"] for r in rows])
    for r, lang in zip(rows, langs, strict=True):
        text = r["caption"] or ""
        datacomp = (r["status"] == "success" and lang == "en" and len(text.split()) > 2 and len(text) > 5
                    and min(r["w"], r["h"]) >= 200 and max(r["w"], r["h"]) / min(r["w"], r["h"]) <= 3.0)  # fmt: skip
        assert r["keep"] == datacomp, r
        assert (r["drop_reason"] is None) == r["keep"]
    assert 0 < summary["kept"] < 301
    assert summary["funnel"][-1]["left"] == summary["kept"]


def test_query_explains_every_dropped_sample(filtered, capsys):
    from pipeline.cli import main

    pool, summary = filtered
    sql = "select drop_reason, count(*) as n from samples group by 1 order by 1"
    assert main(["query", str(pool.root), sql, "--format", "json"]) == 0
    import json

    counts = {r["drop_reason"]: r["n"] for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert counts.pop(None) == summary["kept"]
    assert counts == summary["drop_reasons"] and sum(counts.values()) == summary["dropped"]
    assert set(counts) <= {"downloaded", "english", "caption_words", "caption_chars", "min_side", "aspect_ratio"}
    manifest = json.loads((pool.root / "manifest.json").read_text())
    assert manifest["stage_results"]["decisions"]["recipe"] == "basic"
    assert "| `min_side` |" in (pool.root / "reports" / "decisions" / "funnel.md").read_text()


def test_clip_score_fraction_and_recipes_switch_without_rescoring(filtered):
    from pipeline.engines.local import LocalEngine
    from pipeline.query import query

    pool, _ = filtered
    scored = {s: m["finished_at"] for s, m in pool.completed("filters").items()}
    summary = run_filters(pool, filter_cfg(recipe="clip_score", clip_score_fraction=0.25), LocalEngine(2),
                          progress=False)  # fmt: skip
    assert {s: m["finished_at"] for s, m in pool.completed("filters").items()} == scored  # scores reused
    scores = query(pool, "select clip_score from embed where clip_score is not null")["clip_score"].to_numpy()
    threshold = float(np.sort(scores)[::-1][int(len(scores) * 0.25)])
    (params,) = summary["clip_score_thresholds"].values()
    assert params["threshold"] == pytest.approx(threshold) and params["fraction"] == 0.25
    assert summary["kept"] == int((scores >= threshold).sum())
    # laion2b: English and clip_score >= 0.28 (the tiny model's scores are all near 0: nothing passes)
    summary = run_filters(pool, filter_cfg(recipe="laion2b"), LocalEngine(2), progress=False)
    assert summary["kept"] == int((scores >= 0.28).sum()) == 0
    assert summary["drop_reasons"]["clip_score"] > 0


def test_image_based_filter_keeps_target_clusters(filtered, tiny_checkpoint, tmp_path):
    from pipeline.engines.local import LocalEngine
    from pipeline.query import query

    pool, _ = filtered
    # targets: three of the pool's own image embeddings -> their clusters are the targets
    emb = query(pool, "select uid, image_embedding from embed where image_embedding is not null order by uid")
    x = np.asarray(emb["image_embedding"].to_pylist(), np.float32)
    np.save(tmp_path / "targets.npy", x[[0, 50, 100]])
    cfg = filter_cfg(recipe="image_based", image_clusters=10, image_targets=str(tmp_path / "targets.npy"))
    summary = run_filters(pool, cfg, LocalEngine(2), progress=False)
    assert summary["image_based"]["clusters"] == 10
    centroids = np.load(pool.aggregates_dir / "image_based" / "centroids.npz")["centroids"]
    chosen = set(np.argmax(x[[0, 50, 100]] @ centroids.T, axis=1).tolist())  # the largest dot product
    rows = query(pool, "select image_cluster, image_target, keep, drop_reason, lang, caption_tokens, caption_chars "
                       "from samples where image_embedding is not null").to_pylist()  # fmt: skip
    for r in rows:
        assert r["image_target"] == (r["image_cluster"] in chosen)
        caption_ok = r["lang"] == "en" and r["caption_tokens"] > 1 and r["caption_chars"] > 5
        assert r["keep"] == (caption_ok and r["image_target"])
    # default targets: ImageNet-1k class names through the pool's CLIP text tower
    summary = run_filters(pool, filter_cfg(recipe="image_based", image_clusters=10), LocalEngine(2),
                          embed_cfg=embed_cfg(tiny_checkpoint), progress=False)  # fmt: skip
    assert summary["image_based"]["target_embeddings"] == 1000
    assert 1 <= summary["image_based"]["target_clusters"] <= 10
