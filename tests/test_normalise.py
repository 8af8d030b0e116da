"""Scale-normalised pullback weights (`--normalise`): the recorded E[1/norm scale] of each reading layer against a
direct computation from the residual stream, the normalised weight times the source's mean activation against the
mean direct attribution by autograd over the statistics' tokens, and the ordering on a model whose layers' norm scales
differ by construction."""

from __future__ import annotations

import copy
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from circuit_catalog.catalog import layout
from circuit_catalog.errors import CatalogDirError
from circuit_catalog.ingest.job import build_manifest, plan_stats, run_ingest, run_stats
from circuit_catalog.ingest.settings import IngestSettings
from circuit_catalog.ingest.residual import as_read_by, centres
from circuit_catalog.queries.catalog import Catalog

from tests.conftest import random_transcoders

N_TOKENS, CTX = 600, 16


def ingest(model, tset, root):
    run_ingest(model, tset, root, build_manifest(model, "tiny", tset, "mem", IngestSettings(top_k=6, token_top_k=3)), progress=False)
    return root


@pytest.fixture(scope="module")
def scaled(tiny, tmp_path_factory, text_file):
    """(model, transcoders, catalog dir): a tiny GPT-2 (LayerNorm) or Llama (RMSNorm) with statistics."""
    tset = random_transcoders(tiny, d_sae=24, seed=3)
    root = ingest(tiny, tset, tmp_path_factory.mktemp("normalise"))
    assert run_stats(tiny, tset, root, str(text_file), N_TOKENS, ctx_len=CTX, top_k=5, progress=False)
    return tiny, tset, root


def stats_tokens(root) -> torch.Tensor:
    """[n_contexts, ctx_len]: the tokens the statistics were collected over."""
    t = pq.read_table(layout.stats_file(root, "tokens")).sort_by([("context", "ascending"), ("pos", "ascending")])
    return torch.tensor(t["token_id"].to_numpy()).view(-1, CTX)


def inverse_scales(model, resid: torch.Tensor) -> torch.Tensor:
    """1 / the norm's denominator, from its formula (not the hook): sqrt(mean of squares (of the centred vector for a
    LayerNorm) + eps)."""
    x = resid.double()
    if centres(model):
        x = x - x.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1) + model.cfg.eps).rsqrt()


def test_recorded_scale_is_the_mean_inverse_norm_scale(scaled):
    """stats/layers.parquet inv_scale = mean over the statistics' tokens, BOS left out, of 1 / the norm scale at each
    transcoder's input, computed here from the residual stream by the norm's formula; float32 forward passes, so
    rel 1e-5. features.parquet carries each layer's value on its features."""
    model, tset, root = scaled
    tokens = stats_tokens(root)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_mid"))
    layers = {r["layer"]: r for r in pq.read_table(layout.stats_file(root, "layers")).to_pylist()}
    assert sorted(layers) == tset.layers
    for tc in tset:
        expected = inverse_scales(model, cache[f"blocks.{tc.layer}.hook_resid_mid"][:, 1:]).mean().item()
        assert layers[tc.layer]["inv_scale"] == pytest.approx(expected, rel=1e-5)
        assert layers[tc.layer]["hook_scale"] == f"blocks.{tc.layer}.ln2.hook_scale"
    features = pq.read_table(root / layout.FEATURES).to_pylist()
    assert all(f["inv_scale"] == layers[f["layer"]]["inv_scale"] for f in features)


def direct_attributions(model, tset, root, src: str, dst: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per counted token (BOS left out): the source's activation a, 1 / the reader's norm scale, and the direct
    attribution a x d(reader pre-activation)/d(a) along the residual path at the reader's input with the norm scale
    frozen, by autograd through the model's own ln2 (its hook_scale detached)."""
    (lo, i), (hi, f) = (tuple(int(x) for x in fid[1:].split("/")) for fid in (src, dst))
    tokens = stats_tokens(root)
    names = (tset[lo].cfg.hook_in, f"blocks.{hi}.hook_resid_mid")
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    a = tset[lo].encode(cache[names[0]])[:, 1:, i].reshape(-1).double()
    x = cache[names[1]][:, 1:].reshape(1, -1, model.cfg.d_model)
    delta = torch.zeros(1, x.shape[1], 1, requires_grad=True)
    write = tset.total_write(lo, hi)[i]
    with model.hooks(fwd_hooks=[(f"blocks.{hi}.ln2.hook_scale", lambda t, hook: t.detach())]):
        pre = model.blocks[hi].ln2(x + delta * write) @ tset[hi].W_enc[:, f]
    (grad,) = torch.autograd.grad(pre.sum(), delta)
    inv = inverse_scales(model, x[0])
    return a.numpy(), inv.numpy(), (a * grad.reshape(-1).double()).numpy()


def test_normalised_weight_times_mean_activation_is_the_mean_direct_attribution(scaled):
    """Mean direct attribution A = mean_t[a(t) p / s(t)] = p E[a] E[1/s] + p cov(a, 1/s), so with the normalised weight
    w = p E[1/s]: A = w E[a] + p cov(a, 1/s) exactly (over the same tokens; float32 passes, rel 1e-4), and
    |A - w E[a]| <= |p| std(a) std(1/s) (Cauchy-Schwarz): the approximation's error is bounded by how much the source's
    activation and the reader's scale vary together. E[a] is the statistics' frequency x mean_act."""
    model, tset, root = scaled
    with Catalog(root, progress=False) as cat:
        src = max((f"L0/{i}" for i in range(24)), key=lambda fid: cat.stats(fid).frequency)
        for edge in cat.downstream(src, k=3, normalise=True):
            p = next(e.weight for e in cat.downstream(src, k=100) if e.feature == edge.feature)
            typical = cat.stats(src).frequency * cat.stats(src).mean_act
            a, inv, attribution = direct_attributions(model, tset, root, src, edge.feature)
            assert typical == pytest.approx(a.mean(), rel=1e-5)
            assert edge.weight == pytest.approx(p * inv.mean(), rel=1e-5)
            covariance = np.mean((a - a.mean()) * (inv - inv.mean()))
            A = attribution.mean()
            assert A == pytest.approx(edge.weight * typical + p * covariance, rel=1e-4, abs=1e-6 * abs(A) + 1e-7)
            assert abs(A - edge.weight * typical) <= abs(p) * a.std() * inv.std() * (1 + 1e-4) + 1e-7


def test_upstream_normalised_is_raw_times_the_features_own_scale(scaled):
    """Upstream edges share one reader, so normalising scales them all by its inv_scale and keeps their order."""
    _, _, root = scaled
    inv = {r["layer"]: r["inv_scale"] for r in pq.read_table(layout.stats_file(root, "layers")).to_pylist()}
    with Catalog(root, progress=False) as cat:
        raw, normalised = cat.upstream("L2/5", k=8), cat.upstream("L2/5", k=8, normalise=True)
    assert [e.feature for e in normalised] == [e.feature for e in raw] and len(raw) == 8
    assert [e.weight for e in normalised] == pytest.approx([e.weight * inv[2] for e in raw], rel=1e-6)


def test_normalised_order_does_not_favour_the_layer_of_large_norm_scale(gpt2, text_file, tmp_path):
    """A model whose layer-2 input is ~30x the size of layer 1's (MLP1's output scaled up), and readers L1/0, L2/0 of
    one source L0/0 aligned with its write, L2/0's encoder twice L1/0's: raw weights rank L2/0 first (twice the raw
    pullback), the normalised ones L1/0 (its effect per unit of L0/0 in context is the larger one, by E[1/scale])."""
    model = copy.deepcopy(gpt2)
    with torch.no_grad():
        model.blocks[1].mlp.W_out.mul_(30)
    tset = random_transcoders(model, d_sae=8, seed=4)
    direction = as_read_by(model, tset[1], tset[0].W_dec[0])
    direction = direction / direction.norm()
    tset[1].W_enc[:, 0], tset[2].W_enc[:, 0] = 5 * direction, 10 * direction
    root = ingest(model, tset, tmp_path)
    assert run_stats(model, tset, root, str(text_file), N_TOKENS, ctx_len=CTX, top_k=5, progress=False)
    inv = {r["layer"]: r["inv_scale"] for r in pq.read_table(layout.stats_file(root, "layers")).to_pylist()}
    assert inv[2] < inv[1] / 4  # the premise: layer 2's norm scale is several times layer 1's
    with Catalog(root, progress=False) as cat:
        raw, normalised = cat.downstream("L0/0", k=2), cat.downstream("L0/0", k=2, normalise=True)
    assert [e.feature for e in raw] == ["L2/0", "L1/0"]
    assert [e.feature for e in normalised] == ["L1/0", "L2/0"]
    assert [e.weight for e in normalised] == pytest.approx([raw[1].weight * inv[1], raw[0].weight * inv[2]], rel=1e-6)


def test_catalog_without_recorded_scales(gpt2, text_file, tmp_path):
    """No statistics: --normalise is refused in one line saying what to run; raw weights still answer. Statistics
    older than the scales (no `inv_scale` in info.json) are collected anew by the next ingest with a dataset."""
    tset = random_transcoders(gpt2, d_sae=8, seed=1)
    root = ingest(gpt2, tset, tmp_path)
    with Catalog(root, progress=False) as cat:
        assert len(cat.downstream("L0/1", k=3)) == 3
        with pytest.raises(CatalogDirError, match="rerun `circuit-catalog ingest` with --dataset"):
            cat.downstream("L0/1", k=3, normalise=True)
    assert run_stats(gpt2, tset, root, str(text_file), 200, ctx_len=CTX, top_k=5, progress=False)
    assert plan_stats(gpt2, tset, root, str(text_file), 200, ctx_len=CTX, top_k=5).done
    info = json.loads(layout.stats_info(root).read_text())
    del info["inv_scale"], info["parts"][layout.parquet_name("layers")]  # as statistics from before the scales
    layout.stats_info(root).write_text(json.dumps(info))
    layout.stats_file(root, "layers").unlink()
    assert not plan_stats(gpt2, tset, root, str(text_file), 200, ctx_len=CTX, top_k=5).done


def test_extended_deembedding_is_the_raw_one_over_the_tokens_own_norm_scale(scaled):
    """Why the two de-embedding lists are on different scales: for a layer-0 feature (its extended embedding is the
    embedding alone) the stored extended weight is W_E[t] . W_enc[:, f] (centred for a LayerNorm) divided by the norm
    scale of W_E[t] itself, as if the token were the whole residual, while the raw weight has no scale at all; float32
    products, so rel 1e-4."""
    model, tset, root = scaled
    rows = pq.read_table(layout.deembed_part(root, 0)).to_pylist()
    W_E, W_enc = model.W_E.detach(), tset[0].W_enc.detach()
    for r in rows:
        t, f = r["src"], int(r["dst"].split("/")[1])
        if r["variant"] == "raw":
            assert r["weight"] == pytest.approx((W_E[t] @ W_enc[:, f]).item(), rel=1e-4, abs=1e-6)
        else:
            centred = (as_read_by(model, tset[0], W_E[t]) @ W_enc[:, f]).item()
            assert r["weight"] == pytest.approx(centred * inverse_scales(model, W_E[t]).item(), rel=1e-4, abs=1e-6)
    assert {r["variant"] for r in rows} == {"raw", "extended"}
