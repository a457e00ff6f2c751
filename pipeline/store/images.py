"""The pool's tar shards as batches of decoded, preprocessed images, for a streaming step (the embed
step's :data:`~pipeline.core.step.IMAGES` read), in DataLoader worker processes.

Its own module because it imports torch at the top (the dataset class must be importable by
spawned workers), while the rest of the library keeps torch out of ``import pipeline``.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.store import schema as S
from pipeline.store.parquet import Pool
from pipeline.store.webdataset import decode_image, error_text, image_of, iter_shard


class Preprocessings:
    """Several models' preprocessings of one decoded image: a tuple of tensors, one per model (the
    image is decoded once for all of them)."""

    def __init__(self, transforms: tuple[Any, ...]):
        self.transforms = transforms

    def __call__(self, image: Any) -> tuple[Any, ...]:
        return tuple(t(image) for t in self.transforms)


def _stack(items: list[Any]) -> Any:
    """One batch's pixels: a stacked tensor (zeros where an image failed), or None when every image
    failed; a tuple of them where each item is a tuple (:class:`Preprocessings`)."""
    first = next((it for it in items if it is not None), None)
    if first is None:
        return None
    if isinstance(first, tuple):
        return tuple(_stack([None if it is None else it[i] for it in items]) for i in range(len(first)))
    return torch.stack([it if it is not None else torch.zeros(first.shape) for it in items])


class ShardImages(torch.utils.data.IterableDataset):
    """Iterable over pre-collated batches of one shard at a time (a torch ``IterableDataset``).

    Each batch: ``shard``, ``index`` (position in the tar), ``uid``, ``caption``, ``pixels``
    (float tensor, zeros where decoding failed; a tuple of them for :class:`Preprocessings`),
    ``error`` (None or a message), ``last``.
    """

    def __init__(self, pool_root: str, shards: list[int], transform: Any, batch_size: int, max_pixels: int):
        self.pool_root, self.shards, self.transform = pool_root, shards, transform
        self.batch_size, self.max_pixels = batch_size, max_pixels

    def _sample(self, index: int, sample: dict[str, Any]) -> dict[str, Any]:
        meta = sample.get("json") or {}
        image = image_of(sample)
        error = sample["__error__"]
        pixels = None
        if error is None and image is None:
            error = "no image member in the sample"
        if error is None:
            img, error = decode_image(image[1], self.max_pixels)
            if img is not None:
                try:
                    pixels = self.transform(img)
                except Exception as exc:  # a transform can fail on odd modes or sizes
                    error = f"cannot preprocess image: {type(exc).__name__}: {error_text(exc)}"
        return {"index": index, "uid": meta.get(S.UID), "caption": sample.get("txt") or "", "pixels": pixels,
                "error": error}  # fmt: skip

    def _collate(self, shard: int, items: list[dict[str, Any]], last: bool) -> dict[str, Any]:
        out = {k: [it[k] for it in items] for k in ("index", "uid", "caption", "error")}
        return {"shard": shard, **out, "pixels": _stack([it["pixels"] for it in items]), "last": last}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        pool = Pool(self.pool_root)
        for shard in self.shards:
            items: list[dict[str, Any]] = []
            try:
                for index, sample in enumerate(iter_shard(pool.shard_tar(shard))):
                    if index % workers != worker:
                        continue
                    items.append(self._sample(index, sample))
                    if len(items) == self.batch_size:
                        yield self._collate(shard, items, last=False)
                        items = []
            except (tarfile.TarError, OSError) as exc:
                yield {"shard": shard, "fatal": f"{pool.shard_tar(shard)}: unreadable shard: {exc}"}
                return
            except UserError as exc:  # a bad shard (a repeated sample): the main process raises its one line
                yield {"shard": shard, "fatal": str(exc)}
                return
            yield self._collate(shard, items, last=True)
