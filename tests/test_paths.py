"""Path searches over a real prompt graph (tiny GPT-2, random transcoders) against brute force: every token -> logit
path enumerated, each measure computed from its definition (edge influence by linear algebra, not the module's
recursion), filtered by the constraints and sorted; the dynamic programme must return exactly the top k."""

from __future__ import annotations

import math

import numpy as np
import pytest
from circuit_catalog.catalog import layout
from circuit_catalog.errors import UnknownFeature
from circuit_catalog.queries.paths import best_paths, edge_influence, greedy_paths
from circuit_catalog.queries.prompt_graph import PromptGraph

from tests.test_cli import assert_one_line_error, run, run_json


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, gpt2):
    from circuit_catalog import ingest
    from circuit_catalog.ingest.settings import AttributionSettings

    from tests.conftest import random_transcoders

    root = tmp_path_factory.mktemp("paths")
    ingest(gpt2, random_transcoders(gpt2, d_sae=40, seed=11), root, prompts=["the capital of france is"],
           attribution=AttributionSettings(max_feature_nodes=24), progress=False)
    return root


@pytest.fixture(scope="module")
def graph(catalog) -> PromptGraph:
    pid = next((catalog / layout.PROMPTS).iterdir()).name
    return PromptGraph.from_catalog(catalog, pid)


def _target(graph: PromptGraph) -> str:
    return max(graph.of_kind("logit"), key=lambda n: n.probability).id


def _influence_by_algebra(graph: PromptGraph, target: str) -> dict[tuple[str, str], float]:
    """M[dst, src] = |w| / sum |w into dst|; node influence n solves n = e_target + M^T n; edge = M[dst, src] n[dst]."""
    ids = list(graph.nodes)
    at = {nid: i for i, nid in enumerate(ids)}
    M = np.zeros((len(ids), len(ids)))
    for dst, ins in graph.edges.items():
        total = sum(abs(w) for _, w in ins)
        for src, w in ins:
            M[at[dst], at[src]] += abs(w) / total
    e = np.zeros(len(ids))
    e[at[target]] = 1.0
    n = np.linalg.solve(np.eye(len(ids)) - M.T, e)
    return {(src, dst): M[at[dst], at[src]] * n[at[dst]] for dst, ins in graph.edges.items() for src, _ in ins}


def _all_paths(graph: PromptGraph, sources: set[str], target: str) -> list[list[str]]:
    out: dict[str, list[str]] = {}
    for dst, ins in graph.edges.items():
        for src, _ in ins:
            out.setdefault(src, []).append(dst)
    found = []

    def walk(path):
        if path[-1] == target:
            found.append(path)
        for dst in out.get(path[-1], []):
            walk(path + [dst])

    for s in sorted(sources):
        walk([s])
    return found


def test_edge_influence_equals_the_linear_algebra(graph):
    target = _target(graph)
    got, expected = edge_influence(graph, target), _influence_by_algebra(graph, target)
    reach = {k: v for k, v in expected.items() if v > 0}
    assert reach and set(got) >= set(reach)
    assert [got.get(k, 0.0) for k in expected] == pytest.approx(list(expected.values()), rel=1e-9, abs=1e-12)
    assert sum(v for (_, dst), v in got.items() if dst == target) == pytest.approx(1.0)


@pytest.mark.parametrize("rank", ["bottleneck", "attribution"])
@pytest.mark.parametrize("constraint", ["none", "via", "no_errors", "min_hops"])
def test_best_paths_equal_brute_force(graph, rank, constraint):
    target = _target(graph)
    sources = {n.id for n in graph.of_kind("token")}
    influence = _influence_by_algebra(graph, target)
    weights = {(s, d): w for d, ins in graph.edges.items() for s, w in ins}
    total = sum(abs(w) for _, w in graph.edges[target])
    every = _all_paths(graph, sources, target)
    assert len(every) > 20
    inner = [n for n in graph.of_kind("feature") if any(n.id in p[1:-1] for p in every)]
    via_node = sorted(inner, key=lambda n: (n.layer, n.id))[-1]  # the latest feature on some path: longer chains
    keep = {
        "none": lambda p: True,
        "via": lambda p: via_node.id in p,
        "no_errors": lambda p: all(graph.nodes[n].kind != "error" for n in p),
        "min_hops": lambda p: len(p) - 1 >= 3,
    }[constraint]
    candidates = []
    for p in filter(keep, every):
        attribution = math.prod(weights[e] / graph.nodes[e[0]].unit for e in zip(p, p[1:]))
        bottleneck = min(influence[e] for e in zip(p, p[1:]))
        candidates.append((p, attribution, bottleneck))
    assert candidates
    score = (lambda c: abs(c[1])) if rank == "attribution" else (lambda c: c[2])
    expected = sorted(candidates, key=lambda c: (-score(c), c[0]))[:8]
    got = best_paths(graph, sources, target, 8, rank, via={via_node.id} if constraint == "via" else None,
                     avoid_errors=constraint == "no_errors", min_hops=3 if constraint == "min_hops" else 1)
    assert [p.nodes for p in got] == [c[0] for c in expected]
    assert [p.strength for p in got] == pytest.approx([c[1] for c in expected], rel=1e-9)
    assert [p.share for p in got] == pytest.approx([c[1] / total for c in expected], rel=1e-9)
    assert [p.bottleneck for p in got] == pytest.approx([c[2] for c in expected], rel=1e-9)


def test_greedy_paths_can_avoid_errors(graph):
    target = _target(graph)
    assert any(graph.nodes[n].kind == "error" for p in greedy_paths(graph, target, 3, 6) for n in p.nodes)
    found = greedy_paths(graph, target, 3, 6, avoid_errors=True)
    assert found and not any(graph.nodes[n].kind == "error" for p in found for n in p.nodes)


def test_feature_nodes_by_id_and_position(graph):
    node = graph.of_kind("feature")[0]
    assert node.id in graph.feature_nodes(node.feature_id)
    assert graph.feature_nodes(f"{node.feature_id}@{node.pos}") == {node.id}
    with pytest.raises(UnknownFeature, match="not a node"):
        graph.feature_nodes(f"{node.feature_id}@99")
    with pytest.raises(UnknownFeature, match="malformed"):
        graph.feature_nodes("L1-2")


def test_cli_paths_rank_via_and_refusals(catalog, graph):
    pid, target = graph.info.id, graph.nodes[_target(graph)]
    rows = run_json("paths", "--catalog", catalog, "--prompt", pid, "--to-logit", target.token, "-k", "3")
    expected = best_paths(graph, {n.id for n in graph.of_kind("token")}, target.id, 3)
    assert [r["nodes"] for r in rows] == [[graph.nodes[n].local for n in p.nodes] for p in expected]
    via = graph.nodes[expected[0].nodes[1]]
    rows = run_json("paths", "--catalog", catalog, "--prompt", pid, "--to-logit", target.token, "--via", via.feature_id,
                    "--no-errors", "--min-hops", "2", "--rank", "attribution")
    assert rows and all(any(n.startswith(via.feature_id + "@") for n in r["nodes"]) and len(r["nodes"]) >= 3
                        and not any(n.startswith("err") for n in r["nodes"]) for r in rows)
    assert_one_line_error(*run("paths", "--catalog", catalog, "--prompt", pid, "--to-logit", target.token, "--via", "L0/9999"),
                          "not a node")
    code, output = run("paths", "--catalog", catalog, "--from-token", "the", "--to-logit", "zzzz")
    assert code == 0 and "no feature has 'zzzz' among its top" in output
    code, output = run("paths", "--catalog", catalog, "--from-token", "the", "--to-logit", "x", "--via", "L0/1")
    assert code == 2 and "--prompt" in output
