"""A stage as a declared step: what it reads, what it writes, what its output depends on, and a pure
function from Arrow tables to an Arrow table.

A step never opens the pool. It declares

- ``reads``: the tables (and their columns) one shard's call needs (:class:`Read`);
- ``name`` and ``schema``: the table it writes (every schema lives in :mod:`pipeline.store.schema`);
- ``digest``: what its output depends on besides the rows it reads (its config, a pool-wide result's
  digest); a shard finished with another digest is redone;
- ``flips``: the decision columns whose changes on a re-decided shard are counted;
- ``setup()``: a model, automaton or table of centres loaded once per worker process;
- ``__call__(inputs)``: the shard's table from ``{read name: table}``, with no I/O;
- ``counts(out)`` and ``side(inputs, out)``: the marker's counts and small per-shard aggregates;
- ``files`` and ``produce(inputs, shard, scratch)``: a step that makes files beside its table (the
  download's tar, sidecar and stats, written by img2dataset) writes them into an empty scratch
  folder the runner gives it; the runner moves them into place and records them in the marker;
- ``encode(batch)``: a step that reads its shard's images (a :data:`IMAGES` read: the embed step)
  gets them as decoded, preprocessed batches, which ``encode`` turns into Arrow rows as they come;
  ``__call__`` then gets the shard's rows joined, as ``inputs[read.key]``;
- ``one_model``: its ``setup()`` is costly and parallel inside its process (a model, a data loader
  decoding beside it): on one machine the runner runs every shard through one set-up instance in
  the driver, on a cluster one task per shard with the instance cached per worker.

:mod:`pipeline.core.runner` is the only caller: it plans, reads the declared columns, calls the step,
conforms the result to ``schema``, writes it atomically, counts flips and writes the marker.
Anchors: datatrove's ``PipelineStep`` (the executor owns markers and skipping) and NeMo Curator's
``ProcessingStage`` with declared ``inputs()/outputs()`` and ``setup()/process()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.store.schema import LISTED  # noqa: F401 - the prepared URL list, read like a table

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.core.where import Where

SELECTED = "selected"  # the uids a step's ``where`` predicate selects in the shard (one ``uid`` column)


TABLE = "table"  # a stage's table: tables/<table>/{shard}.parquet
SHARD_FILE = "shard_file"  # a pool-wide step's per-shard file: aggregates/<table>/{shard}.parquet
BY_SHARD = "by_shard"  # a pool-wide step's engine output sorted by shard: aggregates/<table>/*.parquet
IMAGES = "images"  # the shard's tar (of the download), decoded and preprocessed in batches: a streaming read


@dataclass(frozen=True)
class Read:
    """One declared input of a step: ``columns`` of a stage's table (or of :data:`LISTED`), or of a
    pool-wide step's result under ``aggregates/`` (``kind``: :data:`SHARD_FILE` or :data:`BY_SHARD`,
    the shard's rows of an engine output sorted by ``shard``; absent: an empty table), or the
    download's tar as batches of images (``kind`` :data:`IMAGES`; ``columns``: what each sample
    brings besides its pixels).

    ``listed_until_downloaded``: a ``download`` read that, for a shard not downloaded yet, takes the
    listed rows instead, with the columns only a download knows as nulls (curating before the
    download: MetaCLIP's order). ``name``: the key of this input in ``inputs`` (default ``table``)."""

    table: str
    columns: tuple[str, ...]
    listed_until_downloaded: bool = False
    kind: str = TABLE
    name: str | None = None

    @property
    def key(self) -> str:
        return self.name or self.table


@dataclass(frozen=True)
class Flips:
    """The decision columns of a step's table whose changes the runner counts on a re-decided shard
    (:func:`pipeline.flips.decision_flips`)."""

    keep: str
    p: str | None = None
    reason: str | None = None


class Step:
    """Base of every per-shard step (module docstring). Subclasses set the class attributes and
    implement ``__call__``; instances carry the resolved config and are pickled to the workers."""

    name: ClassVar[str]
    schema: ClassVar[pa.Schema]
    flips: ClassVar[Flips | None] = None
    # the output differs once the shard is downloaded (sizes known): its digest says which it saw
    redo_once_downloaded: ClassVar[bool] = False
    # the files it makes beside its table: shards/{shard:05d}<suffix>, for each suffix
    files: ClassVar[tuple[str, ...]] = ()
    # a shard done again drops what later stages made of the old one (its tar holds other images)
    forgets_downstream: ClassVar[bool] = False
    # a table whose schema has its vectors' width (the embed tables): the schema of that width, and the
    # vector column that gives it
    sized: ClassVar[Callable[[int], pa.Schema] | None] = None
    sized_column: ClassVar[str] = ""
    # one set-up instance per machine where the engine is one machine (module docstring)
    one_model: ClassVar[bool] = False
    # a streaming step's data loader: samples per batch, decoding processes, largest image decoded
    batch_size: int = 0
    workers: int = 0
    max_pixels: int = 0
    pin_memory: bool = False  # batches in page-locked memory (a step whose model is on CUDA: copied without blocking)
    devices: tuple[str, ...] = ()  # a one-model step on several devices of one machine: one process each (on_device)

    def __init__(self, *, reads: tuple[Read, ...], digest: str, where: Where | None = None):
        self.reads = reads
        self.digest = digest
        self.where = where  # a bound predicate over the pool's samples; its uids arrive as inputs[SELECTED]

    def on_device(self, device: str) -> Step:
        """This step, not set up, for one of :attr:`devices` (a step with devices overrides it)."""
        raise NotImplementedError(f"{self.name} runs on one device")

    def setup(self) -> None:
        """Load what the step holds (once per worker process: the runner keeps the set-up step)."""

    def __call__(self, inputs: dict[str, pa.Table]) -> pa.Table:
        raise NotImplementedError

    def schema_of(self, out: pa.Table) -> pa.Schema:
        """The schema the shard's table ``out`` is written with."""
        if self.sized is None:
            return self.schema
        return self.sized(out.schema.field(self.sized_column).type.list_size)

    def encode(self, batch: dict[str, Any]) -> pa.Table:
        """A streaming step's rows of one batch of its shard's images: ``index`` (the position in the
        tar), ``uid``, ``caption``, ``pixels`` (a tensor; zeros where ``error`` is not None)."""
        raise NotImplementedError

    def transform(self) -> Any:
        """A streaming step's preprocessing of one decoded image (after ``setup()``)."""
        raise NotImplementedError

    @property
    def streams(self) -> bool:
        return any(r.kind == IMAGES for r in self.reads)

    def produce(self, inputs: dict[str, pa.Table], shard: int, scratch: Path) -> pa.Table:
        """A step with ``files`` writes ``scratch/{shard:05d}<suffix>`` for each, and returns its table
        (the runner calls it instead of ``__call__``)."""
        raise NotImplementedError

    def counts(self, out: pa.Table) -> dict[str, int]:
        """The completion marker's counts for the shard's table ``out``."""
        return {"samples": out.num_rows}

    def side(self, inputs: dict[str, pa.Table], out: pa.Table) -> dict[str, pa.Table]:
        """Small per-shard aggregates, by folder under ``aggregates/`` (summed in SQL afterwards)."""
        return {}

    def key(self) -> str:
        """Identifies a set-up step within a worker process: its class, digest and scalar settings
        (the pool's paths among them: two pools with equal digests never share one's centres). What
        ``setup()`` loads (arrays, tables, or anything in an attribute named ``_...``) is not part of
        it, so the key is the same after setup."""
        scalars = sorted((k, v) for k, v in vars(self).items()
                         if not k.startswith("_") and (v is None or isinstance(v, str | int | float)))
        return f"{type(self).__module__}.{type(self).__name__}|{self.name}|{self.digest}|{scalars}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, digest={self.digest!r})"
