"""The one safe reader of WebDataset shards.

``webdataset``'s default decoders can unpickle members (``.pyd``, ``.pickle``); a pool's shards come
from the open web through img2dataset, so every stage reads them through :func:`iter_shard`
instead, which:

- groups members into samples by WebDataset's key rule (the basename up to its first dot);
- refuses member names that are absolute or contain ``..`` (:class:`UnsafeShardError`) and skips
  anything that is not a regular file;
- decodes only the allow-listed extensions (images as bytes, ``.txt`` as UTF-8, ``.json`` as JSON)
  and never unpickles; other members are reported in ``__skipped__``;
- records per-sample problems in ``__error__`` instead of failing the shard.

:func:`decode_image` opens an image with a pixel limit checked from the header, before any pixel is
decoded, so a decompression bomb costs nothing but a recorded error.
"""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})
TEXT_EXTENSIONS = frozenset({"txt"})
JSON_EXTENSIONS = frozenset({"json"})
ALLOWED_EXTENSIONS = IMAGE_EXTENSIONS | TEXT_EXTENSIONS | JSON_EXTENSIONS
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit


class UnsafeShardError(UserError, ValueError):
    """A shard holds a member name that could escape its directory; names the shard and member."""


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: key = path up to the first dot of the basename, extension = the rest."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(directory, stem) if directory else stem), ext.lower()


def check_name(tar_path: Path, name: str) -> None:
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or posixpath.isabs(name) or ".." in parts or (parts and ":" in parts[0]):
        raise UnsafeShardError(f"{tar_path}: member {name!r} has an absolute or parent-relative path")


_ADDRESS = re.compile(r" (?:object )?at 0x[0-9a-fA-F]+")


def error_text(exc: BaseException) -> str:
    """An exception's message without object addresses (Pillow names ``<_io.BytesIO object at
    0x7f...>``), so a recorded error is the same on every run."""
    return _ADDRESS.sub("", str(exc))


def _decode(ext: str, data: bytes) -> Any:
    if ext in TEXT_EXTENSIONS:
        return data.decode("utf-8")
    if ext in JSON_EXTENSIONS:
        return json.loads(data)
    return data  # images stay bytes until decode_image


def iter_shard(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the samples of one tar shard as dicts: ``__key__``, ``__shard__``, one entry per
    allow-listed extension, ``__error__`` (None or a message) and ``__skipped__`` (member names)."""
    path = Path(path)
    current: dict[str, Any] | None = None
    seen: set[str] = set()  # a shard's keys (bounded by the shard): each sample's members come once, together
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            check_name(path, member.name)
            if not member.isfile():
                continue
            key, ext = split_name(member.name)
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                if key in seen:
                    raise UnsafeShardError(f"{path}: member {member.name!r} repeats sample {key!r}, which an "
                                           "earlier member already ended; a shard holds each sample once")  # fmt: skip
                seen.add(key)
                current = {"__key__": key, "__shard__": str(path), "__error__": None, "__skipped__": []}
            elif ext in current or member.name in current["__skipped__"]:
                raise UnsafeShardError(f"{path}: member {member.name!r} appears twice in sample {key!r}")
            if ext not in ALLOWED_EXTENSIONS:
                current["__skipped__"].append(member.name)
                continue
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            try:
                current[ext] = _decode(ext, data)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                current["__error__"] = f"{member.name}: cannot decode .{ext}: {error_text(exc)}"
    if current is not None:
        yield current


def image_of(sample: dict[str, Any]) -> tuple[str, bytes] | None:
    """The (extension, bytes) of a sample's image member, if it has one."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return ext, sample[ext]
    return None


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[Any, str | None]:
    """Decode image bytes to an RGB PIL image, or return ``(None, error)``.

    The size comes from the header and is checked against ``max_pixels`` before any decoding.
    """
    import io
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():  # the limit is enforced here, so Pillow's warning is noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            width, height = img.size
            if width * height > max_pixels:
                return None, f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels"
            img.load()
            return img.convert("RGB"), None
    except Image.DecompressionBombError as exc:
        return None, f"decompression bomb: {error_text(exc)}"
    except Exception as exc:  # any undecodable body: truncated, not an image, unsupported
        return None, f"cannot decode image: {type(exc).__name__}: {error_text(exc)}"
