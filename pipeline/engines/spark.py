"""Spark engine: the same per-shard functions, run as Spark tasks on a cluster (or ``local[N]``).

Stages stay engine-free: :meth:`SparkEngine.map_shards` puts one shard id in each partition of a
DataFrame and runs the stage's own ``fn(shard)`` inside ``mapInArrow``, so every executor writes the
same tables, shards and completion markers into the pool directory (which must be on a file
system every executor and the driver see: NFS, a shared volume, or one machine). Results and
failures come back as one Arrow row per shard.

- Retries are Spark's: a task that raises is re-attempted (``spark.task.maxFailures``; for
  ``local[N]`` masters the engine uses ``local[N,F]``, local mode's form of the same setting). Only
  when the last attempt fails is the shard reported as failed, so the other shards finish and a
  re-run redoes just that one, as with the local engine.
- Models load once per executor process: Spark reuses its Python workers between tasks
  (``spark.python.worker.reuse``, on by default, and set here), and the stages cache their models
  in the module (the Aho-Corasick automaton, the open_clip model, faiss centres, the language model).
- The download runs as any other step (one task per shard calling img2dataset's per-shard
  ``Downloader``), not through img2dataset's ``pyspark_distributor``: that one looks for a session
  with ``SparkSession.getActiveSession()``, which is per thread and so None in a Prefect task's
  thread, takes the engine's own session from ``getOrCreate()`` and stops it when it ends, leaving
  the engine with a stopped session (``"sc" is null`` at the next stage).
- Pool-wide SQL (:meth:`SparkEngine.query`, :meth:`SparkEngine.write`) runs as Spark SQL over
  the pool's Parquet files read with the declared schema of just the columns it needs, so the
  driver receives only the small results and Spark never reads the float16 embedding columns.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import SparkConfig
from pipeline.engines.base import ShardResults, Table, describe_failure
from pipeline.progress import Progress

_LOCAL = re.compile(r"^local\[(\*|\d+)\]$")


def _master(cfg: SparkConfig) -> str:
    m = _LOCAL.match(cfg.master)
    return f"local[{m.group(1)},{cfg.task_max_failures}]" if m else cfg.master


def _shard_task(fn: Callable[[int], Any], max_failures: int, cwd: str) -> Callable[[Iterator[Any]], Iterator[Any]]:
    """The ``mapInArrow`` function: ``fn`` over the shard ids of a partition, one result row each.

    It runs in the driver's working folder (``cwd``) where that exists: an executor of a standalone
    cluster starts in its worker's work dir, where a config's relative paths (``pool: runs/demo``)
    would name other folders."""

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa
        from pyspark import TaskContext

        if Path(cwd).is_dir() and str(Path.cwd()) != cwd:
            os.chdir(cwd)
        attempt = TaskContext.get().attemptNumber()
        for batch in batches:
            shards, oks, values = [], [], []
            for shard in batch.column(0).to_pylist():
                try:
                    value, ok = json.dumps(fn(shard), default=str), True
                except Exception as exc:
                    if attempt + 1 < max_failures:
                        raise  # Spark retries the task
                    value, ok = describe_failure(exc), False
                shards.append(shard)
                oks.append(ok)
                values.append(value)
            yield pa.RecordBatch.from_pydict({"shard": pa.array(shards, pa.int32()), "ok": oks, "value": values})

    return run


_SPARK_TYPES = {"string": "string", "large_string": "string", "int8": "tinyint", "int16": "smallint",
                "int32": "int", "int64": "bigint", "float": "float", "double": "double", "bool": "boolean",
                "binary": "binary", "large_binary": "binary"}  # fmt: skip
_UNNEST = re.compile(r"\bunnest\s*\(", re.IGNORECASE)


def spark_type(t: Any) -> str:
    """The Spark SQL type of an Arrow type (the ones the pool's SQL reads)."""
    import pyarrow as pa

    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"array<{spark_type(t.value_type)}>"
    name = str(t)
    if name not in _SPARK_TYPES:
        raise TypeError(f"no Spark type for the Arrow type {name}")
    return _SPARK_TYPES[name]


def spark_sql(sql: str) -> str:
    """The project's SQL (DuckDB's dialect, kept to what both parse) in Spark's spelling."""
    return _UNNEST.sub("explode(", sql)


_FORWARDED_ENV = ("CLIPCURATE_", "HF_HUB_OFFLINE", "NO_ALBUMENTATIONS_UPDATE", "TOKENIZERS_PARALLELISM")


class SparkEngine:
    """Runs each shard as a Spark task and the pool-wide SQL as Spark SQL (module docstring). The
    session starts on first use."""

    one_machine = False  # a one_model step runs one task per shard; each executor's Python worker sets up once

    def __init__(self, cfg: SparkConfig | None = None):
        self.cfg = cfg or SparkConfig()
        self._spark: Any = None

    @property
    def spark(self) -> Any:
        """The SparkSession (created on first use, or the active one with the same master)."""
        if self._spark is None:
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
            os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
            if self.cfg.master.startswith("local"):
                os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
            from pyspark.sql import SparkSession

            builder = SparkSession.builder.master(_master(self.cfg)).appName(self.cfg.app_name)
            settings = {"spark.task.maxFailures": str(self.cfg.task_max_failures),
                        "spark.python.worker.reuse": "true", "spark.ui.showConsoleProgress": "false",
                        "spark.sql.execution.arrow.pyspark.enabled": "true",
                        "spark.sql.parquet.compression.codec": "zstd"}  # fmt: skip
            # Executors do not inherit the driver's environment on a cluster, nor in local mode once the JVM
            # was started by an earlier session of this process: the settings the stages read go explicitly.
            for name in sorted(os.environ):
                if name.startswith(_FORWARDED_ENV):
                    settings[f"spark.executorEnv.{name}"] = os.environ[name]
            settings.update(self.cfg.conf)
            for key, value in settings.items():
                builder = builder.config(key, value)
            self._spark = builder.getOrCreate()
            self._spark.sparkContext.setLogLevel("ERROR")
        return self._spark

    def map_shards(
        self,
        fn: Callable[[int], Any],
        shards: Sequence[int],
        *,
        desc: str,
        weights: Mapping[int, int] | None = None,
        progress: bool = True,
        on_result: Callable[[int, Any], None] | None = None,
    ) -> ShardResults:
        out = ShardResults()
        if not shards:
            return out
        weights = weights or dict.fromkeys(shards, 1)
        with Progress(total=sum(weights.get(s, 0) for s in shards), desc=f"{desc} (spark)", enabled=progress) as bar:
            rdd = self.spark.sparkContext.parallelize([(int(s),) for s in shards], len(shards))
            frame = self.spark.createDataFrame(rdd, "shard int")
            schema = "shard int, ok boolean, value string"
            rows = frame.mapInArrow(_shard_task(fn, self.cfg.task_max_failures, str(Path.cwd())), schema).collect()
            for row in rows:  # collected when the job ends: on_result sees them all then
                if row.ok:
                    out.results[row.shard] = json.loads(row.value)
                    if on_result is not None:
                        on_result(row.shard, out.results[row.shard])
                else:
                    out.failures[row.shard] = row.value
                bar.update(weights.get(row.shard, 0))
        return out

    # SQL ------------------------------------------------------------------------------------
    def _register(self, tables: Mapping[str, Table]) -> None:
        for name, table in tables.items():
            ddl = ", ".join(f"`{f.name}` {spark_type(f.type)}" for f in table.schema)
            if table.files:
                frame = self.spark.read.schema(ddl).parquet(*table.files)
            else:
                frame = self.spark.createDataFrame([], ddl)
            frame.createOrReplaceTempView(name)

    def query(self, sql: str, tables: Mapping[str, Table]) -> Any:
        self._register(tables)
        return self.spark.sql(spark_sql(sql)).toArrow()

    def write(self, sql: str, tables: Mapping[str, Table], out: Path, order_by: str | None = None) -> None:
        import uuid

        from pipeline.engines.local import replace_dir

        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._register(tables)
        frame = self.spark.sql(spark_sql(sql))
        if order_by:  # a range-partitioned sort: part files in name order hold ascending keys
            frame = frame.orderBy(order_by)
        frame.write.mode("overwrite").option("parquet.block.size", 8 << 20).parquet(str(tmp))
        for extra in [*tmp.rglob("_SUCCESS"), *tmp.rglob(".*.crc")]:
            extra.unlink()
        replace_dir(tmp, out)

    def stop(self) -> None:
        if self._spark is not None:
            self._spark.stop()
            self._spark = None
