"""The Engine protocol: how a per-shard function is run over many shards.

Stages are engine-free: a stage exposes a picklable ``fn(shard) -> result`` and the engine decides
where it runs (img2dataset's distributors follow the same idea: each one takes the same downloader
callable). The engine reports progress and collects per-shard failures instead of stopping at the
first one, so finished shards are kept and a re-run only redoes the failed ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pipeline.store.parquet import Pool


class ShardFailures(RuntimeError):
    """Some shards failed; the others finished and are kept."""

    def __init__(self, stage: str, failures: Mapping[int, str]):
        self.stage = stage
        self.failures = dict(failures)
        lines = "\n".join(f"  shard {s:05d}: {msg}" for s, msg in sorted(self.failures.items()))
        super().__init__(
            f"{stage}: {len(self.failures)} shard(s) failed; finished shards are kept and a re-run "
            f"redoes only these:\n{lines}"
        )


@dataclass
class ShardResults:
    """Results of a map over shards, by shard id."""

    results: dict[int, Any] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)


class Engine(Protocol):
    """Runs one function over shards."""

    name: str

    def map_shards(
        self,
        fn: Callable[[int], Any],
        shards: Sequence[int],
        *,
        desc: str,
        weights: Mapping[int, int] | None = None,
        progress: bool = True,
    ) -> ShardResults:
        """Run ``fn(shard)`` for every shard.

        Args:
            fn: Picklable callable of one shard id.
            shards: Shard ids to run.
            desc: Label for the progress display.
            weights: Samples per shard, so progress counts samples rather than shards.
            progress: Show progress on the terminal.
        """
        ...


def run_shards(
    pool: Pool,
    engine: Engine,
    fn: Callable[[int], Any],
    shards: Sequence[int],
    *,
    desc: str,
    weights: Mapping[int, int] | None = None,
    progress: bool = True,
) -> dict[int, Any]:
    """``engine.map_shards`` for a stage of ``pool``: the results by shard, or, when some shards
    failed, the manifest updated with the finished ones and :class:`ShardFailures` raised."""
    result = engine.map_shards(fn, shards, desc=desc, weights=weights, progress=progress)
    if result.failures:
        pool.update_manifest()
        raise ShardFailures(desc, result.failures)
    return result.results
