"""The embedding stage: open_clip image/text embeddings and CLIP score (:class:`Embed`, a streaming
step), or published vectors imported (:mod:`pipeline.embed.imported`), then caption embeddings
(:class:`CaptionEmbed`); :func:`run_embed` runs them with the configured engine. The images' reader
is :mod:`pipeline.store.images`."""

from pipeline.embed.captions import CAPTION_STAGE, MINILM, STAGE, CaptionEmbed, CaptionEncoder
from pipeline.embed.stage import (
    ClipEmbedder,
    Embed,
    EmbedError,
    checkpoint_sha256,
    embed_steps,
    pending_shards,
    run_embed,
    save_random_checkpoint,
    stage_hash,
)

__all__ = ["CAPTION_STAGE", "MINILM", "STAGE", "CaptionEmbed", "CaptionEncoder", "ClipEmbedder", "Embed",
           "EmbedError", "checkpoint_sha256", "embed_steps", "pending_shards", "run_embed", "save_random_checkpoint",
           "stage_hash"]  # fmt: skip
