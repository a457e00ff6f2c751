"""Execution engines. The engine is chosen once, where a flow or CLI command starts (:func:`get_engine`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig
    from pipeline.engines.base import Engine


def get_engine(cfg: PipelineConfig, workers: int | None = None) -> Engine:
    """Build the engine a config asks for. ``workers`` overrides the stage's process count."""
    if cfg.engine == "local":
        from pipeline.engines.local import LocalEngine

        return LocalEngine(workers=workers or cfg.download.processes)
    if cfg.engine == "spark":
        from pipeline.engines.spark import SparkEngine

        return SparkEngine(cfg.spark)
    raise ValueError(f"engine: unknown engine {cfg.engine!r}; use local or spark")
