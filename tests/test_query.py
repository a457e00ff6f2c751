from __future__ import annotations

import json

import pyarrow as pa

from pipeline.cli import main
from pipeline.query import connect, format_stats, query, stats
from pipeline.store.parquet import write_parquet_atomic


def test_download_view_and_status_counts(downloaded_pool):
    pool, rows, _ = downloaded_pool
    counts = {
        r["status"]: r["n"] for r in query(pool, "select status, count(*) as n from download group by 1").to_pylist()
    }
    assert sum(counts.values()) == rows.num_rows
    assert counts["success"] > 250 and counts["invalid_url"] == 1


def test_samples_view_joins_later_stage_tables(downloaded_pool, tmp_path):
    pool, rows, _ = downloaded_pool
    # A later stage's table for shard 0 (what embed/filters will write), joined by uid.
    uids = pool.read_table("download")["uid"].to_pylist()[:100]
    extra = pa.table({"uid": uids, "shard": pa.array([0] * 100, pa.int32()), "score": [float(i) for i in range(100)]})
    write_parquet_atomic(pool.table_path("scores", 0), extra)
    pool.mark_done("scores", 0, "h", {"samples": 100})
    try:
        con = connect(pool)
        assert con.execute("select count(*) from samples").fetchone()[0] == rows.num_rows
        assert con.execute("select count(*) from samples where score >= 50").fetchone()[0] == 50
        columns = [c[0] for c in con.execute("describe samples").fetchall()]
        assert columns.count("shard") == 1 and "score" in columns
    finally:
        pool.table_path("scores", 0).unlink()
        pool.marker_path("scores", 0).unlink()


def test_stats_report_every_failure_class_with_its_message(downloaded_pool):
    pool, rows, _ = downloaded_pool
    report = stats(pool)["stages"]["download"]
    assert report["samples"] == rows.num_rows and report["shards_done"] == 4
    assert set(report["status"]) == {"success", "failed_to_download", "failed_to_resize", "invalid_url"}
    assert "HTTP Error 404: Not Found" in report["status"]["failed_to_download"]["errors"]
    assert "timed out" in report["status"]["failed_to_download"]["errors"]
    text = format_stats(stats(pool))
    assert "download: 4/4 shards done" in text and "HTTP Error 404" in text


def test_cli_query_formats(downloaded_pool, capsys):
    pool, rows, _ = downloaded_pool
    sql = "select status, count(*) as n from download group by 1 order by 1"
    assert main(["query", str(pool.root), sql, "--format", "json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sum(r["n"] for r in lines) == rows.num_rows
    assert main(["query", str(pool.root), sql, "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == '"status","n"'
    assert main(["query", str(pool.root), sql]) == 0
    assert "success" in capsys.readouterr().out
    assert main(["stats", str(pool.root)]) == 0
    assert "failed_to_download" in capsys.readouterr().out


def test_cli_rejects_what_is_not_a_pool(tmp_path, capsys):
    assert main(["stats", str(tmp_path)]) == 2
    assert "not a pool (no completions/ directory)" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["stats", str(tmp_path / "file")]) == 2  # a pool path that is a file: one line, no traceback
    assert capsys.readouterr().err.strip() == f"curate: {tmp_path / 'file'}: is a file, not a pool directory"
