"""DataComp's ``get_threshold`` as two bounded SQL aggregations, exact on any engine.

DataComp (``baselines/apply_filter.py``, ``get_threshold``) sorts every score of the pool in
decreasing order and takes the value at index ``int(n * fraction)``. It loads the column into
pandas; the same order statistic is computed here without holding the column anywhere:

1. ``n`` and the range of the valid (non-null, non-NaN) scores;
2. a histogram of the scores in :data:`BUCKETS` equal-width buckets (a small result), which locates
   the bucket holding the wanted rank and the rank inside it;
3. the distinct scores of that one bucket with their counts (at most the bucket's rows, and no more
   than the float32 values of one bucket's width), which gives the exact value.

Both engines evaluate the bucket expression in float64 over the same float32 values, so they find
the same bucket; the answer is the same float as sorting the whole column.
"""

from __future__ import annotations

import numpy as np

from pipeline.engines.base import Engine, Table

BUCKETS = 1 << 16


def _valid(column: str) -> str:
    return f"{column} is not null and not isnan({column})"


def order_statistic(engine: Engine, table: Table, column: str, fraction: float) -> float:
    """The value at index ``min(int(n * fraction), n - 1)`` of the valid values of ``column`` sorted
    in decreasing order (``inf`` when there is none: nothing passes)."""
    tables = {"scores": table}
    head = engine.query(f"select count(*) as n, min(cast({column} as double)) as lo, "
                        f"max(cast({column} as double)) as hi from scores where {_valid(column)}", tables)  # fmt: skip
    n = int(head["n"][0].as_py())
    if n == 0:
        return float("inf")
    lo, hi = head["lo"][0].as_py(), head["hi"][0].as_py()
    rank = min(int(n * fraction), n - 1)  # 0-based, in decreasing order
    if lo == hi:
        return float(np.float32(lo))
    width = (hi - lo) / BUCKETS
    bucket = f"least(cast(floor((cast({column} as double) - ({lo!r})) / ({width!r})) as bigint), {BUCKETS - 1})"
    hist = engine.query(f"select {bucket} as b, count(*) as n from scores where {_valid(column)} group by 1",
                        tables)  # fmt: skip
    b, inside = _locate(hist["b"].to_numpy(), hist["n"].to_numpy(), rank)
    values = engine.query(f"select cast({column} as double) as v, count(*) as n from scores "
                          f"where {_valid(column)} and {bucket} = {b} group by 1", tables)  # fmt: skip
    v, _ = _locate(values["v"].to_numpy(), values["n"].to_numpy(), inside)
    return float(np.float32(v)) if table.schema.field(column).type.bit_width == 32 else float(v)


def _locate(keys: np.ndarray, counts: np.ndarray, rank: int) -> tuple[object, int]:
    """The key holding ``rank`` when keys are taken in decreasing order, and the rank inside it."""
    order = np.argsort(-keys, kind="stable")
    keys, counts = keys[order], counts[order]
    ends = np.cumsum(counts)
    i = int(np.searchsorted(ends, rank, side="right"))
    return keys[i].item(), rank - (int(ends[i - 1]) if i else 0)
