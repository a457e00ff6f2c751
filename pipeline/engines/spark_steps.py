"""The pool-wide steps of the stages as Spark aggregations over the pool's Parquet tables.

Each function returns exactly what its local counterpart computes with numpy (the parity tests
compare them), reading ``tables/<stage>/*.parquet`` of the completed shards, so the driver never
holds a pool-sized table:

- :func:`entry_counts`: MetaCLIP's samples per metadata entry (explode + group by);
- :func:`group_counts`: samples per group for long-tail rebalancing (MoDE clusters);
- :func:`score_threshold`: DataComp's ``get_threshold`` (the value at index ``int(n * fraction)`` of
  the scores in decreasing order; ``orderBy`` + ``offset``);
- :func:`exact_duplicates`: per image sha256, the smallest uid (the one kept).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.store import schema as S
from pipeline.store.parquet import Pool

_SPARK_TYPES = {"string": "string", "int32": "int", "int64": "bigint", "float": "float", "double": "double",
                "bool": "boolean", "list<item: int32>": "array<int>", "list<element: int32>": "array<int>"}  # fmt: skip


def _frame(spark: Any, pool: Pool, stage: str, columns: list[str]) -> Any:
    """The stage's completed shards, read with an explicit schema of just ``columns``: Spark cannot
    read the embed tables' float16 vectors, and with a given schema it never looks at them."""
    import pyarrow.parquet as pq

    paths = [str(pool.table_path(stage, s)) for s in sorted(pool.completed(stage))]
    schema = pq.read_schema(paths[0])
    ddl = ", ".join(f"`{c}` {_SPARK_TYPES[str(schema.field(c).type)]}" for c in columns)
    return spark.read.schema(ddl).parquet(*paths)


def entry_counts(spark: Any, pool: Pool, num_entries: int) -> np.ndarray:
    """Counted samples matching each entry (as :func:`pipeline.metaclip.matching.entry_counts`)."""
    from pyspark.sql import functions as F

    df = _frame(spark, pool, "metaclip_match", [S.MATCHED_ENTRY_IDS, S.COUNTED]).where(F.col(S.COUNTED))
    rows = df.select(F.explode(S.MATCHED_ENTRY_IDS).alias("e")).groupBy("e").count().collect()
    counts = np.zeros(num_entries, dtype=np.int64)
    for row in rows:
        counts[row["e"]] = row["count"]
    return counts


def group_counts(spark: Any, pool: Pool, stage: str, column: str) -> dict[int, int]:
    from pyspark.sql import functions as F

    df = _frame(spark, pool, stage, [column]).where(F.col(column).isNotNull())
    return {row[column]: row["count"] for row in df.groupBy(column).count().collect()}


def score_threshold(spark: Any, pool: Pool, stage: str, column: str, fraction: float) -> float:
    """DataComp's ``get_threshold`` over the non-null values of ``column``."""
    from pyspark.sql import functions as F

    df = _frame(spark, pool, stage, [column]).where(F.col(column).isNotNull() & ~F.isnan(column))
    n = df.count()
    if n == 0:
        return float("inf")
    index = min(int(n * fraction), n - 1)
    return float(df.orderBy(F.col(column).desc()).offset(index).limit(1).collect()[0][0])


def exact_duplicates(spark: Any, pool: Pool) -> dict[str, str]:
    """sha256 -> smallest uid, for every hash that more than one downloaded sample shares."""
    from pyspark.sql import functions as F

    df = _frame(spark, pool, "download", [S.UID, S.STATUS, S.SHA256])
    df = df.where((F.col(S.STATUS) == S.STATUS_SUCCESS) & F.col(S.SHA256).isNotNull())
    groups = df.groupBy(S.SHA256).agg(F.min(S.UID).alias("rep"), F.count("*").alias("n")).where("n > 1")
    return {row[S.SHA256]: row["rep"] for row in groups.collect()}
