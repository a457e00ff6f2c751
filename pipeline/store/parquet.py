"""The pool on disk: per-stage Parquet tables, completion markers and the manifest.

Layout of one pool directory::

    input/urls.parquet            the validated URL list with uids (one file per ingest: urls-00001.parquet ...)
    input/plan.json               source file, its sha256, row and shard counts
    shards/{shard:05d}.tar        WebDataset shard (.jpg/.txt/.json per sample)
    shards/{shard:05d}.parquet    img2dataset's sidecar for the shard
    shards/{shard:05d}_stats.json img2dataset's per-shard stats
    tables/<stage>/{shard:05d}.parquet
    completions/<stage>/{shard:05d}.json   written last: the shard is done for that stage
    aggregates/                   pool-wide results (entry counts, thresholds) + <stage>.json summaries
    reports/<stage>/              plots and tables for people
    manifest.json                 rebuilt from the completions after each run

Every write goes to a temporary name in the same directory and is renamed into place (atomic on
POSIX), so a killed run leaves either the old file or the new one, never half of one. A shard counts
as done only once its completion marker exists (datatrove's ``completions/{rank:05d}`` habit), and
a re-run redoes exactly the shards without one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DamagedError, UserError
from pipeline.store.schema import STAGE_SCHEMAS

log = logging.getLogger(__name__)

TRACKED_PACKAGES = (
    "clipcurate", "img2dataset", "webdataset", "pyarrow", "duckdb", "prefect", "numpy", "pillow",
    "open_clip_torch", "torch", "faiss-cpu", "pyspark",
)  # fmt: skip


def shard_name(shard: int) -> str:
    """The zero-padded name every per-shard file uses."""
    return f"{shard:05d}"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success rename it over ``path``, else remove it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def vector_write_options(schema: pa.Schema) -> dict[str, Any]:
    """Parquet writer options that leave vector columns (lists of floats) without a dictionary and
    without min/max statistics: neither helps a column of embeddings (no value repeats; no reader
    prunes on a vector's minimum), and trying both made writing a shard of 100,000 768-d float16
    vectors 3.7x slower (6.4 s against 1.7 s). The values are stored as before."""
    plain = [f.name for f in schema if not (pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type))
             or not pa.types.is_floating(f.type.value_type)]  # fmt: skip
    if len(plain) == len(schema):
        return {}
    return {"use_dictionary": plain, "write_statistics": plain}


def write_parquet_atomic(path: Path, table: pa.Table, **options: Any) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", **{**vector_write_options(table.schema), **options})


def walk_files(folder: Path) -> list[str]:
    """Every file and symbolic link under ``folder`` (links are not followed), as sorted relative
    ``/`` paths: what a folder of ours holds, to compare with what we recorded writing there."""
    found = []
    for top, dirs, files in os.walk(folder, followlinks=False):
        here = Path(top)
        found += [(here / f).relative_to(folder).as_posix() for f in files]
        found += [(here / d).relative_to(folder).as_posix() for d in dirs if (here / d).is_symlink()]
    return sorted(found)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (URL lists, checkpoints, release shards)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_METADATA_ONLY: dict[tuple[str, int, int], bool] = {}  # Pool.metadata_only by (markers' folder, its mtime, count)


@functools.lru_cache(maxsize=16)
def _weights_sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def weights_sha256(path: str | Path) -> str:
    """A model's weights file's sha256, cached by (path, size, mtime): hashed once per process while
    unchanged, though every plan of the embed step digests it."""
    stat = Path(path).stat()
    return _weights_sha256(str(path), stat.st_size, stat.st_mtime_ns)


def recorded_change(path: Path, want: dict[str, Any], full: bool = False) -> tuple[str, int] | None:
    """How ``path`` differs from its record (``size``, ``mtime_ns``, ``sha256``): None when it does
    not, else ``("missing", 0)``, ``("size", size now)`` or ``("bytes", size)``. rsync's quick
    check: a ``stat``, and the sha256 only where the size matches and the mtime moved (``full``:
    always)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing", 0
    if st.st_size != want["size"]:
        return "size", st.st_size
    if (full or st.st_mtime_ns != want["mtime_ns"]) and file_sha256(path) != want["sha256"]:
        return "bytes", st.st_size
    return None


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def total_counts(markers: dict[int, dict[str, Any]]) -> dict[str, int]:
    """The per-shard counts of completion markers, summed."""
    totals: dict[str, int] = {}
    for marker in markers.values():
        for key, value in marker["counts"].items():
            totals[key] = totals.get(key, 0) + value
    return totals


# the command that redoes a stage's shards (a re-run redoes every shard whose files are damaged)
REDO_COMMANDS = {
    "download": "curate download CONFIG", "embed": "curate embed CONFIG", "caption_embed": "curate embed CONFIG",
    "metaclip_match": "curate metaclip CONFIG", "metaclip": "curate metaclip CONFIG",
    "filters": "curate filter CONFIG", "image_based": "curate filter CONFIG", "dedup": "curate filter CONFIG",
    "decisions": "curate filter CONFIG", "mode": "curate mode CONFIG", "rebalance": "curate rebalance CONFIG",
}  # fmt: skip


def redo_hint(stage: str) -> str:
    """How to redo a damaged shard of ``stage`` (``curate run CONFIG`` redoes every stage's)."""
    return f"re-run stage {stage!r} (`{REDO_COMMANDS.get(stage, 'curate run CONFIG')}` or `curate run CONFIG`)"


DAMAGED_MARKER = "damaged completion marker (not the JSON this tool writes)"


def read_marker(path: Path) -> dict[str, Any] | None:
    """A completion marker as written by :meth:`Pool.mark_done`, or None when it is missing or
    damaged (random bytes, truncated JSON, another shape)."""
    try:
        marker = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    ok = isinstance(marker, dict) and isinstance(marker.get("counts"), dict) and isinstance(marker.get("shard"), int)
    return marker if ok and isinstance(marker.get("files", {}), dict) else None


def read_schema(path: Path, stage: str) -> pa.Schema:
    """A Parquet file's schema; an unreadable footer is a :class:`DamagedError` naming the file."""
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise DamagedError(f"{path}: unreadable Parquet ({exc}); {redo_hint(stage)}") from None


def read_parquet(path: Path, stage: str, columns: list[str] | None = None) -> pa.Table:
    """A table file of ``stage``; reading errors name the file and the stage to re-run."""
    try:
        return pq.read_table(path, columns=columns)
    except FileNotFoundError:
        raise DamagedError(f"{path}: missing; {redo_hint(stage)}") from None
    except (OSError, pa.ArrowException) as exc:
        raise DamagedError(f"{path}: unreadable Parquet ({exc}); {redo_hint(stage)}") from None


# the entries of a pool's root the tool writes (hidden ones too: locks); anything else there, such as
# a release folder (the demo's `release/`), is not the pool's data
POOL_ENTRIES = frozenset({"manifest.json", "input", "_staging", "aggregates", "reports", "report", "shards",
                          "tables", "completions"})  # fmt: skip


class Pool:
    """A pool directory and the rules for writing into it. Cheap to create; holds no open files."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"{self.root}: is a file, not a pool directory")

    def __repr__(self) -> str:
        return f"Pool({str(self.root)!r})"

    # paths --------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def input_path(self) -> Path:
        return self.root / "input" / "urls.parquet"

    @property
    def plan_path(self) -> Path:
        return self.root / "input" / "plan.json"

    @property
    def staging_dir(self) -> Path:
        return self.root / "_staging"

    @property
    def aggregates_dir(self) -> Path:
        return self.root / "aggregates"

    def report_dir(self, stage: str) -> Path:
        return self.root / "reports" / stage

    def shard_tar(self, shard: int) -> Path:
        return self.root / "shards" / f"{shard_name(shard)}.tar"

    def table_dir(self, stage: str) -> Path:
        return self.root / "tables" / stage

    def table_path(self, stage: str, shard: int) -> Path:
        return self.table_dir(stage) / f"{shard_name(shard)}.parquet"

    def marker_path(self, stage: str, shard: int) -> Path:
        return self.root / "completions" / stage / f"{shard_name(shard)}.json"

    # completion ---------------------------------------------------------------------------
    def done_shards(self, stage: str) -> list[int]:
        """Sorted shard ids with a completion marker for ``stage``: one directory listing, no
        marker is parsed (what planning needs; :meth:`completed` when the counts are needed)."""
        base = self.root / "completions" / stage
        if not base.is_dir():
            return []
        return sorted(int(e.name[:-5]) for e in os.scandir(base) if e.name.endswith(".json") and e.name[:1].isdigit())

    def metadata_only(self) -> bool:
        """Whether the pool is curated from its metadata alone: its download has run and fetched
        nothing (``download.where`` selected no row: DataComp's filtering track, where a participant
        gets the metadata and published embeddings and submits uids, never fetching an image). Such a
        pool is curated as listed: the implicit ``downloaded`` and ``decoded`` rules do not apply,
        imported embeddings attach to every listed row, and an export writes its uids only. One
        fetched row anywhere makes it a downloaded pool again (its decisions and import are redone)."""
        folder = self.root / "completions" / "download"
        try:
            # a marker is written by a rename into the folder: its mtime, and the count, change
            key = (str(folder.resolve()), folder.stat().st_mtime_ns, len(self.done_shards("download")))
        except FileNotFoundError:
            return False
        if key not in _METADATA_ONLY:  # every plan of the embed step asks: the markers are read once per change
            done = self.completed("download")
            _METADATA_ONLY[key] = bool(done) and all(m["counts"].get("not_selected", 0) == m["counts"].get("samples", 0)
                                                     for m in done.values())  # fmt: skip
        return _METADATA_ONLY[key]

    def completed(self, stage: str, damaged: list[tuple[int, Path]] | None = None) -> dict[int, dict[str, Any]]:
        """Completion markers of ``stage`` by shard id (each parsed: call once per step).

        Raises:
            DamagedError: a marker is not the JSON this tool writes (names it), unless ``damaged`` is
                given: then each such (shard, path) is appended to it and left out.
        """
        done = {}
        for path in sorted((self.root / "completions" / stage).glob("[0-9]*.json")):
            marker = read_marker(path)
            if marker is not None:
                done[int(path.stem)] = marker
            elif damaged is not None:
                damaged.append((int(path.stem), path))
            else:
                raise DamagedError(f"{path}: {DAMAGED_MARKER}; {redo_hint(stage)}")
        return done

    def marker(self, stage: str, shard: int) -> dict[str, Any]:
        """One shard's completion marker.

        Raises:
            DamagedError: it is missing or not the JSON this tool writes (names it)."""
        path = self.marker_path(stage, shard)
        marker = read_marker(path)
        if marker is None:
            raise DamagedError(f"{path}: {DAMAGED_MARKER if path.exists() else 'missing'}; {redo_hint(stage)}")
        return marker

    def is_done(self, stage: str, shard: int, config_hash: str | None = None) -> bool:
        """Whether ``stage`` finished ``shard`` (with ``config_hash``, when given) and the files its
        marker completes are still intact (:meth:`file_problems`, quick): a shard whose table was
        deleted, truncated or rewritten since is redone by the next run, whatever its marker says."""
        return self.done_marker(stage, shard, config_hash) is not None

    def done_marker(self, stage: str, shard: int, config_hash: str | None = None) -> dict[str, Any] | None:
        """The marker of a finished shard, as :meth:`is_done` judges it (one read), else None."""
        path = self.marker_path(stage, shard)
        if not path.exists():
            return None
        marker = read_marker(path)
        if marker is None:  # damaged: the stage that owns it redoes the shard
            log.warning("%s: %s; shard %05d of stage %r will be redone", path, DAMAGED_MARKER, shard, stage)
            return None
        if config_hash is not None and marker.get("config_hash") != config_hash:
            return None
        problems = self.file_problems(stage, marker)
        for file, problem in problems:
            log.warning("%s: %s; shard %05d of stage %r will be redone", file, problem, shard, stage)
        return None if problems else marker

    def file_problems(self, stage: str, marker: dict[str, Any], full: bool = False) -> list[tuple[Path, str]]:
        """What is wrong with the files ``marker`` completes: missing, another size, other bytes.

        Quick (the default): a ``stat`` per file, and the sha256 only of a file whose size matches but
        whose mtime moved (rsync's quick check), so planning a run costs one stat per file. ``full``
        hashes every file (``curate verify``). Markers written before files were recorded are checked
        for their table's existence only."""
        files = marker.get("files")
        if files is None:
            table = self.table_path(stage, marker["shard"])
            legacy = self.table_dir(stage).is_dir() and not table.exists()
            return [(table, "missing (its completion marker says done)")] if legacy else []
        problems = []
        for rel, want in files.items():
            path = self.root / rel
            change = recorded_change(path, want, full)
            if change is None:
                continue
            kind, size = change
            if kind == "missing":
                problems.append((path, "missing (its completion marker says done)"))
            elif kind == "size":
                how = "truncated?" if size < want["size"] else "rewritten?"
                problems.append((path, f"{size} bytes, its marker recorded {want['size']} ({how})"))
            else:
                problems.append((path, "its bytes differ from the sha256 its marker recorded (damaged)"))
        return problems

    def damaged_files(self, stage: str, full: bool = False) -> list[tuple[Path, str]]:
        """Every (file, problem) of ``stage``'s finished shards, by the quick check of
        :meth:`file_problems` (``full``: every file hashed)."""
        return [problem for marker in self.completed(stage).values()
                for problem in self.file_problems(stage, marker, full)]  # fmt: skip

    def content_digest(self, stages: list[str]) -> str:
        """What a pool-wide result computed over ``stages`` depends on: every finished shard's marker
        digest and the sha256 of each file it completes (one read per marker, no file hashed). A
        grown pool, or a shard redone with other content, gives another digest."""
        h = hashlib.sha256()
        for stage in stages:
            for shard, marker in sorted(self.completed(stage).items()):
                h.update(f"{stage}|{shard}|{marker.get('config_hash')}".encode())
                for rel, want in sorted((marker.get("files") or {}).items()):
                    h.update(f"|{rel}|{want['sha256']}".encode())
        return h.hexdigest()[:16]

    def require_intact(self, stages: list[str], full: bool = False) -> None:
        """Refuse to read ``stages`` while a file one of their markers completes is missing or damaged
        (a stat per file; the sha256 only of a file whose mtime moved; ``full``: of every file, the
        path to a release, since bit rot keeps the mtime).

        Raises:
            DamagedError: names the first damaged file, how many more, and the stage to re-run.
        """
        problems = [(stage, path, why) for stage in stages for path, why in self.damaged_files(stage, full)]
        if problems:
            stage, path, why = problems[0]
            more = f" ({len(problems) - 1} more damaged files: `curate verify {self.root}` lists them)" if len(
                problems) > 1 else ""  # fmt: skip
            raise DamagedError(f"{path}: {why}; {redo_hint(stage)}{more}")

    def shard_sizes(self, shards: list[int]) -> dict[int, int]:
        """Input rows in each of ``shards`` (from the plan): the progress weight of a shard."""
        plan = self.read_plan() or {}
        per, n = plan.get("samples_per_shard", 1), plan.get("num_rows", 0)
        return {s: min(per, n - s * per) for s in shards}

    def listed_shards(self) -> list[int]:
        """Every planned shard (the URL list is prepared; nothing need be downloaded)."""
        plan = self.read_plan()
        if plan is None:
            raise UserError(f"{self.root}: no input prepared yet; run `curate prepare` or the download stage first")
        return list(range(plan["num_shards"]))

    def listed_paths(self, plan: dict[str, Any] | None = None) -> list[Path]:
        """The prepared URL list's files, one per ingest (``urls.parquet``, then ``urls-00001.parquet``
        ... for the files a growing pool took in later), in shard order."""
        plan = plan if plan is not None else self.read_plan()
        ingests = (plan or {}).get("ingests")
        if not ingests:
            return [self.input_path] if self.input_path.exists() else []
        return [self.input_path.parent / ingest["file"] for ingest in ingests]

    def listed_location(self, shard: int, plan: dict[str, Any] | None = None) -> tuple[Path, int]:
        """The file of the prepared list that holds ``shard`` and the shard's row group in it."""
        plan = plan if plan is not None else self.read_plan()
        for ingest in (plan or {}).get("ingests") or []:
            if ingest["first_shard"] <= shard < ingest["first_shard"] + ingest["num_shards"]:
                return self.input_path.parent / ingest["file"], shard - ingest["first_shard"]
        return self.input_path, shard

    def read_listed(self, shard: int, columns: list[str] | None = None) -> pa.Table:
        """One shard's rows of the prepared URL list (every row, in input order, as the download
        table has them): what the text stages read before the download."""
        path, group = self.listed_location(shard)
        return pq.ParquetFile(path).read_row_group(group, columns=columns)

    def require_complete(self, stage: str) -> list[int]:
        """All planned shards, once ``stage`` has finished every one of them.

        Raises:
            ValueError: some shards of ``stage`` are not done yet; names how many.
        """
        plan = self.read_plan()
        if plan is None:
            raise UserError(f"{self.root}: no input prepared yet; run the download stage first")
        done = set(self.done_shards(stage))
        missing = [s for s in range(plan["num_shards"]) if s not in done]
        if missing:
            raise UserError(
                f"{self.root}: stage {stage!r} has {len(done)}/{plan['num_shards']} shards done "
                f"(first missing: {missing[0]:05d}); finish it first"
            )
        return list(range(plan["num_shards"]))

    def mark_done(self, stage: str, shard: int, config_hash: str, counts: dict[str, int],
                  files: list[Path] | None = None) -> None:  # fmt: skip
        """Write the completion marker: the last write of a shard's stage. It records the size,
        mtime and sha256 of each file it completes (default: the stage's table for the shard), which
        :meth:`is_done` and ``curate verify`` check."""
        if files is None:
            table = self.table_path(stage, shard)
            files = [table] if table.exists() else []
        recorded = {}
        for path in files:
            st = path.stat()
            recorded[str(path.relative_to(self.root))] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                                          "sha256": file_sha256(path)}  # fmt: skip
        marker = {"shard": shard, "config_hash": config_hash, "counts": counts, "finished_at": time.time(),
                  "files": recorded}  # fmt: skip
        write_json_atomic(self.marker_path(stage, shard), marker)

    def forget_shard(self, shard: int, keep: tuple[str, ...] = ()) -> None:
        """Remove ``shard``'s completion markers of every stage but ``keep`` (only markers: the
        tool's own files, so the next run of those stages redoes the shard)."""
        base = self.root / "completions"
        if base.is_dir():
            for entry in os.scandir(base):
                if entry.is_dir() and entry.name not in keep:
                    self.marker_path(entry.name, shard).unlink(missing_ok=True)

    def stage_config(self, stage: str) -> dict[str, Any] | None:
        """What :meth:`check_stage_config` recorded for ``stage``: ``{"config", "config_hash"}``."""
        path = self.root / "completions" / stage / "config.json"
        return json.loads(path.read_text()) if path.exists() else None

    def check_stage_config(self, stage: str, config: dict[str, Any], config_hash: str) -> None:
        """Record the config a stage first ran with; refuse to mix shards made with another.

        Raises:
            ValueError: finished shards of ``stage`` were made with a different config; the message
                names the keys that differ.
        """
        path = self.root / "completions" / stage / "config.json"
        config = json.loads(json.dumps(config, default=str))  # compare as stored: tuples become lists
        recorded = self.stage_config(stage)
        if recorded is not None:
            if recorded["config_hash"] != config_hash and self.completed(stage):
                old = recorded["config"]
                changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
                diffs = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in changed)
                raise UserError(
                    f"{self.root}: {len(self.completed(stage))} shard(s) of stage {stage!r} were made with "
                    f"another config ({diffs}). Use a new pool directory, or delete "
                    f"{self.root / 'completions' / stage} to redo the stage."
                )
            if recorded["config_hash"] == config_hash:
                return
        write_json_atomic(path, {"config_hash": config_hash, "config": config})

    # tables -------------------------------------------------------------------------------
    def _fixed_schema(self, stage: str) -> pa.Schema | None:
        """A stage's declared schema where it does not depend on a file of the stage: the download
        table's extra columns are the prepared input's (``download.extra_cols``, ``bbox_col``)."""
        if stage != "download":
            return STAGE_SCHEMAS.get(stage)
        from pipeline.store import schema as S

        if not self.input_path.exists():
            return S.DOWNLOAD_SCHEMA
        extra = [f for f in pq.read_schema(self.input_path) if f.name not in S.INPUT_SCHEMA.names]
        plan = self.read_plan() or {}
        if plan.get("bbox_col"):
            extra.append(pa.field(S.BLURRED, pa.bool_()))
        return S.download_schema(extra, attempts=bool(plan.get("download_attempts")))

    def write_table(self, stage: str, shard: int, table: pa.Table) -> Path:
        schema = self._fixed_schema(stage)
        if schema is not None and not table.schema.equals(schema):
            raise ValueError(f"{stage} table for shard {shard} does not match its schema:\n{table.schema}")
        path = self.table_path(stage, shard)
        write_parquet_atomic(path, table)
        return path

    def table_schema(self, stage: str) -> pa.Schema:
        """The declared schema of a stage's table (the embedding tables' depends on the dimension,
        so it is read from their first file)."""
        if stage in STAGE_SCHEMAS:
            return self._fixed_schema(stage)
        done = self.done_shards(stage)
        if not done:
            raise UserError(f"{self.root}: stage {stage!r} has no finished shard")
        return pq.read_schema(self.table_path(stage, done[0]))

    def declared_schema(self, stage: str, path: Path | None = None, found: pa.Schema | None = None) -> pa.Schema:
        """The schema ``store/schema.py`` declares for ``stage``'s tables; the embedding tables' take
        their dimension from ``path`` (a file of the stage; ``found``: its schema, already read)."""
        if stage in STAGE_SCHEMAS:
            return self._fixed_schema(stage)
        from pipeline.store import schema as S

        makers = {"embed": (S.embed_schema, S.IMAGE_EMBEDDING),
                  "caption_embed": (S.caption_embed_schema, S.CAPTION_EMBEDDING)}  # fmt: skip
        if stage not in makers or path is None:
            return self.table_schema(stage)
        make, column = makers[stage]
        found = found if found is not None else read_schema(path, stage)
        if column not in found.names or not pa.types.is_fixed_size_list(found.field(column).type):
            raise DamagedError(f"{path}: no {column} column of fixed-size lists; {redo_hint(stage)}")
        if stage == "embed":  # with the further scorers' columns its files carry (embed.scorers)
            return make(found.field(column).type.list_size, S.scorers_of(found), S.WATERMARK in found.names)
        return make(found.field(column).type.list_size)

    def check_table_file(self, stage: str, path: Path) -> pa.Schema:
        """Refuse a table file whose columns or types are not the declared ones (never read as NULLs);
        returns the declared schema (one footer read).

        Raises:
            DamagedError: names the file, the columns at fault and the stage to re-run."""
        found = read_schema(path, stage)
        want = self.declared_schema(stage, path, found)
        bad = [f"{f.name} ({'missing' if f.name not in found.names else found.field(f.name).type})"
               for f in want if f.name not in found.names or not found.field(f.name).type.equals(f.type)]  # fmt: skip
        if bad:
            raise DamagedError(f"{path}: column(s) {', '.join(bad)} differ from the {stage} schema; {redo_hint(stage)}")
        return want

    def table_files(self, stage: str, shards: list[int]) -> tuple[list[Path], pa.Schema]:
        """The table files of ``shards`` of ``stage``, each checked to exist, and the declared schema
        the first one was checked against (DuckDB then refuses, by file name, any later file that
        differs from the first when read without ``union_by_name``).

        Raises:
            DamagedError: a file is missing although its marker says done, or has another schema."""
        paths = [self.table_path(stage, s) for s in shards]
        for path in paths:
            if not path.exists():
                raise DamagedError(f"{path}: missing although its completion marker says done; {redo_hint(stage)}")
        schema = self.check_table_file(stage, paths[0]) if paths else self._fixed_schema(stage) or pa.schema([])
        return paths, schema

    def read_shard(self, stage: str, shard: int, columns: list[str] | None = None) -> pa.Table:
        """One shard's table of ``stage``; errors name the file and the stage to re-run."""
        return read_parquet(self.table_path(stage, shard), stage, columns)

    def table(self, stage: str, columns: list[str] | None = None, shards: list[int] | None = None) -> Any:
        """The stage's finished shards as an engine :class:`~pipeline.engines.base.Table` (files and
        declared schema), optionally only ``columns`` and ``shards``."""
        from pipeline.engines.base import Table

        done = self.done_shards(stage)
        if shards is not None:
            wanted = set(shards)
            done = [s for s in done if s in wanted]
        files, schema = self.table_files(stage, done)
        return Table.of(files, schema, columns)

    def read_table(self, stage: str, columns: list[str] | None = None) -> pa.Table:
        """All completed shards of a stage's table, in shard order (small pools and tests: a pool-wide
        step reads per shard or through the engine's SQL instead)."""
        paths, schema = self.table_files(stage, self.done_shards(stage))
        if not paths:
            return schema.empty_table() if columns is None else schema.empty_table().select(columns)
        return pa.concat_tables(read_parquet(p, stage, columns) for p in paths)

    def stages(self) -> list[str]:
        """Stages with at least one completed shard."""
        base = self.root / "completions"
        return sorted(p.name for p in base.iterdir() if self.done_shards(p.name)) if base.exists() else []

    # manifest -----------------------------------------------------------------------------
    def read_plan(self) -> dict[str, Any] | None:
        return json.loads(self.plan_path.read_text()) if self.plan_path.exists() else None

    def update_manifest(self) -> dict[str, Any]:
        """Rebuild manifest.json from the completion markers (the markers are the truth)."""
        manifest = self.build_manifest()
        write_json_atomic(self.manifest_path, manifest)
        return manifest

    def build_manifest(self) -> dict[str, Any]:
        """The manifest from the completion markers and the stage summaries, without writing it."""
        plan = self.read_plan()
        stages: dict[str, Any] = {}
        for stage in self.stages():
            done = self.completed(stage)
            stages[stage] = {
                "config_hash": sorted({m["config_hash"] for m in done.values()}),
                "shards_done": sorted(done),
                "shards_planned": plan["num_shards"] if plan else None,
                "counts": total_counts(done),
            }
        summaries = {p.stem: json.loads(p.read_text()) for p in sorted(self.aggregates_dir.glob("*.json"))}
        return {
            "pool": str(self.root.resolve()),
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "input": plan,
            "stages": stages,
            "stage_results": summaries,
            "package_versions": package_versions(),
        }
