"""Shared fixtures: a loopback image server, real LAION rows pointed at it, small pools.

No test needs the network: every URL is served by :class:`pipeline.devserver.DemoImageServer` on
127.0.0.1, the way img2dataset's own tests serve their images.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from pipeline.config import PipelineConfig, parse_config
from pipeline.devserver import DemoImageServer, token_for

REPO = Path(__file__).resolve().parents[1]
LAION = REPO / "data" / "laion_10k.parquet"


@pytest.fixture(scope="session")
def image_server():
    with DemoImageServer(slow_seconds=1.5) as server:
        yield server


@pytest.fixture(scope="session")
def paced_server():
    """A server that answers every image after 30 ms, so a run lasts long enough to be killed."""
    with DemoImageServer(slow_seconds=1.5, latency_seconds=0.03) as server:
        yield server


def laion_rows(n: int, offset: int = 0) -> pa.Table:
    table = pq.read_table(LAION, columns=["URL", "TEXT"]).slice(offset, n)
    return table.rename_columns(["url", "caption"])


def point_at(table: pa.Table, server: DemoImageServer) -> pa.Table:
    """Rewrite the http(s) URLs of ``table`` to ``server``; other schemes stay as they are."""
    urls = [
        server.url_for(u) if u and u.lower().startswith(("http://", "https://")) else u
        for u in table["url"].to_pylist()
    ]
    return table.set_column(table.column_names.index("url"), "url", pa.array(urls, pa.string()))


def make_config(pool: Path, url_list: Path, **download: Any) -> PipelineConfig:
    settings = {"input": str(url_list), "samples_per_shard": 100, "timeout": 1.0, "processes": 2, "threads": 16}
    settings.update(download)
    return parse_config({"pool": str(pool), "download": settings}, "test")


def write_config(path: Path, cfg: PipelineConfig) -> Path:
    import dataclasses

    data = dataclasses.asdict(cfg)
    for section in data.values():
        if isinstance(section, dict):
            for key, value in section.items():
                if isinstance(value, tuple):
                    section[key] = list(value)
    data = {k: v for k, v in data.items() if v is not None}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def downloaded_pool(tmp_path_factory, image_server):
    """300 real LAION rows plus one ftp:// row, downloaded into a pool of 4 shards of 100."""
    from pipeline.download import run_download
    from pipeline.engines.local import LocalEngine
    from pipeline.store.parquet import Pool

    root = tmp_path_factory.mktemp("pool")
    rows = point_at(laion_rows(300), image_server)
    rows = pa.concat_tables([rows, pa.table({"url": ["ftp://example.com/a.jpg"], "caption": ["an ftp url"]})])
    url_list = root / "urls.parquet"
    pq.write_table(rows, url_list)
    cfg = make_config(root / "pool", url_list)
    run_download(Pool(cfg.pool), cfg.download, LocalEngine(2), progress=False)
    return Pool(cfg.pool), rows, cfg


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Random weights of the tiny open_clip model, saved to disk: loaded like real weights."""
    from pipeline.embed import save_random_checkpoint

    return save_random_checkpoint("clipcurate-tiny", tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", seed=0)


def embed_cfg(checkpoint: Path | str, **kw: Any):
    settings = {"model": "clipcurate-tiny", "checkpoint": str(checkpoint), "batch_size": 32, "workers": 1, **kw}
    return parse_config({"pool": "p", "download": {"input": "u"}, "embed": settings}).embed


@pytest.fixture(scope="session")
def clustered(downloaded_pool, tiny_checkpoint, tmp_path_factory):
    """A copy of the downloaded pool, embedded (tiny CLIP) and clustered (8 fine, 2 experts)."""
    import shutil

    from pipeline.embed import run_embed
    from pipeline.engines.local import LocalEngine
    from pipeline.mode import run_mode
    from pipeline.store.parquet import Pool

    pool = Pool(shutil.copytree(downloaded_pool[0].root, tmp_path_factory.mktemp("mode") / "pool"))
    run_embed(pool, embed_cfg(tiny_checkpoint, workers=0), LocalEngine(1), progress=False)
    settings = {"n_fine": 8, "n_experts": 2, "fit_fraction": 0.5, "min_fit_samples": 0}
    cfg = parse_config({"pool": "p", "download": {"input": "u"}, "mode": settings}).mode
    return pool, cfg, run_mode(pool, cfg, LocalEngine(2), progress=False)


def copy_pool(pool, dest: Path, drop: tuple[str, ...] = ()):
    """A copy of ``pool`` at ``dest`` without the tables and markers of the stages in ``drop``
    (session fixtures are shared: another test may have run a stage on them already)."""
    import shutil

    from pipeline.store.parquet import Pool

    shutil.copytree(pool.root, dest)
    for stage in drop:
        for sub in ("completions", "tables"):
            shutil.rmtree(dest / sub / stage, ignore_errors=True)
    return Pool(dest)


STAGES_AFTER_MODE = ("metaclip_match", "metaclip", "filters", "image_based", "dedup", "decisions", "rebalance")

__all__ = [
    "REPO",
    "STAGES_AFTER_MODE",
    "copy_pool",
    "embed_cfg",
    "laion_rows",
    "make_config",
    "point_at",
    "token_for",
    "write_config",
]
