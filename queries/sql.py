"""Read-only SQL over a catalog directory's Parquet files with DuckDB.

Views: `features`, `tokens`, `pullbacks`, `deembed`, `logits` and, once statistics are collected,
`stats` (per feature), `top_examples`, `quantile_examples` and `dataset_tokens`. Only SELECT-like statements run.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from catalog import layout
from catalog.errors import UserError, first_line
from catalog.manifest import Manifest

READ_ONLY = {"SELECT", "EXPLAIN"}


class SqlError(UserError):
    """A statement that is malformed or not read-only."""


def views(root: Path) -> dict[str, str]:
    candidates = {
        "features": root / layout.FEATURES, "tokens": root / layout.TOKENS,
        "pullbacks": root / layout.PULLBACKS / "*.parquet", "deembed": root / layout.DEEMBED / "*.parquet",
        "logits": root / layout.LOGITS / "*.parquet", "stats": root / layout.STATS / "features.parquet",
        "top_examples": root / layout.STATS / "top_examples.parquet",
        "quantile_examples": root / layout.STATS / "quantile_examples.parquet", "dataset_tokens": root / layout.STATS / "tokens.parquet",
    }
    return {name: str(path) for name, path in candidates.items() if list(path.parent.glob(path.name))}


def connect(root: Path) -> duckdb.DuckDBPyConnection:
    Manifest.read(root)
    con = duckdb.connect()
    for name, path in views(root).items():
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{path.replace(chr(39), chr(39) * 2)}')")
    return con


def run_sql(root: Path, query: str) -> tuple[list[str], list[tuple]]:
    """(column names, rows) of one read-only statement."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise SqlError(first_line(exc)) from None
    if len(statements) != 1 or statements[0].type.name not in READ_ONLY:
        raise SqlError("only one SELECT statement at a time (the catalog is read-only here)")
    con = connect(root)
    try:
        result = con.execute(query)
        return [d[0] for d in result.description], result.fetchall()
    except duckdb.Error as exc:
        raise SqlError(first_line(exc)) from None
    finally:
        con.close()
