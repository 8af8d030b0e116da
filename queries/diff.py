"""Two prompts' attribution graphs side by side: which nodes and edges gain or lose attribution to the target.

A node's attribution is its total effect on the target logit through its prompt's pruned graph
(`queries.paths.target_effects`); an edge's is its weight times its destination's effect per unit
(`queries.paths.edge_effect`). Nodes and edges are matched across the prompts by what they are and where
(`align`): the positions of the shared token prefix match one to one, the positions after it are counted from
the end (so the final ` is` of "The capital of France is" and of "The capital of Italy is" match, and so do
` France` and ` Italy`), and each prompt's target matches the other's whatever their tokens. Something found in
one pruned graph only counts 0 in the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from circuit_catalog.errors import UnknownPrompt
from circuit_catalog.queries.paths import edge_effect, target_effects
from circuit_catalog.queries.prompt_graph import PNode, PromptGraph, PromptInfo
from circuit_catalog.queries.rows import Rows, rows_of


@dataclass
class NodeChange:
    """One aligned node: `node` names it with its aligned position (`L1/5@-1`: last position, `tok@2`), `local_a` /
    `local_b` are its ids in each prompt (None where absent); `change` = attribution_b - attribution_a."""

    node: str
    kind: str
    local_a: str | None
    local_b: str | None
    token_a: str | None
    token_b: str | None
    attribution_a: float
    attribution_b: float
    change: float


@dataclass
class EdgeChange:
    """One aligned edge between aligned nodes (named as in `NodeChange.node`)."""

    src: str
    dst: str
    attribution_a: float
    attribution_b: float
    change: float


@dataclass
class GraphDiff:
    """`diff`: the two prompts, their targets, the length of their shared token prefix (positions below it match
    one to one, the rest count from the end), and the k nodes and k edges whose attribution changes most."""

    prompt_a: PromptInfo
    prompt_b: PromptInfo
    target_a: str
    target_b: str
    prefix: int
    nodes: Rows[NodeChange]
    edges: Rows[EdgeChange]


def shared_prefix(a: PromptGraph, b: PromptGraph) -> int:
    """How many leading token positions hold the same token in both prompts."""
    ta, tb = ([n.token_id for n in sorted(g.of_kind("token"), key=lambda n: n.pos)] for g in (a, b))
    n = 0
    while n < min(len(ta), len(tb)) and ta[n] == tb[n]:
        n += 1
    return n


def align(node: PNode, n_tokens: int, prefix: int, target: str) -> str:
    """The name a node is matched by across prompts: its kind, feature or layer, and its aligned position (as is
    within the shared prefix, negative from the end after it); `target` for the prompt's target."""
    if node.id == target:
        return "target"
    if node.kind in ("logit", "target"):
        return f"logit {node.token!r}"
    pos = node.pos if node.pos < prefix else node.pos - n_tokens
    if node.kind == "feature":
        return f"{node.feature_id}@{pos}"
    if node.kind == "error":
        return f"err:L{node.layer}@{pos}"
    return f"tok@{pos}"


def target_node(graph: PromptGraph, target: str | None) -> str:
    """The logit `target` names (any of the graph's logit targets), else the prompt's own: its custom target, the
    token it was ingested with, or its most probable logit."""
    if target is not None:
        return graph.logit_node(target)
    custom = graph.of_kind("target")
    if custom:
        return custom[0].id
    if graph.info.target is not None:
        return graph.logit_node(graph.info.target)
    logits = graph.of_kind("logit")
    if not logits:
        raise UnknownPrompt(f"prompt {graph.info.id}'s graph has no logit target")
    return max(logits, key=lambda n: (n.probability or 0.0, n.id)).id


def diff_graphs(a: PromptGraph, b: PromptGraph, target: str | None = None, k: int = 20) -> GraphDiff:
    """The k nodes and the k edges whose attribution to the target changes most from `a` to `b` (by |change|, ties
    by name)."""
    prefix = shared_prefix(a, b)
    sides = []
    for g in (a, b):
        t = target_node(g, target)
        effects = target_effects(g, t)
        names = {n.id: align(n, g.info.n_tokens, prefix, t) for n in g.nodes.values()}
        edges = {(names[src], names[dst]): edge_effect(g, effects, dst, w) for dst, ins in g.edges.items() for src, w in ins}
        sides.append((g, t, names, effects, edges))
    (ga, ta, na, ea, eda), (gb, tb, nb, eb, edb) = sides
    by_a, by_b = ({name: i for i, name in names.items()} for names in (na, nb))
    nodes = []
    for name in sorted(by_a.keys() | by_b.keys()):
        ia, ib = by_a.get(name), by_b.get(name)
        va, vb = ea.get(ia, 0.0), eb.get(ib, 0.0)
        nodes.append(NodeChange(name, (ga.nodes[ia] if ia else gb.nodes[ib]).kind, ia and ga.nodes[ia].local,
                                ib and gb.nodes[ib].local, ia and ga.nodes[ia].token, ib and gb.nodes[ib].token, va, vb, vb - va))
    edges = [EdgeChange(src, dst, eda.get((src, dst), 0.0), edb.get((src, dst), 0.0),
                        edb.get((src, dst), 0.0) - eda.get((src, dst), 0.0)) for src, dst in sorted(eda.keys() | edb.keys())]
    top_nodes = sorted(nodes, key=lambda r: (-abs(r.change), r.node))[:k]
    top_edges = sorted(edges, key=lambda r: (-abs(r.change), r.src, r.dst))[:k]
    return GraphDiff(a.info, b.info, ga.nodes[ta].label, gb.nodes[tb].label, prefix,
                     rows_of(NodeChange, top_nodes), rows_of(EdgeChange, top_edges))
