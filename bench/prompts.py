"""Prompt sets: attribution graphs per minute end to end against the bare sweeps, bytes per prompt, the store's load
time, and `prompts-using` / `recurring` latency, measured in one run.

Prompts are the first words of Brown sentences (`--words`, default 9, so about 10 tokens with BOS). The catalog's
weight parts are written first and not timed; then `run_prompts` writes every prompt's graph (what `ingest
--prompts` does: attribution, pruning, head terms, Parquet parts, the index), timed end to end, against the sum of
the bare `attribute()` calls for the same prompts in the same run (target: end to end <= 1.3x the sweeps); bytes per
prompt by part at the default settings (target <= 1 MB: the unpruned edges beyond those into the logits, and the head
split beyond the 1,000 most influential edges, are options: `--unpruned-edges`, `--head-edges`). Then the
catalog is loaded into LadybugDB and the two prompt queries are timed over random features of the graphs (target:
p50 <= 10 ms embedded at 1,000 prompts).

    python bench/prompts.py [--prompts 200] [--transcoders DIR] [--d-sae 1536]
    python bench/prompts.py --smoke      # a tiny GPT-2-style model, seconds

Without trained transcoders at --transcoders, SmolLM2-135M gets random ones of width --d-sae (their graphs are
denser than trained ones', so bytes per prompt are an upper bound).
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def brown_prompts(n: int, words: int) -> list[str]:
    """The first `words` words of the first `n` distinct Brown sentences long enough."""
    from circuit_catalog.ingest.datasets import iter_texts

    seen: list[str] = []
    for text in iter_texts("brown"):
        for sentence in text.split(" . "):
            head = " ".join(sentence.split()[:words])
            if len(sentence.split()) > words and head not in seen:
                seen.append(head)
                if len(seen) == n:
                    return seen
    return seen


def sweep_rate(model, tset, text: str, batch: int) -> tuple[float, float]:
    """(GFLOP/s of one sweep of `batch` logit-like targets through every layer, torch's rate on its main matmul shape):
    the sweep is two [batch x positions, d_model] x [d_model, heads x d_head] matmuls a layer, so when it runs near
    torch's rate, stacking several prompts' targets into one sweep (bigger matmuls) cannot make it faster."""
    import torch
    from circuit_catalog.ingest.attribution import Sweep, Targets, prompt_tokens, trace_prompt

    cfg = model.cfg
    trace = trace_prompt(model, tset, prompt_tokens(model, text))
    sweep, n_pos = Sweep(model, tset, trace), len(trace.tokens)
    targets = Targets(torch.full((batch,), cfg.n_layers), torch.full((batch,), n_pos - 1), torch.randn(batch, cfg.d_model),
                      torch.zeros(batch))
    sweep.rows(targets)
    start = time.perf_counter()
    sweep.rows(targets)
    elapsed = time.perf_counter() - start
    flops = cfg.n_layers * 2 * (2 * batch * n_pos * cfg.d_model * cfg.n_heads * cfg.d_head)
    a, b = torch.randn(batch * n_pos, cfg.d_model), torch.randn(cfg.d_model, cfg.n_heads * cfg.d_head)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        a @ b
        reps += 1
    return flops / elapsed / 1e9, reps * 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - t0) / 1e9


SMOKE_TEXTS = ["the jury said the city", "the capital of france is", "she was in the house", "he said that the",
               "it was a good day for", "the election was held in"]


def smoke_model(tmp: Path):
    """The smoke runs' model and transcoders: a tiny GPT-2-style model saved under `tmp`, random transcoders of width 64."""
    from circuit_catalog.ingest.models import load_model

    from tests.conftest import build_hf_model, random_transcoders

    model = load_model(str(build_hf_model(tmp / "gpt2", "gpt2")))
    return model, random_transcoders(model, d_sae=64, seed=1)


def weights_catalog(model, tset, root: Path) -> None:
    """The catalog's weight parts (top-4 pullbacks), which prompt sets are added to."""
    from circuit_catalog.ingest.job import build_manifest, run_ingest
    from circuit_catalog.ingest.settings import IngestSettings

    run_ingest(model, tset, root, build_manifest(model, "bench", tset, "bench", IngestSettings(top_k=4)), progress=False)


def query_latencies(store, n_prompts: int, calls: int, prefix: str = "") -> None:
    """Print `prompts-using` (over random features of the graphs) and `recurring` p50/p99 in ms over `calls` calls each,
    after a warm-up call."""
    from circuit_catalog.queries.lookups import Lookups

    lookups = Lookups(store)
    features = sorted({r["f"] for r in store.run("MATCH (:PNode)-[:INSTANCE_OF]->(f:Feature) RETURN DISTINCT f.id AS f")})
    rng = random.Random(0)
    for name, call in (("prompts-using", lambda: lookups.prompts_using(rng.choice(features), 20)),
                       ("recurring", lambda: lookups.recurring(20))):
        call()
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        print(f"{prefix}{name}: p50 {statistics.median(times):.1f} ms, p99 {times[int(0.99 * (len(times) - 1))]:.1f} ms "
              f"at {n_prompts} prompts (target p50 <= 10 ms)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 6 prompts (seconds)")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--words", type=int, default=9)
    ap.add_argument("--transcoders", type=Path, default=ROOT / "data" / "smollm2-135m" / "transcoders")
    ap.add_argument("--d-sae", type=int, default=1536)
    ap.add_argument("--queries", type=int, default=200, help="prompts-using / recurring calls timed")
    ap.add_argument("--weights-from", type=Path, default=None,
                    help="copy the weight parts of this catalog (ingested from the same model and --transcoders) instead of "
                         "ingesting them first (untimed either way; saves minutes)")
    args = ap.parse_args()

    from circuit_catalog.catalog import layout
    from circuit_catalog.catalog.store import open_loaded_store
    from circuit_catalog.ingest.attribution import attribute
    from circuit_catalog.ingest.models import load_model
    from circuit_catalog.ingest.prompts import run_prompts
    from circuit_catalog.ingest.settings import AttributionSettings, PromptSpec
    from circuit_catalog.ingest.transcoder_formats import load_transcoders

    from tests.conftest import random_transcoders

    with tempfile.TemporaryDirectory(prefix="bench-prompts-") as t:
        if args.smoke:
            model, tset = smoke_model(Path(t))
            texts = SMOKE_TEXTS
        else:
            model = load_model("smollm2-135m")
            tset = load_transcoders(args.transcoders) if args.transcoders.is_dir() else random_transcoders(model, d_sae=args.d_sae, seed=0)
            tset.bind(model)
            texts = brown_prompts(args.prompts, args.words)
        settings = AttributionSettings()
        root = Path(t) / "catalog"
        if args.weights_from is not None:
            shutil.copytree(args.weights_from, root, ignore=shutil.ignore_patterns(layout.PROMPTS, layout.PROMPT_INDEX, "graph*", "*.loaded.json",
                                                                                  "supernode*", layout.FEATURE_TALLY, "ingest-receipt.json"))
        else:
            weights_catalog(model, tset, root)

        attribute(model, tset, texts[0], max_feature_nodes=settings.max_feature_nodes)  # warm-up (the first pass pays for set-up)
        start = time.perf_counter()
        run_prompts(model, tset, root, [PromptSpec(x) for x in texts], settings, progress=False)
        end_to_end = time.perf_counter() - start
        start = time.perf_counter()
        for x in texts:
            attribute(model, tset, x, max_feature_nodes=settings.max_feature_nodes, batch_size=settings.batch_size)
        sweeps = time.perf_counter() - start
        parts = [p for p in (root / layout.PROMPTS).rglob("*") if p.is_file()]
        per_prompt = sum(p.stat().st_size for p in parts) / len(texts)
        by_part: dict[str, float] = {}
        for p in parts:
            by_part[p.name] = by_part.get(p.name, 0.0) + p.stat().st_size / len(texts)
        print(f"{len(texts)} prompts: end to end {end_to_end:.1f} s ({len(texts) / end_to_end * 60:.1f} prompts/min), bare sweeps "
              f"{sweeps:.1f} s: {end_to_end / sweeps:.2f}x (target <= 1.3x)", flush=True)
        rate, torch_rate = sweep_rate(model, tset, texts[0], settings.batch_size)
        print(f"one sweep of {settings.batch_size} targets: {rate:.1f} GFLOP/s of its OV matmuls, torch's rate on that shape "
              f"{torch_rate:.1f} GFLOP/s ({rate / torch_rate:.2f} of it): batching prompts into one sweep would make bigger "
              "matmuls, not fewer FLOPs", flush=True)
        print(f"bytes per prompt {per_prompt / 1e6:.2f} MB at the default settings (target <= 1 MB): "
              + ", ".join(f"{name} {size / 1e6:.3f}" for name, size in sorted(by_part.items(), key=lambda kv: -kv[1])), flush=True)

        start = time.perf_counter()
        store = open_loaded_store(root, progress=False)
        print(f"store load (weights parts and {len(texts)} graphs): {time.perf_counter() - start:.1f} s")
        with store:
            query_latencies(store, len(texts), args.queries if not args.smoke else 20)


if __name__ == "__main__":
    main()
