"""Supernodes: known groups recovered from a constructed graph, names from the members' tokens, and the groups of a real
catalog in the export (the viewer's `qParams.supernodes`), the prompt report and the CLI."""

from __future__ import annotations

import json
from html import escape

import numpy as np
import pytest
from circuit_catalog.catalog import layout
from circuit_catalog.ingest.supernodes import group_features, group_name

from tests.test_cli import assert_one_line_error, run


def test_constructed_roles_are_recovered():
    """Three roles of four features each (reading the same sources, writing the same targets, decoders near one
    direction per role) and two loners: exactly the three groups come back, most influential first."""
    g = np.random.default_rng(0)
    n_roles, per, n_other = 3, 4, 30
    profiles, directions, influence = [], [], []
    role_dirs = g.normal(size=(n_roles, 64))
    for r in range(n_roles):
        base = np.zeros(2 * n_other)
        base[g.choice(n_other, 3, replace=False)] = g.uniform(0.5, 1.0, 3)  # shared inputs
        base[n_other + g.choice(n_other, 3, replace=False)] = g.uniform(0.5, 1.0, 3)  # shared outputs
        for _ in range(per):
            profiles.append(base * g.uniform(0.5, 2.0) + g.normal(scale=0.02, size=base.shape))
            directions.append(role_dirs[r] + g.normal(scale=0.2, size=64))
            influence.append(float(r + 1))
    for _ in range(2):  # loners: own inputs and outputs, own directions
        lone = np.zeros(2 * n_other)
        lone[g.choice(2 * n_other, 2, replace=False)] = 1.0
        profiles.append(lone)
        directions.append(g.normal(size=64))
        influence.append(10.0)
    groups = group_features(np.array(profiles), np.array(directions), np.array(influence))
    assert [g.members for g in groups] == [list(range(8, 12)), list(range(4, 8)), list(range(0, 4))]
    assert [g.weight for g in groups] == [12.0, 8.0, 4.0]
    # profiles alone find the same roles; nothing joins when nothing is similar
    assert [g.members for g in group_features(np.array(profiles), None, np.array(influence))] == [g.members for g in groups]
    assert group_features(np.eye(5), np.eye(5), np.ones(5)) == []


def test_group_names_use_logit_lens_late_and_deembedding_early():
    names = {"L9/1": ([" Paris", " France"], ["a"]), "L8/2": ([" Paris", " French"], ["b"]), "L0/3": (["x"], [" capital", " city"]),
             "L1/4": (["y"], [" capital"])}
    assert group_name(["L9/1", "L8/2"], names, n_layers=10) == "→ ' Paris' / ' France' / ' French'"
    assert group_name(["L0/3", "L1/4"], names, n_layers=10) == "← ' capital' / ' city'"


@pytest.fixture(scope="module")
def grouped(tmp_path_factory, gpt2):
    """A real catalog (tiny GPT-2, random transcoders) with three prompts, grouped by `ingest` itself."""
    from circuit_catalog import ingest

    from tests.conftest import random_transcoders

    root = tmp_path_factory.mktemp("grouped")
    tset = random_transcoders(gpt2, d_sae=120, seed=3)
    prompts = ["the capital of france is", "the jury said the city", "she was in the house by the river"]
    ingest(gpt2, tset, root, prompts=prompts, progress=False)
    assert (root / layout.SUPERNODES).is_file()
    return root


def test_export_report_and_cli_show_the_groups(grouped, tmp_path):
    import pyarrow.parquet as pq

    from circuit_catalog import Catalog

    root = grouped
    groups = pq.read_table(root / layout.SUPERNODES).to_pylist()
    pid = next(g["prompt_id"] for g in groups if g["prompt_id"])
    cat = Catalog(root)
    mine = cat.supernodes(pid)
    assert mine and {g.id for g in mine} == {g["id"] for g in groups if g["prompt_id"] == pid}
    graph = cat.export_neuronpedia(pid, tmp_path / "g.json")
    ids = {n["node_id"]: n for n in graph["nodes"]}
    assert sorted(s[0] for s in graph["qParams"]["supernodes"]) == sorted(g.name for g in mine)
    for label, *members in graph["qParams"]["supernodes"]:
        assert members and all(m in ids for m in members)
        assert set(members) <= set(graph["qParams"]["pinnedIds"])
        group = next(g for g in mine if g.name == label)
        assert {f"L{ids[m]['layer']}/{int(m.split('_')[1])}" for m in members} == set(group.members)
    html = cat.report_prompt(pid, tmp_path / "p.html").read_text()
    assert "Supernodes" in html and escape(mine[0].name) in html
    data = json.loads(run("supernodes", "--catalog", root, "--prompt", pid, "--format", "json")[1])
    assert [g["id"] for g in data] == [g.id for g in mine]
    code, output = run("supernodes", mine[0].members[0], "--catalog", root)
    assert code == 0 and "supernodes holding" in output
    assert mine[0].id in [g["id"] for g in json.loads(run("supernodes", mine[0].members[0], "--catalog", root, "--format", "json")[1])]
    code, output = run("recurring-paths", "--catalog", root, "--hops", "2", "-k", "3")
    assert code == 0 and "recurring paths" in output
    code, output = run("cooccur", mine[0].members[0], "--catalog", root, "-k", "3")
    assert code == 0 and "co-occurring" in output
    assert_one_line_error(*run("cooccur", "L0/99999", "--catalog", root), "unknown feature")
    assert_one_line_error(*run("supernodes", "--catalog", root, "--prompt", "no such prompt"), "no such prompt")
    code, output = run("supernodes", "L0/1", "--catalog", root, "--prompt", pid)
    assert code == 2 and "not both" in output


def test_a_catalog_without_groups_writes_empty_tables(tmp_path, grouped):
    """A threshold no pair passes: no supernode anywhere, and both files are still written with their schemas (an
    empty member list once made the name lookup compare strings with a null-typed list)."""
    import pyarrow.parquet as pq

    import shutil

    from circuit_catalog.ingest.supernodes import write_supernodes

    root = shutil.copytree(grouped, tmp_path / "copy")
    assert write_supernodes(root, None, threshold=1.01) == 0
    assert pq.read_table(root / layout.SUPERNODES).schema.equals(layout.SUPERNODE_SCHEMA)
    assert pq.read_table(root / layout.SUPERNODE_MEMBERS).num_rows == 0
