from __future__ import annotations

import math
import random

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import parse_config
from pipeline.errors import UserError
from pipeline.rebalance import group_probabilities, rebalance, run_rebalance, solve_param


def _uids(n: int) -> pa.Array:
    rng = random.Random(3)
    return pa.array([f"{rng.getrandbits(128):032x}" for _ in range(n)])


COUNTS = np.array([20, 200, 2000, 8000])


def test_cap_and_temperature_rules():
    assert group_probabilities(COUNTS, "cap", 500, 0).tolist() == [1.0, 1.0, 0.25, 0.0625]
    p = group_probabilities(COUNTS, "temperature", 1.0, 0.5)
    assert np.allclose(p * COUNTS, np.sqrt(COUNTS))  # a group keeps count ** alpha samples
    assert np.allclose(group_probabilities(COUNTS, "temperature", 0.1, 1.0), 0.1)  # alpha 1 keeps proportions


@pytest.mark.parametrize("method", ["cap", "temperature"])
def test_target_size_is_met_in_expectation(method):
    param = solve_param(COUNTS, method, 0.5, 1500)
    assert (group_probabilities(COUNTS, method, param, 0.5) * COUNTS).sum() == pytest.approx(1500, rel=1e-6)


def test_draws_follow_p_and_ignore_partitioning():
    groups = np.repeat(np.arange(4), COUNTS)
    uids = _uids(len(groups))
    p_group = group_probabilities(COUNTS, "cap", 500, 0)
    keep = rebalance(uids, groups, p_group[groups], seed=5)
    for g, count in enumerate(COUNTS):
        expected = p_group[g]
        assert abs(keep[groups == g].mean() - expected) <= 4.5 * math.sqrt(expected * (1 - expected) / count) + 1e-12
    order = np.random.default_rng(0).permutation(len(groups))
    parts = np.empty_like(keep)
    for idx in np.array_split(order, 5):
        parts[idx] = rebalance(uids.take(pa.array(idx)), groups[idx], p_group[groups[idx]], seed=5)
    assert np.array_equal(parts, keep)


def test_a_new_group_leaves_the_other_groups_draws_unchanged():
    groups = np.repeat(np.array([3, 7, 11, 12]), COUNTS)
    uids = _uids(len(groups))
    p = np.full(len(groups), 0.5)
    before = rebalance(uids, groups, p, seed=1)
    # a new group (value 5, between existing ones) arrives with its own samples
    extra = _uids(len(groups) + 300).slice(len(groups))
    grown = rebalance(pa.concat_arrays([uids, extra]), np.r_[groups, np.full(300, 5)], np.full(len(groups) + 300, 0.5),
                      seed=1)  # fmt: skip
    assert np.array_equal(grown[: len(groups)], before) and 0.3 < before.mean() < 0.7


def test_stage_over_fine_clusters(clustered):
    pool, _, _ = clustered
    cfg = parse_config({"pool": "p", "download": {"input": "u"}, "rebalance": {"t": 10, "seed": 2}}).rebalance
    from pipeline.engines.local import LocalEngine

    summary = run_rebalance(pool, cfg, LocalEngine(1))
    from pipeline.query import connect

    con = connect(pool)
    rows = con.execute(
        "select fine_id, count(*), sum(rebalance_keep::int), min(rebalance_p) from samples "
        "where rebalance_p is not null group by 1"
    ).fetchall()
    for _, count, _, p in rows:
        assert p == pytest.approx(min(1.0, 10 / count))
    assert summary["kept"] == sum(r[2] for r in rows) and summary["groups"] == len(rows)
    assert (pool.report_dir("rebalance") / "group_sizes.png").exists()
    with pytest.raises(UserError, match="no column 'nope'"):
        run_rebalance(
            pool, parse_config({"pool": "p", "download": {"input": "u"}, "rebalance": {"group_by": "nope"}}).rebalance,
            LocalEngine(1),
        )


def test_stage_over_metaclip_entries_is_metaclips_rule(clustered):
    from pipeline.engines.local import LocalEngine
    from pipeline.metaclip.stage import run_metaclip
    from pipeline.query import connect
    from tests.conftest import REPO

    pool, _, _ = clustered
    mc = {"metadata": str(REPO / "metadata/entries.json"), "t": 3, "seed": 4, "only_downloaded": False}
    run_metaclip(
        pool,
        parse_config({"pool": "p", "download": {"input": "u"}, "metaclip": mc}).metaclip,
        LocalEngine(1),
        progress=False,
    )
    cfg = {"group_by": "matched_entry_ids", "t": 3, "seed": 4}
    run_rebalance(pool, parse_config({"pool": "p", "download": {"input": "u"}, "rebalance": cfg}).rebalance,
                  LocalEngine(1))  # fmt: skip
    rows = connect(pool).execute("select metaclip_p, rebalance_p, metaclip_keep, rebalance_keep from samples "
                                 "where rebalance_p is not null").fetchall()  # fmt: skip
    assert len(rows) == 301 and all(a == pytest.approx(b) and c == d for a, b, c, d in rows)
    with pytest.raises(UserError, match="supports only `cap`"):
        bad = {"group_by": "matched_entry_ids", "method": "temperature"}
        run_rebalance(pool, parse_config({"pool": "p", "download": {"input": "u"}, "rebalance": bad}).rebalance,
                      LocalEngine(1))  # fmt: skip


def test_where_counts_and_draws_only_the_samples_in_play(clustered, tmp_path):
    """With ``where``, group sizes count only the samples in play, so the cap holds in the subset a
    release takes (binomial bound), groups under t are untouched, and the rest get no draw."""
    from pipeline.engines.local import LocalEngine
    from pipeline.metaclip.stage import run_metaclip
    from pipeline.query import query
    from tests.conftest import REPO, STAGES_AFTER_MODE, copy_pool

    pool = copy_pool(clustered[0], tmp_path / "pool", STAGES_AFTER_MODE)
    mc = parse_config({"pool": "p", "download": {"input": "u"},
                       "metaclip": {"metadata": str(REPO / "metadata/entries.json"), "t": 2}}).metaclip  # fmt: skip
    run_metaclip(pool, mc, LocalEngine(1), progress=False)
    t = 12
    cfg = parse_config({"pool": "p", "download": {"input": "u"},
                        "rebalance": {"t": t, "where": "metaclip_keep", "seed": 3}}).rebalance  # fmt: skip
    run_rebalance(pool, cfg, LocalEngine(1), progress=False)
    rows = query(pool, "select fine_id, count(*) as n, sum(rebalance_keep::int) as kept, min(rebalance_p) as p "
                       "from samples where metaclip_keep and fine_id is not null group by 1").to_pylist()  # fmt: skip
    assert sum(r["n"] for r in rows) > 50
    for r in rows:
        assert r["p"] == pytest.approx(min(1.0, t / r["n"]))  # counted over the samples in play only
        if r["n"] <= t:
            assert r["kept"] == r["n"]  # groups under t are untouched
        else:  # about t kept: within 4 binomial standard deviations
            assert abs(r["kept"] - t) <= 4 * math.sqrt(t * (1 - t / r["n"])) + 1
    outside = query(pool, "select count(*) as n, count(rebalance_keep) as drawn from samples "
                          "where not metaclip_keep").to_pylist()[0]  # fmt: skip
    assert outside["n"] > 0 and outside["drawn"] == 0


def test_config_defaults_count_what_is_still_in_play():
    base = {"pool": "p", "download": {"input": "u"}, "metaclip": {}, "filters": {}, "rebalance": {},
            "export": {"out": "r"}}  # fmt: skip
    cfg = parse_config(base)
    assert cfg.rebalance.where == "metaclip_keep and keep"
    assert cfg.export.where == "metaclip_keep and keep and rebalance_keep"
    assert cfg.metaclip.where is None  # MetaCLIP counts the whole pool
    only = parse_config({"pool": "p", "download": {"input": "u"}, "rebalance": {}, "export": {"out": "r"}})
    assert only.rebalance.where is None and only.export.where == "rebalance_keep"
    explicit = parse_config({**base, "rebalance": {"where": None}, "export": {"out": "r", "where": "keep"}})
    assert explicit.rebalance.where is None and explicit.export.where == "keep"
