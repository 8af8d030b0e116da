"""Export one prompt's pruned graph as Neuronpedia / circuit-tracer graph JSON (metadata, nodes, links).

The file opens in circuit-tracer's local viewer (`circuit_tracer.frontend.local_server.serve` on its
directory): `graph-metadata.json` beside it is updated to list the graph. Node fields follow
circuit-tracer's `frontend.graph_models.Node` and every value is what circuit-tracer's own writer
(`utils.create_graph_files`) writes for the same graph (`tests/test_circuit_tracer.py` compares them):
`influence` is the cumulative influence share (`ingest.pruning.cumulative_influence`). The prompt's supernodes
(`ingest.supernodes`), where the catalog has them, fill `qParams.supernodes` with their members pinned. One departure:
error nodes are `err_{layer}_{pos}`, since circuit-tracer's `0_{layer}_{pos}` collides with the id of
layer-0 feature `layer` at the same position.

With `heads=True` (a prompt computed with head-resolved terms, `ingest.head_terms`) they go where the viewer shows text: each
feature and logit node's `clerp` names the heads that carried its kept inputs (`via heads L7H3 40%, direct 35%`),
and each link gains a `heads` object {head: term} (the viewer's links are free-form dicts; it draws only `weight`,
other readers of the file get the split). Off by default, so the file is exactly circuit-tracer's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from circuit_catalog.catalog import layout
from circuit_catalog.catalog.manifest import Manifest
from circuit_catalog.catalog.parquet_io import write_text_atomic
from circuit_catalog.ingest.pruning import cumulative_influence
from circuit_catalog.queries.heads import by_edge, carried_by
from circuit_catalog.queries.prompt_graph import PromptGraph


def cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def neuronpedia_graph(catalog_dir: Path, key: str, slug: str, heads: bool = False) -> dict:
    manifest = Manifest.read(Path(catalog_dir))
    graph = PromptGraph.from_catalog(catalog_dir, key, all_nodes=True)  # every node, in the graph's fixed order
    settings = json.loads(graph.info.settings)
    nodes, n_layers = list(graph.nodes.values()), graph.n_layers
    cumulative = cumulative_influence(torch.tensor([n.influence for n in nodes])).tolist()
    tokens_by_pos = {n.pos: n.token for n in nodes if n.kind == "token"}
    out_nodes, js_id = [], {}
    first_logit = True
    for n, share in zip(nodes, cumulative):
        if not n.kept or n.kind == "target":  # a custom target has no place in the viewer's format
            continue
        kind, layer, pos = n.kind, n.layer, n.pos
        node = {"ctx_idx": pos, "run_idx": 0, "reverse_ctx_idx": 0, "influence": share, "activation": n.activation,
                "token_prob": 0.0, "is_target_logit": False, "clerp": ""}
        if kind == "feature":
            node |= {"node_id": f"{layer}_{n.feature_index}_{pos}", "feature": cantor(layer, n.feature_index), "layer": str(layer),
                     "feature_type": "cross layer transcoder", "jsNodeId": f"{layer}_{n.feature_index}-0"}
        elif kind == "error":
            node |= {"node_id": f"err_{layer}_{pos}", "feature": -1, "layer": str(layer),
                     "feature_type": "mlp reconstruction error", "jsNodeId": f"{layer}_{pos}-0"}
        elif kind == "token":
            node |= {"node_id": f"E_{n.token_id}_{pos}", "feature": pos, "layer": "E", "feature_type": "embedding",
                     "jsNodeId": f"E_{n.token_id}-{pos}"}
        else:
            node |= {"node_id": f"{n_layers + 1}_{n.token_id}_{pos}", "feature": n.token_id, "layer": str(n_layers + 1),
                     "feature_type": "logit", "jsNodeId": f"L_{n.token_id}-{pos}", "token_prob": n.probability,
                     "is_target_logit": first_logit, "clerp": f'Output "{n.token}" (p={n.probability:.3f})', "influence": None,
                     "activation": None}
            first_logit = False
        js_id[n.id] = node["node_id"]
        out_nodes.append(node)
    heads = _edge_heads(Path(catalog_dir), graph.info.id) if heads else {}
    links = [{"source": js_id[src], "target": js_id[dst], "weight": w} | ({"heads": dict(heads[src, dst])} if (src, dst) in heads else {})
             for dst, ins in graph.edges.items() for src, w in ins if src in js_id and dst in js_id]
    if heads:
        by_id = {node["node_id"]: node for node in out_nodes}
        for dst, ins in graph.edges.items():
            kept = [(src, w) for src, w in ins if src in js_id and (src, dst) in heads]
            if dst in js_id and kept:
                totals: dict[str, float] = {}
                for src, _ in kept:
                    for head, term in heads[src, dst]:
                        totals[head] = totals.get(head, 0.0) + term
                node = by_id[js_id[dst]]
                via = "via heads " + carried_by(sorted(totals.items(), key=lambda t: -abs(t[1])), sum(w for _, w in kept))
                node["clerp"] = f"{node['clerp']} · {via}" if node["clerp"] else via
    metadata = {
        "slug": slug, "scan": Path(manifest.transcoders).name or manifest.transcoders, "transcoder_list": [],
        "prompt_tokens": [tokens_by_pos[p] for p in sorted(tokens_by_pos)], "prompt": graph.decoded,
        "node_threshold": settings["node_threshold"], "schema_version": 1,
    }
    groups = _supernodes(Path(catalog_dir), graph.info.id, {n.id: js_id[n.id] for n in nodes if n.kind == "feature" and n.id in js_id},
                         {n.id: n.feature_id for n in nodes if n.kind == "feature"})
    qparams = {"pinnedIds": sorted({m for g in groups for m in g[1:]}), "supernodes": groups, "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": out_nodes, "links": links}


def _supernodes(root: Path, prompt_id: str, js_id: dict[str, str], feature_of: dict[str, str]) -> list[list[str]]:
    """The prompt's supernodes (`ingest.supernodes`) as the viewer takes them, [label, node ids...], members pinned
    so its subgraph shows them; none where the catalog has no supernodes."""
    import pyarrow.parquet as pq

    if not (root / layout.SUPERNODES).is_file():
        return []
    names = {r["id"]: r["name"] for r in pq.read_table(root / layout.SUPERNODES).to_pylist() if r["prompt_id"] == prompt_id}
    members: dict[str, set[str]] = {}
    for r in pq.read_table(root / layout.SUPERNODE_MEMBERS).to_pylist():
        if r["src"] in names:
            members.setdefault(r["src"], set()).add(r["dst"])
    return [[names[sid], *sorted(js for nid, js in js_id.items() if feature_of[nid] in fids)] for sid, fids in members.items()]


def _edge_heads(root: Path, prompt_id: str) -> dict[tuple[str, str], list[tuple[str, float]]]:
    """(src, dst) -> [(head, term)] from the prompt's edges_heads.parquet, largest |term| first (empty without it)."""
    import pyarrow.parquet as pq

    path = layout.prompt_part(root, prompt_id, "edges_heads")
    return by_edge(pq.read_table(path).to_pylist()) if path.is_file() else {}


def export_neuronpedia(catalog_dir: Path, key: str, out_file: Path, heads: bool = False) -> dict:
    """Write the graph JSON and list it in `graph-metadata.json` next to it; returns the graph.

    The viewer finds a graph as `<slug>.json`, so the slug is the file's stem.
    """
    out_file = Path(out_file)
    graph = neuronpedia_graph(catalog_dir, key, out_file.stem, heads)
    write_text_atomic(json.dumps(graph, indent=2, ensure_ascii=False), out_file)
    index_path = out_file.parent / "graph-metadata.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"graphs": []}
    index["graphs"] = [g for g in index.get("graphs", []) if g.get("slug") != graph["metadata"]["slug"]] + [graph["metadata"]]
    write_text_atomic(json.dumps(index, indent=2, ensure_ascii=False), index_path)
    return graph
