"""DuckDB views over a pool: the read side for ad-hoc SQL, ``curate query`` and ``curate stats``.

One view per stage table (``download``, later ``embed``, ``metaclip``, ``filters``, ``mode``,
``rebalance``: each named after its stage) over that stage's completed shards, and ``samples``,
which left-joins every stage table present onto ``download`` by ``uid``, so one WHERE clause can use
any stage's columns. Pool-wide tables under ``aggregates/`` get a view named after their file
(``metaclip_entry_counts``). DuckDB reads the Parquet files in place; nothing is copied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.store.parquet import Pool, total_counts
from pipeline.store.schema import UID

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

BASE_STAGE = "download"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def connect(pool: Pool, con: duckdb.DuckDBPyConnection | None = None,
            shards: list[int] | None = None) -> duckdb.DuckDBPyConnection:  # fmt: skip
    """Register the pool's views on ``con`` (a new in-memory connection by default), over every
    finished shard or only ``shards`` (a per-shard task's view of its own rows)."""
    import duckdb

    con = con or duckdb.connect()
    stages = [s for s in pool.stages() if pool.table_dir(s).exists()]
    wanted = None if shards is None else set(shards)
    for stage in stages:
        done = [s for s in pool.done_shards(stage) if wanted is None or s in wanted]
        if not done:
            done = pool.done_shards(stage)[:1]  # keeps the view's columns; filtered out below
        files = [str(pool.table_path(stage, s)) for s in done]
        file_list = "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"
        where = "" if wanted is None else f" WHERE shard IN ({', '.join(map(str, sorted(wanted)))})"
        con.execute(
            f"CREATE OR REPLACE VIEW {_quote(stage)} AS SELECT * FROM read_parquet({file_list}, union_by_name=true)"
            + where
        )
    if BASE_STAGE in stages:
        con.execute(f"CREATE OR REPLACE VIEW samples AS {_samples_sql(con, stages)}")
    for path in sorted(pool.aggregates_dir.glob("*.parquet")):  # e.g. metaclip_entry_counts
        quoted = "'" + str(path).replace("'", "''") + "'"
        con.execute(f"CREATE OR REPLACE VIEW {_quote(path.stem)} AS SELECT * FROM read_parquet({quoted})")
    return con


def _samples_sql(con: duckdb.DuckDBPyConnection, stages: list[str]) -> str:
    seen = {row[0] for row in con.execute(f"DESCRIBE {BASE_STAGE}").fetchall()}
    select, joins = [f"{BASE_STAGE}.*"], []
    for stage in stages:
        if stage == BASE_STAGE:
            continue
        cols = [row[0] for row in con.execute(f"DESCRIBE {_quote(stage)}").fetchall()]
        new = [c for c in cols if c not in seen]
        seen.update(new)
        select += [f"{_quote(stage)}.{_quote(c)}" for c in new]
        joins.append(f"LEFT JOIN {_quote(stage)} USING ({UID})")
    return f"SELECT {', '.join(select)} FROM {BASE_STAGE} {' '.join(joins)}"


def select_uids(pool: Pool, shard: int, where: str) -> pa.Array:
    """The uids of one shard's samples for which ``where`` (SQL over ``samples``) holds: how a
    per-shard task applies a population predicate without reading the rest of the pool."""
    con = connect(pool, shards=[shard])
    try:
        return con.sql(f"select {UID} from samples where ({where})").fetch_arrow_table()[UID].combine_chunks()
    finally:
        con.close()


def query(pool: Pool, sql: str) -> pa.Table:
    """Run ``sql`` against the pool's views and return an Arrow table."""
    return connect(pool).sql(sql).fetch_arrow_table()


def stats(pool: Pool) -> dict[str, Any]:
    """Counts per stage: shards done/planned, samples by status, and the error messages of each."""
    plan = pool.read_plan()
    out: dict[str, Any] = {"pool": str(pool.root), "input": plan, "stages": {}}
    con = connect(pool)
    for stage in pool.stages():
        done = pool.completed(stage)
        entry: dict[str, Any] = {
            "shards_done": len(done),
            "shards_planned": plan["num_shards"] if plan else None,
            "counts": total_counts(done),
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
        out["stages"][stage] = entry
    return out


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
    for stage, entry in report["stages"].items():
        lines.append(f"{stage}: {entry['shards_done']}/{entry['shards_planned']} shards done")
        if "status" not in entry:
            lines.append("  " + ", ".join(f"{k}: {v}" for k, v in sorted(entry["counts"].items())))
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
