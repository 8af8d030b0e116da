"""Run decoderesearch/circuit-tracer's `feature_intervention` on one prompt and save the logits as .npz.

Runs INSIDE the separate circuit-tracer venv, like run_attribute.py (whose model and transcoder
loading it imports):

    DIR/bin/python run_intervention.py --model HF_DIR --transcoders TC_DIR --token-ids 1,5,9 --out OUT.npz \
        --cases '[{"interventions": [[layer, pos|null, index, value], ...], "mlp": "real", ...}, ...]'

Each case is one `feature_intervention` call (its logits saved as `logits_{i}`; `clean` is the
unmodified model's). Keys of a case besides `interventions` (`pos` null means every position):

- `constrained`: constrained_layers=range(n_layers), circuit-tracer's direct-effects regime (MLP
  outputs, patterns and norm scales frozen); `freeze_attention`: its freeze_attention flag;
- `mlp`: "real" keeps circuit-tracer's own model, in which an MLP is the real MLP and only the edited
  features' deltas are added; "replacement" swaps each MLP for its transcoder's reconstruction plus the
  error term of the unmodified run (the catalog's local replacement model);
- `freeze_norms`: also hold every norm scale at its unmodified value (circuit-tracer's freeze_attention
  freezes the patterns only, its constrained regime the scales too).

How the catalog's regimes map onto these is in NOTES.md ("Interventions"). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

from run_attribute import build_replacement_model, fail, load_hooked_transformer, load_transcoder_dir, quiet


class LocalReplacementMLP:
    """Stands in for an MLP: the transcoder's reconstruction of its input (position 0's features zeroed,
    as circuit-tracer's activations are) plus the error term of the unmodified run."""

    def __init__(self, transcoder, error):
        self.transcoder, self.error = transcoder, error

    def __call__(self, x):
        acts = self.transcoder.encode(x)
        acts[:, 0] = 0
        return self.transcoder.decode(acts, x) + self.error


def use_local_replacement(model, tokens) -> list:
    """Swap the MLPs; returns the real ones, to put back."""
    import torch
    from torch import nn

    names = [f"blocks.{layer}.mlp.hook_out" for layer in range(model.cfg.n_layers)]
    names += [f"blocks.{layer}.mlp.hook_in" for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n in names)
    real = []
    for layer, block in enumerate(model.blocks):
        tc, x = model.transcoders[layer], cache[f"blocks.{layer}.mlp.hook_in"]
        acts = tc.encode(x)
        acts[:, 0] = 0
        error = cache[f"blocks.{layer}.mlp.hook_out"] - tc.decode(acts, x)
        wrapper = LocalReplacementMLP(tc, error)
        real.append(block.mlp.old_mlp)
        block.mlp.old_mlp = type("Replaced", (nn.Module,), {"forward": lambda self, x, w=wrapper: w(x)})()
    return real


def norm_freeze_hooks(model, tokens) -> list:
    import torch

    names = [name for name in model.hook_dict if name.endswith("hook_scale")]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n in names)
    return [(name, lambda acts, hook: cache[hook.name]) for name in names]


def run_case(model, tokens, case: dict):
    import torch

    interventions = [(int(layer), slice(None) if pos is None else int(pos), int(index), float(value))
                     for layer, pos, index, value in case["interventions"]]
    real = use_local_replacement(model, tokens) if case.get("mlp", "real") == "replacement" else None
    hooks = norm_freeze_hooks(model, tokens) if case.get("freeze_norms") else []
    constrained = range(model.cfg.n_layers) if case.get("constrained") else None
    try:
        with torch.no_grad(), model.hooks(hooks):
            logits, _ = model.feature_intervention(tokens, interventions, constrained_layers=constrained,
                                                   freeze_attention=bool(case.get("freeze_attention")))
    finally:
        for block, mlp in zip(model.blocks, real or []):
            block.mlp.old_mlp = mlp
    if not torch.isfinite(logits).all():
        fail("non-finite logits")
    return logits[0].numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--transcoders", required=True)
    ap.add_argument("--token-ids", required=True, help="comma-separated token ids, BOS included")
    ap.add_argument("--cases", required=True, help="JSON list of cases (see the module docstring)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import numpy as np
    import torch

    with quiet():
        transcoders, _ = load_transcoder_dir(Path(args.transcoders))
        base = load_hooked_transformer(Path(args.model), "catalog")
        model = build_replacement_model(base, transcoders)
        del base
        gc.collect()
    tokens = torch.tensor([int(t) for t in args.token_ids.split(",")])
    cases = json.loads(args.cases)
    with torch.no_grad():
        out = {"clean": model(tokens[None])[0].numpy()}
    out |= {f"logits_{i}": run_case(model, tokens, case) for i, case in enumerate(cases)}
    np.savez(args.out, **out)
    print(json.dumps({"out": args.out, "n_pos": len(tokens), "cases": len(cases)}))


if __name__ == "__main__":
    sys.exit(main())
