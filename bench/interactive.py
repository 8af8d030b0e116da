"""The interactive loop's latencies, each a fresh CLI process timed from the outside, in one run:

1. `active` with no server (loads the model and transcoders: the cold path);
2. `active` answered by a warm `serve` process with the same arguments (target <= 3 s from a cold process);
3. a rerun of `ingest` on a complete catalog (answered from the receipt without loading: target <= 2 s);
4. the first lookup after an ingest (loads the store) and the second (store current).

    python bench/interactive.py [--smoke] [--d-sae 1536]

--smoke: a tiny GPT-2-style model (seconds). Otherwise SmolLM2-135M with random transcoders of width --d-sae on
every layer (the timings do not depend on the weights' values).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CLI = [sys.executable, "-m", "circuit_catalog"]


def timed(args: list[str], env: dict) -> float:
    """Seconds of one CLI process, from spawn to exit (a failure stops the benchmark with its output)."""
    start = time.perf_counter()
    done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(args[:1])} failed:\n{done.stdout}\n{done.stderr}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model (seconds)")
    ap.add_argument("--d-sae", type=int, default=1536)
    args = ap.parse_args()

    from circuit_catalog import warm
    from circuit_catalog.ingest.models import load_model
    from circuit_catalog.ingest.transcoder_formats import save_saelens

    from tests.conftest import build_hf_model, random_transcoders

    with tempfile.TemporaryDirectory(prefix="bench-interactive-") as t:
        t = Path(t)
        model = str(build_hf_model(t / "gpt2", "gpt2")) if args.smoke else "smollm2-135m"
        lm = load_model(model)  # converts the GGUF into the cache once, outside the timings
        for tc in random_transcoders(lm, d_sae=16 if args.smoke else args.d_sae, seed=0):
            save_saelens(tc, t / "tc" / f"layer_{tc.layer}")
        del lm
        env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the same cache: the converted model is reused
        common = ["--model", model, "--transcoders", str(t / "tc"), "--device", "cpu"]
        active = ["active", *common, "--prompt", "The capital of France is", "-k", "5"]
        cold = min(timed(active, env) for _ in range(2))

        server = subprocess.Popen([*CLI, "serve", *common, "--idle-minutes", "10"], env=env, stderr=subprocess.DEVNULL)
        path = warm.socket_path(model, str(t / "tc"), None, False, "cpu", "float32")
        while not path.exists():
            if server.poll() is not None:
                sys.exit("the server stopped")
            time.sleep(0.2)
        try:
            hot = min(timed(active, env) for _ in range(3))
        finally:
            server.terminate()
            server.wait()
        print(f"active: {cold:.2f} s loading the model, {hot:.2f} s answered by a warm `serve` (target <= 3 s): "
              f"{cold / hot:.1f}x faster", flush=True)

        (t / "p.txt").write_text("The capital of France is\n")
        ingest = ["ingest", *common, "--catalog", str(t / "catalog"), "--prompts", str(t / "p.txt"), "--top-k", "4"]
        full = timed(ingest, env)
        rerun = min(timed(ingest, env) for _ in range(2))
        print(f"ingest: {full:.1f} s, rerun with nothing to do {rerun:.2f} s (target <= 2 s)", flush=True)
        lookup = ["upstream", "L1/0", "--catalog", str(t / "catalog")]
        first, second = timed(lookup, env), timed(lookup, env)
        print(f"lookup after the ingest: first {first:.2f} s (loads the store), then {second:.2f} s")


if __name__ == "__main__":
    main()
