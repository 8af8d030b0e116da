"""The ingest job end to end on tiny models: parts, token edges against brute force (kills and resume: test_recovery)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from circuit_catalog.catalog import layout
from circuit_catalog.catalog.ids import feature_id
from circuit_catalog.ingest.job import build_manifest, run_ingest
from circuit_catalog.ingest.settings import IngestSettings
from circuit_catalog.ingest.residual import normalise_as_read_by
from circuit_catalog.ingest.token_edges import extended_embedding, extended_embedding_for

from circuit_catalog.errors import CatalogDirError
from tests.conftest import random_transcoders


def ingest(model, tset, root, **kw):
    settings = IngestSettings(**{"top_k": 4, "token_top_k": 5, **kw})
    return run_ingest(model, tset, root, build_manifest(model, "tiny", tset, "mem", settings), progress=False)


def test_catalog_parts_and_counts(tiny, tmp_path):
    tset = random_transcoders(tiny, d_sae=16)
    manifest = ingest(tiny, tset, tmp_path)
    assert manifest.status == "complete"
    n_layers = tiny.cfg.n_layers
    assert manifest.counts == {
        "features": 16 * n_layers,
        "tokens": tiny.cfg.d_vocab,
        "pullback_edges": 4 * 16 * n_layers * (n_layers - 1) // 2,
        "deembed_edges": 2 * 5 * 16 * n_layers,
        "logit_edges": 5 * 16 * n_layers,
    }
    features = pq.read_table(tmp_path / layout.FEATURES).to_pylist()
    assert [f["id"] for f in features[:2]] == ["L0/0", "L0/1"]
    on_disk = json.loads((tmp_path / layout.MANIFEST).read_text())
    assert on_disk["layers"] == list(range(n_layers)) and on_disk["top_k"] == 4


def test_token_edges_match_brute_force(tiny, tmp_path):
    tset = random_transcoders(tiny, d_sae=10)
    ingest(tiny, tset, tmp_path)
    layer, feature = tiny.cfg.n_layers - 1, 6
    fid = feature_id(layer, feature)
    deembed = pq.read_table(layout.deembed_part(tmp_path, layer)).to_pylist()
    raw = {r["src"]: r["weight"] for r in deembed if r["dst"] == fid and r["variant"] == "raw"}
    expected = (tiny.W_E @ tset[layer].W_enc[:, feature]).topk(5)
    assert set(raw) == set(expected.indices.tolist())
    torch.testing.assert_close(torch.tensor(sorted(raw.values(), reverse=True)), expected.values, rtol=1e-5, atol=1e-6)
    for L in (0, layer):  # extended: what the model's own blocks hand each layer's reader (see below)
        rows = pq.read_table(layout.deembed_part(tmp_path, L)).to_pylist()
        got_ext = {r["src"]: r["weight"] for r in rows if r["dst"] == feature_id(L, feature) and r["variant"] == "extended"}
        expected_ext = (alone_with_mlp0_only(tiny, tset[L].cfg.hook_in) @ tset[L].W_enc[:, feature]).topk(5)
        assert set(got_ext) == set(expected_ext.indices.tolist()), f"layer {L}"
        torch.testing.assert_close(torch.tensor(sorted(got_ext.values(), reverse=True)), expected_ext.values, rtol=1e-4, atol=1e-5)
    logits = {r["dst"]: r["weight"] for r in pq.read_table(layout.logit_part(tmp_path, layer)).to_pylist() if r["src"] == fid}
    W_dec = tset[layer].W_dec[feature]
    if tiny.cfg.normalization_type == "LNPre":
        W_dec = W_dec - W_dec.mean()
    expected_logits = (W_dec @ tiny.W_U).topk(5)
    assert set(logits) == set(expected_logits.indices.tolist())


@torch.no_grad()
def alone_with_mlp0_only(model, hook: str) -> torch.Tensor:
    """[d_vocab, d_model]: `hook` when every token runs alone through the model's own blocks with the
    extended de-embedding's definition imposed by hooks: no position embedding, no attention output, and
    no MLP output but MLP0's. Independent of `ingest/token_edges.py`."""
    layer = int(hook.split(".")[1])
    zero = lambda act, hook: torch.zeros_like(act)  # noqa: E731
    hooks = [(f"blocks.{i}.hook_attn_out", zero) for i in range(model.cfg.n_layers)]
    hooks += [(f"blocks.{i}.hook_mlp_out", zero) for i in range(1, layer)]
    if "hook_pos_embed" in model.hook_dict:
        hooks.append(("hook_pos_embed", zero))
    captured = {}
    hooks.append((hook, lambda act, hook: captured.__setitem__("x", act[:, 0])))
    model.run_with_hooks(torch.arange(model.cfg.d_vocab)[:, None], fwd_hooks=hooks, stop_at_layer=layer + 1)
    return captured["x"]


@pytest.mark.parametrize("hook", ["ln2.hook_normalized", "hook_resid_mid"])
def test_extended_embedding_is_what_each_reader_sees(tiny, hook):
    """A layer-0 reader sees the embedding alone (it reads before MLP0); later ones embedding + MLP0."""
    ext = extended_embedding(tiny)
    for layer in range(tiny.cfg.n_layers):
        tc = random_transcoders(tiny, d_sae=4, layers=[layer])[layer]
        tc.cfg.hook_in = f"blocks.{layer}.{hook}"
        got = normalise_as_read_by(tiny, tc, extended_embedding_for(tiny, tc, ext))
        torch.testing.assert_close(got, alone_with_mlp0_only(tiny, tc.cfg.hook_in), rtol=1e-4, atol=1e-5, msg=f"layer {layer}")


def test_rerun_with_other_settings_is_refused(gpt2, tmp_path):
    tset = random_transcoders(gpt2, d_sae=8)
    ingest(gpt2, tset, tmp_path)
    with pytest.raises(CatalogDirError, match="top_k"):
        ingest(gpt2, tset, tmp_path, top_k=5)
