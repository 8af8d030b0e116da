"""User SQL and Cypher cannot write, read files outside the catalog's views, or brick the store.

Each escape is the real statement an audit ran against the previous checks (a deny-list of write
clauses, a grep for SELECT); each must now fail with one line and leave every file as it was.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from circuit_catalog.catalog import layout
from circuit_catalog.catalog.cypher_check import NotReadOnly, check_read_only
from circuit_catalog.catalog.ladybug_store import LadybugStore
from circuit_catalog.ingest.job import build_manifest, run_ingest
from circuit_catalog.ingest.settings import IngestSettings
from circuit_catalog.ingest.prompts import run_prompts
from circuit_catalog.ingest.settings import AttributionSettings, PromptSpec
from circuit_catalog.queries.lookups import named_query, query_names
from circuit_catalog.queries.sql import connect, run_sql
from click.testing import CliRunner

from circuit_catalog.cli import main
from circuit_catalog.errors import CypherError, SqlError
from tests.conftest import random_transcoders


@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory, gpt2) -> Path:
    root = tmp_path_factory.mktemp("secure")
    tset = random_transcoders(gpt2, d_sae=8, seed=3)
    run_ingest(gpt2, tset, root, build_manifest(gpt2, "tiny", tset, "mem", IngestSettings(top_k=2, token_top_k=3)), progress=False)
    run_prompts(gpt2, tset, root, [PromptSpec("the capital of france is")], AttributionSettings(max_feature_nodes=20), progress=False)
    return root


@pytest.fixture()
def catalog(small_catalog, tmp_path) -> Path:
    """A private copy, loaded: tests here try to damage it."""
    root = tmp_path / "catalog"
    shutil.copytree(small_catalog, root)
    assert LadybugStore(root / layout.GRAPH).load(root, progress=False)
    return root


def digest(root: Path) -> dict[str, str]:
    """Every file's content hash (the writer lock's PID note aside)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != layout.WRITER_LOCK}


def cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def one_line_error(code: int, output: str) -> str:
    assert code == 1 and "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    return lines[0]


# ---------------------------------------------------------------- SQL

SQL_ESCAPES = [
    "EXPLAIN ANALYZE COPY (SELECT 'echo owned') TO '{out}/evil.sh'",
    "EXPLAIN ANALYZE COPY (SELECT * FROM features LIMIT 1) TO '{root}/features.parquet' (FORMAT parquet)",
    "EXPLAIN ANALYZE INSTALL httpfs",
    "/* hidden */ explain analyze copy features to '{out}/f.csv'",
    "COPY features TO '{out}/f.csv'",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_blob('/etc/passwd')",
    "SELECT * FROM glob('/*')",
    "SELECT * FROM read_parquet('{other}/features.parquet')",
    "SELECT * FROM read_parquet('{root}/prompts/*/nodes.parquet')",
    "SELECT * FROM features; COPY features TO '{out}/f.csv'",
    "ATTACH '{out}/x.duckdb' AS x",
    "SET enable_external_access = true",
    "PRAGMA enable_profiling",
    "CALL pragma_version()",
    "CREATE TABLE t AS SELECT 1",
    "SELECT * FROM query('COPY features TO ''{out}/f.csv''')",
]


@pytest.mark.parametrize("template", SQL_ESCAPES)
def test_sql_escape_fails_and_writes_nothing(catalog, stats_catalog, tmp_path, template):
    out = tmp_path / "out"
    out.mkdir()
    query = template.format(root=catalog, out=out, other=stats_catalog[0])
    before = digest(catalog)
    with pytest.raises(SqlError):
        run_sql(catalog, query)
    assert list(out.iterdir()) == [] and digest(catalog) == before


def test_sql_connection_is_sealed_past_the_statement_check(catalog, stats_catalog, tmp_path):
    """The second fence alone: the connection user SQL runs in reads the views' files and nothing else."""
    import duckdb

    con = connect(catalog)
    assert con.execute("SELECT count(*) FROM features").fetchone()[0] == 24
    for statement in (f"COPY (SELECT 1) TO '{tmp_path}/x.csv'", "SELECT * FROM read_text('/etc/passwd')",
                      f"SELECT * FROM read_parquet('{stats_catalog[0]}/features.parquet')", "SET enable_external_access = true",
                      "SET allowed_paths = ['/etc/passwd']", "INSTALL httpfs"):
        with pytest.raises(duckdb.Error):
            con.execute(statement)
    con.close()
    assert not (tmp_path / "x.csv").exists()


def test_sql_reads_still_work(catalog):
    assert run_sql(catalog, "EXPLAIN SELECT count(*) FROM pullbacks")[0]
    assert run_sql(catalog, "/* c */ WITH x AS (SELECT layer FROM features) SELECT count(*) FROM x")[1] == [(24,)]
    assert run_sql(catalog, "SUMMARIZE tokens")[1]


# ---------------------------------------------------------------- Cypher

CYPHER_ESCAPES = [
    "LOAD FROM '/etc/passwd' (header=false, delim=':') RETURN *",
    "WITH 1 AS x LOAD FROM '/etc/passwd' (file_format='csv') RETURN *",
    "COPY (MATCH (f:Feature) RETURN f.id) TO '{out}/f.csv'",
    "MATCH (f:Feature) WITH f LIMIT 1 COPY (RETURN 1) TO '{out}/g.csv'",
    "CHECKPOINT",
    "MATCH (f:Feature) SET f.layer = 99",
    "MATCH (f:Feature) DETACH DELETE f",
    "MATCH (n) WITH * CREATE (:Feature {{id: 'x'}})",
    "MATCH (n:Feature) WITH n ORDER BY n.id DESC CREATE (:Feature {{id: 'x'}})",
    "MATCH (n:Feature) WHERE n.frequency IS NULL MERGE (:Feature {{id: 'x'}})",
    "RETURN 1 AS a UNION ALL LOAD FROM '/etc/passwd' (file_format='csv') RETURN *",
    "RETURN 'a\\' LOAD FROM \\'/etc/passwd\\' RETURN \\'x' AS y; LOAD FROM '/etc/passwd' (file_format='csv') RETURN *",
    "MATCH (n) WHERE EXISTS {{ LOAD FROM '/etc/passwd' (file_format='csv') RETURN * }} RETURN n",
    "CALL threads=1",
    "EXPORT DATABASE '{out}/dump'",
    "INSTALL json",
    "ATTACH '{out}/x' AS y (dbtype lbug)",
    "BEGIN TRANSACTION",
    "RETURN 1; MATCH (f:Feature) DELETE f",
    "DROP TABLE Token",
]


@pytest.mark.parametrize("template", CYPHER_ESCAPES)
def test_cypher_escape_is_refused_and_the_store_is_untouched(catalog, tmp_path, template):
    out = tmp_path / "out"
    out.mkdir()
    before = digest(catalog)
    line = one_line_error(*cli("cypher", template.format(out=out), "--catalog", catalog))
    assert "read-only" in line or "one statement" in line
    assert list(out.iterdir()) == [] and digest(catalog) == before
    code, output = cli("cypher", "MATCH (f:Feature) RETURN count(*) AS n", "--catalog", catalog, "--format", "json")
    assert code == 0 and '"n": 24' in output


def test_every_named_query_is_a_read():
    """The allow-list refuses no query the project itself runs (in either dialect)."""
    for name in query_names():
        for dialect in ("ladybug", "neo4j"):
            check_read_only(named_query(name, dialect))


@pytest.mark.parametrize("query", [
    "MATCH (f) WHERE f.id = 'CREATE' RETURN f.`SET`", "MATCH (f) RETURN f // DELETE later",
    "MATCH (a)-[e:PULLBACK*1..2]->(b) RETURN count(*)", "RETURN CASE WHEN 1 > 0 THEN 'a' ELSE 'b' END AS z",
    "MATCH (f:Feature) WHERE f.index IS NOT NULL AND f.id STARTS WITH 'L1' RETURN f.id ORDER BY f.id DESC SKIP 1 LIMIT 3",
    "MATCH (n) RETURN DISTINCT n.layer AS l UNION ALL MATCH (n) RETURN n.layer AS l", "UNWIND [1, 2] AS x RETURN x * 2 AS y;",
    "MATCH (f:Feature {id: $id}) RETURN list_transform(f.logit_tokens, t -> upper(t)) AS u",
])
def test_read_queries_pass(query):
    check_read_only(query)


@pytest.mark.parametrize("query", ["MATCH (f) SET f.x = 1", "CREATE (:Feature {id: 'x'})", "MATCH (f) REMOVE f.x", "CALL show_tables() RETURN *"])
def test_anything_else_is_refused(query):
    with pytest.raises(NotReadOnly):
        check_read_only(query)


def test_huge_or_deep_cypher_is_refused_before_the_parser(catalog):
    """LadybugDB's parser segfaults on deep nesting and long operator chains: bounded before sending, with --write too."""
    store = LadybugStore(catalog / layout.GRAPH)
    for query in ("RETURN " + "(" * 5000 + "1" + ")" * 5000, "RETURN " + "+".join(["1"] * 10_000), "RETURN " + "[" * 100 + "]" * 100,
                  "RETURN " + "+".join(["1"] * 3_000)):
        for write in (False, True):
            with pytest.raises(CypherError, match="at most"):
                store.cypher(query, write=write)
    store.close()


# ---------------------------------------------------------------- a store that cannot open


def test_checkpoint_without_write_is_refused_and_with_write_keeps_the_store(catalog):
    one_line_error(*cli("cypher", "CHECKPOINT", "--catalog", catalog))
    assert cli("cypher", "CHECKPOINT", "--catalog", catalog, "--write")[0] == 0
    code, output = cli("show", "L1/2", "--catalog", catalog)
    assert code == 0, output
    assert not list(catalog.glob("graph.*[lw]"))  # no graph.wal / graph.shadow left


def bricked_by_checkpoint(path: Path) -> None:
    """What `cypher CHECKPOINT` did before: a read-only checkpoint leaves wal/shadow and recovery pending."""
    import ladybug

    db = ladybug.Database(str(path), read_only=True)
    conn = ladybug.Connection(db)
    with pytest.raises(RuntimeError):
        conn.execute("CHECKPOINT")
    conn.close()
    db.close()


@pytest.mark.parametrize("damage", ["truncated", "emptied", "checkpoint"])
def test_a_store_that_cannot_open_says_run_load_and_load_rebuilds_it(catalog, damage):
    graph = catalog / layout.GRAPH
    if damage == "truncated":
        graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    elif damage == "emptied":
        graph.write_bytes(b"")
    else:
        bricked_by_checkpoint(graph)
    assert "run `circuit-catalog load" in one_line_error(*cli("show", "L1/2", "--catalog", catalog))
    code, output = cli("load", "--catalog", catalog)
    assert code == 0 and "up to date" not in output, output
    code, output = cli("show", "L1/2", "--catalog", catalog)
    assert code == 0, output
