"""Head-resolved attribution terms on real forward passes of both tiny models: the direct and per-head terms of
every edge sum to the edge; zeroing one head's pattern (every other head's output, the norm scales, features and
errors frozen) changes every target by exactly minus that head's terms (all sources and the constant term)."""

from __future__ import annotations

import pytest
import torch
from circuit_catalog.ingest.attribution import attribute
from circuit_catalog.ingest.head_terms import head_table, head_terms
from circuit_catalog.ingest.prompts import local_ids

from tests.conftest import random_clt, random_transcoders, with_skip

PROMPT = "the jury said the capital of france is"


@pytest.fixture(params=["plain", "skip", "clt"])
def case(request, tiny):
    if request.param == "clt":
        tset = random_clt(tiny, d_sae=16, seed=12)
    else:
        tset = random_transcoders(tiny, d_sae=16, seed=12)
        if request.param == "skip":
            with_skip(tset)
    return tiny, tset, attribute(tiny, tset, PROMPT, max_n_logits=3)


def test_terms_sum_to_every_edge(case):
    model, tset, graph = case
    dst, src = (graph.adjacency != 0).nonzero(as_tuple=True)
    terms = head_terms(model, tset, graph, dst, src)
    assert terms.terms.shape == (len(dst), model.cfg.n_layers * model.cfg.n_heads)
    torch.testing.assert_close(terms.direct + terms.terms.sum(1), graph.adjacency[dst, src], rtol=1e-4, atol=1e-5)
    # a source at another position reaches the target only through heads
    n_feat = graph.n_features
    feat_pairs = (dst < n_feat) & (src < n_feat)
    other_pos = graph.features[dst[feat_pairs], 1] != graph.features[src[feat_pairs], 1]
    assert terms.direct[feat_pairs][other_pos].abs().max() == 0
    table = head_table(terms, local_ids(graph), top=3).to_pydict()
    sums = {}
    for s, d, w in zip(table["src"], table["dst"], table["weight"]):
        sums[(s, d)] = sums.get((s, d), 0.0) + w
    ids = local_ids(graph)
    for i in range(0, len(dst), 7):
        assert sums.get((ids[src[i]], ids[dst[i]]), 0.0) == pytest.approx(graph.adjacency[dst[i], src[i]].item(), rel=1e-4, abs=1e-5)


def test_terms_do_not_depend_on_chunks_or_a_second_forward_pass(case):
    """Targets split into chunks of 5 and the prompt traced again (not the graph's own pass) give the same terms."""
    model, tset, graph = case
    dst, src = (graph.adjacency != 0).nonzero(as_tuple=True)
    whole = head_terms(model, tset, graph, dst, src)
    assert len(whole.targets) > 10
    graph.trace = None
    chunked = head_terms(model, tset, graph, dst, src, chunk=5)
    for a, b in [(whole.terms, chunked.terms), (whole.direct, chunked.direct), (whole.bias_terms, chunked.bias_terms)]:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _zero_head(model, tset, tokens, m, h, cache):
    """Pre-activations at ln2 (per layer) and logits with head h of layer m's pattern zeroed and everything else
    frozen at the clean run: norm scales, every other attention layer's output, and every MLP output except for
    its skip path, which reads the changed input (features and errors stay as they were: direct effects)."""
    n = model.cfg.n_layers
    seen = {}

    def clean(act, hook):
        return cache[hook.name]

    def mlp_out(act, hook):
        j = int(hook.name.split(".")[1])
        out = cache[hook.name]
        if j in tset.by_layer and tset[j].W_skip is not None:
            x = f"blocks.{j}.ln2.hook_normalized"
            out = out + (seen[x] - cache[x][0]) @ tset[j].W_skip
        return out

    def zero(act, hook):
        act = act.clone()
        act[:, h] = 0
        return act

    hooks = [(f"blocks.{j}.{name}", clean) for j in range(n) for name in ("ln1.hook_scale", "ln2.hook_scale")]
    hooks += [(f"blocks.{j}.hook_mlp_out", mlp_out) for j in range(n)]
    hooks += [(f"blocks.{j}.hook_attn_out", clean) for j in range(n) if j != m]
    hooks += [("ln_final.hook_scale", clean), (f"blocks.{m}.attn.hook_pattern", zero)]
    hooks += [(f"blocks.{j}.ln2.hook_normalized", lambda act, hook: seen.update({hook.name: act[0]})) for j in range(n)]
    logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks)
    return seen, logits[0, -1]


def test_zeroing_a_head_changes_each_target_by_its_terms(case):
    model, tset, graph = case
    targets = torch.cat([torch.arange(graph.n_features), torch.arange(graph.n_nodes - len(graph.logit_targets), graph.n_nodes)])
    sources = torch.arange(graph.n_nodes - len(graph.logit_targets))
    dst, src = targets.repeat_interleave(len(sources)), sources.repeat(len(targets))
    terms = head_terms(model, tset, graph, dst, src)
    _, cache = model.run_with_cache(graph.tokens[None])
    for m, h in [(0, 1), (1, 2), (2, 0)]:
        _check_zeroed_head(model, tset, graph, terms, dst, cache, m, h)


def _check_zeroed_head(model, tset, graph, terms, dst, cache, m, h):
    col = m * model.cfg.n_heads + h
    per_target = torch.zeros(graph.n_nodes).index_add_(0, dst, terms.terms[:, col])
    per_target[terms.targets] += terms.bias_terms[:, col]
    seen, logits = _zero_head(model, tset, graph.tokens, m, h, cache)
    for i in range(graph.n_features):
        lay, pos, f = graph.features[i].tolist()
        before = cache[f"blocks.{lay}.ln2.hook_normalized"][0, pos] @ tset[lay].W_enc[:, f]
        after = seen[f"blocks.{lay}.ln2.hook_normalized"][pos] @ tset[lay].W_enc[:, f]
        assert (after - before).item() == pytest.approx(-per_target[i].item(), rel=1e-3, abs=1e-4)
    first = graph.n_nodes - len(graph.logit_targets)
    change = logits[graph.logit_targets] - model(graph.tokens[None])[0, -1, graph.logit_targets]
    torch.testing.assert_close(change, -per_target[first:], rtol=1e-3, atol=1e-4)
    assert per_target[:graph.n_features].abs().max() > 1e-3  # the head matters somewhere: the check is not vacuous
