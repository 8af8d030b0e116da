"""The Python API: `circuit_catalog.{Catalog, ingest, load_model, load_transcoders}` on the tiny GPT-2.

One prompt graph read three ways (the ingest's tables in memory, the Parquet parts, the store) is one
`PromptGraph`; Catalog's answers are the lookups' answers; tabular rows convert to Arrow and pandas.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import circuit_catalog
from circuit_catalog import AttributionSettings, Catalog, IngestSettings, PromptSpec, ingest, load_model, load_transcoders
from circuit_catalog.catalog.manifest import Manifest
from circuit_catalog.errors import CatalogDirError, UnknownFeature, UnknownPrompt
from circuit_catalog.ingest.transcoder_formats import save_saelens
from circuit_catalog.queries.prompt_graph import PromptGraph, PromptInfo
from circuit_catalog.queries.sql import run_sql
from tests.conftest import random_transcoders

PROMPTS = ["the capital of france is", "the jury said the city"]


@pytest.fixture(scope="module")
def api_catalog(tmp_path_factory, gpt2_dir, gpt2):
    """(catalog dir, transcoder dir): ingested through the API from the model's and transcoders' paths."""
    root = tmp_path_factory.mktemp("api")
    tc_dir = root / "tc"
    for tc in random_transcoders(gpt2, d_sae=16, seed=3):
        save_saelens(tc, tc_dir / f"layer_{tc.layer}")
    catalog = root / "catalog"
    result = ingest(str(gpt2_dir), tc_dir, catalog, settings=IngestSettings(top_k=4, token_top_k=5),
                    prompts=[PROMPTS[0], PromptSpec(text=PROMPTS[1], target=" election")],
                    attribution=AttributionSettings(max_feature_nodes=64), progress=False)
    assert result.counts["pullback_edges"] > 0 and [p.text for p in result.prompts] == sorted(PROMPTS)
    return catalog, tc_dir


def test_import_is_light_and_names_resolve():
    probe = "import circuit_catalog, sys; assert 'torch' not in sys.modules and 'duckdb' not in sys.modules; print('ok')"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "ok"
    assert callable(ingest) and ingest is circuit_catalog.ingest  # the compute package, callable as the verb
    assert set(circuit_catalog.__all__) <= set(dir(circuit_catalog))
    with pytest.raises(AttributeError):
        circuit_catalog.no_such_name  # noqa: B018


def test_ingest_with_loaded_objects_is_the_same_catalog(api_catalog, gpt2_dir):
    catalog, tc_dir = api_catalog
    before = Manifest.read(catalog)
    model = load_model(gpt2_dir)
    tset = load_transcoders(tc_dir, model=model)
    again = ingest(model, tset, catalog, settings=IngestSettings(top_k=4, token_top_k=5), prompts=PROMPTS[:1],
                   attribution=AttributionSettings(max_feature_nodes=64), progress=False)
    after = Manifest.read(catalog)
    assert after.identity() == before.identity() and after.completed == before.completed  # nothing recomputed
    assert after.model == before.model == gpt2_dir.name
    assert again.counts == before.counts
    with pytest.raises(CatalogDirError, match="other top_k"):  # a different top_k is refused, not mixed in
        ingest(model, tset, catalog, settings=IngestSettings(top_k=5, token_top_k=5), progress=False)


def test_one_prompt_graph_from_store_parquet_and_memory(api_catalog, gpt2_dir):
    from circuit_catalog.ingest.attribution import attribute
    from circuit_catalog.ingest.prompts import graph_tables
    from circuit_catalog.ingest.pruning import prune

    catalog, tc_dir = api_catalog
    with Catalog(catalog, progress=False) as cat:
        from_store = cat.prompt_graph(PROMPTS[0])
    from_parquet = PromptGraph.from_catalog(catalog, PROMPTS[0])
    model = load_model(gpt2_dir)  # the same graph computed again, in memory, with the catalog's settings
    graph = attribute(model, load_transcoders(tc_dir, model=model), PROMPTS[0], max_feature_nodes=64)
    tables = graph_tables(graph, prune(graph), from_store.info.id, model.tokenizer.decode)
    in_memory = PromptGraph.from_tables(from_store.info, tables)
    for other in (from_parquet, in_memory):
        assert set(other.nodes) == set(from_store.nodes)
        for nid, node in from_store.nodes.items():
            mine = other.nodes[nid]
            assert (mine.kind, mine.layer, mine.pos, mine.feature_index, mine.feature_id, mine.token_id, mine.token) == \
                   (node.kind, node.layer, node.pos, node.feature_index, node.feature_id, node.token_id, node.token)
            assert mine.influence == pytest.approx(node.influence, rel=1e-6, abs=1e-9)
        assert set(other.edges) == set(from_store.edges)
        for dst, ins in from_store.edges.items():
            theirs, mine = sorted(ins), sorted(other.edges[dst])
            assert [s for s, _ in mine] == [s for s, _ in theirs]
            assert [w for _, w in mine] == pytest.approx([w for _, w in theirs], rel=1e-6)
    assert from_parquet.info.n_feature_nodes is not None and from_parquet.info.id == from_store.info.id


def test_prompt_graph_to_networkx(api_catalog):
    catalog, _ = api_catalog
    graph = PromptGraph.from_catalog(catalog, PROMPTS[1])  # its target: " election"
    g = graph.to_networkx()
    assert g.number_of_nodes() == len(graph.nodes)
    assert g.number_of_edges() == sum(len(v) for v in graph.edges.values())
    for dst, ins in graph.edges.items():
        for src, w in ins:
            assert g.edges[src, dst]["weight"] == w
    logits = [n for n, d in g.nodes(data=True) if d["kind"] == "logit"]
    assert any(g.nodes[n]["token"].strip() == "election" for n in logits)  # the prompt's own target is a logit target
    import networkx as nx

    assert nx.is_directed_acyclic_graph(g)


def test_catalog_answers_are_the_lookups_answers(api_catalog):
    catalog, _ = api_catalog
    with Catalog(catalog, progress=False) as cat:
        feature = cat.sql("SELECT id FROM features WHERE layer = 2 ORDER BY id LIMIT 1")[0]["id"]
        up = cat.upstream(feature, k=5)
        assert up == cat.lookups.upstream(feature, 5) and len(up) > 0
        table = up.to_arrow()
        assert table.column_names == ["feature", "weight", "tokens"]
        assert table.column("feature").to_pylist() == [e.feature for e in up]
        frame = up.to_pandas()
        assert list(frame["weight"]) == [e.weight for e in up]
        empty = cat.upstream("L0/0", k=3)  # layer 0 has no earlier layer
        assert len(empty) == 0 and empty.to_arrow().column_names == ["feature", "weight", "tokens"]
        columns, rows = run_sql(catalog, "SELECT id, layer FROM features ORDER BY id LIMIT 7")
        assert [tuple(r.values()) for r in cat.sql("SELECT id, layer FROM features ORDER BY id LIMIT 7")] == rows
        assert cat.cypher("MATCH (f:Feature {id: $id}) RETURN f.layer AS layer", {"id": feature}) == [{"layer": 2}]
        prompts = cat.prompts()
        assert all(isinstance(p, PromptInfo) for p in prompts) and len(prompts.to_arrow()) == 2
        assert {p.target for p in prompts} == {None, " election"}
        with pytest.raises(UnknownFeature):
            cat.upstream("L9/9")
        with pytest.raises(UnknownPrompt, match="unknown prompt"):
            cat.prompt_graph("no such prompt")
    with pytest.raises(UnknownPrompt, match="unknown prompt"):  # the Parquet reader: the same lookup, the same error
        PromptGraph.from_catalog(catalog, "no such prompt")


def test_neighbourhood(api_catalog):
    catalog, _ = api_catalog
    with Catalog(catalog, progress=False) as cat:
        feature = cat.sql("SELECT id FROM features WHERE layer = 1 ORDER BY id LIMIT 1")[0]["id"]
        one = cat.neighbourhood(feature, depth=1, k=2)
        expected = {(e.feature, feature): e.weight for e in cat.upstream(feature, 2)}
        expected |= {(feature, e.feature): e.weight for e in cat.downstream(feature, 2)}
        assert {(a, b): w for a, b, w in one.edges} == expected
        two = cat.neighbourhood(feature, depth=2, k=2)
        assert set(one.features) <= set(two.features) and len(two.edges) > len(one.edges)
        g = two.to_networkx()
        assert set(g.nodes) == set(two.features) | {feature}
        assert all(g.nodes[n]["layer"] < g.nodes[m]["layer"] for n, m in g.edges)  # pullbacks run forward
