"""Attribution graphs held to the model itself: completeness, interventions, and the pullback.

The checks run real TransformerLens forward passes. The intervention check freezes the model with
hooks (patterns, norm scales, MLP outputs) and measures the change in each target when one source is
scaled: it shares no code with the attribution's transposed sweep.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from circuit_catalog.catalog.ids import feature_id
from circuit_catalog.ingest.attribution import AttributionGraph, attribute, target_token
from circuit_catalog.ingest.job import pullback_table
from circuit_catalog.ingest.settings import IngestSettings
from conftest import DEVICES, arch_of, random_transcoders, with_skip

from circuit_catalog.errors import AttributionError

PROMPT = "the capital of france is"


def hf_model_dir(request, model) -> Path:
    return request.getfixturevalue(f"{arch_of(model)}_dir")


@pytest.fixture(scope="module", params=["plain", "skip", "subset"])
def case(request, tiny):
    """A model with transcoders on every layer, skip transcoders, or transcoders on some layers only."""
    layers = [0, 2] if request.param == "subset" else None
    tset = random_transcoders(tiny, d_sae=40, seed=3, layers=layers)
    if request.param == "skip":
        with_skip(tset)
    return tiny, tset, attribute(tiny, tset, PROMPT), hf_model_dir(request, tiny)


def targets(graph: AttributionGraph) -> torch.Tensor:
    return (~torch.isnan(graph.value)).nonzero().flatten()


@torch.no_grad()
def hf_reference(model_dir: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """From the Hugging Face model itself (not TransformerLens): last-position logits, centred over the vocabulary
    as TransformerLens's center_unembed leaves them, and each layer's MLP input normalised without the norm's
    weight, which is what a transcoder reading ln2.hook_normalized sees once the weight is folded away."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gpt2 = hf.config.model_type == "gpt2"
    norms = [block.ln_2 for block in hf.transformer.h] if gpt2 else [layer.post_attention_layernorm for layer in hf.model.layers]
    inputs: list[torch.Tensor] = []
    handles = [n.register_forward_pre_hook(lambda module, args: inputs.append(args[0][0])) for n in norms]
    logits = hf(tokens[None]).logits[0, -1]
    for h in handles:
        h.remove()
    normalised = []
    for x in inputs:
        if gpt2:
            x = x - x.mean(-1, keepdim=True)
            normalised.append(x / (x.pow(2).mean(-1, keepdim=True) + hf.config.layer_norm_epsilon).sqrt())
        else:
            normalised.append(x / (x.pow(2).mean(-1, keepdim=True) + hf.config.rms_norm_eps).sqrt())
    return logits - logits.mean(), normalised


def assert_values_are_the_models(graph: AttributionGraph, tset, model_dir: Path) -> None:
    """Every target's value is its pre-activation or logit in an independent forward pass of the HF model."""
    logits, normalised = hf_reference(model_dir, graph.tokens)
    for i, (layer, pos, index) in enumerate(graph.features.tolist()):
        pre = normalised[layer][pos] @ tset[layer].W_enc[:, index] + tset[layer].b_enc[index]
        assert graph.value[i] == pytest.approx(float(pre), rel=1e-4, abs=1e-4)
    for i, token in enumerate(graph.logit_targets.tolist()):
        assert graph.value[graph.logit_index(i)] == pytest.approx(float(logits[token]), rel=1e-4, abs=1e-4)


def assert_complete(graph: AttributionGraph) -> None:
    t = targets(graph)
    total = graph.adjacency[t].sum(1) + graph.bias[t] + graph.dropped[t]
    torch.testing.assert_close(total, graph.value[t], rtol=1e-4, atol=1e-4 * float(graph.value[t].abs().max()))


def test_completeness_against_the_unmodified_model(case):
    model, tset, graph, model_dir = case
    assert_values_are_the_models(graph, tset, model_dir)
    t = targets(graph)
    assert len(t) == graph.n_features + len(graph.logit_targets)
    assert graph.features[:, 1].min() >= 1  # BOS (position 0) has no feature nodes,
    bos_errors = [graph.error_index(layer, 0) for layer in range(graph.n_layers)]
    assert not graph.adjacency[:, bos_errors].any()  # and its MLP outputs are constants, in the bias
    assert graph.n_features == graph.n_active_features and not graph.capped
    assert_complete(graph)
    assert not graph.dropped.any()
    # sources only: error, token and logit nodes have no incoming edges
    assert not graph.adjacency[graph.n_features:graph.logit_index(0)].any()


@torch.no_grad()
def frozen_run(model, tset, tokens, scale_source):
    """Targets of the local replacement model, run forward with hooks, one source scaled by `scale_source`.

    Returns (feature pre-activations per layer [n_pos, d_sae], last-position logits).
    """
    n_layers = model.cfg.n_layers
    _, cache = model.run_with_cache(tokens)
    const = {}
    for layer in range(n_layers):
        out = cache[f"blocks.{layer}.hook_mlp_out"].clone()
        if layer in tset.by_layer:  # everything but the skip path is frozen; the skip path stays live
            tc = tset[layer]
            x = cache[tc.cfg.hook_in]
            if tc.W_skip is not None:
                out = out - x @ tc.W_skip
        const[layer] = out
    hooks = []

    def freeze(name):
        hooks.append((name, lambda value, hook: cache[hook.name]))

    for layer in range(n_layers):
        for name in (f"blocks.{layer}.ln1.hook_scale", f"blocks.{layer}.ln2.hook_scale", f"blocks.{layer}.attn.hook_pattern"):
            freeze(name)
    freeze("ln_final.hook_scale")
    seen = {}

    def keep_input(value, hook):
        seen[hook.name] = value
        return value

    for tc in tset:
        hooks.append((tc.cfg.hook_in, keep_input))

    def mlp_out(layer):
        def hook(value, hook):
            out = const[layer].clone()
            if layer in tset.by_layer and tset[layer].W_skip is not None:
                out = out + seen[tset[layer].cfg.hook_in] @ tset[layer].W_skip
            return scale_source("mlp", layer, out)
        return hook

    for layer in range(n_layers):
        hooks.append((f"blocks.{layer}.hook_mlp_out", mlp_out(layer)))
    hooks.append(("blocks.0.hook_resid_pre", lambda value, hook: scale_source("embed", None, value)))
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    pre = {tc.layer: tc.pre_acts(seen[tc.cfg.hook_in][0]) for tc in tset}
    return pre, logits[0, -1]


def add_at(layer: int, pos: int, delta: torch.Tensor):
    """Scale a feature or error node: add (alpha - 1) times its output to that layer's MLP output."""
    def scale(where, at_layer, value):
        if where == "mlp" and at_layer == layer:
            value = value.clone()
            value[0, pos] += delta
        return value
    return scale


def scale_embedding(pos: int, alpha: float):
    def scale(where, at_layer, value):
        if where == "embed":
            value = value.clone()
            value[0, pos] *= alpha
        return value
    return scale


def error_vector(model, tset, tokens, layer: int, pos: int) -> torch.Tensor:
    _, cache = model.run_with_cache(tokens)
    err = cache[f"blocks.{layer}.hook_mlp_out"][0, pos]
    if layer in tset.by_layer:
        tc = tset[layer]
        x = cache[tc.cfg.hook_in][0, pos]
        err = err - tc.decode(tc.encode(x), x)
    return err


def test_edges_equal_interventions(case):
    model, tset, graph, _ = case
    tokens = model.to_tokens(PROMPT)
    base_pre, base_logits = frozen_run(model, tset, tokens, lambda where, layer, value: value)
    t = targets(graph)
    feats = graph.features
    n_checked = 0
    # sources: the strongest features by outgoing weight, a few error nodes, every token
    strength = graph.adjacency[:, :graph.n_features].abs().sum(0)
    sources = [("feature", int(i)) for i in strength.argsort(descending=True)[:4]]
    sources += [("error", (1, graph.n_pos - 1)), ("error", (0, 1)), ("token", 1), ("token", graph.n_pos - 1), ("token", 0)]
    alpha = 3.0
    for kind, which in sources:
        if kind == "feature":
            layer, pos, index = feats[which].tolist()
            column = which
            scale_source = add_at(layer, pos, (alpha - 1) * graph.activations[which] * tset[layer].W_dec[index])
        elif kind == "error":
            layer, pos = which
            column = graph.error_index(layer, pos)
            scale_source = add_at(layer, pos, (alpha - 1) * error_vector(model, tset, tokens, layer, pos))
        else:
            pos, column = which, graph.token_index(which)
            scale_source = scale_embedding(pos, alpha)
        pre, logits = frozen_run(model, tset, tokens, scale_source)
        for row in t.tolist():
            if row < graph.n_features:
                tl, tp, ti = feats[row].tolist()
                change = pre[tl][tp, ti] - base_pre[tl][tp, ti]
            else:
                token = int(graph.logit_targets[row - graph.logit_index(0)])
                change = logits[token] - base_logits[token]
            expected = (alpha - 1) * graph.adjacency[row, column]
            assert float(change) == pytest.approx(float(expected), abs=2e-4 + 1e-3 * abs(float(expected))), (kind, which, row)
            n_checked += abs(float(expected)) > 1e-3
    assert n_checked > 20  # the check saw real, non-zero edges


def test_same_position_edge_is_activation_times_pullback_over_scale(tiny):
    """With attention writing nothing (W_O = 0), features interact only along their own position."""
    model = copy.deepcopy(tiny)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.W_O.zero_()
    tset = random_transcoders(model, d_sae=40, seed=4)
    graph = attribute(model, tset, PROMPT)
    _, cache = model.run_with_cache(model.to_tokens(PROMPT))
    n_feat = graph.n_features
    pullback = {}
    for lo in tset.layers:
        for hi in tset.layers:
            if lo < hi:
                table = pullback_table(model, tset, lo, hi, IngestSettings(top_k=tset[lo].cfg.d_sae)).to_pydict()
                pullback.update({(s, d): w for s, d, w in zip(table["src"], table["dst"], table["weight"])})
    compared = 0
    for t in range(n_feat):
        tl, tp, ti = graph.features[t].tolist()
        scale = float(cache[f"blocks.{tl}.ln2.hook_scale"][0, tp, 0])
        for s in range(n_feat):
            sl, sp, si = graph.features[s].tolist()
            weight = float(graph.adjacency[t, s])
            if sp != tp or sl >= tl:
                assert weight == 0.0
                continue
            expected = float(graph.activations[s]) * pullback[(feature_id(sl, si), feature_id(tl, ti))] / scale
            assert weight == pytest.approx(expected, rel=1e-4, abs=1e-5)
            compared += 1
    assert compared > 50


def test_feature_cap_keeps_the_most_influential_and_accounts_for_the_rest(tiny):
    tset = random_transcoders(tiny, d_sae=40, seed=3)
    full = attribute(tiny, tset, PROMPT)
    capped = attribute(tiny, tset, PROMPT, max_feature_nodes=12, batch_size=4, update_interval=1)
    assert capped.n_features == 12 and capped.capped and capped.n_active_features == full.n_features
    t = targets(capped)
    total = capped.adjacency[t].sum(1) + capped.bias[t] + capped.dropped[t]
    torch.testing.assert_close(total, capped.value[t], rtol=1e-4, atol=1e-4 * float(capped.value[t].abs().max()))
    assert capped.dropped.abs().sum() > 0
    # the kept features' rows are the full graph's rows (restricted to kept columns)
    index = {tuple(f): i for i, f in enumerate(full.features.tolist())}
    rows = torch.tensor([index[tuple(f)] for f in capped.features.tolist()])
    cols = torch.cat([rows, torch.arange(full.n_features, full.n_nodes - len(full.logit_targets))])
    torch.testing.assert_close(capped.adjacency[:12, :-len(capped.logit_targets)], full.adjacency[rows][:, cols])
    # the first features chosen are those with the largest direct effect on the logits
    logit_rows = full.adjacency[-len(full.logit_targets):, :full.n_features]
    top = (logit_rows.abs() / full.adjacency[-len(full.logit_targets):].abs().sum(1, keepdim=True)).T @ full.logit_probabilities
    assert int(top.argmax()) in rows.tolist()


def test_logit_targets_and_named_targets(tiny):
    tset = random_transcoders(tiny, d_sae=40, seed=3, layers=[1])
    graph = attribute(tiny, tset, PROMPT, max_n_logits=3, desired_logit_prob=0.99)
    with torch.no_grad():
        probs = tiny(tiny.to_tokens(PROMPT))[0, -1].softmax(-1)
    assert graph.logit_targets.tolist() == probs.topk(3).indices.tolist()
    # the cumulative-probability cut-off: the fewest top tokens whose probabilities reach desired_logit_prob
    top = probs.topk(10)
    for n in (1, 2, 4):
        reach = float(top.values[:n].sum()) - 1e-6
        cut = attribute(tiny, tset, PROMPT, max_n_logits=10, desired_logit_prob=reach)
        assert cut.logit_targets.tolist() == top.indices[:n].tolist()
        torch.testing.assert_close(cut.logit_probabilities, top.values[:n])
    paris = target_token(tiny, "paris")
    named = attribute(tiny, tset, PROMPT, max_n_logits=1, extra_targets=[paris])
    assert named.logit_targets.tolist()[-1] == paris
    with pytest.raises(AttributionError, match="2 tokens"):
        target_token(tiny, "paris france")
    with pytest.raises(AttributionError, match="empty prompt"):
        attribute(tiny, tset, "   ")


def test_bos_features_on_request(tiny):
    tset = random_transcoders(tiny, d_sae=40, seed=3)
    graph = attribute(tiny, tset, PROMPT, zero_bos=False)
    assert (graph.features[:, 1] == 0).any()
    t = targets(graph)
    total = graph.adjacency[t].sum(1) + graph.bias[t] + graph.dropped[t]
    torch.testing.assert_close(total, graph.value[t], rtol=1e-4, atol=1e-4 * float(graph.value[t].abs().max()))
    # the graphs agree on every edge between nodes they share
    default = attribute(tiny, tset, PROMPT)
    index = {tuple(f): i for i, f in enumerate(graph.features.tolist())}
    rows = torch.tensor([index[tuple(f)] for f in default.features.tolist()])
    torch.testing.assert_close(default.adjacency[:default.n_features, :default.n_features], graph.adjacency[rows][:, rows])


def test_position_zero_without_a_bos(tiny, request):
    """Position 0 is circuit-tracer's: a leading special token stays as it is (no BOS before it), and with a
    tokenizer that has no special token the first word is position 0. Either way it gets no feature nodes,
    its MLP outputs are constants in the bias, and the graph is complete against the HF model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tset = random_transcoders(tiny, d_sae=40, seed=3)
    model_dir = hf_model_dir(request, tiny)
    words = tiny.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    core = Tokenizer(models.WordLevel(vocab=tiny.tokenizer.get_vocab(), unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bare = copy.copy(tiny)  # the same weights, a tokenizer without any special token
    bare.tokenizer = PreTrainedTokenizerFast(tokenizer_object=core)
    assert not bare.tokenizer.all_special_ids
    cases = [(tiny, "<eos> " + PROMPT, [tiny.tokenizer.eos_token_id] + words), (bare, PROMPT, words)]
    for model, prompt, expected in cases:
        graph = attribute(model, tset, prompt)
        assert graph.tokens.tolist() == expected
        assert graph.features[:, 1].min() >= 1
        assert not graph.adjacency[:, [graph.error_index(layer, 0) for layer in range(graph.n_layers)]].any()
        assert_values_are_the_models(graph, tset, model_dir)
        assert_complete(graph)


def autograd_edges(model, tset, graph: AttributionGraph, rows: list[int], sources: list[int]) -> torch.Tensor:
    """[len(rows), len(sources)] direct effects of feature nodes on targets, by autograd through the model itself.

    Every transcoder layer's MLP output becomes its reconstruction from leaf activations (the graph's: position
    0 zeroed) plus the clean run's error, a constant; norm scales and attention patterns are the clean run's
    (hooks), so nothing responds but the linear residual paths (and live skip paths): d target / d activation,
    times the activation, is the edge. Shares no code with the transposed sweep."""
    tokens = graph.tokens[None]
    _, cache = model.run_with_cache(tokens)
    z = {}
    for tc in tset:
        clean = tc.encode(cache[tc.cfg.hook_in][0])
        clean[0] = 0
        z[tc.layer] = clean.detach().requires_grad_(True)
    x_clean = {tc.layer: cache[tc.cfg.hook_in] for tc in tset}
    errors = {layer: cache[f"blocks.{layer}.hook_mlp_out"] - tset.decode_into(layer, z, x_clean) for layer in tset.layers}
    seen = {}
    hooks = [(name, lambda value, hook: cache[hook.name]) for name in cache if name.endswith(("hook_scale", "hook_pattern"))]
    hooks += [(tc.cfg.hook_in, lambda value, hook, layer=tc.layer: seen.setdefault(layer, value)) for tc in tset]
    hooks += [(f"blocks.{layer}.hook_mlp_out", lambda value, hook, layer=layer:
               tset.decode_into(layer, z, seen) + errors[layer].detach() if layer in tset.by_layer else cache[hook.name])
              for layer in range(model.cfg.n_layers)]
    out = torch.zeros(len(rows), len(sources))
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        for i, row in enumerate(rows):
            if row < graph.n_features:
                layer, pos, index = graph.features[row].tolist()
                target = tset[layer].pre_acts(seen[layer][0, pos])[index]
            else:
                target = logits[0, -1, graph.logit_targets[row - graph.logit_index(0)]]
            grads = torch.autograd.grad(target, list(z.values()), retain_graph=True, allow_unused=True)
            by_layer = dict(zip(z, grads))
            for j, s in enumerate(sources):
                layer, pos, index = graph.features[s].tolist()
                grad = by_layer[layer]
                out[i, j] = 0.0 if grad is None else float(grad[pos, index] * graph.activations[s])
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_graph_on_each_device_equals_the_float32_cpu_graph(tiny, model_on, device):
    """On each device: the same nodes and edges as the float32 graph on the CPU, complete against that device's own
    forward pass, and its strongest edges into the logits and into later features equal to autograd there."""
    model = model_on(arch_of(tiny), device)
    tset = with_skip(random_transcoders(tiny, d_sae=40, seed=3)).to(device)  # drawn on the CPU, moved
    reference = attribute(tiny, with_skip(random_transcoders(tiny, d_sae=40, seed=3)), PROMPT)
    graph = attribute(model, tset, PROMPT)
    assert graph.adjacency.device.type == device and graph.adjacency.dtype == torch.float32
    assert torch.equal(graph.features.cpu(), reference.features)
    torch.testing.assert_close(graph.adjacency.cpu(), reference.adjacency, rtol=1e-4, atol=1e-5)
    assert_complete(graph)
    strength = graph.adjacency[:, :graph.n_features].abs().sum(0)
    sources = strength.argsort(descending=True)[:4].tolist()
    later = [t for t in range(graph.n_features) if graph.features[t, 0] > graph.features[sources, 0].min()][:3]
    rows = list(range(graph.logit_index(0), graph.n_nodes)) + later
    expected = autograd_edges(model, tset, graph, rows, sources)
    torch.testing.assert_close(graph.adjacency[rows][:, sources].cpu(), expected, rtol=1e-4, atol=1e-5)
    assert int((expected.abs() > 1e-3).sum()) > 5  # real, non-zero edges were compared
