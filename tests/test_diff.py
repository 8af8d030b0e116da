"""Comparing prompts (`diff`) on a real catalog (tiny GPT-2, random transcoders), against an independent computation
over the Parquet files with pandas and numpy: each node's effect on the target by solving the graph's linear system
(not the module's recursion), positions aligned from the token ids, the two sides outer-joined. Also: the same text
ingested with two targets, and the `prompts`, `prompt_nodes` and `prompt_edges` SQL views against pyarrow reads."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from circuit_catalog.catalog import layout
from circuit_catalog.errors import UnknownPrompt
from circuit_catalog.queries.catalog import Catalog

from tests.test_cli import assert_one_line_error, run, run_json

FRANCE, HOUSE = "the capital of france is", "the capital of this house is"


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, gpt2):
    from circuit_catalog import ingest
    from circuit_catalog.ingest.settings import AttributionSettings, PromptSpec

    from tests.conftest import random_transcoders

    root = tmp_path_factory.mktemp("diff")
    specs = [PromptSpec(FRANCE, target="the"), PromptSpec(HOUSE, target="the"), PromptSpec(FRANCE, target="a")]
    ingest(gpt2, random_transcoders(gpt2, d_sae=40, seed=11), root, prompts=specs,
           attribution=AttributionSettings(max_feature_nodes=24), progress=False)
    return root


@pytest.fixture(scope="module")
def ids(catalog) -> dict[tuple[str, str], str]:
    """(text, target) -> prompt id, from the index file."""
    return {(r["text"], r["target"]): r["id"] for r in pq.read_table(catalog / layout.PROMPT_INDEX).to_pylist()}


def _expected(catalog, pid_a: str, pid_b: str, target: str | None) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """(nodes, edges, shared prefix) of the diff, from the Parquet files by linear algebra and pandas joins."""
    index = pq.read_table(catalog / layout.PROMPT_INDEX).to_pandas().set_index("id")
    tokens = {pid: pq.read_table(layout.prompt_part(catalog, pid, "nodes")).to_pandas().query("kind == 'token'")
              .sort_values("pos")["token_id"].tolist() for pid in (pid_a, pid_b)}
    ta, tb = tokens[pid_a], tokens[pid_b]
    prefix = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
    sides = []
    for pid in (pid_a, pid_b):
        nodes = pq.read_table(layout.prompt_part(catalog, pid, "nodes")).to_pandas().query("kept").reset_index(drop=True)
        edges = pq.read_table(layout.prompt_part(catalog, pid, "edges")).to_pandas()
        row = {n: i for i, n in enumerate(nodes["id"])}
        unit = np.where((nodes["kind"] == "feature") & nodes["activation"].fillna(0).ne(0), nodes["activation"].fillna(1), 1.0)
        name = target if target is not None else index.loc[pid, "target"]
        t = nodes.index[(nodes["kind"] == "logit") & (nodes["token"] == name)][0]
        # per-unit effect g solves g = e_t + M g, M[s, d] = weight(s -> d) / unit(s)
        m = np.zeros((len(nodes), len(nodes)))
        s, d = edges["src"].map(row).to_numpy(), edges["dst"].map(row).to_numpy()
        m[s, d] = edges["weight"].to_numpy() / unit[s]
        e = np.zeros(len(nodes))
        e[t] = 1.0
        g = np.linalg.solve(np.eye(len(nodes)) - m, e)
        n_tok = int(index.loc[pid, "n_tokens"])
        apos = np.where(nodes["pos"] < prefix, nodes["pos"], nodes["pos"] - n_tok)
        nodes["name"] = [
            "target" if i == t else f"logit {tok!r}" if kind == "logit" else f"{fid}@{p}" if kind == "feature"
            else f"err:L{layer}@{p}" if kind == "error" else f"tok@{p}"
            for i, (kind, fid, layer, p, tok) in enumerate(zip(nodes["kind"], nodes["feature_id"], nodes["layer"], apos, nodes["token"]))]
        nodes["attribution"] = unit * g
        nodes.loc[t, "attribution"] = 1.0
        edges = edges.assign(src=nodes["name"].to_numpy()[s], dst=nodes["name"].to_numpy()[d], attribution=edges["weight"] * g[d])
        sides.append((nodes[["name", "attribution"]], edges[["src", "dst", "attribution"]]))
    (na, ea), (nb, eb) = sides
    n = na.merge(nb, on="name", how="outer", suffixes=("_a", "_b")).fillna({"attribution_a": 0.0, "attribution_b": 0.0})
    e = ea.merge(eb, on=["src", "dst"], how="outer", suffixes=("_a", "_b")).fillna({"attribution_a": 0.0, "attribution_b": 0.0})
    for frame in (n, e):
        frame["change"] = frame["attribution_b"] - frame["attribution_a"]
        frame["size"] = -frame["change"].abs()
    return (n.sort_values(["size", "name"]).reset_index(drop=True), e.sort_values(["size", "src", "dst"]).reset_index(drop=True), prefix)


def _check(found, nodes: pd.DataFrame, edges: pd.DataFrame, k: int) -> None:
    assert [r.node for r in found.nodes] == nodes["name"].tolist()[:k]
    assert [(r.src, r.dst) for r in found.edges] == list(zip(edges["src"], edges["dst"]))[:k]
    for got, (_, want) in zip([*found.nodes, *found.edges], [*nodes.head(k).iterrows(), *edges.head(k).iterrows()]):
        assert (got.attribution_a, got.attribution_b, got.change) == pytest.approx(
            (want["attribution_a"], want["attribution_b"], want["change"]), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("k", [5, 10_000])
def test_diff_of_two_capitals_equals_pandas(catalog, ids, k):
    a, b = ids[FRANCE, "the"], ids[HOUSE, "the"]
    nodes, edges, prefix = _expected(catalog, a, b, None)
    with Catalog(catalog, progress=False) as cat:
        found = cat.diff(a, HOUSE, k=k)  # by id and by text (that text is unique)
    assert found.prefix == prefix == 4  # BOS the capital of | france / this house | is
    assert (found.target_a, found.target_b) == ("logit 'the'", "logit 'the'")
    _check(found, nodes, edges, k)
    if k > 100:  # every row: the subject tokens align from the end, and the final ' is' too
        by_name = {r.node: r for r in found.nodes}
        assert (by_name["tok@-2"].token_a, by_name["tok@-2"].token_b) == ("france", "house")
        assert (by_name["tok@-1"].local_a, by_name["tok@-1"].local_b) == ("tok@5", "tok@6")
        assert by_name["target"].attribution_a == by_name["target"].attribution_b == 1.0


def test_same_text_two_targets(catalog, ids):
    the, a = ids[FRANCE, "the"], ids[FRANCE, "a"]
    with Catalog(catalog, progress=False) as cat:
        with pytest.raises(UnknownPrompt, match=f"use an id: {min(the, a)}, {max(the, a)}"):
            cat.diff(FRANCE, HOUSE)
        shown = {p.id: p.target for p in cat.prompts()}
        assert shown[the] == "the" and shown[a] == "a"
        found = cat.diff(the, a, k=10_000)
        nodes, edges, prefix = _expected(catalog, the, a, None)
        assert found.prefix == prefix == 6
        _check(found, nodes, edges, 10_000)
        # --target reads both graphs against one logit (' the' is a logit target of both)
        found = cat.diff(the, a, target="the", k=8)
        nodes, edges, _ = _expected(catalog, the, a, "the")
        _check(found, nodes, edges, 8)


def test_node_attribution_is_the_sum_of_its_edges(catalog, ids):
    """A node's attribution equals the sum of its outgoing edges' attributions (in prompt A, with k covering all)."""
    with Catalog(catalog, progress=False) as cat:
        found = cat.diff(ids[FRANCE, "the"], ids[HOUSE, "the"], k=100_000)
    out: dict[str, float] = {}
    for r in found.edges:
        out[r.src] = out.get(r.src, 0.0) + r.attribution_a
    for r in found.nodes:
        if r.local_a is not None and r.node != "target" and r.kind != "logit":
            assert r.attribution_a == pytest.approx(out.get(r.node, 0.0), rel=1e-6, abs=1e-9)


def test_cli_diff_and_prompts(catalog, ids):
    a, b = ids[FRANCE, "the"], ids[HOUSE, "the"]
    with Catalog(catalog, progress=False) as cat:
        want = cat.diff(a, b, k=3)
    got = run_json("diff", "--catalog", catalog, "--prompt", a, "--prompt", b, "-k", "3")
    assert [r["node"] for r in got["nodes"]] == [r.node for r in want.nodes]
    assert [(r["src"], r["dst"]) for r in got["edges"]] == [(r.src, r.dst) for r in want.edges]
    code, output = run("diff", "--catalog", catalog, "--prompt", a, "--prompt", b, "-k", "3")
    assert code == 0 and "shared prefix: 4 tokens" in output and want.nodes[0].node in output
    assert_one_line_error(*run("diff", "--catalog", catalog, "--prompt", FRANCE, "--prompt", b), "use an id")
    listed = {r["id"]: r["target"] for r in run_json("prompts", "--catalog", catalog)}
    assert listed == {pid: target for (_, target), pid in ids.items()}


def test_sql_prompt_views_equal_pyarrow(catalog, ids):
    with Catalog(catalog, progress=False) as cat:
        prompts = cat.sql("SELECT id, text, target, n_tokens FROM prompts ORDER BY id")
        nodes = cat.sql("SELECT prompt_id, count(*) AS n, count(*) FILTER (WHERE kept) AS kept FROM prompt_nodes "
                        "GROUP BY prompt_id ORDER BY prompt_id")
        edges = cat.sql("SELECT prompt_id, src, dst, weight, kept FROM prompt_edges ORDER BY prompt_id, src, dst")
    index = pq.read_table(catalog / layout.PROMPT_INDEX).to_pylist()
    assert [dict(r) for r in prompts] == sorted(({k: r[k] for k in ("id", "text", "target", "n_tokens")} for r in index),
                                                key=lambda r: r["id"])
    expected_nodes, expected_edges = [], []
    for pid in sorted(ids.values()):
        table = pq.read_table(layout.prompt_part(catalog, pid, "nodes")).to_pandas()
        expected_nodes.append({"prompt_id": pid, "n": len(table), "kept": int(table["kept"].sum())})
        # edges_full holds the unpruned edges into the logits (the default); the view adds the pruned graph's
        full = pq.read_table(layout.prompt_part(catalog, pid, "edges_full")).to_pylist()
        pruned = pq.read_table(layout.prompt_part(catalog, pid, "edges")).to_pylist()
        kept = {(e["src"], e["dst"]) for e in pruned}
        assert kept and {(e["src"], e["dst"]) for e in full} - kept
        stored = {(e["src"], e["dst"]): e["weight"] for e in full + pruned}
        expected_edges += [(pid, s, d, w, (s, d) in kept) for (s, d), w in stored.items()]
    assert [dict(r) for r in nodes] == expected_nodes
    expected_edges.sort(key=lambda r: r[:3])
    assert [(r["prompt_id"], r["src"], r["dst"], r["kept"]) for r in edges] == [(p, s, d, k) for p, s, d, _, k in expected_edges]
    assert [r["weight"] for r in edges] == pytest.approx([r[3] for r in expected_edges])
