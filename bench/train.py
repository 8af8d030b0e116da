"""Transcoder training throughput against the bare forward pass, measured in one run, and (with `--curve`) CE loss
recovered against training minutes.

Each variant trains transcoders for every layer of SmolLM2-135M (`--smoke`: a tiny GPT-2-style model) on the same
`--tokens` Brown tokens for one epoch, through `train_transcoders` itself: the collection of the MLP inputs and outputs
is the bare forward pass (tokens/s), the training loop the optimiser steps (steps/s, tokens/s), so the ratio says how
much a training token costs beyond reading it off the model. Variants: the seed's ReLU + L1 (dense decoder), BatchTopK
(sparse decoder) in float32, and BatchTopK with bfloat16 encoder matmuls where the CPU has them natively.

    python bench/train.py [--tokens 16384] [--d-sae 1536] [--k 32] [--minibatch 128] [--skip]
    python bench/train.py --curve --tokens 120000 --epochs 1 --curve-ce 6   # CE recovered against minutes
    python bench/train.py --smoke      # seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def variants(bf16_native: bool) -> list[tuple[str, dict]]:
    out = [("relu + L1, dense decoder, float32", dict(activation="relu", matmul_dtype="float32")),
           ("batchtopk, sparse decoder, float32", dict(activation="batchtopk", matmul_dtype="float32"))]
    if bf16_native:
        out.append(("batchtopk, sparse decoder, bfloat16 matmuls", dict(activation="batchtopk", matmul_dtype="bfloat16")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model (seconds)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--d-sae", type=int, default=1536)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--minibatch", type=int, default=128, help="the main job's")
    ap.add_argument("--skip", action="store_true", help="skip transcoders")
    ap.add_argument("--curve", action="store_true", help="one longer run of the default method, CE recovered measured along it")
    ap.add_argument("--curve-ce", type=int, default=6, help="--curve: CE measurements along the run")
    args = ap.parse_args()

    import torch
    from circuit_catalog.ingest.models import load_model
    from circuit_catalog.ingest.device import matmul_dtype_for, native_bf16
    from circuit_catalog.ingest.train import TrainConfig, train_transcoders

    with tempfile.TemporaryDirectory(prefix="bench-train-") as t:
        if args.smoke:
            from tests.conftest import TEXT, build_hf_model

            model = load_model(str(build_hf_model(Path(t) / "gpt2", "gpt2")))
            dataset = Path(t) / "text.txt"
            dataset.write_text(TEXT * 40)
            base = dict(model="smoke", dataset=str(dataset), d_sae=64, k=8, n_tokens=min(args.tokens, 4000), ctx_len=32,
                        batch_contexts=8, minibatch=64, eval_tokens=256)
        else:
            model = load_model("smollm2-135m")
            base = dict(model="smollm2-135m", dataset="brown", d_sae=args.d_sae, k=args.k, n_tokens=args.tokens, eval_tokens=512)
        base.update(layers=list(range(model.cfg.n_layers)), epochs=args.epochs, lr=args.lr, skip=args.skip)
        if not args.smoke:
            base["minibatch"] = args.minibatch
        device = model.W_E.device
        print(f"{model.cfg.n_layers} layers, d_model {model.cfg.d_model}, d_sae {base['d_sae']}, {base['n_tokens']:,} tokens x "
              f"{args.epochs} epoch(s), {torch.get_num_threads()} threads, native bf16: {native_bf16(device)}", flush=True)
        if args.curve:
            cfg = TrainConfig(**base, matmul_dtype=matmul_dtype_for("auto", device), curve_ce=args.curve_ce)
            result = train_transcoders(model, cfg, Path(t) / "curve", progress=True)
            print("CE loss recovered (all layers replaced, held-out tokens) against training minutes:")
            for p in (p for p in result.curve if p.ce_recovered is not None):
                print(f"  {p.seconds / 60:5.1f} min  {p.tokens:>9,} tokens  CE recovered {p.ce_recovered:.3f}  FVU {p.fvu:.3f}  L0 {p.l0:.1f}")
            print(f"held-out mean FVU {result.mean_fvu:.3f}; collect {result.seconds['collect']:.0f} s, train {result.seconds['train']:.0f} s")
            return
        forward_rates = []
        for name, overrides in variants(native_bf16(device)):
            cfg = TrainConfig(**base, **overrides)
            result = train_transcoders(model, cfg, Path(t) / overrides["activation"] / overrides["matmul_dtype"], progress=False)
            steps, tokens = result.curve[-1].step, result.curve[-1].tokens
            forward = base["n_tokens"] / result.seconds["collect"]
            forward_rates.append(forward)
            train_rate = tokens / result.seconds["train"]
            print(f"{name}: {steps / result.seconds['train']:.2f} steps/s, {train_rate:,.0f} training tokens/s; bare forward "
                  f"{forward:,.0f} tokens/s: a training token costs {forward / train_rate:.2f}x a forward token; held-out mean "
                  f"FVU {result.mean_fvu:.3f}, mean L0 {sum(m.l0 for m in result.metrics) / len(result.metrics):.1f}", flush=True)
        print(f"bare forward pass (collection) across the runs: {min(forward_rates):,.0f}-{max(forward_rates):,.0f} tokens/s")


if __name__ == "__main__":
    main()
