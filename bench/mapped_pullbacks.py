"""Pullback ingest over memory-mapped transcoder files: compute rate against torch's matmul, and peak
memory against the set's size on disk, measured in one run.

Writes a random set in circuit-tracer's layout (a per-layer `transcoder_set`, or a CLT with `--clt`) of
the given shape into a temporary directory, loads it as the ingest does (mapped, `ingest.mapped_weights`),
and runs the ingest's pullback step (`pullback_edges_table`, releasing the pages after each pair) over
a few layer pairs, extrapolating to every pair. Printed: GFLOP/s of the pullback step (its score matmuls,
2 * n_src * n_dst * d_model per pair) over torch's matmul rate on the same shapes in memory (target >= 0.8),
and peak RSS over the weights' size on disk (target < 0.5).

    python bench/mapped_pullbacks.py                    # Gemma-2-2B shape: 26 layers, d_model 2304, 16,384 features
    python bench/mapped_pullbacks.py --clt --layers 6   # a CLT (its layer-0 decoder alone is 26 slices)
    python bench/mapped_pullbacks.py --smoke            # seconds
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_set(directory: Path, n_files: int, n_layers: int, d_model: int, d_sae: int, clt: bool) -> int:
    """The first `n_files` layers of an `n_layers` set (a CLT's decoders reach every later layer); bytes written."""
    import yaml

    g = torch.Generator().manual_seed(0)
    directory.mkdir(parents=True)
    for i in range(n_files):
        W_enc = torch.randn(d_sae, d_model, generator=g) / d_model**0.5
        common = {"b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d_model)}
        if clt:
            save_file({f"W_enc_{i}": W_enc, **{f"{k}_{i}": v for k, v in common.items()}}, directory / f"W_enc_{i}.safetensors")
            W_dec = torch.empty(d_sae, n_files - i, d_model)
            for j in range(n_files - i):
                W_dec[:, j] = torch.randn(d_sae, d_model, generator=g) / d_model**0.5
            save_file({f"W_dec_{i}": W_dec}, directory / f"W_dec_{i}.safetensors")
            del W_dec
        else:
            save_file({"W_enc": W_enc, "W_dec": torch.randn(d_sae, d_model, generator=g) / d_model**0.5, **common},
                      directory / f"layer_{i}.safetensors")
    config = {"model_kind": "cross_layer_transcoder" if clt else "transcoder_set", "scan": "bench",
              "feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out"}
    if not clt:
        config["transcoders"] = [f"layer_{i}.safetensors" for i in range(n_files)]
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return sum(p.stat().st_size for p in directory.iterdir())


def peak_rss_mb() -> float:
    """This process's peak resident set (MiB). Linux's VmHWM, which starts afresh at exec; `ru_maxrss` does not (it
    carried the writing parent's peak into the measuring child)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8, help="layers written and timed (of --model-layers)")
    ap.add_argument("--model-layers", type=int, default=26)
    ap.add_argument("--d-model", type=int, default=2304)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--clt", action="store_true", help="a cross-layer transcoder instead of a per-layer set")
    ap.add_argument("--smoke", action="store_true", help="a tiny shape, seconds")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the measuring child process, on a written set
    args = ap.parse_args()
    if args.smoke:
        args.layers, args.model_layers, args.d_model, args.d_sae = 3, 3, 64, 256
    if args.measure:
        measure(args, args.measure)
        return
    with tempfile.TemporaryDirectory(prefix="bench-mapped-") as tmp:
        directory = Path(tmp) / "set"
        start = time.perf_counter()
        size = write_set(directory, args.layers, args.model_layers, args.d_model, args.d_sae, args.clt)
        print(f"wrote {size / 2**30:.2f} GiB ({'CLT' if args.clt else 'per-layer set'}, {args.layers} of "
              f"{args.model_layers} layers, d_model {args.d_model}, {args.d_sae} features) in {time.perf_counter() - start:.0f} s",
              flush=True)
        # measured in a fresh process, so its peak RSS is the ingest's own, not the writing's
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--measure", str(directory)], check=True)


def measure(args, directory: Path) -> None:
    from circuit_catalog.ingest.job import pullback_edges_table
    from circuit_catalog.ingest.settings import IngestSettings
    from circuit_catalog.ingest.transcoder_formats import load_transcoders

    settings = IngestSettings(top_k=args.top_k)
    size = sum(p.stat().st_size for p in directory.iterdir())
    base = peak_rss_mb()
    tset = load_transcoders(directory)
    print(f"loaded: peak RSS {peak_rss_mb():.0f} MiB (before loading {base:.0f} MiB)")
    # source-major, as the ingest runs them: a CLT source's write into each reader is one running sum
    pairs = [(lo, hi) for lo in range(args.layers) for hi in range(lo + 1, args.layers)][: max(3, args.layers)]
    seconds = 0.0
    for lo in sorted({lo for lo, _ in pairs}):
        start = time.perf_counter()
        for hi, write in tset.writes_from(lo, [h for source, h in pairs if source == lo]):
            pullback_edges_table(write, tset[hi].W_enc, lo, hi, settings)  # pages handed back by writes_from
        seconds += time.perf_counter() - start
    flops = 2.0 * args.d_sae * args.d_sae * args.d_model * len(pairs)
    ours = flops / seconds / 1e9
    a, b = torch.randn(2048, args.d_model), torch.randn(args.d_model, args.d_sae)
    torch.matmul(a, b)
    start, reps = time.perf_counter(), 0
    while time.perf_counter() - start < 2.0:
        torch.matmul(a, b)
        reps += 1
    reference = 2.0 * 2048 * args.d_model * args.d_sae * reps / (time.perf_counter() - start) / 1e9
    all_pairs = args.model_layers * (args.model_layers - 1) // 2
    peak = peak_rss_mb()
    print(f"pullbacks: {len(pairs)} pairs in {seconds:.1f} s, {ours:.1f} GFLOP/s; torch matmul {reference:.1f} GFLOP/s; "
          f"ratio {ours / reference:.2f} (target >= 0.8); all {all_pairs} pairs ~{seconds / len(pairs) * all_pairs / 60:.1f} min")
    print(f"peak RSS {peak:.0f} MiB, {peak * 2**20 / size:.2f} x the set on disk (target < 0.5)")


if __name__ == "__main__":
    main()
