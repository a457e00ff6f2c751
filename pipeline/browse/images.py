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
from pathlib import Path
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
            out = _plain_members(path)
            if out is None:  # a header the scan does not read: the tarfile module reads every kind
                out = {}
                with tarfile.open(path) as tar:
                    for member in tar:
                        if member.isfile():
                            out[member.name] = (member.offset_data, member.size)
            for name in out:
                check_name(path, name)
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


def _plain_members(path: Path) -> dict[str, tuple[int, int]] | None:
    """Member name -> (data offset, size) of a tar of regular files, each with or without its own pax
    header (what img2dataset and the download stage write), read header by header: several times
    faster than the tarfile module, which the first view of a grid over many shards waited on. None
    where a header is of another kind (GNU long names, global pax headers, links, directories), has
    a base-256 size or a wrong checksum: the caller then reads the tar with the tarfile module."""
    out: dict[str, tuple[int, int]] = {}
    pax: dict[str, str] = {}
    with path.open("rb") as f:
        offset = 0
        while True:
            f.seek(offset)
            header = f.read(512)
            if len(header) < 512 or not header.strip(b"\0"):
                return out  # the end-of-archive blocks
            kind, stored = header[156:157], header[148:156].strip(b" \0")
            if kind not in (b"0", b"\0", b"x") or header[124] & 0x80 or not stored or (
                    int(stored, 8) != sum(header[:148]) + 8 * 32 + sum(header[156:])):  # fmt: skip
                return None
            size = int(header[124:136].strip(b" \0") or b"0", 8)
            if kind == b"x":  # this member's pax records: "<length> <key>=<value>\n", path and size override
                pax = _pax_records(f.read(size))
            else:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8")
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
                size = int(pax.get("size", size))
                out[pax.get("path") or (f"{prefix}/{name}" if prefix else name)] = (offset + 512, size)
                pax = {}
            offset += 512 + (size + 511) // 512 * 512


def _pax_records(data: bytes) -> dict[str, str]:
    records, at = {}, 0
    while at < len(data) and data[at:at + 1] != b"\0":
        space = data.index(b" ", at)
        length = int(data[at:space])
        key, _, value = data[space + 1 : at + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8")
        at += length
    return records


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

