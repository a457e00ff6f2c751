"""``curate verify``: check every completion marker against the files it completes.

Each marker records the size, mtime and sha256 of its files (:meth:`Pool.mark_done`). ``verify``
hashes every file against its marker and checks each table's columns and types against the declared
schema (``store/schema.py``); ``deep`` also reads every tar member and every table's data. Damage is
reported per file with the stage that redoes its shard: a re-run of that stage redoes any shard whose
files fail the quick check (:meth:`Pool.is_done`), so the printed command is the repair.

Only the pool is read; nothing is written or removed.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DamagedError
from pipeline.store.parquet import DAMAGED_MARKER, Pool, read_parquet, redo_hint


@dataclass(frozen=True)
class Damage:
    stage: str
    shard: int
    path: Path
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}; {redo_hint(self.stage)}"


def _read_tar(path: Path) -> str | None:
    """None if every member of the tar reads to its end, else what failed."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    f = tar.extractfile(member)
                    while f is not None and f.read(1 << 20):
                        pass
    except (tarfile.TarError, OSError, EOFError) as exc:
        return f"unreadable tar ({exc})"
    return None


def verify(pool: Pool, deep: bool = False) -> Iterator[Damage | int]:
    """Yield a :class:`Damage` per damaged file, then the number of files checked (last)."""
    checked = 0
    for stage in pool.stages():
        damaged: list[tuple[int, Path]] = []
        markers = pool.completed(stage, damaged)
        for shard, path in damaged:
            checked += 1
            yield Damage(stage, shard, path, DAMAGED_MARKER)
        for shard, marker in sorted(markers.items()):
            problems = pool.file_problems(stage, marker, full=True)
            for path, problem in problems:
                yield Damage(stage, shard, path, problem)
            paths = [pool.root / rel for rel in marker.get("files", {})] or [pool.table_path(stage, shard)]
            damaged = {p for p, _ in problems}
            for path in paths:
                checked += 1
                if path in damaged or not path.exists():
                    continue
                problem = None
                try:
                    if path == pool.table_path(stage, shard):
                        pool.check_table_file(stage, path)
                        if deep:
                            read_parquet(path, stage)
                    elif deep and path.suffix == ".tar":
                        problem = _read_tar(path)
                    elif deep and path.suffix == ".parquet":
                        read_parquet(path, stage)
                except DamagedError as exc:
                    problem = str(exc).removeprefix(f"{path}: ").split("; re-run")[0]
                if problem:
                    yield Damage(stage, shard, path, problem)
    yield checked
