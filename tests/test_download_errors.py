"""Why downloads failed (``error_class``) and the early warning of a run going badly, on the dev server.

The expected class of every row follows from what the dev server does with its URL (its documented
``kind_of``: 404, truncated JPEG, HTML page, slow answer), a port nothing listens on, and a URL
that is not http(s); none is computed by the classifier under test.
"""

from __future__ import annotations

import logging
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.devserver import DemoImageServer, fails, kind_of, token_for
from pipeline.download import run_download
from pipeline.engines.local import LocalEngine
from pipeline.query import connect, format_stats, stats
from pipeline.store.parquet import Pool
from tests.conftest import laion_rows, make_config

EXPECTED = {"ok": None, "duplicate": None, "near_duplicate": None, "missing": "http_4xx", "truncated": "decode",
            "not_image": "decode", "slow": "timeout"}  # fmt: skip


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_failed_row_gets_its_error_class(tmp_path, image_server):
    rows = laion_rows(400, offset=7000)
    listed = rows["url"].to_pylist()
    web = [u.lower().startswith(("http://", "https://")) for u in listed]
    urls = [image_server.url_for(u) if ok else u for u, ok in zip(listed, web, strict=True)]
    expected = [EXPECTED[kind_of(token_for(u))] if ok else "invalid_url" for u, ok in zip(listed, web, strict=True)]
    refused = f"http://127.0.0.1:{_closed_port()}/img/0000000000000000.jpg"
    urls += [refused, "ftp://example.com/a.jpg"]
    expected += ["connect", "invalid_url"]
    captions = [*rows["caption"].to_pylist(), "refused", "ftp"]
    pq.write_table(pa.table({"url": urls, "caption": captions}), tmp_path / "u.parquet")
    cfg = make_config(tmp_path / "pool", tmp_path / "u.parquet", samples_per_shard=200, timeout=1.0)
    pool = Pool(cfg.pool)
    run_download(pool, cfg.download, LocalEngine(2), progress=False)
    con = connect(pool)
    got = dict(con.execute("select url, error_class from download").fetchall())
    con.close()
    assert [got[u] for u in urls] == expected
    assert {"http_4xx", "decode", "timeout", "connect", "invalid_url"} <= set(expected)
    report = stats(pool)["stages"]["download"]
    want = {c: expected.count(c) for c in set(expected) if c}
    assert report["error_classes"] == want
    markers = pool.completed("download")
    assert {k: sum(m["counts"].get(f"error:{k}", 0) for m in markers.values()) for k in want} == want
    assert "failed, by error class: " in format_stats(stats(pool))


def test_a_run_going_badly_is_warned_about_once_with_its_top_error_classes(tmp_path, caplog):
    rows = laion_rows(300, offset=8000)
    with DemoImageServer(fail_share=0.8) as server:
        urls = [server.url_for(u) for u in rows["url"].to_pylist()]
        pq.write_table(pa.table({"url": urls, "caption": rows["caption"]}), tmp_path / "u.parquet")
        cfg = make_config(tmp_path / "pool", tmp_path / "u.parquet", samples_per_shard=50, warn_min_samples=100)
        with caplog.at_level(logging.WARNING, logger="pipeline.download.stage"):
            run_download(Pool(cfg.pool), cfg.download, LocalEngine(2), progress=False)
    failing = sum(fails(token_for(u), 0.8) for u in rows["url"].to_pylist())
    assert failing > 200
    warnings = [r.getMessage() for r in caplog.records if "succeeded" in r.getMessage()]
    assert len(warnings) == 1, warnings
    line = warnings[0]
    assert "download.warn_success_rate" in line and "http_5xx" in line and "retry" in line
    first = line.split("top errors: ")[1]
    assert first.startswith("http_5xx")


def test_a_healthy_run_is_not_warned_about(tmp_path, image_server, caplog):
    rows = laion_rows(200, offset=9000)
    pq.write_table(pa.table({"url": [image_server.url_for(u) for u in rows["url"].to_pylist()],
                             "caption": rows["caption"]}), tmp_path / "u.parquet")  # fmt: skip
    cfg = make_config(tmp_path / "pool", tmp_path / "u.parquet", samples_per_shard=50, warn_min_samples=50)
    with caplog.at_level(logging.WARNING, logger="pipeline.download.stage"):
        run_download(Pool(cfg.pool), cfg.download, LocalEngine(2), progress=False)
    assert not [r for r in caplog.records if "succeeded" in r.getMessage()]


@pytest.mark.parametrize(("limits", "said"), [({"deadline": 2.0}, "download.deadline (2 s)"),
                                              ({"deadline": None, "shard_time_limit": 4.0},
                                               "download.shard_time_limit")])  # fmt: skip
def test_a_trickling_server_ends_as_stalled_within_the_limit(tmp_path, image_server, limits, said):
    """Each read of a trickling answer gets bytes within ``timeout``, so only the whole-response
    deadline, or the shard's time limit, ends it: the rows are ``stalled``, the others download,
    every sample in the tar is one the table says succeeded, and the run finishes."""
    import tarfile
    import time

    from pipeline.devserver import image_bytes

    rows = laion_rows(40, offset=9500)
    listed = rows["url"].to_pylist()
    # three whose image takes over 10 s at 64 bytes per 0.1 s
    trickle = set(sorted(i for i, u in enumerate(listed) if len(image_bytes(int(token_for(u), 16))) > 6400)[:3])
    assert len(trickle) == 3
    urls = [f"{image_server.base_url}/trickle/{token_for(u)}.jpg" if i in trickle else image_server.url_for(u)
            for i, u in enumerate(listed)]  # fmt: skip
    pq.write_table(pa.table({"url": urls, "caption": rows["caption"]}), tmp_path / "u.parquet")
    cfg = make_config(tmp_path / "pool", tmp_path / "u.parquet", samples_per_shard=20, timeout=1.0, **limits)
    start = time.monotonic()
    run_download(Pool(cfg.pool), cfg.download, LocalEngine(2), progress=False)
    took = time.monotonic() - start
    con = connect(Pool(cfg.pool))
    got = {u: (s, c, e) for u, s, c, e in con.execute("select url, status, error_class, error_message "
                                                      "from download").fetchall()}  # fmt: skip
    ok = {(shard, key) for shard, key in con.execute("select shard, key from download where status = 'success'")
          .fetchall()}  # fmt: skip
    con.close()
    for i in trickle:
        status, cls, message = got[urls[i]]
        assert (status, cls) == ("failed_to_download", "stalled") and said in message
    normal = [got[u] for i, u in enumerate(urls) if i not in trickle and kind_of(token_for(listed[i])) == "ok"]
    assert normal and all(s == "success" for s, _, _ in normal), [(i // 20, got[u]) for i, u in enumerate(urls)]
    assert took < 30  # a trickled image takes minutes at 64 bytes per 0.1 s
    in_tars = set()
    for shard in (0, 1):
        with tarfile.open(Pool(cfg.pool).root / "shards" / f"{shard:05d}.tar") as tar:
            in_tars |= {(shard, m.name.split(".")[0]) for m in tar}
    assert in_tars == ok
