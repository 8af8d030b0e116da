"""Every Cypher statement the Neo4j backend sends passes Neo4j's own linter: no errors, no deprecations,
no label, type or property the schema does not define."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from catalog.graph_schema import NODES, RELS
from catalog.neo4j_store import statements
from queries.api import named_query, query_names

REPO = Path(__file__).resolve().parents[1]
LINT_HOME = REPO / ".tools" / "cypher-lint"


def lint(queries: list[str]) -> list[dict]:
    if shutil.which("node") is None or not (LINT_HOME / "node_modules" / "@neo4j-cypher" / "language-support").is_dir():
        pytest.skip("Neo4j's linter is not installed: run scripts/setup.sh (needs node and npm)")
    schema = {
        "labels": [n.label for n in NODES] + ["CatalogState"],
        "relationshipTypes": [r.type for r in RELS],
        "propertyKeys": sorted({c for n in NODES for c, _ in n.columns} | {c for r in RELS for c, _ in r.properties} | {"signature", "parts", "src", "dst"}),  # src, dst: keys of the loaded rows
    }
    proc = subprocess.run(
        ["node", str(REPO / "tests" / "tools" / "lint_cypher.mjs")], input=json.dumps({"schema": schema, "queries": queries}),
        capture_output=True, text=True, env={"CYPHER_LINT_HOME": str(LINT_HOME), "PATH": "/usr/bin:/usr/local/bin:/bin"}, check=True,
    )
    return json.loads(proc.stdout)


def test_backend_and_named_queries_lint_clean():
    queries = statements() + [named_query(name, "neo4j") for name in query_names()]
    results = lint(queries)
    assert len(results) == len(queries)
    problems = [(r["query"].strip().splitlines()[-1], d["message"]) for r in results for d in r["diagnostics"]]
    assert problems == []


def test_the_linter_catches_what_it_should():
    """Guard against a linter that passes everything: a syntax error, a deprecation and a typo are reported."""
    bad = lint(["MATCH (f:Feature RETURN f", "MATCH (a)-[:PULLBACK|:LOGIT]->(b) RETURN a", "MATCH (f:Featur) RETURN f.id"])
    assert [bool(r["diagnostics"]) for r in bad] == [True, True, True]
    assert any(d["severity"] == "error" for d in bad[0]["diagnostics"])
