"""How closely our attribution graphs, pruning and scores agree with circuit-tracer's, in figures.

For each case both tools build the graph of the same prompt with the same model and transcoder files
(circuit-tracer in its own venv, see bench/circuit_tracer/). Printed per case: the edges compared (every
edge both define: feature/error sources, and token sources where the model has no position embedding,
into features and logits), the largest absolute difference and that difference over the largest |edge|;
then prune_graph's node and edge masks against ours, on circuit-tracer's own graph and on ours put into its
Graph object, at node thresholds 0.5/0.8/0.95 x edge thresholds 0.9/0.98 (differences expected: 0), and
the replacement/completeness scores. `tests/test_circuit_tracer.py` asserts the same on the tiny models.

    python bench/agreement.py [--transcoders DIR] [--smoke]

Cases: tiny GPT-2- and Llama-style models with random transcoders (what --smoke runs), then SmolLM2-135M
with --transcoders (default: the main job's), or, where none are trained, random ones of width 512.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

THRESHOLDS = [(n, e) for n in (0.5, 0.8, 0.95) for e in (0.9, 0.98)]


def run_circuit_tracer(ct_python: Path, model_dir: Path, tc_dir: Path, prompt: str, out: Path, cap: int | None, *extra: str) -> dict:
    prunes = [a for n, e in THRESHOLDS for a in ("--prune", str(n), str(e))]
    capping = [] if cap is None else ["--max-feature-nodes", str(cap)]
    subprocess.run([str(ct_python), str(ROOT / "bench" / "circuit_tracer" / "run_attribute.py"), "--model", str(model_dir),
                    "--transcoders", str(tc_dir), "--prompt", prompt, "--out", str(out), *capping,
                    "--batch-size", "64", *prunes, *extra], check=True, capture_output=True, text=True)
    return dict(np.load(out, allow_pickle=False))


def mask_differences(graph, ref: dict) -> tuple[int, int]:
    from circuit_catalog.ingest.pruning import prune

    nodes = edges = 0
    for i, (n, e) in enumerate(THRESHOLDS):
        pruned = prune(graph, n, e)
        nodes += int((pruned.node_mask != torch.from_numpy(ref[f"prune_node_mask_{i}"])).sum())
        edges += int((pruned.edge_mask != torch.from_numpy(ref[f"prune_edge_mask_{i}"])).sum())
    return nodes, edges


def case(name: str, model, model_dir: Path, tc_dir: Path, prompt: str, cap: int | None, ct_python: Path, tmp: Path) -> None:
    from circuit_catalog.ingest.attribution import attribute
    from circuit_catalog.ingest.pruning import graph_scores
    from circuit_catalog.ingest.transcoder_formats import load_transcoders

    graph = attribute(model, load_transcoders(tc_dir), prompt, max_feature_nodes=cap, batch_size=64)
    own = run_circuit_tracer(ct_python, model_dir, tc_dir, prompt, tmp / "own.npz", cap)
    ours_file = tmp / "ours.npz"
    np.savez(ours_file, adjacency=graph.adjacency.numpy(), logit_probabilities=graph.logit_probabilities.numpy(),
             activation_values=graph.activations.numpy())
    same = run_circuit_tracer(ct_python, model_dir, tc_dir, prompt, tmp / "same.npz", cap, "--graph", str(ours_file))

    features = own["active_features"][own["selected_features"]].tolist()
    if graph.tokens.tolist() != own["input_tokens"].tolist() or graph.logit_targets.tolist() != own["logit_targets"].tolist():
        print(f"{name}: different tokens or logit targets (ours {graph.tokens.tolist()} -> {graph.logit_targets.tolist()}, "
              f"circuit-tracer's {own['input_tokens'].tolist()} -> {own['logit_targets'].tolist()}); nothing compared")
        return
    if graph.features.tolist() != features:
        shared = len(set(map(tuple, graph.features.tolist())) & set(map(tuple, features)))
        print(f"{name}: the cap chose different features ({shared} of {len(features)} shared; {graph.n_active_features} "
              f"active, ours {len(graph.features)}); nothing compared")
        return
    positional = model.cfg.positional_embedding_type == "standard"
    targets = torch.cat([torch.arange(graph.n_features), torch.arange(graph.logit_index(0), graph.n_nodes)])
    sources = torch.arange(graph.token_index(0) if positional else graph.logit_index(0))
    A, R = graph.adjacency[targets][:, sources], torch.from_numpy(own["adjacency"])[targets][:, sources]
    compared = int(((A != 0) | (R != 0)).sum())
    diff = float((A - R).abs().max())
    own_nodes, own_edges = mask_differences(graph, own)
    same_nodes, same_edges = mask_differences(graph, same)
    replacement, completeness = graph_scores(graph)
    print(f"{name}: {graph.n_features} feature nodes ({graph.n_active_features} active), {len(graph.logit_targets)} logits")
    print(f"  edges compared {compared:,}; max |difference| {diff:.2e} ({diff / float(R.abs().max()):.1e} of the largest edge)"
          + ("; token sources left out (position embedding)" if positional else ""))
    print(f"  prune masks at {len(THRESHOLDS)} threshold pairs, differing entries: circuit-tracer's own graph "
          f"{own_nodes} nodes / {own_edges} edges; ours in its Graph {same_nodes} nodes / {same_edges} edges")
    print(f"  scores ours {replacement:.6f} / {completeness:.6f}; compute_graph_scores on ours "
          f"{float(same['replacement_score']):.6f} / {float(same['completeness_score']):.6f}, on its own "
          f"{float(own['replacement_score']):.6f} / {float(own['completeness_score']):.6f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transcoders", type=Path, default=ROOT / "data" / "smollm2-135m" / "transcoders")
    ap.add_argument("--max-feature-nodes", type=int, default=1024)
    ap.add_argument("--smoke", action="store_true", help="tiny models only (seconds)")
    args = ap.parse_args()

    from circuit_catalog.ingest.models import _gguf_to_hf_dir, cache_root, load_model, resolve_model
    from circuit_catalog.ingest.transcoder_formats import load_transcoders, save_circuit_tracer

    from tests.conftest import build_hf_model, random_transcoders

    venv = cache_root() / "circuit-tracer-venv"
    subprocess.run(["bash", str(ROOT / "bench" / "circuit_tracer" / "setup_venv.sh"), str(venv)], check=True, capture_output=True)
    ct_python = venv / "bin" / "python"
    with tempfile.TemporaryDirectory(prefix="bench-agree-") as t:
        tmp = Path(t)
        # GPT-2 uncapped: its token nodes differ (position embedding), so under a cap the two tools' influence
        # estimates, and with them the features chosen, can differ
        for arch, cap in (("gpt2", None), ("llama", args.max_feature_nodes)):
            model_dir = build_hf_model(tmp / arch, arch)
            model = load_model(str(model_dir), device="cpu")
            save_circuit_tracer(random_transcoders(model, d_sae=64, seed=1), tmp / f"{arch}-tc")
            case(f"tiny {arch} (3 layers, 3 x 64 features, cap {cap})", model, model_dir, tmp / f"{arch}-tc",
                 "the jury said the city election was good . the capital of france is", cap, ct_python, tmp)
        if args.smoke:
            return
        smol_dir = _gguf_to_hf_dir(Path(resolve_model("smollm2-135m").location))
        model = load_model("smollm2-135m", device="cpu")
        if args.transcoders.is_dir():
            tset, label = load_transcoders(args.transcoders), f"the transcoders at {args.transcoders}"
        else:
            tset, label = random_transcoders(model, d_sae=512, seed=0), "random transcoders of width 512"
        save_circuit_tracer(tset, tmp / "smol-tc")
        case(f"SmolLM2-135M, {label}", model, smol_dir, tmp / "smol-tc", "The capital of France is",
             args.max_feature_nodes, ct_python, tmp)


if __name__ == "__main__":
    main()
