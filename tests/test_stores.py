"""Both graph stores pass one suite: Parquet -> store -> every named query equals a direct pyarrow
computation over the same Parquet. LadybugDB always; the Neo4j backend over a real Bolt server
(ArcadeDB, started on 127.0.0.1 by the session fixture)."""

from __future__ import annotations

import base64
import itertools
import json
import socket
import subprocess
import sys
import urllib.request
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from catalog import layout
from catalog.errors import UnknownFeature
from catalog.ladybug_store import LadybugStore
from catalog.store import CypherError, StoreError, write_clause
from ingest.job import IngestSettings, build_manifest, run_ingest
from ingest.prompts import AttributionSettings, PromptSpec, run_prompts
from queries.api import Lookups, UnknownPrompt, named_query, query_names, token_texts
from queries.prompt_graph import PromptGraph
from tests.conftest import random_transcoders

PASSWORD = "test-root-password"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def catalog_dir(tmp_path_factory, gpt2) -> Path:
    """A real catalog of a tiny GPT-2: 3 layers x 200 features, ~4,800 pullback edges, three prompts' graphs."""
    root = tmp_path_factory.mktemp("catalog")
    tset = random_transcoders(gpt2, d_sae=200, seed=7)
    settings = IngestSettings(top_k=4, token_top_k=5)
    run_ingest(gpt2, tset, root, build_manifest(gpt2, "tiny", tset, "mem", settings), progress=False)
    ids = run_prompts(gpt2, tset, root, PROMPTS, AttributionSettings(max_feature_nodes=250, node_threshold=0.6), progress=False)
    record_interventions(gpt2, tset, root, ids[0])
    return root


def record_interventions(model, tset, root: Path, pid: str) -> None:
    """Two interventions on a catalog prompt (one touching two features) and one on a prompt outside it."""
    from catalog.manifest import Manifest
    from ingest.attribution import prompt_tokens
    from ingest.intervention_log import add_intervention, intervention_row
    from ingest.interventions import Regime, intervene, parse_edit

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


@pytest.fixture(scope="session")
def bolt_server(tmp_path_factory):
    """ArcadeDB with its Bolt plugin on 127.0.0.1, in a child process: a real server speaking Neo4j's protocol."""
    pytest.importorskip("arcadedb_embedded", reason="arcadedb-embedded is installed by the set-up")
    root = tmp_path_factory.mktemp("arcadedb")
    bolt, http = _free_port(), _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "tools" / "arcadedb_server.py"), str(root), PASSWORD, str(bolt), str(http)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
    )
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        pytest.fail(f"ArcadeDB did not start; see {root / 'server.log'}")
    names = itertools.count()
    auth = base64.b64encode(f"root:{PASSWORD}".encode()).decode()

    def new_database() -> str:
        name = f"catalog{next(names)}"
        request = urllib.request.Request(
            f"http://127.0.0.1:{http}/api/v1/server", method="POST",
            data=json.dumps({"command": f"create database {name}"}).encode(),
            headers={"Authorization": f"Basic {auth}", "Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=30).read()
        return name

    yield f"bolt://127.0.0.1:{bolt}", new_database
    proc.stdin.close()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _bolt_store(bolt_server):
    from catalog.neo4j_store import Neo4jStore

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
        "pullbacks": rows("pullbacks/*.parquet"),
        "deembed": rows("deembed/*.parquet"),
        "logits": rows("logits/*.parquet"),
        "features": {r["id"]: r for r in pq.read_table(catalog_dir / layout.FEATURES).to_pylist()},
        "pnodes": rows("prompts/*/nodes.parquet"),
        "attr": rows("prompts/*/edges.parquet"),
        "prompts": pq.read_table(catalog_dir / layout.PROMPT_INDEX).to_pylist(),
    }


def layer_of(fid: str) -> int:
    return int(fid[1:].split("/")[0])


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("fid", ["L2/0", "L2/77", "L1/199"])
@pytest.mark.parametrize("layer, sign", [(None, None), (0, None), (None, -1)])
def test_upstream_and_downstream(store, ref, fid, layer, sign):
    lookups = Lookups(store)
    for direction, this, other in (("upstream", "dst", "src"), ("downstream", "src", "dst")):
        expected = [
            (r[other], r["weight"]) for r in ref["pullbacks"]
            if r[this] == fid and (layer is None or layer_of(r[other]) == layer) and (sign is None or r["weight"] * sign > 0)
        ]
        expected = sorted(expected, key=lambda e: (-abs(e[1]), e[0]))[:7]
        got = getattr(lookups, direction)(fid, k=7, layer=layer, sign=sign)
        assert [e.feature for e in got] == [e[0] for e in expected], direction
        assert [e.weight for e in got] == pytest.approx([e[1] for e in expected], rel=1e-6)
        for e in got:  # orientation tokens: the other feature's top extended de-embedding tokens
            assert e.tokens == ref["features"][e.feature]["deembed_ext_tokens"][:5]


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
            assert (node.kind, node.layer, node.pos, node.feature, node.token_id, node.token) == tuple(
                kept[nid][c] for c in ("kind", "layer", "pos", "feature", "token_id", "token"))
            assert node.influence == pytest.approx(kept[nid]["influence"], rel=1e-6)
        expected = {(e["src"], e["dst"]): e["weight"] for e in ref["attr"] if e["dst"] in kept}
        got = {(src, dst): w for dst, ins in graph.edges.items() for src, w in ins}
        assert got.keys() == expected.keys() and len(got) > 10
        assert [got[key] for key in sorted(got)] == pytest.approx([expected[key] for key in sorted(got)], rel=1e-6)


def test_prompts_using_and_recurring(store, ref):
    lookups = Lookups(store)
    uses: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for n in ref["pnodes"]:
        if n["kept"] and n["kind"] == "feature":
            uses[n["feature_id"]][n["prompt_id"]].append(n)
    shared = sorted(uses, key=lambda f: (-len(uses[f]), f))[:3]
    for fid in shared:
        got = lookups.prompts_using(fid, k=10)
        expected = sorted(((pid, sorted(n["pos"] for n in ns), sum(n["influence"] for n in ns)) for pid, ns in uses[fid].items()),
                          key=lambda t: (-t[2], t[0]))
        assert [(u.prompt, u.positions) for u in got] == [(p, pos) for p, pos, _ in expected]
        assert [u.influence for u in got] == pytest.approx([i for _, _, i in expected], rel=1e-5)
    got = lookups.recurring(k=8)
    counts = {f: (len(p), sum(n["influence"] for ns in p.values() for n in ns)) for f, p in uses.items()}
    expected = sorted(counts, key=lambda f: (-counts[f][0], -counts[f][1], f))[:8]
    assert [r.feature for r in got] == expected
    assert [r.prompts for r in got] == [counts[f][0] for f in expected]
    unused = next(f for f in ref["features"] if f not in uses)
    assert lookups.prompts_using(unused) == []


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
    got = lookups.prompt_paths(pid, logit.token, k=10)
    assert [p.nodes for p in got] == [p for p, _ in expected[:10]]
    assert [p.strength for p in got] == pytest.approx([s for _, s in expected[:10]], rel=1e-5)
    at_pos = lookups.prompt_paths(pid, logit.token, from_token=1, k=5)
    assert all(graph.nodes[p.nodes[0]].pos == 1 for p in at_pos)
    with pytest.raises(UnknownPrompt, match="not a logit target"):
        lookups.prompt_paths(pid, "zebra")
    with pytest.raises(UnknownPrompt, match="unknown prompt"):
        lookups.prompt_graph("0123456789abcdef")


# ---------------------------------------------------------------- loading


def _counts(store) -> tuple:
    n = store.run("MATCH (f:Feature) RETURN count(f) AS n")[0]["n"]
    t = store.run("MATCH (t:Token) RETURN count(t) AS n")[0]["n"]
    e = [store.run(f"MATCH ()-[e:{rel}]->() RETURN count(e) AS n")[0]["n"] for rel in ("PULLBACK", "DEEMBED", "LOGIT")]
    return (n, t, *e)


def test_load_is_complete_and_idempotent(store, catalog_dir, ref):
    expected = (len(ref["features"]), len(ref["tokens"]), len(ref["pullbacks"]), len(ref["deembed"]), len(ref["logits"]))
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


def test_unfinished_catalog_is_not_loaded(catalog_dir, tmp_path):
    import shutil

    from catalog.errors import CatalogDirError
    from catalog.manifest import Manifest

    partial = tmp_path / "partial"
    shutil.copytree(catalog_dir, partial, ignore=shutil.ignore_patterns("graph*"))
    manifest = Manifest.read(partial)
    manifest.status = "in-progress"
    manifest.write(partial)
    with pytest.raises(CatalogDirError, match="has not finished"):
        LadybugStore(tmp_path / "graph").load(partial, progress=False)


def test_bolt_interrupted_load_resumes_without_duplicates(bolt_server, catalog_dir, ref):
    s = _bolt_store(bolt_server)
    s.load(catalog_dir, progress=False, batch_rows=1000)  # batches of a thousand rows
    # forget that the last parts finished, as if the load had died inside them; the rerun merges them again
    s.execute("MATCH (c:CatalogState {id: 'catalog'}) SET c.parts = c.parts[0..3]", None, write=True)
    assert s.load(catalog_dir, progress=False, batch_rows=2000)
    assert _counts(s) == (len(ref["features"]), len(ref["tokens"]), len(ref["pullbacks"]), len(ref["deembed"]), len(ref["logits"]))
    s.close()


# ---------------------------------------------------------------- Cypher and safety


def test_cypher_is_read_only_unless_asked(store):
    rows = store.cypher("MATCH (f:Feature {id: $id}) RETURN f.layer AS layer", {"id": "L2/3"})
    assert rows == [{"layer": 2}]
    with pytest.raises(CypherError, match="DETACH changes the graph"):
        store.cypher("MATCH (f:Feature) DETACH DELETE f")
    with pytest.raises(CypherError, match="CREATE"):
        store.cypher("create (:Feature {id: 'x'})")


def test_write_clause_detection_ignores_literals():
    assert write_clause("MATCH (f) WHERE f.id = 'CREATE' RETURN f.`SET`") is None
    assert write_clause("MATCH (f) RETURN f // DELETE later") is None
    assert write_clause("MATCH (f) SET f.x = 1") == "SET"


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
    from catalog.neo4j_store import Neo4jStore

    uri, _ = bolt_server
    with pytest.raises(StoreError, match="authentication failed") as info:
        Neo4jStore(uri, auth=("root", "wrong-password"))
    assert "wrong-password" not in str(info.value)


def test_unreachable_server():
    from catalog.neo4j_store import Neo4jStore

    with pytest.raises(StoreError, match="cannot reach"):
        Neo4jStore(f"bolt://127.0.0.1:{_free_port()}", auth=("neo4j", "x"))


def test_named_queries_exist_for_both_dialects():
    for name in query_names():
        for dialect in ("ladybug", "neo4j"):
            assert "$" in named_query(name, dialect), f"{name} must be parameterised"


def test_admin_import_files(catalog_dir, ref, tmp_path):
    """The neo4j-admin route: headers name ids, types and label groups; every Parquet row becomes a CSV line."""
    import csv

    from catalog.neo4j_store import write_admin_import

    command = write_admin_import(catalog_dir, tmp_path, progress=lambda _: None)
    assert "--nodes=Feature=Feature.header.csv,Feature.csv" in command and "--array-delimiter=U+001F" in command
    assert (tmp_path / "Feature.header.csv").read_text().startswith("id:ID(Feature),layer:long,index:long")
    assert (tmp_path / "PULLBACK.header.csv").read_text().strip() == ":START_ID(Feature),:END_ID(Feature),weight:float"
    with open(tmp_path / "PULLBACK.csv", newline="") as f:
        lines = list(csv.reader(f))
    assert len(lines) == len(ref["pullbacks"])
    assert {(a, b) for a, b, _ in lines} == {(r["src"], r["dst"]) for r in ref["pullbacks"]}
    with open(tmp_path / "Feature.csv", newline="") as f:
        row = next(r for r in csv.reader(f) if r[0] == "L1/42")
    assert row[5].split("\x1f") == ref["features"]["L1/42"]["deembed_ext_tokens"]


def test_damaged_part_is_one_error_and_the_old_store_stays(catalog_dir, tmp_path):
    import shutil

    copy = tmp_path / "catalog"
    shutil.copytree(catalog_dir, copy, ignore=shutil.ignore_patterns("graph*"))
    s = LadybugStore(copy / "graph")
    assert s.load(copy, progress=False)
    before = _counts(s)
    s.close()
    nodes = next((copy / layout.PROMPTS).glob("*/nodes.parquet"))
    nodes.write_bytes(nodes.read_bytes()[: nodes.stat().st_size // 2])  # truncated
    s.marker.unlink()  # the catalog changed behind the store's back: the next load rebuilds
    with pytest.raises(StoreError, match="cannot load") as info:
        s.load(copy, progress=False)
    assert "\n" not in str(info.value)
    assert not list(copy.glob(".graph.loading-*"))  # the half-built database is gone
    assert _counts(s) == before  # and the store that was there still answers
    s.close()


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
