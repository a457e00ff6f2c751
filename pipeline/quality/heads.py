"""Scoring heads over CLIP image embeddings: LAION's aesthetic predictors and NSFW detectors, loaded
from the user's own weights file in the layout their authors published, and run in numpy.

The layouts (each checked key by key and shape by shape before any score):

- ``aesthetic-linear``: LAION-Aesthetics v1, ``nn.Linear(d, 1)`` on the ViT-L/14 (768) or ViT-B/32
  (512) embedding; keys ``weight``, ``bias`` (``LAION-AI/aesthetic-predictor``, ``sa_0_4_vit_l_14_linear.pth``).
- ``aesthetic-mlp``: the improved predictor v2 (``christophschuhmann/improved-aesthetic-predictor``,
  ``sac+logos+ava1-l14-linearMSE.pth``): Linear 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropouts
  between and no activation; keys ``layers.{0,2,4,6,7}.{weight,bias}``.
- ``aesthetic-mlp-relu``: the same widths with a ReLU after each of the first four Linears (the
  ``reluMSE`` files); keys ``layers.{0,3,6,9,11}``.
- ``nsfw-autokeras``: the PyTorch port of LAION's autokeras ``CLIP-based-NSFW-Detector`` (the one
  NeMo Curator's ``nsfw.py`` loads): ``(x - norm.mean) / sqrt(norm.variance)``, Linear d -> 64 ->
  512 -> 256, a ReLU after each, Linear 256 -> 1, a sigmoid; keys ``norm.{mean,variance}``,
  ``linear_{1..4}.{weight,bias}``.
- ``nsfw-h14``: LAION's ViT-H/14 detector (``h14_nsfw_model.py``): Linear 1024 -> 1024 -> 2048 ->
  1024 -> 256 -> 128 with a ReLU (and a dropout) after each, then Linear 128 -> 16 and 16 -> 1 with
  nothing between, no sigmoid; keys ``layers.{0,3,6,9,12,15,16}``.

Every head takes the L2-normalised image embedding, as its authors trained it (the improved
predictor's ``normalized()``; the NSFW detectors' inputs): the stored vectors are normalised again
here, whatever was stored, so an unnormalised import cannot give the scores above 10 that the
predictors' issue trackers report. Dropout is the identity at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError


class HeadError(UserError, ValueError):
    """A head's weights file that cannot be used; the message names the file, key and shapes."""


@dataclass(frozen=True)
class Layout:
    """A published head: its Linear layers' key prefixes in order, the width after each, which of
    them a ReLU follows, and whether a normalisation comes first and a sigmoid last. The input width
    is the file's own (LAION published heads for ViT-B/32, L/14 and H/14), checked against the pool's."""

    name: str
    linears: tuple[str, ...]
    widths: tuple[int, ...]
    relu: tuple[bool, ...]
    norm: bool = False
    sigmoid: bool = False

    def keys(self) -> set[str]:
        named = {f"{p}.{k}" if p else k for p in self.linears for k in ("weight", "bias")}
        return named | ({"norm.mean", "norm.variance"} if self.norm else set())


LAYOUTS = {
    layout.name: layout
    for layout in (
        Layout("aesthetic-linear", ("",), (1,), (False,)),
        Layout("aesthetic-mlp", ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7"), (1024, 128, 64, 16, 1),
               (False,) * 5),
        Layout("aesthetic-mlp-relu", ("layers.0", "layers.3", "layers.6", "layers.9", "layers.11"),
               (1024, 128, 64, 16, 1), (True, True, True, True, False)),
        Layout("nsfw-autokeras", ("linear_1", "linear_2", "linear_3", "linear_4"), (64, 512, 256, 1),
               (True, True, True, False), norm=True, sigmoid=True),
        Layout("nsfw-h14", tuple(f"layers.{i}" for i in (0, 3, 6, 9, 12, 15, 16)), (1024, 2048, 1024, 256, 128, 16, 1),
               (True, True, True, True, True, False, False)),
    )
}  # fmt: skip
KINDS = {"aesthetic": ("aesthetic-linear", "aesthetic-mlp", "aesthetic-mlp-relu"),
         "nsfw": ("nsfw-autokeras", "nsfw-h14")}  # fmt: skip


def read_state_dict(path: Path, error: type[UserError], tensors: str = "numpy") -> dict[str, Any]:
    """A weights file's state dict: ``.safetensors`` (``tensors``: as ``numpy`` arrays or ``torch``
    tensors), or a ``.pth``/``.pt``/``.bin`` state dict read with ``torch.load(weights_only=True)``
    (no pickled code runs; torch tensors). A file that is neither is one line of ``error`` naming it.
    The one reader of the heads' and the watermark detector's files."""
    try:
        if path.suffix == ".safetensors":
            if tensors == "torch":
                from safetensors.torch import load_file
            else:
                from safetensors.numpy import load_file
            return dict(load_file(str(path)))
        import torch

        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, another format, a pickle that is not weights only
        raise error(f"{path}: not a readable weights file ({type(exc).__name__}: {exc})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise error(f"{path}: not a state dict (a {type(state).__name__})")
    return state


def read_weights(path: str | Path) -> dict[str, np.ndarray]:
    """A head's weights file (:func:`read_state_dict`) as float32 arrays."""
    path = Path(path)
    if not path.is_file():
        raise HeadError(f"{path}: no such weights file")
    state = read_state_dict(path, HeadError)
    try:
        arrays = {k: v.detach().float().numpy() if hasattr(v, "detach") else v for k, v in state.items()
                  if hasattr(v, "detach") or isinstance(v, np.ndarray)}  # fmt: skip
        return {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
    except Exception as exc:  # tensors that are not numbers
        raise HeadError(f"{path}: not a readable weights file ({type(exc).__name__}: {exc})") from None


def detect(path: str | Path, tensors: dict[str, np.ndarray], kind: str) -> Layout:
    """The layout of ``kind`` whose keys the file has exactly."""
    for name in KINDS[kind]:
        if set(tensors) == LAYOUTS[name].keys():
            return LAYOUTS[name]
    raise HeadError(f"{path}: its keys {sorted(tensors)[:8]} match no {kind} layout ({', '.join(KINDS[kind])})")


@dataclass(frozen=True)
class Head:
    """A checked head: its layout, its arrays, and the embedding width it takes."""

    path: str
    layout: Layout
    tensors: dict[str, np.ndarray]

    @property
    def dim(self) -> int:
        first = self.layout.linears[0]
        return int(self.tensors[f"{first}.weight" if first else "weight"].shape[1])

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        """Scores of ``(rows, dim)`` image embeddings (normalised here), float32. BLAS runs on one
        thread here: its threaded kernels sum in another order, so the same rows scored in a
        one-thread engine worker and in a Spark worker would differ in the last bits."""
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            return self._forward(vectors)

    def _forward(self, vectors: np.ndarray) -> np.ndarray:
        from pipeline.core.vectors import unit_rows

        x = unit_rows(np.array(vectors, dtype=np.float32))  # a copy: the caller's rows stay as they are
        t = self.tensors
        if self.layout.norm:
            x = (x - t["norm.mean"]) / np.sqrt(t["norm.variance"])
        for prefix, relu in zip(self.layout.linears, self.layout.relu, strict=True):
            key = f"{prefix}." if prefix else ""
            x = x @ t[f"{key}weight"].T + t[f"{key}bias"]
            if relu:
                x = np.maximum(x, 0)
        if self.layout.sigmoid:
            x = 1 / (1 + np.exp(-x))
        return x[:, 0].astype(np.float32)


def load_head(path: str | Path, kind: str, layout: str = "auto", dim: int | None = None) -> Head:
    """The head of ``kind`` (``aesthetic`` or ``nsfw``) in ``path``, checked against its layout
    (``auto``: the one whose keys the file has) and, when given, the pool's embedding width ``dim``.

    Raises:
        HeadError: the file is unreadable, a key is missing or extra, a shape differs from the
            layout's, or the head's input width is not ``dim``; the message names the file.
    """
    tensors = read_weights(path)
    if layout == "auto":
        chosen = detect(path, tensors, kind)
    elif layout not in KINDS[kind]:
        raise HeadError(f"{path}: layout {layout!r} is not a {kind} layout ({', '.join(KINDS[kind])})")
    else:
        chosen = LAYOUTS[layout]
    missing, extra = sorted(chosen.keys() - set(tensors)), sorted(set(tensors) - chosen.keys())
    if missing or extra:
        raise HeadError(f"{path}: not the {chosen.name} layout: missing keys {missing}, unexpected keys {extra}")
    _check_shapes(str(path), chosen, tensors)
    head = Head(str(path), chosen, tensors)
    if dim is not None and head.dim != dim:
        raise HeadError(f"{path}: the head takes {head.dim}-d image embeddings, but the pool's are {dim}-d "
                        f"(a head trained on another CLIP model)")  # fmt: skip
    return head


def _check_shapes(path: str, layout: Layout, tensors: dict[str, np.ndarray]) -> None:
    width = None
    for prefix, out in zip(layout.linears, layout.widths, strict=True):
        key = f"{prefix}." if prefix else ""
        weight, bias = tensors[f"{key}weight"], tensors[f"{key}bias"]
        expected_in = width if width is not None else (weight.shape[1] if weight.ndim == 2 else -1)
        if weight.shape != (out, expected_in):
            raise HeadError(f"{path}: {key}weight has shape {tuple(weight.shape)}, the {layout.name} layout "
                            f"needs ({out}, {expected_in})")  # fmt: skip
        if bias.shape != (out,):
            raise HeadError(f"{path}: {key}bias has shape {tuple(bias.shape)}, the {layout.name} layout needs ({out},)")
        width = out
    if layout.norm:
        dim = tensors[f"{layout.linears[0]}.weight"].shape[1]
        for key in ("norm.mean", "norm.variance"):
            if tensors[key].reshape(-1).shape != (dim,):
                raise HeadError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, the input is {dim}-d")
            tensors[key] = tensors[key].reshape(-1)
        if (tensors["norm.variance"] <= 0).any():
            raise HeadError(f"{path}: norm.variance has values <= 0")
