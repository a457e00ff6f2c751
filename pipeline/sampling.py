"""Deterministic, partition-independent random draws keyed by ``uid``.

Balancing (MetaCLIP) and rebalancing (MoDE) keep samples with some probability. A global random
stream would make the kept set depend on the order and partitioning of the rows, so local and
Spark runs, or a re-run with other shards, would disagree. Instead every draw is a hash of
(seed, uid, key): the same sample gets the same draw wherever and whenever it is computed.

The hash is splitmix64's finaliser (Steele et al., "Fast splittable pseudorandom number
generators", 2014), vectorised with numpy; its top 53 bits give a uniform float in [0, 1).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i


def uid_to_uint64(uids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The first 64 bits of each 32-hex-digit uid, as uint64 (vectorised: no Python loop)."""
    if isinstance(uids, pa.ChunkedArray):
        uids = uids.combine_chunks() if uids.num_chunks != 1 else uids.chunk(0)
    if len(uids) == 0:
        return np.zeros(0, dtype=np.uint64)
    if uids.null_count:
        raise ValueError("uid column has nulls")
    offsets = np.frombuffer(uids.buffers()[1], dtype=np.int32)[uids.offset : uids.offset + len(uids) + 1]
    data = np.frombuffer(uids.buffers()[2], dtype=np.uint8)
    if not np.all(np.diff(offsets) == 32):
        raise ValueError("every uid must be 32 hex digits")
    start = offsets[0]
    digits = _HEX[data[start : start + 32 * len(uids)].reshape(-1, 32)[:, :16]]
    if (digits == 255).any():
        raise ValueError("uid is not hexadecimal")
    out = np.zeros(len(uids), dtype=np.uint64)
    for col in range(16):
        out = (out << np.uint64(4)) | digits[:, col].astype(np.uint64)
    return out


def _mix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def uniform(uid64: np.ndarray, key: np.ndarray | int, seed: int) -> np.ndarray:
    """Uniform [0, 1) draws, one per (uid, key) pair, fixed by ``seed``."""
    with np.errstate(over="ignore"):
        x = _mix(uid64 ^ _mix(np.asarray(key, dtype=np.uint64) ^ _mix(np.full(1, seed, dtype=np.uint64))))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def uid_below(share: float) -> str | None:
    """A SQL predicate keeping about ``share`` of the samples, the same on any engine: uids are
    uniform hex, and hex strings of one length compare like their values, so ``uid < '<8 hex>'``
    keeps a uniform share of them. None for the whole pool."""
    if share >= 1:
        return None
    return f"uid < '{int(max(share, 0.0) * 0x100000000):08x}'"


def solve_increasing(expected: Callable[[list[float]], np.ndarray], target: float, hi: float,
                     points: int = 32, passes: int = 8, rel: float = 1e-4) -> float:
    """The x in ``[0, hi]`` whose increasing ``expected(x)`` is ``target`` (within ``rel``, 0.01% by
    default), by grid refinement: each pass evaluates ``points`` values at once, so a pool-sized sum
    costs one pass over the pool per ``points`` candidates rather than one per bisection step. The
    one solver of a keep probability for a target size: MetaCLIP's t, rebalancing's t or s.
    """
    lo = 0.0
    for _ in range(passes):
        grid = np.linspace(lo, hi, points + 2)[1:-1]
        values = np.asarray(expected(grid.tolist()))
        close = np.abs(values - target) <= rel * target
        if close.any():
            return float(grid[np.argmax(close)])
        below = values < target
        lo = float(grid[below][-1]) if below.any() else lo
        hi = float(grid[~below][0]) if (~below).any() else hi
    return hi
