"""The ingest job end to end on tiny models: parts, token edges against brute force (kills and resume: test_recovery)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from catalog import layout
from catalog.errors import CatalogDirError
from ingest.job import IngestSettings, build_manifest, run_ingest
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
    fid = f"L{layer}/{feature}"
    deembed = pq.read_table(layout.deembed_part(tmp_path, layer)).to_pylist()
    raw = {r["src"]: r["weight"] for r in deembed if r["dst"] == fid and r["variant"] == "raw"}
    expected = (tiny.W_E @ tset[layer].W_enc[:, feature]).topk(5)
    assert set(raw) == set(expected.indices.tolist())
    torch.testing.assert_close(torch.tensor(sorted(raw.values(), reverse=True)), expected.values, rtol=1e-5, atol=1e-6)
    # extended: run each token alone through embedding + MLP0 by hand, then the reader's norm
    with torch.no_grad():
        block0 = tiny.blocks[0]
        e = tiny.W_E[:, None, :]
        ext = (e + block0.mlp(block0.ln2(e)))[:, 0]
        normed = ext - ext.mean(-1, keepdim=True) if tiny.cfg.normalization_type == "LNPre" else ext
        normed = normed / normed.pow(2).mean(-1, keepdim=True).add(tiny.cfg.eps).sqrt()
        expected_ext = (normed @ tset[layer].W_enc[:, feature]).topk(5)
    got_ext = {r["src"]: r["weight"] for r in deembed if r["dst"] == fid and r["variant"] == "extended"}
    assert set(got_ext) == set(expected_ext.indices.tolist())
    logits = {r["dst"]: r["weight"] for r in pq.read_table(layout.logit_part(tmp_path, layer)).to_pylist() if r["src"] == fid}
    W_dec = tset[layer].W_dec[feature]
    if tiny.cfg.normalization_type == "LNPre":
        W_dec = W_dec - W_dec.mean()
    expected_logits = (W_dec @ tiny.W_U).topk(5)
    assert set(logits) == set(expected_logits.indices.tolist())


def test_rerun_with_other_settings_is_refused(gpt2, tmp_path):
    tset = random_transcoders(gpt2, d_sae=8)
    ingest(gpt2, tset, tmp_path)
    with pytest.raises(CatalogDirError, match="top_k"):
        ingest(gpt2, tset, tmp_path, top_k=5)
