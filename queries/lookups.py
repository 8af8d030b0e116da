"""Named Cypher lookups over one graph store, always parameterised, returning typed rows.

`Lookups(store)` answers the graph questions behind `Catalog` (queries/catalog.py): what feeds a
feature, what it feeds, its tokens, which features mention a token, the strongest token -> feature
-> ... -> logit paths, a feature's weights neighbourhood, and the prompts' graphs and interventions.
Every method runs `.cypher` files from `queries/cypher/` (a `<name>.<dialect>.cypher` variant wins
where the engines' dialects differ) and never interpolates user text into a statement.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import NamedTuple

from circuit_catalog.catalog.ids import parse_feature_id, parse_local, split_node_id
from circuit_catalog.catalog.store import GraphStore, Row
from circuit_catalog.errors import CatalogDirError, UnknownFeature
from circuit_catalog.queries.paths import NodePath, best_paths, greedy_paths
from circuit_catalog.queries.prompt_graph import PromptGraph, PromptInfo, find_prompt, token_texts
from circuit_catalog.queries.rows import Rows, rows_of

CYPHER_DIR = Path(__file__).with_name("cypher")


@cache
def named_query(name: str, dialect: str) -> str:
    """The text of a named query for one dialect."""
    for candidate in (CYPHER_DIR / f"{name}.{dialect}.cypher", CYPHER_DIR / f"{name}.cypher"):
        if candidate.is_file():
            return candidate.read_text()
    raise KeyError(f"no named query {name!r}")


def query_names() -> list[str]:
    return sorted({p.name.split(".")[0] for p in CYPHER_DIR.glob("*.cypher")})


class TokenWeight(NamedTuple):
    token: str
    weight: float


class NodeInput(NamedTuple):
    node: str  # a node's local id (`L1/5@3`), or for a token its text and position
    weight: float


class LogitChange(NamedTuple):
    token: str
    change: float


@dataclass
class Edge:
    feature: str
    weight: float
    tokens: list[str] = field(default_factory=list)  # the other feature's top extended de-embedding tokens


@dataclass
class FeatureTokens:
    id: str
    deembed: list[TokenWeight]
    deembed_extended: list[TokenWeight]
    logits: list[TokenWeight]


@dataclass
class Hit:
    feature: str
    via: str  # deembed_raw | deembed_extended | logit
    token: str
    weight: float


@dataclass
class WeightPath:
    nodes: list[str]  # token text, feature ids..., logit token text
    weights: list[float]  # one per edge
    strength: float = field(init=False)  # the product of the weights

    def __post_init__(self) -> None:
        self.strength = math.prod(self.weights)


@dataclass
class Neighbourhood:
    """A feature's pullback neighbourhood: the `k` strongest inputs and outputs of each node, `depth` hops out."""

    center: str
    features: dict[str, dict]  # id -> {layer, index, tokens (top extended de-embedding)}
    edges: list[tuple[str, str, float]]  # (src, dst, weight), src in an earlier layer

    def to_networkx(self):
        """A `networkx.DiGraph` of features (attributes layer, index, tokens) and weighted pullback edges."""
        import networkx as nx

        g = nx.DiGraph(center=self.center)
        g.add_nodes_from(self.features.items())
        g.add_weighted_edges_from(self.edges)
        return g


@dataclass
class PromptUse:
    prompt: str
    text: str
    positions: list[int]
    influence: float
    activation: float


@dataclass
class Recurring:
    feature: str
    prompts: int
    influence: float
    tokens: list[str]
    logit_tokens: list[str]


@dataclass
class FeatureUse:
    """One occurrence of a feature in a prompt's pruned graph, with its strongest direct inputs there."""

    prompt: str
    pos: int
    activation: float
    influence: float
    inputs: list[NodeInput]
    text: str | None = None  # the prompt's text (None for blind case studies)


@dataclass
class InterventionUse:
    """One recorded intervention that edited a feature, and each target logit's change."""

    id: str
    prompt_id: str | None
    prompt: str
    regime: str
    spec: str  # every edit of the intervention
    edits: str  # this feature's edits
    kl: float
    changes: list[LogitChange]
    generated_original: str | None = None
    generated_steered: str | None = None


class Lookups:
    def __init__(self, store: GraphStore):
        self.store = store

    def __enter__(self) -> Lookups:
        return self

    def __exit__(self, *exc) -> None:
        self.store.close()

    def _q(self, name: str, **params) -> list[Row]:
        return self.store.run(named_query(name, self.store.dialect), params)

    def check_feature(self, fid: str) -> None:
        parse_feature_id(fid)
        if not self._q("feature", id=fid):
            raise UnknownFeature(f"unknown feature {fid}: not in this catalog")

    def upstream(self, fid: str, k: int = 10, layer: int | None = None, sign: int | None = None,
                 normalise: bool = False) -> Rows[Edge]:
        """The k strongest incoming pullback edges by |weight|, strongest first (`normalise`: see `_edges`)."""
        return self._edges("upstream", fid, k, layer, sign, normalise)

    def downstream(self, fid: str, k: int = 10, layer: int | None = None, sign: int | None = None,
                   normalise: bool = False) -> Rows[Edge]:
        """The k strongest outgoing pullback edges by |weight|, strongest first (`normalise`: see `_edges`)."""
        return self._edges("downstream", fid, k, layer, sign, normalise)

    def _edges(self, name: str, fid: str, k: int, layer: int | None, sign: int | None, normalise: bool,
               n_tokens: int = 5) -> Rows[Edge]:
        """Edges by the stored (raw) weight, or with `normalise` by raw weight x the reading feature's `inv_scale` (its
        layer's mean 1 / norm scale over the statistics' tokens): raw weights leave the reader's norm scale out, which
        differs between layers, so only normalised weights into different layers compare."""
        parse_feature_id(fid)
        rows = self._q(name, id=fid, k=k, layer=-1 if layer is None else layer, sign=0 if sign is None else sign,
                       normalise=normalise)
        if not rows:
            self.check_feature(fid)  # no edges: tell an unknown feature from one without edges
        if any(r["weight"] is None for r in rows):  # only a normalised weight can be null: the reader's scale is
            raise CatalogDirError("this catalog has no recorded norm scales for --normalise; rerun `circuit-catalog ingest` "
                                  "with --dataset D --tokens N: the statistics record them")
        return rows_of(Edge, (Edge(r["feature"], float(r["weight"]), list(r["tokens"] or [])[:n_tokens]) for r in rows))

    def tokens(self, fid: str, k: int = 10) -> FeatureTokens:
        """De-embedding (raw, extended) and logit-lens tokens with weights, strongest first."""
        self.check_feature(fid)
        by_variant: dict[str, list[TokenWeight]] = defaultdict(list)
        for r in self._q("deembed_tokens", id=fid):
            by_variant[r["variant"]].append(TokenWeight(r["token"], float(r["weight"])))
        logits = [TokenWeight(r["token"], float(r["weight"])) for r in self._q("logit_tokens", id=fid)]
        return FeatureTokens(fid, by_variant["raw"][:k], by_variant["extended"][:k], logits[:k])

    def search(self, token: str, k: int = 20) -> Rows[Hit]:
        """Features whose top logit-lens or de-embedding tokens include `token`: up to k of each kind.

        Kinds are kept apart (logit lens first) because their weights are on different scales.
        """
        texts = token_texts(token)
        hits = [Hit(r["feature"], "logit", r["token"], float(r["weight"])) for r in self._q("search_logit", texts=texts, k=k)]
        for variant in ("extended", "raw"):
            rows = self._q("search_deembed", texts=texts, variant=variant, k=k)
            hits += [Hit(r["feature"], f"deembed_{variant}", r["token"], float(r["weight"])) for r in rows]
        return rows_of(Hit, hits)

    def paths(self, from_token: str, to_logit: str, k: int = 10, max_hops: int = 2, beam: int = 256, variant: str = "extended",
              starts: list[dict] | None = None, ends: list[dict] | None = None) -> Rows[WeightPath]:
        """The k strongest token -> feature (-> feature ...) -> logit paths by |product of weights|.

        A beam search over the layered graph: at most `max_hops` pullback edges, keeping the `beam`
        strongest partial paths after each expansion, so the work stays bounded however dense the
        catalog. With a beam wider than the number of partial paths it is exact. The first and last hops are the
        stored de-embedding and logit-lens edges, or `starts` / `ends` rows (feature, layer, token, weight) computed
        from the weights for tokens outside the stored top K (`ingest.token_lens.token_ends`).
        """
        starts = starts if starts is not None else self._q("path_starts", texts=token_texts(from_token), variant=variant)
        ends = {r["feature"]: (r["token"], float(r["weight"]))
                for r in (ends if ends is not None else self._q("path_ends", texts=token_texts(to_logit)))}
        if not starts or not ends:
            return rows_of(WeightPath, [])
        max_layer = max(parse_feature_id(f)[0] for f in ends)
        frontier = [WeightPath([r["token"], r["feature"]], [float(r["weight"])]) for r in starts if r["layer"] <= max_layer]
        complete: list[WeightPath] = []
        for hop in range(max_hops + 1):
            for p in frontier:
                if p.nodes[-1] in ends:
                    token, w = ends[p.nodes[-1]]
                    complete.append(WeightPath([*p.nodes, token], [*p.weights, w]))
            if hop == max_hops or not frontier:
                break
            frontier = sorted(frontier, key=lambda p: -abs(p.strength))[:beam]
            steps: dict[str, list[Row]] = defaultdict(list)
            for r in self._q("path_steps", ids=sorted({p.nodes[-1] for p in frontier}), max_layer=max_layer):
                steps[r["src"]].append(r)
            frontier = [WeightPath([*p.nodes, r["dst"]], [*p.weights, float(r["weight"])]) for p in frontier for r in steps[p.nodes[-1]]]
            frontier = sorted(frontier, key=lambda p: -abs(p.strength))[:beam]
        return rows_of(WeightPath, sorted(complete, key=lambda p: (-abs(p.strength), p.nodes))[:k])

    def path_ends(self, from_token: str, to_logit: str, variant: str = "extended") -> tuple[int, int]:
        """How many features a weights-graph path could start at (de-embedding from `from_token`) and end at (logit
        lens reaching `to_logit`): why `paths` found nothing when it does."""
        starts = {r["feature"] for r in self._q("path_starts", texts=token_texts(from_token), variant=variant)}
        return len(starts), len({r["feature"] for r in self._q("path_ends", texts=token_texts(to_logit))})

    def neighbourhood(self, fid: str, depth: int = 1, k: int = 5) -> Neighbourhood:
        """The feature, its k strongest inputs and outputs, theirs, ... `depth` hops out (edges by |weight|)."""
        self.check_feature(fid)
        features: dict[str, dict] = {}
        edges: dict[tuple[str, str], float] = {}
        frontier = [fid]
        for _ in range(depth):
            reached = []
            for node in frontier:
                for e, pair in [(e, (e.feature, node)) for e in self.upstream(node, k)] + \
                               [(e, (node, e.feature)) for e in self.downstream(node, k)]:
                    edges[pair] = e.weight
                    if e.feature != fid and e.feature not in features:
                        features[e.feature] = {"tokens": e.tokens}
                        reached.append(e.feature)
            frontier = reached
        features.setdefault(fid, {"tokens": [t for t, _ in self.tokens(fid, 5).deembed_extended]})
        for f, attrs in features.items():
            attrs["layer"], attrs["index"] = parse_feature_id(f)
        return Neighbourhood(fid, features, [(a, b, w) for (a, b), w in edges.items()])

    # ------------------------------------------------------------ per-prompt attribution graphs

    def prompts(self, k: int = 100_000) -> Rows[PromptInfo]:
        return rows_of(PromptInfo, (PromptInfo.from_row(r) for r in self._q("prompts", k=k)))

    def prompt(self, key: str) -> PromptInfo:
        """A prompt by its id or its exact text (the store finds the candidates, `find_prompt` decides)."""
        return PromptInfo.from_row(find_prompt(self._q("prompt", key=key), key))

    def prompt_graph(self, key: str) -> PromptGraph:
        """The pruned attribution graph of one prompt (by id or text), with the prompt's row."""
        info = self.prompt(key)
        graph = PromptGraph.from_rows(info, self._q("prompt_nodes", id=info.id), self._q("prompt_edges", id=info.id))
        features = graph.of_kind("feature")
        if features:  # one query for every feature's labels
            labels = {r["id"]: r for r in self._q("feature_labels", ids=sorted({n.feature_id for n in features}))}
            for n in features:
                n.top_tokens, n.logit_tokens = list(labels[n.feature_id]["tokens"] or []), list(labels[n.feature_id]["logit_tokens"] or [])
        return graph

    def prompt_paths(self, key: str, to_logit: str, from_token: str | int | None = None, k: int = 10, greedy: bool = False,
                     iters: int = 3, branches: int = 5, rank: str = "bottleneck", via: str | None = None,
                     no_errors: bool = False, min_hops: int = 1) -> tuple[PromptGraph, list[NodePath]]:
        """The prompt's graph and its k best paths (`queries.paths.best_paths`, ranked by `rank`) from the token(s) at
        a position or with a text (every token if None) to a logit target, through the feature `via` (`L8/355` at
        any position, `L8/355@4` at one) when given, avoiding error nodes when `no_errors`, with at least `min_hops`
        edges; `greedy`: the seed's greedy search back from the logit (`iters` edges, `branches` paths kept per
        step) instead."""
        graph = self.prompt_graph(key)
        logit = graph.logit_node(to_logit)
        if greedy:
            return graph, greedy_paths(graph, logit, iters, branches, avoid_errors=no_errors)
        through = graph.feature_nodes(via) if via is not None else None
        return graph, best_paths(graph, graph.token_nodes(from_token), logit, k, rank, through, no_errors, min_hops)

    def prompts_using(self, fid: str, k: int = 20) -> Rows[PromptUse]:
        """Prompts whose pruned graph contains the feature (at any position), most influential first."""
        self.check_feature(fid)
        return rows_of(PromptUse, (PromptUse(r["prompt"], r["text"], sorted(r["positions"]), float(r["influence"]), float(r["activation"]))
                                   for r in self._q("prompts_using", id=fid, k=k)))

    def feature_uses(self, fid: str, k: int = 10, n_inputs: int = 5, token_text: bool = True) -> Rows[FeatureUse]:
        """The feature's k most influential occurrences in prompt graphs, each with its strongest inputs.

        `token_text=False` names token inputs by position only and leaves the prompt's text out (for blind case studies).
        """
        self.check_feature(fid)
        uses = []
        texts = {p.id: p.text for p in self.prompts()} if token_text else {}
        for r in self._q("feature_inputs", id=fid, k=k, n_inputs=n_inputs):
            inputs = []
            for i in r["inputs"]:
                local = split_node_id(i["src"])[1]
                inputs.append(NodeInput(f"{i['token']!r}@{parse_local(local).pos}" if i["kind"] == "token" and token_text else local,
                                        float(i["weight"])))
            uses.append(FeatureUse(r["prompt"], int(r["pos"]), float(r["activation"]), float(r["influence"]), inputs,
                                   texts.get(r["prompt"])))
        return rows_of(FeatureUse, uses)

    def recurring(self, k: int = 20) -> Rows[Recurring]:
        """Features found in the most prompts' pruned graphs."""
        return rows_of(Recurring, (Recurring(r["feature"], int(r["prompts"]), float(r["influence"]), list(r["tokens"] or [])[:5],
                                             list(r["logit_tokens"] or [])[:5]) for r in self._q("recurring", k=k)))

    def interventions(self, fid: str, k: int = 20) -> Rows[InterventionUse]:
        """The k newest recorded interventions that edited the feature, with their logit changes."""
        self.check_feature(fid)
        return self._interventions("interventions", id=fid, k=k)

    def prompt_interventions(self, key: str, k: int = 20) -> Rows[InterventionUse]:
        """The k newest recorded interventions on a prompt (by id or text); `edits` is the whole spec."""
        return self._interventions("prompt_interventions", id=self.prompt(key).id, k=k)

    def _interventions(self, name: str, **params) -> Rows[InterventionUse]:
        found: dict[str, InterventionUse] = {}
        for r in self._q(name, **params):
            use = found.setdefault(r["id"], InterventionUse(
                r["id"], r["prompt_id"], r["prompt"], r["regime"], r["spec"], r["edits"], float(r["kl"]), [],
                r["generated_original"], r["generated_steered"]))
            if r["token"] is not None:
                use.changes.append(LogitChange(r["token"], float(r["change"])))
        for use in found.values():
            use.changes.sort(key=lambda c: -abs(c.change))
        return rows_of(InterventionUse, found.values())
