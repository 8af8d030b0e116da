"""Custom attribution targets: a logit difference, a sum of named tokens' logits, or a residual direction.

A target is a direction `v` read where the unembedding reads (the last position's residual stream
after the final norm) plus a constant: `target = ln_final(resid)[-1] @ v + b`. A logit is the case
`v = W_U[:, t]`, `b = b_U[t]`; `logit(Paris) - logit(London)` is `v = W_U[:, Paris] - W_U[:, London]`;
a `.npy` vector of d_model values is `v` itself with `b = 0`. The attribution sweeps it like a logit,
so completeness holds for it as for any target; pruning weights it like a logit of probability
`weight` (1 unless told).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from circuit_catalog.ingest.attribution import target_token

from circuit_catalog.errors import AttributionError


@dataclass
class CustomTarget:
    name: str  # e.g. "' Paris' - ' London'"
    vector: torch.Tensor  # [d_model], in the unembedding's input space
    bias: float
    weight: float = 1.0  # its weight in pruning, as a logit's probability
    definition: dict = field(default_factory=dict)  # what prompt.json records


def custom_target(model, tokens: list[str] = (), contrast: list[str] = (), direction: Path | None = None,
                  weight: float = 1.0) -> CustomTarget:
    """Sum of the `tokens`' logits minus the `contrast` tokens' logits, or a direction from a .npy file."""
    if direction is not None and (tokens or contrast):
        raise AttributionError("a custom target is either tokens (with contrasts) or a direction, not both")
    if not weight > 0:
        raise AttributionError(f"target weight must be positive, got {weight}")
    if direction is not None:
        return _direction_target(model, Path(direction), weight)
    if not tokens:
        raise AttributionError("a contrast needs a target token to contrast with")
    W_U, b_U = model.W_U.detach(), model.b_U.detach()
    plus, minus = [target_token(model, t) for t in tokens], [target_token(model, t) for t in contrast]
    vector = W_U[:, plus].sum(1) - (W_U[:, minus].sum(1) if minus else 0)
    bias = float(b_U[plus].sum() - (b_U[minus].sum() if minus else 0))
    name = " + ".join(map(repr, tokens)) + "".join(f" - {t!r}" for t in contrast)
    return CustomTarget(name, vector, bias, weight, {"tokens": list(tokens), "contrast": list(contrast), "weight": weight})


def _direction_target(model, path: Path, weight: float) -> CustomTarget:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise AttributionError(f"{path}: not a readable .npy file ({exc})") from None
    d = model.cfg.d_model
    if array.shape != (d,) or not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
        raise AttributionError(f"{path}: expected {d} finite numbers (the model's d_model), got shape {array.shape}")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    vector = torch.tensor(array, dtype=model.W_U.dtype, device=model.W_U.device)
    return CustomTarget(f"direction {path.name}", vector, 0.0, weight, {"direction": str(path), "sha256": sha, "weight": weight})
