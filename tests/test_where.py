"""A config's population predicate, bound once against the pool's columns and evaluated per shard
over that shard's rows alone (``pipeline/core/where.py``), gives the rows the users' ``samples``
view gives; a mistake in it is one line naming the key, before any shard task."""

from __future__ import annotations

import pytest

from pipeline.config import parse_config
from pipeline.core.where import bind, select
from pipeline.engines.local import LocalEngine
from pipeline.query import connect
from pipeline.sqlsafe import SqlError
from pipeline.store.parquet import Pool
from tests.conftest import REPO, STAGES_AFTER_MODE, copy_pool


@pytest.fixture(scope="module")
def matched(clustered, tmp_path_factory):
    from pipeline.filters.stage import pending_scores, score_shards
    from pipeline.metaclip.stage import run_metaclip

    pool = copy_pool(clustered[0], tmp_path_factory.mktemp("where") / "pool", STAGES_AFTER_MODE)
    mc = parse_config({"pool": "p", "download": {"input": "u"},
                       "metaclip": {"metadata": str(REPO / "metadata/entries.json"), "t": 2}}).metaclip  # fmt: skip
    run_metaclip(pool, mc, LocalEngine(1), progress=False)
    score_shards(pool, LocalEngine(1), pending_scores(pool), progress=False)
    return pool


@pytest.mark.parametrize("text", ["metaclip_keep and lang = 'en'", "fine_id % 2 = 0 or caption_words > 8",
                                  "status = 'success' and clip_score > 0", "url like '%jpg%'"])
def test_each_shard_selects_what_the_samples_view_selects(matched, text):
    where = bind(matched, text, "rebalance.where")
    con = connect(matched)
    for shard in matched.listed_shards():
        rows = con.execute(f"select uid from samples where shard = {shard} and ({text})").fetchall()
        want = sorted(r[0] for r in rows)
        assert sorted(select(matched, where, shard).to_pylist()) == want, (text, shard)
    assert con.execute(f"select count(*) from samples where {text}").fetchone()[0] > 0


def test_a_column_no_table_has_is_one_line_naming_the_key(matched):
    with pytest.raises(SqlError) as caught:
        bind(matched, "metaclip_keeep and keep", "rebalance.where")
    (line,) = str(caught.value).splitlines()
    assert line.startswith("rebalance.where:") and "metaclip_keeep" in line


def test_a_subquery_is_refused(matched):
    with pytest.raises(SqlError, match=r"^download\.where: .*subquery"):
        bind(matched, "uid in (select uid from samples where keep)", "download.where")


def test_the_stage_it_selects_for_is_not_read(matched):
    """``metaclip.where`` may not read MetaCLIP's own columns: they are what it selects for."""
    with pytest.raises(SqlError, match="metaclip_keep"):
        bind(matched, "metaclip_keep", "metaclip.where", skip=("metaclip_match", "metaclip"))


def test_a_typo_in_rebalance_where_fails_before_any_task(matched, tmp_path):
    import shutil

    from pipeline.rebalance import run_rebalance

    pool = copy_pool(matched, tmp_path / "pool")
    shutil.rmtree(pool.aggregates_dir / "rebalance", ignore_errors=True)  # another test may have rebalanced it
    cfg = parse_config({"pool": "p", "download": {"input": "u"},
                        "rebalance": {"t": 5, "where": "metaclip_kep"}}).rebalance  # fmt: skip
    with pytest.raises(SqlError, match=r"^rebalance\.where: .*metaclip_kep"):
        run_rebalance(Pool(pool.root), cfg, LocalEngine(2), progress=False)
    assert not (pool.aggregates_dir / "rebalance" / "input").exists()  # no population task ran


@pytest.mark.parametrize("listed", ["without_shard_column", "none"])
def test_a_pool_without_listed_rows_selects_over_its_download_table(matched, tmp_path, listed):
    """A pool whose prepared list has no ``shard`` column (an earlier version's), or no list at all
    (a benchmark's synthetic pool): the rows come from the download table, as in ``samples``."""
    import json

    import pyarrow.parquet as pq

    pool = copy_pool(matched, tmp_path / "pool")
    for path in pool.listed_paths():
        if listed == "none":
            path.unlink()
        else:
            pq.write_table(pq.read_table(path).drop_columns(["shard"]), path)
    if listed == "none":
        plan = json.loads(pool.plan_path.read_text())
        pool.plan_path.write_text(json.dumps({k: v for k, v in plan.items() if k != "ingests"}))
        assert pool.listed_paths() == []
    text = "metaclip_keep and lang = 'en'"
    where = bind(pool, text, "rebalance.where")
    assert where.tables[0][0] == "download"
    con = connect(pool)
    for shard in pool.done_shards("download"):
        rows = con.execute(f"select uid from samples where shard = {shard} and ({text})").fetchall()
        assert sorted(select(pool, where, shard).to_pylist()) == sorted(r[0] for r in rows)
