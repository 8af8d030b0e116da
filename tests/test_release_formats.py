"""The public transcoder releases: files written here in each release's exact layout load through
`load_transcoders` into transcoders whose activations and reconstructions equal that release's own formula,
computed in the test from the raw tensors; a Gemma Scope 2 CLT and a sparsify set give complete attribution
graphs on a tiny model; bad files are one-line errors naming file and field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from circuit_catalog.ingest.attribution import attribute
from circuit_catalog.ingest.transcoder_formats import load_transcoders
from safetensors.torch import save_file

from circuit_catalog.errors import TranscoderError
from tests.test_attribution import assert_complete

D, N_LAT, N, K = 16, 24, 7, 5


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def xs(n_layers: int, d: int = D) -> dict[int, torch.Tensor]:
    g = gen(99)
    return {layer: torch.randn(N, d, generator=g) for layer in range(n_layers)}


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Gemma Scope's JumpReLU: x * (x > threshold)."""
    return pre * (pre > threshold)


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """sparsify's encoder: the top k of relu(pre-activations), scattered back into a dense vector."""
    values, indices = torch.relu(pre).topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values)


# ---------------------------------------------------------------- Gemma Scope 2


def gs2_params(seed: int, d: int = D, n_layers: int | None = None, layer: int = 0, affine: bool = False) -> dict:
    """params.safetensors tensors; with n_layers, a CLT layer's [d_sae, n_layers, d] w_dec, zero before `layer`."""
    g = gen(seed)
    p = {"w_enc": torch.randn(d, N_LAT, generator=g) / d**0.5, "b_enc": torch.randn(N_LAT, generator=g) * 0.1,
         "b_dec": torch.randn(d, generator=g) * 0.1, "threshold": torch.rand(N_LAT, generator=g) * 0.3}
    if n_layers is None:
        p["w_dec"] = torch.randn(N_LAT, d, generator=g) / d**0.5
    else:
        p["w_dec"] = torch.randn(N_LAT, n_layers, d, generator=g) / d**0.5
        p["w_dec"][:, :layer] = 0
    if affine:
        p["affine_skip_connection"] = torch.randn(d, d, generator=g) * 0.05
    return p


def write_gs2(root: Path, layer: int, params: dict, kind: str = "transcoder_all", config: dict | None = None) -> Path:
    """A Gemma Scope 2 folder: `{kind}/layer_{L}_width_16k_l0_small[_affine]/` with config.json and params.safetensors."""
    affine = "affine_skip_connection" in params
    folder = root / kind / f"layer_{layer}_width_16k_l0_small{'_affine' if affine else ''}"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in params.items()}, folder / "params.safetensors")
    cfg = {"hf_hook_point_in": f"model.layers.{layer}.pre_feedforward_layernorm.output",
           "hf_hook_point_out": f"model.layers.{layer}.post_feedforward_layernorm.output",
           "width": N_LAT, "model_name": "google/gemma-3-270m-pt", "architecture": "jump_relu", "l0": 7,
           "affine_connection": affine, "type": kind}
    (folder / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
    return folder


@pytest.mark.parametrize("affine", [False, True])
def test_gemma_scope_2_transcoders(tmp_path, affine):
    params = {layer: gs2_params(layer, affine=affine) for layer in (0, 2)}
    for layer, p in params.items():
        write_gs2(tmp_path, layer, p)
    tset = load_transcoders(tmp_path / "transcoder_all")
    assert tset.layers == [0, 2] and tset.format == "gemma-scope-2" and not tset.cross_layer
    x = xs(1)[0]
    for layer, p in params.items():
        z = jumprelu(x @ p["w_enc"] + p["b_enc"], p["threshold"])
        expected = z @ p["w_dec"] + p["b_dec"] + (x @ p["affine_skip_connection"] if affine else 0)
        torch.testing.assert_close(tset[layer].encode(x), z)
        torch.testing.assert_close(tset[layer].forward(x), expected)
        hooks = (tset[layer].cfg.hook_in, tset[layer].cfg.hook_out)
        assert hooks == (f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out")
    one = load_transcoders(write_gs2(tmp_path / "one", 5, params[2]))  # a single layer's folder
    assert one.layers == [5]
    torch.testing.assert_close(one[5].forward(x), tset[2].forward(x))


def test_gemma_scope_2_clt(tmp_path):
    """Layer L's output: b_dec_L + sum over i <= L of z_i @ w_dec_i[:, L] (+ its own affine skip)."""
    n = 3
    params = {i: gs2_params(10 + i, n_layers=n, layer=i, affine=True) for i in range(n)}
    for i, p in params.items():
        write_gs2(tmp_path, i, p, kind="clt")
    tset = load_transcoders(tmp_path / "clt")
    assert tset.cross_layer and tset.format == "gemma-scope-2-clt" and tset.layers == [0, 1, 2]
    x = xs(n)
    z = {i: jumprelu(x[i] @ p["w_enc"] + p["b_enc"], p["threshold"]) for i, p in params.items()}
    ours = tset.reconstruct({i: tset[i].encode(x[i]) for i in range(n)}, x)
    for L in range(n):
        writes = sum(z[i] @ params[i]["w_dec"][:, L] for i in range(L + 1))
        expected = params[L]["b_dec"] + x[L] @ params[L]["affine_skip_connection"] + writes
        torch.testing.assert_close(ours[L], expected)


# ---------------------------------------------------------------- Gemma Scope (v1)


def write_gs1(root: Path, layer: int, seed: int, l0: int = 54) -> dict[str, np.ndarray]:
    """`layer_{L}/width_16k/average_l0_{N}/params.npz` as google/gemma-scope-2b-pt-transcoders ships it."""
    rng = np.random.default_rng(seed)
    p = {"W_enc": rng.normal(size=(D, N_LAT)) / D**0.5, "W_dec": rng.normal(size=(N_LAT, D)) / D**0.5,
         "b_enc": rng.normal(size=N_LAT) * 0.1, "b_dec": rng.normal(size=D) * 0.1, "threshold": rng.uniform(0, 0.3, N_LAT)}
    p = {k: v.astype(np.float32) for k, v in p.items()}
    folder = root / f"layer_{layer}" / "width_16k" / f"average_l0_{l0}"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **p)
    return p


def test_gemma_scope_v1(tmp_path):
    params = {layer: write_gs1(tmp_path, layer, layer) for layer in (1, 4)}
    tset = load_transcoders(tmp_path)
    assert tset.layers == [1, 4] and tset.format == "gemma-scope"
    x = xs(1)[0]
    for layer, p in params.items():
        t = {k: torch.from_numpy(v) for k, v in p.items()}
        z = jumprelu(x @ t["W_enc"] + t["b_enc"], t["threshold"])
        torch.testing.assert_close(tset[layer].encode(x), z)
        torch.testing.assert_close(tset[layer].forward(x), z @ t["W_dec"] + t["b_dec"])
    single = load_transcoders(tmp_path / "layer_4" / "width_16k" / "average_l0_54" / "params.npz")
    assert single.layers == [4]
    write_gs1(tmp_path, 4, 9, l0=120)
    with pytest.raises(TranscoderError, match="a second transcoder for layer 4"):
        load_transcoders(tmp_path)


def test_circuit_tracer_configs_listing_gemma_scope_files(tmp_path):
    """circuit-tracer's own Gemma Scope configs list params.npz (or Gemma Scope 2 params.safetensors) files; they
    read as the same transcoders as the files themselves, with the config's hooks."""
    import yaml

    params = {layer: write_gs1(tmp_path, layer, layer) for layer in (0, 1)}
    for i in range(2):
        write_gs2(tmp_path, i, gs2_params(40 + i, n_layers=2, layer=i), kind="clt")
    entries = {"transcoder_set": [f"layer_{layer}/width_16k/average_l0_54/params.npz" for layer in params],
               "cross_layer_transcoder": [f"clt/layer_{i}_width_16k_l0_small/params.safetensors" for i in range(2)]}
    x = xs(1)[0]
    for kind, files in entries.items():
        (tmp_path / "config.yaml").write_text(yaml.safe_dump({
            "model_kind": kind, "feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out", "transcoders": files}))
        tset = load_transcoders(tmp_path)
        direct = load_transcoders(tmp_path / {"transcoder_set": files[1], "cross_layer_transcoder": "clt"}[kind])
        assert tset.cross_layer == (kind == "cross_layer_transcoder") and tset.layers == [0, 1]
        assert tset[1].cfg.hook_in == "blocks.1.hook_resid_mid" and (tmp_path / "config.yaml") in tset.files
        torch.testing.assert_close(tset[1].forward(x), direct[1].forward(x))
        torch.testing.assert_close(tset[1].decoder_into(1), direct[1].decoder_into(1))


CT_SCRIPT = """
import sys
import numpy as np
import torch
from circuit_tracer.transcoder.cross_layer_transcoder import load_gemma_scope_2_clt
from circuit_tracer.transcoder.single_layer_transcoder import load_gemma_scope_2_transcoder, load_gemma_scope_transcoder

x = torch.from_numpy(np.load(sys.argv[1])["x"])
kw = dict(device=torch.device("cpu"), dtype=torch.float32)
paths = dict(enumerate(sys.argv[5:]))
paths[len(paths)] = paths[len(paths) - 1]  # its loop reads layers range(max(paths)): one key more than layers
with torch.no_grad():
    clt = load_gemma_scope_2_clt(paths, **kw)
    np.savez(sys.argv[2], gs2=load_gemma_scope_2_transcoder(sys.argv[3], 0, **kw).forward(x[0]).numpy(),
             gs1=load_gemma_scope_transcoder(sys.argv[4], 0, **kw).forward(x[0]).numpy(),
             clt=clt.decode(clt.encode(x).to_sparse(), x).numpy())
"""


def test_gemma_scope_files_agree_with_circuit_tracers_loaders(ct_python, tmp_path):
    """circuit-tracer 0.5's own loaders (load_gemma_scope_2_transcoder, load_gemma_scope_transcoder,
    load_gemma_scope_2_clt), run in its venv on the same files, give the same outputs as ours."""
    import subprocess

    n = 3
    gs2 = write_gs2(tmp_path, 0, gs2_params(50, affine=True)) / "params.safetensors"
    write_gs1(tmp_path, 0, 51)
    gs1 = tmp_path / "layer_0" / "width_16k" / "average_l0_54" / "params.npz"
    clt = [write_gs2(tmp_path, i, gs2_params(52 + i, n_layers=n, layer=i, affine=True), kind="clt") / "params.safetensors"
           for i in range(n)]
    x = torch.stack(list(xs(n).values()))
    np.savez(tmp_path / "x.npz", x=x.numpy())
    done = subprocess.run([str(ct_python), "-c", CT_SCRIPT, str(tmp_path / "x.npz"), str(tmp_path / "ref.npz"), str(gs2), str(gs1),
                           *map(str, clt)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ref = {k: torch.from_numpy(v) for k, v in np.load(tmp_path / "ref.npz").items()}
    torch.testing.assert_close(load_transcoders(gs2.parent)[0].forward(x[0]), ref["gs2"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(load_transcoders(gs1)[0].forward(x[0]), ref["gs1"], rtol=1e-5, atol=1e-5)
    tset = load_transcoders(tmp_path / "clt")
    ours = tset.reconstruct({i: tset[i].encode(x[i]) for i in range(n)}, dict(enumerate(x)))
    torch.testing.assert_close(torch.stack([ours[i] for i in range(n)]), ref["clt"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- EleutherAI sparsify / clt-training


def sparsify_tensors(seed: int, d: int = D, n_targets: int = 0, skip: bool = False, scale: bool = False) -> dict:
    """sae.safetensors: encoder.weight [n, d_in], decoder rows [n, d], skips stored [d_out, d_in]."""
    g = gen(seed)
    t = {"encoder.weight": torch.randn(N_LAT, d, generator=g) / d**0.5, "encoder.bias": torch.randn(N_LAT, generator=g) * 0.1}
    if not n_targets:
        t.update({"W_dec": torch.randn(N_LAT, d, generator=g) / d**0.5, "b_dec": torch.randn(d, generator=g) * 0.1})
        if skip:
            t["W_skip"] = torch.randn(d, d, generator=g) * 0.05
        return t
    for i in range(n_targets):
        t[f"W_decs.{i}"] = torch.randn(N_LAT, d, generator=g) / d**0.5
        t[f"b_decs.{i}"] = torch.randn(d, generator=g) * 0.1
        t[f"post_encs.{i}"] = torch.zeros(N_LAT)
        if skip:
            t[f"W_skips.{i}"] = torch.randn(d, d, generator=g) * 0.05 if i == 0 else torch.zeros(d, d)
        if scale:
            t[f"post_enc_scales.{i}"] = torch.rand(N_LAT, generator=g) + 0.5
    return t


def write_sparsify(root: Path, hook: str, tensors: dict, d: int = D, **cfg) -> Path:
    folder = root / hook
    folder.mkdir(parents=True)
    save_file(tensors, folder / "sae.safetensors")
    base = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": N_LAT, "k": K,
            "multi_topk": False, "skip_connection": False, "transcode": True, "d_in": d}
    (folder / "cfg.json").write_text(json.dumps({**base, **cfg}))
    return folder


@pytest.mark.parametrize("skip", [False, True])
def test_sparsify_single_target(tmp_path, skip):
    tensors = {layer: sparsify_tensors(layer, skip=skip) for layer in (3, 5)}
    for layer, t in tensors.items():
        write_sparsify(tmp_path, f"layers.{layer}.mlp", t, skip_connection=skip)
    tset = load_transcoders(tmp_path)
    assert tset.layers == [3, 5] and tset.format == "sparsify" and not tset.cross_layer
    x = xs(1)[0]
    for layer, t in tensors.items():
        z = topk_relu(x @ t["encoder.weight"].T + t["encoder.bias"], K)
        expected = z @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].T if skip else 0)
        torch.testing.assert_close(tset[layer].encode(x), z)
        torch.testing.assert_close(tset[layer].forward(x), expected)
        assert tset[layer].cfg.hook_in == f"blocks.{layer}.ln2.hook_normalized" and tset[layer].cfg.k == K


def write_multi_target(root: Path, n_layers: int, cross_layer: int, d: int = D, hook: str = "layers.{}.mlp") -> dict:
    """A clt-training set as its trainer lays it out: hook point p gets n_targets = min(cross_layer, n - p),
    with normalize_io (in_norm, out_norm), post-encoder scales, skips and per-target biases."""
    raw = {}
    for p in range(n_layers):
        n_targets = min(cross_layer, n_layers - p)
        t = sparsify_tensors(20 + p, d=d, n_targets=n_targets, skip=True, scale=True)
        t["in_norm"], t["out_norm"] = torch.tensor([3.0 + p]), torch.tensor([0.5 + p])
        write_sparsify(root, hook.format(p), t, d=d, n_targets=n_targets, n_sources=0, skip_connection=True,
                       normalize_io=True, post_encoder_scale=True, coalesce_topk="none")
        raw[p] = t
    return raw


def multi_target_reference(raw: dict, x: dict[int, torch.Tensor], d: int = D) -> tuple[dict, dict]:
    """clt-training's runner, written out: source s's latents (of its input times sqrt(d)/in_norm_s) decode into
    hook point s + t through W_decs.t (rows times post_enc_scales.t) plus b_decs.t, the own target adds the skip
    of its scaled input, and target L's sum is multiplied by out_norm_L / sqrt(d)."""
    xn = {s: x[s] * d**0.5 / t["in_norm"] for s, t in raw.items()}
    z = {s: topk_relu(xn[s] @ t["encoder.weight"].T + t["encoder.bias"], K) for s, t in raw.items()}
    out = {}
    for L in raw:
        total = xn[L] @ raw[L]["W_skips.0"].T
        for s, t in raw.items():
            if f"W_decs.{L - s}" in t and L >= s:
                total = total + (z[s] * t[f"post_enc_scales.{L - s}"]) @ t[f"W_decs.{L - s}"] + t[f"b_decs.{L - s}"]
        out[L] = total * raw[L]["out_norm"] / d**0.5
    return z, out


def test_sparsify_multi_target(tmp_path):
    raw = write_multi_target(tmp_path, n_layers=4, cross_layer=2)
    tset = load_transcoders(tmp_path)
    assert tset.cross_layer and tset.layers == [0, 1, 2, 3] and [tc.n_later for tc in tset] == [1, 1, 1, 0]
    x = xs(4)
    z, expected = multi_target_reference(raw, x)
    ours = tset.reconstruct({s: tset[s].encode(x[s]) for s in raw}, x)
    for L in raw:
        torch.testing.assert_close(tset[L].encode(x[L]), z[L])
        torch.testing.assert_close(ours[L], expected[L], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- end to end


def test_a_gemma_scope_2_clt_and_a_sparsify_set_give_complete_graphs(gpt2, tmp_path):
    d, n = gpt2.cfg.d_model, gpt2.cfg.n_layers
    for i in range(n):
        write_gs2(tmp_path / "gs2", i, gs2_params(30 + i, d=d, n_layers=n, layer=i, affine=True), kind="clt")
    write_multi_target(tmp_path / "sparsify", n_layers=n, cross_layer=2, d=d, hook="h.{}.mlp")  # GPT-2's module names
    for path in (tmp_path / "gs2" / "clt", tmp_path / "sparsify"):
        tset = load_transcoders(path)
        tset.bind(gpt2)
        assert tset.cross_layer
        graph = attribute(gpt2, tset, "the capital of france is")
        assert graph.n_features > 10
        assert_complete(graph)


def write_release(kind: str, root: Path, d: int, n: int) -> Path:
    """Every layer of a tiny GPT-2 in one release format; the folder `load_transcoders` takes."""
    if kind == "gemma-scope-2":
        for i in range(n):
            write_gs2(root, i, gs2_params(40 + i, d=d, affine=i == 1))
        return root / "transcoder_all"
    if kind == "gemma-scope-2-clt":
        for i in range(n):
            write_gs2(root, i, gs2_params(50 + i, d=d, n_layers=n, layer=i), kind="clt")
        return root / "clt"
    if kind == "gemma-scope":
        for i in range(n):
            rng = np.random.default_rng(60 + i)
            folder = root / f"layer_{i}" / "width_16k" / "average_l0_50"
            folder.mkdir(parents=True)
            np.savez(folder / "params.npz", W_enc=(rng.normal(size=(d, N_LAT)) / d**0.5).astype(np.float32),
                     W_dec=(rng.normal(size=(N_LAT, d)) / d**0.5).astype(np.float32), b_enc=np.full(N_LAT, 0.05, np.float32),
                     b_dec=np.zeros(d, np.float32), threshold=np.full(N_LAT, 0.1, np.float32))
        return root
    if kind == "sparsify":
        for i in range(n):
            write_sparsify(root, f"h.{i}.mlp", sparsify_tensors(70 + i, d=d), d=d)
        return root
    write_multi_target(root, n_layers=n, cross_layer=2, d=d, hook="h.{}.mlp")
    return root


@pytest.mark.parametrize("kind", ["gemma-scope-2", "gemma-scope-2-clt", "gemma-scope", "sparsify", "sparsify-multi-target"])
def test_each_release_goes_through_the_catalog(kind, gpt2, tmp_path):
    """ingest -> load -> upstream -> a prompt graph -> its report, for every release format."""
    from circuit_catalog.catalog.store import open_loaded_store
    from circuit_catalog.ingest.job import build_manifest, run_ingest
    from circuit_catalog.ingest.settings import IngestSettings
    from circuit_catalog.ingest.prompts import run_prompts
    from circuit_catalog.ingest.settings import AttributionSettings, PromptSpec
    from circuit_catalog.queries.lookups import Lookups
    from circuit_catalog.queries.reports.prompt import report_file, write_prompt_report

    path = write_release(kind, tmp_path / "release", gpt2.cfg.d_model, gpt2.cfg.n_layers)
    tset = load_transcoders(path)
    tset.bind(gpt2)
    root = tmp_path / "catalog"
    run_ingest(gpt2, tset, root, build_manifest(gpt2, "tiny", tset, str(path), IngestSettings(top_k=3, token_top_k=3)), progress=False)
    prompt = "the capital of france is"
    (pid,) = run_prompts(gpt2, tset, root, [PromptSpec(prompt)], AttributionSettings(), progress=False)
    with Lookups(open_loaded_store(root, progress=False)) as lookups:
        upstream = lookups.upstream(f"L2/{N_LAT - 1}", k=3)
        assert len(upstream) == 3 and all(e.feature.startswith(("L0/", "L1/")) for e in upstream)
        graph = lookups.prompt_graph(prompt)
        report = write_prompt_report(lookups, root, prompt, tmp_path / report_file(pid), max_nodes=20)
    assert any(n.kind == "feature" for n in graph.nodes.values())
    assert report.is_file() and "L2/" in report.read_text()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_releases_are_bound_to_the_models_norms_and_centred_writes(arch, tmp_path):
    """On a model whose MLP-input norm has a weight (and bias), a release reads the Hugging Face MLP input
    (after that weight) and predicts the module's output: bound to the loaded model (folded norms, centred
    writes for LayerNorm), its activations and reconstruction equal the format's formula on the HF model's
    own MLP input and output."""
    from circuit_catalog.ingest.models import load_model
    from transformers import AutoModelForCausalLM

    from tests.conftest import build_hf_model

    model_dir = build_hf_model(tmp_path / "model", arch, random_norms=True)
    model = load_model(str(model_dir), device="cpu")
    d, n = model.cfg.d_model, model.cfg.n_layers
    params = {i: gs2_params(80 + i, d=d, affine=True) for i in range(n)}
    for i, p in params.items():
        p["threshold"] = p["threshold"] * 0.1
        write_gs2(tmp_path / "release", i, p)
    tset = load_transcoders(tmp_path / "release" / "transcoder_all")
    tset.bind(model)
    tokens = model.to_tokens("the capital of france is paris")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    mlps = [b.mlp for b in hf.transformer.h] if arch == "gpt2" else [layer.mlp for layer in hf.model.layers]
    seen: dict[int, tuple] = {}
    handles = [m.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, (args[0][0], out[0]))) for i, m in enumerate(mlps)]
    with torch.no_grad():
        hf(tokens)
        _, cache = model.run_with_cache(tokens)
    for h in handles:
        h.remove()
    norms = [b.ln_2.weight for b in hf.transformer.h] if arch == "gpt2" else [layer.post_attention_layernorm.weight for layer in hf.model.layers]
    assert all(float(w.detach().std()) > 0.1 for w in norms)  # the MLP-input norms really are not 1
    for i, p in params.items():
        x_hf, y_hf = seen[i]
        z = jumprelu(x_hf @ p["w_enc"] + p["b_enc"], p["threshold"])
        out = z @ p["w_dec"] + p["b_dec"] + x_hf @ p["affine_skip_connection"]
        if arch == "gpt2":
            out = out - out.mean(-1, keepdim=True)
        x = cache[f"blocks.{i}.ln2.hook_normalized"][0]
        assert (z > 0).any()
        torch.testing.assert_close(tset[i].encode(x), z, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(tset[i].forward(x), out, rtol=1e-4, atol=1e-4)
    y = cache["blocks.0.hook_mlp_out"][0]  # and the model's own MLP output is the module's, centred as assumed
    torch.testing.assert_close(y, seen[0][1] - (seen[0][1].mean(-1, keepdim=True) if arch == "gpt2" else 0), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- bad files


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("change, file, field", [
    (lambda p: p.pop("threshold"), "params.safetensors", "missing tensor(s) threshold"),
    (lambda p: p.update(w_dec=torch.randn(N_LAT, D + 1)), "params.safetensors", "w_dec has shape (24, 17)"),
    (lambda p: p["w_enc"].__setitem__((0, 0), float("nan")), "params.safetensors", "w_enc contains NaN"),
    (lambda p: p.update(affine_skip_connection=torch.randn(D, 3)), "params.safetensors", "affine_skip_connection has shape"),
    (lambda p: p.update(scaling_factor=torch.ones(N_LAT)), "params.safetensors", "tensor(s) scaling_factor not understood"),
])
def test_gemma_scope_2_bad_tensors(tmp_path, change, file, field):
    p = gs2_params(1)
    change(p)
    write_gs2(tmp_path, 0, p)
    with pytest.raises(TranscoderError) as err:
        load_transcoders(tmp_path / "transcoder_all")
    assert file in one_line(err) and field in one_line(err)


def test_gemma_scope_2_affine_config_without_the_skip_tensor(tmp_path):
    write_gs2(tmp_path, 0, gs2_params(1), config={"affine_connection": True})
    with pytest.raises(TranscoderError) as err:
        load_transcoders(tmp_path / "transcoder_all")
    assert "params.safetensors: missing tensor(s) affine_skip_connection" in one_line(err)


@pytest.mark.parametrize("config, field", [
    ({"hf_hook_point_in": "model.layers.0.output"}, 'hf_hook_point_in="model.layers.0.output" is not supported'),
    ({"hf_hook_point_out": "model.layers.1.post_feedforward_layernorm.output"}, "hf_hook_point_out="),
    ({"architecture": "topk"}, 'architecture="topk" is not supported'),
])
def test_gemma_scope_2_config_that_is_not_an_mlp_transcoder(tmp_path, config, field):
    write_gs2(tmp_path, 0, gs2_params(1), config=config)
    with pytest.raises(TranscoderError) as err:
        load_transcoders(tmp_path / "transcoder_all")
    assert "config.json" in one_line(err) and field in one_line(err)


def test_gemma_scope_2_clt_writing_backwards_or_missing_a_layer(tmp_path):
    for i in range(2):
        p = gs2_params(i, n_layers=2, layer=i)
        p["w_dec"][:, 0] += 1.0  # layer 1 writing into layer 0
        write_gs2(tmp_path / "a", i, p, kind="clt")
    with pytest.raises(TranscoderError, match=r"layer_1_width_16k_l0_small/params.safetensors: w_dec\[:, :1\] is nonzero"):
        load_transcoders(tmp_path / "a" / "clt")
    write_gs2(tmp_path / "b", 1, gs2_params(1, n_layers=2, layer=1), kind="clt")
    with pytest.raises(TranscoderError, match=r"a CLT of 2 layers \(w_dec's second dimension\) needs folders "
                                              r"layer_0..layer_1, found layers \[1\]"):
        load_transcoders(tmp_path / "b" / "clt")


def test_gemma_scope_v1_bad_files(tmp_path):
    write_gs1(tmp_path / "a", 2, 1)
    path = tmp_path / "a" / "layer_2" / "width_16k" / "average_l0_54" / "params.npz"
    np.savez(path, **{k: v for k, v in np.load(path).items() if k != "W_dec"})
    with pytest.raises(TranscoderError) as err:
        load_transcoders(tmp_path / "a")
    assert "params.npz: missing tensor(s) W_dec" in one_line(err)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(TranscoderError, match=r"params.npz: unreadable .npz"):
        load_transcoders(tmp_path / "a")


@pytest.mark.parametrize("cfg, tensors, message", [
    ({"transcode": False}, {}, "cfg.json: transcode=false is not supported"),
    ({"activation": "groupmax"}, {}, 'cfg.json: activation="groupmax" is not supported'),
    ({"coalesce_topk": "concat"}, {}, 'cfg.json: coalesce_topk="concat" is not supported'),
    ({"k": "32"}, {}, 'cfg.json: k must be a non-negative integer, got "32"'),
    ({}, {"W_dec": torch.randn(N_LAT, D + 2)}, "sae.safetensors: W_dec has shape (24, 18)"),
    ({}, {"post_enc": torch.ones(N_LAT)}, "sae.safetensors: post_enc is nonzero"),
    ({}, {"W_dec_extra": torch.ones(N_LAT)}, "sae.safetensors: tensor(s) W_dec_extra not understood"),
    ({}, {"encoder.bias": torch.full((N_LAT,), float("nan"))}, "sae.safetensors: encoder.bias contains NaN"),
    ({"num_latents": 30}, {}, "sae.safetensors: encoder.weight has shape (24, 16), expected (30, 16)"),
])
def test_sparsify_bad_files(tmp_path, cfg, tensors, message):
    write_sparsify(tmp_path, "layers.0.mlp", {**sparsify_tensors(1), **tensors}, **cfg)
    with pytest.raises(TranscoderError) as err:
        load_transcoders(tmp_path)
    assert message in one_line(err)


def test_sparsify_cfg_of_the_wrong_type_or_hook_point(tmp_path):
    folder = write_sparsify(tmp_path / "a", "layers.0.mlp", sparsify_tensors(1))
    (folder / "cfg.json").write_text(json.dumps([D, N_LAT]))
    with pytest.raises(TranscoderError) as err:
        load_transcoders(tmp_path / "a")
    assert "layers.0.mlp/cfg.json: expected a JSON object, got a list" in one_line(err)
    write_sparsify(tmp_path / "b", "layers.0.self_attn", sparsify_tensors(1))
    with pytest.raises(TranscoderError, match="'layers.0.self_attn' is not an MLP module"):
        load_transcoders(tmp_path / "b")


@pytest.mark.parametrize("layers, n_targets, message", [
    ((0, 2), 1, r"multi-target transcoders need consecutive layers, found \[0, 2\]"),
    ((0, 1), 3, r"layers.0.mlp/cfg.json: n_targets=3 reaches past the last hook point \(layer 1\)"),
])
def test_sparsify_targets_that_do_not_fit_the_hook_points(tmp_path, layers, n_targets, message):
    for layer in layers:
        write_sparsify(tmp_path, f"layers.{layer}.mlp", sparsify_tensors(layer, n_targets=n_targets), n_targets=n_targets)
    with pytest.raises(TranscoderError, match=message):
        load_transcoders(tmp_path)


def test_sparsify_cross_layer_skip_is_refused(tmp_path):
    raw = sparsify_tensors(1, n_targets=2, skip=True)
    raw["W_skips.1"] = torch.randn(D, D)
    write_sparsify(tmp_path, "layers.0.mlp", raw, n_targets=2, skip_connection=True)
    write_sparsify(tmp_path, "layers.1.mlp", sparsify_tensors(2, n_targets=1, skip=True), n_targets=1, skip_connection=True)
    with pytest.raises(TranscoderError, match=r"layers.0.mlp/sae.safetensors: W_skips.1 is nonzero"):
        load_transcoders(tmp_path)


# ---------------------------------------------------------------- the hub


def hub_cache(monkeypatch, root: Path) -> Path:
    """huggingface_hub's cache layout under `root`, used offline: what an earlier download would have left."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root


def cached_repo(cache: Path, repo_id: str) -> Path:
    """A repo's snapshot folder in the cache, with `refs/main` pointing at it."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_hub_releases_are_fetched_by_file_folder_or_glob(monkeypatch, tmp_path):
    """The real hub calls (hf_hub_download, snapshot_download) answered from the cache: a glob picks one
    width and sparsity of a Gemma Scope 2 CLT out of several, a path names one params.npz."""
    cache = hub_cache(monkeypatch, tmp_path / "hub")
    snapshot = cached_repo(cache, "google/gemma-scope-2-270m-pt")
    for i in range(2):
        write_gs2(snapshot, i, gs2_params(60 + i, n_layers=2, layer=i), kind="clt")
        big = write_gs2(tmp_path / "other", i, gs2_params(70 + i, n_layers=2, layer=i), kind="clt")
        big.rename(snapshot / "clt" / big.name.replace("l0_small", "l0_big"))
    tset = load_transcoders("hf://google/gemma-scope-2-270m-pt/clt/layer_*_width_16k_l0_small")
    assert tset.cross_layer and tset.layers == [0, 1]
    assert all("l0_small" in str(f) for f in tset.files)
    with pytest.raises(TranscoderError, match="a second transcoder for layer 0"):  # both sparsities at once
        load_transcoders("hf://google/gemma-scope-2-270m-pt/clt")
    with pytest.raises(TranscoderError, match="nothing in google/gemma-scope-2-270m-pt matches 'clt/layer_\\*_width_1m'"):
        load_transcoders("hf://google/gemma-scope-2-270m-pt/clt/layer_*_width_1m")
    write_gs1(cached_repo(cache, "google/gemma-scope-2b-pt-transcoders"), 3, 1)
    assert load_transcoders("hf://google/gemma-scope-2b-pt-transcoders/layer_3/width_16k/average_l0_54/params.npz").layers == [3]


def test_hub_releases_fail_in_one_line_offline(monkeypatch, tmp_path):
    """The hub is unreachable here: offline, with nothing cached, the real fetch fails at once in one line
    that says what to do."""
    hub_cache(monkeypatch, tmp_path / "empty-hub")
    for spec in ("hf://google/gemma-scope-2-270m-pt/clt",
                 "hf://google/gemma-scope-2b-pt-transcoders/layer_3/width_16k/average_l0_54/params.npz"):
        with pytest.raises(TranscoderError) as err:
            load_transcoders(spec)
        message = one_line(err)
        assert message.startswith(f"{spec}: cannot fetch from the Hugging Face hub") and "pass the local folder" in message
    with pytest.raises(TranscoderError, match="expected hf://owner/repo"):
        load_transcoders("hf://justaname")
    (tmp_path / "config.yaml").write_text(  # circuit-tracer's configs name their Gemma Scope files on the hub
        "model_kind: transcoder_set\nfeature_input_hook: ln2.hook_normalized\nfeature_output_hook: hook_mlp_out\n"
        "transcoders:\n- hf://google/gemma-scope-2b-pt-transcoders/layer_0/width_16k/average_l0_76/params.npz\n")
    with pytest.raises(TranscoderError) as err:
        load_transcoders(tmp_path)
    assert one_line(err).startswith("hf://google/gemma-scope-2b-pt-transcoders/layer_0/width_16k/average_l0_76/params.npz: "
                                    "cannot fetch")
