"""Prediction against reality: ablate a catalog prompt's most influential features and compare with its graph.

For each of the k most influential feature nodes (by the graph's influence on the logits), and for the
features of each of the strongest token -> logit paths of the pruned graph together, the graph predicts
each logit target's change on ablation as minus the sum of the ablated nodes' edges to it (the full
graph's edges, `edges_full.parquet`); a custom target (`ingest.targets`) is checked like a logit. Measured beside it: the change under `direct-only`, where the
graph is exact (the two must agree to float precision: a check of the stored graph, not of a formula),
and under the full replacement model, where the rest of the circuit responds (how linear it is).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch
from circuit_catalog.catalog import layout
from circuit_catalog.catalog.ids import split_node_id
from circuit_catalog.ingest.interventions import Edit, Regime, clean_run, run_batch
from circuit_catalog.ingest.targets import custom_target
from circuit_catalog.ingest.transcoder import TranscoderSet
from circuit_catalog.queries.intervention_runs import graph_tokens
from circuit_catalog.queries.paths import best_paths
from circuit_catalog.queries.prompt_graph import PNode, PromptGraph, prompt_record

from circuit_catalog.errors import CatalogDirError


@dataclass
class Check:
    label: str  # a feature node (`L1/5@3`) or a path's features joined by ' + '
    predicted: list[float]  # per logit target
    direct: list[float]
    full: list[float]


@dataclass
class Validation:
    prompt_id: str
    text: str
    targets: list[str]  # logit target tokens, most probable first, then a custom target's name
    checks: list[Check]

    @property
    def max_direct_error(self) -> float:
        return max((abs(p - d) for c in self.checks for p, d in zip(c.predicted, c.direct)), default=0.0)


def validate(model, tset: TranscoderSet, catalog_dir: Path, key: str, k: int = 20, n_paths: int = 5, batch_size: int = 16) -> Validation:
    """Ablate the k most influential features and the features of the n_paths strongest paths, one check each
    (`batch_size` ablations per forward pass)."""
    catalog_dir = Path(catalog_dir)
    info = prompt_record(catalog_dir, key)
    pid = info["id"]
    graph = PromptGraph.from_catalog(catalog_dir, pid, all_nodes=True)
    nodes = list(graph.nodes.values())
    # logit targets, most probable first, then a custom target; each read off the final-normed residual
    logits = sorted((n for n in nodes if n.kind == "logit"), key=lambda n: -n.probability)
    logits += [n for n in nodes if n.kind == "target"]
    logit_ids = [n.id for n in logits]
    weights: dict[str, dict[str, float]] = defaultdict(dict)  # source -> logit node -> direct effect
    # every node's direct effect on the logits, pruned or not: the one read of the unpruned edges
    for e in pq.read_table(layout.prompt_part(catalog_dir, pid, "edges_full"), filters=[("dst", "in", logit_ids)]).to_pylist():
        weights[e["src"]][e["dst"]] = e["weight"]

    tokens, zero_bos = graph_tokens(model, info)
    clean = clean_run(model, tset, tokens, zero_bos)
    readout, offset = _readout(model, info, logits)
    before = clean.final_normalised.float() @ readout + offset
    stored = torch.tensor([n.value for n in logits], device=before.device)
    tol = max(1e-3, 4 * torch.finfo(model.W_U.dtype).eps)  # the graph's values were rounded to the compute dtype
    if not torch.allclose(before, stored, rtol=tol, atol=tol * float(stored.abs().max())):
        raise CatalogDirError(f"prompt {pid}: the model's logits differ from the catalog's graph; was it built with other weights, "
                              "transcoders or --dtype?")

    features = sorted((n for n in nodes if n.kind == "feature"), key=lambda n: -n.influence)[:k]
    groups = [[n.id] for n in features]
    sources = {n.id for n in nodes if n.kind == "token" and n.kept}
    for path in best_paths(graph, sources, logit_ids[0], n_paths, rank="attribution"):  # pruned nodes have no edges
        group = [node for node in path.nodes if graph.nodes[node].kind == "feature"]
        if group and group not in groups:
            groups.append(group)

    checks = []
    for start in range(0, len(groups), batch_size):  # one batched forward pass per regime and batch of ablations
        batch = groups[start:start + batch_size]
        edit_sets = [[Edit("set", graph.nodes[n].layer, graph.nodes[n].feature_index, graph.nodes[n].pos, 0.0) for n in group]
                     for group in batch]
        direct = run_batch(model, tset, tokens, edit_sets, Regime.DIRECT_ONLY, clean, zero_bos).final_normalised.float() @ readout + offset - before
        full = run_batch(model, tset, tokens, edit_sets, Regime.REPLACEMENT, clean, zero_bos).final_normalised.float() @ readout + offset - before
        for group, d, f in zip(batch, direct.tolist(), full.tolist()):
            predicted = [-sum(weights[n].get(t, 0.0) for n in group) for t in logit_ids]
            checks.append(Check(" + ".join(split_node_id(n)[1] for n in group), predicted, d, f))
    return Validation(pid, info["text"], [n.token for n in logits], checks)


def _readout(model, info: dict, targets: list[PNode]) -> tuple[torch.Tensor, torch.Tensor]:
    """[d, n_targets] directions and [n_targets] constants, in float32: a logit's unembedding column and bias, or the
    custom target rebuilt from its definition in prompt.json."""
    vectors, offsets = [], []
    for n in targets:
        if n.kind == "logit":
            vectors.append(model.W_U[:, n.token_id].detach())
            offsets.append(model.b_U[n.token_id].detach())
        else:
            d = info["custom_target"]
            custom = custom_target(model, d.get("tokens", []), d.get("contrast", []), d.get("direction"), d["weight"])
            vectors.append(custom.vector)
            offsets.append(custom.vector.new_tensor(custom.bias))
    return torch.stack(vectors, 1).float(), torch.stack(offsets).float()
