"""Evaluation figures against direct computations: an exact stand-in recovers all CE loss, and every
figure of an inexact one equals the same quantity measured with TransformerLens hooks written out here."""

from __future__ import annotations

import pytest
import torch
from circuit_catalog.ingest.datasets import token_contexts
from circuit_catalog.ingest.evaluate import evaluate_transcoders
from circuit_catalog.ingest.models import load_model
from circuit_catalog.ingest.transcoder import Transcoder, TranscoderConfig, TranscoderSet

from tests.conftest import DEVICES, build_hf_model, random_transcoders


@pytest.fixture(scope="module")
def relu_gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 whose MLPs use ReLU, so a transcoder can reproduce them exactly."""
    from transformers import GPT2Config

    path = tmp_path_factory.mktemp("relu-gpt2")
    build_hf_model(path, "gpt2")
    cfg = GPT2Config.from_pretrained(path)
    cfg.activation_function = "relu"
    cfg.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def relu_gpt2(relu_gpt2_dir):
    return load_model(str(relu_gpt2_dir), device="cpu")


def exact_transcoders(model) -> TranscoderSet:
    """relu(x @ W_in + b_in) @ W_out + b_out is a ReLU transcoder: copy the MLP's weights into one."""
    out = {}
    for layer, block in enumerate(model.blocks):
        mlp = block.mlp
        cfg = TranscoderConfig(layer=layer, d_in=model.cfg.d_model, d_sae=model.cfg.d_mlp, d_out=model.cfg.d_model,
                               hook_in=f"blocks.{layer}.ln2.hook_normalized", hook_out=f"blocks.{layer}.hook_mlp_out")
        out[layer] = Transcoder(cfg, mlp.W_in.detach().clone(), mlp.b_in.detach().clone(), mlp.W_out.detach().clone(), mlp.b_out.detach().clone())
    return TranscoderSet(out)


def inexact_transcoders(model) -> TranscoderSet:
    """The exact transcoders with every other feature's decoder row zeroed: half of each MLP is missing."""
    tset = exact_transcoders(model)
    for tc in tset:
        tc.W_dec[1::2] = 0
    return tset


def direct_ce(model, tokens, fwd_hooks=()) -> float:
    """Mean CE of predicting tokens[:, 2:] (not from BOS) in one forward pass with `fwd_hooks`, on the model's device."""
    tokens = tokens.to(model.W_E.device)
    logits = model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks))
    logp = logits[:, 1:-1].log_softmax(-1)
    return -logp.gather(-1, tokens[:, 2:, None]).mean().item()


@pytest.mark.parametrize("device", DEVICES)
def test_exact_transcoders_recover_everything(relu_gpt2_dir, text_file, device):
    """On each device: the replaced, zero- and mean-ablated passes all run there (the tokens on the CPU until then)."""
    model = load_model(str(relu_gpt2_dir), device=device)
    tokens = token_contexts(model.tokenizer, str(text_file), 256, 16)
    result = evaluate_transcoders(model, exact_transcoders(model), tokens, progress=False)
    assert result.ce_original == pytest.approx(direct_ce(model, tokens), rel=1e-5)
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

    expected_zero = direct_ce(gpt2, tokens, [("blocks.1.hook_mlp_out", zero_layer)])
    assert result.layers[1].ablations.ce_zero == pytest.approx(expected_zero, rel=1e-5)
    _, cache = gpt2.run_with_cache(tokens)
    x, y = cache["blocks.1.ln2.hook_normalized"][:, 1:], cache["blocks.1.hook_mlp_out"][:, 1:]
    fvu = (tset[1].forward(x) - y).pow(2).sum() / (y - y.mean((0, 1))).pow(2).sum()
    assert result.layers[1].fvu == pytest.approx(fvu.item(), rel=1e-4)
    assert result.layers[1].dead + result.layers[1].live == 16
    assert torch.isfinite(torch.tensor(result.ce_recovered_all))


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over predicting positions of KL(p || q) of the next-token distributions."""
    p, q = p_logits[:, 1:-1].log_softmax(-1), q_logits[:, 1:-1].log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@torch.no_grad()
def test_inexact_transcoder_figures_match_direct_forward_passes(relu_gpt2, text_file):
    """MSE (squared error summed over d_model, per token), FVU, CE replaced / zero- / mean-ablated, KL and CE
    recovered, per layer and all layers at once, each against hooks on the tiny ReLU GPT-2 (BOS left as it
    was). The model is random, so CE recovered is no quality figure here (it can leave [0, 1]); what matters
    is that each part is measured independently and tightly enough to tell the variants apart that a bug
    would produce (the KL's direction is checked below; mean ablation over BOS too, or of BOS, moves
    ce_mean by far more than the tolerance)."""
    model, tset = relu_gpt2, inexact_transcoders(relu_gpt2)
    tokens = token_contexts(model.tokenizer, str(text_file), 256, 16)
    result = evaluate_transcoders(model, tset, tokens, batch_contexts=5, progress=False)  # 16 contexts: 4 uneven batches
    original, cache = model.run_with_cache(tokens)
    n_layers = model.cfg.n_layers
    means = {}
    for layer in range(n_layers):
        x, y = cache[f"blocks.{layer}.ln2.hook_normalized"][:, 1:], cache[f"blocks.{layer}.hook_mlp_out"][:, 1:]
        err = (tset[layer].forward(x) - y).pow(2).sum(-1)
        means[layer] = y.reshape(-1, y.shape[-1]).mean(0)
        got = result.layers[layer]
        assert got.mse == pytest.approx(err.mean().item(), rel=1e-5)
        assert got.fvu == pytest.approx(err.sum().item() / (y - means[layer]).pow(2).sum().item(), rel=1e-5)
        assert got.fvu > 0.5  # far from exact

    def hooks(layers: list[int], how: str) -> list:
        """Replace `layers`' MLP outputs after BOS: by the transcoder on the input of this same pass, or
        by zero, or by the MLP's mean output over the evaluation tokens (BOS excluded)."""
        inputs, out = {}, []
        for L in layers:
            def keep(act, hook, L=L):
                inputs[L] = act

            def put(act, hook, L=L):
                act = act.clone()
                act[:, 1:] = {"replace": lambda: tset[L].forward(inputs[L][:, 1:]), "zero": lambda: 0.0,
                              "mean": lambda: means[L]}[how]()
                return act
            out += [(f"blocks.{L}.ln2.hook_normalized", keep), (f"blocks.{L}.hook_mlp_out", put)]
        return out

    ce_original = direct_ce(model, tokens)
    assert result.ce_original == pytest.approx(ce_original, rel=1e-5)
    cases = [(result.layers[L].ablations, [L]) for L in range(n_layers)] + [(result.all_layers, list(range(n_layers)))]
    recovered = []
    for got, layers in cases:
        ce = {how: direct_ce(model, tokens, hooks(layers, how)) for how in ("replace", "zero", "mean")}
        assert (got.ce_replaced, got.ce_zero, got.ce_mean) == pytest.approx((ce["replace"], ce["zero"], ce["mean"]), rel=1e-5), layers
        replaced = model.run_with_hooks(tokens, fwd_hooks=hooks(layers, "replace"))
        forward_kl, reverse_kl = kl(original, replaced), kl(replaced, original)
        assert got.kl_replaced == pytest.approx(forward_kl, rel=1e-5), layers
        assert forward_kl > 1e-3 and abs(reverse_kl - forward_kl) > 1e-3 * forward_kl, layers  # inexact; direction visible
        recovered.append((ce["mean"] - ce["replace"]) / (ce["mean"] - ce_original))
    assert [L.ce_recovered for L in result.layers] + [result.ce_recovered_all] == pytest.approx(recovered, rel=1e-3)


def test_evaluation_builds_no_autograd_graph(gpt2, text_file):
    """Every pass runs without gradients (the model's weights require them): a replacement sees grad mode off."""
    tokens = token_contexts(gpt2.tokenizer, str(text_file), 128, 16)
    tset = random_transcoders(gpt2, d_sae=16)
    seen = []

    def replacement(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(torch.is_grad_enabled())
        return y

    assert any(p.requires_grad for p in gpt2.parameters())
    evaluate_transcoders(gpt2, tset, tokens, replacements={0: replacement}, progress=False)
    assert seen and not any(seen)
