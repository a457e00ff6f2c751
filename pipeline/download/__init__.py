"""The download stage: the URL list prepared into shards (planning), each shard fetched by
img2dataset's own downloader (per shard). See :mod:`pipeline.download.stage`."""

from pipeline.download.stage import (
    STAGE,
    Download,
    InputError,
    check_where,
    plan_shards,
    prepare,
    read_url_list,
    run_download,
    stage_hash,
)

__all__ = ["STAGE", "Download", "InputError", "check_where", "plan_shards", "prepare", "read_url_list",
           "run_download", "stage_hash"]  # fmt: skip
