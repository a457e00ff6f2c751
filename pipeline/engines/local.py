"""Local engine: a pool of worker processes on this machine."""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from pipeline.engines.base import ShardResults
from pipeline.progress import Progress


def _call(fn: Callable[[int], Any], shard: int) -> tuple[bool, Any]:
    try:
        return True, fn(shard)
    except Exception as exc:  # a failed shard is reported, the others go on
        return False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-3)}"


class LocalEngine:
    """Runs each shard in one of ``workers`` processes (spawned, so no thread state is forked).

    With ``workers=1`` the shards run in this process, which keeps tracebacks and debuggers simple.
    """

    name = "local"

    def __init__(self, workers: int = 2):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers

    def map_shards(
        self,
        fn: Callable[[int], Any],
        shards: Sequence[int],
        *,
        desc: str,
        weights: Mapping[int, int] | None = None,
        progress: bool = True,
    ) -> ShardResults:
        out = ShardResults()
        weights = weights or dict.fromkeys(shards, 1)
        bar = Progress(total=sum(weights.get(s, 0) for s in shards), desc=desc, enabled=progress)
        with bar:
            if self.workers == 1 or len(shards) <= 1:
                for shard in shards:
                    self._record(out, shard, _call(fn, shard))
                    bar.update(weights.get(shard, 0))
                return out
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(self.workers, len(shards)), mp_context=ctx) as pool:
                futures = {pool.submit(_call, fn, shard): shard for shard in shards}
                for future in as_completed(futures):
                    shard = futures[future]
                    self._record(out, shard, future.result())
                    bar.update(weights.get(shard, 0))
        return out

    @staticmethod
    def _record(out: ShardResults, shard: int, result: tuple[bool, Any]) -> None:
        ok, value = result
        if ok:
            out.results[shard] = value
        else:
            out.failures[shard] = value
