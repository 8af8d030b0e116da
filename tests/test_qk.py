"""QK attribution and the forward contributions it rests on, on real forward passes of both tiny models (GPT-2:
LayerNorm, learned positions; Llama: RMSNorm, rotary, grouped-query attention), with per-layer, skip and
cross-layer transcoders: the rows sum to the model's residual stream, and the bilinear terms to its score."""

from __future__ import annotations

import pytest
import torch
from circuit_catalog.ingest.attribution import prompt_tokens, trace_prompt
from circuit_catalog.ingest.contributions import Forward, Sources
from circuit_catalog.ingest.qk import qk_attribution

from circuit_catalog.errors import AttributionError, UnknownHead
from tests.conftest import random_clt, random_transcoders, with_skip

PROMPT = "the jury said the capital of france is paris"


@pytest.fixture(params=["plain", "skip", "clt"])
def tset(request, tiny):
    if request.param == "clt":
        return random_clt(tiny, d_sae=24, seed=8)
    tset = random_transcoders(tiny, d_sae=24, seed=8)
    return with_skip(tset) if request.param == "skip" else tset


def test_rows_sum_to_the_residual_stream(tiny, tset):
    tokens = prompt_tokens(tiny, PROMPT)
    trace = trace_prompt(tiny, tset, tokens)
    _, cache = tiny.run_with_cache(tokens[None])
    n = tiny.cfg.n_layers
    forward = Forward(tiny, tset, trace, Sources.all_before(trace, n, n))
    seen = []
    for m, F in forward.run():
        expected = cache[f"blocks.{m}.hook_resid_pre"][0] if m < n else cache[f"blocks.{n - 1}.hook_resid_post"][0]
        torch.testing.assert_close(F.sum(0), expected, rtol=1e-4, atol=1e-4)
        seen.append(m)
    assert seen == list(range(n + 1))


@pytest.mark.parametrize("head, q, k", [("L0H1", 4, 2), ("L1H0", 6, 6), ("L2H3", 9, 1), ("L2H2", 5, 0), ("L1H3", -1, 3)])
def test_terms_sum_to_the_models_score(tiny, tset, head, q, k):
    tokens = prompt_tokens(tiny, PROMPT)
    qk = qk_attribution(tiny, tset, tokens, head, q, k)
    assert qk.terms.shape == (len(qk.query_nodes), len(qk.key_nodes))
    assert qk.total == pytest.approx(qk.score, rel=1e-4, abs=1e-4)
    assert sum(v for _, v in qk.query_totals()) == pytest.approx(qk.score, rel=1e-4, abs=1e-4)
    assert sum(v for _, v in qk.key_totals()) == pytest.approx(qk.score, rel=1e-4, abs=1e-4)
    layer = int(head[1:].split("H")[0])
    assert all(not n.startswith(f"L{layer}/") and not n.startswith(f"err:L{layer}@") for n in qk.query_nodes)  # only what the head reads
    assert len(qk.top_pairs(5)) == 5 and abs(qk.top_pairs(5)[0][2]) >= abs(qk.top_pairs(5)[-1][2])


def test_each_node_alone_moves_the_score_by_its_bilinear_terms(tiny):
    """Scale one query-side node's contribution by 2 inside a frozen forward (ln1 scale and everything else fixed):
    the score moves by that node's one-sided total. Checked on the model's own attention through hooks."""
    tset = random_transcoders(tiny, d_sae=24, seed=9)
    tokens = prompt_tokens(tiny, PROMPT)
    head, q, k = "L2H1", 7, 3
    qk = qk_attribution(tiny, tset, tokens, head, q, k)
    trace = trace_prompt(tiny, tset, tokens)
    F = next(F for m, F in Forward(tiny, tset, trace, Sources.all_before(trace, 3, 2)).run(3) if m == 2)
    node, total = next((n, v) for n, v in qk.query_totals() if n != "bias")  # the bias row's q also holds b_Q
    row = qk.query_nodes.index(node)
    _, cache = tiny.run_with_cache(tokens[None])

    def add(act, hook):  # the node's share of the query position's residual, once more
        act = act.clone()
        act[0, q] += F[row, q]
        return act

    def frozen_scale(act, hook):
        return cache[hook.name]

    seen = {}
    tiny.run_with_hooks(tokens[None], fwd_hooks=[
        ("blocks.2.hook_resid_pre", add), ("blocks.2.ln1.hook_scale", frozen_scale),
        ("blocks.2.attn.hook_attn_scores", lambda act, hook: seen.update(s=act[0, 1, q, k].item()))], stop_at_layer=3)
    assert seen["s"] - qk.score == pytest.approx(total, rel=1e-3, abs=1e-4)


def test_bad_heads_and_positions(gpt2):
    tset = random_transcoders(gpt2, d_sae=8)
    tokens = prompt_tokens(gpt2, PROMPT)
    with pytest.raises(UnknownHead, match="malformed"):
        qk_attribution(gpt2, tset, tokens, "7.3", 2, 1)
    with pytest.raises(UnknownHead, match="unknown head L9H0"):
        qk_attribution(gpt2, tset, tokens, "L9H0", 2, 1)
    with pytest.raises(AttributionError, match="causal"):
        qk_attribution(gpt2, tset, tokens, "L1H0", 2, 5)
