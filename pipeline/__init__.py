"""clipcurate: curate CLIP training sets from raw web image-text pairs.

Public API re-exports only. Heavy modules (img2dataset, duckdb, torch) are imported lazily by the
functions that need them, so ``import pipeline`` stays fast.
"""

from pipeline.config import (
    DemoConfig,
    DownloadConfig,
    DuckdbConfig,
    EmbedConfig,
    ExportConfig,
    FilterConfig,
    FlowConfig,
    MetaclipConfig,
    ModeConfig,
    PipelineConfig,
    RebalanceConfig,
    SparkConfig,
    load_config,
)
from pipeline.store.parquet import Pool

__all__ = [
    "DemoConfig",
    "DownloadConfig",
    "DuckdbConfig",
    "EmbedConfig",
    "ExportConfig",
    "FilterConfig",
    "FlowConfig",
    "MetaclipConfig",
    "ModeConfig",
    "PipelineConfig",
    "Pool",
    "RebalanceConfig",
    "SparkConfig",
    "load_config",
]
__version__ = "0.1.0"
