"""What the filter steps share: their stage names and the digests their tables depend on (a module
of its own so that the pool-wide steps, :mod:`.image_based` and :mod:`.dedup`, and the stage that
runs them, :mod:`.stage`, import it without importing each other)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from pipeline.store.parquet import Pool

STAGE = "filters"
IMAGE_STAGE = "image_based"
DEDUP_STAGE = "dedup"
DECISION_STAGE = "decisions"
SCORES_VERSION = "1"  # bump when a score's definition changes: every shard is scored again


@functools.cache
def scores_digest() -> str:
    """What the scores depend on: their definitions, the language model, WordNet and ImageNet-21k ids."""
    from pipeline.filters.language import model_path
    from pipeline.filters.wordnet import FIRST_SYNSETS, imagenet21k_offsets

    h = hashlib.sha256(SCORES_VERSION.encode())
    for path in (model_path(), FIRST_SYNSETS):
        h.update(Path(path).read_bytes())
    h.update(",".join(map(str, sorted(imagenet21k_offsets()))).encode())
    return h.hexdigest()[:16]


def stage_digest(*parts: Any) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def embed_digest(pool: Pool) -> str:
    recorded = pool.stage_config("embed")
    return recorded["config_hash"] if recorded else "none"


