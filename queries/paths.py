"""Path searches over one prompt's attribution graph (`PromptGraph`): which chains of nodes carry a logit.

An edge s -> t holds s's direct effect on t. Per unit of a feature's activation that is `weight / activation`;
tokens and errors enter at unit scale. Two measures of a path, each exact for the graph as stored:

- **attribution**: the product of the per-unit factors along the path times its first node's unit, i.e. the effect
  of its first node on the target through exactly that path (features respond with slope 1 where active). Path
  attributions add up to the target's total input, so they are shown as a `share` of the target's total absolute
  input too. Short paths win this ranking: every extra hop splits the effect among more routes.
- **bottleneck**: the smallest edge influence along the path. An edge's influence on the target is the share of
  its destination's absolute input it carries times the destination's own influence (the target's is 1; a node's
  is the sum of its outgoing edges' influences): the row-normalised |weights| pruning uses (`ingest.pruning`), for one target. A
  path whose every edge carries a large part of the target's input is a mechanism the target depends on, however
  long; this is the default ranking.

`best_paths` finds the k best paths under either ranking exactly, with optional constraints (through a given
feature, avoiding error nodes, at least n edges), by a dynamic programme over the DAG in layer order that keeps
the k best partial paths per (node, constraint state). `greedy_paths` is the seed's backwards search.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from dataclasses import dataclass

from circuit_catalog.queries.prompt_graph import PromptGraph

RANKS = ("bottleneck", "attribution")


@dataclass
class NodePath:
    nodes: list[str]  # node ids, source first
    strength: float  # the path's attribution (greedy: its first node's attribution to the target)
    share: float = 0.0  # strength / the target's total absolute input
    bottleneck: float = 0.0  # the smallest edge influence on the target along the path


def edge_influence(graph: PromptGraph, target: str) -> dict[tuple[str, str], float]:
    """(src, dst) -> the edge's influence on `target` (module docstring), for every edge with a path to it."""
    totals = {dst: sum(abs(w) for _, w in ins) for dst, ins in graph.edges.items()}
    node = defaultdict(float, {target: 1.0})
    out: dict[tuple[str, str], float] = {}
    for dst in sorted(graph.nodes, key=lambda i: (-graph.nodes[i].layer, -graph.nodes[i].pos, i)):  # targets first
        if node[dst] == 0.0 or not totals.get(dst):
            continue
        for src, w in graph.edges[dst]:
            out[src, dst] = abs(w) / totals[dst] * node[dst]
            node[src] += out[src, dst]
    return out


def target_effects(graph: PromptGraph, target: str) -> dict[str, float]:
    """node id -> its attribution to `target`: its total signed effect on the target through the graph, at its own
    activation (tokens and errors at unit scale), i.e. the sum over its paths of the products of per-unit factors
    (`PromptGraph.factor`) times its unit. The target's is 1, a node without a path to it has 0; a node's value is the
    sum of its outgoing edges' `weight * per-unit effect of the destination` (`edge_effect`)."""
    per_unit = defaultdict(float, {target: 1.0})
    for dst in sorted(graph.nodes, key=lambda i: (-graph.nodes[i].layer, -graph.nodes[i].pos, i)):  # targets first
        if per_unit[dst] == 0.0:
            continue
        for src, w in graph.edges.get(dst, []):
            per_unit[src] += graph.factor(src, w) * per_unit[dst]
    return {n: per_unit[n] * graph.nodes[n].unit if n != target else 1.0 for n in graph.nodes}


def edge_effect(graph: PromptGraph, effects: dict[str, float], dst: str, weight: float) -> float:
    """An edge's attribution to the target: its weight (its source's direct effect on `dst`) times `dst`'s effect on
    the target per unit of `dst` (from `target_effects`); a source's outgoing edges' values sum to its attribution."""
    return weight * effects[dst] / graph.nodes[dst].unit


def best_paths(graph: PromptGraph, sources: set[str], target: str, k: int = 10, rank: str = "bottleneck",
               via: set[str] | None = None, avoid_errors: bool = False, min_hops: int = 1) -> list[NodePath]:
    """The k best source -> target paths under `rank` (RANKS), exactly: through a node of `via` when given, with no
    error node when `avoid_errors`, with at least `min_hops` edges. Ties break by the paths' node ids."""
    if rank not in RANKS:
        raise ValueError(f"unknown ranking {rank!r} (one of {', '.join(RANKS)})")
    influence = edge_influence(graph, target)
    total = sum(abs(w) for _, w in graph.edges.get(target, [])) or 1.0
    via = via or set()

    def state(node: str, seen: bool, hops: int) -> tuple[str, bool, int]:
        return node, seen or node in via, min(hops, min_hops)

    # (node, passed via, edges so far capped at min_hops) -> k best [(score, log|attr|, sign, path)]; score is
    # log|attribution| or the bottleneck, both larger-is-better
    best: dict[tuple[str, bool, int], list[tuple[float, float, float, tuple[str, ...]]]] = defaultdict(list)
    order = sorted(graph.nodes.values(), key=lambda n: (n.layer, n.pos, n.id))
    for node in order:
        if avoid_errors and node.kind == "error":
            continue
        found: dict[tuple[str, bool, int], list] = defaultdict(list)
        if node.id in sources:
            unit = graph.nodes[node.id].unit
            found[state(node.id, False, 0)].append((math.inf, math.log(abs(unit)), math.copysign(1.0, unit), (node.id,)))
        for src, weight in graph.edges.get(node.id, []):
            f = graph.factor(src, weight)
            e = influence.get((src, node.id), 0.0)
            if f == 0 or e == 0:
                continue
            for seen in (False, True):
                for hops in range(min_hops + 1):
                    for score, log, sign, path in best.get((src, seen, hops), []):
                        log_f = log + math.log(abs(f))
                        new = log_f if rank == "attribution" else min(score, e)
                        found[state(node.id, seen, hops + 1)].append((new, log_f, sign * math.copysign(1.0, f), (*path, node.id)))
        for key, entries in found.items():
            best[key] = heapq.nlargest(k, entries, key=_order)
    done = [entry for entry in best.get((target, bool(via), min_hops), []) if len(entry[3]) > 1]
    return [_path(graph, influence, total, path, sign * math.exp(log)) for _, log, sign, path in done]


def _order(entry: tuple) -> tuple:
    """Larger score first, then the path's node ids in reverse order (so `nlargest` breaks ties by smaller ids)."""
    return entry[0], tuple(_Reverse(n) for n in entry[3])


class _Reverse(str):
    __slots__ = ()

    def __lt__(self, other: str) -> bool:
        return str.__gt__(self, other)

    def __gt__(self, other: str) -> bool:
        return str.__lt__(self, other)


def _path(graph: PromptGraph, influence: dict, total: float, nodes: tuple[str, ...], strength: float) -> NodePath:
    edges = [influence.get(pair, 0.0) for pair in zip(nodes, nodes[1:])]
    return NodePath(list(nodes), strength, strength / total, min(edges) if edges else 0.0)


def greedy_paths(graph: PromptGraph, target: str, num_iters: int = 3, num_branches: int = 5,
                 avoid_errors: bool = False) -> list[NodePath]:
    """The seed's greedy search backwards from `target`, expanding each path by its `num_branches` strongest inputs
    (error nodes left out when `avoid_errors`) and keeping the `num_branches` strongest paths per iteration; a path's
    strength is its first node's attribution through it. Ranked by |attribution| (the reference kept only the largest
    signed values), and paths reaching a token or error node are kept as finished rather than dropped."""
    influence = edge_influence(graph, target)
    total = sum(abs(w) for _, w in graph.edges.get(target, [])) or 1.0
    frontier = [NodePath([target], 1.0)]
    finished: list[NodePath] = []
    for _ in range(num_iters):
        candidates = []
        for path in frontier:
            head = path.nodes[0]
            inputs = [(s, w) for s, w in graph.edges.get(head, []) if not (avoid_errors and graph.nodes[s].kind == "error")]
            if not inputs:
                finished.append(path)
                continue
            # attribution of an input through this path: its direct effect on the head, times the
            # head's attribution per unit of the head's own activation
            scale = path.strength / (1.0 if head == target else graph.nodes[head].unit)
            scored = [NodePath([src, *path.nodes], weight * scale) for src, weight in inputs]
            candidates += heapq.nlargest(num_branches, scored, key=lambda p: abs(p.strength))
        frontier = heapq.nlargest(num_branches, candidates, key=lambda p: abs(p.strength))
        if not frontier:
            break
    done = [p for p in finished if len(p.nodes) > 1] + frontier
    return [_path(graph, influence, total, tuple(p.nodes), p.strength) for p in sorted(done, key=lambda p: (-abs(p.strength), p.nodes))]
