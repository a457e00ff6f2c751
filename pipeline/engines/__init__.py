"""Execution engines. The engine is chosen once, where a flow or CLI command starts (:func:`get_engine`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.errors import UserError

if TYPE_CHECKING:
    from pathlib import Path

    from pipeline.config import PipelineConfig
    from pipeline.engines.base import Engine


def get_engine(cfg: PipelineConfig, workers: int | None = None) -> Engine:
    """Build the engine a config asks for. ``workers`` overrides the stage's process count."""
    if cfg.engine == "local":
        from pathlib import Path

        from pipeline.engines.local import LocalEngine

        spill = cfg.duckdb.temp_directory or _pool_spill(Path(cfg.pool))
        return LocalEngine(workers=workers or cfg.download.processes, memory_limit=cfg.duckdb.memory_limit,
                           temp_directory=spill, threads=cfg.duckdb.threads)  # fmt: skip
    if cfg.engine == "spark":
        from pipeline.engines.spark import SparkEngine

        return SparkEngine(cfg.spark)
    raise UserError(f"engine: unknown engine {cfg.engine!r}; use local or spark")


def _pool_spill(root: Path) -> str | None:
    """DuckDB's spill folder: inside the pool (its disk, not /tmp), or, for a pool this process may
    not write (a reader of a read-only pool), None: the engine's private folder under the temp dir."""
    import os

    staging = root / "_staging"
    writable = os.access(staging if staging.exists() else root if root.exists() else root.parent, os.W_OK)
    return str(staging / "duckdb") if writable else None
