"""The HTML report, rendered in headless Chromium: every plot and thumbnail loads."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess

import pytest

from pipeline.engines.local import LocalEngine
from tests.conftest import REPO, STAGES_AFTER_MODE, copy_pool

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def reported(clustered, tmp_path_factory):
    """The clustered pool, balanced by MetaCLIP, filtered, rebalanced and exported; then reported."""
    from pipeline.config import ExportConfig, FilterConfig, MetaclipConfig, RebalanceConfig
    from pipeline.engines.local import LocalEngine
    from pipeline.export import export
    from pipeline.filters.stage import run_filters
    from pipeline.metaclip.stage import run_metaclip
    from pipeline.rebalance import run_rebalance
    from pipeline.report import write_report

    work = tmp_path_factory.mktemp("report")
    pool = copy_pool(clustered[0], work / "pool", STAGES_AFTER_MODE)
    run_metaclip(
        pool, MetaclipConfig(metadata=str(REPO / "metadata/entries.json"), t=3), LocalEngine(2), progress=False
    )
    run_filters(pool, FilterConfig(recipe="basic"), LocalEngine(2), progress=False)
    run_rebalance(pool, RebalanceConfig(t=10), LocalEngine(1))
    export(pool, ExportConfig(out=str(work / "release"), where="keep"), engine=LocalEngine(1))
    return pool, write_report(pool, thumbnails=6, release=work / "release")


def test_report_holds_every_section(reported):
    pool, page = reported
    text = page.read_text()
    assert page == pool.root / "report" / "index.html"
    for png in ("funnel.png", "clip_score.png", "metaclip_entries.png", "cluster_sizes.png"):
        assert f"src='{png}'" in text and (page.parent / png).stat().st_size > 5000
    assert "filter: min_side" in text and "download: http_4xx" in text  # the dev server's 404s, by error class
    assert "release (export)" in text and "MetaCLIP balanced" in text
    assert text.count("class='thumb'") == 12  # 6 kept, 6 dropped, each with its caption
    assert "Samples dropped" in text


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")
def test_report_renders_in_headless_chromium(reported, tmp_path):
    _, page = reported
    run = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run([*run, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    images = re.findall(r"<img class=\"(plot|thumb)\"[^>]*data-ok=\"([01])\"", dom)
    assert len([i for i in images if i[0] == "plot"]) == 4 and len(images) == 16
    assert all(ok == "1" for _, ok in images), images  # every image loaded and decoded in the browser
    shot = tmp_path / "report.png"
    subprocess.run([*run, f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri()], capture_output=True,
                   timeout=120, check=True)  # fmt: skip
    from PIL import Image

    pixels = Image.open(shot).convert("L").resize((60, 150))
    dark = sum(1 for p in pixels.getdata() if p < 200)
    assert dark > 500  # plots and text, not a blank page


def test_funnel_is_monotone_and_ends_at_the_release_of_every_keep(reported, tmp_path):
    """Each funnel line is a subset of the one above, and the last is what a release of
    `metaclip_keep and keep and rebalance_keep` (every stage's keep, the flow's default) holds."""
    from pipeline.config import ExportConfig
    from pipeline.export import export
    from pipeline.query import connect
    from pipeline.report import funnel

    pool, _ = reported
    con = connect(pool)
    columns = {row[0] for row in con.execute("describe samples").fetchall()}
    steps = funnel(pool, con, columns)
    assert [s for s, _ in steps][-3:] == ["MetaCLIP balanced", "filter recipe", "rebalanced"]
    counts = [n for _, n in steps]
    assert all(a >= b for a, b in itertools.pairwise(counts)) and counts[-1] > 0, steps
    manifest = export(pool, ExportConfig(out=str(tmp_path / "r"), where="metaclip_keep and keep and rebalance_keep"),
        engine=LocalEngine(1))
    assert manifest["counts"]["samples"] == counts[-1]
