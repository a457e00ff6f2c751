"""Curating before the download (MetaCLIP's order): MetaCLIP and the caption scores run on the listed
captions, then ``download.where`` fetches only the selected rows.

The check is the one that matters to a user: the text-first kept set equals the set the same rules
select when everything is downloaded first, restricted to the rows that downloaded.
"""

from __future__ import annotations

import dataclasses

import pyarrow.parquet as pq
import pytest

from pipeline.config import parse_config
from pipeline.download import InputError, run_download
from pipeline.engines.local import LocalEngine
from pipeline.filters.stage import pending_scores, score_shards
from pipeline.metaclip.stage import run_metaclip
from pipeline.query import connect, stats
from pipeline.store.parquet import Pool
from tests.conftest import laion_rows, point_at

WHERE = "metaclip_keep and lang = 'en' and caption_words > 2"


def _config(root, url_list, where=None):
    data = {
        "pool": str(root),
        "download": {"input": str(url_list), "samples_per_shard": 100, "timeout": 1.0, "processes": 2,
                     "threads": 16, "where": where},
        "metaclip": {"t": 2, "only_downloaded": False},
        "filters": {"recipe": "basic"},
    }  # fmt: skip
    return parse_config(data, "test")


def _text_stages(pool, cfg, engine):
    run_metaclip(pool, cfg.metaclip, engine, progress=False)
    score_shards(pool, engine, pending_scores(pool, listed=True), progress=False)


@pytest.fixture(scope="module")
def pools(tmp_path_factory, image_server):
    root = tmp_path_factory.mktemp("textfirst")
    url_list = root / "urls.parquet"
    pq.write_table(point_at(laion_rows(300, offset=1000), image_server), url_list)
    engine = LocalEngine(2)

    first = _config(root / "text_first", url_list, WHERE)
    pool = Pool(first.pool)
    from pipeline.download import prepare

    prepare(pool, first.download, LocalEngine(2))
    _text_stages(pool, first, engine)
    before = stats(pool)
    run_download(pool, first.download, engine, progress=False)
    score_shards(pool, engine, pending_scores(pool), progress=False)  # sizes, now that images are here

    full = _config(root / "download_first", url_list)
    everything = Pool(full.pool)
    run_download(everything, full.download, engine, progress=False)
    _text_stages(everything, full, engine)
    return pool, everything, before, first


def _uids(pool, sql):
    con = connect(pool)
    try:
        return set(con.sql(sql).fetch_arrow_table()["uid"].to_pylist())
    finally:
        con.close()


def test_text_first_keeps_what_download_first_keeps_among_downloaded_rows(pools):
    pool, everything, _, _ = pools
    kept = _uids(pool, f"select uid from samples where status = 'success' and ({WHERE})")
    reference = _uids(everything, f"select uid from samples where status = 'success' and ({WHERE})")
    assert kept == reference
    assert 0 < len(kept) < 300


def test_only_selected_rows_are_fetched(pools):
    pool, everything, before, _ = pools
    selected = _uids(everything, f"select uid from samples where {WHERE}")
    fetched = _uids(pool, "select uid from download where status <> 'not_selected'")
    assert fetched == selected
    skipped = _uids(pool, "select uid from download where status = 'not_selected'")
    assert len(skipped) == 300 - len(selected) > 0
    tar_members = sum(1 for s in range(3) for _ in __import__("tarfile").open(pool.shard_tar(s)))
    full_members = sum(1 for s in range(3) for _ in __import__("tarfile").open(everything.shard_tar(s)))
    assert tar_members < full_members

    # the samples view and stats count listed, selected and downloaded rows, before and after
    assert before["samples"] == {"listed": 300, "selected": 300, "downloaded": 0}
    after = stats(pool)["samples"]
    assert after["listed"] == 300 and after["selected"] == len(selected)
    assert after["downloaded"] == len(_uids(pool, "select uid from download where status = 'success'"))
    # MetaCLIP's counts stay those of the whole listed pool
    assert stats(pool)["stages"]["metaclip_match"]["counts"]["counted"] == 300


def test_caption_scores_are_redone_with_sizes_after_the_download(pools):
    pool, _, _, _ = pools
    con = connect(pool)
    try:
        sql = "select count(*) from samples where status = 'success' and min_side is null"
        unsized = con.execute(sql).fetchone()[0]
    finally:
        con.close()
    assert unsized == 0


def test_where_needs_its_stages_finished_first(tmp_path, image_server):
    url_list = tmp_path / "urls.parquet"
    pq.write_table(point_at(laion_rows(50), image_server), url_list)
    cfg = _config(tmp_path / "pool", url_list, WHERE)
    with pytest.raises(InputError, match=r"metaclip_keep.*no finished stage"):
        run_download(Pool(cfg.pool), cfg.download, LocalEngine(1), progress=False)
    late = dataclasses.replace(cfg.download, where="width > 100")
    with pytest.raises(InputError, match="width, known only after the download"):
        run_download(Pool(tmp_path / "other"), late, LocalEngine(1), progress=False)


def test_metaclip_before_the_download_must_count_the_listed_pool(tmp_path):
    from pipeline.config import ConfigError

    data = {"pool": "p", "download": {"input": "u", "where": "metaclip_keep"}, "metaclip": {}}
    with pytest.raises(ConfigError, match="only_downloaded"):
        parse_config(data, "test")


def test_worldwide_balancing_before_the_download_counts_the_listed_pool(tmp_path, image_server):
    """MetaCLIP 2 before the download: every listed caption is scored, matched in its language and
    counted; the download fetches the selected rows, and running MetaCLIP again after it changes no
    decision (the captions, so their languages and matches, are the same)."""
    from wordfreq import top_n_list

    lists = tmp_path / "metadata"
    lists.mkdir()
    for lang in ("fr", "de", "es"):
        (lists / f"{lang}.json").write_text(__import__("json").dumps(top_n_list(lang, 3000)))
    url_list = tmp_path / "urls.parquet"
    pq.write_table(point_at(laion_rows(300, offset=2000), image_server), url_list)
    where = "metaclip_keep"
    cfg = _config(tmp_path / "pool", url_list, where)
    cfg = dataclasses.replace(cfg, metaclip=dataclasses.replace(cfg.metaclip, worldwide=True, metadata_dir=str(lists)))
    pool, engine = Pool(cfg.pool), LocalEngine(2)
    from pipeline.download import prepare

    prepare(pool, cfg.download, engine)
    summary = run_metaclip(pool, cfg.metaclip, engine, progress=False)
    languages = {row["lang"]: row for row in summary["worldwide"]["languages"]}
    assert summary["pool_size"] == 300 == sum(row["samples"] for row in languages.values())
    assert languages["en"]["samples"] > 200 and languages["fr"]["samples"] + languages["de"]["samples"] > 0
    before = _uids(pool, f"select uid from samples where {where}")
    run_download(pool, cfg.download, engine, progress=False)
    fetched = _uids(pool, "select uid from download where status <> 'not_selected'")
    assert fetched == before and 0 < len(before) < 300
    again = run_metaclip(pool, cfg.metaclip, engine, progress=False)
    assert again["worldwide"] == summary["worldwide"]
    assert _uids(pool, f"select uid from samples where {where}") == before
