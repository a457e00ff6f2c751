"""The embedding stage: shards still to embed (planning), open_clip image/text embeddings, CLIP
score and caption embeddings per shard. See :mod:`pipeline.embed.stage` and, for the shard reader
its data-loader workers run, :mod:`pipeline.embed.data`."""

from pipeline.embed.captions import MINILM, CaptionEncoder
from pipeline.embed.stage import (
    CAPTION_STAGE,
    STAGE,
    ClipEmbedder,
    EmbedError,
    checkpoint_sha256,
    embed_shard,
    pending_shards,
    run_embed,
    run_embed_on,
    save_random_checkpoint,
    stage_hash,
)

__all__ = ["CAPTION_STAGE", "MINILM", "STAGE", "CaptionEncoder", "ClipEmbedder", "EmbedError",
           "checkpoint_sha256", "embed_shard", "pending_shards", "run_embed", "run_embed_on",
           "save_random_checkpoint", "stage_hash"]  # fmt: skip
