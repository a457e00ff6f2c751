from __future__ import annotations

import shutil

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import parse_config
from pipeline.engines.local import LocalEngine
from pipeline.errors import UserError
from pipeline.metaclip.stage import run_metaclip
from pipeline.query import connect
from pipeline.store.parquet import Pool
from tests.conftest import REPO


def _cfg(**metaclip):
    return parse_config(
        {
            "pool": "p",
            "download": {"input": "u"},
            "metaclip": {"metadata": str(REPO / "metadata/entries.json"), **metaclip},
        }
    ).metaclip


@pytest.fixture(scope="module")
def balanced(downloaded_pool, tmp_path_factory):
    pool = Pool(shutil.copytree(downloaded_pool[0].root, tmp_path_factory.mktemp("mc") / "pool"))
    summary = run_metaclip(pool, _cfg(t=5), LocalEngine(2), progress=False)
    return pool, summary


def test_every_sample_is_matched_counted_and_balanced(balanced):
    pool, summary = balanced
    con = connect(pool)
    assert con.execute("select count(*) from metaclip").fetchone()[0] == 301
    # counts = how many counted (downloaded) samples match each entry, from the tables themselves
    counts = pq.read_table(pool.aggregates_dir / "metaclip_entry_counts.parquet")
    expected = dict(
        con.execute(
            "select e, count(*) from (select unnest(matched_entry_ids) as e from metaclip_match where counted) "
            "group by 1"
        ).fetchall()
    )
    got = {i: c for i, c in zip(counts["entry_id"].to_pylist(), counts["count"].to_pylist(), strict=True) if c}
    assert got == expected and len(got) > 100
    # only successful downloads can be kept; unmatched samples never are
    bad = con.execute(
        "select count(*) from samples where metaclip_keep and (status <> 'success' or len(matched_entry_ids) = 0)"
    ).fetchone()[0]
    assert bad == 0
    kept = con.execute("select count(*) from samples where metaclip_keep").fetchone()[0]
    assert kept == summary["samples_kept"] and 0 < kept < summary["samples_matched"]
    assert summary["t"] == 5 and summary["entries_over_t"] > 0


def test_head_entries_are_cut_to_about_t(balanced):
    pool, _ = balanced
    table = pq.read_table(pool.aggregates_dir / "metaclip_entry_counts.parquet").to_pandas()
    head = table[table["count"] > 5]  # t = 5
    assert len(head) >= 10
    # a head entry keeps about t samples by its own draw, plus those its samples' other entries keep:
    # each of its samples is kept with the sample's p = 1 - prod(1 - min(1, t / count_e)), so its
    # kept count is a sum of Bernoulli(p) draws; check it against that sum's mean and spread
    assert (head["kept"] <= head["count"]).all()
    con = connect(pool)
    rows = con.execute("select e, sum(metaclip_p), sum(metaclip_p * (1 - metaclip_p)) from "
                       "(select unnest(matched_entry_ids) as e, metaclip_p from samples where counted) "
                       "group by e").fetchall()  # fmt: skip
    expected = {e: (mean, var) for e, mean, var in rows}
    for entry_id, kept in zip(head["entry_id"], head["kept"], strict=True):
        mean, var = expected[entry_id]
        assert abs(kept - mean) <= 4 * var**0.5 + 1, (entry_id, kept, mean, var)
    assert sum(expected[e][0] for e in head["entry_id"]) < head["count"].sum()  # the head is cut
    assert head["kept"].sum() < head["count"].sum()
    tail = table[(table["count"] > 0) & (table["count"] <= 5)]
    assert len(tail) > 100
    assert (tail["kept"] == tail["count"]).all()  # p = 1: every sample of a tail entry is kept


def test_report_plot_and_tables_are_written(balanced):
    pool, _ = balanced
    report = pool.report_dir("metaclip")
    with Image.open(report / "entry_distribution.png") as img:
        assert img.format == "PNG" and img.size[0] > 400
    assert "| entries with count | before | after |" in (report / "entry_distribution.md").read_text()
    manifest = pool.update_manifest()
    assert manifest["stage_results"]["metaclip"]["t"] == 5


def test_rerun_is_a_no_op_and_a_new_t_rebalances_without_rematching(balanced):
    pool, _ = balanced
    match_markers = {p: p.stat().st_mtime_ns for p in (pool.root / "completions/metaclip_match").glob("0*.json")}
    before = pool.read_table("metaclip")["metaclip_keep"].to_pylist()
    run_metaclip(pool, _cfg(t=5), LocalEngine(1), progress=False)
    assert pool.read_table("metaclip")["metaclip_keep"].to_pylist() == before
    summary = run_metaclip(pool, _cfg(t=1000), LocalEngine(1), progress=False)
    assert match_markers == {
        p: p.stat().st_mtime_ns for p in (pool.root / "completions/metaclip_match").glob("0*.json")
    }
    after = np.array(pool.read_table("metaclip")["metaclip_keep"].to_pylist())
    assert after.sum() == summary["samples_matched"]  # t above every count keeps every matched sample
    run_metaclip(pool, _cfg(t=5), LocalEngine(1), progress=False)  # back to the fixture's state


def test_engines_agree_and_an_incomplete_download_is_refused(downloaded_pool, balanced, tmp_path):
    pool, _ = balanced
    other = Pool(shutil.copytree(downloaded_pool[0].root, tmp_path / "pool"))
    run_metaclip(other, _cfg(t=5), LocalEngine(1), progress=False)
    a = pool.read_table("metaclip").sort_by("uid")
    b = other.read_table("metaclip").sort_by("uid")
    assert a.equals(b)
    other.marker_path("download", 2).unlink()
    with pytest.raises(UserError, match=r"stage 'download' has 3/4 shards done \(first missing: 00002\)"):
        run_metaclip(other, _cfg(t=5), LocalEngine(1), progress=False)
    assert duckdb  # imported for the views above


def test_entry_counts_are_queryable(balanced):
    pool, _ = balanced
    top = connect(pool).execute("select entry from metaclip_entry_counts order by count desc limit 1").fetchone()[0]
    assert top == "of"
