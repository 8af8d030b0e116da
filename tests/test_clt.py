"""Cross-layer transcoders: circuit-tracer's file layout, the reconstruction, attribution graphs, pullbacks
and logit lens held to forward passes, agreement with circuit-tracer's attribute(), and a CLT catalog
through ingest, the store, lookups, a prompt graph and its report."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from circuit_catalog.catalog import layout
from circuit_catalog.catalog.ids import feature_id, parse_feature_id
from circuit_catalog.catalog.store import open_loaded_store
from circuit_catalog.ingest.attribution import attribute
from circuit_catalog.ingest.datasets import token_contexts
from circuit_catalog.ingest.evaluate import evaluate_transcoders
from circuit_catalog.ingest.job import build_manifest, pullback_table, run_ingest, run_stats
from circuit_catalog.ingest.settings import IngestSettings
from circuit_catalog.ingest.prompts import run_prompts
from circuit_catalog.ingest.settings import AttributionSettings, PromptSpec
from circuit_catalog.ingest.transcoder_formats import load_transcoders, save_circuit_tracer, save_circuit_tracer_clt
from circuit_catalog.queries.lookups import Lookups
from circuit_catalog.queries.reports.prompt import report_file, write_prompt_report
from safetensors.torch import load_file

from circuit_catalog.errors import TranscoderError
from tests.conftest import random_clt
from tests.test_attribution import assert_complete, assert_values_are_the_models, hf_model_dir
from tests.test_circuit_tracer import assert_same_nodes, run_circuit_tracer

PROMPT = "the capital of france is"


@pytest.fixture(scope="module")
def clt(tiny, tmp_path_factory):
    """A random CLT for the tiny model, written in circuit-tracer's layout and read back."""
    directory = tmp_path_factory.mktemp("clt") / "clt"
    save_circuit_tracer_clt(random_clt(tiny, d_sae=32, seed=4), directory)
    return tiny, directory, load_transcoders(directory)


def test_files_read_as_circuit_tracer_defines_them(clt):
    """Layer L's reconstruction is the sum over l <= L of a_l @ W_dec_l[:, L - l] plus b_dec_L, from the raw files."""
    model, directory, tset = clt
    n = model.cfg.n_layers
    assert tset.cross_layer and tset.format == "circuit-tracer-clt" and tset.layers == list(range(n))
    files = {i: (load_file(directory / f"W_enc_{i}.safetensors"), load_file(directory / f"W_dec_{i}.safetensors")) for i in range(n)}
    _, cache = model.run_with_cache(model.to_tokens(PROMPT))
    acts = {i: torch.relu(cache[f"blocks.{i}.ln2.hook_normalized"][0] @ enc[f"W_enc_{i}"].T + enc[f"b_enc_{i}"])
            for i, (enc, _) in files.items()}
    ours = tset.reconstruct({i: tset[i].encode(cache[f"blocks.{i}.ln2.hook_normalized"][0]) for i in range(n)}, {})
    for L in range(n):
        expected = files[L][0][f"b_dec_{L}"] + sum(acts[src] @ files[src][1][f"W_dec_{src}"][:, L - src] for src in range(L + 1))
        torch.testing.assert_close(ours[L], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(TranscoderError, match="used whole"):
        tset.select([0, 1])
    with pytest.raises(TranscoderError, match="save_circuit_tracer_clt"):
        save_circuit_tracer(tset, directory.parent / "as-set")


@torch.no_grad()
def frozen_with_injection(model, tokens, inject: dict[int, torch.Tensor], pos: int, residual_only: bool = False):
    """The local replacement model's direct effects: patterns, norm scales and every MLP output frozen at the
    clean run's values, plus `inject[L]` added to layer L's MLP output at `pos`; with `residual_only` the
    attention outputs are frozen too (the pullbacks' direct residual path). Returns (the inputs every
    transcoder reads [layer -> [n_pos, d]], last-position logits, the clean cache)."""
    _, cache = model.run_with_cache(tokens)
    seen = {}

    def frozen(value, hook):
        return cache[hook.name]

    def mlp_out(layer):
        def hook(value, hook):
            out = cache[hook.name].clone()
            if layer in inject:
                out[0, pos] += inject[layer]
            return out
        return hook

    hooks = []
    for layer in range(model.cfg.n_layers):
        frozen_names = ("ln1.hook_scale", "ln2.hook_scale", "attn.hook_pattern") + (("hook_attn_out",) if residual_only else ())
        hooks += [(f"blocks.{layer}.{n}", frozen) for n in frozen_names]
        hooks += [(f"blocks.{layer}.hook_mlp_out", mlp_out(layer)),
                  (f"blocks.{layer}.ln2.hook_normalized", lambda value, hook: seen.setdefault(hook.name, value[0]))]
    hooks.append(("ln_final.hook_scale", frozen))
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    return {layer: seen[f"blocks.{layer}.ln2.hook_normalized"] for layer in range(model.cfg.n_layers)}, logits[0, -1], cache


def test_attribution_graph_is_complete_and_its_edges_are_interventions(clt, request):
    model, _, tset = clt
    graph = attribute(model, tset, PROMPT)
    assert_values_are_the_models(graph, tset, hf_model_dir(request, model))
    assert_complete(graph)
    tokens = graph.tokens[None]
    base_in, base_logits, _ = frozen_with_injection(model, tokens, {}, 0)
    # the strongest source features: scaling one by 3 adds 2 x its writes into its own and every later layer
    strength = graph.adjacency[:, :graph.n_features].abs().sum(0)
    checked = 0
    for s in strength.argsort(descending=True)[:5].tolist():
        layer, pos, index = graph.features[s].tolist()
        inject = {L: 2 * graph.activations[s] * tset[layer].decoder_into(L)[index] for L in range(layer, model.cfg.n_layers)}
        assert len(inject) > 1 or layer == model.cfg.n_layers - 1
        ins, logits, _ = frozen_with_injection(model, tokens, inject, pos)
        for t in range(graph.n_features):
            tl, tp, ti = graph.features[t].tolist()
            change = tset[tl].pre_acts(ins[tl][tp])[ti] - tset[tl].pre_acts(base_in[tl][tp])[ti]
            assert float(change) == pytest.approx(2 * float(graph.adjacency[t, s]), abs=2e-4 + 1e-3 * abs(float(change)))
            checked += abs(float(change)) > 1e-3
        for i, token in enumerate(graph.logit_targets.tolist()):
            change = logits[token] - base_logits[token]
            assert float(change) == pytest.approx(2 * float(graph.adjacency[graph.logit_index(i), s]), abs=2e-4 + 1e-3 * abs(float(change)))
    assert checked > 10


def test_pullbacks_and_logit_lens_are_the_direct_path(clt):
    """A unit of feature i of layer 0 written through all its slices: the change of every layer-2 pre-activation
    (times the frozen scale) is the stored pullback, and of every logit (times the final scale) the logit lens."""
    model, _, tset = clt
    lo, hi, pos = 0, model.cfg.n_layers - 1, 3
    table = pullback_table(model, tset, lo, hi, IngestSettings(top_k=32, min_weight=None)).to_pydict()
    stored = {(s, d): w for s, d, w in zip(table["src"], table["dst"], table["weight"])}
    tokens = model.to_tokens(PROMPT)
    base_in, base_logits, cache = frozen_with_injection(model, tokens, {}, pos, residual_only=True)
    scale = cache[f"blocks.{hi}.ln2.hook_scale"][0, pos, 0]
    final = cache["ln_final.hook_scale"][0, -1, 0]
    for i in range(0, 32, 5):
        # up to (not including) layer hi: what reaches hi's input
        ins, _, _ = frozen_with_injection(model, tokens, {L: tset[lo].decoder_into(L)[i] for L in range(lo, hi)}, pos, residual_only=True)
        expected = torch.tensor([stored[(feature_id(lo, i), feature_id(hi, f))] for f in range(32)])
        torch.testing.assert_close((tset[hi].pre_acts(ins[hi][pos]) - tset[hi].pre_acts(base_in[hi][pos])) * scale, expected, rtol=1e-4, atol=1e-5)
        # through every slice to the logits, at the last position
        last = tokens.shape[1] - 1
        _, logits, _ = frozen_with_injection(model, tokens, {L: tset[lo].decoder_into(L)[i] for L in range(lo, model.cfg.n_layers)}, last, residual_only=True)
        torch.testing.assert_close((logits - base_logits) * final, logit_lens(model, tset, lo)[i], rtol=1e-3, atol=1e-4)


@torch.no_grad()
def logit_lens(model, tset, layer: int) -> torch.Tensor:
    """[d_sae, vocab]: the sum of a feature's decoder slices, centred as a LayerNorm reads it, through W_U."""
    write = tset.total_write(layer, model.cfg.n_layers)
    if model.cfg.normalization_type == "LNPre":
        write = write - write.mean(-1, keepdim=True)
    return write @ model.W_U


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_edges_agree_with_circuit_tracer_on_a_clt(arch, ct_python, request, tmp_path):
    model, model_dir = request.getfixturevalue(arch), request.getfixturevalue(f"{arch}_dir")
    save_circuit_tracer_clt(random_clt(model, d_sae=32, seed=9), tmp_path / "clt")
    tset = load_transcoders(tmp_path / "clt")
    ours = attribute(model, tset, PROMPT, batch_size=8)
    ref = run_circuit_tracer(ct_python, model_dir, tmp_path / "clt", tmp_path / "ct.npz", prompt=PROMPT)
    assert_same_nodes(ours, ref)
    targets = torch.cat([torch.arange(ours.n_features), torch.arange(ours.logit_index(0), ours.n_nodes)])
    sources = torch.arange(ours.token_index(0) if arch == "gpt2" else ours.logit_index(0))
    A, R = ours.adjacency[targets][:, sources], torch.from_numpy(ref["adjacency"])[targets][:, sources]
    assert (R != 0).sum() > 200
    torch.testing.assert_close(A, R, rtol=1e-4, atol=1e-5 * float(R.abs().max()))


def test_running_writes_equal_each_pairs_total_write(clt):
    """The ingest's source-major running sum gives every reader the same write as summing its slices afresh."""
    model, _, tset = clt
    n = model.cfg.n_layers
    for lo in range(n):
        for readers in (list(range(lo + 1, n)), [n - 1] if lo < n - 1 else [], []):
            got = [(hi, write.clone()) for hi, write in tset.writes_from(lo, readers)]
            assert [hi for hi, _ in got] == readers
            for hi, write in got:
                torch.testing.assert_close(write, tset.total_write(lo, hi), rtol=0, atol=1e-6)


def test_a_clt_catalog_is_ingested_loaded_and_queried(clt, text_file, tmp_path):
    model, directory, tset = clt
    root = tmp_path / "catalog"
    run_ingest(model, tset, root, build_manifest(model, "tiny", tset, str(directory), IngestSettings(top_k=3, token_top_k=3)), progress=False)
    assert run_stats(model, tset, root, str(text_file), 200, ctx_len=16, top_k=3, progress=False)
    stats = pq.read_table(layout.stats_file(root, "features")).to_pylist()
    assert len(stats) == 32 * model.cfg.n_layers and any(r["frequency"] > 0 for r in stats)
    (pid,) = run_prompts(model, tset, root, [PromptSpec(PROMPT)], AttributionSettings(), progress=False)
    part = pq.read_table(layout.pullback_part(root, 0, 2)).to_pylist()
    lens = pq.read_table(layout.logit_part(root, 0)).to_pylist()
    top = logit_lens(model, tset, 0).topk(3, dim=1)  # the stored logit lens: each feature's top tokens of all its slices
    assert {(r["src"], r["dst"]) for r in lens} == {(feature_id(0, i), t) for i in range(32) for t in top.indices[i].tolist()}
    for r in lens:
        i = parse_feature_id(r["src"])[1]
        assert r["weight"] == pytest.approx(float(logit_lens(model, tset, 0)[i, r["dst"]]), rel=1e-4, abs=1e-5)

    with Lookups(open_loaded_store(root, progress=False)) as lookups:
        feature = part[0]["dst"]
        upstream = lookups.upstream(feature, k=50, layer=0)
        assert {(e.feature, round(e.weight, 5)) for e in upstream} == {(r["src"], round(r["weight"], 5)) for r in part if r["dst"] == feature}
        assert lookups.prompt(PROMPT).id == pid
        report = write_prompt_report(lookups, root, PROMPT, tmp_path / report_file(pid), max_nodes=20)
    assert report.is_file() and "L0/" in report.read_text()


def test_eval_replaces_mlps_with_every_slice(clt, text_file):
    """eval with a CLT, against the CLT written out from the raw files: each layer's reconstruction from the
    clean run, and CE with all MLPs replaced, each layer's features read from the replaced run's own inputs."""
    model, directory, tset = clt
    n = model.cfg.n_layers
    raw = {i: (load_file(directory / f"W_enc_{i}.safetensors"), load_file(directory / f"W_dec_{i}.safetensors")) for i in range(n)}

    def acts(i: int, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ raw[i][0][f"W_enc_{i}"].T + raw[i][0][f"b_enc_{i}"])

    def out(L: int, z: dict) -> torch.Tensor:
        return raw[L][0][f"b_dec_{L}"] + sum(z[i] @ raw[i][1][f"W_dec_{i}"][:, L - i] for i in range(L + 1))

    tokens = token_contexts(model.tokenizer, str(text_file), 96, 16)
    result = evaluate_transcoders(model, tset, tokens, batch_contexts=3, progress=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        z = {i: acts(i, cache[f"blocks.{i}.ln2.hook_normalized"][:, 1:]) for i in range(n)}
        n_recon = tokens[:, 1:].numel()
        for L in range(n):
            y = cache[f"blocks.{L}.hook_mlp_out"][:, 1:]
            assert result.layers[L].mse == pytest.approx(float((out(L, z) - y).pow(2).sum()) / n_recon, rel=1e-4)
        seen: dict[int, torch.Tensor] = {}

        def read(act, hook):
            seen[hook.layer()] = acts(hook.layer(), act)

        def write(act, hook):
            new = out(hook.layer(), seen)
            new[:, 0] = act[:, 0]  # BOS keeps the model's output, as eval does
            return new

        hooks = [(f"blocks.{i}.ln2.hook_normalized", read) for i in range(n)] + [(f"blocks.{i}.hook_mlp_out", write) for i in range(n)]
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    ce = -logits[:, 1:-1].log_softmax(-1).gather(-1, tokens[:, 2:, None]).sum() / tokens[:, 2:].numel()
    assert result.all_layers.ce_replaced == pytest.approx(float(ce), rel=1e-4)
    assert result.all_layers.kl_replaced > 0.01  # a random CLT really changes the model
