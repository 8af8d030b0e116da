"""Time of `intervene --validate -k 20` against one attribution graph of the same prompt (target: <= 1x).

Per case: the prompt's graph is built and written as `ingest --prompts` does (its own directory and
prompts.parquet, and the manifest; the weights-only parts of a catalog are not needed), then timed in the same process,
model and transcoders loaded once: `attribute()` alone (min over --repeat), and `validate()` (k feature
ablations plus the strongest paths', each under direct-only and under the full replacement model).
Printed: both times, their ratio, the number of ablations, the largest |predicted - measured direct|
(the graph is exact there: float precision expected) and the validation table's first rows.

    python bench/interventions.py [--smoke] [--transcoders DIR] [-k 20] [--max-feature-nodes 1024]

--smoke: a tiny Llama-style model with random transcoders (seconds). Otherwise SmolLM2-135M with the
transcoders at --transcoders (default: the main job's), or random ones of width 512 where none exist.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def case(name: str, model, tset, prompt: str, k: int, max_feature_nodes: int, repeat: int, tmp: Path) -> None:
    from circuit_catalog.ingest.attribution import attribute
    from circuit_catalog.ingest.job import build_manifest
    from circuit_catalog.ingest.settings import IngestSettings
    from circuit_catalog.ingest.prompts import write_prompt, write_prompt_index
    from circuit_catalog.ingest.settings import AttributionSettings, PromptSpec
    from circuit_catalog.queries.validation import validate

    settings = AttributionSettings(max_feature_nodes=max_feature_nodes)
    root = tmp / name.split()[0]
    build_manifest(model, name, tset, "bench", IngestSettings()).write(root)  # what readers check the catalog's format by
    write_prompt(model, tset, root, "bench", PromptSpec(prompt), settings)
    write_prompt_index(root)
    graph_times = []
    for _ in range(repeat):
        start = time.perf_counter()
        attribute(model, tset, prompt, max_feature_nodes=max_feature_nodes, batch_size=settings.batch_size)
        graph_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    v = validate(model, tset, root, "bench", k=k)
    validate_time = time.perf_counter() - start
    graph_time = min(graph_times)
    print(f"{name}: {prompt!r}")
    print(f"  one attribution graph {graph_time:.2f} s; --validate -k {k} ({len(v.checks)} ablations x 2 regimes) "
          f"{validate_time:.2f} s = {validate_time / graph_time:.2f}x")
    print(f"  largest |predicted - measured direct| over {len(v.targets)} logit targets: {v.max_direct_error:.2e}")
    print(f"  change of logit {v.targets[0]!r} on ablation:  predicted / measured direct / measured full")
    for c in v.checks[:8]:
        print(f"    {c.label:<28} {c.predicted[0]:+.5f} / {c.direct[0]:+.5f} / {c.full[0]:+.5f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model only (seconds)")
    ap.add_argument("--transcoders", type=Path, default=ROOT / "data" / "smollm2-135m" / "transcoders")
    ap.add_argument("-k", type=int, default=20)
    ap.add_argument("--max-feature-nodes", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    from circuit_catalog.ingest.models import load_model
    from circuit_catalog.ingest.transcoder_formats import load_transcoders

    from tests.conftest import build_hf_model, random_transcoders

    with tempfile.TemporaryDirectory(prefix="bench-interventions-") as t:
        tmp = Path(t)
        if args.smoke:
            model = load_model(str(build_hf_model(tmp / "llama", "llama")), device="cpu")
            case("tiny llama (3 layers, 3 x 64 features)", model, random_transcoders(model, d_sae=64, seed=1),
                 "the jury said the city election was good . the capital of france is", args.k, args.max_feature_nodes,
                 args.repeat, tmp)
            return
        model = load_model("smollm2-135m", device="cpu")
        if args.transcoders.is_dir():
            tset, label = load_transcoders(args.transcoders), f"transcoders at {args.transcoders}"
        else:
            tset, label = random_transcoders(model, d_sae=512, seed=0), "random transcoders of width 512"
        case(f"SmolLM2-135M, {label}", model, tset, "The capital of France is", args.k, args.max_feature_nodes, args.repeat, tmp)


if __name__ == "__main__":
    main()
