"""Training on a tiny model: saved SAELens transcoders learn something, and the reported FVU is true."""

from __future__ import annotations

import pytest
import torch
from circuit_catalog.ingest.datasets import token_contexts
from circuit_catalog.ingest.train import TrainConfig, reusable, train_transcoders
from circuit_catalog.ingest.transcoder_formats import load_transcoders

from tests.conftest import DEVICES


def test_train_saves_reports_and_reuses(gpt2, text_file, tmp_path):
    cfg = TrainConfig(model="tiny", dataset=str(text_file), layers=[0, 2], d_sae=64, n_tokens=3000, ctx_len=32,
                      batch_contexts=8, minibatch=64, epochs=4, lr=2e-3, l1_coefficient=0.01, eval_tokens=256)
    out = tmp_path / "tc"
    result = train_transcoders(gpt2, cfg, out, progress=False)
    tset = load_transcoders(out)
    assert tset.layers == [0, 2] and tset.format == "saelens"
    assert all(tc.W_dec.norm(dim=-1).sub(1).abs().max() < 1e-4 for tc in tset)  # unit-norm decoder rows

    check_reported_metrics(gpt2, text_file, cfg, tset, result)
    assert reusable(out, cfg).metrics == result.metrics
    assert reusable(out, TrainConfig(**{**cfg.__dict__, "seed": 1})) is None
    assert reusable(out, TrainConfig(**{**cfg.__dict__, "dtype": "bfloat16"})) is None


def check_reported_metrics(gpt2, text_file, cfg, tset, result) -> None:
    """Recompute FVU and L0 on the held-out contexts with a plain forward pass on the CPU, independently of train.py."""
    held_out = token_contexts(gpt2.tokenizer, str(text_file), cfg.n_tokens + cfg.eval_tokens, cfg.ctx_len)[:cfg.eval_tokens // cfg.ctx_len]
    _, cache = gpt2.run_with_cache(held_out)
    for m in result.metrics:
        x = cache[f"blocks.{m.layer}.ln2.hook_normalized"][:, 1:].reshape(-1, 32)
        y = cache[f"blocks.{m.layer}.hook_mlp_out"][:, 1:].reshape(-1, 32)
        z = tset[m.layer].encode(x)
        fvu = (tset[m.layer].decode(z) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
        assert abs(m.fvu - fvu.item()) < 1e-3
        assert abs(m.l0 - (z > 0).float().sum(-1).mean().item()) < 1e-3
        assert m.fvu < 0.9, "training should beat the mean predictor clearly"


@pytest.mark.parametrize("device", DEVICES)
def test_training_on_each_device(gpt2, model_on, text_file, tmp_path, device):
    """The model's forward passes and the training on `device` (the buffer in host memory): the saved transcoders'
    reported figures are true on the CPU, and close to a CPU run's (same seed: same start and minibatches)."""
    cfg = TrainConfig(model="tiny", dataset=str(text_file), layers=[0, 2], d_sae=64, n_tokens=3000, ctx_len=32,
                      batch_contexts=8, minibatch=64, epochs=4, lr=2e-3, l1_coefficient=0.01, eval_tokens=256)
    here = train_transcoders(model_on("gpt2", device), cfg, tmp_path / "here", progress=False)
    check_reported_metrics(gpt2, text_file, cfg, load_transcoders(tmp_path / "here"), here)
    cpu = train_transcoders(gpt2, cfg, tmp_path / "cpu", progress=False)
    assert [m.fvu for m in here.metrics] == pytest.approx([m.fvu for m in cpu.metrics], abs=0.02)


def test_training_is_deterministic_for_a_seed(gpt2, text_file, tmp_path):
    cfg = TrainConfig(model="tiny", dataset=str(text_file), layers=[1], d_sae=16, n_tokens=600, ctx_len=32,
                      batch_contexts=8, minibatch=32, eval_tokens=64)
    a = train_transcoders(gpt2, cfg, tmp_path / "a", progress=False)
    b = train_transcoders(gpt2, cfg, tmp_path / "b", progress=False)
    assert a.metrics == b.metrics
    torch.testing.assert_close(load_transcoders(tmp_path / "a")[1].W_enc, load_transcoders(tmp_path / "b")[1].W_enc)


def test_skip_transcoders_train_save_and_beat_plain_ones(gpt2, text_file, tmp_path):
    """Same budget with and without the skip path: the skip one saves as skip_transcoder and fits better."""
    import json

    base = dict(model="tiny", dataset=str(text_file), layers=[1], d_sae=16, n_tokens=2000, ctx_len=32, batch_contexts=8,
                minibatch=64, epochs=3, lr=2e-3, l1_coefficient=0.01, eval_tokens=256)
    plain = train_transcoders(gpt2, TrainConfig(**base), tmp_path / "plain", progress=False)
    skip = train_transcoders(gpt2, TrainConfig(**base, skip=True), tmp_path / "skip", progress=False)
    assert json.loads((tmp_path / "skip" / "layer_1" / "cfg.json").read_text())["architecture"] == "skip_transcoder"
    loaded = load_transcoders(tmp_path / "skip")[1]
    assert loaded.W_skip is not None and loaded.W_skip.abs().sum() > 0
    assert skip.metrics[0].fvu < plain.metrics[0].fvu
