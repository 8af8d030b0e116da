"""One conversion point per on-disk transcoder format.

- SAELens: a directory with `cfg.json` + `sae_weights.safetensors` (architectures transcoder,
  skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder); a set is a parent directory with
  one such directory per layer.
- circuit-tracer: `config.yaml` + `layer_{i}.safetensors`, W_enc stored [d_sae, d_model],
  W_skip stored [d_out, d_in], JumpReLU threshold under `activation_function.threshold`.
- the original GPT-2 transcoders of the transcoder paper: pickled `.pt` files holding `cfg` and
  `state_dict`, with an input pre-bias `b_dec` (folded into `b_enc` here) and output bias `b_dec_out`.
  Pickle runs code, so these load only when the caller passes `trust_pickle=True`.
"""

from __future__ import annotations

import json
import pickle
import re
import types
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from catalog.errors import TranscoderError
from ingest.transcoder import Transcoder, TranscoderConfig, TranscoderSet

SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
CT_CONFIG = "config.yaml"
SEED_PATTERN = re.compile(r"final_sparse_autoencoder_.*blocks\.(\d+)\..*\.pt$")
_LAYER_IN_HOOK = re.compile(r"blocks\.(\d+)\.")

_SAELENS_ARCH = {
    # architecture -> (activation, has skip)
    "transcoder": ("relu", False),
    "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", False),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}


def load_transcoders(path: str | Path, trust_pickle: bool = False) -> TranscoderSet:
    """Detect the format of `path` and load every transcoder in it."""
    path = Path(path)
    if not path.exists():
        raise TranscoderError(f"transcoders not found: {path}")
    if path.is_file():
        if SEED_PATTERN.search(path.name):
            return _load_seed([path], trust_pickle)
        raise TranscoderError(f"{path}: not a transcoder directory or an original GPT-2 transcoder .pt file")
    if (path / SAELENS_CFG).is_file():
        tc = load_saelens(path)
        return TranscoderSet({tc.layer: tc}, _files(path), "saelens")
    if (path / CT_CONFIG).is_file():
        return load_circuit_tracer(path)
    subdirs = sorted(p for p in path.iterdir() if (p / SAELENS_CFG).is_file())
    if subdirs:
        by_layer: dict[int, Transcoder] = {}
        for sub in subdirs:
            tc = load_saelens(sub)
            if tc.layer in by_layer:
                raise TranscoderError(f"{sub}: a second transcoder for layer {tc.layer} (also {by_layer[tc.layer].source})")
            by_layer[tc.layer] = tc
        return TranscoderSet(by_layer, [f for sub in subdirs for f in _files(sub)], "saelens")
    seeds = sorted(p for p in path.iterdir() if SEED_PATTERN.search(p.name))
    if seeds:
        return _load_seed(seeds, trust_pickle)
    raise TranscoderError(
        f"{path}: no transcoders found (expected SAELens cfg.json dirs, a circuit-tracer config.yaml, "
        "or final_sparse_autoencoder_*.pt files)"
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
    w = _read_safetensors(weights_path)
    _require(w, ("W_enc", "b_enc", "W_dec", "b_dec"), weights_path)
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


def save_saelens(tc: Transcoder, directory: Path) -> None:
    """Write `cfg.json` + `sae_weights.safetensors` as SAELens 6 does (W_skip stored [d_out, d_in])."""
    c = tc.cfg
    if c.activation == "topk":
        raise TranscoderError("SAELens has no TopK transcoder architecture; save TopK transcoders another way")
    arch = ("jumprelu_" if c.activation == "jumprelu" else "") + ("skip_" if tc.W_skip is not None else "") + "transcoder"
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": tc.W_enc, "b_enc": tc.b_enc, "W_dec": tc.W_dec, "b_dec": tc.b_dec}
    if tc.W_skip is not None:
        tensors["W_skip"] = tc.W_skip.T
    if tc.threshold is not None:
        tensors["threshold"] = tc.threshold
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, directory / SAELENS_WEIGHTS)
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
    cfg_path = directory / CT_CONFIG
    try:
        raw = yaml.safe_load(cfg_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise TranscoderError(f"{cfg_path}: unreadable config ({exc})") from None
    if raw.get("model_kind", "transcoder_set") != "transcoder_set":
        raise TranscoderError(f"{cfg_path}: model_kind {raw.get('model_kind')!r} is not supported (per-layer transcoder_set only)")
    hook_in, hook_out = raw.get("feature_input_hook"), raw.get("feature_output_hook")
    if not hook_in or not hook_out:
        raise TranscoderError(f"{cfg_path}: needs feature_input_hook and feature_output_hook")
    layer_files = {}
    for entry in raw.get("transcoders") or []:
        p = Path(entry.removeprefix("file://"))
        p = p if p.is_absolute() else directory / p
        layer_files[len(layer_files)] = p
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
        W_enc = w["W_enc"].T.contiguous()
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


def save_circuit_tracer(tset: TranscoderSet, directory: Path, model_name: str = "") -> None:
    """Write a set as circuit-tracer's local `transcoder_set` layout (layers must be 0..n-1)."""
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
        save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, directory / f"layer_{tc.layer}.safetensors")
    config = {
        "model_kind": "transcoder_set", "model_name": model_name or first.model_name,
        "scan": model_name or first.model_name or directory.name,  # circuit-tracer's own loader requires it
        "feature_input_hook": rel_in, "feature_output_hook": rel_out,
        "transcoders": [f"layer_{layer}.safetensors" for layer in tset.layers],
    }
    (directory / CT_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))


# ---------------------------------------------------------------- original GPT-2 transcoders (pickle)


class _SeedObject:
    """Stands in for classes of the seed's training package, which need not be importable here."""

    def __setstate__(self, state) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)


class _SeedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.split(".")[0] in {"sae_training", "transcoder_circuits", "__main__"}:
            return type(name, (_SeedObject,), {})
        return super().find_class(module, name)


_seed_pickle = types.SimpleNamespace(Unpickler=_SeedUnpickler, load=pickle.load, __name__="seed_pickle")


def _load_seed(paths: list[Path], trust_pickle: bool) -> TranscoderSet:
    if not trust_pickle:
        raise TranscoderError(
            f"{paths[0]}: original GPT-2 transcoders are pickles, which can run code; pass --trust-pickle to load them"
        )
    by_layer = {}
    for p in paths:
        try:
            blob = torch.load(p, map_location="cpu", weights_only=False, pickle_module=_seed_pickle)
        except Exception as exc:  # any unpickling failure is a bad file, not a bug of ours
            raise TranscoderError(f"{p}: cannot unpickle ({type(exc).__name__}: {str(exc)[:120]})") from None
        if not isinstance(blob, dict) or "state_dict" not in blob or "cfg" not in blob:
            raise TranscoderError(f"{p}: expected a dict with 'cfg' and 'state_dict'")
        sd, cfg = blob["state_dict"], blob["cfg"]
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        _require(sd, ("W_enc", "b_enc", "W_dec", "b_dec", "b_dec_out"), p)
        hook_in = get("hook_point") or f"blocks.{SEED_PATTERN.search(p.name).group(1)}.ln2.hook_normalized"
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
    if not path.is_file():
        raise TranscoderError(f"{path}: file not found")
    try:
        return {k: v.float() for k, v in load_file(path).items()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise TranscoderError(f"{path}: unreadable safetensors ({str(exc)[:120]}); truncated or corrupt?") from None


def _require(tensors: dict, keys: tuple[str, ...], where: Path) -> None:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise TranscoderError(f"{where}: missing tensor(s) {', '.join(missing)}")


def _transposed(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.T.contiguous()


def _layer_of(hook: str, where: Path) -> int:
    m = _LAYER_IN_HOOK.match(hook)
    if not m:
        raise TranscoderError(f"{where}: cannot tell the layer from hook {hook!r}")
    return int(m.group(1))


def _files(directory: Path) -> list[Path]:
    return [directory / SAELENS_CFG, directory / SAELENS_WEIGHTS]
