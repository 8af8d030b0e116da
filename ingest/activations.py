"""Transcoder feature activations on a prompt, from a real forward pass of the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from circuit_catalog.catalog.ids import feature_id
from circuit_catalog.ingest.attribution import prompt_tokens
from circuit_catalog.ingest.transcoder import TranscoderSet

from circuit_catalog.errors import AttributionError


@dataclass
class ActiveFeature:
    feature: str
    activation: float


@torch.no_grad()
def feature_activations(model, tset: TranscoderSet, prompt: str) -> dict[int, torch.Tensor]:
    """layer -> [n_pos, d_sae] activations of that layer's transcoder on the prompt (BOS prepended)."""
    tokens = prompt_tokens(model, prompt)[None]
    hooks = [tc.cfg.hook_in for tc in tset]
    _, cache = model.run_with_cache(tokens, names_filter=hooks, stop_at_layer=max(tset.layers) + 1)
    return {tc.layer: tc.encode(cache[tc.cfg.hook_in][0]) for tc in tset}


def top_active_features(model, tset: TranscoderSet, prompt: str, pos: int = -1, k: int = 10) -> list[ActiveFeature]:
    """The k largest activations at `pos` over all layers, largest first."""
    found = []
    for layer, acts in feature_activations(model, tset, prompt).items():
        if not -len(acts) <= pos < len(acts):
            raise AttributionError(f"position {pos} is outside the prompt's {len(acts)} tokens (BOS included)")
        row = acts[pos]
        top = row.topk(min(k, row.numel()))
        found += [ActiveFeature(feature_id(layer, int(i)), float(v)) for v, i in zip(top.values, top.indices) if v > 0]
    return sorted(found, key=lambda f: -f.activation)[:k]
