"""Downloading from a web that fails and recovers, on the dev server: a retry pass of failed error
classes, per-host concurrency, ``Retry-After`` and the per-shard time limit.

What each URL gets follows from the dev server's documented rules (``fails``, ``slows``,
``kind_of``) and from the server's own records (requests in flight per host, arrival times); none
is computed by the code under test.
"""

from __future__ import annotations

import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import MetaclipConfig
from pipeline.devserver import DemoImageServer, fails, kind_of, slows, token_for
from pipeline.download import run_download
from pipeline.download.retry import run_retry
from pipeline.engines.local import LocalEngine
from pipeline.errors import UserError
from pipeline.metaclip.stage import run_metaclip
from pipeline.query import connect
from pipeline.store.parquet import Pool
from tests.conftest import laion_rows, make_config

FAIL, SLOW = 0.2, 0.15
GOOD = ("ok", "duplicate", "near_duplicate")  # kind_of: what the server answers with an image


def _members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def _table(pool: Pool, sql: str) -> list[tuple]:
    con = connect(pool)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _mtimes(pool: Pool, stage: str) -> dict[int, int]:
    return {s: pool.marker_path(stage, s).stat().st_mtime_ns for s in pool.done_shards(stage)}


@pytest.fixture()
def flaky_pool(tmp_path):
    """120 LAION rows in 3 shards of 40: shards 0 and 1 on a flaky server (503 for ``fails``, answers
    after the timeout for ``slows``), shard 2 on a steady one, with URLs it answers well; downloaded,
    then MetaCLIP run."""
    rows = laion_rows(200, offset=2000)
    steady_rows = [i for i in range(80, 200) if kind_of(token_for(rows["url"][i].as_py())) == "ok"][:40]
    rows = rows.take(list(range(80)) + steady_rows)
    listed = rows["url"].to_pylist()
    with DemoImageServer(slow_seconds=2.5, fail_share=FAIL, slow_share=SLOW) as flaky, \
            DemoImageServer(slow_seconds=2.5) as steady:  # fmt: skip
        urls = [(flaky if i < 80 else steady).url_for(u) for i, u in enumerate(listed)]
        pq.write_table(pa.table({"url": urls, "caption": rows["caption"]}), tmp_path / "u.parquet")
        (tmp_path / "entries.json").write_text(json.dumps(["the", "a", "of", "photo", "and"]))
        cfg = make_config(tmp_path / "pool", tmp_path / "u.parquet", samples_per_shard=40, timeout=1.0, max_attempts=2)
        pool = Pool(cfg.pool)
        run_download(pool, cfg.download, LocalEngine(2), progress=False)
        metaclip = MetaclipConfig(metadata=str(tmp_path / "entries.json"), t=3)
        run_metaclip(pool, metaclip, LocalEngine(2), progress=False)
        yield pool, cfg, flaky, listed, urls, metaclip


def test_a_retry_recovers_what_now_succeeds_and_keeps_earlier_successes_byte_identical(flaky_pool):
    pool, cfg, flaky, listed, urls, metaclip = flaky_pool
    tokens = [token_for(u) for u in listed]
    # what the server did, from its documented rules: 503 first, then a slow answer, on shards 0 and 1
    five = {i for i in range(80) if fails(tokens[i], FAIL) and kind_of(tokens[i]) != "missing"}
    slow = {i for i in range(80) if i not in five and kind_of(tokens[i]) == "ok" and slows(tokens[i], SLOW)}
    always_slow = {i for i in range(120) if kind_of(tokens[i]) == "slow" and i not in five}
    five_ok = {i for i in five if kind_of(tokens[i]) in GOOD}  # the others fail otherwise once served
    assert len(five_ok) >= 8 and len(slow) >= 5 and five - five_ok
    before = {u: (c, s) for u, c, s in _table(pool, "select url, error_class, status from download")}
    assert {i for i, u in enumerate(urls) if before[u][0] == "http_5xx"} == five
    assert {i for i, u in enumerate(urls) if before[u][0] == "timeout"} == slow | always_slow
    tars = {s: _members(pool.root / "shards" / f"{s:05d}.tar") for s in range(3)}
    match_before = _mtimes(pool, "metaclip_match")
    download_before = _mtimes(pool, "download")

    flaky.flaky()  # the web recovers
    result = run_retry(pool, cfg.download, LocalEngine(2), ["timeout", "http_5xx"])

    retried_shards = sorted({i // 40 for i in five | slow | always_slow})
    assert result["shards"] == retried_shards and 2 not in retried_shards
    by = result["by_class"]
    assert by["http_5xx"] == {"retried": len(five), "recovered": len(five_ok)}
    assert by["timeout"] == {"retried": len(slow | always_slow), "recovered": len(slow)}
    after = {u: (s, c, a, k) for u, s, c, a, k in _table(pool, "select url, status, error_class, attempts, key "
                                                              "from download")}  # fmt: skip
    for i, u in enumerate(urls):
        status, cls, attempts, key = after[u]
        if i in five_ok | slow:
            assert (status, attempts) == ("success", 2)
        elif i in five:
            assert status != "success" and cls != "http_5xx" and attempts == 2
        elif i in always_slow:
            assert (status, cls, attempts) == ("failed_to_download", "timeout", 2)
        else:
            assert attempts == 1 and status == before[u][1]
    # every earlier member byte-identical, the new ones under their rows' keys, nothing else
    for s in range(3):
        now = _members(pool.root / "shards" / f"{s:05d}.tar")
        assert {k: now[k] for k in tars[s]} == tars[s]
        new_keys = {after[urls[i]][3] for i in five_ok | slow if i // 40 == s}
        assert {n.split(".")[0] for n in set(now) - set(tars[s])} == new_keys
        for key in new_keys:
            assert json.loads(now[f"{key}.json"])["key"] == key
            assert now[f"{key}.jpg"][:2] == b"\xff\xd8"
    # only the retried shards were rewritten; their later stages are redone, the others' are not
    download_now = _mtimes(pool, "download")
    assert [s for s in range(3) if download_now[s] != download_before[s]] == retried_shards
    assert sorted(pool.done_shards("metaclip_match")) == [2]
    run_metaclip(pool, metaclip, LocalEngine(2), progress=False)
    match_now = _mtimes(pool, "metaclip_match")
    assert match_now[2] == match_before[2]
    assert all(match_now[s] != match_before[s] for s in retried_shards)

    # nothing left below max_attempts (2): a second pass changes nothing
    files = {p.name: p.read_bytes() for p in (pool.root / "shards").iterdir()}
    again = run_retry(pool, cfg.download, LocalEngine(2), ["timeout", "http_5xx"])
    assert again == {"shards": [], "by_class": {}}
    assert {p.name: p.read_bytes() for p in (pool.root / "shards").iterdir()} == files
    assert _mtimes(pool, "download") == download_now


def test_a_retried_tar_reads_as_webdataset_in_the_tables_key_order(flaky_pool):
    import webdataset as wds

    pool, cfg, flaky, *_ = flaky_pool
    flaky.flaky()
    run_retry(pool, cfg.download, LocalEngine(2), ["http_5xx"])
    for s in range(2):
        keys = [x["__key__"] for x in wds.WebDataset(str(pool.root / "shards" / f"{s:05d}.tar"), shardshuffle=False)]
        ok = sorted(k for (k,) in _table(pool, f"select key from download where shard = {s} and status = 'success'"))
        assert sorted(keys) == ok and len(set(keys)) == len(keys)


def test_a_retry_refuses_classes_that_are_never_retried_or_unknown(flaky_pool):
    pool, cfg, *_ = flaky_pool
    with pytest.raises(UserError, match="'opted_out' is never retried"):
        run_retry(pool, cfg.download, LocalEngine(2), ["opted_out"])
    with pytest.raises(UserError, match="'timeouts' is not an error class"):
        run_retry(pool, cfg.download, LocalEngine(2), "timeouts,http_5xx")


def test_curate_download_retry_on_a_pool_directory(flaky_pool, capsys):
    from pipeline.cli import main

    pool, _, flaky, *_ = flaky_pool
    flaky.flaky()
    assert main(["download", str(pool.root), "--retry", "http_5xx"]) == 0
    out = capsys.readouterr().out
    assert "retry: " in out and "recovered" in out and "http_5xx " in out
    assert main(["download", str(pool.root), "--retry", "http_5xx"]) == 0
    assert "no row to retry" in capsys.readouterr().out


def test_requests_in_flight_per_host_stay_within_the_limit(tmp_path):
    rows = laion_rows(48, offset=3000)
    with DemoImageServer(latency_seconds=0.3) as server:
        ok = [server.url_for(u) for u in rows["url"].to_pylist() if kind_of(token_for(u)) == "ok"]
        urls = [u if i % 2 else u.replace("127.0.0.1", "localhost") for i, u in enumerate(ok)]
        pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]}), tmp_path / "u.parquet")
        free = make_config(tmp_path / "free", tmp_path / "u.parquet", samples_per_shard=100, threads=12)
        run_download(Pool(free.pool), free.download, LocalEngine(1), progress=False)
        unlimited = server.max_in_flight
        server._server.max_in_flight.clear()
        cfg = make_config(tmp_path / "pool", tmp_path / "u.parquet", samples_per_shard=100, threads=12,
                          per_host_concurrency=2)  # fmt: skip
        run_download(Pool(cfg.pool), cfg.download, LocalEngine(1), progress=False)
        limited = server.max_in_flight
    assert unlimited["127.0.0.1"] > 2 and unlimited["localhost"] > 2  # the limit is what holds it below
    assert limited == {"127.0.0.1": 2, "localhost": 2}
    assert _table(Pool(cfg.pool), "select count(*) from download where status = 'success'")[0][0] == len(urls)


def test_retry_after_is_honoured_within_its_bound(tmp_path):
    rows = laion_rows(6, offset=3100)
    with DemoImageServer() as server:
        urls = [f"{server.base_url}/busy/1/{token_for(u)}.jpg" for u in rows["url"].to_pylist()]
        pq.write_table(pa.table({"url": urls, "caption": rows["caption"]}), tmp_path / "u.parquet")
        cfg = make_config(tmp_path / "pool", tmp_path / "u.parquet", retry_after_max=5)
        run_download(Pool(cfg.pool), cfg.download, LocalEngine(1), progress=False)
        arrivals = server.arrivals
        server._server.arrivals.clear()
        off = make_config(tmp_path / "off", tmp_path / "u.parquet", retry_after_max=0)
        run_download(Pool(off.pool), off.download, LocalEngine(1), progress=False)
    for u in rows["url"].to_pylist():
        first, second = arrivals[token_for(u)]
        assert second - first >= 1.0  # the server's own clock: it asked for 1 s
    assert {s for (s,) in _table(Pool(cfg.pool), "select status from download")} == {"success"}
    assert {c for (c,) in _table(Pool(off.pool), "select error_class from download")} == {"http_429"}
