"""Both graph stores pass one suite: Parquet -> store -> every named query equals a direct pyarrow
computation over the same Parquet. LadybugDB always; the Neo4j backend over a real Bolt server
(ArcadeDB, started on 127.0.0.1 by the session fixture)."""

from __future__ import annotations

import base64
import itertools
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from circuit_catalog.catalog import layout
from circuit_catalog.catalog.ids import parse_feature_id, split_node_id
from circuit_catalog.catalog.graph_schema import node_set
from circuit_catalog.catalog.ladybug_store import LadybugStore
from circuit_catalog.ingest.job import build_manifest, run_ingest, run_stats
from circuit_catalog.ingest.prompts import run_prompts
from circuit_catalog.ingest.settings import AttributionSettings, IngestSettings, PromptSpec
from circuit_catalog.ingest.supernodes import write_supernodes
from circuit_catalog.queries.lookups import Lookups, named_query, query_names, token_texts
from circuit_catalog.queries.prompt_graph import PromptGraph

from circuit_catalog.errors import CatalogDirError, CypherError, StoreError, UnknownFeature, UnknownPrompt
from tests.conftest import random_transcoders

PASSWORD = "test-root-password"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def catalog_dir(tmp_path_factory, gpt2, text_file) -> Path:
    """A real catalog of a tiny GPT-2: 3 layers x 200 features, ~4,800 pullback edges, statistics (for the layers' norm
    scales), three prompts' graphs."""
    root = tmp_path_factory.mktemp("catalog")
    tset = random_transcoders(gpt2, d_sae=200, seed=7)
    settings = IngestSettings(top_k=4, token_top_k=5, heads_top_k=3)
    run_ingest(gpt2, tset, root, build_manifest(gpt2, "tiny", tset, "mem", settings), progress=False)
    assert run_stats(gpt2, tset, root, str(text_file), 200, ctx_len=16, top_k=3, progress=False)
    ids = run_prompts(gpt2, tset, root, PROMPTS, AttributionSettings(max_feature_nodes=250, node_threshold=0.6), progress=False)
    assert write_supernodes(root, tset, threshold=0.3) > 0
    record_interventions(gpt2, tset, root, ids[0])
    return root


def record_interventions(model, tset, root: Path, pid: str) -> None:
    """Two interventions on a catalog prompt (one touching two features) and one on a prompt outside it."""
    from circuit_catalog.catalog.manifest import Manifest
    from circuit_catalog.ingest.attribution import prompt_tokens
    from circuit_catalog.ingest.intervention_log import add_intervention, intervention_row
    from circuit_catalog.ingest.interventions import Regime, intervene, parse_edit

    manifest = Manifest.read(root)
    for text, prompt_id, specs, regime in [
        (PROMPTS[0].text, pid, [("set", "L1/5@-1=0"), ("scale", "L2/7=3")], Regime.REPLACEMENT),
        (PROMPTS[0].text, pid, [("add", "L1/5@*=2")], Regime.DIRECT_ONLY),
        ("the river was cold", None, [("set", "L2/7@2=1")], Regime.FREEZE_ATTENTION),
    ]:
        tokens = prompt_tokens(model, text)
        edits = [parse_edit(op, spec) for op, spec in specs]
        result = intervene(model, tset, tokens, edits, regime, k=3)
        add_intervention(root, intervention_row(manifest, tokens.tolist(), prompt_id, edits, result))


PROMPTS = [PromptSpec("the capital of france is"), PromptSpec("the jury said the city", target="election"),
           PromptSpec("she was in the house by the river")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_arcadedb(root: Path, bolt: int, http: int) -> subprocess.Popen:
    """ArcadeDB with its Bolt plugin on 127.0.0.1, in a child process: a real server speaking Neo4j's protocol."""
    pytest.importorskip("arcadedb_embedded", reason="arcadedb-embedded is installed by the set-up")
    log = open(root / "server.log", "a")
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "tools" / "arcadedb_server.py"), str(root), PASSWORD, str(bolt), str(http)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
    )
    log.close()
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        pytest.fail(f"ArcadeDB did not start; see {root / 'server.log'}")
    return proc


def _stop_arcadedb(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def _create_database(http: int) -> str:
    name = f"catalog{next(_names)}"
    auth = base64.b64encode(f"root:{PASSWORD}".encode()).decode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{http}/api/v1/server", method="POST",
        data=json.dumps({"command": f"create database {name}"}).encode(),
        headers={"Authorization": f"Basic {auth}", "Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=30).read()
    return name


_names = itertools.count()


@pytest.fixture(scope="session")
def bolt_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("arcadedb")
    bolt, http = _free_port(), _free_port()
    proc = _start_arcadedb(root, bolt, http)
    yield f"bolt://127.0.0.1:{bolt}", lambda: _create_database(http)
    _stop_arcadedb(proc)


def _bolt_store(bolt_server):
    from circuit_catalog.catalog.neo4j_store import Neo4jStore

    uri, new_database = bolt_server
    return Neo4jStore(uri, database=new_database(), auth=("root", PASSWORD))


@pytest.fixture(scope="session", params=["ladybug", "bolt"])
def store(request, catalog_dir, tmp_path_factory):
    if request.param == "ladybug":
        s = LadybugStore(tmp_path_factory.mktemp("embedded") / "graph")
    else:
        s = _bolt_store(request.getfixturevalue("bolt_server"))
    assert s.load(catalog_dir, progress=False) is True
    yield s
    s.close()


@pytest.fixture(scope="session")
def ref(catalog_dir):
    """The catalog's Parquet, read directly with pyarrow: the reference every query is held to."""
    tokens = {r["id"]: r["text"] for r in pq.read_table(catalog_dir / layout.TOKENS).to_pylist()}

    def rows(pattern):
        return [r for f in sorted(catalog_dir.glob(pattern)) for r in pq.read_table(f).to_pylist()]

    return {
        "tokens": tokens,
        "pullbacks": rows(layout.PULLBACK_PARTS),
        "deembed": rows(layout.DEEMBED_PARTS),
        "logits": rows(layout.LOGIT_PARTS),
        "ov": rows(layout.OV_PARTS),
        "ov_tokens": rows(layout.OV_TOKEN_PARTS),
        "features": {r["id"]: r for r in pq.read_table(catalog_dir / layout.FEATURES).to_pylist()},
        "pnodes": rows(layout.prompt_part_glob("nodes")),
        "attr": rows(layout.prompt_part_glob("edges")),
        "attr_heads": rows(layout.prompt_part_glob("edges_heads")),
        "prompts": pq.read_table(catalog_dir / layout.PROMPT_INDEX).to_pylist(),
        "supernodes": pq.read_table(catalog_dir / layout.SUPERNODES).to_pylist(),
        "supernode_members": pq.read_table(catalog_dir / layout.SUPERNODE_MEMBERS).to_pylist(),
    }


def layer_of(fid: str) -> int:
    return parse_feature_id(fid)[0]


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("fid", ["L2/0", "L2/77", "L1/199", "L0/17"])
@pytest.mark.parametrize("layer, sign, normalise", [(None, None, False), (0, None, False), (None, -1, False), (None, None, True),
                                                    (2, 1, True)])
def test_upstream_and_downstream(store, ref, fid, layer, sign, normalise):
    """Edges as the Parquet has them; normalised: weight x the reading (later) feature's inv_scale, ordered by that."""
    lookups = Lookups(store)
    for direction, this, other in (("upstream", "dst", "src"), ("downstream", "src", "dst")):
        expected = [
            (r[other], r["weight"] * (ref["features"][r["dst"]]["inv_scale"] if normalise else 1)) for r in ref["pullbacks"]
            if r[this] == fid and (layer is None or layer_of(r[other]) == layer) and (sign is None or r["weight"] * sign > 0)
        ]
        expected = sorted(expected, key=lambda e: (-abs(e[1]), e[0]))[:7]
        got = getattr(lookups, direction)(fid, k=7, layer=layer, sign=sign, normalise=normalise)
        assert [e.feature for e in got] == [e[0] for e in expected], direction
        assert [e.weight for e in got] == pytest.approx([e[1] for e in expected], rel=1e-6)
        for e in got:  # orientation tokens: the other feature's top extended de-embedding tokens
            assert e.tokens == ref["features"][e.feature]["deembed_ext_tokens"][:5]


@pytest.mark.parametrize("kind", ["ladybug", "bolt"])
def test_a_catalog_from_before_the_norm_scales(kind, catalog_dir, tmp_path, request):
    """features.parquet without `inv_scale` (written before the scales were recorded) loads, its Feature nodes without
    the property: raw weights answer, --normalise is refused in one line; the admin import leaves the field empty."""
    import shutil

    from circuit_catalog.catalog.neo4j_import import write_admin_import

    root = tmp_path / "old"
    shutil.copytree(catalog_dir, root, ignore=shutil.ignore_patterns("graph*"))
    pq.write_table(pq.read_table(root / layout.FEATURES).drop_columns(["inv_scale"]), root / layout.FEATURES)
    store = LadybugStore(tmp_path / "graph") if kind == "ladybug" else _bolt_store(request.getfixturevalue("bolt_server"))
    try:
        assert store.load(root, progress=False) is True
        lookups = Lookups(store)
        assert len(lookups.upstream("L2/0", k=3)) == 3
        assert store.run("MATCH (f:Feature {id: $id}) RETURN f.inv_scale AS s", {"id": "L2/0"}) == [{"s": None}]
        with pytest.raises(CatalogDirError, match="no recorded norm scales"):
            lookups.downstream("L0/17", k=3, normalise=True)
    finally:
        store.close()
    if kind == "ladybug":
        write_admin_import(root, tmp_path / "import", progress=lambda _: None)
        column = [name for name, _ in node_set("Feature").columns].index("inv_scale")
        rows = read_import_csv((tmp_path / "import" / "Feature.csv").read_text(encoding="utf-8"))
        assert {r[column] for r in rows} == {("", False)}


@pytest.mark.parametrize("fid, head, layer", [("L2/5", None, None), ("L2/5", "L2H1", None), ("L1/150", None, 0), ("L0/3", None, None)])
def test_heads(store, ref, fid, head, layer):
    """`heads`: the k strongest OV pullbacks into a feature (one edge per source and head), as the Parquet has them."""
    from circuit_catalog.queries.heads import head_inputs

    got = head_inputs(Lookups(store), fid, k=6, head=head, layer=layer)
    expected = sorted(((r["src"], r["head"], r["weight"]) for r in ref["ov"] if r["dst"] == fid and head in (None, r["head"])
                       and layer in (None, layer_of(r["src"]))), key=lambda e: (-abs(e[2]), e[0], e[1]))[:6]
    assert [(e.source, e.head) for e in got.features] == [e[:2] for e in expected]
    assert [e.weight for e in got.features] == pytest.approx([e[2] for e in expected], rel=1e-6)
    if fid == "L0/3":
        assert got.features == []  # attention layer 0 has no earlier transcoder: token sources only
    expected = sorted(((ref["tokens"][r["src"]], r["head"], r["weight"], r["src"]) for r in ref["ov_tokens"] if r["dst"] == fid
                       and head in (None, r["head"])), key=lambda e: (-abs(e[2]), e[3], e[1]))[:6]
    assert [(e.source, e.head) for e in got.tokens] == [e[:2] for e in expected]


def test_edge_heads_round_trip_and_sum_to_each_edge(store, ref, catalog_dir, tmp_path):
    """ATTR_HEAD: each pruned edge's per-head terms come back from the store as stored, sum to the ATTR weight,
    and the prompt report shows which heads carried the strongest edges across positions."""
    from circuit_catalog.queries.heads import edge_heads
    from circuit_catalog.queries.reports.prompt import write_prompt_report

    lookups = Lookups(store)
    for prompt in ref["prompts"]:
        got = edge_heads(lookups, prompt["id"])
        stored = [r for r in ref["attr_heads"] if r["dst"].startswith(prompt["id"] + ":")]
        assert sum(len(v) for v in got.values()) == len(stored) > 0
        for r in ref["attr"]:
            if r["dst"].startswith(prompt["id"] + ":"):
                assert sum(w for _, w in got[(r["src"], r["dst"])]) == pytest.approx(r["weight"], rel=1e-4, abs=1e-5)
    html = write_prompt_report(lookups, catalog_dir, ref["prompts"][0]["id"], tmp_path / "p.html").read_text()
    assert "which heads carried them" in html and re.search(r"L\dH\d -?\d+%", html)


def test_export_with_heads_adds_the_split_and_nothing_else(catalog_dir, ref, tmp_path):
    """`export --heads`: every link gains its per-head terms (summing to its weight) and the labels of nodes with
    head-carried inputs name the heads; everything else is the plain (circuit-tracer-identical) export's."""
    from circuit_catalog.queries.neuronpedia import export_neuronpedia

    pid = ref["prompts"][0]["id"]
    plain = export_neuronpedia(catalog_dir, pid, tmp_path / "plain" / "g.json")
    split = export_neuronpedia(catalog_dir, pid, tmp_path / "heads" / "g.json", heads=True)
    assert not any("heads" in link for link in plain["links"])
    assert [{k: v for k, v in link.items() if k != "heads"} for link in split["links"]] == plain["links"]
    assert sum("heads" in link for link in split["links"]) == len(split["links"]) > 0
    for link in split["links"]:
        assert sum(link["heads"].values()) == pytest.approx(link["weight"], rel=1e-4, abs=1e-5)
    labelled = [n for n in split["nodes"] if "via heads" in n["clerp"]]
    assert labelled and all(re.search(r"via heads (L\dH\d|direct|other) -?\d+%", n["clerp"]) for n in labelled)
    strip = [{k: v for k, v in n.items() if k != "clerp"} for n in split["nodes"]]
    assert strip == [{k: v for k, v in n.items() if k != "clerp"} for n in plain["nodes"]]
    from tests.test_cli import run as run_cli

    code, output = run_cli("export", "--catalog", catalog_dir, "--prompt", pid, "--neuronpedia", tmp_path / "cli" / "g.json", "--heads")
    assert code == 0, output
    assert json.loads((tmp_path / "cli" / "g.json").read_text()) == split


def test_heads_unknown(store):
    from circuit_catalog.errors import UnknownHead
    from circuit_catalog.queries.heads import head_inputs

    with pytest.raises(UnknownHead, match="unknown head L9H0"):
        head_inputs(Lookups(store), "L2/5", head="L9H0")
    with pytest.raises(UnknownHead, match="malformed"):
        head_inputs(Lookups(store), "L2/5", head="7.3")


def test_tokens(store, ref):
    fid = "L1/42"
    card = Lookups(store).tokens(fid, k=5)
    for variant, got in (("raw", card.deembed), ("extended", card.deembed_extended)):
        expected = sorted(((ref["tokens"][r["src"]], r["weight"], r["src"]) for r in ref["deembed"] if r["dst"] == fid and r["variant"] == variant),
                          key=lambda t: (-t[1], t[2]))
        assert [t for t, _ in got] == [t for t, _, _ in expected]
    expected = sorted(((ref["tokens"][r["dst"]], r["weight"]) for r in ref["logits"] if r["src"] == fid), key=lambda t: -t[1])
    assert [t for t, _ in card.logits] == [t for t, _ in expected]
    assert [w for _, w in card.logits] == pytest.approx([w for _, w in expected], rel=1e-6)


def test_search(store, ref):
    word = "paris"
    texts = set(token_texts(word))

    def top(rows):
        return [f for f, _ in sorted(rows, key=lambda h: (-h[1], h[0]))[:6]]

    expected = top([(r["src"], r["weight"]) for r in ref["logits"] if ref["tokens"][r["dst"]] in texts])
    for variant in ("extended", "raw"):
        expected += top([(r["dst"], r["weight"]) for r in ref["deembed"] if r["variant"] == variant and ref["tokens"][r["src"]] in texts])
    got = Lookups(store).search(word, k=6)
    assert [h.feature for h in got] == expected
    assert [h.via for h in got] == sorted((h.via for h in got), key=["logit", "deembed_extended", "deembed_raw"].index)


def _brute_force_paths(ref, start_texts, end_texts, max_hops):
    """Enumerate every token -> feature ... -> logit path in the catalog, no pruning."""
    out = defaultdict(list)
    for r in ref["pullbacks"]:
        out[r["src"]].append((r["dst"], r["weight"]))
    ends = {r["src"]: (ref["tokens"][r["dst"]], r["weight"]) for r in ref["logits"] if ref["tokens"][r["dst"]] in end_texts}
    paths = []

    def walk(nodes, weights, hops):
        if nodes[-1] in ends:
            token, w = ends[nodes[-1]]
            paths.append((nodes + [token], weights + [w]))
        if hops < max_hops:
            for dst, w in out[nodes[-1]]:
                walk(nodes + [dst], weights + [w], hops + 1)

    for r in ref["deembed"]:
        if r["variant"] == "extended" and ref["tokens"][r["src"]] in start_texts:
            walk([ref["tokens"][r["src"]], r["dst"]], [r["weight"]], 0)
    strength = lambda p: abs(__import__("math").prod(p[1]))  # noqa: E731
    return sorted(paths, key=lambda p: (-strength(p), p[0]))


def test_paths_exact_with_a_wide_beam(store, ref):
    expected = _brute_force_paths(ref, set(token_texts("the")), set(token_texts("city")), max_hops=2)
    assert expected, "the fixture catalog should connect these tokens"
    got = Lookups(store).paths("the", "city", k=10, max_hops=2, beam=10**6)
    assert [p.nodes for p in got] == [p[0] for p in expected[:10]]
    assert [p.strength for p in got] == pytest.approx([__import__("math").prod(p[1]) for p in expected[:10]], rel=1e-5)
    assert all(len(p.nodes) - 3 <= 2 for p in got)  # at most 2 pullback hops


def test_unknown_and_malformed_features(store):
    lookups = Lookups(store)
    with pytest.raises(UnknownFeature, match="unknown feature L7/1"):
        lookups.upstream("L7/1")
    with pytest.raises(UnknownFeature, match="malformed"):
        lookups.tokens("L1-1")


# ---------------------------------------------------------------- prompts' attribution graphs


def test_prompt_graphs_round_trip(store, ref):
    lookups = Lookups(store)
    assert sorted(p.id for p in lookups.prompts()) == sorted(r["id"] for r in ref["prompts"])
    for row in ref["prompts"]:
        info = lookups.prompt(row["id"])
        assert (info.text, info.n_tokens) == (row["text"], row["n_tokens"])
        assert info.replacement_score == pytest.approx(row["replacement_score"], rel=1e-6)
        graph = lookups.prompt_graph(row["id"])
        kept = {n["id"]: n for n in ref["pnodes"] if n["prompt_id"] == row["id"] and n["kept"]}
        assert set(graph.nodes) == set(kept)
        for nid, node in graph.nodes.items():
            assert (node.kind, node.layer, node.pos, node.feature_index, node.feature_id, node.token_id, node.token) == tuple(
                kept[nid][c] for c in ("kind", "layer", "pos", "feature_index", "feature_id", "token_id", "token"))
            assert node.influence == pytest.approx(kept[nid]["influence"], rel=1e-6)
        expected = {(e["src"], e["dst"]): e["weight"] for e in ref["attr"] if e["dst"] in kept}
        got = {(src, dst): w for dst, ins in graph.edges.items() for src, w in ins}
        assert got.keys() == expected.keys() and len(got) > 10
        assert [got[key] for key in sorted(got)] == pytest.approx([expected[key] for key in sorted(got)], rel=1e-6)


def test_diff_on_both_stores(store, catalog_dir, ref):
    """`diff` reads both graphs through the store's named queries (`prompt_nodes`, `prompt_edges`): the same rows as
    the diff of the graphs read from the Parquet parts (`tests/test_diff.py` checks those against pandas)."""
    from circuit_catalog.queries.diff import diff_graphs

    lookups = Lookups(store)
    a, b = sorted(r["id"] for r in ref["prompts"])[:2]
    logits = [{n["token"] for n in ref["pnodes"] if n["prompt_id"] == pid and n["kind"] == "logit"} for pid in (a, b)]
    for target in (None, min(logits[0] & logits[1])):
        got = diff_graphs(lookups.prompt_graph(a), lookups.prompt_graph(b), target, k=12)
        want = diff_graphs(PromptGraph.from_catalog(catalog_dir, a), PromptGraph.from_catalog(catalog_dir, b), target, k=12)
        assert (got.prefix, got.target_a, got.target_b) == (want.prefix, want.target_a, want.target_b)
        assert [(r.node, r.local_a, r.local_b) for r in got.nodes] == [(r.node, r.local_a, r.local_b) for r in want.nodes]
        assert [(r.src, r.dst) for r in got.edges] == [(r.src, r.dst) for r in want.edges]
        assert [r.change for r in [*got.nodes, *got.edges]] == pytest.approx([r.change for r in [*want.nodes, *want.edges]], rel=1e-5)
        assert any(r.change for r in got.edges)


def feature_uses(pnodes: list[dict]) -> dict[str, dict[str, list]]:
    """feature id -> prompt id -> its kept nodes there, from the prompts' nodes.parquet rows."""
    uses: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for n in pnodes:
        if n["kept"] and n["kind"] == "feature":
            uses[n["feature_id"]][n["prompt_id"]].append(n)
    return uses


def assert_recurring(lookups: Lookups, pnodes: list[dict], features: dict[str, dict]) -> None:
    """`recurring` over the whole ranking equals its definition computed from the prompts' Parquet rows: per feature of a
    pruned graph, the prompts holding it and its summed influence, by prompts then influence (descending) then id."""
    uses = feature_uses(pnodes)
    counts = {f: (len(p), sum(n["influence"] for ns in p.values() for n in ns)) for f, p in uses.items()}
    expected = sorted(counts, key=lambda f: (-counts[f][0], -counts[f][1], f))
    got = lookups.recurring(k=100_000)
    assert [(r.feature, r.prompts) for r in got] == [(f, counts[f][0]) for f in expected]
    assert [r.influence for r in got] == pytest.approx([counts[f][1] for f in expected], rel=1e-5)
    assert [(r.tokens, r.logit_tokens) for r in got] == [(features[f]["deembed_ext_tokens"][:5], features[f]["logit_tokens"][:5])
                                                         for f in expected]
    assert lookups.recurring(k=3) == got[:3]


def test_prompts_using_and_recurring(store, ref):
    lookups = Lookups(store)
    uses = feature_uses(ref["pnodes"])
    shared = sorted(uses, key=lambda f: (-len(uses[f]), f))[:3]
    for fid in shared:
        got = lookups.prompts_using(fid, k=10)
        expected = sorted(((pid, sorted(n["pos"] for n in ns), sum(n["influence"] for n in ns)) for pid, ns in uses[fid].items()),
                          key=lambda t: (-t[2], t[0]))
        assert [(u.prompt, u.positions) for u in got] == [(p, pos) for p, pos, _ in expected]
        assert [u.influence for u in got] == pytest.approx([i for _, _, i in expected], rel=1e-5)
    assert_recurring(lookups, ref["pnodes"], ref["features"])
    unused = next(f for f in ref["features"] if f not in uses)
    assert lookups.prompts_using(unused) == []


@pytest.mark.parametrize("kind", ["ladybug", "bolt"])
def test_recurring_follows_a_changed_prompt_set(kind, catalog_dir, ref, tmp_path, request):
    """The feature tally is counted again when the prompt set changes: a copy of the catalog without one prompt, its
    tally counted for all three, loads with `recurring` equal to the definition over the two left."""
    import shutil

    from circuit_catalog.catalog.tallies import refresh_tallies
    from circuit_catalog.ingest.prompts import write_prompt_index

    root = tmp_path / "fewer"
    shutil.copytree(catalog_dir, root, ignore=shutil.ignore_patterns("graph*"))
    refresh_tallies(root)
    before = pq.read_table(root / layout.FEATURE_TALLY)
    gone = ref["prompts"][0]["id"]
    shutil.rmtree(layout.prompt_dir(root, gone))
    write_prompt_index(root)
    store = LadybugStore(tmp_path / "graph") if kind == "ladybug" else _bolt_store(request.getfixturevalue("bolt_server"))
    try:
        assert store.load(root, progress=False) is True
        assert not pq.read_table(root / layout.FEATURE_TALLY).equals(before)
        assert_recurring(Lookups(store), [n for n in ref["pnodes"] if n["prompt_id"] != gone], ref["features"])
    finally:
        store.close()


def test_embedded_load_in_chunks_is_complete(catalog_dir, ref, tmp_path):
    """Relationship parts loaded 500 rows at a time at most (each table in several COPYs, as a catalog too large for
    the buffer pool is) give every row, once."""
    chunked = LadybugStore(tmp_path / "graph", copy_rows=500)
    try:
        assert chunked.load(catalog_dir, progress=False) is True
        assert len(ref["attr"]) > 500 and len(ref["pullbacks"]) > 500
        assert _counts(chunked) == _expected_counts(ref)
        got = chunked.run("MATCH (a)-[e:ATTR]->(b) RETURN a.id AS src, b.id AS dst, e.weight AS weight")
        assert sorted(tuple(r.values()) for r in got) == sorted(tuple(r.values()) for r in ref["attr"])
        got = chunked.run("MATCH (a)-[e:ATTR_HEAD]->(b) RETURN a.id AS src, b.id AS dst, e.head AS head, e.weight AS weight")
        assert sorted(tuple(r.values()) for r in got) == sorted(tuple(r.values()) for r in ref["attr_heads"])
        links = chunked.run("MATCH (:PNode)-[e:INSTANCE_OF]->() RETURN count(e) AS n")[0]["n"]
        assert links == sum(n["kind"] in ("feature", "token", "logit") for n in ref["pnodes"])
        assert_recurring(Lookups(chunked), ref["pnodes"], ref["features"])
    finally:
        chunked.close()


def test_supernodes_round_trip(store, ref):
    """Every supernode comes back from the store with the members and name written, by prompt, over the prompt set,
    and by member feature."""
    from circuit_catalog.queries.motifs import supernodes

    lookups = Lookups(store)
    members = defaultdict(list)
    for r in ref["supernode_members"]:
        members[r["src"]].append(r["dst"])
    expected = {r["id"]: (r["prompt_id"], r["name"], sorted(members[r["id"]], key=parse_feature_id)) for r in ref["supernodes"]}
    scopes = {p for p, _, _ in expected.values()}
    assert "" in scopes and len(scopes) > 1  # groups over the prompt set and in at least one prompt
    for scope in scopes:
        got = supernodes(lookups, scope or None)
        assert {g.id: (g.prompt, g.name, g.members) for g in got} == {i: e for i, e in expected.items() if e[0] == scope}
        assert [g.influence for g in got] == sorted((g.influence for g in got), reverse=True)
    fid = ref["supernode_members"][0]["dst"]
    got = supernodes(lookups, feature=fid)
    assert {g.id for g in got} == {i for i, e in expected.items() if fid in e[2]}
    assert all(fid in g.members for g in got)


def test_cooccurrence_and_recurring_paths_equal_pyarrow(store, ref):
    """`cooccur` and `recurring-paths` (1 and 2 edges) against the same counts computed from the prompts' Parquet."""
    from circuit_catalog.queries.motifs import cooccurring, recurring_paths

    lookups = Lookups(store)
    kept = {n["id"]: n for n in ref["pnodes"] if n["kept"]}
    by_prompt = defaultdict(set)
    influence = defaultdict(float)
    for n in kept.values():
        if n["kind"] == "feature":
            by_prompt[n["prompt_id"]].add(n["feature_id"])
    fid = max({f for fs in by_prompt.values() for f in fs}, key=lambda f: (sum(f in fs for fs in by_prompt.values()), f))
    shared = defaultdict(set)
    for n in kept.values():
        if n["kind"] == "feature" and n["feature_id"] != fid and fid in by_prompt[n["prompt_id"]]:
            shared[n["feature_id"]].add(n["prompt_id"])
            influence[n["feature_id"]] += n["influence"]
    got = cooccurring(lookups, fid, k=1000)
    assert {(r.feature, r.prompts) for r in got} == {(f, len(p)) for f, p in shared.items()}
    for r in got:
        assert r.influence == pytest.approx(influence[r.feature], rel=1e-5)

    def name(n):
        return (n["kind"], n["feature_id"] if n["kind"] == "feature" else n["token"])

    edges = [(kept[e["src"]], kept[e["dst"]], e["weight"]) for e in ref["attr"]]
    edges = [(a, b, w) for a, b, w in edges if a["kind"] != "error" and b["kind"] != "error"]
    one = defaultdict(lambda: [set(), 0.0])
    for a, b, w in edges:
        one[name(a), name(b)][0].add(a["prompt_id"])
        one[name(a), name(b)][1] += w
    got = recurring_paths(lookups, hops=1, k=100_000)
    assert {(tuple(zip(r.kinds, r.nodes)), r.prompts) for r in got} == {(k, len(v[0])) for k, v in one.items()}
    assert got[0].prompts == max(len(v[0]) for v in one.values())
    out = defaultdict(list)
    for a, b, w in edges:
        out[a["id"]].append((b, w))
    two = defaultdict(lambda: [set(), 0.0])
    for a, b, w1 in edges:
        if b["kind"] == "feature":
            for c, w2 in out[b["id"]]:
                two[name(a), name(b), name(c)][0].add(a["prompt_id"])
                two[name(a), name(b), name(c)][1] += w1 * w2
    got = recurring_paths(lookups, hops=2, k=100_000)
    assert {(tuple(zip(r.kinds, r.nodes)), r.prompts) for r in got} == {(k, len(v[0])) for k, v in two.items()}
    for r in got[:50]:
        assert r.weight == pytest.approx(two[tuple(zip(r.kinds, r.nodes))][1], rel=1e-4, abs=1e-7)


def _all_paths(graph: PromptGraph, sources: set[str], sinks: set[str]) -> list[tuple[list[str], float]]:
    """Every source -> sink path of the pruned graph, enumerated, with its product of per-unit factors."""
    out = defaultdict(list)
    for dst, ins in graph.edges.items():
        for src, w in ins:
            out[src].append((dst, graph.factor(src, w)))
    found = []

    def walk(path, strength):
        if path[-1] in sinks and len(path) > 1:
            found.append((path, strength))
        for dst, f in out[path[-1]]:
            walk(path + [dst], strength * f)

    for s in sources:
        walk([s], 1.0)
    return sorted(found, key=lambda p: (-abs(p[1]), p[0]))


def test_prompt_paths_equal_enumeration(store, ref):
    lookups = Lookups(store)
    pid = ref["prompts"][0]["id"]
    graph = lookups.prompt_graph(pid)
    logit = max(graph.of_kind("logit"), key=lambda n: n.probability)
    expected = _all_paths(graph, {n.id for n in graph.of_kind("token")}, {logit.id})
    assert len(expected) > 10
    _, got = lookups.prompt_paths(pid, logit.token, k=10, rank="attribution")
    assert [p.nodes for p in got] == [p for p, _ in expected[:10]]
    assert [p.strength for p in got] == pytest.approx([s for _, s in expected[:10]], rel=1e-5)
    _, at_pos = lookups.prompt_paths(pid, logit.token, from_token=1, k=5)
    assert all(graph.nodes[p.nodes[0]].pos == 1 for p in at_pos)
    with pytest.raises(UnknownPrompt, match="not a logit target"):
        lookups.prompt_paths(pid, "zebra")
    with pytest.raises(UnknownPrompt, match="unknown prompt"):
        lookups.prompt_graph("0123456789abcdef")


# ---------------------------------------------------------------- loading


def _counts(store) -> tuple:
    n = store.run("MATCH (f:Feature) RETURN count(f) AS n")[0]["n"]
    t = store.run("MATCH (t:Token) RETURN count(t) AS n")[0]["n"]
    e = [store.run(f"MATCH ()-[e:{rel}]->() RETURN count(e) AS n")[0]["n"] for rel in ("PULLBACK", "DEEMBED", "LOGIT", "OV", "OV_TOKEN")]
    return (n, t, *e)


def _expected_counts(ref) -> tuple:
    return tuple(len(ref[k]) for k in ("features", "tokens", "pullbacks", "deembed", "logits", "ov", "ov_tokens"))


def test_load_is_complete_and_idempotent(store, catalog_dir, ref):
    expected = _expected_counts(ref)
    assert _counts(store) == expected
    assert store.load(catalog_dir, progress=False) is False  # already current
    assert _counts(store) == expected


def test_embedded_partial_load_is_redone(catalog_dir, tmp_path):
    s = LadybugStore(tmp_path / "graph")
    (tmp_path / ".graph.loading-12345").write_bytes(b"half a database")  # debris of a killed load
    assert s.load(catalog_dir, progress=False)
    s.marker.unlink()  # a load that died after the rename but before its marker
    assert not s.is_current(catalog_dir)
    assert s.load(catalog_dir, progress=False)
    assert _counts(s)[0] == 600
    s.close()


def test_embedded_query_beyond_the_buffer_pool_is_one_error(catalog_dir, tmp_path):
    """A query whose aggregation outgrows the store's buffer pool fails with one error line, the store still answering
    (with LadybugDB's default pool, 80% of memory, such a query grew past the machine's memory and was killed)."""
    s = LadybugStore(tmp_path / "graph", buffer_pool=64 * 2**20)
    try:
        assert s.load(catalog_dir, progress=False) is True
        with pytest.raises(CypherError, match="buffer pool is full") as err:
            s.cypher("MATCH (a:PNode), (b:PNode), (c:PNode) RETURN count(DISTINCT a.id + b.id + c.id) AS n")
        assert "\n" not in str(err.value)
        assert s.cypher("MATCH (f:Feature) RETURN count(f) AS n") == [{"n": 600}]
    finally:
        s.close()


def unfinished_copy(catalog_dir: Path, tmp_path: Path) -> Path:
    """A copy of the catalog (without its store) whose manifest says the ingest has not finished."""
    import shutil

    from circuit_catalog.catalog.manifest import Manifest

    partial = tmp_path / "partial"
    shutil.copytree(catalog_dir, partial, ignore=shutil.ignore_patterns("graph*"))
    manifest = Manifest.read(partial)
    manifest.status = "in-progress"
    manifest.write(partial)
    return partial


def test_unfinished_catalog_is_not_loaded(catalog_dir, tmp_path):
    from circuit_catalog.errors import CatalogDirError

    partial = unfinished_copy(catalog_dir, tmp_path)
    with pytest.raises(CatalogDirError, match="has not finished"):
        LadybugStore(tmp_path / "graph").load(partial, progress=False)


def test_bolt_interrupted_load_resumes_without_duplicates(bolt_server, catalog_dir, ref):
    s = _bolt_store(bolt_server)
    s.load(catalog_dir, progress=False, batch_rows=1000)  # batches of a thousand rows
    # forget that the last parts finished, as if the load had died inside them; the rerun merges them again
    s.execute("MATCH (c:CatalogState {id: 'catalog'}) SET c.parts = c.parts[0..3]", None, write=True)
    assert s.load(catalog_dir, progress=False, batch_rows=2000)
    assert _counts(s) == _expected_counts(ref)  # parallel OV edges (one per head) told apart on MERGE
    s.close()


# ---------------------------------------------------------------- Cypher and safety


def test_cypher_is_read_only_unless_asked(store):
    rows = store.cypher("MATCH (f:Feature {id: $id}) RETURN f.layer AS layer", {"id": "L2/3"})
    assert rows == [{"layer": 2}]
    with pytest.raises(CypherError, match="DETACH is not a read clause"):
        store.cypher("MATCH (f:Feature) DETACH DELETE f")
    with pytest.raises(CypherError, match="CREATE"):
        store.cypher("create (:Feature {id: 'x'})")


def test_syntax_error_is_one_clean_line(store):
    with pytest.raises(CypherError) as info:
        store.cypher("MATCH (f:Feature RETURN f")
    assert "\n" not in str(info.value) and str(info.value)


@pytest.mark.parametrize("hostile", ["x' }) MATCH (n) DETACH DELETE n //", "`Feature`", '") RETURN 1 //', "L1/1' OR '1'='1"])
def test_hostile_text_is_data(store, ref, hostile):
    lookups = Lookups(store)
    before = _counts(store)
    assert lookups.search(hostile) == []
    assert lookups.paths(hostile, hostile) == []
    with pytest.raises(UnknownFeature):
        lookups.upstream(hostile)
    assert store.cypher("MATCH (t:Token) WHERE t.text = $t RETURN count(t) AS n", {"t": hostile}) == [{"n": 0}]
    assert _counts(store) == before


def test_bolt_auth_failure(bolt_server):
    from circuit_catalog.catalog.neo4j_store import Neo4jStore

    uri, _ = bolt_server
    with pytest.raises(StoreError, match="authentication failed") as info:
        Neo4jStore(uri, auth=("root", "wrong-password"))
    assert "wrong-password" not in str(info.value)


def test_unreachable_server():
    from circuit_catalog.catalog.neo4j_store import Neo4jStore

    with pytest.raises(StoreError, match="cannot reach"):
        Neo4jStore(f"bolt://127.0.0.1:{_free_port()}", auth=("neo4j", "x"))


def test_named_queries_exist_for_both_dialects():
    for name in query_names():
        for dialect in ("ladybug", "neo4j"):
            assert "$" in named_query(name, dialect), f"{name} must be parameterised"


def test_damaged_part_is_one_error_and_the_old_store_stays(catalog_dir, tmp_path):
    import shutil

    copy = tmp_path / "catalog"
    shutil.copytree(catalog_dir, copy, ignore=shutil.ignore_patterns("graph*"))
    s = LadybugStore(copy / "graph")
    assert s.load(copy, progress=False)
    before = _counts(s)
    s.close()
    nodes = next(copy.glob(layout.prompt_part_glob("nodes")))
    nodes.write_bytes(nodes.read_bytes()[: nodes.stat().st_size // 2])  # truncated
    s.marker.unlink()  # the catalog changed behind the store's back: the next load rebuilds
    with pytest.raises(CatalogDirError, match="damaged Parquet part") as info:
        s.load(copy, progress=False)
    assert "\n" not in str(info.value) and str(nodes) in str(info.value)
    assert not list(copy.glob(".graph.loading-*"))  # the half-built database is gone
    assert _counts(s) == before  # and the store that was there still answers
    s.close()


# ---------------------------------------------------------------- the Neo4j backend over a real Bolt server


def test_feature_uses(store, ref):
    """The k most influential occurrences of a feature in prompt graphs, each with its strongest inputs, cut in Cypher."""
    uses: dict[str, list] = defaultdict(list)
    for n in ref["pnodes"]:
        if n["kept"] and n["kind"] == "feature":
            uses[n["feature_id"]].append(n)
    fid = max(uses, key=lambda f: (len(uses[f]), f))
    inputs = defaultdict(list)
    for e in ref["attr"]:
        inputs[e["dst"]].append(e)
    nodes = {n["id"]: n for n in ref["pnodes"]}
    occurrences = sorted((n for n in uses[fid] if inputs[n["id"]]), key=lambda n: (-n["influence"], n["prompt_id"], n["pos"]))[:2]
    got = Lookups(store).feature_uses(fid, k=2, n_inputs=3, token_text=False)
    assert [(u.prompt, u.pos) for u in got] == [(n["prompt_id"], n["pos"]) for n in occurrences]
    for use, n in zip(got, occurrences):
        strongest = sorted(inputs[n["id"]], key=lambda e: (-abs(e["weight"]), e["src"]))[:3]
        assert [name for name, _ in use.inputs] == [split_node_id(e["src"])[1] for e in strongest]
        assert [w for _, w in use.inputs] == pytest.approx([e["weight"] for e in strongest], rel=1e-6)
        assert all(nodes[e["src"]]["prompt_id"] == n["prompt_id"] for e in strongest)


@pytest.mark.parametrize("store", ["bolt"], indirect=True)
def test_bolt_lookups_seek_their_index(store):
    """ArcadeDB's EXPLAIN names the index each lookup seeks: the prompt's nodes by prompt_id, tokens by text."""
    params = {"id": "p", "key": "p", "texts": [" Paris"], "variant": "extended", "k": 5, "n_inputs": 5}
    expected = {"prompt_nodes": "pnode_prompt_id", "prompt_edges": "pnode_prompt_id", "search_logit": "token_text",
                "search_deembed": "token_text", "path_starts": "token_text", "path_ends": "token_text",
                "feature": "Feature[id]", "upstream": "Feature[id]", "feature_inputs": "Feature[id]"}
    for name, index in expected.items():
        plan = store.driver.execute_query("EXPLAIN " + named_query(name, "neo4j"), params, database_=store.database).summary.plan
        text = plan["args"]["string-representation"]
        assert f"index={index}" in text, (name, text)


@pytest.mark.parametrize("store", ["bolt"], indirect=True)
def test_bolt_user_cypher_is_held_to_read_only(store):
    before = _counts(store)
    for admin in ("RENAME USER a TO b", "STOP DATABASE neo4j", "START DATABASE neo4j", "TERMINATE TRANSACTIONS 'x'",
                  "GRANT ROLE admin TO bob", "// comment\n  deny read {*} on graph * to bob", "USE system REVOKE ROLE a FROM b"):
        with pytest.raises(CypherError, match="administration command"):
            store.cypher(admin)
    # past the clause check (as a procedure that writes would be): the server reports a write, the transaction is rolled back
    with pytest.raises(CypherError, match="rolled back: the server ran this as a write-only query"):
        store.execute("CREATE (:Feature {id: 'L9/9'})", None, write=False)
    assert _counts(store) == before and store.cypher("MATCH (f:Feature {id: 'L9/9'}) RETURN count(f) AS n") == [{"n": 0}]
    assert store.cypher("MATCH (t:Token) WHERE t.text = $t RETURN t.id AS id", {"t": "the"}) != []


def test_bolt_missing_index_is_created_and_awaited_on_a_loaded_store(bolt_server, catalog_dir):
    """A store loaded before an index existed gains it at the next `load`, which waits for it to come online."""
    s = _bolt_store(bolt_server)
    assert s.load(catalog_dir, progress=False)
    s.execute("DROP INDEX pnode_prompt_id", None, write=True)
    assert "pnode_prompt_id" not in {r["name"] for r in s.run("SHOW INDEXES YIELD name RETURN name")}
    assert s.load(catalog_dir, progress=False) is False  # already current, yet the schema is brought up to date
    assert "pnode_prompt_id" in {r["name"] for r in s.run("SHOW INDEXES YIELD name, state WHERE state = 'ONLINE' RETURN name")}
    s.close()


def test_bolt_load_from_the_cli_with_two_writers(bolt_server, catalog_dir, ref, monkeypatch, tmp_path):
    """`load --writers 2`: two sessions on parts that share no node; the graph is whole and has no duplicates."""
    from click.testing import CliRunner

    from circuit_catalog.cli import main

    uri, new_database = bolt_server
    database = new_database()
    monkeypatch.setenv("NEO4J_USER", "root")
    monkeypatch.setenv("NEO4J_PASSWORD", PASSWORD)
    result = CliRunner().invoke(main, ["load", "--catalog", str(catalog_dir), "--store", uri, "--database", database, "--writers", "2"])
    assert result.exit_code == 0, result.output
    s = _bolt_store((uri, lambda: database))
    assert _counts(s) == _expected_counts(ref)
    assert s.run("MATCH ()-[e:ATTR]->() RETURN count(e) AS n")[0]["n"] == len(ref["attr"])
    s.close()
    result = CliRunner().invoke(main, ["load", "--catalog", str(catalog_dir), "--store", "embedded", "--writers", "2"])
    assert result.exit_code == 1 and "applies to Neo4j stores" in result.output


def test_parts_sharing_a_node_never_load_at_once():
    """The writers' scheduler: every part runs once, two parts with a common node never together, a failure stops it."""
    from circuit_catalog.catalog.neo4j_store import _run_disjoint

    footprints = {"a": frozenset({1, 2}), "b": frozenset({2, 3}), "c": frozenset({4}), "d": frozenset(), "e": frozenset({3}),
                  "f": frozenset({1, 4})}
    active, done, overlaps = set(), [], []
    lock = threading.Lock()

    def work(name, path, stop):
        with lock:
            overlaps.extend((name, other) for other in active if footprints[name] & footprints[other])
            active.add(name)
        time.sleep(0.02)  # time for the other writers to start something alongside
        with lock:
            active.discard(name)
            done.append(name)

    _run_disjoint([(n, Path(n), fp) for n, fp in footprints.items()], work, writers=4)
    assert sorted(done) == sorted(footprints) and overlaps == []

    def fail_on_b(name, path, stop):
        if name == "b":
            raise StoreError("b broke")
        work(name, path, stop)

    done.clear()
    with pytest.raises(StoreError, match="b broke"):
        _run_disjoint([(n, Path(n), fp) for n, fp in footprints.items()], fail_on_b, writers=1)
    assert done == ["a"]  # one writer: a ran, b failed, nothing after it started


def test_bolt_lost_connection_is_one_error_and_the_next_load_resumes(catalog_dir, ref, tmp_path):
    """The server dies mid-load: one line naming the part; after a restart the next `load` finishes it, no duplicates."""
    from circuit_catalog.catalog.neo4j_store import STATE_READ, Neo4jStore

    bolt, http = _free_port(), _free_port()
    proc = _start_arcadedb(tmp_path, bolt, http)
    uri, database = f"bolt://127.0.0.1:{bolt}", _create_database(http)
    store, watcher = (Neo4jStore(uri, database=database, auth=("root", PASSWORD)) for _ in range(2))

    def kill_once_a_part_is_done() -> None:
        while not (state := watcher.run(STATE_READ, {"id": "catalog"})) or not state[0]["parts"]:
            time.sleep(0.05)
        proc.kill()

    killer = threading.Thread(target=kill_once_a_part_is_done, daemon=True)
    killer.start()
    try:
        with pytest.raises(StoreError) as info:
            store.load(catalog_dir, progress=False, batch_rows=200, writers=2)
        message = str(info.value)
        assert "\n" not in message and "lost the connection while loading" in message and "rerun `load` to resume" in message
        assert message.split("while loading ")[1].split(":")[0].endswith(".parquet")
        killer.join(timeout=60)
        proc.wait(timeout=60)
        store.close()
        watcher.close()
        proc = _start_arcadedb(tmp_path, bolt, http)
        store = Neo4jStore(uri, database=database, auth=("root", PASSWORD))
        state = store.run(STATE_READ, {"id": "catalog"})[0]
        assert state["parts"] and set(state["started"]) - set(state["parts"])  # some finished, some cut short
        assert store.load(catalog_dir, progress=False) is True
        assert _counts(store) == _expected_counts(ref)
        assert store.run("MATCH (n:PNode) RETURN count(n) AS n")[0]["n"] == len(ref["pnodes"])
        assert store.run("MATCH ()-[e:ATTR]->() RETURN count(e) AS n")[0]["n"] == len(ref["attr"])
        store.close()
    finally:
        if proc.poll() is None:
            _stop_arcadedb(proc)


# ---------------------------------------------------------------- the neo4j-admin import route

# The options of `neo4j-admin database import full` in Neo4j 5 (operations manual, "Import", options table:
# https://neo4j.com/docs/operations-manual/5/tools/neo4j-admin/neo4j-admin-import/), and the token shape
# they take: `neo4j-admin database import full <database> [options]`, the database first since 5.19.
IMPORT_FULL_OPTIONS = {
    "--additional-config", "--array-delimiter", "--auto-skip-subsequent-headers", "--bad-tolerance", "--delimiter",
    "--expand-commands", "--format", "--high-parallel-io", "--id-type", "--ignore-empty-strings", "--ignore-extra-columns",
    "--input-encoding", "--input-type", "--legacy-style-quoting", "--max-off-heap-memory", "--multiline-fields",
    "--multiline-fields-format", "--nodes", "--normalize-types", "--overwrite-destination", "--quote", "--read-buffer-size",
    "--relationships", "--report-file", "--schema", "--skip-bad-entries-logging", "--skip-bad-relationships",
    "--skip-duplicate-nodes", "--strict", "--threads", "--trim-strings", "--verbose",
}
JAVA_FLOAT = re.compile(r"[+-]?(NaN|Infinity|(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?)")  # what Double.parseDouble reads


def read_import_csv(text: str) -> list[list[tuple[str, bool]]]:
    """A strict reader with the importer's rules (manual, "CSV header format" and --quote): `,` between fields,
    `"` around text with `""` for a quote inside, no backslash escapes, newlines allowed inside quotes.
    Each field comes back with whether it was quoted (an unquoted empty field is null, a quoted one "")."""
    rows, row, i = [], [], 0
    while i < len(text):
        if text[i] == '"':
            parts, j = [], i + 1
            while True:
                k = text.index('"', j)  # ValueError: unterminated quote
                parts.append(text[j:k])
                if text[k + 1:k + 2] == '"':
                    parts.append('"')
                    j = k + 2
                    continue
                i = k + 1
                break
            row.append(("".join(parts), True))
        else:
            k = i
            while k < len(text) and text[k] not in ",\n":
                assert text[k] != '"', f"a quote inside an unquoted field at {k}"
                k += 1
            row.append((text[i:k], False))
            i = k
        assert i < len(text), "the last line has no newline"
        if text[i] == "\n":
            rows.append(row)
            row = []
        else:
            assert text[i] == ",", f"{text[i]!r} after a closing quote at {i}"
        i += 1
    return rows


def typed(field: tuple[str, bool], kind: str):
    """A field as the importer types it by its header type; asserts the text is what that type accepts."""
    value, quoted = field
    if kind == "ref":
        return int(value) if not quoted and re.fullmatch(r"-?\d+", value) else value
    if kind.startswith("string"):
        assert quoted or value == "", f"unquoted text {value!r}"  # quoted: leading spaces survive
        if not quoted:
            return None
        return value.split("\x1f") if kind == "string[]" else value
    assert not quoted, f"quoted {kind} {value!r}"
    if value == "":
        return None
    if kind == "long":
        assert re.fullmatch(r"-?\d+", value), value
        return int(value)
    if kind in ("float", "double"):
        assert JAVA_FLOAT.fullmatch(value), f"Java cannot parse {value!r}"
        return float(value.replace("Infinity", "inf"))
    assert kind == "boolean" and value in ("true", "false"), value
    return value == "true"


def _header_types(header: str) -> list[tuple[str, str]]:
    """(name or role, type) per header field: `id:ID(Token){id-type:long}` -> ('id', 'long')."""
    out = []
    for field in header.strip().split(","):
        name, kind = field.split(":", 1)
        if kind.startswith("ID"):
            out.append((name, "long" if "{id-type:long}" in kind else "string"))
        elif kind.startswith(("START_ID", "END_ID")):  # typed by the group they refer to
            out.append((kind.split("(")[0], "ref"))
        else:
            out.append((name, kind))
    return out


@pytest.fixture(scope="module")
def awkward_catalog(catalog_dir, tmp_path_factory):
    """The test catalog with what breaks naive CSV: NaN and infinities, texts with leading spaces, newlines, quotes."""
    import shutil

    import numpy as np
    import pyarrow as pa

    root = tmp_path_factory.mktemp("awkward")
    shutil.copytree(catalog_dir, root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("graph*"))
    features = pq.read_table(root / layout.FEATURES)
    max_act = features["max_act"].to_numpy(zero_copy_only=False).astype(np.float32)
    max_act[:3] = [np.nan, np.inf, -np.inf]
    pq.write_table(features.set_column(features.schema.get_field_index("max_act"), "max_act", pa.array(max_act)), root / layout.FEATURES)
    tokens = pq.read_table(root / layout.TOKENS)
    texts = tokens["text"].to_pylist()
    texts[5:8] = [" Paris", "\n", "  "]
    pq.write_table(tokens.set_column(1, "text", pa.array(texts)), root / layout.TOKENS)
    prompts = pq.read_table(root / layout.PROMPT_INDEX)
    texts = prompts["text"].to_pylist()
    texts[0] = 'she said "hi",\nthen left \\ '
    pq.write_table(prompts.set_column(prompts.schema.get_field_index("text"), "text", pa.array(texts)), root / layout.PROMPT_INDEX)
    return root


def test_admin_import_files_parse_by_the_importers_rules(awkward_catalog, tmp_path):
    from circuit_catalog.catalog.graph_schema import NODES, RELS, catalog_signature
    from circuit_catalog.catalog.layout import part_files
    from circuit_catalog.catalog.neo4j_import import schema_script, write_admin_import

    out = tmp_path / "it's out"  # a quote in the path: never pasted into SQL unescaped
    result = write_admin_import(awkward_catalog, out, progress=lambda _: None)
    args = result.import_args
    # the manual's order: neo4j-admin database import full <database>, then options only
    assert args[:5] == ["neo4j-admin", "database", "import", "full", "neo4j"]
    assert all(a.startswith("--") and a.split("=", 1)[0] in IMPORT_FULL_OPTIONS for a in args[5:])
    for needed in ("--multiline-fields=true", "--trim-strings=false", "--overwrite-destination=true", "--array-delimiter=U+001F"):
        assert needed in args
    ids: dict[str, set] = {}
    for arg in args[5:]:
        if not arg.startswith(("--nodes=", "--relationships=")):
            continue
        group, files = arg.split("=", 1)[1].split("=", 1)
        header_path, data_path = files.split(",")
        assert header_path.startswith("/import/") and data_path.startswith("/import/")  # the container's path
        header = _header_types((out / Path(header_path).name).read_text())
        rows = read_import_csv((out / Path(data_path).name).read_text(encoding="utf-8"))
        assert all(len(r) == len(header) for r in rows)
        values = [[typed(f, kind) for f, (_, kind) in zip(r, header)] for r in rows]
        if arg.startswith("--nodes="):
            n = next(n for n in NODES if n.label == group)
            ref_rows = [r for f in part_files(awkward_catalog, n.files) for r in pq.read_table(f).to_pylist()]
            assert len(values) == len(ref_rows)
            ids[n.label] = {v[0] for v in values}
            by_key = {v[0]: dict(zip([c for c, _ in n.columns], v)) for v in values}
            for r in ref_rows:
                got = by_key[r[n.key]]
                for c, t in n.columns:
                    want = r[c]
                    if t == "FLOAT" and want is not None:
                        assert np.float32(got[c]) == np.float32(want) or (np.isnan(want) and np.isnan(got[c])), (c, got[c], want)
                    elif t == "STRING[]" and want == []:
                        assert got[c] is None  # CSV cannot tell an empty array from none (manual, property data types)
                    elif t == "DOUBLE" and want is not None:
                        assert got[c] == pytest.approx(want, nan_ok=True), (c, got[c], want)
                    else:
                        assert got[c] == want, (c, got[c], want)
        else:
            name = Path(header_path).name.removesuffix(".header.csv")
            r = next(r for r in RELS if r.type == group and name in (r.type, f"{r.type}-{r.target}"))
            assert len(values) == sum(pq.ParquetFile(f).metadata.num_rows for f in part_files(awkward_catalog, r.files))
            assert {v[0] for v in values} <= ids[r.source] and {v[1] for v in values} <= ids[r.target]  # endpoints exist
    assert all(isinstance(t, int) for t in ids["Token"])  # Token ids stay integers: a later `load` finds the same nodes
    token_rows = read_import_csv((out / "Token.csv").read_text(encoding="utf-8"))
    assert [(int(i), text) for (i, _), (text, quoted) in token_rows[5:8] if quoted] == [(5, " Paris"), (6, "\n"), (7, "  ")]
    prompts = [typed(r[1], "string") for r in read_import_csv((out / "Prompt.csv").read_text(encoding="utf-8"))]
    assert 'she said "hi",\nthen left \\ ' in prompts
    features = read_import_csv((out / "Feature.csv").read_text(encoding="utf-8"))
    max_act = [name for name, _ in node_set("Feature").columns].index("max_act")
    assert {f[max_act][0] for f in features} >= {"NaN", "Infinity", "-Infinity"}
    parts = sorted(str(f.relative_to(awkward_catalog)) for s in (*NODES, *RELS) for f in part_files(awkward_catalog, s.files))
    script = (out / "schema.cypher").read_text()
    assert sorted(_state_parts(script)) == parts  # `load` finds the imported store current
    assert script == schema_script(catalog_signature(awkward_catalog), _state_parts(script))
    assert result.schema_args == ["cypher-shell", "-d", "neo4j", "-f", "/import/schema.cypher"]
    assert not list(out.glob(".*tmp*"))  # nothing half-written left behind


def _state_parts(script: str) -> list[str]:
    line = next(s for s in script.splitlines() if s.startswith("MERGE (s:CatalogState"))
    return re.findall(r"'([^']*)'", line.split("s.parts = [")[1].split("]")[0])


def test_admin_import_refuses_an_unfinished_catalog(catalog_dir, tmp_path):
    from circuit_catalog.catalog.neo4j_import import write_admin_import

    from circuit_catalog.errors import CatalogDirError

    partial = unfinished_copy(catalog_dir, tmp_path)
    with pytest.raises(CatalogDirError, match="has not finished"):
        write_admin_import(partial, tmp_path / "out", progress=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_export_neo4j_import_cli(catalog_dir, tmp_path):
    """The command prints the import command (database right after `full`) and the schema command; a directory that
    is no catalog is one error line, and nothing is written."""
    import shlex

    from click.testing import CliRunner

    from circuit_catalog.cli import main

    result = CliRunner().invoke(main, ["export-neo4j-import", "--catalog", str(catalog_dir), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.stdout.splitlines()]
    command = shlex.split(next(line for line in lines if line.startswith("neo4j-admin")))
    assert command[:5] == ["neo4j-admin", "database", "import", "full", "neo4j"] and "--nodes=Feature=/import/Feature.header.csv,/import/Feature.csv" in command
    assert "cypher-shell -d neo4j -f /import/schema.cypher" in lines
    result = CliRunner().invoke(main, ["export-neo4j-import", "--catalog", str(tmp_path / "nothing"), "--out", str(tmp_path / "out2")])
    assert result.exit_code == 1 and "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out2").exists()


def test_interventions_round_trip(store, catalog_dir):
    """`interventions FEATURE` equals the rows of interventions.parquet that edit it, with every logit change."""
    rows = pq.read_table(catalog_dir / layout.INTERVENTIONS).to_pylist()
    assert len(rows) == 3
    lookups = Lookups(store)  # not `with`: that would close the session's store
    found = lookups.interventions("L1/5")
    newest_first = sorted(sorted(rows, key=lambda r: r["id"]), key=lambda r: r["created"], reverse=True)
    assert [u.id for u in found] == [r["id"] for r in newest_first if "L1/5" in r["features"]]
    for use in found:
        row = next(r for r in rows if r["id"] == use.id)
        assert (use.prompt_id, use.regime, use.spec, use.kl) == (row["prompt_id"], row["regime"], row["spec"], pytest.approx(row["kl"]))
        assert use.edits == row["feature_edits"][row["features"].index("L1/5")]
        expected = sorted(zip(row["target_tokens"], row["logit_change"]))
        assert [t for t, _ in sorted(use.changes)] == [t for t, _ in expected]
        assert [c for _, c in sorted(use.changes)] == pytest.approx([c for _, c in expected])
    assert [u.prompt_id for u in lookups.interventions("L2/7")].count(None) == 1
    assert lookups.interventions("L0/0") == []
    with pytest.raises(UnknownFeature):
        lookups.interventions("L9/0")
    on = store.run("MATCH (i:Intervention)-[:`ON`]->(p:Prompt) RETURN i.id AS i, p.id AS p")  # ON is a keyword in LadybugDB
    assert sorted((r["i"], r["p"]) for r in on) == sorted((r["id"], r["prompt_id"]) for r in rows if r["prompt_id"])
