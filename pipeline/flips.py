"""Decisions that changed on a shard re-decided after the pool grew (or a pool-wide figure moved).

A per-shard decision task (MetaCLIP balancing, the filter decisions, rebalancing) that rewrites a
shard it decided before compares the old table with the new one and records, in its completion
marker, how many samples flipped each way. Because every draw is keyed by (seed, uid, entry), a
sample can flip only where its probability changed: ``flipped_p_unchanged`` says so (it is 0).
The counts are summed over the markers (``manifest.json``), so after a pool-wide step has re-decided
every shard they describe that step's last change.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.store import schema as S


def decision_flips(old_path: Any, uids: pa.ChunkedArray | pa.Array, keep: np.ndarray, keep_col: str,
                   p: np.ndarray | None = None, p_col: str | None = None,
                   reason: np.ndarray | None = None, reason_col: str | None = None) -> dict[str, int]:  # fmt: skip
    """Flip counts of ``keep`` against the table at ``old_path`` (nothing when there is none)."""
    try:
        columns = [S.UID, keep_col] + [c for c in (p_col, reason_col) if c]
        old = pq.read_table(old_path, columns=columns)
    except (FileNotFoundError, OSError, pa.ArrowInvalid, KeyError):
        return {}
    pos = pc.index_in(uids, value_set=old[S.UID].combine_chunks())
    present = pc.is_valid(pos).to_numpy(zero_copy_only=False)
    if not present.any():
        return {}
    taken = pos.fill_null(0)
    old_keep = pc.take(old[keep_col], taken).to_numpy(zero_copy_only=False).astype(bool) & present
    to_dropped = present & old_keep & ~keep
    to_kept = present & ~old_keep & keep
    out = {"flipped_to_dropped": int(to_dropped.sum()), "flipped_to_kept": int(to_kept.sum())}
    if p is not None and p_col:
        old_p = pc.take(old[p_col], taken).to_numpy(zero_copy_only=False)
        moved = present & (old_p != p)
        out["p_changed"] = int(moved.sum())
        out["flipped_p_unchanged"] = int(((to_dropped | to_kept) & ~moved).sum())
    if reason is not None and reason_col:
        old_reason = pc.take(old[reason_col], taken).to_numpy(zero_copy_only=False)
        for name, n in zip(*np.unique(reason[to_dropped].astype(str), return_counts=True), strict=True):
            out[f"flipped_to_dropped_by_{name}"] = int(n)
        for name, n in zip(*np.unique(old_reason[to_kept].astype(str), return_counts=True), strict=True):
            out[f"flipped_to_kept_was_{name}"] = int(n)
    return out
