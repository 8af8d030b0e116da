"""`active --rank influence`: the features at a position ranked by their influence in the prompt's attribution graph,
checked against the graph the ingest stored for the same prompt (its nodes' influence for the probability-weighted
logits; for one target, edge influence recomputed from the stored unpruned edges by `queries.paths`)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from circuit_catalog.catalog import layout
from circuit_catalog.ingest.transcoder_formats import save_saelens
from circuit_catalog.queries.paths import edge_influence
from circuit_catalog.queries.prompt_graph import PromptGraph, prompt_record

from tests.conftest import random_transcoders
from tests.test_cli import assert_one_line_error, run

PROMPT = "the capital of france is"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, gpt2, gpt2_dir):
    root = tmp_path_factory.mktemp("active")
    tc = root / "tc"
    for t in random_transcoders(gpt2, d_sae=30, seed=8):
        save_saelens(t, tc / f"layer_{t.layer}")
    (root / "p.txt").write_text(PROMPT + "\n")
    code, output = run("ingest", "--model", gpt2_dir, "--transcoders", tc, "--catalog", root / "catalog", "--prompts", root / "p.txt",
                       "--unpruned-edges")
    assert code == 0, output
    record = prompt_record(root / "catalog", PROMPT)
    nodes = pq.read_table(layout.prompt_part(root / "catalog", record["id"], "nodes")).to_pylist()
    return ["--model", str(gpt2_dir), "--transcoders", str(tc), "--prompt", PROMPT], root / "catalog", record, nodes


def _ids(output: str) -> list[str]:
    return output.split()


def test_influence_ranking_equals_the_stored_graphs(setup):
    args, _, _, nodes = setup
    last = max(n["pos"] for n in nodes)
    at_last = sorted((n for n in nodes if n["kind"] == "feature" and n["pos"] == last), key=lambda n: -n["influence"])
    code, output = run("active", *args, "--rank", "influence", "-k", "4", "--format", "ids")
    assert code == 0, output
    assert _ids(output) == [n["feature_id"] for n in at_last[:4]]
    by_activation = sorted((n for n in nodes if n["kind"] == "feature" and n["pos"] == last), key=lambda n: -n["activation"])
    assert _ids(run("active", *args, "-k", "4", "--format", "ids")[1]) == [n["feature_id"] for n in by_activation[:4]]


def test_influence_on_one_target_equals_edge_influence(setup):
    args, catalog, record, nodes = setup
    logit = max((n for n in nodes if n["kind"] == "logit"), key=lambda n: n["probability"])
    full = pq.read_table(layout.prompt_part(catalog, record["id"], "edges_full")).to_pylist()
    graph = PromptGraph.from_rows(PromptGraph.from_catalog(catalog, record["id"]).info, nodes, full)
    per_node: dict[str, float] = {}
    for (src, _), v in edge_influence(graph, logit["id"]).items():
        per_node[src] = per_node.get(src, 0.0) + v
    last = max(n["pos"] for n in nodes)
    expected = sorted((n for n in nodes if n["kind"] == "feature" and n["pos"] == last), key=lambda n: -per_node.get(n["id"], 0.0))[:3]
    code, output = run("active", *args, "--rank", "influence", "--target", logit["token"], "-k", "3", "--format", "ids")
    assert code == 0, output
    assert _ids(output) == [n["feature_id"] for n in expected]
    code, output = run("active", *args, "--rank", "influence", "--target", logit["token"], "-k", "3")
    assert code == 0 and "influence" in output and f"{per_node[expected[0]['id']]:.4f}" in output


def test_refusals(setup):
    args, *_ = setup
    assert_one_line_error(*run("active", *args, "--target", " paris"), "--rank influence")
    assert_one_line_error(*run("active", *args, "--rank", "influence", "--target", "paris france"), "2 tokens")
    assert_one_line_error(*run("active", *args, "--rank", "influence", "--pos", "30"), "outside the prompt")
