"""Time per prompt of our attribution graphs vs circuit-tracer's `attribute()`, same model, transcoders,
prompt and node budget, measured in one run; peak memory of both.

Each side runs in its own fresh process (circuit-tracer in its own venv, see bench/circuit_tracer/), so
peak RSS is comparable; times are the minimum over --repeat calls of the attribution alone (model and
transcoders already loaded). Cases: a tiny Llama-style model (as the tests build it) and SmolLM2-135M
with the project's trained transcoders (run `bash scripts/demo.sh` first, or pass --transcoders).

    python bench/attribution.py [--transcoders data/smollm2-135m/transcoders] [--max-feature-nodes 1024]
    python bench/attribution.py --smoke   # seconds: the tiny case, our side only (the suite runs this; its
                                          # circuit-tracer side is run by tests/test_circuit_tracer.py)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "The capital of France is"
TINY_PROMPT = "the capital of france is paris . the jury said the city"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(model: str, transcoders: str, prompt: str, max_feature_nodes: int, batch_size: int, repeat: int) -> None:
    """Our side, in a fresh process: load, then time attribute() alone; one JSON line on stdout."""
    from circuit_catalog.ingest.attribution import attribute
    from circuit_catalog.ingest.models import load_model
    from circuit_catalog.ingest.transcoder_formats import load_transcoders

    lm = load_model(model, device="cpu")
    tset = load_transcoders(transcoders)
    loaded = rss_mb()
    times, graph = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        graph = attribute(lm, tset, prompt, max_feature_nodes=max_feature_nodes, batch_size=batch_size)
        times.append(time.perf_counter() - start)
    print(json.dumps({"wall_time_s": min(times), "peak_rss_mb": rss_mb(), "rss_after_load_mb": loaded,
                      "n_features": graph.n_features, "n_active": graph.n_active_features, "n_logits": len(graph.logit_targets)}))


def run_ours(model_dir: Path, tc_dir: Path, prompt: str, args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", str(model_dir), str(tc_dir), prompt,
                          str(args.max_feature_nodes), str(args.batch_size), str(args.repeat)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_theirs(ct_python: Path, model_dir: Path, tc_dir: Path, prompt: str, args, tmp: Path) -> dict:
    out = subprocess.run([str(ct_python), str(ROOT / "bench" / "circuit_tracer" / "run_attribute.py"), "--model", str(model_dir),
                          "--transcoders", str(tc_dir), "--prompt", prompt, "--out", str(tmp / "ct.npz"),
                          "--max-feature-nodes", str(args.max_feature_nodes), "--batch-size", str(args.batch_size),
                          "--repeat", str(args.repeat)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def case(name: str, model_dir: Path, tc_dir: Path, prompt: str, ct_python: Path | None, args, tmp: Path) -> None:
    ours = run_ours(model_dir, tc_dir, prompt, args)
    if ct_python is None:
        print(f"{name}: ours {ours['wall_time_s']:.2f} s, peak RSS {ours['peak_rss_mb']:.0f} MiB (smoke: circuit-tracer not run)")
        return
    theirs = run_theirs(ct_python, model_dir, tc_dir, prompt, args, tmp)
    ratio = ours["wall_time_s"] / theirs["wall_time_s"]
    print(f"{name}: {ours['n_features']} feature nodes of {ours['n_active']} active, {ours['n_logits']} logits, "
          f"batch {args.batch_size}, min of {args.repeat}")
    print(f"  ours          {ours['wall_time_s']:8.2f} s   peak RSS {ours['peak_rss_mb']:8.0f} MiB (after load {ours['rss_after_load_mb']:.0f})")
    print(f"  circuit-tracer{theirs['wall_time_s']:8.2f} s   peak RSS {theirs['peak_rss_mb']:8.0f} MiB (after load {theirs.get('peak_rss_after_load_mb', float('nan')):.0f})")
    print(f"  ratio ours / circuit-tracer = {ratio:.3f}  (target <= 0.5)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transcoders", type=Path, default=ROOT / "data" / "smollm2-135m" / "transcoders")
    ap.add_argument("--max-feature-nodes", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--ct-venv", type=Path, default=None, help="circuit-tracer venv (default: the cache's, created if missing)")
    ap.add_argument("--smoke", action="store_true", help="tiny case only, 64 feature nodes, one repeat, our side only")
    args = ap.parse_args()
    if args.smoke:
        args.max_feature_nodes, args.batch_size, args.repeat = 64, 64, 1

    from circuit_catalog.ingest.models import _gguf_to_hf_dir, cache_root, resolve_model
    from circuit_catalog.ingest.transcoder_formats import load_transcoders, save_circuit_tracer

    from tests.conftest import build_hf_model, random_transcoders

    venv = args.ct_venv or cache_root() / "circuit-tracer-venv"
    ct_python = None
    if not args.smoke:
        subprocess.run(["bash", str(ROOT / "bench" / "circuit_tracer" / "setup_venv.sh"), str(venv)], check=True)
        ct_python = venv / "bin" / "python"
    with tempfile.TemporaryDirectory(prefix="bench-attr-") as t:
        tmp = Path(t)
        tiny_dir = build_hf_model(tmp / "tiny-llama", "llama", n_layers=4)
        from circuit_catalog.ingest.models import load_model

        save_circuit_tracer(random_transcoders(load_model(str(tiny_dir), device="cpu"), d_sae=256, seed=0), tmp / "tiny-tc")
        case("tiny Llama (4 layers, d_model 32, 4 x 256 features)", tiny_dir, tmp / "tiny-tc", TINY_PROMPT, ct_python, args, tmp)
        if args.smoke:
            return
        if not args.transcoders.is_dir():
            print(f"SmolLM2-135M skipped: no transcoders at {args.transcoders} (run `bash scripts/demo.sh` first)")
            return
        smol_dir = _gguf_to_hf_dir(Path(resolve_model("smollm2-135m").location))
        tset = load_transcoders(args.transcoders)
        save_circuit_tracer(tset, tmp / "smol-tc")
        width = tset[tset.layers[0]].cfg.d_sae
        case(f"SmolLM2-135M ({len(tset.layers)} x {width} features, project's transcoders)", smol_dir, tmp / "smol-tc",
             PROMPT, ct_python, args, tmp)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]))
    else:
        main()
