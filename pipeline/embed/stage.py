"""Embedding stage: open_clip image and text embeddings, CLIP score, and caption embeddings.

``clip_score`` is DataComp's: the cosine similarity of the L2-normalised image and text embeddings
of a pair, in [-1, 1] (DataComp, Sec. 3.4 and ``baselines``; its thresholds, e.g. 0.28 for
LAION-2B's ViT-B/32 filter or 0.3 for ViT-L/14, are on this scale; some tools report 100 x cos).

Two steps (:mod:`pipeline.core.step`): :class:`Embed`, a streaming step whose images the runner
reads straight from the pool's tar shards through the safe reader, decoded and preprocessed
(open_clip's own validation transform) in ``workers`` spawned processes while the model runs, so
decoding overlaps compute (:func:`pipeline.core.runner.run_stream`); and :class:`CaptionEmbed`,
a function of the embed table's rows and their captions. The shard stays the unit of work and
resume.

Weights are never downloaded: ``checkpoint`` is a local file, loaded with open_clip's own
``pretrained=<path>`` code path; tests and the demo save a small random-weight model to disk and
load it the same way (:func:`save_random_checkpoint`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline.config import EmbedConfig, ScorerConfig
from pipeline.core import runner
from pipeline.core.step import IMAGES, Read, Step
from pipeline.embed.captions import STAGE, CaptionEmbed, offline, resolve_device
from pipeline.errors import UserError
from pipeline.store import schema as S
from pipeline.store.parquet import Pool, weights_sha256

if TYPE_CHECKING:
    from pipeline.engines.base import Engine

MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "model_configs"


class EmbedError(UserError, ValueError):
    """The embedding model cannot be set up; the message says which file or name and what to do."""


def checkpoint_sha256(path: str | Path) -> str:
    """The checkpoint's sha256, hashed once per process while the file is unchanged."""
    return weights_sha256(path)


def check_checkpoint(model: str, checkpoint: str) -> Path:
    """The checkpoint as a path, or an :class:`EmbedError` saying which file was expected and how to
    get it. A hub tag (``laion2b_s34b_b79k``) fails here at once instead of after minutes of retries."""
    path = Path(checkpoint)
    if path.is_file():
        return path
    how = (
        f"Download the weights on a machine with internet, e.g. `huggingface-cli download "
        f"<repo of {model}> open_clip_model.safetensors` (open_clip's `list_pretrained()` names the repos), "
        f"copy the file here and set embed.checkpoint to its path."
    )
    if not path.suffix and "/" not in checkpoint and "\\" not in checkpoint:
        raise EmbedError(
            f"embed.checkpoint {checkpoint!r} looks like a hub tag; clipcurate never downloads weights. {how}"
        )
    raise EmbedError(f"embed.checkpoint: {path} not found: expected open_clip weights for {model} "
                     f"(.safetensors, .bin or .pt). {how}")  # fmt: skip


def _open_clip() -> Any:
    offline()
    import open_clip

    open_clip.add_model_config(MODEL_CONFIGS)  # clipcurate-tiny and any config shipped beside it
    return open_clip


def save_random_checkpoint(model: str, path: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised ``model`` to ``path`` (safetensors), for tests and the demo."""
    import torch
    from safetensors.torch import save_file

    open_clip = _open_clip()
    torch.manual_seed(seed)
    net = open_clip.create_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return path


class ClipEmbedder:
    """An open_clip model loaded once by :meth:`setup`; turns pixels and captions into L2-normalised
    embeddings and DataComp's ``clip_score``."""

    def __init__(self, cfg: EmbedConfig):
        self.cfg = cfg
        self.model: Any = None
        self.preprocess: Any = None
        self.tokenizer: Any = None
        self.device = "cpu"
        self.checkpoint_sha256 = ""
        self.input_dtype: Any = None  # the pixels' dtype: the low precision's, or None (fp32)

    def setup(self) -> ClipEmbedder:
        if self.model is not None:
            return self
        path = check_checkpoint(self.cfg.model, self.cfg.checkpoint)
        from pipeline.loads import note_load

        note_load("open_clip")
        open_clip = _open_clip()
        import torch

        if self.cfg.model not in open_clip.list_models():
            raise EmbedError(f"embed.model: unknown open_clip architecture {self.cfg.model!r}")
        if self.cfg.threads is not None:
            torch.set_num_threads(self.cfg.threads)
        self.device = resolve_device(self.cfg.device)
        precision = self.cfg.precision
        if precision == "auto":
            precision = "fp16" if self.device.startswith("cuda") else "fp32"
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                self.cfg.model, pretrained=str(path), precision=precision, device=self.device
            )
        except (RuntimeError, AssertionError, KeyError) as exc:  # weights of another architecture
            raise EmbedError(f"embed.checkpoint: {path} does not fit {self.cfg.model}: {exc}") from None
        self.model, self.preprocess = model.eval(), preprocess
        # fp16/bf16 are open_clip's mixed precision: the convolutions and linear layers in the low
        # precision, the norms and embeddings in fp32; the pixels go in as the convolution's dtype
        # (not the first parameter's, an fp32 embedding: the input then clashes with the conv)
        self.input_dtype = open_clip.get_input_dtype(precision)
        self.tokenizer = open_clip.get_tokenizer(self.cfg.model)
        self.checkpoint_sha256 = checkpoint_sha256(path)
        return self

    @property
    def dim(self) -> int:
        return (
            int(self.model.text_projection.shape[1])
            if hasattr(self.model, "text_projection")
            else int(self.model.visual.output_dim)
        )

    def encode_images(self, pixels: Any) -> np.ndarray:
        import torch

        with torch.inference_mode():
            pixels = pixels.to(self.device, dtype=self.input_dtype or torch.float32, non_blocking=True)
            feats = self.model.encode_image(pixels, normalize=True)
        return feats.float().cpu().numpy()

    def encode_texts(self, captions: list[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            tokens = self.tokenizer(captions).to(self.device)
            feats = self.model.encode_text(tokens, normalize=True)
        return feats.float().cpu().numpy()


# --- the stage -------------------------------------------------------------------------------------


def stage_hash(cfg: EmbedConfig, weights_sha256: str, scorer_sha256: tuple[str, ...] = (),
               watermark_sha256: str | None = None, text: bool = True) -> str:  # fmt: skip
    """What the embed tables depend on: model, weights (by content), precision, caption encoder,
    each further scorer's model and weights (``scorer_sha256``, in ``cfg.scorers``' order), the
    watermark detector's (``watermark_sha256``: its architecture and weights) and whether the text
    tower ran."""
    blob = f"{cfg.model}|{weights_sha256}|{cfg.precision}|{cfg.caption_model}|{cfg.max_image_pixels}"
    for scorer, sha in zip(cfg.scorers, scorer_sha256, strict=True):  # none: the digest of a pool made before
        blob += f"|{scorer.name}:{scorer.model}:{sha}"
    if watermark_sha256 is not None:  # none: the digest of a pool made before
        blob += f"|watermark:{watermark_sha256}"
    if not text:  # with it: the digest of a pool made before
        blob += "|text:off"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _embed_batch(embedder: ClipEmbedder, batch: dict[str, Any], dim: int,
                 text: bool = True) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The batch's image embeddings (zeros where an image did not decode) and, with ``text``, its
    captions' (zeros without: the text tower is not run)."""
    n = len(batch["uid"])
    image = np.zeros((n, dim), np.float32)
    ok = [i for i, e in enumerate(batch["error"]) if e is None]
    if ok:
        image[ok] = embedder.encode_images(batch["pixels"][ok])
    captions = embedder.encode_texts(batch["caption"]) if n and text else np.zeros((n, dim), np.float32)
    return image, captions


def _watermark_batch(detector: Any, errors: list[str | None], pixels: Any) -> np.ndarray:
    """P(watermark) of a batch's decoded images (0 in the slots of those that failed: masked later)."""
    out = np.zeros(len(errors), np.float32)
    ok = [i for i, e in enumerate(errors) if e is None]
    if ok:
        out[ok] = detector.score(pixels[ok])
    return out


IMAGES_READ = Read("download", (S.UID, S.CAPTION), kind=IMAGES, name="images")


class Embed(Step):
    """open_clip's image and text embeddings of a shard's tar and DataComp's ``clip_score`` (a
    streaming step: the runner's data loader decodes the images while :meth:`encode` runs the model
    on each batch; ``__call__`` puts the shard's rows in tar order and stores them as float16). Each
    further scorer (``embed.scorers``) gets the same decoded image in its own preprocessing and adds
    its cosine, ``clip_score_<name>``; so does LAION's watermark detector (``embed.watermark``:
    ``watermark``, :mod:`pipeline.quality.watermark`)."""

    name = STAGE
    sized = staticmethod(S.embed_schema)
    sized_column = S.IMAGE_EMBEDDING
    one_model = True

    def __init__(self, cfg: EmbedConfig, weights_sha256: str, scorer_sha256: tuple[str, ...] = (),
                 watermark_sha256: str | None = None, text: bool = True):  # fmt: skip
        digest = stage_hash(cfg, weights_sha256, scorer_sha256, watermark_sha256, text)
        super().__init__(reads=(IMAGES_READ,), digest=digest)
        self.cfg, self.text = cfg, text
        self.batch_size, self.workers, self.max_pixels = cfg.batch_size, cfg.workers, cfg.max_image_pixels
        self.device, self.threads = cfg.device, cfg.threads  # not in the digest: they key the set-up model
        self.devices = cfg.devices
        self._ids = (weights_sha256, scorer_sha256, watermark_sha256)
        self._embedder: ClipEmbedder | None = None
        self._scorers: list[tuple[str, ClipEmbedder]] = []
        self._watermark: Any = None

    @property
    def pin_memory(self) -> bool:  # a property: the step's key (its scalar attributes) is the same after setup
        """On CUDA the loader pins each batch, and :meth:`ClipEmbedder.encode_images` copies it
        with ``non_blocking=True``."""
        return self._embedder is not None and self._embedder.device.startswith("cuda")

    def on_device(self, device: str) -> Embed:
        import dataclasses

        cfg = dataclasses.replace(self.cfg, device=device, devices=())
        return Embed(cfg, *self._ids, text=self.text)  # the same digest: the device is not in it

    def setup(self) -> None:
        if self._embedder is None:
            self._embedder = ClipEmbedder(self.cfg).setup()
            self._scorers = [(s.name, ClipEmbedder(scorer_config(self.cfg, s)).setup()) for s in self.cfg.scorers]
            if self.cfg.watermark is not None:
                from pipeline.quality.watermark import WatermarkDetector

                self._watermark = WatermarkDetector(self.cfg.watermark, self._embedder.device).setup()

    def schema_of(self, out: pa.Table) -> pa.Schema:
        return S.embed_schema(out.schema.field(S.IMAGE_EMBEDDING).type.list_size, tuple(n for n, _ in self._scorers),
                              self._watermark is not None)  # fmt: skip

    def _models(self) -> list[Any]:
        """Every model fed the decoded image, in the order of the data loader's tuple of tensors."""
        assert self._embedder is not None
        return [self._embedder, *(e for _, e in self._scorers), *([self._watermark] if self._watermark else [])]

    def transform(self) -> Any:
        models = self._models()
        if len(models) == 1:
            return models[0].preprocess
        from pipeline.store.images import Preprocessings

        return Preprocessings(tuple(m.preprocess for m in models))  # one decode, one preprocessing per model

    def encode(self, batch: dict[str, Any]) -> pa.Table:
        assert self._embedder is not None
        pixels = batch["pixels"]  # None when no image of the batch decoded; a tuple (one per model) with several
        n_models = len(self._models())
        per_model = pixels if n_models > 1 and pixels is not None else (pixels,) * n_models
        dim = self._embedder.dim
        image, text = _embed_batch(self._embedder, {**batch, "pixels": per_model[0]}, dim, self.text)
        rows = {"index": pa.array(batch["index"], pa.int64()), S.UID: pa.array(batch["uid"], pa.string()),
                S.DECODE_ERROR: pa.array(batch["error"], pa.string()),
                S.IMAGE_EMBEDDING: S.vector_column(image, dtype=np.float32),
                S.TEXT_EMBEDDING: S.vector_column(text, dtype=np.float32)}  # fmt: skip
        for i, (name, scorer) in enumerate(self._scorers, start=1):
            img, txt = _embed_batch(scorer, {**batch, "pixels": per_model[i]}, scorer.dim)
            rows[f"{S.SCORER_PREFIX}{name}"] = pa.array((img * txt).sum(axis=1).astype(np.float32))
        if self._watermark is not None:
            rows[S.WATERMARK] = pa.array(_watermark_batch(self._watermark, batch["error"], per_model[-1]))
        return pa.table(rows)

    def __call__(self, inputs: dict[str, pa.Table]) -> pa.Table:
        assert self._embedder is not None
        rows = inputs["images"]
        rows = rows.take(np.argsort(rows["index"].to_numpy(), kind="stable"))
        n, sha = rows.num_rows, self._embedder.checkpoint_sha256
        image, text = S.vectors(rows[S.IMAGE_EMBEDDING]), S.vectors(rows[S.TEXT_EMBEDDING])
        valid = rows[S.DECODE_ERROR].is_null().to_numpy(zero_copy_only=False)
        score = (image * text).sum(axis=1).astype(np.float32)
        scored = valid & self.text  # without the text tower: no caption vector, no clip_score
        out = {S.UID: rows[S.UID], S.IMAGE_EMBEDDING: S.vector_column(image, valid),
               S.TEXT_EMBEDDING: S.vector_column(text, None if self.text else scored),
               S.CLIP_SCORE: pa.array(score, pa.float32(), mask=~scored), S.DECODE_ERROR: rows[S.DECODE_ERROR],
               S.MODEL: pa.array([self.cfg.model] * n, pa.string()),
               S.CHECKPOINT_SHA256: pa.array([sha] * n, pa.string())}  # fmt: skip
        extra = [f"{S.SCORER_PREFIX}{name}" for name, _ in self._scorers]
        for column in [*extra, *([S.WATERMARK] if self._watermark is not None else [])]:
            out[column] = pa.array(rows[column].to_numpy(zero_copy_only=False), pa.float32(), mask=~valid)
        return pa.table(out)

    def counts(self, out: pa.Table) -> dict[str, int]:
        errors = out.num_rows - int(pa.compute.count(out[S.DECODE_ERROR], mode="only_null").as_py())
        return {"samples": out.num_rows, "embedded": out.num_rows - errors, "decode_errors": errors}


def scorer_config(cfg: EmbedConfig, scorer: ScorerConfig) -> EmbedConfig:
    """A further scorer's model as an embed config: its model and weights, the stage's precision,
    device and threads."""
    return EmbedConfig(model=scorer.model, checkpoint=scorer.checkpoint, precision=cfg.precision, device=cfg.device,
                       threads=cfg.threads, caption_model=None)  # fmt: skip


def runs_text(pool: Pool, cfg: EmbedConfig, needed: bool = True) -> bool:
    """Whether the text tower runs: ``embed.text`` on, or ``auto`` where the run ``needed`` it
    (:func:`pipeline.config.text_uses`) or the pool's embed table was made with it (a pool
    made before ``embed.text`` keeps its config, and so its finished shards)."""
    if cfg.text != "auto":
        return cfg.text == "on"
    recorded = pool.stage_config(STAGE)
    return needed or (recorded is not None and recorded["config"].get("text", True) is not False)


def embed_steps(pool: Pool, cfg: EmbedConfig, text_needed: bool = True) -> list[Step]:
    """The embed stage's steps for ``cfg``: the embedding (or the import of published vectors), then
    the caption embedding. Records the stage's config in the pool (refusing one that differs from
    the finished shards'); needs the checkpoint's sha256, not a loaded model, so planning stays cheap.
    ``text_needed``: the rest of the run reads ``text_embedding`` or ``clip_score`` (``embed.text:
    auto``)."""
    if cfg.source is not None:
        from pipeline.embed.imported import import_steps

        return import_steps(pool, cfg)
    weights = checkpoint_sha256(check_checkpoint(cfg.model, cfg.checkpoint))
    scorers = tuple(checkpoint_sha256(check_checkpoint(s.model, s.checkpoint)) for s in cfg.scorers)
    watermark = None
    if cfg.watermark is not None:
        from pipeline.quality.watermark import detector_digest

        watermark = detector_digest(cfg.watermark)
    text = runs_text(pool, cfg, text_needed)
    embed = Embed(cfg, weights, scorers, watermark, text)
    recorded = {"model": cfg.model, "checkpoint_sha256": weights, "checkpoint": str(Path(cfg.checkpoint).resolve()),
                "precision": cfg.precision, "caption_model": cfg.caption_model}  # fmt: skip
    if cfg.scorers:
        recorded["scorers"] = [{"name": s.name, "model": s.model, "checkpoint_sha256": sha}
                               for s, sha in zip(cfg.scorers, scorers, strict=True)]  # fmt: skip
    if cfg.watermark is not None:
        recorded["watermark"] = {"model": cfg.watermark.model, "digest": watermark}
    if not text:
        recorded["text"] = False
    pool.check_stage_config(STAGE, recorded, embed.digest)
    # the caption table's digest is the embed table's (which covers the caption model): as before the split
    return [embed] + ([CaptionEmbed(cfg.caption_model, embed.digest, device=cfg.device)] if cfg.caption_model else [])


def pending_shards(pool: Pool, cfg: EmbedConfig, shards: list[int] | None = None,
                   text_needed: bool = True) -> list[int]:  # fmt: skip
    """Shards (of every downloaded one, or of ``shards``: a planned batch, whose markers alone are
    read) where a step of the embed stage is due."""
    shards = pool.require_complete("download") if shards is None else list(shards)
    due = {s for step in embed_steps(pool, cfg, text_needed) for s in runner.plan(pool, step, shards)}
    return [s for s in shards if s in due]


def run_embed(pool: Pool, cfg: EmbedConfig, engine: Engine, shards: list[int] | None = None,
              progress: bool = True, text_needed: bool = True) -> dict[int, dict[str, int]]:  # fmt: skip
    """Run the embed stage's steps over ``shards`` (default: every downloaded shard) with ``engine``:
    on one machine one model streams every due shard, on a cluster one task per shard.
    ``text_needed``: see :func:`embed_steps`.

    Returns:
        The embed step's counts by shard, for the shards this call embedded (or imported).

    Raises:
        ShardFailures: some shards failed; the others are finished and kept.
    """
    from pipeline.embed import imported
    from pipeline.engines.base import ShardFailures

    files = imported.check_source(cfg) if cfg.source is not None else []  # a bad file is named before any work
    shards = pool.require_complete("download") if shards is None else list(shards)
    steps = embed_steps(pool, cfg, text_needed)
    plans = [runner.plan(pool, step, shards) for step in steps]
    if not any(plans):
        return {}
    if cfg.source is not None:  # the published files' pool-wide index and join first
        imported.prepare_import(pool, cfg, engine, files)
    if cfg.watermark is not None and plans[0]:  # a wrong detector file is one line before any task
        from pipeline.quality.watermark import check_detector

        check_detector(cfg.watermark)
    done: dict[int, dict[str, int]] = {}
    failures: list[ShardFailures] = []
    failed: set[int] = set()
    for step, todo in zip(steps, plans, strict=True):
        try:
            counts = runner.run_step(pool, engine, step, [s for s in todo if s not in failed], progress=progress)
        except ShardFailures as exc:  # the next step skips these shards; the others go on
            failures.append(exc)
            failed |= set(exc.failures)
            continue
        if step.name == STAGE:
            done = counts
    pool.update_manifest()
    if failures:
        raise ShardFailures.merged(failures)
    return done
