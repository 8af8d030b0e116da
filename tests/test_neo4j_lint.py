"""Every Cypher statement the Neo4j backend sends passes Neo4j's own linter: no errors, no deprecations,
no label, type or property the schema does not define."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from circuit_catalog.catalog.graph_schema import NODES, RELS
from circuit_catalog.catalog.neo4j_import import schema_statements_after_import
from circuit_catalog.catalog.neo4j_store import indexed_properties, schema_statements, statements
from circuit_catalog.queries.lookups import named_query, query_names

REPO = Path(__file__).resolve().parents[1]
LINT_HOME = REPO / ".tools" / "cypher-lint"


def lint(queries: list[str]) -> list[dict]:
    if shutil.which("node") is None or not (LINT_HOME / "node_modules" / "@neo4j-cypher" / "language-support").is_dir():
        pytest.skip("Neo4j's linter is not installed: run scripts/setup.sh (needs node and npm)")
    schema = {
        "labels": [n.label for n in NODES] + ["CatalogState"],
        "relationshipTypes": [r.type for r in RELS],
        "propertyKeys": sorted({c for n in NODES for c, _ in n.columns} | {c for r in RELS for c, _ in r.properties} | {"signature", "parts", "started", "src", "dst"}),  # src, dst: keys of the loaded rows
    }
    proc = subprocess.run(
        ["node", str(REPO / "tests" / "tools" / "lint_cypher.mjs")], input=json.dumps({"schema": schema, "queries": queries}),
        capture_output=True, text=True, env={"CYPHER_LINT_HOME": str(LINT_HOME), "PATH": "/usr/bin:/usr/local/bin:/bin"}, check=True,
    )
    return json.loads(proc.stdout)


def test_backend_and_named_queries_lint_clean():
    """Every statement: the loader's, the named queries, and those of the schema.cypher written beside an import."""
    schema_cypher = schema_statements_after_import("0123abcd", ["pullbacks/L0-L1.parquet", "it's/odd.parquet"])
    queries = statements() + [named_query(name, "neo4j") for name in query_names()] + schema_cypher
    results = lint(queries)
    assert len(results) == len(queries)
    problems = [(r["query"].strip().splitlines()[-1], d["message"]) for r in results for d in r["diagnostics"]]
    assert problems == []


def test_the_linter_catches_what_it_should():
    """Guard against a linter that passes everything: a syntax error, a deprecation and a typo are reported."""
    bad = lint(["MATCH (f:Feature RETURN f", "MATCH (a)-[:PULLBACK|:LOGIT]->(b) RETURN a", "MATCH (f:Featur) RETURN f.id"])
    assert [bool(r["diagnostics"]) for r in bad] == [True, True, True]
    assert any(d["severity"] == "error" for d in bad[0]["diagnostics"])


# `(var:Label ...)` in a pattern; `{prop: $param}` inside it; `var.prop = $param` / `var.prop IN $param` in a WHERE
_NODE = re.compile(r"\((\w+):(\w+)([^)]*)\)")
_INLINE = re.compile(r"(\w+):\s*\$\w+")
_FILTER = re.compile(r"\b(\w+)\.(\w+)\s*(?:=|IN)\s*\$\w+", re.I)


def lookups(query: str) -> set[tuple[str, str]]:
    """(label, property) pairs a query finds nodes by: every comparison of a node property with a parameter."""
    query = re.sub(r"//[^\n]*", "", query)
    labels, found = {}, set()
    for var, label, rest in _NODE.findall(query):
        labels[var] = label
        found |= {(label, prop) for prop in _INLINE.findall(rest)}
    for var, prop in _FILTER.findall(query):
        if var in labels:  # relationship properties (e.variant) are read after the traversal, not looked up
            found.add((labels[var], prop))
    return found


def test_every_lookup_of_a_named_query_has_an_index():
    """Each node property a named query compares with a parameter is a constraint's key or has its own index, so
    Neo4j seeks instead of scanning every node of the label (PNode.prompt_id: ~1.5M nodes per 1,000 prompts)."""
    found = {name: lookups(named_query(name, "neo4j")) for name in query_names()}
    assert found["prompt_nodes"] == {("PNode", "prompt_id")} and ("Token", "text") in found["search_logit"]  # the parser sees them
    missing = {(name, pair) for name, pairs in found.items() for pair in pairs if pair not in indexed_properties()}
    assert missing == set()


def test_schema_statements_index_every_lookup_property():
    text = "\n".join(schema_statements())
    for label, prop in indexed_properties():
        assert re.search(rf"FOR \(\w+:{label}\) (?:ON \(\w+\.{prop}\)|REQUIRE \w+\.{prop} IS UNIQUE)", text), (label, prop)
