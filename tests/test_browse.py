"""``curate browse``: the read-only web app, in a real browser (Debian's chromium driven by
Playwright) and request by request (its refusals).

The values a page shows are compared with what ``curate query`` answers for the same sample; the
pool is the dev server's 300 LAION rows, embedded (tiny CLIP), clustered, balanced, filtered with
deduplication, rebalanced, reported and indexed.
"""

from __future__ import annotations

import io
import json
import shlex
import shutil
import socket
import tarfile
import threading
import time

import pytest

from pipeline.engines.local import LocalEngine
from pipeline.query import query
from tests.conftest import REPO, STAGES_AFTER_MODE, copy_pool

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def curated(clustered, tmp_path_factory):
    from pipeline.config import FilterConfig, MetaclipConfig, RebalanceConfig
    from pipeline.filters.stage import run_filters
    from pipeline.index import build_index
    from pipeline.metaclip.stage import run_metaclip
    from pipeline.rebalance import run_rebalance
    from pipeline.report import write_report

    pool = copy_pool(clustered[0], tmp_path_factory.mktemp("browse") / "pool", STAGES_AFTER_MODE)
    run_metaclip(pool, MetaclipConfig(metadata=str(REPO / "metadata/entries.json"), t=3), LocalEngine(2),
                 progress=False)  # fmt: skip
    recipe = FilterConfig(recipe="mine", recipes={"mine": ["min_side(min=100)", "dedup"]})
    run_filters(pool, recipe, LocalEngine(2), progress=False)
    run_rebalance(pool, RebalanceConfig(t=10), LocalEngine(1))
    write_report(pool, thumbnails=6)
    build_index(pool, LocalEngine(2), progress=False)
    return pool


@pytest.fixture(scope="module")
def served(curated):
    """The app on a free loopback port, in a thread."""
    import uvicorn

    from pipeline.browse import make_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(curated), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield curated, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def _images_loaded(page) -> list[int]:  # type: ignore[no-untyped-def]
    """Every <img>'s naturalWidth once each has finished loading (0: broken)."""
    page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=30_000)
    return page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")


def _shown(page) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return dict(page.eval_on_selector_all("td.v", "els => els.map(e => [e.dataset.col, e.textContent])"))


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")
def test_the_browser_walks_from_a_drop_reason_to_a_sample_its_duplicate_and_its_cluster(served, tmp_path):
    from playwright.sync_api import sync_playwright

    pool, base = served
    dedup_dropped = query(pool, "select count(*) as n from samples where drop_reason = 'dedup' "
                                "and status = 'success'")["n"][0].as_py()  # fmt: skip
    assert dedup_dropped > 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        start = time.perf_counter()
        page.goto(f"{base}/grid")
        widths = _images_loaded(page)
        grid_seconds = time.perf_counter() - start
        assert len(widths) == 100 and all(w > 0 for w in widths)
        page.screenshot(path=str(tmp_path / "grid.png"), full_page=True)
        # filter by a drop reason, through the form
        page.select_option("select[name=reason]", "dedup")
        page.click("form button")
        page.wait_for_url("**/grid?*reason=dedup*")
        assert int(page.inner_text("b.total")) == dedup_dropped
        words = shlex.split(page.inner_text("code.export"))  # the command as the shell hands it to curate
        assert words[:2] == ["curate", "export"] and words[words.index("--where") + 1] == "drop_reason = 'dedup'"
        assert all(w > 0 for w in _images_loaded(page))
        # a sample: every score shown is curate query's
        page.click(".cell a >> nth=0")
        page.wait_for_url("**/sample/*")
        uid = page.url.rsplit("/", 1)[1]
        assert all(w > 0 for w in _images_loaded(page))
        shown = _shown(page)
        row = query(pool, f"select * from samples where uid = '{uid}'").to_pylist()[0]
        for column in ("clip_score", "min_side", "drop_reason", "dup_group", "fine_id", "metaclip_keep", "keep"):
            assert shown[column] == str(row[column]), column
        assert page.inner_text("b.reason") == "dedup"
        page.screenshot(path=str(tmp_path / "sample.png"), full_page=True)
        # its duplicate group: the group's kept sample, one click away
        page.click(f".dups a[href='/sample/{row['dup_group']}']")
        page.wait_for_url(f"**/sample/{row['dup_group']}")
        assert all(w > 0 for w in _images_loaded(page))
        # its cluster
        page.click("a.cluster")
        page.wait_for_url("**/cluster/*")
        cluster = int(page.url.rsplit("/", 1)[1])
        size = query(pool, f"select count(*) as n from samples where fine_id = {cluster}")["n"][0].as_py()
        assert int(page.inner_text("b.size")) == size
        assert all(w > 0 for w in _images_loaded(page))
        page.screenshot(path=str(tmp_path / "cluster.png"), full_page=True)
        browser.close()
    (tmp_path / "timing.json").write_text(json.dumps({"grid_100_thumbnails_s": grid_seconds}))
    print(f"grid page with 100 thumbnails loaded in {grid_seconds:.2f} s")


def _client(pool, token=None):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from pipeline.browse import make_app

    return TestClient(make_app(pool, token))


def test_a_request_never_names_a_path(curated):
    with _client(curated) as client:
        for path in ("/image/..%2F..%2Fetc%2Fpasswd", "/thumb/../../shards/00000.tar", "/report/..%2F..%2Fplan.json",
                     "/report/../input/plan.json", "/image/00000000000000000000000000000000"):  # fmt: skip
            response = client.get(path)
            assert response.status_code in (400, 404), path
            assert b"ingests" not in response.content and b"root:" not in response.content


@pytest.mark.parametrize("where", ["1=1; select 1", "(select count(*) from read_text('/etc/passwd')) > 0",
                                   "uid in (select uid from read_parquet('/etc/*.parquet'))"])
def test_a_predicate_is_one_expression_on_the_confined_connection(curated, where):
    with _client(curated) as client:
        response = client.get("/grid", params={"where": where})
    assert response.status_code == 400 and "class='error'" in response.text


def test_another_host_needs_the_token_on_every_request(curated):
    from pipeline.browse.app import app_for

    _, none = app_for(curated, "127.0.0.1")
    assert none is None
    app, token = app_for(curated, "0.0.0.0")
    assert token and len(token) >= 20
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        assert client.get("/grid").status_code == 401
        assert client.get("/grid", params={"token": "wrong"}).status_code == 401
        assert client.get("/grid", headers={"Authorization": "Bearer wrong"}).status_code == 401
        first = client.get("/grid", params={"token": token})
        assert first.status_code == 200 and "clipcurate_token" in first.headers.get("set-cookie", "")
        assert client.get("/grid").status_code == 200  # the cookie carries it
        client.cookies.clear()
        assert client.get("/thumb/" + "0" * 32).status_code == 401


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_member_scan_finds_what_the_tarfile_module_finds(tmp_path, fmt):
    from pipeline.browse.images import Images, _plain_members
    from pipeline.store.parquet import Pool

    (tmp_path / "shards").mkdir()
    path = tmp_path / "shards" / "00000.tar"
    names = ["000000000.jpg", "000000000.txt", "d" * 60 + "/" + "k" * 80 + ".jpg", "e.json", "big.bin"]
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, name in enumerate(names):
            data = bytes([i]) * (700 * i + 3)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5 + i  # a float mtime: a pax header of its own in PAX
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        expected = {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
    assert len(expected) == len(names)
    scanned = _plain_members(path)
    if fmt == tarfile.GNU_FORMAT:  # a GNU long-name header: left to the tarfile module
        assert scanned is None
    else:
        assert scanned == expected
    assert Images(Pool(tmp_path), None)._members(0) == expected
