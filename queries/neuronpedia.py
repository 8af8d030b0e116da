"""Export one prompt's pruned graph as Neuronpedia / circuit-tracer graph JSON (metadata, nodes, links).

The file opens in circuit-tracer's local viewer (`circuit_tracer.frontend.local_server.serve` on its
directory): `graph-metadata.json` beside it is updated to list the graph. Node fields follow
circuit-tracer's `frontend.graph_models.Node` and every value is what circuit-tracer's own writer
(`utils.create_graph_files`) writes for the same graph (`tests/test_circuit_tracer.py` compares them):
`influence` is the cumulative influence share (`ingest.pruning.cumulative_influence`). One departure:
error nodes are `err_{layer}_{pos}`, since circuit-tracer's `0_{layer}_{pos}` collides with the id of
layer-0 feature `layer` at the same position.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from circuit_catalog.catalog import layout
from circuit_catalog.catalog.manifest import Manifest
from circuit_catalog.catalog.parquet_io import write_text_atomic
from circuit_catalog.ingest.pruning import cumulative_influence

from circuit_catalog.errors import CatalogDirError, first_line


def cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def neuronpedia_graph(catalog_dir: Path, pid: str, slug: str) -> dict:
    catalog_dir = Path(catalog_dir)
    manifest = Manifest.read(catalog_dir)
    prompt_id = find_prompt_id(catalog_dir, pid)
    info = json.loads(layout.prompt_info(catalog_dir, prompt_id).read_text())
    settings = json.loads(info["settings"])
    nodes, edges = _read(layout.prompt_part(catalog_dir, prompt_id, "nodes")), _read(layout.prompt_part(catalog_dir, prompt_id, "edges"))
    n_layers = info["n_layers"]
    # nodes.parquet is in the graph's fixed order, as circuit-tracer's node indices
    cumulative = cumulative_influence(torch.tensor([n["influence"] for n in nodes])).tolist()
    tokens_by_pos = {n["pos"]: n["token"] for n in nodes if n["kind"] == "token"}
    out_nodes, js_id = [], {}
    first_logit = True
    for n, share in zip(nodes, cumulative):
        if not n["kept"] or n["kind"] == "target":  # a custom target has no place in the viewer's format
            continue
        kind, layer, pos = n["kind"], n["layer"], n["pos"]
        node = {"ctx_idx": pos, "run_idx": 0, "reverse_ctx_idx": 0, "influence": share, "activation": n["activation"],
                "token_prob": 0.0, "is_target_logit": False, "clerp": ""}
        if kind == "feature":
            index = n["feature_index"]
            node |= {"node_id": f"{layer}_{index}_{pos}", "feature": cantor(layer, index), "layer": str(layer),
                     "feature_type": "cross layer transcoder", "jsNodeId": f"{layer}_{index}-0"}
        elif kind == "error":
            node |= {"node_id": f"err_{layer}_{pos}", "feature": -1, "layer": str(layer),
                     "feature_type": "mlp reconstruction error", "jsNodeId": f"{layer}_{pos}-0"}
        elif kind == "token":
            node |= {"node_id": f"E_{n['token_id']}_{pos}", "feature": pos, "layer": "E", "feature_type": "embedding",
                     "jsNodeId": f"E_{n['token_id']}-{pos}"}
        else:
            node |= {"node_id": f"{n_layers + 1}_{n['token_id']}_{pos}", "feature": n["token_id"], "layer": str(n_layers + 1),
                     "feature_type": "logit", "jsNodeId": f"L_{n['token_id']}-{pos}", "token_prob": n["probability"],
                     "is_target_logit": first_logit, "clerp": f'Output "{n["token"]}" (p={n["probability"]:.3f})', "influence": None,
                     "activation": None}
            first_logit = False
        js_id[n["id"]] = node["node_id"]
        out_nodes.append(node)
    links = [{"source": js_id[e["src"]], "target": js_id[e["dst"]], "weight": e["weight"]}
             for e in edges if e["src"] in js_id and e["dst"] in js_id]
    metadata = {
        "slug": slug, "scan": Path(manifest.transcoders).name or manifest.transcoders, "transcoder_list": [],
        "prompt_tokens": [tokens_by_pos[p] for p in sorted(tokens_by_pos)], "prompt": info["decoded"],
        "node_threshold": settings["node_threshold"], "schema_version": 1,
    }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": out_nodes, "links": links}


def _read(path: Path) -> list[dict]:
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowInvalid) as exc:
        raise CatalogDirError(f"{path}: unreadable ({first_line(exc)}); rerun the ingest to rewrite it") from None


def find_prompt_id(catalog_dir: Path, key: str) -> str:
    """A prompt id from an id or an exact prompt text (in a catalog this version reads: its manifest is checked)."""
    Manifest.read(catalog_dir)
    index = catalog_dir / layout.PROMPT_INDEX
    rows = pq.read_table(index, columns=["id", "text"]).to_pylist() if index.is_file() else []
    ids = [r["id"] for r in rows if key in (r["id"], r["text"])]
    if len(ids) != 1:
        problem = "neither an id nor the text of a prompt" if not ids else f"the text of {len(ids)} prompts ({', '.join(ids)})"
        raise CatalogDirError(f"unknown prompt {key!r}: {problem} in {catalog_dir} (see `circuit-catalog prompts`)")
    return ids[0]


def export_neuronpedia(catalog_dir: Path, pid: str, out_file: Path) -> dict:
    """Write the graph JSON and list it in `graph-metadata.json` next to it; returns the graph.

    The viewer finds a graph as `<slug>.json`, so the slug is the file's stem.
    """
    out_file = Path(out_file)
    graph = neuronpedia_graph(catalog_dir, pid, out_file.stem)
    write_text_atomic(json.dumps(graph, indent=2, ensure_ascii=False), out_file)
    index_path = out_file.parent / "graph-metadata.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"graphs": []}
    index["graphs"] = [g for g in index.get("graphs", []) if g.get("slug") != graph["metadata"]["slug"]] + [graph["metadata"]]
    write_text_atomic(json.dumps(index, indent=2, ensure_ascii=False), index_path)
    return graph
