"""The prompt report: one prompt's pruned attribution graph as a picture (positions x layers), its
scores, logit targets, most influential nodes and strongest token -> logit paths.

The picture shows the tokens, the logits and the `max_nodes` most influential features and error nodes
of the pruned graph, with the strongest edges among them; the tables cover the whole pruned graph.
Feature nodes link to their cards where those are written next to the report. Every node is labelled
(`PromptGraph.describe`: the token at its position, a feature's top de-embedding and logit-lens tokens) and the
page carries the warnings of `queries.caveats` (low replacement score, near-dead layers, flagged features) and the
transcoders' quality.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from circuit_catalog.catalog import layout
from circuit_catalog.catalog.manifest import Manifest
from circuit_catalog.queries.caveats import Flag, catalog_eval, feature_flags, layer_flags, quality_line, replacement_warning
from circuit_catalog.queries.lookups import InterventionUse, Lookups
from circuit_catalog.queries.motifs import Supernode, supernodes
from circuit_catalog.queries.paths import NodePath, best_paths
from circuit_catalog.queries.prompt_graph import PromptGraph
from circuit_catalog.queries.reports import svg
from circuit_catalog.queries.reports.feature import OVERVIEW, card_file, interventions_section
from circuit_catalog.queries.reports.html import (
    Markup,
    banner,
    figures,
    join,
    link,
    page,
    section,
    signed,
    table,
    tag,
    token,
    write_page,
)


def report_file(pid: str) -> str:
    return f"prompt_{pid}.html"


def write_prompt_report(lookups: Lookups, root: Path, key: str, out: Path | None = None, max_nodes: int = 60,
                        max_links: int = 250, k: int = 10) -> Path:
    """Write the report of the prompt with this id or text (default CATALOG/reports/prompt_<id>.html)."""
    graph = lookups.prompt_graph(key)
    top_logit = max(graph.of_kind("logit"), key=lambda n: n.probability or 0.0)
    paths = best_paths(graph, graph.token_nodes(None), top_logit.id, k)
    out = out or root / layout.REPORTS / report_file(graph.info.id)

    def href(fid: str) -> str | None:
        return card_file(fid) if (out.parent / card_file(fid)).is_file() else None

    nav = [(OVERVIEW, "catalog overview")] if (out.parent / OVERVIEW).is_file() else []
    interventions = lookups.prompt_interventions(graph.info.id, k)
    from circuit_catalog.queries.heads import edge_heads

    caveats = Caveats(feature_flags(root, sorted({n.feature_id for n in graph.of_kind("feature")})), layer_flags(root),
                      quality_line(catalog_eval(root)))
    return write_page(out, render_prompt(graph, paths, top_logit.id, Manifest.read(root), href, max_nodes, max_links, k, nav, interventions,
                                         edge_heads(lookups, graph.info.id), list(supernodes(lookups, graph.info.id)), caveats))


@dataclass
class Caveats:
    """What the report warns about besides the graph's own score (`queries.caveats`)."""

    flags: dict[str, list[Flag]] = field(default_factory=dict)  # feature id -> flags
    layer_flags: dict[int, list[Flag]] = field(default_factory=dict)
    quality: str = ""


def render_prompt(graph: PromptGraph, paths: list[NodePath], path_logit: str, manifest: Manifest, href,
                  max_nodes: int, max_links: int, k: int, nav, interventions: list[InterventionUse] = (),
                  heads: dict | None = None, groups: list[Supernode] = (), caveats: Caveats | None = None) -> str:
    info = graph.info
    caveats = caveats or Caveats()
    kinds = {kind: graph.of_kind(kind) for kind in ("token", "feature", "error", "logit")}
    n_edges = sum(len(v) for v in graph.edges.values())
    head = figures([("tokens", info.n_tokens), ("replacement score", f"{info.replacement_score:.3f}"),
                    ("completeness score", f"{info.completeness_score:.3f}"), ("feature nodes", len(kinds["feature"])),
                    ("error nodes", len(kinds["error"])), ("edges", f"{n_edges:,}")])
    warnings = [w for w in [replacement_warning(info.replacement_score)] if w] + [str(f) for fs in caveats.layer_flags.values() for f in fs]
    parts = [head, *(banner(f"Warning: {w}.", "warn") for w in warnings), banner(caveats.quality, "info"),
             _picture(graph, href, max_nodes, max_links, groups), _logits(kinds["logit"]), _paths(graph, paths, path_logit, href),
             _top_nodes(graph, href, k, caveats.flags), _supernodes(graph, groups, href), _heads(graph, heads or {}, href, k),
             interventions_section(list(interventions), "edits")]
    subtitle = f"{info.text!r} · {manifest.model} · transcoders {manifest.transcoders} · prompt {info.id}"
    return page("Attribution graph", join(parts), subtitle, nav, meta={"circuit-catalog-report": "prompt"})


def _node_link(graph: PromptGraph, nid: str, href) -> Markup:
    """A node as the tables name it, its full label (`PromptGraph.describe`) in the tooltip."""
    node = graph.nodes[nid]
    if node.kind == "feature":
        fid = node.feature_id
        shown = join([link(href(fid), fid, "no card written for this feature"), f"@{node.pos}"])
    elif node.kind in ("token", "logit"):
        shown = join([token(node.token or ""), f"@{node.pos}" if node.kind == "token" else " (logit)"])
    else:
        shown = Markup(node.local)
    return tag("span", shown, title=graph.describe(node))


def _members(graph: PromptGraph, group: Supernode) -> list[str]:
    """A supernode's members as the graph's node ids: each member feature at every position where it is in the graph."""
    at: dict[str, list[str]] = {}
    for n in graph.of_kind("feature"):
        at.setdefault(n.feature_id, []).append(n.id)
    return [nid for fid in group.members for nid in at.get(fid, [])]


def _picture(graph: PromptGraph, href, max_nodes: int, max_links: int, groups: list[Supernode]) -> Markup:
    inner = sorted((n for n in graph.nodes.values() if n.kind in ("feature", "error")), key=lambda n: -(n.influence or 0.0))
    shown = inner[:max_nodes] + graph.of_kind("token") + graph.of_kind("logit")
    ids = {n.id for n in shown}
    n_layers = max(n.layer for n in graph.of_kind("logit"))
    positions = sorted({n.pos for n in graph.of_kind("token")})
    # every logit is read at the last position; spread along their row (most probable rightmost), each has room for its token
    logits = sorted(graph.of_kind("logit"), key=lambda n: -(n.probability or 0.0))
    column = {n.id: positions[-1 - i % len(positions)] for i, n in enumerate(logits)}
    nodes = []
    for n in sorted(shown, key=lambda n: (n.layer, n.pos, n.id)):
        label = {"token": n.token, "logit": n.token, "error": "err"}.get(n.kind, n.feature_id)
        title = f"{graph.describe(n)} · influence {n.influence or 0:.4f}" + (f" · activation {n.activation:.3f}" if n.activation is not None else "")
        title += f" · probability {n.probability:.4f}" if n.probability is not None else ""
        nodes.append(svg.GridNode(n.id, label or "∅", column.get(n.id, n.pos), n.layer + 1, n.kind,
                                  href(n.feature_id) if n.feature_id else None, title))
    # the strongest edges among the drawn nodes, by their share of the target's incoming |weight|
    scored = []
    for dst, ins in graph.edges.items():
        total = sum(abs(w) for _, w in ins) or 1.0
        scored += [(abs(w) / total, svg.Link(src, dst, w / total)) for src, w in ins if src in ids and dst in ids]
    links = [link for _, link in sorted(scored, key=lambda t: -t[0])[:max_links]]
    x_labels = [repr(next(n.token for n in graph.of_kind("token") if n.pos == p))[1:-1] for p in positions]

    def row_name(row: int) -> str:
        return "emb" if row == 0 else ("logit" if row == n_layers + 1 else f"L{row - 1}")

    # the most influential supernodes with members drawn, one colour each
    members = [(g, _members(graph, g)) for g in groups]
    outlines = [svg.GridGroup(f"{g.name} ({sum(m in ids for m in ms)} of {len(ms)} drawn)", ms)
                for g, ms in members if any(m in ids for m in ms)][:len(svg.GROUP_COLOURS)]
    picture = svg.grid_graph(nodes, links, x_labels=x_labels, y_label=row_name, label="attribution graph",
                             column_width=max(96.0, min(220.0, 1050.0 / max(len(positions), 1))), groups=outlines)
    note = (f"Positions left to right, layers bottom to top. Drawn: every token and logit and the {min(max_nodes, len(inner))} "
            f"most influential of {len(inner)} feature and error nodes in the pruned graph, with the {len(links)} strongest "
            "edges among them (width: share of the target's incoming |weight|; blue positive, red negative). The logits, all "
            "read at the last position, are spread along the top row, the most probable rightmost, so each shows its token. "
            "Hover for a node's label (the token at its position; a feature's top de-embedding and logit-lens tokens) and "
            "values; feature nodes link to their cards where written.")
    if groups:
        note += (f" Supernodes: {len(outlines)} of the graph's {len(groups)} (the most influential with members drawn, at most "
                 f"{len(svg.GROUP_COLOURS)}) outlined in their own colours around their drawn members, and named in the legend "
                 "with how many of their nodes are drawn.")
    return section("Graph", Markup('<div style="overflow-x:auto">') + picture + Markup("</div>"), note=note, id="graph")


def _logits(logits) -> Markup:
    rows = [[token(n.token or ""), f"{n.probability:.4f}"] for n in sorted(logits, key=lambda n: -(n.probability or 0.0))]
    return section("Logit targets", table(["token", "probability"], rows, numeric=[1], cls="logits"))


def _paths(graph: PromptGraph, paths: list[NodePath], logit: str, href) -> Markup:
    rows = [[signed(p.bottleneck, "{:.4f}"), signed(p.share, "{:+.2%}"), join((_node_link(graph, nid, href) for nid in p.nodes), " → ")]
            for p in paths]
    note = ("Ranked by bottleneck: the smallest share of the target's input that any edge of the path carries (an edge's "
            "share of its destination's absolute input times the destination's own influence on the target). Attribution: "
            "the token's effect on the logit through exactly that path, as a share of the logit's total absolute input. "
            "`circuit-catalog paths --prompt ID --rank attribution` ranks by the latter, `--via`, `--no-errors`, "
            "`--min-hops` constrain the search.")
    return section(f"Paths to {graph.nodes[logit].token!r}", table(["bottleneck", "attribution", "path"], rows, numeric=[0, 1], cls="paths"),
                   note=note)


def _supernodes(graph: PromptGraph, groups: list[Supernode], href) -> Markup:
    """The graph's supernodes: each group's name and its members, at every position where they are in the graph."""
    if not groups:
        return Markup("")
    rows = [[g.name, signed(g.influence, "{:.4f}"), join([_node_link(graph, nid, href) for nid in _members(graph, g)], " ")] for g in groups]
    note = ("Features grouped automatically by role: similar incoming and outgoing attribution in this graph and similar "
            "decoder directions (`ingest/supernodes.py`); named by the members' most common top tokens (→ logit lens, "
            "← de-embedding), and outlined in the graph above. `circuit-catalog supernodes --prompt ID` lists them; the export pins "
            "them for the viewer.")
    return section("Supernodes", table(["group", "influence", "members"], rows, numeric=[1], cls="supernodes"), note=note)


def _heads(graph: PromptGraph, heads: dict, href, k: int) -> Markup:
    """The strongest edges that cross positions, each with the heads that carried it."""
    from circuit_catalog.queries.heads import carried_by

    edges = [(src, dst, w) for dst, ins in graph.edges.items() for src, w in ins
             if graph.nodes[src].pos != graph.nodes[dst].pos and (src, dst) in heads]
    edges = sorted(edges, key=lambda e: -abs(e[2]))[:k]
    if not edges:
        return Markup("")
    rows = [[join([_node_link(graph, s, href), _node_link(graph, d, href)], " → "), signed(w, "{:+.4f}"), carried_by(heads[(s, d)], w)]
            for s, d, w in edges]
    note = ("Each edge split by the last attention head its paths cross before the target (`direct`: no head; `other`: "
            "the heads beyond the stored top ones); a share is the term over the edge's weight, so the shares add to 100%. "
            "Only the most influential pruned edges are split (`ingest --head-edges`, default 1,000).")
    return section("Edges across positions: which heads carried them", table(["edge", "weight", "carried by"], rows, numeric=[1], cls="heads"), note=note)


def _top_nodes(graph: PromptGraph, href, k: int, flags: dict[str, list[Flag]]) -> Markup:
    inner = sorted((n for n in graph.nodes.values() if n.kind in ("feature", "error")), key=lambda n: -(n.influence or 0.0))[:k]
    rows = [[_node_link(graph, n.id, href), token(graph.token_at(n.pos) or ""), join((token(t) for t in (n.top_tokens or [])[:3]), " "),
             join((token(t) for t in (n.logit_tokens or [])[:3]), " "), "; ".join(map(str, flags.get(n.feature_id, []))),
             f"{n.influence or 0:.4f}", "" if n.activation is None else f"{n.activation:.3f}"] for n in inner]
    note = ("Each node with the input token at its position and, for a feature, its top extended de-embedding tokens (what "
            "it reads) and logit-lens tokens (what it writes); flags mark likely artefacts (`queries/caveats.py`).")
    return section("Most influential nodes", table(["node", "token", "reads (de-embedding)", "writes (logit lens)", "flags",
                                                    "influence on the logits", "activation"], rows, numeric=[5, 6], cls="nodes"), note=note)
