"""Supernodes: features that play the same role in attribution graphs, grouped automatically.

Researchers group a graph's features by hand today (circuit-tracer's and Neuronpedia's "supernodes"). Two features
play the same role when they read from and write to the same nodes and point the same way: each feature gets an
edge profile (its incoming and outgoing attribution weights, one entry per other node) and its decoder direction;
the similarity of two features is the mean of the cosines of both, and groups are the Louvain communities
(networkx) of the graph joining features whose similarity passes a threshold. Singletons are not groups.

Two scopes: one prompt's pruned graph (its feature nodes, at their positions), and the whole prompt set (a feature's
profile summed over every prompt, other nodes identified by feature id, token text, logit token or error layer, so
positions and prompts align). Each group is named by its members' most common top tokens: logit lens for groups
mostly in the later half of the layers, de-embedding for the earlier half.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from circuit_catalog.catalog import layout
from circuit_catalog.catalog.ids import parse_feature_id

THRESHOLD = 0.5  # similarity (mean of the two cosines) that joins two features
CATALOG_SCOPE = ""  # the `prompt_id` of catalog-wide supernodes


@dataclass
class Group:
    members: list[int]  # indices into the features given
    weight: float  # total influence of the members


def group_features(profiles: np.ndarray, directions: np.ndarray | None, influence: np.ndarray,
                   threshold: float = THRESHOLD, seed: int = 0) -> list[Group]:
    """Groups (two members or more, most influential first) of the features whose rows of `profiles` [n, m] (edge
    weights) and `directions` [n, d] (decoder rows; None: profiles alone) are similar."""
    import networkx as nx

    n = len(profiles)
    similarity = _cosines(profiles)
    if directions is not None:
        similarity = (similarity + _cosines(directions)) / 2
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    rows, cols = np.nonzero(np.triu(similarity > threshold, 1))
    graph.add_weighted_edges_from((int(i), int(j), float(similarity[i, j])) for i, j in zip(rows, cols))
    communities = nx.community.louvain_communities(graph, weight="weight", seed=seed) if graph.number_of_edges() else []
    groups = [Group(sorted(c), float(influence[sorted(c)].sum())) for c in communities if len(c) > 1]
    return sorted(groups, key=lambda g: (-g.weight, g.members))


def _cosines(x: np.ndarray) -> np.ndarray:
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x @ x.T


def _entity(node: dict) -> str:
    """A node's identity across prompts and positions: feature id, token text, logit token or error layer."""
    kind = node["kind"]
    if kind == "feature":
        return node["feature_id"]
    if kind == "error":
        return f"err:L{node['layer']}"
    if kind == "token":
        return f"tok:{node['token']}"
    return f"{kind}:{node['token']}"


def _profiles(index: dict[str, int], edges: list[tuple[str, str, float]], columns: dict[str, int]) -> np.ndarray:
    """[len(index), 2 * len(columns)]: row index[x] holds x's incoming weights by source column (first half) and its
    outgoing weights by target column (second half)."""
    out = np.zeros((len(index), 2 * len(columns)), dtype=np.float64)
    m = len(columns)
    for src, dst, w in edges:
        if dst in index:
            out[index[dst], columns[src]] += w
        if src in index:
            out[index[src], m + columns[dst]] += w
    return out


def supernode_tables(root: Path, directions, threshold: float = THRESHOLD) -> tuple[pa.Table, pa.Table]:
    """(supernodes, members) for every prompt of the catalog in `root` and for the prompt set; `directions(fids)` gives
    the decoder rows [len(fids), d] of features (or None to group by edge profiles alone)."""
    n_layers = 0
    groups: list[tuple[str, list[str], float]] = []  # (scope, member feature ids, influence)
    pooled_nodes: dict[str, float] = {}
    pooled_edges: list[tuple[str, str, float]] = []
    for info_path in layout.part_files(root, layout.PROMPT_INFOS):
        pid = info_path.parent.name
        nodes = pq.read_table(layout.prompt_part(root, pid, "nodes")).to_pylist()
        n_layers = max(n_layers, *(n["layer"] for n in nodes))  # the logits' layer: the model's layer count
        kept = {n["id"]: n for n in nodes if n["kept"]}
        edges = [(e["src"], e["dst"], e["weight"]) for e in pq.read_table(layout.prompt_part(root, pid, "edges")).to_pylist()]
        features = [nid for nid, n in kept.items() if n["kind"] == "feature"]
        if len(features) > 1:
            index = {nid: i for i, nid in enumerate(features)}
            columns = {nid: i for i, nid in enumerate(kept)}
            profiles = _profiles(index, edges, columns)
            fids = [kept[nid]["feature_id"] for nid in features]
            influence = np.array([kept[nid]["influence"] or 0.0 for nid in features])
            for g in group_features(profiles, directions(fids), influence, threshold):
                distinct = sorted({fids[i] for i in g.members})  # one feature at several positions is not a group
                if len(distinct) > 1:
                    groups.append((pid, distinct, g.weight))
        entity = {nid: _entity(n) for nid, n in kept.items()}
        for nid, n in kept.items():
            if n["kind"] == "feature":
                pooled_nodes[entity[nid]] = pooled_nodes.get(entity[nid], 0.0) + (n["influence"] or 0.0)
        pooled_edges += [(entity[s], entity[d], w) for s, d, w in edges if s in entity and d in entity]
    fids = sorted(pooled_nodes)
    if len(fids) > 1:
        index = {fid: i for i, fid in enumerate(fids)}
        columns = {e: i for i, e in enumerate(sorted({x for s, d, _ in pooled_edges for x in (s, d)}))}
        profiles = _profiles(index, pooled_edges, columns)
        influence = np.array([pooled_nodes[f] for f in fids])
        groups += [(CATALOG_SCOPE, [fids[i] for i in g.members], g.weight)
                   for g in group_features(profiles, directions(fids), influence, threshold)]
    names = _feature_names(root, sorted({f for _, fids, _ in groups for f in fids}))
    rows, members = [], []
    for n, (scope, fids, weight) in enumerate(groups):
        sid = f"S{n}:{scope or 'catalog'}"
        rows.append({"id": sid, "prompt_id": scope, "name": group_name(fids, names, n_layers), "size": len(fids), "influence": weight})
        members += [{"src": sid, "dst": fid} for fid in fids]
    return (pa.Table.from_pylist(rows, schema=layout.SUPERNODE_SCHEMA),
            pa.Table.from_pylist(members, schema=layout.SUPERNODE_MEMBER_SCHEMA))


def group_name(fids: list[str], names: dict[str, tuple[list[str], list[str]]], n_layers: int, n: int = 3) -> str:
    """The most common top tokens among the members: logit lens when most members sit in the later half of the
    layers, de-embedding otherwise (top 3 tokens of each member counted)."""
    late = sum(parse_feature_id(f)[0] * 2 >= n_layers for f in fids) * 2 >= len(fids)
    counts = Counter(t for f in fids for t in names.get(f, ([], []))[0 if late else 1][:3])
    tokens = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]
    return ("→ " if late else "← ") + " / ".join(repr(t) for t in tokens) if tokens else "(no tokens)"


def _feature_names(root: Path, fids: list[str]) -> dict[str, tuple[list[str], list[str]]]:
    """feature id -> (top logit-lens tokens, top extended de-embedding tokens) from features.parquet, for `fids`."""
    import pyarrow.compute as pc

    if not fids:
        return {}
    table = pq.read_table(root / layout.FEATURES, columns=["id", "logit_tokens", "deembed_ext_tokens"],
                          filters=pc.field("id").isin(fids)).to_pydict()
    return {fid: (list(lt or []), list(dt or [])) for fid, lt, dt in zip(table["id"], table["logit_tokens"], table["deembed_ext_tokens"])}


def write_supernodes(root: Path, tset=None, threshold: float = THRESHOLD) -> int:
    """Group the catalog's prompt graphs into `supernodes.parquet` and `supernode_members.parquet` (each written
    atomically); decoder directions from `tset` where given. Returns the number of supernodes."""
    from circuit_catalog.catalog.parquet_io import write_atomic

    def directions(fids: list[str]) -> np.ndarray | None:
        if tset is None:
            return None
        return np.stack([_total_write(tset[layer], index) for layer, index in map(parse_feature_id, fids)])

    supernodes, members = supernode_tables(Path(root), directions, threshold)
    write_atomic(members, Path(root) / layout.SUPERNODE_MEMBERS)
    write_atomic(supernodes, Path(root) / layout.SUPERNODES)
    return supernodes.num_rows


def _total_write(tc, index: int) -> np.ndarray:
    """[d_out]: feature `index`'s decoder direction, summed over a cross-layer transcoder's slices."""
    row = tc.W_dec[index].float()
    if tc.W_dec_later is not None:
        row = row + tc.W_dec_later[index].float().sum(0)
    return row.cpu().numpy()


def supernodes_stale(root: Path) -> bool:
    """Whether the prompt set changed since the supernodes were grouped (or they never were)."""
    supernodes, index = Path(root) / layout.SUPERNODES, Path(root) / layout.PROMPT_INDEX
    return index.is_file() and (not supernodes.is_file() or supernodes.stat().st_mtime_ns < index.stat().st_mtime_ns)
