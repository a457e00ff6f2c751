"""The local engine keeps its worker processes from one map to the next, as Spark keeps its Python
workers, and recovers when one dies."""

from __future__ import annotations

import os
import pickle
from concurrent.futures.process import BrokenProcessPool

import pytest

from pipeline.engines.local import LocalEngine


def _pid(shard: int) -> int:
    return os.getpid()


def _die(shard: int) -> int:
    if shard == 1:
        os._exit(3)  # a worker killed mid-task (out of memory, kill -9)
    return shard


def _pids(engine: LocalEngine) -> set[int]:
    result = engine.map_shards(_pid, list(range(8)), desc="pids", progress=False)
    assert not result.failures
    return set(result.results.values())


def test_workers_are_spawned_once_and_kept_across_maps():
    engine = LocalEngine(2)
    first = _pids(engine) | _pids(engine) | _pids(engine)
    assert 1 <= len(first) <= 2 and os.getpid() not in first  # three maps, the same (at most 2) processes
    engine.close()
    after = _pids(engine)  # a closed engine starts new workers at its next map
    assert not after & first
    engine.close()


def test_an_engine_pickles_without_its_workers():
    engine = LocalEngine(2, memory_limit="1GB")
    _pids(engine)
    copy = pickle.loads(pickle.dumps(engine))
    assert copy.workers == 2 and copy.memory_limit == "1GB" and copy._executor is None
    assert _pids(copy) and not _pids(copy) & _pids(engine)
    copy.close()
    engine.close()


def test_a_dead_worker_breaks_that_map_only():
    engine = LocalEngine(2)
    before = _pids(engine)
    with pytest.raises(BrokenProcessPool):
        engine.map_shards(_die, [0, 1, 2, 3], desc="die", progress=False)
    after = _pids(engine)  # the next map starts new workers
    assert after and not after & before
    engine.close()
