"""Every transcoder format round-trips: fixture files written the way each tool writes them load into
transcoders whose outputs equal that format's own forward formula, computed here from the raw tensors."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
import yaml
from circuit_catalog.ingest.transcoder_formats import load_transcoders, save_circuit_tracer, save_saelens
from safetensors.torch import save_file

from circuit_catalog.errors import TranscoderError

D, D_SAE, N = 16, 24, 7


def raw_tensors(seed: int, skip: bool = False, threshold: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {
        "W_enc": torch.randn(D, D_SAE, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g),
        "W_dec": torch.randn(D_SAE, D, generator=g),
        "b_dec": torch.randn(D, generator=g),
    }
    if skip:
        t["W_skip"] = torch.randn(D, D, generator=g)  # stored [d_out, d_in], applied as x @ W_skip.T
    if threshold:
        t["threshold"] = torch.rand(D_SAE, generator=g)
    return t


def x_batch() -> torch.Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(99))


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_saelens_directory(tmp_path, arch):
    t = raw_tensors(1, skip="skip" in arch, threshold="jumprelu" in arch)
    for layer in (0, 2):  # a parent directory with one SAELens directory per layer
        sub = tmp_path / f"blocks.{layer}.ln2.hook_normalized"
        sub.mkdir()
        save_file(t, sub / "sae_weights.safetensors")
        (sub / "cfg.json").write_text(json.dumps({
            "architecture": arch, "d_in": D, "d_sae": D_SAE, "d_out": D, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": False, "normalize_activations": "none",
            "metadata": {"model_name": "tiny", "hook_name": f"blocks.{layer}.ln2.hook_normalized",
                         "hook_name_out": f"blocks.{layer}.hook_mlp_out"},
        }))
    tset = load_transcoders(tmp_path)
    assert tset.layers == [0, 2] and tset.format == "saelens"
    x = x_batch()
    pre = x @ t["W_enc"] + t["b_enc"]
    z = torch.relu(pre) * (pre > t["threshold"]) if "threshold" in t else torch.relu(pre)
    expected = z @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].T if "W_skip" in t else 0)
    torch.testing.assert_close(tset[2].forward(x), expected)
    assert tset[2].cfg.hook_out == "blocks.2.hook_mlp_out"


@pytest.mark.parametrize("skip, jump", [(False, False), (True, False), (False, True)])
def test_circuit_tracer_directory(tmp_path, skip, jump):
    layers = {}
    for layer in range(2):
        t = raw_tensors(10 + layer, skip=skip, threshold=jump)
        stored = {"W_enc": t["W_enc"].T.contiguous(), "W_dec": t["W_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"]}
        if skip:
            stored["W_skip"] = t["W_skip"]
        if jump:
            stored["activation_function.threshold"] = t["threshold"]
        save_file(stored, tmp_path / f"layer_{layer}.safetensors")
        layers[layer] = t
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "transcoder_set", "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out", "transcoders": ["layer_0.safetensors", "layer_1.safetensors"],
    }))
    tset = load_transcoders(tmp_path)
    x = x_batch()
    for layer, t in layers.items():
        pre = x @ t["W_enc"] + t["b_enc"]  # circuit-tracer: F.linear(x, W_enc_stored) == x @ W_enc_stored.T
        z = pre * (pre > t["threshold"]) if jump else torch.relu(pre)
        expected = z @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].T if skip else 0)
        torch.testing.assert_close(tset[layer].forward(x), expected)
        assert tset[layer].cfg.hook_in == f"blocks.{layer}.ln2.hook_normalized"


def _original_gpt2_file(tmp_path, layer: int, t: dict):
    """Pickle a file as the original GPT-2 transcoders' training code did: its own config class inside `sae_training`."""
    module = types.ModuleType("sae_training.config")

    class LanguageModelSAERunnerConfig:
        def __init__(self):
            self.hook_point = f"blocks.{layer}.ln2.hook_normalized"
            self.out_hook_point = f"blocks.{layer}.hook_mlp_out"
            self.hook_point_layer = layer
            self.d_in, self.d_out, self.d_sae, self.is_transcoder = D, D, D_SAE, True

    LanguageModelSAERunnerConfig.__module__ = "sae_training.config"
    LanguageModelSAERunnerConfig.__qualname__ = "LanguageModelSAERunnerConfig"
    module.LanguageModelSAERunnerConfig = LanguageModelSAERunnerConfig
    pkg = types.ModuleType("sae_training")
    sys.modules.update({"sae_training": pkg, "sae_training.config": module})
    try:
        path = tmp_path / f"final_sparse_autoencoder_gpt2-small_blocks.{layer}.ln2.hook_normalized_24576.pt"
        state = {"W_enc": t["W_enc"], "b_enc": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["pre_bias"], "b_dec_out": t["b_dec"]}
        torch.save({"cfg": LanguageModelSAERunnerConfig(), "state_dict": state}, path)
    finally:  # the loader must cope without the training package importable
        del sys.modules["sae_training"], sys.modules["sae_training.config"]
    return path


def test_original_gpt2_pickles_need_trust_and_fold_the_pre_bias(tmp_path):
    t = raw_tensors(3)
    t["pre_bias"] = torch.randn(D, generator=torch.Generator().manual_seed(4))
    _original_gpt2_file(tmp_path, 5, t)
    with pytest.raises(TranscoderError, match="--trust-pickle"):
        load_transcoders(tmp_path)
    tset = load_transcoders(tmp_path, trust_pickle=True)
    x = x_batch()
    expected = torch.relu((x - t["pre_bias"]) @ t["W_enc"] + t["b_enc"]) @ t["W_dec"] + t["b_dec"]
    torch.testing.assert_close(tset[5].forward(x), expected, rtol=1e-5, atol=1e-5)
    assert tset.format == "gpt2-original" and tset[5].cfg.hook_out == "blocks.5.hook_mlp_out"


def test_our_writers_round_trip(tmp_path, gpt2):
    from tests.conftest import random_transcoders

    tset = random_transcoders(gpt2, d_sae=12)
    for tc in tset:
        save_saelens(tc, tmp_path / "sl" / f"layer_{tc.layer}")
    save_circuit_tracer(tset, tmp_path / "ct")
    x = torch.randn(N, gpt2.cfg.d_model)
    for fmt in ("sl", "ct"):
        loaded = load_transcoders(tmp_path / fmt)
        assert loaded.layers == tset.layers
        for tc in tset:
            torch.testing.assert_close(loaded[tc.layer].forward(x), tc.forward(x))
            assert loaded[tc.layer].cfg.hook_in == tc.cfg.hook_in


# ---------------------------------------------------------------- bad inputs


def _one_saelens(tmp_path, **overrides):
    t = raw_tensors(5)
    t.update(overrides.pop("tensors", {}))
    save_file(t, tmp_path / "sae_weights.safetensors")
    cfg = {"architecture": "transcoder", "d_in": D, "d_sae": D_SAE, "d_out": D,
           "metadata": {"hook_name": "blocks.0.ln2.hook_normalized"}}
    cfg.update(overrides)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    return tmp_path


def test_truncated_safetensors(tmp_path):
    path = _one_saelens(tmp_path) / "sae_weights.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(TranscoderError, match="sae_weights.safetensors.*truncated"):
        load_transcoders(tmp_path)


def test_nan_weights(tmp_path):
    bad = raw_tensors(5)["W_dec"]
    bad[3, 2] = float("nan")
    with pytest.raises(TranscoderError, match="W_dec contains NaN"):
        load_transcoders(_one_saelens(tmp_path, tensors={"W_dec": bad}))


def test_shape_disagreeing_with_config(tmp_path):
    with pytest.raises(TranscoderError, match="cfg.json says d_in=20"):
        load_transcoders(_one_saelens(tmp_path, d_in=20))


def test_inconsistent_shapes(tmp_path):
    with pytest.raises(TranscoderError, match=r"W_dec has shape \(24, 9\)"):
        load_transcoders(_one_saelens(tmp_path, tensors={"W_dec": torch.randn(D_SAE, 9)}, d_out=None))


def test_validation_against_model(tmp_path, gpt2):
    from tests.conftest import random_transcoders

    tset = random_transcoders(gpt2, d_sae=8)
    tset.validate_against(gpt2)  # fits
    tset[1].cfg.hook_in = "blocks.1.ln2.hook_nonexistent"
    with pytest.raises(TranscoderError, match="hook 'blocks.1.ln2.hook_nonexistent' does not exist"):
        tset.validate_against(gpt2)
    wide = _one_saelens(tmp_path)  # d_model 16, the tiny GPT-2 has 32
    with pytest.raises(TranscoderError, match="d_model is 32"):
        load_transcoders(wide).validate_against(gpt2)
    far = random_transcoders(gpt2, d_sae=8, layers=[7])
    with pytest.raises(TranscoderError, match="outside the model's 0..2"):
        far.validate_against(gpt2)


def test_circuit_tracer_refuses_topk(gpt2, tmp_path):
    from tests.conftest import random_transcoders

    tset = random_transcoders(gpt2, d_sae=8, activation="topk", k=2)
    with pytest.raises(TranscoderError, match="no TopK"):
        save_circuit_tracer(tset, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


# ---------------------------------------------------------------- SAELens settings that change the forward pass


@pytest.mark.parametrize("arch", ["transcoder", "jumprelu_skip_transcoder"])
@pytest.mark.parametrize("spelling", ["expected_average_only_in", True])  # True: the pre-6 spelling
def test_saelens_expected_average_norm_uses_the_trainers_factor(tmp_path, arch, spelling):
    """A SAELens checkpoint trained with "expected_average_only_in": inputs were multiplied by the factor in
    activation_scaler.json and outputs divided by it (SAELens's fold_activation_norm_scaling_factor)."""
    t = raw_tensors(6, skip="skip" in arch, threshold="jumprelu" in arch)
    s = 2.5
    _one_saelens(tmp_path, architecture=arch, tensors=t, normalize_activations=spelling)
    (tmp_path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": s}))
    tset = load_transcoders(tmp_path)
    x = x_batch()
    pre = (s * x) @ t["W_enc"] + t["b_enc"]
    z = torch.relu(pre) * (pre > t["threshold"]) if "threshold" in t else torch.relu(pre)
    scaled_out = z @ t["W_dec"] + t["b_dec"] + ((s * x) @ t["W_skip"].T if "W_skip" in t else 0)
    torch.testing.assert_close(tset[0].encode(x), z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tset[0].forward(x), scaled_out / s, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "activation_scaler.json") in tset.files  # it decides the weights, so the manifest hashes it


@pytest.mark.parametrize("spelling", ["none", False, None])
def test_saelens_settings_that_change_nothing(tmp_path, spelling):
    t = raw_tensors(7)
    _one_saelens(tmp_path, tensors=t, normalize_activations=spelling, apply_b_dec_to_input=False,
                 reshape_activations="none", metadata={"hook_name": "blocks.0.ln2.hook_normalized", "hook_head_index": None})
    x = x_batch()
    torch.testing.assert_close(load_transcoders(tmp_path)[0].forward(x), torch.relu(x @ t["W_enc"] + t["b_enc"]) @ t["W_dec"] + t["b_dec"])


@pytest.mark.parametrize("field, value", [
    ("apply_b_dec_to_input", True),
    ("normalize_activations", "layer_norm"),
    ("normalize_activations", "constant_norm_rescale"),
    ("normalize_activations", "expected_average_only_in"),  # no activation_scaler.json beside it
    ("normalize_activations", "whitening"),
    ("reshape_activations", "hook_z"),
    ("hook_head_index", 3),
    ("finetuning_scaling_factor", True),
])
def test_saelens_settings_we_cannot_reproduce_are_refused(tmp_path, field, value):
    if field == "hook_head_index":
        _one_saelens(tmp_path, metadata={"hook_name": "blocks.0.ln2.hook_normalized", field: value})
    else:
        _one_saelens(tmp_path, **{field: value})
    with pytest.raises(TranscoderError) as err:
        load_transcoders(tmp_path)
    message = str(err.value)
    assert f"{field}={json.dumps(value)} is not supported" in message and "\n" not in message


def test_saelens_scaler_without_a_factor_is_refused(tmp_path):
    _one_saelens(tmp_path, normalize_activations="expected_average_only_in")
    (tmp_path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": None}))  # as after SAELens folds it
    with pytest.raises(TranscoderError, match='normalize_activations="expected_average_only_in" is not supported'):
        load_transcoders(tmp_path)


def test_saelens_unknown_tensor_is_refused(tmp_path):
    _one_saelens(tmp_path, tensors={"scaling_factor": torch.full((D_SAE,), 2.0)})
    with pytest.raises(TranscoderError, match="scaling_factor not understood"):
        load_transcoders(tmp_path)
