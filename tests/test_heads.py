"""Attention heads, input-independent: every stored OV weight against autograd through a real forward pass with
one head's pattern frozen to a single source position and every other path cut; per-layer transcoders and CLTs,
GPT-2 style (LayerNorm, learned positions) and Llama style (RMSNorm, rotary, grouped-query attention)."""

from __future__ import annotations

import pytest
import torch
from circuit_catalog.ingest.heads import ov_table, ov_token_table

from tests.conftest import random_clt, random_transcoders


def _ov_gradient(model, tset, m, h, L, tokens, q, k, feature, source_layer=None):
    """d(pre-activation of `feature` (layer L) at q) / d(source) at position k, times ln1's scale at (m, k) and
    ln2's at (L, q): with head h of layer m attending from q to k with weight 1, its other heads, every other
    attention layer and every MLP output held (detached), and the norm scales detached.

    The source is a leaf z of transcoder layer `source_layer` spliced into every layer it writes into (its value
    unchanged), or with `source_layer=None` the embedding at position k. Returns (gradient, other-position grads).
    """
    state = {}
    n_layers = model.cfg.n_layers

    def capture_x(act, hook):
        state["x"] = act.detach()

    def splice(j):
        def hook(act, hook):
            out = act.detach()
            if source_layer is not None and "z" in state and j < m:
                W = tset[source_layer].decoder_into(j)
                if W is not None:
                    path = state["z"] @ W
                    out = out + path - path.detach()
            return out
        return hook

    def make_z(act, hook):
        state["z"] = tset[source_layer].encode(state["x"]).detach().requires_grad_(True)

    def embed(act, hook):
        state["e"] = act.detach().requires_grad_(True)
        return state["e"]

    def pattern(act, hook):
        p = act.detach().clone()
        p[:, :, q, :] = 0
        p[:, :, q, k] = 1
        return p

    def only_head(act, hook):
        keep = torch.zeros(act.shape[2], dtype=torch.bool, device=act.device)
        keep[h] = True
        return torch.where(keep[None, None, :, None], act, act.detach())

    def scale(name):
        def hook(act, hook):
            state[name] = act.detach()
            return act.detach()
        return hook

    def capture_out(act, hook):
        state["x_L"] = act

    hooks = [("hook_embed", embed)]
    if source_layer is not None:
        hooks += [(f"blocks.{source_layer}.ln2.hook_normalized", capture_x), (f"blocks.{source_layer}.ln2.hook_normalized", make_z)]
    hooks += [(f"blocks.{j}.hook_mlp_out", splice(j)) for j in range(n_layers)]
    hooks += [(f"blocks.{j}.hook_attn_out", lambda act, hook: act.detach()) for j in range(n_layers) if j != m]
    hooks += [(f"blocks.{m}.attn.hook_pattern", pattern), (f"blocks.{m}.attn.hook_z", only_head),
              (f"blocks.{m}.ln1.hook_scale", scale("s1")), (f"blocks.{L}.ln2.hook_scale", scale("s2")),
              (f"blocks.{L}.ln2.hook_normalized", capture_out)]
    with torch.enable_grad():
        model.run_with_hooks(tokens, fwd_hooks=hooks, stop_at_layer=L + 1)
        pre = state["x_L"][0, q] @ tset[L].W_enc[:, feature] + tset[L].b_enc[feature]
        leaf = state["e"] if source_layer is None else state["z"]
        (grad,) = torch.autograd.grad(pre, leaf)
    factor = state["s1"][0, k, 0] * state["s2"][0, q, 0]
    return grad[0, k] * factor


CASES = [(1, 1, 2), (1, 2, 2), (2, 2, 2), (0, 2, 1), (1, 2, 0)]  # (attention layer, target layer, head)


@pytest.mark.parametrize("kind", ["per-layer", "clt"])
def test_every_ov_weight_is_the_frozen_single_head_gradient(tiny, kind):
    d_sae = 16
    tset = random_transcoders(tiny, d_sae=d_sae, seed=3) if kind == "per-layer" else random_clt(tiny, d_sae=d_sae, seed=3)
    tokens = tiny.to_tokens("the capital of france is paris")
    q, k = 5, 2
    for m, L, h in CASES:
        n_src = d_sae * m
        table = ov_table(tiny, tset, m, L, top_k=max(n_src, 1)).to_pydict()
        stored = {(s, d, hd): w for s, d, w, hd in zip(table["src"], table["dst"], table["weight"], table["head"])}
        assert len(stored) == n_src * d_sae * tiny.cfg.n_heads  # every (source, target, head) kept
        for feature in (0, 9):
            for lo in range(m):
                grad = _ov_gradient(tiny, tset, m, h, L, tokens, q, k, feature, source_layer=lo)
                weights = torch.tensor([stored[(f"L{lo}/{i}", f"L{L}/{feature}", f"L{m}H{h}")] for i in range(d_sae)])
                torch.testing.assert_close(weights, grad, rtol=1e-4, atol=1e-5)


def test_token_ov_weights_are_the_frozen_single_head_gradient(tiny):
    tset = random_transcoders(tiny, d_sae=16, seed=4)
    tokens = tiny.to_tokens("the capital of france is paris")
    q, k = 5, 3
    for m, L, h in CASES:
        table = ov_token_table(tiny, tset, m, L, top_k=7).to_pydict()
        assert len(table["src"]) == 7 * 16 * tiny.cfg.n_heads
        for feature in (2, 11):
            grad = _ov_gradient(tiny, tset, m, h, L, tokens, q, k, feature)
            rows = [(t, w) for t, d, w, hd in zip(table["src"], table["dst"], table["weight"], table["head"])
                    if d == f"L{L}/{feature}" and hd == f"L{m}H{h}"]
            expected = tiny.W_E.detach() @ grad  # every token's weight: its embedding row against the gradient
            assert [t for t, _ in rows] and {t for t, _ in rows} == set(expected.abs().topk(7).indices.tolist())
            torch.testing.assert_close(torch.tensor([w for _, w in rows]), expected[[t for t, _ in rows]], rtol=1e-4, atol=1e-5)
