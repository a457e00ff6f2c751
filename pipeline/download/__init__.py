"""The download stage: the URL list prepared into shards (planning), each shard fetched by
img2dataset's own downloader (per shard). See :mod:`pipeline.download.stage`."""

from pipeline.download.stage import (
    STAGE,
    InputError,
    check_where,
    download_shard,
    plan_shards,
    prepare,
    read_url_list,
    run_download,
    stage_hash,
)

__all__ = ["STAGE", "InputError", "check_where", "download_shard", "plan_shards", "prepare", "read_url_list",
           "run_download", "stage_hash"]  # fmt: skip
