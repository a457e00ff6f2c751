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
    raise NotImplementedError(
        f"engine {cfg.engine!r} is not available yet; use engine: local (the Spark engine is issue 8)"
    )
