"""DuckDB views over a pool: the read side for ad-hoc SQL, ``curate query`` and ``curate stats``.

``listed`` is the prepared URL list (every row, downloaded or not: ``input/urls.parquet``). One
view per stage table (``download``, later ``embed``, ``metaclip``, ``filters``, ``mode``,
``rebalance``: each named after its stage) over that stage's completed shards, and ``samples``,
which left-joins every stage table present onto ``listed`` by ``uid``, so one WHERE clause can use
any stage's columns, before the download as after it (a row not yet downloaded has a null
``status``). Pool-wide tables under ``aggregates/`` get a view named after their file
(``metaclip_entry_counts``). DuckDB reads the Parquet files in place; nothing is copied.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pipeline.store.parquet import Pool, total_counts
from pipeline.store.schema import UID

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

BASE_STAGE = "download"
LISTED = "listed"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def stage_layout(pool: Pool) -> dict[str, int]:
    """Each stage with a table and its first finished shard: all a per-shard view needs of the
    pool's listing, read once on the driver and handed to the tasks (:func:`connect`)."""
    return {s: pool.done_shards(s)[0] for s in pool.stages() if pool.table_dir(s).exists()}


def connect(pool: Pool, con: duckdb.DuckDBPyConnection | None = None, shards: list[int] | None = None,
            confined: bool = False, skip: Mapping[str, set[int]] | None = None,
            layout: Mapping[str, int] | None = None) -> duckdb.DuckDBPyConnection:  # fmt: skip
    """Register the pool's views on ``con`` (a new in-memory connection by default), over every
    finished shard or only ``shards`` (a per-shard task's view of its own rows).

    Each view selects the columns ``store/schema.py`` declares, by name, from files read without
    ``union_by_name``: the first file is checked against the declared schema, and DuckDB refuses (by
    file name) any later file that lacks a column or has another type, so a damaged table is an
    error, never a column of NULLs. ``confined`` then limits the connection to reading the pool
    (:func:`pipeline.sqlsafe.confine`: user SQL runs on it). ``skip`` leaves out these shards of each
    stage (``curate stats`` passes the damaged ones it reports) instead of refusing. ``layout``
    (:func:`stage_layout`, with ``shards``): a task's view lists no marker folder, it checks only
    its own shards' markers.

    Raises:
        DamagedError: a finished shard's table is missing or has another schema (names the file).
    """
    import duckdb

    con = con or duckdb.connect()
    stages = list(layout) if layout is not None else [s for s in pool.stages() if pool.table_dir(s).exists()]
    wanted = None if shards is None else set(shards)
    for stage in stages:
        if layout is not None and wanted is not None:
            done = [s for s in sorted(wanted) if pool.marker_path(stage, s).exists()] or [layout[stage]]
        else:
            done = [s for s in pool.done_shards(stage) if wanted is None or s in wanted]
        if not done:
            done = pool.done_shards(stage)[:1]  # keeps the view's columns; filtered out below
        if skip and skip.get(stage):
            done = [s for s in done if s not in skip[stage]]
            if not done:
                continue
        files, schema = pool.table_files(stage, done)
        cols = ", ".join(_quote(f.name) for f in schema)
        if stage == BASE_STAGE:  # why each failed row failed, derived (pipeline.download.errors)
            from pipeline.download.errors import error_class_sql
            from pipeline.store.schema import ERROR_CLASS

            cols += f", {error_class_sql()} AS {ERROR_CLASS}"
        file_list = "[" + ", ".join("'" + str(f).replace("'", "''") + "'" for f in files) + "]"
        where = "" if wanted is None else f" WHERE shard IN ({', '.join(map(str, sorted(wanted)))})"
        con.execute(f"CREATE OR REPLACE VIEW {_quote(stage)} AS SELECT {cols} FROM read_parquet({file_list})" + where)
    stages = [s for s in stages if _has_view(con, s)]
    base = _listed_view(pool, con, wanted)
    if base is not None or BASE_STAGE in stages:
        con.execute(f"CREATE OR REPLACE VIEW samples AS {_samples_sql(con, base or BASE_STAGE, stages)}")
    for path in sorted(pool.aggregates_dir.glob("*.parquet")):  # e.g. metaclip_entry_counts
        quoted = "'" + str(path).replace("'", "''") + "'"
        con.execute(f"CREATE OR REPLACE VIEW {_quote(path.stem)} AS SELECT * FROM read_parquet({quoted})")
    if confined:
        from pipeline.sqlsafe import confine

        confine(con, pool.root)
    return con


def _has_view(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = ?", [name]).fetchone()[0])


def _listed_view(pool: Pool, con: duckdb.DuckDBPyConnection, wanted: set[int] | None) -> str | None:
    """The ``listed`` view over the prepared URL list, or None for a pool without one (a pool
    prepared before the list kept its ``shard`` column, or built by a benchmark)."""
    import pyarrow.parquet as pq

    from pipeline.store.schema import INPUT_SCHEMA

    paths = pool.listed_paths()
    if not paths:
        return None
    found = pq.read_schema(paths[0])
    if not all(f.name in found.names for f in INPUT_SCHEMA):
        return None
    where = "" if wanted is None else f" WHERE shard IN ({', '.join(map(str, sorted(wanted))) or 'NULL'})"
    files = ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths)
    con.execute(f"CREATE OR REPLACE VIEW {LISTED} AS SELECT * FROM read_parquet([{files}])" + where)
    return LISTED


def _samples_sql(con: duckdb.DuckDBPyConnection, base: str, stages: list[str]) -> str:
    seen = {row[0] for row in con.execute(f"DESCRIBE {base}").fetchall()}
    select, joins = [f"{base}.*"], []
    for stage in stages:
        if stage == base:
            continue
        cols = [row[0] for row in con.execute(f"DESCRIBE {_quote(stage)}").fetchall()]
        new = [c for c in cols if c not in seen]
        seen.update(new)
        select += [f"{_quote(stage)}.{_quote(c)}" for c in new]
        joins.append(f"LEFT JOIN {_quote(stage)} USING ({UID})")
    return f"SELECT {', '.join(select)} FROM {base} {' '.join(joins)}"


def query(pool: Pool, sql: str) -> pa.Table:
    """Run ``sql`` against the pool's views and return an Arrow table."""
    return connect(pool).sql(sql).fetch_arrow_table()


def completeness(pool: Pool, stages: list[str] | None = None, show: int = 10) -> dict[str, dict[str, Any]]:
    """Per stage (default: every stage with a finished shard): shards done and planned, whether it
    is complete, and its first ``show`` missing shards (a bounded list, whatever the pool's size)."""
    plan = pool.read_plan()
    planned = plan["num_shards"] if plan else 0
    out = {}
    for stage in stages if stages is not None else pool.stages():
        done = set(pool.done_shards(stage))
        first = list(itertools.islice((s for s in range(planned) if s not in done), show))
        count = planned - len(done)
        out[stage] = {"done": len(done), "planned": planned, "complete": count == 0 and planned > 0,
                      "missing": first, "missing_count": count}  # fmt: skip
    return out


def missing_text(entry: dict[str, Any]) -> str:
    """A :func:`completeness` entry's missing shards as text: ``00002, 00005 ...``."""
    more = " ..." if entry["missing_count"] > len(entry["missing"]) else ""
    return ", ".join(f"{m:05d}" for m in entry["missing"]) + more


def format_completeness(report: dict[str, dict[str, Any]]) -> str:
    """One line per incomplete stage (empty when every stage is complete)."""
    return "\n".join(
        f"stage {stage!r} incomplete: {e['done']}/{e['planned']} shards done (missing {missing_text(e)}); "
        "its columns are NULL for those shards' samples"
        for stage, e in report.items() if not e["complete"]
    )


def stats(pool: Pool) -> dict[str, Any]:
    """Counts per stage: shards done/planned, samples by status, and the error messages of each."""
    plan = pool.read_plan()
    out: dict[str, Any] = {"pool": str(pool.root), "input": plan, "stages": {}}
    markers = {stage: pool.completed(stage) for stage in pool.stages()}
    problems = {stage: {s: pool.file_problems(stage, m) for s, m in done.items()} for stage, done in markers.items()}
    con = connect(pool, skip={stage: {s for s, p in by.items() if p} for stage, by in problems.items()})
    complete = completeness(pool)
    if _has_view(con, LISTED):
        from pipeline.store import schema as S

        listed = int(con.execute(f"SELECT count(*) FROM {LISTED}").fetchone()[0])
        left_out, fetched = 0, 0
        if _has_view(con, BASE_STAGE):
            left_out, fetched = (int(v or 0) for v in con.execute(
                "SELECT count(*) FILTER (WHERE status = ?), count(*) FILTER (WHERE status = ?) FROM download",
                [S.STATUS_NOT_SELECTED, S.STATUS_SUCCESS]).fetchone())  # fmt: skip
        # selected: the rows ``download.where`` did not leave out (known per shard once it is downloaded)
        out["samples"] = {"listed": listed, "selected": listed - left_out, "downloaded": fetched}
    for stage, done in markers.items():
        damaged = [(str(path), why) for by_shard in problems[stage].values() for path, why in by_shard]
        entry: dict[str, Any] = {
            "shards_done": len(done),
            "shards_planned": plan["num_shards"] if plan else None,
            "complete": complete[stage]["complete"] and not damaged,
            "counts": _named_rules(pool, stage, total_counts(done)),
            "damaged": damaged[:20],
            "damaged_count": len(damaged),
        }
        if stage == BASE_STAGE:
            rows = con.execute(
                "SELECT status, error_message, count(*) FROM download GROUP BY ALL ORDER BY 1, 3 DESC, 2"
            ).fetchall()
            by_status: dict[str, Any] = {}
            for status, error, n in rows:
                item = by_status.setdefault(status, {"count": 0, "errors": {}})
                item["count"] += n
                if error is not None:
                    item["errors"][error] = n
            entry["samples"] = sum(v["count"] for v in by_status.values())
            entry["status"] = by_status
            classes = con.execute("SELECT error_class, count(*) FROM download WHERE error_class IS NOT NULL "
                                  "GROUP BY 1 ORDER BY 2 DESC, 1").fetchall()  # fmt: skip
            entry["error_classes"] = {name: int(n) for name, n in classes}
        if stage == "metaclip":  # MetaCLIP 2's worldwide balancing: t and kept samples per language
            languages = pool.aggregates_dir / "metaclip_languages.parquet"
            if languages.exists():
                import pyarrow.parquet as pq

                entry["languages"] = pq.read_table(languages).to_pylist()
        out["stages"][stage] = entry
    return out


def _named_rules(pool: Pool, stage: str, counts: dict[str, int]) -> dict[str, int]:
    """The decision counts with each ``dropped_by_rule_<i>`` named by its rule (``dropped_by:
    english``), from the recipe recorded in ``aggregates/decisions.json``."""
    import json

    path = pool.aggregates_dir / "decisions.json"
    if stage != "decisions" or not path.exists():
        return counts
    rules = json.loads(path.read_text()).get("rules") or []
    named = {}
    for key, value in counts.items():
        index = key.removeprefix("dropped_by_rule_")
        if index != key and index.isdigit() and int(index) < len(rules):
            key = f"dropped_by: {rules[int(index)]}"
        named[key] = named.get(key, 0) + value
    return named


def format_stats(report: dict[str, Any], max_errors: int = 8) -> str:
    """``stats()`` as the text ``curate stats`` prints."""
    lines = [f"pool: {report['pool']}"]
    plan = report["input"]
    if plan:
        lines.append(
            f"input: {plan['source_rows']} rows from {plan['source']} "
            f"({plan['duplicates_dropped']} exact duplicates dropped), {plan['num_shards']} shards "
            f"of {plan['samples_per_shard']}"
        )
    if "samples" in report:
        n = report["samples"]
        lines.append(f"samples: {n['listed']} listed, {n['selected']} selected, {n['downloaded']} downloaded")
    for stage, entry in report["stages"].items():
        state = "complete" if entry.get("complete") else "INCOMPLETE"
        lines.append(f"{stage}: {entry['shards_done']}/{entry['shards_planned']} shards done ({state})")
        for path, problem in entry.get("damaged", []):
            lines.append(f"  DAMAGED {path}: {problem}")
        if entry.get("damaged_count", 0) > len(entry.get("damaged", [])):
            lines.append(f"  ... {entry['damaged_count'] - len(entry['damaged'])} more damaged files (`curate verify`)")
        if "status" not in entry:
            lines.append("  " + ", ".join(f"{k}: {v}" for k, v in sorted(entry["counts"].items())))
        if entry.get("error_classes"):
            by_class = ", ".join(f"{k} {v}" for k, v in entry["error_classes"].items())
            lines.append(f"  failed, by error class: {by_class}")
        if entry.get("languages"):
            lines.append(f"  {'language':<9} {'samples':>9} {'matches':>9} {'t':>9} {'tail share':>10} {'kept':>9}")
            for row in entry["languages"]:
                share = "" if row["tail_share"] is None else f"{row['tail_share']:.4f}"
                lines.append(f"  {row['lang']:<9} {row['samples']:>9} {row['matches']:>9} {row['t']:>9g} {share:>10} "
                             f"{row['kept']:>9}")  # fmt: skip
        total = entry.get("samples")
        for status, item in entry.get("status", {}).items():
            share = f"{100 * item['count'] / total:5.1f}%" if total else ""
            lines.append(f"  {status:<20} {item['count']:>9}  {share}")
            errors = sorted(item["errors"].items(), key=lambda kv: -kv[1])
            for message, n in errors[:max_errors]:
                lines.append(f"      {n:>9}  {message[:100]}")
            if len(errors) > max_errors:
                lines.append(f"      ... {len(errors) - max_errors} more error messages")
    return "\n".join(lines)
