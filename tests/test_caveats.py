"""Artefact flags, measurement limits and node labels, on a catalog whose statistics the test controls: a transcoder
built so one feature is dense and one fires only on the first token after BOS, and a layer whose features never fire.
Expected flags come from a brute-force pass over the same tokens, not from the statistics files."""

from __future__ import annotations

import json
import re
import shutil
from html import escape
from dataclasses import asdict
from dataclasses import replace as dc_replace

import pytest
from circuit_catalog.errors import UnknownFeature
import torch
from circuit_catalog.catalog.ids import feature_id, parse_feature_id
from circuit_catalog.catalog.manifest import Manifest
from circuit_catalog.catalog.store import open_loaded_store
from circuit_catalog.ingest.datasets import token_contexts
from circuit_catalog.ingest.evaluate import evaluate_transcoders
from circuit_catalog.ingest.job import build_manifest, run_ingest, run_stats
from circuit_catalog.ingest.prompts import run_prompts
from circuit_catalog.ingest.settings import AttributionSettings, IngestSettings, PromptSpec
from circuit_catalog.ingest.stats import LIVE_FREQUENCY
from circuit_catalog.queries import caveats
from circuit_catalog.queries.caveats import DENSE, NEAR_DEAD, SINK, feature_flags, layer_flags, rare_warning, replacement_warning
from circuit_catalog.queries.catalog import Catalog
from circuit_catalog.queries.lookups import Lookups
from circuit_catalog.queries.reports.feature import card_file, write_feature_cards
from circuit_catalog.queries.reports.overview import write_overview
from circuit_catalog.queries.reports.prompt import render_prompt, write_prompt_report

from tests.conftest import STATS_CTX, STATS_TOKENS, random_transcoders
from tests.test_cli import run, run_json
from tests.test_reports import Page, shown

D_SAE, TOP_K = 24, 5
DENSE_F, SINK_F, DEAD_LAYER = feature_id(0, 0), feature_id(0, 1), 2
PROMPT = "the capital of france is"


def inputs(model, tokens, layer: int) -> torch.Tensor:
    _, cache = model.run_with_cache(tokens)
    return cache[f"blocks.{layer}.ln2.hook_normalized"]  # [n_ctx, ctx, d_model]


def controlled_transcoders(model, tokens):
    """Random transcoders, then: L0/0 dense (a large encoder bias), L0/1 reading the direction that tells position 1
    from later ones with a bias that keeps it silent at every later position, and layer 2's features all silenced."""
    tset = random_transcoders(model, d_sae=D_SAE, seed=11)
    x = inputs(model, tokens, 0)[:, 1:]  # BOS left out, as the statistics do
    direction = x[:, 0].mean(0) - x[:, 1:].reshape(-1, x.shape[-1]).mean(0)
    later = (x[:, 1:] @ direction).max()
    tc = tset[0]
    tc.b_enc[0] = 100.0
    tc.W_enc[:, 1] = direction
    tc.b_enc[1] = -later
    tset[DEAD_LAYER].b_enc[:] = -1000.0
    return tset


@pytest.fixture(scope="module")
def flagged(tmp_path_factory, gpt2, text_file):
    """(catalog dir, transcoders, brute-force activations per layer [n_ctx, ctx, d_sae] with BOS at -1)."""
    root = tmp_path_factory.mktemp("caveats") / "catalog"
    tokens = token_contexts(gpt2.tokenizer, str(text_file), STATS_TOKENS, STATS_CTX)
    tset = controlled_transcoders(gpt2, tokens)
    run_ingest(gpt2, tset, root, build_manifest(gpt2, "tiny", tset, "mem", IngestSettings(top_k=3, token_top_k=3)), progress=False)
    assert run_stats(gpt2, tset, root, str(text_file), STATS_TOKENS, ctx_len=STATS_CTX, top_k=TOP_K, progress=False)
    run_prompts(gpt2, tset, root, [PromptSpec(PROMPT)], AttributionSettings(max_feature_nodes=None), progress=False)
    acts = {}
    for tc in tset:
        a = tc.encode(inputs(gpt2, tokens, tc.layer)).float()
        a[:, 0] = -1
        acts[tc.layer] = a
    return root, tset, acts


def expected_flags(acts) -> tuple[dict[str, set[str]], set[int]]:
    """Feature flags and near-dead layers by brute force over the activations."""
    features, layers = {}, set()
    for layer, a in acts.items():
        counted = a[:, 1:].reshape(-1, D_SAE)
        pos = torch.arange(a.shape[1]).repeat(a.shape[0])
        flat = a.reshape(-1, D_SAE)
        fired = (counted > 0).sum(0)
        if fired.sum() / len(counted) < 1 or (fired == 0).sum() > D_SAE / 2:
            layers.add(layer)
        for f in range(D_SAE):
            kinds = set()
            n_top = min(TOP_K, int(fired[f]))
            if n_top and (pos[flat[:, f].topk(n_top).indices] <= 1).sum() >= 0.8 * n_top:
                kinds.add(SINK)
            if fired[f] / len(counted) > 0.5:
                kinds.add(DENSE)
            if kinds:
                features[feature_id(layer, f)] = kinds
    return features, layers


def test_flags_equal_brute_force(flagged):
    root, _, acts = flagged
    features, layers = expected_flags(acts)
    assert SINK in features[SINK_F] and features[SINK_F] == {SINK}  # the constructed features are what they were built to be
    assert DENSE in features[DENSE_F] and layers == {DEAD_LAYER}
    assert {fid: {f.kind for f in flags} for fid, flags in feature_flags(root).items()} == features
    assert {layer: [f.kind for f in flags] for layer, flags in layer_flags(root).items()} == {DEAD_LAYER: [NEAR_DEAD]}
    assert feature_flags(root, [SINK_F, "L1/2"]) == {k: v for k, v in feature_flags(root).items() if k in (SINK_F, "L1/2")}
    with Catalog(root) as cat:
        assert [f.kind for f in cat.flags(SINK_F)] == [SINK]
        assert [f.kind for f in cat.flags(feature_id(DEAD_LAYER, 3))] == [NEAR_DEAD]
        with pytest.raises(UnknownFeature, match="unknown feature"):
            cat.flags("L1/99999")
        assert [f.kind for f in cat.show(DENSE_F, 3).flags] == sorted(features[DENSE_F], key=[SINK, DENSE].index)


def test_thresholds():
    """The rare-firing threshold is the statistics' own; warnings start exactly at their thresholds."""
    assert caveats.RARE_TOKENS * LIVE_FREQUENCY == 1
    assert replacement_warning(0.5) is None
    assert "errors carry most of the influence" in replacement_warning(0.4999)
    assert caveats.quality_line(None).endswith(f"run `{caveats.EVAL_COMMAND}`")


def test_rare_warning_follows_the_counted_tokens(flagged, tmp_path):
    root, _, acts = flagged
    counted = acts[0][:, 1:, 0].numel()  # the tokens the brute-force pass counted
    assert caveats.counted_tokens(root) == counted < caveats.RARE_TOKENS
    assert f"counted {counted:,} tokens" in rare_warning(root)
    copy = tmp_path / "catalog"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("graph*"))
    info_file = copy / "stats" / "info.json"
    info = json.loads(info_file.read_text())
    info_file.write_text(json.dumps({**info, "tokens": 10_000 // (STATS_CTX - 1) * STATS_CTX + STATS_CTX}))
    assert caveats.counted_tokens(copy) >= caveats.RARE_TOKENS and rare_warning(copy) is None


def test_cli_shows_flags_labels_and_quality(flagged, gpt2, text_file, tmp_path):
    root, tset, _ = flagged
    code, output = run("show", SINK_F, "--catalog", root)
    assert code == 0 and f"warning: {caveats.flags_of(root, SINK_F)[0]}" in output
    code, output = run("stats", feature_id(DEAD_LAYER, 0), "--catalog", root)
    assert code == 0 and "warning: near-dead layer" in output and f"warning: {rare_warning(root)}" in output
    assert run_json("stats", SINK_F, "--catalog", root)["flags"][0]["kind"] == SINK

    code, output = run("graph", "--prompt", PROMPT, "--catalog", root)
    assert code == 0 and caveats.quality_line(None) in output and "warning: near-dead layer: layer 2" in output
    found = run_json("graph", "--prompt", PROMPT, "--catalog", root)
    with Lookups(open_loaded_store(root, progress=False)) as lookups:
        graph = lookups.prompt_graph(PROMPT)
        tops = {n.feature_id: (n.top_tokens, n.logit_tokens) for n in graph.of_kind("feature")}
        expected_tokens = {fid: (lookups.tokens(fid, 3).deembed_extended, lookups.tokens(fid, 3).logits) for fid in tops}
    assert {fid: ([t.token for t in d], [t.token for t in lg]) for fid, (d, lg) in expected_tokens.items()} == tops
    flags = feature_flags(root)
    tokens = {n.pos: n.token for n in graph.of_kind("token")}
    for row in found["top"]:
        node = graph.nodes[f"{graph.info.id}:{row['node']}"]
        expected = f"{node.label} {tokens[node.pos]!r}"
        if node.kind == "feature":
            expected += f" (<- {' '.join(map(repr, node.top_tokens[:3]))}; -> {' '.join(map(repr, node.logit_tokens[:3]))})"
        assert row["label"] == expected
        assert [f["kind"] for f in row["flags"]] == [f.kind for f in flags.get(node.feature_id, [])]
    score = graph.info.replacement_score
    assert found["warning"] == replacement_warning(score) and (found["warning"] is not None) == (score < 0.5)

    tokens_ = token_contexts(gpt2.tokenizer, str(text_file), 128, 16)
    (root / "eval.json").write_text(json.dumps(asdict(evaluate_transcoders(gpt2, tset, tokens_, progress=False))))
    try:
        evaluation = json.loads((root / "eval.json").read_text())
        quality = run_json("graph", "--prompt", PROMPT, "--catalog", root)["quality"]
        assert quality == caveats.quality_line(evaluation)
        assert all(f"L{m['layer']} {m['fvu']:.3f}" in quality for m in evaluation["layers"])
        assert f"{evaluation['ce_recovered_all']:.3f}" in quality
    finally:
        (root / "eval.json").unlink()


def lookups_paths(root) -> list[list]:
    """The nodes of the paths the prompt report lists (to its most probable logit)."""
    with Lookups(open_loaded_store(root, progress=False)) as lookups:
        graph = lookups.prompt_graph(PROMPT)
        top = max(graph.of_kind("logit"), key=lambda n: n.probability)
        _, paths = lookups.prompt_paths(PROMPT, top.token, k=10)
    return [[graph.nodes[i] for i in p.nodes] for p in paths]


def test_reports_show_flags_labels_and_warnings(flagged, tmp_path):
    root = flagged[0]
    flags = feature_flags(root)
    with Lookups(open_loaded_store(root, progress=False)) as lookups:
        write_feature_cards(lookups, root, [SINK_F, feature_id(DEAD_LAYER, 0)], tmp_path, k=5)
        graph = lookups.prompt_graph(PROMPT)
        report = write_prompt_report(lookups, root, PROMPT, tmp_path / "prompt.html", k=10)
        uses = {fid: lookups.feature_uses(fid, 5) for fid in {n.feature_id for n in graph.of_kind("feature")}}
    card = Page((tmp_path / card_file(SINK_F)).read_text())
    assert f"Warning: {flags[SINK_F][0]}." in card.texts
    dead_card = Page((tmp_path / card_file(feature_id(DEAD_LAYER, 0))).read_text())
    assert f"Warning: {layer_flags(root)[DEAD_LAYER][0]}." in dead_card.texts and f"Too few tokens to call a feature rare: {rare_warning(root)}." in dead_card.texts

    used = next(fid for fid, u in uses.items() if u)  # a card lists the prompts using its feature by their text
    with Lookups(open_loaded_store(root, progress=False)) as lookups:
        (path,) = write_feature_cards(lookups, root, [used], tmp_path, k=5)
    (rows,) = Page(path.read_text()).rows("uses")
    assert all(row[0] == f"{PROMPT} {graph.info.id}" for row in rows) and rows

    page = Page(report.read_text())
    (nodes,) = page.rows("nodes")
    inner = sorted((n for n in graph.nodes.values() if n.kind in ("feature", "error")), key=lambda n: -(n.influence or 0.0))[:10]
    assert len(nodes) == len(inner)
    for row, n in zip(nodes, inner):
        assert row[1] == shown(graph.token_at(n.pos))
        assert row[2] == " ".join(shown(t) for t in (n.top_tokens or [])[:3])
        assert row[3] == " ".join(shown(t) for t in (n.logit_tokens or [])[:3])
        assert row[4] == "; ".join(map(str, flags.get(n.feature_id, [])))
    assert caveats.quality_line(None) in page.texts
    assert f"Warning: {layer_flags(root)[DEAD_LAYER][0]}." in page.texts
    assert (f"Warning: {replacement_warning(graph.info.replacement_score)}." in page.texts) == (graph.info.replacement_score < 0.5)
    for n in inner:  # the picture's hover titles label its nodes the same way
        assert any(t.startswith(f"{graph.describe(n)} · influence") for t in page.texts)
    html = report.read_text()
    drawn = re.findall(r'<g class="node logit">(.*?)</g>', html)  # the top row: every logit shows its token
    assert sorted(re.search(r"<text[^>]*>(.*?)</text>", g).group(1) for g in drawn) == sorted(
        escape(shown(n.token)) for n in graph.of_kind("logit"))
    path_cells = re.findall(r'<table class="paths">(.*?)</table>', html, re.S)[0]
    paths = lookups_paths(root)
    assert paths and all(f'title="{escape(graph.describe(n))}"' in path_cells for p in paths for n in p)

    overview = Page(write_overview(root, tmp_path / "overview.html").read_text())
    (layers,) = overview.rows("layers")
    counts = {layer: {} for layer in (0, 1, 2)}
    for fid, fl in flags.items():
        layer = parse_feature_id(fid)[0]
        for f in fl:
            counts[layer][f.kind] = counts[layer].get(f.kind, 0) + 1
    expected = {layer: "; ".join(([NEAR_DEAD] if layer == DEAD_LAYER else []) + [f"{n} {kind}" for kind, n in sorted(c.items())])
                for layer, c in counts.items()}
    assert [row[6] for row in layers] == [expected[layer] for layer in (0, 1, 2)]
    assert f"Too few tokens to call a feature rare: {rare_warning(root)}." in overview.texts
    assert caveats.quality_line(None) in overview.texts
    (prompts,) = overview.rows("prompts")
    assert [row[-2:] for row in prompts] == [[replacement_warning(graph.info.replacement_score) or "", graph.info.id]]


def test_prompt_report_warns_of_a_low_replacement_score(flagged):
    """The same graph with its replacement score below the threshold: the report says errors carry the influence."""
    root = flagged[0]
    with Lookups(open_loaded_store(root, progress=False)) as lookups:
        graph = lookups.prompt_graph(PROMPT)
    logit = max(graph.of_kind("logit"), key=lambda n: n.probability).id
    for score in (0.3, 0.5):
        low = dc_replace(graph, info=dc_replace(graph.info, replacement_score=score))
        page = Page(render_prompt(low, [], logit, Manifest.read(root), lambda fid: None, 20, 100, 5, []))
        warning = f"Warning: replacement score {score:.3f} < 0.5: errors carry most of the influence, so read the features' roles with caution."
        assert (warning in page.texts) == (score < 0.5)
