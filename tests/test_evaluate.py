"""Evaluation figures against direct computations: an exact stand-in recovers all CE loss."""

from __future__ import annotations

import pytest
import torch

from ingest.datasets import token_contexts
from ingest.evaluate import evaluate_transcoders
from ingest.models import load_model
from ingest.transcoder import Transcoder, TranscoderConfig, TranscoderSet
from tests.conftest import build_hf_model, random_transcoders


@pytest.fixture(scope="module")
def relu_gpt2(tmp_path_factory):
    """A tiny GPT-2 whose MLPs use ReLU, so a transcoder can reproduce them exactly."""
    from transformers import GPT2Config

    path = tmp_path_factory.mktemp("relu-gpt2")
    build_hf_model(path, "gpt2")
    cfg = GPT2Config.from_pretrained(path)
    cfg.activation_function = "relu"
    cfg.save_pretrained(path)
    return load_model(str(path))


def exact_transcoders(model) -> TranscoderSet:
    """relu(x @ W_in + b_in) @ W_out + b_out is a ReLU transcoder: copy the MLP's weights into one."""
    out = {}
    for layer, block in enumerate(model.blocks):
        mlp = block.mlp
        cfg = TranscoderConfig(layer, model.cfg.d_model, model.cfg.d_mlp, model.cfg.d_model,
                               f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out")
        out[layer] = Transcoder(cfg, mlp.W_in.detach().clone(), mlp.b_in.detach().clone(), mlp.W_out.detach().clone(), mlp.b_out.detach().clone())
    return TranscoderSet(out)


def direct_ce(model, tokens) -> float:
    logits = model(tokens)
    logp = logits[:, 1:-1].log_softmax(-1)
    return -logp.gather(-1, tokens[:, 2:, None]).mean().item()


def test_exact_transcoders_recover_everything(relu_gpt2, text_file):
    tokens = token_contexts(relu_gpt2.tokenizer, str(text_file), 256, 16)
    result = evaluate_transcoders(relu_gpt2, exact_transcoders(relu_gpt2), tokens, progress=False)
    assert result.ce_original == pytest.approx(direct_ce(relu_gpt2, tokens), rel=1e-5)
    for layer in result.layers:
        assert layer.fvu < 1e-8
        assert layer.ce_recovered == pytest.approx(1.0, abs=1e-4)
        assert layer.ablations.kl_replaced == pytest.approx(0.0, abs=1e-5)
    assert result.ce_recovered_all == pytest.approx(1.0, abs=1e-4)


def test_ablations_match_direct_forward_passes(gpt2, text_file):
    tokens = token_contexts(gpt2.tokenizer, str(text_file), 256, 16)
    tset = random_transcoders(gpt2, d_sae=16)
    result = evaluate_transcoders(gpt2, tset, tokens, progress=False)

    def zero_layer(act, hook):
        act = act.clone()
        act[:, 1:] = 0
        return act

    logits = gpt2.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mlp_out", zero_layer)])
    logp = logits[:, 1:-1].log_softmax(-1)
    expected_zero = -logp.gather(-1, tokens[:, 2:, None]).mean().item()
    assert result.layers[1].ablations.ce_zero == pytest.approx(expected_zero, rel=1e-5)
    _, cache = gpt2.run_with_cache(tokens)
    x, y = cache["blocks.1.ln2.hook_normalized"][:, 1:], cache["blocks.1.hook_mlp_out"][:, 1:]
    fvu = (tset[1].forward(x) - y).pow(2).sum() / (y - y.mean((0, 1))).pow(2).sum()
    assert result.layers[1].fvu == pytest.approx(fvu.item(), rel=1e-4)
    assert result.layers[1].dead + result.layers[1].live == 16
    assert torch.isfinite(torch.tensor(result.ce_recovered_all))
