"""What user SQL may do: a predicate is one expression, a query is one SELECT, and both run on a
connection confined to the pool's own folder.

Predicates (``--where``, ``export.where``, ``rebalance.where``, ``metaclip.where``) are pasted into
the tool's own statements, so text such as ``true) ; COPY (...) TO 'x'; select 1 where (true`` would
otherwise run statements of its own. :func:`check_expression` parses ``SELECT (<text>)`` with
DuckDB's own parser (``extract_statements`` and ``json_serialize_sql``) and accepts it only when
that is one SELECT of one expression with no FROM, WHERE, GROUP BY, set operation or CTE: the text
cannot close the tool's parentheses or add a clause.

``curate query`` and the export's selection then run with DuckDB's external access switched off
after the pool's views are made (``allowed_directories`` = the pool; ``enable_external_access =
false``, which cannot be switched back on): ``read_text('/etc/passwd')``, ``COPY ... TO`` and
``ATTACH`` are refused, and only the pool's own files can be read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import UserError

if TYPE_CHECKING:
    import duckdb


class SqlError(UserError):
    """User SQL that is not allowed or does not parse; the message names where it came from."""


def check_expression(text: str, where: str) -> str:
    """``text`` if it is exactly one SQL expression (a predicate); else :class:`SqlError` naming
    ``where`` it came from (``--where``, ``export.where``)."""
    import duckdb

    sql = f"SELECT ({text})"
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise SqlError(f"{where}: not a SQL expression: {str(exc).splitlines()[0]}") from None
    if len(statements) != 1:
        raise SqlError(f"{where}: must be one SQL expression, not statements ({text!r})")
    tree = parse_tree(sql)
    node = tree["statements"][0]["node"] if not tree.get("error") else {}
    one = (
        node.get("type") == "SELECT_NODE"
        and len(node.get("select_list", [])) == 1
        and node.get("from_table", {}).get("type") == "EMPTY"
        and node.get("where_clause") is None
        and not node.get("group_expressions")
        and node.get("having") is None
        and not node.get("modifiers")
        and not node.get("cte_map", {}).get("map")
    )
    if not one:
        raise SqlError(f"{where}: must be one SQL expression over `samples` (a predicate), got {text!r}")
    return text


def parse_tree(sql: str) -> dict[str, Any]:
    """DuckDB's own parse tree of ``sql`` (``json_serialize_sql``)."""
    import duckdb

    return json.loads(duckdb.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0])


def expression_nodes(text: str, kind: str) -> list[dict[str, Any]]:
    """The nodes of class ``kind`` (``COLUMN_REF``, ``SUBQUERY``, ...) in an expression's parse tree."""
    found: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("class") == kind:
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(parse_tree(f"SELECT ({text})"))
    return found


def column_refs(text: str) -> set[str]:
    """The column names an expression (checked by :func:`check_expression`) reads."""
    return {node["column_names"][-1] for node in expression_nodes(text, "COLUMN_REF")}


def check_query(sql: str, where: str) -> str:
    """``sql`` if it is exactly one SELECT statement (``curate query``, saved queries)."""
    import duckdb

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise SqlError(f"{where}: {str(exc).splitlines()[0]}") from None
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        kinds = ", ".join(s.type.name for s in statements) or "nothing"
        raise SqlError(f"{where}: must be one SELECT statement (read-only); got {kinds}")
    return sql


def confine(con: duckdb.DuckDBPyConnection, root: str | Path) -> duckdb.DuckDBPyConnection:
    """Limit ``con`` to reading ``root`` (the pool) and spilling into its own scratch folder: call
    after its views are made. Irreversible.

    DuckDB adds its ``temp_directory`` to the allowed folders (by default ``.tmp`` in the working
    folder, outside the pool), so it is set first: inside the pool's ``_staging/`` where this
    process may write there, else a private folder of this process under the temp dir (a read-only
    pool). ``allowed_directories`` then holds the pool and that folder, nothing else."""
    import os
    import tempfile

    pool = Path(root).resolve()
    staging = pool / "_staging"
    if os.access(staging if staging.exists() else pool, os.W_OK):
        spill = staging / "duckdb-query"
        spill.mkdir(parents=True, exist_ok=True)
    else:  # this process's own folder, removed when it exits (a reader leaves nothing behind)
        import atexit
        import shutil

        spill = Path(tempfile.mkdtemp(prefix="clipcurate-query-"))
        atexit.register(shutil.rmtree, spill, ignore_errors=True)
    con.execute("SET temp_directory = " + literal(str(spill)))
    folders = ", ".join(literal(str(f).rstrip("/") + "/") for f in (pool, spill))
    con.execute(f"SET allowed_directories = [{folders}]")
    con.execute("SET enable_external_access = false")
    return con


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
