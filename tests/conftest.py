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
    data["download"]["disallowed_header_directives"] = list(data["download"]["disallowed_header_directives"])
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


__all__ = ["REPO", "laion_rows", "make_config", "point_at", "token_for", "write_config"]
