from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.devserver import kind_of, served_image, token_for
from pipeline.download import InputError, prepare, read_url_list, run_download
from pipeline.engines.local import LocalEngine
from pipeline.errors import UserError
from pipeline.store.parquet import Pool
from pipeline.store.schema import DOWNLOAD_SCHEMA, make_uid
from pipeline.store.webdataset import iter_shard
from tests.conftest import REPO, laion_rows, make_config, point_at, write_config

# --- bad input: a clear error, and nothing written -------------------------------------------------


def _expect_input_error(tmp_path: Path, url_list: Path, pattern: str, **download) -> None:
    cfg = make_config(tmp_path / "pool", url_list, **download)
    with pytest.raises(InputError, match=pattern) as err:
        run_download(Pool(cfg.pool), cfg.download, LocalEngine(1), progress=False)
    assert str(url_list) in str(err.value)
    assert not (tmp_path / "pool").exists(), "a rejected input must leave no pool behind"


def test_missing_url_column(tmp_path: Path):
    path = tmp_path / "urls.parquet"
    pq.write_table(laion_rows(5).rename_columns(["link", "caption"]), path)
    _expect_input_error(tmp_path, path, r"missing column\(s\) 'url'; the file has 'link', 'caption'")


def test_missing_url_column_csv(tmp_path: Path):
    path = tmp_path / "urls.csv"
    path.write_text("link,caption\nhttp://a/b.jpg,a cat\n")
    _expect_input_error(tmp_path, path, r"missing column\(s\) 'url'")


@pytest.mark.parametrize(("name", "content"), [("urls.csv", ""), ("urls.jsonl", ""), ("urls.parquet", "")])
def test_empty_file(tmp_path: Path, name: str, content: str):
    path = tmp_path / name
    path.write_text(content)
    _expect_input_error(tmp_path, path, "the file is empty")


def test_header_only_file_has_no_rows(tmp_path: Path):
    path = tmp_path / "urls.csv"
    path.write_text("url,caption\n")
    _expect_input_error(tmp_path, path, "the file holds no rows")


def test_invalid_utf8_caption_csv_names_the_row(tmp_path: Path):
    path = tmp_path / "urls.tsv"
    path.write_bytes(b"url\tcaption\nhttp://a/1.jpg\tfine\nhttp://a/2.jpg\tbad \xff\xfe caption\n")
    _expect_input_error(tmp_path, path, r"row 2: caption column 'caption' is not valid UTF-8")


def test_invalid_utf8_caption_parquet_names_the_row(tmp_path: Path):
    path = tmp_path / "urls.parquet"
    captions = pa.array([b"ok", b"ok too", b"\xc3\x28 broken"], pa.binary())
    pq.write_table(pa.table({"url": ["http://a/1", "http://a/2", "http://a/3"], "caption": captions}), path)
    _expect_input_error(tmp_path, path, r"row 3: caption column 'caption' is not valid UTF-8")


def test_invalid_utf8_jsonl_names_the_line(tmp_path: Path):
    path = tmp_path / "urls.jsonl"
    path.write_bytes(b'{"url": "http://a/1", "caption": "x"}\n{"url": "http://a/2", "caption": "\xff"}\n')
    _expect_input_error(tmp_path, path, r"line 2: not valid UTF-8")


def test_missing_file(tmp_path: Path):
    _expect_input_error(tmp_path, tmp_path / "nope.parquet", "URL list not found")


def test_formats_read_the_same_rows(tmp_path: Path):
    rows = laion_rows(50)
    import pyarrow.csv as pacsv

    pq.write_table(rows, tmp_path / "u.parquet")
    pacsv.write_csv(rows, tmp_path / "u.csv")
    pacsv.write_csv(rows, tmp_path / "u.tsv", pacsv.WriteOptions(delimiter="\t"))
    (tmp_path / "u.jsonl").write_text(
        "\n".join(pa.Table.to_pandas(rows).to_json(orient="records", lines=True).splitlines())
    )
    cfg = make_config(tmp_path / "p", tmp_path / "u.parquet").download
    for name in ("u.parquet", "u.csv", "u.tsv", "u.jsonl"):
        assert read_url_list(tmp_path / name, cfg).equals(rows), name


def test_duplicate_rows_keep_the_first(tmp_path: Path):
    rows = laion_rows(10)
    path = tmp_path / "u.parquet"
    pq.write_table(pa.concat_tables([rows, rows.slice(2, 3)]), path)
    cfg = make_config(tmp_path / "pool", path)
    plan = prepare(Pool(cfg.pool), cfg.download, LocalEngine(2))
    assert (plan["source_rows"], plan["duplicates_dropped"], plan["num_rows"]) == (13, 3, 10)
    prepared = pq.read_table(Pool(cfg.pool).input_path)
    assert prepared["row"].to_pylist() == list(range(10))


def test_files_of_a_glob_are_one_list_whatever_the_workers(tmp_path: Path):
    """Three files (CSV and Parquet) matched by a glob: rows numbered across the files in name order,
    a (url, caption) repeated in a later file dropped there, uids equal to make_uid, and the same
    urls.parquet from 1 or 2 worker processes."""
    import pyarrow.csv

    rows = laion_rows(30)
    pq.write_table(rows.slice(0, 12), tmp_path / "a.parquet")
    pyarrow.csv.write_csv(rows.slice(12, 10), tmp_path / "b.csv")
    pq.write_table(pa.concat_tables([rows.slice(22, 8), rows.slice(5, 4)]), tmp_path / "c.parquet")
    made = []
    for workers in (1, 2):
        cfg = make_config(tmp_path / f"pool{workers}", tmp_path / "[abc].*", samples_per_shard=7)
        plan = prepare(Pool(cfg.pool), cfg.download, LocalEngine(workers))
        assert (plan["source_files"], plan["source_rows"], plan["duplicates_dropped"]) == (3, 34, 4)
        made.append(pq.read_table(Pool(cfg.pool).input_path))
        assert pq.ParquetFile(Pool(cfg.pool).input_path).metadata.num_row_groups == plan["num_shards"] == 5
    assert made[0].equals(made[1])
    assert made[0]["row"].to_pylist() == list(range(30))
    want = [make_uid(u, c) for u, c in zip(rows["url"].to_pylist(), rows["caption"].to_pylist(), strict=True)]
    assert made[0]["uid"].to_pylist() == want
    assert made[0]["shard"].to_pylist() == [i // 7 for i in range(30)]
    assert not (tmp_path / "pool1" / "input" / "_prepare").exists()


def test_a_bad_file_among_several_is_named_and_nothing_is_kept(tmp_path: Path):
    rows = laion_rows(10)
    pq.write_table(rows, tmp_path / "a.parquet")
    pq.write_table(rows.rename_columns(["link", "caption"]), tmp_path / "b.parquet")
    cfg = make_config(tmp_path / "pool", tmp_path)
    with pytest.raises(InputError, match=r"b\.parquet: missing column\(s\) 'url'"):
        prepare(Pool(cfg.pool), cfg.download, LocalEngine(2))
    assert not (tmp_path / "pool" / "input").exists()


# --- a real download ---------------------------------------------------------------------------


def test_every_input_row_has_one_download_row(downloaded_pool):
    pool, rows, _ = downloaded_pool
    table = pool.read_table("download")
    assert table.schema.equals(DOWNLOAD_SCHEMA)
    assert table.num_rows == rows.num_rows
    assert sorted(table["row"].to_pylist()) == list(range(rows.num_rows))
    expected = [make_uid(u, c) for u, c in zip(rows["url"].to_pylist(), rows["caption"].to_pylist(), strict=True)]
    assert table["uid"].to_pylist() == expected


def test_statuses_follow_what_the_server_served(downloaded_pool):
    pool, _, _ = downloaded_pool
    table = pool.read_table("download").to_pylist()
    source = [*laion_rows(300)["url"].to_pylist(), "ftp://example.com/a.jpg"]
    for row, url in zip(table, source, strict=True):
        kind = kind_of(token_for(url)) if url.startswith("http") else "ftp"
        expected = {
            "ok": ("success", None), "duplicate": ("success", None), "near_duplicate": ("success", None),
            "missing": ("failed_to_download", "HTTP Error 404: Not Found"),
            "slow": ("failed_to_download", "timed out"),
            "truncated": ("failed_to_resize", None), "not_image": ("failed_to_resize", None),
            "ftp": ("invalid_url", "unsupported URL: only http:// and https:// URLs are fetched"),
        }[kind]  # fmt: skip
        assert row["status"] == expected[0], (url, kind, row)
        if expected[1]:
            assert expected[1] in row["error_message"]
        if kind in ("ok", "duplicate", "near_duplicate"):
            served = served_image(token_for(url))
            assert row["sha256"] == hashlib.sha256(served).hexdigest()
            assert (row["original_width"], row["original_height"]) == Image.open(io.BytesIO(served)).size
        else:
            assert row["sha256"] is None and row["width"] is None, row
        assert (row["key"] is None) == (kind == "ftp")


def test_shards_hold_exactly_the_successes(downloaded_pool):
    pool, _, _ = downloaded_pool
    table = pool.read_table("download")
    successes = {r["uid"]: r for r in table.to_pylist() if r["status"] == "success"}
    seen = {}
    for shard in range(4):
        for sample in iter_shard(pool.shard_tar(shard)):
            assert sample["__error__"] is None
            meta = sample["json"]
            assert meta["uid"] not in seen
            seen[meta["uid"]] = sample
            assert sample["__key__"] == successes[meta["uid"]]["key"]
            assert sample["txt"] == successes[meta["uid"]]["caption"]
            w, h = Image.open(io.BytesIO(sample["jpg"])).size
            assert max(w, h) <= 512  # keep_ratio_largest, only shrinking
            assert (w, h) == (successes[meta["uid"]]["width"], successes[meta["uid"]]["height"])
    assert set(seen) == set(successes)
    # img2dataset's sidecar and stats sit beside each tar
    assert all(
        (pool.root / "shards" / f"{s:05d}{suf}").exists() for s in range(4) for suf in (".parquet", "_stats.json")
    )


def test_rerun_skips_finished_shards(downloaded_pool):
    pool, _, cfg = downloaded_pool
    before = {p: p.stat().st_mtime_ns for p in (pool.root / "shards").iterdir()}
    assert run_download(pool, cfg.download, LocalEngine(2), progress=False) == {}
    assert before == {p: p.stat().st_mtime_ns for p in (pool.root / "shards").iterdir()}


def test_changed_config_is_refused_naming_the_key(downloaded_pool):
    pool, _, cfg = downloaded_pool
    changed = make_config(pool.root, Path(cfg.download.input), image_size=256)
    with pytest.raises(UserError, match=r"another config \(image_size: 512 -> 256\)"):
        run_download(pool, changed.download, LocalEngine(1), progress=False)
    # worker counts do not change the output, so they may change freely
    run_download(pool, make_config(pool.root, Path(cfg.download.input), processes=1).download, LocalEngine(1))


def test_file_urls_are_never_fetched(tmp_path: Path, image_server):
    secret = tmp_path / "secret.jpg"
    Image.new("RGB", (300, 300), "red").save(secret)
    rows = pa.table({"url": [secret.as_uri(), image_server.url_for("http://x/ok.jpg")], "caption": ["a", "b"]})
    pq.write_table(rows, tmp_path / "u.parquet")
    cfg = make_config(tmp_path / "pool", tmp_path / "u.parquet")
    run_download(Pool(cfg.pool), cfg.download, LocalEngine(1), progress=False)
    statuses = Pool(cfg.pool).read_table("download")["status"].to_pylist()
    assert statuses[0] == "invalid_url"


# --- kill and resume -----------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_download_resumes_without_loss_or_duplicates(tmp_path: Path, paced_server):
    rows = point_at(laion_rows(600, offset=1000), paced_server)
    pq.write_table(rows, tmp_path / "u.parquet")
    cfg = make_config(tmp_path / "pool", tmp_path / "u.parquet", samples_per_shard=50, processes=2, threads=4)
    config = write_config(tmp_path / "c.yaml", cfg)
    pool = Pool(cfg.pool)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "download", str(config)],
        cwd=tmp_path,
        env=env,
        start_new_session=True,  # so the kill reaches the worker processes too
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while len(pool.completed("download")) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(pool.completed("download"))
    assert 3 <= done_before < 12, "the run was not killed midway"

    run_download(pool, cfg.download, LocalEngine(2), progress=False)
    table = pool.read_table("download")
    assert sorted(table["row"].to_pylist()) == list(range(600))
    assert len(table["uid"].unique()) == 600
    in_tars = [s["json"]["uid"] for shard in range(12) for s in iter_shard(pool.shard_tar(shard))]
    assert len(in_tars) == len(set(in_tars))
    success = {r["uid"] for r in table.to_pylist() if r["status"] == "success"}
    assert set(in_tars) == success
    assert not list((pool.staging_dir / "download").glob("*.tar"))


def test_redirects_to_other_schemes_are_refused(tmp_path: Path, image_server):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self):
            target = "ftp://127.0.0.1/secret.jpg" if self.path == "/ftp" else image_server.url_for("http://x/ok.jpg")
            self.send_response(302)
            self.send_header("Location", target)
            self.end_headers()

        def log_message(self, *args):
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        pq.write_table(
            pa.table({"url": [f"{base}/ftp", f"{base}/http"], "caption": ["a", "b"]}), tmp_path / "u.parquet"
        )
        cfg = make_config(tmp_path / "pool", tmp_path / "u.parquet", processes=1)
        run_download(Pool(cfg.pool), cfg.download, LocalEngine(1), progress=False)
    finally:
        server.shutdown()
    rows = Pool(cfg.pool).read_table("download").to_pylist()
    assert rows[0]["status"] == "failed_to_download"
    assert "redirect to a non-http(s) URL refused: ftp://127.0.0.1/secret.jpg" in rows[0]["error_message"]
    assert rows[1]["status"] == "success"  # http -> http redirects still work


def test_a_bad_row_far_into_a_big_file_is_named_by_its_row_in_the_file(tmp_path: Path):
    """The files are read in batches of 65,536 rows; a row number is still the file's own."""
    n = 70_000
    uids = [f"{i:032x}" for i in range(n)]
    uids[68_123] = "not-a-uid"
    captions = [b"a caption"] * n
    captions[67_000] = b"caf\xe9"  # latin-1, not UTF-8: found first, in the second batch
    table = pa.table({"url": [f"http://x/{i}.jpg" for i in range(n)], "caption": pa.array(captions, pa.binary()),
                      "uid": uids})  # fmt: skip
    pq.write_table(table, tmp_path / "big.parquet")
    _expect_input_error(tmp_path, tmp_path / "big.parquet", r"big\.parquet: row 67001: caption column 'caption' is "
                        "not valid UTF-8", uid_col="uid")  # fmt: skip
    captions[67_000] = b"cafe"
    pq.write_table(table.set_column(1, "caption", pa.array(captions, pa.binary())), tmp_path / "big.parquet")
    _expect_input_error(tmp_path, tmp_path / "big.parquet", r"big\.parquet: row 68124: uid column 'uid' holds "
                        "'not-a-uid'", uid_col="uid")  # fmt: skip


def test_a_pool_prepared_by_an_earlier_version_resumes_and_records_its_input_file(tmp_path: Path, image_server):
    """A plan without ``ingests`` (written before pools grew) is upgraded in place when its source
    is unchanged: the file is recorded, nothing is ingested again, and the flow sees no new input."""
    import json

    from flows.curate import ingest_task

    url_list = tmp_path / "urls.parquet"
    pq.write_table(point_at(laion_rows(150, offset=300), image_server), url_list)
    cfg = make_config(tmp_path / "pool", url_list, samples_per_shard=100)
    pool = Pool(cfg.pool)
    prepare(pool, cfg.download, LocalEngine(2))
    old = {k: v for k, v in pool.read_plan().items() if k != "ingests"}
    pool.plan_path.write_text(json.dumps(old))
    listed = pool.input_path.read_bytes()
    seen = ingest_task.fn(cfg, LocalEngine(1))
    assert seen["new_files"] == [] and seen["new_shards"] == [] and pool.input_path.read_bytes() == listed
    (ingest,) = pool.read_plan()["ingests"]
    assert ingest["files"][0]["path"] == str(url_list.resolve()) and ingest["files"][0]["rows"] == 150
