"""LAION-5B's watermark detector, from the user's own weights file, run on the decoded image in the
embed stage's decode pass (:class:`pipeline.embed.stage.Embed`).

The detector as ``LAION-AI/LAION-5B-WatermarkDetection`` defines it (``inference.py``,
``example_use.py``), the model behind LAION-5B's ``pwatermark`` column:

- the network: timm's ``efficientnet_b3a`` (``num_classes=2``) whose ``classifier`` is replaced by
  ``Sequential(Linear(1536, 625), ReLU, Dropout(0.3), Linear(625, 256), ReLU, Linear(256, 2))``;
  its state dict's head keys are ``classifier.{0,3,5}.{weight,bias}``. Another timm architecture
  takes the same head on its own feature width (``num_features``), so a test can run the smallest
  EfficientNet through this same code;
- the preprocessing: ``Resize((256, 256))`` (both sides, the aspect ratio not kept), ``ToTensor``,
  ``Normalize`` with ImageNet's mean and std;
- the score: ``softmax(logits)[:, 0]``, the column LAION's inference writes as ``P Watermark``.

The weights are checked key by key and shape by shape before any image is decoded, and a mismatch
is one line naming the file (:class:`WatermarkError`). The model runs in fp32 on the embed stage's
device; timm and torch are imported only when a watermark is configured.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import WatermarkConfig
from pipeline.errors import UserError

HEAD_WIDTHS = (625, 256, 2)  # LAION's classifier: num_features -> 625 -> 256 -> 2
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = (256, 256)


class WatermarkError(UserError, ValueError):
    """A watermark detector that cannot be set up; the message names the file, key and shapes."""


def check_weights(cfg: WatermarkConfig) -> Path:
    """The weights file as a path, or one line saying it is missing (on the driver, before any task)."""
    path = Path(cfg.weights)
    if not path.is_file():
        raise WatermarkError(f"embed.watermark.weights: {path} not found: expected LAION's watermark_model_v1.pt "
                             f"(LAION-AI/LAION-5B-WatermarkDetection, models/); nothing is downloaded")  # fmt: skip
    return path


def detector_digest(cfg: WatermarkConfig) -> str:
    """The digest of the detector: its architecture and its weights' content."""
    from pipeline.store.parquet import weights_sha256

    return hashlib.sha256(f"{cfg.model}|{weights_sha256(check_weights(cfg))}".encode()).hexdigest()[:16]


def laion_head(features: int) -> Any:
    """LAION's two-class head over ``features`` (the backbone's ``num_features``; 1536 for B3)."""
    from torch import nn

    return nn.Sequential(nn.Linear(features, HEAD_WIDTHS[0]), nn.ReLU(), nn.Dropout(p=0.3),
                         nn.Linear(HEAD_WIDTHS[0], HEAD_WIDTHS[1]), nn.ReLU(),
                         nn.Linear(HEAD_WIDTHS[1], HEAD_WIDTHS[2]))  # fmt: skip


def build(model: str) -> Any:
    """timm's ``model`` with LAION's head, random weights (the weights file fills them)."""
    import warnings

    import timm

    try:
        with warnings.catch_warnings():  # timm 0.9 renamed efficientnet_b3a to efficientnet_b3: the same modules
            warnings.filterwarnings("ignore", message="Mapping deprecated model name")
            net = timm.create_model(model, pretrained=False, num_classes=2)
    except RuntimeError as exc:  # timm's "Unknown model"
        raise WatermarkError(f"embed.watermark.model: {exc}") from None
    net.classifier = laion_head(int(net.num_features))
    return net


def read_state(path: Path) -> dict[str, Any]:
    """The file's tensors as torch tensors (:func:`pipeline.quality.heads.read_state_dict`)."""
    from pipeline.quality.heads import read_state_dict

    return read_state_dict(path, WatermarkError, tensors="torch")


def check_state(path: Path, model: str, net: Any, state: dict[str, Any]) -> None:
    """Every key of ``net`` is in ``state`` with its shape, and nothing else is."""
    want = net.state_dict()
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        raise WatermarkError(f"{path}: not LAION's watermark detector on {model}: missing keys {missing[:6]}"
                             f"{' ...' if len(missing) > 6 else ''}, unexpected keys {extra[:6]}"
                             f"{' ...' if len(extra) > 6 else ''}")  # fmt: skip
    for key, tensor in want.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise WatermarkError(f"{path}: {key} has shape {tuple(state[key].shape)}, {model} with LAION's head "
                                 f"needs {tuple(tensor.shape)}")  # fmt: skip


class WatermarkDetector:
    """The detector loaded once by :meth:`setup`: ``preprocess`` (a PIL image to a tensor) and
    :meth:`score` (a batch of them to P(watermark))."""

    def __init__(self, cfg: WatermarkConfig, device: str = "cpu"):
        self.cfg, self.device = cfg, device
        self.model: Any = None
        self.preprocess: Any = None

    def setup(self) -> WatermarkDetector:
        if self.model is not None:
            return self
        import torch
        from torchvision import transforms as T

        path = check_weights(self.cfg)
        net = build(self.cfg.model)
        state = read_state(path)
        check_state(path, self.cfg.model, net, state)
        net.load_state_dict(state)
        # channels_last: the depthwise convolutions of an EfficientNet run 1.65x faster in it on CPU (B3 at 256x256,
        # batch 32, 2 cores: 15.7 against 9.5 images/s); the scores agree with the default layout's to 1e-6
        self.model = net.eval().to(self.device, memory_format=torch.channels_last)
        self.preprocess = T.Compose([T.Resize(SIZE), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        return self

    def score(self, pixels: Any) -> np.ndarray:
        """P(watermark) of each preprocessed image of ``pixels`` (``(n, 3, 256, 256)``), float32."""
        import torch

        with torch.inference_mode():
            logits = self.model(pixels.to(self.device, dtype=torch.float32, memory_format=torch.channels_last))
            return torch.softmax(logits, dim=1)[:, 0].float().cpu().numpy()


def check_detector(cfg: WatermarkConfig) -> None:
    """Build the detector and check its weights on the driver, so a wrong file is one line before any
    task (the state is read again in each worker's :meth:`WatermarkDetector.setup`)."""
    path = check_weights(cfg)
    check_state(path, cfg.model, build(cfg.model), read_state(path))
