"""One prompt's attribution graph as the query layer reads it, wherever it comes from.

`PromptGraph` is the one reader: the rows of a store (`from_rows`, via `Lookups.prompt_graph`), the catalog's
Parquet parts (`from_catalog`: the export and the validation read these) and a graph computed in memory, through
the tables the ingest writes for it (`from_tables` of `ingest.prompts.graph_tables`), all map onto it. Node ids are the catalog's (`catalog.ids`); a prompt is
found by its id or exact text through `find_prompt`, whichever source, with one error type (`UnknownPrompt`).

An edge s -> t holds s's direct effect on t; `PromptGraph.factor` gives it per unit of s (a feature's activation;
tokens and errors enter at unit scale). Path searches over a graph are in `queries.paths`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from circuit_catalog.catalog import layout
from circuit_catalog.catalog.ids import parse_feature_id, split_node_id
from circuit_catalog.catalog.manifest import Manifest
from circuit_catalog.queries.caveats import Flag, replacement_warning
from circuit_catalog.errors import CatalogDirError, UnknownFeature, UnknownPrompt, first_line


@dataclass
class PromptInfo:
    """A prompt of the catalog and its graph's scores; the counts are known where the catalog's files are read."""

    id: str
    text: str
    target: str | None
    n_tokens: int
    replacement_score: float
    completeness_score: float
    n_active_features: int | None = None
    n_feature_nodes: int | None = None
    capped: bool | None = None
    n_kept_nodes: int | None = None
    n_kept_edges: int | None = None
    settings: str | None = None  # the attribution settings (JSON)

    @classmethod
    def from_row(cls, row: dict) -> PromptInfo:
        return cls(**{f.name: row.get(f.name) for f in fields(cls)})


def find_prompt(rows: list[dict], key: str) -> dict:
    """The one row whose id or exact text is `key`: the lookup every prompt argument goes through."""
    found = [r for r in rows if key in (r["id"], r["text"])]
    if not found:
        raise UnknownPrompt(f"unknown prompt {key!r}: neither an id nor the text of a prompt in this catalog "
                            "(see `circuit-catalog prompts`)")
    if len(found) > 1:
        ids = ", ".join(sorted(r["id"] for r in found))
        raise UnknownPrompt(f"{key!r} is the text of {len(found)} prompts (with different targets); use an id: {ids}")
    return found[0]


def token_texts(text: str) -> list[str]:
    """A token text as typed and with the leading space most vocabularies put before words."""
    return [text] if text.startswith(" ") else [text, " " + text]


@dataclass
class PNode:
    id: str
    kind: str  # token | feature | error | logit | target
    layer: int
    pos: int
    feature_index: int | None = None  # a feature node's index within its layer
    feature_id: str | None = None  # a feature node's feature, `L8/355`
    token_id: int | None = None
    token: str | None = None
    activation: float | None = None
    value: float | None = None
    bias: float | None = None
    influence: float | None = None
    probability: float | None = None
    kept: bool = True
    top_tokens: list[str] | None = None  # a feature's top extended de-embedding tokens (filled by `Lookups.prompt_graph`)
    logit_tokens: list[str] | None = None  # a feature's top logit-lens tokens (likewise)

    @property
    def local(self) -> str:
        """The id without its prompt prefix (`L8/355@3`, `tok@0`, `err:L2@3`, `logit:42`)."""
        return split_node_id(self.id)[1]

    @property
    def label(self) -> str:
        if self.kind == "token":
            return f"{self.token!r}@{self.pos}"
        if self.kind == "logit":
            return f"logit {self.token!r}"
        return self.local

    @property
    def unit(self) -> float:
        """What one unit of this node is, in the units of its outgoing edge weights."""
        return self.activation if self.kind == "feature" and self.activation else 1.0


@dataclass
class GraphSummary:
    """What `graph` prints: scores, sizes, the logit targets and the most influential inner nodes."""

    prompt: PromptInfo
    nodes: dict[str, int]  # kind -> count
    edges: int
    logits: list[PNode]  # most probable first
    top: list[PNode]  # feature and error nodes by influence
    labels: dict[str, str] = field(default_factory=dict)  # node id -> `PromptGraph.describe` of every node listed
    flags: dict[str, list[Flag]] = field(default_factory=dict)  # feature id -> its artefact flags (`queries.caveats`)
    layer_flags: dict[int, list[Flag]] = field(default_factory=dict)
    quality: str = ""  # the transcoders' quality in one line, or how to measure it
    warning: str | None = None  # the replacement score is low


@dataclass
class PromptGraph:
    info: PromptInfo
    nodes: dict[str, PNode]  # in the graph's fixed order where read from the catalog (circuit-tracer's node order)
    edges: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # dst -> [(src, weight)]
    decoded: str | None = None  # the tokens as text, BOS included (read from the catalog only)
    n_layers: int | None = None

    @classmethod
    def from_rows(cls, info: PromptInfo, nodes: list[dict], edges: list[dict], **extra) -> PromptGraph:
        """From node and edge rows with the catalog's column names (a store's, the Parquet parts')."""
        names = [f.name for f in fields(PNode)]
        graph = cls(info, {}, defaultdict(list), **extra)
        for n in nodes:
            node = PNode(**{k: n[k] for k in names if n.get(k) is not None})
            graph.nodes[node.id] = node
        for e in edges:
            graph.edges[e["dst"]].append((e["src"], float(e["weight"])))
        return graph

    @classmethod
    def from_tables(cls, info: PromptInfo, tables: dict[str, pa.Table]) -> PromptGraph:
        """From the tables the ingest writes for a graph computed in memory (`ingest.prompts.graph_tables`)."""
        return cls.from_rows(info, [n for n in tables["nodes"].to_pylist() if n["kept"]], tables["edges"].to_pylist())

    @classmethod
    def from_catalog(cls, root: Path, key: str, all_nodes: bool = False) -> PromptGraph:
        """A prompt's pruned graph from the catalog's Parquet parts, by id or text; `all_nodes` keeps the nodes
        pruning dropped too (marked `kept=False`, without edges), in the graph's order."""
        record = prompt_record(root, key)
        pid = record["id"]
        nodes = [n for n in _read(layout.prompt_part(Path(root), pid, "nodes")) if all_nodes or n["kept"]]
        return cls.from_rows(PromptInfo.from_row(record), nodes, _read(layout.prompt_part(Path(root), pid, "edges")),
                             decoded=record.get("decoded"), n_layers=record.get("n_layers"))

    def factor(self, src: str, weight: float) -> float:
        return weight / self.nodes[src].unit

    def of_kind(self, kind: str) -> list[PNode]:
        return [n for n in self.nodes.values() if n.kind == kind]

    def summary(self, k: int = 15) -> GraphSummary:
        kinds = {kind: len(self.of_kind(kind)) for kind in ("token", "feature", "error", "logit")}
        inner = [n for n in self.nodes.values() if n.kind in ("feature", "error")]
        logits = sorted(self.of_kind("logit"), key=lambda n: -(n.probability or 0.0))
        top = sorted(inner, key=lambda n: -(n.influence or 0.0))[:k]
        return GraphSummary(self.info, kinds, sum(len(v) for v in self.edges.values()), logits, top,
                            {n.id: self.describe(n) for n in logits + top}, warning=replacement_warning(self.info.replacement_score))

    def token_at(self, pos: int) -> str | None:
        """The input token's text at a position (None if the graph has no token node there)."""
        return next((n.token for n in self.of_kind("token") if n.pos == pos), None)

    def describe(self, node: PNode, n_tokens: int = 3) -> str:
        """The node's label with what a reader needs to place it: the input token at its position and, for a feature,
        its top extended de-embedding (<-) and logit-lens (->) tokens: `L8/355@3 ' is' (<- ' the' ' a'; -> ' Paris')`."""
        if node.kind in ("token", "logit", "target"):
            return node.label
        text = f"{node.label} {self.token_at(node.pos)!r}"
        if node.kind != "feature" or (node.top_tokens is None and node.logit_tokens is None):
            return text
        reads = " ".join(map(repr, (node.top_tokens or [])[:n_tokens]))
        writes = " ".join(map(repr, (node.logit_tokens or [])[:n_tokens]))
        return f"{text} (<- {reads}; -> {writes})"

    def to_networkx(self):
        """A `networkx.DiGraph`: node attributes are PNode's fields (plus `label`), edges carry `weight`."""
        import networkx as nx

        g = nx.DiGraph(prompt=self.info.id, text=self.info.text)
        for n in self.nodes.values():
            g.add_node(n.id, **{f.name: getattr(n, f.name) for f in fields(PNode) if f.name != "id"}, label=n.label)
        for dst, ins in self.edges.items():
            g.add_edges_from((src, dst, {"weight": w}) for src, w in ins)
        return g

    def logit_node(self, text: str) -> str:
        """The id of the logit target with this token text (with or without a leading space)."""
        found = [n.id for n in self.of_kind("logit") if n.token in token_texts(text)]
        if not found:
            logits = ", ".join(repr(n.token) for n in self.of_kind("logit"))
            raise UnknownPrompt(f"{text!r} is not a logit target of prompt {self.info.id} (targets: {logits})")
        return found[0]

    def token_nodes(self, which: str | int | None) -> set[str]:
        """Ids of the token nodes at a position (negative counts from the end) or with a text; all if None."""
        tokens = self.of_kind("token")
        if which is None:
            found = {n.id for n in tokens}
        elif isinstance(which, int) or str(which).lstrip("-").isdigit():
            pos = int(which) % len(tokens) if tokens else 0
            found = {n.id for n in tokens if n.pos == pos}
        else:
            found = {n.id for n in tokens if n.token in token_texts(str(which))}
        if not found:
            texts = " ".join(f"{n.pos}:{n.token!r}" for n in sorted(tokens, key=lambda n: n.pos))
            raise UnknownPrompt(f"no token {which!r} in prompt {self.info.id} (tokens: {texts})")
        return found

    def feature_nodes(self, which: str) -> set[str]:
        """Ids of a feature's nodes: `L8/355` at every position, `L8/355@4` at one."""
        fid, _, pos = which.partition("@")
        parse_feature_id(fid)  # malformed ids fail here, in one line
        found = {n.id for n in self.of_kind("feature") if n.feature_id == fid and (not pos or str(n.pos) == pos)}
        if not found:
            raise UnknownFeature(f"{which} is not a node of prompt {self.info.id}'s pruned graph (see `circuit-catalog graph`)")
        return found


def prompt_index(root: Path) -> list[dict]:
    """The rows of the catalog's prompt index (empty when it has no prompts)."""
    path = Path(root) / layout.PROMPT_INDEX
    return _read(path) if path.is_file() else []


def prompt_record(root: Path, key: str) -> dict:
    """The `prompt.json` record of the prompt with this id or text: its tokens, settings and scores."""
    Manifest.read(Path(root))  # a catalog of another format is refused in one line, not misread
    path = layout.prompt_info(Path(root), find_prompt(prompt_index(root), key)["id"])
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CatalogDirError(f"{path}: unreadable prompt record ({first_line(exc)}); rerun the ingest") from None


def _read(path: Path) -> list[dict]:
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowInvalid) as exc:
        raise CatalogDirError(f"{path}: unreadable ({first_line(exc)}); rerun the ingest to rewrite it") from None
