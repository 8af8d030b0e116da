"""Influence on the logits, pruning, and the replacement / completeness scores of an attribution graph.

Definitions are circuit-tracer's (`circuit_tracer.graph`), and `tests/test_circuit_tracer.py` holds
the masks and scores to its own `prune_graph` and `compute_graph_scores` on the same graph: the
adjacency is made non-negative and row-normalised (each target's incoming |weights| sum to 1), a
node's influence is the logit-probability weighted sum over all paths to the logits
(`w A + w A^2 + ...`, finite since the graph is a DAG). Pruning keeps the nodes whose influence is
among the largest that together carry `node_threshold` of the influence of *all* nodes (tokens
included; tokens and logits are then kept whatever their share), then the edges carrying
`edge_threshold` of the edge influence of what is left, then drops nodes left without outgoing
(features, errors) or incoming (features) edges, until stable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # attribution imports this module for partial_influence
    from circuit_catalog.ingest.attribution import AttributionGraph


def normalise(adjacency: torch.Tensor) -> torch.Tensor:
    a = adjacency.abs()
    return a / a.sum(1, keepdim=True).clamp(min=1e-10)


def influence(normalised: torch.Tensor, weights: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """Sum over path lengths >= 1 of `weights @ normalised^n`."""
    current = weights @ normalised
    total = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ normalised
        total += current
    raise RuntimeError("influence did not converge (is the graph acyclic?)")


def partial_influence(rows: torch.Tensor, row_cols: torch.Tensor, weights: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """Influence on the logits of every column, from the rows computed so far.

    rows [R, n_cols]; row_cols [R]: the column of each row's node (-1 for logits); weights [R]: the
    logit probabilities (0 for feature rows). Influence flows back along |normalised| rows until it
    reaches nodes without a row, as circuit-tracer estimates it to choose which features to expand.
    """
    norm = normalise(rows)
    has_row = row_cols >= 0
    total = torch.zeros(rows.shape[1], device=rows.device)
    current = weights.clone()
    for _ in range(max_iter):
        spread = current @ norm
        total += spread
        current = torch.zeros_like(current)
        current[has_row] = spread[row_cols[has_row]]
        if not current.any():
            return total
    raise RuntimeError("influence did not converge (is the graph acyclic?)")


def logit_weights(graph: AttributionGraph) -> torch.Tensor:
    w = torch.zeros(graph.n_nodes, device=graph.adjacency.device)
    w[graph.logit_index(0):] = graph.logit_probabilities
    return w


def node_influence(graph: AttributionGraph) -> torch.Tensor:
    return influence(normalise(graph.adjacency), logit_weights(graph))


def cutoff(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The smallest score among the top scores that together carry `fraction` of the total.

    Never a zero score, so zero-influence nodes and absent edges are never kept by the threshold
    (circuit-tracer 0.5 returns 0 at `fraction` 1.0 and then keeps every non-edge; later releases
    clamp as here).
    """
    ordered = scores.sort(descending=True).values
    if not ordered.numel() or ordered[0] <= 0:
        return torch.tensor(float("inf"), device=scores.device)
    cumulative = ordered.cumsum(0) / ordered.sum()
    index = int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype, device=cumulative.device)))
    return ordered[min(index, int((ordered > 0).sum()) - 1)]


def cumulative_influence(scores: torch.Tensor) -> torch.Tensor:
    """Per node, the share of all influence carried by the nodes at least as influential as it.

    What circuit-tracer's `prune_graph` returns as `cumulative_scores` and its graph files show as a
    node's `influence`: the node threshold keeps exactly the nodes whose value is <= the threshold
    (up to ties). Computed in float32 as there, so the exported values are the same numbers.
    """
    ordered, order = torch.sort(scores.float(), descending=True)
    out = torch.zeros_like(ordered)
    out[order] = torch.cumsum(ordered, 0) / ordered.sum()
    return out


@dataclass
class Pruned:
    node_mask: torch.Tensor  # [n_nodes] bool
    edge_mask: torch.Tensor  # [n_nodes, n_nodes] bool, same layout as the adjacency
    influence: torch.Tensor  # [n_nodes] node influence on the logits in the unpruned graph (logits: 0)
    edge_scores: torch.Tensor  # [n_nodes, n_nodes] each edge's influence on the logits among the kept nodes (pruning's ranking)


def prune(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    weights = logit_weights(graph)
    scores = node_influence(graph)
    always = graph.token_index(0)  # tokens and logits are never pruned
    node_mask = scores >= cutoff(scores, node_threshold)
    node_mask[always:] = True

    kept = graph.adjacency * node_mask[:, None] * node_mask[None, :]
    norm = normalise(kept)
    edge_scores = norm * (influence(norm, weights) + weights)[:, None]
    edge_mask = (edge_scores >= cutoff(edge_scores.flatten(), edge_threshold)) & (kept != 0)

    n_feat = graph.n_features
    while True:
        before = node_mask.clone()
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        node_mask[:always] &= edge_mask[:, :always].any(0)  # features and errors need an outgoing edge
        node_mask[:n_feat] &= edge_mask[:n_feat].any(1)  # features need an incoming edge
        if torch.equal(node_mask, before):
            break
    return Pruned(node_mask, edge_mask, scores, edge_scores)


def graph_scores(graph: AttributionGraph) -> tuple[float, float]:
    """(replacement score, completeness score), both in [0, 1].

    Replacement: of the influence the tokens and errors have on the logits, the tokens' share.
    Completeness: the influence-weighted mean, over targets, of the share of incoming |weight| that
    does not come from error nodes.
    """
    norm = normalise(graph.adjacency)
    weights = logit_weights(graph)
    scores = influence(norm, weights)
    errors = slice(graph.error_index(0, 0), graph.token_index(0))
    tokens = slice(graph.token_index(0), graph.logit_index(0))
    token_influence, error_influence = scores[tokens].sum(), scores[errors].sum()
    replacement = token_influence / (token_influence + error_influence).clamp(min=1e-10)
    non_error = 1 - norm[:, errors].sum(1)
    output = scores + weights
    completeness = (non_error * output).sum() / output.sum()
    return float(replacement), float(completeness)
