"""Pullbacks: exact selection against brute force, and the stored weight against autograd on a real
forward pass with attention and norm scales frozen and only the residual path left open."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from circuit_catalog.catalog.ids import feature_id
from circuit_catalog.catalog.layout import pullback_part
from circuit_catalog.ingest.job import pullback_table
from circuit_catalog.ingest.settings import IngestSettings
from circuit_catalog.ingest.pullbacks import select_edges

from tests.conftest import DEVICES, arch_of, random_transcoders, with_skip


def brute_force(W_dec, W_enc, top_k, min_weight):
    full = W_dec @ W_enc  # [n_src, n_dst]
    kept = set()
    for f in range(full.shape[1]):
        col = full[:, f]
        order = col.abs().argsort(descending=True)
        candidates = order[:top_k] if top_k is not None else order
        for i in candidates.tolist():
            if min_weight is None or abs(col[i]) >= min_weight:
                kept.add((i, f))
    return full, kept


@pytest.mark.parametrize("top_k, min_weight, block", [(5, None, 7), (None, 1.5, 4), (3, 0.8, 100), (50, None, 13)])
def test_selection_is_exact(top_k, min_weight, block):
    g = torch.Generator().manual_seed(0)
    W_dec, W_enc = torch.randn(40, 12, generator=g), torch.randn(12, 31, generator=g)
    full, expected = brute_force(W_dec, W_enc, top_k, min_weight)
    got = {}
    for b in select_edges(W_dec, W_enc, top_k, min_weight, block=block):
        for s, d, w in zip(b.src.tolist(), b.dst.tolist(), b.weight.tolist()):
            assert (s, d) not in got
            got[(s, d)] = w
    assert set(got) == expected
    for (s, d), w in got.items():
        assert w == pytest.approx(full[s, d].item(), rel=1e-5, abs=1e-6)


def test_selection_needs_a_criterion():
    with pytest.raises(ValueError):
        next(select_edges(torch.zeros(2, 2), torch.zeros(2, 2), None, None))


def _frozen_gradient(model, tset, lo, hi, tokens, pos, feature):
    """d(pre-activation of `feature` at layer hi) / d(z at layer lo), both at `pos`, times the frozen scale.

    Built from hooks only: layer lo's MLP output is replaced by its transcoder's reconstruction from
    a leaf z plus the detached error; every attention and MLP output between the two layers and the
    norm scale at layer hi are detached, so only the residual path carries gradient.
    """
    state = {}

    def capture_in(act, hook):
        state["x_lo"] = act.detach()
        return act

    def splice(act, hook):
        tc = tset[lo]
        z = tc.encode(state["x_lo"]).detach().requires_grad_(True)
        state["z"] = z
        recon = tc.decode(z, state["x_lo"])
        return recon + (act - recon).detach()

    def detach(act, hook):
        return act.detach()

    def capture_scale(act, hook):
        state["scale"] = act.detach()
        return act.detach()

    def capture_out(act, hook):
        state["x_hi"] = act
        return act

    hooks = [(f"blocks.{lo}.ln2.hook_normalized", capture_in), (f"blocks.{lo}.hook_mlp_out", splice)]
    hooks += [(f"blocks.{m}.hook_attn_out", detach) for m in range(lo + 1, hi + 1)]
    hooks += [(f"blocks.{m}.hook_mlp_out", detach) for m in range(lo + 1, hi)]
    hooks += [(f"blocks.{hi}.ln2.hook_scale", capture_scale), (f"blocks.{hi}.ln2.hook_normalized", capture_out)]
    with torch.enable_grad():
        model.run_with_hooks(tokens, fwd_hooks=hooks, stop_at_layer=hi + 1)
        pre = state["x_hi"][0, pos] @ tset[hi].W_enc[:, feature] + tset[hi].b_enc[feature]
        (grad,) = torch.autograd.grad(pre, state["z"])
    # gradient flows only into z at the same position (no attention path): check, then rescale
    others = torch.cat([grad[0, :pos], grad[0, pos + 1 :]])
    assert others.abs().max() == 0
    return grad[0, pos] * state["scale"][0, pos, 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lo, hi", [(0, 1), (0, 2), (1, 2)])
def test_stored_pullback_equals_frozen_autograd_gradient(tiny, model_on, tmp_path, lo, hi, device):
    """On each device (the pullbacks and the autograd reference both computed there)."""
    model = model_on(arch_of(tiny), device)
    tset = random_transcoders(tiny, d_sae=24, seed=lo * 10 + hi).to(device)
    settings = IngestSettings(top_k=24, min_weight=None)  # keep every edge so each one can be compared
    path = pullback_part(tmp_path, lo, hi)
    path.parent.mkdir(parents=True)
    pq.write_table(pullback_table(model, tset, lo, hi, settings), path)
    stored = {(r["src"], r["dst"]): r["weight"] for r in pq.read_table(path).to_pylist()}
    assert len(stored) == 24 * 24
    tokens = model.to_tokens("the capital of france is paris")
    for feature in (0, 7, 23):
        grad = _frozen_gradient(model, tset, lo, hi, tokens, pos=3, feature=feature)
        weights = torch.tensor([stored[(feature_id(lo, i), feature_id(hi, feature))] for i in range(24)])
        torch.testing.assert_close(weights, grad.cpu(), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def _direct_path_pre_acts(model, tset, lo, hi, tokens, pos, add):
    """Layer hi's pre-activations at `pos` when `add` joins layer lo's MLP output there, with attention outputs,
    the MLP outputs (skip paths included) of the layers in between and hi's norm scale held at the clean run's."""
    _, cache = model.run_with_cache(tokens)
    seen = {}

    def frozen(value, hook):
        return cache[hook.name]

    def inject(value, hook):
        value = value.clone()
        value[0, pos] += add
        return value

    hooks = [(f"blocks.{lo}.hook_mlp_out", inject)]
    hooks += [(f"blocks.{m}.hook_attn_out", frozen) for m in range(lo + 1, hi + 1)]
    hooks += [(f"blocks.{m}.hook_mlp_out", frozen) for m in range(lo + 1, hi)]
    hooks += [(f"blocks.{hi}.ln2.hook_scale", frozen),
              (f"blocks.{hi}.ln2.hook_normalized", lambda value, hook: seen.setdefault("x", value[0, pos]))]
    model.run_with_hooks(tokens, fwd_hooks=hooks, stop_at_layer=hi + 1)
    return tset[hi].pre_acts(seen["x"]), cache[f"blocks.{hi}.ln2.hook_scale"][0, pos, 0]


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
def test_stored_pullback_is_the_direct_path_under_intervention(tiny, skip):
    """One unit of each source feature added at layer 0, read at layer 2 across a layer (with a skip path when
    `skip`): the change in every later pre-activation, times the frozen scale, is the stored weight."""
    lo, hi, d_sae = 0, 2, 24
    tset = random_transcoders(tiny, d_sae=d_sae, seed=21)
    if skip:
        with_skip(tset)
    table = pullback_table(tiny, tset, lo, hi, IngestSettings(top_k=d_sae, min_weight=None)).to_pydict()
    stored = {(s, d): w for s, d, w in zip(table["src"], table["dst"], table["weight"])}
    tokens, pos = tiny.to_tokens("the capital of france is paris"), 4
    base, scale = _direct_path_pre_acts(tiny, tset, lo, hi, tokens, pos, torch.zeros(tiny.cfg.d_model))
    for i in range(d_sae):
        changed, _ = _direct_path_pre_acts(tiny, tset, lo, hi, tokens, pos, tset[lo].W_dec[i])
        expected = torch.tensor([stored[(feature_id(lo, i), feature_id(hi, f))] for f in range(d_sae)])
        torch.testing.assert_close((changed - base) * scale, expected, rtol=1e-4, atol=1e-5)


def kept(blocks) -> dict[tuple[int, int], float]:
    """(src, dst) -> weight of `select_edges`' blocks, read on the CPU."""
    return {(s, d): w for b in blocks for s, d, w in zip(b.src.tolist(), b.dst.tolist(), b.weight.tolist())}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("top_k, min_weight", [(8, None), (None, 1.0), (8, 0.8)])
def test_bf16_scores_choose_candidates_and_float32_weights_are_stored(top_k, min_weight, device):
    """bfloat16 scores pick the candidates; the stored weights are float32 recomputations, and the kept set is
    float32's except for weights within bf16's error of the cut (here: of the K-th weight, or of min_weight).
    Selected on each device, held to the float32 CPU selection."""
    g = torch.Generator().manual_seed(3)
    W_dec, W_enc = torch.randn(300, 64, generator=g), torch.randn(64, 40, generator=g) / 4
    full = W_dec @ W_enc
    bound = 2**-7 * (W_dec.abs() @ W_enc.abs())  # |bf16 score - float32 score| stays under this
    exact = kept(select_edges(W_dec, W_enc, top_k, min_weight, block=16))
    rough = kept(select_edges(W_dec.to(device), W_enc.to(device), top_k, min_weight, block=16, score_dtype=torch.bfloat16))
    for (s, d), w in rough.items():
        assert w == pytest.approx(float(full[s, d]), rel=1e-5, abs=1e-6)  # float32, not bf16
    differing = set(exact) ^ set(rough)
    assert len(differing) <= 0.05 * len(exact)
    for s, d in differing:
        column = full[:, d].abs()
        cut = column.topk(top_k).values[-1] if top_k is not None else torch.tensor(min_weight)
        if top_k is not None and min_weight is not None:
            cut = torch.maximum(cut, torch.tensor(min_weight))
        assert abs(float(column[s]) - float(cut)) <= 2 * float(bound[:, d].max()), (s, d)
