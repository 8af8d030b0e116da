"""Read-only SQL over a catalog directory's Parquet files with DuckDB.

Views: `features`, `tokens`, `pullbacks`, `deembed`, `logits`; once statistics are collected, `stats` (per
feature), `top_examples`, `quantile_examples`, `dataset_tokens` and `components` (component tallies); once prompts
are, `prompts` (one row per prompt, with its target), `prompt_nodes` (every node of every prompt's graph, pruned or
not: `kept`) and `prompt_edges` (every nonzero edge of every prompt's unpruned graph, with `prompt_id` and `kept`:
whether pruning kept it).

User SQL is hostile until proven otherwise, so two independent fences hold it: the statement's kind
is parsed (one SELECT, or EXPLAIN of one), and the connection it runs in can read exactly the files
behind the views and nothing else: no other file, no writes, no extensions, no settings changes.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
from circuit_catalog.catalog import layout
from circuit_catalog.catalog.manifest import Manifest
from circuit_catalog.catalog.parquet_io import check_parts

from circuit_catalog.errors import SqlError, first_line

MAX_QUERY_CHARS = 100_000  # DuckDB's parser recurses per nesting level: bound what it is given


def views(root: Path) -> dict[str, list[Path]]:
    """View name -> the Parquet parts behind it (views without parts are left out; `_KEPT_EDGES` is no view but the
    pruned edges `prompt_edges` joins to say which edges pruning kept)."""
    patterns = {
        "features": layout.FEATURES, "tokens": layout.TOKENS, "pullbacks": layout.PULLBACK_PARTS,
        "deembed": layout.DEEMBED_PARTS, "logits": layout.LOGIT_PARTS,
        "stats": layout.stats_part("features"), "top_examples": layout.stats_part("top_examples"),
        "quantile_examples": layout.stats_part("quantile_examples"), "dataset_tokens": layout.stats_part("tokens"),
        "components": layout.stats_part("components"), "prompts": layout.PROMPT_INDEX,
        "prompt_nodes": layout.prompt_part_glob("nodes"), "prompt_edges": layout.prompt_part_glob("edges_full"),
        _KEPT_EDGES: layout.prompt_part_glob("edges"),
    }
    found = {name: layout.part_files(root, pattern) for name, pattern in patterns.items()}
    return {name: files for name, files in found.items() if files}


_KEPT_EDGES = "_kept_edges"
# views that are more than their files (None: no view): `{files}` is the list of the view's parts, `{kept}` the
# pruned edges'; a node id starts with its prompt's id (`catalog.ids`)
_VIEW_SQL = {
    # every stored edge: the pruned graph's (kept) and the unpruned ones (edges_full: all of them with `ingest
    # --unpruned-edges`, else those into the logits and the custom target)
    "prompt_edges": "SELECT split_part(coalesce(e.src, k.src), ':', 1) AS prompt_id, coalesce(e.src, k.src) AS src, "
                    "coalesce(e.dst, k.dst) AS dst, coalesce(e.weight, k.weight) AS weight, k.src IS NOT NULL AS kept "
                    "FROM read_parquet({files}) e FULL OUTER JOIN read_parquet({kept}) k ON e.src = k.src AND e.dst = k.dst",
    _KEPT_EDGES: None,
}


def connect(root: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB whose only data are the catalog's views, sealed before any user text runs."""
    Manifest.read(root)
    parts = views(root)
    check_parts([f for files in parts.values() for f in files])
    con = duckdb.connect()
    listed = {name: "[" + ", ".join(_literal(str(f)) for f in files) + "]" for name, files in parts.items()}
    for name, files in listed.items():
        sql = _VIEW_SQL.get(name, "SELECT * FROM read_parquet({files})")
        if sql is not None:
            con.execute(f"CREATE VIEW {name} AS " + sql.format(files=files, kept=listed.get(_KEPT_EDGES)))
    # the order matters: each setting below is refused once external access is off or the configuration locked
    con.execute("SET temp_directory = ''")  # no spill files: nothing a query does reaches the disk
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute(f"SET allowed_paths = [{', '.join(_literal(str(f)) for files in parts.values() for f in files)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def check_read_only(query: str) -> None:
    """Refuse anything but one SELECT (or EXPLAIN of one), judged by DuckDB's own parser."""
    if len(query) > MAX_QUERY_CHARS:
        raise SqlError(f"query of {len(query):,} characters; at most {MAX_QUERY_CHARS:,}")
    statements = _parse(query)
    if len(statements) != 1:
        raise SqlError("only one SELECT statement at a time (the catalog is read-only here)")
    statement = statements[0]
    kind = statement.type.name
    if kind == "EXPLAIN":
        kind = _explained_kind(statement.query)
    if kind != "SELECT":
        raise SqlError(f"{kind} statements are refused: only SELECT runs here (the catalog is read-only)")


def _explained_kind(text: str) -> str:
    """The kind of statement an EXPLAIN [ANALYZE] [(options)] wraps: the first suffix DuckDB parses alone."""
    tokens = [offset for offset, kind in duckdb.tokenize(text) if kind != duckdb.token_type.comment]
    for offset in tokens[1:]:  # past the EXPLAIN keyword
        try:
            inner = duckdb.extract_statements(text[offset:])
        except duckdb.Error:
            continue
        return inner[0].type.name if len(inner) == 1 else "MULTI"
    return "EXPLAIN"


def _parse(query: str) -> list:
    try:
        return duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise SqlError(first_line(exc)) from None
    except RecursionError:
        raise SqlError("query nested too deeply") from None


def run_sql(root: Path, query: str) -> tuple[list[str], list[tuple]]:
    """(column names, rows) of one read-only statement."""
    check_read_only(query)
    con = connect(root)
    try:
        result = con.execute(query)
        return [d[0] for d in result.description], result.fetchall()
    except duckdb.Error as exc:
        raise SqlError(first_line(exc)) from None
    finally:
        con.close()


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
