"""Run decoderesearch/circuit-tracer's `attribute()` on one prompt and save the graph as .npz.

Runs INSIDE the separate circuit-tracer venv (see setup_venv.sh), never in the project's venv:

    DIR/bin/python run_attribute.py --model HF_DIR --transcoders TC_DIR --prompt TEXT --out OUT.npz \
        [--max-feature-nodes N] [--max-n-logits 10] [--desired-logit-prob 0.95] [--batch-size B] [--repeat R]
        [--prune NODE_T EDGE_T ...] [--graph OURS.npz] [--graph-files DIR --slug S --scan NAME]

--model is a local Hugging Face directory (save_pretrained layout); TransformerLens' official-name
lookup is bypassed: the TL config is built from the directory's config.json exactly as
ingest/models.py `_load_hf_dir` does, the weights are processed like the catalog's model
(--processing catalog: fold_ln, center_writing_weights, center_unembed, fold_value_biases) or like
circuit-tracer's own `from_pretrained_and_transcoders` (--processing native: no fold, no centering),
and the result is loaded into a `ReplacementModel.from_config(...)`.

--transcoders is a circuit-tracer `transcoder_set` directory (config.yaml + layer_{i}.safetensors),
as circuit_catalog.written by ingest.transcoder_formats.save_circuit_tracer. Paths listed in config.yaml are taken
relative to that directory (circuit-tracer itself would take them relative to the working directory).

Prints one JSON line; see NOTES.md for what the arrays in the .npz mean.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import gc
import io
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROCESSING = {
    # what the catalog's ingest/models.py applies (our transcoders were trained on this model)
    "catalog": dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True),
    # what circuit-tracer's TransformerLensReplacementModel.from_pretrained_and_transcoders applies
    # (fold_value_biases is HookedTransformer.from_pretrained's default there)
    "native": dict(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=True),
}


def fail(msg: str) -> None:
    print(f"run_attribute.py: {msg}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def quiet():
    """Silence TL/transformers chatter on stdout (the JSON line must be the only stdout output)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def hf4_compatible(directory: Path, tmp: Path) -> Path:
    """A view of a HF directory that transformers 4.x reads like 5.x did when it wrote it.

    transformers 5 writes `tokenizer_class: TokenizersBackend` (unknown to 4.x) and moves
    `rope_theta`/`rope_scaling` into `rope_parameters` (4.x would silently fall back to
    rope_theta=10000). Files needing no change are symlinked; nothing in `directory` is touched.
    """
    cfg = json.loads((directory / "config.json").read_text())
    tok_path = directory / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text()) if tok_path.is_file() else {}
    rope = cfg.get("rope_parameters")
    patch_cfg = isinstance(rope, dict) and cfg.get("rope_theta") is None  # written as null by transformers 5
    patch_tok = tok.get("tokenizer_class") == "TokenizersBackend"
    if not (patch_cfg or patch_tok):
        return directory
    view = tmp / "hf4"
    view.mkdir()
    for f in directory.iterdir():
        (view / f.name).symlink_to(f.resolve())
    if patch_cfg:
        cfg["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        (view / "config.json").unlink()
        (view / "config.json").write_text(json.dumps(cfg))
    if patch_tok:
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
        tok.pop("backend", None)
        (view / "tokenizer_config.json").unlink()
        (view / "tokenizer_config.json").write_text(json.dumps(tok))
    return view


def current_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def load_hooked_transformer(directory: Path, processing: str, n_ctx: int | None = None):
    """A plain HookedTransformer from a local HF directory, processed as asked."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config, get_pretrained_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # kept until exit: TL's set_tokenizer re-reads the tokenizer from its name_or_path later on
    tmp = Path(tempfile.mkdtemp(prefix="ct-model-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    # TL picks some architectures by substrings of the path ("llama", "gemma") before reading
    # config.json; a neutral link name makes it always read the config (as ingest/models.py does).
    link = tmp / "model"
    link.symlink_to(hf4_compatible(directory.resolve(), tmp), target_is_directory=True)
    hf_model = AutoModelForCausalLM.from_pretrained(link, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(link)
    cfg_dict = convert_hf_model_config(str(link))
    # TransformerLens 3.2's Llama conversion ignores rope_theta (3.9 reads it): SmolLM2's 100000 became 10000
    rope_theta = json.loads((link / "config.json").read_text()).get("rope_theta")
    if cfg_dict.get("positional_embedding_type") == "rotary" and "rotary_base" not in cfg_dict and rope_theta:
        cfg_dict["rotary_base"] = rope_theta
    cfg_dict.pop("quantization_method", None)
    cfg_dict["tokenizer_name"] = str(link)
    if n_ctx:
        cfg_dict["n_ctx"] = min(n_ctx, cfg_dict["n_ctx"])
    cfg = HookedTransformerConfig(**cfg_dict, device="cpu", dtype=torch.float32)
    state_dict = get_pretrained_state_dict(str(link), cfg, hf_model=hf_model, dtype=torch.float32)
    del hf_model
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, default_padding_side="right")
    model.load_and_process_state_dict(state_dict, refactor_factored_attn_matrices=False, **PROCESSING[processing])
    model.eval()
    return model


def load_transcoder_dir(directory: Path):
    """circuit-tracer TranscoderSet (config.yaml + layer_*.safetensors) or CrossLayerTranscoder
    (config.yaml + W_enc_*/W_dec_*.safetensors) from a local directory."""
    import torch
    import yaml
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    cfg_path = directory / "config.yaml"
    if not cfg_path.is_file():
        fail(f"{directory}: no config.yaml (expected a circuit-tracer transcoder_set directory)")
    config = yaml.safe_load(cfg_path.read_text()) or {}
    for key in ("feature_input_hook", "feature_output_hook"):
        if not config.get(key):
            fail(f"{cfg_path}: missing {key}")
    scan = config.get("scan") or config.get("model_name") or directory.name
    if config.get("model_kind") == "cross_layer_transcoder":
        from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

        clt = load_clt(str(directory), feature_input_hook=config["feature_input_hook"],
                       feature_output_hook=config["feature_output_hook"], scan=scan, device=torch.device("cpu"),
                       dtype=torch.float32, lazy_decoder=False, lazy_encoder=False)
        return clt, config
    if config.get("model_kind") != "transcoder_set":
        fail(f"{cfg_path}: model_kind {config.get('model_kind')!r}; transcoder_set or cross_layer_transcoder")
    entries = config.get("transcoders")
    if entries:
        paths = {}
        for i, entry in enumerate(entries):
            if entry.startswith("hf://"):
                fail(f"{cfg_path}: {entry} is a hub reference; only local files work offline")
            p = Path(entry.removeprefix("file://"))
            paths[i] = str(p if p.is_absolute() else directory / p)
    else:
        files = sorted(directory.glob("layer_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
        paths = {int(p.stem.split("_")[1]): str(p) for p in files}
    missing = [p for p in paths.values() if not Path(p).is_file()]
    if not paths or missing:
        fail(f"{directory}: transcoder files missing: {missing or 'none listed'}")
    tset = load_transcoder_set(
        paths, scan=scan, feature_input_hook=config["feature_input_hook"],
        feature_output_hook=config["feature_output_hook"], device=torch.device("cpu"), dtype=torch.float32,
        lazy_encoder=False, lazy_decoder=False,
    )
    return tset, config


def build_replacement_model(model, transcoders):
    """ReplacementModel.from_config + the processed weights of `model` (public API only)."""
    from circuit_tracer import ReplacementModel

    cfg = copy.deepcopy(model.cfg)
    cfg.init_weights = False  # weights are loaded right after
    rm = ReplacementModel.from_config(cfg, transcoders, backend="transformerlens", tokenizer=model.tokenizer,
                                      move_to_device=False, default_padding_side="right")
    # from_config wraps block.mlp and unembed (ReplacementMLP.old_mlp, ReplacementUnembed.old_unembed)
    target_keys = set(rm.state_dict())
    remapped = {}
    for k, v in model.state_dict().items():
        for cand in (k, k.replace(".mlp.", ".mlp.old_mlp.", 1), k.replace("unembed.", "unembed.old_unembed.", 1)):
            if cand in target_keys:
                remapped[cand] = v
                break
        else:
            raise RuntimeError(f"weight {k} has no place in the ReplacementModel")
    res = rm.load_state_dict(remapped, strict=False)
    missing = [k for k in res.missing_keys if not k.startswith("transcoders.")]  # the transcoders are loaded
    if missing or res.unexpected_keys:
        raise RuntimeError(f"weights do not fit the ReplacementModel: missing {missing}, unexpected {res.unexpected_keys}")
    rm.eval()
    return rm


def substitute(graph, path: str) -> None:
    """Put another tool's numbers for the same nodes into `graph` (shapes checked, nothing else assumed)."""
    import numpy as np
    import torch

    other = np.load(path, allow_pickle=False)
    A = torch.from_numpy(other["adjacency"]).float()
    if A.shape != graph.adjacency_matrix.shape:
        fail(f"{path}: adjacency {tuple(A.shape)}, circuit-tracer's graph has {tuple(graph.adjacency_matrix.shape)}")
    probabilities = torch.from_numpy(other["logit_probabilities"]).float()
    activations = torch.from_numpy(other["activation_values"]).float()
    if probabilities.shape != graph.logit_probabilities.shape or activations.shape != graph.selected_features.shape:
        fail(f"{path}: {len(probabilities)} logits and {len(activations)} features; circuit-tracer's graph has "
             f"{len(graph.logit_probabilities)} and {len(graph.selected_features)}")
    graph.adjacency_matrix = A
    graph.logit_probabilities = probabilities
    graph.activation_values = graph.activation_values.clone().float()
    graph.activation_values[graph.selected_features] = activations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="local Hugging Face model directory")
    ap.add_argument("--transcoders", required=True, help="circuit-tracer transcoder_set directory")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text; circuit-tracer tokenizes it without special tokens and prepends BOS")
    src.add_argument("--token-ids", help="comma-separated token ids (BOS prepended unless the first is special)")
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--max-feature-nodes", type=int, default=None)
    ap.add_argument("--max-n-logits", type=int, default=10)
    ap.add_argument("--desired-logit-prob", type=float, default=0.95)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1, help="attribute() calls; the min wall time is reported")
    ap.add_argument("--processing", choices=sorted(PROCESSING), default="catalog",
                    help="weight processing of the model (default: catalog's; see NOTES.md)")
    ap.add_argument("--prune", nargs=2, type=float, metavar=("NODE_T", "EDGE_T"), action="append", default=[],
                    help="also save circuit_tracer.graph.prune_graph's masks and cumulative scores at these "
                         "thresholds as prune_*_{i}, i counting the --prune options (repeatable)")
    ap.add_argument("--graph", help="an .npz of another tool's graph of the same prompt and nodes (adjacency, "
                                     "logit_probabilities, activation_values of the selected features): scores, "
                                     "pruning and graph files are computed on it instead of attribute()'s own")
    ap.add_argument("--graph-files", metavar="DIR", help="also write circuit-tracer's graph files (create_graph_files) "
                                                          "at the first --prune thresholds (default 0.8 0.98) into DIR")
    ap.add_argument("--slug", default="graph", help="slug of the graph files")
    ap.add_argument("--scan", default=None, help="scan name of the graph files (default: the transcoder set's)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--n-ctx", type=int, default=1024,
                    help="cap the TL context length (default 1024; 0: the model's own). TL keeps an n_ctx^2 "
                         "attention mask per layer (SmolLM2: 8192 -> ~6 GB more RSS); shorter prompts are unaffected")
    ap.add_argument("--verbose", action="store_true", help="attribute(verbose=True): phase timings on stderr")
    args = ap.parse_args()

    model_dir, tc_dir = Path(args.model), Path(args.transcoders)
    if not (model_dir / "config.json").is_file():
        fail(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    if args.repeat < 1:
        fail("--repeat must be >= 1")

    from importlib.metadata import version

    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    with quiet():
        from circuit_tracer import attribute
        from circuit_tracer.graph import compute_graph_scores, prune_graph

        transcoders, tc_config = load_transcoder_dir(tc_dir)
        base = load_hooked_transformer(model_dir, args.processing, args.n_ctx)
        if transcoders.n_layers != base.cfg.n_layers:
            fail(f"{tc_dir}: {transcoders.n_layers} transcoder layers, the model has {base.cfg.n_layers}")
        model = build_replacement_model(base, transcoders)
        del base
        gc.collect()
    load_s = time.perf_counter() - t0
    rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_before = current_rss_mb()

    prompt = args.prompt if args.prompt is not None else [int(t) for t in args.token_ids.split(",") if t.strip()]
    times, graph = [], None
    for _ in range(args.repeat):
        graph = None
        t = time.perf_counter()
        with (contextlib.nullcontext() if args.verbose else quiet()):
            graph = attribute(
                prompt, model, max_n_logits=args.max_n_logits, desired_logit_prob=args.desired_logit_prob,
                batch_size=args.batch_size, max_feature_nodes=args.max_feature_nodes, verbose=args.verbose,
            )
        times.append(time.perf_counter() - t)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    n_layers, n_pos = graph.cfg.n_layers, len(graph.input_tokens)
    n_feat, n_logits = len(graph.selected_features), len(graph.logit_targets)
    n_err, n_tok = n_layers * n_pos, n_pos
    if args.graph:
        substitute(graph, args.graph)
    A = graph.adjacency_matrix
    assert A.shape == (n_feat + n_err + n_tok + n_logits,) * 2, A.shape
    replacement, completeness = compute_graph_scores(graph)

    out = dict(
        adjacency=A.float().numpy(),  # [target, source]
        active_features=graph.active_features.long().numpy(),  # (layer, pos, feature_idx), all active
        activation_values=graph.activation_values.float().numpy(),  # aligned with active_features
        selected_features=graph.selected_features.long().numpy(),  # indices into active_features, = feature nodes
        logit_targets=np.array([t.vocab_idx for t in graph.logit_targets], dtype=np.int64),
        logit_target_strs=np.array([t.token_str for t in graph.logit_targets]),
        logit_probabilities=graph.logit_probabilities.float().numpy(),
        input_tokens=graph.input_tokens.long().cpu().numpy(),
        input_string=np.array(graph.input_string),
        node_order=np.array(["feature", "error", "token", "logit"]),
        node_counts=np.array([n_feat, n_err, n_tok, n_logits], dtype=np.int64),
        node_offsets=np.array([0, n_feat, n_feat + n_err, n_feat + n_err + n_tok], dtype=np.int64),
        n_layers=np.int64(n_layers), n_pos=np.int64(n_pos), n_active_features=np.int64(len(graph.active_features)),
        wall_times_s=np.array(times), wall_time_s=np.float64(min(times)), load_time_s=np.float64(load_s),
        peak_rss_mb=np.float64(peak_rss), peak_rss_after_load_mb=np.float64(rss_after_load),
        rss_before_attribute_mb=np.float64(rss_before),
        replacement_score=np.float64(replacement), completeness_score=np.float64(completeness),
        processing=np.array(args.processing),
        feature_input_hook=np.array(tc_config["feature_input_hook"]),
        feature_output_hook=np.array(tc_config["feature_output_hook"]),
        versions=np.array(json.dumps({p: version(p) for p in ("circuit-tracer", "transformer-lens", "transformers", "torch")})),
    )
    for i, (node_t, edge_t) in enumerate(args.prune):
        with quiet():
            pr = prune_graph(graph, node_threshold=node_t, edge_threshold=edge_t)
        out.update({f"prune_node_mask_{i}": pr.node_mask.numpy(), f"prune_edge_mask_{i}": pr.edge_mask.numpy(),
                    f"prune_cumulative_scores_{i}": pr.cumulative_scores.float().numpy()})
    if args.prune:
        out["prune_thresholds"] = np.array(args.prune)
    if args.graph_files:
        from circuit_tracer.utils.create_graph_files import create_graph_files

        node_t, edge_t = args.prune[0] if args.prune else (0.8, 0.98)
        with quiet():
            create_graph_files(graph, args.slug, args.graph_files, scan=args.scan or transcoders.scan,
                               node_threshold=node_t, edge_threshold=edge_t)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)

    summary = {
        "out": str(args.out), "n_pos": n_pos, "n_layers": n_layers, "n_active_features": int(len(graph.active_features)),
        "n_feature_nodes": n_feat, "n_error_nodes": n_err, "n_token_nodes": n_tok, "n_logits": n_logits,
        "wall_time_s": round(min(times), 4), "wall_times_s": [round(x, 4) for x in times],
        "load_time_s": round(load_s, 2), "peak_rss_mb": round(peak_rss, 1),
        "peak_rss_after_load_mb": round(rss_after_load, 1), "rss_before_attribute_mb": round(rss_before, 1),
        "replacement_score": round(replacement, 4), "completeness_score": round(completeness, 4),
        "processing": args.processing, "threads": torch.get_num_threads(),
        "circuit_tracer": version("circuit-tracer"),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
