"""One conversion point per on-disk transcoder format.

- SAELens: a directory with `cfg.json` + `sae_weights.safetensors` (architectures transcoder,
  skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder); a set is a parent directory with
  one such directory per layer. The cfg.json fields that change SAELens's forward pass are honoured
  exactly or the file is refused (`_saelens_input_scale`).
- circuit-tracer: `config.yaml` + `layer_{i}.safetensors`, W_enc stored [d_sae, d_model],
  W_skip stored [d_out, d_in], JumpReLU threshold under `activation_function.threshold`.
- the original GPT-2 transcoders of the transcoder paper: pickled `.pt` files holding `cfg` and
  `state_dict`, with an input pre-bias `b_dec` (folded into `b_enc` here) and output bias `b_dec_out`.
  Pickle runs code, so these load only when the caller passes `trust_pickle=True`.
- the public releases (Gemma Scope 2 and its CLTs, Gemma Scope, EleutherAI sparsify / clt-training) and
  `hf://` fetching: `ingest/release_formats.py`.
"""

from __future__ import annotations

import json
import pickle
import re
import types
from pathlib import Path

import torch
import yaml
from circuit_catalog.ingest.mapped_weights import read_mapped, release_mapped
from circuit_catalog.ingest.transcoder import Transcoder, TranscoderConfig, TranscoderSet
from safetensors.torch import save_file

from circuit_catalog.errors import TranscoderError

SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
SAELENS_SCALER = "activation_scaler.json"  # SAELens's trainer writes it into every checkpoint directory
CT_CONFIG = "config.yaml"
ORIGINAL_GPT2_PATTERN = re.compile(r"final_sparse_autoencoder_.*blocks\.(\d+)\..*\.pt$")
_LAYER_IN_HOOK = re.compile(r"blocks\.(\d+)\.")

_SAELENS_ARCH = {
    # architecture -> (activation, has skip)
    "transcoder": ("relu", False),
    "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", False),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}


def load_transcoders(path: str | Path, trust_pickle: bool = False) -> TranscoderSet:
    """Detect the format of `path` (a local file or folder, or `hf://owner/repo[/path][@revision]`) and load
    every transcoder in it. Safetensors files stay mapped: the pages each file's validation touched are
    handed back, so a set larger than memory loads."""
    try:
        tset = _load_transcoders(path, trust_pickle)
    finally:
        release_mapped()
    tset.source = str(path)
    return tset


def _load_transcoders(path: str | Path, trust_pickle: bool) -> TranscoderSet:
    from circuit_catalog.ingest import release_formats  # it builds on this module's helpers

    if str(path).startswith(release_formats.HF_PREFIX):
        fetched = release_formats.fetch_hub(str(path))
        if len(fetched) > 1:
            return release_formats.load_release_paths(fetched, str(path))
        path = fetched[0]
    path = Path(path)
    if not path.exists():
        raise TranscoderError(f"transcoders not found: {path}")
    if path.is_file() and ORIGINAL_GPT2_PATTERN.search(path.name):
        return _load_original_gpt2([path], trust_pickle)
    if path.is_dir() and (path / CT_CONFIG).is_file():
        return load_circuit_tracer(path)
    if (release := release_formats.load_release(path)) is not None:
        return release
    if path.is_file():
        raise TranscoderError(
            f"{path}: not a transcoder directory, a Gemma Scope params.npz or an original GPT-2 transcoder .pt file")
    if (path / SAELENS_CFG).is_file():
        tc = load_saelens(path)
        return TranscoderSet({tc.layer: tc}, _files(path), "saelens")
    subdirs = sorted(p for p in path.iterdir() if (p / SAELENS_CFG).is_file())
    if subdirs:
        by_layer: dict[int, Transcoder] = {}
        for sub in subdirs:
            tc = load_saelens(sub)
            if tc.layer in by_layer:
                raise TranscoderError(f"{sub}: a second transcoder for layer {tc.layer} (also {by_layer[tc.layer].source})")
            by_layer[tc.layer] = tc
        return TranscoderSet(by_layer, [f for sub in subdirs for f in _files(sub)], "saelens")
    pickles = sorted(p for p in path.iterdir() if ORIGINAL_GPT2_PATTERN.search(p.name))
    if pickles:
        return _load_original_gpt2(pickles, trust_pickle)
    raise TranscoderError(
        f"{path}: no transcoders found (expected SAELens cfg.json dirs, a circuit-tracer config.yaml, "
        "final_sparse_autoencoder_*.pt files, Gemma Scope params.safetensors or params.npz folders, "
        "or sparsify cfg.json + sae.safetensors folders)"
    )


# ---------------------------------------------------------------- SAELens


def load_saelens(directory: Path) -> Transcoder:
    cfg_path, weights_path = directory / SAELENS_CFG, directory / SAELENS_WEIGHTS
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
        raise TranscoderError(f"{cfg_path}: unreadable config ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise TranscoderError(f"{cfg_path}: expected a JSON object, found {type(raw).__name__}")
    arch = raw.get("architecture", "transcoder")
    if arch not in _SAELENS_ARCH:
        raise TranscoderError(f"{cfg_path}: architecture {arch!r} is not a transcoder ({', '.join(_SAELENS_ARCH)})")
    activation, has_skip = _SAELENS_ARCH[arch]
    meta = raw.get("metadata") or {}
    hook_in = meta.get("hook_name") or raw.get("hook_name")
    if not hook_in:
        raise TranscoderError(f"{cfg_path}: no hook_name (metadata.hook_name)")
    layer = meta.get("hook_layer", raw.get("hook_layer"))
    layer = _layer_of(hook_in, cfg_path) if layer is None else int(layer)
    hook_out = meta.get("hook_name_out") or raw.get("hook_name_out") or f"blocks.{layer}.hook_mlp_out"
    scale = _saelens_input_scale(raw, directory)
    w = _read_safetensors(weights_path)
    _require(w, ("W_enc", "b_enc", "W_dec", "b_dec"), weights_path)
    unknown = sorted(set(w) - {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip", "threshold"})
    if unknown:  # e.g. an old SAELens `scaling_factor`: it would change the forward pass, so never drop it silently
        raise TranscoderError(f"{weights_path}: tensor(s) {', '.join(unknown)} not understood for a SAELens {arch}")
    if scale is not None:
        w["W_enc"], w["W_dec"], w["b_dec"] = w["W_enc"] * scale, w["W_dec"] / scale, w["b_dec"] / scale
    if has_skip:
        _require(w, ("W_skip",), weights_path)
    if activation == "jumprelu":
        _require(w, ("threshold",), weights_path)
    for name, dims in (("W_enc", 2), ("W_dec", 2), ("b_enc", 1), ("b_dec", 1)):
        if w[name].dim() != dims:
            raise TranscoderError(f"{weights_path}: {name} has {w[name].dim()} dimension(s), expected {dims}")
    for key, name in (("d_in", "W_enc"), ("d_sae", "b_enc"), ("d_out", "b_dec")):
        if raw.get(key) is not None and int(raw[key]) != w[name].shape[0]:
            raise TranscoderError(f"{weights_path}: {name} has {w[name].shape[0]} rows but cfg.json says {key}={raw[key]}")
    d_in, d_sae = w["W_enc"].shape
    cfg = TranscoderConfig(
        layer=layer, d_in=d_in, d_sae=d_sae, d_out=w["b_dec"].shape[0], hook_in=hook_in, hook_out=hook_out,
        activation=activation, model_name=meta.get("model_name") or raw.get("model_name") or "",
    )
    return Transcoder(
        cfg, w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"],
        W_skip=_transposed(w.get("W_skip")), threshold=w.get("threshold"), source=str(weights_path),
    )


_SAELENS_NORMS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")


def _saelens_input_scale(raw: dict, directory: Path) -> float | None:
    """Check the cfg.json fields that change SAELens's forward pass; return the input scale to fold, if any.

    As SAELens 6 defines them for transcoders (`sae_lens/saes/sae.py`, `sae_lens/saes/transcoder.py`):
    - `apply_b_dec_to_input`: SAELens's TranscoderConfig refuses it (a transcoder's b_dec is its output bias,
      in d_out); so do we. Absent counts as false, as older SAELens transcoders ignored it.
    - `normalize_activations`:
      "none" (or false/null, the pre-6 spellings): nothing.
      "expected_average_only_in" (pre-6: true): training multiplies every input by one constant s; the
      trainer folds s into the weights when it finishes (W_enc * s, W_dec / s, b_dec / s, W_skip and the
      threshold unchanged) and rewrites the field to "none". A checkpoint still saying so has s in
      `activation_scaler.json` beside it: we fold it the same way, which is exact, since
      (s x) @ W_enc == x @ (s W_enc). Without s the weights expect inputs scaled by an unknown factor: refused.
      (SAELens's own `load_from_disk` would run such a checkpoint unscaled.)
      "constant_norm_rescale" (x * sqrt(d_in) / |x|) and "layer_norm" ((x - mean) / (std + 1e-5)) rescale each
      input by its own norm (SAELens does not undo it on a transcoder's output). That is no fixed linear map,
      so it cannot be folded, and pullbacks and attributions here need an encoder affine in its hook's
      input: refused.
    - `reshape_activations` "hook_z", a `hook_head_index` (`hook_head_index_out`): the transcoder reads or
      writes attention heads' outputs, not an MLP's input and output: refused.
    - `finetuning_scaling_factor` (SAELens < 6: feature activations times a learnt vector): refused.
    """
    cfg_path, meta = directory / SAELENS_CFG, raw.get("metadata") or {}

    def refuse(field: str, value, why: str) -> TranscoderError:
        return TranscoderError(f"{cfg_path}: {field}={json.dumps(value)} is not supported: {why}")

    if raw.get("apply_b_dec_to_input"):
        raise refuse("apply_b_dec_to_input", raw["apply_b_dec_to_input"],
                     "a transcoder's b_dec is its output bias (SAELens refuses it for transcoders too)")
    if raw.get("finetuning_scaling_factor"):
        raise refuse("finetuning_scaling_factor", raw["finetuning_scaling_factor"], "scaled feature activations are not read")
    reshape = raw.get("reshape_activations") or "none"
    if reshape != "none":
        raise refuse("reshape_activations", reshape, "transcoders here read an MLP input, not attention heads")
    for field in ("hook_head_index", "hook_point_head_index", "hook_head_index_out"):
        value = meta.get(field, raw.get(field))
        if value is not None:
            raise refuse(field, value, "transcoders here read and write whole residual-width vectors, not one head")
    norm = raw.get("normalize_activations")
    if norm is None or isinstance(norm, bool):  # the pre-6 spellings
        norm = "expected_average_only_in" if norm else "none"
    if norm not in _SAELENS_NORMS:
        raise refuse("normalize_activations", norm, f"SAELens knows {', '.join(_SAELENS_NORMS)}")
    if norm in ("constant_norm_rescale", "layer_norm"):
        raise refuse("normalize_activations", norm,
                     "it rescales each input by its own norm, which no fixed linear map (and no pullback) can carry")
    if norm == "none":
        return None
    scale = _scaler_factor(directory / SAELENS_SCALER)
    if scale is None:
        raise refuse("normalize_activations", norm,
                     f"the weights expect inputs times a factor that is not given ({SAELENS_SCALER} with scaling_factor)")
    return scale


def _scaler_factor(path: Path) -> float | None:
    """The `scaling_factor` of SAELens's `activation_scaler.json`, if the file gives a usable one."""
    try:
        value = json.loads(path.read_text()).get("scaling_factor")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        return None
    return float(value)


def save_saelens(tc: Transcoder, directory: Path) -> None:
    """Write `cfg.json` + `sae_weights.safetensors` as SAELens 6 does (W_skip stored [d_out, d_in])."""
    c = tc.cfg
    if c.activation == "topk":
        raise TranscoderError("SAELens has no TopK transcoder architecture; save TopK transcoders another way")
    if tc.n_later:
        raise TranscoderError("SAELens has no cross-layer transcoder architecture; save CLTs with save_circuit_tracer_clt")
    arch = ("jumprelu_" if c.activation == "jumprelu" else "") + ("skip_" if tc.W_skip is not None else "") + "transcoder"
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": tc.W_enc, "b_enc": tc.b_enc, "W_dec": tc.W_dec, "b_dec": tc.b_dec}
    if tc.W_skip is not None:
        tensors["W_skip"] = tc.W_skip.T
    if tc.threshold is not None:
        tensors["threshold"] = tc.threshold
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, directory / SAELENS_WEIGHTS)
    cfg = {
        "architecture": arch, "d_in": c.d_in, "d_sae": c.d_sae, "d_out": c.d_out, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": c.model_name, "hook_name": c.hook_in, "hook_name_out": c.hook_out,
            "hook_layer": c.layer, "hook_head_index": None, "prepend_bos": True,
        },
    }
    (directory / SAELENS_CFG).write_text(json.dumps(cfg, indent=2))


# ---------------------------------------------------------------- circuit-tracer


def load_circuit_tracer(directory: Path) -> TranscoderSet:
    """circuit-tracer's `config.yaml`: its own layouts, or a list of Gemma Scope files (`params.npz`, Gemma
    Scope 2 `params.safetensors`), local or `hf://`, read with the config's hooks."""
    from circuit_catalog.ingest.release_formats import (  # they build on this module
        GS1_WEIGHTS,
        GS2_WEIGHTS,
        load_gemma_scope_files,
    )

    cfg_path = directory / CT_CONFIG
    try:
        raw = yaml.safe_load(cfg_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise TranscoderError(f"{cfg_path}: unreadable config ({exc})") from None
    kind = raw.get("model_kind", "transcoder_set")
    if kind not in ("transcoder_set", "cross_layer_transcoder"):
        raise TranscoderError(f"{cfg_path}: model_kind {kind!r} is not supported (transcoder_set or cross_layer_transcoder)")
    hook_in, hook_out = raw.get("feature_input_hook"), raw.get("feature_output_hook")
    if not hook_in or not hook_out:
        raise TranscoderError(f"{cfg_path}: needs feature_input_hook and feature_output_hook")
    entries = [_config_entry(entry, directory) for entry in raw.get("transcoders") or []]
    if entries and all(p.name in (GS1_WEIGHTS, GS2_WEIGHTS) for p in entries):  # circuit-tracer's Gemma Scope configs
        tset = load_gemma_scope_files(entries)
        for tc in tset:
            tc.cfg.hook_in, tc.cfg.hook_out = f"blocks.{tc.layer}.{hook_in}", f"blocks.{tc.layer}.{hook_out}"
        return TranscoderSet(tset.by_layer, [cfg_path, *tset.files], tset.format)
    if kind == "cross_layer_transcoder":
        return _load_circuit_tracer_clt(directory, raw, hook_in, hook_out)
    layer_files = dict(enumerate(entries))
    if not layer_files:
        for p in directory.glob("layer_*.safetensors"):
            layer_files[int(p.stem.split("_")[1])] = p
    if not layer_files:
        raise TranscoderError(f"{directory}: config.yaml but no layer_*.safetensors files")
    by_layer = {}
    for layer, p in sorted(layer_files.items()):
        w = _read_safetensors(p)
        _require(w, ("W_enc", "b_enc", "W_dec", "b_dec"), p)
        threshold = w.get("activation_function.threshold", w.get("threshold"))
        W_enc = w["W_enc"].T  # a view: the file's pages stay mapped (see mapped_weights)
        d_in, d_sae = W_enc.shape
        cfg = TranscoderConfig(
            layer=layer, d_in=d_in, d_sae=d_sae, d_out=w["b_dec"].shape[0],
            hook_in=f"blocks.{layer}.{hook_in}", hook_out=f"blocks.{layer}.{hook_out}",
            activation="jumprelu" if threshold is not None else "relu", model_name=raw.get("model_name", ""),
        )
        by_layer[layer] = Transcoder(
            cfg, W_enc, w["b_enc"], w["W_dec"], w["b_dec"], W_skip=_transposed(w.get("W_skip")),
            threshold=threshold, source=str(p),
        )
    return TranscoderSet(by_layer, [cfg_path, *layer_files.values()], "circuit-tracer")


def _config_entry(entry: str, directory: Path) -> Path:
    """A `transcoders:` entry of a circuit-tracer config: `hf://` fetched, `file://` or a path relative to the config."""
    from circuit_catalog.ingest.release_formats import HF_PREFIX, fetch_hub

    if entry.startswith(HF_PREFIX):
        found = fetch_hub(entry)
        if len(found) != 1:
            raise TranscoderError(f"{entry}: a transcoders: entry names one file, this matches {len(found)}")
        return found[0]
    p = Path(entry.removeprefix("file://"))
    return p if p.is_absolute() else directory / p


def _load_circuit_tracer_clt(directory: Path, raw: dict, hook_in: str, hook_out: str) -> TranscoderSet:
    """circuit-tracer's CLT layout: per source layer i, `W_enc_{i}.safetensors` (W_enc_{i} [d_sae, d_model],
    b_enc_{i}, b_dec_{i}, optional threshold_{i}) and `W_dec_{i}.safetensors` (W_dec_{i} [d_sae, n_layers - i,
    d_model], slice 0 writing into layer i itself)."""
    n_layers = len(list(directory.glob("W_enc_*.safetensors")))
    if not n_layers:
        raise TranscoderError(f"{directory}: a cross_layer_transcoder config.yaml but no W_enc_*.safetensors files")
    by_layer, files = {}, []
    for i in range(n_layers):
        enc_path, dec_path = directory / f"W_enc_{i}.safetensors", directory / f"W_dec_{i}.safetensors"
        for p in (enc_path, dec_path):
            if not p.is_file():
                raise TranscoderError(f"{p}: missing (a CLT of {n_layers} layers needs W_enc_0..{n_layers - 1} and W_dec_0..{n_layers - 1})")
        enc, dec = _read_safetensors(enc_path), _read_safetensors(dec_path)
        _require(enc, (f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"), enc_path)
        _require(dec, (f"W_dec_{i}",), dec_path)
        W_enc, W_dec = enc[f"W_enc_{i}"].T, dec[f"W_dec_{i}"]  # views of the mapped files, not copies
        if W_dec.dim() != 3 or W_dec.shape[1] != n_layers - i:
            raise TranscoderError(f"{dec_path}: W_dec_{i} has shape {tuple(W_dec.shape)}, expected (d_sae, {n_layers - i}, d_model)")
        threshold = enc.get(f"threshold_{i}")
        d_in, d_sae = W_enc.shape
        cfg = TranscoderConfig(
            layer=i, d_in=d_in, d_sae=d_sae, d_out=enc[f"b_dec_{i}"].shape[0],
            hook_in=f"blocks.{i}.{hook_in}", hook_out=f"blocks.{i}.{hook_out}",
            activation="jumprelu" if threshold is not None else "relu", model_name=raw.get("model_name", ""),
        )
        by_layer[i] = Transcoder(cfg, W_enc, enc[f"b_enc_{i}"], W_dec[:, 0], enc[f"b_dec_{i}"],
                                 threshold=None if threshold is None else threshold.reshape(-1), source=str(enc_path),
                                 W_dec_later=W_dec[:, 1:] if n_layers - i > 1 else None)
        files += [enc_path, dec_path]
    return TranscoderSet(by_layer, [directory / CT_CONFIG, *files], "circuit-tracer-clt")


def save_circuit_tracer_clt(tset: TranscoderSet, directory: Path, model_name: str = "") -> None:
    """Write a cross-layer set (layers 0..n-1, each writing into every later layer) as circuit-tracer's CLT layout."""
    n = len(tset.layers)
    if tset.layers != list(range(n)) or any(tc.n_later != n - 1 - tc.layer for tc in tset):
        raise TranscoderError("circuit-tracer's CLT layout needs layers 0..n-1, each writing into every later layer")
    if any(tc.cfg.activation == "topk" or tc.W_skip is not None for tc in tset):
        raise TranscoderError("circuit-tracer's CLT layout has no TopK activation and no skip path")
    first = tset[0].cfg
    rel_in, rel_out = (h.split(".", 2)[2] for h in (first.hook_in, first.hook_out))
    directory.mkdir(parents=True, exist_ok=True)
    for tc in tset:
        i = tc.layer
        enc = {f"W_enc_{i}": tc.W_enc.T, f"b_enc_{i}": tc.b_enc, f"b_dec_{i}": tc.b_dec}
        if tc.threshold is not None:
            enc[f"threshold_{i}"] = tc.threshold
        W_dec = tc.W_dec[:, None] if tc.W_dec_later is None else torch.cat([tc.W_dec[:, None], tc.W_dec_later], 1)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in enc.items()}, directory / f"W_enc_{i}.safetensors")
        save_file({f"W_dec_{i}": W_dec.detach().float().cpu().contiguous()}, directory / f"W_dec_{i}.safetensors")
    config = {"model_kind": "cross_layer_transcoder", "model_name": model_name or first.model_name,
              "scan": model_name or first.model_name or directory.name, "feature_input_hook": rel_in, "feature_output_hook": rel_out}
    (directory / CT_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))


def save_circuit_tracer(tset: TranscoderSet, directory: Path, model_name: str = "") -> None:
    """Write a set as circuit-tracer's local `transcoder_set` layout (layers must be 0..n-1)."""
    if tset.cross_layer:
        raise TranscoderError("a cross-layer set is written with save_circuit_tracer_clt")
    if tset.layers != list(range(len(tset.layers))):
        raise TranscoderError(f"circuit-tracer needs transcoders for layers 0..n-1, got {tset.layers}")
    if any(tc.cfg.activation == "topk" for tc in tset):  # it would be read back as ReLU
        raise TranscoderError("circuit-tracer's transcoder_set has no TopK activation; save TopK transcoders as SAELens")
    first = tset[0].cfg
    rel_in, rel_out = (h.split(".", 2)[2] for h in (first.hook_in, first.hook_out))
    directory.mkdir(parents=True, exist_ok=True)
    for tc in tset:
        tensors = {"W_enc": tc.W_enc.T, "W_dec": tc.W_dec, "b_enc": tc.b_enc, "b_dec": tc.b_dec}
        if tc.W_skip is not None:
            tensors["W_skip"] = tc.W_skip.T
        if tc.threshold is not None:
            tensors["activation_function.threshold"] = tc.threshold
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, directory / f"layer_{tc.layer}.safetensors")
    config = {
        "model_kind": "transcoder_set", "model_name": model_name or first.model_name,
        "scan": model_name or first.model_name or directory.name,  # circuit-tracer's own loader requires it
        "feature_input_hook": rel_in, "feature_output_hook": rel_out,
        "transcoders": [f"layer_{layer}.safetensors" for layer in tset.layers],
    }
    (directory / CT_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))


# ---------------------------------------------------------------- original GPT-2 transcoders (pickle)


class _OriginalGPT2Object:
    """Stands in for classes of the original transcoders' training code (`sae_training`), which need not be importable."""

    def __setstate__(self, state) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)


class _OriginalGPT2Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.split(".")[0] in {"sae_training", "transcoder_circuits", "__main__"}:
            return type(name, (_OriginalGPT2Object,), {})
        return super().find_class(module, name)


_original_gpt2_pickle = types.SimpleNamespace(Unpickler=_OriginalGPT2Unpickler, load=pickle.load, __name__="original_gpt2_pickle")


def _load_original_gpt2(paths: list[Path], trust_pickle: bool) -> TranscoderSet:
    if not trust_pickle:
        raise TranscoderError(
            f"{paths[0]}: original GPT-2 transcoders are pickles, which can run code; pass --trust-pickle to load them"
        )
    by_layer = {}
    for p in paths:
        try:
            # read into host memory like every loader; `TranscoderSet.bind` moves the set to the model's device
            blob = torch.load(p, map_location="cpu", weights_only=False, pickle_module=_original_gpt2_pickle)
        except Exception as exc:  # any unpickling failure is a bad file, not a bug of ours
            raise TranscoderError(f"{p}: cannot unpickle ({type(exc).__name__}: {str(exc)[:120]})") from None
        if not isinstance(blob, dict) or "state_dict" not in blob or "cfg" not in blob:
            raise TranscoderError(f"{p}: expected a dict with 'cfg' and 'state_dict'")
        sd, cfg = blob["state_dict"], blob["cfg"]
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        _require(sd, ("W_enc", "b_enc", "W_dec", "b_dec", "b_dec_out"), p)
        hook_in = get("hook_point") or f"blocks.{ORIGINAL_GPT2_PATTERN.search(p.name).group(1)}.ln2.hook_normalized"
        layer = int(get("hook_point_layer", _layer_of(hook_in, p)))
        W_enc = sd["W_enc"].float()
        if sd["b_dec"].shape[0] != W_enc.shape[0]:
            raise TranscoderError(f"{p}: pre-bias b_dec has {sd['b_dec'].shape[0]} entries, W_enc has {W_enc.shape[0]} rows")
        # relu((x - b_dec) @ W_enc + b_enc) == relu(x @ W_enc + (b_enc - b_dec @ W_enc))
        b_enc = sd["b_enc"].float() - sd["b_dec"].float() @ W_enc
        cfg_ = TranscoderConfig(
            layer=layer, d_in=W_enc.shape[0], d_sae=W_enc.shape[1], d_out=sd["b_dec_out"].shape[0],
            hook_in=hook_in, hook_out=get("out_hook_point") or f"blocks.{layer}.hook_mlp_out",
            model_name=str(get("model_name", "gpt2-small")),
        )
        by_layer[layer] = Transcoder(cfg_, W_enc, b_enc, sd["W_dec"].float(), sd["b_dec_out"].float(), source=str(p))
    return TranscoderSet(by_layer, list(paths), "gpt2-original")


# ---------------------------------------------------------------- helpers


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A file's tensors as float32 views of its mapped pages (float32 files are not copied: see `mapped_weights`),
    in host memory whatever the model's device: `TranscoderSet.bind` moves the set there.

    Loaders read their files one after another, so the pages the previous file's validation touched are
    handed back first: loading holds about one file in memory."""
    if not path.is_file():
        raise TranscoderError(f"{path}: file not found")
    release_mapped()
    return {k: v.float() for k, v in read_mapped(path).items()}


def _require(tensors: dict, keys: tuple[str, ...], where: Path) -> None:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise TranscoderError(f"{where}: missing tensor(s) {', '.join(missing)}")


def _transposed(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.T


def _layer_of(hook: str, where: Path) -> int:
    m = _LAYER_IN_HOOK.match(hook)
    if not m:
        raise TranscoderError(f"{where}: cannot tell the layer from hook {hook!r}")
    return int(m.group(1))


def _files(directory: Path) -> list[Path]:
    """A SAELens directory's files that decide its weights (hashed into the manifest)."""
    scaler = directory / SAELENS_SCALER
    return [directory / SAELENS_CFG, directory / SAELENS_WEIGHTS] + ([scaler] if scaler.is_file() else [])
