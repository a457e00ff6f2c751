"""The engine seam: the few operations a stage needs, whatever runs them.

Stages are engine-free. A stage hands the engine

- a picklable ``fn(shard) -> result`` to run over shards (:meth:`Engine.map_shards`; img2dataset's
  distributors follow the same idea: each one takes the same downloader callable);
- SQL over the pool's Parquet tables, either returning a small Arrow table to the driver
  (:meth:`Engine.query`: per-entry counts, a threshold, group sizes) or writing a large result back
  to Parquet, sorted, without it ever passing through the driver (:meth:`Engine.write`: duplicate
  groups, vectors regrouped by cluster), where a task finds one key's rows through the row groups'
  statistics (:func:`read_where`) -- the engines' out-of-core sorts do the regrouping, rather than
  a partitioned writer that buffers every open partition;
- one fact: whether it is one machine (:attr:`Engine.one_machine`), where a step holding a costly
  model runs best as one set-up instance in the driver (:attr:`~pipeline.core.step.Step.one_model`).

The SQL is written once, in DuckDB's dialect, restricted to what Spark SQL also parses; the Spark
engine translates the one construct the two spell differently (``unnest`` is Spark's ``explode``).
Both engines give the same rows (the parity tests compare them).

An engine reports per-shard failures instead of stopping at the first one, so finished shards are
kept and a re-run only redoes the failed ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import pyarrow as pa



USER_ERROR = "user error: "  # how a shard task's failure says it was the user's input, not a bug


def describe_failure(exc: BaseException) -> str:
    """A failed shard task's report: a user's mistake (:class:`~pipeline.errors.UserError`) as its
    message alone, a bug with the end of its traceback."""
    import traceback

    from pipeline.errors import UserError

    if isinstance(exc, UserError):
        return f"{USER_ERROR}{exc}"
    return f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-3)}"


def _shard_list(shards: list[int], show: int = 5) -> str:
    named = ", ".join(f"{s:05d}" for s in shards[:show])
    return f"shard {named}" if len(shards) == 1 else f"{len(shards)} shards: {named}" + (
        " ..." if len(shards) > show else "")  # fmt: skip


class ShardFailures(RuntimeError):
    """Some shards failed; the others finished and are kept. A user's mistake is one line per
    distinct message, with the shards it stopped; a bug keeps each shard's traceback."""

    def __init__(self, stage: str, failures: Mapping[int, str]):
        self.stage = stage
        self.failures = dict(failures)
        causes: dict[str, list[int]] = {}
        bugs = []
        for shard, msg in sorted(self.failures.items()):
            if msg.startswith(USER_ERROR):
                causes.setdefault(msg[len(USER_ERROR):].strip(), []).append(shard)
            else:
                bugs.append(f"  shard {shard:05d}: {msg}")
        lines = [f"  {msg} ({_shard_list(shards)})" for msg, shards in causes.items()] + bugs
        super().__init__(
            f"{stage}: {len(self.failures)} shard(s) failed; finished shards are kept and a re-run "
            f"redoes only these:\n" + "\n".join(lines)
        )

    @classmethod
    def merged(cls, errors: Sequence[ShardFailures]) -> ShardFailures:
        """One report of several batches' failures of a stage."""
        return cls(errors[0].stage, {s: m for e in errors for s, m in e.failures.items()})


@dataclass
class ShardResults:
    """Results of a map over shards, by shard id."""

    results: dict[int, Any] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Table:
    """A table an engine's SQL reads: Parquet files and the Arrow schema to read them with.

    The schema is explicit so that both engines read exactly the declared columns and types (and
    Spark, which cannot read the float16 embedding columns, never looks at them). ``files`` may be
    empty: the view is then an empty table of that schema.
    """

    files: tuple[str, ...]
    schema: pa.Schema

    @staticmethod
    def of(files: Sequence[str | Path], schema: pa.Schema, columns: Sequence[str] | None = None) -> Table:
        if columns is not None:
            import pyarrow as pa

            schema = pa.schema([schema.field(c) for c in columns])
        return Table(tuple(str(f) for f in files), schema)


class Engine(Protocol):
    """Where a stage's work runs (module docstring)."""

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
        """Run ``fn(shard)`` for every shard.

        Args:
            fn: Picklable callable of one shard id; its result must be small (JSON-able).
            shards: Shard ids to run.
            desc: Label for the progress display.
            weights: Samples per shard, so progress counts samples rather than shards.
            progress: Show progress on the terminal.
            on_result: Called in the driver with each finished shard and its result, as the engine
                learns of it (the download's early warning).
        """
        ...

    one_machine: bool
    """Whether every task runs on this machine (the runner then runs a ``one_model`` step in the driver)."""

    def query(self, sql: str, tables: Mapping[str, Table]) -> pa.Table:
        """Run ``sql`` over ``tables`` (each a view of that name); the result must be small."""
        ...

    def write(self, sql: str, tables: Mapping[str, Table], out: Path, order_by: str | None = None) -> None:
        """Run ``sql`` over ``tables`` and write its rows as Parquet files under the directory ``out``
        (replaced atomically), sorted by ``order_by`` when given (else in the query's own order)
        across the files taken in name order. The rows never pass through the driver."""
        ...


def written_files(out: Path) -> list[Path]:
    """The Parquet files :meth:`Engine.write` left in ``out``, in order."""
    return sorted(Path(out).glob("*.parquet")) if Path(out).is_dir() else []


def read_where(out: Path, column: str, value: Any, columns: Sequence[str] | None = None) -> Any:
    """The rows of a sorted :meth:`Engine.write` output whose ``column`` equals ``value``: pyarrow
    skips every row group whose statistics exclude it, so a task reads about its own rows only."""
    import pyarrow.dataset as ds

    files = written_files(out)
    if not files:
        return None
    data = ds.dataset([str(f) for f in files], format="parquet")
    return data.to_table(columns=list(columns) if columns else None, filter=ds.field(column) == value)


def batches_where(out: Path, column: str, value: Any, columns: Sequence[str], batch_size: int = 8192) -> Any:
    """:func:`read_where` as a stream of record batches (a task that must not hold its rows)."""
    import pyarrow.dataset as ds

    data = ds.dataset([str(f) for f in written_files(out)], format="parquet")
    return data.to_batches(columns=list(columns), filter=ds.field(column) == value, batch_size=batch_size)
