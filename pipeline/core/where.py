"""A config's population predicate (``metaclip.where``, ``rebalance.where``, ``download.where``):
bound once against the pool's columns before any task starts, then evaluated per shard over that
shard's own rows.

Binding finds, for every column the predicate reads, the table that owns it, as the ``samples``
view would (the listed rows first, then each stage's table in name order): a column no table has is
a one-line :class:`~pipeline.sqlsafe.SqlError` naming the config key, before any work. A task then
reads just those columns of its own shard (a stage that has not finished the shard gives nulls, as
the view does) and evaluates the predicate in an in-memory DuckDB with no access to files: it never
lists or opens another shard's files, and never goes through the users' views in ``query.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from pipeline.sqlsafe import SqlError, check_expression, column_refs, expression_nodes
from pipeline.store import schema as S

if TYPE_CHECKING:
    from pipeline.store.parquet import Pool


@dataclass(frozen=True)
class Where:
    """A bound predicate: its text and, per owning table, the columns it reads."""

    text: str
    tables: tuple[tuple[str, tuple[str, ...]], ...]


def _base(pool: Pool) -> tuple[str, list[str]]:
    """The table every row comes from, as in the ``samples`` view, and its columns: the listed rows,
    or, for a pool whose list has no ``shard`` column (an earlier version's, a benchmark's), the
    download table."""
    import pyarrow.parquet as pq

    paths = [p for p in pool.listed_paths() if p.exists()]
    names = pq.read_schema(paths[0]).names if paths else []
    if names and all(f.name in names for f in S.INPUT_SCHEMA):
        return S.LISTED, names
    return "download", pool.declared_schema("download").names


def _owners(pool: Pool, refs: set[str], skip: tuple[str, ...], base: str, names: list[str]) -> dict[str, str]:
    owners = {c: base for c in refs if c in names}
    for stage in pool.stages():
        if stage in skip or not pool.table_dir(stage).is_dir():
            continue
        names = pool.declared_schema(stage, pool.table_path(stage, pool.done_shards(stage)[0])).names
        for column in refs:
            if column in names:
                owners.setdefault(column, stage)
    return owners


def bind(pool: Pool, text: str, key: str, skip: tuple[str, ...] = ()) -> Where:
    """``text`` bound against ``pool``'s columns (``skip``: the stages the predicate selects for,
    whose own tables it may not read).

    Raises:
        SqlError: not one expression, a subquery, or a column no table of the pool has; names ``key``.
    """
    check_expression(text, key)
    if expression_nodes(text, "SUBQUERY"):
        raise SqlError(f"{key}: {text!r}: a subquery is not allowed; name the columns of `samples` directly")
    refs = column_refs(text)
    base, names = _base(pool)
    owners = _owners(pool, refs, skip, base, names)
    missing = sorted(refs - set(owners))
    if missing:
        raise SqlError(f"{key}: {text!r} reads {', '.join(missing)}, which no table of {pool.root} has (yet): "
                       "run the stages it reads first, or fix the column name")  # fmt: skip
    tables = {}
    for column, owner in sorted(owners.items()):
        tables.setdefault(owner, [S.UID]).append(column)
    tables.setdefault(base, [S.UID])
    order = [base, *sorted(t for t in tables if t != base)]
    return Where(text, tuple((t, tuple(dict.fromkeys(tables[t]))) for t in order))


def _shard_rows(pool: Pool, table: str, columns: tuple[str, ...], shard: int) -> pa.Table:
    if table == S.LISTED:
        return pool.read_listed(shard, list(columns))
    if not pool.marker_path(table, shard).exists():  # not finished here: nulls, as in `samples`
        schema = pool.declared_schema(table, pool.table_path(table, pool.done_shards(table)[0]))
        return pa.schema([schema.field(c) for c in columns]).empty_table()
    return pool.read_shard(table, shard, columns=list(columns))


def select(pool: Pool, where: Where, shard: int) -> pa.Array:
    """The uids of ``shard``'s rows (listed, or downloaded: :func:`_base`) for which ``where`` holds."""
    import duckdb

    con = duckdb.connect()
    try:
        con.execute("SET enable_external_access = false")
        names = []
        for i, (table, columns) in enumerate(where.tables):
            name = f"t{i}"
            con.register(name, _shard_rows(pool, table, columns, shard))
            names.append(name)
        joins = " ".join(f"LEFT JOIN {n} USING ({S.UID})" for n in names[1:])
        sql = f"SELECT {names[0]}.{S.UID} FROM {names[0]} {joins} WHERE ({where.text})"
        return con.sql(sql).fetch_arrow_table()[S.UID].combine_chunks()
    finally:
        con.close()
