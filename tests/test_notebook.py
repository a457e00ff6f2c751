"""notebooks/explore.ipynb runs top to bottom on a curated pool (nbclient, a real kernel)."""

from __future__ import annotations

import os

import pytest

from tests.conftest import REPO, STAGES_AFTER_MODE, copy_pool

pytestmark = pytest.mark.slow


def test_explore_notebook_executes(clustered, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    from pipeline.config import FilterConfig
    from pipeline.engines.local import LocalEngine
    from pipeline.filters.stage import run_filters

    pool = copy_pool(clustered[0], tmp_path / "pool", STAGES_AFTER_MODE)
    run_filters(pool, FilterConfig(recipe="basic"), LocalEngine(2), progress=False)
    nb = nbformat.read(REPO / "notebooks" / "explore.ipynb", as_version=4)
    os.environ["CLIPCURATE_POOL"] = str(pool.root)
    try:
        NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        del os.environ["CLIPCURATE_POOL"]
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "'samples': 301" in text  # the last cell's summary: the pool's 301 rows
    assert "min_side" in text  # a drop reason of the basic recipe
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the CLIP-score and image-size plots
