"""Attention heads: OV pullbacks per head against torch's matmul rate, and head-resolved graphs against plain ones.

1. OV pullbacks (`ingest.heads`): (attention layer m, target layer L <= m) parts of a catalog, feature and token
   sources, timed (`--parts N`: N parts spread evenly over the list, the rate extrapolated to all; 0: every part);
   the useful FLOPs (each head's [n_src, d_head] x [d_head, d_sae] scores, its [d_vocab, d_head] x
   [d_head, d_sae] token scores, and the factor products) over the time, against torch's rate on one score-sized
   matmul measured in the same run.
2. Head-resolved graphs (`ingest.head_terms`): one prompt's attribution graph and pruning, then its pruned edges split
   by head; the extra time over the plain graph (target <= 1.5x in all).

    python bench/heads.py [--smoke] [--transcoders DIR] [--d-sae 1536] [--max-feature-nodes 1024] [--parts 24]

--smoke: a tiny Llama-style model (rotary, GQA) with random transcoders (seconds). Otherwise SmolLM2-135M (30 layers x
9 heads, 3 key-value heads) with the transcoders at --transcoders, or random ones of width --d-sae where none exist.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def part_flops(model, tset, m: int, L: int) -> float:
    """Useful FLOPs of one OV part: each head's feature and token scores, its W_O @ W_enc factor, and the sources'
    value-side products (per key-value head where heads share them)."""
    cfg = model.cfg
    n_src = sum(tset[lo].cfg.d_sae for lo in tset.layers if lo < m)
    d_sae = tset[L].cfg.d_sae
    flops = 2 * cfg.n_heads * (n_src + cfg.d_vocab) * cfg.d_head * d_sae  # scores
    flops += 2 * cfg.n_heads * cfg.d_head * cfg.d_model * d_sae  # B = W_O @ W_enc per head
    value_heads = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    return flops + sum(2 * tset[lo].cfg.d_sae * cfg.d_model * cfg.d_head * value_heads for lo in tset.layers if lo < m)


def ov_pullbacks(model, tset, top_k: int, n_parts: int) -> None:
    import torch
    from circuit_catalog.ingest.heads import head_pairs, ov_table, ov_token_table

    cfg = model.cfg
    every = head_pairs(model, tset)
    pairs = every if not n_parts or n_parts >= len(every) else [every[i * len(every) // n_parts] for i in range(n_parts)]
    flops, flops_all = (sum(part_flops(model, tset, m, L) for m, L in chosen) for chosen in (pairs, every))
    rows = 0
    start = time.perf_counter()
    for m, L in pairs:
        rows += ov_table(model, tset, m, L, top_k).num_rows + ov_token_table(model, tset, m, L, top_k).num_rows
    elapsed = time.perf_counter() - start
    d_sae = tset[tset.layers[-1]].cfg.d_sae
    a, b = torch.randn(max(d_sae * 4, 4096), cfg.d_head), torch.randn(cfg.d_head, d_sae)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        a @ b
        reps += 1
    torch_rate = reps * 2 * a.shape[0] * cfg.d_head * d_sae / (time.perf_counter() - t0)
    print(f"OV pullbacks: {cfg.n_layers} layers x {cfg.n_heads} heads, {len(pairs)} of {len(every)} parts timed, {rows:,} edges "
          f"(top {top_k} per feature and head, features and tokens) in {elapsed:.2f} s; all parts ~{elapsed * flops_all / flops / 60:.1f} min",
          flush=True)
    print(f"  achieved {flops / elapsed / 1e9:.1f} GFLOP/s of useful products; torch's [{a.shape[0]}, {cfg.d_head}] x "
          f"[{cfg.d_head}, {d_sae}] matmul {torch_rate / 1e9:.1f} GFLOP/s: {flops / elapsed / torch_rate:.2f} of it")


def head_resolved(model, tset, prompt: str, max_feature_nodes: int, repeat: int) -> None:
    from circuit_catalog.ingest.attribution import attribute
    from circuit_catalog.ingest.head_terms import head_terms
    from circuit_catalog.ingest.pruning import prune

    plain, extra, n_edges = [], [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        graph = attribute(model, tset, prompt, max_feature_nodes=max_feature_nodes)
        pruned = prune(graph, 0.8, 0.98)
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        dst, src = pruned.edge_mask.nonzero(as_tuple=True)
        head_terms(model, tset, graph, dst, src)
        extra.append(time.perf_counter() - start)
        n_edges = len(dst)
    p, e = min(plain), min(extra)
    print(f"head-resolved graph of {prompt!r}: plain graph + pruning {p:.2f} s, per-head terms of its {n_edges:,} pruned edges "
          f"{e:.2f} s: {(p + e) / p:.2f}x the plain graph (target <= 1.5x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model only (seconds)")
    ap.add_argument("--transcoders", type=Path, default=ROOT / "data" / "smollm2-135m" / "transcoders")
    ap.add_argument("--d-sae", type=int, default=1536)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--max-feature-nodes", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--parts", type=int, default=24, help="OV parts timed, spread over the list (0: all)")
    args = ap.parse_args()

    from circuit_catalog.ingest.models import load_model
    from circuit_catalog.ingest.transcoder_formats import load_transcoders

    from tests.conftest import build_hf_model, random_transcoders

    with tempfile.TemporaryDirectory(prefix="bench-heads-") as t:
        if args.smoke:
            model = load_model(str(build_hf_model(Path(t) / "llama", "llama")))
            tset = random_transcoders(model, d_sae=64, seed=1)
            prompt = "the jury said the city election was good . the capital of france is"
        else:
            model = load_model("smollm2-135m")
            tset = load_transcoders(args.transcoders) if args.transcoders.is_dir() else random_transcoders(model, d_sae=args.d_sae, seed=0)
            tset.bind(model)
            prompt = "The capital of France is"
        ov_pullbacks(model, tset, args.top_k, 0 if args.smoke else args.parts)
        head_resolved(model, tset, prompt, args.max_feature_nodes, args.repeat)


if __name__ == "__main__":
    main()
