"""A sample's image by uid, for the browser: found through the pool's own tables, never a path.

The ``download`` table gives a uid's shard and key; the shard's tar is indexed once (member name ->
offset and size, every name checked by :func:`pipeline.store.webdataset.check_name`) and kept for
the last few shards; the member's bytes are read by offset. Thumbnails are made on the fly and kept
in memory, a bounded number (nothing is written: a browser is a reader, and the pool may be
read-only).
"""

from __future__ import annotations

import io
import re
import tarfile
import threading
from collections import OrderedDict
from typing import Any

from pipeline.store.parquet import Pool, shard_name
from pipeline.store.webdataset import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, check_name

UID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
THUMB_SIDE = 192
THUMBS_KEPT = 4096  # thumbnails in memory (about 10 kB each)
TARS_KEPT = 16  # shard member tables in memory


class _Lru(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size, self.lock = size, threading.Lock()

    def get_or(self, key: Any, make: Any) -> Any:
        with self.lock:
            if key in self:
                self.move_to_end(key)
                return self[key]
        value = make()
        with self.lock:
            self[key] = value
            while len(self) > self.size:
                self.popitem(last=False)
        return value


class Images:
    """Image bytes and thumbnails of a pool's samples by uid (``locate(uid)`` -> ``(shard, key)``:
    the caller's lookup in the ``download`` table)."""

    def __init__(self, pool: Pool, locate: Any):
        self.pool, self.locate = pool, locate
        self._tars, self._thumbs = _Lru(TARS_KEPT), _Lru(THUMBS_KEPT)

    def _members(self, shard: int) -> dict[str, tuple[int, int]]:
        def index() -> dict[str, tuple[int, int]]:
            path = self.pool.root / "shards" / f"{shard_name(shard)}.tar"
            out = {}
            with tarfile.open(path) as tar:
                for member in tar:
                    if member.isfile():
                        check_name(path, member.name)
                        out[member.name] = (member.offset_data, member.size)
            return out

        return self._tars.get_or(shard, index)

    def original(self, uid: str) -> tuple[str, bytes] | None:
        """``(extension, bytes)`` of the sample's image as stored, or None (unknown uid, no image)."""
        if not UID_PATTERN.match(uid):
            return None
        found = self.locate(uid)
        if found is None:
            return None
        shard, key = found
        members = self._members(shard)
        for ext in IMAGE_EXTENSIONS:
            where = members.get(f"{key}.{ext}")
            if where is not None:
                with (self.pool.root / "shards" / f"{shard_name(shard)}.tar").open("rb") as f:
                    f.seek(where[0])
                    return ext, f.read(where[1])
        return None

    def thumbnail(self, uid: str) -> bytes | None:
        """A JPEG at most ``THUMB_SIDE`` pixels on a side, or None."""

        def make() -> bytes | None:
            found = self.original(uid)
            return None if found is None else _thumbnail(found[1])

        return self._thumbs.get_or(uid, make) if UID_PATTERN.match(uid) else None


def _thumbnail(data: bytes) -> bytes | None:
    """A JPEG thumbnail of image bytes; the pixel count is checked from the header before decoding
    (:data:`MAX_IMAGE_PIXELS`), and a JPEG is decoded at the smallest scale that covers the
    thumbnail (Pillow's ``draft``: a fraction of a full decode)."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            if img.size[0] * img.size[1] > MAX_IMAGE_PIXELS:
                return None
            img.draft("RGB", (THUMB_SIDE, THUMB_SIDE))
            small = img.convert("RGB")
    except Exception:  # not an image: the page shows none
        return None
    small.thumbnail((THUMB_SIDE, THUMB_SIDE))
    out = io.BytesIO()
    small.save(out, "JPEG", quality=85)
    return out.getvalue()


def media_type(ext: str) -> str:
    return {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}.get(ext, "image/jpeg")

