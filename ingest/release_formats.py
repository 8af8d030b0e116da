"""Released transcoder sets, each read into the one in-memory representation of `ingest.transcoder`.

- Gemma Scope 2 (`google/gemma-scope-2-*`): one folder per layer, `layer_{L}_width_{W}_l0_{S}[_affine]`, holding
  `params.safetensors` (`w_enc` [d_in, d_sae], `w_dec`, `b_enc`, `b_dec` [d_out], `threshold`, optional
  `affine_skip_connection` [d_in, d_out], used as `x @ it`) and `config.json` (`hf_hook_point_in`, `..._out`,
  `architecture`, `affine_connection`). A per-layer transcoder's `w_dec` is [d_sae, d_out]; a CLT's (folder
  `clt/`) is [d_sae, n_layers, d_out], layer i's features writing into layer L through `w_dec[:, L]`, L >= i
  (circuit-tracer 0.5 `load_gemma_scope_2_clt` keeps `w_dec[:, i:]`; a nonzero `w_dec[:, :i]` would write
  into earlier layers and is refused). Activation: JumpReLU, `z = pre * (pre > threshold)`.
- Gemma Scope (`google/gemma-scope-2b-pt-transcoders`): `layer_{L}/width_{W}/average_l0_{N}/params.npz` with
  `W_enc` [d_model, d_sae], `W_dec` [d_sae, d_model], `b_enc`, `b_dec`, `threshold` (JumpReLU), as
  circuit-tracer 0.5's `load_gemma_scope_transcoder` reads it.
- EleutherAI sparsify and clt-training: one folder per hook point named by the Hugging Face module
  (`layers.{L}.mlp`, GPT-2: `h.{L}.mlp`) with `cfg.json` and `sae.safetensors`; see `load_sparsify`.

The input and output hooks are TransformerLens's `blocks.{L}.ln2.hook_normalized` and `blocks.{L}.hook_mlp_out`
for all three, as SAELens and circuit-tracer map these releases. The releases read the Hugging Face MLP input,
which is the norm's output *with* its weight (and bias); TransformerLens's `hook_normalized` is before them,
so the two agree only where that weight is 1 (and the bias 0) unless the model keeps them elsewhere.

`hf://owner/repo[/path][@revision]` fetches a release from the Hugging Face hub (`fetch_hub`).
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from circuit_catalog.ingest.transcoder import Transcoder, TranscoderConfig, TranscoderSet, check_tensors
from circuit_catalog.ingest.transcoder_formats import _read_safetensors, _require

from circuit_catalog.errors import TranscoderError, first_line

GS2_WEIGHTS, GS2_CONFIG = "params.safetensors", "config.json"
GS1_WEIGHTS = "params.npz"
SPARSIFY_CFG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"
HF_PREFIX = "hf://"
_GS_LAYER = re.compile(r"^layer_(\d+)(?:_|$)")
_GS2_HOOK_IN = re.compile(r"layers\.(\d+)\.pre_feedforward_layernorm\.output$")
_GS2_HOOK_OUT = re.compile(r"layers\.(\d+)\.post_feedforward_layernorm\.output$")
_GLOB = re.compile(r"[*?\[]")
_SPARSIFY_HOOK = re.compile(r"^(?:.*\.)?(?:layers|h)\.(\d+)\.mlp$")
_SPARSIFY_TENSOR = re.compile(r"encoder\.(weight|bias)|in_norm|out_norm|(W_dec|b_dec|W_skip|post_enc|post_enc_scale)"
                              r"|(W_decs|b_decs|W_skips|post_encs|post_enc_scales)\.\d+")


def load_release(path: Path) -> TranscoderSet | None:
    """The release at `path` if it is laid out as one of this module's formats, else None."""
    if path.is_file():
        return load_gemma_scope_v1([path]) if path.name == GS1_WEIGHTS else None
    if (path / SPARSIFY_WEIGHTS).is_file():
        return load_sparsify([path])
    if folders := _subdirs_with(path, SPARSIFY_WEIGHTS):
        return load_sparsify(folders)
    if (path / GS2_WEIGHTS).is_file():
        return load_gemma_scope_2([path])
    if folders := _subdirs_with(path, GS2_WEIGHTS):
        return load_gemma_scope_2(folders)
    if npz := sorted(path.rglob(GS1_WEIGHTS)):
        return load_gemma_scope_v1(npz)
    return None


def load_gemma_scope_files(paths: list[Path]) -> TranscoderSet:
    """Gemma Scope `params.npz` files, or Gemma Scope 2 `params.safetensors` files (their folders name the layers)."""
    if all(p.name == GS1_WEIGHTS for p in paths):
        return load_gemma_scope_v1(paths)
    if all(p.name == GS2_WEIGHTS for p in paths):
        return load_gemma_scope_2([p.parent for p in paths])
    raise TranscoderError(f"{paths[0].parent}: mixes Gemma Scope {GS1_WEIGHTS} and Gemma Scope 2 {GS2_WEIGHTS} files")


def fetch_hub(spec: str) -> list[Path]:
    """`hf://owner/repo[/path][@revision]` -> local copies (downloaded, or from huggingface_hub's cache) of what
    the path names: one file, one folder, or, with glob characters (`clt/layer_*_width_16k_l0_small`), every
    file or folder that matches; the releases keep several widths and sparsities side by side, so a glob is how
    one of them is chosen."""
    from huggingface_hub import hf_hub_download, snapshot_download

    body, _, revision = spec[len(HF_PREFIX):].partition("@")
    parts = [p for p in body.split("/") if p]
    if len(parts) < 2:
        raise TranscoderError(f"{spec}: expected hf://owner/repo[/path][@revision]")
    repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        if Path(sub).suffix and not _GLOB.search(sub):
            return [Path(hf_hub_download(repo_id, sub, revision=revision or None))]
        root = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=[sub, f"{sub}/*"] if sub else None))
    except Exception as exc:  # offline mode, no network, missing repo or file: the hub client raises many types
        raise TranscoderError(
            f"{spec}: cannot fetch from the Hugging Face hub ({type(exc).__name__}: {first_line(exc)[:120]}); "
            "download it elsewhere and pass the local folder"
        ) from None
    found = sorted(root.glob(sub)) if sub else [root]
    if not found:
        raise TranscoderError(f"{spec}: nothing in {repo_id} matches {sub!r}")
    return found


def load_release_paths(paths: list[Path], where: str) -> TranscoderSet:
    """Several folders (or params.npz files) picked out of one release, as fetched by a glob (`where` names it)."""
    if all(p.name in (GS1_WEIGHTS, GS2_WEIGHTS) for p in paths):
        return load_gemma_scope_files(paths)
    if all((p / GS2_WEIGHTS).is_file() for p in paths):
        return load_gemma_scope_2(paths)
    if all((p / SPARSIFY_WEIGHTS).is_file() for p in paths):
        return load_sparsify(paths)
    raise TranscoderError(f"{where}: the {len(paths)} matches are not the per-layer folders of one release "
                          f"(Gemma Scope 2 {GS2_WEIGHTS}, sparsify {SPARSIFY_WEIGHTS}) or Gemma Scope {GS1_WEIGHTS} files")


# ---------------------------------------------------------------- Gemma Scope 2


def load_gemma_scope_2(folders: list[Path]) -> TranscoderSet:
    """Per-layer folders of Gemma Scope 2 transcoders, or the per-layer folders of one Gemma Scope 2 CLT."""
    read = {}
    for folder in folders:
        layer = _gs_layer(folder)
        if layer in read:
            raise TranscoderError(f"{folder}: a second transcoder for layer {layer} (also {read[layer][0]}); keep one per layer")
        affine = _check_gs2_config(folder / GS2_CONFIG, layer)
        read[layer] = (folder, _read_safetensors(folder / GS2_WEIGHTS))
        if affine:
            _require(read[layer][1], ("affine_skip_connection",), folder / GS2_WEIGHTS)
    clt = {layer: w["w_dec"].shape[1] for layer, (_, w) in read.items() if "w_dec" in w and w["w_dec"].dim() == 3}
    if clt and clt.keys() != read.keys():
        raise TranscoderError(f"{folders[0].parent}: mixes CLT folders (3-d w_dec) with per-layer transcoders")
    n = max(clt.values(), default=0)
    if clt and sorted(read) != list(range(n)):
        raise TranscoderError(f"{folders[0].parent}: a CLT of {n} layers (w_dec's second dimension) needs folders "
                              f"layer_0..layer_{n - 1}, found layers {sorted(read)}")
    by_layer = {layer: _gs2_transcoder(layer, folder, w, n if clt else None) for layer, (folder, w) in sorted(read.items())}
    files = [f for folder, _ in read.values() for f in (folder / GS2_CONFIG, folder / GS2_WEIGHTS) if f.is_file()]
    return TranscoderSet(by_layer, files, "gemma-scope-2-clt" if clt else "gemma-scope-2")


def _gs2_transcoder(layer: int, folder: Path, w: dict[str, torch.Tensor], n_layers: int | None) -> Transcoder:
    """One layer; `n_layers` is None for a per-layer transcoder, the CLT's depth for a CLT folder."""
    where = folder / GS2_WEIGHTS
    _require(w, ("w_enc", "b_enc", "w_dec", "b_dec", "threshold"), where)
    _known(w, lambda name: name in ("w_enc", "b_enc", "w_dec", "b_dec", "threshold", "affine_skip_connection"), where)
    d_in, d_sae = _shape2(w, "w_enc", where)
    d_out = w["b_dec"].shape[0]
    dec_shape = (d_sae, d_out) if n_layers is None else (d_sae, n_layers, d_out)
    check_tensors(w, {"w_enc": (d_in, d_sae), "b_enc": (d_sae,), "threshold": (d_sae,), "b_dec": (d_out,), "w_dec": dec_shape,
               "affine_skip_connection": (d_in, d_out)}, where)
    W_dec, later = w["w_dec"], None
    if n_layers is not None:
        if W_dec[:, :layer].any():
            raise TranscoderError(f"{where}: w_dec[:, :{layer}] is nonzero: it would write into layers before {layer}")
        W_dec, later = W_dec[:, layer], (W_dec[:, layer + 1:] if layer + 1 < n_layers else None)  # views of the mapped file
    return _jumprelu(layer, w["w_enc"], w["b_enc"], W_dec, w["b_dec"], w["threshold"], where,
                     W_skip=w.get("affine_skip_connection"), W_dec_later=later)


def _check_gs2_config(path: Path, layer: int) -> bool:
    """A Gemma Scope 2 config.json, when present, must describe a JumpReLU MLP transcoder of this layer;
    returns whether it declares an affine skip connection."""
    if not path.is_file():
        return False
    raw = _json_object(path)
    for field, pattern in (("hf_hook_point_in", _GS2_HOOK_IN), ("hf_hook_point_out", _GS2_HOOK_OUT)):
        value = raw.get(field)
        m = pattern.search(value) if isinstance(value, str) else None
        if not m or int(m.group(1)) != layer:
            raise _refuse(path, field, value, f"a layer-{layer} MLP transcoder reads model.layers.{layer}."
                          f"pre_feedforward_layernorm.output and writes model.layers.{layer}.post_feedforward_layernorm.output")
    if raw.get("architecture", "jump_relu") != "jump_relu":
        raise _refuse(path, "architecture", raw["architecture"], "Gemma Scope 2 transcoders are jump_relu")
    return bool(raw.get("affine_connection"))


# ---------------------------------------------------------------- Gemma Scope (v1)


def load_gemma_scope_v1(paths: list[Path]) -> TranscoderSet:
    """`params.npz` files, the layer read from the `layer_{L}` folder above each."""
    by_layer: dict[int, Transcoder] = {}
    for path in paths:
        layer = _gs_layer(path)
        if layer in by_layer:
            raise TranscoderError(
                f"{path}: a second transcoder for layer {layer} (also {by_layer[layer].source}); keep one average_l0 per layer")
        w = _read_npz(path)
        _require(w, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), path)
        _known(w, lambda name: name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), path)
        d_in, d_sae = _shape2(w, "W_enc", path)
        check_tensors(w, {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "threshold": (d_sae,), "W_dec": (d_sae, w["b_dec"].shape[0]),
                   "b_dec": (w["b_dec"].shape[0],)}, path)
        by_layer[layer] = _jumprelu(layer, w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], w["threshold"], path)
    return TranscoderSet(by_layer, list(paths), "gemma-scope")


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    """A NumPy archive of arrays (pickled objects refused), as float32 tensors in host memory (`TranscoderSet.bind`
    moves them to the model's device)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {k: torch.from_numpy(np.asarray(archive[k], dtype=np.float32)) for k in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise TranscoderError(f"{path}: unreadable .npz ({first_line(exc)[:120]}); truncated or corrupt?") from None


# ---------------------------------------------------------------- EleutherAI sparsify / clt-training

_SPARSIFY_FIXED = {
    # cfg.json field -> (value we reproduce, why another value cannot be represented)
    "transcode": (True, "a sparse autoencoder reconstructs its input; only transcoders are read"),
    "activation": ("topk", "only TopK (of the ReLU'd pre-activations) is represented here"),
    "coalesce_topk": ("none", "coalescing chooses each layer's active latents jointly across layers"),
    "per_source_tied": (False, "tied per-source decoders are not represented"),
    "secondary_target_tied": (False, "tied per-target decoders are not represented"),
    "divide_cross_layer": (False, "the division of earlier layers' writes is not represented"),
}


def load_sparsify(folders: list[Path]) -> TranscoderSet:
    """EleutherAI sparsify / clt-training transcoders (one folder per hook point), read as their code defines them.

    Per folder (`sparsify/sparse_coder.py`, `sparsify/fused_encoder.py`, `sparsify/runner.py` of
    EleutherAI/sparsify and EleutherAI/clt-training): `encoder.weight` [n, d_in] and `encoder.bias` are an
    `nn.Linear`, latents are the top k of `relu(x @ encoder.weight.T + encoder.bias)` (our TopK: top k, then
    ReLU: the same vector); decoder rows `W_dec` [n, d_in] write `z @ W_dec + b_dec`; `W_skip` [d_out, d_in]
    adds `x @ W_skip.T`. `b_dec` is subtracted from the input only when not transcoding (refused: an SAE).
    Multi-target (clt-training, `n_targets` > 0): `W_decs.{t}`, `b_decs.{t}`, `W_skips.{t}` decode into
    the hook point t places later (the runner decodes each source once per later hook point, advancing t),
    so into layer L + t when the folders are consecutive layers. Folded exactly: `post_enc_scale(s)`
    (per-latent scales of what each target receives) into the decoder rows; `normalize_io`
    (constants `in_norm`, `out_norm`: inputs times sqrt(d)/in_norm, the target's output times
    out_norm/sqrt(d)) into encoder, decoders, biases and skips; `b_decs.{t}` into the target's bias.
    Refused, in one line naming the field: a nonzero `post_enc(s)` (added only to active latents: not
    linear in the activation), a nonzero cross-layer skip `W_skips.{t>0}`, and the cfg.json settings of
    `_SPARSIFY_FIXED`. cfg.json does not record a training-time `hookpoints_in`: the input is taken to be
    the MLP module's input."""
    coders: dict[int, tuple[Path, dict, dict[str, torch.Tensor]]] = {}
    for folder in folders:
        layer = _sparsify_layer(folder)
        if layer in coders:
            raise TranscoderError(f"{folder}: a second transcoder for layer {layer} (also {coders[layer][0]})")
        coders[layer] = (folder, _sparsify_cfg(folder / SPARSIFY_CFG), _read_safetensors(folder / SPARSIFY_WEIGHTS))
    layers = sorted(coders)
    if any(cfg["n_targets"] for _, cfg, _ in coders.values()) and layers != list(range(layers[0], layers[0] + len(layers))):
        raise TranscoderError(f"{folders[0].parent}: multi-target transcoders need consecutive layers, found {layers}")
    writes = {layer: _sparsify_targets(layer, *coders[layer], layers[-1]) for layer in layers}
    scales = {layer: _io_scales(cfg, w, folder / SPARSIFY_WEIGHTS) for layer, (folder, cfg, w) in coders.items()}
    by_layer = {layer: _sparsify_transcoder(layer, coders[layer], writes, scales) for layer in layers}
    files = [f for folder, _, _ in coders.values() for f in (folder / SPARSIFY_CFG, folder / SPARSIFY_WEIGHTS)]
    return TranscoderSet(by_layer, files, "sparsify")


def _sparsify_cfg(path: Path) -> dict:
    """cfg.json with its defaults (sparsify's SparseCoderConfig); settings we cannot reproduce are refused."""
    raw = _json_object(path)
    cfg = {"num_latents": 0, "expansion_factor": 32, "k": 32, "skip_connection": False, "n_targets": 0,
           "normalize_io": False, "post_encoder_scale": False, "transcode": False, "activation": "topk",
           "coalesce_topk": "none", "per_source_tied": False, "secondary_target_tied": False,
           "divide_cross_layer": False, **raw}
    for field in ("d_in", "num_latents", "expansion_factor", "k", "n_targets"):
        if field not in cfg or isinstance(cfg[field], bool) or not isinstance(cfg[field], int) or cfg[field] < 0:
            raise TranscoderError(f"{path}: {field} must be a non-negative integer, got {json.dumps(cfg.get(field))}")
    for field, (ok, why) in _SPARSIFY_FIXED.items():
        if cfg[field] != ok:
            raise _refuse(path, field, cfg[field], why)
    cfg["num_latents"] = cfg["num_latents"] or cfg["d_in"] * cfg["expansion_factor"]
    return cfg


def _sparsify_layer(folder: Path) -> int:
    m = _SPARSIFY_HOOK.match(folder.name)
    if not m:
        raise TranscoderError(f"{folder}: hook point {folder.name!r} is not an MLP module (expected layers.L.mlp or h.L.mlp)")
    return int(m.group(1))


def _sparsify_targets(layer: int, folder: Path, cfg: dict, w: dict[str, torch.Tensor], last: int) -> dict[int, tuple]:
    """{target layer: (decoder rows [n, d], bias [d], own skip [d_out, d_in] or None)} as one source writes
    them, before the target's output scale; post-encoder scales folded into the rows."""
    where, n, d = folder / SPARSIFY_WEIGHTS, cfg["num_latents"], cfg["d_in"]
    _require(w, ("encoder.weight", "encoder.bias"), where)
    _known(w, _SPARSIFY_TENSOR.fullmatch, where)
    check_tensors(w, {"encoder.weight": (n, d), "encoder.bias": (n,)}, where)
    multi = cfg["n_targets"] > 0
    if layer + max(cfg["n_targets"], 1) - 1 > last:
        raise TranscoderError(f"{folder / SPARSIFY_CFG}: n_targets={cfg['n_targets']} reaches past the last hook point (layer {last})")
    out = {}
    for t in range(max(cfg["n_targets"], 1)):
        keys = _sparsify_keys(t if multi else None)
        _require(w, (keys["dec"], keys["bias"]) + ((keys["skip"],) if cfg["skip_connection"] else ())
                 + ((keys["scale"],) if cfg["post_encoder_scale"] else ()), where)
        check_tensors(w, {keys["dec"]: (n, d), keys["bias"]: (d,), keys["skip"]: (d, d), keys["post"]: (n,), keys["scale"]: (n,)}, where)
        if keys["post"] in w and w[keys["post"]].any():
            raise TranscoderError(
                f"{where}: {keys['post']} is nonzero: it is added to active latents only, which no linear decoder carries")
        skip = w.get(keys["skip"]) if cfg["skip_connection"] else None
        if t and skip is not None and skip.any():
            raise TranscoderError(
                f"{where}: {keys['skip']} is nonzero: a skip from layer {layer}'s input into layer {layer + t} is not represented")
        rows = w[keys["dec"]] * (w[keys["scale"]][:, None] if cfg["post_encoder_scale"] else 1)
        out[layer + t] = (rows, w[keys["bias"]], skip if t == 0 else None)
    return out


def _sparsify_keys(target: int | None) -> dict[str, str]:
    """Tensor names of one decoder target: `W_dec` etc. for a single-target coder, `W_decs.{t}` etc. otherwise."""
    names = {"dec": ("W_dec", "W_decs"), "bias": ("b_dec", "b_decs"), "skip": ("W_skip", "W_skips"),
             "post": ("post_enc", "post_encs"), "scale": ("post_enc_scale", "post_enc_scales")}
    return {k: single if target is None else f"{plural}.{target}" for k, (single, plural) in names.items()}


def _io_scales(cfg: dict, w: dict[str, torch.Tensor], where: Path) -> tuple[float, float]:
    """(input factor, output factor) of `normalize_io`: x * sqrt(d) / in_norm in, y * out_norm / sqrt(d) out."""
    if not cfg["normalize_io"]:
        return 1.0, 1.0
    _require(w, ("in_norm", "out_norm"), where)
    check_tensors(w, {"in_norm": (1,), "out_norm": (1,)}, where)
    root = cfg["d_in"] ** 0.5
    return root / float(w["in_norm"]), float(w["out_norm"]) / root


def _sparsify_transcoder(layer: int, coder: tuple[Path, dict, dict], writes: dict[int, dict[int, tuple]],
                         scales: dict[int, tuple[float, float]]) -> Transcoder:
    """Layer `layer`'s transcoder: its encoder, its writes into itself and later layers, and every source's
    bias into it, each scaled by the receiving layer's output factor."""
    folder, cfg, w = coder
    c_in, own = scales[layer][0], writes[layer]
    rows = [own[target][0] * scales[target][1] for target in sorted(own)]
    b_dec = scales[layer][1] * sum(src[layer][1] for src in writes.values() if layer in src)
    skip = own[layer][2]
    return Transcoder(_mlp_config(layer, cfg["d_in"], cfg["num_latents"], cfg["d_in"], "topk", k=cfg["k"]),
                      c_in * w["encoder.weight"].T.contiguous(), w["encoder.bias"], rows[0], b_dec,
                      W_skip=None if skip is None else (c_in * scales[layer][1]) * skip.T.contiguous(),
                      source=str(folder / SPARSIFY_WEIGHTS), W_dec_later=torch.stack(rows[1:], 1) if len(rows) > 1 else None)


# ---------------------------------------------------------------- shared


def _jumprelu(layer: int, W_enc, b_enc, W_dec, b_dec, threshold, where: Path, W_skip=None, W_dec_later=None) -> Transcoder:
    """A JumpReLU transcoder reading layer `layer`'s MLP input and writing its output (the Gemma Scope releases)."""
    cfg = _mlp_config(layer, W_enc.shape[0], W_enc.shape[1], b_dec.shape[0], "jumprelu")
    return Transcoder(cfg, W_enc, b_enc, W_dec, b_dec, W_skip=W_skip, threshold=threshold, source=str(where),
                      W_dec_later=W_dec_later)


def _mlp_config(layer: int, d_in: int, d_sae: int, d_out: int, activation: str, k: int | None = None) -> TranscoderConfig:
    """Every release here reads layer L's MLP input and writes its output (hooks: see the module docstring)."""
    return TranscoderConfig(layer=layer, d_in=d_in, d_sae=d_sae, d_out=d_out, hook_in=f"blocks.{layer}.ln2.hook_normalized",
                            hook_out=f"blocks.{layer}.hook_mlp_out", activation=activation, k=k, hf_modules=True)


def _gs_layer(path: Path) -> int:
    """The layer of a Gemma Scope file or folder: the innermost `layer_{L}` or `layer_{L}_...` name on its path."""
    for part in reversed(path.parts):
        if m := _GS_LAYER.match(part):
            return int(m.group(1))
    raise TranscoderError(f"{path}: no layer_{{L}} folder on the path to tell the layer")


def _shape2(w: dict[str, torch.Tensor], name: str, where: Path) -> tuple[int, int]:
    if w[name].dim() != 2:
        raise TranscoderError(f"{where}: {name} has shape {tuple(w[name].shape)}, expected 2 dimensions")
    return tuple(w[name].shape)


def _known(w: dict[str, torch.Tensor], understood, where: Path) -> None:
    """Refuse tensors the loader does not read: any of them might change the forward pass."""
    unknown = sorted(name for name in w if not understood(name))
    if unknown:
        raise TranscoderError(f"{where}: tensor(s) {', '.join(unknown)} not understood")


def _json_object(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TranscoderError(f"{path}: unreadable config ({first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise TranscoderError(f"{path}: expected a JSON object, got a {type(raw).__name__}")
    return raw


def _refuse(path: Path, field: str, value, why: str) -> TranscoderError:
    return TranscoderError(f"{path}: {field}={json.dumps(value)} is not supported: {why}")


def _subdirs_with(directory: Path, name: str) -> list[Path]:
    return sorted(p for p in directory.iterdir() if (p / name).is_file())
