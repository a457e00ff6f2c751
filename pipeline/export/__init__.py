"""Export: a training release cut from the pool (planning per source shard, one task per output
shard); see :mod:`pipeline.export.release`."""

from pipeline.export.release import (
    ExportError,
    dataset_card,
    export,
    plan_release,
    plan_source_shard,
    write_release_shard,
)

__all__ = ["ExportError", "dataset_card", "export", "plan_release", "plan_source_shard", "write_release_shard"]
