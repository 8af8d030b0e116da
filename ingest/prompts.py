"""Prompt sets in, attribution graphs out: `DIR/prompts/<id>/` per prompt and the index `DIR/prompts.parquet`.

Each prompt's directory is written under a temporary name and renamed, so it is complete or absent;
a rerun skips prompts already done with the same settings. Prompt ids are stable: a hash of the model's
weights, the transcoder files and the prompt (text, and target or custom target when one is named); node
ids are `catalog.ids`'.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from circuit_catalog.catalog import ids, layout
from circuit_catalog.catalog.atomic import atomic_directory
from circuit_catalog.catalog.crash import crash_point
from circuit_catalog.catalog.lock import remove_temporaries, writer_lock
from circuit_catalog.catalog.manifest import Manifest, now
from circuit_catalog.catalog.parquet_io import part_intact, part_rows, write_atomic
from circuit_catalog.ingest.attribution import AttributionGraph, attribute, prompt_tokens, target_token
from circuit_catalog.ingest.executor import Executor, SerialExecutor, Worker, run_unit
from circuit_catalog.ingest.head_terms import head_table, head_terms
from circuit_catalog.ingest.pruning import Pruned, graph_scores, prune
from circuit_catalog.ingest.settings import AttributionSettings, PromptSpec
from circuit_catalog.ingest.targets import CustomTarget, custom_target
from circuit_catalog.ingest.transcoder import TranscoderSet
from circuit_catalog.progress import tqdm

from circuit_catalog.errors import CatalogDirError


def prompt_id(manifest: Manifest, spec: PromptSpec) -> str:
    key = {"model": manifest.model_weights_sha256, "transcoders": manifest.transcoder_files, "text": spec.text}
    if spec.target is not None:
        key["target"] = spec.target
    if spec.custom is not None:
        key["custom"] = spec.custom
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def local_ids(graph: AttributionGraph) -> list[str]:
    """Readable node ids in the graph's fixed order."""
    local = [ids.feature_node(layer, index, pos) for layer, pos, index in graph.features.tolist()]
    local += [ids.error_node(layer, pos) for layer in range(graph.n_layers) for pos in range(graph.n_pos)]
    local += [ids.token_node(pos) for pos in range(graph.n_pos)]
    local += [ids.logit_node(t) for t in graph.logit_targets.tolist()]
    if graph.custom_target is not None:
        local.append(ids.TARGET)
    return local


def graph_tables(graph: AttributionGraph, pruned: Pruned, pid: str, decode, unpruned_edges: bool = True) -> dict[str, pa.Table]:
    """nodes, pruned edges, unpruned edges (all, or only those into the logits and the custom target), and
    INSTANCE_OF links, as the store loads them."""
    n_feat, n_err, n_pos, n_logit = graph.n_features, graph.n_errors, graph.n_pos, len(graph.logit_probabilities)
    n_custom = int(graph.custom_target is not None)
    node_ids = [ids.node_id(pid, local) for local in local_ids(graph)]
    kind = ["feature"] * n_feat + ["error"] * n_err + ["token"] * n_pos + ["logit"] * (n_logit - n_custom) + ["target"] * n_custom
    layer = graph.features[:, 0].tolist() + [lay for lay in range(graph.n_layers) for _ in range(n_pos)] + [-1] * n_pos + [graph.n_layers] * n_logit
    pos = graph.features[:, 1].tolist() + list(range(n_pos)) * graph.n_layers + list(range(n_pos)) + [n_pos - 1] * n_logit
    feature_index = graph.features[:, 2].tolist() + [None] * (n_err + n_pos + n_logit)
    token_ids = [None] * (n_feat + n_err) + graph.tokens.tolist() + graph.logit_targets.tolist() + [None] * n_custom
    targets = ~torch.isnan(graph.value)

    def where(mask: torch.Tensor, values: torch.Tensor) -> list:
        return [float(v) if m else None for v, m in zip(values.tolist(), mask.tolist())]

    probability = [None] * (graph.n_nodes - n_logit) + graph.logit_probabilities.tolist()
    nodes = pa.table({
        "id": node_ids, "prompt_id": [pid] * graph.n_nodes, "kind": kind, "layer": layer, "pos": pos, "feature_index": feature_index,
        "feature_id": [ids.feature_id(a, b) for a, _, b in graph.features.tolist()] + [None] * (n_err + n_pos + n_logit),
        "token_id": token_ids, "token": [None if t is None else decode([t]) for t in token_ids[:graph.n_nodes - n_custom]] + [graph.custom_target] * n_custom,
        "activation": graph.activations.tolist() + [None] * (n_err + n_pos + n_logit),
        "value": where(targets, graph.value), "bias": where(targets, graph.bias), "dropped": where(targets, graph.dropped),
        "probability": probability, "influence": pruned.influence.tolist(), "kept": pruned.node_mask.tolist(),
    }, schema=layout.PNODE_SCHEMA)

    def edges(mask: torch.Tensor) -> pa.Table:
        dst, src = mask.nonzero(as_tuple=True)
        id_array = pa.array(node_ids)
        return pa.table([id_array.take(pa.array(src.cpu().numpy())), id_array.take(pa.array(dst.cpu().numpy())),
                         pa.array(graph.adjacency[dst, src].cpu().numpy(), pa.float32())], schema=layout.ATTR_SCHEMA)

    return {
        "nodes": nodes,
        "edges": edges(pruned.edge_mask),
        "edges_full": edges(_unpruned_mask(graph, unpruned_edges)),
        "links_feature": pa.table({"src": node_ids[:n_feat], "dst": nodes["feature_id"].to_pylist()[:n_feat]}),
        "links_token": pa.table({"src": node_ids[n_feat + n_err:graph.n_nodes - n_custom], "dst": pa.array(token_ids[n_feat + n_err:graph.n_nodes - n_custom], pa.int64())}),
    }


def _unpruned_mask(graph: AttributionGraph, every: bool) -> torch.Tensor:
    """The non-zero edges of the unpruned graph; without `every`, only the rows of the logits and the custom target."""
    mask = graph.adjacency != 0
    if not every:
        mask[:graph.n_nodes - len(graph.logit_probabilities)] = False
    return mask


def head_resolved_edges(pruned: Pruned, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dst, src) of the pruned edges split by head: the `n` with the largest influence (pruning's edge scores), or
    every pruned edge (None), in the adjacency's order."""
    dst, src = pruned.edge_mask.nonzero(as_tuple=True)
    if n is not None and n < len(dst):
        top = pruned.edge_scores[dst, src].abs().topk(n).indices.sort().values
        dst, src = dst[top], src[top]
    return dst, src


def run_prompts(model, tset: TranscoderSet, root: Path, specs: list[PromptSpec], settings: AttributionSettings,
                progress: bool = True, executor: Executor | None = None) -> list[str]:
    """Compute and write every prompt's graph not already in `root` with these settings, one unit per prompt on
    `executor` (default here, one after another; `ingest.executor`); returns the ids."""
    for spec in specs:  # refuse bad prompts before anything is written
        check_prompt(model, spec)
    with writer_lock(root):
        manifest = Manifest.read(root)
        if manifest.status != "complete":
            raise CatalogDirError(f"{root}: the ingest has not finished; rerun it before adding prompts")
        wanted = json.dumps(asdict(settings), sort_keys=True)
        pids = [prompt_id(manifest, spec) for spec in specs]
        todo = [(pid, spec) for pid, spec in zip(pids, specs) if not _prompt_done(root, pid, wanted)]
        if not todo and part_rows(root / layout.PROMPT_INDEX) == len(layout.part_files(root, layout.PROMPT_INFOS)):
            return pids  # nothing to add: the catalog (and a store loaded from it) stays as it is
        manifest.status = "in-progress"  # stores refuse to load a half-added prompt set
        manifest.write(root)
        executor = executor or SerialExecutor(model, tset)
        units = [PromptUnit(str(root.resolve()), pid, spec, settings) for pid, spec in todo]
        for _ in tqdm(executor.map(run_unit, units), total=len(units), desc="prompts", unit="prompt", disable=not progress):
            pass
        if not executor.in_process:
            remove_temporaries(root)  # what workers killed mid-write left behind (their prompts ran again)
        write_prompt_index(root)
        manifest.status, manifest.completed = "complete", now()
        manifest.write(root)
    return pids


@dataclass(frozen=True)
class PromptUnit:
    """One prompt's graph, written whole into `root` (`write_prompt`); yields its id."""

    root: str
    pid: str
    spec: PromptSpec
    settings: AttributionSettings

    def __call__(self, worker: Worker) -> Iterator[str]:
        write_prompt(worker.model, worker.tset, Path(self.root), self.pid, self.spec, self.settings)
        yield self.pid


def _prompt_done(root: Path, pid: str, settings: str) -> bool:
    """Done with these settings, every part readable with the rows it was written with (else computed again)."""
    try:
        info = json.loads(layout.prompt_info(root, pid).read_text())
    except (OSError, ValueError):
        return False
    recorded = info.get("parts", {})
    return info.get("settings") == settings and all(
        part_intact(layout.prompt_part(root, pid, name), recorded.get(layout.parquet_name(name))) for name in layout.PROMPT_PARTS)


def check_prompt(model, spec: PromptSpec) -> None:
    prompt_tokens(model, spec.text)
    if spec.target is not None:
        target_token(model, spec.target)
    _custom(model, spec)


def _custom(model, spec: PromptSpec) -> CustomTarget | None:
    c = spec.custom
    return None if c is None else custom_target(model, c["tokens"], c["contrast"], c["direction"], c["weight"])


def write_prompt(model, tset: TranscoderSet, root: Path, pid: str, spec: PromptSpec, settings: AttributionSettings) -> None:
    custom = _custom(model, spec)
    extra = [target_token(model, spec.target)] if spec.target is not None and custom is None else []
    graph = attribute(model, tset, spec.text, extra_targets=extra, max_n_logits=settings.max_n_logits,
                      desired_logit_prob=settings.desired_logit_prob, max_feature_nodes=settings.max_feature_nodes,
                      batch_size=settings.batch_size, zero_bos=settings.zero_bos, custom=custom)
    pruned = prune(graph, settings.node_threshold, settings.edge_threshold)
    replacement, completeness = graph_scores(graph)
    tables = graph_tables(graph, pruned, pid, model.tokenizer.decode, settings.unpruned_edges)
    dst, src = head_resolved_edges(pruned, settings.head_edges)
    terms = head_terms(model, tset, graph, dst, src, None if custom is None else custom.vector)
    tables["edges_heads"] = head_table(terms, [f"{pid}:{local}" for local in local_ids(graph)], settings.head_terms)
    info = {
        "id": pid, "text": spec.text, "target": spec.target if custom is None else custom.name, "n_tokens": graph.n_pos, "tokens": graph.tokens.tolist(),
        "decoded": model.tokenizer.decode(graph.tokens.tolist()),  # the tokens as text, BOS included (the viewer's prompt)
        "replacement_score": replacement, "completeness_score": completeness,
        "n_active_features": graph.n_active_features, "n_feature_nodes": graph.n_features, "capped": graph.capped,
        "n_kept_nodes": int(pruned.node_mask.sum()), "n_kept_edges": tables["edges"].num_rows, "n_head_edges": len(dst),
        "n_layers": graph.n_layers, "settings": json.dumps(asdict(settings), sort_keys=True),
        "parts": {layout.parquet_name(name): table.num_rows for name, table in tables.items()},  # checked on resume
        "custom_target": None if custom is None else {"name": custom.name, **custom.definition},
    }
    with atomic_directory(layout.prompt_dir(root, pid)) as tmp:
        for name, table in tables.items():
            pq.write_table(table, tmp / layout.parquet_name(name), compression="zstd")
        (tmp / layout.PROMPT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        crash_point("prompt")


def write_prompt_index(root: Path) -> None:
    """prompts.parquet: one row per prompt directory present (prompts accumulate over runs)."""
    rows = [json.loads(p.read_text()) for p in layout.part_files(root, layout.PROMPT_INFOS)]
    columns = {name: [row.get(name) for row in rows] for name in layout.PROMPT_SCHEMA.names}
    write_atomic(pa.table(columns, schema=layout.PROMPT_SCHEMA), root / layout.PROMPT_INDEX)
