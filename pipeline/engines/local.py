"""Local engine: a pool of worker processes on this machine, and DuckDB for the pool-wide SQL.

DuckDB runs the aggregations out of core: its ``memory_limit`` bounds what it holds, and sorts,
joins and group-bys beyond it spill to ``temp_directory`` (inside the pool by default, so the spill
lands on the pool's disk, not in ``/tmp``). So a count over 12.8B rows needs the same memory as one
over 10k; only the disk and the time grow.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import threading
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from pipeline.engines.base import ShardResults, Table, describe_failure
from pipeline.errors import UserError
from pipeline.progress import Progress
from pipeline.sqlsafe import literal


def _call(fn: Callable[[int], Any], shard: int) -> tuple[bool, Any]:
    try:
        return True, fn(shard)
    except Exception as exc:  # a failed shard is reported, the others go on
        return False, describe_failure(exc)


def _one_thread_each() -> None:
    """Worker processes already use every core between them: one BLAS/OpenMP thread each, set before
    faiss or numpy's BLAS load. Several OpenMP runtimes spinning on the same cores make many small
    faiss calls (a sub-cluster's k-means, a batch's nearest centre) far slower than one thread."""
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def register_tables(con: Any, tables: Mapping[str, Table]) -> None:
    """One view per table: its files read with exactly its declared columns (an empty table of the
    schema when it has no files)."""
    for name, table in tables.items():
        if not table.files:
            con.register(f"_empty_{name}", table.schema.empty_table())
            con.execute(f"CREATE OR REPLACE VIEW {_quote(name)} AS SELECT * FROM {_quote('_empty_' + name)}")
            continue
        files = "[" + ", ".join(literal(f) for f in table.files) + "]"
        cols = ", ".join(_quote(f.name) for f in table.schema)
        con.execute(f"CREATE OR REPLACE VIEW {_quote(name)} AS SELECT {cols} FROM read_parquet({files})")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory ``tmp`` to ``out``, replacing what ``out`` held."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


class LocalEngine:
    """Runs each shard in one of ``workers`` processes (spawned, so no thread state is forked), and
    SQL in an in-process DuckDB bounded by ``memory_limit``.

    With ``workers=1`` the shards run in this process, which keeps tracebacks and debuggers simple.
    """

    one_machine = True

    def __init__(self, workers: int = 2, memory_limit: str = "4GB", temp_directory: str | Path | None = None,
                 threads: int | None = None):  # fmt: skip
        if workers < 1:
            raise UserError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.memory_limit = memory_limit
        self.temp_directory = str(temp_directory) if temp_directory else None
        self.threads = threads
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # a task's parameters may be pickled: the workers stay here
        return {k: v for k, v in self.__dict__.items() if k not in ("_executor", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _executor=None, _lock=threading.Lock())

    def _workers(self) -> ProcessPoolExecutor:
        """The engine's worker processes, spawned at its first map and kept for every later one (as
        Spark keeps its Python workers): a map costs no interpreter start and no imports. Their
        per-process caches are keyed by what they hold (a digest, a path's size and mtime), as a
        reused Spark worker's are. Shut down when the engine is closed or collected."""
        with self._lock:
            if self._executor is None:
                ctx = multiprocessing.get_context("spawn")
                self._executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx,
                                                     initializer=_one_thread_each)  # fmt: skip
                weakref.finalize(self, self._executor.shutdown)
            return self._executor

    def close(self) -> None:
        """Stop the worker processes (a later map starts new ones)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown()

    # shards ---------------------------------------------------------------------------------
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
        weights = weights or dict.fromkeys(shards, 1)
        bar = Progress(total=sum(weights.get(s, 0) for s in shards), desc=desc, enabled=progress)
        with bar:
            if self.workers == 1 or len(shards) <= 1:
                for shard in shards:
                    self._record(out, shard, _call(fn, shard), on_result)
                    bar.update(weights.get(shard, 0))
                return out
            executor = self._workers()
            try:
                futures = {executor.submit(_call, fn, shard): shard for shard in shards}
                for future in as_completed(futures):
                    shard = futures[future]
                    self._record(out, shard, future.result(), on_result)
                    bar.update(weights.get(shard, 0))
            except BrokenProcessPool:  # a worker died (killed, out of memory): the next map starts new ones
                with self._lock:
                    if self._executor is executor:
                        self._executor = None
                raise
        return out

    @staticmethod
    def _record(out: ShardResults, shard: int, result: tuple[bool, Any],
                on_result: Callable[[int, Any], None] | None = None) -> None:  # fmt: skip
        ok, value = result
        if ok:
            out.results[shard] = value
            if on_result is not None:
                on_result(shard, value)
        else:
            out.failures[shard] = value

    # SQL ------------------------------------------------------------------------------------
    def connect(self) -> Any:
        """A DuckDB connection with this engine's memory limit, spill directory and threads."""
        import duckdb

        con = duckdb.connect()
        spill = self.temp_directory or str(Path(tempfile.gettempdir()) / f"clipcurate-duckdb-{os.getuid()}")
        Path(spill).mkdir(parents=True, exist_ok=True)
        con.execute(f"SET memory_limit = {literal(self.memory_limit)}")
        con.execute(f"SET temp_directory = {literal(spill)}")
        con.execute("SET preserve_insertion_order = true")  # a COPY keeps its query's ORDER BY
        if self.threads:
            con.execute(f"SET threads = {int(self.threads)}")
        return con

    def query(self, sql: str, tables: Mapping[str, Table]) -> Any:
        con = self.connect()
        try:
            register_tables(con, tables)
            return con.sql(sql).fetch_arrow_table()
        finally:
            con.close()

    def write(self, sql: str, tables: Mapping[str, Table], out: Path, order_by: str | None = None) -> None:
        """``COPY (sql [ORDER BY order_by]) TO`` one file: DuckDB's sort spills beyond the memory
        limit, and its row groups (2,048 rows, DuckDB's smallest) are small enough for a reader to
        skip the ones it does not need: a task reads about its own rows, not a 16x larger slice."""
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        con = self.connect()
        try:
            register_tables(con, tables)
            tmp.mkdir()
            query = f"SELECT * FROM ({sql}) ORDER BY {_quote(order_by)}" if order_by else sql
            target = literal(str(tmp / "part-00000.parquet"))
            con.execute(f"COPY ({query}) TO {target} (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 2048)")
            replace_dir(tmp, out)
        finally:
            con.close()
            if tmp.exists():
                shutil.rmtree(tmp)
