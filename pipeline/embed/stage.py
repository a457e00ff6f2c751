"""Embedding stage: open_clip image and text embeddings, CLIP score, and caption embeddings.

``clip_score`` is DataComp's: the cosine similarity of the L2-normalised image and text embeddings
of a pair, in [-1, 1] (DataComp, Sec. 3.4 and ``baselines``; its thresholds, e.g. 0.28 for
LAION-2B's ViT-B/32 filter or 0.3 for ViT-L/14, are on this scale; some tools report 100 x cos).

Images are read straight from the pool's tar shards through the safe reader, decoded and
preprocessed (open_clip's own validation transform) in ``workers`` spawned processes while the
main process runs the model, so decoding overlaps compute. Each worker takes every n-th sample of
each shard and never mixes shards in a batch; its last batch of a shard carries ``last=True``, so
the main process knows when a shard is complete and writes its tables at once: the shard stays the
unit of work and resume.

Weights are never downloaded: ``checkpoint`` is a local file, loaded with open_clip's own
``pretrained=<path>`` code path; tests and the demo save a small random-weight model to disk and
load it the same way (:func:`save_random_checkpoint`).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import EmbedConfig, config_hash
from pipeline.core import runner
from pipeline.embed.captions import CaptionEncoder, offline
from pipeline.errors import DamagedError, UserError
from pipeline.store import schema as S
from pipeline.store.parquet import Pool, file_sha256

STAGE = "embed"
CAPTION_STAGE = "caption_embed"
MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "model_configs"


class EmbedError(UserError, ValueError):
    """The embedding model cannot be set up; the message says which file or name and what to do."""


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """Cached by (path, size, mtime): a checkpoint is hashed once per process while unchanged."""
    return file_sha256(path)


def checkpoint_sha256(path: str | Path) -> str:
    stat = Path(path).stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


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


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


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
            dtype = next(self.model.parameters()).dtype
            feats = self.model.encode_image(pixels.to(self.device, dtype=dtype), normalize=True)
        return feats.float().cpu().numpy()

    def encode_texts(self, captions: list[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            tokens = self.tokenizer(captions).to(self.device)
            feats = self.model.encode_text(tokens, normalize=True)
        return feats.float().cpu().numpy()


# --- the stage -------------------------------------------------------------------------------------


def stage_hash(cfg: EmbedConfig, weights_sha256: str) -> str:
    """What the embed tables depend on: model, weights (by content), precision, caption encoder."""
    blob = f"{cfg.model}|{weights_sha256}|{cfg.precision}|{cfg.caption_model}|{cfg.max_image_pixels}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _fsl(vectors: np.ndarray, valid: np.ndarray | None, dim: int) -> pa.FixedSizeListArray:
    """float16 fixed-size lists; rows where ``valid`` is False are null (their slots hold zeros)."""
    vectors = np.where(valid[:, None], vectors, 0) if valid is not None else vectors
    values = pa.array(np.ascontiguousarray(vectors, dtype=np.float16).reshape(-1), pa.float16())
    mask = None if valid is None else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=mask)


class _ShardBuffer:
    """Batches of one shard as they arrive from the workers, until every worker marked it done."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.parts: list[dict[str, Any]] = []
        self.lasts = 0

    def add(self, batch: dict[str, Any], image: np.ndarray, text: np.ndarray) -> None:
        self.parts.append({"index": batch["index"], "uid": batch["uid"], "caption": batch["caption"],
                           "error": batch["error"], "image": image, "text": text})  # fmt: skip

    def _joined(self, key: str) -> list[Any]:
        return [value for part in self.parts for value in part[key]]

    def table(self, shard: int, embedder: ClipEmbedder) -> tuple[pa.Table, list[str], np.ndarray]:
        """The shard's embed table in tar order, its captions, and the float32 text embeddings."""
        order = np.argsort(self._joined("index"), kind="stable")
        uid, error = self._joined("uid"), self._joined("error")
        image = np.concatenate([p["image"] for p in self.parts] + [np.zeros((0, self.dim), np.float32)])[order]
        text = np.concatenate([p["text"] for p in self.parts] + [np.zeros((0, self.dim), np.float32)])[order]
        valid = np.array([error[i] is None for i in order], dtype=bool)
        score = (image * text).sum(axis=1).astype(np.float32)
        n = len(order)
        columns = {
            S.UID: pa.array([uid[i] for i in order], pa.string()),
            S.SHARD: pa.array(np.full(n, shard, np.int32)),
            S.IMAGE_EMBEDDING: _fsl(image, valid, self.dim),
            S.TEXT_EMBEDDING: _fsl(text, None, self.dim),
            S.CLIP_SCORE: pa.array(score, pa.float32(), mask=~valid),
            S.DECODE_ERROR: pa.array([error[i] for i in order], pa.string()),
            S.MODEL: pa.array([embedder.cfg.model] * n, pa.string()),
            S.CHECKPOINT_SHA256: pa.array([embedder.checkpoint_sha256] * n, pa.string()),
        }
        captions = self._joined("caption")
        return pa.table(columns, schema=S.embed_schema(self.dim)), [captions[i] for i in order], text


def _write_shard(pool: Pool, shard: int, buffer: _ShardBuffer, embedder: ClipEmbedder,
                 captions_enc: CaptionEncoder | None, digest: str) -> dict[str, int]:  # fmt: skip
    table, captions, text = buffer.table(shard, embedder)
    if captions_enc is not None:
        vectors = captions_enc.encode(captions, text)
        dim = vectors.shape[1]
        cap = pa.table(
            {S.UID: table[S.UID], S.SHARD: table[S.SHARD], S.CAPTION_EMBEDDING: _fsl(vectors, None, dim),
             S.CAPTION_MODEL: pa.array([captions_enc.name] * table.num_rows, pa.string())},
            schema=S.caption_embed_schema(dim),
        )  # fmt: skip
        runner.commit(pool, CAPTION_STAGE, shard, cap, digest, {"samples": table.num_rows})
    errors = table.num_rows - int(pa.compute.count(table[S.DECODE_ERROR], mode="only_null").as_py())
    counts = {"samples": table.num_rows, "embedded": table.num_rows - errors, "decode_errors": errors}
    runner.commit(pool, STAGE, shard, table, digest, counts)  # last: pending_shards checks both markers
    return counts


def _embed_batch(embedder: ClipEmbedder, batch: dict[str, Any], dim: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(batch["uid"])
    image = np.zeros((n, dim), np.float32)
    ok = [i for i, e in enumerate(batch["error"]) if e is None]
    if ok:
        image[ok] = embedder.encode_images(batch["pixels"][ok])
    text = embedder.encode_texts(batch["caption"]) if n else np.zeros((0, dim), np.float32)
    return image, text


def pending_shards(pool: Pool, cfg: EmbedConfig, shards: list[int] | None = None) -> list[int]:
    """Shards not yet embedded with this model and checkpoint: of every shard (the download must
    be complete), or only of ``shards`` (a batch already planned: its markers alone are read).

    Needs only the checkpoint's sha256, not a loaded model, so planning stays cheap. With
    ``embed.source``: the shards not yet imported (:mod:`pipeline.embed.imported`).
    """
    if cfg.source is not None:
        from pipeline.embed.imported import pending_imports

        return pending_imports(pool, cfg, shards)
    shards = pool.require_complete("download") if shards is None else list(shards)
    weights = checkpoint_sha256(check_checkpoint(cfg.model, cfg.checkpoint))
    digest = stage_hash(cfg, weights)
    recorded = {"model": cfg.model, "checkpoint_sha256": weights, "checkpoint": str(Path(cfg.checkpoint).resolve()),
                "precision": cfg.precision, "caption_model": cfg.caption_model}  # fmt: skip
    pool.check_stage_config(STAGE, recorded, digest)
    need_captions = cfg.caption_model is not None
    return [
        s for s in shards
        if not pool.is_done(STAGE, s, digest) or (need_captions and not pool.is_done(CAPTION_STAGE, s, digest))
    ]  # fmt: skip


def run_embed(pool: Pool, cfg: EmbedConfig, shards: list[int] | None = None, progress: bool = True,
              embedder: ClipEmbedder | None = None) -> dict[int, dict[str, int]]:  # fmt: skip
    """Embed ``shards`` (default: all not yet embedded with this model and checkpoint).

    Returns:
        Counts by shard for the shards this call finished.
    """
    if cfg.source is not None:  # published vectors: nothing to compute, and the import needs an engine
        raise EmbedError("embed.source: imported embeddings run through run_embed_on(engine, ...) (`curate embed`)")
    embedder = (embedder or ClipEmbedder(cfg)).setup()
    todo = pending_shards(pool, embedder.cfg, shards)
    if not todo:
        return {}
    done = embed_planned(pool, cfg, todo, embedder, progress)
    pool.update_manifest()
    return done


def embed_planned(pool: Pool, cfg: EmbedConfig, todo: list[int], embedder: ClipEmbedder,
                  progress: bool = True) -> dict[int, dict[str, int]]:  # fmt: skip
    """Embed ``todo`` (already planned), streaming every shard through ``embedder`` (set up)."""
    import torch

    from pipeline.progress import Progress

    digest, dim = stage_hash(embedder.cfg, embedder.checkpoint_sha256), embedder.dim
    captions_enc = CaptionEncoder(cfg.caption_model, embedder.device) if cfg.caption_model else None
    from pipeline.embed.data import ShardImages  # imports torch: only when the stage runs

    dataset = ShardImages(str(pool.root), todo, embedder.preprocess, cfg.batch_size, cfg.max_image_pixels)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=cfg.workers,
        multiprocessing_context="spawn" if cfg.workers else None, prefetch_factor=4 if cfg.workers else None,
    )  # fmt: skip
    sizes = _tar_sizes(pool, todo)
    buffers: dict[int, _ShardBuffer] = {}
    done: dict[int, dict[str, int]] = {}
    with Progress(total=sum(sizes.values()), desc=STAGE, enabled=progress) as bar:
        for batch in loader:
            if "fatal" in batch:  # from a loader worker: re-raised here, as its message alone
                raise DamagedError(batch["fatal"])
            shard = batch["shard"]
            buffer = buffers.setdefault(shard, _ShardBuffer(dim))
            buffer.add(batch, *_embed_batch(embedder, batch, dim))
            bar.update(len(batch["uid"]))
            buffer.lasts += batch["last"]
            if buffer.lasts == max(1, cfg.workers):
                done[shard] = _write_shard(pool, shard, buffers.pop(shard), embedder, captions_enc, digest)
    return done


def _tar_sizes(pool: Pool, shards: list[int]) -> dict[int, int]:
    """Samples in each shard's tar: its successful downloads."""
    sizes = {}
    for shard in shards:
        status = pool.read_shard("download", shard, columns=[S.STATUS])[S.STATUS]
        sizes[shard] = int(pa.compute.sum(pa.compute.equal(status, S.STATUS_SUCCESS)).as_py() or 0)
    return sizes


_EMBEDDERS: dict[str, ClipEmbedder] = {}


def embed_shard(pool_root: str, cfg: EmbedConfig, shard: int) -> dict[str, int]:
    """Embed one shard (planned on the driver) with this process's model (loaded once per process: a
    Spark executor's Python worker embeds many shards with one load). Decoding runs inline
    (``workers=0``). The task reads no other shard's marker and leaves the manifest to the driver."""
    import dataclasses

    key = config_hash(cfg)
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = ClipEmbedder(dataclasses.replace(cfg, workers=0)).setup()
    embedder = _EMBEDDERS[key]
    return embed_planned(Pool(pool_root), embedder.cfg, [shard], embedder, progress=False).get(shard, {})


def run_embed_on(engine: Any, pool: Pool, cfg: EmbedConfig, shards: list[int] | None = None,
                 progress: bool = True) -> dict[int, dict[str, int]]:  # fmt: skip
    """Embed with ``engine``'s model mapping: one model streaming every shard on one machine, or one
    task per shard with a model cached per worker on a cluster (:meth:`Engine.map_model`)."""
    import functools

    from pipeline.core import runner

    if cfg.source is not None:  # published vectors: a per-shard import on the engine, no model
        from pipeline.embed.imported import run_import

        return run_import(pool, cfg, engine, shards, progress)
    todo = pending_shards(pool, cfg, shards)
    if not todo:
        return {}
    result = engine.map_model(functools.partial(_embed_batch_of, str(pool.root), cfg, progress),
                              functools.partial(embed_shard, str(pool.root), cfg), todo, desc=STAGE,
                              progress=progress)  # fmt: skip
    results = runner.finished(pool, STAGE, result)
    pool.update_manifest()
    return results


def _embed_batch_of(pool_root: str, cfg: EmbedConfig, progress: bool, shards: list[int]) -> dict[int, dict[str, int]]:
    """The planned shards streamed through one model (the engine's one-machine form)."""
    return embed_planned(Pool(pool_root), cfg, list(shards), ClipEmbedder(cfg).setup(), progress)
