"""DataComp uid files: a sorted ``.npy`` of ``(u8, u8)`` pairs, the 32-hex-digit uid split into its
high and low 64 bits. It is what DataComp's resharder reads and what a filtering-track submission
is (``baselines/apply_filter.py`` builds ``np.array([(int(uid[:16], 16), int(uid[16:32], 16))],
np.dtype("u8,u8"))`` and ``baselines.py`` saves it sorted).

Written and read in bounded memory: a release's file is written a batch at a time from the engine's
sorted uids (the ``.npy`` header, then the pairs), and ``export --uids`` looks each candidate up in the memory-mapped
file by binary search on the high half (numpy's ``searchsorted`` touches log2(N) pages), so a
400M-uid file never has to fit in memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.errors import UserError

UID_DTYPE = np.dtype("u8,u8")
_CHECK_BATCH = 1 << 22


def uid_pairs(uids: list[str]) -> np.ndarray:
    """32-hex-digit uids as DataComp's ``(high, low)`` pairs (``u8,u8``)."""
    raw = np.frombuffer(b"".join(bytes.fromhex(u) for u in uids), ">u8").reshape(-1, 2)
    out = np.empty(len(uids), UID_DTYPE)
    out["f0"], out["f1"] = raw[:, 0], raw[:, 1]
    return out


def uid_hex(pairs: np.ndarray) -> list[str]:
    """DataComp pairs back to 32-hex-digit uids."""
    raw = np.empty((len(pairs), 2), ">u8")
    raw[:, 0], raw[:, 1] = pairs["f0"], pairs["f1"]
    data = raw.tobytes()
    return [data[i : i + 16].hex() for i in range(0, len(data), 16)]


def write_uid_file(path: Path, batches: Iterable[pa.Array], n: int) -> None:
    """Write ``n`` uids, given sorted in ``batches`` of strings, as DataComp's sorted pairs, atomically."""
    from pipeline.store.parquet import atomic_path

    header = {"descr": np.lib.format.dtype_to_descr(UID_DTYPE), "fortran_order": False, "shape": (n,)}
    with atomic_path(path) as tmp, tmp.open("wb") as f:  # appended a batch at a time: no page of it is held
        np.lib.format.write_array_header_1_0(f, header)
        at = 0
        for batch in batches:
            f.write(uid_pairs(batch.to_pylist()).tobytes())
            at += len(batch)
        if at != n:
            raise RuntimeError(f"{path}: {at} uids written, {n} expected")


def open_uid_file(path: str | Path, check: bool = True) -> np.ndarray:
    """A DataComp uid file, memory-mapped, checked to be ``u8,u8`` pairs and (``check``: one pass in
    bounded memory) sorted and unique.

    Raises:
        UserError: names the file and what is wrong with it (how to fix an unsorted one).
    """
    path = Path(path)
    try:
        pairs = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{path}: uid file not found") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a .npy uid file ({exc})") from None
    fields = pairs.dtype.fields or {}
    if pairs.ndim != 1 or len(fields) != 2 or any(f[0] != np.dtype("<u8") for f in fields.values()):
        raise UserError(f"{path}: holds {pairs.dtype} x {pairs.shape}; a uid file holds one array of "
                        "np.dtype('u8,u8') pairs (DataComp's format)")  # fmt: skip
    names = pairs.dtype.names
    for start in range(0, len(pairs) if check else 0, _CHECK_BATCH):  # sorted and unique, checked in bounded memory
        chunk = np.asarray(pairs[max(start - 1, 0) : start + _CHECK_BATCH])
        hi, lo = chunk[names[0]], chunk[names[1]]
        bad = (hi[1:] < hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] <= lo[:-1]))
        if bad.any():
            row = start + int(np.argmax(bad)) + (0 if start else 1)
            raise UserError(f"{path}: uid {row} is not above the one before it; a uid file is sorted and "
                            "unique (np.unique(np.load(path)) makes it so)")  # fmt: skip
    return pairs


def in_uid_file(pairs: np.ndarray, uids: list[str]) -> np.ndarray:
    """Which of ``uids`` the sorted, memory-mapped ``pairs`` hold (binary search on the high half)."""
    if not uids or not len(pairs):
        return np.zeros(len(uids), bool)
    want = uid_pairs(uids)
    hi_name, lo_name = pairs.dtype.names
    high = pairs[hi_name]
    left = np.searchsorted(high, want["f0"], side="left")
    right = np.searchsorted(high, want["f0"], side="right")
    found = np.zeros(len(uids), bool)
    for i in np.flatnonzero(right > left):  # equal high halves: a few rows at most
        found[i] = bool((np.asarray(pairs[lo_name][left[i] : right[i]]) == want["f1"][i]).any())
    return found
