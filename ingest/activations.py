"""Transcoder feature activations on a prompt, from a real forward pass of the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from circuit_catalog.catalog.ids import feature_id
from circuit_catalog.ingest.attribution import attribute, prompt_tokens, target_token
from circuit_catalog.ingest.settings import MAX_FEATURE_NODES
from circuit_catalog.ingest.transcoder import TranscoderSet

from circuit_catalog.errors import AttributionError


RANKS = ("activation", "influence")


@dataclass
class ActiveFeature:
    feature: str
    activation: float
    influence: float | None = None  # with rank "influence": its influence on the target in the prompt's graph


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


def top_influential_features(model, tset: TranscoderSet, prompt: str, pos: int = -1, k: int = 10, target: str | None = None,
                             max_feature_nodes: int | None = MAX_FEATURE_NODES) -> list[ActiveFeature]:
    """The k features at `pos` with the largest influence on the prompt's logits (their probability-weighted sum,
    as pruning scores nodes) or, with `target`, on that token's logit, in the prompt's attribution graph (its
    `max_feature_nodes` most influential active features). Raw activation favours dense features that fire
    everywhere; influence says which ones the prediction depends on."""
    from circuit_catalog.ingest.pruning import influence, logit_weights, normalise

    graph = attribute(model, tset, prompt, extra_targets=None if target is None else [target_token(model, target)],
                      max_feature_nodes=max_feature_nodes)
    if not -graph.n_pos <= pos < graph.n_pos:
        raise AttributionError(f"position {pos} is outside the prompt's {graph.n_pos} tokens (BOS included)")
    if target is None:
        weights = logit_weights(graph)
    else:
        weights = torch.zeros(graph.n_nodes, device=graph.adjacency.device)
        weights[graph.logit_index(int((graph.logit_targets == target_token(model, target)).nonzero()[0]))] = 1.0
    scores = influence(normalise(graph.adjacency), weights)[: graph.n_features]
    at = (graph.features[:, 1] == pos % graph.n_pos).nonzero().flatten()
    top = at[scores[at].argsort(descending=True)[:k]]
    return [ActiveFeature(feature_id(int(graph.features[i, 0]), int(graph.features[i, 2])), float(graph.activations[i]), float(scores[i]))
            for i in top.tolist()]


def rank_features(model, tset: TranscoderSet, prompt: str, pos: int = -1, k: int = 10, rank: str = "activation",
                  target: str | None = None) -> list[ActiveFeature]:
    """`top_active_features` or `top_influential_features`, by `rank` (RANKS)."""
    if rank == "influence":
        return top_influential_features(model, tset, prompt, pos, k, target)
    if target is not None:
        raise AttributionError("--target ranks by influence on that token: give --rank influence")
    return top_active_features(model, tset, prompt, pos, k)
