"""Activation-statistics throughput on SmolLM2-135M with the project's transcoders vs a bare forward pass.

Both are measured in this run on the same tokens; the ratio of their times is the figure
(target <= 1.25: statistics cost at most a quarter more than running the model).

    .venv/bin/python bench/stats.py --transcoders data/smollm2-135m/transcoders [--tokens 8192]
    .venv/bin/python bench/stats.py --smoke   # seconds: the tests' tiny GPT-2 and random transcoders
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from circuit_catalog.ingest.datasets import token_contexts  # noqa: E402
from circuit_catalog.ingest.models import load_model  # noqa: E402
from circuit_catalog.ingest.stats import collect_stats  # noqa: E402
from circuit_catalog.ingest.transcoder_formats import load_transcoders  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--transcoders", type=Path, default=Path("data/smollm2-135m/transcoders"))
    parser.add_argument("--dataset", default="brown")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--batch-contexts", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="the tests' tiny GPT-2, random transcoders, 256 tokens")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cc-bench-stats-") as tmp:
        if args.smoke:
            model, tset, args.dataset, args.tokens, ctx_len = tiny_case(Path(tmp))
        else:
            model, tset, ctx_len = load_model(args.model, device="cpu"), load_transcoders(args.transcoders), 128
        tokens = token_contexts(model.tokenizer, args.dataset, args.tokens, ctx_len)
    measure(model, tset, tokens, args.batch_contexts)


def tiny_case(tmp: Path):
    """(model, transcoders, dataset, tokens, ctx_len) of the size the test suite builds."""
    from tests.conftest import TEXT, build_hf_model, random_transcoders

    model = load_model(str(build_hf_model(tmp / "tiny-gpt2", "gpt2")), device="cpu")
    (tmp / "text.txt").write_text("\n\n".join([TEXT] * 20))
    return model, random_transcoders(model, d_sae=256), str(tmp / "text.txt"), 256, 32


def measure(model, tset, tokens: torch.Tensor, batch_contexts: int) -> None:
    last = max(tset.layers) + 1
    with torch.no_grad():
        model(tokens[:batch_contexts], stop_at_layer=last)  # warm up
        start = time.perf_counter()
        for i in range(0, len(tokens), batch_contexts):
            model(tokens[i : i + batch_contexts], stop_at_layer=last)
        bare = time.perf_counter() - start
    start = time.perf_counter()
    collect_stats(model, tset, tokens, k=20, batch_contexts=batch_contexts, progress=False)
    stats = time.perf_counter() - start
    n = tokens.numel()
    d_sae = tset[tset.layers[0]].cfg.d_sae
    print(f"{n:,} tokens, {len(tset.layers)} transcoders x {d_sae} features")
    print(f"bare forward: {n / bare:,.0f} tok/s; with statistics: {n / stats:,.0f} tok/s; ratio {stats / bare:.2f} (target <= 1.25)")


if __name__ == "__main__":
    main()
