"""Pullback ingest throughput at GPT-2-small size, as ratios measured in one run.

Prints: achieved GFLOP/s of the ingest path (blocked matmul + streaming top-k + Arrow ids + Parquet
write) over a stated fraction of the 66 layer pairs, torch's own large-matmul GFLOP/s, their ratio
(target >= 0.7), the speed-up over a per-feature loop in the seed code's style (target >= 50x), and
peak memory. Random transcoders: 12 layers x 24,576 features x d_model 768.

    .venv/bin/python bench/pullbacks.py [--pairs 3] [--loop-features 256]
    .venv/bin/python bench/pullbacks.py --smoke   # seconds, small matrices: what the test suite runs
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from circuit_catalog.catalog import layout  # noqa: E402
from circuit_catalog.catalog.parquet_io import write_atomic  # noqa: E402
from circuit_catalog.ingest.job import pullback_edges_table  # noqa: E402
from circuit_catalog.ingest.settings import IngestSettings

N_LAYERS, D_SAE, D_MODEL = 12, 24_576, 768
SMOKE_D_SAE, SMOKE_D_MODEL = 1024, 64


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def matmul_gflops(d_model: int, d_sae: int, seconds: float = 5.0) -> float:
    """torch's large fp32 matmul rate here: [4096, d_model] @ [d_model, d_sae], the shape of one ingest block."""
    a, b = torch.randn(4096, d_model), torch.randn(d_model, d_sae)
    a @ b  # warm up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return n * 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - start) / 1e9


def seed_style_loop(W_dec: torch.Tensor, W_enc: torch.Tensor, top_k: int, n_features: int) -> float:
    """Seconds per destination feature: one matrix-vector pullback and one top-k per feature, as the seed's notebooks do."""
    start = time.perf_counter()
    for f in range(n_features):
        pullback = W_dec @ W_enc[:, f]
        pullback.abs().topk(top_k)
    return (time.perf_counter() - start) / n_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3, help="layer pairs to time, of the 66 (default 3)")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--loop-features", type=int, default=256, help="features timed in the per-feature loop")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_D_SAE} features x d_model {SMOKE_D_MODEL}, 2 pairs: seconds")
    args = parser.parse_args()
    d_sae, d_model, seconds = (SMOKE_D_SAE, SMOKE_D_MODEL, 0.2) if args.smoke else (D_SAE, D_MODEL, 5.0)
    if args.smoke:
        args.pairs, args.loop_features = 2, 16

    torch.manual_seed(0)
    W_enc = [torch.randn(d_model, d_sae) / d_model**0.5 for _ in range(N_LAYERS)]
    W_dec = [torch.randn(d_sae, d_model) / d_model**0.5 for _ in range(N_LAYERS)]
    all_pairs = [(lo, hi) for hi in range(N_LAYERS) for lo in range(hi)]
    pairs = all_pairs[:: max(1, len(all_pairs) // args.pairs)][: args.pairs]
    rss_before = peak_rss_gib()
    settings = IngestSettings(top_k=args.top_k)

    reference = matmul_gflops(d_model, d_sae, seconds)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        edges = 0
        for lo, hi in pairs:
            table = pullback_edges_table(W_dec[lo], W_enc[hi], lo, hi, settings)
            write_atomic(table, layout.pullback_part(Path(tmp), lo, hi))
            edges += table.num_rows
        ingest_s = time.perf_counter() - start
    flops = len(pairs) * 2 * d_sae * d_sae * d_model
    ingest = flops / ingest_s / 1e9
    per_pair = ingest_s / len(pairs)
    loop_per_pair = seed_style_loop(W_dec[0], W_enc[1], args.top_k, args.loop_features) * d_sae

    print(f"size: {N_LAYERS} layers x {d_sae} features x d_model {d_model}; timed {len(pairs)} of {len(all_pairs)} pairs {pairs}")
    print(f"ingest: {ingest_s:.1f} s for {edges:,} edges ({per_pair:.2f} s/pair, all 66 pairs ~{per_pair * 66 / 60:.1f} min)")
    print(f"achieved {ingest:.1f} GFLOP/s; torch large matmul {reference:.1f} GFLOP/s; ratio {ingest / reference:.2f} (target >= 0.7)")
    print(f"per-feature loop (seed style, {args.loop_features} features timed): {loop_per_pair:.1f} s/pair; "
          f"speed-up {loop_per_pair / per_pair:.0f}x (target >= 50x)")
    print(f"peak RSS {peak_rss_gib():.2f} GiB (weights alone {2 * N_LAYERS * d_sae * d_model * 4 / 2**30:.2f} GiB; "
          f"before the run {rss_before:.2f} GiB)")


if __name__ == "__main__":
    main()
