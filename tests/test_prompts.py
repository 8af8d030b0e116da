"""Prompt sets through the ingest job and the CLI: Parquet parts, stable ids, resumption, the
Neuronpedia export, the greedy path search, and bad input as one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from circuit_catalog.catalog import layout
from circuit_catalog.catalog.ids import parse_local, token_node
from circuit_catalog.ingest.job import build_manifest, run_ingest
from circuit_catalog.catalog.manifest import Manifest
from circuit_catalog.ingest.settings import IngestSettings
from circuit_catalog.ingest.prompts import prompt_id, run_prompts
from circuit_catalog.ingest.settings import AttributionSettings, PromptSpec, read_prompts
from circuit_catalog.ingest.transcoder_formats import save_saelens
from circuit_catalog.queries.neuronpedia import export_neuronpedia
from circuit_catalog.queries.paths import greedy_paths
from circuit_catalog.queries.prompt_graph import PromptGraph, PromptInfo

from tests.conftest import random_transcoders
from tests.test_cli import assert_one_line_error, run, run_json

SPECS = [PromptSpec("the capital of france is"), PromptSpec("he said the county court", target="report")]
FULL = AttributionSettings(max_feature_nodes=None, unpruned_edges=True, head_edges=None)  # every edge kept and split


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def prompt_catalog(request, tmp_path_factory):
    model = request.getfixturevalue(request.param)
    root = tmp_path_factory.mktemp(f"prompts-{request.param}")
    tset = random_transcoders(model, d_sae=60, seed=11)
    manifest = build_manifest(model, request.param, tset, "mem", IngestSettings(top_k=4, token_top_k=5))
    run_ingest(model, tset, root, manifest, progress=False)
    ids = run_prompts(model, tset, root, SPECS, FULL, progress=False)
    return model, tset, root, ids


def read(root, pid, name):
    return pq.read_table(layout.prompt_part(root, pid, name)).to_pylist()


def test_parts_are_complete_graphs(prompt_catalog):
    model, _, root, ids = prompt_catalog
    index = pq.read_table(root / layout.PROMPT_INDEX).to_pylist()
    assert [r["id"] for r in index] == sorted(ids) and len(set(ids)) == 2
    for spec, pid in zip(SPECS, ids):
        nodes = {n["id"]: n for n in read(root, pid, "nodes")}
        full = read(root, pid, "edges_full")
        # token nodes carry exactly the ids the model saw, BOS included
        tokens = sorted((n for n in nodes.values() if n["kind"] == "token"), key=lambda n: n["pos"])
        assert [n["token_id"] for n in tokens] == model.to_tokens(spec.text)[0].tolist()
        # completeness from the files alone: incoming edges + bias + dropped = value, for every target
        incoming: dict[str, float] = {}
        for e in full:
            incoming[e["dst"]] = incoming.get(e["dst"], 0.0) + e["weight"]
        targets = [n for n in nodes.values() if n["value"] is not None]
        assert {n["kind"] for n in targets} == {"feature", "logit"}
        scale = max(abs(n["value"]) for n in targets)
        for n in targets:
            assert incoming.get(n["id"], 0.0) + n["bias"] + n["dropped"] == pytest.approx(n["value"], abs=2e-4 * scale)
        # pruned edges are a subset of the full graph, between kept nodes
        full_set = {(e["src"], e["dst"]): e["weight"] for e in full}
        pruned = read(root, pid, "edges")
        assert pruned and all(full_set[(e["src"], e["dst"])] == e["weight"] for e in pruned)
        assert all(nodes[e["src"]]["kept"] and nodes[e["dst"]]["kept"] for e in pruned)
        # tokens and logits always stay; a named target is among the logits
        assert all(n["kept"] for n in nodes.values() if n["kind"] in ("token", "logit"))
        if spec.target:
            assert spec.target in [n["token"] for n in nodes.values() if n["kind"] == "logit"]
        row = next(r for r in index if r["id"] == pid)
        # scores and influence from the files, by the closed form N (I - N)^-1 rather than the code's power series
        replacement, completeness, influence = scores_from_files(list(nodes.values()), full)
        assert row["replacement_score"] == pytest.approx(replacement, rel=1e-4)
        assert row["completeness_score"] == pytest.approx(completeness, rel=1e-4)
        np.testing.assert_allclose([n["influence"] for n in nodes.values()], influence, rtol=1e-3, atol=1e-6)
        assert 0.05 < replacement < 0.95 and 0.05 < completeness < 0.95  # neither degenerate
        assert row["n_kept_edges"] == len(pruned) and not row["capped"]


def test_default_storage_keeps_the_pruned_graph_and_the_logit_edges(prompt_catalog, tmp_path):
    """Without --unpruned-edges and with --head-edges 6: the same nodes and pruned edges as the full catalog, the
    unpruned edges into the logits only, and the head split of the 6 most influential pruned edges, summing to them."""
    model, tset, root, ids = prompt_catalog
    small = tmp_path / "small"
    run_ingest(model, tset, small, Manifest.read(root), progress=False)
    assert run_prompts(model, tset, small, SPECS, AttributionSettings(max_feature_nodes=None, head_edges=6), progress=False) == ids
    for pid in ids:
        assert read(small, pid, "nodes") == read(root, pid, "nodes")
        assert read(small, pid, "edges") == read(root, pid, "edges")
        logits = {n["id"] for n in read(root, pid, "nodes") if n["kind"] == "logit"}
        assert read(small, pid, "edges_full") == [e for e in read(root, pid, "edges_full") if e["dst"] in logits]
        heads = read(small, pid, "edges_heads")
        pruned = {(e["src"], e["dst"]): e["weight"] for e in read(root, pid, "edges")}
        sums: dict[tuple[str, str], float] = {}
        for r in heads:
            sums[r["src"], r["dst"]] = sums.get((r["src"], r["dst"]), 0.0) + r["weight"]
        assert len(sums) == 6 and len(pruned) > 6
        for edge, total in sums.items():
            assert total == pytest.approx(pruned[edge], rel=1e-4, abs=1e-5)
        # the same terms as the catalog that split every edge
        full_rows = {(r["src"], r["dst"], r["head"]): r["weight"] for r in read(root, pid, "edges_heads")}
        assert all(full_rows.get((r["src"], r["dst"], r["head"]), 0.0) == pytest.approx(r["weight"], rel=1e-4, abs=1e-5) for r in heads)
        # the most influential: by pruning's edge score, recomputed from the stored unpruned graph
        nodes = read(root, pid, "nodes")
        index = {n["id"]: i for i, n in enumerate(nodes)}
        A = np.zeros((len(nodes), len(nodes)))
        for e in read(root, pid, "edges_full"):
            A[index[e["dst"]], index[e["src"]]] = e["weight"]
        kept = np.array([n["kept"] for n in nodes])
        N = np.abs(A * kept[:, None] * kept[None, :])
        N /= np.maximum(N.sum(1, keepdims=True), 1e-10)
        w = np.array([n["probability"] if n["kind"] == "logit" else 0.0 for n in nodes])
        influence = w @ (np.linalg.inv(np.eye(len(nodes)) - N) - np.eye(len(nodes)))
        score = {edge: N[index[edge[1]], index[edge[0]]] * (influence + w)[index[edge[1]]] for edge in pruned}
        ranked = sorted(pruned, key=lambda e: -score[e])
        assert min(score[e] for e in sums) >= score[ranked[5]] * (1 - 1e-4)


def scores_from_files(nodes: list[dict], edges: list[dict]) -> tuple[float, float, np.ndarray]:
    """circuit-tracer's replacement and completeness scores and node influence, from the stored rows alone."""
    index = {n["id"]: i for i, n in enumerate(nodes)}
    A = np.zeros((len(nodes), len(nodes)))
    for e in edges:
        A[index[e["dst"]], index[e["src"]]] = e["weight"]
    N = np.abs(A) / np.maximum(np.abs(A).sum(1, keepdims=True), 1e-10)
    w = np.array([n["probability"] if n["kind"] == "logit" else 0.0 for n in nodes])
    influence = w @ (np.linalg.inv(np.eye(len(nodes)) - N) - np.eye(len(nodes)))
    kind = np.array([n["kind"] for n in nodes])
    tokens, errors = influence[kind == "token"].sum(), influence[kind == "error"].sum()
    completeness = ((1 - N[:, kind == "error"].sum(1)) * (influence + w)).sum() / (influence + w).sum()
    return tokens / (tokens + errors), completeness, influence


def test_ids_are_stable_and_finished_prompts_are_skipped(prompt_catalog):
    model, tset, root, ids = prompt_catalog
    stamp = {pid: layout.prompt_info(root, pid).stat().st_mtime_ns for pid in ids}
    again = run_prompts(model, tset, root, SPECS, FULL, progress=False)
    assert again == ids
    assert {pid: layout.prompt_info(root, pid).stat().st_mtime_ns for pid in ids} == stamp
    from circuit_catalog.catalog.manifest import Manifest

    manifest = Manifest.read(root)
    assert prompt_id(manifest, PromptSpec("the capital of france is ")) != ids[0]
    assert prompt_id(manifest, PromptSpec("he said the county court")) != ids[1]  # the target is part of the id


def test_neuronpedia_export(prompt_catalog, tmp_path):
    model, _, root, ids = prompt_catalog
    out = tmp_path / "viewer" / "france.json"
    graph = export_neuronpedia(root, ids[0], out)
    written = json.loads(out.read_text())
    assert written == graph
    nodes = read(root, ids[0], "nodes")
    kept = [n for n in nodes if n["kept"]]
    assert len(written["nodes"]) == len(kept)
    node_ids = [n["node_id"] for n in written["nodes"]]
    assert len(set(node_ids)) == len(node_ids)
    assert len(written["links"]) == len(read(root, ids[0], "edges"))
    assert {link["source"] for link in written["links"]} <= set(node_ids)
    assert written["metadata"]["slug"] == "france" and written["metadata"]["prompt"] == model.tokenizer.decode(model.to_tokens(SPECS[0].text)[0])
    assert sum(n["is_target_logit"] for n in written["nodes"]) == 1
    kinds = {n["feature_type"] for n in written["nodes"]}
    assert {"embedding", "logit", "cross layer transcoder"} <= kinds
    index = json.loads((out.parent / "graph-metadata.json").read_text())
    assert [g["slug"] for g in index["graphs"]] == ["france"]


def test_greedy_paths_on_a_known_graph():
    """t0 -> f1 -> logit and t0 -> f2 -> logit, with f2's path stronger only after dividing by activation."""
    nodes = [
        {"id": "p:tok@0", "kind": "token", "layer": -1, "pos": 0},
        {"id": "p:tok@1", "kind": "token", "layer": -1, "pos": 1},
        {"id": "p:L0/1@1", "kind": "feature", "layer": 0, "pos": 1, "feature_index": 1, "activation": 10.0},
        {"id": "p:L0/2@1", "kind": "feature", "layer": 0, "pos": 1, "feature_index": 2, "activation": 0.5},
        {"id": "p:err:L0@1", "kind": "error", "layer": 0, "pos": 1},
        {"id": "p:logit:7", "kind": "logit", "layer": 1, "pos": 1},
    ]
    edges = [
        {"src": "p:L0/1@1", "dst": "p:logit:7", "weight": 4.0},
        {"src": "p:L0/2@1", "dst": "p:logit:7", "weight": -1.0},
        {"src": "p:err:L0@1", "dst": "p:logit:7", "weight": 0.1},
        {"src": "p:tok@0", "dst": "p:L0/1@1", "weight": 10.0},
        {"src": "p:tok@1", "dst": "p:L0/2@1", "weight": 0.5},
        {"src": "p:tok@0", "dst": "p:L0/2@1", "weight": 0.2},
    ]
    graph = PromptGraph.from_rows(PromptInfo("p", "two tokens", None, 2, 0.0, 0.0), nodes, edges)
    found = greedy_paths(graph, "p:logit:7", num_iters=2, num_branches=2)
    # iteration 1 keeps f1 (4.0) and f2 (-1.0); iteration 2: tok0 via f1 = 10 * 4/10 = 4, tok1 via f2 = 0.5 * -1/0.5 = -1,
    # tok0 via f2 = 0.2 * -1/0.5 = -0.4: the two strongest by |attribution|, signs kept
    assert [(p.nodes, round(p.strength, 6)) for p in found] == [
        (["p:tok@0", "p:L0/1@1", "p:logit:7"], 4.0),
        (["p:tok@1", "p:L0/2@1", "p:logit:7"], -1.0),
    ]
    # a path that reaches an error node early is finished, not dropped
    found = greedy_paths(graph, "p:logit:7", num_iters=3, num_branches=3)
    assert (["p:err:L0@1", "p:logit:7"], 0.1) in [(p.nodes, round(p.strength, 6)) for p in found]


def test_prompt_file_formats(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\nsecond prompt\n")
    assert read_prompts(txt) == [PromptSpec("first prompt"), PromptSpec("second prompt")]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a b", "target": " c"}\n{"prompt": "d"}\n')
    assert read_prompts(jsonl) == [PromptSpec("a b", target=" c"), PromptSpec("d")]


# ---------------------------------------------------------------- the CLI, end to end


@pytest.fixture(scope="module")
def cli_catalog(tmp_path_factory, gpt2_dir, gpt2):
    root = tmp_path_factory.mktemp("cli-prompts")
    tc_dir = root / "tc"
    for tc in random_transcoders(gpt2, d_sae=30, seed=2):
        save_saelens(tc, tc_dir / f"layer_{tc.layer}")
    prompts = root / "prompts.jsonl"
    prompts.write_text('{"prompt": "the capital of france is", "target": "paris"}\n{"prompt": "the jury said the city"}\n')
    catalog = root / "catalog"
    code, output = run("ingest", "--model", gpt2_dir, "--transcoders", tc_dir, "--catalog", catalog, "--top-k", 4,
                       "--prompts", prompts, "--max-feature-nodes", 40)
    assert code == 0, output
    assert "attribution graphs" in output
    return root, catalog, tc_dir


def test_cli_prompt_queries(cli_catalog, gpt2_dir):
    root, catalog, _ = cli_catalog
    prompts = run_json("prompts", "--catalog", catalog)
    assert len(prompts) == 2
    france = next(p for p in prompts if p["text"].startswith("the capital"))
    summary = run_json("graph", "--catalog", catalog, "--prompt", france["id"])
    assert "paris" in [logit["token"] for logit in summary["logits"]]
    assert summary["nodes"]["token"] == 6  # BOS + five words
    paths = run_json("paths", "--catalog", catalog, "--prompt", france["id"], "--to-logit", "paris", "-k", 3)
    assert paths and all(parse_local(p["nodes"][0]).kind == "token" and parse_local(p["nodes"][-1]).kind == "logit" for p in paths)
    assert abs(paths[0]["strength"]) >= abs(paths[-1]["strength"])
    from_france = run_json("paths", "--catalog", catalog, "--prompt", france["id"], "--from-token", "france", "--to-logit", "paris")
    assert all(p["nodes"][0] == token_node(4) for p in from_france)
    greedy = run_json("paths", "--catalog", catalog, "--prompt", france["id"], "--to-logit", "paris", "--greedy", "--iters", 2)
    assert greedy and all(parse_local(p["nodes"][-1]).kind == "logit" for p in greedy)
    top = run_json("recurring", "--catalog", catalog, "-k", 3)
    assert top and top[0]["prompts"] >= top[-1]["prompts"]
    users = run_json("prompts-using", top[0]["feature"], "--catalog", catalog)
    assert len(users) == top[0]["prompts"]
    code, output = run("graph", "--catalog", catalog, "--prompt", france["id"])
    assert code == 0 and "replacement score" in output and "most influential nodes" in output
    assert run_json("graph", "--catalog", catalog, "--prompt", "the capital of france is") == summary  # by text
    code, output = run("export", "--catalog", catalog, "--prompt", france["id"], "--neuronpedia", root / "view" / "g.json")
    assert code == 0 and (root / "view" / "g.json").is_file()


def test_cli_prompt_errors(cli_catalog, gpt2_dir, tmp_path):
    root, catalog, tc_dir = cli_catalog
    assert_one_line_error(*run("graph", "--catalog", catalog, "--prompt", "feedfacefeedface"), "unknown prompt")
    assert_one_line_error(*run("report", "prompt", "feedfacefeedface", "--catalog", catalog, "--out", tmp_path / "r.html"), "unknown prompt")
    assert not (tmp_path / "r.html").exists()
    assert_one_line_error(*run("prompts-using", "L7/1", "--catalog", catalog), "unknown feature L7/1")
    assert_one_line_error(*run("prompts-using", "L1-1", "--catalog", catalog), "malformed feature id")
    pid = run_json("prompts", "--catalog", catalog)[0]["id"]
    assert_one_line_error(*run("paths", "--catalog", catalog, "--prompt", pid, "--to-logit", "zebra"), "not a logit target")
    assert_one_line_error(*run("paths", "--catalog", catalog, "--prompt", pid, "--from-token", "zebra", "--to-logit",
                               run_json("graph", "--catalog", catalog, "--prompt", pid)["logits"][0]["token"]), "no token")
    assert_one_line_error(*run("export", "--catalog", catalog, "--prompt", "nope", "--neuronpedia", tmp_path / "x.json"), "unknown prompt")
    broken = tmp_path / "broken"
    shutil.copytree(catalog, broken, ignore=shutil.ignore_patterns("graph*"))
    edges = layout.prompt_part(broken, pid, "edges")
    edges.write_bytes(edges.read_bytes()[:100])
    assert_one_line_error(*run("export", "--catalog", broken, "--prompt", pid, "--neuronpedia", tmp_path / "y.json"), "unreadable")
    assert not (tmp_path / "y.json").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt key"}\n')
    assert_one_line_error(*run("ingest", "--model", gpt2_dir, "--transcoders", tc_dir, "--catalog", catalog, "--top-k", 4, "--prompts", bad),
                          "bad.jsonl:2")
    two = tmp_path / "two.jsonl"
    two.write_text('{"prompt": "the city", "target": "paris france"}\n')
    before = sorted(p.name for p in (catalog / layout.PROMPTS).iterdir())
    assert_one_line_error(*run("ingest", "--model", gpt2_dir, "--transcoders", tc_dir, "--catalog", catalog, "--top-k", 4, "--prompts", two),
                          "2 tokens")
    assert sorted(p.name for p in (catalog / layout.PROMPTS).iterdir()) == before  # nothing half-written


def test_attribution_options_change_the_graph(prompt_catalog):
    """A capped rerun replaces the graph (settings are part of what is skipped on)."""
    model, tset, root, ids = prompt_catalog
    run_prompts(model, tset, root, SPECS[:1], AttributionSettings(max_feature_nodes=5), progress=False)
    info = json.loads(layout.prompt_info(root, ids[0]).read_text())
    assert info["capped"] and info["n_feature_nodes"] == 5
    nodes = read(root, ids[0], "nodes")
    assert sum(n["kind"] == "feature" for n in nodes) == 5
    assert any(abs(n["dropped"] or 0) > 0 for n in nodes)
